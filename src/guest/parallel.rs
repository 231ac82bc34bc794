//! [`Reader::read_parallel`]: a guest range read on the image's worker pool and handed to a
//! sink in guest order, stretches that read as zeros reported without being read.
//!
//! The calling thread walks the allocation map of the whole chain ([`Reader::map`]) and
//! plans ([`MapPlan`]): a stretch that reads as zeros becomes one [`Chunk::Zeros`]; data is
//! cut into chunks that end at multiples of the chunk size. The copy engine
//! (`guest/copy.rs`) reads them on the image's pool and hands them to the sink in order.

use std::io::{self, Write};
use std::ops::RangeBounds;

use positioned_io::ReadAt;

use crate::base::io::{write_zeros, PositionalSink};
use crate::error::{Error, Result};
use crate::guest::copy::{Chunk, CopyJob, Piece, PiecePlan, PieceReader};
use crate::guest::disk::GuestDisk;
use crate::guest::map::{clip, MapIter};
use crate::image::reader::Reader;

/// The chunk size unless [`ParallelReadOptions::chunk_size`] says otherwise, or the cluster size if
/// larger (so that threads do not share a compressed cluster). Measured on 64 KiB clusters:
/// 2 threads with 2 buffers each of 1 MiB spend a quarter more CPU than with 512 KiB ones, which
/// stay in the CPU caches between reads; 256 KiB and less pay more for the handing over.
const DEFAULT_CHUNK_SIZE: u64 = 512 << 10;
/// Bounds of [`ParallelReadOptions::chunk_size`].
const MIN_CHUNK_SIZE: u64 = 4096;
const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// Buffers per reading thread: one being read, the others finished or in the sink. With
/// three, the calling thread can be woken for half of them at once (see `State::worth_waking`
/// in `guest/copy.rs`): on 2 threads, 5% less wall time and a tenth less CPU than two
/// buffers and a wake per chunk (2.4 thousand context switches per GiB, against one
/// thousand); six or more per thread no longer fit in the CPU caches and were slower.
const BUFFERS_PER_THREAD: usize = 3;
/// The map is walked this much at a time after data, so that the first chunks are read
/// before the map of a huge image is known, and its L2 tables are still cached when the
/// chunks are read; after a window of zeros only, the next is twice as long (up to the
/// maximum), so an empty disk maps in a few steps.
const MAP_WINDOW: u64 = 64 << 20;
const MAX_MAP_WINDOW: u64 = 1 << 50;
/// Most map extents merged into one [`Chunk::Zeros`], so planning steps stay short.
const MAX_MERGED_EXTENTS: u32 = 256;

/// How [`Reader::read_parallel`] reads: on how many threads, in chunks of what size.
///
/// ```
/// let options = qcow2::ParallelReadOptions::new().threads(4).chunk_size(2 << 20);
/// # let _ = options;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParallelReadOptions {
    threads: Option<usize>,
    chunk_size: Option<u64>,
}

impl ParallelReadOptions {
    /// All the image's threads, chunks of 512 KiB (or of a cluster, when larger).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Read on this many of the image's pool threads (at least 1, at most the image's
    /// [`threads`](crate::OpenOptions::threads)); by default all of them.
    #[must_use]
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = Some(threads.max(1));
        self
    }

    /// Read data in chunks of this many bytes (4 KiB to 64 MiB; by default 512 KiB, or the
    /// cluster size when larger): a chunk ends at a multiple of it, or where the data ends.
    /// Memory in use is about `3 × threads × chunk_size`, whatever the size of the image.
    ///
    /// ```
    /// // Two threads, 1 MiB chunks: about 6 MiB of buffers.
    /// let options = qcow2::ParallelReadOptions::new().threads(2).chunk_size(1 << 20);
    /// let image = qcow2::Qcow2::open_path("fixtures/v3-64k-basic.qcow2")?;
    /// let mut out = Vec::new();
    /// image.reader()?.read_parallel_to_writer(.., &options, &mut out)?;
    /// assert_eq!(out.len() as u64, image.guest_size());
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    #[must_use]
    pub fn chunk_size(mut self, bytes: u64) -> Self {
        self.chunk_size = Some(bytes.clamp(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE));
        self
    }
}

impl<I: ReadAt + Sync> Reader<'_, I> {
    /// Read `range` of the guest (clipped to its size) on the image's worker pool, and hand
    /// it to `sink` on the calling thread, strictly in guest order and without gaps: data in
    /// chunks, and stretches that read as zeros through the whole backing chain as
    /// [`Chunk::Zeros`], which are not read. While the sink works, the pool reads the next
    /// chunks.
    ///
    /// ```
    /// use qcow2::{Chunk, ParallelReadOptions, Qcow2};
    ///
    /// let image = Qcow2::open_path("fixtures/chain-top.qcow2")?; // a three-image chain
    /// let (mut data, mut zeros, mut end) = (0, 0, 0);
    /// image.reader()?.read_parallel(.., &ParallelReadOptions::new().threads(2), |chunk| {
    ///     assert_eq!(chunk.offset(), end); // in order, no gaps
    ///     end = chunk.end();
    ///     match chunk {
    ///         Chunk::Data { bytes, .. } => data += bytes.len() as u64,
    ///         Chunk::Zeros { len, .. } => zeros += len,
    ///         _ => {}
    ///     }
    ///     Ok(()) // an error here stops the read and is returned
    /// })?;
    /// assert_eq!(data + zeros, image.guest_size());
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    ///
    /// Works on any reader: the active disk or a snapshot, through the backing chain.
    /// The pool is the image's own (shared by its backing chain, [`OpenOptions::threads`]
    /// threads, started on first use); readers of one image share it, so parallel reads run
    /// side by side on it. The calling thread reads the next chunk itself when no pool thread
    /// has taken it yet (without the `parallel` cargo feature, it reads everything), so a
    /// read never waits for a pool busy elsewhere. Memory is bounded by `3 × threads` chunk
    /// buffers, reused.
    ///
    /// Errors: the first error in guest order is returned once everything before it has
    /// gone to the sink: [`Error::ReadFailed`] with where the chunk that failed starts (or,
    /// when the map fails, where planning stood: like `qemu-img map`, the map drops the
    /// extent it was growing when the next status fails), or
    /// [`Error::SinkFailed`] when the sink returns an error. Either stops the read: no more
    /// chunks are started, and the threads finish the chunk they are reading. A panic in the
    /// sink, or in a pool thread, stops the read too and is raised again here.
    ///
    /// [`OpenOptions::threads`]: crate::OpenOptions::threads
    pub fn read_parallel<F>(
        &self,
        range: impl RangeBounds<u64>,
        options: &ParallelReadOptions,
        mut sink: F,
    ) -> Result<()>
    where
        F: FnMut(Chunk<'_>) -> io::Result<()>,
    {
        let (start, end) = clip(&range, self.guest_size());
        if start >= end {
            return Ok(());
        }
        let pool = &self.image().pool;
        let threads = options
            .threads
            .unwrap_or_else(|| pool.threads())
            .min(pool.threads())
            .max(1);
        let chunk = options
            .chunk_size
            .unwrap_or_else(|| DEFAULT_CHUNK_SIZE.max(self.image().cluster_size()));
        let plan = MapPlan {
            reader: self,
            map: None,
            map_end: start,
            window: MAP_WINDOW,
            window_has_data: false,
            end,
            chunk,
            pos: start,
            data_end: start,
        };
        // Buffers are never larger than the range.
        let buffer_len = usize::try_from(chunk.min(end.saturating_sub(start)))
            .map_err(|_| Error::Internal("a chunk does not fit in memory"))?;
        let copy = CopyJob {
            pool,
            source: self,
            plan,
            threads,
            buffer_len,
            buffers_per_thread: BUFFERS_PER_THREAD,
            read_failed: |guest_offset, error| Error::ReadFailed {
                guest_offset,
                source: Box::new(error),
            },
        };
        copy.run(&mut |chunk| {
            sink(chunk).map_err(|source| Error::SinkFailed {
                guest_offset: chunk.offset(),
                source,
            })
        })
    }

    /// [`Reader::read_parallel`] into a stream: every byte of `range` written to `out` in
    /// order, zeros included (written from a static buffer, never read), then `out` flushed.
    ///
    /// ```
    /// # #[cfg(feature = "zlib")] {
    /// let image = qcow2::Qcow2::open_path("fixtures/zlib-4k-mixed.qcow2")?;
    /// let mut out = Vec::new();
    /// image.reader()?.read_parallel_to_writer(.., &qcow2::ParallelReadOptions::new(), &mut out)?;
    /// assert_eq!(out.len() as u64, image.guest_size());
    /// # }
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn read_parallel_to_writer<W: Write>(
        &self,
        range: impl RangeBounds<u64>,
        options: &ParallelReadOptions,
        mut out: W,
    ) -> Result<()> {
        self.read_parallel(range, options, |chunk| match chunk {
            Chunk::Data { bytes, .. } => out.write_all(bytes),
            Chunk::Zeros { len, .. } => write_zeros(&mut out, len),
        })?;
        out.flush()
            .map_err(|e| Error::io("flushing the output of a parallel read", e))
    }

    /// [`Reader::read_parallel`] into a positional sink such as a [`std::fs::File`], which
    /// must read as zeros where nothing is written (a new or empty file): data is written at
    /// its offset from the start of `range`, stretches of zeros are left as holes, and the
    /// sink's length is then set to the length of the range.
    ///
    /// ```
    /// let image = qcow2::Qcow2::open_path("fixtures/chain-top.qcow2")?;
    /// let path = std::env::temp_dir().join(format!("qcow2-par-{}.raw", std::process::id()));
    /// let file = std::fs::File::create(&path)?;
    /// image.reader()?.read_parallel_to_file(.., &qcow2::ParallelReadOptions::new(), &file)?;
    /// assert_eq!(file.metadata()?.len(), image.guest_size());
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn read_parallel_to_file<W: PositionalSink + ?Sized>(
        &self,
        range: impl RangeBounds<u64>,
        options: &ParallelReadOptions,
        out: &W,
    ) -> Result<()> {
        let (start, end) = clip(&range, self.guest_size());
        self.read_parallel(start..end, options, |chunk| match chunk {
            Chunk::Data { offset, bytes } => out.write_all_at(offset.saturating_sub(start), bytes),
            Chunk::Zeros { .. } => Ok(()),
        })?;
        let len = end.saturating_sub(start);
        out.set_len(len)
            .map_err(|e| Error::io(format!("setting the output length to {len}"), e))
    }
}

/// A parallel read's chunks are read by the jobs' own readers of the same view: the
/// caller's would see its chunks as sequential reads and read ahead.
impl<I: ReadAt + Sync> PieceReader for Reader<'_, I> {
    fn for_one_thread(&self) -> Self {
        // Reads on pool threads never read ahead (`Reader::read_guest`), so a job's chunks
        // looking sequential to its own reader is harmless.
        self.same_view()
    }

    fn read_piece(&self, start: u64, buf: &mut [u8]) -> Result<()> {
        self.read_disk(start, buf)
    }
}

/// Cuts the chain's allocation map into pieces: zero stretches merged, data in chunks.
struct MapPlan<'r, 'a, I> {
    reader: &'r Reader<'a, I>,
    /// The map of `[.., map_end)`, walked one window at a time.
    map: Option<MapIter<'a, I>>,
    map_end: u64,
    /// The length of the current window, and whether it has data.
    window: u64,
    window_has_data: bool,
    end: u64,
    chunk: u64,
    /// Where the next piece starts.
    pos: u64,
    /// Data from `pos` to here is still to be cut into chunks.
    data_end: u64,
}

impl<I: ReadAt> PiecePlan for MapPlan<'_, '_, I> {
    fn next_piece(&mut self) -> Result<Option<Piece>> {
        if self.pos < self.data_end {
            return Ok(Some(self.data_chunk()));
        }
        let zeros_start = self.pos;
        let mut merged = 0u32;
        while let Some((start, len, zero)) = self.next_extent()? {
            if start != self.pos || len == 0 {
                return Err(Error::Internal("the map left a gap"));
            }
            if !zero {
                // Cut into chunks from `pos` on, by this call or, after zeros, the next.
                self.data_end = start.saturating_add(len);
                if self.pos > zeros_start {
                    break;
                }
                return Ok(Some(self.data_chunk()));
            }
            self.pos = start.saturating_add(len);
            merged = merged.saturating_add(1);
            if merged >= MAX_MERGED_EXTENTS {
                break;
            }
        }
        Ok((self.pos > zeros_start).then(|| Piece::Zeros {
            start: zeros_start,
            len: self.pos.saturating_sub(zeros_start),
        }))
    }

    fn planned_to(&self) -> u64 {
        self.pos
    }
}

impl<I: ReadAt> MapPlan<'_, '_, I> {
    /// The next data chunk from `pos`: up to the next multiple of the chunk size.
    fn data_chunk(&mut self) -> Piece {
        let start = self.pos;
        let boundary = (start.checked_div(self.chunk).unwrap_or_default())
            .saturating_add(1)
            .saturating_mul(self.chunk);
        self.pos = boundary.min(self.data_end);
        Piece::Data {
            start,
            len: self.pos.saturating_sub(start),
        }
    }

    /// The map's next extent after those planned, as (start, length, reads as zeros).
    fn next_extent(&mut self) -> Result<Option<(u64, u64, bool)>> {
        loop {
            if let Some(map) = &mut self.map {
                if let Some(extent) = map.next() {
                    let e = extent?;
                    self.window_has_data |= !e.zero;
                    return Ok(Some((e.start, e.length, e.zero)));
                }
            }
            if self.map_end >= self.end {
                if self.pos < self.end && self.pos >= self.data_end {
                    return Err(Error::Internal("the map ended before the range"));
                }
                return Ok(None);
            }
            self.window = if self.window_has_data || self.map.is_none() {
                MAP_WINDOW
            } else {
                self.window.saturating_mul(2).min(MAX_MAP_WINDOW)
            };
            self.window_has_data = false;
            let from = self.map_end;
            self.map_end = from.saturating_add(self.window).min(self.end);
            self.map = Some(self.reader.map(from..self.map_end));
        }
    }
}
