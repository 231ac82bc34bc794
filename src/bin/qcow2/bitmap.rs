//! `qcow2 bitmap`: the operations of `qemu-img bitmap` (`--add`, `--remove`, `--clear`,
//! `--enable`, `--disable`, `--merge`, applied in the order given, with its checks, messages
//! and exit status), and `--dump NAME IMG`: the dirty extents of a persistent bitmap, as
//! `qemu-nbd -B NAME` exports them (`qemu-img map` over NBD with `x-dirty-bitmap`).

use std::ffi::OsString;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::ValueEnum;
use qcow2::{BitmapOptions, BitmapSource, OpenOptions, Qcow2};

use crate::common;

/// Manage persistent dirty bitmaps, like `qemu-img bitmap`; or dump one's dirty extents.
#[derive(clap::Args)]
pub struct Args {
    /// Add a bitmap (enabled; `-g` sets its granularity).
    #[arg(long, action = clap::ArgAction::Count)]
    add: u8,
    /// Remove the bitmap.
    #[arg(long, action = clap::ArgAction::Count)]
    remove: u8,
    /// Clear every bit of the bitmap.
    #[arg(long, action = clap::ArgAction::Count)]
    clear: u8,
    /// Let the bitmap record writes.
    #[arg(long, action = clap::ArgAction::Count)]
    enable: u8,
    /// Stop the bitmap recording writes.
    #[arg(long, action = clap::ArgAction::Count)]
    disable: u8,
    /// Merge bitmap SOURCE (of this image, or of `-b SOURCE_FILE`) into the bitmap.
    #[arg(long, value_name = "SOURCE")]
    merge: Vec<String>,
    /// The image holding the `--merge` source bitmaps.
    #[arg(short = 'b', long = "source-file", value_name = "SOURCE_FILE")]
    source_file: Option<PathBuf>,
    /// Format of SOURCE_FILE (qcow2; raw has no bitmaps).
    #[arg(short = 'F', long = "source-format", value_name = "SOURCE_FMT")]
    source_format: Option<String>,
    /// Granularity of an added bitmap, in bytes (a power of two, 512 to 2G).
    #[arg(
        short = 'g',
        long = "granularity",
        value_name = "GRANULARITY",
        allow_hyphen_values = true
    )]
    granularity: Vec<String>,
    /// Image format (qcow2).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    format: Option<String>,
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    /// FILENAME is an option string (`driver=qcow2,file.filename=IMG,...`).
    #[arg(long)]
    image_opts: bool,
    /// Dump the dirty extents of this bitmap instead (`--dump NAME IMG`).
    #[arg(long, value_name = "NAME")]
    dump: Option<String>,
    /// With `--dump`: `human`, one `start length` line per extent; `json`, a list of
    /// `{"start", "length"}`.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    output: Output,
    /// With `--dump`: read a bitmap with the in-use flag (not saved cleanly), which QEMU
    /// refuses.
    #[arg(long)]
    allow_in_use: bool,
    /// FILENAME BITMAP (with `--dump`: the image only).
    #[arg(value_name = "FILENAME BITMAP")]
    operands: Vec<OsString>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Human,
    Json,
}

/// One operation of `qemu-img bitmap`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Op {
    /// The word qemu-img's message uses.
    fn word(&self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Remove => "remove",
            Op::Clear => "clear",
            Op::Enable => "enable",
            Op::Disable => "disable",
            Op::Merge(_) => "merge",
        }
    }
}

/// `--dump`, or the operations.
pub fn run(args: Args) -> ExitCode {
    if args.dump.is_some() {
        return run_dump(&args);
    }
    match manage(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => common::fail(message),
    }
}

/// The operations in the order the command line gives them: clap counts the flags, the
/// order comes from the arguments themselves (qemu-img applies them in that order).
fn operations(args: &Args) -> Result<Vec<Op>, String> {
    let mut merges = args.merge.iter();
    let mut ops = Vec::new();
    let raw: Vec<OsString> = std::env::args_os().collect();
    let after = raw.iter().position(|a| a == "bitmap").map_or(0, |i| i + 1);
    let mut tokens = raw.iter().skip(after).filter_map(|a| a.to_str());
    while let Some(token) = tokens.next() {
        if token == "--" {
            break;
        }
        let op = match token {
            "--add" => Op::Add,
            "--remove" => Op::Remove,
            "--clear" => Op::Clear,
            "--enable" => Op::Enable,
            "--disable" => Op::Disable,
            t if t == "--merge" || t.starts_with("--merge=") => {
                if t == "--merge" {
                    tokens.next(); // its value
                }
                Op::Merge(merges.next().cloned().unwrap_or_default())
            }
            _ => continue,
        };
        ops.push(op);
    }
    let counted = usize::from(args.add)
        + usize::from(args.remove)
        + usize::from(args.clear)
        + usize::from(args.enable)
        + usize::from(args.disable)
        + args.merge.len();
    if ops.len() != counted {
        return Err("could not tell the order of the operations".to_owned());
    }
    Ok(ops)
}

/// qemu-img's checks of the command line, in its order, then the operations.
fn manage(args: &Args) -> Result<(), String> {
    // Each -g is read as it comes, as getopt hands it over; the last one counts.
    let mut granularity = 0;
    for text in &args.granularity {
        granularity = common::cvtnum("granularity", text)?;
    }
    let ops = operations(args)?;
    if ops.is_empty() {
        return Err(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge"
                .to_owned(),
        );
    }
    if granularity != 0 && args.add == 0 {
        return Err("granularity only supported with --add".to_owned());
    }
    if args.source_format.is_some() && args.source_file.is_none() {
        return Err("-F only supported with -b".to_owned());
    }
    if args.source_file.is_some() && args.merge.is_empty() {
        return Err("Merge bitmap source file only supported with --merge".to_owned());
    }
    let [filename, bitmap] = args.operands.as_slice() else {
        return Err("Expecting filename and bitmap name".to_owned());
    };
    let bitmap = bitmap.to_string_lossy().into_owned();
    if args.image_opts && args.format.is_some() {
        return Err("--image-opts and --format are mutually exclusive".to_owned());
    }
    if let Some(format) = args.format.as_deref().filter(|f| *f != "qcow2") {
        return Err(format!(
            "unsupported image format '{format}' (only qcow2 bitmaps are managed)"
        ));
    }
    let (path, options) = open_options(args, filename)?;
    let image = Qcow2::open_path_with(&path, &options)
        .map_err(|e| common::could_not_open(&path, common::chain(&e)))?;
    let source = open_source(args)?;
    let writer = image
        .into_writer()
        .map_err(|e| common::could_not_open(&path, common::chain(&e)))?;
    // QEMU runs the operations until one fails; what the earlier ones did stays.
    let mut outcome = Ok(());
    let add = match granularity {
        0 => BitmapOptions::new(),
        // QEMU takes the granularity as 32 bits: the higher ones are dropped.
        g => BitmapOptions::new().granularity(g & u64::from(u32::MAX)),
    };
    for op in &ops {
        if let Err(e) = apply(&writer, op, &bitmap, &add, source.as_ref()) {
            outcome = Err(format!(
                "Operation {} on bitmap {bitmap} failed: {}",
                op.word(),
                qemu_words(&e)
            ));
            break;
        }
    }
    let closed = writer.close().map(drop).map_err(|e| common::chain(&e));
    outcome.and(closed)
}

/// The image's path and the options to open it with (for writing; its backing files are
/// not needed, as qemu-img opens none).
fn open_options(args: &Args, filename: &OsString) -> Result<(PathBuf, OpenOptions), String> {
    let options = OpenOptions::new().write(true).backing_as_zeros(true);
    if args.image_opts {
        let text = filename.to_string_lossy();
        return args.secret.apply_image_opts(&text, options);
    }
    Ok((PathBuf::from(filename), args.secret.apply(options)?))
}

/// The `--merge` source image, when `-b` names one: `None` for a raw file (no bitmaps).
fn open_source(args: &Args) -> Result<Option<Source>, String> {
    let Some(path) = &args.source_file else {
        return Ok(None);
    };
    let options = args
        .secret
        .apply(OpenOptions::new().backing_as_zeros(true))?;
    let could_not_open = |e: qcow2::Error| common::could_not_open(path, common::chain(&e));
    match args.source_format.as_deref() {
        Some("raw") => {
            std::fs::File::open(path).map_err(|e| {
                common::could_not_open(path, format!("Could not open '{}': {e}", path.display()))
            })?;
            Ok(Some(Source::Raw))
        }
        None | Some("qcow2") => Ok(Some(Source::Qcow2(Box::new(
            Qcow2::open_path_with(path, &options).map_err(could_not_open)?,
        )))),
        Some(other) => Err(format!("Unknown driver '{other}'")),
    }
}

/// A `-b` image.
enum Source {
    Qcow2(Box<Qcow2<std::fs::File>>),
    /// A raw file holds no bitmaps.
    Raw,
}

/// One operation on the open image.
fn apply<I: qcow2::Storage>(
    writer: &qcow2::Writer<I>,
    op: &Op,
    bitmap: &str,
    add: &BitmapOptions,
    source: Option<&Source>,
) -> qcow2::Result<()> {
    match op {
        Op::Add => writer.add_bitmap(bitmap, add),
        Op::Remove => writer.remove_bitmap(bitmap),
        Op::Clear => writer.clear_bitmap(bitmap),
        Op::Enable => writer.enable_bitmap(bitmap),
        Op::Disable => writer.disable_bitmap(bitmap),
        Op::Merge(name) => match source {
            None => writer.merge_bitmap(bitmap, BitmapSource::here(name)),
            Some(Source::Qcow2(image)) => {
                writer.merge_bitmap(bitmap, BitmapSource::image(image, name))
            }
            Some(Source::Raw) => Err(qcow2::Error::NoSuchBitmap { name: name.clone() }),
        },
    }
}

/// The library's error as qemu-img words it.
fn qemu_words(e: &qcow2::Error) -> String {
    match e {
        qcow2::Error::NoSuchBitmap { name } => format!("Dirty bitmap '{name}' not found"),
        qcow2::Error::BitmapInUse { name } => format!(
            "Bitmap '{name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove \
             to delete this bitmap from disk"
        ),
        e => common::chain(e),
    }
}

/// Print the extents as they are found; one line on stderr and a failure exit on any error
/// (after the extents found before it).
fn run_dump(args: &Args) -> ExitCode {
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let result = dump(args, &mut out);
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
    let name = args.dump.as_deref().unwrap_or_default();
    let [image_path] = args.operands.as_slice() else {
        return Err("--dump takes one image and no other operation".into());
    };
    if !operations(args)?.is_empty() {
        return Err("--dump takes one image and no other operation".into());
    }
    let image_path = Path::new(image_path);
    // Bitmaps live in the image file itself: no backing or data file is needed.
    // Opened without blocking and checked on the descriptor: a FIFO is refused at once.
    let could_not_open = |e: qcow2::Error| common::could_not_open(image_path, common::chain(&e));
    let file = qcow2::open_file(image_path, &OpenOptions::new().allow_devices(true))
        .map_err(could_not_open)?;
    let image = Qcow2::open(file).map_err(could_not_open)?;
    let unreadable = |e: qcow2::Error| {
        let e = common::chain(&e);
        format!("Could not read bitmap '{name}': {e}")
    };
    let extents = if args.allow_in_use {
        image.dirty_extents_allow_in_use(name)
    } else {
        image.dirty_extents(name)
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
