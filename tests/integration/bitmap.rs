//! Persistent dirty bitmaps against QEMU.
//!
//! Images are made by `qemu-img bitmap` and written by `qemu-io` (an enabled bitmap records
//! the writes of any program that opens the image read-write). The truth for a bitmap's
//! contents is QEMU's own export of it: `qemu-nbd -r -B NAME`, read back with `qemu-img map`
//! over NBD with `x-dirty-bitmap=qemu:dirty-bitmap:NAME`, where a dirty area is reported as
//! `"data": false` (the option reuses the block-status bits, inverted). The truth for a
//! malformed image is whether `qemu-img info` opens it.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{find_tool, missing_tool, unique_name, Qemu, Rng, TempDir};
use qcow2::{Error, Limits, OpenOptions, Qcow2};

/// qemu-img, qemu-io and qemu-nbd, or `None` after a loud skip.
struct Tools {
    qemu: Qemu,
    nbd: PathBuf,
}

impl Tools {
    fn find_or_skip(test: &str) -> Option<Tools> {
        let qemu = Qemu::find_or_skip(test)?;
        let Some(nbd) = find_tool("qemu-nbd", "QEMU_NBD") else {
            missing_tool(test, "qemu-nbd");
            return None;
        };
        Some(Tools { qemu, nbd })
    }
}

/// A `qemu-nbd` server, killed when dropped (also when the test fails).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Extents as `(start, length)`.
type Runs = Vec<(u64, u64)>;

/// Start `qemu-nbd -r -B BITMAP` on `image` and wait for its socket. `Err(stderr)` when
/// qemu-nbd exits instead.
fn serve(
    tools: &Tools,
    dir: &Path,
    image: &str,
    bitmap: &str,
) -> Result<(Server, PathBuf), String> {
    let sock = unique_name(dir, "nbd", "sock");
    let child = Command::new(&tools.nbd)
        .current_dir(dir)
        .args(["-r", "-f", "qcow2", "-B", bitmap, "--socket"])
        .arg(&sock)
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run qemu-nbd: {e}"));
    let mut server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        if let Some(status) = server.0.try_wait().expect("qemu-nbd status") {
            let mut err = String::new();
            use std::io::Read;
            let _ = server
                .0
                .stderr
                .take()
                .map(|mut s| s.read_to_string(&mut err));
            return Err(format!("qemu-nbd exited ({status}): {err}"));
        }
        assert!(
            Instant::now() < deadline,
            "qemu-nbd did not create its socket in 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((server, sock))
}

/// What `qemu-nbd -B BITMAP` says when it refuses to export the bitmap: it must exit with
/// an error (it may create its socket first).
fn nbd_refusal(tools: &Tools, dir: &Path, image: &str, bitmap: &str) -> String {
    let out = Command::new("timeout")
        .current_dir(dir)
        .arg("20")
        .arg(&tools.nbd)
        .args(["-r", "-f", "qcow2", "-B", bitmap, "--socket"])
        .arg(unique_name(dir, "nbd", "sock"))
        .arg(image)
        .output()
        .unwrap_or_else(|e| panic!("cannot run timeout qemu-nbd: {e}"));
    assert_eq!(
        out.status.code(),
        Some(1),
        "qemu-nbd -B {bitmap} must fail, not serve"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// QEMU's dirty extents of `bitmap`, through `qemu-nbd` and `qemu-img map`, merged.
fn qemu_dirty(tools: &Tools, dir: &Path, image: &str, bitmap: &str) -> Runs {
    let (_server, sock) =
        serve(tools, dir, image, bitmap).unwrap_or_else(|e| panic!("{image} {bitmap}: {e}"));
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}",
        sock.display()
    );
    let out = tools
        .qemu
        .img(dir, &["map", "--output=json", "--image-opts", &opts]);
    let map: serde_json::Value = serde_json::from_slice(&out).expect("qemu-img map JSON");
    let mut runs: Runs = Vec::new();
    for e in map.as_array().expect("a list") {
        // x-dirty-bitmap inverts the status: dirty areas are the ones without data.
        if e["data"].as_bool() != Some(false) {
            continue;
        }
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match runs.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += len,
            _ => runs.push((start, len)),
        }
    }
    runs
}

/// The crate's dirty extents.
fn ours(image: &Qcow2<std::fs::File>, bitmap: &str, allow_in_use: bool) -> Runs {
    let extents = if allow_in_use {
        image.dirty_extents_allow_in_use(bitmap)
    } else {
        image.dirty_extents(bitmap)
    };
    extents
        .unwrap_or_else(|e| panic!("dirty_extents({bitmap}): {e}"))
        .map(|e| e.map(|e| (e.start, e.length)))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("reading {bitmap}: {e}"))
}

fn open(dir: &Path, image: &str) -> Qcow2<std::fs::File> {
    Qcow2::open(std::fs::File::open(dir.join(image)).expect("image file"))
        .unwrap_or_else(|e| panic!("{image}: {e}"))
}

/// Every bitmap of `image`, not in use, must read as QEMU exports it. Returns how many
/// extents were compared.
fn compare_all(tools: &Tools, dir: &Path, image: &str) -> usize {
    let img = open(dir, image);
    assert!(!img.bitmaps().is_empty(), "{image} has no bitmaps");
    let mut compared = 0;
    for b in img.bitmaps() {
        let theirs = qemu_dirty(tools, dir, image, &b.name);
        let mine = ours(&img, &b.name, false);
        assert_eq!(
            mine, theirs,
            "{image} bitmap {} (granularity {}): crate vs qemu-nbd",
            b.name, b.granularity
        );
        assert_extents_well_formed(&mine, img.guest_size(), b.granularity);
        compared += mine.len();
    }
    compared
}

/// Ascending, not touching, aligned to the granularity, within the guest.
fn assert_extents_well_formed(runs: &Runs, size: u64, granularity: u64) {
    for w in runs.windows(2) {
        assert!(w[0].0 + w[0].1 < w[1].0, "not ascending and merged: {w:?}");
    }
    for &(start, len) in runs {
        assert!(
            len > 0 && start % granularity == 0 && start + len <= size,
            "{start} {len}"
        );
        assert!((start + len) % granularity == 0 || start + len == size);
    }
}

fn create(tools: &Tools, dir: &Path, name: &str, opts: &str, size: &str) {
    tools.qemu.img(
        dir,
        &["create", "-q", "-f", "qcow2", "-o", opts, name, size],
    );
}

fn add(tools: &Tools, dir: &Path, image: &str, bitmap: &str, extra: &[&str]) {
    let mut args = vec!["bitmap", "--add"];
    args.extend(extra);
    args.extend([image, bitmap]);
    tools.qemu.img(dir, &args);
}

fn write(tools: &Tools, dir: &Path, image: &str, cmds: &[&str]) {
    tools.qemu.io(dir, "qcow2", image, cmds);
}

#[test]
fn granularities_and_cluster_sizes_match_qemu_nbd() {
    let Some(tools) = Tools::find_or_skip("granularities_and_cluster_sizes_match_qemu_nbd") else {
        return;
    };
    let dir = TempDir::new("bitmap-gran");
    let d = dir.path();
    // (cluster size, guest size, granularities)
    let layouts: &[(&str, &str, &[&str])] = &[
        ("512", "8M", &["512", "4k", "64k"]),
        ("64k", "64M", &["512", "4k", "64k", "1M", "64M"]),
        ("2M", "256M", &["64k", "2M", "128M"]),
        // A guest size that is not a multiple of any granularity: the last extent is clipped.
        ("4k", "4195840", &["512", "64k"]),
    ];
    let mut total = 0;
    for (i, (cluster, size, grans)) in layouts.iter().enumerate() {
        let image = format!("g{i}.qcow2");
        create(&tools, d, &image, &format!("cluster_size={cluster}"), size);
        for g in grans.iter() {
            add(&tools, d, &image, &format!("g{g}"), &["--granularity", g]);
        }
        let guest = open(d, &image).guest_size();
        let mut rng = Rng::new(i as u64 + 1);
        let mut cmds = vec![
            "write 0 1".to_owned(),                       // one byte: one granule
            format!("write -z {} 512", guest - 512),      // the last sector, as zeros
            format!("write {} 70000", guest / 2 - 35000), // across the middle
            format!("discard {} 1M", guest / 4),          // discards are writes too
        ];
        for _ in 0..20 {
            let len = 512 * (1 + rng.below(300));
            let at = rng.below((guest - len) / 512) * 512;
            cmds.push(format!("write {at} {len}"));
        }
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        write(&tools, d, &image, &cmds);
        total += compare_all(&tools, d, &image);
    }
    assert!(
        total > 20,
        "too few extents compared ({total}): were the writes recorded?"
    );
}

#[test]
fn data_spanning_clusters_of_bitmap_data() {
    let Some(tools) = Tools::find_or_skip("data_spanning_clusters_of_bitmap_data") else {
        return;
    };
    let dir = TempDir::new("bitmap-span");
    let d = dir.path();
    // 512-byte clusters at 512-byte granularity: each cluster of bitmap data covers 2 MiB,
    // so a 16 MiB guest has 8 table entries.
    create(&tools, d, "s.qcow2", "cluster_size=512", "16M");
    add(&tools, d, "s.qcow2", "b", &["--granularity", "512"]);
    write(
        &tools,
        d,
        "s.qcow2",
        &[
            "write 2093056 8192", // 2 MiB - 4 KiB .. 2 MiB + 4 KiB: across entries 0 and 1
            "write 4194304 2097152", // all of entry 2
            "write 16776704 512", // the last sector
        ],
    );
    let img = open(d, "s.qcow2");
    assert_eq!(img.bitmap("b").unwrap().table_size, 8);
    let mine = ours(&img, "b", false);
    assert_eq!(mine, qemu_dirty(&tools, d, "s.qcow2", "b"));
    assert_eq!(
        mine,
        vec![(2093056, 8192), (4194304, 2097152), (16776704, 512)],
        "the extents the writes made (also checked against qemu-nbd above)"
    );
}

/// Byte offset of the bitmaps extension's data, and the directory entries' offsets.
struct Layout {
    ext: usize,
    entries: Vec<usize>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}
fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn layout(b: &[u8]) -> Layout {
    let mut at = be32(b, 100) as usize; // header_length
    let ext = loop {
        let (magic, len) = (be32(b, at), be32(b, at + 4) as usize);
        assert_ne!(magic, 0, "no bitmaps extension");
        if magic == 0x2385_2875 {
            break at + 8;
        }
        at += 8 + len.div_ceil(8) * 8;
    };
    let mut entries = Vec::new();
    let mut pos = be64(b, ext + 16) as usize;
    for _ in 0..be32(b, ext) {
        entries.push(pos);
        let (name, extra) = (
            u16::from_be_bytes([b[pos + 18], b[pos + 19]]) as usize,
            be32(b, pos + 20) as usize,
        );
        pos += (24 + name + extra).div_ceil(8) * 8;
    }
    Layout { ext, entries }
}

/// File offset of entry `k` of bitmap `i`'s table.
fn table_entry(b: &[u8], i: usize, k: usize) -> usize {
    be64(b, layout(b).entries[i]) as usize + 8 * k
}

#[test]
fn all_ones_and_all_zeros_table_entries() {
    let Some(tools) = Tools::find_or_skip("all_ones_and_all_zeros_table_entries") else {
        return;
    };
    let dir = TempDir::new("bitmap-ones");
    let d = dir.path();
    create(&tools, d, "o.qcow2", "cluster_size=512", "7M");
    add(&tools, d, "o.qcow2", "b", &["--granularity", "512"]);
    write(&tools, d, "o.qcow2", &["write 0 4k", "write 5M 4k"]);
    let mut bytes = std::fs::read(d.join("o.qcow2")).unwrap();
    let t = |k| table_entry(&bytes, 0, k);
    assert_ne!(
        be64(&bytes, t(0)),
        0,
        "QEMU stored a data cluster for entry 0"
    );
    assert_eq!(
        be64(&bytes, t(1)),
        0,
        "QEMU stored an all-zeros entry for entry 1"
    );
    // QEMU never writes the all-ones form itself, but reads it: set entries 1 and 3 (the
    // last, half past the guest's end) to all ones.
    let (one, three) = (t(1), t(3));
    put64(&mut bytes, one, 1);
    put64(&mut bytes, three, 1);
    std::fs::write(d.join("ones.qcow2"), &bytes).unwrap();
    compare_all(&tools, d, "ones.qcow2");
    let mine = ours(&open(d, "ones.qcow2"), "b", false);
    let expected = [
        (0, 4096),
        (2 << 20, 2 << 20),
        (5 << 20, 4096),
        (6 << 20, 1 << 20),
    ];
    assert_eq!(
        mine, expected,
        "entry 1 all dirty, entry 3 dirty up to the guest's end"
    );

    // --clear leaves all-zeros entries: nothing dirty.
    tools.qemu.img(d, &["bitmap", "--clear", "o.qcow2", "b"]);
    let bytes = std::fs::read(d.join("o.qcow2")).unwrap();
    let img = open(d, "o.qcow2");
    let b = img.bitmap("b").unwrap();
    assert!((0..b.table_size as usize).all(|k| be64(&bytes, table_entry(&bytes, 0, k)) == 0));
    assert_eq!(
        ours(&img, "b", false),
        qemu_dirty(&tools, d, "o.qcow2", "b")
    );
    assert!(ours(&img, "b", false).is_empty());
}

#[test]
fn several_bitmaps_disabled_merged_and_in_use() {
    let Some(tools) = Tools::find_or_skip("several_bitmaps_disabled_merged_and_in_use") else {
        return;
    };
    let dir = TempDir::new("bitmap-multi");
    let d = dir.path();
    create(&tools, d, "m.qcow2", "cluster_size=64k", "32M");
    add(&tools, d, "m.qcow2", "early", &[]);
    write(&tools, d, "m.qcow2", &["write 0 64k"]);
    add(&tools, d, "m.qcow2", "late", &["--granularity", "4k"]);
    add(&tools, d, "m.qcow2", "off", &["--disable"]);
    write(&tools, d, "m.qcow2", &["write 1M 4k", "write 30M 100k"]);
    // merge: "sum" gets early's bits, then records nothing more (disabled).
    add(&tools, d, "m.qcow2", "sum", &["--disable"]);
    tools
        .qemu
        .img(d, &["bitmap", "--merge", "early", "m.qcow2", "sum"]);
    tools
        .qemu
        .img(d, &["bitmap", "--merge", "late", "m.qcow2", "sum"]);
    let img = open(d, "m.qcow2");
    let names: Vec<&str> = img.bitmaps().iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["early", "late", "off", "sum"]);
    assert!(!img.bitmap("off").unwrap().auto() && img.bitmap("late").unwrap().auto());
    compare_all(&tools, d, "m.qcow2");
    assert!(
        ours(&img, "off", false).is_empty(),
        "a disabled bitmap records nothing"
    );
    assert_eq!(ours(&img, "late", false).len(), 2);
    assert_eq!(ours(&img, "sum", false), ours(&img, "early", false));
    drop(img);

    // Kill qemu-io after a write: the bitmaps stay marked in use, their stored bits stale.
    let before = qemu_dirty(&tools, d, "m.qcow2", "late");
    tools
        .qemu
        .io_crash(d, "qcow2", "m.qcow2", &["write 8M 64k"]);
    let img = open(d, "m.qcow2");
    let late = img.bitmap("late").unwrap();
    assert!(late.in_use() && late.flag_names() == ["in-use", "auto"]);
    assert!(
        img.bitmaps().iter().all(|b| b.in_use()),
        "QEMU marks every bitmap it loads"
    );
    assert!(matches!(
        img.dirty_extents("late"),
        Err(Error::BitmapInUse { name }) if name == "late"
    ));
    let refusal = nbd_refusal(&tools, d, "m.qcow2", "late");
    assert!(
        refusal.contains("inconsistent"),
        "qemu-nbd must refuse an in-use bitmap too: {refusal}"
    );
    // Allowed, the stale bits are what QEMU exported before the crash.
    assert_eq!(ours(&img, "late", true), before);
    assert!(matches!(
        img.dirty_extents("nope"),
        Err(Error::NoSuchBitmap { name }) if name == "nope"
    ));
}

/// What QEMU and the crate do with one malformed image.
struct Case {
    name: &'static str,
    /// `base-64k` (16 MiB, 64 KiB clusters; b0 enabled with a data cluster, b1 disabled,
    /// all zeros) or `base-512` (16 MiB, 512-byte clusters, b0 at 512 B: 8 table entries).
    base: &'static str,
    patch: fn(&mut Vec<u8>),
    /// Whether QEMU opens it (asserted against `qemu-img info` in the test).
    qemu_opens: bool,
}

fn entry_field(b: &mut [u8], i: usize, at: usize) -> usize {
    layout(b).entries[i] + at
}

/// Give the last bitmap ("b1") a name field of `size` bytes, zeros after "b1", and grow the
/// directory (which ends the file) to hold it.
fn name_size_nul_padded(b: &mut Vec<u8>, size: u16) {
    b.resize(b.len() + 2048, 0);
    let Layout { ext, entries } = layout(b);
    put16(b, entries[1] + 18, size);
    let dir_len = entries[1] - entries[0] + (24 + usize::from(size)).div_ceil(8) * 8;
    put64(b, ext + 8, dir_len as u64);
}

const CASES: &[Case] = &[
    Case {
        name: "type-2",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let at = entry_field(b, 0, 16);
            b[at] = 2
        },
    },
    Case {
        name: "type-0",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let at = entry_field(b, 0, 16);
            b[at] = 0
        },
    },
    Case {
        name: "flags-reserved-bit-2",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let at = entry_field(b, 0, 12);
            put32(b, at, 6)
        },
    },
    Case {
        name: "granularity-bits-8",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let at = entry_field(b, 0, 17);
            b[at] = 8
        },
    },
    Case {
        name: "granularity-bits-32",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let at = entry_field(b, 0, 17);
            b[at] = 32
        },
    },
    Case {
        name: "granularity-bits-31",
        base: "base-64k",
        qemu_opens: true,
        patch: |b| {
            let at = entry_field(b, 0, 17);
            b[at] = 31
        },
    },
    Case {
        name: "table-offset-0",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let at = entry_field(b, 0, 0);
            put64(b, at, 0)
        },
    },
    Case {
        name: "table-offset-unaligned",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let at = entry_field(b, 0, 0);
            let v = be64(b, at);
            put64(b, at, v + 512)
        },
    },
    Case {
        name: "table-size-0",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let at = entry_field(b, 0, 8);
            put32(b, at, 0)
        },
    },
    Case {
        name: "table-size-too-big",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let at = entry_field(b, 0, 8);
            put32(b, at, 2)
        },
    },
    Case {
        name: "table-size-too-small",
        base: "base-512",
        qemu_opens: false,
        patch: |b| {
            let at = entry_field(b, 0, 8);
            put32(b, at, 7)
        },
    },
    Case {
        name: "table-size-too-small-in-use",
        base: "base-512",
        qemu_opens: true,
        patch: |b| {
            let at = entry_field(b, 0, 8);
            put32(b, at, 7);
            put32(b, at + 4, 3)
        },
    },
    Case {
        name: "table-over-512m-of-data",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let at = entry_field(b, 0, 8);
            put32(b, at, 8193)
        },
    },
    Case {
        name: "table-over-512m-of-data-in-use",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let at = entry_field(b, 0, 8);
            put32(b, at, 8193);
            put32(b, at + 4, 3)
        },
    },
    Case {
        name: "name-empty",
        base: "base-64k",
        qemu_opens: true,
        patch: |b| {
            let at = entry_field(b, 1, 18);
            put16(b, at, 0);
            let ext = layout(b).ext;
            put64(b, ext + 8, 56)
        },
    },
    Case {
        name: "name-with-nul",
        base: "base-64k",
        qemu_opens: true,
        patch: |b| {
            let at = entry_field(b, 1, 25);
            b[at] = 0
        },
    },
    Case {
        name: "name-not-utf8",
        base: "base-64k",
        qemu_opens: true,
        patch: |b| {
            let at = entry_field(b, 1, 24);
            b[at] = 0xff
        },
    },
    Case {
        // The name field may hold NULs after the name: QEMU limits the field's length...
        name: "name-size-1023-nul-padded",
        base: "base-64k",
        qemu_opens: true,
        patch: |b| name_size_nul_padded(b, 1023),
    },
    Case {
        // ... not the name's, which ends at the first NUL.
        name: "name-size-1024-nul-padded",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| name_size_nul_padded(b, 1024),
    },
    Case {
        name: "duplicate-names",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let at = entry_field(b, 1, 25);
            b[at] = b'0'
        },
    },
    Case {
        name: "duplicate-name-in-use",
        base: "base-64k",
        qemu_opens: true,
        patch: |b| {
            let at = entry_field(b, 1, 25);
            b[at] = b'0';
            put32(b, at - 13, 1)
        },
    },
    Case {
        name: "duplicate-name-first-in-use",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let at = entry_field(b, 1, 25);
            b[at] = b'0';
            let f = entry_field(b, 0, 12);
            put32(b, f, 3)
        },
    },
    Case {
        name: "extra-data",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            b.resize(b.len() + 64, 0); // the directory ends the file
            let at = entry_field(b, 1, 20);
            put32(b, at, 8);
            b.copy_within(at + 4..at + 6, at + 12);
            b[at + 4..at + 12].fill(0);
            let ext = layout(b).ext;
            put64(b, ext + 8, 72)
        },
    },
    Case {
        name: "more-entries-than-count",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let ext = layout(b).ext;
            put32(b, ext, 1)
        },
    },
    Case {
        name: "fewer-entries-than-count",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let ext = layout(b).ext;
            put32(b, ext, 3)
        },
    },
    Case {
        name: "directory-8-bytes-longer",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let ext = layout(b).ext;
            put64(b, ext + 8, 72)
        },
    },
    Case {
        name: "directory-8-bytes-shorter",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let ext = layout(b).ext;
            put64(b, ext + 8, 56)
        },
    },
    Case {
        name: "directory-size-0",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let ext = layout(b).ext;
            put64(b, ext + 8, 0)
        },
    },
    Case {
        name: "directory-over-qemu-limit",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let ext = layout(b).ext;
            put64(b, ext + 8, 1024 * 65535 + 8)
        },
    },
    Case {
        name: "count-65536",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let ext = layout(b).ext;
            put32(b, ext, 65536)
        },
    },
    Case {
        name: "extension-short-and-stale",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let ext = layout(b).ext;
            put32(b, ext - 4, 16);
            put64(b, 88, 0)
        },
    },
    Case {
        name: "table-entry-reserved-bit-1",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let at = table_entry(b, 0, 0);
            let v = be64(b, at);
            put64(b, at, v | 2)
        },
    },
    Case {
        name: "table-entry-reserved-bit-56",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let at = table_entry(b, 0, 0);
            let v = be64(b, at);
            put64(b, at, v | 1 << 56)
        },
    },
    Case {
        name: "table-entry-unaligned",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let at = table_entry(b, 0, 0);
            let v = be64(b, at);
            put64(b, at, v + 512)
        },
    },
    Case {
        name: "table-entry-offset-and-all-ones",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let at = table_entry(b, 0, 0);
            let v = be64(b, at);
            put64(b, at, v | 1)
        },
    },
    Case {
        name: "table-entry-reserved-disabled-bitmap",
        base: "base-64k",
        qemu_opens: false,
        patch: |b| {
            let at = table_entry(b, 1, 0);
            put64(b, at, 2)
        },
    },
    Case {
        name: "table-entry-reserved-in-use",
        base: "base-64k",
        qemu_opens: true,
        patch: |b| {
            let at = table_entry(b, 0, 0);
            let v = be64(b, at);
            put64(b, at, v | 2);
            let f = entry_field(b, 0, 12);
            put32(b, f, 3)
        },
    },
    Case {
        name: "table-entry-all-ones",
        base: "base-64k",
        qemu_opens: true,
        patch: |b| {
            let at = table_entry(b, 0, 0);
            put64(b, at, 1)
        },
    },
    Case {
        name: "data-cluster-past-eof",
        base: "base-64k",
        qemu_opens: true,
        patch: |b| {
            let at = table_entry(b, 0, 0);
            put64(b, at, 1 << 30)
        },
    },
    Case {
        name: "table-past-eof",
        base: "base-64k",
        qemu_opens: true,
        patch: |b| {
            let at = entry_field(b, 1, 0);
            put64(b, at, 1 << 30)
        },
    },
];

/// Cases QEMU opens and the crate refuses, on purpose: a table past the end of the file
/// (QEMU reads zeros there), as the crate refuses every table that is not in the file.
const REFUSED_ON_PURPOSE: &[&str] = &["table-past-eof"];

fn make_bases(tools: &Tools, d: &Path) {
    create(tools, d, "base-64k.qcow2", "cluster_size=64k", "16M");
    add(tools, d, "base-64k.qcow2", "b0", &["--granularity", "64k"]);
    add(
        tools,
        d,
        "base-64k.qcow2",
        "b1",
        &["--granularity", "64k", "--disable"],
    );
    write(tools, d, "base-64k.qcow2", &["write 0 4k", "write 1M 200k"]);
    create(tools, d, "base-512.qcow2", "cluster_size=512", "16M");
    add(tools, d, "base-512.qcow2", "b0", &["--granularity", "512"]);
    write(tools, d, "base-512.qcow2", &["write 0 4k", "write 3M 1M"]);
}

#[test]
fn malformed_directories_get_qemus_verdict() {
    let Some(tools) = Tools::find_or_skip("malformed_directories_get_qemus_verdict") else {
        return;
    };
    let dir = TempDir::new("bitmap-bad");
    let d = dir.path();
    make_bases(&tools, d);
    for base in ["base-64k", "base-512"] {
        let img = open(d, &format!("{base}.qcow2"));
        assert!(!img.bitmaps().is_empty());
        compare_all(&tools, d, &format!("{base}.qcow2"));
    }
    let mut failures = Vec::new();
    for case in CASES {
        let mut bytes = std::fs::read(d.join(format!("{}.qcow2", case.base))).unwrap();
        let original = bytes.clone();
        (case.patch)(&mut bytes);
        assert_ne!(bytes, original, "{}: patch changed nothing", case.name);
        let file = format!("{}.qcow2", case.name);
        std::fs::write(d.join(&file), &bytes).unwrap();
        let qemu = Command::new(&tools.qemu.img)
            .current_dir(d)
            .args(["info", "-f", "qcow2", &file])
            .output()
            .unwrap();
        let qemu_says = String::from_utf8_lossy(&qemu.stderr).trim().to_owned();
        if qemu.status.success() != case.qemu_opens {
            failures.push(format!(
                "{}: the table says QEMU opens it: {}, but qemu-img info says: {}",
                case.name,
                case.qemu_opens,
                if qemu.status.success() {
                    "opens"
                } else {
                    &qemu_says
                }
            ));
            continue;
        }
        let ours = Qcow2::open(std::fs::File::open(d.join(&file)).unwrap());
        let refused_on_purpose = REFUSED_ON_PURPOSE.contains(&case.name);
        match (&ours, case.qemu_opens && !refused_on_purpose) {
            (Ok(_), true) => {}
            (
                Err(Error::Malformed { .. } | Error::LimitExceeded { .. } | Error::PastEnd { .. }),
                false,
            ) => {}
            (other, _) => failures.push(format!(
                "{}: QEMU {}, the crate gives {:?}",
                case.name,
                if qemu.status.success() {
                    "opens it".to_owned()
                } else {
                    qemu_says
                },
                other.as_ref().map(|i| i.bitmaps().len())
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn accepted_oddities_read_as_qemu_reads_them() {
    let Some(tools) = Tools::find_or_skip("accepted_oddities_read_as_qemu_reads_them") else {
        return;
    };
    let dir = TempDir::new("bitmap-odd");
    let d = dir.path();
    make_bases(&tools, d);
    let patched = |name: &str| {
        let case = CASES.iter().find(|c| c.name == name).unwrap();
        let mut bytes = std::fs::read(d.join(format!("{}.qcow2", case.base))).unwrap();
        (case.patch)(&mut bytes);
        std::fs::write(d.join(format!("{name}.qcow2")), &bytes).unwrap();
        open(d, &format!("{name}.qcow2"))
    };
    // Names as QEMU reads them: empty, cut at a NUL.
    let names =
        |img: &Qcow2<_>| -> Vec<String> { img.bitmaps().iter().map(|b| b.name.clone()).collect() };
    assert_eq!(names(&patched("name-empty")), ["b0", ""]);
    assert_eq!(names(&patched("name-with-nul")), ["b0", "b"]);
    // An in-use duplicate is skipped by QEMU: the name means the first one.
    let img = patched("duplicate-name-in-use");
    assert_eq!(names(&img), ["b0", "b0"]);
    assert_eq!(
        img.bitmap("b0").unwrap().entry_offset,
        img.bitmaps()[0].entry_offset
    );
    let img = patched("table-entry-all-ones");
    compare_all(&tools, d, "table-entry-all-ones.qcow2");
    assert_eq!(ours(&img, "b0", false), [(0, 16 << 20)]);
    // In use: QEMU never reads the table, so opens; the crate refuses the bad entry when
    // asked to read it anyway.
    let img = patched("table-entry-reserved-in-use");
    assert!(matches!(
        img.dirty_extents_allow_in_use("b0"),
        Err(Error::Malformed { .. })
    ));
    let img = patched("table-size-too-small-in-use");
    assert!(matches!(
        img.dirty_extents_allow_in_use("b0"),
        Err(Error::Malformed { .. })
    ));
    // A data cluster past the end of the file: QEMU reads zeros there, the crate refuses,
    // as it refuses guest data clusters past the end.
    let img = patched("data-cluster-past-eof");
    let mut extents = img.dirty_extents("b0").map(|it| it.collect::<Vec<_>>());
    let err = match &mut extents {
        Ok(items) => items.pop().and_then(Result::err),
        Err(_) => extents.err(),
    };
    assert!(
        matches!(
            err,
            Some(Error::Malformed {
                offset: 0x4000_0000,
                ..
            })
        ),
        "{err:?}"
    );
    assert!(qemu_dirty(&tools, d, "data-cluster-past-eof.qcow2", "b0").is_empty());
    // The extents found before such a cluster come first, then the error, then the end.
    let mut bytes = std::fs::read(d.join("base-512.qcow2")).unwrap();
    let (first, second) = (table_entry(&bytes, 0, 0), table_entry(&bytes, 0, 1));
    put64(&mut bytes, first, 1);
    put64(&mut bytes, second, 1 << 30);
    std::fs::write(d.join("ones-then-eof.qcow2"), &bytes).unwrap();
    let img = open(d, "ones-then-eof.qcow2");
    let mut it = img.dirty_extents("b0").unwrap();
    let extent = it.next().unwrap().unwrap();
    assert_eq!((extent.start, extent.length), (0, 2 << 20));
    assert!(matches!(
        it.next(),
        Some(Err(Error::Malformed {
            offset: 0x4000_0000,
            ..
        }))
    ));
    assert!(it.next().is_none());
}

#[test]
fn table_reads_are_bounded_by_limits() {
    let Some(tools) = Tools::find_or_skip("table_reads_are_bounded_by_limits") else {
        return;
    };
    let dir = TempDir::new("bitmap-limits");
    let d = dir.path();
    make_bases(&tools, d);
    let file = || std::fs::File::open(d.join("base-512.qcow2")).unwrap();
    let mut limits = Limits::default();
    limits.max_bitmap_table_bytes = 63; // the table has 8 entries, 64 bytes
    let err = Qcow2::open_with(file(), &OpenOptions::new().limits(limits.clone()));
    assert!(matches!(
        err,
        Err(Error::LimitExceeded { requested: 64, .. })
    ));
    limits.max_bitmap_table_bytes = 64;
    assert!(Qcow2::open_with(file(), &OpenOptions::new().limits(limits)).is_ok());
}

#[cfg(feature = "cli")]
#[test]
fn cli_dump_matches_qemu_nbd() {
    let Some(tools) = Tools::find_or_skip("cli_dump_matches_qemu_nbd") else {
        return;
    };
    let dir = TempDir::new("bitmap-cli");
    let d = dir.path();
    make_bases(&tools, d);
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_qcow2"))
            .current_dir(d)
            .arg("bitmap")
            .args(args)
            .output()
            .unwrap()
    };
    for (image, bitmap) in [
        ("base-64k.qcow2", "b0"),
        ("base-512.qcow2", "b0"),
        ("base-64k.qcow2", "b1"),
    ] {
        let theirs = qemu_dirty(&tools, d, image, bitmap);
        let out = cli(&["--dump", bitmap, "--output=json", image]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let expected: Vec<_> = theirs
            .iter()
            .map(|&(s, l)| serde_json::json!({"start": s, "length": l}))
            .collect();
        assert_eq!(json, serde_json::Value::Array(expected), "{image} {bitmap}");
        let out = cli(&["--dump", bitmap, image]);
        let human: Vec<String> = theirs.iter().map(|(s, l)| format!("{s} {l}")).collect();
        assert_eq!(
            String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .collect::<Vec<_>>(),
            human
        );
    }
    // In use: refused unless allowed.
    tools
        .qemu
        .io_crash(d, "qcow2", "base-64k.qcow2", &["write 8M 4k"]);
    let out = cli(&["--dump", "b0", "base-64k.qcow2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    assert!(cli(&["--dump", "b0", "--allow-in-use", "base-64k.qcow2"])
        .status
        .success());
    std::fs::write(d.join("not.qcow2"), b"hello, not an image").unwrap();
    for (args, says) in [
        (
            &["--dump", "zz", "base-512.qcow2"][..],
            "no bitmap named \"zz\"",
        ),
        (&["--dump", "b0", "not.qcow2"][..], "not a qcow2 image"),
        (&["--dump", "b0", "missing.qcow2"][..], "missing.qcow2"),
    ] {
        let out = cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && out.status.code().is_some(),
            "{args:?}"
        );
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(
            err.contains(says) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}
