//! `qcow2 convert -O qcow2` against `qemu-img convert -O qcow2` with the same arguments: exit
//! codes and messages, the new image clean under `qemu-img check` (no leaks), identical to
//! its source under `qemu-img compare`, the same `qemu-img info` (sizes on disk aside) and a
//! file no larger than qemu-img's by more than 10% (3% compressed). Standard input as a
//! source, and `-B` overlays.

use crate::common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{Qemu, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_qcow2");

fn run(program: &Path, dir: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `qemu-img info --output=json` without what depends on the file rather than the image.
fn info(qemu: &Qemu, dir: &Path, image: &str) -> serde_json::Value {
    let o = run(&qemu.img, dir, &["info", "--output=json", image]);
    assert!(o.status.success(), "info {image}: {}", text(&o.stderr));
    let mut v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let obj = v.as_object_mut().unwrap();
    for key in ["actual-size", "filename", "dirty-flag"] {
        obj.remove(key);
    }
    obj.remove("children");
    v
}

/// `qemu-img check` of `image` finds nothing: no errors, no leaks.
fn assert_clean(qemu: &Qemu, dir: &Path, image: &str) {
    let o = run(&qemu.img, dir, &["check", image]);
    let out = text(&o.stdout);
    assert!(
        o.status.success()
            && out.contains("No errors were found on the image.")
            && !out.contains("leaked"),
        "qemu-img check {image}: {out}{}",
        text(&o.stderr)
    );
}

fn assert_identical(qemu: &Qemu, dir: &Path, a: &str, b: &str) {
    let o = run(&qemu.img, dir, &["compare", a, b]);
    assert!(
        o.status.success(),
        "qemu-img compare {a} {b}: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
}

/// Convert `source` (a path relative to `dir`) with `args` by both tools and compare the
/// results.
fn both(qemu: &Qemu, dir: &Path, source: &str, args: &[&str], compressed: bool) {
    let mut ours_args = vec!["convert", "-O", "qcow2"];
    ours_args.extend_from_slice(args);
    ours_args.extend([source, "ours.qcow2"]);
    let o = run(Path::new(BIN), dir, &ours_args);
    assert!(
        o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
        "qcow2 {ours_args:?}: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    let mut their_args = ours_args.clone();
    *their_args.last_mut().unwrap() = "theirs.qcow2";
    let t = run(&qemu.img, dir, &their_args);
    assert!(
        t.status.success(),
        "qemu-img {their_args:?}: {}",
        text(&t.stderr)
    );
    assert_clean(qemu, dir, "ours.qcow2");
    assert_identical(qemu, dir, source, "ours.qcow2");
    assert_eq!(
        info(qemu, dir, "ours.qcow2"),
        info(qemu, dir, "theirs.qcow2"),
        "qemu-img info after {ours_args:?}"
    );
    let len = |name: &str| std::fs::metadata(dir.join(name)).unwrap().len();
    let (ours, theirs) = (len("ours.qcow2"), len("theirs.qcow2"));
    let slack = if compressed { 1.03 } else { 1.10 };
    assert!(
        ours as f64 <= theirs as f64 * slack,
        "{ours_args:?}: our file is {ours} bytes, qemu-img's {theirs}"
    );
}

/// A raw file of text-like data with holes, zero runs and noise, in `dir`.
fn raw_source(dir: &Path) -> &'static str {
    let mut rng = common::Rng::new(22);
    let mut data = vec![0u8; 6 << 20];
    let words: [&[u8]; 5] = [b"qcow2 ", b"image ", b"cluster ", b"QEMU ", b"table\n"];
    let mut at = 0;
    while at < 2 << 20 {
        let w = words[rng.below(words.len() as u64) as usize];
        data[at..at + w.len()].copy_from_slice(w);
        at += w.len();
    }
    for b in &mut data[(3 << 20)..(3 << 20) + 300_000] {
        *b = rng.next_u64() as u8;
    }
    data[(5 << 20) + 4096..(5 << 20) + 4100].copy_from_slice(b"tail");
    std::fs::write(dir.join("source.raw"), &data).unwrap();
    "source.raw"
}

#[test]
fn cli_convert_to_qcow2_matches_qemu_img() {
    let Some(qemu) = Qemu::find_or_skip("cli_convert_to_qcow2_matches_qemu_img") else {
        return;
    };
    let dir = TempDir::new("cli-convert-qcow2");
    let raw = raw_source(dir.path());
    for name in [
        "zlib-4k-mixed.qcow2",
        "chain-top.qcow2",
        "snap.qcow2",
        "v3-64k-basic.qcow2",
    ] {
        let from = common::fixture(name);
        let local = format!("src-{name}");
        // The chain's backing names are relative: convert from the fixtures themselves.
        let source = if name == "chain-top.qcow2" {
            from.to_str().unwrap().to_owned()
        } else {
            std::fs::copy(&from, dir.join(&local)).unwrap();
            local
        };
        both(&qemu, dir.path(), &source, &[], false);
        both(&qemu, dir.path(), &source, &["-c"], true);
    }
    let cases: &[(&[&str], bool)] = &[
        (&[], false),
        (&["-c"], true),
        (&["-c", "-o", "compression_type=zstd"], true),
        (&["-o", "cluster_size=4k,refcount_bits=1"], false),
        (&["-o", "compat=0.10", "-S", "0"], false),
        (&["-o", "cluster_size=512", "-c", "-m", "1"], true),
        (&["-o", "cluster_size=2M,lazy_refcounts=on", "-W"], false),
        (&["-o", "extended_l2=on,cluster_size=128k"], false),
        (&["-f", "raw", "-o", "refcount_bits=64"], false),
        // A preallocated image, filled where its clusters are mapped already.
        (&["-o", "preallocation=metadata"], false),
        (&["-o", "preallocation=falloc,cluster_size=16k"], false),
        (&["-o", "preallocation=full"], false),
        // Flushed at the end, as qemu-img flushes with any cache mode but `unsafe`.
        (&["-t", "writeback", "-T", "none"], false),
    ];
    for (args, compressed) in cases {
        both(&qemu, dir.path(), raw, args, *compressed);
    }
}

/// What qemu-img refuses, refused in its words and with its exit code, leaving no file.
#[test]
fn cli_convert_to_qcow2_refuses_what_qemu_img_refuses() {
    let Some(qemu) = Qemu::find_or_skip("cli_convert_to_qcow2_refuses_what_qemu_img_refuses")
    else {
        return;
    };
    let dir = TempDir::new("cli-convert-qcow2-refusals");
    let raw = raw_source(dir.path());
    std::fs::write(dir.join("small-target"), b"").unwrap();
    let made = run(
        &qemu.img,
        dir.path(),
        &["create", "-q", "-f", "qcow2", "small.qcow2", "1M"],
    );
    assert!(made.status.success());
    let cases: &[&[&str]] = &[
        &["-O", "vdi2", raw, "out"],
        &["-c", "-O", "raw", raw, "out"],
        &["-O", "raw", "-B", "x", "-F", "raw", raw, "out"],
        &["-O", "raw", "-o", "cluster_size=4k", raw, "out"],
        &["-O", "qcow2", "-o", "cluster_size=3k", raw, "out"],
        &["-O", "qcow2", "-o", "bogus=1", raw, "out"],
        &[
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,compression_type=zstd",
            raw,
            "out",
        ],
        &["-O", "qcow2", "-o", "refcount_bits=3", raw, "out"],
        &["-O", "qcow2", "-t", "bogus", raw, "out"],
        &[
            "-O",
            "qcow2",
            "-c",
            "-o",
            "preallocation=metadata",
            raw,
            "out",
        ],
        &[
            "-O",
            "qcow2",
            "-n",
            "-o",
            "cluster_size=4k",
            raw,
            "small.qcow2",
        ],
        &["-O", "qcow2", "missing.raw", "out"],
        &[
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s1",
            raw,
            "out",
        ],
    ];
    for args in cases {
        let mut all = vec!["convert"];
        all.extend_from_slice(args);
        let o = run(Path::new(BIN), dir.path(), &all);
        assert!(!dir.join("out").exists(), "{all:?} left a file");
        // qemu-img leaves its new file behind on some of these (a bad -t): ours does not.
        let t = run(&qemu.img, dir.path(), &all);
        let _ = std::fs::remove_file(dir.join("out"));
        assert_eq!(
            o.status.code(),
            t.status.code(),
            "{all:?}: ours {}, qemu-img {}",
            text(&o.stderr),
            text(&t.stderr)
        );
        assert_eq!(o.status.code(), Some(1), "{all:?}");
        let ours = text(&o.stderr).replacen("qcow2: ", "", 1);
        let theirs = text(&t.stderr).replacen("qemu-img: ", "", 1);
        if args.contains(&"missing.raw") {
            // The cause is worded by each program's own I/O layer.
            let prefix = "Could not open 'missing.raw': ";
            assert!(
                ours.starts_with(prefix) && theirs.starts_with(prefix),
                "{ours} / {theirs}"
            );
        } else {
            assert_eq!(ours, theirs, "{all:?}");
        }
    }
    // Into an image smaller than the source: refused, the image left as it was.
    let before = std::fs::read(dir.join("small.qcow2")).unwrap();
    let o = run(
        Path::new(BIN),
        dir.path(),
        &["convert", "-n", "-O", "qcow2", raw, "small.qcow2"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("output file is smaller than input file"),
        "{}",
        text(&o.stderr)
    );
    assert_eq!(std::fs::read(dir.join("small.qcow2")).unwrap(), before);
}

/// `xz -dc disk.raw.xz | qcow2 convert -f raw -O qcow2 - disk.qcow2`: raw bytes from a pipe
/// become an image as long as the stream.
#[test]
fn cli_convert_reads_standard_input() {
    let Some(qemu) = Qemu::find_or_skip("cli_convert_reads_standard_input") else {
        return;
    };
    let dir = TempDir::new("cli-convert-stdin");
    let raw = raw_source(dir.path());
    let bytes = std::fs::read(dir.join(raw)).unwrap();
    for args in [&["-f", "raw"][..], &["-c"][..]] {
        let mut cmd = Command::new(BIN);
        cmd.current_dir(dir.path()).arg("convert").args(args);
        cmd.args(["-O", "qcow2", "-", "piped.qcow2"]);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let feed = bytes.clone();
        let writer = std::thread::spawn(move || {
            for piece in feed.chunks(100_003) {
                stdin.write_all(piece).unwrap();
            }
        });
        let o = child.wait_with_output().unwrap();
        writer.join().unwrap();
        assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
        assert_clean(&qemu, dir.path(), "piped.qcow2");
        assert_identical(&qemu, dir.path(), raw, "piped.qcow2");
        let size = info(&qemu, dir.path(), "piped.qcow2")["virtual-size"].as_u64();
        assert_eq!(size, Some(bytes.len() as u64));
    }
}

/// `-B BACKING -F FMT`: an overlay holding only what the source's top image holds, as
/// qemu-img makes it.
#[test]
fn cli_convert_overlay_matches_qemu_img() {
    let Some(qemu) = Qemu::find_or_skip("cli_convert_overlay_matches_qemu_img") else {
        return;
    };
    let dir = TempDir::new("cli-convert-overlay");
    for name in ["chain-top.qcow2", "chain-mid.qcow2", "chain-base.qcow2"] {
        std::fs::copy(common::fixture(name), dir.join(name)).unwrap();
    }
    let args = [
        "convert",
        "-O",
        "qcow2",
        "-B",
        "chain-mid.qcow2",
        "-F",
        "qcow2",
    ];
    let mut ours = args.to_vec();
    ours.extend(["chain-top.qcow2", "ours.qcow2"]);
    let o = run(Path::new(BIN), dir.path(), &ours);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let mut theirs = args.to_vec();
    theirs.extend(["chain-top.qcow2", "theirs.qcow2"]);
    let t = run(&qemu.img, dir.path(), &theirs);
    assert!(t.status.success(), "{}", text(&t.stderr));
    assert_clean(&qemu, dir.path(), "ours.qcow2");
    assert_identical(&qemu, dir.path(), "chain-top.qcow2", "ours.qcow2");
    assert_eq!(
        info(&qemu, dir.path(), "ours.qcow2"),
        info(&qemu, dir.path(), "theirs.qcow2")
    );
    let map = |image: &str| {
        let o = run(&qemu.img, dir.path(), &["map", "--output=json", image]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        // Where the top layer holds data, and where it leaves reads to the backing file.
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["start"].clone(),
                    e["length"].clone(),
                    e["depth"].clone(),
                    e["zero"].clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(map("ours.qcow2"), map("theirs.qcow2"));
}
