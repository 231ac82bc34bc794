//! Changing an existing image's options in place, as `qemu-img amend -o ...` does (QEMU's
//! `qcow2_amend_options`): the version (`compat`), lazy refcounts, the virtual size, the
//! external data file's name and raw flag; the backing file only as it already is; LUKS key
//! slots added or erased (`encrypt.*`, done first, in `crypt/amend.rs`).
//!
//! Every request is checked before anything changes (QEMU checks some only after earlier
//! steps were made: a refused request may leave it part-way). Then, crash-safe:
//! 1. through a [`Writer`](crate::Writer): a dirty image's refcounts repaired (as opening
//!    it for writing does), the size changed, and for a downgrade every zero cluster of the
//!    active layer written as zeros (version 2 has no zero clusters), all flushed;
//! 2. ONE write of the header (version, feature bits, extensions), then a sync.
//!
//! A crash before step 2 leaves the old header over the same guest content (a new size
//! only once its own header write is durable); after it, the new image.

use std::path::Path;

use crate::base::bytes::{be_u32, be_u64};
use crate::base::io::{be_u64_words, read_metadata, Storage};
#[cfg(feature = "encryption")]
use crate::crypt::amend::amend_key_slots;
use crate::crypt::amend::KeySlotRequest;
#[cfg(feature = "encryption")]
use crate::crypt::KdfBudget;
use crate::crypt::Secret;
use crate::error::{Error, Result};
use crate::format::extension::EXT_BITMAPS;
use crate::format::feature::{
    AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION,
    INCOMPAT_DIRTY,
};
use crate::format::header::{at, CompressionType, Header, CRYPT_LUKS};
use crate::format::header_edit::with_extension;
use crate::format::new_header::{put, NewHeader};
use crate::format::table::{l2_table_offset, ClusterType, Geometry};
use crate::image::create::{parse_bool, parse_number, size_option, split_options};
use crate::image::options::OpenOptions;
use crate::image::qcow2::Qcow2;
use crate::image::rewrite::Rewrite;

/// The refcount width version 2 images have.
const V2_REFCOUNT_ORDER: u32 = 4;

/// What [`amend`] changes: every option left unset stays as it is. The keys and values of
/// `qemu-img amend -o` are taken by [`AmendOptions::set`].
///
/// ```
/// # let dir = std::env::temp_dir().join(format!("qcow2-doc-amend-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir)?;
/// # let path = dir.join("disk.qcow2");
/// qcow2::create(&path, &qcow2::CreateOptions::new(1 << 30))?;
///
/// let options = qcow2::AmendOptions::new().compat("0.10").size(2 << 30);
/// qcow2::amend(&path, &options)?;
///
/// let image = qcow2::Qcow2::open_path(&path)?;
/// assert_eq!(image.header().version(), 2);
/// assert_eq!(image.guest_size(), 2 << 30);
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendOptions {
    compat: Option<String>,
    size: Option<u64>,
    backing_file: Option<String>,
    backing_format: Option<String>,
    data_file: Option<String>,
    data_file_raw: Option<bool>,
    lazy_refcounts: Option<bool>,
    refcount_bits: Option<u64>,
    /// The LUKS key slot options (`encrypt.*`).
    key_slots: KeySlotOptions,
}

/// A secret named by an `encrypt.*-secret` option: given, or the id of one given to
/// [`AmendOptions::secret_object`].
#[derive(Debug, Clone)]
enum SecretRef {
    Given(Secret),
    Id(String),
}

impl PartialEq for SecretRef {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (SecretRef::Id(a), SecretRef::Id(b)) => a == b,
            (SecretRef::Given(a), SecretRef::Given(b)) => std::ptr::eq(a, b),
            _ => false,
        }
    }
}

impl Eq for SecretRef {}

/// QEMU's LUKS amend options, as given (checked by [`amend_image`]).
#[derive(Debug, Clone, Default)]
struct KeySlotOptions {
    given: bool,
    state: Option<bool>,
    keyslot: Option<i64>,
    old_secret: Option<SecretRef>,
    new_secret: Option<SecretRef>,
    iter_time_ms: Option<u64>,
    /// The secrets the `*-secret` options may name by id.
    objects: Vec<(String, Secret)>,
}

/// Equal when the same is asked (the secret objects offered aside).
impl PartialEq for KeySlotOptions {
    fn eq(&self, other: &Self) -> bool {
        self.given == other.given
            && self.state == other.state
            && self.keyslot == other.keyslot
            && self.old_secret == other.old_secret
            && self.new_secret == other.new_secret
            && self.iter_time_ms == other.iter_time_ms
    }
}

impl Eq for KeySlotOptions {}

impl AmendOptions {
    /// Nothing to change yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The version: `0.10` or `v2` (version 2), `1.1` or `v3` (version 3); any other is
    /// refused by [`amend`] ("Unknown compatibility level"), as QEMU refuses it.
    pub fn compat(mut self, level: &str) -> Self {
        self.compat = Some(level.to_owned());
        self
    }

    /// The new virtual size in bytes (a multiple of 512; smaller drops the data past it,
    /// without asking, as `qemu-img amend -o size=` does). 0 leaves the size, as in QEMU.
    pub fn size(mut self, bytes: u64) -> Self {
        self.size = Some(bytes);
        self
    }

    /// Turn lazy refcounts on (version 3 only) or off (a dirty image's refcounts are
    /// repaired first).
    pub fn lazy_refcounts(mut self, on: bool) -> Self {
        self.lazy_refcounts = Some(on);
        self
    }

    /// The refcount width in bits: a power of two up to 64.
    pub fn refcount_bits(mut self, bits: u64) -> Self {
        self.refcount_bits = Some(bits);
        self
    }

    /// The backing file name: accepted only as the image already names it, together with
    /// its format (QEMU: "Cannot amend the backing file"; `rebase -u` changes it).
    pub fn backing_file(mut self, name: &str) -> Self {
        self.backing_file = Some(name.to_owned());
        self
    }

    /// The backing file's format, likewise only as it already is.
    pub fn backing_format(mut self, format: &str) -> Self {
        self.backing_format = Some(format.to_owned());
        self
    }

    /// The external data file's name, stored in the header (only for an image that has
    /// one; the empty name removes it from the header, as QEMU does).
    pub fn data_file(mut self, name: &str) -> Self {
        self.data_file = Some(name.to_owned());
        self
    }

    /// Whether the external data file stays a valid raw image: it can be turned off, and
    /// on only where it is on already.
    pub fn data_file_raw(mut self, on: bool) -> Self {
        self.data_file_raw = Some(on);
        self
    }

    /// The LUKS key slot to change (`encrypt.keyslot`, 0 to 7): without it, adding takes
    /// the first inactive slot and erasing takes every slot the old secret opens.
    pub fn encrypt_keyslot(mut self, slot: i64) -> Self {
        self.key_slots.given = true;
        self.key_slots.keyslot = Some(slot);
        self
    }

    /// Add a LUKS key slot opened by `secret` (`encrypt.state=active`,
    /// `encrypt.new-secret`): the master key is found with the secret the image was opened
    /// with.
    pub fn encrypt_add_secret(mut self, secret: impl Into<Secret>) -> Self {
        self.key_slots.given = true;
        self.key_slots.state = Some(true);
        self.key_slots.new_secret = Some(SecretRef::Given(secret.into()));
        self
    }

    /// Erase the LUKS key slots (or the one [`AmendOptions::encrypt_keyslot`] names) that
    /// `secret` opens (`encrypt.state=inactive`, `encrypt.old-secret`).
    pub fn encrypt_erase_secret(mut self, secret: impl Into<Secret>) -> Self {
        self.key_slots.given = true;
        self.key_slots.state = Some(false);
        self.key_slots.old_secret = Some(SecretRef::Given(secret.into()));
        self
    }

    /// Erase the LUKS key slot [`AmendOptions::encrypt_keyslot`] names, whatever secret
    /// opens it (`encrypt.state=inactive`).
    pub fn encrypt_erase(mut self) -> Self {
        self.key_slots.given = true;
        self.key_slots.state = Some(false);
        self
    }

    /// The time PBKDF2 should take to open a new key slot (`encrypt.iter-time`; QEMU's
    /// default is 2 s), which sets its iteration count on this machine.
    pub fn encrypt_iter_time(mut self, time: std::time::Duration) -> Self {
        self.key_slots.given = true;
        self.key_slots.iter_time_ms = Some(u64::try_from(time.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// A secret that `encrypt.old-secret=ID` and `encrypt.new-secret=ID` given to
    /// [`AmendOptions::set`] may name, as `qemu-img` takes `--object secret,id=ID,data=...`.
    ///
    /// ```
    /// let mut options = qcow2::AmendOptions::new().secret_object("sec1", "new passphrase");
    /// options.set_all("encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10")?;
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn secret_object(mut self, id: &str, secret: impl Into<Secret>) -> Self {
        self.key_slots.objects.push((id.to_owned(), secret.into()));
        self
    }

    /// Whether no option is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Set one option as `qemu-img amend -o KEY=VALUE` spells it, with its messages for
    /// values it cannot parse and for options only `create` takes.
    ///
    /// ```
    /// let mut options = qcow2::AmendOptions::new();
    /// options.set("lazy_refcounts", "on")?;
    /// options.set_all("compat=1.1,size=1G")?;
    /// let e = options.set("cluster_size", "4k").unwrap_err();
    /// assert_eq!(
    ///     e.to_string(),
    ///     "Invalid parameter 'cluster_size'\nThis option is only supported for image creation"
    /// );
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        match key {
            "compat" => self.compat = Some(value.to_owned()),
            "size" => self.size = Some(size_option(key, value)?),
            "backing_file" => self.backing_file = Some(value.to_owned()),
            "backing_fmt" => self.backing_format = Some(value.to_owned()),
            "data_file" => self.data_file = Some(value.to_owned()),
            "data_file_raw" => self.data_file_raw = Some(parse_bool(key, value)?),
            "lazy_refcounts" => self.lazy_refcounts = Some(parse_bool(key, value)?),
            "refcount_bits" => self.refcount_bits = Some(parse_number(key, value)?),
            _ if LUKS_AMEND.contains(&key) => self.key_slots.set(key, value)?,
            _ if CREATE_ONLY.contains(&key) || key.starts_with("encrypt.") => {
                return Err(invalid(
                    key,
                    format!(
                        "Invalid parameter '{key}'\nThis option is only supported for image \
                         creation"
                    ),
                ))
            }
            _ => return Err(invalid(key, format!("Invalid parameter '{key}'"))),
        }
        Ok(())
    }

    /// Set every option of a `-o` string, `key=value,key=value` (`,,` is a comma in a value).
    pub fn set_all(&mut self, text: &str) -> Result<()> {
        for (key, value) in split_options(text)? {
            self.set(&key, &value)?;
        }
        Ok(())
    }
}

/// The LUKS key slot options QEMU amends.
const LUKS_AMEND: [&str; 5] = [
    "encrypt.state",
    "encrypt.keyslot",
    "encrypt.old-secret",
    "encrypt.new-secret",
    "encrypt.iter-time",
];

impl KeySlotOptions {
    /// One `encrypt.*` key slot option, with QEMU's messages for values it cannot parse.
    fn set(&mut self, key: &str, value: &str) -> Result<()> {
        self.given = true;
        let number = || {
            value
                .parse::<i64>()
                .map_err(|_| invalid(key, format!("Parameter '{key}' expects a number")))
        };
        match key {
            "encrypt.state" => {
                self.state = Some(match value {
                    "active" => true,
                    "inactive" => false,
                    _ => {
                        return Err(invalid(
                            key,
                            format!("Parameter 'state' does not accept value '{value}'"),
                        ))
                    }
                })
            }
            "encrypt.keyslot" => self.keyslot = Some(number()?),
            "encrypt.old-secret" => self.old_secret = Some(SecretRef::Id(value.to_owned())),
            "encrypt.new-secret" => self.new_secret = Some(SecretRef::Id(value.to_owned())),
            _ => {
                let ms = u64::try_from(number()?)
                    .map_err(|_| invalid(key, format!("Parameter '{key}' expects a number")))?;
                self.iter_time_ms = Some(ms);
            }
        }
        Ok(())
    }

    /// The secret `reference` names, or QEMU's message for an unknown id.
    fn resolve(&self, reference: &Option<SecretRef>) -> Result<Option<Secret>> {
        match reference {
            None => Ok(None),
            Some(SecretRef::Given(secret)) => Ok(Some(secret.clone())),
            Some(SecretRef::Id(id)) => self
                .objects
                .iter()
                .rev()
                .find(|(name, _)| name == id)
                .map(|(_, secret)| Some(secret.clone()))
                .ok_or_else(|| invalid("encrypt", format!("No secret with id '{id}'"))),
        }
    }

    /// The checked request: QEMU's refusals for images without LUKS, then for a missing
    /// state, then the secrets looked up.
    fn request(&self, h: &Header) -> Result<Option<KeySlotRequest>> {
        if !self.given {
            return Ok(None);
        }
        match h.crypt_method() {
            0 => {
                return Err(invalid(
                    "encrypt",
                    "Can't amend encryption options - encryption not present",
                ))
            }
            CRYPT_LUKS => {}
            _ => {
                return Err(invalid(
                    "encrypt",
                    "Only LUKS encryption options can be amended",
                ))
            }
        }
        let Some(active) = self.state else {
            return Err(invalid("encrypt.state", "Parameter 'state' is missing"));
        };
        Ok(Some(KeySlotRequest {
            active,
            keyslot: self.keyslot,
            old_secret: self.resolve(&self.old_secret)?,
            new_secret: self.resolve(&self.new_secret)?,
            iter_time_ms: self.iter_time_ms,
        }))
    }
}

/// The options `qemu-img create` takes for qcow2 that amend refuses as creation-only
/// (and every other `encrypt.*`).
const CREATE_ONLY: [&str; 7] = [
    "cluster_size",
    "extended_l2",
    "preallocation",
    "compression_type",
    "encryption",
    "nocow",
    "extent_size_hint",
];

fn invalid(option: &str, message: impl Into<String>) -> Error {
    Error::InvalidOption {
        option: option.to_owned(),
        message: message.into(),
    }
}

/// Amend the image at `path` (opened for writing, locked; its backing files are not
/// needed). See [`AmendOptions`] and [`amend_image`].
pub fn amend(path: impl AsRef<Path>, options: &AmendOptions) -> Result<()> {
    let open = OpenOptions::new().write(true);
    let image = Qcow2::open_path_with(path.as_ref(), &open)?;
    amend_image(image, options).map(drop)
}

/// Amend an image opened for writing ([`OpenOptions::write`]), as `qemu-img amend` does, and
/// give it back (read-only) as it now is. Refused requests change nothing and give QEMU's
/// message ([`Error::InvalidOption`]), or [`Error::UnsupportedWrite`] for what this crate
/// does not do (changing the refcount width, downgrading an image with bitmaps or with
/// zero clusters in its snapshots).
pub fn amend_image<S: Storage>(image: Qcow2<S>, options: &AmendOptions) -> Result<Qcow2<S>> {
    if !image.writable {
        return Err(Error::ReadOnly);
    }
    let plan = Plan::new(&image, options)?;
    if let Some(request) = &plan.key_slots {
        change_key_slots(&image, request)?;
    }
    let zeros = match plan.downgrade {
        true => zero_clusters(&image, plan.size)?,
        false => Vec::new(),
    };
    let mut image = if plan.needs_writer(&image.header, &zeros) {
        rewrite_guest(image, &plan, &zeros)?
    } else {
        image
    };
    write_header(&image, &plan)?;
    image.reload()?;
    Ok(image)
}

/// The LUKS key slots added or erased (QEMU amends them before the other options).
#[cfg(feature = "encryption")]
fn change_key_slots<S: Storage>(image: &Qcow2<S>, request: &KeySlotRequest) -> Result<()> {
    let ext = image
        .header
        .encryption()
        .ok_or(Error::Internal("a LUKS image without its header extension"))?;
    let unlock = image.crypt.as_ref().and_then(|c| c.secret.as_ref());
    let kdf = KdfBudget::new(image.limits.max_kdf_blocks);
    amend_key_slots(&image.io, ext, unlock, request, &kdf)
}

/// Without the `encryption` feature, no key slot is changed.
#[cfg(not(feature = "encryption"))]
fn change_key_slots<S: Storage>(_: &Qcow2<S>, _: &KeySlotRequest) -> Result<()> {
    Err(Error::FeatureDisabled {
        feature: "encryption",
    })
}

/// What an amend does, checked.
#[derive(Debug)]
struct Plan {
    version: u32,
    size: u64,
    downgrade: bool,
    lazy_refcounts: bool,
    data_file: Option<Option<String>>,
    data_file_raw: bool,
    /// A new refcount width (its order), when it changes.
    refcount_order: Option<u32>,
    /// The LUKS key slot change, done first.
    key_slots: Option<KeySlotRequest>,
}

impl Plan {
    /// The checks of QEMU's `qcow2_amend_options`, `qcow2_upgrade` and `qcow2_downgrade`.
    fn new<S: Storage>(image: &Qcow2<S>, o: &AmendOptions) -> Result<Plan> {
        let h = &image.header;
        let key_slots = o.key_slots.request(h)?;
        let old_version = h.version();
        let version = match o.compat.as_deref() {
            None => old_version,
            Some("0.10" | "v2") => 2,
            Some("1.1" | "v3") => 3,
            Some(other) => {
                return Err(invalid(
                    "compat",
                    format!("Unknown compatibility level {other}"),
                ))
            }
        };
        let size = match o.size {
            Some(size) if size != 0 => size,
            _ => image.guest_size(),
        };
        if o.data_file.is_some() && !h.has_data_file_bit() {
            return Err(invalid(
                "data_file",
                "data-file can only be set for images that use an external data file",
            ));
        }
        if o.data_file_raw == Some(true) && !h.is_data_file_raw() {
            return Err(invalid(
                "data_file_raw",
                "data-file-raw cannot be set on existing images",
            ));
        }
        let refcount_bits = o.refcount_bits.unwrap_or(u64::from(h.refcount_bits()));
        if refcount_bits == 0 || refcount_bits > 64 || !refcount_bits.is_power_of_two() {
            return Err(invalid(
                "refcount_bits",
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if version > old_version {
            refuse_snapshots_without_v3_fields(image)?;
        }
        let width_changes = refcount_bits != u64::from(h.refcount_bits());
        if width_changes && version < 3 && refcount_bits != 16 {
            return Err(invalid(
                "refcount_bits",
                "Refcount widths other than 16 bits require compatibility level 1.1 or \
                 above (use compat=1.1 or greater)",
            ));
        }
        check_backing(h, o)?;
        let lazy_refcounts = o.lazy_refcounts.unwrap_or(h.has_lazy_refcounts());
        if lazy_refcounts && !h.has_lazy_refcounts() && version < 3 {
            return Err(invalid(
                "lazy_refcounts",
                "Lazy refcounts only supported with compatibility level 1.1 and above (use \
                 compat=1.1 or greater)",
            ));
        }
        if size % 512 != 0 {
            return Err(invalid("size", "The new size must be a multiple of 512"));
        }
        // A power of two up to 64: its order is 0 to 6.
        let refcount_order = refcount_bits.trailing_zeros();
        let downgrade = version < old_version;
        if downgrade {
            check_downgrade(image, size, refcount_order)?;
        }
        Ok(Plan {
            version,
            size,
            downgrade,
            lazy_refcounts: lazy_refcounts && version >= 3,
            data_file: o
                .data_file
                .as_ref()
                .map(|name| Some(name.clone()).filter(|n| !n.is_empty())),
            data_file_raw: o.data_file_raw.unwrap_or(h.is_data_file_raw()),
            refcount_order: (refcount_order != h.refcount_order()).then_some(refcount_order),
            key_slots,
        })
    }

    /// Whether the guest or the refcounts change (else only the header does).
    fn needs_writer(&self, h: &Header, zeros: &[u64]) -> bool {
        self.size != h.size() || !zeros.is_empty() || h.is_dirty()
    }
}

/// Version 3 requires each snapshot's disk size; QEMU writes the table again to add it, which
/// is not done here.
fn refuse_snapshots_without_v3_fields<S>(image: &Qcow2<S>) -> Result<()> {
    if image.snapshots.iter().any(|s| s.disk_size.is_none()) {
        return Err(Error::UnsupportedWrite {
            what: "upgrading an image whose snapshots lack the version 3 fields (their table \
                   would be written again)"
                .to_owned(),
        });
    }
    Ok(())
}

/// QEMU amends the backing file only to what it is: the name and the format both as the
/// header has them.
fn check_backing(h: &Header, o: &AmendOptions) -> Result<()> {
    if o.backing_file.is_none() && o.backing_format.is_none() {
        return Ok(());
    }
    if o.backing_file.as_deref() != h.backing_file()
        || o.backing_format.as_deref() != h.backing_format()
    {
        return Err(invalid(
            "backing_file",
            "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
        ));
    }
    Ok(())
}

/// What QEMU's `qcow2_downgrade` refuses, and what this crate does not downgrade.
fn check_downgrade<S: Storage>(image: &Qcow2<S>, size: u64, refcount_order: u32) -> Result<()> {
    let h = &image.header;
    if refcount_order != V2_REFCOUNT_ORDER {
        return Err(invalid("compat", "compat=0.10 requires refcount_bits=16"));
    }
    if h.has_data_file_bit() {
        return Err(invalid(
            "compat",
            "Cannot downgrade an image with a data file",
        ));
    }
    let unsafe_snapshot = image
        .snapshots
        .iter()
        .any(|s| s.vm_state_size > u64::from(u32::MAX) || s.disk_size != Some(size));
    if unsafe_snapshot {
        return Err(invalid(
            "compat",
            "Internal snapshots prevent downgrade of image",
        ));
    }
    let incompatible = h.incompatible_features() & !INCOMPAT_DIRTY & !INCOMPAT_COMPRESSION;
    if incompatible != 0 {
        return Err(invalid(
            "compat",
            format!("Cannot downgrade an image with incompatible features {incompatible:#x} set"),
        ));
    }
    if !image.bitmaps.is_empty() || h.bitmaps().is_some() {
        return Err(Error::UnsupportedWrite {
            what: "downgrading an image with persistent dirty bitmaps (version 2 cannot keep \
                   them: remove them first)"
                .to_owned(),
        });
    }
    if h.compression_type() == CompressionType::Zstd && has_compressed_clusters(image)? {
        return Err(invalid(
            "compat",
            "Cannot downgrade an image with zstd compression type and existing compressed \
             clusters",
        ));
    }
    if snapshots_have_zero_clusters(image)? {
        return Err(Error::UnsupportedWrite {
            what: "downgrading an image whose snapshots hold zero clusters".to_owned(),
        });
    }
    Ok(())
}

/// The L2 entries of the L1 table `l1` (entries at `l1_at` in the file), with the guest
/// offset each maps.
fn for_each_entry<S: Storage>(
    image: &Qcow2<S>,
    l1: &[u64],
    l1_at: u64,
    mut each: impl FnMut(u64, u64) -> Result<bool>,
) -> Result<()> {
    let g: &Geometry = &image.geometry;
    let cluster = image.cluster_size();
    for (index, entry) in l1.iter().enumerate() {
        let entry_at = l1_at.saturating_add((index as u64).saturating_mul(8));
        let Some(table) = l2_table_offset(*entry, g, entry_at)? else {
            continue;
        };
        let bytes = read_metadata(&image.io, table, cluster, "L2 table")?;
        let first = (index as u64) << g.l2_bits();
        for (i, word) in be_u64_words(&bytes).enumerate() {
            let guest = first.saturating_add((i as u64) << g.cluster_bits);
            if !each(guest, word)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The guest offsets of the active layer's zero clusters below `size`.
fn zero_clusters<S: Storage>(image: &Qcow2<S>, size: u64) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    let l1_at = image.header.l1_table_offset();
    for_each_entry(image, &image.l1, l1_at, |guest, word| {
        let zero = matches!(
            image.geometry.cluster_type(word),
            ClusterType::ZeroPlain | ClusterType::ZeroAlloc
        );
        if zero && guest < size {
            out.push(guest);
        }
        Ok(true)
    })?;
    Ok(out)
}

fn has_compressed_clusters<S: Storage>(image: &Qcow2<S>) -> Result<bool> {
    let mut found = false;
    let l1_at = image.header.l1_table_offset();
    for_each_entry(image, &image.l1, l1_at, |guest, word| {
        found = guest < image.guest_size()
            && image.geometry.cluster_type(word) == ClusterType::Compressed;
        Ok(!found)
    })?;
    Ok(found)
}

fn snapshots_have_zero_clusters<S: Storage>(image: &Qcow2<S>) -> Result<bool> {
    let mut found = false;
    for snapshot in &image.snapshots {
        let len = u64::from(snapshot.l1_size).saturating_mul(8);
        crate::base::limits::Limits::check("snapshot L1 table", len, image.limits.max_l1_bytes)?;
        let raw = read_metadata(
            &image.io,
            snapshot.l1_table_offset,
            len,
            "snapshot L1 table",
        )?;
        let l1: Vec<u64> = be_u64_words(&raw).collect();
        for_each_entry(image, &l1, snapshot.l1_table_offset, |_, word| {
            found = matches!(
                image.geometry.cluster_type(word),
                ClusterType::ZeroPlain | ClusterType::ZeroAlloc
            );
            Ok(!found)
        })?;
        if found {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Step 1: through a writer, the size changed and the zero clusters written as zeros (the
/// writer repairs a dirty image's refcounts when it opens it, and flushes at close).
fn rewrite_guest<S: Storage>(image: Qcow2<S>, plan: &Plan, zeros: &[u64]) -> Result<Qcow2<S>> {
    let writer = image.into_writer()?;
    if plan.size != writer.guest_size() {
        writer.resize(plan.size)?;
    }
    let cluster = writer.cluster_size();
    let buffer = vec![0u8; usize::try_from(cluster).unwrap_or(0)];
    for &guest in zeros {
        let len = cluster.min(plan.size.saturating_sub(guest));
        let data = buffer
            .get(..usize::try_from(len).unwrap_or(0))
            .unwrap_or_default();
        writer.write_all_at(guest, data)?;
    }
    writer.flush()?;
    let mut image = writer.close()?;
    // Still the file opened (and locked) for writing: the header is written next.
    image.writable = true;
    Ok(image)
}

/// Step 2: the header as QEMU's `qcow2_update_header` writes it with the new version and
/// features, written in one piece (only the bytes that change), then a sync; with a new
/// refcount width, every refcount first written again at that width into free clusters
/// (a [`Rewrite`]), which the same header write switches to.
fn write_header<S: Storage>(image: &Qcow2<S>, plan: &Plan) -> Result<()> {
    let cluster = image.cluster_size();
    let Some(order) = plan.refcount_order else {
        let file_len = image
            .io
            .length()
            .map_err(|e| Error::io("reading the image file's length", e))?;
        let old = read_metadata(&image.io, 0, cluster.min(file_len), "header")?;
        let new = amended_header(&image.header, plan, cluster, RefcountFields::read(&old)?)?;
        return write_changed_bytes(&image.io, &old, &new);
    };
    let mut rewrite = Rewrite::new(image)?;
    check_refcounts_fit(image, &rewrite, order)?;
    rewrite.set_refcount_order(order);
    rewrite.commit(|bytes| {
        let refcounts = RefcountFields::read(bytes)?;
        *bytes = amended_header(&image.header, plan, cluster, refcounts)?;
        Ok(())
    })
}

/// Write the bytes from the first that differs between `old` and `new` to the last, in one
/// write, then a sync (nothing when none differs).
fn write_changed_bytes<S: Storage>(io: &S, old: &[u8], new: &[u8]) -> Result<()> {
    let first = old.iter().zip(new).position(|(a, b)| a != b);
    let last = old.iter().zip(new).rposition(|(a, b)| a != b);
    let (Some(first), Some(last)) = (first, last) else {
        return Ok(());
    };
    let changed = new
        .get(first..=last)
        .ok_or(Error::Internal("the header changed past its cluster"))?;
    io.write_all_at(first as u64, changed)
        .map_err(|e| Error::io("writing the header", e))?;
    io.sync()
        .map_err(|e| Error::io("making the header durable", e))
}

/// QEMU's refusal to narrow the refcounts below a count in use (the first such cluster).
fn check_refcounts_fit<S: Storage>(
    image: &Qcow2<S>,
    rewrite: &Rewrite<'_, S>,
    order: u32,
) -> Result<()> {
    let bits = 1u64 << order;
    let max = u64::MAX >> 64u64.saturating_sub(bits);
    let file_len = image
        .io
        .length()
        .map_err(|e| Error::io("reading the image file's length", e))?;
    let cluster = image.cluster_size();
    let mut offset = 0;
    while offset < file_len {
        let count = rewrite.refcount(offset);
        if count > max {
            return Err(invalid(
                "refcount_bits",
                format!(
                    "Cannot decrease refcount entry width to {bits} bits: Cluster at offset \
                     {offset:#x} has a refcount of {count}"
                ),
            ));
        }
        offset = offset.saturating_add(cluster);
    }
    Ok(())
}

/// The refcount fields of a header: where the table is, its clusters, and the width.
#[derive(Debug, Clone, Copy)]
struct RefcountFields {
    table_offset: u64,
    table_clusters: u32,
    order: u32,
}

impl RefcountFields {
    fn read(bytes: &[u8]) -> Result<Self> {
        let short = || Error::Internal("the header is too short for its refcount fields");
        Ok(RefcountFields {
            table_offset: be_u64(bytes, at::REFCOUNT_TABLE_OFFSET as usize).ok_or_else(short)?,
            table_clusters: be_u32(bytes, at::REFCOUNT_TABLE_CLUSTERS as usize)
                .ok_or_else(short)?,
            // Version 2 headers have no field: 16 bits.
            order: be_u32(bytes, at::REFCOUNT_ORDER as usize)
                .filter(|_| be_u32(bytes, at::VERSION as usize) == Some(3))
                .unwrap_or(V2_REFCOUNT_ORDER),
        })
    }
}

/// The first cluster of the amended image (pure).
fn amended_header(
    h: &Header,
    plan: &Plan,
    cluster: u64,
    refcounts: RefcountFields,
) -> Result<Vec<u8>> {
    let v3 = plan.version >= 3;
    let backing_file = match (h.backing_file_bytes(), h.backing_file()) {
        (Some(_), None) => {
            return Err(Error::UnsupportedWrite {
                what: "rewriting a header whose backing file name is not UTF-8".to_owned(),
            })
        }
        (_, name) => name,
    };
    let data_file = match &plan.data_file {
        Some(name) => name.as_deref(),
        None => h.data_file(),
    };
    let mut autoclear = 0;
    if v3 && plan.data_file_raw {
        autoclear |= AUTOCLEAR_DATA_FILE_RAW;
    }
    let fields = NewHeader {
        version: plan.version,
        cluster_bits: h.cluster_bits(),
        size: h.size(),
        crypt_method: h.crypt_method(),
        l1_size: h.l1_size(),
        l1_table_offset: h.l1_table_offset(),
        refcount_table_offset: refcounts.table_offset,
        refcount_table_clusters: refcounts.table_clusters,
        incompatible_features: if v3 { h.incompatible_features() } else { 0 },
        compatible_features: if plan.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: autoclear,
        refcount_order: plan.refcount_order.unwrap_or(refcounts.order),
        compression_type: v3.then(|| h.compression_type()),
        backing_file,
        backing_format: h.backing_format(),
        data_file,
        encryption: h.encryption().map(|e| (e.offset, e.length)),
    };
    let mut out = fields.encode()?;
    put(&mut out, at::NB_SNAPSHOTS, &h.nb_snapshots().to_be_bytes());
    put(
        &mut out,
        at::SNAPSHOTS_OFFSET,
        &h.snapshots_offset().to_be_bytes(),
    );
    if let (true, Some(b)) = (v3, h.bitmaps()) {
        let mut data = b.nb_bitmaps.to_be_bytes().to_vec();
        data.extend(0u32.to_be_bytes());
        data.extend(b.directory_size.to_be_bytes());
        data.extend(b.directory_offset.to_be_bytes());
        let kept = h.autoclear_features() & AUTOCLEAR_BITMAPS;
        out = with_extension(&out, EXT_BITMAPS, Some(&data), kept, 0)?;
    }
    out.resize(usize::try_from(cluster).unwrap_or(out.len()), 0);
    Ok(out)
}
