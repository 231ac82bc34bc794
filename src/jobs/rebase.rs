//! Change the backing file of an image, as `qemu-img rebase` does.
//!
//! Safe mode first makes the image independent of the difference between the old and the
//! new backing file: every stretch the image does not hold itself is read through the old
//! chain and through the new backing file, and the (sub)clusters that differ are written
//! into the image with the old content (zeros past the end of a shorter old backing file
//! as zero writes, as qemu-img writes them). The writes are flushed; then one write of the
//! header cluster names the new backing file and format, and a sync makes it durable. A
//! crash before that write leaves the old backing file named, under which the copied
//! clusters read as they did. Unsafe mode (`-u`) only changes the header.

use std::fmt;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use crate::base::io::{read_up_to, Storage};
use crate::error::{Error, Result};
use crate::format::header_edit::with_backing;
use crate::guest::disk::{GuestDisk, RawDisk};
use crate::image::open::resolve;
use crate::image::options::OpenOptions;
use crate::image::qcow2::Qcow2;
use crate::image::write::Writer;
use crate::jobs::commit::ProgressFn;

/// The most bytes compared at once (qemu-img's `IO_BUF_SIZE`).
const CHUNK: u64 = 2 << 20;

/// How [`rebase`] runs: the new backing file and its format, safe or unsafe, a progress
/// callback, and how the images are opened (secrets, limits, file policy).
///
/// ```
/// // qemu-img rebase -b base2.qcow2 -F qcow2 IMG
/// let options = qcow2::RebaseOptions::new()
///     .backing(Some("base2.qcow2".into()))
///     .backing_format("qcow2");
/// // qemu-img rebase -b "" IMG: no backing file after, the image holds everything
/// let standalone = qcow2::RebaseOptions::new().backing(None);
/// # let _ = (options, standalone);
/// ```
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct RebaseOptions {
    pub(crate) backing: Option<String>,
    pub(crate) format: Option<String>,
    pub(crate) unsafe_mode: bool,
    pub(crate) progress: Option<Arc<ProgressFn>>,
    pub(crate) open: OpenOptions,
}

impl fmt::Debug for RebaseOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RebaseOptions")
            .field("backing", &self.backing)
            .field("format", &self.format)
            .field("unsafe_mode", &self.unsafe_mode)
            .field("progress", &self.progress.is_some())
            .field("open", &self.open)
            .finish()
    }
}

impl RebaseOptions {
    /// Safe mode, no backing file after (`-b ""`) until [`RebaseOptions::backing`] names one.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The new backing file, recorded as given (`-b`; a relative name is relative to the
    /// image's directory, where safe mode opens it); `None` for none (`-b ""`).
    #[must_use]
    pub fn backing(mut self, name: Option<String>) -> Self {
        self.backing = name.filter(|n| !n.is_empty());
        self
    }

    /// The new backing file's format (`-F`): `qcow2` or `raw` (unsafe mode records any
    /// name). Required with a backing file, as in qemu-img.
    #[must_use]
    pub fn backing_format(mut self, format: impl Into<String>) -> Self {
        self.format = Some(format.into());
        self
    }

    /// Only change the header (`-u`): the old backing file is not opened (it may be
    /// missing), nor the new one, and nothing is copied; the guest then reads through the
    /// new backing file whatever it holds.
    #[must_use]
    pub fn unsafe_mode(mut self, yes: bool) -> Self {
        self.unsafe_mode = yes;
        self
    }

    /// Call `f(done, total)` as the comparison goes on (bytes of the image's guest).
    #[must_use]
    pub fn progress(mut self, f: impl Fn(u64, u64) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }

    /// Open the images with these options (secrets of encrypted images, limits, file
    /// policy); whether they say to write is ignored: the image is opened for writing, its
    /// backing files for reading.
    #[must_use]
    pub fn open_options(mut self, options: OpenOptions) -> Self {
        self.open = options;
        self
    }

    /// The backing format, checked as qemu-img checks it before changing the header.
    fn checked_format(&self) -> Result<Option<&str>> {
        match (&self.backing, &self.format) {
            (Some(_), None) => Err(Error::InvalidOption {
                option: "backing_fmt".to_owned(),
                message: "backing format must be specified".to_owned(),
            }),
            (None, _) => Ok(None),
            (Some(_), Some(f)) => Ok(Some(f.as_str())),
        }
    }
}

/// Give the image at `image` a new backing file (or none), as `qemu-img rebase` does: in
/// safe mode the guest it shows is the same before and after (see the module doc), in
/// unsafe mode only the header changes.
///
/// ```
/// use qcow2::positioned_io::ReadAt;
/// # let dir = std::env::temp_dir().join(format!("qcow2-doc-rebase-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// let (base, top) = (dir.join("base.qcow2"), dir.join("top.qcow2"));
/// qcow2::create(&base, &qcow2::CreateOptions::new(1 << 20))?;
/// let writer = qcow2::Qcow2::open_path_with(&base, &qcow2::OpenOptions::new().write(true))?
///     .into_writer()?;
/// writer.write_all_at(0, b"from the base")?;
/// writer.close()?;
/// qcow2::create(&top, &qcow2::CreateOptions::new(1 << 20).backing_file("base.qcow2").backing_format("qcow2"))?;
///
/// // No backing file any more: the top now holds what it read from the base.
/// qcow2::rebase(&top, &qcow2::RebaseOptions::new().backing(None))?;
///
/// let image = qcow2::Qcow2::open_path(&top)?;
/// assert_eq!(image.header().backing_file(), None);
/// let mut buf = [0u8; 13];
/// image.reader()?.read_exact_at(0, &mut buf)?;
/// assert_eq!(&buf, b"from the base");
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn rebase(image: impl AsRef<Path>, options: &RebaseOptions) -> Result<()> {
    let path = image.as_ref();
    options.checked_format()?;
    let open = options
        .open
        .clone()
        .write(true)
        .backing_as_zeros(options.unsafe_mode);
    let opened = Qcow2::open_path_with(path, &open)?;
    if options.unsafe_mode {
        return rebase_image(opened, None, options).map(drop);
    }
    let new = match &options.backing {
        Some(name) => Some(NewBacking::open(
            &resolve(path, Path::new(name))?,
            options.format.as_deref(),
            &options.open.clone().write(false),
        )?),
        None => None,
    };
    match &new {
        Some(NewBacking::Image(image)) => {
            let reader = image.reader()?;
            rebase_image(opened, Some(&reader), options)?;
        }
        Some(NewBacking::Raw(raw)) => {
            rebase_image(opened, Some(raw), options)?;
        }
        None => {
            rebase_image(opened, None, options)?;
        }
    }
    Ok(())
}

/// The new backing file, opened for the comparison.
enum NewBacking {
    Image(Box<Qcow2<File>>),
    Raw(RawDisk<File>),
}

impl NewBacking {
    fn open(path: &Path, format: Option<&str>, options: &OpenOptions) -> Result<NewBacking> {
        match format {
            Some("raw") => Ok(NewBacking::Raw(RawDisk::open_path(path)?)),
            Some("qcow2") => Ok(NewBacking::Image(Box::new(Qcow2::open_path_with(
                path, options,
            )?))),
            other => Err(Error::UnsupportedBackingFormat {
                format: other.unwrap_or_default().to_owned(),
                path: path.to_path_buf(),
            }),
        }
    }
}

/// [`rebase`] over an image already open for writing (any [`Storage`]): in safe mode with its
/// old backing chain attached ([`Qcow2::set_backing_image`]; an image that names a backing
/// file but has none attached fails to read it) and `new_backing` the disk the new backing
/// file shows (`None`: no backing file after). Returns the image as it now is.
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("qcow2-doc-rebase-image-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # let (base, top) = (dir.join("base.qcow2"), dir.join("top.qcow2"));
/// # qcow2::create(&base, &qcow2::CreateOptions::new(1 << 20))?;
/// # qcow2::create(&top, &qcow2::CreateOptions::new(1 << 20).backing_file("base.qcow2").backing_format("qcow2"))?;
/// let image = qcow2::Qcow2::open_path_with(&top, &qcow2::OpenOptions::new().write(true))?;
/// let image = qcow2::rebase_image(image, None, &qcow2::RebaseOptions::new())?;
/// assert_eq!(image.header().backing_file(), None);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn rebase_image<I: Storage>(
    image: Qcow2<I>,
    new_backing: Option<&dyn GuestDisk>,
    options: &RebaseOptions,
) -> Result<Qcow2<I>> {
    let format = options.checked_format()?;
    let mut image = if options.unsafe_mode {
        image
    } else {
        let old_end = image.backing_source().map_or(0, |b| b.guest_size());
        let writer = image.into_writer()?;
        copy_differences(&writer, old_end, new_backing, options)?;
        writer.close()?
    };
    switch_backing(&image, options.backing.as_deref(), format)?;
    image.reload()?;
    Ok(image)
}

/// Write into the image every unit (cluster, or subcluster with extended L2) it does not
/// hold whose old content differs from the new backing file's, then flush. The guest is
/// taken a chunk at a time: the units the image does not hold found first, then both
/// contents of the stretch that covers them read at once, into buffers used throughout.
fn copy_differences<I: Storage>(
    writer: &Writer<I>,
    old_end: u64,
    new: Option<&dyn GuestDisk>,
    options: &RebaseOptions,
) -> Result<()> {
    let size = writer.guest_size();
    let unit = write_unit(writer);
    let report = |done: u64| {
        if let Some(f) = &options.progress {
            f(done, size);
        }
    };
    report(0);
    let chunk = CHUNK.next_multiple_of(unit);
    let mut buffers = Buffers::default();
    let mut pos = 0u64;
    while pos < size {
        let end = pos.saturating_add(chunk).min(size);
        let holes = unallocated_units(writer, pos, end, unit)?;
        if let (Some(first), Some(last)) = (holes.first(), holes.last()) {
            let span = (first.0, last.1);
            buffers.read(writer, new, span, &holes)?;
            for &(from, to) in &holes {
                write_differences(writer, &buffers, span.0, (from, to), unit, old_end)?;
            }
        }
        pos = end;
        report(pos);
    }
    writer.flush()
}

/// The unit qemu-img rebase aligns its writes to: the cluster, or the subcluster.
fn write_unit<I: Storage>(writer: &Writer<I>) -> u64 {
    let cluster = writer.cluster_size();
    match writer.header().has_extended_l2() {
        true => (cluster / 32).max(1),
        false => cluster.max(1),
    }
}

/// The stretches of `pos..end` (unit-aligned, `pos` too) the image does not hold, widened to
/// whole units.
fn unallocated_units<I: Storage>(
    writer: &Writer<I>,
    pos: u64,
    end: u64,
    unit: u64,
) -> Result<Vec<(u64, u64)>> {
    let mut holes: Vec<(u64, u64)> = Vec::new();
    let mut at = pos;
    while at < end {
        let (allocated, run) = writer.is_allocated(at, end.saturating_sub(at))?;
        let run = run.max(1);
        if !allocated {
            let from = at.saturating_sub(at.checked_rem(unit).unwrap_or(0));
            let to = at
                .saturating_add(run)
                .checked_next_multiple_of(unit)
                .unwrap_or(end)
                .min(end);
            match holes.last_mut() {
                Some(last) if last.1 >= from => last.1 = last.1.max(to),
                _ => holes.push((from, to)),
            }
        }
        at = at.saturating_add(run);
    }
    Ok(holes)
}

/// The old and the new content of one stretch, in buffers kept from chunk to chunk.
#[derive(Default)]
struct Buffers {
    old: Vec<u8>,
    new: Vec<u8>,
}

impl Buffers {
    /// Read the `holes` of `start..end` through the image (its old chain) and from the new
    /// backing file (zeros without one).
    fn read<I: Storage>(
        &mut self,
        writer: &Writer<I>,
        new: Option<&dyn GuestDisk>,
        (start, end): (u64, u64),
        holes: &[(u64, u64)],
    ) -> Result<()> {
        let len = usize::try_from(end.saturating_sub(start))
            .map_err(|_| Error::Internal("a rebase chunk larger than memory"))?;
        self.old.resize(len, 0);
        self.new.resize(len, 0);
        for &(from, to) in holes {
            let range = usize::try_from(from.saturating_sub(start)).unwrap_or(len)
                ..usize::try_from(to.saturating_sub(start)).unwrap_or(len);
            let old = self
                .old
                .get_mut(range.clone())
                .ok_or(Error::Internal("a hole outside its chunk"))?;
            writer.read_exact_at(from, old)?;
            let fresh = self
                .new
                .get_mut(range)
                .ok_or(Error::Internal("a hole outside its chunk"))?;
            match new {
                Some(disk) => disk.read_disk(from, fresh)?,
                None => fresh.fill(0),
            }
        }
        Ok(())
    }
}

/// Compare the units of `from..to` (inside the buffers, which start at `base`) and write the
/// old content of each run of units that differ.
fn write_differences<I: Storage>(
    writer: &Writer<I>,
    buffers: &Buffers,
    base: u64,
    (from, to): (u64, u64),
    unit: u64,
    old_end: u64,
) -> Result<()> {
    let offset = |at: u64| usize::try_from(at.saturating_sub(base)).unwrap_or(usize::MAX);
    let differs = |a: u64| {
        let b = a.saturating_add(unit).min(to);
        buffers.old.get(offset(a)..offset(b)) != buffers.new.get(offset(a)..offset(b))
    };
    let mut at = from;
    while at < to {
        if !differs(at) {
            at = at.saturating_add(unit);
            continue;
        }
        let first = at;
        while at < to && differs(at) {
            at = at.saturating_add(unit);
        }
        let end = at.min(to);
        let old = buffers
            .old
            .get(offset(first)..offset(end))
            .unwrap_or_default();
        write_old(writer, first, old, old_end)?;
    }
    Ok(())
}

/// Write `bytes` (old content) at `pos`: past the end of the old backing file, where the
/// old content is zeros for want of data, as a zero write (qemu-img's `old_backing_eof`).
fn write_old<I: Storage>(writer: &Writer<I>, pos: u64, bytes: &[u8], old_end: u64) -> Result<()> {
    let split = usize::try_from(old_end.saturating_sub(pos))
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    let (data, zeros) = bytes.split_at(split);
    if !data.is_empty() {
        writer.write_all_at(pos, data)?;
    }
    if !zeros.is_empty() {
        writer.write_zeroes(pos.saturating_add(split as u64), zeros.len() as u64, false)?;
    }
    Ok(())
}

/// Name the new backing file and format in the header: the header cluster rebuilt, the bytes
/// that changed written at once, then synced.
fn switch_backing<I: Storage>(
    image: &Qcow2<I>,
    name: Option<&str>,
    format: Option<&str>,
) -> Result<()> {
    let len = usize::try_from(image.cluster_size())
        .map_err(|_| Error::Internal("a cluster larger than memory"))?;
    let mut cluster0 = vec![0u8; len];
    let got = read_up_to(&image.io, 0, &mut cluster0)
        .map_err(|e| Error::io("reading the header cluster", e))?;
    cluster0.truncate(got);
    let new = with_backing(&cluster0, name.map(str::as_bytes), format)?;
    let Some(first) = cluster0.iter().zip(&new).position(|(a, b)| a != b) else {
        return Ok(());
    };
    let last = cluster0
        .iter()
        .zip(&new)
        .rposition(|(a, b)| a != b)
        .unwrap_or(first);
    let changed = new
        .get(first..=last)
        .ok_or(Error::Internal("header change out of range"))?;
    image
        .io
        .write_all_at(first as u64, changed)
        .map_err(|e| Error::io("writing the header", e))?;
    image
        .io
        .sync()
        .map_err(|e| Error::io("syncing the header", e))
}
