//! Print what the crate knows about an image, like `qemu-img info`.
//!
//! ```text
//! cargo run --example info -- fixtures/snap.qcow2
//! cargo run --example info -- --json --follow fixtures/chain-top.qcow2
//! ```
//! Only the image itself is opened, as `qemu-img info` does; with `--follow`, each image of
//! its backing chain is shown too (`qemu-img info --backing-chain`). Dates are in UTC.

use std::process::ExitCode;

use qcow2::{ImageInfo, OpenOptions};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let follow = args.iter().any(|a| a == "--follow");
    let Some(path) = args.iter().find(|a| !a.starts_with("--")) else {
        eprintln!("usage: info [--json] [--follow] IMAGE");
        return ExitCode::from(2);
    };
    let options = OpenOptions::new();
    let chain = if follow {
        ImageInfo::chain_from_path(path, &options)
    } else {
        ImageInfo::from_path(path, &options).map(|info| vec![info])
    };
    let chain = match chain {
        Ok(chain) => chain,
        Err(e) => {
            eprintln!("info: {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match (json, follow) {
        (true, true) => println!("{}", ImageInfo::chain_to_json(&chain)),
        (true, false) => chain.iter().for_each(|i| println!("{}", i.to_json())),
        (false, _) => print!("{}", ImageInfo::chain_to_human(&chain, &|_| 0)),
    }
    ExitCode::SUCCESS
}
