//! The one walk down a backing chain, and the views derived from what it finds.
//!
//! [`walk`] asks the image's own layer about a stretch, then the layers below it, until one
//! has data or zeros, as qemu-img's `get_block_status` and QEMU's
//! `bdrv_co_common_block_status_above` do. Each layer is asked for no more than the layer
//! above answered. From its answer, small functions give `qemu-img map`'s row
//! ([`map_extent`]), QEMU's block status flags ([`block_status`]) and convert's allocation
//! ([`allocation`]).

use positioned_io::ReadAt;

use crate::error::{Error, Result};
use crate::format::table::ExtentKind;
use crate::guest::disk::{Allocation, BlockStatus};
use crate::guest::map::MapExtent;
use crate::image::layer::{qcow2_layer_extent, Below, LayerExtent};
use crate::image::reader::Reader;

/// What the chain says about a stretch starting at a guest offset.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChainExtent<'a> {
    /// The answer of the layer that decides; for a stretch that no layer has, of the deepest
    /// layer asked. Its length is the stretch's.
    pub(crate) layer: LayerExtent<'a>,
    /// That layer: 0 is the image itself, 1 its backing file, and so on.
    pub(crate) depth: u32,
    /// Why the stretch reads as it does.
    pub(crate) found: Found,
    /// The stretch reaches the end of the image's guest.
    pub(crate) at_end: bool,
}

/// Who has a stretch of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
    /// The layer answering has it: data, compressed or zeros.
    Here,
    /// No layer has it and nothing lies below the last: it reads as zeros.
    Nowhere,
    /// No layer down to the answering one has it, and the layer below that ends before it:
    /// zeros, which QEMU counts as allocated in that shorter layer.
    PastShorterLayer,
}

/// Down the chain from `reader`'s image, for at most `len` bytes from `pos` (inside its
/// guest), until a layer has the stretch. A backing file named but not attached is
/// [`Error::BackingMissing`] where the walk would need it.
pub(crate) fn walk<'a, I: ReadAt>(
    reader: &Reader<'a, I>,
    pos: u64,
    len: u64,
) -> Result<ChainExtent<'a>> {
    let mut layer = qcow2_layer_extent(reader, pos, len)?;
    let mut below = reader.image().below();
    let mut depth = 0u32;
    let found = loop {
        if layer.is_allocated() {
            break Found::Here;
        }
        let next = match below {
            Below::Nothing => break Found::Nowhere,
            Below::Missing(name) => {
                return Err(Error::BackingMissing {
                    name: name.to_owned(),
                })
            }
            Below::Layer(next) => next,
        };
        if pos >= next.guest_size() {
            break Found::PastShorterLayer;
        }
        let length = layer.extent.length;
        let answer = next.layer_extent(pos, length)?;
        if answer.extent.length == 0 {
            return Err(Error::Internal(
                "a layer gave an empty answer inside its guest",
            ));
        }
        layer = answer;
        below = next.below();
        depth = depth.saturating_add(1);
    };
    let at_end = pos.saturating_add(layer.extent.length) >= reader.guest_size();
    Ok(ChainExtent {
        layer,
        depth,
        found,
        at_end,
    })
}

/// The stretch as `qemu-img map` reports it: its block status's flags, with the layer that
/// decides and where the bytes lie.
pub(crate) fn map_extent<'a>(chain: &ChainExtent<'a>) -> MapExtent<'a> {
    let layer = &chain.layer;
    let status = block_status(chain);
    let offset = layer.shown_offset();
    MapExtent {
        start: layer.extent.start,
        length: layer.extent.length,
        depth: chain.depth,
        present: chain.found == Found::Here,
        zero: status.zero,
        data: status.data,
        compressed: status.compressed,
        offset,
        file: offset.and(layer.file),
    }
}

/// The stretch as QEMU's block layer reports it through the chain
/// (`bdrv_block_status_above` with no base).
pub(crate) fn block_status(chain: &ChainExtent<'_>) -> BlockStatus {
    let layer = &chain.layer;
    let kind = layer.extent.kind;
    match chain.found {
        Found::Here => BlockStatus {
            data: kind.is_data(),
            zero: matches!(kind, ExtentKind::Zero { .. }) || layer.hole,
            offset_valid: layer.shown_offset().is_some(),
            allocated: true,
            // Found below: that layer's end is not the disk's.
            eof: chain.at_end,
            compressed: matches!(kind, ExtentKind::Compressed { .. }),
        },
        // Unallocated everywhere: the last layer's own answer, its end included.
        Found::Nowhere => BlockStatus {
            data: false,
            zero: true,
            offset_valid: layer.shown_offset().is_some(),
            allocated: false,
            eof: chain.at_end || layer.reaches_end(),
            compressed: false,
        },
        Found::PastShorterLayer => BlockStatus {
            zero: true,
            allocated: true,
            eof: chain.at_end,
            ..BlockStatus::default()
        },
    }
}

/// The stretch as convert and compare see it: exactly what its block status reads as.
pub(crate) fn allocation(chain: &ChainExtent<'_>) -> Allocation {
    block_status(chain).allocation()
}

/// A layer with nothing below it, which has every stretch itself (a raw file).
pub(crate) fn alone(layer: LayerExtent<'_>) -> ChainExtent<'_> {
    ChainExtent {
        layer,
        depth: 0,
        found: Found::Here,
        at_end: layer.reaches_end(),
    }
}

/// Whether `next`, which starts where `chain` ends, continues it: found the same way in the
/// same layer, with host offsets following on (`gap` bytes after `chain`'s start).
pub(crate) fn continued_by(chain: &ChainExtent<'_>, next: &ChainExtent<'_>, gap: u64) -> bool {
    chain.found == next.found
        && chain.depth == next.depth
        && chain.layer.hole == next.layer.hole
        && chain
            .layer
            .extent
            .kind
            .continued_by(next.layer.extent.kind, gap)
}

#[cfg(test)]
mod tests {
    use crate::{Error, GuestDisk, Qcow2};

    /// Opened without its backing file (`Qcow2::open` attaches nothing): the map, block
    /// status and allocation all name the missing file where they need it, as reads do.
    #[test]
    fn a_missing_backing_file_is_an_error_everywhere_it_is_needed() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/chain-top.qcow2");
        let image = Qcow2::open(std::fs::File::open(path).unwrap()).unwrap();
        let reader = image.reader().unwrap();
        let missing = |e: &Error| matches!(e, Error::BackingMissing { .. });
        let mut read = vec![0u8; reader.guest_size() as usize];
        assert!(missing(&reader.read_disk(0, &mut read).unwrap_err()));
        let map_error = reader.map(..).find_map(Result::err).unwrap();
        assert!(missing(&map_error));
        // Every stretch up to the first that needs the backing file is answered.
        let mut pos = 0;
        let error = loop {
            match reader.allocation_at(pos) {
                Ok(Some((_, len))) => pos += len,
                Ok(None) => panic!("the whole disk answered without its backing file"),
                Err(e) => break e,
            }
        };
        assert!(missing(&error), "{error}");
        let mut pos = 0;
        let error = loop {
            match reader.block_status(pos) {
                Ok(Some((_, len))) => pos += len,
                Ok(None) => panic!("the whole disk answered without its backing file"),
                Err(e) => break e,
            }
        };
        assert!(missing(&error), "{error}");
    }
}
