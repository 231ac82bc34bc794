//! `qcow2 commit`: merge an overlay into a layer below it, like `qemu-img commit`.
//!
//! Prints "Image committed." (unless `-q`), progress with `-p`; errors as qemu-img's, exit
//! status 1.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use qcow2::{CommitOptions, OpenOptions, Qcow2};

use crate::common::{self, Format};

/// Write the data of IMG into its backing file (or BASE), then empty IMG.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image format (only qcow2 is written).
    #[arg(short = 'f', value_enum)]
    format: Option<Format>,
    /// Cache mode, as qemu-img's (`none`, `writeback`, `writethrough`, `directsync`,
    /// `unsafe`); accepted for compatibility: the crate always writes through the page cache
    /// and flushes at the end.
    #[arg(short = 't', value_name = "CACHE")]
    cache: Option<String>,
    /// Commit into this image of the backing chain (implies -d).
    #[arg(short = 'b', value_name = "BASE")]
    base: Option<PathBuf>,
    /// Leave IMG as it is (do not empty it).
    #[arg(short = 'd')]
    drop: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Print nothing but errors.
    #[arg(short = 'q')]
    quiet: bool,
    /// Accepted for qemu-img compatibility (the copy runs at full speed).
    #[arg(short = 'r', value_name = "RATE_LIMIT")]
    rate_limit: Option<String>,
    /// IMG is an option list (`driver=qcow2,file.filename=IMG,encrypt.key-secret=ID`).
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Secrets of encrypted images.
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    /// The image to commit (with `--image-opts`, its options).
    image: PathBuf,
}

/// Run `qcow2 commit`.
pub fn run(args: Args) -> ExitCode {
    if let Err(message) = check_cache(args.cache.as_deref()) {
        return common::fail(message);
    }
    let (path, open) = match open_options(&args.image, args.image_opts, &args.secret) {
        Ok(pair) => pair,
        Err(message) => return common::fail(message),
    };
    // Opened once first for qemu-img's message when the image (or its chain) does not open
    // (with options of its own: `--image-opts` hands out its secrets in the order of opens).
    let first = open_options(&args.image, args.image_opts, &args.secret).map(|(_, o)| o);
    if let Err(e) =
        first.and_then(|o| Qcow2::open_path_with(&path, &o).map_err(|e| common::chain(&e)))
    {
        return common::fail(common::could_not_open(&path, e));
    }
    let progress = Progress::new(args.progress && !args.quiet);
    let mut options = CommitOptions::new()
        .keep_top(args.drop)
        .open_options(open)
        .progress(progress.callback());
    if let Some(base) = &args.base {
        options = options.base(base);
    }
    let result = qcow2::commit(&path, &options);
    progress.end();
    match result {
        Ok(()) => {
            if !args.quiet {
                let _ = writeln!(std::io::stdout().lock(), "Image committed.");
            }
            ExitCode::SUCCESS
        }
        Err(qcow2::Error::InvalidOption { message, .. }) => common::fail(message),
        Err(e) => common::fail(common::chain(&e)),
    }
}

/// qemu-img's cache modes: anything else is refused as it refuses it.
pub fn check_cache(cache: Option<&str>) -> Result<(), String> {
    match cache {
        None | Some("none" | "off" | "writeback" | "writethrough" | "directsync" | "unsafe") => {
            Ok(())
        }
        Some(other) => Err(format!("Invalid cache option: {other}")),
    }
}

/// The image's path and how to open it: its secrets, from `--object` or `--secret-file`, or
/// named in `--image-opts`.
pub fn open_options(
    image: &std::path::Path,
    image_opts: bool,
    secret: &crate::secret::SecretArgs,
) -> Result<(PathBuf, OpenOptions), String> {
    if image_opts {
        let text = image.to_str().ok_or("--image-opts options must be UTF-8")?;
        secret.apply_image_opts(text, OpenOptions::new())
    } else {
        Ok((image.to_path_buf(), secret.apply(OpenOptions::new())?))
    }
}

/// qemu-img's progress line (`-p`): `    (P/100%)` and a carriage return, printed each time
/// the job advances by a percent, and a newline at the end.
pub struct Progress {
    shown: bool,
    /// The last percentage printed, in hundredths (`u64::MAX`: none yet).
    last: Arc<AtomicU64>,
}

impl Progress {
    /// A progress line, printed only when `shown`.
    pub fn new(shown: bool) -> Progress {
        let progress = Progress {
            shown,
            last: Arc::new(AtomicU64::new(u64::MAX)),
        };
        progress.print(0);
        progress
    }

    /// The callback a job reports `(done, total)` to.
    pub fn callback(&self) -> impl Fn(u64, u64) + Send + Sync + 'static {
        let shown = self.shown;
        let last = Arc::clone(&self.last);
        move |done, total| {
            if !shown {
                return;
            }
            let hundredths = match total {
                0 => 10_000,
                t => (u128::from(done.min(t)) * 10_000 / u128::from(t)) as u64,
            };
            let before = last.load(Ordering::Relaxed);
            let step = before == u64::MAX || hundredths >= before + 100 || hundredths == 10_000;
            if step && before != hundredths {
                last.store(hundredths, Ordering::Relaxed);
                print_line(hundredths);
            }
        }
    }

    fn print(&self, hundredths: u64) {
        if self.shown {
            self.last.store(hundredths, Ordering::Relaxed);
            print_line(hundredths);
        }
    }

    /// The last line: 100%, then the newline.
    pub fn end(&self) {
        if self.shown {
            if self.last.load(Ordering::Relaxed) != 10_000 {
                print_line(10_000);
            }
            let _ = writeln!(std::io::stdout().lock());
        }
    }
}

fn print_line(hundredths: u64) {
    let mut out = std::io::stdout().lock();
    let _ = write!(
        out,
        "    ({}.{:02}/100%)\r",
        hundredths / 100,
        hundredths % 100
    );
    let _ = out.flush();
}
