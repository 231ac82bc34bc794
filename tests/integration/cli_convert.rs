//! The `qcow2 convert` and `qcow2 compare` subcommands against `qemu-img convert -O raw` and
//! `qemu-img compare`, run side by side: output bytes and holes, exit codes, stdout, errors.
// Compressed fixtures need both decompressors.

use crate::common;
use crate::holes;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Qemu, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_qcow2");

/// Run a command with a deadline: a hang is a failure, never a stuck test.
fn run_bounded(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let started = Instant::now();
    // Drain the pipes on their own threads so a large stdout cannot block the child.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut v).unwrap();
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut v).unwrap();
        v
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("{cmd:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// `qcow2 ARGS`, run in the fixtures directory (relative names resolve there).
fn ours(args: &[&str]) -> Output {
    run_bounded(
        Command::new(BIN)
            .current_dir(common::fixtures_dir())
            .args(args),
    )
}

/// `qemu-img ARGS`, run in the fixtures directory too.
fn qemu_img(qemu: &Qemu, args: &[&str]) -> Output {
    run_bounded(
        Command::new(&qemu.img)
            .current_dir(common::fixtures_dir())
            .args(args),
    )
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The message of a one-line error, without the program's name.
fn message(o: &Output, program: &str) -> String {
    let text = stderr(o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got {text:?}");
    lines[0]
        .strip_prefix(&format!("{program}: "))
        .unwrap_or_else(|| panic!("{text:?} does not start with {program}:"))
        .to_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qcow2 convert ARGS IMG ours.raw` and `qemu-img convert ARGS -O raw IMG qemu.raw`:
/// both succeed, the bytes are equal and ours has no data where qemu-img's has holes.
fn convert_both(qemu: &Qemu, dir: &TempDir, image: &Path, args: &[&str], check_holes: bool) {
    let (a, b) = (dir.join("ours.raw"), dir.join("qemu.raw"));
    let mut our_args = vec!["convert"];
    our_args.extend_from_slice(args);
    our_args.extend([s(image), s(&a)]);
    let o = ours(&our_args);
    assert!(o.status.success(), "qcow2 {our_args:?}: {}", stderr(&o));
    assert!(
        o.stdout.is_empty() && o.stderr.is_empty(),
        "qcow2 {our_args:?} printed something"
    );
    let mut their_args = vec!["convert"];
    their_args.extend_from_slice(args);
    their_args.extend(["-O", "raw", s(image), s(&b)]);
    let t = qemu_img(qemu, &their_args);
    assert!(
        t.status.success(),
        "qemu-img {their_args:?}: {}",
        stderr(&t)
    );
    let (x, y) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    if let Some(d) = common::describe_difference(&format!("{image:?} {args:?}"), 0, &x, &y) {
        panic!("{d}");
    }
    if check_holes {
        holes::assert_not_less_sparse(&format!("{image:?} {args:?}"), &a, &b);
    }
}

#[test]
fn cli_convert_matches_qemu_img_on_fixtures() {
    let Some(qemu) = Qemu::find_or_skip("cli_convert_matches_qemu_img_on_fixtures") else {
        return;
    };
    let dir = TempDir::new("cli-convert");
    let mut checked = 0;
    for name in common::fixture_images() {
        let path = common::fixtures_dir().join(&name);
        match qcow2::Qcow2::open_path(&path) {
            Err(_) => continue, // refused images: see cli_convert_errors
            // Encrypted images need their secret: see encrypted_images_convert_with_the_secret
            Ok(image) if image.encryption().is_some() => continue,
            Ok(_) => {}
        }
        // Relative data-file names resolve from the working directory in qemu-img.
        let image = PathBuf::from(&name);
        convert_both(&qemu, &dir, &image, &[], true);
        // A larger -S: zeros inside data are written unless the image file itself has a
        // hole there (qemu-img looks into the file; so does qcow2 convert).
        convert_both(&qemu, &dir, &image, &["-S", "64k"], true);
        checked += 1;
    }
    assert!(checked >= 25, "only {checked} fixtures");
    let chain = common::fixtures_dir().join("chain-top.qcow2");
    for args in [
        &["-m", "1"][..],
        &["-m", "4"],
        &["-S", "0"],
        &["-S", "512"],
        &["-m", "2", "-S", "0"],
    ] {
        convert_both(
            &qemu,
            &dir,
            &chain,
            args,
            args != ["-S", "0"] && args.last() != Some(&"0"),
        );
    }
    convert_both(&qemu, &dir, &chain, &["-S", "1M", "-m", "3"], true);
}

#[test]
fn cli_convert_snapshots_like_qemu_img() {
    let Some(qemu) = Qemu::find_or_skip("cli_convert_snapshots_like_qemu_img") else {
        return;
    };
    let dir = TempDir::new("cli-convert-snap");
    let snap = common::fixtures_dir().join("snap.qcow2");
    for spec in [
        "snapshot.id=1",
        "snapshot.name=s2",
        "s1",
        "2",
        "snapshot.id=2,snapshot.name=s2",
    ] {
        convert_both(&qemu, &dir, &snap, &["-l", spec], true);
    }
    // Taken before a resize: qemu-img pads to the current size.
    let resized = common::fixtures_dir().join("snap-resized.qcow2");
    convert_both(&qemu, &dir, &resized, &["-l", "snapshot.name=s1"], true);
    assert_eq!(
        std::fs::metadata(dir.join("ours.raw")).unwrap().len(),
        qcow2::Qcow2::open_path(&resized).unwrap().guest_size()
    );
    for spec in [
        "nosuch",
        "snapshot.id=9",
        "snapshot.name=1",
        "snapshot.id=1,snapshot.name=s2",
    ] {
        let out = dir.join("x.raw");
        let o = ours(&["convert", "-l", spec, s(&snap), s(&out)]);
        let t = qemu_img(
            &qemu,
            &["convert", "-l", spec, "-O", "raw", s(&snap), s(&out)],
        );
        assert!(!o.status.success() && !t.status.success(), "-l {spec}");
        assert_eq!(message(&o, "qcow2"), message(&t, "qemu-img"), "-l {spec}");
    }
}

#[test]
fn cli_convert_to_a_pipe() {
    let Some(qemu) = Qemu::find_or_skip("cli_convert_to_a_pipe") else {
        return;
    };
    let dir = TempDir::new("cli-convert-pipe");
    for (name, threads) in [
        ("zlib-4k-mixed.qcow2", "1"),
        ("chain-top.qcow2", "3"),
        ("snap-resized.qcow2", "2"),
    ] {
        let image = common::fixtures_dir().join(name);
        let o = ours(&["convert", "-m", threads, s(&image), "-"]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let theirs = dir.join("qemu.raw");
        let t = qemu_img(&qemu, &["convert", "-O", "raw", s(&image), s(&theirs)]);
        assert!(t.status.success());
        let expected = std::fs::read(&theirs).unwrap();
        if let Some(d) = common::describe_difference(name, 0, &o.stdout, &expected) {
            panic!("{d}");
        }
    }
}

#[test]
fn cli_convert_errors() {
    let Some(qemu) = Qemu::find_or_skip("cli_convert_errors") else {
        return;
    };
    let dir = TempDir::new("cli-convert-err");
    let image = common::fixtures_dir().join("v3-64k-basic.qcow2");
    let out = dir.join("o.raw");
    // A bad -S: qemu-img's message.
    for bad in ["1000", "17M"] {
        let o = ours(&["convert", "-S", bad, s(&image), s(&out)]);
        let t = qemu_img(
            &qemu,
            &["convert", "-S", bad, "-O", "raw", s(&image), s(&out)],
        );
        assert_eq!(o.status.code(), Some(1));
        assert_eq!(message(&o, "qcow2"), message(&t, "qemu-img"));
    }
    // -m out of qemu-img's range 1..16: refused before anything happens.
    for bad in ["0", "17"] {
        assert!(!ours(&["convert", "-m", bad, s(&image), s(&out)])
            .status
            .success());
    }
    // Not qcow2, missing, corrupt, encrypted, a FIFO: one line, non-zero, no hang.
    let raw = dir.join("plain.raw");
    std::fs::write(&raw, vec![7u8; 4096]).unwrap();
    let fifo = dir.join("fifo");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let mut inputs = vec![
        raw.clone(),
        dir.join("missing.qcow2"),
        common::fixtures_dir().join("v3-corrupt.qcow2"),
        common::fixtures_dir().join("luks.qcow2"),
        dir.path().to_path_buf(),
    ];
    if made {
        inputs.push(fifo.clone());
        // A backing file that is a FIFO: refused, not opened (which would block).
        let o = qemu_img(
            &qemu,
            &[
                "create",
                "-q",
                "-u",
                "-f",
                "qcow2",
                "-b",
                s(&fifo),
                "-F",
                "raw",
                s(&dir.join("on-fifo.qcow2")),
                "1M",
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        inputs.push(dir.join("on-fifo.qcow2"));
    }
    // A backing chain that loops: A -> B -> A, and A -> A.
    let (a, b) = (dir.join("loop-a.qcow2"), dir.join("loop-b.qcow2"));
    for (image, backing) in [(&a, &b), (&b, &a)] {
        let o = qemu_img(
            &qemu,
            &[
                "create",
                "-q",
                "-u",
                "-f",
                "qcow2",
                "-b",
                s(backing),
                "-F",
                "qcow2",
                s(image),
                "1M",
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let selfish = dir.join("self.qcow2");
    for args in [
        &["create", "-q", "-f", "qcow2", s(&selfish), "1M"][..],
        &[
            "rebase",
            "-u",
            "-b",
            s(&selfish),
            "-F",
            "qcow2",
            s(&selfish),
        ],
    ] {
        let o = qemu_img(&qemu, args);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    inputs.extend([a.clone(), selfish.clone()]);
    for input in &inputs {
        // As qcow2: a raw file would convert, probed as raw.
        let o = ours(&["convert", "-f", "qcow2", s(input), s(&out)]);
        assert_eq!(o.status.code(), Some(1), "{input:?}");
        assert!(!message(&o, "qcow2").is_empty());
        let o = ours(&["compare", s(input), s(&image)]);
        assert!(
            o.status.code().unwrap() >= 2 || input == &raw,
            "compare {input:?}"
        );
    }
    for args in [&["-O", "vmdk"][..], &["-f", "vmdk"], &["-c", "-O", "raw"]] {
        let mut a = vec!["convert"];
        a.extend_from_slice(args);
        a.extend([s(&image), s(&out)]);
        assert_eq!(ours(&a).status.code(), Some(1), "{args:?}");
    }
    // The output is the input: refused, the image left as it was.
    let copy = dir.join("copy.qcow2");
    std::fs::copy(&image, &copy).unwrap();
    let before = std::fs::read(&copy).unwrap();
    for output_format in ["raw", "qcow2"] {
        let o = ours(&["convert", "-O", output_format, s(&copy), s(&copy)]);
        assert_eq!(o.status.code(), Some(1));
        assert!(!message(&o, "qcow2").is_empty());
        assert!(
            std::fs::read(&copy).unwrap() == before,
            "the input was changed (-O {output_format})"
        );
    }
    // Nor is a new image's data file, nor the output when it is a backing file.
    let chain_base = common::fixture("chain-base.qcow2");
    let base_copy = dir.join("chain-base.qcow2");
    std::fs::copy(&chain_base, &base_copy).unwrap();
    let mid = dir.join("mid.qcow2");
    let made = qemu_img(
        &qemu,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "chain-base.qcow2",
            "-F",
            "qcow2",
            s(&mid),
        ],
    );
    assert!(made.status.success(), "{}", stderr(&made));
    let base_before = std::fs::read(&base_copy).unwrap();
    let data_file = format!("data_file={}", s(&base_copy));
    for args in [
        vec!["convert", "-O", "qcow2", s(&mid), s(&base_copy)],
        vec!["convert", "-O", "qcow2", "-o", &data_file, s(&mid), s(&out)],
    ] {
        let o = ours(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(
            message(&o, "qcow2").contains("Could not create"),
            "{args:?}"
        );
        assert!(
            std::fs::read(&base_copy).unwrap() == base_before,
            "{args:?}"
        );
    }
    // -p draws nothing when standard error is not a terminal.
    let o = ours(&["convert", "-p", s(&image), s(&out)]);
    assert!(o.status.success() && o.stderr.is_empty(), "{}", stderr(&o));
}

/// Images to compare: raw and qcow2, the same or differing at chosen offsets, and sizes.
fn compare_images(qemu: &Qemu, d: &Path) -> Vec<PathBuf> {
    let mut rng = common::Rng::new(5);
    let mut raw = vec![0u8; 1 << 20];
    rng.fill_text(&mut raw[..500_000]);
    std::fs::write(d.join("a.raw"), &raw).unwrap();
    let img = |args: &[&str]| {
        let o = qemu_img(qemu, args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    };
    let p = |n: &str| s(&d.join(n)).to_owned();
    img(&[
        "convert",
        "-q",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        &p("a.raw"),
        &p("a-comp.qcow2"),
    ]);
    img(&["convert", "-q", "-O", "qcow2", &p("a.raw"), &p("a.qcow2")]);
    let mut names = vec![
        "a.raw".to_owned(),
        "a.qcow2".to_owned(),
        "a-comp.qcow2".to_owned(),
    ];
    for (name, at) in [
        ("sector", 4096 + 512),
        ("last", (1 << 20) - 1),
        ("comp", 200_001),
        ("hole", 700_000),
    ] {
        let mut v = raw.clone();
        v[at] ^= 1;
        std::fs::write(d.join(format!("{name}.raw")), &v).unwrap();
        img(&[
            "convert",
            "-q",
            "-O",
            "qcow2",
            &p(&format!("{name}.raw")),
            &p(&format!("{name}.qcow2")),
        ]);
        names.push(format!("{name}.raw"));
        names.push(format!("{name}.qcow2"));
    }
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &p("a.qcow2"),
        "-F",
        "qcow2",
        &p("big.qcow2"),
        "2M",
    ]);
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &p("a.qcow2"),
        "-F",
        "qcow2",
        &p("big-data.qcow2"),
        "2M",
    ]);
    let o = run_bounded(Command::new(&qemu.io).args([
        "-f",
        "qcow2",
        "-c",
        "write -P 9 1500000 1",
        &p("big-data.qcow2"),
    ]));
    assert!(o.status.success());
    // A raw file whose size is not a multiple of 512 (QEMU rounds it up).
    std::fs::write(d.join("odd.raw"), &raw[..1000]).unwrap();
    std::fs::write(d.join("odd2.raw"), &raw[..1024]).unwrap();
    names.extend(["big.qcow2", "big-data.qcow2", "odd.raw", "odd2.raw"].map(String::from));
    names.into_iter().map(|n| d.join(n)).collect()
}

#[test]
fn cli_compare_matches_qemu_img() {
    let Some(qemu) = Qemu::find_or_skip("cli_compare_matches_qemu_img") else {
        return;
    };
    let dir = TempDir::new("cli-compare");
    let images = compare_images(&qemu, dir.path());
    let base: Vec<&PathBuf> = images.iter().take(3).collect();
    let mut pairs: Vec<(Vec<&str>, &Path, &Path)> = vec![];
    for a in &base {
        for b in &images {
            pairs.push((vec![], a, b));
            pairs.push((vec!["-s"], a, b));
        }
    }
    let find = |n: &str| images.iter().find(|p| p.ends_with(n)).unwrap().as_path();
    for (a, b) in [("a.qcow2", "big.qcow2"), ("big-data.qcow2", "a.raw")] {
        pairs.push((vec![], find(a), find(b)));
        pairs.push((vec!["-s"], find(a), find(b)));
    }
    // Raw files cut mid-sector: QEMU reads up to the next sector as zeros.
    for flags in [vec![], vec!["-s"]] {
        pairs.push((flags.clone(), find("odd.raw"), find("odd2.raw")));
        pairs.push((flags, find("odd2.raw"), find("odd.raw")));
    }
    // Formats given: a qcow2 file read as raw differs from its guest disk.
    pairs.push((
        vec!["-f", "raw", "-F", "qcow2"],
        find("a.qcow2"),
        find("a.qcow2"),
    ));
    pairs.push((vec!["-f", "raw", "-F", "raw"], find("a.raw"), find("a.raw")));
    pairs.push((vec!["-F", "raw"], find("a.qcow2"), find("a.raw")));
    let missing = dir.join("missing.qcow2");
    pairs.push((vec![], find("a.qcow2"), &missing));
    let mut differ = 0;
    for (flags, a, b) in &pairs {
        let mut args = vec!["compare"];
        args.extend(flags.iter().copied());
        args.extend([s(a), s(b)]);
        let o = ours(&args);
        let t = qemu_img(&qemu, &args);
        assert_eq!(o.status.code(), t.status.code(), "{args:?}: {}", stderr(&o));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&t.stdout),
            "{args:?}"
        );
        if t.status.code() == Some(2) {
            assert!(!message(&o, "qcow2").is_empty());
        }
        differ += usize::from(t.status.code() == Some(1));
    }
    assert!(
        differ >= 15 && differ < pairs.len(),
        "{differ} of {} differ",
        pairs.len()
    );
    // Quiet: nothing on stdout, same exit code.
    let o = ours(&["compare", "-q", s(find("a.raw")), s(find("last.raw"))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
}

#[test]
fn cli_convert_sparse_sizes_like_qemu_img() {
    let Some(qemu) = Qemu::find_or_skip("cli_convert_sparse_sizes_like_qemu_img") else {
        return;
    };
    let dir = TempDir::new("cli-convert-sparse");
    let io = |image: &Path, cmds: &[String]| {
        let mut cmd = Command::new(&qemu.io);
        cmd.args(["-f", "qcow2"]);
        for c in cmds {
            cmd.args(["-c", c]);
        }
        let o = run_bounded(cmd.arg(image));
        assert!(o.status.success(), "{}", stderr(&o));
    };
    // Zero runs of many lengths inside data written in full (no holes in the image file),
    // some across the 2 MiB chunk edges.
    let full = dir.join("full.qcow2");
    let o = qemu_img(&qemu, &["create", "-q", "-f", "qcow2", s(&full), "6M"]);
    assert!(o.status.success());
    let mut cmds = vec!["write -P 0x71 0 6M".to_owned()];
    let mut at = 4096u64;
    for len in [
        512u64, 1024, 3584, 4096, 4608, 8192, 12288, 32768, 65536, 70000, 200000,
    ] {
        cmds.push(format!("write -P 0 {at} {len}"));
        at += len + 9000 + len / 3;
    }
    for edge in [2u64 << 20, 4 << 20] {
        cmds.push(format!("write -P 0 {} 20480", edge - 8192));
        cmds.push(format!("write -P 0 {} 100000", edge + 300_000));
    }
    io(&full, &cmds);
    // Small writes into fresh clusters: the rest of each cluster is a hole in the file.
    let partial = dir.join("partial.qcow2");
    let o = qemu_img(
        &qemu,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=65536",
            s(&partial),
            "4M",
        ],
    );
    assert!(o.status.success());
    let cmds: Vec<String> = (0..20u64)
        .map(|i| {
            format!(
                "write -P {} {} {}",
                i + 1,
                i * 150_000 + 777,
                1000 + i * 3000
            )
        })
        .collect();
    io(&partial, &cmds);
    for image in [&full, &partial] {
        for size in ["1k", "4k", "8k", "64k", "1M"] {
            convert_both(&qemu, &dir, image, &["-S", size], true);
        }
    }
}

#[test]
fn encrypted_images_convert_with_the_secret() {
    let Some(qemu) = Qemu::find_or_skip("encrypted_images_convert_with_the_secret") else {
        return;
    };
    let dir = TempDir::new("cli-convert-secret");
    let secret_file = dir.join("secret");
    std::fs::write(&secret_file, "abc").unwrap();
    for (name, format) in [("luks.qcow2", "luks"), ("aes.qcow2", "aes")] {
        let theirs = dir.join(format!("qemu-{format}.raw"));
        let image_opts = format!(
            "driver=qcow2,file.filename={name},encrypt.format={format},encrypt.key-secret=sec0"
        );
        let o = qemu_img(
            &qemu,
            &[
                "convert",
                "--object",
                "secret,id=sec0,data=abc",
                "--image-opts",
                &image_opts,
                "-O",
                "raw",
                s(&theirs),
            ],
        );
        assert!(o.status.success(), "qemu-img: {}", stderr(&o));
        let want = std::fs::read(&theirs).unwrap();
        // The secret as qemu-img takes it, and from a file.
        let ours = dir.join(format!("ours-{format}.raw"));
        for secret in [
            vec!["--object", "secret,id=sec0,data=abc"],
            vec!["--secret-file", s(&secret_file)],
        ] {
            let mut args = vec!["convert"];
            args.extend(secret.iter().copied());
            args.extend([name, s(&ours)]);
            let o = self::ours(&args);
            assert!(o.status.success(), "qcow2 {args:?}: {}", stderr(&o));
            assert!(
                std::fs::read(&ours).unwrap() == want,
                "{name}: bytes differ"
            );
        }
        // Named by --image-opts, exactly as qemu-img took it above.
        let o = self::ours(&[
            "convert",
            "--object",
            "secret,id=sec0,data=abc",
            "--object",
            "secret,id=other,data=xyz",
            "--image-opts",
            &image_opts,
            s(&ours),
        ]);
        assert!(o.status.success(), "qcow2 --image-opts: {}", stderr(&o));
        assert!(
            std::fs::read(&ours).unwrap() == want,
            "{name}: bytes differ"
        );
        // Without it: one line, as qemu-img refuses too.
        let o = self::ours(&["convert", name, s(&ours)]);
        assert!(!o.status.success(), "{name} converted without its secret");
        message(&o, "qcow2");
    }
}
