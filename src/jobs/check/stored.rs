//! The refcounts stored in the image, read through the refcount table as QEMU's
//! `qcow2_get_refcount` reads them, with a few refcount blocks cached.

use std::num::NonZeroUsize;

use lru::LruCache;
use positioned_io::ReadAt;

use crate::base::io::read_up_to;
use crate::error::{Error, Result};
use crate::format::refcount::{RefTableEntry, RefcountLayout};

/// Bytes of refcount blocks kept in the cache.
const CACHE_BYTES: u64 = 4 << 20;

/// The end of what QEMU may read from a file (`BDRV_MAX_LENGTH`: `INT64_MAX` rounded down to
/// 1 GiB); a read that ends later fails with `EIO`. A refcount table entry with bit 63 set
/// (an offset bit for QEMU) names a block there.
const QEMU_MAX_LENGTH: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

/// A stored refcount, or why it cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored {
    Refcount(u64),
    /// The refcount block's offset is not cluster aligned, or the block lies past what QEMU
    /// may read (QEMU fails with EIO either way).
    Unreadable,
}

pub(crate) struct StoredRefcounts<'a, I: ?Sized> {
    io: &'a I,
    layout: RefcountLayout,
    table: &'a [u64],
    cache: LruCache<u64, Vec<u8>>,
}

impl<'a, I: ReadAt + ?Sized> StoredRefcounts<'a, I> {
    pub fn new(io: &'a I, layout: RefcountLayout, table: &'a [u64]) -> Self {
        let blocks = (CACHE_BYTES >> layout.cluster_bits).max(1);
        let capacity =
            NonZeroUsize::new(usize::try_from(blocks).unwrap_or(1)).unwrap_or(NonZeroUsize::MIN);
        StoredRefcounts {
            io,
            layout,
            table,
            cache: LruCache::new(capacity),
        }
    }

    /// The stored refcount of host cluster `cluster`.
    pub fn get(&mut self, cluster: u64) -> Result<Stored> {
        let (table_index, block_index) = self.layout.locate(cluster);
        let entry = usize::try_from(table_index)
            .ok()
            .and_then(|i| self.table.get(i))
            .copied()
            .unwrap_or(0);
        let offset = match RefTableEntry::decode_offset(entry, self.layout.cluster_bits) {
            RefTableEntry::Empty | RefTableEntry::Reserved => return Ok(Stored::Refcount(0)),
            RefTableEntry::Unaligned(_) => return Ok(Stored::Unreadable),
            RefTableEntry::Block(offset) => offset,
        };
        let block_end = offset.checked_add(1 << self.layout.cluster_bits);
        if block_end.is_none_or(|end| end > QEMU_MAX_LENGTH) {
            return Ok(Stored::Unreadable);
        }
        let layout = self.layout;
        let block = self.block(offset)?;
        Ok(Stored::Refcount(layout.get(block, block_index)))
    }

    /// The refcount block at `offset` (zeros past the end of the file, as QEMU reads them).
    fn block(&mut self, offset: u64) -> Result<&[u8]> {
        if !self.cache.contains(&offset) {
            let mut buf = vec![0u8; 1usize << self.layout.cluster_bits.min(21)];
            read_padded(self.io, offset, &mut buf, "refcount block")?;
            self.cache.put(offset, buf);
        }
        self.cache
            .get(&offset)
            .map(Vec::as_slice)
            .ok_or_else(|| Error::malformed("refcount block cache lost an entry", offset))
    }
}

/// Fill `buf` from `pos`; what lies past the end of the file reads as zeros.
pub(crate) fn read_padded<I: ReadAt + ?Sized>(
    io: &I,
    pos: u64,
    buf: &mut [u8],
    what: &str,
) -> Result<()> {
    let got = read_up_to(io, pos, buf)
        .map_err(|e| Error::io(format!("reading {what} at {pos:#x}"), e))?;
    if let Some(rest) = buf.get_mut(got..) {
        rest.fill(0);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_through_the_table_with_zeros_for_missing_blocks() {
        // 1 KiB clusters, 16-bit refcounts: 512 per block. Block 0 at 0x400.
        let mut file = vec![0u8; 0x800];
        file[0x400..0x402].copy_from_slice(&1u16.to_be_bytes()); // cluster 0
        file[0x404..0x406].copy_from_slice(&7u16.to_be_bytes()); // cluster 2
        let layout = RefcountLayout {
            cluster_bits: 10,
            order: 4,
        };
        let table = [0x400u64, 0, 0x600, 0x1_0000_0000];
        let mut stored = StoredRefcounts::new(&file, layout, &table);
        assert_eq!(stored.get(0).unwrap(), Stored::Refcount(1));
        assert_eq!(stored.get(2).unwrap(), Stored::Refcount(7));
        assert_eq!(stored.get(512).unwrap(), Stored::Refcount(0)); // no block
        assert_eq!(stored.get(1024).unwrap(), Stored::Unreadable); // 0x600: unaligned
        assert_eq!(stored.get(1536).unwrap(), Stored::Refcount(0)); // block past EOF
        assert_eq!(stored.get(1 << 40).unwrap(), Stored::Refcount(0)); // past the table
                                                                       // Bit 63 set: past what QEMU may read. The last block QEMU may read reads as zeros.
        let table = [0x400 | 1 << 63, QEMU_MAX_LENGTH - 0x400, QEMU_MAX_LENGTH];
        let mut stored = StoredRefcounts::new(&file, layout, &table);
        assert_eq!(stored.get(0).unwrap(), Stored::Unreadable);
        assert_eq!(stored.get(512).unwrap(), Stored::Refcount(0));
        assert_eq!(stored.get(1024).unwrap(), Stored::Unreadable);
    }
}
