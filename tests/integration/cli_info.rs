//! `qcow2 info` and `qcow2 snapshot -l` against `qemu-img info` and `qemu-img snapshot -l`:
//! the same stdout, byte for byte (less `disk size:` and `actual-size` lines), for every
//! committed fixture and the fresh images of `info_cases`; local time zones; and failures
//! that are one line on stderr with a non-zero exit status.

use crate::common;
use crate::info_cases;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use info_cases::{text_difference, Case};

/// Run `qcow2 ARGS` with `TZ=tz`.
fn qcow2(args: &[&str], tz: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qcow2"))
        .env("TZ", tz)
        .args(args)
        .output()
        .expect("running the qcow2 binary")
}

/// Its stdout, or a description of its failure.
fn qcow2_stdout(args: &[&str], tz: &str) -> Result<String, String> {
    let out = qcow2(args, tz);
    if out.status.success() && out.stderr.is_empty() {
        String::from_utf8(out.stdout).map_err(|e| format!("{args:?}: stdout is not UTF-8: {e}"))
    } else {
        Err(format!(
            "{args:?}: {}, stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Every difference between `qcow2` and `qemu-img` for `case`.
fn differences(qemu: &common::Qemu, case: &Case) -> Vec<String> {
    let image = path_str(&case.image);
    let mut runs: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["info", image],
            info_cases::qemu_human(qemu, &case.image, false),
        ),
        (
            vec!["info", "--output=human", "-f", "qcow2", image],
            info_cases::qemu_human(qemu, &case.image, false),
        ),
        (
            vec!["info", "--output=json", image],
            info_cases::qemu_json(qemu, &case.image, false),
        ),
    ];
    if case.chain {
        runs.push((
            vec!["info", "--backing-chain", image],
            info_cases::qemu_human(qemu, &case.image, true),
        ));
        runs.push((
            vec!["info", "--output", "json", "--backing-chain", image],
            info_cases::qemu_json(qemu, &case.image, true),
        ));
    }
    if case.files_present {
        runs.push((
            vec!["snapshot", "-l", image],
            info_cases::qemu_snapshots(qemu, &case.image),
        ));
    }
    runs.into_iter()
        .filter_map(|(args, theirs)| match qcow2_stdout(&args, "UTC") {
            Ok(ours) => text_difference(&ours, &theirs)
                .map(|d| format!("{}: qcow2 {}: {d}", case.label, args.join(" "))),
            Err(e) => Some(format!("{}: {e}", case.label)),
        })
        .collect()
}

fn assert_same_output(test: &str, qemu: &common::Qemu, cases: &[Case], least: usize) {
    let failures: Vec<String> = cases.iter().flat_map(|c| differences(qemu, c)).collect();
    assert!(
        failures.is_empty(),
        "{test}: {} difference(s):\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(cases.len() >= least, "only {} cases", cases.len());
    eprintln!(
        "{test}: qcow2 printed what qemu-img prints for {} images",
        cases.len()
    );
}

#[test]
fn cli_matches_qemu_img_on_fixtures() {
    let Some(qemu) = common::Qemu::find_or_skip("cli_matches_qemu_img_on_fixtures") else {
        return;
    };
    let (cases, _) = info_cases::fixture_cases();
    assert_same_output("cli_matches_qemu_img_on_fixtures", &qemu, &cases, 25);
}

#[test]
fn cli_matches_qemu_img_on_fresh_images() {
    let Some(qemu) = common::Qemu::find_or_skip("cli_matches_qemu_img_on_fresh_images") else {
        return;
    };
    let dir = common::TempDir::new("cli-info");
    let cases = info_cases::fresh_cases(&qemu, &dir);
    assert_same_output("cli_matches_qemu_img_on_fresh_images", &qemu, &cases, 25);
}

/// Snapshot dates in local time, as `qemu-img` prints them, across a DST change.
#[test]
fn snapshot_dates_are_local_time() {
    let Some(qemu) = common::Qemu::find_or_skip("snapshot_dates_are_local_time") else {
        return;
    };
    let dir = common::TempDir::new("cli-tz");
    let d = dir.path();
    qemu.img(d, &["create", "-q", "-f", "qcow2", "tz.qcow2", "1M"]);
    let image = d.join("tz.qcow2");
    // 2024-01-15 12:00:00 UTC (winter), 2024-07-15 12:00:00 UTC (summer), the epoch.
    for (index, date) in [1_705_320_000u32, 1_721_044_800, 0].into_iter().enumerate() {
        qemu.img(d, &["snapshot", "-c", &format!("at-{date}"), "tz.qcow2"]);
        info_cases::patch_snapshot(
            &image,
            index,
            info_cases::SnapshotPatch {
                date_sec: date,
                date_nsec: 0,
                vm_clock_nsec: 0,
                vm_state_size: 0,
                icount: None,
            },
        );
    }
    let mut compared = 0;
    // POSIX rules need no time zone database; the named zones are used when installed.
    for tz in [
        "UTC",
        "XYZ-9",
        "EST5EDT,M3.2.0,M11.1.0",
        "America/New_York",
        "Australia/Lord_Howe",
    ] {
        if tz.contains('/') && !Path::new("/usr/share/zoneinfo").join(tz).exists() {
            eprintln!("snapshot_dates_are_local_time: no zone {tz} here, not compared");
            continue;
        }
        for args in [
            &["snapshot", "-l", path_str(&image)][..],
            &["info", path_str(&image)][..],
        ] {
            let theirs = Command::new(&qemu.img)
                .env("TZ", tz)
                .args(args)
                .output()
                .expect("running qemu-img");
            let theirs: String = String::from_utf8(theirs.stdout)
                .unwrap()
                .lines()
                .filter(|l| !l.starts_with("disk size:") && !l.starts_with("    disk size:"))
                .map(|l| format!("{l}\n"))
                .collect();
            let ours = qcow2_stdout(args, tz).unwrap();
            if let Some(d) = text_difference(&ours, &theirs) {
                panic!("TZ={tz} {args:?}: {d}");
            }
            compared += 1;
        }
    }
    assert!(compared >= 6);
}

/// A failure is one line on stderr starting `qcow2: `, nothing on stdout, exit status 1.
fn assert_one_line_failure(args: &[&str]) {
    let out = qcow2(args, "UTC");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?} printed on stdout");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr:?}");
    assert!(stderr.starts_with("qcow2: "), "{args:?}: {stderr:?}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr:?}");
}

#[test]
fn failures_are_one_line() {
    let Some(qemu) = common::Qemu::find_or_skip("failures_are_one_line") else {
        return;
    };
    let dir = common::TempDir::new("cli-fail");
    let d = dir.path();
    let p = |name: &str| path_str(&d.join(name)).to_owned();
    std::fs::write(d.join("disk.raw"), vec![0u8; 65536]).unwrap();
    std::fs::write(d.join("empty"), b"").unwrap();
    std::fs::write(d.join("short.qcow2"), b"QFI\xfb\0\0\0\x03").unwrap();
    for (name, backing) in [
        ("a.qcow2", "b.qcow2"),
        ("b.qcow2", "a.qcow2"),
        ("orphan.qcow2", "gone.qcow2"),
    ] {
        qemu.img(
            d,
            &[
                "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2", name, "1M",
            ],
        );
    }
    let fixtures = common::fixtures_dir();
    let fixture = |name: &str| path_str(&fixtures.join(name)).to_owned();
    let missing = p("missing.qcow2");
    let cases: Vec<Vec<String>> = vec![
        vec!["info".into(), missing.clone()],
        vec!["info".into(), "--output=json".into(), missing.clone()],
        vec!["snapshot".into(), "-l".into(), missing],
        vec!["info".into(), path_str(d).to_owned()],
        vec!["info".into(), p("disk.raw")],
        vec!["info".into(), p("empty")],
        vec!["info".into(), p("short.qcow2")],
        vec!["snapshot".into(), "-l".into(), p("disk.raw")],
        vec!["info".into(), "--backing-chain".into(), p("a.qcow2")],
        vec!["info".into(), "--backing-chain".into(), p("orphan.qcow2")],
        vec!["snapshot".into(), "-l".into(), fixture("aes.qcow2")],
    ];
    for args in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_one_line_failure(&args);
    }
    // qemu-img agrees these are failures (it shows the corrupt image, and the raw file as raw).
    for image in [p("missing.qcow2"), p("a.qcow2")] {
        let out = Command::new(&qemu.img)
            .args(["info", "--backing-chain", &image])
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "qemu-img info {image} succeeded");
    }
    // Usage errors are clap's (several lines), with qemu-img's exit status 1.
    for args in [
        &["info", "-f", "raw", "x.qcow2"][..],
        &["info", "--output=xml", "x.qcow2"][..],
        &["snapshot", "x.qcow2"][..],
        &["info"][..],
    ] {
        let out = qcow2(args, "UTC");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
    }
}

/// An image with the corrupt bit is shown as qemu-img shows it (`corrupt: true`, byte for
/// byte in the fixture cases), by `ImageInfo::from_path` too; its data stays refused.
#[test]
fn corrupt_bit_is_shown_not_read() {
    let image = common::fixtures_dir().join("v3-corrupt.qcow2");
    let info = qcow2::ImageInfo::from_path(&image, &Default::default()).unwrap();
    assert_eq!(info.qcow2().and_then(|q| q.corrupt), Some(true));
    let image = path_str(&image);
    let human = qcow2_stdout(&["info", image], "UTC").unwrap();
    assert!(human.contains("\n    corrupt: true\n"), "{human}");
    let json = qcow2_stdout(&["info", "--output=json", image], "UTC").unwrap();
    assert!(json.contains("\"corrupt\": true"), "{json}");
    let chain = qcow2_stdout(&["info", "--backing-chain", image], "UTC").unwrap();
    assert!(chain.contains("corrupt: true"), "{chain}");
    assert!(qcow2::Qcow2::open_path(image).is_err());
    for args in [&["map", image][..], &["convert", image, "-"][..]] {
        let out = qcow2(args, "UTC");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("corrupt"), "{args:?}: {stderr}");
    }
}
