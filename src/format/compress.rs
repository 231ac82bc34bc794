//! Decompression of compressed clusters (spec: "Compressed Clusters Descriptor").
//!
//! A compressed cluster must fill exactly one cluster, as QEMU requires (a deflate stream may
//! run on past it, and is cut there, as QEMU cuts it; a zstd frame may not); the input may
//! carry trailing bytes (the rest of its last 512-byte sector), which are ignored.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use crate::base::cache::ByteLru;

use crate::error::{Error, Result};
use crate::format::header::{CompressionType, MAX_CLUSTER_BITS};

/// Decompressed clusters kept per backing chain, in bytes (at least the last one), buffers
/// kept for reuse included.
const CACHE_BYTES: u64 = 8 << 20;
/// Of [`CACHE_BYTES`], what buffers kept for reuse may hold, for each of the two kinds
/// (decompressed clusters, compressed input); at least one buffer of each is kept.
const SPARE_BYTES: u64 = 1 << 20;
/// Idle decoders kept for reuse: creating a zstd context costs more than a small cluster.
const MAX_IDLE_DECODERS: usize = 8;

/// Which compressed cluster: (image id, host offset, descriptor length). Two descriptors may
/// share a host offset yet cover different bytes, so the length is part of the key.
pub(crate) type ClusterKey = (u64, u64, u64);

/// Recently decompressed clusters, and idle decoders, shared by every reader of an image and
/// by every image of its backing chain (the byte budget holds for the whole chain): small
/// sequential reads, and overlays reading a compressed backing image, decompress each cluster
/// once.
pub(crate) struct ClusterCache {
    inner: Mutex<CacheState>,
    /// Signalled whenever a cluster being decompressed ahead is done (or given up).
    done_ahead: Condvar,
    /// Clusters decompressed so far (tests check that re-reads hit the cache).
    decompressed: AtomicU64,
}

struct CacheState {
    clusters: ByteLru<ClusterKey, u8>,
    /// Clusters being decompressed ahead of a reader, on the pool: a read that needs one
    /// waits for it rather than decompress it twice.
    ahead: HashSet<ClusterKey>,
    idle: Vec<Decompressor>,
    /// Cluster buffers dropped from `clusters` that nobody else held, and compressed-input
    /// buffers done with: allocating and zeroing a fresh one for every cluster cost a tenth
    /// of decoding a zstd image.
    spare_clusters: Spares<Arc<[u8]>>,
    spare_inputs: Spares<Vec<u8>>,
}

impl ClusterCache {
    pub(crate) fn new() -> Self {
        ClusterCache {
            inner: Mutex::new(CacheState {
                clusters: ByteLru::new(CACHE_BYTES.saturating_sub(2 * SPARE_BYTES)),
                ahead: HashSet::new(),
                idle: Vec::new(),
                spare_clusters: Spares::new(|b| b.len()),
                spare_inputs: Spares::new(Vec::capacity),
            }),
            done_ahead: Condvar::new(),
            decompressed: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cluster `key` names, if decompressed recently; if it is being decompressed ahead,
    /// once that is done (`None` if that failed: the caller decompresses it, and reports).
    pub(crate) fn get(&self, key: ClusterKey) -> Option<Arc<[u8]>> {
        let mut inner = self.lock();
        loop {
            if let Some(data) = inner.clusters.get(&key) {
                return Some(Arc::clone(data));
            }
            // A pool thread never waits for another pool job: with every pool thread
            // waiting so, the job would never run. It decompresses the cluster itself.
            if !inner.ahead.contains(&key) || crate::base::pool::current_worker() != usize::MAX {
                return None;
            }
            inner = self
                .done_ahead
                .wait(inner)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Whether `key` is cached or being decompressed ahead.
    pub(crate) fn knows(&self, key: ClusterKey) -> bool {
        let inner = self.lock();
        inner.ahead.contains(&key) || inner.clusters.contains(&key)
    }

    /// Decompress `input` on `pool`, ahead of the reader that will want it; `false` when the
    /// pool has no thread for it (or it is already cached or under way).
    pub(crate) fn decompress_ahead(
        self: &Arc<Self>,
        pool: &crate::base::pool::Pool,
        key: ClusterKey,
        kind: CompressionType,
        input: Vec<u8>,
        cluster_size: usize,
    ) -> bool {
        if !self.lock().ahead.insert(key) {
            return false;
        }
        let cache = Arc::clone(self);
        let started = pool.spawn_detached(move || {
            let _done = AheadDone { cache: &cache, key };
            // A failure is reported by the read that asks for the cluster.
            let _ = cache.decompress(key, kind, &input, cluster_size);
            cache.recycle_input(input);
        });
        if !started {
            AheadDone { cache: self, key }.finish();
        }
        started
    }

    /// Wait until nothing is being decompressed ahead (tests count decompressions).
    #[cfg(all(test, feature = "zlib"))]
    pub(crate) fn wait_ahead(&self) {
        let mut inner = self.lock();
        while !inner.ahead.is_empty() {
            inner = self
                .done_ahead
                .wait(inner)
                .unwrap_or_else(PoisonError::into_inner);
        }
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
        key: ClusterKey,
        kind: CompressionType,
        input: &[u8],
        cluster_size: usize,
    ) -> Result<Arc<[u8]>, String> {
        let spare = self.lock().spare_clusters.take(|b| b.len() == cluster_size);
        // A spare buffer holds an old cluster: fine, as a decoder that succeeds writes every
        // byte (`Decompressor::decompress`), and a failed cluster is thrown away.
        let mut data = spare.unwrap_or_else(|| zeroed_cluster(cluster_size));
        let result = match Arc::get_mut(&mut data) {
            Some(out) => self.decompress_into(kind, input, out),
            None => Err("a new cluster buffer is shared".to_owned()),
        };
        result?;
        let mut inner = self.lock();
        let CacheState {
            clusters,
            spare_clusters,
            ..
        } = &mut *inner;
        clusters.put_and_evict(key, Arc::clone(&data), |mut old| {
            // Only a buffer no reader still holds can be written again.
            if Arc::get_mut(&mut old).is_some() {
                spare_clusters.keep(old);
            }
        });
        Ok(data)
    }

    /// Decompress `input` into `out` (a whole cluster: a new one of the cache's, or the
    /// caller's own buffer) with an idle decoder; nothing is cached.
    pub(crate) fn decompress_into(
        &self,
        kind: CompressionType,
        input: &[u8],
        out: &mut [u8],
    ) -> Result<(), String> {
        let idle = self.lock().idle.pop();
        let mut decoder = idle.unwrap_or_else(Decompressor::new);
        self.decompressed.fetch_add(1, Ordering::Relaxed);
        let result = decoder.decompress(kind, input, out);
        let mut inner = self.lock();
        if inner.idle.len() < MAX_IDLE_DECODERS {
            inner.idle.push(decoder);
        }
        result
    }

    /// A buffer for `len` bytes of compressed input, to be filled: its contents are stale.
    pub(crate) fn input_buffer(&self, len: usize) -> Vec<u8> {
        let mut buf = self.lock().spare_inputs.take(|_| true).unwrap_or_default();
        // Only bytes the buffer never held are zeroed; the caller overwrites all of them.
        buf.resize(len, 0);
        buf
    }

    /// Keep `input` (a buffer of [`input_buffer`](Self::input_buffer)) for another cluster.
    pub(crate) fn recycle_input(&self, input: Vec<u8>) {
        if input.capacity() > 0 {
            self.lock().spare_inputs.keep(input);
        }
    }
}

/// Marks a cluster decompressed ahead as done when dropped, even by a panic, so no reader
/// waits for it forever.
struct AheadDone<'a> {
    cache: &'a ClusterCache,
    key: ClusterKey,
}

impl AheadDone<'_> {
    fn finish(self) {}
}

impl Drop for AheadDone<'_> {
    fn drop(&mut self) {
        self.cache.lock().ahead.remove(&self.key);
        self.cache.done_ahead.notify_all();
    }
}

/// Zeros to start a cluster buffer from: in .bss, so they cost neither file size nor memory
/// (the pages read are the kernel's shared zero page).
static ZEROS: [u8; 1 << MAX_CLUSTER_BITS] = [0; 1 << MAX_CLUSTER_BITS];

/// A zeroed buffer of `len` bytes to decode a cluster into, in place. An `Arc` made from a
/// `vec![0; len]` would copy it: that copy cost 4% of the time zstd takes to decode a 64 KiB
/// cluster (benches/peers/inflate.rs); copying from `ZEROS` costs as little as writing zeros, and
/// stays fast in unoptimized builds, unlike collecting an iterator.
fn zeroed_cluster(len: usize) -> Arc<[u8]> {
    match ZEROS.get(..len) {
        Some(zeros) => Arc::from(zeros),
        None => Arc::from(vec![0u8; len]),
    }
}

/// Buffers kept for reuse, within [`SPARE_BYTES`] (or one, however large).
struct Spares<B> {
    items: Vec<B>,
    bytes: u64,
    /// What a buffer holds, in bytes.
    size: fn(&B) -> usize,
}

impl<B> Spares<B> {
    fn new(size: fn(&B) -> usize) -> Self {
        Spares {
            items: Vec::new(),
            bytes: 0,
            size,
        }
    }

    /// The buffer kept last, if it `fits` (one of another size waits for its kind of use).
    fn take(&mut self, fits: impl Fn(&B) -> bool) -> Option<B> {
        if !self.items.last().is_some_and(fits) {
            return None;
        }
        let buf = self.items.pop()?;
        self.bytes = self.bytes.saturating_sub((self.size)(&buf) as u64);
        Some(buf)
    }

    /// Keep `buf` if there is room (else it is freed).
    fn keep(&mut self, buf: B) {
        let size = (self.size)(&buf) as u64;
        if self.items.is_empty() || self.bytes.saturating_add(size) <= SPARE_BYTES {
            self.bytes = self.bytes.saturating_add(size);
            self.items.push(buf);
        }
    }
}

/// Reusable decoder state for both compression types.
pub(crate) struct Decompressor {
    #[cfg(feature = "libdeflate")]
    libdeflate: Option<libdeflater::Decompressor>,
    #[cfg(feature = "zlib")]
    inflate: Option<flate2::Decompress>,
    #[cfg(feature = "zstd")]
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl Decompressor {
    /// A decoder, its state made on first use.
    pub(crate) fn new() -> Self {
        Decompressor {
            #[cfg(feature = "libdeflate")]
            libdeflate: None,
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
    Decompressor::new().decompress(kind, input, out)
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
    /// Inflate a raw deflate stream into `out`, with QEMU's verdict (`qcow2_zlib_decompress`:
    /// one `inflate(Z_FINISH)` into the cluster, a success when it fills the cluster, whether
    /// or not the stream ends there).
    ///
    /// With the `libdeflate` feature, libdeflate's one-shot decoder, a fifth less time here
    /// (benches/peers/inflate.rs), answers the common case: a stream that ends exactly at the
    /// end of the cluster, or (an error either way) short of it. Whatever it refuses goes to
    /// zlib, which alone knows QEMU's answer: a stream running past the cluster (which QEMU
    /// truncates), or one that is malformed only after the point where zlib stops. The one
    /// difference left: libdeflate reads a few malformed streams that zlib refuses (length
    /// symbols 286-287 or distance symbols 30-31, more than 286 or 30 code lengths, and
    /// codewords missing from an incomplete code, decoded as a symbol); no encoder writes them.
    #[cfg(feature = "libdeflate")]
    fn inflate(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), String> {
        let fast = self
            .libdeflate
            .get_or_insert_with(libdeflater::Decompressor::new);
        match fast.deflate_decompress(input, out) {
            Ok(len) if len == out.len() => Ok(()),
            Ok(len) => Err(format!("deflate stream gave {len} of {} bytes", out.len())),
            Err(_) => self.inflate_as_zlib(input, out),
        }
    }

    /// Inflate with zlib-rs alone (pure Rust), as QEMU does: see [`Self::inflate_as_zlib`].
    #[cfg(all(feature = "zlib", not(feature = "libdeflate")))]
    fn inflate(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), String> {
        self.inflate_as_zlib(input, out)
    }

    /// QEMU's inflate, step for step, with zlib-rs.
    #[cfg(feature = "zlib")]
    pub(crate) fn inflate_as_zlib(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), String> {
        use flate2::{Decompress, FlushDecompress, Status};
        // Raw deflate, no zlib header: QEMU compresses with windowBits -12 (the window size
        // does not matter to a one-shot inflate: every distance points into `out`).
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

    /// Decode the frames of `input` one after another straight into `out`, as QEMU's
    /// streaming loop does: a cluster may hold several frames, frames need not record their
    /// content size, and whatever follows the frame that fills the cluster (sector padding) is
    /// ignored. Each frame is decoded in one shot into its part of `out`, so libzstd needs no
    /// window buffer whatever window the frame header asks for: memory stays one cluster.
    #[cfg(feature = "zstd")]
    fn unzstd(&mut self, input: &[u8], out: &mut [u8]) -> Result<(), String> {
        use zstd::zstd_safe;
        let decoder = match &mut self.zstd {
            Some(d) => d,
            none => none.insert(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?),
        };
        let (mut rest, mut filled) = (input, 0usize);
        while filled < out.len() {
            let frame_len = zstd_safe::find_frame_compressed_size(rest)
                .map_err(|code| format!("zstd: {}", zstd_safe::get_error_name(code)))?;
            let (frame, after) = rest
                .split_at_checked(frame_len)
                .ok_or("zstd frame runs past its compressed cluster")?;
            let target = out.get_mut(filled..).unwrap_or_default();
            let got = decoder.decompress_to_buffer(frame, target).map_err(|e| {
                format!(
                    "zstd frame at byte {} of the cluster: {e}",
                    input.len().saturating_sub(rest.len())
                )
            })?;
            if got == 0 && frame_len == 0 {
                return Err("zstd stream makes no progress".to_owned());
            }
            filled = filled.saturating_add(got);
            rest = after;
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

    /// Buffers of clusters dropped from the cache are decoded into again; what a reader gets
    /// is always its own cluster, and a cluster that fails leaves nothing behind.
    #[cfg(feature = "zlib")]
    #[test]
    fn reused_cluster_buffers_hold_only_their_own_cluster() {
        use flate2::{write::DeflateEncoder, Compression};
        use std::io::Write;
        const SIZE: usize = 2 << 20; // four fill the cache
        let cluster = |i: u8| -> Vec<u8> { (0..SIZE).map(|b| (b % 249) as u8 ^ i).collect() };
        let deflate = |data: &[u8]| {
            let mut enc = DeflateEncoder::new(Vec::new(), Compression::fast());
            enc.write_all(data).unwrap();
            enc.finish().unwrap()
        };
        let cache = ClusterCache::new();
        let mut buffers = HashSet::new();
        for i in 0..12u8 {
            let key = (0, u64::from(i) << 21, 1);
            let data = cache
                .decompress(key, CompressionType::Zlib, &deflate(&cluster(i)), SIZE)
                .unwrap();
            assert!(data[..] == cluster(i)[..], "cluster {i}");
            buffers.insert(Arc::as_ptr(&data) as *const u8 as usize);
            // A stream ending short of its cluster fails, whatever the buffer held before.
            let short = deflate(&cluster(i)[..SIZE / 2]);
            assert!(cache
                .decompress((1, u64::from(i), 1), CompressionType::Zlib, &short, SIZE)
                .is_err());
            assert!(!cache.knows((1, u64::from(i), 1)));
        }
        assert!(buffers.len() < 12, "no buffer was reused");
        let inner = cache.lock();
        assert!(inner.spare_clusters.bytes <= SPARE_BYTES.max(SIZE as u64));
    }

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

    /// What libdeflate refuses, zlib decides: a stream running past the cluster is read (cut
    /// to the cluster), as QEMU's single `inflate(Z_FINISH)` reads it; one ending short is not.
    #[cfg(feature = "zlib")]
    #[test]
    fn deflate_stream_longer_than_the_cluster_is_cut() {
        use flate2::{write::DeflateEncoder, Compression};
        use std::io::Write;
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let mut enc = DeflateEncoder::new(Vec::new(), Compression::default());
        enc.write_all(&data).unwrap();
        let compressed = enc.finish().unwrap();
        let mut decoder = Decompressor::new();
        for size in [512, 4096, 16384] {
            let mut out = vec![0; size];
            decoder
                .decompress(CompressionType::Zlib, &compressed, &mut out)
                .unwrap();
            assert_eq!(out, data[..size]);
        }
        let mut exact = vec![0; data.len()];
        decoder
            .decompress(CompressionType::Zlib, &compressed, &mut exact)
            .unwrap();
        assert_eq!(exact, data);
        let mut short = vec![0; 32768];
        let err = decoder
            .decompress(CompressionType::Zlib, &compressed, &mut short)
            .unwrap_err();
        assert_eq!(err, "deflate stream gave 20000 of 32768 bytes");
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
    fn zstd_frames_of_other_writers_decode() {
        use std::io::Write;
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 13) as u8).collect();
        // A streaming encoder with a 16 MiB window and no pledged size keeps that window in
        // the frame header and records no content size: QEMU decodes it, so do we, into the
        // cluster buffer itself.
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        enc.set_parameter(zstd::stream::raw::CParameter::WindowLog(24))
            .unwrap();
        enc.include_contentsize(false).unwrap();
        enc.write_all(&data).unwrap();
        let frame = enc.finish().unwrap();
        let mut out = vec![0; 65536];
        decompress(CompressionType::Zstd, &frame, &mut out).unwrap();
        assert_eq!(out, data);
        // Three frames in one cluster, then padding.
        let mut frames = zstd::bulk::compress(&data[..1000], 1).unwrap();
        frames.extend(zstd::bulk::compress(&data[1000..40000], 19).unwrap());
        frames.extend(zstd::bulk::compress(&data[40000..], 3).unwrap());
        frames.extend([0u8; 300]);
        out.fill(0);
        decompress(CompressionType::Zstd, &frames, &mut out).unwrap();
        assert_eq!(out, data);
        // Frames that stop short of a cluster, or run past it, are refused.
        let short = zstd::bulk::compress(&data[..1000], 1).unwrap();
        assert!(decompress(CompressionType::Zstd, &short, &mut out).is_err());
        let mut long = zstd::bulk::compress(&data, 1).unwrap();
        long.extend(zstd::bulk::compress(&data[..10], 1).unwrap());
        let mut small = vec![0; 60000];
        assert!(decompress(CompressionType::Zstd, &long, &mut small).is_err());
    }
}
