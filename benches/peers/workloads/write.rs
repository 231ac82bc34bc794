//! The workloads of issue 22: new qcow2 images written by `qemu-img convert -O qcow2` and by
//! the crate's command (`qcow2 convert -O qcow2`, same arguments), side by side: compressed
//! (zlib, zstd), uncompressed, and a zstd image recompressed to zlib. The outputs are
//! checked with `qemu-img compare` and `qemu-img check` after the last round, and their sizes
//! compared.
//!
//! The crate's binary is `$QCOW2_BIN`, else `target/release/qcow2` (`cargo build --release
//! --features cli`); the smoke test also takes `target/debug/qcow2`, and leaves the crate out
//! when there is none.

use std::path::{Path, PathBuf};

use crate::common::{make_qcow2, make_raw, target_dir, Fill, Res, MIB};
use crate::contest::{Contestant, Output, Runner, Workload};
use crate::Config;

/// The crate's command, or why it cannot be had (`None` in a smoke test without one).
pub(crate) fn qcow2_bin(cfg: &Config) -> Res<Option<PathBuf>> {
    if let Some(bin) = std::env::var_os("QCOW2_BIN") {
        return Ok(Some(PathBuf::from(bin)));
    }
    let release = target_dir("release").join("qcow2");
    if release.is_file() {
        return Ok(Some(release));
    }
    let debug = target_dir("debug").join("qcow2");
    if cfg.smoke {
        return Ok(debug.is_file().then_some(debug));
    }
    Err(format!(
        "{} is missing: build it (cargo build --release --features cli) or set QCOW2_BIN",
        release.display()
    )
    .into())
}

/// Where contestant `k` of the row `tag` writes its image: `/dev/shm` (memory, so that the
/// disk's write-back does not time the row) when there is one, else the inputs' directory.
fn output_path(cfg: &Config, tag: &str, k: usize) -> PathBuf {
    crate::rows::scratch_dir(cfg).join(format!(
        "qcow2-bench-write-{}-{tag}-{k}.qcow2",
        std::process::id()
    ))
}

/// Remove every output a row of this process may have left (after an error), here and in
/// the bench rows' `--write-dir`.
pub fn remove_outputs(cfg: &Config) {
    let prefix = format!("qcow2-bench-write-{}-", std::process::id());
    for dir in [crate::rows::scratch_dir(cfg), cfg.write_dir()] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Text-like data (random letters from a 16-letter alphabet, as the compressed rows read).
fn text(cfg: &Config) -> Res<PathBuf> {
    let raw = cfg.dir.join(format!("text-{}m.raw", cfg.size / MIB));
    make_raw(&raw, cfg.size, Fill::Compressible)?;
    Ok(raw)
}

/// One conversion, written by both tools: the arguments after the program name (without
/// the output), the source and its format.
struct Job<'a> {
    label: &'a str,
    args: &'a [&'a str],
    source: &'a Path,
    source_format: &'static str,
}

/// The contestants of a row, the images they write, and the time ratio of each pair.
struct Pairs {
    contestants: Vec<Contestant>,
    outputs: Vec<Output>,
    ratios: Vec<(String, usize, usize)>,
}

/// The contestants of `jobs`: for each, `qemu-img` then the crate (when it is there), each
/// writing its own output; `targets` completes the label of each pair's time ratio.
fn contest(
    cfg: &Config,
    bin: Option<&Path>,
    tag: &str,
    jobs: &[Job],
    targets: &[&str],
) -> Res<Pairs> {
    let mut contestants = Vec::new();
    let mut outputs = Vec::new();
    let mut ratios = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let mut programs = vec![(format!("qemu-img: {}", job.label), "qemu-img".to_string())];
        if let Some(bin) = bin {
            programs.push((
                format!("crate: {}", job.label),
                bin.to_string_lossy().into_owned(),
            ));
        }
        let first = contestants.len();
        for (label, program) in programs {
            let k = contestants.len();
            let out = output_path(cfg, tag, k);
            let mut argv = vec![program.as_str()];
            argv.extend(job.args);
            argv.push(s(job.source));
            argv.push(s(&out));
            let mut c = Contestant::command(&label, mib(cfg.size), &argv);
            // The crate must succeed in a full run; in the smoke test its command may not
            // write qcow2 yet, and shows as n/a.
            c.required = label.starts_with("crate") && !cfg.smoke;
            contestants.push(c);
            outputs.push(Output {
                contestant: k,
                path: out,
                source: job.source.to_path_buf(),
                source_format: job.source_format,
                size_versus: (k != first).then_some(first),
                label: job.label.to_string(),
            });
        }
        if contestants.len() == first + 2 {
            let target = targets.get(j).copied().unwrap_or("");
            // Rates inverted: the crate's time over qemu-img's.
            ratios.push((
                format!("time crate / qemu-img, {}{target}", job.label),
                first,
                first + 1,
            ));
        }
    }
    Ok(Pairs {
        contestants,
        outputs,
        ratios,
    })
}

/// A note per job: the command both tools run (the crate's binary in place of `qemu-img`).
fn commands(jobs: &[Job], contestants: &[Contestant]) -> Vec<String> {
    let crate_bin = contestants.iter().find_map(|c| match &c.runner {
        Runner::Command(argv) if c.label.starts_with("crate") => argv.first().cloned(),
        _ => None,
    });
    jobs.iter()
        .map(|job| {
            format!(
                "{}: qemu-img {} {} OUT; the crate: {}",
                job.label,
                job.args.join(" "),
                job.source.display(),
                crate_bin
                    .as_ref()
                    .map_or("left out (no qcow2 binary)".into(), |b| format!(
                        "{b} with the same arguments"
                    ))
            )
        })
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

const NOTE_TIMES: &str = "both are commands timed from spawn to exit (start-up included), \
     each writing its own output file anew on every pass; rates are MiB of guest per second";

/// `convert -c -O qcow2` of S MiB of text: zlib, then `compression_type=zstd`.
pub fn compressed(cfg: &Config) -> Res<Workload> {
    let bin = qcow2_bin(cfg)?;
    let raw = text(cfg)?;
    let jobs = [
        Job {
            label: "-c, zlib",
            args: &["convert", "-f", "raw", "-O", "qcow2", "-c"],
            source: &raw,
            source_format: "raw",
        },
        Job {
            label: "-c, zstd",
            args: &[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-c",
                "-o",
                "compression_type=zstd",
            ],
            source: &raw,
            source_format: "raw",
        },
    ];
    let targets = [" (issue 22: <= 0.5)", " (issue 22: <= 0.7)"];
    let Pairs {
        contestants,
        outputs,
        ratios,
    } = contest(cfg, bin.as_deref(), "c", &jobs, &targets)?;
    let notes = commands(&jobs, &contestants);
    Ok(Workload {
        title: format!(
            "write a compressed image: {} MiB of text (16-letter random) to qcow2 -c, zlib and zstd",
            cfg.size / MIB
        ),
        unit: "MiB",
        contestants,
        baseline: 0,
        ratios,
        inputs: vec![raw],
        notes: [
            NOTE_TIMES.into(),
            "issue 22: the crate's compressed output at most 3% larger than qemu-img's".into(),
        ]
        .into_iter()
        .chain(notes)
        .collect(),
        outputs,
    })
}

/// `convert -O qcow2` of S MiB of PRNG data (nothing to compress, no zeros).
pub fn plain(cfg: &Config) -> Res<Workload> {
    let bin = qcow2_bin(cfg)?;
    let raw = cfg.dir.join(format!("random-{}m.raw", cfg.size / MIB));
    make_raw(&raw, cfg.size, Fill::Random)?;
    let jobs = [Job {
        label: "raw to qcow2",
        args: &["convert", "-f", "raw", "-O", "qcow2"],
        source: &raw,
        source_format: "raw",
    }];
    let Pairs {
        contestants,
        outputs,
        ratios,
    } = contest(
        cfg,
        bin.as_deref(),
        "plain",
        &jobs,
        &[" (issue 22: <= 0.9)"],
    )?;
    let notes = commands(&jobs, &contestants);
    Ok(Workload {
        title: format!(
            "write an uncompressed image: {} MiB of random data, raw to qcow2",
            cfg.size / MIB
        ),
        unit: "MiB",
        contestants,
        baseline: 0,
        ratios,
        inputs: vec![raw],
        notes: [
            NOTE_TIMES.into(),
            "issue 22: the output at most 10% larger than qemu-img's".into(),
        ]
        .into_iter()
        .chain(notes)
        .collect(),
        outputs,
    })
}

/// A zstd-compressed image of S MiB of text, recompressed to zlib.
pub fn recompress(cfg: &Config) -> Res<Workload> {
    let bin = qcow2_bin(cfg)?;
    let raw = text(cfg)?;
    let zstd = make_qcow2(
        &raw,
        "zstd",
        &["-c", "-o", "cluster_size=65536,compression_type=zstd"],
    )?;
    let jobs = [Job {
        label: "zstd image to zlib",
        args: &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            "-c",
            "-o",
            "compression_type=zlib",
        ],
        source: &zstd,
        source_format: "qcow2",
    }];
    let Pairs {
        contestants,
        outputs,
        ratios,
    } = contest(cfg, bin.as_deref(), "re", &jobs, &[" (issue 22: <= 0.5)"])?;
    let notes = commands(&jobs, &contestants);
    Ok(Workload {
        title: format!(
            "recompress: the {} MiB zstd image of text to a zlib-compressed image",
            cfg.size / MIB
        ),
        unit: "MiB",
        contestants,
        baseline: 0,
        ratios,
        inputs: vec![zstd],
        notes: [NOTE_TIMES.into()].into_iter().chain(notes).collect(),
        outputs,
    })
}
