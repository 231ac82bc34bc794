//! Encrypted images: the secret, what `qemu-img info` reports, and decryption of data clusters.
//!
//! `crypt_method` 1 is QEMU's legacy AES-CBC ([`legacy`]); 2 is LUKS1 with its header inside
//! the image, found through the full-disk-encryption header extension ([`luks`]). The header
//! is parsed and checked at open whether or not a secret is given, so an image opens for its
//! metadata without one; with one, the key is unlocked at open and every data cluster read is
//! decrypted 512 bytes at a time ([`cipher`]). Compressed clusters are not decrypted: QEMU
//! writes them unencrypted even in encrypted images, and reads them so.

// Without the `encryption` feature the secret and the IV rules are kept but unused.
#![cfg_attr(not(feature = "encryption"), allow(dead_code))]

pub(crate) mod amend;
#[cfg(feature = "encryption")]
mod cipher;
pub(crate) mod create;
#[cfg(feature = "encryption")]
mod hash;
mod legacy;
pub(crate) mod luks;
mod names;

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use positioned_io::ReadAt;

use crate::base::io::read_metadata;
use crate::base::limits::Limits;
use crate::error::{Error, Result};
use crate::format::header::Header;

/// QEMU encrypts qcow2 data in 512-byte sectors, each with its own IV.
pub(crate) use crate::base::SECTOR as SECTOR_SIZE;

pub use create::LuksOptions;

/// A secret (passphrase) for an encrypted image, as `qemu-img` takes it from
/// `--object secret,id=ID,data=...`.
///
/// The bytes are zeroed when the last copy is dropped and never shown by `Debug`. Like QEMU,
/// which takes an image's passphrase as UTF-8 text, a secret that is not valid UTF-8 (or holds
/// a NUL byte) unlocks nothing: opening an encrypted image with it fails with
/// [`Error::SecretNotUtf8`]. Legacy AES uses at most the secret's first 16 bytes.
///
/// ```
/// // From a file, as `qemu-img --object secret,id=s0,file=PATH` takes it.
/// # let path = std::env::temp_dir().join(format!("qcow2-doc-secret-{}", std::process::id()));
/// # std::fs::write(&path, "abc")?;
/// let secret = qcow2::Secret::new(std::fs::read(&path)?);
/// # std::fs::remove_file(&path)?;
/// assert_eq!(format!("{secret:?}"), "Secret(..)"); // never shown
/// let options = qcow2::OpenOptions::new().secret(secret);
/// let image = qcow2::Qcow2::open_path_with("fixtures/luks.qcow2", &options)?;
/// # #[cfg(feature = "encryption")] // unlocked only where the crate decrypts
/// assert!(image.is_unlocked());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Secret(Arc<SecretBytes>);

/// The bytes behind a [`Secret`], zeroed on drop.
struct SecretBytes(Vec<u8>);

impl Drop for SecretBytes {
    fn drop(&mut self) {
        // The whole allocation, spare capacity included.
        #[cfg(feature = "encryption")]
        zeroize::Zeroize::zeroize(&mut self.0);
        #[cfg(not(feature = "encryption"))]
        {
            // Without zeroize: clear, and keep the optimizer from dropping the writes.
            self.0.fill(0);
            std::hint::black_box(&mut self.0);
        }
    }
}

impl Secret {
    /// A secret from its bytes (a `&str`, `String`, `&[u8]` or `Vec<u8>` also converts
    /// into one with `into()`).
    ///
    /// ```
    /// let secret = qcow2::Secret::new("abc");
    /// let options = qcow2::OpenOptions::new().secret(secret); // or .secret("abc")
    /// let image = qcow2::Qcow2::open_path_with("fixtures/luks.qcow2", &options)?;
    /// # #[cfg(feature = "encryption")] // unlocked only where the crate decrypts
    /// assert!(image.is_unlocked());
    /// # Ok::<(), qcow2::Error>(())
    /// ```
    #[must_use]
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(Arc::new(SecretBytes(bytes.into())))
    }

    /// The passphrase, as QEMU's `qcrypto_secret_lookup_as_utf8` gives it to LUKS and legacy
    /// AES: refused unless it is valid UTF-8 without a NUL byte (glib's `g_utf8_validate`,
    /// given the length, fails on a NUL).
    pub(crate) fn passphrase(&self) -> Result<&str> {
        let bytes = &self.0 .0;
        match std::str::from_utf8(bytes) {
            Ok(text) if !text.contains('\0') => Ok(text),
            _ => Err(Error::SecretNotUtf8),
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl From<Vec<u8>> for Secret {
    fn from(bytes: Vec<u8>) -> Self {
        Secret::new(bytes)
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret::new(s.as_bytes())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret::new(s.into_bytes())
    }
}

impl From<&String> for Secret {
    fn from(s: &String) -> Self {
        Secret::new(s.as_bytes())
    }
}

impl From<&[u8]> for Secret {
    fn from(bytes: &[u8]) -> Self {
        Secret::new(bytes)
    }
}

impl<const N: usize> From<&[u8; N]> for Secret {
    fn from(bytes: &[u8; N]) -> Self {
        Secret::new(&bytes[..])
    }
}

impl From<&Vec<u8>> for Secret {
    fn from(bytes: &Vec<u8>) -> Self {
        Secret::new(bytes.as_slice())
    }
}

impl<const N: usize> From<[u8; N]> for Secret {
    fn from(bytes: [u8; N]) -> Self {
        Secret::new(bytes)
    }
}

impl From<Box<[u8]>> for Secret {
    fn from(bytes: Box<[u8]>) -> Self {
        Secret::new(bytes)
    }
}

impl From<&Secret> for Secret {
    fn from(secret: &Secret) -> Self {
        secret.clone()
    }
}

/// The PBKDF2 work one open may still do (in blocks: see
/// [`Limits::max_kdf_blocks`](crate::Limits::max_kdf_blocks)), shared by every image of the
/// chain it opens.
#[derive(Debug, Clone)]
pub(crate) struct KdfBudget {
    limit: u64,
    spent: Arc<AtomicU64>,
}

impl KdfBudget {
    /// A budget of `limit` blocks, none spent.
    pub(crate) fn new(limit: u64) -> Self {
        KdfBudget {
            limit,
            spent: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Count `work` blocks about to be computed, or refuse them (counting nothing) when they
    /// would take the open past its limit.
    pub(crate) fn spend(&self, work: u64) -> Result<()> {
        let limit = self.limit;
        self.spent
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |spent| {
                let total = spent.saturating_add(work);
                (total <= limit).then_some(total)
            })
            .map(drop)
            .or_else(|spent| {
                Limits::check_in(
                    "PBKDF2 blocks",
                    "LUKS key derivation for this open (every key slot tried, in every image of the chain)",
                    spent.saturating_add(work),
                    limit,
                )
            })
    }

    /// The blocks spent so far.
    #[cfg(test)]
    pub(crate) fn spent(&self) -> u64 {
        self.spent.load(Ordering::SeqCst)
    }
}

/// The signature of a per-file secret callback: the path of an image of the chain (as opened)
/// to its secret, or `None` to fall back to [`OpenOptions::secret`](crate::OpenOptions::secret).
pub type SecretFn = dyn Fn(&Path) -> Option<Secret> + Send + Sync;

/// A per-file secret callback for [`OpenOptions`](crate::OpenOptions).
#[derive(Clone)]
pub struct SecretCallback(pub(crate) Arc<SecretFn>);

impl fmt::Debug for SecretCallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretCallback(..)")
    }
}

/// What `qemu-img info --output=json` prints under `format-specific.data.encrypt`.
///
/// Legacy AES images have only [`format`](Self::format) (`"aes"`); LUKS images have the rest.
/// With the `serde` feature it serializes with `qemu-img`'s field names.
///
/// ```
/// let image = qcow2::Qcow2::open_path("fixtures/luks.qcow2")?;
/// let info = image.encryption().expect("an encrypted image");
/// assert_eq!(info.format, "luks");
/// assert_eq!(info.cipher_alg.as_deref(), Some("aes-128"));
/// assert!(info.slots[0].active);
/// # Ok::<(), qcow2::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct EncryptionInfo {
    // Declared in the order `qemu-img` prints them (its QDict hash order), so serializing
    // gives qemu-img's text.
    /// IV generator: `plain64`, `plain` or `essiv`.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "ivgen-alg", skip_serializing_if = "Option::is_none")
    )]
    pub ivgen_alg: Option<String>,
    /// Whether the LUKS header is detached (never, in qcow2).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "detached-header", skip_serializing_if = "Option::is_none")
    )]
    pub detached_header: Option<bool>,
    /// Hash of PBKDF2 and of the anti-forensic splitter.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "hash-alg", skip_serializing_if = "Option::is_none")
    )]
    pub hash_alg: Option<String>,
    /// Cipher and key size, e.g. `aes-256`.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "cipher-alg", skip_serializing_if = "Option::is_none")
    )]
    pub cipher_alg: Option<String>,
    /// The LUKS volume UUID.
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub uuid: Option<String>,
    /// The ESSIV hash (only with `essiv`).
    #[cfg_attr(
        feature = "serde",
        serde(rename = "ivgen-hash-alg", skip_serializing_if = "Option::is_none")
    )]
    pub ivgen_hash_alg: Option<String>,
    /// `"luks"` or `"aes"`.
    pub format: &'static str,
    /// Block mode: `xts`, `cbc`, `ecb` or `ctr`.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "cipher-mode", skip_serializing_if = "Option::is_none")
    )]
    pub cipher_mode: Option<String>,
    /// The eight LUKS key slots (empty for AES).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Vec::is_empty"))]
    pub slots: Vec<KeySlotInfo>,
    /// The LUKS payload offset, in bytes.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "payload-offset", skip_serializing_if = "Option::is_none")
    )]
    pub payload_offset: Option<u64>,
    /// PBKDF2 iterations of the master-key digest.
    #[cfg_attr(
        feature = "serde",
        serde(rename = "master-key-iters", skip_serializing_if = "Option::is_none")
    )]
    pub master_key_iters: Option<u64>,
}

/// One LUKS key slot, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct KeySlotInfo {
    /// Whether the slot holds a key.
    pub active: bool,
    /// PBKDF2 iterations (active slots only).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub iters: Option<u32>,
    /// Where the slot's key material starts, in bytes from the start of the LUKS header.
    #[cfg_attr(feature = "serde", serde(rename = "key-offset"))]
    pub key_offset: u64,
    /// Anti-forensic stripes (active slots only).
    #[cfg_attr(feature = "serde", serde(skip_serializing_if = "Option::is_none"))]
    pub stripes: Option<u32>,
}

/// An image's encryption: what it is, and the unlocked key once a secret opened it.
pub(crate) struct Encryption {
    pub(crate) info: EncryptionInfo,
    /// The header's `crypt_method`.
    method: u32,
    /// Whether IVs count host sectors (LUKS) or guest sectors (legacy AES): QEMU's
    /// `crypt_physical_offset`.
    physical: bool,
    /// The payload cipher, once unlocked.
    #[cfg(feature = "encryption")]
    key: Option<cipher::SectorCipher>,
    /// The secret that unlocked a LUKS image: amending its key slots finds the master key
    /// with it again, as QEMU does.
    #[cfg(feature = "encryption")]
    pub(crate) secret: Option<Secret>,
    /// Whether a secret was given, which this build cannot use.
    #[cfg(not(feature = "encryption"))]
    secret_given: bool,
}

impl Encryption {
    /// Open the encryption of an image whose header says it is encrypted; `None` otherwise.
    ///
    /// Unlocking a LUKS image draws on `kdf`, the PBKDF2 budget of the open.
    pub(crate) fn open<I: ReadAt>(
        io: &I,
        header: &Header,
        secret: Option<&Secret>,
        limits: &Limits,
        kdf: &KdfBudget,
    ) -> Result<Option<Self>> {
        #[cfg(not(feature = "encryption"))]
        let _ = kdf;
        match header.crypt_method() {
            0 => Ok(None),
            1 => {
                #[cfg(feature = "encryption")]
                let key = secret.map(legacy::unlock).transpose()?;
                Ok(Some(Encryption {
                    info: legacy::info(),
                    method: 1,
                    physical: false,
                    #[cfg(feature = "encryption")]
                    key,
                    #[cfg(feature = "encryption")]
                    secret: None,
                    #[cfg(not(feature = "encryption"))]
                    secret_given: secret.is_some(),
                }))
            }
            _ => {
                let ext = header.encryption().ok_or_else(|| {
                    Error::malformed(
                        "crypt_method 2 (LUKS) without the full disk encryption header extension",
                        32,
                    )
                })?;
                Limits::check("LUKS header area", ext.length, limits.max_luks_header_bytes)?;
                if ext.length < luks::HEADER_LEN {
                    return Err(Error::malformed(
                        format!(
                            "LUKS header area of {} bytes is shorter than a LUKS header",
                            ext.length
                        ),
                        ext.offset,
                    ));
                }
                let bytes = read_metadata(io, ext.offset, luks::HEADER_LEN, "LUKS header")?;
                let parsed = luks::LuksHeader::parse(&bytes, ext.offset)?;
                #[cfg(feature = "encryption")]
                let key = secret
                    .map(|s| parsed.unlock(io, ext, s.passphrase()?.as_bytes(), kdf))
                    .transpose()?;
                Ok(Some(Encryption {
                    info: parsed.info(),
                    method: 2,
                    physical: true,
                    #[cfg(feature = "encryption")]
                    secret: key.as_ref().and(secret.cloned()),
                    #[cfg(feature = "encryption")]
                    key,
                    #[cfg(not(feature = "encryption"))]
                    secret_given: secret.is_some(),
                }))
            }
        }
    }

    fn method_name(&self) -> &'static str {
        if self.method == 1 {
            "AES"
        } else {
            "LUKS"
        }
    }

    /// Fail unless data clusters can be decrypted (the image was opened with a secret).
    pub(crate) fn check_unlocked(&self) -> Result<()> {
        #[cfg(feature = "encryption")]
        let unlocked = self.key.is_some();
        #[cfg(not(feature = "encryption"))]
        let unlocked = false;
        if unlocked {
            return Ok(());
        }
        // With a secret this build cannot use, the missing feature is what to fix.
        #[cfg(not(feature = "encryption"))]
        if self.secret_given {
            return Err(Error::FeatureDisabled {
                feature: "encryption",
            });
        }
        Err(Error::Encrypted {
            method: self.method,
            name: self.method_name(),
        })
    }

    /// Decrypt `data`, read from host offset `host` for guest offset `guest`; both are
    /// sector aligned and `data` is whole sectors. Large runs are shared out between the
    /// image's worker pool and the calling thread, as QEMU decrypts on a thread pool.
    pub(crate) fn decrypt(
        &self,
        host: u64,
        guest: u64,
        data: &mut [u8],
        pool: &crate::base::pool::Pool,
    ) -> Result<()> {
        #[cfg(feature = "encryption")]
        if let Some(key) = &self.key {
            let first = if self.physical { host } else { guest } / SECTOR_SIZE;
            decrypt_in_parallel(key, first, data, pool);
            return Ok(());
        }
        let _ = (host, guest, data, pool);
        self.check_unlocked()
    }
}

impl Encryption {
    /// Encrypt `data`, to be written at host offset `host` for guest offset `guest` (both
    /// sector aligned, `data` whole sectors), on the calling thread: a writer encrypts on
    /// its own worker threads.
    pub(crate) fn encrypt(&self, host: u64, guest: u64, data: &mut [u8]) -> Result<()> {
        #[cfg(feature = "encryption")]
        if let Some(key) = &self.key {
            let first = if self.physical { host } else { guest } / SECTOR_SIZE;
            key.encrypt(first, data);
            return Ok(());
        }
        let _ = (host, guest, data);
        self.check_unlocked()
    }
}

/// Bytes below which decrypting on other threads does not pay for starting them.
#[cfg(feature = "encryption")]
const PARALLEL_MIN_BYTES: usize = 256 << 10;

/// Decrypt `data` (from sector `first`) in sector-aligned shares, one per pool thread.
#[cfg(feature = "encryption")]
fn decrypt_in_parallel(
    key: &cipher::SectorCipher,
    first: u64,
    data: &mut [u8],
    pool: &crate::base::pool::Pool,
) {
    let threads = pool
        .threads()
        .min(data.len().div_euclid(PARALLEL_MIN_BYTES))
        .max(1);
    if threads <= 1 {
        key.decrypt(first, data);
        return;
    }
    let sector = SECTOR_SIZE as usize;
    let share = data.len().div_ceil(threads).next_multiple_of(sector);
    let mut shares: Vec<(u64, &mut [u8])> = data
        .chunks_mut(share)
        .enumerate()
        .map(|(i, chunk)| {
            let at = first.saturating_add(i.saturating_mul(share).div_euclid(sector) as u64);
            (at, chunk)
        })
        .collect();
    pool.run_all(&mut shares, |(at, chunk)| key.decrypt(*at, chunk));
}

#[cfg(test)]
mod tests {
    use crate::{Error, OpenOptions, Qcow2};
    use positioned_io::ReadAt;

    fn read_error(options: &OpenOptions) -> Error {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/luks.qcow2");
        let image = Qcow2::open_path_with(path, options).unwrap();
        let err = image
            .reader()
            .unwrap()
            .read_exact_at(0, &mut [0u8; 512])
            .unwrap_err();
        *err.into_inner().unwrap().downcast::<Error>().unwrap()
    }

    #[test]
    fn the_kdf_budget_counts_before_spending() {
        let budget = super::KdfBudget::new(100);
        let shared = budget.clone();
        budget.spend(60).unwrap();
        let err = shared.spend(41).unwrap_err();
        assert!(
            matches!(
                err,
                Error::LimitExceeded {
                    requested: 101,
                    limit: 100,
                    unit: "PBKDF2 blocks",
                    ..
                }
            ),
            "{err}"
        );
        // The refused work is not counted: what is left can still be spent.
        assert_eq!(budget.spent(), 60);
        shared.spend(40).unwrap();
        assert_eq!(budget.spent(), 100);
        assert!(budget.spend(1).is_err());
        assert!(super::KdfBudget::new(u64::MAX).spend(u64::MAX).is_ok());
    }

    #[test]
    fn reads_without_the_secret_are_refused_naming_the_method() {
        let err = read_error(&OpenOptions::new());
        assert!(
            matches!(
                err,
                Error::Encrypted {
                    method: 2,
                    name: "LUKS"
                }
            ),
            "{err}"
        );
    }

    #[cfg(not(feature = "encryption"))]
    #[test]
    fn with_a_secret_but_without_the_feature_reads_say_so() {
        let err = read_error(&OpenOptions::new().secret("abc"));
        assert!(
            matches!(
                err,
                Error::FeatureDisabled {
                    feature: "encryption"
                }
            ),
            "{err}"
        );
    }
}
