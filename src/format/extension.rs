//! Header extensions (spec: "Header extensions"): typed records between the end of the header
//! and the backing-file name (or the end of the first cluster).
//!
//! Parsing is pure: [`parse_all`] walks the bytes of the first cluster as QEMU's
//! `qcow2_read_extensions` does and applies its checks to each extension it knows.

use crate::base::bytes::{align8, be_u32, be_u64, field, low_bits, until_nul};
use crate::base::limits::Limits;
use crate::error::{Error, Result};
use crate::format::feature::{self, FeatureName};

// Extension types (spec: "Header extensions").
/// End of the extension area.
const EXT_END: u32 = 0x0000_0000;
/// Backing file format name.
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub(crate) const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
/// Bitmaps extension.
pub(crate) const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer.
pub(crate) const EXT_ENCRYPTION: u32 = 0x0537_be77;
/// External data file name.
pub(crate) const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Each extension starts with its type (u32) and the length of its data (u32).
const EXT_HEADER_LEN: u64 = 8;
/// QEMU keeps the backing format in a 16-byte C string: names of 16 bytes or more are refused.
const MAX_BACKING_FORMAT_LEN: usize = 15;
/// Bitmaps extension: nb_bitmaps u32, reserved u32, directory size u64, directory offset u64.
const BITMAPS_EXT_LEN: usize = 24;
/// Full disk encryption header pointer: offset u64, length u64.
const ENCRYPTION_EXT_LEN: usize = 16;

/// Encode one extension: type, data length, the data padded with zeros to 8 bytes.
pub(crate) fn encode(magic: u32, data: &[u8]) -> Option<Vec<u8>> {
    let len = u32::try_from(data.len()).ok()?;
    let padded = usize::try_from(align8(u64::from(len))?).ok()?;
    let mut out = Vec::with_capacity(padded.checked_add(8)?);
    out.extend_from_slice(&magic.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    out.resize(padded.checked_add(8)?, 0);
    Some(out)
}

/// The end-of-extensions marker.
pub(crate) fn encode_end() -> Vec<u8> {
    let mut out = EXT_END.to_be_bytes().to_vec();
    out.extend_from_slice(&0u32.to_be_bytes());
    out
}

/// What a header extension is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ExtensionKind {
    /// Backing file format name (`0xe2792aca`).
    BackingFormat,
    /// Feature name table (`0x6803f857`).
    FeatureNames,
    /// Bitmaps (`0x23852875`).
    Bitmaps,
    /// Full disk encryption header pointer (`0x0537be77`).
    Encryption,
    /// External data file name (`0x44415441`).
    DataFile,
    /// A type this crate does not know; kept so callers can see it.
    Unknown(u32),
}

impl ExtensionKind {
    fn from_magic(magic: u32) -> Self {
        match magic {
            EXT_BACKING_FORMAT => ExtensionKind::BackingFormat,
            EXT_FEATURE_NAMES => ExtensionKind::FeatureNames,
            EXT_BITMAPS => ExtensionKind::Bitmaps,
            EXT_ENCRYPTION => ExtensionKind::Encryption,
            EXT_DATA_FILE => ExtensionKind::DataFile,
            other => ExtensionKind::Unknown(other),
        }
    }
}

/// A header extension found in the first cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Its type.
    pub kind: ExtensionKind,
    /// File offset of its data (just past its 8-byte type and length).
    pub offset: u64,
    /// Length of its data, without padding.
    pub len: u32,
}

/// The bitmaps extension: where the persistent dirty bitmap directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// File offset of the bitmap directory.
    pub directory_offset: u64,
}

/// The full-disk-encryption header pointer extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncryptionExtension {
    /// File offset of the encryption header (LUKS).
    pub offset: u64,
    /// Its length.
    pub length: u64,
}

/// What the extension checks need to know of the fixed header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Context<'a> {
    pub cluster_bits: u32,
    pub autoclear_features: u64,
    pub crypt_method: u32,
    /// Whether `crypt_method` names LUKS, the one method with an encryption header.
    pub luks: bool,
    pub limits: &'a Limits,
}

/// Everything the extensions say, parsed.
#[derive(Debug, Clone, Default)]
pub(crate) struct Extensions {
    pub list: Vec<Extension>,
    pub feature_names: Vec<FeatureName>,
    /// The backing format, up to its first NUL; `None` when absent or empty.
    pub backing_format: Option<String>,
    /// The data file name's bytes, up to its first NUL.
    pub data_file: Option<Vec<u8>>,
    pub bitmaps: Option<BitmapsExtension>,
    pub encryption: Option<EncryptionExtension>,
}

/// Walk the extensions of `cluster0` from file offset `start` to `end` (the backing-file name's
/// offset, or the cluster size). Bytes past the end of `cluster0` read as zeros, an end marker,
/// as QEMU reads past the end of a file.
pub(crate) fn parse_all(
    cluster0: &[u8],
    start: u64,
    end: u64,
    ctx: &Context,
) -> Result<Extensions> {
    let mut out = Extensions::default();
    walk(cluster0, start, end, ctx, &mut out)?;
    Ok(out)
}

/// The extensions as far as they parse: what QEMU has read when an extension fails its
/// check (it names unknown feature bits from a feature table found before the failure).
pub(crate) fn parse_until_error(
    cluster0: &[u8],
    start: u64,
    end: u64,
    ctx: &Context,
) -> Extensions {
    let mut out = Extensions::default();
    let _ = walk(cluster0, start, end, ctx, &mut out);
    out
}

/// [`parse_all`] into `out`, which keeps what was parsed before an error.
fn walk(cluster0: &[u8], start: u64, end: u64, ctx: &Context, out: &mut Extensions) -> Result<()> {
    let mut offset = start;
    while offset < end {
        let Some(at) = usize::try_from(offset)
            .ok()
            .filter(|&at| at < cluster0.len())
        else {
            break;
        };
        let magic = be_u32(cluster0, at).unwrap_or(EXT_END);
        let len = be_u32(cluster0, at.saturating_add(4)).unwrap_or(0);
        let data_at = offset.saturating_add(EXT_HEADER_LEN);
        // QEMU checks the length against the room left before it looks at the type: an end
        // marker with a length that does not fit is refused too ("Header extension too
        // large"), as is a v3 header whose `header_length` starts the walk mid-extension.
        if data_at > end || u64::from(len) > end.saturating_sub(data_at) {
            return Err(Error::malformed(
                format!(
                    "header extension {magic:#010x} is too large: its {len} bytes run past \
                     {end:#x}"
                ),
                offset,
            ));
        }
        if magic == EXT_END {
            break;
        }
        let data = usize::try_from(data_at)
            .ok()
            .and_then(|d| field(cluster0, d, len as usize))
            .ok_or_else(|| {
                Error::malformed(
                    format!("header extension {magic:#010x} runs past the end of the file"),
                    offset,
                )
            })?;
        out.take(ExtensionKind::from_magic(magic), data, data_at, ctx)?;
        offset = data_at.saturating_add(align8(u64::from(len)).unwrap_or(u64::MAX));
    }
    Ok(())
}

impl Extensions {
    fn take(&mut self, kind: ExtensionKind, data: &[u8], at: u64, ctx: &Context) -> Result<()> {
        if !matches!(kind, ExtensionKind::Unknown(_)) && self.list.iter().any(|e| e.kind == kind) {
            // QEMU lets the last one win; two answers to one question is an attack surface.
            return Err(Error::malformed(
                format!("header extension {kind:?} appears twice"),
                at,
            ));
        }
        match kind {
            ExtensionKind::BackingFormat => self.backing_format = parse_backing_format(data, at)?,
            ExtensionKind::FeatureNames => self.feature_names = feature::parse_feature_names(data),
            ExtensionKind::Bitmaps => self.bitmaps = parse_bitmaps(data, at, ctx)?,
            ExtensionKind::Encryption => self.encryption = Some(parse_encryption(data, at, ctx)?),
            ExtensionKind::DataFile => {
                Limits::check(
                    "data file name",
                    data.len() as u64,
                    ctx.limits.max_backing_name_bytes,
                )?;
                self.data_file = Some(until_nul(data).to_vec());
            }
            ExtensionKind::Unknown(_) => {}
        }
        self.list.push(Extension {
            kind,
            offset: at,
            len: data.len() as u32,
        });
        Ok(())
    }
}

/// The backing format is a C string to QEMU: it ends at its first NUL, and an empty one means
/// "probe the backing file".
fn parse_backing_format(data: &[u8], at: u64) -> Result<Option<String>> {
    if data.len() > MAX_BACKING_FORMAT_LEN {
        return Err(Error::malformed(
            format!("backing format name of {} bytes is too long", data.len()),
            at,
        ));
    }
    let name = until_nul(data);
    Ok((!name.is_empty()).then(|| String::from_utf8_lossy(name).into_owned()))
}

/// The bitmaps extension with QEMU's checks. Its length is checked first; without the
/// autoclear bit it is then stale (a program without bitmap support rewrote the image), and
/// QEMU ignores it, as we do.
fn parse_bitmaps(data: &[u8], at: u64, ctx: &Context) -> Result<Option<BitmapsExtension>> {
    if data.len() != BITMAPS_EXT_LEN {
        return Err(Error::malformed(
            format!(
                "bitmaps extension of {} bytes, expected {BITMAPS_EXT_LEN}",
                data.len()
            ),
            at,
        ));
    }
    if ctx.autoclear_features & feature::AUTOCLEAR_BITMAPS == 0 {
        return Ok(None);
    }
    let nb_bitmaps = be_u32(data, 0).unwrap_or(0);
    let reserved = be_u32(data, 4).unwrap_or(0);
    let directory_size = be_u64(data, 8).unwrap_or(0);
    let directory_offset = be_u64(data, 16).unwrap_or(0);
    if reserved != 0 {
        return Err(Error::malformed(
            "bitmaps extension reserved field is not zero",
            at,
        ));
    }
    Limits::check_in(
        "bitmaps",
        "bitmap count",
        u64::from(nb_bitmaps),
        ctx.limits.max_bitmaps,
    )?;
    if nb_bitmaps == 0 {
        return Err(Error::malformed("bitmaps extension with zero bitmaps", at));
    }
    if low_bits(directory_offset, ctx.cluster_bits) != 0 {
        return Err(Error::malformed(
            format!("bitmap directory offset {directory_offset:#x} is not cluster aligned"),
            at,
        ));
    }
    Limits::check(
        "bitmap directory",
        directory_size,
        ctx.limits.max_bitmap_directory_bytes,
    )?;
    Ok(Some(BitmapsExtension {
        nb_bitmaps,
        directory_size,
        directory_offset,
    }))
}

/// The encryption header pointer, accepted only in a LUKS image, as QEMU accepts it.
fn parse_encryption(data: &[u8], at: u64, ctx: &Context) -> Result<EncryptionExtension> {
    if !ctx.luks {
        return Err(Error::malformed(
            format!(
                "encryption header extension in an image with crypt_method {} (only LUKS has one)",
                ctx.crypt_method
            ),
            at,
        ));
    }
    if data.len() != ENCRYPTION_EXT_LEN {
        return Err(Error::malformed(
            format!(
                "encryption header extension of {} bytes, expected {ENCRYPTION_EXT_LEN}",
                data.len()
            ),
            at,
        ));
    }
    let offset = be_u64(data, 0).unwrap_or(0);
    if low_bits(offset, ctx.cluster_bits) != 0 {
        return Err(Error::Misaligned {
            what: "encryption header",
            offset,
            at,
        });
    }
    Ok(EncryptionExtension {
        offset,
        length: be_u64(data, 8).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the fixed header says: autoclear bits and crypt_method (64 KiB clusters).
    fn ctx(autoclear_features: u64, crypt_method: u32) -> (u64, u32) {
        (autoclear_features, crypt_method)
    }

    /// One cluster with the given extensions from offset 112.
    fn area(exts: &[(u32, &[u8])]) -> Vec<u8> {
        let mut b = vec![0u8; 112];
        for (magic, data) in exts {
            b.extend(magic.to_be_bytes());
            b.extend((data.len() as u32).to_be_bytes());
            b.extend(*data);
            b.resize(b.len().next_multiple_of(8), 0);
        }
        b.resize(65536, 0);
        b
    }

    fn parse_area(b: &[u8], end: u64, (autoclear, crypt): (u64, u32)) -> Result<Extensions> {
        let limits = Limits::default();
        let c = Context {
            cluster_bits: 16,
            autoclear_features: autoclear,
            crypt_method: crypt,
            luks: crypt == 2,
            limits: &limits,
        };
        parse_all(b, 112, end, &c)
    }

    fn parse(exts: &[(u32, &[u8])], c: (u64, u32)) -> Result<Extensions> {
        parse_area(&area(exts), 65536, c)
    }

    #[test]
    fn known_and_unknown_extensions_are_listed_in_order() {
        let e = parse(
            &[
                (EXT_BACKING_FORMAT, b"qcow2"),
                (0x1234_5678, b"unknown stuff"),
                (EXT_DATA_FILE, b"data.raw\0junk"),
            ],
            ctx(0, 0),
        )
        .unwrap();
        assert_eq!(e.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(e.data_file.as_deref(), Some(&b"data.raw"[..]));
        let kinds: Vec<_> = e.list.iter().map(|x| x.kind).collect();
        assert_eq!(
            kinds,
            [
                ExtensionKind::BackingFormat,
                ExtensionKind::Unknown(0x1234_5678),
                ExtensionKind::DataFile
            ]
        );
        assert_eq!(e.list[1].len, 13);
    }

    #[test]
    fn backing_format_is_a_c_string() {
        let e = parse(&[(EXT_BACKING_FORMAT, b"raw\0\0\0\0\0")], ctx(0, 0)).unwrap();
        assert_eq!(e.backing_format.as_deref(), Some("raw"));
        let e = parse(&[(EXT_BACKING_FORMAT, b"\0\0")], ctx(0, 0)).unwrap();
        assert_eq!(e.backing_format, None);
        assert!(parse(&[(EXT_BACKING_FORMAT, b"0123456789abcdef")], ctx(0, 0)).is_err());
    }

    #[test]
    fn a_repeated_known_extension_is_refused() {
        let r = parse(
            &[(EXT_BACKING_FORMAT, b"qcow2"), (EXT_BACKING_FORMAT, b"raw")],
            ctx(0, 0),
        );
        assert!(
            matches!(r, Err(Error::Malformed { offset: 136, .. })),
            "{r:?}"
        );
    }

    #[test]
    fn an_extension_may_not_run_past_the_area() {
        let mut b = area(&[]);
        b[112..120].copy_from_slice(&[0x12, 0x34, 0x56, 0x78, 0, 0, 0x10, 0]);
        let r = parse_area(&b, 1024, ctx(0, 0));
        assert!(
            matches!(r, Err(Error::Malformed { offset: 112, .. })),
            "{r:?}"
        );
    }

    #[test]
    fn the_end_marker_length_is_checked_like_any_other() {
        let mut b = area(&[]);
        // An end marker whose length does not fit before the end of the area: refused.
        b[116..120].copy_from_slice(&65536u32.to_be_bytes());
        let r = parse_area(&b, 65536, ctx(0, 0));
        assert!(
            matches!(&r, Err(Error::Malformed { offset: 112, what }) if what.contains("too large")),
            "{r:?}"
        );
        // One that fits is an end marker all the same: what follows is not read.
        b[116..120].copy_from_slice(&16u32.to_be_bytes());
        b[136..140].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b[140..144].copy_from_slice(&65536u32.to_be_bytes());
        assert!(parse_area(&b, 65536, ctx(0, 0)).unwrap().list.is_empty());
        // An end marker whose header itself runs past the end (a backing name at 116).
        let r = parse_area(&area(&[]), 116, ctx(0, 0));
        assert!(
            matches!(r, Err(Error::Malformed { offset: 112, .. })),
            "{r:?}"
        );
    }

    #[test]
    fn what_parsed_before_an_error_is_kept_for_naming_features() {
        let table = [0u8, 5, b'x', 0, 0, 0, 0, 0];
        let mut b = area(&[(EXT_FEATURE_NAMES, &[table.to_vec(), vec![0; 40]].concat())]);
        b[172..176].copy_from_slice(&65536u32.to_be_bytes()); // the end marker's length
        let limits = Limits::default();
        let c = Context {
            cluster_bits: 16,
            autoclear_features: 0,
            crypt_method: 0,
            luks: false,
            limits: &limits,
        };
        assert!(parse_all(&b, 112, 65536, &c).is_err());
        let names = parse_until_error(&b, 112, 65536, &c).feature_names;
        assert_eq!(names.len(), 1);
        assert_eq!(names[0].bit, 5);
        assert_eq!(names[0].name, "x");
    }

    #[test]
    fn bitmaps_length_is_checked_before_the_autoclear_bit() {
        let ext = |nb: u32, reserved: u32, size: u64, offset: u64| {
            let mut d = nb.to_be_bytes().to_vec();
            d.extend(reserved.to_be_bytes());
            d.extend(size.to_be_bytes());
            d.extend(offset.to_be_bytes());
            d
        };
        let with = |data: &[u8], autoclear: u64| parse(&[(EXT_BITMAPS, data)], ctx(autoclear, 0));
        let e = with(&ext(1, 0, 64, 0x40000), 1).unwrap();
        assert_eq!(e.bitmaps.unwrap().directory_offset, 0x40000);
        // Stale without the autoclear bit: ignored, whatever its fields say...
        assert!(with(&ext(0, 7, 64, 0x40001), 0).unwrap().bitmaps.is_none());
        // ...but not whatever its length.
        assert!(with(&ext(1, 0, 64, 0x40000)[..16], 0).is_err());
        assert!(with(&ext(1, 7, 64, 0x40000), 1).is_err());
        assert!(with(&ext(0, 0, 64, 0x40000), 1).is_err());
        assert!(with(&ext(1, 0, 64, 0x40001), 1).is_err());
        assert!(matches!(
            with(&ext(70000, 0, 64, 0x40000), 1),
            Err(Error::LimitExceeded { .. })
        ));
    }

    #[test]
    fn encryption_extension_only_with_luks() {
        let mut d = 0x30000u64.to_be_bytes().to_vec();
        d.extend(0x1000u64.to_be_bytes());
        assert!(parse(&[(EXT_ENCRYPTION, &d)], ctx(0, 0)).is_err());
        assert!(parse(&[(EXT_ENCRYPTION, &d)], ctx(0, 1)).is_err());
        let e = parse(&[(EXT_ENCRYPTION, &d)], ctx(0, 2)).unwrap();
        assert_eq!(e.encryption.unwrap().offset, 0x30000);
        assert!(parse(&[(EXT_ENCRYPTION, &d[..12])], ctx(0, 2)).is_err());
        d[7] = 0x10; // 0x30010: not cluster aligned
        assert!(matches!(
            parse(&[(EXT_ENCRYPTION, &d)], ctx(0, 2)),
            Err(Error::Misaligned { .. })
        ));
    }
}
