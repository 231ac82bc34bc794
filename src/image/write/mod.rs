//! Writing into an image: [`Writer`], the handle [`Qcow2::into_writer`] gives.
//!
//! The writer keeps the active L1 table, the L2 tables it uses and the refcount blocks in
//! memory (`tables.rs`, `refcounts.rs`), changes them there as the guest is written
//! (`guest.rs`), and writes them back in the order that keeps every crash harmless
//! (`writeback.rs`) when flushed, when they outgrow their budget, and when closed.

pub(crate) mod bitmap_ops;
pub(crate) mod bitmaps;
pub(crate) mod space;

mod guest;
mod recount;
mod refcounts;
mod shrink;
mod subclusters;
mod tables;
mod writeback;
mod zeroes;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use positioned_io::{ReadAt, Size};

use crate::base::io::Storage;
use crate::error::{Error, Result};
use crate::format::feature::{AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_DIRTY};
use crate::format::header::Header;
use crate::format::refcount::RefcountLayout;
use crate::image::qcow2::Qcow2;
use crate::image::reader::ReadState;
use bitmaps::Bitmaps;
use guest::{Guest, Step};
use refcounts::Refcounts;
use tables::Tables;
use writeback::{barrier, write, Metadata};

/// Header bytes 72-79 and 88-95 (version 3): the incompatible and autoclear feature bits.
const INCOMPATIBLE_FIELD: u64 = 72;
/// Header bytes 24-31: the guest size; 36-47: the L1 table's entries (4 bytes) and offset.
const SIZE_FIELD: u64 = 24;
const L1_FIELDS: u64 = 36;
const AUTOCLEAR_FIELD: u64 = 88;

/// An image open for writing: reads what was written, writes at any offset and length,
/// writes zeros, discards, and flushes. Made by [`Qcow2::into_writer`] from an image opened
/// with [`OpenOptions::write`](crate::OpenOptions::write).
///
/// It implements [`positioned_io::ReadAt`] and [`positioned_io::WriteAt`] (also for
/// `&Writer`: any number of threads may read and write through one writer at once; they take
/// turns on its metadata), and its own methods take `&self` and return this crate's
/// [`Error`].
///
/// Writes reach the file at once, but the tables that map them only at [`Writer::flush`],
/// [`Writer::close`] or when the writer's table cache is full: a crash in between loses the
/// writes since the last flush and leaves the image as it was then (never corrupt). Dropping
/// a writer closes it, ignoring errors: call [`Writer::close`] to see them.
///
/// ```
/// use qcow2::positioned_io::ReadAt;
/// # let dir = std::env::temp_dir().join(format!("qcow2-doc-writer-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # let path = dir.join("disk.qcow2");
/// qcow2::create(&path, &qcow2::CreateOptions::new(1 << 30))?;
///
/// let options = qcow2::OpenOptions::new().write(true);
/// let disk = qcow2::Qcow2::open_path_with(&path, &options)?.into_writer()?;
/// disk.write_all_at(1 << 20, b"hello, disk")?;
/// disk.flush()?; // durable from here on
///
/// let mut back = [0u8; 11];
/// disk.read_exact_at(1 << 20, &mut back)?;
/// assert_eq!(&back, b"hello, disk");
/// let image = disk.close()?; // everything written back
/// assert_eq!(image.guest_size(), 1 << 30);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Writer<I: Storage> {
    /// Taken out by [`Writer::close`]; always there before.
    image: Option<Qcow2<I>>,
    /// Held shared by every read and write of the guest, exclusively by a flush: clusters
    /// freed by a write are handed out again only after a flush, so none is reused while
    /// a read or an in-place write planned on it is under way.
    gate: RwLock<()>,
    meta: Mutex<Metadata>,
    /// The persistent dirty bitmaps, kept up to date (`None`: the image has none).
    bitmaps: Mutex<Option<Bitmaps>>,
    read_state: ReadState,
    header: Mutex<Header>,
    guest_size: AtomicU64,
    cluster_size: u64,
}

impl<I: Storage> std::fmt::Debug for Writer<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("guest_size", &self.guest_size())
            .field("cluster_size", &self.cluster_size)
            .finish_non_exhaustive()
    }
}

impl<I: Storage> Qcow2<I> {
    /// Turn an image opened with [`OpenOptions::write`](crate::OpenOptions::write) into a
    /// [`Writer`]. Fails with [`Error::ReadOnly`] for an image opened for reading only, and
    /// with [`Error::UnsupportedWrite`] for what the writer does not handle yet.
    ///
    /// Like QEMU opening an image for writing, it clears the autoclear feature bits it does
    /// not maintain, marks the persistent dirty bitmaps in use until it is closed (enabled
    /// ones then record every write, zero write and discard, and are stored back at close;
    /// one found in use, left by a crash, is kept as it is, as QEMU keeps it), and sets the
    /// dirty bit of an image with lazy refcounts until it is closed.
    pub fn into_writer(self) -> Result<Writer<I>> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        refuse_unsupported(&self)?;
        if let Some(crypt) = &self.crypt {
            crypt.check_unlocked()?;
        }
        let header = self.header.clone();
        let (mut meta, file_len) = load_metadata(&self)?;
        if header.is_dirty() {
            // Refcounts left unwritten by a crash (lazy refcounts): counted again first,
            // as QEMU repairs a dirty image it opens for writing.
            recount::rebuild(&self, &mut meta.refs, file_len)?;
            meta.flush(&self.io, self.data_storage.as_deref())?;
        }
        let mut bitmaps = Bitmaps::load(&self)?;
        mark_open(&self.io, &header, bitmaps.is_some())?;
        if let Some(bitmaps) = bitmaps.as_mut() {
            bitmaps.mark_in_use(&mut space::FileSpace {
                io: &self.io,
                meta: &mut meta,
                data: self.data_storage.as_deref(),
                cluster_bits: header.cluster_bits(),
            })?;
        }
        let header = read_back_header(&self)?;
        Ok(Writer {
            bitmaps: Mutex::new(bitmaps),
            guest_size: AtomicU64::new(self.guest_size()),
            cluster_size: self.cluster_size(),
            meta: Mutex::new(meta),
            read_state: ReadState::new(),
            gate: RwLock::new(()),
            header: Mutex::new(header),
            image: Some(self),
        })
    }
}

/// The refcounts and tables of `image` as a writer keeps them, and the file's length.
fn load_metadata<I: Storage>(image: &Qcow2<I>) -> Result<(Metadata, u64)> {
    let header = &image.header;
    let file_len = image
        .io
        .length()
        .map_err(|e| Error::io("reading the image file's length", e))?;
    let layout = RefcountLayout {
        cluster_bits: header.cluster_bits(),
        order: header.refcount_order(),
    };
    let mut refs = Refcounts::load(
        &image.io,
        layout,
        header.refcount_table_offset(),
        u64::from(header.refcount_table_clusters()),
        file_len,
        &image.limits,
    )?;
    protect_metadata(image, &mut refs)?;
    let tables = Tables::new(
        image.geometry,
        image.l1.to_vec(),
        header.l1_table_offset(),
        image
            .limits
            .l2_cache_bytes
            .max(image.cluster_size().saturating_mul(4)),
    );
    let meta = Metadata {
        tables,
        refs,
        unsynced: false,
        file_len,
    };
    Ok((meta, file_len))
}

impl<I: Storage> Qcow2<I> {
    /// Count the refcounts of a dirty image (lazy refcounts, its writer killed) again and
    /// clear the dirty bit, as opening a writer does; the jobs that change metadata run
    /// on clean refcounts.
    pub(crate) fn repair_if_dirty(&mut self) -> Result<()> {
        if !self.header.is_dirty() {
            return Ok(());
        }
        let (mut meta, file_len) = load_metadata(self)?;
        recount::rebuild(self, &mut meta.refs, file_len)?;
        meta.flush(&self.io, self.data_storage.as_deref())?;
        let incompatible = self.header.incompatible_features() & !INCOMPAT_DIRTY;
        write(
            &self.io,
            INCOMPATIBLE_FIELD,
            &incompatible.to_be_bytes(),
            "header",
        )?;
        barrier(&self.io)?;
        self.reload()
    }
}

/// Tell the allocator where the metadata is (see [`Refcounts::protect`]).
fn protect_metadata<I: Storage>(image: &Qcow2<I>, refs: &mut Refcounts) -> Result<()> {
    let header = &image.header;
    let cluster = image.cluster_size();
    refs.protect(0, cluster);
    refs.protect(
        header.l1_table_offset(),
        u64::from(header.l1_size()).saturating_mul(8),
    );
    let (table, clusters) = refs.table_location();
    refs.protect(table, clusters.saturating_mul(cluster));
    for block in refs.blocks()? {
        refs.protect(block, cluster);
    }
    for entry in image.l1.iter() {
        let l2 = entry & crate::format::table::L1_OFFSET_MASK;
        if l2 != 0 {
            refs.protect(l2, cluster);
        }
    }
    let (table_at, table_len) = crate::image::rewrite::snapshot_table_extent(image)?;
    refs.protect(table_at, table_len);
    for snap in &image.snapshots {
        refs.protect(
            snap.l1_table_offset,
            u64::from(snap.l1_size).saturating_mul(8),
        );
    }
    if let Some(ext) = header.bitmaps() {
        refs.protect(ext.directory_offset, ext.directory_size);
    }
    for b in &image.bitmaps {
        refs.protect(b.table_offset, u64::from(b.table_size).saturating_mul(8));
    }
    if let Some(e) = header.encryption() {
        refs.protect(e.offset, e.length);
    }
    Ok(())
}

/// What the writer does not handle yet.
fn refuse_unsupported<I>(image: &Qcow2<I>) -> Result<()> {
    let header = &image.header;
    let what = if header.has_data_file_bit() && image.data_storage.is_none() {
        Some("an external data file attached for reading only (open the image by path to write its data file)")
    } else {
        None
    };
    match what {
        Some(what) => Err(Error::UnsupportedWrite {
            what: what.to_owned(),
        }),
        None => Ok(()),
    }
}

/// What QEMU changes in the header when it opens an image for writing: autoclear bits it
/// does not maintain cleared (here: all but the raw data file bit, and the bitmaps bit when
/// the bitmaps are kept), and the dirty bit set
/// for lazy refcounts. Durable before the first write.
fn mark_open<I: Storage>(io: &I, header: &Header, keeps_bitmaps: bool) -> Result<()> {
    if header.version() < 3 {
        return Ok(());
    }
    let kept = if keeps_bitmaps {
        AUTOCLEAR_DATA_FILE_RAW | AUTOCLEAR_BITMAPS
    } else {
        AUTOCLEAR_DATA_FILE_RAW
    };
    let autoclear = header.autoclear_features() & kept;
    let mut changed = false;
    if autoclear != header.autoclear_features() {
        write(io, AUTOCLEAR_FIELD, &autoclear.to_be_bytes(), "header")?;
        changed = true;
    }
    if header.has_lazy_refcounts() {
        let incompatible = header.incompatible_features() | INCOMPAT_DIRTY;
        write(
            io,
            INCOMPATIBLE_FIELD,
            &incompatible.to_be_bytes(),
            "header",
        )?;
        changed = true;
    }
    if changed {
        barrier(io)?;
    }
    Ok(())
}

/// The header as the file holds it now.
fn read_back_header<I: Storage>(image: &Qcow2<I>) -> Result<Header> {
    crate::image::qcow2::read_header(&image.io, &image.limits)
}

impl<I: Storage> Writer<I> {
    fn image(&self) -> Result<&Qcow2<I>> {
        self.image
            .as_ref()
            .ok_or(Error::Internal("the writer is closed"))
    }

    fn meta(&self) -> MutexGuard<'_, Metadata> {
        self.meta.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bitmaps(&self) -> MutexGuard<'_, Option<Bitmaps>> {
        self.bitmaps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Set the dirty bits of `len` bytes at `pos`, before the write (QEMU records a write
    /// that fails too).
    fn record(&self, pos: u64, len: u64) {
        if let Some(bitmaps) = self.bitmaps().as_mut() {
            bitmaps.record(pos, len);
        }
    }

    fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn guest(&self) -> Result<Guest<'_, I>> {
        Ok(Guest {
            image: self.image()?,
            state: &self.read_state,
            size: self.guest_size(),
        })
    }

    /// Guest size in bytes.
    pub fn guest_size(&self) -> u64 {
        self.guest_size.load(Ordering::Acquire)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// The header as it stands in the file (its feature bits and table offsets change as the
    /// image is written).
    pub fn header(&self) -> Header {
        self.header
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Check that `len` bytes at `pos` lie within the guest.
    fn within(&self, pos: u64, len: u64) -> Result<()> {
        match pos.checked_add(len) {
            Some(end) if end <= self.guest_size() => Ok(()),
            _ => Err(Error::WritePastEnd {
                offset: pos,
                len,
                size: self.guest_size(),
            }),
        }
    }

    /// Fill all of `buf` from guest offset `pos`: what was written, through every layer.
    /// Past the end of the guest is an error ([`Error::WritePastEnd`]).
    pub fn read_exact_at(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        self.within(pos, buf.len() as u64)?;
        let guest = self.guest()?;
        let _shared = self.shared();
        let runs = guest.plan_read(&mut self.meta(), pos, buf.len())?;
        guest.read_runs(&runs, pos, buf)
    }

    /// Write all of `buf` at guest offset `pos` (within the guest: past the end is
    /// [`Error::WritePastEnd`]).
    pub fn write_all_at(&self, pos: u64, buf: &[u8]) -> Result<()> {
        self.within(pos, buf.len() as u64)?;
        let guest = self.guest()?;
        let _shared = self.shared();
        self.record(pos, buf.len() as u64);
        let mut done = 0usize;
        while let Some(rest) = buf.get(done..).filter(|rest| !rest.is_empty()) {
            let at = pos.saturating_add(done as u64);
            let step = {
                let mut meta = self.meta();
                let step = guest.write_step(&mut meta, at, rest)?;
                self.keep_within_budget(&mut meta)?;
                step
            };
            // Clusters this image owns are written without holding the metadata.
            done = done.saturating_add(match step {
                Step::Done(len) => len,
                Step::InPlace { host, len } => {
                    guest.write_in_place(host, at, rest.get(..len).unwrap_or_default())?;
                    len
                }
            });
        }
        Ok(())
    }

    /// Make `len` bytes at `pos` read as zeros. With `unmap`, whole clusters are freed
    /// (qemu-io's `write -z -u`); without it, allocated clusters stay allocated, marked
    /// zero (`write -z`). Compressed clusters are always freed, as QEMU does. Version 2
    /// images cannot mark clusters zero: without a backing file their clusters are freed,
    /// over one they are written with zeros.
    pub fn write_zeroes(&self, pos: u64, len: u64, unmap: bool) -> Result<()> {
        self.within(pos, len)?;
        let guest = self.guest()?;
        let _shared = self.shared();
        self.record(pos, len);
        let mut meta = self.meta();
        guest.write_zeroes(&mut meta, pos, len, unmap)?;
        self.keep_within_budget(&mut meta)
    }

    /// Discard `len` bytes at `pos` as QEMU's discard does: every whole cluster in the range
    /// (and the partial last cluster of the disk) that holds something is freed and reads as
    /// zeros after; partial clusters are left as they are, and so is everything in a
    /// version 2 image over a backing file (which cannot mark clusters zero).
    pub fn discard(&self, pos: u64, len: u64) -> Result<()> {
        self.within(pos, len)?;
        let guest = self.guest()?;
        let _shared = self.shared();
        self.record(pos, len);
        let mut meta = self.meta();
        guest.discard(&mut meta, pos, len)?;
        self.keep_within_budget(&mut meta)
    }

    /// A durability barrier: when it returns, every write before it survives a crash or a
    /// power cut.
    pub fn flush(&self) -> Result<()> {
        let image = self.image()?;
        let _exclusive = self.exclusive();
        self.meta().flush(&image.io, image.data_storage.as_deref())
    }

    /// Whether this image itself (not its backing files) holds the stretch at `pos`, and for
    /// how many bytes from `pos` that answer holds, up to `len` (as QEMU's
    /// `bdrv_is_allocated`: what qemu-io's `map` prints). Length 0 at or past the end.
    pub fn is_allocated(&self, pos: u64, len: u64) -> Result<(bool, u64)> {
        let len = len.min(self.guest_size().saturating_sub(pos));
        if len == 0 {
            return Ok((false, 0));
        }
        let guest = self.guest()?;
        let _shared = self.shared();
        guest.is_allocated(&mut self.meta(), pos, len)
    }

    /// Change the guest size, as qemu-io's `truncate` does: the new space reads as zeros
    /// (the L1 table moves to a larger one when it must grow: written, then named by the
    /// header, then the old one freed). Shrinking drops every cluster past the new end and
    /// cuts the file after its last used cluster, as QEMU does. The size must be a multiple
    /// of 512; a version 2 image with snapshots is refused either way, as QEMU refuses it.
    pub fn resize(&self, size: u64) -> Result<()> {
        let image = self.image()?;
        let _exclusive = self.exclusive();
        let old = self.guest_size();
        if size % 512 != 0 {
            return Err(Error::InvalidOption {
                option: "size".to_owned(),
                message: "The new size must be a multiple of 512".to_owned(),
            });
        }
        Self::refuse_resize(image)?;
        let zero_grown_part = size > old && Self::grown_part_needs_zeros(image, old)?;
        if size > i64::MAX as u64 {
            return Err(Error::InvalidOption {
                option: "size".to_owned(),
                message: format!("Image size {size} is too large"),
            });
        }
        let mut meta = self.meta();
        // The bitmaps first: they refuse (an inconsistent one) before anything changes, and
        // go back to the old size if the header does not change.
        let mut bitmaps = self.bitmaps();
        if let Some(bitmaps) = bitmaps.as_mut() {
            bitmaps.resize(size)?;
        }
        let resized = (|| {
            if size < old {
                self.shrink_tables(image, &mut meta, size, old)?;
            }
            let needed = size.div_ceil(1u64 << image.geometry.l2_bits());
            if needed > meta.tables.l1().0.len() as u64 {
                self.grow_l1(image, &mut meta, needed)?;
            }
            if zero_grown_part {
                self.zero_grown_part(image, &mut meta, old, size)?;
            }
            if size > old {
                Self::resize_data_file(image, size)?;
            }
            write(&image.io, SIZE_FIELD, &size.to_be_bytes(), "header")?;
            barrier(&image.io)
        })();
        if resized.is_err() {
            if let Some(bitmaps) = bitmaps.as_mut() {
                let _ = bitmaps.resize(old);
            }
        }
        resized?;
        self.guest_size.store(size, Ordering::Release);
        self.refresh_header(image)
    }

    /// Move the L1 table to a new one of `entries` entries.
    fn grow_l1(&self, image: &Qcow2<I>, meta: &mut Metadata, entries: u64) -> Result<()> {
        let bytes = entries.saturating_mul(8);
        crate::base::limits::Limits::check("L1 table", bytes, image.limits.max_l1_bytes)?;
        let l1_size = u32::try_from(entries).map_err(|_| Error::InvalidOption {
            option: "size".to_owned(),
            message: "The new size needs an L1 table larger than qcow2 allows".to_owned(),
        })?;
        let data = image.data_storage.as_deref();
        meta.flush(&image.io, data)?;
        let clusters = bytes.div_ceil(image.cluster_size());
        let offset = meta.refs.allocate(&image.io, clusters)?;
        let (old, old_offset) = meta.tables.l1();
        let old_bytes = (old.len() as u64).saturating_mul(8);
        let mut table: Vec<u8> = old.iter().flat_map(|e| e.to_be_bytes()).collect();
        table.resize(
            usize::try_from(clusters.saturating_mul(image.cluster_size())).unwrap_or(0),
            0,
        );
        write(&image.io, offset, &table, "L1 table")?;
        meta.unsynced = true;
        meta.write_back(&image.io, data)?; // the new table and its refcounts, durable
        let mut fields = l1_size.to_be_bytes().to_vec();
        fields.extend_from_slice(&offset.to_be_bytes());
        write(&image.io, L1_FIELDS, &fields, "header")?;
        barrier(&image.io)?;
        meta.refs.free_later(old_offset, old_bytes);
        meta.tables.moved_l1(offset, l1_size as usize);
        Ok(())
    }

    /// Read the header back after changing it.
    fn refresh_header(&self, image: &Qcow2<I>) -> Result<()> {
        let header = read_back_header(image)?;
        *self.header.lock().unwrap_or_else(PoisonError::into_inner) = header;
        Ok(())
    }

    /// Write back the tables when they outgrow the cache, then drop the clean ones (the
    /// clusters the writes dropped stay reserved until a flush).
    fn keep_within_budget(&self, meta: &mut Metadata) -> Result<()> {
        if meta.tables.over_budget() || meta.refs.over_budget() {
            meta.write_back(&self.image()?.io, self.image()?.data_storage.as_deref())?;
            meta.tables.trim();
            meta.refs.trim();
        }
        Ok(())
    }

    /// Write everything back, free what was dropped, store the dirty bitmaps, and clear the
    /// marks an open writer leaves (the dirty bit of lazy refcounts).
    fn finish(&self) -> Result<()> {
        let image = self.image()?;
        let _exclusive = self.exclusive();
        let mut meta = self.meta();
        let data = image.data_storage.as_deref();
        meta.flush(&image.io, data)?;
        if let Some(bitmaps) = self.bitmaps().as_mut() {
            bitmaps.store(&mut space::FileSpace {
                io: &image.io,
                meta: &mut meta,
                data,
                cluster_bits: image.header.cluster_bits(),
            })?;
            // Free the old directory and the clusters the new one replaced.
            meta.flush(&image.io, data)?;
        }
        // The frees changed refcount blocks: write them too.
        meta.write_back(&image.io, image.data_storage.as_deref())?;
        let header = &image.header;
        if header.version() >= 3 && (header.has_lazy_refcounts() || header.is_dirty()) {
            let incompatible = image.header.incompatible_features() & !INCOMPAT_DIRTY;
            write(
                &image.io,
                INCOMPATIBLE_FIELD,
                &incompatible.to_be_bytes(),
                "header",
            )?;
            barrier(&image.io)?;
        }
        Ok(())
    }

    /// Write everything back, clear the marks an open writer leaves (the dirty bit of lazy
    /// refcounts), and give the image back as it now is, still open for writing (and
    /// locked): a snapshot job or another writer may follow.
    pub fn close(mut self) -> Result<Qcow2<I>> {
        self.finish()?;
        let mut image = self
            .image
            .take()
            .ok_or(Error::Internal("the writer is closed"))?;
        image.reload()?;
        Ok(image)
    }
}

impl<I: Storage> Drop for Writer<I> {
    fn drop(&mut self) {
        if self.image.is_some() {
            let _ = self.finish();
        }
    }
}

impl<I: Storage> ReadAt for Writer<I> {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        let len = usize::try_from(self.guest_size().saturating_sub(pos))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let Some(part) = buf.get_mut(..len) else {
            return Ok(0);
        };
        self.read_exact_at(pos, part)?;
        Ok(len)
    }
}

impl<I: Storage> positioned_io::WriteAt for Writer<I> {
    fn write_at(&mut self, pos: u64, buf: &[u8]) -> io::Result<usize> {
        Writer::write_all_at(self, pos, buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Writer::flush(self).map_err(io::Error::from)
    }
}

impl<I: Storage> positioned_io::WriteAt for &Writer<I> {
    fn write_at(&mut self, pos: u64, buf: &[u8]) -> io::Result<usize> {
        Writer::write_all_at(self, pos, buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Writer::flush(self).map_err(io::Error::from)
    }
}

impl<I: Storage> Size for Writer<I> {
    fn size(&self) -> io::Result<Option<u64>> {
        Ok(Some(self.guest_size()))
    }
}
