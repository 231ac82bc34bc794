//! [`Reader::read_parallel`]: a guest range read on the image's worker pool and handed to a
//! sink in guest order, stretches that read as zeros reported without being read.
//!
//! The calling thread walks the allocation map of the whole chain ([`Reader::map`]) and
//! plans: a stretch that reads as zeros becomes one [`Chunk::Zeros`]; data is cut into
//! chunks that end at multiples of the chunk size. Pool jobs read the planned chunks, lowest
//! first, into a fixed set of buffers, while the calling thread hands finished chunks to the
//! sink in order, then plans more as buffers come back. The calling thread reads the next
//! chunk itself when no job has taken it (no pool, or a pool busy with other work), so a read
//! always progresses, whatever else the pool is doing.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::ops::RangeBounds;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use positioned_io::ReadAt;

use crate::base::pool::Scope;
use crate::error::{Error, Result};
use crate::guest::disk::GuestDisk;
use crate::guest::map::{clip, MapIter};
use crate::image::reader::Reader;
use crate::jobs::convert::PositionalSink;

/// The chunk size unless [`ParallelReadOptions::chunk_size`] says otherwise, or the cluster size if
/// larger (so that threads do not share a compressed cluster). Measured on 64 KiB clusters:
/// 2 threads with 2 buffers each of 1 MiB spend a quarter more CPU than with 512 KiB ones, which
/// stay in the CPU caches between reads; 256 KiB and less pay more for the handing over.
const DEFAULT_CHUNK_SIZE: u64 = 512 << 10;
/// Bounds of [`ParallelReadOptions::chunk_size`].
const MIN_CHUNK_SIZE: u64 = 4096;
const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// Buffers per reading thread: one being read, the others finished or in the sink. With
/// three, the calling thread can be woken for half of them at once (see
/// [`State::worth_waking`]): on 2 threads, 5% less wall time and a tenth less CPU than two
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
/// Zeros written at once by [`Reader::read_parallel_to_writer`].
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

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

/// What [`Reader::read_parallel`] hands its sink: the next stretch of the guest, in order.
///
/// ```
/// use qcow2::{Chunk, ParallelReadOptions, Qcow2};
///
/// let image = Qcow2::open_path("fixtures/chain-top.qcow2")?;
/// let mut zeros = 0;
/// image.reader()?.read_parallel(.., &ParallelReadOptions::new(), |chunk| {
///     if let Chunk::Zeros { len, .. } = chunk {
///         zeros += len; // never read: a sink may seek past them
///     }
///     Ok(())
/// })?;
/// assert!(zeros < image.guest_size());
/// # Ok::<(), qcow2::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Chunk<'a> {
    /// Guest bytes from `offset` on.
    Data {
        /// Guest offset of the first byte.
        offset: u64,
        /// The bytes (never empty).
        bytes: &'a [u8],
    },
    /// `len` bytes from `offset` on that read as zeros through the whole backing chain
    /// (unallocated everywhere, zero clusters, holes in the files), not read: a sink may skip
    /// them.
    Zeros {
        /// Guest offset of the first byte.
        offset: u64,
        /// Length in bytes (never 0).
        len: u64,
    },
}

impl Chunk<'_> {
    /// Guest offset of the chunk's first byte.
    pub fn offset(&self) -> u64 {
        match *self {
            Chunk::Data { offset, .. } | Chunk::Zeros { offset, .. } => offset,
        }
    }

    /// Guest offset just past the chunk's last byte.
    pub fn end(&self) -> u64 {
        match *self {
            Chunk::Data { offset, bytes } => offset.saturating_add(bytes.len() as u64),
            Chunk::Zeros { offset, len } => offset.saturating_add(len),
        }
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
        let shared = Shared::default();
        let planner = Planner {
            reader: self,
            map: None,
            map_end: start,
            window: MAP_WINDOW,
            window_has_data: false,
            end,
            chunk,
            pos: start,
            data_end: start,
            failed: false,
        };
        // Buffers are never larger than the range.
        let buffer_len = usize::try_from(chunk.min(end.saturating_sub(start)))
            .map_err(|_| Error::Internal("a chunk does not fit in memory"))?;
        pool.scope(|scope| {
            let _stop = StopOnExit(&shared);
            let buffers = if scope.has_workers() {
                threads.saturating_mul(BUFFERS_PER_THREAD)
            } else {
                1
            };
            shared.lock().batch = (buffers / 2).max(1);
            let mut read = Parallel {
                reader: self,
                shared: &shared,
                scope,
                planner,
                threads,
                buffers,
                buffer_len,
                allocated: 0,
                free: Vec::new(),
            };
            read.run(&mut sink)
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

fn write_zeros<W: Write>(out: &mut W, len: u64) -> io::Result<()> {
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len() as u64) as usize;
        out.write_all(ZEROS.get(..n).unwrap_or_default())?;
        left = left.saturating_sub(n as u64);
    }
    Ok(())
}

/// A planned stretch of the guest.
#[derive(Debug, Clone, Copy)]
enum Piece {
    Zeros { start: u64, len: u64 },
    Data { start: u64, len: u64 },
}

/// Cuts the chain's allocation map into pieces: zero stretches merged, data in chunks.
struct Planner<'r, 'a, I> {
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
    /// The map failed: nothing more to plan.
    failed: bool,
}

impl<I: ReadAt> Planner<'_, '_, I> {
    /// The next piece, `None` at the end (or after an error).
    fn next(&mut self) -> Result<Option<Piece>> {
        if self.failed {
            return Ok(None);
        }
        let result = self.next_piece();
        self.failed = result.is_err();
        result
    }

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

/// What the calling thread and the pool jobs share.
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when a chunk is read or a job ends.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Take the lowest chunk no one reads yet, for a pool job; `None` (and the job counted
    /// out) when there is none, or when the read is over.
    fn claim(&self) -> Option<(u64, u64, Vec<u8>, usize)> {
        let mut state = self.lock();
        let claimed = if state.stop {
            None
        } else {
            state.claim(crate::base::pool::current_worker())
        };
        if claimed.is_none() {
            state.jobs = state.jobs.saturating_sub(1);
            // The calling thread may be waiting for this job's last chunks.
            if state.items.front().is_some_and(Item::is_ready) {
                self.changed.notify_all();
            }
        }
        claimed
    }

    /// Record the outcome of reading chunk `seq`.
    fn finish(&self, seq: u64, result: Result<Vec<u8>>) {
        let mut state = self.lock();
        if result.is_err() {
            state.fail_from = state.fail_from.min(seq);
        }
        state.unread = state.unread.saturating_sub(1);
        let failed = result.is_err();
        if let Some(Item::Data { slot, writer, .. }) = state.item_mut(seq) {
            *slot = Slot::Done(result);
            *writer = crate::base::pool::current_worker();
        }
        if failed || state.worth_waking() {
            self.changed.notify_all();
        }
    }
}

/// The planned items not yet handed to the sink, and the state of the read.
struct State {
    /// In guest order; the front is the next for the sink.
    items: VecDeque<Item>,
    /// Sequence number of the front item.
    first: u64,
    /// Data chunks planned and not read yet (queued or being read).
    unread: usize,
    /// Pool jobs started and not ended.
    jobs: usize,
    /// Items from this sequence number on are not read: that one failed.
    fail_from: u64,
    /// The read is over (finished, failed, or unwinding): jobs take no more chunks.
    stop: bool,
    /// A job panicked: the calling thread stops waiting (the scope raises the panic).
    job_panicked: bool,
    /// Ready items at the front worth waking the calling thread for: half the buffers.
    batch: usize,
}

impl Default for State {
    fn default() -> Self {
        State {
            items: VecDeque::new(),
            first: 0,
            unread: 0,
            jobs: 0,
            fail_from: u64::MAX,
            stop: false,
            job_panicked: false,
            batch: 1,
        }
    }
}

impl State {
    /// Whether to wake the calling thread, which waits only for the front item: when
    /// `batch` items at the front are ready for the sink, or the front is and no chunk is
    /// left queued for the jobs (so they would soon run dry). Waking it for every chunk
    /// cost a context switch per chunk.
    fn worth_waking(&self) -> bool {
        let ready = self.items.iter().take_while(|item| item.is_ready()).count();
        ready > 0 && (ready >= self.batch || !self.has_claimable())
    }

    /// Whether a job can still claim a chunk: one queued before any that failed, and the read
    /// not over. (Chunks queued after a failure are never read: counting them, the calling
    /// thread would wait for jobs that had ended.)
    fn has_claimable(&self) -> bool {
        !self.stop && self.claimable().next().is_some()
    }

    /// The queued chunks before any that failed, with their sequence numbers.
    fn claimable(&self) -> impl Iterator<Item = (&Item, u64)> {
        self.items
            .iter()
            .zip(self.first..self.fail_from)
            .filter(|(item, _)| item.is_queued())
    }

    fn item_mut(&mut self, seq: u64) -> Option<&mut Item> {
        let index = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        self.items.get_mut(index)
    }

    /// Mark a queued chunk (before any that failed) as being read, for thread `me`: the
    /// lowest whose buffer `me` wrote last, else the lowest; its sequence number, guest
    /// offset, buffer and length. A buffer that stays with one thread stays in its core's
    /// cache: one written last on another core costs the copy a third more.
    fn claim(&mut self, me: usize) -> Option<(u64, u64, Vec<u8>, usize)> {
        let mine = self
            .claimable()
            .find(|(item, _)| matches!(item, Item::Data { writer, .. } if *writer == me))
            .or_else(|| self.claimable().next())
            .map(|(_, seq)| seq)?;
        let (start, buf, len) = self.item_mut(mine)?.claim()?;
        Some((mine, start, buf, len))
    }
}

/// A planned stretch, waiting for the sink.
enum Item {
    Zeros {
        start: u64,
        len: u64,
    },
    Data {
        start: u64,
        len: usize,
        slot: Slot,
        /// The thread that wrote the buffer last ([`crate::base::pool::current_worker`]).
        writer: usize,
    },
    /// Planning failed here: what the sink gets instead of the rest.
    Failed {
        start: u64,
        error: Error,
    },
}

impl Item {
    /// Ready for the sink: zeros, a chunk read (or failed), or where planning failed.
    fn is_ready(&self) -> bool {
        !matches!(
            self,
            Item::Data {
                slot: Slot::Queued(_) | Slot::Reading,
                ..
            }
        )
    }

    fn is_queued(&self) -> bool {
        matches!(
            self,
            Item::Data {
                slot: Slot::Queued(_),
                ..
            }
        )
    }

    /// Take a queued chunk for reading: its start, buffer and length.
    fn claim(&mut self) -> Option<(u64, Vec<u8>, usize)> {
        let Item::Data {
            start, len, slot, ..
        } = self
        else {
            return None;
        };
        if !matches!(slot, Slot::Queued(_)) {
            return None;
        }
        match std::mem::replace(slot, Slot::Reading) {
            Slot::Queued(buf) => Some((*start, buf, *len)),
            _ => None,
        }
    }
}

/// Where a data chunk is.
enum Slot {
    /// Planned, with its buffer, waiting for a thread.
    Queued(Vec<u8>),
    /// A thread is reading it.
    Reading,
    /// Read (the buffer holds it), or failed.
    Done(Result<Vec<u8>>),
}

/// Read `len` guest bytes at `start` into `buf`.
fn read_chunk<I: ReadAt>(
    reader: &Reader<'_, I>,
    start: u64,
    mut buf: Vec<u8>,
    len: usize,
) -> Result<Vec<u8>> {
    let part = buf
        .get_mut(..len)
        .ok_or(Error::Internal("a chunk is larger than its buffer"))?;
    reader.read_disk(start, part)?;
    Ok(buf)
}

/// A pool job: read queued chunks, lowest first, until none is left; never waits.
fn job<I: ReadAt>(reader: &Reader<'_, I>, shared: &Shared) {
    let mut guard = JobGuard {
        shared,
        ended: false,
    };
    // A reader of its own (not the caller's, whose reads would look sequential to it), kept
    // for every chunk the job reads: making one per chunk cost 2% of a parallel read's time.
    // Reads on pool threads never read ahead (`Reader::read_guest`), so its chunks looking
    // sequential to it is harmless.
    let own = reader.same_view();
    while let Some((seq, start, buf, len)) = shared.claim() {
        let result = read_chunk(&own, start, buf, len);
        shared.finish(seq, result);
    }
    guard.ended = true;
}

/// Tells the calling thread when a job unwinds, so that it does not wait for its chunk.
struct JobGuard<'s> {
    shared: &'s Shared,
    ended: bool,
}

impl Drop for JobGuard<'_> {
    fn drop(&mut self) {
        if !self.ended {
            let mut state = self.shared.lock();
            state.jobs = state.jobs.saturating_sub(1);
            state.job_panicked = true;
            state.stop = true;
            self.shared.changed.notify_all();
        }
    }
}

/// Ends the read for the jobs when the calling thread leaves, by return or unwinding.
struct StopOnExit<'s>(&'s Shared);

impl Drop for StopOnExit<'_> {
    fn drop(&mut self) {
        self.0.lock().stop = true;
        self.0.changed.notify_all();
    }
}

/// The calling thread's side of a parallel read.
struct Parallel<'p, 'r, 'a, 'scope, I> {
    reader: &'r Reader<'a, I>,
    shared: &'r Shared,
    scope: &'p Scope<'p, 'scope>,
    planner: Planner<'r, 'a, I>,
    /// Most jobs at once.
    threads: usize,
    /// Most buffers, and their length.
    buffers: usize,
    buffer_len: usize,
    allocated: usize,
    /// Buffers the sink is done with, each with the thread that wrote it last.
    free: Vec<(Vec<u8>, usize)>,
}

/// What the calling thread does next with the front item.
enum Next {
    Zeros(u64, u64),
    Data(u64, Vec<u8>, usize, usize),
    /// No one reads it yet: the calling thread does (sequence number, start, buffer, length).
    Read(u64, u64, Vec<u8>, usize),
    Failed(u64, Error),
    Wait,
    Finished,
}

impl<'r, 'a, 'scope, I: ReadAt + Sync + 'scope> Parallel<'_, 'r, 'a, 'scope, I>
where
    'r: 'scope,
    'a: 'scope,
{
    fn run(&mut self, sink: &mut dyn FnMut(Chunk<'_>) -> io::Result<()>) -> Result<()> {
        loop {
            self.plan();
            match self.next()? {
                Next::Zeros(offset, len) => {
                    sink(Chunk::Zeros { offset, len }).map_err(|source| Error::SinkFailed {
                        guest_offset: offset,
                        source,
                    })?
                }
                Next::Data(offset, buf, len, writer) => {
                    let bytes = buf
                        .get(..len)
                        .ok_or(Error::Internal("a chunk is larger than its buffer"))?;
                    sink(Chunk::Data { offset, bytes }).map_err(|source| Error::SinkFailed {
                        guest_offset: offset,
                        source,
                    })?;
                    self.free.push((buf, writer));
                }
                Next::Read(seq, start, buf, len) => {
                    // A fresh reader: two chunks in a row must not look sequential to it,
                    // or it would read ahead compressed clusters the jobs are about to read.
                    let result = read_chunk(&self.reader.same_view(), start, buf, len);
                    self.shared.finish(seq, result);
                }
                Next::Failed(offset, error) => {
                    return Err(Error::ReadFailed {
                        guest_offset: offset,
                        source: Box::new(error),
                    })
                }
                Next::Wait => {}
                Next::Finished => return Ok(()),
            }
        }
    }

    /// Take the front item if it is ready, claim it if no one reads it, or wait.
    fn next(&mut self) -> Result<Next> {
        let mut state = self.shared.lock();
        let next = match state.items.front_mut() {
            None if self.planner.failed || self.planner_done() => Next::Finished,
            None => return Err(Error::Internal("nothing planned, yet the map goes on")),
            Some(Item::Data {
                slot: Slot::Reading,
                ..
            }) => {
                if state.job_panicked {
                    return Err(Error::Internal("a thread reading the image panicked"));
                }
                drop(self.shared.changed.wait(state));
                return Ok(Next::Wait);
            }
            Some(
                item @ Item::Data {
                    slot: Slot::Queued(_),
                    ..
                },
            ) => match item.claim() {
                Some((start, buf, len)) => return Ok(Next::Read(state.first, start, buf, len)),
                None => return Err(Error::Internal("a queued chunk could not be claimed")),
            },
            Some(_) => match state.items.pop_front() {
                Some(Item::Zeros { start, len }) => Next::Zeros(start, len),
                Some(Item::Data {
                    start,
                    len,
                    slot: Slot::Done(Ok(buf)),
                    writer,
                }) => Next::Data(start, buf, len, writer),
                Some(Item::Data {
                    start,
                    slot: Slot::Done(Err(error)),
                    ..
                })
                | Some(Item::Failed { start, error }) => Next::Failed(start, error),
                _ => return Err(Error::Internal("the front item changed under the lock")),
            },
        };
        if !matches!(next, Next::Finished) {
            state.first = state.first.saturating_add(1);
        }
        Ok(next)
    }

    fn planner_done(&self) -> bool {
        self.planner.pos >= self.planner.end
    }

    /// Plan while buffers are free, and start jobs for what is planned.
    fn plan(&mut self) {
        loop {
            {
                let state = self.shared.lock();
                let full = state.items.len() >= self.buffers.saturating_mul(4).saturating_add(4);
                if full || state.fail_from != u64::MAX || state.stop {
                    return;
                }
            }
            if self.free.is_empty() && self.allocated >= self.buffers {
                return;
            }
            let item = match self.planner.next() {
                Ok(Some(Piece::Zeros { start, len })) => Item::Zeros { start, len },
                Ok(Some(Piece::Data { start, len })) => {
                    let (buf, writer) = self.buffer();
                    Item::Data {
                        start,
                        len: len as usize, // at most the chunk size, which fits
                        slot: Slot::Queued(buf),
                        writer,
                    }
                }
                Ok(None) => return,
                Err(error) => Item::Failed {
                    start: self.planner.pos,
                    error,
                },
            };
            let is_data = matches!(item, Item::Data { .. });
            let mut state = self.shared.lock();
            state.items.push_back(item);
            if is_data {
                state.unread = state.unread.saturating_add(1);
                if state.jobs < self.threads.min(state.unread) && self.scope.has_workers() {
                    state.jobs = state.jobs.saturating_add(1);
                    drop(state);
                    let (reader, shared) = (self.reader, self.shared);
                    self.scope.spawn(move || job(reader, shared));
                }
            }
        }
    }

    /// A free buffer, or a new one, with the thread that wrote it last.
    fn buffer(&mut self) -> (Vec<u8>, usize) {
        self.free.pop().unwrap_or_else(|| {
            self.allocated = self.allocated.saturating_add(1);
            (
                vec![0u8; self.buffer_len],
                crate::base::pool::current_worker(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(slot: Slot) -> Item {
        Item::Data {
            start: 0,
            len: 0,
            slot,
            writer: 0,
        }
    }

    fn state(batch: usize, items: Vec<Item>) -> State {
        State {
            items: items.into(),
            batch,
            ..State::default()
        }
    }

    fn done() -> Item {
        data(Slot::Done(Ok(Vec::new())))
    }

    fn queued() -> Item {
        data(Slot::Queued(Vec::new()))
    }

    #[test]
    fn the_calling_thread_is_woken_for_a_batch_or_before_the_jobs_run_dry() {
        use Slot::Reading;
        // The front is not ready: nothing for the calling thread, however much is behind it.
        assert!(!state(1, vec![data(Reading), done(), done()]).worth_waking());
        assert!(!state(3, vec![]).worth_waking());
        // Ready at the front, fewer than the batch, and chunks queued for the jobs: later.
        assert!(!state(3, vec![done(), done(), data(Reading), queued()]).worth_waking());
        assert!(!state(3, vec![done(), data(Reading), done(), queued()]).worth_waking());
        // A batch ready at the front (zeros and failures count: the sink takes them too).
        let zeros = Item::Zeros { start: 0, len: 1 };
        assert!(state(3, vec![done(), zeros, done(), queued()]).worth_waking());
        assert!(state(1, vec![done(), data(Reading), queued()]).worth_waking());
        // Fewer than the batch, but nothing queued: the jobs need buffers back.
        assert!(state(3, vec![done(), data(Reading)]).worth_waking());
        let failed = data(Slot::Done(Err(Error::Internal("test"))));
        assert!(state(3, vec![failed, data(Reading)]).worth_waking());
        // Chunks queued after one that failed are never read: they do not count.
        let failed = data(Slot::Done(Err(Error::Internal("test"))));
        let mut after_failure = state(3, vec![done(), failed, queued()]);
        after_failure.fail_from = 1;
        assert!(after_failure.worth_waking());
        // Nor do chunks queued once the read is over.
        let mut stopped = state(3, vec![done(), queued()]);
        stopped.stop = true;
        assert!(stopped.worth_waking());
    }
}
