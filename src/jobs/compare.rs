//! Compare two guest disks, like `qemu-img compare`.
//!
//! Stretches that read as zeros in both disks (by their allocation maps) are not read; the
//! rest is read in chunks of up to 2 MiB. A difference is reported at the start of the
//! first 512-byte sector that differs, as qemu-img reports it.

use crate::base::SECTOR;
use crate::error::Result;
use crate::guest::disk::{Allocation, GuestDisk};

/// The most bytes read from each disk at once (qemu-img's `IO_BUF_SIZE`).
const CHUNK: u64 = 2 << 20;

/// How [`compare`] compares.
///
/// ```
/// use qcow2::{compare, CompareOptions, Comparison, Qcow2};
///
/// let image = Qcow2::open_path("fixtures/chain-top.qcow2")?;
/// let strict = CompareOptions::new().strict(true); // qemu-img compare -s
/// let outcome = compare(&image.reader()?, &image.reader()?, &strict)?;
/// assert_eq!(outcome, Comparison::Identical);
/// # Ok::<(), qcow2::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CompareOptions {
    strict: bool,
}

impl CompareOptions {
    /// Compare contents only; a larger disk must read as zeros past the smaller one's end.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Like `qemu-img compare -s`: disks of different sizes differ, and so do stretches
    /// whose block status differs even where they read the same. The statuses are QEMU's
    /// ([`BlockStatus`](crate::BlockStatus): data, zero, offset known, allocated, end of
    /// disk, compressed), compared where qemu-img compares them, at the start of each of its
    /// steps; holes in raw files and in the data clusters of `preallocation=metadata` images
    /// read as zeros there, as in QEMU.
    #[must_use]
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }
}

/// What [`compare`] found.
///
/// ```
/// use qcow2::{compare, CompareOptions, Comparison, Qcow2};
///
/// let image = Qcow2::open_path("fixtures/snap.qcow2")?;
/// match compare(&image.reader()?, &image.snapshot_reader("s1")?, &CompareOptions::new())? {
///     Comparison::Identical => println!("unchanged since s1"),
///     Comparison::Differ { offset } => println!("changed from byte {offset} on"),
///     other => println!("{other:?}"),
/// }
/// # Ok::<(), qcow2::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Comparison {
    /// Same contents (with zeros past the end of the smaller disk, when sizes differ and
    /// the comparison is not strict).
    Identical,
    /// The contents differ first in the 512-byte sector starting at `offset`, which may lie
    /// past the end of the smaller disk.
    Differ {
        /// Offset of the first differing sector (qemu-img: "Content mismatch at offset N!").
        offset: u64,
    },
    /// Strict only: the sizes differ (qemu-img: "Strict mode: Image size mismatch!").
    SizeMismatch {
        /// Size of the first disk.
        first: u64,
        /// Size of the second disk.
        second: u64,
    },
    /// Strict only: the disks are allocated differently from `offset` (qemu-img:
    /// "Strict mode: Offset N block status mismatch!").
    AllocationMismatch {
        /// Where the allocations first differ.
        offset: u64,
    },
}

/// Compare two guest disks: each a qcow2 [`Reader`](crate::Reader) (active image or snapshot)
/// or a [`RawDisk`](crate::RawDisk).
///
/// ```
/// use qcow2::{compare, CompareOptions, Comparison, Qcow2};
///
/// # #[cfg(all(feature = "zlib", feature = "zstd"))] {
/// let zlib = Qcow2::open_path("fixtures/zlib-4k-mixed.qcow2")?;
/// let zstd = Qcow2::open_path("fixtures/zstd-4k-mixed.qcow2")?;
/// let same = compare(&zlib.reader()?, &zstd.reader()?, &CompareOptions::new())?;
/// assert_eq!(same, Comparison::Identical);
/// # }
///
/// let snap = Qcow2::open_path("fixtures/snap.qcow2")?;
/// let other = compare(&snap.reader()?, &snap.snapshot_reader("s1")?, &CompareOptions::new())?;
/// assert!(matches!(other, Comparison::Differ { .. }));
/// # Ok::<(), qcow2::Error>(())
/// ```
pub fn compare<A, B>(first: &A, second: &B, options: &CompareOptions) -> Result<Comparison>
where
    A: GuestDisk + ?Sized,
    B: GuestDisk + ?Sized,
{
    let (size_a, size_b) = (first.disk_size(), second.disk_size());
    if options.strict {
        if size_a != size_b {
            return Ok(Comparison::SizeMismatch {
                first: size_a,
                second: size_b,
            });
        }
        return compare_strict(first, second, size_a);
    }
    let common = size_a.min(size_b);
    let mut bufs = Buffers::default();
    let (mut walk_a, mut walk_b) = (Walk::new(first), Walk::new(second));
    let mut pos = 0u64;
    while pos < common {
        let (kind_a, len_a) = walk_a.stretch(pos, common)?;
        let (kind_b, len_b) = walk_b.stretch(pos, common)?;
        let mut len = len_a.min(len_b);
        if !(kind_a.reads_as_zeros() && kind_b.reads_as_zeros()) {
            len = len.min(CHUNK);
            let found = match (kind_a.reads_as_zeros(), kind_b.reads_as_zeros()) {
                (true, _) => bufs.first_nonzero(second, pos, len)?,
                (_, true) => bufs.first_nonzero(first, pos, len)?,
                _ => bufs.first_difference(first, second, pos, len)?,
            };
            if let Some(offset) = found {
                return Ok(Comparison::Differ { offset });
            }
        }
        pos = pos.saturating_add(len);
    }
    // Past the smaller disk, the larger one must read as zeros.
    if size_a > size_b {
        if let Some(offset) = first_nonzero_from(first, common, &mut bufs)? {
            return Ok(Comparison::Differ { offset });
        }
    } else if size_b > size_a {
        if let Some(offset) = first_nonzero_from(second, common, &mut bufs)? {
            return Ok(Comparison::Differ { offset });
        }
    }
    Ok(Comparison::Identical)
}

/// `qemu-img compare -s` of two disks of `size` bytes: step by step as it does, each step as
/// long as the shorter of the two disks' block status stretches, the statuses compared whole
/// (data, zero, offset known, allocated, end of disk, compressed) at each step's start, and
/// the contents where not both read as zeros.
fn compare_strict<A, B>(first: &A, second: &B, size: u64) -> Result<Comparison>
where
    A: GuestDisk + ?Sized,
    B: GuestDisk + ?Sized,
{
    let mut bufs = Buffers::default();
    let mut pos = 0u64;
    while pos < size {
        let left = size.saturating_sub(pos);
        let (status_a, len_a) = first.block_status(pos)?.unwrap_or_default();
        let (status_b, len_b) = second.block_status(pos)?.unwrap_or_default();
        if status_a != status_b {
            return Ok(Comparison::AllocationMismatch { offset: pos });
        }
        let mut len = len_a.min(len_b).clamp(1, left);
        // Equal statuses: both zeros, or both allocated (or neither) alike.
        if !status_a.zero && status_a.allocated {
            len = len.min(CHUNK);
            if let Some(offset) = bufs.first_difference(first, second, pos, len)? {
                return Ok(Comparison::Differ { offset });
            }
        }
        pos = pos.saturating_add(len);
    }
    Ok(Comparison::Identical)
}

/// The first sector of `disk` from `pos` to its end that is not all zeros.
fn first_nonzero_from<D: GuestDisk + ?Sized>(
    disk: &D,
    mut pos: u64,
    bufs: &mut Buffers,
) -> Result<Option<u64>> {
    let end = disk.disk_size();
    let mut walk = Walk::new(disk);
    while pos < end {
        let (kind, len) = walk.stretch(pos, end)?;
        let len = if kind.reads_as_zeros() {
            len
        } else {
            let len = len.min(CHUNK);
            if let Some(offset) = bufs.first_nonzero(disk, pos, len)? {
                return Ok(Some(offset));
            }
            len
        };
        pos = pos.saturating_add(len);
    }
    Ok(None)
}

/// Steps through one disk's allocation map, keeping the stretch looked up last: a long
/// stretch met in many steps (beside many short ones of the other disk, or data read a
/// chunk at a time) is looked up once, not again from each step's start.
struct Walk<'d, D: ?Sized> {
    disk: &'d D,
    /// `[start, end)` of the stretch looked up last, and its allocation.
    known: Option<(u64, u64, Allocation)>,
}

impl<'d, D: GuestDisk + ?Sized> Walk<'d, D> {
    fn new(disk: &'d D) -> Self {
        Walk { disk, known: None }
    }

    /// The allocation of the disk at `pos` and its length, at least 1 and not past `end`.
    fn stretch(&mut self, pos: u64, end: u64) -> Result<(Allocation, u64)> {
        let left = end.saturating_sub(pos);
        if let Some((start, stop, kind)) = self.known {
            if start <= pos && pos < stop {
                return Ok((kind, stop.saturating_sub(pos).clamp(1, left.max(1))));
            }
        }
        let (kind, len) = match self.disk.allocation_at(pos)? {
            Some((kind, len)) => (kind, len.clamp(1, left.max(1))),
            None => (Allocation::Zero, left),
        };
        self.known = Some((pos, pos.saturating_add(len), kind));
        Ok((kind, len))
    }
}

/// The two read buffers, reused from chunk to chunk.
#[derive(Default)]
struct Buffers {
    a: Vec<u8>,
    b: Vec<u8>,
}

impl Buffers {
    /// The offset of the first sector in `[pos, pos + len)` of `disk` that is not zeros.
    fn first_nonzero<D: GuestDisk + ?Sized>(
        &mut self,
        disk: &D,
        pos: u64,
        len: u64,
    ) -> Result<Option<u64>> {
        fill(disk, pos, len, &mut self.a)?;
        let found = self
            .a
            .chunks(SECTOR as usize)
            .position(|s| !crate::jobs::convert::is_zero(s));
        Ok(found.map(|i| sector_offset(pos, i)))
    }

    /// The offset of the first sector in `[pos, pos + len)` where the disks differ.
    fn first_difference<A, B>(&mut self, a: &A, b: &B, pos: u64, len: u64) -> Result<Option<u64>>
    where
        A: GuestDisk + ?Sized,
        B: GuestDisk + ?Sized,
    {
        fill(a, pos, len, &mut self.a)?;
        fill(b, pos, len, &mut self.b)?;
        let sectors = self
            .a
            .chunks(SECTOR as usize)
            .zip(self.b.chunks(SECTOR as usize));
        let found = sectors.enumerate().find(|(_, (x, y))| x != y);
        Ok(found.map(|(i, _)| sector_offset(pos, i)))
    }
}

/// Read `len` bytes (at most [`CHUNK`]) of `disk` at `pos` into `buf`.
fn fill<D: GuestDisk + ?Sized>(disk: &D, pos: u64, len: u64, buf: &mut Vec<u8>) -> Result<()> {
    // Stale bytes are fine: the read fills all of it (zeroing it first cost a fifth of a
    // comparison's time).
    buf.resize(len.min(CHUNK) as usize, 0);
    disk.read_disk(pos, buf)
}

/// The offset of sector `index` of a chunk read at `pos`.
fn sector_offset(pos: u64, index: usize) -> u64 {
    pos.saturating_add((index as u64).saturating_mul(SECTOR))
}
