//! The copy engine: pieces of a guest disk, planned on the calling thread, read on a worker
//! pool and handed to a consumer on the calling thread, in guest order. Stretches planned as
//! zeros are handed on without being read.
//!
//! Two planners feed it: the allocation map of the chain for [`Reader::read_parallel`]
//! (`guest/parallel.rs`), and [`GuestDisk::allocation_at`] for the conversions
//! (`jobs/convert.rs`), whose pieces are qemu-img's so that its sparse detection sees the
//! same buffers. Pool jobs read the planned chunks, lowest first, into a fixed set of
//! buffers, while the calling thread hands finished chunks to the consumer in order, then
//! plans more as buffers come back. The calling thread reads the next chunk itself when no
//! job has taken it (no pool, or a pool busy with other work), so a copy always progresses,
//! whatever else the pool is doing.
//!
//! [`Reader::read_parallel`]: crate::Reader::read_parallel
//! [`GuestDisk::allocation_at`]: crate::GuestDisk::allocation_at

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use crate::base::pool::{Pool, Scope};
use crate::error::{Error, Result};

/// A planned stretch of the guest.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Piece {
    /// Reads as zeros: handed on, not read.
    Zeros { start: u64, len: u64 },
    /// Read (`len` at most the buffer length).
    Data { start: u64, len: u64 },
}

/// Plans the pieces of a copy, in guest order and without gaps.
pub(crate) trait PiecePlan {
    /// The next piece, `None` at the end.
    fn next_piece(&mut self) -> Result<Option<Piece>>;
    /// Where planning stands: where a failure of [`PiecePlan::next_piece`] is reported.
    fn planned_to(&self) -> u64;
}

/// Reads the planned data, on the pool's threads and on the calling thread.
pub(crate) trait PieceReader: Sync {
    /// A reader for one thread's reads (a job's, or one chunk the calling thread reads), so
    /// that chunks read by different threads do not look sequential to one reader.
    fn for_one_thread(&self) -> Self
    where
        Self: Sized;
    /// Read `buf.len()` guest bytes at `start`.
    fn read_piece(&self, start: u64, buf: &mut [u8]) -> Result<()>;
}

/// A copy: what it reads, how it is planned, and on what.
pub(crate) struct CopyJob<'r, S, P> {
    /// The pool the chunks are read on.
    pub pool: &'r Pool,
    /// Reads the data.
    pub source: &'r S,
    /// Plans the pieces.
    pub plan: P,
    /// Most pool jobs at once.
    pub threads: usize,
    /// The length of a chunk buffer: no data piece is longer.
    pub buffer_len: usize,
    /// Buffers per job (one when the pool has no threads): one being read, the others
    /// finished or in the consumer.
    pub buffers_per_thread: usize,
    /// The error returned for a read (or planning) that failed at a guest offset.
    pub read_failed: fn(u64, Error) -> Error,
}

impl<S: PieceReader, P: PiecePlan> CopyJob<'_, S, P> {
    /// Hand every planned piece to `consumer`, in guest order, reading data on the pool.
    ///
    /// The first error in guest order is returned once everything before it has gone to
    /// the consumer: a read or planning failure (through `read_failed`), or the consumer's
    /// own. Either stops the copy: no more chunks are started, and the jobs finish the
    /// chunk they are reading. A panic in the consumer, or in a pool job, stops the copy too
    /// and is raised again here.
    pub(crate) fn run(self, consumer: &mut dyn FnMut(Chunk<'_>) -> Result<()>) -> Result<()> {
        let shared = Shared::default();
        let CopyJob {
            pool,
            source,
            plan,
            threads,
            buffer_len,
            buffers_per_thread,
            read_failed,
        } = self;
        pool.scope(|scope| {
            let _stop = StopOnExit(&shared);
            let buffers = if scope.has_workers() {
                threads.saturating_mul(buffers_per_thread).max(1)
            } else {
                1
            };
            shared.lock().batch = (buffers / 2).max(1);
            let mut engine = Engine {
                source,
                shared: &shared,
                scope,
                plan,
                plan_over: false,
                read_failed,
                threads,
                buffers,
                buffer_len,
                allocated: 0,
                free: Vec::new(),
            };
            engine.run(consumer)
        })
    }
}

/// What [`Reader::read_parallel`](crate::Reader::read_parallel) hands its sink: the next
/// stretch of the guest, in order.
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
fn read_chunk<S: PieceReader>(
    source: &S,
    start: u64,
    mut buf: Vec<u8>,
    len: usize,
) -> Result<Vec<u8>> {
    let part = buf
        .get_mut(..len)
        .ok_or(Error::Internal("a chunk is larger than its buffer"))?;
    source.read_piece(start, part)?;
    Ok(buf)
}

/// A pool job: read queued chunks, lowest first, until none is left; never waits.
fn job<S: PieceReader>(source: &S, shared: &Shared) {
    let mut guard = JobGuard {
        shared,
        ended: false,
    };
    // A reader of its own, kept for every chunk the job reads: making one per chunk cost 2%
    // of a parallel read's time.
    let own = source.for_one_thread();
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

/// The calling thread's side of a copy.
struct Engine<'p, 'r, 'scope, S, P> {
    source: &'r S,
    shared: &'r Shared,
    scope: &'p Scope<'p, 'scope>,
    plan: P,
    /// The plan ended, or failed: nothing more to plan.
    plan_over: bool,
    read_failed: fn(u64, Error) -> Error,
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

impl<'r, 'scope, S: PieceReader + 'scope, P: PiecePlan> Engine<'_, 'r, 'scope, S, P>
where
    'r: 'scope,
{
    fn run(&mut self, consumer: &mut dyn FnMut(Chunk<'_>) -> Result<()>) -> Result<()> {
        loop {
            self.plan();
            match self.next()? {
                Next::Zeros(offset, len) => consumer(Chunk::Zeros { offset, len })?,
                Next::Data(offset, buf, len, writer) => {
                    let bytes = buf
                        .get(..len)
                        .ok_or(Error::Internal("a chunk is larger than its buffer"))?;
                    consumer(Chunk::Data { offset, bytes })?;
                    self.free.push((buf, writer));
                }
                Next::Read(seq, start, buf, len) => {
                    // A fresh reader: two chunks in a row must not look sequential to it,
                    // or it would read ahead compressed clusters the jobs are about to read.
                    let result = read_chunk(&self.source.for_one_thread(), start, buf, len);
                    self.shared.finish(seq, result);
                }
                Next::Failed(offset, error) => return Err((self.read_failed)(offset, error)),
                Next::Wait => {}
                Next::Finished => return Ok(()),
            }
        }
    }

    /// Take the front item if it is ready, claim it if no one reads it, or wait.
    fn next(&mut self) -> Result<Next> {
        let mut state = self.shared.lock();
        let next = match state.items.front_mut() {
            None if self.plan_over => Next::Finished,
            None => return Err(Error::Internal("nothing planned, yet the plan goes on")),
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
            let item = match self.plan_next() {
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
                    start: self.plan.planned_to(),
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
                    let (source, shared) = (self.source, self.shared);
                    self.scope.spawn(move || job(source, shared));
                }
            }
        }
    }

    /// The plan's next piece; `None` once it has ended or failed.
    fn plan_next(&mut self) -> Result<Option<Piece>> {
        if self.plan_over {
            return Ok(None);
        }
        let next = self.plan.next_piece();
        self.plan_over = !matches!(next, Ok(Some(_)));
        next
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

    /// Pieces of 3 bytes, every third zeros, over bytes that are their own offsets.
    struct Thirds {
        pos: u64,
        end: u64,
    }

    impl PiecePlan for Thirds {
        fn next_piece(&mut self) -> Result<Option<Piece>> {
            let start = self.pos;
            if start >= self.end {
                return Ok(None);
            }
            self.pos = (start + 3).min(self.end);
            let len = self.pos - start;
            Ok(Some(if start % 9 == 6 {
                Piece::Zeros { start, len }
            } else {
                Piece::Data { start, len }
            }))
        }

        fn planned_to(&self) -> u64 {
            self.pos
        }
    }

    /// Bytes that are their own offsets; reading at `fail_at` fails.
    struct Offsets {
        fail_at: u64,
    }

    impl PieceReader for Offsets {
        fn for_one_thread(&self) -> Self {
            Offsets {
                fail_at: self.fail_at,
            }
        }

        fn read_piece(&self, start: u64, buf: &mut [u8]) -> Result<()> {
            if start == self.fail_at {
                return Err(Error::Internal("test read"));
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (start + i as u64) as u8;
            }
            Ok(())
        }
    }

    fn copy(threads: usize, fail_at: u64) -> (Result<()>, Vec<u8>) {
        let pool = Pool::new(threads);
        let source = Offsets { fail_at };
        let job = CopyJob {
            pool: &pool,
            source: &source,
            plan: Thirds { pos: 0, end: 200 },
            threads,
            buffer_len: 3,
            buffers_per_thread: 2,
            read_failed: |offset, _| Error::ReadFailed {
                guest_offset: offset,
                source: Box::new(Error::Internal("test")),
            },
        };
        let mut out = Vec::new();
        let result = job.run(&mut |chunk| {
            assert_eq!(chunk.offset(), out.len() as u64, "in order, no gaps");
            match chunk {
                Chunk::Data { bytes, .. } => out.extend_from_slice(bytes),
                Chunk::Zeros { len, .. } => out.resize(out.len() + len as usize, 0),
            }
            Ok(())
        });
        (result, out)
    }

    #[test]
    fn pieces_reach_the_consumer_in_order_and_a_failure_after_all_before_it() {
        for threads in [1, 2, 4] {
            let (result, out) = copy(threads, u64::MAX);
            result.unwrap();
            let expected: Vec<u8> = (0..200u64)
                .map(|i| if i % 9 >= 6 { 0 } else { i as u8 })
                .collect();
            assert_eq!(out, expected, "{threads} threads");
            let (result, out) = copy(threads, 99);
            match result {
                Err(Error::ReadFailed { guest_offset, .. }) => assert_eq!(guest_offset, 99),
                other => panic!("{threads} threads: {other:?}"),
            }
            assert_eq!(
                out.len(),
                99,
                "{threads} threads: everything before the failure"
            );
        }
    }

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
