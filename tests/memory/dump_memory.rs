//! Dirty extents stream in bounded memory (issue 19, point 5): a 640 KiB image can describe
//! 2^30 dirty extents (a 1 TiB guest at 512-byte granularity, every bitmap table entry naming
//! the same cluster of 0x55 bytes: every other granule dirty). Collecting them would take
//! 16 GiB; the library iterator and `qcow2 bitmap --dump` must go extent by extent.

use crate::common;

#[cfg(feature = "cli")]
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
#[cfg(feature = "cli")]
use std::process::{Command, Stdio};
#[cfg(feature = "cli")]
use std::sync::mpsc;
#[cfg(feature = "cli")]
use std::time::Duration;
use std::time::Instant;

use common::{Qemu, TempDir};
use qcow2::Qcow2;

use crate::alloc_count::peak_during;

/// Extents consumed from the library iterator.
const EXTENTS: u64 = 1_000_000;
/// The most the iterator may hold while they are consumed: its table (4096 entries) and one
/// 64 KiB cluster of bitmap data, with room to spare; 10^6 extents kept would be 16 MB.
const PEAK_BOUND: usize = 2 << 20;
const GRANULARITY: u64 = 512;

/// Make `huge.qcow2` in `dir`: `qemu-img create` 1 TiB, `qemu-img bitmap --add -g 512 b0`,
/// then one cluster of 0x55 bytes appended and named by every entry of b0's table. Checked
/// by `qemu-img info` (QEMU opens it, loading the bitmap), and 640 KiB at most.
fn make_image(qemu: &Qemu, dir: &Path) -> std::path::PathBuf {
    let name = "huge.qcow2";
    qemu.img(dir, &["create", "-q", "-f", "qcow2", name, "1T"]);
    qemu.img(dir, &["bitmap", "--add", "-g", "512", name, "b0"]);
    let path = dir.join(name);
    let (table_offset, table_size) = {
        let image = Qcow2::open_path(&path).unwrap();
        let b = image.bitmap("b0").unwrap();
        (b.table_offset, b.table_size)
    };
    assert_eq!(table_size, 4096, "2^31 bits in 64 KiB clusters");
    let mut bytes = std::fs::read(&path).unwrap();
    let data = bytes.len().next_multiple_of(65536);
    bytes.resize(data, 0);
    bytes.extend(std::iter::repeat_n(0x55u8, 65536));
    for k in 0..table_size as usize {
        let at = table_offset as usize + 8 * k;
        bytes[at..at + 8].copy_from_slice(&(data as u64).to_be_bytes());
    }
    std::fs::write(&path, &bytes).unwrap();
    assert!(bytes.len() <= 640 << 10, "{} bytes", bytes.len());
    let info = qemu.info_json(dir, name, false);
    assert_eq!(info["format-specific"]["data"]["bitmaps"][0]["name"], "b0");
    path
}

/// Extent `k`: granule `2k` (bits 0, 2, 4 and 6 of each 0x55 byte are set).
fn expected(k: u64) -> (u64, u64) {
    (2 * k * GRANULARITY, GRANULARITY)
}

#[test]
fn library_iterates_a_billion_extents_in_bounded_memory() {
    let Some(qemu) = Qemu::find_or_skip("library_iterates_a_billion_extents_in_bounded_memory")
    else {
        return;
    };
    let tmp = TempDir::new("dump-memory");
    let path = make_image(&qemu, tmp.path());
    let image = Qcow2::open_path(&path).unwrap();
    let started = Instant::now();
    let ((), peak) = peak_during(|| {
        let extents = image.dirty_extents("b0").unwrap();
        for (k, extent) in (0..EXTENTS).zip(extents) {
            let e = extent.unwrap();
            assert_eq!((e.start, e.length), expected(k));
        }
    });
    eprintln!(
        "{EXTENTS} extents in {:?}, peak {} KiB",
        started.elapsed(),
        peak >> 10
    );
    assert!(peak < PEAK_BOUND, "peak {peak} bytes");
}

/// Start `qcow2 bitmap --dump b0 [--output=json] huge.qcow2`, read its first `lines` lines
/// (or, for JSON, `bytes` bytes) within `deadline`, then kill it. Also returns its peak RSS
/// (`VmHWM`) in KiB when /proc has it.
#[cfg(feature = "cli")]
fn first_output(dir: &Path, json: bool, want: usize, deadline: Duration) -> (Vec<u8>, Option<u64>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qcow2"));
    cmd.current_dir(dir).args(["bitmap", "--dump", "b0"]);
    if json {
        cmd.arg("--output=json");
    }
    let mut child = cmd
        .arg("huge.qcow2")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut got = Vec::new();
        if json {
            let _ = reader.by_ref().take(want as u64).read_to_end(&mut got);
        } else {
            for _ in 0..want {
                if reader.read_until(b'\n', &mut got).unwrap_or(0) == 0 {
                    break;
                }
            }
        }
        let _ = tx.send(got);
    });
    let got = rx.recv_timeout(deadline);
    let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        });
    let _ = child.kill();
    let _ = child.wait();
    match got {
        Ok(got) => (got, hwm),
        Err(_) => panic!("no output within {deadline:?} (peak RSS {hwm:?} KiB)"),
    }
}

#[cfg(feature = "cli")]
#[test]
fn cli_dump_prints_as_it_goes() {
    let Some(qemu) = Qemu::find_or_skip("cli_dump_prints_as_it_goes") else {
        return;
    };
    let tmp = TempDir::new("dump-cli");
    make_image(&qemu, tmp.path());
    let deadline = Duration::from_secs(10);
    // Human: 10^6 lines, each `start length`.
    let started = Instant::now();
    let (out, hwm) = first_output(tmp.path(), false, EXTENTS as usize, deadline);
    eprintln!(
        "human: {EXTENTS} lines in {:?}, peak RSS {hwm:?} KiB",
        started.elapsed()
    );
    let text = String::from_utf8(out).unwrap();
    let mut lines = 0u64;
    for (k, line) in (0..).zip(text.lines()) {
        let (s, l) = expected(k);
        assert_eq!(line, format!("{s} {l}"), "line {k}");
        lines += 1;
    }
    assert_eq!(lines, EXTENTS);
    if let Some(kib) = hwm {
        assert!(kib < 64 << 10, "peak RSS {kib} KiB");
    }
    // JSON: the array's first elements, written one by one.
    let want: String = std::iter::once("[".to_owned())
        .chain((0..1000).map(|k| {
            let (s, l) = expected(k);
            let sep = if k == 0 { "" } else { "," };
            format!("{sep}{{\"start\":{s},\"length\":{l}}}")
        }))
        .collect();
    let (out, hwm) = first_output(tmp.path(), true, want.len(), deadline);
    assert_eq!(String::from_utf8(out).unwrap(), want);
    if let Some(kib) = hwm {
        assert!(kib < 64 << 10, "peak RSS {kib} KiB");
    }
}
