//! Images for comparing `qemu-img info` / `qemu-img snapshot -l` with the crate's, and
//! QEMU's own outputs for them. Shared by the modules `info_json` (the library) and
//! `cli_info` (the `qcow2` binary), with `use crate::info_cases;`.
//!
//! Every image is made by `qemu-img`/`qemu-io` in the test, or is a committed fixture; a few
//! have snapshot-table fields patched in place (VM state size, clock, icount, date) that
//! `qemu-img` cannot set. QEMU's outputs are taken with `TZ=UTC`, absolute image paths, and
//! without the lines that depend on the host file system (`actual-size`, `disk size:`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{self, Qemu, TempDir};

/// One image to compare.
pub struct Case {
    /// What it is about.
    pub label: String,
    /// Its absolute path.
    pub image: PathBuf,
    /// Whether its whole backing chain can be opened (`--backing-chain` works).
    pub chain: bool,
    /// Whether every file it names exists: `qemu-img snapshot -l` and `Qcow2::open_path`
    /// open the data file and the backing chain, which `info` does not open.
    pub files_present: bool,
}

/// Fixtures the crate refuses to show (`ImageInfo::from_path` fails).
const REFUSED: &[&str] = &[];

/// Every committed fixture that `qemu-img info` can open without a key (`v3-corrupt` too:
/// it shows `corrupt: true`), and the names of those the crate refuses to show ([`REFUSED`]).
pub fn fixture_cases() -> (Vec<Case>, Vec<PathBuf>) {
    let dir = common::fixtures_dir();
    let mut cases = Vec::new();
    let mut refused = Vec::new();
    for name in common::fixture_images() {
        let image = dir.join(&name);
        // None today: v3-corrupt.qcow2 is shown as qemu-img shows it (`corrupt: true`), the
        // crate refusing only to read its data.
        if REFUSED.contains(&name.as_str()) {
            refused.push(image);
            continue;
        }
        cases.push(Case {
            label: format!("fixture {name}"),
            image,
            chain: true,
            // qemu-img opens encrypted images fully (and so needs their key) for
            // `snapshot -l` and `--backing-chain`'s reads; `info` alone needs none.
            files_present: !["luks.qcow2", "aes.qcow2"].contains(&name.as_str()),
        });
    }
    (cases, refused)
}

/// Fresh images in `dir`, one for each thing `qemu-img info` reports.
pub fn fresh_cases(qemu: &Qemu, dir: &TempDir) -> Vec<Case> {
    let d = dir.path();
    let img = |args: &[&str]| {
        qemu.img(d, args);
    };
    let io = |image: &str, cmds: &[&str]| qemu.io(d, "qcow2", image, cmds);
    let mut cases = Vec::new();
    let mut add = |label: &str, image: &str, chain: bool| {
        cases.push(Case {
            label: label.to_owned(),
            image: d.join(image),
            chain,
            files_present: !["dfgone.qcow2", "orphan.qcow2"].contains(&image),
        })
    };

    // Snapshots: several, one with quotes and non-ASCII in its name (JSON escapes, byte
    // padding in the table), data written between them.
    img(&["create", "-q", "-f", "qcow2", "snaps.qcow2", "2M"]);
    io("snaps.qcow2", &["write -P 1 0 64k"]);
    img(&["snapshot", "-c", "s1", "snaps.qcow2"]);
    io("snaps.qcow2", &["write -P 2 64k 64k"]);
    img(&["snapshot", "-c", "two words \"é\"", "snaps.qcow2"]);
    img(&[
        "snapshot",
        "-c",
        "a-rather-long-snapshot-name",
        "snaps.qcow2",
    ]);
    add("snapshots", "snaps.qcow2", true);

    // Snapshot fields qemu-img cannot set: VM state sizes (one past i64::MAX, which QEMU
    // prints negative), clocks, icounts, dates.
    img(&["create", "-q", "-f", "qcow2", "vmstate.qcow2", "1M"]);
    img(&["snapshot", "-c", "vm1", "vmstate.qcow2"]);
    img(&["snapshot", "-c", "vm2", "vmstate.qcow2"]);
    img(&["snapshot", "-c", "vm3", "vmstate.qcow2"]);
    patch_snapshot(
        &d.join("vmstate.qcow2"),
        0,
        SnapshotPatch {
            date_sec: 0,
            date_nsec: 999_999_999,
            vm_clock_nsec: 100 * 3600 * 1_000_000_000 + 59 * 60 * 1_000_000_000 + 123_456_789,
            vm_state_size: 1_179_648,
            icount: Some(12_345),
        },
    );
    patch_snapshot(
        &d.join("vmstate.qcow2"),
        1,
        SnapshotPatch {
            date_sec: u32::MAX,
            date_nsec: 1,
            vm_clock_nsec: u64::MAX,
            vm_state_size: (1 << 63) + 1,
            icount: Some(u64::MAX - 1),
        },
    );
    patch_snapshot(
        &d.join("vmstate.qcow2"),
        2,
        SnapshotPatch {
            date_sec: 1_000_000_000,
            date_nsec: 0,
            vm_clock_nsec: 999_999_999,
            vm_state_size: 1_023_488,
            icount: None,
        },
    );
    add("snapshots with VM state", "vmstate.qcow2", true);

    // A snapshot taken before a resize.
    img(&["create", "-q", "-f", "qcow2", "resized.qcow2", "1M"]);
    img(&["snapshot", "-c", "small", "resized.qcow2"]);
    img(&["resize", "-q", "resized.qcow2", "3M"]);
    add("snapshot then resize", "resized.qcow2", true);

    // Version 2: no extra snapshot data (no icount), fewer format-specific fields.
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "v2.qcow2",
        "1M",
    ]);
    img(&["snapshot", "-c", "old", "v2.qcow2"]);
    add("v2 with a snapshot", "v2.qcow2", true);

    // Bitmaps: flags, granularities, a non-ASCII name.
    img(&["create", "-q", "-f", "qcow2", "bitmaps.qcow2", "4M"]);
    img(&["bitmap", "--add", "bitmaps.qcow2", "b0"]);
    img(&["bitmap", "--add", "-g", "128K", "bitmaps.qcow2", "b1"]);
    img(&["bitmap", "--disable", "bitmaps.qcow2", "b1"]);
    img(&["bitmap", "--add", "-g", "512", "bitmaps.qcow2", "bitmap é"]);
    add("bitmaps", "bitmaps.qcow2", true);
    // A bitmap left in use by a VM that was killed.
    img(&["create", "-q", "-f", "qcow2", "inuse.qcow2", "1M"]);
    img(&["bitmap", "--add", "inuse.qcow2", "b0"]);
    qemu.io_crash(d, "qcow2", "inuse.qcow2", &["write -P 3 0 4k"]);
    add("bitmap in use", "inuse.qcow2", true);

    // Format options.
    let variants: &[(&str, &str, &str)] = &[
        ("zstd", "zstd.qcow2", "compression_type=zstd"),
        (
            "extended L2",
            "extl2.qcow2",
            "extended_l2=on,cluster_size=16k",
        ),
        ("lazy refcounts", "lazy.qcow2", "lazy_refcounts=on"),
        (
            "refcount bits 1",
            "rc1.qcow2",
            "refcount_bits=1,cluster_size=4k",
        ),
        ("2 MiB clusters", "c2m.qcow2", "cluster_size=2M"),
        ("data file", "df.qcow2", "data_file=df.data"),
        (
            "raw data file",
            "dfraw.qcow2",
            "data_file=dfraw.data,data_file_raw=on",
        ),
        ("data file, gone", "dfgone.qcow2", "data_file=dfgone.data"),
    ];
    for (label, name, options) in variants {
        img(&["create", "-q", "-f", "qcow2", "-o", options, name, "1M"]);
        add(label, name, true);
    }
    std::fs::remove_file(d.join("dfgone.data")).expect("removing dfgone.data");

    // Dirty: a VM killed with lazy refcounts leaves the dirty bit set.
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        "dirty.qcow2",
        "1M",
    ]);
    qemu.io_crash(d, "qcow2", "dirty.qcow2", &["write -P 7 0 4k"]);
    add("dirty", "dirty.qcow2", true);

    // Virtual sizes that exercise size_to_str's rounding and units.
    for size in [
        "512",
        "1024000",
        "1048064",
        "1179648",
        "1047552",
        "10G",
        "1099511628288",
        "64T",
    ] {
        let name = format!("size-{size}.qcow2");
        img(&["create", "-q", "-f", "qcow2", &name, size]);
        add(&format!("virtual size {size}"), &name, true);
    }

    // Backing chains: relative names through a subdirectory, a probed format, a raw base of
    // an odd length.
    std::fs::create_dir(d.join("sub")).expect("creating sub/");
    img(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "../base.qcow2",
        "-F",
        "qcow2",
        "sub/mid.qcow2",
        "2M",
    ]);
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "sub/top.qcow2",
    ]);
    img(&["snapshot", "-c", "top-snap", "sub/top.qcow2"]);
    add("chain top", "sub/top.qcow2", true);
    add("chain middle", "sub/mid.qcow2", true);
    std::fs::write(d.join("odd.raw"), vec![0x5a; 1000]).expect("writing odd.raw");
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "odd.raw",
        "-F",
        "raw",
        "onraw.qcow2",
    ]);
    add("raw backing file", "onraw.qcow2", true);
    let abs_base = d.join("base.qcow2");
    let abs_base = abs_base.to_str().expect("temp dir path is UTF-8");
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        abs_base,
        "-F",
        "qcow2",
        "absolute.qcow2",
    ]);
    add("absolute backing name", "absolute.qcow2", true);
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "missing.qcow2",
        "-F",
        "qcow2",
        "orphan.qcow2",
        "1M",
    ]);
    add("backing file missing", "orphan.qcow2", false);
    cases
}

/// New values for one snapshot table entry.
pub struct SnapshotPatch {
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    /// Written only when the entry has room for it (version 3 entries do).
    pub icount: Option<u64>,
}

/// Overwrite fields of snapshot entry `index` (spec: "Snapshots"; header bytes 60-71 say
/// where the table is).
pub fn patch_snapshot(path: &Path, index: usize, p: SnapshotPatch) {
    let mut bytes = std::fs::read(path).expect("reading the image to patch");
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let be16 = |b: &[u8], at: usize| u16::from_be_bytes(b[at..at + 2].try_into().unwrap());
    let mut at = u64::from_be_bytes(bytes[64..72].try_into().unwrap()) as usize;
    assert!(index < be32(&bytes, 60) as usize, "no snapshot {index}");
    for _ in 0..index {
        let len = 40
            + be32(&bytes, at + 36) as usize
            + usize::from(be16(&bytes, at + 12))
            + usize::from(be16(&bytes, at + 14));
        at += len.next_multiple_of(8);
    }
    let extra = be32(&bytes, at + 36) as usize;
    bytes[at + 16..at + 20].copy_from_slice(&p.date_sec.to_be_bytes());
    bytes[at + 20..at + 24].copy_from_slice(&p.date_nsec.to_be_bytes());
    bytes[at + 24..at + 32].copy_from_slice(&p.vm_clock_nsec.to_be_bytes());
    bytes[at + 32..at + 36].copy_from_slice(&(p.vm_state_size as u32).to_be_bytes());
    if extra >= 8 {
        bytes[at + 40..at + 48].copy_from_slice(&p.vm_state_size.to_be_bytes());
    }
    if extra >= 24 {
        let icount = p.icount.unwrap_or(u64::MAX);
        bytes[at + 56..at + 64].copy_from_slice(&icount.to_be_bytes());
    }
    std::fs::write(path, bytes).expect("writing the patched image");
}

/// `qemu-img ARGS` with `TZ=UTC`, run in `cwd`: its stdout, or its stderr as the error.
///
/// Run it in the image's directory: QEMU opens a data file named by a relative path from its
/// current directory (not the image's), which `qemu-img snapshot -l` does.
pub fn qemu_img_utc(qemu: &Qemu, cwd: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(&qemu.img)
        .env("TZ", "UTC")
        .current_dir(cwd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-img: {e}"));
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("qemu-img prints UTF-8"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `qemu-img info --output=json [--backing-chain] IMAGE` without `actual-size` lines.
pub fn qemu_json(qemu: &Qemu, image: &Path, chain: bool) -> String {
    let out = qemu_info(qemu, image, chain, "json");
    out.lines()
        .filter(|l| !l.trim_start().starts_with("\"actual-size\":"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `qemu-img info [--backing-chain] IMAGE` without `disk size:` lines.
pub fn qemu_human(qemu: &Qemu, image: &Path, chain: bool) -> String {
    let out = qemu_info(qemu, image, chain, "human");
    out.lines()
        .filter(|l| !l.trim_start().starts_with("disk size:"))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn qemu_info(qemu: &Qemu, image: &Path, chain: bool, output: &str) -> String {
    let cwd = image.parent().expect("image in a directory");
    let image = image.to_str().expect("image path is UTF-8");
    let output = format!("--output={output}");
    let mut args = vec!["info", &output];
    if chain {
        args.push("--backing-chain");
    }
    args.push(image);
    qemu_img_utc(qemu, cwd, &args).unwrap_or_else(|e| panic!("qemu-img info {image}: {e}"))
}

/// `qemu-img snapshot -l IMAGE`.
pub fn qemu_snapshots(qemu: &Qemu, image: &Path) -> String {
    let cwd = image.parent().expect("image in a directory");
    let image = image.to_str().expect("image path is UTF-8");
    qemu_img_utc(qemu, cwd, &["snapshot", "-l", image])
        .unwrap_or_else(|e| panic!("qemu-img snapshot -l {image}: {e}"))
}

/// `None` when equal, else the first differing line of each and both texts.
pub fn text_difference(ours: &str, theirs: &str) -> Option<String> {
    if ours == theirs {
        return None;
    }
    let (n, (a, b)) = ours
        .lines()
        .chain(std::iter::repeat("<end>"))
        .zip(theirs.lines().chain(std::iter::repeat("<end>")))
        .enumerate()
        .find(|(_, (a, b))| a != b)
        .unwrap_or((0, ("<same lines>", "<same lines>")));
    Some(format!(
        "line {}: ours {a:?}, qemu {b:?}\n--- ours\n{ours}--- qemu\n{theirs}",
        n + 1
    ))
}
