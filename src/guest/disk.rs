//! [`GuestDisk`]: a guest disk as convert and compare see it, whatever its format: a qcow2
//! [`Reader`] (with its backing chain) or a [`RawDisk`].

use positioned_io::ReadAt;

use crate::base::holes::HoleQuery;
use crate::base::io::read_up_to;
use crate::base::SECTOR;
use crate::error::{Error, Result};
use crate::format::table::{remaining_in_block, ExtentKind};
use crate::guest::map;
use crate::image::open::FileId;
use crate::image::owned::OwnedReader;
use crate::image::plan::Planner;
use crate::image::qcow2::Backing;
use crate::image::reader::Reader;

/// How a stretch of a guest disk is allocated, across its whole backing chain (what QEMU's
/// block status reports above no base).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Allocation {
    /// Stored somewhere in the chain (or in a raw file): may hold any bytes, so it is read.
    Data,
    /// Stored compressed somewhere in the chain: read like data.
    Compressed,
    /// Allocated as zeros (a zero cluster, or past the end of a shorter backing file).
    Zero,
    /// Allocated nowhere in the chain: reads as zeros.
    Unallocated,
}

impl Allocation {
    /// Whether the stretch reads as zeros without being read.
    pub fn reads_as_zeros(self) -> bool {
        !matches!(self, Allocation::Data | Allocation::Compressed)
    }
}

/// QEMU's block status of a stretch of a guest disk: the flags its block layer reports
/// through the whole backing chain (`bdrv_block_status_above`), which
/// `qemu-img compare -s` compares. See [`GuestDisk::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub struct BlockStatus {
    /// `BDRV_BLOCK_DATA`: stored as data somewhere in the chain (it may still read as zeros:
    /// a hole in the file under a data cluster of a `preallocation=metadata` image).
    pub data: bool,
    /// `BDRV_BLOCK_ZERO`: reads as zeros.
    pub zero: bool,
    /// `BDRV_BLOCK_OFFSET_VALID`: where it lies in a file is known (plain data, preallocated
    /// zeros, a raw file; not compressed or encrypted data).
    pub offset_valid: bool,
    /// `BDRV_BLOCK_ALLOCATED`: some layer of the chain decides what it reads (zeros for want
    /// of any layer are not allocated).
    pub allocated: bool,
    /// `BDRV_BLOCK_EOF`: the stretch, as QEMU cuts it, reaches the end of the disk (or,
    /// unallocated everywhere, the end of the last layer asked).
    pub eof: bool,
    /// `BDRV_BLOCK_COMPRESSED`.
    pub compressed: bool,
}

impl BlockStatus {
    /// The status an [`Allocation`] implies, for disks that know no more about themselves.
    fn of(allocation: Allocation, eof: bool) -> Self {
        let data = !allocation.reads_as_zeros();
        BlockStatus {
            data,
            zero: !data,
            offset_valid: false,
            allocated: allocation != Allocation::Unallocated,
            eof,
            compressed: allocation == Allocation::Compressed,
        }
    }

    /// The allocation this status reads as.
    fn allocation(self) -> Allocation {
        match self {
            BlockStatus {
                zero: true,
                allocated: true,
                ..
            } => Allocation::Zero,
            BlockStatus { zero: true, .. } => Allocation::Unallocated,
            BlockStatus {
                compressed: true, ..
            } => Allocation::Compressed,
            _ => Allocation::Data,
        }
    }

    /// The status past the end of a layer (QEMU's `BDRV_BLOCK_EOF` with no bytes).
    fn past_end() -> Self {
        BlockStatus {
            eof: true,
            ..BlockStatus::default()
        }
    }
}

/// QEMU's qcow2 driver answers for at most `INT_MAX` bytes at once.
const QEMU_MAX_STATUS: u64 = i32::MAX as u64;

/// A guest disk that [`convert_to_writer`](crate::convert_to_writer),
/// [`convert_to_file`](crate::convert_to_file) and [`compare`](crate::jobs::compare) can read.
///
/// Implemented by [`Reader`] and [`OwnedReader`](crate::OwnedReader) (a qcow2 image's active
/// disk or snapshot, through its backing chain) and by [`RawDisk`].
///
/// ```
/// use qcow2::GuestDisk;
///
/// // Code that takes any disk, qcow2 or raw.
/// fn first_sector(disk: &impl GuestDisk) -> qcow2::Result<[u8; 512]> {
///     let mut sector = [0u8; 512];
///     disk.read_disk(0, &mut sector)?;
///     Ok(sector)
/// }
///
/// let image = qcow2::Qcow2::open_path("fixtures/chain-top.qcow2")?;
/// let raw = qcow2::RawDisk::open_path("fixtures/backing-raw-base.raw")?;
/// first_sector(&image.reader()?)?;
/// first_sector(&raw)?;
/// # Ok::<(), qcow2::Error>(())
/// ```
pub trait GuestDisk {
    /// Size of the disk in bytes.
    fn disk_size(&self) -> u64;

    /// Fill all of `buf` with the disk's bytes from `pos`; bytes past the end read as zeros.
    fn read_disk(&self, pos: u64, buf: &mut [u8]) -> Result<()>;

    /// How the disk is allocated from `pos`: the allocation and the length of the stretch
    /// (at least 1, and not past the end), or `None` at or past the end. Stretches may be
    /// cut short anywhere; callers ask again where one ends.
    fn allocation_at(&self, pos: u64) -> Result<Option<(Allocation, u64)>>;

    /// Whether reading the disk reads `file`: the same file (device and inode), under
    /// whatever name, hard link or symlink it was reached. [`convert_to_file`] refuses such an
    /// output before writing anything, since writing it would destroy the disk it copies.
    ///
    /// A [`Reader`] knows the files its image opened by path ([`Qcow2::open_path`]: the
    /// image, its data file, every backing file of the chain), and a [`RawDisk`] its file when
    /// made by [`RawDisk::open_path`] or [`RawDisk::from_file`]; files attached by the caller
    /// are not known. The default answers `false`: a wrapper around another disk should ask
    /// the disk it wraps. Always `false` on platforms without inode numbers.
    ///
    /// [`convert_to_file`]: crate::convert_to_file
    /// [`Qcow2::open_path`]: crate::Qcow2::open_path
    fn reads_file(&self, file: &std::fs::File) -> Result<bool> {
        let _ = file;
        Ok(false)
    }

    /// QEMU's block status from `pos` and the length of the stretch it covers (at least 1,
    /// not past the end), or `None` at or past the end. [`Reader`] and [`RawDisk`] cut their
    /// stretches where QEMU does, so that a strict [`compare`](crate::jobs::compare) steps through
    /// the disks, and names the offset of a difference, as `qemu-img compare -s` does. The
    /// default derives the status from [`GuestDisk::allocation_at`] (no host offsets).
    fn block_status(&self, pos: u64) -> Result<Option<(BlockStatus, u64)>> {
        let size = self.disk_size();
        let left = size.saturating_sub(pos);
        Ok(self.allocation_at(pos)?.map(|(allocation, len)| {
            let len = len.clamp(1, left.max(1));
            (BlockStatus::of(allocation, len >= left), len)
        }))
    }
}

impl<I: ReadAt> GuestDisk for Reader<'_, I> {
    fn disk_size(&self) -> u64 {
        self.guest_size()
    }

    fn read_disk(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        let inside = self.guest_size().saturating_sub(pos).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        if !head.is_empty() {
            self.read_guest(pos, head)?;
        }
        tail.fill(0);
        Ok(())
    }

    fn allocation_at(&self, pos: u64) -> Result<Option<(Allocation, u64)>> {
        self.allocation_in(pos, u64::MAX)
    }

    fn block_status(&self, pos: u64) -> Result<Option<(BlockStatus, u64)>> {
        let size = self.guest_size();
        if pos >= size {
            return Ok(None);
        }
        // QEMU's `bdrv_co_common_block_status_above` with no base: down the chain until a
        // layer has the stretch, each asked for no more than the layer above answered.
        let (mut status, mut len) = qcow2_block_status(self, pos, size.saturating_sub(pos))?;
        if status.allocated || len == 0 {
            return Ok(Some((status, len.max(1))));
        }
        let eof = status.eof.then_some(pos.saturating_add(len));
        let mut bytes = len;
        let mut below = self.image().backing_source();
        while let Some(layer) = below {
            let (found, n) = layer.block_status(pos, bytes)?;
            if n == 0 {
                // Past the end of a shorter layer: zeros, allocated there.
                status = BlockStatus {
                    zero: true,
                    allocated: true,
                    ..BlockStatus::default()
                };
                len = bytes;
                break;
            }
            (status, len) = (found, n);
            if found.allocated {
                status.eof = false; // that layer's end, not this disk's
                break;
            }
            bytes = n;
            below = layer.backing_source();
        }
        if eof == Some(pos.saturating_add(len)) {
            status.eof = true;
        }
        Ok(Some((status, len.max(1))))
    }

    fn reads_file(&self, file: &std::fs::File) -> Result<bool> {
        Ok(FileId::of_file(file)?.is_some_and(|id| self.image().reads_file(id)))
    }
}

/// An owned reader is a disk as its borrowed reader is.
impl<I: ReadAt> GuestDisk for OwnedReader<I> {
    fn disk_size(&self) -> u64 {
        self.guest_size()
    }

    fn read_disk(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        self.borrowed().read_disk(pos, buf)
    }

    fn allocation_at(&self, pos: u64) -> Result<Option<(Allocation, u64)>> {
        self.borrowed().allocation_at(pos)
    }

    fn reads_file(&self, file: &std::fs::File) -> Result<bool> {
        self.borrowed().reads_file(file)
    }

    fn block_status(&self, pos: u64) -> Result<Option<(BlockStatus, u64)>> {
        self.borrowed().block_status(pos)
    }
}

impl<I: ReadAt> Reader<'_, I> {
    /// [`GuestDisk::allocation_at`], looking no further than `max` bytes from `pos`
    /// (`max` > 0): what a caller that takes at most that much costs no more.
    pub(crate) fn allocation_in(&self, pos: u64, max: u64) -> Result<Option<(Allocation, u64)>> {
        let image = self.image();
        let limit = pos.saturating_add(max.max(1));
        let cluster_left = remaining_in_block(pos, image.geometry.cluster_bits);
        // The cluster at `pos` first: a compressed one is reported alone (as QEMU reports
        // them, so that convert's chunks, and with them its sparse decisions, fall where
        // qemu-img's do), and a data stretch only as far as a caller takes at once. Finding
        // a stretch's end costs its length, and callers step through data a chunk at a time.
        let Some(first) = self.extent_in(pos..pos.saturating_add(cluster_left).min(limit))? else {
            return Ok(None);
        };
        let extent = match first.kind {
            ExtentKind::Compressed { .. } => Some(first),
            ExtentKind::Data { .. } => {
                self.extent_in(pos..pos.saturating_add(DATA_LOOKUP).min(limit))?
            }
            _ => self.extent_in(pos..limit)?,
        };
        let extent = extent.unwrap_or(first);
        Ok(Some(match extent.kind {
            ExtentKind::Compressed { .. } => (Allocation::Compressed, extent.length),
            ExtentKind::Data { host_offset } => self.data_allocation(host_offset, extent.length),
            ExtentKind::Zero { .. } => (Allocation::Zero, extent.length),
            ExtentKind::Unallocated { .. } => match &image.backing {
                Some(Backing::Source { source, .. }) => source.allocation(pos, extent.length)?,
                Some(Backing::Zeros) => (Allocation::Unallocated, extent.length),
                // A backing file that is named but not attached: reading reports it.
                None if image.header.backing_file().is_some() => (Allocation::Data, extent.length),
                None => (Allocation::Unallocated, extent.length),
            },
        }))
    }
}

impl<I: ReadAt> Reader<'_, I> {
    /// Plain data at `host` for `len` bytes: zeros where the file has holes in an image
    /// that looks preallocated with `preallocation=metadata`, as QEMU (and the map) sees them,
    /// so they are never read.
    fn data_allocation(&self, host: u64, len: u64) -> (Allocation, u64) {
        let image = self.image();
        if image.crypt.is_some() {
            return (Allocation::Data, len); // the file holds ciphertext: QEMU does not look
        }
        match map::preallocated_holes(image, host, len) {
            Some((true, len)) => (Allocation::Zero, len),
            Some((false, len)) => (Allocation::Data, len),
            None => (Allocation::Data, len),
        }
    }
}

/// One qcow2 layer's block status, as QEMU's `bdrv_co_do_block_status` over
/// `qcow2_co_block_status` answers it, for at most `bytes` from `pos` of `reader`'s guest:
/// a run of one kind (host offsets following on) within one L2 table and `INT_MAX` bytes,
/// cut at the file's holes where QEMU looks at them (`BDRV_BLOCK_RECURSE`). Length 0 (and
/// `eof`) at or past the end of the guest.
pub(crate) fn qcow2_block_status<I: ReadAt>(
    reader: &Reader<'_, I>,
    pos: u64,
    bytes: u64,
) -> Result<(BlockStatus, u64)> {
    let size = reader.guest_size();
    if pos >= size {
        return Ok((BlockStatus::past_end(), 0));
    }
    let image = reader.image();
    let l2_bits = image.geometry.l2_bits();
    let table_end = (pos >> l2_bits).saturating_add(1) << l2_bits;
    let end = pos
        .saturating_add(bytes.min(size.saturating_sub(pos)).min(QEMU_MAX_STATUS))
        .min(table_end);
    let mut planner = Planner::new(reader);
    // From the start of a table, walk its first run whole, not just what this step takes:
    // a table found empty so is remembered (EmptyTables), and QEMU's steps of INT_MAX bytes
    // through it, and through every other L1 entry naming it, cost nothing more.
    let walk_end = match crate::base::bytes::low_bits(pos, l2_bits) {
        0 => table_end,
        _ => end,
    };
    let first = planner.segment(pos, walk_end)?;
    let kind = first.kind;
    let compressed = matches!(kind, ExtentKind::Compressed { .. });
    let mut stop = pos.saturating_add(first.length).min(end);
    // The planner cuts runs of many units short; QEMU does not.
    while !compressed && stop < end {
        let next = planner.segment(stop, end)?;
        if next.length == 0 || !kind.continued_by(next.kind, stop.saturating_sub(pos)) {
            break;
        }
        stop = stop.saturating_add(next.length);
    }
    let mut len = stop.saturating_sub(pos).max(1);
    // QEMU gives no offset for encrypted data, nor for compressed data.
    let offset = kind.host_offset().filter(|_| image.crypt.is_none());
    let data = kind.is_data();
    let mut zero = matches!(kind, ExtentKind::Zero { .. });
    let allocated = data || zero;
    if !allocated {
        zero = map::unallocated_reads_zero(image, pos)?;
    }
    if let (true, false, Some(host)) = (data, compressed, offset) {
        if let Some((holes, run)) = map::preallocated_holes(image, host, len) {
            zero |= holes;
            len = run;
        }
    }
    let status = BlockStatus {
        data,
        zero,
        offset_valid: offset.is_some(),
        allocated,
        eof: pos.saturating_add(len) >= size,
        compressed,
    };
    Ok((status, len))
}

/// A raw file's block status (QEMU's raw format over `file-posix`): data or a hole, as the
/// file system says, for at most `bytes` from `pos` of a file QEMU counts as `size` bytes.
/// Length 0 (and `eof`) at or past the end.
pub(crate) fn raw_block_status(
    holes: Option<&dyn HoleQuery>,
    size: u64,
    pos: u64,
    bytes: u64,
) -> (BlockStatus, u64) {
    if pos >= size || bytes == 0 {
        return (BlockStatus::past_end(), 0);
    }
    let layer = map::raw_layer_status(holes, size, None, pos, bytes.min(size.saturating_sub(pos)));
    let len = layer.len.max(1);
    let status = BlockStatus {
        data: layer.data,
        zero: layer.zero,
        offset_valid: true,
        allocated: true,
        eof: pos.saturating_add(len) >= size,
        compressed: false,
    };
    (status, len)
}

/// The allocation a raw layer's status reads as, with its length.
pub(crate) fn raw_allocation(
    holes: Option<&dyn HoleQuery>,
    size: u64,
    pos: u64,
    max: u64,
) -> (Allocation, u64) {
    match raw_block_status(holes, size, pos, max) {
        // Past its end the guest reads zeros, which QEMU counts as allocated zeros.
        (_, 0) => (Allocation::Zero, max),
        (status, len) => (status.allocation(), len),
    }
}

/// How far [`GuestDisk::allocation_at`] of a [`Reader`] looks into a data stretch: a multiple
/// of convert's 2 MiB chunks, so that its chunks fall where they would were the whole stretch
/// reported.
const DATA_LOOKUP: u64 = 8 << 20;

/// The allocation of `disk` (a backing image) from `pos`, at most `max` bytes long
/// (`max` > 0). Past the end of a shorter backing image the guest reads zeros, which QEMU
/// counts as allocated zeros.
pub(crate) fn backing_allocation<I: ReadAt>(
    source: &Reader<'_, I>,
    pos: u64,
    max: u64,
) -> Result<(Allocation, u64)> {
    match source.allocation_in(pos, max)? {
        Some((allocation, len)) => Ok((allocation, len.clamp(1, max))),
        None => Ok((Allocation::Zero, max)),
    }
}

/// A raw disk image: any [`ReadAt`] source, with the size given.
///
/// Reads past the end of the source (up to `size`) are zeros. The source's bytes count as
/// [`Allocation::Data`], and what lies past its end as [`Allocation::Zero`]; holes in the
/// file, when known ([`RawDisk::open_path`] asks the file system, as QEMU does, or see
/// [`RawDisk::with_hole_query`]), count as [`Allocation::Zero`] and are never read.
///
/// ```
/// let raw = qcow2::RawDisk::open_path("fixtures/backing-raw-base.raw")?;
/// let image = qcow2::Qcow2::open_path("fixtures/overlay-raw.qcow2")?;
/// let overlay = image.reader()?;
/// let result = qcow2::compare(&raw, &overlay, &qcow2::CompareOptions::new())?;
/// assert!(matches!(result, qcow2::Comparison::Differ { .. }));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct RawDisk<R> {
    source: R,
    size: u64,
    /// Where the source's own bytes end (at most `size`).
    data_len: u64,
    /// The file's identity, when made from a file.
    id: Option<FileId>,
    /// Where the file has holes, when known.
    holes: Option<Box<dyn HoleQuery>>,
}

impl<R: std::fmt::Debug> std::fmt::Debug for RawDisk<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawDisk")
            .field("source", &self.source)
            .field("size", &self.size)
            .field("data_len", &self.data_len)
            .field("holes_known", &self.holes.is_some())
            .finish()
    }
}

impl<R: ReadAt> RawDisk<R> {
    /// A raw disk of `size` bytes read from `source`.
    ///
    /// ```
    /// use qcow2::GuestDisk;
    ///
    /// let raw = qcow2::RawDisk::new(vec![1u8; 4096], 4096); // any ReadAt: a Vec, a File
    /// let mut buf = [0u8; 8];
    /// raw.read_disk(4088, &mut buf)?;
    /// assert_eq!(buf, [1; 8]);
    /// assert_eq!(raw.disk_size(), 4096);
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn new(source: R, size: u64) -> Self {
        RawDisk {
            source,
            size,
            data_len: size,
            id: None,
            holes: None,
        }
    }

    /// The source.
    pub fn get_ref(&self) -> &R {
        &self.source
    }

    /// Find the source's holes with `holes` (a handle to the same file): they read as
    /// zeros without being read, as QEMU's block status reports them.
    #[must_use]
    pub fn with_hole_query<H: HoleQuery + 'static>(mut self, holes: H) -> Self {
        self.holes = Some(Box::new(holes));
        self
    }

    /// The source, back.
    pub fn into_inner(self) -> R {
        self.source
    }
}

impl RawDisk<std::fs::File> {
    /// Open a raw file as QEMU does: its size rounded up to whole 512-byte sectors, the
    /// partial last sector reading as zeros past the end of the file, its holes (as the file
    /// system reports them) reading as zeros.
    ///
    /// The file is opened as [`open_file`](crate::open_file) opens it, with default options:
    /// a FIFO, socket, directory or device is an [`Error::NotRegularFile`] at once, never a
    /// blocked open. To read a block device, open it with
    /// [`OpenOptions::allow_devices`](crate::OpenOptions::allow_devices) and use
    /// [`RawDisk::from_file`].
    ///
    /// ```
    /// let raw = qcow2::RawDisk::open_path("fixtures/backing-raw-base.raw")?;
    /// let image = qcow2::Qcow2::open_path("fixtures/overlay-raw.qcow2")?;
    /// // The overlay over its raw backing file, against the raw file alone.
    /// let outcome = qcow2::compare(&image.reader()?, &raw, &qcow2::CompareOptions::new())?;
    /// # let _ = outcome;
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn open_path(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = crate::image::open::checked_open(path, "raw disk", false)?;
        Self::sized(file, &path.display().to_string())
    }

    /// A raw disk read from an opened file (a regular file or a block device), sized as
    /// [`RawDisk::open_path`] sizes it.
    ///
    /// ```
    /// let options = qcow2::OpenOptions::new();
    /// let file = qcow2::open_file("fixtures/backing-raw-base.raw", &options)?;
    /// let raw = qcow2::RawDisk::from_file(file)?;
    /// assert_eq!(qcow2::GuestDisk::disk_size(&raw) % 512, 0);
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn from_file(file: std::fs::File) -> Result<Self> {
        Self::sized(file, "the raw disk")
    }

    fn sized(file: std::fs::File, name: &str) -> Result<Self> {
        let len = crate::image::open::disk_len(&file)
            .map_err(|e| Error::io(format!("reading the size of {name}"), e))?;
        let id = FileId::of_file(&file)?;
        // Without a second handle the holes are unknown: all data, as QEMU when lseek fails.
        let holes = file
            .try_clone()
            .ok()
            .map(|f| Box::new(f) as Box<dyn HoleQuery>);
        Ok(RawDisk {
            source: file,
            size: len.checked_next_multiple_of(SECTOR).unwrap_or(len),
            data_len: len,
            id,
            holes,
        })
    }
}

impl<R: ReadAt> GuestDisk for RawDisk<R> {
    fn disk_size(&self) -> u64 {
        self.size
    }

    fn read_disk(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        let inside = self.size.saturating_sub(pos).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        let got = read_up_to(&self.source, pos, head)
            .map_err(|e| Error::io(format!("reading raw disk at {pos:#x}"), e))?;
        head.get_mut(got..).unwrap_or_default().fill(0);
        tail.fill(0);
        Ok(())
    }

    fn allocation_at(&self, pos: u64) -> Result<Option<(Allocation, u64)>> {
        if pos >= self.size {
            return Ok(None);
        }
        let left = self.size.saturating_sub(pos);
        Ok(Some(
            match self.data_len.checked_sub(pos).filter(|&n| n > 0) {
                Some(n) if self.holes.is_none() => (Allocation::Data, n),
                Some(_) => raw_allocation(self.holes.as_deref(), self.size, pos, left),
                None => (Allocation::Zero, left),
            },
        ))
    }

    fn reads_file(&self, file: &std::fs::File) -> Result<bool> {
        Ok(self.id.is_some() && FileId::of_file(file)? == self.id)
    }

    fn block_status(&self, pos: u64) -> Result<Option<(BlockStatus, u64)>> {
        if pos >= self.size {
            return Ok(None);
        }
        let left = self.size.saturating_sub(pos);
        Ok(Some(match self.holes.as_deref() {
            Some(holes) => raw_block_status(Some(holes), self.size, pos, left),
            // Without holes: data up to the end of the source, zeros past it.
            None => {
                let (allocation, len) = match self.data_len.checked_sub(pos).filter(|&n| n > 0) {
                    Some(n) => (Allocation::Data, n),
                    None => (Allocation::Zero, left),
                };
                let mut status = BlockStatus::of(allocation, len >= left);
                status.offset_valid = true;
                (status, len)
            }
        }))
    }
}
