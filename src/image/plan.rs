//! The read planner: the one walk over the L1 and L2 tables. It turns a guest range into
//! extents, each stored one way (data at a host offset, compressed, zeros, not here), and
//! reads, [`Reader::extent_at`](crate::Reader::extent_at), the map and the read-ahead are all
//! built on it. It plans over [`Tables`], which a reader lends it; the reader executes plans.
//!
//! L2 tables are cached in slices of [`SLICE_BYTES`] (as QEMU does since 4.0): a point read
//! costs one small read of metadata on a miss, and a walk reads the rest of a table at once.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use positioned_io::ReadAt;

use crate::base::bytes::be_u64;
use crate::base::bytes::{leading_zero_bytes, low_bits};
use crate::base::cache::ByteLru;
use crate::base::io::read_metadata_into;
use crate::error::{Error, Result};
use crate::format::header::TABLE_ENTRY_LEN;
use crate::format::table::{self, remaining_in_block, Extent, ExtentKind, Geometry};

/// L2 table slices, as stored, by (image id, file offset), within a byte budget shared by a
/// backing chain.
pub(crate) type L2Cache = ByteLru<(u64, u64), u8>;

/// Bytes of an L2 table cached as one piece (or the whole table, when smaller).
pub(crate) const SLICE_BYTES: u64 = 4096;

/// Most units (clusters or subclusters) one extent spans, and most unallocated L2 tables:
/// every call is bounded whatever the image holds; the extent is then cut short there.
const MAX_UNITS_PER_EXTENT: u64 = 1 << 16;
const MAX_TABLES_PER_EXTENT: u64 = 1 << 20;

/// One cached piece of an L2 table.
#[derive(Clone)]
struct Slice {
    /// L1 index of its table.
    l1_index: u64,
    /// The slice's number within its table.
    number: u64,
    /// File offset of its first entry, for errors.
    at: u64,
    /// The entries as stored (big-endian): decoding only the entries looked at costs less
    /// than converting every table read.
    bytes: Arc<[u8]>,
}

/// An entry's first word and its subcluster bitmap (0 without extended L2).
#[inline]
fn split_entry(entry: &[u8], g: &Geometry) -> (u64, u64) {
    let word = be_u64(entry, 0).unwrap_or(0);
    let bitmap = match g.extended_l2 {
        true => be_u64(entry, TABLE_ENTRY_LEN as usize).unwrap_or(0),
        false => 0,
    };
    (word, bitmap)
}

impl Slice {
    /// The 64-bit word at `index`.
    #[inline]
    fn word(&self, index: u64) -> Option<u64> {
        let at = usize::try_from(index.checked_mul(TABLE_ENTRY_LEN)?).ok()?;
        be_u64(&self.bytes, at)
    }

    /// The entry whose first word is `word`: that word, the subcluster bitmap (0 without
    /// extended L2), and where the entry is in the file.
    #[inline]
    fn entry(&self, word: u64, g: &Geometry) -> Option<(u64, u64, u64)> {
        let entry = self.word(word)?;
        let bitmap = match g.extended_l2 {
            true => self.word(word.saturating_add(1))?,
            false => 0,
        };
        let at = self.at.saturating_add(word.saturating_mul(TABLE_ENTRY_LEN));
        Some((entry, bitmap, at))
    }
}

/// log2 of the slots of [`NearSlices`]: a reader keeps at most this many slices of its own
/// (128 KiB at most). 32 slots cover the tables of a 1 GiB disk with 64 KiB clusters: with
/// 16, random reads there found their slice half the time, and each miss cost a tenth of a
/// 4 KiB read's time.
const NEAR_SLOT_BITS: u32 = 5;
const NEAR_SLOTS: usize = 1 << NEAR_SLOT_BITS;

/// The slices one reader used last, by slot (direct-mapped by slice offset). A thread that
/// reads through its own reader finds them under a lock nobody else takes, so threads
/// reading one image with a reader each do not contend on the shared cache.
#[derive(Default)]
pub(crate) struct NearSlices {
    slots: Mutex<Slots>,
    /// What a point read needs of the kept slices whose entries follow one another, read
    /// without the lock (whose two atomic operations were a quarter of a lookup's time).
    linear: LinearSlots,
}

/// The kept slices, and whether each was looked at for a [`Linear`] shape (apart: a `Slice`
/// cloned out stays small).
#[derive(Default)]
struct Slots {
    slices: [Option<Slice>; NEAR_SLOTS],
    looked_at: [bool; NEAR_SLOTS],
}

/// Copies of the kept slices that are [`Linear`], by slot, behind a sequence lock: writers
/// hold the slots' lock (so they never race one another) and make the sequence odd while
/// they write; a reader that sees it odd, or changed after reading, takes the lock instead.
#[derive(Default)]
struct LinearSlots {
    sequence: AtomicU64,
    slots: [LinearSlot; NEAR_SLOTS],
}

#[derive(Default)]
struct LinearSlot {
    at: AtomicU64,
    first: AtomicU64,
    bitmap: AtomicU64,
    /// 64-bit words of the slice; 0 when the slot holds none.
    words: AtomicU64,
}

/// A slice whose entry `i` is `first + (i << cluster_bits)`, each with the subcluster bitmap
/// `bitmap` (clusters allocated one after the other, as `qemu-img convert` writes them): a
/// reader computes its entries instead of loading them. A random 4 KiB read over a disk of
/// many slices otherwise misses the CPU caches on the entry (the page-cache copies in between
/// evict it): a third of the crate's own time there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Linear {
    first: u64,
    bitmap: u64,
    /// The slice's length in 64-bit words.
    words: u64,
}

impl Linear {
    /// The slice of entries `bytes` (big-endian words, two per entry with extended L2), if
    /// linear. Out of line: found once per kept slice, it would only bloat the lookup it
    /// sits in.
    #[inline(never)]
    fn of(bytes: &[u8], g: &Geometry) -> Option<Linear> {
        let entry_len = TABLE_ENTRY_LEN.saturating_mul(words_per_entry(g)) as usize;
        let mut entries = bytes.chunks_exact(entry_len);
        let (first, bitmap) = split_entry(entries.next()?, g);
        let step = 1u64 << g.cluster_bits;
        let mut expected = first;
        for entry in entries {
            expected = expected.checked_add(step)?;
            if split_entry(entry, g) != (expected, bitmap) {
                return None;
            }
        }
        let words = (bytes.len() as u64) >> TABLE_ENTRY_LEN.trailing_zeros();
        Some(Linear {
            first,
            bitmap,
            words,
        })
    }

    /// [`Slice::entry`] of the slice at file offset `at`, computed.
    #[inline]
    fn entry(self, at: u64, word: u64, g: &Geometry) -> Option<(u64, u64, u64)> {
        if word.saturating_add(words_per_entry(g)) > self.words {
            return None;
        }
        let index = word >> words_per_entry(g).trailing_zeros();
        let entry = self.first.checked_add(index << g.cluster_bits)?;
        let entry_at = at.saturating_add(word.saturating_mul(TABLE_ENTRY_LEN));
        Some((entry, self.bitmap, entry_at))
    }
}

impl LinearSlots {
    /// The linear slice at file offset `at`, if slot `slot` holds it.
    #[inline]
    fn read(&self, slot: usize, at: u64) -> Option<Linear> {
        let kept = self.slots.get(slot)?;
        let before = self.sequence.load(Ordering::Acquire);
        let slot_at = kept.at.load(Ordering::Relaxed);
        let linear = Linear {
            first: kept.first.load(Ordering::Relaxed),
            bitmap: kept.bitmap.load(Ordering::Relaxed),
            words: kept.words.load(Ordering::Relaxed),
        };
        fence(Ordering::Acquire);
        let after = self.sequence.load(Ordering::Relaxed);
        let consistent = before == after && before & 1 == 0;
        (consistent && slot_at == at && linear.words > 0).then_some(linear)
    }

    /// Set slot `slot` to the linear slice at `at`, or to none. Only under the slots' lock.
    fn write(&self, slot: usize, at: u64, linear: Option<Linear>) {
        let Some(kept) = self.slots.get(slot) else {
            return;
        };
        let sequence = self.sequence.load(Ordering::Relaxed);
        self.sequence
            .store(sequence.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        let linear = linear.unwrap_or(Linear {
            first: 0,
            bitmap: 0,
            words: 0,
        });
        kept.at.store(at, Ordering::Relaxed);
        kept.first.store(linear.first, Ordering::Relaxed);
        kept.bitmap.store(linear.bitmap, Ordering::Relaxed);
        kept.words.store(linear.words, Ordering::Relaxed);
        self.sequence
            .store(sequence.wrapping_add(2), Ordering::Release);
    }
}

impl NearSlices {
    #[inline]
    fn slot(at: u64, g: &Geometry) -> usize {
        low_bits(at >> slice_bytes(g).trailing_zeros(), NEAR_SLOT_BITS) as usize
    }

    /// The slice at file offset `at`, if kept (and the lock free: a reader shared by threads
    /// falls back to the shared cache rather than wait).
    #[inline]
    fn get(&self, at: u64, g: &Geometry) -> Option<Slice> {
        let slots = self.slots.try_lock().ok()?;
        slots.kept(at, g).cloned()
    }

    /// [`Slice::entry`] of the slice at file offset `at`, if kept: computed when the slice's
    /// entries follow one another (without taking the lock), else read in place. The shape
    /// is found the first time a kept slice is read from again, so slices used once never
    /// pay for it.
    #[inline]
    fn entry(&self, at: u64, word: u64, g: &Geometry) -> Option<(u64, u64, u64)> {
        let slot = Self::slot(at, g);
        if let Some(linear) = self.linear.read(slot, at) {
            return linear.entry(at, word, g);
        }
        let mut slots = self.slots.try_lock().ok()?;
        let slice = slots.kept(at, g)?;
        let looked_at = *slots.looked_at.get(slot)?;
        let linear = match looked_at {
            true => None,
            false => Linear::of(&slice.bytes, g),
        };
        if let Some(looked_at) = slots.looked_at.get_mut(slot) {
            *looked_at = true;
        }
        if let Some(linear) = linear {
            self.linear.write(slot, at, Some(linear));
            return linear.entry(at, word, g);
        }
        slots.kept(at, g)?.entry(word, g)
    }

    /// Whether the slice at file offset `at` is kept.
    #[inline]
    fn has(&self, at: u64, g: &Geometry) -> bool {
        self.slots
            .try_lock()
            .is_ok_and(|slots| slots.kept(at, g).is_some())
    }

    #[inline]
    fn put(&self, slice: &Slice, g: &Geometry) {
        if let Ok(mut slots) = self.slots.try_lock() {
            let slot = Self::slot(slice.at, g);
            if let Some(kept) = slots.slices.get_mut(slot) {
                *kept = Some(slice.clone());
            }
            if let Some(looked_at) = slots.looked_at.get_mut(slot) {
                *looked_at = false;
            }
            self.linear.write(slot, slice.at, None);
        }
    }

    /// The copy of the kept slice at file offset `at` read without the lock, if it is
    /// linear and was looked at (tests).
    #[cfg(test)]
    fn linear(&self, at: u64, g: &Geometry) -> Option<Linear> {
        self.linear.read(Self::slot(at, g), at)
    }
}

impl Slots {
    #[inline]
    fn kept(&self, at: u64, g: &Geometry) -> Option<&Slice> {
        self.slices
            .get(NearSlices::slot(at, g))?
            .as_ref()
            .filter(|slice| slice.at == at)
    }
}

/// Walks the tables of one reader, keeping the L2 slice it is in, so that a walk looks the
/// cache up once per slice, not once per cluster.
pub(crate) struct Planner<'t> {
    tables: Tables<'t>,
    geometry: Geometry,
    slice: Option<Slice>,
    /// Whether the first unit was looked up, in place if the reader kept its slice.
    peeked: bool,
}

/// What the planner plans over: the tables of one view of an image (the active disk or a
/// snapshot), lent by a reader.
#[derive(Clone, Copy)]
pub(crate) struct Tables<'t> {
    pub(crate) geometry: Geometry,
    /// The view's L1 table.
    pub(crate) l1: &'t [u64],
    /// File offset of that L1 table, for errors.
    pub(crate) l1_offset: u64,
    /// The view's guest size.
    pub(crate) size: u64,
    /// The image file, where the L2 tables are.
    pub(crate) io: &'t dyn ReadAt,
    /// The cache of L2 slices the image shares with its chain, and the image's key in it.
    pub(crate) cache: &'t Mutex<L2Cache>,
    pub(crate) image_id: u64,
    /// What the lending reader remembers of the tables.
    pub(crate) memory: &'t TableMemory,
}

/// What a reader remembers of its tables between plans.
#[derive(Default)]
pub(crate) struct TableMemory {
    /// The slices this reader used last: found again without the shared cache's lock.
    near: NearSlices,
    /// A buffer for reading L2 slices, kept so that a walk does not allocate (and the kernel
    /// zero) fresh memory for every table.
    scratch: Mutex<Vec<u8>>,
    /// L2 tables walked whole and found to map nothing.
    empty_tables: EmptyTables,
}

impl<'t> Planner<'t> {
    pub(crate) fn new(tables: Tables<'t>) -> Self {
        Planner {
            geometry: tables.geometry,
            tables,
            slice: None,
            peeked: false,
        }
    }

    /// The extent starting at guest offset `pos`, ending at `end` at the latest (clipped to
    /// the guest). Empty (unallocated, length 0) at or past the end.
    pub(crate) fn extent(&mut self, pos: u64, end: u64) -> Result<Extent> {
        let end = end.min(self.tables.size);
        if pos >= end {
            return Ok(Extent {
                start: pos,
                length: 0,
                kind: ExtentKind::NOTHING,
            });
        }
        let g = self.geometry;
        let l1_index = pos >> g.l2_bits();
        let Some(table_at) = self.tables.l2_table_offset(l1_index)? else {
            return Ok(self.unallocated_tables(pos, l1_index, end));
        };
        if self.tables.memory.empty_tables.has(table_at) {
            // A table already walked and found to map nothing: as if unallocated.
            return Ok(self.unallocated_tables(pos, l1_index, end));
        }
        let table_end = end.min(l1_index.saturating_add(1) << g.l2_bits());
        let kind = self.unit(table_at, pos, table_end)?;
        if let ExtentKind::Compressed { .. } = kind {
            // One cluster at a time, as QEMU reports and decompresses them.
            let length = remaining_in_block(pos, g.cluster_bits).min(end.saturating_sub(pos));
            return Ok(Extent {
                start: pos,
                length,
                kind,
            });
        }
        let unit_bits = g.unit_bits();
        // The first unit's host offset, moved on to `pos` inside it.
        let kind = kind.advanced(low_bits(pos, unit_bits));
        let mut cur = pos.saturating_add(remaining_in_block(pos, unit_bits));
        for _ in 1..MAX_UNITS_PER_EXTENT {
            if cur >= table_end {
                break;
            }
            // A unit after the first that cannot be decoded (a misaligned or invalid entry)
            // ends the extent, as QEMU's count of contiguous clusters stops at it: the
            // extent that starts there reports the error. `qemu-img map` prints what comes
            // before it.
            if kind == ExtentKind::NOTHING {
                // Most of a sparse table is zero entries: step over them without decoding.
                let Ok(zeros) = self.zero_entries(table_at, cur, table_end) else {
                    break;
                };
                if zeros > 0 {
                    cur = cur.saturating_add(zeros << g.cluster_bits);
                    continue;
                }
            }
            let Ok(next) = self.unit(table_at, cur, table_end) else {
                break;
            };
            if !kind.continued_by(next, cur.saturating_sub(pos)) {
                break;
            }
            cur = cur.saturating_add(1u64 << unit_bits);
        }
        let table_start = l1_index << g.l2_bits();
        let whole_table = pos == table_start
            && cur >= table_end
            && table_end == l1_index.saturating_add(1) << g.l2_bits();
        if kind == ExtentKind::NOTHING && whole_table {
            // Remember it: an image whose L1 entries all name one empty table is then walked
            // in time proportional to its L1 table, not to its guest size.
            self.tables.memory.empty_tables.put(table_at);
        }
        Ok(Extent {
            start: pos,
            length: cur.min(table_end).saturating_sub(pos),
            kind,
        })
    }

    /// The unallocated L2 tables from `l1_index` on, up to `end`, as one extent.
    fn unallocated_tables(&self, start: u64, l1_index: u64, end: u64) -> Extent {
        let l2_bits = self.geometry.l2_bits();
        let mut next = l1_index.saturating_add(1);
        while next << l2_bits < end
            && next.saturating_sub(l1_index) < MAX_TABLES_PER_EXTENT
            && self.l2_maps_nothing(next)
        {
            if next >= self.tables.l1_len() {
                // Past the L1 table all is unallocated, up to any virtual size.
                next = u64::MAX >> l2_bits;
                break;
            }
            next = next.saturating_add(1);
        }
        let stop = (next << l2_bits).min(end);
        Extent {
            start,
            length: stop.saturating_sub(start),
            kind: ExtentKind::NOTHING,
        }
    }

    /// Whether the L2 table for L1 index `index` maps nothing: unallocated (an entry past the
    /// L1 table is), or known to hold only unallocated entries ([`EmptyTables`]). A malformed
    /// entry is not: the next extent reports it.
    fn l2_maps_nothing(&self, index: u64) -> bool {
        match self.tables.l2_table_offset(index) {
            Ok(None) => true,
            Ok(Some(at)) => self.tables.memory.empty_tables.has(at),
            Err(_) => false,
        }
    }

    /// Decode the unit at guest offset `guest` of the L2 table at `table_at`; `end` (inside
    /// the same table) says how far the walk may go, for reading slices ahead.
    fn unit(&mut self, table_at: u64, guest: u64, end: u64) -> Result<ExtentKind> {
        let g = self.geometry;
        let (at, word) = entry_position(table_at, guest, &g);
        // A planner's first unit is often its only one (a small read): read the entry from
        // the reader's own slice in place. Taking the slice (an `Arc` clone) would touch one
        // more cache line, and cost a tenth of a 4 KiB read that misses the CPU caches.
        let kept = match self.peeked {
            false => {
                self.peeked = true;
                self.tables.memory.near.entry(at, word, &g)
            }
            true => None,
        };
        let (entry, bitmap, entry_at) = match kept {
            Some(words) => words,
            None => {
                let slice = self.slice_for(table_at, guest, end)?;
                match slice.entry(word, &g) {
                    Some(words) => words,
                    None => return Err(Error::Internal("an L2 index lies outside its slice")),
                }
            }
        };
        let sub = (low_bits(guest, g.cluster_bits) >> g.unit_bits()) as u32;
        let kind = table::decode_l2(entry, bitmap, sub, &g, entry_at)?;
        if g.external_data {
            check_data_file_offset(kind.host_offset(), guest, g.unit_bits(), entry_at)?;
        }
        Ok(kind)
    }

    /// How many whole clusters from `pos` (a cluster boundary, or else none count) up to
    /// `end` have all-zero L2 entries: plainly unallocated, standard or extended. Counts
    /// within the current slice only; the caller asks again for the next.
    fn zero_entries(&mut self, table_at: u64, pos: u64, end: u64) -> Result<u64> {
        let g = self.geometry;
        if low_bits(pos, g.cluster_bits) != 0 {
            return Ok(0);
        }
        let slice = self.slice_for(table_at, pos, end)?;
        let entry_bytes = TABLE_ENTRY_LEN.saturating_mul(words_per_entry(&g));
        let index = low_bits(pos >> g.cluster_bits, g.index_bits);
        let from = entry_bytes.saturating_mul(index.saturating_sub(first_index(slice.number, &g)));
        let most = end.saturating_sub(pos) >> g.cluster_bits;
        let to = from.saturating_add(most.saturating_mul(entry_bytes));
        let to = usize::try_from(to)
            .unwrap_or(usize::MAX)
            .min(slice.bytes.len());
        let from = usize::try_from(from).unwrap_or(usize::MAX);
        let span = slice.bytes.get(from..to).unwrap_or_default();
        // An extended entry counts once both its words are zero.
        Ok((leading_zero_bytes(span) as u64)
            .checked_div(entry_bytes)
            .unwrap_or(0))
    }

    /// The slice holding the entry for `guest` of the table at `table_at`: the one kept, a
    /// cached one, or read from the file together with the slices up to `end`'s.
    fn slice_for(&mut self, table_at: u64, guest: u64, end: u64) -> Result<&Slice> {
        let g = self.geometry;
        let l1_index = guest >> g.l2_bits();
        let number = slice_number(guest, &g);
        let kept = self
            .slice
            .as_ref()
            .is_some_and(|s| s.l1_index == l1_index && s.number == number);
        if !kept {
            let at = table_at.saturating_add(number.saturating_mul(slice_bytes(&g)));
            let near = &self.tables.memory.near;
            let slice = match near.get(at, &g) {
                Some(slice) => Slice {
                    l1_index,
                    number,
                    ..slice
                },
                None => {
                    let last = slice_number(end.saturating_sub(1).max(guest), &g).max(number);
                    let slice = self.tables.l2_slice(table_at, l1_index, number, last)?;
                    near.put(&slice, &g);
                    slice
                }
            };
            self.slice = Some(slice);
        }
        match &self.slice {
            Some(slice) => Ok(slice),
            None => Err(Error::Internal("no L2 slice after loading it")),
        }
    }
}

/// Slots of [`EmptyTables`].
const EMPTY_TABLE_SLOTS: usize = 8;

/// The file offsets of a few L2 tables a reader walked whole and found to map nothing (every
/// entry unallocated, without a host offset), direct-mapped by offset: the planner then steps
/// over each further L1 entry naming one of them at once, as over an unallocated L1 entry.
/// Tables are read-only here, so what was found stays true.
#[derive(Default)]
pub(crate) struct EmptyTables {
    /// Offset + 1 of a table found empty; 0 for none.
    slots: [AtomicU64; EMPTY_TABLE_SLOTS],
}

impl EmptyTables {
    fn slot(&self, at: u64) -> Option<&AtomicU64> {
        // Tables are cluster-aligned: skip the low bits that are always zero (512 B at least).
        let index = (at >> 9) as usize % EMPTY_TABLE_SLOTS;
        self.slots.get(index)
    }

    fn has(&self, at: u64) -> bool {
        self.slot(at)
            .is_some_and(|s| s.load(Ordering::Relaxed) == at.saturating_add(1))
    }

    fn put(&self, at: u64) {
        if let Some(s) = self.slot(at) {
            s.store(at.saturating_add(1), Ordering::Relaxed);
        }
    }
}

/// 64-bit words per L2 entry: two with extended L2 entries.
#[inline]
fn words_per_entry(g: &Geometry) -> u64 {
    if g.extended_l2 {
        2
    } else {
        1
    }
}

/// log2 of the entries in one slice (the whole table when it is smaller than a slice).
#[inline]
fn slice_entry_bits(g: &Geometry) -> u32 {
    // log2(4096 / 8) = 9 entries of one word, 8 of two.
    let bits = SLICE_BYTES
        .trailing_zeros()
        .saturating_sub(TABLE_ENTRY_LEN.trailing_zeros());
    let bits = bits.saturating_sub(words_per_entry(g).trailing_zeros());
    bits.min(g.index_bits)
}

/// The number, within its L2 table, of the slice holding the entry for `guest`.
#[inline]
fn slice_number(guest: u64, g: &Geometry) -> u64 {
    low_bits(guest >> g.cluster_bits, g.index_bits) >> slice_entry_bits(g)
}

/// Where the L2 entry for `guest` lies, in the table at `table_at`: the file offset of its
/// slice, and the entry's first word within that slice.
#[inline]
fn entry_position(table_at: u64, guest: u64, g: &Geometry) -> (u64, u64) {
    let index = low_bits(guest >> g.cluster_bits, g.index_bits);
    let number = slice_number(guest, g);
    let at = table_at.saturating_add(number.saturating_mul(slice_bytes(g)));
    let word = words_per_entry(g).saturating_mul(index.saturating_sub(first_index(number, g)));
    (at, word)
}

/// The L2 index of the first entry of slice `number`.
#[inline]
fn first_index(number: u64, g: &Geometry) -> u64 {
    number << slice_entry_bits(g)
}

/// Bytes of one slice.
#[inline]
fn slice_bytes(g: &Geometry) -> u64 {
    TABLE_ENTRY_LEN
        .saturating_mul(words_per_entry(g))
        .saturating_mul(1 << slice_entry_bits(g))
}

impl Tables<'_> {
    /// Entries in the L1 table: every index from here on is unallocated.
    #[inline]
    fn l1_len(&self) -> u64 {
        self.l1.len() as u64
    }

    /// The L2 table offset for L1 index `l1_index`; `None` if unallocated or past the table.
    #[inline]
    fn l2_table_offset(&self, l1_index: u64) -> Result<Option<u64>> {
        let entry = usize::try_from(l1_index)
            .ok()
            .and_then(|i| self.l1.get(i).copied());
        let Some(entry) = entry else {
            return Ok(None); // past the L1 table: unallocated, as QEMU reads it
        };
        let entry_at = self
            .l1_offset
            .saturating_add(l1_index.saturating_mul(TABLE_ENTRY_LEN));
        table::l2_table_offset(entry, &self.geometry, entry_at)
    }

    /// Slice `number` of the L2 table at `table_at`, from the cache or else read from the
    /// file, together with the slices after it up to `last` (cached for the walk to come).
    fn l2_slice(&self, table_at: u64, l1_index: u64, number: u64, last: u64) -> Result<Slice> {
        let g = &self.geometry;
        let bytes = slice_bytes(g);
        let at = table_at.saturating_add(number.saturating_mul(bytes));
        let cache = self.cache;
        let key = (self.image_id, at);
        let cached = cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .cloned();
        if let Some(bytes) = cached {
            return Ok(Slice {
                l1_index,
                number,
                at,
                bytes,
            });
        }
        // Read ahead, in the same read, the slices up to `last` that this reader does not
        // keep yet (at most as many as it keeps). They go to this reader's own slices only:
        // the shared cache gets what some read asked for, not a walk's every slice.
        let near = &self.memory.near;
        let mut count = 1u64;
        while count < NEAR_SLOTS as u64
            && number.saturating_add(count) <= last
            && !near.has(at.saturating_add(count.saturating_mul(bytes)), g)
        {
            count = count.saturating_add(1);
        }
        let mut scratch = self.memory.scratch.try_lock();
        let mut own = Vec::new();
        let buf = match scratch.as_deref_mut() {
            Ok(reused) => reused,
            Err(_) => &mut own,
        };
        read_metadata_into(self.io, at, count.saturating_mul(bytes), "L2 table", buf)?;
        let mut first = None;
        for (i, piece) in buf
            .chunks(usize::try_from(bytes).unwrap_or(usize::MAX))
            .enumerate()
        {
            let piece: Arc<[u8]> = Arc::from(piece);
            let piece_at = at.saturating_add((i as u64).saturating_mul(bytes));
            if i == 0 {
                cache
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .put(key, Arc::clone(&piece));
                first = Some(piece);
            } else {
                let ahead = Slice {
                    l1_index,
                    number: number.saturating_add(i as u64),
                    at: piece_at,
                    bytes: piece,
                };
                near.put(&ahead, g);
            }
        }
        let bytes = first.ok_or(Error::Internal("an L2 slice read came back empty"))?;
        Ok(Slice {
            l1_index,
            number,
            at,
            bytes,
        })
    }

    /// The host offset of guest `pos` when the `len` bytes from there lie in one unit of plain
    /// data whose entry this reader can compute (a kept linear slice, see [`LinearSlots`]):
    /// a point read then skips the planner. `None` sends the read the planner's way, which
    /// also reports anything wrong with the entry.
    #[inline]
    pub(crate) fn point_data(&self, pos: u64, len: usize) -> Option<u64> {
        let g = &self.geometry;
        let within = low_bits(pos, g.unit_bits());
        if g.external_data || within.checked_add(len as u64)? > 1u64 << g.unit_bits() {
            return None;
        }
        let l1_index = pos >> g.l2_bits();
        let table_at = self.l2_table_offset(l1_index).ok()??;
        let (at, word) = entry_position(table_at, pos, g);
        let near = &self.memory.near;
        let linear = near.linear.read(NearSlices::slot(at, g), at)?;
        let (entry, bitmap, entry_at) = linear.entry(at, word, g)?;
        let sub = (low_bits(pos, g.cluster_bits) >> g.unit_bits()) as u32;
        match table::decode_l2(entry, bitmap, sub, g, entry_at) {
            Ok(ExtentKind::Data { host_offset }) => host_offset.checked_add(within),
            _ => None,
        }
    }
}

/// With an external data file, guest and host offsets are the same (QEMU: "External data file
/// host cluster offset ... does not match guest cluster offset"). QEMU checks every unit that
/// has a host offset: data, preallocated zeros, unallocated subclusters of an allocated cluster.
fn check_data_file_offset(
    unit_host: Option<u64>,
    guest: u64,
    unit_bits: u32,
    entry_at: u64,
) -> Result<()> {
    let Some(host_offset) = unit_host else {
        return Ok(());
    };
    let guest_offset = guest ^ low_bits(guest, unit_bits);
    if host_offset != guest_offset {
        return Err(Error::DataFileOffsetMismatch {
            host_offset,
            guest_offset,
            entry_at,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(cluster_bits: u32, extended_l2: bool) -> Geometry {
        Geometry {
            cluster_bits,
            index_bits: cluster_bits - if extended_l2 { 4 } else { 3 },
            extended_l2,
            external_data: false,
            pre_v3: false,
        }
    }

    #[test]
    fn slices_are_4_kib_or_the_whole_table() {
        let g = geometry(16, false);
        assert_eq!(slice_bytes(&g), 4096);
        assert_eq!(slice_number(0, &g), 0);
        // 512 entries of 64 KiB clusters: a slice maps 32 MiB of guest.
        assert_eq!(slice_number((32 << 20) - 1, &g), 0);
        assert_eq!(slice_number(32 << 20, &g), 1);
        // The slice number restarts with every table (8192 entries: 512 MiB).
        assert_eq!(slice_number(512 << 20, &g), 0);
        // Extended entries are 16 bytes: 256 per slice.
        let e = geometry(16, true);
        assert_eq!(slice_bytes(&e), 4096);
        assert_eq!(slice_number(256 << 16, &e), 1);
        // 512-byte clusters: the table is one 512-byte slice.
        let small = geometry(9, false);
        assert_eq!(slice_bytes(&small), 512);
        assert_eq!(slice_number(u64::MAX, &small), 0);
    }

    #[test]
    fn kinds_continue_only_with_contiguous_hosts() {
        let data = ExtentKind::Data {
            host_offset: 0x10000,
        };
        let data_at = |host_offset| ExtentKind::Data { host_offset };
        let zero = |host_offset| ExtentKind::Zero { host_offset };
        assert!(data.continued_by(data_at(0x20000), 0x10000));
        assert!(!data.continued_by(data_at(0x30000), 0x10000));
        assert!(!data.continued_by(zero(None), 0x10000));
        assert!(zero(None).continued_by(zero(None), 1 << 20));
        assert!(!zero(None).continued_by(zero(Some(0)), 1 << 20));
        let compressed = ExtentKind::Compressed {
            host_offset: 0x10000,
            compressed_len: 512,
        };
        assert!(!compressed.continued_by(compressed, 0));
    }

    /// A kept slice of `words` (big-endian) at file offset `at`.
    fn kept_slice(near: &NearSlices, at: u64, words: &[u64], g: &Geometry) -> Slice {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
        let slice = Slice {
            l1_index: 0,
            number: 0,
            at,
            bytes: Arc::from(bytes),
        };
        near.put(&slice, g);
        slice
    }

    /// Every word index a reader may ask for, and some past the slice: the kept slice's
    /// computed entries are the stored ones.
    fn assert_entries_as_stored(near: &NearSlices, slice: &Slice, g: &Geometry) {
        let words = slice.bytes.len() as u64 / TABLE_ENTRY_LEN;
        for word in (0..words + 4).step_by(words_per_entry(g) as usize) {
            assert_eq!(
                near.entry(slice.at, word, g),
                slice.entry(word, g),
                "word {word}"
            );
        }
    }

    #[test]
    fn entries_of_clusters_in_a_row_are_computed_as_stored() {
        let g = geometry(16, false);
        let copied = 1u64 << 63;
        let linear: Vec<u64> = (0..512).map(|i| copied | (0x50000 + (i << 16))).collect();
        let near = NearSlices::default();
        let slice = kept_slice(&near, 0x30000, &linear, &g);
        assert_entries_as_stored(&near, &slice, &g);
        assert_eq!(
            near.linear(0x30000, &g),
            Some(Linear {
                first: linear[0],
                bitmap: 0,
                words: 512
            })
        );
        // A slice put in its slot replaces the copy read without the lock.
        let mut other = linear.clone();
        other[7] = 0;
        let replaced = kept_slice(&near, 0x30000, &other, &g);
        assert_entries_as_stored(&near, &replaced, &g);
        assert_eq!(near.linear(0x30000, &g), None);
        // And the other way round: a linear slice after one that was not is looked at anew.
        let again = kept_slice(&near, 0x30000, &linear, &g);
        assert_entries_as_stored(&near, &again, &g);
        assert!(near.linear(0x30000, &g).is_some());
        // One entry out of step, an unallocated slice, a run that would overflow: read as
        // stored.
        let mut jump = linear.clone();
        jump[300] += 1 << 16;
        let overflow: Vec<u64> = (0..512).map(|i| u64::MAX - (511 - i)).collect();
        for (n, words) in [jump, vec![0; 512], overflow].iter().enumerate() {
            let at = 0x40000 + ((n as u64) << 12);
            let slice = kept_slice(&near, at, words, &g);
            assert_entries_as_stored(&near, &slice, &g);
            assert_eq!(near.linear(at, &g), None);
        }
        // A table smaller than a slice (512-byte clusters): only its own entries.
        let small = geometry(9, false);
        let words: Vec<u64> = (0..64).map(|i| 0x1000 + (i << 9)).collect();
        let slice = kept_slice(&near, 0x800, &words, &small);
        assert_entries_as_stored(&near, &slice, &small);
        assert_eq!(
            near.linear(0x800, &small),
            Some(Linear {
                first: 0x1000,
                bitmap: 0,
                words: 64
            })
        );
    }

    #[test]
    fn extended_entries_in_a_row_need_one_bitmap() {
        let g = geometry(16, true);
        let bitmap = 0xffff_0000u64;
        let words: Vec<u64> = (0..256)
            .flat_map(|i| [0x50000 + (i << 16), bitmap])
            .collect();
        let near = NearSlices::default();
        let slice = kept_slice(&near, 0x30000, &words, &g);
        assert_entries_as_stored(&near, &slice, &g);
        assert_eq!(
            near.linear(0x30000, &g),
            Some(Linear {
                first: 0x50000,
                bitmap,
                words: 512
            })
        );
        let mut other_bitmap = words.clone();
        other_bitmap[2 * 200 + 1] = 0xffff;
        let slice = kept_slice(&near, 0x31000, &other_bitmap, &g);
        assert_entries_as_stored(&near, &slice, &g);
        assert_eq!(near.linear(0x31000, &g), None);
    }
}
