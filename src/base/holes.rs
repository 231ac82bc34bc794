//! What the file system knows about a file's holes, for the allocation map.
//!
//! QEMU's `qemu-img map` asks the host file system where a file has data and where it has
//! holes (`lseek` with `SEEK_DATA` and `SEEK_HOLE`): a raw backing file's holes, and the holes
//! inside the clusters of an image preallocated with `preallocation=metadata`, show as zeros.
//! [`HoleQuery`] is that question; [`std::fs::File`] answers it on Linux, any other source
//! answers "unknown", which the map reads as "all data", as QEMU does when `lseek` fails.

use std::fs::File;

/// Where a byte of a file lies: in data or in a hole, and how far that goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Region {
    /// Data from the asked offset up to `end` (exclusive: the next hole, or the end of file).
    Data {
        /// Offset of the first byte past the data.
        end: u64,
    },
    /// A hole from the asked offset up to the next data at `next_data`, or, when `None`, up to
    /// the end of the file (the asked offset may be at or past the end: that is a hole too).
    Hole {
        /// Offset of the next data, if any.
        next_data: Option<u64>,
    },
}

/// Asks the file system about a file's holes and size. Every method may answer `None`
/// ("unknown"), which is what the default methods do.
///
/// Implemented for [`std::fs::File`]: on Linux with `lseek(SEEK_DATA / SEEK_HOLE)` and
/// `fstat`; elsewhere it answers "unknown". [`Qcow2::open_path`](crate::Qcow2::open_path)
/// attaches it for every file it opens; after [`Qcow2::open`](crate::Qcow2::open), attach
/// one with [`Qcow2::set_hole_query`](crate::Qcow2::set_hole_query).
///
/// A source of your own (an in-memory image, a network file) can say where its holes are:
///
/// ```
/// use qcow2::{HoleQuery, Region, RawDisk};
///
/// /// A disk whose second half is a hole.
/// struct HalfEmpty(u64);
///
/// impl HoleQuery for HalfEmpty {
///     fn region_at(&self, pos: u64) -> Option<Region> {
///         let half = self.0 / 2;
///         Some(if pos < half {
///             Region::Data { end: half }
///         } else {
///             Region::Hole { next_data: None }
///         })
///     }
/// }
///
/// let raw = RawDisk::new(vec![7u8; 8192], 8192).with_hole_query(HalfEmpty(8192));
/// let status = qcow2::GuestDisk::block_status(&raw, 4096)?;
/// assert!(matches!(status, Some((s, 4096)) if s.zero));
/// # Ok::<(), qcow2::Error>(())
/// ```
pub trait HoleQuery: Send + Sync {
    /// Whether `pos` lies in data or in a hole, and where that ends.
    fn region_at(&self, _pos: u64) -> Option<Region> {
        None
    }
    /// The file's length in bytes (`st_size`).
    fn file_len(&self) -> Option<u64> {
        None
    }
    /// Bytes the file system allocated for the file (`st_blocks * 512`).
    fn allocated_bytes(&self) -> Option<u64> {
        None
    }
}

/// Whether the file `holes` describes has a hole at `at`, and for how many bytes that stays
/// so: `(true, n)` for a hole, `(false, n)` for data; `None` when the file system cannot say,
/// or `at` is at or past the end of the file.
pub(crate) fn run_at(holes: &dyn HoleQuery, at: u64) -> Option<(bool, u64)> {
    match holes.region_at(at)? {
        Region::Data { end } => Some((false, end.checked_sub(at).filter(|&n| n > 0)?)),
        Region::Hole {
            next_data: Some(data),
        } => Some((true, data.checked_sub(at).filter(|&n| n > 0)?)),
        // No data from `at` on: a hole up to the end of the file, if `at` is inside it.
        Region::Hole { next_data: None } => {
            let len = holes.file_len()?;
            Some((true, len.checked_sub(at).filter(|&n| n > 0)?))
        }
    }
}

impl HoleQuery for File {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn region_at(&self, pos: u64) -> Option<Region> {
        use rustix::fs::{seek, SeekFrom};
        use rustix::io::Errno;
        // The same two questions as QEMU's file-posix `find_allocation`. `lseek` moves the
        // file position, which positioned reads (`pread`) never use.
        match seek(self, SeekFrom::Data(pos)) {
            Err(Errno::NXIO) => Some(Region::Hole { next_data: None }),
            Err(_) => None,
            Ok(data) if data > pos => Some(Region::Hole {
                next_data: Some(data),
            }),
            Ok(data) if data < pos => None,
            Ok(_) => match seek(self, SeekFrom::Hole(pos)) {
                Ok(hole) if hole > pos => Some(Region::Data { end: hole }),
                _ => None,
            },
        }
    }

    fn file_len(&self) -> Option<u64> {
        self.metadata().ok().map(|m| m.len())
    }

    #[cfg(unix)]
    fn allocated_bytes(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        self.metadata().ok()?.blocks().checked_mul(512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn a_sparse_file_has_holes_where_nothing_was_written() {
        use std::io::{Seek, SeekFrom, Write};
        let path = std::env::temp_dir().join(format!("qcow2-holes-{}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        f.seek(SeekFrom::Start(4 << 20)).unwrap();
        f.write_all(&[1u8; 65536]).unwrap();
        f.sync_all().unwrap();
        let f = File::open(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        // Some file systems (tmpfs before 6.x, overlay) may not report holes: then data.
        match f.region_at(0) {
            Some(Region::Hole { next_data }) => {
                assert_eq!(next_data, Some(4 << 20));
                assert_eq!(
                    f.region_at(4 << 20),
                    Some(Region::Data {
                        end: (4 << 20) + 65536
                    })
                );
                assert_eq!(f.region_at(6 << 20), Some(Region::Hole { next_data: None }));
            }
            other => assert!(matches!(other, Some(Region::Data { .. }) | None)),
        }
        assert_eq!(f.file_len(), Some(8 << 20));
        assert_eq!(f.region_at(9 << 20), Some(Region::Hole { next_data: None }));
    }
}
