//! A change of an image's metadata that lands whole or not at all, for the jobs that change
//! more than one structure at once (snapshots, repairs, a new refcount width).
//!
//! Every new structure goes into clusters that no live structure uses: free in the image as
//! it is (stored refcount 0, not one of its tables) and in the image as it will be. Then a
//! barrier, then one write of the header switches to the new structures, then a barrier. A
//! crash before the header write leaves the old image (the new clusters, unreferenced, are
//! not even leaks); after it, the new one. The old structures become free in the new
//! refcounts, so nothing leaks either way.
//!
//! QEMU changes its tables in place (`qcow2_update_snapshot_refcount`): a crash part-way
//! leaves refcounts and COPIED flags that disagree, which `qemu-img check` calls corruption.

use std::collections::BTreeSet;

use crate::base::io::{be_u64_words, read_metadata, Storage};
use crate::base::limits::Limits;
use crate::error::{Error, Result};
use crate::format::header::{at, SNAPSHOT_HEADER_LEN};
use crate::format::new_header::put;
use crate::format::refcount::{RefTableEntry, RefcountLayout, REFT_OFFSET_MASK};
use crate::format::snapshot;
use crate::image::qcow2::Qcow2;

/// The refcounts of the image as it is and as it will be, the clusters allocated for it, and
/// the header cluster the change edits.
pub(crate) struct Rewrite<'a, S: Storage> {
    io: &'a S,
    cluster_bits: u32,
    old_layout: RefcountLayout,
    layout: RefcountLayout,
    /// The first cluster of the file, as read.
    header_bytes: Vec<u8>,
    /// Refcounts as stored, one per cluster of the file (and of what the blocks cover).
    old: Vec<u64>,
    /// Refcounts of the new image.
    counts: Vec<u64>,
    /// Clusters allocated by this change: the only ones it writes.
    mine: BTreeSet<u64>,
    /// Clusters the image's structures were found in: never allocated, whatever a corrupt
    /// image's refcounts say.
    protected: BTreeSet<u64>,
    /// The old refcount table `(offset, clusters)` and blocks: replaced when counts change.
    old_table: (u64, u64),
    old_blocks: Vec<u64>,
    /// Counts or the width changed: a new refcount structure is written at commit.
    changed: bool,
    /// The counts already leave the old refcount table and blocks out.
    old_released: bool,
    /// Where the search for free clusters starts.
    hint: u64,
    /// Where the new refcount table and blocks (by index) go if those clusters are free.
    prefer: Option<(u64, Vec<u64>)>,
    /// The largest refcount table the limits allow, in bytes.
    max_table_bytes: u64,
}

impl<'a, S: Storage> Rewrite<'a, S> {
    /// Start a change of `image`: its stored refcounts and first cluster read.
    pub(crate) fn new(image: &'a Qcow2<S>) -> Result<Self> {
        let file = FileStart::read(image)?;
        let layout = file.layout;
        let bits = layout.cluster_bits;
        let cluster = 1u64 << bits;
        let mut old = vec![0u64; to_usize(file.clusters)?];
        let mut old_blocks = Vec::new();
        let per_block = 1u64 << layout.block_bits();
        for (index, entry) in be_u64_words(&file.table).enumerate() {
            let block_at = entry & REFT_OFFSET_MASK;
            if block_at == 0 {
                continue;
            }
            let block = read_metadata(&image.io, block_at, cluster, "refcount block")?;
            let first = (index as u64).saturating_mul(per_block);
            for i in 0..per_block {
                let count = layout.get(&block, i);
                if count == 0 {
                    continue;
                }
                let c = first.saturating_add(i);
                let slot = usize::try_from(c).ok().and_then(|c| old.get_mut(c));
                match slot {
                    Some(slot) => *slot = count,
                    None => {
                        return Err(Error::malformed(
                            format!(
                                "cluster {c} past the end of the file has refcount {count}: \
                                 repair the image (check -r all) first"
                            ),
                            block_at,
                        ))
                    }
                }
            }
            old_blocks.push(block_at);
        }
        let counts = old.clone();
        Self::assemble(image, file, old, counts, old_blocks, false)
    }

    /// Start a change of `image` whose new refcounts are `counts` (one per cluster of the
    /// file, and the one just past it), as a repair sets them, instead of the stored ones;
    /// `counts` leave out the references of the old refcount table and blocks, which the
    /// change replaces. `in_use` holds the references a check counted: a cluster no live structure
    /// references is free for the new structures even if its stored refcount says
    /// otherwise (a leak stays a leak until the header switches), as QEMU's rebuild of the
    /// refcount structure places them. The stored table is read as the check reads it: the
    /// blocks it counted (aligned, inside the file) are the ones replaced; refcounts stored
    /// past the end of the file are dropped, the check never sees them either.
    pub(crate) fn with_counts(
        image: &'a Qcow2<S>,
        in_use: Vec<u64>,
        counts: Vec<u64>,
    ) -> Result<Self> {
        let file = FileStart::read(image)?;
        let bits = file.layout.cluster_bits;
        let old_blocks = be_u64_words(&file.table)
            .filter_map(|entry| match RefTableEntry::decode(entry, bits) {
                RefTableEntry::Block(at) if at >> bits < file.clusters => Some(at),
                _ => None,
            })
            .collect();
        Self::assemble(image, file, in_use, counts, old_blocks, true)
    }

    /// The change over what [`FileStart::read`] found, its structures protected.
    fn assemble(
        image: &'a Qcow2<S>,
        file: FileStart,
        old: Vec<u64>,
        counts: Vec<u64>,
        old_blocks: Vec<u64>,
        repair: bool,
    ) -> Result<Self> {
        let mut rewrite = Rewrite {
            io: &image.io,
            cluster_bits: file.layout.cluster_bits,
            old_layout: file.layout,
            layout: file.layout,
            header_bytes: file.header_bytes,
            old,
            counts,
            mine: BTreeSet::new(),
            protected: BTreeSet::new(),
            old_table: file.table_location,
            old_blocks,
            changed: repair,
            old_released: repair,
            hint: 0,
            prefer: None,
            max_table_bytes: image.limits.max_refcount_table_bytes,
        };
        rewrite.protect_structures(image)?;
        Ok(rewrite)
    }

    /// Write a new refcount structure at commit even if no count changed, its table at
    /// `table` and block `i` at `blocks[i]` where those clusters are free (elsewhere if not):
    /// to put it back where it was.
    pub(crate) fn place_refcounts(&mut self, table: u64, blocks: Vec<u64>) {
        self.prefer = Some((table, blocks));
        self.changed = true;
    }

    /// `len` bytes of clusters at `offset` if they are free both now and in the new image
    /// (given refcount 1), else `len` bytes wherever [`Rewrite::allocate`] finds them.
    pub(crate) fn allocate_preferring(&mut self, offset: u64, len: u64) -> Result<u64> {
        let n = len.div_ceil(self.cluster_size()).max(1);
        let first = offset >> self.cluster_bits;
        let aligned = offset != 0 && first << self.cluster_bits == offset;
        if !aligned || (first..first.saturating_add(n)).any(|c| self.in_use(c)) {
            return self.allocate(len);
        }
        self.claim(first, n)?;
        Ok(offset)
    }

    /// Where the preferred placement puts refcount block `index` (0: nowhere).
    fn preferred_block(&self, index: usize) -> u64 {
        self.prefer
            .as_ref()
            .and_then(|(_, blocks)| blocks.get(index))
            .copied()
            .unwrap_or(0)
    }

    /// Keep the allocator off every structure the header, the snapshots and the bitmaps
    /// name (the L2 tables are protected by the jobs that walk them).
    fn protect_structures(&mut self, image: &Qcow2<S>) -> Result<()> {
        let header = &image.header;
        let cluster = self.cluster_size();
        self.protect(0, cluster);
        self.protect(header.l1_table_offset(), l1_bytes(header.l1_size()));
        let (table, clusters) = self.old_table;
        self.protect(table, clusters << self.cluster_bits);
        for block in self.old_blocks.clone() {
            self.protect(block, cluster);
        }
        let (at, len) = snapshot_table_extent(image)?;
        self.protect(at, len);
        for snap in &image.snapshots {
            self.protect(snap.l1_table_offset, l1_bytes(snap.l1_size));
        }
        if let Some(ext) = header.bitmaps() {
            self.protect(ext.directory_offset, ext.directory_size);
        }
        for b in &image.bitmaps {
            self.protect(b.table_offset, l1_bytes(b.table_size));
        }
        if let Some(e) = header.encryption() {
            self.protect(e.offset, e.length);
        }
        Ok(())
    }

    /// Never allocate the clusters of `len` bytes at `offset`.
    pub(crate) fn protect(&mut self, offset: u64, len: u64) {
        let first = offset >> self.cluster_bits;
        let n = len.div_ceil(self.cluster_size());
        // A corrupt length is not a reason to loop for long: what lies past the file is
        // appended to only after every cluster inside it.
        let n = n.min((self.old.len() as u64).saturating_add(1));
        for c in first..first.saturating_add(n) {
            self.protected.insert(c);
        }
    }

    /// The size of a cluster.
    pub(crate) fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// The new refcount of the cluster holding `offset`.
    pub(crate) fn refcount(&self, offset: u64) -> u64 {
        usize::try_from(offset >> self.cluster_bits)
            .ok()
            .and_then(|c| self.counts.get(c))
            .copied()
            .unwrap_or(0)
    }

    /// Change the refcount of every cluster of `len` bytes at `offset` by `delta`.
    pub(crate) fn add_ref(&mut self, offset: u64, len: u64, delta: i64) -> Result<()> {
        let Some(last) = len.checked_sub(1) else {
            return Ok(());
        };
        let first = offset >> self.cluster_bits;
        let last = offset.saturating_add(last) >> self.cluster_bits;
        let max = self.layout.max();
        for c in first..=last {
            let slot = usize::try_from(c)
                .ok()
                .and_then(|i| self.counts.get_mut(i))
                .ok_or_else(|| {
                    Error::malformed(
                        format!("cluster {c} is referenced past the end of the file"),
                        c << self.cluster_bits,
                    )
                })?;
            let new = slot.checked_add_signed(delta).ok_or_else(|| {
                Error::malformed(
                    format!("the refcount of cluster {c} ({slot}) cannot change by {delta}"),
                    c << self.cluster_bits,
                )
            })?;
            if new > max {
                return Err(Error::InvalidOption {
                    option: "refcount_bits".into(),
                    message: format!(
                        "the refcount of cluster {c} would exceed {max}, the largest \
                         {} bits hold",
                        self.layout.bits()
                    ),
                });
            }
            *slot = new;
        }
        self.changed = true;
        Ok(())
    }

    /// Count every cluster at the new refcount width (checked at commit). The caller's
    /// header edit must make the header one that has the field (version 3).
    pub(crate) fn set_refcount_order(&mut self, order: u32) {
        if order != self.layout.order {
            self.layout.order = order;
            self.changed = true;
        }
    }

    /// `len` bytes of clusters free both now and in the new image, given refcount 1.
    pub(crate) fn allocate(&mut self, len: u64) -> Result<u64> {
        let n = len.div_ceil(self.cluster_size()).max(1);
        let start = self.find_free(n);
        self.claim(start, n)?;
        Ok(start << self.cluster_bits)
    }

    /// Give the `n` clusters from `start` refcount 1, as this change's.
    fn claim(&mut self, start: u64, n: u64) -> Result<()> {
        let end = start.saturating_add(n);
        let needed = to_usize(end)?;
        if self.counts.len() < needed {
            self.counts.resize(needed, 0);
        }
        for c in start..end {
            if let Some(slot) = usize::try_from(c).ok().and_then(|i| self.counts.get_mut(i)) {
                *slot = 1;
            }
            self.mine.insert(c);
        }
        self.changed = true;
        Ok(())
    }

    /// Drop one reference to each cluster of `len` bytes at `offset`: the structure there
    /// is replaced (a refcount a corrupt image left at 0 stays 0).
    pub(crate) fn release(&mut self, offset: u64, len: u64) {
        let first = offset >> self.cluster_bits;
        let n = len.div_ceil(self.cluster_size());
        for c in first..first.saturating_add(n) {
            if let Some(slot) = usize::try_from(c).ok().and_then(|i| self.counts.get_mut(i)) {
                *slot = slot.saturating_sub(1);
                self.changed = true;
            }
        }
    }

    /// Give back clusters allocated by this change that it no longer needs.
    fn unallocate(&mut self, offset: u64, len: u64) {
        let first = offset >> self.cluster_bits;
        let n = len.div_ceil(self.cluster_size());
        for c in first..first.saturating_add(n) {
            if let Some(slot) = usize::try_from(c).ok().and_then(|i| self.counts.get_mut(i)) {
                *slot = 0;
            }
            self.mine.remove(&c);
        }
    }

    /// The first run of `n` clusters that nothing uses now or in the new image.
    fn find_free(&mut self, n: u64) -> u64 {
        let mut start = self.hint;
        let mut c = start;
        while c.saturating_sub(start) < n {
            if self.in_use(c) {
                start = c.saturating_add(1);
            }
            c = c.saturating_add(1);
        }
        if n == 1 {
            self.hint = start.saturating_add(1);
        }
        start
    }

    fn in_use(&self, c: u64) -> bool {
        let Ok(i) = usize::try_from(c) else {
            return false;
        };
        let old = self.old.get(i).copied().unwrap_or(0);
        let new = self.counts.get(i).copied().unwrap_or(0);
        // Cluster 0 is the header, whatever a corrupt image's refcount says.
        c == 0 || old != 0 || new != 0 || self.mine.contains(&c) || self.protected.contains(&c)
    }

    /// Write `bytes` at `offset`, which must lie in clusters this change allocated.
    pub(crate) fn write(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        let len = bytes.len() as u64;
        let first = offset >> self.cluster_bits;
        let last = offset.saturating_add(len.saturating_sub(1)) >> self.cluster_bits;
        if len == 0 || (first..=last).any(|c| !self.mine.contains(&c)) {
            return Err(Error::Internal(
                "a rewrite may write only the clusters it allocated",
            ));
        }
        self.io
            .write_all_at(offset, bytes)
            .map_err(|e| Error::io("writing new metadata", e))?;
        Ok(())
    }

    /// Land the change: a new refcount structure when counts or the width changed, a
    /// barrier, `edit` applied to the first cluster (the refcount fields already set), the
    /// bytes that differ written in one write, a barrier.
    pub(crate) fn commit(mut self, edit: impl FnOnce(&mut Vec<u8>) -> Result<()>) -> Result<()> {
        let mut header = self.header_bytes.clone();
        if self.changed {
            let (table_offset, table_clusters) = self.write_refcounts()?;
            put(
                &mut header,
                at::REFCOUNT_TABLE_OFFSET,
                &table_offset.to_be_bytes(),
            );
            let clusters = u32::try_from(table_clusters)
                .map_err(|_| Error::Internal("refcount table too large"))?;
            put(
                &mut header,
                at::REFCOUNT_TABLE_CLUSTERS,
                &clusters.to_be_bytes(),
            );
            if self.layout.order != self.old_layout.order {
                put(
                    &mut header,
                    at::REFCOUNT_ORDER,
                    &self.layout.order.to_be_bytes(),
                );
            }
        }
        edit(&mut header)?;
        if header.len() as u64 > self.cluster_size() {
            return Err(Error::Internal("the new header is longer than a cluster"));
        }
        if !self.mine.is_empty() {
            self.io
                .sync()
                .map_err(|e| Error::io("syncing the image", e))?;
        }
        let old = &self.header_bytes;
        let differs = |i: usize| header.get(i) != old.get(i);
        let first = (0..header.len()).find(|&i| differs(i));
        let last = (0..header.len()).rev().find(|&i| differs(i));
        if let (Some(first), Some(last)) = (first, last) {
            let bytes = header
                .get(first..=last)
                .ok_or(Error::Internal("header range"))?;
            self.io
                .write_all_at(first as u64, bytes)
                .map_err(|e| Error::io("writing the header", e))?;
            self.io
                .sync()
                .map_err(|e| Error::io("syncing the image", e))?;
        }
        Ok(())
    }

    /// Write the new refcount table and blocks; returns the table's `(offset, clusters)`.
    fn write_refcounts(&mut self) -> Result<(u64, u64)> {
        let (blocks, (table_at, table_clusters)) = self.place_refcount_structure()?;
        let per_block_bits = self.layout.block_bits();
        let mut table_bytes = vec![0u8; to_usize(table_clusters << self.cluster_bits)?];
        for (index, block) in blocks.iter().enumerate() {
            let Some(block_at) = block else { continue };
            let first = (index as u64) << per_block_bits;
            let bytes = self.encode_block(first)?;
            self.write(*block_at, &bytes)?;
            put(
                &mut table_bytes,
                (index as u64).saturating_mul(8),
                &block_at.to_be_bytes(),
            );
        }
        self.write(table_at, &table_bytes)?;
        Ok((table_at, table_clusters))
    }

    /// Where a commit of this change would put the new refcount structure, nothing written:
    /// the table's offset and clusters, and each block's offset by table index (0: none).
    pub(crate) fn planned_refcounts(mut self) -> Result<(u64, u64, Vec<u64>)> {
        let (blocks, (table_at, table_clusters)) = self.place_refcount_structure()?;
        let blocks = blocks.iter().map(|b| b.unwrap_or(0)).collect();
        Ok((table_at, table_clusters, blocks))
    }

    /// Release the old refcount table and blocks and allocate the new ones: each block by
    /// table index (`None`: no cluster it covers is in use), and the table's
    /// `(offset, clusters)`.
    fn place_refcount_structure(&mut self) -> Result<PlacedRefcounts> {
        let cluster = self.cluster_size();
        // The old table and blocks are replaced.
        if !self.old_released {
            let (old_table, old_table_clusters) = self.old_table;
            self.release(old_table, old_table_clusters << self.cluster_bits);
            for block in self.old_blocks.clone() {
                self.release(block, cluster);
            }
            self.old_released = true;
        }
        let per_block_bits = self.layout.block_bits();
        let mut blocks: Vec<Option<u64>> = Vec::new();
        let mut table: Option<(u64, u64)> = None;
        // Allocating blocks and the table changes the counts they cover: repeat until
        // every cluster in use has a block and the table names every block.
        loop {
            let mut grew = false;
            let used = self.counts.iter().rposition(|&n| n != 0).unwrap_or(0) as u64;
            let needed_blocks = (used >> per_block_bits).saturating_add(1);
            if (blocks.len() as u64) < needed_blocks {
                blocks.resize(to_usize(needed_blocks)?, None);
            }
            for index in 0..blocks.len() {
                let first = (index as u64) << per_block_bits;
                let any = self.any_in_use(first, 1u64 << per_block_bits);
                let slot = blocks.get_mut(index).ok_or(Error::Internal("blocks"))?;
                if any && slot.is_none() {
                    let at = self.allocate_preferring(self.preferred_block(index), cluster)?;
                    *blocks.get_mut(index).ok_or(Error::Internal("blocks"))? = Some(at);
                    grew = true;
                }
            }
            let table_bytes = (blocks.len() as u64).saturating_mul(8);
            Limits::check("refcount table", table_bytes, self.max_table_bytes)?;
            let table_clusters = table_bytes.div_ceil(cluster).max(1);
            match table {
                Some((_, have)) if have >= table_clusters => {}
                _ => {
                    if let Some((at, have)) = table.take() {
                        self.unallocate(at, have << self.cluster_bits);
                    }
                    let preferred = self.prefer.as_ref().map_or(0, |(t, _)| *t);
                    let at =
                        self.allocate_preferring(preferred, table_clusters << self.cluster_bits)?;
                    table = Some((at, table_clusters));
                    grew = true;
                }
            }
            if !grew {
                break;
            }
        }
        let table = table.ok_or(Error::Internal("no refcount table"))?;
        Ok((blocks, table))
    }

    fn any_in_use(&self, first: u64, n: u64) -> bool {
        let Ok(start) = usize::try_from(first) else {
            return false;
        };
        let end = usize::try_from(first.saturating_add(n)).unwrap_or(usize::MAX);
        self.counts
            .get(start..end.min(self.counts.len()))
            .is_some_and(|s| s.iter().any(|&n| n != 0))
    }

    /// The refcount block covering clusters from `first`, at the new width.
    fn encode_block(&self, first: u64) -> Result<Vec<u8>> {
        let mut bytes = vec![0u8; to_usize(self.cluster_size())?];
        let per_block = 1u64 << self.layout.block_bits();
        for i in 0..per_block {
            let c = first.saturating_add(i);
            let Some(&n) = usize::try_from(c).ok().and_then(|c| self.counts.get(c)) else {
                break;
            };
            if n != 0 && !self.layout.set(&mut bytes, i, n) {
                return Err(Error::InvalidOption {
                    option: "refcount_bits".into(),
                    message: format!(
                        "the refcount of cluster {c} ({n}) does not fit in {} bits",
                        self.layout.bits()
                    ),
                });
            }
        }
        Ok(bytes)
    }
}

/// Where a new refcount structure goes: each block by table index (`None`: not needed), and
/// the table's `(offset, clusters)`.
type PlacedRefcounts = (Vec<Option<u64>>, (u64, u64));

/// What every change reads first: the first cluster, the refcount table, the file's length.
struct FileStart {
    layout: RefcountLayout,
    /// Clusters of the file.
    clusters: u64,
    header_bytes: Vec<u8>,
    /// The refcount table's `(offset, clusters)` and bytes.
    table_location: (u64, u64),
    table: Vec<u8>,
}

impl FileStart {
    fn read<S: Storage>(image: &Qcow2<S>) -> Result<Self> {
        let header = &image.header;
        let io = &image.io;
        let bits = header.cluster_bits();
        let layout = RefcountLayout {
            cluster_bits: bits,
            order: header.refcount_order(),
        };
        let cluster = 1u64 << bits;
        let file_len = io
            .length()
            .map_err(|e| Error::io("reading the image file's length", e))?;
        let clusters = file_len.div_ceil(cluster);
        check_memory(clusters, &image.limits)?;
        let header_bytes = read_metadata(io, 0, cluster.min(file_len), "header")?;
        let table_offset = header.refcount_table_offset();
        let table_clusters = u64::from(header.refcount_table_clusters());
        let table = read_metadata(io, table_offset, table_clusters << bits, "refcount table")?;
        Ok(FileStart {
            layout,
            clusters,
            header_bytes,
            table_location: (table_offset, table_clusters),
            table,
        })
    }
}

/// Two counts a cluster of the file: bounded by what the file holds and by the limits.
fn check_memory(file_clusters: u64, limits: &Limits) -> Result<()> {
    Limits::check(
        "refcounts of a rewrite",
        file_clusters.saturating_mul(16),
        limits.max_refcount_table_bytes.saturating_mul(64),
    )
}

fn to_usize(n: u64) -> Result<usize> {
    usize::try_from(n).map_err(|_| Error::Internal("a count does not fit in memory"))
}

/// The bytes of an L1 (or bitmap) table of `entries` entries.
pub(crate) fn l1_bytes(entries: u32) -> u64 {
    u64::from(entries).saturating_mul(8)
}

/// Where the snapshot table is and how long it is: its entries up to the end of the last
/// one's data (QEMU does not write the last entry's padding).
pub(crate) fn snapshot_table_extent<S: Storage>(image: &Qcow2<S>) -> Result<(u64, u64)> {
    let start = image.header.snapshots_offset();
    let mut offset = start;
    let mut end = start;
    for _ in 0..image.header.nb_snapshots() {
        let fixed = read_metadata(
            &image.io,
            offset,
            SNAPSHOT_HEADER_LEN,
            "snapshot table entry",
        )?;
        let (len, padded) = snapshot::entry_len(&fixed, offset, &image.limits)?;
        end = offset.saturating_add(len);
        offset = offset
            .checked_add(padded)
            .ok_or_else(|| Error::malformed("snapshot table offset overflows", offset))?;
    }
    Ok((start, end.saturating_sub(start)))
}
