//! Persistent dirty bitmaps (spec: "Bitmaps extension", "Bitmap directory", "Bitmap table").
//!
//! Pure parsers: the bitmap directory with the checks QEMU makes when it loads it
//! (`bitmap_list_load` and `check_dir_entry` in block/qcow2-bitmap.c), bitmap table entries,
//! and the bit layout of bitmap data. Reading them from the image is in `dirty.rs`.
//!
//! Pure encoders, their inverses, for the writer (`image/write/bitmaps.rs`): directory
//! entries as QEMU's `bitmap_list_store` writes them, table entries, and bitmap data held as
//! 64-bit words.

use crate::base::bytes::{align8, be_u16, be_u32, be_u64, lossy, low_bits};
use crate::error::{Error, Result};

/// Fixed part of a bitmap directory entry (spec: bytes 0-23).
const ENTRY_HEADER_LEN: usize = 24;
/// Flag bit 0: the bitmap is in use (was not saved cleanly): its data is not to be trusted.
pub(crate) const FLAG_IN_USE: u32 = 1 << 0;
/// Flag bit 1: the bitmap is automatically updated with guest writes.
pub(crate) const FLAG_AUTO: u32 = 1 << 1;
/// Flag bits 2-31 are reserved (QEMU: `BME_RESERVED_FLAGS`).
const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO);
/// The only bitmap type: dirty tracking (QEMU: `BT_DIRTY_TRACKING_BITMAP`).
const TYPE_DIRTY_TRACKING: u8 = 1;
/// Granularity bits QEMU accepts (`BME_MIN_GRANULARITY_BITS`, `BME_MAX_GRANULARITY_BITS`).
const GRANULARITY_BITS: std::ops::RangeInclusive<u8> = 9..=31;
/// Longest name (QEMU: `BME_MAX_NAME_SIZE`).
const MAX_NAME_LEN: u16 = 1023;
/// Most bitmap table entries (QEMU: `BME_MAX_TABLE_SIZE`).
const MAX_TABLE_ENTRIES: u32 = 0x800_0000;
/// Most bytes of bitmap data, table entries times cluster size (QEMU: `BME_MAX_PHYS_SIZE`).
const MAX_DATA_BYTES: u64 = 0x2000_0000;

/// Bitmap table entry bits 1-8 and 56-63 are reserved (QEMU: `BME_TABLE_ENTRY_RESERVED_MASK`).
const TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry bits 9-55: the data cluster's offset.
const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry bit 0, with offset 0: the cluster's bits are all ones.
const TABLE_ALL_ONES: u64 = 1;

/// A persistent dirty bitmap stored in the image: one entry of the bitmap directory.
///
/// Each bit covers `granularity` bytes of the guest disk; a set bit means the bytes were
/// written since the bitmap was created or cleared. [`Qcow2::dirty_extents`] reads them.
///
/// [`Qcow2::dirty_extents`]: crate::Qcow2::dirty_extents
///
/// ```
/// let image = qcow2::Qcow2::open_path("fixtures/bitmaps.qcow2")?;
/// for bitmap in image.bitmaps() {
///     println!("{}: granularity {}, in use {}", bitmap.name, bitmap.granularity, bitmap.in_use());
/// }
/// assert_eq!(image.bitmaps().len(), 2);
/// # Ok::<(), qcow2::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Bitmap {
    /// Its name, as QEMU reads it: up to the first NUL byte, shown lossily when not UTF-8.
    pub name: String,
    /// Bytes of guest data per bit (a power of two, 512 B to 2 GiB).
    pub granularity: u64,
    /// Raw flags (bit 0 in-use, bit 1 auto).
    pub flags: u32,
    /// Bitmap type (spec: entry byte 16); always 1, dirty tracking, in an image that opened.
    pub bitmap_type: u8,
    /// File offset of the bitmap table (cluster aligned).
    pub table_offset: u64,
    /// Number of 8-byte entries in the bitmap table; each describes one cluster of data.
    pub table_size: u32,
    /// Bytes of extra data in the directory entry (always 0: QEMU refuses any).
    pub extra_data_size: u32,
    /// File offset of this entry in the bitmap directory.
    pub entry_offset: u64,
    /// The name's bytes up to the first NUL, unaltered (`name` may be lossy).
    pub(crate) raw_name: Vec<u8>,
}

impl Bitmap {
    /// The flag names `qemu-img info` prints (`in-use`, `auto`).
    pub fn flag_names(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.in_use() {
            names.push("in-use");
        }
        if self.auto() {
            names.push("auto");
        }
        names
    }

    /// Whether the in-use flag is set: the bitmap was not saved cleanly, so QEMU considers
    /// it inconsistent and will not use its contents.
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }

    /// Whether the auto flag is set: QEMU records guest writes in it (it is enabled).
    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }

    /// The number of bitmap data clusters the guest size needs, as QEMU computes it when it
    /// loads the bitmap (`load_bitmap_data`): one bit per granule, `cluster_size * 8` bits
    /// per cluster.
    pub(crate) fn clusters_needed(&self, guest_size: u64, cluster_bits: u32) -> u64 {
        let granules = div_ceil_pow2(guest_size, self.granularity.trailing_zeros());
        div_ceil_pow2(granules, cluster_bits.saturating_add(3))
    }
}

/// `n / 2^bits`, rounded up.
fn div_ceil_pow2(n: u64, bits: u32) -> u64 {
    let whole = n.checked_shr(bits).unwrap_or(0);
    whole.saturating_add(u64::from(low_bits(n, bits) != 0))
}

/// What the directory is checked against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DirectoryContext {
    /// The extension's `nb_bitmaps`.
    pub nb_bitmaps: u32,
    /// File offset of the directory, for error offsets.
    pub offset: u64,
    /// The image's cluster bits.
    pub cluster_bits: u32,
    /// The guest size in bytes (QEMU's `bdrv_getlength`).
    pub guest_size: u64,
}

/// Parse and check a bitmap directory as QEMU's `bitmap_list_load` does: entries follow each
/// other to the exact end of the directory, there are exactly `nb_bitmaps` of them, none has
/// extra data, and each satisfies `check_dir_entry`.
pub(crate) fn parse_directory(dir: &[u8], ctx: &DirectoryContext) -> Result<Vec<Bitmap>> {
    if dir.is_empty() {
        return Err(Error::malformed(
            "bitmap directory size is zero",
            ctx.offset,
        ));
    }
    let mut out = Vec::new();
    let mut pos = 0usize;
    let mut count = 0u32;
    while pos < dir.len() {
        let here = ctx.offset.saturating_add(pos as u64);
        let entry = dir.get(pos..).unwrap_or_default();
        if entry.len() < ENTRY_HEADER_LEN {
            return Err(broken(
                here,
                "entry header runs past the end of the directory",
            ));
        }
        count = count.saturating_add(1);
        if count > ctx.nb_bitmaps {
            return Err(Error::malformed(
                format!(
                    "bitmap directory holds more entries than the {} the bitmaps extension says",
                    ctx.nb_bitmaps
                ),
                here,
            ));
        }
        let (raw, len) = parse_entry(entry, here)?;
        out.push(check_entry(raw, ctx)?);
        pos = pos.saturating_add(len);
    }
    if count != ctx.nb_bitmaps {
        return Err(Error::malformed(
            format!(
                "bitmap directory holds {count} entries, the bitmaps extension says {}",
                ctx.nb_bitmaps
            ),
            ctx.offset,
        ));
    }
    Ok(out)
}

fn broken(at: u64, what: &str) -> Error {
    Error::malformed(format!("broken bitmap directory: {what}"), at)
}

/// A directory entry's fields, before QEMU's checks.
struct RawEntry {
    table_offset: u64,
    table_size: u32,
    flags: u32,
    bitmap_type: u8,
    granularity_bits: u8,
    /// The name field's length (`name_size`), which QEMU limits, NULs included.
    name_size: u16,
    /// Up to the first NUL.
    name: Vec<u8>,
    extra_data_size: u32,
    at: u64,
}

/// One directory entry (at least [`ENTRY_HEADER_LEN`] bytes are there) and its padded length.
fn parse_entry(entry: &[u8], at: u64) -> Result<(RawEntry, usize)> {
    let truncated = || broken(at, "entry header is truncated");
    let table_offset = be_u64(entry, 0).ok_or_else(truncated)?;
    let table_size = be_u32(entry, 8).ok_or_else(truncated)?;
    let flags = be_u32(entry, 12).ok_or_else(truncated)?;
    let bitmap_type = *entry.get(16).ok_or_else(truncated)?;
    let granularity_bits = *entry.get(17).ok_or_else(truncated)?;
    let name_len = be_u16(entry, 18).ok_or_else(truncated)?;
    let extra_data_size = be_u32(entry, 20).ok_or_else(truncated)?;
    let name_at = ENTRY_HEADER_LEN.saturating_add(extra_data_size as usize);
    let end = name_at.saturating_add(usize::from(name_len));
    let len = align8(end as u64).unwrap_or(u64::MAX);
    if len > entry.len() as u64 {
        return Err(broken(
            at,
            &format!("entry of {len} bytes runs past the end of the directory"),
        ));
    }
    if extra_data_size != 0 {
        return Err(Error::malformed(
            format!(
                "bitmap has {extra_data_size} bytes of extra data, which QEMU does not support"
            ),
            at,
        ));
    }
    let stored = entry.get(name_at..end).unwrap_or_default();
    // QEMU copies the name with g_strndup: it ends at the first NUL.
    let name = stored
        .split(|&b| b == 0)
        .next()
        .unwrap_or_default()
        .to_vec();
    let raw = RawEntry {
        table_offset,
        table_size,
        flags,
        bitmap_type,
        granularity_bits,
        name_size: name_len,
        name,
        extra_data_size,
        at,
    };
    Ok((raw, len as usize))
}

/// QEMU's `check_dir_entry`: the entry's fields, and a table big enough for the guest unless
/// the bitmap is in use.
fn check_entry(e: RawEntry, ctx: &DirectoryContext) -> Result<Bitmap> {
    let bad = |what: String| {
        Error::malformed(
            format!(
                "bitmap {:?} does not satisfy the constraints: {what}",
                lossy(&e.name)
            ),
            e.at,
        )
    };
    if e.table_size == 0 {
        return Err(bad("its table has no entries".into()));
    }
    if e.table_offset == 0 || low_bits(e.table_offset, ctx.cluster_bits) != 0 {
        return Err(bad(format!(
            "table offset {:#x} is zero or not cluster aligned",
            e.table_offset
        )));
    }
    if e.table_size > MAX_TABLE_ENTRIES {
        return Err(bad(format!(
            "table of {} entries is over {MAX_TABLE_ENTRIES}",
            e.table_size
        )));
    }
    if !GRANULARITY_BITS.contains(&e.granularity_bits) {
        return Err(bad(format!(
            "granularity bits {} outside 9..=31",
            e.granularity_bits
        )));
    }
    if e.flags & RESERVED_FLAGS != 0 {
        return Err(bad(format!("reserved flags {:#x} are set", e.flags)));
    }
    if e.name_size > MAX_NAME_LEN {
        return Err(bad("name is longer than 1023 bytes".into()));
    }
    if e.bitmap_type != TYPE_DIRTY_TRACKING {
        return Err(bad(format!(
            "type {} is not 1 (dirty tracking)",
            e.bitmap_type
        )));
    }
    let data_bytes = u64::from(e.table_size)
        .checked_shl(ctx.cluster_bits)
        .unwrap_or(u64::MAX);
    if data_bytes > MAX_DATA_BYTES {
        return Err(bad(format!(
            "{data_bytes} bytes of bitmap data are over {MAX_DATA_BYTES}"
        )));
    }
    let granularity = 1u64.checked_shl(u32::from(e.granularity_bits)).unwrap_or(0);
    // At most 2^29 bytes of data, 2^32 bits, each covering at most 2^31 bytes: no overflow.
    let covered = data_bytes.saturating_mul(8).saturating_mul(granularity);
    if e.flags & FLAG_IN_USE == 0 && ctx.guest_size > covered {
        return Err(bad(format!(
            "its table covers {covered} bytes, less than the guest's {}",
            ctx.guest_size
        )));
    }
    Ok(Bitmap {
        name: lossy(&e.name),
        granularity,
        flags: e.flags,
        bitmap_type: e.bitmap_type,
        table_offset: e.table_offset,
        table_size: e.table_size,
        extra_data_size: e.extra_data_size,
        entry_offset: e.at,
        raw_name: e.name,
    })
}

/// The name QEMU refuses as a duplicate when it loads bitmaps (`bdrv_create_dirty_bitmap`):
/// an earlier bitmap has the same name, unless this one is in use (QEMU then skips it).
pub(crate) fn check_duplicates(bitmaps: &[Bitmap]) -> Result<()> {
    // A set, not a scan of the earlier entries: 65535 bitmaps (QEMU's limit) would otherwise
    // cost two billion name comparisons at open.
    let mut seen = std::collections::HashSet::with_capacity(bitmaps.len());
    for b in bitmaps {
        let first = seen.insert(b.raw_name.as_slice());
        if !first && !b.in_use() {
            return Err(Error::malformed(
                format!("bitmap {:?} appears twice in the bitmap directory", b.name),
                b.entry_offset,
            ));
        }
    }
    Ok(())
}

/// What one bitmap table entry says about its cluster of bitmap data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DataCluster {
    /// Every bit is zero (offset 0, bit 0 clear).
    Zeros,
    /// Every bit is one (offset 0, bit 0 set).
    Ones,
    /// The bits are in the cluster at this file offset.
    At(u64),
}

/// Decode a bitmap table entry as QEMU's `check_table_entry` checks it; `Err` says what is
/// wrong with it.
pub(crate) fn decode_table_entry(
    entry: u64,
    cluster_bits: u32,
) -> std::result::Result<DataCluster, String> {
    if entry & TABLE_RESERVED_MASK != 0 {
        return Err(format!(
            "bitmap table entry {entry:#x} has reserved bits set"
        ));
    }
    let offset = entry & TABLE_OFFSET_MASK;
    if offset == 0 {
        return Ok(if entry & TABLE_ALL_ONES != 0 {
            DataCluster::Ones
        } else {
            DataCluster::Zeros
        });
    }
    if entry & TABLE_ALL_ONES != 0 {
        return Err(format!(
            "bitmap table entry {entry:#x} has both an offset and the all-ones bit"
        ));
    }
    if low_bits(offset, cluster_bits) != 0 {
        return Err(format!(
            "bitmap data offset {offset:#x} is not cluster aligned"
        ));
    }
    Ok(DataCluster::At(offset))
}

/// Index of the first bit at or after `from` that equals `set`, in bitmap data as QEMU lays
/// it out: byte 0 holds bits 0-7, least significant bit first. `None` when there is none.
pub(crate) fn next_bit(data: &[u8], from: usize, set: bool) -> Option<usize> {
    let mut byte_at = from / 8;
    let mut skip = from % 8;
    while let Some(&byte) = data.get(byte_at) {
        let wanted = if set { byte } else { !byte };
        // Drop the bits before `from` in the first byte.
        let wanted = wanted.checked_shr(skip as u32).unwrap_or(0);
        if wanted != 0 {
            let bit = wanted.trailing_zeros() as usize;
            return Some(
                byte_at
                    .saturating_mul(8)
                    .saturating_add(skip)
                    .saturating_add(bit),
            );
        }
        skip = 0;
        // Whole bytes of the wrong value: skip them eight at a time.
        byte_at = byte_at.saturating_add(1);
        let skip_to = if set { 0x00 } else { 0xff };
        while let Some(chunk) = data.get(byte_at..byte_at.saturating_add(8)) {
            if chunk.iter().any(|&b| b != skip_to) {
                break;
            }
            byte_at = byte_at.saturating_add(8);
        }
    }
    None
}

/// Whether a bitmap table of `entries` entries, each naming a cluster of `2^cluster_bits`
/// bytes, is within what QEMU stores (`check_constraints_on_bitmap`: at most
/// `BME_MAX_TABLE_SIZE` entries and `BME_MAX_PHYS_SIZE` bytes of data).
pub(crate) fn table_fits(entries: u64, cluster_bits: u32) -> bool {
    let bytes = entries.checked_shl(cluster_bits).unwrap_or(u64::MAX);
    entries <= u64::from(MAX_TABLE_ENTRIES)
        && bytes >> cluster_bits == entries
        && bytes <= MAX_DATA_BYTES
}

/// A directory entry as QEMU's `bitmap_list_store` writes it: the fixed fields, the name up to
/// its first NUL (what QEMU keeps of it), no extra data, zeros up to a multiple of 8 bytes.
pub(crate) fn encode_entry(b: &Bitmap, out: &mut Vec<u8>) {
    let name_len = u16::try_from(b.raw_name.len()).unwrap_or(u16::MAX);
    let name = b.raw_name.get(..usize::from(name_len)).unwrap_or_default();
    let start = out.len();
    out.extend(b.table_offset.to_be_bytes());
    out.extend(b.table_size.to_be_bytes());
    out.extend(b.flags.to_be_bytes());
    out.push(TYPE_DIRTY_TRACKING);
    out.push(b.granularity.trailing_zeros() as u8);
    out.extend(name_len.to_be_bytes());
    out.extend(0u32.to_be_bytes()); // extra_data_size
    out.extend(name);
    while out.len().saturating_sub(start) % 8 != 0 {
        out.push(0);
    }
}

/// A whole bitmap directory: the entries one after the other, in order.
pub(crate) fn encode_directory(bitmaps: &[Bitmap]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in bitmaps {
        encode_entry(b, &mut out);
    }
    out
}

/// A bitmap table entry, the inverse of [`decode_table_entry`].
pub(crate) fn encode_table_entry(cluster: DataCluster) -> u64 {
    match cluster {
        DataCluster::Zeros => 0,
        DataCluster::Ones => TABLE_ALL_ONES,
        DataCluster::At(offset) => offset & TABLE_OFFSET_MASK,
    }
}

/// A bitmap table, big-endian entries.
pub(crate) fn encode_table(table: &[DataCluster]) -> Vec<u8> {
    table
        .iter()
        .flat_map(|&c| encode_table_entry(c).to_be_bytes())
        .collect()
}

/// Set bits `[from, to)` of bitmap data held as words: bit `i` is bit `i % 64` of word
/// `i / 64`, so that [`words_to_bytes`] gives QEMU's layout. Bits past the words are ignored.
pub(crate) fn set_bits(words: &mut [u64], from: u64, to: u64) {
    let mut bit = from;
    while bit < to {
        let Some(word) = usize::try_from(bit / 64)
            .ok()
            .and_then(|w| words.get_mut(w))
        else {
            return;
        };
        let low = bit % 64;
        let span = 64u64.saturating_sub(low).min(to.saturating_sub(bit));
        // `span` ones shifted to `low`: all 64 bits when the run covers the word.
        let ones = u64::MAX
            .checked_shr(64u32.saturating_sub(span as u32))
            .unwrap_or(0);
        *word |= ones.checked_shl(low as u32).unwrap_or(0);
        bit = bit.saturating_add(span);
    }
}

/// Whether every one of bits `[0, count)` is set.
pub(crate) fn all_set(words: &[u64], count: u64) -> bool {
    let whole = usize::try_from(count / 64).unwrap_or(usize::MAX);
    let rest = count % 64;
    let full = words
        .get(..whole)
        .is_some_and(|w| w.iter().all(|&x| x == u64::MAX));
    let mask = (1u64 << rest).wrapping_sub(1);
    full && (rest == 0 || words.get(whole).is_some_and(|&w| w & mask == mask))
}

/// Clear every bit from `count` on (bits past the guest's end, which QEMU stores as zeros).
pub(crate) fn clear_from(words: &mut [u64], count: u64) {
    let whole = usize::try_from(count / 64).unwrap_or(usize::MAX);
    let rest = count % 64;
    let mut first_cleared = whole;
    if rest != 0 {
        if let Some(w) = words.get_mut(whole) {
            *w &= (1u64 << rest).wrapping_sub(1);
        }
        first_cleared = whole.saturating_add(1);
    }
    if let Some(tail) = words.get_mut(first_cleared..) {
        tail.fill(0);
    }
}

/// Bitmap data as stored: the words' bytes, least significant first.
pub(crate) fn words_to_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Bitmap data read from the image as words (a partial last word is padded with zeros).
pub(crate) fn bytes_to_words(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks(8)
        .map(|c| {
            let mut word = [0u8; 8];
            for (to, from) in word.iter_mut().zip(c) {
                *to = *from;
            }
            u64::from_le_bytes(word)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One directory entry, padded to 8 bytes.
    fn entry(
        name: &[u8],
        bits: u8,
        flags: u32,
        table: (u64, u32),
        kind: u8,
        extra: u32,
    ) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend(table.0.to_be_bytes()); // bitmap_table_offset
        e.extend(table.1.to_be_bytes()); // bitmap_table_size
        e.extend(flags.to_be_bytes()); // flags
        e.push(kind); // type
        e.push(bits); // granularity_bits
        e.extend((name.len() as u16).to_be_bytes()); // name_size
        e.extend(extra.to_be_bytes()); // extra_data_size
        e.extend(vec![0; extra as usize]); // extra data
        e.extend(name); // name
        while e.len() % 8 != 0 {
            e.push(0);
        }
        e
    }

    fn ok(name: &[u8]) -> Vec<u8> {
        entry(name, 16, FLAG_AUTO, (0x70000, 1), 1, 0)
    }

    /// 1 GiB guest, 64 KiB clusters: one table entry covers 32 GiB at 64 KiB granularity.
    fn ctx(nb: u32) -> DirectoryContext {
        DirectoryContext {
            nb_bitmaps: nb,
            offset: 0x1000,
            cluster_bits: 16,
            guest_size: 1 << 30,
        }
    }

    fn what(r: Result<Vec<Bitmap>>) -> String {
        match r {
            Err(Error::Malformed { what, .. }) => what,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn parses_two_entries() {
        let dir = [ok(b"b0"), ok(b"backup-1")].concat();
        let b = parse_directory(&dir, &ctx(2)).unwrap();
        assert_eq!(b[0].name, "b0");
        assert_eq!(b[0].granularity, 65536);
        assert_eq!(b[1].name, "backup-1");
        assert_eq!(b[1].entry_offset, 0x1020);
        assert_eq!(b[1].flag_names(), vec!["auto"]);
        assert!(what(parse_directory(&dir, &ctx(3))).contains("holds 2 entries"));
        assert!(what(parse_directory(&dir, &ctx(1))).contains("more entries"));
    }

    #[test]
    fn directory_must_end_with_its_last_entry() {
        let dir = ok(b"b0");
        assert!(what(parse_directory(&[], &ctx(1))).contains("zero"));
        let longer = [dir.clone(), vec![0; 8]].concat();
        assert!(what(parse_directory(&longer, &ctx(1))).contains("broken"));
        assert!(what(parse_directory(&dir[..dir.len() - 8], &ctx(1))).contains("broken"));
    }

    #[test]
    fn entry_constraints() {
        let refused = |e: Vec<u8>| what(parse_directory(&e, &ctx(1)));
        assert!(refused(entry(b"b", 16, 0, (0x70000, 1), 2, 0)).contains("type 2"));
        assert!(refused(entry(b"b", 16, 4, (0x70000, 1), 1, 0)).contains("reserved flags"));
        assert!(refused(entry(b"b", 8, 0, (0x70000, 1), 1, 0)).contains("granularity bits 8"));
        assert!(refused(entry(b"b", 32, 0, (0x70000, 1), 1, 0)).contains("granularity bits 32"));
        assert!(refused(entry(b"b", 16, 0, (0x70200, 1), 1, 0)).contains("aligned"));
        assert!(refused(entry(b"b", 16, 0, (0, 1), 1, 0)).contains("aligned"));
        assert!(refused(entry(b"b", 16, 0, (0x70000, 0), 1, 0)).contains("no entries"));
        assert!(refused(entry(b"b", 16, 0, (0x70000, 8193), 1, 0)).contains("bytes of bitmap data"));
        assert!(refused(entry(b"b", 16, 0, (0x70000, 1), 1, 8)).contains("extra data"));
        assert!(refused(entry(&[b'x'; 1024], 16, 0, (0x70000, 1), 1, 0)).contains("1023"));
        // QEMU limits the name field, not the name up to its NUL.
        let mut cut = vec![b'x'; 1024];
        cut[1] = 0;
        assert!(refused(entry(&cut, 16, 0, (0x70000, 1), 1, 0)).contains("1023"));
        // 512-byte granularity: one 64 KiB cluster covers 256 MiB, less than the guest...
        assert!(refused(entry(b"b", 9, 0, (0x70000, 1), 1, 0)).contains("covers"));
        // ... which QEMU accepts of a bitmap in use (its data is not loaded).
        assert!(parse_directory(&entry(b"b", 9, 1, (0x70000, 1), 1, 0), &ctx(1)).is_ok());
        // Names: empty, 1023 bytes, and cut at a NUL, as QEMU reads them.
        assert!(parse_directory(&entry(b"", 16, 0, (0x70000, 1), 1, 0), &ctx(1)).is_ok());
        assert!(parse_directory(&entry(&[b'x'; 1023], 16, 0, (0x70000, 1), 1, 0), &ctx(1)).is_ok());
        let b = parse_directory(&ok(b"ab\0c"), &ctx(1)).unwrap();
        assert_eq!(b[0].name, "ab");
    }

    #[test]
    fn duplicates_refused_unless_the_later_one_is_in_use() {
        let mut dup = ok(b"b0");
        dup[15] |= FLAG_IN_USE as u8;
        let dir = [ok(b"b0"), dup].concat();
        let list = parse_directory(&dir, &ctx(2)).unwrap();
        check_duplicates(&list).unwrap();
        let list = parse_directory(&[ok(b"b0"), ok(b"b0")].concat(), &ctx(2)).unwrap();
        assert!(check_duplicates(&list).is_err());
        let list = parse_directory(&[ok(b"b0\0x"), ok(b"b0")].concat(), &ctx(2)).unwrap();
        assert!(check_duplicates(&list).is_err(), "names end at a NUL");
    }

    #[test]
    fn table_entries() {
        assert_eq!(decode_table_entry(0, 16), Ok(DataCluster::Zeros));
        assert_eq!(decode_table_entry(1, 16), Ok(DataCluster::Ones));
        assert_eq!(
            decode_table_entry(0x30000, 16),
            Ok(DataCluster::At(0x30000))
        );
        assert!(decode_table_entry(0x30001, 16).is_err());
        assert!(decode_table_entry(0x30200, 16).is_err());
        assert!(decode_table_entry(0x30200, 9).is_ok());
        assert!(decode_table_entry(2, 16).is_err());
        assert!(decode_table_entry(1 << 56, 16).is_err());
    }

    #[test]
    fn bits_are_little_endian_within_bytes() {
        let data = [0b0000_0110u8, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0x7f];
        assert_eq!(next_bit(&data, 0, true), Some(1));
        assert_eq!(next_bit(&data, 2, true), Some(2));
        assert_eq!(next_bit(&data, 3, true), Some(72));
        assert_eq!(next_bit(&data, 72, false), Some(87));
        assert_eq!(next_bit(&data, 88, true), None);
        assert_eq!(next_bit(&[0xff; 16], 5, false), None);
        assert_eq!(next_bit(&[0; 16], 0, true), None);
    }

    #[test]
    fn clusters_needed_rounds_up() {
        let b = parse_directory(&ok(b"b0"), &ctx(1)).unwrap().remove(0);
        // 64 KiB granules, 2^19 bits per 64 KiB cluster: 32 GiB per cluster.
        assert_eq!(b.clusters_needed(0, 16), 0);
        assert_eq!(b.clusters_needed(1, 16), 1);
        assert_eq!(b.clusters_needed(32 << 30, 16), 1);
        assert_eq!(b.clusters_needed((32 << 30) + 1, 16), 2);
    }

    #[test]
    fn directory_encoding_round_trips_through_the_parser() {
        let dir = [
            entry(b"b0", 16, FLAG_AUTO | FLAG_IN_USE, (0x70000, 1), 1, 0),
            entry(b"backup-1", 9, 0, (0x80000, 4), 1, 0),
            entry(b"", 31, FLAG_AUTO, (0x90000, 1), 1, 0),
            entry(&[b'x'; 1023], 12, 0, (0xa0000, 1), 1, 0),
        ]
        .concat();
        let list = parse_directory(&dir, &ctx(4)).unwrap();
        assert_eq!(encode_directory(&list), dir);
        // A name cut at a NUL is written up to the NUL, as QEMU writes it: shorter.
        let cut = parse_directory(&ok(b"ab\0cdefgh"), &ctx(1)).unwrap();
        let short = encode_directory(&cut);
        assert_eq!(short, ok(b"ab"));
        assert_eq!(parse_directory(&short, &ctx(1)).unwrap()[0].name, "ab");
    }

    #[test]
    fn table_size_constraints() {
        // 512 MiB of data at most: 8192 clusters of 64 KiB, 2^20 of 512 B.
        assert!(table_fits(8192, 16));
        assert!(!table_fits(8193, 16));
        assert!(table_fits(1 << 20, 9));
        assert!(!table_fits((1 << 20) + 1, 9));
        assert!(!table_fits(u64::MAX, 9));
        assert!(table_fits(0, 21));
    }

    #[test]
    fn table_encoding_round_trips() {
        for c in [
            DataCluster::Zeros,
            DataCluster::Ones,
            DataCluster::At(0x30000),
        ] {
            assert_eq!(decode_table_entry(encode_table_entry(c), 16), Ok(c));
        }
        let t = encode_table(&[DataCluster::At(0x200), DataCluster::Ones]);
        assert_eq!(t, [0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn bit_ranges_set_in_words_read_back_in_qemus_layout() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..500 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let from = rng % 300;
            let to = from + (rng >> 20) % 150;
            let mut words = vec![0u64; 4];
            set_bits(&mut words, from, to);
            let bytes = words_to_bytes(&words);
            let end = to.min(256) as usize;
            let from = from as usize;
            if from < end {
                assert_eq!(next_bit(&bytes, 0, true), Some(from), "{from}..{to}");
                assert_eq!(
                    next_bit(&bytes, from, false),
                    Some(end).filter(|&e| e < 256)
                );
                assert_eq!(next_bit(&bytes, end, true), None);
            } else {
                assert_eq!(next_bit(&bytes, 0, true), None);
            }
            assert_eq!(bytes_to_words(&bytes), words);
        }
        let mut words = vec![0u64; 2];
        set_bits(&mut words, 0, 64);
        assert_eq!(words, [u64::MAX, 0]);
        set_bits(&mut words, 127, 500);
        assert_eq!(words, [u64::MAX, 1 << 63]);
    }

    #[test]
    fn all_set_and_clear_from_count_bits() {
        let mut words = vec![u64::MAX; 3];
        assert!(all_set(&words, 192));
        assert!(!all_set(&words, 193));
        clear_from(&mut words, 70);
        assert_eq!(words, [u64::MAX, 0x3f, 0]);
        assert!(all_set(&words, 70));
        assert!(!all_set(&words, 71));
        clear_from(&mut words, 64);
        assert_eq!(words, [u64::MAX, 0, 0]);
        assert!(all_set(&words, 64) && all_set(&words, 0));
        assert_eq!(bytes_to_words(&[1, 0, 0, 0, 0, 0, 0, 0, 0xff]), [1, 0xff]);
    }
}
