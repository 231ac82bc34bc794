//! `Reader::read_parallel` against QEMU: on images made by `qemu-img`/`qemu-io` (fully
//! allocated, sparse, zlib-compressed, a backing chain over a sparse raw file, 2 MiB clusters,
//! subclusters, a snapshot), the chunks the sink gets must be in guest order without gaps,
//! their bytes those of `qemu-img convert -O raw`, and the stretches reported as zeros exactly
//! those `qemu-img map` reports as reading zeros; on whole images and on ranges that do not
//! fall on cluster boundaries, with 1 and 4 threads. Then errors: a failing sink, a failing
//! source, a missing backing file and a panicking sink each stop the read cleanly.

use crate::common;

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::{Qemu, Rng, TempDir};
use positioned_io::ReadAt;
use qcow2::{Chunk, Error, OpenOptions, ParallelReadOptions, Qcow2, Reader};

const MIB: u64 = 1 << 20;

/// An image made by QEMU: name, and how (commands run in the test's directory).
struct Case {
    name: &'static str,
    /// Snapshot to read (`-l` for qemu-img convert), or the active disk.
    snapshot: Option<&'static str>,
    make: fn(&Qemu, &Path),
}

fn img(qemu: &Qemu, dir: &Path, args: &[&str]) {
    qemu.img(dir, args);
}

fn io(qemu: &Qemu, dir: &Path, image: &str, cmds: &[&str]) {
    qemu.io(dir, "qcow2", image, cmds);
}

/// A raw file of `len` PRNG bytes (incompressible), or text when `text`.
fn raw_file(dir: &Path, name: &str, len: usize, seed: u64, text: bool) {
    let mut data = vec![0u8; len];
    let mut rng = Rng::new(seed);
    if text {
        rng.fill_text(&mut data);
    } else {
        rng.fill(&mut data);
    }
    // Some zero stretches inside, which qemu-img convert leaves unallocated.
    for at in [len / 5, len / 2] {
        data[at..at + 256 * 1024].fill(0);
    }
    std::fs::write(dir.join(name), data).unwrap();
}

const CASES: &[Case] = &[
    Case {
        name: "full-64k.qcow2",
        snapshot: None,
        make: |q, d| {
            raw_file(d, "full.raw", 12 << 20, 1, false);
            img(
                q,
                d,
                &["convert", "-O", "qcow2", "full.raw", "full-64k.qcow2"],
            );
        },
    },
    Case {
        name: "sparse.qcow2",
        snapshot: None,
        make: |q, d| {
            img(
                q,
                d,
                &["create", "-q", "-f", "qcow2", "sparse.qcow2", "80M"],
            );
            io(
                q,
                d,
                "sparse.qcow2",
                &[
                    "write -P 0x11 0 64k",
                    "write -P 0x22 1000k 3000k",
                    "write -z 1500k 200k",
                    "write -P 0x33 33M 4k",
                    "write -z 40M 8M",
                    "write -P 0x44 79M 1M",
                ],
            );
        },
    },
    Case {
        name: "zlib.qcow2",
        snapshot: None,
        make: |q, d| {
            raw_file(d, "text.raw", 6 << 20, 2, true);
            q.compress(d, "text.raw", "zlib.qcow2", "cluster_size=4k");
            // Mixed: some plain clusters over the compressed ones.
            io(
                q,
                d,
                "zlib.qcow2",
                &["write -P 0x55 100k 20k", "write -z 3M 64k"],
            );
        },
    },
    Case {
        name: "chain-top.qcow2",
        snapshot: None,
        make: |q, d| {
            // A sparse raw base: its holes read as zeros through the chain.
            let base = File::create(d.join("base.raw")).unwrap();
            base.set_len(16 << 20).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&base, &[0x66; 3 << 20], 5 << 20).unwrap();
            drop(base);
            let mid = [
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.raw",
                "-F",
                "raw",
                "mid.qcow2",
            ];
            img(q, d, &mid);
            io(
                q,
                d,
                "mid.qcow2",
                &[
                    "write -P 0x77 0 1M",
                    "write -z 6M 512k",
                    "write -P 0x78 12M 100k",
                ],
            );
            let top = [
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "mid.qcow2",
                "-F",
                "qcow2",
                "chain-top.qcow2",
            ];
            img(q, d, &top);
            io(
                q,
                d,
                "chain-top.qcow2",
                &[
                    "write -P 0x99 512k 1M",
                    "write -z 12M 64k",
                    "write -P 0x9a 15M 1M",
                ],
            );
        },
    },
    Case {
        name: "big-clusters.qcow2",
        snapshot: None,
        make: |q, d| {
            let opts = "cluster_size=2M";
            img(
                q,
                d,
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    opts,
                    "big-clusters.qcow2",
                    "20M",
                ],
            );
            io(
                q,
                d,
                "big-clusters.qcow2",
                &["write -P 1 1M 3M", "write -z 8M 2M", "write -P 2 13M 100k"],
            );
        },
    },
    Case {
        name: "subclusters.qcow2",
        snapshot: None,
        make: |q, d| {
            raw_file(d, "sub.raw", 4 << 20, 3, false);
            let opts = "extended_l2=on,cluster_size=64k";
            let create = [
                "create", "-q", "-f", "qcow2", "-o", opts, "-b", "sub.raw", "-F", "raw",
            ];
            img(q, d, &[&create[..], &["subclusters.qcow2", "8M"]].concat());
            io(
                q,
                d,
                "subclusters.qcow2",
                &[
                    "write -P 3 6k 2k",
                    "write -z 70k 4k",
                    "write -P 4 130k 9k",
                    "write -z 5M 3k",
                ],
            );
        },
    },
    Case {
        name: "snap.qcow2",
        snapshot: Some("one"),
        make: |q, d| {
            img(q, d, &["create", "-q", "-f", "qcow2", "snap.qcow2", "8M"]);
            io(q, d, "snap.qcow2", &["write -P 5 0 2M", "write -P 6 5M 1M"]);
            img(q, d, &["snapshot", "-c", "one", "snap.qcow2"]);
            io(
                q,
                d,
                "snap.qcow2",
                &["write -P 7 1M 2M", "write -z 5M 512k"],
            );
        },
    },
];

/// What a sink saw: data with its offset, and zero stretches.
#[derive(Default)]
struct Seen {
    data: Vec<(u64, Vec<u8>)>,
    zeros: Vec<(u64, u64)>,
    /// Every chunk as (offset, end), in the order the sink got them.
    order: Vec<(u64, u64)>,
}

fn collect<I: ReadAt + Sync>(
    reader: &Reader<'_, I>,
    start: u64,
    end: u64,
    options: &ParallelReadOptions,
) -> Seen {
    let mut seen = Seen::default();
    reader
        .read_parallel(start..end, options, |chunk| {
            seen.order.push((chunk.offset(), chunk.end()));
            match chunk {
                Chunk::Data { offset, bytes } => seen.data.push((offset, bytes.to_vec())),
                Chunk::Zeros { offset, len } => seen.zeros.push((offset, len)),
                _ => panic!("a chunk of an unknown kind"),
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("read_parallel {start:#x}..{end:#x}: {e}"));
    seen
}

/// `[start, end)` stretches, neighbours merged.
fn merged(mut stretches: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    stretches.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in stretches {
        match out.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => out.push((s, e)),
        }
    }
    out
}

/// The stretches `qemu-img map` says read as zeros, clipped to `[start, end)`.
fn qemu_zeros(map: &[serde_json::Value], start: u64, end: u64) -> Vec<(u64, u64)> {
    let zeros = map
        .iter()
        .filter(|e| e["zero"] == true)
        .map(|e| {
            let s = e["start"].as_u64().unwrap();
            (s.max(start), (s + e["length"].as_u64().unwrap()).min(end))
        })
        .filter(|(s, e)| s < e)
        .collect();
    merged(zeros)
}

fn check(label: &str, seen: &Seen, start: u64, end: u64, reference: &[u8], zeros: &[(u64, u64)]) {
    // In guest order, contiguous, covering the range exactly.
    let mut at = start;
    for &(s, e) in &seen.order {
        assert_eq!(
            s, at,
            "{label}: chunk at {s:#x} after one ending at {at:#x}"
        );
        assert!(e > s, "{label}: empty chunk at {s:#x}");
        at = e;
    }
    assert_eq!(at, end.max(start), "{label}: the chunks end at {at:#x}");
    for (offset, bytes) in &seen.data {
        let want = &reference[*offset as usize..*offset as usize + bytes.len()];
        if let Some(d) = common::describe_difference(label, *offset, bytes, want) {
            panic!("{d}");
        }
    }
    let ours = merged(seen.zeros.iter().map(|&(s, l)| (s, s + l)).collect());
    assert_eq!(
        ours, zeros,
        "{label}: zero stretches differ from qemu-img map's"
    );
    for &(s, e) in &ours {
        assert!(
            common::is_all_zero(&reference[s as usize..e as usize]),
            "{label}: {s:#x}"
        );
    }
}

#[test]
fn chunks_match_qemu_img_convert_and_map() {
    let Some(qemu) = Qemu::find_or_skip("chunks_match_qemu_img_convert_and_map") else {
        return;
    };
    let dir = TempDir::new("parallel");
    let d = dir.path();
    let mut checked = 0;
    for case in CASES {
        (case.make)(&qemu, d);
        let name = case.name;
        let snapshot_opt = case.snapshot.map(|s| format!("snapshot.name={s}"));
        let reference = match &snapshot_opt {
            Some(opt) => qemu.convert_to_raw(d, name, &["-l", opt.as_str()]),
            None => qemu.convert_to_raw(d, name, &[] as &[&str]),
        };
        let map: Vec<serde_json::Value> = match case.snapshot {
            // qemu-img map has no snapshot option: only the bytes are checked there.
            Some(_) => Vec::new(),
            None => {
                serde_json::from_slice(&qemu.img(d, &["map", "--output=json", "-f", "qcow2", name]))
                    .unwrap()
            }
        };
        let image = Qcow2::open_path_with(d.join(name), &OpenOptions::new().threads(4)).unwrap();
        let reader = match case.snapshot {
            Some(s) => image.snapshot_reader(s).unwrap(),
            None => image.reader().unwrap(),
        };
        let size = reader.guest_size();
        assert_eq!(size, reference.len() as u64, "{name}");
        let ranges = [
            (0, size),
            (12345, size - 777),
            (MIB + 511, 3 * MIB + 3),
            (size - 1, size),
        ];
        for threads in [1, 4] {
            for chunk in [None, Some(64 << 10)] {
                let mut options = ParallelReadOptions::new().threads(threads);
                if let Some(bytes) = chunk {
                    options = options.chunk_size(bytes);
                }
                for &(start, end) in &ranges {
                    let label =
                        format!("{name} {start:#x}..{end:#x} threads {threads} chunk {chunk:?}");
                    let seen = collect(&reader, start, end, &options);
                    let zeros = match case.snapshot {
                        Some(_) => merged(seen.zeros.iter().map(|&(s, l)| (s, s + l)).collect()),
                        None => qemu_zeros(&map, start, end),
                    };
                    check(&label, &seen, start, end, &reference, &zeros);
                    checked += 1;
                }
            }
        }
        // The sparse images do have holes, reported as such.
        if name == "sparse.qcow2" || name == "chain-top.qcow2" {
            let seen = collect(&reader, 0, size, &ParallelReadOptions::new());
            assert!(
                seen.zeros.iter().map(|z| z.1).sum::<u64>() > 8 * MIB,
                "{name}"
            );
        }
    }
    assert_eq!(checked, CASES.len() * 16);
}

#[test]
fn writer_and_file_sinks_hold_what_qemu_img_converts() {
    let Some(qemu) = Qemu::find_or_skip("writer_and_file_sinks_hold_what_qemu_img_converts") else {
        return;
    };
    let dir = TempDir::new("parallel-sinks");
    let d = dir.path();
    for case in CASES.iter().filter(|c| c.snapshot.is_none()) {
        (case.make)(&qemu, d);
        let reference = qemu.convert_to_raw(d, case.name, &[] as &[&str]);
        let image = Qcow2::open_path(d.join(case.name)).unwrap();
        let reader = image.reader().unwrap();
        let options = ParallelReadOptions::new().threads(2);
        let mut stream = Vec::new();
        reader
            .read_parallel_to_writer(.., &options, &mut stream)
            .unwrap();
        assert!(stream == reference, "{}: the stream differs", case.name);

        let out = d.join(format!("{}.out", case.name));
        let file = File::create(&out).unwrap();
        reader.read_parallel_to_file(.., &options, &file).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == reference,
            "{}: the file differs",
            case.name
        );
        // A range lands at the start of the file.
        let file = File::create(&out).unwrap();
        reader
            .read_parallel_to_file(1000..MIB + 5, &options, &file)
            .unwrap();
        let got = std::fs::read(&out).unwrap();
        assert!(
            got == reference[1000..(MIB + 5) as usize],
            "{}: range",
            case.name
        );
    }
}

/// A `ReadAt` over bytes that fails reads overlapping `[fail.0, fail.1)`, and records the
/// threads that read.
struct Source {
    bytes: Vec<u8>,
    fail: (u64, u64),
    threads: Arc<Mutex<HashSet<std::thread::ThreadId>>>,
    /// How long every read takes at least: long enough that a busy machine schedules the pool
    /// threads before the caller has read every chunk itself.
    delay: std::time::Duration,
    /// Reads overlapping `[slow.0, slow.1)` take `slow.2` longer.
    slow: (u64, u64, std::time::Duration),
}

impl ReadAt for Source {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.threads
            .lock()
            .unwrap()
            .insert(std::thread::current().id());
        std::thread::sleep(self.delay);
        if pos < self.slow.1 && pos + buf.len() as u64 > self.slow.0 {
            std::thread::sleep(self.slow.2);
        }
        if pos < self.fail.1 && pos + buf.len() as u64 > self.fail.0 {
            return Err(io::Error::other("injected failure"));
        }
        self.bytes.as_slice().read_at(pos, buf)
    }
}

/// Where guest offset `at` of `name` is in its file, by `qemu-img map`.
fn host_offset(qemu: &Qemu, d: &Path, name: &str, at: u64) -> u64 {
    let map: Vec<serde_json::Value> =
        serde_json::from_slice(&qemu.img(d, &["map", "--output=json", "-f", "qcow2", name]))
            .unwrap();
    map.iter()
        .find(|e| {
            let s = e["start"].as_u64().unwrap();
            s <= at && at < s + e["length"].as_u64().unwrap() && e["data"] == true
        })
        .map(|e| e["offset"].as_u64().unwrap() + at - e["start"].as_u64().unwrap())
        .unwrap_or_else(|| panic!("guest {at:#x} is data"))
}

/// A 12 MiB fully allocated 64 KiB-cluster image, and where guest 7 MiB is in the file.
fn full_image(qemu: &Qemu, d: &Path) -> (Vec<u8>, Vec<u8>, u64) {
    (CASES[0].make)(qemu, d);
    let host = host_offset(qemu, d, "full-64k.qcow2", 7 * MIB + 4096);
    let reference = qemu.convert_to_raw(d, "full-64k.qcow2", &[] as &[&str]);
    (
        std::fs::read(d.join("full-64k.qcow2")).unwrap(),
        reference,
        host,
    )
}

#[test]
fn a_failing_read_is_returned_after_everything_before_it() {
    let Some(qemu) = Qemu::find_or_skip("a_failing_read_is_returned_after_everything_before_it")
    else {
        return;
    };
    let dir = TempDir::new("parallel-fail");
    let (bytes, reference, host) = full_image(&qemu, dir.path());
    for threads in [1, 4] {
        let source = Source {
            bytes: bytes.clone(),
            fail: (host, host + 1),
            delay: std::time::Duration::ZERO,
            slow: (0, 0, std::time::Duration::ZERO),
            threads: Arc::default(),
        };
        let image = Qcow2::open_with(source, &OpenOptions::new().threads(4)).unwrap();
        let reader = image.reader().unwrap();
        let mut got = Vec::new();
        let options = ParallelReadOptions::new().threads(threads);
        let err = reader
            .read_parallel(.., &options, |chunk| {
                match chunk {
                    Chunk::Data { bytes, .. } => got.extend_from_slice(bytes),
                    Chunk::Zeros { len, .. } => got.resize(got.len() + len as usize, 0),
                    _ => unreachable!(),
                }
                Ok(())
            })
            .unwrap_err();
        // The 1 MiB chunk holding guest 7 MiB + 4 KiB failed: all before it was delivered.
        match &err {
            Error::ReadFailed {
                guest_offset,
                source,
            } => {
                assert_eq!(*guest_offset, 7 * MIB, "{err}");
                assert!(matches!(**source, Error::Io { .. }), "{err}");
            }
            other => panic!("expected ReadFailed, got {other}"),
        }
        assert_eq!(got.len() as u64, 7 * MIB, "threads {threads}");
        assert!(got == reference[..got.len()], "threads {threads}");
    }
}

/// A chunk fails while the one before it is still being read, with chunks queued after it
/// (never to be read): the calling thread, waiting for the slow chunk, must be woken when it
/// is done, though fewer chunks are ready than it is usually woken for. (It waited forever.)
#[test]
fn a_failure_behind_a_slow_chunk_ends_the_read() {
    let Some(qemu) = Qemu::find_or_skip("a_failure_behind_a_slow_chunk_ends_the_read") else {
        return;
    };
    let dir = TempDir::new("parallel-fail-slow");
    let (bytes, _, failing) = full_image(&qemu, dir.path());
    let slow = host_offset(&qemu, dir.path(), "full-64k.qcow2", 6 * MIB + 512 * 1024);
    for round in 0..10 {
        let source = Source {
            bytes: bytes.clone(),
            fail: (failing, failing + 1),
            delay: std::time::Duration::ZERO,
            slow: (slow, slow + 1, std::time::Duration::from_millis(200)),
            threads: Arc::default(),
        };
        let (done, outcome) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let image = Qcow2::open_with(source, &OpenOptions::new().threads(2)).unwrap();
            let reader = image.reader().unwrap();
            let options = ParallelReadOptions::new().threads(2).chunk_size(512 << 10);
            let result = reader.read_parallel(.., &options, |_| Ok(()));
            let _ = done.send(result.map_err(|e| e.to_string()));
        });
        let result = outcome
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("round {round}: the read did not end in 60 s"));
        let err = result.expect_err("the chunk at 7 MiB fails");
        assert!(
            err.contains(&format!("{:#x}", 7 * MIB)),
            "round {round}: {err}"
        );
    }
}

#[test]
fn a_sink_error_stops_the_read_and_is_returned() {
    let Some(qemu) = Qemu::find_or_skip("a_sink_error_stops_the_read_and_is_returned") else {
        return;
    };
    let dir = TempDir::new("parallel-sink-error");
    let (bytes, _, _) = full_image(&qemu, dir.path());
    let image = Qcow2::open_with(bytes, &OpenOptions::new().threads(4)).unwrap();
    let reader = image.reader().unwrap();
    for threads in [1, 4] {
        let mut calls = Vec::new();
        let options = ParallelReadOptions::new()
            .threads(threads)
            .chunk_size(256 << 10);
        let err = reader
            .read_parallel(.., &options, |chunk| {
                calls.push(chunk.offset());
                if calls.len() == 3 {
                    return Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"));
                }
                Ok(())
            })
            .unwrap_err();
        assert_eq!(calls.len(), 3, "no chunk after the error");
        match &err {
            Error::SinkFailed {
                guest_offset,
                source,
            } => {
                assert_eq!(*guest_offset, calls[2]);
                assert_eq!(source.kind(), io::ErrorKind::StorageFull);
            }
            other => panic!("expected SinkFailed, got {other}"),
        }
        assert_eq!(err.io_kind(), io::ErrorKind::StorageFull);
    }
    // The pool is still there for the next read.
    let mut total = 0;
    reader
        .read_parallel(.., &ParallelReadOptions::new(), |c| {
            total = c.end();
            Ok(())
        })
        .unwrap();
    assert_eq!(total, image.guest_size());
}

#[test]
fn a_panicking_sink_neither_hangs_nor_breaks_the_pool() {
    let Some(qemu) = Qemu::find_or_skip("a_panicking_sink_neither_hangs_nor_breaks_the_pool")
    else {
        return;
    };
    let dir = TempDir::new("parallel-panic");
    let (bytes, reference, _) = full_image(&qemu, dir.path());
    let image = Qcow2::open_with(bytes, &OpenOptions::new().threads(3)).unwrap();
    let reader = image.reader().unwrap();
    let mut calls = 0;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        reader.read_parallel(.., &ParallelReadOptions::new(), |_| {
            calls += 1;
            if calls == 2 {
                panic!("sink panics");
            }
            Ok(())
        })
    }));
    assert!(result.is_err(), "the panic reaches the caller");
    let mut out = Vec::new();
    reader
        .read_parallel_to_writer(.., &ParallelReadOptions::new(), &mut out)
        .unwrap();
    assert!(out == reference);
}

#[test]
fn a_missing_backing_file_stops_the_read_with_backing_missing() {
    let Some(qemu) =
        Qemu::find_or_skip("a_missing_backing_file_stops_the_read_with_backing_missing")
    else {
        return;
    };
    let dir = TempDir::new("parallel-backing");
    let d = dir.path();
    img(
        &qemu,
        d,
        &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
    );
    qemu.create_overlay(d, "base.qcow2", "top.qcow2");
    io(&qemu, d, "top.qcow2", &["write -P 1 0 1M"]);
    // Opened alone: the backing file is named but not attached.
    let image = Qcow2::open(File::open(d.join("top.qcow2")).unwrap()).unwrap();
    let mut delivered = 0;
    let err = image
        .reader()
        .unwrap()
        .read_parallel(.., &ParallelReadOptions::new().threads(2), |c| {
            delivered = c.end();
            Ok(())
        })
        .unwrap_err();
    match &err {
        Error::ReadFailed {
            guest_offset,
            source,
        } => {
            // Everything before the offset went to the sink. The map finds the missing file
            // at 1 MiB, while growing the data extent before it, which (as in qemu-img map)
            // the error then ends unreported: the read stops at or before 1 MiB.
            assert_eq!(*guest_offset, delivered, "{err}");
            assert!(*guest_offset <= MIB, "{err}");
            assert!(matches!(**source, Error::BackingMissing { .. }), "{err}");
        }
        other => panic!("expected ReadFailed, got {other}"),
    }
}

#[test]
fn reads_run_on_the_image_pool_not_on_new_threads() {
    let Some(qemu) = Qemu::find_or_skip("reads_run_on_the_image_pool_not_on_new_threads") else {
        return;
    };
    let dir = TempDir::new("parallel-pool");
    let (bytes, _, _) = full_image(&qemu, dir.path());
    let threads = Arc::new(Mutex::new(HashSet::new()));
    let source = Source {
        bytes,
        fail: (0, 0),
        threads: Arc::clone(&threads),
        delay: std::time::Duration::from_millis(1),
        slow: (0, 0, std::time::Duration::ZERO),
    };
    let image = Qcow2::open_with(source, &OpenOptions::new().threads(3)).unwrap();
    let image_threads = || threads.lock().unwrap().len();
    assert_eq!(
        image_threads(),
        1,
        "opening reads on the calling thread only"
    );
    for _ in 0..6 {
        let reader = image.reader().unwrap();
        reader
            .read_parallel(
                ..,
                &ParallelReadOptions::new().chunk_size(128 << 10),
                |_| Ok(()),
            )
            .unwrap();
    }
    // Six reads of 96 chunks each, on at most the 3 pool threads and the caller.
    // Without the `parallel` feature, only the caller.
    let used = image_threads();
    let expected = if cfg!(feature = "parallel") {
        2..=4
    } else {
        1..=1
    };
    assert!(expected.contains(&used), "{used} threads read the image");
}

/// Run `f` on another thread; fail if it does not finish within a minute (a deadlock).
/// Pool threads reading a compressed image chunk after chunk (their reads look sequential to
/// them) never wait for clusters decompressed ahead on the same pool: were every pool thread
/// to wait so, those jobs would never run.
#[test]
fn pool_threads_reading_compressed_chunks_do_not_wait_on_the_pool() {
    let Some(qemu) =
        Qemu::find_or_skip("pool_threads_reading_compressed_chunks_do_not_wait_on_the_pool")
    else {
        return;
    };
    let dir = TempDir::new("parallel-compressed");
    let d = dir.path();
    (CASES[2].make)(&qemu, d);
    let reference = Arc::new(qemu.convert_to_raw(d, "zlib.qcow2", &[] as &[&str]));
    let path = d.join("zlib.qcow2");
    within_a_minute("parallel reads of compressed chunks", move || {
        for threads in [2, 3] {
            let image = Qcow2::open_path_with(&path, &OpenOptions::new().threads(threads)).unwrap();
            for chunk in [4 << 10, 16 << 10, 64 << 10] {
                let mut out = Vec::new();
                let options = ParallelReadOptions::new()
                    .threads(threads)
                    .chunk_size(chunk);
                image
                    .reader()
                    .unwrap()
                    .read_parallel_to_writer(.., &options, &mut out)
                    .unwrap();
                assert!(out == *reference, "{threads} threads, {chunk}-byte chunks");
            }
        }
    });
}

fn within_a_minute(what: &str, f: impl FnOnce() + Send + 'static) {
    let (done, finished) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        f();
        let _ = done.send(());
    });
    match finished.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(()) => worker.join().unwrap(),
        // The thread panicked: raise its panic here.
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(worker.join().unwrap_err())
        }
        Err(_) => panic!("{what} did not finish within a minute: a deadlock"),
    }
}

#[test]
fn reads_share_the_pool_side_by_side_and_nested() {
    let Some(qemu) = Qemu::find_or_skip("reads_share_the_pool_side_by_side_and_nested") else {
        return;
    };
    let dir = TempDir::new("parallel-shared");
    let d = dir.path();
    (CASES[2].make)(&qemu, d); // zlib.qcow2: compressed clusters, decompressed while read
    let reference = Arc::new(qemu.convert_to_raw(d, "zlib.qcow2", &[] as &[&str]));
    let path = d.join("zlib.qcow2");
    within_a_minute(
        "three parallel reads at once, one nesting others",
        move || {
            let image = Qcow2::open_path_with(&path, &OpenOptions::new().threads(2)).unwrap();
            let whole = |reader: &Reader<'_, File>| {
                let mut out = Vec::new();
                let options = ParallelReadOptions::new().chunk_size(64 << 10);
                reader
                    .read_parallel_to_writer(.., &options, &mut out)
                    .unwrap();
                out
            };
            std::thread::scope(|s| {
                let side_by_side: Vec<_> = (0..2)
                    .map(|_| s.spawn(|| whole(&image.reader().unwrap())))
                    .collect();
                // A sink that reads the same image again, in parallel and plainly, per chunk.
                let reader = image.reader().unwrap();
                let mut nested = 0;
                reader
                    .read_parallel(
                        ..,
                        &ParallelReadOptions::new().chunk_size(1 << 20),
                        |chunk| {
                            if nested < 3 {
                                nested += 1;
                                assert!(whole(&reader) == *reference, "nested read_parallel");
                            }
                            if let Chunk::Data { offset, bytes } = chunk {
                                let mut again = vec![0u8; bytes.len()];
                                reader.read_exact_at(offset, &mut again)?;
                                assert!(again == bytes, "read_exact_at {offset:#x} in the sink");
                            }
                            Ok(())
                        },
                    )
                    .unwrap();
                for t in side_by_side {
                    assert!(t.join().unwrap() == *reference, "side by side");
                }
            });
        },
    );
}

#[test]
fn an_empty_16_tib_disk_is_a_few_zero_chunks() {
    let Some(qemu) = Qemu::find_or_skip("an_empty_16_tib_disk_is_a_few_zero_chunks") else {
        return;
    };
    let dir = TempDir::new("parallel-empty");
    img(
        &qemu,
        dir.path(),
        &["create", "-q", "-f", "qcow2", "empty.qcow2", "16T"],
    );
    let image = Qcow2::open_path(dir.join("empty.qcow2")).unwrap();
    let mut chunks = Vec::new();
    image
        .reader()
        .unwrap()
        .read_parallel(.., &ParallelReadOptions::new(), |c| {
            assert!(matches!(c, Chunk::Zeros { .. }), "{c:?}");
            chunks.push((c.offset(), c.end()));
            Ok(())
        })
        .unwrap();
    // The map is asked in windows that double while they hold only zeros.
    assert!(chunks.len() <= 4, "{} chunks", chunks.len());
    assert_eq!(merged(chunks), [(0, 16 << 40)]);
}
