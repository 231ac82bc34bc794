//! New LUKS payloads: the LUKS1 header a new encrypted image carries (key slot 0 opened by the
//! caller's secret, QEMU's default cipher and iteration time), and the cipher its data
//! clusters are encrypted with.
//!
//! This follows QEMU's `qcrypto_block_luks_create`: a random master key, its PBKDF2 digest,
//! and slot 0 holding the master key split into 4000 anti-forensic stripes and encrypted with
//! a key derived from the secret. The PBKDF2 iteration counts come from QEMU's formulas over
//! a measured rate of this machine; only the measurement is shorter than QEMU's (a tenth of a
//! second instead of one to two), so that making an image does not wait for it.

use std::time::Duration;

use super::names::{CipherAlg, CipherMode, HashAlg, IvGenAlg};
use super::Secret;
use crate::error::{Error, Result};

/// QEMU's default `encrypt.iter-time`, in milliseconds.
pub(crate) const DEFAULT_ITER_TIME_MS: u64 = 2000;

/// A cipher `encrypt.cipher-alg` may name: QEMU's whole enum, of which a LUKS header can hold
/// all but `des`, `3des` and `sm4` (QEMU refuses those when it creates the header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CipherChoice {
    Luks(CipherAlg),
    NotLuks(&'static str),
}

impl CipherChoice {
    fn from_name(name: &str) -> Option<Self> {
        if let Some(alg) = CipherAlg::from_name(name) {
            return Some(CipherChoice::Luks(alg));
        }
        ["des", "3des", "sm4"]
            .into_iter()
            .find(|n| *n == name)
            .map(CipherChoice::NotLuks)
    }
}

/// How a new image is encrypted: `qemu-img create -o encrypt.format=luks,encrypt.*`.
///
/// Defaults are QEMU's: `aes-256` in `xts` mode, `plain64` IVs, `sha256`, key slot 0
/// derived with PBKDF2 for 2000 ms (`encrypt.iter-time`).
///
/// ```
/// use std::time::Duration;
///
/// let mut options = qcow2::LuksOptions::new("passphrase").iter_time(Duration::from_millis(500));
/// options.set("cipher-alg", "twofish-256")?;
/// options.set("cipher-mode", "cbc")?;
/// options.set("ivgen-alg", "essiv")?; // hashed with sha256 unless ivgen-hash-alg says
///
/// // What qemu-img refuses is refused, in its words.
/// let refused = options.set("cipher-alg", "aes256").unwrap_err();
/// assert_eq!(
///     refused.to_string(),
///     "Parameter 'cipher-alg' does not accept value 'aes256'"
/// );
/// # Ok::<(), qcow2::Error>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LuksOptions {
    secret: Secret,
    cipher: CipherChoice,
    mode: CipherMode,
    ivgen: IvGenAlg,
    /// As given; ESSIV without one uses SHA-256.
    ivgen_hash: Option<HashAlg>,
    hash: HashAlg,
    iter_time_ms: u64,
}

impl LuksOptions {
    /// LUKS with QEMU's defaults, key slot 0 opened by `secret`.
    #[must_use]
    pub fn new(secret: impl Into<Secret>) -> Self {
        LuksOptions {
            secret: secret.into(),
            cipher: CipherChoice::Luks(CipherAlg::Aes256),
            mode: CipherMode::Xts,
            ivgen: IvGenAlg::Plain64,
            ivgen_hash: None,
            hash: HashAlg::Sha256,
            iter_time_ms: DEFAULT_ITER_TIME_MS,
        }
    }

    /// How long deriving the key of slot 0 from the secret takes on this machine
    /// (`encrypt.iter-time`, whole milliseconds; QEMU's default is 2 s). The master key's
    /// digest gets an eighth of it. Both take at least 1000 PBKDF2 iterations.
    ///
    /// The iterations are counted from how fast this build computes PBKDF2, as QEMU counts
    /// them: an unoptimized (debug) build is some 35 times slower and so writes that many
    /// fewer iterations, a header an attacker's optimized code tries passwords against that
    /// much faster. Make encrypted images with an optimized build (`--release`, or
    /// `opt-level = 3` for this crate and its `pbkdf2`, `hmac` and `sha2` in the dev profile).
    #[must_use]
    pub fn iter_time(mut self, time: Duration) -> Self {
        self.iter_time_ms = u64::try_from(time.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// Set one `encrypt.*` option by its qemu-img name without the `encrypt.` prefix
    /// (`cipher-alg`, `cipher-mode`, `ivgen-alg`, `ivgen-hash-alg`, `hash-alg`,
    /// `iter-time`) and with QEMU's value spellings (`aes-256`, `xts`, `plain64`, `sha256`,
    /// milliseconds); QEMU's message for a bad name or value, as
    /// [`Error::InvalidOption`]. `format` and `key-secret` are the caller's: this is LUKS,
    /// and the secret was given to [`LuksOptions::new`].
    ///
    /// Whether the values go together (XTS needs a cipher with 16-byte blocks, ESSIV a
    /// cipher keyed by its hash's digest) is checked when the image is made, before anything
    /// is written, as QEMU checks it.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        match key {
            "cipher-alg" => self.cipher = enum_value(key, value, CipherChoice::from_name)?,
            "cipher-mode" => self.mode = enum_value(key, value, CipherMode::from_name)?,
            "ivgen-alg" => self.ivgen = enum_value(key, value, IvGenAlg::from_name)?,
            "ivgen-hash-alg" => {
                self.ivgen_hash = Some(enum_value(key, value, HashAlg::from_name)?);
            }
            "hash-alg" => self.hash = enum_value(key, value, HashAlg::from_name)?,
            "iter-time" => self.iter_time_ms = number_value(key, value)?,
            _ => return Err(refused(key, format!("Invalid parameter 'encrypt.{key}'"))),
        }
        Ok(())
    }
}

/// `Error::InvalidOption` for `encrypt.{key}`.
fn refused(key: &str, message: String) -> Error {
    Error::InvalidOption {
        option: format!("encrypt.{key}"),
        message,
    }
}

/// An enum option's value, or QEMU's (QAPI's) refusal, which names the option without its
/// prefix.
fn enum_value<T>(key: &str, value: &str, parse: impl Fn(&str) -> Option<T>) -> Result<T> {
    parse(value).ok_or_else(|| {
        refused(
            key,
            format!("Parameter '{key}' does not accept value '{value}'"),
        )
    })
}

/// A number option as QEMU's option parser reads it (`qemu_strtou64`, base 0): leading
/// blanks, an optional sign (a minus wraps around, as `strtoull`'s does), then decimal,
/// `0x` hexadecimal or `0` octal digits and nothing after them.
pub(crate) fn number_value(key: &str, value: &str) -> Result<u64> {
    let not_a_number = || refused(key, format!("Parameter 'encrypt.{key}' expects a number"));
    let text = value.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (radix, digits) =
        if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            (16, hex)
        } else if text.len() > 1 && text.starts_with('0') {
            (8, text.get(1..).unwrap_or_default())
        } else {
            (10, text)
        };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(not_a_number());
    }
    let magnitude = u64::from_str_radix(digits, radix).map_err(|_| {
        refused(
            key,
            format!("Value '{value}' is too large for parameter 'encrypt.{key}'"),
        )
    })?;
    Ok(if negative {
        magnitude.wrapping_neg()
    } else {
        magnitude
    })
}

#[cfg(feature = "encryption")]
pub(crate) use build::{new_luks, random, slot_iterations, slot_material};

#[cfg(feature = "encryption")]
mod build {
    use std::time::{Duration, Instant};

    use zeroize::Zeroizing;

    use super::{refused, CipherChoice, LuksOptions};
    use crate::crypt::cipher::SectorCipher;
    use crate::crypt::hash;
    use crate::crypt::luks::{
        key_material_sectors, KeySlot, LuksHeader, DIGEST_LEN, KEY_SLOT_OFFSET_SECTORS,
        NUM_KEY_SLOTS, SALT_LEN, STRIPES,
    };
    use crate::crypt::names::{CipherAlg, CipherMode, HashAlg, IvGenAlg};
    use crate::crypt::SECTOR_SIZE;
    use crate::error::{Error, Result};

    /// QEMU's least PBKDF2 iterations for a key slot and for the master key digest.
    const MIN_SLOT_KEY_ITERS: u64 = 1000;
    const MIN_MASTER_KEY_ITERS: u64 = 1000;
    /// The master key digest gets an eighth of the iteration time (QEMU follows cryptsetup).
    const MASTER_KEY_SHARE: u64 = 8;
    /// Calibration: a run shorter than this is not trusted (QEMU: 500 ms of thread time)...
    const CALIBRATION_MIN_MICROS: u64 = 50_000;
    /// ... one shorter than this is repeated ten times longer (QEMU: 100 ms), a longer one
    /// is repeated aiming at this (QEMU: 1 s)...
    const CALIBRATION_FAST_MICROS: u64 = 10_000;
    const CALIBRATION_AIM_MICROS: u64 = 100_000;
    /// ... and the measurement ends after this many runs whatever the clock says.
    const CALIBRATION_MAX_RUNS: usize = 6;

    /// A new LUKS header, ready to be written into the image, and the payload cipher it
    /// protects.
    pub(crate) struct NewLuks {
        /// The whole LUKS area (header and key material), to be stored at the offset the
        /// full-disk-encryption header extension names; its length is a multiple of 512, the
        /// header's payload offset (QEMU gives the extension this length).
        pub(crate) area: Vec<u8>,
        /// The cipher for the image's data clusters (IVs from host sectors, as QEMU's qcow2
        /// LUKS uses).
        // Read by the tests that encrypt payloads with it; the writer of a new image unlocks
        // the image it made instead, as any reader does.
        #[cfg_attr(not(test), allow(dead_code))]
        pub(crate) cipher: SectorCipher,
    }

    /// The algorithms of a header, once QEMU's checks have passed.
    #[derive(Debug, Clone, Copy)]
    struct Algorithms {
        cipher: CipherAlg,
        mode: CipherMode,
        ivgen: IvGenAlg,
        ivgen_hash: Option<HashAlg>,
        ivgen_cipher: CipherAlg,
        hash: HashAlg,
    }

    impl Algorithms {
        /// The master key length: one key per cipher, two for XTS.
        fn key_bytes(&self) -> usize {
            let one = self.cipher.key_len();
            if self.mode == CipherMode::Xts {
                one.saturating_mul(2)
            } else {
                one
            }
        }
    }

    impl LuksOptions {
        /// Refuse what QEMU refuses when it creates the header (and the hashes this crate
        /// does not compute), in QEMU's order and words, before any work (tests; `new_luks`
        /// does the same first).
        #[cfg(test)]
        pub(crate) fn check(&self) -> Result<()> {
            self.algorithms().map(|_| ())
        }

        fn algorithms(&self) -> Result<Algorithms> {
            let cipher = match self.cipher {
                CipherChoice::Luks(alg) => alg,
                CipherChoice::NotLuks(name) => {
                    return Err(refused(
                        "cipher-alg",
                        format!("Algorithm '{name}' not supported"),
                    ))
                }
            };
            // ESSIV without a hash named hashes with SHA-256, and says so in the header.
            let ivgen_hash = match (self.ivgen, self.ivgen_hash) {
                (IvGenAlg::Essiv, None) => Some(HashAlg::Sha256),
                (_, named) => named,
            };
            let built_in = |key: &str, h: HashAlg| {
                if hash::is_built_in(h) {
                    Ok(())
                } else {
                    Err(refused(
                        key,
                        format!(
                            "Hash algorithm {} not supported by this build (qcow2 computes \
                             sha1, sha224, sha256, sha384 and sha512)",
                            h.name()
                        ),
                    ))
                }
            };
            built_in("hash-alg", self.hash)?;
            let ivgen_cipher = match (self.ivgen, ivgen_hash) {
                (IvGenAlg::Essiv, Some(h)) => {
                    built_in("ivgen-hash-alg", h)?;
                    essiv_cipher(cipher, h)?
                }
                _ => cipher,
            };
            if self.mode == CipherMode::Xts && cipher.block_len() != 16 {
                return Err(refused(
                    "cipher-mode",
                    "Unsupported cipher mode xts".to_owned(),
                ));
            }
            // A 24-byte key outside XTS splits into 4000 stripes that end mid-sector: QEMU
            // (10.0) aborts making or reading such a header, so none is made.
            let material = (cipher.key_len() as u64).saturating_mul(u64::from(STRIPES));
            if self.mode != CipherMode::Xts && material.checked_rem(SECTOR_SIZE) != Some(0) {
                return Err(refused(
                    "cipher-alg",
                    format!(
                        "Algorithm {} in {} mode not supported: its LUKS key material is not \
                         whole 512-byte sectors, which QEMU cannot encrypt",
                        cipher.name(),
                        self.mode.name()
                    ),
                ));
            }
            Ok(Algorithms {
                cipher,
                mode: self.mode,
                ivgen: self.ivgen,
                ivgen_hash,
                ivgen_cipher,
                hash: self.hash,
            })
        }
    }

    /// QEMU's `qcrypto_block_luks_essiv_cipher`: the cipher of the same family keyed by the
    /// whole digest, or its refusal.
    fn essiv_cipher(cipher: CipherAlg, hash: HashAlg) -> Result<CipherAlg> {
        let len = hash.digest_len();
        cipher.with_key_len(len).ok_or_else(|| {
            let family = match cipher.luks_name() {
                "aes" => "AES",
                "serpent" => "Serpent",
                "twofish" => "Twofish",
                _ => {
                    return refused(
                        "ivgen-alg",
                        format!("Cipher {} not supported with essiv", cipher.name()),
                    )
                }
            };
            refused(
                "ivgen-hash-alg",
                format!("No {family} cipher with key size {len} available"),
            )
        })
    }

    /// Fill `buf` with the operating system's random bytes.
    pub(crate) fn random(buf: &mut [u8]) -> Result<()> {
        getrandom::fill(buf).map_err(|e| Error::Io {
            context: "getting random bytes for a LUKS header".to_owned(),
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// A version 4 UUID in QEMU's text form (lower-case hex, 8-4-4-4-12).
    fn random_uuid() -> Result<String> {
        let mut b = [0u8; 16];
        random(&mut b)?;
        if let Some(version) = b.get_mut(6) {
            *version = (*version & 0x0f) | 0x40;
        }
        if let Some(variant) = b.get_mut(8) {
            *variant = (*variant & 0x3f) | 0x80;
        }
        let hex = |r: std::ops::Range<usize>| -> String {
            b.get(r)
                .unwrap_or_default()
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect()
        };
        Ok(format!(
            "{}-{}-{}-{}-{}",
            hex(0..4),
            hex(4..6),
            hex(6..8),
            hex(8..10),
            hex(10..16)
        ))
    }

    /// A stopwatch on this thread's CPU time where the platform has that clock, as QEMU
    /// measures (time other processes take the CPU does not count), else on wall time.
    #[derive(Debug, Clone, Copy)]
    struct Stopwatch {
        cpu: Option<Duration>,
        wall: Instant,
    }

    impl Stopwatch {
        fn start() -> Self {
            Stopwatch {
                cpu: thread_cpu_time(),
                wall: Instant::now(),
            }
        }

        fn micros(self) -> u64 {
            let elapsed = match (self.cpu, thread_cpu_time()) {
                (Some(start), Some(now)) => now.saturating_sub(start),
                _ => self.wall.elapsed(),
            };
            u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
        }
    }

    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "macos"
    ))]
    fn thread_cpu_time() -> Option<Duration> {
        use rustix::time::{clock_gettime, ClockId};
        let t = clock_gettime(ClockId::ThreadCPUTime);
        Some(Duration::new(
            u64::try_from(t.tv_sec).ok()?,
            u32::try_from(t.tv_nsec).ok()?,
        ))
    }

    #[cfg(not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "macos"
    )))]
    fn thread_cpu_time() -> Option<Duration> {
        None
    }

    /// PBKDF2 blocks (one HMAC chain each, whatever the key) of `hash` this machine computes
    /// per second: QEMU's `qcrypto_pbkdf2_count_iters` with a tenth of its run time.
    fn pbkdf2_blocks_per_second(hash: HashAlg) -> Result<u64> {
        let mut out = Zeroizing::new(vec![0u8; hash.digest_len()]);
        let mut iterations: u64 = 1 << 10;
        let mut per_second = 0;
        for _ in 0..CALIBRATION_MAX_RUNS {
            let rounds = u32::try_from(iterations).unwrap_or(u32::MAX);
            let start = Stopwatch::start();
            hash::pbkdf2(hash, b"calibration", &[0; SALT_LEN], rounds, &mut out)?;
            let micros = start.micros().max(1);
            per_second = u64::from(rounds)
                .saturating_mul(1_000_000)
                .checked_div(micros)
                .unwrap_or(0);
            if micros > CALIBRATION_MIN_MICROS {
                break;
            }
            iterations = if micros < CALIBRATION_FAST_MICROS {
                iterations.saturating_mul(10)
            } else {
                iterations
                    .saturating_mul(CALIBRATION_AIM_MICROS)
                    .checked_div(micros)
                    .unwrap_or(iterations)
            };
        }
        Ok(per_second.max(1))
    }

    /// QEMU's iteration count for a PBKDF2 output of `out_len` bytes: the iterations per
    /// second (blocks per second over the blocks of the output), scaled to `iter_time_ms`,
    /// divided by `share`, checked against `u32`, and at least `min`.
    fn iterations(
        blocks_per_second: u64,
        hash: HashAlg,
        out_len: usize,
        iter_time_ms: u64,
        share: u64,
        min: u64,
    ) -> Result<u32> {
        let out_of_range = |message: String| {
            refused(
                "iter-time",
                format!("{message}: Numerical result out of range"),
            )
        };
        let blocks = out_len.div_ceil(hash.digest_len().max(1)).max(1) as u64;
        let per_second = blocks_per_second.checked_div(blocks).unwrap_or(0);
        // QEMU divides by the iteration time here; with 0 it has nothing to scale.
        if u64::MAX
            .checked_div(iter_time_ms)
            .is_some_and(|m| per_second > m)
        {
            return Err(out_of_range(format!(
                "PBKDF iterations {per_second} too large to scale"
            )));
        }
        let scaled = (per_second.saturating_mul(iter_time_ms) / 1000)
            .checked_div(share)
            .unwrap_or(0);
        let Ok(scaled) = u32::try_from(scaled) else {
            return Err(out_of_range(format!(
                "PBKDF iterations {scaled} larger than {}",
                u32::MAX
            )));
        };
        Ok(scaled.max(u32::try_from(min).unwrap_or(u32::MAX)))
    }

    /// QEMU's PBKDF2 iteration count for a key slot of `key_bytes` bytes, calibrated on this
    /// machine for `iter_time_ms` (as `qcrypto_block_luks_store_key` counts it).
    pub(crate) fn slot_iterations(
        hash: HashAlg,
        key_bytes: usize,
        iter_time_ms: u64,
    ) -> Result<u32> {
        let blocks_per_second = pbkdf2_blocks_per_second(hash)?;
        iterations(
            blocks_per_second,
            hash,
            key_bytes,
            iter_time_ms,
            1,
            MIN_SLOT_KEY_ITERS,
        )
    }

    /// Make a new LUKS header for `options`: QEMU's `qcrypto_block_luks_create` with slot 0
    /// opened by the options' secret.
    pub(crate) fn new_luks(options: &LuksOptions) -> Result<NewLuks> {
        let algs = options.algorithms()?;
        let password = options.secret.passphrase()?.as_bytes();
        let key_bytes = algs.key_bytes();
        let key_bytes_u32 =
            u32::try_from(key_bytes).map_err(|_| Error::Internal("LUKS key length"))?;

        let mut master_key = Zeroizing::new(vec![0u8; key_bytes]);
        random(&mut master_key)?;
        let mut mk_salt = [0u8; SALT_LEN];
        random(&mut mk_salt)?;
        let mut slot_salt = [0u8; SALT_LEN];
        random(&mut slot_salt)?;

        let blocks_per_second = pbkdf2_blocks_per_second(algs.hash)?;
        let mk_iterations = iterations(
            blocks_per_second,
            algs.hash,
            DIGEST_LEN,
            options.iter_time_ms,
            MASTER_KEY_SHARE,
            MIN_MASTER_KEY_ITERS,
        )?;
        let mut mk_digest = [0u8; DIGEST_LEN];
        hash::pbkdf2(
            algs.hash,
            &master_key,
            &mk_salt,
            mk_iterations,
            &mut mk_digest,
        )?;

        let slot_iterations = iterations(
            blocks_per_second,
            algs.hash,
            key_bytes,
            options.iter_time_ms,
            1,
            MIN_SLOT_KEY_ITERS,
        )?;

        // Key material: slot i at 4 KiB + i material lengths, the payload after all eight.
        let material_sectors = key_material_sectors(key_bytes_u32, STRIPES);
        let sector_at = |slot: u64| -> Result<u32> {
            slot.checked_mul(material_sectors)
                .and_then(|s| s.checked_add(KEY_SLOT_OFFSET_SECTORS))
                .and_then(|s| u32::try_from(s).ok())
                .ok_or(Error::Internal("LUKS key material offset"))
        };
        let slots = (0..NUM_KEY_SLOTS as u64)
            .map(|i| {
                Ok(KeySlot {
                    active: i == 0,
                    iterations: if i == 0 { slot_iterations } else { 0 },
                    salt: if i == 0 { slot_salt } else { [0; SALT_LEN] },
                    key_offset_sector: sector_at(i)?,
                    stripes: STRIPES,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let header = LuksHeader {
            cipher: algs.cipher,
            mode: algs.mode,
            ivgen: algs.ivgen,
            ivgen_hash: algs.ivgen_hash,
            ivgen_cipher: algs.ivgen_cipher,
            hash: algs.hash,
            payload_offset_sector: sector_at(NUM_KEY_SLOTS as u64)?,
            key_bytes: key_bytes_u32,
            mk_digest,
            mk_salt,
            mk_iterations,
            uuid: random_uuid()?,
            slots,
            at: 0,
        };

        let material = slot_material(&header, password, &master_key, &slot_salt, slot_iterations)?;
        let area_len = u64::from(header.payload_offset_sector).saturating_mul(SECTOR_SIZE);
        let material_at = KEY_SLOT_OFFSET_SECTORS.saturating_mul(SECTOR_SIZE);
        let mut area =
            vec![0u8; usize::try_from(area_len).map_err(|_| Error::Internal("LUKS area"))?];
        let encoded = header.encode()?;
        copy_into(&mut area, 0, &encoded)?;
        copy_into(&mut area, material_at, &material)?;
        Ok(NewLuks {
            area,
            cipher: header.cipher_with(&master_key)?,
        })
    }

    /// Slot 0's key material: the master key split into [`STRIPES`] stripes, encrypted with
    /// the key PBKDF2 derives from the password, sector numbers from 0.
    pub(crate) fn slot_material(
        header: &LuksHeader,
        password: &[u8],
        master_key: &[u8],
        salt: &[u8; SALT_LEN],
        iterations: u32,
    ) -> Result<Vec<u8>> {
        let mut slot_key = Zeroizing::new(vec![0u8; master_key.len()]);
        hash::pbkdf2(header.hash, password, salt, iterations, &mut slot_key)?;
        let stripes = STRIPES as usize;
        let mut split = Zeroizing::new(vec![0u8; master_key.len().saturating_mul(stripes)]);
        random(&mut split)?;
        hash::af_split(header.hash, master_key, stripes, &mut split)?;
        header.cipher_with(&slot_key)?.encrypt(0, &mut split);
        Ok(split.to_vec())
    }

    fn copy_into(area: &mut [u8], at: u64, bytes: &[u8]) -> Result<()> {
        let at = usize::try_from(at).map_err(|_| Error::Internal("LUKS area offset"))?;
        area.get_mut(at..at.saturating_add(bytes.len()))
            .ok_or(Error::Internal("LUKS area too small"))?
            .copy_from_slice(bytes);
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use crate::base::testing::run;
        use std::path::{Path, PathBuf};
        use std::process::Command;
        use std::time::Duration;

        use super::*;
        use crate::crypt::KdfBudget;
        use crate::format::extension::EncryptionExtension;

        const PASS: &str = "correct horse";

        fn options(pairs: &[(&str, &str)]) -> LuksOptions {
            let mut o = LuksOptions::new(PASS).iter_time(Duration::from_millis(10));
            for (k, v) in pairs {
                o.set(k, v).unwrap();
            }
            o
        }

        fn parse(new: &NewLuks) -> LuksHeader {
            LuksHeader::parse(&new.area, 0).unwrap()
        }

        fn unlock(new: &NewLuks, secret: &str) -> Result<SectorCipher> {
            let ext = EncryptionExtension {
                offset: 0,
                length: new.area.len() as u64,
            };
            parse(new).unlock(
                &new.area.as_slice(),
                &ext,
                secret.as_bytes(),
                &KdfBudget::new(u64::MAX),
            )
        }

        /// Data encrypted with the new cipher decrypts with the one unlocked from the
        /// header, sector numbers and all.
        fn assert_same_cipher(made: &SectorCipher, unlocked: &SectorCipher) {
            let plain: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 251) as u8).collect();
            let mut data = plain.clone();
            made.encrypt(1234, &mut data);
            assert_ne!(data, plain);
            unlocked.decrypt(1234, &mut data);
            assert_eq!(data, plain);
        }

        #[test]
        fn defaults_make_qemus_header_and_layout() {
            let new = new_luks(&options(&[])).unwrap();
            // QEMU's aes-256-xts area: 4 KiB header, 8 slots of 504 sectors.
            assert_eq!(new.area.len(), 2_068_480);
            let h = parse(&new);
            assert_eq!(h.cipher, CipherAlg::Aes256);
            assert_eq!(h.mode, CipherMode::Xts);
            assert_eq!(h.ivgen, IvGenAlg::Plain64);
            assert_eq!(h.ivgen_hash, None);
            assert_eq!(h.hash, HashAlg::Sha256);
            assert_eq!(h.key_bytes, 64);
            assert_eq!(h.payload_offset_sector, 4040);
            assert_eq!(h.mode_spec(), "xts-plain64");
            assert!(h.mk_iterations >= 1000 && h.slots[0].iterations >= 1000);
            for (i, slot) in h.slots.iter().enumerate() {
                assert_eq!(slot.active, i == 0);
                assert_eq!(slot.key_offset_sector, 8 + 504 * i as u32);
                assert_eq!(slot.stripes, STRIPES);
                if i > 0 {
                    assert_eq!((slot.iterations, slot.salt), (0, [0; SALT_LEN]));
                }
            }
            // Version 4 UUID in lower-case text.
            let u = h.uuid.as_bytes();
            assert_eq!(u.len(), 36);
            assert_eq!(
                (u[8], u[13], u[14], u[18], u[23]),
                (b'-', b'-', b'4', b'-', b'-')
            );
            assert!(b"89ab".contains(&u[19]));
            assert!(h
                .uuid
                .chars()
                .all(|c| c == '-' || c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
            // Between the header and slot 0, and after slot 0's material, zeros.
            assert!(new.area[592..4096].iter().all(|&b| b == 0));
            assert!(new.area[4096 + 256_000..].iter().all(|&b| b == 0));
            // Two headers differ in every random part.
            let other = parse(&new_luks(&options(&[])).unwrap());
            assert_ne!(other.uuid, h.uuid);
            assert_ne!(other.mk_salt, h.mk_salt);
            assert_ne!(other.slots[0].salt, h.slots[0].salt);
        }

        #[test]
        fn unlocks_with_the_secret_and_only_with_it() {
            let new = new_luks(&options(&[])).unwrap();
            let unlocked = unlock(&new, PASS).unwrap();
            assert_same_cipher(&new.cipher, &unlocked);
            assert!(matches!(
                unlock(&new, "correct horsf"),
                Err(Error::WrongSecret { slots_tried: 1 })
            ));
        }

        /// Every family, mode and IV generator QEMU can make, with each hash built in.
        const COMBINATIONS: &[&[(&str, &str)]] = &[
            &[],
            &[
                ("cipher-alg", "aes-128"),
                ("cipher-mode", "cbc"),
                ("ivgen-alg", "essiv"),
                ("hash-alg", "sha1"),
            ],
            &[
                ("cipher-alg", "twofish-192"),
                ("ivgen-alg", "plain"),
                ("hash-alg", "sha512"),
            ],
            &[
                ("cipher-alg", "serpent-256"),
                ("cipher-mode", "ctr"),
                ("hash-alg", "sha384"),
            ],
            &[
                ("cipher-alg", "cast5-128"),
                ("cipher-mode", "cbc"),
                ("hash-alg", "sha224"),
            ],
            &[("cipher-alg", "aes-256"), ("cipher-mode", "ecb")],
            &[
                ("cipher-alg", "aes-192"),
                ("ivgen-alg", "essiv"),
                ("hash-alg", "sha1"),
            ],
            &[
                ("cipher-alg", "serpent-128"),
                ("ivgen-alg", "essiv"),
                ("ivgen-hash-alg", "sha256"),
            ],
            &[("cipher-mode", "cbc"), ("ivgen-hash-alg", "sha1")],
        ];

        #[test]
        fn every_combination_unlocks() {
            for combo in COMBINATIONS {
                let new = new_luks(&options(combo)).unwrap();
                let h = parse(&new);
                let key_len = h.key_bytes as u64;
                assert_eq!(
                    u64::from(h.payload_offset_sector),
                    8 + 8 * key_material_sectors(h.key_bytes, STRIPES),
                    "{combo:?}"
                );
                assert!(key_len >= 16);
                assert_same_cipher(&new.cipher, &unlock(&new, PASS).unwrap());
            }
            // ESSIV's hash is written even when it is the default; a hash given to a
            // generator that ignores it too, as QEMU writes them.
            let spec = |c: &[(&str, &str)]| parse(&new_luks(&options(c)).unwrap()).mode_spec();
            assert_eq!(spec(COMBINATIONS[1]), "cbc-essiv:sha256");
            assert_eq!(spec(COMBINATIONS[8]), "cbc-plain64:sha1");
        }

        #[test]
        fn what_qemu_refuses_at_creation_is_refused() {
            let refused = |c: &[(&str, &str)]| match options(c).check() {
                Err(Error::InvalidOption { option, message }) => format!("{option}: {message}"),
                other => panic!("{c:?}: {other:?}"),
            };
            for (combo, expect) in [
                (
                    &[("cipher-alg", "3des")][..],
                    "encrypt.cipher-alg: Algorithm '3des' not supported",
                ),
                (
                    &[("cipher-alg", "cast5-128")],
                    "encrypt.cipher-mode: Unsupported cipher mode xts",
                ),
                (
                    &[("ivgen-alg", "essiv"), ("ivgen-hash-alg", "sha1")],
                    "encrypt.ivgen-hash-alg: No AES cipher with key size 20 available",
                ),
                (
                    &[
                        ("cipher-alg", "twofish-128"),
                        ("ivgen-alg", "essiv"),
                        ("ivgen-hash-alg", "sha384"),
                    ],
                    "encrypt.ivgen-hash-alg: No Twofish cipher with key size 48 available",
                ),
                (
                    &[
                        ("cipher-alg", "cast5-128"),
                        ("cipher-mode", "cbc"),
                        ("ivgen-alg", "essiv"),
                    ],
                    "encrypt.ivgen-alg: Cipher cast5-128 not supported with essiv",
                ),
            ] {
                assert_eq!(refused(combo), expect);
            }
            // Headers QEMU aborts on.
            for c in [
                &[("cipher-alg", "aes-192"), ("cipher-mode", "cbc")][..],
                &[("cipher-alg", "twofish-192"), ("cipher-mode", "ctr")],
            ] {
                assert!(
                    refused(c).starts_with("encrypt.cipher-alg: Algorithm "),
                    "{c:?}"
                );
            }
            // Hashes QEMU has and this crate does not compute.
            assert!(refused(&[("hash-alg", "md5")])
                .starts_with("encrypt.hash-alg: Hash algorithm md5 not supported"));
            assert!(
                refused(&[("ivgen-alg", "essiv"), ("ivgen-hash-alg", "ripemd160")])
                    .contains("ripemd160")
            );
            // ... but a hash an IV generator ignores is only written down.
            options(&[("ivgen-hash-alg", "sm3")]).check().unwrap();
            // A secret QEMU cannot take as text.
            let mut o = LuksOptions::new(vec![0xff, 0xfe]);
            o = o.iter_time(Duration::from_millis(1));
            assert!(matches!(new_luks(&o), Err(Error::SecretNotUtf8)));
        }

        #[test]
        fn iterations_follow_qemus_formulas() {
            let it = |bps, out, ms, share| iterations(bps, HashAlg::Sha256, out, ms, share, 1000);
            // 8M blocks/s; the 20-byte digest is one SHA-256 block, a 64-byte key two.
            assert_eq!(it(8_000_000, 20, 2000, 8).unwrap(), 2_000_000);
            assert_eq!(it(8_000_000, 64, 2000, 1).unwrap(), 8_000_000);
            assert_eq!(it(8_000_000, 64, 10, 1).unwrap(), 40_000);
            // Never under the minimum, even with no time at all (QEMU: 1000).
            assert_eq!(it(8_000_000, 64, 0, 1).unwrap(), 1000);
            assert_eq!(it(1, 20, 2000, 8).unwrap(), 1000);
            let message = |r: Result<u32>| match r {
                Err(Error::InvalidOption { message, .. }) => message,
                other => panic!("{other:?}"),
            };
            assert_eq!(
                message(it(8_000_000, 20, u64::MAX, 8)),
                "PBKDF iterations 8000000 too large to scale: Numerical result out of range"
            );
            assert_eq!(
                message(it(8_000_000, 20, 99_999_999_999, 8)),
                "PBKDF iterations 99999999999000 larger than 4294967295: Numerical result out of range"
            );
        }

        #[test]
        fn calibration_is_quick() {
            let start = std::time::Instant::now();
            let bps = pbkdf2_blocks_per_second(HashAlg::Sha256).unwrap();
            assert!(bps > 10_000, "{bps}");
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "{:?}",
                start.elapsed()
            );
        }

        fn temp_dir(name: &str) -> PathBuf {
            let dir = std::env::temp_dir().join(format!("qcow2-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            dir
        }

        /// A raw LUKS volume: the area, then `plain` encrypted with the payload cipher, IVs
        /// counting from the payload's first sector.
        fn write_volume(path: &Path, new: &NewLuks, plain: &[u8]) {
            let mut payload = plain.to_vec();
            new.cipher.encrypt(0, &mut payload);
            let mut file = new.area.clone();
            file.extend_from_slice(&payload);
            std::fs::write(path, file).unwrap();
        }

        #[test]
        fn qemu_reads_the_volumes() {
            let Some(img) = crate::base::testing::qemu_img("qemu_reads_the_volumes") else {
                return;
            };
            let dir = temp_dir("luks-create");
            let plain: Vec<u8> = (0..256 * 1024u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            let plain_path = dir.join("plain.raw");
            std::fs::write(&plain_path, &plain).unwrap();
            for (n, combo) in COMBINATIONS.iter().enumerate() {
                let o = options(combo);
                let new = new_luks(&o).unwrap();
                let vol = dir.join(format!("vol{n}.luks"));
                write_volume(&vol, &new, &plain);
                let secret = format!("secret,id=s0,data={PASS}");
                let luks_opts =
                    format!("driver=luks,key-secret=s0,file.filename={}", vol.display());
                let raw_opts = format!("driver=raw,file.filename={}", plain_path.display());
                let out = run(Command::new(&img).args([
                    "compare",
                    "--object",
                    &secret,
                    "--image-opts",
                    &luks_opts,
                    &raw_opts,
                ]));
                assert_eq!(
                    String::from_utf8_lossy(&out.stdout).trim(),
                    "Images are identical.",
                    "{combo:?}"
                );
                let out = run(Command::new(&img).args([
                    "info",
                    "--output=json",
                    "--object",
                    &secret,
                    "--image-opts",
                    &luks_opts,
                ]));
                let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                let data = &info["format-specific"]["data"];
                let h = parse(&new);
                assert_eq!(data["cipher-alg"], h.cipher.name(), "{combo:?}");
                assert_eq!(data["cipher-mode"], h.mode.name(), "{combo:?}");
                assert_eq!(data["ivgen-alg"], h.ivgen.name(), "{combo:?}");
                assert_eq!(data["hash-alg"], h.hash.name(), "{combo:?}");
                if h.ivgen == IvGenAlg::Essiv {
                    assert_eq!(data["ivgen-hash-alg"], h.ivgen_hash.unwrap().name());
                }
                assert_eq!(data["payload-offset"], new.area.len() as u64);
                assert_eq!(data["master-key-iters"], h.mk_iterations);
                assert_eq!(data["uuid"], h.uuid.as_str());
                assert_eq!(data["slots"][0]["iters"], h.slots[0].iterations);
                assert_eq!(info["virtual-size"], plain.len() as u64);
                // The wrong secret is refused by QEMU too.
                let out = Command::new(&img)
                    .args([
                        "compare",
                        "--object",
                        "secret,id=s0,data=nope",
                        "--image-opts",
                        &luks_opts,
                        &raw_opts,
                    ])
                    .output()
                    .unwrap();
                assert_eq!(out.status.code(), Some(2), "{combo:?}");
                assert!(
                    String::from_utf8_lossy(&out.stderr).contains("Invalid password"),
                    "{combo:?}"
                );
            }
            let _ = std::fs::remove_dir_all(&dir);
        }

        /// The full-disk-encryption extension (offset, length) of a v3 qcow2 image: the
        /// extensions follow the header, whose length is at byte 100.
        fn crypto_extension(image: &[u8]) -> (u64, u64) {
            let word = |i: usize| u32::from_be_bytes(image[i..i + 4].try_into().unwrap());
            let mut at = word(100) as usize;
            loop {
                let (magic, len) = (word(at), word(at + 4) as usize);
                assert_ne!(magic, 0, "no crypto header extension");
                if magic == 0x0537_be77 {
                    let q = |i: usize| u64::from_be_bytes(image[i..i + 8].try_into().unwrap());
                    return (q(at + 8), q(at + 16));
                }
                at += 8 + len.div_ceil(8) * 8;
            }
        }

        /// Our header in place of QEMU's inside a new qcow2 image: same size, QEMU writes
        /// and reads data with our master key, this crate reads what QEMU wrote, and QEMU
        /// reads a cluster this crate encrypted at its host offset (IVs from host sectors).
        #[test]
        fn qemu_uses_the_header_inside_a_qcow2_image() {
            let Some(img) =
                crate::base::testing::qemu_img("qemu_uses_the_header_inside_a_qcow2_image")
            else {
                return;
            };
            let qemu_io = img.with_file_name("qemu-io");
            let dir = temp_dir("luks-in-qcow2");
            let path = dir.join("enc.qcow2");
            run(Command::new(&img)
                .args([
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "--object",
                    "secret,id=s0,data=theirs",
                ])
                .args([
                    "-o",
                    "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
                ])
                .arg(&path)
                .arg("1M"));
            let mut file = std::fs::read(&path).unwrap();
            let (offset, length) = crypto_extension(&file);
            let new = new_luks(&options(&[])).unwrap();
            assert_eq!(new.area.len() as u64, length, "QEMU's LUKS area length");
            let at = offset as usize;
            file[at..at + new.area.len()].copy_from_slice(&new.area);
            std::fs::write(&path, &file).unwrap();

            let secret = format!("secret,id=s0,data={PASS}");
            let opts = format!(
                "driver=qcow2,encrypt.key-secret=s0,file.filename={}",
                path.display()
            );
            run(Command::new(&qemu_io)
                .args(["--object", &secret, "--image-opts", &opts])
                .args(["-c", "write -P 0x5a 0 64k", "-c", "write -P 0x17 512k 4k"]));
            run(Command::new(&img).args(["check", "--object", &secret, "--image-opts", &opts]));

            let image =
                crate::Qcow2::open_path_with(&path, &crate::OpenOptions::new().secret(PASS))
                    .unwrap();
            let mut got = vec![0xffu8; 1 << 20];
            positioned_io::ReadAt::read_exact_at(&image.reader().unwrap(), 0, &mut got).unwrap();
            let mut want = vec![0u8; 1 << 20];
            want[..64 << 10].fill(0x5a);
            want[512 << 10..(512 << 10) + 4096].fill(0x17);
            assert!(got == want, "the crate reads what QEMU wrote with our key");

            // Overwrite guest cluster 0 with data encrypted here, at its host offset.
            // (`qemu-img map` hides the host offsets of encrypted images: walk L1 and L2.)
            drop(image);
            let mut file = std::fs::read(&path).unwrap();
            let entry = |at: u64| {
                let at = at as usize;
                u64::from_be_bytes(file[at..at + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00
            };
            let host = entry(entry(entry(40)));
            let mut cluster = vec![0xc3u8; 64 << 10];
            new.cipher.encrypt(host / 512, &mut cluster);
            file[host as usize..(host as usize) + cluster.len()].copy_from_slice(&cluster);
            std::fs::write(&path, &file).unwrap();
            let qemu_io_read = |pattern: &str| {
                let out = Command::new(&qemu_io)
                    .args(["--object", &secret, "--image-opts", &opts])
                    .args(["-c", &format!("read -P {pattern} 0 64k")])
                    .output()
                    .unwrap();
                let said = String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr);
                !said.contains("Pattern verification failed") && said.contains("read 65536/65536")
            };
            assert!(
                qemu_io_read("0xc3"),
                "QEMU reads the cluster encrypted here"
            );
            assert!(!qemu_io_read("0xc4"), "a wrong pattern is noticed");
            let _ = std::fs::remove_dir_all(&dir);
        }

        /// The refusals at creation, word for word with qemu-img's.
        #[test]
        fn refusals_match_qemu_img() {
            let Some(img) = crate::base::testing::qemu_img("refusals_match_qemu_img") else {
                return;
            };
            let dir = temp_dir("luks-refusals");
            let target = dir.join("x.qcow2");
            for combo in [
                &[("cipher-alg", "sm4")][..],
                &[("cipher-alg", "cast5-128")],
                &[("ivgen-alg", "essiv"), ("ivgen-hash-alg", "sha1")],
                &[
                    ("cipher-alg", "serpent-256"),
                    ("ivgen-alg", "essiv"),
                    ("ivgen-hash-alg", "sha512"),
                ],
                &[
                    ("cipher-alg", "cast5-128"),
                    ("cipher-mode", "cbc"),
                    ("ivgen-alg", "essiv"),
                ],
            ] {
                let o: String = combo
                    .iter()
                    .map(|(k, v)| format!(",encrypt.{k}={v}"))
                    .collect();
                let out = Command::new(&img)
                    .args([
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "--object",
                        "secret,id=s0,data=x",
                        "-o",
                    ])
                    .arg(format!(
                        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=1{o}"
                    ))
                    .arg(&target)
                    .arg("1M")
                    .output()
                    .unwrap();
                assert_eq!(out.status.code(), Some(1), "{combo:?}");
                let stderr = String::from_utf8_lossy(&out.stderr);
                let qemu = stderr.trim().rsplit(": ").next().unwrap().to_owned();
                let ours = match options(combo).check() {
                    Err(Error::InvalidOption { message, .. }) => message,
                    other => panic!("{combo:?}: {other:?}"),
                };
                // qemu-img prefixes the file name: compare what follows it.
                assert!(
                    stderr.trim().ends_with(&ours),
                    "{combo:?}: qemu-img said {stderr:?}, we say {ours:?} ({qemu})"
                );
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(e: Error) -> String {
        match e {
            Error::InvalidOption { message, .. } => message,
            other => panic!("expected InvalidOption, got {other:?}"),
        }
    }

    #[test]
    fn set_takes_qemus_spellings_and_refuses_in_its_words() {
        let mut o = LuksOptions::new("s");
        for (k, v) in [
            ("cipher-alg", "serpent-192"),
            ("cipher-alg", "des"), // a QEMU name: refused when the header is made
            ("cipher-mode", "ctr"),
            ("ivgen-alg", "essiv"),
            ("ivgen-hash-alg", "sha512"),
            ("hash-alg", "md5"),
            ("iter-time", "10"),
        ] {
            o.set(k, v).unwrap();
        }
        assert_eq!(o.cipher, CipherChoice::NotLuks("des"));
        assert_eq!(o.mode, CipherMode::Ctr);
        assert_eq!(o.ivgen, IvGenAlg::Essiv);
        assert_eq!(o.ivgen_hash, Some(HashAlg::Sha512));
        assert_eq!(o.hash, HashAlg::Md5);
        assert_eq!(o.iter_time_ms, 10);
        let refusal = |k: &str, v: &str| {
            let mut o = LuksOptions::new("s");
            let e = o.set(k, v).unwrap_err();
            match &e {
                Error::InvalidOption { option, .. } => assert_eq!(option, &format!("encrypt.{k}")),
                other => panic!("{other:?}"),
            }
            message(e)
        };
        assert_eq!(
            refusal("cipher-alg", "AES-256"),
            "Parameter 'cipher-alg' does not accept value 'AES-256'"
        );
        assert_eq!(
            refusal("cipher-mode", ""),
            "Parameter 'cipher-mode' does not accept value ''"
        );
        assert_eq!(
            refusal("hash-alg", "sha2"),
            "Parameter 'hash-alg' does not accept value 'sha2'"
        );
        assert_eq!(
            refusal("iter-time", "1k"),
            "Parameter 'encrypt.iter-time' expects a number"
        );
        assert_eq!(
            refusal("iter-time", "18446744073709551616"),
            "Value '18446744073709551616' is too large for parameter 'encrypt.iter-time'"
        );
        assert_eq!(
            refusal("key-size", "1"),
            "Invalid parameter 'encrypt.key-size'"
        );
    }

    #[test]
    fn numbers_are_read_as_qemus_strtou64() {
        let n = |s: &str| number_value("iter-time", s).ok();
        assert_eq!(n("2000"), Some(2000));
        assert_eq!(n("0x10"), Some(16));
        assert_eq!(n("010"), Some(8));
        assert_eq!(n("0"), Some(0));
        assert_eq!(n("  7"), Some(7));
        assert_eq!(n("+7"), Some(7));
        assert_eq!(n("-1"), Some(u64::MAX));
        for bad in ["", "abc", "0x", "08", "1 ", "1.5", "--1"] {
            assert_eq!(n(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn iter_time_is_whole_milliseconds() {
        let o = LuksOptions::new("s").iter_time(Duration::from_micros(10_900));
        assert_eq!(o.iter_time_ms, 10);
        assert_eq!(LuksOptions::new("s").iter_time_ms, 2000);
    }
}
