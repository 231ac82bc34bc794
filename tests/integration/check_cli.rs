//! The `qcow2 check` binary against `qemu-img check`: the same stdout byte for byte (human
//! summary and JSON), the same problem lines on stderr, the same exit status; and one line on
//! stderr, never a panic, for inputs it cannot check. Needs the `cli` feature
//! (`cargo test --features cli`).

use crate::common;

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

/// qemu-img's and the crate's stderr, less the `NAME: ` prefix of their one message.
fn message(out: &Output, tool: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let prefix = format!("{tool}: ");
    stderr
        .lines()
        .map(|l| l.strip_prefix(&prefix).unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Both tools fail to open the image (`args`, run in `dir`), with the same message.
fn assert_same_open_failure(qemu: &Qemu, dir: &Path, args: &[&str], theirs_args: &[&str]) {
    for output in [None, Some("--output=json")] {
        let ours_args: Vec<&str> = output.into_iter().chain(args.iter().copied()).collect();
        let q_args: Vec<&str> = output
            .into_iter()
            .chain(theirs_args.iter().copied())
            .collect();
        let ours = qcow2(dir, &ours_args);
        let theirs = qemu_img(qemu, dir, &q_args);
        assert_eq!(theirs.status.code(), Some(1), "{q_args:?}: qemu-img status");
        assert_eq!(ours.status.code(), Some(1), "{ours_args:?}: status");
        assert_eq!(
            message(&ours, "qcow2"),
            message(&theirs, "qemu-img"),
            "{ours_args:?}: message"
        );
        assert!(
            ours.stdout.is_empty() && theirs.stdout.is_empty(),
            "{args:?}"
        );
    }
}

/// qemu-img check opens the whole chain: a backing file or data file that cannot be opened
/// fails the check (status 1), with qemu-img's message.
#[test]
fn cli_opens_the_chain_as_qemu_img() {
    let Some(qemu) = Qemu::find_or_skip("cli_opens_the_chain_as_qemu_img") else {
        return;
    };
    let tmp = TempDir::new("check-cli-chain");
    let dir = tmp.path();
    let create = |args: &[&str]| {
        let mut all = vec!["create", "-q", "-f", "qcow2"];
        all.extend_from_slice(args);
        qemu.img(dir, &all);
    };
    // A sound chain checks as the top image alone.
    create(&["base.qcow2", "1M"]);
    create(&["-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
    create(&["-b", "top.qcow2", "-F", "qcow2", "top2.qcow2"]);
    assert_eq!(assert_same_output(&qemu, dir, "top2.qcow2"), 0);
    // The base is missing: one and two levels down, and named through a directory.
    std::fs::remove_file(dir.join("base.qcow2")).unwrap();
    assert_same_open_failure(&qemu, dir, &["top.qcow2"], &["top.qcow2"]);
    assert_same_open_failure(&qemu, dir, &["top2.qcow2"], &["top2.qcow2"]);
    let parent = dir.parent().unwrap();
    let name = dir.file_name().unwrap().to_str().unwrap();
    let nested = format!("{name}/top2.qcow2");
    assert_same_open_failure(&qemu, parent, &[&nested], &[&nested]);
    // An absolute name, and a raw backing file.
    create(&[
        "-u",
        "-b",
        "/nonexistent/base.qcow2",
        "-F",
        "qcow2",
        "abs.qcow2",
        "1M",
    ]);
    assert_same_open_failure(&qemu, dir, &["abs.qcow2"], &["abs.qcow2"]);
    create(&["-u", "-b", "missing.raw", "-F", "raw", "raw.qcow2", "1M"]);
    assert_same_open_failure(&qemu, dir, &["raw.qcow2"], &["raw.qcow2"]);
    // A backing format QEMU does not know, whether the file is there or not.
    for (name, backing) in [
        ("fmt.qcow2", "here.qcow2"),
        ("fmt-gone.qcow2", "gone.qcow2"),
    ] {
        create(&["here.qcow2", "1M"]);
        create(&["-b", "here.qcow2", "-F", "qcow2", name]);
        let mut bytes = std::fs::read(dir.join(name)).unwrap();
        let at = bytes.windows(5).position(|w| w == b"qcow2").unwrap();
        bytes[at..at + 5].copy_from_slice(b"qcow9");
        std::fs::write(dir.join(name), bytes).unwrap();
        if backing == "gone.qcow2" {
            std::fs::remove_file(dir.join("here.qcow2")).unwrap();
        }
        assert_same_open_failure(&qemu, dir, &[name], &[name]);
    }
    // A backing file that is not qcow2.
    std::fs::write(dir.join("junk.bin"), b"not an image").unwrap();
    create(&["-u", "-b", "junk.bin", "-F", "qcow2", "junk.qcow2", "1M"]);
    assert_same_open_failure(&qemu, dir, &["junk.qcow2"], &["junk.qcow2"]);
    // An external data file that is missing, and the data-file bit without a data file.
    create(&["-o", "data_file=data.raw", "df.qcow2", "1M"]);
    assert_eq!(assert_same_output(&qemu, dir, "df.qcow2"), 0);
    std::fs::copy(dir.join("df.qcow2"), dir.join("df-unnamed.qcow2")).unwrap();
    std::fs::remove_file(dir.join("data.raw")).unwrap();
    assert_same_open_failure(&qemu, dir, &["df.qcow2"], &["df.qcow2"]);
    let mut bytes = std::fs::read(dir.join("df-unnamed.qcow2")).unwrap();
    // The data file name extension (0x44415441) becomes an unknown one, ignored.
    let at = bytes
        .windows(4)
        .position(|w| w == 0x4441_5441u32.to_be_bytes())
        .unwrap();
    bytes[at..at + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    std::fs::write(dir.join("df-unnamed.qcow2"), bytes).unwrap();
    assert_same_open_failure(&qemu, dir, &["df-unnamed.qcow2"], &["df-unnamed.qcow2"]);
}

/// An encrypted image is checked with its secret: `--object secret` (or `--secret-file`)
/// with a plain file name, or `--image-opts` naming it, as qemu-img takes it.
#[test]
fn cli_checks_a_luks_image_with_its_secret() {
    let Some(qemu) = Qemu::find_or_skip("cli_checks_a_luks_image_with_its_secret") else {
        return;
    };
    let tmp = TempDir::new("check-cli-luks");
    let dir = tmp.path();
    let secret = "secret,id=sec0,data=abc";
    qemu.img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            secret,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            "luks.qcow2",
            "1M",
        ],
    );
    let opts = "driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=sec0";
    let io = std::process::Command::new(&qemu.io)
        .current_dir(dir)
        .args([
            "--object",
            secret,
            "--image-opts",
            opts,
            "-c",
            "write -P 3 0 64k",
        ])
        .output()
        .unwrap();
    assert!(io.status.success(), "{io:?}");
    std::fs::write(dir.join("secret.txt"), b"abc").unwrap();
    for output in ["--output=human", "--output=json"] {
        let theirs = qemu_img(
            &qemu,
            dir,
            &[output, "--object", secret, "--image-opts", opts],
        );
        assert_eq!(theirs.status.code(), Some(0), "{theirs:?}");
        let stdout = String::from_utf8_lossy(&theirs.stdout);
        assert!(stdout.contains("allocated") || stdout.contains("allocated-clusters"));
        // Ours names the image as qemu-img did: by the options, or by its file name.
        for args in [
            vec![output, "--object", secret, "--image-opts", opts],
            vec![output, "--object", secret, "luks.qcow2"],
            vec![output, "--secret-file", "secret.txt", "luks.qcow2"],
        ] {
            let ours = qcow2(dir, &args);
            assert_eq!(ours.status.code(), Some(0), "{args:?}: {ours:?}");
            let named = args.last().unwrap();
            assert_eq!(
                String::from_utf8_lossy(&ours.stdout),
                stdout.replace(opts, named),
                "{args:?}"
            );
        }
    }
    // Without the secret, or with a wrong one: qemu-img's message, status 1.
    assert_same_open_failure(&qemu, dir, &["luks.qcow2"], &["luks.qcow2"]);
    let wrong = ["--object", "secret,id=sec0,data=abd", "--image-opts", opts];
    assert_same_open_failure(&qemu, dir, &wrong, &wrong);
}

/// A refcount table entry with bit 63 set (an offset bit for QEMU, past what it may read):
/// qemu-img prints its whole report, a "Can't get refcount" line per cluster, status 1.
#[test]
fn cli_reports_an_unreadable_refcount_block_as_qemu_img() {
    let Some(qemu) = Qemu::find_or_skip("cli_reports_an_unreadable_refcount_block_as_qemu_img")
    else {
        return;
    };
    let tmp = TempDir::new("check-cli-bit63");
    let dir = tmp.path();
    qemu.img(dir, &["create", "-q", "-f", "qcow2", "bit63.qcow2", "1M"]);
    qemu.io(dir, "qcow2", "bit63.qcow2", &["write -P 1 0 128k"]);
    let at = u64_at(dir, "bit63.qcow2", 48) as usize;
    patch_u64(dir, "bit63.qcow2", at, |old| old | 1 << 63);
    assert_eq!(assert_same_output(&qemu, dir, "bit63.qcow2"), 1);
    let out = qcow2(dir, &["bit63.qcow2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Can't get refcount for cluster 0: Input/output error"),
        "{stderr}"
    );
}
