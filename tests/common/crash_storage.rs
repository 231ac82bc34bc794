//! A storage that remembers every write and barrier, fails on request, and rebuilds the file
//! a power cut could leave behind.
//!
//! * [`CrashStorage`]: an in-memory image file implementing [`qcow2::Storage`]. Every
//!   `write_all_at`, `set_len` and `sync` is appended to an event log (with the bytes written);
//!   the test adds [`Marker`]s between its requests, so a cut point can be related to what the
//!   caller had started and finished. [`CrashStorage::fail_at`] makes the N-th I/O event and
//!   every call after it fail, as a disk that went away; [`CrashStorage::fail_once`] fails the
//!   N-th only (a transient error). A failed event is neither applied nor logged.
//! * [`replay`]: the file as a disk may hold it when the power is lost just before event `cut`:
//!   every event up to the last `sync` before the cut is durable, and of the events between that
//!   sync and the cut, those a [`Subset`] keeps reached the disk, in their order.
//!
//! Clones share one log and one file (the harness keeps a clone to read the log while the
//! image owns the other).

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use positioned_io::ReadAt;

use super::Rng;

/// What the caller of the storage did, between its I/O (recorded by the test, not the image).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// Request `i` of the workload starts.
    Start(usize),
    /// Request `i` of the workload has returned (a flush: everything before it is durable).
    End(usize),
}

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `write_all_at(offset, data)`.
    Write { offset: u64, data: Vec<u8> },
    /// `set_len(len)`.
    SetLen(u64),
    /// `sync()`: the barrier.
    Sync,
    /// A point in the caller's workload (no I/O).
    Mark(Marker),
}

impl Event {
    /// Whether the storage saw this event (not a marker).
    pub fn is_io(&self) -> bool {
        !matches!(self, Event::Mark(_))
    }
}

#[derive(Debug, Default)]
struct State {
    initial: Vec<u8>,
    data: Vec<u8>,
    log: Vec<Event>,
    /// I/O events seen so far (markers not counted).
    io_events: usize,
    /// The I/O event (counted from 0) that fails, and every call after it.
    fail_at: Option<usize>,
    failed: bool,
    /// The one I/O event that fails (a transient error: the calls after it succeed).
    fail_once: Option<usize>,
    failed_once: bool,
    /// Calls that failed by injection.
    failed_calls: usize,
    reads: u64,
}

/// An in-memory file that logs every write and barrier (see the module doc).
#[derive(Debug, Clone, Default)]
pub struct CrashStorage(Arc<Mutex<State>>);

fn dead_disk() -> io::Error {
    io::Error::other("crash storage: the disk is gone (injected failure)")
}

impl CrashStorage {
    /// A storage holding `initial` (the image file before the run).
    pub fn new(initial: Vec<u8>) -> CrashStorage {
        let state = State {
            data: initial.clone(),
            initial,
            ..State::default()
        };
        CrashStorage(Arc::new(Mutex::new(state)))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Fail the I/O event number `n` (0 = the first write, set_len or sync) and every call
    /// after it, reads included.
    pub fn fail_at(&self, n: usize) {
        self.state().fail_at = Some(n);
    }

    /// Fail the I/O event number `n` only: a transient error, the calls after it succeed.
    pub fn fail_once(&self, n: usize) {
        self.state().fail_once = Some(n);
    }

    /// Whether the injected failure has happened (either kind).
    pub fn has_failed(&self) -> bool {
        let state = self.state();
        state.failed || state.failed_once
    }

    /// Append a marker to the log.
    pub fn mark(&self, marker: Marker) {
        self.state().log.push(Event::Mark(marker));
    }

    /// The log so far.
    pub fn log(&self) -> Vec<Event> {
        self.state().log.clone()
    }

    /// The file before the first event.
    pub fn initial(&self) -> Vec<u8> {
        self.state().initial.clone()
    }

    /// The file now (every write applied: what a killed process leaves).
    pub fn contents(&self) -> Vec<u8> {
        self.state().data.clone()
    }

    /// How many writes, set_lens and syncs failed by injection.
    pub fn failed_calls(&self) -> usize {
        self.state().failed_calls
    }

    /// How many I/O events the storage has seen (failed ones included).
    pub fn io_events(&self) -> usize {
        self.state().io_events
    }

    /// How many reads it has served.
    pub fn reads(&self) -> u64 {
        self.state().reads
    }

    /// Count one I/O event; Err if it (or an earlier one) is the injected failure.
    fn admit(state: &mut State) -> io::Result<()> {
        let n = state.io_events;
        state.io_events = n + 1;
        if state.failed || state.fail_at.is_some_and(|at| n >= at) {
            state.failed = true;
            state.failed_calls += 1;
            return Err(dead_disk());
        }
        if state.fail_once == Some(n) {
            state.failed_once = true;
            state.failed_calls += 1;
            return Err(io::Error::other(
                "crash storage: transient I/O error (injected)",
            ));
        }
        Ok(())
    }
}

/// `data` with `bytes` written at `offset`, growing it with zeros as a file grows.
pub fn apply_write(data: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    let start = offset as usize;
    let end = start + bytes.len();
    if data.len() < end {
        data.resize(end, 0);
    }
    data[start..end].copy_from_slice(bytes);
}

/// Apply one event to a file image (markers and syncs change nothing).
pub fn apply(data: &mut Vec<u8>, event: &Event) {
    match event {
        Event::Write {
            offset,
            data: bytes,
        } => apply_write(data, *offset, bytes),
        Event::SetLen(len) => data.resize(*len as usize, 0),
        Event::Sync | Event::Mark(_) => {}
    }
}

impl ReadAt for CrashStorage {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut state = self.state();
        if state.failed {
            return Err(dead_disk());
        }
        state.reads += 1;
        let len = state.data.len() as u64;
        let start = pos.min(len) as usize;
        let n = buf.len().min(state.data.len() - start);
        buf[..n].copy_from_slice(&state.data[start..start + n]);
        Ok(n)
    }
}

impl qcow2::PositionalSink for CrashStorage {
    fn write_all_at(&self, pos: u64, buf: &[u8]) -> io::Result<()> {
        let mut state = self.state();
        Self::admit(&mut state)?;
        apply_write(&mut state.data, pos, buf);
        state.log.push(Event::Write {
            offset: pos,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.state();
        Self::admit(&mut state)?;
        state.data.resize(len as usize, 0);
        state.log.push(Event::SetLen(len));
        Ok(())
    }
}

impl qcow2::Storage for CrashStorage {
    fn length(&self) -> io::Result<u64> {
        let state = self.state();
        if state.failed {
            return Err(dead_disk());
        }
        Ok(state.data.len() as u64)
    }

    fn sync(&self) -> io::Result<()> {
        let mut state = self.state();
        Self::admit(&mut state)?;
        state.log.push(Event::Sync);
        Ok(())
    }
}

/// Which of the events between the last barrier and the cut reached the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subset {
    /// All of them: the process was killed, the kernel wrote everything out.
    All,
    /// None: the power went and the disk kept nothing unsynced.
    None,
    /// All but the `i`-th pending event.
    AllBut(usize),
    /// Only the `i`-th pending event.
    Only(usize),
    /// Each pending event kept with probability 1/2 (seeded).
    Random(u64),
}

/// Where a cut leaves the log: the events before `durable` are on the disk for sure (the
/// last `sync` before the cut is `durable - 1`), and `pending` are the I/O events between
/// that sync and the cut, which may or may not have reached it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub durable: usize,
    pub pending: Vec<usize>,
}

/// The window of a cut just before log index `cut` (`cut == log.len()`: after everything).
pub fn window(log: &[Event], cut: usize) -> Window {
    let durable = log[..cut]
        .iter()
        .rposition(|e| *e == Event::Sync)
        .map_or(0, |i| i + 1);
    let pending = (durable..cut)
        .filter(|&i| log[i].is_io() && log[i] != Event::Sync)
        .collect();
    Window { durable, pending }
}

/// Which pending events (indices into `window.pending`) a subset keeps.
pub fn kept(subset: Subset, pending: usize) -> Vec<bool> {
    match subset {
        Subset::All => vec![true; pending],
        Subset::None => vec![false; pending],
        Subset::AllBut(i) => (0..pending).map(|k| k != i).collect(),
        Subset::Only(i) => (0..pending).map(|k| k == i).collect(),
        Subset::Random(seed) => {
            let mut rng = Rng::new(seed);
            (0..pending).map(|_| rng.below(2) == 1).collect()
        }
    }
}

/// The file a power cut just before log index `cut` may leave: `initial`, every event before
/// the last barrier, and the pending events the subset keeps, in log order.
pub fn replay(initial: &[u8], log: &[Event], cut: usize, subset: Subset) -> Vec<u8> {
    let window = window(log, cut);
    let mut data = initial.to_vec();
    for event in &log[..window.durable] {
        apply(&mut data, event);
    }
    let keep = kept(subset, window.pending.len());
    for (&i, keep) in window.pending.iter().zip(keep) {
        if keep {
            apply(&mut data, &log[i]);
        }
    }
    data
}
