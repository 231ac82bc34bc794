//! What the parts of the writer that store structures of their own (the dirty bitmaps) need
//! of the image file: clusters to put them in, and the order of writes that keeps a crash
//! harmless.

use crate::base::io::{read_metadata, Storage};
use crate::error::Result;
use crate::format::extension::{BitmapsExtension, EXT_BITMAPS};
use crate::format::feature::AUTOCLEAR_BITMAPS;
use crate::format::header_edit::with_extension;
use crate::image::write::writeback::{barrier, write, Metadata};

/// Room in the image file, handed out by the writer's allocator.
#[allow(dead_code)] // the dirty bitmaps' store lands next
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

/// The writer's file and metadata, lent as [`Space`].
#[allow(dead_code)]
pub(crate) struct FileSpace<'a, I> {
    pub(crate) io: &'a I,
    pub(crate) meta: &'a mut Metadata,
    pub(crate) data: Option<&'a dyn Storage>,
    pub(crate) cluster_bits: u32,
}

impl<I: Storage> Space for FileSpace<'_, I> {
    fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }

    fn allocate(&mut self, len: u64) -> Result<u64> {
        let clusters = len.div_ceil(1u64 << self.cluster_bits).max(1);
        self.meta.refs.allocate(self.io, clusters)
    }

    fn free(&mut self, offset: u64, len: u64) -> Result<()> {
        self.meta.refs.free_later(offset, len);
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.meta.unsynced = true;
        write(self.io, offset, data, "bitmap data")
    }

    fn barrier(&mut self) -> Result<()> {
        self.meta.write_back(self.io, self.data)
    }

    fn set_bitmaps_extension(&mut self, extension: Option<BitmapsExtension>) -> Result<()> {
        let cluster0 = read_metadata(self.io, 0, 1u64 << self.cluster_bits, "header")?;
        let data = extension.map(|e| {
            let mut d = e.nb_bitmaps.to_be_bytes().to_vec();
            d.extend(0u32.to_be_bytes());
            d.extend(e.directory_size.to_be_bytes());
            d.extend(e.directory_offset.to_be_bytes());
            d
        });
        let (set, clear) = match data {
            Some(_) => (AUTOCLEAR_BITMAPS, 0),
            None => (0, AUTOCLEAR_BITMAPS),
        };
        let edited = with_extension(&cluster0, EXT_BITMAPS, data.as_deref(), set, clear)?;
        write(self.io, 0, &edited, "header")?;
        barrier(self.io)
    }
}
