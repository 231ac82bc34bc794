//! What `qemu-img info` reports about an image, in QEMU's own shape.
//!
//! The types mirror QEMU's QAPI schema (`BlockGraphInfo`, `ImageInfoSpecificQCow2`,
//! `SnapshotInfo`, `Qcow2BitmapInfo` in `qapi/block-core.json`). With the `serde` feature they
//! serialize with QEMU's field names, omission rules and field order, so
//! [`ImageInfo::to_json`] prints what `qemu-img info --output=json` prints.
//!
//! Field order: QEMU prints a JSON object in the order of its hash table (`QDict`, 512
//! buckets hashed by `tdb_hash`), not in schema order. Every struct here declares its fields
//! in that order, so serde writes them as QEMU does; `tests::fields_are_in_qemu_hash_order`
//! checks the declarations against the hash.

use std::fs::File;
use std::path::Path;

use positioned_io::ReadAt;

use crate::base::SECTOR;
use crate::error::{Error, Result};
use crate::format::bitmap::Bitmap;
use crate::format::header::Header;
use crate::format::snapshot::Snapshot;
use crate::image::open::{
    bytes_path, has_protocol, walk_chain, CorruptBitHidden, NextLink, NextPath,
};
use crate::image::options::OpenOptions;
use crate::image::qcow2::{Backing, ImageView, Qcow2};

/// One image of a backing chain, top first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainEntry {
    /// The path it was opened from, when known.
    pub filename: Option<String>,
    /// `qcow2` or `raw`.
    pub format: String,
    /// Its virtual size.
    pub virtual_size: u64,
}

/// Image information, as `qemu-img info` reports it (QEMU's `BlockGraphInfo`).
///
/// Everything `qemu-img info --output=json` prints is here except `actual-size` (the space
/// the file takes on the host file system, which says nothing about the image).
///
/// ```
/// use qcow2::{ImageInfo, OpenOptions};
///
/// let info = ImageInfo::from_path("fixtures/chain-top.qcow2", &OpenOptions::new())?;
/// assert_eq!(info.format, "qcow2");
/// assert_eq!(info.cluster_size, Some(8192));
/// assert!(info.backing_filename.is_some());
/// print!("{}", info.to_human());
///
/// // The whole chain, as `qemu-img info --backing-chain` reports it.
/// let chain = ImageInfo::chain_from_path("fixtures/chain-top.qcow2", &OpenOptions::new())?;
/// assert_eq!(chain.len(), 3);
/// # Ok::<(), qcow2::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "kebab-case")
)]
#[non_exhaustive]
pub struct ImageInfo {
    /// The nodes below this one: for an image opened by path, its `file` node (the host
    /// file, with its own information). QEMU lists a data file or backing file here only
    /// when it opened it, which `qemu-img info` does not.
    pub children: Vec<ChildInfo>,
    /// The backing format from the header extension (only with a backing file).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub backing_filename_format: Option<String>,
    /// Internal snapshots (left out of the JSON when there are none).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Vec::is_empty"))]
    pub snapshots: Vec<SnapshotInfo>,
    /// Virtual disk size in bytes (for a `file` node, the file's length).
    pub virtual_size: u64,
    /// The path the image was opened from, as given, as text the way QEMU's JSON shows it
    /// (see [`ImageInfo::filename_bytes`]); `None` when opened from a source without a path.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub filename: Option<String>,
    /// Cluster size in bytes (qcow2 only).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub cluster_size: Option<u64>,
    /// The format driver: `qcow2`, `raw`, or `file` for the host file node.
    pub format: &'static str,
    /// What only this format has (none for `raw`).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub format_specific: Option<FormatSpecific>,
    /// The backing file name resolved against this image's directory, as QEMU resolves it
    /// (known when the image was opened by path), as text the way QEMU's JSON shows it (see
    /// [`ImageInfo::full_backing_filename_bytes`]).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub full_backing_filename: Option<String>,
    /// Whether the image is encrypted (only written when it is).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "is_false"))]
    pub encrypted: bool,
    /// The backing file name as stored in the header, as text the way QEMU's JSON shows it:
    /// each byte sequence that is not UTF-8 becomes U+FFFD as QEMU decodes it (see
    /// [`ImageInfo::backing_filename_bytes`] for the bytes).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub backing_filename: Option<String>,
    /// The dirty bit (QEMU's `dirty-flag`).
    #[cfg_attr(feature = "serde", serde(rename = "dirty-flag"))]
    pub dirty: bool,
    /// The backing chain below this image as far as it is attached, nearest first (not part
    /// of QEMU's output: see [`ImageInfo::chain_from_path`] for `--backing-chain`).
    #[cfg_attr(feature = "serde", serde(skip))]
    pub backing_chain: Vec<ChainEntry>,
    /// [`ImageInfo::filename`]'s bytes, unaltered (on Unix a path need not be UTF-8):
    /// `qemu-img info` prints these.
    #[cfg_attr(feature = "serde", serde(skip))]
    pub filename_bytes: Option<Vec<u8>>,
    /// [`ImageInfo::full_backing_filename`]'s bytes, unaltered: the path the backing file is
    /// opened from.
    #[cfg_attr(feature = "serde", serde(skip))]
    pub full_backing_filename_bytes: Option<Vec<u8>>,
    /// [`ImageInfo::backing_filename`]'s bytes, exactly as stored (up to the first NUL).
    #[cfg_attr(feature = "serde", serde(skip))]
    pub backing_filename_bytes: Option<Vec<u8>>,
}

/// A child node and its information (QEMU's `BlockChildInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct ChildInfo {
    /// The child's role: `file` for the host file under a qcow2 or raw node.
    pub name: String,
    /// Its information.
    pub info: ImageInfo,
}

/// What only one format reports (QEMU's `ImageInfoSpecific`), written as
/// `{"type": FORMAT, "data": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(tag = "type", content = "data", rename_all = "lowercase")
)]
#[non_exhaustive]
pub enum FormatSpecific {
    /// A qcow2 image.
    Qcow2(Qcow2Specific),
    /// The host file under an image.
    File(FileSpecific),
}

/// What `qemu-img info` reports of a qcow2 image in `format-specific` (QEMU's
/// `ImageInfoSpecificQCow2`). Version 2 images report only `compat`, `compression-type`
/// and `refcount-bits`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "kebab-case")
)]
#[non_exhaustive]
pub struct Qcow2Specific {
    /// `0.10` for version 2, `1.1` for version 3.
    pub compat: &'static str,
    /// `zlib` or `zstd`.
    pub compression_type: &'static str,
    /// Lazy refcounts (compatible bit 0); version 3 only.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub lazy_refcounts: Option<bool>,
    /// Persistent dirty bitmaps; version 3 only, left out when there are none.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Vec::is_empty"))]
    pub bitmaps: Vec<BitmapInfo>,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// The external data file name from the header extension.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub data_file: Option<String>,
    /// The encryption (`format`, and the LUKS header's details), for encrypted images.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub encrypt: Option<Box<crate::EncryptionInfo>>,
    /// Whether the external data file is a raw image by itself (autoclear bit 1); present
    /// exactly when the image has an external data file (incompatible bit 2).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub data_file_raw: Option<bool>,
    /// The corrupt bit; version 3 only.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub corrupt: Option<bool>,
    /// Extended L2 entries (subclusters); version 3 only.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub extended_l2: Option<bool>,
}

/// What `qemu-img info` reports of the host file in `format-specific`: nothing on the
/// common file systems (QEMU adds an `extent-size-hint` on XFS, which is left out here).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct FileSpecific {}

/// An internal snapshot as `qemu-img info` lists it (QEMU's `SnapshotInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "kebab-case")
)]
#[non_exhaustive]
pub struct SnapshotInfo {
    /// Instruction count for record/replay; left out when not recorded (stored as -1).
    #[cfg_attr(
        feature = "serde",
        serde(
            skip_serializing_if = "Option::is_none",
            serialize_with = "qapi_int_opt"
        )
    )]
    pub icount: Option<u64>,
    /// Guest clock when the snapshot was taken: nanoseconds within the second.
    pub vm_clock_nsec: u64,
    /// Its name, as QEMU reads it: up to the first NUL, at most 255 bytes.
    pub name: String,
    /// Creation time, seconds since the Unix epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock when the snapshot was taken: whole seconds.
    pub vm_clock_sec: u64,
    /// Its id, as QEMU reads it: up to the first NUL, at most 127 bytes.
    pub id: String,
    /// Size of the saved VM state in bytes (0 for disk-only snapshots).
    #[cfg_attr(feature = "serde", serde(serialize_with = "qapi_int"))]
    pub vm_state_size: u64,
}

/// A persistent dirty bitmap as `qemu-img info` lists it (QEMU's `Qcow2BitmapInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct BitmapInfo {
    /// `in-use` and `auto`, when set.
    pub flags: Vec<&'static str>,
    /// Its name.
    pub name: String,
    /// Bytes of guest data per bit.
    pub granularity: u64,
}

/// QEMU stores -1 when a snapshot's icount was not recorded.
const ICOUNT_NONE: u64 = u64::MAX;
const NANOS_PER_SEC: u64 = 1_000_000_000;
/// Room QEMU gives a snapshot's id and name (`QEMUSnapshotInfo.id_str[128]`, `name[256]`),
/// the terminating NUL included.
const ID_ROOM: usize = 128;
const NAME_ROOM: usize = 256;

#[cfg(feature = "serde")]
fn is_false(b: &bool) -> bool {
    !*b
}

/// QAPI's `int` is 64-bit signed: QEMU prints a `u64` field of 2^63 or more as negative.
#[cfg(feature = "serde")]
fn qapi_int<S: serde::Serializer>(v: &u64, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_i64(*v as i64)
}

#[cfg(feature = "serde")]
fn qapi_int_opt<S: serde::Serializer>(
    v: &Option<u64>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match v {
        Some(v) => qapi_int(v, s),
        None => s.serialize_none(),
    }
}

impl From<&Snapshot> for SnapshotInfo {
    fn from(s: &Snapshot) -> Self {
        SnapshotInfo {
            icount: s.icount.filter(|&i| i != ICOUNT_NONE),
            vm_clock_nsec: s.vm_clock_nsec % NANOS_PER_SEC,
            name: c_string(&s.name, NAME_ROOM),
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_sec: s.vm_clock_nsec / NANOS_PER_SEC,
            id: c_string(&s.id, ID_ROOM),
            vm_state_size: s.vm_state_size,
        }
    }
}

impl From<&Bitmap> for BitmapInfo {
    fn from(b: &Bitmap) -> Self {
        BitmapInfo {
            flags: b.flag_names(),
            name: b.name.clone(),
            granularity: b.granularity,
        }
    }
}

/// `s` as QEMU copies it into a fixed C buffer of `room` bytes (`pstrcpy`): cut at the first
/// NUL, and to `room - 1` bytes (here at a character boundary).
fn c_string(s: &str, room: usize) -> String {
    let s = s.split('\0').next().unwrap_or_default();
    let mut end = s.len().min(room.saturating_sub(1));
    while !s.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    s.get(..end).unwrap_or_default().to_owned()
}

impl<I: ReadAt + Send + Sync> Qcow2<I> {
    /// What `qemu-img info` reports for this image.
    ///
    /// For an image opened by path, the `file` child lists the host file (its length is
    /// read when this is called; it is left out if the file can no longer be examined).
    ///
    /// ```
    /// let image = qcow2::Qcow2::open_path("fixtures/snap.qcow2")?;
    /// let info = image.info();
    /// assert_eq!(info.virtual_size, image.guest_size());
    /// assert_eq!(info.snapshots.len(), 2);
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn info(&self) -> ImageInfo {
        let mut info = info_of(self);
        if let Some(path) = self.path() {
            if let Ok(meta) = std::fs::metadata(path) {
                info.children = vec![file_child(&path_bytes(path), meta.len())];
            }
        }
        info
    }
}

impl ImageInfo {
    /// What `qemu-img info PATH` reports: the qcow2 image at `path` is opened alone, without
    /// its backing file or data file (so neither needs to exist). An image with the corrupt
    /// bit is reported as QEMU reports it, `corrupt: Some(true)` in [`Qcow2Specific`] (it
    /// still cannot be opened to be read: [`Error::Corrupt`]).
    ///
    /// ```
    /// let info = qcow2::ImageInfo::from_path("fixtures/snap.qcow2", &Default::default())?;
    /// assert_eq!(info.virtual_size, 2 * 1024 * 1024);
    /// assert_eq!(info.snapshots[0].name, "s1");
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn from_path(path: impl AsRef<Path>, options: &OpenOptions) -> Result<ImageInfo> {
        let path = path.as_ref();
        let file = crate::image::open::checked_open(path, "image", options.allow_devices)?;
        qcow2_info(file, path, options)
    }

    /// What `qemu-img info --backing-chain PATH` reports: the image at `path`, then each image
    /// of its backing chain, top first. Backing files are opened as
    /// [`OpenOptions::files`] allows; a raw backing file ends the chain. A chain that loops
    /// or is deeper than [`Limits::max_chain_depth`](crate::Limits) is an
    /// [`Error::BackingChain`]. Data files are not opened.
    ///
    /// ```
    /// let chain = qcow2::ImageInfo::chain_from_path("fixtures/chain-top.qcow2", &Default::default())?;
    /// let names: Vec<_> = chain.iter().filter_map(|i| i.filename.as_deref()).collect();
    /// assert_eq!(names, ["fixtures/chain-top.qcow2", "fixtures/chain-mid.qcow2", "fixtures/chain-base.qcow2"]);
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn chain_from_path(
        path: impl AsRef<Path>,
        options: &OpenOptions,
    ) -> Result<Vec<ImageInfo>> {
        let (top, below, raw) = walk_chain(
            path.as_ref(),
            options,
            qcow2_info,
            |file, path| raw_info(&file, path),
            next_in_chain,
        )?;
        Ok(std::iter::once(top).chain(below).chain(raw).collect())
    }

    /// The qcow2 part of `format-specific`, when this is a qcow2 image.
    pub fn qcow2(&self) -> Option<&Qcow2Specific> {
        match &self.format_specific {
            Some(FormatSpecific::Qcow2(q)) => Some(q),
            _ => None,
        }
    }

    /// The information as `qemu-img info --output=json` prints it, byte for byte, without
    /// `actual-size` (QEMU's pretty printer: 4-space indents, `\uXXXX` escapes for
    /// non-ASCII). Same value as `serde_json::to_string_pretty(&info)`, which indents by 2.
    ///
    /// ```
    /// let image = qcow2::Qcow2::open_path("fixtures/snap.qcow2")?;
    /// let json = image.info().to_json();
    /// assert!(json.contains("\"virtual-size\": 2097152"));
    /// assert!(json.contains("\"name\": \"s1\""));
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    #[cfg(feature = "serde")]
    #[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
    pub fn to_json(&self) -> String {
        crate::jobs::qjson::to_string(self)
    }

    /// Several images as `qemu-img info --backing-chain --output=json` prints them: a JSON
    /// array of [`ImageInfo::to_json`] objects.
    #[cfg(feature = "serde")]
    #[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
    pub fn chain_to_json(chain: &[ImageInfo]) -> String {
        crate::jobs::qjson::to_string(chain)
    }
}

impl std::fmt::Display for ImageInfo {
    /// [`ImageInfo::to_human`].
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_human())
    }
}

/// Open `file` (at `path`) as qcow2, alone, and describe it with its `file` child.
fn qcow2_info(file: File, path: &Path, options: &OpenOptions) -> Result<ImageInfo> {
    let len = file
        .metadata()
        .map_err(|e| Error::io(format!("reading the size of {}", path.display()), e))?
        .len();
    // A second handle to the same open file, for an image with the corrupt bit.
    let spare = file
        .try_clone()
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let mut info = match Qcow2::open_with(file, options) {
        Ok(mut image) => {
            image.path = Some(path.to_path_buf());
            info_of(&image)
        }
        // QEMU shows an image with the corrupt bit (it opens it read-only): its metadata is
        // read with the bit hidden, and the bit reported. Its data stays refused.
        Err(Error::Corrupt) => {
            let mut image = Qcow2::open_with(CorruptBitHidden::new(spare)?, options)?;
            image.path = Some(path.to_path_buf());
            let mut info = info_of(&image);
            if let Some(FormatSpecific::Qcow2(q)) = &mut info.format_specific {
                q.corrupt = Some(true);
            }
            info
        }
        Err(e) => return Err(e),
    };
    info.children = vec![file_child(&path_bytes(path), len)];
    Ok(info)
}

/// A raw image: its size in whole sectors, as QEMU counts it, over the file's exact length.
fn raw_info(file: &File, path: &Path) -> Result<ImageInfo> {
    let len = file
        .metadata()
        .map_err(|e| Error::io(format!("reading the size of {}", path.display()), e))?
        .len();
    let name = path_bytes(path);
    Ok(ImageInfo {
        children: vec![file_child(&name, len)],
        virtual_size: sectors(len),
        filename: Some(qemu_text(&name)),
        filename_bytes: Some(name),
        format: "raw",
        ..ImageInfo::empty()
    })
}

/// `len` rounded up to whole 512-byte sectors.
fn sectors(len: u64) -> u64 {
    len.checked_next_multiple_of(SECTOR).unwrap_or(len)
}

/// The backing file `info` names, with its recorded format.
/// QEMU opens the full backing name, so the next image's `filename` is that name, byte for
/// byte; names with a protocol are resolved as the chain's opener resolves them, which
/// refuses all but `file:`.
fn next_in_chain(info: &ImageInfo) -> Option<NextLink> {
    let name = info.backing_filename_bytes.as_deref()?;
    let path = match &info.full_backing_filename_bytes {
        Some(full) if !has_protocol(name) => NextPath::Resolved(bytes_path(full)),
        _ => NextPath::Named(bytes_path(name)),
    };
    Some(NextLink {
        path,
        format: info.backing_filename_format.clone(),
    })
}

/// QEMU's `bdrv_make_absolute_filename`: a name with a protocol or an absolute one as it is,
/// else the image's directory (its name up to the last `/`) followed by the name, as bytes.
fn full_backing_name(image: &[u8], backing: &[u8]) -> Vec<u8> {
    if has_protocol(backing) || backing.starts_with(b"/") {
        return backing.to_vec();
    }
    let dir = image
        .iter()
        .rposition(|&b| b == b'/')
        .and_then(|slash| image.get(..=slash));
    [dir.unwrap_or_default(), backing].concat()
}

/// A path's bytes: exactly on Unix (where QEMU takes file names as bytes), lossily elsewhere.
#[cfg(unix)]
fn path_bytes(path: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes().to_vec()
}

/// A path's bytes: exactly on Unix (where QEMU takes file names as bytes), lossily elsewhere.
#[cfg(not(unix))]
fn path_bytes(path: &Path) -> Vec<u8> {
    path.to_string_lossy().into_owned().into_bytes()
}

/// A name's bytes as QEMU's JSON shows them (`to_json` in qobject/qjson.c, decoding with
/// `mod_utf8_codepoint` in util/unicode.c): each invalid sequence (a stray or impossible
/// byte, a sequence cut short, an overlong form, a surrogate, a code point past U+10FFFF, a
/// noncharacter) is one U+FFFD, and `\xC0\x80` is U+0000. The JSON printer then escapes the
/// text as QEMU does.
pub(crate) fn qemu_text(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some((&lead, tail)) = rest.split_first() {
        let (cp, used) = mod_utf8_codepoint(lead, tail);
        out.push(cp.and_then(char::from_u32).unwrap_or('\u{fffd}'));
        rest = tail.get(used..).unwrap_or_default();
    }
    out
}

/// QEMU's `mod_utf8_codepoint` on a sequence starting with `lead`: the code point (`None`
/// when invalid) and how many bytes of `tail` it took.
fn mod_utf8_codepoint(lead: u8, tail: &[u8]) -> (Option<u32>, usize) {
    if lead < 0x80 {
        return (Some(u32::from(lead)), 0);
    }
    if lead >= 0xfe || lead & 0x40 == 0 {
        return (None, 0); // impossible byte, or a continuation byte out of place
    }
    let len = lead.leading_ones() as usize; // 2 to 6
    let mut cp = u32::from(lead) & (0x7f_u32 >> len);
    let mut used = 0usize;
    for _ in 1..len {
        match tail.get(used) {
            Some(&b) if b & 0xc0 == 0x80 => {
                cp = (cp << 6) | u32::from(b & 0x3f);
                used = used.saturating_add(1);
            }
            _ => return (None, used), // continuation byte missing
        }
    }
    const MIN: [u32; 5] = [0x80, 0x800, 0x1_0000, 0x20_0000, 0x400_0000];
    let min = MIN.get(len.saturating_sub(2)).copied().unwrap_or(0);
    let noncharacter = (0xfdd0..=0xfdef).contains(&cp) || cp & 0xfffe == 0xfffe;
    let valid = cp <= 0x10_ffff && !noncharacter && !(0xd800..=0xdfff).contains(&cp);
    let overlong = cp < min && !(cp == 0 && len == 2);
    ((valid && !overlong).then_some(cp), used)
}

/// The host file node under an image. QEMU counts its length in whole 512-byte sectors too.
fn file_child(filename: &[u8], len: u64) -> ChildInfo {
    ChildInfo {
        name: "file".to_owned(),
        info: ImageInfo {
            virtual_size: sectors(len),
            filename: Some(qemu_text(filename)),
            filename_bytes: Some(filename.to_vec()),
            format: "file",
            format_specific: Some(FormatSpecific::File(FileSpecific {})),
            ..ImageInfo::empty()
        },
    }
}

impl ImageInfo {
    fn empty() -> ImageInfo {
        ImageInfo {
            children: Vec::new(),
            backing_filename_format: None,
            snapshots: Vec::new(),
            virtual_size: 0,
            filename: None,
            cluster_size: None,
            format: "",
            format_specific: None,
            full_backing_filename: None,
            encrypted: false,
            backing_filename: None,
            dirty: false,
            backing_chain: Vec::new(),
            filename_bytes: None,
            full_backing_filename_bytes: None,
            backing_filename_bytes: None,
        }
    }
}

fn info_of(view: &dyn ImageView) -> ImageInfo {
    let h: &Header = view.header();
    // QEMU reports the backing format and full name only along with a backing file.
    let backing = h.backing_file_bytes();
    let filename = view.path().map(path_bytes);
    let full_backing = match (&filename, backing) {
        (Some(path), Some(name)) => Some(full_backing_name(path, name)),
        _ => None,
    };
    ImageInfo {
        children: Vec::new(),
        backing_filename_format: backing.and(h.backing_format()).map(str::to_owned),
        snapshots: view.snapshots().iter().map(SnapshotInfo::from).collect(),
        virtual_size: h.size() & !(SECTOR - 1), // QEMU counts whole sectors
        filename: filename.as_deref().map(qemu_text),
        cluster_size: Some(h.cluster_size()),
        format: "qcow2",
        format_specific: Some(FormatSpecific::Qcow2(qcow2_specific(
            h,
            view.bitmaps(),
            view.encryption(),
        ))),
        full_backing_filename: full_backing.as_deref().map(qemu_text),
        encrypted: h.crypt_method() != 0,
        backing_filename: backing.map(qemu_text),
        dirty: h.is_dirty(),
        backing_chain: chain_below(view),
        filename_bytes: filename,
        full_backing_filename_bytes: full_backing,
        backing_filename_bytes: backing.map(<[u8]>::to_vec),
    }
}

/// QEMU's `qcow2_get_specific_info`.
fn qcow2_specific(
    h: &Header,
    bitmaps: &[Bitmap],
    encrypt: Option<&crate::EncryptionInfo>,
) -> Qcow2Specific {
    let v3 = h.version() >= 3;
    Qcow2Specific {
        compat: if v3 { "1.1" } else { "0.10" },
        compression_type: h.compression_type().name(),
        lazy_refcounts: v3.then(|| h.has_lazy_refcounts()),
        bitmaps: if v3 {
            bitmaps.iter().map(BitmapInfo::from).collect()
        } else {
            Vec::new()
        },
        refcount_bits: h.refcount_bits(),
        data_file: h.data_file().filter(|_| v3).map(str::to_owned),
        encrypt: encrypt.cloned().map(Box::new),
        data_file_raw: (v3 && h.has_data_file_bit()).then(|| h.is_data_file_raw()),
        corrupt: v3.then(|| h.is_corrupt()),
        extended_l2: v3.then(|| h.has_extended_l2()),
    }
}

fn chain_below(view: &dyn ImageView) -> Vec<ChainEntry> {
    let mut chain = Vec::new();
    let mut current = view.backing();
    while let Some(Backing::Source { source, format }) = current {
        let image = source.as_image();
        chain.push(ChainEntry {
            filename: source.path().map(|p| p.display().to_string()),
            format: (*format).to_owned(),
            virtual_size: source.guest_size(),
        });
        current = image.and_then(|i| i.backing());
    }
    chain
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_backing_names_are_qemus() {
        let full = |image: &str, backing: &str| {
            String::from_utf8(full_backing_name(image.as_bytes(), backing.as_bytes())).unwrap()
        };
        assert_eq!(full("top.qcow2", "base.qcow2"), "base.qcow2");
        assert_eq!(full("sub/t.qcow2", "../b"), "sub/../b");
        assert_eq!(full("a//t.qcow2", "b"), "a//b");
        assert_eq!(full("/x/t.qcow2", "/abs/b"), "/abs/b");
        assert_eq!(full("/x/t.qcow2", "nbd://h/e"), "nbd://h/e");
        assert_eq!(full("/x/t.qcow2", "file:b"), "file:b");
        assert_eq!(
            full_backing_name(b"d\xff/t.qcow2", b"b\xfe"),
            b"d\xff/b\xfe".to_vec()
        );
    }

    #[test]
    fn names_decode_as_qemus_json_shows_them() {
        assert_eq!(qemu_text(b"plain \xc3\xa9"), "plain é");
        assert_eq!(qemu_text(b"a\xff\xfeb"), "a\u{fffd}\u{fffd}b");
        // A cut sequence is one U+FFFD with the continuation bytes it had.
        assert_eq!(qemu_text(b"\xe2\x82z"), "\u{fffd}z");
        assert_eq!(qemu_text(b"\xf0\x9f\x98"), "\u{fffd}");
        // Stray continuation bytes: one each.
        assert_eq!(qemu_text(b"\x80\xbf"), "\u{fffd}\u{fffd}");
        // Overlong forms, surrogates, past U+10FFFF, noncharacters: one for the sequence.
        assert_eq!(qemu_text(b"\xe0\x80\xaf"), "\u{fffd}");
        assert_eq!(qemu_text(b"\xed\xa0\x80"), "\u{fffd}");
        assert_eq!(qemu_text(b"\xf4\x90\x80\x80"), "\u{fffd}");
        assert_eq!(qemu_text(b"\xef\xb7\x90\xef\xbf\xbe"), "\u{fffd}\u{fffd}");
        assert_eq!(qemu_text(b"\xf8\x88\x80\x80\x80!"), "\u{fffd}!");
        // Modified UTF-8's NUL, and a character beyond the BMP.
        assert_eq!(qemu_text(b"\xc0\x80"), "\0");
        assert_eq!(qemu_text("😀".as_bytes()), "😀");
    }

    #[test]
    fn names_are_cut_like_c_strings() {
        assert_eq!(c_string("snap\0hidden", NAME_ROOM), "snap");
        assert_eq!(c_string(&"a".repeat(300), NAME_ROOM).len(), 255);
        assert_eq!(c_string(&"a".repeat(300), ID_ROOM).len(), 127);
        // 254 ASCII bytes then a 2-byte character: it does not fit whole.
        let s = format!("{}é", "a".repeat(254));
        assert_eq!(c_string(&s, NAME_ROOM).len(), 254);
    }

    /// QEMU's `tdb_hash` bucket of a key (qobject/qdict.c).
    #[cfg(feature = "serde")]
    fn bucket(key: &str) -> u32 {
        let mut value = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
        for (i, b) in key.bytes().enumerate() {
            value = value.wrapping_add(u32::from(b) << (i * 5 % 24));
        }
        1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % 512
    }

    /// Where each key is written in `json`, in written order, with its bucket.
    #[cfg(feature = "serde")]
    fn written_buckets(json: &str, keys: &[&str]) -> Vec<(u32, String)> {
        let mut found: Vec<(usize, &str)> = keys
            .iter()
            .map(|k| (json.find(&format!("\"{k}\":")).expect(k), *k))
            .collect();
        found.sort();
        found
            .iter()
            .map(|(_, k)| (bucket(k), k.to_string()))
            .collect()
    }

    #[cfg(feature = "serde")]
    fn assert_hash_order(json: &str, keys: &[&str]) {
        let written = written_buckets(json, keys);
        assert!(
            written.windows(2).all(|w| w[0].0 <= w[1].0),
            "not in QEMU's order: {written:?}"
        );
    }

    /// serde writes fields in declaration order: it must be QEMU's bucket order. Keys sharing
    /// a bucket come out last-inserted first (QLIST_INSERT_HEAD): `children` is visited after
    /// the fields of its base type, so it comes before `backing-filename-format`.
    #[cfg(feature = "serde")]
    #[test]
    fn fields_are_in_qemu_hash_order() {
        let snap = Snapshot {
            id: "1".into(),
            name: "s".into(),
            l1_table_offset: 0,
            l1_size: 0,
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: None,
            icount: Some(5),
        };
        let bitmap = Bitmap {
            name: "b".into(),
            granularity: 65536,
            flags: 3,
            bitmap_type: 1,
            table_offset: 0x10000,
            table_size: 1,
            extra_data_size: 0,
            entry_offset: 0x20000,
            raw_name: b"b".to_vec(),
        };
        let specific = Qcow2Specific {
            compat: "1.1",
            compression_type: "zlib",
            lazy_refcounts: Some(false),
            bitmaps: vec![BitmapInfo::from(&bitmap)],
            refcount_bits: 16,
            data_file: Some("d".into()),
            encrypt: None,
            data_file_raw: Some(false),
            corrupt: Some(false),
            extended_l2: Some(false),
        };
        let info = ImageInfo {
            backing_filename_format: Some("qcow2".into()),
            virtual_size: 1,
            filename: Some("f".into()),
            cluster_size: Some(1),
            format: "qcow2",
            format_specific: Some(FormatSpecific::Qcow2(specific.clone())),
            full_backing_filename: Some("b".into()),
            encrypted: true,
            backing_filename: Some("b".into()),
            ..ImageInfo::empty()
        };
        let json = serde_json::to_string(&info).unwrap();
        assert!(json.starts_with("{\"children\":[],\"backing-filename-format\":"));
        assert_eq!(bucket("children"), bucket("backing-filename-format"));
        assert_hash_order(
            &json,
            &[
                "backing-filename-format",
                "virtual-size",
                "filename",
                "cluster-size",
                "format",
                "format-specific",
                "full-backing-filename",
                "encrypted",
                "backing-filename",
                "dirty-flag",
            ],
        );
        let mut with_snapshot = ImageInfo::empty();
        with_snapshot.snapshots = vec![SnapshotInfo::from(&snap)];
        let json = serde_json::to_string(&with_snapshot).unwrap();
        assert_hash_order(
            &json,
            &["snapshots", "virtual-size", "format", "dirty-flag"],
        );
        let json = serde_json::to_string(&specific).unwrap();
        assert_hash_order(
            &json,
            &[
                "compat",
                "compression-type",
                "lazy-refcounts",
                "bitmaps",
                "refcount-bits",
                "data-file",
                "data-file-raw",
                "corrupt",
                "extended-l2",
            ],
        );
        let json = serde_json::to_string(&SnapshotInfo::from(&snap)).unwrap();
        assert_hash_order(
            &json,
            &[
                "icount",
                "vm-clock-nsec",
                "name",
                "date-sec",
                "date-nsec",
                "vm-clock-sec",
                "id",
                "vm-state-size",
            ],
        );
        let json = serde_json::to_string(&BitmapInfo::from(&bitmap)).unwrap();
        assert_hash_order(&json, &["flags", "name", "granularity"]);
        let json = serde_json::to_string(&file_child(b"f", 1)).unwrap();
        assert_hash_order(&json, &["name", "info"]);
        let json = serde_json::to_string(&FormatSpecific::File(FileSpecific {})).unwrap();
        assert_eq!(json, r#"{"type":"file","data":{}}"#);
        assert!(bucket("type") < bucket("data"));
        // Where the `encrypt` block will go.
        assert!(
            bucket("data-file") < bucket("encrypt") && bucket("encrypt") < bucket("data-file-raw")
        );
        assert!(bucket("full-backing-filename") < bucket("encrypted"));
    }
}
