//! The hashes of a LUKS header: PBKDF2 and the anti-forensic merge.

use sha2::Digest;
use zeroize::Zeroizing;

use super::names::HashAlg;
use crate::error::{Error, Result};

fn unsupported(hash: HashAlg) -> Error {
    Error::UnsupportedEncryption {
        what: format!("hash algorithm {:?} (not built in)", hash.name()),
    }
}

/// Whether [`pbkdf2`] and [`digest`] compute `hash` (QEMU's crypto libraries also have MD5,
/// RIPEMD-160 and SM3).
pub(crate) fn is_built_in(hash: HashAlg) -> bool {
    matches!(
        hash,
        HashAlg::Sha1 | HashAlg::Sha224 | HashAlg::Sha256 | HashAlg::Sha384 | HashAlg::Sha512
    )
}

/// PBKDF2-HMAC with `hash`, filling `out`.
pub(crate) fn pbkdf2(
    hash: HashAlg,
    password: &[u8],
    salt: &[u8],
    rounds: u32,
    out: &mut [u8],
) -> Result<()> {
    use pbkdf2::pbkdf2_hmac;
    match hash {
        HashAlg::Sha1 => pbkdf2_hmac::<sha1::Sha1>(password, salt, rounds, out),
        HashAlg::Sha224 => pbkdf2_hmac::<sha2::Sha224>(password, salt, rounds, out),
        HashAlg::Sha256 => pbkdf2_hmac::<sha2::Sha256>(password, salt, rounds, out),
        HashAlg::Sha384 => pbkdf2_hmac::<sha2::Sha384>(password, salt, rounds, out),
        HashAlg::Sha512 => pbkdf2_hmac::<sha2::Sha512>(password, salt, rounds, out),
        other => return Err(unsupported(other)),
    }
    Ok(())
}

/// The digest of the concatenation of `parts`.
pub(crate) fn digest(hash: HashAlg, parts: &[&[u8]]) -> Result<Zeroizing<Vec<u8>>> {
    fn run<D: Digest>(parts: &[&[u8]]) -> Zeroizing<Vec<u8>> {
        let mut d = D::new();
        for p in parts {
            d.update(p);
        }
        Zeroizing::new(d.finalize().to_vec())
    }
    Ok(match hash {
        HashAlg::Sha1 => run::<sha1::Sha1>(parts),
        HashAlg::Sha224 => run::<sha2::Sha224>(parts),
        HashAlg::Sha256 => run::<sha2::Sha256>(parts),
        HashAlg::Sha384 => run::<sha2::Sha384>(parts),
        HashAlg::Sha512 => run::<sha2::Sha512>(parts),
        other => return Err(unsupported(other)),
    })
}

/// QEMU's `qcrypto_afsplit_hash`: replace each digest-sized piece of `block` (the last one
/// may be shorter) by the hash of its index (big-endian u32) and itself.
fn diffuse(hash: HashAlg, block: &mut [u8]) -> Result<()> {
    let len = hash.digest_len();
    for (i, piece) in block.chunks_mut(len).enumerate() {
        let index = (i as u32).to_be_bytes();
        let d = digest(hash, &[&index, piece])?;
        let n = piece.len();
        piece.copy_from_slice(d.get(..n).unwrap_or_default());
    }
    Ok(())
}

/// QEMU's `qcrypto_afsplit_decode`: merge `stripes` stripes of `key_len` bytes from `split`
/// into the key. The caller checked `split` holds them all; a short one merges what it has.
pub(crate) fn af_merge(
    hash: HashAlg,
    key_len: usize,
    stripes: usize,
    split: &[u8],
) -> Result<Zeroizing<Vec<u8>>> {
    let mut block = Zeroizing::new(vec![0u8; key_len]);
    let mut stripe_iter = split.chunks_exact(key_len.max(1)).take(stripes);
    let last = stripes.saturating_sub(1);
    for stripe in stripe_iter.by_ref().take(last) {
        xor_into(&mut block, stripe);
        diffuse(hash, &mut block)?;
    }
    if let Some(stripe) = stripe_iter.next() {
        xor_into(&mut block, stripe);
    }
    Ok(block)
}

/// QEMU's `qcrypto_afsplit_encode`, the inverse of [`af_merge`]: `split` arrives holding
/// `stripes` stripes of `key.len()` random bytes; all but the last are kept, and the last is
/// replaced by the key xored with the diffusion of the others, so that merging them gives
/// the key back.
pub(crate) fn af_split(hash: HashAlg, key: &[u8], stripes: usize, split: &mut [u8]) -> Result<()> {
    let key_len = key.len().max(1);
    let mut block = Zeroizing::new(vec![0u8; key.len()]);
    let mut stripe_iter = split.chunks_exact_mut(key_len).take(stripes);
    for stripe in stripe_iter.by_ref().take(stripes.saturating_sub(1)) {
        xor_into(&mut block, stripe);
        diffuse(hash, &mut block)?;
    }
    let last = stripe_iter.next().ok_or(Error::Internal(
        "AF split buffer holds fewer stripes than asked",
    ))?;
    last.copy_from_slice(key);
    xor_into(last, &block);
    Ok(())
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_matches_rfc6070() {
        let mut out = [0u8; 20];
        pbkdf2(HashAlg::Sha1, b"password", b"salt", 2, &mut out).unwrap();
        assert_eq!(
            out,
            [
                0xea, 0x6c, 0x01, 0x4d, 0xc7, 0x2d, 0x6f, 0x8c, 0xcd, 0x1e, 0xd9, 0x2a, 0xce, 0x1d,
                0x41, 0xf0, 0xd8, 0xde, 0x89, 0x57
            ]
        );
        assert!(pbkdf2(HashAlg::Md5, b"p", b"s", 1, &mut out).is_err());
    }

    #[test]
    fn af_split_is_undone_by_af_merge() {
        for (hash, key_len) in [
            (HashAlg::Sha256, 64),
            (HashAlg::Sha1, 24),
            (HashAlg::Sha512, 16),
        ] {
            let key: Vec<u8> = (0..key_len as u8).map(|b| b.wrapping_mul(37)).collect();
            let stripes = 40;
            let mut split: Vec<u8> = (0..key_len * stripes).map(|i| (i * 7 + 3) as u8).collect();
            let random = split.clone();
            af_split(hash, &key, stripes, &mut split).unwrap();
            // Only the last stripe is computed.
            let last = key_len * (stripes - 1);
            assert_eq!(split[..last], random[..last]);
            assert_ne!(split[last..], random[last..]);
            assert_eq!(
                &af_merge(hash, key_len, stripes, &split).unwrap()[..],
                &key[..]
            );
        }
        let mut short = vec![0u8; 10];
        assert!(af_split(HashAlg::Sha256, &[1; 8], 2, &mut short).is_err());
    }

    #[test]
    fn af_merge_of_one_stripe_is_the_stripe() {
        let key = af_merge(HashAlg::Sha256, 4, 1, &[1, 2, 3, 4]).unwrap();
        assert_eq!(&key[..], &[1, 2, 3, 4]);
        // Two stripes: the first is diffused, then xored with the second.
        let merged = af_merge(HashAlg::Sha1, 4, 2, &[0, 0, 0, 0, 9, 9, 9, 9]).unwrap();
        let d = digest(HashAlg::Sha1, &[&0u32.to_be_bytes(), &[0, 0, 0, 0]]).unwrap();
        let expect: Vec<u8> = d[..4].iter().map(|b| b ^ 9).collect();
        assert_eq!(&merged[..], &expect[..]);
    }
}
