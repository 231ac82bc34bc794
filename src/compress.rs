//! Decompression of compressed clusters (spec: "Compressed Clusters Descriptor").
//!
//! A compressed cluster must decompress to exactly one cluster, as QEMU requires; the input
//! may carry trailing bytes (the rest of its last 512-byte sector), which are ignored.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use lru::LruCache;

use crate::error::{Error, Result};
use crate::header::CompressionType;

/// Decompressed clusters kept per image, in bytes (at least two clusters).
const CACHE_BYTES: u64 = 8 << 20;
/// Idle decoders kept for reuse: creating a zstd context costs more than a small cluster.
const MAX_IDLE_DECODERS: usize = 8;

/// Recently decompressed clusters by host offset, and idle decoders, shared by every reader
/// of an image: small sequential reads, and overlays reading a compressed backing image,
/// decompress each cluster once.
pub(crate) struct ClusterCache {
    inner: Mutex<CacheState>,
    cluster_bits: u32,
    /// Clusters decompressed so far (tests check that re-reads hit the cache).
    decompressed: AtomicU64,
}

struct CacheState {
    clusters: LruCache<u64, Arc<[u8]>>,
    idle: Vec<Decompressor>,
}

impl ClusterCache {
    pub(crate) fn new(cluster_bits: u32) -> Self {
        let clusters = (CACHE_BYTES >> cluster_bits).max(2) as usize;
        let capacity = NonZeroUsize::new(clusters).unwrap_or(NonZeroUsize::MIN);
        ClusterCache {
            cluster_bits,
            inner: Mutex::new(CacheState {
                clusters: LruCache::new(capacity),
                idle: Vec::new(),
            }),
            decompressed: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cluster compressed at `host`, if decompressed recently.
    pub(crate) fn get(&self, host: u64) -> Option<Arc<[u8]>> {
        self.lock().clusters.get(&host).cloned()
    }

    /// How many clusters were decompressed so far.
    #[cfg(all(test, feature = "zlib"))]
    pub(crate) fn decompressed(&self) -> u64 {
        self.decompressed.load(Ordering::Relaxed)
    }

    /// Decompress `input` into a new cluster of `cluster_size` bytes and remember it. The
    /// lock is not held while decompressing, so threads overlap.
    pub(crate) fn decompress(
        &self,
        host: u64,
        kind: CompressionType,
        input: &[u8],
        cluster_size: usize,
    ) -> Result<Arc<[u8]>, String> {
        let mut decoder = self
            .lock()
            .idle
            .pop()
            .unwrap_or_else(|| Decompressor::new(self.cluster_bits));
        let mut data = vec![0u8; cluster_size];
        self.decompressed.fetch_add(1, Ordering::Relaxed);
        let result = decoder.decompress(kind, input, &mut data);
        let data: Arc<[u8]> = Arc::from(data);
        let mut inner = self.lock();
        if inner.idle.len() < MAX_IDLE_DECODERS {
            inner.idle.push(decoder);
        }
        result?;
        inner.clusters.put(host, Arc::clone(&data));
        Ok(data)
    }
}

/// Reusable decoder state for both compression types.
pub(crate) struct Decompressor {
    /// log2 of the largest window a zstd frame may ask for: a cluster. A hostile frame
    /// header could otherwise make libzstd allocate up to 128 MiB.
    #[cfg_attr(not(feature = "zstd"), allow(dead_code))]
    window_log_max: u32,
    #[cfg(feature = "zlib")]
    inflate: Option<flate2::Decompress>,
    #[cfg(feature = "zstd")]
    zstd: Option<zstd::stream::raw::Decoder<'static>>,
}

impl Decompressor {
    /// A decoder for clusters of `1 << cluster_bits` bytes.
    pub(crate) fn new(cluster_bits: u32) -> Self {
        Decompressor {
            // zstd's smallest window is 1 KiB.
            window_log_max: cluster_bits.max(10),
            #[cfg(feature = "zlib")]
            inflate: None,
            #[cfg(feature = "zstd")]
            zstd: None,
        }
    }

    /// Decompress `input` into `out`, which must be filled exactly.
    /// Returns the decoder's complaint on failure; the caller adds where.
    pub(crate) fn decompress(
        &mut self,
        kind: CompressionType,
        input: &[u8],
        out: &mut [u8],
    ) -> Result<(), String> {
        match kind {
            CompressionType::Zlib => self.inflate(input, out),
            CompressionType::Zstd => self.unzstd(input, out),
        }
    }
}

/// Decompress once with a fresh decoder (tests).
#[cfg(all(test, any(feature = "zlib", feature = "zstd")))]
pub(crate) fn decompress(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
) -> Result<(), String> {
    let cluster_bits = out.len().max(1).ilog2();
    Decompressor::new(cluster_bits).decompress(kind, input, out)
}

/// Whether this build can decompress `kind`; the error names the cargo feature.
pub(crate) fn check_available(kind: CompressionType) -> Result<()> {
    match kind {
        CompressionType::Zlib if !cfg!(feature = "zlib") => {
            Err(Error::FeatureDisabled { feature: "zlib" })
        }
        CompressionType::Zstd if !cfg!(feature = "zstd") => {
            Err(Error::FeatureDisabled { feature: "zstd" })
        }
        _ => Ok(()),
    }
}

impl Decompressor {
    #[cfg(feature = "zlib")]
    fn inflate(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), String> {
        use flate2::{Decompress, FlushDecompress, Status};
        // Raw deflate, no zlib header: QEMU compresses with windowBits -12.
        let d = self.inflate.get_or_insert_with(|| Decompress::new(false));
        d.reset(false);
        let status = d
            .decompress(input, out, FlushDecompress::Finish)
            .map_err(|e| e.to_string())?;
        let filled = d.total_out() == out.len() as u64;
        match status {
            Status::StreamEnd | Status::BufError | Status::Ok if filled => Ok(()),
            _ => Err(format!(
                "deflate stream gave {} of {} bytes",
                d.total_out(),
                out.len()
            )),
        }
    }

    #[cfg(not(feature = "zlib"))]
    fn inflate(&mut self, _input: &[u8], _out: &mut [u8]) -> Result<(), String> {
        Err("built without the `zlib` feature".to_owned())
    }

    #[cfg(feature = "zstd")]
    fn unzstd(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), String> {
        use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
        let decoder = match &mut self.zstd {
            Some(d) => {
                d.reinit().map_err(|e| e.to_string())?;
                d
            }
            none => {
                let mut d = Decoder::new().map_err(|e| e.to_string())?;
                d.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(
                    self.window_log_max,
                ))
                .map_err(|e| e.to_string())?;
                none.insert(d)
            }
        };
        let mut inb = InBuffer::around(input);
        let mut outb = OutBuffer::around(out);
        // Streaming, as QEMU does: the frame is followed by sector padding that a one-shot
        // decoder would try to parse as another frame.
        let mut remaining_hint = 1;
        while outb.pos() < outb.capacity() {
            let (in_before, out_before) = (inb.pos(), outb.pos());
            remaining_hint = decoder
                .run(&mut inb, &mut outb)
                .map_err(|e| e.to_string())?;
            if remaining_hint == 0 {
                break;
            }
            if inb.pos() == in_before && outb.pos() == out_before {
                return Err("zstd stream ended early".to_owned());
            }
        }
        if outb.pos() != outb.capacity() {
            return Err(format!(
                "zstd frame gave {} of {} bytes",
                outb.pos(),
                outb.capacity()
            ));
        }
        if remaining_hint != 0 {
            // The output is full; the frame must end here too (QEMU: "frame fully flushed").
            let mut probe = [0u8; 1];
            let mut probe_out = OutBuffer::around(&mut probe[..]);
            let hint = decoder
                .run(&mut inb, &mut probe_out)
                .map_err(|e| e.to_string())?;
            if hint != 0 || probe_out.pos() != 0 {
                return Err("zstd frame is longer than a cluster".to_owned());
            }
        }
        Ok(())
    }

    #[cfg(not(feature = "zstd"))]
    fn unzstd(&mut self, _input: &[u8], _out: &mut [u8]) -> Result<(), String> {
        Err("built without the `zstd` feature".to_owned())
    }
}

#[cfg(all(test, any(feature = "zlib", feature = "zstd")))]
mod tests {
    use super::*;

    #[cfg(feature = "zlib")]
    #[test]
    fn raw_deflate_round_trip_with_trailing_garbage() {
        use flate2::{write::DeflateEncoder, Compression};
        use std::io::Write;
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut enc = DeflateEncoder::new(Vec::new(), Compression::default());
        enc.write_all(&data).unwrap();
        let mut compressed = enc.finish().unwrap();
        compressed.extend([0xAA; 300]); // sector padding
        let mut out = vec![0; 4096];
        decompress(CompressionType::Zlib, &compressed, &mut out).unwrap();
        assert_eq!(out, data);
        let mut too_big = vec![0; 8192];
        assert!(decompress(CompressionType::Zlib, &compressed, &mut too_big).is_err());
        assert!(decompress(CompressionType::Zlib, &[0xff; 64], &mut out).is_err());
    }

    #[cfg(feature = "zstd")]
    #[test]
    fn zstd_round_trip_with_trailing_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 13) as u8).collect();
        let mut compressed = zstd::bulk::compress(&data, 3).unwrap();
        compressed.extend([0x55; 200]);
        let mut out = vec![0; 65536];
        decompress(CompressionType::Zstd, &compressed, &mut out).unwrap();
        assert_eq!(out, data);
        let mut short = vec![0; 1000];
        assert!(decompress(CompressionType::Zstd, &compressed, &mut short).is_err());
        let mut long = vec![0; 70000];
        assert!(decompress(CompressionType::Zstd, &compressed, &mut long).is_err());
        assert!(decompress(
            CompressionType::Zstd,
            &[0x28, 0xb5, 0x2f, 0xfd, 1, 2],
            &mut out
        )
        .is_err());
    }

    #[cfg(feature = "zstd")]
    #[test]
    fn zstd_frame_asking_for_a_window_bigger_than_a_cluster_is_refused() {
        use std::io::Write;
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 13) as u8).collect();
        // A streaming encoder with a 16 MiB window and no pledged size keeps that window in
        // the frame header: a decoder would have to allocate it.
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        enc.set_parameter(zstd::stream::raw::CParameter::WindowLog(24))
            .unwrap();
        enc.include_contentsize(false).unwrap();
        enc.write_all(&data).unwrap();
        let frame = enc.finish().unwrap();
        let mut out = vec![0; 65536];
        let err = decompress(CompressionType::Zstd, &frame, &mut out).unwrap_err();
        assert!(err.contains("memory") || err.contains("window"), "{err}");
    }
}
