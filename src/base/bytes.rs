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

/// How many bytes `span` starts with that are zero: whole blocks are tested at once (an OR
/// over a block, which the compiler vectorises; an early exit per byte would not be), then
/// bytes within the first block that is not all zero. Walks of sparse L2 tables step over
/// their zero entries with it.
pub(crate) fn leading_zero_bytes(span: &[u8]) -> usize {
    const BLOCK: usize = 64;
    let blocks = span
        .chunks(BLOCK)
        .position(|b| b.iter().fold(0u8, |acc, &x| acc | x) != 0);
    let Some(block) = blocks else {
        return span.len();
    };
    let start = block.saturating_mul(BLOCK);
    let within = span
        .get(start..)
        .unwrap_or_default()
        .iter()
        .position(|&x| x != 0)
        .unwrap_or(0);
    start.saturating_add(within)
}

#[cfg(test)]
mod tests {
    use super::leading_zero_bytes;

    #[test]
    fn leading_zero_bytes_finds_the_first_non_zero_byte() {
        let mut span = vec![0u8; 300];
        assert_eq!(leading_zero_bytes(&span), 300);
        assert_eq!(leading_zero_bytes(&[]), 0);
        span[130] = 1;
        assert_eq!(leading_zero_bytes(&span), 130);
        span[3] = 9;
        assert_eq!(leading_zero_bytes(&span), 3);
    }
}
