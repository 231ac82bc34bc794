//! The refcount table and refcount blocks (spec: "Host cluster management").
//!
//! Pure decoding: a refcount table entry gives a refcount block's offset, and a refcount block
//! holds `1 << refcount_block_bits` refcounts of `1 << refcount_order` bits each, packed as
//! QEMU packs them (sub-byte widths from the least significant bit of each byte, wider ones
//! big-endian).

use crate::base::bytes::{be_u16, be_u32, be_u64};

/// Refcount table entry bits 9-63: the refcount block's offset (QEMU `REFT_OFFSET_MASK`).
pub(crate) const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Refcount table entry bits 0-8 are reserved (QEMU `REFT_RESERVED_MASK`).
pub(crate) const REFT_RESERVED_MASK: u64 = 0x1ff;
/// Size of one refcount table entry.
pub(crate) const REFTABLE_ENTRY_LEN: u64 = 8;

/// The refcount layout of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RefcountLayout {
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// log2 of the refcount width in bits (0..=6).
    pub order: u32,
}

impl RefcountLayout {
    /// Refcount width in bits.
    pub fn bits(&self) -> u32 {
        1u32 << self.order.min(6)
    }

    /// The largest refcount a entry can hold.
    pub fn max(&self) -> u64 {
        u64::MAX >> 64u32.saturating_sub(self.bits())
    }

    /// log2 of the refcounts in one refcount block: a cluster of `bits`-wide entries.
    pub fn block_bits(&self) -> u32 {
        // cluster_bits >= 9 and order <= 6, so this never underflows.
        (self.cluster_bits.saturating_add(3)).saturating_sub(self.order.min(6))
    }

    /// Which refcount table entry covers host cluster `cluster`, and which entry of that
    /// refcount block.
    pub fn locate(&self, cluster: u64) -> (u64, u64) {
        let bits = self.block_bits();
        (cluster >> bits, cluster & (1u64 << bits).wrapping_sub(1))
    }

    /// Refcount number `index` of the refcount block `block` (0 when `block` is too short).
    pub fn get(&self, block: &[u8], index: u64) -> u64 {
        let Ok(i) = usize::try_from(index) else {
            return 0;
        };
        match self.order {
            0..=2 => {
                let per_byte = 8usize >> self.order;
                // per_byte is 8, 4 or 2: never zero.
                let shift = i.checked_rem(per_byte).unwrap_or(0) << self.order;
                let byte = block
                    .get(i.checked_div(per_byte).unwrap_or(0))
                    .copied()
                    .unwrap_or(0);
                (u64::from(byte) >> shift) & self.max()
            }
            3 => u64::from(block.get(i).copied().unwrap_or(0)),
            4 => i
                .checked_mul(2)
                .and_then(|at| be_u16(block, at))
                .map_or(0, u64::from),
            5 => i
                .checked_mul(4)
                .and_then(|at| be_u32(block, at))
                .map_or(0, u64::from),
            _ => i
                .checked_mul(8)
                .and_then(|at| be_u64(block, at))
                .unwrap_or(0),
        }
    }

    /// Set refcount number `index` of `block` to `value` (cut to the width). Returns false
    /// when `index` is past the block or `value` does not fit the width.
    pub fn set(&self, block: &mut [u8], index: u64, value: u64) -> bool {
        let Ok(i) = usize::try_from(index) else {
            return false;
        };
        if value > self.max() {
            return false;
        }
        match self.order {
            0..=2 => {
                let per_byte = 8usize >> self.order;
                let shift = i.checked_rem(per_byte).unwrap_or(0) << self.order;
                let Some(byte) = block.get_mut(i.checked_div(per_byte).unwrap_or(0)) else {
                    return false;
                };
                let mask = (self.max() as u8) << shift;
                *byte = (*byte & !mask) | ((value as u8) << shift);
                true
            }
            3 => put(block, i, &[value as u8]),
            4 => put(block, i.saturating_mul(2), &(value as u16).to_be_bytes()),
            5 => put(block, i.saturating_mul(4), &(value as u32).to_be_bytes()),
            _ => put(block, i.saturating_mul(8), &value.to_be_bytes()),
        }
    }
}

/// Copy `bytes` into `block` at `at`; false when they do not fit.
fn put(block: &mut [u8], at: usize, bytes: &[u8]) -> bool {
    match block.get_mut(at..at.saturating_add(bytes.len())) {
        Some(dst) if dst.len() == bytes.len() => {
            dst.copy_from_slice(bytes);
            true
        }
        _ => false,
    }
}

/// A refcount table entry, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefTableEntry {
    /// No refcount block: every cluster it would cover has refcount 0.
    Empty,
    /// A refcount block at this (cluster-aligned) offset.
    Block(u64),
    /// Reserved bits 0-8 are set.
    Reserved,
    /// The offset is not cluster aligned.
    Unaligned(u64),
}

impl RefTableEntry {
    /// Decode `entry` as `qcow2_check_refcounts` judges it.
    pub fn decode(entry: u64, cluster_bits: u32) -> Self {
        if entry & REFT_RESERVED_MASK != 0 {
            return RefTableEntry::Reserved;
        }
        Self::decode_offset(entry, cluster_bits)
    }

    /// Decode only the offset, as `qcow2_get_refcount` does (reserved bits ignored).
    pub fn decode_offset(entry: u64, cluster_bits: u32) -> Self {
        let offset = entry & REFT_OFFSET_MASK;
        if offset == 0 {
            RefTableEntry::Empty
        } else if crate::base::bytes::low_bits(offset, cluster_bits) != 0 {
            RefTableEntry::Unaligned(offset)
        } else {
            RefTableEntry::Block(offset)
        }
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
    fn widths_and_block_sizes() {
        assert_eq!(layout(4).bits(), 16);
        assert_eq!(layout(4).max(), 0xffff);
        assert_eq!(layout(0).max(), 1);
        assert_eq!(layout(6).max(), u64::MAX);
        // 512-byte clusters: 4096 one-bit refcounts, 256 16-bit ones, 64 64-bit ones.
        assert_eq!(layout(0).block_bits(), 12);
        assert_eq!(layout(4).block_bits(), 8);
        assert_eq!(layout(6).block_bits(), 6);
        assert_eq!(layout(4).locate(0x1234), (0x12, 0x34));
    }

    #[test]
    fn sub_byte_refcounts_fill_each_byte_from_its_low_bits() {
        let block = [0b1010_0110u8, 0xff];
        // 1-bit: bit i of byte i/8.
        let one = layout(0);
        let bits: Vec<u64> = (0..8).map(|i| one.get(&block, i)).collect();
        assert_eq!(bits, [0, 1, 1, 0, 0, 1, 0, 1]);
        // 2-bit: 0b10, 0b01, 0b10, 0b10.
        let two = layout(1);
        let pairs: Vec<u64> = (0..4).map(|i| two.get(&block, i)).collect();
        assert_eq!(pairs, [2, 1, 2, 2]);
        // 4-bit: low nibble first.
        assert_eq!(layout(2).get(&block, 0), 0x6);
        assert_eq!(layout(2).get(&block, 1), 0xa);
        assert_eq!(layout(3).get(&block, 1), 0xff);
    }

    #[test]
    fn wide_refcounts_are_big_endian() {
        let block = [0x00, 0x01, 0x00, 0x02, 0, 0, 0, 0, 0, 0, 0, 3];
        assert_eq!(layout(4).get(&block, 0), 1);
        assert_eq!(layout(4).get(&block, 1), 2);
        assert_eq!(layout(5).get(&block, 0), 0x0001_0002);
        assert_eq!(layout(6).get(&block, 0), 0x0001_0002_0000_0000);
        // Past the block: 0, no panic.
        assert_eq!(layout(6).get(&block, 5), 0);
        assert_eq!(layout(4).get(&block, u64::MAX), 0);
    }

    #[test]
    fn set_is_the_inverse_of_get_at_every_width() {
        for order in 0..=6u32 {
            let l = layout(order);
            let mut block = vec![0u8; 512];
            let n = 1u64 << l.block_bits();
            for i in 0..n {
                assert!(l.set(&mut block, i, (i * 7 + 1) & l.max()));
            }
            for i in 0..n {
                assert_eq!(
                    l.get(&block, i),
                    (i * 7 + 1) & l.max(),
                    "order {order} #{i}"
                );
            }
            // Neighbours are kept when one entry changes.
            assert!(l.set(&mut block, 3, 0));
            assert_eq!(l.get(&block, 2), 15 & l.max());
            assert_eq!(l.get(&block, 4), 29 & l.max());
            assert!(!l.set(&mut block, n, 1), "past the block");
            if order < 6 {
                assert!(!l.set(&mut block, 0, l.max() + 1), "too wide");
            }
        }
    }

    #[test]
    fn table_entries() {
        assert_eq!(RefTableEntry::decode(0, 16), RefTableEntry::Empty);
        assert_eq!(
            RefTableEntry::decode(0x20000, 16),
            RefTableEntry::Block(0x20000)
        );
        assert_eq!(RefTableEntry::decode(0x20001, 16), RefTableEntry::Reserved);
        assert_eq!(
            RefTableEntry::decode(0x20200, 16),
            RefTableEntry::Unaligned(0x20200)
        );
        assert_eq!(
            RefTableEntry::decode_offset(0x20001, 16),
            RefTableEntry::Block(0x20000)
        );
    }
}
