//! Read qcow2 virtual disk images, the native format of QEMU/KVM.
//!
//! Open an image with [`Qcow2::open`] (any [`positioned_io::ReadAt`] source) or
//! [`Qcow2::open_path`] (a path, following its backing chain), then read the guest disk
//! through a [`Reader`], which implements [`positioned_io::ReadAt`]:
//!
//! ```
//! use positioned_io::ReadAt;
//!
//! let bytes = std::fs::read("fixtures/v3-64k-basic.qcow2")?; // any ReadAt works, Vec<u8> too
//! let image = qcow2::Qcow2::open(bytes)?;
//! println!("{} bytes in {}-byte clusters", image.guest_size(), image.cluster_size());
//! let reader = image.reader()?;
//! let mut buf = vec![0u8; 4096];
//! reader.read_exact_at(64 * 1024, &mut buf)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Every value read from the image is checked before use: hostile images give an [`Error`],
//! never a panic, a hang or an allocation the file cannot justify (see [`Limits`]).
//!
//! # What else
//!
//! - **Backing chains and data files.** [`Qcow2::open`] reads only the source it is given;
//!   attach a backing image ([`Qcow2::set_backing_image`], [`Qcow2::set_backing_raw`]) or an
//!   external data file ([`Qcow2::set_data_file`]) yourself, or let [`Qcow2::open_path_with`]
//!   open them under a [`FilePolicy`].
//! - **Allocation map.** [`Reader::extent_at`] tells how each stretch of the guest is stored
//!   (data and where, compressed, zero, unallocated), like `qemu-img map`.
//! - **Snapshots.** [`Qcow2::snapshots`] lists them and [`Qcow2::snapshot_reader`] reads one.
//! - **Dirty bitmaps.** [`Qcow2::bitmaps`] lists the persistent dirty bitmaps and
//!   [`Qcow2::dirty_extents`] tells which stretches of the guest one marks as written.
//! - **Information.** [`Qcow2::info`] gives what `qemu-img info` reports, and
//!   [`ImageInfo::to_json`] prints it with `qemu-img`'s JSON field names.
//! - **Threads.** `Qcow2<I>` and [`Reader`] are `Send + Sync` when `I` is: share one image
//!   (and its L2 cache) between threads, each reading with `read_at` at its own offsets.
//! - **Cargo features.** `zlib` and `zstd` (both on by default) decompress compressed
//!   clusters; without one, such a cluster reads as [`Error::FeatureDisabled`].
#![forbid(unsafe_code)]
// Image bytes are untrusted: outside tests, no panicking shortcuts, no unchecked indexing
// and no unchecked arithmetic.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]

/// The README's examples, compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

mod bitmap;
mod bytes;
mod cache;
mod compress;
mod dirty;
mod error;
mod extension;
mod extent;
mod feature;
// Entry points for the parser fuzz targets (internal, no stability promise).
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod header;
mod image;
mod info;
mod io;
mod limits;
mod open;
mod options;
mod reader;
mod snapshot;
mod table;

pub use bitmap::Bitmap;
pub use dirty::{DirtyExtent, DirtyExtents};
pub use error::{Error, FeatureKind, Result};
pub use extension::{BitmapsExtension, EncryptionExtension, Extension, ExtensionKind};
pub use extent::{Extent, ExtentKind};
pub use feature::{
    Feature, FeatureName, AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS,
    INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, INCOMPAT_EXTL2,
};
pub use header::{CompressionType, Header, MAGIC, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
pub use image::Qcow2;
pub use info::{ChainEntry, ImageInfo};
pub use limits::Limits;
pub use options::{FilePolicy, FileRole, OpenFileFn, OpenOptions};
pub use reader::Reader;
pub use snapshot::Snapshot;
