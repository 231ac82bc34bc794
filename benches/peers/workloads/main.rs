//! Every workload of issue 9, each with its peers in the same run: the crate against raw
//! `pread`/`dd`, `qemu-img convert` to the null driver, `qemu-img map`, `qemu-img bench` and
//! imago; and issue 22's, which write new images (`qemu-img convert -O qcow2` against the
//! crate's `qcow2 convert -O qcow2`, see `write.rs`). See `benches/README.md` for what each row measures and how to reproduce it.
//!
//! ```text
//! cargo bench -p qcow2-bench-peers --bench workloads                          # 1 GiB inputs, 5 rounds
//! cargo bench -p qcow2-bench-peers --bench workloads -- --size-mib 256 --runs 3 --only rand
//! ```
//!
//! Every pass runs in a child process (this bench re-executed with `--child`, or the peer's
//! own process), so each reports its own peak RSS and CPU time. Run without `--bench` (as
//! `cargo test -p qcow2-bench-peers --benches` does), it is a smoke test on tiny inputs in a temporary directory.

#[path = "../../common/mod.rs"]
mod common;

mod bench;
mod child;
mod contest;
mod inputs;
mod jobs;
mod jobs_check;
mod rows;
mod write;

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{loadavg, Res, MIB};

/// What to run, and on what sizes (from the command line).
pub struct Config {
    /// Bytes of the fully allocated images (and the chain).
    size: u64,
    /// Bytes of the compressed images.
    zlib_size: u64,
    /// Data clusters of the 1 TiB sparse image.
    clusters: u64,
    /// Reads of each random-read workload.
    reads: usize,
    runs: usize,
    dir: PathBuf,
    smoke: bool,
    only: Vec<String>,
    /// The `-i`/`aio=` of `qemu-img` (io_uring where it works).
    aio: String,
    /// Where the `bench-*` write rows keep their images (`--write-dir`; default: `/dev/shm`
    /// when there is one, else `dir`).
    write_dir: Option<PathBuf>,
}

impl Config {
    /// Where the `bench-*` write rows keep their images.
    pub fn write_dir(&self) -> &std::path::Path {
        self.write_dir
            .as_deref()
            .unwrap_or_else(|| rows::scratch_dir(self))
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench -p qcow2-bench-peers --bench workloads [-- [--size-mib N] [--zlib-mib N] \
         [--clusters N] [--reads N] [--runs K] [--dir PATH] [--write-dir PATH] [--only NAME[,NAME..]]]\n\
         workloads: {}",
        rows::ALL.map(|(name, _)| name).join(", ")
    );
    std::process::exit(2)
}

fn config(args: &[String]) -> Config {
    let smoke = !args.iter().any(|a| a == "--bench");
    let mut c = Config {
        size: 1024 * MIB,
        zlib_size: 0,
        clusters: 0,
        reads: 100_000,
        runs: 5,
        dir: common::target_dir("bench-workloads"),
        smoke,
        only: Vec::new(),
        aio: String::new(),
        write_dir: None,
    };
    if smoke {
        // Small enough for a debug build under `cargo test --benches`.
        c.size = 8 * MIB;
        c.reads = 1000;
        c.runs = 1;
        c.dir = std::env::temp_dir().join(format!("qcow2-bench-workloads-{}", std::process::id()));
    }
    let mut it = args.iter();
    let num = |v: Option<&String>| -> u64 {
        v.and_then(|s| s.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| usage())
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--size-mib" => c.size = num(it.next()) * MIB,
            "--zlib-mib" => c.zlib_size = num(it.next()) * MIB,
            "--clusters" => c.clusters = num(it.next()),
            "--reads" => c.reads = num(it.next()) as usize,
            "--runs" => c.runs = num(it.next()) as usize,
            "--dir" => c.dir = it.next().map(PathBuf::from).unwrap_or_else(|| usage()),
            "--write-dir" => {
                c.write_dir = Some(it.next().map(PathBuf::from).unwrap_or_else(|| usage()))
            }
            "--only" => {
                let names = it.next().unwrap_or_else(|| usage());
                c.only = names.split(',').map(str::to_owned).collect();
            }
            "--help" | "-h" => usage(),
            _ => {} // cargo passes --bench; ignore other harness flags
        }
    }
    if c.zlib_size == 0 {
        // Decompressing is slow in the smoke test's debug build.
        c.zlib_size = if smoke {
            c.size / 4
        } else {
            c.size.min(256 * MIB)
        };
    }
    if c.clusters == 0 {
        // 8192 clusters (512 MiB of data) for 1 GiB inputs, in proportion below.
        c.clusters = (c.size / MIB * 8).clamp(16, 8192);
    }
    c
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(child::FLAG) {
        return child::main(&args[1..]);
    }
    let mut cfg = config(&args);
    if !common::qemu_img_or_skip("workloads") {
        return Ok(());
    }
    fs::create_dir_all(&cfg.dir)?;
    let result = run(&mut cfg);
    rows::remove_convert_output(&cfg);
    write::remove_outputs(&cfg);
    if cfg.smoke {
        let _ = fs::remove_dir_all(&cfg.dir);
    }
    result
}

fn run(cfg: &mut Config) -> Res<()> {
    if cfg.smoke {
        println!("smoke test (no --bench: tiny inputs, one round; the numbers mean nothing)");
    }
    cfg.aio = qemu_aio(cfg)?;
    println!(
        "inputs in {}; qemu-img I/O: aio={}; load before: {}",
        cfg.dir.display(),
        cfg.aio,
        loadavg()
    );
    println!(
        "times: the crate, imago and pread run in a child process each and are timed there from \
         open to the last byte; qemu-img and dd from spawn to exit (start-up included), except \
         qemu-img bench, by its own report. CPU time and peak RSS are each child's (wait4); \
         a child of this bench that does nothing peaks at {:.1} MiB.",
        contest::idle_child_rss_mib()?
    );
    let mut summary = Vec::new();
    for (name, make) in rows::ALL {
        if !cfg.only.is_empty() && !cfg.only.iter().any(|o| name.contains(o.as_str())) {
            continue;
        }
        let workload = make(cfg)?;
        let ratios = contest::run(&workload, cfg.runs)?;
        summary.push((name, ratios));
    }
    println!();
    println!("summary (ratios of median rates: \"A / B\" above 1 means A is faster):");
    for (name, ratios) in summary {
        println!("   {name:<13} {}", ratios.join("; "));
    }
    println!("load after: {}", loadavg());
    Ok(())
}

/// `io_uring` if `qemu-img bench -i io_uring` works here (the kernel and the QEMU build must
/// both allow it), else `threads`. (`native` would need `-t none`, O_DIRECT: not the page
/// cache the other contestants read from.)
fn qemu_aio(cfg: &Config) -> Res<String> {
    let probe = inputs::empty(&cfg.dir)?;
    let works = Command::new("qemu-img")
        .args(["bench", "-f", "qcow2", "-c", "1", "-i", "io_uring"])
        .arg(&probe)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        println!("note: qemu-img cannot use io_uring here; its peers use aio=threads");
    }
    Ok(if works { "io_uring" } else { "threads" }.into())
}
