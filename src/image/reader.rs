//! [`Reader`]: guest reads through the L1 and L2 tables.

use std::borrow::Cow;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use positioned_io::{ReadAt, Size};

use crate::base::bytes::low_bits;
use crate::base::io::read_up_to;
use crate::base::pool::Pool;
use crate::error::{Error, Result};
use crate::format::compress::{self, ClusterCache};
use crate::format::header::CompressionType;
use crate::format::table::{remaining_in_block, ExtentKind};
use crate::image::plan::{Planner, TableMemory, Tables};
use crate::image::qcow2::{Backing, Qcow2};

/// Reads guest data of one image: the active disk, or an internal snapshot.
///
/// Implements [`positioned_io::ReadAt`] and [`positioned_io::Size`]. Reads may have any
/// length and start anywhere; a read starting at or past the end returns 0 bytes, one that
/// crosses it is short. Clusters contiguous in the file are read with one call to the source.
///
/// Compressed clusters: small sequential reads find the clusters ahead of them already
/// decompressed on the image's pool ([`OpenOptions::threads`](crate::OpenOptions::threads));
/// a read covering 1 MiB or more of whole compressed clusters has them decompressed on the
/// pool straight into its buffer, which is the fastest way through a compressed image short
/// of [`Reader::read_parallel`]. Reads of 1 MiB or more through an overlay read the runs
/// of the layers below on the pool while the calling thread reads the overlay's own.
///
/// Give each thread its own reader: a reader's state (where the last read ended, the L2
/// slices it used last) is its own, and readers do not contend.
///
/// A reader borrows its image. To return one from a function, keep one in a struct or move
/// one to a thread that needs `'static`, use an [`OwnedReader`](crate::OwnedReader)
/// ([`Qcow2::into_reader`]), which reads the same way, as fast, and is also `Read + Seek`.
///
/// ```
/// use positioned_io::ReadAt;
///
/// let image = qcow2::Qcow2::open_path("fixtures/chain-top.qcow2")?;
/// let reader = image.reader()?; // the active disk; Qcow2::snapshot_reader for a snapshot
/// let mut sector = [0u8; 512];
/// reader.read_exact_at(0, &mut sector)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
///
/// `ReadAt` returns [`std::io::Error`]: its kind classifies the failure
/// ([`Error::io_kind`]) and it wraps the typed [`qcow2::Error`](Error), which
/// [`get_ref`](std::io::Error::get_ref) or [`into_inner`](std::io::Error::into_inner) and a
/// downcast give back:
///
/// ```
/// use positioned_io::ReadAt;
///
/// let image = qcow2::Qcow2::open_path("fixtures/luks.qcow2")?; // no secret: data unreadable
/// let err = image.reader()?.read_at(0, &mut [0u8; 512]).unwrap_err();
/// let typed = err.get_ref().and_then(|e| e.downcast_ref::<qcow2::Error>());
/// assert!(matches!(typed, Some(qcow2::Error::Encrypted { .. })));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Reader<'a, I> {
    image: &'a Qcow2<I>,
    l1: Table<'a>,
    /// File offset of that L1 table (the active one's, or a snapshot's), for errors.
    l1_offset: u64,
    size: u64,
    state: State<'a>,
}

/// What a reader remembers between reads: where the last one ended, and the L2 slices it
/// used last. A reader's own, or its image's for the reads an overlay makes through it.
#[derive(Default)]
pub(crate) struct ReadState {
    /// Where the last read of compressed clusters ended: a read starting there is
    /// sequential, and reads ahead.
    last_end: AtomicU64,
    /// What the planner learnt of the tables (the L2 slices used last, empty tables).
    tables: TableMemory,
}

impl ReadState {
    pub(crate) fn new() -> Self {
        ReadState {
            last_end: AtomicU64::new(u64::MAX),
            tables: TableMemory::default(),
        }
    }
}

impl<I> std::fmt::Debug for Reader<'_, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("size", &self.size)
            .field("l1_offset", &self.l1_offset)
            .finish_non_exhaustive()
    }
}

// A reader's own state is the common case: boxing it would allocate for every reader.
#[allow(clippy::large_enum_variant)]
enum State<'a> {
    Own(ReadState),
    Shared(&'a ReadState),
}

/// A reader's L1 table: its own reference, or one borrowed from whatever outlives the reader
/// (the image, an [`OwnedReader`](crate::OwnedReader)), so that making a reader for one read
/// touches no reference count.
type Table<'a> = Cow<'a, Arc<[u64]>>;

/// What a reader reads: its L1 table (the active one or a snapshot's), that table's file
/// offset, and the guest size. An [`OwnedReader`](crate::OwnedReader) keeps it.
pub(crate) struct View {
    pub(crate) l1: Arc<[u64]>,
    pub(crate) l1_offset: u64,
    pub(crate) size: u64,
}

impl<'a, I: ReadAt> Reader<'a, I> {
    pub(crate) fn new(image: &'a Qcow2<I>, l1: Arc<[u64]>, l1_offset: u64, size: u64) -> Self {
        Self::with(
            image,
            Cow::Owned(l1),
            l1_offset,
            size,
            State::Own(ReadState::new()),
        )
    }

    /// A reader of `view` of `image` that keeps its state in `state`, all borrowed: made
    /// for every read through an [`OwnedReader`](crate::OwnedReader), at no cost.
    #[inline]
    pub(crate) fn borrowed(image: &'a Qcow2<I>, view: &'a View, state: &'a ReadState) -> Self {
        Self::with(
            image,
            Cow::Borrowed(&view.l1),
            view.l1_offset,
            view.size,
            State::Shared(state),
        )
    }

    /// What this reader reads, to keep without the borrow of the image.
    pub(crate) fn view(&self) -> View {
        View {
            l1: Arc::clone(&self.l1),
            l1_offset: self.l1_offset,
            size: self.size,
        }
    }

    /// A reader of the active image that keeps its state in `state`, which outlives it: the
    /// reads an overlay makes through its backing image go on where the last one ended.
    /// (Made without a state of its own: a chain makes one for every backing read.)
    pub(crate) fn with_state(image: &'a Qcow2<I>, state: &'a ReadState) -> Self {
        let (l1_offset, size) = (image.header.l1_table_offset(), image.guest_size());
        Self::with(
            image,
            Cow::Borrowed(&image.l1),
            l1_offset,
            size,
            State::Shared(state),
        )
    }

    #[inline]
    fn with(
        image: &'a Qcow2<I>,
        l1: Table<'a>,
        l1_offset: u64,
        size: u64,
        state: State<'a>,
    ) -> Self {
        Reader {
            image,
            l1,
            l1_offset,
            size,
            state,
        }
    }

    fn state(&self) -> &ReadState {
        match &self.state {
            State::Own(state) => state,
            State::Shared(state) => state,
        }
    }

    /// The tables this reader reads through, lent to the planner.
    #[inline]
    pub(crate) fn tables(&self) -> Tables<'_> {
        let image = self.image;
        Tables {
            geometry: image.geometry,
            l1: &self.l1,
            l1_offset: self.l1_offset,
            size: self.size,
            io: &image.io,
            cache: &image.l2_cache,
            image_id: image.id,
            memory: &self.state().tables,
        }
    }

    /// Another reader of the same view (active image or snapshot), with its own read state.
    pub(crate) fn same_view(&self) -> Self {
        let l1 = self.l1.clone(); // a reference count, or the same borrow
        let state = State::Own(ReadState::new());
        Self::with(self.image, l1, self.l1_offset, self.size, state)
    }

    /// Guest size in bytes (a snapshot reader's is the snapshot's disk size).
    pub fn guest_size(&self) -> u64 {
        self.size
    }

    /// The image this reader reads.
    pub fn image(&self) -> &'a Qcow2<I> {
        self.image
    }

    /// Fill all of `buf` from guest offset `pos`, which with `buf` must lie within the guest.
    ///
    /// Guest offsets stay below 2^63 (the size is checked at open), so sums of an offset and
    /// a buffer length cannot overflow.
    pub(crate) fn read_guest(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        if let Some(crypt) = &self.image.crypt {
            crypt.check_unlocked()?;
        }
        if buf.is_empty() {
            return Ok(());
        }
        if let Some(host) = self.tables().point_data(pos, buf.len()) {
            return self.read_run(ExtentKind::Data { host_offset: host }, pos, buf);
        }
        let end = pos.saturating_add(buf.len() as u64);
        let mut planner = Planner::new(self.tables());
        let first = planner.extent(pos, end)?;
        if first.length >= buf.len() as u64 && !matches!(first.kind, ExtentKind::Compressed { .. })
        {
            // One run (most small reads): none of the bookkeeping below.
            return self.read_run(first.kind, pos, buf);
        }
        let mut first = Some(first);
        let mut runs = Runs::new(self.fans_out(buf.len()));
        let mut pending: Option<Pending> = None;
        let mut batch: Vec<CompressedPart> = Vec::new();
        let mut batch_bytes = 0usize;
        let mut guest = pos;
        while guest < end {
            let planned = match first.take() {
                Some(extent) => Ok(extent),
                None => planner.extent(guest, end),
            };
            let extent = match planned {
                Ok(extent) => extent,
                Err(e) => {
                    // As without deferring: the runs finished before this one fail first.
                    self.read_runs(&mut runs, pos, buf)?;
                    return Err(e);
                }
            };
            if extent.length == 0 {
                return Err(Error::Internal("the planner made no progress"));
            }
            let at = usize::try_from(guest.saturating_sub(pos)).unwrap_or(usize::MAX);
            let len = clamp_len(extent.length, buf.len().saturating_sub(at));
            if let ExtentKind::Compressed {
                host_offset: host,
                compressed_len: input_len,
            } = extent.kind
            {
                // Runs only grow by contiguous guest bytes: end the pending one here.
                self.finish(pending.take(), &mut runs, pos, buf)?;
                batch.push(CompressedPart {
                    guest,
                    host,
                    input_len,
                    at,
                    len,
                    direct: false,
                });
                batch_bytes = batch_bytes.saturating_add(len);
                if batch_bytes >= COMPRESSED_BATCH_BYTES {
                    self.read_compressed(&mut batch, buf, false)?;
                    batch_bytes = 0;
                }
            } else {
                pending = match pending.take() {
                    Some(p) if p.continues_with(extent.kind) => Some(Pending {
                        len: p.len.saturating_add(len),
                        ..p
                    }),
                    finished => {
                        self.finish(finished, &mut runs, pos, buf)?;
                        Some(Pending {
                            kind: extent.kind,
                            guest,
                            len,
                        })
                    }
                };
            }
            guest = guest.saturating_add(len as u64);
        }
        if !batch.is_empty() {
            // Only reads of compressed clusters keep track of where they ended: a store to
            // a shared word on every read would serialise threads sharing a reader. A plain
            // load and store (a heuristic): racing threads at worst read ahead once too often
            // or too rarely.
            // Never on a pool thread: its reads are a share of a parallel read or of an
            // overlay's read, whose other shares another thread reads.
            let last_end = &self.state().last_end;
            let sequential = last_end.load(Ordering::Relaxed) == pos
                && crate::base::pool::current_worker() == usize::MAX;
            last_end.store(end, Ordering::Relaxed);
            self.read_compressed(&mut batch, buf, sequential)?;
        }
        self.finish(pending, &mut runs, pos, buf)?;
        self.read_runs(&mut runs, pos, buf)
    }

    /// Whether a read of `len` bytes defers its runs to read those of the layers below on
    /// the pool ([`Reader::read_runs`]): a large read, off the pool (a parallel read's chunk
    /// is one of several at once already), of an image with a backing image or file.
    fn fans_out(&self, len: usize) -> bool {
        len >= FAN_OUT_MIN_BYTES
            && self.image.pool.threads() > 1
            && matches!(self.image.backing, Some(Backing::Source { .. }))
            && crate::base::pool::current_worker() == usize::MAX
    }

    /// Read a finished run now, or defer it to `runs` when this read fans out (reading the
    /// deferred runs once they cover [`FAN_OUT_WINDOW_BYTES`]).
    fn finish(
        &self,
        run: Option<Pending>,
        runs: &mut Runs,
        pos: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let Some(run) = run else {
            return Ok(());
        };
        if !runs.deferring || matches!(run.kind, ExtentKind::Zero { .. }) {
            return self.flush(Some(run), pos, buf);
        }
        runs.bytes = runs.bytes.saturating_add(run.len);
        runs.list.push(run);
        if runs.bytes >= FAN_OUT_WINDOW_BYTES {
            self.read_runs(runs, pos, buf)?;
        }
        Ok(())
    }

    /// Read the deferred `runs` into their parts of `buf`, and empty the list. When they
    /// span several layers, pool threads read the runs from the layers below (through the
    /// backing image, which may be read from any thread) while this thread reads this
    /// image's own runs and then helps with the rest: a read switching layers every cluster
    /// makes a call to the source per cluster, and those calls overlap. An error names the
    /// first failed run in guest order.
    fn read_runs(&self, runs: &mut Runs, pos: u64, buf: &mut [u8]) -> Result<()> {
        runs.bytes = 0;
        let below = runs
            .list
            .iter()
            .filter(|r| matches!(r.kind, ExtentKind::Unallocated { .. }))
            .count();
        let source = match &self.image.backing {
            Some(Backing::Source { source, .. }) if below > 0 && runs.list.len() > 1 => {
                source.as_ref()
            }
            _ => {
                return runs
                    .list
                    .drain(..)
                    .try_for_each(|run| self.flush(Some(run), pos, buf))
            }
        };
        let (own, jobs) = split_runs(runs.list.drain(..), pos, buf)?;
        let failed = FirstFailure::default();
        let helpers = self.image.pool.threads().min(jobs.len());
        let queue = Mutex::new(jobs.into_iter());
        let read_below = || loop {
            let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
            let Some(job) = next else { return };
            for (guest, out) in job {
                if let Err(e) = source.read_guest(guest, out) {
                    failed.record(guest, e);
                }
            }
        };
        let read_below = &read_below;
        self.image.pool.scope(|scope| {
            for _ in 0..helpers {
                if !scope.spawn(read_below) {
                    break;
                }
            }
            for (run, out) in own {
                if let Err(e) = self.read_run(run.kind, run.guest, out) {
                    failed.record(run.guest, e);
                }
            }
            read_below();
        });
        failed.into_result()
    }

    /// Read a finished run into its part of `buf` (which starts at guest offset `pos`).
    fn flush(&self, pending: Option<Pending>, pos: u64, buf: &mut [u8]) -> Result<()> {
        let Some(Pending { kind, guest, len }) = pending else {
            return Ok(());
        };
        let out = part(buf, guest.saturating_sub(pos) as usize, len)?;
        self.read_run(kind, guest, out)
    }

    /// Read what one stretch of a known kind holds into `out` (all of it within one
    /// cluster when compressed): the writer plans its reads over the tables it keeps and
    /// reads through here.
    pub(crate) fn read_extent(&self, kind: ExtentKind, guest: u64, out: &mut [u8]) -> Result<()> {
        if let Some(crypt) = &self.image.crypt {
            crypt.check_unlocked()?;
        }
        match kind {
            ExtentKind::Compressed {
                host_offset,
                compressed_len,
            } => {
                let mut batch = vec![CompressedPart {
                    guest,
                    host: host_offset,
                    input_len: compressed_len,
                    at: 0,
                    len: out.len(),
                    direct: false,
                }];
                self.read_compressed(&mut batch, out, false)
            }
            other => self.read_run(other, guest, out),
        }
    }

    /// Read the run of `kind` at guest offset `guest` into `out`, its length.
    fn read_run(&self, kind: ExtentKind, guest: u64, out: &mut [u8]) -> Result<()> {
        match kind {
            ExtentKind::Zero { .. } => out.fill(0),
            ExtentKind::Data { host_offset: host } => match &self.image.crypt {
                Some(crypt) => self.read_encrypted(crypt, host, guest, out)?,
                None => self.read_data(host, out)?,
            },
            ExtentKind::Unallocated { .. } => self.read_unallocated(guest, out)?,
            ExtentKind::Compressed { .. } => {
                return Err(Error::Internal("a compressed extent among plain runs"))
            }
        }
        Ok(())
    }

    fn read_data(&self, host: u64, out: &mut [u8]) -> Result<()> {
        let src = self.image.data_source();
        let got = match read_up_to(src, host, out) {
            Ok(got) if got == out.len() => return Ok(()),
            Ok(got) => got,
            Err(e) => return Err(read_data_error(host, e)),
        };
        if got < out.len() {
            // The file ends inside this run: a cluster cut short by the end of the file is
            // fine (QEMU reads zeros there), one that starts past it is not.
            let end = host.saturating_add(got as u64);
            let bits = self.image.geometry.cluster_bits;
            let next_cluster = end.saturating_add(low_bits(remaining_in_block(end, bits), bits));
            if next_cluster < host.saturating_add(out.len() as u64) {
                return Err(Error::PastEnd {
                    what: "data cluster",
                    offset: next_cluster,
                    len: 1u64 << bits,
                });
            }
        }
        // A cluster cut short by the end of the file reads as zeros there, as in QEMU.
        out.get_mut(got..).unwrap_or_default().fill(0);
        Ok(())
    }

    /// Read and decrypt data at `host` (for guest offset `guest`). Encryption works on whole
    /// 512-byte sectors: a run that starts or ends inside one is read through a buffer of
    /// whole sectors.
    fn read_encrypted(
        &self,
        crypt: &crate::crypt::Encryption,
        host: u64,
        guest: u64,
        out: &mut [u8],
    ) -> Result<()> {
        use crate::base::SECTOR;
        let head = host % SECTOR;
        let end = host.saturating_add(out.len() as u64);
        let tail = end.next_multiple_of(SECTOR).saturating_sub(end);
        if head == 0 && tail == 0 {
            self.read_data(host, out)?;
            return crypt.decrypt(host, guest, out, &self.image.pool);
        }
        let start = host.saturating_sub(head);
        let mut whole = vec![
            0u8;
            (head as usize)
                .saturating_add(out.len())
                .saturating_add(tail as usize)
        ];
        self.read_data(start, &mut whole)?;
        crypt.decrypt(
            start,
            guest.saturating_sub(head),
            &mut whole,
            &self.image.pool,
        )?;
        let ours = whole
            .get(head as usize..(head as usize).saturating_add(out.len()))
            .ok_or_else(|| Error::malformed("internal error: sector buffer too short", host))?;
        out.copy_from_slice(ours);
        Ok(())
    }

    fn read_unallocated(&self, guest: u64, out: &mut [u8]) -> Result<()> {
        match &self.image.backing {
            Some(Backing::Source { source, .. }) => source.read_guest(guest, out),
            Some(Backing::Zeros) => {
                out.fill(0);
                Ok(())
            }
            None => match self.image.header.backing_file() {
                Some(name) => Err(Error::BackingMissing {
                    name: name.to_owned(),
                }),
                None => {
                    out.fill(0);
                    Ok(())
                }
            },
        }
    }

    /// Read the compressed parts gathered in `batch` into `buf`, and empty the batch. Each
    /// cluster is decompressed once (unless cached), several at a time on the pool when there
    /// is enough work; the file itself is read on this thread only.
    ///
    /// A read covering at least [`DIRECT_MIN_BYTES`] of whole clusters, or any read on a pool
    /// thread (a chunk of a parallel read), decompresses its whole clusters straight into
    /// `buf` and does not read ahead: going through the cache would cost a copy of every byte
    /// (a sixth of the CPU time of reading a zstd image), and the read's own clusters keep
    /// the pool busy.
    fn read_compressed(
        &self,
        batch: &mut Vec<CompressedPart>,
        buf: &mut [u8],
        read_ahead: bool,
    ) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let cache = &self.image.compressed;
        let cluster_bits = self.image.geometry.cluster_bits;
        let cluster_size = self.image.cluster_size() as usize;
        let whole = batch.iter().filter(|p| p.len == cluster_size).count();
        // On a pool thread (a parallel read's chunk) the read is already one of several at
        // once: its whole clusters are decompressed straight into it, whatever its size.
        let on_pool = crate::base::pool::current_worker() != usize::MAX;
        let large = (whole as u64) << cluster_bits >= DIRECT_MIN_BYTES || (on_pool && whole > 0);
        let mut clusters: Vec<Cluster> = Vec::new();
        // Start on the clusters ahead first: the pool works on them while this thread waits
        // for, or decompresses, the ones this read needs.
        if read_ahead && !large && self.image.pool.threads() > 1 {
            if let Some(last) = batch.last() {
                self.add_read_ahead(&mut clusters, last.guest);
            }
        }
        for p in batch.iter_mut() {
            // One cached or under way (read ahead) is copied rather than decompressed again.
            p.direct = large
                && p.len == cluster_size
                && !cache.knows((self.image.id, p.host, p.input_len));
        }
        for p in batch.iter().filter(|p| !p.direct) {
            let key = (self.image.id, p.host, p.input_len);
            if clusters.iter().any(|c| c.is(p.host, p.input_len)) {
                continue;
            }
            let data = cache.get(key);
            let input = match data {
                Some(_) => Vec::new(),
                None => self.compressed_input(p.host, p.input_len)?,
            };
            clusters.push(Cluster {
                host: p.host,
                input_len: p.input_len,
                guest: p.guest ^ low_bits(p.guest, cluster_bits),
                input,
                data,
                ahead: false,
            });
        }
        let kind = self.image.header.compression_type();
        let pool = &self.image.pool;
        let id = self.image.id;
        let direct: Vec<&CompressedPart> = batch.iter().filter(|p| p.direct).collect();
        self.decompress_direct(&direct, buf, || {
            decompress_all(pool, cache, id, kind, cluster_size, &mut clusters)
        })?;
        for c in clusters.iter_mut() {
            cache.recycle_input(std::mem::take(&mut c.input));
        }
        for p in batch.drain(..).filter(|p| !p.direct) {
            let data = clusters
                .iter()
                .find(|c| c.is(p.host, p.input_len))
                .and_then(|c| c.data.as_deref())
                .ok_or(Error::Internal("a compressed cluster was not decompressed"))?;
            let within = low_bits(p.guest, cluster_bits) as usize;
            let src = data
                .get(within..within.saturating_add(p.len))
                .ok_or_else(|| Error::malformed("read crosses a compressed cluster", p.host))?;
            part(buf, p.at, p.len)?.copy_from_slice(src);
        }
        Ok(())
    }

    /// Decompress the whole clusters of `direct` (in guest order) straight into their parts
    /// of `buf`, each on a pool thread as soon as this thread has read its input, and run
    /// `meanwhile` on this thread once every input is read. An error names the first failed
    /// cluster in guest order.
    fn decompress_direct(
        &self,
        direct: &[&CompressedPart],
        buf: &mut [u8],
        meanwhile: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        if direct.is_empty() {
            return meanwhile(); // small reads: no scope to open
        }
        let cache = &self.image.compressed;
        let kind = self.image.header.compression_type();
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        let failed = &failed;
        let record = |guest: u64, host: u64, reason: String| {
            let mut failed = failed.lock().unwrap_or_else(PoisonError::into_inner);
            let earlier = matches!(&*failed,
                Some(Error::BadCompressedCluster { guest_offset, .. }) if *guest_offset < guest);
            if !earlier {
                *failed = Some(bad_cluster(guest, host, reason));
            }
        };
        let record = &record;
        self.image.pool.scope(|scope| {
            let mut rest = buf;
            let mut rest_at = 0usize;
            let mut group: Vec<(&CompressedPart, Vec<u8>, &mut [u8])> = Vec::new();
            let mut group_bytes = 0usize;
            for (i, &p) in direct.iter().enumerate() {
                let input = self.compressed_input(p.host, p.input_len)?;
                let (out, after) = split_part(rest, p.at.saturating_sub(rest_at), p.len)?;
                (rest, rest_at) = (after, p.at.saturating_add(p.len));
                group.push((p, input, out));
                group_bytes = group_bytes.saturating_add(p.len);
                if group_bytes < DIRECT_JOB_BYTES && i.saturating_add(1) < direct.len() {
                    continue;
                }
                let clusters = std::mem::take(&mut group);
                group_bytes = 0;
                let job = move || {
                    for (p, input, out) in clusters {
                        let result = cache.decompress_into(kind, &input, out);
                        cache.recycle_input(input);
                        if let Err(reason) = result {
                            record(p.guest, p.host, reason);
                        }
                    }
                };
                if scope.has_workers() {
                    scope.spawn(job);
                } else {
                    job();
                }
            }
            meanwhile()
        })?;
        let first_failed = failed.lock().unwrap_or_else(PoisonError::into_inner).take();
        first_failed.map_or(Ok(()), Err)
    }

    /// The compressed bytes of the cluster at `host`. The descriptor rounds up to whole
    /// sectors, which may run past the end of the file: that tail stays zero, as QEMU reads it.
    fn compressed_input(&self, host: u64, len: u64) -> Result<Vec<u8>> {
        compress::check_available(self.image.header.compression_type())?;
        // The 13-bit sector count bounds this to two clusters.
        let mut input = self.image.compressed.input_buffer(len as usize);
        let got = read_up_to(&self.image.io, host, &mut input)
            .map_err(|e| Error::io(format!("reading compressed cluster at {host:#x}"), e))?;
        input.get_mut(got..).unwrap_or_default().fill(0);
        Ok(input)
    }

    /// Decompress the compressed clusters that follow `guest` (in its L2 table, up to
    /// [`READ_AHEAD_BYTES`] of them) on the pool, so a sequential reader's next reads find
    /// them decompressed; without pool threads to spare, add them to `clusters`, decompressed
    /// with this read's. Best effort: anything odd ends the read-ahead.
    fn add_read_ahead(&self, clusters: &mut Vec<Cluster>, guest: u64) {
        let geometry = &self.image.geometry;
        let count = (READ_AHEAD_BYTES >> geometry.cluster_bits).max(1);
        let first = (guest >> geometry.cluster_bits).saturating_add(1) << geometry.cluster_bits;
        // Stay in this reader's guest and in this L2 table.
        let table_end = (guest >> geometry.l2_bits()).saturating_add(1) << geometry.l2_bits();
        let end = first
            .saturating_add(count << geometry.cluster_bits)
            .min(table_end);
        let mut planner = Planner::new(self.tables());
        let mut next = first;
        let mut added = 0u64;
        // On the pool, without waiting (the next reads wait for what they need); else
        // decompressed with this read's own clusters.
        // Not from a pool thread (a parallel read's): its chunks are read on the pool already.
        let detached = self.image.pool.can_spawn_detached()
            && crate::base::pool::current_worker() == usize::MAX;
        while next < end {
            let Ok(extent) = planner.extent(next, end) else {
                break;
            };
            if extent.length == 0 {
                break;
            }
            let at = next;
            next = next.saturating_add(extent.length);
            let ExtentKind::Compressed {
                host_offset: host,
                compressed_len: input_len,
            } = extent.kind
            else {
                continue; // mixed images: look past uncompressed clusters
            };
            let key = (self.image.id, host, input_len);
            if clusters.iter().any(|c| c.is(host, input_len)) || self.image.compressed.knows(key) {
                if added == 0 {
                    // The last read-ahead is still ahead of us: let the reader catch up, so
                    // the next one is a batch worth sharing between threads.
                    return;
                }
                continue;
            }
            let Ok(input) = self.compressed_input(host, input_len) else {
                break;
            };
            added = added.saturating_add(1);
            if detached {
                let kind = self.image.header.compression_type();
                let size = self.image.cluster_size() as usize;
                let pool = &self.image.pool;
                self.image
                    .compressed
                    .decompress_ahead(pool, key, kind, input, size);
                continue;
            }
            clusters.push(Cluster {
                host,
                input_len,
                guest: at,
                input,
                data: None,
                ahead: true,
            });
        }
    }
}

/// Guest bytes of compressed parts gathered by one read before they are decompressed
/// together: the compressed input held at once stays below twice this (a descriptor covers
/// at most two clusters), plus one cluster's.
const COMPRESSED_BATCH_BYTES: usize = 2 << 20;

/// Uncompressed bytes of work below which decompressing on other threads does not pay.
const PARALLEL_MIN_BYTES: usize = 256 << 10;

/// Part of a compressed cluster to be copied into `buf[at..at + len]`.
struct CompressedPart {
    guest: u64,
    host: u64,
    input_len: u64,
    at: usize,
    len: usize,
    /// A whole cluster decompressed straight into `buf`, not through the cache.
    direct: bool,
}

/// A compressed cluster of a batch: its input, then its data.
struct Cluster {
    host: u64,
    /// The descriptor's length: with `host`, what identifies the cluster (two descriptors
    /// may share a host offset yet cover different bytes).
    input_len: u64,
    guest: u64,
    input: Vec<u8>,
    data: Option<Arc<[u8]>>,
    /// Read ahead, not asked for: a failure to decompress it is not this read's error.
    ahead: bool,
}

impl Cluster {
    fn is(&self, host: u64, input_len: u64) -> bool {
        self.host == host && self.input_len == input_len
    }
}

/// How much a sequential reader decompresses ahead of itself, in guest bytes (at least one
/// cluster): enough to keep every core busy, well inside the decompressed-cluster cache.
const READ_AHEAD_BYTES: u64 = 1 << 20;

/// Whole compressed clusters a read must cover, in bytes, to decompress them straight into
/// its buffer (and not read ahead): enough to keep every core busy on its own.
const DIRECT_MIN_BYTES: u64 = READ_AHEAD_BYTES;

/// Clusters decompressed straight into a read's buffer are handed to pool threads in groups
/// of about this many bytes: a job per 4 KiB cluster would cost more to hand out than to do.
const DIRECT_JOB_BYTES: usize = 64 << 10;

/// Decompress every cluster that has no data yet, on the image's pool and the calling thread
/// when the work is large enough to pay for sharing it.
fn decompress_all(
    pool: &Pool,
    cache: &ClusterCache,
    image_id: u64,
    kind: CompressionType,
    cluster_size: usize,
    clusters: &mut [Cluster],
) -> Result<()> {
    let decompress = |c: &mut Cluster| -> Result<()> {
        if c.data.is_none() {
            match cache.decompress(
                (image_id, c.host, c.input_len),
                kind,
                &c.input,
                cluster_size,
            ) {
                Ok(data) => c.data = Some(data),
                // A cluster read ahead reports its error when a read asks for it.
                Err(_) if c.ahead => {}
                Err(reason) => return Err(bad_cluster(c.guest, c.host, reason)),
            }
        }
        Ok(())
    };
    // Share out only the clusters still to decompress: cached ones cost nothing.
    let mut todo: Vec<(&mut Cluster, Result<()>)> = clusters
        .iter_mut()
        .filter(|c| c.data.is_none())
        .map(|c| (c, Ok(())))
        .collect();
    if todo.len().saturating_mul(cluster_size) < PARALLEL_MIN_BYTES {
        return todo.into_iter().try_for_each(|(c, _)| decompress(c));
    }
    pool.run_all(&mut todo, |(c, result)| *result = decompress(c));
    todo.into_iter().try_for_each(|(_, result)| result)
}

/// Out of line: built inline, the message's formatting cost a 4 KiB read from the page cache
/// 7% of its time (measured: 70 ns of 1.25 µs).
#[cold]
fn read_data_error(host: u64, e: io::Error) -> Error {
    Error::io(format!("reading data at host offset {host:#x}"), e)
}

/// `buf[skip..skip + len]`, and what follows it.
fn split_part(buf: &mut [u8], skip: usize, len: usize) -> Result<(&mut [u8], &mut [u8])> {
    buf.get_mut(skip..)
        .and_then(|from| from.split_at_mut_checked(len))
        .ok_or(Error::Internal("a part of a read lies past its buffer"))
}

fn bad_cluster(guest_offset: u64, host_offset: u64, reason: String) -> Error {
    Error::BadCompressedCluster {
        guest_offset,
        host_offset,
        reason,
    }
}

/// A run of this image's own, with its part of the read's buffer.
type OwnRun<'b> = (Pending, &'b mut [u8]);

/// Runs of the layers below, read by one pool job: each its guest offset and its part of the
/// read's buffer.
type BelowJob<'b> = Vec<(u64, &'b mut [u8])>;

/// This image's own runs, each with its part of `buf` (which starts at guest offset `pos`),
/// and the runs of the layers below in groups of about [`FAN_OUT_JOB_BYTES`], each run as
/// its guest offset and its part of `buf`. `runs` are in guest order and do not overlap.
fn split_runs(
    runs: impl Iterator<Item = Pending>,
    pos: u64,
    buf: &mut [u8],
) -> Result<(Vec<OwnRun<'_>>, Vec<BelowJob<'_>>)> {
    let mut own = Vec::new();
    let mut jobs: Vec<BelowJob<'_>> = Vec::new();
    let mut job_bytes = 0usize;
    let mut rest = buf;
    let mut rest_at = 0usize;
    for run in runs {
        let at = usize::try_from(run.guest.saturating_sub(pos)).unwrap_or(usize::MAX);
        let (out, after) = split_part(rest, at.saturating_sub(rest_at), run.len)?;
        (rest, rest_at) = (after, at.saturating_add(run.len));
        if !matches!(run.kind, ExtentKind::Unallocated { .. }) {
            own.push((run, out));
            continue;
        }
        match jobs.last_mut() {
            Some(job) if job_bytes < FAN_OUT_JOB_BYTES => job.push((run.guest, out)),
            _ => {
                jobs.push(vec![(run.guest, out)]);
                job_bytes = 0;
            }
        }
        job_bytes = job_bytes.saturating_add(run.len);
    }
    Ok((own, jobs))
}

/// Reads of at least this many bytes defer their runs, to read the runs of the layers below
/// on the pool ([`Reader::read_runs`]): a job costs a few microseconds to hand over, a
/// 64 KiB run from the page cache about ten.
const FAN_OUT_MIN_BYTES: usize = 1 << 20;

/// Guest bytes of runs deferred at most before they are read: bounds the list of runs.
const FAN_OUT_WINDOW_BYTES: usize = 8 << 20;

/// Runs from the layers below are handed to pool threads in groups of about this many bytes.
const FAN_OUT_JOB_BYTES: usize = 128 << 10;

/// The runs a read defers ([`Reader::finish`]), and their bytes.
struct Runs {
    deferring: bool,
    list: Vec<Pending>,
    bytes: usize,
}

impl Runs {
    fn new(deferring: bool) -> Self {
        Runs {
            deferring,
            list: Vec::new(),
            bytes: 0,
        }
    }
}

/// The error of the first failed run in guest order, whichever thread found it.
#[derive(Default)]
struct FirstFailure(Mutex<Option<(u64, Error)>>);

impl FirstFailure {
    fn record(&self, guest: u64, error: Error) {
        let mut first = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if first.as_ref().is_none_or(|(at, _)| guest < *at) {
            *first = Some((guest, error));
        }
    }

    fn into_result(self) -> Result<()> {
        match self.0.into_inner().unwrap_or_else(PoisonError::into_inner) {
            Some((_, error)) => Err(error),
            None => Ok(()),
        }
    }
}

/// A run being grown: how it reads, where it starts in the guest, how long it is.
#[derive(Debug, Clone, Copy)]
struct Pending {
    kind: ExtentKind,
    guest: u64,
    len: usize,
}

impl Pending {
    /// Whether `next` continues this run: data without a gap in the file (extents end at
    /// L2 tables, data need not), zeros or unallocated whatever their host offsets.
    #[inline]
    fn continues_with(&self, next: ExtentKind) -> bool {
        match (self.kind, next) {
            (ExtentKind::Data { host_offset: a }, ExtentKind::Data { host_offset: b }) => {
                a.checked_add(self.len as u64) == Some(b)
            }
            (ExtentKind::Zero { .. }, ExtentKind::Zero { .. })
            | (ExtentKind::Unallocated { .. }, ExtentKind::Unallocated { .. }) => true,
            _ => false,
        }
    }
}

/// `a` clamped to `max`, as a length.
#[inline]
fn clamp_len(a: u64, max: usize) -> usize {
    usize::try_from(a).map_or(max, |a| a.min(max))
}

/// `len` bytes of `buf` from `from`; the caller's bookkeeping keeps them in range.
#[inline]
fn part(buf: &mut [u8], from: usize, len: usize) -> Result<&mut [u8]> {
    // Not `ok_or`: building the unused error, and dropping it, cost 3% of a cached 4 KiB read.
    match buf.get_mut(from..from.saturating_add(len)) {
        Some(part) => Ok(part),
        None => Err(Error::Internal("a read range lies outside the buffer")),
    }
}

impl<I: ReadAt> ReadAt for Reader<'_, I> {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        if pos >= self.size {
            return Ok(0);
        }
        let len = clamp_len(self.size.saturating_sub(pos), buf.len());
        self.read_guest(pos, part(buf, 0, len)?)?;
        Ok(len)
    }
}

impl<I: ReadAt> Size for Reader<'_, I> {
    fn size(&self) -> io::Result<Option<u64>> {
        Ok(Some(self.size))
    }
}

#[cfg(all(test, feature = "zlib"))]
mod tests {
    use crate::format::table::ExtentKind;
    use crate::image::plan::Planner;
    use crate::Qcow2;
    use positioned_io::ReadAt;

    /// (host offset, guest offset) of the compressed clusters among the first 16 of `bytes`.
    fn compressed_clusters(bytes: &[u8]) -> Vec<(u64, u64)> {
        let image = Qcow2::open(bytes.to_vec()).unwrap();
        let reader = image.reader().unwrap();
        let mut planner = Planner::new(reader.tables());
        (0..16u64)
            .map(|i| i << image.geometry.cluster_bits)
            .filter_map(|g| match planner.extent(g, g + 1).unwrap().kind {
                ExtentKind::Compressed { host_offset, .. } => Some((host_offset, g)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn small_sequential_reads_decompress_each_cluster_once() {
        use crate::OpenOptions;
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/zlib-64k-convert.qcow2"
        );
        let file = || std::fs::File::open(path).unwrap();
        let mut sector = [0u8; 512];
        let whole_image_in_sectors = |reader: &crate::Reader<'_, std::fs::File>| {
            let mut sector = [0u8; 512];
            for i in 0..reader.guest_size() / 512 {
                reader.read_exact_at(i * 512, &mut sector).unwrap();
            }
        };
        // Without read-ahead: one decompression per compressed cluster, however many reads.
        let single = OpenOptions::new().threads(1);
        let image = Qcow2::open_with(file(), &single).unwrap();
        whole_image_in_sectors(&image.reader().unwrap());
        let clusters = image.compressed.decompressed();
        assert!(clusters > 4, "{clusters} compressed clusters");
        // Again, through a second reader of the same image: all cached.
        whole_image_in_sectors(&image.reader().unwrap());
        assert_eq!(image.compressed.decompressed(), clusters);

        // With read-ahead (on the pool: wait for it before counting): the second sequential read decompresses the clusters ahead, and
        // still each only once.
        let two = OpenOptions::new().threads(2);
        let image = Qcow2::open_with(file(), &two).unwrap();
        let reader = image.reader().unwrap();
        reader.read_exact_at(0, &mut sector).unwrap();
        assert_eq!(image.compressed.decompressed(), 1);
        reader.read_exact_at(512, &mut sector).unwrap();
        image.compressed.wait_ahead();
        assert!(image.compressed.decompressed() > 1, "read ahead");
        whole_image_in_sectors(&reader);
        image.compressed.wait_ahead();
        assert_eq!(image.compressed.decompressed(), clusters);
    }

    /// Sequential readers on every pool thread at once: their read-ahead goes to the same
    /// pool, so a pool thread must never wait for it (none would be left to run it).
    #[test]
    fn readers_on_every_pool_thread_do_not_wait_for_read_ahead() {
        use crate::OpenOptions;
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/zlib-64k-convert.qcow2"
        );
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let options = OpenOptions::new().threads(2);
            // The reference from an image of its own, so this one's cache starts empty.
            let other = Qcow2::open_path(path).unwrap();
            let size = other.guest_size();
            let mut reference = vec![0u8; size as usize];
            other
                .reader()
                .unwrap()
                .read_exact_at(0, &mut reference)
                .unwrap();
            let image = Qcow2::open_path_with(path, &options).unwrap();
            let image = &image;
            let reference = &reference;
            image.pool.scope(|scope| {
                for _ in 0..2 {
                    scope.spawn(move || {
                        let reader = image.reader().unwrap();
                        let mut piece = vec![0u8; 4096];
                        for at in (0..size).step_by(4096) {
                            reader.read_exact_at(at, &mut piece).unwrap();
                            assert_eq!(piece[..], reference[at as usize..][..4096]);
                        }
                    });
                }
            });
            let _ = done.send(());
        });
        finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("pool threads deadlocked waiting for read-ahead");
    }

    #[test]
    fn a_corrupt_cluster_among_many_names_its_guest_offset() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/zlib-64k-convert.qcow2"
        );
        let mut bytes = std::fs::read(path).unwrap();
        let (host, guest) = compressed_clusters(&bytes)[3];
        bytes[host as usize..host as usize + 64].fill(0xff);
        let image = Qcow2::open(bytes).unwrap();
        let mut all = vec![0u8; image.guest_size() as usize];
        // One read over every cluster: the batch is decompressed on several threads.
        let err = image
            .reader()
            .unwrap()
            .read_exact_at(0, &mut all)
            .unwrap_err();
        let inner = err.get_ref().and_then(|e| e.downcast_ref::<crate::Error>());
        assert!(
            matches!(inner, Some(crate::Error::BadCompressedCluster { guest_offset, host_offset, .. })
                if *guest_offset == guest && *host_offset == host),
            "{err}"
        );
    }

    #[test]
    fn a_corrupt_cluster_read_ahead_fails_only_the_read_that_asks_for_it() {
        use crate::OpenOptions;
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/zlib-64k-convert.qcow2"
        );
        let mut bytes = std::fs::read(path).unwrap();
        let compressed = compressed_clusters(&bytes);
        let (good, bad) = (compressed[1].1, compressed[2]);
        bytes[bad.0 as usize..bad.0 as usize + 64].fill(0xff);
        let options = OpenOptions::new().threads(2);
        let image = Qcow2::open_with(bytes, &options).unwrap();
        let reader = image.reader().unwrap();
        let mut sector = [0u8; 512];
        // Sequential reads in a good cluster read the bad one ahead: no error yet.
        reader.read_exact_at(good, &mut sector).unwrap();
        reader.read_exact_at(good + 512, &mut sector).unwrap();
        let err = reader.read_exact_at(bad.1, &mut sector).unwrap_err();
        let inner = err.get_ref().and_then(|e| e.downcast_ref::<crate::Error>());
        assert!(
            matches!(inner, Some(crate::Error::BadCompressedCluster { guest_offset, .. }) if *guest_offset == bad.1),
            "{err}"
        );
    }
}
