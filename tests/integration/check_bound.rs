//! `Qcow2::check` is bounded by what the file holds: snapshots whose L1 tables lie past the
//! end of the file (or pile up on the same bytes) neither cost time to walk nor let an L1
//! table that names one L2 table over and over be walked for longer. Each crafted image must
//! be checked (or refused with `Error::Malformed`) before a deadline, so a regression fails
//! instead of hanging.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Qemu, TempDir};
use qcow2::{Error, OpenOptions, Qcow2};

/// Far more than the checks take (well under a second each in a debug build, measured), so a
/// loaded machine does not fail them; a regression takes minutes.
const DEADLINE: Duration = Duration::from_secs(10);

const CLUSTER: u64 = 64 << 10;

fn be64(bytes: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn set64(bytes: &mut [u8], at: u64, value: u64) {
    let at = at as usize;
    bytes[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

/// A 64 TiB image (64 KiB clusters: an L1 table of 131072 entries) with 64 KiB of data, every
/// L1 entry naming its one L2 table and every entry of that L2 table naming its one data
/// cluster: each walk of the L2 table counts 8192 references.
fn repeated_l2(qemu: &Qemu, dir: &Path, name: &str) -> Vec<u8> {
    qemu.img(dir, &["create", "-q", "-f", "qcow2", name, "64T"]);
    qemu.io(dir, "qcow2", name, &["write -P 1 0 64k"]);
    let mut bytes = std::fs::read(dir.join(name)).unwrap();
    let l1 = be64(&bytes, 40);
    let l1_size = u64::from(u32::from_be_bytes(bytes[36..40].try_into().unwrap()));
    assert_eq!(l1_size, 131072);
    let first = be64(&bytes, l1);
    let l2 = first & 0x00ff_ffff_ffff_fe00;
    let data = be64(&bytes, l2);
    for i in 1..l1_size {
        set64(&mut bytes, l1 + 8 * i, first);
    }
    for i in 1..CLUSTER / 8 {
        set64(&mut bytes, l2 + 8 * i, data);
    }
    bytes
}

/// Append a snapshot table of `count` entries (at the next cluster boundary) whose L1 tables
/// are `l1(i)`: (offset, entries).
fn add_snapshots(bytes: &mut Vec<u8>, count: u32, l1: impl Fn(u32) -> (u64, u32)) {
    let table = (bytes.len() as u64).div_ceil(CLUSTER) * CLUSTER;
    bytes.resize(table as usize, 0);
    for i in 0..count {
        let (offset, entries) = l1(i);
        let id = format!("{}", i + 1);
        let name = format!("s{i}");
        let mut e = Vec::with_capacity(80);
        e.extend_from_slice(&offset.to_be_bytes());
        e.extend_from_slice(&entries.to_be_bytes());
        e.extend_from_slice(&(id.len() as u16).to_be_bytes());
        e.extend_from_slice(&(name.len() as u16).to_be_bytes());
        e.extend_from_slice(&[0u8; 20]); // date, VM clock, 32-bit VM state size
        e.extend_from_slice(&16u32.to_be_bytes()); // extra data: VM state size, disk size
        e.extend_from_slice(&0u64.to_be_bytes());
        e.extend_from_slice(&(64u64 << 40).to_be_bytes());
        e.extend_from_slice(id.as_bytes());
        e.extend_from_slice(name.as_bytes());
        e.resize(e.len().div_ceil(8) * 8, 0);
        bytes.extend_from_slice(&e);
    }
    bytes[60..64].copy_from_slice(&count.to_be_bytes());
    set64(bytes, 64, table);
}

/// Check `path` on another thread; panics if it takes longer than [`DEADLINE`].
fn check_before_deadline(path: PathBuf) -> (qcow2::Result<qcow2::CheckReport>, Duration) {
    let (tx, rx) = mpsc::channel();
    let shown = path.display().to_string();
    std::thread::spawn(move || {
        let start = Instant::now();
        let options = OpenOptions::new().backing_as_zeros(true);
        let result = Qcow2::open_path_with(&path, &options).and_then(|image| image.check());
        let _ = tx.send((result, start.elapsed()));
    });
    rx.recv_timeout(DEADLINE)
        .unwrap_or_else(|_| panic!("{shown}: the check ran past {DEADLINE:?}"))
}

fn assert_stops(path: PathBuf, what: &str) {
    let (result, took) = check_before_deadline(path);
    eprintln!("{what}: {took:?}");
    match result {
        Err(Error::Malformed { .. }) => {}
        other => panic!("{what}: expected Error::Malformed, got {other:?}"),
    }
}

#[test]
fn snapshots_past_the_end_do_not_raise_the_walk_bound() {
    let Some(qemu) = Qemu::find_or_skip("snapshots_past_the_end_do_not_raise_the_walk_bound")
    else {
        return;
    };
    let tmp = TempDir::new("check-bound-past-end");
    let dir = tmp.path();
    let base = repeated_l2(&qemu, dir, "base.qcow2");
    // 1000 and 65527 snapshots with a 1-entry L1 table past the end of the file.
    for count in [1000u32, 65527] {
        let mut bytes = base.clone();
        add_snapshots(&mut bytes, count, |i| {
            ((1 << 40) + u64::from(i) * CLUSTER, 1)
        });
        let name = format!("past-end-{count}.qcow2");
        std::fs::write(dir.join(&name), &bytes).unwrap();
        assert_stops(dir.join(&name), &name);
    }
}

#[test]
fn huge_snapshot_l1_tables_past_the_end_cost_nothing_to_walk() {
    let tmp = TempDir::new("check-bound-huge-l1");
    let dir = tmp.path();
    // A minimal sound image, built by hand: header, refcount table, refcount block, L1.
    // 65536 snapshots, each with an L1 table of 4 Mi entries (32 MiB) past the end.
    let mut bytes = vec![0u8; 4 * CLUSTER as usize];
    bytes[0..4].copy_from_slice(b"QFI\xfb");
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    bytes[20..24].copy_from_slice(&16u32.to_be_bytes()); // cluster bits
    set64(&mut bytes, 24, 1 << 30); // 1 GiB
    bytes[36..40].copy_from_slice(&2u32.to_be_bytes()); // L1 entries
    set64(&mut bytes, 40, 3 * CLUSTER); // L1 table
    set64(&mut bytes, 48, CLUSTER); // refcount table
    bytes[56..60].copy_from_slice(&1u32.to_be_bytes());
    bytes[96..100].copy_from_slice(&4u32.to_be_bytes()); // refcount order
    bytes[100..104].copy_from_slice(&104u32.to_be_bytes()); // header length
    set64(&mut bytes, CLUSTER, 2 * CLUSTER); // refcount block
    add_snapshots(&mut bytes, 65536, |i| {
        ((1 << 45) + u64::from(i) * (32 << 20), 4 << 20)
    });
    // Refcount 1 for the clusters the image uses, the snapshot table included.
    let clusters = (bytes.len() as u64).div_ceil(CLUSTER);
    for c in 0..clusters {
        let at = (2 * CLUSTER + 2 * c) as usize;
        bytes[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    std::fs::write(dir.join("huge-l1.qcow2"), &bytes).unwrap();
    let (result, took) = check_before_deadline(dir.join("huge-l1.qcow2"));
    eprintln!("huge-l1.qcow2: {took:?}");
    // Nothing to walk: each snapshot's L1 table is one reference past the end (a corruption,
    // as qemu-img counts it), and the rest is sound.
    let report = result.expect("the check completes");
    assert_eq!(report.corruptions, 65536, "{:?}", report.problems.first());
    assert_eq!(report.leaks, 0);
    assert_eq!(report.check_errors, 0);
}

#[test]
fn snapshots_stacked_on_the_same_bytes_stop_quickly() {
    let Some(qemu) = Qemu::find_or_skip("snapshots_stacked_on_the_same_bytes_stop_quickly") else {
        return;
    };
    let tmp = TempDir::new("check-bound-stacked");
    let dir = tmp.path();
    let base = repeated_l2(&qemu, dir, "base.qcow2");
    let l1 = be64(&base, 40);
    // Every snapshot's L1 table is the active one (its first entry, or all of it and what
    // follows, 4 Mi entries): tables stacked on the same bytes earn no walks.
    for (count, entries) in [(65527u32, 1u32), (65536, 4 << 20)] {
        let mut bytes = base.clone();
        add_snapshots(&mut bytes, count, |_| (l1, entries));
        let name = format!("stacked-{count}x{entries}.qcow2");
        std::fs::write(dir.join(&name), &bytes).unwrap();
        assert_stops(dir.join(&name), &name);
    }
    // Snapshot L1 tables of 4 Mi entries inside the file, all naming nothing (zeros), in an
    // image otherwise sound: the entries read are bounded by the file's length.
    qemu.img(dir, &["create", "-q", "-f", "qcow2", "sound.qcow2", "64T"]);
    qemu.io(dir, "qcow2", "sound.qcow2", &["write -P 1 0 64k"]);
    let mut bytes = std::fs::read(dir.join("sound.qcow2")).unwrap();
    let zeros = (bytes.len() as u64).div_ceil(CLUSTER) * CLUSTER;
    bytes.resize((zeros + (32 << 20)) as usize, 0);
    add_snapshots(&mut bytes, 65536, |_| (zeros, 4 << 20));
    std::fs::write(dir.join("stacked-zeros.qcow2"), &bytes).unwrap();
    let (result, took) = check_before_deadline(dir.join("stacked-zeros.qcow2"));
    eprintln!("stacked-zeros.qcow2: {took:?}");
    let err = result.expect_err("the check stops");
    assert!(
        err.to_string().contains("tables stacked on the same bytes"),
        "{err}"
    );
}

/// An L1 table naming L2 tables past the end of the file: QEMU reads each as zeros (in the
/// walk and again for the COPIED flags); the crate reads none of them.
#[test]
fn l2_tables_past_the_end_cost_nothing_to_walk() {
    let Some(qemu) = Qemu::find_or_skip("l2_tables_past_the_end_cost_nothing_to_walk") else {
        return;
    };
    let tmp = TempDir::new("check-bound-l2-past-end");
    let dir = tmp.path();
    qemu.img(dir, &["create", "-q", "-f", "qcow2", "l2.qcow2", "64T"]);
    qemu.io(dir, "qcow2", "l2.qcow2", &["write -P 1 0 64k"]);
    let mut bytes = std::fs::read(dir.join("l2.qcow2")).unwrap();
    let l1 = be64(&bytes, 40);
    let copied = be64(&bytes, l1) & (1 << 63);
    for i in 1..131072u64 {
        set64(&mut bytes, l1 + 8 * i, copied | ((1 << 40) + i * CLUSTER));
    }
    std::fs::write(dir.join("l2.qcow2"), &bytes).unwrap();
    let (result, took) = check_before_deadline(dir.join("l2.qcow2"));
    eprintln!("l2.qcow2: {took:?}");
    let report = result.expect("the check completes");
    // Each L2 table past the end is a reference past the end, and its COPIED flag is wrong
    // (refcount 0).
    assert_eq!(
        report.corruptions,
        2 * 131071,
        "{:?}",
        report.problems.first()
    );
}

/// Rewrite the bitmap directory of the image in `bytes` (512-byte clusters, one bitmap made
/// by qemu-img) as `count` bitmaps whose tables are `table(i)`: (offset, entries).
pub fn set_bitmaps(bytes: &mut Vec<u8>, count: u32, table: impl Fn(u32) -> (u64, u32)) {
    let ext = bytes
        .windows(4)
        .position(|w| w == 0x2385_2875u32.to_be_bytes())
        .expect("a bitmaps extension");
    let dir = (bytes.len() as u64).div_ceil(512) * 512;
    bytes.resize(dir as usize, 0);
    for i in 0..count {
        let (offset, entries) = table(i);
        let name = format!("b{i}");
        let mut e = Vec::with_capacity(40);
        e.extend_from_slice(&offset.to_be_bytes());
        e.extend_from_slice(&entries.to_be_bytes());
        e.extend_from_slice(&0u32.to_be_bytes()); // flags
        e.push(1); // dirty tracking
        e.push(9); // granularity 512 bytes: a table entry covers 2 MiB
        e.extend_from_slice(&(name.len() as u16).to_be_bytes());
        e.extend_from_slice(&0u32.to_be_bytes()); // extra data
        e.extend_from_slice(name.as_bytes());
        e.resize(e.len().div_ceil(8) * 8, 0);
        bytes.extend_from_slice(&e);
    }
    let size = bytes.len() as u64 - dir;
    let data = ext + 8;
    bytes[data..data + 4].copy_from_slice(&count.to_be_bytes());
    set64(bytes, data as u64 + 8, size);
    set64(bytes, data as u64 + 16, dir);
    // Room for the last table entry's reads: the file ends at a cluster boundary.
    let end = (bytes.len() as u64).div_ceil(512) * 512;
    bytes.resize(end as usize, 0);
}

/// 255 bitmaps whose tables (32768 entries, 256 KiB, each: the 64 MiB the open allows in all)
/// are stacked on the same bytes:
/// the entries read are bounded by the file. (Tables past the end of the file are refused by
/// the open.)
#[test]
fn bitmap_tables_stacked_on_the_same_bytes_stop_quickly() {
    let Some(qemu) = Qemu::find_or_skip("bitmap_tables_stacked_on_the_same_bytes_stop_quickly")
    else {
        return;
    };
    let tmp = TempDir::new("check-bound-bitmaps");
    let dir = tmp.path();
    let name = "bitmaps.qcow2";
    // 64 GiB at 512-byte clusters: a bitmap of 512-byte granularity has 32768 table entries.
    let create = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        name,
        "64G",
    ];
    qemu.img(dir, &create);
    qemu.img(dir, &["bitmap", "--add", name, "b0"]);
    // Tables stacked inside the file: the entries read are bounded by the file.
    let mut bytes = std::fs::read(dir.join(name)).unwrap();
    let zeros = bytes.len() as u64;
    bytes.resize(bytes.len() + (256 << 10), 0);
    set_bitmaps(&mut bytes, 255, |_| (zeros, 32768));
    std::fs::write(dir.join("stacked.qcow2"), &bytes).unwrap();
    let (result, took) = check_before_deadline(dir.join("stacked.qcow2"));
    eprintln!("stacked.qcow2: {took:?}");
    let err = result.expect_err("the check stops");
    assert!(
        err.to_string().contains("tables stacked on the same bytes"),
        "{err}"
    );
}

/// 65535 bitmaps (QEMU's limit), each with a one-entry table: the open finds duplicate names
/// in time linear in their number (it compared every name with every earlier one: 2 billion
/// comparisons, over 20 s in a debug build), and the check follows.
#[test]
fn the_most_bitmaps_qemu_allows_open_and_check_quickly() {
    let Some(qemu) = Qemu::find_or_skip("the_most_bitmaps_qemu_allows_open_and_check_quickly")
    else {
        return;
    };
    let tmp = TempDir::new("check-bound-many-bitmaps");
    let dir = tmp.path();
    let name = "bitmaps.qcow2";
    // 1 MiB at 512-byte clusters: a bitmap of 512-byte granularity fits one table entry.
    let create = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        name,
        "1M",
    ];
    qemu.img(dir, &create);
    qemu.img(dir, &["bitmap", "--add", name, "b0"]);
    let mut bytes = std::fs::read(dir.join(name)).unwrap();
    let table = (bytes.len() as u64).div_ceil(512) * 512;
    bytes.resize(table as usize + 512, 0); // one all-zero entry: a bitmap with no bit set
    set_bitmaps(&mut bytes, 65535, |_| (table, 1));
    std::fs::write(dir.join("many.qcow2"), &bytes).unwrap();
    let (result, took) = check_before_deadline(dir.join("many.qcow2"));
    eprintln!("many.qcow2: {took:?}");
    // The rewritten directory leaves qemu-img's old one leaked: a report, not an error.
    result.expect("65535 bitmaps open and check");
    let image = Qcow2::open_path(dir.join("many.qcow2")).unwrap();
    assert_eq!(image.bitmaps().len(), 65535);
}
