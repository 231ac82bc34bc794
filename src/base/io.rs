//! Reading from the image source with bounded allocation and clear errors.

use positioned_io::ReadAt;
use std::io;

use crate::error::{Error, Result};

/// Largest single allocation made ahead of data actually read.
const CHUNK: usize = 1 << 20;

/// Read into `buf` from `pos` until it is full or the source ends; returns bytes read.
pub(crate) fn read_up_to<R: ReadAt + ?Sized>(
    src: &R,
    pos: u64,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut done = 0;
    while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
        let Some(at) = pos.checked_add(done as u64) else {
            break;
        };
        match src.read_at(at, rest) {
            Ok(0) => break,
            Ok(n) => done = done.saturating_add(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Read exactly `len` bytes of metadata at `pos`. The buffer grows as data arrives, so a
/// table that claims more than the file holds fails before it is allocated in full.
pub(crate) fn read_metadata<R: ReadAt + ?Sized>(
    src: &R,
    pos: u64,
    len: u64,
    what: &'static str,
) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    read_metadata_into(src, pos, len, what, &mut out)?;
    Ok(out)
}

/// [`read_metadata`] into `out` (replacing what it held), reusing its memory.
pub(crate) fn read_metadata_into<R: ReadAt + ?Sized>(
    src: &R,
    pos: u64,
    len: u64,
    what: &'static str,
    out: &mut Vec<u8>,
) -> Result<()> {
    let total =
        usize::try_from(len).map_err(|_| Error::malformed(format!("{what} is too large"), pos))?;
    // The buffer grows a chunk at a time (a length the file may not back costs no more than
    // what was read), and what it held is overwritten, not zeroed first: a walk reuses it
    // for every table.
    out.truncate(total);
    let mut filled = 0usize;
    while filled < total {
        let step = total.saturating_sub(filled).min(CHUNK);
        let end = filled.saturating_add(step);
        if out.len() < end {
            out.resize(end, 0);
        }
        let at = pos
            .checked_add(filled as u64)
            .ok_or_else(|| Error::malformed(format!("{what} offset overflows"), pos))?;
        let chunk = out.get_mut(filled..end).unwrap_or_default();
        let got = read_up_to(src, at, chunk)
            .map_err(|e| Error::io(format!("reading {what} at {at:#x}"), e))?;
        if got < step {
            return Err(Error::PastEnd {
                what,
                offset: pos,
                len,
            });
        }
        filled = end;
    }
    Ok(())
}

/// Fail unless the source has a byte at `pos + len - 1`: a cheap check that a structure lies
/// within the file without reading all of it.
pub(crate) fn check_within<R: ReadAt + ?Sized>(
    src: &R,
    pos: u64,
    len: u64,
    what: &'static str,
) -> Result<()> {
    let Some(last) = len.checked_sub(1).and_then(|l| pos.checked_add(l)) else {
        return Ok(());
    };
    let mut byte = [0u8; 1];
    let got =
        read_up_to(src, last, &mut byte).map_err(|e| Error::io(format!("reading {what}"), e))?;
    if got == 0 {
        return Err(Error::PastEnd {
            what,
            offset: pos,
            len,
        });
    }
    Ok(())
}

/// Decode a big-endian table of `u64` entries, straight into shared storage.
pub(crate) fn be_u64_table(bytes: &[u8]) -> std::sync::Arc<[u64]> {
    bytes
        .chunks_exact(8)
        .map(|c| c.try_into().map(u64::from_be_bytes).unwrap_or(0))
        .collect()
}
