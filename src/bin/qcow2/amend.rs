//! `qcow2 amend`: change an image's options in place, as `qemu-img amend` does (its `-o`
//! options, messages and exit codes), over [`qcow2::amend_image`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use qcow2::{AmendOptions, Error, OpenOptions, Qcow2};

use crate::common;

/// `qcow2 amend [--object ...] [--image-opts] [-f FMT] [-p] [-q] [--force] -o OPTIONS
/// FILENAME`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Options, `key=value,...` as qemu-img takes them (`help` lists them). Repeatable.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Image format: only `qcow2`.
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet: no progress.
    #[arg(short = 'q')]
    quiet: bool,
    /// Accepted as qemu-img takes it (there it allows unsafe LUKS key slot changes: this
    /// command refuses them still).
    #[arg(long = "force")]
    force: bool,
    /// Secrets of encrypted images.
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    /// FILENAME is a list of options, as qemu-img takes them:
    /// `driver=qcow2,file.filename=IMG,encrypt.key-secret=ID`.
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// The image (with `--image-opts`, its options).
    filename: Vec<PathBuf>,
}

/// What `qemu-img amend -o help` lists for qcow2.
const HELP: &str = "Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  encrypt.iter-time=<num> - Time to spend in PBKDF in milliseconds
  encrypt.keyslot=<num>  - Select a single keyslot to modify explicitly
  encrypt.new-secret=<str> - New secret to set in the matching keyslots. Empty string to erase
  encrypt.old-secret=<str> - Select all keyslots that match this password
  encrypt.state=<str>    - Select new state of affected keyslots (active/inactive)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
";

/// Run `qcow2 amend`.
pub fn run(args: Args) -> ExitCode {
    if args.options.is_empty() {
        return usage("Must specify options (-o)");
    }
    let text = args.options.join(",");
    if is_help(&text) {
        let _ = std::io::stdout().lock().write_all(HELP.as_bytes());
        return ExitCode::SUCCESS;
    }
    let [filename] = args.filename.as_slice() else {
        return common::fail("Expecting one image file name");
    };
    if let Some(format) = args.format.as_deref().filter(|f| *f != "qcow2") {
        return common::fail(format_args!("only -f qcow2 is supported, not '{format}'"));
    }
    if text.split(',').all(str::is_empty) {
        return common::fail(format_args!("Invalid option list: {text}"));
    }
    let mut options = match secret_objects(&args, &text) {
        Ok(options) => options,
        Err(message) => return common::fail(message),
    };
    if let Err(e) = options.set_all(&text) {
        return fail_with_lines(&message(&e));
    }
    let (path, open) = match open_options(&args, filename) {
        Ok(opened) => opened,
        Err(message) => return common::fail(message),
    };
    let image = match Qcow2::open_path_with(&path, &open) {
        Ok(image) => image,
        Err(e) => return common::fail(common::could_not_open(&path, common::chain(&e))),
    };
    let progress = args.progress && !args.quiet;
    if progress {
        print_progress("    (0.00/100%)\r");
    }
    let amended = qcow2::amend_image(image, &options);
    if progress {
        print_progress("    (100.00/100%)\r\n");
    }
    match amended {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => fail_with_lines(&message(&e)),
    }
}

/// The options with the secrets `encrypt.old-secret=ID` and `encrypt.new-secret=ID` name,
/// from the `--object secret,...` given (an id given none is refused by the amend, in
/// QEMU's words).
fn secret_objects(args: &Args, text: &str) -> Result<AmendOptions, String> {
    let mut options = AmendOptions::new();
    for item in text.split(',') {
        let id = item
            .strip_prefix("encrypt.old-secret=")
            .or_else(|| item.strip_prefix("encrypt.new-secret="));
        if let Some(id) = id {
            if let Some(bytes) = args.secret.by_id(id)? {
                options = options.secret_object(id, bytes);
            }
        }
    }
    Ok(options)
}

/// qemu-img's usage error: the message, then where to find help.
fn usage(message: &str) -> ExitCode {
    common::error(message);
    let _ = writeln!(
        std::io::stderr().lock(),
        "Try 'qcow2 amend --help' for more info"
    );
    ExitCode::FAILURE
}

/// Whether `-o` asks for the option list (`help` or `?` among the options).
fn is_help(text: &str) -> bool {
    text.split(',').any(|item| item == "help" || item == "?")
}

/// The message qemu-img prints for `e`: QEMU's own text for what it refuses.
fn message(e: &Error) -> String {
    match e {
        Error::InvalidOption { message, .. } => message.clone(),
        e => common::chain(e),
    }
}

/// `qcow2: ` then the message; its further lines (QEMU's hints) as they are.
fn fail_with_lines(message: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr().lock(), "qcow2: {message}");
    ExitCode::FAILURE
}

fn print_progress(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// The image's path and open options (for writing), from the file name or `--image-opts`.
fn open_options(args: &Args, filename: &Path) -> Result<(PathBuf, OpenOptions), String> {
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
