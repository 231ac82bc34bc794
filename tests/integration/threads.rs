//! Concurrent reads: one opened image (and one `Reader`) shared by 8 threads reading random
//! ranges at once must return exactly the bytes of the raw conversion.
//!
//! The reference is `qemu-img convert -O raw` when qemu-img is installed; otherwise it is the
//! crate's own single-threaded read of the whole guest. Either way the reference is first
//! checked against the SHA-256 in `fixtures/manifest.tsv`, so this test needs no QEMU.

use crate::common;

use std::process::Command;
use std::sync::Barrier;

use positioned_io::ReadAt;
use qcow2::{Limits, OpenOptions, Qcow2};

const THREADS: usize = 8;
const READS_PER_THREAD: usize = 500;
const MAX_READ: u64 = 192 * 1024;

/// Fixtures with many kinds of clusters: compressed + normal + zero + unallocated (4k
/// clusters), extended L2 subclusters, and a three-image backing chain.
const IMAGES: &[&str] = &["zlib-4k-mixed.qcow2", "extl2-64k.qcow2", "chain-top.qcow2"];

fn manifest_sha(name: &str) -> String {
    let text =
        std::fs::read_to_string(common::fixtures_dir().join("manifest.tsv")).expect("manifest.tsv");
    text.lines()
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .find(|cols| cols[0] == name)
        .unwrap_or_else(|| panic!("{name} is not in fixtures/manifest.tsv"))[2]
        .to_owned()
}

/// The whole guest, read by one thread with one reader.
fn single_threaded(path: &std::path::Path) -> Vec<u8> {
    let image = Qcow2::open_path(path).expect("open");
    let reader = image.reader().expect("reader");
    let mut out = vec![0u8; usize::try_from(image.guest_size()).expect("size")];
    for (i, chunk) in out.chunks_mut(1 << 20).enumerate() {
        reader
            .read_exact_at((i as u64) << 20, chunk)
            .expect("single-threaded read");
    }
    out
}

/// The reference bytes of `name`, checked against the manifest.
fn reference(name: &str, tmp: &common::TempDir) -> Vec<u8> {
    let path = common::fixtures_dir().join(name);
    let (bytes, source) = if let Some(qemu_img) = common::find_tool("qemu-img", "QEMU_IMG") {
        let out = tmp.join(format!("{name}.raw"));
        let status = Command::new(qemu_img)
            .args(["convert", "-O", "raw"])
            .arg(&path)
            .arg(&out)
            .status()
            .expect("run qemu-img");
        assert!(status.success(), "qemu-img convert {name} failed");
        let bytes = std::fs::read(&out).expect("read converted raw");
        let _ = std::fs::remove_file(&out);
        (bytes, "qemu-img convert -O raw")
    } else {
        (single_threaded(&path), "single-threaded read (no qemu-img)")
    };
    assert_eq!(
        common::sha256_hex(&bytes),
        manifest_sha(name),
        "reference for {name} from {source} does not match fixtures/manifest.tsv"
    );
    eprintln!("{name}: reference from {source}, sha256 matches the manifest");
    bytes
}

/// Read random ranges of `image` from [`THREADS`] threads at once and compare with `truth`.
/// Threads share `image`, and also one `Reader`; half the reads go through the shared reader,
/// the others through readers each thread makes from the shared image.
fn hammer(name: &str, image: &Qcow2<std::fs::File>, truth: &[u8], seed: u64) {
    let size = image.guest_size();
    assert_eq!(size, truth.len() as u64, "{name}: guest size");
    let shared = image.reader().expect("reader");
    let cluster = image.cluster_size();
    let start = Barrier::new(THREADS);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (shared, start) = (&shared, &start);
            s.spawn(move || {
                let mut rng =
                    common::Rng::new(seed ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let own = image.reader().expect("reader");
                let mut buf = vec![0u8; MAX_READ as usize];
                start.wait();
                for i in 0..READS_PER_THREAD {
                    let pos = match rng.below(3) {
                        0 => rng.below(size),
                        1 => rng.below(size) / cluster * cluster,
                        _ => size.saturating_sub(rng.below(MAX_READ)),
                    };
                    let len = match rng.below(3) {
                        0 => rng.below(MAX_READ) + 1,
                        1 => rng.below(4096) + 1,
                        _ => cluster.min(MAX_READ),
                    } as usize;
                    let buf = &mut buf[..len];
                    let via = if i % 2 == 0 { "shared" } else { "own" };
                    let reader = if i % 2 == 0 { shared } else { &own };
                    let n = reader.read_at(pos, buf).unwrap_or_else(|e| {
                        panic!(
                            "{name}: thread {t} read {i} ({via} reader) at {pos:#x}+{len:#x}: {e}"
                        )
                    });
                    let end = (pos + n as u64) as usize;
                    assert_eq!(
                        end as u64,
                        (pos + len as u64).min(size),
                        "{name}: thread {t} read {i}: short read at {pos:#x}+{len:#x}"
                    );
                    let want = &truth[pos as usize..end];
                    if &buf[..n] != want {
                        let at = buf.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                        panic!(
                            "{name}: thread {t} read {i} ({via} reader) at {pos:#x}+{len:#x}: \
                             first difference at guest {:#x}: got {:#04x}, want {:#04x}",
                            pos + at as u64,
                            buf[at],
                            want[at]
                        );
                    }
                }
            });
        }
    });
}

#[test]
fn eight_threads_read_the_same_bytes_as_the_raw_conversion() {
    let tmp = common::TempDir::new("threads");
    for (k, name) in IMAGES.iter().enumerate() {
        let truth = reference(name, &tmp);
        let path = common::fixtures_dir().join(name);

        // Default limits: every L2 table fits in the cache.
        let image = Qcow2::open_path(&path).expect("open");
        hammer(name, &image, &truth, 0x7e5d + k as u64);

        // A cache of one L2 table per image: threads evict each other's tables all the time.
        let mut limits = Limits::default();
        limits.l2_cache_bytes = 0;
        let image = Qcow2::open_path_with(&path, &OpenOptions::new().limits(limits)).expect("open");
        hammer(name, &image, &truth, 0xcac4e + k as u64);
        eprintln!("{name}: {THREADS} threads x {READS_PER_THREAD} reads x 2 cache sizes matched");
    }
}

/// Many small L2 tables whose entries follow one another (512-byte clusters, allocated in
/// order by `qemu-img convert`): the shared reader's entries are computed from copies read
/// without its lock, while the threads sharing it replace its 32 kept slices all the time.
/// Then extended L2 entries in a row (every subcluster allocated: one bitmap for all).
#[test]
fn threads_sharing_a_reader_over_many_tables_in_a_row() {
    let Some(qemu) =
        common::Qemu::find_or_skip("threads_sharing_a_reader_over_many_tables_in_a_row")
    else {
        return;
    };
    let tmp = common::TempDir::new("threads-in-a-row");
    let d = tmp.path();
    // (options, guest MiB, most extents: one run of data per L2 table)
    let cases = [
        ("cluster_size=512", 4u64, 128),
        ("cluster_size=16k,extended_l2=on", 16, 1),
    ];
    for (options, mib, most_extents) in cases {
        // Every 8-byte word holds its own offset: a byte read from the wrong place shows.
        let truth: Vec<u8> = (0..(mib << 20) / 8)
            .flat_map(|w| (w * 8).to_le_bytes())
            .collect();
        std::fs::write(d.join("src.raw"), &truth).expect("write src.raw");
        let args = ["convert", "-q", "-f", "raw", "-O", "qcow2", "-o", options];
        qemu.img(d, &[&args[..], &["src.raw", "in-a-row.qcow2"]].concat());
        let map: Vec<serde_json::Value> = serde_json::from_slice(&qemu.img(
            d,
            &["map", "--output=json", "-f", "qcow2", "in-a-row.qcow2"],
        ))
        .expect("qemu-img map");
        assert!(
            map.len() <= most_extents,
            "{options}: {} extents: not allocated in order",
            map.len()
        );
        let image = Qcow2::open_path(d.join("in-a-row.qcow2")).expect("open");
        for seed in [1, 2, 3] {
            hammer(options, &image, &truth, seed);
        }
    }
}
