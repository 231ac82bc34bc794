//! `rebase` against `qemu-img rebase`: safe rebases onto another base, onto none (`-b ""`),
//! onto a deeper layer of the chain and onto a raw file, and unsafe ones (`-u`), by
//! qemu-img, the library and the `qcow2` command on copies of the same chain; the guest, map
//! (offsets aside) and info of the image as qemu-img leaves them, `qemu-img check` clean, the
//! command's output as qemu-img's. Then crash cuts at every write of a safe rebase.

use qcow2::{OpenOptions, Qcow2, RebaseOptions};

use crate::commit::{
    assert_no_corruption, assert_same_layer, assert_same_output, copies, crate_guest, cuts, ours,
    theirs, Kind, KINDS, MIB, SECRET,
};
use crate::common::crash_storage::{replay, CrashStorage, Subset};
use crate::common::Env;

/// old and new bases of `kind` that differ in some clusters (and in size), and a top over
/// the old one with data, zeros and a discard of its own.
fn three_images(env: &Env, kind: &Kind) {
    kind.create(env, "old.qcow2", 4 * MIB, None);
    kind.io(
        env,
        "old.qcow2",
        0,
        &["write -P 1 0 1M", "write -P 2 2M 1M"],
    );
    // qemu-img rebase cannot give an encrypted new backing file its key: plain then.
    let new_kind = if kind.luks { &KINDS[0] } else { kind };
    new_kind.create(env, "new.qcow2", 3 * MIB, None);
    new_kind.io(
        env,
        "new.qcow2",
        0,
        &[
            "write -P 1 0 512k",
            "write -P 9 2560k 64k",
            "write -P 9 4000 10",
        ],
    );
    kind.create(env, "top.qcow2", 4 * MIB, Some("old.qcow2"));
    kind.io(
        env,
        "top.qcow2",
        1,
        &[
            "write -P 3 512k 64k",
            "write -z 2M 64k",
            "discard 3M 64k",
            "write -P 4 3900k 100k",
        ],
    );
}

fn spec_args(kind: &Kind, image: &str, depth: usize, head: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = head.iter().map(|s| s.to_string()).collect();
    args.extend(kind.spec(image, depth));
    args
}

#[test]
fn safe_rebase_matches_qemu_img_for_every_image_kind() {
    let Some(env) = Env::new("rebase_kinds") else {
        return;
    };
    for kind in KINDS {
        let env = Env::new("rebase_kind").expect("tools");
        three_images(&env, kind);
        let files = ["old.qcow2", "new.qcow2", "top.qcow2"];
        copies(&env, kind, &files, &["q", "lib", "cli", "qn", "libn"]);
        let before = kind.guest(&env, "top.qcow2", 1);
        // Onto the new base.
        // Encrypted chains name their files absolutely (see `Kind::create`).
        let new_path = env.path("new.qcow2").display().to_string();
        let new_name = if kind.luks {
            new_path.as_str()
        } else {
            "new.qcow2"
        };
        let args = spec_args(
            kind,
            "q/top.qcow2",
            1,
            &["rebase", "-b", new_name, "-F", "qcow2"],
        );
        env.img(&args);
        let options = RebaseOptions::new()
            .backing(Some(new_name.into()))
            .backing_format("qcow2")
            .open_options(kind.open());
        qcow2::rebase(env.path("lib/top.qcow2"), &options)
            .unwrap_or_else(|e| panic!("{}: {e}", kind.name));
        let mut args = vec!["rebase", "-b", new_name, "-F", "qcow2"];
        if kind.luks {
            args.extend(["--object", SECRET]);
        }
        args.push("cli/top.qcow2");
        let out = ours(&env, &args);
        assert!(
            out.status.success(),
            "{}: {}",
            kind.name,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout.is_empty() && out.stderr.is_empty());
        for dir in ["lib", "cli"] {
            assert_same_layer(&env, kind, "top.qcow2", 1, dir, "q", "rebase onto new");
            assert!(
                kind.guest(&env, &format!("{dir}/top.qcow2"), 1) == before,
                "{}",
                kind.name
            );
        }
        // Onto nothing.
        env.img(&spec_args(kind, "qn/top.qcow2", 1, &["rebase", "-b", ""]));
        let options = RebaseOptions::new().backing(None).open_options(kind.open());
        qcow2::rebase(env.path("libn/top.qcow2"), &options).unwrap();
        assert_same_layer(&env, kind, "top.qcow2", 0, "libn", "qn", "rebase -b \"\"");
        assert!(
            kind.guest(&env, "libn/top.qcow2", 0) == before,
            "{}",
            kind.name
        );
    }
    drop(env);
}

/// a <- b <- c, c rebased onto a (b's data copied into c); and onto a raw file.
#[test]
fn safe_rebase_onto_a_deeper_layer_and_onto_raw() {
    let Some(env) = Env::new("rebase_deeper") else {
        return;
    };
    let kind = &KINDS[0];
    kind.create(&env, "a.qcow2", 4 * MIB, None);
    kind.io(&env, "a.qcow2", 0, &["write -P 1 0 4M"]);
    kind.create(&env, "b.qcow2", 4 * MIB, Some("a.qcow2"));
    kind.io(&env, "b.qcow2", 1, &["write -P 2 1M 1M", "write -z 3M 64k"]);
    kind.create(&env, "c.qcow2", 4 * MIB, Some("b.qcow2"));
    kind.io(&env, "c.qcow2", 2, &["write -P 3 1536k 1M"]);
    env.img(&["convert", "-q", "-O", "raw", "b.qcow2", "flat.raw"]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(env.path("flat.raw"))
        .unwrap()
        .set_len(3 * MIB + 512)
        .unwrap();
    let files = ["a.qcow2", "b.qcow2", "c.qcow2", "flat.raw"];
    copies(&env, kind, &files, &["q", "lib", "cli", "qr", "libr"]);
    let before = kind.guest(&env, "c.qcow2", 2);
    env.img(&["rebase", "-b", "a.qcow2", "-F", "qcow2", "q/c.qcow2"]);
    let options = RebaseOptions::new()
        .backing(Some("a.qcow2".into()))
        .backing_format("qcow2");
    qcow2::rebase(env.path("lib/c.qcow2"), &options).unwrap();
    let o = ours(
        &env,
        &[
            "rebase",
            "-p",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            "cli/c.qcow2",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let progress = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(progress.starts_with("    (0.00/100%)\r"), "{progress:?}");
    assert!(progress.ends_with("    (100.00/100%)\r\n"), "{progress:?}");
    for dir in ["lib", "cli"] {
        assert_same_layer(
            &env,
            kind,
            "c.qcow2",
            1,
            dir,
            "q",
            "rebase onto a deeper layer",
        );
    }
    assert!(kind.guest(&env, "lib/c.qcow2", 1) == before);
    env.img(&["rebase", "-b", "flat.raw", "-F", "raw", "qr/c.qcow2"]);
    let options = RebaseOptions::new()
        .backing(Some("flat.raw".into()))
        .backing_format("raw");
    qcow2::rebase(env.path("libr/c.qcow2"), &options).unwrap();
    assert_same_layer(&env, kind, "c.qcow2", 1, "libr", "qr", "rebase onto raw");
    assert!(kind.guest(&env, "libr/c.qcow2", 1) == before);
}

#[test]
fn unsafe_rebase_only_changes_the_header() {
    let Some(env) = Env::new("rebase_unsafe") else {
        return;
    };
    for kind in [&KINDS[0], &KINDS[1], &KINDS[8]] {
        let env = Env::new("rebase_unsafe_kind").expect("tools");
        three_images(&env, kind);
        // The old base gone: unsafe mode does not open it.
        std::fs::rename(env.path("old.qcow2"), env.path("moved.qcow2")).unwrap();
        copies(
            &env,
            kind,
            &["moved.qcow2", "new.qcow2", "top.qcow2"],
            &["q", "lib", "cli"],
        );
        let qemu_args = |dir: &str| {
            let mut a = vec![
                "rebase".to_string(),
                "-u".into(),
                "-b".into(),
                "moved.qcow2".into(),
            ];
            a.extend(["-F".into(), "qcow2".into()]);
            if kind.luks {
                a.extend(["--object".into(), SECRET.into()]);
            }
            a.push(format!("{dir}/top.qcow2"));
            a
        };
        // qemu-img needs the key even here: the image opened with it by name.
        let mut their_args: Vec<String> = qemu_args("q");
        if kind.luks {
            their_args.truncate(6);
            their_args.extend(kind.spec("q/top.qcow2", 0));
        }
        let (o, t) = (
            ours(
                &env,
                &qemu_args("cli")
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
            ),
            theirs(
                &env,
                &their_args.iter().map(String::as_str).collect::<Vec<_>>(),
            ),
        );
        assert_same_output(&o, &t, "rebase -u");
        let options = RebaseOptions::new()
            .backing(Some("moved.qcow2".into()))
            .backing_format("qcow2")
            .unsafe_mode(true)
            .open_options(kind.open());
        qcow2::rebase(env.path("lib/top.qcow2"), &options).unwrap();
        for dir in ["lib", "cli"] {
            assert_same_layer(&env, kind, "top.qcow2", 1, dir, "q", "rebase -u");
        }
        // Then off any backing file, unsafely.
        env.img(&spec_args(
            kind,
            "q/top.qcow2",
            0,
            &["rebase", "-u", "-b", ""],
        ));
        let options = RebaseOptions::new()
            .unsafe_mode(true)
            .open_options(kind.open());
        qcow2::rebase(env.path("lib/top.qcow2"), &options).unwrap();
        assert_same_layer(&env, kind, "top.qcow2", 0, "lib", "q", "rebase -u -b \"\"");
    }
    drop(env);
}

#[test]
fn rebase_cli_refusals_match_qemu_img() {
    let Some(env) = Env::new("rebase_refusals") else {
        return;
    };
    env.create("a.qcow2", MIB, "");
    env.create_over("b.qcow2", MIB, "", "a.qcow2", "qcow2");
    env.create("x.qcow2", 2 * MIB, "");
    let cases: &[(&str, &[&str])] = &[
        ("no -b", &["rebase", "b.qcow2"]),
        (
            "no -F, unsafe",
            &["rebase", "-u", "-b", "x.qcow2", "b.qcow2"],
        ),
        (
            "invalid cache",
            &["rebase", "-t", "foo", "-b", "", "b.qcow2"],
        ),
    ];
    for (what, args) in cases {
        let (o, t) = (ours(&env, args), theirs(&env, args));
        assert_same_output(&o, &t, what);
    }
    // Safe mode without -F: qemu-img copies first, then refuses; the crate refuses first.
    let args = ["rebase", "-b", "x.qcow2", "b.qcow2"];
    let (o, t) = (ours(&env, &args), theirs(&env, &args));
    assert_same_output(&o, &t, "no -F, safe");
    // A new backing file that does not open.
    let args = ["rebase", "-b", "nonexist.qcow2", "-F", "qcow2", "b.qcow2"];
    let (o, t) = (ours(&env, &args), theirs(&env, &args));
    assert_eq!(o.status.code(), t.status.code());
    let prefix =
        "Could not open new backing file 'nonexist.qcow2': Could not open 'nonexist.qcow2': ";
    assert!(String::from_utf8_lossy(&t.stderr).starts_with(&format!("qemu-img: {prefix}")));
    assert!(
        String::from_utf8_lossy(&o.stderr).starts_with(&format!("qcow2: {prefix}")),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let info = crate::commit::info_fields(&env, "b.qcow2");
    assert_eq!(
        info["backing-filename"], "a.qcow2",
        "refusals leave the header"
    );
}

#[test]
fn safe_rebase_survives_a_crash_at_every_write() {
    let Some(env) = Env::new("rebase_crash") else {
        return;
    };
    let kind = &KINDS[0];
    three_images(&env, kind);
    let guest = crate_guest(&env.path("top.qcow2"));
    let storage = CrashStorage::new(env.read_file("top.qcow2"));
    let mut image = Qcow2::open_with(storage.clone(), &OpenOptions::new().write(true)).unwrap();
    image.set_backing_image(Qcow2::open_path(env.path("old.qcow2")).unwrap());
    let new = Qcow2::open_path(env.path("new.qcow2")).unwrap();
    let options = RebaseOptions::new()
        .backing(Some("new.qcow2".into()))
        .backing_format("qcow2");
    let reader = new.reader().unwrap();
    let after = qcow2::rebase_image(image, Some(&reader), &options).unwrap();
    assert_eq!(after.header().backing_file(), Some("new.qcow2"));
    drop(after);
    let log = storage.log();
    let mut names = std::collections::BTreeSet::new();
    for cut in cuts(&log) {
        for subset in [Subset::All, Subset::None, Subset::Random(cut as u64)] {
            let bytes = replay(&storage.initial(), &log, cut, subset);
            let what = format!("cut {cut} {subset:?}");
            assert_no_corruption(&env, "top.qcow2", &bytes, &what);
            let header = Qcow2::open(bytes.clone()).unwrap().header().clone();
            names.insert(header.backing_file().unwrap_or_default().to_owned());
            assert!(
                crate_guest(&env.path("top.qcow2")) == guest,
                "{what}: the guest changed (backing {:?})",
                header.backing_file()
            );
        }
    }
    let expected: std::collections::BTreeSet<String> =
        ["old.qcow2", "new.qcow2"].map(String::from).into();
    assert_eq!(names, expected, "cuts before and after the header switch");
}
