//! `qcow2 snapshot -l`: list internal snapshots as `qemu-img snapshot -l` does.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::common::{self, Format};

/// List the internal snapshots of an image (this tool only reads: no -a, -c or -d).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// List the snapshots.
    #[arg(short = 'l', required = true)]
    list: bool,
    /// Image format (only qcow2 is read).
    #[arg(short = 'f', value_enum)]
    format: Option<Format>,
    /// Accepted for `qemu-img` compatibility: the image is only read, never locked.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    filename: PathBuf,
}

/// Run `qcow2 snapshot -l`.
pub fn run(args: Args) -> ExitCode {
    match common::image_info(&args.filename) {
        Ok(info) => common::print(&info.snapshot_list(&common::local_utc_offset)),
        Err(code) => code,
    }
}
