//! Adding and erasing LUKS key slots of an image, as QEMU's `qcrypto_block_luks_amend_options`
//! does for `qemu-img amend -o encrypt.state=active|inactive,...`: its checks, in its order and
//! words; the key material made as a new header makes it ([`super::create`]).
//!
//! Crash-safe, each step followed by a sync: adding writes the key material into the slot's
//! (inactive) area, then the LUKS header with the slot active in one write; erasing writes
//! the header with the slot inactive first, then overwrites its material with random bytes.
//! A cut leaves either the old set of secrets or the new one opening the image.

use super::Secret;
#[cfg(feature = "encryption")]
pub(crate) use slots::amend_key_slots;

/// What the `encrypt.*` amend options ask, their secrets resolved.
#[derive(Debug, Clone)]
pub(crate) struct KeySlotRequest {
    /// `encrypt.state`: `true` for active (add a slot), `false` for inactive (erase).
    pub(crate) active: bool,
    /// `encrypt.keyslot`.
    pub(crate) keyslot: Option<i64>,
    /// `encrypt.old-secret`.
    pub(crate) old_secret: Option<Secret>,
    /// `encrypt.new-secret`.
    pub(crate) new_secret: Option<Secret>,
    /// `encrypt.iter-time`, in milliseconds.
    pub(crate) iter_time_ms: Option<u64>,
}

#[cfg(feature = "encryption")]
mod slots {
    use zeroize::Zeroizing;

    use super::KeySlotRequest;
    use crate::base::io::{read_metadata, Storage};
    use crate::crypt::create::{random, slot_iterations, slot_material, DEFAULT_ITER_TIME_MS};
    use crate::crypt::luks::{LuksHeader, HEADER_LEN, NUM_KEY_SLOTS, SALT_LEN};
    use crate::crypt::{KdfBudget, Secret};
    use crate::error::{Error, Result};
    use crate::format::extension::EncryptionExtension;

    fn refused(message: impl Into<String>) -> Error {
        Error::InvalidOption {
            option: "encrypt".to_owned(),
            message: message.into(),
        }
    }

    /// Apply `request` to the LUKS header at `ext` of `io`, the image unlocked with `unlock`.
    pub(crate) fn amend_key_slots<S: Storage>(
        io: &S,
        ext: &EncryptionExtension,
        unlock: Option<&Secret>,
        request: &KeySlotRequest,
        kdf: &KdfBudget,
    ) -> Result<()> {
        let bytes = read_metadata(io, ext.offset, HEADER_LEN, "LUKS header")?;
        let header = LuksHeader::parse(&bytes, ext.offset)?;
        if request.active {
            add_key_slot(io, ext, header, unlock, request, kdf)
        } else {
            erase_key_slots(io, ext, header, request, kdf)
        }
    }

    /// The slot index `keyslot` names, with QEMU's message for one out of range.
    fn slot_index(keyslot: i64, signed: bool) -> Result<usize> {
        let last = NUM_KEY_SLOTS.saturating_sub(1);
        usize::try_from(keyslot)
            .ok()
            .filter(|&i| i < NUM_KEY_SLOTS)
            .ok_or_else(|| {
                // QEMU prints the slot unsigned when adding and signed when erasing.
                let shown = if signed {
                    (keyslot as i32).to_string()
                } else {
                    (keyslot as i32 as u32).to_string()
                };
                refused(format!(
                    "Invalid keyslot {shown} specified, must be between 0 and {last}"
                ))
            })
    }

    /// QEMU's `qcrypto_block_luks_amend_add_keyslot`.
    fn add_key_slot<S: Storage>(
        io: &S,
        ext: &EncryptionExtension,
        mut header: LuksHeader,
        unlock: Option<&Secret>,
        request: &KeySlotRequest,
        kdf: &KdfBudget,
    ) -> Result<()> {
        let Some(new_secret) = &request.new_secret else {
            return Err(refused("'new-secret' is required to activate a keyslot"));
        };
        if request.old_secret.is_some() {
            return Err(refused(
                "'old-secret' must not be given when activating keyslots",
            ));
        }
        let index = match request.keyslot {
            Some(keyslot) => slot_index(keyslot, false)?,
            None => header
                .slots
                .iter()
                .position(|s| !s.active)
                .ok_or_else(|| refused("Can't add a keyslot - all keyslots are in use"))?,
        };
        if header.slots.get(index).is_some_and(|s| s.active) {
            return Err(refused(format!(
                "Refusing to overwrite active keyslot {index} - please erase it first"
            )));
        }
        let unlock = unlock.ok_or(Error::Encrypted {
            method: 2,
            name: "LUKS",
        })?;
        let master = header.find_master_key(io, ext, unlock.passphrase()?.as_bytes(), kdf)?;
        let password = new_secret.passphrase()?.as_bytes();
        let iter_time = request.iter_time_ms.unwrap_or(DEFAULT_ITER_TIME_MS);
        let iterations = slot_iterations(header.hash, master.len(), iter_time)?;
        let mut salt = [0u8; SALT_LEN];
        random(&mut salt)?;
        let material = Zeroizing::new(slot_material(
            &header, password, &master, &salt, iterations,
        )?);
        let slot = header
            .slots
            .get_mut(index)
            .ok_or(Error::Internal("LUKS key slot index"))?;
        slot.iterations = iterations;
        slot.salt = salt;
        let slot = slot.clone();
        let (material_at, material_len) = header.material_range(ext, &slot)?;
        if material.len() as u64 != material_len {
            return Err(Error::Internal("LUKS key material length"));
        }
        write_synced(io, material_at, &material, "LUKS key material")?;
        if let Some(s) = header.slots.get_mut(index) {
            s.active = true;
        }
        write_synced(io, ext.offset, &header.encode()?, "LUKS header")
    }

    /// QEMU's `qcrypto_block_luks_amend_erase_keyslots`.
    fn erase_key_slots<S: Storage>(
        io: &S,
        ext: &EncryptionExtension,
        mut header: LuksHeader,
        request: &KeySlotRequest,
        kdf: &KdfBudget,
    ) -> Result<()> {
        if request.new_secret.is_some() {
            return Err(refused(
                "'new-secret' must not be given when erasing keyslots",
            ));
        }
        if request.iter_time_ms.is_some() {
            return Err(refused(
                "'iter-time' must not be given when erasing keyslots",
            ));
        }
        let old = request
            .old_secret
            .as_ref()
            .map(|s| s.passphrase().map(str::as_bytes))
            .transpose()?;
        let opens = |header: &LuksHeader, index: usize, password: &[u8]| -> Result<bool> {
            let slot = header
                .slots
                .get(index)
                .ok_or(Error::Internal("LUKS key slot index"))?;
            if slot.active {
                kdf.spend(header.slot_work(slot))?;
            }
            Ok(header.open_slot(io, ext, slot, password)?.is_some())
        };
        let active = header.slots.iter().filter(|s| s.active).count();
        let erase: Vec<usize> = match (request.keyslot, old) {
            (Some(keyslot), old) => {
                let index = slot_index(keyslot, true)?;
                if let Some(password) = old {
                    if !opens(&header, index, password)? {
                        return Err(refused(format!(
                            "Given keyslot {index} doesn't contain the given old password for \
                             erase operation"
                        )));
                    }
                }
                if !header.slots.get(index).is_some_and(|s| s.active) {
                    return Err(refused(format!(
                        "Given keyslot {index} is already erased (inactive) "
                    )));
                }
                if active == 1 {
                    return Err(refused(format!(
                        "Attempt to erase the only active keyslot {index} which will erase all \
                         the data in the image irreversibly - refusing operation"
                    )));
                }
                vec![index]
            }
            (None, Some(password)) => {
                let mut matching = Vec::new();
                for index in 0..NUM_KEY_SLOTS {
                    if opens(&header, index, password)? {
                        matching.push(index);
                    }
                }
                if matching.is_empty() {
                    return Err(refused(
                        "No keyslots match given (old) password for erase operation",
                    ));
                }
                if matching.len() == active {
                    return Err(refused(
                        "All the active keyslots match the (old) password that was given and \
                         erasing them will erase all the data in the image irreversibly - \
                         refusing operation",
                    ));
                }
                matching
            }
            (None, None) => {
                return Err(refused(
                    "To erase keyslot(s), either explicit keyslot index or the password \
                     currently contained in them must be given",
                ))
            }
        };
        let mut wipes = Vec::with_capacity(erase.len());
        for &index in &erase {
            wipes.push(material_of_slot(ext, &header, index)?);
            let slot = header
                .slots
                .get_mut(index)
                .ok_or(Error::Internal("LUKS key slot index"))?;
            slot.active = false;
            slot.iterations = 0;
            slot.salt = [0; SALT_LEN];
        }
        write_synced(io, ext.offset, &header.encode()?, "LUKS header")?;
        for (at, len) in wipes {
            let mut noise = vec![0u8; usize::try_from(len).map_err(|_| Error::Internal("LUKS"))?];
            random(&mut noise)?;
            write_synced(io, at, &noise, "LUKS key material")?;
        }
        Ok(())
    }

    /// Where slot `index`'s key material lies in the file.
    fn material_of_slot(
        ext: &EncryptionExtension,
        header: &LuksHeader,
        index: usize,
    ) -> Result<(u64, u64)> {
        let slot = header
            .slots
            .get(index)
            .ok_or(Error::Internal("LUKS key slot index"))?;
        header.material_range(ext, slot)
    }

    /// Write `bytes` at `at` in one write, then sync.
    fn write_synced<S: Storage>(io: &S, at: u64, bytes: &[u8], what: &str) -> Result<()> {
        io.write_all_at(at, bytes)
            .map_err(|e| Error::io(format!("writing the {what}"), e))?;
        io.sync()
            .map_err(|e| Error::io(format!("making the {what} durable"), e))
    }
}
