//! `qcow2 bench`: `qemu-img bench` on the crate. COUNT requests of SIZE bytes, the k-th at
//! `(OFFSET + k × STEP) mod guest size`, reads through a reader or writes (`-w`) through a
//! [`qcow2::Writer`], with qemu-img's options, checks, flushes and output lines.
//!
//! As in qemu-img, the clock runs from the first request to the completion of the last one:
//! opening the image before and closing it after (the final flush among it) are not timed.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::Instant;

use positioned_io::ReadAt;
use qcow2::{OpenOptions, Qcow2, Reader, Writer};

use crate::common;

/// qemu-img's bound on counts, depths, sizes and steps (C's `INT_MAX`).
const INT_MAX: u64 = i32::MAX as u64;

/// `qemu-img bench`'s arguments (numbers are kept as text and checked as qemu-img checks them).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image format: only `qcow2`.
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<common::Format>,
    /// IMG is a list of options, as qemu-img takes them:
    /// `driver=qcow2,file.filename=IMG[,encrypt.key-secret=ID]`.
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Cache mode: `writeback` (the default), `unsafe` (flushes do nothing), `writethrough`
    /// and `directsync` (every write flushed), `none` (as writeback: the page cache is used).
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Number of requests (default 75000).
    #[arg(short = 'c', long = "count", allow_hyphen_values = true)]
    count: Option<String>,
    /// Bytes per request (default 4096); suffixes k, M, G as in qemu-img.
    #[arg(short = 's', long = "buffer-size", allow_hyphen_values = true)]
    buffer_size: Option<String>,
    /// Requests in flight (default 64): as many threads as cores, at most this many, share
    /// the image.
    #[arg(short = 'd', long = "depth", allow_hyphen_values = true)]
    depth: Option<String>,
    /// Guest offset of the first request (default 0).
    #[arg(short = 'o', long = "offset", allow_hyphen_values = true)]
    offset: Option<String>,
    /// Distance from one request to the next (default: the buffer size).
    #[arg(short = 'S', long = "step-size", allow_hyphen_values = true)]
    step_size: Option<String>,
    /// QEMU's I/O backend (`threads`, `native`, `io_uring`): checked, then not used.
    #[arg(short = 'i', long = "aio", value_name = "AIO")]
    aio: Option<String>,
    /// QEMU's native AIO (`-i native`).
    #[arg(short = 'n', long = "native")]
    native: bool,
    /// Write instead of read.
    #[arg(short = 'w', long = "write")]
    write: bool,
    /// The byte written (default 0).
    #[arg(long = "pattern", allow_hyphen_values = true)]
    pattern: Option<String>,
    /// Flush after this many requests (write tests; at least the depth).
    #[arg(long = "flush-interval", allow_hyphen_values = true)]
    flush_interval: Option<String>,
    /// Do not wait for the requests in flight before a flush.
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// Accepted for qemu-img's scripts (qemu-img prints its lines anyway).
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Accepted for compatibility (no lock is taken).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Threads that send the requests (default: one per core; at most the depth).
    #[arg(long = "threads", hide = true)]
    threads: Option<usize>,
    /// Secrets of encrypted images.
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    /// The image (with `--image-opts`, its options).
    image: PathBuf,
}

/// What `-t` asks of flushes (QEMU's O_DIRECT of `none` and `directsync` is not copied: the
/// crate always goes through the page cache).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cache {
    /// Flushes are durability barriers.
    WriteBack,
    /// Every write is followed by a flush (`writethrough`, `directsync`).
    WriteThrough,
    /// Flushes do nothing (`unsafe`).
    Unsafe,
}

/// The run qemu-img would make of the arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Plan {
    write: bool,
    count: u64,
    size: u64,
    depth: u64,
    offset: u64,
    step: u64,
    pattern: u8,
    flush_interval: u64,
    drain: bool,
    cache: Cache,
}

impl Plan {
    /// The guest offset of request `k`: qemu-img starts at OFFSET as given (past the end, the
    /// first request fails) and wraps every later one modulo the guest size.
    fn offset_of(&self, k: u64, guest_size: u64) -> u64 {
        if k == 0 {
            return self.offset;
        }
        if guest_size == 0 {
            return 0;
        }
        let far = u128::from(self.offset) + u128::from(k) * u128::from(self.step);
        u64::try_from(far % u128::from(guest_size)).unwrap_or(0)
    }

    /// Whether qemu-img flushes, draining the queue, once `done` requests have completed.
    /// It checks when a request completes: when the requests not yet sent are a multiple of
    /// the interval, it sends no more until the queue is empty, then flushes. The first
    /// check comes after DEPTH requests were sent at once, so earlier multiples are skipped.
    /// The flush after the last request is not timed by qemu-img; the close does it here.
    fn flushes_after(&self, done: u64) -> bool {
        if self.flush_interval == 0 || done == 0 || done >= self.count {
            return false;
        }
        let unsent = self.count - done;
        unsent % self.flush_interval == 0 && unsent <= self.count - self.depth.min(self.count)
    }

    /// `Sending ...` and, with a flush interval, `Sending flush every ...`: qemu-img's lines.
    fn header(&self) -> String {
        let mut text = format!(
            "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})\n",
            self.count,
            if self.write { "write" } else { "read" },
            self.size,
            self.depth,
            self.offset,
            self.step
        );
        if self.flush_interval > 0 {
            text.push_str(&format!(
                "Sending flush every {} requests\n",
                self.flush_interval
            ));
        }
        text
    }
}

/// Run `qcow2 bench`.
pub fn run(args: Args) -> ExitCode {
    let (plan, aio) = match plan(&args) {
        Ok(p) => p,
        Err(e) => return common::fail(e),
    };
    match open_and_run(&args, &plan, aio.as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => common::fail(e),
    }
}

/// Check the options as qemu-img checks them, with its messages.
fn plan(args: &Args) -> Result<(Plan, Option<String>), String> {
    let count = match &args.count {
        Some(t) => strtoul_in("request count", t, 1, INT_MAX)?,
        None => 75_000,
    };
    let depth = match &args.depth {
        Some(t) => strtoul_in("queue depth", t, 1, INT_MAX)?,
        None => 64,
    };
    let offset = match &args.offset {
        Some(t) => common::cvtnum("offset", t)?,
        None => 0,
    };
    let size = match &args.buffer_size {
        Some(t) => cvtnum_in("buffer size", t, 1, INT_MAX)?,
        None => 4096,
    };
    let step = match &args.step_size {
        Some(t) => cvtnum_in("step size", t, 0, INT_MAX)?,
        None => 0,
    };
    let pattern = match &args.pattern {
        Some(t) => u8::try_from(strtoul_in("pattern byte", t, 0, 255)?).unwrap_or(0),
        None => 0,
    };
    let flush_interval = match &args.flush_interval {
        Some(t) => strtoul_in("flush interval", t, 0, INT_MAX)?,
        None => 0,
    };
    let cache = match args.cache.as_deref() {
        None | Some("writeback") | Some("none") => Cache::WriteBack,
        Some("writethrough") | Some("directsync") => Cache::WriteThrough,
        Some("unsafe") => Cache::Unsafe,
        Some(_) => return Err("Invalid cache mode".into()),
    };
    let mut aio = args.aio.clone();
    if let Some(a) = &aio {
        if !matches!(a.as_str(), "threads" | "native" | "io_uring") {
            return Err(format!("Invalid aio option: {a}"));
        }
    }
    if args.native {
        aio = Some("native".into());
    }
    if !args.write && flush_interval > 0 {
        return Err("--flush-interval is only available in write tests".into());
    }
    if flush_interval > 0 && flush_interval < depth {
        return Err("Flush interval can't be smaller than depth".into());
    }
    if args.image_opts && args.format.is_some() {
        return Err("--image-opts and --format are mutually exclusive".into());
    }
    let plan = Plan {
        write: args.write,
        count,
        size,
        depth,
        offset,
        step: if step == 0 { size } else { step },
        pattern,
        flush_interval,
        drain: !args.no_drain,
        cache,
    };
    Ok((plan, aio))
}

/// Open the image (for writing with `-w`), print qemu-img's lines, run and time the requests.
fn open_and_run(args: &Args, plan: &Plan, aio: Option<&str>) -> Result<(), String> {
    let base = OpenOptions::new().allow_devices(true).write(plan.write);
    let (path, options) = if args.image_opts {
        let text = args
            .image
            .to_str()
            .ok_or("--image-opts options must be UTF-8")?;
        args.secret.apply_image_opts(text, base)?
    } else {
        (args.image.clone(), args.secret.apply(base)?)
    };
    let could_not_open = |why: &dyn std::fmt::Display| common::could_not_open(&path, why);
    let direct = args
        .cache
        .as_deref()
        .is_some_and(|c| c == "none" || c == "directsync");
    if aio == Some("native") && !direct {
        return Err(could_not_open(
            &"aio=native was specified, but it requires cache.direct=on, which was not specified.",
        ));
    }
    let image =
        Qcow2::open_path_with(&path, &options).map_err(|e| could_not_open(&common::chain(&e)))?;
    let threads = args
        .threads
        .unwrap_or_else(default_threads)
        .clamp(1, usize::try_from(plan.depth).unwrap_or(1));
    if plan.write {
        let writer = image
            .into_writer()
            .map_err(|e| could_not_open(&common::chain(&e)))?;
        print_header(plan)?;
        // As qemu-img, the line comes before the close; the close (with its flush) runs
        // after a failed request too, so that the image is left consistent.
        let timed = time(plan, threads, &Target::Write(&writer)).and_then(print_completed);
        let closed = writer
            .close()
            .map_err(|e| format!("Failed to close the image: {}", common::chain(&e)));
        timed.and(closed.map(drop))
    } else {
        image
            .reader()
            .map_err(|e| could_not_open(&common::chain(&e)))?;
        print_header(plan)?;
        time(plan, threads, &Target::Read(&image)).and_then(print_completed)
    }
}

/// One thread per core: DEPTH requests in flight as qemu-img keeps them, as far as the cores
/// can copy them (the writer takes its metadata lock only to allocate; readers share nothing).
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn print_header(plan: &Plan) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    out.write_all(plan.header().as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| format!("Could not write the output: {e}"))
}

fn print_completed(secs: f64) -> Result<(), String> {
    writeln!(std::io::stdout(), "Run completed in {secs:.3} seconds.")
        .map_err(|e| format!("Could not write the output: {e}"))
}

/// What the requests go to.
enum Target<'a> {
    /// Writes (and flushes) through the writer.
    Write(&'a Writer<File>),
    /// Reads through a reader of the image (one per thread).
    Read(&'a Qcow2<File>),
}

/// Run every request of `plan` on `threads` threads and return the seconds it took.
fn time(plan: &Plan, threads: usize, target: &Target) -> Result<f64, String> {
    let guest_size = match target {
        Target::Write(w) => w.guest_size(),
        Target::Read(image) => image.guest_size(),
    };
    let run = Run {
        plan,
        guest_size,
        target,
        next: AtomicU64::new(0),
        chunk: ((1 << 20) / plan.size).max(1),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        barrier: Barrier::new(threads),
    };
    let start = Instant::now();
    if threads == 1 {
        run.worker();
    } else {
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| run.worker());
            }
        });
    }
    let secs = start.elapsed().as_secs_f64();
    match run.error.into_inner() {
        Ok(Some(e)) => Err(e),
        Ok(None) => Ok(secs),
        Err(_) => Err("Failed request: a thread panicked".into()),
    }
}

/// The shared state of one run: the next request to send, and the first error.
struct Run<'a> {
    plan: &'a Plan,
    guest_size: u64,
    target: &'a Target<'a>,
    next: AtomicU64,
    /// How many consecutive requests a thread takes at once.
    chunk: u64,
    failed: AtomicBool,
    error: Mutex<Option<String>>,
    /// Where the threads wait for each other before a draining flush.
    barrier: Barrier,
}

impl Run<'_> {
    /// Send requests until none is left. Before a draining flush every thread stops at the
    /// barrier (the queue is empty), one flushes, and all go on after a second barrier.
    fn worker(&self) {
        let plan = self.plan;
        let size = usize::try_from(plan.size).unwrap_or(usize::MAX);
        let mut buf = vec![plan.pattern; size];
        let reader = match self.target {
            Target::Read(image) => match image.reader() {
                Ok(r) => Some(r),
                Err(e) => return self.fail(format!("Failed request: {}", common::chain(&e))),
            },
            Target::Write(_) => None,
        };
        let drain = plan.drain && plan.flush_interval > 0;
        let mut batch_end = self.batch_end(0);
        loop {
            // A run of consecutive requests at a time (about 1 MiB of them): a thread that
            // took every other 4 KiB request would break the sequential reads of its reader.
            let claimed = self
                .next
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |k| {
                    (k < batch_end).then_some(batch_end.min(k.saturating_add(self.chunk)))
                });
            match claimed {
                Ok(first) => {
                    for k in first..batch_end.min(first.saturating_add(self.chunk)) {
                        if self.failed.load(Ordering::Acquire) {
                            break;
                        }
                        let result = match (self.target, &reader) {
                            (Target::Write(w), _) => self.write(w, k, &buf),
                            (Target::Read(_), Some(r)) => self.read(r, k, &mut buf),
                            (Target::Read(_), None) => Ok(()),
                        };
                        if let Err(e) = result {
                            self.fail(format!("Failed request: {e}"));
                        }
                    }
                }
                Err(_) if batch_end >= plan.count => return,
                Err(_) => {
                    // Every request of the batch is sent; with a draining flush, wait for the
                    // others to complete theirs, flush once, then start the next batch.
                    if drain {
                        if self.barrier.wait().is_leader() && !self.failed.load(Ordering::Acquire) {
                            if let Err(e) = self.flush() {
                                self.fail(format!("Failed flush request: {e}"));
                            }
                        }
                        self.barrier.wait();
                    }
                    batch_end = self.batch_end(batch_end);
                }
            }
        }
    }

    /// The end of the batch that starts at request `from`: the next draining flush, or the
    /// last request.
    fn batch_end(&self, from: u64) -> u64 {
        let plan = self.plan;
        if !(plan.drain && plan.flush_interval > 0) {
            return plan.count;
        }
        (from + 1..plan.count)
            .find(|&done| plan.flushes_after(done))
            .unwrap_or(plan.count)
    }

    /// Read request `k` (one that does not fit in the guest fails, as in qemu-img).
    fn read(&self, reader: &Reader<'_, File>, k: u64, buf: &mut [u8]) -> Result<(), String> {
        let pos = self.plan.offset_of(k, self.guest_size);
        let fits = pos
            .checked_add(self.plan.size)
            .is_some_and(|end| end <= self.guest_size);
        if !fits {
            return Err(format!(
                "{} bytes at offset {pos} are past the end of the disk ({} bytes)",
                self.plan.size, self.guest_size
            ));
        }
        reader
            .read_exact_at(pos, buf)
            .map_err(|e| common::chain(&e))
    }

    /// Write request `k`; without draining, the thread that completes a flush point's request
    /// flushes at once, while the others go on.
    fn write(&self, writer: &Writer<File>, k: u64, buf: &[u8]) -> Result<(), String> {
        let plan = self.plan;
        let pos = plan.offset_of(k, self.guest_size);
        writer
            .write_all_at(pos, buf)
            .map_err(|e| common::chain(&e))?;
        let undrained_flush = !plan.drain && plan.flushes_after(k + 1);
        if plan.cache == Cache::WriteThrough || undrained_flush {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), String> {
        match self.target {
            Target::Write(w) if self.plan.cache != Cache::Unsafe => {
                w.flush().map_err(|e| common::chain(&e))
            }
            _ => Ok(()),
        }
    }

    /// Keep the first error; every thread stops sending.
    fn fail(&self, e: String) {
        self.failed.store(true, Ordering::Release);
        if let Ok(mut first) = self.error.lock() {
            first.get_or_insert(e);
        }
    }
}

/// A number as qemu-img's `qemu_strtoul` reads one (C's `strtoul`, base 0: `0x` hexadecimal,
/// a leading `0` octal, else decimal) within `min..=max`, or qemu-img's message for `name`.
fn strtoul_in(name: &str, text: &str, min: u64, max: u64) -> Result<u64, String> {
    let range = || format!("Invalid {name} specified. Must be between {min} and {max}.");
    let invalid = || format!("Invalid {name} specified: '{text}'.");
    let trimmed = text.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let (negative, unsigned) = match trimmed.as_bytes().first() {
        Some(b'-') => (true, trimmed.get(1..).unwrap_or_default()),
        Some(b'+') => (false, trimmed.get(1..).unwrap_or_default()),
        _ => (false, trimmed),
    };
    let (digits, radix) = if let Some(hex) = unsigned
        .strip_prefix("0x")
        .or_else(|| unsigned.strip_prefix("0X"))
    {
        (hex, 16)
    } else if unsigned.len() > 1 && unsigned.starts_with('0') {
        (unsigned.get(1..).unwrap_or_default(), 8)
    } else {
        (unsigned, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(invalid());
    }
    let value = u64::from_str_radix(digits, radix).map_err(|_| range())?;
    if (negative && value != 0) || value < min || value > max {
        return Err(range());
    }
    Ok(value)
}

/// A size as qemu-img's `cvtnum_full` reads one, within `min..=max`, with its messages.
fn cvtnum_in(name: &str, text: &str, min: u64, max: u64) -> Result<u64, String> {
    let range = || format!("Invalid {name} specified. Must be between {min} and {max}.");
    match common::strtosz(text) {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        Err(common::SizeError::Invalid) => Err(format!("Invalid {name} specified: '{text}'.")),
        _ => Err(range()),
    }
}

#[cfg(test)]
mod tests {
    use super::{strtoul_in, Cache, Plan};

    fn plan(count: u64, depth: u64, flush_interval: u64) -> Plan {
        Plan {
            write: true,
            count,
            size: 4096,
            depth,
            offset: 0,
            step: 4096,
            pattern: 0,
            flush_interval,
            drain: true,
            cache: Cache::WriteBack,
        }
    }

    fn flush_points(p: &Plan) -> Vec<u64> {
        (0..=p.count).filter(|&d| p.flushes_after(d)).collect()
    }

    /// Where qemu-img's bench_cb flushes (worked out from its loop): when the requests not
    /// yet sent are a multiple of the interval, counted from the end, and not before the
    /// first DEPTH requests were all sent. Checked against qemu-img 10.0 by counting its
    /// fdatasync calls on a raw image (strace): `-c 10 -d 1 --flush-interval=4` makes 3 (after
    /// 2 and 6 requests, and the untimed one after the last), `-d 4` makes 2, `-c 8 -d 4` 2,
    /// `-c 3 -d 4` 1.
    #[test]
    fn flushes_fall_where_qemu_img_puts_them() {
        assert_eq!(flush_points(&plan(10, 1, 4)), [2, 6]);
        assert_eq!(flush_points(&plan(10, 4, 4)), [6]);
        assert_eq!(flush_points(&plan(8, 4, 4)), [4]);
        assert_eq!(flush_points(&plan(3, 4, 4)), Vec::<u64>::new());
        assert_eq!(flush_points(&plan(64, 16, 16)), [16, 32, 48]);
        assert_eq!(flush_points(&plan(10, 1, 0)), Vec::<u64>::new());
    }

    #[test]
    fn offsets_wrap_after_the_first() {
        let mut p = plan(4, 1, 0);
        p.offset = 100;
        p.step = 60;
        assert_eq!(p.offset_of(0, 128), 100);
        assert_eq!(p.offset_of(1, 128), 32);
        assert_eq!(p.offset_of(2, 128), 92);
        p.offset = 1 << 40;
        assert_eq!(p.offset_of(0, 128), 1 << 40);
        assert_eq!(p.offset_of(1, 0), 0);
    }

    /// qemu-img 10.0's verdicts.
    #[test]
    fn numbers_read_as_qemu_strtoul() {
        let n = |t: &str| strtoul_in("request count", t, 1, i32::MAX as u64);
        assert_eq!(n("010"), Ok(8));
        assert_eq!(n("0x10"), Ok(16));
        assert_eq!(n(" 5"), Ok(5));
        assert_eq!(
            n("1k"),
            Err("Invalid request count specified: '1k'.".into())
        );
        assert_eq!(
            n("-1"),
            Err("Invalid request count specified. Must be between 1 and 2147483647.".into())
        );
        assert_eq!(
            n("3000000000"),
            Err("Invalid request count specified. Must be between 1 and 2147483647.".into())
        );
        assert!(n("").is_err());
        assert!(n("08").is_err());
    }
}
