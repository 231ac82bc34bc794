//! Decompressing one compressed cluster. Input: `[kind and size u8]` then the compressed
//! data; bit 7 of the first byte picks zstd (else zlib), its low 7 bits the cluster size
//! (cluster bits 9 + n % 13). Run with `-rss_limit_mb=512 -malloc_limit_mb=64`.
//! See `qcow2::fuzzing::compressed_cluster`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&kind, input)) = data.split_first() {
        let cluster_bits = 9 + u32::from(kind & 0x7f) % 13;
        let _ = qcow2::fuzzing::compressed_cluster(input, cluster_bits, kind & 0x80 != 0);
    }
});
