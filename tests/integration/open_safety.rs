//! Opening files safely (issue 19, points 1, 7 and 13): a conversion never writes over a file
//! its source reads; no open of the library or the command can block on a FIFO, even one
//! swapped in for a regular file between a check and the open; `FilePolicy::Under(d)` allows
//! a path that resolves inside `d` by any route and still refuses one that leads outside.
//!
//! QEMU's tools are the reference: `qemu-img convert` refuses an output that is a file of its
//! source (it cannot take the write lock) and leaves it as it was.
// Linux: the flipping symlink is swapped with renameat2(RENAME_EXCHANGE).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::{Qemu, TempDir};
use qcow2::{ConvertOptions, Error, FilePolicy, OpenOptions, Qcow2, RawDisk};

/// How long an operation that must not block may take before the test calls it hung.
const DEADLINE: Duration = Duration::from_secs(10);

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn sha(path: &Path) -> String {
    common::sha256_hex(&std::fs::read(path).unwrap())
}

/// Run a command with a deadline: a hang is a failure (the child is killed), never a stuck
/// test. Returns the output, or `None` when the deadline expired.
#[cfg(feature = "cli")]
fn run_bounded(cmd: &mut Command, deadline: Duration) -> Option<std::process::Output> {
    use std::process::{Output, Stdio};
    use std::time::Instant;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let started = Instant::now();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut v);
        v
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > deadline {
            child.kill().unwrap();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (stdout, stderr) = (out.join().unwrap(), err.join().unwrap());
    status.map(|status| Output {
        status,
        stdout,
        stderr,
    })
}

/// Run `f` on a thread and return its result, or fail the test if it takes longer than
/// [`DEADLINE`] (a blocked open). `release` is then called to unblock the thread.
fn bounded<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
    release: impl FnOnce(),
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(v) => v,
        Err(_) => {
            release();
            panic!("{what} did not return within {DEADLINE:?}: it blocked");
        }
    }
}

fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo")
        .arg(path)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "mkfifo {}", path.display());
}

/// Open the FIFO for writing without blocking, so that a reader blocked in `open` returns.
fn release_fifo(path: &Path) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(0o4000) // O_NONBLOCK
        .open(path);
}

/// A directory of images, made with qemu-img:
/// * `base.qcow2` (data 0x5a), `top.qcow2` over it (data 0x3c at 64k), `hard.qcow2` a hard
///   link to top, `sym` a symlink to base;
/// * `base.raw` (data 0x77) and `rawtop.qcow2` over it (raw backing);
/// * `dat.qcow2` keeping its data (0x66) in `data.raw`.
struct Chain {
    qemu: Qemu,
    dir: TempDir,
}

impl Chain {
    fn new(test: &str) -> Option<Chain> {
        let qemu = Qemu::find_or_skip(test)?;
        let dir = TempDir::new(test);
        let img = |args: &[&str]| qemu.img(dir.path(), args);
        let io = |image: &str, cmd: &str| qemu.io(dir.path(), "qcow2", image, &[cmd]);
        img(&["create", "-q", "-f", "qcow2", "base.qcow2", "1M"]);
        io("base.qcow2", "write -q -P 0x5a 0 64k");
        img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ]);
        io("top.qcow2", "write -q -P 0x3c 64k 64k");
        std::fs::hard_link(dir.join("top.qcow2"), dir.join("hard.qcow2")).unwrap();
        std::os::unix::fs::symlink("base.qcow2", dir.join("sym")).unwrap();
        std::fs::write(dir.join("base.raw"), vec![0x77u8; 256 << 10]).unwrap();
        img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "rawtop.qcow2",
            "1M",
        ]);
        img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=data.raw",
            "dat.qcow2",
            "1M",
        ]);
        io("dat.qcow2", "write -q -P 0x66 0 64k");
        Some(Chain { qemu, dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// (image, output): every output is a file the image reads.
    fn clashes() -> [(&'static str, &'static str); 6] {
        [
            ("top.qcow2", "base.qcow2"),
            ("top.qcow2", "sym"),
            ("top.qcow2", "hard.qcow2"),
            ("top.qcow2", "top.qcow2"),
            ("rawtop.qcow2", "base.raw"),
            ("dat.qcow2", "data.raw"),
        ]
    }

    fn hashes(&self) -> Vec<(String, String)> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|n| {
                let h = sha(&self.path(&n));
                (n, h)
            })
            .collect()
    }

    /// What qemu-img reads of `image`.
    fn qemu_raw(&self, image: &str) -> Vec<u8> {
        let out = self.path("qemu-expected.raw");
        self.qemu
            .img(self.dir.path(), &["convert", "-O", "raw", image, s(&out)]);
        let data = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        data
    }
}

/// An output opened as a careful caller opens it: created if missing, never truncated.
fn open_output(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap()
}

#[test]
fn convert_to_file_refuses_a_file_the_source_reads() {
    let Some(chain) = Chain::new("open-safety-lib") else {
        return;
    };
    let before = chain.hashes();
    let options = ConvertOptions::new().threads(2);
    for (image, output) in Chain::clashes() {
        let opened = Qcow2::open_path(chain.path(image)).unwrap();
        let reader = opened.reader().unwrap();
        let out = open_output(&chain.path(output));
        let err = qcow2::convert_to_file(&reader, &out, &options, |_, _| {}).unwrap_err();
        assert!(
            matches!(err, Error::OutputIsSource),
            "{image} -> {output}: {err:?}"
        );
        assert_eq!(chain.hashes(), before, "{image} -> {output} changed a file");
    }
    // A raw disk and a hard link to its file.
    let raw_sha = sha(&chain.path("base.raw"));
    std::fs::hard_link(chain.path("base.raw"), chain.path("raw-link")).unwrap();
    let raw = RawDisk::open_path(chain.path("base.raw")).unwrap();
    let out = open_output(&chain.path("raw-link"));
    let err = qcow2::convert_to_file(&raw, &out, &options, |_, _| {}).unwrap_err();
    assert!(matches!(err, Error::OutputIsSource), "{err:?}");
    assert_eq!(sha(&chain.path("base.raw")), raw_sha);
    // Any other file is written, emptied first: an old, longer file with other bytes ends
    // up as qemu-img's output.
    let other = chain.path("old.raw");
    std::fs::write(&other, vec![0xeeu8; 3 << 20]).unwrap();
    let opened = Qcow2::open_path(chain.path("top.qcow2")).unwrap();
    let reader = opened.reader().unwrap();
    qcow2::convert_to_file(&reader, &open_output(&other), &options, |_, _| {}).unwrap();
    assert!(std::fs::read(&other).unwrap() == chain.qemu_raw("top.qcow2"));
}

#[cfg(feature = "cli")]
const BIN: &str = env!("CARGO_BIN_EXE_qcow2");

#[cfg(feature = "cli")]
#[test]
fn cli_convert_refuses_a_file_the_source_reads_like_qemu_img() {
    let Some(chain) = Chain::new("open-safety-cli") else {
        return;
    };
    let before = chain.hashes();
    for (image, output) in Chain::clashes() {
        let theirs = run_bounded(
            Command::new(&chain.qemu.img)
                .current_dir(chain.dir.path())
                .args(["convert", "-O", "raw", image, output]),
            DEADLINE,
        )
        .expect("qemu-img convert hung");
        assert!(!theirs.status.success(), "qemu-img {image} -> {output}");
        assert_eq!(chain.hashes(), before, "qemu-img {image} -> {output}");
        let ours = run_bounded(
            Command::new(BIN)
                .current_dir(chain.dir.path())
                .args(["convert", image, output]),
            DEADLINE,
        )
        .expect("qcow2 convert hung");
        let stderr = String::from_utf8_lossy(&ours.stderr);
        assert_eq!(
            chain.hashes(),
            before,
            "qcow2 {image} -> {output} changed a file: {stderr}"
        );
        assert_eq!(ours.status.code(), Some(1), "{image} -> {output}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("Could not create"),
            "{image} -> {output}: {stderr}"
        );
    }
    // Standard output appended to a file of the chain (`qcow2 convert top.qcow2 - >>
    // base.qcow2`): refused too.
    let append = std::fs::OpenOptions::new()
        .append(true)
        .open(chain.path("base.qcow2"))
        .unwrap();
    let mut child = Command::new(BIN)
        .current_dir(chain.dir.path())
        .args(["convert", "top.qcow2", "-"])
        .stdin(std::process::Stdio::null())
        .stdout(append)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > DEADLINE {
            child.kill().unwrap();
            panic!("qcow2 convert top.qcow2 - >> base.qcow2 hung");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(status.code(), Some(1));
    assert_eq!(
        chain.hashes(),
        before,
        "qcow2 convert top.qcow2 - >> base.qcow2"
    );
    // Every image still converts, to a new file, as qemu-img converts it.
    for image in ["top.qcow2", "rawtop.qcow2", "dat.qcow2"] {
        let out = chain.path("ours.raw");
        let o = run_bounded(
            Command::new(BIN)
                .current_dir(chain.dir.path())
                .args(["convert", image, s(&out)]),
            DEADLINE,
        )
        .expect("qcow2 convert hung");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            std::fs::read(&out).unwrap() == chain.qemu_raw(image),
            "{image}"
        );
        std::fs::remove_file(&out).unwrap();
    }
}

#[test]
fn raw_disks_and_open_file_refuse_a_fifo_at_once() {
    let dir = TempDir::new("open-safety-fifo");
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let path = fifo.clone();
    let err = bounded(
        "RawDisk::open_path(FIFO)",
        move || RawDisk::open_path(&path).err(),
        || release_fifo(&fifo),
    );
    assert!(
        matches!(err, Some(Error::NotRegularFile { kind: "FIFO", .. })),
        "{err:?}"
    );
    let path = fifo.clone();
    let err = bounded(
        "open_file(FIFO)",
        move || {
            let options = OpenOptions::new().allow_devices(true);
            qcow2::open_file(&path, &options).err()
        },
        || release_fifo(&fifo),
    );
    assert!(
        matches!(err, Some(Error::NotRegularFile { kind: "FIFO", .. })),
        "{err:?}"
    );
    // Directories and character devices too; a block device only when allowed.
    for other in [dir.path(), Path::new("/dev/null")] {
        let err = RawDisk::open_path(other).unwrap_err();
        assert!(matches!(err, Error::NotRegularFile { .. }), "{err:?}");
        let err = qcow2::open_file(other, &OpenOptions::new()).unwrap_err();
        assert!(matches!(err, Error::NotRegularFile { .. }), "{err:?}");
    }
}

#[cfg(feature = "cli")]
#[test]
fn cli_bitmap_dump_of_a_fifo_fails_at_once() {
    let dir = TempDir::new("open-safety-bitmap-fifo");
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let o = run_bounded(
        Command::new(BIN).args(["bitmap", "--dump", "b0", s(&fifo)]),
        DEADLINE,
    );
    release_fifo(&fifo);
    let o = o.expect("qcow2 bitmap --dump on a FIFO blocked");
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("FIFO"), "{stderr}");
}

/// A symlink flipped, as fast as possible, between two targets (one `renameat2` exchange of
/// two symlinks per flip): what checks the path and then opens it by name may open the other
/// target. Between a regular file and a FIFO, a blocking open then blocks.
struct Flipper {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Flipper {
    /// Flip `link` (replaced by a symlink to `targets[0]`) with a symlink to `targets[1]`.
    fn start(link: PathBuf, targets: [PathBuf; 2]) -> Flipper {
        let other = link.with_extension("flip-other");
        let tmp = link.with_extension("flip-tmp");
        std::os::unix::fs::symlink(&targets[0], &tmp).unwrap();
        std::fs::rename(&tmp, &link).unwrap();
        std::os::unix::fs::symlink(&targets[1], &other).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            use rustix::fs::{renameat_with, RenameFlags, CWD};
            let mut flips = 0u64;
            while !flag.load(Ordering::Relaxed) {
                renameat_with(CWD, &link, CWD, &other, RenameFlags::EXCHANGE).unwrap();
                flips += 1;
            }
            flips
        });
        Flipper {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(0, |t| t.join().unwrap())
    }
}

impl Drop for Flipper {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(feature = "cli")]
#[test]
fn cli_convert_and_compare_never_block_on_a_symlink_switched_to_a_fifo() {
    let Some(qemu) = Qemu::find_or_skip("cli_symlink_to_fifo_race") else {
        return;
    };
    let dir = TempDir::new("open-safety-race");
    std::fs::write(dir.join("disk.raw"), vec![0x42u8; 64 << 10]).unwrap();
    mkfifo(&dir.join("fifo"));
    std::os::unix::fs::symlink("disk.raw", dir.join("link")).unwrap();
    qemu.img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "link",
            "-F",
            "raw",
            "top.qcow2",
            "64k",
        ],
    );
    let mut flipper = Flipper::start(dir.join("link"), [dir.join("disk.raw"), dir.join("fifo")]);
    const TRIES: usize = 150;
    let (mut ok, mut refused) = (0, 0);
    for i in 0..TRIES {
        let args: &[&str] = if i % 2 == 0 {
            &["convert", "top.qcow2", "out.raw"]
        } else {
            &["compare", "link", "disk.raw"]
        };
        let o = run_bounded(
            Command::new(BIN).current_dir(dir.path()).args(args),
            DEADLINE,
        );
        let Some(o) = o else {
            flipper.stop();
            release_fifo(&dir.join("fifo"));
            panic!("qcow2 {args:?} blocked (try {i}): it opened the FIFO blocking");
        };
        if o.status.success() {
            ok += 1;
        } else {
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert!(
                stderr.contains("FIFO") || stderr.contains("regular file"),
                "{args:?}: {stderr}"
            );
            refused += 1;
        }
    }
    let flips = flipper.stop();
    eprintln!("{TRIES} runs: {ok} read the file, {refused} refused the FIFO; {flips} flips");
    assert!(
        flips > TRIES as u64,
        "the symlink hardly moved ({flips} flips)"
    );
}

/// `FilePolicy::Under(jail)`: images in `t/jail`, a secret outside in `t`.
struct Jail {
    qemu: Qemu,
    dir: TempDir,
}

impl Jail {
    fn new(test: &str) -> Option<Jail> {
        let qemu = Qemu::find_or_skip(test)?;
        let dir = TempDir::new(test);
        std::fs::create_dir(dir.join("jail")).unwrap();
        let jail = Jail { qemu, dir };
        jail.img(&["create", "-q", "-f", "qcow2", "secret.qcow2", "1M"]);
        jail.qemu.io(
            jail.dir.path(),
            "qcow2",
            "secret.qcow2",
            &["write -q -P 0x66 0 64k"],
        );
        jail.img(&["create", "-q", "-f", "qcow2", "jail/base.qcow2", "1M"]);
        jail.qemu.io(
            jail.dir.path(),
            "qcow2",
            "jail/base.qcow2",
            &["write -q -P 0x67 0 64k"],
        );
        Some(jail)
    }

    fn img(&self, args: &[&str]) {
        self.qemu.img(self.dir.path(), args);
    }

    /// `jail/NAME` over the backing file named `backing` (as written in its header).
    fn overlay(&self, name: &str, backing: &str) {
        self.img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            backing,
            "-F",
            "qcow2",
            &format!("jail/{name}"),
            "1M",
        ]);
    }

    fn under(&self) -> OpenOptions {
        OpenOptions::new().files(FilePolicy::Under(self.dir.join("jail")))
    }

    /// The first byte the crate reads of `jail/NAME` under the policy.
    fn first_byte(&self, name: &str) -> Result<u8, Error> {
        let image = Qcow2::open_path_with(self.dir.join("jail").join(name), &self.under())?;
        let mut buf = [0u8; 1];
        positioned_io::ReadAt::read_exact_at(&image.reader()?, 0, &mut buf)
            .map_err(|e| Error::from_io("reading", e))?;
        Ok(buf[0])
    }

    /// The first byte qemu-img reads of `jail/NAME`.
    fn qemu_first_byte(&self, name: &str) -> u8 {
        let out = self.dir.join("qemu.raw");
        self.img(&["convert", "-O", "raw", &format!("jail/{name}"), s(&out)]);
        std::fs::read(&out).unwrap()[0]
    }
}

#[test]
fn under_allows_any_route_that_resolves_inside() {
    let Some(jail) = Jail::new("open-safety-under") else {
        return;
    };
    let inside = jail.dir.join("jail/base.qcow2");
    // `../jail/base.qcow2`: out of the directory and back in.
    jail.overlay("dotdot.qcow2", "../jail/base.qcow2");
    // An absolute symlink that points inside.
    std::os::unix::fs::symlink(&inside, jail.dir.join("jail/abs-link")).unwrap();
    jail.overlay("abslink.qcow2", "abs-link");
    // An absolute name, through a `..`.
    let roundabout = jail.dir.join("jail/../jail/base.qcow2");
    jail.overlay("absdotdot.qcow2", s(&roundabout));
    // A relative symlink into a subdirectory, and a relative one back up.
    std::fs::create_dir(jail.dir.join("jail/sub")).unwrap();
    std::os::unix::fs::symlink("../base.qcow2", jail.dir.join("jail/sub/up")).unwrap();
    jail.overlay("subup.qcow2", "sub/up");
    for name in [
        "dotdot.qcow2",
        "abslink.qcow2",
        "absdotdot.qcow2",
        "subup.qcow2",
    ] {
        assert_eq!(jail.qemu_first_byte(name), 0x67, "{name}");
        let got = jail.first_byte(name);
        assert!(matches!(got, Ok(0x67)), "{name}: {got:?}");
    }
    // Routes that end outside stay refused: an absolute symlink out, `..` out, a symlinked
    // directory out.
    std::os::unix::fs::symlink(jail.dir.join("secret.qcow2"), jail.dir.join("jail/out")).unwrap();
    jail.overlay("abs-out.qcow2", "out");
    jail.overlay("dotdot-out.qcow2", "../secret.qcow2");
    std::os::unix::fs::symlink(jail.dir.path(), jail.dir.join("jail/updir")).unwrap();
    jail.overlay("updir-out.qcow2", "updir/secret.qcow2");
    for name in ["abs-out.qcow2", "dotdot-out.qcow2", "updir-out.qcow2"] {
        assert_eq!(jail.qemu_first_byte(name), 0x66, "QEMU follows {name}");
        let got = jail.first_byte(name);
        assert!(
            matches!(got, Err(Error::FileRefused { .. })),
            "{name}: {got:?}"
        );
    }
    // A missing file inside is an I/O error (not found), not a refusal.
    jail.overlay("missing.qcow2", "../jail/none.qcow2");
    let got = jail.first_byte("missing.qcow2");
    assert!(
        matches!(&got, Err(e) if e.io_kind() == std::io::ErrorKind::NotFound),
        "{got:?}"
    );
}

#[test]
fn under_never_opens_outside_while_a_symlink_flips() {
    let Some(jail) = Jail::new("open-safety-under-race") else {
        return;
    };
    let link = jail.dir.join("jail/flip");
    std::os::unix::fs::symlink(jail.dir.join("jail/base.qcow2"), &link).unwrap();
    jail.overlay("flip.qcow2", "flip");
    let mut flipper = Flipper::start(
        link,
        [
            jail.dir.join("jail/base.qcow2"),
            jail.dir.join("secret.qcow2"),
        ],
    );
    let (mut inside, mut refused) = (0, 0);
    for _ in 0..300 {
        match jail.first_byte("flip.qcow2") {
            Ok(0x67) => inside += 1,
            Ok(b) => panic!("read {b:#x} through the flipping link: a file outside was opened"),
            Err(Error::FileRefused { .. }) => refused += 1,
            // The link replaced between the steps of the open.
            Err(e) if e.io_kind() == std::io::ErrorKind::NotFound => refused += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    let flips = flipper.stop();
    eprintln!("300 opens: {inside} inside, {refused} refused; {flips} flips");
}
