//! The LUKS1 header QEMU writes inside a qcow2 image, and unlocking its key slots.
//!
//! The parser is pure: [`LuksHeader::parse`] takes the header's 592 bytes and applies the checks
//! of QEMU's `qcrypto_block_luks_check_header` and `qcrypto_block_luks_parse_header`, in their
//! order. [`LuksHeader::unlock`] reads key material and derives keys.

use crate::base::bytes::{be_u16, be_u32, field};
use crate::error::{Error, Result};

use super::names::{CipherAlg, CipherMode, HashAlg, IvGenAlg};
use super::{EncryptionInfo, KeySlotInfo, SECTOR_SIZE};

/// Size of a LUKS1 header with its eight key slots.
pub(crate) const HEADER_LEN: u64 = 592;
/// `LUKS\xba\xbe`, bytes 0-5.
const MAGIC: &[u8] = b"LUKS\xba\xbe";
/// The only version read (LUKS2 is not what QEMU writes).
const VERSION: u16 = 1;
pub(crate) const NUM_KEY_SLOTS: usize = 8;
/// Key slot `active` values.
const SLOT_ENABLED: u32 = 0x00ac_71f3;
const SLOT_DISABLED: u32 = 0x0000_dead;
/// QEMU accepts only this many anti-forensic stripes (and writes this many).
pub(crate) const STRIPES: u32 = 4000;
/// Key material starts after the header's first 4 KiB (QEMU's
/// `QCRYPTO_BLOCK_LUKS_KEY_SLOT_OFFSET`), counted in sectors.
pub(crate) const KEY_SLOT_OFFSET_SECTORS: u64 = 4096 / SECTOR_SIZE;
pub(crate) const SALT_LEN: usize = 32;
pub(crate) const DIGEST_LEN: usize = 20;

// Field offsets (LUKS1 on-disk format, big-endian).
const AT_VERSION: usize = 6;
const AT_CIPHER_NAME: usize = 8;
const AT_CIPHER_MODE: usize = 40;
const AT_HASH_SPEC: usize = 72;
const NAME_LEN: usize = 32;
const AT_PAYLOAD_OFFSET: usize = 104;
const AT_KEY_BYTES: usize = 108;
const AT_MK_DIGEST: usize = 112;
const AT_MK_SALT: usize = 132;
const AT_MK_ITERATIONS: usize = 164;
const AT_UUID: usize = 168;
const UUID_LEN: usize = 40;
const AT_KEY_SLOTS: usize = 208;
const KEY_SLOT_LEN: usize = 48;

/// One key slot: where its encrypted, split copy of the master key is and how to derive the
/// key that decrypts it.
#[derive(Debug, Clone)]
pub(crate) struct KeySlot {
    pub(crate) active: bool,
    pub(crate) iterations: u32,
    pub(crate) salt: [u8; SALT_LEN],
    pub(crate) key_offset_sector: u32,
    pub(crate) stripes: u32,
}

/// A parsed and checked LUKS1 header.
#[derive(Debug, Clone)]
pub(crate) struct LuksHeader {
    pub(crate) cipher: CipherAlg,
    pub(crate) mode: CipherMode,
    pub(crate) ivgen: IvGenAlg,
    pub(crate) ivgen_hash: Option<HashAlg>,
    /// The cipher ESSIV encrypts sector numbers with (keyed by a digest of the key).
    pub(crate) ivgen_cipher: CipherAlg,
    pub(crate) hash: HashAlg,
    pub(crate) payload_offset_sector: u32,
    /// Master key length in bytes (both XTS keys together).
    pub(crate) key_bytes: u32,
    pub(crate) mk_digest: [u8; DIGEST_LEN],
    pub(crate) mk_salt: [u8; SALT_LEN],
    pub(crate) mk_iterations: u32,
    pub(crate) uuid: String,
    pub(crate) slots: Vec<KeySlot>,
    /// File offset of the header, for error messages.
    pub(crate) at: u64,
}

/// Sectors one key slot's material takes, as QEMU counts them
/// (`qcrypto_block_luks_splitkeylen_sectors`): whole sectors, rounded up to the 4 KiB the
/// header itself takes.
pub(crate) fn key_material_sectors(key_bytes: u32, stripes: u32) -> u64 {
    let bytes = u64::from(key_bytes).saturating_mul(u64::from(stripes));
    bytes
        .div_ceil(SECTOR_SIZE)
        .div_ceil(KEY_SLOT_OFFSET_SECTORS)
        .saturating_mul(KEY_SLOT_OFFSET_SECTORS)
}

/// A NUL-terminated name field, or `None` when it has no NUL.
fn c_string(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(bytes.get(..end)?).into_owned())
}

fn array<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    field(bytes, at, N)
        .and_then(|f| f.try_into().ok())
        .unwrap_or([0; N])
}

impl LuksHeader {
    /// Parse the header from its bytes (at least [`HEADER_LEN`]), found at file offset `at`.
    pub(crate) fn parse(bytes: &[u8], at: u64) -> Result<LuksHeader> {
        let bad =
            |what: String, field: usize| Error::malformed(what, at.saturating_add(field as u64));
        let short = || bad("LUKS header is truncated".to_owned(), 0);
        if bytes.get(..MAGIC.len()) != Some(MAGIC) {
            return Err(bad(
                "volume is not in LUKS format (bad magic)".to_owned(),
                0,
            ));
        }
        let version = be_u16(bytes, AT_VERSION).ok_or_else(short)?;
        if version != VERSION {
            return Err(bad(
                format!("LUKS version {version} is not supported"),
                AT_VERSION,
            ));
        }
        let name = |at: usize, what: &str| {
            field(bytes, at, NAME_LEN)
                .and_then(c_string)
                .ok_or_else(|| bad(format!("LUKS header {what} is not NUL terminated"), at))
        };
        let cipher_name = name(AT_CIPHER_NAME, "cipher name")?;
        let cipher_mode = name(AT_CIPHER_MODE, "cipher mode")?;
        let hash_spec = name(AT_HASH_SPEC, "hash spec")?;
        let u32_at = |at: usize| be_u32(bytes, at).ok_or_else(short);
        let payload_offset_sector = u32_at(AT_PAYLOAD_OFFSET)?;
        let key_bytes = u32_at(AT_KEY_BYTES)?;
        let mk_iterations = u32_at(AT_MK_ITERATIONS)?;
        let mut slots = Vec::with_capacity(NUM_KEY_SLOTS);
        for i in 0..NUM_KEY_SLOTS {
            let s = AT_KEY_SLOTS.saturating_add(i.saturating_mul(KEY_SLOT_LEN));
            let active = u32_at(s)?;
            slots.push((
                active,
                KeySlot {
                    active: active == SLOT_ENABLED,
                    iterations: u32_at(s.saturating_add(4))?,
                    salt: array(bytes, s.saturating_add(8)),
                    key_offset_sector: u32_at(s.saturating_add(40))?,
                    stripes: u32_at(s.saturating_add(44))?,
                },
            ));
        }
        let header = LuksHeader {
            cipher: CipherAlg::Aes256, // set by parse_names below
            mode: CipherMode::Xts,
            ivgen: IvGenAlg::Plain64,
            ivgen_hash: None,
            ivgen_cipher: CipherAlg::Aes256,
            hash: HashAlg::Sha256,
            payload_offset_sector,
            key_bytes,
            mk_digest: array(bytes, AT_MK_DIGEST),
            mk_salt: array(bytes, AT_MK_SALT),
            mk_iterations,
            uuid: field(bytes, AT_UUID, UUID_LEN)
                .and_then(c_string)
                .unwrap_or_default(),
            slots: slots.iter().map(|(_, s)| s.clone()).collect(),
            at,
        };
        header.check(&slots)?;
        header.parse_names(&cipher_name, &cipher_mode, &hash_spec)
    }

    /// QEMU's `qcrypto_block_luks_check_header`, after the names.
    fn check(&self, slots: &[(u32, KeySlot)]) -> Result<()> {
        let bad = |what: String, field: usize| {
            Error::malformed(what, self.at.saturating_add(field as u64))
        };
        let payload = u64::from(self.payload_offset_sector);
        if payload < KEY_SLOT_OFFSET_SECTORS {
            return Err(bad(
                "LUKS payload is overlapping with the header".to_owned(),
                AT_PAYLOAD_OFFSET,
            ));
        }
        if self.mk_iterations == 0 {
            return Err(bad(
                "LUKS key iteration count is zero".to_owned(),
                AT_MK_ITERATIONS,
            ));
        }
        for (i, (active, slot)) in slots.iter().enumerate() {
            let at = AT_KEY_SLOTS.saturating_add(i.saturating_mul(KEY_SLOT_LEN));
            if slot.stripes != STRIPES {
                return Err(bad(
                    format!(
                        "LUKS key slot {i} is corrupted (stripes {} != {STRIPES})",
                        slot.stripes
                    ),
                    at.saturating_add(44),
                ));
            }
            if *active != SLOT_ENABLED && *active != SLOT_DISABLED {
                return Err(bad(
                    format!("LUKS key slot {i} state (active/disabled) is corrupted"),
                    at,
                ));
            }
            if slot.active && slot.iterations == 0 {
                return Err(bad(
                    format!("LUKS key slot {i} iteration count is zero"),
                    at.saturating_add(4),
                ));
            }
            let (start, len) = self.slot_sectors(slot);
            if start < KEY_SLOT_OFFSET_SECTORS {
                return Err(bad(
                    format!("LUKS key slot {i} is overlapping with the LUKS header"),
                    at.saturating_add(40),
                ));
            }
            if start.saturating_add(len) > payload {
                return Err(bad(
                    format!("LUKS key slot {i} is overlapping with the encrypted payload"),
                    at.saturating_add(40),
                ));
            }
            for (j, (_, other)) in slots.iter().enumerate().skip(i.saturating_add(1)) {
                let (start2, len2) = self.slot_sectors(other);
                if start < start2.saturating_add(len2) && start2 < start.saturating_add(len) {
                    return Err(bad(
                        format!("LUKS key slots {i} and {j} are overlapping in the header"),
                        at.saturating_add(40),
                    ));
                }
            }
        }
        Ok(())
    }

    /// First sector and length in sectors of a slot's key material, as QEMU counts it: whole
    /// sectors, rounded up to the 4 KiB the header itself takes.
    fn slot_sectors(&self, slot: &KeySlot) -> (u64, u64) {
        (
            u64::from(slot.key_offset_sector),
            key_material_sectors(self.key_bytes, slot.stripes),
        )
    }

    /// The `cipher_mode` field: `mode-ivgen`, with `:hash` when an IV hash is named (QEMU
    /// writes it whenever one is given, even for IV generators that ignore it).
    pub(crate) fn mode_spec(&self) -> String {
        let base = format!("{}-{}", self.mode.name(), self.ivgen.name());
        match self.ivgen_hash {
            Some(h) => format!("{base}:{}", h.name()),
            None => base,
        }
    }

    /// The header's [`HEADER_LEN`] bytes, big-endian, as QEMU writes them: the inverse of
    /// [`Self::parse`].
    pub(crate) fn encode(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; HEADER_LEN as usize];
        let mut put = |at: usize, bytes: &[u8]| -> Result<()> {
            let len = bytes.len();
            out.get_mut(at..at.saturating_add(len))
                .ok_or(Error::Internal("LUKS header field out of range"))?
                .copy_from_slice(bytes);
            Ok(())
        };
        let name = |s: &str, len: usize| -> Result<Vec<u8>> {
            // One byte at least stays NUL, as the parser requires.
            if s.len() >= len {
                return Err(Error::Internal("LUKS header name too long"));
            }
            let mut f = s.as_bytes().to_vec();
            f.resize(len, 0);
            Ok(f)
        };
        put(0, MAGIC)?;
        put(AT_VERSION, &VERSION.to_be_bytes())?;
        put(AT_CIPHER_NAME, &name(self.cipher.luks_name(), NAME_LEN)?)?;
        put(AT_CIPHER_MODE, &name(&self.mode_spec(), NAME_LEN)?)?;
        put(AT_HASH_SPEC, &name(self.hash.name(), NAME_LEN)?)?;
        put(AT_PAYLOAD_OFFSET, &self.payload_offset_sector.to_be_bytes())?;
        put(AT_KEY_BYTES, &self.key_bytes.to_be_bytes())?;
        put(AT_MK_DIGEST, &self.mk_digest)?;
        put(AT_MK_SALT, &self.mk_salt)?;
        put(AT_MK_ITERATIONS, &self.mk_iterations.to_be_bytes())?;
        put(AT_UUID, &name(&self.uuid, UUID_LEN)?)?;
        if self.slots.len() != NUM_KEY_SLOTS {
            return Err(Error::Internal("a LUKS header has eight key slots"));
        }
        for (i, slot) in self.slots.iter().enumerate() {
            let at = AT_KEY_SLOTS.saturating_add(i.saturating_mul(KEY_SLOT_LEN));
            let active = if slot.active {
                SLOT_ENABLED
            } else {
                SLOT_DISABLED
            };
            put(at, &active.to_be_bytes())?;
            put(at.saturating_add(4), &slot.iterations.to_be_bytes())?;
            put(at.saturating_add(8), &slot.salt)?;
            put(at.saturating_add(40), &slot.key_offset_sector.to_be_bytes())?;
            put(at.saturating_add(44), &slot.stripes.to_be_bytes())?;
        }
        Ok(out)
    }

    /// QEMU's `qcrypto_block_luks_parse_header`: the cipher, mode, IV generator and hashes.
    fn parse_names(
        mut self,
        cipher_name: &str,
        cipher_mode: &str,
        hash_spec: &str,
    ) -> Result<Self> {
        let unsupported = |what: String| Error::UnsupportedEncryption { what };
        let at = self.at;
        let bad =
            |what: String, field: usize| Error::malformed(what, at.saturating_add(field as u64));
        let Some((mode, ivgen)) = cipher_mode.split_once('-') else {
            return Err(bad(
                format!("unexpected LUKS cipher mode string format {cipher_mode:?}"),
                AT_CIPHER_MODE,
            ));
        };
        let (ivgen, ivhash) = match ivgen.split_once(':') {
            Some((ivgen, hash)) => (ivgen, Some(hash)),
            None => (ivgen, None),
        };
        let hash_named = |name: &str| {
            HashAlg::from_name(name).ok_or_else(|| unsupported(format!("hash algorithm {name:?}")))
        };
        self.ivgen_hash = ivhash.map(hash_named).transpose()?;
        self.mode = CipherMode::from_name(mode)
            .ok_or_else(|| unsupported(format!("cipher mode {mode:?}")))?;
        let per_cipher = if self.mode == CipherMode::Xts {
            self.key_bytes / 2
        } else {
            self.key_bytes
        };
        self.cipher = CipherAlg::from_luks(cipher_name, per_cipher).ok_or_else(|| {
            unsupported(format!(
                "cipher {cipher_name:?} with {per_cipher}-byte keys"
            ))
        })?;
        self.hash = hash_named(hash_spec)?;
        self.ivgen = IvGenAlg::from_name(ivgen)
            .ok_or_else(|| unsupported(format!("IV generator {ivgen:?}")))?;
        self.ivgen_cipher = match (self.ivgen, self.ivgen_hash) {
            (IvGenAlg::Essiv, None) => {
                return Err(bad(
                    "missing LUKS IV generator hash specification".to_owned(),
                    AT_CIPHER_MODE,
                ))
            }
            (IvGenAlg::Essiv, Some(h)) => {
                self.cipher.with_key_len(h.digest_len()).ok_or_else(|| {
                    unsupported(format!(
                        "ESSIV with {} and {} ({}-byte key)",
                        self.cipher.name(),
                        h.name(),
                        h.digest_len()
                    ))
                })?
            }
            _ => self.cipher,
        };
        Ok(self)
    }

    /// The PBKDF2 blocks (HMACs of the header's hash) trying `slot` costs: deriving its key,
    /// each hash-sized block of the key separately; the anti-forensic merge, one hash per
    /// hash-sized piece of the key for each stripe but the last; and the master-key digest.
    pub(crate) fn slot_work(&self, slot: &KeySlot) -> u64 {
        let digest_len = (self.hash.digest_len() as u64).max(1);
        let key_blocks = u64::from(self.key_bytes).div_ceil(digest_len);
        let derive = u64::from(slot.iterations).saturating_mul(key_blocks);
        let merge = u64::from(slot.stripes.saturating_sub(1)).saturating_mul(key_blocks);
        let mk_blocks = (DIGEST_LEN as u64).div_ceil(digest_len);
        let mk_digest = u64::from(self.mk_iterations).saturating_mul(mk_blocks);
        derive.saturating_add(merge).saturating_add(mk_digest)
    }

    /// What `qemu-img info` reports.
    pub(crate) fn info(&self) -> EncryptionInfo {
        EncryptionInfo {
            format: "luks",
            cipher_alg: Some(self.cipher.name().to_owned()),
            cipher_mode: Some(self.mode.name().to_owned()),
            ivgen_alg: Some(self.ivgen.name().to_owned()),
            ivgen_hash_alg: match self.ivgen {
                IvGenAlg::Essiv => self.ivgen_hash.map(|h| h.name().to_owned()),
                _ => None,
            },
            hash_alg: Some(self.hash.name().to_owned()),
            detached_header: Some(false),
            payload_offset: Some(u64::from(self.payload_offset_sector).saturating_mul(SECTOR_SIZE)),
            master_key_iters: Some(u64::from(self.mk_iterations)),
            uuid: Some(self.uuid.clone()),
            slots: self
                .slots
                .iter()
                .map(|s| KeySlotInfo {
                    active: s.active,
                    iters: s.active.then_some(s.iterations),
                    stripes: s.active.then_some(s.stripes),
                    key_offset: u64::from(s.key_offset_sector).saturating_mul(SECTOR_SIZE),
                })
                .collect(),
        }
    }
}

#[cfg(feature = "encryption")]
mod unlock {
    use positioned_io::ReadAt;

    use super::{KeySlot, LuksHeader, DIGEST_LEN, SECTOR_SIZE};
    use crate::base::io::read_metadata;
    use crate::crypt::cipher::SectorCipher;
    use crate::crypt::hash;
    use crate::crypt::KdfBudget;
    use crate::error::{Error, Result};
    use crate::format::extension::EncryptionExtension;
    use zeroize::Zeroizing;

    impl LuksHeader {
        /// Find the master key with `passphrase`, trying the active key slots in order as QEMU
        /// does, and return the payload cipher.
        pub(crate) fn unlock<I: ReadAt>(
            &self,
            io: &I,
            ext: &EncryptionExtension,
            passphrase: &[u8],
            kdf: &KdfBudget,
        ) -> Result<SectorCipher> {
            let master = self.find_master_key(io, ext, passphrase, kdf)?;
            self.cipher_with(&master)
        }

        /// The master key, from the first active slot `passphrase` opens (QEMU's
        /// `qcrypto_block_luks_find_key`).
        pub(crate) fn find_master_key<I: ReadAt>(
            &self,
            io: &I,
            ext: &EncryptionExtension,
            passphrase: &[u8],
            kdf: &KdfBudget,
        ) -> Result<Zeroizing<Vec<u8>>> {
            for slot in self.slots.iter().filter(|s| s.active) {
                // Count the slot's work before doing any (QEMU tries every active slot, so
                // a wrong secret pays for them all).
                kdf.spend(self.slot_work(slot))?;
                if let Some(master) = self.open_slot(io, ext, slot, passphrase)? {
                    return Ok(master);
                }
            }
            Err(Error::WrongSecret {
                slots_tried: self.slots.iter().filter(|s| s.active).count() as u32,
            })
        }

        /// The master key if `passphrase` opens `slot` (QEMU's `qcrypto_block_luks_load_key`:
        /// an inactive slot opens with nothing).
        pub(crate) fn open_slot<I: ReadAt>(
            &self,
            io: &I,
            ext: &EncryptionExtension,
            slot: &KeySlot,
            passphrase: &[u8],
        ) -> Result<Option<Zeroizing<Vec<u8>>>> {
            if !slot.active {
                return Ok(None);
            }
            let key_len = self.key_bytes as usize;
            let mut slot_key = Zeroizing::new(vec![0u8; key_len]);
            hash::pbkdf2(
                self.hash,
                passphrase,
                &slot.salt,
                slot.iterations,
                &mut slot_key,
            )?;
            let (material_at, material_len) = self.material_range(ext, slot)?;
            let mut split = Zeroizing::new(read_metadata(
                io,
                material_at,
                material_len,
                "LUKS key material",
            )?);
            self.cipher_with(&slot_key)?.decrypt(0, &mut split);
            let master = hash::af_merge(self.hash, key_len, slot.stripes as usize, &split)?;
            let mut digest = Zeroizing::new([0u8; DIGEST_LEN]);
            hash::pbkdf2(
                self.hash,
                &master,
                &self.mk_salt,
                self.mk_iterations,
                digest.as_mut(),
            )?;
            Ok((*digest == self.mk_digest).then_some(master))
        }

        /// The file offset and length of `slot`'s key material, checked to lie inside the
        /// encryption header area `ext`.
        pub(crate) fn material_range(
            &self,
            ext: &EncryptionExtension,
            slot: &KeySlot,
        ) -> Result<(u64, u64)> {
            let material_len = u64::from(self.key_bytes).saturating_mul(u64::from(slot.stripes));
            let material_at = u64::from(slot.key_offset_sector).saturating_mul(SECTOR_SIZE);
            if material_at.saturating_add(material_len) > ext.length {
                // QEMU: "Request for data outside of extension header".
                return Err(Error::malformed(
                    format!(
                        "LUKS key material at {material_at:#x} ({material_len} bytes) lies outside the encryption header area of {} bytes",
                        ext.length
                    ),
                    ext.offset,
                ));
            }
            Ok((ext.offset.saturating_add(material_at), material_len))
        }

        /// The cipher of this header keyed with `key` (a slot key or the master key).
        pub(crate) fn cipher_with(&self, key: &[u8]) -> Result<SectorCipher> {
            SectorCipher::new(
                self.cipher,
                self.mode,
                self.ivgen,
                self.ivgen_cipher,
                self.ivgen_hash,
                key,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header as QEMU writes it for aes-256-xts-plain64 / sha256, one active slot.
    fn valid() -> Vec<u8> {
        let mut h = Vec::new();
        h.extend(MAGIC); // 0: magic
        h.extend(1u16.to_be_bytes()); // 6: version
        let name = |s: &str| {
            let mut f = s.as_bytes().to_vec();
            f.resize(NAME_LEN, 0);
            f
        };
        h.extend(name("aes")); // 8: cipher_name
        h.extend(name("xts-plain64")); // 40: cipher_mode
        h.extend(name("sha256")); // 72: hash_spec
        h.extend(4096u32.to_be_bytes()); // 104: payload_offset (sectors)
        h.extend(64u32.to_be_bytes()); // 108: key_bytes
        h.extend([0xd1; 20]); // 112: mk_digest
        h.extend([0x5a; 32]); // 132: mk_digest_salt
        h.extend(1000u32.to_be_bytes()); // 164: mk_digest_iter
        let mut uuid = b"cf20bdcc-1c9e-49b9-88eb-50100a72dc2e".to_vec();
        uuid.resize(UUID_LEN, 0);
        h.extend(uuid); // 168: uuid
        for i in 0..8u32 {
            // 208 + 48 i: key slot i; 64-byte keys take 500 sectors, rounded to 504
            let active = if i == 0 { SLOT_ENABLED } else { SLOT_DISABLED };
            h.extend(active.to_be_bytes()); // active
            h.extend(if i == 0 { 2000u32 } else { 0 }.to_be_bytes()); // iterations
            h.extend([i as u8; 32]); // salt
            h.extend((8 + 504 * i).to_be_bytes()); // key_offset (sectors)
            h.extend(STRIPES.to_be_bytes()); // stripes
        }
        assert_eq!(h.len() as u64, HEADER_LEN);
        h
    }

    fn set_u32(h: &mut [u8], at: usize, v: u32) {
        h[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    fn set_name(h: &mut [u8], at: usize, s: &str) {
        h[at..at + NAME_LEN].fill(0);
        h[at..at + s.len()].copy_from_slice(s.as_bytes());
    }
    fn malformed_at(h: &[u8]) -> u64 {
        match LuksHeader::parse(h, 0x10000) {
            Err(Error::Malformed { offset, .. }) => offset - 0x10000,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }
    fn unsupported(h: &[u8]) -> String {
        match LuksHeader::parse(h, 0) {
            Err(Error::UnsupportedEncryption { what }) => what,
            other => panic!("expected UnsupportedEncryption, got {other:?}"),
        }
    }

    #[test]
    fn valid_header_parses() {
        let h = LuksHeader::parse(&valid(), 0).unwrap();
        assert_eq!(h.cipher, CipherAlg::Aes256);
        assert_eq!(h.mode, CipherMode::Xts);
        assert_eq!(h.ivgen, IvGenAlg::Plain64);
        assert_eq!(h.hash, HashAlg::Sha256);
        let info = h.info();
        assert_eq!(info.payload_offset, Some(4096 * 512));
        assert_eq!(info.slots.len(), 8);
        assert_eq!(info.slots[0].iters, Some(2000));
        assert_eq!(info.slots[1].iters, None);
        assert_eq!(info.slots[1].key_offset, 512 * 512);
        assert_eq!(
            info.uuid.as_deref(),
            Some("cf20bdcc-1c9e-49b9-88eb-50100a72dc2e")
        );
    }

    #[test]
    fn encode_is_the_inverse_of_parse() {
        let bytes = valid();
        let parsed = LuksHeader::parse(&bytes, 0).unwrap();
        assert_eq!(parsed.encode().unwrap(), bytes);
        // An IV hash with plain64 is kept in the mode string, as QEMU writes it.
        let mut h = valid();
        set_name(&mut h, AT_CIPHER_MODE, "cbc-plain64:sha1");
        set_name(&mut h, AT_CIPHER_NAME, "twofish");
        set_u32(&mut h, AT_KEY_BYTES, 32);
        let parsed = LuksHeader::parse(&h, 0).unwrap();
        assert_eq!(parsed.mode_spec(), "cbc-plain64:sha1");
        assert_eq!(parsed.cipher, CipherAlg::Twofish256);
        assert_eq!(parsed.encode().unwrap(), h);
    }

    #[test]
    fn key_material_is_counted_in_4k_units() {
        assert_eq!(key_material_sectors(64, STRIPES), 504); // 500 sectors, rounded up
        assert_eq!(key_material_sectors(32, STRIPES), 256); // 250
        assert_eq!(key_material_sectors(24, STRIPES), 192); // 187.5
        assert_eq!(key_material_sectors(16, STRIPES), 128); // 125
        assert_eq!(key_material_sectors(0, STRIPES), 0);
    }

    #[test]
    fn qemus_header_checks() {
        let mut h = valid();
        h[0] = b'l';
        assert_eq!(malformed_at(&h), 0);
        let mut h = valid();
        h[7] = 2; // LUKS2
        assert_eq!(malformed_at(&h), 6);
        let mut h = valid();
        h[AT_CIPHER_NAME..AT_CIPHER_NAME + NAME_LEN].fill(b'a');
        assert_eq!(malformed_at(&h), AT_CIPHER_NAME as u64);
        let mut h = valid();
        set_u32(&mut h, AT_PAYLOAD_OFFSET, 7);
        assert_eq!(malformed_at(&h), AT_PAYLOAD_OFFSET as u64);
        let mut h = valid();
        set_u32(&mut h, AT_MK_ITERATIONS, 0);
        assert_eq!(malformed_at(&h), AT_MK_ITERATIONS as u64);
        let slot = |i: usize, field: usize| AT_KEY_SLOTS + KEY_SLOT_LEN * i + field;
        let mut h = valid();
        set_u32(&mut h, slot(3, 44), 3999); // stripes
        assert_eq!(malformed_at(&h), slot(3, 44) as u64);
        let mut h = valid();
        set_u32(&mut h, slot(2, 0), 1); // neither enabled nor disabled
        assert_eq!(malformed_at(&h), slot(2, 0) as u64);
        let mut h = valid();
        set_u32(&mut h, slot(0, 4), 0); // active, no iterations
        assert_eq!(malformed_at(&h), slot(0, 4) as u64);
        let mut h = valid();
        set_u32(&mut h, slot(0, 40), 7); // key material inside the header
        assert_eq!(malformed_at(&h), slot(0, 40) as u64);
        let mut h = valid();
        set_u32(&mut h, slot(7, 40), 4000); // into the payload
        assert_eq!(malformed_at(&h), slot(7, 40) as u64);
        let mut h = valid();
        set_u32(&mut h, slot(5, 40), 8 + 504 * 4); // on slot 4
        assert_eq!(malformed_at(&h), slot(4, 40) as u64);
        let mut h = valid();
        set_u32(&mut h, slot(5, 40), u32::MAX); // no overflow
        assert_eq!(malformed_at(&h), slot(5, 40) as u64);
        let mut h = valid();
        set_u32(&mut h, AT_KEY_BYTES, u32::MAX); // huge key material: overlaps the payload
        assert!(LuksHeader::parse(&h, 0).is_err());
        let mut h = valid();
        set_name(&mut h, AT_CIPHER_MODE, "xts");
        assert_eq!(malformed_at(&h), AT_CIPHER_MODE as u64);
        let mut h = valid();
        set_name(&mut h, AT_CIPHER_MODE, "cbc-essiv");
        set_u32(&mut h, AT_KEY_BYTES, 32);
        assert_eq!(malformed_at(&h), AT_CIPHER_MODE as u64);
        assert!(LuksHeader::parse(&valid()[..100], 0).is_err());
    }

    #[test]
    fn a_slot_costs_its_pbkdf2_blocks() {
        // aes-256-xts: a 64-byte key. Slot 0: 2000 iterations, 4000 stripes; master key 1000.
        let work = |hash: &str| {
            let mut h = valid();
            set_name(&mut h, AT_HASH_SPEC, hash);
            let parsed = LuksHeader::parse(&h, 0).unwrap();
            parsed.slot_work(&parsed.slots[0])
        };
        // Two 32-byte SHA-256 blocks per iteration and per stripe merged.
        assert_eq!(work("sha256"), 2 * 2000 + 2 * 3999 + 1000);
        // Four 20-byte SHA-1 blocks: twice as many.
        assert_eq!(work("sha1"), 4 * 2000 + 4 * 3999 + 1000);
        // One 64-byte SHA-512 block.
        assert_eq!(work("sha512"), 2000 + 3999 + 1000);
        // The largest a header can declare does not overflow.
        let mut h = valid();
        set_name(&mut h, AT_HASH_SPEC, "sha1");
        set_u32(&mut h, AT_KEY_SLOTS + 4, u32::MAX);
        set_u32(&mut h, AT_MK_ITERATIONS, u32::MAX);
        let parsed = LuksHeader::parse(&h, 0).unwrap();
        assert_eq!(
            parsed.slot_work(&parsed.slots[0]),
            4 * u64::from(u32::MAX) + 4 * 3999 + u64::from(u32::MAX)
        );
    }

    #[test]
    fn algorithms_are_refused_by_name() {
        let mut h = valid();
        set_name(&mut h, AT_CIPHER_NAME, "sm4");
        assert!(unsupported(&h).contains("sm4"));
        let mut h = valid();
        set_name(&mut h, AT_CIPHER_MODE, "gcm-plain64");
        assert!(unsupported(&h).contains("gcm"));
        let mut h = valid();
        set_name(&mut h, AT_HASH_SPEC, "sha2566");
        assert!(unsupported(&h).contains("sha2566"));
        let mut h = valid();
        set_name(&mut h, AT_CIPHER_MODE, "xts-essiv:sha1"); // no 20-byte AES key
        assert!(unsupported(&h).contains("ESSIV"));
        let mut h = valid();
        set_name(&mut h, AT_CIPHER_MODE, "cbc-essiv:sha256");
        set_u32(&mut h, AT_KEY_BYTES, 16);
        let parsed = LuksHeader::parse(&h, 0).unwrap();
        assert_eq!(parsed.cipher, CipherAlg::Aes128);
        assert_eq!(
            parsed.ivgen_cipher,
            CipherAlg::Aes256,
            "dm-crypt's ESSIV quirk"
        );
    }
}
