//! [`Reader`]: guest reads through the L1 and L2 tables.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use positioned_io::{ReadAt, Size};

use crate::bytes::low_bits;
use crate::compress::{self, ClusterCache};
use crate::error::{Error, Result};
use crate::header::{CompressionType, TABLE_ENTRY_LEN};
use crate::image::{Backing, Qcow2};
use crate::io::{be_u64_table, read_metadata, read_up_to};
use crate::table::{self, Mapping};

/// Reads guest data of one image: the active disk, or an internal snapshot.
///
/// Implements [`positioned_io::ReadAt`] and [`positioned_io::Size`]. Reads may have any
/// length and start anywhere; a read starting at or past the end returns 0 bytes, one that
/// crosses it is short. Clusters contiguous in the file are read with one call to the source.
pub struct Reader<'a, I> {
    image: &'a Qcow2<I>,
    l1: Arc<[u64]>,
    /// File offset of that L1 table (the active one's, or a snapshot's), for errors.
    l1_offset: u64,
    size: u64,
    /// Where the last read ended: a read starting there is sequential, and reads ahead
    /// through compressed clusters.
    last_end: AtomicU64,
}

/// A stretch of guest bytes with one way of reading, being grown cluster by cluster.
#[derive(Debug, Clone, Copy)]
enum Run {
    Data { host: u64 },
    Zero,
    Unallocated,
}

impl<'a, I: ReadAt> Reader<'a, I> {
    pub(crate) fn new(image: &'a Qcow2<I>, l1: Arc<[u64]>, l1_offset: u64, size: u64) -> Self {
        Reader {
            image,
            l1,
            l1_offset,
            size,
            last_end: AtomicU64::new(u64::MAX),
        }
    }

    /// Another reader of the same view (active image or snapshot), with its own read state.
    pub(crate) fn same_view(&self) -> Self {
        Reader::new(self.image, Arc::clone(&self.l1), self.l1_offset, self.size)
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
        let geometry = &self.image.geometry;
        let unit_bits = geometry.unit_bits();
        let l2_bits = geometry.l2_bits();
        let end = pos.saturating_add(buf.len() as u64);
        // A heuristic, so a plain load and store (no read-modify-write on the hot path): two
        // threads racing on one reader at worst read ahead once too often or too rarely.
        let sequential = self.last_end.load(Ordering::Relaxed) == pos;
        self.last_end.store(end, Ordering::Relaxed);
        let mut pending: Option<Pending> = None;
        let mut batch: Vec<CompressedPart> = Vec::new();
        let mut done = 0usize;
        while done < buf.len() {
            let guest = pos.saturating_add(done as u64);
            let table = self.l2_table(guest >> l2_bits)?;
            // Walk units to the end of this L2 table's span or of the buffer.
            let span_left = remaining_in_block(guest, l2_bits);
            let stop = done.saturating_add(clamp_len(span_left, buf.len().saturating_sub(done)));
            while done < stop {
                let guest = pos.saturating_add(done as u64);
                // Without an L2 table the whole span is one unallocated run.
                let (mapping, unit) = match &table {
                    None => (Mapping::Unallocated, l2_bits),
                    Some((at, t)) => (self.mapping_in(t, *at, guest)?, unit_bits),
                };
                let len = clamp_len(remaining_in_block(guest, unit), stop.saturating_sub(done));
                let run = match mapping {
                    Mapping::Data { host_offset } => Run::Data {
                        host: host_offset | low_bits(guest, unit_bits),
                    },
                    Mapping::Zero => Run::Zero,
                    Mapping::Unallocated => Run::Unallocated,
                    Mapping::Compressed {
                        host_offset,
                        len: input_len,
                    } => {
                        // Runs only grow by contiguous guest bytes: end the pending one here.
                        self.flush(pending.take(), pos, buf)?;
                        batch.push(CompressedPart {
                            guest,
                            host: host_offset,
                            input_len,
                            at: done,
                            len,
                        });
                        if batch.len() >= COMPRESSED_BATCH {
                            self.read_compressed(&mut batch, buf, false)?;
                        }
                        done = done.saturating_add(len);
                        continue;
                    }
                };
                pending = match pending.take() {
                    Some(p) if p.continues_with(run) => Some(Pending {
                        len: p.len.saturating_add(len),
                        ..p
                    }),
                    finished => {
                        self.flush(finished, pos, buf)?;
                        Some(Pending { run, guest, len })
                    }
                };
                done = done.saturating_add(len);
            }
        }
        self.read_compressed(&mut batch, buf, sequential)?;
        self.flush(pending, pos, buf)
    }

    /// The L2 table covering L1 index `l1_index`, with its file offset; `None` if unallocated.
    pub(crate) fn l2_table(&self, l1_index: u64) -> Result<Option<(u64, Arc<[u64]>)>> {
        let Some(&entry) = usize::try_from(l1_index).ok().and_then(|i| self.l1.get(i)) else {
            return Ok(None); // past the L1 table: unallocated, as QEMU reads it
        };
        let entry_at = self
            .l1_offset
            .saturating_add(l1_index.saturating_mul(TABLE_ENTRY_LEN));
        let Some(offset) = table::l2_table_offset(entry, &self.image.geometry, entry_at)? else {
            return Ok(None);
        };
        let cache = &self.image.l2_cache;
        let key = (self.image.id, offset);
        if let Some(t) = cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(Some((offset, Arc::clone(t))));
        }
        let bytes = read_metadata(
            &self.image.io,
            offset,
            self.image.cluster_size(),
            "L2 table",
        )?;
        let t: Arc<[u64]> = be_u64_table(&bytes);
        cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .put(key, Arc::clone(&t));
        Ok(Some((offset, t)))
    }

    /// Decode the L2 entry for `guest` in `table` (found at file offset `at`).
    pub(crate) fn mapping_in(&self, t: &[u64], at: u64, guest: u64) -> Result<Mapping> {
        self.unit_in(t, at, guest).map(|(mapping, _)| mapping)
    }

    /// Entries in this reader's L1 table: every index from here on is unallocated.
    pub(crate) fn l1_len(&self) -> u64 {
        self.l1.len() as u64
    }

    /// The raw L1 entry at `index`, `None` past the table.
    pub(crate) fn l1_entry(&self, index: u64) -> Option<u64> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.l1.get(i))
            .copied()
    }

    /// [`Reader::mapping_in`], with the host offset of the unit whenever its cluster has one
    /// (see [`table::decode_l2_with_host`]).
    pub(crate) fn unit_in(&self, t: &[u64], at: u64, guest: u64) -> Result<(Mapping, Option<u64>)> {
        let g = &self.image.geometry;
        let index = low_bits(guest >> g.cluster_bits, g.index_bits) as usize;
        let (entry, bitmap, word) = if g.extended_l2 {
            let word = index.saturating_mul(2);
            (t.get(word), t.get(word.saturating_add(1)), word)
        } else {
            (t.get(index), Some(&0), index)
        };
        let (Some(&entry), Some(&bitmap)) = (entry, bitmap) else {
            return Err(Error::malformed("L2 index outside its table", at));
        };
        let sub = (low_bits(guest, g.cluster_bits) >> g.unit_bits()) as u32;
        let entry_at = at.saturating_add((word as u64).saturating_mul(TABLE_ENTRY_LEN));
        let (mapping, unit_host) = table::decode_l2_with_host(entry, bitmap, sub, g, entry_at)?;
        if g.external_data {
            check_data_file_offset(unit_host, guest, g.unit_bits(), entry_at)?;
        }
        Ok((mapping, unit_host))
    }

    /// Read a finished run into its part of `buf` (which starts at guest offset `pos`).
    fn flush(&self, pending: Option<Pending>, pos: u64, buf: &mut [u8]) -> Result<()> {
        let Some(Pending { run, guest, len }) = pending else {
            return Ok(());
        };
        let out = part(buf, guest.saturating_sub(pos) as usize, len)?;
        match run {
            Run::Zero => out.fill(0),
            Run::Data { host } => match &self.image.crypt {
                Some(crypt) => self.read_encrypted(crypt, host, guest, out)?,
                None => self.read_data(host, out)?,
            },
            Run::Unallocated => self.read_unallocated(guest, out)?,
        }
        Ok(())
    }

    fn read_data(&self, host: u64, out: &mut [u8]) -> Result<()> {
        let src = self.image.data_source();
        let got = read_up_to(src, host, out)
            .map_err(|e| Error::io(format!("reading data at host offset {host:#x}"), e))?;
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
        const SECTOR: u64 = crate::crypt::SECTOR_SIZE;
        let head = host % SECTOR;
        let end = host.saturating_add(out.len() as u64);
        let tail = end.next_multiple_of(SECTOR).saturating_sub(end);
        if head == 0 && tail == 0 {
            self.read_data(host, out)?;
            return crypt.decrypt(host, guest, out, self.image.threads);
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
            self.image.threads,
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

    /// Copy the part of a compressed cluster that `out` covers, decompressing it unless it is
    /// the one decompressed last.
    /// Read the compressed parts gathered in `batch` into `buf`, and empty the batch. Each
    /// cluster is decompressed once (unless cached), several at a time on their own threads
    /// when there is enough work; the file itself is read on this thread only.
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
        let mut clusters: Vec<Cluster> = Vec::new();
        for p in batch.iter() {
            if clusters.iter().any(|c| c.is(p.host, p.input_len)) {
                continue;
            }
            let data = cache.get((self.image.id, p.host, p.input_len));
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
        if read_ahead && self.image.threads > 1 {
            if let Some(last) = batch.last() {
                self.add_read_ahead(&mut clusters, last.guest);
            }
        }
        decompress_all(
            self.image.threads,
            cache,
            self.image.id,
            self.image.header.compression_type(),
            self.image.cluster_size() as usize,
            &mut clusters,
        )?;
        for p in batch.drain(..) {
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

    /// The compressed bytes of the cluster at `host`. The descriptor rounds up to whole
    /// sectors, which may run past the end of the file: that tail stays zero, as QEMU reads it.
    fn compressed_input(&self, host: u64, len: u64) -> Result<Vec<u8>> {
        compress::check_available(self.image.header.compression_type())?;
        // The 13-bit sector count bounds this to two clusters.
        let mut input = vec![0u8; len as usize];
        read_up_to(&self.image.io, host, &mut input)
            .map_err(|e| Error::io(format!("reading compressed cluster at {host:#x}"), e))?;
        Ok(input)
    }

    /// Add the compressed clusters that follow `guest` (in its L2 table, up to
    /// [`READ_AHEAD_BYTES`] of them) to `clusters`, so a sequential reader's next reads find
    /// them decompressed, on several threads. Best effort: anything odd ends the read-ahead.
    fn add_read_ahead(&self, clusters: &mut Vec<Cluster>, guest: u64) {
        let geometry = &self.image.geometry;
        let count = (READ_AHEAD_BYTES >> geometry.cluster_bits).max(1);
        let Ok(Some((at, table))) = self.l2_table(guest >> geometry.l2_bits()) else {
            return;
        };
        let first = (guest >> geometry.cluster_bits).saturating_add(1);
        let mut added = 0u64;
        for index in first..first.saturating_add(count) {
            let next = index << geometry.cluster_bits;
            // Stay in this reader's guest and in this L2 table.
            if next >= self.size || next >> geometry.l2_bits() != guest >> geometry.l2_bits() {
                break;
            }
            let (host_offset, len) = match self.mapping_in(&table, at, next) {
                Ok(Mapping::Compressed { host_offset, len }) => (host_offset, len),
                Ok(_) => continue, // mixed images: look past uncompressed clusters
                Err(_) => break,
            };
            if clusters.iter().any(|c| c.is(host_offset, len))
                || self
                    .image
                    .compressed
                    .get((self.image.id, host_offset, len))
                    .is_some()
            {
                if added == 0 {
                    // The last read-ahead is still ahead of us: let the reader catch up, so
                    // the next one is a batch worth sharing between threads.
                    return;
                }
                continue;
            }
            let Ok(input) = self.compressed_input(host_offset, len) else {
                break;
            };
            clusters.push(Cluster {
                host: host_offset,
                input_len: len,
                guest: next,
                input,
                data: None,
                ahead: true,
            });
            added = added.saturating_add(1);
        }
    }
}

/// Compressed parts gathered by one read before they are decompressed together; the bound
/// keeps the compressed input held at once to 64 clusters at most.
const COMPRESSED_BATCH: usize = 32;

/// Uncompressed bytes of work below which decompressing on other threads does not pay.
const PARALLEL_MIN_BYTES: usize = 256 << 10;

/// Part of a compressed cluster to be copied into `buf[at..at + len]`.
struct CompressedPart {
    guest: u64,
    host: u64,
    input_len: u64,
    at: usize,
    len: usize,
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

/// Decompress every cluster that has no data yet, on up to `max_threads` threads when the
/// work is large enough to pay for them.
fn decompress_all(
    max_threads: usize,
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
                Err(reason) => {
                    return Err(Error::BadCompressedCluster {
                        guest_offset: c.guest,
                        host_offset: c.host,
                        reason,
                    })
                }
            }
        }
        Ok(())
    };
    // Share out only the clusters still to decompress: cached ones cost nothing.
    let todo: Vec<&mut Cluster> = clusters.iter_mut().filter(|c| c.data.is_none()).collect();
    let work = todo.len();
    let threads = max_threads.min(work);
    if threads <= 1 || work.saturating_mul(cluster_size) < PARALLEL_MIN_BYTES {
        return todo.into_iter().try_for_each(decompress);
    }
    // Workers take clusters from one queue until it is empty: the load balances itself, and
    // a thread that cannot be started (resource limits) is no error, as the calling thread,
    // a worker too, takes what is left.
    let queue = Mutex::new(todo);
    let work_off_queue = || -> Result<()> {
        let mut result = Ok(());
        loop {
            let next = queue.lock().unwrap_or_else(PoisonError::into_inner).pop();
            match next {
                Some(c) => result = result.and(decompress(c)),
                None => return result,
            }
        }
    };
    std::thread::scope(|scope| {
        let others: Vec<_> = (1..threads)
            .filter_map(|_| {
                std::thread::Builder::new()
                    .spawn_scoped(scope, work_off_queue)
                    .ok()
            })
            .collect();
        let mut result = work_off_queue();
        for handle in others {
            let joined = handle
                .join()
                .unwrap_or(Err(Error::Internal("a decompression thread panicked")));
            result = result.and(joined);
        }
        result
    })
}

/// A run being grown: how it reads, where it starts in the guest, how long it is.
#[derive(Debug, Clone, Copy)]
struct Pending {
    run: Run,
    guest: u64,
    len: usize,
}

impl Pending {
    /// Whether `next` continues this run without a gap in the file.
    fn continues_with(&self, next: Run) -> bool {
        match (self.run, next) {
            (Run::Data { host: a }, Run::Data { host: b }) => {
                a.checked_add(self.len as u64) == Some(b)
            }
            (Run::Zero, Run::Zero) | (Run::Unallocated, Run::Unallocated) => true,
            _ => false,
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

/// Bytes from `offset` to the end of its aligned block of `1 << bits` bytes.
pub(crate) fn remaining_in_block(offset: u64, bits: u32) -> u64 {
    (1u64 << bits).saturating_sub(low_bits(offset, bits))
}

/// `a` clamped to `max`, as a length.
fn clamp_len(a: u64, max: usize) -> usize {
    usize::try_from(a).map_or(max, |a| a.min(max))
}

/// `len` bytes of `buf` from `from`; the caller's bookkeeping keeps them in range.
fn part(buf: &mut [u8], from: usize, len: usize) -> Result<&mut [u8]> {
    buf.get_mut(from..from.saturating_add(len))
        .ok_or(Error::Internal("a read range lies outside the buffer"))
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
    use crate::table::Mapping;
    use crate::Qcow2;
    use positioned_io::ReadAt;

    /// (host offset, guest offset) of the compressed clusters among the first 16 of `bytes`.
    fn compressed_clusters(bytes: &[u8]) -> Vec<(u64, u64)> {
        let image = Qcow2::open(bytes.to_vec()).unwrap();
        let reader = image.reader().unwrap();
        let (at, table) = reader.l2_table(0).unwrap().unwrap();
        (0..16u64)
            .map(|i| i << image.geometry.cluster_bits)
            .filter_map(|g| match reader.mapping_in(&table, at, g).unwrap() {
                Mapping::Compressed { host_offset, .. } => Some((host_offset, g)),
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
        let single = OpenOptions::new().decompression_threads(1);
        let image = Qcow2::open_with(file(), &single).unwrap();
        whole_image_in_sectors(&image.reader().unwrap());
        let clusters = image.compressed.decompressed();
        assert!(clusters > 4, "{clusters} compressed clusters");
        // Again, through a second reader of the same image: all cached.
        whole_image_in_sectors(&image.reader().unwrap());
        assert_eq!(image.compressed.decompressed(), clusters);

        // With read-ahead: the second sequential read decompresses the clusters ahead, and
        // still each only once.
        let two = OpenOptions::new().decompression_threads(2);
        let image = Qcow2::open_with(file(), &two).unwrap();
        let reader = image.reader().unwrap();
        reader.read_exact_at(0, &mut sector).unwrap();
        assert_eq!(image.compressed.decompressed(), 1);
        reader.read_exact_at(512, &mut sector).unwrap();
        assert!(image.compressed.decompressed() > 1, "read ahead");
        whole_image_in_sectors(&reader);
        assert_eq!(image.compressed.decompressed(), clusters);
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
        let options = OpenOptions::new().decompression_threads(2);
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
