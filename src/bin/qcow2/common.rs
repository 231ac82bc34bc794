//! What the subcommands share: the `--output` and `-f` options, opening an image named on
//! the command line, printing, and failing with one line on stderr.
//!
//! A subcommand's `run` returns [`fail`]'s `ExitCode` on any error: `qcow2: WHAT: WHY` on
//! stderr, exit status 1. Never a panic, never more than one line.

use std::fmt::Display;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use chrono::{Local, Offset, TimeZone};
use qcow2::{ImageInfo, OpenOptions, Qcow2};

/// `--output=human|json`, as `qemu-img` spells it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Text for people, as `qemu-img` prints it.
    #[default]
    Human,
    /// JSON, as `qemu-img --output=json` prints it.
    Json,
}

/// `-f FORMAT`: only qcow2 is read (other formats are refused by clap with the list).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// qcow2 (version 2 or 3).
    Qcow2,
}

/// Print `qcow2: {what}: {why}` on stderr and return a failing exit status.
pub fn fail(what: impl Display, why: impl Display) -> ExitCode {
    // One line even if a message carries a newline.
    let message = format!("qcow2: {what}: {why}").replace('\n', " ");
    let _ = writeln!(std::io::stderr(), "{message}");
    ExitCode::FAILURE
}

/// An error and its causes on one line, `error: cause: cause`: the library's errors do not
/// repeat their cause's text, they give it from `source()`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

/// What `qemu-img` knows of the qcow2 image at `path`, opened alone (no backing file, no data
/// file), with the crate's default limits. Anything that is not a qcow2 image is refused.
pub fn image_info(path: &Path) -> Result<ImageInfo, ExitCode> {
    ImageInfo::from_path(path, &OpenOptions::default()).map_err(|e| fail(path.display(), chain(&e)))
}

/// Open the qcow2 image at `path` with its backing chain and data file, as `qemu-img` opens
/// an image to read guest data, or fail with one line.
// For the subcommands that read guest data (map, compare, convert, check).
#[allow(dead_code)]
pub fn open(path: &Path, options: &OpenOptions) -> Result<Qcow2<std::fs::File>, ExitCode> {
    Qcow2::open_path_with(path, options).map_err(|e| fail(path.display(), chain(&e)))
}

/// Write `text` to stdout; a closed pipe or full disk is one line on stderr, not a panic.
pub fn print(text: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail("writing the output", e),
    }
}

/// The local time zone's offset from UTC, in seconds, at `secs` since the epoch: `qemu-img`
/// prints snapshot dates in local time (`TZ` applies).
pub fn local_utc_offset(secs: i64) -> i64 {
    Local
        .timestamp_opt(secs, 0)
        .single()
        .map_or(0, |t| i64::from(t.offset().fix().local_minus_utc()))
}

/// A size as qemu-img reads one: digits with an optional binary suffix (k, M, G, T, P, E;
/// either case; `b` or none for bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("invalid size '{s}'"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        "e" => 60,
        _ => return Err(format!("invalid size suffix in '{s}'")),
    };
    n.checked_mul(1u64 << shift)
        .filter(|&v| v <= i64::MAX as u64)
        .ok_or_else(|| format!("size '{s}' is too large"))
}
