//! `qcow2 info`: `qemu-img info` for qcow2 images.

use std::path::PathBuf;
use std::process::ExitCode;

use qcow2::{ImageInfo, OpenOptions};

use crate::common::{self, Format, Output};

/// Show what an image holds, as `qemu-img info` does (without `disk size`/`actual-size`,
/// which describe the host file system).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    output: Output,
    /// Show every image of the backing chain, top first.
    #[arg(long)]
    backing_chain: bool,
    /// Image format (only qcow2 is read; without it the image must be qcow2 all the same).
    #[arg(short = 'f', value_enum)]
    format: Option<Format>,
    /// Accepted for `qemu-img` compatibility: the image is only read, never locked.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    filename: PathBuf,
}

/// Run `qcow2 info`.
pub fn run(args: Args) -> ExitCode {
    let chain = if args.backing_chain {
        match ImageInfo::chain_from_path(&args.filename, &OpenOptions::default()) {
            Ok(chain) => chain,
            Err(e) => {
                return common::fail(common::could_not_open(&args.filename, common::chain(&e)))
            }
        }
    } else {
        match common::image_info(&args.filename) {
            Ok(info) => vec![info],
            Err(code) => return code,
        }
    };
    let text: Vec<u8> = match (args.output, args.backing_chain) {
        (Output::Json, true) => (ImageInfo::chain_to_json(&chain) + "\n").into_bytes(),
        (Output::Json, false) => chain
            .iter()
            .flat_map(|i| (i.to_json() + "\n").into_bytes())
            .collect(),
        // File names byte for byte, as qemu-img prints them.
        (Output::Human, _) => ImageInfo::chain_to_human_bytes(&chain, &common::local_utc_offset),
    };
    common::print(&text)
}
