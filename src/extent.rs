//! Where guest data is stored: the allocation map, like `qemu-img map`.

use positioned_io::ReadAt;

use crate::bytes::low_bits;
use crate::error::Result;
use crate::reader::{remaining_in_block, Reader};
use crate::table::{self, Geometry, Mapping};

/// Most clusters (or subclusters) one [`Reader::run_at`] call looks at, and most runs one
/// [`Reader::extent_at`] call joins, so that every call is bounded whatever the image holds;
/// the run or extent returned is then cut short there.
const MAX_UNITS_PER_CALL: u32 = 1 << 16;
const MAX_RUNS_PER_CALL: u32 = 1 << 12;
/// Most unallocated L2 tables one [`Reader::run_at`] call spans.
const MAX_TABLES_PER_CALL: u64 = 1 << 20;

/// How one stretch of the guest disk is stored in this image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ExtentKind {
    /// Stored as is, starting at this offset of the image file (or of its external data file).
    Data {
        /// Host offset of the extent's first byte.
        host_offset: u64,
    },
    /// Stored compressed in the image file.
    Compressed,
    /// Reads as zeros, hiding any backing data.
    Zero,
    /// Not stored in this image: reads from the backing image, or as zeros without one.
    Unallocated,
}

/// A stretch of the guest disk stored one way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// Guest offset of its first byte.
    pub start: u64,
    /// Its length in bytes (never 0).
    pub length: u64,
    /// How it is stored.
    pub kind: ExtentKind,
}

/// How one layer stores a run of units, as QEMU's `qcow2_co_block_status` tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunKind {
    /// Not stored here (the backing image decides).
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// Stored as is.
    Data,
    /// One compressed cluster (or the rest of it).
    Compressed,
}

/// A run of guest bytes that one layer stores one way, contiguously in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    /// Length in bytes (never 0 for a run inside the guest).
    pub len: u64,
    pub kind: RunKind,
    /// Host offset of the run's first byte, when its clusters have one: data, preallocated
    /// zero clusters, unallocated subclusters of allocated clusters.
    pub host: Option<u64>,
}

impl RunKind {
    fn of(mapping: Mapping) -> Self {
        match mapping {
            Mapping::Data { .. } => RunKind::Data,
            Mapping::Compressed { .. } => RunKind::Compressed,
            Mapping::Zero => RunKind::Zero,
            Mapping::Unallocated => RunKind::Unallocated,
        }
    }
}

impl ExtentKind {
    fn of(run: &Run) -> Self {
        match (run.kind, run.host) {
            (RunKind::Data, Some(host_offset)) => ExtentKind::Data { host_offset },
            (RunKind::Compressed, _) => ExtentKind::Compressed,
            (RunKind::Zero, _) => ExtentKind::Zero,
            _ => ExtentKind::Unallocated,
        }
    }

    /// Whether `next`, found `gap` bytes after the start of an extent of this kind,
    /// continues it.
    fn continued_by(self, next: ExtentKind, gap: u64) -> bool {
        match (self, next) {
            (ExtentKind::Data { host_offset: a }, ExtentKind::Data { host_offset: b }) => {
                a.checked_add(gap) == Some(b)
            }
            (a, b) => a == b,
        }
    }
}

impl<'a, I: ReadAt> Reader<'a, I> {
    /// The longest extent stored one way that starts at guest offset `pos`, or `None` at or
    /// past the end of the guest. Walk the whole disk by calling it again at the end of each
    /// extent:
    ///
    /// ```
    /// let image = qcow2::Qcow2::open_path("fixtures/zlib-4k-mixed.qcow2")?;
    /// let reader = image.reader()?;
    /// let mut pos = 0;
    /// while let Some(extent) = reader.extent_at(pos)? {
    ///     println!("{:>10} {:>8} {:?}", extent.start, extent.length, extent.kind);
    ///     pos += extent.length;
    /// }
    /// assert_eq!(pos, image.guest_size());
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    ///
    /// The map is this image's own, like `qemu-img map` of one layer: a backing image's
    /// clusters show as [`ExtentKind::Unallocated`]. [`Reader::map`] maps the whole chain.
    pub fn extent_at(&self, pos: u64) -> Result<Option<Extent>> {
        let size = self.guest_size();
        if pos >= size {
            return Ok(None);
        }
        let mut kind: Option<ExtentKind> = None;
        let mut end = pos;
        for _ in 0..MAX_RUNS_PER_CALL {
            if end >= size {
                break;
            }
            let run = self.run_at(end, size.saturating_sub(end))?;
            let here = ExtentKind::of(&run);
            match kind {
                None => kind = Some(here),
                Some(k) if k.continued_by(here, end.saturating_sub(pos)) => {}
                Some(_) => break,
            }
            end = end.saturating_add(run.len);
        }
        Ok(kind.map(|kind| Extent {
            start: pos,
            length: end.saturating_sub(pos),
            kind,
        }))
    }

    /// The run that starts at guest offset `pos`, at most `max_len` bytes and never past the
    /// guest: units of one kind, with contiguous host offsets where they have any, within one
    /// L2 table; a compressed run is the rest of one cluster. Unallocated L2 tables in a row
    /// make one run. Empty at or past the end of the guest.
    ///
    /// This is the one walk over the L2 tables behind [`Reader::extent_at`] and the map.
    pub(crate) fn run_at(&self, pos: u64, max_len: u64) -> Result<Run> {
        let end = pos.saturating_add(max_len).min(self.guest_size());
        if pos >= end {
            return Ok(Run {
                len: 0,
                kind: RunKind::Unallocated,
                host: None,
            });
        }
        let g = self.image().geometry;
        let l2_bits = g.l2_bits();
        let unit_bits = g.unit_bits();
        let l1_index = pos >> l2_bits;
        let Some((at, t)) = self.l2_table(l1_index)? else {
            let mut next = l1_index.saturating_add(1);
            while next << l2_bits < end
                && next.saturating_sub(l1_index) < MAX_TABLES_PER_CALL
                && self.l2_unallocated(next)
            {
                if next >= self.l1_len() {
                    // Past the L1 table all is unallocated, up to any virtual size.
                    next = u64::MAX >> l2_bits;
                    break;
                }
                next = next.saturating_add(1);
            }
            let stop = (next << l2_bits).min(end);
            return Ok(Run {
                len: stop.saturating_sub(pos),
                kind: RunKind::Unallocated,
                host: None,
            });
        };
        let (first, unit_host) = self.unit_in(&t, at, pos)?;
        let kind = RunKind::of(first);
        let host = unit_host.map(|h| h.saturating_add(low_bits(pos, unit_bits)));
        if kind == RunKind::Compressed {
            // QEMU reports compressed clusters one at a time.
            let len = remaining_in_block(pos, g.cluster_bits).min(end.saturating_sub(pos));
            return Ok(Run { len, kind, host });
        }
        let table_end = end.min(l1_index.saturating_add(1) << l2_bits);
        let mut cur = pos.saturating_add(remaining_in_block(pos, unit_bits));
        for _ in 1..MAX_UNITS_PER_CALL {
            if cur >= table_end {
                break;
            }
            if kind == RunKind::Unallocated && host.is_none() {
                // Most of a sparse table is zero entries: step over them without decoding.
                let zeros = zero_entries(&t, &g, cur, table_end);
                if zeros > 0 {
                    cur = cur.saturating_add(zeros << g.cluster_bits);
                    continue;
                }
            }
            let (mapping, unit_host) = self.unit_in(&t, at, cur)?;
            let expected = host.map(|h| h.saturating_add(cur.saturating_sub(pos)));
            if RunKind::of(mapping) != kind || unit_host != expected {
                break;
            }
            cur = cur.saturating_add(1u64 << unit_bits);
        }
        Ok(Run {
            len: cur.min(table_end).saturating_sub(pos),
            kind,
            host,
        })
    }

    /// Whether the L2 table for L1 index `index` is unallocated (an entry past the L1 table
    /// is). A malformed entry is not: the next run reports it.
    fn l2_unallocated(&self, index: u64) -> bool {
        match self.l1_entry(index) {
            None => true,
            Some(entry) => matches!(
                table::l2_table_offset(entry, &self.image().geometry, 0),
                Ok(None)
            ),
        }
    }
}

/// How many whole clusters from guest offset `pos` (a cluster boundary, or else none count)
/// up to `end` have all-zero L2 entries in `table`: plainly unallocated, standard or extended.
fn zero_entries(table: &[u64], g: &Geometry, pos: u64, end: u64) -> u64 {
    if low_bits(pos, g.cluster_bits) != 0 {
        return 0;
    }
    let words: usize = if g.extended_l2 { 2 } else { 1 };
    let index = low_bits(pos >> g.cluster_bits, g.index_bits) as usize;
    let most = usize::try_from(end.saturating_sub(pos) >> g.cluster_bits).unwrap_or(usize::MAX);
    let from = index.saturating_mul(words);
    let to = from
        .saturating_add(most.saturating_mul(words))
        .min(table.len());
    let span = table.get(from..to).unwrap_or_default();
    // One flat scan of words; an extended entry counts once both its words are zero.
    let zero_words = span.iter().position(|&w| w != 0).unwrap_or(span.len());
    zero_words.checked_div(words).unwrap_or(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_entries_count_whole_clusters_up_to_the_first_non_zero_word() {
        let standard = Geometry {
            cluster_bits: 16,
            index_bits: 3,
            extended_l2: false,
            external_data: false,
            pre_v3: false,
        };
        let table = [0, 0, 0, 7, 0, 0, 0, 0];
        assert_eq!(zero_entries(&table, &standard, 0, 8 << 16), 3);
        assert_eq!(zero_entries(&table, &standard, 0, 2 << 16), 2);
        assert_eq!(zero_entries(&table, &standard, 4 << 16, 8 << 16), 4);
        assert_eq!(
            zero_entries(&table, &standard, 1, 8 << 16),
            0,
            "not a boundary"
        );
        // Extended entries are two words: a bitmap word alone stops the count too.
        let extended = Geometry {
            extended_l2: true,
            index_bits: 2,
            ..standard
        };
        let table = [0, 0, 0, 0, 0, 1 << 33, 0, 0];
        assert_eq!(zero_entries(&table, &extended, 0, 4 << 16), 2);
        // Table index wraps per L2 table: guest offset 4 clusters is index 0 again.
        assert_eq!(zero_entries(&table, &extended, 4 << 16, 6 << 16), 2);
    }
}
