//! Internal snapshots: the snapshot table (spec: "Snapshots").
//!
//! Each entry is a 40-byte fixed part, `extra_data_size` bytes of extra data, the id string,
//! the name, and padding to 8 bytes. Parsing is pure; the I/O layer reads entry by entry.

use crate::base::bytes::{align8, be_u16, be_u32, be_u64, field, lossy};
use crate::base::limits::Limits;
use crate::error::{Error, Result};
use crate::format::header::SNAPSHOT_HEADER_LEN;

/// Byte offsets in a snapshot table entry (spec: "Snapshot table entry").
mod at {
    pub const L1_TABLE_OFFSET: usize = 0;
    pub const L1_SIZE: usize = 8;
    pub const ID_LEN: usize = 12;
    pub const NAME_LEN: usize = 14;
    pub const DATE_SEC: usize = 16;
    pub const DATE_NSEC: usize = 20;
    pub const VM_CLOCK_NSEC: usize = 24;
    pub const VM_STATE_SIZE_32: usize = 32;
    pub const EXTRA_DATA_SIZE: usize = 36;
    /// The extra data, then the id, then the name, follow the fixed part.
    pub const EXTRA_DATA: usize = 40;
    // Fields of the extra data, each present when the extra data is long enough.
    pub const EXTRA_VM_STATE_SIZE: usize = 0;
    pub const EXTRA_DISK_SIZE: usize = 8;
    pub const EXTRA_ICOUNT: usize = 16;
}

/// One internal snapshot.
///
/// ```
/// let image = qcow2::Qcow2::open_path("fixtures/snap.qcow2")?;
/// let names: Vec<&str> = image.snapshots().iter().map(|s| s.name.as_str()).collect();
/// assert_eq!(names, ["s1", "s2"]);
/// let reader = image.snapshot_reader("s1")?; // by id ("1") or name
/// # let _ = reader;
/// # Ok::<(), qcow2::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Unique id string (QEMU numbers them "1", "2", ...).
    pub id: String,
    /// Name given by the user.
    pub name: String,
    /// File offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Creation time, seconds since the Unix epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock when the snapshot was taken, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state, bytes (0 for disk-only snapshots).
    pub vm_state_size: u64,
    /// Guest disk size at the time of the snapshot, when recorded (version 3 always records it).
    pub disk_size: Option<u64>,
    /// Instruction count for record/replay, when recorded.
    pub icount: Option<u64>,
}

/// Length of the entry whose 40-byte fixed part is `fixed`: `(data, padded)`. Only the data
/// need be in the file (QEMU does not write the last entry's padding); the next entry starts
/// after the padding.
pub(crate) fn entry_len(fixed: &[u8], at: u64, limits: &Limits) -> Result<(u64, u64)> {
    let bad = || Error::malformed("snapshot table entry is truncated", at);
    let id_len = be_u16(fixed, at::ID_LEN).ok_or_else(bad)?;
    let name_len = be_u16(fixed, at::NAME_LEN).ok_or_else(bad)?;
    let extra_len = be_u32(fixed, at::EXTRA_DATA_SIZE).ok_or_else(bad)?;
    Limits::check(
        "snapshot extra data",
        u64::from(extra_len),
        limits.max_snapshot_extra_bytes,
    )?;
    // Each part fits in 32 bits: the sum cannot overflow 64.
    let raw = [u64::from(extra_len), u64::from(id_len), u64::from(name_len)]
        .iter()
        .fold(SNAPSHOT_HEADER_LEN, |sum, part| sum.saturating_add(*part));
    Ok((raw, align8(raw).ok_or_else(bad)?))
}

/// Parse one whole entry (as long as [`entry_len`] said).
pub(crate) fn parse_entry(entry: &[u8], at: u64) -> Result<Snapshot> {
    let bad = || Error::malformed("snapshot table entry is truncated", at);
    let extra_len = be_u32(entry, at::EXTRA_DATA_SIZE).ok_or_else(bad)? as usize;
    let id_len = usize::from(be_u16(entry, at::ID_LEN).ok_or_else(bad)?);
    let name_len = usize::from(be_u16(entry, at::NAME_LEN).ok_or_else(bad)?);
    let extra = field(entry, at::EXTRA_DATA, extra_len).ok_or_else(bad)?;
    let id_at = at::EXTRA_DATA.checked_add(extra_len).ok_or_else(bad)?;
    let id = field(entry, id_at, id_len).ok_or_else(bad)?;
    let name =
        field(entry, id_at.checked_add(id_len).ok_or_else(bad)?, name_len).ok_or_else(bad)?;
    let small_vm_state = u64::from(be_u32(entry, at::VM_STATE_SIZE_32).ok_or_else(bad)?);
    Ok(Snapshot {
        id: lossy(id),
        name: lossy(name),
        l1_table_offset: be_u64(entry, at::L1_TABLE_OFFSET).ok_or_else(bad)?,
        l1_size: be_u32(entry, at::L1_SIZE).ok_or_else(bad)?,
        date_sec: be_u32(entry, at::DATE_SEC).ok_or_else(bad)?,
        date_nsec: be_u32(entry, at::DATE_NSEC).ok_or_else(bad)?,
        vm_clock_nsec: be_u64(entry, at::VM_CLOCK_NSEC).ok_or_else(bad)?,
        // Extra data bytes 0-7 supersede the 32-bit field when present.
        vm_state_size: be_u64(extra, at::EXTRA_VM_STATE_SIZE).unwrap_or(small_vm_state),
        disk_size: be_u64(extra, at::EXTRA_DISK_SIZE),
        icount: be_u64(extra, at::EXTRA_ICOUNT),
    })
}

/// Bytes of extra data QEMU writes after each entry's fixed part: the 64-bit VM state size,
/// the disk size and the instruction count.
const EXTRA_LEN: usize = 24;

/// A snapshot table entry as QEMU writes it (with 24 bytes of extra data), padded to 8
/// bytes; `None` when the id or the name is longer than 65535 bytes.
pub(crate) fn encode_entry(s: &Snapshot) -> Option<Vec<u8>> {
    let id_len = u16::try_from(s.id.len()).ok()?;
    let name_len = u16::try_from(s.name.len()).ok()?;
    let mut out = vec![0u8; at::EXTRA_DATA + EXTRA_LEN];
    let small_vm_state = u32::try_from(s.vm_state_size).unwrap_or(u32::MAX);
    put(
        &mut out,
        at::L1_TABLE_OFFSET,
        &s.l1_table_offset.to_be_bytes(),
    );
    put(&mut out, at::L1_SIZE, &s.l1_size.to_be_bytes());
    put(&mut out, at::ID_LEN, &id_len.to_be_bytes());
    put(&mut out, at::NAME_LEN, &name_len.to_be_bytes());
    put(&mut out, at::DATE_SEC, &s.date_sec.to_be_bytes());
    put(&mut out, at::DATE_NSEC, &s.date_nsec.to_be_bytes());
    put(&mut out, at::VM_CLOCK_NSEC, &s.vm_clock_nsec.to_be_bytes());
    put(
        &mut out,
        at::VM_STATE_SIZE_32,
        &small_vm_state.to_be_bytes(),
    );
    put(
        &mut out,
        at::EXTRA_DATA_SIZE,
        &(EXTRA_LEN as u32).to_be_bytes(),
    );
    let extra = at::EXTRA_DATA;
    put(
        &mut out,
        extra + at::EXTRA_VM_STATE_SIZE,
        &s.vm_state_size.to_be_bytes(),
    );
    put(
        &mut out,
        extra + at::EXTRA_DISK_SIZE,
        &s.disk_size.unwrap_or(0).to_be_bytes(),
    );
    put(
        &mut out,
        extra + at::EXTRA_ICOUNT,
        &s.icount.unwrap_or(u64::MAX).to_be_bytes(),
    );
    out.extend_from_slice(s.id.as_bytes());
    out.extend_from_slice(s.name.as_bytes());
    out.resize(out.len().div_ceil(8).saturating_mul(8), 0);
    Some(out)
}

/// Copy `bytes` into `buf` at `at` (the fixed part is long enough for every field).
fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = buf.get_mut(at..at.saturating_add(bytes.len())) {
        dst.copy_from_slice(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(extra: &[u8], id: &str, name: &str) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend(0x50000u64.to_be_bytes()); // l1_table_offset
        e.extend(8u32.to_be_bytes()); // l1_size
        e.extend((id.len() as u16).to_be_bytes()); // id_str_size
        e.extend((name.len() as u16).to_be_bytes()); // name_size
        e.extend(1_700_000_000u32.to_be_bytes()); // date_sec
        e.extend(5u32.to_be_bytes()); // date_nsec
        e.extend(42u64.to_be_bytes()); // vm_clock_nsec
        e.extend(7u32.to_be_bytes()); // vm_state_size
        e.extend((extra.len() as u32).to_be_bytes()); // extra_data_size
        e.extend(extra);
        e.extend(id.as_bytes());
        e.extend(name.as_bytes());
        while e.len() % 8 != 0 {
            e.push(0);
        }
        e
    }

    #[test]
    fn v3_entry_with_extra_data() {
        let mut extra = 1234u64.to_be_bytes().to_vec(); // vm_state_size_large
        extra.extend((1u64 << 30).to_be_bytes()); // disk_size
        let e = entry(&extra, "1", "before-upgrade");
        let (data, padded) = entry_len(&e, 0, &Limits::default()).unwrap();
        assert_eq!(padded, e.len() as u64);
        assert_eq!(data, 40 + 16 + 1 + 14);
        let s = parse_entry(&e, 0).unwrap();
        assert_eq!(s.id, "1");
        assert_eq!(s.name, "before-upgrade");
        assert_eq!(s.l1_size, 8);
        assert_eq!(s.vm_state_size, 1234);
        assert_eq!(s.disk_size, Some(1 << 30));
        assert_eq!(s.icount, None);
    }

    #[test]
    fn v2_entry_without_extra_data() {
        let e = entry(&[], "7", "old");
        let s = parse_entry(&e, 0).unwrap();
        assert_eq!(s.vm_state_size, 7);
        assert_eq!(s.disk_size, None);
    }

    #[test]
    fn truncated_and_oversized_entries_fail() {
        let e = entry(&[], "1", "name");
        assert!(parse_entry(&e[..44], 0).is_err());
        let mut huge = e.clone();
        huge[36..40].copy_from_slice(&5000u32.to_be_bytes());
        assert!(matches!(
            entry_len(&huge, 0, &Limits::default()),
            Err(Error::LimitExceeded { .. })
        ));
    }

    #[test]
    fn encoded_entries_parse_back() {
        let snap = Snapshot {
            id: "7".into(),
            name: "before upgrade".into(),
            l1_table_offset: 0x30000,
            l1_size: 2,
            date_sec: 1_796_546_032,
            date_nsec: 697_425_000,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(16 << 20),
            icount: Some(0),
        };
        let bytes = encode_entry(&snap).unwrap();
        assert_eq!(bytes.len() % 8, 0);
        let (len, padded) = entry_len(&bytes, 0, &Limits::default()).unwrap();
        assert_eq!(padded, bytes.len() as u64);
        assert_eq!(parse_entry(&bytes[..len as usize], 0).unwrap(), snap);
    }
}
