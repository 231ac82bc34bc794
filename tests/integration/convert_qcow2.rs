//! `convert_into_qcow2` against QEMU: targets made by `qemu-img create`, filled by the crate,
//! then `qemu-img check` (no errors, no leaks), `qemu-img compare` with the source, and the
//! file size beside `qemu-img convert -O qcow2`'s with the same options.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::{Env, Rng};
use qcow2::{convert_into_qcow2, ConvertOptions, OpenOptions, Qcow2, RawDisk};

/// Run qemu-img; (exit code, stdout + stderr).
fn qemu_img(env: &Env, args: &[&str]) -> (i32, String) {
    let out = Command::new(&env.qemu.img)
        .current_dir(env.dir.path())
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
        .to_str()
        .unwrap()
        .to_owned()
}

fn file_len(env: &Env, name: &str) -> u64 {
    std::fs::metadata(env.path(name)).unwrap().len()
}

/// The checks every image the crate makes must pass.
fn assert_sound(env: &Env, target: &str, source: &str, what: &str) {
    let (code, text) = qemu_img(env, &["check", target]);
    assert_eq!(code, 0, "{what}: qemu-img check:\n{text}");
    assert!(text.contains("No errors were found"), "{what}:\n{text}");
    assert!(!text.contains("leaked"), "{what}: leaks:\n{text}");
    let (code, text) = qemu_img(env, &["compare", source, target]);
    assert_eq!(code, 0, "{what}: qemu-img compare:\n{text}");
}

/// Convert `source` (a qcow2 or raw file) into a target made with `opts`, check it, and
/// compare its size with qemu-img's conversion. Returns the target's name.
fn convert_case(env: &Env, source: &str, raw: bool, opts: &str, compress: bool) -> String {
    let what = format!("{source} -o {opts:?} -c {compress}");
    let n = common::unique_name(env.dir.path(), "t", "qcow2");
    let target = n.file_name().unwrap().to_str().unwrap().to_owned();
    let size = if raw {
        std::fs::metadata(env.dir.join(source).as_path())
            .or_else(|_| std::fs::metadata(source))
            .unwrap()
            .len()
    } else {
        Qcow2::open_path(env.dir.join(source)).unwrap().guest_size()
    };
    env.create(&target, size, opts);
    let options = ConvertOptions::new().threads(2).compress(compress);
    if raw {
        let data = std::fs::read(env.dir.join(source)).unwrap();
        let disk = RawDisk::new(data, size);
        convert_into_qcow2(
            &disk,
            env.path(&target),
            &OpenOptions::new(),
            &options,
            |_, _| {},
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    } else {
        let image = Qcow2::open_path(env.dir.join(source)).unwrap();
        let reader = image.reader().unwrap();
        convert_into_qcow2(
            &reader,
            env.path(&target),
            &OpenOptions::new(),
            &options,
            |_, _| {},
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    assert_sound(env, &target, source, &what);
    // qemu-img's own conversion, with the same options.
    let reference = format!("ref-{target}");
    let mut args = vec!["convert", "-q"];
    if raw {
        args.extend(["-f", "raw"]);
    }
    if compress {
        args.push("-c");
    }
    args.extend(["-O", "qcow2"]);
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([source, reference.as_str()]);
    let (code, text) = qemu_img(env, &args);
    assert_eq!(code, 0, "{what}: qemu-img convert: {text}");
    let (ours, theirs) = (file_len(env, &target), file_len(env, &reference));
    let slack = if compress { 1.03 } else { 1.10 };
    // zlib-rs deflates a 512-byte cluster of one repeated byte to 9 bytes, zlib to 8: with
    // 512-byte clusters of qemu-io patterns that byte is 2% of the data, and packing adds
    // the rest. Compressed 512-byte clusters are compared within 10%.
    let slack = if compress && opts.contains("cluster_size=512") {
        1.10
    } else {
        slack
    };
    // A cluster of slack for tiny images, where one table more is most of the file.
    let cluster = Qcow2::open_path(env.path(&target)).unwrap().cluster_size();
    assert!(
        ours as f64 <= theirs as f64 * slack + cluster as f64,
        "{what}: {ours} bytes, qemu-img {theirs}"
    );
    target
}

/// Random data, text and zeros written by qemu-io into a 64 KiB-cluster image.
fn mixed_source(env: &Env, name: &str, size: u64) {
    env.create(name, size, "cluster_size=4096");
    let mut rng = Rng::new(22);
    let mut cmds = Vec::new();
    for _ in 0..24 {
        let at = rng.below(size / 512 - 256) * 512;
        let len = (rng.below(255) + 1) * 512;
        let pattern = rng.below(255) + 1;
        cmds.push(format!("write -P {pattern} {at} {len}"));
    }
    cmds.push("write -z 65536 131072".to_owned());
    env.io(name, &cmds);
}

#[test]
fn fixtures_convert_into_targets_of_every_shape() {
    let Some(env) = Env::new("fixtures_convert_into_targets_of_every_shape") else {
        return;
    };
    let sources = [
        "v3-64k-basic.qcow2",
        "v2-64k.qcow2",
        "v3-512-l2cross.qcow2",
        "v3-2m-clusters.qcow2",
        "zlib-4k-mixed.qcow2",
        "zstd-4k-mixed.qcow2",
        "chain-top.qcow2",
        "snap.qcow2",
        "extdata.qcow2",
        "extl2-16k.qcow2",
        "refcount1.qcow2",
        "v3-odd-size.qcow2",
    ];
    // The data file's name is relative: the image goes beside it in the test's dir.
    for file in ["extdata.qcow2", "extdata.data"] {
        std::fs::copy(fixture(file), env.path(file)).unwrap();
    }
    for source in sources {
        let path = if source == "extdata.qcow2" {
            source.to_owned()
        } else {
            fixture(source)
        };
        convert_case(&env, &path, false, "", false);
    }
    for opts in [
        "compat=0.10",
        "cluster_size=512",
        "cluster_size=2M",
        "refcount_bits=1",
        "refcount_bits=64",
        "extended_l2=on",
        "lazy_refcounts=on",
    ] {
        convert_case(&env, &fixture("zlib-4k-mixed.qcow2"), false, opts, false);
        convert_case(&env, &fixture("v3-64k-basic.qcow2"), false, opts, false);
    }
}

#[test]
fn compressed_targets_read_in_qemu_and_match_its_size() {
    let Some(env) = Env::new("compressed_targets_read_in_qemu_and_match_its_size") else {
        return;
    };
    for (source, opts) in [
        ("zlib-64k-convert.qcow2", ""),
        ("zlib-64k-convert.qcow2", "compression_type=zstd"),
        ("zstd-4k-mixed.qcow2", "cluster_size=4096"),
        ("v3-64k-basic.qcow2", "compat=0.10"),
        ("zlib-4k-mixed.qcow2", "cluster_size=512"),
        ("zlib-4k-mixed.qcow2", "cluster_size=2M"),
        ("zlib-64k-convert.qcow2", "refcount_bits=1"),
    ] {
        let target = convert_case(&env, &fixture(source), false, opts, true);
        if env.map_count(&fixture(source), "data") > 0 {
            assert!(env.map_count(&target, "compressed") > 0, "{source} {opts}");
        }
    }
}

#[test]
fn qemu_written_data_and_many_refcount_blocks() {
    let Some(env) = Env::new("qemu_written_data_and_many_refcount_blocks") else {
        return;
    };
    mixed_source(&env, "mixed.qcow2", 24 << 20);
    for opts in [
        "",
        "cluster_size=512,refcount_bits=64",
        "cluster_size=1024,refcount_bits=32",
        "compat=0.10,cluster_size=4096",
    ] {
        convert_case(&env, "mixed.qcow2", false, opts, false);
        convert_case(&env, "mixed.qcow2", false, opts, true);
    }
    // Raw random data: every cluster stored, the refcount table moved for 512-byte
    // clusters with 64-bit refcounts (a one-cluster table holds 64 blocks of 64 clusters).
    let mut rng = Rng::new(7);
    let mut data = vec![0u8; 6 << 20];
    rng.fill(&mut data);
    std::fs::write(env.path("random.raw"), &data).unwrap();
    convert_case(&env, "random.raw", true, "", false);
    convert_case(
        &env,
        "random.raw",
        true,
        "cluster_size=512,refcount_bits=64",
        false,
    );
    convert_case(&env, "random.raw", true, "", true);
}

#[test]
fn targets_with_data_files_and_encryption() {
    let Some(env) = Env::new("targets_with_data_files_and_encryption") else {
        return;
    };
    mixed_source(&env, "mixed.qcow2", 8 << 20);
    convert_case(&env, "mixed.qcow2", false, "data_file=out.data", false);
    convert_case(
        &env,
        "mixed.qcow2",
        false,
        "data_file=raw.data,data_file_raw=on",
        false,
    );
    // Compression into a data-file target is refused, before anything is written.
    env.create("df.qcow2", 8 << 20, "data_file=df.data");
    let before = env.read_file("df.qcow2");
    let image = Qcow2::open_path(env.path("mixed.qcow2")).unwrap();
    let options = ConvertOptions::new().compress(true);
    let err = convert_into_qcow2(
        &image.reader().unwrap(),
        env.path("df.qcow2"),
        &OpenOptions::new(),
        &options,
        |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(err, qcow2::Error::InvalidOption { .. }), "{err}");
    assert_eq!(env.read_file("df.qcow2"), before);
}

#[cfg(feature = "encryption")]
#[test]
fn encrypted_targets_open_in_qemu_with_their_secret() {
    let Some(env) = Env::new("encrypted_targets_open_in_qemu_with_their_secret") else {
        return;
    };
    mixed_source(&env, "mixed.qcow2", 8 << 20);
    env.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s0,data=hunter2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        "enc.qcow2",
        "8M",
    ]);
    let image = Qcow2::open_path(env.path("mixed.qcow2")).unwrap();
    let reader = image.reader().unwrap();
    let secret = OpenOptions::new().secret("hunter2");
    convert_into_qcow2(
        &reader,
        env.path("enc.qcow2"),
        &secret,
        &ConvertOptions::new(),
        |_, _| {},
    )
    .unwrap();
    let (code, text) = qemu_img(
        &env,
        &[
            "check",
            "--object",
            "secret,id=s0,data=hunter2",
            "--image-opts",
            "driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=s0",
        ],
    );
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains("leaked"), "{text}");
    let (code, text) = qemu_img(
        &env,
        &[
            "compare",
            "--object",
            "secret,id=s0,data=hunter2",
            "--image-opts",
            "driver=qcow2,file.filename=mixed.qcow2",
            "driver=qcow2,file.filename=enc.qcow2,encrypt.key-secret=s0",
        ],
    );
    assert_eq!(code, 0, "{text}");
    // Compression is refused, as qemu-img refuses it for a new encrypted image.
    env.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=s0,data=hunter2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        "enc2.qcow2",
        "8M",
    ]);
    let err = convert_into_qcow2(
        &reader,
        env.path("enc2.qcow2"),
        &secret,
        &ConvertOptions::new().compress(true),
        |_, _| {},
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("Compression and encryption"),
        "{err}"
    );
    // An encrypted source, opened with its secret, into a plain target.
    let name = "luks-aes-256-cbc-plain64-sha384.qcow2";
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/encrypted")
            .join(name),
        env.path(name),
    )
    .unwrap();
    let secret = "a longer passphrase with spaces";
    let source = Qcow2::open_path_with(env.path(name), &OpenOptions::new().secret(secret)).unwrap();
    env.create("plain.qcow2", source.guest_size(), "");
    convert_into_qcow2(
        &source.reader().unwrap(),
        env.path("plain.qcow2"),
        &OpenOptions::new(),
        &ConvertOptions::new(),
        |_, _| {},
    )
    .unwrap();
    let object = format!("secret,id=s1,data={secret}");
    let source_opts = format!("driver=qcow2,file.filename={name},encrypt.key-secret=s1");
    let (code, text) = qemu_img(
        &env,
        &[
            "compare",
            "--object",
            &object,
            "--image-opts",
            &source_opts,
            "driver=qcow2,file.filename=plain.qcow2",
        ],
    );
    assert_eq!(code, 0, "{text}");
    let (code, text) = qemu_img(&env, &["check", "plain.qcow2"]);
    assert!(code == 0 && !text.contains("leaked"), "{text}");
}

#[test]
fn over_a_backing_file_zeros_hide_its_data() {
    let Some(env) = Env::new("over_a_backing_file_zeros_hide_its_data") else {
        return;
    };
    mixed_source(&env, "mixed.qcow2", 8 << 20);
    env.create("base.qcow2", 8 << 20, "");
    env.io("base.qcow2", &["write -P 0x77 0 8M"]);
    for opts in ["", "extended_l2=on", "compat=0.10"] {
        let name = format!("over-{}.qcow2", opts.len());
        env.create_over(&name, 8 << 20, opts, "base.qcow2", "qcow2");
        let image = Qcow2::open_path(env.path("mixed.qcow2")).unwrap();
        let reader = image.reader().unwrap();
        convert_into_qcow2(
            &reader,
            env.path(&name),
            &OpenOptions::new(),
            &ConvertOptions::new(),
            |_, _| {},
        )
        .unwrap();
        assert_sound(&env, &name, "mixed.qcow2", opts);
    }
}

#[test]
fn refused_targets_are_left_as_they_were() {
    let Some(env) = Env::new("refused_targets_are_left_as_they_were") else {
        return;
    };
    mixed_source(&env, "mixed.qcow2", 8 << 20);
    let image = Qcow2::open_path(env.path("mixed.qcow2")).unwrap();
    let reader = image.reader().unwrap();
    let convert = |target: &str| {
        convert_into_qcow2(
            &reader,
            env.path(target),
            &OpenOptions::new(),
            &ConvertOptions::new(),
            |_, _| {},
        )
    };
    // Not empty.
    env.create("full.qcow2", 8 << 20, "");
    env.io("full.qcow2", &["write -P 1 0 64k"]);
    let before = env.read_file("full.qcow2");
    assert!(convert("full.qcow2").is_err());
    assert_eq!(env.read_file("full.qcow2"), before);
    // Too small.
    env.create("small.qcow2", 4 << 20, "");
    let before = env.read_file("small.qcow2");
    assert!(convert("small.qcow2").is_err());
    assert_eq!(env.read_file("small.qcow2"), before);
    // The source itself.
    assert!(matches!(
        convert("mixed.qcow2"),
        Err(qcow2::Error::OutputIsSource)
    ));
    // Progress rises to the total.
    env.create("p.qcow2", 8 << 20, "");
    let mut last = (0, 0);
    convert_into_qcow2(
        &reader,
        env.path("p.qcow2"),
        &OpenOptions::new(),
        &ConvertOptions::new(),
        |d, t| {
            assert!(d >= last.0);
            last = (d, t);
        },
    )
    .unwrap();
    assert_eq!(last, (8 << 20, 8 << 20));
}

/// Convert `data` as a stream into a new target made with `opts` and `target_size`.
fn stream_case(env: &Env, data: &[u8], known: bool, target_size: u64, opts: &str, compress: bool) {
    let what = format!(
        "stream of {} bytes, known {known}, -o {opts:?} -c {compress}",
        data.len()
    );
    std::fs::write(env.path("stream.raw"), data).unwrap();
    env.create("stream.qcow2", target_size, opts);
    let options = ConvertOptions::new().threads(2).compress(compress);
    let size = known.then_some(data.len() as u64);
    qcow2::convert_stream_into_qcow2(
        data,
        size,
        env.path("stream.qcow2"),
        &OpenOptions::new(),
        &options,
        |_, _| {},
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    let (code, text) = qemu_img(env, &["check", "stream.qcow2"]);
    assert_eq!(code, 0, "{what}:\n{text}");
    assert!(!text.contains("leaked"), "{what}:\n{text}");
    let (code, text) = qemu_img(
        env,
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            "stream.raw",
            "stream.qcow2",
        ],
    );
    assert_eq!(code, 0, "{what}:\n{text}");
    let grown = (data.len() as u64).div_ceil(512) * 512;
    let size = Qcow2::open_path(env.path("stream.qcow2"))
        .unwrap()
        .guest_size();
    assert_eq!(size, grown.max(target_size), "{what}");
}

#[test]
fn streams_convert_and_grow_the_image() {
    let Some(env) = Env::new("streams_convert_and_grow_the_image") else {
        return;
    };
    let mut rng = Rng::new(5);
    let mut data = vec![0u8; (9 << 20) + 300];
    rng.fill_text(&mut data[..3 << 20]);
    rng.fill(&mut data[6 << 20..7 << 20]);
    data[(9 << 20) + 299] = 1;
    // Known size, into a target of that size or larger.
    stream_case(&env, &data[..8 << 20], true, 8 << 20, "", false);
    stream_case(&env, &data[..8 << 20], true, 16 << 20, "", true);
    // Unknown size: the image grows, its L1 table in place or moved (512-byte clusters:
    // one L1 cluster maps 2 MiB).
    stream_case(&env, &data, false, 1 << 20, "", false);
    stream_case(&env, &data, false, 1 << 20, "cluster_size=512", false);
    stream_case(
        &env,
        &data,
        false,
        1 << 20,
        "cluster_size=512,refcount_bits=64",
        true,
    );
    stream_case(&env, &data, false, 0, "compat=0.10,cluster_size=4096", true);
    // Shorter than the image: it keeps its size.
    stream_case(&env, &data[..1000], false, 4 << 20, "", false);
}

#[test]
fn a_stream_that_ends_early_leaves_no_valid_image() {
    let Some(env) = Env::new("a_stream_that_ends_early_leaves_no_valid_image") else {
        return;
    };
    env.create("short.qcow2", 8 << 20, "");
    let data = vec![7u8; 3 << 20];
    let err = qcow2::convert_stream_into_qcow2(
        &data[..],
        Some(8 << 20),
        env.path("short.qcow2"),
        &OpenOptions::new(),
        &ConvertOptions::new(),
        |_, _| {},
    )
    .unwrap_err();
    assert_eq!(err.io_kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
    assert!(Qcow2::open_path(env.path("short.qcow2")).is_err());
    let (code, _) = qemu_img(&env, &["info", "-f", "qcow2", "short.qcow2"]);
    assert_ne!(code, 0, "qemu-img takes the half-written file for an image");
}

#[test]
fn overlays_hold_only_what_the_top_image_holds() {
    let Some(env) = Env::new("overlays_hold_only_what_the_top_image_holds") else {
        return;
    };
    for file in ["chain-top.qcow2", "chain-mid.qcow2", "chain-base.qcow2"] {
        std::fs::copy(fixture(file), env.path(file)).unwrap();
    }
    // A top image of 4 KiB clusters with data, zero clusters and gaps over a 64 KiB base.
    env.create("base.qcow2", 8 << 20, "");
    env.io("base.qcow2", &["write -P 0x77 0 8M"]);
    env.create_over(
        "top.qcow2",
        8 << 20,
        "cluster_size=4096",
        "base.qcow2",
        "qcow2",
    );
    env.io(
        "top.qcow2",
        &[
            "write -P 1 0 12k",
            "write -z 1M 256k",
            "write -P 2 2052k 8k",
            "write -z 4M 4k",
            "write -P 3 7M 1M",
        ],
    );
    for (top, backing, opts) in [
        ("chain-top.qcow2", "chain-mid.qcow2", ""),
        ("top.qcow2", "base.qcow2", ""),
        ("top.qcow2", "base.qcow2", "cluster_size=4096"),
        ("top.qcow2", "base.qcow2", "extended_l2=on"),
    ] {
        let what = format!("{top} over {backing} -o {opts:?}");
        let size = Qcow2::open_path(env.path(top)).unwrap().guest_size();
        env.create_over("ov.qcow2", size, opts, backing, "qcow2");
        let image = Qcow2::open_path(env.path(top)).unwrap();
        let reader = image.reader().unwrap();
        qcow2::convert_overlay_into_qcow2(
            &reader,
            env.path("ov.qcow2"),
            &OpenOptions::new(),
            &ConvertOptions::new(),
            |_, _| {},
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_sound(&env, "ov.qcow2", top, &what);
        // qemu-img convert -B: the same clusters allocated, about the same size.
        let mut args = vec!["convert", "-q", "-O", "qcow2", "-B", backing, "-F", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([top, "ref.qcow2"]);
        let (code, text) = qemu_img(&env, &args);
        assert_eq!(code, 0, "{what}: {text}");
        let allocated = |name: &str| {
            let map = env.qemu.map_json(env.dir.path(), name);
            map.as_array()
                .unwrap()
                .iter()
                .filter(|e| e["depth"] == 0 && e["present"] == true)
                .map(|e| e["length"].as_u64().unwrap())
                .sum::<u64>()
        };
        // With extended L2, QEMU allocates only the subclusters the top image covers; the
        // crate allocates whole clusters, read through the chain (the same bytes).
        if !opts.contains("extended_l2") {
            assert_eq!(allocated("ov.qcow2"), allocated("ref.qcow2"), "{what}");
        }
        let (ours, theirs) = (file_len(&env, "ov.qcow2"), file_len(&env, "ref.qcow2"));
        assert!(
            ours as f64 <= theirs as f64 * 1.10 + 65536.0,
            "{what}: {ours} vs {theirs}"
        );
        std::fs::remove_file(env.path("ov.qcow2")).unwrap();
        std::fs::remove_file(env.path("ref.qcow2")).unwrap();
    }
}

/// A disk that, as it is read, checks that no image stands at `out` yet.
struct WatchedDisk<'p> {
    inner: RawDisk<std::fs::File>,
    out: &'p Path,
    reads: std::sync::atomic::AtomicU64,
}

impl qcow2::GuestDisk for WatchedDisk<'_> {
    fn disk_size(&self) -> u64 {
        self.inner.disk_size()
    }
    fn read_disk(&self, pos: u64, buf: &mut [u8]) -> qcow2::Result<()> {
        assert!(
            !self.out.exists(),
            "a file stands at the output while the conversion runs"
        );
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.read_disk(pos, buf)
    }
    fn allocation_at(&self, pos: u64) -> qcow2::Result<Option<(qcow2::Allocation, u64)>> {
        self.inner.allocation_at(pos)
    }
}

/// `convert_to_qcow2` makes the image under another name and puts it at the output only
/// once it is complete: while the disk is read nothing stands there, and a failure leaves
/// nothing there nor beside it.
#[test]
fn convert_to_qcow2_puts_only_complete_images_at_the_output() {
    use qcow2::GuestDisk;
    let dir = common::TempDir::new("convert-qcow2-atomic");
    let raw = dir.join("source.raw");
    let mut data = vec![0u8; 8 << 20];
    Rng::new(5).fill(&mut data);
    std::fs::write(&raw, &data).unwrap();
    let out = dir.join("out.qcow2");
    let disk = WatchedDisk {
        inner: RawDisk::open_path(&raw).unwrap(),
        out: &out,
        reads: Default::default(),
    };
    let create = qcow2::CreateOptions::default();
    // Read on the calling thread, where the watch's panic fails the test.
    let options = ConvertOptions::new().threads(1);
    qcow2::convert_to_qcow2(&disk, &out, &create, &options, |_, _| {}).unwrap();
    assert!(disk.reads.load(std::sync::atomic::Ordering::Relaxed) > 0);
    let image = Qcow2::open_path(&out).unwrap();
    let outcome = qcow2::compare(&image.reader().unwrap(), &disk.inner, &Default::default());
    assert_eq!(outcome.unwrap(), qcow2::Comparison::Identical);
    // A conversion whose reads fail: nothing at the output, no partial file beside it.
    std::fs::remove_file(&out).unwrap();
    struct Failing(u64);
    impl GuestDisk for Failing {
        fn disk_size(&self) -> u64 {
            self.0
        }
        fn read_disk(&self, _: u64, _: &mut [u8]) -> qcow2::Result<()> {
            Err(qcow2::Error::Internal("a read that fails"))
        }
        fn allocation_at(&self, pos: u64) -> qcow2::Result<Option<(qcow2::Allocation, u64)>> {
            Ok((pos < self.0).then_some((qcow2::Allocation::Data, self.0 - pos)))
        }
    }
    let failed = qcow2::convert_to_qcow2(&Failing(4 << 20), &out, &create, &options, |_, _| {});
    assert!(failed.is_err());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("source.raw")],
        "{left:?}"
    );
}
