//! Managing the persistent dirty bitmaps of an open image, as `qemu-img bitmap` does: add,
//! remove, clear, enable, disable and merge, each checked as QEMU checks it
//! (`block_dirty_bitmap_add`, `qcow2_co_can_store_new_dirty_bitmap`,
//! `check_constraints_on_bitmap`, `bdrv_dirty_bitmap_check`) and durable when it returns.
//!
//! Every change writes the whole directory anew, as QEMU's `update_ext_header_and_dir`
//! does: the changed bitmap data and tables, then the new directory into clusters nothing
//! uses, a barrier, one write of the header's bitmaps extension, a barrier, and only then are
//! the old directory and the clusters it alone named freed. A crash at any write leaves the
//! old bitmap list or the new one. While the writer is open the bitmaps stay marked in use
//! on disk, as QEMU keeps them; closing the writer stores them cleanly.

use std::collections::HashSet;

use positioned_io::ReadAt;

use super::bitmaps::Bitmaps;
use super::space::FileSpace;
use super::writeback::Metadata;
use super::Writer;
use crate::base::io::Storage;
use crate::error::{Error, Result};
use crate::format::bitmap::table_fits;
use crate::image::qcow2::Qcow2;

/// Bitmap directory entries QEMU allows (`QCOW2_MAX_BITMAPS`).
const MAX_BITMAPS: usize = 65535;
/// Bytes of bitmap directory QEMU allows (`QCOW2_MAX_BITMAP_DIRECTORY_SIZE`).
const MAX_DIRECTORY_BYTES: u64 = 1024 * 65535;
/// Longest name, in bytes (`BME_MAX_NAME_SIZE`).
const MAX_NAME_LEN: usize = 1023;
/// Granularity bounds (`BME_MIN_GRANULARITY_BITS`, `BME_MAX_GRANULARITY_BITS`).
const MIN_GRANULARITY: u64 = 1 << 9;
const MAX_GRANULARITY: u64 = 1 << 31;

/// How [`Writer::add_bitmap`] makes a bitmap.
///
/// ```
/// let options = qcow2::BitmapOptions::new().granularity(4096).disabled(true);
/// assert_eq!(options.granularity, Some(4096));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BitmapOptions {
    /// Guest bytes per bit: a power of two from 512 B to 2 GiB. `None`: QEMU's default, the
    /// cluster size within 4 KiB to 64 KiB.
    pub granularity: Option<u64>,
    /// Made disabled (recording no writes until enabled), as `--add --disable`; by default
    /// enabled, as `qemu-img bitmap --add` makes it.
    pub disabled: bool,
}

impl BitmapOptions {
    /// The defaults: QEMU's granularity, enabled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Guest bytes per bit.
    pub fn granularity(mut self, bytes: u64) -> Self {
        self.granularity = Some(bytes);
        self
    }

    /// Whether the bitmap starts disabled.
    pub fn disabled(mut self, disabled: bool) -> Self {
        self.disabled = disabled;
        self
    }
}

/// The bitmap [`Writer::merge_bitmap`] merges from: one of the image being written, or one
/// of another image open for reading (`qemu-img bitmap --merge SOURCE -b SOURCE_FILE`).
/// Make it with [`BitmapSource::here`] or [`BitmapSource::image`].
#[derive(Debug)]
pub enum BitmapSource<'a, J = std::fs::File> {
    /// A bitmap of the image being written, by name.
    Here(&'a str),
    /// A bitmap of another image, by name.
    Image(&'a Qcow2<J>, &'a str),
}

impl<'a> BitmapSource<'a> {
    /// A bitmap of the image being written.
    pub fn here(name: &'a str) -> Self {
        BitmapSource::Here(name)
    }
}

impl<'a, J> BitmapSource<'a, J> {
    /// A bitmap of another image, open for reading.
    pub fn image(image: &'a Qcow2<J>, name: &'a str) -> Self {
        BitmapSource::Image(image, name)
    }
}

/// An error in QEMU's words.
fn refused(message: String) -> Error {
    Error::InvalidOption {
        option: "bitmap".to_owned(),
        message,
    }
}

/// QEMU's default granularity for a new bitmap (`bdrv_get_default_bitmap_granularity`): the
/// cluster size, at least 4 KiB and at most 64 KiB.
fn default_granularity(cluster_size: u64) -> u64 {
    cluster_size.clamp(4096, 65536)
}

/// Bytes of a directory entry with a name of `name_len` bytes (`calc_dir_entry_size`).
fn entry_bytes(name_len: usize) -> u64 {
    (24u64.saturating_add(name_len as u64)).next_multiple_of(8)
}

/// The `Writer` operations of `qemu-img bitmap`.
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("qcow2-doc-bitmap-ops-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # let path = dir.join("disk.qcow2");
/// qcow2::create(&path, &qcow2::CreateOptions::new(64 << 20))?;
/// let options = qcow2::OpenOptions::new().write(true);
/// let disk = qcow2::Qcow2::open_path_with(&path, &options)?.into_writer()?;
/// disk.add_bitmap("backup", &qcow2::BitmapOptions::new())?; // durable from here on
/// disk.write_all_at(1 << 20, b"recorded")?;
/// disk.add_bitmap("since-now", &qcow2::BitmapOptions::new().granularity(512))?;
/// disk.merge_bitmap("since-now", qcow2::BitmapSource::here("backup"))?;
/// disk.disable_bitmap("backup")?;
/// let image = disk.close()?;
///
/// let dirty: Vec<_> = image.dirty_extents("since-now")?.collect::<Result<_, _>>()?;
/// assert_eq!((dirty[0].start, dirty[0].length), (1 << 20, 65536)); // backup's 64 KiB granule
/// assert_eq!(image.bitmaps().len(), 2);
/// assert!(!image.bitmap("backup")?.auto());
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
impl<I: Storage> Writer<I> {
    /// Add a persistent dirty bitmap named `name`, clean, as `qemu-img bitmap --add` does
    /// (enabled unless `options.disabled`). Refused as QEMU refuses it, with its message: an
    /// empty name (or one holding a NUL byte, which QEMU cannot be given), a granularity
    /// that is not a power of two of 512 B to 2 GiB, a name in use, a version 2 image, a
    /// name over 1023 bytes, a bitmap too big for its granularity, a 65536th bitmap, or a
    /// directory over 64 MiB. Durable when it returns: written in use, as every bitmap is on
    /// disk while a writer is open, and stored clean at close.
    pub fn add_bitmap(&self, name: &str, options: &BitmapOptions) -> Result<()> {
        let image = self.image()?;
        let _exclusive = self.exclusive();
        let mut meta = self.meta();
        let mut bitmaps = self.bitmaps();
        let granularity = self.check_new_bitmap(image, bitmaps.as_ref(), name, options)?;
        let set = bitmaps.get_or_insert_with(|| Bitmaps::empty(image.header.cluster_bits()));
        set.add(name, granularity, !options.disabled, self.guest_size());
        if let Err(e) = self.write_bitmaps(image, &mut meta, set, Vec::new()) {
            set.drop_last();
            return Err(e);
        }
        self.settle(image, &mut meta)
    }

    /// Remove the bitmap named `name` and free its clusters, as `qemu-img bitmap --remove`
    /// does (an inconsistent one too). [`Error::NoSuchBitmap`] when there is none.
    pub fn remove_bitmap(&self, name: &str) -> Result<()> {
        let image = self.image()?;
        let _exclusive = self.exclusive();
        let mut meta = self.meta();
        let mut bitmaps = self.bitmaps();
        let set = bitmaps.as_mut().ok_or_else(|| Error::NoSuchBitmap {
            name: name.to_owned(),
        })?;
        let removal = set.remove(name, &image.io, image.limits.max_bitmap_table_bytes)?;
        let mut dropped = removal.dropped;
        dropped.extend(safe_to_free(image, &mut meta, set, removal.untrusted)?);
        let taken = set
            .take(removal.index)
            .ok_or(Error::Internal("bitmap index out of range"))?;
        if let Err(e) = self.write_bitmaps(image, &mut meta, set, dropped) {
            set.put_back(taken);
            return Err(e);
        }
        self.settle(image, &mut meta)
    }

    /// Clear every bit of the bitmap named `name` (`qemu-img bitmap --clear`).
    /// [`Error::NoSuchBitmap`], or [`Error::BitmapInUse`] for an inconsistent bitmap.
    pub fn clear_bitmap(&self, name: &str) -> Result<()> {
        self.change_bitmap(|set| set.clear(name))
    }

    /// Let the bitmap named `name` record guest writes (`qemu-img bitmap --enable`).
    /// [`Error::NoSuchBitmap`], or [`Error::BitmapInUse`] for an inconsistent bitmap.
    pub fn enable_bitmap(&self, name: &str) -> Result<()> {
        self.change_bitmap(|set| set.set_enabled(name, true))
    }

    /// Stop the bitmap named `name` recording guest writes (`qemu-img bitmap --disable`).
    /// [`Error::NoSuchBitmap`], or [`Error::BitmapInUse`] for an inconsistent bitmap.
    pub fn disable_bitmap(&self, name: &str) -> Result<()> {
        self.change_bitmap(|set| set.set_enabled(name, false))
    }

    /// Set in the bitmap named `target` every bit the source bitmap has set (`qemu-img
    /// bitmap --merge SOURCE [-b SOURCE_FILE] IMG TARGET`); granularities may differ (a set
    /// bit of the source sets every bit of the target it overlaps). Checked in QEMU's
    /// order: the target exists and is consistent ([`Error::NoSuchBitmap`],
    /// [`Error::BitmapInUse`]), then the source, then both describe guests of one size.
    pub fn merge_bitmap<J: ReadAt>(&self, target: &str, source: BitmapSource<'_, J>) -> Result<()> {
        let image = self.image()?;
        let _exclusive = self.exclusive();
        let mut meta = self.meta();
        let mut bitmaps = self.bitmaps();
        let set = bitmaps.as_mut().ok_or_else(|| Error::NoSuchBitmap {
            name: target.to_owned(),
        })?;
        set.check_usable(target)?;
        let bits = match source {
            BitmapSource::Here(name) => set.snapshot(name)?,
            BitmapSource::Image(other, name) => {
                let b = other.bitmap(name)?;
                if b.in_use() {
                    return Err(Error::BitmapInUse {
                        name: name.to_owned(),
                    });
                }
                if other.guest_size() != self.guest_size() {
                    return Err(refused(format!(
                        "Bitmaps are of different sizes (destination size is {}, source size \
                         is {}) and can't be merged",
                        self.guest_size(),
                        other.guest_size()
                    )));
                }
                // Read whole into a copy first: a read error changes nothing.
                let mut copy = set.clean_copy(target)?;
                for extent in other.dirty_extents(name)? {
                    let extent = extent?;
                    copy.set(
                        extent.start,
                        extent.start.saturating_add(extent.length),
                        image.header.cluster_bits(),
                    );
                }
                copy
            }
        };
        set.merge_copy(target, &bits)?;
        self.write_bitmaps(image, &mut meta, set, Vec::new())?;
        self.settle(image, &mut meta)
    }

    /// The granularity of a new bitmap, after QEMU's checks, in its order.
    fn check_new_bitmap(
        &self,
        image: &Qcow2<I>,
        bitmaps: Option<&Bitmaps>,
        name: &str,
        options: &BitmapOptions,
    ) -> Result<u64> {
        if name.is_empty() {
            return Err(refused("Bitmap name cannot be empty".to_owned()));
        }
        if name.contains('\0') {
            // A C string cannot hold one: QEMU never meets such a name, and the image
            // would keep only the part before it.
            return Err(refused("Bitmap name cannot contain a NUL byte".to_owned()));
        }
        let granularity = match options.granularity {
            Some(g) if g < MIN_GRANULARITY || !g.is_power_of_two() => {
                return Err(refused(
                    "Granularity must be power of 2 and at least 512".to_owned(),
                ))
            }
            Some(g) => g,
            None => default_granularity(self.cluster_size()),
        };
        let existing: Vec<&crate::format::bitmap::Bitmap> =
            bitmaps.map(|b| b.bitmaps().collect()).unwrap_or_default();
        if existing.iter().any(|b| b.raw_name == name.as_bytes()) {
            return Err(refused(format!("Bitmap already exists: {name}")));
        }
        let cannot = |why: &str| {
            let file = image
                .path()
                .map_or_else(|| "the image".to_owned(), |p| p.display().to_string());
            refused(format!(
                "Can't make bitmap '{name}' persistent in '{file}': {why}"
            ))
        };
        if image.header.version() < 3 {
            return Err(cannot("Cannot store dirty bitmaps in qcow2 v2 files"));
        }
        if granularity > MAX_GRANULARITY {
            return Err(cannot(&format!(
                "Granularity exceeds maximum ({MAX_GRANULARITY} bytes)"
            )));
        }
        let cluster_bits = image.header.cluster_bits();
        let bytes = self.guest_size().div_ceil(granularity).div_ceil(8);
        let clusters = bytes.div_ceil(self.cluster_size().max(1));
        if !table_fits(clusters, cluster_bits) {
            return Err(cannot(
                "Too much space will be occupied by the bitmap. Use larger granularity",
            ));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(cannot(&format!(
                "Name length exceeds maximum ({MAX_NAME_LEN} characters)"
            )));
        }
        if existing.len() >= MAX_BITMAPS {
            return Err(cannot(
                "Maximum number of persistent bitmaps is already reached",
            ));
        }
        let directory: u64 = existing
            .iter()
            .map(|b| entry_bytes(b.raw_name.len()))
            .fold(entry_bytes(name.len()), u64::saturating_add);
        if directory > MAX_DIRECTORY_BYTES {
            return Err(cannot("Not enough space in the bitmap directory"));
        }
        Ok(granularity)
    }

    /// Change one bitmap in memory and write the directory anew.
    fn change_bitmap(&self, change: impl FnOnce(&mut Bitmaps) -> Result<()>) -> Result<()> {
        let image = self.image()?;
        let _exclusive = self.exclusive();
        let mut meta = self.meta();
        let mut bitmaps = self.bitmaps();
        let Some(set) = bitmaps.as_mut() else {
            // No bitmaps at all: the change refuses the name it does not find.
            return change(&mut Bitmaps::empty(image.header.cluster_bits()));
        };
        change(set)?;
        self.write_bitmaps(image, &mut meta, set, Vec::new())?;
        self.settle(image, &mut meta)
    }

    /// Write the directory anew (in use, as while open), freeing `dropped` after the switch.
    fn write_bitmaps(
        &self,
        image: &Qcow2<I>,
        meta: &mut Metadata,
        set: &mut Bitmaps,
        dropped: Vec<(u64, u64)>,
    ) -> Result<()> {
        let data = image.data_storage.as_deref();
        // The guest's tables first: the new bitmap clusters come from a settled allocator.
        meta.flush(&image.io, data)?;
        set.write_directory(
            &mut FileSpace {
                io: &image.io,
                meta,
                data,
                cluster_bits: image.header.cluster_bits(),
            },
            true,
            dropped,
        )
    }

    /// Free what the new directory replaced (durable), and read the header back.
    fn settle(&self, image: &Qcow2<I>, meta: &mut Metadata) -> Result<()> {
        let data = image.data_storage.as_deref();
        meta.flush(&image.io, data)?;
        meta.write_back(&image.io, data)?;
        self.refresh_header(image)
    }
}

/// Of the data clusters an inconsistent bitmap's table names (untrusted: a crash or a
/// corrupt image may have left anything there), those that are safe to free: a stored
/// refcount of exactly 1, and none of the image's metadata (header, L1 and L2 tables,
/// refcount structures, snapshot table and snapshot L1 tables, bitmap directory and tables,
/// encryption header). QEMU frees them all; a cluster left out is only a leak.
fn safe_to_free<I: Storage>(
    image: &Qcow2<I>,
    meta: &mut Metadata,
    bitmaps: &Bitmaps,
    clusters: Vec<(u64, u64)>,
) -> Result<Vec<(u64, u64)>> {
    if clusters.is_empty() {
        return Ok(clusters);
    }
    let bits = image.header.cluster_bits();
    let mut metadata = HashSet::new();
    let mut add = |offset: u64, len: u64| {
        let first = offset >> bits;
        let last = offset.saturating_add(len.max(1).saturating_sub(1)) >> bits;
        // A structure claiming a huge length: its first clusters are enough.
        for c in first..=last.min(first.saturating_add(1 << 16)) {
            metadata.insert(c);
        }
    };
    add(0, 1);
    let (l1, l1_offset) = meta.tables.l1();
    add(l1_offset, (l1.len() as u64).saturating_mul(8));
    for &entry in l1 {
        let l2 = entry & crate::format::table::L1_OFFSET_MASK;
        if l2 != 0 {
            add(l2, 1);
        }
    }
    let (table, table_clusters) = meta.refs.table_location();
    add(table, table_clusters.saturating_mul(image.cluster_size()));
    for block in meta.refs.blocks()? {
        add(block, 1);
    }
    let header = &image.header;
    let (table_at, table_len) = crate::image::rewrite::snapshot_table_extent(image)?;
    add(table_at, table_len);
    for snap in &image.snapshots {
        add(
            snap.l1_table_offset,
            u64::from(snap.l1_size).saturating_mul(8),
        );
    }
    if let Some(e) = header.encryption() {
        add(e.offset, e.length);
    }
    for b in bitmaps.bitmaps() {
        add(b.table_offset, u64::from(b.table_size).saturating_mul(8));
        add(b.entry_offset, entry_bytes(b.raw_name.len()));
    }
    let mut safe = Vec::with_capacity(clusters.len());
    for (offset, len) in clusters {
        let cluster = offset >> bits;
        if offset < meta.file_len
            && !metadata.contains(&cluster)
            && meta.refs.get(&image.io, cluster)? == 1
        {
            safe.push((offset, len));
        }
    }
    Ok(safe)
}
