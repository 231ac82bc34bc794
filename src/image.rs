//! [`Qcow2`]: an opened image, its metadata, and the sources it reads data from.

use std::hash::{BuildHasherDefault, Hasher};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use lru::LruCache;
use positioned_io::ReadAt;

use crate::bitmap::{self, Bitmap};
use crate::compress::ClusterCache;
use crate::crypt::{Encryption, Secret};
use crate::error::{Error, Result};
use crate::header::{self, Header, PROBE_LEN, TABLE_ENTRY_LEN};
use crate::io::{be_u64_table, check_within, read_metadata, read_up_to};
use crate::limits::Limits;
use crate::options::OpenOptions;
use crate::reader::Reader;
use crate::snapshot::{self, Snapshot};
use crate::table::Geometry;

/// A source of guest data that reads like a disk: a raw file, or another qcow2 image.
pub(crate) trait GuestSource: Send + Sync {
    /// Fill `buf` with guest bytes at `pos`; bytes past the end read as zeros.
    fn read_guest(&self, pos: u64, buf: &mut [u8]) -> Result<()>;
    /// Guest size in bytes.
    fn guest_size(&self) -> u64;
    /// The file it was opened from, when known.
    fn path(&self) -> Option<&std::path::Path>;
    /// The image, when this source is a qcow2 image (for the backing chain in `info`).
    fn as_image(&self) -> Option<&dyn ImageView> {
        None
    }
}

/// What [`info`](crate::info) needs of any image in a chain, whatever its source type.
pub(crate) trait ImageView: Send + Sync {
    fn header(&self) -> &Header;
    fn path(&self) -> Option<&std::path::Path>;
    fn snapshots(&self) -> &[Snapshot];
    fn bitmaps(&self) -> &[Bitmap];
    fn backing(&self) -> Option<&Backing>;
}

/// A raw backing file: any positioned source of a known length.
struct RawSource<B> {
    source: B,
    size: u64,
    path: Option<PathBuf>,
}

impl<B: ReadAt + Send + Sync> GuestSource for RawSource<B> {
    fn read_guest(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        let got = read_up_to(&self.source, pos, buf)
            .map_err(|e| Error::io(format!("reading raw backing file at {pos:#x}"), e))?;
        if let Some(rest) = buf.get_mut(got..) {
            rest.fill(0);
        }
        Ok(())
    }
    fn guest_size(&self) -> u64 {
        self.size
    }
    fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }
}

/// What unallocated clusters read from.
pub(crate) enum Backing {
    /// A raw file or another image.
    Source {
        source: Box<dyn GuestSource>,
        format: &'static str,
    },
    /// Zeros, by the caller's explicit choice.
    Zeros,
}

/// L2 tables by file offset. The keys are cluster-aligned offsets chosen by the image: a
/// multiplicative hash spreads them well and costs a fraction of SipHash on every read.
pub(crate) type L2Cache = LruCache<u64, Arc<[u64]>, BuildHasherDefault<OffsetHasher>>;

/// Fibonacci hashing of one `u64` key.
#[derive(Default)]
pub(crate) struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// An opened qcow2 image.
///
/// Opening reads and validates the header, its extensions, the active L1 table, the snapshot
/// table and the bitmap directory; [`Qcow2::reader`] then reads guest data. All readers of one
/// image share its L2 table cache, and any number of threads may read at once.
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
    pub(crate) l2_cache: Mutex<L2Cache>,
    pub(crate) compressed: ClusterCache,
    pub(crate) backing: Option<Backing>,
    pub(crate) data_file: Option<Box<dyn ReadAt + Send + Sync>>,
    pub(crate) path: Option<PathBuf>,
    pub(crate) limits: Limits,
    /// Most threads one read decompresses on.
    pub(crate) threads: usize,
    /// The encryption of an encrypted image, with its key once unlocked.
    pub(crate) crypt: Option<Encryption>,
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
        };
        check_within(
            &io,
            header.refcount_table_offset(),
            u64::from(header.refcount_table_clusters()) << header.cluster_bits(),
            "refcount table",
        )?;
        let l1 = read_l1(&io, header.l1_table_offset(), header.l1_size())?;
        let snapshots = read_snapshots(&io, &header, &limits)?;
        let bitmaps = read_bitmaps(&io, &header)?;
        let crypt = Encryption::open(&io, &header, secret, &limits)?;
        let tables = (limits.l2_cache_bytes >> header.cluster_bits()).max(1);
        let capacity = NonZeroUsize::new(usize::try_from(tables).unwrap_or(usize::MAX))
            .unwrap_or(NonZeroUsize::MIN);
        Ok(Qcow2 {
            io,
            header,
            geometry,
            l1,
            snapshots,
            bitmaps,
            l2_cache: Mutex::new(LruCache::with_hasher(capacity, Default::default())),
            compressed: ClusterCache::new(geometry.cluster_bits),
            backing: None,
            data_file: None,
            path: None,
            limits,
            threads: options
                .decompression_threads
                .unwrap_or_else(default_threads),
            crypt,
        })
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

    /// A reader of the active image.
    ///
    /// Fails with [`Error::DataFileMissing`] when the image needs an external data file that
    /// is not attached. A missing backing file is reported by the read that needs it.
    pub fn reader(&self) -> Result<Reader<'_, I>> {
        self.check_data_file()?;
        Ok(Reader::new(self, Arc::clone(&self.l1), self.guest_size()))
    }

    /// A reader of an internal snapshot, found by id or else by name (as `qemu-img` does).
    ///
    /// Its size is the snapshot's disk size; it reads what
    /// `qemu-img convert -l snapshot.name=NAME` reads.
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
        if crate::bytes::low_bits(snap.l1_table_offset, self.header.cluster_bits()) != 0 {
            return Err(Error::malformed(
                format!(
                    "snapshot {:?} L1 table offset {:#x} is not cluster aligned",
                    snap.name, snap.l1_table_offset
                ),
                self.header.snapshots_offset(),
            ));
        }
        let l1 = read_l1(&self.io, snap.l1_table_offset, snap.l1_size)?;
        Ok(Reader::new(self, l1, size))
    }

    /// Read guest data for unallocated clusters from a raw source of `size` bytes.
    /// Bytes past its end read as zeros.
    pub fn set_backing_raw<B: ReadAt + Send + Sync + 'static>(&mut self, source: B, size: u64) {
        self.set_backing_raw_from(source, size, None);
    }

    /// [`Qcow2::set_backing_raw`] for a file opened by path.
    pub(crate) fn set_backing_raw_from<B: ReadAt + Send + Sync + 'static>(
        &mut self,
        source: B,
        size: u64,
        path: Option<PathBuf>,
    ) {
        self.backing = Some(Backing::Source {
            source: Box::new(RawSource { source, size, path }),
            format: "raw",
        });
    }

    /// Read guest data for unallocated clusters from another qcow2 image (which may have its
    /// own backing image attached).
    pub fn set_backing_image<J: ReadAt + Send + Sync + 'static>(&mut self, image: Qcow2<J>) {
        self.backing = Some(Backing::Source {
            source: Box::new(image),
            format: "qcow2",
        });
    }

    /// Read unallocated clusters as zeros even though the header names a backing file.
    pub fn set_backing_zeros(&mut self) {
        self.backing = Some(Backing::Zeros);
    }

    /// Attach the external data file that holds the guest data (incompatible bit 2).
    pub fn set_data_file<D: ReadAt + Send + Sync + 'static>(&mut self, data: D) {
        self.data_file = Some(Box::new(data));
    }

    /// Whether a backing source (or explicit zeros) is attached.
    pub fn has_backing_attached(&self) -> bool {
        self.backing.is_some()
    }

    fn check_data_file(&self) -> Result<()> {
        if self.header.has_data_file_bit() && self.data_file.is_none() {
            return Err(Error::DataFileMissing {
                name: self
                    .header
                    .data_file()
                    .unwrap_or("(no name in header)")
                    .to_owned(),
            });
        }
        Ok(())
    }

    /// Where guest data clusters live: the external data file when there is one.
    pub(crate) fn data_source(&self) -> &dyn ReadAt {
        match &self.data_file {
            Some(d) => d.as_ref(),
            None => &self.io,
        }
    }
}

impl<I: ReadAt + Send + Sync> GuestSource for Qcow2<I> {
    fn read_guest(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        let reader = self.reader()?;
        let in_image = self.guest_size().saturating_sub(pos).min(buf.len() as u64) as usize;
        let (inside, past) = buf.split_at_mut(in_image);
        reader.read_guest(pos, inside)?;
        past.fill(0);
        Ok(())
    }
    fn guest_size(&self) -> u64 {
        Qcow2::guest_size(self)
    }
    fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }
    fn as_image(&self) -> Option<&dyn ImageView> {
        Some(self)
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
}

/// One decompression thread per core, up to 8.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

fn read_header<I: ReadAt>(io: &I, limits: &Limits) -> Result<Header> {
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

fn read_bitmaps<I: ReadAt>(io: &I, header: &Header) -> Result<Vec<Bitmap>> {
    let Some(ext) = header.bitmaps() else {
        return Ok(Vec::new());
    };
    let dir = read_metadata(
        io,
        ext.directory_offset,
        ext.directory_size,
        "bitmap directory",
    )?;
    bitmap::parse_directory(&dir, ext.nb_bitmaps, ext.directory_offset)
}
