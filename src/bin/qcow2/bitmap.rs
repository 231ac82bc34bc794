//! `qcow2 bitmap --dump NAME IMG`: the dirty extents of a persistent bitmap, as `qemu-nbd -B
//! NAME` exports them (`qemu-img map` over NBD with `x-dirty-bitmap`).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::ValueEnum;
use qcow2::{DirtyExtent, OpenOptions, Qcow2};

/// Dump the dirty extents of a persistent dirty bitmap.
#[derive(clap::Args)]
pub struct Args {
    /// The bitmap whose dirty extents to print.
    #[arg(long, value_name = "NAME")]
    dump: String,
    /// `human`: one `start length` line per extent; `json`: a list of `{"start", "length"}`.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    output: Output,
    /// Read a bitmap with the in-use flag (not saved cleanly), which QEMU refuses.
    #[arg(long)]
    allow_in_use: bool,
    /// The qcow2 image.
    image: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Human,
    Json,
}

/// Print the extents; one line on stderr and a failure exit on any error.
pub fn run(args: Args) -> ExitCode {
    match dump(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qcow2 bitmap: {}: {e}", args.image.display());
            ExitCode::FAILURE
        }
    }
}

fn dump(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    // Bitmaps live in the image file itself: no backing or data file is needed.
    // Opened without blocking and checked on the descriptor: a FIFO is refused at once.
    let file = qcow2::open_file(&args.image, &OpenOptions::new().allow_devices(true))?;
    let image = Qcow2::open(file)?;
    let extents = image
        .dirty_extents(&args.dump, args.allow_in_use)?
        .collect::<Result<Vec<DirtyExtent>, _>>()?;
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Json => {
            serde_json::to_writer(&mut out, &extents)?;
            writeln!(out)?;
        }
        Output::Human => {
            for e in &extents {
                writeln!(out, "{} {}", e.start, e.length)?;
            }
        }
    }
    out.flush()?;
    Ok(())
}
