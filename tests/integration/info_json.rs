//! The library's `qemu-img info` against QEMU's, for every committed fixture and for fresh
//! images made by `qemu-img` (see `info_cases`): [`ImageInfo::to_json`] byte for byte and as
//! parsed JSON, [`ImageInfo::to_human`] line for line, [`ImageInfo::snapshot_list`], and the
//! `--backing-chain` forms. QEMU runs with `TZ=UTC`; dates here are printed in UTC.

use crate::common;
use crate::info_cases;

use qcow2::{Error, ImageInfo, OpenOptions, Qcow2};
use serde_json::Value;

use info_cases::{text_difference, Case};

const UTC: &dyn Fn(i64) -> i64 = &|_| 0;

/// Every difference between the crate and QEMU for `case`.
fn differences(qemu: &common::Qemu, case: &Case) -> Vec<String> {
    let mut found = Vec::new();
    let check = |what: &str, ours: &str, theirs: &str| {
        text_difference(ours, theirs).map(|d| format!("{}: {what}: {d}", case.label))
    };
    let options = OpenOptions::default();
    let info = match ImageInfo::from_path(&case.image, &options) {
        Ok(info) => info,
        Err(e) => return vec![format!("{}: from_path: {e}", case.label)],
    };
    let qemu_json = info_cases::qemu_json(qemu, &case.image, false);
    found.extend(check("to_json", &(info.to_json() + "\n"), &qemu_json));
    let theirs: Value = serde_json::from_str(&qemu_json).expect("qemu-img JSON");
    let ours = serde_json::to_value(&info).expect("serializing ImageInfo");
    if ours != theirs {
        found.push(format!(
            "{}: serde value differs:\nours {ours}\nqemu {theirs}",
            case.label
        ));
    }
    found.extend(check(
        "to_human",
        &info.to_human(),
        &info_cases::qemu_human(qemu, &case.image, false),
    ));
    if case.files_present {
        found.extend(check(
            "snapshot_list",
            &info.snapshot_list(UTC),
            &info_cases::qemu_snapshots(qemu, &case.image),
        ));
    }
    if case.chain {
        match ImageInfo::chain_from_path(&case.image, &options) {
            Ok(chain) => {
                found.extend(check(
                    "chain_to_json",
                    &(ImageInfo::chain_to_json(&chain) + "\n"),
                    &info_cases::qemu_json(qemu, &case.image, true),
                ));
                found.extend(check(
                    "chain_to_human",
                    &ImageInfo::chain_to_human(&chain, UTC),
                    &info_cases::qemu_human(qemu, &case.image, true),
                ));
            }
            Err(e) => found.push(format!("{}: chain_from_path: {e}", case.label)),
        }
    }
    if case.chain && case.files_present {
        // An image opened with its chain reports the same as one opened alone.
        match Qcow2::open_path(&case.image) {
            Ok(image) => found.extend(check(
                "Qcow2::info",
                &image.info().to_json(),
                &info.to_json(),
            )),
            // An image with the corrupt bit is shown, but not opened to be read.
            Err(Error::Corrupt) => {}
            Err(e) => found.push(format!("{}: open_path: {e}", case.label)),
        }
    }
    found
}

fn assert_no_differences(test: &str, qemu: &common::Qemu, cases: &[Case], least: usize) {
    let failures: Vec<String> = cases.iter().flat_map(|c| differences(qemu, c)).collect();
    assert!(
        failures.is_empty(),
        "{test}: {} difference(s):\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(cases.len() >= least, "only {} cases", cases.len());
    eprintln!("{test}: {} images equal to qemu-img's", cases.len());
}

#[test]
fn fixtures_match_qemu_img_info() {
    let Some(qemu) = common::Qemu::find_or_skip("fixtures_match_qemu_img_info") else {
        return;
    };
    let (cases, refused) = info_cases::fixture_cases();
    assert_no_differences("fixtures_match_qemu_img_info", &qemu, &cases, 25);
    // The crate refuses these on open (QEMU shows the corrupt one, and needs a key for the
    // encrypted ones): a clear error, not a wrong report.
    for image in refused {
        match ImageInfo::from_path(&image, &OpenOptions::default()) {
            Err(Error::Corrupt | Error::Encrypted { .. }) => {}
            other => panic!("{}: expected a refusal, got {other:?}", image.display()),
        }
    }
}

#[test]
fn fresh_images_match_qemu_img_info() {
    let Some(qemu) = common::Qemu::find_or_skip("fresh_images_match_qemu_img_info") else {
        return;
    };
    let dir = common::TempDir::new("info");
    let cases = info_cases::fresh_cases(&qemu, &dir);
    assert_no_differences("fresh_images_match_qemu_img_info", &qemu, &cases, 25);
}

#[test]
fn backing_chain_loops_and_missing_files_are_errors() {
    let Some(qemu) = common::Qemu::find_or_skip("backing_chain_loops_are_errors") else {
        return;
    };
    let dir = common::TempDir::new("info-loop");
    let d = dir.path();
    let create = |name: &str, backing: &str| {
        qemu.img(
            d,
            &[
                "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", name, "1M",
            ],
        );
    };
    create("a.qcow2", "b.qcow2");
    create("b.qcow2", "a.qcow2");
    create("self.qcow2", "./self.qcow2");
    create("orphan.qcow2", "gone.qcow2");
    let options = OpenOptions::default();
    for name in ["a.qcow2", "self.qcow2"] {
        // QEMU refuses these too ("Backing file ... creates an infinite loop").
        assert!(info_cases::qemu_img_utc(
            &qemu,
            d,
            &["info", "--backing-chain", d.join(name).to_str().unwrap()]
        )
        .is_err());
        match ImageInfo::chain_from_path(d.join(name), &options) {
            Err(Error::BackingChain { .. }) => {}
            other => panic!("{name}: expected a backing chain error, got {other:?}"),
        }
        // Alone, each image still reports like qemu-img.
        let info = ImageInfo::from_path(d.join(name), &options).unwrap();
        assert_eq!(
            info.to_json() + "\n",
            info_cases::qemu_json(&qemu, &d.join(name), false)
        );
    }
    assert!(matches!(
        ImageInfo::chain_from_path(d.join("orphan.qcow2"), &options),
        Err(Error::Io { .. })
    ));
    assert!(matches!(
        ImageInfo::from_path(d.join("nothing-here.qcow2"), &options),
        Err(Error::Io { .. })
    ));
    std::fs::write(d.join("plain.raw"), [0u8; 4096]).unwrap();
    assert!(matches!(
        ImageInfo::from_path(d.join("plain.raw"), &options),
        Err(Error::NotQcow2 { .. })
    ));
}
