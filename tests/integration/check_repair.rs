//! `check -r leaks | -r all` against `qemu-img check -r`: images broken on purpose (leaked
//! clusters, refcounts too low or 0, wrong COPIED flags, a crash under lazy refcounts), of
//! every kind (snapshots, compressed clusters, extended L2, refcount widths 1 and 64, 512-byte
//! clusters, version 2). qemu-img repairs one copy, the crate another: the same lines on
//! stderr, the same stdout (human and JSON), the same exit status; then both images check the
//! same (`qemu-img check`), hold the same guest (`qemu-img compare`), have the same length
//! and agree on the dirty flag. And the crash test: the repair over a storage logging every write, cut at each of
//! them (killed or power lost, any pending writes kept): every cut image is the old one or the
//! repaired one, by `qemu-img check` and by its guest, never worse.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use common::crash_storage::{replay, window, CrashStorage, Subset};
use common::{Env, Rng};
use qcow2::{OpenOptions, Qcow2, Repair};

// ---------------------------------------------------------------------------------------------
// Breaking images on purpose

/// Where an image's tables are, read from its header.
struct Layout {
    cluster_bits: u32,
    refcount_order: u32,
    reftable: u64,
    l1: u64,
    l2_entry_len: u64,
}

fn be64(bytes: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn layout(bytes: &[u8]) -> Layout {
    let v3 = be32(bytes, 4) >= 3;
    let extended = v3 && be64(bytes, 72) & (1 << 4) != 0;
    Layout {
        cluster_bits: be32(bytes, 20),
        refcount_order: if v3 { be32(bytes, 96) } else { 4 },
        reftable: be64(bytes, 48),
        l1: be64(bytes, 40),
        l2_entry_len: if extended { 16 } else { 8 },
    }
}

/// The bit position of `cluster`'s refcount: (byte offset of its block entry, bit in block).
fn refcount_slot(bytes: &[u8], cluster: u64) -> (u64, u64) {
    let l = layout(bytes);
    let bits = 1u64 << l.refcount_order;
    let per_block = (8u64 << l.cluster_bits) / bits;
    let block = be64(bytes, l.reftable + 8 * (cluster / per_block)) & !0x1ff;
    assert_ne!(block, 0, "cluster {cluster} has no refcount block");
    (block, (cluster % per_block) * bits)
}

fn refcount(bytes: &[u8], cluster: u64) -> u64 {
    let bits = 1u64 << layout(bytes).refcount_order;
    let (block, bit) = refcount_slot(bytes, cluster);
    let mut value = 0u64;
    for i in 0..bits {
        let b = bit + i;
        let byte = bytes[(block + b / 8) as usize];
        // Sub-byte refcounts fill each byte from its low bits; wider ones are big-endian.
        let set = if bits < 8 {
            byte >> (b % 8) & 1
        } else {
            byte >> (7 - b % 8) & 1
        };
        if bits < 8 {
            value |= u64::from(set) << i;
        } else {
            value = value << 1 | u64::from(set);
        }
    }
    value
}

fn set_refcount(bytes: &mut [u8], cluster: u64, value: u64) {
    let bits = 1u64 << layout(bytes).refcount_order;
    let (block, bit) = refcount_slot(bytes, cluster);
    for i in 0..bits {
        let b = bit + i;
        let at = (block + b / 8) as usize;
        let (mask, set) = if bits < 8 {
            (1u8 << (b % 8), value >> i & 1)
        } else {
            (1u8 << (7 - b % 8), value >> (bits - 1 - i) & 1)
        };
        if set == 1 {
            bytes[at] |= mask;
        } else {
            bytes[at] &= !mask;
        }
    }
    assert_eq!(refcount(bytes, cluster), value);
}

const COPIED: u64 = 1 << 63;

/// The file offset of the active L2 entry `l2_index` under L1 entry 0.
fn l2_entry_at(bytes: &[u8], l2_index: u64) -> u64 {
    let l = layout(bytes);
    let l2 = be64(bytes, l.l1) & 0x00ff_ffff_ffff_fe00;
    l2 + l2_index * l.l2_entry_len
}

fn toggle_copied(bytes: &mut [u8], at: u64) {
    let old = be64(bytes, at);
    let at = at as usize;
    bytes[at..at + 8].copy_from_slice(&(old ^ COPIED).to_be_bytes());
}

/// The host cluster holding guest offset `guest` (`qemu-img map`).
fn host_cluster(env: &Env, image: &str, guest: u64) -> u64 {
    let map = env.qemu.map_json(env.dir.path(), image);
    let bits = layout(&env.read_file(image)).cluster_bits;
    let extent = map
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            let start = e["start"].as_u64().unwrap();
            start <= guest && guest < start + e["length"].as_u64().unwrap()
        })
        .unwrap();
    let offset = extent["offset"]
        .as_u64()
        .expect("guest offset is allocated");
    (offset + guest - extent["start"].as_u64().unwrap()) >> bits
}

/// What is wrong with a case's image.
#[derive(Clone, Copy)]
struct Damage {
    /// Clusters just past the file given refcount 1, and a data cluster's refcount raised.
    leaks: bool,
    /// A data cluster shared with a snapshot given refcount 1.
    too_low: bool,
    /// A used data cluster given refcount 0 (QEMU rebuilds the refcount structure).
    zero: bool,
    /// The COPIED flag of an active data cluster, and of the L1 entry, flipped.
    copied: bool,
}

const NONE: Damage = Damage {
    leaks: false,
    too_low: false,
    zero: false,
    copied: false,
};

/// An image with data (a compressed cluster among it, a snapshot where the refcount width
/// allows one), then `damage` done to it.
fn make(env: &Env, name: &str, opts: &str, damage: Damage) {
    env.create(name, 16 << 20, opts);
    env.io(name, &["write -P 1 0 300k"]);
    env.io(name, &["write -c -P 2 1M 64k"]);
    let snapshots = !opts.contains("refcount_bits=1,") && !opts.ends_with("refcount_bits=1");
    if snapshots {
        env.img(&["snapshot", "-c", "s1", name]);
        env.io(name, &["write -P 5 100k 8k"]);
    }
    let mut bytes = env.read_file(name);
    let l = layout(&bytes);
    let cluster = 1u64 << l.cluster_bits;
    if damage.leaks {
        let end = (bytes.len() as u64).div_ceil(cluster);
        bytes.resize(((end + 3) * cluster) as usize, 0);
        set_refcount(&mut bytes, end + 1, 1);
        let data = host_cluster(env, name, 0);
        let n = refcount(&bytes, data);
        let max = u64::MAX >> (64 - (1 << l.refcount_order));
        set_refcount(&mut bytes, data, (n + 1).min(max));
    }
    if damage.too_low {
        assert!(snapshots);
        let shared = host_cluster(env, name, 200 << 10);
        assert_eq!(refcount(&bytes, shared), 2);
        set_refcount(&mut bytes, shared, 1);
    }
    if damage.zero {
        let used = host_cluster(env, name, 250 << 10);
        set_refcount(&mut bytes, used, 0);
    }
    if damage.copied {
        let guest_cluster_index = (280 << 10) / cluster;
        let entry = l2_entry_at(&bytes, guest_cluster_index);
        toggle_copied(&mut bytes, entry);
        toggle_copied(&mut bytes, l.l1);
    }
    std::fs::write(env.path(name), bytes).unwrap();
}

/// What a refcount table entry is broken into.
#[derive(Clone, Copy, Debug)]
enum Refblock {
    /// A block past the end of the file.
    Outside,
    /// A block offset not cluster aligned.
    Unaligned,
    /// The active L2 table's cluster as a refcount block too.
    Shared,
    /// A reserved bit set.
    Reserved,
}

/// An image with leaks whose refcount table's second entry (covering no cluster of the file)
/// is broken as `how` says.
fn make_broken_table(env: &Env, name: &str, how: Refblock) {
    make(
        env,
        name,
        "",
        Damage {
            leaks: true,
            ..NONE
        },
    );
    let mut bytes = env.read_file(name);
    let l = layout(&bytes);
    let cluster = 1u64 << l.cluster_bits;
    let l2 = be64(&bytes, l.l1) & 0x00ff_ffff_ffff_fe00;
    let entry = match how {
        Refblock::Outside => (bytes.len() as u64).div_ceil(cluster) * cluster + 100 * cluster,
        Refblock::Unaligned => l2 + 512,
        Refblock::Shared => l2,
        Refblock::Reserved => l2 | 1,
    };
    let at = (l.reftable + 8) as usize;
    bytes[at..at + 8].copy_from_slice(&entry.to_be_bytes());
    std::fs::write(env.path(name), bytes).unwrap();
}

/// The one case where the crate repairs more than qemu-img: under `-r leaks`, a refcount
/// table entry naming a block past the end of the file is dropped with the old table (the
/// new table holds only blocks in use); qemu-img leaves it, and its double check reports it.
fn known_difference(image: &str, leaks: bool) -> bool {
    leaks && image == "refblock-Outside.qcow2"
}

/// Every case's image, made in the test's dir: their names.
fn make_all(env: &Env) -> Vec<String> {
    let mut images = Vec::new();
    for (name, opts, damage) in cases() {
        let image = format!("{name}.qcow2");
        make(env, &image, opts, damage);
        images.push(image);
    }
    for how in [
        Refblock::Outside,
        Refblock::Unaligned,
        Refblock::Shared,
        Refblock::Reserved,
    ] {
        let image = format!("refblock-{how:?}.qcow2");
        make_broken_table(env, &image, how);
        images.push(image);
    }
    images
}

/// An image a crash left dirty under lazy refcounts (qemu-io killed after its writes).
fn make_dirty(env: &Env, name: &str) {
    env.create(name, 16 << 20, "lazy_refcounts=on,cluster_size=4096");
    env.qemu.io_crash(
        env.dir.path(),
        "qcow2",
        name,
        &["write -P 3 0 1M", "write -P 4 2M 64k"],
    );
}

/// The cases: (name, qemu-img create options, damage).
fn cases() -> Vec<(&'static str, &'static str, Damage)> {
    let leaks = Damage {
        leaks: true,
        ..NONE
    };
    let all = Damage {
        leaks: true,
        too_low: true,
        copied: true,
        ..NONE
    };
    vec![
        ("clean", "", NONE),
        ("leaks", "", leaks),
        (
            "too-low",
            "",
            Damage {
                too_low: true,
                ..NONE
            },
        ),
        (
            "zero",
            "",
            Damage {
                zero: true,
                leaks: true,
                ..NONE
            },
        ),
        (
            "copied",
            "",
            Damage {
                copied: true,
                ..NONE
            },
        ),
        ("mixed", "", all),
        ("extended-l2", "extended_l2=on", all),
        ("refcount-1", "refcount_bits=1", leaks),
        (
            "refcount-1-zero",
            "refcount_bits=1",
            Damage {
                zero: true,
                copied: true,
                ..NONE
            },
        ),
        ("refcount-64", "refcount_bits=64", all),
        ("small-clusters", "cluster_size=512", all),
        (
            "small-clusters-zero",
            "cluster_size=512,refcount_bits=64",
            Damage {
                zero: true,
                leaks: true,
                ..NONE
            },
        ),
        ("v2", "compat=0.10", all),
    ]
}

// ---------------------------------------------------------------------------------------------
// Against qemu-img

fn run_in(dir: &Path, program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .current_dir(dir)
        .args(args)
        .output()
        .expect("running a checker")
}

/// Stderr lines, the tool's own name taken off its messages.
fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| {
            l.strip_prefix("qemu-img: ")
                .or_else(|| l.strip_prefix("qcow2: "))
                .unwrap_or(l)
                .to_owned()
        })
        .collect()
}

/// What `qemu-img check` (and `info`) says of an image afterwards.
fn judged(env: &Env, dir: &Path, name: &str) -> (Option<i32>, String, bool) {
    let check = run_in(dir, &env.qemu.img, &["check", name]);
    let info = env.qemu.info_json(dir, name, false);
    let dirty = info["dirty-flag"] == true;
    (
        check.status.code(),
        String::from_utf8_lossy(&check.stdout).into_owned(),
        dirty,
    )
}

/// Repair copies of `image` with qemu-img and with the `qcow2` command (`args` before the
/// image name) and compare everything.
#[cfg(feature = "cli")]
fn compare_cli(env: &Env, image: &str, args: &[&str]) {
    let ours = env.path("ours");
    let theirs = env.path("theirs");
    for dir in [&ours, &theirs] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::copy(env.path(image), dir.join("img.qcow2")).unwrap();
    }
    let mut full = vec!["check"];
    full.extend(args);
    full.push("img.qcow2");
    let q = run_in(&theirs, &env.qemu.img, &full);
    let o = run_in(&ours, Path::new(env!("CARGO_BIN_EXE_qcow2")), &full);
    let what = format!("{image} {args:?}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&q.stdout),
        "{what}: stdout"
    );
    assert_eq!(stderr_lines(&o), stderr_lines(&q), "{what}: stderr");
    assert_eq!(o.status.code(), q.status.code(), "{what}: exit status");
    let (ours_after, theirs_after) = (
        judged(env, &ours, "img.qcow2"),
        judged(env, &theirs, "img.qcow2"),
    );
    assert_eq!(
        (ours_after.0, &ours_after.1),
        (theirs_after.0, &theirs_after.1),
        "{what}: the images after"
    );
    // qemu-img clears the dirty bit when it closes the image, whatever the repair left; the
    // crate only once the refcounts are right (QEMU would otherwise trust them).
    if matches!(theirs_after.0, Some(0 | 3)) {
        assert_eq!(ours_after.2, theirs_after.2, "{what}: dirty flag");
    } else {
        assert!(
            ours_after.2 || !theirs_after.2,
            "{what}: dirty flag cleared"
        );
    }
    let len = |dir: &Path| std::fs::metadata(dir.join("img.qcow2")).unwrap().len();
    assert_eq!(len(&ours), len(&theirs), "{what}: file length");
    let compare = run_in(
        env.dir.path(),
        &env.qemu.img,
        &["compare", "ours/img.qcow2", "theirs/img.qcow2"],
    );
    assert_eq!(compare.status.code(), Some(0), "{what}: guests differ");
}

#[cfg(feature = "cli")]
#[test]
fn cli_repairs_as_qemu_img_does() {
    let Some(env) = Env::new("check_repair_cli") else {
        return;
    };
    let mut images = make_all(&env);
    make_dirty(&env, "dirty.qcow2");
    images.push("dirty.qcow2".into());
    for image in &images {
        for mode in ["leaks", "all"] {
            if known_difference(image, mode == "leaks") {
                continue;
            }
            compare_cli(&env, image, &["-r", mode]);
            compare_cli(&env, image, &["-r", mode, "--output=json"]);
        }
    }
    compare_cli(&env, "mixed.qcow2", &["-q", "-r", "all"]);
}

/// The library's report: qemu-img's stderr lines as its steps (then the double check's
/// problems), its counts, its exit status.
#[test]
fn library_repair_reports_what_qemu_img_reports() {
    let Some(env) = Env::new("check_repair_lib") else {
        return;
    };
    for image in make_all(&env) {
        let name = image.trim_end_matches(".qcow2");
        for mode in [Repair::Leaks, Repair::All] {
            if known_difference(&image, mode == Repair::Leaks) {
                continue;
            }
            env.copy(&image, "q.qcow2");
            env.copy(&image, "o.qcow2");
            let flag = if mode == Repair::Leaks {
                "leaks"
            } else {
                "all"
            };
            let q = run_in(
                env.dir.path(),
                &env.qemu.img,
                &["check", "-r", flag, "q.qcow2"],
            );
            let options = OpenOptions::new().write(true);
            let mut ours = Qcow2::open_path_with(env.path("o.qcow2"), &options).unwrap();
            let repair = ours.repair(mode).unwrap();
            let mut lines: Vec<String> = repair.steps.iter().map(ToString::to_string).collect();
            let status = if repair.completed {
                if repair.repaired() {
                    lines.extend(repair.report.problems.iter().map(ToString::to_string));
                }
                if repair.report.check_errors > 0 {
                    lines.push("Check failed".into());
                }
                i32::from(repair.report.exit_status())
            } else {
                lines.push("Check failed: Input/output error".into());
                1
            };
            let what = format!("{name} {flag}");
            assert_eq!(lines, stderr_lines(&q), "{what}: lines");
            assert_eq!(Some(status), q.status.code(), "{what}: status");
            if repair.completed {
                let mut stdout = repair.repaired_summary();
                stdout.push_str(&repair.report.summary());
                assert_eq!(stdout, String::from_utf8_lossy(&q.stdout), "{what}: stdout");
            }
            // The image as the library sees it now agrees with qemu-img's repaired copy.
            drop(ours);
            assert_eq!(
                judged(&env, env.dir.path(), "o.qcow2"),
                judged(&env, env.dir.path(), "q.qcow2"),
                "{what}: the images after"
            );
        }
    }
}

#[test]
fn repair_needs_an_image_open_for_writing() {
    let Some(env) = Env::new("check_repair_read_only") else {
        return;
    };
    make(
        &env,
        "img.qcow2",
        "",
        Damage {
            leaks: true,
            ..NONE
        },
    );
    let before = env.read_file("img.qcow2");
    let mut image = Qcow2::open_path(env.path("img.qcow2")).unwrap();
    assert!(matches!(
        image.repair(Repair::All),
        Err(qcow2::Error::ReadOnly)
    ));
    assert_eq!(env.read_file("img.qcow2"), before);
}

// ---------------------------------------------------------------------------------------------
// Crash safety

/// `qemu-img check --output=json` counts of the file `bytes` (corruptions, leaks,
/// check-errors), and its guest as `qemu-img convert` reads it.
fn state(env: &Env, bytes: &[u8]) -> ((u64, u64, u64), Vec<u8>) {
    std::fs::write(env.path("cut.qcow2"), bytes).unwrap();
    let out = run_in(
        env.dir.path(),
        &env.qemu.img,
        &["check", "--output=json", "cut.qcow2"],
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check gave no report ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let n = |key: &str| json[key].as_u64().unwrap_or(0);
    let counts = (n("corruptions"), n("leaks"), n("check-errors"));
    (counts, env.convert("cut.qcow2", &[]))
}

/// Repair `image` over a logging storage, then replay every cut with several subsets of
/// the pending writes: each file is the old image or the repaired one (its guest unchanged,
/// its check counts those of one of them), never worse.
fn crash_case(env: &Env, image: &str, mode: Repair) -> usize {
    let initial = env.read_file(image);
    let storage = CrashStorage::new(initial.clone());
    let options = OpenOptions::new().write(true);
    let mut qcow = Qcow2::open_with(storage.clone(), &options).unwrap();
    let repair = qcow.repair(mode).unwrap();
    assert!(repair.repaired(), "{image}: nothing to repair");
    drop(qcow);
    let log = storage.log();
    let (old_counts, guest) = state(env, &initial);
    let (new_counts, new_guest) = state(env, &storage.contents());
    assert_eq!(new_guest, guest, "{image}: the repair changed the guest");
    assert!(
        new_counts.0 <= old_counts.0 && new_counts.1 <= old_counts.1,
        "{image}: repaired {new_counts:?} from {old_counts:?}"
    );
    let mut rng = Rng::new(24);
    let mut judged = 0;
    for cut in 0..=log.len() {
        let pending = window(&log, cut).pending.len();
        let mut subsets = vec![Subset::All, Subset::None];
        if pending > 0 {
            subsets.push(Subset::AllBut(rng.below(pending as u64) as usize));
            subsets.push(Subset::Only(rng.below(pending as u64) as usize));
            subsets.push(Subset::Random(rng.next_u64()));
        }
        for subset in subsets {
            let bytes = replay(&initial, &log, cut, subset);
            let (counts, cut_guest) = state(env, &bytes);
            assert_eq!(cut_guest, guest, "{image}: cut {cut} {subset:?}: guest");
            assert!(
                counts == old_counts || counts == new_counts,
                "{image}: cut {cut} {subset:?}: check {counts:?}, old {old_counts:?}, \
                 repaired {new_counts:?}"
            );
            judged += 1;
        }
    }
    judged
}

#[test]
fn crash_at_every_write_leaves_the_old_image_or_the_repaired_one() {
    let Some(env) = Env::new("check_repair_crash") else {
        return;
    };
    let mut judged = 0;
    // Leaks and COPIED flags (the in-place repair: two changes, the second moving down).
    make(
        &env,
        "mixed.qcow2",
        "",
        Damage {
            leaks: true,
            copied: true,
            too_low: true,
            ..NONE
        },
    );
    judged += crash_case(&env, "mixed.qcow2", Repair::All);
    // A rebuilt refcount structure, then COPIED flags (three changes).
    make(
        &env,
        "zero.qcow2",
        "cluster_size=4096",
        Damage {
            zero: true,
            leaks: true,
            copied: true,
            ..NONE
        },
    );
    judged += crash_case(&env, "zero.qcow2", Repair::All);
    // Leaks only, under -r leaks (then the COPIED flags too, nothing else being wrong).
    make(
        &env,
        "leaks.qcow2",
        "extended_l2=on",
        Damage {
            leaks: true,
            copied: true,
            ..NONE
        },
    );
    judged += crash_case(&env, "leaks.qcow2", Repair::Leaks);
    // A crash under lazy refcounts (refcounts of 0 on used clusters: a rebuild), marked clean.
    make_dirty(&env, "dirty.qcow2");
    judged += crash_case(&env, "dirty.qcow2", Repair::All);
    eprintln!("{judged} cut images judged");
    assert!(judged > 50, "only {judged} cut images judged");
}

/// An image QEMU marked corrupt (the header's corrupt bit), repaired: qemu-img opens it for
/// the repair and clears the bit once nothing corrupt is left; the crate does the same
/// (`Qcow2::open_path_to_repair`, `CorruptBitHidden::clear_corrupt_bit`).
#[cfg(feature = "cli")]
#[test]
fn an_image_marked_corrupt_is_repaired_and_unmarked() {
    let Some(env) = Env::new("check_repair_corrupt_bit") else {
        return;
    };
    let images = make_all(&env);
    let mut tried = 0;
    for image in images
        .iter()
        .filter(|i| !i.starts_with("refblock-"))
        .take(6)
    {
        let marked = format!("marked-{image}");
        let mut bytes = env.read_file(image);
        if be32(&bytes, 4) < 3 {
            continue;
        }
        bytes[79] |= 2;
        std::fs::write(env.path(&marked), &bytes).unwrap();
        for mode in ["leaks", "all"] {
            if known_difference(image, mode == "leaks") {
                continue;
            }
            compare_cli(&env, &marked, &["-r", mode]);
            let corrupt = |dir: &str| {
                env.qemu.info_json(&env.path(dir), "img.qcow2", false)["format-specific"]["data"]
                    ["corrupt"]
                    .clone()
            };
            assert_eq!(
                corrupt("ours"),
                corrupt("theirs"),
                "{marked} -r {mode}: corrupt bit"
            );
            tried += 1;
        }
    }
    assert!(tried >= 6, "too few marked images tried: {tried}");
}
