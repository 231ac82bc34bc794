//! `qcow2 convert`: copy a guest disk (a qcow2 image, one of its snapshots, or a raw file) to
//! a raw file or a pipe, like `qemu-img convert -O raw`.

use std::fs::File;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use qcow2::{
    ConvertOptions, CreateOptions, GuestDisk, HoleAwareReader, OpenOptions, Qcow2, Reader,
};

use crate::disk::Disk;

/// qemu-img's sparse sizes are whole 512-byte sectors (QEMU's `BDRV_SECTOR_SIZE`; the
/// library counts in them too but names no public constant).
const SECTOR: u64 = 512;

/// qemu-img's message for a bad `-S`.
const BAD_SPARSE_SIZE: &str = "Invalid buffer size for sparse output specified. Valid sizes \
are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates \
output).";

/// Copy the guest disk of IMG to OUT: raw bytes, or a new qcow2 image.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output format: `raw` (the default) or `qcow2`.
    #[arg(short = 'O', value_name = "OUTPUT_FMT", default_value = "raw")]
    output_format: String,
    /// Compress every cluster of the new image (`-O qcow2`), with its compression type.
    #[arg(short = 'c')]
    compress: bool,
    /// Options of the new image, as `qemu-img create -o` takes them
    /// (`cluster_size=4k,compression_type=zstd`); `help` lists them. Repeatable.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// The new image is an overlay of this backing file, holding only what the source's top
    /// image holds (`-O qcow2`).
    #[arg(short = 'B', value_name = "BACKING_FILE")]
    backing: Option<String>,
    /// The format of the backing file (`qcow2` or `raw`).
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// Out-of-order writes: accepted; the crate reads and compresses out of order on its
    /// threads and always appends to the new image in guest order.
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Write into the existing image OUT instead of creating it: an empty qcow2 image (as
    /// `qcow2 create` leaves it) at least as large as the source.
    #[arg(short = 'n')]
    skip_create: bool,
    /// Cache mode of the output: by default (and with `unsafe`) the output is written through
    /// the page cache and not flushed, as qemu-img's default does; any other mode
    /// (`writeback`, `none`, `directsync`, `writethrough`) flushes it to disk at the end.
    #[arg(short = 't', value_name = "CACHE")]
    cache: Option<String>,
    /// Cache mode of the source: accepted for qemu-img's scripts.
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    source_cache: Option<String>,
    /// Input format: `qcow2` or `raw` (default: probed).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Copy this internal snapshot: `snapshot.id=ID`, `snapshot.name=NAME`, or an id or name.
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    snapshot: Option<String>,
    /// Show the progress: a bar when standard error is a terminal, else qemu-img's
    /// `    (x.xx/100%)` records ending in `\r`, on standard output (on standard error when
    /// the output is `-`).
    #[arg(short = 'p')]
    progress: bool,
    /// Read on N threads (1 to 16; default: one per core, up to 8).
    #[arg(short = 'm', value_name = "N", value_parser = clap::value_parser!(u16).range(1..=16))]
    threads: Option<u16>,
    /// Runs of at least SIZE zero bytes become holes in the output (default 4k; 0 writes
    /// every byte). Suffixes k, M, G... as in qemu-img.
    #[arg(short = 'S', value_name = "SIZE", allow_hyphen_values = true)]
    sparse_size: Option<String>,
    /// Print nothing but errors.
    #[arg(short = 'q')]
    quiet: bool,
    /// Secrets of encrypted images.
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    /// IMG is a list of options, as qemu-img takes them:
    /// `driver=qcow2,file.filename=IMG,encrypt.key-secret=ID[,backing.encrypt.key-secret=ID2]`.
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// The qcow2 image or raw file (with `--image-opts`, the qcow2 image's options); `-`
    /// reads raw bytes from standard input (`-O qcow2`).
    image: PathBuf,
    /// The output file: raw, or `-` for standard output; or the new qcow2 image.
    output: PathBuf,
}

/// Run `qcow2 convert`.
pub fn run(args: Args) -> ExitCode {
    if args.output_format == "qcow2" && crate::create::wants_help(&args.options) {
        return crate::create::help(true);
    }
    let result = check_cache(args.cache.as_deref())
        .and_then(|()| check_cache(args.source_cache.as_deref()))
        .and_then(|()| convert(&args))
        .and_then(|()| flush_if_asked(&args));
    match result {
        Ok(()) | Err(Stop::ReaderLeft) => ExitCode::SUCCESS,
        Err(Stop::Failed(message)) => crate::common::fail(message),
    }
}

/// The cache modes qemu-img knows; qemu-img's message for another.
fn check_cache(mode: Option<&str>) -> Result<(), Stop> {
    match mode {
        None | Some("none" | "off" | "writeback" | "unsafe" | "directsync" | "writethrough") => {
            Ok(())
        }
        Some(other) => Err(format!("Invalid cache option: {other}").into()),
    }
}

/// With a cache mode other than qemu-img's default (`unsafe`), the output reaches the disk
/// before the command ends, as qemu-img flushes it when it closes the image.
fn flush_if_asked(args: &Args) -> Result<(), Stop> {
    if matches!(args.cache.as_deref(), None | Some("unsafe")) || args.output.as_os_str() == "-" {
        return Ok(());
    }
    let flushed = File::open(&args.output).and_then(|file| file.sync_all());
    flushed.map_err(|e| format!("Could not flush '{}': {e}", args.output.display()).into())
}

/// Why a conversion stopped before its end.
enum Stop {
    /// An error, qemu-img's message.
    Failed(String),
    /// The output is a pipe whose reader left (`| head -c1`): the conversion ends quietly,
    /// as a program in a pipe does.
    ReaderLeft,
}

impl From<String> for Stop {
    fn from(message: String) -> Stop {
        Stop::Failed(message)
    }
}

impl From<&str> for Stop {
    fn from(message: &str) -> Stop {
        Stop::Failed(message.to_owned())
    }
}

fn convert(args: &Args) -> Result<(), Stop> {
    let target = Target::from_args(args)?;
    // Without -m, the library's default: one thread per core, up to 8.
    let mut options = ConvertOptions::new()
        .compress(args.compress)
        .out_of_order(args.out_of_order);
    if let Some(threads) = args.threads {
        options = options.threads(usize::from(threads));
    }
    if let Some(s) = &args.sparse_size {
        options = options.sparse_size(parse_sparse_size(s)?);
    }
    if args.image.as_os_str() == "-" && !args.image_opts {
        return convert_stdin(args, &target, options);
    }
    let source = if args.image_opts {
        Disk::Image(Box::new(open_image_opts(&args.image, &args.secret)?.1))
    } else {
        Disk::open(&args.image, args.format.as_deref(), &args.secret)?
    };
    match &source {
        Disk::Image(image) => {
            let reader = match &args.snapshot {
                Some(spec) => snapshot_reader(image, spec)?,
                None => image.reader().map_err(|e| crate::common::chain(&e))?,
            };
            // qemu-img sizes the output by the image, padding or cutting a snapshot's disk.
            // Data clusters in holes of the image file count as zeros, as qemu-img's block
            // status says.
            let disk = HoleAwareReader::new(&reader);
            let overlay = args.backing.is_some().then_some(&reader);
            convert_disk(&disk, overlay, image.guest_size(), args, &target, options)
        }
        Disk::Raw(raw) => {
            if args.snapshot.is_some() {
                return Err(RAW_SNAPSHOT.into());
            }
            convert_disk(raw, None, raw.disk_size(), args, &target, options)
        }
    }
}

/// Convert `disk`, of `size` bytes, with progress as asked. `overlay`: the source's top
/// image, when only what it holds is to be copied (`-B`).
fn convert_disk<D: GuestDisk + Sync>(
    disk: &D,
    overlay: Option<&Reader<'_, File>>,
    size: u64,
    args: &Args,
    target: &Target,
    options: ConvertOptions,
) -> Result<(), Stop> {
    let options = options.size(size);
    let mut shown = Progress::new(
        args.progress && !args.quiet,
        size,
        args.output.as_os_str() == "-",
    );
    let progress = |done: u64, total: u64| shown.update(done, total);
    let result = match target {
        Target::Raw => write_output(disk, &args.output, &options, progress),
        Target::Qcow2(new) => match (&new.create, overlay) {
            // A new image from the whole disk: the library's one call (a preallocated image
            // is filled where its clusters are mapped).
            (Some(create), None) => {
                qcow2::convert_to_qcow2(disk, &args.output, create, &options, progress)
                    .map_err(|e| new_image_failed(&args.output, e))
            }
            _ => new_then_fill(new, disk, overlay, size, args, &options, progress),
        },
    };
    shown.end(result.is_ok());
    result
}

/// The message of a failed `convert_to_qcow2`, as qemu-img words each kind.
fn new_image_failed(path: &Path, e: qcow2::Error) -> Stop {
    match e {
        qcow2::Error::InvalidOption { .. } => creation_refused(path, e),
        qcow2::Error::OutputIsSource => {
            format!("Could not create '{}': {SOURCE_OUTPUT}", path.display()).into()
        }
        other => format!(
            "error while converting to {}: {}",
            path.display(),
            crate::common::chain(&other)
        )
        .into(),
    }
}

/// qemu-img's words when the new image at `path` cannot be made.
fn creation_refused(path: &Path, e: qcow2::Error) -> Stop {
    let message = refusal(e);
    format!(
        "{}: error while converting qcow2: {message}",
        path.display()
    )
    .into()
}

/// The text of an error: an option's refusal is qemu-img's message alone.
fn refusal(e: qcow2::Error) -> String {
    match e {
        qcow2::Error::InvalidOption { message, .. } => message,
        other => crate::common::chain(&other),
    }
}

/// An overlay (`-B`) or a target that exists (`-n`): made (unless `-n`), then filled.
fn new_then_fill<D: GuestDisk + Sync>(
    new: &NewImage,
    disk: &D,
    overlay: Option<&Reader<'_, File>>,
    size: u64,
    args: &Args,
    options: &ConvertOptions,
    progress: impl FnMut(u64, u64),
) -> Result<(), Stop> {
    let fill = |target: &Path, open: &OpenOptions| match overlay {
        Some(top) => qcow2::convert_overlay_into_qcow2(top, target, open, options, progress),
        None => qcow2::convert_into_qcow2(disk, target, open, options, progress),
    };
    new.make(&args.output, Some((disk as &dyn GuestDisk, size)), fill)
}

/// Convert raw bytes from standard input: into a new qcow2 image as long as the stream, or
/// to a raw output as they come.
fn convert_stdin(args: &Args, target: &Target, options: ConvertOptions) -> Result<(), Stop> {
    if let Some(f) = args.format.as_deref().filter(|f| *f != "raw") {
        return Err(format!("Standard input is read as raw bytes, not as '{f}'").into());
    }
    if args.snapshot.is_some() {
        return Err(RAW_SNAPSHOT.into());
    }
    let Target::Qcow2(new) = target else {
        return Err("Standard input converts to -O qcow2 only".into());
    };
    let mut shown = Progress::new(args.progress && !args.quiet, 0, false);
    let progress = |done: u64, total: u64| shown.update(done, total);
    let stdin = std::io::stdin().lock();
    let fill = |target: &Path, open: &OpenOptions| {
        qcow2::convert_stream_into_qcow2(stdin, None, target, open, &options, progress)
    };
    let result = new.make(&args.output, None, fill);
    shown.end(result.is_ok());
    result
}

/// What the conversion writes.
enum Target {
    /// Raw bytes, to a file or a stream.
    Raw,
    /// A qcow2 image.
    Qcow2(Box<NewImage>),
}

impl Target {
    /// The output format and its options, refused as qemu-img refuses them before it opens
    /// the source.
    fn from_args(args: &Args) -> Result<Target, Stop> {
        match args.output_format.as_str() {
            "raw" => {
                if args.compress {
                    return Err("Compression not supported for this file format".into());
                }
                if args.backing.is_some() {
                    return Err("Backing file not supported for file format 'raw'".into());
                }
                if let Some(first) = args.options.iter().flat_map(|o| o.split(',')).next() {
                    let key = first.split_once('=').map_or(first, |(k, _)| k);
                    return Err(format!("Invalid parameter '{key}'").into());
                }
                Ok(Target::Raw)
            }
            "qcow2" => Ok(Target::Qcow2(Box::new(NewImage::from_args(args)?))),
            other => Err(format!("Unknown file format '{other}'").into()),
        }
    }
}

/// A qcow2 image to make (or, with `-n`, to fill).
struct NewImage {
    /// The options of the new image; `None` with `-n`.
    create: Option<CreateOptions>,
    /// How the filled image is opened: its secret, when it is encrypted.
    open: OpenOptions,
}

impl NewImage {
    fn from_args(args: &Args) -> Result<NewImage, Stop> {
        if args.skip_create {
            if !args.options.is_empty() {
                return Err("-o has no effect when skipping image creation".into());
            }
            let open = args.secret.apply(OpenOptions::new())?;
            return Ok(NewImage { create: None, open });
        }
        let mut create = CreateOptions::default();
        // A bad option name or value: qemu-img's bare message, before any file is named.
        for text in &args.options {
            create.set_all(text).map_err(|e| Stop::Failed(refusal(e)))?;
        }
        if let Some(backing) = &args.backing {
            create = create.backing_file(backing.as_str());
        }
        if let Some(format) = &args.backing_format {
            create = create.backing_format(format.as_str());
        }
        if args.compress && create.preallocates() {
            return Err("Compression and preallocation not supported at the same time".into());
        }
        let mut open = OpenOptions::new();
        if let Some(id) = create.key_secret_id().map(str::to_owned) {
            let bytes = args.secret.by_id(&id)?.ok_or_else(|| {
                creation_refused(
                    &args.output,
                    qcow2::Error::InvalidOption {
                        option: "encrypt.key-secret".to_owned(),
                        message: format!("No secret with id '{id}'"),
                    },
                )
            })?;
            create = create.secret(bytes.clone());
            open = open.secret(qcow2::Secret::new(bytes));
        }
        Ok(NewImage {
            create: Some(create),
            open,
        })
    }

    /// Create the image at `path` (sized as `source`, or empty for a stream of unknown
    /// length) and `fill` it; on failure the new file is removed, so that no half-written
    /// image is left. With `-n`, only `fill`. A file the source reads is never created over.
    fn make(
        &self,
        path: &Path,
        source: Option<(&dyn GuestDisk, u64)>,
        fill: impl FnOnce(&Path, &OpenOptions) -> qcow2::Result<()>,
    ) -> Result<(), Stop> {
        let created = self
            .create
            .iter()
            .flat_map(|c| c.data_file_name().map(Path::new));
        for file in std::iter::once(path).chain(created) {
            let Some((disk, _)) = source else { break };
            let fail = |why: String| format!("Could not create '{}': {why}", file.display());
            // A file that does not exist yet is no source.
            if let Ok(existing) = File::open(file) {
                match disk.reads_file(&existing) {
                    Ok(false) => {}
                    Ok(true) => return Err(fail(SOURCE_OUTPUT.to_owned()).into()),
                    Err(e) => return Err(fail(crate::common::chain(&e)).into()),
                }
            }
        }
        let size = source.map(|(_, size)| size);
        let failed = |e: qcow2::Error| -> Stop {
            format!(
                "error while converting to {}: {}",
                path.display(),
                crate::common::chain(&e)
            )
            .into()
        };
        let Some(create) = &self.create else {
            return fill(path, &self.open).map_err(failed);
        };
        // The source's size, whatever `-o size` says (as qemu-img).
        let create = create.clone().size(size.unwrap_or(0));
        // Made under a hidden name and renamed once complete, as `convert_to_qcow2` does: a
        // killed conversion leaves no empty or half-filled image at `path`.
        let partial = partial_path(path)?;
        qcow2::create(&partial, &create).map_err(|e| creation_refused(path, e))?;
        fill(&partial, &self.open)
            .and_then(|()| {
                std::fs::rename(&partial, path).map_err(|source| qcow2::Error::Io {
                    context: "renaming the new image".to_owned(),
                    source,
                })
            })
            .map_err(|e| {
                let _ = std::fs::remove_file(&partial);
                failed(e)
            })
    }
}

/// The hidden name beside `path` a new image is made under until it is complete (the
/// library's `convert_to_qcow2` uses the same rule).
fn partial_path(path: &Path) -> Result<std::path::PathBuf, Stop> {
    let name = path
        .file_name()
        .ok_or_else(|| format!("'{}' names no file", path.display()))?;
    let mut partial = std::ffi::OsString::from(".");
    partial.push(name);
    partial.push(format!(".partial-{}", std::process::id()));
    Ok(path.with_file_name(partial))
}

/// Why an output is refused that the source reads.
const SOURCE_OUTPUT: &str = "it is a file the image being converted reads (the image, a \
backing file or the data file); it was left as it was";

/// qemu-img's refusal of `-l` on a raw source.
const RAW_SNAPSHOT: &str = "Failed to load snapshot: Block format 'raw' used by device '' \
does not support temporarily loading internal snapshots";

/// Open a qcow2 image and its backing chain by path, refusing files that cannot be read as
/// disks: the library opens every file without blocking (a FIFO would block until someone
/// writes to it) and checks what it opened, regular files and block devices passing.
/// Encrypted images are unlocked with the secret given as qemu-img takes it.
pub(crate) fn open_image(
    path: &Path,
    secret: &crate::secret::SecretArgs,
) -> Result<Qcow2<File>, String> {
    let fail = |e: &dyn std::fmt::Display| crate::common::could_not_open(path, e);
    let options = OpenOptions::new().allow_devices(true);
    let options = secret.apply(options)?;
    Qcow2::open_path_with(path, &options).map_err(|e| fail(&crate::common::chain(&e)))
}

/// Open an image named by `--image-opts` options, each layer of its chain with the secret its
/// `encrypt.key-secret` names. Returns the image's path too.
pub(crate) fn open_image_opts(
    opts: &Path,
    secret: &crate::secret::SecretArgs,
) -> Result<(PathBuf, Qcow2<File>), String> {
    let text = opts.to_str().ok_or("--image-opts options must be UTF-8")?;
    let base = OpenOptions::new().allow_devices(true);
    let (path, options) = secret.apply_image_opts(text, base)?;
    let fail = |e: &dyn std::fmt::Display| crate::common::could_not_open(&path, e);
    let image =
        Qcow2::open_path_with(&path, &options).map_err(|e| fail(&crate::common::chain(&e)))?;
    // QEMU: "Header reported 'luks' encryption format but options specify 'aes'".
    let asked = text
        .split(',')
        .find_map(|kv| kv.strip_prefix("encrypt.format="));
    let found = image.encryption().map(|e| e.format);
    if let Some(asked) = asked.filter(|a| Some(*a) != found) {
        let found = found.unwrap_or("no");
        return Err(fail(&format!(
            "Header reported '{found}' encryption format but options specify '{asked}'"
        )));
    }
    Ok((path, image))
}

/// The reader of the snapshot `spec` names as `qemu-img convert -l` takes it.
fn snapshot_reader<'a>(image: &'a Qcow2<File>, spec: &str) -> Result<Reader<'a, File>, String> {
    const NOT_FOUND: &str = "Failed to load snapshot: Can't find snapshot";
    let found = if spec.starts_with("snapshot.") {
        let (mut id, mut name) = (None, None);
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("snapshot.id", v)) => id = Some(v),
                Some(("snapshot.name", v)) => name = Some(v),
                _ => return Err(format!("Failed in parsing snapshot param '{spec}'")),
            }
        }
        image
            .snapshots()
            .iter()
            .find(|s| id.is_none_or(|id| s.id == id) && name.is_none_or(|name| s.name == name))
    } else {
        let snapshots = image.snapshots();
        snapshots
            .iter()
            .find(|s| s.id == spec)
            .or_else(|| snapshots.iter().find(|s| s.name == spec))
    };
    let snapshot = found.ok_or(NOT_FOUND)?;
    image
        .snapshot_reader(&snapshot.id)
        .map_err(|e| format!("Failed to load snapshot: {}", crate::common::chain(&e)))
}

/// Write the conversion to `output`: standard output or a FIFO as a stream, anything else
/// as a new file with holes.
fn write_output<D: GuestDisk + Sync + ?Sized>(
    reader: &D,
    output: &Path,
    options: &ConvertOptions,
    progress: impl FnMut(u64, u64),
) -> Result<(), Stop> {
    let fail = |e: qcow2::Error| match e.io_kind() {
        std::io::ErrorKind::BrokenPipe => Stop::ReaderLeft,
        _ => Stop::Failed(format!(
            "error while converting to {}: {}",
            output.display(),
            crate::common::chain(&e)
        )),
    };
    let is_source = |file: &File, what: &str| match reader.reads_file(file) {
        Ok(false) => Ok(()),
        Ok(true) => Err(Stop::Failed(format!("{what}: {SOURCE_OUTPUT}"))),
        Err(e) => Err(fail(e)),
    };
    if output.as_os_str() == "-" {
        // Standard output sent to a file of the chain (`>> base.qcow2`) is refused too.
        if let Some(file) = stdout_file() {
            is_source(&file, "Could not write to standard output")?;
        }
        let stdout = std::io::stdout().lock();
        return qcow2::convert_to_writer(reader, stdout, options, progress).map_err(fail);
    }
    let open_fail = |e: std::io::Error| format!("Could not create '{}': {e}", output.display());
    // The source is open (its whole chain); the output is opened without being truncated,
    // and emptied only once it is known not to be one of the files the source reads.
    let (file, regular) = open_output(output).map_err(open_fail)?;
    is_source(&file, &format!("Could not create '{}'", output.display()))?;
    if regular {
        return qcow2::convert_to_file(reader, &file, options, progress).map_err(fail);
    }
    // A pipe or a device: written in order, never truncated.
    qcow2::convert_to_writer(reader, file, options, progress).map_err(fail)
}

/// A second handle to standard output, to compare with the files the image reads.
#[cfg(unix)]
fn stdout_file() -> Option<File> {
    use std::os::fd::AsFd;
    let fd = std::io::stdout().as_fd().try_clone_to_owned().ok()?;
    Some(File::from(fd))
}

#[cfg(not(unix))]
fn stdout_file() -> Option<File> {
    None
}

/// Open the output for writing, created if missing but not truncated, and whether it is a
/// regular file (else a pipe or a device, to be written as a stream). A FIFO without a reader
/// is waited for, as a shell's `>` waits.
#[cfg(unix)]
fn open_output(path: &Path) -> std::io::Result<(File, bool)> {
    use rustix::fs::{fcntl_getfl, fcntl_setfl, open, Mode, OFlags};
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC | OFlags::NOCTTY;
    let file = match open(
        path,
        flags | OFlags::NONBLOCK,
        Mode::from_bits_truncate(0o666),
    ) {
        Ok(fd) => {
            let file = File::from(fd);
            fcntl_setfl(&file, fcntl_getfl(&file)? - OFlags::NONBLOCK)?;
            file
        }
        // A FIFO that no one reads yet.
        Err(rustix::io::Errno::NXIO) => File::from(open(path, flags, Mode::empty())?),
        Err(e) => return Err(e.into()),
    };
    let regular = file.metadata()?.is_file();
    Ok((file, regular))
}

#[cfg(not(unix))]
fn open_output(path: &Path) -> std::io::Result<(File, bool)> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let regular = file.metadata()?.is_file();
    Ok((file, regular))
}

/// How `-p` shows the progress.
enum Progress {
    /// Not asked for (or `-q`).
    Off,
    /// A bar on standard error, a terminal.
    Bar(indicatif::ProgressBar),
    /// qemu-img's records, for scripts: `    (%3.2f/100%)\r` each time the progress grew by
    /// more than 1% (and at 0% and 100%), then `\n` at the end, as qemu-img's
    /// `qemu_progress_print` prints them on standard output.
    Percent {
        /// Standard error instead of standard output (which carries the disk).
        to_stderr: bool,
        /// The percentage last printed.
        last: f32,
    },
}

impl Progress {
    fn new(wanted: bool, total: u64, output_is_stdout: bool) -> Progress {
        if !wanted {
            return Progress::Off;
        }
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style);
            }
            return Progress::Bar(bar);
        }
        let shown = Progress::Percent {
            to_stderr: output_is_stdout,
            last: 0.0,
        };
        shown.print("    (0.00/100%)\r");
        shown
    }

    fn update(&mut self, done: u64, total: u64) {
        match self {
            Progress::Off => {}
            Progress::Bar(bar) => bar.set_position(done),
            Progress::Percent { last, .. } => {
                // Single precision, as qemu-img's `float` percentage.
                let current = if total == 0 {
                    100.0
                } else {
                    (100.0 * done as f64 / total as f64).min(100.0) as f32
                };
                if current > *last + 1.0 || (current == 100.0 && *last < 100.0) {
                    *last = current;
                    self.print(&format!("    ({:.2}/100%)\r", f64::from(current)));
                }
            }
        }
    }

    /// After the conversion: 100% if it completed, then the end of the line.
    fn end(mut self, completed: bool) {
        if completed {
            self.update(1, 1);
        }
        match &self {
            Progress::Off => {}
            Progress::Bar(bar) => bar.finish_and_clear(),
            Progress::Percent { .. } => self.print("\n"),
        }
    }

    /// Write a record and flush it; a closed stream is no error.
    fn print(&self, text: &str) {
        use std::io::Write;
        let written = match self {
            Progress::Percent {
                to_stderr: true, ..
            } => {
                let mut err = std::io::stderr().lock();
                err.write_all(text.as_bytes()).and_then(|()| err.flush())
            }
            _ => {
                let mut out = std::io::stdout().lock();
                out.write_all(text.as_bytes()).and_then(|()| out.flush())
            }
        };
        let _ = written;
    }
}

/// A `-S` size as qemu-img reads it ([`crate::common::cvtnum`]), a multiple of 512 up to
/// 16 MiB; else qemu-img's message.
fn parse_sparse_size(text: &str) -> Result<u64, String> {
    let bytes = crate::common::cvtnum("buffer size for sparse output", text)?;
    if bytes % SECTOR == 0 && bytes <= qcow2::MAX_SPARSE_SIZE {
        Ok(bytes)
    } else {
        Err(BAD_SPARSE_SIZE.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::parse_sparse_size;

    #[test]
    fn sparse_sizes_parse_like_qemu_img() {
        let parsed = |s| parse_sparse_size(s).ok();
        assert_eq!(parsed("0"), Some(0));
        assert_eq!(parsed("4k"), Some(4096));
        assert_eq!(parsed("4K"), Some(4096));
        assert_eq!(parsed("1M"), Some(1 << 20));
        assert_eq!(parsed("16M"), Some(16 << 20));
        assert_eq!(parsed("512b"), Some(512));
        assert_eq!(parsed("1.5k"), Some(1536));
        assert_eq!(parsed("0x1000"), Some(4096));
        assert_eq!(parsed("1000"), None);
        assert_eq!(parsed("17M"), None);
        assert_eq!(parsed("x"), None);
        assert_eq!(parsed("4kk"), None);
    }
}
