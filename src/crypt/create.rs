//! New LUKS payloads: the LUKS1 header a new encrypted image carries (key slot 0 opened by the
//! caller's secret, QEMU's default cipher and iteration time), and the cipher its data
//! clusters are encrypted with.
//!
//! STUB (issue 22, being written): the interface the image creator codes against.

use super::Secret;
use crate::error::{Error, Result};

/// How a new image is encrypted: `qemu-img create -o encrypt.format=luks,encrypt.*`.
///
/// Defaults are QEMU's: `aes-256` in `xts` mode, `plain64` IVs, `sha256`, key slot 0
/// derived with PBKDF2 for 2000 ms (`encrypt.iter-time`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LuksOptions {
    secret: Secret,
}

impl LuksOptions {
    /// LUKS with QEMU's defaults, key slot 0 opened by `secret`.
    #[must_use]
    pub fn new(secret: impl Into<Secret>) -> Self {
        LuksOptions {
            secret: secret.into(),
        }
    }

    /// Set one `encrypt.*` option by its qemu-img name without the `encrypt.` prefix
    /// (`cipher-alg`, `cipher-mode`, `ivgen-alg`, `ivgen-hash-alg`, `hash-alg`,
    /// `iter-time`); QEMU's message for a bad name or value.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let _ = (&self.secret, value);
        Err(Error::InvalidOption {
            option: format!("encrypt.{key}"),
            message: format!("Invalid parameter 'encrypt.{key}'"),
        })
    }
}

/// A new LUKS header, ready to be written into the image, and the payload cipher it
/// protects.
#[cfg(feature = "encryption")]
pub(crate) struct NewLuks {
    /// The whole LUKS area (header and key material), to be stored at the offset the
    /// full-disk-encryption header extension names; its length is a multiple of 512.
    pub(crate) area: Vec<u8>,
    /// The cipher for the image's data clusters (IVs from host sectors, as QEMU's qcow2
    /// LUKS uses).
    pub(crate) cipher: super::cipher::SectorCipher,
}

/// Make a new LUKS header for `options`.
#[cfg(feature = "encryption")]
pub(crate) fn new_luks(options: &LuksOptions) -> Result<NewLuks> {
    let _ = options;
    Err(Error::Internal("LUKS creation is not written yet"))
}
