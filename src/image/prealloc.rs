//! Whether an image looks preallocated with `preallocation=metadata`, QEMU's way.
//!
//! Such an image has data clusters that were never written: holes in the image file. QEMU
//! (`qcow2_detect_metadata_preallocation`) asks the file system about holes inside data
//! clusters only when the refcounts claim clearly more clusters than the file system holds;
//! `qemu-img map` then shows those holes as zeros. The map does the same, with the same rule.

use positioned_io::ReadAt;

use crate::base::holes::HoleQuery;
use crate::base::io::read_metadata;
use crate::base::SECTOR;
use crate::format::header::Header;
use crate::format::refcount::{RefTableEntry, RefcountLayout};
use crate::image::layer::file_status;
use crate::image::qcow2::Qcow2;
/// True when clusters with a non-zero refcount (among those the file spans) reach
/// `max(real * 10 / 9, real + 2)`, `real` being the clusters the file system allocated.
/// Any error or unknown answer is "no", as in QEMU.
pub(crate) fn looks_metadata_preallocated<I: ReadAt + ?Sized>(
    io: &I,
    header: &Header,
    holes: &dyn HoleQuery,
) -> bool {
    let (Some(len), Some(allocated)) = (holes.file_len(), holes.allocated_bytes()) else {
        return false;
    };
    let bits = header.cluster_bits();
    let real = allocated >> bits;
    let threshold = real
        .saturating_mul(10)
        .checked_div(9)
        .unwrap_or(0)
        .max(real.saturating_add(2));
    let file_len = len.checked_next_multiple_of(SECTOR).unwrap_or(len);
    let end_cluster = file_len.div_ceil(1u64 << bits);
    count_referenced(io, header, end_cluster, threshold).is_some_and(|n| n >= threshold)
}

/// Clusters below `end_cluster` with a non-zero refcount, counting no further than `limit`;
/// `None` on a read error or a misaligned refcount block.
fn count_referenced<I: ReadAt + ?Sized>(
    io: &I,
    header: &Header,
    end_cluster: u64,
    limit: u64,
) -> Option<u64> {
    let cluster_bits = header.cluster_bits();
    let layout = RefcountLayout {
        cluster_bits,
        order: header.refcount_order(),
    };
    let block_bits = layout.block_bits();
    let table_entries =
        u64::from(header.refcount_table_clusters()) << cluster_bits.saturating_sub(3);
    let blocks = end_cluster.div_ceil(1u64 << block_bits).min(table_entries);
    let mut count = 0u64;
    for index in 0..blocks {
        if count >= limit {
            break;
        }
        let at = header
            .refcount_table_offset()
            .checked_add(index.checked_mul(8)?)?;
        let entry = read_metadata(io, at, 8, "refcount table entry").ok()?;
        let entry = u64::from_be_bytes(entry.try_into().ok()?);
        let offset = match RefTableEntry::decode_offset(entry, cluster_bits) {
            RefTableEntry::Block(offset) => offset,
            RefTableEntry::Empty | RefTableEntry::Reserved => continue,
            RefTableEntry::Unaligned(_) => return None,
        };
        let block = read_metadata(io, offset, 1u64 << cluster_bits, "refcount block").ok()?;
        let first = index << block_bits;
        let in_block = end_cluster.saturating_sub(first).min(1u64 << block_bits);
        count = count.saturating_add(non_zero_entries(&block, &layout, in_block));
    }
    Some(count.min(limit))
}

/// How many of the first `n` refcounts in `block` are not zero.
fn non_zero_entries(block: &[u8], layout: &RefcountLayout, n: u64) -> u64 {
    (0..n).filter(|&i| layout.get(block, i) != 0).count() as u64
}

/// QEMU's `BDRV_BLOCK_RECURSE`: plain data at `host` for `len` bytes of an image that looks
/// preallocated (`preallocation=metadata`) reads as zeros where its file has holes. Whether
/// the stretch from `host` reads as zeros, and how far (at least 1 byte); `None` when QEMU does
/// not look (the holes are unknown, or the image does not look preallocated).
pub(crate) fn preallocated_holes<I: ReadAt>(
    image: &Qcow2<I>,
    host: u64,
    len: u64,
) -> Option<(bool, u64)> {
    let holes = image.data_holes()?;
    if !image.metadata_preallocated() {
        return None;
    }
    let (zero, len) = clip_to_file_holes(holes, host, len);
    Some((zero, len.max(1)))
}

/// Data clusters of a preallocated image may be holes in the file, which read as zeros; so
/// does anything past the end of the file. Whether `len` bytes of data at `offset` read as
/// zeros, and how far.
fn clip_to_file_holes(holes: &dyn HoleQuery, offset: u64, len: u64) -> (bool, u64) {
    let Some(file_len) = holes.file_len() else {
        return (false, len); // QEMU ignores a failed query
    };
    let total = file_len
        .checked_next_multiple_of(SECTOR)
        .unwrap_or(file_len);
    let file = file_status(Some(holes), total, offset, len);
    if file.eof && (file.len == 0 || file.zero) {
        (true, len)
    } else {
        (file.zero, file.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(order: u32) -> RefcountLayout {
        RefcountLayout {
            cluster_bits: 9,
            order,
        }
    }

    #[test]
    fn narrow_refcounts_are_packed_from_the_low_bits() {
        // order 0: one bit each, bit 0 first.
        assert_eq!(non_zero_entries(&[0b0000_0101], &layout(0), 8), 2);
        assert_eq!(non_zero_entries(&[0b0000_0101], &layout(0), 2), 1);
        // order 2: four bits each.
        assert_eq!(non_zero_entries(&[0x30, 0x01], &layout(2), 4), 2);
        // order 4: 16-bit big-endian entries.
        assert_eq!(non_zero_entries(&[0, 1, 0, 0, 1, 0], &layout(4), 3), 2);
        assert_eq!(non_zero_entries(&[0, 1, 0, 0, 1, 0], &layout(4), 1), 1);
    }

    #[test]
    fn preallocated_data_in_a_hole_reads_as_zeros() {
        let f = crate::image::layer::tests::Fake {
            data: vec![(0, 65536)],
            len: 3 * 65536,
        };
        // Data up to a hole: cut at the hole.
        assert_eq!(clip_to_file_holes(&f, 0, 2 * 65536), (false, 65536));
        // A hole reaching the end of the file: zeros for the whole run.
        assert_eq!(clip_to_file_holes(&f, 65536, 4 * 65536), (true, 4 * 65536));
        // Past the end of the file: zeros.
        assert_eq!(clip_to_file_holes(&f, 8 * 65536, 65536), (true, 65536));
    }
}
