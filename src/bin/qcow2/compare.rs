//! `qcow2 compare`: compare two guest disks, qcow2 or raw, like `qemu-img compare`.
//!
//! Exit status as qemu-img's: 0 identical, 1 different, 2 an image could not be opened,
//! 4 an error while comparing.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use qcow2::{CompareOptions, Comparison, GuestDisk};

use crate::common;
use crate::disk::Disk;

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

/// Run `qcow2 compare`.
pub fn run(args: Args) -> ExitCode {
    let opened = Disk::open(&args.image1, args.format1.as_deref(), &args.secret).and_then(|a| {
        Ok((
            a,
            Disk::open(&args.image2, args.format2.as_deref(), &args.secret)?,
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

fn compare(a: &Disk, b: &Disk, args: &Args) -> qcow2::Result<u8> {
    let (reader_a, reader_b);
    let disk_a: &dyn GuestDisk = match a {
        Disk::Image(image) => {
            reader_a = image.reader()?;
            &reader_a
        }
        Disk::Raw(raw) => raw,
    };
    let disk_b: &dyn GuestDisk = match b {
        Disk::Image(image) => {
            reader_b = image.reader()?;
            &reader_b
        }
        Disk::Raw(raw) => raw,
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
