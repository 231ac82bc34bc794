//! Issue 23's rows: `qemu-img bench` against the crate's `qcow2 bench` with the very same
//! arguments (`-t writeback`, qemu-img's `-i` of the other rows), each timed by the
//! `Run completed in S seconds.` line it prints: writes allocating a fresh image (1 MiB
//! sequential, 4 KiB each into a new cluster, the same with a flush every 16 writes), 4 KiB
//! overwrites of allocated clusters, and reads of a fully allocated image.
//!
//! Every write pass starts from an image made anew, untimed, by `qemu-img create -f qcow2`
//! (and, for the overwrites, filled by `qemu-img bench -w -s 1M`), each contestant its own,
//! in `/dev/shm` when there is one (else the inputs' directory; `--write-dir` chooses). After
//! the last round the crate's image must equal qemu-img's (`qemu-img compare`) and both must
//! be clean (`qemu-img check`).

use std::path::{Path, PathBuf};

use crate::common::{Res, MIB};
use crate::contest::{Contestant, Output, Workload};
use crate::Config;

/// The byte both tools write: not zero, so that neither could store a write as zeros.
const PATTERN: &str = "--pattern=0xa5";

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Where contestant `k` of the row `tag` keeps its image.
fn image_path(cfg: &Config, tag: &str, k: usize) -> PathBuf {
    cfg.write_dir().join(format!(
        "qcow2-bench-write-{}-bench-{tag}-{k}.qcow2",
        std::process::id()
    ))
}

/// `qemu-img create -q -f qcow2 IMG SIZE`, as a command line.
fn create(img: &Path, size: u64) -> Vec<String> {
    ["qemu-img", "create", "-q", "-f", "qcow2"]
        .map(String::from)
        .into_iter()
        .chain([s(img), size.to_string()])
        .collect()
}

/// One benchmark both tools run: its label, the bench arguments (without the image), the
/// size of the image each contestant starts from, whether that image is filled first, and
/// the units of work of one pass.
struct Job {
    label: String,
    args: Vec<String>,
    image_size: u64,
    filled: bool,
    work: f64,
}

/// The bench arguments both tools get: `-f qcow2 -t writeback -i AIO` then `extra`.
fn bench_args(cfg: &Config, extra: &[&str]) -> Vec<String> {
    ["bench", "-f", "qcow2", "-t", "writeback", "-i", &cfg.aio]
        .iter()
        .chain(extra)
        .map(|a| a.to_string())
        .collect()
}

/// The contestants of a write row: per job, qemu-img then the crate (when its binary is
/// there), each on its own image made anew before every pass; their outputs (the crate's
/// compared with qemu-img's) and the ratio of each pair.
fn write_row(
    cfg: &Config,
    title: String,
    tag: &str,
    jobs: Vec<Job>,
    targets: &[&str],
    notes: Vec<String>,
) -> Res<Workload> {
    let bin = crate::write::qcow2_bin(cfg)?;
    let mut contestants = Vec::new();
    let mut outputs: Vec<Output> = Vec::new();
    let mut ratios = Vec::new();
    let mut commands = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let mut programs = vec![("qemu-img".to_string(), "qemu-img".to_string())];
        if let Some(bin) = &bin {
            programs.push(("crate".to_string(), s(bin)));
        }
        let first = contestants.len();
        for (who, program) in programs {
            let k = contestants.len();
            let img = image_path(cfg, tag, k);
            let mut prepare = vec![create(&img, job.image_size)];
            if job.filled {
                // Every cluster allocated (by QEMU, the same layout for both), untimed.
                let count = (job.image_size / MIB).to_string();
                prepare.push(
                    [
                        "qemu-img", "bench", "-q", "-f", "qcow2", "-w", "-s", "1M", "-c",
                    ]
                    .map(String::from)
                    .into_iter()
                    .chain([count, "--pattern=0x5a".into(), s(&img)])
                    .collect(),
                );
            }
            let mut argv = vec![program];
            argv.extend(job.args.iter().cloned());
            argv.push(s(&img));
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let label = format!("{who}: {}", job.label);
            let mut c = Contestant::qemu_bench(&label, job.work, &argv).prepare(prepare);
            // The crate must succeed in a full run; in the smoke test (before the writer
            // lands) it may fail, and shows as n/a.
            c.required = who == "crate" && !cfg.smoke;
            contestants.push(c);
            let qemu_image = image_path(cfg, tag, first);
            outputs.push(Output {
                contestant: k,
                path: img,
                source: qemu_image,
                source_format: "qcow2",
                size_versus: (k != first).then_some(first),
                label: job.label.clone(),
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
        commands.push(format!(
            "{}: {} IMG, on an image made before every pass by qemu-img create -f qcow2 \
             IMG {}{}",
            job.label,
            job.args.join(" "),
            job.image_size,
            if job.filled {
                " and filled by qemu-img bench -w -s 1M (every cluster allocated)"
            } else {
                ""
            }
        ));
    }
    Ok(Workload {
        title,
        unit: "requests",
        contestants,
        baseline: 0,
        ratios,
        inputs: vec![],
        notes: notes
            .into_iter()
            .chain([
                "after the last round, the crate's image is compared with qemu-img's \
                     (its \"source\" below) and both are checked"
                    .to_string(),
            ])
            .chain(commands)
            .chain([note_times(cfg.write_dir())])
            .collect(),
        outputs,
    })
}

fn note_times(dir: &Path) -> String {
    format!(
        "times: what each prints (\"Run completed in S seconds.\", 1 ms resolution: from the \
         first request to the last completion, the open and the close with its final flush \
         not included, as qemu-img times); the \"spawn to exit\" ratio includes them. Images \
         in {}",
        dir.display()
    )
}

/// `-w -c N -s 1M` on a fresh image of N MiB: sequential allocation.
pub fn seq_1m(cfg: &Config) -> Res<Workload> {
    let count = cfg.size / MIB;
    let count_text = count.to_string();
    let job = Job {
        label: format!("-w -c {count} -s 1M"),
        args: bench_args(cfg, &["-w", "-c", &count_text, "-s", "1M", PATTERN]),
        image_size: cfg.size,
        filled: false,
        work: count as f64,
    };
    write_row(
        cfg,
        format!(
            "bench-seq-1m: sequential 1 MiB writes allocating a fresh {} MiB image",
            cfg.size / MIB
        ),
        "seq",
        vec![job],
        &[" (issue 23: <= 0.8)"],
        vec![],
    )
}

/// 4 KiB writes 64 KiB apart on a fresh image: each into a new cluster; `flush` adds
/// `--flush-interval=16` (with `-d 16`: qemu-img refuses an interval below the depth).
fn new_clusters(cfg: &Config, flush: bool) -> Res<Workload> {
    let count = cfg.size / (64 * 1024);
    let count_text = count.to_string();
    let mut extra = vec!["-w", "-s", "4K", "-S", "64K", "-c", &count_text, PATTERN];
    if flush {
        extra.extend(["-d", "16", "--flush-interval=16"]);
    }
    let job = Job {
        label: extra
            .iter()
            .filter(|a| **a != PATTERN)
            .copied()
            .collect::<Vec<_>>()
            .join(" "),
        args: bench_args(cfg, &extra),
        image_size: cfg.size,
        filled: false,
        work: count as f64,
    };
    let (name, tag, what) = if flush {
        (
            "bench-4k-new-flush",
            "newf",
            ", a flush every 16 (the queue drained first)",
        )
    } else {
        ("bench-4k-new", "new", "")
    };
    write_row(
        cfg,
        format!(
            "{name}: 4 KiB writes, each into a new 64 KiB cluster of a fresh {} MiB image{what}",
            cfg.size / MIB
        ),
        tag,
        vec![job],
        &[" (issue 23: <= 0.8)"],
        vec![],
    )
}

pub fn new_4k(cfg: &Config) -> Res<Workload> {
    new_clusters(cfg, false)
}

pub fn new_4k_flush(cfg: &Config) -> Res<Workload> {
    new_clusters(cfg, true)
}

/// 4 KiB overwrites of every 4 KiB of an image (a quarter of `--size-mib`) whose clusters
/// are all allocated.
pub fn over_4k(cfg: &Config) -> Res<Workload> {
    let image_size = (cfg.size / 4).max(MIB);
    let count = image_size / 4096;
    let count_text = count.to_string();
    let job = Job {
        label: format!("-w -s 4K -c {count}"),
        args: bench_args(cfg, &["-w", "-s", "4K", "-c", &count_text, PATTERN]),
        image_size,
        filled: true,
        work: count as f64,
    };
    write_row(
        cfg,
        format!(
            "bench-4k-over: 4 KiB overwrites of a {} MiB image, every cluster allocated",
            image_size / MIB
        ),
        "over",
        vec![job],
        &[" (issue 23: <= 0.9)"],
        vec![],
    )
}

/// Reads of the fully allocated image of the sequential rows (`random-Sm-64k.qcow2`): 4 KiB
/// and 1 MiB requests over the whole guest, `qemu-img bench` against `qcow2 bench` (the
/// crate's reader; issue 23: it must not get slower once the writer lands), and against the
/// command of `$QCOW2_BIN_BEFORE` when it is set (an older build).
pub fn read(cfg: &Config) -> Res<Workload> {
    let bin = crate::write::qcow2_bin(cfg)?;
    // The crate's command as it was before a change (`QCOW2_BIN_BEFORE`), side by side.
    let before = std::env::var_os("QCOW2_BIN_BEFORE").map(PathBuf::from);
    let (img, raw) = crate::inputs::plain(&cfg.dir, cfg.size)?;
    let mut contestants = Vec::new();
    let mut ratios = Vec::new();
    for (size, bytes) in [("4K", 4096), ("1M", MIB)] {
        let count = cfg.size / bytes;
        let count_text = count.to_string();
        let args = bench_args(cfg, &["-s", size, "-c", &count_text]);
        let first = contestants.len();
        // (who, program, arguments before qemu-img's): the reader before and after a change
        // both on one thread (`--threads 1`), the older command's default.
        let mut programs = vec![("qemu-img", "qemu-img".to_string(), None)];
        if let Some(bin) = &bin {
            programs.push(("crate", s(bin), None));
        }
        if let (Some(bin), Some(before)) = (&bin, &before) {
            programs.push(("crate --threads 1", s(bin), Some("1")));
            programs.push(("crate before --threads 1", s(before), Some("1")));
        }
        for (who, program, threads) in programs {
            let mut argv = vec![program, "bench".to_string()];
            if let Some(n) = threads {
                argv.extend(["--threads".to_string(), n.to_string()]);
            }
            argv.extend(args.iter().skip(1).cloned());
            argv.push(s(&img));
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let label = format!("{who}: read -s {size} -c {count}");
            let mut c = Contestant::qemu_bench(&label, count as f64, &argv);
            c.required = who == "crate" && !cfg.smoke;
            contestants.push(c);
        }
        if bin.is_some() {
            ratios.push((
                format!("time crate / qemu-img, read -s {size}"),
                first,
                first + 1,
            ));
            if before.is_some() {
                ratios.push((
                    format!(
                        "time crate / crate before, 1 thread each, read -s {size} (issue 23: <= 1)"
                    ),
                    first + 3,
                    first + 2,
                ));
            }
        }
    }
    Ok(Workload {
        title: format!(
            "bench-read: reads of the fully allocated {} MiB image (64 KiB clusters), 4 KiB and 1 MiB",
            cfg.size / MIB
        ),
        unit: "requests",
        contestants,
        baseline: 0,
        ratios,
        inputs: vec![img, raw],
        notes: vec![
            "both: bench -f qcow2 -t writeback -i AIO -s SIZE -c COUNT IMG (sequential, depth 64: \
             the crate reads on one thread)"
                .into(),
            note_times(&cfg.dir),
        ],
        outputs: vec![],
    })
}
