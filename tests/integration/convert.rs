//! `convert_to_writer`, `convert_to_file` and `compare` against `qemu-img convert -O raw` and
//! `qemu-img compare`: output bytes, holes in the output file, mismatch offsets.
// Compressed fixtures need both decompressors.

use crate::common;
use crate::holes;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{sha256_hex, Qemu, TempDir};
use qcow2::{
    compare, convert_to_file, convert_to_writer, CompareOptions, Comparison, ConvertOptions, Qcow2,
    RawDisk,
};

/// `qemu-img ARGS` run in `dir`; panics on failure.
fn qemu_img(qemu: &Qemu, dir: &Path, args: &[&str]) {
    qemu.img(dir, args);
}

/// `qemu-img convert [EXTRA] -O raw IMAGE OUT`, run in the image's directory (so relative
/// data-file names resolve as they do for the crate).
fn qemu_convert(qemu: &Qemu, image: &Path, out: &Path, extra: &[&str]) -> bool {
    let status = Command::new(&qemu.img)
        .current_dir(image.parent().unwrap())
        .arg("convert")
        .args(extra)
        .args(["-O", "raw"])
        .arg(image)
        .arg(out)
        .output()
        .unwrap();
    status.status.success()
}

/// The crate's conversion of `image` (or its snapshot) to a new file at `out`.
fn our_convert_file(
    image: &Qcow2<File>,
    snapshot: Option<&str>,
    out: &Path,
    options: ConvertOptions,
) {
    let reader = match snapshot {
        Some(s) => image.snapshot_reader(s).unwrap(),
        None => image.reader().unwrap(),
    };
    let file = File::create(out).unwrap();
    let options = options.size(image.guest_size());
    let mut last = (0, 0);
    convert_to_file(&reader, &file, &options, |done, total| {
        assert!(
            done >= last.0 && done <= total,
            "progress went from {last:?} to {done}"
        );
        last = (done, total);
    })
    .unwrap_or_else(|e| panic!("converting {:?}: {e}", image.path()));
    assert_eq!(
        last,
        (image.guest_size(), image.guest_size()),
        "progress did not end at the total"
    );
}

/// The crate's conversion to a stream.
fn our_convert_bytes(image: &Qcow2<File>, snapshot: Option<&str>, threads: usize) -> Vec<u8> {
    let reader = match snapshot {
        Some(s) => image.snapshot_reader(s).unwrap(),
        None => image.reader().unwrap(),
    };
    let options = ConvertOptions::new()
        .threads(threads)
        .size(image.guest_size());
    let mut out = Vec::new();
    convert_to_writer(&reader, &mut out, &options, |_, _| {}).unwrap();
    out
}

fn assert_same_bytes(label: &str, ours: &[u8], theirs: &[u8]) {
    if let Some(d) = common::describe_difference(label, 0, ours, theirs) {
        panic!("{d}");
    }
}

/// Convert with the crate and with qemu-img (same `-S`), and compare bytes and holes.
fn check_against_qemu(qemu: &Qemu, dir: &TempDir, image_path: &Path, snapshot: Option<&str>) {
    let image = Qcow2::open_path(image_path).unwrap();
    let label = format!(
        "{}{}",
        image_path.display(),
        snapshot.map(|s| format!("@{s}")).unwrap_or_default()
    );
    let theirs = dir.join("qemu.raw");
    let mut extra = vec![];
    let l;
    if let Some(s) = snapshot {
        l = format!("snapshot.name={s}");
        extra = vec!["-l", l.as_str()];
    }
    for (sparse, qemu_s) in [(4096u64, None), (0, Some("0")), (512, Some("512"))] {
        let mut args = extra.clone();
        if let Some(s) = qemu_s {
            args.extend(["-S", s]);
        }
        assert!(
            qemu_convert(qemu, image_path, &theirs, &args),
            "qemu-img failed on {label}"
        );
        let ours = dir.join("ours.raw");
        // Threads change nothing in the output: try them with the default -S only.
        let threads_to_try: &[usize] = if sparse == 4096 { &[1, 3] } else { &[2] };
        for &threads in threads_to_try {
            let options = ConvertOptions::new().threads(threads).sparse_size(sparse);
            our_convert_file(&image, snapshot, &ours, options);
            let (a, b) = (
                std::fs::read(&ours).unwrap(),
                std::fs::read(&theirs).unwrap(),
            );
            assert_same_bytes(&format!("{label} -S {sparse} -m {threads}"), &a, &b);
            if sparse == 0 {
                // Fully allocated, both.
                let len = a.len() as u64;
                let full = if len == 0 { vec![] } else { vec![(0, len)] };
                assert_eq!(holes::data_ranges(&ours), full, "{label}: -S 0 left holes");
            } else {
                holes::assert_not_less_sparse(&format!("{label} -S {sparse}"), &ours, &theirs);
            }
        }
        if qemu_s.is_none() {
            let streamed = our_convert_bytes(&image, snapshot, 2);
            assert_same_bytes(
                &format!("{label} stream"),
                &streamed,
                &std::fs::read(&theirs).unwrap(),
            );
        }
    }
}

#[test]
fn fixtures_convert_to_their_manifest_sha() {
    let manifest = std::fs::read_to_string(common::fixtures_dir().join("manifest.tsv")).unwrap();
    let mut checked = 0;
    for line in manifest.lines().filter(|l| !l.starts_with('#')) {
        let fields: Vec<&str> = line.split('\t').collect();
        let (name, size, sha) = (fields[0], fields[1].parse::<u64>().unwrap(), fields[2]);
        if sha == "-" {
            continue;
        }
        let (file, snapshot) = match name.split_once('@') {
            Some((f, s)) => (f, Some(s)),
            None => (name, None),
        };
        let image = match Qcow2::open_path(common::fixtures_dir().join(file)) {
            Ok(i) => i,
            Err(qcow2::Error::Corrupt) => continue, // refused on purpose
            Err(e) => panic!("{name}: {e}"),
        };
        let reader = match snapshot {
            Some(s) => image.snapshot_reader(s).unwrap(),
            None => image.reader().unwrap(),
        };
        for threads in [1, 2] {
            // The manifest hashes the snapshot's own disk: convert that size.
            let options = ConvertOptions::new().threads(threads).size(size);
            let mut out = Vec::new();
            convert_to_writer(&reader, &mut out, &options, |_, _| {}).unwrap();
            assert_eq!(sha256_hex(&out), sha, "{name}: stream, {threads} threads");
        }
        checked += 1;
    }
    assert!(checked >= 25, "only {checked} manifest lines checked");
}

#[test]
fn fixtures_convert_like_qemu_img() {
    let Some(qemu) = Qemu::find_or_skip("fixtures_convert_like_qemu_img") else {
        return;
    };
    let dir = TempDir::new("convert-fixtures");
    let mut checked = 0;
    for name in common::fixture_images() {
        let path = common::fixtures_dir().join(&name);
        match Qcow2::open_path(&path) {
            // Encrypted images: the encryption and cli_convert modules read them.
            Ok(image) if image.encryption().is_some() => continue,
            Ok(_) => {}
            Err(qcow2::Error::Corrupt | qcow2::Error::Encrypted { .. }) => continue,
            Err(e) => panic!("{name}: {e}"),
        }
        check_against_qemu(&qemu, &dir, &path, None);
        checked += 1;
    }
    for (file, snapshot) in [
        ("snap.qcow2", "s1"),
        ("snap.qcow2", "s2"),
        ("snap-resized.qcow2", "s1"),
    ] {
        check_against_qemu(
            &qemu,
            &dir,
            &common::fixtures_dir().join(file),
            Some(snapshot),
        );
    }
    assert!(checked >= 25, "only {checked} fixtures checked");
}

/// qemu-io commands on an image, one open.
fn io(qemu: &Qemu, dir: &Path, image: &str, cmds: &[&str]) {
    qemu.io(dir, "qcow2", image, cmds);
}

/// Fresh images made by QEMU: a chain, snapshots (one taken before a resize), compressed
/// clusters, 512-byte clusters, and data with zero runs of every length around chunk edges.
fn fresh_images(qemu: &Qemu, dir: &Path) -> Vec<(String, Option<&'static str>)> {
    let d = dir;
    // A chain of three, each layer with its own cluster size, the top larger than the rest.
    qemu_img(
        qemu,
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            "base.qcow2",
            "6M",
        ],
    );
    io(
        qemu,
        d,
        "base.qcow2",
        &[
            "write -P 0x11 0 1M",
            "write -P 0x12 3M 100k",
            "write -P 0 4M 64k",
        ],
    );
    qemu_img(
        qemu,
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
            "6M",
        ],
    );
    io(
        qemu,
        d,
        "mid.qcow2",
        &[
            "write -P 0x21 512k 8k",
            "write -z 768k 64k",
            "write -P 0x22 3M 3k",
        ],
    );
    qemu_img(
        qemu,
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=8192",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "9M",
        ],
    );
    io(
        qemu,
        d,
        "top.qcow2",
        &[
            "write -P 0x31 100k 5k",
            "write -z 3M 16k",
            "write -P 0x32 6143k 2k",
            "discard 0 8k",
        ],
    );
    // Snapshots, one before a resize.
    qemu_img(
        qemu,
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "snaps.qcow2",
            "2M",
        ],
    );
    io(
        qemu,
        d,
        "snaps.qcow2",
        &["write -P 0x41 0 300k", "write -P 0x42 1M 4k"],
    );
    qemu_img(qemu, d, &["snapshot", "-c", "one", "snaps.qcow2"]);
    io(
        qemu,
        d,
        "snaps.qcow2",
        &["write -P 0x43 100k 8k", "write -z 1M 4k"],
    );
    qemu_img(qemu, d, &["resize", "-q", "snaps.qcow2", "5M"]);
    io(qemu, d, "snaps.qcow2", &["write -P 0x44 4M 12k"]);
    qemu_img(qemu, d, &["snapshot", "-c", "two", "snaps.qcow2"]);
    // Compressed: text-like and random clusters, 4k and 64k clusters.
    let mut rng = common::Rng::new(7);
    let mut raw = vec![0u8; 3 << 20];
    rng.fill_text(&mut raw[..1 << 20]);
    rng.fill(&mut raw[(1 << 20)..(1 << 20) + 300_000]);
    rng.fill_text(&mut raw[(2 << 20) + 4096..(2 << 20) + 20_000]);
    std::fs::write(d.join("src.raw"), &raw).unwrap();
    for (name, cs) in [("comp4k.qcow2", "4096"), ("comp64k.qcow2", "65536")] {
        let o = format!("cluster_size={cs}");
        qemu.compress(d, "src.raw", name, &o);
    }
    io(qemu, d, "comp4k.qcow2", &["write -P 0x55 5000 3000"]);
    // 512-byte clusters, writes crossing L2 tables.
    qemu_img(
        qemu,
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "c512.qcow2",
            "3M",
        ],
    );
    io(
        qemu,
        d,
        "c512.qcow2",
        &[
            "write -P 0x61 1000 70000",
            "write -P 0x62 1M 511",
            "write -z 1100 600",
            "write -P 0x63 3145216 512",
        ],
    );
    // Zero runs of many lengths inside data (qemu-io writes real zeros into allocated
    // clusters), around the 2 MiB chunk edges.
    qemu_img(
        qemu,
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            "zeros.qcow2",
            "20M",
        ],
    );
    // 20 MiB of data in one stretch: longer than the crate looks into a data stretch at once
    // (8 MiB): the output must still be as sparse as qemu-img's past that.
    let mut cmds = vec!["write -P 0x71 0 20M".to_owned()];
    let mut at = 4096u64;
    for len in [
        512u64, 1024, 3584, 4096, 4608, 8192, 12288, 32768, 65536, 70000,
    ] {
        cmds.push(format!("write -P 0 {at} {len}"));
        at += len + 9000;
    }
    for edge in [2u64 << 20, 4 << 20, 8 << 20, 10 << 20, 16 << 20] {
        cmds.push(format!("write -P 0 {} 20480", edge - 8192));
    }
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    io(qemu, d, "zeros.qcow2", &cmds);
    vec![
        ("base.qcow2".into(), None),
        ("mid.qcow2".into(), None),
        ("top.qcow2".into(), None),
        ("snaps.qcow2".into(), None),
        ("snaps.qcow2".into(), Some("one")),
        ("snaps.qcow2".into(), Some("two")),
        ("comp4k.qcow2".into(), None),
        ("comp64k.qcow2".into(), None),
        ("c512.qcow2".into(), None),
        ("zeros.qcow2".into(), None),
    ]
}

#[test]
fn fresh_images_convert_like_qemu_img() {
    let Some(qemu) = Qemu::find_or_skip("fresh_images_convert_like_qemu_img") else {
        return;
    };
    let dir = TempDir::new("convert-fresh");
    for (name, snapshot) in fresh_images(&qemu, dir.path()) {
        check_against_qemu(&qemu, &dir, &dir.join(&name), snapshot);
    }
}

#[test]
fn threads_give_identical_bytes() {
    let Some(qemu) = Qemu::find_or_skip("threads_give_identical_bytes") else {
        return;
    };
    let dir = TempDir::new("convert-threads");
    fresh_images(&qemu, dir.path());
    for name in ["comp4k.qcow2", "top.qcow2", "zeros.qcow2", "c512.qcow2"] {
        let image = Qcow2::open_path(dir.join(name)).unwrap();
        let one = our_convert_bytes(&image, None, 1);
        for threads in [2, 4] {
            assert_same_bytes(
                &format!("{name} -m {threads}"),
                &our_convert_bytes(&image, None, threads),
                &one,
            );
            let out = dir.join("t.raw");
            our_convert_file(&image, None, &out, ConvertOptions::new().threads(threads));
            assert_same_bytes(
                &format!("{name} file -m {threads}"),
                &std::fs::read(&out).unwrap(),
                &one,
            );
        }
    }
}

/// A 1 TiB image with scattered clusters converts in time proportional to its data, to the
/// same data and holes as qemu-img's.
#[test]
fn sparse_terabyte_converts_by_its_data() {
    let Some(qemu) = Qemu::find_or_skip("sparse_terabyte_converts_by_its_data") else {
        return;
    };
    let dir = TempDir::new("convert-tib");
    if !common::supports_sparse_files(dir.path(), 1 << 40) {
        eprintln!("SKIPPED: the temp directory cannot hold a sparse 1 TiB file");
        return;
    }
    let d = dir.path();
    qemu_img(
        &qemu,
        d,
        &["create", "-q", "-f", "qcow2", "big.qcow2", "1T"],
    );
    let tib = 1u64 << 40;
    let offsets = [
        0,
        1 << 30,
        100 << 30,
        (500 << 30) + 4096,
        tib - 65536,
        tib - (3 << 20),
    ];
    let cmds: Vec<String> = offsets
        .iter()
        .enumerate()
        .map(|(i, o)| format!("write -P {} {o} 65536", i + 1))
        .chain([format!("write -z {} 1M", 200u64 << 30)])
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    io(&qemu, d, "big.qcow2", &cmds);
    let image = Qcow2::open_path(dir.join("big.qcow2")).unwrap();
    let ours = dir.join("ours.raw");
    let started = Instant::now();
    our_convert_file(&image, None, &ours, ConvertOptions::new().threads(2));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "1 TiB sparse conversion took {took:?}"
    );
    let theirs = dir.join("qemu.raw");
    assert!(qemu_convert(&qemu, &dir.join("big.qcow2"), &theirs, &[]));
    assert_eq!(std::fs::metadata(&ours).unwrap().len(), tib);
    holes::assert_not_less_sparse("1 TiB", &ours, &theirs);
    // The data both have, compared where either has any.
    let (a, b) = (File::open(&ours).unwrap(), File::open(&theirs).unwrap());
    use std::os::unix::fs::FileExt;
    for (start, end) in holes::data_ranges(&theirs) {
        let mut x = vec![0; (end - start) as usize];
        let mut y = x.clone();
        a.read_exact_at(&mut x, start).unwrap();
        b.read_exact_at(&mut y, start).unwrap();
        assert_same_bytes(&format!("1 TiB at {start:#x}"), &x, &y);
    }
    assert!(holes::allocated_bytes(&ours) < 8 << 20);
}

/// A sink that fails after some bytes: the conversion reports it, on any number of threads.
struct FailingWriter(usize);

impl Write for FailingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0 < buf.len() {
            return Err(std::io::Error::other("disk full"));
        }
        self.0 -= buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn errors_end_the_conversion_cleanly() {
    let path = common::fixtures_dir().join("chain-top.qcow2");
    for threads in [1, 2, 4] {
        let image = Qcow2::open_path(&path).unwrap();
        let reader = image.reader().unwrap();
        let options = ConvertOptions::new().threads(threads);
        let err =
            convert_to_writer(&reader, FailingWriter(3 << 20), &options, |_, _| {}).unwrap_err();
        // The writer's error is the source, not repeated in the text.
        let source = std::error::Error::source(&err).map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("disk full"), "{err}");
        // A backing file that is not attached: the read that needs it fails.
        let lone = Qcow2::open(File::open(&path).unwrap()).unwrap();
        let reader = lone.reader().unwrap();
        let err = convert_to_writer(&reader, std::io::sink(), &options, |_, _| {}).unwrap_err();
        assert!(matches!(err, qcow2::Error::BackingMissing { .. }), "{err}");
    }
}

/// `qemu-img compare [-s] A B`: exit code and stdout.
fn qemu_compare(qemu: &Qemu, a: &Path, b: &Path, strict: bool) -> (i32, String) {
    let mut cmd = Command::new(&qemu.img);
    cmd.arg("compare");
    if strict {
        cmd.arg("-s");
    }
    let out = cmd.arg(a).arg(b).output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
    )
}

/// A qcow2 image, or a raw file (probed like qemu-img: no qcow2 magic means raw).
enum Disk {
    Image(Box<Qcow2<File>>),
    Raw(RawDisk<File>),
}

fn open_disk(path: &Path) -> Disk {
    match Qcow2::open_path(path) {
        Ok(i) => Disk::Image(Box::new(i)),
        Err(e) if e.is_not_qcow2() => Disk::Raw(RawDisk::open_path(path).unwrap()),
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

/// The crate's comparison, printed as qemu-img prints it.
fn our_compare(a: &Path, b: &Path, strict: bool) -> (i32, String) {
    let (da, db) = (open_disk(a), open_disk(b));
    let (ra, rb);
    let x: &dyn qcow2::GuestDisk = match &da {
        Disk::Image(i) => {
            ra = i.reader().unwrap();
            &ra
        }
        Disk::Raw(r) => r,
    };
    let y: &dyn qcow2::GuestDisk = match &db {
        Disk::Image(i) => {
            rb = i.reader().unwrap();
            &rb
        }
        Disk::Raw(r) => r,
    };
    let common_size = x.disk_size().min(y.disk_size());
    let differ = x.disk_size() != y.disk_size();
    let result = compare(x, y, &CompareOptions::new().strict(strict)).unwrap();
    let warn = "Warning: Image size mismatch!\n";
    match result {
        Comparison::Identical if differ => (0, format!("{warn}Images are identical.\n")),
        Comparison::Identical => (0, "Images are identical.\n".into()),
        Comparison::Differ { offset } => {
            let w = if differ && offset >= common_size {
                warn
            } else {
                ""
            };
            (1, format!("{w}Content mismatch at offset {offset}!\n"))
        }
        Comparison::SizeMismatch { .. } => (1, "Strict mode: Image size mismatch!\n".into()),
        Comparison::AllocationMismatch { offset } => (
            1,
            format!("Strict mode: Offset {offset} block status mismatch!\n"),
        ),
        _ => unreachable!(),
    }
}

/// Pairs of disks that are the same, or differ at chosen places: the first byte of a
/// sector, the last byte of the disk, inside a compressed cluster, past the smaller disk.
fn compare_cases(qemu: &Qemu, d: &Path) -> Vec<(PathBuf, PathBuf, bool)> {
    let mut rng = common::Rng::new(11);
    let mut raw = vec![0u8; 1 << 20];
    rng.fill_text(&mut raw[..600_000]);
    std::fs::write(d.join("a.raw"), &raw).unwrap();
    qemu_img(
        qemu,
        d,
        &[
            "convert",
            "-q",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "a.raw",
            "a-comp.qcow2",
        ],
    );
    qemu_img(
        qemu,
        d,
        &["convert", "-q", "-O", "qcow2", "a.raw", "a.qcow2"],
    );
    let mut variants = vec![];
    for (name, at) in [
        ("sector", 5 * 512),
        ("last", (1 << 20) - 1),
        ("in-comp", 300_000 + 77),
        ("first", 0),
        ("zero-area", 900_000),
    ] {
        let mut v = raw.clone();
        v[at] ^= 0x5a;
        let file = format!("b-{name}.raw");
        std::fs::write(d.join(&file), &v).unwrap();
        let q = format!("b-{name}.qcow2");
        qemu_img(
            qemu,
            d,
            &[
                "convert",
                "-q",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=16384",
                &file,
                &q,
            ],
        );
        variants.push(file);
        variants.push(q);
    }
    // Different sizes: larger with zeros past the end, larger with data past the end.
    qemu_img(
        qemu,
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            "grown.qcow2",
            "3M",
        ],
    );
    qemu_img(
        qemu,
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            "grown-data.qcow2",
            "3M",
        ],
    );
    io(qemu, d, "grown-data.qcow2", &["write -P 3 2000000 1"]);
    qemu_img(
        qemu,
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            "grown-zero.qcow2",
            "3M",
        ],
    );
    io(qemu, d, "grown-zero.qcow2", &["write -z 2M 64k"]);
    let p = |n: &str| d.join(n);
    let mut cases = vec![];
    for base in ["a.raw", "a.qcow2", "a-comp.qcow2"] {
        for v in variants.iter().chain(
            [
                "a.raw".to_owned(),
                "a.qcow2".to_owned(),
                "a-comp.qcow2".to_owned(),
            ]
            .iter(),
        ) {
            cases.push((p(base), p(v), false));
        }
    }
    for (a, b) in [
        ("a.qcow2", "grown.qcow2"),
        ("grown-data.qcow2", "a.raw"),
        ("a-comp.qcow2", "grown-zero.qcow2"),
        ("a.qcow2", "grown-data.qcow2"),
    ] {
        cases.push((p(a), p(b), false));
        cases.push((p(a), p(b), true));
    }
    // Strict mode between qcow2 images: allocation (data, compressed, zeros, unallocated)
    // and where the last stretch starts must match QEMU's block status. (A raw file's holes
    // are seen by the qcow2 binary only: see the cli_convert module.)
    let qcow2s: Vec<&String> = variants.iter().filter(|v| v.ends_with(".qcow2")).collect();
    for a in ["a.qcow2", "a-comp.qcow2", "grown-zero.qcow2"] {
        for b in &qcow2s {
            cases.push((p(a), p(b), true));
        }
        cases.push((p(a), p("a-comp.qcow2"), true));
    }
    cases
}

#[test]
fn compare_like_qemu_img() {
    let Some(qemu) = Qemu::find_or_skip("compare_like_qemu_img") else {
        return;
    };
    let dir = TempDir::new("compare");
    let cases = compare_cases(&qemu, dir.path());
    let mut differ = 0;
    for (a, b, strict) in &cases {
        let theirs = qemu_compare(&qemu, a, b, *strict);
        let ours = our_compare(a, b, *strict);
        assert_eq!(
            ours,
            theirs,
            "compare{} {} {}",
            if *strict { " -s" } else { "" },
            a.display(),
            b.display()
        );
        differ += usize::from(theirs.0 == 1);
    }
    assert!(
        differ >= 20 && differ < cases.len(),
        "{differ} of {} cases differ",
        cases.len()
    );
}
