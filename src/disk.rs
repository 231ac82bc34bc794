//! [`GuestDisk`]: a guest disk as convert and compare see it, whatever its format: a qcow2
//! [`Reader`] (with its backing chain) or a [`RawDisk`].

use positioned_io::ReadAt;

use crate::error::{Error, Result};
use crate::extent::ExtentKind;
use crate::image::Backing;
use crate::io::read_up_to;
use crate::open::FileId;
use crate::reader::Reader;

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

/// A guest disk that [`convert_to_writer`](crate::convert_to_writer),
/// [`convert_to_file`](crate::convert_to_file) and [`compare`](crate::compare) can read.
///
/// Implemented by [`Reader`] (a qcow2 image's active disk or snapshot, through its backing
/// chain) and by [`RawDisk`].
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
        let image = self.image();
        let cluster_left = crate::reader::remaining_in_block(pos, image.geometry.cluster_bits);
        // The cluster at `pos` first: a compressed one is reported alone (as QEMU reports
        // them, so that convert's chunks, and with them its sparse decisions, fall where
        // qemu-img's do), and a data stretch only as far as a caller takes at once. Finding
        // a stretch's end costs its length, and callers step through data a chunk at a time.
        let Some(first) = self.extent_in(pos..pos.saturating_add(cluster_left))? else {
            return Ok(None);
        };
        let extent = match first.kind {
            ExtentKind::Compressed => Some(first),
            ExtentKind::Data { .. } => self.extent_in(pos..pos.saturating_add(DATA_LOOKUP))?,
            _ => self.extent_at(pos)?,
        };
        let extent = extent.unwrap_or(first);
        Ok(Some(match extent.kind {
            ExtentKind::Compressed => (Allocation::Compressed, extent.length),
            ExtentKind::Data { .. } => (Allocation::Data, extent.length),
            ExtentKind::Zero => (Allocation::Zero, extent.length),
            ExtentKind::Unallocated => match &image.backing {
                Some(Backing::Source { source, .. }) => source.allocation(pos, extent.length)?,
                Some(Backing::Zeros) => (Allocation::Unallocated, extent.length),
                // A backing file that is named but not attached: reading reports it.
                None if image.header.backing_file().is_some() => (Allocation::Data, extent.length),
                None => (Allocation::Unallocated, extent.length),
            },
            #[allow(unreachable_patterns)] // ExtentKind is non_exhaustive
            _ => (Allocation::Data, extent.length),
        }))
    }

    fn reads_file(&self, file: &std::fs::File) -> Result<bool> {
        Ok(FileId::of_file(file)?.is_some_and(|id| self.image().reads_file(id)))
    }
}

/// How far [`GuestDisk::allocation_at`] of a [`Reader`] looks into a data stretch: a multiple
/// of convert's 2 MiB chunks, so that its chunks fall where they would were the whole stretch
/// reported.
const DATA_LOOKUP: u64 = 8 << 20;

/// The allocation of `disk` (a backing image) from `pos`, at most `max` bytes long
/// (`max` > 0). Past the end of a shorter backing image the guest reads zeros, which QEMU
/// counts as allocated zeros.
pub(crate) fn backing_allocation<S: GuestDisk + ?Sized>(
    source: &S,
    pos: u64,
    max: u64,
) -> Result<(Allocation, u64)> {
    match source.allocation_at(pos)? {
        Some((allocation, len)) => Ok((allocation, len.clamp(1, max))),
        None => Ok((Allocation::Zero, max)),
    }
}

/// A raw disk image: any [`ReadAt`] source, with the size given.
///
/// Reads past the end of the source (up to `size`) are zeros. The source's bytes count as
/// [`Allocation::Data`], and what lies past its end as [`Allocation::Zero`].
///
/// ```
/// let raw = qcow2::RawDisk::open_path("fixtures/backing-raw-base.raw")?;
/// let image = qcow2::Qcow2::open_path("fixtures/overlay-raw.qcow2")?;
/// let overlay = image.reader()?;
/// let result = qcow2::compare(&raw, &overlay, &qcow2::CompareOptions::new())?;
/// assert!(matches!(result, qcow2::Comparison::Differ { .. }));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct RawDisk<R> {
    source: R,
    size: u64,
    /// Where the source's own bytes end (at most `size`).
    data_len: u64,
    /// The file's identity, when made from a file.
    id: Option<FileId>,
}

impl<R: ReadAt> RawDisk<R> {
    /// A raw disk of `size` bytes read from `source`.
    pub fn new(source: R, size: u64) -> Self {
        RawDisk {
            source,
            size,
            data_len: size,
            id: None,
        }
    }

    /// The source.
    pub fn get_ref(&self) -> &R {
        &self.source
    }

    /// The source, back.
    pub fn into_inner(self) -> R {
        self.source
    }
}

impl RawDisk<std::fs::File> {
    /// Open a raw file as QEMU does: its size rounded up to whole 512-byte sectors, the
    /// partial last sector reading as zeros past the end of the file.
    ///
    /// The file is opened as [`open_file`](crate::open_file) opens it, with default options:
    /// a FIFO, socket, directory or device is an [`Error::NotRegularFile`] at once, never a
    /// blocked open. To read a block device, open it with
    /// [`OpenOptions::allow_devices`](crate::OpenOptions::allow_devices) and use
    /// [`RawDisk::from_file`].
    pub fn open_path(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = crate::open::checked_open(path, "raw disk", false)?;
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
        let len = crate::open::disk_len(&file)
            .map_err(|e| Error::io(format!("reading the size of {name}"), e))?;
        let id = FileId::of_file(&file)?;
        Ok(RawDisk {
            source: file,
            size: len.checked_next_multiple_of(SECTOR).unwrap_or(len),
            data_len: len,
            id,
        })
    }
}

/// QEMU sizes raw files in 512-byte sectors.
const SECTOR: u64 = 512;

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
        Ok(Some(
            match self.data_len.checked_sub(pos).filter(|&n| n > 0) {
                Some(n) => (Allocation::Data, n),
                None => (Allocation::Zero, self.size.saturating_sub(pos)),
            },
        ))
    }

    fn reads_file(&self, file: &std::fs::File) -> Result<bool> {
        Ok(self.id.is_some() && FileId::of_file(file)? == self.id)
    }
}
