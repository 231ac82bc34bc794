//! Sector decryption and encryption: a block cipher, a block mode and an IV generator, as
//! QEMU's `qcrypto_block_cipher_{de,en}crypt_helper` combine them.
//!
//! The modes are written here rather than taken from the `cbc` and `xts-mode` crates so that
//! each sector's blocks go to the cipher in one call: RustCrypto's AES then decrypts several
//! blocks at once with the CPU's AES instructions, several times faster than block by block.

use aes::cipher::{
    generic_array::typenum::Unsigned, inout::InOutBuf, BlockCipher, BlockDecrypt, BlockEncrypt,
    KeyInit,
};
use zeroize::Zeroizing;

use super::hash;
use super::names::{CipherAlg, CipherMode, HashAlg, IvGenAlg};
use super::SECTOR_SIZE;
use crate::error::{Error, Result};

/// Largest cipher block (AES, Serpent, Twofish); CAST5's is 8.
const MAX_BLOCK: usize = 16;
const SECTOR: usize = SECTOR_SIZE as usize;

/// A keyed block cipher of any algorithm.
trait Blocks: Send + Sync {
    fn block_len(&self) -> usize;
    /// Encrypt the whole blocks of `data` in place.
    fn encrypt(&self, data: &mut [u8]);
    /// Decrypt the whole blocks of `data` in place, several at a time where the cipher can.
    fn decrypt(&self, data: &mut [u8]);
}

impl<C> Blocks for C
where
    C: BlockCipher + BlockEncrypt + BlockDecrypt + Send + Sync,
{
    fn block_len(&self) -> usize {
        C::BlockSize::USIZE
    }
    fn encrypt(&self, data: &mut [u8]) {
        let (blocks, _) = InOutBuf::from(data).into_chunks::<C::BlockSize>();
        self.encrypt_blocks_inout(blocks);
    }
    fn decrypt(&self, data: &mut [u8]) {
        let (blocks, _) = InOutBuf::from(data).into_chunks::<C::BlockSize>();
        self.decrypt_blocks_inout(blocks);
    }
}

fn new_blocks(alg: CipherAlg, key: &[u8]) -> Result<Box<dyn Blocks>> {
    fn keyed<C: KeyInit + Blocks + 'static>(key: &[u8]) -> Result<Box<dyn Blocks>> {
        C::new_from_slice(key)
            .map(|c| Box::new(c) as Box<dyn Blocks>)
            .map_err(|_| Error::UnsupportedEncryption {
                what: format!("a {}-byte key for this cipher", key.len()),
            })
    }
    if key.len() != alg.key_len() {
        return Err(Error::UnsupportedEncryption {
            what: format!("{} with a {}-byte key", alg.name(), key.len()),
        });
    }
    use CipherAlg::*;
    match alg {
        Aes128 => keyed::<aes::Aes128>(key),
        Aes192 => keyed::<aes::Aes192>(key),
        Aes256 => keyed::<aes::Aes256>(key),
        Cast5_128 => keyed::<cast5::Cast5>(key),
        Serpent128 | Serpent192 | Serpent256 => keyed::<serpent::Serpent>(key),
        Twofish128 | Twofish192 | Twofish256 => keyed::<twofish::Twofish>(key),
    }
}

/// How each sector's IV is made from its number.
enum IvGen {
    /// Low 32 bits, little-endian.
    Plain,
    /// 64 bits, little-endian.
    Plain64,
    /// The 64-bit number encrypted (ECB) with a cipher keyed by a hash of the key.
    Essiv(Box<dyn Blocks>),
}

impl IvGen {
    /// Write the IV of sector `n` into `iv` (whose length is the mode's IV length).
    fn fill(&self, n: u64, iv: &mut [u8]) {
        iv.fill(0);
        match self {
            IvGen::Plain => copy_prefix(iv, &(n as u32).to_le_bytes()),
            IvGen::Plain64 => copy_prefix(iv, &n.to_le_bytes()),
            IvGen::Essiv(cipher) => {
                let mut block = [0u8; MAX_BLOCK];
                let len = cipher.block_len().min(MAX_BLOCK);
                let block = block.get_mut(..len).unwrap_or_default();
                copy_prefix(block, &n.to_le_bytes());
                cipher.encrypt(block);
                copy_prefix(iv, block);
            }
        }
    }
}

/// Copy as much of `src` as fits to the start of `dst`.
fn copy_prefix(dst: &mut [u8], src: &[u8]) {
    let n = dst.len().min(src.len());
    if let (Some(d), Some(s)) = (dst.get_mut(..n), src.get(..n)) {
        d.copy_from_slice(s);
    }
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// Which way data goes through the cipher.
#[derive(Clone, Copy)]
enum Direction {
    Decrypt,
    Encrypt,
}

/// The payload cipher of an unlocked image: decrypts 512-byte sectors by number.
/// Its key schedules are zeroed when it is dropped (the ciphers' `zeroize` feature).
pub(crate) struct SectorCipher {
    mode: CipherMode,
    cipher: Box<dyn Blocks>,
    /// XTS's second cipher, which encrypts the tweak.
    tweak: Option<Box<dyn Blocks>>,
    ivgen: IvGen,
}

impl SectorCipher {
    /// The cipher `alg` in `mode` keyed by `key` (both XTS keys, for XTS), with IVs from
    /// `ivgen` (`ivgen_cipher` and `ivgen_hash` are ESSIV's).
    pub(crate) fn new(
        alg: CipherAlg,
        mode: CipherMode,
        ivgen: IvGenAlg,
        ivgen_cipher: CipherAlg,
        ivgen_hash: Option<HashAlg>,
        key: &[u8],
    ) -> Result<Self> {
        let (cipher, tweak) = match mode {
            CipherMode::Xts => {
                let half = key.len() / 2;
                let (k1, k2) = key.split_at(half);
                let cipher = new_blocks(alg, k1)?;
                if cipher.block_len() != 16 {
                    return Err(Error::UnsupportedEncryption {
                        what: format!("XTS with {} (its blocks are not 16 bytes)", alg.name()),
                    });
                }
                (cipher, Some(new_blocks(alg, k2)?))
            }
            _ => (new_blocks(alg, key)?, None),
        };
        let ivgen = match ivgen {
            IvGenAlg::Plain => IvGen::Plain,
            IvGenAlg::Plain64 => IvGen::Plain64,
            IvGenAlg::Essiv => {
                let hash = ivgen_hash.ok_or_else(|| Error::UnsupportedEncryption {
                    what: "ESSIV without a hash".to_owned(),
                })?;
                // QEMU's ivgen-essiv: the salt is the hash of the whole key, cut to the
                // ESSIV cipher's key length.
                let salt = hash::digest(hash, &[key])?;
                let salt: Zeroizing<Vec<u8>> =
                    Zeroizing::new(salt.iter().copied().take(ivgen_cipher.key_len()).collect());
                IvGen::Essiv(new_blocks(ivgen_cipher, &salt)?)
            }
        };
        Ok(SectorCipher {
            mode,
            cipher,
            tweak,
            ivgen,
        })
    }

    /// Decrypt `data` in place, sector by sector from sector number `first`. A last piece
    /// shorter than a sector is decrypted as one unit, as QEMU does with key material.
    pub(crate) fn decrypt(&self, first: u64, data: &mut [u8]) {
        self.sectors(first, data, Direction::Decrypt);
    }

    /// Encrypt `data` in place, sector by sector from sector number `first`: the inverse of
    /// [`Self::decrypt`].
    pub(crate) fn encrypt(&self, first: u64, data: &mut [u8]) {
        self.sectors(first, data, Direction::Encrypt);
    }

    /// Each sector of `data` through the mode, with its IV, one way or the other.
    fn sectors(&self, first: u64, data: &mut [u8], direction: Direction) {
        let block = self.cipher.block_len();
        let mut iv = [0u8; MAX_BLOCK];
        let iv = iv.get_mut(..block.min(MAX_BLOCK)).unwrap_or_default();
        for (i, sector) in data.chunks_mut(SECTOR).enumerate() {
            if self.mode != CipherMode::Ecb {
                self.ivgen.fill(first.wrapping_add(i as u64), iv);
            }
            match (self.mode, direction) {
                (CipherMode::Ecb, Direction::Decrypt) => self.cipher.decrypt(sector),
                (CipherMode::Ecb, Direction::Encrypt) => self.cipher.encrypt(sector),
                (CipherMode::Cbc, Direction::Decrypt) => self.decrypt_cbc(iv, sector),
                (CipherMode::Cbc, Direction::Encrypt) => self.encrypt_cbc(iv, sector),
                (CipherMode::Xts, direction) => self.xts(iv, sector, direction),
                (CipherMode::Ctr, _) => self.apply_ctr(iv, sector),
            }
        }
    }

    /// CBC: each block xored with the ciphertext before it (the IV for the first), then
    /// encrypted; one block at a time, as the chain demands.
    fn encrypt_cbc(&self, iv: &[u8], sector: &mut [u8]) {
        let block = iv.len().max(1);
        let mut chain = [0u8; MAX_BLOCK];
        copy_prefix(&mut chain, iv);
        for b in sector.chunks_exact_mut(block) {
            xor_into(b, &chain);
            self.cipher.encrypt(b);
            copy_prefix(&mut chain, b);
        }
    }

    /// CBC: decrypt every block at once, then xor each with the ciphertext before it.
    fn decrypt_cbc(&self, iv: &[u8], sector: &mut [u8]) {
        let block = iv.len().max(1);
        let mut previous = [0u8; SECTOR];
        copy_prefix(&mut previous, sector);
        self.cipher.decrypt(sector);
        for (i, b) in sector.chunks_exact_mut(block).enumerate() {
            let chain = match i.checked_sub(1) {
                None => iv,
                Some(p) => previous
                    .get(p.saturating_mul(block)..i.saturating_mul(block))
                    .unwrap_or_default(),
            };
            xor_into(b, chain);
        }
    }

    /// XTS (IEEE 1619) on whole 16-byte blocks: the tweak is the encrypted IV, multiplied by
    /// x in GF(2^128) from block to block; every block's tweak is made first so the blocks
    /// go through the cipher together.
    fn xts(&self, iv: &[u8], sector: &mut [u8], direction: Direction) {
        let Some(tweak_cipher) = &self.tweak else {
            return;
        };
        let mut t = [0u8; 16];
        copy_prefix(&mut t, iv);
        tweak_cipher.encrypt(&mut t);
        let mut tweaks = [0u8; SECTOR];
        for chunk in tweaks.chunks_exact_mut(16) {
            chunk.copy_from_slice(&t);
            t = mul_x(t);
        }
        xor_into(sector, &tweaks);
        match direction {
            Direction::Decrypt => self.cipher.decrypt(sector),
            Direction::Encrypt => self.cipher.encrypt(sector),
        }
        xor_into(sector, &tweaks);
    }

    /// CTR: xor with the encrypted counter, the IV incremented big-endian block by block.
    fn apply_ctr(&self, iv: &[u8], sector: &mut [u8]) {
        let block = iv.len().max(1);
        let mut counter = [0u8; MAX_BLOCK];
        copy_prefix(&mut counter, iv);
        let counter = counter.get_mut(..block).unwrap_or_default();
        let mut stream = [0u8; SECTOR];
        for chunk in stream.chunks_exact_mut(block) {
            chunk.copy_from_slice(counter);
            for byte in counter.iter_mut().rev() {
                *byte = byte.wrapping_add(1);
                if *byte != 0 {
                    break;
                }
            }
        }
        let len = sector.len().min(SECTOR);
        let stream = stream.get_mut(..len).unwrap_or_default();
        self.cipher.encrypt(stream);
        xor_into(sector, stream);
    }
}

/// Multiply an XTS tweak by x: a 128-bit little-endian shift left, reduced by x^128 + x^7 +
/// x^2 + x + 1.
fn mul_x(t: [u8; 16]) -> [u8; 16] {
    let v = u128::from_le_bytes(t);
    let reduce = if v >> 127 == 1 { 0x87 } else { 0 };
    (v << 1 ^ reduce).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn xts_matches_ieee_1619_vector_4() {
        // IEEE P1619 XTS-AES-128 vector 4: keys 2718.. / 3141.., data unit 0, 512 bytes.
        let key = hex(concat!(
            "27182818284590452353602874713526",
            "31415926535897932384626433832795"
        ));
        let c = SectorCipher::new(
            CipherAlg::Aes128,
            CipherMode::Xts,
            IvGenAlg::Plain64,
            CipherAlg::Aes128,
            None,
            &key,
        )
        .unwrap();
        let mut data = hex(concat!(
            "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c",
            "c78cf7f5e543445f8333d8fa7f56000005279fa5d8b5e4ad40e736ddb4d35412"
        ));
        data.resize(32, 0);
        let mut sector = vec![0u8; 512];
        sector[..32].copy_from_slice(&data);
        // Only the first two blocks are checked: decrypting a whole sector of which only
        // they are the vector's still yields the vector's plaintext there (XTS is per block).
        c.decrypt(0, &mut sector);
        assert_eq!(&sector[..32], &(0u8..32).collect::<Vec<_>>()[..]);
    }

    /// Encryption is decryption's inverse in every mode and IV generator, sector numbers
    /// past 2^32 included; CBC encryption matches NIST's vector.
    #[test]
    fn encrypt_inverts_decrypt() {
        let key: Vec<u8> = (0..64u8).collect();
        let cases = [
            (CipherAlg::Aes256, CipherMode::Xts, IvGenAlg::Plain64, 64),
            (CipherAlg::Aes128, CipherMode::Cbc, IvGenAlg::Plain64, 16),
            (CipherAlg::Aes256, CipherMode::Cbc, IvGenAlg::Essiv, 32),
            (CipherAlg::Aes128, CipherMode::Ctr, IvGenAlg::Plain, 16),
            (CipherAlg::Aes128, CipherMode::Ecb, IvGenAlg::Plain64, 16),
        ];
        for (alg, mode, ivgen, len) in cases {
            let hash = (ivgen == IvGenAlg::Essiv).then_some(HashAlg::Sha256);
            let c =
                SectorCipher::new(alg, mode, ivgen, CipherAlg::Aes256, hash, &key[..len]).unwrap();
            let plain: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 251) as u8).collect();
            let mut data = plain.clone();
            c.encrypt((1 << 32) + 5, &mut data);
            assert_ne!(data, plain);
            c.decrypt((1 << 32) + 5, &mut data);
            assert_eq!(data, plain, "{mode:?} {ivgen:?}");
        }
        let c = SectorCipher::new(
            CipherAlg::Aes128,
            CipherMode::Cbc,
            IvGenAlg::Plain64,
            CipherAlg::Aes128,
            None,
            &hex("2b7e151628aed2a6abf7158809cf4f3c"),
        )
        .unwrap();
        let mut data = hex(concat!(
            "6bc1bee22e409f96e93d7e117393172a",
            "ae2d8a571e03ac9c9eb76fac45af8e51"
        ));
        c.encrypt_cbc(&hex("000102030405060708090a0b0c0d0e0f"), &mut data);
        assert_eq!(
            data,
            hex(concat!(
                "7649abac8119b246cee98e9b12e9197d",
                "5086cb9b507219ee95db113a917678b2"
            ))
        );
    }

    #[test]
    fn cbc_matches_nist_sp800_38a() {
        // F.2.2 CBC-AES128.Decrypt, first two blocks; IV 000102..0f is plain64 of sector
        // 0x0706050403020100 only in its first 8 bytes, so set the IV by hand.
        let key = hex("2b7e151628aed2a6abf7158809cf4f3c");
        let c = SectorCipher::new(
            CipherAlg::Aes128,
            CipherMode::Cbc,
            IvGenAlg::Plain64,
            CipherAlg::Aes128,
            None,
            &key,
        )
        .unwrap();
        let iv = hex("000102030405060708090a0b0c0d0e0f");
        let mut data = hex(concat!(
            "7649abac8119b246cee98e9b12e9197d",
            "5086cb9b507219ee95db113a917678b2"
        ));
        c.decrypt_cbc(&iv, &mut data);
        assert_eq!(
            data,
            hex(concat!(
                "6bc1bee22e409f96e93d7e117393172a",
                "ae2d8a571e03ac9c9eb76fac45af8e51"
            ))
        );
    }

    #[test]
    fn plain_ivs_truncate_the_sector_number() {
        let mut iv = [0u8; 16];
        IvGen::Plain.fill(0x1_0000_0002, &mut iv);
        assert_eq!(iv[..5], [2, 0, 0, 0, 0]);
        IvGen::Plain64.fill(0x1_0000_0002, &mut iv);
        assert_eq!(iv[..5], [2, 0, 0, 0, 1]);
    }
}
