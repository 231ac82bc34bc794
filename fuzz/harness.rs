//! Open-and-read harness shared by the fuzz targets (`fuzz/fuzz_targets/*.rs`) and the
//! deterministic mutation test (`tests/memory/mutation.rs`, which includes this file with `#[path]`).
//!
//! Errors are expected and ignored: hostile images must give an `Err`, never a panic, a hang or
//! an unbounded allocation. Besides "no panic", the harness checks the `ReadAt` contract of
//! `Reader` (lengths of reads near and past the end) and that one read returns the same bytes
//! as the same range read in two pieces.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use positioned_io::{ReadAt, Size};
use qcow2::{Limits, OpenOptions, Qcow2, Reader};

/// Guest reads that returned data / that returned an error (statistics for the tests).
pub static READS_OK: AtomicU64 = AtomicU64::new(0);
pub static READS_ERR: AtomicU64 = AtomicU64::new(0);

/// Largest single guest read the harness makes.
pub const MAX_READ: usize = 64 * 1024;
/// A read at least this long decompresses whole compressed clusters straight into its
/// buffer (the reader's large-read path); the harness makes one and compares it with the same
/// range read in [`MAX_READ`] pieces, which go through the cluster cache.
pub const LARGE_READ: usize = (2 << 20) + 4096;
/// Random reads per active reader.
pub const READS: usize = 64;
/// Random reads per snapshot reader.
pub const SNAPSHOT_READS: usize = 16;
/// Snapshot readers opened per image.
pub const MAX_SNAPSHOT_READERS: usize = 4;

/// Tight limits: nothing an image says can make the reader hold more than a few MiB.
pub fn tight_limits() -> Limits {
    let mut l = Limits::default();
    l.l2_cache_bytes = 1 << 20;
    l.max_l1_bytes = 1 << 20;
    l.max_refcount_table_bytes = 1 << 20;
    l.max_snapshots = 64;
    l.max_snapshot_table_bytes = 64 << 10;
    l.max_bitmaps = 64;
    l.max_bitmap_directory_bytes = 64 << 10;
    l.max_chain_depth = 4;
    l.max_bitmap_table_bytes = 1 << 20;
    l
}

/// Options with [`tight_limits`], and one thread: all the work is then on the calling thread,
/// where the mutation test counts what it allocates (and no pool is started per input).
pub fn tight_options() -> OpenOptions {
    OpenOptions::new().limits(tight_limits()).threads(1)
}

/// A tiny deterministic PRNG (xorshift64*), so runs are reproducible without `rand`.
#[derive(Clone)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        // Never zero: xorshift would stay at zero.
        XorShift((seed ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// FNV-1a: a seed for the read plan, derived from the input bytes.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Open `bytes` with tight limits and read across the guest. Never panics unless the crate
/// does (or breaks the `ReadAt` contract).
pub fn open_and_read(bytes: &[u8]) {
    let seed = fnv1a(bytes);
    if let Ok(image) = Qcow2::open_with(bytes.to_vec(), &tight_options()) {
        exercise(&image, seed);
    }
}

/// Touch every metadata accessor, then read from the active reader and a few snapshot readers.
pub fn exercise<I: ReadAt + Size + Send + Sync>(image: &Qcow2<I>, seed: u64) {
    let h = image.header();
    let _ = (
        h.version(),
        h.cluster_bits(),
        h.cluster_size(),
        h.size(),
        h.l1_size(),
        h.l1_table_offset(),
        h.refcount_table_offset(),
        h.nb_snapshots(),
        h.snapshots_offset(),
        h.incompatible_features(),
        h.compression_type(),
        h.header_length(),
    );
    let _ = (
        h.extensions().len(),
        h.feature_names().len(),
        h.features().len(),
        h.backing_file(),
        h.backing_format(),
        h.data_file(),
        h.is_dirty(),
        h.has_extended_l2(),
    );
    let _ = format!("{h:?}");
    let _ = (image.cluster_size(), image.guest_size());
    let info = image.info();
    let _ = info.to_human();
    let _ = format!("{info:?}");
    for s in image.snapshots() {
        let _ = format!("{s:?}");
    }
    for b in image.bitmaps() {
        let _ = format!("{b:?}");
    }
    for b in image.bitmaps().iter().take(4) {
        dirty_extents(image, &b.name);
    }

    let mut rng = XorShift::new(seed);
    if let Ok(reader) = image.reader() {
        read_across(&reader, image.cluster_size(), &mut rng, READS);
        jobs(image, &reader, &mut rng);
    }
    for snap in image.snapshots().iter().take(MAX_SNAPSHOT_READERS) {
        for key in [&snap.id, &snap.name] {
            if let Ok(reader) = image.snapshot_reader(key) {
                read_across(&reader, image.cluster_size(), &mut rng, SNAPSHOT_READS);
            }
        }
    }
}

/// The read-only jobs on a hostile image: check, the map, a parallel read, compare and
/// convert, each on at most [`JOB_BYTES`] of the guest where the job takes a range. Their
/// answers must agree with plain reads wherever both succeed.
pub fn jobs<I: ReadAt + Size + Send + Sync>(
    image: &Qcow2<I>,
    reader: &Reader<'_, I>,
    rng: &mut XorShift,
) {
    if let Ok(report) = image.check() {
        let _ = format!("{report:?}");
    }
    let size = reader.guest_size();
    // A small guest whole (convert and compare then cover the same bytes), else a range.
    let start = match size <= JOB_BYTES {
        true => 0,
        false => rng.below(size) / 512 * 512,
    };
    let end = start.saturating_add(JOB_BYTES).min(size);
    let range = start..end;
    map_is_contiguous(reader, range.clone());
    block_status_is_contiguous(reader, range.clone());
    let len = (end - start) as usize;
    let mut plain = vec![0u8; len];
    let plain_ok = reader.read_exact_at(start, &mut plain).is_ok();
    parallel_read_matches(reader, range, &plain, plain_ok, rng);
    if size <= JOB_BYTES {
        for strict in [false, true] {
            let options = qcow2::CompareOptions::new().strict(strict);
            if let Ok(same) = qcow2::compare(reader, reader, &options) {
                assert_eq!(
                    same,
                    qcow2::Comparison::Identical,
                    "a disk differs from itself (strict: {strict})"
                );
            }
        }
        let mut out = Vec::new();
        // One thread, as the image's pool here: a conversion's own threads exit after it
        // returns, and LeakSanitizer then reports their thread-locals as leaked.
        let options = qcow2::ConvertOptions::new().threads(1);
        if qcow2::convert_to_writer(reader, &mut out, &options, |_, _| {}).is_ok() && plain_ok {
            assert!(
                out == plain,
                "convert differs from a plain read of the guest"
            );
        }
    }
}

/// Largest range of the guest a job reads in [`jobs`].
pub const JOB_BYTES: u64 = 1 << 20;

/// The map of `range`, at most 256 extents: contiguous from the start of the range, each
/// non-empty and inside it.
fn map_is_contiguous<I: ReadAt>(reader: &Reader<'_, I>, range: std::ops::Range<u64>) {
    let mut pos = range.start;
    for extent in reader.map(range.clone()).take(256) {
        let Ok(e) = extent else { break };
        assert_eq!(e.start, pos, "map extent starts where the last ended");
        assert!(e.length > 0, "empty map extent at {pos:#x}");
        pos = e.start + e.length;
        assert!(
            pos <= range.end,
            "map extent past the range at {:#x}",
            e.start
        );
    }
}

/// QEMU's block status from the start of `range`, at most 256 steps: each stretch non-empty,
/// following the last, inside the guest, and `eof` on the one that reaches its end.
fn block_status_is_contiguous<I: ReadAt>(reader: &Reader<'_, I>, range: std::ops::Range<u64>) {
    let size = reader.guest_size();
    let mut pos = range.start;
    for _ in 0..256 {
        if pos >= range.end {
            break;
        }
        let Ok(found) = qcow2::GuestDisk::block_status(reader, pos) else {
            break;
        };
        let Some((status, len)) = found else {
            panic!("no block status at {pos:#x}, inside a guest of {size:#x} bytes");
        };
        assert!(len > 0, "empty block status stretch at {pos:#x}");
        pos += len;
        assert!(pos <= size, "block status past the end at {pos:#x}");
        assert!(
            status.eof || pos < size,
            "no eof flag on the stretch ending the disk"
        );
    }
}

/// A parallel read of `range` (chunks of 4 to 64 KiB): chunks in guest order covering the
/// range, and, when it and the plain read both succeed, the same bytes.
fn parallel_read_matches<I: ReadAt + Sync>(
    reader: &Reader<'_, I>,
    range: std::ops::Range<u64>,
    plain: &[u8],
    plain_ok: bool,
    rng: &mut XorShift,
) {
    let options = qcow2::ParallelReadOptions::new().chunk_size(4096 << rng.below(5));
    let mut got = vec![0u8; plain.len()];
    let mut pos = range.start;
    let result = reader.read_parallel(range.clone(), &options, |chunk| {
        let (offset, len) = match chunk {
            qcow2::Chunk::Data { offset, bytes } => {
                let at = (offset - range.start) as usize;
                got[at..at + bytes.len()].copy_from_slice(bytes);
                (offset, bytes.len() as u64)
            }
            qcow2::Chunk::Zeros { offset, len } => (offset, len),
            _ => panic!("a kind of chunk this harness does not know"),
        };
        assert_eq!(offset, pos, "parallel chunks out of order");
        assert!(len > 0, "empty parallel chunk at {offset:#x}");
        pos += len;
        assert!(
            pos <= range.end,
            "parallel chunk past the range at {offset:#x}"
        );
        Ok(())
    });
    if result.is_ok() {
        assert_eq!(pos, range.end, "parallel read stopped short");
        if plain_ok {
            assert!(got == plain, "parallel read differs from a plain read");
        }
    }
}

/// The first extents of a bitmap (in use or not): ascending, apart, inside the guest.
pub fn dirty_extents<I: ReadAt>(image: &Qcow2<I>, name: &str) {
    let Ok(extents) = image.dirty_extents_allow_in_use(name) else {
        return;
    };
    let mut end = None;
    for e in extents.take(256) {
        let Ok(e) = e else { break };
        assert!(e.length > 0, "empty dirty extent at {:#x}", e.start);
        assert!(
            end.is_none_or(|end| e.start > end),
            "dirty extents not merged"
        );
        end = Some(e.start + e.length);
        assert!(
            e.start + e.length <= image.guest_size(),
            "dirty extent past the end"
        );
    }
}

/// Read the first and last cluster and `count` ranges of up to [`MAX_READ`] bytes at offsets
/// chosen by `rng` (often cluster aligned, sometimes crossing the end of the guest).
pub fn read_across<I: ReadAt>(
    reader: &Reader<'_, I>,
    cluster: u64,
    rng: &mut XorShift,
    count: usize,
) {
    let size = reader.guest_size();
    assert_eq!(
        reader.size().ok().flatten(),
        Some(size),
        "Size::size disagrees with guest_size"
    );
    let cluster = cluster.clamp(1, MAX_READ as u64);
    let mut buf = vec![0u8; MAX_READ];

    // Past the end: always Ok(0).
    for pos in [size, size.saturating_add(1), u64::MAX] {
        if let Ok(n) = reader.read_at(pos, &mut buf[..16]) {
            assert_eq!(
                n, 0,
                "read at {pos:#x} past the end ({size:#x}) returned {n}"
            );
        }
    }
    if size == 0 {
        return;
    }

    // The allocation map: contiguous, non-empty extents that stay inside the guest.
    let mut pos = rng.below(size);
    for _ in 0..32 {
        match reader.extent_at(pos) {
            Ok(Some(e)) => {
                assert_eq!(e.start, pos, "extent starts where asked");
                assert!(e.length > 0, "empty extent at {pos:#x}");
                assert!(e.start + e.length <= size, "extent past the end");
                pos = e.start + e.length;
            }
            Ok(None) => {
                assert!(pos >= size, "no extent at {pos:#x} inside the guest");
                break;
            }
            Err(_) => break,
        }
    }

    // A range's extent is the extent at its start, cut at the range's end.
    let pos = rng.below(size);
    let len = rng.below(4 * cluster) + 1;
    if let (Ok(Some(at)), Ok(Some(within))) = (
        reader.extent_at(pos),
        reader.extent_in(pos..pos.saturating_add(len)),
    ) {
        assert_eq!(
            (within.start, within.kind),
            (at.start, at.kind),
            "extent_in at {pos:#x}"
        );
        assert_eq!(
            within.length,
            at.length.min(len),
            "extent_in length at {pos:#x}"
        );
    }

    large_read_matches_pieces(reader, size, rng);

    let mut plan = vec![
        (0, cluster as usize),
        (size.saturating_sub(cluster), cluster as usize),
    ];
    for _ in 0..count {
        let pos = match rng.below(4) {
            0 => rng.below(size),
            1 => rng.below(size) / cluster * cluster,
            2 => size.saturating_sub(rng.below(MAX_READ as u64 + 1)),
            _ => (rng.below(size) / cluster * cluster).saturating_sub(rng.below(16)),
        };
        let len = match rng.below(3) {
            0 => rng.below(MAX_READ as u64 + 1) as usize,
            1 => (rng.below(512) + 1) as usize,
            _ => cluster as usize,
        };
        plan.push((pos, len));
    }

    for (i, (pos, len)) in plan.into_iter().enumerate() {
        let buf = &mut buf[..len];
        let Ok(n) = reader.read_at(pos, buf) else {
            READS_ERR.fetch_add(1, Relaxed);
            continue;
        };
        READS_OK.fetch_add(1, Relaxed);
        let expect = size.saturating_sub(pos).min(len as u64) as usize;
        assert_eq!(
            n, expect,
            "read of {len} at {pos:#x} (guest size {size:#x}) returned {n}, expected {expect}"
        );
        // Every fourth read: the same range in two pieces must give the same bytes.
        if i % 4 == 0 && n > 1 {
            let cut = (rng.below(n as u64 - 1) + 1) as usize;
            let mut again = vec![0u8; n];
            let (a, b) = again.split_at_mut(cut);
            let first = reader.read_at(pos, a);
            let second = reader.read_at(pos + cut as u64, b);
            if let (Ok(na), Ok(nb)) = (first, second) {
                assert_eq!(
                    (na, nb),
                    (a.len(), b.len()),
                    "split read lengths at {pos:#x}"
                );
                assert!(
                    again[..] == buf[..n],
                    "read of {n} at {pos:#x} differs from the same range read as {cut} + {}",
                    n - cut
                );
            }
        }
    }
}

/// One large read from a cluster-aligned offset near the start, against the same range in
/// [`MAX_READ`] pieces: both fail, or both give the same bytes.
fn large_read_matches_pieces<I: ReadAt>(reader: &Reader<'_, I>, size: u64, rng: &mut XorShift) {
    let pos = rng.below(4) * 4096;
    let len = size.saturating_sub(pos).min(LARGE_READ as u64) as usize;
    let mut large = vec![0u8; len];
    let whole = reader.read_exact_at(pos, &mut large);
    let mut pieces = vec![0u8; len];
    let pieced = pieces
        .chunks_mut(MAX_READ)
        .enumerate()
        .try_for_each(|(i, piece)| reader.read_exact_at(pos + (i * MAX_READ) as u64, piece));
    assert_eq!(
        whole.is_ok(),
        pieced.is_ok(),
        "a read of {len} at {pos:#x} and the same in pieces: {whole:?} vs {pieced:?}"
    );
    if whole.is_ok() {
        assert!(
            large == pieces,
            "a read of {len} at {pos:#x} differs from the same in pieces"
        );
    }
}

/// The three parts of an `open_with_backing` input and its flags.
pub struct BackingInput<'a> {
    pub flags: u8,
    pub top: &'a [u8],
    pub backing: &'a [u8],
    pub raw: &'a [u8],
}

/// Flag: attach the raw slice as the top image's data file.
pub const FLAG_TOP_DATA_FILE: u8 = 1;
/// Flag: attach the raw slice as the backing image's data file.
pub const FLAG_BACKING_DATA_FILE: u8 = 2;
/// Flag: attach the raw slice as the backing image's own raw backing file.
pub const FLAG_BACKING_RAW: u8 = 4;
/// Flag: read the top image over zeros instead of the backing image.
pub const FLAG_TOP_ZEROS: u8 = 8;
/// Open the top image with two threads: large reads then read the backing image's runs on
/// its pool while the calling thread reads the top's.
pub const FLAG_TOP_THREADS: u8 = 16;

/// Split an `open_with_backing` input: `[flags][top_len u32 LE][backing_len u32 LE]` then the
/// top image, the backing image and the raw slice (lengths are clamped to what is there).
pub fn split_backing_input(data: &[u8]) -> Option<BackingInput<'_>> {
    let (head, rest) = data.split_at_checked(9)?;
    let flags = head[0];
    let top_len = u32::from_le_bytes(head[1..5].try_into().ok()?) as usize;
    let backing_len = u32::from_le_bytes(head[5..9].try_into().ok()?) as usize;
    let (top, rest) = rest.split_at(top_len.min(rest.len()));
    let (backing, raw) = rest.split_at(backing_len.min(rest.len()));
    Some(BackingInput {
        flags,
        top,
        backing,
        raw,
    })
}

/// Build an `open_with_backing` input (for seeds and tests).
pub fn join_backing_input(flags: u8, top: &[u8], backing: &[u8], raw: &[u8]) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend_from_slice(&(top.len() as u32).to_le_bytes());
    out.extend_from_slice(&(backing.len() as u32).to_le_bytes());
    out.extend_from_slice(top);
    out.extend_from_slice(backing);
    out.extend_from_slice(raw);
    out
}

/// Open the top image with a backing image (and data files) attached as the flags say, then
/// read across the top image, which reads through to the backing image.
pub fn open_with_backing(data: &[u8]) {
    let Some(input) = split_backing_input(data) else {
        return;
    };
    let options = tight_options();
    let top_options = match input.flags & FLAG_TOP_THREADS {
        0 => options.clone(),
        _ => options.clone().threads(2),
    };
    let Ok(mut top) = Qcow2::open_with(input.top.to_vec(), &top_options) else {
        return;
    };
    if input.flags & FLAG_TOP_DATA_FILE != 0 {
        // Refused (an error) for images without the data-file bit: fine either way.
        let _ = top.set_data_file(input.raw.to_vec());
    }
    if input.flags & FLAG_TOP_ZEROS != 0 {
        top.set_backing_zeros();
    } else if let Ok(mut backing) = Qcow2::open_with(input.backing.to_vec(), &options) {
        if input.flags & FLAG_BACKING_DATA_FILE != 0 {
            let _ = backing.set_data_file(input.raw.to_vec());
        }
        if input.flags & FLAG_BACKING_RAW != 0 {
            backing.set_backing_raw(input.raw.to_vec(), input.raw.len() as u64);
        }
        top.set_backing_image(backing);
    } else if input.flags & FLAG_BACKING_RAW != 0 {
        top.set_backing_raw(input.backing.to_vec(), input.backing.len() as u64);
    }
    exercise(&top, fnv1a(data));
}

/// Storage in memory for the writer, refusing to grow past [`MAX_STORAGE`] (a hostile image
/// may name clusters far past its end; a file would only get sparse there).
pub struct MemStorage(std::sync::Mutex<Vec<u8>>);

/// Largest in-memory image the write harness lets the writer make.
pub const MAX_STORAGE: usize = 64 << 20;

impl MemStorage {
    pub fn new(bytes: &[u8]) -> Self {
        MemStorage(std::sync::Mutex::new(bytes.to_vec()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ReadAt for MemStorage {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let data = self.lock();
        let start = usize::try_from(pos).unwrap_or(usize::MAX).min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }
}

impl qcow2::PositionalSink for MemStorage {
    fn write_all_at(&self, pos: u64, buf: &[u8]) -> std::io::Result<()> {
        let end = usize::try_from(pos)
            .ok()
            .and_then(|p| p.checked_add(buf.len()))
            .filter(|end| *end <= MAX_STORAGE)
            .ok_or_else(|| std::io::Error::other("write past the harness's storage"))?;
        let mut data = self.lock();
        if data.len() < end {
            data.resize(end, 0);
        }
        data[end - buf.len()..end].copy_from_slice(buf);
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let len = usize::try_from(len)
            .ok()
            .filter(|len| *len <= MAX_STORAGE)
            .ok_or_else(|| std::io::Error::other("length past the harness's storage"))?;
        self.lock().resize(len, 0);
        Ok(())
    }
}

impl qcow2::Storage for MemStorage {
    fn length(&self) -> std::io::Result<u64> {
        Ok(self.lock().len() as u64)
    }

    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Largest single write the write harness makes.
pub const MAX_WRITE: u64 = 192 * 1024;

/// Open arbitrary bytes for writing (tight limits) and write, zero, discard, flush, read back
/// and close: errors are fine, panics, hangs and unbounded allocations are not.
pub fn open_and_write(bytes: &[u8]) {
    let seed = fnv1a(bytes);
    let options = tight_options().write(true);
    let Ok(image) = Qcow2::open_with(MemStorage::new(bytes), &options) else {
        return;
    };
    let Ok(writer) = image.into_writer() else {
        return;
    };
    let size = writer.guest_size();
    let mut rng = XorShift::new(seed);
    for i in 0..24u64 {
        if size == 0 {
            break;
        }
        let len = (1 + rng.below(MAX_WRITE)).min(size);
        let pos = rng.below(size - len + 1);
        match rng.below(6) {
            0 => {
                let _ = writer.write_zeroes(pos, len, rng.below(2) == 0);
            }
            1 => {
                let _ = writer.discard(pos, len);
            }
            2 => {
                let _ = writer.flush();
            }
            _ => {
                // Not checked against what was written: in a corrupt image two guest clusters
                // may map to one host cluster (data past the end of a truncated file, whose
                // refcounts nobody can know), as they do for QEMU. Valid images are checked
                // in tests/integration/write.rs.
                let data = vec![(i as u8).wrapping_mul(37) | 1; len as usize];
                if writer.write_all_at(pos, &data).is_ok() {
                    let mut back = vec![0u8; len as usize];
                    let _ = writer.read_exact_at(pos, &mut back);
                }
            }
        }
    }
    if let Ok(mut image) = writer.close() {
        snapshot_jobs(&mut image);
    }
}

/// The snapshot jobs on whatever the image has become: a snapshot made, an existing one
/// applied and deleted, the new one applied and deleted; each done or refused, never a panic.
fn snapshot_jobs(image: &mut Qcow2<MemStorage>) {
    let existing = image.snapshots().first().map(|s| s.id.clone());
    let _ = image.create_snapshot("fuzz");
    if let Some(id) = existing {
        let _ = image.apply_snapshot(&id);
        let _ = image.delete_snapshot(&id);
    }
    let _ = image.apply_snapshot("fuzz");
    let _ = image.delete_snapshot("fuzz");
}
