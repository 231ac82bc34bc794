//! L1 and L2 entries as the check sees them: every bit kept (COPIED, reserved bits,
//! subcluster bitmaps), classified as QEMU's `qcow2_get_cluster_type` classifies them.

use crate::bytes::low_bits;

/// L1 entry bits 9-55: the L2 table offset (QEMU `L1E_OFFSET_MASK`).
pub(crate) const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry bits 0-8 and 56-62 are reserved (QEMU `L1E_RESERVED_MASK`).
pub(crate) const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Standard L2 entry bits 9-55: the host cluster offset (QEMU `L2E_OFFSET_MASK`).
pub(crate) const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Standard L2 entry bits 1-8 and 56-61 are reserved (QEMU `L2E_STD_RESERVED_MASK`).
pub(crate) const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Bit 63 of L1 and L2 entries: the refcount is exactly one.
pub(crate) const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry bit 62: compressed cluster.
pub(crate) const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Standard L2 entry bit 0: reads as zeros (without subclusters).
pub(crate) const OFLAG_ZERO: u64 = 1;
/// Extended L2 bitmap, low half: allocated subclusters (QEMU `QCOW_L2_BITMAP_ALL_ALLOC`).
pub(crate) const BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
/// Compressed data is addressed in 512-byte sectors.
const COMPRESSED_SECTOR: u64 = 512;

/// QEMU's `QCow2ClusterType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClusterType {
    Unallocated,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Compressed,
}

/// What the check needs to know about the image to classify an entry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EntryRules {
    pub cluster_bits: u32,
    pub subclusters: bool,
    pub data_file: bool,
}

impl EntryRules {
    /// QEMU's `qcow2_get_cluster_type`.
    pub fn cluster_type(&self, entry: u64) -> ClusterType {
        if entry & OFLAG_COMPRESSED != 0 {
            ClusterType::Compressed
        } else if entry & OFLAG_ZERO != 0 && !self.subclusters {
            if entry & L2E_OFFSET_MASK != 0 {
                ClusterType::ZeroAlloc
            } else {
                ClusterType::ZeroPlain
            }
        } else if entry & L2E_OFFSET_MASK == 0 {
            // Offset 0 is a real cluster of an external data file when COPIED says so.
            if self.data_file && entry & OFLAG_COPIED != 0 {
                ClusterType::Normal
            } else {
                ClusterType::Unallocated
            }
        } else {
            ClusterType::Normal
        }
    }

    /// QEMU's `qcow2_parse_compressed_l2_entry`: the compressed data's offset and length
    /// (whole 512-byte sectors, less the offset into the first one).
    pub fn compressed_extent(&self, entry: u64) -> (u64, u64) {
        // cluster_bits is 9..=21: the sector count takes 1..=13 bits below bit 62.
        let sector_bits = self.cluster_bits.saturating_sub(8);
        let shift = 62u32.saturating_sub(sector_bits);
        let offset = low_bits(entry, shift);
        let sectors = low_bits(entry >> shift, sector_bits).saturating_add(1);
        let len = sectors
            .saturating_mul(COMPRESSED_SECTOR)
            .saturating_sub(low_bits(offset, COMPRESSED_SECTOR.trailing_zeros()));
        (offset, len)
    }

    /// The compressed-data offset QEMU prints (`l2_entry & cluster_offset_mask`).
    pub fn compressed_offset(&self, entry: u64) -> u64 {
        self.compressed_extent(entry).0
    }

    /// Whether an offset is not cluster aligned.
    pub fn unaligned(&self, offset: u64) -> bool {
        low_bits(offset, self.cluster_bits) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STD: EntryRules = EntryRules {
        cluster_bits: 16,
        subclusters: false,
        data_file: false,
    };

    #[test]
    fn cluster_types_follow_qemu() {
        assert_eq!(STD.cluster_type(0), ClusterType::Unallocated);
        assert_eq!(STD.cluster_type(1), ClusterType::ZeroPlain);
        assert_eq!(STD.cluster_type(0x5_0001), ClusterType::ZeroAlloc);
        assert_eq!(
            STD.cluster_type(OFLAG_COPIED | 0x5_0000),
            ClusterType::Normal
        );
        assert_eq!(
            STD.cluster_type(OFLAG_COMPRESSED | 1),
            ClusterType::Compressed
        );
        assert_eq!(STD.cluster_type(OFLAG_COPIED), ClusterType::Unallocated);
        let ext = EntryRules {
            subclusters: true,
            ..STD
        };
        // Bit 0 means nothing with subclusters.
        assert_eq!(ext.cluster_type(1), ClusterType::Unallocated);
        assert_eq!(ext.cluster_type(0x5_0001), ClusterType::Normal);
        let data = EntryRules {
            data_file: true,
            ..STD
        };
        assert_eq!(data.cluster_type(OFLAG_COPIED), ClusterType::Normal);
    }

    #[test]
    fn compressed_extents() {
        // 64 KiB clusters: sector count at bits 54-61; 3 extra sectors at offset 0x12345.
        let entry = OFLAG_COMPRESSED | (3u64 << 54) | 0x12345;
        assert_eq!(STD.compressed_extent(entry), (0x12345, 4 * 512 - 0x145));
        // The COPIED bit is not part of the offset.
        assert_eq!(STD.compressed_offset(entry | OFLAG_COPIED), 0x12345);
        assert!(STD.unaligned(0x12345));
        assert!(!STD.unaligned(0x20000));
    }
}
