//! The allocation map of a guest range through the whole backing chain, as `qemu-img map`
//! reports it.
//!
//! Each step walks down the chain until a layer has data or zeros (`guest/chain.rs`, as
//! `get_block_status` in `qemu-img.c`); neighbours are merged when every property matches and
//! offsets continue (`entry_mergeable`).

use std::ops::{Bound, RangeBounds};
use std::path::Path;

use positioned_io::ReadAt;

use crate::error::{Error, Result};
use crate::guest::chain;
use crate::image::reader::Reader;

/// A stretch of the guest disk that reads the same way, with `qemu-img map`'s properties.
///
/// With the `serde` feature it serializes as one entry of `qemu-img map --output=json`
/// (`offset` left out when there is none; `file` is not part of it).
///
/// ```
/// let image = qcow2::Qcow2::open_path("fixtures/chain-top.qcow2")?;
/// let reader = image.reader()?;
/// let first = reader.map(..).next().expect("a non-empty disk")?;
/// assert_eq!(first.start, 0);
/// println!("{} bytes from layer {} (data {}, zero {})", first.length, first.depth, first.data, first.zero);
/// # Ok::<(), qcow2::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct MapExtent<'a> {
    /// Guest offset of its first byte.
    pub start: u64,
    /// Its length in bytes (never 0).
    pub length: u64,
    /// The layer of the backing chain that decides what it reads: 0 is the image itself,
    /// 1 its backing file, and so on. For a stretch that no layer has, the deepest layer
    /// asked.
    pub depth: u32,
    /// Whether that layer has it (allocated, data or zeros), rather than falling through.
    pub present: bool,
    /// Whether it reads as zeros.
    pub zero: bool,
    /// Whether it is stored as data (it may still be a hole in the file: then `zero` too).
    pub data: bool,
    /// Whether it is stored compressed.
    pub compressed: bool,
    /// Where its first byte lies in [`file`](Self::file), when it lies somewhere plainly.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub offset: Option<u64>,
    /// The file `offset` is in (an image file, its external data file or a raw backing file),
    /// when `offset` is known and the file was opened by path.
    #[cfg_attr(feature = "serde", serde(skip))]
    pub file: Option<&'a Path>,
}

impl MapExtent<'_> {
    /// Whether `next`, which starts where this one ends, continues it: QEMU's
    /// `entry_mergeable`.
    fn continued_by(&self, next: &MapExtent<'_>) -> bool {
        self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.depth == next.depth
            && self.present == next.present
            && self.file == next.file
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
                _ => false,
            }
    }
}

/// The extents of a guest range, in order, each as long as it can be: see [`Reader::map`].
///
/// Lazy: nothing is read until it is iterated.
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// let image = qcow2::Qcow2::open_path("fixtures/v3-64k-basic.qcow2")?;
/// image.reader()?.map(..); // error: unused `MapIter` that must be used
/// # Ok::<(), qcow2::Error>(())
/// ```
#[must_use = "iterators are lazy and do nothing unless consumed"]
pub struct MapIter<'a, I> {
    reader: Reader<'a, I>,
    /// Where the next status is asked.
    pos: u64,
    end: u64,
    /// A status already asked that did not continue the extent returned last.
    pending: Option<MapExtent<'a>>,
    failed: bool,
}

impl<I> std::fmt::Debug for MapIter<'_, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapIter")
            .field("pos", &self.pos)
            .field("end", &self.end)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl<'a, I: ReadAt> Reader<'a, I> {
    /// The allocation map of `range` (clipped to the guest), through the whole backing
    /// chain, exactly as `qemu-img map` reports it: one [`MapExtent`] per run of bytes
    /// with the same properties.
    ///
    /// ```
    /// let image = qcow2::Qcow2::open_path("fixtures/chain-top.qcow2")?;
    /// let reader = image.reader()?;
    /// for extent in reader.map(..) {
    ///     let e = extent?;
    ///     println!("{:#x}+{:#x} depth {} data {} zero {}", e.start, e.length, e.depth, e.data, e.zero);
    /// }
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    ///
    /// Work per extent is bounded by what the image stores there, not by the length of the
    /// range: an empty terabyte maps in a handful of steps. Holes in the files are found
    /// with the [`HoleQuery`](crate::HoleQuery) each file has (see [`crate::Qcow2::set_hole_query`]).
    pub fn map(&self, range: impl RangeBounds<u64>) -> MapIter<'a, I> {
        let (start, end) = clip(&range, self.guest_size());
        MapIter {
            reader: self.same_view(),
            pos: start,
            end,
            pending: None,
            failed: false,
        }
    }
}

impl<'a, I: ReadAt> MapIter<'a, I> {
    fn status(&mut self) -> Result<MapExtent<'a>> {
        let pos = self.pos;
        let chain = chain::walk(&self.reader, pos, self.end.saturating_sub(pos))?;
        let e = chain::map_extent(&chain);
        if e.length == 0 {
            return Err(Error::malformed(
                "internal error: the map made no progress",
                pos,
            ));
        }
        self.pos = pos.saturating_add(e.length);
        Ok(e)
    }
}

impl<'a, I: ReadAt> Iterator for MapIter<'a, I> {
    type Item = Result<MapExtent<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let mut current = match self.pending.take() {
            Some(e) => e,
            None if self.pos < self.end => match self.status() {
                Ok(e) => e,
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            },
            None => return None,
        };
        while self.pos < self.end {
            match self.status() {
                Ok(next) if current.continued_by(&next) => {
                    current.length = current.length.saturating_add(next.length);
                }
                Ok(next) => {
                    self.pending = Some(next);
                    break;
                }
                Err(e) => {
                    // Like qemu-img: the error ends the map, the extent being grown is lost.
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
        Some(Ok(current))
    }
}

/// `range` as `[start, end)` inside a guest of `size` bytes.
pub(crate) fn clip(range: &impl RangeBounds<u64>, size: u64) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    (start.min(size), end.min(size))
}
