//! The bitmap directory and the bitmap tables it points to. Input (big endian):
//! `[cluster bits u8][nb_bitmaps u16][guest size u64][directory offset u32][directory size
//! u32]` then the file the offsets point into; cluster bits are 9 + byte % 13.
//! See `qcow2::fuzzing::bitmap_directory`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((head, file)) = data.split_at_checked(19) else {
        return;
    };
    let be = |at: usize, len: usize| {
        head[at..at + len]
            .iter()
            .fold(0u64, |n, &b| n << 8 | u64::from(b))
    };
    let cluster_bits = 9 + u32::from(head[0]) % 13;
    let _ = qcow2::fuzzing::bitmap_directory(
        file,
        be(11, 4),
        be(15, 4),
        be(1, 2) as u32,
        cluster_bits,
        be(3, 8),
    );
});
