//! `qcow2`: the read-only jobs of `qemu-img` (info, map, check, compare, convert, snapshot
//! listing) and dirty-bitmap dumps, done by the `qcow2` crate. Options spell as `qemu-img`'s.
//!
//! Each subcommand is a thin layer over a public library call and lives in its own module,
//! which exports `Args` (its clap arguments) and `run(args) -> ExitCode`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// Secrets for encrypted images (`--object secret,...`, `--secret-file`); the subcommands
// that read guest data flatten `secret::SecretArgs` into their `Args`.
#[allow(dead_code)]
mod secret;

/// Read qcow2 images like `qemu-img`, without QEMU.
#[derive(Parser)]
#[command(name = "qcow2", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    // One variant per subcommand, e.g. `Info(info::Args)`, dispatched in `main`.
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {}
}
