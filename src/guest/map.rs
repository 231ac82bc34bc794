//! The allocation map of a guest range through the whole backing chain, as `qemu-img map`
//! reports it.
//!
//! Three steps, each as QEMU does it:
//! 1. one layer's status of a run ([`qcow2_layer_status`], [`raw_layer_status`]): QEMU's
//!    driver answer (`qcow2_co_block_status`, raw over `file-posix`) plus the generic rules of
//!    `bdrv_co_do_block_status` (unallocated without a backing file, or past the backing
//!    file's end, reads as zeros; data in a file with holes asks the file system);
//! 2. down the chain until a layer has data or zeros (`get_block_status` in `qemu-img.c`);
//! 3. neighbours merged when every property matches and offsets continue (`entry_mergeable`).

use std::ops::{Bound, RangeBounds};
use std::path::Path;

use positioned_io::ReadAt;

use crate::base::holes::{HoleQuery, Region};
use crate::base::SECTOR;
use crate::error::{Error, Result};
use crate::format::table::ExtentKind;
use crate::image::plan::Planner;
use crate::image::qcow2::Qcow2;
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
    /// with the [`HoleQuery`] each file has (see [`crate::Qcow2::set_hole_query`]).
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
        let e = chain_status(&self.reader, pos, self.end.saturating_sub(pos))?;
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

/// One layer's answer for a stretch starting at a guest offset, before the chain is asked.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LayerStatus<'a> {
    pub(crate) len: u64,
    pub(crate) present: bool,
    pub(crate) zero: bool,
    pub(crate) data: bool,
    pub(crate) compressed: bool,
    pub(crate) offset: Option<u64>,
    pub(crate) file: Option<&'a Path>,
}

/// Down the chain from `reader`'s layer until one has data or zeros (`get_block_status`).
fn chain_status<'a, I: ReadAt>(
    reader: &Reader<'a, I>,
    pos: u64,
    len: u64,
) -> Result<MapExtent<'a>> {
    let mut status = qcow2_layer_status(reader, pos, len)?;
    let mut depth = 0u32;
    let mut below = reader.image().backing_source();
    while !(status.data || status.zero) {
        let Some(layer) = below else {
            status = LayerStatus {
                len: status.len,
                ..LayerStatus::default()
            };
            break;
        };
        depth = depth.saturating_add(1);
        status = layer.layer_status(pos, status.len)?;
        below = layer.backing_source();
    }
    Ok(MapExtent {
        start: pos,
        length: status.len,
        depth,
        present: status.present,
        zero: status.zero,
        data: status.data,
        compressed: status.compressed,
        offset: status.offset,
        file: status.offset.and(status.file),
    })
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

/// What a qcow2 layer says about `len` bytes at `pos` (clipped to its guest and to one run).
pub(crate) fn qcow2_layer_status<'a, I: ReadAt>(
    reader: &Reader<'a, I>,
    pos: u64,
    len: u64,
) -> Result<LayerStatus<'a>> {
    let image = reader.image();
    let segment = Planner::new(reader).segment(pos, pos.saturating_add(len))?;
    let kind = segment.kind;
    let compressed = matches!(kind, ExtentKind::Compressed { .. });
    let mut status = LayerStatus {
        len: segment.length,
        data: kind.is_data(),
        zero: matches!(kind, ExtentKind::Zero { .. }),
        compressed,
        // QEMU gives no offset for encrypted data: the file holds ciphertext there.
        offset: kind.host_offset().filter(|_| image.crypt.is_none()),
        ..LayerStatus::default()
    };
    if status.offset.is_some() {
        status.file = image.data_path();
    }
    status.present = status.data || status.zero;
    if !status.present {
        status.zero = unallocated_reads_zero(image, pos)?;
    }
    if let (true, false, Some(offset)) = (status.data, status.compressed, status.offset) {
        if let Some((zero, len)) = preallocated_holes(image, offset, status.len) {
            status.zero |= zero;
            status.len = len;
        }
    }
    Ok(status)
}

/// Whether an unallocated stretch of `image` at `pos` reads as zeros: when nothing lies below
/// (no backing file, or zeros attached in its place), or when the layer below ends before
/// `pos`. A backing file named but not attached is [`Error::BackingMissing`].
pub(crate) fn unallocated_reads_zero<I: ReadAt>(image: &Qcow2<I>, pos: u64) -> Result<bool> {
    match image.backing_source() {
        Some(below) => Ok(pos >= below.guest_size()),
        None if image.has_backing_attached() => Ok(true), // explicit zeros
        None => match image.header().backing_file() {
            Some(name) => Err(Error::BackingMissing {
                name: name.to_owned(),
            }),
            None => Ok(true),
        },
    }
}

/// QEMU's `BDRV_BLOCK_RECURSE`: plain data at `host` for `len` bytes of an image that looks
/// preallocated (`preallocation=metadata`) reads as zeros where its file has holes. Whether
/// the stretch from `host` reads as zeros, and how far (at least 1 byte); `None` when QEMU does
/// not look (the holes are unknown, or the image does not look preallocated).
pub(crate) fn preallocated_holes<I: ReadAt>(
    image: &Qcow2<I>,
    host: u64,
    len: u64,
) -> Option<(bool, u64)> {
    let holes = image.data_holes()?;
    if !image.metadata_preallocated() {
        return None;
    }
    let mut status = LayerStatus {
        len,
        present: true,
        data: true,
        offset: Some(host),
        ..LayerStatus::default()
    };
    clip_to_file_holes(&mut status, holes, host);
    Some((status.zero, status.len.max(1)))
}

/// QEMU's `BDRV_BLOCK_RECURSE`: data clusters of a preallocated image may be holes in the
/// file, which read as zeros; so does anything past the end of the file.
pub(crate) fn clip_to_file_holes(status: &mut LayerStatus<'_>, holes: &dyn HoleQuery, offset: u64) {
    let Some(file_len) = holes.file_len() else {
        return; // QEMU ignores a failed query
    };
    let total = file_len
        .checked_next_multiple_of(SECTOR)
        .unwrap_or(file_len);
    let file = file_status(Some(holes), total, offset, status.len);
    if file.eof && (file.len == 0 || file.zero) {
        status.zero = true;
    } else {
        status.len = file.len;
        status.zero |= file.zero;
    }
}

/// What a raw file of `size` bytes says about `len` bytes at `pos`: data or a hole, with
/// the offset in the file (the same as the guest offset).
pub(crate) fn raw_layer_status<'a>(
    holes: Option<&dyn HoleQuery>,
    size: u64,
    path: Option<&'a Path>,
    pos: u64,
    len: u64,
) -> LayerStatus<'a> {
    let file = file_status(holes, size, pos, len);
    LayerStatus {
        len: file.len,
        present: true,
        zero: file.zero,
        data: !file.zero,
        compressed: false,
        offset: Some(pos),
        file: path,
    }
}

/// A file's own answer (QEMU's `file-posix` block status) for `len` bytes at `pos` of a file
/// QEMU counts as `total` bytes.
#[derive(Debug, Clone, Copy)]
struct FileStatus {
    len: u64,
    zero: bool,
    /// The answer reaches the end of the file.
    eof: bool,
}

fn file_status(holes: Option<&dyn HoleQuery>, total: u64, pos: u64, len: u64) -> FileStatus {
    if pos >= total {
        return FileStatus {
            len: 0,
            zero: false,
            eof: true,
        };
    }
    let len = len.min(total.saturating_sub(pos));
    let (zero, len) = match holes.and_then(|h| h.region_at(pos)) {
        // Trailing hole: zeros up to the end.
        Some(Region::Hole { next_data: None }) => (true, len),
        Some(Region::Hole {
            next_data: Some(data),
        }) if data > pos => (true, len.min(data.saturating_sub(pos))),
        Some(Region::Data { end }) if end > pos => (false, len.min(end.saturating_sub(pos))),
        // Unknown: all data, as QEMU pretends when lseek fails.
        _ => (false, len),
    };
    FileStatus {
        len,
        zero,
        eof: pos.saturating_add(len) == total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file whose holes are given as (start, end) data ranges.
    struct Fake {
        data: Vec<(u64, u64)>,
        len: u64,
    }

    impl HoleQuery for Fake {
        fn region_at(&self, pos: u64) -> Option<Region> {
            if let Some(&(_, end)) = self.data.iter().find(|(s, e)| *s <= pos && pos < *e) {
                return Some(Region::Data { end });
            }
            let next_data = self.data.iter().map(|d| d.0).filter(|&s| s > pos).min();
            Some(Region::Hole { next_data })
        }
        fn file_len(&self) -> Option<u64> {
            Some(self.len)
        }
    }

    #[test]
    fn file_status_follows_data_and_holes() {
        let f = Fake {
            data: vec![(4096, 8192)],
            len: 10000,
        };
        let s = file_status(Some(&f), 10240, 0, 1 << 20);
        assert!(s.zero && s.len == 4096 && !s.eof);
        let s = file_status(Some(&f), 10240, 4096, 1 << 20);
        assert!(!s.zero && s.len == 4096);
        let s = file_status(Some(&f), 10240, 8192, 1 << 20);
        assert!(s.zero && s.len == 2048 && s.eof);
        let s = file_status(Some(&f), 10240, 10240, 1 << 20);
        assert!(s.eof && s.len == 0);
        let s = file_status(None, 10240, 0, 100);
        assert!(!s.zero && s.len == 100);
    }

    #[test]
    fn preallocated_data_in_a_hole_reads_as_zeros() {
        let f = Fake {
            data: vec![(0, 65536)],
            len: 3 * 65536,
        };
        let data = |len| LayerStatus {
            len,
            present: true,
            data: true,
            offset: Some(0),
            ..LayerStatus::default()
        };
        // Data up to a hole: cut at the hole.
        let mut s = data(2 * 65536);
        clip_to_file_holes(&mut s, &f, 0);
        assert!(!s.zero && s.len == 65536);
        // A hole reaching the end of the file: zeros for the whole run.
        let mut s = data(4 * 65536);
        clip_to_file_holes(&mut s, &f, 65536);
        assert!(s.zero && s.len == 4 * 65536);
        // Past the end of the file: zeros.
        let mut s = data(65536);
        clip_to_file_holes(&mut s, &f, 8 * 65536);
        assert!(s.zero && s.len == 65536);
    }
}
