//! What the subcommands share: the `--output` and `-f` options, describing an image named
//! on the command line, printing, and failing with one line on stderr.
//!
//! A subcommand's `run` returns [`fail`]'s `ExitCode` on any error: `qcow2: WHAT: WHY` on
//! stderr, exit status 1. Never a panic, never more than one line.

use std::fmt::Display;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use chrono::{Local, Offset, TimeZone};
use qcow2::{ImageInfo, OpenOptions};

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

/// Print `qcow2: {message}` on stderr, as `qemu-img` prints its errors (`qemu-img: ...`):
/// the one place the command reports an error. One line even if the message carries a
/// newline; a stderr that cannot be written (closed, or a pipe whose reader left) is ignored,
/// never a panic.
pub fn error(message: impl Display) {
    let message = format!("qcow2: {message}").replace('\n', " ");
    let _ = writeln!(std::io::stderr().lock(), "{message}");
}

/// [`error`], then exit status 1.
pub fn fail(message: impl Display) -> ExitCode {
    error(message);
    ExitCode::FAILURE
}

/// An error and its causes on one line, `error: cause: cause`: the library's errors give
/// their cause from `source()` instead of repeating its text.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

/// qemu-img's message for an image that did not open: `Could not open 'PATH': WHY`.
pub fn could_not_open(path: &Path, why: impl Display) -> String {
    format!("Could not open '{}': {why}", path.display())
}

/// Whether writing failed because the reader of the pipe went away (`| head`). The command
/// then stops quietly with exit status 0, as `qemu-img` (which ignores SIGPIPE and the failed
/// writes) ends; Rust ignores SIGPIPE too, so the error arrives here instead of a signal.
pub fn is_broken_pipe(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::BrokenPipe
}

/// The exit status after output failed with `e`: 0 and nothing printed for a reader that
/// left ([`is_broken_pipe`]), else the error and 1.
pub fn output_failed(e: &std::io::Error) -> ExitCode {
    if is_broken_pipe(e) {
        ExitCode::SUCCESS
    } else {
        fail(format_args!("Could not write the output: {e}"))
    }
}

/// What `qemu-img` knows of the qcow2 image at `path`, opened alone (no backing file, no data
/// file), with the crate's default limits. Anything that is not a qcow2 image is refused.
pub fn image_info(path: &Path) -> Result<ImageInfo, ExitCode> {
    ImageInfo::from_path(path, &OpenOptions::default())
        .map_err(|e| fail(could_not_open(path, chain(&e))))
}

/// Write `text` to stdout; a closed pipe ends quietly, a full disk is one line on stderr,
/// never a panic.
pub fn print(text: &[u8]) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(text).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => output_failed(&e),
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

/// Why `qemu_strtosz` refused a size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeError {
    /// Not a size (`-EINVAL`).
    Invalid,
    /// A size, but negative or past 2^64 - 1 (`-ERANGE`).
    Range,
}

/// A size as QEMU's `qemu_strtosz` reads one (QEMU 8.1 and later), in bytes: a decimal
/// number, optionally with a fraction, then an optional suffix `b`, `k`, `M`, `G`, `T`, `P` or
/// `E` (either case, powers of 1024; a fraction needs one other than `b`), rounded to the
/// nearest byte; or a hexadecimal number `0x...` with neither fraction nor suffix. Leading
/// white space and `+` are taken; anything after the suffix is refused.
pub fn strtosz(text: &str) -> Result<u64, SizeError> {
    let s = text.as_bytes();
    let at = |i: usize| s.get(i).copied().unwrap_or(0);
    let digits_from = |i: usize| s.iter().skip(i).take_while(|c| c.is_ascii_digit()).count();
    // C's isspace, then one sign, as strtoull takes them.
    let mut i = s
        .iter()
        .take_while(|&&c| b" \t\n\x0b\x0c\r".contains(&c))
        .count();
    let negative = at(i) == b'-';
    if matches!(at(i), b'+' | b'-') {
        i += 1;
    }
    let digits = digits_from(i);
    // The end of what was read, and the whole and fractional parts (a 0.64 fixed point).
    let (mut end, mut val, mut valf): (usize, u64, u64) = (0, 0, 0);
    // Errors are "invalid" when characters are left after the part read.
    let fail = |end: usize, e: SizeError| {
        if end < s.len() {
            SizeError::Invalid
        } else {
            e
        }
    };
    if digits > 0 {
        end = i + digits;
        let whole = text.get(i..end).and_then(|d| d.parse::<u64>().ok());
        match whole {
            Some(v) if !negative => val = v,
            _ => return Err(fail(end, SizeError::Range)),
        }
    }
    if digits > 0 && val == 0 && matches!(at(end), b'x' | b'X') {
        // Hexadecimal: no fraction, no suffix. Only "0x" starts one: "00x1" and "0x" alone
        // read as zeros followed by an "x".
        let hex_digits = digits_from_hex(s, i + 2);
        if digits != 1 || hex_digits == 0 {
            return Err(SizeError::Invalid);
        }
        end = i + 2 + hex_digits;
        let hex = text.get(i + 2..end).unwrap_or_default();
        val = u64::from_str_radix(hex, 16).map_err(|_| fail(end, SizeError::Range))?;
        if at(end) == b'.' || suffix_shift(at(end)).is_some() {
            return Err(SizeError::Invalid);
        }
    } else if (digits > 0 && at(end) == b'.') || (digits == 0 && s.contains(&b'.')) {
        // A fraction; "1." is 1, and ".5k" (no whole part) is read too, with its sign.
        let dot = if digits > 0 { end } else { i };
        let fraction_digits = digits_from(dot + 1);
        if at(dot) != b'.' || (digits == 0 && fraction_digits == 0) {
            return Err(SizeError::Invalid);
        }
        end = dot + 1 + fraction_digits;
        let fraction = text.get(dot + 1..end).unwrap_or_default();
        let value: f64 = format!("0.{fraction}0").parse().unwrap_or(0.0);
        if value >= 1.0 {
            // Rounded up to 1 (0.99999999999999999999).
            val = val.checked_add(1).ok_or(fail(end, SizeError::Range))?;
        } else {
            // As QEMU: (uint64_t)(fraction * 2^64), never 0 for a fraction that is not.
            valf = (value * 18_446_744_073_709_551_616.0) as u64;
            if valf == 0 && fraction.bytes().any(|c| c != b'0') {
                valf = 1;
            }
        }
        if negative {
            return Err(SizeError::Invalid);
        }
    } else if digits == 0 {
        return Err(SizeError::Invalid);
    }
    let shift = match suffix_shift(at(end)) {
        Some(shift) => {
            end += 1;
            shift
        }
        None => 0,
    };
    if end < s.len() {
        return Err(SizeError::Invalid);
    }
    if shift == 0 {
        // A fraction of a byte.
        return if valf == 0 {
            Ok(val)
        } else {
            Err(SizeError::Invalid)
        };
    }
    // Exactly: (val + valf / 2^64) * 2^shift, rounding a half up.
    let whole = u128::from(val) << shift;
    let part = u128::from(valf) << shift;
    let rounded = whole + (part >> 64) + ((part >> 63) & 1);
    u64::try_from(rounded).map_err(|_| SizeError::Range)
}

/// How many hexadecimal digits start at `s[i..]`.
fn digits_from_hex(s: &[u8], i: usize) -> usize {
    s.iter()
        .skip(i)
        .take_while(|c| c.is_ascii_hexdigit())
        .count()
}

/// The power of two a size suffix stands for (`b` is 2^0).
fn suffix_shift(c: u8) -> Option<u32> {
    Some(match c.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        b'P' => 50,
        b'E' => 60,
        _ => return None,
    })
}

/// A size given for `name` as qemu-img's `cvtnum` takes it: [`strtosz`] up to `i64::MAX`, or
/// qemu-img's message.
pub fn cvtnum(name: &str, text: &str) -> Result<u64, String> {
    match strtosz(text) {
        Ok(v) if i64::try_from(v).is_ok() => Ok(v),
        Err(SizeError::Invalid) => Err(format!("Invalid {name} specified: '{text}'.")),
        Ok(_) | Err(SizeError::Range) => Err(format!(
            "Invalid {name} specified. Must be between 0 and {}.",
            i64::MAX
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::{strtosz, SizeError};

    /// qemu-img 10.0's verdicts (tests/integration/cli_manners.rs checks a longer table against it).
    #[test]
    fn sizes_read_as_qemu_strtosz() {
        let ok = [
            ("0", 0),
            ("4k", 4096),
            ("1.5k", 1536),
            ("1.k", 1024),
            (".5k", 512),
            ("+.5k", 512),
            (" 4k", 4096),
            ("0x1000", 4096),
            ("+0x10", 16),
            ("1.0", 1),
            ("0.0007k", 1),
            ("1.00000000001k", 1024),
            (".9999999999999999999999k", 1024),
            ("0.9999999999999999999999", 1),
            ("0.00000000000000000001k", 0),
            ("1.5e", 1_729_382_256_910_270_464),
            ("8191.99999999999999P", 9_223_372_036_854_775_797),
            ("18446744073709551615", u64::MAX),
        ];
        for (text, bytes) in ok {
            assert_eq!(strtosz(text), Ok(bytes), "{text:?}");
        }
        let invalid = [
            "",
            "x",
            "4k ",
            "4kb",
            "1e3",
            "1.5",
            "1.5b",
            ".5",
            "1..5k",
            "0x",
            "0x1000k",
            "0x1.5",
            "00x10",
            "-4k",
            "-.5k",
            "-0x10",
            "inf",
            "0.00000000000000000001",
            "99999999999999999999k",
        ];
        for text in invalid {
            assert_eq!(strtosz(text), Err(SizeError::Invalid), "{text:?}");
        }
        for text in [
            "-0",
            "-5",
            "16E",
            "0x10000000000000000",
            "99999999999999999999",
        ] {
            assert_eq!(strtosz(text), Err(SizeError::Range), "{text:?}");
        }
    }
}
