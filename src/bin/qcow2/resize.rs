//! `qcow2 resize`: change an image's virtual size, as `qemu-img resize` does (its size
//! syntax, `--shrink` guard, messages and exit codes), over [`qcow2::Writer::resize`].

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use qcow2::{Error, OpenOptions, Qcow2};

use crate::common::{self, SizeError};

/// `qcow2 resize [--object ...] [--image-opts] [-f FMT] [--preallocation=off] [-q]
/// [--shrink] FILENAME [+|-]SIZE`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image format: only `qcow2`.
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Preallocation of the new part: only `off` is done (qemu-img also takes `metadata`,
    /// `falloc` and `full` when growing).
    #[arg(long = "preallocation", value_name = "MODE")]
    preallocation: Option<String>,
    /// Quiet: no "Image resized." line.
    #[arg(short = 'q')]
    quiet: bool,
    /// Allow a smaller size: everything past the new end is deleted.
    #[arg(long = "shrink")]
    shrink: bool,
    /// Secrets of encrypted images.
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    /// FILENAME is a list of options, as qemu-img takes them:
    /// `driver=qcow2,file.filename=IMG,encrypt.key-secret=ID`.
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// The image (with `--image-opts`, its options).
    filename: Option<PathBuf>,
    /// The new size, with an optional suffix (k, M, G, T, P, E); `+SIZE` and `-SIZE` grow
    /// or shrink by that much.
    #[arg(allow_hyphen_values = true)]
    size: Option<String>,
}

/// qemu-img's note on the refusal to shrink without `--shrink`.
const SHRINK_WARNING: &str = "warning: Shrinking an image will delete all data beyond the \
     shrunken image's end. Before performing such an operation, make sure there is no \
     important data there.";

/// The preallocation modes qemu-img knows.
const PREALLOCATION_MODES: [&str; 4] = ["off", "metadata", "falloc", "full"];

/// Run `qcow2 resize`.
pub fn run(args: Args) -> ExitCode {
    let prealloc = args.preallocation.as_deref().unwrap_or("off");
    if !PREALLOCATION_MODES.contains(&prealloc) {
        return common::fail(format_args!("Invalid preallocation mode '{prealloc}'"));
    }
    let (Some(filename), Some(size)) = (&args.filename, &args.size) else {
        common::error("Expecting image file name and size");
        let _ = writeln!(
            std::io::stderr().lock(),
            "Try 'qcow2 resize --help' for more info"
        );
        return ExitCode::FAILURE;
    };
    if let Some(format) = args.format.as_deref().filter(|f| *f != "qcow2") {
        return common::fail(format_args!("only -f qcow2 is supported, not '{format}'"));
    }
    let (relative, amount) = match parse_size(size) {
        Ok(parsed) => parsed,
        Err(message) => {
            let _ = writeln!(std::io::stderr().lock(), "qcow2: {message}");
            return ExitCode::FAILURE;
        }
    };
    let (path, options) = match open_options(&args, filename) {
        Ok(opened) => opened,
        Err(message) => return common::fail(message),
    };
    let writer = match Qcow2::open_path_with(&path, &options).and_then(Qcow2::into_writer) {
        Ok(writer) => writer,
        Err(e) => return common::fail(common::could_not_open(&path, common::chain(&e))),
    };
    let current = i64::try_from(writer.guest_size()).unwrap_or(i64::MAX);
    // qemu-img's arithmetic: 64-bit, wrapping, so that "8E" comes out negative.
    let total = match relative {
        0 => amount as i64,
        sign => current.wrapping_add((amount as i64).wrapping_mul(sign)),
    };
    if total <= 0 {
        return common::fail("New image size must be positive");
    }
    if total <= current && prealloc != "off" {
        return common::fail("Preallocation can only be used for growing images");
    }
    if total < current && !args.shrink {
        common::error("Use the --shrink option to perform a shrink operation.");
        common::error(SHRINK_WARNING);
        return ExitCode::FAILURE;
    }
    if prealloc != "off" {
        return common::fail(format_args!(
            "--preallocation={prealloc} is not supported (only off)"
        ));
    }
    let resized = writer.resize(total as u64).and_then(|()| writer.close());
    match resized {
        Ok(_) => {
            if !args.quiet {
                let _ = writeln!(std::io::stdout().lock(), "Image resized.");
            }
            ExitCode::SUCCESS
        }
        Err(Error::InvalidOption { message, .. }) => common::fail(message),
        Err(e) => common::fail(common::chain(&e)),
    }
}

/// The size argument as qemu-img reads it: a leading `+` or `-` makes it relative (the
/// sign, 1 or -1; 0 for an absolute size), the rest is a size with an optional suffix.
fn parse_size(text: &str) -> Result<(i64, u64), String> {
    let (relative, rest) = match text.as_bytes().first() {
        Some(b'+') => (1, text.get(1..).unwrap_or_default()),
        Some(b'-') => (-1, text.get(1..).unwrap_or_default()),
        _ => (0, text),
    };
    match common::strtosz(rest) {
        Ok(bytes) => Ok((relative, bytes)),
        Err(SizeError::Range) => Err(format!(
            "Value '{rest}' is out of range for parameter 'size'"
        )),
        Err(SizeError::Invalid) => Err("Parameter 'size' expects a non-negative number below \
             2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively."
            .to_owned()),
    }
}

/// The image's path and open options (for writing), from the file name or `--image-opts`.
fn open_options(args: &Args, filename: &std::path::Path) -> Result<(PathBuf, OpenOptions), String> {
    let base = OpenOptions::new().write(true);
    if args.image_opts {
        let text = filename
            .to_str()
            .ok_or("--image-opts options must be UTF-8")?;
        args.secret.apply_image_opts(text, base)
    } else {
        Ok((filename.to_path_buf(), args.secret.apply(base)?))
    }
}
