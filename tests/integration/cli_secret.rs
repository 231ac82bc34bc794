//! Secrets that are not UTF-8 text, given to `qcow2` and to `qemu-img` side by side: QEMU
//! takes an image's passphrase as UTF-8 (`qcrypto_secret_lookup_as_utf8`) and refuses the
//! rest ("Data from secret sec0 is not valid UTF-8"), NUL bytes included; `qcow2` refuses
//! them too rather than cut the secret at its first NUL.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use common::{Qemu, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_qcow2");

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Whether `qemu-img convert` opens `image` with the secret object `object`, and its stderr.
fn qemu_img(qemu: &Qemu, dir: &Path, object: &str, image: &str) -> (bool, String) {
    let out = output(
        Command::new(&qemu.img)
            .current_dir(dir)
            .args(["convert", "-O", "raw", "--object", object, "--image-opts"])
            .arg(format!(
                "driver=qcow2,file.filename={image},encrypt.key-secret=sec0"
            ))
            .arg("theirs.raw"),
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether `qcow2 convert` opens `image` with `secret_args`, and its stderr.
fn ours(dir: &Path, secret_args: &[&str], image: &str) -> (bool, String) {
    let out = output(
        Command::new(BIN)
            .current_dir(dir)
            .arg("convert")
            .args(secret_args)
            .args([image, "ours.raw"]),
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn secrets_that_are_not_utf8_are_refused_as_qemu_img_refuses_them() {
    let Some(qemu) =
        Qemu::find_or_skip("secrets_that_are_not_utf8_are_refused_as_qemu_img_refuses_them")
    else {
        return;
    };
    let tmp = TempDir::new("cli-secret-utf8");
    let dir = tmp.path();
    qemu.img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,data=abc",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            "luks.qcow2",
            "1M",
        ],
    );
    // (file name, bytes, valid UTF-8 text without NUL)
    let files: &[(&str, &[u8], bool)] = &[
        ("good.key", b"abc", true),
        ("nul-first.key", b"\0abc", false), // was an empty passphrase
        ("nul-after.key", b"abc\0", false), // was "abc": unlocked the image
        ("invalid.key", b"ab\xffc", false),
        ("surrogate.key", b"\xed\xa0\x80", false), // UTF-8 has no surrogates
        ("newline.key", b"abc\n", true),           // text, but the wrong secret
        ("nonchar.key", b"\xef\xbf\xbe", true),    // U+FFFE is valid UTF-8
    ];
    for &(name, bytes, text) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
        let object = format!("secret,id=sec0,file={name}");
        let (qemu_ok, qemu_err) = qemu_img(&qemu, dir, &object, "luks.qcow2");
        let by_object = ours(dir, &["--object", &object], "luks.qcow2");
        let by_file = ours(dir, &["--secret-file", name], "luks.qcow2");
        let opened = name == "good.key";
        assert_eq!(qemu_ok, opened, "{name}: qemu-img: {qemu_err}");
        for (how, (ok, err)) in [("--object", &by_object), ("--secret-file", &by_file)] {
            assert_eq!(*ok, opened, "{name} by {how}: {err}");
            if !text {
                assert!(
                    qemu_err.contains("is not valid UTF-8"),
                    "{name}: {qemu_err}"
                );
                assert!(err.contains("not valid UTF-8"), "{name} by {how}: {err}");
            } else if !opened {
                assert!(!qemu_err.contains("UTF-8"), "{name}: {qemu_err}");
                assert!(err.contains("wrong secret"), "{name} by {how}: {err}");
            }
        }
    }
    // format=base64 decodes to bytes, which must be text too (0xff is not).
    for (data, text) in [("/w==", false), ("YWJj", true)] {
        let object = format!("secret,id=sec0,data={data},format=base64");
        let (qemu_ok, qemu_err) = qemu_img(&qemu, dir, &object, "luks.qcow2");
        let (ok, err) = ours(dir, &["--object", &object], "luks.qcow2");
        assert_eq!(qemu_ok, text, "{data}: qemu-img: {qemu_err}");
        assert_eq!(ok, text, "{data}: {err}");
        if !text {
            assert!(qemu_err.contains("is not valid UTF-8"), "{qemu_err}");
            assert!(err.contains("not valid UTF-8"), "{err}");
        }
    }
    // An image that is not encrypted never looks at the secret, in QEMU either.
    qemu.img(dir, &["create", "-q", "-f", "qcow2", "plain.qcow2", "1M"]);
    let object = "secret,id=sec0,file=nul-first.key";
    assert!(qemu_img(&qemu, dir, object, "plain.qcow2").0);
    let (ok, err) = ours(dir, &["--object", object], "plain.qcow2");
    assert!(ok, "{err}");
}
