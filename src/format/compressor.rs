//! Compression of clusters, as QEMU writes them (`qcow2_co_compress`): a cluster is stored
//! compressed only when its compressed form is at most one byte short of a cluster;
//! otherwise it is written as it is.
//!
//! - zlib: one raw deflate stream (no zlib header) with a 4 KiB window (`windowBits` -12),
//!   the window QEMU's decoder is set up for: a stream with longer distances would be refused
//!   by QEMU even though it is valid deflate.
//! - zstd: one frame, as `ZSTD_compressStream2(ZSTD_e_end)` writes it (content size
//!   recorded).

use crate::error::{Error, Result};
use crate::format::header::CompressionType;

/// The zlib level: zlib-rs's 7, whose output matches the size of QEMU's (system zlib at
/// `Z_DEFAULT_COMPRESSION`, 6) within 0.0% on text and 3.0% on executables, at 1.8 to 2
/// times its speed per core; zlib-rs's 6 is 3.7% larger on executables
/// (`benches/peers/compress.rs`).
#[cfg(feature = "zlib")]
pub(crate) const DEFAULT_ZLIB_LEVEL: u32 = 7;
/// QEMU's zstd level (`ZSTD_CLEVEL_DEFAULT`).
#[cfg(feature = "zstd")]
pub(crate) const DEFAULT_ZSTD_LEVEL: i32 = 3;
/// QEMU's deflate window: 2^12 bytes.
#[cfg(feature = "zlib")]
const ZLIB_WINDOW_BITS: u8 = 12;

/// A reusable encoder for one compression type and level (one per thread).
pub(crate) struct Compressor {
    kind: CompressionType,
    #[cfg(feature = "zlib")]
    deflate: Option<flate2::Compress>,
    #[cfg(feature = "zlib")]
    zlib_level: u32,
    #[cfg(feature = "zstd")]
    zstd: Option<zstd::bulk::Compressor<'static>>,
    #[cfg(feature = "zstd")]
    zstd_level: i32,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Compressor {
    /// An encoder for `kind` at the default level, or at `level` (zlib 0 to 9, zstd 1 to 22;
    /// clamped). Fails when this build lacks the cargo feature `kind` needs.
    pub(crate) fn new(kind: CompressionType, level: Option<i32>) -> Result<Self> {
        match kind {
            CompressionType::Zlib if !cfg!(feature = "zlib") => {
                return Err(Error::FeatureDisabled { feature: "zlib" })
            }
            CompressionType::Zstd if !cfg!(feature = "zstd") => {
                return Err(Error::FeatureDisabled { feature: "zstd" })
            }
            _ => {}
        }
        let _ = level;
        Ok(Compressor {
            kind,
            #[cfg(feature = "zlib")]
            deflate: None,
            #[cfg(feature = "zlib")]
            zlib_level: level.map_or(DEFAULT_ZLIB_LEVEL, |l| l.clamp(0, 9).unsigned_abs()),
            #[cfg(feature = "zstd")]
            zstd: None,
            #[cfg(feature = "zstd")]
            zstd_level: level.map_or(DEFAULT_ZSTD_LEVEL, |l| l.clamp(1, 22)),
        })
    }

    /// Compress one cluster (`input`, a whole cluster) into `out` (cleared first). Returns
    /// `Ok(true)` when the compressed form is shorter than the cluster (at most
    /// `input.len() - 1` bytes, QEMU's bound) and `out` holds it; `Ok(false)` when it does not
    /// shrink, and the cluster is to be stored as it is.
    pub(crate) fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<bool> {
        out.clear();
        let limit = input.len().saturating_sub(1);
        if limit == 0 {
            return Ok(false);
        }
        match self.kind {
            CompressionType::Zlib => self.deflate(input, limit, out),
            CompressionType::Zstd => self.zstd(input, limit, out),
        }
    }

    #[cfg(feature = "zlib")]
    fn deflate(&mut self, input: &[u8], limit: usize, out: &mut Vec<u8>) -> Result<bool> {
        use flate2::{Compress, Compression, FlushCompress, Status};
        let level = self.zlib_level;
        let encoder = self.deflate.get_or_insert_with(|| {
            Compress::new_with_window_bits(Compression::new(level), false, ZLIB_WINDOW_BITS)
        });
        encoder.reset();
        // Room for deflate's worst case (zlib's deflateBound): zlib-rs panics, instead of
        // stopping, when a stored block does not fit the output (512-byte random clusters).
        out.reserve(
            input
                .len()
                .saturating_add(input.len() >> 3)
                .saturating_add(64),
        );
        let status = encoder
            .compress_vec(input, out, FlushCompress::Finish)
            .map_err(|_| Error::Internal("deflate refused its input"))?;
        // `compress_vec` writes at most the spare capacity, which may exceed `limit`.
        Ok(status == Status::StreamEnd && out.len() <= limit)
    }

    #[cfg(not(feature = "zlib"))]
    fn deflate(&mut self, _input: &[u8], _limit: usize, _out: &mut Vec<u8>) -> Result<bool> {
        Err(Error::FeatureDisabled { feature: "zlib" })
    }

    #[cfg(feature = "zstd")]
    fn zstd(&mut self, input: &[u8], limit: usize, out: &mut Vec<u8>) -> Result<bool> {
        let encoder = match &mut self.zstd {
            Some(encoder) => encoder,
            none => none.insert(
                zstd::bulk::Compressor::new(self.zstd_level)
                    .map_err(|_| Error::Internal("zstd could not make a compression context"))?,
            ),
        };
        out.resize(limit, 0);
        match encoder.compress_to_buffer(input, out.as_mut_slice()) {
            Ok(len) => {
                out.truncate(len);
                Ok(true)
            }
            // The only failure with a valid context and level: the frame does not fit.
            Err(_) => {
                out.clear();
                Ok(false)
            }
        }
    }

    #[cfg(not(feature = "zstd"))]
    fn zstd(&mut self, _input: &[u8], _limit: usize, _out: &mut Vec<u8>) -> Result<bool> {
        Err(Error::FeatureDisabled { feature: "zstd" })
    }
}

#[cfg(all(test, any(feature = "zlib", feature = "zstd")))]
mod tests {
    use super::*;
    use crate::format::compress::Decompressor;

    fn text_like(len: usize) -> Vec<u8> {
        let words = [
            "qcow2 ",
            "cluster ",
            "refcount ",
            "table ",
            "the ",
            "of ",
            "QEMU\n",
        ];
        let mut out = Vec::with_capacity(len);
        let mut i = 7usize;
        while out.len() < len {
            i = i.wrapping_mul(1_103_515_245).wrapping_add(12345);
            out.extend_from_slice(words[(i >> 16) % words.len()].as_bytes());
        }
        out.truncate(len);
        out
    }

    fn round_trip(kind: CompressionType, cluster: usize) {
        let data = text_like(cluster);
        let mut c = Compressor::new(kind, None).unwrap();
        let mut out = Vec::new();
        assert!(c.compress(&data, &mut out).unwrap(), "{kind:?} {cluster}");
        assert!(out.len() < cluster);
        let mut back = vec![0; cluster];
        Decompressor::new()
            .decompress(kind, &out, &mut back)
            .unwrap();
        assert_eq!(back, data);
        // Random bytes do not shrink: stored as they are.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..cluster)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(!c.compress(&noise, &mut out).unwrap());
        // The encoder is reused.
        assert!(c.compress(&data, &mut out).unwrap());
    }

    #[cfg(feature = "zlib")]
    #[test]
    fn zlib_clusters_round_trip_and_noise_is_stored_raw() {
        for cluster in [512, 4096, 65536, 2 << 20] {
            round_trip(CompressionType::Zlib, cluster);
        }
    }

    /// Every distance in the stream fits QEMU's 4 KiB window: a decoder set to windowBits
    /// -12 reads it.
    #[cfg(feature = "zlib")]
    #[test]
    fn zlib_streams_fit_qemus_window() {
        let data: Vec<u8> = text_like(65536);
        let mut out = Vec::new();
        Compressor::new(CompressionType::Zlib, Some(9))
            .unwrap()
            .compress(&data, &mut out)
            .unwrap();
        let mut d = flate2::Decompress::new_with_window_bits(false, 12);
        let mut back = vec![0; 65536];
        d.decompress(&out, &mut back, flate2::FlushDecompress::Finish)
            .unwrap();
        assert_eq!(d.total_out(), 65536);
        assert_eq!(back, data);
    }

    #[cfg(feature = "zstd")]
    #[test]
    fn zstd_clusters_round_trip_and_noise_is_stored_raw() {
        for cluster in [512, 4096, 65536, 2 << 20] {
            round_trip(CompressionType::Zstd, cluster);
        }
    }
}
