//! Persistent dirty bitmaps kept by the writer, against QEMU: the same writes, zero writes
//! and discards through `qemu-io` on one copy of an image with bitmaps (made by `qemu-img
//! bitmap`, at granularities 512 B to 64 KiB, one disabled, with bits QEMU set before) and
//! through [`qcow2::Writer`] on another leave the same bitmaps: the same flags, the same dirty
//! extents (read with [`Qcow2::dirty_extents`], itself checked against `qemu-nbd` in
//! `bitmap.rs`), and a clean image with no leaks. While a writer is open its bitmaps are in
//! use on disk, as QEMU marks them; after a crash they stay in use, as QEMU leaves them.

use crate::common;

use common::{Env, Rng};
use qcow2::{OpenOptions, Qcow2};

/// One guest operation, in both tools' terms.
#[derive(Debug, Clone, Copy)]
enum Op {
    Write { pos: u64, len: u64 },
    Zero { pos: u64, len: u64, unmap: bool },
    Discard { pos: u64, len: u64 },
    Flush,
}

impl Op {
    fn qemu_io(&self) -> String {
        match *self {
            Op::Write { pos, len } => format!("write -q -P 0x5a {pos} {len}"),
            Op::Zero { pos, len, unmap } => {
                format!("write -q -z {}{pos} {len}", if unmap { "-u " } else { "" })
            }
            Op::Discard { pos, len } => format!("discard -q {pos} {len}"),
            Op::Flush => "flush".to_owned(),
        }
    }

    fn apply<I: qcow2::Storage>(&self, w: &qcow2::Writer<I>) {
        let done = match *self {
            Op::Write { pos, len } => w.write_all_at(pos, &vec![0x5a; len as usize]),
            Op::Zero { pos, len, unmap } => w.write_zeroes(pos, len, unmap),
            Op::Discard { pos, len } => w.discard(pos, len),
            Op::Flush => w.flush(),
        };
        done.unwrap_or_else(|e| panic!("{self:?}: {e}"));
    }
}

/// `count` random operations in a guest of `size` bytes: aligned and not, a byte to a few
/// MiB (crossing data clusters of the finest bitmaps), discards and zero writes unaligned too.
fn script(seed: u64, size: u64, count: usize) -> Vec<Op> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|_| {
            let len = match rng.below(3) {
                0 => 1 + rng.below(5000),
                1 => 4096 << rng.below(5),
                _ => 1 + rng.below(3 << 20),
            };
            let len = len.min(size);
            let mut pos = rng.below(size - len + 1);
            if rng.below(2) == 0 {
                pos &= !4095;
            }
            match rng.below(8) {
                0 => Op::Zero {
                    pos,
                    len,
                    unmap: rng.below(2) == 0,
                },
                1 => Op::Discard { pos, len },
                2 => Op::Flush,
                _ => Op::Write { pos, len },
            }
        })
        .collect()
}

/// Add the bitmaps every case has to `image`, and let QEMU set some bits in the enabled ones.
fn add_bitmaps(env: &Env, image: &str, size: u64) {
    for (name, granularity, disabled) in [
        ("g512", "512", false),
        ("g4k", "4096", false),
        ("g64k", "65536", false),
        ("off", "4096", true),
    ] {
        let mut args = vec!["bitmap", "--add", "-g", granularity];
        if disabled {
            args.push("--disable");
        }
        args.extend([image, name]);
        env.img(&args);
    }
    env.io(
        image,
        &[
            "write -q -P 1 4096 8192".to_owned(),
            format!("write -q -P 2 {} 512", size - 512),
        ],
    );
}

/// Each bitmap's name, flags, granularity and dirty extents (`None` when in use).
type Dump = Vec<(String, Vec<&'static str>, u64, Option<Vec<(u64, u64)>>)>;

fn dump(env: &Env, image: &str) -> Dump {
    let image = Qcow2::open_path(env.path(image)).unwrap();
    image
        .bitmaps()
        .iter()
        .map(|b| {
            let extents = (!b.in_use()).then(|| {
                image
                    .dirty_extents(&b.name)
                    .unwrap()
                    .map(|e| e.map(|e| (e.start, e.length)))
                    .collect::<qcow2::Result<Vec<_>>>()
                    .unwrap()
            });
            (b.name.clone(), b.flag_names(), b.granularity, extents)
        })
        .collect()
}

/// `qemu-img check`: no corruption, and no leaks unless `leaks_allowed`.
fn check(env: &Env, image: &str, leaks_allowed: bool) {
    check_with(env, &[image], leaks_allowed);
}

/// [`check`] with qemu-img's arguments for the image (`--object`, `--image-opts`).
fn check_with(env: &Env, args: &[&str], leaks_allowed: bool) {
    let image = args.last().copied().unwrap_or_default();
    let out = std::process::Command::new(&env.qemu.img)
        .current_dir(env.dir.path())
        .args(["check", "--output=json"])
        .args(args)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "qemu-img check {image}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    // qemu-img leaves out the counts that are zero.
    assert!(
        report.get("corruptions").is_none_or(|c| c == 0),
        "{image}: {report}"
    );
    assert_eq!(report["check-errors"], 0, "{image}: {report}");
    if !leaks_allowed {
        assert!(
            report.get("leaks").is_none_or(|l| l == 0),
            "{image}: {report}"
        );
    }
}

fn open_writer(env: &Env, image: &str) -> qcow2::Writer<std::fs::File> {
    Qcow2::open_path_with(env.path(image), &OpenOptions::new().write(true))
        .unwrap()
        .into_writer()
        .unwrap()
}

/// `ops` through qemu-io on theirs.qcow2 and through the writer on ours.qcow2.
fn run_both(env: &Env, ops: &[Op]) {
    let mut cmds: Vec<String> = ops.iter().map(Op::qemu_io).collect();
    cmds.push("flush".into());
    env.io("theirs.qcow2", &cmds);
    let writer = open_writer(env, "ours.qcow2");
    for op in ops {
        op.apply(&writer);
    }
    writer.close().unwrap();
}

/// Make `{side}.qcow2` (`side`: "theirs" or "ours") of `size` bytes with `qemu-img create -o
/// OPTS` (`{side}` in OPTS replaced), over base.qcow2 when `backing`, then `prepare` it with
/// qemu-io commands (before the bitmaps exist) and add the bitmaps. Both sides are made by
/// the same commands, so they start equal (each with its own data file when it has one).
struct Kind<'a> {
    opts: &'a str,
    size: u64,
    backing: bool,
    prepare: &'a [&'a str],
    snapshot: bool,
}

impl Kind<'_> {
    fn make(&self, env: &Env, side: &str) {
        let image = format!("{side}.qcow2");
        let opts = self.opts.replace("{side}", side);
        if self.backing {
            env.create_over(&image, self.size, &opts, "base.qcow2", "qcow2");
        } else {
            env.create(&image, self.size, &opts);
        }
        if !self.prepare.is_empty() {
            env.io(&image, self.prepare);
        }
        if self.snapshot {
            env.img(&["snapshot", "-c", "snap", &image]);
        }
        add_bitmaps(env, &image, self.size);
    }
}

/// The same scripts through both tools on images of `kind`: the same bitmaps, the same
/// guest, a clean image with no leaks.
fn same_as_qemu(test: &str, kind: Kind, seeds: std::ops::Range<u64>) {
    let Some(env) = Env::new(test) else { return };
    if kind.backing {
        env.create("base.qcow2", kind.size, "");
        env.io("base.qcow2", &["write -q -P 7 0 1M", "write -q -P 8 5M 3M"]);
    }
    for seed in seeds {
        kind.make(&env, "theirs");
        kind.make(&env, "ours");
        let before = dump(&env, "ours.qcow2");
        let ops = script(seed, kind.size, 40);
        run_both(&env, &ops);
        let (ours, theirs) = (dump(&env, "ours.qcow2"), dump(&env, "theirs.qcow2"));
        assert_eq!(ours, theirs, "seed {seed}, ops {ops:?}");
        assert_eq!(ours[3], before[3], "the disabled bitmap is as it was");
        assert_ne!(ours[0], before[0], "the writes were recorded");
        env.img(&["compare", "-q", "theirs.qcow2", "ours.qcow2"]);
        check(&env, "ours.qcow2", false);
    }
}

/// A kind of image: `opts` for qemu-img create, nothing else.
fn plain(opts: &str, size: u64) -> Kind<'_> {
    Kind {
        opts,
        size,
        backing: false,
        prepare: &[],
        snapshot: false,
    }
}

#[test]
fn clusters_64k() {
    same_as_qemu("bmw_64k", plain("", 64 << 20), 0..3);
}

#[test]
fn clusters_512_bytes() {
    // 4096 bits a bitmap data cluster: 2 MiB of guest at 512 B granularity.
    same_as_qemu("bmw_512", plain("cluster_size=512", 8 << 20), 10..12);
}

#[test]
fn refcount_widths_and_lazy_refcounts() {
    let r1 = "cluster_size=4096,refcount_bits=1";
    same_as_qemu("bmw_r1", plain(r1, 16 << 20), 20..21);
    let r64 = "cluster_size=4096,refcount_bits=64";
    same_as_qemu("bmw_r64", plain(r64, 16 << 20), 21..22);
    same_as_qemu("bmw_lazy", plain("lazy_refcounts=on", 16 << 20), 22..23);
}

#[test]
fn over_a_backing_file() {
    let kind = Kind {
        backing: true,
        ..plain("cluster_size=4096", 16 << 20)
    };
    same_as_qemu("bmw_backing", kind, 30..32);
}

#[test]
fn extended_l2() {
    same_as_qemu("bmw_extl2", plain("extended_l2=on", 32 << 20), 50..51);
    let small = "extended_l2=on,cluster_size=16k";
    same_as_qemu("bmw_extl2_16k", plain(small, 8 << 20), 51..52);
}

#[test]
fn external_data_files() {
    same_as_qemu("bmw_data", plain("data_file={side}.data", 16 << 20), 60..61);
    let raw = "data_file={side}.data,data_file_raw=on";
    same_as_qemu("bmw_data_raw", plain(raw, 16 << 20), 61..62);
}

#[test]
fn compressed_clusters_and_internal_snapshots() {
    let kind = Kind {
        prepare: &["write -q -c -P 3 0 2M", "write -q -P 4 4M 4M"],
        snapshot: true,
        ..plain("", 16 << 20)
    };
    same_as_qemu("bmw_snap", kind, 70..72);
}

/// `qemu-img info -U`'s flags of each bitmap.
fn qemu_flags(env: &Env, image: &str) -> Vec<Vec<String>> {
    let info = env.img(&["info", "-U", "--output=json", image]);
    let info: serde_json::Value = serde_json::from_slice(&info).unwrap();
    info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            b["flags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_str().unwrap().to_owned())
                .collect()
        })
        .collect()
}

/// While the writer is open, its bitmaps are in use on disk (as QEMU marks them, `auto`
/// kept); closed, they are not, and the extension survives (the autoclear bit kept).
#[test]
fn bitmaps_are_in_use_while_the_writer_is_open() {
    let Some(env) = Env::new("bmw_in_use") else {
        return;
    };
    env.create("ours.qcow2", 16 << 20, "");
    add_bitmaps(&env, "ours.qcow2", 16 << 20);
    let closed = vec![
        vec!["auto".to_owned()],
        vec!["auto".to_owned()],
        vec!["auto".to_owned()],
        vec![],
    ];
    assert_eq!(qemu_flags(&env, "ours.qcow2"), closed);
    let writer = open_writer(&env, "ours.qcow2");
    let open: Vec<Vec<String>> = closed
        .iter()
        .map(|f| [vec!["in-use".to_owned()], f.clone()].concat())
        .collect();
    assert_eq!(qemu_flags(&env, "ours.qcow2"), open);
    writer.write_all_at(1 << 20, &[1; 4096]).unwrap();
    writer.flush().unwrap();
    assert_eq!(qemu_flags(&env, "ours.qcow2"), open);
    let image = writer.close().unwrap();
    assert_eq!(image.bitmaps().len(), 4);
    assert!(image.bitmaps().iter().all(|b| !b.in_use()));
    let extents: Vec<_> = image
        .dirty_extents("g64k")
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    // QEMU's two writes (at 4 KiB and in the last 512 bytes) and this one.
    let runs: Vec<_> = extents.iter().map(|e| (e.start, e.length)).collect();
    assert_eq!(
        runs,
        [(0, 65536), (1 << 20, 65536), ((16 << 20) - 65536, 65536)]
    );
    drop(image);
    assert_eq!(qemu_flags(&env, "ours.qcow2"), closed);
    check(&env, "ours.qcow2", false);
}

/// A writer that dies without closing leaves its bitmaps in use, as a killed qemu-io does;
/// the next writer keeps them in use (inconsistent: QEMU records nothing into them and
/// stores them as they are) while a bitmap added since works as usual.
#[test]
fn a_crash_leaves_bitmaps_in_use_as_qemu_does() {
    let Some(env) = Env::new("bmw_crash") else {
        return;
    };
    let size = 16 << 20;
    env.create("theirs.qcow2", size, "cluster_size=4096");
    add_bitmaps(&env, "theirs.qcow2", size);
    env.copy("theirs.qcow2", "ours.qcow2");
    let ops = script(40, size, 20);
    let mut cmds: Vec<String> = ops.iter().map(Op::qemu_io).collect();
    cmds.push("flush".into());
    env.qemu
        .io_crash(env.dir.path(), "qcow2", "theirs.qcow2", &cmds);
    let writer = open_writer(&env, "ours.qcow2");
    for op in &ops {
        op.apply(&writer);
    }
    writer.flush().unwrap();
    std::mem::forget(writer); // killed: nothing stored, nothing cleared
    let (ours, theirs) = (dump(&env, "ours.qcow2"), dump(&env, "theirs.qcow2"));
    assert_eq!(ours, theirs);
    assert!(ours.iter().all(|b| b.1.contains(&"in-use")), "{ours:?}");
    check(&env, "ours.qcow2", true);
    env.img(&["compare", "-q", "theirs.qcow2", "ours.qcow2"]);

    for image in ["theirs.qcow2", "ours.qcow2"] {
        env.img(&["bitmap", "--add", "-g", "8192", image, "new"]);
    }
    run_both(&env, &script(41, size, 20));
    let (ours, theirs) = (dump(&env, "ours.qcow2"), dump(&env, "theirs.qcow2"));
    assert_eq!(ours, theirs);
    assert!(
        ours[..4].iter().all(|b| b.1.contains(&"in-use")),
        "{ours:?}"
    );
    assert_eq!(ours[4].1, ["auto"]);
    assert!(ours[4].3.as_ref().is_some_and(|e| !e.is_empty()));
    check(&env, "ours.qcow2", true);
    env.img(&["compare", "-q", "theirs.qcow2", "ours.qcow2"]);
}

/// Four threads writing through one writer at once: every write is recorded (the bits do
/// not depend on the order, so QEMU running the same operations one by one is the truth).
#[test]
fn threads_writing_at_once_record_every_write() {
    let Some(env) = Env::new("bmw_threads") else {
        return;
    };
    let kind = plain("cluster_size=4096", 32 << 20);
    kind.make(&env, "theirs");
    kind.make(&env, "ours");
    let ops = script(80, kind.size, 120);
    let cmds: Vec<String> = ops.iter().map(Op::qemu_io).collect();
    env.io("theirs.qcow2", &cmds);
    let writer = open_writer(&env, "ours.qcow2");
    std::thread::scope(|s| {
        for t in 0..4 {
            let (writer, ops) = (&writer, &ops);
            s.spawn(move || {
                for op in ops.iter().skip(t).step_by(4) {
                    op.apply(writer);
                }
            });
        }
    });
    writer.close().unwrap();
    assert_eq!(dump(&env, "ours.qcow2"), dump(&env, "theirs.qcow2"));
    check(&env, "ours.qcow2", false);
}

/// A LUKS encrypted image: bitmaps are not encrypted, and are kept the same way.
#[test]
fn luks_encrypted() {
    let Some(env) = Env::new("bmw_luks") else {
        return;
    };
    let object = "secret,id=sec0,data=hunter2";
    let opts = |image: &str| format!("driver=qcow2,file.filename={image},encrypt.key-secret=sec0");
    let io = |image: &str, cmds: &[String]| {
        let mut io = std::process::Command::new(&env.qemu.io);
        io.current_dir(env.dir.path())
            .args(["--object", object, "--image-opts"]);
        for c in cmds {
            io.args(["-c", c]);
        }
        let out = io.arg(opts(image)).output().unwrap();
        assert!(
            out.status.success(),
            "qemu-io: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let size = 16u64 << 20;
    // One image, copied: making a LUKS header takes seconds.
    {
        let image = "theirs.qcow2".to_owned();
        env.img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            object,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,cluster_size=4096",
            &image,
            &size.to_string(),
        ]);
        for (name, granularity) in [("g512", "512"), ("g64k", "65536")] {
            env.img(&[
                "bitmap",
                "--object",
                object,
                "--image-opts",
                "--add",
                "-g",
                granularity,
                &opts(&image),
                name,
            ]);
        }
        io(&image, &["write -q -P 1 4096 8192".to_owned()]);
    }
    env.copy("theirs.qcow2", "ours.qcow2");
    let ops = script(90, size, 30);
    let mut cmds: Vec<String> = ops.iter().map(Op::qemu_io).collect();
    cmds.push("flush".into());
    io("theirs.qcow2", &cmds);
    let options = OpenOptions::new().write(true).secret("hunter2");
    let writer = Qcow2::open_path_with(env.path("ours.qcow2"), &options)
        .unwrap()
        .into_writer()
        .unwrap();
    for op in &ops {
        op.apply(&writer);
    }
    writer.close().unwrap();
    let ours = dump(&env, "ours.qcow2");
    assert_eq!(ours, dump(&env, "theirs.qcow2"));
    assert!(ours.iter().all(|b| b.1 == ["auto"]), "{ours:?}");
    env.img(&[
        "compare",
        "-q",
        "--object",
        object,
        "--image-opts",
        &opts("theirs.qcow2"),
        &opts("ours.qcow2"),
    ]);
    check_with(
        &env,
        &["--object", object, "--image-opts", &opts("ours.qcow2")],
        false,
    );
}

/// Writes, a resize (qemu-io's `truncate`), more writes: the bitmaps grow with the guest, the
/// new part clean, as QEMU's do. With an inconsistent bitmap the resize is refused, as QEMU
/// refuses it.
#[test]
fn resize_grows_the_bitmaps() {
    let Some(env) = Env::new("bmw_resize") else {
        return;
    };
    let (from, to) = (8u64 << 20, (20 << 20) + 3584);
    let kind = plain("cluster_size=512", from);
    kind.make(&env, "theirs");
    kind.make(&env, "ours");
    let (ops1, ops2) = (script(100, from, 20), script(101, to, 20));
    let mut cmds: Vec<String> = ops1.iter().map(Op::qemu_io).collect();
    cmds.push(format!("truncate {to}"));
    cmds.extend(ops2.iter().map(Op::qemu_io));
    env.io("theirs.qcow2", &cmds);
    let writer = open_writer(&env, "ours.qcow2");
    for op in &ops1 {
        op.apply(&writer);
    }
    writer.resize(to).unwrap();
    for op in &ops2 {
        op.apply(&writer);
    }
    writer.close().unwrap();
    assert_eq!(dump(&env, "ours.qcow2"), dump(&env, "theirs.qcow2"));
    env.img(&["compare", "-q", "theirs.qcow2", "ours.qcow2"]);
    check(&env, "ours.qcow2", false);

    // Killed while open: every bitmap in use, inconsistent from then on.
    std::mem::forget(open_writer(&env, "ours.qcow2"));
    let writer = open_writer(&env, "ours.qcow2");
    let err = writer.resize(to + (1 << 20)).unwrap_err();
    assert!(err.to_string().contains("inconsistent"), "{err}");
    assert_eq!(writer.guest_size(), to);
    writer.close().unwrap();
    let image = Qcow2::open_path(env.path("ours.qcow2")).unwrap();
    assert_eq!(image.guest_size(), to);
}
