//! File names that are not UTF-8 (issue 19, point 12). QEMU takes file names as bytes:
//! `qemu-img info` prints them as they are, its JSON shows each invalid sequence as one
//! `\uFFFD` (and `\xC0\x80` as `\u0000`), and `--backing-chain` opens the backing file by its
//! bytes. `qcow2 info` must print the same, byte for byte (less `disk size:` and
//! `actual-size`), and `ImageInfo::chain_from_path` must find every image.

use crate::common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use common::{Qemu, TempDir};
use qcow2::ImageInfo;

/// `t\xff.qcow2` -> `d\xe2\x82z/mid.qcow2` -> `d\xe2\x82z/b<odd bytes>.qcow2`: a cut
/// sequence in a directory name, and in the base's name a noncharacter, modified UTF-8's
/// NUL, a surrogate and a code point past U+10FFFF (each decoded differently by Rust's lossy
/// conversion and by QEMU).
const TOP: &[u8] = b"t\xff.qcow2";
const DIR: &[u8] = b"d\xe2\x82z";
const MID: &[u8] = b"d\xe2\x82z/mid.qcow2";
const BASE: &[u8] = b"b\xef\xb7\x90\xc0\x80\xed\xa0\x80\xf4\x90\x80\x80.qcow2";

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

fn make(qemu: &Qemu, d: &Path) {
    std::fs::create_dir(d.join(os(DIR))).unwrap();
    let sub = d.join(os(DIR));
    qemu.img(
        &sub,
        &[
            os(b"create"),
            os(b"-q"),
            os(b"-f"),
            os(b"qcow2"),
            os(BASE),
            os(b"1M"),
        ],
    );
    let overlay = |dir: &Path, backing: &[u8], name: &[u8]| {
        let args = [
            os(b"create"),
            os(b"-q"),
            os(b"-f"),
            os(b"qcow2"),
            os(b"-b"),
            os(backing),
            os(b"-F"),
            os(b"qcow2"),
            os(name),
        ];
        qemu.img(dir, &args);
    };
    overlay(&sub, BASE, b"mid.qcow2");
    overlay(d, MID, TOP);
}

/// stdout of `PROGRAM info [--backing-chain] --output=OUTPUT t\xff.qcow2`, less the lines
/// about the host file system; and the exit status.
fn info(program: &Path, d: &Path, chain: bool, output: &str) -> (Vec<u8>, Option<i32>) {
    let mut cmd = Command::new(program);
    cmd.current_dir(d).arg("info");
    if chain {
        cmd.arg("--backing-chain");
    }
    let out = cmd
        .arg(format!("--output={output}"))
        .arg(os(TOP))
        .output()
        .unwrap();
    let kept: Vec<&[u8]> = out
        .stdout
        .split_inclusive(|&b| b == b'\n')
        .filter(|l| {
            let l = String::from_utf8_lossy(l);
            !l.trim_start().starts_with("disk size:") && !l.contains("\"actual-size\"")
        })
        .collect();
    (kept.concat(), out.status.code())
}

#[test]
fn names_that_are_not_utf8_are_kept_as_bytes() {
    let Some(qemu) = Qemu::find_or_skip("names_that_are_not_utf8_are_kept_as_bytes") else {
        return;
    };
    let tmp = TempDir::new("info-names");
    let d = tmp.path();
    make(&qemu, d);

    // The library: the whole chain, names as stored and as QEMU's JSON shows them.
    let chain = ImageInfo::chain_from_path(d.join(os(TOP)), &Default::default()).unwrap();
    assert_eq!(chain.len(), 3);
    let top = &chain[0];
    assert_eq!(top.backing_filename_bytes.as_deref(), Some(MID));
    assert_eq!(
        top.backing_filename.as_deref(),
        Some("d\u{fffd}z/mid.qcow2")
    );
    let mid = &chain[1];
    assert_eq!(mid.backing_filename_bytes.as_deref(), Some(BASE));
    assert_eq!(
        mid.backing_filename.as_deref(),
        Some("b\u{fffd}\0\u{fffd}\u{fffd}.qcow2")
    );
    let base_path = [d.as_os_str().as_bytes(), b"/", DIR, b"/", BASE].concat();
    assert_eq!(chain[2].filename_bytes.as_deref(), Some(&base_path[..]));

    // `map` follows the chain and names the file that holds each extent, byte for byte.
    qemu.io(&d.join(os(DIR)), "qcow2", "mid.qcow2", &["write 64k 64k"]);
    let map = |program: &Path| {
        let out = Command::new(program)
            .current_dir(d)
            .arg("map")
            .arg(os(TOP))
            .output()
            .unwrap();
        (out.stdout, out.status.code())
    };
    let theirs = map(&qemu.img);
    assert_eq!(theirs.1, Some(0));
    assert!(theirs.0.windows(MID.len()).any(|w| w == MID));
    #[cfg(feature = "cli")]
    assert_eq!(map(Path::new(env!("CARGO_BIN_EXE_qcow2"))), theirs, "map");

    // The command against qemu-img, byte for byte.
    for chain in [false, true] {
        for output in ["human", "json"] {
            let theirs = info(&qemu.img, d, chain, output);
            assert_eq!(theirs.1, Some(0), "qemu-img info chain={chain} {output}");
            #[cfg(feature = "cli")]
            {
                let ours = info(Path::new(env!("CARGO_BIN_EXE_qcow2")), d, chain, output);
                assert_eq!(
                    ours,
                    theirs,
                    "chain={chain} {output}:\nours:\n{}\ntheirs:\n{}",
                    String::from_utf8_lossy(&ours.0),
                    String::from_utf8_lossy(&theirs.0)
                );
            }
        }
    }
}
