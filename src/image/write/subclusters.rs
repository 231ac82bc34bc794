//! Writing images with extended L2 entries: each cluster has 32 subclusters, each allocated,
//! zero, or left to the backing file (the entry's bitmap: allocated in bits 0-31, zero in
//! bits 32-63).
//!
//! A write goes into the cluster's own host cluster when this image alone owns it (the
//! subclusters it touches, widened to whole subclusters with what the guest read there,
//! become allocated); a cluster without one gets a new host cluster holding only the touched
//! subclusters, as QEMU allocates them. A compressed cluster, or one shared with a snapshot,
//! is copied whole into a new cluster.

// As in `guest.rs`: offsets are bounded (guest offsets within the guest, host offsets masked
// to 56 bits, subclusters within their cluster) and buffers are sliced within their lengths.
#![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use crate::base::io::Storage;
use crate::error::Result;
use crate::format::table::{self, ClusterType, SUB_ALLOC_MASK};
use crate::image::write::guest::Guest;
use crate::image::write::tables::{Entry, Tables};
use crate::image::write::writeback::Metadata;

/// Subclusters per cluster.
const SUBCLUSTERS: u64 = 32;

/// The bitmap bits of subclusters `first..end`.
fn bits(first: u64, end: u64) -> u64 {
    let upto = |n: u64| if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    upto(end) & !upto(first)
}

impl<I: Storage> Guest<'_, I> {
    fn sub_size(&self) -> u64 {
        self.cluster_size() / SUBCLUSTERS
    }

    /// Write `data` at `guest`, all within one cluster of an extended L2 image.
    pub(crate) fn write_in_subclusters(
        &self,
        meta: &mut Metadata,
        guest: u64,
        data: &[u8],
    ) -> Result<()> {
        let io = &self.image.io;
        let cs = self.cluster_size();
        let sub = self.sub_size();
        let start = guest & !(cs - 1);
        let (a, b) = (guest - start, guest - start + data.len() as u64);
        let (first, end) = (a / sub, b.div_ceil(sub));
        let entry = meta.tables.entry_for_write(io, &mut meta.refs, guest)?;
        self.check_entry(&entry)?;
        let kind = self.image.geometry.cluster_type(entry.word);
        let copied = entry.word & table::OFLAG_COPIED != 0;
        let owned = kind == ClusterType::Normal && copied;
        if !owned && kind != ClusterType::Unallocated {
            // Compressed, or shared with a snapshot: copied whole.
            return self.copy_whole_cluster(meta, &entry, start, a, data);
        }
        // The touched subclusters, widened, with what the guest reads around the data.
        let span = (first * sub, end * sub);
        let mut piece = vec![0u8; (span.1 - span.0) as usize];
        if span.0 < a || b < span.1 {
            let size = self.size;
            let len = (span.1 - span.0).min(size - (start + span.0)) as usize;
            self.read(meta, start + span.0, &mut piece[..len])?;
        }
        piece[(a - span.0) as usize..(b - span.0) as usize].copy_from_slice(data);
        let host = match owned {
            true => Tables::host(entry.word),
            false => self.new_host_cluster(meta)?,
        };
        if let Some(crypt) = &self.image.crypt {
            crypt.encrypt(host + span.0, start + span.0, &mut piece)?;
        }
        if let Err(e) = self.write_data(host + span.0, &piece) {
            if !owned && !self.external() {
                meta.refs.free_now(io, host, cs)?;
            }
            return Err(e);
        }
        meta.unsynced = true;
        let touched = bits(first, end);
        let bitmap = (entry.bitmap | touched) & !(touched << 32);
        let word = match owned {
            true => entry.word,
            false => {
                self.image
                    .geometry
                    .encode_l2(table::NewEntry::Data { host_offset: host })?
                    .0
            }
        };
        meta.tables.set(&entry, word, bitmap)
    }

    /// A host cluster for a cluster that has none: a new one, or (with an external data file)
    /// the cluster at its guest offset.
    fn new_host_cluster(&self, meta: &mut Metadata) -> Result<u64> {
        meta.refs.allocate(&self.image.io, 1)
    }

    /// Copy the cluster at `start` whole into a new one with `data` at `within`, every
    /// subcluster allocated; the old one is released.
    fn copy_whole_cluster(
        &self,
        meta: &mut Metadata,
        entry: &Entry,
        start: u64,
        within: u64,
        data: &[u8],
    ) -> Result<()> {
        let io = &self.image.io;
        let cs = self.cluster_size();
        let mut whole = vec![0u8; cs as usize];
        let len = cs.min(self.size - start) as usize;
        self.read(meta, start, &mut whole[..len])?;
        whole[within as usize..within as usize + data.len()].copy_from_slice(data);
        let host = self.new_host_cluster(meta)?;
        if let Some(crypt) = &self.image.crypt {
            crypt.encrypt(host, start, &mut whole)?;
        }
        if let Err(e) = self.write_data(host, &whole) {
            meta.refs.free_now(io, host, cs)?;
            return Err(e);
        }
        meta.unsynced = true;
        let release = self.release_of_entry(entry.word);
        meta.tables.set(
            entry,
            self.image
                .geometry
                .encode_l2(table::NewEntry::Data { host_offset: host })?
                .0,
            SUB_ALLOC_MASK,
        )?;
        self.release(meta, release);
        Ok(())
    }

    /// Make the subcluster-aligned stretch `pos..pos + len` (within one cluster, not all of
    /// it) read as zeros: its subclusters get the zero bit (QEMU's `zero_l2_subclusters`).
    /// A compressed cluster is written with zeros instead.
    pub(crate) fn zero_subclusters(&self, meta: &mut Metadata, pos: u64, len: u64) -> Result<()> {
        let io = &self.image.io;
        let cs = self.cluster_size();
        let sub = self.sub_size();
        let start = pos & !(cs - 1);
        let entry = meta.tables.entry_for_write(io, &mut meta.refs, pos)?;
        self.check_entry(&entry)?;
        if self.image.geometry.cluster_type(entry.word) == ClusterType::Compressed {
            return self.write_zero_bytes(meta, pos, len);
        }
        let touched = bits((pos - start) / sub, (pos - start + len) / sub);
        let bitmap = (entry.bitmap & !touched) | (touched << 32);
        meta.tables.set(&entry, entry.word, bitmap)
    }
}
