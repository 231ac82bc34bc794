//! `qcow2 create` and `qcow2::create` against `qemu-img create -f qcow2`, run side by side
//! with the same arguments in two directories: the image files byte for byte (and external
//! data files), the "Formatting" line, exit codes and error messages, `-o help`; where the
//! layouts differ on purpose (images whose refcounts need more than the first refcount
//! block), `qemu-img check`, `info` and `map`.

use crate::common;

use std::path::Path;
use std::process::{Command, Output};

use common::{Qemu, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_qcow2");

/// Both sides' directories, each with the same backing files.
struct Pair {
    ours: TempDir,
    theirs: TempDir,
    qemu: Qemu,
}

impl Pair {
    fn new(qemu: Qemu) -> Pair {
        let pair = Pair {
            ours: TempDir::new("create-ours"),
            theirs: TempDir::new("create-qemu"),
            qemu,
        };
        pair.qemu.img(
            pair.theirs.path(),
            &["create", "-q", "-f", "qcow2", "base.qcow2", "1G"],
        );
        std::fs::copy(pair.theirs.join("base.qcow2"), pair.ours.join("base.qcow2")).unwrap();
        for dir in [pair.ours.path(), pair.theirs.path()] {
            let raw = std::fs::File::create(dir.join("base.raw")).unwrap();
            raw.set_len(3 << 20).unwrap();
        }
        pair
    }

    fn clean(&self, names: &[&str]) {
        for dir in [self.ours.path(), self.theirs.path()] {
            for name in names {
                let _ = std::fs::remove_file(dir.join(name));
            }
        }
    }

    /// `create ARGS` on both sides: (ours, qemu-img's).
    fn create(&self, args: &[&str]) -> (Output, Output) {
        let ours = Command::new(BIN)
            .current_dir(self.ours.path())
            .arg("create")
            .args(args)
            .output()
            .unwrap();
        let theirs = Command::new(&self.qemu.img)
            .current_dir(self.theirs.path())
            .arg("create")
            .args(args)
            .output()
            .unwrap();
        (ours, theirs)
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// qemu-img's stderr as ours spells it.
fn as_ours(stderr: &[u8]) -> String {
    text(stderr).replace("qemu-img: ", "qcow2: ")
}

fn split(args: &str) -> Vec<&str> {
    args.split_whitespace().collect()
}

/// The option sets of the byte-for-byte matrix: (arguments before FILE, SIZE or "").
const SAME_BYTES: &[(&str, &str)] = &[
    ("", "1G"),
    ("", "0"),
    ("", "1"),
    ("", "1001"),
    ("", "1T"),
    ("", "8E"), // refused alike
    ("", "1P"),
    ("-o compat=0.10", "1G"),
    ("-o compat=v2 -b base.qcow2 -F qcow2", ""),
    ("-o cluster_size=512", "100M"),
    // Beyond the first refcount block: QEMU's allocator, replayed.
    ("-o cluster_size=512", "1G"),
    ("-o cluster_size=512,refcount_bits=64", "4G"),
    ("-o cluster_size=512,refcount_bits=1", "64G"),
    ("-o cluster_size=1k,refcount_bits=32", "200G"),
    ("-o cluster_size=4k", "8T"),
    ("-b base.qcow2 -F qcow2 -o cluster_size=512", ""),
    ("-o cluster_size=4k", "1G"),
    ("-o cluster_size=4k", "1T"),
    ("-o cluster_size=2M", "1T"),
    ("-o cluster_size=2M,extended_l2=on", "100G"),
    ("-o refcount_bits=1", "1G"),
    ("-o refcount_bits=2", "1G"),
    ("-o refcount_bits=4,cluster_size=4k", "1G"),
    ("-o refcount_bits=8", "1G"),
    ("-o refcount_bits=32", "1G"),
    ("-o refcount_bits=64", "1G"),
    ("-o extended_l2=on", "1G"),
    ("-o extended_l2=on,cluster_size=16k", "5G"),
    ("-o lazy_refcounts=on", "1G"),
    ("-o compression_type=zstd", "1G"),
    ("-o compression_type=zlib,compat=1.1", "1G"),
    ("-b base.qcow2 -F qcow2", ""),
    ("-b base.qcow2 -F qcow2", "5M"),
    ("-b base.qcow2 -F qcow2 -o cluster_size=4k", ""),
    ("-b base.raw -F raw", ""),
    ("-u -b missing.qcow2 -F qcow2", "1G"),
    (
        "-o backing_file=base.qcow2,backing_fmt=qcow2,extended_l2=on,preallocation=metadata",
        "",
    ),
    ("-o data_file=t.raw", "1G"),
    ("-o data_file=t.raw", "1001"),
    ("-o data_file=t.raw,data_file_raw=on", "1G"),
    ("-o data_file=t.raw,preallocation=metadata", "200k"),
    ("-o data_file=t.raw,preallocation=full", "3M"),
    (
        "-o data_file=t.raw,preallocation=metadata,extended_l2=on,cluster_size=2M",
        "5M",
    ),
    ("-o preallocation=off", "1G"),
    ("-o preallocation=metadata", "1G"),
    ("-o preallocation=metadata", "200k"),
    ("-o preallocation=metadata,compat=0.10", "200k"),
    ("-o preallocation=metadata,extended_l2=on", "200k"),
    (
        "-o preallocation=metadata,cluster_size=2M,extended_l2=on",
        "5M",
    ),
    (
        "-o preallocation=metadata,cluster_size=4k,refcount_bits=64",
        "1M",
    ),
    // Beyond the first refcount block, replayed.
    ("-o preallocation=metadata", "3G"),
    ("-o preallocation=metadata,cluster_size=4k", "100M"),
    (
        "-o preallocation=metadata,cluster_size=512,refcount_bits=1",
        "64M",
    ),
    (
        "-o preallocation=metadata,cluster_size=1k,refcount_bits=8",
        "50M",
    ),
    (
        "-o preallocation=metadata,data_file=t.raw,cluster_size=512",
        "64M",
    ),
    ("-o preallocation=falloc", "100M"),
    ("-o preallocation=falloc", "0"),
    ("-o preallocation=falloc,extended_l2=on", "200k"),
    ("-o preallocation=full", "70M"),
    ("-o preallocation=full,cluster_size=4k", "7M"),
    (
        "-o encrypt.format=aes,encrypt.key-secret=s0 --object secret,id=s0,data=abc",
        "1G",
    ),
    (
        "-o encryption=on,encrypt.key-secret=s0 --object secret,id=s0,data=abc",
        "1G",
    ),
    ("-o nocow=on,extent_size_hint=1M", "1G"),
    ("-q -o cluster_size=64k", "1G"),
];

#[test]
fn create_matches_qemu_byte_for_byte() {
    let Some(qemu) = Qemu::find_or_skip("create_matches_qemu_byte_for_byte") else {
        return;
    };
    let pair = Pair::new(qemu);
    let mut failures = Vec::new();
    for (args, size) in SAME_BYTES {
        pair.clean(&["t.qcow2", "t.raw"]);
        let mut argv = vec!["-f", "qcow2"];
        argv.extend(split(args));
        argv.push("t.qcow2");
        if !size.is_empty() {
            argv.push(size);
        }
        let (ours, theirs) = pair.create(&argv);
        let case = format!("create {}", argv.join(" "));
        if ours.status.code() != theirs.status.code() {
            failures.push(format!(
                "{case}: exit {:?}, qemu-img {:?} ({})",
                ours.status.code(),
                theirs.status.code(),
                text(&theirs.stderr)
            ));
            continue;
        }
        if text(&ours.stdout) != text(&theirs.stdout) {
            failures.push(format!(
                "{case}: stdout\n  ours: {}  qemu: {}",
                text(&ours.stdout),
                text(&theirs.stdout)
            ));
        }
        if as_ours(&theirs.stderr) != text(&ours.stderr) {
            failures.push(format!(
                "{case}: stderr\n  ours: {}  qemu: {}",
                text(&ours.stderr),
                as_ours(&theirs.stderr)
            ));
        }
        for name in ["t.qcow2", "t.raw"] {
            if let Some(problem) = compare_files(&pair.ours.join(name), &pair.theirs.join(name)) {
                failures.push(format!("{case}: {name} {problem}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// How two files differ (length, or the first differing byte), read a MiB at a time; both
/// missing is no difference.
fn compare_files(ours: &Path, theirs: &Path) -> Option<String> {
    use std::io::Read;
    let (a, b) = match (std::fs::File::open(ours), std::fs::File::open(theirs)) {
        (Err(_), Err(_)) => return None,
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => {
            return Some(format!(
                "exists: ours {}, qemu-img {}",
                a.is_ok(),
                b.is_ok()
            ))
        }
    };
    let (len_a, len_b) = (a.metadata().unwrap().len(), b.metadata().unwrap().len());
    if len_a != len_b {
        return Some(format!("length {len_a}, qemu-img {len_b}"));
    }
    let (mut a, mut b) = (std::io::BufReader::new(a), std::io::BufReader::new(b));
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut at = 0u64;
    while at < len_a {
        let n = usize::try_from((len_a - at).min(1 << 20)).unwrap();
        a.read_exact(&mut x[..n]).unwrap();
        b.read_exact(&mut y[..n]).unwrap();
        if let Some(i) = common::first_difference(&x[..n], &y[..n]) {
            return Some(format!("differs at byte {:#x}", at + i as u64));
        }
        at += n as u64;
    }
    None
}

fn json(qemu: &Qemu, dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(&qemu.img)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("qemu-img {args:?}: {e}: {}", text(&out.stderr)))
}

/// `qemu-img info` without what depends on the file's length and name.
fn info_without_file_sizes(qemu: &Qemu, dir: &Path) -> serde_json::Value {
    let mut info = json(qemu, dir, &["info", "--output=json", "t.qcow2"]);
    if let Some(map) = info.as_object_mut() {
        map.remove("actual-size");
        map.remove("children");
    }
    info
}

/// `qemu-img map` without host offsets.
fn map_without_offsets(qemu: &Qemu, dir: &Path) -> serde_json::Value {
    let mut map = json(qemu, dir, &["map", "--output=json", "t.qcow2"]);
    if let Some(rows) = map.as_array_mut() {
        for row in rows {
            if let Some(row) = row.as_object_mut() {
                row.remove("offset");
            }
        }
    }
    map
}

/// Images whose refcount table QEMU grows as it allocates (tiny clusters, wide refcounts,
/// huge sizes), and falloc/full preallocation beyond the first refcount block: this crate
/// sizes the refcount structures up front. Same `info`, same `map` but for
/// host offsets, no errors or leaks, never larger.
#[test]
fn create_large_layouts_check_clean() {
    let Some(qemu) = Qemu::find_or_skip("create_large_layouts_check_clean") else {
        return;
    };
    let pair = Pair::new(qemu);
    let cases: &[(&str, &str)] = &[
        ("cluster_size=512,refcount_bits=64", "8G"),
        ("cluster_size=512", "128G"),
        ("preallocation=falloc,cluster_size=4k", "200M"),
        ("preallocation=full,cluster_size=4k", "200M"),
        ("preallocation=falloc", "3G"),
        ("preallocation=metadata,cluster_size=512", "1G"),
        (
            "preallocation=metadata,cluster_size=4k,refcount_bits=64",
            "1G",
        ),
        (
            "preallocation=metadata,cluster_size=2M,extended_l2=on",
            "1T",
        ),
    ];
    let mut failures = Vec::new();
    for (opts, size) in cases {
        pair.clean(&["t.qcow2", "t.raw"]);
        let mut argv = vec!["-q", "-f", "qcow2", "-o", opts, "t.qcow2"];
        if !size.is_empty() {
            argv.push(size);
        }
        let (ours, theirs) = pair.create(&argv);
        assert!(
            ours.status.success(),
            "{opts} {size}: {}",
            text(&ours.stderr)
        );
        assert!(
            theirs.status.success(),
            "{opts} {size}: {}",
            text(&theirs.stderr)
        );
        let case = format!("-o {opts} {size}");
        let check = json(
            &pair.qemu,
            pair.ours.path(),
            &["check", "--output=json", "t.qcow2"],
        );
        for key in ["corruptions", "leaks", "check-errors"] {
            if check
                .get(key)
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
                != 0
            {
                failures.push(format!("{case}: check {key}: {check}"));
            }
        }
        let (a, b) = (
            info_without_file_sizes(&pair.qemu, pair.ours.path()),
            info_without_file_sizes(&pair.qemu, pair.theirs.path()),
        );
        if a != b {
            failures.push(format!("{case}: info\n  ours: {a}\n  qemu: {b}"));
        }
        let (a, b) = (
            map_without_offsets(&pair.qemu, pair.ours.path()),
            map_without_offsets(&pair.qemu, pair.theirs.path()),
        );
        // Metadata preallocation: the same mappings, split where the host runs break.
        if a != b && !opts.contains("metadata") {
            failures.push(format!("{case}: map differs"));
        }
        let len = |dir: &Path| std::fs::metadata(dir.join("t.qcow2")).unwrap().len();
        if len(pair.ours.path()) > len(pair.theirs.path()) {
            failures.push(format!(
                "{case}: {} bytes, qemu-img {}",
                len(pair.ours.path()),
                len(pair.theirs.path())
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// What qemu-img refuses: the same "Formatting" line or none, the same message (ours says
/// `qcow2:`), exit status 1, no file left.
#[test]
fn create_refuses_what_qemu_refuses() {
    let Some(qemu) = Qemu::find_or_skip("create_refuses_what_qemu_refuses") else {
        return;
    };
    let pair = Pair::new(qemu);
    let cases: &[(&str, &str)] = &[
        ("-o cluster_size=3000", "1M"),
        ("-o cluster_size=256", "1M"),
        ("-o cluster_size=4M", "1M"),
        ("-o refcount_bits=3", "1M"),
        ("-o refcount_bits=128", "1M"),
        ("-o refcount_bits=0", "1M"),
        ("-o compat=0.10,extended_l2=on", "1M"),
        ("-o compat=0.10,refcount_bits=8", "1M"),
        ("-o compat=0.10,lazy_refcounts=on", "1M"),
        ("-o compat=0.10,compression_type=zstd", "1M"),
        ("-o compat=0.10,data_file=t.raw", "1M"),
        ("-o extended_l2=on,cluster_size=8k", "1M"),
        ("-o backing_fmt=qcow2", "1M"),
        ("-o data_file_raw=on", "1M"),
        (
            "-o data_file=t.raw,data_file_raw=on -b base.qcow2 -F qcow2",
            "1M",
        ),
        ("-b base.qcow2 -F qcow2 -o preallocation=metadata", ""),
        ("-b missing.qcow2 -F qcow2", "1M"),
        ("-b missing.qcow2 -F qcow2", ""),
        ("-u -b missing.qcow2 -F qcow2", ""),
        ("-b base.qcow2", "1M"),
        ("-u -b base.qcow2", "1M"),
        ("-o lazy_refcounts=maybe", "1M"),
        ("-o compat=0.9,lazy_refcounts=on", "1M"),
        ("-o compression_type=lz4", "1M"),
        ("-o preallocation=bogus", "1M"),
        ("-o bogus=1", "1M"),
        ("", ""),
        ("", "1Q"),
        ("", "9E"),
        ("-o size=2M", "3M"),
        ("-o cluster_size=512", "1T"),
        ("-o encrypt.format=luks", "1M"),
        ("-o encrypt.format=luks,encrypt.key-secret=nope", "1M"),
        ("-o encrypt.format=aes", "1M"),
    ];
    let mut failures = Vec::new();
    for (args, size) in cases {
        pair.clean(&["t.qcow2", "t.raw"]);
        let mut argv = vec!["-f", "qcow2"];
        argv.extend(split(args));
        argv.push("t.qcow2");
        if !size.is_empty() {
            argv.push(size);
        }
        let (ours, theirs) = pair.create(&argv);
        let case = format!("create {}", argv.join(" "));
        assert_eq!(
            theirs.status.code(),
            Some(1),
            "{case}: qemu-img did not refuse"
        );
        if ours.status.code() != Some(1) {
            failures.push(format!("{case}: exit {:?}", ours.status.code()));
        }
        if text(&ours.stdout) != text(&theirs.stdout) {
            failures.push(format!(
                "{case}: stdout\n  ours: {}  qemu: {}",
                text(&ours.stdout),
                text(&theirs.stdout)
            ));
        }
        if text(&ours.stderr) != as_ours(&theirs.stderr) {
            failures.push(format!(
                "{case}:\n  ours: {}  qemu: {}",
                text(&ours.stderr),
                as_ours(&theirs.stderr)
            ));
        }
        for name in ["t.qcow2", "t.raw"] {
            if pair.ours.join(name).exists() {
                failures.push(format!("{case}: {name} left behind"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn create_help_lists_qemus_options() {
    let Some(qemu) = Qemu::find_or_skip("create_help_lists_qemus_options") else {
        return;
    };
    let pair = Pair::new(qemu);
    for args in [
        &["-f", "qcow2", "-o", "help"][..],
        &["-f", "qcow2", "-o", "?"][..],
        &["-f", "qcow2", "-o", "cluster_size=4k,help"][..],
        &["-f", "qcow2", "-o", "help", "t.qcow2"][..],
    ] {
        let (ours, theirs) = pair.create(args);
        assert_eq!(ours.status.code(), Some(0), "{args:?}");
        assert_eq!(theirs.status.code(), Some(0), "{args:?}");
        assert_eq!(text(&ours.stdout), text(&theirs.stdout), "{args:?}");
        assert!(!pair.ours.join("t.qcow2").exists());
    }
}

/// The library: what it refuses, it refuses before writing; an output it cannot write is an
/// error with no file left.
#[test]
fn create_library_refuses_before_writing() {
    let dir = TempDir::new("create-lib");
    let path = dir.join("t.qcow2");
    let refused = [
        qcow2::CreateOptions::new(1 << 20).cluster_size(3000),
        qcow2::CreateOptions::new(1 << 20).refcount_bits(3),
        qcow2::CreateOptions::new(1 << 20)
            .compat(qcow2::Compat::V2)
            .extended_l2(true),
        qcow2::CreateOptions::new(1 << 20)
            .backing_file("missing.qcow2")
            .backing_format("qcow2"),
        qcow2::CreateOptions::default(),
        qcow2::CreateOptions::new(1 << 20).data_file_raw(true),
    ];
    for options in &refused {
        let err = qcow2::create(&path, options).unwrap_err();
        assert!(
            matches!(err, qcow2::Error::InvalidOption { .. }),
            "{options:?}: {err:?}"
        );
        assert!(!path.exists(), "{options:?} left a file");
    }
    let unwritable = dir.join("no-such-dir").join("t.qcow2");
    let err = qcow2::create(&unwritable, &qcow2::CreateOptions::new(1 << 20)).unwrap_err();
    assert!(matches!(err, qcow2::Error::Io { .. }), "{err:?}");
    assert!(!unwritable.exists());
    // A data file that cannot be made: the image made before it goes too.
    let bad_data = dir.join("no-such-dir").join("t.raw");
    let options = qcow2::CreateOptions::new(1 << 20).data_file(bad_data.to_str().unwrap());
    let err = qcow2::create(&path, &options).unwrap_err();
    assert!(matches!(err, qcow2::Error::Io { .. }), "{err:?}");
    assert!(!path.exists());
}

/// What the library makes, the crate reads back: options in the header, zeros everywhere,
/// the backing chain followed.
#[test]
fn create_library_images_open_and_read_zeros() {
    let dir = TempDir::new("create-read");
    let base = dir.join("base.qcow2");
    qcow2::create(&base, &qcow2::CreateOptions::new(3 << 20)).unwrap();
    let top = dir.join("top.qcow2");
    let mut options = qcow2::CreateOptions::default();
    options
        .set_all("backing_file=base.qcow2,backing_fmt=qcow2,cluster_size=16k,extended_l2=on")
        .unwrap();
    qcow2::create(&top, &options).unwrap();
    let image = qcow2::Qcow2::open_path(&top).unwrap();
    let header = image.header();
    assert_eq!(header.size(), 3 << 20);
    assert!(header.has_extended_l2());
    assert_eq!(header.cluster_size(), 16384);
    assert_eq!(header.backing_format(), Some("qcow2"));
    let reader = image.reader().unwrap();
    let mut buf = vec![0xaau8; 3 << 20];
    assert_eq!(common::read_full(&reader, 0, &mut buf).unwrap(), 3 << 20);
    assert!(common::is_all_zero(&buf));

    let prealloc = dir.join("prealloc.qcow2");
    let options = qcow2::CreateOptions::new(5 << 20).preallocation(qcow2::Preallocation::Full);
    qcow2::create(&prealloc, &options).unwrap();
    let image = qcow2::Qcow2::open_path(&prealloc).unwrap();
    let reader = image.reader().unwrap();
    let mut all = vec![0xaau8; 5 << 20];
    assert_eq!(common::read_full(&reader, 0, &mut all).unwrap(), 5 << 20);
    assert!(common::is_all_zero(&all));
}

#[cfg(feature = "encryption")]
fn secret_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("secret.txt");
    std::fs::write(&path, "abc").unwrap();
    path
}

/// LUKS: QEMU opens what the crate makes with the same secret, and shows it encrypted with
/// its default cipher; the LUKS area follows the L1 table, cluster aligned, as QEMU places
/// it.
#[cfg(feature = "encryption")]
#[test]
fn create_luks_opens_in_qemu_with_the_secret() {
    let Some(qemu) = Qemu::find_or_skip("create_luks_opens_in_qemu_with_the_secret") else {
        return;
    };
    let dir = TempDir::new("create-luks");
    let path = dir.join("t.qcow2");
    qcow2::create(&path, &qcow2::CreateOptions::new(1 << 30).luks("abc")).unwrap();
    let image =
        qcow2::Qcow2::open_path_with(&path, &qcow2::OpenOptions::default().secret("abc")).unwrap();
    let header = image.header();
    assert_eq!(header.crypt_method(), 2);
    let ext = header.encryption().expect("encryption extension");
    assert_eq!(
        ext.offset, 0x40000,
        "LUKS area right after the L1 table's cluster"
    );
    let secret = secret_file(dir.path());
    let out = Command::new(&qemu.img)
        .current_dir(dir.path())
        .args(["info", "--output=json", "--object"])
        .arg(format!("secret,id=s0,file={}", secret.display()))
        .args([
            "--image-opts",
            "driver=qcow2,file.filename=t.qcow2,encrypt.key-secret=s0",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["encrypted"], serde_json::Value::Bool(true));
    assert_eq!(
        info["format-specific"]["data"]["encrypt"]["cipher-alg"],
        serde_json::Value::String("aes-256".into())
    );
    // QEMU opens an encrypted image for check only with its secret.
    let check = Command::new(&qemu.img)
        .current_dir(dir.path())
        .args(["check", "--object"])
        .arg(format!("secret,id=s0,file={}", secret.display()))
        .args([
            "--image-opts",
            "driver=qcow2,file.filename=t.qcow2,encrypt.key-secret=s0",
        ])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        text(&check.stdout),
        text(&check.stderr)
    );
    assert!(text(&check.stdout).contains("No errors were found on the image."));
}
