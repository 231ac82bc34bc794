//! `qcow2 rebase`: change the backing file of an image, like `qemu-img rebase`.
//!
//! Silent on success (progress with `-p`); errors as qemu-img's, exit status 1.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use qcow2::{Qcow2, RawDisk, RebaseOptions};

use crate::commit::{check_cache, open_options, Progress};
use crate::common::{self, Format};

/// Change the backing file of IMG to BACKING (safe: IMG keeps showing the same guest).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image format (only qcow2 is written).
    #[arg(short = 'f', value_enum)]
    format: Option<Format>,
    /// Cache mode of the image, as qemu-img's; accepted for compatibility.
    #[arg(short = 't', value_name = "CACHE")]
    cache: Option<String>,
    /// Cache mode of the backing files, as qemu-img's; accepted for compatibility.
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    src_cache: Option<String>,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Print nothing but errors.
    #[arg(short = 'q')]
    quiet: bool,
    /// Unsafe: only change the header (the backing files are not opened).
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// Write the copied clusters compressed (not supported: refused).
    #[arg(short = 'c')]
    compress: bool,
    /// The new backing file ("" for none).
    #[arg(short = 'b', value_name = "BACKING")]
    backing: Option<String>,
    /// The new backing file's format.
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// IMG is an option list (`driver=qcow2,file.filename=IMG,encrypt.key-secret=ID`).
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Secrets of encrypted images.
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    /// The image (with `--image-opts`, its options).
    image: PathBuf,
}

/// Run `qcow2 rebase`.
pub fn run(args: Args) -> ExitCode {
    if !args.unsafe_mode && args.backing.is_none() {
        common::error("Must specify backing file (-b) or use unsafe mode (-u)");
        common::error("Try 'qcow2 rebase --help' for more info");
        return ExitCode::FAILURE;
    }
    for cache in [&args.cache, &args.src_cache] {
        if let Err(message) = check_cache(cache.as_deref()) {
            return common::fail(message);
        }
    }
    let (path, open) = match open_options(&args.image, args.image_opts, &args.secret) {
        Ok(pair) => pair,
        Err(message) => return common::fail(message),
    };
    if args.compress && !args.unsafe_mode {
        return common::fail("Compressed writes are not supported by this tool's rebase");
    }
    // Opened first for qemu-img's messages when a file does not open.
    // (With options of its own: `--image-opts` hands out its secrets in the order of opens.)
    let first = open_options(&args.image, args.image_opts, &args.secret).map(|(_, o)| o);
    if let Err(e) = first.and_then(|o| {
        Qcow2::open_path_with(&path, &o.backing_as_zeros(args.unsafe_mode))
            .map_err(|e| common::chain(&e))
    }) {
        return common::fail(common::could_not_open(&path, e));
    }
    let backing = args.backing.clone().filter(|b| !b.is_empty());
    if let (Some(name), false) = (&backing, args.unsafe_mode) {
        if let Err(why) = open_new_backing(&path, name, args.backing_format.as_deref(), &open) {
            return common::fail(format_args!(
                "Could not open new backing file '{name}': {why}"
            ));
        }
    }
    let progress = Progress::new(args.progress && !args.quiet);
    let mut options = RebaseOptions::new()
        .backing(backing)
        .unsafe_mode(args.unsafe_mode)
        .open_options(open)
        .progress(progress.callback());
    if let Some(format) = &args.backing_format {
        options = options.backing_format(format);
    }
    let result = qcow2::rebase(&path, &options);
    progress.end();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(qcow2::Error::InvalidOption { message, .. }) => common::fail(format_args!(
            "Could not change the backing file to '{}': {message}",
            args.backing.as_deref().unwrap_or_default()
        )),
        Err(e) => common::fail(common::chain(&e)),
    }
}

/// Open the new backing file as safe mode will (relative to the image's directory), for
/// qemu-img's message when it does not open.
fn open_new_backing(
    image: &Path,
    name: &str,
    format: Option<&str>,
    open: &qcow2::OpenOptions,
) -> Result<(), String> {
    let path = match Path::new(name).is_absolute() {
        true => PathBuf::from(name),
        false => image.parent().unwrap_or(Path::new("")).join(name),
    };
    let opened = match format {
        Some("raw") => RawDisk::open_path(&path).map(drop),
        _ => Qcow2::open_path_with(&path, open).map(drop),
    };
    opened.map_err(|e| common::could_not_open(Path::new(name), common::chain(&e)))
}
