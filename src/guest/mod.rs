//! Views of a guest disk through its whole backing chain: the allocation map, block status,
//! [`GuestDisk`](crate::GuestDisk) (qcow2 or raw), the copy engine and the parallel reads that
//! run on it.

pub(crate) mod chain;
pub(crate) mod copy;
pub(crate) mod disk;
pub(crate) mod map;
pub(crate) mod parallel;
