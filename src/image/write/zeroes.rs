//! Zero writes and discards, cluster by cluster as QEMU's `zero_in_l2_slice` and
//! `discard_in_l2_slice` change the L2 entries (and the subcluster bitmaps of extended L2),
//! the released clusters freed once the new entries are durable.

// As in `guest.rs`: offsets are bounded (guest offsets within the guest, host offsets masked
// to 56 bits) and buffers are sliced within their lengths.
#![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use crate::base::io::Storage;
use crate::error::Result;
use crate::format::table::{ClusterType, ExtentKind, SUB_ALLOC_MASK};
use crate::image::write::guest::{clamp, Guest, Old, Release, MAX_RUN_BYTES};
use crate::image::write::tables::Tables;
use crate::image::write::writeback::Metadata;

/// Standard L2 entry bit 0: reads as zeros.
const OFLAG_ZERO: u64 = 1;

impl<I: Storage> Guest<'_, I> {
    /// Make `len` bytes at `pos` read as zeros, as QEMU's zero write does: whole clusters
    /// get the zero flag (freed with `unmap`, compressed ones always); a partial cluster
    /// that reads as zeros already is made a zero cluster whole, any other partial cluster
    /// is written with zeros. Version 2 images have no zero flag: without a backing file
    /// their clusters are discarded instead, over one they are written with zeros.
    pub(crate) fn write_zeroes(
        &self,
        meta: &mut Metadata,
        pos: u64,
        len: u64,
        unmap: bool,
    ) -> Result<()> {
        if self.raw_data_file() {
            self.zero_raw_data_file(meta, pos, len)?;
        }
        let cs = self.cluster_size();
        let end = pos + len;
        let mut at = pos;
        while at < end {
            let cluster = at & !(cs - 1);
            let piece_end = (cluster + cs).min(end);
            let whole_cluster =
                at == cluster && (piece_end == cluster + cs || piece_end == self.size);
            if self.image.geometry.pre_v3 {
                // No zero flag: without a backing file QEMU discards whole clusters (and a
                // partial one that reads as zeros already); otherwise zeros are written.
                let discardable =
                    !self.has_backing() && (whole_cluster || self.reads_zeros(meta, cluster)?);
                match discardable {
                    true => self.discard_cluster(meta, cluster)?,
                    false => self.write_zero_bytes(meta, at, piece_end - at)?,
                }
            } else if self.image.geometry.extended_l2 && !whole_cluster {
                self.zero_in_cluster(meta, at, piece_end)?;
            } else if whole_cluster || self.reads_zeros(meta, cluster)? {
                self.zero_cluster(meta, cluster, unmap)?;
            } else {
                self.write_zero_bytes(meta, at, piece_end - at)?;
            }
            at = piece_end;
        }
        Ok(())
    }

    /// A raw data file reads as the guest: zeros go into it too (as QEMU's
    /// `qcow2_subcluster_zeroize` writes them there first).
    fn zero_raw_data_file(&self, meta: &mut Metadata, pos: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; clamp(len, MAX_RUN_BYTES as usize)];
        let mut done = 0u64;
        while done < len {
            let n = clamp(len - done, zeros.len());
            self.write_plain(pos + done, &zeros[..n])?;
            done += n as u64;
        }
        meta.unsynced = true;
        Ok(())
    }

    pub(crate) fn write_zero_bytes(&self, meta: &mut Metadata, pos: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; clamp(len, MAX_RUN_BYTES as usize)];
        let mut done = 0u64;
        while done < len {
            let n = clamp(len - done, zeros.len());
            self.write(meta, pos + done, &zeros[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Zero `at..end` inside one cluster of an image with subclusters: whole subclusters
    /// get the zero bit, the partial ones at either end are written with zeros.
    fn zero_in_cluster(&self, meta: &mut Metadata, at: u64, end: u64) -> Result<()> {
        let (unit, _) = self.unit_of(at);
        let first = at.next_multiple_of(unit);
        let last = end / unit * unit;
        if first >= last {
            return self.write_zero_bytes(meta, at, end - at);
        }
        if at < first {
            self.write_zero_bytes(meta, at, first - at)?;
        }
        self.zero_subclusters(meta, first, last - first)?;
        if last < end {
            self.write_zero_bytes(meta, last, end - last)?;
        }
        Ok(())
    }

    /// Whether the cluster at `cluster` reads as zeros without reading data: a zero
    /// cluster, or unallocated with nothing below.
    fn reads_zeros(&self, meta: &mut Metadata, cluster: u64) -> Result<bool> {
        let entry = meta.tables.entry(&self.image.io, cluster)?;
        if entry.table == 0 {
            return Ok(!self.has_backing());
        }
        Ok(match self.kind(&entry, 0)? {
            ExtentKind::Zero { .. } => true,
            ExtentKind::Unallocated { .. } => !self.has_backing(),
            _ => false,
        })
    }

    /// Give the cluster at `cluster` the zero flag (QEMU's `zero_in_l2_slice`).
    fn zero_cluster(&self, meta: &mut Metadata, cluster: u64, unmap: bool) -> Result<()> {
        let io = &self.image.io;
        let entry = meta.tables.entry_for_write(io, &mut meta.refs, cluster)?;
        let old = self.old(&entry)?;
        let kind = self.image.geometry.cluster_type(entry.word);
        let allocated = matches!(
            kind,
            ClusterType::Normal | ClusterType::ZeroAlloc | ClusterType::Compressed
        );
        let drop = kind == ClusterType::Compressed || (unmap && allocated);
        let extended = self.image.geometry.extended_l2;
        let (word, bitmap) = match (drop, extended) {
            (true, false) => (OFLAG_ZERO, 0),
            (false, false) => (entry.word | OFLAG_ZERO, 0),
            // Subclusters: every one reads as zeros, none allocated.
            (true, true) => (0, SUB_ALLOC_MASK << 32),
            (false, true) => (entry.word, SUB_ALLOC_MASK << 32),
        };
        if (word, bitmap) == (entry.word, entry.bitmap) {
            return Ok(());
        }
        meta.tables.set(&entry, word, bitmap)?;
        if drop {
            self.release(meta, release_of(old, entry.word));
        }
        Ok(())
    }

    /// Discard `len` bytes at `pos` as QEMU's guest discard does: whole clusters only (and
    /// the partial last cluster of the disk); each reads as zeros after and its cluster is
    /// freed (nothing at all in a version 2 image over a backing file).
    pub(crate) fn discard(&self, meta: &mut Metadata, pos: u64, len: u64) -> Result<()> {
        // A version 2 image cannot mark a cluster zero: discarding over a backing file would
        // show the backing file's data, so QEMU does nothing.
        if self.image.geometry.pre_v3 && self.has_backing() {
            return Ok(());
        }
        let cs = self.cluster_size();
        let size = self.size;
        let end = pos + len;
        let mut cluster = pos.next_multiple_of(cs);
        while cluster < end {
            let cluster_end = (cluster + cs).min(size);
            if cluster_end > end {
                break;
            }
            self.discard_cluster(meta, cluster)?;
            cluster += cs;
        }
        Ok(())
    }

    /// Discard one cluster as QEMU's `discard_in_l2_slice` does: one that holds nothing of
    /// its own is left as it is (unallocated with nothing below, or already zero); any
    /// other reads as zeros after (version 3) or falls through to nothing (version 2) and
    /// its clusters are released.
    fn discard_cluster(&self, meta: &mut Metadata, cluster: u64) -> Result<()> {
        let io = &self.image.io;
        let entry = meta.tables.entry_for_write(io, &mut meta.refs, cluster)?;
        let old = self.old(&entry)?;
        let kind = self.image.geometry.cluster_type(entry.word);
        let keep = match kind {
            ClusterType::Unallocated => !self.has_backing(),
            ClusterType::ZeroPlain => true,
            ClusterType::Normal | ClusterType::ZeroAlloc | ClusterType::Compressed => false,
        };
        if keep {
            return Ok(());
        }
        if self.raw_data_file() {
            let len = self.cluster_size().min(self.size - cluster);
            self.zero_raw_data_file(meta, cluster, len)?;
        }
        let (word, bitmap) = match (self.image.geometry.pre_v3, self.image.geometry.extended_l2) {
            (true, _) => (0, 0),
            (false, true) => (0, SUB_ALLOC_MASK << 32),
            (false, false) => (OFLAG_ZERO, 0),
        };
        if (word, bitmap) == (entry.word, entry.bitmap) {
            return Ok(());
        }
        meta.tables.set(&entry, word, bitmap)?;
        self.release(meta, release_of(old, entry.word));
        Ok(())
    }
}

/// What dropping the mapping `word` (decoded as `old`) releases.
fn release_of(old: Old, word: u64) -> Release {
    match old {
        Old::Owned { .. } | Old::Zeroed { .. } => Release::Cluster(Tables::host(word)),
        Old::Elsewhere { release, .. } => release,
    }
}
