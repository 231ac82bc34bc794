//! `ImageInfo::to_json()` against `qemu-img info --output=json`, field by field, for every
//! committed fixture the crate opens.

mod common;

use qcow2::Qcow2;
use serde_json::Value;

/// Fields that must be equal, as JSON pointers. Fields about the host file (`actual-size`,
/// `children`) and paths (`filename`, compared separately) are left out.
const FIELDS: &[&str] = &[
    "/virtual-size",
    "/cluster-size",
    "/format",
    "/dirty-flag",
    "/backing-filename",
    "/backing-filename-format",
    "/snapshots",
    "/format-specific/type",
    "/format-specific/data",
];

#[test]
fn to_json_matches_qemu_img_info() {
    let Some(qemu) = common::Qemu::find_or_skip("to_json_matches_qemu_img_info") else {
        return;
    };
    let dir = common::fixtures_dir();
    let mut compared = 0;
    for name in common::fixture_images().iter().map(String::as_str) {
        let image = match Qcow2::open_path(dir.join(name)) {
            // Encrypted images: tests/encryption.rs compares their `encrypt` fields.
            Ok(image) if image.encryption().is_some() => continue,
            Ok(image) => image,
            // Refused on purpose (corrupt, encrypted): covered by the API tests.
            Err(qcow2::Error::Corrupt | qcow2::Error::Encrypted { .. }) => continue,
            Err(e) => panic!("{name}: {e}"),
        };
        let ours: Value = serde_json::from_str(&image.info().to_json())
            .unwrap_or_else(|e| panic!("{name}: to_json is not JSON: {e}"));
        let theirs = qemu.info_json(&dir, name, false);
        for field in FIELDS {
            assert_eq!(
                ours.pointer(field),
                theirs.pointer(field),
                "{name}: {field} differs\nours:   {ours}\nqemu:   {theirs}"
            );
        }
        // Paths: qemu-img was run from fixtures/, we opened fixtures/NAME.
        let ends_with = |v: &Value, field: &str, tail: &str| {
            v.pointer(field)
                .and_then(Value::as_str)
                .is_some_and(|s| s.ends_with(tail))
        };
        assert!(ends_with(&ours, "/filename", name), "{name}: filename");
        if let Some(full) = theirs
            .pointer("/full-backing-filename")
            .and_then(Value::as_str)
        {
            assert!(
                ends_with(&ours, "/full-backing-filename", full),
                "{name}: full-backing-filename"
            );
        }
        compared += 1;
    }
    assert!(compared >= 25, "only {compared} fixtures compared");
}
