//! Resizing against `qemu-img resize`: the same image grown and shrunk by QEMU, by the
//! library's [`Writer::resize`] and by `qcow2 resize`, for every kind of image (v2, v3,
//! compressed clusters, a backing chain, extended L2, 512 B and 2 MiB clusters, refcount
//! widths 1 and 64, internal snapshots, LUKS): the guests identical (`qemu-img compare`),
//! ours `qemu-img check` clean without leaks, `qemu-img info` the same; the command's
//! messages and exit codes like qemu-img's; and a shrink cut by a crash at every write
//! leaves the old size or the new one, never corruption.

use crate::common;

use std::process::Command;

use common::crash_storage::{replay, CrashStorage, Subset};
use common::Env;
use qcow2::{OpenOptions, Qcow2};

const BIN: &str = env!("CARGO_BIN_EXE_qcow2");
const MIB: u64 = 1 << 20;
const SECRET: &str = "resize-secret";

/// An image kind: `qemu-img create` options, and what else it holds.
struct Kind {
    name: &'static str,
    opts: &'static str,
    size: u64,
    backing: bool,
    compressed: bool,
    snapshot: bool,
    luks: bool,
}

const fn kind(name: &'static str, opts: &'static str, size: u64) -> Kind {
    Kind {
        name,
        opts,
        size,
        backing: false,
        compressed: false,
        snapshot: false,
        luks: false,
    }
}

fn kinds() -> Vec<Kind> {
    let mut out = vec![
        kind("v3", "", 64 * MIB),
        kind("v2", "compat=0.10", 64 * MIB),
        kind("c512", "cluster_size=512", 4 * MIB),
        kind("c2m", "cluster_size=2M", 256 * MIB),
        kind("extl2", "extended_l2=on,cluster_size=64k", 64 * MIB),
        kind("rc1", "refcount_bits=1", 64 * MIB),
        kind("rc64", "refcount_bits=64,cluster_size=4k", 16 * MIB),
        Kind {
            compressed: true,
            ..kind("compressed", "cluster_size=4k", 16 * MIB)
        },
        Kind {
            backing: true,
            ..kind("chain", "cluster_size=4k", 16 * MIB)
        },
        Kind {
            snapshot: true,
            ..kind("snapshot", "cluster_size=4k", 16 * MIB)
        },
    ];
    if cfg!(feature = "encryption") {
        out.push(Kind {
            luks: true,
            ..kind(
                "luks",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                16 * MIB,
            )
        });
    }
    out
}

/// How QEMU's tools name `image` (with the secret of a LUKS image).
fn args(kind: &Kind, image: &str) -> Vec<String> {
    if !kind.luks {
        return vec![image.to_owned()];
    }
    vec![
        "--object".to_owned(),
        format!("secret,id=sec0,data={SECRET}"),
        "--image-opts".to_owned(),
        format!("driver=qcow2,file.filename={image},encrypt.key-secret=sec0"),
    ]
}

fn qemu_img(
    env: &Env,
    leading: &[&str],
    kind: &Kind,
    image: &str,
    trailing: &[&str],
) -> std::process::Output {
    Command::new(&env.qemu.img)
        .current_dir(env.dir.path())
        .args(leading)
        .args(args(kind, image))
        .args(trailing)
        .output()
        .expect("run qemu-img")
}

fn qemu_io(env: &Env, kind: &Kind, image: &str, cmds: &[String]) {
    let mut cmd = Command::new(&env.qemu.io);
    cmd.current_dir(env.dir.path());
    if !kind.luks {
        cmd.args(["-f", "qcow2"]);
    }
    for c in cmds {
        cmd.args(["-c", c]);
    }
    common::run(cmd.args(args(kind, image)));
}

/// The image `orig.qcow2` of `kind`: data spread over the disk (up to its last cluster),
/// zero clusters, and what the kind adds.
fn make(env: &Env, kind: &Kind) {
    let size = kind.size.to_string();
    let mut create = vec!["create", "-q", "-f", "qcow2"];
    let object = format!("secret,id=sec0,data={SECRET}");
    if kind.luks {
        create.extend(["--object", object.as_str()]);
    }
    if kind.backing {
        env.create("base.qcow2", kind.size, "cluster_size=4k");
        env.io("base.qcow2", &[format!("write -P 0xb1 0 {size}")]);
        create.extend(["-b", "base.qcow2", "-F", "qcow2"]);
    }
    if !kind.opts.is_empty() {
        create.extend(["-o", kind.opts]);
    }
    create.extend(["orig.qcow2", size.as_str()]);
    env.img(&create);
    let s = kind.size;
    let mut cmds = vec![
        format!("write -P 0x11 0 {}", s / 8),
        format!("write -P 0x22 {} {}", s / 2 - 4096, s / 8),
        format!("write -z {} {}", s / 4, s / 16),
        format!("write -P 0x33 {} 4096", s - 4096),
        format!("write -P 0x44 {} 512", s * 3 / 4 + 512),
    ];
    if kind.compressed {
        cmds.push(format!("write -c -P 0x55 {} 4096", s * 5 / 8));
        cmds.push(format!("write -c -P 0x66 {} 4096", s / 8));
    }
    qemu_io(env, kind, "orig.qcow2", &cmds);
    if kind.snapshot {
        env.img(&["snapshot", "-c", "s1", "orig.qcow2"]);
        qemu_io(
            env,
            kind,
            "orig.qcow2",
            &[format!("write -P 0x77 {} 8192", s * 3 / 8)],
        );
    }
}

/// `qemu-img check --output=json`: clean, no leaks.
fn assert_clean(env: &Env, kind: &Kind, image: &str) {
    let out = qemu_img(env, &["check", "--output=json"], kind, image, &[]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{image}: {}", String::from_utf8_lossy(&out.stderr)));
    for key in ["corruptions", "leaks", "check-errors"] {
        assert!(report.get(key).is_none_or(|n| n == 0), "{image}: {report}");
    }
    assert!(out.status.success(), "{image}: {report}");
}

/// `qemu-img compare`: the same guest.
fn assert_same_guest(env: &Env, kind: &Kind, a: &str, b: &str) {
    let mut cmd = Command::new(&env.qemu.img);
    cmd.current_dir(env.dir.path()).arg("compare");
    if kind.luks {
        let opts = |i: &str| format!("driver=qcow2,file.filename={i},encrypt.key-secret=sec0");
        cmd.args(["--object", &format!("secret,id=sec0,data={SECRET}")])
            .args(["--image-opts", &opts(a), &opts(b)]);
    } else {
        cmd.args([a, b]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}: compare {a} {b}: {}{}",
        kind.name,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img info --output=json` without what differs between two files of one image
/// (names, file sizes, snapshot dates).
pub(crate) fn info(env: &Env, image: &str) -> serde_json::Value {
    let mut v = env.qemu.info_json(env.dir.path(), image, false);
    let object = v.as_object_mut().unwrap();
    for key in ["filename", "actual-size", "children", "dirty-flag"] {
        object.remove(key);
    }
    if let Some(snaps) = object.get_mut("snapshots").and_then(|s| s.as_array_mut()) {
        for s in snaps {
            let s = s.as_object_mut().unwrap();
            s.remove("date-sec");
            s.remove("date-nsec");
        }
    }
    v
}

fn copy(env: &Env, to: &str) {
    env.copy("orig.qcow2", to);
}

/// Resize `image` with the library.
fn library_resize(env: &Env, kind: &Kind, image: &str, size: u64) {
    let mut options = OpenOptions::new().write(true);
    if kind.luks {
        options = options.secret(SECRET);
    }
    let writer = Qcow2::open_path_with(env.path(image), &options)
        .and_then(Qcow2::into_writer)
        .unwrap_or_else(|e| panic!("{}: open {image}: {e}", kind.name));
    writer
        .resize(size)
        .unwrap_or_else(|e| panic!("{}: resize to {size}: {e}", kind.name));
    writer.close().unwrap();
}

fn ours(env: &Env, args: &[String]) -> std::process::Output {
    Command::new(BIN)
        .current_dir(env.dir.path())
        .arg("resize")
        .args(args)
        .output()
        .expect("run qcow2 resize")
}

#[test]
fn grow_and_shrink_as_qemu_img_does() {
    for kind in kinds() {
        let Some(env) = Env::new(&format!("resize::{}", kind.name)) else {
            return;
        };
        make(&env, &kind);
        let s = kind.size;
        // Inside a cluster and an L2 table's reach; at a cluster's end; growing.
        let targets = [s * 3 / 8 + 512, s / 2, s * 2 + 512];
        for target in targets {
            let t = target.to_string();
            let flags: &[&str] = if target < s { &["--shrink"] } else { &[] };
            copy(&env, "theirs.qcow2");
            copy(&env, "lib.qcow2");
            copy(&env, "cli.qcow2");
            let mut leading = vec!["resize", "-q"];
            leading.extend(flags);
            let out = qemu_img(&env, &leading, &kind, "theirs.qcow2", &[t.as_str()]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            library_resize(&env, &kind, "lib.qcow2", target);
            let mut cli: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
            cli.extend(args(&kind, "cli.qcow2"));
            cli.push(t.clone());
            let out = ours(&env, &cli);
            assert!(
                out.status.success(),
                "{}: {}",
                kind.name,
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(String::from_utf8_lossy(&out.stdout), "Image resized.\n");
            let expected = info(&env, "theirs.qcow2");
            assert_eq!(expected["virtual-size"], target);
            for image in ["lib.qcow2", "cli.qcow2"] {
                assert_same_guest(&env, &kind, "theirs.qcow2", image);
                assert_clean(&env, &kind, image);
                assert_eq!(
                    info(&env, image),
                    expected,
                    "{} {image} at {target}",
                    kind.name
                );
            }
            if kind.snapshot {
                let snap = |i: &str| env.convert(i, &["-l", "snapshot.name=s1"]);
                assert_eq!(
                    snap("theirs.qcow2"),
                    snap("lib.qcow2"),
                    "snapshot after resize"
                );
            }
            // Growing back: what was past the shrunk end reads as zeros in both.
            if target < s {
                let out = qemu_img(
                    &env,
                    &["resize", "-q"],
                    &kind,
                    "theirs.qcow2",
                    &[&s.to_string()],
                );
                assert!(out.status.success());
                library_resize(&env, &kind, "lib.qcow2", s);
                assert_same_guest(&env, &kind, "theirs.qcow2", "lib.qcow2");
                assert_clean(&env, &kind, "lib.qcow2");
            }
        }
    }
}

#[test]
fn messages_and_exit_codes_match_qemu_img() {
    let Some(env) = Env::new("resize::messages") else {
        return;
    };
    let cases: &[&[&str]] = &[
        &["IMG", "32M"],
        &["--shrink", "IMG", "-16M"],
        &["IMG", "+1G"],
        &["IMG", "1.5G"],
        &["IMG", "0"],
        &["IMG", "-5G"],
        &["IMG", "abc"],
        &["IMG", "1000"],
        &["IMG", "+513"],
        &["IMG", "8E"],
        &["IMG", "99999999999999999999"],
        &["--preallocation=bogus", "IMG", "2G"],
        &["--shrink", "--preallocation=full", "IMG", "-1M"],
        &["--shrink", "--preallocation=off", "IMG", "1G"],
        &["IMG"],
        &["-q", "IMG", "+1M"],
        &["IMG", "-1M"],
        &["missing.qcow2", "1G"],
    ];
    for case in cases {
        env.create("theirs.qcow2", 64 * MIB, "");
        env.copy("theirs.qcow2", "ours.qcow2");
        let with =
            |name: &str| -> Vec<String> { case.iter().map(|a| a.replace("IMG", name)).collect() };
        let theirs = Command::new(&env.qemu.img)
            .current_dir(env.dir.path())
            .arg("resize")
            .args(with("theirs.qcow2"))
            .output()
            .unwrap();
        let mine = ours(&env, &with("ours.qcow2"));
        assert_eq!(mine.status.code(), theirs.status.code(), "{case:?}");
        assert_eq!(mine.stdout, theirs.stdout, "{case:?}");
        let expected = String::from_utf8_lossy(&theirs.stderr)
            .replace("qemu-img: ", "qcow2: ")
            .replace("theirs.qcow2", "ours.qcow2")
            .replace(&format!("Try '{} ", env.qemu.img.display()), "Try 'qcow2 ")
            .replace("Try 'qemu-img", "Try 'qcow2");
        let got = String::from_utf8_lossy(&mine.stderr);
        if case.contains(&"missing.qcow2") {
            assert!(
                got.starts_with("qcow2: Could not open 'missing.qcow2': "),
                "{got}"
            );
        } else {
            assert_eq!(got, expected, "{case:?}");
        }
        assert_eq!(
            info(&env, "ours.qcow2")["virtual-size"],
            info(&env, "theirs.qcow2")["virtual-size"]
        );
    }
    // A version 2 image with snapshots is refused either way, by the library too.
    env.create("v2.qcow2", MIB, "compat=0.10");
    env.img(&["snapshot", "-c", "s", "v2.qcow2"]);
    for size in ["2M", "512k"] {
        let out = ours(&env, &["--shrink".into(), "v2.qcow2".into(), size.into()]);
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "qcow2: Can't resize a v2 image which has snapshots\n"
        );
    }
    assert_eq!(info(&env, "v2.qcow2")["virtual-size"], MIB);
}

/// A shrink cut at every write and barrier (a kill keeping every write, a power cut keeping
/// none, or one, of those since the last barrier): `qemu-img check` finds no corruption, the
/// size is the old one or the new one, what lies below the new end is untouched, and each
/// cluster past it reads as before or as zeros (QEMU drops them before the size changes).
#[test]
fn a_crash_at_any_write_of_a_shrink_leaves_the_old_size_or_the_new() {
    let Some(env) = Env::new("resize::crash") else {
        return;
    };
    let old = 8 * MIB;
    let new = 3 * MIB + 4096 + 512;
    for (name, snapshot) in [("plain", false), ("snapshot", true)] {
        env.create("orig.qcow2", old, "cluster_size=4k");
        env.io(
            "orig.qcow2",
            &[
                "write -P 0x11 0 5M".to_owned(),
                "write -z 4M 64k".to_owned(),
                "write -P 0x12 7M 1M".to_owned(),
                "write -c -P 0x22 6M 4k".to_owned(),
            ],
        );
        if snapshot {
            env.img(&["snapshot", "-c", "s", "orig.qcow2"]);
            env.io("orig.qcow2", &["write -P 0x33 3M 64k".to_owned()]);
        }
        let before = env.convert("orig.qcow2", &[]);
        let storage = CrashStorage::new(env.read_file("orig.qcow2"));
        let writer = Qcow2::open_with(storage.clone(), &OpenOptions::new().write(true))
            .and_then(Qcow2::into_writer)
            .unwrap();
        writer.resize(new).unwrap();
        writer.close().unwrap();
        let log = storage.log();
        let events = log.iter().filter(|e| e.is_io()).count();
        assert!(events > 4, "{name}: {events} events");
        let mut seen_new = 0;
        for cut in 0..=log.len() {
            if cut < log.len() && !log[cut].is_io() {
                continue;
            }
            for subset in [
                Subset::All,
                Subset::None,
                Subset::Only(0),
                Subset::AllBut(0),
            ] {
                let bytes = replay(&storage.initial(), &log, cut, subset);
                std::fs::write(env.path("cut.qcow2"), &bytes).unwrap();
                let what = format!("{name}: cut {cut} {subset:?}");
                let report = check_report(&env, "cut.qcow2");
                assert!(
                    report.get("corruptions").is_none_or(|n| n == 0),
                    "{what}: {report}"
                );
                assert!(
                    report.get("check-errors").is_none_or(|n| n == 0),
                    "{what}: {report}"
                );
                let guest = env.convert("cut.qcow2", &[]);
                let size = guest.len() as u64;
                assert!(size == old || size == new, "{what}: size {size}");
                assert!(
                    guest[..new as usize] == before[..new as usize],
                    "{what}: content below the new end"
                );
                if size == new {
                    seen_new += 1;
                }
                for (i, chunk) in guest[new as usize..].chunks(512).enumerate() {
                    let at = new as usize + i * 512;
                    let was = &before[at..at + chunk.len()];
                    assert!(
                        chunk == was || common::is_all_zero(chunk),
                        "{what}: sector at {at}"
                    );
                }
            }
        }
        assert!(seen_new > 0, "{name}: no cut had the new size");
        std::fs::write(env.path("end.qcow2"), storage.contents()).unwrap();
        let report = check_report(&env, "end.qcow2");
        assert!(
            report.get("leaks").is_none_or(|n| n == 0),
            "{name}: {report}"
        );
    }
}

fn check_report(env: &Env, image: &str) -> serde_json::Value {
    let out = Command::new(&env.qemu.img)
        .current_dir(env.dir.path())
        .args(["check", "--output=json", image])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{image}: {}", String::from_utf8_lossy(&out.stderr)))
}

/// An external data file grows and shrinks with the guest, as QEMU truncates it.
#[test]
fn an_external_data_file_follows_the_guest_size() {
    let Some(env) = Env::new("resize::data_file") else {
        return;
    };
    for dir in ["theirs", "ours"] {
        std::fs::create_dir(env.path(dir)).unwrap();
        // qemu-img creates a relative data file name from its own directory but opens it
        // from the image's: an absolute one is the same for both.
        let data = env.path(dir).join("d.raw");
        env.img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", data.display()),
            &format!("{dir}/e.qcow2"),
            "16M",
        ]);
        env.io(&format!("{dir}/e.qcow2"), &["write -P 1 0 12M".to_owned()]);
    }
    let data_len = |dir: &str| {
        std::fs::metadata(env.path(dir).join("d.raw"))
            .unwrap()
            .len()
    };
    for (size, flags) in [("32M", &[][..]), ("4M", &["--shrink"][..])] {
        let mut theirs = vec!["resize", "-q"];
        theirs.extend(flags);
        theirs.extend(["theirs/e.qcow2", size]);
        env.img(&theirs);
        let mut cli: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        cli.extend(["-q".to_owned(), "ours/e.qcow2".to_owned(), size.to_owned()]);
        assert!(ours(&env, &cli).status.success());
        assert_eq!(data_len("ours"), data_len("theirs"), "{size}");
        let size_of = |i: &str| info(&env, i)["virtual-size"].clone();
        assert_eq!(size_of("ours/e.qcow2"), size_of("theirs/e.qcow2"));
        assert_clean(&env, &kind("data file", "", 0), "ours/e.qcow2");
        assert!(env.convert("ours/e.qcow2", &[]) == env.convert("theirs/e.qcow2", &[]));
    }
}
