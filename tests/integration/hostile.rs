//! Malformed (hostile) images: each must be refused with its specific error, never with a
//! panic, a hang or a silently wrong read.
//!
//! The corpus is `fixtures/hostile/`, made from valid qemu-img images by
//! `fixtures/hostile/make-hostile.py`, which also records in `cases.tsv` what QEMU does with
//! each file (see `docs/hostile-images.md`). These tests need no QEMU.
//!
//! Stages: `Open` cases must fail in `Qcow2::open`; `Read` cases (bad table entries) may open
//! but reading the whole guest must fail; `Snapshot` cases open, and reading snapshot `s1`
//! must fail; `Chain` cases go through `Qcow2::open_path_with`.

use positioned_io::ReadAt;
use qcow2::{Error, FeatureKind, Limits, OpenOptions, Qcow2};
use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

/// Longer than any case takes by orders of magnitude; a case still running is hung.
const TIMEOUT: Duration = Duration::from_secs(30);
/// The corpus's guests are at most 64 KiB; an image that claims more is read this far only.
const READ_CAP: u64 = 64 << 20;
/// The corpus must stay small (it is committed).
const CORPUS_BUDGET: u64 = 5 << 19;

fn dir() -> PathBuf {
    crate::common::fixture("hostile")
}

fn path_of(name: &str) -> PathBuf {
    dir().join(format!("{name}.qcow2"))
}

/// The `qcow2::Error` carried by an `io::Error` from a read through a `Reader`.
fn qcow2_error(e: &io::Error) -> Option<&Error> {
    e.get_ref()?.downcast_ref::<Error>()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// `Qcow2::open` must fail.
    Open,
    /// Reading the whole guest must fail (failing at open is accepted too).
    Read,
    /// Open succeeds; reading snapshot `s1` must fail.
    Snapshot,
    /// `Qcow2::open_path_with`, with this `max_chain_depth` (default limits when `None`).
    Chain(Option<u32>),
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Open => "open",
            Stage::Read => "read",
            Stage::Snapshot => "snapshot",
            Stage::Chain(_) => "chain",
        }
    }
}

/// What the crate did with a file.
#[derive(Debug)]
enum Outcome {
    /// Refused with a `qcow2::Error`, at `when` (`open`, `reader`, `read at 0x..`, ...).
    Refused { when: String, error: Error },
    /// A read failed with an `io::Error` that does not carry a `qcow2::Error`.
    ForeignIo { when: String, error: io::Error },
    /// No error: everything asked for worked.
    Accepted { detail: String },
}

fn panic_message(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".to_owned())
}

/// Run `f` on another thread; fail loudly if it panics or does not finish in time.
fn guarded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(panic::catch_unwind(AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok(Ok(v)) => v,
        Ok(Err(p)) => panic!("{what}: the crate PANICKED: {}", panic_message(&*p)),
        Err(_) => panic!("{what}: no answer after {TIMEOUT:?}: the crate HANGS"),
    }
}

/// Read `size` bytes (at most [`READ_CAP`]) in 64 KiB pieces; the first failure, with where.
fn read_all(reader: &impl ReadAt, size: u64) -> Result<Vec<u8>, (u64, io::Error)> {
    let end = size.min(READ_CAP);
    let mut out = vec![0u8; end as usize];
    let mut pos = 0u64;
    while pos < end {
        let at = pos as usize;
        let want = (end - pos).min(64 << 10) as usize;
        match reader.read_at(pos, &mut out[at..at + want]) {
            Ok(0) => {
                return Err((
                    pos,
                    io::Error::new(io::ErrorKind::UnexpectedEof, "read returned 0 in the guest"),
                ))
            }
            Ok(n) => pos += n as u64,
            Err(e) => return Err((pos, e)),
        }
    }
    Ok(out)
}

fn refused(when: impl Into<String>, error: Error) -> Outcome {
    let _ = error.to_string(); // Display must not panic either
    Outcome::Refused {
        when: when.into(),
        error,
    }
}

fn read_failure(what: &str, at: u64, e: io::Error) -> Outcome {
    let when = format!("{what} at {at:#x}");
    let carried = e
        .get_ref()
        .is_some_and(|inner| inner.downcast_ref::<Error>().is_some());
    if !carried {
        return Outcome::ForeignIo { when, error: e };
    }
    let inner = e
        .into_inner()
        .expect("checked above")
        .downcast::<Error>()
        .expect("checked above");
    refused(when, *inner)
}

/// Read the whole active guest of an opened image.
fn read_image(image: &Qcow2<File>) -> Outcome {
    let reader = match image.reader() {
        Ok(r) => r,
        Err(e) => return refused("reader()", e),
    };
    match read_all(&reader, reader.guest_size()) {
        Ok(data) => Outcome::Accepted {
            detail: format!("read {} guest bytes", data.len()),
        },
        Err((at, e)) => read_failure("read", at, e),
    }
}

fn attempt(name: &str, stage: Stage) -> Outcome {
    let path = path_of(name);
    let opened = match stage {
        Stage::Chain(depth) => {
            let mut limits = Limits::default();
            if let Some(d) = depth {
                limits.max_chain_depth = d;
            }
            Qcow2::open_path_with(&path, &OpenOptions::new().limits(limits))
        }
        _ => Qcow2::open(File::open(&path).expect("open corpus file")),
    };
    let image = match opened {
        Ok(i) => i,
        Err(e) => return refused("open", e),
    };
    match stage {
        Stage::Open | Stage::Read | Stage::Chain(_) => match read_image(&image) {
            Outcome::Accepted { detail } if stage != Stage::Read => Outcome::Accepted {
                detail: format!("opened; {detail}"),
            },
            Outcome::Refused { when, error } if stage != Stage::Read => Outcome::Accepted {
                detail: format!("opened; then {when} failed with {error:?}"),
            },
            other => other,
        },
        Stage::Snapshot => {
            let reader = match image.snapshot_reader("s1") {
                Ok(r) => r,
                Err(e) => return refused("snapshot_reader(\"s1\")", e),
            };
            match read_all(&reader, reader.guest_size()) {
                Ok(data) => Outcome::Accepted {
                    detail: format!("read {} bytes of snapshot s1", data.len()),
                },
                Err((at, e)) => read_failure("snapshot read", at, e),
            }
        }
    }
}

/// Check one case: the crate must refuse `name` with an error that `check` accepts.
fn expect_refusal(name: &'static str, stage: Stage, pattern: &str, check: fn(&Error) -> bool) {
    let outcome = guarded(name, move || attempt(name, stage));
    match outcome {
        Outcome::Refused { when, error } => {
            assert!(
                check(&error),
                "{name}: WRONG ERROR at {when}: expected `{pattern}`, got {error:?} ({error})"
            );
            match stage {
                Stage::Open | Stage::Chain(_) => assert_eq!(
                    when, "open",
                    "{name}: refused with the right error, but at {when}, not at open"
                ),
                Stage::Snapshot => assert_ne!(
                    when, "open",
                    "{name}: the whole image was refused at open; only snapshot s1 is bad"
                ),
                Stage::Read => {}
            }
        }
        Outcome::ForeignIo { when, error } => panic!(
            "{name}: {when} failed with an io::Error that carries no qcow2::Error: \
             {error:?}; expected `{pattern}`"
        ),
        Outcome::Accepted { detail } => {
            panic!("{name}: ACCEPTED ({detail}); expected `{pattern}`")
        }
    }
}

/// The variant name of a pattern as `stringify!` renders it (`Error :: Malformed { .. }`).
fn variant(pattern: &str) -> String {
    let rest = pattern.split("::").nth(1).unwrap_or(pattern).trim_start();
    rest.chars().take_while(|c| c.is_alphanumeric()).collect()
}

macro_rules! hostile_cases {
    ($( $test:ident: $name:literal, $stage:expr => $pat:pat $(if $guard:expr)?, )*) => {
        /// (file name without `.qcow2`, stage, expected pattern) of every refusal case.
        const CASES: &[(&str, Stage, &str)] = &[ $( ($name, $stage, stringify!($pat)) ),* ];
        $(
            #[test]
            fn $test() {
                expect_refusal($name, $stage, stringify!($pat $(if $guard)?), |e: &Error| {
                    matches!(e, $pat $(if $guard)?)
                });
            }
        )*
    };
}

use Stage::{Chain, Open, Read, Snapshot};

hostile_cases! {
    // Magic, version, cluster size, header length (iotest 080).
    magic_bad: "magic-bad", Open => Error::NotQcow2 { found: 0x5146_4afb },
    version_1: "version-1", Open => Error::UnsupportedVersion { version: 1 },
    version_4: "version-4", Open => Error::UnsupportedVersion { version: 4 },
    cluster_bits_0: "cluster-bits-0", Open => Error::Malformed { offset: 20, .. },
    cluster_bits_8: "cluster-bits-8", Open => Error::Malformed { offset: 20, .. },
    cluster_bits_22: "cluster-bits-22", Open => Error::Malformed { offset: 20, .. },
    cluster_bits_63: "cluster-bits-63", Open => Error::Malformed { offset: 20, .. },
    header_length_100: "header-length-100", Open => Error::Malformed { offset: 100, .. },
    header_length_huge: "header-length-huge", Open => Error::Malformed { offset: 100, .. },
    refcount_order_7: "refcount-order-7", Open => Error::Malformed { offset: 96, .. },
    // Encryption.
    // AES images open for their metadata; reads need the secret.
    crypt_aes: "crypt-aes", Read => Error::Encrypted { method: 1, .. },
    crypt_luks: "crypt-luks", Open => Error::Malformed { offset: 32, .. },
    crypt_3: "crypt-3", Open => Error::Malformed { offset: 32, .. },
    // L1 table and virtual size.
    l1_size_huge: "l1-size-huge", Open => Error::LimitExceeded { requested: 0x200_0008, .. },
    l1_size_4g: "l1-size-4g", Open => Error::LimitExceeded { .. },
    l1_offset_unaligned: "l1-offset-unaligned", Open => Error::Malformed { offset: 40, .. },
    l1_offset_past_eof: "l1-offset-past-eof", Open => Error::PastEnd { what: "L1 table", .. },
    l1_offset_overflow: "l1-offset-overflow", Open => Error::Malformed { offset: 40, .. },
    l1_size_too_small: "l1-size-too-small", Open => Error::Malformed { .. },
    virtual_size_2e64: "virtual-size-2e64", Open => Error::Malformed { offset: 24, .. },
    // Refcount table.
    reftable_huge: "reftable-huge", Open => Error::LimitExceeded { .. },
    reftable_unaligned: "reftable-unaligned", Open => Error::Malformed { offset: 48, .. },
    reftable_zero_clusters: "reftable-zero-clusters", Open => Error::Malformed { offset: 56, .. },
    reftable_past_eof: "reftable-past-eof", Open => Error::PastEnd { what: "refcount table", .. },
    reftable_offset_overflow: "reftable-offset-overflow", Open => Error::Malformed { offset: 48, .. },
    reftable_at_zero: "reftable-at-zero", Open => Error::Malformed { offset: 48, .. },
    // Snapshot table.
    snap_table_unaligned: "snap-table-unaligned", Open => Error::Malformed { offset: 64, .. },
    snap_count_huge: "snap-count-huge", Open => Error::LimitExceeded { requested: 65537, .. },
    snap_table_past_eof: "snap-table-past-eof", Open => Error::PastEnd { what: "snapshot table entry", .. },
    snap_table_overflow: "snap-table-overflow", Open => Error::Malformed { offset: 64, .. },
    snap_extra_huge: "snap-extra-huge", Open => Error::LimitExceeded { requested: 1032, .. },
    snap_l1_unaligned: "snap-l1-unaligned", Snapshot => Error::Malformed { .. },
    snap_l1_huge: "snap-l1-huge", Snapshot => Error::LimitExceeded { .. },
    // Backing file name.
    backing_name_1024: "backing-name-1024", Open => Error::LimitExceeded { requested: 1024, .. },
    backing_name_past_cluster: "backing-name-past-cluster", Open => Error::Malformed { .. },
    backing_offset_past_cluster: "backing-offset-past-cluster", Open => Error::Malformed { offset: 8, .. },
    // Header extensions.
    ext_overflow: "ext-overflow", Open => Error::Malformed { offset: 112, .. },
    ext_overflow_backing_name: "ext-overflow-backing-name", Open => Error::Malformed { offset: 112, .. },
    ext_backing_format_twice: "ext-backing-format-twice", Open => Error::Malformed { .. },
    ext_backing_format_16: "ext-backing-format-16", Open => Error::Malformed { .. },
    bitmaps_ext_short: "bitmaps-ext-short", Open => Error::Malformed { .. },
    bitmaps_ext_reserved: "bitmaps-ext-reserved", Open => Error::Malformed { .. },
    bitmaps_dir_past_eof: "bitmaps-dir-past-eof", Open => Error::PastEnd { what: "bitmap directory", .. },
    bitmaps_ext_short_stale: "bitmaps-ext-short-stale", Open => Error::Malformed { offset: 120, .. },
    // Bitmap directory entries (at 0xa00) and tables (at 0x800), as QEMU loads them.
    bitmap_type_2: "bitmap-type-2", Open => Error::Malformed { offset: 0xa00, .. },
    bitmap_flags_reserved: "bitmap-flags-reserved", Open => Error::Malformed { offset: 0xa00, .. },
    bitmap_granularity_8: "bitmap-granularity-8", Open => Error::Malformed { offset: 0xa00, .. },
    bitmap_table_unaligned: "bitmap-table-unaligned", Open => Error::Malformed { offset: 0xa00, .. },
    bitmap_table_size_2: "bitmap-table-size-2", Open => Error::Malformed { offset: 0xa00, .. },
    bitmap_extra_data: "bitmap-extra-data", Open => Error::Malformed { offset: 0xa00, .. },
    bitmap_count_2: "bitmap-count-2", Open => Error::Malformed { offset: 0xa00, .. },
    bitmap_dir_8_longer: "bitmap-dir-8-longer", Open => Error::Malformed { offset: 0xa20, .. },
    bitmap_duplicate_name: "bitmap-duplicate-name", Open => Error::Malformed { offset: 0xa20, .. },
    bitmap_table_entry_reserved: "bitmap-table-entry-reserved", Open => Error::Malformed {
        offset: 0x800, ..
    },
    // Feature bits and compression type.
    incompat_bit9: "incompat-bit9", Open => Error::UnsupportedFeature {
        kind: FeatureKind::Incompatible, bit: 9, name, ..
    } if name == "unknown",
    incompat_bit9_named: "incompat-bit9-named", Open => Error::UnsupportedFeature {
        kind: FeatureKind::Incompatible, bit: 9, name, ..
    } if name == "hostile feature nine",
    corrupt_bit: "corrupt-bit", Open => Error::Corrupt,
    compression_type_2: "compression-type-2", Open => Error::Malformed { offset: 104, .. },
    zstd_without_bit: "zstd-without-bit", Open => Error::Malformed { .. },
    zlib_with_bit: "zlib-with-bit", Open => Error::Malformed { .. },
    extl2_4k_clusters: "extl2-4k-clusters", Open => Error::Malformed { .. },
    // Truncated files.
    trunc_50: "trunc-50", Open => Error::TooShort { len: 50 },
    trunc_mid_l1: "trunc-mid-l1", Open => Error::PastEnd { what: "L1 table", .. },
    trunc_mid_l2: "trunc-mid-l2", Read => Error::PastEnd { what: "L2 table", .. },
    // L1 and L2 entries (iotest 060): the offset is the bad entry's.
    l1_entry_past_eof: "l1-entry-past-eof", Read => Error::PastEnd { what: "L2 table", .. },
    l1_entry_unaligned: "l1-entry-unaligned", Read => Error::Misaligned { what: "L2 table", at: 0x3000, .. },
    l2_entry_unaligned: "l2-entry-unaligned", Read => Error::Misaligned { what: "data cluster", at: 0x4000, .. },
    l2_entry_past_eof: "l2-entry-past-eof", Read => Error::PastEnd { what: "data cluster", .. },
    l2_zero_unaligned: "l2-zero-unaligned", Read => Error::Misaligned { what: "data cluster", at: 0x4000, .. },
    compressed_past_eof: "compressed-past-eof", Read => Error::BadCompressedCluster {
        guest_offset: 0, host_offset: 0x10_0000, ..
    },
    compressed_garbage_zlib: "compressed-garbage-zlib", Read => Error::BadCompressedCluster {
        guest_offset: 0, ..
    },
    compressed_garbage_zstd: "compressed-garbage-zstd", Read => Error::BadCompressedCluster {
        guest_offset: 0, ..
    },
    v2_zero_flag: "v2-zero-flag", Read => Error::InvalidL2Entry { entry_at: 0x4000, .. },
    data_file_raw_no_bit: "data-file-raw-no-bit", Open => Error::Malformed { offset: 88, .. },
    crypt_ext_no_luks: "crypt-ext-no-luks", Open => Error::Malformed { .. },
    incompat_bits_9_12: "incompat-bits-9-12", Open => Error::UnsupportedFeature {
        kind: FeatureKind::Incompatible, bit: 9, ref all, ..
    } if all.iter().map(|f| f.bit).collect::<Vec<_>>() == [9, 12],
    extl2_alloc_and_zero: "extl2-alloc-and-zero", Read => Error::InvalidL2Entry { entry_at: 0x1_0000, .. },
    extl2_unalloc_with_alloc_bits: "extl2-unalloc-with-alloc-bits", Read => Error::InvalidL2Entry {
        entry_at: 0x1_0010, ..
    },
    // Backing chains.
    loop_self: "loop-self", Chain(None) => Error::BackingChain { .. },
    loop_a: "loop-a", Chain(None) => Error::BackingChain { .. },
    deep_top: "deep-top", Chain(Some(1)) => Error::BackingChain { .. },
}

/// Cases that must be accepted (QEMU reads them too), by name.
const ACCEPTED: &[&str] = &[
    "bitmaps-ext-stale",
    "trunc-last-data",
    "l1-entry-is-l1",
    "data-file-name-no-bit",
    "bitmap-name-empty",
    "bitmap-in-use-bad-table",
];

/// Valid images the cases are made from, and the other members of the chain cases.
const BASES: &[&str] = &[
    "base-empty",
    "base-4k",
    "base-snap",
    "base-backing",
    "base-extl2",
    "base-bitmap",
    "base-zlib",
    "base-zstd",
    "base-v2",
    "base-bitmap-512",
];
const CHAIN_MEMBERS: &[&str] = &["loop-b", "deep-mid", "deep-base"];

fn open_and_read(name: &'static str) -> (Option<Qcow2<File>>, Outcome) {
    guarded(name, move || {
        match Qcow2::open_path_with(path_of(name), &OpenOptions::new()) {
            Ok(image) => {
                let outcome = read_image(&image);
                (Some(image), outcome)
            }
            Err(e) => (None, refused("open", e)),
        }
    })
}

fn expect_accepted(name: &'static str) -> (Qcow2<File>, Vec<u8>) {
    let (image, outcome) = open_and_read(name);
    match outcome {
        Outcome::Accepted { .. } => {}
        other => panic!("{name}: must open and read like QEMU does, got {other:?}"),
    }
    let image = image.expect("opened");
    let data = {
        let reader = image.reader().expect("reader");
        read_all(&reader, reader.guest_size()).expect("second read")
    };
    (image, data)
}

#[test]
fn bases_are_valid() {
    for &name in BASES.iter().chain(&["deep-mid", "deep-base"]) {
        let (image, data) = expect_accepted(name);
        assert_eq!(data.len() as u64, image.guest_size(), "{name}");
    }
    let (image, data) = expect_accepted("base-4k");
    assert!(data[..4096].iter().all(|&b| b == 0x11), "base-4k data");
    assert!(data[4096..].iter().all(|&b| b == 0), "base-4k zeros");
    assert_eq!(image.cluster_size(), 4096);
    let (image, _) = expect_accepted("base-snap");
    let snap = image.snapshot_reader("s1").expect("base-snap has s1");
    read_all(&snap, snap.guest_size()).expect("base-snap s1 reads");
    let (image, _) = expect_accepted("base-bitmap");
    assert_eq!(image.bitmaps().len(), 1, "base-bitmap lists b0");
}

#[test]
fn deep_chain_opens_within_the_default_limit() {
    let (image, data) = expect_accepted("deep-top");
    assert_eq!(
        image.info().backing_chain.len(),
        2,
        "deep-mid and deep-base"
    );
    assert!(data.iter().all(|&b| b == 0));
}

#[test]
fn stale_bitmaps_extension_is_ignored() {
    // Autoclear bit 0 clear: the spec says the extension is stale; QEMU warns and ignores it.
    let (image, data) = expect_accepted("bitmaps-ext-stale");
    assert!(
        image.bitmaps().is_empty(),
        "stale bitmaps must not be listed"
    );
    assert!(data.iter().all(|&b| b == 0));
}

#[test]
fn bitmap_oddities_qemu_accepts() {
    let (image, _) = expect_accepted("bitmap-name-empty");
    let names: Vec<&str> = image.bitmaps().iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, [""], "an empty name is listed as QEMU lists it");
    assert_eq!(image.dirty_extents("").unwrap().count(), 0);
    // In use: QEMU does not read the table at open; reading it anyway finds the bad entry.
    let (image, _) = expect_accepted("bitmap-in-use-bad-table");
    assert!(matches!(
        image.dirty_extents("b0"),
        Err(Error::BitmapInUse { .. })
    ));
    assert!(matches!(
        image.dirty_extents_allow_in_use("b0"),
        Err(Error::Malformed { offset: 0x800, .. })
    ));
}

#[test]
fn truncated_last_data_cluster_reads_zeros_past_the_end() {
    let (_image, data) = expect_accepted("trunc-last-data");
    assert!(
        data[..2048].iter().all(|&b| b == 0x11),
        "the half still in the file"
    );
    assert!(
        data[2048..].iter().all(|&b| b == 0),
        "the cut half reads as zeros"
    );
}

#[test]
fn a_data_file_name_without_the_data_file_bit_is_never_used() {
    let (image, data) = expect_accepted("data-file-name-no-bit");
    assert_eq!(image.header().data_file(), Some("/usr/bin/qemu-img"));
    assert_eq!(image.header().external_data_file(), None);
    assert!(
        data[..4096].iter().all(|&b| b == 0x11),
        "the image's own data"
    );
    // Opened by path, no file is opened for it either (under a policy that allows nothing).
    let options = OpenOptions::new().files(qcow2::FilePolicy::Nothing);
    let image = Qcow2::open_path_with(path_of("data-file-name-no-bit"), &options).unwrap();
    let mut buf = [0u8; 4096];
    image.reader().unwrap().read_exact_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x11));
}

#[test]
fn l1_entry_pointing_at_the_l1_table_reads_garbage_without_error() {
    expect_accepted("l1-entry-is-l1");
}

#[test]
fn io_errors_from_reads_carry_the_qcow2_error() {
    let image = Qcow2::open(File::open(path_of("l2-entry-unaligned")).unwrap()).unwrap();
    let reader = image.reader().unwrap();
    let mut buf = [0u8; 512];
    let e = reader.read_at(0, &mut buf).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(
        matches!(qcow2_error(&e), Some(Error::Misaligned { .. })),
        "{e:?}"
    );
}

/// With the limits lifted, tables the file cannot hold must still fail fast as malformed
/// (the reader allocates as data arrives, not what the header claims).
#[test]
fn unlimited_limits_still_refuse_tables_past_the_end() {
    for name in [
        "l1-size-4g",
        "reftable-huge",
        "snap-count-huge",
        "snap-l1-huge",
    ] {
        let outcome = guarded(name, move || {
            let options = OpenOptions::new().limits(Limits::unlimited());
            let file = File::open(path_of(name)).expect("open corpus file");
            match Qcow2::open_with(file, &options) {
                Err(e) => refused("open", e),
                Ok(image) => match image.snapshot_reader("s1") {
                    Err(e) => refused("snapshot_reader(\"s1\")", e),
                    Ok(_) => Outcome::Accepted {
                        detail: "opened, snapshot s1 too".to_owned(),
                    },
                },
            }
        });
        assert!(
            matches!(
                outcome,
                Outcome::Refused {
                    error: Error::Malformed { .. } | Error::PastEnd { .. },
                    ..
                }
            ),
            "{name} with Limits::unlimited(): expected Malformed, got {outcome:?}"
        );
    }
}

/// `cases.tsv`, the test table above and the files on disk all list the same cases.
#[test]
fn corpus_tests_and_cases_tsv_agree() {
    let tsv = std::fs::read_to_string(dir().join("cases.tsv")).expect("cases.tsv");
    let mut rows = BTreeMap::new();
    for line in tsv.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 8, "cases.tsv line {line:?}");
        assert!(
            rows.insert(cols[0], (cols[2], cols[3])).is_none(),
            "{} twice",
            cols[0]
        );
    }
    let mut listed = BTreeSet::new();
    for &(name, stage, pattern) in CASES {
        let (tsv_stage, tsv_kind) = rows
            .get(name)
            .unwrap_or_else(|| panic!("{name} is tested but not in cases.tsv"));
        assert_eq!(*tsv_stage, stage.name(), "{name}: stage");
        assert_eq!(*tsv_kind, variant(pattern), "{name}: expected error kind");
        listed.insert(name);
    }
    for &name in ACCEPTED {
        assert_eq!(rows.get(name), Some(&("ok", "ok")), "{name}");
        listed.insert(name);
    }
    for name in rows.keys() {
        assert!(
            listed.contains(name),
            "{name} is in cases.tsv but not tested"
        );
    }
    let mut total = 0;
    for entry in std::fs::read_dir(dir()).unwrap() {
        let entry = entry.unwrap();
        total += entry.metadata().unwrap().len();
        let file = entry.file_name().into_string().unwrap();
        let Some(stem) = file.strip_suffix(".qcow2") else {
            continue;
        };
        assert!(
            listed.contains(stem) || BASES.contains(&stem) || CHAIN_MEMBERS.contains(&stem),
            "{file} is in the corpus but belongs to no case"
        );
    }
    assert!(total < CORPUS_BUDGET, "corpus is {total} bytes");
    assert!(CASES.len() >= 60, "only {} refusal cases", CASES.len());
}

/// A reader's second read finds the L2 entry in the slice it kept (read in place, not taken
/// from the shared cache): a bad entry is reported the same way, at the same place, each time.
#[test]
fn a_bad_l2_entry_is_reported_alike_by_every_read_of_a_reader() {
    let image = Qcow2::open_path(path_of("l2-entry-unaligned")).unwrap();
    let reader = image.reader().unwrap();
    let mut buf = [0u8; 512];
    for attempt in 0..3 {
        let e = reader.read_exact_at(0, &mut buf).unwrap_err();
        let e = qcow2_error(&e).unwrap_or_else(|| panic!("read {attempt}: {e:?}"));
        assert!(
            matches!(
                e,
                Error::Misaligned {
                    what: "data cluster",
                    at: 0x4000,
                    ..
                }
            ),
            "read {attempt}: {e:?}"
        );
    }
}
