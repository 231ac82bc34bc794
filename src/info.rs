//! What `qemu-img info` reports about an image.

use positioned_io::ReadAt;

use crate::bitmap::Bitmap;
use crate::header::Header;
use crate::image::{Backing, ImageView, Qcow2};
use crate::snapshot::Snapshot;

/// One image of a backing chain, top first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainEntry {
    /// The path it was opened from, when known.
    pub filename: Option<String>,
    /// `qcow2` or `raw`.
    pub format: String,
    /// Its virtual size.
    pub virtual_size: u64,
}

/// Image information, as `qemu-img info` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImageInfo {
    /// The path the image was opened from, when known.
    pub filename: Option<String>,
    /// Always `qcow2`.
    pub format: &'static str,
    /// `0.10` for version 2, `1.1` for version 3 (QEMU's `compat`).
    pub compat: &'static str,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// `zlib` or `zstd`.
    pub compression_type: &'static str,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Lazy refcounts (compatible bit 0).
    pub lazy_refcounts: bool,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// The dirty bit.
    pub dirty: bool,
    /// The corrupt bit.
    pub corrupt: bool,
    /// The backing file name as stored in the header.
    pub backing_filename: Option<String>,
    /// The backing format from the header extension.
    pub backing_filename_format: Option<String>,
    /// The external data file name.
    pub data_file: Option<String>,
    /// Whether the external data file is a raw image by itself.
    pub data_file_raw: bool,
    /// Internal snapshots.
    pub snapshots: Vec<Snapshot>,
    /// Persistent dirty bitmaps.
    pub bitmaps: Vec<Bitmap>,
    /// The whole backing chain below this image, as far as it is attached, nearest first.
    pub backing_chain: Vec<ChainEntry>,
}

impl<I: ReadAt + Send + Sync> Qcow2<I> {
    /// What `qemu-img info` reports for this image.
    pub fn info(&self) -> ImageInfo {
        info_of(self)
    }
}

fn info_of(view: &dyn ImageView) -> ImageInfo {
    let h: &Header = view.header();
    ImageInfo {
        filename: view.path().map(|p| p.display().to_string()),
        format: "qcow2",
        compat: if h.version() >= 3 { "1.1" } else { "0.10" },
        virtual_size: h.size(),
        cluster_size: h.cluster_size(),
        compression_type: h.compression_type().name(),
        refcount_bits: h.refcount_bits(),
        lazy_refcounts: h.has_lazy_refcounts(),
        extended_l2: h.has_extended_l2(),
        dirty: h.is_dirty(),
        corrupt: h.is_corrupt(),
        backing_filename: h.backing_file().map(str::to_owned),
        backing_filename_format: h.backing_format().map(str::to_owned),
        data_file: h.data_file().map(str::to_owned),
        data_file_raw: h.is_data_file_raw(),
        snapshots: view.snapshots().to_vec(),
        bitmaps: view.bitmaps().to_vec(),
        backing_chain: chain_below(view),
    }
}

fn chain_below(view: &dyn ImageView) -> Vec<ChainEntry> {
    let mut chain = Vec::new();
    let mut current = view.backing();
    while let Some(Backing::Source { source, format }) = current {
        let image = source.as_image();
        chain.push(ChainEntry {
            filename: image
                .and_then(|i| i.path())
                .map(|p| p.display().to_string()),
            format: (*format).to_owned(),
            virtual_size: source.guest_size(),
        });
        current = image.and_then(|i| i.backing());
    }
    chain
}
