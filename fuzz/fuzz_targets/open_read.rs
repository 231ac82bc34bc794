//! Open arbitrary bytes as a qcow2 image (tight limits) and read across the guest and its
//! internal snapshots. See `fuzz/harness.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| {
    harness::open_and_read(data);
});
