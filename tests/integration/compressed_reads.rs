//! Reads of compressed images of every size, compared byte for byte with `qemu-img convert
//! -O raw`: small reads go through the cache of decompressed clusters (and read ahead), a
//! read covering 1 MiB or more of whole clusters decompresses them straight into the
//! caller's buffer on the pool (as does every read of a parallel read's chunk), and a read
//! may mix both (cached clusters, partial clusters at its ends, uncompressed and unallocated
//! clusters between). Also: a corrupt cluster inside a large read is named as a read of that
//! cluster alone names it, and hostile descriptors read or fail as QEMU reads them.
//!
//! Needs `qemu-img` and `qemu-io` (or `$QEMU_IMG` / `$QEMU_IO`): without them each test
//! prints a loud SKIPPED notice, or fails when `CI=true`.

use crate::common;

use common::{describe_difference, Qemu, Rng, TempDir};
use positioned_io::ReadAt;
use qcow2::{OpenOptions, ParallelReadOptions, Qcow2};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// A raw disk of `size` bytes whose clusters alternate, in runs, between compressible text,
/// random bytes (which `qemu-img convert -c` stores uncompressed) and zeros (left
/// unallocated).
fn mixed_disk(size: u64, seed: u64) -> Vec<u8> {
    let mut disk = vec![0u8; size as usize];
    let mut rng = Rng::new(seed);
    let mut at = 0usize;
    while at < disk.len() {
        let run = ((rng.below(24) + 1) * 4 * KIB) as usize;
        let end = (at + run).min(disk.len());
        match rng.below(8) {
            0 => rng.fill(&mut disk[at..end]),
            1 => {}
            _ => rng.fill_text(&mut disk[at..end]),
        }
        at = end;
    }
    disk
}

/// `qemu-img convert -c` of a mixed disk into `name`, and QEMU's own read of it.
fn compressed_image(
    qemu: &Qemu,
    dir: &TempDir,
    name: &str,
    size: u64,
    opts: &str,
) -> (std::path::PathBuf, Vec<u8>) {
    let raw = dir.join(format!("{name}.raw"));
    std::fs::write(&raw, mixed_disk(size, size ^ opts.len() as u64)).expect("raw disk");
    qemu.compress(dir.path(), &format!("{name}.raw"), name, opts);
    let map = qemu.map_json(dir.path(), name);
    let extents = map.as_array().expect("qemu-img map: a list");
    let compressed: u64 = extents
        .iter()
        .filter(|e| e["compressed"] == true)
        .filter_map(|e| e["length"].as_u64())
        .sum();
    assert!(
        compressed >= size / 2,
        "{name}: only {compressed} bytes compressed"
    );
    if !opts.contains("cluster_size=1048576") {
        let others = extents.iter().any(|e| e["compressed"] != true);
        assert!(others, "{name}: every cluster compressed");
    }
    let expected = qemu.convert_to_raw(dir.path(), name, &[] as &[&str]);
    assert_eq!(expected.len() as u64, size, "{name}: size");
    (dir.join(name), expected)
}

/// Read the whole guest of `image` in pieces of `piece` bytes from `start` (then the part
/// before `start`) and compare with `expected`.
fn check_pieces(
    label: &str,
    image: &Qcow2<std::fs::File>,
    expected: &[u8],
    start: u64,
    piece: u64,
) {
    let reader = image.reader().expect("reader");
    let size = expected.len() as u64;
    let mut spans = Vec::new();
    let mut at = start;
    while at < size {
        spans.push((at, piece.min(size - at)));
        at += piece;
    }
    if start > 0 {
        spans.push((0, start));
    }
    let mut buf = vec![0u8; piece.max(start) as usize];
    for (at, len) in spans {
        let got = &mut buf[..len as usize];
        got.fill(0xa5);
        reader
            .read_exact_at(at, got)
            .unwrap_or_else(|e| panic!("{label}: read {len} at {at}: {e}"));
        let want = &expected[at as usize..(at + len) as usize];
        if let Some(diff) = describe_difference(label, at, got, want) {
            panic!("{diff} (piece {piece}, from {start})");
        }
    }
}

fn check_every_read_shape(qemu: &Qemu, dir: &TempDir, name: &str, size: u64, opts: &str) {
    let (path, expected) = compressed_image(qemu, dir, name, size, opts);
    for threads in [1, 2, 3] {
        let options = OpenOptions::new().threads(threads);
        let open = || Qcow2::open_path_with(&path, &options).expect("open");
        let label = format!("{name} ({opts}), {threads} threads");
        // The whole guest in one read, then pieces of every kind: large aligned ones, large
        // ones starting inside a cluster, small sequential ones (read ahead).
        check_pieces(&label, &open(), &expected, 0, size);
        for (start, piece) in [
            (0, MIB),
            (0, 3 * MIB),
            (3000, MIB + 4097),
            (64 * KIB - 512, 2 * MIB + 512),
            (0, 64 * KIB),
            (512, 40 * KIB),
        ] {
            check_pieces(&label, &open(), &expected, start, piece);
        }
        // A parallel read: each chunk is read on a pool thread, its whole clusters
        // decompressed straight into the chunk's buffer.
        for chunk in [64 * KIB, 512 * KIB, 3 * MIB + 4096] {
            let options = ParallelReadOptions::new()
                .threads(threads)
                .chunk_size(chunk);
            let mut out = Vec::new();
            let image = open();
            let reader = image.reader().expect("reader");
            reader
                .read_parallel_to_writer(.., &options, &mut out)
                .unwrap_or_else(|e| panic!("{label}: read_parallel, chunks of {chunk}: {e}"));
            if let Some(diff) = describe_difference(&label, 0, &out, &expected) {
                panic!("{diff} (read_parallel, chunks of {chunk})");
            }
        }
        // Small reads first, so a large read finds some of its clusters cached and
        // decompresses the others straight into its buffer.
        let image = open();
        check_pieces(&label, &image, &expected[..(2 * MIB) as usize], 0, 8 * KIB);
        check_pieces(&label, &image, &expected, 0, size);
    }
}

#[test]
#[cfg(feature = "zlib")]
fn zlib_images_read_alike_in_reads_of_every_size() {
    let Some(qemu) = Qemu::find_or_skip("zlib_images_read_alike_in_reads_of_every_size") else {
        return;
    };
    let dir = TempDir::new("compressed-reads-zlib");
    check_every_read_shape(
        &qemu,
        &dir,
        "z64k.qcow2",
        6 * MIB + 12 * KIB,
        "cluster_size=65536",
    );
    check_every_read_shape(
        &qemu,
        &dir,
        "z4k.qcow2",
        3 * MIB + 4 * KIB,
        "cluster_size=4096",
    );
    check_every_read_shape(&qemu, &dir, "z1m.qcow2", 9 * MIB, "cluster_size=1048576");
}

#[test]
#[cfg(feature = "zstd")]
fn zstd_images_read_alike_in_reads_of_every_size() {
    let Some(qemu) = Qemu::find_or_skip("zstd_images_read_alike_in_reads_of_every_size") else {
        return;
    };
    let dir = TempDir::new("compressed-reads-zstd");
    let opts = "cluster_size=65536,compression_type=zstd";
    check_every_read_shape(&qemu, &dir, "s64k.qcow2", 5 * MIB + 512, opts);
    let opts = "cluster_size=8192,compression_type=zstd";
    check_every_read_shape(&qemu, &dir, "s8k.qcow2", 3 * MIB, opts);
}

/// Through an empty overlay (the cloud-image case), a large read of the overlay is one large
/// read of the compressed base: its clusters are decompressed straight into the buffer too.
#[test]
#[cfg(feature = "zstd")]
fn large_reads_through_an_empty_overlay_read_as_qemu_reads_them() {
    let Some(qemu) = Qemu::find_or_skip("large_reads_through_an_empty_overlay") else {
        return;
    };
    let dir = TempDir::new("compressed-reads-overlay");
    let size = 5 * MIB;
    let opts = "cluster_size=65536,compression_type=zstd";
    compressed_image(&qemu, &dir, "base.qcow2", size, opts);
    qemu.create_overlay(dir.path(), "base.qcow2", "top.qcow2");
    // A few clusters of the overlay's own, so reads cross between the layers.
    qemu.io(
        dir.path(),
        "qcow2",
        "top.qcow2",
        &["write -P 0x3c 1M 64k", "write -P 0x3d 3076k 8k"],
    );
    let expected = qemu.convert_to_raw(dir.path(), "top.qcow2", &[] as &[&str]);
    for threads in [1, 2] {
        let options = OpenOptions::new().threads(threads);
        let label = format!("overlay over zstd, {threads} threads");
        let open = || Qcow2::open_path_with(dir.join("top.qcow2"), &options).expect("open");
        for (start, piece) in [(0, size), (0, MIB), (0, 2 * MIB + 4096), (512, 64 * KIB)] {
            check_pieces(&label, &open(), &expected, start, piece);
        }
    }
}

/// The guest offset a failed read names, if it failed on a corrupt compressed cluster.
#[cfg(feature = "zlib")]
fn bad_cluster_of(err: &std::io::Error) -> Option<u64> {
    match err.get_ref()?.downcast_ref::<qcow2::Error>()? {
        qcow2::Error::BadCompressedCluster { guest_offset, .. } => Some(*guest_offset),
        _ => None,
    }
}

/// File offset of the (only) L2 table of a v3 image with 64 KiB clusters.
#[cfg(feature = "zlib")]
fn l2_table(image: &[u8]) -> usize {
    let be64 = |at: usize| u64::from_be_bytes(image[at..at + 8].try_into().expect("8 bytes"));
    assert_eq!(be64(20) >> 32, 16, "64 KiB clusters");
    (be64(be64(40) as usize) & 0x00ff_ffff_ffff_fe00) as usize
}

/// (guest offset, host offset, L2 entry) of every compressed cluster of a v3 image with
/// 64 KiB clusters and one L2 table, from its tables as the spec lays them out.
#[cfg(feature = "zlib")]
fn compressed_clusters(image: &[u8]) -> Vec<(u64, u64, u64)> {
    let l2 = l2_table(image);
    let entry = |i: usize| u64::from_be_bytes(image[l2 + 8 * i..][..8].try_into().expect("8"));
    // Compressed: bit 62; the host offset takes the low 62 - (cluster_bits - 8) bits.
    (0..8192)
        .map(|i| (i as u64 * 64 * KIB, entry(i)))
        .filter(|&(_, entry)| entry & (1 << 62) != 0)
        .map(|(guest, entry)| (guest, entry & ((1 << 54) - 1), entry))
        .collect()
}

/// Every guest cluster of a large read mapped to one compressed descriptor (a hostile image:
/// QEMU reads it without complaint) reads as QEMU reads it; one descriptor past the end of
/// the file fails the large read as it fails QEMU's.
#[test]
#[cfg(feature = "zlib")]
fn hostile_descriptors_in_a_large_read_read_as_qemu_reads_them() {
    let Some(qemu) = Qemu::find_or_skip("hostile_descriptors_in_a_large_read") else {
        return;
    };
    let dir = TempDir::new("compressed-reads-hostile");
    let size = 4 * MIB;
    let (path, _) = compressed_image(&qemu, &dir, "h.qcow2", size, "cluster_size=65536");
    let bytes = std::fs::read(&path).expect("image");
    let l2 = l2_table(&bytes);
    let (_, _, shared) = compressed_clusters(&bytes)[3];
    let mut one = bytes.clone();
    for i in 0..(size / (64 * KIB)) as usize {
        one[l2 + 8 * i..][..8].copy_from_slice(&shared.to_be_bytes());
    }
    std::fs::write(dir.join("shared.qcow2"), &one).expect("write");
    let expected = qemu.convert_to_raw(dir.path(), "shared.qcow2", &[] as &[&str]);
    for threads in [1, 2, 3] {
        let options = OpenOptions::new().threads(threads);
        let image = Qcow2::open_with(one.clone(), &options).expect("open");
        let mut all = vec![0u8; size as usize];
        image
            .reader()
            .unwrap()
            .read_exact_at(0, &mut all)
            .expect("read");
        assert!(all == expected, "{threads} threads: differs from qemu-img");
    }

    let mut past = bytes.clone();
    let (guest, _, entry) = compressed_clusters(&bytes)[20];
    let beyond = (entry & !((1 << 54) - 1)) | (bytes.len() as u64 + 5 * 64 * KIB);
    let index = (guest / (64 * KIB)) as usize;
    past[l2 + 8 * index..][..8].copy_from_slice(&beyond.to_be_bytes());
    std::fs::write(dir.join("past.qcow2"), &past).expect("write");
    let qemu_read = std::process::Command::new(&qemu.img)
        .current_dir(dir.path())
        .args(["convert", "-O", "raw", "past.qcow2", "past.raw"])
        .output()
        .expect("qemu-img convert");
    assert!(
        !qemu_read.status.success(),
        "qemu-img reads a cluster past the end"
    );
    for threads in [1, 2] {
        let options = OpenOptions::new().threads(threads);
        let image = Qcow2::open_with(past.clone(), &options).expect("open");
        let mut all = vec![0u8; size as usize];
        let err = image
            .reader()
            .unwrap()
            .read_exact_at(0, &mut all)
            .expect_err("past EOF");
        assert_eq!(
            bad_cluster_of(&err),
            Some(guest),
            "{threads} threads: {err}"
        );
    }
}

#[test]
#[cfg(feature = "zlib")]
fn corrupt_clusters_in_a_large_read_name_the_first_in_guest_order() {
    let Some(qemu) =
        Qemu::find_or_skip("corrupt_clusters_in_a_large_read_name_the_first_in_guest_order")
    else {
        return;
    };
    let dir = TempDir::new("compressed-reads-corrupt");
    let size = 4 * MIB;
    let (path, _) = compressed_image(&qemu, &dir, "c.qcow2", size, "cluster_size=65536");
    let mut bytes = std::fs::read(&path).expect("image");
    let compressed = compressed_clusters(&bytes);
    assert!(
        compressed.len() > 30,
        "{} compressed clusters",
        compressed.len()
    );
    let (first, second) = (compressed[12], compressed[25]);
    for (_, host, _) in [first, second] {
        bytes[host as usize..host as usize + 64].fill(0xff);
    }
    for threads in [1, 2, 3] {
        let options = OpenOptions::new().threads(threads);
        let image = Qcow2::open_with(bytes.clone(), &options).expect("open");
        let reader = image.reader().expect("reader");
        let mut all = vec![0u8; size as usize];
        let err = reader
            .read_exact_at(0, &mut all)
            .expect_err("corrupt clusters");
        assert_eq!(
            bad_cluster_of(&err),
            Some(first.0),
            "{threads} threads: {err}"
        );
        // From past the first, a large read names the second.
        let from = first.0 + 64 * KIB;
        let mut rest = vec![0u8; (size - from) as usize];
        let err = reader
            .read_exact_at(from, &mut rest)
            .expect_err("a corrupt cluster");
        assert_eq!(
            bad_cluster_of(&err),
            Some(second.0),
            "{threads} threads: {err}"
        );
        // And a read of that cluster alone, through the cache, names it too.
        let mut cluster = vec![0u8; (64 * KIB) as usize];
        let err = reader
            .read_exact_at(second.0, &mut cluster)
            .expect_err("a corrupt cluster");
        assert_eq!(
            bad_cluster_of(&err),
            Some(second.0),
            "{threads} threads: {err}"
        );
    }
}
