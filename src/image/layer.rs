//! One layer of a backing chain, answering for itself: a qcow2 image or a raw file.
//!
//! A layer says what one stretch of it is ([`LayerExtent`]: an [`ExtentKind`] with its
//! length, whether its file has a hole there, which file it is in) and what lies below it
//! ([`Below`]). Walking down the chain, and what the walk means for the map, block status and
//! allocation, is `guest/chain.rs`'s job.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use positioned_io::ReadAt;

use crate::base::bytes::low_bits;
use crate::base::holes::{HoleQuery, Region};
use crate::base::io::read_up_to;
use crate::base::pool::Pool;
use crate::error::{Error, Result};
use crate::format::compress::ClusterCache;
use crate::format::table::{Extent, ExtentKind};
use crate::image::open::FileId;
use crate::image::plan::{L2Cache, Planner};
use crate::image::qcow2::{Backing, ImageView, Qcow2};
use crate::image::reader::Reader;

/// QEMU's qcow2 driver answers for at most `INT_MAX` bytes at once.
const QEMU_MAX_STATUS: u64 = i32::MAX as u64;

/// One layer of a backing chain, below the image read: a raw file, or another qcow2 image.
pub(crate) trait Layer: Send + Sync {
    /// Fill `buf` with guest bytes at `pos`; bytes past the end read as zeros.
    fn read_guest(&self, pos: u64, buf: &mut [u8]) -> Result<()>;
    /// Guest size in bytes.
    fn guest_size(&self) -> u64;
    /// The file it was opened from, when known.
    fn path(&self) -> Option<&Path>;
    /// Share the caches of the image above it (qcow2 sources; raw ones have none).
    fn share_caches(&mut self, _l2: &Arc<Mutex<L2Cache>>, _compressed: &Arc<ClusterCache>) {}
    /// Share the worker pool of the image above it (qcow2 sources; raw ones have none).
    fn share_pool(&mut self, _pool: &Arc<Pool>) {}
    /// The image, when this source is a qcow2 image (for the backing chain in `info`).
    fn as_image(&self) -> Option<&dyn ImageView> {
        None
    }
    /// Whether this source (through its own chain) reads the file `id`.
    fn reads_file(&self, id: FileId) -> bool;
    /// What this layer alone holds from `pos` (inside its guest), for at most `len` bytes.
    fn layer_extent(&self, pos: u64, len: u64) -> Result<LayerExtent<'_>>;
    /// What lies below this layer.
    fn below(&self) -> Below<'_> {
        Below::Nothing
    }
}

/// One layer's answer for a stretch, as QEMU's driver gives it (`bdrv_co_do_block_status`
/// of one node, before the chain is asked).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerExtent<'a> {
    /// The stretch and how this layer stores it.
    pub(crate) extent: Extent,
    /// Data whose file has a hole there, so that it reads as zeros (QEMU's
    /// `BDRV_BLOCK_RECURSE`: it looks only in images that look preallocated).
    pub(crate) hole: bool,
    /// The host offsets point at ciphertext: QEMU shows none.
    pub(crate) encrypted: bool,
    /// The file the host offsets are in, when it was opened by path.
    pub(crate) file: Option<&'a Path>,
    /// The layer's guest size.
    pub(crate) size: u64,
}

impl LayerExtent<'_> {
    /// Whether the layer has the stretch (data, compressed or zeros), rather than leaving it
    /// to the layer below.
    pub(crate) fn is_allocated(&self) -> bool {
        !matches!(self.extent.kind, ExtentKind::Unallocated { .. })
    }

    /// The host offset of the first byte as QEMU shows it: none for encrypted data.
    pub(crate) fn shown_offset(&self) -> Option<u64> {
        self.extent.kind.host_offset().filter(|_| !self.encrypted)
    }

    /// Whether the stretch reaches the end of the layer.
    pub(crate) fn reaches_end(&self) -> bool {
        self.extent.start.saturating_add(self.extent.length) >= self.size
    }
}

/// What an unallocated stretch of a layer reads from.
pub(crate) enum Below<'a> {
    /// Zeros: no backing file is named, or zeros were attached in its place.
    Nothing,
    /// A backing file is named but not attached: reading there fails.
    Missing(&'a str),
    /// Another layer.
    Layer(&'a dyn Layer),
}

/// What a qcow2 layer says about at most `len` bytes at `pos` of `reader`'s guest, as QEMU's
/// `bdrv_co_do_block_status` over `qcow2_co_block_status` answers: a run of one kind (host
/// offsets following on) within one L2 table and `INT_MAX` bytes, a compressed cluster alone,
/// cut at the file's holes where QEMU looks at them. Length 0 at or past the end of the guest.
pub(crate) fn qcow2_layer_extent<'a, I: ReadAt>(
    reader: &Reader<'a, I>,
    pos: u64,
    len: u64,
) -> Result<LayerExtent<'a>> {
    let image = reader.image();
    let size = reader.guest_size();
    let mut layer = LayerExtent {
        extent: Extent {
            start: pos,
            length: 0,
            kind: ExtentKind::NOTHING,
        },
        hole: false,
        encrypted: image.crypt.is_some(),
        file: image.data_path(),
        size,
    };
    if pos >= size {
        return Ok(layer);
    }
    let l2_bits = image.geometry.l2_bits();
    let table_end = (pos >> l2_bits).saturating_add(1) << l2_bits;
    let end = pos
        .saturating_add(len.min(size.saturating_sub(pos)).min(QEMU_MAX_STATUS))
        .min(table_end);
    let mut planner = Planner::new(reader.tables());
    // From the start of a table, walk its first run whole, not just what this step takes:
    // a table found empty so is remembered (EmptyTables), and QEMU's steps of INT_MAX bytes
    // through it, and through every other L1 entry naming it, cost nothing more.
    let walk_end = match low_bits(pos, l2_bits) {
        0 => table_end,
        _ => end,
    };
    let first = planner.extent(pos, walk_end)?;
    let kind = first.kind;
    let mut stop = pos.saturating_add(first.length).min(end);
    // The planner cuts runs of many units short; QEMU does not. A unit that cannot be
    // decoded ends the run, as QEMU's count of contiguous clusters stops at it: the next
    // answer reports it.
    while stop < end {
        let Ok(next) = planner.extent(stop, end) else {
            break;
        };
        if next.length == 0 || !kind.continued_by(next.kind, stop.saturating_sub(pos)) {
            break;
        }
        stop = stop.saturating_add(next.length);
    }
    layer.extent.kind = kind;
    layer.extent.length = stop.saturating_sub(pos).max(1);
    if let (ExtentKind::Data { host_offset }, false) = (kind, layer.encrypted) {
        if let Some((hole, run)) =
            crate::image::prealloc::preallocated_holes(image, host_offset, layer.extent.length)
        {
            layer.hole = hole;
            layer.extent.length = run;
        }
    }
    Ok(layer)
}

/// What a raw file of `size` bytes says about `len` bytes at `pos` (QEMU's raw format over
/// `file-posix`): data, or zeros where the file system reports a hole, at the same offset in
/// the file. Length 0 at or past the end.
pub(crate) fn raw_layer_extent<'a>(
    holes: Option<&dyn HoleQuery>,
    size: u64,
    file: Option<&'a Path>,
    pos: u64,
    len: u64,
) -> LayerExtent<'a> {
    let status = file_status(holes, size, pos, len);
    let kind = match status.zero {
        true => ExtentKind::Zero {
            host_offset: Some(pos),
        },
        false => ExtentKind::Data { host_offset: pos },
    };
    LayerExtent {
        extent: Extent {
            start: pos,
            length: status.len,
            kind,
        },
        hole: false,
        encrypted: false,
        file,
        size,
    }
}

/// A file's own answer (QEMU's `file-posix` block status) for `len` bytes at `pos` of a file
/// QEMU counts as `total` bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FileStatus {
    pub(crate) len: u64,
    pub(crate) zero: bool,
    /// The answer reaches the end of the file.
    pub(crate) eof: bool,
}

pub(crate) fn file_status(
    holes: Option<&dyn HoleQuery>,
    total: u64,
    pos: u64,
    len: u64,
) -> FileStatus {
    if pos >= total {
        return FileStatus {
            len: 0,
            zero: false,
            eof: true,
        };
    }
    let len = len.min(total.saturating_sub(pos));
    let (zero, len) = match holes.and_then(|h| h.region_at(pos)) {
        // Trailing hole: zeros up to the end.
        Some(Region::Hole { next_data: None }) => (true, len),
        Some(Region::Hole {
            next_data: Some(data),
        }) if data > pos => (true, len.min(data.saturating_sub(pos))),
        Some(Region::Data { end }) if end > pos => (false, len.min(end.saturating_sub(pos))),
        // Unknown: all data, as QEMU pretends when lseek fails.
        _ => (false, len),
    };
    FileStatus {
        len,
        zero,
        eof: pos.saturating_add(len) == total,
    }
}

/// A raw backing file: any positioned source of a known length.
pub(crate) struct RawSource<B> {
    pub(crate) source: B,
    pub(crate) size: u64,
    pub(crate) path: Option<PathBuf>,
    pub(crate) holes: Option<Box<dyn HoleQuery>>,
    /// The file's identity, when it was opened by path.
    pub(crate) id: Option<FileId>,
}

impl<B: ReadAt + Send + Sync> Layer for RawSource<B> {
    fn read_guest(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        let got = read_up_to(&self.source, pos, buf)
            .map_err(|e| Error::io(format!("reading raw backing file at {pos:#x}"), e))?;
        if let Some(rest) = buf.get_mut(got..) {
            rest.fill(0);
        }
        Ok(())
    }
    fn guest_size(&self) -> u64 {
        self.size
    }
    fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
    fn reads_file(&self, id: FileId) -> bool {
        self.id == Some(id)
    }
    fn layer_extent(&self, pos: u64, len: u64) -> Result<LayerExtent<'_>> {
        // The file's holes read as zeros, never read: a sparse base costs its data only.
        Ok(raw_layer_extent(
            self.holes.as_deref(),
            self.size,
            self.path.as_deref(),
            pos,
            len,
        ))
    }
}

impl<I: ReadAt + Send + Sync> Layer for Qcow2<I> {
    fn share_caches(&mut self, l2: &Arc<Mutex<L2Cache>>, compressed: &Arc<ClusterCache>) {
        Qcow2::share_caches(self, l2, compressed);
    }
    fn share_pool(&mut self, pool: &Arc<Pool>) {
        Qcow2::share_pool(self, pool);
    }
    fn read_guest(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        self.check_data_file()?;
        let reader = Reader::with_state(self, &self.chain_state);
        let in_image = self.guest_size().saturating_sub(pos).min(buf.len() as u64) as usize;
        let (inside, past) = buf.split_at_mut(in_image);
        reader.read_guest(pos, inside)?;
        past.fill(0);
        Ok(())
    }
    fn guest_size(&self) -> u64 {
        Qcow2::guest_size(self)
    }
    fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
    fn as_image(&self) -> Option<&dyn ImageView> {
        Some(self)
    }
    fn reads_file(&self, id: FileId) -> bool {
        Qcow2::reads_file(self, id)
    }
    fn layer_extent(&self, pos: u64, len: u64) -> Result<LayerExtent<'_>> {
        // Through the chain's read state, which keeps what walks learn (empty L2 tables).
        self.check_data_file()?;
        let reader = Reader::with_state(self, &self.chain_state);
        qcow2_layer_extent(&reader, pos, len)
    }
    fn below(&self) -> Below<'_> {
        Qcow2::below(self)
    }
}

impl<I> Qcow2<I> {
    /// What this image's unallocated stretches read from.
    pub(crate) fn below(&self) -> Below<'_> {
        match &self.backing {
            Some(Backing::Source { source, .. }) => Below::Layer(source.as_ref()),
            Some(Backing::Zeros) => Below::Nothing,
            None => match self.header.backing_file() {
                Some(name) => Below::Missing(name),
                None => Below::Nothing,
            },
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A file whose holes are given as (start, end) data ranges.
    pub(crate) struct Fake {
        pub(crate) data: Vec<(u64, u64)>,
        pub(crate) len: u64,
    }

    impl HoleQuery for Fake {
        fn region_at(&self, pos: u64) -> Option<Region> {
            if let Some(&(_, end)) = self.data.iter().find(|(s, e)| *s <= pos && pos < *e) {
                return Some(Region::Data { end });
            }
            let next_data = self.data.iter().map(|d| d.0).filter(|&s| s > pos).min();
            Some(Region::Hole { next_data })
        }
        fn file_len(&self) -> Option<u64> {
            Some(self.len)
        }
    }

    #[test]
    fn file_status_follows_data_and_holes() {
        let f = Fake {
            data: vec![(4096, 8192)],
            len: 10000,
        };
        let s = file_status(Some(&f), 10240, 0, 1 << 20);
        assert!(s.zero && s.len == 4096 && !s.eof);
        let s = file_status(Some(&f), 10240, 4096, 1 << 20);
        assert!(!s.zero && s.len == 4096);
        let s = file_status(Some(&f), 10240, 8192, 1 << 20);
        assert!(s.zero && s.len == 2048 && s.eof);
        let s = file_status(Some(&f), 10240, 10240, 1 << 20);
        assert!(s.eof && s.len == 0);
        let s = file_status(None, 10240, 0, 100);
        assert!(!s.zero && s.len == 100);
    }
}
