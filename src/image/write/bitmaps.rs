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
//! Unlike QEMU, which rewrites every data cluster of every bitmap at close, a data cluster or
//! table that did not change is kept where it is and named by the new directory too.

// The writer calls this module once it is wired in (load and mark_in_use at into_writer,
// record in every write path, store at close); until then only its tests do.
#![allow(dead_code)]

use std::collections::HashSet;

use positioned_io::ReadAt;

use super::space::Space;
use crate::base::io::read_metadata;
use crate::base::limits::Limits;
use crate::error::{Error, Result};
use crate::format::bitmap::{
    all_set, bytes_to_words, clear_from, encode_directory, encode_table, set_bits, words_to_bytes,
    Bitmap, DataCluster, FLAG_AUTO, FLAG_IN_USE,
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
    /// Where the directory is now.
    extension: BitmapsExtension,
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
#[derive(Debug)]
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
            extension,
            cluster_bits,
        }))
    }

    /// Whether any bitmap records writes: [`Bitmaps::record`] does nothing otherwise.
    pub(crate) fn records_writes(&self) -> bool {
        self.entries
            .iter()
            .any(|e| e.bits.as_ref().is_some_and(|b| b.enabled))
    }

    /// The directory's entries as they stand on disk now.
    pub(crate) fn list(&self) -> Vec<Bitmap> {
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
        if !any {
            return Ok(());
        }
        let dir = encode_directory(&marked);
        if dir.len() as u64 != self.extension.directory_size {
            // A name stored with bytes after a NUL: QEMU writes names up to the NUL, and so
            // fails here too ("Can't update bitmap directory").
            return Err(Error::UnsupportedWrite {
                what: "the bitmap directory cannot be rewritten in place (a bitmap name holds \
                       a NUL byte)"
                    .into(),
            });
        }
        space.write(self.extension.directory_offset, &dir)?;
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
        let mut plan = Plan::default();
        let written = match self.write_new(space, &mut plan) {
            Ok(written) => written,
            Err(e) => {
                plan.roll_back(space);
                return Err(e);
            }
        };
        let old = self.extension;
        self.commit(written);
        space.free(old.directory_offset, old.directory_size)?;
        for (offset, len) in plan.replaced {
            space.free(offset, len)?;
        }
        Ok(())
    }

    /// Whether the directory on disk differs from what [`Bitmaps::store`] would write.
    fn needs_store(&self) -> bool {
        self.entries.iter().any(|e| match &e.bits {
            Some(bits) => bits.changed.contains(&true) || e.bitmap.flags != bits.stored_flags(),
            None => false,
        })
    }

    /// Write the new data clusters, tables and directory, and move the header to it.
    fn write_new(&self, space: &mut dyn Space, plan: &mut Plan) -> Result<Written> {
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
                        plan.replaced
                            .push((bitmap.table_offset, table_bytes(&bitmap)));
                        bitmap.table_offset = offset;
                    }
                    bitmap.flags = bits.stored_flags();
                    Some(table)
                }
                None => None,
            };
            directory.push(bitmap);
            tables.push(table);
        }
        let bytes = encode_directory(&directory);
        let directory_size = bytes.len() as u64;
        let directory_offset = plan.allocate(space, directory_size)?;
        space.write(directory_offset, &bytes)?;
        space.barrier()?;
        let extension = BitmapsExtension {
            nb_bitmaps: self.extension.nb_bitmaps,
            directory_size,
            directory_offset,
        };
        space.set_bitmaps_extension(Some(extension))?;
        Ok(Written {
            directory,
            tables,
            extension,
        })
    }

    /// Take what [`Bitmaps::write_new`] wrote as the state on disk.
    fn commit(&mut self, written: Written) {
        let mut entry_offset = written.extension.directory_offset;
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
    extension: BitmapsExtension,
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

    /// Write the changed chunks to new clusters (an all-ones chunk needs none); the table
    /// that names them, the old clusters they replace added to `plan.replaced`.
    fn write_chunks(
        &self,
        space: &mut dyn Space,
        plan: &mut Plan,
        cluster_size: u64,
    ) -> Result<Vec<DataCluster>> {
        let chunk_bits = space.cluster_bits().saturating_add(3);
        let mut table = self.table.clone();
        let changed = self.changed.iter().zip(&self.chunks).zip(table.iter_mut());
        for (i, ((&changed, chunk), entry)) in changed.enumerate() {
            if !changed {
                continue;
            }
            let limit = chunk_limit(self.granules, i as u64, chunk_bits);
            let new = match chunk {
                Chunk::Zeros => DataCluster::Zeros,
                Chunk::Ones => DataCluster::Ones,
                Chunk::Bits(words) if all_set(words, limit) => DataCluster::Ones,
                Chunk::Bits(words) => {
                    let offset = plan.allocate(space, cluster_size)?;
                    space.write(offset, &words_to_bytes(words))?;
                    DataCluster::At(offset)
                }
            };
            if let DataCluster::At(old) = *entry {
                plan.replaced.push((old, cluster_size));
            }
            *entry = new;
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
