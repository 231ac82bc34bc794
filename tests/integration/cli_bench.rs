//! `qcow2 bench` against `qemu-img bench` with the same arguments: the same lines before the
//! timing line, the same exit status and messages for every refusal, and, for writes, images
//! that `qemu-img compare` finds identical to qemu-img's and `qemu-img check` finds clean.

use crate::common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{Env, Qemu};

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

/// stdout with the seconds of `Run completed in S seconds.` taken out (they differ).
fn untimed(stdout: &[u8]) -> String {
    text(stdout)
        .lines()
        .map(|l| match l.strip_prefix("Run completed in ") {
            Some(rest) if rest.ends_with(" seconds.") => "Run completed in S seconds.".into(),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `bench ARGS IMAGE` by qemu-img on `theirs` and by the crate on `ours`: the same stdout
/// (timing aside) and the same success. Returns both outputs.
fn both(qemu: &Qemu, dir: &Path, args: &[&str], theirs: &str, ours: &str) -> (Output, Output) {
    let mut their_args = vec!["bench"];
    their_args.extend_from_slice(args);
    let mut our_args = their_args.clone();
    their_args.push(theirs);
    our_args.push(ours);
    let t = run(&qemu.img, dir, &their_args);
    let o = run(Path::new(BIN), dir, &our_args);
    assert_eq!(
        untimed(&o.stdout),
        untimed(&t.stdout),
        "stdout of bench {args:?}\nqemu-img stderr: {}\nour stderr: {}",
        text(&t.stderr),
        text(&o.stderr)
    );
    assert_eq!(
        o.status.success(),
        t.status.success(),
        "exit of bench {args:?}: ours {}, qemu-img {}\nour stderr: {}\nqemu-img stderr: {}",
        o.status,
        t.status,
        text(&o.stderr),
        text(&t.stderr)
    );
    (t, o)
}

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

/// Every refusal qemu-img makes before it sends a request: the same message (after the
/// program's name) and exit status 1, nothing on stdout.
#[test]
fn bench_refuses_what_qemu_img_refuses() {
    let Some(env) = Env::new("bench_refuses_what_qemu_img_refuses") else {
        return;
    };
    env.create("a.qcow2", 64 << 20, "");
    let cases: &[&[&str]] = &[
        &["-c", "0"],
        &["-c", "-1"],
        &["-c", "1k"],
        &["-c", "3000000000"],
        &["-d", "0"],
        &["-d", "x"],
        &["-s", "0"],
        &["-s", "3G"],
        &["-s", "1.5x"],
        &["-S", "-1"],
        &["-S", "2G"],
        &["-o", "-1"],
        &["-o", "abc"],
        &["--pattern=256", "-w"],
        &["--pattern=abc", "-w"],
        &["--flush-interval=-1", "-w"],
        &["--flush-interval=1k", "-w"],
        &["--flush-interval=64"],
        &["-w", "--flush-interval=16"],
        &["-w", "-d", "32", "--flush-interval=31"],
        &["-t", "bogus"],
        &["-i", "bogus"],
        &["-i", "native"],
        &["-n", "-w"],
        &["--image-opts", "-f", "qcow2"],
    ];
    for args in cases {
        let (t, o) = both(&env.qemu, env.dir.path(), args, "a.qcow2", "a.qcow2");
        assert!(!o.status.success(), "{args:?} was accepted");
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let theirs = text(&t.stderr);
        let ours = text(&o.stderr);
        assert_eq!(
            ours.trim_end().strip_prefix("qcow2: "),
            theirs.trim_end().strip_prefix("qemu-img: "),
            "stderr of bench {args:?}"
        );
    }
}

/// Reads: the same lines for qemu-img's defaults and for sizes, steps and offsets that are
/// not aligned and wrap around the end; a first request past the end fails in both.
#[test]
fn bench_reads_print_what_qemu_img_prints() {
    let Some(env) = Env::new("bench_reads_print_what_qemu_img_prints") else {
        return;
    };
    env.create("r.qcow2", 4 << 20, "cluster_size=4096");
    env.io("r.qcow2", &["write -P 0x11 0 1M", "write -P 0x22 3M 512k"]);
    let cases: &[&[&str]] = &[
        &["-c", "2000"],
        &[
            "-f", "qcow2", "-c", "0x100", "-s", "1000", "-S", "3000", "-o", "513",
        ],
        &["-c", "010", "-d", "1", "-s", "64k", "-S", "0"],
        &[
            "-c", "64", "-s", "1M", "-o", "3M", "-t", "none", "-i", "threads",
        ],
        &[
            "-c",
            "100",
            "-q",
            "-U",
            "-t",
            "unsafe",
            "-d",
            "3",
            "--no-drain",
        ],
        &["-c", "3", "-o", "4M"],
        &["-c", "3", "-o", "1T"],
    ];
    for args in cases {
        both(&env.qemu, env.dir.path(), args, "r.qcow2", "r.qcow2");
    }
    let opts = "driver=qcow2,file.filename=r.qcow2";
    both(
        &env.qemu,
        env.dir.path(),
        &["--image-opts", "-c", "9"],
        opts,
        opts,
    );
}

/// Writes: the same lines, then images qemu-img finds identical to its own and clean, for
/// fresh images of several kinds, the flush options, the cache modes, and requests that are
/// not aligned, cross clusters and wrap around the end.
#[test]
fn bench_writes_leave_the_image_qemu_img_leaves() {
    let Some(env) = Env::new("bench_writes_leave_the_image_qemu_img_leaves") else {
        return;
    };
    let kinds = [
        ("v3.qcow2", ""),
        ("v2.qcow2", "compat=0.10"),
        ("c512.qcow2", "cluster_size=512"),
        ("c2m.qcow2", "cluster_size=2M"),
        ("xl2.qcow2", "extended_l2=on"),
        ("r1.qcow2", "refcount_bits=1,lazy_refcounts=on"),
    ];
    for (name, opts) in kinds {
        env.create(name, 8 << 20, opts);
    }
    let cases: &[&[&str]] = &[
        &["-w", "-c", "200", "-s", "4K", "-S", "64K"],
        &["-w", "-c", "8", "-s", "1M", "--pattern=0xa5"],
        &[
            "-w",
            "-c",
            "300",
            "-s",
            "1000",
            "-S",
            "70001",
            "-o",
            "513",
            "--pattern=7",
        ],
        &[
            "-w",
            "-c",
            "100",
            "-s",
            "4K",
            "-S",
            "64K",
            "-d",
            "16",
            "--flush-interval=16",
        ],
        &[
            "-w",
            "-c",
            "50",
            "-d",
            "4",
            "--flush-interval=7",
            "--no-drain",
            "-t",
            "writethrough",
        ],
        &[
            "-w",
            "-c",
            "40",
            "-d",
            "1",
            "--flush-interval=1",
            "-t",
            "unsafe",
            "-S",
            "200k",
        ],
        &[
            "-w",
            "-c",
            "85",
            "-s",
            "64k",
            "-S",
            "96k",
            "-t",
            "directsync",
            "-i",
            "threads",
        ],
    ];
    for (k, args) in cases.iter().enumerate() {
        for (name, _) in kinds {
            let theirs = format!("theirs-{k}-{name}");
            let ours = format!("ours-{k}-{name}");
            env.copy(name, &theirs);
            env.copy(name, &ours);
            both(&env.qemu, env.dir.path(), args, &theirs, &ours);
            assert_identical(&env.qemu, env.dir.path(), &theirs, &ours);
            assert_clean(&env.qemu, env.dir.path(), &ours);
        }
    }
}

/// Several threads sending the requests (the hidden `--threads`) write what one does.
#[test]
fn bench_writes_on_threads_leave_the_same_image() {
    let Some(env) = Env::new("bench_writes_on_threads_leave_the_same_image") else {
        return;
    };
    env.create("t.qcow2", 16 << 20, "cluster_size=4096");
    let cases: &[&[&str]] = &[
        &[
            "-w",
            "-c",
            "2000",
            "-s",
            "3000",
            "-S",
            "5000",
            "--pattern=0x3c",
        ],
        &[
            "-w",
            "-c",
            "999",
            "-s",
            "4K",
            "-S",
            "12K",
            "-d",
            "8",
            "--flush-interval=8",
        ],
        &[
            "-w",
            "-c",
            "999",
            "-s",
            "4K",
            "-d",
            "8",
            "--flush-interval=10",
            "--no-drain",
        ],
    ];
    for (k, args) in cases.iter().enumerate() {
        let theirs = format!("theirs-{k}.qcow2");
        env.copy("t.qcow2", &theirs);
        let out = run(
            &env.qemu.img,
            env.dir.path(),
            &[&["bench"], *args, &[&theirs]].concat(),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        for threads in ["2", "4"] {
            let ours = format!("ours-{k}-{threads}.qcow2");
            env.copy("t.qcow2", &ours);
            let our_args = [&["bench", "--threads", threads], *args, &[&ours]].concat();
            let o = run(Path::new(BIN), env.dir.path(), &our_args);
            assert!(o.status.success(), "{our_args:?}: {}", text(&o.stderr));
            assert_eq!(untimed(&o.stdout), untimed(&out.stdout));
            assert_identical(&env.qemu, env.dir.path(), &theirs, &ours);
            assert_clean(&env.qemu, env.dir.path(), &ours);
        }
    }
}

/// An encrypted image (LUKS), unlocked with `--object secret` (which qemu-img bench does not
/// take): the crate's writes read back, through QEMU, as qemu-img bench's on a plain image.
#[cfg(feature = "encryption")]
#[test]
fn bench_writes_into_a_luks_image_with_its_secret() {
    let Some(env) = Env::new("bench_writes_into_a_luks_image_with_its_secret") else {
        return;
    };
    let secret = "secret,id=sec0,data=bench-pass";
    env.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        secret,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "ours.qcow2",
        "8M",
    ]);
    env.create("theirs.qcow2", 8 << 20, "");
    let args = [
        "-w",
        "-c",
        "300",
        "-s",
        "1000",
        "-S",
        "70001",
        "-o",
        "513",
        "--pattern=7",
    ];
    let t = run(
        &env.qemu.img,
        env.dir.path(),
        &[&["bench"], &args[..], &["theirs.qcow2"]].concat(),
    );
    assert!(t.status.success(), "{}", text(&t.stderr));
    let ours = "driver=qcow2,file.filename=ours.qcow2,encrypt.key-secret=sec0";
    let our_args = [
        &["bench", "--object", secret],
        &args[..],
        &["--image-opts", ours],
    ]
    .concat();
    let o = run(Path::new(BIN), env.dir.path(), &our_args);
    assert!(o.status.success(), "{our_args:?}: {}", text(&o.stderr));
    assert_eq!(untimed(&o.stdout), untimed(&t.stdout));
    let theirs = "driver=qcow2,file.filename=theirs.qcow2";
    let cmp = run(
        &env.qemu.img,
        env.dir.path(),
        &["compare", "--object", secret, "--image-opts", ours, theirs],
    );
    assert!(
        cmp.status.success(),
        "{}{}",
        text(&cmp.stdout),
        text(&cmp.stderr)
    );
    let check = run(
        &env.qemu.img,
        env.dir.path(),
        &["check", "--object", secret, "--image-opts", ours],
    );
    let out = text(&check.stdout);
    assert!(
        check.status.success() && out.contains("No errors were found") && !out.contains("leaked"),
        "{out}{}",
        text(&check.stderr)
    );
}

/// A request past the end fails as in qemu-img (the same lines, exit status 1), and the image
/// is left clean, holding the requests before it.
#[test]
fn bench_write_past_the_end_fails_and_leaves_a_clean_image() {
    let Some(env) = Env::new("bench_write_past_the_end_fails_and_leaves_a_clean_image") else {
        return;
    };
    env.create("e.qcow2", 1 << 20, "");
    env.copy("e.qcow2", "theirs.qcow2");
    let args = [
        "-w",
        "-c",
        "3",
        "-d",
        "1",
        "-S",
        "500000",
        "-s",
        "64k",
        "--pattern=0x42",
    ];
    let (_, o) = both(&env.qemu, env.dir.path(), &args, "theirs.qcow2", "e.qcow2");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).starts_with("qcow2: Failed request: "),
        "{}",
        text(&o.stderr)
    );
    assert_clean(&env.qemu, env.dir.path(), "e.qcow2");
    env.io(
        "e.qcow2",
        &[
            "read -P 0x42 0 64k",
            "read -P 0x42 500000 64k",
            "read -P 0 1000000 48576",
        ],
    );
}
