//! The writer's mapping tables: the active L1 table and the L2 tables in memory, changed
//! there and written back in order by `writeback.rs`.

use std::collections::{BTreeSet, HashMap};

use crate::base::bytes::low_bits;
use crate::base::io::{be_u64_words, read_metadata, Storage};
use crate::error::{Error, Result};
use crate::format::table::{self, Geometry, L2_OFFSET_MASK, OFLAG_COPIED};
use crate::image::write::refcounts::Refcounts;

/// Bytes of one L1 entry, and the L1 is written back in pieces of this many bytes.
const ENTRY_LEN: u64 = 8;
const L1_PIECE: u64 = 512;

/// The bytes of a table changed since it was last written: written back whole sectors.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Dirty(Option<(usize, usize)>);

/// Tables are written back in whole sectors.
const SECTOR: usize = 512;

impl Dirty {
    /// All of a table of `len` bytes.
    pub(crate) fn all(len: usize) -> Self {
        Dirty(Some((0, len)))
    }

    pub(crate) fn mark(&mut self, start: usize, end: usize) {
        self.0 = Some(match self.0 {
            Some((a, b)) => (a.min(start), b.max(end)),
            None => (start, end),
        });
    }

    pub(crate) fn is_dirty(&self) -> bool {
        self.0.is_some()
    }

    /// The changed bytes of a table of `len` bytes, widened to sectors, and clean again.
    pub(crate) fn take(&mut self, len: usize) -> Option<(usize, usize)> {
        let (a, b) = self.0.take()?;
        let start = (a / SECTOR).saturating_mul(SECTOR);
        let end = b.next_multiple_of(SECTOR).min(len);
        Some((start, end))
    }
}

/// One L2 table in memory, as words (two per entry with extended L2).
struct L2Table {
    words: Vec<u64>,
    dirty: Dirty,
    /// Use stamp, for dropping the least recently used clean tables.
    used: u64,
}

/// An L2 entry: its first word, its subcluster bitmap (0 without extended L2), and where
/// it is (the table's offset and the entry's index in it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    pub(crate) word: u64,
    pub(crate) bitmap: u64,
    pub(crate) table: u64,
    pub(crate) index: u64,
}

impl Entry {
    /// File offset of the entry, for errors.
    pub(crate) fn at(&self, g: &Geometry) -> u64 {
        let words = if g.extended_l2 { 2 } else { 1 };
        self.table
            .saturating_add(self.index.saturating_mul(ENTRY_LEN.saturating_mul(words)))
    }
}

/// The active L1 table and the cached L2 tables.
pub(crate) struct Tables {
    g: Geometry,
    l1: Vec<u64>,
    l1_offset: u64,
    l1_dirty: BTreeSet<u64>,
    l2: HashMap<u64, L2Table>,
    budget: u64,
    clock: u64,
}

impl Tables {
    pub(crate) fn new(g: Geometry, l1: Vec<u64>, l1_offset: u64, budget: u64) -> Self {
        Tables {
            g,
            l1,
            l1_offset,
            l1_dirty: BTreeSet::new(),
            l2: HashMap::new(),
            budget,
            clock: 0,
        }
    }

    fn cluster_size(&self) -> u64 {
        1u64 << self.g.cluster_bits
    }

    fn words_per_entry(&self) -> u64 {
        if self.g.extended_l2 {
            2
        } else {
            1
        }
    }

    /// The L1 index and L2 index of guest offset `guest`.
    fn split(&self, guest: u64) -> (u64, u64) {
        let l1_index = guest >> self.g.l2_bits();
        let l2_index = low_bits(guest >> self.g.cluster_bits, self.g.index_bits);
        (l1_index, l2_index)
    }

    fn l1_entry(&self, l1_index: u64) -> Result<u64> {
        usize::try_from(l1_index)
            .ok()
            .and_then(|i| self.l1.get(i))
            .copied()
            .ok_or_else(|| {
                Error::malformed(
                    format!("L1 table has no entry {l1_index} for a write inside the disk"),
                    self.l1_offset,
                )
            })
    }

    fn set_l1(&mut self, l1_index: u64, entry: u64) -> Result<()> {
        let slot = usize::try_from(l1_index)
            .ok()
            .and_then(|i| self.l1.get_mut(i))
            .ok_or(Error::Internal("an L1 index past the table"))?;
        *slot = entry;
        self.l1_dirty.insert(l1_index);
        Ok(())
    }

    /// The L2 table of L1 entry `l1_index`, if allocated.
    fn table_of(&self, l1_index: u64) -> Result<Option<u64>> {
        let entry = self.l1_entry(l1_index)?;
        let at = self
            .l1_offset
            .saturating_add(l1_index.saturating_mul(ENTRY_LEN));
        table::l2_table_offset(entry, &self.g, at)
    }

    /// Read the table at `offset` into memory if it is not there.
    fn load<I: Storage>(&mut self, io: &I, offset: u64) -> Result<()> {
        self.clock = self.clock.wrapping_add(1);
        if let Some(t) = self.l2.get_mut(&offset) {
            t.used = self.clock;
            return Ok(());
        }
        let bytes = read_metadata(io, offset, self.cluster_size(), "L2 table")?;
        let words = be_u64_words(&bytes).collect();
        self.l2.insert(
            offset,
            L2Table {
                words,
                dirty: Dirty::default(),
                used: self.clock,
            },
        );
        Ok(())
    }

    fn words(&self, offset: u64) -> Result<&Vec<u64>> {
        self.l2
            .get(&offset)
            .map(|t| &t.words)
            .ok_or(Error::Internal("an L2 table is not in memory"))
    }

    /// The L2 entry of the cluster at guest offset `guest` (all zeros when its table is
    /// unallocated; `table` 0 then).
    pub(crate) fn entry<I: Storage>(&mut self, io: &I, guest: u64) -> Result<Entry> {
        let (l1_index, index) = self.split(guest);
        let Some(table) = self.table_of(l1_index)? else {
            return Ok(Entry {
                word: 0,
                bitmap: 0,
                table: 0,
                index,
            });
        };
        self.entry_in(io, table, index)
    }

    /// Entry `index` of the table at `table`, read into memory if it is not there.
    fn entry_in<I: Storage>(&mut self, io: &I, table: u64, index: u64) -> Result<Entry> {
        self.load(io, table)?;
        let (word, bitmap) = self.words_at(table, index)?;
        Ok(Entry {
            word,
            bitmap,
            table,
            index,
        })
    }

    fn words_at(&self, table: u64, index: u64) -> Result<(u64, u64)> {
        let words = self.words(table)?;
        let first = usize::try_from(index.saturating_mul(self.words_per_entry()))
            .map_err(|_| Error::Internal("an L2 index past the table"))?;
        let word = words.get(first).copied().unwrap_or(0);
        let bitmap = match self.g.extended_l2 {
            true => words.get(first.saturating_add(1)).copied().unwrap_or(0),
            false => 0,
        };
        Ok((word, bitmap))
    }

    /// The entry of the cluster at `guest` in a table this image alone owns, ready to be
    /// changed: a missing table is allocated (empty), one shared with a snapshot is copied
    /// first (its old cluster freed once the new L1 entry is durable).
    pub(crate) fn entry_for_write<I: Storage>(
        &mut self,
        io: &I,
        refs: &mut Refcounts,
        guest: u64,
    ) -> Result<Entry> {
        let (l1_index, index) = self.split(guest);
        let l1_entry = self.l1_entry(l1_index)?;
        let table = match self.table_of(l1_index)? {
            Some(table) if l1_entry & OFLAG_COPIED != 0 => table,
            Some(shared) => self.copy_table(io, refs, l1_index, shared)?,
            None => self.new_table(io, refs, l1_index)?,
        };
        self.entry_in(io, table, index)
    }

    fn new_table<I: Storage>(
        &mut self,
        io: &I,
        refs: &mut Refcounts,
        l1_index: u64,
    ) -> Result<u64> {
        let offset = refs.allocate(io, 1)?;
        let words = vec![0u64; (self.cluster_size() / 8) as usize];
        self.insert_new(offset, words);
        self.set_l1(l1_index, self.g.encode_l1(offset))?;
        Ok(offset)
    }

    fn copy_table<I: Storage>(
        &mut self,
        io: &I,
        refs: &mut Refcounts,
        l1_index: u64,
        shared: u64,
    ) -> Result<u64> {
        self.load(io, shared)?;
        let words = self.words(shared)?.clone();
        let offset = refs.allocate(io, 1)?;
        self.insert_new(offset, words);
        self.set_l1(l1_index, self.g.encode_l1(offset))?;
        refs.free_later(shared, self.cluster_size());
        Ok(offset)
    }

    fn insert_new(&mut self, offset: u64, words: Vec<u64>) {
        self.clock = self.clock.wrapping_add(1);
        self.l2.insert(
            offset,
            L2Table {
                dirty: Dirty::all(words.len().saturating_mul(8)),
                words,
                used: self.clock,
            },
        );
    }

    /// Change an entry (one returned by [`Tables::entry_for_write`]).
    pub(crate) fn set(&mut self, entry: &Entry, word: u64, bitmap: u64) -> Result<()> {
        let per = self.words_per_entry();
        let extended = self.g.extended_l2;
        let t = self
            .l2
            .get_mut(&entry.table)
            .ok_or(Error::Internal("an L2 table to change is not in memory"))?;
        let first = usize::try_from(entry.index.saturating_mul(per))
            .map_err(|_| Error::Internal("an L2 index past the table"))?;
        let slot = t
            .words
            .get_mut(first)
            .ok_or(Error::Internal("an L2 index past the table"))?;
        *slot = word;
        if extended {
            if let Some(slot) = t.words.get_mut(first.saturating_add(1)) {
                *slot = bitmap;
            }
        }
        let start = first.saturating_mul(8);
        t.dirty.mark(
            start,
            start.saturating_add((per as usize).saturating_mul(8)),
        );
        Ok(())
    }

    /// The changed parts of the L2 tables, marked clean: `(file offset, bytes)`.
    pub(crate) fn take_dirty_tables(&mut self) -> Vec<(u64, Vec<u8>)> {
        let mut out: Vec<(u64, Vec<u8>)> = self
            .l2
            .iter_mut()
            .filter_map(|(offset, t)| {
                let len = t.words.len().saturating_mul(8);
                let (start, end) = t.dirty.take(len)?;
                let words = t.words.get(start / 8..end / 8)?;
                let bytes = words.iter().flat_map(|w| w.to_be_bytes()).collect();
                Some((offset.saturating_add(start as u64), bytes))
            })
            .collect();
        out.sort_unstable_by_key(|(offset, _)| *offset);
        out
    }

    /// Mark tables dirty again (whole) after a failed write-back of pieces at `offsets`.
    pub(crate) fn mark_tables_dirty(&mut self, offsets: impl Iterator<Item = u64>) {
        let bits = self.g.cluster_bits;
        for offset in offsets {
            let table = offset >> bits << bits;
            if let Some(t) = self.l2.get_mut(&table) {
                t.dirty = Dirty::all(t.words.len().saturating_mul(8));
            }
        }
    }

    /// The changed pieces of the L1 table, marked clean: `(file offset, bytes)`.
    pub(crate) fn take_dirty_l1(&mut self) -> Vec<(u64, Vec<u8>)> {
        let per_piece = L1_PIECE / ENTRY_LEN;
        let pieces: BTreeSet<u64> = self.l1_dirty.iter().map(|i| i / per_piece).collect();
        self.l1_dirty.clear();
        pieces
            .into_iter()
            .filter_map(|piece| {
                let first = usize::try_from(piece.checked_mul(per_piece)?).ok()?;
                let last = first.saturating_add(per_piece as usize).min(self.l1.len());
                let bytes = self
                    .l1
                    .get(first..last)?
                    .iter()
                    .flat_map(|e| e.to_be_bytes())
                    .collect();
                let at = self.l1_offset.checked_add(piece.checked_mul(L1_PIECE)?)?;
                Some((at, bytes))
            })
            .collect()
    }

    /// Mark L1 pieces dirty again after a failed write-back.
    pub(crate) fn mark_l1_dirty(&mut self, offsets: impl Iterator<Item = u64>) {
        let per_piece = L1_PIECE / ENTRY_LEN;
        for at in offsets {
            let first = at.saturating_sub(self.l1_offset) / ENTRY_LEN;
            self.l1_dirty.extend(first..first.saturating_add(per_piece));
        }
        let len = self.l1.len() as u64;
        self.l1_dirty.retain(|i| *i < len);
    }

    /// The L1 table: its entries and file offset.
    pub(crate) fn l1(&self) -> (&[u64], u64) {
        (&self.l1, self.l1_offset)
    }

    /// Take the L1 table written whole at `offset` with `entries` entries (the new ones
    /// empty) as the active one.
    pub(crate) fn moved_l1(&mut self, offset: u64, entries: usize) {
        self.l1.resize(entries, 0);
        self.l1_offset = offset;
        self.l1_dirty.clear();
    }

    /// Whether more tables are in memory than the budget allows (after a write-back, clean
    /// ones can be dropped).
    pub(crate) fn over_budget(&self) -> bool {
        (self.l2.len() as u64).saturating_mul(self.cluster_size()) > self.budget
    }

    /// Drop the least recently used clean tables until they take half the budget (so that
    /// the next write-back is half a cache of new tables away); at least one stays.
    pub(crate) fn trim(&mut self) {
        let keep = usize::try_from((self.budget / 2) >> self.g.cluster_bits)
            .unwrap_or(usize::MAX)
            .max(1);
        if self.l2.len() <= keep {
            return;
        }
        let mut clean: Vec<(u64, u64)> = self
            .l2
            .iter()
            .filter(|(_, t)| !t.dirty.is_dirty())
            .map(|(offset, t)| (t.used, *offset))
            .collect();
        clean.sort_unstable();
        let excess = self.l2.len().saturating_sub(keep);
        for (_, offset) in clean.into_iter().take(excess) {
            self.l2.remove(&offset);
        }
    }

    /// The host offset of a standard entry's cluster.
    pub(crate) fn host(word: u64) -> u64 {
        word & L2_OFFSET_MASK
    }
}
