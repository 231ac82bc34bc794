//! [`GuestDisk`]: a guest disk as convert and compare see it, whatever its format: a qcow2
//! [`Reader`] (with its backing chain) or a [`RawDisk`].

use positioned_io::ReadAt;

use crate::base::holes::HoleQuery;
use crate::base::io::read_up_to;
use crate::base::SECTOR;
use crate::error::{Error, Result};
use crate::format::table::remaining_in_block;
use crate::guest::chain;
use crate::image::layer::raw_layer_extent;
use crate::image::open::FileId;
use crate::image::owned::OwnedReader;
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
    pub(crate) fn allocation(self) -> Allocation {
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

/// A guest disk that [`convert_to_writer`](crate::convert_to_writer),
/// [`convert_to_file`](crate::convert_to_file) and [`compare`](crate::compare()) can read.
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
    /// stretches where QEMU does, so that a strict [`compare`](crate::compare()) steps through
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
        let chain = chain::walk(self, pos, size.saturating_sub(pos))?;
        let len = chain.layer.extent.length.max(1);
        Ok(Some((chain::block_status(&chain), len)))
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
        let size = self.guest_size();
        if pos >= size {
            return Ok(None);
        }
        let limit = pos.saturating_add(max.max(1)).min(size);
        let cluster_left = remaining_in_block(pos, self.image().geometry.cluster_bits);
        // The cluster at `pos` first: a compressed one is reported alone (as QEMU reports
        // them, so that convert's chunks, and with them its sparse decisions, fall where
        // qemu-img's do), and a data stretch only as far as a caller takes at once. Finding
        // a stretch's end costs its length, and callers step through data a chunk at a time.
        let first = chain::walk(self, pos, cluster_left.min(limit.saturating_sub(pos)))?;
        let allocation = chain::allocation(&first);
        let reach = match allocation {
            Allocation::Compressed => return Ok(Some((allocation, first.layer.extent.length))),
            Allocation::Data => pos.saturating_add(DATA_LOOKUP).min(limit),
            _ => limit,
        };
        let mut end = pos.saturating_add(first.layer.extent.length);
        for _ in 1..MAX_ANSWERS_PER_LOOKUP {
            if end >= reach {
                break;
            }
            // An error is reported by the lookup that starts there.
            let Ok(next) = chain::walk(self, end, reach.saturating_sub(end)) else {
                break;
            };
            if !chain::continued_by(&first, &next, end.saturating_sub(pos)) {
                break;
            }
            end = end.saturating_add(next.layer.extent.length);
        }
        Ok(Some((allocation, end.saturating_sub(pos))))
    }
}

/// A raw file's block status (QEMU's raw format over `file-posix`): data or a hole, as the
/// file system says, for at most `bytes` from `pos` of a file QEMU counts as `size` bytes.
/// Length 0 (and `eof`) at or past the end.
fn raw_block_status(
    holes: Option<&dyn HoleQuery>,
    size: u64,
    pos: u64,
    bytes: u64,
) -> (BlockStatus, u64) {
    if pos >= size || bytes == 0 {
        return (BlockStatus::past_end(), 0);
    }
    let layer = raw_layer_extent(holes, size, None, pos, bytes.min(size.saturating_sub(pos)));
    let len = layer.extent.length.max(1);
    (chain::block_status(&chain::alone(layer)), len)
}

/// How far [`GuestDisk::allocation_at`] of a [`Reader`] looks into a data stretch: a multiple
/// of convert's 2 MiB chunks, so that its chunks fall where they would were the whole stretch
/// reported.
const DATA_LOOKUP: u64 = 8 << 20;

/// Most answers of the chain one allocation lookup joins, so that every lookup is bounded
/// whatever the image holds; the stretch returned is then cut short there.
const MAX_ANSWERS_PER_LOOKUP: u32 = 1 << 12;

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
                Some(_) => {
                    let (status, len) =
                        raw_block_status(self.holes.as_deref(), self.size, pos, left);
                    (status.allocation(), len)
                }
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
