//! The writer's refcounts and cluster allocator: the refcount table and the blocks in memory,
//! changed there and written back in order by `writeback.rs`.
//!
//! Two rules keep a crash harmless:
//! - a cluster's refcount is raised (and written, before a barrier) before anything that
//!   refers to it reaches the disk;
//! - a reference is dropped in memory first: the refcount is lowered, and the cluster becomes
//!   free for reuse, only once the table that no longer refers to it is durable
//!   ([`Refcounts::free_later`], applied by [`Refcounts::apply_frees`] after the write-back).
//!   QEMU lowers it at once and may hand the cluster out again before the table that dropped
//!   it reaches the disk; a crash then leaves the old table pointing at another write's data.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::base::bytes::low_bits;
use crate::base::io::{be_u64_words, read_metadata, Storage};
use crate::base::limits::Limits;
use crate::error::{Error, Result};
use crate::format::refcount::{RefcountLayout, REFT_OFFSET_MASK, REFT_RESERVED_MASK};
use crate::image::write::tables::Dirty;

/// One refcount block in memory.
struct Block {
    bytes: Vec<u8>,
    dirty: Dirty,
}

/// Refcounts of an image open for writing.
pub(crate) struct Refcounts {
    layout: RefcountLayout,
    /// The refcount table's entries (block offsets, 0 for none).
    table: Vec<u64>,
    table_offset: u64,
    /// Entries changed since the last write-back (in a table that has not moved).
    table_dirty: BTreeSet<usize>,
    /// A new table, not yet written and named by the header.
    table_moved: bool,
    blocks: HashMap<u64, Block>,
    /// Clean blocks are dropped from memory above this many bytes.
    budget: u64,
    /// The largest refcount table the limits allow.
    max_table_bytes: u64,
    /// The search for free clusters starts here (a cluster index).
    free_hint: u64,
    /// The first cluster index past every cluster in use and past the end of the file:
    /// clusters from here on are free and hold nothing.
    top: u64,
    /// The first cluster index past every cluster this writer allocated (0: none yet).
    allocated_end: u64,
    /// Clusters the image's metadata was found in when it was opened: a corrupt image may
    /// give them refcount 0, and handing one out would write data over the metadata (QEMU's
    /// overlap check refuses such a write too).
    metadata: HashSet<u64>,
    /// References dropped in memory, not yet on disk: `(offset, length)` in bytes.
    pending: Vec<(u64, u64)>,
}

impl Refcounts {
    /// The refcounts of an image whose header gives the table at `table_offset`, of
    /// `table_clusters` clusters, in a file of `file_len` bytes.
    pub(crate) fn load<I: Storage>(
        io: &I,
        layout: RefcountLayout,
        table_offset: u64,
        table_clusters: u64,
        file_len: u64,
        limits: &Limits,
    ) -> Result<Self> {
        let bytes = table_clusters
            .checked_shl(layout.cluster_bits)
            .ok_or_else(|| Error::malformed("refcount table size overflows", table_offset))?;
        Limits::check("refcount table", bytes, limits.max_refcount_table_bytes)?;
        let raw = read_metadata(io, table_offset, bytes, "refcount table")?;
        let table = be_u64_words(&raw).collect();
        let top = file_len.div_ceil(1u64 << layout.cluster_bits);
        Ok(Refcounts {
            layout,
            table,
            table_offset,
            table_dirty: BTreeSet::new(),
            table_moved: false,
            blocks: HashMap::new(),
            budget: limits.l2_cache_bytes.max(1 << 20),
            max_table_bytes: limits.max_refcount_table_bytes,
            free_hint: 0,
            top,
            allocated_end: 0,
            metadata: HashSet::new(),
            pending: Vec::new(),
        })
    }

    fn cluster_bits(&self) -> u32 {
        self.layout.cluster_bits
    }

    fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits()
    }

    /// Where the refcount table is, and its length in clusters.
    pub(crate) fn table_location(&self) -> (u64, u64) {
        let bytes = (self.table.len() as u64).saturating_mul(8);
        (self.table_offset, bytes.div_ceil(self.cluster_size()))
    }

    /// The first byte past every cluster in use: clusters from here on were never written.
    pub(crate) fn end(&self) -> u64 {
        self.top.saturating_mul(self.cluster_size())
    }

    /// The first byte past every cluster this writer allocated: the file must reach it
    /// before a table refers to its last cluster.
    pub(crate) fn allocated_end(&self) -> u64 {
        self.allocated_end.saturating_mul(self.cluster_size())
    }

    /// The refcount block for table entry `index`, if there is one.
    fn block_offset(&self, index: u64) -> Result<Option<u64>> {
        let entry = usize::try_from(index)
            .ok()
            .and_then(|i| self.table.get(i))
            .copied()
            .unwrap_or(0);
        let offset = entry & REFT_OFFSET_MASK;
        if offset == 0 {
            return Ok(None);
        }
        if entry & REFT_RESERVED_MASK != 0 || low_bits(offset, self.cluster_bits()) != 0 {
            return Err(Error::malformed(
                format!("refcount table entry {index} ({entry:#x}) is invalid"),
                self.table_offset.saturating_add(index.saturating_mul(8)),
            ));
        }
        Ok(Some(offset))
    }

    /// The block at `offset`, read into memory if it is not there.
    fn block<I: Storage>(&mut self, io: &I, offset: u64) -> Result<&mut Block> {
        if !self.blocks.contains_key(&offset) {
            self.trim();
            let bytes = read_metadata(io, offset, self.cluster_size(), "refcount block")?;
            self.blocks.insert(
                offset,
                Block {
                    bytes,
                    dirty: Dirty::default(),
                },
            );
        }
        self.blocks
            .get_mut(&offset)
            .ok_or(Error::Internal("a refcount block vanished"))
    }

    /// Whether more blocks are in memory than the budget allows (dirty ones stay until
    /// they are written back).
    pub(crate) fn over_budget(&self) -> bool {
        (self.blocks.len() as u64).saturating_mul(self.cluster_size()) > self.budget
    }

    /// Drop clean blocks while over budget.
    pub(crate) fn trim(&mut self) {
        let size = self.cluster_size();
        if (self.blocks.len() as u64).saturating_mul(size) < self.budget {
            return;
        }
        self.blocks.retain(|_, b| b.dirty.is_dirty());
    }

    /// The refcount of host cluster `cluster`.
    pub(crate) fn get<I: Storage>(&mut self, io: &I, cluster: u64) -> Result<u64> {
        let (index, within) = self.layout.locate(cluster);
        let Some(offset) = self.block_offset(index)? else {
            return Ok(0);
        };
        let layout = self.layout;
        Ok(layout.get(&self.block(io, offset)?.bytes, within))
    }

    /// Set the refcount of host cluster `cluster`, making its block if needed.
    fn set<I: Storage>(&mut self, io: &I, cluster: u64, value: u64) -> Result<()> {
        let (index, within) = self.layout.locate(cluster);
        let offset = match self.block_offset(index)? {
            Some(offset) => offset,
            None => self.new_block(io, index)?,
        };
        let layout = self.layout;
        let block = self.block(io, offset)?;
        if !layout.set(&mut block.bytes, within, value) {
            return Err(Error::Internal("a refcount does not fit its block"));
        }
        // The bytes that hold refcount `within` (several share a byte below 8 bits).
        let first_bit = within.saturating_mul(u64::from(layout.bits()));
        let start = (first_bit >> 3) as usize;
        let end = (first_bit
            .saturating_add(u64::from(layout.bits()))
            .div_ceil(8)) as usize;
        block.dirty.mark(start, end);
        Ok(())
    }

    /// Allocate `count` contiguous free clusters (refcount 0), set their refcounts to 1, and
    /// return the offset of the first.
    pub(crate) fn allocate<I: Storage>(&mut self, io: &I, count: u64) -> Result<u64> {
        let first = self.find_free(io, count)?;
        self.check_unused(first, count)?;
        // Claimed before the refcounts are set: a new refcount block goes above them.
        self.top = self.top.max(first.saturating_add(count));
        self.allocated_end = self.allocated_end.max(first.saturating_add(count));
        for cluster in first..first.saturating_add(count) {
            self.set(io, cluster, 1)?;
        }
        self.free_hint = first.saturating_add(count);
        first
            .checked_shl(self.cluster_bits())
            .ok_or_else(|| Error::malformed("the image file grows past 2^64 bytes", 0))
    }

    /// The first run of `count` free clusters from the hint on.
    fn find_free<I: Storage>(&mut self, io: &I, count: u64) -> Result<u64> {
        let mut start = self.free_hint;
        let mut cluster = start;
        while cluster.saturating_sub(start) < count {
            if cluster >= self.top {
                break; // everything from the top on is free
            }
            if self.get(io, cluster)? != 0 {
                start = cluster.saturating_add(1);
            }
            cluster = cluster.saturating_add(1);
        }
        self.free_hint = start;
        Ok(start)
    }

    /// Record that the clusters of `len` bytes at `offset` hold metadata.
    pub(crate) fn protect(&mut self, offset: u64, len: u64) {
        let Some(last) = len.checked_sub(1) else {
            return;
        };
        let bits = self.cluster_bits();
        let (first, last) = (offset >> bits, offset.saturating_add(last) >> bits);
        // A corrupt header may claim a huge structure: its first clusters are enough.
        for cluster in first..=last.min(first.saturating_add(1 << 16)) {
            self.metadata.insert(cluster);
        }
    }

    /// Refuse to hand out clusters that hold metadata.
    fn check_unused(&self, first: u64, count: u64) -> Result<()> {
        match (first..first.saturating_add(count)).find(|c| self.metadata.contains(c)) {
            Some(cluster) => Err(Error::malformed(
                format!(
                    "cluster {cluster} holds metadata but its refcount is 0: the image is \
                     corrupt (qemu-img check -r all repairs it)"
                ),
                cluster << self.cluster_bits(),
            )),
            None => Ok(()),
        }
    }

    /// Raise the refcount of `count` clusters from `first` (a cluster shared anew).
    #[allow(dead_code)]
    pub(crate) fn increment<I: Storage>(&mut self, io: &I, first: u64, count: u64) -> Result<()> {
        for cluster in first..first.saturating_add(count) {
            let value = self.get(io, cluster)?;
            let raised = value
                .checked_add(1)
                .filter(|v| *v <= self.layout.max())
                .ok_or_else(|| {
                    Error::malformed(
                        format!("refcount of cluster {cluster} would overflow"),
                        cluster << self.cluster_bits(),
                    )
                })?;
            self.set(io, cluster, raised)?;
        }
        Ok(())
    }

    /// Drop one reference to the clusters that hold `len` bytes at `offset`, once what
    /// referred to them is durable (see the module's rules).
    pub(crate) fn free_later(&mut self, offset: u64, len: u64) {
        if len > 0 {
            self.pending.push((offset, len));
        }
    }

    /// Drop one reference to a cluster nothing on disk ever referred to (an allocation
    /// whose data write failed): free for reuse at once.
    pub(crate) fn free_now<I: Storage>(&mut self, io: &I, offset: u64, len: u64) -> Result<()> {
        self.lower(io, offset, len)
    }

    /// Apply the dropped references whose tables are now durable.
    pub(crate) fn apply_frees<I: Storage>(&mut self, io: &I) -> Result<()> {
        for (offset, len) in std::mem::take(&mut self.pending) {
            self.lower(io, offset, len)?;
        }
        Ok(())
    }

    fn lower<I: Storage>(&mut self, io: &I, offset: u64, len: u64) -> Result<()> {
        let bits = self.cluster_bits();
        let first = offset >> bits;
        let last = offset.saturating_add(len.saturating_sub(1)) >> bits;
        for cluster in first..=last {
            let value = self.get(io, cluster)?;
            let lowered = value.checked_sub(1).ok_or_else(|| {
                Error::malformed(
                    format!("cluster {cluster} is freed but its refcount is already 0"),
                    cluster << bits,
                )
            })?;
            self.set(io, cluster, lowered)?;
            if lowered == 0 {
                self.free_hint = self.free_hint.min(cluster);
                self.metadata.remove(&cluster);
            }
        }
        Ok(())
    }

    /// A new, empty refcount block for table entry `index`, placed at the top (so that it
    /// holds nothing anyone refers to), with its own refcount set.
    fn new_block<I: Storage>(&mut self, io: &I, index: u64) -> Result<u64> {
        // Room in the table first, for this entry and for the block's own cluster: growing
        // the table sets the refcounts of its new clusters, which may make this very block.
        let needed = index.max(self.layout.locate(self.top).0).saturating_add(1);
        if needed > self.table.len() as u64 {
            self.grow_table(io, needed)?;
        }
        if let Some(offset) = self.block_offset(index)? {
            return Ok(offset);
        }
        let at = self.top;
        self.check_unused(at, 1)?;
        self.top = self.top.saturating_add(1);
        self.allocated_end = self.allocated_end.max(self.top);
        let offset = at << self.cluster_bits();
        let slot = usize::try_from(index)
            .ok()
            .and_then(|i| self.table.get_mut(i))
            .ok_or(Error::Internal("the refcount table did not grow"))?;
        *slot = offset;
        self.table_dirty.insert(index as usize);
        let size = self.cluster_size() as usize;
        self.blocks.insert(
            offset,
            Block {
                bytes: vec![0; size],
                dirty: Dirty::all(size),
            },
        );
        // Its own refcount: in itself, or in the block of the next range (made likewise).
        self.set(io, at, 1)?;
        Ok(offset)
    }

    /// Move the refcount table to new clusters at the top, with room for at least `entries`
    /// entries and for the blocks that describe its own clusters. The old table is freed
    /// once the header names the new one.
    fn grow_table<I: Storage>(&mut self, io: &I, entries: u64) -> Result<()> {
        let bits = self.cluster_bits();
        let per_cluster = self.cluster_size() / 8;
        let mut wanted =
            (entries.max(self.table.len() as u64).saturating_mul(3) >> 1).saturating_add(1);
        let clusters = loop {
            let clusters = wanted.div_ceil(per_cluster);
            // The new table, and a block or two for it, must be covered too.
            let reach = self
                .layout
                .locate(self.top.saturating_add(clusters).saturating_add(2))
                .0;
            if reach < wanted {
                break clusters;
            }
            wanted = reach.saturating_add(1);
        };
        Limits::check("refcount table", clusters << bits, self.max_table_bytes)?;
        let new_len = usize::try_from(clusters.saturating_mul(per_cluster))
            .map_err(|_| Error::malformed("refcount table too large", self.table_offset))?;
        let (old_offset, old_clusters) = self.table_location();
        let first = self.top;
        self.check_unused(first, clusters)?;
        self.top = self.top.saturating_add(clusters);
        self.allocated_end = self.allocated_end.max(self.top);
        self.table.resize(new_len, 0);
        self.table_offset = first << bits;
        self.table_moved = true;
        self.table_dirty.clear();
        self.free_later(old_offset, old_clusters << bits);
        for cluster in first..first.saturating_add(clusters) {
            self.set(io, cluster, 1)?;
        }
        Ok(())
    }

    /// The offsets of the refcount blocks the table names.
    pub(crate) fn blocks(&self) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        for index in 0..self.table.len() as u64 {
            out.extend(self.block_offset(index)?);
        }
        Ok(out)
    }

    /// How many clusters the blocks the table names cover (up to the last one).
    pub(crate) fn covered_clusters(&self) -> u64 {
        let last = self.table.iter().rposition(|e| e & REFT_OFFSET_MASK != 0);
        last.map_or(0, |i| {
            ((i as u64).saturating_add(1)) << self.layout.block_bits()
        })
    }

    /// Keep clusters below `cluster` out of the way of new refcount blocks.
    pub(crate) fn reserve_below(&mut self, cluster: u64) {
        self.top = self.top.max(cluster);
    }

    /// Set the refcount of `cluster` to `value` unless it holds that already.
    pub(crate) fn set_if_different<I: Storage>(
        &mut self,
        io: &I,
        cluster: u64,
        value: u64,
    ) -> Result<()> {
        if self.get(io, cluster)? == value {
            return Ok(());
        }
        if value > self.layout.max() {
            return Err(Error::malformed(
                format!(
                    "cluster {cluster} has {value} references, more than {}-bit refcounts hold",
                    self.layout.bits()
                ),
                cluster << self.cluster_bits(),
            ));
        }
        self.set(io, cluster, value)
    }

    /// The changed parts of the refcount blocks, marked clean: `(file offset, bytes)`.
    pub(crate) fn take_dirty_blocks(&mut self) -> Vec<(u64, Vec<u8>)> {
        let mut out: Vec<(u64, Vec<u8>)> = self
            .blocks
            .iter_mut()
            .filter_map(|(offset, b)| {
                let (start, end) = b.dirty.take(b.bytes.len())?;
                let bytes = b.bytes.get(start..end)?.to_vec();
                Some((offset.saturating_add(start as u64), bytes))
            })
            .collect();
        out.sort_unstable_by_key(|(offset, _)| *offset);
        out
    }

    /// Mark blocks dirty again (whole) after a failed write-back of pieces at `offsets`.
    pub(crate) fn mark_blocks_dirty(&mut self, offsets: impl Iterator<Item = u64>) {
        let bits = self.cluster_bits();
        for offset in offsets {
            if let Some(b) = self.blocks.get_mut(&(offset >> bits << bits)) {
                b.dirty = Dirty::all(b.bytes.len());
            }
        }
    }

    /// A moved table, whole, to be written before the header names it.
    pub(crate) fn moved_table(&self) -> Option<(u64, Vec<u8>)> {
        self.table_moved
            .then(|| (self.table_offset, self.table_bytes()))
    }

    /// The table's changed entries (a table that has not moved): `(file offset, entry)`.
    pub(crate) fn dirty_entries(&self) -> Vec<(u64, [u8; 8])> {
        self.table_dirty
            .iter()
            .filter_map(|&i| {
                let entry = *self.table.get(i)?;
                let at = self.table_offset.checked_add((i as u64).checked_mul(8)?)?;
                Some((at, entry.to_be_bytes()))
            })
            .collect()
    }

    /// After the table (moved or not) is durable.
    pub(crate) fn table_written(&mut self) {
        self.table_moved = false;
        self.table_dirty.clear();
    }

    /// Whether the header must be rewritten to name a moved table.
    pub(crate) fn table_is_moved(&self) -> bool {
        self.table_moved
    }

    fn table_bytes(&self) -> Vec<u8> {
        self.table.iter().flat_map(|e| e.to_be_bytes()).collect()
    }
}
