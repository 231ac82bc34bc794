//! One pass over every reference in the image, in the order of QEMU's `calculate_refcounts`:
//! the header, the active L1 and L2 tables, each snapshot's, the snapshot table, the refcount
//! table, the encryption header, the bitmaps, and last the refcount blocks.

use positioned_io::{ReadAt, Size};

use super::counters::Increment;
use super::stored::read_padded;
use super::{table_bytes, Checker, ProblemKind, AT_REFERENCE, PHASE_WALK};
use crate::base::bytes::{be_u64, leading_zero_bytes};
use crate::base::limits::MAX_L1_BYTES;
use crate::error::{Error, Result};
use crate::format::bitmap::{decode_table_entry, DataCluster};
use crate::format::header::CRYPT_LUKS;
use crate::format::header::TABLE_ENTRY_LEN;
use crate::format::refcount::{RefTableEntry, REFTABLE_ENTRY_LEN};
use crate::format::table::{
    ClusterType, L1_OFFSET_MASK, L1_RESERVED_MASK, L2_OFFSET_MASK, L2_STD_RESERVED_MASK,
    OFLAG_COPIED, SUB_ALLOC_MASK,
};

/// A pass may always walk this many L2 entries, whatever the file's size (see
/// [`WalkBudget`]): 64 walks of L2 tables of 64 KiB clusters, a quarter of a second of
/// references in a debug build, so a damaged image whose walk is cheap anyway is checked as
/// QEMU checks it.
const MIN_L2_WALK_ENTRIES: u64 = 1 << 19;
/// A pass may always read this many L1 and bitmap table entries from inside the file (32 MiB,
/// one largest L1 table), whatever the file's size (see [`WalkBudget`]).
const MIN_TABLE_ENTRIES: u64 = 1 << 22;
/// Table entries read at a time when a table is streamed.
const STREAM_ENTRIES: usize = 4096;

/// What one pass over the metadata may spend, so that the whole check is bounded by what the
/// file holds, never by what its tables claim. Computed once, before anything is walked, from
/// the header, the snapshot table and the L1 tables that earn walks; the same for every pass.
///
/// A sound image reads each of its L1 tables (the active one and each snapshot's) from its
/// own clusters of the file, and each L1 table names an L2 table once; snapshots share L2
/// tables, so one L2 table is walked once per L1 table naming it. Hence:
///
/// - L1 entries (and bitmap table entries) are read only where the table lies inside the
///   file: past its end they are zeros (as QEMU reads them) and name nothing, so a snapshot
///   whose L1 table lies past the end costs one reference, however long the table claims to
///   be; an L2 table past the end is not read either. The entries read from inside the file,
///   all tables together, are at most the file's length in entries (or
///   [`MIN_TABLE_ENTRIES`]): only tables stacked on the same bytes read more.
/// - Each L1 table lying inside the file, on clusters no earlier L1 table covers, may walk as
///   many L2 tables inside the file as it names distinct ones there (up to the file's
///   clusters): what it earned, for itself alone. Tables past the end, or stacked on another
///   table's clusters, earn nothing; naming one L2 table again earns nothing. Beyond what
///   they earned, all the tables together may walk [`MIN_L2_WALK_ENTRIES`] entries' worth
///   more (so a damaged image whose walk is cheap is checked as QEMU checks it).
///
/// What a crafted file can still cost is what a sound image of its shape costs QEMU: L1
/// tables on their own clusters, each naming many distinct L2 tables (snapshots sharing
/// them), at most (L1 tables in the file) x (L2 tables in the file) walks.
///
/// Past either bound the check stops with [`Error::Malformed`], where QEMU would go on
/// (for hours) and, in the end, report the references.
#[derive(Debug, Clone, Default)]
pub(super) struct WalkBudget {
    /// L1 and bitmap table entries a pass may read from inside the file.
    table_entries: u64,
    /// L2 walks each L1 table earned: the active table's, then each snapshot's in the order
    /// of the snapshot table (none for the snapshots the walk skips).
    earned: Vec<u64>,
    /// L2 walks a pass may make beyond what the tables earned.
    spare_walks: u64,
}

/// What is left of the [`WalkBudget`] in the current pass.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct BudgetLeft {
    table_entries: u64,
    /// Walks left of what the L1 table being walked earned.
    table_walks: u64,
    spare_walks: u64,
}

/// Which L1 table is walked: the active one also feeds the allocation statistics.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Table {
    Active,
    Snapshot,
}

impl<I: ReadAt + Size> Checker<'_, I> {
    /// Count every reference into the current window.
    pub(super) fn walk(&mut self) -> Result<()> {
        self.seq = 0;
        self.sites = 0;
        let image = self.image;
        let header = image.header();
        self.left = BudgetLeft {
            table_entries: self.budget.table_entries,
            table_walks: 0,
            spare_walks: self.budget.spare_walks,
        };
        let cluster_size = image.cluster_size();
        self.reference(0, cluster_size);
        let active = std::sync::Arc::clone(&image.l1);
        self.walk_l1(
            header.l1_table_offset(),
            header.l1_size(),
            Some(&active),
            Table::Active,
            self.budget.earned.first().copied().unwrap_or(0),
        )?;
        self.walk_snapshots()?;
        self.reference(header.snapshots_offset(), self.snapshots_size);
        self.reference(
            header.refcount_table_offset(),
            table_bytes(self.reftable.len() as u64),
        );
        if let Some(enc) = header
            .encryption()
            .filter(|_| header.crypt_method() == CRYPT_LUKS)
        {
            self.reference(enc.offset, enc.length);
        }
        self.walk_bitmaps()?;
        self.walk_refcount_blocks();
        Ok(())
    }

    /// Count one reference to `size` bytes at `offset` (QEMU's `qcow2_inc_refcounts_imrt`).
    pub(super) fn reference(&mut self, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        self.seq = self.seq.saturating_add(1);
        let cluster_size = self.image.cluster_size();
        // Up to a cluster past the end is fine: the last cluster may be partly in the file.
        let end = u128::from(offset).saturating_add(u128::from(size));
        if end >= u128::from(self.file_len).saturating_add(u128::from(cluster_size)) {
            if self.first_pass {
                let kind = ProblemKind::PastEndOfFile { offset, size };
                self.problem((PHASE_WALK, self.seq, AT_REFERENCE, 0), kind, offset);
            }
            return;
        }
        let bits = self.layout.cluster_bits;
        let first = offset >> bits;
        // end - 1 < file_len + cluster_size <= 2^64: it fits.
        let last = (offset.saturating_add(size.saturating_sub(1))) >> bits;
        let from = first.max(self.window.start);
        let to = last.min(self.window.end.saturating_sub(1));
        let mut k = from;
        while k <= to && from < self.window.end {
            if k == self.file_clusters {
                self.grown = true;
            }
            let index = usize::try_from(k.saturating_sub(self.window.start)).unwrap_or(usize::MAX);
            if self.counters.increment(index, self.layout.max()) == Increment::Overflow {
                let cluster_offset = k << bits;
                self.problem(
                    (PHASE_WALK, self.seq, AT_REFERENCE, k),
                    ProblemKind::ReferenceOverflow { cluster_offset },
                    cluster_offset,
                );
            }
            k = k.saturating_add(1);
            if k == 0 {
                break;
            }
        }
    }

    fn walk_snapshots(&mut self) -> Result<()> {
        let image = self.image;
        let header = image.header();
        if self.geometry.external_data && header.nb_snapshots() > 0 {
            self.walk_problem(
                ProblemKind::SnapshotsWithDataFile {
                    count: header.nb_snapshots(),
                },
                header.snapshots_offset(),
            );
        }
        for (index, snap) in image.snapshots().iter().enumerate() {
            let earned = self
                .budget
                .earned
                .get(index.saturating_add(1))
                .copied()
                .unwrap_or(0);
            if self.geometry.unaligned(snap.l1_table_offset) {
                self.walk_problem(
                    ProblemKind::SnapshotL1Unaligned {
                        id: snap.id.clone(),
                        name: snap.name.clone(),
                        l1_offset: snap.l1_table_offset,
                    },
                    snap.l1_table_offset,
                );
                continue;
            }
            if table_bytes(u64::from(snap.l1_size)) > MAX_L1_BYTES {
                self.walk_problem(
                    ProblemKind::SnapshotL1TooLarge {
                        id: snap.id.clone(),
                        name: snap.name.clone(),
                        l1_size: snap.l1_size,
                    },
                    snap.l1_table_offset,
                );
                continue;
            }
            self.walk_l1(
                snap.l1_table_offset,
                snap.l1_size,
                None,
                Table::Snapshot,
                earned,
            )?;
        }
        Ok(())
    }

    /// QEMU's `check_refcounts_l1`: the table itself, then each L2 table and what it maps.
    /// `held` is the table when it is in memory already; otherwise it is streamed. The table
    /// may walk `earned` L2 tables (see [`WalkBudget`]).
    fn walk_l1(
        &mut self,
        table_offset: u64,
        entries: u32,
        held: Option<&[u64]>,
        table: Table,
        earned: u64,
    ) -> Result<()> {
        if entries == 0 {
            return Ok(());
        }
        self.left.table_walks = earned;
        self.reference(table_offset, table_bytes(u64::from(entries)));
        let total = match held {
            Some(l1) => l1.len().min(entries as usize),
            // Past the end of the file the entries are zeros: nothing to read or walk.
            None => usize::try_from(self.entries_inside(table_offset, entries)).unwrap_or(0),
        };
        self.spend_table_entries(total as u64, table_offset)?;
        let mut chunk = Vec::new();
        let mut start = 0usize;
        while start < total {
            let count = total.saturating_sub(start).min(STREAM_ENTRIES);
            let slice: &[u64] = match held {
                Some(l1) => l1
                    .get(start..start.saturating_add(count))
                    .unwrap_or_default(),
                None => {
                    let at = table_offset.saturating_add(table_bytes(start as u64));
                    chunk = read_entries(&self.image.io, at, count, "L1 table")?;
                    &chunk
                }
            };
            for (i, &entry) in slice.iter().enumerate() {
                if entry == 0 {
                    continue;
                }
                let entry_at =
                    table_offset.saturating_add(table_bytes(start.saturating_add(i) as u64));
                self.walk_l1_entry(entry, entry_at, table)?;
            }
            start = start.saturating_add(count);
        }
        drop(chunk);
        Ok(())
    }

    /// The check's [`WalkBudget`]. Reads the L1 tables that earn walks (at most the file's
    /// length in all: they lie inside it, each on its own clusters).
    pub(super) fn walk_budget(&self) -> Result<WalkBudget> {
        let image = self.image;
        let header = image.header();
        let bits = self.layout.cluster_bits;
        // The L1 tables the walk reads, in its order; skipped snapshots read nothing.
        let tables = std::iter::once((header.l1_table_offset(), header.l1_size())).chain(
            image.snapshots().iter().map(|s| {
                if self.walks_snapshot_l1(s) {
                    (s.l1_table_offset, s.l1_size)
                } else {
                    (0, 0)
                }
            }),
        );
        // Clusters of the file covered by an earlier L1 table: (first, last) by first.
        let mut claimed = std::collections::BTreeMap::<u64, u64>::new();
        let mut earned = Vec::new();
        for (index, (offset, entries)) in tables.enumerate() {
            let inside = self.entries_inside(offset, entries);
            let first = offset >> bits;
            let last = offset.saturating_add(table_bytes(inside).saturating_sub(1)) >> bits;
            let stacked = claimed
                .range(..=last)
                .next_back()
                .is_some_and(|(_, &end)| end >= first);
            if inside == 0 || stacked {
                earned.push(0);
                continue;
            }
            claimed.insert(first, last);
            let held = (index == 0).then_some(&image.l1[..]);
            let distinct = self.distinct_l2_tables(offset, inside, held)?;
            earned.push(distinct.min(self.file_clusters));
        }
        let entries_per_l2 = image
            .cluster_size()
            .checked_div(header.l2_entry_len())
            .unwrap_or(1);
        Ok(WalkBudget {
            table_entries: (self.file_len / TABLE_ENTRY_LEN).max(MIN_TABLE_ENTRIES),
            earned,
            spare_walks: MIN_L2_WALK_ENTRIES
                .checked_div(entries_per_l2)
                .unwrap_or(1)
                .max(1),
        })
    }

    /// How many distinct L2 tables inside the file the first `inside` entries of the L1
    /// table at `offset` (`held`, when in memory) name.
    fn distinct_l2_tables(&self, offset: u64, inside: u64, held: Option<&[u64]>) -> Result<u64> {
        let mut named = Vec::new();
        let mut keep = |entries: &[u64]| {
            named.extend(
                entries
                    .iter()
                    .map(|e| e & L1_OFFSET_MASK)
                    .filter(|&l2| l2 != 0 && l2 < self.file_len),
            );
        };
        match held {
            Some(l1) => keep(
                l1.get(..usize::try_from(inside).unwrap_or(usize::MAX))
                    .unwrap_or(l1),
            ),
            None => {
                let mut start = 0u64;
                while start < inside {
                    let count = inside.saturating_sub(start).min(STREAM_ENTRIES as u64);
                    let at = offset.saturating_add(table_bytes(start));
                    keep(&read_entries(
                        &self.image.io,
                        at,
                        count as usize,
                        "L1 table",
                    )?);
                    start = start.saturating_add(count);
                }
            }
        }
        named.sort_unstable();
        named.dedup();
        Ok(named.len() as u64)
    }

    /// Whether the walk reads this snapshot's L1 table (QEMU skips an unaligned or too large
    /// one, with an error).
    fn walks_snapshot_l1(&self, snap: &crate::format::snapshot::Snapshot) -> bool {
        !self.geometry.unaligned(snap.l1_table_offset)
            && table_bytes(u64::from(snap.l1_size)) <= MAX_L1_BYTES
    }

    /// How many of the `entries` entries of a table at `offset` lie (if only in part) inside
    /// the file: the rest read as zeros, as QEMU reads them, and name nothing.
    fn entries_inside(&self, offset: u64, entries: u32) -> u64 {
        self.file_len
            .saturating_sub(offset)
            .div_ceil(TABLE_ENTRY_LEN)
            .min(u64::from(entries))
    }

    /// Spend `count` L1 or bitmap table entries read from inside the file (see
    /// [`WalkBudget`]).
    fn spend_table_entries(&mut self, count: u64, at: u64) -> Result<()> {
        match self.left.table_entries.checked_sub(count) {
            Some(left) => {
                self.left.table_entries = left;
                Ok(())
            }
            None => Err(Error::malformed(
                format!(
                    "the L1 tables (of the image and its {} snapshots) and the bitmap tables \
                     hold more than {} entries inside a file of {} bytes: tables stacked on \
                     the same bytes",
                    self.image.snapshots().len(),
                    self.budget.table_entries,
                    self.file_len
                ),
                at,
            )),
        }
    }

    /// Every L2 table inside the file that an L1 entry names (at `l2_offset`) costs one walk
    /// of what its L1 table earned, or else of the pass's spare walks (see [`WalkBudget`]).
    /// A sound image never needs the spare walks, but QEMU walks an L2 table again every
    /// time it is named: an L1 of 131072 entries naming one L2 table of 8192 entries, in a
    /// 2.5 MiB file, kept `qemu-img check` busy for more than 12 minutes. The check stops
    /// with an error there instead.
    fn spend_l2_walk(&mut self, l2_offset: u64, entry_at: u64) -> Result<()> {
        if l2_offset == 0 || l2_offset >= self.file_len {
            return Ok(());
        }
        if let Some(left) = self.left.table_walks.checked_sub(1) {
            self.left.table_walks = left;
            return Ok(());
        }
        match self.left.spare_walks.checked_sub(1) {
            Some(left) => {
                self.left.spare_walks = left;
                Ok(())
            }
            None => Err(Error::malformed(
                format!(
                    "the L1 tables name L2 tables inside the file more often than a sound \
                     image would (each table once per distinct L2 table it names, if it lies \
                     in the file on its own clusters, and {} more times in all), in a file of \
                     {} clusters: an L2 table named again and again",
                    self.budget.spare_walks, self.file_clusters,
                ),
                entry_at,
            )),
        }
    }

    fn walk_l1_entry(&mut self, entry: u64, entry_at: u64, table: Table) -> Result<()> {
        if entry == 0 {
            return Ok(());
        }
        if entry & L1_RESERVED_MASK != 0 {
            self.walk_problem(ProblemKind::L1EntryReserved { entry }, entry_at);
        }
        let l2_offset = entry & L1_OFFSET_MASK;
        self.reference(l2_offset, self.image.cluster_size());
        if self.geometry.unaligned(l2_offset) {
            self.walk_problem(ProblemKind::L2TableUnaligned { l2_offset }, entry_at);
        }
        self.spend_l2_walk(l2_offset, entry_at)?;
        self.walk_l2(l2_offset, table)
    }

    /// QEMU's `check_refcounts_l2`. An L2 table past the end of the file reads as zeros,
    /// which count nothing: it is not read.
    fn walk_l2(&mut self, l2_offset: u64, table: Table) -> Result<()> {
        if l2_offset >= self.file_len {
            return Ok(());
        }
        let mut buf = std::mem::take(&mut self.l2_buf);
        let read = read_padded(&self.image.io, l2_offset, &mut buf, "L2 table");
        let result = read.map(|()| self.walk_l2_entries(&buf, l2_offset, table));
        self.l2_buf = buf;
        result
    }

    fn walk_l2_entries(&mut self, l2: &[u8], l2_offset: u64, table: Table) {
        let entry_len = self.image.header().l2_entry_len() as usize;
        let stats = table == Table::Active && self.first_pass;
        let mut next_contiguous = 0u64;
        let entries = l2.len().checked_div(entry_len).unwrap_or(0);
        let mut i = 0usize;
        while i < entries {
            let at = i.saturating_mul(entry_len);
            // Runs of zero entries (most of a sparse table) count nothing and are never
            // wrong: step over them with a vectorised scan, not one decoded entry at a time.
            let zeros = leading_zero_bytes(l2.get(at..).unwrap_or_default())
                .checked_div(entry_len)
                .unwrap_or(0);
            if zeros > 0 {
                i = i.saturating_add(zeros);
                continue;
            }
            let raw = l2.get(at..at.saturating_add(entry_len)).unwrap_or_default();
            let entry_at = l2_offset.saturating_add(at as u64);
            self.walk_l2_entry(raw, i as u64, entry_at, stats, &mut next_contiguous);
            i = i.saturating_add(1);
        }
    }

    /// One L2 entry, the `index`th of its table, found at `entry_at` in the file.
    fn walk_l2_entry(
        &mut self,
        raw: &[u8],
        index: u64,
        entry_at: u64,
        stats: bool,
        next_contiguous: &mut u64,
    ) {
        let cluster_size = self.image.cluster_size();
        let mut entry = be_u64(raw, 0).unwrap_or(0);
        let bitmap = if self.geometry.extended_l2 {
            be_u64(raw, 8).unwrap_or(0)
        } else {
            0
        };
        let kind = self.geometry.cluster_type(entry);
        if kind != ClusterType::Compressed && entry & L2_STD_RESERVED_MASK != 0 {
            self.walk_problem(ProblemKind::L2EntryReserved { entry }, entry_at);
        }
        match kind {
            ClusterType::Compressed => {
                if entry & OFLAG_COPIED != 0 {
                    let (host_offset, _) = self.geometry.compressed_extent(entry);
                    self.walk_problem(ProblemKind::CompressedCopied { host_offset }, entry_at);
                    entry &= !OFLAG_COPIED;
                }
                if self.geometry.external_data {
                    self.walk_problem(
                        ProblemKind::CompressedWithDataFile { index, entry },
                        entry_at,
                    );
                    return;
                }
                if bitmap != 0 {
                    self.walk_problem(
                        ProblemKind::CompressedWithSubclusters { index, entry },
                        entry_at,
                    );
                    return;
                }
                let (offset, len) = self.geometry.compressed_extent(entry);
                self.reference(offset, len);
                if stats {
                    // Compressed clusters count as fragmented, as in QEMU.
                    let r = &mut self.report;
                    r.allocated_clusters = r.allocated_clusters.saturating_add(1);
                    r.compressed_clusters = r.compressed_clusters.saturating_add(1);
                    r.fragmented_clusters = r.fragmented_clusters.saturating_add(1);
                }
            }
            ClusterType::ZeroAlloc | ClusterType::Normal => {
                let host_offset = entry & L2_OFFSET_MASK;
                if (bitmap >> 32) & bitmap != 0 {
                    self.walk_problem(
                        ProblemKind::SubclusterBitmapCorrupt { host_offset },
                        entry_at,
                    );
                }
                if self.geometry.unaligned(host_offset) {
                    let has_data = if self.geometry.extended_l2 {
                        bitmap & SUB_ALLOC_MASK != 0
                    } else {
                        kind == ClusterType::Normal
                    };
                    self.walk_problem(
                        ProblemKind::DataClusterUnaligned {
                            host_offset,
                            zero: !has_data,
                        },
                        entry_at,
                    );
                }
                if stats {
                    let r = &mut self.report;
                    r.allocated_clusters = r.allocated_clusters.saturating_add(1);
                    if *next_contiguous != 0 && host_offset != *next_contiguous {
                        r.fragmented_clusters = r.fragmented_clusters.saturating_add(1);
                    }
                    *next_contiguous = host_offset.wrapping_add(cluster_size);
                }
                if !self.geometry.external_data {
                    self.reference(host_offset, cluster_size);
                }
            }
            ClusterType::ZeroPlain => {}
            ClusterType::Unallocated => {
                if bitmap & SUB_ALLOC_MASK != 0 {
                    self.walk_problem(ProblemKind::UnallocatedWithSubclusters, entry_at);
                }
            }
        }
    }

    /// QEMU's `qcow2_check_bitmaps_refcounts`: the directory, each table, each data cluster.
    /// The directory is the one checked, as QEMU checks it, when the image was opened.
    fn walk_bitmaps(&mut self) -> Result<()> {
        let image = self.image;
        let Some(ext) = image.header().bitmaps() else {
            return Ok(());
        };
        if image.bitmaps.is_empty() {
            return Ok(());
        }
        self.reference(ext.directory_offset, ext.directory_size);
        let cluster_bits = self.layout.cluster_bits;
        for bitmap in &image.bitmaps {
            self.reference(
                bitmap.table_offset,
                table_bytes(u64::from(bitmap.table_size)),
            );
            // Past the end of the file the entries are zeros (valid, naming no cluster).
            let entries = self.entries_inside(bitmap.table_offset, bitmap.table_size);
            self.spend_table_entries(entries, bitmap.table_offset)?;
            // QEMU reads and validates the whole table before counting its clusters.
            let mut start = 0u64;
            while start < entries {
                let count = entries.saturating_sub(start).min(STREAM_ENTRIES as u64) as usize;
                let at = bitmap.table_offset.saturating_add(table_bytes(start));
                let chunk = read_entries(&image.io, at, count, "bitmap table")?;
                for (i, &entry) in chunk.iter().enumerate() {
                    decode_table_entry(entry, cluster_bits).map_err(|what| {
                        let entry_at = at.saturating_add(table_bytes(i as u64));
                        Error::malformed(format!("bitmap {:?}: {what}", bitmap.name), entry_at)
                    })?;
                }
                start = start.saturating_add(count as u64);
            }
            let mut start = 0u64;
            while start < entries {
                let count = entries.saturating_sub(start).min(STREAM_ENTRIES as u64) as usize;
                let at = bitmap.table_offset.saturating_add(table_bytes(start));
                for entry in read_entries(&image.io, at, count, "bitmap table")? {
                    if let Ok(DataCluster::At(offset)) = decode_table_entry(entry, cluster_bits) {
                        self.reference(offset, image.cluster_size());
                    }
                }
                start = start.saturating_add(count as u64);
            }
        }
        Ok(())
    }

    /// QEMU's `check_refblocks`: each refcount block is referenced once, by the table.
    fn walk_refcount_blocks(&mut self) {
        let cluster_bits = self.layout.cluster_bits;
        for index in 0..self.reftable.len() {
            let entry = self.reftable.get(index).copied().unwrap_or(0);
            let index = index as u64;
            let entry_at = self
                .image
                .header()
                .refcount_table_offset()
                .saturating_add(index.saturating_mul(REFTABLE_ENTRY_LEN));
            let offset = match RefTableEntry::decode(entry, cluster_bits) {
                RefTableEntry::Empty => continue,
                RefTableEntry::Reserved => {
                    self.walk_problem(ProblemKind::RefcountTableEntryReserved { index }, entry_at);
                    continue;
                }
                RefTableEntry::Unaligned(_) => {
                    self.walk_problem(ProblemKind::RefcountBlockUnaligned { index }, entry_at);
                    continue;
                }
                RefTableEntry::Block(offset) => offset,
            };
            let cluster = offset >> cluster_bits;
            if cluster >= self.compared_clusters() {
                self.walk_problem(ProblemKind::RefcountBlockOutsideImage { index }, entry_at);
                continue;
            }
            self.reference(offset, self.image.cluster_size());
            let key = self.next_site();
            if self.window.contains(&cluster) {
                let slot = usize::try_from(cluster.saturating_sub(self.window.start))
                    .unwrap_or(usize::MAX);
                let references = self.counters.get(slot);
                if references != 1 {
                    self.problem(
                        key,
                        ProblemKind::RefcountBlockShared { index, references },
                        offset,
                    );
                }
            }
        }
    }
}

/// Read `count` big-endian table entries at `offset`; zeros past the end of the file.
fn read_entries<I: ReadAt + ?Sized>(
    io: &I,
    offset: u64,
    count: usize,
    what: &str,
) -> Result<Vec<u64>> {
    let mut buf = vec![0u8; count.saturating_mul(8)];
    read_padded(io, offset, &mut buf, what)?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| be_u64(c, 0).unwrap_or(0))
        .collect())
}
