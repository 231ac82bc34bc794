//! `qcow2 io`: qemu-io's commands on a qcow2 image, with qemu-io's syntax, output lines and
//! exit status, so a script written for qemu-io runs unchanged.
//!
//! The image is opened once (for writing unless `-r`), every `-c` command runs in turn (or,
//! without `-c`, each line of stdin after a `qemu-io> ` prompt), and the image is closed. A
//! command that fails prints what qemu-io prints and the next one still runs; the exit status
//! is 1 when any failed, as qemu-io's. The lines qemu-io prints through `error_report` (its
//! `qemu-io: ` prefix) start with `qcow2: ` here; the timing line after each request
//! (`4 KiB, 1 ops; 00.00 sec (...)`) has qemu-io's layout with this run's times.

use std::fs::File;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use positioned_io::ReadAt;
use qcow2::{CorruptBitHidden, Error, ImageInfo, OpenOptions, Qcow2, Writer};

use crate::common;

/// Run qemu-io commands on an image, like `qemu-io`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image format (only qcow2).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    /// Secrets of encrypted images, as qemu-io takes them.
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    /// IMG is a list of options:
    /// `driver=qcow2,file.filename=IMG[,encrypt.key-secret=ID]`.
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Open the image read-only: writes fail as qemu-io's do.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Accepted for qemu-io compatibility; it changes nothing here.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The cache mode, as qemu-io takes it: `writeback` (the default), `none` and `unsafe`
    /// make writes durable at `flush`; `writethrough` and `directsync` after every write.
    #[arg(short = 't', long = "cache", value_name = "MODE")]
    cache: Option<String>,
    /// Short for `-t none`.
    #[arg(short = 'n', long = "nocache")]
    nocache: bool,
    /// What discards do: `unmap` (or `on`, the default) frees clusters, `ignore` (or `off`)
    /// does nothing (nor does `write -z -u` free clusters).
    #[arg(short = 'd', long = "discard", value_name = "MODE")]
    discard: Option<String>,
    /// A command to run, with its arguments (`read -P 0xab 0 4k`). Repeatable; without any,
    /// commands are read from stdin.
    #[arg(
        short = 'c',
        long = "cmd",
        value_name = "CMD",
        allow_hyphen_values = true
    )]
    commands: Vec<String>,
    /// The image (with `--image-opts`, its options).
    image: PathBuf,
}

/// qemu-io's `BDRV_REQUEST_MAX_BYTES`: the longest single request.
const MAX_REQUEST: u64 = 2_147_483_136;

/// Run the commands and close the image.
pub fn run(args: Args) -> ExitCode {
    let modes = match Modes::of(&args) {
        Ok(modes) => modes,
        Err(message) => return common::fail(message),
    };
    let disk = match open(&args) {
        Ok(disk) => disk,
        Err(message) => return common::fail(message),
    };
    let mut session = Session {
        disk,
        modes,
        failed: false,
    };
    if args.commands.is_empty() {
        session.run_stdin();
    } else {
        for text in &args.commands {
            if session.execute(text) == Flow::Quit {
                break;
            }
        }
    }
    let failed = session.failed;
    if let Err(e) = session.disk.close() {
        return common::fail(format_args!(
            "Failed to close the image: {}",
            common::chain(&e)
        ));
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// How writes and discards behave (`-t`, `-d`).
struct Modes {
    /// Every write is made durable before it is reported (`writethrough`, `directsync`).
    write_through: bool,
    /// Discards free clusters (`-d unmap`, the default).
    unmap: bool,
}

impl Modes {
    /// The modes qemu-io takes, or its message for one it does not.
    fn of(args: &Args) -> Result<Modes, String> {
        let cache = if args.nocache {
            "none"
        } else {
            args.cache.as_deref().unwrap_or("writeback")
        };
        let write_through = match cache {
            "writeback" | "none" | "unsafe" => false,
            "writethrough" | "directsync" => true,
            other => return Err(format!("Invalid cache option: {other}")),
        };
        let unmap = match args.discard.as_deref().unwrap_or("unmap") {
            "unmap" | "on" => true,
            "ignore" | "off" => false,
            other => return Err(format!("Invalid discard option: {other}")),
        };
        Ok(Modes {
            write_through,
            unmap,
        })
    }
}

/// The image and what `info` needs to describe it again.
struct Disk {
    handle: Handle,
    path: PathBuf,
    options: OpenOptions,
}

/// The image, open for writing or (`-r`) for reading only.
enum Handle {
    Writable(Box<Writer<File>>),
    ReadOnly(Box<Qcow2<File>>),
    /// An image with the corrupt bit, which QEMU opens for reading only.
    Corrupt(Box<Qcow2<CorruptBitHidden<File>>>),
}

/// Open the image as qemu-io does: for writing unless `-r`, with its backing chain.
fn open(args: &Args) -> Result<Disk, String> {
    if let Some(format) = args.format.as_deref().filter(|f| *f != "qcow2") {
        return Err(format!(
            "can't open device {}: unsupported format '{format}' (only qcow2 is written)",
            args.image.display()
        ));
    }
    let (path, options) = path_and_options(args)?;
    // qemu-io names the file it could not open after "can't open device" (and only "can't
    // open" with --image-opts).
    let context = if args.image_opts {
        "can't open".to_owned()
    } else {
        format!("can't open device {}", path.display())
    };
    let fail = |e: &Error| format!("{context}: {}", open_failure(&path, e, args.read_only));
    let opened = if args.read_only {
        Qcow2::open_path_with(&path, &options)
    } else {
        Qcow2::open_path_with(&path, &options.clone().write(true))
    };
    let handle = match opened {
        // QEMU will not open an encrypted image without its secret.
        Ok(image) if image.encryption().is_some() && !image.is_unlocked() => {
            return Err(format!(
                "{context}: Parameter 'encrypt.key-secret' is required for cipher"
            ));
        }
        Ok(image) if args.read_only => Handle::ReadOnly(Box::new(image)),
        Ok(image) => Handle::Writable(Box::new(image.into_writer().map_err(|e| fail(&e))?)),
        Err(Error::Corrupt) if args.read_only => {
            let image = open_corrupt(&path, &options).map_err(|e| fail(&e))?;
            Handle::Corrupt(Box::new(image))
        }
        Err(e) => return Err(fail(&e)),
    };
    Ok(Disk {
        handle,
        path,
        options,
    })
}

/// The image's path and the options to open it with: its secrets, from `--object`, or
/// named in `--image-opts`.
fn path_and_options(args: &Args) -> Result<(PathBuf, OpenOptions), String> {
    if args.image_opts {
        let text = args
            .image
            .to_str()
            .ok_or("can't open: --image-opts options must be UTF-8")?;
        args.secret
            .apply_image_opts(text, OpenOptions::new())
            .map_err(|e| format!("can't open: {e}"))
    } else {
        let options = args.secret.apply(OpenOptions::new());
        let device = |e| format!("can't open device {}: {e}", args.image.display());
        Ok((args.image.clone(), options.map_err(device)?))
    }
}

/// Why the image at `path` did not open, in qemu-io's words where it has its own.
fn open_failure(path: &std::path::Path, e: &Error, read_only: bool) -> String {
    match e {
        Error::Corrupt if !read_only => {
            "qcow2: Image is corrupt; cannot be opened read/write".to_owned()
        }
        Error::WrongSecret { .. } => "Invalid password, cannot unlock any keyslot".to_owned(),
        // qemu-io -f qcow2's words; without -f it would open the file as raw, which this
        // command does not.
        e if e.is_not_qcow2() => "Image is not in qcow2 format".to_owned(),
        // An error of the file itself reads as QEMU's: its strerror alone.
        Error::Io { .. } => {
            common::could_not_open(path, os_error(e).unwrap_or_else(|| common::chain(e)))
        }
        _ => common::could_not_open(path, common::chain(e)),
    }
}

/// An image with the corrupt bit, its metadata read as QEMU reads it (the image's own
/// backing file and data file are not opened).
fn open_corrupt(
    path: &std::path::Path,
    options: &OpenOptions,
) -> qcow2::Result<Qcow2<CorruptBitHidden<File>>> {
    let file = qcow2::open_file(path, options)?;
    Qcow2::open_with(CorruptBitHidden::new(file)?, options)
}

impl Disk {
    /// The guest size in bytes.
    fn size(&self) -> u64 {
        match &self.handle {
            Handle::Writable(w) => w.guest_size(),
            Handle::ReadOnly(image) => image.guest_size(),
            Handle::Corrupt(image) => image.guest_size(),
        }
    }

    fn cluster_size(&self) -> u64 {
        match &self.handle {
            Handle::Writable(w) => w.cluster_size(),
            Handle::ReadOnly(image) => image.cluster_size(),
            Handle::Corrupt(image) => image.cluster_size(),
        }
    }

    fn header(&self) -> qcow2::Header {
        match &self.handle {
            Handle::Writable(w) => w.header(),
            Handle::ReadOnly(image) => image.header().clone(),
            Handle::Corrupt(image) => image.header().clone(),
        }
    }

    fn writer(&self) -> Option<&Writer<File>> {
        match &self.handle {
            Handle::Writable(w) => Some(w),
            Handle::ReadOnly(_) | Handle::Corrupt(_) => None,
        }
    }

    fn read(&self, pos: u64, buf: &mut [u8]) -> qcow2::Result<()> {
        match &self.handle {
            Handle::Writable(w) => Writer::read_exact_at(w, pos, buf),
            Handle::ReadOnly(image) => read_image(image, pos, buf),
            Handle::Corrupt(image) => read_image(image, pos, buf),
        }
    }

    /// Runs of `(allocated in this image itself, length)` covering `start..start + len`,
    /// neighbours of the same kind merged, as qemu-io's `map` and `alloc` see them
    /// (`bdrv_is_allocated`: the top image only).
    fn allocation(&self, start: u64, len: u64) -> qcow2::Result<Vec<(bool, u64)>> {
        let mut runs: Vec<(bool, u64)> = Vec::new();
        let mut push = |allocated: bool, n: u64| match runs.last_mut() {
            Some((a, total)) if *a == allocated => *total += n,
            _ => runs.push((allocated, n)),
        };
        let end = start.saturating_add(len).min(self.size());
        match &self.handle {
            Handle::Writable(w) => {
                let mut pos = start;
                while pos < end {
                    let (allocated, n) = w.is_allocated(pos, end - pos)?;
                    if n == 0 {
                        break;
                    }
                    let n = n.min(end - pos);
                    push(allocated, n);
                    pos += n;
                }
            }
            Handle::ReadOnly(image) => top_allocation(image, start, end, &mut push)?,
            Handle::Corrupt(image) => top_allocation(image, start, end, &mut push)?,
        }
        Ok(runs)
    }

    fn close(self) -> qcow2::Result<()> {
        match self.handle {
            Handle::Writable(w) => w.close().map(drop),
            Handle::ReadOnly(_) | Handle::Corrupt(_) => Ok(()),
        }
    }
}

fn read_image<I: ReadAt + Send + Sync>(
    image: &Qcow2<I>,
    pos: u64,
    buf: &mut [u8],
) -> qcow2::Result<()> {
    image
        .reader()?
        .read_exact_at(pos, buf)
        .map_err(|e| Error::from_io("reading the guest", e))
}

/// Feed `push` whether each stretch of `start..end` is held by the image itself (its map
/// extents at depth 0).
fn top_allocation<I: ReadAt + Send + Sync>(
    image: &Qcow2<I>,
    start: u64,
    end: u64,
    push: &mut impl FnMut(bool, u64),
) -> qcow2::Result<()> {
    let reader = image.reader()?;
    for extent in reader.map(start..end) {
        let extent = extent?;
        push(extent.depth == 0 && extent.present, extent.length);
    }
    Ok(())
}

/// Whether to go on after a command.
#[derive(PartialEq, Eq)]
enum Flow {
    Next,
    Quit,
}

/// A command failed (what it printed says why).
struct Failed;

type Outcome = Result<Flow, Failed>;

/// One qemu-io command: its names, argument counts and usage line (`help` prints it).
struct Command {
    name: &'static str,
    altname: Option<&'static str>,
    argmin: usize,
    /// `None`: no maximum.
    argmax: Option<usize>,
    /// `None` for those qemu-io gives no argument text (its help then has one space less).
    args: Option<&'static str>,
    oneline: &'static str,
    /// Whether it writes (refused on a read-only image before its arguments are read).
    writes: bool,
    run: fn(&mut Session, &str, &[String]) -> Outcome,
}

const COMMANDS: &[Command] = &[
    Command {
        name: "alloc",
        altname: Some("a"),
        argmin: 1,
        argmax: Some(2),
        args: Some("offset [count]"),
        oneline: "checks if offset is allocated in the file",
        writes: false,
        run: Session::alloc,
    },
    Command {
        name: "discard",
        altname: Some("d"),
        argmin: 2,
        argmax: None,
        args: Some("[-Cq] off len"),
        oneline: "discards a number of bytes at a specified offset",
        writes: true,
        run: Session::discard,
    },
    Command {
        name: "flush",
        altname: Some("f"),
        argmin: 0,
        argmax: Some(0),
        args: None,
        oneline: "flush all in-core file state to disk",
        writes: false,
        run: Session::flush,
    },
    Command {
        name: "help",
        altname: Some("?"),
        argmin: 0,
        argmax: Some(1),
        args: Some("[command]"),
        oneline: "help for one or all commands",
        writes: false,
        run: Session::help,
    },
    Command {
        name: "info",
        altname: Some("i"),
        argmin: 0,
        argmax: Some(0),
        args: None,
        oneline: "prints information about the current file",
        writes: false,
        run: Session::info,
    },
    Command {
        name: "length",
        altname: Some("l"),
        argmin: 0,
        argmax: Some(0),
        args: None,
        oneline: "gets the length of the current file",
        writes: false,
        run: Session::length,
    },
    Command {
        name: "map",
        altname: None,
        argmin: 0,
        argmax: Some(0),
        args: Some(""),
        oneline: "prints the allocated areas of a file",
        writes: false,
        run: Session::map,
    },
    Command {
        name: "quit",
        altname: Some("q"),
        argmin: 0,
        argmax: Some(0),
        args: None,
        oneline: "exit the program",
        writes: false,
        run: |_, _, _| Ok(Flow::Quit),
    },
    Command {
        name: "read",
        altname: Some("r"),
        argmin: 2,
        argmax: None,
        args: Some("[-abCqrv] [-P pattern [-s off] [-l len]] off len"),
        oneline: "reads a number of bytes at a specified offset",
        writes: false,
        run: Session::read,
    },
    Command {
        name: "truncate",
        altname: Some("t"),
        argmin: 1,
        argmax: Some(3),
        args: Some("[-m prealloc_mode] off"),
        oneline: "truncates the current file at the given offset",
        writes: true,
        run: Session::truncate,
    },
    Command {
        name: "write",
        altname: Some("w"),
        argmin: 2,
        argmax: None,
        args: Some("[-bcCfnqruz] [-P pattern | -s source_file] off len"),
        oneline: "writes a number of bytes at a specified offset",
        writes: true,
        run: Session::write,
    },
];

/// Print on stdout, as qemu-io's `printf`; a stdout that cannot be written is ignored.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = write!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// Print on stderr without a prefix, as qemu-io's `fprintf(stderr, ...)`.
macro_rules! complain {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

struct Session {
    disk: Disk,
    modes: Modes,
    /// Whether a command failed: the exit status is then 1.
    failed: bool,
}

impl Session {
    /// qemu-io's loop without `-c`: a prompt, then a line of stdin, until the end of input
    /// or `quit`.
    fn run_stdin(&mut self) {
        let stdin = std::io::stdin();
        let interactive = stdin.is_terminal();
        let mut lines = stdin.lock().lines();
        loop {
            say!("qemu-io> ");
            if interactive {
                let _ = std::io::stdout().flush();
            }
            let Some(Ok(line)) = lines.next() else {
                break;
            };
            if self.execute(&line) == Flow::Quit {
                break;
            }
        }
    }

    /// Run one command line: words split at spaces, as qemu-io's `breakline`.
    fn execute(&mut self, text: &str) -> Flow {
        let words: Vec<String> = text
            .split(' ')
            .filter(|w| !w.is_empty())
            .map(str::to_owned)
            .collect();
        let Some((name, args)) = words.split_first() else {
            return Flow::Next;
        };
        match self.command(name, args) {
            Ok(flow) => flow,
            Err(Failed) => {
                self.failed = true;
                Flow::Next
            }
        }
    }

    fn command(&mut self, name: &str, args: &[String]) -> Outcome {
        let Some(command) = find_command(name) else {
            complain!("command \"{name}\" not found");
            return Err(Failed);
        };
        check_argument_count(command, name, args.len())?;
        if command.writes && self.disk.writer().is_none() {
            common::error("Block node is read-only");
            return Err(Failed);
        }
        (command.run)(self, name, args)
    }

    fn read(&mut self, name: &str, args: &[String]) -> Outcome {
        let usage = || usage("read");
        let (flags, operands) = getopt(name, args, "abCl:pP:qrs:v").map_err(|_| usage())?;
        let mut report = Report::default();
        let (mut pattern, mut pattern_offset, mut pattern_count) = (None, None, None);
        let mut dump = false;
        for (flag, value) in flags {
            match (flag, value) {
                ('b', _) => report.vmstate = true,
                ('C', _) => report.machine = true,
                ('l', Some(v)) => pattern_count = Some(size_arg(&v)?),
                ('P', Some(v)) => pattern = Some(pattern_byte(&v)?),
                ('q', _) => report.quiet = true,
                ('s', Some(v)) => pattern_offset = Some(size_arg(&v)?),
                ('v', _) => dump = true,
                _ => {} // -a, -p, -r: buffer handling, nothing to do here
            }
        }
        let [offset, count] = operands.as_slice() else {
            return Err(usage());
        };
        let offset = size_arg(offset)?;
        let count = request_length(count)?;
        if pattern.is_none() && (pattern_offset.is_some() || pattern_count.is_some()) {
            return Err(usage());
        }
        let pattern_offset = pattern_offset.unwrap_or(0);
        let pattern_count = pattern_count.unwrap_or(count.wrapping_sub(pattern_offset));
        if pattern_offset > count || pattern_count > count - pattern_offset {
            say!("pattern verification range exceeds end of read data\n");
            return Err(Failed);
        }
        if report.vmstate {
            say!("read failed: {}\n", NOT_SUPPORTED);
            return Err(Failed);
        }
        let mut buf = vec![0u8; to_usize(count)];
        let started = Instant::now();
        let result = self.checked(offset, count).and_then(|()| {
            self.disk
                .read(offset, &mut buf)
                .map_err(|e| describe_failure(&e))
        });
        let elapsed = started.elapsed();
        if let Err(why) = result {
            say!("read failed: {why}\n");
            return Err(Failed);
        }
        let mut outcome = Ok(Flow::Next);
        if let Some(byte) = pattern {
            let from = to_usize(pattern_offset);
            let checked = buf.get(from..from + to_usize(pattern_count)).unwrap_or(&[]);
            if checked.iter().any(|&b| b != byte) {
                // The range checked, not where it first differs, as qemu-io says it.
                say!(
                    "Pattern verification failed at offset {}, {pattern_count} bytes\n",
                    offset + pattern_offset
                );
                outcome = Err(Failed);
            }
        }
        if !report.quiet {
            if dump {
                say!("{}", dump_buffer(&buf, offset));
            }
            report.print("read", elapsed, offset, count);
        }
        outcome
    }

    fn write(&mut self, name: &str, args: &[String]) -> Outcome {
        let usage = || usage("write");
        let (flags, operands) = getopt(name, args, "bcCfnpP:qrs:uz").map_err(|_| usage())?;
        let mut report = Report::default();
        let (mut compressed, mut fua, mut no_fallback, mut unmap, mut zeroes) =
            (false, false, false, false, false);
        let (mut pattern, mut source, mut registered) = (None, None, false);
        for (flag, value) in flags {
            match (flag, value) {
                ('b', _) => report.vmstate = true,
                ('c', _) => compressed = true,
                ('C', _) => report.machine = true,
                ('f', _) => fua = true,
                ('n', _) => no_fallback = true,
                ('P', Some(v)) => pattern = Some(pattern_byte(&v)?),
                ('q', _) => report.quiet = true,
                ('r', _) => registered = true,
                ('s', Some(v)) => source = Some(v),
                ('u', _) => unmap = true,
                ('z', _) => zeroes = true,
                _ => {} // -p: ignored, as qemu-io ignores it
            }
        }
        let [offset, count] = operands.as_slice() else {
            return Err(usage());
        };
        let refusal = if report.vmstate && zeroes {
            Some("-b and -z cannot be specified at the same time")
        } else if fua && (report.vmstate || compressed) {
            Some("-f and -b or -c cannot be specified at the same time")
        } else if no_fallback && !zeroes {
            Some("-n requires -z to be specified")
        } else if unmap && !zeroes {
            Some("-u requires -z to be specified")
        } else if u8::from(zeroes) + u8::from(pattern.is_some()) + u8::from(source.is_some()) > 1 {
            Some("Only one of -z, -P, and -s can be specified at the same time")
        } else {
            None
        };
        if let Some(refusal) = refusal {
            say!("{refusal}\n");
            return Err(Failed);
        }
        let count_text = count;
        let offset = size_arg(offset)?;
        let count = size_arg(count)?;
        if count > MAX_REQUEST && !no_fallback {
            say!("length cannot exceed {MAX_REQUEST} without -n, given {count_text}\n");
            return Err(Failed);
        }
        if report.vmstate || compressed {
            sector_aligned(offset, count)?;
        }
        if zeroes && registered {
            say!("cannot combine zero write with registered I/O buffer\n");
            return Err(Failed);
        }
        let data = if zeroes {
            Vec::new()
        } else if let Some(file) = source {
            source_buffer(&file, count)?
        } else {
            vec![pattern.unwrap_or(0xcd); to_usize(count)]
        };
        let started = Instant::now();
        let result = self.checked(offset, count).and_then(|()| {
            if report.vmstate || compressed {
                return Err(NOT_SUPPORTED.to_owned());
            }
            let writer = self.disk.writer().ok_or(NOT_PERMITTED.to_owned())?;
            let written = if zeroes {
                writer.write_zeroes(offset, count, unmap && self.modes.unmap)
            } else {
                writer.write_all_at(offset, &data)
            };
            let durable = fua || self.modes.write_through;
            written
                .and_then(|()| if durable { writer.flush() } else { Ok(()) })
                .map_err(|e| describe_failure(&e))
        });
        let elapsed = started.elapsed();
        if let Err(why) = result {
            say!("write failed: {why}\n");
            return Err(Failed);
        }
        if !report.quiet {
            report.print("wrote", elapsed, offset, count);
        }
        Ok(Flow::Next)
    }

    fn discard(&mut self, name: &str, args: &[String]) -> Outcome {
        let usage = || usage("discard");
        let (flags, operands) = getopt(name, args, "Cq").map_err(|_| usage())?;
        let mut report = Report::default();
        for (flag, _) in flags {
            match flag {
                'C' => report.machine = true,
                _ => report.quiet = true,
            }
        }
        let [offset, count] = operands.as_slice() else {
            return Err(usage());
        };
        let offset = size_arg(offset)?;
        let count = request_length(count)?;
        let started = Instant::now();
        let result = self.checked(offset, count).and_then(|()| {
            let writer = self.disk.writer().ok_or(NOT_PERMITTED.to_owned())?;
            if !self.modes.unmap {
                return Ok(()); // -d ignore: discards do nothing, as in QEMU
            }
            writer
                .discard(offset, count)
                .map_err(|e| describe_failure(&e))
        });
        let elapsed = started.elapsed();
        if let Err(why) = result {
            say!("discard failed: {why}\n");
            return Err(Failed);
        }
        if !report.quiet {
            report.print("discard", elapsed, offset, count);
        }
        Ok(Flow::Next)
    }

    fn flush(&mut self, _: &str, _: &[String]) -> Outcome {
        // qemu-io prints nothing, even when the flush fails; its status says it.
        match self.disk.writer().map(Writer::flush) {
            Some(Err(e)) => {
                common::error(format_args!("flush failed: {}", common::chain(&e)));
                Err(Failed)
            }
            _ => Ok(Flow::Next),
        }
    }

    fn truncate(&mut self, name: &str, args: &[String]) -> Outcome {
        let (flags, operands) = getopt(name, args, "m:").map_err(|_| usage("truncate"))?;
        if let Some((_, Some(mode))) = flags.last() {
            if !matches!(mode.as_str(), "off" | "metadata" | "falloc" | "full") {
                common::error(format_args!("Invalid preallocation mode '{mode}'"));
                return Err(Failed);
            }
        }
        let [size] = operands.as_slice() else {
            return Err(usage("truncate"));
        };
        let size = size_arg(size)?;
        if size == self.disk.size() {
            return Ok(Flow::Next);
        }
        let Some(writer) = self.disk.writer() else {
            common::error("Block node is read-only");
            return Err(Failed);
        };
        match writer.resize(size) {
            Ok(()) => Ok(Flow::Next),
            Err(qcow2::Error::InvalidOption { message, .. }) => {
                common::error(message);
                Err(Failed)
            }
            // What the writer refuses to resize (a v2 image over a longer backing file):
            // QEMU's message for a driver that cannot.
            Err(qcow2::Error::UnsupportedWrite { .. }) => {
                common::error("Image format driver does not support resize");
                Err(Failed)
            }
            Err(e) => {
                common::error(format_args!("truncate: {}", common::chain(&e)));
                Err(Failed)
            }
        }
    }

    fn length(&mut self, _: &str, _: &[String]) -> Outcome {
        say!("{}\n", cvtstr(self.disk.size() as f64));
        Ok(Flow::Next)
    }

    fn info(&mut self, _: &str, _: &[String]) -> Outcome {
        let header = self.disk.header();
        say!(
            "format name: qcow2\ncluster size: {}\nvm state offset: {}\n",
            cvtstr(self.disk.cluster_size() as f64),
            cvtstr(vm_state_offset(&header) as f64)
        );
        // The format-specific block of `qemu-img info`, from the image as it now stands.
        if let Ok(info) = ImageInfo::from_path(&self.disk.path, &self.disk.options) {
            say!("{}", format_specific_block(&info));
        }
        Ok(Flow::Next)
    }

    fn map(&mut self, _: &str, _: &[String]) -> Outcome {
        let runs = match self.disk.allocation(0, self.disk.size()) {
            Ok(runs) => runs,
            Err(e) => {
                common::error(format_args!(
                    "Failed to get allocation status: {}",
                    describe_failure(&e)
                ));
                return Err(Failed);
            }
        };
        let mut offset = 0u64;
        let mut text = String::new();
        for (allocated, n) in runs {
            text.push_str(&format!(
                "{} ({n:#x}) bytes {} at offset {} ({offset:#x})\n",
                cvtstr(n as f64),
                if allocated {
                    "    allocated"
                } else {
                    "not allocated"
                },
                cvtstr(offset as f64),
            ));
            offset += n;
        }
        say!("{text}");
        if offset < self.disk.size() {
            common::error("Unexpected end of image");
            return Err(Failed);
        }
        Ok(Flow::Next)
    }

    fn alloc(&mut self, _: &str, args: &[String]) -> Outcome {
        let start = size_arg(&args[0])?;
        let count = match args.get(1) {
            Some(count) => size_arg(count)?,
            None => 512,
        };
        let runs = match self.disk.allocation(start, count) {
            Ok(runs) => runs,
            Err(e) => {
                say!("is_allocated failed: {}\n", describe_failure(&e));
                return Err(Failed);
            }
        };
        let allocated: u64 = runs.iter().filter(|(a, _)| *a).map(|(_, n)| n).sum();
        let seen: u64 = runs.iter().map(|(_, n)| n).sum();
        say!(
            "{allocated}/{seen} bytes allocated at offset {}\n",
            cvtstr(start as f64)
        );
        Ok(Flow::Next)
    }

    fn help(&mut self, _: &str, args: &[String]) -> Outcome {
        match args.first() {
            None => {
                for c in COMMANDS {
                    say!("{}\n", help_line(c.name, c));
                }
                say!("\nUse 'help commandname' for extended help.\n");
            }
            Some(name) => match find_command(name) {
                Some(c) => say!("{}\n", help_line(name, c)),
                None => say!("command {name} not found\n"),
            },
        }
        Ok(Flow::Next)
    }

    /// qemu-io's bounds check of a request (`blk_check_byte_request`): past the end of the
    /// disk is an I/O error.
    fn checked(&self, offset: u64, count: u64) -> Result<(), String> {
        let size = self.disk.size();
        if offset > size || count > size - offset {
            return Err(EIO.to_owned());
        }
        Ok(())
    }
}

const EIO: &str = "Input/output error";
const NOT_SUPPORTED: &str = "Operation not supported";
const NOT_PERMITTED: &str = "Operation not permitted";

fn find_command(name: &str) -> Option<&'static Command> {
    COMMANDS
        .iter()
        .find(|c| c.name == name || c.altname == Some(name))
}

/// qemu-io's check of the number of arguments, its messages on stderr.
fn check_argument_count(command: &Command, name: &str, given: usize) -> Result<(), Failed> {
    let fits = given >= command.argmin && command.argmax.is_none_or(|max| given <= max);
    if fits {
        return Ok(());
    }
    match command.argmax {
        None => complain!(
            "bad argument count {given} to {name}, expected at least {} arguments",
            command.argmin
        ),
        Some(max) if max == command.argmin => {
            complain!("bad argument count {given} to {name}, expected {max} arguments")
        }
        Some(max) => complain!(
            "bad argument count {given} to {name}, expected between {} and {max} arguments",
            command.argmin
        ),
    }
    Err(Failed)
}

/// The usage line of `command` (`read [-abCqrv] ... -- reads a number ...`) on stdout: what
/// qemu-io prints for options or operands it cannot take.
fn usage(command: &str) -> Failed {
    if let Some(c) = find_command(command) {
        say!(
            "{} {} -- {}\n",
            c.name,
            c.args.unwrap_or_default(),
            c.oneline
        );
    }
    Failed
}

/// A line of `help`: the name as typed, the arguments, the summary.
fn help_line(name: &str, c: &Command) -> String {
    let args = c.args.map(|a| format!("{a} ")).unwrap_or_default();
    format!("{name} {args}-- {}", c.oneline)
}

/// An option letter and its value, if it takes one.
type Flag = (char, Option<String>);

/// The options and operands of a command as glibc's `getopt` reads them with `spec` (a
/// letter, `:` after one that takes a value): options may follow operands, `--` ends them.
/// An unknown option or a missing value is reported on stderr as glibc reports it.
fn getopt(name: &str, args: &[String], spec: &str) -> Result<(Vec<Flag>, Vec<String>), Failed> {
    let mut flags = Vec::new();
    let mut operands = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        if arg == "--" {
            operands.extend(rest.cloned());
            break;
        }
        let Some(letters) = arg.strip_prefix('-').filter(|l| !l.is_empty()) else {
            operands.push(arg.clone());
            continue;
        };
        for (i, letter) in letters.char_indices() {
            let takes_value = spec
                .find(letter)
                .filter(|_| letter != ':')
                .map(|at| spec[at + letter.len_utf8()..].starts_with(':'));
            match takes_value {
                None => {
                    complain!("{name}: invalid option -- '{letter}'");
                    return Err(Failed);
                }
                Some(false) => flags.push((letter, None)),
                Some(true) => {
                    let attached = &letters[i + letter.len_utf8()..];
                    let value = if attached.is_empty() {
                        rest.next().cloned()
                    } else {
                        Some(attached.to_owned())
                    };
                    let Some(value) = value else {
                        complain!("{name}: option requires an argument -- '{letter}'");
                        return Err(Failed);
                    };
                    flags.push((letter, Some(value)));
                    break;
                }
            }
        }
    }
    Ok((flags, operands))
}

/// A size as qemu-io's `cvtnum` reads it, or qemu-io's message for one it refuses.
fn size_arg(text: &str) -> Result<u64, Failed> {
    match common::strtosz(text) {
        Ok(v) if i64::try_from(v).is_ok() => Ok(v),
        Err(common::SizeError::Invalid) => {
            say!("Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {text}\n");
            Err(Failed)
        }
        _ => {
            say!("Parsing error: argument too large -- {text}\n");
            Err(Failed)
        }
    }
}

/// The length of a read or discard: a size no longer than one request.
fn request_length(text: &str) -> Result<u64, Failed> {
    let count = size_arg(text)?;
    if count > MAX_REQUEST {
        say!("length cannot exceed {MAX_REQUEST}, given {text}\n");
        return Err(Failed);
    }
    Ok(count)
}

/// qemu-io's check for the requests that work in sectors (`-b`, `-c`).
fn sector_aligned(offset: u64, count: u64) -> Result<(), Failed> {
    if offset % 512 != 0 {
        say!("{offset} is not a sector-aligned value for 'offset'\n");
        return Err(Failed);
    }
    if count % 512 != 0 {
        say!("{count} is not a sector-aligned value for 'count'\n");
        return Err(Failed);
    }
    Ok(())
}

/// A pattern byte as qemu-io reads it (C's `strtol` in base 0: `0xab`, `0253`, `171`), or
/// its message.
fn pattern_byte(text: &str) -> Result<u8, Failed> {
    match parse_c_long(text).and_then(|v| u8::try_from(v).ok()) {
        Some(byte) => Ok(byte),
        None => {
            say!("{text} is not a valid pattern byte\n");
            Err(Failed)
        }
    }
}

/// C's `strtol(text, &end, 0)` when it reads all of `text` (`None` otherwise, or when the
/// value does not fit). An empty text reads as 0, as strtol leaves it whole.
fn parse_c_long(text: &str) -> Option<i64> {
    if text.is_empty() {
        return Some(0);
    }
    let body = text.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let (negative, body) = match body.as_bytes().first() {
        Some(b'-') => (true, &body[1..]),
        Some(b'+') => (false, &body[1..]),
        _ => (false, body),
    };
    let hex = body
        .strip_prefix("0x")
        .or_else(|| body.strip_prefix("0X"))
        .filter(|h| h.starts_with(|c: char| c.is_ascii_hexdigit()));
    let (digits, radix) = match hex {
        Some(h) => (h, 16),
        None if body.starts_with('0') => (body, 8),
        None => (body, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let value = i64::from_str_radix(digits, radix).ok()?;
    Some(if negative { -value } else { value })
}

/// qemu-io's `-s FILE` buffer: the file's first `count` bytes, repeated to `count`. A file
/// that gives no byte (empty, or `count` 0) is refused as qemu-io refuses it.
fn source_buffer(file: &str, count: u64) -> Result<Vec<u8>, Failed> {
    let mut bytes = match std::fs::read(file) {
        Ok(bytes) => bytes,
        Err(e) => {
            let why = e.raw_os_error().map_or_else(|| e.to_string(), strerror);
            complain!("{file}: {why}");
            return Err(Failed);
        }
    };
    bytes.truncate(to_usize(count));
    if bytes.is_empty() {
        complain!("{file}: file is empty");
        return Err(Failed);
    }
    Ok(bytes
        .iter()
        .copied()
        .cycle()
        .take(to_usize(count))
        .collect())
}

/// C's `strerror(code)`.
fn strerror(code: i32) -> String {
    let text = std::io::Error::from_raw_os_error(code).to_string();
    let suffix = format!(" (os error {code})");
    text.strip_suffix(&suffix).unwrap_or(&text).to_owned()
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// What qemu-io prints after "write failed: " for an error of the crate: the text of the
/// errno QEMU would return. Errors other than a request past the end (which qemu-io reports
/// as an I/O error and nothing more) are also described on stderr, in the crate's words.
fn describe_failure(e: &Error) -> String {
    let text = match e {
        Error::WritePastEnd { .. } => return EIO.to_owned(),
        Error::UnsupportedWrite { .. } | Error::UnsupportedFeature { .. } => {
            NOT_SUPPORTED.to_owned()
        }
        Error::ReadOnly => NOT_PERMITTED.to_owned(),
        _ => os_error(e).unwrap_or_else(|| EIO.to_owned()),
    };
    common::error(common::chain(e));
    text
}

/// `strerror` of the OS error under `e`, if there is one.
fn os_error(e: &Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(cause) = source {
        if let Some(code) = cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
        {
            return Some(strerror(code));
        }
        source = cause.source();
    }
    None
}

/// How a request's report is printed.
#[derive(Default)]
struct Report {
    /// `-C`: one line of numbers.
    machine: bool,
    /// `-q`: nothing.
    quiet: bool,
    /// `-b`: the VM state rather than the disk (not supported).
    vmstate: bool,
}

impl Report {
    /// qemu-io's `print_report`: what was done, then the counts and the rate.
    fn print(&self, op: &str, elapsed: Duration, offset: u64, count: u64) {
        let secs = elapsed.as_secs_f64();
        if self.machine {
            say!(
                "{count},1,{},{:.3},{:.3}\n",
                timestr(elapsed, true),
                count as f64 / secs,
                1.0 / secs
            );
        } else {
            say!(
                "{op} {count}/{count} bytes at offset {offset}\n{}, 1 ops; {} ({}/sec and {:.4} ops/sec)\n",
                cvtstr(count as f64),
                timestr(elapsed, false),
                cvtstr(count as f64 / secs),
                1.0 / secs
            );
        }
    }
}

/// qemu-io's `timestr`: `SS.ss sec` under a second, else `H:MM:SS.ss` (always the latter
/// for `-C`).
fn timestr(elapsed: Duration, verbose: bool) -> String {
    let secs = elapsed.as_secs();
    let fraction = f64::from(elapsed.subsec_nanos()) / 1e9;
    if verbose || secs > 0 {
        format!(
            "{}:{:02}:{:05.2}",
            secs / 3600,
            secs % 3600 / 60,
            (secs % 60) as f64 + fraction
        )
    } else {
        format!("{fraction:05.2} sec")
    }
}

/// qemu-io's `cvtstr`: a size with a binary unit, three decimals, `.000` dropped.
fn cvtstr(value: f64) -> String {
    const UNITS: [(u32, &str); 6] = [
        (60, " EiB"),
        (50, " PiB"),
        (40, " TiB"),
        (30, " GiB"),
        (20, " MiB"),
        (10, " KiB"),
    ];
    let (text, suffix) = UNITS
        .iter()
        .find(|(shift, _)| value >= (1u64 << shift) as f64)
        .map(|(shift, suffix)| (format!("{:.3}", value / (1u64 << shift) as f64), *suffix))
        .unwrap_or_else(|| (format!("{value:.6}"), " bytes"));
    match text.find(".000") {
        Some(at) => format!("{}{suffix}", &text[..at]),
        None => format!("{text}{suffix}"),
    }
}

/// qemu-io's `dump_buffer`: 16 bytes a line, offset, hex, and the alphanumeric characters.
fn dump_buffer(buf: &[u8], offset: u64) -> String {
    let mut text = String::new();
    for (i, line) in buf.chunks(16).enumerate() {
        text.push_str(&format!("{:08x}:  ", offset + 16 * i as u64));
        for b in line {
            text.push_str(&format!("{b:02x} "));
        }
        text.push(' ');
        text.extend(line.iter().map(|&b| {
            if b.is_ascii_alphanumeric() {
                char::from(b)
            } else {
                '.'
            }
        }));
        text.push('\n');
    }
    text
}

/// Where QEMU keeps the VM state of a qcow2 image: past the guest, at the first boundary
/// of what one L1 entry maps.
fn vm_state_offset(header: &qcow2::Header) -> u64 {
    let entry_bits = if header.has_extended_l2() { 4 } else { 3 };
    let l2_bits = header.cluster_bits().saturating_sub(entry_bits);
    let per_l1_entry = 1u64 << (header.cluster_bits() + l2_bits).min(63);
    header
        .size()
        .div_ceil(per_l1_entry)
        .saturating_mul(per_l1_entry)
}

/// The "Format specific information:" block of `qemu-img info`'s text, which qemu-io's
/// `info` prints too.
fn format_specific_block(info: &ImageInfo) -> String {
    let text =
        String::from_utf8_lossy(&info.to_human_bytes(&common::local_utc_offset)).into_owned();
    let mut block = String::new();
    let mut inside = false;
    for line in text.lines() {
        if line == "Format specific information:" {
            inside = true;
        } else if inside && !line.starts_with(' ') {
            break;
        }
        if inside {
            block.push_str(line);
            block.push('\n');
        }
    }
    block
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_as_qemu_io_cvtstr() {
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(20.0), "20 bytes");
        assert_eq!(cvtstr(65536.0), "64 KiB");
        assert_eq!(cvtstr(1_114_112.0), "1.062 MiB");
        assert_eq!(cvtstr(65_994_752.0), "62.938 MiB");
        assert_eq!(cvtstr(536_870_912.0), "512 MiB");
        assert_eq!(cvtstr(312.5), "312.500000 bytes");
    }

    #[test]
    fn patterns_read_as_strtol() {
        assert_eq!(parse_c_long("0xab"), Some(0xab));
        assert_eq!(parse_c_long("010"), Some(8));
        assert_eq!(parse_c_long("171"), Some(171));
        assert_eq!(parse_c_long("-1"), Some(-1));
        assert_eq!(parse_c_long(" 5"), Some(5));
        assert_eq!(parse_c_long("ab"), None);
        assert_eq!(parse_c_long("0x"), None);
        assert_eq!(parse_c_long("09"), None);
        assert_eq!(parse_c_long(""), Some(0));
    }

    #[test]
    fn options_parse_as_glibc_getopt() {
        let args: Vec<String> = ["0", "4k", "-P", "0xab", "-qv", "-l1", "--", "-5"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let Ok((flags, operands)) = getopt("read", &args, "l:P:qv") else {
            panic!("refused");
        };
        assert_eq!(
            flags,
            [
                ('P', Some("0xab".to_owned())),
                ('q', None),
                ('v', None),
                ('l', Some("1".to_owned()))
            ]
        );
        assert_eq!(operands, ["0", "4k", "-5"]);
    }

    #[test]
    fn dumps_as_qemu_io() {
        let dump = dump_buffer(&[0xab; 20], 0);
        assert_eq!(
            dump,
            "00000000:  ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab  ................\n\
             00000010:  ab ab ab ab  ....\n"
        );
        assert_eq!(dump_buffer(b"a1 ", 5), "00000005:  61 31 20  a1.\n");
    }
}
