//! L1 and L2 table entries (spec: "Cluster mapping") and what they resolve to.
//!
//! Decoding is pure: an entry plus the image geometry gives an [`ExtentKind`] or an error.

use crate::base::bytes::low_bits;
use crate::error::{Error, Result};

/// L1 entry bits 9-55: the L2 table's host offset (QEMU `L1E_OFFSET_MASK`).
pub(crate) const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry bits 0-8 and 56-62 are reserved (QEMU `L1E_RESERVED_MASK`).
pub(crate) const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Standard L2 entry bits 9-55: the data cluster's host offset (QEMU `L2E_OFFSET_MASK`).
pub(crate) const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Standard L2 entry bits 1-8 and 56-61 are reserved (QEMU `L2E_STD_RESERVED_MASK`).
pub(crate) const L2_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// L2 entry bit 62: the cluster is compressed.
const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L1 and L2 entry bit 63: refcount is exactly one (and, in an L2 entry with an external data
/// file, "allocated").
pub(crate) const OFLAG_COPIED: u64 = 1 << 63;
/// Standard L2 entry bit 0: the cluster reads as zeros.
const OFLAG_ZERO: u64 = 1;
/// Compressed data is counted in 512-byte sectors.
use crate::base::SECTOR as COMPRESSED_SECTOR;
/// Subclusters per cluster with extended L2 entries.
const SUBCLUSTER_BITS: u32 = 5;
/// Extended L2 bitmap, low half: subcluster `i` is allocated (QEMU `QCOW_L2_BITMAP_ALL_ALLOC`).
pub(crate) const SUB_ALLOC_MASK: u64 = 0xffff_ffff;

/// The layout facts needed to decode entries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub cluster_bits: u32,
    /// log2 of the entries in one L2 table.
    pub index_bits: u32,
    pub extended_l2: bool,
    /// With an external data file, offset 0 plus the COPIED bit is a real cluster.
    pub external_data: bool,
    /// Version 2 images have no zero flag: an entry with bit 0 set is corrupt.
    pub pre_v3: bool,
}

impl Geometry {
    /// log2 of the guest bytes one L2 table maps.
    #[inline]
    pub fn l2_bits(&self) -> u32 {
        self.cluster_bits.saturating_add(self.index_bits)
    }

    /// log2 of the smallest unit with its own mapping: a subcluster or a cluster. Extended L2
    /// needs cluster_bits >= 14, so this is at least 9.
    #[inline]
    pub fn unit_bits(&self) -> u32 {
        if self.extended_l2 {
            self.cluster_bits.saturating_sub(SUBCLUSTER_BITS)
        } else {
            self.cluster_bits
        }
    }

    /// What an L2 entry is, as QEMU's `qcow2_get_cluster_type` classifies it. Reserved bits,
    /// alignment and the subcluster bitmap are left to the caller.
    #[inline]
    pub fn cluster_type(&self, entry: u64) -> ClusterType {
        let host = entry & L2_OFFSET_MASK;
        if entry & OFLAG_COMPRESSED != 0 {
            ClusterType::Compressed
        } else if entry & OFLAG_ZERO != 0 && !self.extended_l2 {
            if host != 0 {
                ClusterType::ZeroAlloc
            } else {
                ClusterType::ZeroPlain
            }
        } else if host != 0 || (self.external_data && entry & OFLAG_COPIED != 0) {
            ClusterType::Normal
        } else {
            ClusterType::Unallocated
        }
    }

    /// A compressed L2 entry's data, as QEMU's `qcow2_parse_compressed_l2_entry` finds it:
    /// `(host offset, length)`, the length being whole 512-byte sectors less the offset into
    /// the first one. The split between offset and sector count moves with cluster_bits
    /// (spec: x = 62 - (cluster_bits - 8)); bits 62 and 63 are never part of either.
    #[inline]
    pub fn compressed_extent(&self, entry: u64) -> (u64, u64) {
        // cluster_bits is 9..=21, so sector_bits is 1..=13 and shift 49..=61.
        let sector_bits = self.cluster_bits.saturating_sub(8);
        let shift = 62u32.saturating_sub(sector_bits);
        let host_offset = low_bits(entry, shift);
        let extra_sectors = low_bits(entry >> shift, sector_bits);
        // At most 2^13 sectors of 512 bytes: no overflow.
        let sectors_len = extra_sectors
            .saturating_add(1)
            .saturating_mul(COMPRESSED_SECTOR);
        let len =
            sectors_len.saturating_sub(low_bits(host_offset, COMPRESSED_SECTOR.trailing_zeros()));
        (host_offset, len)
    }

    /// Whether a host offset is not cluster aligned.
    #[inline]
    pub fn unaligned(&self, offset: u64) -> bool {
        low_bits(offset, self.cluster_bits) != 0
    }
}

/// An L2 entry's kind, QEMU's `QCow2ClusterType`: what the entry says before its subcluster
/// bitmap is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClusterType {
    /// No host cluster (with extended L2: none of the subclusters is allocated).
    Unallocated,
    /// Standard entry with the zero flag and no host cluster.
    ZeroPlain,
    /// Standard entry with the zero flag and a preallocated host cluster.
    ZeroAlloc,
    /// A host cluster (with extended L2, the bitmap says which subclusters it holds).
    Normal,
    /// Compressed data.
    Compressed,
}

/// How one stretch of the guest is stored in one image (one layer of a backing chain): what
/// an L2 entry says, with every host offset it gives.
///
/// ```
/// use qcow2::ExtentKind;
///
/// let image = qcow2::Qcow2::open_path("fixtures/zlib-4k-mixed.qcow2")?;
/// let reader = image.reader()?;
/// let mut compressed = 0;
/// let mut pos = 0;
/// while let Some(extent) = reader.extent_at(pos)? {
///     if let ExtentKind::Compressed { .. } = extent.kind {
///         compressed += extent.length;
///     }
///     pos = extent.start + extent.length;
/// }
/// assert!(compressed > 0);
/// # Ok::<(), qcow2::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ExtentKind {
    /// Stored as is, starting at this offset of the image file (or of its external data file).
    Data {
        /// Host offset of the extent's first byte.
        host_offset: u64,
    },
    /// (Part of) one compressed cluster: the whole cluster decompresses from
    /// `compressed_len` bytes at `host_offset` of the image file.
    Compressed {
        /// Host offset of the compressed data.
        host_offset: u64,
        /// Length of the compressed data in bytes.
        compressed_len: u64,
    },
    /// Reads as zeros, hiding any backing data.
    Zero {
        /// Host offset of the extent's first byte when its clusters are preallocated.
        host_offset: Option<u64>,
    },
    /// Not stored in this image: reads from the backing image, or as zeros without one.
    Unallocated {
        /// Host offset of the extent's first byte when its cluster is allocated (unallocated
        /// subclusters of an allocated cluster).
        host_offset: Option<u64>,
    },
}

impl ExtentKind {
    /// Not stored here, and no host cluster either.
    pub(crate) const NOTHING: ExtentKind = ExtentKind::Unallocated { host_offset: None };

    /// The host offset of the first byte, when it has one of its own (compressed data has
    /// none: its bytes are not where its guest bytes are).
    #[inline]
    pub(crate) fn host_offset(self) -> Option<u64> {
        match self {
            ExtentKind::Data { host_offset } => Some(host_offset),
            ExtentKind::Zero { host_offset } | ExtentKind::Unallocated { host_offset } => {
                host_offset
            }
            ExtentKind::Compressed { .. } => None,
        }
    }

    /// The same kind `delta` bytes further on (host offsets moved along; compressed data
    /// stays what it is).
    #[inline]
    pub(crate) fn advanced(self, delta: u64) -> Self {
        let on = |h: Option<u64>| h.map(|h| h.saturating_add(delta));
        match self {
            ExtentKind::Data { host_offset } => ExtentKind::Data {
                host_offset: host_offset.saturating_add(delta),
            },
            ExtentKind::Zero { host_offset } => ExtentKind::Zero {
                host_offset: on(host_offset),
            },
            ExtentKind::Unallocated { host_offset } => ExtentKind::Unallocated {
                host_offset: on(host_offset),
            },
            compressed @ ExtentKind::Compressed { .. } => compressed,
        }
    }

    /// Whether `next`, found `gap` bytes after the start of a stretch of this kind, continues
    /// it: the same kind, with host offsets (where there are any) going on without a jump.
    /// Compressed clusters never continue one another: each is decompressed alone.
    #[inline]
    pub(crate) fn continued_by(self, next: ExtentKind, gap: u64) -> bool {
        let same_kind = std::mem::discriminant(&self) == std::mem::discriminant(&next);
        let host_follows = match (self.host_offset(), next.host_offset()) {
            (Some(a), Some(b)) => a.checked_add(gap) == Some(b),
            (None, None) => true,
            _ => false,
        };
        same_kind && host_follows && !matches!(self, ExtentKind::Compressed { .. })
    }

    /// Stored in this image as data, compressed or not.
    #[inline]
    pub(crate) fn is_data(self) -> bool {
        matches!(
            self,
            ExtentKind::Data { .. } | ExtentKind::Compressed { .. }
        )
    }
}

/// A stretch of the guest disk stored one way in one image.
///
/// ```
/// use qcow2::ExtentKind;
///
/// let image = qcow2::Qcow2::open_path("fixtures/zlib-4k-mixed.qcow2")?;
/// let reader = image.reader()?;
/// let mut pos = 0;
/// while let Some(extent) = reader.extent_at(pos)? {
///     if let ExtentKind::Data { host_offset } = extent.kind {
///         println!("{:#x}+{:#x} at file offset {host_offset:#x}", extent.start, extent.length);
///     }
///     pos = extent.start + extent.length;
/// }
/// assert_eq!(pos, image.guest_size());
/// # Ok::<(), qcow2::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// Guest offset of its first byte.
    pub start: u64,
    /// Its length in bytes (never 0 inside the guest).
    pub length: u64,
    /// How it is stored.
    pub kind: ExtentKind,
}

/// Bytes from `offset` to the end of its aligned block of `1 << bits` bytes (a cluster, a
/// subcluster, an L2 table's reach).
#[inline]
pub(crate) fn remaining_in_block(offset: u64, bits: u32) -> u64 {
    (1u64 << bits).saturating_sub(low_bits(offset, bits))
}

/// An L1 entry's L2 table offset, `None` when the L2 table is unallocated.
#[inline]
pub(crate) fn l2_table_offset(
    entry: u64,
    geometry: &Geometry,
    entry_at: u64,
) -> Result<Option<u64>> {
    let offset = entry & L1_OFFSET_MASK;
    if offset == 0 {
        return Ok(None);
    }
    if geometry.unaligned(offset) {
        return Err(Error::Misaligned {
            what: "L2 table",
            offset,
            at: entry_at,
        });
    }
    Ok(Some(offset))
}

/// Decode one L2 entry for subcluster `sub` (always 0 without extended L2): what it is, with
/// the host offset of the unit whenever its cluster has one: data, and also a preallocated
/// zero cluster or an unallocated subcluster of an allocated cluster (`qemu-img map` reports
/// where those lie; a writer reuses them). `bitmap` is the extended entry's second word;
/// `entry_at` is where the entry sits, for errors.
#[inline]
pub(crate) fn decode_l2(
    entry: u64,
    bitmap: u64,
    sub: u32,
    geometry: &Geometry,
    entry_at: u64,
) -> Result<ExtentKind> {
    let kind = geometry.cluster_type(entry);
    let mapping = decode_l2_mapping(entry, kind, bitmap, sub, geometry, entry_at)?;
    let host = entry & L2_OFFSET_MASK;
    // Compressed data has no host cluster of its own; a standard zero cluster keeps one only
    // when preallocated.
    let has_host = matches!(kind, ClusterType::Normal | ClusterType::ZeroAlloc);
    // sub < 32 and the unit is at most 64 KiB: within one cluster.
    let unit_host = has_host.then(|| host | u64::from(sub) << geometry.unit_bits());
    Ok(match mapping {
        ExtentKind::Zero { .. } => ExtentKind::Zero {
            host_offset: unit_host,
        },
        ExtentKind::Unallocated { .. } => ExtentKind::Unallocated {
            host_offset: unit_host,
        },
        stored => stored,
    })
}

/// What the entry says, without the host offsets of zeros and unallocated units.
#[inline]
fn decode_l2_mapping(
    entry: u64,
    kind: ClusterType,
    bitmap: u64,
    sub: u32,
    geometry: &Geometry,
    entry_at: u64,
) -> Result<ExtentKind> {
    if kind == ClusterType::Compressed {
        return decode_compressed(entry, geometry, entry_at);
    }
    let invalid = |reason| Error::InvalidL2Entry {
        entry,
        entry_at,
        reason,
    };
    if geometry.pre_v3 && entry & OFLAG_ZERO != 0 {
        return Err(invalid("zero cluster entry in a version 2 image"));
    }
    let host = entry & L2_OFFSET_MASK;
    // QEMU checks a host offset's alignment whatever the flags say, zero clusters included.
    if geometry.unaligned(host) {
        return Err(Error::Misaligned {
            what: "data cluster",
            offset: host,
            at: entry_at,
        });
    }
    if !geometry.extended_l2 {
        return Ok(match kind {
            ClusterType::Normal => ExtentKind::Data { host_offset: host },
            ClusterType::ZeroPlain | ClusterType::ZeroAlloc => {
                ExtentKind::Zero { host_offset: None }
            }
            // Compressed returned above.
            ClusterType::Unallocated | ClusterType::Compressed => ExtentKind::NOTHING,
        });
    }
    let allocated = kind == ClusterType::Normal;
    let alloc = bitmap & SUB_ALLOC_MASK;
    let zero = bitmap >> 32;
    let bit = 1u64.checked_shl(sub).unwrap_or(0);
    let sub_alloc = alloc & bit != 0;
    let sub_zero = zero & bit != 0;
    if !allocated {
        if alloc != 0 {
            return Err(invalid("unallocated cluster has allocated subclusters"));
        }
        return Ok(if sub_zero {
            ExtentKind::Zero { host_offset: None }
        } else {
            ExtentKind::NOTHING
        });
    }
    if alloc & zero != 0 {
        return Err(invalid("subcluster marked both allocated and zero"));
    }
    if sub_zero {
        Ok(ExtentKind::Zero { host_offset: None })
    } else if sub_alloc {
        // sub < 32 and the unit is at most 64 KiB: within one cluster.
        Ok(ExtentKind::Data {
            host_offset: host | u64::from(sub) << geometry.unit_bits(),
        })
    } else {
        Ok(ExtentKind::NOTHING)
    }
}

/// The compressed descriptor ([`Geometry::compressed_extent`]), refused with an external
/// data file.
fn decode_compressed(entry: u64, geometry: &Geometry, entry_at: u64) -> Result<ExtentKind> {
    if geometry.external_data {
        return Err(Error::InvalidL2Entry {
            entry,
            entry_at,
            reason: "compressed cluster in an image with an external data file",
        });
    }
    let (host_offset, compressed_len) = geometry.compressed_extent(entry);
    Ok(ExtentKind::Compressed {
        host_offset,
        compressed_len,
    })
}

/// An L2 entry to write, as QEMU writes it for a new image (the encoder beside
/// [`Geometry::cluster_type`] and [`Geometry::compressed_extent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NewEntry {
    /// A data cluster of its own (refcount 1, so COPIED is set); with extended L2, every
    /// subcluster allocated.
    Data { host_offset: u64 },
    /// A compressed cluster: `len` bytes at `host_offset` (any byte offset).
    Compressed { host_offset: u64, len: u64 },
    /// Reads as zeros whatever a backing file holds (version 3 only).
    Zero,
}

impl Geometry {
    /// The L1 entry for an L2 table at `l2_offset` with refcount 1.
    #[inline]
    pub fn encode_l1(&self, l2_offset: u64) -> u64 {
        (l2_offset & L1_OFFSET_MASK) | OFLAG_COPIED
    }

    /// The L2 entry for `entry`: `(first word, subcluster bitmap)`; the bitmap is only
    /// written with extended L2 entries. Fails for what this layout cannot hold: a zero flag
    /// in a version 2 image, compressed data longer than the descriptor counts or past its
    /// offset field.
    pub fn encode_l2(&self, entry: NewEntry) -> Result<(u64, u64)> {
        match entry {
            NewEntry::Data { host_offset } => {
                let bitmap = if self.extended_l2 { SUB_ALLOC_MASK } else { 0 };
                Ok(((host_offset & L2_OFFSET_MASK) | OFLAG_COPIED, bitmap))
            }
            NewEntry::Zero if self.pre_v3 => {
                Err(Error::Internal("a version 2 image has no zero clusters"))
            }
            // Extended L2: every subcluster reads as zeros (bitmap bits 32-63).
            NewEntry::Zero if self.extended_l2 => Ok((0, SUB_ALLOC_MASK << 32)),
            NewEntry::Zero => Ok((OFLAG_ZERO, 0)),
            NewEntry::Compressed { host_offset, len } => {
                self.encode_compressed(host_offset, len).map(|e| (e, 0))
            }
        }
    }

    /// A compressed cluster descriptor: the offset in the low `62 - (cluster_bits - 8)`
    /// bits, then the number of 512-byte sectors the data touches, less one (QEMU's
    /// `nb_csectors`).
    fn encode_compressed(&self, host_offset: u64, len: u64) -> Result<u64> {
        let sector_bits = self.cluster_bits.saturating_sub(8);
        let shift = 62u32.saturating_sub(sector_bits);
        let last = host_offset
            .checked_add(len)
            .and_then(|end| end.checked_sub(1))
            .filter(|_| len > 0)
            .ok_or(Error::Internal(
                "an empty or overflowing compressed cluster",
            ))?;
        let first_sector = host_offset / COMPRESSED_SECTOR;
        let extra_sectors = (last / COMPRESSED_SECTOR).saturating_sub(first_sector);
        if low_bits(host_offset, shift) != host_offset
            || low_bits(extra_sectors, sector_bits) != extra_sectors
        {
            return Err(Error::Internal(
                "a compressed cluster does not fit its descriptor",
            ));
        }
        Ok(OFLAG_COMPRESSED | (extra_sectors << shift) | host_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G64K: Geometry = Geometry {
        cluster_bits: 16,
        index_bits: 13,
        extended_l2: false,
        external_data: false,
        pre_v3: false,
    };
    const G64K_EXT: Geometry = Geometry {
        cluster_bits: 16,
        index_bits: 12,
        extended_l2: true,
        external_data: false,
        pre_v3: false,
    };

    #[test]
    fn new_entries_decode_to_what_was_encoded() {
        for cluster_bits in [9u32, 12, 16, 21] {
            for extended_l2 in [false, true] {
                let g = Geometry {
                    cluster_bits,
                    index_bits: cluster_bits - 3,
                    extended_l2,
                    external_data: false,
                    pre_v3: false,
                };
                let (data, bitmap) = g
                    .encode_l2(NewEntry::Data {
                        host_offset: 5 << cluster_bits,
                    })
                    .unwrap();
                assert_eq!(g.cluster_type(data), ClusterType::Normal);
                assert_eq!(data & L2_OFFSET_MASK, 5 << cluster_bits);
                assert_ne!(data & OFLAG_COPIED, 0);
                assert_eq!(bitmap, if extended_l2 { SUB_ALLOC_MASK } else { 0 });
                // Compressed data starting mid-sector and crossing sectors.
                for (host_offset, len) in [(0x1_0123u64, 700u64), (0x2_0000, 1), (0x3_01ff, 2)] {
                    let (e, _) = g
                        .encode_l2(NewEntry::Compressed { host_offset, len })
                        .unwrap();
                    assert_eq!(g.cluster_type(e), ClusterType::Compressed);
                    let (at, got) = g.compressed_extent(e);
                    assert_eq!(at, host_offset);
                    // The decoder gives whole sectors from the offset on: at least len.
                    assert!(
                        got >= len && got < len + 512,
                        "{cluster_bits} {host_offset:#x}"
                    );
                    assert_eq!((at + got) % 512, 0);
                }
                let (zero, zbits) = g.encode_l2(NewEntry::Zero).unwrap();
                if extended_l2 {
                    assert_eq!((zero, zbits), (0, 0xffff_ffff_0000_0000));
                } else {
                    assert_eq!(g.cluster_type(zero), ClusterType::ZeroPlain);
                }
                assert_eq!(
                    g.encode_l1(7 << cluster_bits),
                    (7 << cluster_bits) | OFLAG_COPIED
                );
            }
        }
    }

    #[test]
    fn entries_a_layout_cannot_hold_are_refused() {
        let v2 = Geometry {
            cluster_bits: 16,
            index_bits: 13,
            extended_l2: false,
            external_data: false,
            pre_v3: true,
        };
        assert!(v2.encode_l2(NewEntry::Zero).is_err());
        // 64 KiB clusters: 8 sector bits, so at most 256 sectors.
        let too_long = NewEntry::Compressed {
            host_offset: 0x10000,
            len: 257 * 512,
        };
        assert!(v2.encode_l2(too_long).is_err());
        let past_field = NewEntry::Compressed {
            host_offset: 1 << 54,
            len: 10,
        };
        assert!(v2.encode_l2(past_field).is_err());
        let empty = NewEntry::Compressed {
            host_offset: 0x10000,
            len: 0,
        };
        assert!(v2.encode_l2(empty).is_err());
    }

    #[test]
    fn l1_entries() {
        assert_eq!(l2_table_offset(0, &G64K, 0).unwrap(), None);
        // COPIED bit set, offset 0x30000.
        assert_eq!(
            l2_table_offset(0x8000_0000_0003_0000, &G64K, 0).unwrap(),
            Some(0x30000)
        );
        assert!(l2_table_offset(0x8000_0000_0003_0200, &G64K, 0).is_err());
    }

    #[test]
    fn cluster_types_follow_qemu() {
        assert_eq!(G64K.cluster_type(0), ClusterType::Unallocated);
        assert_eq!(G64K.cluster_type(1), ClusterType::ZeroPlain);
        assert_eq!(G64K.cluster_type(0x5_0001), ClusterType::ZeroAlloc);
        assert_eq!(
            G64K.cluster_type(OFLAG_COPIED | 0x5_0000),
            ClusterType::Normal
        );
        assert_eq!(
            G64K.cluster_type(OFLAG_COMPRESSED | 1),
            ClusterType::Compressed
        );
        assert_eq!(G64K.cluster_type(OFLAG_COPIED), ClusterType::Unallocated);
        // Reserved bits and misalignment do not change the type: the caller judges them.
        assert_eq!(G64K.cluster_type(0x5_0200), ClusterType::Normal);
        assert!(G64K.unaligned(0x5_0200));
        assert_eq!(G64K.cluster_type(0x5_0002), ClusterType::Normal);
        assert_eq!(0x5_0002 & L2_STD_RESERVED_MASK, 2);
        // Bit 0 means nothing with subclusters.
        assert_eq!(G64K_EXT.cluster_type(1), ClusterType::Unallocated);
        assert_eq!(G64K_EXT.cluster_type(0x5_0001), ClusterType::Normal);
        let data = Geometry {
            external_data: true,
            ..G64K
        };
        assert_eq!(data.cluster_type(OFLAG_COPIED), ClusterType::Normal);
    }

    #[test]
    fn l1_masks() {
        // The COPIED bit is neither offset nor reserved; bits 0-8 and 56-62 are reserved.
        let entry = OFLAG_COPIED | 0x3_0000;
        assert_eq!(entry & L1_OFFSET_MASK, 0x3_0000);
        assert_eq!(entry & L1_RESERVED_MASK, 0);
        assert_eq!(L1_OFFSET_MASK | L1_RESERVED_MASK | OFLAG_COPIED, u64::MAX);
        assert_eq!(L1_OFFSET_MASK & L1_RESERVED_MASK, 0);
        // Standard L2: bit 0 is the zero flag, 62 compressed, 63 COPIED.
        assert_eq!(
            L2_OFFSET_MASK | L2_STD_RESERVED_MASK | OFLAG_ZERO | OFLAG_COMPRESSED | OFLAG_COPIED,
            u64::MAX
        );
    }

    #[test]
    fn standard_l2_entries() {
        assert_eq!(decode_l2(0, 0, 0, &G64K, 0).unwrap(), ExtentKind::NOTHING);
        assert_eq!(
            decode_l2(1, 0, 0, &G64K, 0).unwrap(),
            ExtentKind::Zero { host_offset: None }
        );
        // Zero flag with a preallocated cluster still reads zeros.
        assert_eq!(
            decode_l2(0x8000_0000_0005_0001, 0, 0, &G64K, 0).unwrap(),
            ExtentKind::Zero {
                host_offset: Some(0x50000)
            }
        );
        assert_eq!(
            decode_l2(0x8000_0000_0005_0000, 0, 0, &G64K, 0).unwrap(),
            ExtentKind::Data {
                host_offset: 0x50000
            }
        );
        assert!(decode_l2(0x8000_0000_0005_0200, 0, 0, &G64K, 0).is_err());
        // Version 2 has no zero flag: QEMU calls such an entry corruption.
        let v2 = Geometry {
            pre_v3: true,
            ..G64K
        };
        assert!(matches!(
            decode_l2(1, 0, 0, &v2, 0x1238),
            Err(Error::InvalidL2Entry {
                entry_at: 0x1238,
                ..
            })
        ));
        assert!(decode_l2(0x8000_0000_0005_0001, 0, 0, &v2, 0).is_err());
        assert!(decode_l2(0x8000_0000_0005_0000, 0, 0, &v2, 0).is_ok());
        // A preallocated zero cluster must be aligned too, as QEMU requires.
        assert!(decode_l2(0x8000_0000_0005_0201, 0, 0, &G64K, 0).is_err());
        assert!(decode_l2(0x8000_0000_0005_0200, 1 << 32, 0, &G64K_EXT, 0).is_err());
    }

    #[test]
    fn external_data_offset_zero_is_allocated_when_copied() {
        let g = Geometry {
            external_data: true,
            ..G64K
        };
        assert_eq!(
            decode_l2(OFLAG_COPIED, 0, 0, &g, 0).unwrap(),
            ExtentKind::Data { host_offset: 0 }
        );
        assert_eq!(decode_l2(0, 0, 0, &g, 0).unwrap(), ExtentKind::NOTHING);
        assert_eq!(
            decode_l2(OFLAG_COPIED, 0, 0, &G64K, 0).unwrap(),
            ExtentKind::NOTHING
        );
    }

    #[test]
    fn compressed_descriptor_split_depends_on_cluster_bits() {
        // 64 KiB clusters: x = 62 - 8 = 54; 3 extra sectors, offset 0x12345.
        let entry = OFLAG_COMPRESSED | (3u64 << 54) | 0x12345;
        assert_eq!(
            decode_l2(entry, 0, 0, &G64K, 0).unwrap(),
            ExtentKind::Compressed {
                host_offset: 0x12345,
                compressed_len: 4 * 512 - 0x145
            }
        );
        // The COPIED bit is not part of the offset.
        assert_eq!(
            G64K.compressed_extent(entry | OFLAG_COPIED),
            (0x12345, 4 * 512 - 0x145)
        );
        // 512-byte clusters: x = 61, one bit of sector count.
        let g512 = Geometry {
            cluster_bits: 9,
            ..G64K
        };
        let entry = OFLAG_COMPRESSED | (1u64 << 61) | 0x400;
        assert_eq!(
            decode_l2(entry, 0, 0, &g512, 0).unwrap(),
            ExtentKind::Compressed {
                host_offset: 0x400,
                compressed_len: 1024
            }
        );
    }

    #[test]
    fn host_offsets_of_preallocated_zero_and_unallocated_subclusters() {
        let host = |entry, bitmap, sub, g| decode_l2(entry, bitmap, sub, g, 0).unwrap();
        let zero = |host_offset| ExtentKind::Zero { host_offset };
        let unallocated = |host_offset| ExtentKind::Unallocated { host_offset };
        assert_eq!(
            host(0x8000_0000_0005_0001, 0, 0, &G64K),
            zero(Some(0x50000))
        );
        assert_eq!(host(1, 0, 0, &G64K), zero(None));
        assert_eq!(host(0, 0, 0, &G64K), unallocated(None));
        let bitmap = (1u64 << (32 + 2)) | 0b0010;
        assert_eq!(
            host(0x8000_0000_0005_0000, bitmap, 0, &G64K_EXT),
            unallocated(Some(0x50000))
        );
        assert_eq!(
            host(0x8000_0000_0005_0000, bitmap, 2, &G64K_EXT),
            zero(Some(0x50000 + 2 * 2048))
        );
        assert_eq!(host(0, 1 << 33, 1, &G64K_EXT), zero(None));
    }

    #[test]
    fn subclusters() {
        let entry = 0x8000_0000_0005_0000;
        let bitmap = (1u64 << (32 + 2)) | 0b0010; // sub 1 allocated, sub 2 zero
        assert_eq!(
            decode_l2(entry, bitmap, 0, &G64K_EXT, 0).unwrap(),
            ExtentKind::Unallocated {
                host_offset: Some(0x50000)
            }
        );
        assert_eq!(
            decode_l2(entry, bitmap, 1, &G64K_EXT, 0).unwrap(),
            ExtentKind::Data {
                host_offset: 0x50000 + 2048
            }
        );
        assert_eq!(
            decode_l2(entry, bitmap, 2, &G64K_EXT, 0).unwrap(),
            ExtentKind::Zero {
                host_offset: Some(0x50000 + 2 * 2048)
            }
        );
        // The zero flag of the first word means nothing with extended L2.
        assert_eq!(
            decode_l2(1, 0, 0, &G64K_EXT, 0).unwrap(),
            ExtentKind::NOTHING
        );
        // Allocated and zero at once is invalid.
        assert!(decode_l2(entry, (1u64 << 33) | 0b10, 0, &G64K_EXT, 0).is_err());
        // Allocated subclusters without a host cluster are invalid.
        assert!(decode_l2(0, 1, 3, &G64K_EXT, 0).is_err());
    }
}
