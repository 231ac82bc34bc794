//! The same qemu-io scripts through `qemu-io` and through `qcow2 io`, on two copies of every
//! kind of image QEMU writes: the same output (timing lines aside), the same exit status,
//! the same guest afterwards (`qemu-img compare`), and the crate's copy clean with no leaks
//! (`qemu-img check`). Scripts come from `tests/common/qemu_io.rs`; QEMU's own output is
//! checked first to hold no failed pattern verification (the script's model of the guest
//! is right).
//!
//! `QCOW2_IO_SCRIPTS_SEEDS=N` runs N more seeds per kind.
//!
//! Where the writer is known to allocate stretches of zeros otherwise than QEMU
//! (`ZEROS_MAY_BE_ALLOCATED_OTHERWISE`), the maps may differ there only, and the
//! difference is printed.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::qemu_io::{
    allocation_differences, assert_same_lines, map_runs, run_io, Geometry, ScriptGen,
};
use common::{Env, Rng};

const BIN: &str = env!("CARGO_BIN_EXE_qcow2");

/// The secret of the encrypted cases, as both tools take it.
const SECRET: &str = "secret,id=sec0,data=hunter2";

/// How a case's two images are made and opened.
struct Kind {
    /// `qemu-img create -o` options (empty: QEMU's defaults).
    opts: &'static str,
    geo: Geometry,
    /// What the image holds before the script.
    start: Start,
    /// Encrypted with this `encrypt.format` (`luks`, `aes`): opened with `--object secret`
    /// and `--image-opts`.
    encrypted: Option<&'static str>,
}

/// What a case's image holds before the script.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Nothing.
    Empty,
    /// An empty overlay over `base.qcow2`, which has data.
    Overlay,
    /// `qemu-img convert -c` of text with these `-o` options.
    #[cfg_attr(not(any(feature = "zlib", feature = "zstd")), allow(dead_code))]
    Compressed(&'static str),
    /// Data, with two internal snapshots taken along the way.
    Snapshots,
    /// Its data in an external data file (`NAME.data`).
    DataFile,
    /// Data, then two persistent dirty bitmaps: `on` (enabled) and `off` (disabled).
    Bitmaps,
    /// Data written by a qemu-io killed before it closed a `lazy_refcounts=on` image: the
    /// dirty bit set, refcounts not written.
    Dirty,
}

impl Kind {
    fn new(opts: &'static str, geo: Geometry) -> Kind {
        Kind {
            opts,
            geo,
            start: Start::Empty,
            encrypted: None,
        }
    }

    fn starting(mut self, start: Start) -> Kind {
        self.start = start;
        self
    }

    /// Make the image `name` (and its data file), the same way each time.
    fn make(&self, env: &Env, name: &str) {
        let size = self.geo.size;
        let mut opts = self.opts.to_owned();
        let mut add = |o: String| {
            if !opts.is_empty() {
                opts.push(',');
            }
            opts.push_str(&o);
        };
        match self.encrypted {
            Some("luks") => {
                add("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10".into())
            }
            Some(format) => add(format!("encrypt.format={format},encrypt.key-secret=sec0")),
            None => {}
        }
        if self.start == Start::DataFile {
            add(format!("data_file={name}.data"));
        }
        match self.start {
            Start::Empty | Start::DataFile => {
                let mut args = vec!["create", "-q", "-f", "qcow2"];
                if self.encrypted.is_some() {
                    args.extend(["--object", SECRET]);
                }
                if !opts.is_empty() {
                    args.extend(["-o", &opts]);
                }
                let size = size.to_string();
                args.extend([name, &size]);
                env.img(&args);
            }
            Start::Overlay => {
                if !env.path("base.qcow2").exists() {
                    env.create("base.qcow2", size, "");
                    env.io(
                        "base.qcow2",
                        &[
                            format!("write -P 0x11 0 {}", size / 2),
                            format!("write -P 0x22 {} {}", size / 3, self.geo.cluster * 5 + 77),
                            format!("write -z {} {}", size / 4, self.geo.cluster * 2),
                        ],
                    );
                }
                env.create_over(name, size, &opts, "base.qcow2", "qcow2");
            }
            Start::Compressed(copts) => {
                if !env.path("text.raw").exists() {
                    let mut text = vec![0u8; size as usize];
                    // Text in most clusters, zeros in some, so that some compress.
                    Rng::new(size).fill_text(&mut text[..(size as usize) * 3 / 4]);
                    std::fs::write(env.path("text.raw"), text).expect("write text.raw");
                }
                env.compress("text.raw", name, copts);
            }
            Start::Snapshots => {
                env.create(name, size, &opts);
                env.io(name, &[format!("write -P 3 0 {}", size * 5 / 8)]);
                env.img(&["snapshot", "-c", "one", name]);
                env.io(name, &[format!("write -P 4 {} {}", size / 8, size / 4)]);
                env.img(&["snapshot", "-c", "two", name]);
            }
            Start::Dirty => {
                env.create(name, size, &opts);
                let writes = [format!("write -P 8 0 {}", size / 4)];
                env.qemu.io_crash(env.dir.path(), "qcow2", name, &writes);
            }
            Start::Bitmaps => {
                env.create(name, size, &opts);
                env.io(name, &[format!("write -P 5 0 {}", size / 2)]);
                env.img(&["bitmap", "--add", "-g", "128k", name, "on"]);
                env.img(&["bitmap", "--add", "--disable", name, "off"]);
                env.io(name, &["write -P 6 64k 64k"]);
            }
        }
    }

    /// The names of QEMU's copy and ours.
    fn names(&self) -> (String, String) {
        ("theirs.qcow2".into(), "ours.qcow2".into())
    }

    /// The arguments before the image, and the image argument, for both tools.
    fn open_args(&self, name: &str) -> (Vec<String>, String) {
        if self.encrypted.is_some() {
            (
                vec!["--object".into(), SECRET.into(), "--image-opts".into()],
                format!("driver=qcow2,file.filename={name},encrypt.key-secret=sec0"),
            )
        } else {
            (vec!["-f".into(), "qcow2".into()], name.to_owned())
        }
    }

    /// The guest of `name` as QEMU reads it.
    fn guest(&self, env: &Env, name: &str) -> Vec<u8> {
        if self.encrypted.is_some() {
            let opts = format!("driver=qcow2,file.filename={name},encrypt.key-secret=sec0");
            env.convert(&opts, &["--object", SECRET, "--image-opts"])
        } else {
            env.convert(name, &[])
        }
    }
}

/// Run `count` commands from `seed` through both tools on fresh copies of `kind`, and check
/// everything the issue asks: same output and status, same guest, our copy clean.
fn differential(test: &str, kind: &Kind, seeds: &[u64], count: usize) {
    let Some(env) = Env::new(test) else { return };
    let (theirs_name, ours_name) = kind.names();
    let (theirs_img, ours_img) = (theirs_name.as_str(), ours_name.as_str());
    for seed in with_extra_seeds(seeds) {
        kind.make(&env, theirs_img);
        if kind.start == Start::DataFile {
            // Each copy with its own data file.
            kind.make(&env, ours_img);
        } else {
            // A copy, bit for bit (a LUKS header made twice would differ).
            env.copy(theirs_img, ours_img);
        }
        let initial = kind.guest(&env, theirs_img);
        let mut script = ScriptGen::new(seed, kind.geo, &initial);
        let commands = script.script(count);
        // Kept with the images (QCOW2_KEEP_TEMP=1) to replay a failure by hand.
        let listing: String = commands.iter().map(|c| format!("{c}\n")).collect();
        std::fs::write(env.path("script.txt"), listing).expect("write script.txt");
        let what = format!("{test} (seed {seed})");

        let (args, image) = kind.open_args(theirs_img);
        let theirs = run_io(&env.qemu.io, &[], env.dir.path(), &args, &image, &commands);
        assert!(
            !theirs.stdout.contains("Pattern verification failed"),
            "{what}: the script's model disagrees with QEMU:\n{}",
            theirs.stdout
        );
        assert_eq!(
            theirs.status,
            Some(0),
            "{what}: qemu-io failed: {}",
            theirs.stderr
        );

        let (args, image) = kind.open_args(ours_img);
        let mut ours = run_io(
            Path::new(BIN),
            &["io"],
            env.dir.path(),
            &args,
            &image,
            &commands,
        );
        // `info` names the data file, which is each copy's own.
        let data_file = |img: &str| format!("    data file: {img}.data\n");
        ours.stdout = ours
            .stdout
            .replace(&data_file(ours_img), &data_file(theirs_img));
        // Everything but the allocation map first, then the guests and our image's health,
        // then the map (what the image itself holds, cluster by cluster).
        let (t, o) = (theirs.stdout_unmapped(), ours.stdout_unmapped());
        assert_same_lines(&what, "stdout (map aside)", &t, &o, &ours);
        compare_guests(&env, kind, &what);
        let leaks = check_clean(&env, kind, ours_img, &what);
        assert_eq!(leaks, 0, "{what}: our image leaks {leaks} clusters");
        let (t, o) = (theirs.map_lines(), ours.map_lines());
        match ZEROS_MAY_BE_ALLOCATED_OTHERWISE {
            Some(why) if t != o => {
                let guest = kind.guest(&env, theirs_img);
                let differences =
                    allocation_differences(&map_runs(&theirs.stdout), &map_runs(&ours.stdout));
                // What `alloc` printed along the way is only compared without the switch:
                // it may show the same difference at an earlier time.
                for &(off, len) in &differences {
                    let stretch = &guest[off as usize..(off + len) as usize];
                    if !common::is_all_zero(stretch) {
                        assert_same_lines(&what, "the allocation map", &t, &o, &ours);
                    }
                }
                eprintln!(
                    "{what}: KNOWN DIFFERENCE ({why}): the allocation differs from QEMU's \
                     over {} stretches of zeros",
                    differences.len()
                );
            }
            _ => assert_same_lines(&what, "the allocation map", &t, &o, &ours),
        }
        // QEMU reports on stderr the refcounts it repairs when it opens a dirty image; the
        // writer repairs them without a word.
        let qemu_stderr: String = theirs
            .stderr_normalised()
            .lines()
            .filter(|l| kind.start != Start::Dirty || !is_repair_line(l))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            ours.stderr_normalised(),
            qemu_stderr,
            "{what}: stderr differs from qemu-io's"
        );
        assert_eq!(ours.status, theirs.status, "{what}: exit status differs");
        let qemu_leaks = check_clean(&env, kind, theirs_img, &what);
        if qemu_leaks > 0 {
            eprintln!("{what}: QEMU's own copy leaks {qemu_leaks} clusters (ours none)");
        }
        if kind.start == Start::Bitmaps {
            for bitmap in ["on", "off"] {
                let dump = |image: &str| {
                    let out = Command::new(BIN)
                        .current_dir(env.dir.path())
                        .args(["bitmap", "--dump", bitmap, image])
                        .output()
                        .expect("run qcow2 bitmap");
                    assert!(
                        out.status.success(),
                        "{what}: bitmap {bitmap} of {image}: {out:?}"
                    );
                    String::from_utf8_lossy(&out.stdout).into_owned()
                };
                assert_eq!(
                    dump(ours_img),
                    dump(theirs_img),
                    "{what}: bitmap {bitmap} differs from QEMU's"
                );
            }
        }
        if kind.start == Start::Snapshots {
            for snap in ["one", "two"] {
                let a = env.convert(theirs_img, &["-l", snap]);
                let b = env.convert(ours_img, &["-l", snap]);
                assert!(a == b, "{what}: snapshot {snap} differs after the script");
            }
        }
    }
}

/// Whether `line` is one of those QEMU prints when it repairs the refcounts of a dirty
/// image (`qcow2_check_refcounts`).
fn is_repair_line(line: &str) -> bool {
    [
        "ERROR cluster ",
        "ERROR OFLAG_COPIED ",
        "Rebuilding refcount structure",
        "Repairing ",
    ]
    .iter()
    .any(|start| line.starts_with(start))
}

/// `seeds`, then as many more as `QCOW2_IO_SCRIPTS_SEEDS` says (none by default): a longer
/// hunt for differences on demand, each extra seed derived from the first.
fn with_extra_seeds(seeds: &[u64]) -> Vec<u64> {
    let extra: u64 = std::env::var("QCOW2_IO_SCRIPTS_SEEDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let first = seeds.first().copied().unwrap_or(0);
    let more = (1..=extra).map(|i| first * 1_000_003 + i);
    seeds.iter().copied().chain(more).collect()
}

/// `qemu-img compare` of the two copies: identical guests.
fn compare_guests(env: &Env, kind: &Kind, what: &str) {
    let (theirs_name, ours_name) = kind.names();
    let (theirs_img, ours_img) = (theirs_name.as_str(), ours_name.as_str());
    let mut cmd = Command::new(&env.qemu.img);
    cmd.current_dir(env.dir.path()).arg("compare");
    if kind.encrypted.is_some() {
        let (_, theirs) = kind.open_args(theirs_img);
        let (_, ours) = kind.open_args(ours_img);
        cmd.args(["--object", SECRET, "--image-opts", &theirs, &ours]);
    } else {
        cmd.args(["-f", "qcow2", "-F", "qcow2", theirs_img, ours_img]);
    }
    let out = cmd.output().expect("run qemu-img compare");
    assert!(
        out.status.success(),
        "{what}: the guests differ: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check` of `name`: no corruption, no check errors (panics otherwise); returns
/// the leaked clusters.
fn check_clean(env: &Env, kind: &Kind, name: &str, what: &str) -> u64 {
    let mut cmd = Command::new(&env.qemu.img);
    cmd.current_dir(env.dir.path())
        .args(["check", "--output=json"]);
    if kind.encrypted.is_some() {
        let (_, image) = kind.open_args(name);
        cmd.args(["--object", SECRET, "--image-opts", &image]);
    } else {
        cmd.args(["-f", "qcow2", name]);
    }
    let out = cmd.output().expect("run qemu-img check");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "{what}: qemu-img check {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    // qemu-img leaves out the counts that are zero.
    let count = |key: &str| report.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
    assert_eq!(
        count("corruptions"),
        0,
        "{what}: {name} is corrupt: {report}"
    );
    assert_eq!(count("check-errors"), 0, "{what}: {name}: {report}");
    count("leaks")
}

const M: u64 = 1 << 20;
const K64: u64 = 65536;

/// Why the writer may leave stretches that read as zeros allocated otherwise than QEMU
/// does (`None` once it does as QEMU: then the map and `alloc` lines must be equal
/// everywhere). With it, where the final maps differ the guest must read zeros, and the
/// difference is printed.
const ZEROS_MAY_BE_ALLOCATED_OTHERWISE: Option<&str> = Some(
    "with extended L2, a discard over an unallocated cluster with some zero subclusters \
     makes it all zeros, where QEMU leaves it as it is",
);

/// The helpers that tell where two maps differ.
#[test]
fn map_differences_are_found() {
    let theirs = "64 KiB (0x10000) bytes     allocated at offset 0 bytes (0x0)\n\
                  128 KiB (0x20000) bytes not allocated at offset 64 KiB (0x10000)\n\
                  64 KiB (0x10000) bytes     allocated at offset 192 KiB (0x30000)\n\
                  65536/131072 bytes allocated at offset 0 bytes\n";
    let ours = "192 KiB (0x30000) bytes     allocated at offset 0 bytes (0x0)\n\
                64 KiB (0x10000) bytes not allocated at offset 192 KiB (0x30000)\n";
    let (t, o) = (map_runs(theirs), map_runs(ours));
    assert_eq!(
        t,
        [
            (0, 0x10000, true),
            (0x10000, 0x20000, false),
            (0x30000, 0x10000, true)
        ]
    );
    assert_eq!(o, [(0, 0x30000, true), (0x30000, 0x10000, false)]);
    assert_eq!(allocation_differences(&t, &o), [(0x10000, 0x30000)]);
    assert_eq!(allocation_differences(&t, &t), []);
}

#[test]
fn v3_64k_empty() {
    let kind = Kind::new("", Geometry::new(16 * M, K64));
    differential("io_scripts::v3_64k_empty", &kind, &[1, 2], 150);
}

#[test]
fn v2_compat_0_10() {
    let kind = Kind::new("compat=0.10", Geometry::new(16 * M, K64));
    differential("io_scripts::v2_compat_0_10", &kind, &[3, 27], 150);
}

#[test]
fn v2_over_a_backing_file() {
    let mut geo = Geometry::new(8 * M, K64);
    geo.discard_ignored = true;
    let kind = Kind::new("compat=0.10", geo).starting(Start::Overlay);
    differential("io_scripts::v2_over_a_backing_file", &kind, &[4], 120);
}

#[test]
fn clusters_of_512_bytes() {
    let kind = Kind::new("cluster_size=512", Geometry::new(4 * M, 512));
    differential("io_scripts::clusters_of_512_bytes", &kind, &[5, 28], 150);
}

#[test]
fn clusters_of_2_mib() {
    let kind = Kind::new("cluster_size=2M", Geometry::new(32 * M, 2 * M));
    differential("io_scripts::clusters_of_2_mib", &kind, &[6], 80);
}

#[test]
fn refcount_widths_1_16_64() {
    for (opts, seed) in [
        ("refcount_bits=1,cluster_size=4096", 7),
        ("refcount_bits=16,cluster_size=4096", 8),
        ("refcount_bits=64,cluster_size=4096", 9),
    ] {
        let kind = Kind::new(opts, Geometry::new(8 * M, 4096));
        let test = format!("io_scripts::refcount_widths ({opts})");
        differential(&test, &kind, &[seed], 120);
    }
}

#[test]
fn backing_chain() {
    let kind = Kind::new("", Geometry::new(8 * M, K64)).starting(Start::Overlay);
    differential("io_scripts::backing_chain", &kind, &[10, 11], 150);
}

#[test]
#[cfg(feature = "zlib")]
fn compressed_zlib() {
    let kind = Kind::new("", Geometry::new(8 * M, K64)).starting(Start::Compressed(""));
    differential("io_scripts::compressed_zlib", &kind, &[12], 150);
}

#[test]
#[cfg(feature = "zstd")]
fn compressed_zstd() {
    let start = Start::Compressed("compression_type=zstd");
    let kind = Kind::new("", Geometry::new(8 * M, K64)).starting(start);
    differential("io_scripts::compressed_zstd", &kind, &[13], 150);
}

#[test]
fn internal_snapshots() {
    let kind = Kind::new("", Geometry::new(8 * M, K64)).starting(Start::Snapshots);
    differential("io_scripts::internal_snapshots", &kind, &[14, 15], 150);
}

#[test]
fn persistent_dirty_bitmaps() {
    let kind = Kind::new("", Geometry::new(8 * M, K64)).starting(Start::Bitmaps);
    differential(
        "io_scripts::persistent_dirty_bitmaps",
        &kind,
        &[21, 31],
        150,
    );
}

#[test]
fn lazy_refcounts() {
    let kind = Kind::new("lazy_refcounts=on", Geometry::new(16 * M, K64));
    differential("io_scripts::lazy_refcounts", &kind, &[16], 150);
}

/// A dirty image (lazy refcounts, a crash before they were written): both rebuild its
/// refcounts when they open it for writing.
#[test]
fn dirty_lazy_refcounts() {
    let kind = Kind::new("lazy_refcounts=on", Geometry::new(8 * M, K64)).starting(Start::Dirty);
    differential("io_scripts::dirty_lazy_refcounts", &kind, &[26], 150);
}

#[test]
fn preallocation_metadata() {
    let kind = Kind::new("preallocation=metadata", Geometry::new(8 * M, K64));
    differential("io_scripts::preallocation_metadata", &kind, &[17, 29], 150);
}

#[test]
#[cfg(feature = "encryption")]
fn luks_encrypted() {
    let mut kind = Kind::new("", Geometry::new(4 * M, K64));
    kind.encrypted = Some("luks");
    differential("io_scripts::luks_encrypted", &kind, &[18], 100);
}

#[test]
#[cfg(feature = "encryption")]
fn legacy_aes_encrypted() {
    let mut kind = Kind::new("", Geometry::new(4 * M, K64));
    kind.encrypted = Some("aes");
    differential("io_scripts::legacy_aes_encrypted", &kind, &[25], 100);
}

#[test]
fn external_data_file() {
    let kind = Kind::new("", Geometry::new(8 * M, K64)).starting(Start::DataFile);
    differential("io_scripts::external_data_file", &kind, &[19, 30], 150);
}

#[test]
fn external_data_file_raw() {
    let kind = Kind::new("data_file_raw=on", Geometry::new(8 * M, K64)).starting(Start::DataFile);
    differential("io_scripts::external_data_file_raw", &kind, &[20], 150);
}

#[test]
fn extended_l2() {
    let mut geo = Geometry::new(8 * M, K64);
    geo.l2_span /= 2;
    let kind = Kind::new("extended_l2=on", geo);
    differential("io_scripts::extended_l2", &kind, &[22, 23], 150);
}

#[test]
fn extended_l2_over_a_backing_file() {
    let mut geo = Geometry::new(8 * M, K64);
    geo.l2_span /= 2;
    let kind = Kind::new("extended_l2=on", geo).starting(Start::Overlay);
    differential(
        "io_scripts::extended_l2_over_a_backing_file",
        &kind,
        &[24],
        150,
    );
}
