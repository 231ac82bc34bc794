//! `qcow2 map`: where each stretch of the guest disk is stored, through the backing chain,
//! printed byte for byte as `qemu-img map` prints it.

use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use qcow2::{MapExtent, Qcow2};

use crate::common;

/// `qemu-img map`'s arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output format: `human` (a table of the data extents) or `json` (every extent).
    #[arg(long, value_enum, default_value_t = Output::Human)]
    output: Output,
    /// First guest byte to map, as qemu-img reads sizes: suffixes k, M, G, T, P, E (1.5k),
    /// or hexadecimal (0x10000).
    #[arg(short = 's', long, value_name = "OFFSET", allow_hyphen_values = true)]
    start_offset: Option<String>,
    /// Most bytes to map from the start offset.
    #[arg(short = 'l', long, value_name = "LENGTH", allow_hyphen_values = true)]
    max_length: Option<String>,
    /// Image format: only `qcow2`.
    #[arg(short = 'f', long)]
    format: Option<String>,
    /// Accepted for compatibility (the image is only read).
    #[arg(short = 'U', long)]
    force_share: bool,
    /// Secrets of encrypted images (qemu-img opens them with their key or not at all).
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    /// The image.
    filename: PathBuf,
}

/// Output formats, as `--output` names them.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Human,
    Json,
}

/// Map the image and print it; exit status 1 on any error (one line on stderr).
pub fn run(args: Args) -> ExitCode {
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let result = map(&args, &mut out);
    let flushed = out.flush();
    match (result, flushed) {
        (Ok(()), Ok(())) => ExitCode::SUCCESS,
        (Err(e), _) => match e.downcast_ref::<io::Error>() {
            Some(e) => common::output_failed(e),
            None => common::fail(common::chain(&*e)),
        },
        (Ok(()), Err(e)) => common::output_failed(&e),
    }
}

/// Everything that can stop the map: the image, or the output.
type Failure = Box<dyn std::error::Error>;

fn map(args: &Args, out: &mut impl Write) -> Result<(), Failure> {
    // qemu-img reads its options before it opens the image.
    let start_offset = match &args.start_offset {
        Some(s) => common::cvtnum("start offset", s)?,
        None => 0,
    };
    let max_length = match &args.max_length {
        Some(s) => Some(common::cvtnum("max length", s)?),
        None => None,
    };
    if let Some(format) = args.format.as_deref().filter(|f| *f != "qcow2") {
        return Err(format!("Unsupported image format '{format}': only qcow2 is read").into());
    }
    let options = args.secret.apply(qcow2::OpenOptions::new())?;
    let image = Qcow2::open_path_with(&args.filename, &options)
        .map_err(|e| common::could_not_open(&args.filename, common::chain(&e)))?;
    if image.encryption().is_some() && !image.is_unlocked() {
        return Err(common::could_not_open(
            &args.filename,
            "the image is encrypted; give its secret \
             (--object secret,id=ID,data=... or --secret-file PATH)",
        )
        .into());
    }
    let reader = image.reader()?;
    let end = match max_length {
        Some(max) => start_offset.saturating_add(max),
        None => u64::MAX,
    };
    match args.output {
        Output::Human => writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        )?,
        Output::Json => write!(out, "[")?,
    }
    // The iterator yields an extent once it knows the next one does not continue it, which
    // is when qemu-img prints its own: print each at once. A JSON entry is followed by
    // ",\n" when another came after it (or a failure did: qemu-img had its next status).
    let mut printed = false;
    for extent in reader.map(start_offset..end) {
        let extent = match extent {
            Ok(extent) => extent,
            Err(e) => {
                if printed && args.output == Output::Json {
                    writeln!(out, ",")?;
                }
                return Err(format!("Could not read file metadata: {e}").into());
            }
        };
        if printed && args.output == Output::Json {
            writeln!(out, ",")?;
        }
        dump(args.output, &extent, !printed, out)?;
        printed = true;
    }
    if !printed && args.output == Output::Json {
        // Nothing to map: qemu-img still prints its empty extent at the start offset.
        write!(
            out,
            "{{ \"start\": {}, \"length\": 0, \"depth\": 0, \"present\": false, \"zero\": false, \"data\": false, \"compressed\": false}}",
            start_offset
        )?;
    }
    if args.output == Output::Json {
        writeln!(out, "]")?;
    }
    Ok(())
}

/// Print one extent as qemu-img's `dump_map_entry` does. The human table lists only extents
/// stored as data; there, data that has no plain offset (compressed) is an error.
fn dump(
    output: Output,
    e: &MapExtent<'_>,
    first: bool,
    out: &mut impl Write,
) -> Result<(), Failure> {
    match output {
        Output::Human => {
            // qemu-img reads the flags of every extent but the first after folding "zero or
            // not data" into "zero and not data", so only data extents can fail here.
            let data = e.data && (first || !e.zero);
            if data && e.offset.is_none() {
                return Err("file contains external, encrypted or compressed clusters".into());
            }
            if data && !e.zero {
                write!(
                    out,
                    "{:<16}{:<16}{:<16}",
                    hex(e.start),
                    hex(e.length),
                    hex(e.offset.unwrap_or(0))
                )?;
                // The file name as it is, UTF-8 or not, as qemu-img prints it.
                let file = e.file.map(|f| f.as_os_str().as_encoded_bytes());
                out.write_all(file.unwrap_or_default())?;
                writeln!(out)?;
            }
        }
        Output::Json => {
            write!(
                out,
                "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
            )?;
            if let Some(offset) = e.offset {
                write!(out, ", \"offset\": {offset}")?;
            }
            write!(out, "}}")?;
        }
    }
    Ok(())
}

/// C's `%#x`: `0x` before any number but zero.
fn hex(n: u64) -> String {
    if n == 0 {
        "0".to_owned()
    } else {
        format!("{n:#x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::cvtnum;

    #[test]
    fn sizes_and_hex_as_qemu_img() {
        assert_eq!(cvtnum("x", "4096"), Ok(4096));
        assert_eq!(cvtnum("x", "1k"), Ok(1024));
        assert_eq!(cvtnum("x", "3M"), Ok(3 << 20));
        assert!(cvtnum("x", "x").is_err());
        assert!(cvtnum("x", "9E").is_err());
        assert_eq!(hex(0), "0");
        assert_eq!(hex(65536), "0x10000");
    }
}
