//! Opening files safely: `FilePolicy::Under(d)` allows a path that resolves inside `d` by any
//! route and still refuses one that leads outside, even while a symlink flips (issue 19,
//! point 13).
// Linux: the flipping symlink is swapped with renameat2(RENAME_EXCHANGE).
#![cfg(target_os = "linux")]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{Qemu, TempDir};
use qcow2::{Error, FilePolicy, OpenOptions, Qcow2};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
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
