//! `qcow2 check`: a read-only consistency check, like `qemu-img check` without `-r`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use qcow2::{CheckReport, OpenOptions, Qcow2};

/// Output formats, as `qemu-img --output` spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// The summary qemu-img prints.
    Human,
    /// The JSON of `qemu-img check --output=json`.
    Json,
}

/// Check an image's metadata for consistency (read-only). Exit status as qemu-img: 0 clean,
/// 1 check not completed, 2 corruptions, 3 leaked clusters only.
#[derive(Parser, Debug)]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    pub output: Output,
    /// Image format (only qcow2 is checked).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Print nothing but errors.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// The image.
    pub image: PathBuf,
}

/// Run the check and print what qemu-img prints: one line per problem on stderr, the
/// summary (or JSON) on stdout.
pub fn run(args: Args) -> ExitCode {
    if let Some(format) = args.format.as_deref().filter(|f| *f != "qcow2") {
        return fail(&format!(
            "unsupported image format '{format}' (only qcow2 is checked)"
        ));
    }
    let options = OpenOptions::new().backing_as_zeros(true);
    let image = match Qcow2::open_path_with(&args.image, &options) {
        Ok(image) => image,
        Err(e) => return fail(&format!("Could not open '{}': {e}", args.image.display())),
    };
    let mut report = match image.check() {
        Ok(report) => report,
        Err(e) => return fail(&format!("Check failed: {e}")),
    };
    report.filename = args.image.display().to_string();
    print_problems(&report);
    if !args.quiet {
        let printed = match args.output {
            Output::Human => Ok(report.summary()),
            Output::Json => json(&report),
        };
        match printed {
            Ok(text) => {
                let _ = std::io::stdout().write_all(text.as_bytes());
            }
            Err(e) => return fail(&format!("cannot write the report: {e}")),
        }
    }
    if report.check_errors > 0 {
        eprintln!("qcow2: Check failed");
    }
    ExitCode::from(report.exit_status())
}

fn print_problems(report: &CheckReport) {
    let mut err = std::io::stderr().lock();
    for problem in &report.problems {
        let _ = writeln!(err, "{problem}");
    }
    if report.problems_omitted > 0 {
        let _ = writeln!(err, "... and {} more problems", report.problems_omitted);
    }
}

/// The report as `qemu-img check --output=json` prints it (4-space indents).
fn json(report: &CheckReport) -> serde_json::Result<String> {
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
    serde::Serialize::serialize(report, &mut ser)?;
    out.push(b'\n');
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn fail(message: &str) -> ExitCode {
    eprintln!("qcow2: {message}");
    ExitCode::from(1)
}
