//! `qcow2 map` against `qemu-img map`: the same arguments in the same directory give the
//! same bytes on stdout and the same success, in both output formats, on every committed
//! fixture and on fresh images covering each kind of extent.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use common::{Qemu, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_qcow2");

fn run_in(dir: &Path, program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
}

/// Run `map ARGS` with both tools in both formats; assert equal stdout and exit success.
/// Returns how many comparisons were made (2).
fn compare(qemu: &Qemu, dir: &Path, args: &[&str]) -> usize {
    for output in ["--output=human", "--output=json"] {
        let mut full = vec!["map", output];
        full.extend_from_slice(args);
        let theirs = run_in(dir, &qemu.img, &full);
        let ours = run_in(dir, Path::new(BIN), &full);
        assert_eq!(
            String::from_utf8_lossy(&ours.stdout),
            String::from_utf8_lossy(&theirs.stdout),
            "stdout of `map {}` differs in {}\nqemu-img stderr: {}\nour stderr: {}",
            full[1..].join(" "),
            dir.display(),
            String::from_utf8_lossy(&theirs.stderr),
            String::from_utf8_lossy(&ours.stderr),
        );
        assert_eq!(
            ours.status.success(),
            theirs.status.success(),
            "exit status of `map {}` differs: ours {}, qemu-img {}\nour stderr: {}",
            full[1..].join(" "),
            ours.status,
            theirs.status,
            String::from_utf8_lossy(&ours.stderr)
        );
        if !ours.status.success() {
            let err = String::from_utf8_lossy(&ours.stderr);
            assert_eq!(err.lines().count(), 1, "one line on stderr: {err}");
        }
    }
    2
}

#[test]
fn map_equals_qemu_img_on_every_fixture() {
    let Some(qemu) = Qemu::find_or_skip("map_equals_qemu_img_on_every_fixture") else {
        return;
    };
    let dir = common::fixtures_dir();
    let mut compared = 0;
    for name in common::fixture_images() {
        // The crate refuses corrupt images on purpose (qemu-img maps them). Encrypted ones
        // without their secret: both refuse (one line, a failure).
        if name == "v3-corrupt.qcow2" {
            continue;
        }
        compared += compare(&qemu, &dir, &[&name]);
        compared += compare(&qemu, &dir, &["-f", "qcow2", "--start-offset=4097", &name]);
    }
    assert!(compared >= 60, "only {compared} comparisons");
}

/// One fresh image: `qemu-img create ARGS NAME SIZE`, then `qemu-io` commands.
struct Case {
    name: &'static str,
    create: &'static [&'static str],
    size: &'static str,
    io: &'static [&'static str],
}

/// Images built in order (later ones may use earlier ones as backing files).
const CASES: &[Case] = &[
    // A raw base shorter than the overlays, written in places: holes show as zeros.
    Case {
        name: "base.raw",
        create: &["-f", "raw"],
        size: "1000000",
        io: &["write -P 1 0 100k", "write -P 2 600k 50k"],
    },
    Case {
        name: "mid.qcow2",
        create: &["-f", "qcow2", "-b", "base.raw", "-F", "raw"],
        size: "2M",
        io: &[
            "write -P 3 64k 64k",
            "write -z 128k 64k",
            "write -P 4 1500k 8k",
        ],
    },
    // Three deep: zero clusters over backing data, compressed, past the middle's end.
    Case {
        name: "top.qcow2",
        create: &["-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2"],
        size: "4M",
        io: &[
            "write -P 5 0 4k",
            "write -z 700k 64k",
            "write -c -P 6 3M 64k",
        ],
    },
    Case {
        name: "qbase.qcow2",
        create: &["-f", "qcow2"],
        size: "1M",
        io: &["write -P 1 0 1M"],
    },
    Case {
        name: "over.qcow2",
        create: &["-f", "qcow2", "-b", "qbase.qcow2", "-F", "qcow2"],
        size: "3M",
        io: &["write -z 64k 64k", "write -P 2 2M 4k"],
    },
    Case {
        name: "compressed.qcow2",
        create: &["-f", "qcow2", "-o", "cluster_size=4k"],
        size: "1M",
        io: &[
            "write -c -P 1 0 64k",
            "write -P 2 64k 8k",
            "write -c -P 3 80k 4k",
        ],
    },
    Case {
        name: "extl2.qcow2",
        create: &["-f", "qcow2", "-o", "extended_l2=on"],
        size: "4M",
        io: &[
            "write -P 1 0 4k",
            "write -P 1 10k 2k",
            "write -z 100k 6k",
            "write -P 3 1M 64k",
        ],
    },
    Case {
        name: "extl2-over.qcow2",
        create: &[
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            "qbase.qcow2",
            "-F",
            "qcow2",
        ],
        size: "2M",
        io: &["write -P 7 4k 4k", "write -z 200k 2k"],
    },
    Case {
        name: "c512.qcow2",
        create: &["-f", "qcow2", "-o", "cluster_size=512"],
        size: "1M",
        io: &[
            "write -P 1 0 40k",
            "write -z 50k 3k",
            "write -c -P 1 100k 2k",
            "write -P 2 300k 1k",
        ],
    },
    Case {
        name: "datafile.qcow2",
        create: &["-f", "qcow2", "-o", "data_file=datafile.data"],
        size: "2M",
        io: &["write -P 1 64k 64k", "write -z 1M 64k"],
    },
    Case {
        name: "datafile-raw.qcow2",
        create: &[
            "-f",
            "qcow2",
            "-o",
            "data_file=datafile-raw.data,data_file_raw=on",
        ],
        size: "2M",
        io: &["write -P 1 64k 64k", "write -z 1M 64k"],
    },
    // Preallocation: metadata leaves data clusters as holes in the file, which QEMU finds.
    Case {
        name: "prealloc-metadata.qcow2",
        create: &["-f", "qcow2", "-o", "preallocation=metadata"],
        size: "4M",
        io: &[
            "write -P 1 64k 64k",
            "write -z 1M 64k",
            "write -P 2 4032k 64k",
        ],
    },
    Case {
        name: "prealloc-falloc.qcow2",
        create: &["-f", "qcow2", "-o", "preallocation=falloc"],
        size: "4M",
        io: &["write -P 1 64k 64k", "write -z 1M 64k"],
    },
    Case {
        name: "prealloc-full.qcow2",
        create: &["-f", "qcow2", "-o", "preallocation=full"],
        size: "4M",
        io: &["write -P 1 64k 64k", "write -z 1M 64k"],
    },
    Case {
        name: "prealloc-extl2.qcow2",
        create: &[
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata,extended_l2=on,cluster_size=512k",
        ],
        size: "3M",
        io: &["write -P 1 4k 4k", "write -z 600k 20k"],
    },
    Case {
        name: "prealloc-512.qcow2",
        create: &[
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata,cluster_size=512",
        ],
        size: "300k",
        io: &["write -P 1 4k 4k", "write -P 1 299k 1k"],
    },
    Case {
        name: "v2.qcow2",
        create: &["-f", "qcow2", "-o", "compat=0.10"],
        size: "1M",
        io: &["write -P 1 0 64k", "write -z 128k 64k"],
    },
];

#[test]
fn map_equals_qemu_img_on_fresh_images() {
    let Some(qemu) = Qemu::find_or_skip("map_equals_qemu_img_on_fresh_images") else {
        return;
    };
    let tmp = TempDir::new("cli-map");
    let dir = tmp.path();
    for case in CASES {
        let mut args = vec!["create", "-q"];
        args.extend_from_slice(case.create);
        args.extend([case.name, case.size]);
        qemu.img(dir, &args);
        let format = if case.name.ends_with(".raw") {
            "raw"
        } else {
            "qcow2"
        };
        qemu.io(dir, format, case.name, case.io);
    }
    // The cases reach what they are meant to: holes inside preallocated data clusters.
    let json = qemu.img(dir, &["map", "--output=json", "prealloc-metadata.qcow2"]);
    let json = String::from_utf8_lossy(&json);
    assert!(json.contains("\"zero\": true, \"data\": true"), "{json}");
    let mut compared = 0;
    for case in CASES.iter().filter(|c| c.name.ends_with(".qcow2")) {
        compared += compare(&qemu, dir, &[case.name]);
        // Unaligned windows: the first and last extents are cut.
        compared += compare(&qemu, dir, &["-s", "333", "-l", "1000001", case.name]);
        compared += compare(&qemu, dir, &["--start-offset=65537", case.name]);
    }
    // Past the end: qemu-img prints one empty extent.
    compared += compare(&qemu, dir, &["--start-offset=64M", "top.qcow2"]);
    compared += compare(&qemu, dir, &["--max-length=0", "top.qcow2"]);
    // Through a relative directory: file names as QEMU builds them.
    let sub = dir.join("sub");
    std::fs::create_dir(&sub).unwrap();
    compared += compare(&qemu, &sub, &["../top.qcow2"]);
    assert_eq!(compared, 6 * 16 + 6);
}

#[test]
fn errors_are_one_line_and_a_failure() {
    let tmp = TempDir::new("cli-map-errors");
    let dir = tmp.path();
    std::fs::write(dir.join("not-qcow2.img"), vec![7u8; 4096]).unwrap();
    // A backing loop: a -> b -> a (qemu-img itself recurses without end on this one).
    let a = header_with_backing("b.qcow2");
    let b = header_with_backing("a.qcow2");
    std::fs::write(dir.join("a.qcow2"), a).unwrap();
    std::fs::write(dir.join("b.qcow2"), b).unwrap();
    for args in [
        &["map", "missing.qcow2"][..],
        &["map", "not-qcow2.img"],
        &["map", "--output=json", "a.qcow2"],
        &["map", "-f", "raw", "not-qcow2.img"],
    ] {
        let out = run_in(dir, Path::new(BIN), args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?} printed {:?}", out.stdout);
    }
}

/// A minimal v3 qcow2 header (64 KiB clusters, 1 MiB guest, no tables) naming a backing file.
fn header_with_backing(name: &str) -> Vec<u8> {
    let mut h = vec![0u8; 65536];
    let put32 =
        |h: &mut Vec<u8>, at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 =
        |h: &mut Vec<u8>, at: usize, v: u64| h[at..at + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut h, 0, 0x5146_49fb); // magic
    put32(&mut h, 4, 3); // version
    put64(&mut h, 8, 112); // backing_file_offset
    put32(&mut h, 16, name.len() as u32); // backing_file_size
    put32(&mut h, 20, 16); // cluster_bits
    put64(&mut h, 24, 1 << 20); // size
    put32(&mut h, 96, 4); // refcount_order
    put32(&mut h, 100, 104); // header_length
    h[112..112 + name.len()].copy_from_slice(name.as_bytes());
    h
}

/// An encrypted image with its secret: QEMU gives no host offsets for encrypted data (the
/// file holds ciphertext there), so the human format, which lists offsets, fails as
/// qemu-img's does and the JSON one has no `offset` for data.
#[test]
fn encrypted_data_has_no_host_offset() {
    let Some(qemu) = Qemu::find_or_skip("encrypted_data_has_no_host_offset") else {
        return;
    };
    let dir = common::fixtures_dir().join("encrypted");
    let name = "luks-aes-256-xts-plain64-sha256.qcow2";
    let secret = "secret,id=s0,data=abc";
    let opts = format!("driver=qcow2,file.filename={name},encrypt.key-secret=s0");
    for output in ["--output=json", "--output=human"] {
        let theirs = run_in(
            &dir,
            &qemu.img,
            &["map", output, "--object", secret, "--image-opts", &opts],
        );
        let ours = run_in(
            &dir,
            Path::new(BIN),
            &["map", output, "--object", secret, name],
        );
        assert_eq!(
            String::from_utf8_lossy(&ours.stdout),
            String::from_utf8_lossy(&theirs.stdout),
            "stdout of map {output} differs\nqemu-img stderr: {}",
            String::from_utf8_lossy(&theirs.stderr)
        );
        assert_eq!(ours.status.success(), theirs.status.success(), "{output}");
    }
    let json = run_in(
        &dir,
        Path::new(BIN),
        &["map", "--output=json", "--object", secret, name],
    );
    let text = String::from_utf8_lossy(&json.stdout);
    assert!(text.contains("\"data\": true"), "{text}");
    assert!(!text.contains("offset"), "{text}");
}
