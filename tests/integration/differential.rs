//! Differential tests against QEMU: images are made in a temp dir with `qemu-img` and
//! `qemu-io`, then every byte this crate reads is compared with `qemu-img convert -O raw` of
//! the same image, through several read patterns (1 MiB chunks, odd chunk sizes that cross
//! cluster and L2-table boundaries at awkward offsets, random reads, reads at and across the
//! end). `image.info()` is compared with `qemu-img info --output=json` for every image.
//!
//! Needs `qemu-img` and `qemu-io` (or `$QEMU_IMG` / `$QEMU_IO`): without them each test
//! prints a loud SKIPPED notice, or fails when `CI=true`. Set `QCOW2_KEEP_TEMP=1` to keep the
//! images of a failing run for inspection.

use crate::common;

use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use common::{describe_difference, is_all_zero, read_full, Rng};
use positioned_io::ReadAt;
use qcow2::{Error, Qcow2, Reader};
use serde_json::Value;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

/// Chunk sizes for the sequential passes: 1 MiB, and two odd sizes so reads start and end at
/// offsets that are aligned to nothing.
const CHUNKS: [usize; 3] = [1 << 20, 65536 + 513, 4095];

/// One test's QEMU tools and temp dir (a [`common::Env`], which it derefs to), with a pattern
/// file and the failures collected so far.
struct Env {
    env: common::Env,
    failures: Vec<String>,
    cases: usize,
}

impl std::ops::Deref for Env {
    type Target = common::Env;
    fn deref(&self) -> &common::Env {
        &self.env
    }
}

impl Env {
    /// `None` (after the loud skip notice) when QEMU's tools are missing.
    fn new(test: &str) -> Option<Env> {
        let env = common::Env::new(test)?;
        // A pattern file for `qemu-io write -s`: incompressible, prime length, so the data
        // depends on the position inside each write.
        let mut pat = vec![0u8; 4093];
        Rng::new(0x5eed).fill(&mut pat);
        std::fs::write(env.path("pat.bin"), pat).expect("pattern file");
        Some(Env {
            env,
            failures: Vec::new(),
            cases: 0,
        })
    }

    fn fail(&mut self, msg: String) {
        eprintln!("FAILED: {msg}");
        self.failures.push(msg);
    }

    /// Open `name` with `open_path`, compare every byte and `info()` with QEMU's.
    fn verify(&mut self, label: &str, name: &str) {
        self.cases += 1;
        let expected = self.convert(name, &[]);
        let path = self.path(name);
        let opened = catch_unwind(|| Qcow2::open_path(&path));
        let image = match opened {
            Ok(Ok(image)) => image,
            Ok(Err(e)) => return self.fail(format!("{label}: open_path({name}): {e}")),
            Err(_) => return self.fail(format!("{label}: open_path({name}) panicked")),
        };
        self.compare_image(label, &image, &expected);
        self.compare_info(label, name, &image, true);
    }

    /// Compare the active image's bytes with `expected`.
    fn compare_image<I: ReadAt + Send + Sync>(
        &mut self,
        label: &str,
        image: &Qcow2<I>,
        expected: &[u8],
    ) {
        let cluster = image.cluster_size();
        let result = catch_unwind(AssertUnwindSafe(|| match image.reader() {
            Ok(reader) => compare_reader(label, &reader, expected, cluster),
            Err(e) => vec![format!("{label}: reader(): {e}")],
        }));
        match result {
            Ok(failures) => failures.into_iter().for_each(|f| self.fail(f)),
            Err(_) => self.fail(format!("{label}: reading panicked")),
        }
    }

    /// Compare `info()` with `qemu-img info --output=json` (and `--backing-chain` when the
    /// image was opened with its chain).
    fn compare_info<I: ReadAt + Send + Sync>(
        &mut self,
        label: &str,
        name: &str,
        image: &Qcow2<I>,
        with_chain: bool,
    ) {
        let json = self.qemu.info_json(self.dir.path(), name, with_chain);
        let (top, chain) = match &json {
            Value::Array(entries) => (&entries[0], Some(&entries[1..])),
            other => (other, None),
        };
        let info = image.info();
        let mut diffs = info_differences(&info, top, self.dir.path());
        if let Some(chain) = chain {
            diffs.extend(chain_differences(&info, chain, self.dir.path()));
        }
        for d in diffs {
            self.fail(format!("{label}: info of {name}: {d}"));
        }
    }

    /// Panic with every failure collected, or report the number of cases checked.
    fn finish(self, test: &str) {
        assert!(
            self.failures.is_empty(),
            "{test}: {} failure(s) in {} case(s):\n  {}",
            self.failures.len(),
            self.cases,
            self.failures.join("\n  ")
        );
        eprintln!("{test}: {} cases match QEMU", self.cases);
    }
}

/// Read all of `reader` through every pattern and compare with `expected`; returns failures.
fn compare_reader<R: ReadAt + Send + Sync>(
    label: &str,
    reader: &Reader<'_, R>,
    expected: &[u8],
    cluster: u64,
) -> Vec<String> {
    let mut failures = Vec::new();
    let size = expected.len() as u64;
    if reader.guest_size() != size {
        failures.push(format!(
            "{label}: guest size {} but qemu-img convert gave {size} bytes",
            reader.guest_size()
        ));
        return failures;
    }
    if expected.is_empty() {
        return failures;
    }
    // Sequential passes.
    for chunk in CHUNKS {
        let mut buf = vec![0u8; chunk];
        let mut pos = 0u64;
        while pos < size {
            let want = chunk.min((size - pos) as usize);
            match reader.read_at(pos, &mut buf) {
                Ok(n) if n == want => {
                    let theirs = &expected[pos as usize..pos as usize + n];
                    let what = format!("{label} (chunk {chunk})");
                    if let Some(d) = describe_difference(&what, pos, &buf[..n], theirs) {
                        failures.push(d);
                        break;
                    }
                    pos += n as u64;
                }
                Ok(n) => {
                    failures.push(format!(
                        "{label} (chunk {chunk}): read_at({pos}, {chunk}) returned {n}, \
                         expected {want}"
                    ));
                    break;
                }
                Err(e) => {
                    failures.push(format!(
                        "{label} (chunk {chunk}): read_at({pos}, {chunk}) failed: {e}"
                    ));
                    break;
                }
            }
        }
    }
    // Random reads: offsets anywhere, lengths up to three clusters (at most 1 MiB).
    let mut rng = Rng::new(seed_of(label));
    let max_len = (3 * cluster).clamp(4096, MIB);
    for _ in 0..24 {
        let pos = rng.below(size);
        let len = 1 + rng.below(max_len) as usize;
        if let Some(f) = compare_at(label, reader, expected, pos, len) {
            failures.push(f);
            break;
        }
    }
    // At the end: 0 bytes; across the end: short.
    let mut buf = [0u8; 1000];
    match reader.read_at(size, &mut buf) {
        Ok(0) => {}
        other => failures.push(format!(
            "{label}: read at the end gave {other:?}, not Ok(0)"
        )),
    }
    let tail = size.saturating_sub(100);
    if let Some(f) = compare_at(label, reader, expected, tail, 1000) {
        failures.push(f);
    }
    failures
}

/// Read `len` bytes at `pos` (clipped at the end) and compare; `Some(description)` on error.
fn compare_at<R: ReadAt + Send + Sync>(
    label: &str,
    reader: &Reader<'_, R>,
    expected: &[u8],
    pos: u64,
    len: usize,
) -> Option<String> {
    let mut buf = vec![0u8; len];
    let want = len.min(expected.len().saturating_sub(pos as usize));
    match read_full(reader, pos, &mut buf) {
        Ok(n) if n == want => {
            let theirs = &expected[pos as usize..pos as usize + n];
            describe_difference(
                &format!("{label} (read_at {pos} len {len})"),
                pos,
                &buf[..n],
                theirs,
            )
        }
        Ok(n) => Some(format!(
            "{label}: read at {pos} of {len} bytes gave {n}, expected {want}"
        )),
        Err(e) => Some(format!("{label}: read at {pos} of {len} bytes failed: {e}")),
    }
}

fn seed_of(label: &str) -> u64 {
    label.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

// ------------------------------------------------------------------ info comparison --

fn json_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn json_u64(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

fn json_bool(v: &Value, key: &str) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// The same file? (QEMU prints names relative to its cwd, `dir`.)
fn same_file(dir: &Path, qemu_name: &str, ours: &str) -> bool {
    let a = dir.join(qemu_name).canonicalize();
    let b = dir.join(ours).canonicalize();
    matches!((a, b), (Ok(a), Ok(b)) if a == b)
}

fn info_differences(info: &qcow2::ImageInfo, q: &Value, dir: &Path) -> Vec<String> {
    let mut d = Vec::new();
    let mut eq = |what: &str, ours: String, theirs: String| {
        if ours != theirs {
            d.push(format!("{what}: ours {ours}, qemu {theirs}"));
        }
    };
    let data = &q["format-specific"]["data"];
    let Some(specific) = info.qcow2() else {
        return vec![format!("no qcow2 format-specific information: {info:?}")];
    };
    eq(
        "format",
        format!("{:?}", Some(info.format)),
        format!("{:?}", json_str(q, "format")),
    );
    eq(
        "virtual-size",
        format!("{:?}", Some(info.virtual_size)),
        format!("{:?}", json_u64(q, "virtual-size")),
    );
    eq(
        "cluster-size",
        format!("{:?}", info.cluster_size),
        format!("{:?}", json_u64(q, "cluster-size")),
    );
    eq(
        "compat",
        format!("{:?}", Some(specific.compat)),
        format!("{:?}", json_str(data, "compat")),
    );
    eq(
        "compression-type",
        format!("{:?}", Some(specific.compression_type)),
        format!("{:?}", json_str(data, "compression-type")),
    );
    eq(
        "refcount-bits",
        format!("{:?}", Some(u64::from(specific.refcount_bits))),
        format!("{:?}", json_u64(data, "refcount-bits")),
    );
    eq(
        "lazy-refcounts",
        specific.lazy_refcounts.unwrap_or(false).to_string(),
        json_bool(data, "lazy-refcounts").to_string(),
    );
    eq(
        "extended-l2",
        specific.extended_l2.unwrap_or(false).to_string(),
        json_bool(data, "extended-l2").to_string(),
    );
    eq(
        "corrupt",
        specific.corrupt.unwrap_or(false).to_string(),
        json_bool(data, "corrupt").to_string(),
    );
    eq(
        "dirty-flag",
        info.dirty.to_string(),
        json_bool(q, "dirty-flag").to_string(),
    );
    eq(
        "backing-filename",
        format!("{:?}", info.backing_filename.as_deref()),
        format!("{:?}", json_str(q, "backing-filename")),
    );
    eq(
        "backing-filename-format",
        format!("{:?}", info.backing_filename_format.as_deref()),
        format!("{:?}", json_str(q, "backing-filename-format")),
    );
    eq(
        "data-file",
        format!("{:?}", specific.data_file.as_deref()),
        format!("{:?}", json_str(data, "data-file")),
    );
    eq(
        "data-file-raw",
        specific.data_file_raw.unwrap_or(false).to_string(),
        json_bool(data, "data-file-raw").to_string(),
    );
    if let (Some(ours), Some(theirs)) = (info.filename.as_deref(), json_str(q, "filename")) {
        if !same_file(dir, theirs, ours) {
            d.push(format!("filename: ours {ours}, qemu {theirs}"));
        }
    }
    // Snapshots.
    let empty = Vec::new();
    let snaps = q
        .get("snapshots")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let ours: Vec<String> = info.snapshots.iter().map(snapshot_summary).collect();
    let theirs: Vec<String> = snaps.iter().map(qemu_snapshot_summary).collect();
    if ours != theirs {
        d.push(format!("snapshots: ours {ours:?}, qemu {theirs:?}"));
    }
    // Bitmaps.
    let bitmaps = data
        .get("bitmaps")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let ours: Vec<String> = specific
        .bitmaps
        .iter()
        .map(|b| format!("{} g={} {:?}", b.name, b.granularity, b.flags))
        .collect();
    let theirs: Vec<String> = bitmaps
        .iter()
        .map(|b| {
            let flags: Vec<&str> = b["flags"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            format!(
                "{} g={} {:?}",
                json_str(b, "name").unwrap_or("?"),
                json_u64(b, "granularity").unwrap_or(0),
                flags
            )
        })
        .collect();
    if ours != theirs {
        d.push(format!("bitmaps: ours {ours:?}, qemu {theirs:?}"));
    }
    d
}

fn snapshot_summary(s: &qcow2::SnapshotInfo) -> String {
    format!(
        "id={} name={} vm-state-size={} date={}.{:09} vm-clock={} icount={:?}",
        s.id,
        s.name,
        s.vm_state_size,
        s.date_sec,
        s.date_nsec,
        s.vm_clock_sec * 1_000_000_000 + s.vm_clock_nsec,
        s.icount
    )
}

fn qemu_snapshot_summary(s: &Value) -> String {
    let clock = json_u64(s, "vm-clock-sec").unwrap_or(0) * 1_000_000_000
        + json_u64(s, "vm-clock-nsec").unwrap_or(0);
    format!(
        "id={} name={} vm-state-size={} date={}.{:09} vm-clock={} icount={:?}",
        json_str(s, "id").unwrap_or("?"),
        json_str(s, "name").unwrap_or("?"),
        json_u64(s, "vm-state-size").unwrap_or(u64::MAX),
        json_u64(s, "date-sec").unwrap_or(u64::MAX),
        json_u64(s, "date-nsec").unwrap_or(u64::MAX),
        clock,
        json_u64(s, "icount"),
    )
}

fn chain_differences(info: &qcow2::ImageInfo, chain: &[Value], dir: &Path) -> Vec<String> {
    let mut d = Vec::new();
    if info.backing_chain.len() != chain.len() {
        d.push(format!(
            "backing chain has {} images, qemu lists {}",
            info.backing_chain.len(),
            chain.len()
        ));
    }
    for (i, (ours, theirs)) in info.backing_chain.iter().zip(chain).enumerate() {
        let qname = json_str(theirs, "filename").unwrap_or("?");
        match ours.filename.as_deref() {
            Some(f) if same_file(dir, qname, f) => {}
            other => d.push(format!(
                "backing chain [{i}] filename: ours {other:?}, qemu {qname}"
            )),
        }
        if Some(ours.format.as_str()) != json_str(theirs, "format") {
            d.push(format!(
                "backing chain [{i}] format: ours {}, qemu {:?}",
                ours.format,
                json_str(theirs, "format")
            ));
        }
        if Some(ours.virtual_size) != json_u64(theirs, "virtual-size") {
            d.push(format!(
                "backing chain [{i}] ({qname}) virtual-size: ours {}, qemu {:?}",
                ours.virtual_size,
                json_u64(theirs, "virtual-size")
            ));
        }
    }
    d
}

// ------------------------------------------------------------------ image recipes --

/// qemu-io commands exercising one image of cluster size `c` and virtual size `size`:
/// unaligned and cluster-crossing data, zero writes (full clusters: zero flag; partial: COW),
/// unmapping zero writes, discards, a write across an L2-table boundary when the image has
/// more than one, and a write up to the last byte. Uses clusters 0..14, so `size` must be
/// above 15 clusters.
fn mixed_ops(c: u64, size: u64) -> Vec<String> {
    assert!(size > 15 * c + 1000, "image too small for mixed_ops");
    let mut ops = vec![
        format!("write -P 0xa1 100 {}", 3 * c),
        format!("write -P 0xa5 {} 777", 4 * c - 300),
        format!("write -s pat.bin {} {}", 5 * c + 33, 2 * c + 1000),
        format!("write -z {} {}", 6 * c, c),
        format!("write -z {} 100", c + 50),
        format!("discard {} {}", 2 * c, c),
        format!("write -P 0xa2 {} {}", 9 * c, 2 * c),
        format!("write -z -u {} {}", 10 * c, c),
        format!("write -z {} {}", 12 * c, 2 * c),
        format!("write -P 0xa4 {} {}", size - c - 1000, c + 1000),
    ];
    let l2_span = c * (c / 8);
    if l2_span + 1000 < size - c - 1000 {
        ops.push(format!("write -P 0xa3 {} 1400", l2_span - 700));
        ops.push(format!("write -z {} {}", l2_span - c, 2 * c));
        ops.push(format!("write -P 0xa6 {} 300", l2_span - c / 2));
    }
    ops
}

/// A raw source whose clusters alternate between compressible text, incompressible random
/// data, zeros, a text head with a zero tail, and a few bytes in a zero cluster.
fn mixed_source(c: u64, size: u64, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; size as usize];
    for (i, cluster) in buf.chunks_mut(c as usize).enumerate() {
        let n = cluster.len();
        match i % 6 {
            0 | 5 => rng.fill_text(cluster),
            1 => rng.fill(cluster),
            2 => {}
            3 => rng.fill_text(&mut cluster[..n / 3]),
            _ => cluster[n / 2..n / 2 + 17.min(n / 2)]
                .copy_from_slice(&b"sparse-in-cluster"[..17.min(n / 2)]),
        }
    }
    buf
}

// ------------------------------------------------------------------ tests --

#[test]
fn cluster_sizes_and_versions() {
    let Some(mut env) = Env::new("cluster_sizes") else {
        return;
    };
    let cases: [(&str, u64, u64); 7] = [
        ("1.1", 512, MIB + 1536),
        ("1.1", 4 * KIB, 3 * MIB + 1536),
        ("1.1", 64 * KIB, 2 * MIB + 2560),
        ("1.1", 2 * MIB, 32 * MIB + 3584),
        ("0.10", 512, MIB + 512),
        ("0.10", 4 * KIB, 3 * MIB + 1536),
        ("0.10", 64 * KIB, 2 * MIB + 2560),
    ];
    for (compat, c, size) in cases {
        let name = format!("cs{c}-v{compat}.qcow2");
        env.create(&name, size, &format!("compat={compat},cluster_size={c}"));
        env.io(&name, &mixed_ops(c, size));
        env.verify(
            &format!("compat={compat} cluster_size={c} size={size}"),
            &name,
        );
    }
    env.finish("cluster_sizes_and_versions");
}

#[test]
fn sparse_images() {
    let Some(mut env) = Env::new("sparse") else {
        return;
    };
    // Nothing written at all.
    env.create("empty.qcow2", 48 * MIB + 512, "cluster_size=65536");
    env.verify("empty 48 MiB image", "empty.qcow2");
    // A few small writes far apart; everything else unallocated.
    env.create("sparse.qcow2", 64 * MIB, "cluster_size=4096");
    env.io(
        "sparse.qcow2",
        &[
            "write -P 0x01 0 512".to_owned(),
            format!("write -P 0x02 {} 4097", 17 * MIB - 1),
            format!("write -s pat.bin {} 10000", 40 * MIB + 3),
            format!("write -P 0x03 {} 512", 64 * MIB - 512),
        ],
    );
    env.verify("sparse 64 MiB, 4k clusters", "sparse.qcow2");
    env.finish("sparse_images");
}

#[test]
fn huge_sparse_4tib() {
    let Some(mut env) = Env::new("huge") else {
        return;
    };
    let size = 4 * TIB;
    env.create("huge.qcow2", size, "cluster_size=65536");
    // (offset, length, pattern byte; 0 = write -z)
    let writes: [(u64, u64, u8); 7] = [
        (0, 65536 + 1000, 0x11),
        (TIB - 3, 3 * 4096, 0x22),
        (7 * 512 * MIB - 1000, 2000, 0x33), // crosses an L1 entry (512 MiB per L2 table)
        (2 * TIB + 12345, 200_000, 0x44),
        (2 * TIB + 65536 * 2, 65536, 0), // zero inside the data above
        (3 * TIB, MIB, 0),               // zero over unallocated
        (size - 70_000, 70_000, 0x55),   // up to the last byte
    ];
    let ops: Vec<String> = writes
        .iter()
        .map(|&(off, len, p)| match p {
            0 => format!("write -z {off} {len}"),
            p => format!("write -P {p:#04x} {off} {len}"),
        })
        .collect();
    env.io("huge.qcow2", &ops);
    // What the guest must see, from the writes alone.
    let model = |pos: u64, len: usize| -> Vec<u8> {
        let mut buf = vec![0u8; len];
        for &(off, wlen, p) in &writes {
            let lo = off.max(pos);
            let hi = (off + wlen).min(pos + len as u64);
            if lo < hi {
                buf[(lo - pos) as usize..(hi - pos) as usize].fill(p);
            }
        }
        buf
    };
    // Regions: around every write, plus random spots.
    let mut regions: Vec<(u64, usize)> = writes
        .iter()
        .map(|&(off, len, _)| {
            let lo = off.saturating_sub(70_000);
            let hi = (off + len + 70_000).min(size);
            (lo, (hi - lo) as usize)
        })
        .collect();
    let mut rng = Rng::new(4);
    for _ in 0..24 {
        let pos = rng.below(size - MIB);
        regions.push((pos, 65536 + 513));
    }
    // QEMU's view: convert to a sparse raw file when the filesystem allows it.
    let raw = if common::supports_sparse_files(env.dir.path(), size) {
        env.img(&["convert", "-O", "raw", "huge.qcow2", "huge.raw"]);
        Some(File::open(env.path("huge.raw")).expect("huge.raw"))
    } else {
        eprintln!(
            "NOTE: {} does not support sparse files; comparing the 4 TiB image with a \
             model of its writes, checked by qemu-io read -P",
            env.dir.path().display()
        );
        let checks: Vec<String> = writes
            .iter()
            .map(|&(off, len, p)| format!("read -P {p:#04x} {off} {len}"))
            .collect();
        env.io("huge.qcow2", &checks);
        None
    };
    env.cases += 1;
    let image = Qcow2::open_path(env.path("huge.qcow2")).expect("open 4 TiB image");
    let reader = image.reader().expect("reader");
    assert_eq!(reader.guest_size(), size);
    for (pos, len) in regions {
        let want = model(pos, len);
        if let Some(raw) = &raw {
            let mut theirs = vec![0u8; len];
            raw.read_exact_at(pos, &mut theirs).expect("read huge.raw");
            if let Some(d) = describe_difference("qemu vs write model", pos, &theirs, &want) {
                panic!("test setup: {d}");
            }
        }
        // Whole region at once, then in odd chunks.
        for chunk in [len, 4095, 65536 + 513] {
            let mut ours = vec![0u8; len];
            let mut done = 0;
            while done < len {
                let n = chunk.min(len - done);
                if let Err(e) = reader.read_exact_at(pos + (done as u64), &mut ours[done..done + n])
                {
                    env.fail(format!("4 TiB: read at {} failed: {e}", pos + done as u64));
                    break;
                }
                done += n;
            }
            let label = format!("4 TiB image region {pos}+{len} (chunk {chunk})");
            if let Some(d) = describe_difference(&label, pos, &ours, &want) {
                env.fail(d);
                break;
            }
        }
    }
    let mut buf = [0u8; 100];
    assert_eq!(reader.read_at(size, &mut buf).expect("read at end"), 0);
    assert_eq!(
        reader
            .read_at(size - 10, &mut buf)
            .expect("read across end"),
        10
    );
    assert_eq!(buf[..10], [0x55; 10]);
    drop(reader);
    env.compare_info("4 TiB", "huge.qcow2", &image, true);
    env.finish("huge_sparse_4tib");
}

#[test]
fn compressed_zlib_and_zstd() {
    let Some(mut env) = Env::new("compressed") else {
        return;
    };
    for c in [4 * KIB, 64 * KIB, 2 * MIB] {
        // 2 MiB clusters: fewer of them, to keep the run short.
        let clusters = if c == 2 * MIB { 6 } else { 12 };
        let size = clusters * c + 1536;
        let src = format!("src-{c}.raw");
        std::fs::write(env.path(&src), mixed_source(c, size, c)).expect("write source");
        for ct in ["zlib", "zstd"] {
            let name = format!("{ct}-{c}.qcow2");
            let opts = format!("cluster_size={c},compression_type={ct}");
            env.compress(&src, &name, &opts);
            assert!(
                env.map_count(&name, "compressed") > 0,
                "test setup: {name} has no compressed cluster"
            );
            env.verify(&format!("{ct} convert -c, cluster {c}"), &name);
            // Now mix: COW of compressed clusters, full overwrites, zero, discard,
            // qemu-io compressed writes, a write across clusters.
            let mixed = format!("{ct}-{c}-mixed.qcow2");
            env.copy(&name, &mixed);
            env.io(
                &mixed,
                &[
                    format!("write -P 0xb1 {} 200", c + 100),
                    format!("write -P 0xb2 0 {c}"),
                    format!("write -z {} {c}", 3 * c),
                    format!("discard {} {c}", 4 * c),
                    format!("write -c -P 0xb3 {} {c}", 2 * c),
                    format!("write -z {} 50", 5 * c + 10),
                    format!("write -P 0xb4 {} 1000", clusters * c - 500),
                ],
            );
            if clusters > 8 {
                // Compressed writes need an unallocated cluster: 8 is a zero one.
                // And a partial write into compressed text cluster 6 (COW).
                env.io(
                    &mixed,
                    &[
                        format!("write -c -s pat.bin {} {c}", 8 * c),
                        format!("write -P 0xb5 {} 100", 6 * c + 300),
                    ],
                );
            }
            assert!(
                env.map_count(&mixed, "compressed") > 0 && env.map_count(&mixed, "zero") > 0,
                "test setup: {mixed} lacks compressed or zero clusters"
            );
            env.verify(
                &format!("{ct} mixed compressed/normal/zero, cluster {c}"),
                &mixed,
            );
        }
    }
    env.finish("compressed_zlib_and_zstd");
}

#[test]
fn extended_l2_subclusters() {
    let Some(mut env) = Env::new("extl2") else {
        return;
    };
    for c in [16 * KIB, 64 * KIB, 2 * MIB] {
        let sc = c / 32;
        let size = 4 * c + 3 * sc + 512;
        let ops = vec![
            format!("write -P 0xc1 {} 300", 3 * sc + 100),
            format!("write -P 0xc2 {} {}", 5 * sc - 50, sc + 100),
            format!("write -z {} {}", 8 * sc, 2 * sc),
            format!("write -z {} 1000", 12 * sc + 100),
            format!("write -P 0xc4 {} {sc}", c - sc / 2),
            format!("write -s pat.bin {c} {c}"),
            format!("discard {} {}", c + 4 * sc, 2 * sc),
            format!("write -z {} {c}", 2 * c),
            format!("write -z {} {sc}", 3 * c + sc),
            format!("write -P 0xc3 {} 10", 3 * c + 4 * sc + 1),
            format!("write -P 0xc5 {} 700", size - 700),
        ];
        let name = format!("extl2-{c}.qcow2");
        env.create(&name, size, &format!("extended_l2=on,cluster_size={c}"));
        env.io(&name, &ops);
        env.verify(&format!("extended L2, cluster {c}"), &name);

        // Over a fully written backing file: unallocated subclusters show its data.
        let base = format!("extl2-base-{c}.qcow2");
        env.create(&base, size, "cluster_size=65536");
        env.io(&base, &[format!("write -s pat.bin 0 {size}")]);
        let top = format!("extl2-top-{c}.qcow2");
        env.create_over(
            &top,
            size,
            &format!("extended_l2=on,cluster_size={c}"),
            &base,
            "qcow2",
        );
        env.io(&top, &ops);
        env.verify(&format!("extended L2 over backing, cluster {c}"), &top);
    }
    env.finish("extended_l2_subclusters");
}

#[test]
fn external_data_files() {
    let Some(mut env) = Env::new("datafile") else {
        return;
    };
    let size = 4 * MIB;
    for raw in [false, true] {
        let name = format!("ext-{raw}.qcow2");
        let data = format!("ext-{raw}.data");
        env.create(
            &name,
            size,
            &format!(
                "cluster_size=65536,data_file={data},data_file_raw={}",
                if raw { "on" } else { "off" }
            ),
        );
        env.io(&name, &mixed_ops(64 * KIB, size));
        let label = format!("external data file, data_file_raw={raw}");
        env.verify(&label, &name);

        // The same by hand: open + set_data_file.
        let expected = env.convert(&name, &[]);
        let file = File::open(env.path(&name)).expect("image");
        let mut image = Qcow2::open(file).expect("open");
        assert!(
            matches!(image.reader(), Err(Error::DataFileMissing { .. })),
            "{label}: reader() without the data file must fail with DataFileMissing"
        );
        image
            .set_data_file(File::open(env.path(&data)).expect("data file"))
            .expect("image has the data-file bit");
        env.cases += 1;
        env.compare_image(&format!("{label} (set_data_file)"), &image, &expected);
        env.compare_info(&format!("{label} (set_data_file)"), &name, &image, false);
    }
    env.finish("external_data_files");
}

#[test]
fn preallocation_and_refcount_widths() {
    let Some(mut env) = Env::new("prealloc") else {
        return;
    };
    for c in [4 * KIB, 64 * KIB] {
        let size = 2 * MIB + 1536;
        for mode in ["metadata", "falloc", "full"] {
            let name = format!("prealloc-{mode}-{c}.qcow2");
            env.create(
                &name,
                size,
                &format!("cluster_size={c},preallocation={mode}"),
            );
            env.io(&name, &mixed_ops(c, size));
            env.verify(&format!("preallocation={mode}, cluster {c}"), &name);
        }
    }
    for bits in [1, 2, 8, 16, 64] {
        let name = format!("refcount{bits}.qcow2");
        let size = MIB + 512;
        env.create(
            &name,
            size,
            &format!("cluster_size=4096,refcount_bits={bits}"),
        );
        env.io(&name, &mixed_ops(4 * KIB, size));
        env.verify(&format!("refcount_bits={bits}"), &name);
    }
    env.finish("preallocation_and_refcount_widths");
}

#[test]
fn backing_chains() {
    let Some(mut env) = Env::new("chains") else {
        return;
    };
    // qcow2 over qcow2 over qcow2; the top is larger than the images below it.
    env.create("base.qcow2", 4 * MIB, "cluster_size=16384");
    env.io(
        "base.qcow2",
        &[
            format!("write -s pat.bin 0 {}", 4 * MIB),
            "write -P 0x10 100000 5000".to_owned(),
        ],
    );
    env.create_over(
        "mid.qcow2",
        4 * MIB,
        "cluster_size=4096",
        "base.qcow2",
        "qcow2",
    );
    env.io(
        "mid.qcow2",
        &[
            "write -P 0x20 1000 3000".to_owned(), // partial-cluster COW from base
            "write -P 0x21 70000 9000".to_owned(), // crosses clusters
            "write -z 131072 16384".to_owned(),   // zero clusters hide base data
            "write -z 200000 100".to_owned(),     // unaligned zero: COW from base
            "discard 262144 8192".to_owned(),     // discard over backing data
            format!("write -P 0x22 {} 4096", 4 * MIB - 4096),
        ],
    );
    env.create_over(
        "top.qcow2",
        8 * MIB,
        "cluster_size=8192",
        "mid.qcow2",
        "qcow2",
    );
    env.io(
        "top.qcow2",
        &[
            "write -P 0x30 3000 2000".to_owned(),
            "write -z 65536 16384".to_owned(),
            "discard 294912 8192".to_owned(),
            format!("write -P 0x31 {} 10000", 4 * MIB - 5000), // across the backing's end
            format!("write -P 0x32 {} 8192", 6 * MIB),
            format!("write -P 0x33 {} 100", 8 * MIB - 100),
        ],
    );
    env.verify("base of the qcow2 chain", "base.qcow2");
    env.verify("qcow2 over qcow2", "mid.qcow2");
    env.verify(
        "qcow2 over qcow2 over qcow2 (top 8 MiB over 4 MiB)",
        "top.qcow2",
    );

    // A v2 overlay (no zero flag: zero writes and discards over backing data store zeros),
    // and an overlay naming its backing file by absolute path.
    env.create_over(
        "v2-top.qcow2",
        4 * MIB,
        "compat=0.10,cluster_size=4096",
        "mid.qcow2",
        "qcow2",
    );
    env.io(
        "v2-top.qcow2",
        &[
            "write -P 0x34 5000 3000".to_owned(),
            "write -z 0 4096".to_owned(),
            "write -z 8192 100".to_owned(),
            "discard 16384 8192".to_owned(),
        ],
    );
    env.verify("v2 overlay over a qcow2 chain", "v2-top.qcow2");
    let abs = env.path("mid.qcow2").display().to_string();
    env.create_over("abs-top.qcow2", 4 * MIB, "", &abs, "qcow2");
    env.io("abs-top.qcow2", &["write -P 0x35 65536 512".to_owned()]);
    env.verify(
        "overlay with an absolute backing file name",
        "abs-top.qcow2",
    );

    // The same chain attached by hand.
    {
        let expected = env.convert("top.qcow2", &[]);
        let open = |n: &str| Qcow2::open(File::open(env.path(n)).expect("open file")).expect(n);
        let base = open("base.qcow2");
        let mut mid = open("mid.qcow2");
        mid.set_backing_image(base);
        let mut top = open("top.qcow2");
        top.set_backing_image(mid);
        env.cases += 1;
        env.compare_image("qcow2 chain via set_backing_image", &top, &expected);
    }

    // qcow2 over qcow2 over raw; the raw file's size is not a multiple of 512.
    let raw_size = 3 * MIB + 1000;
    let mut raw = vec![0u8; raw_size as usize];
    Rng::new(7).fill(&mut raw);
    raw[MIB as usize..2 * MIB as usize].fill(0);
    std::fs::write(env.path("base.raw"), &raw).expect("base.raw");
    env.create_over(
        "rmid.qcow2",
        4 * MIB,
        "cluster_size=65536",
        "base.raw",
        "raw",
    );
    env.io(
        "rmid.qcow2",
        &[
            "write -P 0x40 500 1000".to_owned(),
            "write -z 131072 65536".to_owned(),
            format!("write -P 0x41 {} 2000", raw_size - 1000), // across the raw file's end
        ],
    );
    env.create_over(
        "rtop.qcow2",
        5 * MIB,
        "cluster_size=4096",
        "rmid.qcow2",
        "qcow2",
    );
    env.io(
        "rtop.qcow2",
        &[
            "write -P 0x50 70000 100".to_owned(),
            "discard 200704 4096".to_owned(),
            format!("write -P 0x51 {} 4096", 4 * MIB + 512),
        ],
    );
    env.verify("qcow2 over raw", "rmid.qcow2");
    env.verify("qcow2 over qcow2 over raw", "rtop.qcow2");
    {
        let expected = env.convert("rtop.qcow2", &[]);
        let open = |n: &str| Qcow2::open(File::open(env.path(n)).expect("open file")).expect(n);
        let mut mid = open("rmid.qcow2");
        mid.set_backing_raw(File::open(env.path("base.raw")).expect("raw"), raw_size);
        let mut top = open("rtop.qcow2");
        top.set_backing_image(mid);
        env.cases += 1;
        env.compare_image("raw chain via set_backing_raw", &top, &expected);
    }

    // A middle image smaller than its base: what lies past the middle's end reads as zeros
    // in the top, even where the base has data.
    env.create("big-base.qcow2", 6 * MIB, "");
    env.io("big-base.qcow2", &[format!("write -P 0x60 0 {}", 6 * MIB)]);
    env.create_over("small-mid.qcow2", 2 * MIB, "", "big-base.qcow2", "qcow2");
    env.io("small-mid.qcow2", &["write -P 0x61 4096 4096".to_owned()]);
    env.create_over("wide-top.qcow2", 8 * MIB, "", "small-mid.qcow2", "qcow2");
    env.io(
        "wide-top.qcow2",
        &[format!("write -P 0x62 {} 4096", 3 * MIB)],
    );
    env.verify("middle smaller than its base", "wide-top.qcow2");

    // qemu-img rebase: safe (copies the difference) and unsafe (-u, changes content), and
    // rebasing onto nothing (flattens).
    env.copy("top.qcow2", "rebased.qcow2");
    env.img(&[
        "rebase",
        "-q",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "rebased.qcow2",
    ]);
    env.verify("safe rebase of the top onto the base", "rebased.qcow2");
    env.copy("top.qcow2", "unsafe.qcow2");
    env.img(&[
        "rebase",
        "-u",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "unsafe.qcow2",
    ]);
    env.verify("unsafe rebase of the top onto the base", "unsafe.qcow2");
    env.copy("top.qcow2", "flat.qcow2");
    env.img(&["rebase", "-q", "-b", "", "flat.qcow2"]);
    env.verify("rebase onto no backing file", "flat.qcow2");

    // An overlay grown with qemu-img resize past everything below it.
    env.copy("mid.qcow2", "grown.qcow2");
    env.img(&["resize", "-q", "grown.qcow2", "6M"]);
    env.io(
        "grown.qcow2",
        &[format!("write -P 0x70 {} 8192", 4 * MIB - 4096)],
    );
    env.verify("overlay resized past its backing", "grown.qcow2");
    env.finish("backing_chains");
}

/// Compare every snapshot of `name` (by name and by id) with QEMU: against the image
/// reverted to the snapshot (`qemu-img snapshot -a` on a copy), and against
/// `qemu-img convert -l snapshot.name=NAME`, which is sized like the active image.
fn verify_snapshots(env: &mut Env, label: &str, name: &str) {
    let image = match Qcow2::open_path(env.path(name)) {
        Ok(image) => image,
        Err(e) => return env.fail(format!("{label}: open_path({name}): {e}")),
    };
    let snaps = image.snapshots().to_vec();
    assert!(!snaps.is_empty(), "{label}: no snapshots found");
    env.compare_info(label, name, &image, true);
    for s in &snaps {
        env.cases += 1;
        let what = format!("{label} snapshot {:?} (id {})", s.name, s.id);
        // Reference 1: the image reverted to the snapshot.
        let copy = format!("revert-{}-{name}", s.id);
        env.copy(name, &copy);
        env.img(&["snapshot", "-a", &s.name, &copy]);
        let reverted = env.convert(&copy, &[]);
        let _ = std::fs::remove_file(env.path(&copy));
        // Reference 2: convert -l, by name and by id.
        let by_name = env.convert(name, &["-l", &format!("snapshot.name={}", s.name)]);
        let by_id = env.convert(name, &["-l", &format!("snapshot.id={}", s.id)]);
        assert_eq!(
            by_name, by_id,
            "{what}: qemu itself differs by name and by id"
        );
        for key in [s.name.as_str(), s.id.as_str()] {
            let result = catch_unwind(AssertUnwindSafe(|| match image.snapshot_reader(key) {
                Ok(r) => {
                    let mut f = compare_reader(
                        &format!("{what} via snapshot_reader({key:?}) vs reverted copy"),
                        &r,
                        &reverted,
                        image.cluster_size(),
                    );
                    // convert -l: our bytes are qemu's first disk_size bytes; the rest of
                    // qemu's output (image grown since) is zeros.
                    let mut ours = vec![0u8; r.guest_size() as usize];
                    match read_full(&r, 0, &mut ours) {
                        Ok(n) if n == ours.len() => {
                            let common = ours.len().min(by_name.len());
                            let lbl = format!("{what} via snapshot_reader({key:?}) vs convert -l");
                            f.extend(describe_difference(
                                &lbl,
                                0,
                                &ours[..common],
                                &by_name[..common],
                            ));
                            if !is_all_zero(&by_name[common..]) {
                                f.push(format!("{lbl}: qemu's bytes past disk_size not zero"));
                            }
                        }
                        other => f.push(format!("{what}: full read gave {other:?}")),
                    }
                    f
                }
                Err(e) => vec![format!("{what}: snapshot_reader({key:?}): {e}")],
            }));
            match result {
                Ok(f) => f.into_iter().for_each(|m| env.fail(m)),
                Err(_) => env.fail(format!("{what}: snapshot_reader({key:?}) panicked")),
            }
        }
    }
    match image.snapshot_reader("no-such-snapshot") {
        Err(Error::NoSuchSnapshot(_)) => {}
        Err(e) => env.fail(format!(
            "{label}: unknown snapshot gave {e}, not NoSuchSnapshot"
        )),
        Ok(_) => env.fail(format!("{label}: unknown snapshot opened")),
    }
}

#[test]
fn internal_snapshots() {
    let Some(mut env) = Env::new("snapshots") else {
        return;
    };
    let snap = |env: &Env, name: &str, tag: &str| env.img(&["snapshot", "-c", tag, name]);

    // v3: snapshots between writes, zeroes and discards, then grow, then shrink.
    let img = "snap.qcow2";
    env.create(img, 2 * MIB, "cluster_size=4096");
    env.io(img, &mixed_ops(4 * KIB, 2 * MIB));
    snap(&env, img, "s1");
    env.io(
        img,
        &[
            "write -P 0xd1 0 10000".to_owned(),
            "write -z 20480 8192".to_owned(),
            "discard 36864 4096".to_owned(),
            "write -s pat.bin 100000 50000".to_owned(),
        ],
    );
    snap(&env, img, "before resize");
    snap(&env, img, "temporary");
    env.img(&["snapshot", "-d", "temporary", img]);
    env.img(&["resize", "-q", img, "3M"]);
    env.io(
        img,
        &[
            format!("write -P 0xd2 {} 8192", 2 * MIB - 4096),
            "write -P 0xd3 0 512".to_owned(),
        ],
    );
    snap(&env, img, "s3-3M");
    env.io(img, &["write -z 0 65536".to_owned()]);
    env.verify("active image after snapshots and grow", img);
    verify_snapshots(&mut env, "v3 grown", img);
    match Qcow2::open_path(env.path(img)).map(|i| i.snapshot_reader("temporary").is_err()) {
        Ok(true) => {}
        Ok(false) => env.fail("deleted snapshot \"temporary\" is still readable".to_owned()),
        Err(e) => env.fail(format!("open_path after deleting a snapshot: {e}")),
    }
    // Shrink below the earlier snapshots' disk sizes.
    env.img(&["resize", "-q", "--shrink", img, "1M"]);
    env.verify("active image after shrink", img);
    verify_snapshots(&mut env, "v3 shrunk", img);

    // v2: no disk size recorded in the snapshot table.
    let v2 = "snap-v2.qcow2";
    env.create(v2, MIB, "compat=0.10,cluster_size=4096");
    env.io(v2, &["write -P 0xe1 0 100000".to_owned()]);
    snap(&env, v2, "one");
    env.io(
        v2,
        &[
            "write -P 0xe2 5000 5000".to_owned(),
            "write -z 65536 4096".to_owned(),
        ],
    );
    snap(&env, v2, "two");
    env.io(v2, &["discard 0 8192".to_owned()]);
    env.verify("v2 active image", v2);
    verify_snapshots(&mut env, "v2", v2);

    // Compressed clusters kept by a snapshot, then overwritten in the active image.
    std::fs::write(
        env.path("csrc.raw"),
        mixed_source(64 * KIB, 12 * 64 * KIB, 9),
    )
    .expect("source");
    env.compress("csrc.raw", "csnap.qcow2", "");
    snap(&env, "csnap.qcow2", "compressed");
    env.io(
        "csnap.qcow2",
        &[
            "write -P 0xf1 100 1000".to_owned(),
            "write -z 131072 65536".to_owned(),
        ],
    );
    env.verify("compressed image with snapshot", "csnap.qcow2");
    verify_snapshots(&mut env, "compressed", "csnap.qcow2");
    env.finish("internal_snapshots");
}

#[test]
fn info_flags_bitmaps_and_refusals() {
    let Some(mut env) = Env::new("info") else {
        return;
    };
    // lazy_refcounts, then a crash: the dirty bit stays set.
    env.create("lazy.qcow2", MIB, "cluster_size=4096,lazy_refcounts=on");
    env.io("lazy.qcow2", &["write -P 0x11 0 8192".to_owned()]);
    env.verify("lazy_refcounts, clean", "lazy.qcow2");
    env.copy("lazy.qcow2", "dirty.qcow2");
    env.qemu.io_crash(
        env.dir.path(),
        "qcow2",
        "dirty.qcow2",
        &["write -P 0x12 4096 8192"],
    );
    env.verify("lazy_refcounts, dirty after a crash", "dirty.qcow2");

    // Bitmaps: enabled, disabled, several granularities; then in use after a crash.
    env.create("bitmaps.qcow2", 4 * MIB, "");
    env.img(&["bitmap", "--add", "-g", "65536", "bitmaps.qcow2", "b0"]);
    env.img(&[
        "bitmap",
        "--add",
        "-g",
        "4096",
        "bitmaps.qcow2",
        "b-disabled",
    ]);
    env.img(&["bitmap", "--disable", "bitmaps.qcow2", "b-disabled"]);
    env.img(&["bitmap", "--add", "-g", "1048576", "bitmaps.qcow2", "big"]);
    env.io("bitmaps.qcow2", &["write -P 0x22 0 200000".to_owned()]);
    env.verify("persistent bitmaps", "bitmaps.qcow2");
    env.copy("bitmaps.qcow2", "inuse.qcow2");
    env.qemu.io_crash(
        env.dir.path(),
        "qcow2",
        "inuse.qcow2",
        &["write -P 0x23 0 4096"],
    );
    env.verify("bitmaps in use after a crash", "inuse.qcow2");

    // Corrupt bit: QEMU still reads it read-only and says so; this crate refuses it.
    env.create("corrupt.qcow2", MIB, "");
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(env.path("corrupt.qcow2"))
            .expect("corrupt.qcow2");
        let mut b = [0u8; 1];
        f.seek(SeekFrom::Start(79)).unwrap();
        f.read_exact(&mut b).unwrap();
        b[0] |= 2; // incompatible_features bit 1
        f.seek(SeekFrom::Start(79)).unwrap();
        f.write_all(&b).unwrap();
    }
    let json = env.qemu.info_json(env.dir.path(), "corrupt.qcow2", false);
    assert_eq!(
        json["format-specific"]["data"]["corrupt"],
        Value::Bool(true)
    );
    match Qcow2::open_path(env.path("corrupt.qcow2")) {
        Err(Error::Corrupt) => {}
        Err(e) => env.fail(format!("corrupt image: error {e}, not Error::Corrupt")),
        Ok(_) => env.fail("corrupt image opened".to_owned()),
    }
    env.finish("info_flags_bitmaps_and_refusals");
}

/// The comparison itself must catch a single wrong byte and name its offset (no QEMU needed:
/// a committed fixture read by the crate is the reference, with one byte flipped).
#[test]
fn harness_reports_first_difference() {
    let path = common::fixture("v3-64k-basic.qcow2");
    let image = Qcow2::open_path(&path).expect("fixture");
    let reader = image.reader().expect("reader");
    let mut expected = vec![0u8; reader.guest_size() as usize];
    read_full(&reader, 0, &mut expected).expect("read fixture");
    assert!(compare_reader("self", &reader, &expected, image.cluster_size()).is_empty());
    let flip = 3 * 65536 + 4097;
    expected[flip] ^= 0x40;
    let failures = compare_reader("self", &reader, &expected, image.cluster_size());
    assert!(!failures.is_empty(), "a flipped byte went unnoticed");
    let needle = format!("first difference at guest offset {flip} ");
    assert!(
        failures
            .iter()
            .all(|f| f.contains(&needle) || f.contains("read_at")),
        "failures do not name offset {flip}: {failures:#?}"
    );
    expected.pop();
    let failures = compare_reader("self", &reader, &expected, image.cluster_size());
    assert!(failures.iter().any(|f| f.contains("guest size")));
}
