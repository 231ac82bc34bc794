//! Convert and compare cost what the allocation map costs: long zero stretches, empty L2
//! tables named by every L1 entry and holes in a raw backing file are walked once, never read
//! and never walked again from each step's start. Each case runs on a thread with a deadline
//! (the debug build does each in well under a second; before the fixes they took minutes), so
//! a regression fails instead of hanging the suite.

use crate::common;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{Qemu, TempDir};
use qcow2::{compare, CompareOptions, Comparison, ConvertOptions, PositionalSink, Qcow2, RawDisk};

/// How long one operation may take (debug build, on a loaded machine: the fixed code takes
/// about a tenth of this; the quadratic walks took minutes).
const DEADLINE: Duration = Duration::from_secs(5);

/// Run `job` on its own thread; fail when it has not finished by the deadline.
fn bounded<T: Send + 'static>(what: &str, job: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(job());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(value) => {
            eprintln!("{what}: {:?}", started.elapsed());
            value
        }
        Err(_) => panic!("{what} did not finish within {DEADLINE:?}"),
    }
}

/// A positional sink that keeps only the non-zero bytes written (offset, byte).
#[derive(Default)]
struct Sink {
    written: Mutex<Vec<(u64, u8)>>,
    bytes: Mutex<u64>,
}

impl PositionalSink for Sink {
    fn write_all_at(&self, pos: u64, buf: &[u8]) -> std::io::Result<()> {
        *self.bytes.lock().unwrap() += buf.len() as u64;
        let mut w = self.written.lock().unwrap();
        for (i, &b) in buf.iter().enumerate() {
            if b != 0 {
                w.push((pos + i as u64, b));
            }
        }
        Ok(())
    }
    fn set_len(&self, _: u64) -> std::io::Result<()> {
        Ok(())
    }
}

/// Convert the image at `path` to a [`Sink`] within the deadline.
fn convert_bounded(what: &str, path: &Path) -> Sink {
    let path = path.to_owned();
    bounded(what, move || {
        let image = Qcow2::open_path(&path).unwrap();
        let reader = image.reader().unwrap();
        let sink = Sink::default();
        qcow2::convert_to_file(&reader, &sink, &ConvertOptions::new().threads(2), |_, _| {})
            .unwrap();
        sink
    })
}

/// Compare the image at `path` with itself, strictly and plainly (each with fresh readers,
/// which remember nothing of another walk), within the deadline.
fn compare_with_itself_bounded(what: &str, path: &Path) {
    for strict in [true, false] {
        let path = path.to_owned();
        let what = format!("{what} (strict: {strict})");
        bounded(&what, move || {
            let image = Qcow2::open_path(&path).unwrap();
            let (a, b) = (image.reader().unwrap(), image.reader().unwrap());
            let options = CompareOptions::new().strict(strict);
            assert_eq!(compare(&a, &b, &options).unwrap(), Comparison::Identical);
        });
    }
}

/// Issue 19, point 2: an image zeroed with `write -z` over a terabyte. The convert planner
/// stepped over it 1 GiB at a time, looking the zero run up again from each step's start
/// (108 s in a debug build; `qemu-img convert` takes 0.02 s).
#[test]
fn a_zeroed_terabyte_converts_in_one_walk() {
    let Some(qemu) = Qemu::find_or_skip("a_zeroed_terabyte_converts_in_one_walk") else {
        return;
    };
    let dir = TempDir::new("zeroed-tib");
    // 2 MiB clusters keep the image small on disk (4 MiB of L2 tables).
    qemu.img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "z.qcow2",
            "1T",
        ],
    );
    qemu.io(dir.path(), "qcow2", "z.qcow2", &["write -z -n 0 1T"]);
    let path = dir.join("z.qcow2");
    let sink = convert_bounded("convert of a zeroed 1 TiB", &path);
    assert_eq!(*sink.bytes.lock().unwrap(), 0, "zeros are never written");
    compare_with_itself_bounded("compare of a zeroed 1 TiB", &path);
}

/// Issue 19, point 2: a 10 MiB file whose 1 PiB guest (2 MiB clusters) has every L1 entry
/// naming one all-zero L2 table. Walking each of its 2048 tables entry by entry cost 47 s
/// in a debug build even for the map; the planner now remembers a table found empty.
#[test]
fn a_pebibyte_of_one_empty_l2_table_converts_in_one_walk() {
    let Some(qemu) = Qemu::find_or_skip("a_pebibyte_of_one_empty_l2_table_converts_in_one_walk")
    else {
        return;
    };
    let dir = TempDir::new("one-empty-table");
    qemu.img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M",
            "p.qcow2",
            "1P",
        ],
    );
    let path = dir.join("p.qcow2");
    point_every_l1_entry_at_one_empty_table(&path);
    let sink = convert_bounded("convert of 1 PiB over one empty L2 table", &path);
    assert_eq!(*sink.bytes.lock().unwrap(), 0, "zeros are never written");
    compare_with_itself_bounded("compare of 1 PiB over one empty L2 table", &path);
    let map_path = path.clone();
    let extents = bounded("map of 1 PiB over one empty L2 table", move || {
        let image = Qcow2::open_path(&map_path).unwrap();
        let reader = image.reader().unwrap();
        reader
            .map(..)
            .map(|e| e.unwrap().length)
            .collect::<Vec<_>>()
    });
    assert_eq!(extents, vec![1u64 << 50]);
}

/// Append one cluster (a hole, so all zeros) to the image and point every L1 entry at it.
fn point_every_l1_entry_at_one_empty_table(path: &Path) {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut header = [0u8; 48];
    std::io::Read::read_exact(&mut file, &mut header).unwrap();
    let cluster_bits = u32::from_be_bytes(header[20..24].try_into().unwrap());
    let l1_size = u32::from_be_bytes(header[36..40].try_into().unwrap());
    let l1_offset = u64::from_be_bytes(header[40..48].try_into().unwrap());
    let cluster = 1u64 << cluster_bits;
    let table = file.metadata().unwrap().len().next_multiple_of(cluster);
    file.set_len(table + cluster).unwrap();
    let entry = (table | 1 << 63).to_be_bytes();
    let l1: Vec<u8> = (0..l1_size).flat_map(|_| entry).collect();
    file.seek(SeekFrom::Start(l1_offset)).unwrap();
    file.write_all(&l1).unwrap();
    assert!(
        l1_size >= 2048,
        "a 1 PiB guest with 2 MiB clusters has 2048 L1 entries"
    );
}

/// Issue 19, point 3: an overlay over a 64 GiB sparse raw base holding 5 bytes. Convert
/// and compare read every byte of the base (69 s and 33 s; qemu-img 0.02 s): the raw
/// layer's allocation ignored the holes the map sees.
#[test]
fn a_sparse_raw_base_is_read_for_its_data_only() {
    let Some(qemu) = Qemu::find_or_skip("a_sparse_raw_base_is_read_for_its_data_only") else {
        return;
    };
    let dir = TempDir::new("sparse-raw-base");
    const SIZE: u64 = 64 << 30;
    const AT: u64 = 40 << 30;
    let base = dir.join("base.raw");
    {
        let mut f = std::fs::File::create(&base).unwrap();
        f.set_len(SIZE).unwrap();
        f.seek(SeekFrom::Start(AT)).unwrap();
        f.write_all(b"hello").unwrap();
    }
    let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&base).unwrap());
    assert!(
        blocks * 512 < 1 << 20,
        "this test needs a file system with sparse files ({} bytes allocated)",
        blocks * 512
    );
    qemu.img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
        ],
    );
    let top = dir.join("top.qcow2");
    let sink = convert_bounded("convert over a sparse 64 GiB raw base", &top);
    let written = sink.written.lock().unwrap().clone();
    let expected: Vec<(u64, u8)> = (AT..).zip(*b"hello").collect();
    assert_eq!(written, expected);
    assert!(
        *sink.bytes.lock().unwrap() <= 2 << 20,
        "only the data is read"
    );

    let outcome = bounded("compare with a sparse 64 GiB raw base", move || {
        let image = Qcow2::open_path(&top).unwrap();
        let reader = image.reader().unwrap();
        let raw = RawDisk::open_path(&base).unwrap();
        let plain = compare(&reader, &raw, &CompareOptions::new()).unwrap();
        let strict = compare(&reader, &raw, &CompareOptions::new().strict(true)).unwrap();
        (plain, strict)
    });
    assert_eq!(outcome.0, Comparison::Identical);
    // qemu-img compare -s: the overlay's stretch of the base's trailing hole is not the end
    // of the overlay's disk (QEMU drops a backing layer's end-of-file flag), the base's own is.
    let qemu_says = std::process::Command::new(&qemu.img)
        .current_dir(dir.path())
        .args(["compare", "-s", "top.qcow2", "base.raw"])
        .output()
        .unwrap();
    let hole = AT + 4096; // the file system's block holding the data
    assert_eq!(qemu_says.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&qemu_says.stdout),
        format!("Strict mode: Offset {hole} block status mismatch!\n")
    );
    assert_eq!(outcome.1, Comparison::AllocationMismatch { offset: hole });
}

/// The data clusters of a `preallocation=metadata` image are holes in its file: QEMU (and
/// the map) see them as zeros, and so do convert and compare now, instead of reading them
/// (a 1 GiB compare took 12 s in a debug build).
#[test]
fn holes_under_preallocated_clusters_are_not_read() {
    let Some(qemu) = Qemu::find_or_skip("holes_under_preallocated_clusters_are_not_read") else {
        return;
    };
    let dir = TempDir::new("prealloc-holes");
    qemu.img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "m.qcow2",
            "1G",
        ],
    );
    qemu.img(dir.path(), &["create", "-q", "-f", "raw", "z.raw", "1G"]);
    let path = dir.join("m.qcow2");
    let sink = convert_bounded("convert of 1 GiB preallocated with metadata", &path);
    assert_eq!(*sink.bytes.lock().unwrap(), 0, "zeros are never written");
    let raw = dir.join("z.raw");
    let same = bounded("compare of 1 GiB preallocated with metadata", move || {
        let image = Qcow2::open_path(&path).unwrap();
        let reader = image.reader().unwrap();
        let raw = RawDisk::open_path(&raw).unwrap();
        compare(&reader, &raw, &CompareOptions::new()).unwrap()
    });
    assert_eq!(same, Comparison::Identical);
}
