//! Managing persistent dirty bitmaps (add, remove, clear, enable, disable, merge) against
//! QEMU: the same steps by `qemu-img bitmap` (and `qemu-io` for guest writes) on one copy of
//! an image, and by the crate on another, through [`qcow2::Writer`]'s methods (one writer
//! open for the whole script, guest writes through it) and through `qcow2 bitmap` (guest
//! writes by `qemu-io`, so QEMU records into bitmaps the command made). After each script:
//! `qemu-img info` lists the same bitmaps (name, granularity, flags), every consistent
//! bitmap has the same dirty extents (read with [`Qcow2::dirty_extents`], itself checked
//! against `qemu-nbd` in `bitmap.rs`), the guests compare equal and `qemu-img check` finds the
//! crate's image clean, without leaks.
//!
//! Also: the command's messages and exit statuses against qemu-img's, a bitmap left in use by
//! a killed QEMU, and crashes (kill and power cut at every write) during add, remove and
//! merge, over tests/common/crash_storage.rs.

use crate::common;

use std::process::Command;

use common::crash_storage::{replay, window, CrashStorage, Event, Marker, Subset};
use common::{Env, Rng};
use qcow2::{BitmapOptions, BitmapSource, OpenOptions, Qcow2, Writer};

const MIB: u64 = 1 << 20;

/// One step of a script.
#[derive(Debug, Clone)]
enum Step {
    Add {
        name: &'static str,
        granularity: Option<u64>,
        disabled: bool,
    },
    Remove(&'static str),
    Clear(&'static str),
    Enable(&'static str),
    Disable(&'static str),
    /// Merge the second into the first.
    Merge(&'static str, &'static str),
    /// Merge bitmap `.1` of other.qcow2 into `.0`.
    MergeOther(&'static str, &'static str),
    /// Guest writes (`qemu-io write` / zero / discard).
    Writes(u64),
}

impl Step {
    /// `qemu-img bitmap` arguments (before FILENAME BITMAP) and the bitmap.
    fn bitmap_args(&self) -> Option<(Vec<String>, &'static str)> {
        let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        Some(match *self {
            Step::Add {
                name,
                granularity,
                disabled,
            } => {
                let mut args = s(&["--add"]);
                if let Some(g) = granularity {
                    args.extend(["-g".to_owned(), g.to_string()]);
                }
                if disabled {
                    args.push("--disable".to_owned());
                }
                (args, name)
            }
            Step::Remove(name) => (s(&["--remove"]), name),
            Step::Clear(name) => (s(&["--clear"]), name),
            Step::Enable(name) => (s(&["--enable"]), name),
            Step::Disable(name) => (s(&["--disable"]), name),
            Step::Merge(dst, src) => (s(&["--merge", src]), dst),
            Step::MergeOther(dst, src) => (s(&["--merge", src, "-b", "other.qcow2"]), dst),
            Step::Writes(_) => return None,
        })
    }

    fn apply<I: qcow2::Storage>(&self, w: &Writer<I>, env: &Env, size: u64) {
        let done = match *self {
            Step::Add {
                name,
                granularity,
                disabled,
            } => {
                let mut options = BitmapOptions::new().disabled(disabled);
                if let Some(g) = granularity {
                    options = options.granularity(g);
                }
                w.add_bitmap(name, &options)
            }
            Step::Remove(name) => w.remove_bitmap(name),
            Step::Clear(name) => w.clear_bitmap(name),
            Step::Enable(name) => w.enable_bitmap(name),
            Step::Disable(name) => w.disable_bitmap(name),
            Step::Merge(dst, src) => w.merge_bitmap(dst, BitmapSource::here(src)),
            Step::MergeOther(dst, src) => {
                let other = Qcow2::open_path(env.path("other.qcow2")).unwrap();
                w.merge_bitmap(dst, BitmapSource::image(&other, src))
            }
            Step::Writes(seed) => {
                for (cmd, pos, len) in writes(seed, size) {
                    let done = match cmd {
                        0 => w.write_all_at(pos, &vec![0x5a; len as usize]),
                        1 => w.write_zeroes(pos, len, false),
                        _ => w.discard(pos, len),
                    };
                    done.unwrap();
                }
                Ok(())
            }
        };
        done.unwrap_or_else(|e| panic!("{self:?}: {e}"));
    }
}

/// A few guest writes (kind 0 write, 1 zero write, 2 discard), position and length.
fn writes(seed: u64, size: u64) -> Vec<(u8, u64, u64)> {
    let mut rng = Rng::new(seed);
    (0..6)
        .map(|_| {
            let len = (1 + rng.below(3 * MIB)).min(size);
            let pos = rng.below(size - len + 1);
            let kind = match rng.below(6) {
                0 => 1,
                1 => 2,
                _ => 0,
            };
            (kind, pos, len)
        })
        .collect()
}

fn qemu_io_cmds(seed: u64, size: u64) -> Vec<String> {
    writes(seed, size)
        .into_iter()
        .map(|(kind, pos, len)| match kind {
            0 => format!("write -q -P 0x5a {pos} {len}"),
            1 => format!("write -q -z {pos} {len}"),
            _ => format!("discard -q {pos} {len}"),
        })
        .collect()
}

/// `qemu-img info`'s bitmaps: name, granularity, flags.
fn info_bitmaps(env: &Env, image: &str) -> Vec<(String, u64, Vec<String>)> {
    let info = env.img(&["info", "-U", "--output=json", image]);
    let info: serde_json::Value = serde_json::from_slice(&info).unwrap();
    let Some(list) = info["format-specific"]["data"]["bitmaps"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_owned(),
                b["granularity"].as_u64().unwrap(),
                b["flags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect()
}

/// Each consistent bitmap's dirty extents.
fn extents(env: &Env, image: &str) -> Vec<(String, Vec<(u64, u64)>)> {
    let image = Qcow2::open_path(env.path(image)).unwrap();
    image
        .bitmaps()
        .iter()
        .filter(|b| !b.in_use())
        .map(|b| {
            let runs = image
                .dirty_extents(&b.name)
                .unwrap()
                .map(|e| e.map(|e| (e.start, e.length)))
                .collect::<qcow2::Result<Vec<_>>>()
                .unwrap();
            (b.name.clone(), runs)
        })
        .collect()
}

/// A `qemu-nbd` child, killed when dropped.
struct NbdServer(std::process::Child);

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The dirty extents of `bitmap` as QEMU exports them: `qemu-nbd -r -B BITMAP`, read with
/// `qemu-img map` over NBD with `x-dirty-bitmap` (dirty stretches show as holes).
fn nbd_extents(env: &Env, nbd: &std::path::Path, image: &str, bitmap: &str) -> Vec<(u64, u64)> {
    let sock = env.path(&format!("{image}-{bitmap}.sock"));
    let server = NbdServer(
        Command::new(nbd)
            .current_dir(env.dir.path())
            .args(["-r", "-f", "qcow2", "-B", bitmap, "--socket"])
            .arg(&sock)
            .arg(image)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !sock.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-nbd {image} {bitmap}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}",
        sock.display()
    );
    let map = env.img(&["map", "--output=json", "--image-opts", &opts]);
    drop(server);
    let _ = std::fs::remove_file(&sock);
    let map: serde_json::Value = serde_json::from_slice(&map).unwrap();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for e in map.as_array().unwrap() {
        if e["data"].as_bool() != Some(false) {
            continue;
        }
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match runs.last_mut() {
            Some(last) if last.0 + last.1 == start => last.1 += len,
            _ => runs.push((start, len)),
        }
    }
    runs
}

/// `qemu-img check`: no corruption, no leaks unless allowed.
fn check(env: &Env, image: &str, leaks_allowed: bool) {
    let out = Command::new(&env.qemu.img)
        .current_dir(env.dir.path())
        .args(["check", "-U", "--output=json", image])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "qemu-img check {image}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
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

fn open_writer(env: &Env, image: &str) -> Writer<std::fs::File> {
    Qcow2::open_path_with(env.path(image), &OpenOptions::new().write(true))
        .unwrap()
        .into_writer()
        .unwrap()
}

/// `qcow2 ARGS` in the test's directory.
fn cli(env: &Env, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qcow2"))
        .current_dir(env.dir.path())
        .args(args)
        .output()
        .unwrap()
}

/// `qemu-img ARGS` in the test's directory, whatever its status.
fn qemu_img(env: &Env, args: &[&str]) -> std::process::Output {
    Command::new(&env.qemu.img)
        .current_dir(env.dir.path())
        .args(args)
        .output()
        .unwrap()
}

/// The script through qemu-img and qemu-io on theirs.qcow2.
fn run_qemu(env: &Env, image: &str, steps: &[Step], size: u64) {
    for step in steps {
        match step.bitmap_args() {
            Some((args, name)) => {
                let mut all: Vec<&str> = vec!["bitmap"];
                all.extend(args.iter().map(String::as_str));
                all.extend([image, name]);
                env.img(&all);
            }
            None => {
                let Step::Writes(seed) = step else {
                    unreachable!()
                };
                env.io(image, &qemu_io_cmds(*seed, size));
            }
        }
    }
}

/// The script through the `qcow2` command (guest writes by qemu-io).
fn run_cli(env: &Env, image: &str, steps: &[Step], size: u64) {
    for step in steps {
        match step.bitmap_args() {
            Some((args, name)) => {
                let mut all: Vec<&str> = vec!["bitmap"];
                all.extend(args.iter().map(String::as_str));
                all.extend([image, name]);
                let out = cli(env, &all);
                assert!(
                    out.status.success(),
                    "{all:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => {
                let Step::Writes(seed) = step else {
                    unreachable!()
                };
                env.io(image, &qemu_io_cmds(*seed, size));
            }
        }
    }
}

/// The script through one writer.
fn run_library(env: &Env, image: &str, steps: &[Step], size: u64) {
    let writer = open_writer(env, image);
    for step in steps {
        step.apply(&writer, env, size);
    }
    writer.close().unwrap();
}

/// theirs, ours (library) and cli: equal bitmaps, extents, guests; ours and cli clean.
fn assert_same(env: &Env, what: &str) {
    let theirs = info_bitmaps(env, "theirs.qcow2");
    assert!(!theirs.is_empty(), "{what}: the script leaves bitmaps");
    let theirs_extents = extents(env, "theirs.qcow2");
    for side in ["ours.qcow2", "cli.qcow2"] {
        assert_eq!(info_bitmaps(env, side), theirs, "{what}: {side}");
        assert_eq!(extents(env, side), theirs_extents, "{what}: {side}");
        check(env, side, false);
        env.img(&["compare", "-q", "theirs.qcow2", side]);
    }
    // The reader that gave the extents, against QEMU's own export of the library's image.
    match common::find_tool("qemu-nbd", "QEMU_NBD") {
        Some(nbd) => {
            for (name, runs) in extents(env, "ours.qcow2") {
                let exported = nbd_extents(env, &nbd, "ours.qcow2", &name);
                assert_eq!(exported, runs, "{what}: qemu-nbd -B {name}");
            }
        }
        None => common::missing_tool(what, "qemu-nbd"),
    }
}

/// A script that uses every operation, several bitmaps, names reused, granularities from
/// 512 B to 2 MiB, writes between.
fn full_script() -> Vec<Step> {
    vec![
        Step::Add {
            name: "b0",
            granularity: None,
            disabled: false,
        },
        Step::Add {
            name: "b1",
            granularity: Some(512),
            disabled: true,
        },
        Step::Add {
            name: "b2",
            granularity: Some(2 * MIB),
            disabled: false,
        },
        Step::Writes(1),
        Step::Merge("b1", "b0"),
        Step::Enable("b1"),
        Step::Disable("b0"),
        Step::Writes(2),
        Step::Clear("b2"),
        Step::Writes(3),
        Step::Add {
            name: "b3",
            granularity: Some(8192),
            disabled: false,
        },
        Step::Merge("b3", "b1"),
        Step::Remove("b0"),
        Step::Writes(4),
        Step::MergeOther("b3", "ext"),
        Step::Remove("b2"),
        Step::Add {
            name: "b0",
            granularity: Some(4096),
            disabled: true,
        },
        Step::Merge("b0", "b0"),
        Step::Writes(5),
    ]
}

/// The same script by QEMU, the library and the command on three copies of an image made
/// with `opts`; `prepare`: qemu-img bitmap steps and writes before the copies are made.
fn same_as_qemu(test: &str, opts: &str, size: u64, prepare: &[Step]) {
    let Some(env) = Env::new(test) else { return };
    env.create("theirs.qcow2", size, opts);
    run_qemu(&env, "theirs.qcow2", prepare, size);
    env.copy("theirs.qcow2", "ours.qcow2");
    env.copy("theirs.qcow2", "cli.qcow2");
    env.create("other.qcow2", size, "");
    env.img(&["bitmap", "--add", "-g", "16384", "other.qcow2", "ext"]);
    env.io("other.qcow2", &qemu_io_cmds(99, size));
    let script = full_script();
    run_qemu(&env, "theirs.qcow2", &script, size);
    run_library(&env, "ours.qcow2", &script, size);
    run_cli(&env, "cli.qcow2", &script, size);
    assert_same(&env, test);
    let names: Vec<String> = info_bitmaps(&env, "theirs.qcow2")
        .into_iter()
        .map(|b| b.0)
        .collect();
    assert!(
        names.ends_with(&["b1".into(), "b3".into(), "b0".into()]),
        "{names:?}"
    );
}

#[test]
fn clusters_64k() {
    same_as_qemu("bmo_64k", "", 64 * MIB, &[]);
}

#[test]
fn clusters_512_bytes() {
    same_as_qemu("bmo_512", "cluster_size=512", 16 * MIB, &[]);
}

#[test]
fn clusters_2m() {
    same_as_qemu("bmo_2m", "cluster_size=2M", 64 * MIB, &[]);
}

#[test]
fn refcount_bits_1() {
    same_as_qemu("bmo_r1", "cluster_size=4096,refcount_bits=1", 16 * MIB, &[]);
}

#[test]
fn extended_l2() {
    same_as_qemu("bmo_extl2", "extended_l2=on", 32 * MIB, &[]);
}

/// Bitmaps QEMU made first (with bits), then the script: its names come after them.
#[test]
fn over_bitmaps_qemu_made() {
    let prepare = [
        Step::Add {
            name: "old",
            granularity: Some(65536),
            disabled: false,
        },
        Step::Add {
            name: "off",
            granularity: Some(1024),
            disabled: true,
        },
        Step::Writes(7),
    ];
    same_as_qemu("bmo_prepared", "cluster_size=16384", 16 * MIB, &prepare);
}

/// The default granularity: the cluster size within 4 KiB to 64 KiB, as QEMU picks it.
#[test]
fn default_granularity_follows_the_cluster_size() {
    let Some(env) = Env::new("bmo_default") else {
        return;
    };
    for cluster in ["512", "4096", "16384", "65536", "2M"] {
        let opts = format!("cluster_size={cluster}");
        env.create("theirs.qcow2", 8 * MIB, &opts);
        env.create("ours.qcow2", 8 * MIB, &opts);
        env.img(&["bitmap", "--add", "theirs.qcow2", "b"]);
        let w = open_writer(&env, "ours.qcow2");
        w.add_bitmap("b", &BitmapOptions::new()).unwrap();
        w.close().unwrap();
        assert_eq!(
            info_bitmaps(&env, "ours.qcow2"),
            info_bitmaps(&env, "theirs.qcow2"),
            "{cluster}"
        );
        check(&env, "ours.qcow2", false);
    }
}

/// Several operations in one call run in order; a failing one stops the rest, and what the
/// earlier ones did stays (as qemu-img stores it at close).
#[test]
fn cli_runs_operations_in_order() {
    let Some(env) = Env::new("bmo_order") else {
        return;
    };
    env.create("theirs.qcow2", 16 * MIB, "");
    env.copy("theirs.qcow2", "cli.qcow2");
    let calls: [&[&str]; 6] = [
        &["--add", "-g", "1024", "--disable"],
        &["--enable", "--clear", "--disable", "--enable"],
        &["--add", "--add"],
        &[
            "--merge",
            "b",
            "--disable",
            "--remove",
            "--add",
            "-g",
            "4096",
        ],
        &["--clear", "--remove", "--clear"],
        &["--add", "--merge", "x"],
    ];
    for (i, args) in calls.iter().enumerate() {
        let mut all = vec!["bitmap"];
        all.extend_from_slice(args);
        all.extend(["IMG", "b"]);
        let theirs = qemu_img(&env, &swap(&all, "theirs.qcow2"));
        let ours = cli(&env, &swap(&all, "cli.qcow2"));
        assert_eq!(
            ours.status.code(),
            theirs.status.code(),
            "call {i} {args:?}"
        );
        assert_eq!(
            stderr_text(&ours.stderr),
            stderr_text(&theirs.stderr),
            "call {i} {args:?}"
        );
        assert_eq!(
            info_bitmaps(&env, "cli.qcow2"),
            info_bitmaps(&env, "theirs.qcow2"),
            "call {i} {args:?}"
        );
        env.io(
            "theirs.qcow2",
            &[format!("write -q {} 4096", i as u64 * MIB)],
        );
        env.io("cli.qcow2", &[format!("write -q {} 4096", i as u64 * MIB)]);
        assert_eq!(extents(&env, "cli.qcow2"), extents(&env, "theirs.qcow2"));
        check(&env, "cli.qcow2", false);
    }
}

fn swap<'a>(args: &[&'a str], image: &'a str) -> Vec<&'a str> {
    args.iter()
        .map(|&a| if a == "IMG" { image } else { a })
        .collect()
}

/// stderr with the program's name, the node or file name QEMU puts in its "persistent in"
/// messages, and line breaks (the command prints one line) made alike.
fn stderr_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes).replace("qemu-img: ", "qcow2: ");
    let text = match (text.find("persistent in '"), text.find("': ")) {
        (Some(a), Some(b)) if a < b => format!("{}NODE{}", &text[..a + 15], &text[b..]),
        _ => text,
    };
    text.trim_end().replace('\n', " ")
}

/// The command's refusals: qemu-img's message and status, and the image unchanged.
#[test]
fn cli_refuses_as_qemu_img() {
    let Some(env) = Env::new("bmo_refusals") else {
        return;
    };
    env.create("theirs.qcow2", 16 * MIB, "");
    env.img(&["bitmap", "--add", "theirs.qcow2", "b0"]);
    env.img(&["bitmap", "--add", "theirs.qcow2", "b1"]);
    env.io("theirs.qcow2", &["write -q 0 64k"]);
    env.create("small.qcow2", 8 * MIB, "");
    env.img(&["bitmap", "--add", "small.qcow2", "s"]);
    env.create("v2.qcow2", 16 * MIB, "compat=0.10");
    env.create("raw.img", 16 * MIB, "");
    let long = "n".repeat(1024);
    let longest = "m".repeat(1023);
    let cases: Vec<Vec<&str>> = vec![
        vec!["--add", "IMG", "b0"],
        vec!["--add", "IMG", ""],
        vec!["--add", "-g", "256", "IMG", "x"],
        vec!["--add", "-g", "3000", "IMG", "x"],
        vec!["--add", "-g", "4G", "IMG", "x"],
        vec!["--add", "-g", "-5", "IMG", "x"],
        vec!["--add", "-g", "1k", "-g", "junk", "IMG", "x"],
        vec!["--add", "IMG", &long],
        vec!["--remove", "IMG", "nope"],
        vec!["--clear", "IMG", "nope"],
        vec!["--enable", "IMG", "nope"],
        vec!["--disable", "IMG", "nope"],
        vec!["--merge", "nope", "IMG", "b0"],
        vec!["--merge", "b1", "IMG", "nope"],
        vec!["--merge", "s", "-b", "small.qcow2", "IMG", "b0"],
        vec!["--merge", "x", "-b", "small.qcow2", "IMG", "b0"],
        vec!["--merge", "b0", "-b", "raw.img", "-F", "raw", "IMG", "b0"],
        vec!["IMG", "b0"],
        vec!["--remove", "-g", "1k", "IMG", "b0"],
        vec!["--remove", "-F", "qcow2", "IMG", "b0"],
        vec!["--remove", "-b", "small.qcow2", "IMG", "b0"],
        vec!["--remove", "IMG"],
        vec!["--remove", "IMG", "b0", "extra"],
        vec!["--add", "v2.qcow2", "b0"],
        vec!["--add", "IMG", &longest],
        vec!["--add", "-g", "4294967808", "IMG", "trunc"],
        vec!["--add", "-g", "2G", "IMG", "huge"],
        vec![
            "--image-opts",
            "-f",
            "qcow2",
            "--add",
            "driver=qcow2,file.filename=IMG",
            "x",
        ],
    ];
    for case in cases {
        env.copy("theirs.qcow2", "a.qcow2");
        env.copy("theirs.qcow2", "b.qcow2");
        let theirs = qemu_img(&env, &[vec!["bitmap"], swap(&case, "a.qcow2")].concat());
        let ours = cli(&env, &[vec!["bitmap"], swap(&case, "b.qcow2")].concat());
        let label = format!(
            "{:?}",
            case.iter()
                .map(|a| &a[..a.len().min(20)])
                .collect::<Vec<_>>()
        );
        assert_eq!(ours.status.code(), theirs.status.code(), "{label}");
        assert_eq!(
            stderr_text(&ours.stderr),
            stderr_text(&theirs.stderr),
            "{label}"
        );
        assert_eq!(ours.stdout, theirs.stdout, "{label}");
        assert_eq!(
            info_bitmaps(&env, "b.qcow2"),
            info_bitmaps(&env, "a.qcow2"),
            "{label}"
        );
        check(&env, "b.qcow2", false);
    }
}

/// The library's errors: typed for a missing or inconsistent bitmap, QEMU's words otherwise.
#[test]
fn library_refusals() {
    let Some(env) = Env::new("bmo_lib_refusals") else {
        return;
    };
    env.create("img.qcow2", 16 * MIB, "");
    let w = open_writer(&env, "img.qcow2");
    assert!(matches!(
        w.remove_bitmap("x"),
        Err(qcow2::Error::NoSuchBitmap { name }) if name == "x"
    ));
    assert!(matches!(
        w.clear_bitmap("x"),
        Err(qcow2::Error::NoSuchBitmap { .. })
    ));
    w.add_bitmap("a", &BitmapOptions::new()).unwrap();
    let err = w.add_bitmap("a", &BitmapOptions::new()).unwrap_err();
    assert_eq!(err.to_string(), "Bitmap already exists: a");
    let err = w
        .add_bitmap("b", &BitmapOptions::new().granularity(1 << 32))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("Granularity exceeds maximum (2147483648 bytes)"),
        "{err}"
    );
    let err = w.add_bitmap("x\0y", &BitmapOptions::new()).unwrap_err();
    assert!(err.to_string().contains("NUL"), "{err}");
    let err = w.merge_bitmap("a", BitmapSource::here("nope")).unwrap_err();
    assert!(matches!(err, qcow2::Error::NoSuchBitmap { name } if name == "nope"));
    w.close().unwrap();
    check(&env, "img.qcow2", false);
}

/// A bitmap left in use by a killed QEMU: removing it frees its clusters (no leaks), the
/// other operations refuse it as QEMU does, and a bitmap added beside it works.
#[test]
fn a_bitmap_left_in_use() {
    let Some(env) = Env::new("bmo_in_use") else {
        return;
    };
    let size = 16 * MIB;
    env.create("theirs.qcow2", size, "cluster_size=4096");
    env.img(&["bitmap", "--add", "-g", "512", "theirs.qcow2", "stale"]);
    env.img(&["bitmap", "--add", "theirs.qcow2", "kept"]);
    env.io("theirs.qcow2", &qemu_io_cmds(11, size));
    env.qemu
        .io_crash(env.dir.path(), "qcow2", "theirs.qcow2", &["write -q 0 1M"]);
    assert!(info_bitmaps(&env, "theirs.qcow2")
        .iter()
        .all(|b| b.2.contains(&"in-use".to_owned())));
    env.copy("theirs.qcow2", "ours.qcow2");
    env.copy("theirs.qcow2", "cli.qcow2");
    for op in ["--clear", "--enable", "--disable", "--add"] {
        let theirs = qemu_img(&env, &["bitmap", op, "theirs.qcow2", "stale"]);
        let ours = cli(&env, &["bitmap", op, "cli.qcow2", "stale"]);
        assert_eq!(ours.status.code(), theirs.status.code(), "{op}");
        assert_eq!(
            stderr_text(&ours.stderr),
            stderr_text(&theirs.stderr),
            "{op}"
        );
    }
    let theirs = qemu_img(
        &env,
        &["bitmap", "--merge", "stale", "theirs.qcow2", "kept"],
    );
    let ours = cli(&env, &["bitmap", "--merge", "stale", "cli.qcow2", "kept"]);
    assert_eq!(stderr_text(&ours.stderr), stderr_text(&theirs.stderr));
    let w = open_writer(&env, "ours.qcow2");
    assert!(matches!(
        w.clear_bitmap("stale"),
        Err(qcow2::Error::BitmapInUse { name }) if name == "stale"
    ));
    w.close().unwrap();
    let script = [
        Step::Remove("stale"),
        Step::Add {
            name: "fresh",
            granularity: Some(4096),
            disabled: false,
        },
        Step::Writes(12),
    ];
    run_qemu(&env, "theirs.qcow2", &script, size);
    run_library(&env, "ours.qcow2", &script, size);
    run_cli(&env, "cli.qcow2", &script, size);
    assert_same(&env, "in use");
    let names: Vec<_> = info_bitmaps(&env, "ours.qcow2")
        .into_iter()
        .map(|b| (b.0, b.2))
        .collect();
    assert_eq!(
        names,
        [
            (
                "kept".to_owned(),
                vec!["in-use".to_owned(), "auto".to_owned()]
            ),
            ("fresh".to_owned(), vec!["auto".to_owned()])
        ]
    );
}

/// A LUKS image, named by `--image-opts` with its secret from `--object`: the command adds,
/// merges and removes as qemu-img does, and the image stays clean.
#[test]
fn cli_on_an_encrypted_image() {
    let Some(env) = Env::new("bmo_luks") else {
        return;
    };
    let object = "secret,id=sec0,data=hunter2";
    let opts = |f: &str| format!("driver=qcow2,file.filename={f},encrypt.key-secret=sec0");
    env.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        object,
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "theirs.qcow2",
        "16M",
    ]);
    env.copy("theirs.qcow2", "cli.qcow2");
    let calls: [&[&str]; 4] = [
        &["--add", "-g", "4096"],
        &["--add"],
        &["--merge", "b0", "--disable"],
        &["--remove"],
    ];
    for (i, args) in calls.iter().enumerate() {
        let name = if i == 1 || i == 2 { "b1" } else { "b0" };
        for (tool, image) in [("qemu", "theirs.qcow2"), ("cli", "cli.qcow2")] {
            let image_opts = opts(image);
            let mut all = vec!["bitmap", "--object", object, "--image-opts"];
            all.extend_from_slice(args);
            all.extend([image_opts.as_str(), name]);
            let out = if tool == "qemu" {
                qemu_img(&env, &all)
            } else {
                cli(&env, &all)
            };
            assert!(
                out.status.success(),
                "{tool} {all:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(
            info_bitmaps(&env, "cli.qcow2"),
            info_bitmaps(&env, "theirs.qcow2"),
            "{args:?}"
        );
        let image_opts = opts("cli.qcow2");
        let out = qemu_img(
            &env,
            &["check", "--object", object, "--image-opts", &image_opts],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_eq!(info_bitmaps(&env, "cli.qcow2").len(), 1);
}

/// An inconsistent bitmap whose table names the image's own metadata (the L1 table, the
/// refcount table, a refcount block): removing it frees none of them (QEMU would free them
/// all and corrupt the image); only what is safe is freed, the rest leaks.
#[test]
fn removing_an_inconsistent_bitmap_never_frees_metadata() {
    let Some(env) = Env::new("bmo_stale_table") else {
        return;
    };
    let size = 8 * MIB;
    env.create("base.qcow2", size, "");
    env.img(&["bitmap", "--add", "-g", "512", "base.qcow2", "stale"]);
    env.io("base.qcow2", &["write -q 0 1M"]);
    env.qemu
        .io_crash(env.dir.path(), "qcow2", "base.qcow2", &["write -q 2M 4k"]);
    let image = Qcow2::open_path(env.path("base.qcow2")).unwrap();
    let table_at = image.bitmaps()[0].table_offset;
    let h = image.header().clone();
    let refblock = {
        let bytes = env.read_file("base.qcow2");
        let at = h.refcount_table_offset() as usize;
        u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
    };
    drop(image);
    for target in [h.l1_table_offset(), h.refcount_table_offset(), refblock] {
        env.copy("base.qcow2", "img.qcow2");
        env.patch("img.qcow2", table_at, &target.to_be_bytes());
        let w = open_writer(&env, "img.qcow2");
        w.write_all_at(4 * MIB, &[7; 65536]).unwrap();
        w.remove_bitmap("stale").unwrap();
        w.write_all_at(5 * MIB, &[8; 65536]).unwrap();
        w.close().unwrap();
        check(&env, "img.qcow2", true);
        assert_eq!(info_bitmaps(&env, "img.qcow2"), []);
        let data = env.convert("img.qcow2", &[]);
        assert!(data[4 * MIB as usize..][..65536].iter().all(|&b| b == 7));
        assert!(data[5 * MIB as usize..][..65536].iter().all(|&b| b == 8));
    }
}

/// While a writer is open, a bitmap it added is on disk already (in use, as QEMU marks
/// bitmaps while an image is open); a crash then leaves it in use, the image clean.
#[test]
fn an_added_bitmap_is_durable_at_once() {
    let Some(env) = Env::new("bmo_durable") else {
        return;
    };
    env.create("img.qcow2", 16 * MIB, "");
    let w = open_writer(&env, "img.qcow2");
    w.add_bitmap("b", &BitmapOptions::new().granularity(4096))
        .unwrap();
    w.write_all_at(MIB, &[1; 4096]).unwrap();
    w.flush().unwrap();
    assert_eq!(
        info_bitmaps(&env, "img.qcow2"),
        [(
            "b".to_owned(),
            4096,
            vec!["in-use".to_owned(), "auto".to_owned()]
        )]
    );
    // The file as a killed process leaves it.
    env.copy("img.qcow2", "killed.qcow2");
    w.close().unwrap();
    check(&env, "killed.qcow2", true);
    let w = open_writer(&env, "killed.qcow2");
    w.remove_bitmap("b").unwrap();
    assert_eq!(info_bitmaps(&env, "killed.qcow2"), []);
    w.close().unwrap();
    check(&env, "killed.qcow2", true);
    let image = Qcow2::open_path(env.path("killed.qcow2")).unwrap();
    assert!(image.header().bitmaps().is_none());
}

// ---------------------------------------------------------------------------------------------
// Crashes

/// The bitmap names a file holds (qemu-img info), after `qemu-img check` finds no
/// corruption in it.
fn names_after_check(env: &Env, bytes: &[u8]) -> Vec<String> {
    std::fs::write(env.path("cut.qcow2"), bytes).unwrap();
    check(env, "cut.qcow2", true);
    info_bitmaps(env, "cut.qcow2")
        .into_iter()
        .map(|b| b.0)
        .collect()
}

/// Run `op` in a writer over a crash storage holding `image`, then close it; replay cuts at
/// every event from the operation's start with each kind of loss: every cut image is check
/// clean, and names `before` or `after`.
fn crash_during(
    env: &Env,
    image: &str,
    op: impl Fn(&Writer<CrashStorage>),
    before: &[&str],
    after: &[&str],
) -> usize {
    let initial = env.read_file(image);
    let storage = CrashStorage::new(initial.clone());
    let writer = Qcow2::open_with(storage.clone(), &OpenOptions::new().write(true))
        .unwrap()
        .into_writer()
        .unwrap();
    storage.mark(Marker::Start(0));
    op(&writer);
    storage.mark(Marker::End(0));
    writer.close().unwrap();
    let log = storage.log();
    let start = log
        .iter()
        .position(|e| *e == Event::Mark(Marker::Start(0)))
        .unwrap();
    let end = log
        .iter()
        .position(|e| *e == Event::Mark(Marker::End(0)))
        .unwrap();
    let (before, after): (Vec<String>, Vec<String>) = (
        before.iter().map(|s| s.to_string()).collect(),
        after.iter().map(|s| s.to_string()).collect(),
    );
    let mut rng = Rng::new(start as u64);
    let mut cases = 0;
    for cut in start..=log.len() {
        if !log.get(cut).is_none_or(Event::is_io) {
            continue;
        }
        let pending = window(&log, cut).pending.len();
        let mut subsets = vec![Subset::All, Subset::None];
        if pending > 0 {
            subsets.push(Subset::AllBut(rng.below(pending as u64) as usize));
            subsets.push(Subset::Only(rng.below(pending as u64) as usize));
            subsets.push(Subset::Random(rng.next_u64()));
        }
        for subset in subsets {
            let bytes = replay(&initial, &log, cut, subset);
            let names = names_after_check(env, &bytes);
            assert!(
                names == before || names == after,
                "cut {cut} {subset:?}: {names:?}, neither {before:?} nor {after:?}"
            );
            // Once the operation returned, the new list is durable.
            if cut > end {
                assert_eq!(
                    names, after,
                    "cut {cut} {subset:?} after the operation returned"
                );
            }
            cases += 1;
        }
    }
    let done = names_after_check(env, &storage.contents());
    assert_eq!(done, after);
    std::fs::write(env.path("done.qcow2"), storage.contents()).unwrap();
    check(env, "done.qcow2", false);
    cases
}

#[test]
fn crash_during_add_remove_and_merge() {
    let Some(env) = Env::new("bmo_crash") else {
        return;
    };
    let size = 16 * MIB;
    env.create("img.qcow2", size, "cluster_size=4096");
    env.img(&["bitmap", "--add", "-g", "512", "img.qcow2", "a"]);
    env.img(&["bitmap", "--add", "img.qcow2", "b"]);
    env.io("img.qcow2", &qemu_io_cmds(21, size));
    let mut cases = crash_during(
        &env,
        "img.qcow2",
        |w| {
            w.add_bitmap("c", &BitmapOptions::new().granularity(1024))
                .unwrap()
        },
        &["a", "b"],
        &["a", "b", "c"],
    );
    cases += crash_during(
        &env,
        "img.qcow2",
        |w| w.remove_bitmap("a").unwrap(),
        &["a", "b"],
        &["b"],
    );
    cases += crash_during(
        &env,
        "img.qcow2",
        |w| w.merge_bitmap("b", BitmapSource::here("a")).unwrap(),
        &["a", "b"],
        &["a", "b"],
    );
    // The last bitmap removed: the extension goes.
    env.create("one.qcow2", size, "");
    env.img(&["bitmap", "--add", "one.qcow2", "only"]);
    cases += crash_during(
        &env,
        "one.qcow2",
        |w| w.remove_bitmap("only").unwrap(),
        &["only"],
        &[],
    );
    // The first bitmap added: the extension comes.
    env.create("none.qcow2", size, "refcount_bits=1");
    cases += crash_during(
        &env,
        "none.qcow2",
        |w| w.add_bitmap("first", &BitmapOptions::new()).unwrap(),
        &[],
        &["first"],
    );
    assert!(cases > 100, "{cases}");
}

/// A merge's bits after a crash: the merged bits once the operation returned and the writer
/// closed; in use (not trusted) before.
#[test]
fn crash_during_merge_keeps_bits_old_or_new() {
    let Some(env) = Env::new("bmo_crash_merge") else {
        return;
    };
    let size = 8 * MIB;
    env.create("img.qcow2", size, "cluster_size=512");
    env.img(&["bitmap", "--add", "-g", "512", "img.qcow2", "a"]);
    env.img(&[
        "bitmap",
        "--add",
        "-g",
        "4096",
        "--disable",
        "img.qcow2",
        "b",
    ]);
    env.io("img.qcow2", &qemu_io_cmds(31, size));
    env.copy("img.qcow2", "theirs.qcow2");
    env.img(&["bitmap", "--merge", "a", "theirs.qcow2", "b"]);
    let old = extents(&env, "img.qcow2");
    let new = extents(&env, "theirs.qcow2");
    assert_ne!(old, new);
    let initial = env.read_file("img.qcow2");
    let storage = CrashStorage::new(initial.clone());
    let writer = Qcow2::open_with(storage.clone(), &OpenOptions::new().write(true))
        .unwrap()
        .into_writer()
        .unwrap();
    writer.merge_bitmap("b", BitmapSource::here("a")).unwrap();
    writer.close().unwrap();
    let log = storage.log();
    for cut in 0..=log.len() {
        for subset in [Subset::All, Subset::None] {
            let bytes = replay(&initial, &log, cut, subset);
            std::fs::write(env.path("cut.qcow2"), &bytes).unwrap();
            check(&env, "cut.qcow2", true);
            let got = extents(&env, "cut.qcow2");
            // Bitmaps in use are left out: what is there is the old bits or the new.
            for (name, runs) in &got {
                let o = old.iter().find(|b| &b.0 == name).unwrap();
                let n = new.iter().find(|b| &b.0 == name).unwrap();
                assert!(runs == &o.1 || runs == &n.1, "cut {cut} {subset:?} {name}");
            }
        }
    }
    std::fs::write(env.path("done.qcow2"), storage.contents()).unwrap();
    assert_eq!(extents(&env, "done.qcow2"), new);
}
