//! QEMU's legacy qcow2 encryption (`crypt_method` 1): AES-128-CBC keyed directly with the
//! passphrase, the IV the guest sector number (QEMU's `crypto/block-qcow.c`).
//!
//! Nothing in the image checks the key: a wrong passphrase decrypts to garbage, in QEMU too.

use super::EncryptionInfo;

/// What `qemu-img info` reports: the format only.
pub(crate) fn info() -> EncryptionInfo {
    EncryptionInfo {
        format: "aes",
        cipher_alg: None,
        cipher_mode: None,
        ivgen_alg: None,
        ivgen_hash_alg: None,
        hash_alg: None,
        detached_header: None,
        payload_offset: None,
        master_key_iters: None,
        uuid: None,
        slots: Vec::new(),
    }
}

#[cfg(feature = "encryption")]
pub(crate) fn unlock(secret: &super::Secret) -> crate::Result<super::cipher::SectorCipher> {
    use super::names::{CipherAlg, CipherMode, IvGenAlg};
    // The key is the passphrase's first 16 bytes, zero padded (QEMU copies at most 16 bytes
    // of the string, which holds no NUL).
    let mut key = zeroize::Zeroizing::new([0u8; 16]);
    let pass = secret.passphrase()?.as_bytes();
    let n = pass.len().min(16);
    if let (Some(k), Some(p)) = (key.get_mut(..n), pass.get(..n)) {
        k.copy_from_slice(p);
    }
    super::cipher::SectorCipher::new(
        CipherAlg::Aes128,
        CipherMode::Cbc,
        IvGenAlg::Plain64,
        CipherAlg::Aes128,
        None,
        key.as_ref(),
    )
}
