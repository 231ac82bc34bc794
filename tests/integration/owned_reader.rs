//! `OwnedReader`: a reader that owns its image, returned from functions as
//! `Box<dyn Read + Seek + Send>`, moved to threads, and read whole against
//! `qemu-img convert -O raw` (and the SHA-256 of `fixtures/manifest.tsv`).
//!
//! The speed comparison with a borrowed `Reader` is an ignored test, to run in release:
//!
//! ```text
//! cargo test --release --test integration -- --ignored --nocapture owned_reader::owned_reads_as_fast
//! ```

use crate::common;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use positioned_io::{ReadAt, Size};
use qcow2::{compare, CompareOptions, Comparison, OwnedReader, Qcow2};

use common::{sha256_hex, Qemu, TempDir};

// What the issue asks of the type, checked at compile time.
const _: () = {
    const fn owned<T: Send + Sync + Clone + 'static + ReadAt + Size + Read + Seek>() {}
    owned::<OwnedReader<File>>();
    owned::<OwnedReader<Vec<u8>>>();
};

/// The trait object a caller keeps: any `Read + Seek` that can change threads.
trait Disk: Read + Seek + Send {}
impl<T: Read + Seek + Send> Disk for T {}

/// Opens an image by path (its backing chain too) and returns its active disk: impossible
/// with a borrowed `Reader` (E0515).
fn open_disk(path: &Path) -> qcow2::Result<Box<dyn Disk>> {
    Ok(Box::new(Qcow2::open_path(path)?.into_reader()?))
}

fn open_snapshot(path: &Path, snapshot: &str) -> qcow2::Result<Box<dyn Disk>> {
    Ok(Box::new(
        Qcow2::open_path(path)?.into_snapshot_reader(snapshot)?,
    ))
}

/// The disk read whole on another thread, in odd-sized pieces through `Read`.
fn read_on_thread(mut disk: Box<dyn Disk>) -> Vec<u8> {
    std::thread::spawn(move || {
        let end = disk.seek(SeekFrom::End(0)).unwrap();
        disk.seek(SeekFrom::Start(0)).unwrap();
        let mut all = Vec::with_capacity(end as usize);
        let mut piece = vec![0u8; 300_000];
        loop {
            let got = disk.read(&mut piece).unwrap();
            if got == 0 {
                break;
            }
            all.extend_from_slice(&piece[..got]);
        }
        assert_eq!(all.len() as u64, end);
        all
    })
    .join()
    .unwrap()
}

/// The raw SHA-256 of `name` (`IMAGE` or `IMAGE@SNAPSHOT`) in the manifest.
fn manifest_sha(name: &str) -> String {
    let manifest = std::fs::read_to_string(common::fixtures_dir().join("manifest.tsv")).unwrap();
    manifest
        .lines()
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .find(|f| f[0] == name)
        .map(|f| f[2].to_owned())
        .unwrap_or_else(|| panic!("{name} not in the manifest"))
}

const IMAGES: [&str; 6] = [
    "v3-64k-basic.qcow2",
    "v3-512-l2cross.qcow2",
    "zlib-4k-mixed.qcow2",
    "zstd-64k-convert.qcow2",
    "chain-top.qcow2",
    "extdata.qcow2",
];

#[test]
fn boxed_disks_read_on_other_threads_as_the_manifest_says() {
    for name in IMAGES {
        let all = read_on_thread(open_disk(&common::fixtures_dir().join(name)).unwrap());
        assert_eq!(sha256_hex(&all), manifest_sha(name), "{name}");
    }
    for snap in ["s1", "s2"] {
        let path = common::fixtures_dir().join("snap.qcow2");
        let all = read_on_thread(open_snapshot(&path, snap).unwrap());
        assert_eq!(
            sha256_hex(&all),
            manifest_sha(&format!("snap.qcow2@{snap}"))
        );
    }
}

#[test]
fn boxed_disks_read_as_qemu_img_converts() {
    let Some(qemu) = Qemu::find_or_skip("boxed_disks_read_as_qemu_img_converts") else {
        return;
    };
    let dir = TempDir::new("owned-reader");
    let fixtures = common::fixtures_dir();
    // extdata.qcow2 left out: qemu-img looks for its data file in its working directory
    // (the manifest test above reads it).
    for name in IMAGES.into_iter().filter(|n| *n != "extdata.qcow2") {
        let path = fixtures.join(name);
        let theirs = qemu.convert_to_raw(dir.path(), path.to_str().unwrap(), &[] as &[&str]);
        let ours = read_on_thread(open_disk(&path).unwrap());
        assert!(ours == theirs, "{name} differs from qemu-img convert");
    }
    // A snapshot smaller than the active disk: qemu-img pads its output with zeros.
    for (image, snap) in [
        ("snap.qcow2", "s1"),
        ("snap.qcow2", "s2"),
        ("snap-resized.qcow2", "s1"),
    ] {
        let path = fixtures.join(image);
        let option = format!("snapshot.name={snap}");
        let theirs = qemu.convert_to_raw(dir.path(), path.to_str().unwrap(), &["-l", &option]);
        let ours = read_on_thread(open_snapshot(&path, snap).unwrap());
        assert!(ours.len() <= theirs.len(), "{image}@{snap}");
        assert!(ours[..] == theirs[..ours.len()], "{image}@{snap} differs");
        assert!(
            theirs[ours.len()..].iter().all(|&b| b == 0),
            "{image}@{snap}"
        );
    }
}

#[test]
fn an_owned_reader_reads_what_a_borrowed_one_does() {
    let path = common::fixtures_dir().join("zlib-4k-mixed.qcow2");
    let image = Arc::new(Qcow2::open_path(&path).unwrap());
    let borrowed = image.reader().unwrap();
    let owned = OwnedReader::new(Arc::clone(&image)).unwrap();
    assert_eq!(owned.guest_size(), borrowed.guest_size());
    assert_eq!(owned.size().unwrap(), Some(borrowed.guest_size()));
    let mut rng = common::Rng::new(21);
    let size = owned.guest_size();
    for _ in 0..500 {
        let pos = rng.below(size + 8192);
        let len = rng.below(70_000) as usize;
        let (mut a, mut b) = (vec![1u8; len], vec![2u8; len]);
        let got_a = borrowed.read_at(pos, &mut a).unwrap();
        let got_b = owned.read_at(pos, &mut b).unwrap();
        assert_eq!(got_a, got_b, "at {pos:#x}+{len}");
        assert!(a[..got_a] == b[..got_b], "at {pos:#x}+{len}");
    }
    // The rest of the reader's API, through `as_reader`.
    let owned_map: Vec<_> = owned
        .as_reader()
        .map(..)
        .collect::<qcow2::Result<_>>()
        .unwrap();
    let map: Vec<_> = borrowed.map(..).collect::<qcow2::Result<_>>().unwrap();
    assert_eq!(owned_map, map);
    let same = compare(&owned, &borrowed, &CompareOptions::new()).unwrap();
    assert_eq!(same, Comparison::Identical);
    assert!(Arc::ptr_eq(owned.image(), &image));
}

#[test]
fn clones_share_the_image_and_read_on_many_threads() {
    let path = common::fixtures_dir().join("chain-top.qcow2");
    let disk = Qcow2::open_path(&path).unwrap().into_reader().unwrap();
    let mut whole = vec![0u8; disk.guest_size() as usize];
    disk.read_exact_at(0, &mut whole).unwrap();
    let whole = Arc::new(whole);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (disk, whole) = (disk.clone(), Arc::clone(&whole));
            std::thread::spawn(move || {
                let mut rng = common::Rng::new(t);
                let mut buf = vec![0u8; 65536];
                for _ in 0..200 {
                    let pos = rng.below(disk.guest_size() - 65536);
                    disk.read_exact_at(pos, &mut buf).unwrap();
                    assert!(buf[..] == whole[pos as usize..][..65536], "thread {t}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(Arc::strong_count(disk.image()), 1, "the clones are gone");
}

#[test]
fn seek_and_read_follow_std_rules() {
    let path = common::fixtures_dir().join("v3-odd-size.qcow2");
    let mut disk = Qcow2::open_path(&path).unwrap().into_reader().unwrap();
    let size = disk.guest_size();
    assert_eq!(disk.seek(SeekFrom::End(-10)).unwrap(), size - 10);
    let mut buf = [0u8; 64];
    assert_eq!(disk.read(&mut buf).unwrap(), 10);
    assert_eq!(disk.position(), size);
    assert_eq!(disk.read(&mut buf).unwrap(), 0, "at the end");
    // Past the end: allowed, reads nothing.
    assert_eq!(disk.seek(SeekFrom::Current(100)).unwrap(), size + 100);
    assert_eq!(disk.read(&mut buf).unwrap(), 0);
    // Before the start: an error, and the position stays.
    let err = disk
        .seek(SeekFrom::Current(-(size as i64) - 101))
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert_eq!(disk.stream_position().unwrap(), size + 100);
    assert!(disk.seek(SeekFrom::End(-(size as i64) - 1)).is_err());
    assert!(disk.seek(SeekFrom::Start(u64::MAX)).is_ok());
    assert!(disk.seek(SeekFrom::Current(1)).is_err(), "past u64::MAX");
    // read_at neither uses nor moves the position; a clone starts where its original is.
    disk.seek(SeekFrom::Start(4096)).unwrap();
    let mut at = [0u8; 64];
    disk.read_exact_at(0, &mut at).unwrap();
    assert_eq!(disk.position(), 4096);
    let mut clone = disk.clone();
    let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
    disk.read_exact(&mut a).unwrap();
    clone.read_exact(&mut b).unwrap();
    assert_eq!(a, b);
    assert_eq!(clone.position(), 4096 + 64);
}

#[test]
fn errors_come_from_the_borrowed_constructors() {
    let path = common::fixtures_dir().join("snap.qcow2");
    let image = Qcow2::open_path(&path).unwrap();
    assert!(matches!(
        image.into_snapshot_reader("no such snapshot"),
        Err(qcow2::Error::NoSuchSnapshot(_))
    ));
    // An image that needs a data file not attached.
    let path = common::fixtures_dir().join("extdata.qcow2");
    let image = Qcow2::open(File::open(path).unwrap()).unwrap();
    assert!(matches!(
        image.into_reader(),
        Err(qcow2::Error::DataFileMissing { .. })
    ));
}

/// Random 4 KiB reads and sequential 1 MiB reads through an `OwnedReader` and a borrowed
/// `Reader` of the same image (made with qemu-img), finely interleaved: each round times
/// batches of the same reads on both in turn, first one then the other, so that load from
/// other processes falls on both alike. Prints the medians over rounds and the median of
/// the per-round ratios. Run in release (see the top of this file); `OWNED_BENCH_MIB` and
/// `OWNED_BENCH_ROUNDS` change the image size (256) and the rounds (15).
#[test]
#[ignore = "speed measurement: run in release with --ignored --nocapture"]
fn owned_reads_as_fast_as_borrowed() {
    let Some(qemu) = Qemu::find_or_skip("owned_reads_as_fast_as_borrowed") else {
        return;
    };
    const MIB: u64 = 1 << 20;
    let env = |name: &str, default: u64| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let (size_mib, rounds) = (env("OWNED_BENCH_MIB", 256), env("OWNED_BENCH_ROUNDS", 15));
    let dir = TempDir::new("owned-bench");
    let mut data = vec![0u8; (size_mib * MIB) as usize];
    common::Rng::new(7).fill(&mut data);
    std::fs::write(dir.join("data.raw"), &data).unwrap();
    drop(data);
    let args = [
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "data.raw",
        "data.qcow2",
    ];
    qemu.img(dir.path(), &args);
    let shared = Arc::new(Qcow2::open_path(dir.join("data.qcow2")).unwrap());
    let borrowed = shared.reader().unwrap();
    let owned = OwnedReader::new(Arc::clone(&shared)).unwrap();
    let disks: [&dyn ReadAt; 2] = [&borrowed, &owned];
    let size = owned.guest_size();
    let mut big = vec![0u8; MIB as usize];
    for pos in (0..size).step_by(MIB as usize) {
        borrowed.read_exact_at(pos, &mut big).unwrap(); // page cache and L2 cache warm
    }

    // Each round: batches of reads (offset, length), each batch timed on both readers.
    let mut time_round = |batches: &[Vec<(u64, usize)>], round: u64| -> [f64; 2] {
        let mut total = [0f64; 2];
        for (b, batch) in batches.iter().enumerate() {
            let mut sums = [0u64; 2];
            for k in 0..2 {
                let i = (k + b + round as usize) % 2; // which goes first alternates
                let start = Instant::now();
                for &(pos, len) in batch {
                    disks[i].read_exact_at(pos, &mut big[..len]).unwrap();
                    sums[i] = sums[i].wrapping_add(u64::from(big[len - 1]));
                }
                total[i] += start.elapsed().as_secs_f64();
            }
            assert_eq!(sums[0], sums[1], "same bytes");
        }
        total
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut rng = common::Rng::new(1);
    let random: Vec<Vec<(u64, usize)>> = (0..100)
        .map(|_| {
            (0..2000)
                .map(|_| (rng.below(size / 4096) * 4096, 4096))
                .collect()
        })
        .collect();
    let sequential: Vec<Vec<(u64, usize)>> = (0..size)
        .step_by(16 * MIB as usize)
        .map(|from| {
            let end = (from + 16 * MIB).min(size);
            (from..end)
                .step_by(MIB as usize)
                .map(|p| (p, MIB as usize))
                .collect()
        })
        .collect();
    let reads = (random.len() * random[0].len()) as f64;
    for (label, batches, unit) in [
        ("random 4 KiB", &random, "ns/read"),
        ("sequential 1 MiB", &sequential, "MiB/s"),
    ] {
        let per_round: Vec<[f64; 2]> = (0..rounds)
            .map(|round| {
                let secs = time_round(batches, round);
                match unit {
                    "ns/read" => secs.map(|s| s * 1e9 / reads),
                    _ => secs.map(|s| size as f64 / MIB as f64 / s),
                }
            })
            .collect();
        let of = |i: usize| per_round.iter().map(|r| r[i]).collect::<Vec<_>>();
        let (b, o) = (median(of(0)), median(of(1)));
        let ratio = median(per_round.iter().map(|r| r[1] / r[0]).collect());
        println!(
            "{label}: borrowed {b:.1} {unit}, owned {o:.1} {unit} (medians of {rounds} rounds, \
             {size_mib} MiB image); owned/borrowed {ratio:.3} (median of per-round ratios)"
        );
    }
}
