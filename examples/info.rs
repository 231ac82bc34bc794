//! Print what the crate knows about an image, like `qemu-img info`.
//!
//! ```text
//! cargo run --example info -- fixtures/snap.qcow2
//! cargo run --example info -- --json fixtures/chain-top.qcow2
//! ```
//! Backing files and data files named by the image are opened only with `--follow`
//! (otherwise only the image itself is opened, and the chain is not listed).

use std::process::ExitCode;

use qcow2::{FilePolicy, OpenOptions, Qcow2};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let follow = args.iter().any(|a| a == "--follow");
    let Some(path) = args.iter().find(|a| !a.starts_with("--")) else {
        eprintln!("usage: info [--json] [--follow] IMAGE");
        return ExitCode::from(2);
    };
    let policy = if follow {
        FilePolicy::Any
    } else {
        FilePolicy::Nothing
    };
    let options = OpenOptions::new().files(policy);
    let image = match open(path, &options, follow) {
        Ok(image) => image,
        Err(e) => {
            eprintln!("info: {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let info = image.info();
    if json {
        println!("{}", info.to_json());
    } else {
        print!("{info}");
    }
    ExitCode::SUCCESS
}

/// Open by path; without `--follow`, an image naming other files is still shown, from its
/// own metadata alone.
fn open(path: &str, options: &OpenOptions, follow: bool) -> qcow2::Result<Qcow2<std::fs::File>> {
    match Qcow2::open_path_with(path, options) {
        Err(qcow2::Error::FileRefused { .. }) if !follow => {
            let file = std::fs::File::open(path)
                .map_err(|e| qcow2::Error::from_io("opening the image", e))?;
            Qcow2::open(file)
        }
        other => other,
    }
}
