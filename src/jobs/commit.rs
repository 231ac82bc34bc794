//! Merge an overlay into a layer below it, as `qemu-img commit` does.
//!
//! Every stretch that a layer above the base decides (data or zeros) is written into the
//! base through its [`Writer`]: data as data, zeros as zeros (unmapped), as QEMU's commit
//! job (the mirror job of an active commit) writes them; the base grows first when it is
//! shorter than the top. The base is flushed, then the top is emptied (every cluster
//! dropped, as `qemu-img commit` leaves it) unless it is kept (`-d`, implied by `-b`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use positioned_io::ReadAt;

use crate::base::io::Storage;
use crate::error::{Error, Result};
use crate::format::header::at;
use crate::format::new_header::put;
use crate::guest::chain::{self, Found};
use crate::image::layer::Below;
use crate::image::open::canonical;
use crate::image::options::OpenOptions;
use crate::image::qcow2::Qcow2;
use crate::image::reader::Reader;
use crate::image::rewrite::{l1_bytes, Rewrite};
use crate::image::write::Writer;
use crate::jobs::snapshot::count_mapping;

/// The most bytes copied at once (qemu-img commit copies 512 KiB at a time; larger reads
/// cost fewer calls).
const CHUNK: u64 = 2 << 20;

/// The smallest block of QEMU's dirty bitmap (`bdrv_get_default_bitmap_granularity`).
const MIN_GRANULE: u64 = 4096;

/// A progress callback: bytes done and bytes in all.
pub(crate) type ProgressFn = dyn Fn(u64, u64) + Send + Sync;

/// How [`commit`] runs: which layer receives the data, whether the top is emptied after, a
/// progress callback, and how the images are opened (secrets, limits, file policy).
///
/// ```
/// let options = qcow2::CommitOptions::new()
///     .keep_top(true) // qemu-img commit -d
///     .progress(|done, total| eprintln!("{done}/{total}"));
/// # let _ = options;
/// ```
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct CommitOptions {
    pub(crate) base: Option<PathBuf>,
    pub(crate) keep_top: bool,
    pub(crate) progress: Option<Arc<ProgressFn>>,
    pub(crate) open: OpenOptions,
}

impl fmt::Debug for CommitOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommitOptions")
            .field("base", &self.base)
            .field("keep_top", &self.keep_top)
            .field("progress", &self.progress.is_some())
            .field("open", &self.open)
            .finish()
    }
}

impl CommitOptions {
    /// Commit into the top's immediate backing file, then empty the top.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Commit into this image of the top's backing chain instead (`qemu-img commit -b`):
    /// every layer above it is merged into it. As in qemu-img, naming a base keeps the top
    /// as it is ([`CommitOptions::keep_top`]): the layers between would no longer read
    /// right over an emptied top. The name matches a layer by the name its overlay records,
    /// or as a path to the same file (a relative one is relative to the top's directory, as
    /// qemu-img takes it).
    #[must_use]
    pub fn base(mut self, base: impl Into<PathBuf>) -> Self {
        self.base = Some(base.into());
        self
    }

    /// Leave the top image as it is after the commit (`qemu-img commit -d`) instead of
    /// emptying it.
    #[must_use]
    pub fn keep_top(mut self, yes: bool) -> Self {
        self.keep_top = yes;
        self
    }

    /// Call `f(done, total)` as the copy goes on (bytes of the top's guest).
    #[must_use]
    pub fn progress(mut self, f: impl Fn(u64, u64) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }

    /// Open the images with these options (secrets of encrypted images, limits, file
    /// policy); whether they say to write is ignored: the base is opened for writing, the
    /// layers above it for reading.
    #[must_use]
    pub fn open_options(mut self, options: OpenOptions) -> Self {
        self.open = options;
        self
    }
}

/// Write the data of the image at `top` into a layer of its backing chain (its backing file,
/// or [`CommitOptions::base`]), then empty the top unless it is kept, as `qemu-img commit`
/// does. The guest the top shows does not change; the base then shows it too.
///
/// Fails before writing anything when the top has no backing file, when the named base is
/// not in its chain, or when the base is not a qcow2 image (the crate writes only qcow2).
///
/// ```
/// use qcow2::positioned_io::ReadAt;
/// # let dir = std::env::temp_dir().join(format!("qcow2-doc-commit-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// let (base, top) = (dir.join("base.qcow2"), dir.join("top.qcow2"));
/// qcow2::create(&base, &qcow2::CreateOptions::new(1 << 20))?;
/// qcow2::create(&top, &qcow2::CreateOptions::new(1 << 20).backing_file("base.qcow2").backing_format("qcow2"))?;
/// let writer = qcow2::Qcow2::open_path_with(&top, &qcow2::OpenOptions::new().write(true))?
///     .into_writer()?;
/// writer.write_all_at(4096, b"committed")?;
/// writer.close()?;
///
/// qcow2::commit(&top, &qcow2::CommitOptions::new())?;
///
/// let mut buf = [0u8; 9];
/// qcow2::Qcow2::open_path(&base)?.reader()?.read_exact_at(4096, &mut buf)?;
/// assert_eq!(&buf, b"committed");
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn commit(top: impl AsRef<Path>, options: &CommitOptions) -> Result<()> {
    let top = top.as_ref();
    let read = options.open.clone().write(false);
    let chain = Qcow2::open_path_with(top, &read)?;
    let (depth, base_path) = find_base(&chain, top, options.base.as_deref())?;
    let base = Qcow2::open_path_with(&base_path, &options.open.clone().write(true))?;
    let base = base.into_writer()?;
    commit_into(&chain.reader()?, depth, &base, options)?;
    base.close()?;
    // The chain holds the base's file open: closed after the base's writer, whose lock
    // closing any descriptor of the file would drop.
    drop(chain);
    if options.keep_top || options.base.is_some() {
        return Ok(());
    }
    let mut top_image = Qcow2::open_path_with(top, &options.open.clone().write(true))?;
    top_image.make_empty()
}

/// Write what the layers above depth `base_depth` of `top`'s chain decide into `base`, the
/// writer on the image at that depth, and flush it: the part of [`commit`] that copies, over
/// images already open (any [`Storage`]). `base` grows to the top's size first when shorter.
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("qcow2-doc-commit-into-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # let (base, top) = (dir.join("base.qcow2"), dir.join("top.qcow2"));
/// # qcow2::create(&base, &qcow2::CreateOptions::new(1 << 20))?;
/// # qcow2::create(&top, &qcow2::CreateOptions::new(1 << 20).backing_file("base.qcow2").backing_format("qcow2"))?;
/// let chain = qcow2::Qcow2::open_path(&top)?;
/// let writer = qcow2::Qcow2::open_path_with(&base, &qcow2::OpenOptions::new().write(true))?
///     .into_writer()?;
/// qcow2::commit_into(&chain.reader()?, 1, &writer, &qcow2::CommitOptions::new())?;
/// writer.close()?;
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn commit_into<I: ReadAt + Send + Sync, B: Storage>(
    top: &Reader<'_, I>,
    base_depth: u32,
    base: &Writer<B>,
    options: &CommitOptions,
) -> Result<()> {
    if base_depth == 0 {
        return Err(Error::InvalidOption {
            option: "base".to_owned(),
            message: "the base must lie below the top image".to_owned(),
        });
    }
    let size = top.guest_size();
    if base.guest_size() < size {
        base.resize(size)?;
    }
    let report = |done: u64| {
        if let Some(f) = &options.progress {
            f(done, size);
        }
    };
    report(0);
    let granule = base.cluster_size().max(MIN_GRANULE);
    let runs = dirty_runs(top, base_depth, granule)?;
    // The top is read on a thread of its own, a few steps ahead of the writes into the
    // base (QEMU's mirror keeps several requests in flight too).
    let (steps_out, steps_in) = mpsc::sync_channel::<Result<Step>>(STEPS_AHEAD);
    let (spent_out, spent_in) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        scope.spawn(move || read_steps(top, &runs, granule, &steps_out, &spent_in));
        for step in steps_in {
            let step = step?;
            match step.data {
                Some(buf) => {
                    base.write_all_at(step.pos, &buf)?;
                    let _ = spent_out.send(buf);
                }
                None => base.write_zeroes(step.pos, step.len, true)?,
            }
            report(step.pos.saturating_add(step.len));
        }
        Ok::<(), Error>(())
    })?;
    report(size);
    base.flush()
}

/// The runs of `granule`-sized blocks (QEMU's dirty bitmap of the commit, cut at the base's
/// cluster size and at least 4 KiB) that hold something a layer above depth `base_depth`
/// decides, in order, merged.
fn dirty_runs<I: ReadAt>(
    top: &Reader<'_, I>,
    base_depth: u32,
    granule: u64,
) -> Result<Vec<(u64, u64)>> {
    let size = top.guest_size();
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let found = chain::walk(top, pos, CHUNK.min(size.saturating_sub(pos)))?;
        let len = found.layer.extent.length.max(1);
        let end = pos.saturating_add(len).min(size);
        if decided_above(found.found, found.depth, base_depth) {
            let from = pos.saturating_sub(pos.checked_rem(granule).unwrap_or(0));
            let to = end
                .checked_next_multiple_of(granule)
                .unwrap_or(end)
                .min(size);
            match runs.last_mut() {
                Some(last) if last.1 >= from => last.1 = last.1.max(to),
                _ => runs.push((from, to)),
            }
        }
        pos = end;
    }
    Ok(runs)
}

/// Steps read ahead of the writes.
const STEPS_AHEAD: usize = 2;

/// One step of QEMU's mirror: `len` bytes at `pos`, as data read from the top, or zeros.
struct Step {
    pos: u64,
    len: u64,
    data: Option<Vec<u8>>,
}

/// Read the steps of every dirty run in order and send them (an error ends it; so does a
/// writer that stopped listening). Buffers come back through `spent` to be used again.
fn read_steps<I: ReadAt>(
    top: &Reader<'_, I>,
    runs: &[(u64, u64)],
    granule: u64,
    steps: &mpsc::SyncSender<Result<Step>>,
    spent: &mpsc::Receiver<Vec<u8>>,
) {
    for &(start, end) in runs {
        let mut pos = start;
        while pos < end {
            let buf = spent.try_recv().unwrap_or_default();
            let step = mirror_step(top, pos, end, granule, buf);
            let len = step.as_ref().map_or(0, |s| s.len);
            let failed = step.is_err();
            if steps.send(step).is_err() || failed {
                return;
            }
            pos = pos.saturating_add(len.max(1));
        }
    }
}

/// One step of QEMU's mirror over the dirty run `pos..end`: the chain's status at `pos`
/// decides: whole granules that read as zeros without data are written as zeros (unmapped),
/// anything else is copied as data (read here into `buf`), a granule at least.
fn mirror_step<I: ReadAt>(
    top: &Reader<'_, I>,
    pos: u64,
    end: u64,
    granule: u64,
    mut buf: Vec<u8>,
) -> Result<Step> {
    let left = end.saturating_sub(pos);
    let found = chain::walk(top, pos, CHUNK.max(granule).min(left))?;
    let status = chain::block_status(&found);
    let len = found.layer.extent.length.max(1).min(left);
    let whole = len.saturating_sub(len.checked_rem(granule).unwrap_or(0));
    if status.zero && !status.data && whole > 0 {
        return Ok(Step {
            pos,
            len: whole,
            data: None,
        });
    }
    let n = whole.max(granule).min(left).min(CHUNK.max(granule));
    let bytes =
        usize::try_from(n).map_err(|_| Error::Internal("a copy chunk larger than memory"))?;
    buf.resize(bytes, 0);
    top.read_guest(pos, &mut buf)?;
    Ok(Step {
        pos,
        len: n,
        data: Some(buf),
    })
}

/// Whether a layer above depth `base_depth` decides a stretch the walk found at `depth`:
/// one that has it, or (QEMU's `bdrv_is_allocated_above`) a shorter layer above the base
/// past whose end it lies, which reads it as zeros.
fn decided_above(found: Found, depth: u32, base_depth: u32) -> bool {
    match found {
        Found::Here => depth < base_depth,
        Found::PastShorterLayer => depth.saturating_add(1) < base_depth,
        Found::Nowhere => false,
    }
}

/// The depth and path of the base: the top's backing file, or the layer `named`.
fn find_base<I: ReadAt>(
    chain: &Qcow2<I>,
    top: &Path,
    named: Option<&Path>,
) -> Result<(u32, PathBuf)> {
    let refuse = |message: String| Error::InvalidOption {
        option: "base".to_owned(),
        message,
    };
    if chain.header().backing_file().is_none() {
        return Err(refuse("Image does not have a backing file".to_owned()));
    }
    let mut layer = match chain.below() {
        Below::Layer(layer) => layer,
        Below::Missing(name) => {
            return Err(Error::BackingMissing {
                name: name.to_owned(),
            })
        }
        Below::Nothing => return Err(refuse("Image does not have a backing file".to_owned())),
    };
    let mut recorded = chain.header().backing_file().map(str::to_owned);
    let mut depth = 1u32;
    let wanted = named.map(|n| Wanted::new(n, top));
    loop {
        let here = layer.path().map(Path::to_path_buf);
        let matches = match &wanted {
            None => true,
            Some(w) => w.matches(recorded.as_deref(), here.as_deref()),
        };
        if matches {
            if layer.as_image().is_none() {
                return Err(Error::UnsupportedWrite {
                    what: "committing into a raw backing file".to_owned(),
                });
            }
            let path = here.ok_or(Error::Internal("a backing layer opened without a path"))?;
            return Ok((depth, path));
        }
        recorded = layer
            .as_image()
            .and_then(|image| image.header().backing_file().map(str::to_owned));
        layer = match layer.below() {
            Below::Layer(next) => next,
            _ => break,
        };
        depth = depth.saturating_add(1);
    }
    Err(refuse(format!(
        "Did not find '{}' in the backing chain of '{}'",
        named.unwrap_or(Path::new("")).display(),
        top.display()
    )))
}

/// A base named by the caller, as QEMU's `bdrv_find_backing_image` matches it: the name an
/// overlay records, or the same file by path (a relative name is relative to the top's
/// directory).
struct Wanted {
    name: PathBuf,
    file: Option<PathBuf>,
}

impl Wanted {
    fn new(name: &Path, top: &Path) -> Wanted {
        let file = top
            .parent()
            .map(|dir| dir.join(name))
            .and_then(|p| canonical(&p).ok());
        Wanted {
            name: name.to_path_buf(),
            file,
        }
    }

    fn matches(&self, recorded: Option<&str>, path: Option<&Path>) -> bool {
        recorded.is_some_and(|r| Path::new(r) == self.name)
            || path
                .and_then(|p| canonical(p).ok())
                .is_some_and(|p| self.file.as_ref() == Some(&p))
    }
}

impl<S: Storage> Qcow2<S> {
    /// Drop everything the image holds, as QEMU's `bdrv_make_empty` leaves an overlay after
    /// `qemu-img commit`: every stretch unallocated, reading from the backing file again
    /// (snapshots and bitmaps kept). The image must be open for writing
    /// ([`OpenOptions::write`](crate::OpenOptions::write)) and no [`Writer`] open on it.
    ///
    /// It lands whole or not at all: an empty active L1 table is written into free
    /// clusters, then one header write switches to it and to refcounts without the dropped
    /// clusters. A crash before leaves the image as it was. The (empty) tables then move
    /// down into the space freed, the same way, and the file is cut after its last cluster
    /// in use.
    ///
    /// ```
    /// # let dir = std::env::temp_dir().join(format!("qcow2-doc-empty-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir)?;
    /// # let path = dir.join("disk.qcow2");
    /// qcow2::create(&path, &qcow2::CreateOptions::new(1 << 20))?;
    /// let options = qcow2::OpenOptions::new().write(true);
    /// let disk = qcow2::Qcow2::open_path_with(&path, &options)?.into_writer()?;
    /// disk.write_all_at(0, b"gone soon")?;
    /// let mut image = disk.close()?;
    /// image.make_empty()?;
    /// assert!(image.reader()?.map(..).all(|e| e.map_or(false, |e| !e.present)));
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn make_empty(&mut self) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        self.repair_if_dirty()?;
        if self.l1.iter().all(|&entry| entry == 0) {
            return Ok(());
        }
        let active = self.l1.to_vec();
        self.replace_l1_with_zeros(|image, rw| count_mapping(image, rw, &active, -1))?;
        // Everything dropped lies free below the new tables, which went where the old
        // structures left no room: moved down again, the file ends sooner.
        self.replace_l1_with_zeros(|_, _| Ok(()))?;
        self.cut_free_tail()
    }

    /// One [`Rewrite`]: `drop` takes away references, the active L1 table is replaced by an
    /// empty one in free clusters (the refcounts moved with it), one header write.
    fn replace_l1_with_zeros(
        &mut self,
        drop: impl FnOnce(&Self, &mut Rewrite<'_, S>) -> Result<()>,
    ) -> Result<()> {
        let l1_size = self.header.l1_size();
        let mut rw = Rewrite::new(self)?;
        drop(self, &mut rw)?;
        rw.release(self.header.l1_table_offset(), l1_bytes(l1_size));
        let bytes = usize::try_from(l1_bytes(l1_size))
            .map_err(|_| Error::Internal("an L1 table larger than memory"))?;
        let empty = rw.allocate(l1_bytes(l1_size))?;
        rw.write(empty, &vec![0u8; bytes])?;
        rw.commit(|header| {
            put(header, at::L1_TABLE_OFFSET, &empty.to_be_bytes());
            Ok(())
        })?;
        self.reload()
    }

    /// Shorten the file to the end of its last cluster in use (what lies past it is
    /// referenced by nothing), as qemu-img leaves an emptied image small.
    fn cut_free_tail(&mut self) -> Result<()> {
        let len = self
            .io
            .length()
            .map_err(|e| Error::io("reading the image file's length", e))?;
        let cluster = self.cluster_size();
        let rw = Rewrite::new(self)?;
        let mut end = len.next_multiple_of(cluster);
        while end > cluster && rw.refcount(end.saturating_sub(cluster)) == 0 {
            end = end.saturating_sub(cluster);
        }
        drop(rw);
        if end >= len {
            return Ok(());
        }
        self.io
            .set_len(end)
            .map_err(|e| Error::io("shortening the emptied image", e))?;
        self.io
            .sync()
            .map_err(|e| Error::io("syncing the emptied image", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stretch_is_committed_when_a_layer_above_the_base_decides_it() {
        // Base at depth 2: layers 0 and 1 are above it.
        assert!(decided_above(Found::Here, 0, 2));
        assert!(decided_above(Found::Here, 1, 2));
        assert!(!decided_above(Found::Here, 2, 2));
        assert!(!decided_above(Found::Here, 3, 2));
        // Past the end of layer 1 (asked last at depth 0): zeros decided above the base.
        assert!(decided_above(Found::PastShorterLayer, 0, 2));
        // Past the end of the base itself: the base decides.
        assert!(!decided_above(Found::PastShorterLayer, 1, 2));
        assert!(!decided_above(Found::Nowhere, 0, 2));
    }
}
