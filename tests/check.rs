//! `Qcow2::check` against `qemu-img check` (read-only, no `-r`): on every committed fixture,
//! on fresh images QEMU makes, and on images corrupted here byte by byte. For each image the
//! counts (the JSON fields), the problem lines (QEMU's stderr) and the exit status must be
//! QEMU's, and a check in many small windows must find exactly what a one-window check finds.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Qemu, TempDir};
use qcow2::{CheckOptions, CheckReport, OpenOptions, Qcow2};
use serde_json::{json, Map, Value};

/// What `qemu-img check --output=json` said about an image.
struct QemuCheck {
    /// The JSON, or `None` when the check failed (nothing on stdout).
    json: Option<Value>,
    /// Its stderr lines, less qemu-img's own `qemu-img: ...` messages.
    problems: Vec<String>,
    status: i32,
}

fn qemu_check(qemu: &Qemu, dir: &Path, name: &str) -> QemuCheck {
    let out = Command::new(&qemu.img)
        .current_dir(dir)
        .args(["check", "--output=json", name])
        .output()
        .expect("running qemu-img check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = (!stdout.trim().is_empty()).then(|| {
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("qemu-img JSON: {e}\n{stdout}"))
    });
    QemuCheck {
        json,
        problems: String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| !l.starts_with("qemu-img:"))
            .map(str::to_owned)
            .collect(),
        status: out.status.code().expect("qemu-img exited by signal"),
    }
}

/// The report as qemu-img's JSON, built field by field (zero counts left out, as qemu-img
/// leaves them out), so the comparison does not depend on the crate's serializer.
fn report_json(r: &CheckReport) -> Value {
    let mut m = Map::new();
    m.insert("filename".into(), json!(r.filename));
    m.insert("format".into(), json!(r.format));
    m.insert("check-errors".into(), json!(r.check_errors));
    for (key, n) in [
        ("image-end-offset", r.image_end_offset),
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("corruptions-fixed", r.corruptions_fixed),
        ("leaks-fixed", r.leaks_fixed),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ] {
        if n != 0 {
            m.insert(key.into(), json!(n));
        }
    }
    Value::Object(m)
}

fn problem_lines(r: &CheckReport) -> Vec<String> {
    r.problems
        .iter()
        .flat_map(|p| p.to_string().lines().map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

/// Check `dir/name` with the crate and with qemu-img; everything must agree.
/// Returns the crate's report, or `None` when both checks failed.
fn assert_same_as_qemu(qemu: &Qemu, dir: &Path, name: &str) -> Option<CheckReport> {
    let q = qemu_check(qemu, dir, name);
    let options = OpenOptions::new().backing_as_zeros(true);
    let image = Qcow2::open_path_with(dir.join(name), &options)
        .unwrap_or_else(|e| panic!("{name}: open failed: {e}"));
    let result = image.check();
    let Some(qemu_json) = q.json else {
        assert!(
            result.is_err(),
            "{name}: qemu-img check failed (status {}), the crate's check passed: {result:?}",
            q.status
        );
        assert_eq!(q.status, 1, "{name}: qemu-img status");
        return None;
    };
    let mut report = result.unwrap_or_else(|e| panic!("{name}: check failed: {e}"));
    report.filename = name.to_owned();
    assert_eq!(
        report_json(&report),
        qemu_json,
        "{name}: counts differ from qemu-img"
    );
    #[cfg(feature = "serde")]
    assert_eq!(
        serde_json::to_value(&report).unwrap(),
        qemu_json,
        "{name}: serialized report differs from qemu-img's JSON"
    );
    assert_eq!(
        problem_lines(&report),
        q.problems,
        "{name}: problem lines differ from qemu-img's stderr"
    );
    assert_eq!(
        i32::from(report.exit_status()),
        q.status,
        "{name}: exit status"
    );
    // Many small windows (several passes over the metadata) find exactly the same.
    for budget in [1, 24, 4096] {
        let mut options = CheckOptions::default();
        options.memory_budget = budget;
        let mut windowed = image.check_with(&options).expect("windowed check");
        windowed.filename = name.to_owned();
        assert_eq!(
            windowed, report,
            "{name}: check with a {budget}-byte budget differs"
        );
    }
    Some(report)
}

#[test]
fn every_fixture_checks_as_qemu_img_checks_it() {
    let Some(qemu) = Qemu::find_or_skip("every_fixture_checks_as_qemu_img_checks_it") else {
        return;
    };
    let dir = common::fixtures_dir();
    let mut checked = 0;
    for name in common::fixture_images() {
        let options = OpenOptions::new().backing_as_zeros(true);
        match Qcow2::open_path_with(dir.join(&name), &options) {
            Ok(_) => {
                assert_same_as_qemu(&qemu, &dir, &name);
                checked += 1;
            }
            // Encrypted images and the corrupt bit are refused on open (the CLI checks the
            // corrupt one; qemu-img cannot open the encrypted ones without their key either).
            Err(e) => assert!(
                ["luks.qcow2", "aes.qcow2", "v3-corrupt.qcow2"].contains(&name.as_str()),
                "{name}: {e}"
            ),
        }
    }
    assert!(checked >= 25, "only {checked} fixtures checked");
}

// ---------------------------------------------------------------------------------------------
// Fresh images made by QEMU.

/// One way to make an image: `qemu-img create` options and size, then steps.
struct Fresh {
    name: &'static str,
    create: &'static [&'static str],
    size: &'static str,
    steps: &'static [Step],
}

enum Step {
    /// `qemu-io` commands, one open.
    Io(&'static [&'static str]),
    /// `qemu-io` commands, then the process is killed (a crash: a dirty image).
    Crash(&'static [&'static str]),
    /// A `qemu-img` command; the image name is appended.
    Img(&'static [&'static str]),
}

const FRESH: &[Fresh] = &[
    Fresh {
        name: "writes",
        create: &[],
        size: "8M",
        steps: &[Step::Io(&[
            "write -P 1 0 64k",
            "write -P 2 1M 192k",
            "write -P 3 100k 3k",
            "write 7M 4k",
        ])],
    },
    Fresh {
        name: "discards",
        create: &["-o", "cluster_size=4096"],
        size: "2M",
        steps: &[Step::Io(&[
            "write -P 5 0 1M",
            "discard 64k 128k",
            "write -z 512k 64k",
            "write -z -u 600k 8k",
            "write -P 6 1536k 64k",
        ])],
    },
    Fresh {
        name: "snapshots",
        create: &["-o", "cluster_size=8192"],
        size: "4M",
        steps: &[
            Step::Io(&["write -P 1 0 256k", "write -c -P 4 1M 64k"]),
            Step::Img(&["snapshot", "-c", "s1"]),
            Step::Io(&["write -P 2 64k 64k", "discard 128k 64k"]),
            Step::Img(&["snapshot", "-c", "s2"]),
            Step::Io(&["write -P 3 0 8k", "write 3M 64k"]),
            Step::Img(&["snapshot", "-d", "s1"]),
        ],
    },
    Fresh {
        name: "compressed",
        create: &["-o", "cluster_size=4096"],
        size: "1M",
        steps: &[Step::Io(&[
            "write -c -P 1 0 64k",
            "write -c 128k 4k",
            "write -P 2 4k 4k",
            "write -c -P 3 256k 128k",
        ])],
    },
    Fresh {
        name: "zstd",
        create: &["-o", "compression_type=zstd"],
        size: "1M",
        steps: &[Step::Io(&["write -c -P 7 0 256k", "write -P 8 64k 4k"])],
    },
    Fresh {
        name: "bitmaps",
        create: &[],
        size: "16M",
        steps: &[
            Step::Img(&["bitmap", "--add", "--granularity", "512"]),
            // qemu-img bitmap names the bitmap after the image; add a second one too.
            Step::Io(&["write -P 1 0 1M", "write 8M 64k"]),
        ],
    },
    Fresh {
        name: "cluster512",
        create: &["-o", "cluster_size=512"],
        size: "2M",
        steps: &[Step::Io(&[
            "write -P 1 0 40k",
            "write -P 2 100000 3000",
            "write -c 1M 1k",
            "discard 8k 2k",
        ])],
    },
    Fresh {
        name: "refcount1",
        create: &["-o", "refcount_bits=1,cluster_size=4096"],
        size: "1M",
        steps: &[Step::Io(&["write -P 1 0 100k", "discard 8k 8k"])],
    },
    Fresh {
        name: "refcount64",
        create: &["-o", "refcount_bits=64,cluster_size=4096"],
        size: "1M",
        steps: &[
            Step::Io(&["write -P 1 0 100k"]),
            Step::Img(&["snapshot", "-c", "s1"]),
            Step::Io(&["write -P 2 0 8k"]),
        ],
    },
    Fresh {
        name: "extended_l2",
        create: &["-o", "extended_l2=on,cluster_size=65536"],
        size: "4M",
        steps: &[Step::Io(&[
            "write -P 1 0 3k",
            "write -P 2 70k 2k",
            "write -z 128k 8k",
            "write -z 300k 64k",
            "discard 0 2k",
        ])],
    },
    Fresh {
        name: "v2",
        create: &["-o", "compat=0.10"],
        size: "4M",
        steps: &[
            Step::Io(&["write -P 1 0 128k"]),
            Step::Img(&["snapshot", "-c", "s1"]),
            Step::Io(&["write -P 2 0 64k"]),
        ],
    },
    Fresh {
        name: "prealloc_metadata",
        create: &["-o", "preallocation=metadata,cluster_size=4096"],
        size: "512k",
        steps: &[Step::Io(&["write -P 1 4k 8k", "write -z 64k 64k"])],
    },
    Fresh {
        // Lazy refcounts, then a crash: QEMU's read-only check reports what it finds.
        name: "lazy_refcounts_crash",
        create: &["-o", "lazy_refcounts=on,cluster_size=4096"],
        size: "1M",
        steps: &[
            Step::Io(&["write -P 1 0 16k"]),
            Step::Crash(&["write -P 2 64k 64k", "write -P 3 512k 4k"]),
        ],
    },
];

fn make(qemu: &Qemu, dir: &Path, fresh: &Fresh) -> String {
    let name = format!("{}.qcow2", fresh.name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(fresh.create);
    args.extend([name.as_str(), fresh.size]);
    qemu.img(dir, &args);
    for step in fresh.steps {
        match step {
            Step::Io(cmds) => qemu.io(dir, "qcow2", &name, cmds),
            Step::Crash(cmds) => qemu.io_crash(dir, "qcow2", &name, cmds),
            Step::Img(args) => {
                let mut args = args.to_vec();
                args.push(&name);
                if args[0] == "bitmap" {
                    args.push("b0");
                }
                qemu.img(dir, &args);
            }
        }
    }
    name
}

#[test]
fn fresh_images_check_as_qemu_img_checks_them() {
    let Some(qemu) = Qemu::find_or_skip("fresh_images_check_as_qemu_img_checks_them") else {
        return;
    };
    let tmp = TempDir::new("check-fresh");
    for fresh in FRESH {
        let name = make(&qemu, tmp.path(), fresh);
        let report = assert_same_as_qemu(&qemu, tmp.path(), &name)
            .unwrap_or_else(|| panic!("{name}: qemu-img check failed"));
        match fresh.name {
            "lazy_refcounts_crash" => assert!(!report.is_clean(), "the crash left no trace"),
            "compressed" | "zstd" => assert!(report.compressed_clusters > 0),
            _ => {}
        }
    }
}
