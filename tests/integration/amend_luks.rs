//! Adding and erasing LUKS key slots against `qemu-img amend -o encrypt.state=...`: the same
//! change made by QEMU on one copy, by `qcow2 amend` and by the library on others; after
//! each, every copy opens in QEMU with the secrets expected and not with a removed one, the
//! guests are identical, `qemu-img check` is clean and the key slot lists (active flags)
//! agree. QEMU's refusals give the same message and exit code and change nothing. A crash
//! at any write of an add or an erase leaves an image the old secrets or the new ones open.

use crate::common;

use std::process::{Command, Output};
use std::time::Duration;

use common::crash_storage::{replay, CrashStorage, Subset};
use common::Env;
use qcow2::{AmendOptions, OpenOptions, Qcow2};

const BIN: &str = env!("CARGO_BIN_EXE_qcow2");
/// The passphrases of the secret objects `sec0`, `sec1` and `sec2`.
const SECRETS: [&str; 3] = ["first pass", "second pass", "third pass"];

fn objects() -> Vec<String> {
    SECRETS
        .iter()
        .enumerate()
        .flat_map(|(i, data)| {
            [
                "--object".to_owned(),
                format!("secret,id=sec{i},data={data}"),
            ]
        })
        .collect()
}

fn image_opts(image: &str, key: usize) -> Vec<String> {
    vec![
        "--image-opts".to_owned(),
        format!("driver=qcow2,file.filename={image},encrypt.key-secret=sec{key}"),
    ]
}

/// `orig.qcow2`: LUKS opened by `sec0` in slot 0, with data.
fn make(env: &Env) {
    let mut create: Vec<String> = ["create", "-q", "-f", "qcow2"].map(String::from).to_vec();
    create.extend(objects());
    create.extend(
        [
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,cluster_size=4k",
            "orig.qcow2",
            "4M",
        ]
        .map(String::from),
    );
    env.img(&create);
    let mut io = Command::new(&env.qemu.io);
    io.current_dir(env.dir.path())
        .args(objects())
        .args(["-c", "write -P 0x5a 0 1M", "-c", "write -P 0x3c 3M 64k"])
        .args(image_opts("orig.qcow2", 0));
    common::run(&mut io);
}

/// `TOOL amend --object ... -o OPTIONS --image-opts ...` (TOOL: qemu-img or ours).
fn amend(env: &Env, tool: &str, image: &str, key: usize, options: &str) -> Output {
    Command::new(tool)
        .current_dir(env.dir.path())
        .arg("amend")
        .args(objects())
        .args(["-o", options])
        .args(image_opts(image, key))
        .output()
        .unwrap()
}

/// The guest of `image` as QEMU reads it with secret `key`, or `None` when it does not open.
fn guest(env: &Env, image: &str, key: usize) -> Option<Vec<u8>> {
    let out = Command::new(&env.qemu.img)
        .current_dir(env.dir.path())
        .args(["convert", "-O", "raw"])
        .args(objects())
        .args(image_opts(image, key))
        .arg("guest.raw")
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| std::fs::read(env.path("guest.raw")).unwrap())
}

/// The active flags of the key slots `qemu-img info` lists.
fn slots(env: &Env, image: &str, key: usize) -> Vec<bool> {
    let mut info = Command::new(&env.qemu.img);
    info.current_dir(env.dir.path())
        .args(["info", "--output=json"])
        .args(objects())
        .args(image_opts(image, key));
    let json: serde_json::Value = serde_json::from_slice(&common::run(&mut info).stdout).unwrap();
    json["format-specific"]["data"]["encrypt"]["slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["active"].as_bool().unwrap())
        .collect()
}

fn check_clean(env: &Env, image: &str, key: usize) {
    let mut check = Command::new(&env.qemu.img);
    check
        .current_dir(env.dir.path())
        .args(["check", "--output=json"])
        .args(objects())
        .args(image_opts(image, key));
    let out = check.output().unwrap();
    assert!(out.status.success(), "{image}: {out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for field in ["corruptions", "leaks", "check-errors"] {
        assert!(
            report.get(field).is_none_or(|n| n == 0),
            "{image}: {report}"
        );
    }
}

/// Each copy opens with exactly the secrets `open` (by index), reads as QEMU's copy, is
/// clean, and lists the same key slots.
fn assert_same(env: &Env, images: &[&str], open: &[usize], what: &str) {
    let key = open[0];
    let theirs = guest(env, "theirs.qcow2", key).expect("QEMU's copy opens");
    let their_slots = slots(env, "theirs.qcow2", key);
    for image in images {
        for k in 0..SECRETS.len() {
            let read = guest(env, image, k);
            if open.contains(&k) {
                assert!(
                    read.as_ref() == Some(&theirs),
                    "{what}: {image} with sec{k}"
                );
            } else {
                assert!(read.is_none(), "{what}: {image} opens with sec{k}");
            }
        }
        check_clean(env, image, key);
        assert_eq!(slots(env, image, key), their_slots, "{what}: {image}");
    }
}

/// The library's amend of `image`, opened with secret `key`.
fn amend_library(env: &Env, image: &str, key: usize, options: &AmendOptions) {
    let open = OpenOptions::new().write(true).secret(SECRETS[key]);
    let opened = Qcow2::open_path_with(env.path(image), &open).unwrap();
    qcow2::amend_image(opened, options).unwrap();
}

#[test]
fn key_slots_are_added_and_erased_as_qemu_img_does() {
    let Some(env) = Env::new("amend_luks::steps") else {
        return;
    };
    make(&env);
    for copy in ["theirs.qcow2", "cli.qcow2", "lib.qcow2"] {
        env.copy("orig.qcow2", copy);
    }
    let images = ["cli.qcow2", "lib.qcow2"];
    let fast = Duration::from_millis(10);
    // (options, unlocking secret, library options, secrets that open afterwards)
    let steps: Vec<(&str, usize, AmendOptions, Vec<usize>)> = vec![
        (
            "encrypt.keyslot=1,encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10",
            0,
            AmendOptions::new()
                .encrypt_keyslot(1)
                .encrypt_add_secret(SECRETS[1])
                .encrypt_iter_time(fast),
            vec![0, 1],
        ),
        (
            "encrypt.state=active,encrypt.new-secret=sec2,encrypt.iter-time=10",
            1,
            AmendOptions::new()
                .encrypt_add_secret(SECRETS[2])
                .encrypt_iter_time(fast),
            vec![0, 1, 2],
        ),
        (
            "encrypt.state=inactive,encrypt.old-secret=sec0",
            1,
            AmendOptions::new().encrypt_erase_secret(SECRETS[0]),
            vec![1, 2],
        ),
        (
            "encrypt.state=inactive,encrypt.keyslot=2",
            1,
            AmendOptions::new().encrypt_keyslot(2).encrypt_erase(),
            vec![1],
        ),
        (
            "encrypt.state=active,encrypt.keyslot=6,encrypt.new-secret=sec0,encrypt.iter-time=10",
            1,
            AmendOptions::new()
                .encrypt_keyslot(6)
                .encrypt_add_secret(SECRETS[0])
                .encrypt_iter_time(fast),
            vec![0, 1],
        ),
    ];
    for (options, key, library, open) in steps {
        let theirs = amend(
            &env,
            &env.qemu.img.to_string_lossy(),
            "theirs.qcow2",
            key,
            options,
        );
        assert!(theirs.status.success(), "{options}: {theirs:?}");
        let ours = amend(&env, BIN, "cli.qcow2", key, options);
        assert!(ours.status.success(), "{options}: {ours:?}");
        assert!(ours.stdout.is_empty() && ours.stderr.is_empty(), "{ours:?}");
        amend_library(&env, "lib.qcow2", key, &library);
        assert_same(&env, &images, &open, options);
    }
}

/// The message after the program's name.
fn message(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.split_once(": ")
        .map(|(_, m)| m.to_owned())
        .unwrap_or(text)
}

#[test]
fn refusals_match_qemu_img() {
    let Some(env) = Env::new("amend_luks::refusals") else {
        return;
    };
    make(&env);
    // Two slots: 0 opened by sec0, 1 by sec1.
    let add = "encrypt.keyslot=1,encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10";
    assert!(
        amend(&env, &env.qemu.img.to_string_lossy(), "orig.qcow2", 0, add)
            .status
            .success()
    );
    env.create("plain.qcow2", 1 << 20, "");
    let cases = [
        "encrypt.keyslot=1",
        "encrypt.state=sideways",
        "encrypt.state=active,encrypt.keyslot=x,encrypt.new-secret=sec2",
        "encrypt.state=active,encrypt.keyslot=8,encrypt.new-secret=sec2",
        "encrypt.state=active,encrypt.keyslot=-1,encrypt.new-secret=sec2",
        "encrypt.state=active,encrypt.keyslot=1,encrypt.new-secret=sec2",
        "encrypt.state=active",
        "encrypt.state=active,encrypt.new-secret=sec2,encrypt.old-secret=sec0",
        "encrypt.state=active,encrypt.new-secret=nosuch",
        "encrypt.state=active,encrypt.new-secret=sec2,encrypt.iter-time=x",
        "encrypt.state=inactive",
        "encrypt.state=inactive,encrypt.keyslot=-1",
        "encrypt.state=inactive,encrypt.keyslot=9",
        "encrypt.state=inactive,encrypt.keyslot=3",
        "encrypt.state=inactive,encrypt.keyslot=1,encrypt.old-secret=sec0",
        "encrypt.state=inactive,encrypt.old-secret=sec2",
        "encrypt.state=inactive,encrypt.new-secret=sec2,encrypt.keyslot=1",
        "encrypt.state=inactive,encrypt.iter-time=10,encrypt.keyslot=1",
    ];
    for options in cases {
        env.copy("orig.qcow2", "theirs.qcow2");
        env.copy("orig.qcow2", "ours.qcow2");
        let theirs = amend(
            &env,
            &env.qemu.img.to_string_lossy(),
            "theirs.qcow2",
            0,
            options,
        );
        let ours = amend(&env, BIN, "ours.qcow2", 0, options);
        assert!(!theirs.status.success(), "{options}: QEMU accepted it");
        assert_eq!(ours.status.code(), theirs.status.code(), "{options}");
        assert_eq!(message(&ours), message(&theirs), "{options}");
        assert!(
            env.read_file("ours.qcow2") == env.read_file("orig.qcow2"),
            "{options}: changed"
        );
    }
    // The last active slot, and every active slot by its secret.
    env.copy("orig.qcow2", "theirs.qcow2");
    let erase = "encrypt.state=inactive,encrypt.keyslot=1";
    assert!(amend(
        &env,
        &env.qemu.img.to_string_lossy(),
        "theirs.qcow2",
        0,
        erase
    )
    .status
    .success());
    env.copy("theirs.qcow2", "one.qcow2");
    for options in [
        "encrypt.state=inactive,encrypt.keyslot=0",
        "encrypt.state=inactive,encrypt.old-secret=sec0",
    ] {
        env.copy("one.qcow2", "theirs.qcow2");
        env.copy("one.qcow2", "ours.qcow2");
        let theirs = amend(
            &env,
            &env.qemu.img.to_string_lossy(),
            "theirs.qcow2",
            0,
            options,
        );
        let ours = amend(&env, BIN, "ours.qcow2", 0, options);
        assert!(!theirs.status.success(), "{options}: QEMU accepted it");
        assert_eq!(ours.status.code(), theirs.status.code(), "{options}");
        assert_eq!(message(&ours), message(&theirs), "{options}");
    }
    // Images without LUKS.
    let options = "encrypt.state=inactive,encrypt.keyslot=0";
    let theirs = Command::new(&env.qemu.img)
        .current_dir(env.dir.path())
        .args(["amend", "-o", options, "plain.qcow2"])
        .output()
        .unwrap();
    let ours = Command::new(BIN)
        .current_dir(env.dir.path())
        .args(["amend", "-o", options, "plain.qcow2"])
        .output()
        .unwrap();
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(message(&ours), message(&theirs));
}

/// The library's amend over a storage logging every write and sync, replayed cut at every
/// event: every cut image opens with `always`, is clean, reads as before, and opens with
/// `changing` in the old state or the new one (both seen).
fn crash_case(env: &Env, image: &str, key: usize, options: &AmendOptions, changing: usize) {
    let before = guest(env, image, key).unwrap();
    let had = guest(env, image, changing).is_some();
    let storage = CrashStorage::new(env.read_file(image));
    let open = OpenOptions::new().write(true).secret(SECRETS[key]);
    let opened = Qcow2::open_with(storage.clone(), &open).unwrap();
    drop(qcow2::amend_image(opened, options).unwrap());
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
            let what = format!("{image}: cut {cut} {subset:?}");
            std::fs::write(
                env.path("cut.qcow2"),
                replay(&storage.initial(), &log, cut, subset),
            )
            .unwrap();
            assert!(
                guest(env, "cut.qcow2", key).as_ref() == Some(&before),
                "{what}: sec{key}"
            );
            check_clean(env, "cut.qcow2", key);
            match guest(env, "cut.qcow2", changing) {
                Some(read) => {
                    assert!(read == before, "{what}");
                    states[usize::from(!had)] += 1;
                }
                None => states[usize::from(had)] += 1,
            }
        }
    }
    assert!(states[0] > 0 && states[1] > 0, "{image}: {states:?}");
}

#[test]
fn a_crash_at_any_write_of_an_add_or_an_erase_leaves_old_or_new_secrets() {
    let Some(env) = Env::new("amend_luks::crash") else {
        return;
    };
    make(&env);
    let add = AmendOptions::new()
        .encrypt_keyslot(1)
        .encrypt_add_secret(SECRETS[1])
        .encrypt_iter_time(Duration::from_millis(10));
    crash_case(&env, "orig.qcow2", 0, &add, 1);
    env.copy("orig.qcow2", "two.qcow2");
    amend_library(&env, "two.qcow2", 0, &add);
    let erase = AmendOptions::new().encrypt_erase_secret(SECRETS[0]);
    crash_case(&env, "two.qcow2", 1, &erase, 0);
}
