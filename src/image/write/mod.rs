//! Writing into an image: [`Writer`], the handle [`Qcow2::into_writer`] gives.
//!
//! (Interface first; the write path lands in the following commits.)

pub(crate) mod bitmaps;
pub(crate) mod space;

use std::io;

use positioned_io::{ReadAt, Size};

use crate::base::io::Storage;
use crate::error::{Error, Result};
use crate::format::header::Header;
use crate::image::qcow2::Qcow2;

/// An image open for writing: reads what was written, writes at any offset and length,
/// writes zeros, discards, and flushes. Made by [`Qcow2::into_writer`] from an image opened
/// with [`OpenOptions::write`](crate::OpenOptions::write).
///
/// It implements [`positioned_io::ReadAt`] and [`positioned_io::WriteAt`] (also for
/// `&Writer`: any number of threads may read and write through one writer at once), and its
/// own methods take `&self` and return this crate's [`Error`].
pub struct Writer<I> {
    image: Qcow2<I>,
}

impl<I> std::fmt::Debug for Writer<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("guest_size", &(self.image.header.size() & !511))
            .finish_non_exhaustive()
    }
}

impl<I: Storage> Qcow2<I> {
    /// Turn an image opened with [`OpenOptions::write`](crate::OpenOptions::write) into a
    /// [`Writer`]. Fails with [`Error::ReadOnly`] for an image opened for reading only.
    pub fn into_writer(self) -> Result<Writer<I>> {
        Err(Error::ReadOnly)
    }
}

impl<I: Storage> Writer<I> {
    /// Guest size in bytes.
    pub fn guest_size(&self) -> u64 {
        self.image.guest_size()
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.image.cluster_size()
    }

    /// The header as it stands now (features, sizes and table offsets change as the image
    /// is written).
    pub fn header(&self) -> Header {
        self.image.header.clone()
    }

    /// Fill all of `buf` from guest offset `pos`: what was written, through every layer.
    pub fn read_exact_at(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        let _ = (pos, buf);
        Err(Error::Internal("writer: read not yet built"))
    }

    /// Write all of `buf` at guest offset `pos` (within the guest: past the end is
    /// [`Error::WritePastEnd`]).
    pub fn write_all_at(&self, pos: u64, buf: &[u8]) -> Result<()> {
        let _ = (pos, buf);
        Err(Error::Internal("writer: write not yet built"))
    }

    /// Make `len` bytes at `pos` read as zeros. With `unmap`, whole clusters that no
    /// snapshot or backing file needs are freed (qemu-io's `write -z -u`); without it, they
    /// stay allocated where they are (`write -z`).
    pub fn write_zeroes(&self, pos: u64, len: u64, unmap: bool) -> Result<()> {
        let _ = (pos, len, unmap);
        Err(Error::Internal("writer: write_zeroes not yet built"))
    }

    /// Discard `len` bytes at `pos`: whole clusters in the range are freed and read from the
    /// backing file again (zeros without one), as QEMU's `discard` does; partial clusters
    /// are left as they are.
    pub fn discard(&self, pos: u64, len: u64) -> Result<()> {
        let _ = (pos, len);
        Err(Error::Internal("writer: discard not yet built"))
    }

    /// A durability barrier: when it returns, every write before it survives a crash or a
    /// power cut.
    pub fn flush(&self) -> Result<()> {
        Err(Error::Internal("writer: flush not yet built"))
    }

    /// Whether this image itself (not its backing files) holds the stretch at `pos`, and for
    /// how many bytes from `pos` that answer holds (as QEMU's `bdrv_is_allocated`: what
    /// qemu-io's `map` prints). Length 0 at or past the end.
    pub fn is_allocated(&self, pos: u64, len: u64) -> Result<(bool, u64)> {
        let _ = (pos, len);
        Err(Error::Internal("writer: is_allocated not yet built"))
    }

    /// Flush, store what the image keeps in memory (dirty bitmaps), clear the marks an open
    /// writer leaves (the dirty bit of lazy refcounts, bitmaps in use), and give the image
    /// back, read-only, with fresh caches.
    pub fn close(self) -> Result<Qcow2<I>> {
        Err(Error::Internal("writer: close not yet built"))
    }
}

impl<I: Storage> ReadAt for Writer<I> {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        let len = usize::try_from(self.guest_size().saturating_sub(pos))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let Some(part) = buf.get_mut(..len) else {
            return Ok(0);
        };
        self.read_exact_at(pos, part)?;
        Ok(len)
    }
}

impl<I: Storage> positioned_io::WriteAt for Writer<I> {
    fn write_at(&mut self, pos: u64, buf: &[u8]) -> io::Result<usize> {
        (&*self).write_at(pos, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Writer::flush(self).map_err(io::Error::from)
    }
}

impl<I: Storage> positioned_io::WriteAt for &Writer<I> {
    fn write_at(&mut self, pos: u64, buf: &[u8]) -> io::Result<usize> {
        Writer::write_all_at(self, pos, buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Writer::flush(self).map_err(io::Error::from)
    }
}

impl<I: Storage> Size for Writer<I> {
    fn size(&self) -> io::Result<Option<u64>> {
        Ok(Some(self.guest_size()))
    }
}
