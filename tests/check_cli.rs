//! The `qcow2 check` binary against `qemu-img check`: the same stdout byte for byte (human
//! summary and JSON), the same problem lines on stderr, the same exit status; and one line on
//! stderr, never a panic, for inputs it cannot check. Needs the `cli` feature
//! (`cargo test --features cli`).
#![cfg(feature = "cli")]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{Qemu, TempDir};

fn qcow2(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qcow2"))
        .current_dir(dir)
        .arg("check")
        .args(args)
        .output()
        .expect("running qcow2")
}

fn qemu_img(qemu: &Qemu, dir: &Path, args: &[&str]) -> Output {
    Command::new(&qemu.img)
        .current_dir(dir)
        .arg("check")
        .args(args)
        .output()
        .expect("running qemu-img")
}

/// Stderr lines that report problems: without the tools' own `NAME: ...` messages.
fn problem_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.starts_with("qemu-img:") && !l.starts_with("qcow2:"))
        .map(str::to_owned)
        .collect()
}

fn assert_same_output(qemu: &Qemu, dir: &Path, name: &str) -> i32 {
    for output in [None, Some("--output=json"), Some("--output=human")] {
        let args: Vec<&str> = output.into_iter().chain([name]).collect();
        let ours = qcow2(dir, &args);
        let theirs = qemu_img(qemu, dir, &args);
        assert_eq!(
            String::from_utf8_lossy(&ours.stdout),
            String::from_utf8_lossy(&theirs.stdout),
            "{name} {output:?}: stdout"
        );
        assert_eq!(
            ours.status.code(),
            theirs.status.code(),
            "{name}: exit status"
        );
        assert_eq!(
            problem_lines(&ours),
            problem_lines(&theirs),
            "{name}: stderr"
        );
        if theirs.status.code() == Some(1) {
            let stderr = String::from_utf8_lossy(&ours.stderr);
            assert!(stderr.contains("qcow2: Check failed"), "{name}: {stderr}");
        }
    }
    qcow2(dir, &[name]).status.code().unwrap()
}

/// Patch the 8 bytes at `at` of `dir/name` with `f(old)`.
fn patch_u64(dir: &Path, name: &str, at: usize, f: impl Fn(u64) -> u64) {
    let path = dir.join(name);
    let mut bytes = std::fs::read(&path).unwrap();
    let old = u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    bytes[at..at + 8].copy_from_slice(&f(old).to_be_bytes());
    std::fs::write(&path, bytes).unwrap();
}

fn u64_at(dir: &Path, name: &str, at: usize) -> u64 {
    let bytes = std::fs::read(dir.join(name)).unwrap();
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

#[test]
fn cli_prints_and_exits_as_qemu_img() {
    let Some(qemu) = Qemu::find_or_skip("cli_prints_and_exits_as_qemu_img") else {
        return;
    };
    let tmp = TempDir::new("check-cli");
    let dir = tmp.path();
    let fixtures = common::fixtures_dir();
    for fixture in [
        "zlib-4k-mixed.qcow2",
        "snap.qcow2",
        "v3-corrupt.qcow2",
        "bitmaps.qcow2",
    ] {
        std::fs::copy(fixtures.join(fixture), dir.join(fixture)).unwrap();
        assert_eq!(assert_same_output(&qemu, dir, fixture), 0, "{fixture}");
    }
    // 64 KiB clusters: header, refcount table, refcount block, L1, L2, then data.
    let make = |name: &str| {
        qemu.img(dir, &["create", "-q", "-f", "qcow2", name, "1M"]);
        qemu.io(dir, "qcow2", name, &["write -P 1 0 128k"]);
    };
    let reftable = |name: &str| u64_at(dir, name, 48) as usize;
    let refblock = |name: &str| (u64_at(dir, name, reftable(name)) & !0x1ff) as usize;

    // Leaks only: exit 3.
    make("leak.qcow2");
    let file_len = std::fs::metadata(dir.join("leak.qcow2")).unwrap().len();
    let data = refblock("leak.qcow2") + 2 * (file_len as usize >> 16); // one past the end
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("leak.qcow2"))
        .unwrap()
        .set_len(file_len + 65536)
        .unwrap();
    let mut bytes = std::fs::read(dir.join("leak.qcow2")).unwrap();
    bytes[data..data + 2].copy_from_slice(&1u16.to_be_bytes());
    std::fs::write(dir.join("leak.qcow2"), bytes).unwrap();
    assert_eq!(assert_same_output(&qemu, dir, "leak.qcow2"), 3);

    // Corruptions (and a leak): exit 2.
    make("corrupt.qcow2");
    let rb = refblock("corrupt.qcow2");
    // 16-bit refcounts, big-endian: the L1 table (cluster 3) gets refcount 0, the L2 table
    // (cluster 4) refcount 3.
    patch_u64(dir, "corrupt.qcow2", rb, |old| old & !0xffff);
    patch_u64(dir, "corrupt.qcow2", rb + 8, |old| {
        old | 0x0002_0000_0000_0000
    });
    assert_eq!(assert_same_output(&qemu, dir, "corrupt.qcow2"), 2);

    // A refcount block that cannot be read: check errors, exit 1.
    make("errors.qcow2");
    let at = reftable("errors.qcow2");
    patch_u64(dir, "errors.qcow2", at, |old| old + 0x200);
    assert_eq!(assert_same_output(&qemu, dir, "errors.qcow2"), 1);
}

#[test]
fn cli_fails_cleanly_on_bad_input() {
    if let Some(qemu) = Qemu::find_or_skip("cli_fails_cleanly_on_bad_input") {
        let tmp = TempDir::new("check-cli-raw");
        std::fs::write(tmp.join("text.qcow2"), b"not an image at all").unwrap();
        let theirs = qemu_img(&qemu, tmp.path(), &["text.qcow2"]);
        assert_eq!(theirs.status.code(), Some(63), "qemu-img on a raw file");
        let theirs = qemu_img(&qemu, tmp.path(), &["-f", "qcow2", "text.qcow2"]);
        assert_eq!(
            theirs.status.code(),
            Some(1),
            "qemu-img -f qcow2 on a raw file"
        );
    }
    let tmp = TempDir::new("check-cli-bad");
    let dir = tmp.path();
    std::fs::write(dir.join("text.qcow2"), b"not an image at all").unwrap();
    std::fs::write(dir.join("empty.qcow2"), b"").unwrap();
    // Not qcow2: qemu-img probes it as raw, which has no check (status 63).
    for (args, status) in [
        (&["missing.qcow2"][..], 1),
        (&["text.qcow2"], 63),
        (&["empty.qcow2"], 63),
        (&["-f", "raw", "text.qcow2"], 1),
        (&["-f", "qcow2", "text.qcow2"], 1),
        (&["."], 1),
    ] {
        let out = qcow2(dir, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(status), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("qcow2: "), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}
