//! Bounds-checked big-endian field access for the pure parsers.

use byteorder::{BigEndian, ByteOrder};

/// `len` bytes of `buf` starting at `at`, or `None` when they are not all there.
pub(crate) fn field(buf: &[u8], at: usize, len: usize) -> Option<&[u8]> {
    buf.get(at..at.checked_add(len)?)
}

/// Big-endian `u16` at `at`.
pub(crate) fn be_u16(buf: &[u8], at: usize) -> Option<u16> {
    field(buf, at, 2).map(BigEndian::read_u16)
}

/// Big-endian `u32` at `at`.
pub(crate) fn be_u32(buf: &[u8], at: usize) -> Option<u32> {
    field(buf, at, 4).map(BigEndian::read_u32)
}

/// Big-endian `u64` at `at`.
#[inline]
pub(crate) fn be_u64(buf: &[u8], at: usize) -> Option<u64> {
    field(buf, at, 8).map(BigEndian::read_u64)
}

/// Round `n` up to a multiple of 8, as qcow2 pads extensions and table entries.
pub(crate) fn align8(n: u64) -> Option<u64> {
    Some(n.checked_add(7)? & !7)
}

/// The low `bits` bits of `x`: an offset within a power-of-two sized block.
#[inline]
pub(crate) fn low_bits(x: u64, bits: u32) -> u64 {
    x & 1u64
        .checked_shl(bits)
        .map_or(u64::MAX, |v| v.wrapping_sub(1))
}

/// A name stored as bytes in the image, shown lossily (names are not guaranteed UTF-8).
pub(crate) fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `bytes` up to its first NUL: how QEMU reads names it stores as C strings.
pub(crate) fn until_nul(bytes: &[u8]) -> &[u8] {
    bytes.split(|&b| b == 0).next().unwrap_or_default()
}
