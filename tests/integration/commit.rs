//! `commit` against `qemu-img commit`: the same chain committed by qemu-img, by the library
//! and by the `qcow2` command; every layer's guest identical to qemu-img's, the base's map
//! too (data and zeros where qemu-img leaves them), `qemu-img check` clean, `qemu-img info`
//! fields equal, the command's output and exit status as qemu-img's. Then crash cuts at
//! every write of both phases (the copy into the base, the emptying of the top).
//!
//! The helpers here (image kinds, QEMU runs with secrets, the layer comparisons) serve
//! `rebase.rs` too.

use std::path::Path;
use std::process::{Command, Output};

use qcow2::{CommitOptions, OpenOptions, Qcow2};

use crate::common::crash_storage::{replay, CrashStorage, Event, Subset};
use crate::common::Env;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_qcow2");
pub(crate) const SECRET: &str = "secret,id=sec0,data=pw";

/// An image kind every layer of a test chain is created with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Kind {
    pub name: &'static str,
    pub opts: &'static str,
    pub luks: bool,
}

/// Every kind qemu-img commit and rebase take (LUKS with a short key derivation).
pub(crate) const KINDS: &[Kind] = &[
    Kind {
        name: "v3",
        opts: "",
        luks: false,
    },
    Kind {
        name: "v2",
        opts: "compat=0.10",
        luks: false,
    },
    Kind {
        name: "extended-l2",
        opts: "extended_l2=on",
        luks: false,
    },
    Kind {
        name: "512-byte clusters",
        opts: "cluster_size=512",
        luks: false,
    },
    Kind {
        name: "2-MiB clusters",
        opts: "cluster_size=2M",
        luks: false,
    },
    Kind {
        name: "refcount_bits=1",
        opts: "refcount_bits=1",
        luks: false,
    },
    Kind {
        name: "refcount_bits=64",
        opts: "refcount_bits=64",
        luks: false,
    },
    Kind {
        name: "lazy refcounts",
        opts: "lazy_refcounts=on",
        luks: false,
    },
    Kind {
        name: "LUKS",
        opts: "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        luks: true,
    },
];

pub(crate) const MIB: u64 = 1 << 20;

impl Kind {
    /// How QEMU's tools name `image` with `depth` backing files below it: the file name,
    /// or (LUKS) the secret and `--image-opts` naming the key of every layer.
    pub(crate) fn spec(&self, image: &str, depth: usize) -> Vec<String> {
        if !self.luks {
            return vec![image.to_owned()];
        }
        let mut opts = format!("driver=qcow2,file.filename={image},encrypt.key-secret=sec0");
        for d in 1..=depth {
            opts.push_str(&format!(",{}encrypt.key-secret=sec0", "backing.".repeat(d)));
        }
        vec![
            "--object".into(),
            SECRET.into(),
            "--image-opts".into(),
            opts,
        ]
    }

    /// The open options of the library for this kind.
    pub(crate) fn open(&self) -> OpenOptions {
        match self.luks {
            true => OpenOptions::new().secret("pw"),
            false => OpenOptions::new(),
        }
    }

    /// `qemu-img create` of a layer (over `backing`, when given).
    pub(crate) fn create(&self, env: &Env, name: &str, size: u64, backing: Option<&str>) {
        let size = size.to_string();
        let mut args: Vec<&str> = vec!["create", "-q", "-f", "qcow2"];
        if self.luks {
            args.extend(["--object", SECRET]);
        }
        let absolute;
        if let Some(b) = backing {
            // Under --image-opts QEMU cannot resolve a relative backing name of an encrypted
            // image: its chains name their files absolutely.
            absolute = env.path(b).display().to_string();
            let b = if self.luks { absolute.as_str() } else { b };
            args.extend(["-b", b, "-F", "qcow2"]);
        }
        if !self.opts.is_empty() {
            args.extend(["-o", self.opts]);
        }
        args.extend([name, size.as_str()]);
        env.img(&args);
    }

    /// qemu-io commands on `image` (with `depth` layers below).
    pub(crate) fn io(&self, env: &Env, image: &str, depth: usize, cmds: &[&str]) {
        let mut cmd = Command::new(&env.qemu.io);
        cmd.current_dir(env.dir.path());
        if !self.luks {
            cmd.args(["-f", "qcow2"]);
        }
        for c in cmds {
            cmd.args(["-c", c]);
        }
        let spec = self.spec(image, depth);
        if self.luks {
            // qemu-io takes the image last, after its options.
            cmd.args(&spec[..3]).arg(&spec[3]);
        } else {
            cmd.args(&spec);
        }
        crate::common::run(&mut cmd);
    }

    /// The guest of `image` as QEMU reads it (raw bytes).
    pub(crate) fn guest(&self, env: &Env, image: &str, depth: usize) -> Vec<u8> {
        let out = crate::common::unique_name(env.dir.path(), "guest", "raw");
        let mut cmd = Command::new(&env.qemu.img);
        cmd.current_dir(env.dir.path()).arg("convert");
        cmd.args(self.spec(image, depth))
            .args(["-O", "raw"])
            .arg(&out);
        crate::common::run(&mut cmd);
        let data = std::fs::read(&out).expect("read the guest");
        let _ = std::fs::remove_file(&out);
        data
    }

    /// `qemu-img check` of `image`: no corruption, no leak, no error.
    pub(crate) fn assert_clean(&self, env: &Env, image: &str, depth: usize, what: &str) {
        let out = Command::new(&env.qemu.img)
            .current_dir(env.dir.path())
            .args(["check", "--output=json"])
            .args(self.spec(image, depth))
            .output()
            .expect("run qemu-img check");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            panic!(
                "{what}: qemu-img check failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        for key in ["corruptions", "leaks", "check-errors"] {
            assert_eq!(
                json[key].as_u64().unwrap_or(0),
                0,
                "{what}: qemu-img check reports {key}: {json}"
            );
        }
    }

    /// The map of `image` as qemu-img prints it, without host offsets (which depend on where
    /// each writer allocated).
    pub(crate) fn map(&self, env: &Env, image: &str, depth: usize) -> Vec<serde_json::Value> {
        let mut cmd = Command::new(&env.qemu.img);
        cmd.current_dir(env.dir.path())
            .args(["map", "--output=json"]);
        cmd.args(self.spec(image, depth));
        let out = crate::common::run(&mut cmd).stdout;
        let json: serde_json::Value = serde_json::from_slice(&out).expect("map JSON");
        let mut extents: Vec<serde_json::Value> = Vec::new();
        for mut e in json.as_array().cloned().unwrap_or_default() {
            if let Some(o) = e.as_object_mut() {
                o.remove("offset");
            }
            // Neighbours that differed only by their offsets merge.
            if let Some(last) = extents.last_mut() {
                let same = ["depth", "present", "zero", "data", "compressed"]
                    .iter()
                    .all(|k| last[k] == e[k]);
                let contiguous = last["start"].as_u64().unwrap() + last["length"].as_u64().unwrap()
                    == e["start"].as_u64().unwrap();
                if same && contiguous {
                    let length = last["length"].as_u64().unwrap() + e["length"].as_u64().unwrap();
                    last["length"] = length.into();
                    continue;
                }
            }
            extents.push(e);
        }
        extents
    }
}

/// The `qemu-img info --output=json` fields the crate must agree on.
pub(crate) fn info_fields(env: &Env, image: &str) -> serde_json::Value {
    let info = env.qemu.info_json(env.dir.path(), image, false);
    let data = &info["format-specific"]["data"];
    let snapshots: Vec<serde_json::Value> = info["snapshots"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|s| serde_json::json!([s["id"], s["name"], s["vm-state-size"]]))
        .collect();
    // Encrypted chains name their files absolutely, each copy in its own directory.
    let backing = info["backing-filename"].as_str().map(|b| {
        Path::new(b)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    });
    serde_json::json!({
        "virtual-size": info["virtual-size"],
        "backing-filename": backing,
        "backing-filename-format": info["backing-filename-format"],
        "compat": data["compat"],
        "lazy-refcounts": data["lazy-refcounts"],
        "refcount-bits": data["refcount-bits"],
        "extended-l2": data["extended-l2"],
        "corrupt": data["corrupt"],
        "bitmaps": data["bitmaps"],
        "snapshots": snapshots,
    })
}

/// Copy every file of the test dir named in `files` into the sub-directories `dirs`. An
/// encrypted chain names its files absolutely: each copy then names its sibling copy.
pub(crate) fn copies(env: &Env, kind: &Kind, files: &[&str], dirs: &[&str]) {
    for dir in dirs {
        std::fs::create_dir_all(env.path(dir)).expect("mkdir");
        for f in files {
            std::fs::copy(env.path(f), env.path(&format!("{dir}/{f}"))).expect("copy");
        }
        if !kind.luks {
            continue;
        }
        for f in files {
            let copy = format!("{dir}/{f}");
            let info = env.qemu.info_json(env.dir.path(), &copy, false);
            let Some(backing) = info["backing-filename"].as_str() else {
                continue;
            };
            let name = Path::new(backing).file_name().unwrap().to_str().unwrap();
            let sibling = env.path(&format!("{dir}/{name}")).display().to_string();
            let mut args = vec!["rebase".to_string(), "-u".into(), "-b".into(), sibling];
            args.extend(["-F".into(), "qcow2".into()]);
            args.extend(kind.spec(&copy, 0));
            env.img(&args);
        }
    }
}

/// Assert that layer `name` (with `depth` layers below) is the same in `ours` as in qemu-img's
/// dir `theirs`: guest, map (offsets aside), info fields, and ours checks clean.
pub(crate) fn assert_same_layer(
    env: &Env,
    kind: &Kind,
    name: &str,
    depth: usize,
    ours: &str,
    theirs: &str,
    what: &str,
) {
    let (a, b) = (format!("{ours}/{name}"), format!("{theirs}/{name}"));
    let what = format!("{what}, {} image, layer {name} ({ours})", kind.name);
    assert!(
        kind.guest(env, &a, depth) == kind.guest(env, &b, depth),
        "{what}: the guest differs from qemu-img's"
    );
    assert_eq!(
        kind.map(env, &a, depth),
        kind.map(env, &b, depth),
        "{what}: the map differs from qemu-img's"
    );
    assert_eq!(info_fields(env, &a), info_fields(env, &b), "{what}: info");
    kind.assert_clean(env, &a, depth, &what);
}

/// Run the `qcow2` command in the test dir.
pub(crate) fn ours(env: &Env, args: &[&str]) -> Output {
    Command::new(BIN)
        .current_dir(env.dir.path())
        .args(args)
        .output()
        .expect("run qcow2")
}

/// Run `qemu-img` in the test dir, whatever its exit status.
pub(crate) fn theirs(env: &Env, args: &[&str]) -> Output {
    Command::new(&env.qemu.img)
        .current_dir(env.dir.path())
        .args(args)
        .output()
        .expect("run qemu-img")
}

/// Assert the command did as qemu-img: exit status, stdout, stderr (`qemu-img: ` and the
/// tool's name aside).
pub(crate) fn assert_same_output(ours: &Output, theirs: &Output, what: &str) {
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "{what}: exit status\nours: {}\ntheirs: {}",
        String::from_utf8_lossy(&ours.stderr),
        String::from_utf8_lossy(&theirs.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&ours.stdout),
        String::from_utf8_lossy(&theirs.stdout),
        "{what}: stdout"
    );
    let norm = |o: &Output| {
        String::from_utf8_lossy(&o.stderr)
            .replace("/usr/bin/", "")
            .replace("qemu-img: ", "")
            .replace("qcow2: ", "")
            .replace("qemu-img", "TOOL")
            .replace("qcow2 ", "TOOL ")
    };
    assert_eq!(norm(ours), norm(theirs), "{what}: stderr");
}

/// A base and a top of `kind`, 4 MiB: data in the base, and in the top data, zeros (plain,
/// unmapped), a discard and (except LUKS) compressed clusters over it.
pub(crate) fn two_layers(env: &Env, kind: &Kind) {
    kind.create(env, "base.qcow2", 4 * MIB, None);
    kind.io(
        env,
        "base.qcow2",
        0,
        &["write -P 1 0 1M", "write -P 2 2M 1M"],
    );
    kind.create(env, "top.qcow2", 4 * MIB, Some("base.qcow2"));
    let mut cmds = vec![
        "write -P 3 512k 64k",
        "write -P 4 1000k 100k",
        "write -z 2M 128k",
        "write -z -u 3M 64k",
        "discard 0 64k",
    ];
    if !kind.luks && !kind.opts.contains("2M") {
        cmds.push("write -c -P 5 1536k 64k");
    }
    kind.io(env, "top.qcow2", 1, &cmds);
}

#[test]
fn commit_matches_qemu_img_for_every_image_kind() {
    let Some(env) = Env::new("commit_kinds") else {
        return;
    };
    for kind in KINDS {
        let env = Env::new("commit_kind").expect("tools found once");
        two_layers(&env, kind);
        copies(
            &env,
            kind,
            &["base.qcow2", "top.qcow2"],
            &["q", "lib", "cli"],
        );
        env.img(
            &[
                &["commit", "-q"][..],
                &kind
                    .spec("q/top.qcow2", 1)
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
            ]
            .concat(),
        );
        qcow2::commit(
            env.path("lib/top.qcow2"),
            &CommitOptions::new().open_options(kind.open()),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", kind.name));
        let mut args = vec!["commit"];
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
        assert_eq!(String::from_utf8_lossy(&out.stdout), "Image committed.\n");
        let len = |p: &str| std::fs::metadata(env.path(p)).unwrap().len();
        for dir in ["lib", "cli"] {
            assert_same_layer(&env, kind, "base.qcow2", 0, dir, "q", "commit");
            assert_same_layer(&env, kind, "top.qcow2", 1, dir, "q", "commit");
            // The emptied top as small as qemu-img leaves it (or smaller).
            let top = format!("{dir}/top.qcow2");
            assert!(
                len(&top) <= len("q/top.qcow2"),
                "{}: {} bytes",
                kind.name,
                len(&top)
            );
        }
    }
    drop(env);
}

#[test]
fn commit_keep_top_leaves_the_top_as_it_was() {
    let Some(env) = Env::new("commit_keep") else {
        return;
    };
    let kind = &KINDS[0];
    two_layers(&env, kind);
    let before = kind.guest(&env, "top.qcow2", 1);
    copies(
        &env,
        kind,
        &["base.qcow2", "top.qcow2"],
        &["q", "lib", "cli"],
    );
    env.img(&["commit", "-q", "-d", "q/top.qcow2"]);
    qcow2::commit(
        env.path("lib/top.qcow2"),
        &CommitOptions::new().keep_top(true),
    )
    .unwrap();
    let (o, t) = (
        ours(&env, &["commit", "-d", "cli/top.qcow2"]),
        theirs(&env, &["commit", "-d", "q/top.qcow2"]),
    );
    assert_same_output(&o, &t, "commit -d");
    for dir in ["lib", "cli"] {
        assert_same_layer(&env, kind, "base.qcow2", 0, dir, "q", "commit -d");
        assert_same_layer(&env, kind, "top.qcow2", 1, dir, "q", "commit -d");
        assert!(kind.guest(&env, &format!("{dir}/top.qcow2"), 1) == before);
        assert!(kind.guest(&env, &format!("{dir}/base.qcow2"), 0) == before);
    }
}

/// a <- b <- c: c committed into a (`-b`, which keeps c), and c into b.
#[test]
fn commit_three_layers_into_the_middle_and_the_bottom() {
    let Some(env) = Env::new("commit_three") else {
        return;
    };
    for kind in [&KINDS[0], &KINDS[2], &KINDS[8]] {
        let env = Env::new("commit_three_kind").expect("tools");
        kind.create(&env, "a.qcow2", 4 * MIB, None);
        kind.io(&env, "a.qcow2", 0, &["write -P 1 0 4M"]);
        kind.create(&env, "b.qcow2", 4 * MIB, Some("a.qcow2"));
        kind.io(&env, "b.qcow2", 1, &["write -P 2 1M 1M", "write -z 3M 64k"]);
        kind.create(&env, "c.qcow2", 4 * MIB, Some("b.qcow2"));
        kind.io(
            &env,
            "c.qcow2",
            2,
            &["write -P 3 1536k 1M", "write -z 0 128k"],
        );
        let files = ["a.qcow2", "b.qcow2", "c.qcow2"];
        copies(&env, kind, &files, &["q", "lib", "cli", "q2", "lib2"]);
        let spec = |dir: &str| kind.spec(&format!("{dir}/c.qcow2"), 2);
        let luks: Vec<&str> = if kind.luks {
            vec!["--object", SECRET]
        } else {
            vec![]
        };
        let before = kind.guest(&env, "c.qcow2", 2);
        // Into the bottom: -b, relative to the top's directory as qemu-img resolves it.
        // QEMU finds no base by name under --image-opts (encrypted chains): for those, the
        // crate's two runs are held to each other and to the guest.
        if !kind.luks {
            env.img(&["commit", "-q", "-b", "a.qcow2", "q/c.qcow2"]);
        }
        qcow2::commit(
            env.path("lib/c.qcow2"),
            &CommitOptions::new()
                .base(env.path("lib/a.qcow2"))
                .open_options(kind.open()),
        )
        .unwrap();
        let mut args = vec!["commit", "-b", "a.qcow2"];
        args.extend(&luks);
        args.push("cli/c.qcow2");
        let out = ours(&env, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let reference = if kind.luks { "lib" } else { "q" };
        for dir in ["lib", "cli"] {
            for (i, f) in files.iter().enumerate() {
                assert_same_layer(&env, kind, f, i, dir, reference, "commit -b");
            }
            let top = format!("{dir}/c.qcow2");
            assert!(
                kind.guest(&env, &top, 2) == before,
                "{}: the top",
                kind.name
            );
            let bottom = format!("{dir}/a.qcow2");
            assert!(
                kind.guest(&env, &bottom, 0) == before,
                "{}: the base",
                kind.name
            );
        }
        // Into the middle: c emptied.
        let mut args: Vec<String> = ["commit", "-q"].map(String::from).to_vec();
        args.extend(spec("q2"));
        env.img(&args);
        qcow2::commit(
            env.path("lib2/c.qcow2"),
            &CommitOptions::new().open_options(kind.open()),
        )
        .unwrap();
        for (i, f) in files.iter().enumerate() {
            assert_same_layer(&env, kind, f, i, "lib2", "q2", "commit into the middle");
        }
    }
    drop(env);
}

#[test]
fn commit_grows_a_smaller_base_and_keeps_snapshots_and_bitmaps() {
    let Some(env) = Env::new("commit_grow") else {
        return;
    };
    let kind = &KINDS[0];
    kind.create(&env, "base.qcow2", 2 * MIB, None);
    kind.io(&env, "base.qcow2", 0, &["write -P 1 0 2M"]);
    env.img(&["snapshot", "-c", "s1", "base.qcow2"]);
    kind.create(&env, "top.qcow2", 5 * MIB, Some("base.qcow2"));
    kind.io(
        &env,
        "top.qcow2",
        1,
        &["write -P 2 1M 3M", "write -P 3 4608k 64k"],
    );
    env.img(&["snapshot", "-c", "t1", "top.qcow2"]);
    kind.io(&env, "top.qcow2", 1, &["write -P 4 0 64k"]);
    env.img(&["bitmap", "--add", "top.qcow2", "b0"]);
    env.img(&["bitmap", "--add", "base.qcow2", "b1"]);
    copies(&env, kind, &["base.qcow2", "top.qcow2"], &["q", "lib"]);
    env.img(&["commit", "-q", "q/top.qcow2"]);
    qcow2::commit(env.path("lib/top.qcow2"), &CommitOptions::new()).unwrap();
    assert_same_layer(&env, kind, "base.qcow2", 0, "lib", "q", "commit growing");
    assert_same_layer(&env, kind, "top.qcow2", 1, "lib", "q", "commit growing");
    assert_eq!(info_fields(&env, "lib/base.qcow2")["virtual-size"], 5 * MIB);
}

#[test]
fn commit_cli_refusals_match_qemu_img() {
    let Some(env) = Env::new("commit_refusals") else {
        return;
    };
    env.create("a.qcow2", MIB, "");
    env.create_over("b.qcow2", MIB, "", "a.qcow2", "qcow2");
    env.create("x.qcow2", MIB, "");
    let cases: &[(&str, &[&str])] = &[
        ("no backing file", &["commit", "a.qcow2"]),
        (
            "base not in the chain",
            &["commit", "-b", "x.qcow2", "b.qcow2"],
        ),
        ("invalid cache", &["commit", "-t", "foo", "b.qcow2"]),
        ("quiet keep", &["commit", "-q", "-d", "b.qcow2"]),
    ];
    for (what, args) in cases {
        let (o, t) = (ours(&env, args), theirs(&env, args));
        assert_same_output(&o, &t, what);
    }
    // A file that does not open: qemu-img's first words, the crate's reason.
    let (o, t) = (
        ours(&env, &["commit", "nofile.qcow2"]),
        theirs(&env, &["commit", "nofile.qcow2"]),
    );
    assert_eq!(o.status.code(), t.status.code());
    assert!(
        String::from_utf8_lossy(&t.stderr).starts_with("qemu-img: Could not open 'nofile.qcow2': ")
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).starts_with("qcow2: Could not open 'nofile.qcow2': ")
    );
    // Refused before anything was written.
    kind_unchanged(&env, "a.qcow2");
}

fn kind_unchanged(env: &Env, image: &str) {
    let out = theirs(env, &["check", image]);
    assert!(out.status.success(), "{image} after refusals");
}

#[test]
fn commit_progress_ends_at_100_percent() {
    let Some(env) = Env::new("commit_progress") else {
        return;
    };
    env.create("a.qcow2", 4 * MIB, "");
    env.create_over("b.qcow2", 4 * MIB, "", "a.qcow2", "qcow2");
    env.io("b.qcow2", &["write -P 1 0 4M"]);
    let out = ours(&env, &["commit", "-p", "b.qcow2"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.starts_with("    (0.00/100%)\r"), "{text:?}");
    assert!(
        text.ends_with("    (100.00/100%)\r\nImage committed.\n"),
        "{text:?}"
    );
}

// ---- crash cuts --------------------------------------------------------------------------

/// The cut points of a log: before every write and sync, and after the last event.
pub(crate) fn cuts(log: &[Event]) -> Vec<usize> {
    let mut cuts: Vec<usize> = (0..log.len()).filter(|&i| log[i].is_io()).collect();
    cuts.push(log.len());
    cuts
}

/// `qemu-img check` of an image file's bytes written as `name` in the test dir: no
/// corruption (leaks allowed).
pub(crate) fn assert_no_corruption(env: &Env, name: &str, bytes: &[u8], what: &str) {
    std::fs::write(env.path(name), bytes).expect("write cut image");
    let out = theirs(env, &["check", "--output=json", name]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "{what}: check failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        json["corruptions"].as_u64().unwrap_or(0),
        0,
        "{what}: {json}"
    );
    assert_eq!(
        json["check-errors"].as_u64().unwrap_or(0),
        0,
        "{what}: {json}"
    );
}

/// The guest of `top` (a file in the test dir, over its chain) as the crate reads it.
pub(crate) fn crate_guest(path: &Path) -> Vec<u8> {
    use qcow2::positioned_io::ReadAt;
    let image = Qcow2::open_path(path).expect("open cut image");
    let mut buf = vec![0u8; image.guest_size() as usize];
    image
        .reader()
        .unwrap()
        .read_exact_at(0, &mut buf)
        .expect("read cut image");
    buf
}

/// A small chain with data, zeros and a discard in the top, and a snapshot in it.
fn crash_chain(env: &Env) {
    env.create("base.qcow2", 2 * MIB, "");
    env.io("base.qcow2", &["write -P 1 0 1M", "write -P 2 1536k 256k"]);
    env.create_over("top.qcow2", 2 * MIB, "", "base.qcow2", "qcow2");
    env.io(
        "top.qcow2",
        &[
            "write -P 3 64k 192k",
            "write -z 1M 64k",
            "write -P 4 1600k 128k",
            "discard 0 64k",
        ],
    );
    env.img(&["snapshot", "-c", "s1", "top.qcow2"]);
    env.io("top.qcow2", &["write -P 5 64k 64k"]);
}

#[test]
fn commit_copy_survives_a_crash_at_every_write() {
    let Some(env) = Env::new("commit_crash") else {
        return;
    };
    crash_chain(&env);
    let old_base = crate_guest(&env.path("base.qcow2"));
    let guest = crate_guest(&env.path("top.qcow2"));
    let cluster = 65536usize;

    // Phase 1: the copy into the base, over a logging storage.
    let storage = CrashStorage::new(env.read_file("base.qcow2"));
    let base = Qcow2::open_with(storage.clone(), &OpenOptions::new().write(true)).unwrap();
    let base = base.into_writer().unwrap();
    let top = Qcow2::open_path(env.path("top.qcow2")).unwrap();
    qcow2::commit_into(&top.reader().unwrap(), 1, &base, &CommitOptions::new()).unwrap();
    base.close().unwrap();
    let log = storage.log();
    let committed = storage.contents();
    let mut checked = 0;
    for cut in cuts(&log) {
        for subset in [Subset::All, Subset::None, Subset::Random(cut as u64)] {
            let bytes = replay(&storage.initial(), &log, cut, subset);
            let what = format!("copy, cut {cut} {subset:?}");
            assert_no_corruption(&env, "base.qcow2", &bytes, &what);
            // The base: every cluster old or new; the top over it: always its guest.
            let now = crate_guest(&env.path("base.qcow2"));
            for (i, ((n, o), g)) in now
                .chunks(cluster)
                .zip(old_base.chunks(cluster))
                .zip(guest.chunks(cluster))
                .enumerate()
            {
                assert!(
                    n == o || n == g,
                    "{what}: base cluster {i} is neither old nor new"
                );
            }
            assert!(
                crate_guest(&env.path("top.qcow2")) == guest,
                "{what}: the top changed"
            );
            checked += 1;
        }
    }
    assert!(checked > 10, "too few cuts: {checked}");
    let _ = committed;
}

#[test]
fn emptying_the_top_survives_a_crash_at_every_write() {
    let Some(env) = Env::new("commit_empty_crash") else {
        return;
    };
    crash_chain(&env);
    let guest = crate_guest(&env.path("top.qcow2"));
    // The copy done (the top's data now in the base too), then the top emptied.
    qcow2::commit(env.path("top.qcow2"), &CommitOptions::new().keep_top(true)).unwrap();
    let storage = CrashStorage::new(env.read_file("top.qcow2"));
    let mut top = Qcow2::open_with(storage.clone(), &OpenOptions::new().write(true)).unwrap();
    top.make_empty().unwrap();
    drop(top);
    let log = storage.log();
    for cut in cuts(&log) {
        for subset in [Subset::All, Subset::None, Subset::Random(cut as u64)] {
            let bytes = replay(&storage.initial(), &log, cut, subset);
            let what = format!("emptying, cut {cut} {subset:?}");
            assert_no_corruption(&env, "top.qcow2", &bytes, &what);
            assert!(
                crate_guest(&env.path("top.qcow2")) == guest,
                "{what}: the top changed"
            );
        }
    }
    // And all of it: an empty top, no leak.
    std::fs::write(env.path("top.qcow2"), storage.contents()).unwrap();
    KINDS[0].assert_clean(&env, "top.qcow2", 1, "emptied top");
    let map = env.qemu.map_json(env.dir.path(), "top.qcow2");
    for e in map.as_array().unwrap() {
        assert_eq!(e["depth"], 1, "the emptied top holds nothing: {e}");
    }
}

/// Encrypted layers named by `--image-opts` (the secret in `encrypt.key-secret`), as
/// qemu-img takes them.
#[test]
fn commit_and_rebase_take_image_opts() {
    let Some(env) = Env::new("commit_image_opts") else {
        return;
    };
    let kind = &KINDS[8];
    two_layers(&env, kind);
    let before = kind.guest(&env, "top.qcow2", 1);
    let opts = "driver=qcow2,file.filename=top.qcow2,encrypt.key-secret=sec0";
    let out = ours(
        &env,
        &["commit", "-d", "--object", SECRET, "--image-opts", opts],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        kind.guest(&env, "base.qcow2", 0) == before,
        "the base after commit"
    );
    let out = ours(
        &env,
        &["rebase", "-b", "", "--object", SECRET, "--image-opts", opts],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        kind.guest(&env, "top.qcow2", 0) == before,
        "the top after rebase"
    );
    kind.assert_clean(&env, "top.qcow2", 0, "rebased by --image-opts");
    kind.assert_clean(&env, "base.qcow2", 0, "committed by --image-opts");
}
