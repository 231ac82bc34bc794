//! `Qcow2::check` keeps its memory bounded on huge images: a counting allocator (per thread,
//! as in the `mutation` module) measures the peak while an image is opened and checked, and the
//! counts must still be `qemu-img check`'s.

use crate::common;

use std::path::Path;

use common::{Qemu, TempDir};
use qcow2::{CheckOptions, Qcow2};

/// The most a check of any of these images may hold at once.
const PEAK_BOUND: isize = 128 << 20;

use crate::alloc_count::peak_during;

/// Open and check `path`, returning the report and the peak bytes held meanwhile.
fn check_measured(path: &Path, options: &CheckOptions) -> (qcow2::CheckReport, isize) {
    let (report, peak) = peak_during(|| {
        let image = Qcow2::open(std::fs::File::open(path).unwrap()).unwrap();
        image.check_with(options).unwrap()
    });
    (report, peak as isize)
}

fn qemu_json(qemu: &Qemu, dir: &Path, name: &str) -> serde_json::Value {
    let out = std::process::Command::new(&qemu.img)
        .current_dir(dir)
        .args(["check", "--output=json", name])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

fn assert_counts(report: &qcow2::CheckReport, qemu: &serde_json::Value, what: &str) {
    let field = |k: &str| qemu.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    assert_eq!(report.image_end_offset, field("image-end-offset"), "{what}");
    assert_eq!(report.total_clusters, field("total-clusters"), "{what}");
    assert_eq!(
        report.allocated_clusters,
        field("allocated-clusters"),
        "{what}"
    );
    assert_eq!(
        report.fragmented_clusters,
        field("fragmented-clusters"),
        "{what}"
    );
    assert_eq!(report.corruptions, field("corruptions"), "{what}");
    assert_eq!(report.leaks, field("leaks"), "{what}");
    assert_eq!(report.check_errors, field("check-errors"), "{what}");
}

#[test]
fn huge_sparse_images_check_in_bounded_memory() {
    let Some(qemu) = Qemu::find_or_skip("huge_sparse_images_check_in_bounded_memory") else {
        return;
    };
    let tmp = TempDir::new("check-memory");
    // (name, cluster size, virtual size, writes). A 1 TiB image cannot have 512-byte
    // clusters: its L1 table would be 256 MiB, over QEMU's 32 MiB limit.
    let cases: &[(&str, &str, &str, &[&str])] = &[
        (
            "1t-64k.qcow2",
            "65536",
            "1T",
            &[
                "write 0 64k",
                "write 300G 128k",
                "write 700G 64k",
                "write 1048575M 1M",
            ],
        ),
        (
            "64g-512.qcow2",
            "512",
            "64G",
            &[
                "write 0 4k",
                "write 20G 512",
                "write 40G 64k",
                "write 65535M 1M",
            ],
        ),
    ];
    for (name, cluster, size, writes) in cases {
        let opts = format!("cluster_size={cluster}");
        qemu.img(
            tmp.path(),
            &["create", "-q", "-f", "qcow2", "-o", &opts, name, size],
        );
        qemu.io(tmp.path(), "qcow2", name, writes);
        let (report, peak) = check_measured(&tmp.join(name), &CheckOptions::default());
        assert_counts(&report, &qemu_json(&qemu, tmp.path(), name), name);
        assert!(report.is_clean(), "{name}: {report:?}");
        assert!(peak < PEAK_BOUND, "{name}: peak {peak} bytes");
        eprintln!("{name}: peak {} KiB", peak >> 10);
    }
}

#[test]
fn a_terabyte_file_checks_in_windows_within_the_budget() {
    let Some(qemu) = Qemu::find_or_skip("a_terabyte_file_checks_in_windows_within_the_budget")
    else {
        return;
    };
    let tmp = TempDir::new("check-memory-file");
    if !common::supports_sparse_files(tmp.path(), 1 << 40) {
        eprintln!("SKIPPED: no sparse files in {}", tmp.path().display());
        return;
    }
    // A 64 KiB-cluster image whose file is extended (sparsely) to 1 TiB: 16 Mi host clusters
    // to compare. With a 4 MiB budget that is 8 windows, each a pass over the metadata.
    let name = "file-1t.qcow2";
    qemu.img(tmp.path(), &["create", "-q", "-f", "qcow2", name, "2T"]);
    qemu.io(tmp.path(), "qcow2", name, &["write 0 1M", "write 1T 64k"]);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(tmp.join(name))
        .unwrap();
    file.set_len(1 << 40).unwrap();
    drop(file);
    let options = CheckOptions::new().memory_budget(4 << 20);
    let (report, peak) = check_measured(&tmp.join(name), &options);
    assert_counts(&report, &qemu_json(&qemu, tmp.path(), name), name);
    assert!(peak < 16 << 20, "peak {peak} bytes with a 4 MiB budget");
    eprintln!("{name}: peak {} KiB", peak >> 10);
}

/// Random damage anywhere in small fixtures: opening may fail, but a check of what opens must
/// neither panic nor hold more than a few MiB (the images are at most a few hundred KiB).
#[test]
fn damaged_images_check_without_panic_in_bounded_memory() {
    let mut rng = common::Rng::new(0xc4ec_da3a);
    let mut checked = 0;
    for fixture in [
        "snap.qcow2",
        "bitmaps.qcow2",
        "zlib-4k-mixed.qcow2",
        "extl2-16k.qcow2",
        "refcount1.qcow2",
        "refcount64.qcow2",
        "v3-512-l2cross.qcow2",
        "v2-64k.qcow2",
    ] {
        let original = std::fs::read(common::fixtures_dir().join(fixture)).unwrap();
        for case in 0..150 {
            let mut bytes = original.clone();
            for _ in 0..=rng.below(8) {
                // Mostly the metadata near the start of the file.
                let span = if rng.below(2) == 0 {
                    1 << 14
                } else {
                    bytes.len() as u64
                };
                let at = rng.below(span.min(bytes.len() as u64)) as usize;
                bytes[at] = rng.next_u64() as u8;
            }
            let (result, peak) = peak_during(|| {
                std::panic::catch_unwind(|| {
                    let image = Qcow2::open(bytes.clone()).ok()?;
                    let options = CheckOptions::new().memory_budget(1 << 10);
                    Some(image.check_with(&options))
                })
            });
            let outcome = result.unwrap_or_else(|_| panic!("{fixture} case {case} panicked"));
            if outcome.is_some() {
                checked += 1;
            }
            assert!(peak < 16 << 20, "{fixture} case {case}: peak {peak} bytes");
        }
    }
    assert!(checked > 300, "only {checked} damaged images opened");
}

/// The largest active L1 table (4 Mi entries, 32 MiB), every entry naming the same L2 table:
/// the check counts the distinct L2 tables it names (a sorted copy of the entries) before it
/// walks, and stops at the repetition, within the same memory bound.
#[test]
fn the_largest_l1_table_naming_one_l2_table_stops_in_bounded_memory() {
    let Some(qemu) =
        Qemu::find_or_skip("the_largest_l1_table_naming_one_l2_table_stops_in_bounded_memory")
    else {
        return;
    };
    let tmp = TempDir::new("check-memory-l1");
    let name = "l1.qcow2";
    // 128 GiB at 512-byte clusters: an L2 table maps 32 KiB, the L1 table has 4 Mi entries.
    let create = [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        name,
        "128G",
    ];
    qemu.img(tmp.path(), &create);
    qemu.io(tmp.path(), "qcow2", name, &["write -P 1 0 512"]);
    let path = tmp.join(name);
    let mut bytes = std::fs::read(&path).unwrap();
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    assert_eq!(
        u32::from_be_bytes(bytes[36..40].try_into().unwrap()),
        4 << 20
    );
    let first: [u8; 8] = bytes[l1..l1 + 8].try_into().unwrap();
    for i in 1..(4usize << 20) {
        bytes[l1 + 8 * i..l1 + 8 * i + 8].copy_from_slice(&first);
    }
    std::fs::write(&path, &bytes).unwrap();
    let (result, peak) = peak_during(|| {
        let image = Qcow2::open(std::fs::File::open(&path).unwrap()).unwrap();
        image.check()
    });
    let err = result.expect_err("the check stops at the repetition");
    assert!(err.to_string().contains("named again and again"), "{err}");
    assert!((peak as isize) < PEAK_BOUND, "peak {peak} bytes");
    eprintln!("{name}: peak {} KiB", peak >> 10);
}
