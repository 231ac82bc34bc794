//! Running a workload's contestants: each pass is a child process (this bench re-executed,
//! or an external tool), reaped with `wait4` for its peak RSS and CPU time; passes are
//! interleaved round by round, and the table gives medians and ratios.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::child;
use crate::common::{recache, rewarm, Res, MIB};

/// How one contestant is run.
pub enum Runner {
    /// This bench in a child process: `--child` and these arguments.
    Child(Vec<String>),
    /// An external command, timed from spawn to exit (so with its start-up).
    Command(Vec<String>),
    /// `qemu-img bench`, timed by what it prints ("Run completed in S seconds").
    QemuBench(Vec<String>),
}

pub struct Contestant {
    pub label: String,
    pub runner: Runner,
    /// Units of work one pass does (MiB, reads, walks), for the rate column.
    pub work: f64,
    /// Contestants with the same class read the same bytes and must give the same checksum.
    pub class: Option<&'static str>,
    /// A failure of this one ends the bench (the crate and the raw baselines); a peer that
    /// fails is shown as n/a with its error.
    pub required: bool,
    /// Commands run before every pass, untimed (a fresh image for a write benchmark); each
    /// must succeed.
    pub prepare: Vec<Vec<String>>,
}

impl Contestant {
    /// One of this bench's own child workloads.
    pub fn child(label: &str, work: f64, args: &[&str]) -> Self {
        Contestant {
            label: label.into(),
            runner: Runner::Child(args.iter().map(|s| s.to_string()).collect()),
            work,
            class: None,
            required: label.starts_with("crate") || label.starts_with("raw"),
            prepare: Vec::new(),
        }
    }

    pub fn command(label: &str, work: f64, args: &[&str]) -> Self {
        Contestant {
            label: label.into(),
            runner: Runner::Command(args.iter().map(|s| s.to_string()).collect()),
            work,
            class: None,
            required: false,
            prepare: Vec::new(),
        }
    }

    pub fn qemu_bench(label: &str, work: f64, args: &[&str]) -> Self {
        Contestant {
            runner: Runner::QemuBench(args.iter().map(|s| s.to_string()).collect()),
            ..Self::command(label, work, &[])
        }
    }

    /// Run `commands` before every pass, untimed.
    pub fn prepare(mut self, commands: Vec<Vec<String>>) -> Self {
        self.prepare = commands;
        self
    }

    pub fn class(mut self, class: &'static str) -> Self {
        self.class = Some(class);
        self
    }
}

/// One row of issue 9's table.
pub struct Workload {
    pub title: String,
    /// What one unit of `Contestant::work` is, for the rate column ("MiB", "reads", ...).
    pub unit: &'static str,
    pub contestants: Vec<Contestant>,
    /// Index of the contestant the ratio column divides by.
    pub baseline: usize,
    /// Further ratios to print: (what it is, numerator index, denominator index), of rates.
    pub ratios: Vec<(String, usize, usize)>,
    /// Files to put in the page cache before timing.
    pub inputs: Vec<PathBuf>,
    /// Lines printed under the table (how comparable the peers are).
    pub notes: Vec<String>,
    /// Images the contestants write: checked with `qemu-img` after the last round, their
    /// sizes compared, then removed.
    pub outputs: Vec<Output>,
}

/// The image one contestant writes (each pass anew), and what it must read back as.
pub struct Output {
    /// Index of the contestant that writes it.
    pub contestant: usize,
    pub path: PathBuf,
    /// What its guest must equal (`qemu-img compare`), and that file's format.
    pub source: PathBuf,
    pub source_format: &'static str,
    /// The contestant whose output size this one's is divided by (its qemu-img peer).
    pub size_versus: Option<usize>,
    /// What the output is, for the size ratio's line.
    pub label: String,
}

/// What one pass measured.
#[derive(Clone, Copy)]
struct Pass {
    secs: f64,
    /// From spawn to exit (equal to `secs` but for `qemu-img bench`-style passes, which
    /// report their own time).
    wall_secs: f64,
    cpu_secs: f64,
    peak_rss_kib: u64,
    sum: Option<u64>,
}

/// Every pass of one contestant, or why it could not run.
enum Outcome {
    Passes(Vec<Pass>),
    Failed(String),
}

/// Run every pass of `w` and print its table; returns its ratio lines, for the summary.
pub fn run(w: &Workload, runs: usize) -> Res<Vec<String>> {
    println!();
    println!("== {}", w.title);
    let inputs: Vec<&std::path::Path> = w.inputs.iter().map(PathBuf::as_path).collect();
    recache(&inputs)?;
    let n = w.contestants.len();
    let mut outcomes: Vec<Outcome> = (0..n).map(|_| Outcome::Passes(Vec::new())).collect();
    let mut failed: Vec<(usize, String)> = vec![(0, String::new()); n];
    print!("   {runs} rounds of {n}:");
    for round in 0..runs {
        if round > 0 {
            rewarm(&inputs)?;
        }
        // Rotate the order each round so drift in machine load spreads over all contestants.
        for k in 0..n {
            let i = (k + round) % n;
            let Outcome::Passes(passes) = &mut outcomes[i] else {
                continue;
            };
            let c = &w.contestants[i];
            // A peer that crashes in a pass (qemu-img bench with io_uring does now and then on
            // the 1 TiB image) runs it again, twice at most; the crashes are reported. One
            // that exits with an error (imago on zstd) fails for good.
            let mut attempt = 0;
            loop {
                for argv in &c.prepare {
                    spawn_measured(&mut command(argv))
                        .map_err(|e| format!("{}: preparing ({}): {e}", c.label, argv.join(" ")))?;
                }
                match run_pass(&c.runner) {
                    Ok(p) => passes.push(p),
                    Err(e) if c.required => return Err(format!("{}: {e}", c.label).into()),
                    Err(e) if attempt < 2 && e.to_string().starts_with("signal") => {
                        attempt += 1;
                        failed[i].0 += 1;
                        failed[i].1 = e.to_string();
                        continue;
                    }
                    Err(e) => outcomes[i] = Outcome::Failed(e.to_string()),
                }
                break;
            }
        }
        print!(" {}", round + 1);
        std::io::stdout().flush()?;
    }
    println!();
    check_sums(w, &outcomes)?;
    print_table(w, &outcomes);
    let ratios = ratio_lines(w, &outcomes);
    for line in &ratios {
        println!("   {line}");
    }
    for (c, (count, why)) in w.contestants.iter().zip(&failed) {
        if *count > 0 {
            println!(
                "   note: {}: {count} failed pass(es), run again (last: {why})",
                c.label
            );
        }
    }
    for note in &w.notes {
        println!("   note: {note}");
    }
    let mut ratios = ratios;
    ratios.extend(check_outputs(w, &outcomes)?);
    Ok(ratios)
}

/// After the last round: each output's size on disk, whether `qemu-img compare` finds it equal
/// to its source and `qemu-img check` clean (a crate output that is not ends the bench), and
/// its size over its qemu-img peer's; then the outputs are removed. Returns the size ratios.
fn check_outputs(w: &Workload, outcomes: &[Outcome]) -> Res<Vec<String>> {
    let mut ratios = Vec::new();
    let len = |path: &std::path::Path| std::fs::metadata(path).map(|m| m.len()).ok();
    for o in &w.outputs {
        let c = &w.contestants[o.contestant];
        if !matches!(&outcomes[o.contestant], Outcome::Passes(p) if !p.is_empty()) {
            continue;
        }
        let Some(bytes) = len(&o.path) else {
            return Err(format!("{}: wrote no {}", c.label, o.path.display()).into());
        };
        let compare = qemu_verdict(
            Command::new("qemu-img")
                .args(["compare", "-f", o.source_format, "-F", "qcow2"])
                .arg(&o.source)
                .arg(&o.path),
        );
        let check = qemu_verdict(
            Command::new("qemu-img")
                .args(["check", "-f", "qcow2"])
                .arg(&o.path),
        );
        println!(
            "   output of {}: {:.1} MiB; qemu-img compare with the source: {}; qemu-img check: {}",
            c.label,
            bytes as f64 / MIB as f64,
            compare.as_deref().unwrap_or("identical"),
            check.as_deref().unwrap_or("no errors, no leaks"),
        );
        if c.required && (compare.is_some() || check.is_some()) {
            return Err(format!("{}: its output fails qemu-img's checks", c.label).into());
        }
        if let Some(peer) = o.size_versus {
            let theirs = w.outputs.iter().find(|p| p.contestant == peer);
            if let Some(theirs) = theirs.and_then(|p| len(&p.path)) {
                ratios.push(format!(
                    "size crate / qemu-img, {}: {:.4}",
                    o.label,
                    bytes as f64 / theirs as f64
                ));
            }
        }
    }
    for line in &ratios {
        println!("   {line}");
    }
    for o in &w.outputs {
        let _ = std::fs::remove_file(&o.path);
    }
    Ok(ratios)
}

/// `None` when the `qemu-img` command exits 0, else what went wrong (its exit status and the
/// first line it printed).
fn qemu_verdict(cmd: &mut Command) -> Option<String> {
    match cmd.stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            Some(format!("FAILS ({}: {first})", out.status))
        }
        Err(e) => Some(format!("FAILS (qemu-img: {e})")),
    }
}

/// Peak RSS in MiB of a child of this bench that does no work: what every crate, imago and
/// `pread` figure starts from.
pub fn idle_child_rss_mib() -> Res<f64> {
    let pass = run_pass(&Runner::Child(vec!["noop".into()]))?;
    Ok(pass.peak_rss_kib as f64 / 1024.0)
}

fn run_pass(runner: &Runner) -> Res<Pass> {
    match runner {
        Runner::Child(args) => {
            let exe = std::env::current_exe()?;
            let (out, m) = spawn_measured(Command::new(exe).arg(child::FLAG).args(args))?;
            let field = |name: &str| -> Option<&str> {
                out.split_whitespace().find_map(|kv| kv.strip_prefix(name))
            };
            let sum = field("sum=").and_then(|s| s.parse().ok());
            let secs = field("secs=").and_then(|s| s.parse().ok());
            let (Some(sum), Some(secs)) = (sum, secs) else {
                return Err(format!("child printed {out:?}").into());
            };
            Ok(Pass {
                secs,
                sum: Some(sum),
                ..m
            })
        }
        Runner::Command(argv) => Ok(spawn_measured(&mut command(argv))?.1),
        Runner::QemuBench(argv) => {
            let (out, m) = spawn_measured(&mut command(argv))?;
            let secs = out
                .split("Run completed in ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .ok_or_else(|| format!("qemu-img bench printed {out:?}"))?;
            Ok(Pass { secs, ..m })
        }
    }
}

fn command(argv: &[String]) -> Command {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    cmd
}

/// Run `cmd` to its end; its stdout, and its wall time (from spawn to exit), CPU time and
/// peak RSS from `wait4`. An error, with its stderr, if it fails.
fn spawn_measured(cmd: &mut Command) -> Res<(String, Pass)> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut err_pipe = child.stderr.take().ok_or("no stderr pipe")?;
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let mut out = String::new();
    child
        .stdout
        .take()
        .ok_or("no stdout pipe")?
        .read_to_string(&mut out)?;
    let (status, usage) = wait4(child.id())?;
    let secs = start.elapsed().as_secs_f64();
    let err = err_thread.join().unwrap_or_default();
    if !status.success() {
        let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        return Err(format!("{status}: {first}").into());
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok((
        out,
        Pass {
            secs,
            wall_secs: secs,
            cpu_secs: tv(usage.ru_utime) + tv(usage.ru_stime),
            peak_rss_kib: usage.ru_maxrss.max(0) as u64,
            sum: None,
        },
    ))
}

/// Reap child `pid` with its resource usage (which `std::process::Child::wait` does not give).
fn wait4(pid: u32) -> Res<(std::process::ExitStatus, libc::rusage)> {
    use std::os::unix::process::ExitStatusExt;
    let mut status = 0;
    // SAFETY: `rusage` is plain old data, so all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: both pointers are to live locals of the right types; `pid` is our child,
        // spawned by `std::process::Command` and not reaped yet.
        let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
        if r == pid as libc::pid_t {
            return Ok((std::process::ExitStatus::from_raw(status), usage));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    }
}

/// Contestants of one class must have read the same bytes: a crate contestant that differs
/// from the first of its class is an error, another peer is flagged in its row.
fn check_sums(w: &Workload, outcomes: &[Outcome]) -> Res<()> {
    for (i, c) in w.contestants.iter().enumerate() {
        let (Some(class), Some(sum)) = (c.class, first_sum(&outcomes[i])) else {
            continue;
        };
        let reference = (0..i).find(|&j| w.contestants[j].class == Some(class));
        let Some(r) = reference.and_then(|j| first_sum(&outcomes[j])) else {
            continue;
        };
        let all_same = match &outcomes[i] {
            Outcome::Passes(p) => p.iter().all(|p| p.sum == Some(sum)),
            Outcome::Failed(_) => true,
        };
        if (sum != r || !all_same) && c.label.starts_with("crate") {
            return Err(format!("{}: read other bytes than its peers (checksum)", c.label).into());
        }
    }
    Ok(())
}

fn first_sum(o: &Outcome) -> Option<u64> {
    match o {
        Outcome::Passes(p) => p.first()?.sum,
        Outcome::Failed(_) => None,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// Median rate (units per second) of one contestant.
fn rate(c: &Contestant, o: &Outcome) -> Option<f64> {
    match o {
        Outcome::Passes(p) if !p.is_empty() => {
            Some(c.work / median(p.iter().map(|p| p.secs).collect()).max(1e-9))
        }
        _ => None,
    }
}

fn print_table(w: &Workload, outcomes: &[Outcome]) {
    let base = rate(&w.contestants[w.baseline], &outcomes[w.baseline]);
    let base_label = &w.contestants[w.baseline].label;
    let rate_head = format!("{}/s", w.unit);
    println!(
        "   {:<44} {:>10} {:>17} {:>12} {:>9} {:>9} {:>9}",
        "contestant", "median ms", "(min-max)", rate_head, "CPU ms", "peak RSS", "÷ base"
    );
    let reference_sums: Vec<Option<u64>> = w
        .contestants
        .iter()
        .map(|c| {
            let class = c.class?;
            let j = w.contestants.iter().position(|d| d.class == Some(class))?;
            first_sum(&outcomes[j])
        })
        .collect();
    for (i, (c, o)) in w.contestants.iter().zip(outcomes).enumerate() {
        match o {
            Outcome::Failed(why) => println!("   {:<44} n/a: {why}", c.label),
            Outcome::Passes(p) if p.is_empty() => println!("   {:<44} n/a: no pass", c.label),
            Outcome::Passes(p) => {
                let ms: Vec<f64> = p.iter().map(|p| p.secs * 1e3).collect();
                let (lo, hi) = ms
                    .iter()
                    .fold((f64::MAX, 0f64), |(a, b), &x| (a.min(x), b.max(x)));
                let r = rate(c, o).unwrap_or(0.0);
                let cpu = median(p.iter().map(|p| p.cpu_secs * 1e3).collect());
                let rss = p.iter().map(|p| p.peak_rss_kib).max().unwrap_or(0) as f64 * 1024.0;
                let ratio = base.map_or("-".into(), |b| format!("{:.3}", r / b));
                let flag = match (first_sum(o), reference_sums[i]) {
                    (Some(a), Some(b)) if a != b => "  CHECKSUM DIFFERS",
                    _ => "",
                };
                println!(
                    "   {:<44} {:>10.1} {:>17} {:>12} {:>9.1} {:>8.1}M {:>9}{flag}",
                    c.label,
                    median(ms),
                    format!("({lo:.1}-{hi:.1})"),
                    human(r),
                    cpu,
                    rss / MIB as f64,
                    ratio,
                );
            }
        }
    }
    println!("   ÷ base: rate over the rate of \"{base_label}\"");
}

/// The workload's own ratios of rates (above 1: the first is faster). Between two
/// contestants that report their own time (`qemu-img bench` and `qcow2 bench`), a second
/// line gives the ratio of their times from spawn to exit (open and close included).
fn ratio_lines(w: &Workload, outcomes: &[Outcome]) -> Vec<String> {
    let mut lines = Vec::new();
    for (what, a, b) in &w.ratios {
        let ra = rate(&w.contestants[*a], &outcomes[*a]);
        let rb = rate(&w.contestants[*b], &outcomes[*b]);
        lines.push(match (ra, rb) {
            (Some(x), Some(y)) => format!("{what}: {:.3}", x / y),
            _ => format!("{what}: n/a"),
        });
        let self_timed = |i: usize| matches!(w.contestants[i].runner, Runner::QemuBench(_));
        if self_timed(*a) && self_timed(*b) {
            // Rates are work over time, so these are the inverse of the times' ratios.
            let wall = |o: &Outcome| median_of(o, |p| p.wall_secs);
            if let (Some(x), Some(y)) = (wall(&outcomes[*a]), wall(&outcomes[*b])) {
                lines.push(format!("{what}, spawn to exit: {:.3}", y / x));
            }
            // CPU time (all threads, open and close included): what a loaded machine
            // disturbs least.
            let cpu = |o: &Outcome| median_of(o, |p| p.cpu_secs);
            if let (Some(x), Some(y)) = (cpu(&outcomes[*a]), cpu(&outcomes[*b])) {
                lines.push(format!("{what}, CPU time: {:.3}", y / x));
            }
        }
    }
    lines
}

/// The median of `field` over a contestant's passes.
fn median_of(o: &Outcome, field: impl Fn(&Pass) -> f64) -> Option<f64> {
    match o {
        Outcome::Passes(p) if !p.is_empty() => Some(median(p.iter().map(field).collect())),
        _ => None,
    }
}

/// A rate with 3-4 significant digits.
fn human(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2}M", r / 1e6)
    } else if r >= 1e4 {
        format!("{:.1}k", r / 1e3)
    } else if r >= 100.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.3}")
    }
}
