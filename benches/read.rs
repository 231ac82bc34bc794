//! Read-speed benchmark: the crate against `pread` of the same bytes in a raw file, and
//! against `qemu-img convert` to a null target.
//!
//! ```text
//! cargo bench --bench read                                  # 1 GiB images, 7 runs
//! cargo bench --bench read -- --size-mib 256 --runs 5       # smaller, fewer
//! cargo bench --bench read -- --zlib-mib 128 --no-2m        # other knobs
//! ```
//!
//! Images are made once with `qemu-img` under `target/bench-read/` and reused (delete the
//! directory to remake them): a fully allocated image with 64 KiB clusters holding PRNG
//! data (incompressible), the same data with 2 MiB clusters, and a zlib-compressed image
//! (`convert -c`) of compressible data; each next to its raw file. Before timing, every
//! file is synced, dropped from the page cache (`dd iflag=nocache count=0`) and read once,
//! so all inputs are in the page cache in the same state. Methods are timed interleaved,
//! round after round, and the report gives medians. Every crate read is compared in full
//! with the raw file once, and every timed pass checks a running checksum against raw.
//!
//! Run without `--bench` (as `cargo test --benches` does), it is a quick smoke test on tiny
//! images in a temporary directory.

mod common;

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use positioned_io::ReadAt;
use qcow2::Qcow2;

use common::{loadavg, make_qcow2, make_raw, recache, Fill, Res, MIB};

const BUFFERS: [usize; 3] = [1 << 20, 64 << 10, 4 << 10];
/// The crate should read at least this fraction of raw `pread` speed with 1 MiB buffers.
const TARGET_RATIO: f64 = 0.9;

struct Config {
    size_mib: u64,
    zlib_mib: u64,
    runs: usize,
    two_meg: bool,
    zlib: bool,
    dir: PathBuf,
    smoke: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench read [-- [--size-mib N] [--zlib-mib N] [--runs K] \
         [--no-2m] [--no-zlib] [--dir PATH]]"
    );
    std::process::exit(2)
}

fn config() -> Config {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let mut c = Config {
        size_mib: 1024,
        zlib_mib: 0,
        runs: 7,
        two_meg: true,
        zlib: true,
        dir: common::target_dir("bench-read"),
        smoke,
    };
    if smoke {
        c.size_mib = 16;
        c.zlib_mib = 4;
        c.runs = 1;
        c.dir = std::env::temp_dir().join(format!("qcow2-bench-read-{}", std::process::id()));
    }
    let mut it = args.iter();
    let num = |v: Option<&String>| -> u64 {
        v.and_then(|s| s.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| usage())
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--size-mib" => c.size_mib = num(it.next()),
            "--zlib-mib" => c.zlib_mib = num(it.next()),
            "--runs" => c.runs = num(it.next()) as usize,
            "--no-2m" => c.two_meg = false,
            "--no-zlib" => c.zlib = false,
            "--dir" => c.dir = it.next().map(PathBuf::from).unwrap_or_else(|| usage()),
            "--help" | "-h" => usage(),
            _ => {} // cargo passes --bench; ignore other harness flags
        }
    }
    if c.zlib_mib == 0 {
        c.zlib_mib = c.size_mib.min(256);
    }
    c
}

fn main() -> Res<()> {
    let cfg = config();
    common::run_in("read", &cfg.dir, cfg.smoke, || run(&cfg))
}

fn run(cfg: &Config) -> Res<()> {
    if cfg.smoke {
        println!("smoke test (no --bench: tiny images, one round; the numbers mean nothing)");
    }
    println!("load before: {}", loadavg());
    let size = cfg.size_mib * MIB;
    let raw = cfg.dir.join(format!("random-{}m.raw", cfg.size_mib));
    make_raw(&raw, size, Fill::Random)?;
    let mut groups = vec![Group {
        title: format!(
            "64 KiB clusters, {} MiB, fully allocated, random data",
            cfg.size_mib
        ),
        image: make_qcow2(&raw, "64k", &["-o", "cluster_size=65536"])?,
        raw: raw.clone(),
        size,
        primary: true,
    }];
    if cfg.two_meg {
        groups.push(Group {
            title: format!(
                "2 MiB clusters, {} MiB, fully allocated, random data",
                cfg.size_mib
            ),
            image: make_qcow2(&raw, "2m", &["-o", "cluster_size=2097152"])?,
            raw: raw.clone(),
            size,
            primary: false,
        });
    }
    if cfg.zlib {
        let zsize = cfg.zlib_mib * MIB;
        let zraw = cfg.dir.join(format!("text-{}m.raw", cfg.zlib_mib));
        make_raw(&zraw, zsize, Fill::Compressible)?;
        groups.push(Group {
            title: format!(
                "64 KiB clusters, {} MiB, every cluster zlib-compressed (convert -c)",
                cfg.zlib_mib
            ),
            image: make_qcow2(&zraw, "zlib", &["-c", "-o", "cluster_size=65536"])?,
            raw: zraw,
            size: zsize,
            primary: false,
        });
    }

    let mut verdict = None;
    for g in &groups {
        println!();
        println!("== {}", g.title);
        println!("   image {}", g.image.display());
        recache(&[&g.image, &g.raw])?;
        verify(g)?;
        let rows = measure(g, cfg.runs)?;
        let ratio = print_table(&rows);
        if g.primary {
            verdict = Some(ratio);
        }
    }
    println!();
    println!("load after: {}", loadavg());
    if let (Some(r), false) = (verdict, cfg.smoke) {
        let ok = if r >= TARGET_RATIO {
            "OK"
        } else {
            "BELOW TARGET"
        };
        println!(
            "crate/raw at 1 MiB buffers, 64 KiB clusters: {r:.3} (target >= {TARGET_RATIO}): {ok}"
        );
    }
    Ok(())
}

struct Group {
    title: String,
    image: PathBuf,
    raw: PathBuf,
    size: u64,
    /// The 64 KiB image whose 1 MiB ratio is checked against the target.
    primary: bool,
}

// ---------------------------------------------------------------------------------------
// Inputs

fn verify(g: &Group) -> Res<()> {
    let img = Qcow2::open(File::open(&g.image)?)?;
    if img.guest_size() != g.size {
        return Err(format!("{}: guest size {}", g.image.display(), img.guest_size()).into());
    }
    let reader = img.reader()?;
    let raw = File::open(&g.raw)?;
    let mut a = vec![0u8; MIB as usize];
    let mut b = vec![0u8; MIB as usize];
    let mut pos = 0;
    while pos < g.size {
        let n = (g.size - pos).min(MIB) as usize;
        ReadAt::read_exact_at(&reader, pos, &mut a[..n])?;
        FileExt::read_exact_at(&raw, &mut b[..n], pos)?;
        if a[..n] != b[..n] {
            return Err(format!("crate output differs from raw in MiB at {pos:#x}").into());
        }
        pos += n as u64;
    }
    println!(
        "   verified: crate output equals the raw file ({} MiB)",
        g.size / MIB
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Timing

#[derive(Clone, Copy, PartialEq)]
enum Method {
    Crate(usize),
    Raw(usize),
    Qemu,
}

/// A cheap running checksum of what a pass read: two words of every buffer.
fn fold(sum: u64, buf: &[u8]) -> u64 {
    let word = |s: &[u8]| s.try_into().map(u64::from_le_bytes).unwrap_or(0);
    let head = word(&buf[..8.min(buf.len())]);
    let tail = word(&buf[buf.len().saturating_sub(8)..]);
    (sum.rotate_left(7) ^ head).wrapping_add(tail)
}

/// One timed pass; returns the checksum (0 for qemu-img, which reads into a null target).
fn pass(g: &Group, m: Method) -> Res<u64> {
    let mut sum = 0u64;
    match m {
        Method::Crate(bs) => {
            let img = Qcow2::open(File::open(&g.image)?)?;
            let reader = img.reader()?;
            let mut buf = vec![0u8; bs];
            let mut pos = 0;
            while pos < g.size {
                let n = (g.size - pos).min(bs as u64) as usize;
                ReadAt::read_exact_at(&reader, pos, &mut buf[..n])?;
                sum = fold(sum, &buf[..n]);
                pos += n as u64;
            }
        }
        Method::Raw(bs) => {
            let f = File::open(&g.raw)?;
            let mut buf = vec![0u8; bs];
            let mut pos = 0;
            while pos < g.size {
                let n = (g.size - pos).min(bs as u64) as usize;
                FileExt::read_exact_at(&f, &mut buf[..n], pos)?;
                sum = fold(sum, &buf[..n]);
                pos += n as u64;
            }
        }
        Method::Qemu => {
            let status = Command::new("qemu-img")
                .args(["convert", "-n", "-f", "qcow2"])
                .arg(&g.image)
                .arg("--target-image-opts")
                .arg(format!("driver=null-co,size={}", g.size))
                .status()?;
            if !status.success() {
                return Err(format!("qemu-img convert to null-co failed: {status}").into());
            }
        }
    }
    Ok(sum)
}

/// Medians for one buffer size; `qemu` is the same for every row.
struct Row {
    buffer: usize,
    krate: Speeds,
    raw: Speeds,
    qemu: Speeds,
}

/// Median speeds by wall time and by on-CPU time.
#[derive(Clone, Copy)]
struct Speeds {
    wall: Stats,
    cpu: Stats,
}

#[derive(Clone, Copy)]
struct Stats {
    mib_s: f64,
    min: f64,
    max: f64,
}

fn stats(size: u64, times: &[Duration]) -> Stats {
    let mut speeds: Vec<f64> = times
        .iter()
        .map(|t| size as f64 / MIB as f64 / t.as_secs_f64().max(1e-9))
        .collect();
    speeds.sort_by(f64::total_cmp);
    let mid = speeds.len() / 2;
    let median = if speeds.len() % 2 == 1 {
        speeds[mid]
    } else {
        (speeds[mid - 1] + speeds[mid]) / 2.0
    };
    Stats {
        mib_s: median,
        min: speeds[0],
        max: speeds[speeds.len() - 1],
    }
}

/// On-CPU time of this thread (user + system), from `/proc/thread-self/schedstat`.
fn thread_cpu() -> Duration {
    // The kernel brings a running task's total up to date only at ticks and scheduling
    // events; a yield is one, so the figure read next is exact.
    std::thread::yield_now();
    fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// User + system time of this process, every thread (the image's pool threads too, also
/// those that have exited), from `getrusage` (microseconds).
fn process_cpu() -> Duration {
    // SAFETY: `rusage` is plain old data, so all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is to a live local of the right type.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

/// User + system time of waited-for children (all their threads), from `/proc/self/stat`.
/// Its resolution is one clock tick (10 ms).
fn children_cpu() -> Duration {
    let ticks = fs::read_to_string("/proc/self/stat").ok().and_then(|s| {
        let after = s.rsplit_once(')')?.1;
        let f: Vec<&str> = after.split_whitespace().collect();
        // Fields 16 and 17 (cutime, cstime); field 3 is the first after the name.
        Some(f.get(13)?.parse::<u64>().ok()? + f.get(14)?.parse::<u64>().ok()?)
    });
    Duration::from_millis(ticks.unwrap_or(0) * 10)
}

fn measure(g: &Group, runs: usize) -> Res<Vec<Row>> {
    let mut methods = vec![Method::Qemu];
    for bs in BUFFERS {
        methods.push(Method::Crate(bs));
        methods.push(Method::Raw(bs));
    }
    let mut wall = vec![Vec::new(); methods.len()];
    let mut cpu = vec![Vec::new(); methods.len()];
    let mut sums = vec![None; methods.len()];
    print!("   {runs} rounds of {} passes:", methods.len());
    for round in 0..runs {
        // Rotate the order each round so drift in machine load spreads over all methods.
        for k in 0..methods.len() {
            let i = (k + round) % methods.len();
            let clock = || match methods[i] {
                Method::Qemu => children_cpu(),
                // The crate decompresses on its pool's threads as well as this one.
                Method::Crate(_) => process_cpu(),
                Method::Raw(_) => thread_cpu(),
            };
            let cpu0 = clock();
            let start = Instant::now();
            let sum = pass(g, methods[i])?;
            wall[i].push(start.elapsed());
            cpu[i].push(clock().saturating_sub(cpu0));
            match sums[i] {
                Some(s) if s != sum => return Err("checksum changed between rounds".into()),
                _ => sums[i] = Some(sum),
            }
        }
        print!(" {}", round + 1);
        std::io::stdout().flush()?;
    }
    println!();
    let speeds = |i: usize| Speeds {
        wall: stats(g.size, &wall[i]),
        cpu: stats(g.size, &cpu[i]),
    };
    let at = |m: Method| methods.iter().position(|&x| x == m).unwrap_or(0);
    let qemu = speeds(at(Method::Qemu));
    let mut rows = Vec::new();
    for bs in BUFFERS {
        let (c, r) = (at(Method::Crate(bs)), at(Method::Raw(bs)));
        if sums[c] != sums[r] {
            return Err(format!("crate and raw read different data with {bs}-byte buffers").into());
        }
        rows.push(Row {
            buffer: bs,
            krate: speeds(c),
            raw: speeds(r),
            qemu,
        });
    }
    Ok(rows)
}

/// Print the tables; returns crate/raw by wall time for the first (1 MiB) row.
fn print_table(rows: &[Row]) -> f64 {
    let range = |s: &Stats| format!("{:.0}-{:.0}", s.min, s.max);
    let buffer = |r: &Row| {
        if r.buffer >= MIB as usize {
            format!("{} MiB", r.buffer >> 20)
        } else {
            format!("{} KiB", r.buffer >> 10)
        }
    };
    println!("   by wall time (median MiB/s, and the range over rounds):");
    println!(
        "   {:>7} | {:>11} {:>11} | {:>9} {:>11} | {:>9} | {:>10} {:>11} | {:>10}",
        "buffer",
        "crate MiB/s",
        "(min-max)",
        "raw MiB/s",
        "(min-max)",
        "crate/raw",
        "qemu MiB/s",
        "(min-max)",
        "crate/qemu"
    );
    for r in rows {
        let (k, w, q) = (&r.krate.wall, &r.raw.wall, &r.qemu.wall);
        println!(
            "   {:>7} | {:>11.0} {:>11} | {:>9.0} {:>11} | {:>9.3} | {:>10.0} {:>11} | {:>10.3}",
            buffer(r),
            k.mib_s,
            range(k),
            w.mib_s,
            range(w),
            k.mib_s / w.mib_s,
            q.mib_s,
            range(q),
            k.mib_s / q.mib_s,
        );
    }
    println!(
        "   by on-CPU time (bytes per CPU-second, all threads; less sensitive to other load):"
    );
    println!(
        "   {:>7} | {:>11} | {:>9} | {:>9} | {:>10} | {:>10}",
        "buffer", "crate MiB/s", "raw MiB/s", "crate/raw", "qemu MiB/s", "crate/qemu"
    );
    for r in rows {
        let (k, w, q) = (&r.krate.cpu, &r.raw.cpu, &r.qemu.cpu);
        println!(
            "   {:>7} | {:>11.0} | {:>9.0} | {:>9.3} | {:>10.0} | {:>10.3}",
            buffer(r),
            k.mib_s,
            w.mib_s,
            k.mib_s / w.mib_s,
            q.mib_s,
            k.mib_s / q.mib_s,
        );
    }
    rows.first()
        .map_or(0.0, |r| r.krate.wall.mib_s / r.raw.wall.mib_s)
}
