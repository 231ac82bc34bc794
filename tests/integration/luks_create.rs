//! `LuksOptions::set` against `qemu-img create -o encrypt.format=luks,encrypt.KEY=VALUE`: the
//! same names and values are refused, with qemu-img's message and the option named.
//! (Headers themselves are checked against QEMU in `src/crypt/create.rs`: raw LUKS volumes
//! made from them read identical under `qemu-img compare`.)

use std::time::Duration;

use qcow2::{Error, LuksOptions};

use crate::common::Env;

/// Refused by QEMU's option parsing, before any header is made.
const REFUSED: &[(&str, &str)] = &[
    ("cipher-alg", "bogus"),
    ("cipher-alg", "AES-256"),
    ("cipher-alg", "aes256"),
    ("cipher-mode", "XTS"),
    ("cipher-mode", ""),
    ("ivgen-alg", "plain32"),
    ("ivgen-hash-alg", "sha2"),
    ("hash-alg", "sha-256"),
    ("iter-time", "abc"),
    ("iter-time", "1k"),
    ("iter-time", ""),
    ("iter-time", "0x"),
    ("iter-time", "08"),
    ("iter-time", "18446744073709551616"),
    ("key-size", "32"),
    ("bogus", "1"),
];

/// qemu-img's message for `encrypt.KEY=VALUE`, without its `qemu-img: FILE: ` prefix.
fn qemu_img_says(env: &Env, key: &str, value: &str) -> String {
    let target = env.path("refused.qcow2");
    let out = std::process::Command::new(&env.qemu.img)
        .current_dir(env.dir.path())
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=x",
            "-o",
        ])
        .arg(format!(
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.{key}={value}"
        ))
        .arg(&target)
        .arg("1M")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{key}={value}: qemu-img took it"
    );
    assert!(!target.exists(), "{key}={value}: qemu-img left a file");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let prefix = format!("qemu-img: {}: ", target.display());
    stderr
        .trim_end()
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{key}={value}: unexpected qemu-img output {stderr:?}"))
        .to_owned()
}

#[test]
fn set_refuses_what_qemu_img_refuses_in_its_words() {
    let Some(env) = Env::new("luks_create_refusals") else {
        return;
    };
    for &(key, value) in REFUSED {
        let mut options = LuksOptions::new("x");
        let ours = match options.set(key, value) {
            Err(Error::InvalidOption { option, message }) => {
                assert_eq!(option, format!("encrypt.{key}"));
                message
            }
            other => panic!("{key}={value}: {other:?}"),
        };
        assert_eq!(ours, qemu_img_says(&env, key, value), "{key}={value}");
    }
}

#[test]
fn set_takes_every_value_qemu_names() {
    let mut options = LuksOptions::new("x").iter_time(Duration::from_millis(10));
    let values: &[(&str, &[&str])] = &[
        (
            "cipher-alg",
            &[
                "aes-128",
                "aes-192",
                "aes-256",
                "des",
                "3des",
                "cast5-128",
                "serpent-128",
                "serpent-192",
                "serpent-256",
                "twofish-128",
                "twofish-192",
                "twofish-256",
                "sm4",
            ],
        ),
        ("cipher-mode", &["ecb", "cbc", "xts", "ctr"]),
        ("ivgen-alg", &["plain", "plain64", "essiv"]),
        (
            "hash-alg",
            &[
                "md5",
                "sha1",
                "sha224",
                "sha256",
                "sha384",
                "sha512",
                "ripemd160",
                "sm3",
            ],
        ),
        ("ivgen-hash-alg", &["md5", "sha1", "sha256", "sm3"]),
        ("iter-time", &["0", "1", "2000", "0x7d0", "-1"]),
    ];
    for (key, list) in values {
        for value in *list {
            options
                .set(key, value)
                .unwrap_or_else(|e| panic!("{key}={value}: {e}"));
        }
    }
}
