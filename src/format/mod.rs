//! The on-disk format, pure: each structure decoded from bytes (header, extensions, feature
//! table, L1/L2 entries, refcounts, snapshot table, bitmap directory, compressed clusters),
//! and encoded for a writer, with no I/O of its own.

pub(crate) mod bitmap;
pub(crate) mod compress;
pub(crate) mod compressor;
pub(crate) mod extension;
pub(crate) mod feature;
pub(crate) mod header;
pub(crate) mod header_edit;
pub(crate) mod new_header;
pub(crate) mod refcount;
pub(crate) mod snapshot;
pub(crate) mod table;
