//! L1 and L2 entry decoding. Input: `[cluster bits u8][flags u8]` then the entries (8 bytes
//! each, 16 with extended L2). Flags: 1 = extended L2 (then cluster bits are 14 + byte % 8,
//! else 9 + byte % 13), 2 = external data file, 4 = version 2 (ignored with extended L2).
//! See `qcow2::fuzzing::l2_entries`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&[bits, flags], entries)) = data.split_first_chunk::<2>() else {
        return;
    };
    let extended = flags & 1 != 0;
    let cluster_bits = if extended {
        14 + u32::from(bits) % 8
    } else {
        9 + u32::from(bits) % 13
    };
    let version2 = flags & 4 != 0 && !extended;
    qcow2::fuzzing::l2_entries(entries, cluster_bits, extended, flags & 2 != 0, version2);
});
