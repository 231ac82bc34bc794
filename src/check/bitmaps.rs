//! The bitmap directory and bitmap tables as the check reads them: where each bitmap table
//! is, validated as QEMU's `bitmap_list_load`, `check_dir_entry` and `check_table_entry` do.
//! A bitmap QEMU would refuse makes its check fail, so these return errors, not problems.

use crate::bytes::{align8, be_u16, be_u32, be_u64};

/// Fixed part of a directory entry.
const ENTRY_HEADER_LEN: u64 = 24;
/// QEMU `BME_MAX_TABLE_SIZE`: most entries in one bitmap table.
const MAX_TABLE_ENTRIES: u32 = 0x0800_0000;
/// QEMU `BME_MAX_PHYS_SIZE`: most bytes of bitmap data.
const MAX_PHYS_BYTES: u64 = 0x2000_0000;
/// QEMU `BME_MAX_NAME_SIZE`.
const MAX_NAME_LEN: u16 = 1023;
/// Flags other than in-use (bit 0) and auto (bit 1) are reserved.
const RESERVED_FLAGS: u32 = 0xffff_fffc;
const FLAG_IN_USE: u32 = 1;
/// The only bitmap type: dirty tracking.
const TYPE_DIRTY_TRACKING: u8 = 1;
/// Bitmap table entry: reserved bits 1-8 and 56-63.
const TABLE_ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry: bits 9-55, the data cluster's offset.
pub(crate) const TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry bit 0: the (unallocated) cluster reads as all ones.
const TABLE_ENTRY_ALL_ONES: u64 = 1;

/// Where one bitmap's table is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BitmapTable {
    pub name: String,
    pub offset: u64,
    pub entries: u32,
}

/// What the directory must agree with.
pub(crate) struct DirectoryRules {
    pub nb_bitmaps: u32,
    pub cluster_bits: u32,
    /// The virtual disk size (a valid bitmap must cover it).
    pub disk_size: u64,
}

/// Parse and validate the bitmap directory `dir`.
pub(crate) fn parse_directory(
    dir: &[u8],
    rules: &DirectoryRules,
) -> Result<Vec<BitmapTable>, String> {
    if dir.is_empty() {
        return Err("bitmap directory size is zero".into());
    }
    let mut tables = Vec::new();
    let mut pos = 0u64;
    let end = dir.len() as u64;
    while pos < end {
        let at = usize::try_from(pos).map_err(|_| "broken bitmap directory".to_string())?;
        let entry = dir.get(at..).unwrap_or_default();
        let broken = || "broken bitmap directory".to_string();
        let (Some(table_offset), Some(table_size), Some(flags), Some(name_len), Some(extra_len)) = (
            be_u64(entry, 0),
            be_u32(entry, 8),
            be_u32(entry, 12),
            be_u16(entry, 18),
            be_u32(entry, 20),
        ) else {
            return Err(broken());
        };
        let kind = entry.get(16).copied().unwrap_or(0);
        let granularity_bits = entry.get(17).copied().unwrap_or(0);
        if tables.len() >= rules.nb_bitmaps as usize {
            return Err("more bitmaps found than specified in the header extension".into());
        }
        let len = align8(
            ENTRY_HEADER_LEN
                .saturating_add(u64::from(name_len))
                .saturating_add(u64::from(extra_len)),
        )
        .ok_or_else(broken)?;
        if len > end.saturating_sub(pos) {
            return Err(broken());
        }
        if extra_len != 0 {
            return Err("bitmap extra data is not supported".into());
        }
        let name_at = at.saturating_add(ENTRY_HEADER_LEN as usize);
        let name = dir
            .get(name_at..name_at.saturating_add(usize::from(name_len)))
            .map(crate::bytes::lossy)
            .unwrap_or_default();
        let entry_ok = table_size != 0
            && table_offset != 0
            && crate::bytes::low_bits(table_offset, rules.cluster_bits) == 0
            && table_size <= MAX_TABLE_ENTRIES
            && (9..=31).contains(&granularity_bits)
            && flags & RESERVED_FLAGS == 0
            && name_len <= MAX_NAME_LEN
            && kind == TYPE_DIRTY_TRACKING;
        // table_size <= 2^27 and clusters <= 2^21 bytes: no overflow.
        let phys = u64::from(table_size) << rules.cluster_bits.min(21);
        let covers = (phys.saturating_mul(8))
            .checked_shl(u32::from(granularity_bits))
            .unwrap_or(u64::MAX);
        if !entry_ok
            || phys > MAX_PHYS_BYTES
            || (flags & FLAG_IN_USE == 0 && rules.disk_size > covers)
        {
            return Err(format!("bitmap '{name}' doesn't satisfy the constraints"));
        }
        tables.push(BitmapTable {
            name,
            offset: table_offset,
            entries: table_size,
        });
        pos = pos.saturating_add(len);
    }
    if tables.len() != rules.nb_bitmaps as usize {
        return Err("fewer bitmaps found than specified in the header extension".into());
    }
    Ok(tables)
}

/// QEMU's `check_table_entry`: reserved bits clear, and a data cluster aligned and without
/// the all-ones flag.
pub(crate) fn table_entry_ok(entry: u64, cluster_bits: u32) -> bool {
    if entry & TABLE_ENTRY_RESERVED_MASK != 0 {
        return false;
    }
    let offset = entry & TABLE_ENTRY_OFFSET_MASK;
    offset == 0
        || (entry & TABLE_ENTRY_ALL_ONES == 0 && crate::bytes::low_bits(offset, cluster_bits) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(offset: u64, size: u32, flags: u32, gran: u8, name: &str) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend(offset.to_be_bytes()); // bitmap_table_offset
        e.extend(size.to_be_bytes()); // bitmap_table_size
        e.extend(flags.to_be_bytes()); // flags
        e.push(1); // type
        e.push(gran); // granularity_bits
        e.extend((name.len() as u16).to_be_bytes()); // name_size
        e.extend(0u32.to_be_bytes()); // extra_data_size
        e.extend(name.as_bytes());
        while e.len() % 8 != 0 {
            e.push(0);
        }
        e
    }

    const RULES: DirectoryRules = DirectoryRules {
        nb_bitmaps: 2,
        cluster_bits: 16,
        disk_size: 1 << 30,
    };

    #[test]
    fn parses_valid_directories() {
        let mut dir = entry(0x30000, 1, 2, 16, "b0");
        dir.extend(entry(0x40000, 1, 0, 17, "b1"));
        let t = parse_directory(&dir, &RULES).unwrap();
        assert_eq!(t[1].offset, 0x40000);
        assert_eq!(t[0].name, "b0");
    }

    #[test]
    fn refuses_what_qemu_refuses() {
        let one = entry(0x30000, 1, 0, 16, "b0");
        assert!(parse_directory(&one, &RULES).is_err()); // count mismatch
        let mut dir = one.clone();
        dir.extend(entry(0x40100, 1, 0, 16, "x")); // unaligned table
        assert!(parse_directory(&dir, &RULES).is_err());
        let mut dir = one.clone();
        dir.extend(entry(0x40000, 1, 0, 8, "x")); // granularity too fine
        assert!(parse_directory(&dir, &RULES).is_err());
        // One 64 KiB table cluster at 512-byte granularity covers 256 MiB < 1 GiB.
        let mut dir = one.clone();
        dir.extend(entry(0x40000, 1, 0, 9, "x"));
        assert!(parse_directory(&dir, &RULES).is_err());
        // ... unless it is in use.
        let mut dir = one;
        dir.extend(entry(0x40000, 1, FLAG_IN_USE, 9, "x"));
        assert!(parse_directory(&dir, &RULES).is_ok());
        assert!(parse_directory(&dir[..30], &RULES).is_err());
    }

    #[test]
    fn table_entries() {
        assert!(table_entry_ok(0, 16));
        assert!(table_entry_ok(1, 16)); // all ones, unallocated
        assert!(table_entry_ok(0x50000, 16));
        assert!(!table_entry_ok(0x50001, 16));
        assert!(!table_entry_ok(0x50200, 16));
        assert!(!table_entry_ok(0x50002, 16));
    }
}
