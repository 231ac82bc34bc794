//! Copy the guest contents of an image (or one of its snapshots) to a raw file, like
//! `qemu-img convert -O raw`. Unallocated and zero ranges become holes in the output.
//!
//! ```text
//! cargo run --example to_raw -- fixtures/chain-top.qcow2 /tmp/top.raw
//! cargo run --example to_raw -- --snapshot s1 fixtures/snap.qcow2 /tmp/s1.raw
//! ```

use std::fs::File;
use std::process::ExitCode;

use qcow2::{ConvertOptions, Qcow2};

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let snapshot = match args.iter().position(|a| a == "--snapshot") {
        Some(i) if i + 1 < args.len() => {
            let name = args.remove(i + 1);
            args.remove(i);
            Some(name)
        }
        Some(_) => return usage(),
        None => None,
    };
    let [input, output] = args.as_slice() else {
        return usage();
    };
    match convert(input, output, snapshot.as_deref()) {
        Ok(bytes) => {
            eprintln!("wrote {bytes} bytes to {output}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("to_raw: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: to_raw [--snapshot ID_OR_NAME] IMAGE OUTPUT.raw");
    ExitCode::from(2)
}

fn convert(
    input: &str,
    output: &str,
    snapshot: Option<&str>,
) -> Result<u64, Box<dyn std::error::Error>> {
    let image = Qcow2::open_path(input)?;
    let reader = match snapshot {
        Some(s) => image.snapshot_reader(s)?,
        None => image.reader()?,
    };
    // As qemu-img: the output has the image's size (a snapshot taken before a resize is
    // padded with zeros), holes where 4 KiB runs of zeros are, read on two threads.
    let size = image.guest_size();
    let options = ConvertOptions::new().threads(2).size(size);
    let out = File::create(output)?;
    qcow2::convert_to_file(&reader, &out, &options, |_done, _total| {})?;
    out.sync_all()?;
    Ok(size)
}
