//! Entry points for the parser fuzz targets in `fuzz/fuzz_targets/` (cargo feature
//! `fuzzing`): internal, no stability promise.
//!
//! Each function runs one crate-private parser on a byte slice, as the image reader runs it,
//! and asserts what the parser promises its callers (alignment, lengths, one cluster of
//! output). An `Err` is a fine answer to hostile bytes; a panic is a bug, either in the parser
//! or in the promise.

#![doc(hidden)]
// These functions exist to panic when a parser breaks its promise. Their own arithmetic is
// on values range-checked first; an overflow here would be a fuzz finding in this module.
#![allow(clippy::panic, clippy::arithmetic_side_effects)]

use positioned_io::ReadAt;

use crate::base::bytes::{align8, be_u32, field, low_bits};
use crate::base::io::read_metadata;
use crate::base::limits::Limits;
use crate::error::{Error, Result};
use crate::format::bitmap::{self, DataCluster, DirectoryContext};
use crate::format::compress::{self, Decompressor};
use crate::format::header::{CompressionType, Header, SNAPSHOT_HEADER_LEN, TABLE_ENTRY_LEN};
use crate::format::header::{MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use crate::format::snapshot;
use crate::format::table::{self, ExtentKind, Geometry};
use crate::image::dirty;

/// Extended L2 needs clusters of at least 16 KiB (spec: "Extended L2 Entries").
const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// Subclusters per cluster with extended L2 entries.
const SUBCLUSTERS: u32 = 32;
/// Bitmap data bytes whose bit walk is checked bit by bit (the check is quadratic-free but
/// linear per step, so keep it small).
const MAX_WALKED_BITMAP_BYTES: usize = 4096;

/// `Header::parse` on a first cluster (with its extension area and backing file name).
///
/// Promises: version 2 or 3, cluster bits in range, the header, its extensions and the backing
/// file name inside the first cluster, and bytes past the first cluster never matter.
pub fn header(cluster0: &[u8]) -> Result<()> {
    let limits = Limits::default();
    let result = Header::parse(cluster0, &limits);
    let h = match &result {
        Ok(h) => h,
        Err(_) => return result.map(drop),
    };
    assert!(matches!(h.version(), 2 | 3), "version {}", h.version());
    assert!((MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits()));
    let cluster_size = h.cluster_size();
    assert_eq!(cluster_size, 1u64 << h.cluster_bits());
    assert!(u64::from(h.header_length()) <= cluster_size);
    assert_eq!(h.refcount_bits(), 1u32 << h.refcount_order());
    for e in h.extensions() {
        let end = e.offset.saturating_add(u64::from(e.len));
        assert!(end <= cluster_size, "extension {e:?} ends past the cluster");
    }
    if let Some(name) = h.backing_file_bytes() {
        assert!(
            name.len() as u64 <= cluster_size,
            "backing file name too long"
        );
    }
    if h.has_extended_l2() {
        assert!(h.cluster_bits() >= MIN_EXTENDED_L2_CLUSTER_BITS);
    }
    assert!(h
        .l1_entries_for(h.size())
        .is_some_and(|n| n <= u64::from(h.l1_size())));
    let _ = (h.features(), format!("{h:?}"));

    // Bytes past the first cluster must not change the answer.
    let first = usize::try_from(cluster_size)
        .ok()
        .and_then(|len| cluster0.get(..len));
    if let Some(first) = first.filter(|f| f.len() < cluster0.len()) {
        let again = Header::parse(first, &limits);
        assert_eq!(
            format!("{result:?}"),
            format!("{again:?}"),
            "bytes past the first cluster changed the header"
        );
    }
    Ok(())
}

/// Walk `count` snapshot table entries from the start of `table`, as the image reader does
/// (`entry_len` on the fixed part, then `parse_entry` on the whole entry).
///
/// Promises: an entry as long as `entry_len` says always parses, its padded length is the
/// next multiple of 8, and the optional fields are present exactly when the extra data holds
/// them.
pub fn snapshot_table(table: &[u8], count: u32) -> Result<()> {
    let limits = Limits::default();
    let mut offset = 0u64;
    let mut total = 0u64;
    for _ in 0..count {
        let fixed = read_metadata(&table, offset, SNAPSHOT_HEADER_LEN, "snapshot table entry")?;
        let (len, padded) = snapshot::entry_len(&fixed, offset, &limits)?;
        assert!(len >= SNAPSHOT_HEADER_LEN);
        assert_eq!(Some(padded), align8(len));
        total = total.saturating_add(padded);
        Limits::check("snapshot table", total, limits.max_snapshot_table_bytes)?;
        let entry = read_metadata(&table, offset, len, "snapshot table entry")?;
        let snap = match snapshot::parse_entry(&entry, offset) {
            Ok(snap) => snap,
            Err(e) => panic!("entry of the length entry_len gave does not parse: {e}"),
        };
        let extra_len = u64::from(be_u32(&entry, 36).unwrap_or(0));
        assert_eq!(snap.disk_size.is_some(), extra_len >= 16);
        assert_eq!(snap.icount.is_some(), extra_len >= 24);
        offset = offset
            .checked_add(padded)
            .ok_or_else(|| Error::malformed("snapshot table offset overflows", offset))?;
    }
    Ok(())
}

/// Parse a bitmap directory of `dir_size` bytes at `dir_offset` in `file`, then read and
/// decode the table of every bitmap not in use, as the image reader does when it opens an
/// image; then walk the bits of the first data cluster found.
///
/// Promises: granularities are powers of two from 512 B to 2 GiB, tables are cluster aligned
/// and have the entry count the guest needs, data clusters are cluster aligned, and
/// `next_bit` finds exactly the bits that are set or clear.
pub fn bitmap_directory(
    file: &[u8],
    dir_offset: u64,
    dir_size: u64,
    nb_bitmaps: u32,
    cluster_bits: u32,
    guest_size: u64,
) -> Result<()> {
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Ok(());
    }
    let limits = Limits::default();
    Limits::check(
        "bitmap directory",
        dir_size,
        limits.max_bitmap_directory_bytes,
    )?;
    let dir = read_metadata(&file, dir_offset, dir_size, "bitmap directory")?;
    let ctx = DirectoryContext {
        nb_bitmaps,
        offset: dir_offset,
        cluster_bits,
        guest_size,
    };
    let bitmaps = bitmap::parse_directory(&dir, &ctx)?;
    assert_eq!(bitmaps.len() as u64, u64::from(nb_bitmaps));
    bitmap::check_duplicates(&bitmaps)?;
    let mut tables_read = 0u64;
    let mut data_at = None;
    for b in &bitmaps {
        assert!(b.granularity.is_power_of_two());
        assert!((1u64 << 9..=1u64 << 31).contains(&b.granularity));
        assert!(b.table_offset != 0 && low_bits(b.table_offset, cluster_bits) == 0);
        assert!(b.entry_offset >= dir_offset && b.entry_offset < dir_offset + dir_size);
        if b.in_use() {
            continue;
        }
        tables_read = tables_read.saturating_add(u64::from(b.table_size) * TABLE_ENTRY_LEN);
        Limits::check("bitmap tables", tables_read, limits.max_bitmap_table_bytes)?;
        let table = dirty::read_table(&file, b, guest_size, cluster_bits)?;
        assert_eq!(table.len() as u64, u64::from(b.table_size));
        assert_eq!(
            table.len() as u64,
            b.clusters_needed(guest_size, cluster_bits)
        );
        for cluster in table {
            if let DataCluster::At(offset) = cluster {
                assert!(offset != 0 && low_bits(offset, cluster_bits) == 0);
                data_at.get_or_insert(offset);
            }
        }
    }
    if let Some(offset) = data_at {
        let len = (1usize << cluster_bits).min(MAX_WALKED_BITMAP_BYTES);
        let mut data = vec![0u8; len];
        let got = file.read_at(offset, &mut data).unwrap_or(0);
        data.truncate(got);
        walk_bits(&data);
    }
    Ok(())
}

/// Alternate `next_bit` for set and clear bits across `data`, checking every bit it skips.
fn walk_bits(data: &[u8]) {
    let bit = |i: usize| data.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1);
    let (mut from, mut set) = (0usize, true);
    while let Some(found) = bitmap::next_bit(data, from, set) {
        assert!(found >= from && found < data.len() * 8, "next_bit ran past");
        assert_eq!(bit(found), set, "next_bit found the wrong value at {found}");
        assert!(
            (from..found).all(|i| bit(i) != set),
            "next_bit skipped a match"
        );
        (from, set) = (found, !set);
    }
    assert!(
        (from..data.len() * 8).all(|i| bit(i) != set),
        "next_bit missed a match"
    );
}

/// Decode every L2 entry of `entries` (16 bytes each with extended L2, else 8), every
/// subcluster of each, and every 8-byte word as an L1 entry, under the geometry given.
/// Geometries no image can have (cluster bits out of range, extended L2 with clusters under
/// 16 KiB or in a version 2 image) are skipped.
///
/// Promises: data offsets lie in the entry's host cluster and are aligned to the unit
/// (cluster or subcluster); compressed data has a non-zero length of at most the sectors the
/// descriptor can count and never comes with an external data file; an entry is either
/// valid or invalid for all its subclusters; L2 table offsets are cluster aligned.
pub fn l2_entries(
    entries: &[u8],
    cluster_bits: u32,
    extended_l2: bool,
    external_data: bool,
    version2: bool,
) {
    let min_bits = if extended_l2 {
        MIN_EXTENDED_L2_CLUSTER_BITS
    } else {
        MIN_CLUSTER_BITS
    };
    if !(min_bits..=MAX_CLUSTER_BITS).contains(&cluster_bits) || (extended_l2 && version2) {
        return;
    }
    let entry_len: u32 = if extended_l2 { 16 } else { 8 };
    let geometry = Geometry {
        cluster_bits,
        index_bits: cluster_bits - entry_len.trailing_zeros(),
        extended_l2,
        external_data,
        pre_v3: version2,
    };
    let subclusters = if extended_l2 { SUBCLUSTERS } else { 1 };
    for (i, chunk) in entries.chunks_exact(entry_len as usize).enumerate() {
        let at = i as u64 * u64::from(entry_len);
        let word = |n: usize| {
            field(chunk, n * 8, 8)
                .and_then(|w| w.try_into().ok())
                .map_or(0, u64::from_be_bytes)
        };
        let (entry, bitmap) = (word(0), word(1));
        let decoded: Vec<_> = (0..subclusters)
            .map(|sub| table::decode_l2(entry, bitmap, sub, &geometry, at))
            .collect();
        assert!(
            decoded.iter().all(Result::is_ok) || decoded.iter().all(Result::is_err),
            "entry {entry:#x} {bitmap:#x} is valid for some subclusters only"
        );
        for mapping in decoded.into_iter().flatten() {
            check_mapping(mapping, entry, &geometry);
        }
    }
    for (i, chunk) in entries.chunks_exact(8).enumerate() {
        let entry = chunk.try_into().map_or(0, u64::from_be_bytes);
        if let Ok(Some(offset)) = table::l2_table_offset(entry, &geometry, i as u64 * 8) {
            assert!(offset != 0 && low_bits(offset, cluster_bits) == 0);
            assert!(offset < 1 << 56, "L2 table offset {offset:#x} past bit 55");
        }
    }
}

fn check_mapping(mapping: ExtentKind, entry: u64, g: &Geometry) {
    match mapping {
        ExtentKind::Unallocated { .. } | ExtentKind::Zero { .. } => {}
        ExtentKind::Data { host_offset } => {
            assert_eq!(
                low_bits(host_offset, g.unit_bits()),
                0,
                "unaligned data unit"
            );
            let cluster = host_offset >> g.cluster_bits << g.cluster_bits;
            assert_eq!(
                cluster,
                entry & table::L2_OFFSET_MASK,
                "data outside its cluster"
            );
        }
        ExtentKind::Compressed {
            host_offset,
            compressed_len: len,
        } => {
            assert!(
                !g.external_data,
                "compressed cluster with an external data file"
            );
            // At most 2^(cluster_bits - 8) sectors of 512 bytes.
            let max_len = 512u64 << (g.cluster_bits - 8);
            assert!(len > 0 && len <= max_len, "compressed length {len}");
            assert!(host_offset < 1 << (62 - (g.cluster_bits - 8)));
        }
    }
}

/// Decompress `input` into one cluster of `1 << cluster_bits` bytes, twice with the same
/// decoder (the reader reuses decoders) and once with a fresh one.
///
/// Promises: success means the cluster was filled, a reused decoder gives the same answer
/// and the same bytes as a fresh one, and (zlib) every cluster zlib reads is read with zlib's
/// bytes.
pub fn compressed_cluster(input: &[u8], cluster_bits: u32, zstd: bool) -> Result<()> {
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Ok(());
    }
    let kind = if zstd {
        CompressionType::Zstd
    } else {
        CompressionType::Zlib
    };
    compress::check_available(kind)?;
    let cluster_size = 1usize << cluster_bits;
    let mut decoder = Decompressor::new();
    let mut first = vec![0u8; cluster_size];
    let result = decoder.decompress(kind, input, &mut first);
    // Poison the buffer: a decoder that left part of it alone would show.
    let mut again = vec![0xa5u8; cluster_size];
    let reused = decoder.decompress(kind, input, &mut again);
    assert_eq!(result, reused, "a reused decoder answers differently");
    let mut fresh = vec![0x5au8; cluster_size];
    let fresh_result = Decompressor::new().decompress(kind, input, &mut fresh);
    assert_eq!(result, fresh_result, "a fresh decoder answers differently");
    if result.is_ok() {
        assert!(
            first == again && first == fresh,
            "decoders disagree on the bytes"
        );
    }
    #[cfg(feature = "zlib")]
    if kind == CompressionType::Zlib {
        // The fast path (libdeflate) against zlib's verdict, which is QEMU's: whatever zlib
        // reads, it reads too, byte for byte. (It may read a few malformed streams that zlib
        // refuses: see `Decompressor::inflate`.)
        let mut zlib = vec![0x3cu8; cluster_size];
        if Decompressor::new()
            .inflate_as_zlib(input, &mut zlib)
            .is_ok()
        {
            assert!(result.is_ok(), "zlib reads a cluster the decoder refuses");
            assert!(first == zlib, "the decoder and zlib disagree on the bytes");
        }
    }
    result.map_err(|reason| Error::BadCompressedCluster {
        guest_offset: 0,
        host_offset: 0,
        reason,
    })
}

/// The reader's decoder of compressed clusters, kept from call to call as the reader keeps
/// it (benches/peers/inflate.rs times it against other decoders).
pub struct ClusterDecoder(Decompressor);

impl std::fmt::Debug for ClusterDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterDecoder(..)")
    }
}

impl Default for ClusterDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ClusterDecoder {
    /// A decoder whose state is made on first use.
    pub fn new() -> Self {
        ClusterDecoder(Decompressor::new())
    }

    /// Decompress `input` (zstd, else zlib) to fill `out` exactly, as the reader does.
    pub fn decode(&mut self, zstd: bool, input: &[u8], out: &mut [u8]) -> Result<(), String> {
        let kind = if zstd {
            CompressionType::Zstd
        } else {
            CompressionType::Zlib
        };
        self.0.decompress(kind, input, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn parse(file: &[u8]) -> Header {
        Header::parse(file, &Limits::default()).unwrap()
    }

    /// Bytes that look like nothing in particular (xorshift).
    fn garbage(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// The L2 tables an image's L1 table points to.
    fn l2_tables<'a>(file: &'a [u8], h: &Header) -> Vec<&'a [u8]> {
        let l1 = h.l1_table_offset() as usize;
        let cluster = h.cluster_size() as usize;
        (0..h.l1_size() as usize)
            .map(|i| u64::from_be_bytes(file[l1 + 8 * i..][..8].try_into().unwrap()))
            .filter_map(|e| {
                let at = (e & table::L1_OFFSET_MASK) as usize;
                (at != 0).then(|| &file[at..(at + cluster).min(file.len())])
            })
            .collect()
    }

    /// The compressed clusters of an image without extended L2, as the L2 entries place them.
    #[cfg(all(feature = "zlib", feature = "zstd"))]
    fn compressed_clusters(file: &[u8]) -> Vec<&[u8]> {
        let h = parse(file);
        let g = Geometry {
            cluster_bits: h.cluster_bits(),
            index_bits: h.cluster_bits() - 3,
            extended_l2: false,
            external_data: false,
            pre_v3: false,
        };
        let mut out = Vec::new();
        for l2 in l2_tables(file, &h) {
            for entry in l2.chunks_exact(8) {
                let entry = u64::from_be_bytes(entry.try_into().unwrap());
                if let Ok(ExtentKind::Compressed {
                    host_offset,
                    compressed_len: len,
                }) = table::decode_l2(entry, 0, 0, &g, 0)
                {
                    let (at, len) = (host_offset as usize, len as usize);
                    out.push(&file[at..(at + len).min(file.len())]);
                }
            }
        }
        out
    }

    #[test]
    fn header_entry_point() {
        for name in [
            "v3-64k-basic.qcow2",
            "v2-64k.qcow2",
            "snap.qcow2",
            "extl2-16k.qcow2",
            "luks.qcow2",
            "aes.qcow2",
        ] {
            let file = fixture(name);
            header(&file).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(header(&fixture("v3-corrupt.qcow2")).is_err());
        assert!(header(&garbage(4096, 1)).is_err());
        assert!(header(&[]).is_err());
        // A valid header followed by garbage past its first cluster.
        let mut file = fixture("zstd-4k-mixed.qcow2");
        file.truncate(4096);
        file.extend(garbage(4096, 2));
        header(&file).unwrap();
    }

    #[test]
    fn snapshot_table_entry_point() {
        let file = fixture("snap.qcow2");
        let h = parse(&file);
        assert!(h.nb_snapshots() > 0);
        let table = &file[h.snapshots_offset() as usize..];
        snapshot_table(table, h.nb_snapshots()).unwrap();
        snapshot_table(&[0; 120], 3).unwrap(); // three empty entries
        assert!(snapshot_table(&[0; 119], 3).is_err());
        assert!(snapshot_table(&[0xff; 64], 1).is_err()); // 4 GiB of extra data
        for seed in 1..50 {
            let _ = snapshot_table(&garbage(256, seed), 4);
        }
    }

    #[test]
    fn bitmap_directory_entry_point() {
        let file = fixture("bitmaps.qcow2");
        let h = parse(&file);
        let ext = h.bitmaps().unwrap();
        let (off, size, nb) = (ext.directory_offset, ext.directory_size, ext.nb_bitmaps);
        let bits = h.cluster_bits();
        bitmap_directory(&file, off, size, nb, bits, h.size()).unwrap();
        assert!(bitmap_directory(&file, off, size, nb + 1, bits, h.size()).is_err());
        // A guest a million times as big needs bigger tables.
        assert!(bitmap_directory(&file, off, size, nb, bits, h.size() << 20).is_err());
        for seed in 1..50 {
            let _ = bitmap_directory(&garbage(4096, seed), 512, 64, 1, 9, 1 << 20);
        }
    }

    #[test]
    fn bitmap_bits_walk() {
        walk_bits(&[]);
        walk_bits(&[0x00, 0xff, 0x81, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 1]);
        for seed in 1..20 {
            walk_bits(&garbage(64, seed));
        }
    }

    #[test]
    fn l2_entries_entry_point() {
        for (name, extended) in [
            ("zlib-4k-mixed.qcow2", false),
            ("v3-64k-basic.qcow2", false),
            ("extl2-16k.qcow2", true),
        ] {
            let file = fixture(name);
            let h = parse(&file);
            let tables = l2_tables(&file, &h);
            assert!(!tables.is_empty(), "{name}");
            for l2 in tables {
                l2_entries(l2, h.cluster_bits(), extended, false, false);
            }
        }
        for seed in 1..20 {
            let bytes = garbage(1024, seed);
            for bits in 9..=21 {
                for flags in 0..8 {
                    l2_entries(&bytes, bits, flags & 1 != 0, flags & 2 != 0, flags & 4 != 0);
                }
            }
        }
    }

    #[test]
    #[cfg(all(feature = "zlib", feature = "zstd"))]
    fn compressed_cluster_entry_point() {
        for (name, zstd) in [
            ("zlib-4k-mixed.qcow2", false),
            ("zstd-4k-mixed.qcow2", true),
        ] {
            let file = fixture(name);
            let bits = parse(&file).cluster_bits();
            let clusters = compressed_clusters(&file);
            assert!(!clusters.is_empty(), "{name} has compressed clusters");
            for input in clusters {
                compressed_cluster(input, bits, zstd).unwrap_or_else(|e| panic!("{name}: {e}"));
                // Exactly one cluster. A zlib stream ends, so it cannot fill two; a zstd frame
                // may be followed by the next cluster's frame in the sectors read (QEMU decodes
                // on too), but its recorded content size does not fit in half a cluster.
                let other = if zstd { bits - 1 } else { bits + 1 };
                assert!(compressed_cluster(input, other, zstd).is_err(), "{name}");
                assert!(compressed_cluster(&input[..3], bits, zstd).is_err());
            }
        }
        for seed in 1..20 {
            let _ = compressed_cluster(&garbage(512, seed), 12, seed % 2 == 0);
        }
        assert!(compressed_cluster(&[], 9, false).is_err());
        assert!(compressed_cluster(&[], 9, true).is_err());
    }

    #[test]
    #[cfg(not(feature = "zlib"))]
    fn compressed_cluster_without_zlib() {
        assert!(matches!(
            compressed_cluster(&[0; 512], 12, false),
            Err(Error::FeatureDisabled { feature: "zlib" })
        ));
    }
}
