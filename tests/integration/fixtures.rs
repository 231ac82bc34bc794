//! Every committed fixture reads exactly as `qemu-img convert -O raw` read it when the
//! fixtures were made (SHA-256 of the whole guest in `fixtures/manifest.tsv`).
//! These tests need no QEMU.

use positioned_io::ReadAt;
use qcow2::Qcow2;
use sha2::{Digest, Sha256};

struct Entry {
    image: String,
    snapshot: Option<String>,
    size: u64,
    sha: String,
}

fn manifest() -> Vec<Entry> {
    let text = std::fs::read_to_string(crate::common::fixture("manifest.tsv"))
        .expect("fixtures/manifest.tsv");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            let (image, snapshot) = match cols[0].split_once('@') {
                Some((i, s)) => (i.to_owned(), Some(s.to_owned())),
                None => (cols[0].to_owned(), None),
            };
            Entry {
                image,
                snapshot,
                size: cols[1].parse().expect("size"),
                sha: cols[2].to_owned(),
            }
        })
        .collect()
}

fn sha_of(reader: &impl ReadAt, size: u64, chunk: usize) -> String {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; chunk];
    let mut pos = 0;
    while pos < size {
        let n = reader.read_at(pos, &mut buf).expect("read");
        assert!(n > 0, "short read at {pos}");
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    assert_eq!(
        reader.read_at(size, &mut buf).unwrap(),
        0,
        "read at the end returns 0"
    );
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The cargo feature a compressed fixture needs, when this build lacks it.
fn needs_disabled_feature(name: &str) -> Option<&'static str> {
    if name.starts_with("zstd-") && !cfg!(feature = "zstd") {
        return Some("zstd");
    }
    // partitioned.qcow2 was made with `qemu-img convert -c` (zlib).
    let zlib = name.starts_with("zlib-") || name.starts_with("partitioned");
    if zlib && !cfg!(feature = "zlib") {
        return Some("zlib");
    }
    None
}

#[test]
fn every_fixture_reads_as_qemu_read_it() {
    let dir = crate::common::fixtures_dir();
    let entries = manifest();
    assert!(
        entries.len() >= 30,
        "manifest lists {} images",
        entries.len()
    );
    let mut checked = 0;
    let mut failures = Vec::new();
    for e in entries.iter().filter(|e| e.sha != "-") {
        let image = match Qcow2::open_path(dir.join(&e.image)) {
            Ok(i) => i,
            Err(qcow2::Error::Corrupt) => continue,
            Err(err) => {
                failures.push(format!("{}: open: {err}", e.image));
                continue;
            }
        };
        let reader = match &e.snapshot {
            Some(s) => image.snapshot_reader(s),
            None => image.reader(),
        };
        let reader = match reader {
            Ok(r) => r,
            Err(err) => {
                failures.push(format!("{}@{:?}: reader: {err}", e.image, e.snapshot));
                continue;
            }
        };
        let size = reader.guest_size();
        if let Some(feature) = needs_disabled_feature(&e.image) {
            let mut buf = vec![0u8; size as usize];
            let err = reader
                .read_exact_at(0, &mut buf)
                .expect_err("compressed image without its feature");
            let inner = err.get_ref().and_then(|e| e.downcast_ref::<qcow2::Error>());
            assert!(
                matches!(inner, Some(qcow2::Error::FeatureDisabled { feature: f }) if *f == feature),
                "{}: expected FeatureDisabled({feature}), got {err}",
                e.image
            );
            checked += 1;
            continue;
        }
        if size != e.size {
            failures.push(format!(
                "{}@{:?}: size {size}, qemu says {}",
                e.image, e.snapshot, e.size
            ));
        }
        // An odd chunk size so reads start and end at awkward offsets.
        for chunk in [1 << 20, 65536 + 513] {
            let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                sha_of(&reader, size, chunk)
            }));
            match got {
                Ok(sha) if sha == e.sha => {}
                Ok(sha) => failures.push(format!(
                    "{}@{:?} chunk {chunk}: sha {sha}",
                    e.image, e.snapshot
                )),
                Err(_) => failures.push(format!(
                    "{}@{:?} chunk {chunk}: panicked",
                    e.image, e.snapshot
                )),
            }
        }
        checked += 1;
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} fixtures differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked >= 28, "only {checked} fixtures checked");
}
