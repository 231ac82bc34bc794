//! New empty images, as `qemu-img create -f qcow2 -o ...` makes them.
//!
//! [`CreateOptions`] holds every option qemu-img takes (by builder or by its `-o` names),
//! [`create`] checks them as QEMU does, before any file is written, then lays the image out as
//! QEMU's `qcow2_co_create` does (header, refcount table, first refcount block, L1 table,
//! preallocated L2 tables and data, the LUKS area) and writes the header last, so an error
//! leaves no file behind that looks like a finished image.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::base::limits::Limits;
use crate::crypt::{LuksOptions, Secret};
use crate::error::{Error, Result};
use crate::format::feature::{
    AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_DATA_FILE,
    INCOMPAT_EXTL2,
};
use crate::format::header::{
    CompressionType, Header, CRYPT_AES, CRYPT_LUKS, MAGIC, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS,
};
use crate::format::new_header::{NewHeader, MAX_BACKING_FILE_LEN};

/// QEMU's largest L1 table (`QCOW_MAX_L1_SIZE`, 32 MiB).
const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's largest refcount table (`QCOW_MAX_REFTABLE_SIZE`, 8 MiB).
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// L1 and L2 entry flag: the cluster's refcount is exactly one.
const OFLAG_COPIED: u64 = 1 << 63;
/// Subclusters per cluster with extended L2 entries.
const SUBCLUSTERS: u64 = 32;
/// Zeros are written (preallocation=full) in pieces of this size.
const ZERO_CHUNK: u64 = 1 << 20;
/// What `qemu-img` rounds every size up to.
const SECTOR: u64 = 512;

/// The compatibility level of a new image (`-o compat=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Compat {
    /// `compat=0.10` (also `v2`): a version 2 image.
    V2,
    /// `compat=1.1` (also `v3`, the default): a version 3 image.
    V3,
}

/// What space a new image takes up front (`-o preallocation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Preallocation {
    /// Only the header, refcount structures and the L1 table (the default).
    #[default]
    Off,
    /// Also every L2 table, with every guest cluster mapped to a host cluster, which is left
    /// unwritten (the file is sparse).
    Metadata,
    /// As `Metadata`, the data clusters placed together and reserved on disk with
    /// `fallocate`, as QEMU reserves them (zeros written where the file system cannot
    /// reserve, as `posix_fallocate` does).
    Falloc,
    /// As `Falloc`, with zeros written into every data cluster.
    Full,
}

impl Preallocation {
    /// The name `qemu-img` uses.
    pub fn name(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

/// How a new image is encrypted (`-o encrypt.format=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EncryptFormat {
    /// LUKS (`crypt_method` 2): a LUKS header in the image, data encrypted with AES-XTS.
    Luks,
    /// The legacy AES-CBC scheme (`crypt_method` 1; `encrypt.format=aes` or `encryption=on`),
    /// which QEMU still creates but refuses to run guests on.
    Aes,
}

/// Every option of `qemu-img create -f qcow2 -o ...`, with QEMU's defaults.
///
/// Build it with the methods (each takes and returns the options), or with qemu-img's
/// option names and value syntax through [`CreateOptions::set`] and
/// [`CreateOptions::set_all`]; then call [`create`].
///
/// ```
/// use qcow2::{CompressionType, CreateOptions};
/// let dir = std::env::temp_dir().join(format!("qcow2-doc-create-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let path = dir.join("new.qcow2");
///
/// let mut options = CreateOptions::new(1 << 30).compression_type(CompressionType::Zstd);
/// options.set_all("cluster_size=4k,lazy_refcounts=on")?;
/// qcow2::create(&path, &options)?;
///
/// let image = qcow2::Qcow2::open_path(&path)?;
/// assert_eq!(image.header().size(), 1 << 30);
/// assert_eq!(image.header().cluster_size(), 4096);
/// assert!(image.header().has_lazy_refcounts());
/// assert_eq!(image.header().compression_type(), CompressionType::Zstd);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct CreateOptions {
    size: Option<u64>,
    compat: Option<Compat>,
    cluster_size: u64,
    compression_type: Option<CompressionType>,
    extended_l2: bool,
    refcount_bits: u64,
    lazy_refcounts: bool,
    preallocation: Option<Preallocation>,
    backing_file: Option<String>,
    backing_fmt: Option<String>,
    data_file: Option<String>,
    data_file_raw: bool,
    encrypt_format: Option<EncryptFormat>,
    secret: Option<Secret>,
    /// `encrypt.*` options other than `format` and `key-secret`, in the order given.
    encrypt_options: Vec<(String, String)>,
    unsafe_backing: bool,
    /// The first value an enumerated option does not take: qemu-img refuses it when it
    /// creates the image, after its "Formatting" line, and so does [`create`].
    deferred: Option<(String, String)>,
    /// What `qemu-img` prints in its "Formatting" line, by option name.
    shown: BTreeMap<&'static str, String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: None,
            compat: None,
            cluster_size: 65536,
            compression_type: None,
            extended_l2: false,
            refcount_bits: 16,
            lazy_refcounts: false,
            preallocation: None,
            backing_file: None,
            backing_fmt: None,
            data_file: None,
            data_file_raw: false,
            encrypt_format: None,
            secret: None,
            encrypt_options: Vec::new(),
            unsafe_backing: false,
            deferred: None,
            shown: BTreeMap::new(),
        }
    }
}

/// The options `qemu-img create -f qcow2 -o help` lists, in its order, with its text.
const HELP: &[(&str, &str, &str)] = &[
    ("backing_file", "str", "File name of a base image"),
    ("backing_fmt", "str", "Image format of the base image"),
    ("cluster_size", "size", "qcow2 cluster size"),
    (
        "compat",
        "str",
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    (
        "compression_type",
        "str",
        "Compression method used for image cluster compression",
    ),
    ("data_file", "str", "File name of an external data file"),
    (
        "data_file_raw",
        "bool (on/off)",
        "The external data file must stay valid as a raw image",
    ),
    (
        "encrypt.cipher-alg",
        "str",
        "Name of encryption cipher algorithm",
    ),
    (
        "encrypt.cipher-mode",
        "str",
        "Name of encryption cipher mode",
    ),
    (
        "encrypt.format",
        "str",
        "Encrypt the image, format choices: 'aes', 'luks'",
    ),
    (
        "encrypt.hash-alg",
        "str",
        "Name of encryption hash algorithm",
    ),
    (
        "encrypt.iter-time",
        "num",
        "Time to spend in PBKDF in milliseconds",
    ),
    ("encrypt.ivgen-alg", "str", "Name of IV generator algorithm"),
    (
        "encrypt.ivgen-hash-alg",
        "str",
        "Name of IV generator hash algorithm",
    ),
    (
        "encrypt.key-secret",
        "str",
        "ID of secret providing qcow AES key or LUKS passphrase",
    ),
    (
        "encryption",
        "bool (on/off)",
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    ),
    ("extended_l2", "bool (on/off)", "Extended L2 tables"),
    (
        "lazy_refcounts",
        "bool (on/off)",
        "Postpone refcount updates",
    ),
    (
        "preallocation",
        "str",
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    (
        "refcount_bits",
        "num",
        "Width of a reference count entry in bits",
    ),
    ("size", "size", "Virtual disk size"),
];

/// The order of `qemu-img create`'s "Formatting" line (the qcow2 options, then the file's);
/// `true` where the option shows its default when not given.
const SHOWN_ORDER: &[(&str, Option<&str>)] = &[
    ("encryption", None),
    ("encrypt.format", None),
    ("encrypt.key-secret", None),
    ("encrypt.cipher-alg", None),
    ("encrypt.cipher-mode", None),
    ("encrypt.ivgen-alg", None),
    ("encrypt.ivgen-hash-alg", None),
    ("encrypt.hash-alg", None),
    ("encrypt.iter-time", None),
    ("cluster_size", Some("65536")),
    ("extended_l2", Some("off")),
    ("preallocation", None),
    ("compression_type", Some("zlib")),
    ("size", None),
    ("compat", None),
    ("backing_file", None),
    ("backing_fmt", None),
    ("data_file", None),
    ("data_file_raw", None),
    ("lazy_refcounts", Some("off")),
    ("refcount_bits", Some("16")),
    ("nocow", None),
    ("extent_size_hint", None),
];

fn invalid(option: &str, message: impl Into<String>) -> Error {
    Error::InvalidOption {
        option: option.to_owned(),
        message: message.into(),
    }
}

fn on_off(value: bool) -> String {
    if value { "on" } else { "off" }.to_owned()
}

/// `on`/`off` (and QEMU's other spellings) as `qemu_opt_set` reads a boolean.
pub(crate) fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(invalid(
            key,
            format!("Parameter '{key}' expects 'on' or 'off'"),
        )),
    }
}

/// A number as `qemu_strtou64` reads one: decimal, `0x` hexadecimal or `0` octal.
pub(crate) fn parse_number(key: &str, value: &str) -> Result<u64> {
    let bad = || invalid(key, format!("Parameter '{key}' expects a number"));
    let text = value.trim_start();
    let parsed = if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16)
    } else if text.len() > 1 && text.starts_with('0') {
        u64::from_str_radix(text.get(1..).unwrap_or_default(), 8)
    } else {
        text.parse::<u64>()
    };
    parsed.map_err(|_| bad())
}

/// A size as `qemu_strtosz` reads one: a decimal number with an optional fraction and an
/// optional suffix `b`, `k`, `M`, `G`, `T`, `P` or `E` (either case, powers of 1024), or a
/// `0x` hexadecimal number; `None` when it is not one or does not fit in 64 bits.
pub(crate) fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim_start();
    let text = text.strip_prefix('+').unwrap_or(text);
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).ok();
    }
    let number_len = text
        .bytes()
        .take_while(|c| c.is_ascii_digit() || *c == b'.')
        .count();
    let (number, suffix) = text.split_at_checked(number_len)?;
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return None,
    };
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) if shift > 0 && !f.contains('.') => (w, f),
        Some(_) => return None,
        None => (number, ""),
    };
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let unit = 1u64 << shift;
    let mut bytes = whole.checked_mul(unit)?;
    if !fraction.is_empty() {
        let digits = fraction.get(..fraction.len().min(18))?;
        let numerator: u128 = digits.parse().ok()?;
        let denominator = 10u128.checked_pow(u32::try_from(digits.len()).ok()?)?;
        let part = numerator
            .checked_mul(u128::from(unit))?
            .checked_add(denominator / 2)?
            .checked_div(denominator)?;
        bytes = bytes.checked_add(u64::try_from(part).ok()?)?;
    }
    Some(bytes)
}

pub(crate) fn size_option(key: &str, value: &str) -> Result<u64> {
    parse_size(value).ok_or_else(|| {
        invalid(
            key,
            format!(
                "Parameter '{key}' expects a non-negative number below 2^64\n\
                 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                 and exabytes, respectively."
            ),
        )
    })
}

fn enum_error(qapi_name: &str, option: &str, value: &str) -> Error {
    invalid(
        option,
        format!("Parameter '{qapi_name}' does not accept value '{value}'"),
    )
}

/// The name `SHOWN_ORDER` uses for `key`, if qemu-img knows it.
fn shown_key(key: &str) -> Option<&'static str> {
    SHOWN_ORDER
        .iter()
        .map(|(name, _)| *name)
        .find(|name| *name == key)
}

impl CreateOptions {
    /// QEMU's defaults and a virtual size of `size` bytes (rounded up to 512, as qemu-img
    /// does).
    #[must_use]
    pub fn new(size: u64) -> Self {
        CreateOptions::default().size(size)
    }

    /// Keep a bad value of an enumerated option (shown as given) for [`create`] to refuse.
    fn defer(&mut self, key: &str, value: &str, error: Error) -> Result<()> {
        if let Some(name) = shown_key(key) {
            self.shown.insert(name, value.to_owned());
        }
        if let (None, Error::InvalidOption { option, message }) = (&self.deferred, error) {
            self.deferred = Some((option, message));
        }
        Ok(())
    }

    fn show(mut self, key: &'static str, value: String) -> Self {
        self.shown.insert(key, value);
        self
    }

    /// The virtual size in bytes (`size`); without it, the backing file's size.
    #[must_use]
    pub fn size(mut self, size: u64) -> Self {
        self.size = Some(size);
        self.show("size", size.to_string())
    }

    /// The compatibility level (`compat`).
    #[must_use]
    pub fn compat(mut self, compat: Compat) -> Self {
        self.compat = Some(compat);
        let name = match compat {
            Compat::V2 => "0.10",
            Compat::V3 => "1.1",
        };
        self.show("compat", name.to_owned())
    }

    /// The cluster size in bytes (`cluster_size`): a power of two from 512 to 2 MiB.
    #[must_use]
    pub fn cluster_size(mut self, bytes: u64) -> Self {
        self.cluster_size = bytes;
        self.show("cluster_size", bytes.to_string())
    }

    /// How compressed clusters are compressed (`compression_type`).
    #[must_use]
    pub fn compression_type(mut self, kind: CompressionType) -> Self {
        self.compression_type = Some(kind);
        self.show("compression_type", kind.name().to_owned())
    }

    /// 128-bit L2 entries with 32 subclusters each (`extended_l2`).
    #[must_use]
    pub fn extended_l2(mut self, on: bool) -> Self {
        self.extended_l2 = on;
        self.show("extended_l2", on_off(on))
    }

    /// The width of a refcount in bits (`refcount_bits`): 1, 2, 4, 8, 16, 32 or 64.
    #[must_use]
    pub fn refcount_bits(mut self, bits: u64) -> Self {
        self.refcount_bits = bits;
        self.show("refcount_bits", bits.to_string())
    }

    /// Set the lazy refcounts bit (`lazy_refcounts`).
    #[must_use]
    pub fn lazy_refcounts(mut self, on: bool) -> Self {
        self.lazy_refcounts = on;
        self.show("lazy_refcounts", on_off(on))
    }

    /// What to allocate up front (`preallocation`).
    #[must_use]
    pub fn preallocation(mut self, mode: Preallocation) -> Self {
        self.preallocation = Some(mode);
        self.show("preallocation", mode.name().to_owned())
    }

    /// The backing file, stored as given (`backing_file`, qemu-img's `-b`); a relative name
    /// is relative to the new image's directory.
    #[must_use]
    pub fn backing_file(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.backing_file = Some(name.clone());
        self.show("backing_file", name)
    }

    /// The backing file's format, `qcow2` or `raw` (`backing_fmt`, qemu-img's `-F`).
    #[must_use]
    pub fn backing_format(mut self, format: impl Into<String>) -> Self {
        let format = format.into();
        self.backing_fmt = Some(format.clone());
        self.show("backing_fmt", format)
    }

    /// Do not open the backing file (qemu-img's `-u`): its size is not read, nor is its
    /// existence checked.
    #[must_use]
    pub fn unsafe_backing(mut self, on: bool) -> Self {
        self.unsafe_backing = on;
        self
    }

    /// An external data file (`data_file`), created (or truncated) at that path, which is
    /// relative to the current directory as qemu-img's is, and stored as given.
    #[must_use]
    pub fn data_file(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.data_file = Some(name.clone());
        self.show("data_file", name)
    }

    /// Keep the data file a valid raw image (`data_file_raw`; implies metadata
    /// preallocation).
    #[must_use]
    pub fn data_file_raw(mut self, on: bool) -> Self {
        self.data_file_raw = on;
        self.show("data_file_raw", on_off(on))
    }

    /// Encrypt with LUKS (`encrypt.format=luks`) opened by `secret`; further `encrypt.*`
    /// options through [`CreateOptions::set`].
    #[must_use]
    pub fn luks(mut self, secret: impl Into<Secret>) -> Self {
        self.encrypt_format = Some(EncryptFormat::Luks);
        self.secret = Some(secret.into());
        self.show("encrypt.format", "luks".to_owned())
    }

    /// The secret of `encrypt.key-secret`: the LUKS passphrase or the legacy AES key.
    #[must_use]
    pub fn secret(mut self, secret: impl Into<Secret>) -> Self {
        self.secret = Some(secret.into());
        self
    }

    /// Set one option by its `qemu-img create -o` name, with qemu-img's value syntax
    /// (sizes with `k`/`M`/`G`/`T` suffixes, `on`/`off`); `encrypt.key-secret` names a secret
    /// the caller gives with [`CreateOptions::secret`]. An unknown name or a bad value is
    /// [`Error::InvalidOption`] with qemu-img's message; a value an enumerated option
    /// (`compat`, `compression_type`, `preallocation`, `encrypt.format`) does not take is
    /// refused by [`create`] instead, as qemu-img refuses it only when it creates the image.
    ///
    /// ```
    /// let mut options = qcow2::CreateOptions::default();
    /// options.set("size", "1.5G")?;
    /// options.set("compat", "0.10")?;
    /// assert!(options.set("lazy_refcounts", "maybe").is_err());
    /// options.set("compat", "0.9")?; // refused by create, as qemu-img refuses it
    /// assert!(qcow2::create("never-written.qcow2", &options).is_err());
    /// assert!(!std::path::Path::new("never-written.qcow2").exists());
    /// assert!(options.set("bogus", "1").is_err());
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let shown = match key {
            "size" => {
                let size = size_option(key, value)?;
                self.size = Some(size);
                size.to_string()
            }
            "cluster_size" => {
                self.cluster_size = size_option(key, value)?;
                self.cluster_size.to_string()
            }
            "extent_size_hint" => size_option(key, value)?.to_string(),
            "compat" => {
                self.compat = Some(match value {
                    "0.10" | "v2" => Compat::V2,
                    "1.1" | "v3" => Compat::V3,
                    _ => return self.defer(key, value, enum_error("version", key, value)),
                });
                value.to_owned()
            }
            "compression_type" => {
                self.compression_type = Some(match value {
                    "zlib" => CompressionType::Zlib,
                    "zstd" => CompressionType::Zstd,
                    _ => return self.defer(key, value, enum_error("compression-type", key, value)),
                });
                value.to_owned()
            }
            "preallocation" => {
                self.preallocation = Some(match value {
                    "off" => Preallocation::Off,
                    "metadata" => Preallocation::Metadata,
                    "falloc" => Preallocation::Falloc,
                    "full" => Preallocation::Full,
                    _ => return self.defer(key, value, enum_error(key, key, value)),
                });
                value.to_owned()
            }
            "extended_l2" => {
                self.extended_l2 = parse_bool(key, value)?;
                value.to_owned()
            }
            "lazy_refcounts" => {
                self.lazy_refcounts = parse_bool(key, value)?;
                value.to_owned()
            }
            "data_file_raw" => {
                self.data_file_raw = parse_bool(key, value)?;
                value.to_owned()
            }
            "nocow" => {
                parse_bool(key, value)?;
                value.to_owned()
            }
            "refcount_bits" => {
                self.refcount_bits = parse_number(key, value)?;
                value.to_owned()
            }
            "backing_file" => {
                self.backing_file = Some(value.to_owned());
                value.to_owned()
            }
            "backing_fmt" => {
                self.backing_fmt = Some(value.to_owned());
                value.to_owned()
            }
            "data_file" => {
                self.data_file = Some(value.to_owned());
                value.to_owned()
            }
            "encryption" => {
                if parse_bool(key, value)? {
                    self.encrypt_format = Some(EncryptFormat::Aes);
                }
                value.to_owned()
            }
            "encrypt.format" => {
                self.encrypt_format = Some(match value {
                    "luks" => EncryptFormat::Luks,
                    "aes" | "qcow" => EncryptFormat::Aes,
                    _ => return self.defer(key, value, enum_error(key, key, value)),
                });
                value.to_owned()
            }
            "encrypt.key-secret" => value.to_owned(),
            "encrypt.iter-time" => {
                parse_number(key, value)?;
                self.encrypt_options
                    .push((key.to_owned(), value.to_owned()));
                value.to_owned()
            }
            "encrypt.cipher-alg"
            | "encrypt.cipher-mode"
            | "encrypt.ivgen-alg"
            | "encrypt.ivgen-hash-alg"
            | "encrypt.hash-alg" => {
                self.encrypt_options
                    .push((key.to_owned(), value.to_owned()));
                value.to_owned()
            }
            _ => return Err(invalid(key, format!("Invalid parameter '{key}'"))),
        };
        if let Some(name) = shown_key(key) {
            self.shown.insert(name, shown);
        }
        Ok(())
    }

    /// Set every option of a `-o` string, `key=value,key=value`, where `,,` stands for a
    /// comma inside a value (QEMU's escape).
    ///
    /// ```
    /// let mut options = qcow2::CreateOptions::default();
    /// options.set_all("size=1M,backing_file=a,,b.qcow2,backing_fmt=qcow2")?;
    /// assert_eq!(options.backing_file_name(), Some("a,b.qcow2"));
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn set_all(&mut self, text: &str) -> Result<()> {
        for (key, value) in split_options(text)? {
            self.set(&key, &value)?;
        }
        Ok(())
    }

    /// The backing file name, as it will be stored.
    pub fn backing_file_name(&self) -> Option<&str> {
        self.backing_file.as_deref()
    }

    /// The external data file's name, as it will be stored (and created).
    pub fn data_file_name(&self) -> Option<&str> {
        self.data_file.as_deref()
    }

    /// The id `encrypt.key-secret` names, for a caller that resolves secrets by id.
    pub fn key_secret_id(&self) -> Option<&str> {
        self.shown.get("encrypt.key-secret").map(String::as_str)
    }

    /// Whether the image is made preallocated (its clusters mapped from the start).
    pub fn preallocates(&self) -> bool {
        self.preallocation
            .is_some_and(|mode| mode != Preallocation::Off)
    }

    /// How the new image opens for writing: with its secret, when it is encrypted.
    pub(crate) fn open_options(&self) -> crate::image::options::OpenOptions {
        let options = crate::image::options::OpenOptions::new();
        match &self.secret {
            Some(secret) => options.secret(secret.clone()),
            None => options,
        }
    }

    /// Whether a size was given (`size` or the constructor).
    pub fn has_size(&self) -> bool {
        self.size.is_some()
    }

    /// The options as `qemu-img create` shows them after `Formatting 'FILE', `: `fmt=qcow2`
    /// and each option given or with a default, in qemu-img's order. `size` is the size the
    /// image gets (given, or the backing file's); `None` leaves it out.
    pub fn describe(&self, size: Option<u64>) -> String {
        let mut out = String::from("fmt=qcow2");
        for (key, default) in SHOWN_ORDER {
            let value = if *key == "size" {
                size.map(|s| s.to_string())
            } else {
                self.shown
                    .get(key)
                    .cloned()
                    .or_else(|| default.map(str::to_owned))
            };
            if let Some(value) = value {
                out.push(' ');
                out.push_str(key);
                out.push('=');
                out.push_str(&value);
            }
        }
        out
    }

    /// The text of `qemu-img create -f qcow2 -o help`: one line per option.
    pub fn help() -> String {
        let mut out = String::new();
        for (name, kind, text) in HELP {
            let left = format!("{name}=<{kind}>");
            out.push_str(&format!("  {left:<22} - {text}\n"));
        }
        out
    }

    /// The virtual size asked for: the size given, else the backing file's, which is opened
    /// unless [`CreateOptions::unsafe_backing`] (qemu-img's checks of the backing file come
    /// first). [`create`] rounds it up to a multiple of 512 bytes, as qemu-img does.
    pub fn resolve_size(&self, path: &Path) -> Result<u64> {
        let backing_size = self.check_backing(path)?;
        let size = match (self.size, backing_size) {
            (Some(size), _) => size,
            (None, Some(size)) => size,
            (None, None) => {
                return Err(invalid("size", "Image creation needs a size parameter"));
            }
        };
        if size > i64::MAX as u64 {
            return Err(invalid(
                "size",
                format!(
                    "Invalid image size specified. Must be between 0 and {}.",
                    i64::MAX
                ),
            ));
        }
        Ok(size)
    }

    /// qemu-img's checks of the backing file (`bdrv_img_create`): a format must be given,
    /// and the file must open unless `-u`. Its virtual size when it was opened.
    fn check_backing(&self, path: &Path) -> Result<Option<u64>> {
        let Some(name) = &self.backing_file else {
            return Ok(None);
        };
        let full = backing_path(path, name);
        let Some(format) = &self.backing_fmt else {
            let mut message = "Backing file specified without backing format".to_owned();
            if !self.unsafe_backing {
                if let Ok(found) = probe_format(&full) {
                    message.push_str(&format!("\nDetected format of {found}."));
                }
            }
            return Err(invalid("backing_fmt", message));
        };
        if self.unsafe_backing {
            return Ok(None);
        }
        backing_size(&full, format).map(Some)
    }
}

/// `key=value,key=value` with `,,` for a comma in a value, as QEMU's option parser reads it.
pub(crate) fn split_options(text: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    let mut current = String::new();
    let mut items = Vec::new();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                items.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    items.push(current);
    for item in items {
        if item.is_empty() {
            continue;
        }
        match item.split_once('=') {
            Some((key, value)) => out.push((key.to_owned(), value.to_owned())),
            None => return Err(invalid(&item, format!("Invalid parameter '{item}'"))),
        }
    }
    Ok(out)
}

/// The backing file as QEMU opens it: a relative name is relative to the image's directory.
fn backing_path(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        return name.to_path_buf();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(name),
        _ => name.to_path_buf(),
    }
}

fn could_not_open(path: &Path, e: &std::io::Error) -> Error {
    let why = match e.kind() {
        std::io::ErrorKind::NotFound => "No such file or directory".to_owned(),
        std::io::ErrorKind::PermissionDenied => "Permission denied".to_owned(),
        _ => e.to_string(),
    };
    invalid(
        "backing_file",
        format!(
            "Could not open '{}': {why}\nCould not open backing image.",
            path.display()
        ),
    )
}

/// The first bytes of a file, enough for a header.
fn read_prefix(path: &Path, len: u64) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    File::open(path)?.take(len).read_to_end(&mut buf)?;
    Ok(buf)
}

fn probe_format(path: &Path) -> std::io::Result<&'static str> {
    let prefix = read_prefix(path, 4)?;
    Ok(if prefix == MAGIC.to_be_bytes() {
        "qcow2"
    } else {
        "raw"
    })
}

/// The virtual size of the backing file, opened as `format` without its own backing chain.
fn backing_size(path: &Path, format: &str) -> Result<u64> {
    match format {
        "raw" => std::fs::metadata(path)
            .map(|m| m.len())
            .map_err(|e| could_not_open(path, &e)),
        "qcow2" => {
            let max_cluster = 1u64 << MAX_CLUSTER_BITS;
            let prefix = read_prefix(path, max_cluster).map_err(|e| could_not_open(path, &e))?;
            let header = Header::parse(&prefix, &Limits::default()).map_err(|e| {
                invalid(
                    "backing_file",
                    format!(
                        "Could not open '{}': {e}\nCould not open backing image.",
                        path.display()
                    ),
                )
            })?;
            Ok(header.size())
        }
        other => Err(invalid("backing_fmt", format!("Unknown driver '{other}'"))),
    }
}

/// The options checked and resolved: what [`create`] writes.
#[derive(Debug)]
struct Plan {
    version: u32,
    cluster_bits: u32,
    refcount_order: u32,
    size: u64,
    extended_l2: bool,
    preallocation: Preallocation,
    compression: Option<CompressionType>,
    encrypt: Option<EncryptFormat>,
}

impl Plan {
    /// `qcow2_co_create`'s checks, in its order.
    fn check(options: &CreateOptions, size: u64) -> Result<Plan> {
        let version = match options.compat {
            Some(Compat::V2) => 2,
            _ => 3,
        };
        let v3_only = |what: &str, option: &str| {
            Err(invalid(
                option,
                format!(
                    "{what} only supported with compatibility level 1.1 and above (use \
                     version=v3 or greater)"
                ),
            ))
        };
        if options.extended_l2 && version < 3 {
            return v3_only("Extended L2 entries are", "extended_l2");
        }
        let cluster_bits = check_cluster_size(options.cluster_size, options.extended_l2)?;
        let mut preallocation = options.preallocation.unwrap_or_default();
        if options.backing_file.is_some()
            && preallocation != Preallocation::Off
            && !options.extended_l2
        {
            return Err(invalid(
                "preallocation",
                "Backing file and preallocation can only be used at the same time if \
                 extended_l2 is on",
            ));
        }
        if options.backing_fmt.is_some() && options.backing_file.is_none() {
            return Err(invalid(
                "backing_fmt",
                "Backing format cannot be used without backing file",
            ));
        }
        if version < 3 && options.lazy_refcounts {
            return v3_only("Lazy refcounts", "lazy_refcounts");
        }
        let bits = options.refcount_bits;
        if bits > 64 || !bits.is_power_of_two() {
            return Err(invalid(
                "refcount_bits",
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if version < 3 && bits != 16 {
            return Err(invalid(
                "refcount_bits",
                "Different refcount widths than 16 bits require compatibility level 1.1 or \
                 above (use version=v3 or greater)",
            ));
        }
        if options.data_file_raw && options.data_file.is_none() {
            return Err(invalid("data_file_raw", "data-file-raw requires data-file"));
        }
        if options.data_file_raw && options.backing_file.is_some() {
            return Err(invalid(
                "data_file_raw",
                "Backing file and data-file-raw cannot be used at the same time",
            ));
        }
        if options.data_file_raw && preallocation == Preallocation::Off {
            preallocation = Preallocation::Metadata;
        }
        if options.data_file.is_some() && version < 3 {
            return v3_only("External data files are", "data_file");
        }
        let compression = options
            .compression_type
            .filter(|&c| c != CompressionType::Zlib);
        if compression.is_some() && version < 3 {
            return v3_only("Non-zlib compression type is", "compression_type");
        }
        if let Some(name) = &options.backing_file {
            if name.len() > MAX_BACKING_FILE_LEN {
                return Err(invalid(
                    "backing_file",
                    format!(
                        "Could not assign backing file '{name}' with format '{}': Invalid \
                         argument",
                        options.backing_fmt.as_deref().unwrap_or_default()
                    ),
                ));
            }
        }
        if options.encrypt_format.is_some() && options.secret.is_none() {
            return Err(invalid(
                "encrypt.key-secret",
                "Parameter 'encrypt.key-secret' is required for cipher",
            ));
        }
        let plan = Plan {
            version,
            cluster_bits,
            refcount_order: bits.trailing_zeros(),
            size,
            extended_l2: options.extended_l2,
            preallocation,
            compression,
            encrypt: options.encrypt_format,
        };
        if plan.l1_size().saturating_mul(8) > MAX_L1_BYTES {
            return Err(invalid(
                "size",
                "The image size is too large for file format 'qcow2' (try using a larger \
                 cluster size)",
            ));
        }
        Ok(plan)
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entries(&self) -> u64 {
        let entry = if self.extended_l2 { 16 } else { 8 };
        self.cluster_size().checked_div(entry).unwrap_or(0)
    }

    fn l1_size(&self) -> u64 {
        self.size
            .div_ceil(self.cluster_size().saturating_mul(self.l2_entries()))
    }

    /// Whether the data clusters are made to take space: written with zeros (`full`) or
    /// reserved (`falloc`, zeros where the file system cannot reserve).
    fn writes_zeros(&self) -> bool {
        matches!(
            self.preallocation,
            Preallocation::Falloc | Preallocation::Full
        )
    }

    /// What preallocation rounds the last stretch of data to: a subcluster with extended L2
    /// entries, a cluster otherwise.
    fn data_unit(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / SUBCLUSTERS
        } else {
            self.cluster_size()
        }
    }
}

fn check_cluster_size(bytes: u64, extended_l2: bool) -> Result<u32> {
    let bits = bytes.trailing_zeros();
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) || bytes != 1u64 << bits {
        return Err(invalid(
            "cluster_size",
            format!(
                "Cluster size must be a power of two between {} and {}k",
                1u32 << MIN_CLUSTER_BITS,
                1u32 << (MAX_CLUSTER_BITS - 10)
            ),
        ));
    }
    let min_extended = (1u64 << MIN_CLUSTER_BITS) * SUBCLUSTERS;
    if extended_l2 && bytes < min_extended {
        return Err(invalid(
            "cluster_size",
            format!(
                "Extended L2 entries are only supported with cluster sizes of at least \
                 {min_extended} bytes"
            ),
        ));
    }
    Ok(bits)
}

/// Where the L2 tables and the data clusters of a preallocated image go.
#[derive(Debug)]
enum Payload {
    /// No L2 tables (`preallocation=off`).
    None,
    /// Each L2 table followed by its data clusters, from cluster `base` on (QEMU's metadata
    /// preallocation).
    Interleaved { base: u64 },
    /// L2 tables one after another from `base`, the data in the external data file.
    TablesOnly { base: u64 },
    /// Where QEMU's allocator, replayed, put each L2 table and each stretch of data.
    Placed(Placed),
    /// QEMU's falloc/full preallocation: the data together from `data_base`, the L2 tables
    /// after it; where QEMU moves the initial refcount table after the L1 table, the first L2
    /// table takes its place in cluster 1 (`first_in_cluster_1`).
    DataFirst {
        data_base: u64,
        data_clusters: u64,
        first_in_cluster_1: bool,
    },
}

/// Where everything of a new image goes, in clusters unless named `_offset`/`_len`.
#[derive(Debug)]
struct Layout {
    cluster_bits: u32,
    refcount_table: u64,
    refcount_table_clusters: u64,
    refblocks: u64,
    refblock_count: u64,
    /// Where QEMU's allocator put each refcount block (0: none), when it was replayed;
    /// otherwise they follow one another from `refblocks`.
    placed_refblocks: Option<Vec<u64>>,
    l1_table: u64,
    l1_size: u64,
    l2_tables: u64,
    l2_entries: u64,
    data_clusters: u64,
    payload: Payload,
    luks: Option<(u64, u64)>,
    /// Clusters with refcount 1, as `[start, end)` ranges; every other cluster is free.
    allocated: Vec<(u64, u64)>,
    file_len: u64,
}

impl Layout {
    fn offset(&self, cluster: u64) -> u64 {
        cluster << self.cluster_bits
    }

    /// The cluster of refcount block `index` (0: there is none).
    fn refblock_cluster(&self, index: u64) -> u64 {
        match &self.placed_refblocks {
            Some(placed) => usize::try_from(index)
                .ok()
                .and_then(|i| placed.get(i))
                .copied()
                .unwrap_or(0),
            None => self.refblocks.saturating_add(index),
        }
    }

    fn l2_cluster(&self, table: u64) -> u64 {
        match &self.payload {
            Payload::None => 0,
            Payload::Placed(placed) => usize::try_from(table)
                .ok()
                .and_then(|t| placed.l2.get(t))
                .copied()
                .unwrap_or(0),
            &Payload::Interleaved { base } => {
                base.saturating_add(table.saturating_mul(self.l2_entries.saturating_add(1)))
            }
            &Payload::TablesOnly { base } => base.saturating_add(table),
            &Payload::DataFirst {
                data_base,
                data_clusters,
                first_in_cluster_1,
            } => match (first_in_cluster_1, table) {
                (true, 0) => 1,
                (true, _) => data_base
                    .saturating_add(data_clusters)
                    .saturating_add(table.saturating_sub(1)),
                (false, _) => data_base
                    .saturating_add(data_clusters)
                    .saturating_add(table),
            },
        }
    }

    /// The host offset of guest cluster `index`, in the image file or the data file.
    fn data_offset(&self, index: u64) -> u64 {
        let cluster = match &self.payload {
            Payload::None | Payload::TablesOnly { .. } => index,
            Payload::Placed(placed) => placed.host_cluster(index),
            &Payload::Interleaved { base } => {
                let table = index.checked_div(self.l2_entries).unwrap_or(0);
                let within = index.checked_rem(self.l2_entries).unwrap_or(0);
                base.saturating_add(table.saturating_mul(self.l2_entries.saturating_add(1)))
                    .saturating_add(1)
                    .saturating_add(within)
            }
            &Payload::DataFirst { data_base, .. } => data_base.saturating_add(index),
        };
        self.offset(cluster)
    }
}

/// `bytes` rounded up to a multiple of `unit` (not zero).
fn round_up(bytes: u64, unit: u64) -> u64 {
    bytes.div_ceil(unit).saturating_mul(unit)
}

fn clusters_for(bytes: u64, cluster_size: u64) -> u64 {
    bytes.div_ceil(cluster_size)
}

fn too_large() -> Error {
    invalid(
        "size",
        "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
    )
}

/// Lay the image out as `qcow2_co_create` and `qcow2_co_truncate` do when every cluster is
/// described by the first refcount block; beyond that, the same order with as many refcount
/// blocks (and refcount table clusters) as needed, placed after the first.
fn lay_out(plan: &Plan, has_data_file: bool, luks_len: Option<u64>) -> Result<Layout> {
    let cs = plan.cluster_size();
    let bits = plan.cluster_bits;
    let refcounts_per_block = cs.saturating_mul(8) >> plan.refcount_order;
    let l1_size = plan.l1_size();
    let l1_clusters = clusters_for(l1_size.saturating_mul(8), cs);
    let l2_entries = plan.l2_entries();
    let preallocated = plan.preallocation != Preallocation::Off;
    let data_clusters = if preallocated {
        clusters_for(plan.size, cs)
    } else {
        0
    };
    let l2_tables = if preallocated { l1_size } else { 0 };
    let luks_clusters = luks_len.map_or(0, |len| clusters_for(len, cs));
    let mut layout = Layout {
        cluster_bits: bits,
        refcount_table: 1,
        refcount_table_clusters: 1,
        refblocks: 2,
        refblock_count: 1,
        placed_refblocks: None,
        l1_table: 0,
        l1_size,
        l2_tables,
        l2_entries,
        data_clusters,
        payload: Payload::None,
        luks: None,
        allocated: Vec::new(),
        file_len: 0,
    };

    let data_first = matches!(
        plan.preallocation,
        Preallocation::Falloc | Preallocation::Full
    ) && !has_data_file;
    if data_first {
        // QEMU: the L1 table after the first refcount block, then a new refcount table at the
        // end of the file, the data, and the L2 tables in the freed first table's cluster
        // and after the data.
        let table = l1_clusters.saturating_add(3);
        let data_base = table.saturating_add(1);
        let end = data_base
            .saturating_add(data_clusters)
            .saturating_add(l2_tables.saturating_sub(1));
        if end.saturating_add(luks_clusters) <= refcounts_per_block {
            layout.refcount_table = table;
            layout.l1_table = if l1_size > 0 { 3 } else { 0 };
            layout.payload = Payload::DataFirst {
                data_base,
                data_clusters,
                first_in_cluster_1: true,
            };
            let mut allocated = vec![(0, 1)];
            if l2_tables > 0 {
                allocated = vec![(0, end)];
            } else {
                allocated.push((2, end));
            }
            layout.file_len = layout.offset(end);
            finish_with_luks(&mut layout, allocated, end, luks_clusters, luks_len);
            return Ok(layout);
        }
    }

    if matches!(
        plan.preallocation,
        Preallocation::Off | Preallocation::Metadata
    ) {
        layout.l2_tables = l2_tables;
        layout.data_clusters = data_clusters;
        let replayed = replay_layout(
            &layout,
            plan,
            has_data_file,
            l1_clusters,
            luks_clusters,
            luks_len,
        );
        if let Some(replayed) = replayed {
            return Ok(replayed);
        }
    }

    // header, refcount table, refcount blocks, L1 table, L2 tables (and data), LUKS area.
    let payload_clusters = if has_data_file {
        l2_tables
    } else {
        l2_tables.saturating_add(data_clusters)
    };
    let rest = l1_clusters
        .saturating_add(payload_clusters)
        .saturating_add(luks_clusters);
    let (mut table_clusters, mut blocks) = (1u64, 1u64);
    loop {
        let total = table_clusters
            .saturating_add(blocks)
            .saturating_add(rest)
            .saturating_add(1);
        let new_blocks = total.div_ceil(refcounts_per_block);
        let new_table = clusters_for(new_blocks.saturating_mul(8), cs);
        if (new_blocks, new_table) == (blocks, table_clusters) {
            break;
        }
        (blocks, table_clusters) = (new_blocks, new_table);
    }
    if table_clusters.saturating_mul(cs) > MAX_REFTABLE_BYTES {
        return Err(too_large());
    }
    layout.refcount_table_clusters = table_clusters;
    layout.refblocks = table_clusters.saturating_add(1);
    layout.refblock_count = blocks;
    let l1 = layout.refblocks.saturating_add(blocks);
    layout.l1_table = if l1_size > 0 { l1 } else { 0 };
    let base = l1.saturating_add(l1_clusters);
    let end = base.saturating_add(payload_clusters);
    layout.payload = match (preallocated, has_data_file) {
        (false, _) => Payload::None,
        (true, true) => Payload::TablesOnly { base },
        (true, false) if data_first => Payload::DataFirst {
            data_base: base,
            data_clusters,
            first_in_cluster_1: false,
        },
        (true, false) => Payload::Interleaved { base },
    };
    layout.file_len = if data_first && preallocated {
        layout.offset(end)
    } else if preallocated && !has_data_file && data_clusters > 0 {
        // The last data stretch is extended to its unit, not to the cluster's end.
        let last_table = l2_tables.saturating_sub(1);
        let last_table_start = last_table.saturating_mul(l2_entries).saturating_mul(cs);
        let last_bytes = round_up(plan.size.saturating_sub(last_table_start), plan.data_unit());
        layout
            .offset(layout.l2_cluster(last_table).saturating_add(1))
            .saturating_add(last_bytes)
    } else if l1_size > 0 && !preallocated {
        layout.offset(l1).saturating_add(l1_size.saturating_mul(8))
    } else {
        layout.offset(end)
    };
    finish_with_luks(&mut layout, vec![(0, end)], end, luks_clusters, luks_len);
    Ok(layout)
}

/// What one step of QEMU's allocator ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Done,
    /// A refcount block was added: QEMU undoes the step and searches again (`-EAGAIN`).
    Again,
    /// The refcount table would have to grow: not replayed.
    Grow,
}

/// Clusters with refcount 1, as disjoint, non-adjacent `start -> end` runs.
#[derive(Debug, Default)]
struct RunSet(BTreeMap<u64, u64>);

impl RunSet {
    /// The end of the run holding `cluster`.
    fn run_end(&self, cluster: u64) -> Option<u64> {
        self.0
            .range(..=cluster)
            .next_back()
            .and_then(|(_, &end)| (cluster < end).then_some(end))
    }

    /// The first used cluster after `cluster`.
    fn next_start(&self, cluster: u64) -> Option<u64> {
        self.0
            .range(cluster.saturating_add(1)..)
            .next()
            .map(|(&start, _)| start)
    }

    fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut lo, mut hi) = (start, end);
        if let Some((&s, &e)) = self.0.range(..=start).next_back() {
            if e >= start {
                lo = s;
                hi = hi.max(e);
            }
        }
        let covered: Vec<u64> = self.0.range(lo..=hi).map(|(&s, _)| s).collect();
        for s in covered {
            if let Some(e) = self.0.remove(&s) {
                hi = hi.max(e);
            }
        }
        self.0.insert(lo, hi);
    }

    fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let first = self
            .0
            .range(..=start)
            .next_back()
            .map_or(start, |(&s, _)| s);
        let touched: Vec<(u64, u64)> = self.0.range(first..end).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in touched {
            if e <= start {
                continue;
            }
            self.0.remove(&s);
            if s < start {
                self.0.insert(s, start);
            }
            if e > end {
                self.0.insert(end, e);
            }
        }
    }

    fn runs(&self) -> Vec<(u64, u64)> {
        self.0.iter().map(|(&s, &e)| (s, e)).collect()
    }
}

/// QEMU's cluster allocator (`alloc_clusters_noref`, `update_refcount`,
/// `alloc_refcount_block` in block/qcow2-refcount.c) replayed on a new image whose
/// refcount table keeps its one cluster, to place the L1 table, the L2 tables, the data
/// clusters and the refcount blocks they need exactly where `qemu-img create` places them.
struct Replay {
    per_block: u64,
    /// Refcount table entries: the cluster of each refcount block, 0 for none.
    table: Vec<u64>,
    used: RunSet,
    /// `free_cluster_index`: where the next search starts.
    free: u64,
    /// Bounds one allocation's searches: each `Again` adds a refcount block, so a search
    /// is repeated at most once per refcount table entry.
    retries: u64,
}

impl Replay {
    /// The image as `qcow2_co_create` leaves it: the refcount table in cluster 1 pointing at
    /// an empty block in cluster 2, then clusters 0-2 allocated.
    fn new(per_block: u64, table_entries: usize) -> Option<Replay> {
        let mut table = vec![0u64; table_entries];
        *table.first_mut()? = 2;
        let mut replay = Replay {
            per_block,
            table,
            used: RunSet::default(),
            free: 0,
            retries: u64::try_from(table_entries).ok()?.saturating_add(2),
        };
        (replay.alloc(3)? == 0).then_some(replay)
    }

    fn block_of(&self, cluster: u64) -> u64 {
        cluster.checked_div(self.per_block).unwrap_or(0)
    }

    fn block_at(&self, index: u64) -> u64 {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.table.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// `alloc_clusters_noref`: the first run of `n` free clusters from `free` on (QEMU
    /// looks at one cluster at a time; runs are skipped whole, to the same result).
    fn find_free(&mut self, n: u64) -> u64 {
        let mut found = 0u64;
        loop {
            let cluster = self.free;
            if let Some(end) = self.used.run_end(cluster) {
                self.free = end;
                found = 0;
                continue;
            }
            let need = n.saturating_sub(found);
            let gap = self
                .used
                .next_start(cluster)
                .map_or(u64::MAX, |next| next.saturating_sub(cluster));
            if gap >= need {
                self.free = cluster.saturating_add(need);
                return self.free.saturating_sub(n);
            }
            found = found.saturating_add(gap);
            self.free = cluster.saturating_add(gap);
        }
    }

    /// `qcow2_alloc_clusters`: search, count, and search again while blocks get added.
    fn alloc(&mut self, n: u64) -> Option<u64> {
        for _ in 0..self.retries {
            let start = self.find_free(n);
            match self.add_refs(start, n) {
                Step::Done => return Some(start),
                Step::Again => continue,
                Step::Grow => return None,
            }
        }
        None
    }

    /// `update_refcount(+1)`, one refcount block's stretch at a time; on `Again` or `Grow`
    /// the clusters counted so far are given back and the next search starts at `start`.
    fn add_refs(&mut self, start: u64, n: u64) -> Step {
        let end = start.saturating_add(n);
        let mut cluster = start;
        while cluster < end {
            let step = self.ensure_block(cluster);
            if step != Step::Done {
                // QEMU searches again from `start` ("try the same ones first"), and gives
                // back what it counted.
                self.free = self.free.min(start);
                self.used.remove(start, cluster);
                return step;
            }
            let block_end = self
                .block_of(cluster)
                .saturating_add(1)
                .saturating_mul(self.per_block);
            let stretch_end = end.min(block_end);
            self.used.insert(cluster, stretch_end);
            cluster = stretch_end;
        }
        Step::Done
    }

    /// `alloc_refcount_block`: a new block goes in the first free cluster; it counts itself
    /// when it describes itself, else its own block is made first.
    fn ensure_block(&mut self, cluster: u64) -> Step {
        let index = self.block_of(cluster);
        if self.block_at(index) != 0 {
            return Step::Done;
        }
        let new_block = self.find_free(1);
        if self.block_of(new_block) == index {
            self.used.insert(new_block, new_block.saturating_add(1));
        } else {
            let step = self.add_refs(new_block, 1);
            if step != Step::Done {
                return step;
            }
        }
        match usize::try_from(index)
            .ok()
            .and_then(|i| self.table.get_mut(i))
        {
            Some(slot) => {
                *slot = new_block;
                Step::Again
            }
            None => Step::Grow,
        }
    }
}

/// Where a replayed metadata preallocation put each L2 table and each stretch of data.
#[derive(Debug, Default)]
struct Placed {
    /// The cluster of each L2 table.
    l2: Vec<u64>,
    /// `(first guest cluster, first host cluster, clusters)`, in guest order.
    runs: Vec<(u64, u64, u64)>,
}

impl Placed {
    fn host_cluster(&self, index: u64) -> u64 {
        let at = self.runs.partition_point(|&(guest, _, _)| guest <= index);
        at.checked_sub(1)
            .and_then(|i| self.runs.get(i))
            .map_or(0, |&(guest, host, _)| {
                host.saturating_add(index.saturating_sub(guest))
            })
    }
}

/// The most L2 tables a preallocation is replayed for (their places are kept in memory).
const MAX_REPLAYED_L2_TABLES: u64 = 1 << 16;
/// What one `preallocate_co` step covers at most: `INT_MAX` bytes, in whole clusters.
const PREALLOC_STEP_BYTES: u64 = i32::MAX as u64;

/// `preallocation=off` and `metadata` laid out by replaying QEMU's allocator: the L1 table;
/// for metadata, each L2 table then its data (in steps of at most 2 GiB) or, with a data
/// file, the L2 tables alone; then the LUKS area. `None` where the refcount table would have
/// to grow, or too many L2 tables would have to be remembered.
fn replay_layout(
    base: &Layout,
    plan: &Plan,
    has_data_file: bool,
    l1_clusters: u64,
    luks_clusters: u64,
    luks_len: Option<u64>,
) -> Option<Layout> {
    let cs = plan.cluster_size();
    let per_block = cs.saturating_mul(8) >> plan.refcount_order;
    let l2_tables = base.l2_tables;
    if l2_tables > MAX_REPLAYED_L2_TABLES {
        return None;
    }
    let mut replay = Replay::new(per_block, usize::try_from(cs / 8).ok()?)?;
    let l1 = if base.l1_size > 0 {
        replay.alloc(l1_clusters)?
    } else {
        0
    };
    let mut placed = Placed::default();
    // Where the last data step started and how many bytes it covered: the file ends there.
    let mut last_step = None;
    let step_clusters = PREALLOC_STEP_BYTES.checked_div(cs).unwrap_or(1).max(1);
    for table in 0..l2_tables {
        placed.l2.push(replay.alloc(1)?);
        if has_data_file {
            continue;
        }
        let first = table.saturating_mul(base.l2_entries);
        let last = first
            .saturating_add(base.l2_entries)
            .min(base.data_clusters);
        let mut index = first;
        while index < last {
            let n = last.saturating_sub(index).min(step_clusters);
            let host = replay.alloc(n)?;
            placed.runs.push((index, host, n));
            let guest_start = index.saturating_mul(cs);
            let bytes = plan
                .size
                .saturating_sub(guest_start)
                .min(n.saturating_mul(cs));
            last_step = Some((host, bytes));
            index = index.saturating_add(n);
        }
    }
    let luks = match luks_len {
        Some(len) => Some((replay.alloc(luks_clusters)?, len)),
        None => None,
    };
    let blocks = replay
        .table
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |last| last.saturating_add(1));
    let refblocks: Vec<u64> = replay.table.get(..blocks)?.to_vec();
    // The file ends where the last write ends: the header, the refcount table and blocks,
    // the L2 tables (whole clusters), the L1 entries, the last data step (rounded as QEMU's
    // preallocation rounds it), the LUKS area (whole clusters, zero filled).
    let whole = |cluster: u64| cluster.saturating_add(1).saturating_mul(cs);
    let mut file_len = cs.saturating_mul(3);
    for &cluster in refblocks.iter().chain(&placed.l2) {
        file_len = file_len.max(whole(cluster));
    }
    if base.l1_size > 0 {
        file_len = file_len.max(
            l1.saturating_mul(cs)
                .saturating_add(base.l1_size.saturating_mul(8)),
        );
    }
    if let Some((host, bytes)) = last_step {
        file_len = file_len.max(
            host.saturating_mul(cs)
                .saturating_add(round_up(bytes, plan.data_unit())),
        );
    }
    if let Some((at, _)) = luks {
        file_len = file_len.max(at.saturating_add(luks_clusters).saturating_mul(cs));
    }
    let payload = if l2_tables > 0 {
        Payload::Placed(placed)
    } else {
        Payload::None
    };
    Some(Layout {
        cluster_bits: base.cluster_bits,
        refcount_table: 1,
        refcount_table_clusters: 1,
        refblocks: 2,
        refblock_count: u64::try_from(blocks).ok()?,
        placed_refblocks: Some(refblocks),
        l1_table: l1,
        l1_size: base.l1_size,
        l2_tables,
        l2_entries: base.l2_entries,
        data_clusters: base.data_clusters,
        payload,
        luks: luks.map(|(at, len)| (at.saturating_mul(cs), len)),
        allocated: replay.used.runs(),
        file_len,
    })
}

/// Put the LUKS area (if any) at the first cluster after `end`, the way QEMU allocates it
/// last, and record the allocated clusters.
fn finish_with_luks(
    layout: &mut Layout,
    mut allocated: Vec<(u64, u64)>,
    end: u64,
    luks_clusters: u64,
    luks_len: Option<u64>,
) {
    if let Some(len) = luks_len {
        layout.luks = Some((layout.offset(end), len));
        let luks_end = end.saturating_add(luks_clusters);
        allocated.push((end, luks_end));
        layout.file_len = layout.offset(luks_end);
    }
    layout.allocated = allocated;
}

/// A refcount block: 1 for each allocated cluster it describes.
fn refblock(layout: &Layout, index: u64, refcount_order: u32) -> Vec<u8> {
    let cs = layout.offset(1);
    let per_block = cs.saturating_mul(8) >> refcount_order;
    let first = index.saturating_mul(per_block);
    let last = first.saturating_add(per_block);
    let mut block = vec![0u8; usize::try_from(cs).unwrap_or(0)];
    for &(start, end) in &layout.allocated {
        for cluster in start.max(first)..end.min(last) {
            set_refcount_one(&mut block, cluster.saturating_sub(first), refcount_order);
        }
    }
    block
}

/// Set entry `index` of a refcount block to 1: big-endian words from 8 bits up; below,
/// packed from the least significant bit of each byte, as QEMU reads them.
fn set_refcount_one(block: &mut [u8], index: u64, refcount_order: u32) {
    let bits = 1u64 << refcount_order;
    let (byte, mask) = if bits >= 8 {
        (
            index
                .saturating_add(1)
                .saturating_mul(bits / 8)
                .saturating_sub(1),
            1u8,
        )
    } else {
        let bit = index.saturating_mul(bits);
        (bit / 8, 1u8 << (bit % 8))
    };
    if let Some(b) = usize::try_from(byte).ok().and_then(|i| block.get_mut(i)) {
        *b |= mask;
    }
}

fn io_err<'p>(what: &str, path: &'p Path) -> impl Fn(std::io::Error) -> Error + 'p {
    let what = what.to_owned();
    move |e| Error::io(format!("{what} {}", path.display()), e)
}

/// Write a new empty image at `path` as `qemu-img create -f qcow2` does, with `options`.
///
/// Every option is checked first, as QEMU checks it ([`Error::InvalidOption`] with
/// qemu-img's message), and nothing is written when one is refused. An existing file is
/// overwritten, as qemu-img does. On an error while writing, the files this call created are
/// removed.
///
/// Without encryption, the file is byte for byte what `qemu-img create` writes with the same
/// options (QEMU's cluster allocator is replayed to place the L1 table, L2 tables, data and
/// refcount blocks), with two exceptions that read the same and pass `qemu-img check` alike,
/// their refcount structures placed differently and the file no larger: images whose
/// refcount table QEMU grows while it allocates (one refcount table cluster describes
/// `cluster_size / 8` refcount blocks: reached with small clusters and wide refcounts), and
/// `falloc`/`full` preallocation past the first refcount block (2 GiB with 64 KiB clusters
/// and 16-bit refcounts).
///
/// ```
/// let dir = std::env::temp_dir().join(format!("qcow2-doc-create-fn-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let base = dir.join("base.qcow2");
/// qcow2::create(&base, &qcow2::CreateOptions::new(10 << 20))?;
/// // An overlay: the size comes from the backing file.
/// let top = dir.join("top.qcow2");
/// let options = qcow2::CreateOptions::default()
///     .backing_file("base.qcow2")
///     .backing_format("qcow2");
/// qcow2::create(&top, &options)?;
/// let image = qcow2::Qcow2::open_path(&top)?;
/// assert_eq!(image.header().size(), 10 << 20);
/// assert_eq!(image.header().backing_file(), Some("base.qcow2"));
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn create(path: impl AsRef<Path>, options: &CreateOptions) -> Result<()> {
    let path = path.as_ref();
    let size = options
        .resolve_size(path)?
        .div_ceil(SECTOR)
        .saturating_mul(SECTOR);
    if let Some((option, message)) = &options.deferred {
        return Err(invalid(option, message.clone()));
    }
    let plan = Plan::check(options, size)?;
    let luks = new_encryption(options, &plan)?;
    let layout = lay_out(
        &plan,
        options.data_file.is_some(),
        luks.as_ref().map(|area| area.len() as u64),
    )?;
    // Only files this call created are removed on an error: not one it could not open.
    let file = File::create(path).map_err(io_err("creating", path))?;
    let data_file = match options.data_file.as_deref().map(Path::new) {
        Some(data) => match File::create(data) {
            Ok(handle) => Some((handle, data)),
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(io_err("creating", data)(e));
            }
        },
        None => None,
    };
    let mut result = Ok(());
    if let Some((handle, data)) = &data_file {
        result = write_data_file(handle, data, &plan);
    }
    if result.is_ok() {
        result = write_all(&file, path, options, &plan, &layout, luks.as_deref());
    }
    if result.is_err() {
        let _ = std::fs::remove_file(path);
        if let Some((_, data)) = &data_file {
            let _ = std::fs::remove_file(data);
        }
    }
    result
}

/// The LUKS area of a new LUKS image, made before any file is written.
fn new_encryption(options: &CreateOptions, plan: &Plan) -> Result<Option<Vec<u8>>> {
    if plan.encrypt != Some(EncryptFormat::Luks) {
        return Ok(None);
    }
    let secret = options.secret.clone().ok_or_else(|| {
        invalid(
            "encrypt.key-secret",
            "Parameter 'encrypt.key-secret' is required for cipher",
        )
    })?;
    let mut luks = LuksOptions::new(secret);
    for (key, value) in &options.encrypt_options {
        luks.set(key.strip_prefix("encrypt.").unwrap_or(key), value)?;
    }
    luks_area(&luks).map(Some)
}

#[cfg(feature = "encryption")]
fn luks_area(luks: &LuksOptions) -> Result<Vec<u8>> {
    crate::crypt::create::new_luks(luks).map(|new| new.area)
}

#[cfg(not(feature = "encryption"))]
fn luks_area(_: &LuksOptions) -> Result<Vec<u8>> {
    Err(Error::InvalidOption {
        option: "encrypt.format".to_owned(),
        message: "LUKS encryption needs the crate's `encryption` feature".to_owned(),
    })
}

fn write_all(
    file: &File,
    path: &Path,
    options: &CreateOptions,
    plan: &Plan,
    layout: &Layout,
    luks: Option<&[u8]>,
) -> Result<()> {
    use crate::base::io::PositionalSink;

    let put = |at: u64, bytes: &[u8]| -> Result<()> {
        file.write_all_at(at, bytes)
            .map_err(io_err("writing", path))
    };

    // The refcount table and blocks, a cluster at a time.
    let table_at = layout.offset(layout.refcount_table);
    write_entries(&put, layout, table_at, layout.refblock_count, 8, |i| {
        layout.offset(layout.refblock_cluster(i))
    })?;
    for i in 0..layout.refblock_count {
        let cluster = layout.refblock_cluster(i);
        if cluster != 0 {
            put(
                layout.offset(cluster),
                &refblock(layout, i, plan.refcount_order),
            )?;
        }
    }

    // QEMU frees the initial refcount table when it moves it for falloc/full; without an L2
    // table to take its place, its old contents stay in cluster 1.
    if let Payload::DataFirst {
        first_in_cluster_1: true,
        ..
    } = layout.payload
    {
        if layout.l2_tables == 0 {
            put(layout.offset(1), &layout.offset(2).to_be_bytes())?;
        }
    }

    if layout.l2_tables > 0 {
        write_tables(&put, layout, plan, options.data_file.is_some())?;
    }
    if plan.writes_zeros() && options.data_file.is_none() {
        let fill = |start: u64, len: u64| reserve_or_zero(file, path, &put, plan, start, len);
        write_zero_data(&fill, layout)?;
    }
    if let Some((offset, _)) = layout.luks {
        put(offset, luks.unwrap_or_default())?;
    }
    file.set_len(layout.file_len)
        .map_err(io_err("extending", path))?;

    // Last: until the header is there, the file is no image.
    let header = header_for(options, plan, layout)?;
    put(0, &header.encode()?)?;
    file.sync_all().map_err(io_err("flushing", path))
}

type Put<'a> = dyn Fn(u64, &[u8]) -> Result<()> + 'a;

/// Write `count` big-endian entries of `entry_len` bytes (the first 8 from `entry(i)`, the
/// rest zero) from `at`, one cluster at a time; the last cluster only as far as its entries.
fn write_entries(
    put: &Put<'_>,
    layout: &Layout,
    at: u64,
    count: u64,
    entry_len: u64,
    entry: impl Fn(u64) -> u64,
) -> Result<()> {
    let cs = layout.offset(1);
    let per_cluster = cs.checked_div(entry_len).unwrap_or(1).max(1);
    let mut first = 0u64;
    while first < count {
        let n = per_cluster.min(count.saturating_sub(first));
        let mut buf = vec![0u8; usize::try_from(n.saturating_mul(entry_len)).unwrap_or(0)];
        for k in 0..n {
            put_u64(
                &mut buf,
                k.saturating_mul(entry_len),
                entry(first.saturating_add(k)),
            );
        }
        put(at.saturating_add(first.saturating_mul(entry_len)), &buf)?;
        first = first.saturating_add(n);
    }
    Ok(())
}

/// The L1 table and every L2 table, mapping each guest cluster to its host cluster (the
/// same offset in an external data file).
fn write_tables(put: &Put<'_>, layout: &Layout, plan: &Plan, has_data_file: bool) -> Result<()> {
    let l1_at = layout.offset(layout.l1_table);
    write_entries(put, layout, l1_at, layout.l1_size, 8, |i| {
        layout.offset(layout.l2_cluster(i)) | OFLAG_COPIED
    })?;
    let entry_len = if plan.extended_l2 { 16 } else { 8 };
    let cs = usize::try_from(layout.offset(1)).unwrap_or(0);
    for t in 0..layout.l2_tables {
        let first = t.saturating_mul(layout.l2_entries);
        let count = layout
            .l2_entries
            .min(layout.data_clusters.saturating_sub(first));
        let at = layout.offset(layout.l2_cluster(t));
        // A whole cluster: QEMU writes the table in full.
        put(at, &vec![0u8; cs])?;
        write_entries(put, layout, at, count, entry_len, |k| {
            let index = first.saturating_add(k);
            let host = if has_data_file {
                layout.offset(index)
            } else {
                layout.data_offset(index)
            };
            host | OFLAG_COPIED
        })?;
    }
    Ok(())
}

fn put_u64(buf: &mut [u8], at: u64, value: u64) {
    let at = usize::try_from(at).unwrap_or(usize::MAX);
    if let Some(slot) = buf.get_mut(at..at.saturating_add(8)) {
        slot.copy_from_slice(&value.to_be_bytes());
    }
}

/// `len` zero bytes from `start`, a bounded piece at a time.
fn write_zeros(put: &Put<'_>, start: u64, len: u64) -> Result<()> {
    let zeros = vec![0u8; usize::try_from(ZERO_CHUNK.min(len)).unwrap_or(0)];
    let mut done = 0u64;
    while done < len {
        let n = len.saturating_sub(done).min(ZERO_CHUNK);
        let piece = zeros
            .get(..usize::try_from(n).unwrap_or(0))
            .unwrap_or_default();
        put(start.saturating_add(done), piece)?;
        done = done.saturating_add(n);
    }
    Ok(())
}

/// `len` bytes from `start` made to read as zeros and take space: reserved by the file
/// system for `falloc` (`fallocate`, as QEMU's `posix_fallocate`), written with zeros for
/// `full`, or where the file system cannot reserve (as `posix_fallocate` falls back).
fn reserve_or_zero(
    file: &File,
    path: &Path,
    put: &Put<'_>,
    plan: &Plan,
    start: u64,
    len: u64,
) -> Result<()> {
    #[cfg(unix)]
    if plan.preallocation == Preallocation::Falloc && len > 0 {
        use rustix::fs::{fallocate, FallocateFlags};
        match fallocate(file, FallocateFlags::empty(), start, len) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => {}
            Err(e) => return Err(io_err("reserving space in", path)(e.into())),
        }
    }
    let _ = (file, plan);
    write_zeros(put, start, len)
}

/// Zeros over every data cluster (`preallocation=falloc` and `full`): one run per L2
/// table's range when tables and data alternate, one run otherwise.
fn write_zero_data(fill: &dyn Fn(u64, u64) -> Result<()>, layout: &Layout) -> Result<()> {
    let interleaved = matches!(layout.payload, Payload::Interleaved { .. });
    let mut index = 0u64;
    while index < layout.data_clusters {
        let run_end = if interleaved {
            index
                .checked_div(layout.l2_entries)
                .unwrap_or(0)
                .saturating_add(1)
                .saturating_mul(layout.l2_entries)
                .min(layout.data_clusters)
        } else {
            layout.data_clusters
        };
        let start = layout.data_offset(index);
        // The file ends where the last run ends (QEMU rounds it to a subcluster).
        let len = layout
            .offset(run_end.saturating_sub(index))
            .min(layout.file_len.saturating_sub(start));
        fill(start, len)?;
        index = run_end;
    }
    Ok(())
}

/// The external data file: as long as the guest (rounded as QEMU's preallocation rounds),
/// zeros written for `preallocation=falloc` and `full`.
fn write_data_file(file: &File, path: &Path, plan: &Plan) -> Result<()> {
    use crate::base::io::PositionalSink;

    let len = if plan.preallocation == Preallocation::Off {
        plan.size
    } else {
        round_up(plan.size, plan.data_unit())
    };
    if plan.writes_zeros() {
        let put = |at: u64, bytes: &[u8]| -> Result<()> {
            file.write_all_at(at, bytes)
                .map_err(io_err("writing", path))
        };
        reserve_or_zero(file, path, &put, plan, 0, len)?;
    }
    file.set_len(len).map_err(io_err("extending", path))?;
    file.sync_all().map_err(io_err("flushing", path))
}

fn header_for<'a>(
    options: &'a CreateOptions,
    plan: &Plan,
    layout: &Layout,
) -> Result<NewHeader<'a>> {
    let mut incompatible = 0;
    if options.data_file.is_some() {
        incompatible |= INCOMPAT_DATA_FILE;
    }
    if plan.compression.is_some() {
        incompatible |= INCOMPAT_COMPRESSION;
    }
    if plan.extended_l2 {
        incompatible |= INCOMPAT_EXTL2;
    }
    let crypt_method = match plan.encrypt {
        Some(EncryptFormat::Luks) => CRYPT_LUKS,
        Some(EncryptFormat::Aes) => CRYPT_AES,
        None => 0,
    };
    Ok(NewHeader {
        version: plan.version,
        cluster_bits: plan.cluster_bits,
        size: plan.size,
        crypt_method,
        l1_size: u32::try_from(layout.l1_size).map_err(|_| too_large())?,
        l1_table_offset: layout.offset(layout.l1_table),
        refcount_table_offset: layout.offset(layout.refcount_table),
        refcount_table_clusters: u32::try_from(layout.refcount_table_clusters)
            .map_err(|_| too_large())?,
        incompatible_features: incompatible,
        compatible_features: if options.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: if options.data_file_raw {
            AUTOCLEAR_DATA_FILE_RAW
        } else {
            0
        },
        refcount_order: plan.refcount_order,
        compression_type: plan.compression,
        backing_file: options.backing_file.as_deref(),
        backing_format: options
            .backing_file
            .as_ref()
            .and(options.backing_fmt.as_deref()),
        data_file: options.data_file.as_deref(),
        encryption: layout.luks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_qemu_reads_them() {
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("1.5M"), Some(3 << 19));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("0x200"), Some(512));
        assert_eq!(parse_size("1Q"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("16E"), None);
    }

    #[test]
    fn options_split_with_comma_escape() {
        let items = split_options("a=1,,2,b=x").unwrap();
        assert_eq!(
            items,
            vec![("a".into(), "1,2".into()), ("b".into(), "x".into())]
        );
        assert!(split_options("novalue").is_err());
    }

    #[test]
    fn refcount_entries_pack_as_qemu_reads_them() {
        let mut block = vec![0u8; 16];
        set_refcount_one(&mut block, 3, 0);
        assert_eq!(block[0], 0b1000);
        let mut block = vec![0u8; 16];
        set_refcount_one(&mut block, 1, 2);
        assert_eq!(block[0], 0x10);
        let mut block = vec![0u8; 16];
        set_refcount_one(&mut block, 1, 4);
        assert_eq!(&block[..4], &[0, 0, 0, 1]);
    }

    #[test]
    fn the_simple_layout_is_qemus() {
        let options = CreateOptions::new(1 << 30);
        let plan = Plan::check(&options, 1 << 30).unwrap();
        let layout = lay_out(&plan, false, None).unwrap();
        assert_eq!(layout.refcount_table, 1);
        assert_eq!(layout.refblocks, 2);
        assert_eq!(layout.l1_table, 3);
        assert_eq!(layout.file_len, 0x30010);
        assert_eq!(layout.allocated, vec![(0, 4)]);
    }

    #[test]
    fn run_sets_merge_and_split() {
        let mut set = RunSet::default();
        set.insert(0, 3);
        set.insert(3, 5);
        set.insert(10, 12);
        assert_eq!(set.runs(), vec![(0, 5), (10, 12)]);
        assert_eq!(set.run_end(4), Some(5));
        assert_eq!(set.run_end(5), None);
        assert_eq!(set.next_start(5), Some(10));
        set.remove(2, 11);
        assert_eq!(set.runs(), vec![(0, 2), (11, 12)]);
        set.insert(1, 20);
        assert_eq!(set.runs(), vec![(0, 20)]);
    }

    #[test]
    fn the_replayed_allocator_places_refblocks_as_qemu() {
        // 512-byte clusters, 64-bit refcounts (64 per block), a 4 GiB image: QEMU puts the
        // L1 table at cluster 3 and the blocks after it, block 32 (describing itself) first.
        let options = CreateOptions::new(4 << 30)
            .cluster_size(512)
            .refcount_bits(64);
        let plan = Plan::check(&options, 4 << 30).unwrap();
        let layout = lay_out(&plan, false, None).unwrap();
        assert_eq!(layout.l1_table, 3);
        assert_eq!(layout.refblock_cluster(1), 0x803);
        assert_eq!(layout.refblock_cluster(32), 0x804);
        assert_eq!(layout.refblock_cluster(2), 0x805);
        assert_eq!(layout.file_len, 0x104600);
    }

    #[test]
    fn shown_options_follow_qemus_order() {
        let mut options = CreateOptions::new(1 << 30);
        options.set("lazy_refcounts", "on").unwrap();
        options.set("compat", "1.1").unwrap();
        assert_eq!(
            options.describe(Some(1 << 30)),
            "fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib \
             size=1073741824 compat=1.1 lazy_refcounts=on refcount_bits=16"
        );
    }
}
