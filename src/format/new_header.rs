//! Encoding the first cluster of a new image: the header fields, the extensions in the order
//! QEMU's `qcow2_update_header` writes them, and the backing file name after the end marker.
//!
//! Pure: [`NewHeader::encode`] returns the cluster's bytes; [`Header::parse`] reads them back.
//!
//! [`Header::parse`]: crate::format::header::Header::parse

use crate::error::{Error, Result};
use crate::format::extension::{self, EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_ENCRYPTION};
use crate::format::feature;
use crate::format::header::{at, CompressionType, MAGIC, V2_HEADER_LEN};

/// QEMU's `sizeof(QCowHeader)`: the version 3 fields, the compression type byte and 7 bytes
/// of padding. New version 3 images carry it as `header_length`.
pub(crate) const NEW_V3_HEADER_LEN: u32 = 112;
/// QEMU omits the feature-name table at and below this cluster size (it would crowd out the
/// backing file name in a 512-byte cluster).
const FEATURE_TABLE_MIN_CLUSTER: u64 = 4096;
/// QEMU refuses longer backing file names (`qcow2_change_backing_file`).
pub(crate) const MAX_BACKING_FILE_LEN: usize = 1023;

/// The fields of a new image's header, before encoding.
#[derive(Debug, Clone, Default)]
pub(crate) struct NewHeader<'a> {
    pub(crate) version: u32,
    pub(crate) cluster_bits: u32,
    pub(crate) size: u64,
    pub(crate) crypt_method: u32,
    pub(crate) l1_size: u32,
    pub(crate) l1_table_offset: u64,
    pub(crate) refcount_table_offset: u64,
    pub(crate) refcount_table_clusters: u32,
    pub(crate) incompatible_features: u64,
    pub(crate) compatible_features: u64,
    pub(crate) autoclear_features: u64,
    pub(crate) refcount_order: u32,
    pub(crate) compression_type: Option<CompressionType>,
    pub(crate) backing_file: Option<&'a str>,
    pub(crate) backing_format: Option<&'a str>,
    pub(crate) data_file: Option<&'a str>,
    /// The LUKS area: offset and length (the full disk encryption header extension).
    pub(crate) encryption: Option<(u64, u64)>,
}

/// Copy `bytes` into `buf` at `at` (nothing when they do not fit).
pub(crate) fn put(buf: &mut [u8], at: u64, bytes: &[u8]) {
    let start = usize::try_from(at).unwrap_or(usize::MAX);
    if let Some(dst) = start
        .checked_add(bytes.len())
        .and_then(|end| buf.get_mut(start..end))
    {
        dst.copy_from_slice(bytes);
    }
}

fn no_space(what: &str) -> Error {
    Error::InvalidOption {
        option: what.to_owned(),
        message: format!("the {what} does not fit in the first cluster: No space left on device"),
    }
}

impl NewHeader<'_> {
    fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits.min(63)
    }

    /// The first cluster of the image, `cluster_size` bytes.
    pub(crate) fn encode(&self) -> Result<Vec<u8>> {
        let cluster_size = usize::try_from(self.cluster_size())
            .map_err(|_| Error::Internal("cluster size does not fit in memory"))?;
        let mut buf = vec![0u8; cluster_size];
        self.put_fields(&mut buf);
        let fixed_len = if self.version >= 3 {
            NEW_V3_HEADER_LEN
        } else {
            V2_HEADER_LEN
        };
        let mut tail = Vec::new();
        for ext in self.extensions()? {
            tail.extend_from_slice(&ext);
        }
        tail.extend_from_slice(&extension::encode_end());
        let backing_at = u64::from(fixed_len)
            .checked_add(tail.len() as u64)
            .ok_or_else(|| no_space("header extensions"))?;
        if backing_at > self.cluster_size() {
            return Err(no_space("header extensions"));
        }
        put(&mut buf, u64::from(fixed_len), &tail);
        if let Some(name) = self.backing_file {
            let end = backing_at.saturating_add(name.len() as u64);
            if end > self.cluster_size() {
                return Err(no_space("backing file name"));
            }
            put(&mut buf, backing_at, name.as_bytes());
            put(&mut buf, at::BACKING_FILE_OFFSET, &backing_at.to_be_bytes());
            let len = u32::try_from(name.len()).map_err(|_| no_space("backing file name"))?;
            put(&mut buf, at::BACKING_FILE_SIZE, &len.to_be_bytes());
        }
        Ok(buf)
    }

    fn put_fields(&self, buf: &mut [u8]) {
        put(buf, at::MAGIC, &MAGIC.to_be_bytes());
        put(buf, at::VERSION, &self.version.to_be_bytes());
        put(buf, at::CLUSTER_BITS, &self.cluster_bits.to_be_bytes());
        put(buf, at::SIZE, &self.size.to_be_bytes());
        put(buf, at::CRYPT_METHOD, &self.crypt_method.to_be_bytes());
        put(buf, at::L1_SIZE, &self.l1_size.to_be_bytes());
        put(
            buf,
            at::L1_TABLE_OFFSET,
            &self.l1_table_offset.to_be_bytes(),
        );
        put(
            buf,
            at::REFCOUNT_TABLE_OFFSET,
            &self.refcount_table_offset.to_be_bytes(),
        );
        put(
            buf,
            at::REFCOUNT_TABLE_CLUSTERS,
            &self.refcount_table_clusters.to_be_bytes(),
        );
        if self.version < 3 {
            return;
        }
        put(
            buf,
            at::INCOMPATIBLE_FEATURES,
            &self.incompatible_features.to_be_bytes(),
        );
        put(
            buf,
            at::COMPATIBLE_FEATURES,
            &self.compatible_features.to_be_bytes(),
        );
        put(
            buf,
            at::AUTOCLEAR_FEATURES,
            &self.autoclear_features.to_be_bytes(),
        );
        put(buf, at::REFCOUNT_ORDER, &self.refcount_order.to_be_bytes());
        put(buf, at::HEADER_LENGTH, &NEW_V3_HEADER_LEN.to_be_bytes());
        let compression = match self.compression_type {
            Some(CompressionType::Zstd) => 1u8,
            _ => 0,
        };
        put(buf, at::COMPRESSION_TYPE, &[compression]);
    }

    /// The extensions in `qcow2_update_header`'s order: backing format, data file,
    /// encryption, feature names.
    fn extensions(&self) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        let too_long = || no_space("header extensions");
        if let Some(format) = self.backing_format {
            out.push(
                extension::encode(EXT_BACKING_FORMAT, format.as_bytes()).ok_or_else(too_long)?,
            );
        }
        if let Some(name) = self.data_file {
            out.push(extension::encode(EXT_DATA_FILE, name.as_bytes()).ok_or_else(too_long)?);
        }
        if let Some((offset, length)) = self.encryption {
            let mut data = offset.to_be_bytes().to_vec();
            data.extend_from_slice(&length.to_be_bytes());
            out.push(extension::encode(EXT_ENCRYPTION, &data).ok_or_else(too_long)?);
        }
        if self.version >= 3 && self.cluster_size() > FEATURE_TABLE_MIN_CLUSTER {
            let table = feature::encode_feature_table();
            out.push(extension::encode(extension::EXT_FEATURE_NAMES, &table).ok_or_else(too_long)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::limits::Limits;
    use crate::format::header::Header;

    fn simple() -> NewHeader<'static> {
        NewHeader {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            refcount_order: 4,
            ..NewHeader::default()
        }
    }

    #[test]
    fn encoded_header_parses_back() {
        let mut h = simple();
        h.backing_file = Some("base.qcow2");
        h.backing_format = Some("qcow2");
        h.compression_type = Some(CompressionType::Zstd);
        h.incompatible_features = feature::INCOMPAT_COMPRESSION;
        let bytes = h.encode().unwrap();
        assert_eq!(bytes.len(), 65536);
        let parsed = Header::parse(&bytes, &Limits::default()).unwrap();
        assert_eq!(parsed.size(), 1 << 30);
        assert_eq!(parsed.header_length(), 112);
        assert_eq!(parsed.backing_file(), Some("base.qcow2"));
        assert_eq!(parsed.backing_format(), Some("qcow2"));
        assert_eq!(parsed.compression_type(), CompressionType::Zstd);
        assert_eq!(parsed.feature_names().len(), 8);
        // QEMU's order: backing format first, then the feature table, then the name.
        assert_eq!(&bytes[112..116], &EXT_BACKING_FORMAT.to_be_bytes());
        assert_eq!(parsed.backing_file_bytes().map(<[u8]>::len), Some(10));
    }

    #[test]
    fn small_clusters_have_no_feature_table_and_v2_no_v3_fields() {
        let mut h = simple();
        h.cluster_bits = 12;
        h.l1_size = 512;
        h.l1_table_offset = 0x3000;
        h.refcount_table_offset = 0x1000;
        let parsed = Header::parse(&h.encode().unwrap(), &Limits::default()).unwrap();
        assert!(parsed.feature_names().is_empty());
        let mut v2 = simple();
        v2.version = 2;
        v2.backing_file = Some("b");
        let bytes = v2.encode().unwrap();
        // End marker right after the 72-byte header, the name after it.
        assert_eq!(&bytes[72..80], &[0u8; 8]);
        assert_eq!(bytes[80], b'b');
        let parsed = Header::parse(&bytes, &Limits::default()).unwrap();
        assert_eq!(parsed.version(), 2);
        assert_eq!(parsed.backing_file(), Some("b"));
    }

    #[test]
    fn a_name_that_does_not_fit_is_refused() {
        let mut h = simple();
        h.cluster_bits = 9;
        let long = "x".repeat(600);
        h.backing_file = Some(&long);
        assert!(matches!(h.encode(), Err(Error::InvalidOption { .. })));
    }
}
