//! Deterministic mutation testing: thousands of damaged copies of the small committed fixtures
//! are opened with tight limits and read across the guest (the same harness as the fuzz
//! targets, `fuzz/harness.rs`). No case may panic, and none may make the reader allocate more
//! than [`PEAK_BOUND`] bytes at once. Also replays every input in `fuzz/regressions/`.
//!
//! Reproduce one case: `QCOW2_MUTATION_SEED=<seed> QCOW2_MUTATION_CASE=<iteration>
//! cargo test --test memory -- --nocapture mutation::` (the failure message prints both; the damaged
//! image is also written to the temp dir). `QCOW2_MUTATION_ITERS` and `QCOW2_MUTATION_SECS`
//! raise or lower the bounds (defaults: 20000 cases or 20 s, whichever comes first).
//! `QCOW2_REPLAY_DIR=fuzz/corpus/open_read cargo test --test memory mutation::fuzz_regressions` replays
//! a fuzz corpus through the harnesses (reading, and writing) under the same panic and memory
//! checks. A quarter of the mutated cases go through the writer (`open_and_write`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "../../fuzz/harness.rs"]
mod harness;

use harness::XorShift;

use crate::alloc_count::peak_during;

/// Most memory one open + read of a damaged image may take with the tight limits.
const PEAK_BOUND: usize = 64 << 20;

// ---------------------------------------------------------------------------------------------
// Inputs.

/// Fixtures small enough to copy thousands of times; they cover v2/v3, 512 B to 64 KiB
/// clusters, compression (zlib, zstd), extended L2, snapshots, bitmaps, backing and data-file
/// names, refcount widths, the dirty and corrupt bits and encryption.
const FIXTURES: &[&str] = &[
    "v3-512-l2cross.qcow2",
    "zlib-4k-mixed.qcow2",
    "zstd-4k-mixed.qcow2",
    "extl2-16k.qcow2",
    "snap.qcow2",
    "snap-resized.qcow2",
    "bitmaps.qcow2",
    "chain-top.qcow2",
    "chain-mid.qcow2",
    "overlay-raw.qcow2",
    "overlay-nofmt.qcow2",
    "extdata.qcow2",
    "extdata-raw.qcow2",
    "refcount1.qcow2",
    "refcount64.qcow2",
    "v3-dirty.qcow2",
    "v3-corrupt.qcow2",
    "aes.qcow2",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// What the mutator knows of a fixture: where its metadata lies.
struct Target {
    name: &'static str,
    bytes: Vec<u8>,
    cluster: u64,
    /// File offsets of L1 entries (active and snapshot L1 tables).
    l1_entries: Vec<u64>,
    /// File offsets of L2 entries.
    l2_entries: Vec<u64>,
    /// Start of the snapshot table and of the header extensions.
    snapshots_offset: u64,
    extensions_offset: u64,
}

fn be32(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_be_bytes(s.try_into().unwrap()).into())
}

fn be64(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    b.get(at..at + 8)
        .map_or(0, |s| u64::from_be_bytes(s.try_into().unwrap()))
}

const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

impl Target {
    fn load(name: &'static str) -> Target {
        let bytes = std::fs::read(root().join("fixtures").join(name))
            .unwrap_or_else(|e| panic!("reading fixture {name}: {e}"));
        let cluster_bits = be32(&bytes, 20);
        let cluster = 1u64 << cluster_bits;
        let version = be32(&bytes, 4);
        let extensions_offset = if version >= 3 { be32(&bytes, 100) } else { 72 };
        let snapshots_offset = be64(&bytes, 64);
        // The active L1 table, then the snapshots' L1 tables (fixed part of each entry:
        // l1_table_offset at +0, l1_size at +8, id/name lengths at +12/+14, extra size at +36).
        let mut l1_tables = vec![(be64(&bytes, 40), be32(&bytes, 36))];
        let mut at = snapshots_offset;
        for _ in 0..be32(&bytes, 60).min(16) {
            l1_tables.push((be64(&bytes, at), be32(&bytes, at + 8)));
            let id_len = be32(&bytes, at + 12) >> 16;
            let name_len = be32(&bytes, at + 12) & 0xffff;
            let extra = be32(&bytes, at + 36);
            at = (at + 40 + extra + id_len + name_len).next_multiple_of(8);
        }
        let entry_len = if be64(&bytes, 72) & 16 != 0 { 16 } else { 8 };
        let l2_len = cluster / entry_len;
        let mut l1_entries = Vec::new();
        let mut l2_entries = Vec::new();
        for (offset, size) in l1_tables {
            for i in 0..u64::from(size as u32).min(4096) {
                let pos = offset + 8 * i;
                if pos + 8 > bytes.len() as u64 {
                    break;
                }
                l1_entries.push(pos);
                let l2 = be64(&bytes, pos) & L2_OFFSET_MASK;
                if l2 != 0 && l2 + cluster <= bytes.len() as u64 {
                    l2_entries.extend((0..l2_len).map(|j| l2 + j * entry_len));
                }
            }
        }
        l2_entries.sort_unstable();
        l2_entries.dedup();
        Target {
            name,
            bytes,
            cluster,
            l1_entries,
            l2_entries,
            snapshots_offset,
            extensions_offset,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Mutations.

/// Header fields of a v3 header: (offset, width in bytes).
const HEADER_FIELDS: &[(u64, u8)] = &[
    (0, 4),   // magic
    (4, 4),   // version
    (8, 8),   // backing_file_offset
    (16, 4),  // backing_file_size
    (20, 4),  // cluster_bits
    (24, 8),  // size
    (32, 4),  // crypt_method
    (36, 4),  // l1_size
    (40, 8),  // l1_table_offset
    (48, 8),  // refcount_table_offset
    (56, 4),  // refcount_table_clusters
    (60, 4),  // nb_snapshots
    (64, 8),  // snapshots_offset
    (72, 8),  // incompatible_features
    (80, 8),  // compatible_features
    (88, 8),  // autoclear_features
    (96, 4),  // refcount_order
    (100, 4), // header_length
    (104, 1), // compression_type
    (104, 8), // compression_type + padding
];

fn interesting(rng: &mut XorShift, t: &Target, len: u64) -> u64 {
    const FIXED: &[u64] = &[
        0,
        1,
        2,
        7,
        8,
        9,
        63,
        64,
        0x7f,
        0x80,
        0xff,
        0x100,
        0x1ff,
        0x200,
        0x1000,
        0xffff,
        0x1_0000,
        0x20_0000,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_ffff,
        0x1_0000_0000,
        0x7fff_ffff_ffff_ffff,
        0x8000_0000_0000_0000,
        0xffff_ffff_ffff_ffff,
        0xffff_ffff_ffff_fffe,
        1 << 62,
        (1 << 63) | (1 << 62),
        0x00ff_ffff_ffff_fe00,
    ];
    match rng.below(6) {
        0..=2 => FIXED[rng.below(FIXED.len() as u64) as usize],
        3 => len.wrapping_add(rng.below(3)).wrapping_sub(1),
        4 => {
            // A cluster-aligned offset in or just past the file, maybe with flag bits.
            let c = rng.below(len / t.cluster + 2) * t.cluster;
            c | [0, 1 << 63, 1 << 62, 1][rng.below(4) as usize]
        }
        _ => rng.next_u64() >> rng.below(64),
    }
}

fn put(bytes: &mut [u8], at: u64, width: u8, value: u64) {
    let Ok(at) = usize::try_from(at) else { return };
    let be = value.to_be_bytes();
    let src = &be[8 - width as usize..];
    if let Some(dst) = bytes.get_mut(at..at + width as usize) {
        dst.copy_from_slice(src);
    }
}

/// A position in the file, mostly in metadata (first cluster, tables).
fn metadata_position(rng: &mut XorShift, t: &Target, len: u64) -> u64 {
    let pick = |rng: &mut XorShift, v: &[u64]| v[rng.below(v.len() as u64) as usize];
    match rng.below(6) {
        0 => rng.below(112.min(len)),
        1 => rng.below(t.cluster.min(len)),
        2 if !t.l1_entries.is_empty() => pick(rng, &t.l1_entries) + rng.below(8),
        3 if !t.l2_entries.is_empty() => pick(rng, &t.l2_entries) + rng.below(8),
        4 => t.snapshots_offset.wrapping_add(rng.below(128)),
        _ => rng.below(len),
    }
}

/// Apply 1 to 4 random mutations; returns what was done, for the failure message.
fn mutate(rng: &mut XorShift, t: &Target, bytes: &mut Vec<u8>) -> Vec<String> {
    let mut done = Vec::new();
    for _ in 0..=rng.below(4) {
        let len = bytes.len() as u64;
        if len == 0 {
            break;
        }
        match rng.below(10) {
            0 => {
                let at = metadata_position(rng, t, len);
                let bit = rng.below(8);
                if let Some(b) = bytes.get_mut(at as usize) {
                    *b ^= 1 << bit;
                }
                done.push(format!("flip bit {bit} at {at:#x}"));
            }
            1 => {
                let at = metadata_position(rng, t, len);
                let v = [0x00, 0xff, 0x80, 0x01, 0x7f][rng.below(5) as usize];
                if let Some(b) = bytes.get_mut(at as usize) {
                    *b = v;
                }
                done.push(format!("set byte at {at:#x} to {v:#x}"));
            }
            2 | 3 => {
                let (at, width) = HEADER_FIELDS[rng.below(HEADER_FIELDS.len() as u64) as usize];
                let v = interesting(rng, t, len);
                put(bytes, at, width, v);
                done.push(format!("header u{} at {at} = {v:#x}", width * 8));
            }
            4 if !t.l1_entries.is_empty() => {
                let at = t.l1_entries[rng.below(t.l1_entries.len() as u64) as usize];
                let v = interesting(rng, t, len);
                put(bytes, at, 8, v);
                done.push(format!("L1 entry at {at:#x} = {v:#x}"));
            }
            5 | 6 if !t.l2_entries.is_empty() => {
                let at = t.l2_entries[rng.below(t.l2_entries.len() as u64) as usize];
                let width = if rng.below(4) == 0 { 4 } else { 8 };
                let at = at + if width == 4 { 4 * rng.below(2) } else { 0 };
                let v = if rng.below(3) == 0 {
                    // Keep the entry's offset, damage only its flags or compressed size bits.
                    be64(bytes, at) ^ (1u64 << rng.below(64))
                } else {
                    interesting(rng, t, len)
                };
                put(bytes, at, width, v);
                done.push(format!("L2 entry at {at:#x} = {v:#x} (u{})", width * 8));
            }
            7 => {
                // Header extensions and the snapshot table: u32/u64 at a random place.
                let base = if rng.below(2) == 0 {
                    t.extensions_offset
                } else {
                    t.snapshots_offset
                };
                let at = base.wrapping_add(rng.below(96) & !3);
                let width = [4u8, 8, 2, 1][rng.below(4) as usize];
                let v = interesting(rng, t, len);
                put(bytes, at, width, v);
                done.push(format!("u{} at {at:#x} = {v:#x}", width * 8));
            }
            8 => {
                let to = match rng.below(3) {
                    0 => rng.below(len),
                    1 => rng.below(len / t.cluster + 1) * t.cluster,
                    _ => rng.below(t.cluster.min(len) + 1),
                };
                bytes.truncate(to as usize);
                done.push(format!("truncate to {to:#x}"));
            }
            _ => {
                let extra = [1, 511, t.cluster, rng.below(3 * t.cluster)][rng.below(4) as usize];
                let fill = [0x00, 0xff][rng.below(2) as usize];
                bytes.resize(bytes.len() + extra as usize, fill);
                done.push(format!("extend by {extra:#x} bytes of {fill:#x}"));
            }
        }
    }
    done
}

// ---------------------------------------------------------------------------------------------
// Running cases.

/// One case: open + read, with panics caught; returns the peak allocation or the panic text.
fn run_case(run: impl FnOnce()) -> Result<usize, String> {
    let (result, peak) = peak_during(|| catch_unwind(AssertUnwindSafe(run)));
    match result {
        Ok(()) => Ok(peak),
        Err(e) => Err(e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "(non-string panic)".to_owned())),
    }
}

fn save_failure(bytes: &[u8], label: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("qcow2-mutation-{label}.qcow2"));
    let _ = std::fs::write(&path, bytes);
    path
}

#[test]
fn mutated_fixtures_never_panic_and_stay_bounded() {
    let seed = env_u64("QCOW2_MUTATION_SEED").unwrap_or(DEFAULT_SEED);
    let only_case = env_u64("QCOW2_MUTATION_CASE");
    let max_iters = env_u64("QCOW2_MUTATION_ITERS").unwrap_or(20_000);
    let max_time = Duration::from_secs(env_u64("QCOW2_MUTATION_SECS").unwrap_or(20));

    let targets: Vec<Target> = FIXTURES.iter().map(|n| Target::load(n)).collect();
    // Unmutated fixtures first: they must stay within the bound too.
    for t in &targets {
        let peak = run_case(|| harness::open_and_read(&t.bytes))
            .unwrap_or_else(|msg| panic!("unmutated fixture {} panicked: {msg}", t.name));
        assert!(
            peak < PEAK_BOUND,
            "unmutated {} peaked at {peak} bytes",
            t.name
        );
    }

    let start = Instant::now();
    let mut ran = 0u64;
    let mut opened = 0u64;
    let mut max_peak = (0usize, String::new());
    let mut failures = Vec::new();
    let cases: Box<dyn Iterator<Item = u64>> = match only_case {
        Some(c) => Box::new(std::iter::once(c)),
        None => Box::new(0..max_iters),
    };
    for case in cases {
        if only_case.is_none() && start.elapsed() > max_time {
            break;
        }
        let mut rng = XorShift::new(seed ^ case.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let t = &targets[rng.below(targets.len() as u64) as usize];
        let mut bytes = t.bytes.clone();
        let what = mutate(&mut rng, t, &mut bytes);
        if qcow2::Qcow2::open_with(&bytes[..], &harness::tight_options()).is_ok() {
            opened += 1;
        }
        let label = format!(
            "seed {seed:#x} case {case} ({}: {})",
            t.name,
            what.join("; ")
        );
        let written = match case % 4 {
            // A quarter of the cases go through the writer instead.
            0 => run_case(|| harness::open_and_write(&bytes)),
            _ => run_case(|| harness::open_and_read(&bytes)),
        };
        match written {
            Ok(peak) => {
                if peak > max_peak.0 {
                    max_peak = (peak, label.clone());
                }
                if peak >= PEAK_BOUND {
                    let saved = save_failure(&bytes, &format!("{seed:x}-{case}"));
                    failures.push(format!(
                        "{label}: peak allocation {peak} bytes >= {PEAK_BOUND} (saved {})",
                        saved.display()
                    ));
                }
            }
            Err(msg) => {
                let saved = save_failure(&bytes, &format!("{seed:x}-{case}"));
                failures.push(format!("{label}: PANIC {msg} (saved {})", saved.display()));
            }
        }
        ran += 1;
    }
    eprintln!(
        "mutation: {ran} cases in {:.1} s (seed {seed:#x}); {opened} opened; {} guest reads \
         returned data, {} returned an error; peak allocation {} KiB in {}",
        start.elapsed().as_secs_f64(),
        harness::READS_OK.load(std::sync::atomic::Ordering::Relaxed),
        harness::READS_ERR.load(std::sync::atomic::Ordering::Relaxed),
        max_peak.0 >> 10,
        max_peak.1
    );
    assert!(
        failures.is_empty(),
        "{} of {ran} mutated images failed (reproduce with QCOW2_MUTATION_SEED and \
         QCOW2_MUTATION_CASE):\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        only_case.is_some() || ran >= 100,
        "only {ran} cases ran: too slow"
    );
}

/// The seed used unless `QCOW2_MUTATION_SEED` says otherwise.
const DEFAULT_SEED: u64 = 0x5eed_0c02;

#[test]
fn fuzz_regressions_never_panic() {
    // QCOW2_REPLAY_DIR replays another directory instead, e.g. a fuzz corpus.
    let dir = std::env::var_os("QCOW2_REPLAY_DIR")
        .map_or_else(|| root().join("fuzz/regressions"), PathBuf::from);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.is_file() && !is_hidden(p));
    files.sort();
    let mut failures = Vec::new();
    let mut max_peak = 0usize;
    for path in &files {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Each input goes through every target's harness: a regression of one target is
        // also just some bytes for the other.
        for (target, run) in [
            ("open_read", harness::open_and_read as fn(&[u8])),
            ("open_with_backing", harness::open_with_backing),
            ("open_write", harness::open_and_write),
        ] {
            match run_case(|| run(&bytes)) {
                Ok(peak) => {
                    max_peak = max_peak.max(peak);
                    if peak >= PEAK_BOUND {
                        failures.push(format!(
                            "{} ({target}): peak allocation {peak} bytes",
                            path.display()
                        ));
                    }
                }
                Err(msg) => failures.push(format!("{} ({target}): PANIC {msg}", path.display())),
            }
        }
    }
    eprintln!(
        "fuzz regressions: {} files from {} ran through the three harnesses; peak allocation {} KiB",
        files.len(),
        dir.display(),
        max_peak >> 10
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}
