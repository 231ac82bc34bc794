//! The image header (spec: "Header", bytes 0-111) and its extensions.
//!
//! Parsing is pure: [`Header::parse`] takes the bytes of the first cluster and applies the
//! checks QEMU's `qcow2_do_open` applies, so every rule can be tested on a byte array.

use std::path::Path;

use crate::base::bytes::{be_u32, be_u64, field, lossy, low_bits, until_nul};
use crate::base::limits::Limits;
use crate::error::{Error, Result};
use crate::format::extension::{
    self, BitmapsExtension, EncryptionExtension, Extension, Extensions,
};
use crate::format::feature::{self, Feature, FeatureKind, FeatureName};

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

/// Byte offsets of the header fields (spec: "Header"); version 3 fields start at 72.
pub(crate) mod at {
    pub const MAGIC: u64 = 0;
    pub const VERSION: u64 = 4;
    pub const BACKING_FILE_OFFSET: u64 = 8;
    pub const BACKING_FILE_SIZE: u64 = 16;
    pub const CLUSTER_BITS: u64 = 20;
    pub const SIZE: u64 = 24;
    pub const CRYPT_METHOD: u64 = 32;
    pub const L1_SIZE: u64 = 36;
    pub const L1_TABLE_OFFSET: u64 = 40;
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    pub const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
    pub const NB_SNAPSHOTS: u64 = 60;
    pub const SNAPSHOTS_OFFSET: u64 = 64;
    pub const INCOMPATIBLE_FEATURES: u64 = 72;
    pub const COMPATIBLE_FEATURES: u64 = 80;
    pub const AUTOCLEAR_FEATURES: u64 = 88;
    pub const REFCOUNT_ORDER: u64 = 96;
    pub const HEADER_LENGTH: u64 = 100;
    pub const COMPRESSION_TYPE: u64 = 104;
}

/// `crypt_method` of legacy AES-CBC images (header bytes 32-35).
pub(crate) const CRYPT_AES: u32 = 1;
/// `crypt_method` of LUKS images, the one with an encryption header extension.
pub(crate) const CRYPT_LUKS: u32 = 2;

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

/// The parsed and validated image header, with its extensions.
///
/// ```
/// let image = qcow2::Qcow2::open_path("fixtures/v3-64k-basic.qcow2")?;
/// let header = image.header();
/// assert_eq!(header.version(), 3);
/// assert_eq!(header.cluster_size(), 65536);
/// assert!(!header.is_corrupt());
/// # Ok::<(), qcow2::Error>(())
/// ```
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
    ext: Extensions,
    /// The backing file name's bytes, up to its first NUL; `None` when absent or empty.
    backing_file: Option<Vec<u8>>,
    /// The same, as text (lossy where it is not UTF-8).
    backing_file_text: Option<String>,
    /// The data file name as text.
    data_file_text: Option<String>,
}

fn short(what: &str) -> Error {
    Error::malformed(format!("file too short for {what}"), 0)
}

/// Read `cluster_bits` from the start of a file, checked: the I/O layer needs it to know how
/// much of the file is the first cluster.
pub(crate) fn probe_cluster_bits(prefix: &[u8]) -> Result<u32> {
    check_magic_and_version(prefix)?;
    let bits = be_u32(prefix, at::CLUSTER_BITS as usize).ok_or_else(|| short("the header"))?;
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
        return Err(Error::malformed(
            format!("cluster_bits {bits} out of range {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"),
            at::CLUSTER_BITS,
        ));
    }
    Ok(bits)
}

/// `buf` is the start of the file, or all of it when shorter: a file shorter than its
/// version's header is [`Error::TooShort`].
fn check_magic_and_version(buf: &[u8]) -> Result<u32> {
    let too_short = || Error::TooShort {
        len: buf.len() as u64,
    };
    let magic = be_u32(buf, at::MAGIC as usize).ok_or_else(too_short)?;
    if magic != MAGIC {
        return Err(Error::NotQcow2 { found: magic });
    }
    let version = be_u32(buf, at::VERSION as usize).ok_or_else(too_short)?;
    if version != 2 && version != 3 {
        return Err(Error::UnsupportedVersion { version });
    }
    let header_len = if version == 2 {
        V2_HEADER_LEN
    } else {
        V3_MIN_HEADER_LEN
    };
    if (buf.len() as u64) < u64::from(header_len) {
        return Err(too_short());
    }
    Ok(version)
}

impl Header {
    /// Parse and validate the header from the image's first cluster.
    ///
    /// `cluster0` holds the first cluster, or as much of it as the file has; bytes past its
    /// end read as zeros (an end marker), as QEMU reads past the end of a file.
    ///
    /// ```
    /// let bytes = std::fs::read("fixtures/v3-64k-basic.qcow2")?;
    /// let header = qcow2::Header::parse(&bytes[..65536], &qcow2::Limits::default())?;
    /// assert_eq!(header.cluster_bits(), 16);
    /// assert!(matches!(
    ///     qcow2::Header::parse(&bytes[..3], &qcow2::Limits::default()),
    ///     Err(qcow2::Error::TooShort { len: 3 })
    /// ));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn parse(cluster0: &[u8], limits: &Limits) -> Result<Header> {
        let version = check_magic_and_version(cluster0)?;
        let cluster_bits = probe_cluster_bits(cluster0)?;
        let cluster_size = 1u64 << cluster_bits;
        let u32_at = |at: u64| be_u32(cluster0, at as usize).ok_or_else(|| short("the header"));
        let u64_at = |at: u64| be_u64(cluster0, at as usize).ok_or_else(|| short("the header"));

        let mut h = Header {
            version,
            backing_file_offset: u64_at(at::BACKING_FILE_OFFSET)?,
            backing_file_size: u32_at(at::BACKING_FILE_SIZE)?,
            cluster_bits,
            size: u64_at(at::SIZE)?,
            crypt_method: u32_at(at::CRYPT_METHOD)?,
            l1_size: u32_at(at::L1_SIZE)?,
            l1_table_offset: u64_at(at::L1_TABLE_OFFSET)?,
            refcount_table_offset: u64_at(at::REFCOUNT_TABLE_OFFSET)?,
            refcount_table_clusters: u32_at(at::REFCOUNT_TABLE_CLUSTERS)?,
            nb_snapshots: u32_at(at::NB_SNAPSHOTS)?,
            snapshots_offset: u64_at(at::SNAPSHOTS_OFFSET)?,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            ext: Extensions::default(),
            backing_file: None,
            backing_file_text: None,
            data_file_text: None,
        };
        if version >= 3 {
            h.incompatible_features = u64_at(at::INCOMPATIBLE_FEATURES)?;
            h.compatible_features = u64_at(at::COMPATIBLE_FEATURES)?;
            h.autoclear_features = u64_at(at::AUTOCLEAR_FEATURES)?;
            h.refcount_order = u32_at(at::REFCOUNT_ORDER)?;
            h.header_length = u32_at(at::HEADER_LENGTH)?;
            h.check_header_length(cluster_size)?;
            if u64::from(h.header_length) > at::COMPRESSION_TYPE {
                let byte = *cluster0
                    .get(at::COMPRESSION_TYPE as usize)
                    .ok_or_else(|| short("the compression type"))?;
                h.compression_type = match byte {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    other => {
                        return Err(Error::malformed(
                            format!("unknown compression type {other}"),
                            at::COMPRESSION_TYPE,
                        ))
                    }
                };
            }
        }
        h.check_backing_file_offset(cluster_size)?;
        h.check_compression_bit()?;
        h.check_features(cluster0, cluster_size, limits)?;
        h.check_fields(cluster_size, limits)?;
        h.read_extensions(cluster0, cluster_size, limits)?;
        h.check_data_file_raw()?;
        h.check_encryption_header()?;
        h.read_backing_file_name(cluster0, cluster_size, limits)?;
        h.backing_file_text = h.backing_file.as_deref().map(lossy);
        h.data_file_text = h.ext.data_file.as_deref().map(lossy);
        Ok(h)
    }

    fn check_header_length(&self, cluster_size: u64) -> Result<()> {
        if self.header_length < V3_MIN_HEADER_LEN {
            return Err(Error::malformed(
                format!("header_length {} shorter than 104", self.header_length),
                at::HEADER_LENGTH,
            ));
        }
        if u64::from(self.header_length) > cluster_size {
            return Err(Error::malformed(
                format!(
                    "header_length {} exceeds the cluster size {cluster_size}",
                    self.header_length
                ),
                at::HEADER_LENGTH,
            ));
        }
        Ok(())
    }

    /// QEMU: "Missing CRYPTO header for crypt method 2" (LUKS keeps its header in the image).
    fn check_encryption_header(&self) -> Result<()> {
        if self.crypt_method == CRYPT_LUKS && self.ext.encryption.is_none() {
            return Err(Error::malformed(
                "crypt_method 2 (LUKS) without the full disk encryption header extension",
                at::CRYPT_METHOD,
            ));
        }
        Ok(())
    }

    /// QEMU: "data-file-raw requires a data file".
    fn check_data_file_raw(&self) -> Result<()> {
        if self.is_data_file_raw() && !self.has_data_file_bit() {
            return Err(Error::malformed(
                "data_file_raw (autoclear bit 1) is set but the image has no external data file",
                at::AUTOCLEAR_FEATURES,
            ));
        }
        Ok(())
    }

    fn check_backing_file_offset(&self, cluster_size: u64) -> Result<()> {
        if self.backing_file_offset > cluster_size {
            return Err(Error::malformed(
                format!(
                    "backing file offset {:#x} is past the first cluster",
                    self.backing_file_offset
                ),
                at::BACKING_FILE_OFFSET,
            ));
        }
        Ok(())
    }

    /// The checks of `qcow2_do_open` on the fixed fields, in its order.
    fn check_fields(&self, cluster_size: u64, limits: &Limits) -> Result<()> {
        if self.refcount_order > MAX_REFCOUNT_ORDER {
            return Err(Error::malformed(
                format!(
                    "refcount_order {} over {MAX_REFCOUNT_ORDER}",
                    self.refcount_order
                ),
                at::REFCOUNT_ORDER,
            ));
        }
        match self.crypt_method {
            // 1 (AES) and 2 (LUKS) open; reads need the secret (src/crypt).
            0 | CRYPT_AES | CRYPT_LUKS => {}
            other => {
                return Err(Error::malformed(
                    format!("unknown crypt_method {other}"),
                    at::CRYPT_METHOD,
                ));
            }
        }
        self.check_refcount_table(cluster_size, limits)?;
        self.check_snapshot_table(limits)?;
        self.check_l1_table(limits)
    }

    fn check_refcount_table(&self, cluster_size: u64, limits: &Limits) -> Result<()> {
        let bytes = u64::from(self.refcount_table_clusters)
            .checked_mul(cluster_size)
            .ok_or_else(|| {
                Error::malformed("refcount table size overflows", at::REFCOUNT_TABLE_CLUSTERS)
            })?;
        Limits::check("refcount table", bytes, limits.max_refcount_table_bytes)?;
        if self.refcount_table_clusters == 0 {
            return Err(Error::malformed(
                "image has no refcount table",
                at::REFCOUNT_TABLE_CLUSTERS,
            ));
        }
        self.check_table_placement(
            "refcount table",
            self.refcount_table_offset,
            bytes,
            at::REFCOUNT_TABLE_OFFSET,
        )
    }

    fn check_snapshot_table(&self, limits: &Limits) -> Result<()> {
        Limits::check_in(
            "snapshots",
            "snapshot count",
            u64::from(self.nb_snapshots),
            limits.max_snapshots,
        )?;
        let bytes = u64::from(self.nb_snapshots)
            .checked_mul(SNAPSHOT_HEADER_LEN)
            .ok_or_else(|| Error::malformed("snapshot table size overflows", at::NB_SNAPSHOTS))?;
        if self.nb_snapshots == 0 {
            // QEMU validates the offset of an empty table too ("Snapshot table offset
            // invalid"); only where it may be (0, past the header) does not matter then.
            return self.check_table_offset(
                "snapshot table",
                self.snapshots_offset,
                0,
                at::SNAPSHOTS_OFFSET,
            );
        }
        self.check_table_placement(
            "snapshot table",
            self.snapshots_offset,
            bytes,
            at::SNAPSHOTS_OFFSET,
        )
    }

    fn check_l1_table(&self, limits: &Limits) -> Result<()> {
        // QEMU's block layer cannot address more than 2^63 bytes; neither do we, so guest
        // offset arithmetic has room for a cluster past the end.
        if self.size > i64::MAX as u64 {
            return Err(Error::malformed(
                format!("virtual size {:#x} is too big", self.size),
                at::SIZE,
            ));
        }
        let bytes = u64::from(self.l1_size).saturating_mul(TABLE_ENTRY_LEN);
        Limits::check("L1 table", bytes, limits.max_l1_bytes)?;
        let needed = self.l1_entries_for(self.size).ok_or_else(|| {
            Error::malformed(
                format!("virtual size {:#x} is too big", self.size),
                at::SIZE,
            )
        })?;
        if needed > i32::MAX as u64 {
            return Err(Error::malformed(
                format!("virtual size {:#x} is too big", self.size),
                at::SIZE,
            ));
        }
        if u64::from(self.l1_size) < needed {
            return Err(Error::malformed(
                format!(
                    "L1 table has {} entries, the virtual size needs {needed}",
                    self.l1_size
                ),
                at::L1_SIZE,
            ));
        }
        if self.l1_size == 0 {
            // As for the snapshot table: "Active L1 table offset invalid" even when empty.
            return self.check_table_offset(
                "L1 table",
                self.l1_table_offset,
                0,
                at::L1_TABLE_OFFSET,
            );
        }
        self.check_table_placement("L1 table", self.l1_table_offset, bytes, at::L1_TABLE_OFFSET)
    }

    /// QEMU's `qcow2_validate_table` ("... offset invalid"), then an offset of 0 refused: the
    /// table would overlap the header.
    fn check_table_placement(
        &self,
        what: &str,
        offset: u64,
        len: u64,
        field_at: u64,
    ) -> Result<()> {
        self.check_table_offset(what, offset, len, field_at)?;
        if offset == 0 {
            return Err(Error::malformed(
                format!("{what} overlaps the header"),
                field_at,
            ));
        }
        Ok(())
    }

    /// QEMU's `qcow2_validate_table` on a table's offset, checked whatever the table's size:
    /// cluster aligned, and its end at most `i64::MAX`.
    fn check_table_offset(&self, what: &str, offset: u64, len: u64, field_at: u64) -> Result<()> {
        if low_bits(offset, self.cluster_bits) != 0 {
            return Err(Error::malformed(
                format!("{what} offset invalid: {offset:#x} is not cluster aligned"),
                field_at,
            ));
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > i64::MAX as u64)
        {
            return Err(Error::malformed(
                format!("{what} offset invalid: {offset:#x} + {len:#x} is past 2^63"),
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
                at::INCOMPATIBLE_FEATURES,
            )),
            (CompressionType::Zstd, false) => Err(Error::malformed(
                "compression type is zstd but the incompatible bit is not set",
                at::INCOMPATIBLE_FEATURES,
            )),
            _ => Ok(()),
        }
    }

    /// Refuse incompatible bits we cannot read, every one named from the image's own table
    /// (read best effort, as QEMU reads it for this message), then the corrupt bit.
    fn check_features(&self, cluster0: &[u8], cluster_size: u64, limits: &Limits) -> Result<()> {
        let unknown = self.incompatible_features & !feature::INCOMPAT_KNOWN;
        if unknown != 0 {
            let names = self
                .extensions_best_effort(cluster0, cluster_size, limits)
                .feature_names;
            let kind = FeatureKind::Incompatible;
            let all: Vec<FeatureName> = (0..64u8)
                .filter(|&bit| unknown & (1u64 << bit) != 0)
                .map(|bit| FeatureName {
                    kind,
                    bit,
                    name: feature::name_of(kind, bit, &names).unwrap_or_else(|| "unknown".into()),
                })
                .collect();
            let (bit, name) = all
                .first()
                .map(|f| (f.bit, f.name.clone()))
                .unwrap_or_default();
            return Err(Error::UnsupportedFeature {
                kind,
                bit,
                name,
                all,
            });
        }
        if self.incompatible_features & feature::INCOMPAT_CORRUPT != 0 {
            return Err(Error::Corrupt);
        }
        if self.has_extended_l2() && self.cluster_bits < MIN_CLUSTER_BITS + 5 {
            return Err(Error::malformed(
                format!(
                    "extended L2 entries need clusters of at least 16 KiB, not {}",
                    self.cluster_size()
                ),
                at::CLUSTER_BITS,
            ));
        }
        // The data-file bit without a name is allowed: QEMU then takes the file from its
        // options, and `Qcow2::reader` requires the caller to attach one.
        Ok(())
    }

    /// The extensions as far as they parse (up to the first that fails QEMU's checks), for
    /// naming unknown feature bits as QEMU names them.
    fn extensions_best_effort(
        &self,
        cluster0: &[u8],
        cluster_size: u64,
        limits: &Limits,
    ) -> Extensions {
        let (start, end, ctx) = self.extension_area(cluster_size, limits);
        extension::parse_until_error(cluster0, start, end, &ctx)
    }

    /// Where the extensions are (from the end of the header to the backing file name or the
    /// end of the first cluster), and what their checks need.
    fn extension_area<'l>(
        &self,
        cluster_size: u64,
        limits: &'l Limits,
    ) -> (u64, u64, extension::Context<'l>) {
        let end = if self.backing_file_offset != 0 {
            self.backing_file_offset
        } else {
            cluster_size
        };
        let ctx = extension::Context {
            cluster_bits: self.cluster_bits,
            autoclear_features: self.autoclear_features,
            crypt_method: self.crypt_method,
            luks: self.crypt_method == CRYPT_LUKS,
            limits,
        };
        (u64::from(self.header_length), end, ctx)
    }

    /// The extensions, from the end of the header (byte 72 for version 2, `header_length` for
    /// version 3) to the backing-file name or the end of the cluster, as QEMU reads them.
    fn read_extensions(
        &mut self,
        cluster0: &[u8],
        cluster_size: u64,
        limits: &Limits,
    ) -> Result<()> {
        let (start, end, ctx) = self.extension_area(cluster_size, limits);
        self.ext = extension::parse_all(cluster0, start, end, &ctx)?;
        Ok(())
    }

    /// The backing file name: at most 1023 bytes inside the first cluster, and to QEMU a C
    /// string, so it ends at its first NUL; an empty name means no backing file.
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
                at::BACKING_FILE_SIZE,
            ));
        }
        Limits::check("backing file name", len, limits.max_backing_name_bytes)?;
        let name = usize::try_from(self.backing_file_offset)
            .ok()
            .and_then(|offset| field(cluster0, offset, len as usize))
            .ok_or_else(|| {
                Error::malformed(
                    "backing file name runs past the end of the file",
                    self.backing_file_offset,
                )
            })?;
        let name = until_nul(name);
        if !name.is_empty() {
            self.backing_file = Some(name.to_vec());
        }
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
        &self.ext.list
    }
    /// The feature-name table, empty when the image has none.
    pub fn feature_names(&self) -> &[FeatureName] {
        &self.ext.feature_names
    }
    /// Every feature bit that is set, of the three kinds, with its name.
    pub fn features(&self) -> Vec<Feature> {
        let mut all = feature::features_set(
            FeatureKind::Incompatible,
            self.incompatible_features,
            &self.ext.feature_names,
        );
        all.extend(feature::features_set(
            FeatureKind::Compatible,
            self.compatible_features,
            &self.ext.feature_names,
        ));
        all.extend(feature::features_set(
            FeatureKind::Autoclear,
            self.autoclear_features,
            &self.ext.feature_names,
        ));
        all
    }
    /// The backing file name as text (lossy where the stored bytes are not UTF-8). Like QEMU,
    /// the name ends at its first NUL, and an empty name means no backing file.
    pub fn backing_file(&self) -> Option<&str> {
        self.backing_file_text.as_deref()
    }
    /// The backing file name's bytes, exactly as stored (up to the first NUL).
    pub fn backing_file_bytes(&self) -> Option<&[u8]> {
        self.backing_file.as_deref()
    }
    /// The backing file name as a path, from its bytes (so names that are not UTF-8 still
    /// find their file on Unix).
    pub fn backing_file_path(&self) -> Option<&Path> {
        self.backing_file.as_deref().map(bytes_path)
    }
    /// The backing file format from the backing-format extension (`qcow2`, `raw`, ...), up to
    /// its first NUL; `None` when absent or empty (the backing file is then probed).
    pub fn backing_format(&self) -> Option<&str> {
        self.ext.backing_format.as_deref()
    }
    /// The external data file name recorded in its extension, as text, whether or not the
    /// image uses it (`qemu-img info` reports it either way). Only
    /// [`Header::external_data_file`] is ever opened.
    pub fn data_file(&self) -> Option<&str> {
        self.data_file_text.as_deref()
    }
    /// The external data file that holds the guest data: the recorded name, as a path, when
    /// incompatible bit 2 says the image has one. Without the bit QEMU ignores the name and
    /// reads the data from the image itself, and so does this crate.
    pub fn external_data_file(&self) -> Option<&Path> {
        if !self.has_data_file_bit() {
            return None;
        }
        self.ext.data_file.as_deref().map(bytes_path)
    }
    /// The bitmaps extension, when present and valid (the autoclear bit set).
    pub fn bitmaps(&self) -> Option<&BitmapsExtension> {
        self.ext.bitmaps.as_ref()
    }
    /// The encryption header pointer, when present.
    pub fn encryption(&self) -> Option<&EncryptionExtension> {
        self.ext.encryption.as_ref()
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

/// A name stored as bytes, as a path: byte for byte on Unix, lossily elsewhere.
#[cfg(unix)]
fn bytes_path(bytes: &[u8]) -> &Path {
    use std::os::unix::ffi::OsStrExt;
    Path::new(std::ffi::OsStr::from_bytes(bytes))
}

/// A name stored as bytes, as a path: byte for byte on Unix, lossily elsewhere.
#[cfg(not(unix))]
fn bytes_path(bytes: &[u8]) -> &Path {
    Path::new(std::str::from_utf8(bytes).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::extension::{
        ExtensionKind, EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_FEATURE_NAMES,
    };

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
        assert!(matches!(
            parse(&[0x51, 0x46]),
            Err(Error::TooShort { len: 2 })
        ));
        // The magic and a version, but not the whole header.
        let b = valid_v3();
        assert!(matches!(
            parse(&b[..100]),
            Err(Error::TooShort { len: 100 })
        ));
        let mut b = valid_v3();
        set_u32(&mut b, 4, 2);
        assert!(matches!(parse(&b[..71]), Err(Error::TooShort { len: 71 })));
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
    use crate::format::feature::INCOMPAT_EXTL2;

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
}
