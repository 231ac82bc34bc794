//! Reads through backing chains whose layer changes every cluster or every subcluster,
//! compared byte for byte with `qemu-img convert -O raw` of the top image: every read of
//! such a chain is made of runs from several layers, so a read that straddles layers, ends
//! inside one, or starts past a backing file's end must still land every byte where QEMU
//! does.
//!
//! Needs `qemu-img` and `qemu-io` (or `$QEMU_IMG` / `$QEMU_IO`): without them each test
//! prints a loud SKIPPED notice, or fails when `CI=true`.

use crate::common;

use common::{describe_difference, Rng};
use positioned_io::ReadAt;
use qcow2::Qcow2;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// A test's tools and directory (a [`common::Env`], which it derefs to), with one pattern
/// file per layer (prime lengths, so each layer's bytes depend on where in a write they fall
/// and differ from the other layers').
struct Chain {
    env: common::Env,
}

impl std::ops::Deref for Chain {
    type Target = common::Env;
    fn deref(&self) -> &common::Env {
        &self.env
    }
}

impl Chain {
    fn new(test: &str) -> Option<Chain> {
        let env = common::Env::new(test)?;
        for (i, len) in [4093usize, 4091, 4079, 4073].into_iter().enumerate() {
            let mut pattern = vec![0u8; len];
            Rng::new(0xc4a1 + i as u64).fill(&mut pattern);
            std::fs::write(env.path(&format!("pat{i}.bin")), pattern).expect("pattern file");
        }
        Some(Chain { env })
    }

    /// `qemu-img create -f qcow2 [-b BACKING -F FMT] -o OPTS NAME SIZE`.
    fn create(&self, name: &str, size: u64, opts: &str, backing: Option<(&str, &str)>) {
        match backing {
            None => self.env.create(name, size, opts),
            Some((file, format)) => self.env.create_over(name, size, opts, file, format),
        }
    }

    /// `base.qcow2` written whole, `mid.qcow2` over it holding every 64 KiB cluster `i`
    /// with `i % 3 == 1`, `top.qcow2` over that holding those with `i % 3 == 2`, then
    /// `top_extra` run on the top.
    fn three_layers(&self, size: u64, top_extra: &[String]) {
        let unit = 64 * KIB;
        self.create("base.qcow2", size, "cluster_size=65536", None);
        self.io("base.qcow2", &[format!("write -s pat0.bin 0 {size}")]);
        let over = |name: &str, backing: &str, which: u64, pattern: &str, extra: &[String]| {
            self.create(name, size, "cluster_size=65536", Some((backing, "qcow2")));
            let mut cmds = every_third(which, unit, size, pattern);
            cmds.extend_from_slice(extra);
            self.io(name, &cmds);
        };
        over("mid.qcow2", "base.qcow2", 1, "pat1.bin", &[]);
        over("top.qcow2", "mid.qcow2", 2, "pat2.bin", top_extra);
    }

    /// Open `top` with its chain and compare reads of every shape with QEMU's bytes.
    fn verify(&self, label: &str, top: &str, unit: u64) {
        let expected = self.convert(top, &[]);
        let image = Qcow2::open_path(self.dir.join(top))
            .unwrap_or_else(|e| panic!("{label}: open_path({top}): {e}"));
        let reader = image.reader().expect("reader");
        assert_eq!(reader.guest_size(), expected.len() as u64, "{label}: size");
        let failures = compare_all(&reader, &expected, unit);
        assert!(
            failures.is_empty(),
            "{label}: {} failures:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}

/// `qemu-io` writes of `pattern` (a pattern file) over every `unit`-sized piece `i` of
/// `[0, len)` with `i % 3 == which`.
fn every_third(which: u64, unit: u64, len: u64, pattern: &str) -> Vec<String> {
    (which..len / unit)
        .step_by(3)
        .map(|i| format!("write -s {pattern} {} {unit}", i * unit))
        .collect()
}

/// Reads of every shape, each compared with `expected`; the descriptions of the failures.
fn compare_all<R: ReadAt>(reader: &R, expected: &[u8], unit: u64) -> Vec<String> {
    let size = expected.len() as u64;
    let mut reads: Vec<(u64, usize)> = Vec::new();
    // The whole guest at once, then sequential passes whose chunks end anywhere.
    reads.push((0, expected.len()));
    for chunk in [MIB, 65536 + 513, 3 * unit + 7, 4095, 511] {
        reads.extend(
            (0..size)
                .step_by(chunk as usize)
                .map(|p| (p, chunk as usize)),
        );
    }
    // Around every boundary between units: a few bytes either side, and a run of three
    // units (three layers) starting just before it.
    for b in (unit..size).step_by(unit as usize) {
        reads.push((b - 7, 14));
        reads.push((b - 1, 1));
        reads.push((b - 1000.min(unit - 1), (3 * unit) as usize + 2000));
    }
    // Anywhere, of any length up to 200 KiB.
    let mut rng = Rng::new(size ^ unit);
    for _ in 0..300 {
        reads.push((rng.below(size), 1 + rng.below(200 * KIB) as usize));
    }
    // At and across the end.
    reads.extend([
        (size - 1, 1),
        (size - 3000, 9000),
        (size, 10),
        (size + 512, 10),
    ]);

    let mut failures = Vec::new();
    let mut buf = Vec::new();
    for (pos, len) in reads {
        buf.clear();
        buf.resize(len, 0xa5);
        let within = size.saturating_sub(pos).min(len as u64) as usize;
        let what = format!("read of {len} at {pos}");
        match reader.read_at(pos, &mut buf) {
            Ok(n) if n == within => {
                let theirs = expected.get(pos as usize..pos as usize + n).unwrap_or(&[]);
                if let Some(d) = describe_difference(&what, pos, &buf[..n], theirs) {
                    failures.push(d);
                }
            }
            Ok(n) => failures.push(format!("{what}: returned {n}, expected {within}")),
            Err(e) => failures.push(format!("{what}: {e}")),
        }
        if failures.len() >= 10 {
            break;
        }
    }
    failures
}

/// Three qcow2 layers, each holding every third 64 KiB cluster; a fourth, raw, below them all
/// holding the rest.
#[test]
fn three_deep_chain_alternating_per_cluster() {
    let Some(c) = Chain::new("chain_per_cluster") else {
        return;
    };
    let (unit, size) = (64 * KIB, 6 * MIB);
    c.three_layers(size, &[]);
    c.verify("3-deep chain, a layer per cluster", "top.qcow2", unit);

    // Layers with other cluster sizes: the runs of one layer no longer line up with the
    // clusters of the others.
    c.create(
        "mid4k.qcow2",
        size,
        "cluster_size=4096",
        Some(("base.qcow2", "qcow2")),
    );
    c.io("mid4k.qcow2", &every_third(1, 20 * KIB, size, "pat1.bin"));
    c.create(
        "top512.qcow2",
        size,
        "cluster_size=512",
        Some(("mid4k.qcow2", "qcow2")),
    );
    c.io(
        "top512.qcow2",
        &every_third(2, 36 * KIB + 512, size, "pat2.bin"),
    );
    c.verify("3-deep chain, mixed cluster sizes", "top512.qcow2", 4 * KIB);

    // Zero clusters and discarded ones in the top: zeros hide the layers below, a discard
    // of an allocated cluster in a v3 image leaves a zero cluster too.
    c.create(
        "ztop.qcow2",
        size,
        "cluster_size=65536",
        Some(("mid.qcow2", "qcow2")),
    );
    let mut cmds = every_third(2, unit, size, "pat2.bin");
    cmds.extend([
        format!("write -z {} {}", 3 * unit, 2 * unit),
        format!("discard {} {unit}", 8 * unit),
        format!("write -z {} 4096", 10 * unit + 4096),
    ]);
    c.io("ztop.qcow2", &cmds);
    c.verify("3-deep chain with zero clusters on top", "ztop.qcow2", unit);
}

/// Extended L2 entries: 32 subclusters of 2 KiB per cluster, each layer holding every third
/// subcluster (and a few whole clusters), so one cluster reads from three layers.
#[test]
fn three_deep_chain_alternating_per_subcluster() {
    let Some(c) = Chain::new("chain_per_subcluster") else {
        return;
    };
    let (sub, size) = (2 * KIB, MIB);
    let opts = "cluster_size=65536,extended_l2=on";
    c.create("base.qcow2", size, opts, None);
    c.io("base.qcow2", &every_third(0, sub, size, "pat0.bin"));
    c.create("mid.qcow2", size, opts, Some(("base.qcow2", "qcow2")));
    let mut mid = every_third(1, sub, size, "pat1.bin");
    mid.push(format!("write -s pat3.bin {} 65536", 5 * 65536));
    c.io("mid.qcow2", &mid);
    c.create("top.qcow2", size, opts, Some(("mid.qcow2", "qcow2")));
    let mut top = every_third(2, sub, size, "pat2.bin");
    // Zero subclusters, and a zero run across a cluster boundary.
    top.extend([
        format!("write -z {} {sub}", 65536 + 3 * sub),
        format!("write -z {} {}", 2 * 65536 - 2 * sub, 4 * sub),
    ]);
    c.io("top.qcow2", &top);
    c.verify("3-deep chain, a layer per subcluster", "top.qcow2", sub);

    // A standard-L2 overlay over the extended chain: whole clusters over subclusters.
    c.create(
        "std.qcow2",
        size,
        "cluster_size=65536",
        Some(("top.qcow2", "qcow2")),
    );
    c.io("std.qcow2", &every_third(1, 65536, size, "pat3.bin"));
    c.verify("standard overlay over extended layers", "std.qcow2", sub);
}

/// A raw file at the bottom, shorter than the images above it and not a whole number of
/// sectors; a qcow2 base shorter than its overlay.
#[test]
fn chains_over_raw_and_short_backing_files() {
    let Some(c) = Chain::new("chain_raw_short") else {
        return;
    };
    let unit = 64 * KIB;
    let raw_len = 2 * MIB + 3 * unit + 1000;
    let mut raw = vec![0u8; raw_len as usize];
    Rng::new(99).fill(&mut raw);
    std::fs::write(c.dir.join("base.raw"), &raw).expect("base.raw");
    let size = 4 * MIB;
    c.create(
        "rmid.qcow2",
        size,
        "cluster_size=65536",
        Some(("base.raw", "raw")),
    );
    c.io("rmid.qcow2", &every_third(1, unit, size, "pat1.bin"));
    c.create(
        "rtop.qcow2",
        size,
        "cluster_size=65536",
        Some(("rmid.qcow2", "qcow2")),
    );
    let mut top = every_third(2, unit, size, "pat2.bin");
    // Partial clusters across the raw file's end: copied from it, zeros after.
    top.push(format!("write -s pat3.bin {} 3000", raw_len - 1500));
    c.io("rtop.qcow2", &top);
    c.verify("chain over a short raw file", "rtop.qcow2", unit);

    // qcow2 layers that grow upwards: 1 MiB + 512 under 3 MiB under 4 MiB.
    let base_len = MIB + 512;
    c.create("sbase.qcow2", base_len, "cluster_size=65536", None);
    c.io("sbase.qcow2", &[format!("write -s pat0.bin 0 {base_len}")]);
    c.create(
        "smid.qcow2",
        3 * MIB,
        "cluster_size=4096",
        Some(("sbase.qcow2", "qcow2")),
    );
    c.io("smid.qcow2", &every_third(1, 8 * KIB, 3 * MIB, "pat1.bin"));
    c.create(
        "stop.qcow2",
        size,
        "cluster_size=65536",
        Some(("smid.qcow2", "qcow2")),
    );
    c.io("stop.qcow2", &every_third(2, unit, size, "pat2.bin"));
    c.verify("chain over shorter backing images", "stop.qcow2", unit);
}

/// Compressed clusters among plain ones in the middle layer, between layers that change
/// every cluster.
#[cfg(feature = "zlib")]
#[test]
fn chain_with_compressed_clusters_in_one_layer() {
    let Some(c) = Chain::new("chain_compressed") else {
        return;
    };
    let (unit, size) = (64 * KIB, 4 * MIB);
    c.create("base.qcow2", size, "cluster_size=65536", None);
    c.io("base.qcow2", &[format!("write -s pat0.bin 0 {size}")]);
    c.create(
        "mid.qcow2",
        size,
        "cluster_size=65536",
        Some(("base.qcow2", "qcow2")),
    );
    // Every third cluster: compressed (text-like bytes compress) or plain, in turns.
    let mid: Vec<String> = (1..size / unit)
        .step_by(3)
        .map(|i| match i % 2 {
            0 => format!("write -c -P {} {} {unit}", 0x40 + i % 64, i * unit),
            _ => format!("write -s pat1.bin {} {unit}", i * unit),
        })
        .collect();
    c.io("mid.qcow2", &mid);
    assert!(
        c.map_count("mid.qcow2", "compressed") > 5,
        "mid has compressed clusters"
    );
    c.create(
        "top.qcow2",
        size,
        "cluster_size=65536",
        Some(("mid.qcow2", "qcow2")),
    );
    c.io("top.qcow2", &every_third(2, unit, size, "pat2.bin"));
    c.verify("chain with a compressed middle layer", "top.qcow2", unit);
}

/// Large reads of a chain whose layer changes every cluster read the layers below on the
/// image's threads while the calling thread reads the top: on 1 to 3 threads, in reads
/// larger than the runs the crate defers at once (8 MiB), in odd-sized large reads, and
/// with two corrupt clusters in the middle layer, where the error is the one a read of the
/// first of them alone gets.
#[test]
fn large_chain_reads_on_several_threads() {
    let Some(c) = Chain::new("chain_large_reads") else {
        return;
    };
    let (unit, size) = (64 * KIB, 20 * MIB);
    let zeros = format!("write -z {} {}", 40 * unit, 7 * unit);
    c.three_layers(size, &[zeros]);
    let expected = c
        .qemu
        .convert_to_raw(c.dir.path(), "top.qcow2", &[] as &[&str]);
    assert_eq!(expected.len() as u64, size);

    let chunks = [size, 9 * MIB, 3 * MIB + 4097, MIB, MIB + unit / 2];
    for threads in 1..=3 {
        let options = qcow2::OpenOptions::new().threads(threads);
        let image = Qcow2::open_path_with(c.dir.join("top.qcow2"), &options).expect("open");
        let reader = image.reader().expect("reader");
        for chunk in chunks {
            // Start inside a cluster too, so runs are cut at both ends of a read.
            for start in [0, 4097] {
                let mut at = start;
                while at < size {
                    let len = chunk.min(size - at) as usize;
                    let mut buf = vec![0xa5u8; len];
                    reader
                        .read_exact_at(at, &mut buf)
                        .unwrap_or_else(|e| panic!("{threads} threads: read {len} at {at}: {e}"));
                    let theirs = &expected[at as usize..at as usize + len];
                    let what = format!("{threads} threads, read of {len} at {at}");
                    if let Some(d) = describe_difference(&what, at, &buf, theirs) {
                        panic!("{d}");
                    }
                    at += chunk;
                }
            }
        }
    }

    // Two of the middle layer's data clusters pointed past the end of its file.
    let mid_len = std::fs::metadata(c.dir.join("mid.qcow2"))
        .expect("mid")
        .len();
    let past_end = mid_len.next_multiple_of(unit) + 64 * unit;
    let bad = [4 * unit, 13 * unit]; // mid holds the clusters i with i % 3 == 1
    for (k, guest) in bad.iter().enumerate() {
        let host = past_end + k as u64 * unit;
        set_l2_entry(&c.dir.join("mid.qcow2"), *guest, host | 1 << 63);
    }
    let top = c.dir.join("top.qcow2");
    whole_read_fails_as_at(&top, size, bad[0]);
    for threads in 1..=3 {
        let options = qcow2::OpenOptions::new().threads(threads);
        let image = Qcow2::open_path_with(&top, &options).expect("open");
        let reader = image.reader().expect("reader");
        let mut one = vec![0u8; unit as usize];
        let first = reader.read_exact_at(bad[0], &mut one).expect_err("bad");
        let mut two_mib = vec![0u8; 2 * MIB as usize];
        let from_between = reader
            .read_exact_at(bad[0] + unit, &mut two_mib)
            .expect_err("the second bad cluster");
        assert_ne!(
            from_between.to_string(),
            first.to_string(),
            "{threads} threads"
        );
    }
    // A misaligned data cluster in the top, after mid's first bad cluster: an error of the
    // planning, which comes after the errors of the runs planned before it.
    set_l2_entry(&top, 20 * unit, (past_end + 0x200) | 1 << 63);
    whole_read_fails_as_at(&top, size, bad[0]);
    // And one before it: now the planning error is the first.
    set_l2_entry(&top, 2 * unit, (past_end + 0x200) | 1 << 63);
    whole_read_fails_as_at(&top, size, 2 * unit);
}

/// Set the L2 entry of the cluster at `guest` (in the image's first L2 table) to `entry`.
fn set_l2_entry(path: &std::path::Path, guest: u64, entry: u64) {
    let mut file = std::fs::read(path).expect("image");
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be(&file, 40) as usize;
    let l2 = (be(&file, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let cluster_bits = u32::from_be_bytes(file[20..24].try_into().unwrap());
    let at = l2 + 8 * (guest >> cluster_bits) as usize;
    assert_ne!(be(&file, at), 0, "the image holds the cluster at {guest}");
    file[at..at + 8].copy_from_slice(&entry.to_be_bytes());
    std::fs::write(path, &file).expect("write the image");
}

/// A read of the whole guest fails, on 1 to 3 threads, with the error a read of the 64 KiB
/// cluster at `first_bad` alone gets.
fn whole_read_fails_as_at(top: &std::path::Path, size: u64, first_bad: u64) {
    for threads in 1..=3 {
        let options = qcow2::OpenOptions::new().threads(threads);
        let image = Qcow2::open_path_with(top, &options).expect("open");
        let reader = image.reader().expect("reader");
        let mut one = vec![0u8; 64 * KIB as usize];
        let first = reader.read_exact_at(first_bad, &mut one).expect_err("bad");
        let mut all = vec![0u8; size as usize];
        let whole = reader.read_exact_at(0, &mut all).expect_err("bad clusters");
        assert_eq!(whole.to_string(), first.to_string(), "{threads} threads");
    }
}
