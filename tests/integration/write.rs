//! The writer against QEMU: the same random operations (writes aligned and not, across
//! clusters and L2 tables, zero writes with and without unmap, discards, flushes) done by
//! `qemu-io` on one copy of an image and by [`qcow2::Writer`] on another, for every kind of
//! image QEMU writes: the guests end identical (`qemu-img compare`), the crate's copy is
//! clean and leaks nothing (`qemu-img check`), and reads through the writer agree.

use crate::common;

use std::path::Path;

use common::{Env, Rng};
use qcow2::{OpenOptions, Qcow2};

/// One operation, in both tools' terms.
#[derive(Debug, Clone)]
enum Op {
    Write { pos: u64, len: u64, byte: u8 },
    Zero { pos: u64, len: u64, unmap: bool },
    Discard { pos: u64, len: u64 },
    Flush,
}

impl Op {
    fn qemu_io(&self) -> String {
        match self {
            Op::Write { pos, len, byte } => format!("write -q -P {byte} {pos} {len}"),
            Op::Zero { pos, len, unmap } => {
                format!("write -q -z {}{pos} {len}", if *unmap { "-u " } else { "" })
            }
            Op::Discard { pos, len } => format!("discard -q {pos} {len}"),
            Op::Flush => "flush".to_owned(),
        }
    }

    fn apply<I: qcow2::Storage>(&self, w: &qcow2::Writer<I>) {
        match self {
            Op::Write { pos, len, byte } => w
                .write_all_at(*pos, &vec![*byte; *len as usize])
                .unwrap_or_else(|e| panic!("{self:?}: {e}")),
            Op::Zero { pos, len, unmap } => w
                .write_zeroes(*pos, *len, *unmap)
                .unwrap_or_else(|e| panic!("{self:?}: {e}")),
            Op::Discard { pos, len } => w
                .discard(*pos, *len)
                .unwrap_or_else(|e| panic!("{self:?}: {e}")),
            Op::Flush => w.flush().unwrap_or_else(|e| panic!("{self:?}: {e}")),
        }
    }
}

/// `count` random operations over a guest of `size` bytes with clusters of `cluster`.
fn script(seed: u64, size: u64, cluster: u64, count: usize) -> Vec<Op> {
    let mut rng = Rng::new(seed);
    let sector = 512;
    (0..count)
        .map(|i| {
            let aligned = rng.below(2) == 0;
            let max_len = (cluster * 3).min(size / 4).max(sector);
            let mut len = 1 + rng.below(max_len);
            let mut pos = rng.below(size - len);
            if aligned {
                pos = pos / sector * sector;
                len = (len / sector).max(1) * sector;
            }
            if pos + len > size {
                len = size - pos;
            }
            match rng.below(10) {
                0 => Op::Zero {
                    pos: pos / sector * sector,
                    len: (len / sector).max(1) * sector,
                    unmap: rng.below(2) == 0,
                },
                1 => Op::Discard {
                    pos: pos / cluster * cluster,
                    len: (len / cluster + 1) * cluster,
                },
                2 => Op::Flush,
                _ => Op::Write {
                    pos,
                    len,
                    byte: (i % 250) as u8 + 1,
                },
            }
        })
        .map(|op| clip(op, size))
        .collect()
}

/// Keep an operation inside the guest.
fn clip(op: Op, size: u64) -> Op {
    let fit = |pos: u64, len: u64| (pos.min(size - 1), len.min(size - pos.min(size - 1)));
    match op {
        Op::Zero { pos, len, unmap } => {
            let (pos, len) = fit(pos, len);
            Op::Zero { pos, len, unmap }
        }
        Op::Discard { pos, len } => {
            let (pos, len) = fit(pos, len);
            Op::Discard { pos, len }
        }
        other => other,
    }
}

/// Run `ops` through qemu-io on `theirs` and through the writer on `ours` (both in `env`'s
/// dir), then compare.
fn run_both(env: &Env, theirs: &str, ours: &str, ops: &[Op], extra_io: &[&str]) {
    let dir = env.dir.path();
    let mut cmds: Vec<String> = ops.iter().map(Op::qemu_io).collect();
    if cmds.is_empty() {
        cmds.push("flush".into());
    }
    let mut io = std::process::Command::new(&env.qemu.io);
    io.current_dir(dir).args(extra_io);
    for c in &cmds {
        io.args(["-c", c]);
    }
    io.arg(theirs);
    let out = io.output().unwrap();
    assert!(
        out.status.success(),
        "qemu-io failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let options = OpenOptions::new().write(true);
    let options = match extra_io.iter().any(|a| a.contains("secret")) {
        true => options.secret("hunter2"),
        false => options,
    };
    write_through(&dir.join(ours), &options, ops);
    compare_and_check(env, theirs, ours, extra_io);
}

/// Open `path` for writing with `options`, apply `ops` through the writer and close it.
fn write_through(path: &Path, options: &OpenOptions, ops: &[Op]) {
    let writer = Qcow2::open_path_with(path, options)
        .unwrap()
        .into_writer()
        .unwrap();
    ops.iter().for_each(|op| op.apply(&writer));
    writer.close().unwrap();
}

fn compare_and_check(env: &Env, theirs: &str, ours: &str, extra: &[&str]) {
    let dir = env.dir.path();
    let (object, opts) = image_args(extra);
    let mut compare = std::process::Command::new(&env.qemu.img);
    compare.current_dir(dir).arg("compare").args(&object);
    match &opts {
        Some(o) => compare.args([
            "--image-opts",
            &o.replace("IMG", theirs),
            &o.replace("IMG", ours),
        ]),
        None => compare.args([theirs, ours]),
    };
    let out = compare.output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare {theirs} {ours}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut check = std::process::Command::new(&env.qemu.img);
    check
        .current_dir(dir)
        .args(["check", "--output=json"])
        .args(&object);
    match &opts {
        Some(o) => check.args(["--image-opts", &o.replace("IMG", ours)]),
        None => check.arg(ours),
    };
    let out = check.output().unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "qemu-img check {ours}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    // qemu-img leaves out the counts that are zero.
    assert!(
        report.get("corruptions").is_none_or(|c| c == 0),
        "{ours} is corrupt: {report}"
    );
    assert!(
        report.get("leaks").is_none_or(|l| l == 0),
        "{ours} leaks: {report}"
    );
    assert_eq!(report["check-errors"], 0, "{ours}: {report}");
}

/// qemu-img's `--object` and `--image-opts` for an encrypted image (from qemu-io's args).
fn image_args(extra: &[&str]) -> (Vec<String>, Option<String>) {
    match extra.iter().position(|a| *a == "--object") {
        Some(i) => (
            vec!["--object".into(), extra[i + 1].to_owned()],
            Some("driver=qcow2,file.filename=IMG,encrypt.key-secret=sec0".to_owned()),
        ),
        None => (Vec::new(), None),
    }
}

/// Make `name` in `dir` with qemu-img create and `opts`, then copy it to `ours`.
fn create_pair(env: &Env, opts: &str, size: &str, extra: &[&str]) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend(extra);
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend(["theirs.qcow2", size]);
    env.qemu.img(env.dir.path(), &args);
    copy(env.dir.path(), "theirs.qcow2", "ours.qcow2");
}

fn copy(dir: &Path, from: &str, to: &str) {
    std::fs::copy(dir.join(from), dir.join(to)).unwrap();
}

fn kind_case(test: &str, opts: &str, size: &str, cluster: u64, seeds: std::ops::Range<u64>) {
    let Some(env) = Env::new(test) else { return };
    let bytes = parse_size(size);
    for seed in seeds {
        create_pair(&env, opts, size, &[]);
        let ops = script(seed, bytes, cluster, 60);
        run_both(&env, "theirs.qcow2", "ours.qcow2", &ops, &["-f", "qcow2"]);
    }
}

fn parse_size(s: &str) -> u64 {
    let (n, unit) = s.split_at(s.len() - 1);
    let n: u64 = n.parse().unwrap();
    match unit {
        "K" => n << 10,
        "M" => n << 20,
        "G" => n << 30,
        _ => panic!("size {s}"),
    }
}

#[test]
fn v3_64k() {
    kind_case("write::v3_64k", "", "64M", 65536, 0..4);
}

#[test]
fn v2_compat_010() {
    kind_case("write::v2_compat_010", "compat=0.10", "32M", 65536, 10..13);
}

#[test]
fn clusters_512_bytes() {
    kind_case(
        "write::clusters_512_bytes",
        "cluster_size=512",
        "4M",
        512,
        20..23,
    );
}

#[test]
fn clusters_2m() {
    kind_case(
        "write::clusters_2m",
        "cluster_size=2M",
        "64M",
        2 << 20,
        30..32,
    );
}

#[test]
fn refcount_widths() {
    for bits in [1, 2, 8, 16, 32, 64] {
        kind_case(
            "write::refcount_widths",
            &format!("refcount_bits={bits},cluster_size=4k"),
            "16M",
            4096,
            40 + bits..41 + bits,
        );
    }
}

#[test]
fn lazy_refcounts() {
    kind_case(
        "write::lazy_refcounts",
        "lazy_refcounts=on",
        "32M",
        65536,
        50..52,
    );
}

#[test]
fn refcount_table_grows() {
    // 512-byte clusters with 64-bit refcounts: a block covers 64 clusters, the first table
    // cluster 64 blocks: 2 MiB of clusters before the table must move.
    let Some(env) = Env::new("write::refcount_table_grows") else {
        return;
    };
    create_pair(&env, "cluster_size=512,refcount_bits=64", "8M", &[]);
    let ops: Vec<Op> = (0..48)
        .map(|i| Op::Write {
            pos: i * (128 << 10),
            len: 100 << 10,
            byte: i as u8 + 1,
        })
        .collect();
    run_both(&env, "theirs.qcow2", "ours.qcow2", &ops, &["-f", "qcow2"]);
}

#[test]
fn compressed_clusters_overwritten() {
    let Some(env) = Env::new("write::compressed_clusters_overwritten") else {
        return;
    };
    let dir = env.dir.path();
    let mut rng = Rng::new(70);
    let mut raw = vec![0u8; 16 << 20];
    for chunk in raw.chunks_mut(4096) {
        let b = rng.below(4) as u8;
        chunk.fill(b'a' + b);
    }
    std::fs::write(dir.join("src.raw"), &raw).unwrap();
    for (seed, opts) in [(71, ""), (72, "compression_type=zstd")] {
        env.qemu.compress(dir, "src.raw", "theirs.qcow2", opts);
        copy(dir, "theirs.qcow2", "ours.qcow2");
        let ops = script(seed, 16 << 20, 65536, 80);
        run_both(&env, "theirs.qcow2", "ours.qcow2", &ops, &["-f", "qcow2"]);
    }
}

#[test]
fn internal_snapshots() {
    let Some(env) = Env::new("write::internal_snapshots") else {
        return;
    };
    let dir = env.dir.path();
    for seed in 80..83 {
        env.qemu
            .img(dir, &["create", "-q", "-f", "qcow2", "theirs.qcow2", "32M"]);
        env.qemu
            .io(dir, "qcow2", "theirs.qcow2", &["write -P 3 0 20M"]);
        env.qemu
            .img(dir, &["snapshot", "-c", "one", "theirs.qcow2"]);
        env.qemu
            .io(dir, "qcow2", "theirs.qcow2", &["write -P 4 4M 4M"]);
        env.qemu
            .img(dir, &["snapshot", "-c", "two", "theirs.qcow2"]);
        copy(dir, "theirs.qcow2", "ours.qcow2");
        let ops = script(seed, 32 << 20, 65536, 60);
        run_both(&env, "theirs.qcow2", "ours.qcow2", &ops, &["-f", "qcow2"]);
        // The snapshots still read what they held.
        for snap in ["one", "two"] {
            let a = env.qemu.convert_to_raw(dir, "theirs.qcow2", &["-l", snap]);
            let b = env.qemu.convert_to_raw(dir, "ours.qcow2", &["-l", snap]);
            assert!(
                a == b,
                "snapshot {snap} differs after writing (seed {seed})"
            );
        }
    }
}

#[test]
fn preallocated_metadata() {
    kind_case(
        "write::preallocated_metadata",
        "preallocation=metadata",
        "16M",
        65536,
        90..92,
    );
}

#[test]
fn luks_encrypted() {
    let Some(env) = Env::new("write::luks_encrypted") else {
        return;
    };
    let object = "secret,id=sec0,data=hunter2";
    create_pair(
        &env,
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "8M",
        &["--object", object],
    );
    run_encrypted(&env, "hunter2", 100);
}

#[test]
fn legacy_aes_encrypted() {
    let Some(env) = Env::new("write::legacy_aes_encrypted") else {
        return;
    };
    for side in ["theirs.qcow2", "ours.qcow2"] {
        std::fs::copy("fixtures/aes.qcow2", env.dir.join(side)).unwrap();
    }
    run_encrypted(&env, "abc", 101);
}

/// The same operations through qemu-io (the secret given as an object) and the writer on
/// two copies of an encrypted image, then compared and checked.
fn run_encrypted(env: &Env, secret: &str, seed: u64) {
    let object = format!("secret,id=sec0,data={secret}");
    let size = Qcow2::open_path(env.dir.join("ours.qcow2"))
        .unwrap()
        .guest_size();
    let ops = script(seed, size, 65536, 40);
    // qemu-io needs the image as options to pass the secret.
    let dir = env.dir.path();
    let mut io = std::process::Command::new(&env.qemu.io);
    io.current_dir(dir)
        .args(["--object", &object, "--image-opts"]);
    for op in &ops {
        io.args(["-c", &op.qemu_io()]);
    }
    io.arg("driver=qcow2,file.filename=theirs.qcow2,encrypt.key-secret=sec0");
    let out = io.output().unwrap();
    assert!(
        out.status.success(),
        "qemu-io: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let options = OpenOptions::new().write(true).secret(secret);
    write_through(&dir.join("ours.qcow2"), &options, &ops);
    compare_and_check(env, "theirs.qcow2", "ours.qcow2", &["--object", &object]);
}

#[test]
fn reads_through_the_writer_see_every_write() {
    let Some(env) = Env::new("write::reads_through_the_writer") else {
        return;
    };
    let dir = env.dir.path();
    env.qemu
        .img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
    env.qemu
        .io(dir, "qcow2", "base.qcow2", &["write -P 9 0 8M"]);
    env.qemu.create_overlay(dir, "base.qcow2", "top.qcow2");
    let writer = Qcow2::open_path_with(dir.join("top.qcow2"), &OpenOptions::new().write(true))
        .unwrap()
        .into_writer()
        .unwrap();
    let mut model = vec![9u8; 8 << 20];
    for op in script(110, 8 << 20, 65536, 200) {
        op.apply(&writer);
        match op {
            Op::Write { pos, len, byte } => model[pos as usize..(pos + len) as usize].fill(byte),
            Op::Zero { pos, len, .. } => model[pos as usize..(pos + len) as usize].fill(0),
            Op::Discard { pos, len } => {
                let c = 65536;
                let start = pos.next_multiple_of(c);
                let end = (pos + len) / c * c;
                if end > start {
                    model[start as usize..end as usize].fill(0);
                }
            }
            Op::Flush => {}
        }
        let mut back = vec![0u8; 8 << 20];
        writer.read_exact_at(0, &mut back).unwrap();
        assert!(back == model, "after {op:?}");
    }
}

#[test]
fn refusals() {
    let Some(env) = Env::new("write::refusals") else {
        return;
    };
    let dir = env.dir.path();
    env.qemu
        .img(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    // Opened for reading only.
    let image = Qcow2::open_path(dir.join("a.qcow2")).unwrap();
    assert!(matches!(image.into_writer(), Err(qcow2::Error::ReadOnly)));
    // Past the end.
    let w = Qcow2::open_path_with(dir.join("a.qcow2"), &OpenOptions::new().write(true))
        .unwrap()
        .into_writer()
        .unwrap();
    let err = w.write_all_at((1 << 20) - 1, &[1, 2]).unwrap_err();
    assert!(matches!(err, qcow2::Error::WritePastEnd { .. }), "{err}");
    w.close().unwrap();
    // A read-only file.
    let ro = dir.join("ro.qcow2");
    std::fs::copy(dir.join("a.qcow2"), &ro).unwrap();
    let mut perms = std::fs::metadata(&ro).unwrap().permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&ro, perms).unwrap();
    let opened = Qcow2::open_path_with(&ro, &OpenOptions::new().write(true));
    if !nix_root() {
        assert!(opened.is_err(), "a read-only file opened for writing");
    }
}

#[test]
fn dirty_images_get_their_refcounts_rebuilt() {
    let Some(env) = Env::new("write::dirty_images_get_their_refcounts_rebuilt") else {
        return;
    };
    let dir = env.dir.path();
    for (seed, opts) in [
        (160, "lazy_refcounts=on"),
        (161, "lazy_refcounts=on,cluster_size=4k,refcount_bits=2"),
    ] {
        env.qemu.img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                opts,
                "theirs.qcow2",
                "32M",
            ],
        );
        env.qemu
            .io(dir, "qcow2", "theirs.qcow2", &["write -P 1 0 4M"]);
        env.qemu.img(dir, &["snapshot", "-c", "s", "theirs.qcow2"]);
        // QEMU killed with refcounts unwritten: leaks and clusters counted too low.
        env.qemu.io_crash(
            dir,
            "qcow2",
            "theirs.qcow2",
            &["write -P 2 1M 9M", "discard 0 512k", "write -P 3 20M 3M"],
        );
        let broken = std::process::Command::new(&env.qemu.img)
            .current_dir(dir)
            .args(["check", "--output=json", "theirs.qcow2"])
            .output()
            .unwrap();
        let broken: serde_json::Value = serde_json::from_slice(&broken.stdout).unwrap_or_default();
        assert!(
            broken["corruptions"].as_u64().unwrap_or(0) > 0,
            "not broken: {broken}"
        );
        copy(dir, "theirs.qcow2", "ours.qcow2");
        let image =
            Qcow2::open_path_with(dir.join("ours.qcow2"), &OpenOptions::new().write(true)).unwrap();
        assert!(image.header().is_dirty(), "qemu-io left the image clean");
        // QEMU repairs its copy as it would when opening it for writing.
        let out = std::process::Command::new(&env.qemu.img)
            .current_dir(dir)
            .args(["check", "-q", "-r", "all", "theirs.qcow2"])
            .output()
            .unwrap();
        assert!(
            out.status.code().is_some_and(|c| c == 0 || c == 3),
            "{out:?}"
        );
        drop(image);
        let ops = script(seed, 32 << 20, 65536, 40);
        run_both(&env, "theirs.qcow2", "ours.qcow2", &ops, &["-f", "qcow2"]);
        let after = Qcow2::open_path(dir.join("ours.qcow2")).unwrap();
        assert!(!after.header().is_dirty(), "still dirty after close");
        let a = env.qemu.convert_to_raw(dir, "theirs.qcow2", &["-l", "s"]);
        let b = env.qemu.convert_to_raw(dir, "ours.qcow2", &["-l", "s"]);
        assert!(a == b, "the snapshot differs (before: {broken})");
    }
}

/// Root opens read-only files for writing anyway.
fn nix_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"))
}

#[test]
fn external_data_files() {
    let Some(env) = Env::new("write::external_data_files") else {
        return;
    };
    let dir = env.dir.path();
    for (seed, raw) in [(120, false), (121, true)] {
        for side in ["theirs", "ours"] {
            let opts = format!(
                "data_file={side}.data,data_file_raw={}",
                if raw { "on" } else { "off" }
            );
            env.qemu.img(
                dir,
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &opts,
                    &format!("{side}.qcow2"),
                    "16M",
                ],
            );
        }
        let ops = script(seed, 16 << 20, 65536, 60);
        run_both(&env, "theirs.qcow2", "ours.qcow2", &ops, &["-f", "qcow2"]);
        if raw {
            // The raw data file reads as the guest.
            let guest = env.qemu.convert_to_raw(dir, "ours.qcow2", &[] as &[&str]);
            let mut data = std::fs::read(dir.join("ours.data")).unwrap();
            data.resize(guest.len(), 0);
            assert!(
                data == guest,
                "the raw data file does not read as the guest"
            );
        }
    }
}

#[test]
fn extended_l2() {
    kind_case(
        "write::extended_l2",
        "extended_l2=on",
        "32M",
        65536,
        130..133,
    );
    kind_case(
        "write::extended_l2",
        "extended_l2=on,cluster_size=16k",
        "8M",
        16384,
        133..135,
    );
}

#[test]
fn refcount_table_moves_while_its_new_block_is_made() {
    // 512-byte clusters, 16-bit refcounts: a block covers 256 clusters and the one-cluster
    // table 64 blocks (8 MiB); QEMU fills the image close to that, the writer passes it: the
    // table moves while the block its own clusters need is being made.
    let Some(env) = Env::new("write::refcount_table_moves_while_its_new_block_is_made") else {
        return;
    };
    for seed in 150..154 {
        create_pair(&env, "cluster_size=512", "16M", &[]);
        for side in ["theirs.qcow2", "ours.qcow2"] {
            env.qemu
                .io(env.dir.path(), "qcow2", side, &["write -P 1 8M 7880K"]);
        }
        let ops = script(seed, 8 << 20, 8192, 300);
        run_both(&env, "theirs.qcow2", "ours.qcow2", &ops, &["-f", "qcow2"]);
    }
}

#[test]
fn images_in_use_are_locked_both_ways() {
    let Some(env) = Env::new("write::images_in_use_are_locked_both_ways") else {
        return;
    };
    let dir = env.dir.path();
    env.qemu
        .img(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    // While the writer has it, QEMU cannot open it.
    let writer = Qcow2::open_path_with(dir.join("a.qcow2"), &OpenOptions::new().write(true))
        .unwrap()
        .into_writer()
        .unwrap();
    let out = std::process::Command::new(&env.qemu.io)
        .current_dir(dir)
        .args(["-f", "qcow2", "-c", "write 0 4k", "a.qcow2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("lock"), "{stderr}");
    writer.close().unwrap();
    // While QEMU has it, the writer cannot open it.
    let mut qemu = std::process::Command::new(&env.qemu.io)
        .current_dir(dir)
        .args(["-f", "qcow2", "-c", "sleep 5000", "a.qcow2"])
        .spawn()
        .unwrap();
    let mut refused = None;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        match Qcow2::open_path_with(dir.join("a.qcow2"), &OpenOptions::new().write(true)) {
            Err(e) => {
                refused = Some(e);
                break;
            }
            Ok(image) => drop(image), // qemu-io has not opened it yet
        }
    }
    let _ = qemu.kill();
    let _ = qemu.wait();
    let err = refused.expect("the writer opened an image qemu-io had open");
    assert!(matches!(err, qcow2::Error::Locked { .. }), "{err}");
}

#[test]
fn threads_write_and_read_through_one_writer_at_once() {
    let Some(env) = Env::new("write::threads_write_and_read") else {
        return;
    };
    let dir = env.dir.path();
    env.qemu
        .img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "16M"]);
    env.qemu
        .io(dir, "qcow2", "base.qcow2", &["write -P 3 0 16M"]);
    env.qemu.create_overlay(dir, "base.qcow2", "top.qcow2");
    let writer = Qcow2::open_path_with(dir.join("top.qcow2"), &OpenOptions::new().write(true))
        .unwrap()
        .into_writer()
        .unwrap();
    // Four threads, each writing its own quarter (unaligned pieces, flushes now and then)
    // while reading back what it wrote; a fifth discards and zeroes nothing of theirs but
    // flushes often, so that frees and reuse happen while they run.
    let quarter = 4u64 << 20;
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let w = &writer;
            s.spawn(move || {
                let mut rng = Rng::new(200 + t);
                let mut model = vec![3u8; quarter as usize];
                for i in 0..300 {
                    let len = 1 + rng.below(100_000);
                    let pos = rng.below(quarter - len);
                    let byte = (t * 60 + i % 60) as u8 + 4;
                    w.write_all_at(t * quarter + pos, &vec![byte; len as usize])
                        .unwrap();
                    model[pos as usize..(pos + len) as usize].fill(byte);
                    if i % 50 == 0 {
                        w.flush().unwrap();
                    }
                    let mut back = vec![0u8; len as usize];
                    w.read_exact_at(t * quarter + pos, &mut back).unwrap();
                    assert!(back.iter().all(|b| *b == byte), "thread {t} write {i}");
                }
                let mut back = vec![0u8; quarter as usize];
                w.read_exact_at(t * quarter, &mut back).unwrap();
                assert!(back == model, "thread {t}'s quarter");
            });
        }
    });
    writer.close().unwrap();
    let out = env.qemu.img(dir, &["check", "--output=json", "top.qcow2"]);
    let report: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert!(report.get("corruptions").is_none_or(|c| c == 0), "{report}");
    assert!(report.get("leaks").is_none_or(|c| c == 0), "{report}");
}

#[test]
fn growing_the_disk_moves_the_l1_table_when_it_must() {
    let Some(env) = Env::new("write::growing_the_disk") else {
        return;
    };
    let dir = env.dir.path();
    for (opts, from, to) in [
        ("cluster_size=512", "1M", 64u64 << 20),
        ("", "8M", 40 << 20),
    ] {
        create_pair(&env, opts, from, &[]);
        let before = script(170, parse_size(from), 4096, 30);
        let after = script(171, to, 4096, 30);
        let mut cmds: Vec<String> = before.iter().map(Op::qemu_io).collect();
        cmds.push(format!("truncate {to}"));
        cmds.extend(after.iter().map(Op::qemu_io));
        cmds.push(format!("truncate {}", to - 512));
        env.qemu.io(dir, "qcow2", "theirs.qcow2", &cmds);
        let writer = Qcow2::open_path_with(dir.join("ours.qcow2"), &OpenOptions::new().write(true))
            .unwrap()
            .into_writer()
            .unwrap();
        before.iter().for_each(|op| op.apply(&writer));
        writer.resize(to).unwrap();
        assert_eq!(writer.guest_size(), to);
        after.iter().for_each(|op| op.apply(&writer));
        // Shrinking by a sector, as qemu-io's truncate does.
        writer.resize(to - 512).unwrap();
        writer.close().unwrap();
        compare_and_check(&env, "theirs.qcow2", "ours.qcow2", &[]);
        let info = env.qemu.info_json(dir, "ours.qcow2", false);
        assert_eq!(info["virtual-size"], to - 512);
    }
}

#[test]
fn opening_and_closing_leaves_the_file_as_it_was() {
    let Some(env) = Env::new("write::opening_and_closing") else {
        return;
    };
    let dir = env.dir.path();
    env.qemu
        .img(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "1G"]);
    let before = std::fs::read(dir.join("a.qcow2")).unwrap();
    let writer = Qcow2::open_path_with(dir.join("a.qcow2"), &OpenOptions::new().write(true))
        .unwrap()
        .into_writer()
        .unwrap();
    writer.flush().unwrap();
    writer.close().unwrap();
    assert!(
        std::fs::read(dir.join("a.qcow2")).unwrap() == before,
        "the file changed"
    );
}

#[test]
fn a_data_file_attached_by_the_caller_is_written() {
    let Some(env) = Env::new("write::a_data_file_attached_by_the_caller") else {
        return;
    };
    let dir = env.dir.path();
    for side in ["theirs", "ours"] {
        let opts = format!("data_file={side}.data");
        let name = format!("{side}.qcow2");
        env.qemu.img(
            dir,
            &["create", "-q", "-f", "qcow2", "-o", &opts, &name, "8M"],
        );
    }
    let ops = script(190, 8 << 20, 65536, 40);
    let cmds: Vec<String> = ops.iter().map(Op::qemu_io).collect();
    env.qemu.io(dir, "qcow2", "theirs.qcow2", &cmds);
    let rw = |name: &str| {
        std::fs::File::options()
            .read(true)
            .write(true)
            .open(dir.join(name))
            .unwrap()
    };
    let mut image = Qcow2::open_with(rw("ours.qcow2"), &OpenOptions::new().write(true)).unwrap();
    image.set_data_storage(rw("ours.data")).unwrap();
    let writer = image.into_writer().unwrap();
    ops.iter().for_each(|op| op.apply(&writer));
    writer.close().unwrap();
    compare_and_check(&env, "theirs.qcow2", "ours.qcow2", &[]);
}

#[test]
fn a_small_table_cache_writes_back_as_it_goes() {
    // 4 KiB of L2 tables in memory at most (clamped to four tables): the writer writes its
    // tables back (in order) whenever it outgrows them; the result must be the same.
    let Some(env) = Env::new("write::a_small_table_cache") else {
        return;
    };
    let dir = env.dir.path();
    create_pair(&env, "cluster_size=512", "8M", &[]);
    let ops = script(200, 8 << 20, 4096, 300);
    let cmds: Vec<String> = ops.iter().map(Op::qemu_io).collect();
    env.qemu.io(dir, "qcow2", "theirs.qcow2", &cmds);
    let mut limits = qcow2::Limits::default();
    limits.l2_cache_bytes = 4096;
    let options = OpenOptions::new().write(true).limits(limits);
    write_through(&dir.join("ours.qcow2"), &options, &ops);
    compare_and_check(&env, "theirs.qcow2", "ours.qcow2", &[]);
}

#[test]
fn data_never_goes_over_metadata_a_corrupt_image_left_unreferenced() {
    // A truncated image whose L1 table names L2 tables past its end, with refcount 0: the
    // clusters the allocator would hand out next are those tables. QEMU's overlap check
    // refuses such a write; so does the writer.
    let Some(env) = Env::new("write::data_never_goes_over_metadata") else {
        return;
    };
    let path = env.dir.join("hostile.qcow2");
    std::fs::copy("fuzz/regressions/write-mutation-3176.qcow2", &path).unwrap();
    let writer = Qcow2::open_path_with(&path, &OpenOptions::new().write(true))
        .unwrap()
        .into_writer()
        .unwrap();
    let err = writer.write_all_at(0xaa371, &[7u8; 97679]).unwrap_err();
    assert!(
        matches!(&err, qcow2::Error::Malformed { what, .. } if what.contains("holds metadata")),
        "{err}"
    );
}

/// Overlays made with `opts` over a 32 MiB base full of data: the same random operations
/// through both tools, for each seed.
fn overlay_case(test: &str, opts: &str, seeds: std::ops::Range<u64>) {
    let Some(env) = Env::new(test) else {
        return;
    };
    let dir = env.dir.path();
    for seed in seeds {
        env.qemu
            .img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "32M"]);
        env.qemu
            .io(dir, "qcow2", "base.qcow2", &["write -P 7 0 32M"]);
        for side in ["theirs.qcow2", "ours.qcow2"] {
            let mut args = vec![
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
            ];
            if !opts.is_empty() {
                args.extend(["-o", opts]);
            }
            args.push(side);
            env.qemu.img(dir, &args);
        }
        let ops = script(seed, 32 << 20, 65536, 60);
        run_both(&env, "theirs.qcow2", "ours.qcow2", &ops, &["-f", "qcow2"]);
    }
}

#[test]
fn backing_chain() {
    overlay_case("write::backing_chain", "", 60..63);
}

#[test]
fn extended_l2_over_a_backing_file() {
    overlay_case(
        "write::extended_l2_over_a_backing_file",
        "extended_l2=on",
        140..143,
    );
}

#[test]
fn v2_over_a_backing_file() {
    // Version 2 cannot mark clusters zero: QEMU leaves discards undone over a backing file
    // and writes zeros for zero writes.
    overlay_case("write::v2_over_a_backing_file", "compat=0.10", 180..183);
}

#[test]
fn a_zero_cluster_that_keeps_its_host_cluster_is_written_there() {
    // `write -z` without unmap keeps the host cluster; a later partial write goes into it
    // (zeros around the data), as QEMU reuses it: the same map, host offsets included.
    let Some(env) = Env::new("write::a_zero_cluster_that_keeps_its_host_cluster") else {
        return;
    };
    let dir = env.dir.path();
    create_pair(&env, "", "4M", &[]);
    let ops = [
        Op::Write {
            pos: 0,
            len: 1 << 20,
            byte: 1,
        },
        Op::Flush,
        Op::Zero {
            pos: 0,
            len: 1 << 20,
            unmap: false,
        },
        Op::Write {
            pos: 4096,
            len: 512,
            byte: 2,
        },
        Op::Write {
            pos: 196608 + 100,
            len: 70000,
            byte: 3,
        },
    ];
    run_both(&env, "theirs.qcow2", "ours.qcow2", &ops, &["-f", "qcow2"]);
    let theirs = env.qemu.map_json(dir, "theirs.qcow2");
    let ours = env.qemu.map_json(dir, "ours.qcow2");
    assert_eq!(theirs, ours);
}
