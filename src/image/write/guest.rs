//! The guest's view through a writer: reads, writes, zero writes and discards, cluster by
//! cluster over the tables the writer keeps in memory.
//!
//! A write goes in place into a cluster this image alone owns (`COPIED`); anywhere else it
//! goes into new clusters, filled with what the guest read there before (the backing file,
//! a compressed cluster, a cluster shared with a snapshot, zeros), and the old cluster's
//! reference is dropped once the new mapping is durable. The data of a new cluster is
//! written before anything refers to it (see `writeback.rs`).

// Offsets here are bounded before any sum is made: guest offsets and lengths lie within the
// guest (checked by the writer against a size below 2^63), host offsets come masked to 56
// bits from an entry or from the allocator, and what is added to them is at most a run of
// `MAX_RUN_BYTES`; buffers are sliced at offsets computed from their own lengths.
#![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]

use crate::base::io::Storage;
use crate::error::{Error, Result};
use crate::format::table::{self, ClusterType, ExtentKind, NewEntry, SUB_ALLOC_MASK};
use crate::image::qcow2::{Backing, Qcow2};
use crate::image::reader::{ReadState, Reader};
use crate::image::write::tables::{Entry, Tables};
use crate::image::write::writeback::Metadata;

/// Standard L2 entry bit 0: reads as zeros.
const OFLAG_ZERO: u64 = 1;

/// Writes of at least this many bytes go in pieces of `PARALLEL_WRITE_PIECE` on the
/// image's threads.
const PARALLEL_WRITE_MIN: usize = 512 << 10;
const PARALLEL_WRITE_PIECE: usize = 256 << 10;

/// Most bytes one allocation covers (a long write is cut into pieces of this size).
const MAX_RUN_BYTES: u64 = 4 << 20;

/// What a writer lends the guest paths: the image (its file, geometry, encryption and
/// backing) and a read state for the reads it makes through it.
pub(crate) struct Guest<'a, I> {
    pub(crate) image: &'a Qcow2<I>,
    pub(crate) state: &'a ReadState,
    /// The guest size now (a resize changes it).
    pub(crate) size: u64,
}

/// One step of a write: done (its length), or a run of owned clusters to write in place.
pub(crate) enum Step {
    Done(usize),
    InPlace { host: u64, len: usize },
}

/// A planned piece of a read: what holds `len` guest bytes from `guest`.
pub(crate) struct ReadRun {
    kind: ExtentKind,
    guest: u64,
    len: usize,
}

/// What a cluster about to be written holds now.
#[derive(Debug, Clone, Copy)]
enum Old {
    /// A cluster this image alone owns, written in place.
    Owned { host: u64 },
    /// Anything else: a new cluster is needed; the old one (if any) is released after.
    Elsewhere { release: Release, zeros: bool },
}

/// What the old mapping held that must be released when a new one replaces it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Release {
    Nothing,
    Cluster(u64),
    Compressed(u64, u64),
}

impl<I: Storage> Guest<'_, I> {
    fn cluster_bits(&self) -> u32 {
        self.image.geometry.cluster_bits
    }

    pub(crate) fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits()
    }

    fn reader(&self) -> Reader<'_, I> {
        Reader::with_state(self.image, self.state)
    }

    /// Where data clusters are written: the external data file, or the image file.
    fn data_io(&self) -> &dyn Storage {
        match &self.image.data_storage {
            Some(data) => data.as_ref(),
            None => &self.image.io,
        }
    }

    /// Data clusters live in an external data file, at their guest offsets, without
    /// refcounts (QEMU's `has_data_file`).
    pub(crate) fn external(&self) -> bool {
        self.image.geometry.external_data
    }

    /// The external data file is a raw image of the guest: it must read as the guest does.
    fn raw_data_file(&self) -> bool {
        self.external() && self.image.header.is_data_file_raw()
    }

    fn has_backing(&self) -> bool {
        matches!(self.image.backing, Some(Backing::Source { .. }))
            || self.image.header.backing_file().is_some() && self.image.backing.is_none()
    }

    /// Decode an entry (checking it as the reader does) for its unit `sub` (a subcluster
    /// with extended L2, else 0).
    fn kind(&self, entry: &Entry, sub: u32) -> Result<ExtentKind> {
        let g = &self.image.geometry;
        table::decode_l2(entry.word, entry.bitmap, sub, g, entry.at(g))
    }

    /// The size of a unit with its own mapping (a subcluster or a cluster), and the unit
    /// number of `guest` within its cluster.
    fn unit_of(&self, guest: u64) -> (u64, u32) {
        let g = &self.image.geometry;
        let unit = 1u64 << g.unit_bits();
        let sub = match g.extended_l2 {
            true => ((guest & (self.cluster_size() - 1)) >> g.unit_bits()) as u32,
            false => 0,
        };
        (unit, sub)
    }

    /// Fill `buf` with the guest bytes at `pos` (within the guest).
    pub(crate) fn read(&self, meta: &mut Metadata, pos: u64, buf: &mut [u8]) -> Result<()> {
        let runs = self.plan_read(meta, pos, buf.len())?;
        self.read_runs(&runs, pos, buf)
    }

    /// What holds the `len` guest bytes at `pos`, in runs of one kind each.
    pub(crate) fn plan_read(
        &self,
        meta: &mut Metadata,
        pos: u64,
        len: usize,
    ) -> Result<Vec<ReadRun>> {
        let io = &self.image.io;
        let mut runs: Vec<ReadRun> = Vec::new();
        let mut done = 0usize;
        while done < len {
            let guest = pos.saturating_add(done as u64);
            let (unit, sub) = self.unit_of(guest);
            let within = guest & (unit - 1);
            let n = clamp(unit - within, len - done);
            let entry = meta.tables.entry(io, guest)?;
            let kind = match entry.table {
                0 => ExtentKind::NOTHING,
                _ => self.kind(&entry, sub)?.advanced(within),
            };
            match runs.last_mut() {
                Some(last) if last.kind.continued_by(kind, last.len as u64) => last.len += n,
                _ => runs.push(ReadRun {
                    kind,
                    guest,
                    len: n,
                }),
            }
            done += n;
        }
        Ok(runs)
    }

    /// Read planned runs into `buf` (which starts at guest offset `pos`): no metadata needed.
    pub(crate) fn read_runs(&self, runs: &[ReadRun], pos: u64, buf: &mut [u8]) -> Result<()> {
        let reader = self.reader();
        for run in runs {
            let at = (run.guest - pos) as usize;
            let out = buf
                .get_mut(at..at + run.len)
                .ok_or(Error::Internal("a read run past its buffer"))?;
            reader.read_extent(run.kind, run.guest, out)?;
        }
        Ok(())
    }

    /// Whether the image itself holds the cluster at `guest`, and how far that answer
    /// holds, up to `len` bytes.
    pub(crate) fn is_allocated(
        &self,
        meta: &mut Metadata,
        pos: u64,
        len: u64,
    ) -> Result<(bool, u64)> {
        let io = &self.image.io;
        let mut first: Option<bool> = None;
        let mut done = 0u64;
        while done < len {
            let guest = pos.saturating_add(done);
            let (unit, sub) = self.unit_of(guest);
            let entry = meta.tables.entry(io, guest)?;
            let allocated = entry.table != 0
                && !matches!(self.kind(&entry, sub)?, ExtentKind::Unallocated { .. });
            match first {
                None => first = Some(allocated),
                Some(a) if a != allocated => break,
                Some(_) => {}
            }
            let within = guest & (unit - 1);
            done = done.saturating_add(unit - within).min(len);
        }
        Ok((first.unwrap_or(false), done))
    }

    /// Write `buf` at guest offset `pos` (within the guest).
    pub(crate) fn write(&self, meta: &mut Metadata, pos: u64, buf: &[u8]) -> Result<()> {
        if self.image.geometry.extended_l2 {
            return self.write_each_cluster(meta, pos, buf);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let guest = pos.saturating_add(done as u64);
            let rest = buf.get(done..).unwrap_or_default();
            done += self.write_run(meta, guest, rest)?;
        }
        Ok(())
    }

    /// Write `buf` cluster by cluster into an image with subclusters.
    fn write_each_cluster(&self, meta: &mut Metadata, pos: u64, buf: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let guest = pos + done as u64;
            let len = clamp(cs - (guest & (cs - 1)), buf.len() - done);
            self.write_in_subclusters(meta, guest, &buf[done..done + len])?;
            done += len;
        }
        Ok(())
    }

    /// Write the first run of clusters of `buf` handled alike; returns the bytes written.
    fn write_run(&self, meta: &mut Metadata, guest: u64, buf: &[u8]) -> Result<usize> {
        match self.write_step(meta, guest, buf)? {
            Step::Done(len) => Ok(len),
            Step::InPlace { host, len } => {
                self.write_in_place(host, guest, buf.get(..len).unwrap_or_default())?;
                Ok(len)
            }
        }
    }

    /// Write `data` for guest offset `guest` at `host`, inside clusters this image owns
    /// (what [`Step::InPlace`] leaves to do; no metadata needed).
    pub(crate) fn write_in_place(&self, host: u64, guest: u64, data: &[u8]) -> Result<()> {
        self.write_host(host, guest, data)
    }

    /// Do the first step of writing `buf` at `guest`: a run of clusters that need new ones
    /// is written and mapped; a run this image owns is left to the caller to write in place
    /// ([`Step::InPlace`]), which it may do without the metadata.
    pub(crate) fn write_step(&self, meta: &mut Metadata, guest: u64, buf: &[u8]) -> Result<Step> {
        if self.image.geometry.extended_l2 {
            let cs = self.cluster_size();
            let len = clamp(cs - (guest & (cs - 1)), buf.len());
            self.write_in_subclusters(meta, guest, &buf[..len])?;
            return Ok(Step::Done(len));
        }
        let io = &self.image.io;
        let cs = self.cluster_size();
        let within = guest & (cs - 1);
        let first_entry = meta.tables.entry_for_write(io, &mut meta.refs, guest)?;
        let first = self.old(&first_entry)?;
        let span = |n: u64| clamp(n.saturating_mul(cs) - within, buf.len());
        if let Old::Owned { host } = first {
            // Clusters owned and following one another on the host: one write.
            let mut n = 1u64;
            while span(n) < buf.len() && n.saturating_mul(cs) < MAX_RUN_BYTES {
                let next = guest - within + n * cs;
                let entry = meta.tables.entry_for_write(io, &mut meta.refs, next)?;
                match self.old(&entry)? {
                    Old::Owned { host: h } if h == host + n * cs => n += 1,
                    _ => break,
                }
            }
            meta.unsynced = true;
            return Ok(Step::InPlace {
                host: host + within,
                len: span(n),
            });
        }
        // Clusters that need new ones: gather them, allocate them together.
        let mut entries = vec![(first_entry, first)];
        while span(entries.len() as u64) < buf.len()
            && (entries.len() as u64).saturating_mul(cs) < MAX_RUN_BYTES
        {
            let next = guest - within + entries.len() as u64 * cs;
            let entry = meta.tables.entry_for_write(io, &mut meta.refs, next)?;
            let old = self.old(&entry)?;
            if matches!(old, Old::Owned { .. }) {
                break;
            }
            entries.push((entry, old));
        }
        let len = span(entries.len() as u64);
        self.write_new(meta, guest, buf.get(..len).unwrap_or_default(), &entries)?;
        Ok(Step::Done(len))
    }

    /// What the cluster of `entry` holds, for a write.
    fn old(&self, entry: &Entry) -> Result<Old> {
        let g = self.image.geometry;
        self.check_entry(entry)?;
        let host = Tables::host(entry.word);
        let copied = entry.word & table::OFLAG_COPIED != 0;
        Ok(match g.cluster_type(entry.word) {
            ClusterType::Normal if copied => Old::Owned { host },
            ClusterType::Normal => Old::Elsewhere {
                release: Release::Cluster(host),
                zeros: false,
            },
            ClusterType::ZeroAlloc => Old::Elsewhere {
                release: Release::Cluster(host),
                zeros: true,
            },
            ClusterType::ZeroPlain => Old::Elsewhere {
                release: Release::Nothing,
                zeros: true,
            },
            ClusterType::Unallocated => Old::Elsewhere {
                release: Release::Nothing,
                zeros: !self.has_backing(),
            },
            ClusterType::Compressed => {
                let (at, len) = g.compressed_extent(entry.word);
                Old::Elsewhere {
                    release: Release::Compressed(at & !511, len.saturating_add(at & 511)),
                    zeros: false,
                }
            }
        })
    }

    /// Write `data` (at guest offset `guest`) into new clusters for `entries`, filled with
    /// what the guest held around it; then map them and release the old ones.
    fn write_new(
        &self,
        meta: &mut Metadata,
        guest: u64,
        data: &[u8],
        entries: &[(Entry, Old)],
    ) -> Result<()> {
        let io = &self.image.io;
        let cs = self.cluster_size();
        let count = entries.len() as u64;
        let start = guest & !(cs - 1);
        let within = guest - start;
        let fresh_from = meta.file_len.max(meta.refs.end());
        let (host, fresh) = match self.external() {
            // The data file holds each cluster at its guest offset, without refcounts.
            true => (start, false),
            false => {
                let host = meta.refs.allocate(io, count)?;
                (host, host >= fresh_from)
            }
        };
        let end_gap = (count * cs) - within - data.len() as u64;
        let zeros_around = |i: usize| {
            entries
                .get(i)
                .is_some_and(|(_, old)| matches!(old, Old::Elsewhere { zeros: true, .. }))
        };
        let direct = self.image.crypt.is_none()
            && (within == 0 || (fresh && zeros_around(0)))
            && (end_gap == 0 || (fresh && zeros_around(entries.len() - 1)));
        let written = if direct {
            self.write_plain(host + within, data)
        } else {
            self.fill_and_write(meta, start, host, within, data, entries)
        };
        if let Err(e) = written {
            if !self.external() {
                meta.refs.free_now(io, host, count * cs)?;
            }
            return Err(e);
        }
        meta.unsynced = true;
        for (i, (entry, old)) in entries.iter().enumerate() {
            let (word, bitmap) = self.image.geometry.encode_l2(NewEntry::Data {
                host_offset: host + i as u64 * cs,
            })?;
            meta.tables.set(entry, word, bitmap)?;
            if let Old::Elsewhere { release, .. } = old {
                self.release(meta, *release);
            }
        }
        Ok(())
    }

    /// Build the new clusters whole (old content around `data`) and write them.
    fn fill_and_write(
        &self,
        meta: &mut Metadata,
        start: u64,
        host: u64,
        within: u64,
        data: &[u8],
        entries: &[(Entry, Old)],
    ) -> Result<()> {
        let cs = self.cluster_size();
        let total = entries.len() as u64 * cs;
        let mut whole = vec![0u8; total as usize];
        let data_end = within + data.len() as u64;
        if within > 0 {
            self.fill_old(meta, start, &entries[0].1, &mut whole[..cs as usize])?;
        }
        if data_end < total {
            let last = entries.len() - 1;
            let at = last * cs as usize;
            let last_start = start + last as u64 * cs;
            if last > 0 || within == 0 {
                self.fill_old(meta, last_start, &entries[last].1, &mut whole[at..])?;
            }
        }
        whole[within as usize..data_end as usize].copy_from_slice(data);
        if let Some(crypt) = &self.image.crypt {
            crypt.encrypt(host, start, &mut whole)?;
        }
        self.write_plain(host, &whole)
    }

    /// What the guest reads in the cluster at `start` now.
    fn fill_old(&self, meta: &mut Metadata, start: u64, old: &Old, out: &mut [u8]) -> Result<()> {
        if let Old::Elsewhere { zeros: true, .. } = old {
            return Ok(()); // `out` is zeros already
        }
        let size = self.size;
        let len = clamp(size.saturating_sub(start), out.len());
        self.read(meta, start, &mut out[..len])
    }

    /// Write `data` for guest offset `guest` at `host`, inside clusters this image owns.
    fn write_host(&self, host: u64, guest: u64, data: &[u8]) -> Result<()> {
        let Some(crypt) = &self.image.crypt else {
            return self.write_plain(host, data);
        };
        // Encryption works on whole sectors: widen to them, reading what is around.
        let head = host % 512;
        let end = host + data.len() as u64;
        let tail = end.next_multiple_of(512) - end;
        let mut whole = vec![0u8; (head + data.len() as u64 + tail) as usize];
        let reader = self.reader();
        if head > 0 || tail > 0 {
            let kind = ExtentKind::Data {
                host_offset: host - head,
            };
            reader.read_extent(kind, guest - head, &mut whole)?;
        }
        whole[head as usize..head as usize + data.len()].copy_from_slice(data);
        crypt.encrypt(host - head, guest - head, &mut whole)?;
        self.write_plain(host - head, &whole)
    }

    /// Write guest data (encrypted already, if the image is) at `host` of the data file.
    pub(crate) fn write_data(&self, host: u64, data: &[u8]) -> Result<()> {
        self.write_plain(host, data)
    }

    /// Check an entry as the reader does (an unallocated table has nothing to check).
    pub(crate) fn check_entry(&self, entry: &Entry) -> Result<()> {
        if entry.table != 0 {
            self.kind(entry, 0)?;
        }
        Ok(())
    }

    /// What dropping the mapping `word` releases.
    pub(crate) fn release_of_entry(&self, word: u64) -> Release {
        let g = self.image.geometry;
        match g.cluster_type(word) {
            ClusterType::Normal | ClusterType::ZeroAlloc => Release::Cluster(Tables::host(word)),
            ClusterType::Compressed => {
                let (at, len) = g.compressed_extent(word);
                Release::Compressed(at & !511, len.saturating_add(at & 511))
            }
            ClusterType::Unallocated | ClusterType::ZeroPlain => Release::Nothing,
        }
    }

    /// Write `data` at `host` of the data file; a large write in pieces on the image's
    /// threads (copying into the page cache is most of its cost, and QEMU writes a large
    /// request's pieces on several threads too).
    fn write_plain(&self, host: u64, data: &[u8]) -> Result<()> {
        let io = self.data_io();
        let failed =
            |at: u64, e| Error::io(format!("writing guest data at host offset {at:#x}"), e);
        let pool = &self.image.pool;
        if data.len() < PARALLEL_WRITE_MIN || pool.threads() < 2 {
            return io.write_all_at(host, data).map_err(|e| failed(host, e));
        }
        let mut pieces: Vec<(u64, &[u8], Option<std::io::Error>)> = data
            .chunks(PARALLEL_WRITE_PIECE)
            .enumerate()
            .map(|(i, piece)| (host + (i * PARALLEL_WRITE_PIECE) as u64, piece, None))
            .collect();
        pool.run_all(&mut pieces, |(at, piece, error)| {
            *error = io.write_all_at(*at, piece).err();
        });
        match pieces.into_iter().find_map(|(at, _, e)| e.map(|e| (at, e))) {
            Some((at, e)) => Err(failed(at, e)),
            None => Ok(()),
        }
    }

    pub(crate) fn release(&self, meta: &mut Metadata, release: Release) {
        match release {
            Release::Nothing => {}
            // A data file's clusters have no refcounts.
            Release::Cluster(_) if self.external() => {}
            Release::Cluster(host) => meta.refs.free_later(host, self.cluster_size()),
            Release::Compressed(at, len) => meta.refs.free_later(at, len),
        }
    }

    /// Make `len` bytes at `pos` read as zeros, as QEMU's zero write does: whole clusters
    /// get the zero flag (freed with `unmap`, compressed ones always); a partial cluster
    /// that reads as zeros already is made a zero cluster whole, any other partial cluster
    /// is written with zeros. Version 2 images have no zero flag: without a backing file
    /// their clusters are discarded instead, over one they are written with zeros.
    pub(crate) fn write_zeroes(
        &self,
        meta: &mut Metadata,
        pos: u64,
        len: u64,
        unmap: bool,
    ) -> Result<()> {
        if self.raw_data_file() {
            self.zero_raw_data_file(meta, pos, len)?;
        }
        let cs = self.cluster_size();
        let end = pos + len;
        let mut at = pos;
        while at < end {
            let cluster = at & !(cs - 1);
            let piece_end = (cluster + cs).min(end);
            let whole_cluster =
                at == cluster && (piece_end == cluster + cs || piece_end == self.size);
            if self.image.geometry.pre_v3 {
                // No zero flag: without a backing file QEMU discards whole clusters (and a
                // partial one that reads as zeros already); otherwise zeros are written.
                let discardable =
                    !self.has_backing() && (whole_cluster || self.reads_zeros(meta, cluster)?);
                match discardable {
                    true => self.discard_cluster(meta, cluster)?,
                    false => self.write_zero_bytes(meta, at, piece_end - at)?,
                }
            } else if self.image.geometry.extended_l2 && !whole_cluster {
                self.zero_in_cluster(meta, at, piece_end)?;
            } else if whole_cluster || self.reads_zeros(meta, cluster)? {
                self.zero_cluster(meta, cluster, unmap)?;
            } else {
                self.write_zero_bytes(meta, at, piece_end - at)?;
            }
            at = piece_end;
        }
        Ok(())
    }

    /// A raw data file reads as the guest: zeros go into it too (as QEMU's
    /// `qcow2_subcluster_zeroize` writes them there first).
    fn zero_raw_data_file(&self, meta: &mut Metadata, pos: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; clamp(len, MAX_RUN_BYTES as usize)];
        let mut done = 0u64;
        while done < len {
            let n = clamp(len - done, zeros.len());
            self.write_plain(pos + done, &zeros[..n])?;
            done += n as u64;
        }
        meta.unsynced = true;
        Ok(())
    }

    pub(crate) fn write_zero_bytes(&self, meta: &mut Metadata, pos: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; clamp(len, MAX_RUN_BYTES as usize)];
        let mut done = 0u64;
        while done < len {
            let n = clamp(len - done, zeros.len());
            self.write(meta, pos + done, &zeros[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Zero `at..end` inside one cluster of an image with subclusters: whole subclusters
    /// get the zero bit, the partial ones at either end are written with zeros.
    fn zero_in_cluster(&self, meta: &mut Metadata, at: u64, end: u64) -> Result<()> {
        let (unit, _) = self.unit_of(at);
        let first = at.next_multiple_of(unit);
        let last = end / unit * unit;
        if first >= last {
            return self.write_zero_bytes(meta, at, end - at);
        }
        if at < first {
            self.write_zero_bytes(meta, at, first - at)?;
        }
        self.zero_subclusters(meta, first, last - first)?;
        if last < end {
            self.write_zero_bytes(meta, last, end - last)?;
        }
        Ok(())
    }

    /// Whether the cluster at `cluster` reads as zeros without reading data: a zero
    /// cluster, or unallocated with nothing below.
    fn reads_zeros(&self, meta: &mut Metadata, cluster: u64) -> Result<bool> {
        let entry = meta.tables.entry(&self.image.io, cluster)?;
        if entry.table == 0 {
            return Ok(!self.has_backing());
        }
        Ok(match self.kind(&entry, 0)? {
            ExtentKind::Zero { .. } => true,
            ExtentKind::Unallocated { .. } => !self.has_backing(),
            _ => false,
        })
    }

    /// Give the cluster at `cluster` the zero flag (QEMU's `zero_in_l2_slice`).
    fn zero_cluster(&self, meta: &mut Metadata, cluster: u64, unmap: bool) -> Result<()> {
        let io = &self.image.io;
        let entry = meta.tables.entry_for_write(io, &mut meta.refs, cluster)?;
        let old = self.old(&entry)?;
        let kind = self.image.geometry.cluster_type(entry.word);
        let allocated = matches!(
            kind,
            ClusterType::Normal | ClusterType::ZeroAlloc | ClusterType::Compressed
        );
        let drop = kind == ClusterType::Compressed || (unmap && allocated);
        let extended = self.image.geometry.extended_l2;
        let (word, bitmap) = match (drop, extended) {
            (true, false) => (OFLAG_ZERO, 0),
            (false, false) => (entry.word | OFLAG_ZERO, 0),
            // Subclusters: every one reads as zeros, none allocated.
            (true, true) => (0, SUB_ALLOC_MASK << 32),
            (false, true) => (entry.word, SUB_ALLOC_MASK << 32),
        };
        if (word, bitmap) == (entry.word, entry.bitmap) {
            return Ok(());
        }
        meta.tables.set(&entry, word, bitmap)?;
        if drop {
            self.release(meta, release_of(old, entry.word));
        }
        Ok(())
    }

    /// Discard `len` bytes at `pos` as QEMU's guest discard does: whole clusters only (and
    /// the partial last cluster of the disk); each reads as zeros after and its cluster is
    /// freed (nothing at all in a version 2 image over a backing file).
    pub(crate) fn discard(&self, meta: &mut Metadata, pos: u64, len: u64) -> Result<()> {
        // A version 2 image cannot mark a cluster zero: discarding over a backing file would
        // show the backing file's data, so QEMU does nothing.
        if self.image.geometry.pre_v3 && self.has_backing() {
            return Ok(());
        }
        let cs = self.cluster_size();
        let size = self.size;
        let end = pos + len;
        let mut cluster = pos.next_multiple_of(cs);
        while cluster < end {
            let cluster_end = (cluster + cs).min(size);
            if cluster_end > end {
                break;
            }
            self.discard_cluster(meta, cluster)?;
            cluster += cs;
        }
        Ok(())
    }

    /// Discard one cluster as QEMU's `discard_in_l2_slice` does: one that holds nothing of
    /// its own is left as it is (unallocated with nothing below, or already zero); any
    /// other reads as zeros after (version 3) or falls through to nothing (version 2) and
    /// its clusters are released.
    fn discard_cluster(&self, meta: &mut Metadata, cluster: u64) -> Result<()> {
        let io = &self.image.io;
        let entry = meta.tables.entry_for_write(io, &mut meta.refs, cluster)?;
        let old = self.old(&entry)?;
        let kind = self.image.geometry.cluster_type(entry.word);
        let keep = match kind {
            ClusterType::Unallocated => !self.has_backing(),
            ClusterType::ZeroPlain => true,
            ClusterType::Normal | ClusterType::ZeroAlloc | ClusterType::Compressed => false,
        };
        if keep {
            return Ok(());
        }
        if self.raw_data_file() {
            let len = self.cluster_size().min(self.size - cluster);
            self.zero_raw_data_file(meta, cluster, len)?;
        }
        let (word, bitmap) = match (self.image.geometry.pre_v3, self.image.geometry.extended_l2) {
            (true, _) => (0, 0),
            (false, true) => (0, SUB_ALLOC_MASK << 32),
            (false, false) => (OFLAG_ZERO, 0),
        };
        if (word, bitmap) == (entry.word, entry.bitmap) {
            return Ok(());
        }
        meta.tables.set(&entry, word, bitmap)?;
        self.release(meta, release_of(old, entry.word));
        Ok(())
    }
}

/// What dropping the mapping `word` (decoded as `old`) releases.
fn release_of(old: Old, word: u64) -> Release {
    match old {
        Old::Owned { .. } => Release::Cluster(Tables::host(word)),
        Old::Elsewhere { release, .. } => release,
    }
}

/// `n` as a length within a buffer of `max` bytes.
fn clamp(n: u64, max: usize) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX).min(max)
}
