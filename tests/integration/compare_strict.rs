//! `qcow2 compare -s` against `qemu-img compare -s`, case by case: the same exit status and
//! the same message (which names the offset of the first block status mismatch). QEMU's
//! block status counts holes in raw files and in the data clusters of a
//! `preallocation=metadata` image as zeros, and marks the stretch that reaches the end of
//! the disk, as a stretch of a backing layer never is (issue 19, point 10).

use crate::common;

use std::path::Path;
use std::process::Command;

use common::{Qemu, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_qcow2");

/// Exit status and standard output of a command run in `dir`.
fn outcome(dir: &Path, program: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(program)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Compare `a` and `b` with both tools, with and without `-s`; they must agree. Returns
/// qemu-img's strict outcome.
fn same_as_qemu(qemu: &Qemu, dir: &Path, a: &str, b: &str) -> (Option<i32>, String) {
    let mut strict = None;
    for args in [vec!["compare", "-s", a, b], vec!["compare", a, b]] {
        let theirs = outcome(dir, &qemu.img, &args);
        let ours = outcome(dir, Path::new(BIN), &args);
        assert_eq!(
            ours, theirs,
            "qcow2 {args:?} (left) against qemu-img (right)"
        );
        strict.get_or_insert(theirs);
    }
    strict.unwrap_or_default()
}

fn mismatch(offset: u64) -> (Option<i32>, String) {
    (
        Some(1),
        format!("Strict mode: Offset {offset} block status mismatch!\n"),
    )
}

fn identical() -> (Option<i32>, String) {
    (Some(0), "Images are identical.\n".to_owned())
}

#[test]
fn preallocation_modes_differ_in_block_status_as_qemu_says() {
    let Some(qemu) = Qemu::find_or_skip("preallocation_modes_differ_in_block_status_as_qemu_says")
    else {
        return;
    };
    let dir = TempDir::new("strict-prealloc");
    let d = dir.path();
    for mode in ["off", "metadata", "falloc", "full"] {
        let option = format!("preallocation={mode}");
        let name = format!("{mode}.qcow2");
        qemu.img(
            d,
            &["create", "-q", "-f", "qcow2", "-o", &option, &name, "64M"],
        );
    }
    // A raw file of zeros: sparse (qemu-img allocates its first block) and written out.
    qemu.img(d, &["create", "-q", "-f", "raw", "sparse.raw", "64M"]);
    std::fs::write(dir.join("full.raw"), vec![0u8; 64 << 20]).unwrap();

    // Metadata preallocation leaves its data clusters as holes, which read as zeros.
    assert_eq!(
        same_as_qemu(&qemu, d, "falloc.qcow2", "metadata.qcow2"),
        mismatch(0)
    );
    assert_eq!(
        same_as_qemu(&qemu, d, "full.qcow2", "metadata.qcow2"),
        mismatch(0)
    );
    assert_eq!(
        same_as_qemu(&qemu, d, "metadata.qcow2", "sparse.raw"),
        mismatch(0)
    );
    assert_eq!(
        same_as_qemu(&qemu, d, "metadata.qcow2", "full.raw"),
        mismatch(0)
    );
    assert_eq!(
        same_as_qemu(&qemu, d, "off.qcow2", "metadata.qcow2"),
        mismatch(0)
    );
    assert_eq!(
        same_as_qemu(&qemu, d, "sparse.raw", "full.raw"),
        mismatch(0)
    );
    // Falloc'd and written clusters are both data.
    assert_eq!(
        same_as_qemu(&qemu, d, "falloc.qcow2", "full.qcow2"),
        identical()
    );
    assert_eq!(
        same_as_qemu(&qemu, d, "metadata.qcow2", "metadata.qcow2"),
        identical()
    );
}

#[test]
fn copies_that_differ_only_in_holes_differ_in_block_status() {
    let Some(qemu) = Qemu::find_or_skip("copies_that_differ_only_in_holes_differ_in_block_status")
    else {
        return;
    };
    let dir = TempDir::new("strict-holes");
    let d = dir.path();
    qemu.img(d, &["create", "-q", "-f", "qcow2", "img.qcow2", "64M"]);
    qemu.io(
        d,
        "qcow2",
        "img.qcow2",
        &["write -P 0xab 1M 1M", "write -P 0 8M 4M", "write -z 20M 1M"],
    );
    qemu.img(d, &["convert", "-O", "raw", "img.qcow2", "img.raw"]);
    for (from, never, always) in [
        ("img.qcow2", "never.qcow2", "always.qcow2"),
        ("img.raw", "never.raw", "always.raw"),
    ] {
        for (sparse, to) in [("never", never), ("always", always)] {
            let status = Command::new("cp")
                .current_dir(d)
                .arg(format!("--sparse={sparse}"))
                .args([from, to])
                .status()
                .unwrap();
            assert!(status.success(), "cp --sparse={sparse} {from} {to}");
        }
    }
    // The qcow2 copy with holes now looks preallocated with metadata: its clusters of zeros
    // (written as data) are holes, which read as zeros; the raw one has holes everywhere
    // but in its data.
    assert_eq!(
        same_as_qemu(&qemu, d, "never.qcow2", "always.qcow2"),
        mismatch(8 << 20)
    );
    assert_eq!(
        same_as_qemu(&qemu, d, "never.raw", "always.raw"),
        mismatch(0)
    );
    assert_eq!(
        same_as_qemu(&qemu, d, "img.qcow2", "never.qcow2"),
        identical()
    );
}

#[test]
fn a_top_larger_than_its_backing_file_is_compared_as_qemu_does() {
    let Some(qemu) =
        Qemu::find_or_skip("a_top_larger_than_its_backing_file_is_compared_as_qemu_does")
    else {
        return;
    };
    let dir = TempDir::new("strict-larger-top");
    let d = dir.path();
    qemu.img(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    qemu.io(d, "qcow2", "base.qcow2", &["write -P 1 0 1M"]);
    for top in ["top.qcow2", "empty-top.qcow2"] {
        qemu.img(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                top,
                "128M",
            ],
        );
    }
    qemu.io(d, "qcow2", "top.qcow2", &["write -P 2 100M 1M"]);
    qemu.img(d, &["convert", "-O", "qcow2", "top.qcow2", "flat.qcow2"]);
    qemu.img(d, &["convert", "-O", "raw", "top.qcow2", "flat.raw"]);
    qemu.img(d, &["create", "-q", "-f", "qcow2", "blank.qcow2", "128M"]);
    qemu.img(d, &["create", "-q", "-f", "raw", "blank.raw", "128M"]);
    // The base's unallocated rest ends the base: QEMU keeps that end-of-file flag when no
    // layer has the stretch, and a flat image has no such end there.
    assert_eq!(
        same_as_qemu(&qemu, d, "top.qcow2", "flat.qcow2"),
        mismatch(1 << 20)
    );
    assert_eq!(
        same_as_qemu(&qemu, d, "top.qcow2", "flat.raw"),
        mismatch(1 << 20)
    );
    assert_eq!(
        same_as_qemu(&qemu, d, "top.qcow2", "empty-top.qcow2"),
        mismatch(64 << 20)
    );
    assert_eq!(
        same_as_qemu(&qemu, d, "top.qcow2", "blank.qcow2"),
        mismatch(0)
    );
    // The base's data and the raw file's first block have the same status: the contents
    // differ.
    assert_eq!(
        same_as_qemu(&qemu, d, "empty-top.qcow2", "blank.raw"),
        (Some(1), "Content mismatch at offset 0!\n".to_owned())
    );
}

#[test]
fn layouts_of_one_disk_differ_where_qemu_says() {
    let Some(qemu) = Qemu::find_or_skip("layouts_of_one_disk_differ_where_qemu_says") else {
        return;
    };
    let dir = TempDir::new("strict-layouts");
    let d = dir.path();
    qemu.img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "a.qcow2",
            "1G",
        ],
    );
    qemu.io(
        d,
        "qcow2",
        "a.qcow2",
        &[
            "write -P 1 0 64k",
            "write -z 600M 8M",
            "write -P 2 1020M 4M",
        ],
    );
    let converts: [&[&str]; 5] = [
        &[
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "a.qcow2",
            "same.qcow2",
        ],
        &["-c", "-O", "qcow2", "a.qcow2", "compressed.qcow2"],
        &[
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=128k",
            "a.qcow2",
            "ext.qcow2",
        ],
        &["-O", "raw", "a.qcow2", "a.raw"],
        &[
            "-O",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "a.qcow2",
            "meta.qcow2",
        ],
    ];
    for args in converts {
        let mut all = vec!["convert"];
        all.extend_from_slice(args);
        qemu.img(d, &all);
    }
    qemu.img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "a.raw",
            "-F",
            "raw",
            "over-raw.qcow2",
        ],
    );
    qemu.io(d, "qcow2", "over-raw.qcow2", &["write -P 3 512M 64k"]);
    let pairs = [
        ("a.qcow2", "same.qcow2", mismatch(600 << 20)),
        ("a.qcow2", "compressed.qcow2", mismatch(0)),
        ("a.qcow2", "ext.qcow2", mismatch(64 << 10)),
        ("a.qcow2", "a.raw", mismatch(64 << 10)),
        ("a.qcow2", "meta.qcow2", mismatch(64 << 10)),
        ("meta.qcow2", "a.raw", mismatch(64 << 10)),
        ("ext.qcow2", "compressed.qcow2", mismatch(0)),
        ("over-raw.qcow2", "a.raw", mismatch(512 << 20)),
        ("compressed.qcow2", "compressed.qcow2", identical()),
    ];
    for (a, b, expected) in pairs {
        assert_eq!(same_as_qemu(&qemu, d, a, b), expected, "{a} {b}");
    }
}
