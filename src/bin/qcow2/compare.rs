//! `qcow2 compare`: compare two guest disks, qcow2 or raw, like `qemu-img compare`.
//!
//! Exit status as qemu-img's: 0 identical, 1 different, 2 an image could not be opened,
//! 4 an error while comparing.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use positioned_io::ReadAt;
use qcow2::{CompareOptions, Comparison, GuestDisk, OpenOptions, Qcow2, RawDisk};

use crate::common;

/// Compare the guest disks of IMG1 and IMG2.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Format of IMG1: `qcow2` or `raw` (default: probed).
    #[arg(short = 'f', value_name = "FMT")]
    format1: Option<String>,
    /// Format of IMG2: `qcow2` or `raw` (default: probed).
    #[arg(short = 'F', value_name = "FMT")]
    format2: Option<String>,
    /// Strict: images of different sizes, or allocated differently, differ.
    #[arg(short = 's')]
    strict: bool,
    /// Print nothing but errors.
    #[arg(short = 'q')]
    quiet: bool,
    /// Secrets of encrypted images.
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    /// The first image.
    image1: PathBuf,
    /// The second image.
    image2: PathBuf,
}

/// A disk opened for comparison.
enum Opened {
    Image(Box<Qcow2<File>>),
    /// A raw file: its holes (which the file system reports) read as zeros, as in QEMU's
    /// block status, so a sparse file is compared by its data only.
    Raw(RawDisk<File>),
}

/// Run `qcow2 compare`.
pub fn run(args: Args) -> ExitCode {
    let opened = open(&args.image1, args.format1.as_deref(), &args.secret).and_then(|a| {
        Ok((
            a,
            open(&args.image2, args.format2.as_deref(), &args.secret)?,
        ))
    });
    let (a, b) = match opened {
        Ok(pair) => pair,
        Err(message) => {
            common::error(message);
            return ExitCode::from(2);
        }
    };
    match compare(&a, &b, &args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            common::error(format_args!("Error while comparing: {}", common::chain(&e)));
            ExitCode::from(4)
        }
    }
}

fn compare(a: &Opened, b: &Opened, args: &Args) -> qcow2::Result<u8> {
    let (reader_a, reader_b);
    let disk_a: &dyn GuestDisk = match a {
        Opened::Image(image) => {
            reader_a = image.reader()?;
            &reader_a
        }
        Opened::Raw(raw) => raw,
    };
    let disk_b: &dyn GuestDisk = match b {
        Opened::Image(image) => {
            reader_b = image.reader()?;
            &reader_b
        }
        Opened::Raw(raw) => raw,
    };
    let options = CompareOptions::new().strict(args.strict);
    let result = qcow2::compare(disk_a, disk_b, &options)?;
    let common = disk_a.disk_size().min(disk_b.disk_size());
    let sizes_differ = disk_a.disk_size() != disk_b.disk_size();
    let say = |line: &str| {
        // A line or two, as qemu-img prints them: a reader that left is not an error.
        if !args.quiet {
            let _ = writeln!(std::io::stdout().lock(), "{line}");
        }
    };
    // qemu-img warns of different sizes once the common part matched.
    let warn = match result {
        Comparison::Identical => sizes_differ,
        Comparison::Differ { offset } => sizes_differ && offset >= common,
        _ => false,
    };
    if warn {
        say("Warning: Image size mismatch!");
    }
    Ok(match result {
        Comparison::Identical => {
            say("Images are identical.");
            0
        }
        Comparison::Differ { offset } => {
            say(&format!("Content mismatch at offset {offset}!"));
            1
        }
        Comparison::SizeMismatch { .. } => {
            say("Strict mode: Image size mismatch!");
            1
        }
        Comparison::AllocationMismatch { offset } => {
            say(&format!(
                "Strict mode: Offset {offset} block status mismatch!"
            ));
            1
        }
        _ => 1,
    })
}

/// Open `path` as `format`, or as the format its first bytes say (qcow2's magic, else raw).
fn open(
    path: &Path,
    format: Option<&str>,
    secret: &crate::secret::SecretArgs,
) -> Result<Opened, String> {
    let fail = |e: &dyn std::fmt::Display| common::could_not_open(path, e);
    // Opened once, without blocking, and checked on the descriptor: a FIFO cannot hang the
    // open, and the file probed is the file read.
    let file = qcow2::open_file(path, &OpenOptions::new().allow_devices(true))
        .map_err(|e| fail(&common::chain(&e)))?;
    let format = match format {
        Some(f) => f.to_owned(),
        None => probe(&file)
            .map_err(|e| fail(&common::chain(&e)))?
            .to_owned(),
    };
    match format.as_str() {
        "qcow2" => {
            drop(file);
            Ok(Opened::Image(Box::new(crate::convert::open_image(
                path, secret,
            )?)))
        }
        "raw" => Ok(Opened::Raw(
            RawDisk::from_file(file).map_err(|e| fail(&common::chain(&e)))?,
        )),
        other => Err(fail(&format!(
            "unsupported format '{other}' (qcow2 and raw are read)"
        ))),
    }
}

/// `qcow2` when the file starts with qcow2's magic, else `raw`.
fn probe(file: &File) -> std::io::Result<&'static str> {
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        let n = file.read_at(got as u64, &mut magic[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(if got == 4 && u32::from_be_bytes(magic) == qcow2::MAGIC {
        "qcow2"
    } else {
        "raw"
    })
}
