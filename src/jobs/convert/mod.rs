//! Convert a guest disk: to raw bytes, like `qemu-img convert -O raw` ([`raw`]), or into a
//! qcow2 image, like `qemu-img convert -O qcow2` ([`qcow2`]). Here: the options, and what
//! both share (the walk of the disk's allocation, qemu-img's sparse detection).
//!
//! The disk's allocation map decides what is read: stretches that read as zeros (zero
//! clusters, unallocated clusters with no backing data) are never read, so a sparse image
//! converts in time proportional to its data. What is read goes in chunks of up to 2 MiB
//! (qemu-img's buffer), on a pool of as many threads as asked, through the copy engine
//! (`guest/copy.rs`) that [`Reader::read_parallel`](crate::Reader::read_parallel) runs on too.
//!
//! A stream ([`convert_to_writer`]) receives every byte in guest order, zeros included. A
//! positional sink ([`convert_to_file`]) gets holes where the guest reads as zeros: zero
//! stretches are skipped, and inside chunks that were read, runs of zeros are found the way
//! `qemu-img convert -S SIZE` finds them (its `is_allocated_sectors_min`).

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::ops::Range;
use std::sync::Mutex;

use crate::base::io::{zero_pieces, PositionalSink};
use crate::base::pool::{Pool, MAX_THREADS};
use crate::base::SECTOR;
use crate::error::{Error, Result};
use crate::format::compressor::Compressor;
use crate::guest::copy::{Chunk, CopyJob, Piece, PiecePlan, PieceReader};
use crate::guest::disk::{Allocation, GuestDisk};
use crate::image::builder::Builder;

/// qemu-img's default `-S`: 4 KiB of zeros make a hole.
pub const DEFAULT_SPARSE_SIZE: u64 = 4096;

/// The largest `-S` qemu-img accepts (`MAX_BUF_SECTORS` sectors, 16 MiB).
pub const MAX_SPARSE_SIZE: u64 = 16 << 20;

/// The most bytes read at once: qemu-img's `IO_BUF_SIZE`, so chunks end where its do.
const CHUNK: u64 = 2 << 20;

/// The longest stretch of zeros handled at once, so that progress moves on through a huge
/// sparse disk written to a stream.
const MAX_ZERO_SEGMENT: u64 = 1 << 30;

/// Chunk buffers per reading thread for a stream: one being read, one being written out by
/// the calling thread.
const STREAM_BUFFERS_PER_THREAD: usize = 2;

/// How [`convert_to_writer`] and [`convert_to_file`] copy a disk.
///
/// ```
/// let options = qcow2::ConvertOptions::new().threads(4).sparse_size(64 * 1024);
/// # let _ = options;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConvertOptions {
    threads: usize,
    sparse_size: u64,
    size: Option<u64>,
    compress: bool,
    compression_level: Option<i32>,
    out_of_order: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            // As many as an image's pool (qemu-img keeps 8 requests in flight).
            threads: crate::image::qcow2::default_threads(),
            sparse_size: DEFAULT_SPARSE_SIZE,
            size: None,
            compress: false,
            compression_level: None,
            out_of_order: false,
        }
    }
}

impl ConvertOptions {
    /// One reading thread per core (at most 8), `-S 4k`, the disk's own size.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Read on this many threads (1 to 64; 1 reads on the calling thread only). The threads
    /// take the chunks lowest first; if they cannot be started, the conversion runs on the
    /// calling thread. These are the conversion's own threads, started for it, not the
    /// image's pool ([`OpenOptions::threads`](crate::OpenOptions::threads)), on which their
    /// reads may still decompress or decrypt.
    #[must_use]
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads.clamp(1, MAX_THREADS);
        self
    }

    /// Like `qemu-img convert -S`: zeros inside data are left as holes in a positional
    /// sink when they make a run of at least this many bytes (rounded down to whole
    /// 512-byte sectors, at most [`MAX_SPARSE_SIZE`]); 0 writes every byte, zeros too, so
    /// the output is fully allocated. Streams receive every byte whatever this says.
    ///
    /// ```
    /// // Every byte written, zeros too: a fully allocated raw file (qemu-img convert -S 0).
    /// let options = qcow2::ConvertOptions::new().sparse_size(0);
    /// # let _ = options;
    /// ```
    #[must_use]
    pub fn sparse_size(mut self, bytes: u64) -> Self {
        let bytes = bytes.min(MAX_SPARSE_SIZE);
        self.sparse_size = bytes.saturating_sub(bytes % SECTOR);
        self
    }

    /// Copy this many bytes instead of the disk's size: zeros past the disk's end, or the
    /// disk cut short. `qemu-img convert -l` pads a snapshot smaller than the image (taken
    /// before a resize) to the image's size.
    #[must_use]
    pub fn size(mut self, bytes: u64) -> Self {
        self.size = Some(bytes);
        self
    }

    /// Like `qemu-img convert -c`, for [`convert_into_qcow2`]: every cluster is compressed
    /// with the target's compression type; a cluster that does not shrink is stored as it
    /// is, and a cluster of zeros is not stored at all. Refused for an encrypted target or
    /// one with an external data file, as qemu-img refuses them.
    ///
    /// ```
    /// let options = qcow2::ConvertOptions::new().compress(true).compression_level(Some(1));
    /// # let _ = options;
    /// ```
    #[must_use]
    pub fn compress(mut self, yes: bool) -> Self {
        self.compress = yes;
        self
    }

    /// The compression level for [`ConvertOptions::compress`]: zlib 0 to 9, zstd 1 to 22
    /// (clamped); `None` is QEMU's (zlib 6, zstd 3).
    ///
    /// ```
    /// let fastest = qcow2::ConvertOptions::new().compress(true).compression_level(Some(1));
    /// # let _ = fastest;
    /// ```
    #[must_use]
    pub fn compression_level(mut self, level: Option<i32>) -> Self {
        self.compression_level = level;
        self
    }

    /// Like `qemu-img convert -W` (out-of-order writes). Accepted for the command's sake,
    /// with no effect on the result: [`convert_into_qcow2`] always reads and compresses
    /// out of order on its threads, and appends to the target in guest order, so that the
    /// image is laid out as a sequential conversion lays it out.
    ///
    /// ```
    /// let options = qcow2::ConvertOptions::new().out_of_order(true);
    /// # let _ = options;
    /// ```
    #[must_use]
    pub fn out_of_order(mut self, yes: bool) -> Self {
        self.out_of_order = yes;
        self
    }
}

mod qcow2;
mod raw;

pub use qcow2::{
    convert_into_qcow2, convert_overlay_into_qcow2, convert_stream_into_qcow2, convert_to_qcow2,
};
pub use raw::{convert_to_file, convert_to_writer};

/// Walks the disk's allocation into pieces: zero stretches whole (up to
/// [`MAX_ZERO_SEGMENT`]), data in qemu-img's chunks.
struct AllocationPlan<'d, D: ?Sized> {
    disk: &'d D,
    pos: u64,
    end: u64,
    /// The stretch looked up last: `[start, end)`, and whether it is read. The pieces cut
    /// from one stretch (a zero stretch longer than [`MAX_ZERO_SEGMENT`], data longer than a
    /// chunk) take the rest of it from here instead of looking the stretch up again from
    /// each piece's start, which cost the rest of the stretch every time.
    known: Option<(u64, u64, bool)>,
}

impl<D: GuestDisk + ?Sized> PiecePlan for AllocationPlan<'_, D> {
    fn next_piece(&mut self) -> Result<Option<Piece>> {
        let start = self.pos;
        if start >= self.end {
            return Ok(None);
        }
        let mut pos = start;
        // Zero stretches of any kind, one after another, make one piece.
        let zeros_end = start.saturating_add(MAX_ZERO_SEGMENT).min(self.end);
        while pos < zeros_end {
            match self.stretch_at(pos)? {
                (true, len) if pos == start => {
                    self.pos = pos.saturating_add(len.min(CHUNK));
                    return Ok(Some(Piece::Data {
                        start,
                        len: self.pos.saturating_sub(start),
                    }));
                }
                (true, _) => break,
                (false, len) => pos = pos.saturating_add(len),
            }
        }
        let pos = pos.min(zeros_end);
        self.pos = pos;
        Ok(Some(Piece::Zeros {
            start,
            len: pos.saturating_sub(start),
        }))
    }

    fn planned_to(&self) -> u64 {
        self.pos
    }
}

impl<D: GuestDisk + ?Sized> AllocationPlan<'_, D> {
    /// Whether the disk must be read from `pos`, and for how long (at least 1 byte, not
    /// past the end of the output).
    fn stretch_at(&mut self, pos: u64) -> Result<(bool, u64)> {
        if let Some((start, end, read)) = self.known {
            if start <= pos && pos < end {
                return Ok((read, end.saturating_sub(pos)));
            }
        }
        let (read, len) = self.look_up(pos)?;
        self.known = Some((pos, pos.saturating_add(len), read));
        Ok((read, len))
    }

    /// [`AllocationPlan::stretch_at`], asking the disk.
    fn look_up(&self, pos: u64) -> Result<(bool, u64)> {
        let left = self.end.saturating_sub(pos);
        let in_disk = self.disk.disk_size().saturating_sub(pos);
        let (read, len) = match allocation_at(self.disk, pos)? {
            Some((allocation, len)) if in_disk > 0 => {
                (!allocation.reads_as_zeros(), len.clamp(1, in_disk))
            }
            // Past the disk's end (a padded snapshot): zeros.
            _ => (false, left),
        };
        Ok((read, len.min(left)))
    }
}

/// What the disk holds at `pos`, and for how long: the one place the planner asks it.
fn allocation_at<D: GuestDisk + ?Sized>(disk: &D, pos: u64) -> Result<Option<(Allocation, u64)>> {
    disk.allocation_at(pos)
}

/// The byte ranges of `buf` (which starts at sector `first_sector` of the disk) that
/// `qemu-img convert -S` writes, with `min_sectors` > 0: everything but runs of zero sectors
/// that its `is_allocated_sectors_min` skips. A partial last sector counts as a sector.
pub(crate) fn ranges_to_write(
    buf: &[u8],
    first_sector: u64,
    min_sectors: u64,
) -> Vec<Range<usize>> {
    let sectors = Sectors {
        buf,
        count: buf.len().div_ceil(SECTOR as usize),
        // The writes are aligned to the largest power of two not above -S (the output's
        // own request alignment, one byte for a file, is smaller).
        alignment: prev_power_of_two(min_sectors.max(1)),
    };
    let min = usize::try_from(min_sectors).unwrap_or(usize::MAX).max(1);
    let mut ranges: Vec<Range<usize>> = Vec::new();
    let mut at = 0usize;
    while at < sectors.count {
        let (allocated, count) = sectors.allocated_min(at, first_sector, min);
        let end = at.saturating_add(count.max(1)).min(sectors.count);
        if allocated {
            let bytes = sectors.byte_range(at, end);
            match ranges.last_mut() {
                Some(last) if last.end == bytes.start => last.end = bytes.end,
                _ => ranges.push(bytes),
            }
        }
        at = end;
    }
    ranges
}

/// A buffer seen as 512-byte sectors.
struct Sectors<'b> {
    buf: &'b [u8],
    count: usize,
    alignment: u64,
}

impl Sectors<'_> {
    fn byte_range(&self, from: usize, to: usize) -> Range<usize> {
        let s = SECTOR as usize;
        from.saturating_mul(s).min(self.buf.len())..to.saturating_mul(s).min(self.buf.len())
    }

    fn is_zero(&self, sector: usize) -> bool {
        let r = self.byte_range(sector, sector.saturating_add(1));
        is_zero(self.buf.get(r).unwrap_or_default())
    }

    /// qemu-img's `is_allocated_sectors`: whether the run from sector `from` is data, and
    /// how many sectors it spans, its end moved to an alignment boundary where it can be.
    fn run(&self, from: usize, first_sector: u64) -> (bool, usize) {
        let n = self.count.saturating_sub(from);
        if n == 0 {
            return (false, 0);
        }
        let mut zero = self.is_zero(from);
        let mut i = 1usize;
        while i < n && self.is_zero(from.saturating_add(i)) == zero {
            i = i.saturating_add(1);
        }
        if i == n {
            return (!zero, i);
        }
        let absolute = first_sector
            .saturating_add(from as u64)
            .saturating_add(i as u64);
        let tail = (absolute & self.alignment.saturating_sub(1)) as usize;
        if tail != 0 {
            if zero && i <= tail {
                // The data after this short run rewrites its sectors anyway.
                zero = false;
            }
            if zero {
                i = i.saturating_sub(tail);
            } else {
                let up = (self.alignment as usize).saturating_sub(tail);
                i = i.saturating_add(up).min(n);
            }
        }
        (!zero, i)
    }

    /// qemu-img's `is_allocated_sectors_min`: like [`Sectors::run`], but a data run takes in
    /// the runs of fewer than `min` zero sectors that follow it, up to its last data.
    fn allocated_min(&self, from: usize, first_sector: u64, min: usize) -> (bool, usize) {
        let n = self.count.saturating_sub(from);
        let min = min.min(n);
        let (allocated, first) = self.run(from, first_sector);
        if !allocated {
            return (false, first);
        }
        let mut used = first;
        let mut checked = first;
        while checked < n {
            let (allocated, count) = self.run(from.saturating_add(checked), first_sector);
            if count == 0 {
                break;
            }
            checked = checked.saturating_add(count);
            if allocated {
                used = checked;
            } else if count >= min {
                break;
            }
        }
        (true, used)
    }
}

/// The largest power of two not above `n` (`n` > 0).
fn prev_power_of_two(n: u64) -> u64 {
    1u64 << (63u32.saturating_sub(n.leading_zeros()))
}

/// Whether `bytes` are all zero, sixteen at a time.
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(16);
    let words_zero =
        chunks.all(|c| <[u8; 16]>::try_from(c).is_ok_and(|w| u128::from_ne_bytes(w) == 0));
    words_zero && chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sectors(pattern: &str) -> Vec<u8> {
        // One character per sector: '0' zeros, anything else data.
        pattern
            .bytes()
            .flat_map(|c| [u8::from(c != b'0'); 512])
            .collect()
    }

    fn written(pattern: &str, first: u64, min: u64) -> String {
        let buf = sectors(pattern);
        let mut out = vec![b'.'; pattern.len()];
        for r in ranges_to_write(&buf, first, min) {
            out[r.start / 512..r.end.div_ceil(512)].fill(b'w');
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn zero_runs_shorter_than_min_inside_data_are_written() {
        // -S 4k: 8 sectors, aligned to 8.
        assert_eq!(written("1111111100000000", 0, 8), "wwwwwwww........");
        assert_eq!(written("1111111100001111", 0, 8), "wwwwwwwwwwwwwwww");
        assert_eq!(written("0000000011111111", 0, 8), "........wwwwwwww");
    }

    #[test]
    fn runs_end_on_alignment_boundaries() {
        // Data in sector 1 only: written up to the 8-sector boundary; a short zero run at
        // the start is written too (the data after it rewrites its block).
        assert_eq!(written("0100000000000000", 0, 8), "wwwwwwww........");
        // Starting mid-block: alignment counts from the disk's sector 0.
        assert_eq!(written("00001000000000", 4, 8), "....wwwwwwww..");
    }

    #[test]
    fn trailing_zeros_are_holes_and_partial_sectors_count() {
        let mut buf = sectors("11111111");
        buf.extend_from_slice(&[0u8; 100]);
        assert_eq!(ranges_to_write(&buf, 0, 8), vec![0..4096]);
        let mut buf = vec![0u8; 4096 + 100];
        buf[4096 + 99] = 1;
        assert_eq!(ranges_to_write(&buf, 0, 8), vec![4096..4196]);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0; 100]));
        let mut b = [0u8; 100];
        b[99] = 1;
        assert!(!is_zero(&b));
        b[99] = 0;
        b[3] = 1;
        assert!(!is_zero(&b));
        assert!(is_zero(&[]));
    }

    #[test]
    fn threads_that_cannot_start_leave_the_work_to_the_calling_thread() {
        let mut data = vec![0u8; 9 << 20];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i % 251) as u8 * u8::from(i % (3 << 20) > 65536);
        }
        let disk = crate::RawDisk::new(data.clone(), data.len() as u64);
        for refused in [true, false] {
            crate::base::pool::refuse_threads_in_tests(refused);
            let mut out = Vec::new();
            let options = ConvertOptions::new().threads(4);
            convert_to_writer(&disk, &mut out, &options, |_, _| {}).unwrap();
            assert!(out == data, "threads refused: {refused}: output differs");
        }
    }

    #[test]
    fn powers_of_two() {
        assert_eq!(prev_power_of_two(1), 1);
        assert_eq!(prev_power_of_two(8), 8);
        assert_eq!(prev_power_of_two(12), 8);
        assert_eq!(prev_power_of_two(32768), 32768);
    }
}
