//! The writer of new images: fills an empty qcow2 image (as `qemu-img create` leaves it)
//! with guest data given in guest order, appending every cluster at the end of the file.
//!
//! Nothing is ever rewritten in place but the refcount blocks the empty image already had,
//! the L1 table and the header: host clusters are taken from the end of the file upwards;
//! an L2 table is kept in memory from its first entry until the guest position passes its
//! end, then written once; a refcount block likewise, until the allocation pointer passes its
//! range; the L1 and refcount tables are written at [`Builder::finish`]. Memory is one L2
//! table, one refcount block, the L1 and refcount tables, and the write being gathered.
//!
//! The header's magic is cleared when the writer starts and written back last, at finish:
//! a conversion that fails or is interrupted leaves a file no tool takes for a valid image
//! (QEMU would leave a valid image holding part of the data).

use std::collections::VecDeque;
use std::fs::File;
use std::path::Path;

use crate::base::bytes::low_bits;
use crate::base::io::PositionalSink;
use crate::crypt::Encryption;
use crate::error::{Error, Result};
use crate::format::header::MAGIC;
use crate::format::refcount::{RefTableEntry, RefcountLayout, REFTABLE_ENTRY_LEN};
use crate::format::table::{Geometry, NewEntry};
use crate::image::options::OpenOptions;
use crate::image::qcow2::Qcow2;
use positioned_io::ReadAt;

/// The largest guest a stream may grow to: 2^56 bytes, past which host offsets no longer
/// fit an L2 entry (QEMU's own limit is lower, its 32 MiB L1 table).
const MAX_GROWN_SIZE: u64 = 1 << 56;
/// Header bytes 24-31: the guest size.
const SIZE_AT: u64 = 24;
/// Header bytes 36-39: L1 entries, then 40-47: the L1 table's offset.
const L1_FIELDS_AT: u64 = 36;
/// Gathered writes are sent to the file once they reach this size.
const WRITE_BATCH: usize = 4 << 20;
/// Header bytes 48-59: the refcount table's offset, then its length in clusters.
const REFCOUNT_TABLE_OFFSET_AT: u64 = 48;

/// What the writer needs to know of its target before it starts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Target {
    pub cluster_size: u64,
    pub backing: bool,
    pub pre_v3: bool,
    pub compression_type: crate::format::header::CompressionType,
}

/// Fills an empty image; see the module documentation.
pub(crate) struct Builder {
    file: File,
    /// The external data file, where data clusters go at their guest offsets.
    data_file: Option<File>,
    geometry: Geometry,
    cluster_bits: u32,
    cluster_size: u64,
    entry_len: u64,
    guest_size: u64,
    l1: Vec<u64>,
    l1_offset: u64,
    /// The L1 table's length in the empty image.
    l1_len_at_open: u64,
    /// The L2 table being filled: its L1 index, host offset and contents.
    l2: Option<(u64, u64, Vec<u8>)>,
    /// The next guest cluster that may be set: guest order is enforced.
    next_guest_cluster: u64,
    refcounts: Refcounts,
    /// The next free host cluster of the image file.
    next_free: u64,
    /// Where the next compressed cluster may go, when a partly used cluster is the last one
    /// allocated (QEMU's `free_byte_offset`).
    compressed_end: Option<u64>,
    /// A raw external data file: `qemu-img create` mapped every cluster to it already, at
    /// its guest offset, so only data is written, into the data file.
    raw_data: bool,
    /// A preallocated target this conversion created: every guest cluster is mapped
    /// already, so data goes where its L2 entry points and no metadata changes.
    premapped: Option<Premapped>,
    /// The size to grow the guest to at finish, when it may grow.
    grown_size: Option<u64>,
    /// A write being gathered: host offset and bytes (into the data file when `to_data`).
    pending: (u64, Vec<u8>, bool),
    crypt: Option<Encryption>,
    target: Target,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("target", &self.target)
            .field("next_free", &self.next_free)
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// Open the empty image at `path` (with `options`, e.g. its secret) for filling.
    /// Refused: an image with data, snapshots or bitmaps, a dirty or corrupt one, legacy AES
    /// encryption, an external data file that is not there. A `fresh` image (made by this
    /// conversion, so it reads as zeros) may be preallocated: it is filled where its L2
    /// entries point.
    pub(crate) fn open(path: &Path, options: &OpenOptions, fresh: bool) -> Result<Builder> {
        let mut image = Qcow2::open_path_with(path, &options.clone().backing_as_zeros(true))?;
        let raw_data = image.header().is_data_file_raw();
        let preallocated = fresh && !raw_data && image.l1.iter().any(|&e| e != 0);
        let premapped = match preallocated {
            true => Some(Premapped::check(Qcow2::open_path_with(
                path,
                &options.clone().backing_as_zeros(true),
            )?)?),
            false => {
                refuse_unless_empty(&image, raw_data)?;
                None
            }
        };
        let header = image.header().clone();
        let file = open_rw(path)?;
        let data_file = match image.header().has_data_file_bit() {
            true => {
                let data = image.data_file_path.clone().ok_or(Error::DataFileMissing {
                    name: header.data_file().unwrap_or_default().to_owned(),
                })?;
                Some(open_rw(&data)?)
            }
            false => None,
        };
        let crypt = image.crypt.take();
        if let Some(crypt) = &crypt {
            // Fails unless the secret unlocked the key.
            crypt.encrypt(0, 0, &mut [0u8; 512])?;
        }
        let geometry = image.geometry;
        let layout = RefcountLayout {
            cluster_bits: header.cluster_bits(),
            order: header.refcount_order(),
        };
        let file_len = file
            .metadata()
            .map_err(|e| Error::io("reading the target's length", e))?
            .len();
        let cluster_size = header.cluster_size();
        let refcounts = Refcounts::load(&file, &header, layout)?;
        let target = Target {
            cluster_size,
            backing: header.backing_file_bytes().is_some(),
            pre_v3: header.version() < 3,
            compression_type: header.compression_type(),
        };
        let builder = Builder {
            data_file,
            geometry,
            cluster_bits: header.cluster_bits(),
            cluster_size,
            entry_len: header.l2_entry_len(),
            guest_size: header.size(),
            l1: vec![0; header.l1_size() as usize],
            l1_len_at_open: u64::from(header.l1_size()),
            l1_offset: header.l1_table_offset(),
            l2: None,
            next_guest_cluster: 0,
            // The file's end, rounded up to a cluster: every cluster below is in use.
            next_free: file_len.div_ceil(cluster_size),
            compressed_end: None,
            raw_data,
            premapped,
            grown_size: None,
            pending: (0, Vec::new(), false),
            crypt,
            refcounts,
            target,
            file,
        };
        builder.write_at(0, &[0; 4], "clearing the header's magic until the end")?;
        Ok(builder)
    }

    /// What the target is.
    pub(crate) fn target(&self) -> Target {
        self.target
    }

    /// Store guest cluster `guest_cluster` as data: `bytes` (at most a cluster; a shorter
    /// last cluster is padded with zeros).
    pub(crate) fn set_data(&mut self, guest_cluster: u64, bytes: &[u8]) -> Result<()> {
        if bytes.len() as u64 > self.cluster_size {
            return Err(Error::Internal("more than a cluster of data"));
        }
        let (guest, host) = self.place_data(guest_cluster)?;
        self.gather(host, bytes, Some(guest))
    }

    /// Store the clusters from `first_cluster` on as data: `bytes`, whole clusters but
    /// perhaps the disk's last. Clusters that land next to each other in the file are
    /// written with one write straight from `bytes` (an encrypted image goes through
    /// [`Builder::set_data`], which encrypts a copy).
    pub(crate) fn set_data_run(&mut self, first_cluster: u64, bytes: &[u8]) -> Result<()> {
        let cluster_size = self.cluster_size as usize;
        if self.crypt.is_some() {
            for (i, data) in bytes.chunks(cluster_size).enumerate() {
                self.set_data(first_cluster.saturating_add(i as u64), data)?;
            }
            return Ok(());
        }
        // The run being gathered: its host offset and where it starts in `bytes`.
        let mut run: Option<(u64, usize)> = None;
        for i in 0..bytes.len().div_ceil(cluster_size) {
            let (_, host) = self.place_data(first_cluster.saturating_add(i as u64))?;
            let at = i.saturating_mul(cluster_size);
            match run {
                Some((start, from))
                    if start.checked_add(at.saturating_sub(from) as u64) == Some(host) => {}
                Some((start, from)) => {
                    self.write_direct(start, bytes.get(from..at).unwrap_or_default())?;
                    run = Some((host, at));
                }
                None => run = Some((host, at)),
            }
        }
        if let Some((start, from)) = run {
            self.write_direct(start, bytes.get(from..).unwrap_or_default())?;
        }
        Ok(())
    }

    /// Map guest cluster `guest_cluster` to a data cluster of its own: `(guest offset, host
    /// offset)`.
    fn place_data(&mut self, guest_cluster: u64) -> Result<(u64, u64)> {
        let guest = self.cluster_offset(guest_cluster)?;
        if self.raw_data {
            return Ok((guest, guest));
        }
        if let Some(premapped) = &mut self.premapped {
            return Ok((guest, premapped.host(guest)?));
        }
        self.l2_for(guest_cluster)?;
        let host = match &self.data_file {
            // QEMU's data files hold each cluster at its guest offset, counted by no refcount.
            Some(_) => guest,
            None => self.allocate_cluster()?,
        };
        self.set_entry(guest_cluster, NewEntry::Data { host_offset: host })?;
        Ok((guest, host))
    }

    /// Write data clusters at `host` of the file that holds data, without gathering.
    fn write_direct(&self, host: u64, bytes: &[u8]) -> Result<()> {
        let file = self.data_file.as_ref().unwrap_or(&self.file);
        file.write_all_at(host, bytes)
            .map_err(|e| Error::io(format!("writing the target at offset {host}"), e))
    }

    /// Store guest cluster `guest_cluster` compressed (`bytes`, shorter than a cluster), packed
    /// after the previous compressed cluster as `qcow2_alloc_bytes` packs them.
    pub(crate) fn set_compressed(&mut self, guest_cluster: u64, bytes: &[u8]) -> Result<()> {
        let len = bytes.len() as u64;
        if len == 0 || len >= self.cluster_size {
            return Err(Error::Internal("a compressed cluster that does not shrink"));
        }
        if self.crypt.is_some() || self.data_file.is_some() || self.premapped.is_some() {
            return Err(Error::Internal(
                "compressed clusters in an encrypted, data-file or preallocated image",
            ));
        }
        self.l2_for(guest_cluster)?;
        let start = self.place_compressed(len)?;
        self.set_entry(
            guest_cluster,
            NewEntry::Compressed {
                host_offset: start,
                len,
            },
        )?;
        self.gather(start, bytes, None)
    }

    /// Guest cluster `guest_cluster` reads as zeros, over any backing data.
    pub(crate) fn set_zero(&mut self, guest_cluster: u64) -> Result<()> {
        if self.raw_data || self.premapped.is_some() {
            // A raw data file, or a fresh preallocated image, reads as zeros, and no backing
            // file shows through it.
            return Ok(());
        }
        self.l2_for(guest_cluster)?;
        self.set_entry(guest_cluster, NewEntry::Zero)
    }

    /// Write every table and the header; the image is complete and valid afterwards.
    pub(crate) fn finish(mut self) -> Result<()> {
        self.flush_l2()?;
        self.flush_pending()?;
        if self.raw_data || self.premapped.is_some() {
            return self.seal();
        }
        let grown = self.place_grown_l1()?;
        let table = self.refcounts.finish(&self.file, &mut self.next_free)?;
        let l1: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_at(self.l1_offset, &l1, "writing the L1 table")?;
        if let Some(size) = grown {
            let l1_len = u32::try_from(self.l1.len())
                .map_err(|_| Error::Internal("an L1 table of 2^32 entries"))?;
            let mut l1_fields = l1_len.to_be_bytes().to_vec();
            l1_fields.extend_from_slice(&self.l1_offset.to_be_bytes());
            self.write_at(SIZE_AT, &size.to_be_bytes(), "writing the grown guest size")?;
            self.write_at(
                L1_FIELDS_AT,
                &l1_fields,
                "pointing the header to the L1 table",
            )?;
        }
        if let Some((offset, clusters)) = table {
            let mut fields = offset.to_be_bytes().to_vec();
            fields.extend_from_slice(&clusters.to_be_bytes());
            self.write_at(
                REFCOUNT_TABLE_OFFSET_AT,
                &fields,
                "pointing the header to the new refcount table",
            )?;
        }
        self.seal()
    }

    /// Make the image valid, last. Not flushed to disk: `qemu-img convert` writes its output
    /// with cache mode `unsafe` (no `fdatasync` after the target is created, seen under
    /// strace), so a crash of the machine, unlike a failed or killed conversion, may leave
    /// the magic on disk before the tables.
    fn seal(&self) -> Result<()> {
        self.write_at(0, &MAGIC.to_be_bytes(), "writing the header's magic")
    }

    /// When the guest grew: the L1 table sized for it (moved to new clusters at the end
    /// when its old clusters are too few, which are then freed), and the new size.
    fn place_grown_l1(&mut self) -> Result<Option<u64>> {
        let Some(size) = self.grown_size.filter(|&s| s > self.guest_size) else {
            if self.l1.len() as u64 > self.l1_len_at_open {
                return Err(Error::Internal("data past the image's size"));
            }
            return Ok(None);
        };
        let per_l2 = self
            .cluster_size
            .saturating_mul(self.cluster_size >> self.entry_len.trailing_zeros());
        let entries = size.div_ceil(per_l2);
        if (self.l1.len() as u64) > entries {
            return Err(Error::Internal("data past the grown size"));
        }
        self.l1.resize(entries as usize, 0);
        let old_entries = self.l1_len_at_open;
        let old_clusters = (old_entries.saturating_mul(8)).div_ceil(self.cluster_size);
        if entries > self.l1_capacity_entries(old_entries) as u64 {
            let clusters = entries.saturating_mul(8).div_ceil(self.cluster_size);
            let start = self.allocate_run(clusters)?;
            let old_first = self.l1_offset >> self.cluster_bits;
            for c in old_first..old_first.saturating_add(old_clusters) {
                self.refcounts.release(&self.file, c)?;
            }
            self.l1_offset = start;
        }
        self.guest_size = size;
        Ok(Some(size))
    }

    /// Entries the clusters of an L1 table of `entries` entries hold.
    fn l1_capacity_entries(&self, entries: u64) -> usize {
        let clusters = entries.saturating_mul(8).div_ceil(self.cluster_size);
        clusters.saturating_mul(self.cluster_size / 8) as usize
    }

    /// `n` contiguous new clusters: the refcount blocks that cover them made first, so that
    /// none lands inside the run.
    fn allocate_run(&mut self, n: u64) -> Result<u64> {
        loop {
            let start = self.next_free;
            let last = start.saturating_add(n.saturating_sub(1));
            let (first_index, _) = self.refcounts.layout.locate(start);
            let (last_index, _) = self.refcounts.layout.locate(last);
            let missing = (first_index..=last_index).find(|&i| self.refcounts.block_at(i) == 0);
            match missing {
                Some(index) => {
                    let cluster = index << self.refcounts.layout.block_bits();
                    self.refcounts
                        .make_block(&self.file, cluster, &mut self.next_free)?;
                }
                None => break,
            }
        }
        let start = self.allocate_cluster()?;
        for _ in 1..n {
            self.allocate_cluster()?;
        }
        Ok(start)
    }

    fn cluster_offset(&self, guest_cluster: u64) -> Result<u64> {
        let limit = match self.grown_size {
            Some(_) => MAX_GROWN_SIZE,
            None => self.guest_size,
        };
        guest_cluster
            .checked_shl(self.cluster_bits)
            .filter(|&g| g < limit)
            .ok_or(Error::Internal("a guest cluster past the end of the disk"))
    }

    /// Let the guest grow past the image's size (a stream of unknown length): clusters
    /// may be set anywhere below 2^56, and [`Builder::finish`] makes the image `size` bytes
    /// (the size given last) when that is more than it was, moving the L1 table when it
    /// must grow past its clusters.
    pub(crate) fn grow_to(&mut self, size: u64) -> Result<()> {
        if self.premapped.is_some() {
            return Err(Error::InvalidOption {
                option: "preallocation".to_owned(),
                message: "a stream of unknown length cannot fill a preallocated image".to_owned(),
            });
        }
        if self.raw_data {
            return Err(Error::InvalidOption {
                option: "data_file_raw".to_owned(),
                message: "a stream of unknown length cannot fill a raw data file".to_owned(),
            });
        }
        self.grown_size = Some(size.min(MAX_GROWN_SIZE));
        Ok(())
    }

    /// Make the L2 table of `guest_cluster` the one being filled (allocating it before the
    /// cluster's data, as QEMU does); `guest_cluster` must come after every cluster set so
    /// far.
    fn l2_for(&mut self, guest_cluster: u64) -> Result<()> {
        if guest_cluster < self.next_guest_cluster {
            return Err(Error::Internal("guest clusters must be set in order"));
        }
        self.cluster_offset(guest_cluster)?;
        let l1_index = guest_cluster >> self.geometry.index_bits;
        if self.l2.as_ref().map(|l2| l2.0) != Some(l1_index) {
            self.flush_l2()?;
            let host = self.allocate_cluster()?;
            if self.grown_size.is_some() && self.l1.len() as u64 <= l1_index {
                self.l1.resize(l1_index.saturating_add(1) as usize, 0);
            }
            let l1_entry = self
                .l1
                .get_mut(l1_index as usize)
                .ok_or(Error::Internal("an L1 index past the table"))?;
            *l1_entry = self.geometry.encode_l1(host);
            self.l2 = Some((l1_index, host, vec![0; self.cluster_size as usize]));
        }
        Ok(())
    }

    /// Set the L2 entry of `guest_cluster`, in the table [`Builder::l2_for`] made current.
    fn set_entry(&mut self, guest_cluster: u64, entry: NewEntry) -> Result<()> {
        self.next_guest_cluster = guest_cluster.saturating_add(1);
        let slot = low_bits(guest_cluster, self.geometry.index_bits);
        let (word, bitmap) = self.geometry.encode_l2(entry)?;
        let at = slot.saturating_mul(self.entry_len) as usize;
        let l2 = self
            .l2
            .as_mut()
            .map(|l2| &mut l2.2)
            .ok_or(Error::Internal("no L2 table"))?;
        let dst = l2
            .get_mut(at..at.saturating_add(self.entry_len as usize))
            .ok_or(Error::Internal("an L2 slot past the table"))?;
        let (first, second) = dst.split_at_mut(8);
        first.copy_from_slice(&word.to_be_bytes());
        if let Some(second) = second.get_mut(..8) {
            second.copy_from_slice(&bitmap.to_be_bytes());
        }
        Ok(())
    }

    fn flush_l2(&mut self) -> Result<()> {
        if let Some((_, host, table)) = self.l2.take() {
            self.gather(host, &table, None)?;
        }
        Ok(())
    }

    /// A new host cluster at the end of the image file, counted.
    fn allocate_cluster(&mut self) -> Result<u64> {
        let cluster = self.next_free;
        self.next_free = cluster.saturating_add(1);
        self.refcounts
            .count(&self.file, cluster, &mut self.next_free)?;
        cluster
            .checked_shl(self.cluster_bits)
            .ok_or(Error::Internal("a host offset past 2^64"))
    }

    /// Where `len` compressed bytes (less than a cluster) go: right after the previous
    /// compressed cluster when they fit in its last host cluster or the cluster after it is
    /// the next free one, else at the start of a new cluster. Each host cluster the bytes
    /// touch gains one reference (`qcow2_alloc_bytes`).
    fn place_compressed(&mut self, len: u64) -> Result<u64> {
        if let Some(end) = self
            .compressed_end
            .filter(|&e| low_bits(e, self.cluster_bits) != 0)
        {
            let cluster = end >> self.cluster_bits;
            let next_cluster = cluster.saturating_add(1);
            let spills = end.saturating_add(len) > next_cluster << self.cluster_bits;
            if spills {
                // The next cluster must be the next free one, a refcount block not in it.
                self.ensure_block_for_next()?;
            }
            // Another reference must fit (`qcow2_alloc_bytes` moves on at refcount_max).
            let max = self.refcounts.layout.max();
            let room = self.refcounts.get(cluster).is_some_and(|r| r < max);
            if room && (!spills || self.next_free == next_cluster) {
                self.refcounts.add(&self.file, cluster, 1)?;
                if spills {
                    self.allocate_cluster()?;
                }
                let new_end = end.saturating_add(len);
                self.compressed_end = Some(new_end);
                return Ok(end);
            }
        }
        self.ensure_block_for_next()?;
        let start = self.allocate_cluster()?;
        self.compressed_end = Some(start.saturating_add(len));
        Ok(start)
    }

    /// Make the refcount block that covers the next free cluster, so that allocating it
    /// puts nothing before it.
    fn ensure_block_for_next(&mut self) -> Result<()> {
        while self
            .refcounts
            .block_at(self.refcounts.layout.locate(self.next_free).0)
            == 0
        {
            self.refcounts
                .make_block(&self.file, self.next_free, &mut self.next_free)?;
        }
        Ok(())
    }

    /// Add `bytes` at `host` to the gathered write, sending that first when they do not
    /// continue it. A data cluster (`guest`: its guest offset) is padded to a whole cluster,
    /// encrypted when the image is, and goes to the external data file when there is one.
    fn gather(&mut self, host: u64, bytes: &[u8], guest: Option<u64>) -> Result<()> {
        let to_data = guest.is_some() && self.data_file.is_some();
        let (start, buf, data) = &self.pending;
        let continues = *data == to_data
            && start.checked_add(buf.len() as u64) == Some(host)
            && buf.len() < WRITE_BATCH;
        if !continues {
            self.flush_pending()?;
            self.pending.0 = host;
            self.pending.2 = to_data;
        }
        let from = self.pending.1.len();
        self.pending.1.extend_from_slice(bytes);
        if let Some(guest) = guest {
            let padded = from.saturating_add(self.cluster_size as usize);
            self.pending.1.resize(padded, 0);
            if let Some(crypt) = &self.crypt {
                let cluster = self
                    .pending
                    .1
                    .get_mut(from..)
                    .ok_or(Error::Internal("a gathered cluster went missing"))?;
                crypt.encrypt(host, guest, cluster)?;
            }
        }
        Ok(())
    }

    fn flush_pending(&mut self) -> Result<()> {
        let (host, buf, to_data) = std::mem::take(&mut self.pending);
        if buf.is_empty() {
            self.pending.1 = buf;
            return Ok(());
        }
        let target = match (&self.data_file, to_data) {
            (Some(data), true) => data,
            _ => &self.file,
        };
        target
            .write_all_at(host, &buf)
            .map_err(|e| Error::io(format!("writing the target at offset {host}"), e))?;
        let mut buf = buf;
        buf.clear();
        self.pending.1 = buf;
        Ok(())
    }

    fn write_at(&self, at: u64, bytes: &[u8], what: &str) -> Result<()> {
        self.file
            .write_all_at(at, bytes)
            .map_err(|e| Error::io(what.to_owned(), e))
    }
}

/// Refuse a target that is not as `qemu-img create` leaves it.
/// The mapping of a preallocated target, looked up one extent at a time as the guest
/// position moves on.
struct Premapped {
    image: Qcow2<File>,
    /// The extent last looked up: guest start, length, host offset.
    extent: (u64, u64, u64),
}

impl Premapped {
    /// A preallocated image with nothing else in it: no snapshots or bitmaps, clean.
    fn check(image: Qcow2<File>) -> Result<Premapped> {
        let header = image.header();
        if !image.snapshots().is_empty()
            || !image.bitmaps().is_empty()
            || header.is_dirty()
            || header.is_corrupt()
        {
            return Err(Error::InvalidOption {
                option: "preallocation".to_owned(),
                message: "the preallocated target has snapshots, bitmaps or a dirty bit".to_owned(),
            });
        }
        Ok(Premapped {
            image,
            extent: (0, 0, 0),
        })
    }

    /// The host offset of guest offset `guest` (a cluster's start), which must be mapped
    /// to a data cluster of its own, as preallocation maps every cluster.
    fn host(&mut self, guest: u64) -> Result<u64> {
        let (start, len, _) = self.extent;
        if guest < start || guest >= start.saturating_add(len) {
            let extent = self.image.reader()?.extent_at(guest)?;
            self.extent = match extent {
                Some(crate::format::table::Extent {
                    start,
                    length,
                    kind: crate::format::table::ExtentKind::Data { host_offset },
                    ..
                }) => (start, length, host_offset),
                _ => {
                    return Err(Error::InvalidOption {
                        option: "preallocation".to_owned(),
                        message: format!(
                            "guest offset {guest} of the preallocated target is not mapped"
                        ),
                    })
                }
            };
        }
        let (start, _, host) = self.extent;
        Ok(host.saturating_add(guest.saturating_sub(start)))
    }
}

fn refuse_unless_empty<I: ReadAt>(image: &Qcow2<I>, raw_data: bool) -> Result<()> {
    let header = image.header();
    let reason = if raw_data && image.l1.contains(&0) {
        Some("its raw data file is not mapped whole, as qemu-img create maps it")
    } else if !raw_data && image.l1.iter().any(|&e| e != 0) {
        Some("it holds data (or preallocated metadata)")
    } else if !image.snapshots().is_empty() {
        Some("it has snapshots")
    } else if !image.bitmaps().is_empty() {
        Some("it has bitmaps")
    } else if header.is_dirty() || header.is_corrupt() {
        Some("it is marked dirty or corrupt")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::InvalidOption {
            option: "-n".to_owned(),
            message: format!(
                "the target image must be empty, as qemu-img create leaves it: {reason}"
            ),
        }),
        None => Ok(()),
    }
}

fn open_rw(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("opening {} for writing", path.display()), e))
}

/// The refcount table and blocks being built.
struct Refcounts {
    layout: RefcountLayout,
    cluster_size: u64,
    /// Host offset of each refcount block, by index (0: none yet).
    table: Vec<u64>,
    /// The image's refcount table as created: offset and clusters.
    old_table: (u64, u64),
    /// The block being filled: its index and contents.
    current: Option<(u64, Vec<u8>)>,
}

impl Refcounts {
    fn load(
        file: &File,
        header: &crate::format::header::Header,
        layout: RefcountLayout,
    ) -> Result<Self> {
        let clusters = u64::from(header.refcount_table_clusters());
        let cluster_size = header.cluster_size();
        let len = clusters
            .checked_mul(cluster_size)
            .filter(|&l| l <= 64 << 20)
            .ok_or(Error::Internal(
                "the empty image's refcount table is too large",
            ))?;
        let mut raw = vec![0u8; len as usize];
        file.read_exact_at(header.refcount_table_offset(), &mut raw)
            .map_err(|e| Error::io("reading the refcount table", e))?;
        let mut table = Vec::new();
        for entry in raw.chunks_exact(REFTABLE_ENTRY_LEN as usize) {
            let word = u64::from_be_bytes(entry.try_into().unwrap_or_default());
            match RefTableEntry::decode(word, header.cluster_bits()) {
                RefTableEntry::Empty => table.push(0),
                RefTableEntry::Block(offset) => table.push(offset),
                _ => return Err(Error::Corrupt),
            }
        }
        while table.last() == Some(&0) {
            table.pop();
        }
        Ok(Refcounts {
            layout,
            cluster_size,
            table,
            old_table: (header.refcount_table_offset(), clusters),
            current: None,
        })
    }

    /// Count a newly allocated cluster (refcount 1), making its refcount block first when
    /// none covers it: the block takes the next free cluster, and is counted in turn.
    fn count(&mut self, file: &File, cluster: u64, next_free: &mut u64) -> Result<()> {
        let mut queue = VecDeque::from([cluster]);
        while let Some(c) = queue.pop_front() {
            let (index, _) = self.layout.locate(c);
            if self.block_at(index) == 0 {
                queue.push_back(self.new_block(index, next_free)?);
            }
            self.add(file, c, 1)?;
        }
        Ok(())
    }

    /// Make the refcount block covering `cluster` at the next free cluster, counted.
    fn make_block(&mut self, file: &File, cluster: u64, next_free: &mut u64) -> Result<()> {
        let (index, _) = self.layout.locate(cluster);
        let block = self.new_block(index, next_free)?;
        self.count(file, block, next_free)
    }

    /// Put block `index` at the next free cluster (not counted yet); returns that cluster.
    fn new_block(&mut self, index: u64, next_free: &mut u64) -> Result<u64> {
        let block = *next_free;
        *next_free = block.saturating_add(1);
        let offset = block
            .checked_mul(self.cluster_size)
            .ok_or(Error::Internal("a host offset past 2^64"))?;
        self.set_block(index, offset);
        Ok(block)
    }

    /// The refcount of `cluster` when the block being filled covers it.
    fn get(&self, cluster: u64) -> Option<u64> {
        let (index, slot) = self.layout.locate(cluster);
        match &self.current {
            Some((current, block)) if *current == index => Some(self.layout.get(block, slot)),
            _ => None,
        }
    }

    fn block_at(&self, index: u64) -> u64 {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.table.get(i))
            .copied()
            .unwrap_or(0)
    }

    fn set_block(&mut self, index: u64, offset: u64) {
        let i = usize::try_from(index).unwrap_or(usize::MAX);
        if self.table.len() <= i {
            self.table.resize(i.saturating_add(1), 0);
        }
        if let Some(slot) = self.table.get_mut(i) {
            *slot = offset;
        }
    }

    /// Add `delta` to the refcount of `cluster`, whose block must exist; blocks are filled in
    /// order, each written when the next one starts.
    fn add(&mut self, file: &File, cluster: u64, delta: u64) -> Result<()> {
        let (index, slot) = self.layout.locate(cluster);
        if self.current.as_ref().map(|c| c.0) != Some(index) {
            if self.current.as_ref().is_some_and(|c| c.0 > index) {
                return Err(Error::Internal("refcount blocks must be filled in order"));
            }
            self.flush(file)?;
            let block = self.read_block(file, index)?;
            self.current = Some((index, block));
        }
        let block = self
            .current
            .as_mut()
            .map(|c| &mut c.1)
            .ok_or(Error::Internal("no refcount block"))?;
        let value = self.layout.get(block, slot).saturating_add(delta);
        if !self.layout.set(block, slot, value) {
            return Err(Error::InvalidOption {
                option: "refcount_bits".to_owned(),
                message: format!(
                    "a refcount of {value} does not fit in {} bits",
                    self.layout.bits()
                ),
            });
        }
        Ok(())
    }

    /// Block `index` as the file holds it: the empty image's own blocks are read (their
    /// counts are kept), new ones start at zero.
    fn read_block(&self, file: &File, index: u64) -> Result<Vec<u8>> {
        let mut block = vec![0u8; self.cluster_size as usize];
        let offset = self.block_at(index);
        if offset == 0 {
            return Err(Error::Internal(
                "a refcount block was used before it was made",
            ));
        }
        // A new block is past the end of the file: nothing to read.
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if offset < len {
            file.read_exact_at(offset, &mut block)
                .or_else(|e| match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => Ok(()),
                    _ => Err(e),
                })
                .map_err(|e| Error::io("reading a refcount block", e))?;
        }
        Ok(block)
    }

    fn flush(&mut self, file: &File) -> Result<()> {
        if let Some((index, block)) = self.current.take() {
            let offset = self.block_at(index);
            file.write_all_at(offset, &block)
                .map_err(|e| Error::io("writing a refcount block", e))?;
        }
        Ok(())
    }

    /// Write the last block and the table: in place when the empty image's table holds every
    /// entry, else in new clusters at the end (returned, for the header), the old table's
    /// clusters then freed.
    fn finish(&mut self, file: &File, next_free: &mut u64) -> Result<Option<(u64, u32)>> {
        let per_entry_clusters = self.cluster_size / REFTABLE_ENTRY_LEN;
        let fits =
            |entries: u64, clusters: u64| entries <= clusters.saturating_mul(per_entry_clusters);
        let moved = if fits(self.table.len() as u64, self.old_table.1) {
            None
        } else {
            // Room for the entries after the table and the blocks its own clusters need.
            let mut clusters = 1u64;
            loop {
                let end = next_free
                    .saturating_add(clusters)
                    .saturating_add(clusters >> self.layout.block_bits())
                    .saturating_add(2);
                if fits(
                    (end >> self.layout.block_bits()).saturating_add(1),
                    clusters,
                ) {
                    break;
                }
                clusters = clusters.saturating_add(1);
            }
            let start = *next_free;
            *next_free = start.saturating_add(clusters);
            for c in start..start.saturating_add(clusters) {
                self.count(file, c, next_free)?;
            }
            if !fits(self.table.len() as u64, clusters) {
                return Err(Error::Internal("the new refcount table is too small"));
            }
            Some((start, clusters))
        };
        self.flush(file)?;
        let (offset, clusters) = match moved {
            Some((start, clusters)) => (start.saturating_mul(self.cluster_size), clusters),
            None => self.old_table,
        };
        let mut raw = vec![0u8; clusters.saturating_mul(self.cluster_size) as usize];
        for (entry, block) in raw.chunks_exact_mut(8).zip(&self.table) {
            entry.copy_from_slice(&block.to_be_bytes());
        }
        file.write_all_at(offset, &raw)
            .map_err(|e| Error::io("writing the refcount table", e))?;
        if moved.is_none() {
            return Ok(None);
        }
        // Free the old table's clusters, in their (already written) blocks.
        let (old_offset, old_clusters) = self.old_table;
        let first = old_offset >> self.layout.cluster_bits;
        for c in first..first.saturating_add(old_clusters) {
            self.release(file, c)?;
        }
        let clusters = u32::try_from(clusters)
            .map_err(|_| Error::Internal("a refcount table of 2^32 clusters"))?;
        Ok(Some((offset, clusters)))
    }

    /// Set a cluster's refcount to 0, in the block being filled or in its block on disk.
    fn release(&mut self, file: &File, cluster: u64) -> Result<()> {
        let (index, slot) = self.layout.locate(cluster);
        if let Some((current, block)) = &mut self.current {
            if *current == index {
                self.layout.set(block, slot, 0);
                return Ok(());
            }
        }
        let mut block = self.read_block(file, index)?;
        self.layout.set(&mut block, slot, 0);
        file.write_all_at(self.block_at(index), &block)
            .map_err(|e| Error::io("writing a refcount block", e))
    }
}
