//! `Reader::extent_at` against `qemu-img map --output=json`, on every committed fixture that
//! has no backing file (a backing layer would show in QEMU's map with a depth).

mod common;

use qcow2::{ExtentKind, Qcow2};
use serde_json::Value;

/// An extent as both sides can say it: (start, length, kind).
type Entry = (u64, u64, ExtentKind);

/// Merge neighbours stored the same way (QEMU and the crate cut extents at different places).
fn merged(entries: impl IntoIterator<Item = Entry>) -> Vec<Entry> {
    let mut out: Vec<Entry> = Vec::new();
    for (start, length, kind) in entries {
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
        ExtentKind::Unallocated
    } else if flag("compressed") {
        ExtentKind::Compressed
    } else if flag("zero") && !flag("data") {
        ExtentKind::Zero
    } else {
        ExtentKind::Data {
            host_offset: e["offset"].as_u64().expect("data extent without offset"),
        }
    }
}

#[test]
fn extents_match_qemu_img_map() {
    let Some(qemu) = common::Qemu::find_or_skip("extents_match_qemu_img_map") else {
        return;
    };
    let dir = common::fixtures_dir();
    let mut compared = 0;
    for name in common::fixture_images()
        .iter()
        .map(String::as_str)
        // Preallocated clusters: QEMU looks into the file for holes and reports those as
        // zeros, a property of the host file rather than of the image.
        .filter(|n| !n.starts_with("prealloc-"))
    {
        let image = match Qcow2::open_path(dir.join(name)) {
            // Encrypted images: qemu-img map needs the secret, and hides host offsets.
            Ok(image) if image.encryption().is_some() => continue,
            Ok(image) if image.header().backing_file().is_none() => image,
            _ => continue,
        };
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
        let theirs: Value = serde_json::from_slice(&out).unwrap();
        let theirs = theirs.as_array().unwrap().iter().map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                qemu_kind(e),
            )
        });
        assert_eq!(merged(ours), merged(theirs), "{name}: map differs");
        compared += 1;
    }
    assert!(compared >= 15, "only {compared} fixtures compared");
}
