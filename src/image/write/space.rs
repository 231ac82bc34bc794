//! What the parts of the writer that store structures of their own (the dirty bitmaps) need
//! of the image file: clusters to put them in, and the order of writes that keeps a crash
//! harmless.

use crate::error::Result;
use crate::format::extension::BitmapsExtension;

/// Room in the image file, handed out by the writer's allocator.
pub(crate) trait Space {
    /// log2 of the cluster size.
    fn cluster_bits(&self) -> u32;
    /// Allocate whole contiguous clusters covering `len` bytes and return the offset of the
    /// first. Their refcounts are raised (durably, before [`Space::barrier`] returns) before
    /// anything that refers to them can reach the disk.
    fn allocate(&mut self, len: u64) -> Result<u64>;
    /// Drop one reference to the clusters covering `len` bytes at `offset`. They are reused
    /// only once what referred to them is gone on disk (after the next barrier).
    fn free(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Write `data` at host offset `offset` of the image file.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()>;
    /// A barrier: every write so far, and the refcounts of every cluster allocated so far,
    /// are durable when it returns.
    fn barrier(&mut self) -> Result<()>;
    /// Point the header's bitmaps extension at a new directory (`None`: remove the
    /// extension and clear the autoclear bitmaps bit), and make that durable. The directory
    /// and everything it names must be written, and a barrier passed, before.
    fn set_bitmaps_extension(&mut self, extension: Option<BitmapsExtension>) -> Result<()>;
}
