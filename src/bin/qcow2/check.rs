//! `qcow2 check`: a read-only consistency check, like `qemu-img check` without `-r`.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use positioned_io::{ReadAt, Size};
use qcow2::{CheckReport, Error, OpenOptions, Qcow2};

/// qemu-img's status for an image format without checks.
const NOT_SUPPORTED: u8 = 63;

/// Output formats, as `qemu-img --output` spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// The summary qemu-img prints.
    Human,
    /// The JSON of `qemu-img check --output=json`.
    Json,
}

/// Check an image's metadata for consistency (read-only). Exit status as qemu-img: 0 clean,
/// 1 check not completed, 2 corruptions, 3 leaked clusters only, 63 not a qcow2 image.
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
    let checked =
        match Qcow2::open_path_with(&args.image, &OpenOptions::new().backing_as_zeros(true)) {
            Ok(image) => Ok(image.check()),
            Err(Error::Corrupt) => open_corrupt(&args.image).map(|image| image.check()),
            Err(e) => Err(e),
        };
    let mut report = match checked {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => return fail(&format!("Check failed: {e}")),
        // Without -f, qemu-img probes such a file as raw, which has no check: status 63.
        Err(e @ Error::NotQcow2 { .. }) if args.format.is_none() => {
            eprintln!("qcow2: This image format does not support checks ({e})");
            return ExitCode::from(NOT_SUPPORTED);
        }
        Err(e) => return fail(&format!("Could not open '{}': {e}", args.image.display())),
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

/// Open an image whose corrupt bit is set. QEMU checks such images read-only; the library
/// refuses them on open, so the check reads the file with the bit hidden from the header.
fn open_corrupt(path: &Path) -> qcow2::Result<Qcow2<CorruptBitHidden>> {
    let file =
        File::open(path).map_err(|e| Error::from_io(format!("opening {}", path.display()), e))?;
    let mut version = [0u8; 4];
    file.read_exact_at(4, &mut version)
        .map_err(|e| Error::from_io("reading the header", e))?;
    let source = CorruptBitHidden {
        file,
        v3: u32::from_be_bytes(version) >= 3,
    };
    Qcow2::open_with(source, &OpenOptions::new())
}

/// The image file, with incompatible feature bit 1 (corrupt, header byte 79 bit 1 of a
/// version 3 header) read as clear.
struct CorruptBitHidden {
    file: File,
    v3: bool,
}

/// Header byte holding incompatible feature bits 0-7 (bytes 72-79, big-endian).
const INCOMPAT_LOW_BYTE: u64 = 79;
const CORRUPT_BIT: u8 = 1 << 1;

impl ReadAt for CorruptBitHidden {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(pos, buf)?;
        if self.v3 && pos <= INCOMPAT_LOW_BYTE {
            let at = (INCOMPAT_LOW_BYTE - pos) as usize;
            if let Some(byte) = buf.get_mut(at).filter(|_| at < n) {
                *byte &= !CORRUPT_BIT;
            }
        }
        Ok(n)
    }
}

impl Size for CorruptBitHidden {
    fn size(&self) -> io::Result<Option<u64>> {
        self.file.size()
    }
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
