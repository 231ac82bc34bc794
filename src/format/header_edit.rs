//! Changing one extension of an existing image's first cluster, as QEMU's
//! `qcow2_update_header` rewrites it: the header fields kept, the extensions written again
//! with the one changed, the end marker, then the backing file name (its offset in the
//! header moved with it).
//!
//! Pure: bytes of the first cluster in, bytes out.

use crate::base::bytes::{be_u32, be_u64, field};
use crate::error::{Error, Result};
use crate::format::extension::{encode, encode_end, EXT_BACKING_FORMAT};
use crate::format::header::{at, V2_HEADER_LEN};
use crate::format::new_header::put;

/// The first cluster with extension `magic` set to `data` (added if missing, removed when
/// `data` is `None`), and the autoclear bits `autoclear_set` set and `autoclear_clear`
/// cleared (version 3).
pub(crate) fn with_extension(
    cluster0: &[u8],
    magic: u32,
    data: Option<&[u8]>,
    autoclear_set: u64,
    autoclear_clear: u64,
) -> Result<Vec<u8>> {
    rebuild(
        cluster0,
        magic,
        data,
        None,
        (autoclear_set, autoclear_clear),
    )
}

/// The first cluster naming backing file `name` in format `format` (the backing format
/// extension set, or removed when `format` is `None`), as QEMU's `qcow2_change_backing_file`
/// leaves it; `name` `None` removes the backing file and its format.
pub(crate) fn with_backing(
    cluster0: &[u8],
    name: Option<&[u8]>,
    format: Option<&str>,
) -> Result<Vec<u8>> {
    let format = name.and(format).map(str::as_bytes);
    rebuild(
        cluster0,
        EXT_BACKING_FORMAT,
        format,
        Some(name.unwrap_or_default()),
        (0, 0),
    )
}

/// [`with_extension`], and the backing file name replaced when `new_backing` is given
/// (empty: none).
fn rebuild(
    cluster0: &[u8],
    magic: u32,
    data: Option<&[u8]>,
    new_backing: Option<&[u8]>,
    (autoclear_set, autoclear_clear): (u64, u64),
) -> Result<Vec<u8>> {
    let bad = |what: &str| Error::malformed(format!("header: {what}"), 0);
    let version = be_u32(cluster0, at::VERSION as usize).ok_or_else(|| bad("too short"))?;
    let header_len = match version {
        2 => V2_HEADER_LEN,
        _ => be_u32(cluster0, at::HEADER_LENGTH as usize).ok_or_else(|| bad("too short"))?,
    } as usize;
    let backing_at = be_u64(cluster0, at::BACKING_FILE_OFFSET as usize).unwrap_or(0);
    let backing_len = be_u32(cluster0, at::BACKING_FILE_SIZE as usize).unwrap_or(0) as usize;
    let backing = match backing_at {
        0 => None,
        off => Some(
            usize::try_from(off)
                .ok()
                .and_then(|off| field(cluster0, off, backing_len))
                .ok_or_else(|| bad("backing file name past the first cluster"))?
                .to_vec(),
        ),
    };
    let ext_end = match backing_at {
        0 => cluster0.len(),
        off => usize::try_from(off)
            .unwrap_or(cluster0.len())
            .min(cluster0.len()),
    };
    let mut out = field(cluster0, 0, header_len)
        .ok_or_else(|| bad("header longer than the cluster"))?
        .to_vec();
    let mut replaced = false;
    for (ext_magic, ext_data) in raw_extensions(cluster0, header_len, ext_end) {
        if ext_magic == magic {
            replaced = true;
            if let Some(new) = data {
                out.extend(encode(magic, new).ok_or_else(|| bad("extension too large"))?);
            }
        } else {
            out.extend(encode(ext_magic, ext_data).ok_or_else(|| bad("extension too large"))?);
        }
    }
    if let (false, Some(new)) = (replaced, data) {
        out.extend(encode(magic, new).ok_or_else(|| bad("extension too large"))?);
    }
    out.extend(encode_end());
    let backing = match new_backing {
        Some(name) => (!name.is_empty()).then(|| name.to_vec()),
        None => backing,
    };
    match backing {
        Some(name) => {
            let offset = out.len() as u64;
            put(&mut out, at::BACKING_FILE_OFFSET, &offset.to_be_bytes());
            let len = u32::try_from(name.len()).map_err(|_| bad("backing file name too long"))?;
            put(&mut out, at::BACKING_FILE_SIZE, &len.to_be_bytes());
            out.extend(name);
        }
        None => {
            put(&mut out, at::BACKING_FILE_OFFSET, &0u64.to_be_bytes());
            put(&mut out, at::BACKING_FILE_SIZE, &0u32.to_be_bytes());
        }
    }
    if out.len() > cluster0.len() {
        return Err(Error::UnsupportedWrite {
            what: "the header extensions no longer fit in the first cluster".to_owned(),
        });
    }
    if version >= 3 {
        let autoclear = be_u64(&out, at::AUTOCLEAR_FEATURES as usize).unwrap_or(0);
        let autoclear = (autoclear | autoclear_set) & !autoclear_clear;
        put(&mut out, at::AUTOCLEAR_FEATURES, &autoclear.to_be_bytes());
    }
    out.resize(cluster0.len(), 0);
    Ok(out)
}

/// The extensions between `start` and `end`, as `(type, data)`, up to the end marker.
fn raw_extensions(cluster0: &[u8], start: usize, end: usize) -> Vec<(u32, &[u8])> {
    let mut out = Vec::new();
    let mut offset = start;
    while offset < end {
        let Some(magic) = be_u32(cluster0, offset).filter(|m| *m != 0) else {
            break;
        };
        let len = be_u32(cluster0, offset.saturating_add(4)).unwrap_or(0) as usize;
        let Some(data) = field(cluster0, offset.saturating_add(8), len) else {
            break;
        };
        out.push((magic, data));
        offset = offset
            .saturating_add(8)
            .saturating_add(len.next_multiple_of(8));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::limits::Limits;
    use crate::format::extension::EXT_BITMAPS;
    use crate::format::feature::AUTOCLEAR_BITMAPS;
    use crate::format::header::Header;
    use crate::format::new_header::NewHeader;

    fn image(backing: Option<&str>) -> Vec<u8> {
        NewHeader {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 8,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            refcount_order: 4,
            backing_file: backing,
            backing_format: backing.map(|_| "qcow2"),
            ..NewHeader::default()
        }
        .encode()
        .unwrap()
    }

    fn bitmaps(nb: u32, offset: u64) -> Vec<u8> {
        let mut d = nb.to_be_bytes().to_vec();
        d.extend(0u32.to_be_bytes());
        d.extend(64u64.to_be_bytes());
        d.extend(offset.to_be_bytes());
        d
    }

    #[test]
    fn adds_replaces_and_removes_an_extension_keeping_the_backing_name() {
        let before = image(Some("base.qcow2"));
        let added = with_extension(
            &before,
            EXT_BITMAPS,
            Some(&bitmaps(1, 0x50000)),
            AUTOCLEAR_BITMAPS,
            0,
        )
        .unwrap();
        let h = Header::parse(&added, &Limits::default()).unwrap();
        assert_eq!(h.backing_file(), Some("base.qcow2"));
        assert_eq!(h.backing_format(), Some("qcow2"));
        assert_eq!(h.bitmaps().unwrap().directory_offset, 0x50000);
        let moved = with_extension(
            &added,
            EXT_BITMAPS,
            Some(&bitmaps(2, 0x60000)),
            AUTOCLEAR_BITMAPS,
            0,
        )
        .unwrap();
        let h = Header::parse(&moved, &Limits::default()).unwrap();
        assert_eq!(h.bitmaps().unwrap().nb_bitmaps, 2);
        let removed = with_extension(&moved, EXT_BITMAPS, None, 0, AUTOCLEAR_BITMAPS).unwrap();
        let h = Header::parse(&removed, &Limits::default()).unwrap();
        assert!(h.bitmaps().is_none());
        assert_eq!(h.backing_file(), Some("base.qcow2"));
        assert_eq!(h.autoclear_features() & AUTOCLEAR_BITMAPS, 0);
    }

    #[test]
    fn changes_and_removes_the_backing_file_keeping_other_extensions() {
        let before = with_extension(
            &image(Some("base.qcow2")),
            EXT_BITMAPS,
            Some(&bitmaps(1, 0x50000)),
            AUTOCLEAR_BITMAPS,
            0,
        )
        .unwrap();
        let moved = with_backing(&before, Some(b"../other/new-base.img"), Some("raw")).unwrap();
        let h = Header::parse(&moved, &Limits::default()).unwrap();
        assert_eq!(h.backing_file(), Some("../other/new-base.img"));
        assert_eq!(h.backing_format(), Some("raw"));
        assert_eq!(h.bitmaps().unwrap().directory_offset, 0x50000);
        let unformatted = with_backing(&moved, Some(b"b"), None).unwrap();
        let h = Header::parse(&unformatted, &Limits::default()).unwrap();
        assert_eq!((h.backing_file(), h.backing_format()), (Some("b"), None));
        let removed = with_backing(&moved, None, Some("qcow2")).unwrap();
        let h = Header::parse(&removed, &Limits::default()).unwrap();
        assert_eq!((h.backing_file(), h.backing_format()), (None, None));
        assert_eq!(h.bitmaps().unwrap().nb_bitmaps, 1);
        let added = with_backing(&image(None), Some(b"base.qcow2"), Some("qcow2")).unwrap();
        let h = Header::parse(&added, &Limits::default()).unwrap();
        assert_eq!(h.backing_file(), Some("base.qcow2"));
        assert_eq!(h.backing_format(), Some("qcow2"));
        let long = vec![b'x'; 70000];
        assert!(with_backing(&image(None), Some(&long), None).is_err());
    }
}
