//! [`Qcow2`]: an opened image, its metadata, and the sources it reads data from.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use positioned_io::ReadAt;

use crate::base::cache::new_image_id;
use crate::base::holes::HoleQuery;
use crate::base::io::{be_u64_table, check_within, read_metadata, read_up_to};
use crate::base::limits::Limits;
use crate::base::pool::Pool;
use crate::crypt::{Encryption, Secret};
use crate::error::{Error, Result};
use crate::format::bitmap::Bitmap;
use crate::format::compress::ClusterCache;
use crate::format::header::{self, Header, PROBE_LEN, TABLE_ENTRY_LEN};
use crate::format::snapshot::{self, Snapshot};
use crate::format::table::Geometry;
use crate::image::layer::{Layer, RawSource};
use crate::image::open::FileId;
use crate::image::options::OpenOptions;
use crate::image::plan::L2Cache;
use crate::image::reader::{ReadState, Reader};

/// What `info` needs of any image in a chain, whatever its source type.
pub(crate) trait ImageView: Send + Sync {
    fn header(&self) -> &Header;
    fn path(&self) -> Option<&std::path::Path>;
    fn snapshots(&self) -> &[Snapshot];
    fn bitmaps(&self) -> &[Bitmap];
    fn backing(&self) -> Option<&Backing>;
    /// The encryption, for encrypted images.
    fn encryption(&self) -> Option<&crate::EncryptionInfo>;
    /// The caches this image uses (tests check that a chain shares them).
    #[cfg(test)]
    fn cache_ids(&self) -> (usize, usize);
    /// The worker pool this image uses (tests check that a chain shares it).
    #[cfg(test)]
    fn pool_id(&self) -> usize;
}

/// What unallocated clusters read from.
pub(crate) enum Backing {
    /// A raw file or another image.
    Source {
        source: Box<dyn Layer>,
        format: &'static str,
    },
    /// Zeros, by the caller's explicit choice.
    Zeros,
}

/// An opened qcow2 image.
///
/// Opening reads and validates the header, its extensions, the active L1 table, the snapshot
/// table and the bitmap directory; [`Qcow2::reader`] then reads guest data. All readers of one
/// image share its L2 table cache, and any number of threads may read at once. Readers are
/// cheap: give each thread its own (a reader shared by threads works too, but its threads
/// then contend for what it remembers between reads).
///
/// ```
/// use positioned_io::ReadAt;
///
/// let file = std::fs::File::open("fixtures/v3-64k-basic.qcow2")?;
/// let image = qcow2::Qcow2::open(file)?;
/// assert_eq!(image.cluster_size(), 65536);
/// let reader = image.reader()?;
/// let mut sector = [0u8; 512];
/// reader.read_exact_at(0, &mut sector)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Qcow2<I> {
    pub(crate) io: I,
    pub(crate) header: Header,
    pub(crate) geometry: Geometry,
    pub(crate) l1: Arc<[u64]>,
    pub(crate) snapshots: Vec<Snapshot>,
    pub(crate) bitmaps: Vec<Bitmap>,
    /// This image's key in the caches it shares with the rest of its backing chain.
    pub(crate) id: u64,
    pub(crate) l2_cache: Arc<Mutex<L2Cache>>,
    /// The read state of the reads an overlay makes through this image (its backing file):
    /// kept across them, so sequential reads through an overlay read ahead.
    pub(crate) chain_state: ReadState,
    pub(crate) compressed: Arc<ClusterCache>,
    pub(crate) backing: Option<Backing>,
    pub(crate) data_file: Option<Box<dyn ReadAt + Send + Sync>>,
    /// The external data file, writable: an image opened by path for writing.
    pub(crate) data_storage: Option<Box<dyn crate::base::io::Storage>>,
    pub(crate) path: Option<PathBuf>,
    pub(crate) limits: Limits,
    /// Where the image file has holes, for the map.
    pub(crate) holes: Option<Box<dyn HoleQuery>>,
    /// The external data file's name and holes, when opened by path.
    pub(crate) data_file_path: Option<PathBuf>,
    pub(crate) data_file_holes: Option<Box<dyn HoleQuery>>,
    /// The files this image reads itself (the image file, its data file), when opened by
    /// path: a conversion refuses to write over any file of the chain.
    pub(crate) files: Vec<FileId>,
    /// Whether the image looks preallocated with `preallocation=metadata` (asked once).
    pub(crate) metadata_preallocated: OnceLock<bool>,
    /// The encryption of an encrypted image, with its key once unlocked.
    pub(crate) crypt: Option<Encryption>,
    /// Worker threads (`OpenOptions::threads` of them, started on first use), shared by the
    /// chain: decompression, decryption and parallel reads run there.
    pub(crate) pool: Arc<Pool>,
    /// Opened with [`OpenOptions::write`]: [`Qcow2::into_writer`] may write it.
    pub(crate) writable: bool,
}

impl<I: ReadAt> Qcow2<I> {
    /// Open an image with default [`Limits`]. No other file is opened: attach a backing
    /// image or data file yourself, or use [`Qcow2::open_path`].
    pub fn open(io: I) -> Result<Self> {
        Self::open_with(io, &OpenOptions::default())
    }

    /// Open an image with the given options (`open` never opens files, so the file policy
    /// does not apply). An encrypted image is unlocked with `options.secret`.
    pub fn open_with(io: I, options: &OpenOptions) -> Result<Self> {
        Self::open_with_secret(io, options, options.secret.as_ref())
    }

    /// [`Qcow2::open_with`] with the secret chosen for this file.
    pub(crate) fn open_with_secret(
        io: I,
        options: &OpenOptions,
        secret: Option<&Secret>,
    ) -> Result<Self> {
        let limits = options.limits.clone();
        let header = read_header(&io, &limits)?;
        let geometry = Geometry {
            cluster_bits: header.cluster_bits(),
            index_bits: header.l2_entries().trailing_zeros(),
            extended_l2: header.has_extended_l2(),
            external_data: header.has_data_file_bit(),
            pre_v3: header.version() < 3,
        };
        check_within(
            &io,
            header.refcount_table_offset(),
            u64::from(header.refcount_table_clusters()) << header.cluster_bits(),
            "refcount table",
        )?;
        let l1 = read_l1(&io, header.l1_table_offset(), header.l1_size())?;
        let snapshots = read_snapshots(&io, &header, &limits)?;
        let bitmaps =
            crate::image::dirty::read_bitmaps(&io, &header, header.size() & !511, &limits)?;
        let crypt = Encryption::open(&io, &header, secret, &limits, &options.kdf_budget())?;
        let threads = options.threads.unwrap_or_else(default_threads);
        let mut image = Qcow2 {
            io,
            header,
            geometry,
            l1,
            snapshots,
            bitmaps,
            id: new_image_id(),
            l2_cache: Arc::new(Mutex::new(L2Cache::new(limits.l2_cache_bytes))),
            chain_state: ReadState::new(),
            compressed: Arc::new(ClusterCache::new()),
            backing: None,
            data_file: None,
            data_storage: None,
            path: None,
            limits,
            holes: None,
            data_file_path: None,
            data_file_holes: None,
            files: Vec::new(),
            metadata_preallocated: OnceLock::new(),
            crypt,
            pool: Arc::new(Pool::new(threads)),
            writable: options.write,
        };
        if options.backing_as_zeros && image.header.backing_file().is_some() {
            image.set_backing_zeros();
        }
        Ok(image)
    }

    /// Read the header, the active L1 table, the snapshots and the bitmaps again, with fresh
    /// caches: the image as a writer left it.
    pub(crate) fn reload(&mut self) -> Result<()> {
        let header = read_header(&self.io, &self.limits)?;
        self.l1 = read_l1(&self.io, header.l1_table_offset(), header.l1_size())?;
        self.snapshots = read_snapshots(&self.io, &header, &self.limits)?;
        self.bitmaps = crate::image::dirty::read_bitmaps(
            &self.io,
            &header,
            header.size() & !511,
            &self.limits,
        )?;
        self.header = header;
        self.id = new_image_id();
        self.l2_cache = Arc::new(Mutex::new(L2Cache::new(self.limits.l2_cache_bytes)));
        self.chain_state = ReadState::new();
        self.compressed = Arc::new(ClusterCache::new());
        self.metadata_preallocated = OnceLock::new();
        if let Some(Backing::Source { source, .. }) = self.backing.as_mut() {
            source.share_caches(&self.l2_cache, &self.compressed);
        }
        Ok(())
    }

    /// The parsed header, with its extensions and feature names.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// Virtual disk size in bytes: the header's size rounded down to a 512-byte sector, as
    /// QEMU counts it (qemu-img itself only writes multiples of 512).
    pub fn guest_size(&self) -> u64 {
        self.header.size() & !511
    }

    /// The internal snapshots, in table order.
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// The persistent dirty bitmaps, by name (empty unless the bitmaps extension is valid).
    pub fn bitmaps(&self) -> &[Bitmap] {
        &self.bitmaps
    }

    /// The path this image was opened from, when opened with [`Qcow2::open_path`].
    pub fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }

    /// The limits this image was opened with.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A reader of the active image. It borrows the image: [`Qcow2::into_reader`] gives one
    /// that owns it.
    ///
    /// Fails with [`Error::DataFileMissing`] when the image needs an external data file that
    /// is not attached. A missing backing file is reported ([`Error::BackingMissing`]) by the
    /// read, map, allocation or block status that needs it.
    pub fn reader(&self) -> Result<Reader<'_, I>> {
        self.check_data_file()?;
        Ok(Reader::new(
            self,
            Arc::clone(&self.l1),
            self.header.l1_table_offset(),
            self.guest_size(),
        ))
    }

    /// A reader of an internal snapshot, found by id or else by name (as `qemu-img` does).
    ///
    /// Its size is the snapshot's disk size; it reads what
    /// `qemu-img convert -l snapshot.name=NAME` reads. It borrows the image:
    /// [`Qcow2::into_snapshot_reader`] gives one that owns it.
    pub fn snapshot_reader(&self, id_or_name: &str) -> Result<Reader<'_, I>> {
        self.check_data_file()?;
        let snap = self
            .snapshots
            .iter()
            .find(|s| s.id == id_or_name)
            .or_else(|| self.snapshots.iter().find(|s| s.name == id_or_name))
            .ok_or_else(|| Error::NoSuchSnapshot(id_or_name.to_owned()))?;
        let size = snap.disk_size.unwrap_or(self.guest_size());
        if size > i64::MAX as u64 {
            return Err(Error::malformed(
                format!("snapshot {:?} disk size {size:#x} is too big", snap.name),
                self.header.snapshots_offset(),
            ));
        }
        Limits::check(
            "snapshot L1 table",
            u64::from(snap.l1_size).saturating_mul(TABLE_ENTRY_LEN),
            self.limits.max_l1_bytes,
        )?;
        if crate::base::bytes::low_bits(snap.l1_table_offset, self.header.cluster_bits()) != 0 {
            return Err(Error::malformed(
                format!(
                    "snapshot {:?} L1 table offset {:#x} is not cluster aligned",
                    snap.name, snap.l1_table_offset
                ),
                self.header.snapshots_offset(),
            ));
        }
        let l1 = read_l1(&self.io, snap.l1_table_offset, snap.l1_size)?;
        Ok(Reader::new(self, l1, snap.l1_table_offset, size))
    }

    /// Read guest data for unallocated clusters from a raw source of `size` bytes.
    /// Bytes past its end read as zeros.
    pub fn set_backing_raw<B: ReadAt + Send + Sync + 'static>(&mut self, source: B, size: u64) {
        self.set_backing_raw_from(source, size, None, None, None);
    }

    /// [`Qcow2::set_backing_raw`] for a file opened by path, with its holes for the map.
    pub(crate) fn set_backing_raw_from<B: ReadAt + Send + Sync + 'static>(
        &mut self,
        source: B,
        size: u64,
        path: Option<PathBuf>,
        holes: Option<Box<dyn HoleQuery>>,
        id: Option<FileId>,
    ) {
        self.backing = Some(Backing::Source {
            source: Box::new(RawSource {
                source,
                size,
                path,
                holes,
                id,
            }),
            format: "raw",
        });
    }

    /// How to find the holes of the image file, for [`Reader::map`] (which, like
    /// `qemu-img map`, reports data clusters of a `preallocation=metadata` image that are
    /// holes in the file as zeros). [`Qcow2::open_path`] attaches one for every file it
    /// opens; after [`Qcow2::open`] on a file, attach a handle to the same file:
    ///
    /// ```
    /// let file = std::fs::File::open("fixtures/prealloc-metadata.qcow2")?;
    /// let mut image = qcow2::Qcow2::open(file.try_clone()?)?;
    /// image.set_hole_query(file);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_hole_query<H: HoleQuery + 'static>(&mut self, holes: H) {
        self.holes = Some(Box::new(holes));
        self.metadata_preallocated = OnceLock::new();
    }

    /// The layer below this image, when a backing image or raw file is attached.
    pub(crate) fn backing_source(&self) -> Option<&dyn Layer> {
        match &self.backing {
            Some(Backing::Source { source, .. }) => Some(source.as_ref()),
            _ => None,
        }
    }

    /// The file guest data lives in: the external data file when there is one.
    pub(crate) fn data_path(&self) -> Option<&std::path::Path> {
        if self.header.has_data_file_bit() {
            self.data_file_path.as_deref()
        } else {
            self.path.as_deref()
        }
    }

    /// The holes of the file guest data lives in, when known.
    pub(crate) fn data_holes(&self) -> Option<&dyn HoleQuery> {
        if self.header.has_data_file_bit() {
            self.data_file_holes.as_deref()
        } else {
            self.holes.as_deref()
        }
    }

    /// Whether QEMU would look for holes inside this image's data clusters.
    pub(crate) fn metadata_preallocated(&self) -> bool {
        *self.metadata_preallocated.get_or_init(|| {
            self.holes.as_deref().is_some_and(|holes| {
                crate::image::prealloc::looks_metadata_preallocated(&self.io, &self.header, holes)
            })
        })
    }

    /// Read guest data for unallocated clusters from another qcow2 image (which may have its
    /// own backing image attached).
    ///
    /// The backing image then shares this image's caches, so the memory bounds of
    /// [`Limits`] hold for the whole chain.
    pub fn set_backing_image<J: ReadAt + Send + Sync + 'static>(&mut self, mut image: Qcow2<J>) {
        image.share_caches(&self.l2_cache, &self.compressed);
        image.share_pool(&self.pool);
        self.backing = Some(Backing::Source {
            source: Box::new(image),
            format: "qcow2",
        });
    }

    /// Read unallocated clusters as zeros even though the header names a backing file.
    pub fn set_backing_zeros(&mut self) {
        self.backing = Some(Backing::Zeros);
    }

    /// Attach a writable external data file (incompatible bit 2): read by the image's
    /// readers and written by its [`Writer`](crate::Writer) (an image opened by path for
    /// writing has its data file opened so already).
    pub fn set_data_storage<S: crate::base::io::Storage + 'static>(
        &mut self,
        data: S,
    ) -> Result<()> {
        if !self.header.has_data_file_bit() {
            return Err(Error::DataFileNotUsed);
        }
        let shared = Arc::new(data);
        self.data_file = Some(Box::new(crate::base::io::Shared(Arc::clone(&shared))));
        self.data_storage = Some(Box::new(crate::base::io::Shared(shared)));
        Ok(())
    }

    /// Attach the external data file that holds the guest data (incompatible bit 2).
    ///
    /// Fails, as QEMU does, for an image without that bit: its data is in the image itself,
    /// whatever data-file name its header may record.
    pub fn set_data_file<D: ReadAt + Send + Sync + 'static>(&mut self, data: D) -> Result<()> {
        if !self.header.has_data_file_bit() {
            return Err(Error::DataFileNotUsed);
        }
        self.data_file = Some(Box::new(data));
        Ok(())
    }

    /// Whether reading this image reads the file `id`: the image file, its data file, or a
    /// file of its backing chain (those opened by path; files attached by the caller are not
    /// known).
    pub(crate) fn reads_file(&self, id: FileId) -> bool {
        self.files.contains(&id) || self.backing_source().is_some_and(|b| b.reads_file(id))
    }

    /// The source the image is read from (the image file, for an image opened by path).
    ///
    /// ```
    /// let image = qcow2::Qcow2::open_path("fixtures/v3-64k-basic.qcow2")?;
    /// let file: &std::fs::File = image.get_ref();
    /// assert!(file.metadata()?.len() > 0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// Whether a backing source (or explicit zeros) is attached.
    pub fn has_backing_attached(&self) -> bool {
        self.backing.is_some()
    }

    pub(crate) fn check_data_file(&self) -> Result<()> {
        if self.header.has_data_file_bit() && self.data_file.is_none() {
            return Err(Error::DataFileMissing {
                name: self
                    .header
                    .external_data_file()
                    .map_or_else(|| "(no name in header)".into(), |p| p.display().to_string()),
            });
        }
        Ok(())
    }

    /// Where guest data clusters live: the external data file when there is one.
    pub(crate) fn data_source(&self) -> &dyn ReadAt {
        match &self.data_file {
            Some(d) if self.header.has_data_file_bit() => d.as_ref(),
            _ => &self.io,
        }
    }
}

impl<I> Qcow2<I> {
    /// The image's encryption, as `qemu-img info` reports it; `None` when not encrypted.
    pub fn encryption(&self) -> Option<&crate::EncryptionInfo> {
        self.crypt.as_ref().map(|c| &c.info)
    }

    /// Whether guest data can be read: the image is not encrypted, or a secret unlocked it.
    pub fn is_unlocked(&self) -> bool {
        self.crypt
            .as_ref()
            .is_none_or(|c| c.check_unlocked().is_ok())
    }
}

impl<I> std::fmt::Debug for Qcow2<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2")
            .field("path", &self.path)
            .field("version", &self.header.version())
            .field("cluster_size", &self.header.cluster_size())
            .field("guest_size", &(self.header.size() & !511))
            .field("backing_file", &self.header.backing_file())
            .field("backing_attached", &self.backing.is_some())
            .field("data_file_attached", &self.data_file.is_some())
            .finish_non_exhaustive()
    }
}

impl<I> Qcow2<I> {
    /// Use `l2` and `compressed` from now on, down the whole backing chain.
    pub(crate) fn share_caches(
        &mut self,
        l2: &Arc<Mutex<L2Cache>>,
        compressed: &Arc<ClusterCache>,
    ) {
        self.l2_cache = Arc::clone(l2);
        self.compressed = Arc::clone(compressed);
        if let Some(Backing::Source { source, .. }) = &mut self.backing {
            source.share_caches(l2, compressed);
        }
    }

    /// Use `pool` from now on, down the whole backing chain.
    pub(crate) fn share_pool(&mut self, pool: &Arc<Pool>) {
        self.pool = Arc::clone(pool);
        if let Some(Backing::Source { source, .. }) = &mut self.backing {
            source.share_pool(pool);
        }
    }
}

impl<I: ReadAt + Send + Sync> ImageView for Qcow2<I> {
    fn header(&self) -> &Header {
        &self.header
    }
    fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }
    fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }
    fn bitmaps(&self) -> &[Bitmap] {
        &self.bitmaps
    }
    fn backing(&self) -> Option<&Backing> {
        self.backing.as_ref()
    }
    fn encryption(&self) -> Option<&crate::EncryptionInfo> {
        Qcow2::encryption(self)
    }
    #[cfg(test)]
    fn cache_ids(&self) -> (usize, usize) {
        (
            Arc::as_ptr(&self.l2_cache) as usize,
            Arc::as_ptr(&self.compressed) as usize,
        )
    }
    #[cfg(test)]
    fn pool_id(&self) -> usize {
        Arc::as_ptr(&self.pool) as usize
    }
}

/// One thread per core, up to 8: an image's pool, and a conversion's reading threads.
pub(crate) fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

pub(crate) fn read_header<I: ReadAt>(io: &I, limits: &Limits) -> Result<Header> {
    let mut probe = [0u8; PROBE_LEN];
    let got = read_up_to(io, 0, &mut probe).map_err(|e| Error::io("reading the header", e))?;
    let cluster_bits = header::probe_cluster_bits(probe.get(..got).unwrap_or_default())?;
    let cluster0 = read_prefix(io, 1u64 << cluster_bits)?;
    Header::parse(&cluster0, limits)
}

/// The first `len` bytes of the file, or all of it when shorter.
fn read_prefix<I: ReadAt>(io: &I, len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize]; // len is a cluster size: at most 2 MiB
    let got = read_up_to(io, 0, &mut buf).map_err(|e| Error::io("reading the first cluster", e))?;
    buf.truncate(got);
    Ok(buf)
}

pub(crate) fn read_l1<I: ReadAt + ?Sized>(io: &I, offset: u64, entries: u32) -> Result<Arc<[u64]>> {
    if entries == 0 {
        return Ok(Arc::from(Vec::new()));
    }
    let bytes = read_metadata(
        io,
        offset,
        u64::from(entries).saturating_mul(TABLE_ENTRY_LEN),
        "L1 table",
    )?;
    Ok(be_u64_table(&bytes))
}

fn read_snapshots<I: ReadAt>(io: &I, header: &Header, limits: &Limits) -> Result<Vec<Snapshot>> {
    let mut snapshots = Vec::new();
    let mut offset = header.snapshots_offset();
    let mut total = 0u64;
    for _ in 0..header.nb_snapshots() {
        let fixed = read_metadata(
            io,
            offset,
            header::SNAPSHOT_HEADER_LEN,
            "snapshot table entry",
        )?;
        let (len, padded) = snapshot::entry_len(&fixed, offset, limits)?;
        total = total.saturating_add(padded);
        Limits::check("snapshot table", total, limits.max_snapshot_table_bytes)?;
        let entry = read_metadata(io, offset, len, "snapshot table entry")?;
        snapshots.push(snapshot::parse_entry(&entry, offset)?);
        offset = offset
            .checked_add(padded)
            .ok_or_else(|| Error::malformed("snapshot table offset overflows", offset))?;
    }
    Ok(snapshots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backing_chain_shares_one_set_of_caches() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/chain-top.qcow2");
        let top = Qcow2::open_path(path).unwrap();
        let mut depth = 0;
        let mut view: &dyn ImageView = &top;
        while let Some(Backing::Source { source, .. }) = view.backing() {
            let Some(below) = source.as_image() else {
                break;
            };
            assert_eq!(below.cache_ids(), top.cache_ids(), "layer {depth}");
            assert_eq!(below.pool_id(), top.pool_id(), "pool of layer {depth}");
            view = below;
            depth += 1;
        }
        assert!(depth >= 2, "chain-top has a chain below it ({depth})");
        assert!(!top.pool.started(), "opening a chain starts no thread");
    }
}
