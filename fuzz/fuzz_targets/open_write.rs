//! Open arbitrary bytes as a qcow2 image for writing (tight limits, in memory) and write,
//! zero, discard, flush and read back. See `fuzz/harness.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| {
    harness::open_and_write(data);
});
