//! Read and write qcow2 virtual disk images, the native format of QEMU/KVM.
//!
//! Add to `Cargo.toml` (the reader's traits come from `positioned_io`, re-exported as
//! [`qcow2::positioned_io`](positioned_io), so no second dependency has to match its version):
//!
//! ```toml
//! [dependencies]
//! qcow2 = "0.3"
//! ```
//!
//! Open an image with [`Qcow2::open`] (any [`positioned_io::ReadAt`] source) or
//! [`Qcow2::open_path`] (a path, following its backing chain), then read the guest disk
//! through a [`Reader`], which implements [`positioned_io::ReadAt`]:
//!
//! ```
//! use qcow2::positioned_io::ReadAt;
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
//! - **New images.** [`create`] writes an empty image as `qemu-img create -f qcow2` does
//!   (byte for byte in nearly every case), with every option of its `-o` ([`CreateOptions`],
//!   by builder or by qemu-img's names and syntax: [`CreateOptions::set_all`]): compat,
//!   cluster size, refcount width, extended L2, zstd, lazy refcounts, [`Preallocation`],
//!   backing file, external data file, encryption. What QEMU refuses is refused before any
//!   file is written.
//! - **Writing.** Open with [`OpenOptions::write`] and turn the image into a [`Writer`]
//!   ([`Qcow2::into_writer`]): `ReadAt + WriteAt`, zero writes, discards, flushes and growth,
//!   into every kind of image QEMU writes to, over any [`Storage`]. Metadata reaches the disk
//!   in an order no crash or power cut can turn into corruption.
//! - **Convert and compare.** [`convert_to_writer`] and [`convert_to_file`] copy a guest
//!   disk like `qemu-img convert -O raw` (sparse, on several threads); [`compare`] compares
//!   two disks (qcow2 or [`RawDisk`]) like `qemu-img compare`.
//! - **Allocation map.** [`Reader::map`] maps a guest range through the whole backing chain
//!   exactly as `qemu-img map` does ([`MapExtent`]; holes in the files found through
//!   [`HoleQuery`]); [`Reader::extent_at`] tells how one layer stores each stretch.
//! - **`Read + Seek`.** A [`Reader`] is `ReadAt + Size`: `positioned_io::SizeCursor::new(&reader)`
//!   hands it to code that wants `std::io::Read + Seek` (see `examples/partitions.rs`). Or
//!   let the reader own its image: [`Qcow2::into_reader`] gives an [`OwnedReader`], itself
//!   `Read + Seek`, `Send + Sync` and `'static`, to return from a function, keep in a struct
//!   or move to a thread.
//! - **Consistency check.** [`Qcow2::check`] counts every reference to a host cluster
//!   against the stored refcounts, as `qemu-img check` does, read-only and in bounded memory;
//!   the [`CheckReport`] has qemu-img's counts and each [`Problem`] with its file offset.
//! - **Snapshots.** [`Qcow2::snapshots`] lists them and [`Qcow2::snapshot_reader`] reads one.
//! - **Dirty bitmaps.** [`Qcow2::bitmaps`] lists the persistent dirty bitmaps and
//!   [`Qcow2::dirty_extents`] tells which stretches of the guest one marks as written.
//! - **Information.** [`ImageInfo::from_path`] and [`ImageInfo::chain_from_path`] (or
//!   [`Qcow2::info`] on an open image) give what `qemu-img info [--backing-chain]` reports;
//!   [`ImageInfo::to_human`] prints it as `qemu-img info` does and `ImageInfo::to_json`
//!   (cargo feature `serde`, on by default) as `qemu-img info --output=json` does.
//! - **Threads.** `Qcow2<I>` and [`Reader`] are `Send + Sync` when `I` is: share one image
//!   (and its L2 cache) between threads, each reading with `read_at` at its own offsets.
//! - **Parallel reads.** [`Reader::read_parallel`] reads a range on the image's worker pool
//!   ([`OpenOptions::threads`], cargo feature `parallel`) and hands it to a sink in guest
//!   order, stretches of zeros as [`Chunk::Zeros`], never read. The same pool decompresses
//!   the clusters of large compressed reads and reads the backing layers of large reads
//!   through an overlay (`OpenOptions::threads(1)`: everything on the calling thread).
//! - **Cargo features.** `zlib` and `zstd` (both on by default) decompress compressed
//!   clusters; without one, such a cluster reads as [`Error::FeatureDisabled`]. `zlib` is
//!   pure Rust (zlib-rs); `libdeflate` (on by default, C) decodes zlib clusters a fifth faster;
//!   `zstd` is libzstd (C). A pure-Rust build that reads `qemu-img convert -c` (cloud) images:
//!   `default-features = false, features = ["zlib"]` (add `serde`, `encryption`, `parallel`
//!   as needed: all pure Rust).
//! - **Encrypted images.** LUKS and legacy AES images open with their secret
//!   ([`OpenOptions::secret`]); without it they open for their metadata
//!   ([`Qcow2::encryption`]) and reads fail with [`Error::Encrypted`]. Feature `encryption`
//!   (on by default).
#![forbid(unsafe_code)]
#![warn(missing_debug_implementations)]
// docs.rs (nightly, `--cfg docsrs`): badges saying which cargo feature an item needs.
#![cfg_attr(docsrs, feature(doc_cfg))]
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

/// The README's examples, compiled and run as doc tests. They show the default build (they
/// read zlib, zstd and encrypted images and print JSON): other builds skip them.
#[doc = include_str!("../README.md")]
#[cfg(all(
    doctest,
    feature = "zlib",
    feature = "zstd",
    feature = "serde",
    feature = "encryption"
))]
#[derive(Debug)]
pub struct ReadmeDoctests;

/// `#[must_use]` checks: each block must fail to compile (an unused builder result or lazy
/// iterator is an error under `deny(unused_must_use)`); the last one, which uses them, must
/// compile.
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// let options = qcow2::OpenOptions::new();
/// options.threads(2); // the configured options are dropped
/// ```
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// qcow2::ParallelReadOptions::new().chunk_size(1 << 20);
/// ```
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// qcow2::CheckOptions::new().max_problems(10);
/// ```
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// let image = qcow2::Qcow2::open_path("fixtures/bitmaps.qcow2")?;
/// image.dirty_extents("b0")?; // nothing read
/// # Ok::<(), qcow2::Error>(())
/// ```
///
/// ```
/// #![deny(unused_must_use)]
/// let options = qcow2::OpenOptions::new().threads(2);
/// let image = qcow2::Qcow2::open_path_with("fixtures/bitmaps.qcow2", &options)?;
/// let extents = image.dirty_extents("b0")?.count();
/// let map = image.reader()?.map(..).count();
/// # let _ = (extents, map, qcow2::ParallelReadOptions::new().chunk_size(1 << 20));
/// # let _ = qcow2::CheckOptions::new().max_problems(10);
/// # Ok::<(), qcow2::Error>(())
/// ```
#[cfg(doctest)]
#[derive(Debug)]
pub struct MustUseChecks;

mod base;
mod crypt;
mod error;
mod format;
// Entry points for the parser fuzz targets (internal, no stability promise).
#[cfg(feature = "fuzzing")]
#[cfg_attr(docsrs, doc(cfg(feature = "fuzzing")))]
pub mod fuzzing;
mod guest;
mod image;
mod jobs;

/// The `positioned_io` crate, whose [`ReadAt`](positioned_io::ReadAt) and
/// [`Size`](positioned_io::Size) traits the API takes and implements: use it as
/// `qcow2::positioned_io` rather than depending on it yourself (the versions must match).
pub use positioned_io;

pub use base::holes::{HoleQuery, Region};
/// The old name of [`PositionalSink`], kept for one release (a trait cannot be deprecated
/// under a second name: this re-export keeps `impl qcow2::WriteAt for ...` compiling).
#[doc(hidden)]
pub use base::io::PositionalSink as WriteAt;
pub use base::io::{PositionalSink, Storage};
pub use base::limits::Limits;
pub use crypt::{EncryptionInfo, KeySlotInfo, LuksOptions, Secret, SecretCallback, SecretFn};
pub use error::{Error, Result};
pub use format::bitmap::Bitmap;
pub use format::extension::{BitmapsExtension, EncryptionExtension, Extension, ExtensionKind};
pub use format::feature::{
    Feature, FeatureKind, FeatureName, AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW,
    COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY, INCOMPAT_EXTL2,
};
pub use format::header::{CompressionType, Header, MAGIC, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
pub use format::table::{Extent, ExtentKind};
pub use guest::copy::Chunk;
pub use guest::disk::{Allocation, BlockStatus, GuestDisk, RawDisk};
pub use guest::map::{MapExtent, MapIter};
pub use guest::parallel::ParallelReadOptions;
pub use image::create::{create, Compat, CreateOptions, EncryptFormat, Preallocation};
pub use image::dirty::{DirtyExtent, DirtyExtents};
pub use image::open::{open_file, CorruptBitHidden};
pub use image::options::{FilePolicy, FileRole, OpenFileFn, OpenOptions};
pub use image::owned::OwnedReader;
pub use image::qcow2::Qcow2;
pub use jobs::amend::{amend, amend_image, AmendOptions};
pub use jobs::check::{
    CheckOptions, CheckReport, Problem, ProblemClass, ProblemKind, Repair, RepairReport, RepairStep,
};
pub use jobs::commit::{commit, commit_into, CommitOptions};
pub use jobs::compare::{compare, CompareOptions, Comparison};
pub use jobs::convert::{
    convert_into_qcow2, convert_overlay_into_qcow2, convert_stream_into_qcow2, convert_to_file,
    convert_to_qcow2, convert_to_writer, ConvertOptions, DEFAULT_SPARSE_SIZE, MAX_SPARSE_SIZE,
};
pub use jobs::hole_aware::HoleAwareReader;
pub use jobs::info::{
    BitmapInfo, ChainEntry, ChildInfo, FileSpecific, FormatSpecific, ImageInfo, Qcow2Specific,
    SnapshotInfo,
};
pub use jobs::rebase::{rebase, rebase_image, RebaseOptions};
/// The old name of [`ParallelReadOptions`].
#[deprecated(since = "0.3.0", note = "renamed `ParallelReadOptions`")]
pub type ParallelRead = ParallelReadOptions;
pub use format::snapshot::Snapshot;
pub use image::reader::Reader;
pub use image::write::bitmap_ops::{BitmapOptions, BitmapSource};
pub use image::write::Writer;
