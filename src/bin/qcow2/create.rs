//! `qcow2 create`: make a new empty qcow2 image, as `qemu-img create -f qcow2` does (same
//! options, messages, "Formatting" line and exit codes), over [`qcow2::create`].

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use qcow2::{CreateOptions, Error};

use crate::common;
use crate::secret::SecretArgs;

/// `qcow2 create -f qcow2 [-o OPTS] [-b BACKING -F FMT] [-u] [-q] [--object ...] FILE [SIZE]`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image format: only `qcow2`.
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Options as qemu-img's `-o` takes them (`cluster_size=4k,lazy_refcounts=on`); `help`
    /// lists them. Repeatable.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Backing file (stored as given; relative to the new image's directory).
    #[arg(short = 'b', value_name = "BACKING_FILE")]
    backing: Option<String>,
    /// Backing file format (`qcow2` or `raw`).
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// Do not open the backing file (its size is then not taken).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Quiet: no "Formatting" line.
    #[arg(short = 'q')]
    quiet: bool,
    #[command(flatten)]
    secrets: SecretArgs,
    /// The new image.
    file: Option<String>,
    /// Its virtual size, with an optional suffix (k, M, G, T, P, E).
    #[arg(allow_hyphen_values = true)]
    size: Option<String>,
}

/// The options printed by `-o help` given a file name, which adds the file protocol's.
const FILE_OPTIONS: &[(&str, &str)] = &[
    (
        "  extent_size_hint=<size> - Extent size hint for the image file, 0 to disable\n",
        "lazy_refcounts",
    ),
    (
        "  nocow=<bool (on/off)>  - Turn off copy-on-write (valid only on btrfs)\n",
        "preallocation",
    ),
];

/// qemu-img's error: `qcow2: ` then the message; its further lines as they are.
fn fail(message: &str) -> ExitCode {
    let _ = writeln!(std::io::stderr().lock(), "qcow2: {message}");
    ExitCode::FAILURE
}

fn fail_for(file: &str, e: &Error) -> ExitCode {
    let message = match e {
        Error::InvalidOption { message, .. } => message.clone(),
        other => common::chain(other),
    };
    fail(&format!("{file}: {message}"))
}

pub(crate) fn wants_help(options: &[String]) -> bool {
    options
        .iter()
        .flat_map(|o| o.split(','))
        .any(|item| item == "help" || item == "?")
}

/// `-o help`: the qcow2 options; with a file name, the file protocol's options among them.
pub(crate) fn help(with_file: bool) -> ExitCode {
    let list = CreateOptions::help();
    let text = if with_file {
        let mut out = String::from("Supported options:\n");
        for line in list.lines() {
            for (extra, before) in FILE_OPTIONS {
                if line.trim_start().starts_with(&format!("{before}=")) {
                    // The file options sort in among the qcow2 ones by name.
                    out.push_str(extra);
                }
            }
            out.push_str(line);
            out.push('\n');
        }
        out
    } else {
        format!(
            "Supported qcow2 options:\n{list}\nThe protocol level may support further options.\n\
             Specify the target filename to include those options.\n"
        )
    };
    common::print(text.as_bytes())
}

pub fn run(args: Args) -> ExitCode {
    if wants_help(&args.options) {
        return help(args.file.is_some());
    }
    let Some(file) = args.file.as_deref() else {
        return fail("Expecting image file name");
    };
    match args.format.as_deref() {
        Some("qcow2") => {}
        Some(other) => return fail(&format!("only -f qcow2 is supported, not '{other}'")),
        None => return fail("-f qcow2 is required (qemu-img's default is raw)"),
    }
    let mut options = CreateOptions::default();
    for text in &args.options {
        if let Err(e) = options.set_all(text) {
            return fail_for(file, &e);
        }
    }
    if let Some(size) = &args.size {
        let bytes = match common::cvtnum("image size", size) {
            Ok(bytes) => bytes,
            Err(message) => return fail(&message),
        };
        if options.has_size() {
            return fail(&format!(
                "{file}: The image size must be specified only once"
            ));
        }
        options = options.size(bytes);
    }
    if let Some(backing) = &args.backing {
        options = options.backing_file(backing.as_str());
    }
    if let Some(format) = &args.backing_format {
        options = options.backing_format(format.as_str());
    }
    options = options.unsafe_backing(args.unsafe_backing);
    let size = match options.resolve_size(Path::new(file)) {
        Ok(size) => size,
        Err(e) => return fail_for(file, &e),
    };
    if !args.quiet {
        let line = format!("Formatting '{file}', {}", options.describe(Some(size)));
        let _ = writeln!(std::io::stdout().lock(), "{line}");
    }
    if let Some(id) = options.key_secret_id().map(str::to_owned) {
        match args.secrets.by_id(&id) {
            Ok(Some(bytes)) => options = options.secret(bytes),
            Ok(None) => return fail(&format!("{file}: No secret with id '{id}'")),
            Err(message) => return fail(&message),
        }
    }
    match qcow2::create(file, &options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail_for(file, &e),
    }
}
