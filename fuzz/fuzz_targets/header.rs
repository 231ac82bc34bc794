//! `Header::parse` (and the header extensions) on a first cluster. See
//! `qcow2::fuzzing::header`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = qcow2::fuzzing::header(data);
});
