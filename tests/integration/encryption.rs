//! Encrypted images (LUKS and legacy AES), read with their secret and compared with QEMU.
//!
//! Without QEMU: every image in `fixtures/encrypted/` (made by `fixtures/make-encrypted.sh`)
//! reads to the sha256 that `qemu-img convert` gave when it was made, and its encryption
//! fields match the `qemu-img info --output=json` saved beside it; missing, wrong and
//! corrupted secrets, key slots and headers fail with their own errors.
//! With QEMU: an image per combination of cipher, mode, IV generator and hash is made and
//! read byte for byte against `qemu-img convert`.

use crate::common;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use common::{describe_difference, sha256_hex, Qemu, TempDir};
use positioned_io::ReadAt;
use qcow2::{Error, Limits, OpenOptions, Qcow2, Secret};

fn dir() -> PathBuf {
    common::fixture("encrypted")
}

/// One row of `fixtures/encrypted/manifest.tsv`.
struct Row {
    name: String,
    snapshot: Option<String>,
    /// One secret for every image, or `file=secret` pairs.
    secrets: String,
    size: u64,
    sha256: String,
}

fn manifest() -> Vec<Row> {
    let text = std::fs::read_to_string(dir().join("manifest.tsv")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let (name, snapshot) = match f[0].split_once('@') {
                Some((n, s)) => (n.to_owned(), Some(s.to_owned())),
                None => (f[0].to_owned(), None),
            };
            Row {
                name,
                snapshot,
                secrets: f[1].to_owned(),
                size: f[2].parse().unwrap(),
                sha256: f[3].to_owned(),
            }
        })
        .collect()
}

/// Options giving each file of a chain its secret: `a.qcow2=s1,b.qcow2=s2`, or one for all.
fn options_for(secrets: &str) -> OpenOptions {
    if !secrets.contains('=') {
        return OpenOptions::new().secret(secrets);
    }
    let map: HashMap<String, String> = secrets
        .split(',')
        .map(|p| {
            let (f, s) = p.split_once('=').unwrap();
            (f.to_owned(), s.to_owned())
        })
        .collect();
    OpenOptions::new().secret_for(move |path: &Path| {
        let name = path.file_name()?.to_str()?;
        map.get(name).map(|s| Secret::new(s.as_bytes()))
    })
}

fn read_all(reader: &impl ReadAt, size: u64) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    reader.read_exact_at(0, &mut out).unwrap();
    out
}

/// The `qcow2::Error` inside an `io::Error` from a read.
fn inner(e: &std::io::Error) -> &Error {
    e.get_ref()
        .and_then(|e| e.downcast_ref::<Error>())
        .unwrap_or_else(|| panic!("not a qcow2 error: {e}"))
}

#[test]
fn committed_fixtures_read_as_qemu_reads_them() {
    let rows = manifest();
    assert!(rows.len() >= 15, "manifest has {} rows", rows.len());
    for row in rows {
        let image = Qcow2::open_path_with(dir().join(&row.name), &options_for(&row.secrets))
            .unwrap_or_else(|e| panic!("{}: {e}", row.name));
        assert!(image.is_unlocked(), "{}", row.name);
        let data = match &row.snapshot {
            Some(s) => read_all(&image.snapshot_reader(s).unwrap(), row.size),
            None => read_all(&image.reader().unwrap(), row.size),
        };
        assert_eq!(image.guest_size(), row.size, "{}", row.name);
        assert_eq!(
            sha256_hex(&data),
            row.sha256,
            "{}{}",
            row.name,
            row.snapshot.map(|s| format!("@{s}")).unwrap_or_default()
        );
    }
}

/// Compare [`qcow2::EncryptionInfo`] with `format-specific.data.encrypt` of qemu-img's JSON.
fn assert_info_matches(image: &Qcow2<File>, qemu: &serde_json::Value, what: &str) {
    let theirs = &qemu["format-specific"]["data"]["encrypt"];
    let Some(ours) = image.encryption() else {
        assert!(theirs.is_null(), "{what}: qemu-img says encrypted");
        return;
    };
    assert_eq!(qemu["encrypted"], true, "{what}");
    let s = |v: &Option<String>| {
        v.as_deref()
            .map(serde_json::Value::from)
            .unwrap_or_default()
    };
    let n = |v: Option<u64>| v.map(serde_json::Value::from).unwrap_or_default();
    assert_eq!(theirs["format"], ours.format, "{what}");
    assert_eq!(theirs["cipher-alg"], s(&ours.cipher_alg), "{what}");
    assert_eq!(theirs["cipher-mode"], s(&ours.cipher_mode), "{what}");
    assert_eq!(theirs["ivgen-alg"], s(&ours.ivgen_alg), "{what}");
    assert_eq!(theirs["ivgen-hash-alg"], s(&ours.ivgen_hash_alg), "{what}");
    assert_eq!(theirs["hash-alg"], s(&ours.hash_alg), "{what}");
    assert_eq!(theirs["payload-offset"], n(ours.payload_offset), "{what}");
    assert_eq!(
        theirs["master-key-iters"],
        n(ours.master_key_iters),
        "{what}"
    );
    assert_eq!(theirs["uuid"], s(&ours.uuid), "{what}");
    assert_eq!(
        theirs["detached-header"],
        ours.detached_header
            .map(serde_json::Value::from)
            .unwrap_or_default(),
        "{what}"
    );
    let slots = theirs["slots"].as_array().cloned().unwrap_or_default();
    assert_eq!(slots.len(), ours.slots.len(), "{what}");
    for (t, o) in slots.iter().zip(&ours.slots) {
        assert_eq!(t["active"], o.active, "{what}");
        assert_eq!(t["iters"], n(o.iters.map(u64::from)), "{what}");
        assert_eq!(t["stripes"], n(o.stripes.map(u64::from)), "{what}");
        assert_eq!(t["key-offset"], o.key_offset, "{what}");
    }
}

#[test]
fn encryption_info_matches_saved_qemu_img_info() {
    let mut checked = 0;
    for entry in std::fs::read_dir(dir()).unwrap() {
        let path = entry.unwrap().path();
        let Some(name) = path.to_str().and_then(|p| p.strip_suffix(".info.json")) else {
            continue;
        };
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        // Metadata needs no secret, and no backing file.
        let options = OpenOptions::new().backing_as_zeros(true);
        let image = Qcow2::open_path_with(format!("{name}.qcow2"), &options).unwrap();
        assert_info_matches(&image, &json, name);
        checked += 1;
    }
    assert!(checked >= 15, "{checked} info files");
}

#[test]
fn without_a_secret_metadata_opens_and_reads_are_refused() {
    for (name, method) in [
        ("luks-aes-256-xts-plain64-sha256.qcow2", 2),
        ("legacy-aes.qcow2", 1),
    ] {
        let image = Qcow2::open_path(dir().join(name)).unwrap();
        assert!(!image.is_unlocked());
        assert!(image.encryption().is_some());
        let reader = image.reader().unwrap();
        // The allocation map needs no key.
        assert!(reader.extent_at(0).unwrap().is_some());
        let err = reader.read_exact_at(0, &mut [0u8; 512]).unwrap_err();
        assert!(
            matches!(inner(&err), Error::Encrypted { method: m, .. } if *m == method),
            "{name}: {err}"
        );
    }
    // An unencrypted overlay over an encrypted base: the base's reads are refused.
    let image = Qcow2::open_path(dir().join("chain-plain-over-luks.qcow2")).unwrap();
    let err = read_all_err(&image);
    assert!(
        matches!(inner(&err), Error::Encrypted { method: 2, .. }),
        "{err}"
    );
}

fn read_all_err(image: &Qcow2<File>) -> std::io::Error {
    let mut buf = vec![0u8; image.guest_size() as usize];
    image
        .reader()
        .unwrap()
        .read_exact_at(0, &mut buf)
        .unwrap_err()
}

#[test]
fn a_wrong_secret_is_refused_at_open() {
    for name in [
        "luks-aes-256-xts-plain64-sha256.qcow2",
        "luks-2slots.qcow2",
        "luks-cast5-128-cbc-plain64-sha1.qcow2",
    ] {
        let options = OpenOptions::new().secret("not the secret");
        let err = Qcow2::open_path_with(dir().join(name), &options)
            .err()
            .unwrap();
        assert!(matches!(err, Error::WrongSecret { .. }), "{name}: {err}");
    }
    // Both slots of the two-slot image open it.
    for secret in ["abc", "second"] {
        let options = OpenOptions::new().secret(secret);
        Qcow2::open_path_with(dir().join("luks-2slots.qcow2"), &options).unwrap();
    }
    // The wrong secret of one layer of a chain.
    let options = options_for("chain-luks-over-luks.qcow2=top,chain-luks-base.qcow2=top");
    let err = Qcow2::open_path_with(dir().join("chain-luks-over-luks.qcow2"), &options)
        .err()
        .unwrap();
    assert!(matches!(err, Error::WrongSecret { .. }), "{err}");
}

#[test]
fn legacy_aes_keys_are_the_first_16_bytes_and_nothing_checks_them() {
    let row = manifest()
        .into_iter()
        .find(|r| r.name == "legacy-aes.qcow2")
        .unwrap();
    let read = |secret: &[u8]| {
        let options = OpenOptions::new().secret(secret);
        let image = Qcow2::open_path_with(dir().join("legacy-aes.qcow2"), &options).unwrap();
        sha256_hex(&read_all(&image.reader().unwrap(), row.size))
    };
    // QEMU uses the passphrase's first 16 bytes, up to a NUL.
    assert_eq!(read(b"0123456789abcdef"), row.sha256);
    assert_eq!(read(b"0123456789abcdef-anything"), row.sha256);
    // A wrong key is not detected (as in QEMU): the data is garbage.
    assert_ne!(read(b"0123456789abcdeX"), row.sha256);
    // A NUL in the secret: QEMU refuses it (not UTF-8 text) rather than cut the key there.
    let options = OpenOptions::new().secret(&b"0123456789\0bcdef"[..]);
    let err = Qcow2::open_path_with(dir().join("legacy-aes.qcow2"), &options)
        .err()
        .unwrap();
    assert!(matches!(err, Error::SecretNotUtf8), "{err}");
}

/// The file offset of the LUKS header of a fixture.
fn luks_offset(bytes: &[u8]) -> usize {
    let image = Qcow2::open(bytes.to_vec()).unwrap();
    image.header().encryption().unwrap().offset as usize
}

fn open_bytes(bytes: Vec<u8>, secret: &str, limits: Limits) -> qcow2::Result<Qcow2<Vec<u8>>> {
    Qcow2::open_with(bytes, &OpenOptions::new().secret(secret).limits(limits))
}

#[test]
fn corrupted_key_material_and_headers_fail_cleanly() {
    let name = "luks-aes-128-cbc-essiv-sha1.qcow2";
    let good = std::fs::read(dir().join(name)).unwrap();
    let at = luks_offset(&good);
    let slot0 = at + 208;
    let set_u32 = |b: &mut Vec<u8>, off: usize, v: u32| {
        b[off..off + 4].copy_from_slice(&v.to_be_bytes());
    };
    let key_offset = u32::from_be_bytes(good[slot0 + 40..slot0 + 44].try_into().unwrap());

    // Flipped key material: the master-key digest does not match.
    let mut b = good.clone();
    let km = at + key_offset as usize * 512;
    b[km + 100] ^= 0xff;
    let err = open_bytes(b, "abc", Limits::default()).err().unwrap();
    assert!(
        matches!(err, Error::WrongSecret { slots_tried: 1 }),
        "{err}"
    );

    // A corrupted master-key digest: likewise.
    let mut b = good.clone();
    b[at + 112] ^= 1;
    let err = open_bytes(b, "abc", Limits::default()).err().unwrap();
    assert!(matches!(err, Error::WrongSecret { .. }), "{err}");

    // Billions of PBKDF2 iterations: refused before any are run.
    let mut b = good.clone();
    set_u32(&mut b, slot0 + 4, u32::MAX);
    let started = std::time::Instant::now();
    let err = open_bytes(b.clone(), "abc", Limits::default())
        .err()
        .unwrap();
    assert!(matches!(err, Error::LimitExceeded { .. }), "{err}");
    assert!(started.elapsed().as_secs() < 5);
    // Without a secret nothing is derived: the image opens.
    Qcow2::open(b).unwrap();

    // A tighter limit refuses even the fixture's own iterations.
    let mut tight = Limits::default();
    tight.max_kdf_blocks = 100;
    let err = open_bytes(good.clone(), "abc", tight).err().unwrap();
    assert!(matches!(err, Error::LimitExceeded { .. }), "{err}");

    // QEMU's header checks, with and without a secret.
    let cases: &[(&str, usize, u32)] = &[
        ("stripes", slot0 + 44, 3999),
        ("slot state", slot0, 1),
        ("slot iterations", slot0 + 4, 0),
        ("key material in the header", slot0 + 40, 1),
        ("key material in the payload", slot0 + 40, 0x0100_0000),
        ("payload offset", at + 104, 1),
        ("master key iterations", at + 164, 0),
        ("huge key size", at + 108, u32::MAX),
    ];
    for &(what, off, v) in cases {
        let mut b = good.clone();
        set_u32(&mut b, off, v);
        let err = Qcow2::open(b.clone())
            .err()
            .unwrap_or_else(|| panic!("{what}: opened"));
        assert!(matches!(err, Error::Malformed { .. }), "{what}: {err}");
        assert!(open_bytes(b, "abc", Limits::default()).is_err(), "{what}");
    }

    // The key material lies past the end of the encryption header area.
    let mut b = good.clone();
    let ext_len_at = find_encryption_ext(&b) + 8;
    b[ext_len_at..ext_len_at + 8].copy_from_slice(&4096u64.to_be_bytes());
    Qcow2::open(b.clone()).unwrap(); // the header itself fits
    let err = open_bytes(b, "abc", Limits::default()).err().unwrap();
    assert!(matches!(err, Error::Malformed { .. }), "{err}");

    // An unknown hash is refused by name.
    let mut b = good.clone();
    b[at + 72..at + 80].copy_from_slice(b"md5\0\0\0\0\0");
    let info = Qcow2::open(b.clone())
        .unwrap()
        .encryption()
        .unwrap()
        .clone();
    assert_eq!(info.hash_alg.as_deref(), Some("md5"));
    let err = open_bytes(b, "abc", Limits::default()).err().unwrap();
    assert!(
        matches!(&err, Error::UnsupportedEncryption { what } if what.contains("md5")),
        "{err}"
    );

    // Truncated files: no panic, an error.
    for cut in [at + 100, at + 600, km + 1000] {
        let b = good[..cut].to_vec();
        assert!(
            open_bytes(b, "abc", Limits::default()).is_err(),
            "cut at {cut}"
        );
    }
}

/// The file offset of the data of the full-disk-encryption header extension.
fn find_encryption_ext(b: &[u8]) -> usize {
    let magic = 0x0537_be77u32.to_be_bytes();
    let at = b[..4096].windows(4).position(|w| w == magic).unwrap();
    at + 8
}

#[test]
fn secrets_that_are_not_utf8_unlock_nothing() {
    let path = dir().join("luks-aes-128-ecb-sha256.qcow2");
    let open = |secret: &[u8]| {
        Qcow2::open_path_with(&path, &OpenOptions::new().secret(secret)).map(|_| ())
    };
    // QEMU refuses these as passphrases; the first two used to be cut at the NUL (the second
    // unlocked the image as "abc").
    for secret in [&b"\0abc"[..], b"abc\0", b"ab\xffc", b"\xed\xa0\x80"] {
        let err = open(secret).unwrap_err();
        assert!(matches!(err, Error::SecretNotUtf8), "{secret:?}: {err}");
        assert_eq!(err.to_string(), "data from the secret is not valid UTF-8");
    }
    // Valid UTF-8, the wrong secret: U+FFFE is a noncharacter, still UTF-8 (glib agrees).
    for secret in ["\u{fffe}", "", "abc\n"] {
        let err = open(secret.as_bytes()).unwrap_err();
        assert!(
            matches!(err, Error::WrongSecret { .. }),
            "{secret:?}: {err}"
        );
    }
    open(b"abc").unwrap();
    // Without a secret, and for an image that is not encrypted, nothing looks at it.
    Qcow2::open_path(&path).unwrap();
    let plain = common::fixture("v3-64k-basic.qcow2");
    Qcow2::open_path_with(plain, &OpenOptions::new().secret(&b"\0"[..])).unwrap();
}

#[test]
fn secrets_do_not_show_in_debug() {
    let options = OpenOptions::new().secret("hunter2");
    let shown = format!("{options:?} {:?}", Secret::new("hunter2"));
    assert!(!shown.contains("hunter2"), "{shown}");
}

// ---------------------------------------------------------------- with QEMU --

/// `qemu-img convert` of an image with its secret, to raw bytes.
fn qemu_read(qemu: &Qemu, dir: &Path, name: &str, secret: &str) -> Vec<u8> {
    qemu.convert_to_raw(
        dir,
        &format!("driver=qcow2,file.filename={name},encrypt.key-secret=sec0"),
        &[
            "--object".to_owned(),
            format!("secret,id=sec0,data={secret}"),
            "--image-opts".to_owned(),
        ],
    )
}

/// Make a 1 MiB image with `opts` and the fixtures' kind of writes; compare every byte and
/// the info with QEMU's. Returns false when qemu-img refuses the options.
fn check_combination(qemu: &Qemu, dir: &Path, name: &str, opts: &str, secret: &str) -> bool {
    let created = std::process::Command::new(&qemu.img)
        .current_dir(dir)
        .args(["create", "-q", "-f", "qcow2", "--object"])
        .arg(format!("secret,id=sec0,data={secret}"))
        .arg("-o")
        .arg(if opts.contains("luks") {
            format!("encrypt.key-secret=sec0,encrypt.iter-time=10,{opts}")
        } else {
            format!("encrypt.key-secret=sec0,{opts}") // AES derives no key: no iter-time
        })
        .args([name, "1M"])
        .output()
        .unwrap();
    if !created.status.success() {
        return false;
    }
    let mut io = std::process::Command::new(&qemu.io);
    io.current_dir(dir)
        .arg("--object")
        .arg(format!("secret,id=sec0,data={secret}"))
        .arg("--image-opts")
        .arg(format!(
            "driver=qcow2,file.filename={name},encrypt.key-secret=sec0"
        ));
    for c in [
        "write -P 0x5a 0 65536",
        "write -P 0xa5 70000 3000",
        "write -c -P 0x33 262144 65536",
        "write -P 0x11 1040384 8192",
    ] {
        io.args(["-c", c]);
    }
    common::run(&mut io);
    let theirs = qemu_read(qemu, dir, name, secret);
    let image = Qcow2::open_path_with(dir.join(name), &OpenOptions::new().secret(secret))
        .unwrap_or_else(|e| panic!("{opts}: {e}"));
    let ours = read_all(&image.reader().unwrap(), theirs.len() as u64);
    if let Some(d) = describe_difference(opts, 0, &ours, &theirs) {
        panic!("{d}");
    }
    // Unaligned reads go through whole sectors.
    let mut odd = vec![0u8; 5001];
    image
        .reader()
        .unwrap()
        .read_exact_at(69_999, &mut odd)
        .unwrap();
    assert_eq!(odd, theirs[69_999..75_000], "{opts}: unaligned read");
    assert_info_matches(&image, &qemu.info_json(dir, name, false), opts);
    true
}

/// Every AES cipher, mode and IV generator, each with one of the hashes in turn (the hash
/// only derives keys, independently of the rest; each image costs qemu-img a second of
/// PBKDF2 calibration, so the full cross product with the hashes would take minutes).
#[test]
fn every_aes_combination_reads_as_qemu_reads_it() {
    let Some(qemu) = Qemu::find_or_skip("every_aes_combination_reads_as_qemu_reads_it") else {
        return;
    };
    let tmp = TempDir::new("encryption-aes");
    let hashes = ["sha1", "sha256", "sha384", "sha512"];
    let mut combos = Vec::new();
    for alg in ["aes-128", "aes-192", "aes-256"] {
        for mode in ["xts", "cbc"] {
            for ivgen in ["plain64", "plain", "essiv"] {
                combos.push((alg, mode, ivgen, hashes[combos.len() % hashes.len()]));
            }
        }
    }
    in_parallel(&combos, |&(alg, mode, ivgen, hash)| {
        let opts = format!(
            "encrypt.format=luks,encrypt.cipher-alg={alg},encrypt.cipher-mode={mode},encrypt.ivgen-alg={ivgen},encrypt.hash-alg={hash}"
        );
        let name = format!("{alg}-{mode}-{ivgen}-{hash}.qcow2");
        let made = check_combination(&qemu, tmp.path(), &name, &opts, "pass phrase");
        // QEMU 10 aborts making these: 24-byte keys times 4000 stripes is not a whole
        // number of sectors, and its sector helper asserts that it is.
        let qemu_cannot = alg == "aes-192" && mode == "cbc";
        assert_eq!(made, !qemu_cannot, "qemu-img made {opts}: {made}");
    });
}

/// Run `f` on every item, on as many threads as there are cores: each image costs qemu-img
/// a second of CPU calibrating PBKDF2.
fn in_parallel<T: Sync>(items: &[T], f: impl Fn(&T) + Sync) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                while let Some(item) =
                    items.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                {
                    f(item);
                }
            });
        }
    });
}

#[test]
fn other_ciphers_modes_and_legacy_aes_read_as_qemu_reads_them() {
    let Some(qemu) =
        Qemu::find_or_skip("other_ciphers_modes_and_legacy_aes_read_as_qemu_reads_them")
    else {
        return;
    };
    let tmp = TempDir::new("encryption-other");
    let luks = |o: &str| format!("encrypt.format=luks,{o}");
    let cases = [
        luks("encrypt.cipher-alg=twofish-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv"),
        luks("encrypt.cipher-alg=twofish-192,encrypt.cipher-mode=xts,encrypt.ivgen-alg=plain"),
        luks("encrypt.cipher-alg=twofish-256,encrypt.cipher-mode=xts,encrypt.ivgen-alg=essiv"),
        luks("encrypt.cipher-alg=serpent-128,encrypt.cipher-mode=xts,encrypt.ivgen-alg=plain64"),
        luks("encrypt.cipher-alg=serpent-192,encrypt.cipher-mode=xts,encrypt.ivgen-alg=essiv"),
        luks("encrypt.cipher-alg=serpent-256,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain"),
        luks("encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64"),
        luks("encrypt.cipher-mode=ecb"),
        luks("encrypt.cipher-mode=ctr"),
        luks("encrypt.hash-alg=sha224"),
        luks("cluster_size=512"),
        luks("cluster_size=32k"),
        luks("extended_l2=on,cluster_size=16k"),
    ];
    let cases: Vec<(usize, String)> = cases.into_iter().enumerate().collect();
    in_parallel(&cases, |(i, opts)| {
        let name = format!("other-{i}.qcow2");
        assert!(
            check_combination(&qemu, tmp.path(), &name, opts, "abc"),
            "qemu-img refused {opts}"
        );
    });
    for (i, secret) in ["", "x", "exactly16bytes!!", "longer than sixteen bytes"]
        .iter()
        .enumerate()
    {
        let name = format!("legacy-{i}.qcow2");
        assert!(check_combination(
            &qemu,
            tmp.path(),
            &name,
            "encrypt.format=aes",
            secret
        ));
    }
}

#[test]
fn hashes_without_a_crate_are_refused_by_name() {
    let Some(qemu) = Qemu::find_or_skip("hashes_without_a_crate_are_refused_by_name") else {
        return;
    };
    let tmp = TempDir::new("encryption-refused");
    for hash in ["md5", "ripemd160"] {
        let name = format!("{hash}.qcow2");
        qemu.img(
            tmp.path(),
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                "secret,id=sec0,data=abc",
                "-o",
                &format!("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.hash-alg={hash}"),
                &name,
                "1M",
            ],
        );
        let path = tmp.join(&name);
        let info = Qcow2::open_path(&path).unwrap();
        assert_info_matches(&info, &qemu.info_json(tmp.path(), &name, false), hash);
        let err = Qcow2::open_path_with(&path, &OpenOptions::new().secret("abc"))
            .err()
            .unwrap();
        assert!(
            matches!(&err, Error::UnsupportedEncryption { what } if what.contains(hash)),
            "{err}"
        );
    }
}

/// Patch the fixture's header and ask qemu-img what it makes of it.
fn qemu_opens(qemu: &Qemu, dir: &Path, bytes: &[u8]) -> bool {
    let path = dir.join("patched.qcow2");
    std::fs::write(&path, bytes).unwrap();
    std::process::Command::new(&qemu.img)
        .args(["info", "-f", "qcow2"])
        .arg(&path)
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn header_rules_match_qemus_verdicts() {
    let Some(qemu) = Qemu::find_or_skip("header_rules_match_qemus_verdicts") else {
        return;
    };
    let tmp = TempDir::new("encryption-rules");
    let good = std::fs::read(dir().join("luks-aes-128-ecb-sha256.qcow2")).unwrap();
    let ext = find_encryption_ext(&good);
    let mut cases: Vec<(&str, Vec<u8>)> = vec![("as made", good.clone())];
    let mut b = good.clone();
    b[35] = 1; // crypt_method 1 with the LUKS extension
    cases.push(("AES with the encryption extension", b));
    let mut b = good.clone();
    b[35] = 0; // not encrypted, with the extension
    cases.push(("unencrypted with the encryption extension", b));
    let mut b = good.clone();
    b[ext - 8..ext - 4].copy_from_slice(&0x1234_5678u32.to_be_bytes()); // LUKS, no extension
    cases.push(("LUKS without the extension", b));
    let mut b = good.clone();
    b[ext + 6] ^= 0x02; // header offset off its cluster by 512
    cases.push(("unaligned LUKS header", b));
    let mut b = good.clone();
    let at = luks_offset(&good);
    b[at + 208 + 44..at + 208 + 48].copy_from_slice(&3999u32.to_be_bytes());
    cases.push(("LUKS stripes 3999", b));
    for (what, bytes) in cases {
        let theirs = qemu_opens(&qemu, tmp.path(), &bytes);
        let ours = Qcow2::open(bytes).map(|_| ()).map_err(|e| e.to_string());
        assert_eq!(
            ours.is_ok(),
            theirs,
            "{what}: qemu-img opens: {theirs}, we: {ours:?}"
        );
    }
}

// ------------------------------------------------------------- PBKDF2 budget --

/// What trying each active key slot of `image` costs, in the PBKDF2 blocks
/// `Limits::max_kdf_blocks` counts: the slot's iterations and its anti-forensic stripes but
/// one, each times the hash-sized blocks of the key, plus the master-key digest's iterations.
fn slot_work(image: &Qcow2<impl ReadAt>) -> Vec<u64> {
    let info = image.encryption().unwrap();
    let digest_len: u64 = match info.hash_alg.as_deref().unwrap() {
        "sha1" => 20,
        "sha224" => 28,
        "sha256" => 32,
        "sha384" => 48,
        "sha512" => 64,
        other => panic!("hash {other}"),
    };
    let cipher_key: u64 = match info.cipher_alg.as_deref().unwrap() {
        "aes-128" | "cast5-128" | "serpent-128" | "twofish-128" => 16,
        "aes-192" => 24,
        "aes-256" | "serpent-256" | "twofish-256" => 32,
        other => panic!("cipher {other}"),
    };
    let key_bytes = match info.cipher_mode.as_deref() {
        Some("xts") => cipher_key * 2,
        _ => cipher_key,
    };
    let blocks = key_bytes.div_ceil(digest_len);
    let mk = info.master_key_iters.unwrap();
    info.slots
        .iter()
        .filter(|s| s.active)
        .map(|s| {
            u64::from(s.iters.unwrap()) * blocks + u64::from(s.stripes.unwrap() - 1) * blocks + mk
        })
        .collect()
}

fn limits_of(max_kdf_blocks: u64) -> Limits {
    let mut limits = Limits::default();
    limits.max_kdf_blocks = max_kdf_blocks;
    limits
}

/// The open's refusal: `LimitExceeded` in PBKDF2 blocks, requesting `requested`.
fn assert_kdf_refusal(err: &Error, requested: u64, limit: u64) {
    assert!(
        matches!(
            err,
            Error::LimitExceeded { unit: "PBKDF2 blocks", requested: r, limit: l, .. }
                if *r == requested && *l == limit
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&format!("needs {requested} PBKDF2 blocks")) && !text.contains("bytes"),
        "{text}"
    );
}

/// Three LUKS layers (from the committed fixtures: `chain-luks-over-luks.qcow2` twice, one
/// copy pointed at the other, over `chain-luks-base.qcow2`), in `into`.
fn three_luks_layers(into: &Path) -> (PathBuf, OpenOptions) {
    let over = std::fs::read(dir().join("chain-luks-over-luks.qcow2")).unwrap();
    let mut top = over.clone();
    let name = b"chain-luks-base.qcow2";
    let at = top.windows(name.len()).position(|w| w == name).unwrap();
    top[at..at + name.len()].copy_from_slice(b"chain-luks-mid1.qcow2");
    std::fs::write(into.join("top.qcow2"), top).unwrap();
    std::fs::write(into.join("chain-luks-mid1.qcow2"), over).unwrap();
    let base = dir().join("chain-luks-base.qcow2");
    std::fs::copy(base, into.join("chain-luks-base.qcow2")).unwrap();
    let options = options_for("top.qcow2=top,chain-luks-mid1.qcow2=top,chain-luks-base.qcow2=base");
    (into.join("top.qcow2"), options)
}

#[test]
fn the_pbkdf2_budget_is_shared_by_every_layer_of_one_open() {
    let tmp = TempDir::new("encryption-kdf-chain");
    let (top, options) = three_luks_layers(tmp.path());
    // Each layer's work, from its header (one active slot each).
    let layers: Vec<u64> = [
        "top.qcow2",
        "chain-luks-mid1.qcow2",
        "chain-luks-base.qcow2",
    ]
    .iter()
    .map(|n| slot_work(&Qcow2::open(File::open(tmp.join(n)).unwrap()).unwrap())[0])
    .collect();
    let total: u64 = layers.iter().sum();

    // Exactly the chain's work: it opens, every layer unlocked.
    let image = Qcow2::open_path_with(&top, &options.clone().limits(limits_of(total))).unwrap();
    assert!(image.is_unlocked());
    read_all(&image.reader().unwrap(), image.guest_size());

    // One block less: each layer alone is well under the limit, the three together are not.
    // The last layer is refused before its PBKDF2 runs.
    let limit = total - 1;
    assert!(layers.iter().all(|&w| w < limit / 2), "{layers:?}");
    let started = std::time::Instant::now();
    let err = Qcow2::open_path_with(&top, &options.clone().limits(limits_of(limit)))
        .err()
        .unwrap();
    let took = started.elapsed();
    assert_kdf_refusal(&err, total, limit);
    // The two layers unlocked cost about 30 000 blocks (a few hundredths of a second); the
    // deadline is far above that, and far below unlocking a layer at the default limit.
    assert!(took.as_secs_f64() < 5.0, "refused after {took:?}");

    // `ImageInfo::chain_from_path` opens the chain too, each layer on its own, unlocking it
    // with `OpenOptions::secret` (the base's is another: it would fail, but is refused first).
    let common = OpenOptions::new().secret("top").limits(limits_of(limit));
    let err = qcow2::ImageInfo::chain_from_path(&top, &common)
        .err()
        .unwrap();
    assert_kdf_refusal(&err, total, limit);

    // The same options open again: the budget is per open, not per OpenOptions.
    let options = options.limits(limits_of(total));
    Qcow2::open_path_with(&top, &options).unwrap();
    Qcow2::open_path_with(&top, &options).unwrap();
}

#[test]
fn a_wrong_secret_pays_for_every_key_slot_it_tries() {
    let path = dir().join("luks-2slots.qcow2");
    let work = slot_work(&Qcow2::open_path(&path).unwrap());
    assert_eq!(work.len(), 2);
    let both = work[0] + work[1];
    let open = |secret: &str, limit: u64| {
        Qcow2::open_path_with(
            &path,
            &OpenOptions::new().secret(secret).limits(limits_of(limit)),
        )
    };
    // Enough for both slots: a wrong secret is reported as such.
    let err = open("wrong", both).err().unwrap();
    assert!(
        matches!(err, Error::WrongSecret { slots_tried: 2 }),
        "{err}"
    );
    // One block less: the second try is refused before it runs.
    assert_kdf_refusal(&open("wrong", both - 1).err().unwrap(), both, both - 1);
    // The second slot's secret pays for the first slot's try too, as in QEMU.
    assert_kdf_refusal(&open("second", both - 1).err().unwrap(), both, both - 1);
    open("second", both).unwrap();
    // The first slot's secret pays for that slot only.
    open("abc", work[0]).unwrap();
    assert_kdf_refusal(
        &open("abc", work[0] - 1).err().unwrap(),
        work[0],
        work[0] - 1,
    );
}

/// A `qemu-img`-made LUKS image with `hash` and a 64-byte key (aes-256-xts), cheap to unlock.
fn make_luks(qemu: &Qemu, dir: &Path, name: &str, hash: &str) -> PathBuf {
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
            &format!("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=aes-256,encrypt.cipher-mode=xts,encrypt.hash-alg={hash}"),
            name,
            "1M",
        ],
    );
    dir.join(name)
}

#[test]
fn sha1_with_a_64_byte_key_costs_four_blocks_an_iteration() {
    let Some(qemu) = Qemu::find_or_skip("sha1_with_a_64_byte_key_costs_four_blocks_an_iteration")
    else {
        return;
    };
    let tmp = TempDir::new("encryption-kdf-sha1");
    let path = make_luks(&qemu, tmp.path(), "sha1.qcow2", "sha1");
    let image = Qcow2::open_path(&path).unwrap();
    let info = image.encryption().unwrap();
    let iters = u64::from(info.slots[0].iters.unwrap());
    let mk = info.master_key_iters.unwrap();
    // 64 bytes of key from 20-byte SHA-1 blocks: 4 blocks, twice SHA-256's 2.
    let work = 4 * iters + 4 * 3999 + mk;
    assert_eq!(slot_work(&image), [work]);
    let open = |limit: u64| {
        Qcow2::open_path_with(
            &path,
            &OpenOptions::new().secret("abc").limits(limits_of(limit)),
        )
    };
    open(work).unwrap();
    assert_kdf_refusal(&open(work - 1).err().unwrap(), work, work - 1);

    // At the default limit: 2^25 iterations (under the former cap of 2^26 iterations per
    // image) are 2^27 blocks, over the default 2^27 with the rest: refused before any runs
    // (they would take 30 s of CPU in an optimized build, minutes in a debug one).
    let mut bytes = std::fs::read(&path).unwrap();
    let slot0 = luks_offset(&bytes) + 208;
    bytes[slot0 + 4..slot0 + 8].copy_from_slice(&(1u32 << 25).to_be_bytes());
    let started = std::time::Instant::now();
    let err = open_bytes(bytes, "abc", Limits::default()).err().unwrap();
    let took = started.elapsed();
    let limit = Limits::default().max_kdf_blocks;
    assert_eq!(limit, 1 << 27);
    assert_kdf_refusal(&err, 4 * (1 << 25) + 4 * 3999 + mk, limit);
    assert!(took.as_secs_f64() < 5.0, "refused after {took:?}");
}
