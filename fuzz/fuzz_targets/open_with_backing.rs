//! Split the input into a top image, a backing image and a raw slice; attach the backing
//! image (and optionally the raw slice as a data file or raw backing), then read.
//!
//! Input layout (see `harness::split_backing_input`): byte 0 = flags, bytes 1..5 = top
//! length (u32 LE), bytes 5..9 = backing length (u32 LE), then top, backing, raw slice.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| {
    harness::open_with_backing(data);
});
