//! Persistent dirty bitmaps: the bitmap directory (spec: "Bitmaps extension").
//!
//! Only the directory is read, to list bitmaps by name as `qemu-img info` does.

use crate::bytes::{align8, be_u16, be_u32, be_u64, field, lossy};
use crate::error::{Error, Result};

/// Fixed part of a bitmap directory entry.
const ENTRY_HEADER_LEN: usize = 24;
/// Flag bit 0: the bitmap is in use (was not saved cleanly).
const FLAG_IN_USE: u32 = 1 << 0;
/// Flag bit 1: the bitmap is automatically updated with guest writes.
const FLAG_AUTO: u32 = 1 << 1;

/// A persistent dirty bitmap stored in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    /// Its name.
    pub name: String,
    /// Bytes of guest data per bit.
    pub granularity: u64,
    /// Raw flags (bit 0 in-use, bit 1 auto).
    pub flags: u32,
}

impl Bitmap {
    /// The flag names `qemu-img info` prints (`in-use`, `auto`).
    pub fn flag_names(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.flags & FLAG_IN_USE != 0 {
            names.push("in-use");
        }
        if self.flags & FLAG_AUTO != 0 {
            names.push("auto");
        }
        names
    }
}

/// Parse a bitmap directory of `count` entries starting at file offset `at`.
pub(crate) fn parse_directory(dir: &[u8], count: u32, at: u64) -> Result<Vec<Bitmap>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    for _ in 0..count {
        let here = at.saturating_add(pos as u64);
        let bad = |what: &str| Error::malformed(format!("bitmap directory entry {what}"), here);
        let entry = dir.get(pos..).ok_or_else(|| bad("is truncated"))?;
        let granularity_bits = *entry.get(17).ok_or_else(|| bad("is truncated"))?;
        let name_len = usize::from(be_u16(entry, 18).ok_or_else(|| bad("is truncated"))?);
        let extra_len = be_u32(entry, 20).ok_or_else(|| bad("is truncated"))? as usize;
        let flags = be_u32(entry, 12).ok_or_else(|| bad("is truncated"))?;
        let _table_offset = be_u64(entry, 0).ok_or_else(|| bad("is truncated"))?;
        if !(9..=31).contains(&granularity_bits) {
            return Err(bad(&format!(
                "has granularity bits {granularity_bits} outside 9..=31"
            )));
        }
        let name_at = ENTRY_HEADER_LEN
            .checked_add(extra_len)
            .ok_or_else(|| bad("is too long"))?;
        let name = field(entry, name_at, name_len).ok_or_else(|| bad("is truncated"))?;
        let len =
            align8(name_at.saturating_add(name_len) as u64).ok_or_else(|| bad("is too long"))?;
        out.push(Bitmap {
            name: lossy(name),
            granularity: 1u64 << granularity_bits,
            flags,
        });
        pos = pos
            .checked_add(len as usize)
            .ok_or_else(|| bad("is too long"))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_two_entries() {
        let mut dir = Vec::new();
        for (name, bits) in [("b0", 16u8), ("backup-1", 17)] {
            dir.extend(0x70000u64.to_be_bytes()); // bitmap_table_offset
            dir.extend(1u32.to_be_bytes()); // bitmap_table_size
            dir.extend(FLAG_AUTO.to_be_bytes()); // flags
            dir.push(1); // type: dirty tracking
            dir.push(bits); // granularity_bits
            dir.extend((name.len() as u16).to_be_bytes()); // name_size
            dir.extend(0u32.to_be_bytes()); // extra_data_size
            dir.extend(name.as_bytes());
            while dir.len() % 8 != 0 {
                dir.push(0);
            }
        }
        let b = parse_directory(&dir, 2, 0).unwrap();
        assert_eq!(b[0].name, "b0");
        assert_eq!(b[0].granularity, 65536);
        assert_eq!(b[1].name, "backup-1");
        assert_eq!(b[1].flag_names(), vec!["auto"]);
        assert!(parse_directory(&dir, 3, 0).is_err());
    }
}
