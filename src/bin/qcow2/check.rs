//! `qcow2 check`: a consistency check, like `qemu-img check`; with `-r leaks|all` it repairs
//! what qemu-img repairs.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::{Parser, ValueEnum};
use qcow2::{
    CheckReport, CorruptBitHidden, Error, FilePolicy, FileRole, OpenOptions, Qcow2, Repair,
    RepairReport,
};

/// qemu-img's status for an image format without checks.
const NOT_SUPPORTED: u8 = 63;

/// Output formats, as `qemu-img --output` spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// The summary qemu-img prints.
    Human,
    /// The JSON of `qemu-img check --output=json`.
    Json,
}

/// What `-r` repairs, as qemu-img spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RepairMode {
    /// Leaked clusters (refcounts higher than the references).
    Leaks,
    /// Every inconsistency qemu-img repairs: leaks, refcounts too low, COPIED flags.
    All,
}

/// Check an image's metadata for consistency (read-only unless `-r`). Exit status as
/// qemu-img: 0 clean, 1 check not completed, 2 corruptions, 3 leaked clusters only, 63 not a
/// qcow2 image; after a repair, the status of the repaired image.
#[derive(Parser, Debug)]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    pub output: Output,
    /// Repair the image: `leaks` or `all` (opens it for writing).
    #[arg(short = 'r', value_enum, value_name = "leaks|all")]
    pub repair: Option<RepairMode>,
    /// Image format (only qcow2 is checked).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Print nothing but errors.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Secrets of encrypted images (as qemu-img takes them; a plain file name cannot name its
    /// secret in qemu-img, so it needs `--image-opts` where the crate also takes a lone one).
    #[command(flatten)]
    pub secret: crate::secret::SecretArgs,
    /// IMAGE is a list of options, as qemu-img takes them:
    /// `driver=qcow2,file.filename=IMG,encrypt.key-secret=ID[,backing.encrypt.key-secret=ID2]`.
    #[arg(long = "image-opts")]
    pub image_opts: bool,
    /// The image (with `--image-opts`, its options).
    pub image: PathBuf,
}

/// Run the check and print what qemu-img prints: one line per problem on stderr, the
/// summary (or JSON) on stdout.
pub fn run(args: Args) -> ExitCode {
    if let Some(format) = args.format.as_deref().filter(|f| *f != "qcow2") {
        return fail(&format!(
            "unsupported image format '{format}' (only qcow2 is checked)"
        ));
    }
    let (path, options) = match open_options(&args) {
        Ok(opened) => opened,
        Err(message) => return fail(&message),
    };
    if let Some(mode) = args.repair {
        let mode = match mode {
            RepairMode::Leaks => Repair::Leaks,
            RepairMode::All => Repair::All,
        };
        return match open_and_repair(&path, &options, mode) {
            Ok(Ok(repair)) => print_repair(&args, repair),
            Ok(Err(e)) => fail(&format!("Check failed: {}", crate::common::chain(&e))),
            Err(failure) => open_failure(&args, failure),
        };
    }
    let mut report = match open_and_check(&path, &options) {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => return fail(&format!("Check failed: {}", crate::common::chain(&e))),
        Err(failure) => return open_failure(&args, failure),
    };
    report.filename = args.image.display().to_string();
    print_problems(&report);
    finish(&args, &report)
}

/// Print the report on stdout (unless quiet) and give qemu-img's status for it.
fn finish(args: &Args, report: &CheckReport) -> ExitCode {
    if !args.quiet {
        let printed = match args.output {
            Output::Human => Ok(report.summary()),
            Output::Json => json(report),
        };
        match printed {
            Ok(text) => print_out(&text),
            Err(e) => return fail(&format!("cannot write the report: {e}")),
        }
    }
    if report.check_errors > 0 {
        crate::common::error("Check failed");
    }
    ExitCode::from(report.exit_status())
}

fn print_out(text: &str) {
    // A reader that left (`| head`) is not an error: qemu-img ignores it too.
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// What `qemu-img check -r` prints: the repairing check's lines on stderr; when anything was
/// repaired, what was and the problems of the check run again; then the result.
fn print_repair(args: &Args, repair: RepairReport) -> ExitCode {
    {
        let mut err = std::io::stderr().lock();
        for step in &repair.steps {
            let _ = writeln!(err, "{step}");
        }
    }
    if !repair.completed {
        return fail("Check failed: Input/output error");
    }
    let mut report = repair.report.clone();
    report.filename = args.image.display().to_string();
    if repair.repaired() {
        if !args.quiet && args.output == Output::Human {
            print_out(&repair.repaired_summary());
        }
        print_problems(&report);
    }
    finish(args, &report)
}

/// Report an image that did not open, as qemu-img does.
fn open_failure(args: &Args, failure: Failure) -> ExitCode {
    match failure {
        // Without -f, qemu-img probes such a file as raw, which has no check: status 63.
        Failure::Open(e) if e.is_not_qcow2() && args.format.is_none() => {
            crate::common::error(format_args!(
                "This image format does not support checks ({})",
                crate::common::chain(&e)
            ));
            ExitCode::from(NOT_SUPPORTED)
        }
        Failure::Open(e) => {
            let e = crate::common::chain(&e);
            fail(&crate::common::could_not_open(&args.image, e))
        }
        Failure::Chain(message) => fail(&crate::common::could_not_open(&args.image, message)),
    }
}

/// The image's path and the options to open it with: its secrets, from `--object` or
/// `--secret-file`, or named in `--image-opts`.
fn open_options(args: &Args) -> Result<(PathBuf, OpenOptions), String> {
    if args.image_opts {
        let text = args
            .image
            .to_str()
            .ok_or("--image-opts options must be UTF-8")?;
        args.secret.apply_image_opts(text, OpenOptions::new())
    } else {
        Ok((args.image.clone(), args.secret.apply(OpenOptions::new())?))
    }
}

/// Why an image could not be checked before its check began.
enum Failure {
    /// The image itself did not open.
    Open(Error),
    /// A file below it did not open, or something it needs is missing: qemu-img's message.
    Chain(String),
}

/// Open the image as `qemu-img check` opens it, with its backing chain and data file (a file
/// missing from the chain fails the check), then check it.
fn open_and_check(
    path: &Path,
    options: &OpenOptions,
) -> Result<qcow2::Result<CheckReport>, Failure> {
    let log = Arc::new(Mutex::new(OpenLog::default()));
    let chain = options.clone().files(logged_opens(&log));
    let opened = match Qcow2::open_path_with(path, &chain) {
        Ok(image) => image,
        // QEMU opens images with the corrupt bit read-only; the library refuses them.
        Err(Error::Corrupt) if log_of(&log).backing_files == 0 => {
            return open_corrupt(path, options)
                .map(|image| image.check())
                .map_err(Failure::Open);
        }
        // A backing image with the corrupt bit, which QEMU opens read-only too.
        Err(Error::Corrupt) => {
            let top = options.clone().backing_as_zeros(true);
            Qcow2::open_path_with(path, &top).map_err(Failure::Open)?
        }
        Err(e) => {
            let log = log_of(&log);
            let top_only = log.backing_files == 0 && log.failed.is_none();
            if top_only && !matches!(e, Error::WrongSecret { .. }) {
                return Err(Failure::Open(e));
            }
            return Err(Failure::Chain(chain_message(&e, &log, path)));
        }
    };
    if let Err(Error::DataFileMissing { .. }) = opened.reader() {
        return Err(Failure::Chain(
            "'data-file' is required for this image".to_owned(),
        ));
    }
    if opened.encryption().is_some() && !opened.is_unlocked() {
        return Err(Failure::Chain(
            "Parameter 'encrypt.key-secret' is required for cipher".to_owned(),
        ));
    }
    Ok(opened.check())
}

/// Open the image for writing, with its backing chain as `qemu-img check -r` opens it, and
/// repair it.
fn open_and_repair(
    path: &Path,
    options: &OpenOptions,
    mode: Repair,
) -> Result<qcow2::Result<RepairReport>, Failure> {
    let log = Arc::new(Mutex::new(OpenLog::default()));
    let chain = options.clone().write(true).files(logged_opens(&log));
    let mut image = match Qcow2::open_path_with(path, &chain) {
        Ok(image) => image,
        Err(Error::Corrupt) if log_of(&log).backing_files == 0 => {
            return Ok(repair_corrupt(path, options, mode));
        }
        Err(e) => {
            let log = log_of(&log);
            let top_only = log.backing_files == 0 && log.failed.is_none();
            if top_only && !matches!(e, Error::WrongSecret { .. }) {
                return Err(Failure::Open(e));
            }
            return Err(Failure::Chain(chain_message(&e, &log, path)));
        }
    };
    if image.encryption().is_some() && !image.is_unlocked() {
        return Err(Failure::Chain(
            "Parameter 'encrypt.key-secret' is required for cipher".to_owned(),
        ));
    }
    Ok(image.repair(mode))
}

/// Repair an image whose corrupt bit is set, as qemu-img does: the bit cleared once the
/// repair leaves no corruption.
fn repair_corrupt(path: &Path, options: &OpenOptions, mode: Repair) -> qcow2::Result<RepairReport> {
    let mut image = Qcow2::open_path_to_repair(path, options)?;
    let repair = image.repair(mode)?;
    if repair.report.corruptions == 0 && repair.report.check_errors == 0 {
        image.get_ref().clear_corrupt_bit()?;
    }
    Ok(repair)
}

/// The files below the image that the open of its chain asked for.
#[derive(Debug, Default, Clone)]
struct OpenLog {
    /// Backing files opened (or tried): the depth in the chain of what comes next.
    backing_files: usize,
    /// The image that named the last backing file opened (or tried).
    named_by: Option<PathBuf>,
    /// The last backing file opened (or tried).
    last_backing: Option<PathBuf>,
    /// The file that failed to open, and qemu-img's words for why (`strerror`).
    failed: Option<(PathBuf, String)>,
}

fn log_of(log: &Mutex<OpenLog>) -> OpenLog {
    log.lock().map(|l| l.clone()).unwrap_or_default()
}

/// A file policy that opens every file as `qemu-img` does (the library's: without blocking
/// on a FIFO, anything but a regular file refused), and records what it opened in `log`.
fn logged_opens(log: &Arc<Mutex<OpenLog>>) -> FilePolicy {
    let log = Arc::clone(log);
    FilePolicy::observed(
        move |path: &Path, role: FileRole, error: Option<&io::Error>| {
            if let Ok(mut log) = log.lock() {
                if role == FileRole::Backing {
                    log.backing_files = log.backing_files.saturating_add(1);
                    log.named_by = log.last_backing.replace(path.to_path_buf());
                }
                if let Some(e) = error {
                    log.failed = Some((path.to_path_buf(), strerror(e)));
                }
            }
        },
    )
}

/// An I/O error as C's `strerror` words it (Rust adds " (os error N)").
fn strerror(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(at) => text.get(..at).unwrap_or(&text).to_owned(),
        None => text,
    }
}

/// QEMU's block drivers (qemu-img 10.0's list): a backing format among them is one QEMU
/// would open, which the crate does not read; any other is "Unknown driver".
const QEMU_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "iser",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "snapshot-access",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// What qemu-img says when a file below the image fails to open: "Could not open backing
/// file: " once per level of the chain, then what failed.
fn chain_message(e: &Error, log: &OpenLog, top: &Path) -> String {
    let prefix = "Could not open backing file: ".repeat(log.backing_files);
    // QEMU looks the backing format up before it opens the file.
    let unknown = log
        .failed
        .as_ref()
        .filter(|(path, _)| log.last_backing.as_ref() == Some(path))
        .and_then(|_| backing_format(log.named_by.as_deref().unwrap_or(top)))
        .filter(|format| !QEMU_DRIVERS.contains(&format.as_str()));
    if let Some(format) = unknown {
        return format!("{prefix}Unknown driver '{format}'");
    }
    let what = match (e, &log.failed) {
        (_, Some((path, why))) => format!("Could not open '{}': {why}", path.display()),
        (Error::NotQcow2 { .. }, None) => "Image is not in qcow2 format".to_owned(),
        (Error::UnsupportedBackingFormat { format, .. }, None) => {
            if QEMU_DRIVERS.contains(&format.as_str()) {
                format!("the qcow2 crate does not read {format} images")
            } else {
                format!("Unknown driver '{format}'")
            }
        }
        (Error::WrongSecret { .. }, None) => {
            "Invalid password, cannot unlock any keyslot".to_owned()
        }
        (e, None) => crate::common::chain(e),
    };
    format!("{prefix}{what}")
}

/// The backing format the image at `path` names in its header, if any.
fn backing_format(path: &Path) -> Option<String> {
    let alone = OpenOptions::new()
        .backing_as_zeros(true)
        .files(FilePolicy::Nothing);
    let image = match Qcow2::open_path_with(path, &alone) {
        Err(Error::Corrupt) => return None,
        opened => opened.ok()?,
    };
    image.header().backing_format().map(str::to_owned)
}

/// Open an image whose corrupt bit is set. QEMU checks such images read-only; the library
/// refuses them on open, so the check reads the file with the bit hidden from the header.
fn open_corrupt(
    path: &Path,
    options: &OpenOptions,
) -> qcow2::Result<Qcow2<CorruptBitHidden<File>>> {
    // The library's open: non-blocking, the descriptor checked with fstat.
    let file = qcow2::open_file(path, &OpenOptions::new().allow_devices(true))?;
    Qcow2::open_with(CorruptBitHidden::new(file)?, options)
}

fn print_problems(report: &CheckReport) {
    let mut err = std::io::stderr().lock();
    for problem in &report.problems {
        let _ = writeln!(err, "{problem}");
    }
    if report.problems_omitted > 0 {
        let _ = writeln!(err, "... and {} more problems", report.problems_omitted);
    }
}

/// The report as `qemu-img check --output=json` prints it (4-space indents).
fn json(report: &CheckReport) -> serde_json::Result<String> {
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
    serde::Serialize::serialize(report, &mut ser)?;
    out.push(b'\n');
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn fail(message: &str) -> ExitCode {
    crate::common::fail(message)
}
