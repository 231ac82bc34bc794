//! Resizing, in the steps of QEMU's `qcow2_co_truncate`. Shrinking: the clusters past the
//! new end are dropped, the L1 entries past it cleared and their L2 tables freed, and the
//! file cut after its last used cluster; the header's size changes last. Growing over a
//! backing file longer than the old size: the new part is made to read as zeros first, as
//! the block layer asks QEMU to (`BDRV_REQ_ZERO_WRITE`), so that the backing file's data
//! past the old end does not appear.
//!
//! Every step goes through the writer's ordered write-back: a reference is dropped on disk
//! (durably) before the refcount of what it named is lowered. A crash part-way leaves the
//! old size with some of the clusters past the new end dropped (they read as zeros, or as
//! the backing file), and at worst leaked clusters; never a table naming a freed cluster.

use crate::base::io::Storage;
use crate::error::{Error, Result};
use crate::format::table::L1_OFFSET_MASK;
use crate::image::qcow2::Qcow2;
use crate::image::write::guest::Guest;
use crate::image::write::writeback::{barrier, write, Metadata};
use crate::image::write::Writer;

/// Bytes of one L1 entry.
const L1_ENTRY: u64 = 8;

impl<I: Storage> Writer<I> {
    /// What QEMU refuses to resize either way: a version 2 image with snapshots (their
    /// disk sizes were optional before version 3).
    pub(super) fn refuse_resize(image: &Qcow2<I>) -> Result<()> {
        if image.header.version() < 3 && !image.snapshots.is_empty() {
            return Err(Error::InvalidOption {
                option: "size".to_owned(),
                message: "Can't resize a v2 image which has snapshots".to_owned(),
            });
        }
        Ok(())
    }

    /// Whether growing from `old` needs the new part zeroed (a backing file reaches past
    /// `old`), and QEMU's refusal where it cannot be (version 2 has no zero clusters).
    pub(super) fn grown_part_needs_zeros(image: &Qcow2<I>, old: u64) -> Result<bool> {
        let exposed = image
            .backing_source()
            .is_some_and(|backing| backing.guest_size() > old);
        if exposed && image.header.version() < 3 {
            return Err(Error::InvalidOption {
                option: "size".to_owned(),
                message: "Failed to zero out new clusters: Operation not supported".to_owned(),
            });
        }
        Ok(exposed)
    }

    /// Make the guest from `old` to `size` read as zeros (the L1 table already covers
    /// `size`), durably, before the header names the new size.
    pub(super) fn zero_grown_part(
        &self,
        image: &Qcow2<I>,
        meta: &mut Metadata,
        old: u64,
        size: u64,
    ) -> Result<()> {
        let guest = Guest {
            image,
            state: &self.read_state,
            size,
        };
        guest.write_zeroes(meta, old, size.saturating_sub(old), false)?;
        meta.flush(&image.io, image.data_storage.as_deref())
    }

    /// Give an external data file the guest's new size, as QEMU truncates it (growing or
    /// shrinking) before the header names the size.
    pub(super) fn resize_data_file(image: &Qcow2<I>, size: u64) -> Result<()> {
        match image.data_storage.as_deref() {
            Some(data) => data
                .set_len(size)
                .map_err(|e| Error::io("resizing the external data file", e)),
            None => Ok(()),
        }
    }

    /// Drop everything the guest holds from `size` to `old` (`size < old`), before the
    /// header names the new size: the clusters past the end, the L2 tables wholly past it,
    /// the external data file's tail, and the image file's unused tail.
    pub(super) fn shrink_tables(
        &self,
        image: &Qcow2<I>,
        meta: &mut Metadata,
        size: u64,
        old: u64,
    ) -> Result<()> {
        let io = &image.io;
        let data = image.data_storage.as_deref();
        meta.flush(io, data)?;
        let guest = self.guest()?;
        let span = 1u64 << image.geometry.l2_bits();
        let kept_tables = size.div_ceil(span);
        // The last kept table covers the new end: its entries past it are cleared.
        let first = size.next_multiple_of(self.cluster_size);
        let table_end = kept_tables.saturating_mul(span).min(old);
        let mut at = first;
        while at < table_end {
            drop_cluster(&guest, meta, at)?;
            at = at.saturating_add(self.cluster_size);
        }
        drop_tables(&guest, meta, kept_tables, span, old)?;
        // The changed tables (and copies of shared ones) durable before the L1 entries go.
        meta.write_back(io, data)?;
        clear_l1_tail(io, meta, kept_tables)?;
        let (l1, offset) = meta.tables.l1();
        if kept_tables < l1.len() as u64 {
            // The entries past the end are zeros on disk now: forget them in memory too.
            meta.tables.moved_l1(offset, kept_tables as usize);
        }
        // The references are gone on disk: lower the refcounts, and write them.
        meta.flush(io, data)?;
        meta.write_back(io, data)?;
        Self::resize_data_file(image, size)?;
        cut_unused_tail(io, meta, self.cluster_size)
    }
}

/// Clear the entry of the cluster at guest offset `at` and release what it named (a
/// table shared with a snapshot is copied first, as for any write).
fn drop_cluster<I: Storage>(guest: &Guest<'_, I>, meta: &mut Metadata, at: u64) -> Result<()> {
    let io = &guest.image.io;
    let seen = meta.tables.entry(io, at)?;
    if seen.table == 0 || (seen.word == 0 && seen.bitmap == 0) {
        return Ok(());
    }
    let entry = meta.tables.entry_for_write(io, &mut meta.refs, at)?;
    let release = guest.release_of_entry(entry.word);
    meta.tables.set(&entry, 0, 0)?;
    guest.release(meta, release);
    Ok(())
}

/// Release every L2 table from L1 index `kept` on, and what its entries below `old` name
/// (each reference the active L1 table reached through it: a table shared with a snapshot
/// keeps the snapshot's).
fn drop_tables<I: Storage>(
    guest: &Guest<'_, I>,
    meta: &mut Metadata,
    kept: u64,
    span: u64,
    old: u64,
) -> Result<()> {
    let io = &guest.image.io;
    let cluster = guest.cluster_size();
    let tables: Vec<(u64, u64)> = meta
        .tables
        .l1()
        .0
        .iter()
        .enumerate()
        .skip(usize::try_from(kept).unwrap_or(usize::MAX))
        .map(|(i, e)| (i as u64, e & L1_OFFSET_MASK))
        .filter(|(_, table)| *table != 0)
        .collect();
    for &(index, table) in &tables {
        let start = index.saturating_mul(span);
        let end = start.saturating_add(span).min(old);
        let mut at = start;
        while at < end {
            let entry = meta.tables.entry(io, at)?;
            let release = guest.release_of_entry(entry.word);
            guest.release(meta, release);
            at = at.saturating_add(cluster);
        }
        meta.refs.free_later(table, cluster);
    }
    Ok(())
}

/// Write zeros over the L1 entries from `kept` on (QEMU keeps the table's size), durably.
fn clear_l1_tail<I: Storage>(io: &I, meta: &Metadata, kept: u64) -> Result<()> {
    let (l1, offset) = meta.tables.l1();
    let count = (l1.len() as u64).saturating_sub(kept);
    if count == 0 {
        return Ok(());
    }
    let at = offset.saturating_add(kept.saturating_mul(L1_ENTRY));
    let zeros = vec![0u8; usize::try_from(count.saturating_mul(L1_ENTRY)).unwrap_or(0)];
    write(io, at, &zeros, "L1 table")?;
    barrier(io)
}

/// Cut the image file after its last cluster in use, as QEMU does after shrinking.
fn cut_unused_tail<I: Storage>(io: &I, meta: &mut Metadata, cluster: u64) -> Result<()> {
    let mut clusters = meta.file_len.div_ceil(cluster);
    while clusters > 1 && meta.refs.get(io, clusters.saturating_sub(1))? == 0 {
        clusters = clusters.saturating_sub(1);
    }
    let len = clusters.saturating_mul(cluster);
    if len < meta.file_len {
        io.set_len(len)
            .map_err(|e| Error::io("truncating the image file", e))?;
        meta.file_len = len;
    }
    Ok(())
}
