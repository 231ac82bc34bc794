//! `map` of an image with one misaligned L2 entry in a run of allocated ones (issue 19,
//! point 13): `qemu-img map` prints the extents before the bad entry, then its error, and so
//! must `qcow2 map` (human and JSON, stdout byte for byte and exit status), and
//! `Reader::map` must yield the same extents before its error.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::{Qemu, TempDir};
use positioned_io::ReadAt;
use qcow2::Qcow2;

/// A 4 MiB image, 64 KiB clusters: data at 0, 128k and 256k (one cluster each), a run of
/// eight clusters at 1M, one at 3M; then L2 entry `bad` (a cluster index) moved 512 bytes
/// off its cluster.
fn make(qemu: &Qemu, dir: &Path, name: &str, bad: usize) {
    qemu.img(dir, &["create", "-q", "-f", "qcow2", name, "4M"]);
    qemu.io(
        dir,
        "qcow2",
        name,
        &[
            "write -P 1 0 64k",
            "write -P 1 128k 64k",
            "write -P 1 256k 64k",
            "write -P 2 1M 512k",
            "write -P 3 3M 64k",
        ],
    );
    let path = dir.join(name);
    let mut b = std::fs::read(&path).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be64(&b, 40) as usize;
    let l2 = (be64(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let at = l2 + 8 * bad;
    let entry = be64(&b, at);
    assert_ne!(
        entry & 0x00ff_ffff_ffff_fe00,
        0,
        "cluster {bad} is allocated"
    );
    b[at..at + 8].copy_from_slice(&(entry + 0x200).to_be_bytes());
    std::fs::write(&path, &b).unwrap();
}

fn run(program: &Path, dir: &Path, args: &[&str]) -> (Vec<u8>, Option<i32>) {
    let out = Command::new(program)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    (out.stdout, out.status.code())
}

#[test]
fn extents_before_a_misaligned_entry_are_printed_as_qemu_img_prints_them() {
    let Some(qemu) =
        Qemu::find_or_skip("extents_before_a_misaligned_entry_are_printed_as_qemu_img_prints_them")
    else {
        return;
    };
    let tmp = TempDir::new("map-errors");
    let d = tmp.path();
    // The run at 1M is clusters 16-23: the bad entry in its middle, first and last; and the
    // lone clusters at 0 and 3M.
    for bad in [20, 16, 23, 0, 48] {
        let name = format!("bad-{bad}.qcow2");
        make(&qemu, d, &name, bad);
        let mut qemu_entries = 0;
        for output in ["--output=human", "--output=json"] {
            let theirs = run(&qemu.img, d, &["map", output, &name]);
            assert_eq!(theirs.1, Some(1), "{name} {output}: qemu-img fails");
            #[cfg(feature = "cli")]
            {
                let ours = run(
                    Path::new(env!("CARGO_BIN_EXE_qcow2")),
                    d,
                    &["map", output, &name],
                );
                assert_eq!(
                    String::from_utf8_lossy(&ours.0),
                    String::from_utf8_lossy(&theirs.0),
                    "{name} {output}: stdout"
                );
                assert_eq!(ours.1, theirs.1, "{name} {output}: exit status");
            }
            if output == "--output=json" {
                qemu_entries = String::from_utf8_lossy(&theirs.0)
                    .matches("\"start\"")
                    .count();
                // Compare the library's extents with qemu-img's entries, field by field.
                let text = String::from_utf8_lossy(&theirs.0).into_owned();
                let lines: Vec<serde_json::Value> = text
                    .trim_start_matches('[')
                    .lines()
                    .map(|l| serde_json::from_str(l.trim_end_matches(',')).unwrap())
                    .collect();
                let image = Qcow2::open_path(d.join(&name)).unwrap();
                let reader = image.reader().unwrap();
                let mut ours = Vec::new();
                let mut failed = false;
                for e in reader.map(..) {
                    match e {
                        Ok(e) => ours.push(serde_json::json!({
                            "start": e.start, "length": e.length, "depth": e.depth,
                            "present": e.present, "zero": e.zero, "data": e.data,
                            "compressed": e.compressed, "offset": e.offset,
                        })),
                        Err(e) => {
                            assert!(e.to_string().contains("aligned"), "{name}: {e}");
                            failed = true;
                        }
                    }
                }
                assert!(failed, "{name}: the library's map fails");
                // qemu-img prints an extent once it has the status after it; the library
                // yields it then too. (`offset` is left out of qemu-img's when there is none.)
                let ours: Vec<_> = ours
                    .into_iter()
                    .map(|mut v| {
                        if v["offset"].is_null() {
                            v.as_object_mut().unwrap().remove("offset");
                        }
                        v
                    })
                    .collect();
                assert_eq!(ours, lines, "{name}: library extents");
            }
        }
        eprintln!("{name}: qemu-img prints {qemu_entries} JSON entries");
        if bad == 20 {
            assert_eq!(
                qemu_entries, 6,
                "{name}: the hole before the run is printed"
            );
        }
        // A read across the bad entry still fails.
        let image = Qcow2::open_path(d.join(&name)).unwrap();
        let mut buf = vec![0u8; 4 << 20];
        assert!(
            image.reader().unwrap().read_exact_at(0, &mut buf).is_err(),
            "{name}"
        );
    }
}
