//! `qcow2 bitmap --dump NAME IMG`: the dirty extents of a persistent bitmap, as `qemu-nbd -B
//! NAME` exports them (`qemu-img map` over NBD with `x-dirty-bitmap`).

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::ValueEnum;
use qcow2::{OpenOptions, Qcow2};

use crate::common;

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

/// Print the extents as they are found; one line on stderr and a failure exit on any error
/// (after the extents found before it).
pub fn run(args: Args) -> ExitCode {
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let result = dump(&args, &mut out);
    let flushed = out.flush();
    match (result, flushed) {
        (Ok(()), Ok(())) => ExitCode::SUCCESS,
        (Err(e), _) => match e.downcast_ref::<std::io::Error>() {
            Some(e) => common::output_failed(e),
            None => common::fail(common::chain(&*e)),
        },
        (Ok(()), Err(e)) => common::output_failed(&e),
    }
}

/// Write each extent as the iterator yields it: memory stays bounded however many extents
/// the bitmap has (a 640 KiB image can describe 2^30 of them). The JSON array is written an
/// element at a time; after an error it is left unclosed, as `qemu-img map` leaves its own.
fn dump(args: &Args, out: &mut impl Write) -> Result<(), Box<dyn std::error::Error>> {
    // Bitmaps live in the image file itself: no backing or data file is needed.
    // Opened without blocking and checked on the descriptor: a FIFO is refused at once.
    let could_not_open = |e: qcow2::Error| common::could_not_open(&args.image, common::chain(&e));
    let file = qcow2::open_file(&args.image, &OpenOptions::new().allow_devices(true))
        .map_err(could_not_open)?;
    let image = Qcow2::open(file).map_err(could_not_open)?;
    let unreadable = |e: qcow2::Error| {
        let e = common::chain(&e);
        format!("Could not read bitmap '{}': {e}", args.dump)
    };
    let extents = if args.allow_in_use {
        image.dirty_extents_allow_in_use(&args.dump)
    } else {
        image.dirty_extents(&args.dump)
    }
    .map_err(unreadable)?;
    if let Output::Json = args.output {
        write!(out, "[")?;
    }
    for (i, extent) in extents.enumerate() {
        let e = extent.map_err(unreadable)?;
        match args.output {
            Output::Json => {
                if i > 0 {
                    write!(out, ",")?;
                }
                serde_json::to_writer(&mut *out, &e)?;
            }
            Output::Human => writeln!(out, "{} {}", e.start, e.length)?,
        }
    }
    if let Output::Json = args.output {
        writeln!(out, "]")?;
    }
    Ok(())
}
