//! Helpers shared by the benchmarks: making input files once, putting them in the page cache
//! in the same state, a PRNG, and the qemu-img check.
#![allow(dead_code)] // each bench uses its own subset

use std::error::Error;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use qcow2::Qcow2;

pub type Res<T> = Result<T, Box<dyn Error>>;

pub const MIB: u64 = 1 << 20;

/// Where full runs keep their images: `target/<name>/` (or under `CARGO_TARGET_DIR`).
pub fn target_dir(name: &str) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // The workspace's target directory, also from the peers' crate (benches/peers).
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
            let root = match dir.ends_with("benches/peers") {
                true => dir.parent().and_then(Path::parent).unwrap_or(dir),
                false => dir,
            };
            root.join("target")
        })
        .join(name)
}

/// Whether `qemu-img` runs. Without it a bench prints a loud SKIPPED notice and returns
/// `false`, except under `CI=true`, where it panics.
pub fn qemu_img_or_skip(bench: &str) -> bool {
    let found = Command::new("qemu-img")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("qemu-img not found (required when CI=true)");
        }
        eprintln!("SKIPPED: qemu-img not found (the {bench} benchmark needs it to make images)");
    }
    found
}

/// A bench's `main`: unless `qemu-img` is missing (see [`qemu_img_or_skip`]), make `dir`,
/// run `run`, and on a smoke run remove `dir` afterwards.
pub fn run_in(bench: &str, dir: &Path, smoke: bool, run: impl FnOnce() -> Res<()>) -> Res<()> {
    if !qemu_img_or_skip(bench) {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    let result = run();
    if smoke {
        let _ = fs::remove_dir_all(dir);
    }
    result
}

#[derive(Clone, Copy)]
pub enum Fill {
    /// PRNG output: incompressible, never zero.
    Random,
    /// Random letters from a 16-letter alphabet: zlib gets it to roughly half.
    Compressible,
}

/// SplitMix64: fast and good enough to defeat compression.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Fill `buf` (a multiple of 8 bytes long) with `fill`.
    pub fn fill(&mut self, buf: &mut [u8], fill: Fill) {
        for w in buf.chunks_exact_mut(8) {
            let x = self.next();
            let bytes = match fill {
                Fill::Random => x.to_le_bytes(),
                Fill::Compressible => {
                    let mut b = [0u8; 8];
                    for (i, out) in b.iter_mut().enumerate() {
                        *out = b'a' + ((x >> (i * 4)) & 0xf) as u8;
                    }
                    b
                }
            };
            w.copy_from_slice(&bytes);
        }
    }
}

/// SplitMix64's finalizer: a good 64-bit hash of `z`.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Write `size` bytes of `fill` to `path` unless a file of that size is there already.
/// Files are written under a temporary name and renamed, so a file present is complete.
pub fn make_raw(path: &Path, size: u64, fill: Fill) -> Res<()> {
    if fs::metadata(path).map(|m| m.len() == size).unwrap_or(false) {
        println!("reusing {}", path.display());
        return Ok(());
    }
    println!("writing {} ({} MiB)", path.display(), size / MIB);
    let tmp = path.with_extension("raw.tmp");
    let mut f = File::create(&tmp)?;
    let mut rng = Rng(0x005e_ed0f_ca75 ^ size);
    let mut chunk = vec![0u8; MIB as usize];
    let mut left = size;
    while left > 0 {
        rng.fill(&mut chunk, fill);
        let n = left.min(MIB) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    Ok(())
}

/// Whether `path` opens as a qcow2 image of `size` guest bytes (so it need not be remade).
pub fn usable_image(path: &Path, size: u64) -> bool {
    File::open(path)
        .ok()
        .and_then(|f| Qcow2::open(f).ok())
        .is_some_and(|img| img.guest_size() == size)
}

/// The guest size of the qcow2 image at `path` (its own header; no backing opened).
pub fn guest_size(path: &Path) -> Res<u64> {
    Ok(Qcow2::open(File::open(path)?)?.guest_size())
}

/// `qemu-img convert` `raw` to a qcow2 image named after it and `tag`, unless present.
pub fn make_qcow2(raw: &Path, tag: &str, opts: &[&str]) -> Res<PathBuf> {
    let stem = raw.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
    let path = raw.with_file_name(format!("{stem}-{tag}.qcow2"));
    let size = fs::metadata(raw)?.len();
    if usable_image(&path, size) {
        println!("reusing {}", path.display());
        return Ok(path);
    }
    println!("qemu-img convert {} -> {}", raw.display(), path.display());
    let tmp = path.with_extension("qcow2.tmp");
    qemu_img(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .args(opts)
            .arg(raw)
            .arg(&tmp),
    )?;
    settle(&tmp)?;
    fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Rewrite the finished file at `path` by one sequential copy, as the raw files are written.
/// A file as `qemu-img` leaves it (written out of order, in pieces) was measured to read up
/// to 18% slower from the page cache than the same bytes written in order, dropped and read
/// back the same way: without this, ratios to a raw file measured the files, not the readers.
pub fn settle(path: &Path) -> Res<()> {
    let copy = path.with_extension("settle.tmp");
    {
        let (mut from, mut to) = (File::open(path)?, File::create(&copy)?);
        let mut buf = vec![0u8; MIB as usize];
        loop {
            let n = from.read(&mut buf)?;
            if n == 0 {
                break;
            }
            to.write_all(&buf[..n])?;
        }
        to.sync_all()?;
    }
    fs::rename(&copy, path)?;
    Ok(())
}

/// Run a `qemu-img` command that makes or changes a file; an error if it fails.
pub fn qemu_img(cmd: &mut Command) -> Res<()> {
    let out = cmd.stdout(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(())
}

/// Put every file in the same page-cache state: synced, dropped, then read once in full,
/// the files taking turns piece by piece.
///
/// Taking turns matters: on this kind of VM a file read into the page cache right after
/// another got slower memory (1 GiB read in 0.18-0.19 s against 0.15 s for the file read first,
/// in three drop-and-read cycles, and the other way round when the order was swapped), which
/// decided a "crate vs raw" ratio more than the crate did. Read in turns, the two 1 GiB files
/// read in the same time (0.165-0.167 s each, three cycles).
pub fn recache(paths: &[&Path]) -> Res<()> {
    for p in paths {
        File::open(p)?.sync_all()?;
        let dropped = Command::new("dd")
            .arg(format!("if={}", p.display()))
            .args(["iflag=nocache", "count=0", "status=none"])
            .status()
            .is_ok_and(|s| s.success());
        if !dropped {
            eprintln!(
                "warning: could not drop {} from the page cache",
                p.display()
            );
        }
    }
    read_in_turns(paths)
}

/// Read every file once in full, without dropping it first: pages evicted since it was
/// cached come back (some machines page out page-cache pages idle for a minute, DAMON's
/// reclaim, which would time a pass partly from the disk). In turns, as [`recache`] reads.
pub fn rewarm(paths: &[&Path]) -> Res<()> {
    read_in_turns(paths)
}

/// Read the files to their ends, 2 MiB of each in turn.
fn read_in_turns(paths: &[&Path]) -> Res<()> {
    let mut files = paths
        .iter()
        .map(File::open)
        .collect::<io::Result<Vec<_>>>()?;
    let mut buf = vec![0u8; 2 * MIB as usize];
    while !files.is_empty() {
        let mut open = Vec::with_capacity(files.len());
        for mut f in files {
            if read_piece(&mut f, &mut buf)? > 0 {
                open.push(f);
            }
        }
        files = open;
    }
    Ok(())
}

/// Fill `buf` from `f` as far as the file goes; the bytes read.
fn read_piece(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}
