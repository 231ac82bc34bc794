//! The ground floor: bounds-checked bytes, reading with bounded allocation, caches, the worker
//! pool, what the file system knows about holes, and the limits an image must stay within.

pub(crate) mod bytes;
pub(crate) mod cache;
pub(crate) mod holes;
pub(crate) mod io;
pub(crate) mod limits;
pub(crate) mod pool;
#[cfg(test)]
pub(crate) mod testing;

/// QEMU's block layer counts in 512-byte sectors (`BDRV_SECTOR_SIZE`): file lengths, sparse
/// detection, compressed cluster lengths (spec: "Compressed Clusters Descriptor") and
/// encryption IVs all use it.
pub(crate) const SECTOR: u64 = 512;
