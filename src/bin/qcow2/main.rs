//! `qcow2`: the jobs of `qemu-img` that read images (info, map, check, compare, convert,
//! snapshot listing) or make new ones (create, convert -O qcow2), and dirty-bitmap dumps, done by the `qcow2` crate. Options spell as `qemu-img`'s.
//!
//! Each subcommand is a thin layer over a public library call and lives in its own module,
//! which exports `Args` (its clap arguments) and `run(args) -> ExitCode`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod amend;
mod bench;
mod bitmap;
mod check;
mod commit;
mod common;
mod compare;
mod convert;
mod create;
// The disks commands read: qcow2 or raw, probed.
mod disk;
mod info;
mod io;
mod map;
mod rebase;
mod resize;
mod snapshot;
// Secrets for encrypted images (`--object secret,...`, `--secret-file`); the subcommands
// that read guest data flatten `secret::SecretArgs` into their `Args`.
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
    /// Change an image's options in place, like `qemu-img amend`.
    Amend(amend::Args),
    /// Time COUNT reads or writes of the image, like `qemu-img bench`.
    Bench(bench::Args),
    /// Add, remove, clear, enable, disable or merge persistent dirty bitmaps, like `qemu-img bitmap`; or dump one's dirty extents.
    Bitmap(bitmap::Args),
    /// Show what an image holds, like `qemu-img info`.
    Info(info::Args),
    /// List internal snapshots, like `qemu-img snapshot -l`.
    Snapshot(snapshot::Args),
    /// Check an image for consistency, like `qemu-img check`.
    Check(check::Args),
    /// Show where each stretch of the guest disk is stored, like `qemu-img map`.
    Map(map::Args),
    /// Copy a guest disk (or a snapshot) to a raw file or a pipe, like `qemu-img convert -O raw`.
    Convert(convert::Args),
    /// Make a new empty qcow2 image, like `qemu-img create -f qcow2`.
    Create(create::Args),
    /// Compare two guest disks (qcow2 or raw), like `qemu-img compare`.
    Compare(compare::Args),
    /// Run qemu-io's commands (read, write, discard, flush, map, info) on an image, like `qemu-io`.
    Io(io::Args),
    /// Write an overlay's data into its backing file, like `qemu-img commit`.
    Commit(commit::Args),
    /// Change an image's backing file, like `qemu-img rebase`.
    Rebase(rebase::Args),
    /// Change an image's virtual size, like `qemu-img resize`.
    Resize(resize::Args),
}

fn main() -> ExitCode {
    // Usage errors exit with status 1, as qemu-img's do (clap's 2 would mean "corruptions
    // found" to a script running `check`); --help and --version print on stdout, status 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Amend(args) => amend::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Bitmap(args) => bitmap::run(args),
        Command::Info(args) => info::run(args),
        Command::Snapshot(args) => snapshot::run(args),
        Command::Check(args) => check::run(args),
        Command::Map(args) => map::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Create(args) => create::run(args),
        Command::Io(args) => io::run(args),
        Command::Commit(args) => commit::run(args),
        Command::Rebase(args) => rebase::run(args),
        Command::Resize(args) => resize::run(args),
    }
}
