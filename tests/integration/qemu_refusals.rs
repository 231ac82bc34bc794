//! Images QEMU refuses when it opens them, made by `qemu-img create` and patched, refused by
//! the crate for the same reason (issue 19, point 8); and their neighbours QEMU opens,
//! opened alike. The truth is `qemu-img info`: its exit status and its message.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::{Qemu, TempDir};
use qcow2::Qcow2;

/// `qemu-img create -f qcow2 -o compat=COMPAT NAME SIZE`, then `patches` (offset, bytes).
fn make(
    qemu: &Qemu,
    dir: &Path,
    name: &str,
    compat: &str,
    size: &str,
    patches: &[(usize, Vec<u8>)],
) {
    let opts = format!("compat={compat}");
    qemu.img(
        dir,
        &["create", "-q", "-f", "qcow2", "-o", &opts, name, size],
    );
    let path = dir.join(name);
    let mut bytes = std::fs::read(&path).unwrap();
    for (at, patch) in patches {
        bytes[*at..*at + patch.len()].copy_from_slice(patch);
    }
    std::fs::write(&path, &bytes).unwrap();
}

fn be32(v: u32) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

fn be64(v: u64) -> Vec<u8> {
    v.to_be_bytes().to_vec()
}

/// File offset of the end-of-extensions marker of a fresh v3 image.
fn end_marker(dir: &Path, name: &str) -> usize {
    let b = std::fs::read(dir.join(name)).unwrap();
    let mut at = u32::from_be_bytes(b[100..104].try_into().unwrap()) as usize;
    loop {
        let magic = u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
        let len = u32::from_be_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
        if magic == 0 {
            return at;
        }
        at += 8 + len.div_ceil(8) * 8;
    }
}

/// `qemu-img info NAME`: `None` when it opens the image, else its message.
fn qemu_verdict(qemu: &Qemu, dir: &Path, name: &str) -> Option<String> {
    let out = Command::new(&qemu.img)
        .current_dir(dir)
        .args(["info", name])
        .output()
        .unwrap();
    if out.status.success() {
        return None;
    }
    let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    Some(err)
}

/// (name, compat, size, patches, QEMU's message or `None` when it opens the image, what the
/// crate's message must contain).
type Case = (
    &'static str,
    &'static str,
    &'static str,
    Vec<(usize, Vec<u8>)>,
    Option<&'static str>,
    &'static str,
);

#[test]
fn refused_at_open_as_qemu_refuses() {
    let Some(qemu) = Qemu::find_or_skip("refused_at_open_as_qemu_refuses") else {
        return;
    };
    let tmp = TempDir::new("qemu-refusals");
    let d = tmp.path();
    make(&qemu, d, "probe.qcow2", "1.1", "1M", &[]);
    let end = end_marker(d, "probe.qcow2");
    let cases: Vec<Case> = vec![
        (
            "end-marker-length.qcow2",
            "1.1",
            "1M",
            vec![(end + 4, be32(0x10000))],
            Some("Header extension too large"),
            "too large",
        ),
        (
            "end-marker-length-fits.qcow2",
            "1.1",
            "1M",
            vec![(end + 4, be32(16))],
            None,
            "",
        ),
        (
            // The walk starts at byte 108: the padding is an end marker whose length is the
            // type of the first real extension.
            "header-length-108.qcow2",
            "1.1",
            "1M",
            vec![(100, be32(108))],
            Some("Header extension too large"),
            "too large",
        ),
        (
            // Version 3 feature fields after a version 2 header: to QEMU, extensions from
            // byte 72, the first an end marker of 65536 bytes.
            "v2-with-v3-fields.qcow2",
            "0.10",
            "1M",
            vec![(72, be64(0x10000)), (100, be32(112))],
            Some("Header extension too large"),
            "too large",
        ),
        (
            "no-snapshots-unaligned-offset.qcow2",
            "1.1",
            "1M",
            vec![(64, be64(0x10001))],
            Some("Snapshot table offset invalid"),
            "snapshot table offset invalid",
        ),
        (
            "no-snapshots-huge-offset.qcow2",
            "1.1",
            "1M",
            vec![(64, be64(1 << 63))],
            Some("Snapshot table offset invalid"),
            "snapshot table offset invalid",
        ),
        (
            "no-snapshots-big-aligned-offset.qcow2",
            "1.1",
            "1M",
            vec![(64, be64(0x7fff_ffff_ffff_0000))],
            None,
            "",
        ),
        (
            "empty-l1-unaligned-offset.qcow2",
            "1.1",
            "0",
            vec![(40, be64(0x30001))],
            Some("Active L1 table offset invalid"),
            "L1 table offset invalid",
        ),
        (
            "empty-l1-huge-offset.qcow2",
            "1.1",
            "0",
            vec![(40, be64(1 << 63))],
            Some("Active L1 table offset invalid"),
            "L1 table offset invalid",
        ),
        (
            "empty-l1-zero-offset.qcow2",
            "1.1",
            "0",
            vec![(40, be64(0))],
            None,
            "",
        ),
    ];
    for (name, compat, size, patches, qemu_says, we_say) in &cases {
        make(&qemu, d, name, compat, size, patches);
        let theirs = qemu_verdict(&qemu, d, name);
        match qemu_says {
            Some(says) => assert!(
                theirs.as_deref().is_some_and(|t| t.ends_with(says)),
                "{name}: qemu-img says {theirs:?}"
            ),
            None => assert_eq!(theirs, None, "{name}"),
        }
        let ours = Qcow2::open(std::fs::File::open(d.join(name)).unwrap());
        match (qemu_says, ours) {
            (None, Ok(_)) => {}
            (None, Err(e)) => panic!("{name}: QEMU opens it, the crate says {e}"),
            (Some(_), Ok(_)) => panic!("{name}: QEMU refuses it ({theirs:?}), the crate opens it"),
            (Some(_), Err(e)) => assert!(
                e.to_string().contains(we_say),
                "{name}: the crate says {e}, QEMU {theirs:?}"
            ),
        }
        #[cfg(feature = "cli")]
        {
            let out = Command::new(env!("CARGO_BIN_EXE_qcow2"))
                .current_dir(d)
                .args(["info", name])
                .output()
                .unwrap();
            assert_eq!(
                out.status.success(),
                qemu_says.is_none(),
                "{name}: qcow2 info"
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(we_say), "{name}: {err}");
        }
    }
}

/// An unknown incompatible bit is named from the image's feature table, which QEMU reads up
/// to the first extension that fails its checks: an end marker whose length does not fit,
/// after the table, does not lose the name.
#[test]
fn unknown_features_are_named_from_a_table_before_a_bad_extension() {
    let Some(qemu) =
        Qemu::find_or_skip("unknown_features_are_named_from_a_table_before_a_bad_extension")
    else {
        return;
    };
    let tmp = TempDir::new("qemu-refusals-features");
    let d = tmp.path();
    let name = "tenth.qcow2";
    make(&qemu, d, name, "1.1", "1M", &[]);
    let end = end_marker(d, name);
    let path = d.join(name);
    let mut b = std::fs::read(&path).unwrap();
    // Incompatible bit 10, named "tenth" by the table entry that named the dirty bit.
    b[78] |= 0x04;
    let mut at = 112;
    let mut renamed = false;
    while at < end {
        let magic = u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
        let len = u32::from_be_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
        if magic == 0x6803_f857 {
            for e in (at + 8..at + 8 + len).step_by(48) {
                if b[e] == 0 && b[e + 1] == 0 {
                    b[e + 1] = 10;
                    b[e + 2..e + 48].fill(0);
                    b[e + 2..e + 7].copy_from_slice(b"tenth");
                    renamed = true;
                }
            }
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    assert!(renamed, "the feature table names the dirty bit");
    b[end + 4..end + 8].copy_from_slice(&be32(0x10000));
    std::fs::write(&path, &b).unwrap();
    let theirs = qemu_verdict(&qemu, d, name);
    assert!(
        theirs
            .as_deref()
            .is_some_and(|t| t.ends_with("Unsupported qcow2 feature(s): tenth")),
        "{theirs:?}"
    );
    match Qcow2::open(std::fs::File::open(&path).unwrap()) {
        Ok(_) => panic!("QEMU refuses it ({theirs:?}), the crate opens it"),
        Err(e) => assert!(e.to_string().contains("(tenth)"), "the crate says {e}"),
    }
}
