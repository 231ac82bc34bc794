//! Internal snapshots made, applied and deleted by the crate against `qemu-img snapshot`: the
//! same steps on two copies of an image of every kind (QEMU's writes in between, through
//! `qemu-io`, and the crate's writer on its copy once), then every layer the same (the
//! active disk and each snapshot, read by `qemu-img convert`), the same snapshot list, and
//! `qemu-img check` of the crate's copy clean, no leaks. Then crashes: the power cut or the
//! process killed at every write of each job, and every image left is the old one or the
//! new one, never corrupt, never leaking.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::crash_storage::{replay, window, CrashStorage, Subset};
use common::nbd::NbdServer;
use common::Env;
use qcow2::{OpenOptions, Qcow2};

const SECRET: &str = "snapshot-secret";
const GUEST: u64 = 8 << 20;

/// One kind of image.
struct Kind {
    name: &'static str,
    opts: &'static str,
    encrypted: bool,
    backing: bool,
    compressed: bool,
}

const KINDS: &[Kind] = &[
    Kind {
        name: "v3",
        opts: "",
        encrypted: false,
        backing: false,
        compressed: false,
    },
    Kind {
        name: "v2",
        opts: "compat=0.10",
        encrypted: false,
        backing: false,
        compressed: false,
    },
    Kind {
        name: "512",
        opts: "cluster_size=512",
        encrypted: false,
        backing: false,
        compressed: false,
    },
    Kind {
        name: "2m",
        opts: "cluster_size=2M",
        encrypted: false,
        backing: false,
        compressed: false,
    },
    Kind {
        name: "l2ext",
        opts: "extended_l2=on",
        encrypted: false,
        backing: false,
        compressed: false,
    },
    Kind {
        name: "rc2",
        opts: "refcount_bits=2",
        encrypted: false,
        backing: false,
        compressed: false,
    },
    Kind {
        name: "rc64",
        opts: "refcount_bits=64",
        encrypted: false,
        backing: false,
        compressed: false,
    },
    Kind {
        name: "lazy",
        opts: "lazy_refcounts=on",
        encrypted: false,
        backing: false,
        compressed: false,
    },
    Kind {
        name: "zstd",
        opts: "compression_type=zstd",
        encrypted: false,
        backing: false,
        compressed: true,
    },
    Kind {
        name: "zlib",
        opts: "",
        encrypted: false,
        backing: false,
        compressed: true,
    },
    Kind {
        name: "chain",
        opts: "",
        encrypted: false,
        backing: true,
        compressed: false,
    },
    Kind {
        name: "luks",
        opts: "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        encrypted: true,
        backing: false,
        compressed: false,
    },
];

/// The arguments that name `image` to a QEMU tool (with its secret when encrypted).
fn image_args(kind: &Kind, image: &str) -> Vec<String> {
    if kind.encrypted {
        vec![
            "--object".into(),
            format!("secret,id=sec0,data={SECRET}"),
            "--image-opts".into(),
            format!("driver=qcow2,file.filename={image},encrypt.key-secret=sec0"),
        ]
    } else {
        vec!["-f".into(), "qcow2".into(), image.into()]
    }
}

fn qemu_img(env: &Env, args: &[String]) -> std::process::Output {
    Command::new(&env.qemu.img)
        .current_dir(env.dir.path())
        .args(args)
        .output()
        .expect("run qemu-img")
}

fn qemu_io(env: &Env, kind: &Kind, image: &str, cmds: &[String]) {
    let mut cmd = Command::new(&env.qemu.io);
    cmd.current_dir(env.dir.path());
    for c in cmds {
        cmd.args(["-c", c]);
    }
    cmd.args(image_args(kind, image));
    let out = cmd.output().expect("run qemu-io");
    assert!(
        out.status.success(),
        "qemu-io {cmds:?} {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img snapshot FLAG NAME IMAGE`.
fn qemu_snapshot(env: &Env, kind: &Kind, image: &str, flag: &str, name: &str) {
    let mut args = vec!["snapshot".to_owned(), flag.to_owned(), name.to_owned()];
    args.extend(image_args(kind, image));
    let out = qemu_img(env, &args);
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The guest as QEMU reads it: the active disk, or snapshot `snapshot`.
fn guest(env: &Env, kind: &Kind, image: &str, snapshot: Option<&str>) -> Vec<u8> {
    let out = env.path("guest.raw");
    let _ = std::fs::remove_file(&out);
    let mut args = vec!["convert".to_owned()];
    if let Some(s) = snapshot {
        args.extend(["-l".to_owned(), format!("snapshot.name={s}")]);
    }
    args.extend(image_args(kind, image));
    args.extend(["-O".into(), "raw".into(), out.display().to_string()]);
    let result = qemu_img(env, &args);
    assert!(
        result.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    std::fs::read(&out).expect("read guest")
}

/// `qemu-img check --output=json`: `(corruptions, leaks, whole report)`.
fn check(env: &Env, kind: &Kind, image: &str) -> (u64, u64, String) {
    let mut args = vec!["check".to_owned(), "--output=json".to_owned()];
    args.extend(image_args(kind, image));
    let out = qemu_img(env, &args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "check of {image}: {e}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let n = |k: &str| json[k].as_u64().unwrap_or(0);
    (n("corruptions") + n("check-errors"), n("leaks"), text)
}

/// The snapshot list as `qemu-img info` gives it, dates left out.
fn snapshot_list(env: &Env, kind: &Kind, image: &str) -> Vec<String> {
    let mut args = vec!["info".to_owned(), "--output=json".to_owned()];
    args.extend(image_args(kind, image));
    let out = qemu_img(env, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("info json");
    json["snapshots"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|s| {
                    format!(
                        "{} {} vm-state-size={} vm-clock={} icount={}",
                        s["id"], s["name"], s["vm-state-size"], s["vm-clock-nsec"], s["icount"]
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn open_options(kind: &Kind) -> OpenOptions {
    let options = OpenOptions::new().write(true);
    if kind.encrypted {
        options.secret(SECRET.as_bytes().to_vec())
    } else {
        options
    }
}

fn open(env: &Env, kind: &Kind, image: &str) -> Qcow2<std::fs::File> {
    Qcow2::open_path_with(env.path(image), &open_options(kind))
        .unwrap_or_else(|e| panic!("{}: open {image}: {e}", kind.name))
}

/// Make image `name` of `kind` with some data, zero clusters and (by kind) compressed
/// clusters or a backing file.
fn prepare(env: &Env, kind: &Kind, name: &str) {
    let mut create = vec![
        "create".to_owned(),
        "-q".to_owned(),
        "-f".to_owned(),
        "qcow2".to_owned(),
    ];
    if kind.encrypted {
        create.extend(["--object".into(), format!("secret,id=sec0,data={SECRET}")]);
    }
    if kind.backing {
        let base = format!("{name}.base");
        env.create(&base, GUEST, "");
        env.io(&base, &["write -P 0x11 0 8M"]);
        create.extend(["-b".into(), base, "-F".into(), "qcow2".into()]);
    }
    if !kind.opts.is_empty() {
        create.extend(["-o".into(), kind.opts.into()]);
    }
    create.extend([name.to_owned(), GUEST.to_string()]);
    let out = qemu_img(env, &create);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cmds = vec![
        "write -P 0x21 0 1M".to_owned(),
        "write -P 0x22 1536k 700k".to_owned(),
        "write -z 3M 512k".to_owned(),
    ];
    if kind.compressed {
        cmds.push("write -c -P 0x23 4M 256k".to_owned());
    }
    qemu_io(env, kind, name, &cmds);
}

/// What QEMU writes between two snapshot steps (both copies get the same).
fn writes(step: usize) -> Vec<String> {
    let at = |n: u64| (n * 331 * 1024) % (GUEST - (1 << 20));
    let step = step as u64;
    vec![
        format!("write -P {} {} 96k", 0x40 + step, at(step + 1)),
        format!("write -P {} {} 5000", 0x50 + step, at(step * 7 + 3)),
        format!("write -z {} 64k", at(step * 3 + 5) / 65536 * 65536),
    ]
}

/// The `qemu-img info` fields a job may change: virtual size, backing file, and the format
/// specific ones (compat, lazy refcounts, refcount bits, extended L2, bitmaps...).
fn info_fields(env: &Env, kind: &Kind, image: &str) -> String {
    let mut args = vec!["info".to_owned(), "--output=json".to_owned()];
    args.extend(image_args(kind, image));
    let out = qemu_img(env, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("info json");
    let mut data = json["format-specific"]["data"].clone();
    if let Some(map) = data.as_object_mut() {
        map.remove("encrypt"); // the LUKS header's random salts and key material
    }
    format!(
        "size {} backing {} {}",
        json["virtual-size"], json["backing-filename"], data
    )
}

/// Every layer of both copies the same, the lists and info the same, the crate's copy clean.
fn assert_same(env: &Env, kind: &Kind, ours: &str, theirs: &str, what: &str) {
    assert_eq!(
        info_fields(env, kind, ours),
        info_fields(env, kind, theirs).replace("-qemu.qcow2", "-ours.qcow2"),
        "{} after {what}",
        kind.name
    );
    let (corrupt, leaks, report) = check(env, kind, ours);
    assert_eq!(
        (corrupt, leaks),
        (0, 0),
        "{} after {what}: check {report}",
        kind.name
    );
    let list = snapshot_list(env, kind, ours);
    assert_eq!(
        list,
        snapshot_list(env, kind, theirs),
        "{} after {what}",
        kind.name
    );
    assert!(
        guest(env, kind, ours, None) == guest(env, kind, theirs, None),
        "{} after {what}: the active disks differ",
        kind.name
    );
    let img = open(env, kind, ours);
    let names: Vec<String> = img.snapshots().iter().map(|s| s.name.clone()).collect();
    drop(img);
    for name in names {
        assert!(
            guest(env, kind, ours, Some(&name)) == guest(env, kind, theirs, Some(&name)),
            "{} after {what}: snapshot {name} differs",
            kind.name
        );
    }
}

fn run_kind(env: &Env, kind: &Kind) {
    let (ours, theirs) = (
        format!("{}-ours.qcow2", kind.name),
        format!("{}-qemu.qcow2", kind.name),
    );
    prepare(env, kind, &ours);
    env.copy(&ours, &theirs);
    let both = |cmds: Vec<String>| {
        qemu_io(env, kind, &ours, &cmds);
        qemu_io(env, kind, &theirs, &cmds);
    };

    let snap = open(env, kind, &ours)
        .create_snapshot("s1")
        .expect("create s1");
    assert_eq!((snap.id.as_str(), snap.disk_size), ("1", Some(GUEST)));
    qemu_snapshot(env, kind, &theirs, "-c", "s1");
    assert_same(env, kind, &ours, &theirs, "-c s1");

    both(writes(1));
    open(env, kind, &ours)
        .create_snapshot("s2")
        .expect("create s2");
    qemu_snapshot(env, kind, &theirs, "-c", "s2");
    both(writes(2));
    assert_same(env, kind, &ours, &theirs, "-c s2 and writes");

    // The crate's writer on its copy, QEMU's on the other: the same bytes.
    let writer = open(env, kind, &ours).into_writer().expect("writer");
    writer
        .write_all_at(2 << 20, &[0x77; 70_000])
        .expect("write");
    writer.close().expect("close");
    qemu_io(env, kind, &theirs, &["write -P 0x77 2M 70000".to_owned()]);
    assert_same(env, kind, &ours, &theirs, "writes over shared clusters");

    open(env, kind, &ours)
        .delete_snapshot("s1")
        .expect("delete s1");
    qemu_snapshot(env, kind, &theirs, "-d", "s1");
    assert_same(env, kind, &ours, &theirs, "-d s1");

    open(env, kind, &ours)
        .apply_snapshot("s2")
        .expect("apply s2");
    qemu_snapshot(env, kind, &theirs, "-a", "s2");
    assert_same(env, kind, &ours, &theirs, "-a s2");

    both(writes(3));
    open(env, kind, &ours)
        .create_snapshot("s3")
        .expect("create s3");
    qemu_snapshot(env, kind, &theirs, "-c", "s3");
    open(env, kind, &ours)
        .delete_snapshot("s2")
        .expect("delete s2");
    qemu_snapshot(env, kind, &theirs, "-d", "s2");
    assert_same(env, kind, &ours, &theirs, "-c s3, -d s2");
    open(env, kind, &ours)
        .delete_snapshot("s3")
        .expect("delete s3");
    qemu_snapshot(env, kind, &theirs, "-d", "s3");
    assert_same(env, kind, &ours, &theirs, "the last snapshot deleted");
}

#[test]
fn snapshots_match_qemu_on_every_kind() {
    let Some(env) = Env::new("snapshots_match_qemu_on_every_kind") else {
        return;
    };
    for kind in KINDS {
        run_kind(&env, kind);
    }
}

#[test]
fn refusals_match_qemu() {
    let Some(env) = Env::new("snapshot_refusals_match_qemu") else {
        return;
    };
    let kind = &KINDS[0];
    // An external data file: QEMU refuses internal snapshots.
    env.create("data.qcow2", GUEST, "data_file=data.raw");
    let mut img = Qcow2::open_path_with(env.path("data.qcow2"), &OpenOptions::new().write(true))
        .expect("open");
    assert!(matches!(
        img.create_snapshot("s"),
        Err(qcow2::Error::UnsupportedWrite { .. })
    ));
    // A read-only open.
    env.create("plain.qcow2", GUEST, "");
    let mut img = Qcow2::open_path(env.path("plain.qcow2")).expect("open");
    assert!(matches!(
        img.create_snapshot("s"),
        Err(qcow2::Error::ReadOnly)
    ));
    // Missing snapshots.
    let mut img = open(&env, kind, "plain.qcow2");
    assert!(matches!(
        img.apply_snapshot("nope"),
        Err(qcow2::Error::NoSuchSnapshot(_))
    ));
    assert!(matches!(
        img.delete_snapshot("nope"),
        Err(qcow2::Error::NoSuchSnapshot(_))
    ));
    drop(img);
    // Bitmaps block -a, as in QEMU, but not -c.
    env.img(&["bitmap", "--add", "plain.qcow2", "b0"]);
    let mut img = open(&env, kind, "plain.qcow2");
    img.create_snapshot("s").expect("create with a bitmap");
    let applied = img.apply_snapshot("s");
    assert!(
        matches!(applied, Err(qcow2::Error::UnsupportedWrite { .. })),
        "{applied:?}"
    );
    drop(img);
    let (corrupt, leaks, report) = check(&env, kind, "plain.qcow2");
    assert_eq!((corrupt, leaks), (0, 0), "{report}");
    // One-bit refcounts cannot count a second reference: QEMU fails ("Invalid argument")
    // and leaks a cluster; the crate refuses before writing anything.
    env.create("rc1.qcow2", GUEST, "refcount_bits=1");
    env.io("rc1.qcow2", &["write -P 1 0 1M"]);
    let before = env.read_file("rc1.qcow2");
    let mut img = open(&env, kind, "rc1.qcow2");
    let refused = img.create_snapshot("s");
    assert!(
        matches!(&refused, Err(qcow2::Error::InvalidOption { option, .. }) if option == "refcount_bits"),
        "{refused:?}"
    );
    drop(img);
    assert!(
        env.read_file("rc1.qcow2") == before,
        "a refused snapshot changed the file"
    );
}

/// The command: the same exit codes and messages as qemu-img for each action and refusal.
#[test]
fn command_matches_qemu_img() {
    let Some(env) = Env::new("snapshot_command_matches_qemu_img") else {
        return;
    };
    let bin = env!("CARGO_BIN_EXE_qcow2");
    env.create("a.qcow2", GUEST, "");
    env.io("a.qcow2", &["write -P 1 0 1M"]);
    env.copy("a.qcow2", "b.qcow2");
    env.create("d.qcow2", GUEST, "data_file=d.raw");
    let cases: &[&[&str]] = &[
        &["-c", "s1"],
        &["-c", "s1"],
        &["-c", "1"],
        &["-d", "1"], // by name: the snapshot named "1", not id 1
        &["-d", "nope"],
        &["-a", "nope"],
        &["-a", "2"], // by id
        &["-a", "s1"],
        &["-l"],
        &[],
        &["-c", "x", "-l"],
    ];
    for args in cases {
        let run = |tool: &Path, image: &str| {
            let out = Command::new(tool)
                .current_dir(env.dir.path())
                .arg("snapshot")
                .args(*args)
                .arg(image)
                .output()
                .expect("run");
            let stderr = String::from_utf8_lossy(&out.stderr)
                .replace("qemu-img", "TOOL")
                .replace("qcow2:", "TOOL:")
                .replace(image, "IMG")
                .lines()
                .next()
                .unwrap_or("")
                .to_owned();
            let stdout = String::from_utf8_lossy(&out.stdout).lines().count();
            (out.status.code(), stderr, stdout)
        };
        let ours = run(Path::new(bin), "a.qcow2");
        let theirs = run(&env.qemu.img, "b.qcow2");
        assert_eq!(ours, theirs, "snapshot {args:?}");
    }
    let ours = Command::new(bin)
        .current_dir(env.dir.path())
        .args(["snapshot", "-c", "s", "d.qcow2"])
        .output()
        .expect("run");
    assert_eq!(ours.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&ours.stderr).trim(),
        "qcow2: Could not create snapshot 's': Operation not supported"
    );
    let kind = &KINDS[0];
    assert_eq!(
        snapshot_list(&env, kind, "a.qcow2"),
        snapshot_list(&env, kind, "b.qcow2")
    );
    assert!(guest(&env, kind, "a.qcow2", None) == guest(&env, kind, "b.qcow2", None));
}

/// A job to run over a crash-logging storage.
type Job = fn(&mut Qcow2<CrashStorage>) -> qcow2::Result<()>;

/// What a job did: the file before, the log of its writes and syncs.
struct Recorded {
    initial: Vec<u8>,
    storage: CrashStorage,
}

/// Run `job` through the crate on a copy of `image` over a [`CrashStorage`].
fn record_crate(env: &Env, kind: &Kind, image: &str, job: Job, what: &str) -> Recorded {
    let initial = env.read_file(image);
    let storage = CrashStorage::new(initial.clone());
    let mut img = Qcow2::open_with(storage.clone(), &open_options(kind)).expect("open");
    if kind.backing {
        img.set_backing_image(Qcow2::open_path(env.path(&format!("{image}.base"))).expect("base"));
    }
    job(&mut img).unwrap_or_else(|e| panic!("{what}: {e}"));
    drop(img);
    Recorded { initial, storage }
}

/// Run `qemu-img snapshot FLAG NAME` on a copy of `image` over a [`CrashStorage`] served by
/// NBD: the control.
fn record_qemu(env: &Env, kind: &Kind, image: &str, flag: &str, name: &str) -> Recorded {
    let initial = env.read_file(image);
    let storage = CrashStorage::new(initial.clone());
    let server = NbdServer::start(storage.clone(), 4 << 30, env.dir.path(), "nbd.sock");
    let mut opts = server.image_opts("");
    if kind.backing {
        opts.push_str(&format!(
            ",backing.driver=qcow2,backing.file.driver=file,backing.file.filename={}",
            env.path(&format!("{image}.base")).display()
        ));
    }
    let args = vec![
        "snapshot".to_owned(),
        flag.to_owned(),
        name.to_owned(),
        "--image-opts".to_owned(),
        opts,
    ];
    let out = qemu_img(env, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(server);
    Recorded { initial, storage }
}

/// A cut image's state: the snapshot list and every layer's guest, and its leaked clusters;
/// or the corruption `qemu-img check` found.
type State = Result<((Vec<String>, Vec<Vec<u8>>), u64), String>;

fn state_of(env: &Env, kind: &Kind, bytes: &[u8]) -> State {
    let name = "cut.qcow2";
    std::fs::write(env.path(name), bytes).expect("write cut image");
    let (corrupt, leaks, report) = check(env, kind, name);
    if corrupt != 0 {
        return Err(format!("{corrupt} corruptions: {report}"));
    }
    let list = snapshot_list(env, kind, name);
    let img = open(env, kind, name);
    let names: Vec<String> = img.snapshots().iter().map(|s| s.name.clone()).collect();
    drop(img);
    let mut layers = vec![guest(env, kind, name, None)];
    for n in names {
        layers.push(guest(env, kind, name, Some(&n)));
    }
    Ok(((list, layers), leaks))
}

/// What the cuts of one job left.
#[derive(Default)]
struct Judged {
    images: usize,
    /// Corrupt, or neither the old image nor the new one.
    failures: Vec<String>,
    /// Clean and old or new, but leaking clusters (allowed; the crate leaks none).
    leaking: usize,
}

/// Cut the log at every event (power cuts: every pending write kept, none, all but one,
/// only one; a kill keeps all) and judge every distinct image left.
fn judge_cuts(env: &Env, kind: &Kind, run: &Recorded, what: &str) -> Judged {
    let log = run.storage.log();
    let (old, _) = state_of(env, kind, &run.initial).expect("the image before the job");
    let (new, _) = state_of(env, kind, &run.storage.contents()).expect("the image after the job");
    assert!(old != new, "{what}: the job changed nothing visible");
    let mut judged = Judged::default();
    let mut seen = std::collections::HashSet::new();
    for cut in 0..=log.len() {
        let pending = window(&log, cut).pending.len();
        let mut subsets = vec![Subset::All, Subset::None];
        for i in 0..pending {
            subsets.push(Subset::AllBut(i));
            subsets.push(Subset::Only(i));
        }
        for subset in subsets {
            let bytes = replay(&run.initial, &log, cut, subset);
            if !seen.insert(common::sha256_hex(&bytes)) {
                continue;
            }
            match state_of(env, kind, &bytes) {
                Ok((got, leaks)) if got == old || got == new => {
                    judged.leaking += usize::from(leaks > 0);
                }
                Ok((got, _)) => judged.failures.push(format!(
                    "{what}: the cut before event {cut} ({subset:?}) left neither the old image \
                     nor the new one: snapshots {:?}",
                    got.0
                )),
                Err(e) => judged.failures.push(format!(
                    "{what}: the cut before event {cut} ({subset:?}): {e}"
                )),
            }
        }
    }
    judged.images = seen.len();
    judged
}

/// The crash test's images: `kind` with a snapshot "first" and writes after it.
fn crash_image(env: &Env, kind: &Kind) -> String {
    let image = format!("{}.qcow2", kind.name);
    prepare(env, kind, &image);
    qemu_snapshot(env, kind, &image, "-c", "first");
    qemu_io(env, kind, &image, &writes(1));
    image
}

const CRASH_KINDS: [&str; 5] = ["v3", "rc2", "l2ext", "zlib", "chain"];

#[test]
fn snapshot_jobs_survive_a_crash_at_every_write() {
    let Some(env) = Env::new("snapshot_jobs_survive_a_crash_at_every_write") else {
        return;
    };
    let mut total = 0;
    let jobs: [(Job, &str); 3] = [
        (|i| i.create_snapshot("new").map(|_| ()), "-c"),
        (|i| i.delete_snapshot("first").map(|_| ()), "-d"),
        (|i| i.apply_snapshot("first"), "-a"),
    ];
    for kind in KINDS.iter().filter(|k| CRASH_KINDS.contains(&k.name)) {
        let image = crash_image(&env, kind);
        for (job, what) in jobs {
            let what = format!("{} {what}", kind.name);
            let run = record_crate(&env, kind, &image, job, &what);
            let judged = judge_cuts(&env, kind, &run, &what);
            assert!(judged.failures.is_empty(), "{}", judged.failures.join("\n"));
            assert_eq!(judged.leaking, 0, "{what}: cut images leak clusters");
            total += judged.images;
        }
    }
    eprintln!("snapshot crash test: {total} distinct cut images judged, none failing");
    assert!(total > 30, "too few cut images: {total}");
}

/// The control: `qemu-img snapshot` through the same harness (over NBD). QEMU changes its
/// tables in place, so some cuts leave corruption; the figures are printed, the test only
/// asserts that the harness ran it.
#[test]
fn qemu_snapshot_jobs_through_the_same_harness() {
    let Some(env) = Env::new("qemu_snapshot_jobs_through_the_same_harness") else {
        return;
    };
    let (mut total, mut failing, mut leaking) = (0, 0, 0);
    for kind in KINDS.iter().filter(|k| CRASH_KINDS.contains(&k.name)) {
        let image = crash_image(&env, kind);
        for (flag, name) in [("-c", "new"), ("-d", "first"), ("-a", "first")] {
            let what = format!("qemu {} {flag}", kind.name);
            let run = record_qemu(&env, kind, &image, flag, name);
            let judged = judge_cuts(&env, kind, &run, &what);
            if let Some(first) = judged.failures.first() {
                let first = first.lines().next().unwrap_or("");
                eprintln!(
                    "{what}: {} of {} cut images fail; first: {first}",
                    judged.failures.len(),
                    judged.images
                );
            }
            total += judged.images;
            failing += judged.failures.len();
            leaking += judged.leaking;
        }
    }
    eprintln!(
        "qemu-img snapshot through the crash harness: {failing} of {total} cut images corrupt \
         or neither old nor new, {leaking} more leak clusters"
    );
    assert!(total > 30, "too few cut images: {total}");
}

/// QEMU does not write the padding of the table's last entry: a table that ends the file
/// ends with a partial entry's padding missing (a 1 GiB image with 16 snapshots is so).
#[test]
fn a_snapshot_table_that_ends_the_file() {
    let Some(env) = Env::new("a_snapshot_table_that_ends_the_file") else {
        return;
    };
    let kind = &KINDS[0];
    env.create("a.qcow2", GUEST, "");
    env.io("a.qcow2", &["write -P 1 0 1M"]);
    for name in ["s1", "q2", "q3", "q4"] {
        qemu_snapshot(&env, kind, "a.qcow2", "-c", name);
    }
    let file = env.read_file("a.qcow2");
    let table_at = u64::from_be_bytes(file[64..72].try_into().unwrap());
    assert!(
        table_at + 4 * 72 > file.len() as u64,
        "the case needs the table last in the file"
    );
    let mut img = open(&env, kind, "a.qcow2");
    img.create_snapshot("s2").expect("create");
    img.delete_snapshot("s1").expect("delete");
    drop(img);
    let (corrupt, leaks, report) = check(&env, kind, "a.qcow2");
    assert_eq!((corrupt, leaks), (0, 0), "{report}");
    assert_eq!(snapshot_list(&env, kind, "a.qcow2").len(), 4);
}
