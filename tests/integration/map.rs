//! `Reader::extent_at` against `qemu-img map --output=json`, on every committed fixture that
//! has no backing file (a backing layer would show in QEMU's map with a depth).

use crate::common;

use qcow2::{ExtentKind, Qcow2};
use serde_json::Value;

/// An extent as both sides can say it: (start, length, kind).
type Entry = (u64, u64, ExtentKind);

/// The kind as `qemu-img map` can say it: no host offsets for zeros and unallocated
/// stretches, none of compressed data.
fn comparable(kind: ExtentKind) -> ExtentKind {
    match kind {
        ExtentKind::Compressed { .. } => ExtentKind::Compressed {
            host_offset: 0,
            compressed_len: 0,
        },
        ExtentKind::Zero { .. } => ExtentKind::Zero { host_offset: None },
        ExtentKind::Unallocated { .. } => ExtentKind::Unallocated { host_offset: None },
        data => data,
    }
}

/// Merge neighbours stored the same way (QEMU and the crate cut extents at different places).
fn merged(entries: impl IntoIterator<Item = Entry>) -> Vec<Entry> {
    let mut out: Vec<Entry> = Vec::new();
    for (start, length, kind) in entries {
        let kind = comparable(kind);
        if let Some(last) = out.last_mut() {
            let continues = match (last.2, kind) {
                (ExtentKind::Data { host_offset: a }, ExtentKind::Data { host_offset: b }) => {
                    a + last.1 == b
                }
                (a, b) => a == b,
            };
            if continues && last.0 + last.1 == start {
                last.1 += length;
                continue;
            }
        }
        out.push((start, length, kind));
    }
    out
}

fn qemu_kind(e: &Value) -> ExtentKind {
    let flag = |k: &str| e[k].as_bool().unwrap_or(false);
    if !flag("present") {
        ExtentKind::Unallocated { host_offset: None }
    } else if flag("compressed") {
        ExtentKind::Compressed {
            host_offset: 0,
            compressed_len: 0,
        }
    } else if flag("zero") && !flag("data") {
        ExtentKind::Zero { host_offset: None }
    } else {
        ExtentKind::Data {
            host_offset: e["offset"].as_u64().expect("data extent without offset"),
        }
    }
}

/// `qemu-img map --output=json`'s extents as entries.
fn qemu_entries(json: &[u8]) -> Vec<Entry> {
    let map: Value = serde_json::from_slice(json).unwrap();
    let extents = map.as_array().unwrap().iter();
    let entry = |e: &Value| {
        let start = e["start"].as_u64().unwrap();
        (start, e["length"].as_u64().unwrap(), qemu_kind(e))
    };
    extents.map(entry).collect()
}

/// The committed fixtures whose map `qemu-img map` gives layer for layer: no backing file;
/// not encrypted (qemu-img map needs the secret, and hides host offsets); no preallocated
/// clusters (QEMU looks into the file for holes and reports those as zeros, a property of the
/// host file rather than of the image).
fn single_layer_fixtures() -> Vec<(String, Qcow2<std::fs::File>)> {
    let dir = common::fixtures_dir();
    common::fixture_images()
        .into_iter()
        .filter(|n| !n.starts_with("prealloc-"))
        .filter_map(|name| {
            let image = Qcow2::open_path(dir.join(&name)).ok()?;
            let single = image.encryption().is_none() && image.header().backing_file().is_none();
            single.then_some((name, image))
        })
        .collect()
}

#[test]
fn extents_match_qemu_img_map() {
    let Some(qemu) = common::Qemu::find_or_skip("extents_match_qemu_img_map") else {
        return;
    };
    let dir = common::fixtures_dir();
    let mut compared = 0;
    for (name, image) in single_layer_fixtures() {
        let name = name.as_str();
        let reader = image.reader().unwrap();
        let mut ours = Vec::new();
        let mut pos = 0;
        while let Some(e) = reader.extent_at(pos).unwrap() {
            assert_eq!(e.start, pos);
            assert!(e.length > 0);
            ours.push((e.start, e.length, e.kind));
            pos += e.length;
        }
        assert_eq!(pos, image.guest_size(), "{name}: map covers the guest");
        let out = qemu.img(&dir, &["map", "--output=json", "-f", "qcow2", name]);
        assert_eq!(
            merged(ours),
            merged(qemu_entries(&out)),
            "{name}: map differs"
        );
        compared += 1;
    }
    assert!(compared >= 15, "only {compared} fixtures compared");
}

/// `Reader::extent_in` walked over a range gives what `qemu-img map --start-offset S
/// --max-length L` gives for it, and no extent reaches past the range.
#[test]
fn extents_in_a_range_match_qemu_img_map_of_that_range() {
    let Some(qemu) = common::Qemu::find_or_skip("extents_in_a_range_match_qemu_img_map") else {
        return;
    };
    let dir = common::fixtures_dir();
    let mut compared = 0;
    for (name, image) in single_layer_fixtures() {
        let name = name.as_str();
        let reader = image.reader().unwrap();
        let size = image.guest_size();
        // Unaligned ranges inside the guest, and one running past its end.
        for (start, len) in [
            (512, 4096),
            (size / 3 + 1000, size / 4 + 7),
            (size / 2, size),
        ] {
            let end = (start + len).min(size);
            let mut ours = Vec::new();
            let mut pos = start;
            while let Some(e) = reader.extent_in(pos..start + len).unwrap() {
                assert_eq!(e.start, pos, "{name}");
                assert!(e.length > 0 && e.start + e.length <= end, "{name}: {e:?}");
                ours.push((e.start, e.length, e.kind));
                pos += e.length;
            }
            assert_eq!(pos, end, "{name}: extents cover {start}..{end}");
            let (s, l) = (start.to_string(), (end - start).to_string());
            let args = ["map", "--output=json", "-f", "qcow2", "--start-offset", &s];
            let mut args = args.to_vec();
            args.extend(["--max-length", &l, name]);
            let out = qemu.img(&dir, &args);
            assert_eq!(
                merged(ours),
                merged(qemu_entries(&out)),
                "{name} {start}..{end}: map differs"
            );
        }
        assert!(reader.extent_in(size..size + 1).unwrap().is_none());
        assert!(reader.extent_in(5..5).unwrap().is_none());
        compared += 1;
    }
    assert!(compared >= 15, "only {compared} fixtures compared");
}

/// An extent of `Reader::map` as qemu-img's JSON entry: every field, `offset` when present.
fn as_qemu_json(e: &qcow2::MapExtent<'_>) -> Value {
    let mut v = serde_json::json!({
        "start": e.start, "length": e.length, "depth": e.depth, "present": e.present,
        "zero": e.zero, "data": e.data, "compressed": e.compressed,
    });
    if let Some(offset) = e.offset {
        v["offset"] = offset.into();
    }
    v
}

/// `Reader::map` of a whole image, as qemu-img JSON entries.
fn our_map(image: &Qcow2<std::fs::File>, range: std::ops::Range<u64>) -> Vec<Value> {
    let reader = image.reader().unwrap();
    reader
        .map(range)
        .map(|e| as_qemu_json(&e.unwrap()))
        .collect()
}

fn qemu_map(qemu: &common::Qemu, dir: &std::path::Path, args: &[&str]) -> Vec<Value> {
    let mut full = vec!["map", "--output=json"];
    full.extend_from_slice(args);
    let out = qemu.img(dir, &full);
    let v: Value = serde_json::from_slice(&out).unwrap();
    v.as_array().unwrap().clone()
}

#[test]
fn map_matches_qemu_img_on_every_fixture_with_its_chain() {
    let Some(qemu) = common::Qemu::find_or_skip("map_matches_qemu_img_on_every_fixture") else {
        return;
    };
    let dir = common::fixtures_dir();
    let mut compared = 0;
    for name in common::fixture_images() {
        let Ok(image) = Qcow2::open_path(dir.join(&name)) else {
            continue; // corrupt images are refused on purpose
        };
        if image.encryption().is_some() {
            continue; // qemu-img map needs the key: see the cli_map module
        }
        let size = image.guest_size();
        assert_eq!(
            our_map(&image, 0..size),
            qemu_map(&qemu, &dir, &[&name]),
            "{name}: map differs"
        );
        // A window with unaligned ends.
        let (start, len) = (size / 3 + 7, size / 2 + 513);
        let window = qemu_map(
            &qemu,
            &dir,
            &["-s", &start.to_string(), "-l", &len.to_string(), &name],
        );
        assert_eq!(
            our_map(&image, start..start + len),
            window,
            "{name}: window differs"
        );
        compared += 1;
    }
    assert!(compared >= 25, "only {compared} fixtures compared");
}

/// Files named by the map: the image itself, and where a backing file provides the data,
/// that file (as QEMU names it: relative to the image that names it).
#[test]
fn extents_name_the_file_they_are_in() {
    let image = Qcow2::open_path("fixtures/chain-top.qcow2").unwrap();
    let reader = image.reader().unwrap();
    let mut files = std::collections::BTreeSet::new();
    for e in reader.map(..) {
        let e = e.unwrap();
        assert_eq!(e.file.is_some(), e.offset.is_some());
        if let Some(f) = e.file {
            let expected = match e.depth {
                0 => "fixtures/chain-top.qcow2",
                1 => "fixtures/chain-mid.qcow2",
                _ => "fixtures/chain-base.qcow2",
            };
            assert_eq!(f, std::path::Path::new(expected));
            files.insert(f.to_owned());
        }
    }
    assert!(files.len() >= 2, "{files:?}");
}

#[cfg(feature = "serde")]
#[test]
fn extents_serialize_as_qemu_img_json_entries() {
    let Some(qemu) = common::Qemu::find_or_skip("extents_serialize_as_qemu_img_json") else {
        return;
    };
    let dir = common::fixtures_dir();
    for name in [
        "chain-top.qcow2",
        "zlib-4k-mixed.qcow2",
        "overlay-raw.qcow2",
    ] {
        let image = Qcow2::open_path(dir.join(name)).unwrap();
        let reader = image.reader().unwrap();
        let ours: Vec<String> = reader
            .map(..)
            .map(|e| serde_json::to_string(&e.unwrap()).unwrap())
            .collect();
        // Same keys in the same order: compare the text once spaces are gone.
        let theirs = String::from_utf8(qemu.img(&dir, &["map", "--output=json", name])).unwrap();
        let theirs: String = theirs.chars().filter(|c| !c.is_whitespace()).collect();
        assert_eq!(format!("[{}]", ours.join(",")), theirs, "{name}");
    }
}

/// Time grows with what is allocated, not with the virtual size: an empty 16 TiB image maps
/// in a blink, and a 1 TiB image with 8192 scattered clusters (which has an L2 table for
/// nearly every 512 MiB, 128 MiB of tables to read) in a time of the order of qemu-img's.
#[test]
fn huge_sparse_images_map_fast() {
    let Some(qemu) = common::Qemu::find_or_skip("huge_sparse_images_map_fast") else {
        return;
    };
    let tmp = common::TempDir::new("map-huge");
    let dir = tmp.path();
    qemu.img(dir, &["create", "-q", "-f", "qcow2", "empty.qcow2", "16T"]);
    qemu.img(
        dir,
        &["create", "-q", "-f", "qcow2", "scattered.qcow2", "1T"],
    );
    let mut rng = common::Rng::new(10);
    let writes: Vec<String> = (0..8192)
        .map(|_| format!("write -P 9 {} 64k", rng.below(1 << 24) << 16))
        .collect();
    qemu.io(dir, "qcow2", "scattered.qcow2", &writes);
    for (name, most) in [("empty.qcow2", 1), ("scattered.qcow2", 2 * 8192 + 1)] {
        let started = std::time::Instant::now();
        let theirs = qemu_map(&qemu, dir, &[name]);
        let qemu_took = started.elapsed();
        let image = Qcow2::open_path(dir.join(name)).unwrap();
        let started = std::time::Instant::now();
        let ours = our_map(&image, 0..image.guest_size());
        let took = started.elapsed();
        assert!(ours.len() <= most, "{name}: {} extents", ours.len());
        // Generous: this is a debug build on a shared machine; a walk per cluster or per
        // byte of the guest would still be far over.
        let bound = qemu_took.as_secs_f64() * 10.0 + 2.0;
        assert!(
            took.as_secs_f64() < bound,
            "{name}: mapped in {took:?}, qemu-img in {qemu_took:?}"
        );
        assert_eq!(ours, theirs, "{name}: map differs");
    }
    // An empty image costs nothing per byte of its size.
    let image = Qcow2::open_path(dir.join("empty.qcow2")).unwrap();
    let started = std::time::Instant::now();
    assert_eq!(our_map(&image, 0..image.guest_size()).len(), 1);
    assert!(
        started.elapsed().as_secs_f64() < 1.0,
        "{:?}",
        started.elapsed()
    );
}
