//! The algorithms a LUKS header can name, spelled as QEMU spells them.

/// A cipher with its key size (QEMU's `QCryptoCipherAlgo`, limited to what a LUKS header of
/// QEMU's can name: `qcrypto_block_luks_cipher_name_map`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CipherAlg {
    Aes128,
    Aes192,
    Aes256,
    Cast5_128,
    Serpent128,
    Serpent192,
    Serpent256,
    Twofish128,
    Twofish192,
    Twofish256,
}

impl CipherAlg {
    /// The cipher a LUKS header names by `name` with keys of `key_bytes` (per cipher, so half
    /// the header's key size in XTS mode).
    pub(crate) fn from_luks(name: &str, key_bytes: u32) -> Option<Self> {
        use CipherAlg::*;
        Some(match (name, key_bytes) {
            ("aes", 16) => Aes128,
            ("aes", 24) => Aes192,
            ("aes", 32) => Aes256,
            ("cast5", 16) => Cast5_128,
            ("serpent", 16) => Serpent128,
            ("serpent", 24) => Serpent192,
            ("serpent", 32) => Serpent256,
            ("twofish", 16) => Twofish128,
            ("twofish", 24) => Twofish192,
            ("twofish", 32) => Twofish256,
            _ => return None,
        })
    }

    /// The cipher `qemu-img create -o encrypt.cipher-alg=NAME` names (QEMU's enum spelling).
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        use CipherAlg::*;
        [
            Aes128, Aes192, Aes256, Cast5_128, Serpent128, Serpent192, Serpent256, Twofish128,
            Twofish192, Twofish256,
        ]
        .into_iter()
        .find(|c| c.name() == name)
    }

    /// The family name a LUKS header stores (`cipher_name`); the key size is implied by the
    /// header's key length.
    pub(crate) fn luks_name(self) -> &'static str {
        use CipherAlg::*;
        match self {
            Aes128 | Aes192 | Aes256 => "aes",
            Cast5_128 => "cast5",
            Serpent128 | Serpent192 | Serpent256 => "serpent",
            Twofish128 | Twofish192 | Twofish256 => "twofish",
        }
    }

    /// Block length in bytes (XTS needs 16).
    pub(crate) fn block_len(self) -> usize {
        match self {
            CipherAlg::Cast5_128 => 8,
            _ => 16,
        }
    }

    /// Key length in bytes.
    pub(crate) fn key_len(self) -> usize {
        use CipherAlg::*;
        match self {
            Aes128 | Cast5_128 | Serpent128 | Twofish128 => 16,
            Aes192 | Serpent192 | Twofish192 => 24,
            Aes256 | Serpent256 | Twofish256 => 32,
        }
    }

    /// The same cipher with a key of `len` bytes, if it has one (QEMU's
    /// `qcrypto_block_luks_essiv_cipher`: ESSIV keys the cipher with a whole digest).
    pub(crate) fn with_key_len(self, len: usize) -> Option<Self> {
        use CipherAlg::*;
        let family = match self {
            Aes128 | Aes192 | Aes256 => [Aes128, Aes192, Aes256],
            Serpent128 | Serpent192 | Serpent256 => [Serpent128, Serpent192, Serpent256],
            Twofish128 | Twofish192 | Twofish256 => [Twofish128, Twofish192, Twofish256],
            Cast5_128 => return (len == 16).then_some(Cast5_128),
        };
        family.into_iter().find(|c| c.key_len() == len)
    }

    /// QEMU's name, as `qemu-img info` prints it.
    pub(crate) fn name(self) -> &'static str {
        use CipherAlg::*;
        match self {
            Aes128 => "aes-128",
            Aes192 => "aes-192",
            Aes256 => "aes-256",
            Cast5_128 => "cast5-128",
            Serpent128 => "serpent-128",
            Serpent192 => "serpent-192",
            Serpent256 => "serpent-256",
            Twofish128 => "twofish-128",
            Twofish192 => "twofish-192",
            Twofish256 => "twofish-256",
        }
    }
}

/// A block mode (QEMU's `QCryptoCipherMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CipherMode {
    Ecb,
    Cbc,
    Xts,
    Ctr,
}

impl CipherMode {
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "ecb" => CipherMode::Ecb,
            "cbc" => CipherMode::Cbc,
            "xts" => CipherMode::Xts,
            "ctr" => CipherMode::Ctr,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Xts => "xts",
            CipherMode::Ctr => "ctr",
        }
    }
}

/// An IV generator (QEMU's `QCryptoIVGenAlgo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IvGenAlg {
    /// The sector number, 32 bits little-endian.
    Plain,
    /// The sector number, 64 bits little-endian.
    Plain64,
    /// The sector number encrypted with a hash of the key.
    Essiv,
}

impl IvGenAlg {
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "plain" => IvGenAlg::Plain,
            "plain64" => IvGenAlg::Plain64,
            "essiv" => IvGenAlg::Essiv,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            IvGenAlg::Plain => "plain",
            IvGenAlg::Plain64 => "plain64",
            IvGenAlg::Essiv => "essiv",
        }
    }
}

/// A hash (QEMU's `QCryptoHashAlgo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HashAlg {
    Md5,
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
    Ripemd160,
    Sm3,
}

impl HashAlg {
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        use HashAlg::*;
        Some(match name {
            "md5" => Md5,
            "sha1" => Sha1,
            "sha224" => Sha224,
            "sha256" => Sha256,
            "sha384" => Sha384,
            "sha512" => Sha512,
            "ripemd160" => Ripemd160,
            "sm3" => Sm3,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        use HashAlg::*;
        match self {
            Md5 => "md5",
            Sha1 => "sha1",
            Sha224 => "sha224",
            Sha256 => "sha256",
            Sha384 => "sha384",
            Sha512 => "sha512",
            Ripemd160 => "ripemd160",
            Sm3 => "sm3",
        }
    }

    /// Digest length in bytes.
    pub(crate) fn digest_len(self) -> usize {
        use HashAlg::*;
        match self {
            Md5 => 16,
            Sha1 | Ripemd160 => 20,
            Sha224 => 28,
            Sha256 | Sm3 => 32,
            Sha384 => 48,
            Sha512 => 64,
        }
    }
}
