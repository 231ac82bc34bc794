//! Persistent dirty bitmaps kept up to date by a writer, as QEMU keeps them
//! (block/qcow2-bitmap.c).
//!
//! At open for writing every bitmap not marked in use is loaded and marked in use on disk
//! (the directory rewritten in place, then a barrier): a crash from then on leaves bitmaps
//! that QEMU knows not to trust. A bitmap found in use at open was not stored cleanly: QEMU
//! calls it inconsistent, records nothing into it and writes it back unchanged, still in use,
//! and so does this module. Enabled bitmaps (the `auto` flag) record every write, zero write
//! and discard. At close the bitmaps are stored back: changed data clusters and tables go to
//! new clusters, a new directory with the in-use flags cleared is written, a barrier, the
//! header is pointed at it, and only then are the replaced clusters freed. A crash at any
//! write leaves the old directory (with its in-use flags) or the new one, each naming only
//! clusters that hold what it expects.
//!
//! A resize of the guest resizes every bitmap as QEMU does (bits past a shrunk end dropped,
//! a grown part clean), and is refused, as QEMU refuses it, while a bitmap is inconsistent.
//!
//! Unlike QEMU, which rewrites every data cluster of every bitmap at close, a data cluster or
//! table that did not change is kept where it is and named by the new directory too.

use std::collections::HashSet;

use positioned_io::ReadAt;

use super::space::Space;
use crate::base::io::read_metadata;
use crate::base::limits::Limits;
use crate::error::{Error, Result};
use crate::format::bitmap::{
    all_set, bytes_to_words, clear_from, decode_table_entry, encode_directory, encode_table,
    set_bits, table_fits, words_to_bytes, Bitmap, DataCluster, FLAG_AUTO, FLAG_IN_USE,
};
use crate::format::extension::BitmapsExtension;
use crate::format::header::TABLE_ENTRY_LEN;
use crate::image::dirty::read_table;
use crate::image::qcow2::Qcow2;

/// Every bitmap of an image open for writing: the directory as it stands on disk, and the
/// bits of each bitmap that was stored cleanly.
#[derive(Debug)]
pub(crate) struct Bitmaps {
    /// The directory's entries in order, as last written to disk.
    entries: Vec<Entry>,
    /// Where the directory is now (`None`: the image has no bitmaps extension).
    extension: Option<BitmapsExtension>,
    cluster_bits: u32,
}

#[derive(Debug)]
struct Entry {
    /// Its directory entry as on disk (flags, table offset and size).
    bitmap: Bitmap,
    /// Its bits; `None` for a bitmap found in use at open (inconsistent), kept as it is.
    bits: Option<Bits>,
}

/// A consistent bitmap's bits, one chunk per cluster of bitmap data (one table entry).
#[derive(Debug, Clone)]
struct Bits {
    /// The auto flag: guest writes are recorded.
    enabled: bool,
    /// log2 of the guest bytes one bit covers.
    granularity_bits: u32,
    /// Bits that describe the guest (the last chunk may describe less than a cluster).
    granules: u64,
    /// The table on disk.
    table: Vec<DataCluster>,
    /// The bits of each table entry's cluster.
    chunks: Vec<Chunk>,
    /// Which chunks hold bits their table entry's cluster does not.
    changed: Vec<bool>,
}

/// The bits of one cluster of bitmap data.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Chunk {
    Zeros,
    /// Every bit that describes the guest is set.
    Ones,
    /// `cluster_size / 8` words (see [`set_bits`] for the layout).
    Bits(Box<[u64]>),
}

impl Bitmaps {
    /// The image's bitmaps as a read-write open sees them (`None`: no bitmaps extension):
    /// each bitmap not in use is read whole, its table checked as the reader checks it (the
    /// tables within [`Limits::max_bitmap_table_bytes`]). Memory: one cluster for each data
    /// cluster the tables name, and a data cluster named twice is refused (freeing it twice
    /// at close would corrupt the refcounts), so no more than the file holds.
    pub(crate) fn load<I: ReadAt>(image: &Qcow2<I>) -> Result<Option<Bitmaps>> {
        let Some(&extension) = image.header.bitmaps() else {
            return Ok(None);
        };
        let cluster_bits = image.header.cluster_bits();
        let guest_size = image.guest_size();
        let mut tables_read = 0u64;
        let mut data_clusters = HashSet::new();
        let mut entries = Vec::with_capacity(image.bitmaps.len());
        for b in &image.bitmaps {
            let bits = if b.in_use() {
                None
            } else {
                tables_read = tables_read.saturating_add(table_bytes(b));
                Limits::check(
                    "bitmap tables",
                    tables_read,
                    image.limits.max_bitmap_table_bytes,
                )?;
                let table = read_table(&image.io, b, guest_size, cluster_bits)?;
                Some(Bits::load(
                    &image.io,
                    b,
                    table,
                    guest_size,
                    cluster_bits,
                    &mut data_clusters,
                )?)
            };
            entries.push(Entry {
                bitmap: b.clone(),
                bits,
            });
        }
        Ok(Some(Bitmaps {
            entries,
            extension: Some(extension),
            cluster_bits,
        }))
    }

    /// The directory's entries as they stand on disk now.
    fn list(&self) -> Vec<Bitmap> {
        self.entries.iter().map(|e| e.bitmap.clone()).collect()
    }

    /// Mark every consistent bitmap in use on disk, as QEMU does when it opens an image for
    /// writing: the directory rewritten in place (only flag bits change, and no flag field
    /// crosses a sector, so a torn write leaves each entry old or new), then a barrier.
    /// Nothing is written when every bitmap is in use already.
    ///
    /// (QEMU also clears the header's autoclear bit around the rewrite, so that a crash there
    /// drops every bitmap; in-use flags, which a crash may leave set, suffice.)
    pub(crate) fn mark_in_use(&mut self, space: &mut dyn Space) -> Result<()> {
        let mut marked = self.list();
        let mut any = false;
        for (b, e) in marked.iter_mut().zip(&self.entries) {
            if e.bits.is_some() && !b.in_use() {
                b.flags |= FLAG_IN_USE;
                any = true;
            }
        }
        let Some(extension) = self.extension.filter(|_| any) else {
            return Ok(());
        };
        let dir = encode_directory(&marked);
        if dir.len() as u64 != extension.directory_size {
            // A name stored with bytes after a NUL: QEMU writes names up to the NUL, and so
            // fails here too ("Can't update bitmap directory").
            return Err(Error::UnsupportedWrite {
                what: "the bitmap directory cannot be rewritten in place (a bitmap name holds \
                       a NUL byte)"
                    .into(),
            });
        }
        space.write(extension.directory_offset, &dir)?;
        space.barrier()?;
        for (e, b) in self.entries.iter_mut().zip(marked) {
            e.bitmap.flags = b.flags;
        }
        Ok(())
    }

    /// A write, zero write or discard of `len` guest bytes at `pos`: set, in every enabled
    /// bitmap that is not inconsistent, the bits of every granule the range touches (QEMU's
    /// `bdrv_set_dirty`).
    pub(crate) fn record(&mut self, pos: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = pos.saturating_add(len);
        let chunk_bits = self.cluster_bits.saturating_add(3);
        for bits in self.entries.iter_mut().filter_map(|e| e.bits.as_mut()) {
            if bits.enabled {
                bits.set(pos, end, chunk_bits);
            }
        }
    }

    /// The guest is resized to `guest_size` bytes: every bitmap follows, as QEMU's
    /// `bdrv_dirty_bitmap_truncate` (bits past a shrunk end dropped, a grown part clean). Call
    /// it before the header changes: like QEMU (`qcow2_truncate_bitmaps_check`) it refuses,
    /// changing nothing, when a bitmap is inconsistent, and (QEMU would fail to store it at
    /// close) when a bitmap would need a table over QEMU's limits.
    pub(crate) fn resize(&mut self, guest_size: u64) -> Result<()> {
        let chunk_bits = self.cluster_bits.saturating_add(3);
        for e in &self.entries {
            let Some(bits) = &e.bits else {
                return Err(Error::UnsupportedWrite {
                    what: format!(
                        "resizing an image whose bitmap {:?} is inconsistent (in use since a \
                         crash): remove the bitmap first, as QEMU requires",
                        e.bitmap.name
                    ),
                });
            };
            let granules = guest_size.div_ceil(1u64 << bits.granularity_bits.min(63));
            let chunks = granules.div_ceil(1u64 << chunk_bits.min(63));
            if !table_fits(chunks, self.cluster_bits) {
                return Err(Error::UnsupportedWrite {
                    what: format!(
                        "resizing to {guest_size} bytes: bitmap {:?} would be too big for its \
                         granularity",
                        e.bitmap.name
                    ),
                });
            }
        }
        for bits in self.entries.iter_mut().filter_map(|e| e.bits.as_mut()) {
            let granules = guest_size.div_ceil(1u64 << bits.granularity_bits.min(63));
            bits.resize(granules, chunk_bits);
        }
        Ok(())
    }

    /// Store the bitmaps back at close, as QEMU's `qcow2_store_persistent_dirty_bitmaps`
    /// does: changed data clusters and tables written to new clusters, a new directory with
    /// the in-use flags of consistent bitmaps cleared (inconsistent ones stay in use), a
    /// barrier, the header's extension moved to the new directory, and then the old
    /// directory and every replaced cluster freed. On an error before the header moves, the
    /// clusters allocated are freed again and the image keeps its old bitmaps.
    pub(crate) fn store(&mut self, space: &mut dyn Space) -> Result<()> {
        if !self.needs_store() {
            return Ok(());
        }
        self.write_directory(space, false, Vec::new())
    }

    /// Write the whole directory anew, as [`Bitmaps::store`] does (`in_use`: with the in-use
    /// flag on every bitmap, as on disk while a writer is open), and free `dropped` (the
    /// clusters of removed bitmaps) with what the new directory replaces, once the header
    /// points at it.
    pub(super) fn write_directory(
        &mut self,
        space: &mut dyn Space,
        in_use: bool,
        dropped: Vec<(u64, u64)>,
    ) -> Result<()> {
        let mut plan = Plan {
            replaced: dropped,
            ..Plan::default()
        };
        let written = match self.write_new(space, &mut plan, in_use) {
            Ok(written) => written,
            Err(e) => {
                plan.roll_back(space);
                return Err(e);
            }
        };
        let old = self.extension;
        self.commit(written);
        if let Some(old) = old {
            space.free(old.directory_offset, old.directory_size)?;
        }
        for (offset, len) in plan.replaced {
            space.free(offset, len)?;
        }
        Ok(())
    }

    /// Whether the directory on disk differs from what [`Bitmaps::store`] would write.
    fn needs_store(&self) -> bool {
        self.entries.iter().any(|e| match &e.bits {
            Some(bits) => {
                bits.changed.contains(&true)
                    || bits.table.len() != bits.chunks.len()
                    || e.bitmap.flags != bits.stored_flags()
            }
            None => false,
        })
    }

    /// Write the new data clusters, tables and directory, and move the header to it (or
    /// drop the extension when no bitmap is left).
    fn write_new(&self, space: &mut dyn Space, plan: &mut Plan, in_use: bool) -> Result<Written> {
        let cluster_size = 1u64.checked_shl(self.cluster_bits).unwrap_or(0);
        let mut directory = Vec::with_capacity(self.entries.len());
        let mut tables = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            let mut bitmap = e.bitmap.clone();
            let table = match &e.bits {
                Some(bits) => {
                    let table = bits.write_chunks(space, plan, cluster_size)?;
                    if table != bits.table {
                        let bytes = encode_table(&table);
                        let offset = plan.allocate(space, bytes.len() as u64)?;
                        space.write(offset, &bytes)?;
                        if bitmap.table_offset != 0 {
                            plan.replaced
                                .push((bitmap.table_offset, table_bytes(&bitmap)));
                        }
                        bitmap.table_offset = offset;
                        bitmap.table_size = u32::try_from(table.len())
                            .map_err(|_| Error::Internal("bitmap table over 2^32 entries"))?;
                    }
                    bitmap.flags = bits.stored_flags() | if in_use { FLAG_IN_USE } else { 0 };
                    Some(table)
                }
                None => None,
            };
            directory.push(bitmap);
            tables.push(table);
        }
        let extension = if directory.is_empty() {
            None
        } else {
            let bytes = encode_directory(&directory);
            let directory_size = bytes.len() as u64;
            let directory_offset = plan.allocate(space, directory_size)?;
            space.write(directory_offset, &bytes)?;
            Some(BitmapsExtension {
                nb_bitmaps: u32::try_from(directory.len())
                    .map_err(|_| Error::Internal("over 2^32 bitmaps"))?,
                directory_size,
                directory_offset,
            })
        };
        space.barrier()?;
        space.set_bitmaps_extension(extension)?;
        Ok(Written {
            directory,
            tables,
            extension,
        })
    }

    /// Take what [`Bitmaps::write_new`] wrote as the state on disk.
    fn commit(&mut self, written: Written) {
        let mut entry_offset = written.extension.map_or(0, |e| e.directory_offset);
        for ((e, mut bitmap), table) in self
            .entries
            .iter_mut()
            .zip(written.directory)
            .zip(written.tables)
        {
            bitmap.entry_offset = entry_offset;
            entry_offset = entry_offset.saturating_add(entry_len(&bitmap));
            e.bitmap = bitmap;
            if let (Some(bits), Some(table)) = (e.bits.as_mut(), table) {
                bits.table = table;
                bits.changed.fill(false);
            }
        }
        self.extension = written.extension;
    }
}

/// What [`Bitmaps::write_new`] wrote: the new directory and tables (`None` for inconsistent
/// bitmaps, whose tables stay), and the extension pointing at it.
struct Written {
    directory: Vec<Bitmap>,
    tables: Vec<Option<Vec<DataCluster>>>,
    extension: Option<BitmapsExtension>,
}

/// The clusters one store allocates, and those it replaces (freed once the header points at
/// the new directory).
#[derive(Default)]
struct Plan {
    allocated: Vec<(u64, u64)>,
    replaced: Vec<(u64, u64)>,
}

impl Plan {
    fn allocate(&mut self, space: &mut dyn Space, len: u64) -> Result<u64> {
        let offset = space.allocate(len)?;
        self.allocated.push((offset, len));
        Ok(offset)
    }

    /// Free what was allocated: nothing on disk names it. A failure here only leaks.
    fn roll_back(self, space: &mut dyn Space) {
        for (offset, len) in self.allocated {
            let _ = space.free(offset, len);
        }
    }
}

impl Bits {
    /// A bitmap's bits, read from the data clusters its (checked) table names.
    fn load<I: ReadAt>(
        io: &I,
        b: &Bitmap,
        table: Vec<DataCluster>,
        guest_size: u64,
        cluster_bits: u32,
        data_clusters: &mut HashSet<u64>,
    ) -> Result<Bits> {
        let granularity_bits = b.granularity.trailing_zeros();
        let granules = guest_size.div_ceil(b.granularity.max(1));
        let chunk_bits = cluster_bits.saturating_add(3);
        let mut chunks = Vec::with_capacity(table.len());
        for (i, &entry) in table.iter().enumerate() {
            let chunk = match entry {
                DataCluster::Zeros => Chunk::Zeros,
                DataCluster::Ones => Chunk::Ones,
                DataCluster::At(offset) => {
                    if !data_clusters.insert(offset) {
                        return Err(Error::malformed(
                            format!(
                                "bitmap {:?}: data cluster {offset:#x} is named twice",
                                b.name
                            ),
                            b.table_offset,
                        ));
                    }
                    let size = 1u64.checked_shl(cluster_bits).unwrap_or(0);
                    let data = read_metadata(io, offset, size, "bitmap data")?;
                    let limit = chunk_limit(granules, i as u64, chunk_bits);
                    Chunk::from_data(bytes_to_words(&data), limit)
                }
            };
            chunks.push(chunk);
        }
        Ok(Bits {
            enabled: b.auto(),
            granularity_bits,
            granules,
            changed: vec![false; table.len()],
            table,
            chunks,
        })
    }

    /// The flags the bitmap is stored with at close (QEMU: auto when enabled, never in use).
    fn stored_flags(&self) -> u32 {
        if self.enabled {
            FLAG_AUTO
        } else {
            0
        }
    }

    /// Set the bits of the granules that guest bytes `[pos, end)` touch.
    fn set(&mut self, pos: u64, end: u64, chunk_bits: u32) {
        let first = pos.checked_shr(self.granularity_bits).unwrap_or(0);
        let last = end
            .saturating_sub(1)
            .checked_shr(self.granularity_bits)
            .unwrap_or(0)
            .saturating_add(1)
            .min(self.granules);
        let words = 1usize
            .checked_shl(chunk_bits.saturating_sub(6))
            .unwrap_or(0);
        let mut granule = first;
        while granule < last {
            let index = granule.checked_shr(chunk_bits).unwrap_or(0);
            let base = index.checked_shl(chunk_bits).unwrap_or(0);
            let limit = chunk_limit(self.granules, index, chunk_bits);
            let to = last.saturating_sub(base).min(limit);
            let from = granule.saturating_sub(base);
            let slot = usize::try_from(index).ok();
            if let Some(chunk) = slot.and_then(|i| self.chunks.get_mut(i)) {
                if chunk.set(from, to, limit, words) {
                    if let Some(changed) = slot.and_then(|i| self.changed.get_mut(i)) {
                        *changed = true;
                    }
                }
            }
            granule = base.saturating_add(to);
        }
    }

    /// Follow the guest to `granules` bits: chunks past the end dropped, new ones clean, and
    /// the chunk holding the smaller end keeps only the bits before it (rewritten at the
    /// next store, so that no bit past the end stays on disk).
    fn resize(&mut self, granules: u64, chunk_bits: u32) {
        if granules == self.granules {
            return;
        }
        let edge = granules.min(self.granules);
        let chunks = usize::try_from(granules.div_ceil(1u64 << chunk_bits.min(63))).unwrap_or(0);
        self.chunks.truncate(chunks);
        self.changed.truncate(chunks);
        self.chunks.resize(chunks, Chunk::Zeros);
        self.changed.resize(chunks, true);
        self.granules = granules;
        let index = edge.checked_shr(chunk_bits).unwrap_or(0);
        let from = edge.saturating_sub(index.checked_shl(chunk_bits).unwrap_or(0));
        let limit = chunk_limit(granules, index, chunk_bits);
        let words = 1usize
            .checked_shl(chunk_bits.saturating_sub(6))
            .unwrap_or(0);
        let slot = usize::try_from(index).ok();
        if let Some(chunk) = slot.and_then(|i| self.chunks.get_mut(i)) {
            chunk.keep_before(from, limit, words);
            if let Some(changed) = slot.and_then(|i| self.changed.get_mut(i)) {
                *changed = true;
            }
        }
    }

    /// Write the changed chunks to new clusters (an all-ones chunk needs none); the table
    /// that names them, the old clusters they replace added to `plan.replaced`.
    fn write_chunks(
        &self,
        space: &mut dyn Space,
        plan: &mut Plan,
        cluster_size: u64,
    ) -> Result<Vec<DataCluster>> {
        let chunk_bits = space.cluster_bits().saturating_add(3);
        let mut table = Vec::with_capacity(self.chunks.len());
        for (i, (chunk, &changed)) in self.chunks.iter().zip(&self.changed).enumerate() {
            let old = self.table.get(i).copied();
            if let (Some(old), false) = (old, changed) {
                table.push(old);
                continue;
            }
            let limit = chunk_limit(self.granules, i as u64, chunk_bits);
            table.push(match chunk {
                Chunk::Zeros => DataCluster::Zeros,
                Chunk::Ones => DataCluster::Ones,
                Chunk::Bits(words) if all_set(words, limit) => DataCluster::Ones,
                Chunk::Bits(words) => {
                    let offset = plan.allocate(space, cluster_size)?;
                    space.write(offset, &words_to_bytes(words))?;
                    DataCluster::At(offset)
                }
            });
            if let Some(DataCluster::At(old)) = old {
                plan.replaced.push((old, cluster_size));
            }
        }
        // Clusters past a shrunk end go too.
        for entry in self.table.get(self.chunks.len()..).unwrap_or_default() {
            if let DataCluster::At(old) = *entry {
                plan.replaced.push((old, cluster_size));
            }
        }
        Ok(table)
    }
}

impl Chunk {
    /// A chunk from a cluster of bitmap data, of which the first `limit` bits describe the
    /// guest (the rest is dropped: QEMU ignores it when it loads, and stores zeros).
    fn from_data(mut words: Vec<u64>, limit: u64) -> Chunk {
        clear_from(&mut words, limit);
        if words.iter().all(|&w| w == 0) {
            Chunk::Zeros
        } else if all_set(&words, limit) {
            Chunk::Ones
        } else {
            Chunk::Bits(words.into_boxed_slice())
        }
    }

    /// Keep only bits `[0, from)` of a chunk that now has `limit` meaningful bits.
    fn keep_before(&mut self, from: u64, limit: u64, words: usize) {
        let mut bits = match std::mem::replace(self, Chunk::Zeros) {
            Chunk::Zeros => return,
            Chunk::Ones if from >= limit => {
                *self = Chunk::Ones;
                return;
            }
            Chunk::Ones => {
                let mut bits = vec![0; words];
                set_bits(&mut bits, 0, from);
                bits
            }
            Chunk::Bits(bits) => bits.into_vec(),
        };
        clear_from(&mut bits, from);
        *self = if bits.iter().all(|&w| w == 0) {
            Chunk::Zeros
        } else if all_set(&bits, limit) {
            Chunk::Ones
        } else {
            Chunk::Bits(bits.into_boxed_slice())
        };
    }

    /// Set bits `[from, to)` of a chunk of `limit` meaningful bits held in `words` words;
    /// whether anything may have changed.
    fn set(&mut self, from: u64, to: u64, limit: u64, words: usize) -> bool {
        if from >= to || *self == Chunk::Ones {
            return false;
        }
        if from == 0 && to >= limit {
            *self = Chunk::Ones;
            return true;
        }
        if *self == Chunk::Zeros {
            *self = Chunk::Bits(vec![0; words].into_boxed_slice());
        }
        if let Chunk::Bits(bits) = self {
            set_bits(bits, from, to);
        }
        true
    }
}

/// Bits of chunk `index` that describe the guest: a whole cluster's, less for the last.
fn chunk_limit(granules: u64, index: u64, chunk_bits: u32) -> u64 {
    let per_chunk = 1u64.checked_shl(chunk_bits).unwrap_or(u64::MAX);
    let base = index.checked_shl(chunk_bits).unwrap_or(u64::MAX);
    granules.saturating_sub(base).min(per_chunk)
}

fn table_bytes(b: &Bitmap) -> u64 {
    u64::from(b.table_size).saturating_mul(TABLE_ENTRY_LEN)
}

/// Bytes of a directory entry as written (fixed part, name, padding to 8).
fn entry_len(b: &Bitmap) -> u64 {
    (24u64.saturating_add(b.raw_name.len() as u64)).next_multiple_of(8)
}

/// The changes `qemu-img bitmap` makes (add, remove, clear, enable, disable, merge), made on
/// the bitmaps in memory; the writer then writes the whole directory anew
/// ([`Bitmaps::write_directory`], in `bitmap_ops.rs`).
impl Bitmaps {
    /// No bitmaps yet (the image has no bitmaps extension).
    pub(super) fn empty(cluster_bits: u32) -> Bitmaps {
        Bitmaps {
            entries: Vec::new(),
            extension: None,
            cluster_bits,
        }
    }

    /// The directory's entries, in order.
    pub(super) fn bitmaps(&self) -> impl Iterator<Item = &Bitmap> {
        self.entries.iter().map(|e| &e.bitmap)
    }

    /// Index of the bitmap named `name` (the first, as QEMU finds it).
    fn find(&self, name: &str) -> Result<usize> {
        self.entries
            .iter()
            .position(|e| e.bitmap.raw_name == name.as_bytes())
            .ok_or_else(|| Error::NoSuchBitmap {
                name: name.to_owned(),
            })
    }

    /// The bits of the bitmap named `name`: refused when there is none, or when it is
    /// inconsistent (in use since a crash), as QEMU refuses to use it.
    fn bits_mut(&mut self, name: &str) -> Result<&mut Bits> {
        let index = self.find(name)?;
        self.entries
            .get_mut(index)
            .and_then(|e| e.bits.as_mut())
            .ok_or_else(|| Error::BitmapInUse {
                name: name.to_owned(),
            })
    }

    /// Append a new bitmap, all clean, of `granularity` bytes per bit (a power of two
    /// within QEMU's bounds, checked by the caller) for a guest of `guest_size` bytes.
    pub(super) fn add(&mut self, name: &str, granularity: u64, enabled: bool, guest_size: u64) {
        let granularity_bits = granularity.trailing_zeros();
        let granules = guest_size.div_ceil(granularity.max(1));
        let chunk_bits = self.cluster_bits.saturating_add(3);
        let chunks = usize::try_from(granules.div_ceil(1u64 << chunk_bits.min(63))).unwrap_or(0);
        let bitmap = Bitmap {
            name: name.to_owned(),
            granularity,
            flags: 0,
            bitmap_type: 1,
            table_offset: 0,
            table_size: 0,
            extra_data_size: 0,
            entry_offset: 0,
            raw_name: name.as_bytes().to_vec(),
        };
        let bits = Bits {
            enabled,
            granularity_bits,
            granules,
            table: Vec::new(),
            chunks: vec![Chunk::Zeros; chunks],
            changed: vec![false; chunks],
        };
        self.entries.push(Entry {
            bitmap,
            bits: Some(bits),
        });
    }

    /// Undo [`Bitmaps::add`] of a bitmap that never reached the disk.
    pub(super) fn drop_last(&mut self) {
        self.entries.pop();
    }

    /// Find the bitmap named `name` to remove (an inconsistent one too, as QEMU allows):
    /// its index, the clusters it holds (its table, and the data clusters of a consistent
    /// bitmap) and, for an inconsistent one, the data clusters its table names (untrusted:
    /// the caller checks them before freeing). They are freed once the directory without it
    /// is on disk. The table of an inconsistent bitmap is read from `io`; what cannot be
    /// read of it, or is over `max_table_bytes`, is left allocated (a leak), and a data
    /// cluster another bitmap names is never freed.
    pub(super) fn remove<I: ReadAt>(
        &mut self,
        name: &str,
        io: &I,
        max_table_bytes: u64,
    ) -> Result<Removal> {
        let index = self.find(name)?;
        let cluster_size = 1u64.checked_shl(self.cluster_bits).unwrap_or(0);
        let Some(entry) = self.entries.get(index) else {
            return Err(Error::Internal("bitmap index out of range"));
        };
        let table = match &entry.bits {
            Some(bits) => bits.table.clone(),
            None => self.inconsistent_table(&entry.bitmap, io, max_table_bytes),
        };
        let named_elsewhere: HashSet<u64> = self
            .entries
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != index)
            .filter_map(|(_, e)| e.bits.as_ref())
            .flat_map(|b| b.table.iter())
            .filter_map(|c| match *c {
                DataCluster::At(offset) => Some(offset),
                _ => None,
            })
            .collect();
        let data: Vec<(u64, u64)> = table
            .iter()
            .filter_map(|c| match *c {
                DataCluster::At(offset) if !named_elsewhere.contains(&offset) => {
                    Some((offset, cluster_size))
                }
                _ => None,
            })
            .collect();
        let (mut dropped, untrusted) = match entry.bits {
            Some(_) => (data, Vec::new()),
            None => (Vec::new(), data),
        };
        if entry.bitmap.table_offset != 0 {
            dropped.push((entry.bitmap.table_offset, table_bytes(&entry.bitmap)));
        }
        Ok(Removal {
            index,
            dropped,
            untrusted,
        })
    }

    /// Take out entry `index` (after [`Bitmaps::remove`] found it); put it back with
    /// [`Bitmaps::put_back`] when the new directory could not be written.
    pub(super) fn take(&mut self, index: usize) -> Option<TakenBitmap> {
        (index < self.entries.len()).then(|| TakenBitmap {
            index,
            entry: self.entries.remove(index),
        })
    }

    /// Undo [`Bitmaps::take`].
    pub(super) fn put_back(&mut self, taken: TakenBitmap) {
        let index = taken.index.min(self.entries.len());
        self.entries.insert(index, taken.entry);
    }

    /// The data clusters an inconsistent bitmap's table names, as far as it can be read
    /// (entries that do not decode are skipped: QEMU would refuse them too).
    fn inconsistent_table<I: ReadAt>(
        &self,
        b: &Bitmap,
        io: &I,
        max_table_bytes: u64,
    ) -> Vec<DataCluster> {
        let bytes = table_bytes(b);
        if bytes > max_table_bytes || b.table_offset == 0 {
            return Vec::new();
        }
        let Ok(raw) = read_metadata(io, b.table_offset, bytes, "bitmap table") else {
            return Vec::new();
        };
        raw.chunks_exact(8)
            .filter_map(|c| c.try_into().ok().map(u64::from_be_bytes))
            .filter_map(|e| decode_table_entry(e, self.cluster_bits).ok())
            .collect()
    }

    /// Clear every bit of the bitmap named `name` (QEMU's `block-dirty-bitmap-clear`).
    pub(super) fn clear(&mut self, name: &str) -> Result<()> {
        self.bits_mut(name)?.clear();
        Ok(())
    }

    /// Enable (record guest writes) or disable the bitmap named `name`.
    pub(super) fn set_enabled(&mut self, name: &str, enabled: bool) -> Result<()> {
        self.bits_mut(name)?.enabled = enabled;
        Ok(())
    }

    /// Check that the bitmap named `name` exists and is consistent (QEMU checks the
    /// destination of a merge before its source).
    pub(super) fn check_usable(&mut self, name: &str) -> Result<()> {
        self.bits_mut(name).map(|_| ())
    }

    /// A consistent copy of the bits of the bitmap named `source`, to merge.
    pub(super) fn snapshot(&mut self, source: &str) -> Result<BitsCopy> {
        Ok(BitsCopy(self.bits_mut(source)?.clone()))
    }

    /// Clean bits of the same granularity and size as the bitmap named `target`, to
    /// gather a source in before merging it.
    pub(super) fn clean_copy(&mut self, target: &str) -> Result<BitsCopy> {
        let bits = self.bits_mut(target)?;
        let chunks = bits.chunks.len();
        Ok(BitsCopy(Bits {
            enabled: false,
            granularity_bits: bits.granularity_bits,
            granules: bits.granules,
            table: Vec::new(),
            chunks: vec![Chunk::Zeros; chunks],
            changed: vec![false; chunks],
        }))
    }

    /// Merge a copy of bits into the bitmap named `target` (`target |= source`, each set
    /// granule of the source setting the target's granules it overlaps, as QEMU's
    /// `hbitmap_merge` does across granularities).
    pub(super) fn merge_copy(&mut self, target: &str, source: &BitsCopy) -> Result<()> {
        let chunk_bits = self.cluster_bits.saturating_add(3);
        let bits = self.bits_mut(target)?;
        let shift = source.0.granularity_bits;
        source.0.for_each_run(chunk_bits, |from, to| {
            let pos = from.checked_shl(shift).unwrap_or(u64::MAX);
            let end = to.checked_shl(shift).unwrap_or(u64::MAX);
            bits.set(pos, end, chunk_bits);
        });
        Ok(())
    }
}

/// What [`Bitmaps::remove`] found.
#[derive(Debug)]
pub(super) struct Removal {
    /// The entry's index.
    pub(super) index: usize,
    /// Its table, and the data clusters of a consistent bitmap.
    pub(super) dropped: Vec<(u64, u64)>,
    /// The data clusters an inconsistent bitmap's table names.
    pub(super) untrusted: Vec<(u64, u64)>,
}

/// An entry taken out by [`Bitmaps::take`].
#[derive(Debug)]
pub(super) struct TakenBitmap {
    index: usize,
    entry: Entry,
}

/// A copy of a bitmap's bits ([`Bitmaps::snapshot`]).
#[derive(Debug)]
pub(super) struct BitsCopy(Bits);

impl BitsCopy {
    /// Set the granules that guest bytes `[pos, end)` touch.
    pub(super) fn set(&mut self, pos: u64, end: u64, cluster_bits: u32) {
        self.0.set(pos, end, cluster_bits.saturating_add(3));
    }
}

impl Bits {
    /// Clear every bit.
    fn clear(&mut self) {
        for (chunk, changed) in self.chunks.iter_mut().zip(self.changed.iter_mut()) {
            if *chunk != Chunk::Zeros {
                *chunk = Chunk::Zeros;
                *changed = true;
            }
        }
    }

    /// Call `f(from, to)` for every run of set granules `[from, to)`, in order (a run may
    /// be split where chunks meet).
    fn for_each_run(&self, chunk_bits: u32, mut f: impl FnMut(u64, u64)) {
        for (i, chunk) in self.chunks.iter().enumerate() {
            let base = (i as u64).checked_shl(chunk_bits).unwrap_or(u64::MAX);
            let limit = chunk_limit(self.granules, i as u64, chunk_bits);
            match chunk {
                Chunk::Zeros => {}
                Chunk::Ones => f(base, base.saturating_add(limit)),
                Chunk::Bits(words) => {
                    let mut bit = 0u64;
                    while let Some(start) = next_set(words, bit, limit, true) {
                        let end = next_set(words, start, limit, false).unwrap_or(limit);
                        f(base.saturating_add(start), base.saturating_add(end));
                        bit = end;
                    }
                }
            }
        }
    }
}

/// The first bit at or after `from` and before `limit` that is set (`set`) or clear.
fn next_set(words: &[u64], from: u64, limit: u64, set: bool) -> Option<u64> {
    let mut bit = from;
    while bit < limit {
        let word_index = usize::try_from(bit / 64).ok()?;
        let word = *words.get(word_index)?;
        let word = if set { word } else { !word };
        let rest = word.checked_shr((bit % 64) as u32).unwrap_or(0);
        if rest != 0 {
            let found = bit.saturating_add(u64::from(rest.trailing_zeros()));
            return (found < limit).then_some(found);
        }
        bit = (bit / 64).saturating_add(1).saturating_mul(64);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::testing::run;
    use crate::format::extension::ExtensionKind;
    use crate::format::refcount::RefcountLayout;
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// Whether any bitmap records writes.
    fn records_writes(bitmaps: &Bitmaps) -> bool {
        bitmaps
            .entries
            .iter()
            .any(|e| e.bits.as_ref().is_some_and(|b| b.enabled))
    }

    /// One step of what a [`FileSpace`] did to the file.
    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, Vec<u8>),
        SetLen(u64),
        Barrier,
    }

    /// A [`Space`] over an image file made by QEMU: clusters allocated at the end of the
    /// file, refcounts (any width) raised and dropped in place (a new refcount block when
    /// needed), the header's bitmaps extension rewritten in place. Every write is logged,
    /// with the barriers, to replay power cuts; `fail_at` makes write number N fail.
    struct FileSpace {
        file: std::fs::File,
        cluster_bits: u32,
        layout: RefcountLayout,
        reftable_offset: u64,
        reftable_entries: u64,
        extension_at: u64,
        end: u64,
        log: Vec<Op>,
        fail_at: Option<usize>,
        writes: usize,
    }

    impl FileSpace {
        fn open(path: &Path) -> FileSpace {
            let image = Qcow2::open_path(path).unwrap();
            let h = &image.header;
            let extension_at = h
                .extensions()
                .iter()
                .find(|e| e.kind == ExtensionKind::Bitmaps)
                .map(|e| e.offset)
                .unwrap();
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .unwrap();
            let cluster = h.cluster_size();
            let end = file.metadata().unwrap().len().next_multiple_of(cluster);
            FileSpace {
                file,
                cluster_bits: h.cluster_bits(),
                layout: RefcountLayout {
                    cluster_bits: h.cluster_bits(),
                    order: h.refcount_order(),
                },
                reftable_offset: h.refcount_table_offset(),
                reftable_entries: u64::from(h.refcount_table_clusters()) * cluster / 8,
                extension_at,
                end,
                log: Vec::new(),
                fail_at: None,
                writes: 0,
            }
        }

        fn cluster(&self) -> u64 {
            1 << self.cluster_bits
        }

        fn put(&mut self, offset: u64, data: &[u8]) -> Result<()> {
            self.writes += 1;
            if self.fail_at == Some(self.writes) {
                return Err(Error::io("test write", std::io::Error::other("injected")));
            }
            self.file.write_all_at(data, offset).unwrap();
            self.log.push(Op::Write(offset, data.to_vec()));
            Ok(())
        }

        fn read(&self, offset: u64, len: u64) -> Vec<u8> {
            let mut buf = vec![0; len as usize];
            let n = crate::base::io::read_up_to(&self.file, offset, &mut buf).unwrap();
            buf.truncate(len as usize);
            let _ = n; // past the end of the file reads as zeros
            buf
        }

        fn add_refcount(&mut self, cluster: u64, delta: i64) -> Result<()> {
            let (table_index, index) = self.layout.locate(cluster);
            assert!(
                table_index < self.reftable_entries,
                "refcount table too small for the test"
            );
            let entry_at = self.reftable_offset + table_index * 8;
            let mut block = u64::from_be_bytes(self.read(entry_at, 8).try_into().unwrap());
            if block == 0 {
                assert!(delta > 0, "freeing a cluster without a refcount block");
                block = self.end;
                self.end += self.cluster();
                self.put(block, &vec![0; self.cluster() as usize])?;
                self.put(entry_at, &block.to_be_bytes())?;
                self.add_refcount(block >> self.cluster_bits, 1)?;
            }
            let mut data = self.read(block, self.cluster());
            let old = self.layout.get(&data, index);
            let new = old.checked_add_signed(delta).expect("refcount below zero");
            assert!(self.layout.set(&mut data, index, new), "refcount overflow");
            self.put(block, &data)
        }
    }

    impl Space for FileSpace {
        fn cluster_bits(&self) -> u32 {
            self.cluster_bits
        }

        fn allocate(&mut self, len: u64) -> Result<u64> {
            let offset = self.end;
            let clusters = len.div_ceil(self.cluster()).max(1);
            self.end += clusters * self.cluster();
            self.file.set_len(self.end).unwrap();
            for c in 0..clusters {
                self.add_refcount((offset >> self.cluster_bits) + c, 1)?;
            }
            Ok(offset)
        }

        fn free(&mut self, offset: u64, len: u64) -> Result<()> {
            for c in 0..len.div_ceil(self.cluster()).max(1) {
                self.add_refcount((offset >> self.cluster_bits) + c, -1)?;
            }
            Ok(())
        }

        fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
            self.put(offset, data)
        }

        fn barrier(&mut self) -> Result<()> {
            self.log.push(Op::Barrier);
            Ok(())
        }

        fn set_bitmaps_extension(&mut self, e: Option<BitmapsExtension>) -> Result<()> {
            let e = e.expect("the tests never drop the extension");
            let mut data = Vec::new();
            data.extend(e.nb_bitmaps.to_be_bytes());
            data.extend(0u32.to_be_bytes());
            data.extend(e.directory_size.to_be_bytes());
            data.extend(e.directory_offset.to_be_bytes());
            self.put(self.extension_at, &data)?;
            self.barrier()
        }
    }

    /// A fresh directory, removed when the test passes.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let dir = std::env::temp_dir().join(format!("qcow2-bm-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }
        fn join(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    /// What a guest write does to the bitmaps: the qemu-io command and the range.
    #[derive(Debug, Clone, Copy)]
    enum Kind {
        Write,
        Zero,
        ZeroUnmap,
        Discard,
    }

    fn qemu_io_command(kind: Kind, pos: u64, len: u64) -> String {
        match kind {
            Kind::Write => format!("write -P 0x5a {pos} {len}"),
            Kind::Zero => format!("write -z {pos} {len}"),
            Kind::ZeroUnmap => format!("write -z -u {pos} {len}"),
            Kind::Discard => format!("discard {pos} {len}"),
        }
    }

    /// Random writes, aligned and not, some crossing or covering whole data clusters of the
    /// finest bitmap, within a guest of `size` bytes.
    fn random_ops(seed: u64, size: u64, count: usize) -> Vec<(Kind, u64, u64)> {
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        (0..count)
            .map(|_| {
                let kind = match next() % 4 {
                    0 => Kind::Write,
                    1 => Kind::Zero,
                    2 => Kind::ZeroUnmap,
                    _ => Kind::Discard,
                };
                let (pos, len) = match next() % 3 {
                    0 => (next() % size, 1 + next() % 5000),
                    1 => ((next() % (size >> 12)) << 12, 4096 << (next() % 4)),
                    _ => (next() % size, 1 + next() % (3 << 20)),
                };
                let len = len.min(size - pos).max(1);
                (kind, pos.min(size - 1), len)
            })
            .collect()
    }

    /// Each bitmap's name, flags, granularity and dirty extents (`None` when in use).
    type Dump = Vec<(String, Vec<&'static str>, u64, Option<Vec<(u64, u64)>>)>;

    fn dump(path: &Path) -> Dump {
        let image = Qcow2::open_path(path).unwrap();
        image
            .bitmaps()
            .iter()
            .map(|b| {
                let extents = (!b.in_use()).then(|| {
                    image
                        .dirty_extents(&b.name)
                        .unwrap()
                        .map(|e| e.map(|e| (e.start, e.length)))
                        .collect::<Result<Vec<_>>>()
                        .unwrap()
                });
                (b.name.clone(), b.flag_names(), b.granularity, extents)
            })
            .collect()
    }

    /// `qemu-img check`: no corruption, and no leaks unless `leaks_allowed`.
    fn check_clean(img: &Path, path: &Path, leaks_allowed: bool) {
        let out = Command::new(img)
            .args(["check", "--output=json"])
            .arg(path)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        let code = out.status.code();
        let ok = code == Some(0) || (leaks_allowed && code == Some(3));
        assert!(
            ok,
            "qemu-img check {path:?}: exit {code:?}\n{report}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!report.contains("\"corruptions\""), "{report}");
        if !leaks_allowed {
            assert!(!report.contains("\"leaks\""), "{report}");
        }
    }

    /// Load, mark in use, record, store, through a [`FileSpace`].
    fn open_for_writing(path: &Path) -> (Bitmaps, FileSpace) {
        let image = Qcow2::open_path(path).unwrap();
        let bitmaps = Bitmaps::load(&image).unwrap().unwrap();
        drop(image);
        (bitmaps, FileSpace::open(path))
    }

    /// An image QEMU made, with bitmaps at granularities 512 B to 64 KiB (one disabled, one
    /// with bits QEMU set before), `size` bytes, clusters of `cluster` bytes.
    fn make_image(
        img: &Path,
        io: &Path,
        dir: &Dir,
        cluster: u64,
        size: u64,
        opts: &str,
    ) -> PathBuf {
        let path = dir.join("ours.qcow2");
        run(Command::new(img)
            .args(["create", "-q", "-f", "qcow2", "-o"])
            .arg(format!("cluster_size={cluster}{opts}"))
            .arg(&path)
            .arg(size.to_string()));
        add_bitmaps(img, io, &path, size);
        path
    }

    /// Add the bitmaps of [`make_image`] to `path`, and let QEMU set bits in them.
    fn add_bitmaps(img: &Path, io: &Path, path: &Path, size: u64) {
        for (name, granularity, extra) in [
            ("g512", "512", None),
            ("g4k", "4096", None),
            ("g64k", "65536", None),
            ("off", "4096", Some("--disable")),
        ] {
            let mut cmd = Command::new(img);
            cmd.args(["bitmap", "--add", "-g", granularity]);
            if let Some(extra) = extra {
                cmd.arg(extra);
            }
            run(cmd.arg(path).arg(name));
        }
        // Bits set before, by QEMU, in the enabled bitmaps.
        run(Command::new(io)
            .args(["-f", "qcow2", "-c", "write -P 1 4096 8192", "-c"])
            .arg(format!("write -P 2 {} 512", size - 512))
            .arg(path));
    }

    fn qemu_run_ops(io: &Path, path: &Path, ops: &[(Kind, u64, u64)]) {
        let mut cmd = Command::new(io);
        cmd.args(["-f", "qcow2"]);
        for &(kind, pos, len) in ops {
            cmd.arg("-c").arg(qemu_io_command(kind, pos, len));
        }
        run(cmd.arg(path));
    }

    /// The same writes recorded by this module and by QEMU (qemu-io on a copy) give the same
    /// bits in every bitmap, the same flags; `qemu-img check` is clean with no leaks.
    fn same_bits_as_qemu(test: &str, cluster: u64, size: u64, opts: &str, seed: u64) {
        let Some((img, io)) = crate::base::testing::qemu_img_and_io(test) else {
            return;
        };
        let dir = Dir::new(test);
        let ours = make_image(&img, &io, &dir, cluster, size, opts);
        let theirs = dir.join("theirs.qcow2");
        std::fs::copy(&ours, &theirs).unwrap();
        let before = dump(&ours);

        let table_before = Qcow2::open_path(&ours).unwrap().bitmaps()[3].table_offset;
        let (mut bitmaps, mut space) = open_for_writing(&ours);
        bitmaps.mark_in_use(&mut space).unwrap();
        let marked = dump(&ours);
        for ((name, flags, ..), (_, old, ..)) in marked.iter().zip(&before) {
            assert!(flags.contains(&"in-use"), "{name}: {flags:?}");
            assert_eq!(flags.contains(&"auto"), old.contains(&"auto"), "{name}");
        }
        check_clean(&img, &ours, false);

        let ops = random_ops(seed, size, 40);
        for &(_, pos, len) in &ops {
            bitmaps.record(pos, len);
        }
        bitmaps.store(&mut space).unwrap();
        let written = space.log.len();
        bitmaps.store(&mut space).unwrap();
        assert_eq!(space.log.len(), written, "a second store writes nothing");
        drop(space);
        qemu_run_ops(&io, &theirs, &ops);
        // The disabled bitmap's table did not change: the new directory names it again
        // (QEMU writes it anew).
        let table = |path: &Path| Qcow2::open_path(path).unwrap().bitmaps()[3].table_offset;
        assert_eq!(table(&ours), table_before);

        let (ours_now, theirs_now) = (dump(&ours), dump(&theirs));
        assert_eq!(ours_now, theirs_now, "ops {ops:?}");
        assert_eq!(ours_now[3], before[3], "the disabled bitmap is unchanged");
        assert_ne!(ours_now[0], before[0], "the writes were recorded");
        check_clean(&img, &ours, false);
        assert_eq!(bitmaps.list(), Qcow2::open_path(&ours).unwrap().bitmaps());
    }

    #[test]
    fn same_bits_as_qemu_512_byte_clusters() {
        // 4096 bits a data cluster: 2 MiB of guest at 512 B granularity, 4 clusters.
        same_bits_as_qemu("c512", 512, 8 << 20, "", 1);
        same_bits_as_qemu("c512b", 512, (8 << 20) + 3584, "", 2);
    }

    #[test]
    fn same_bits_as_qemu_4k_clusters_refcount_widths() {
        same_bits_as_qemu("c4k", 4096, 64 << 20, "", 3);
        same_bits_as_qemu("c4k-r1", 4096, 64 << 20, ",refcount_bits=1", 4);
        same_bits_as_qemu("c4k-r64", 4096, 64 << 20, ",refcount_bits=64", 5);
    }

    #[test]
    fn same_bits_as_qemu_64k_clusters() {
        same_bits_as_qemu("c64k", 65536, 100 << 20, "", 6);
    }

    /// Bits as booleans, one a granule, from a bitmap's chunks.
    fn granule_bits(bits: &Bits, chunk_bits: u32) -> Vec<bool> {
        let mut out = Vec::new();
        for (i, chunk) in bits.chunks.iter().enumerate() {
            let limit = chunk_limit(bits.granules, i as u64, chunk_bits);
            for bit in 0..limit {
                out.push(match chunk {
                    Chunk::Zeros => false,
                    Chunk::Ones => true,
                    Chunk::Bits(words) => words[(bit / 64) as usize] >> (bit % 64) & 1 == 1,
                });
            }
        }
        out
    }

    #[test]
    fn record_sets_the_granules_a_range_touches_at_every_granularity() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for cluster_bits in [9u32, 12] {
            for granularity_bits in [9u32, 10, 13, 16] {
                let chunk_bits = cluster_bits + 3;
                // Several data clusters and a partial last granule.
                let guest = (3u64 << (chunk_bits + granularity_bits)) + 1000;
                let granules = guest.div_ceil(1 << granularity_bits);
                let chunks = granules.div_ceil(1 << chunk_bits) as usize;
                let mut bits = Bits {
                    enabled: true,
                    granularity_bits,
                    granules,
                    table: vec![DataCluster::Zeros; chunks],
                    chunks: vec![Chunk::Zeros; chunks],
                    changed: vec![false; chunks],
                };
                let mut model = vec![false; granules as usize];
                for round in 0..300 {
                    let pos = next() % guest;
                    let len = match round % 3 {
                        0 => 1 + next() % 3000,
                        1 => 1 + next() % (guest / 2),
                        _ => (1 << granularity_bits) - pos % (1 << granularity_bits),
                    }
                    .min(guest - pos);
                    bits.set(pos, pos + len, chunk_bits);
                    let first = pos >> granularity_bits;
                    let last = (pos + len - 1) >> granularity_bits;
                    for g in first..=last {
                        model[g as usize] = true;
                    }
                    assert_eq!(
                        granule_bits(&bits, chunk_bits),
                        model,
                        "cluster_bits {cluster_bits} granularity_bits {granularity_bits} \
                         after {pos}+{len}"
                    );
                }
                assert!(
                    bits.chunks.contains(&Chunk::Ones),
                    "whole clusters become all-ones"
                );
                assert!(bits.changed.iter().all(|&c| c));
            }
        }
    }

    #[test]
    fn record_skips_disabled_and_inconsistent_bitmaps() {
        let bits = |enabled| Bits {
            enabled,
            granularity_bits: 16,
            granules: 16,
            table: vec![DataCluster::Zeros],
            chunks: vec![Chunk::Zeros],
            changed: vec![false],
        };
        let bitmap = parse_fixture_bitmap();
        let mut bitmaps = Bitmaps {
            entries: vec![
                Entry {
                    bitmap: bitmap.clone(),
                    bits: Some(bits(true)),
                },
                Entry {
                    bitmap: bitmap.clone(),
                    bits: Some(bits(false)),
                },
                Entry { bitmap, bits: None },
            ],
            extension: Some(BitmapsExtension {
                nb_bitmaps: 3,
                directory_size: 0,
                directory_offset: 0,
            }),
            cluster_bits: 16,
        };
        assert!(records_writes(&bitmaps));
        bitmaps.record(65536, 0);
        assert!(!bitmaps.entries[0].bits.as_ref().unwrap().changed[0]);
        bitmaps.record(65535, 2);
        let recorded = |i: usize| {
            bitmaps.entries[i]
                .bits
                .as_ref()
                .map(|b| granule_bits(b, 19))
        };
        assert_eq!(recorded(0).unwrap()[..3], [true, true, false]);
        assert!(recorded(1).unwrap().iter().all(|&b| !b));
        assert_eq!(recorded(2), None);
    }

    /// A directory entry to build `Bitmaps` by hand.
    fn parse_fixture_bitmap() -> Bitmap {
        let image = Qcow2::open_path("fixtures/bitmaps.qcow2").unwrap();
        image.bitmaps()[0].clone()
    }

    /// Set the in-use flag of bitmap `index` in the file, as a crash of QEMU leaves it.
    fn patch_in_use(path: &Path, index: usize) {
        let image = Qcow2::open_path(path).unwrap();
        let at = image.bitmaps()[index].entry_offset + 12;
        let flags = image.bitmaps()[index].flags | FLAG_IN_USE;
        drop(image);
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.write_all_at(&flags.to_be_bytes(), at).unwrap();
    }

    /// A bitmap found in use (a crash) is kept as QEMU keeps it: still in use, not written,
    /// while the others are stored as usual.
    #[test]
    fn a_bitmap_in_use_at_open_stays_in_use_as_qemu_leaves_it() {
        let test = "inuse";
        let Some((img, io)) = crate::base::testing::qemu_img_and_io(test) else {
            return;
        };
        let dir = Dir::new(test);
        let ours = make_image(&img, &io, &dir, 4096, 16 << 20, "");
        patch_in_use(&ours, 1);
        let theirs = dir.join("theirs.qcow2");
        std::fs::copy(&ours, &theirs).unwrap();
        let (mut bitmaps, mut space) = open_for_writing(&ours);
        assert!(bitmaps.entries[1].bits.is_none());
        bitmaps.mark_in_use(&mut space).unwrap();
        let ops = random_ops(11, 16 << 20, 20);
        for &(_, pos, len) in &ops {
            bitmaps.record(pos, len);
        }
        bitmaps.store(&mut space).unwrap();
        drop(space);
        qemu_run_ops(&io, &theirs, &ops);
        let ours_now = dump(&ours);
        assert_eq!(ours_now, dump(&theirs));
        assert_eq!(ours_now[1].1, ["in-use", "auto"]);
        check_clean(&img, &ours, false);
        // Every bitmap in use: nothing to write, at open or at close.
        for i in [0, 2, 3] {
            patch_in_use(&ours, i);
        }
        let len = std::fs::metadata(&ours).unwrap().len();
        let (mut bitmaps, mut space) = open_for_writing(&ours);
        assert!(!records_writes(&bitmaps));
        bitmaps.mark_in_use(&mut space).unwrap();
        bitmaps.record(0, 1 << 20);
        bitmaps.store(&mut space).unwrap();
        assert!(space.log.is_empty(), "{:?}", space.log.len());
        assert_eq!(std::fs::metadata(&ours).unwrap().len(), len);
    }

    /// What a store may leave after a crash: the directory before the store (bitmaps in use)
    /// or after it.
    fn assert_old_or_new(d: &Dump, marked: &Dump, after: &Dump, what: &str) {
        assert!(d == marked || d == after, "{what}: {d:?}");
    }

    /// Replay the log of one open-record-store onto the file as it was, cut at every write
    /// (a kill) and with every single write of the last epoch lost and random subsets of it
    /// (a power cut: what reached the disk since the last barrier is any subset): `qemu-img
    /// check` finds no corruption, and the bitmaps are the old ones or the new ones.
    #[test]
    fn a_crash_at_any_write_leaves_old_or_new_bitmaps() {
        let test = "crash";
        let Some((img, io)) = crate::base::testing::qemu_img_and_io(test) else {
            return;
        };
        let dir = Dir::new(test);
        let ours = make_image(&img, &io, &dir, 512, 8 << 20, "");
        let original = std::fs::read(&ours).unwrap();
        let before = dump(&ours);
        let (mut bitmaps, mut space) = open_for_writing(&ours);
        bitmaps.mark_in_use(&mut space).unwrap();
        let marked = dump(&ours);
        for &(_, pos, len) in &random_ops(21, 8 << 20, 30) {
            bitmaps.record(pos, len);
        }
        bitmaps.store(&mut space).unwrap();
        let after = dump(&ours);
        let log = std::mem::take(&mut space.log);
        drop(space);

        replay_power_cuts(&img, &dir, &original, &log, [&before, &marked, &after]);
    }

    /// Replay `log` onto `original`, cut at every write of each epoch (between barriers) and
    /// with single writes and random subsets of the epoch lost: `qemu-img check` finds no
    /// corruption, and the bitmaps are `states[0]` (before anything, only in the first
    /// epoch), `states[1]` (marked in use) or `states[2]` (stored).
    fn replay_power_cuts(img: &Path, dir: &Dir, original: &[u8], log: &[Op], states: [&Dump; 3]) {
        let [before, marked, after] = states;
        let epochs: Vec<&[Op]> = log.split(|op| matches!(op, Op::Barrier)).collect();
        assert!(epochs.len() >= 3, "{}", epochs.len());
        let crash = dir.join("crash.qcow2");
        let mut seed = 0x1234_5678u64;
        let mut cases = 0;
        for (k, epoch) in epochs.iter().enumerate() {
            let done: Vec<&Op> = epochs[..k].iter().flat_map(|e| e.iter()).collect();
            let mut subsets: Vec<Vec<bool>> = (0..=epoch.len())
                .map(|cut| (0..epoch.len()).map(|i| i < cut).collect())
                .collect();
            for lost in 0..epoch.len() {
                subsets.push((0..epoch.len()).map(|i| i != lost).collect());
            }
            for _ in 0..8 {
                subsets.push(
                    (0..epoch.len())
                        .map(|_| {
                            seed ^= seed << 13;
                            seed ^= seed >> 7;
                            seed ^= seed << 17;
                            seed & 1 == 1
                        })
                        .collect(),
                );
            }
            for kept in subsets {
                let mut file = original.to_vec();
                let chosen = epoch
                    .iter()
                    .zip(&kept)
                    .filter(|(_, &k)| k)
                    .map(|(op, _)| op);
                for op in done.iter().copied().chain(chosen) {
                    match op {
                        Op::Write(at, data) => {
                            let end = *at as usize + data.len();
                            if file.len() < end {
                                file.resize(end, 0);
                            }
                            file[*at as usize..end].copy_from_slice(data);
                        }
                        Op::SetLen(len) => file.resize(*len as usize, 0),
                        Op::Barrier => {}
                    }
                }
                std::fs::write(&crash, &file).unwrap();
                check_clean(img, &crash, true);
                let d = dump(&crash);
                let what = format!("epoch {k} kept {kept:?}");
                if k == 0 {
                    assert!(d == *before || d == *marked, "{what}: {d:?}");
                } else {
                    assert_old_or_new(&d, marked, after, &what);
                }
                cases += 1;
            }
        }
        assert!(cases > 50, "{cases}");
    }

    /// A file whose writes, length changes and syncs are logged, for the writer's own
    /// [`Space`](super::space::FileSpace).
    struct LoggedFile {
        file: std::fs::File,
        log: std::sync::Mutex<Vec<Op>>,
    }

    impl ReadAt for LoggedFile {
        fn read_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<usize> {
            ReadAt::read_at(&self.file, pos, buf)
        }
    }

    impl crate::base::io::PositionalSink for LoggedFile {
        fn write_all_at(&self, pos: u64, buf: &[u8]) -> std::io::Result<()> {
            self.log.lock().unwrap().push(Op::Write(pos, buf.to_vec()));
            FileExt::write_all_at(&self.file, buf, pos)
        }

        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.log.lock().unwrap().push(Op::SetLen(len));
            self.file.set_len(len)
        }
    }

    impl crate::base::io::Storage for LoggedFile {
        fn length(&self) -> std::io::Result<u64> {
            Ok(self.file.metadata()?.len())
        }

        fn sync(&self) -> std::io::Result<()> {
            self.log.lock().unwrap().push(Op::Barrier);
            Ok(())
        }
    }

    /// The same, through the writer's own Space (its refcounts, write-back and header
    /// rewrite), with the frees applied by a flush as the writer's close does.
    #[test]
    fn a_crash_at_any_write_through_the_writers_space_is_harmless() {
        let test = "crash-space";
        let Some((img, io)) = crate::base::testing::qemu_img_and_io(test) else {
            return;
        };
        let dir = Dir::new(test);
        let path = make_image(&img, &io, &dir, 512, 8 << 20, "");
        let original = std::fs::read(&path).unwrap();
        let before = dump(&path);
        let image = Qcow2::open_path(&path).unwrap();
        let mut bitmaps = Bitmaps::load(&image).unwrap().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let file_len = file.metadata().unwrap().len();
        let io = LoggedFile {
            file,
            log: std::sync::Mutex::new(Vec::new()),
        };
        let h = &image.header;
        let layout = RefcountLayout {
            cluster_bits: h.cluster_bits(),
            order: h.refcount_order(),
        };
        let refs = super::super::refcounts::Refcounts::load(
            &io,
            layout,
            h.refcount_table_offset(),
            u64::from(h.refcount_table_clusters()),
            file_len,
            &image.limits,
        )
        .unwrap();
        let tables = super::super::tables::Tables::new(
            image.geometry,
            image.l1.to_vec(),
            h.l1_table_offset(),
            1 << 20,
        );
        let mut meta = super::super::writeback::Metadata {
            tables,
            refs,
            unsynced: false,
            file_len,
        };
        let mut space = super::super::space::FileSpace {
            io: &io,
            meta: &mut meta,
            data: None,
            cluster_bits: h.cluster_bits(),
        };
        bitmaps.mark_in_use(&mut space).unwrap();
        let marked = dump(&path);
        for &(_, pos, len) in &random_ops(22, 8 << 20, 30) {
            bitmaps.record(pos, len);
        }
        bitmaps.store(&mut space).unwrap();
        meta.flush(&io, None).unwrap();
        meta.write_back(&io, None).unwrap();
        let after = dump(&path);
        check_clean(&img, &path, false);
        let log = std::mem::take(&mut *io.log.lock().unwrap());
        replay_power_cuts(&img, &dir, &original, &log, [&before, &marked, &after]);
    }

    /// A write that fails during the store: an error, an image QEMU finds consistent with the
    /// old bitmaps (in use) or the new ones; once the header has not moved, the clusters
    /// allocated are freed, and a second store succeeds with the same bits.
    #[test]
    fn a_failed_write_during_store_leaves_a_consistent_image() {
        let test = "fail";
        let Some((img, io)) = crate::base::testing::qemu_img_and_io(test) else {
            return;
        };
        let dir = Dir::new(test);
        let base = make_image(&img, &io, &dir, 512, 8 << 20, "");
        let ops = random_ops(31, 8 << 20, 25);
        let run_store = |path: &Path, fail_at: Option<usize>| {
            let (mut bitmaps, mut space) = open_for_writing(path);
            bitmaps.mark_in_use(&mut space).unwrap();
            for &(_, pos, len) in &ops {
                bitmaps.record(pos, len);
            }
            space.writes = 0;
            space.fail_at = fail_at;
            let result = bitmaps.store(&mut space);
            (result, bitmaps, space)
        };
        let whole = dir.join("whole.qcow2");
        std::fs::copy(&base, &whole).unwrap();
        let (result, _, space) = run_store(&whole, None);
        result.unwrap();
        let total = space.writes;
        drop(space);
        let after = dump(&whole);
        let copy = dir.join("copy.qcow2");
        let mut failed_before_move = 0;
        for n in 1..=total {
            std::fs::copy(&base, &copy).unwrap();
            let (result, mut bitmaps, mut space) = run_store(&copy, Some(n));
            assert!(
                result.is_err(),
                "write {n} of {total} failed, yet store succeeded"
            );
            let d = dump(&copy);
            check_clean(&img, &copy, true);
            if d != after {
                failed_before_move += 1;
                assert!(
                    d.iter().all(|b| b.1.contains(&"in-use")),
                    "write {n}: {d:?}"
                );
                space.fail_at = None;
                bitmaps.store(&mut space).unwrap();
                drop(space);
                assert_eq!(dump(&copy), after, "retry after write {n} failed");
                check_clean(&img, &copy, true);
            }
        }
        assert!(
            failed_before_move > 5 && failed_before_move < total,
            "{failed_before_move}"
        );
    }

    /// Runs of set bits, across words and chunks, as a merge reads them.
    #[test]
    fn runs_of_set_bits() {
        let mut words = vec![0u64; 4];
        set_bits(&mut words, 3, 70);
        set_bits(&mut words, 128, 129);
        set_bits(&mut words, 200, 256);
        assert_eq!(next_set(&words, 0, 256, true), Some(3));
        assert_eq!(next_set(&words, 3, 256, false), Some(70));
        assert_eq!(next_set(&words, 200, 256, false), None);
        assert_eq!(next_set(&words, 200, 230, true), Some(200));
        assert_eq!(next_set(&words, 130, 200, true), None);
        let bits = Bits {
            enabled: true,
            granularity_bits: 9,
            granules: 256 + 100,
            table: Vec::new(),
            chunks: vec![Chunk::Bits(words.into_boxed_slice()), Chunk::Ones],
            changed: vec![false; 2],
        };
        let mut runs = Vec::new();
        bits.for_each_run(8, |from, to| runs.push((from, to)));
        assert_eq!(runs, [(3, 70), (128, 129), (200, 256), (256, 356)]);
        // Merged into a coarser bitmap: each run sets the granules it overlaps.
        let mut coarse = Bits {
            granularity_bits: 12,
            granules: 356usize.div_ceil(8) as u64,
            chunks: vec![Chunk::Zeros],
            ..bits.clone()
        };
        for (from, to) in runs {
            coarse.set(from << 9, to << 9, 8);
        }
        let Chunk::Bits(w) = &coarse.chunks[0] else {
            panic!("{:?}", coarse.chunks[0])
        };
        let mut expected = vec![0u64; 4];
        set_bits(&mut expected, 0, 9);
        set_bits(&mut expected, 16, 17);
        set_bits(&mut expected, 25, 45);
        assert_eq!(&w[..], &expected[..]);
    }

    #[test]
    fn a_data_cluster_named_twice_is_refused() {
        let test = "twice";
        let Some((img, io)) = crate::base::testing::qemu_img_and_io(test) else {
            return;
        };
        let dir = Dir::new(test);
        let path = make_image(&img, &io, &dir, 512, 8 << 20, "");
        let image = Qcow2::open_path(&path).unwrap();
        let b = image.bitmap("g512").unwrap().clone();
        let table = read_table(&image.io, &b, image.guest_size(), 9).unwrap();
        let DataCluster::At(data) = table[0] else {
            panic!("{table:?}")
        };
        drop(image);
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&data.to_be_bytes(), b.table_offset + 8)
            .unwrap();
        let image = Qcow2::open_path(&path).unwrap();
        let err = Bitmaps::load(&image).unwrap_err();
        assert!(err.to_string().contains("named twice"), "{err}");
    }

    /// Set the guest size in the header (the writer's resize does this; here only the
    /// bitmaps are tested).
    fn patch_size(path: &Path, size: u64) {
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.write_all_at(&size.to_be_bytes(), 24).unwrap();
    }

    /// Writes, resizes, more writes: the same bitmaps as qemu-io's `truncate` between the same
    /// writes, growing (the new part clean), shrinking (bits past the end gone, clusters past
    /// it freed: no leaks) and growing back (the bits past the shrunk end stay clear), to
    /// sizes that end inside a granule and a data cluster and at a data cluster's edge.
    #[test]
    fn resize_follows_qemu() {
        let test = "resize";
        let Some((img, io)) = crate::base::testing::qemu_img_and_io(test) else {
            return;
        };
        let mib = 1u64 << 20;
        // 512 B clusters: a data cluster holds 4096 bits, 2 MiB at 512 B granularity.
        let cases: [(u64, &[u64]); 6] = [
            (512, &[8 * mib, 20 * mib + 3584]),
            (512, &[8 * mib, 3 * mib + 1536, 8 * mib]),
            (512, &[8 * mib, 4 * mib]),
            (512, &[5 * mib + 512, 9 * mib, 2 * mib - 512, 10 * mib]),
            (65536, &[64 * mib, 23 * mib + 512]),
            (65536, &[16 * mib, 300 * mib]),
        ];
        for (cluster, sizes) in cases {
            let dir = Dir::new(&format!("{test}-{cluster}-{}", sizes[1]));
            let largest = sizes.iter().copied().max().unwrap();
            // Made at the largest size, then shrunk: the L1 table keeps room for growing
            // (the writer's resize grows it; here only the bitmaps are tested).
            let ours = dir.join("ours.qcow2");
            run(Command::new(&img)
                .args(["create", "-q", "-f", "qcow2", "-o"])
                .arg(format!("cluster_size={cluster}"))
                .arg(&ours)
                .arg(largest.to_string()));
            run(Command::new(&img)
                .args(["resize", "-q", "--shrink"])
                .arg(&ours)
                .arg(sizes[0].to_string()));
            add_bitmaps(&img, &io, &ours, sizes[0]);
            let theirs = dir.join("theirs.qcow2");
            std::fs::copy(&ours, &theirs).unwrap();
            let (mut bitmaps, mut space) = open_for_writing(&ours);
            bitmaps.mark_in_use(&mut space).unwrap();
            let mut cmd = Command::new(&io);
            cmd.args(["-f", "qcow2"]);
            for (i, &size) in sizes.iter().enumerate() {
                if i > 0 {
                    bitmaps.resize(size).unwrap();
                    cmd.arg("-c").arg(format!("truncate {size}"));
                }
                for (kind, pos, len) in random_ops(size ^ i as u64, size, 25) {
                    bitmaps.record(pos, len);
                    cmd.arg("-c").arg(qemu_io_command(kind, pos, len));
                }
            }
            patch_size(&ours, *sizes.last().unwrap());
            bitmaps.store(&mut space).unwrap();
            drop(space);
            run(cmd.arg(&theirs));
            assert_eq!(dump(&ours), dump(&theirs), "{cluster} {sizes:?}");
            check_clean(&img, &ours, false);
        }
    }

    #[test]
    fn resize_refuses_what_qemu_refuses() {
        let test = "resize-refused";
        let Some((img, io)) = crate::base::testing::qemu_img_and_io(test) else {
            return;
        };
        let dir = Dir::new(test);
        let ours = make_image(&img, &io, &dir, 512, 8 << 20, "");
        let (mut bitmaps, _space) = open_for_writing(&ours);
        // At 512 B granularity and 512 B clusters, 2^20 data clusters (512 MiB of bits)
        // cover 2 TiB; one byte more needs a table QEMU does not store.
        bitmaps.resize(2 << 40).unwrap();
        let err = bitmaps.resize((2 << 40) + 1).unwrap_err();
        assert!(err.to_string().contains("too big"), "{err}");
        assert_eq!(bitmaps.entries[0].bits.as_ref().unwrap().granules, 1 << 32);
        bitmaps.resize(8 << 20).unwrap();
        // An inconsistent bitmap: QEMU refuses to resize.
        patch_in_use(&ours, 2);
        let (mut bitmaps, _space) = open_for_writing(&ours);
        let err = bitmaps.resize(16 << 20).unwrap_err();
        assert!(
            err.to_string().contains("\"g64k\" is inconsistent"),
            "{err}"
        );
    }
}
