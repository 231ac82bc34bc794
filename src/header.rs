//! The image header (spec: "Header", bytes 0-111) and its extensions.
//!
//! Parsing is pure: [`Header::parse`] takes the bytes of the first cluster and applies the
//! checks QEMU's `qcow2_do_open` applies, so every rule can be tested on a byte array.

use crate::bytes::{align8, be_u32, be_u64, field, lossy, low_bits};
use crate::error::{Error, FeatureKind, Result};
use crate::feature::{self, Feature, FeatureName};
use crate::limits::Limits;

/// `QFI\xfb`, header bytes 0-3.
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header; extensions start right after it.
pub(crate) const V2_HEADER_LEN: u32 = 72;
/// Shortest valid version 3 header (everything up to `header_length`).
pub(crate) const V3_MIN_HEADER_LEN: u32 = 104;
/// Bytes enough to find `cluster_bits` and `header_length`.
pub(crate) const PROBE_LEN: usize = 112;
/// Smallest and largest cluster sizes QEMU accepts (`MIN_CLUSTER_BITS`, `MAX_CLUSTER_BITS`).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest `refcount_order` (64-bit refcounts).
const MAX_REFCOUNT_ORDER: u32 = 6;
/// Size of one L1 or (standard) L2 entry.
pub(crate) const TABLE_ENTRY_LEN: u64 = 8;
/// Size of a snapshot table entry's fixed part (`QCowSnapshotHeader`).
pub(crate) const SNAPSHOT_HEADER_LEN: u64 = 40;

// Header extension types (spec: "Header extensions").
const EXT_END: u32 = 0x0000_0000;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_ENCRYPTION: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// QEMU keeps the backing format in a 16-byte buffer: names of 16 bytes or more are refused.
const MAX_BACKING_FORMAT_LEN: u32 = 15;
/// Bitmaps extension: nb_bitmaps u32, reserved u32, directory size u64, directory offset u64.
const BITMAPS_EXT_LEN: u32 = 24;
/// Full disk encryption header pointer: offset u64, length u64.
const ENCRYPTION_EXT_LEN: u32 = 16;
/// `crypt_method` of LUKS images (header bytes 32-35), the one with an encryption header.
const CRYPT_LUKS: u32 = 2;

/// How compressed clusters are compressed (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CompressionType {
    /// Raw deflate (type 0, and the only type of version 2 images).
    Zlib,
    /// Zstandard (type 1, needs incompatible bit 3).
    Zstd,
}

impl CompressionType {
    /// The name `qemu-img info` uses.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
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

/// The parsed and validated image header, with its extensions.
#[derive(Debug, Clone)]
pub struct Header {
    version: u32,
    backing_file_offset: u64,
    backing_file_size: u32,
    cluster_bits: u32,
    size: u64,
    crypt_method: u32,
    l1_size: u32,
    l1_table_offset: u64,
    refcount_table_offset: u64,
    refcount_table_clusters: u32,
    nb_snapshots: u32,
    snapshots_offset: u64,
    incompatible_features: u64,
    compatible_features: u64,
    autoclear_features: u64,
    refcount_order: u32,
    header_length: u32,
    compression_type: CompressionType,
    extensions: Vec<Extension>,
    feature_names: Vec<FeatureName>,
    backing_file: Option<String>,
    backing_format: Option<String>,
    data_file: Option<String>,
    bitmaps: Option<BitmapsExtension>,
    encryption: Option<EncryptionExtension>,
}

fn short(what: &str) -> Error {
    Error::malformed(format!("file too short for {what}"), 0)
}

/// Read `cluster_bits` from the start of a file, checked: the I/O layer needs it to know how
/// much of the file is the first cluster.
pub(crate) fn probe_cluster_bits(prefix: &[u8]) -> Result<u32> {
    check_magic_and_version(prefix)?;
    let bits = be_u32(prefix, 20).ok_or_else(|| short("the header"))?;
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
        return Err(Error::malformed(
            format!("cluster_bits {bits} out of range {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"),
            20,
        ));
    }
    Ok(bits)
}

fn check_magic_and_version(buf: &[u8]) -> Result<u32> {
    let magic = be_u32(buf, 0).ok_or(Error::NotQcow2 { found: 0 })?;
    if magic != MAGIC {
        return Err(Error::NotQcow2 { found: magic });
    }
    let version = be_u32(buf, 4).ok_or_else(|| short("the header"))?;
    if version != 2 && version != 3 {
        return Err(Error::UnsupportedVersion { version });
    }
    Ok(version)
}

impl Header {
    /// Parse and validate the header from the image's first cluster.
    ///
    /// `cluster0` holds the first cluster, or as much of it as the file has; bytes past its
    /// end read as zeros (an end marker), as QEMU reads past the end of a file.
    pub fn parse(cluster0: &[u8], limits: &Limits) -> Result<Header> {
        let version = check_magic_and_version(cluster0)?;
        let cluster_bits = probe_cluster_bits(cluster0)?;
        let cluster_size = 1u64 << cluster_bits;
        let u32_at = |at: usize| be_u32(cluster0, at).ok_or_else(|| short("the header"));
        let u64_at = |at: usize| be_u64(cluster0, at).ok_or_else(|| short("the header"));

        let mut h = Header {
            version,
            backing_file_offset: u64_at(8)?,
            backing_file_size: u32_at(16)?,
            cluster_bits,
            size: u64_at(24)?,
            crypt_method: u32_at(32)?,
            l1_size: u32_at(36)?,
            l1_table_offset: u64_at(40)?,
            refcount_table_offset: u64_at(48)?,
            refcount_table_clusters: u32_at(56)?,
            nb_snapshots: u32_at(60)?,
            snapshots_offset: u64_at(64)?,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            extensions: Vec::new(),
            feature_names: Vec::new(),
            backing_file: None,
            backing_format: None,
            data_file: None,
            bitmaps: None,
            encryption: None,
        };
        if version >= 3 {
            h.incompatible_features = u64_at(72)?;
            h.compatible_features = u64_at(80)?;
            h.autoclear_features = u64_at(88)?;
            h.refcount_order = u32_at(96)?;
            h.header_length = u32_at(100)?;
            h.check_header_length(cluster_size)?;
            if h.header_length > 104 {
                let byte = *cluster0
                    .get(104)
                    .ok_or_else(|| short("the compression type"))?;
                h.compression_type = match byte {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    other => {
                        return Err(Error::malformed(
                            format!("unknown compression type {other}"),
                            104,
                        ))
                    }
                };
            }
        }
        h.check_fields(cluster_size, limits)?;
        h.read_extensions(cluster0, cluster_size, limits)?;
        h.check_encryption_header()?;
        h.read_backing_file_name(cluster0, cluster_size, limits)?;
        h.check_features()?;
        Ok(h)
    }

    fn check_header_length(&self, cluster_size: u64) -> Result<()> {
        if self.header_length < V3_MIN_HEADER_LEN {
            return Err(Error::malformed(
                format!("header_length {} shorter than 104", self.header_length),
                100,
            ));
        }
        if u64::from(self.header_length) > cluster_size {
            return Err(Error::malformed(
                format!(
                    "header_length {} exceeds the cluster size {cluster_size}",
                    self.header_length
                ),
                100,
            ));
        }
        Ok(())
    }

    /// The checks of `qcow2_do_open` on the fixed fields, in its order.
    fn check_fields(&self, cluster_size: u64, limits: &Limits) -> Result<()> {
        if self.backing_file_offset > cluster_size {
            return Err(Error::malformed(
                format!(
                    "backing file offset {:#x} is past the first cluster",
                    self.backing_file_offset
                ),
                8,
            ));
        }
        if self.refcount_order > MAX_REFCOUNT_ORDER {
            return Err(Error::malformed(
                format!(
                    "refcount_order {} over {MAX_REFCOUNT_ORDER}",
                    self.refcount_order
                ),
                96,
            ));
        }
        match self.crypt_method {
            // 1 (AES) and 2 (LUKS) open; reads need the secret (src/crypt).
            0..=2 => {}
            other => {
                return Err(Error::malformed(
                    format!("unknown crypt_method {other}"),
                    32,
                ));
            }
        }
        self.check_refcount_table(cluster_size, limits)?;
        self.check_snapshot_table(limits)?;
        self.check_l1_table(limits)?;
        self.check_compression_bit()
    }

    /// QEMU: "Missing CRYPTO header for crypt method 2" (LUKS keeps its header in the image).
    fn check_encryption_header(&self) -> Result<()> {
        if self.crypt_method == CRYPT_LUKS && self.encryption.is_none() {
            return Err(Error::malformed(
                "crypt_method 2 (LUKS) without the full disk encryption header extension",
                32,
            ));
        }
        Ok(())
    }

    fn check_refcount_table(&self, cluster_size: u64, limits: &Limits) -> Result<()> {
        let bytes = u64::from(self.refcount_table_clusters)
            .checked_mul(cluster_size)
            .ok_or_else(|| Error::malformed("refcount table size overflows", 56))?;
        Limits::check("refcount table", bytes, limits.max_refcount_table_bytes)?;
        if self.refcount_table_clusters == 0 {
            return Err(Error::malformed("image has no refcount table", 56));
        }
        self.check_table_placement("refcount table", self.refcount_table_offset, bytes, 48)
    }

    fn check_snapshot_table(&self, limits: &Limits) -> Result<()> {
        Limits::check(
            "snapshot count",
            u64::from(self.nb_snapshots),
            limits.max_snapshots,
        )?;
        let bytes = u64::from(self.nb_snapshots)
            .checked_mul(SNAPSHOT_HEADER_LEN)
            .ok_or_else(|| Error::malformed("snapshot table size overflows", 60))?;
        if self.nb_snapshots == 0 {
            return Ok(());
        }
        self.check_table_placement("snapshot table", self.snapshots_offset, bytes, 64)
    }

    fn check_l1_table(&self, limits: &Limits) -> Result<()> {
        // QEMU's block layer cannot address more than 2^63 bytes; neither do we, so guest
        // offset arithmetic has room for a cluster past the end.
        if self.size > i64::MAX as u64 {
            return Err(Error::malformed(
                format!("virtual size {:#x} is too big", self.size),
                24,
            ));
        }
        let bytes = u64::from(self.l1_size).saturating_mul(TABLE_ENTRY_LEN);
        Limits::check("L1 table", bytes, limits.max_l1_bytes)?;
        let needed = self.l1_entries_for(self.size).ok_or_else(|| {
            Error::malformed(format!("virtual size {:#x} is too big", self.size), 24)
        })?;
        if needed > i32::MAX as u64 {
            return Err(Error::malformed(
                format!("virtual size {:#x} is too big", self.size),
                24,
            ));
        }
        if u64::from(self.l1_size) < needed {
            return Err(Error::malformed(
                format!(
                    "L1 table has {} entries, the virtual size needs {needed}",
                    self.l1_size
                ),
                36,
            ));
        }
        if self.l1_size == 0 {
            return Ok(());
        }
        self.check_table_placement("L1 table", self.l1_table_offset, bytes, 40)
    }

    /// QEMU's `validate_table_offset`: cluster aligned, and the end must not overflow.
    fn check_table_placement(
        &self,
        what: &str,
        offset: u64,
        len: u64,
        field_at: u64,
    ) -> Result<()> {
        if low_bits(offset, self.cluster_bits) != 0 {
            return Err(Error::malformed(
                format!("{what} offset {offset:#x} is not cluster aligned"),
                field_at,
            ));
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > i64::MAX as u64)
        {
            return Err(Error::malformed(
                format!("{what} at {offset:#x} + {len:#x} overflows"),
                field_at,
            ));
        }
        if offset == 0 {
            return Err(Error::malformed(
                format!("{what} overlaps the header"),
                field_at,
            ));
        }
        Ok(())
    }

    fn check_compression_bit(&self) -> Result<()> {
        let bit_set = self.incompatible_features & feature::INCOMPAT_COMPRESSION != 0;
        match (self.compression_type, bit_set) {
            (CompressionType::Zlib, true) => Err(Error::malformed(
                "compression type incompatible bit set with zlib compression",
                72,
            )),
            (CompressionType::Zstd, false) => Err(Error::malformed(
                "compression type is zstd but the incompatible bit is not set",
                72,
            )),
            _ => Ok(()),
        }
    }

    /// Refuse incompatible bits we cannot read, naming them from the image's own table.
    fn check_features(&self) -> Result<()> {
        if self.incompatible_features & feature::INCOMPAT_CORRUPT != 0 {
            return Err(Error::Corrupt);
        }
        let unknown = self.incompatible_features & !feature::INCOMPAT_SUPPORTED;
        if unknown != 0 {
            let bit = unknown.trailing_zeros() as u8;
            let kind = FeatureKind::Incompatible;
            let name = feature::name_of(kind, bit, &self.feature_names)
                .unwrap_or_else(|| "unknown".to_owned());
            return Err(Error::UnsupportedFeature { kind, bit, name });
        }
        if self.has_extended_l2() && self.cluster_bits < MIN_CLUSTER_BITS + 5 {
            return Err(Error::malformed(
                format!(
                    "extended L2 entries need clusters of at least 16 KiB, not {}",
                    self.cluster_size()
                ),
                20,
            ));
        }
        // The data-file bit without a name is allowed: QEMU then takes the file from its
        // options, and `Qcow2::reader` requires the caller to attach one.
        Ok(())
    }

    /// Walk the extensions from the end of the header to the backing-file name (or the end of
    /// the cluster), as `qcow2_read_extensions` does.
    fn read_extensions(
        &mut self,
        cluster0: &[u8],
        cluster_size: u64,
        limits: &Limits,
    ) -> Result<()> {
        let end = if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            cluster_size
        };
        let mut offset = u64::from(self.header_length);
        while offset < end {
            let Some(at) = usize::try_from(offset)
                .ok()
                .filter(|&at| at < cluster0.len())
            else {
                break; // past the end of the file: reads as zeros, an end marker
            };
            let magic = be_u32(cluster0, at).unwrap_or(EXT_END);
            if magic == EXT_END {
                break;
            }
            let len = be_u32(cluster0, at.saturating_add(4)).unwrap_or(0);
            let data_at = offset.saturating_add(8);
            if data_at > end || u64::from(len) > end.saturating_sub(data_at) {
                return Err(Error::malformed(
                    format!("header extension {magic:#010x} of {len} bytes runs past {end:#x}"),
                    offset,
                ));
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
            self.take_extension(ExtensionKind::from_magic(magic), data, data_at, limits)?;
            offset = data_at.saturating_add(align8(u64::from(len)).unwrap_or(u64::MAX));
        }
        Ok(())
    }

    fn take_extension(
        &mut self,
        kind: ExtensionKind,
        data: &[u8],
        offset: u64,
        limits: &Limits,
    ) -> Result<()> {
        let len = data.len() as u32;
        if !matches!(kind, ExtensionKind::Unknown(_))
            && self.extensions.iter().any(|e| e.kind == kind)
        {
            // QEMU lets the last one win; two different answers to one question is an attack
            // surface, so we refuse.
            return Err(Error::malformed(
                format!("header extension {kind:?} appears twice"),
                offset,
            ));
        }
        match kind {
            ExtensionKind::BackingFormat => {
                if len > MAX_BACKING_FORMAT_LEN {
                    return Err(Error::malformed(
                        format!("backing format name of {len} bytes is too long"),
                        offset,
                    ));
                }
                self.backing_format = Some(lossy(data));
            }
            ExtensionKind::FeatureNames => self.feature_names = feature::parse_feature_names(data),
            // Without the autoclear bit the extension is stale: QEMU ignores it, and so do we.
            ExtensionKind::Bitmaps if self.autoclear_features & feature::AUTOCLEAR_BITMAPS == 0 => {
            }
            ExtensionKind::Bitmaps => {
                self.bitmaps = parse_bitmaps_ext(data, offset, self.cluster_bits, limits)?
            }
            ExtensionKind::Encryption => {
                // QEMU: "CRYPTO header extension only expected with LUKS encryption method".
                if self.crypt_method != CRYPT_LUKS {
                    return Err(Error::malformed(
                        format!(
                            "encryption header extension with crypt_method {}, only LUKS (2) has one",
                            self.crypt_method
                        ),
                        offset,
                    ));
                }
                if len != ENCRYPTION_EXT_LEN {
                    return Err(Error::malformed(
                        format!("encryption header extension of {len} bytes, expected 16"),
                        offset,
                    ));
                }
                let ext = EncryptionExtension {
                    offset: be_u64(data, 0).unwrap_or(0),
                    length: be_u64(data, 8).unwrap_or(0),
                };
                if low_bits(ext.offset, self.cluster_bits) != 0 {
                    return Err(Error::malformed(
                        format!(
                            "encryption header offset {:#x} is not cluster aligned",
                            ext.offset
                        ),
                        offset,
                    ));
                }
                self.encryption = Some(ext);
            }
            ExtensionKind::DataFile => {
                Limits::check(
                    "data file name",
                    u64::from(len),
                    limits.max_backing_name_bytes,
                )?;
                self.data_file = Some(lossy(data));
            }
            ExtensionKind::Unknown(_) => {}
        }
        self.extensions.push(Extension { kind, offset, len });
        Ok(())
    }

    fn read_backing_file_name(
        &mut self,
        cluster0: &[u8],
        cluster_size: u64,
        limits: &Limits,
    ) -> Result<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        let len = u64::from(self.backing_file_size);
        let room = cluster_size.saturating_sub(self.backing_file_offset);
        if len > room {
            return Err(Error::malformed(
                format!("backing file name of {len} bytes runs past the first cluster"),
                16,
            ));
        }
        Limits::check("backing file name", len, limits.max_backing_name_bytes)?;
        let name = usize::try_from(self.backing_file_offset)
            .ok()
            .and_then(|at| field(cluster0, at, len as usize))
            .ok_or_else(|| {
                Error::malformed(
                    "backing file name runs past the end of the file",
                    self.backing_file_offset,
                )
            })?;
        self.backing_file = Some(lossy(name));
        Ok(())
    }

    /// Number of L1 entries needed to map `size` guest bytes.
    pub(crate) fn l1_entries_for(&self, size: u64) -> Option<u64> {
        let bytes_per_l1 = self.cluster_size().checked_mul(self.l2_entries())?;
        Some(size.div_ceil(bytes_per_l1))
    }

    /// Header format version: 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }
    /// `cluster_bits`, 9 to 21.
    pub fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Encryption method: 0 none, 1 AES, 2 LUKS.
    pub fn crypt_method(&self) -> u32 {
        self.crypt_method
    }
    /// Number of entries in the active L1 table.
    pub fn l1_size(&self) -> u32 {
        self.l1_size
    }
    /// File offset of the active L1 table.
    pub fn l1_table_offset(&self) -> u64 {
        self.l1_table_offset
    }
    /// File offset of the refcount table.
    pub fn refcount_table_offset(&self) -> u64 {
        self.refcount_table_offset
    }
    /// Clusters taken by the refcount table.
    pub fn refcount_table_clusters(&self) -> u32 {
        self.refcount_table_clusters
    }
    /// Number of internal snapshots.
    pub fn nb_snapshots(&self) -> u32 {
        self.nb_snapshots
    }
    /// File offset of the snapshot table.
    pub fn snapshots_offset(&self) -> u64 {
        self.snapshots_offset
    }
    /// Incompatible feature bits (0 in version 2).
    pub fn incompatible_features(&self) -> u64 {
        self.incompatible_features
    }
    /// Compatible feature bits (0 in version 2).
    pub fn compatible_features(&self) -> u64 {
        self.compatible_features
    }
    /// Autoclear feature bits (0 in version 2).
    pub fn autoclear_features(&self) -> u64 {
        self.autoclear_features
    }
    /// Width of a refcount is `1 << refcount_order` bits (4 in version 2).
    pub fn refcount_order(&self) -> u32 {
        self.refcount_order
    }
    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    /// Header length in bytes (72 in version 2).
    pub fn header_length(&self) -> u32 {
        self.header_length
    }
    /// How compressed clusters are compressed.
    pub fn compression_type(&self) -> CompressionType {
        self.compression_type
    }
    /// The header extensions found, in order, unknown ones included.
    pub fn extensions(&self) -> &[Extension] {
        &self.extensions
    }
    /// The feature-name table, empty when the image has none.
    pub fn feature_names(&self) -> &[FeatureName] {
        &self.feature_names
    }
    /// Every feature bit that is set, of the three kinds, with its name.
    pub fn features(&self) -> Vec<Feature> {
        let mut all = feature::features_set(
            FeatureKind::Incompatible,
            self.incompatible_features,
            &self.feature_names,
        );
        all.extend(feature::features_set(
            FeatureKind::Compatible,
            self.compatible_features,
            &self.feature_names,
        ));
        all.extend(feature::features_set(
            FeatureKind::Autoclear,
            self.autoclear_features,
            &self.feature_names,
        ));
        all
    }
    /// The backing file name, as stored in the image.
    pub fn backing_file(&self) -> Option<&str> {
        self.backing_file.as_deref()
    }
    /// The backing file format from the backing-format extension (`qcow2`, `raw`, ...).
    pub fn backing_format(&self) -> Option<&str> {
        self.backing_format.as_deref()
    }
    /// The external data file name from its extension.
    pub fn data_file(&self) -> Option<&str> {
        self.data_file.as_deref()
    }
    /// The bitmaps extension, when present.
    pub fn bitmaps(&self) -> Option<&BitmapsExtension> {
        self.bitmaps.as_ref()
    }
    /// The encryption header pointer, when present.
    pub fn encryption(&self) -> Option<&EncryptionExtension> {
        self.encryption.as_ref()
    }
    /// Dirty bit: the image was not closed cleanly. It still reads correctly.
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & feature::INCOMPAT_DIRTY != 0
    }
    /// Corrupt bit (never true on an opened image: those are refused).
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & feature::INCOMPAT_CORRUPT != 0
    }
    /// Lazy refcounts (compatible bit 0).
    pub fn has_lazy_refcounts(&self) -> bool {
        self.compatible_features & feature::COMPAT_LAZY_REFCOUNTS != 0
    }
    /// L2 entries are 128 bits with 32 subclusters (incompatible bit 4).
    pub fn has_extended_l2(&self) -> bool {
        self.incompatible_features & feature::INCOMPAT_EXTL2 != 0
    }
    /// Guest data lives in an external data file (incompatible bit 2).
    pub fn has_data_file_bit(&self) -> bool {
        self.incompatible_features & feature::INCOMPAT_DATA_FILE != 0
    }
    /// The external data file is a raw image of the guest (autoclear bit 1).
    pub fn is_data_file_raw(&self) -> bool {
        self.autoclear_features & feature::AUTOCLEAR_DATA_FILE_RAW != 0
    }
    /// Bytes per L2 entry: 16 with extended L2, else 8.
    pub(crate) fn l2_entry_len(&self) -> u64 {
        if self.has_extended_l2() {
            16
        } else {
            8
        }
    }
    /// Entries per L2 table (one cluster).
    pub(crate) fn l2_entries(&self) -> u64 {
        // Both powers of two, the entry length at most 16: never zero.
        self.cluster_size() >> self.l2_entry_len().trailing_zeros()
    }
}

/// Parse the bitmaps extension with QEMU's checks.
fn parse_bitmaps_ext(
    data: &[u8],
    offset: u64,
    cluster_bits: u32,
    limits: &Limits,
) -> Result<Option<BitmapsExtension>> {
    if data.len() != BITMAPS_EXT_LEN as usize {
        return Err(Error::malformed(
            format!("bitmaps extension of {} bytes, expected 24", data.len()),
            offset,
        ));
    }
    let nb_bitmaps = be_u32(data, 0).unwrap_or(0);
    let reserved = be_u32(data, 4).unwrap_or(0);
    let directory_size = be_u64(data, 8).unwrap_or(0);
    let directory_offset = be_u64(data, 16).unwrap_or(0);
    if reserved != 0 {
        return Err(Error::malformed(
            "bitmaps extension reserved field is not zero",
            offset,
        ));
    }
    if nb_bitmaps == 0 {
        return Err(Error::malformed(
            "bitmaps extension with zero bitmaps",
            offset,
        ));
    }
    Limits::check("bitmap count", u64::from(nb_bitmaps), limits.max_bitmaps)?;
    Limits::check(
        "bitmap directory",
        directory_size,
        limits.max_bitmap_directory_bytes,
    )?;
    if low_bits(directory_offset, cluster_bits) != 0 {
        return Err(Error::malformed(
            format!("bitmap directory offset {directory_offset:#x} is not cluster aligned"),
            offset,
        ));
    }
    Ok(Some(BitmapsExtension {
        nb_bitmaps,
        directory_size,
        directory_offset,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid v3 header for a 1 GiB image with 64 KiB clusters, padded to one cluster.
    fn valid_v3() -> Vec<u8> {
        let mut h = Vec::new();
        h.extend(MAGIC.to_be_bytes()); // 0: magic
        h.extend(3u32.to_be_bytes()); // 4: version
        h.extend(0u64.to_be_bytes()); // 8: backing_file_offset
        h.extend(0u32.to_be_bytes()); // 16: backing_file_size
        h.extend(16u32.to_be_bytes()); // 20: cluster_bits
        h.extend((1u64 << 30).to_be_bytes()); // 24: size
        h.extend(0u32.to_be_bytes()); // 32: crypt_method
        h.extend(2u32.to_be_bytes()); // 36: l1_size
        h.extend(0x30000u64.to_be_bytes()); // 40: l1_table_offset
        h.extend(0x10000u64.to_be_bytes()); // 48: refcount_table_offset
        h.extend(1u32.to_be_bytes()); // 56: refcount_table_clusters
        h.extend(0u32.to_be_bytes()); // 60: nb_snapshots
        h.extend(0u64.to_be_bytes()); // 64: snapshots_offset
        h.extend(0u64.to_be_bytes()); // 72: incompatible_features
        h.extend(0u64.to_be_bytes()); // 80: compatible_features
        h.extend(0u64.to_be_bytes()); // 88: autoclear_features
        h.extend(4u32.to_be_bytes()); // 96: refcount_order
        h.extend(112u32.to_be_bytes()); // 100: header_length
        h.push(0); // 104: compression_type
        h.extend([0u8; 7]); // 105: padding
        h.resize(65536, 0); // end-of-extensions marker and the rest of the cluster
        h
    }

    fn set_u32(h: &mut [u8], at: usize, v: u32) {
        h[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    fn set_u64(h: &mut [u8], at: usize, v: u64) {
        h[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }
    fn parse(h: &[u8]) -> Result<Header> {
        Header::parse(h, &Limits::default())
    }
    fn malformed_at(r: Result<Header>) -> u64 {
        match r {
            Err(Error::Malformed { offset, .. }) => offset,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }
    fn push_ext(h: &mut [u8], at: &mut usize, magic: u32, data: &[u8]) {
        let mut ext = magic.to_be_bytes().to_vec();
        ext.extend((data.len() as u32).to_be_bytes());
        ext.extend(data);
        while ext.len() % 8 != 0 {
            ext.push(0);
        }
        h[*at..*at + ext.len()].copy_from_slice(&ext);
        *at += ext.len();
    }

    #[test]
    fn valid_header_parses() {
        let h = parse(&valid_v3()).unwrap();
        assert_eq!(h.version(), 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.size(), 1 << 30);
        assert_eq!(h.refcount_bits(), 16);
        assert_eq!(h.compression_type(), CompressionType::Zlib);
        assert!(h.extensions().is_empty());
    }

    #[test]
    fn v2_header_has_v3_defaults() {
        let mut b = valid_v3();
        set_u32(&mut b, 4, 2);
        // v2 has no fields past 72: whatever lies there is extension space.
        b[72..112].fill(0);
        let h = parse(&b).unwrap();
        assert_eq!(h.header_length(), 72);
        assert_eq!(h.refcount_order(), 4);
        assert_eq!(h.incompatible_features(), 0);
    }

    #[test]
    fn magic_and_version() {
        let mut b = valid_v3();
        b[0] = b'X';
        assert!(matches!(parse(&b), Err(Error::NotQcow2 { .. })));
        for v in [1, 4] {
            let mut b = valid_v3();
            set_u32(&mut b, 4, v);
            assert!(
                matches!(parse(&b), Err(Error::UnsupportedVersion { version }) if version == v)
            );
        }
        assert!(matches!(parse(&[0x51, 0x46]), Err(Error::NotQcow2 { .. })));
    }

    #[test]
    fn cluster_bits_range() {
        for bits in [0, 8, 22, 63] {
            let mut b = valid_v3();
            set_u32(&mut b, 20, bits);
            assert_eq!(malformed_at(parse(&b)), 20, "cluster_bits {bits}");
        }
    }

    #[test]
    fn header_length_rules() {
        let mut b = valid_v3();
        set_u32(&mut b, 100, 100);
        assert_eq!(malformed_at(parse(&b)), 100);
        set_u32(&mut b, 100, 65544);
        assert_eq!(malformed_at(parse(&b)), 100);
        // Exactly 104: no compression type byte, zlib implied.
        set_u32(&mut b, 100, 104);
        b[104] = 1;
        assert_eq!(parse(&b).unwrap().compression_type(), CompressionType::Zlib);
    }

    #[test]
    fn table_alignment_and_size() {
        let mut b = valid_v3();
        set_u64(&mut b, 40, 0x30200); // L1 not cluster aligned
        assert_eq!(malformed_at(parse(&b)), 40);
        let mut b = valid_v3();
        set_u32(&mut b, 36, 1); // 1 GiB needs 2 L1 entries with 64 KiB clusters
        assert_eq!(malformed_at(parse(&b)), 36);
        let mut b = valid_v3();
        set_u32(&mut b, 36, (32 << 20) / 8 + 1); // over QEMU's 32 MiB L1
        assert!(matches!(parse(&b), Err(Error::LimitExceeded { .. })));
        let mut b = valid_v3();
        set_u64(&mut b, 48, 0x10100); // refcount table unaligned
        assert_eq!(malformed_at(parse(&b)), 48);
        let mut b = valid_v3();
        set_u32(&mut b, 56, 0); // no refcount table
        assert_eq!(malformed_at(parse(&b)), 56);
        let mut b = valid_v3();
        set_u32(&mut b, 56, 129); // over QEMU's 8 MiB refcount table
        assert!(matches!(parse(&b), Err(Error::LimitExceeded { .. })));
        let mut b = valid_v3();
        set_u32(&mut b, 60, 65537); // too many snapshots
        assert!(matches!(parse(&b), Err(Error::LimitExceeded { .. })));
        let mut b = valid_v3();
        set_u32(&mut b, 60, 1);
        set_u64(&mut b, 64, 0x12345); // snapshot table unaligned
        assert_eq!(malformed_at(parse(&b)), 64);
        let mut b = valid_v3();
        set_u64(&mut b, 24, u64::MAX - 5); // virtual size near 2^64
        assert_eq!(malformed_at(parse(&b)), 24);
    }

    #[test]
    fn refcount_order_and_crypt_method() {
        let mut b = valid_v3();
        set_u32(&mut b, 96, 7);
        assert_eq!(malformed_at(parse(&b)), 96);
        let mut b = valid_v3();
        set_u32(&mut b, 32, 1); // AES: no header of its own
        assert_eq!(parse(&b).unwrap().crypt_method(), 1);
        set_u32(&mut b, 32, 2); // LUKS without its header extension (QEMU refuses too)
        assert_eq!(malformed_at(parse(&b)), 32);
        set_u32(&mut b, 32, 3);
        assert_eq!(malformed_at(parse(&b)), 32);
    }

    #[test]
    fn encryption_extension_follows_qemus_rules() {
        let with_ext = |method: u32, offset: u64, len: u64| {
            let mut b = valid_v3();
            set_u32(&mut b, 32, method);
            let mut data = offset.to_be_bytes().to_vec();
            data.extend(len.to_be_bytes());
            let mut at = 112;
            push_ext(&mut b, &mut at, EXT_ENCRYPTION, &data);
            parse(&b)
        };
        let h = with_ext(2, 0x20000, 0x81000).unwrap();
        assert_eq!(
            h.encryption(),
            Some(&EncryptionExtension {
                offset: 0x20000,
                length: 0x81000
            })
        );
        // Only LUKS has the extension; its header starts on a cluster boundary.
        assert_eq!(malformed_at(with_ext(0, 0x20000, 0x81000)), 120);
        assert_eq!(malformed_at(with_ext(1, 0x20000, 0x81000)), 120);
        assert_eq!(malformed_at(with_ext(2, 0x20200, 0x81000)), 120);
    }

    #[test]
    fn feature_bits() {
        let mut b = valid_v3();
        set_u64(&mut b, 72, INCOMPAT_DIRTY_BIT);
        assert!(parse(&b).unwrap().is_dirty());
        set_u64(&mut b, 72, 2);
        assert!(matches!(parse(&b), Err(Error::Corrupt)));
        set_u64(&mut b, 72, 1 << 9);
        assert!(matches!(
            parse(&b),
            Err(Error::UnsupportedFeature { bit: 9, ref name, .. }) if name == "unknown"
        ));
        // With a feature-name table, the refusal uses the image's own name for the bit.
        let mut at = 112;
        let mut entry = vec![0u8, 9];
        entry.extend(b"teleportation");
        entry.resize(48, 0);
        push_ext(&mut b, &mut at, EXT_FEATURE_NAMES, &entry);
        assert!(matches!(
            parse(&b),
            Err(Error::UnsupportedFeature { bit: 9, ref name, .. }) if name == "teleportation"
        ));
        // Compatible and autoclear bits never stop the open.
        let mut b = valid_v3();
        set_u64(&mut b, 80, u64::MAX);
        set_u64(&mut b, 88, 1 << 40);
        assert!(parse(&b).is_ok());
        // Extended L2 needs clusters of 16 KiB or more.
        let mut b = valid_v3();
        set_u64(&mut b, 72, INCOMPAT_EXTL2);
        set_u32(&mut b, 20, 12);
        set_u32(&mut b, 36, 2048);
        set_u64(&mut b, 40, 0x30000);
        assert_eq!(malformed_at(parse(&b[..4096])), 20);
    }

    const INCOMPAT_DIRTY_BIT: u64 = feature::INCOMPAT_DIRTY;
    use crate::feature::INCOMPAT_EXTL2;

    #[test]
    fn compression_type_needs_its_bit() {
        let mut b = valid_v3();
        b[104] = 1;
        assert_eq!(malformed_at(parse(&b)), 72);
        set_u64(&mut b, 72, feature::INCOMPAT_COMPRESSION);
        assert_eq!(parse(&b).unwrap().compression_type(), CompressionType::Zstd);
        b[104] = 0;
        assert_eq!(malformed_at(parse(&b)), 72);
        b[104] = 2;
        assert_eq!(malformed_at(parse(&b)), 104);
    }

    #[test]
    fn extensions_and_backing_name() {
        let mut b = valid_v3();
        let mut at = 112;
        push_ext(&mut b, &mut at, EXT_BACKING_FORMAT, b"qcow2");
        push_ext(&mut b, &mut at, 0x1234_5678, b"unknown stuff");
        push_ext(&mut b, &mut at, EXT_DATA_FILE, b"data.raw");
        let name = b"base image.qcow2";
        b[1024..1024 + name.len()].copy_from_slice(name);
        set_u64(&mut b, 8, 1024);
        set_u32(&mut b, 16, name.len() as u32);
        let h = parse(&b).unwrap();
        assert_eq!(h.backing_format(), Some("qcow2"));
        assert_eq!(h.data_file(), Some("data.raw"));
        assert_eq!(h.backing_file(), Some("base image.qcow2"));
        let kinds: Vec<_> = h.extensions().iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                ExtensionKind::BackingFormat,
                ExtensionKind::Unknown(0x1234_5678),
                ExtensionKind::DataFile
            ]
        );
        assert_eq!(h.extensions()[1].len, 13);

        // A repeated known extension is refused.
        let mut r = b.clone();
        let mut at2 = at;
        push_ext(&mut r, &mut at2, EXT_BACKING_FORMAT, b"raw");
        assert_eq!(malformed_at(parse(&r)), at as u64 + 8);
        // An extension running past the backing-file name (the extension area's end).
        let mut r = b.clone();
        r[at..at + 8].copy_from_slice(&[0x12, 0x34, 0x56, 0x78, 0, 0, 0x10, 0]);
        assert_eq!(malformed_at(parse(&r)), at as u64);
        // Backing format names of 16 bytes or more are refused, as QEMU refuses them.
        let mut r = valid_v3();
        let mut a = 112;
        push_ext(&mut r, &mut a, EXT_BACKING_FORMAT, b"0123456789abcdef");
        assert_eq!(malformed_at(parse(&r)), 120);
        // Backing name over QEMU's 1023 bytes, or running past the first cluster.
        let mut r = b.clone();
        set_u32(&mut r, 16, 1024);
        assert!(matches!(
            parse(&r),
            Err(Error::LimitExceeded {
                requested: 1024,
                ..
            })
        ));
        set_u32(&mut r, 16, 65536 - 1000);
        assert_eq!(malformed_at(parse(&r)), 16);
        let mut r = b.clone();
        set_u64(&mut r, 8, 65537);
        assert_eq!(malformed_at(parse(&r)), 8);
    }

    #[test]
    fn bitmaps_extension_rules() {
        let ext = |nb: u32, reserved: u32, size: u64, offset: u64| {
            let mut d = nb.to_be_bytes().to_vec();
            d.extend(reserved.to_be_bytes());
            d.extend(size.to_be_bytes());
            d.extend(offset.to_be_bytes());
            d
        };
        let with = |data: &[u8], autoclear: u64| {
            let mut b = valid_v3();
            set_u64(&mut b, 88, autoclear);
            let mut at = 112;
            push_ext(&mut b, &mut at, EXT_BITMAPS, data);
            parse(&b)
        };
        let h = with(&ext(1, 0, 64, 0x40000), 1).unwrap();
        assert_eq!(h.bitmaps().unwrap().directory_offset, 0x40000);
        // Without the autoclear bit the extension is ignored, as QEMU ignores it.
        assert!(with(&ext(0, 7, 64, 0x40001), 0)
            .unwrap()
            .bitmaps()
            .is_none());
        assert!(with(&ext(1, 7, 64, 0x40000), 1).is_err());
        assert!(with(&ext(0, 0, 64, 0x40000), 1).is_err());
        assert!(with(&ext(1, 0, 64, 0x40001), 1).is_err());
        assert!(matches!(
            with(&ext(70000, 0, 64, 0x40000), 1),
            Err(Error::LimitExceeded { .. })
        ));
        assert!(with(&ext(1, 0, 64, 0x40000)[..16], 1).is_err());
    }
}
