//! Issue 24's rows: the jobs that change an image (`commit`, `rebase`; `snapshot -c/-d` and
//! `check -r all` fit the same mould), `qemu-img` against the crate's `qcow2` with the very
//! same arguments. Each pass works on fresh copies of master images, made untimed before it
//! (in `/dev/shm` when there is one; `--write-dir` chooses); after the last round every
//! image a contestant changed must read as its master's guest (`qemu-img compare`) and be
//! clean (`qemu-img check`).
//!
//! A new row is a [`CopyJob`]: the masters to copy, the commands that fix the copies up
//! (untimed), the arguments both tools get (`{0}`, `{1}`, ...: the copies), and which
//! copies to check against which guest. For example `snapshot -c` of an image with 16
//! snapshots: `masters: &[&img16]`, `args: &["snapshot", "-c", "s17", "{0}"]`,
//! `checked: &[(0, &img16)]`.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{make_raw, qemu_img, settle, usable_image, Fill, Res, MIB};
use crate::contest::{Contestant, Output, Workload};
use crate::write::qcow2_bin;
use crate::Config;

const CLUSTER: u64 = 65536;

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A job both tools run on fresh copies of `masters` (see the module doc).
pub(crate) struct CopyJob<'a> {
    /// Names the row's files and the ratio line.
    pub tag: &'a str,
    pub label: &'a str,
    pub masters: &'a [&'a Path],
    /// Commands run after the copies, before each pass, untimed (program first).
    pub fixups: &'a [&'a [&'a str]],
    /// The arguments after the program name.
    pub args: &'a [&'a str],
    /// (copy, the qcow2 image whose guest it must read as after the job).
    pub checked: &'a [(usize, &'a Path)],
    /// MiB of guest one pass covers.
    pub work: f64,
}

/// Where contestant `k` keeps its copy of master `m` (removed with the other outputs).
fn copy_path(cfg: &Config, tag: &str, k: usize, m: usize) -> PathBuf {
    cfg.write_dir().join(format!(
        "qcow2-bench-write-{}-job-{tag}-{k}-{m}.qcow2",
        std::process::id()
    ))
}

/// `text` with `{i}` replaced by copy `i`'s path.
fn fill_in(text: &str, copies: &[PathBuf]) -> String {
    copies
        .iter()
        .enumerate()
        .fold(text.to_owned(), |t, (i, c)| {
            t.replace(&format!("{{{i}}}"), &s(c))
        })
}

/// The row of `job`: qemu-img, then the crate when its binary is there; the time ratio.
pub(crate) fn copy_job_workload(cfg: &Config, job: &CopyJob, title: String) -> Res<Workload> {
    let bin = qcow2_bin(cfg)?;
    let mut programs = vec![("qemu-img".to_string(), "qemu-img".to_string())];
    if let Some(bin) = &bin {
        programs.push(("crate".into(), s(bin)));
    }
    let mut contestants = Vec::new();
    let mut outputs = Vec::new();
    for (k, (who, program)) in programs.iter().enumerate() {
        let copies: Vec<PathBuf> = (0..job.masters.len())
            .map(|m| copy_path(cfg, job.tag, k, m))
            .collect();
        let mut prepare: Vec<Vec<String>> = job
            .masters
            .iter()
            .zip(&copies)
            .map(|(m, c)| vec!["cp".into(), "--sparse=always".into(), s(m), s(c)])
            .collect();
        prepare.extend(
            job.fixups
                .iter()
                .map(|cmd| cmd.iter().map(|a| fill_in(a, &copies)).collect()),
        );
        let mut argv = vec![program.clone()];
        argv.extend(job.args.iter().map(|a| fill_in(a, &copies)));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let label = format!("{who}: {}", job.label);
        let mut c = Contestant::command(&label, job.work, &argv).prepare(prepare);
        c.required = who == "crate" && !cfg.smoke;
        contestants.push(c);
        for (i, &(copy, source)) in job.checked.iter().enumerate() {
            outputs.push(Output {
                contestant: k,
                path: copies[copy].clone(),
                source: source.to_path_buf(),
                source_format: "qcow2",
                size_versus: (k == 1 && i == 0).then_some(0),
                label: format!("{}, image {copy}", job.label),
            });
        }
    }
    let ratios = match contestants.len() {
        // Rates inverted: the crate's time over qemu-img's.
        2 => vec![(
            format!("time crate / qemu-img, {} (issue 24: <= 1)", job.label),
            0,
            1,
        )],
        _ => Vec::new(),
    };
    Ok(Workload {
        title,
        unit: "MiB",
        contestants,
        baseline: 0,
        ratios,
        inputs: job.masters.iter().map(|m| m.to_path_buf()).collect(),
        notes: vec![
            "both are commands timed from spawn to exit, each on its own fresh copies \
             (made untimed before every pass); rates are MiB of guest per second"
                .into(),
            format!(
                "qemu-img and the crate's qcow2 both run: {} ({{i}}: their copy of image i)",
                job.args.join(" ")
            ),
        ],
        outputs,
    })
}

/// A raw file: `from` with the clusters `changed` picks inverted (so they differ from it).
fn variant(from: &Path, to: &Path, changed: impl Fn(u64) -> bool) -> Res<()> {
    let size = std::fs::metadata(from)?.len();
    if std::fs::metadata(to).is_ok_and(|m| m.len() == size) {
        println!("reusing {}", to.display());
        return Ok(());
    }
    println!("writing {} ({} MiB)", to.display(), size / MIB);
    let tmp = to.with_extension("raw.tmp");
    let (mut src, mut dst) = (File::open(from)?, File::create(&tmp)?);
    let mut buf = vec![0u8; CLUSTER as usize];
    for i in 0..size / CLUSTER {
        src.read_exact(&mut buf)?;
        if changed(i) {
            buf.iter_mut().for_each(|b| *b = !*b);
        }
        dst.write_all(&buf)?;
    }
    dst.sync_all()?;
    std::fs::rename(&tmp, to)?;
    Ok(())
}

/// `qemu-img convert -O qcow2 RAW OUT` (over `backing`: only the clusters that differ from it
/// written), unless OUT is there already.
fn qcow2_of(raw: &Path, out: &Path, backing: Option<&Path>) -> Res<()> {
    let size = std::fs::metadata(raw)?.len();
    if usable_image(out, size) {
        println!("reusing {}", out.display());
        return Ok(());
    }
    println!("qemu-img convert {} -> {}", raw.display(), out.display());
    let tmp = out.with_extension("qcow2.tmp");
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-f", "raw", "-O", "qcow2"]);
    if let Some(b) = backing {
        cmd.arg("-B").arg(b).args(["-F", "qcow2"]);
    }
    qemu_img(cmd.arg(raw).arg(&tmp))?;
    settle(&tmp)?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

/// The masters of both rows, in the inputs' directory: a base of random data, a second
/// base differing from it in every other cluster, an overlay of the first with every fourth
/// cluster written, and one with every cluster written.
struct Masters {
    base: PathBuf,
    other_base: PathBuf,
    sparse_top: PathBuf,
    full_top: PathBuf,
}

fn masters(cfg: &Config) -> Res<Masters> {
    let mib = cfg.size / MIB;
    let raw = |name: &str| cfg.dir.join(format!("jobs-{name}-{mib}m.raw"));
    let image = |name: &str| cfg.dir.join(format!("jobs-{name}-{mib}m.qcow2"));
    let a = raw("a");
    make_raw(&a, cfg.size, Fill::Random)?;
    variant(&a, &raw("b"), |i| i % 2 == 1)?;
    variant(&a, &raw("d"), |_| true)?;
    let m = Masters {
        base: image("base"),
        other_base: image("other-base"),
        sparse_top: image("sparse-top"),
        full_top: image("full-top"),
    };
    qcow2_of(&a, &m.base, None)?;
    qcow2_of(&raw("b"), &m.other_base, None)?;
    // The overlays name their base by its absolute path, so that copies elsewhere find it.
    // `convert -B` writes every cluster that is not zero (the full overlay); the sparse one
    // gets every fourth cluster from qemu-io.
    sparse_overlay(&m.base, &m.sparse_top, cfg.size)?;
    qcow2_of(&raw("d"), &m.full_top, Some(&m.base))?;
    Ok(m)
}

/// An overlay of `base` with every fourth cluster written (a pattern no base cluster holds),
/// unless there already.
fn sparse_overlay(base: &Path, out: &Path, size: u64) -> Res<()> {
    if usable_image(out, size) {
        println!("reusing {}", out.display());
        return Ok(());
    }
    println!("qemu-io: every fourth cluster of {}", out.display());
    let tmp = out.with_extension("qcow2.tmp");
    qemu_img(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(base)
            .arg(&tmp)
            .arg(size.to_string()),
    )?;
    let script: String = (0..size / CLUSTER)
        .step_by(4)
        .map(|i| format!("write -q -P 0x5a {} {CLUSTER}\n", i * CLUSTER))
        .collect();
    let mut io = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(&tmp)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    io.stdin
        .take()
        .ok_or("qemu-io: no stdin")?
        .write_all(script.as_bytes())?;
    if !io.wait()?.success() {
        return Err(format!("qemu-io failed on {}", tmp.display()).into());
    }
    std::fs::rename(&tmp, out)?;
    Ok(())
}

/// `commit` of a fully written overlay into its base (both copied fresh for every pass, the
/// overlay's copy pointed at the base's by `qemu-img rebase -u`).
pub fn commit(cfg: &Config) -> Res<Workload> {
    let m = masters(cfg)?;
    let job = CopyJob {
        tag: "commit",
        label: "commit",
        masters: &[&m.base, &m.full_top],
        fixups: &[&[
            "qemu-img", "rebase", "-u", "-b", "{0}", "-F", "qcow2", "{1}",
        ]],
        args: &["commit", "-q", "{1}"],
        checked: &[(0, &m.full_top), (1, &m.full_top)],
        work: (cfg.size / MIB) as f64,
    };
    let title = format!(
        "commit-1g: commit a fully written {} MiB overlay into its base, then empty it",
        cfg.size / MIB
    );
    copy_job_workload(cfg, &job, title)
}

/// Safe `rebase` of an overlay (every fourth cluster its own) onto a base that differs from
/// its old one in every other cluster: 3/8 of the guest copied into it.
pub fn rebase(cfg: &Config) -> Res<Workload> {
    let m = masters(cfg)?;
    let other = s(&m.other_base);
    let job = CopyJob {
        tag: "rebase",
        label: "rebase (safe)",
        masters: &[&m.sparse_top],
        fixups: &[],
        args: &["rebase", "-q", "-b", &other, "-F", "qcow2", "{0}"],
        checked: &[(0, &m.sparse_top)],
        work: (cfg.size / MIB) as f64,
    };
    let title = format!(
        "rebase-1g: safe rebase of a {} MiB overlay (1/4 of it allocated) onto a base that \
         differs from the old one in half the clusters",
        cfg.size / MIB
    );
    copy_job_workload(cfg, &job, title)
}

/// The base master with 16 snapshots: before each, 8 MiB written at a place of its own.
fn with_snapshots(base: &Path, out: &Path, size: u64) -> Res<()> {
    if usable_image(out, size) {
        println!("reusing {}", out.display());
        return Ok(());
    }
    println!("16 snapshots: {}", out.display());
    let tmp = out.with_extension("qcow2.tmp");
    std::fs::copy(base, &tmp)?;
    let step = (size / 17 / CLUSTER).max(1) * CLUSTER;
    for i in 1..=16u64 {
        let write = format!("write -q -P {i} {} {}", i * step, (8 * MIB).min(step));
        qemu_img(
            Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", &write])
                .arg(&tmp),
        )?;
        qemu_img(
            Command::new("qemu-img")
                .args(["snapshot", "-c", &format!("s{i}")])
                .arg(&tmp),
        )?;
    }
    std::fs::rename(&tmp, out)?;
    Ok(())
}

/// `snapshot -c` or `-d` on a copy of the master with 16 snapshots.
fn snapshot_job(cfg: &Config, tag: &str, flag: &str, name: &str) -> Res<Workload> {
    let m = masters(cfg)?;
    let master = cfg
        .dir
        .join(format!("jobs-snapshots-{}m.qcow2", cfg.size / MIB));
    with_snapshots(&m.base, &master, cfg.size)?;
    let label = format!("snapshot {flag} {name}");
    let job = CopyJob {
        tag,
        label: &label,
        masters: &[&master],
        fixups: &[],
        args: &["snapshot", flag, name, "{0}"],
        checked: &[(0, &master)],
        work: (cfg.size / MIB) as f64,
    };
    let title = format!(
        "{tag}: snapshot {flag} on a {} MiB image (every cluster allocated) with 16 snapshots",
        cfg.size / MIB
    );
    copy_job_workload(cfg, &job, title)
}

/// `snapshot -c` of a 1 GiB image with 16 snapshots.
pub fn snapshot_create(cfg: &Config) -> Res<Workload> {
    snapshot_job(cfg, "snapshot-c", "-c", "s17")
}

/// `snapshot -d` of the 8th of 16 snapshots of a 1 GiB image.
pub fn snapshot_delete(cfg: &Config) -> Res<Workload> {
    snapshot_job(cfg, "snapshot-d", "-d", "s8")
}
