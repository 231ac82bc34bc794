//! Feature bits (header bytes 72-95) and the feature-name table extension.

use crate::base::bytes::{field, lossy};

/// Incompatible bit 0: the image was not closed cleanly; refcounts may be stale (reads are fine).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible bit 1: QEMU found the metadata inconsistent.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible bit 3: the compression type field (byte 104) is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible bit 4: L2 entries are 128 bits with 32 subclusters each.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Incompatible bits QEMU knows (`QCOW2_INCOMPAT_MASK`): any other is refused, by name.
pub(crate) const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Compatible bit 0: refcount updates may be deferred.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Autoclear bit 0: the bitmaps extension is consistent with the image.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit 1: the external data file is a valid raw image by itself.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Which kind of feature bit a [`Error::UnsupportedFeature`](crate::Error::UnsupportedFeature) names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FeatureKind {
    /// Incompatible features (header bytes 72-79): a reader that does not know one must refuse.
    Incompatible,
    /// Compatible features (header bytes 80-87): safe to ignore.
    Compatible,
    /// Autoclear features (header bytes 88-95): cleared by writers that do not know them.
    Autoclear,
}

impl std::fmt::Display for FeatureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FeatureKind::Incompatible => "incompatible",
            FeatureKind::Compatible => "compatible",
            FeatureKind::Autoclear => "autoclear",
        })
    }
}

/// One entry of the feature-name table: 48 bytes (spec: type u8, bit u8, name 46 bytes).
const FEATURE_ENTRY_LEN: usize = 48;
const FEATURE_NAME_LEN: usize = 46;

/// A named feature bit, from the image's feature-name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// Which feature field the bit is in.
    pub kind: FeatureKind,
    /// The bit number, 0-63.
    pub bit: u8,
    /// The name, NUL padding removed.
    pub name: String,
}

/// A feature bit set in the header, with its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feature {
    /// Which feature field the bit is in.
    pub kind: FeatureKind,
    /// The bit number, 0-63.
    pub bit: u8,
    /// The image's own name for it, else the spec's, else `None`.
    pub name: Option<String>,
}

/// Parse the feature-name table extension. Entries with an unknown type are skipped, as
/// QEMU skips them; a trailing partial entry is ignored.
pub(crate) fn parse_feature_names(data: &[u8]) -> Vec<FeatureName> {
    data.chunks_exact(FEATURE_ENTRY_LEN)
        .filter_map(|entry| {
            let kind = match entry.first()? {
                0 => FeatureKind::Incompatible,
                1 => FeatureKind::Compatible,
                2 => FeatureKind::Autoclear,
                _ => return None,
            };
            let bit = *entry.get(1)?;
            let raw = field(entry, 2, FEATURE_NAME_LEN)?;
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            Some(FeatureName {
                kind,
                bit,
                name: lossy(raw.get(..end)?),
            })
        })
        .collect()
}

/// The spec's name for a bit, for images without a feature-name table.
pub(crate) fn spec_name(kind: FeatureKind, bit: u8) -> Option<&'static str> {
    Some(match (kind, bit) {
        (FeatureKind::Incompatible, 0) => "dirty bit",
        (FeatureKind::Incompatible, 1) => "corrupt bit",
        (FeatureKind::Incompatible, 2) => "external data file",
        (FeatureKind::Incompatible, 3) => "compression type",
        (FeatureKind::Incompatible, 4) => "extended L2 entries",
        (FeatureKind::Compatible, 0) => "lazy refcounts",
        (FeatureKind::Autoclear, 0) => "bitmaps",
        (FeatureKind::Autoclear, 1) => "raw external data",
        _ => return None,
    })
}

/// Every bit set in `bits`, named from `table` or the spec.
pub(crate) fn features_set(kind: FeatureKind, bits: u64, table: &[FeatureName]) -> Vec<Feature> {
    (0u8..64)
        .filter(|&bit| bits & (1u64 << bit) != 0)
        .map(|bit| Feature {
            kind,
            bit,
            name: name_of(kind, bit, table),
        })
        .collect()
}

/// The name of a bit: the image's table first, since it describes what the writer meant.
pub(crate) fn name_of(kind: FeatureKind, bit: u8, table: &[FeatureName]) -> Option<String> {
    table
        .iter()
        .find(|f| f.kind == kind && f.bit == bit)
        .map(|f| f.name.clone())
        .or_else(|| spec_name(kind, bit).map(str::to_owned))
}

/// The feature-name table QEMU writes into every new version 3 image with clusters over
/// 4 KiB, in its order: each known bit with the spec's name.
const QEMU_FEATURE_TABLE: [(FeatureKind, u8); 8] = [
    (FeatureKind::Incompatible, 0),
    (FeatureKind::Incompatible, 1),
    (FeatureKind::Incompatible, 2),
    (FeatureKind::Incompatible, 3),
    (FeatureKind::Incompatible, 4),
    (FeatureKind::Compatible, 0),
    (FeatureKind::Autoclear, 0),
    (FeatureKind::Autoclear, 1),
];

/// Encode the feature-name table extension's data (48 bytes per entry) as QEMU writes it.
pub(crate) fn encode_feature_table() -> Vec<u8> {
    let mut data = Vec::with_capacity(QEMU_FEATURE_TABLE.len().saturating_mul(FEATURE_ENTRY_LEN));
    for (kind, bit) in QEMU_FEATURE_TABLE {
        let kind_byte = match kind {
            FeatureKind::Incompatible => 0u8,
            FeatureKind::Compatible => 1,
            FeatureKind::Autoclear => 2,
        };
        let mut entry = vec![kind_byte, bit];
        entry.extend_from_slice(spec_name(kind, bit).unwrap_or_default().as_bytes());
        entry.resize(FEATURE_ENTRY_LEN, 0);
        data.extend_from_slice(&entry);
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: u8, bit: u8, name: &str) -> Vec<u8> {
        let mut e = vec![kind, bit];
        e.extend_from_slice(name.as_bytes());
        e.resize(FEATURE_ENTRY_LEN, 0);
        e
    }

    #[test]
    fn parses_entries_and_skips_unknown_types() {
        let mut data = entry(0, 7, "shiny new thing");
        data.extend(entry(9, 1, "bogus type"));
        data.extend(entry(2, 1, "raw external data"));
        data.extend([0u8; 10]); // trailing partial entry
        let names = parse_feature_names(&data);
        assert_eq!(names.len(), 2);
        assert_eq!(names[0].kind, FeatureKind::Incompatible);
        assert_eq!(names[0].bit, 7);
        assert_eq!(names[0].name, "shiny new thing");
        assert_eq!(names[1].kind, FeatureKind::Autoclear);
    }

    #[test]
    fn table_name_wins_over_spec_name() {
        let table = parse_feature_names(&entry(0, 0, "my dirty"));
        assert_eq!(
            name_of(FeatureKind::Incompatible, 0, &table).as_deref(),
            Some("my dirty")
        );
        assert_eq!(
            name_of(FeatureKind::Incompatible, 1, &table).as_deref(),
            Some("corrupt bit")
        );
        assert_eq!(name_of(FeatureKind::Incompatible, 40, &table), None);
        let set = features_set(FeatureKind::Compatible, 0b1, &table);
        assert_eq!(set[0].name.as_deref(), Some("lazy refcounts"));
    }

    #[test]
    fn encoded_table_parses_back_in_qemu_order() {
        let data = encode_feature_table();
        assert_eq!(data.len(), 8 * FEATURE_ENTRY_LEN);
        let names = parse_feature_names(&data);
        assert_eq!(names.len(), 8);
        assert_eq!(names[4].name, "extended L2 entries");
        assert_eq!(names[5].kind, FeatureKind::Compatible);
        assert_eq!(names[7].name, "raw external data");
    }
}
