//! Amending against `qemu-img amend`: each option change made by QEMU on one copy, by the
//! library ([`qcow2::amend_image`]) and by `qcow2 amend` on others, for every kind of image
//! (v2, v3 with zero clusters, compressed clusters, a backing chain, extended L2, 512 B and
//! 2 MiB clusters, refcount widths 1 and 64, internal snapshots, lazy refcounts, LUKS): the
//! same exit code and message, and on success the same guest (`qemu-img compare`), ours
//! `qemu-img check` clean without leaks, `qemu-img info` the same. A dirty image's
//! refcounts are repaired when lazy refcounts are turned off. A downgrade and a new refcount
//! width cut by a crash at every write leave the old image or the new one.

use crate::common;

use std::process::{Command, Output};

use common::crash_storage::{replay, CrashStorage, Subset};
use common::Env;
use qcow2::{AmendOptions, OpenOptions, Qcow2};

use crate::resize::info;

const BIN: &str = env!("CARGO_BIN_EXE_qcow2");
const MIB: u64 = 1 << 20;
const SECRET: &str = "amend-secret";

struct Kind {
    name: &'static str,
    opts: &'static str,
    backing: bool,
    compressed: bool,
    snapshot: bool,
    luks: bool,
}

const fn kind(name: &'static str, opts: &'static str) -> Kind {
    Kind {
        name,
        opts,
        backing: false,
        compressed: false,
        snapshot: false,
        luks: false,
    }
}

fn kinds() -> Vec<Kind> {
    let mut out = vec![
        kind("v3", "cluster_size=4k"),
        kind("v2", "compat=0.10,cluster_size=4k"),
        kind("c512", "cluster_size=512"),
        kind("c2m", "cluster_size=2M"),
        kind("extl2", "extended_l2=on"),
        kind("rc1", "refcount_bits=1,cluster_size=4k"),
        kind("rc64", "refcount_bits=64,cluster_size=4k"),
        kind("lazy", "lazy_refcounts=on,cluster_size=4k"),
        Kind {
            compressed: true,
            ..kind("compressed", "cluster_size=4k")
        },
        Kind {
            backing: true,
            ..kind("chain", "cluster_size=4k")
        },
        Kind {
            snapshot: true,
            ..kind("snapshot", "cluster_size=4k")
        },
    ];
    if cfg!(feature = "encryption") {
        out.push(Kind {
            luks: true,
            ..kind(
                "luks",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            )
        });
    }
    out
}

const SIZE: u64 = 16 * MIB;

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

/// `orig.qcow2` of `kind`: data, zero clusters (plain and allocated), and what the kind adds.
fn make(env: &Env, kind: &Kind) {
    let size = SIZE.to_string();
    let object = format!("secret,id=sec0,data={SECRET}");
    let mut create = vec!["create", "-q", "-f", "qcow2"];
    if kind.luks {
        create.extend(["--object", object.as_str()]);
    }
    if kind.backing {
        env.create("base.qcow2", SIZE, "cluster_size=4k");
        env.io("base.qcow2", &[format!("write -P 0xb1 0 {size}")]);
        create.extend(["-b", "base.qcow2", "-F", "qcow2"]);
    }
    create.extend(["-o", kind.opts, "orig.qcow2", size.as_str()]);
    env.img(&create);
    let mut cmds = vec![
        "write -P 0x11 0 2M".to_owned(),
        "write -P 0x22 5M 1M".to_owned(),
        "write -P 0x33 15M 1M".to_owned(),
    ];
    if kind.compressed {
        cmds.push("write -c -P 0x44 8M 64k".to_owned());
    }
    let zeros = vec![
        "write -z 1M 64k".to_owned(),  // allocated zero clusters
        "write -z 10M 64k".to_owned(), // plain zero clusters
        "write -z 5M 4096".to_owned(),
    ];
    if kind.snapshot {
        qemu_io(env, kind, "orig.qcow2", &cmds);
        env.img(&["snapshot", "-c", "s1", "orig.qcow2"]);
        qemu_io(env, kind, "orig.qcow2", &zeros);
    } else {
        cmds.extend(zeros);
        qemu_io(env, kind, "orig.qcow2", &cmds);
    }
}

fn check_report(env: &Env, kind: &Kind, image: &str) -> serde_json::Value {
    let out = Command::new(&env.qemu.img)
        .current_dir(env.dir.path())
        .args(["check", "--output=json"])
        .args(args(kind, image))
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{image}: {}", String::from_utf8_lossy(&out.stderr)))
}

fn assert_clean(env: &Env, kind: &Kind, image: &str, what: &str) {
    let report = check_report(env, kind, image);
    for key in ["corruptions", "leaks", "check-errors"] {
        assert!(report.get(key).is_none_or(|n| n == 0), "{what}: {report}");
    }
}

fn guest(env: &Env, kind: &Kind, image: &str) -> Vec<u8> {
    if kind.luks {
        let opts = format!("driver=qcow2,file.filename={image},encrypt.key-secret=sec0");
        env.convert(
            &opts,
            &[
                "--object",
                &format!("secret,id=sec0,data={SECRET}"),
                "--image-opts",
            ],
        )
    } else {
        env.convert(image, &[])
    }
}

fn qemu_amend(env: &Env, kind: &Kind, options: &str, image: &str) -> Output {
    Command::new(&env.qemu.img)
        .current_dir(env.dir.path())
        .args(["amend", "-o", options])
        .args(args(kind, image))
        .output()
        .unwrap()
}

fn cli_amend(env: &Env, kind: &Kind, options: &str, image: &str) -> Output {
    Command::new(BIN)
        .current_dir(env.dir.path())
        .args(["amend", "-o", options])
        .args(args(kind, image))
        .output()
        .unwrap()
}

fn library_amend(env: &Env, kind: &Kind, options: &str, image: &str) -> qcow2::Result<()> {
    let mut amend = AmendOptions::new();
    amend.set_all(options)?;
    let mut open = OpenOptions::new().write(true);
    if kind.luks {
        open = open.secret(SECRET);
    }
    let image = Qcow2::open_path_with(env.path(image), &open)?;
    qcow2::amend_image(image, &amend).map(drop)
}

/// The options amended: up and down, lazy refcounts, refcount widths, sizes, the backing
/// file as it is and otherwise.
const OPTIONS: [&str; 14] = [
    "compat=0.10",
    "compat=1.1",
    "lazy_refcounts=on",
    "lazy_refcounts=off",
    "refcount_bits=1",
    "refcount_bits=64",
    "refcount_bits=8,compat=1.1",
    "compat=0.10,refcount_bits=16",
    "size=10M",
    "size=20M",
    "compat=1.1,lazy_refcounts=on,size=24M",
    "lazy_refcounts=off,compat=0.10,size=12M",
    "backing_file=other.qcow2",
    "data_file_raw=off",
];

#[test]
fn amend_as_qemu_img_does() {
    for kind in kinds() {
        let Some(env) = Env::new(&format!("amend::{}", kind.name)) else {
            return;
        };
        make(&env, &kind);
        for options in OPTIONS {
            // QEMU takes minutes to change the width of 2 MiB refcount blocks.
            if kind.name == "c2m" && options.contains("refcount_bits") {
                continue;
            }
            let what = format!("{} -o {options}", kind.name);
            for copy in ["theirs.qcow2", "lib.qcow2", "cli.qcow2"] {
                env.copy("orig.qcow2", copy);
            }
            let theirs = qemu_amend(&env, &kind, options, "theirs.qcow2");
            let lib = library_amend(&env, &kind, options, "lib.qcow2");
            let cli = cli_amend(&env, &kind, options, "cli.qcow2");
            assert_eq!(cli.status.code(), theirs.status.code(), "{what}");
            let expected = String::from_utf8_lossy(&theirs.stderr).replace("qemu-img: ", "qcow2: ");
            assert_eq!(String::from_utf8_lossy(&cli.stderr), expected, "{what}");
            assert_eq!(lib.is_ok(), theirs.status.success(), "{what}: {lib:?}");
            if let Err(e) = &lib {
                assert_eq!(format!("qcow2: {e}\n"), expected, "{what}");
                continue;
            }
            let expected = info(&env, "theirs.qcow2");
            // QEMU's downgrade writes plain zeros into an encrypted image's allocated zero
            // clusters, which then decrypt to noise; the crate writes encrypted zeros, and
            // the guest stays as it was.
            let mut want = guest(&env, &kind, "theirs.qcow2");
            if kind.luks && options.contains("compat=0.10") {
                let len = want.len();
                want = guest(&env, &kind, "orig.qcow2");
                want.resize(len, 0);
            }
            for image in ["lib.qcow2", "cli.qcow2"] {
                assert_clean(&env, &kind, image, &format!("{what}: {image}"));
                assert_eq!(info(&env, image), expected, "{what}: {image}");
                assert!(guest(&env, &kind, image) == want, "{what}: {image} guest");
            }
        }
    }
}

#[test]
fn what_this_crate_does_not_downgrade_is_refused_changing_nothing() {
    let Some(env) = Env::new("amend::refused") else {
        return;
    };
    // Zero clusters in a snapshot (QEMU expands them there too).
    env.create("snap.qcow2", MIB, "cluster_size=4k");
    env.io("snap.qcow2", &["write -z 0 64k".to_owned()]);
    env.img(&["snapshot", "-c", "s", "snap.qcow2"]);
    // Persistent bitmaps (QEMU keeps them, unusable, and leaks their clusters).
    env.create("bitmap.qcow2", MIB, "");
    env.img(&["bitmap", "--add", "bitmap.qcow2", "b0"]);
    for image in ["snap.qcow2", "bitmap.qcow2"] {
        let before = env.read_file(image);
        let err = qcow2::amend(env.path(image), &AmendOptions::new().compat("0.10")).unwrap_err();
        assert!(
            matches!(err, qcow2::Error::UnsupportedWrite { .. }),
            "{image}: {err}"
        );
        assert!(env.read_file(image) == before, "{image} changed");
    }
}

/// An image left dirty by a crash with lazy refcounts: turning them off repairs the
/// refcounts first, as QEMU does.
#[test]
fn lazy_refcounts_off_repairs_a_dirty_image() {
    let Some(env) = Env::new("amend::dirty") else {
        return;
    };
    env.create("orig.qcow2", 16 * MIB, "lazy_refcounts=on,cluster_size=4k");
    env.qemu.io_crash(
        env.dir.path(),
        "qcow2",
        "orig.qcow2",
        &["write -P 1 0 3M", "write -P 2 8M 1M", "flush"],
    );
    let report = check_report(&env, &kind("dirty", ""), "orig.qcow2");
    assert!(
        report["leaks"].as_u64().unwrap_or(0) > 0
            || report["corruptions"].as_u64().unwrap_or(0) > 0,
        "not dirty: {report}"
    );
    env.copy("orig.qcow2", "theirs.qcow2");
    env.copy("orig.qcow2", "ours.qcow2");
    let out = qemu_amend(
        &env,
        &kind("dirty", ""),
        "lazy_refcounts=off",
        "theirs.qcow2",
    );
    assert!(out.status.success());
    qcow2::amend(
        env.path("ours.qcow2"),
        &AmendOptions::new().lazy_refcounts(false),
    )
    .unwrap();
    assert_clean(&env, &kind("dirty", ""), "ours.qcow2", "dirty");
    assert_eq!(info(&env, "ours.qcow2"), info(&env, "theirs.qcow2"));
    assert!(env.convert("ours.qcow2", &[]) == env.convert("theirs.qcow2", &[]));
}

#[test]
fn messages_and_exit_codes_match_qemu_img() {
    let Some(env) = Env::new("amend::messages") else {
        return;
    };
    let cases: &[&[&str]] = &[
        &["-o", "compat=0.9", "IMG"],
        &["-o", "cluster_size=4k", "IMG"],
        &["-o", "lazy_refcounts=maybe", "IMG"],
        &["-o", "refcount_bits=3", "IMG"],
        &["-o", "data_file=x", "IMG"],
        &["-o", "data_file_raw=on", "IMG"],
        &["-o", "bogus=1", "IMG"],
        &["-o", "size=abc", "IMG"],
        &["-o", "size=1000", "IMG"],
        &["-o", "size=0", "IMG"],
        &["-o", "encrypt.format=luks", "IMG"],
        &["-o", "encrypt.new-secret=sec0", "IMG"],
        &["-o", "encrypt.cipher-alg=aes-128", "IMG"],
        &["-o", "compat=0.10", "-o", "lazy_refcounts=on", "IMG"],
        &["-o", "", "IMG"],
        &["IMG"],
        &["-o", "compat=0.10"],
        &["-p", "-o", "lazy_refcounts=off", "IMG"],
        &["-q", "-o", "compat=0.10", "IMG"],
    ];
    for case in cases {
        env.create("theirs.qcow2", 16 * MIB, "");
        env.copy("theirs.qcow2", "ours.qcow2");
        let with =
            |name: &str| -> Vec<String> { case.iter().map(|a| a.replace("IMG", name)).collect() };
        let theirs = Command::new(&env.qemu.img)
            .current_dir(env.dir.path())
            .arg("amend")
            .args(with("theirs.qcow2"))
            .output()
            .unwrap();
        let ours = Command::new(BIN)
            .current_dir(env.dir.path())
            .arg("amend")
            .args(with("ours.qcow2"))
            .output()
            .unwrap();
        assert_eq!(ours.status.code(), theirs.status.code(), "{case:?}");
        assert_eq!(ours.stdout, theirs.stdout, "{case:?}");
        let expected = String::from_utf8_lossy(&theirs.stderr)
            .replace("qemu-img: ", "qcow2: ")
            .replace("theirs.qcow2", "ours.qcow2")
            .replace(&format!("Try '{} ", env.qemu.img.display()), "Try 'qcow2 ")
            .replace("Try 'qemu-img", "Try 'qcow2");
        assert_eq!(String::from_utf8_lossy(&ours.stderr), expected, "{case:?}");
        assert_eq!(
            info(&env, "ours.qcow2"),
            info(&env, "theirs.qcow2"),
            "{case:?}"
        );
    }
}

/// Amend over a storage that logs every write and barrier; replay a kill and power cuts
/// at every event: `qemu-img check` finds no corruption (leaks allowed), the guest is the
/// same, and the version and refcount width are the old ones or the new ones.
fn crash_case(env: &Env, options: &str, old: (&str, u64), new: (&str, u64)) {
    let before = env.convert("orig.qcow2", &[]);
    let storage = CrashStorage::new(env.read_file("orig.qcow2"));
    let image = Qcow2::open_with(storage.clone(), &OpenOptions::new().write(true)).unwrap();
    let mut amend = AmendOptions::new();
    amend.set_all(options).unwrap();
    let image = qcow2::amend_image(image, &amend).unwrap();
    drop(image);
    let log = storage.log();
    let mut states = [0usize; 2];
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
            let what = format!("{options}: cut {cut} {subset:?}");
            let bytes = replay(&storage.initial(), &log, cut, subset);
            std::fs::write(env.path("cut.qcow2"), &bytes).unwrap();
            let report = check_report(env, &kind("crash", ""), "cut.qcow2");
            assert!(
                report.get("corruptions").is_none_or(|n| n == 0),
                "{what}: {report}"
            );
            assert!(
                report.get("check-errors").is_none_or(|n| n == 0),
                "{what}: {report}"
            );
            let info = env.qemu.info_json(env.dir.path(), "cut.qcow2", false);
            let data = &info["format-specific"]["data"];
            let state = (
                data["compat"].as_str().unwrap_or(""),
                data["refcount-bits"].as_u64().unwrap_or(0),
            );
            match state {
                s if s == old => states[0] += 1,
                s if s == new => states[1] += 1,
                s => panic!("{what}: neither old nor new: {s:?}"),
            }
            assert!(
                env.convert("cut.qcow2", &[]) == before,
                "{what}: guest changed"
            );
        }
    }
    assert!(states[0] > 0 && states[1] > 0, "{options}: {states:?}");
    std::fs::write(env.path("end.qcow2"), storage.contents()).unwrap();
    assert_clean(env, &kind("crash", ""), "end.qcow2", options);
}

#[test]
fn a_crash_at_any_write_of_a_downgrade_or_a_new_refcount_width_is_harmless() {
    let Some(env) = Env::new("amend::crash") else {
        return;
    };
    for (options, old, new) in [
        ("compat=0.10", ("1.1", 16), ("0.10", 16)),
        ("refcount_bits=8", ("1.1", 16), ("1.1", 8)),
        ("refcount_bits=64", ("1.1", 16), ("1.1", 64)),
        ("compat=0.10,refcount_bits=16", ("1.1", 16), ("0.10", 16)),
    ] {
        env.create("orig.qcow2", 8 * MIB, "cluster_size=4k");
        env.io(
            "orig.qcow2",
            &[
                "write -P 0x11 0 1M".to_owned(),
                "write -c -P 0x22 6M 4k".to_owned(),
            ],
        );
        // Zero clusters only in the active layer (a snapshot's are refused).
        env.img(&["snapshot", "-c", "s", "orig.qcow2"]);
        env.io(
            "orig.qcow2",
            &[
                "write -P 0x33 0 64k".to_owned(),
                "write -z 512k 64k".to_owned(),
                "write -z 3M 64k".to_owned(),
                "write -z 4M 8k".to_owned(),
            ],
        );
        crash_case(&env, options, old, new);
    }
}
