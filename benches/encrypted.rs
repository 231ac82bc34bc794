//! Encrypted read-speed benchmark: the crate reading a LUKS (aes-256-xts-plain64) image
//! against `qemu-img convert` of it to the null driver, in the same run.
//!
//! ```text
//! cargo bench --bench encrypted                            # 1 GiB image, 5 rounds
//! cargo bench --bench encrypted -- --size-mib 256 --runs 3
//! ```
//!
//! The image is made once with `qemu-img convert` (QEMU's default LUKS cipher, aes-256-xts,
//! fully allocated, PRNG data) under `target/bench-encrypted/` and reused. Before timing it
//! is synced, dropped from the page cache and read once; the crate's whole guest is compared
//! with the raw file once. Then, interleaved round by round, the crate (open with the
//! secret, sequential 1 MiB reads) and `qemu-img convert -n --object secret,...
//! --image-opts driver=qcow2,...,encrypt.key-secret=sec0 --target-image-opts
//! driver=null-co,size=N` are timed; medians are reported. Both unlock the key slot (QEMU's
//! PBKDF2 calibration gives it about 10 ms of iterations) in every pass.
//!
//! Run without `--bench` (as `cargo test --benches` does), it is a quick smoke test on a tiny
//! image in a temporary directory.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use positioned_io::ReadAt;
use qcow2::{OpenOptions, Qcow2};

#[path = "common/mod.rs"]
mod common;

use common::{recache, Res};

const MIB: u64 = 1 << 20;
const SECRET: &str = "benchmark secret";
const BUFFER: usize = 1 << 20;

struct Config {
    size_mib: u64,
    runs: usize,
    dir: PathBuf,
    smoke: bool,
}

fn config() -> Config {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let mut c = Config {
        size_mib: 1024,
        runs: 5,
        dir: target.join("bench-encrypted"),
        smoke,
    };
    if smoke {
        c.size_mib = 8;
        c.runs = 1;
        c.dir = std::env::temp_dir().join(format!("qcow2-bench-enc-{}", std::process::id()));
    }
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = || -> u64 {
            it.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                eprintln!("usage: cargo bench --bench encrypted [-- [--size-mib N] [--runs K] [--dir PATH]]");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--size-mib" => c.size_mib = num(),
            "--runs" => c.runs = num() as usize,
            "--dir" => c.dir = it.next().map(PathBuf::from).unwrap_or(c.dir.clone()),
            _ => {}
        }
    }
    c
}

fn main() -> Res<()> {
    let cfg = config();
    common::run_in("encrypted", &cfg.dir, cfg.smoke, || run(&cfg))
}

fn run(cfg: &Config) -> Res<()> {
    let size = cfg.size_mib * MIB;
    let raw = cfg.dir.join(format!("data-{}m.raw", cfg.size_mib));
    make_raw(&raw, size)?;
    let image = make_luks(&raw)?;
    recache(&[&image, &raw])?;
    verify(&image, &raw, size)?;
    let mut krate = Vec::new();
    let mut qemu = Vec::new();
    for round in 0..cfg.runs {
        // Alternate which goes first, so neither always follows the other.
        for which in [round % 2, 1 - round % 2] {
            let t = Instant::now();
            if which == 0 {
                read_with_crate(&image, size)?;
                krate.push(t.elapsed());
            } else {
                read_with_qemu(&image, size)?;
                qemu.push(t.elapsed());
            }
        }
    }
    let (k, q) = (median_mib_s(size, &krate), median_mib_s(size, &qemu));
    println!(
        "\nencrypted read, {} MiB LUKS aes-256-xts-plain64, {} rounds, medians (wall time):",
        cfg.size_mib, cfg.runs
    );
    println!("  qcow2 crate (1 MiB reads)      {k:8.0} MiB/s");
    println!("  qemu-img convert -> null-co    {q:8.0} MiB/s");
    println!("  crate / qemu-img               {:8.2}", k / q);
    println!("  load average: {}", loadavg());
    Ok(())
}

/// A raw file of PRNG data (no zero blocks, nothing compressible).
fn make_raw(path: &Path, size: u64) -> Res<()> {
    if fs::metadata(path).is_ok_and(|m| m.len() == size) {
        return Ok(());
    }
    let mut f = File::create(path)?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ size;
    let mut chunk = vec![0u8; MIB as usize];
    for _ in 0..size / MIB {
        for w in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    Ok(())
}

/// `qemu-img convert` of `raw` to a LUKS qcow2 image with QEMU's default cipher.
fn make_luks(raw: &Path) -> Res<PathBuf> {
    let path = raw.with_extension("luks.qcow2");
    let options = OpenOptions::new().secret(SECRET);
    let size = fs::metadata(raw)?.len();
    let usable = File::open(&path)
        .ok()
        .and_then(|f| Qcow2::open_with(f, &options).ok())
        .is_some_and(|i| i.guest_size() == size);
    if usable {
        return Ok(path);
    }
    let status = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2", "--object"])
        .arg(format!("secret,id=sec0,data={SECRET}"))
        .args([
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        ])
        .arg(raw)
        .arg(&path)
        .status()?;
    if !status.success() {
        return Err(format!("qemu-img convert failed: {status}").into());
    }
    Ok(path)
}

fn verify(image: &Path, raw: &Path, size: u64) -> Res<()> {
    let img = Qcow2::open_with(File::open(image)?, &OpenOptions::new().secret(SECRET))?;
    let reader = img.reader()?;
    let mut raw = File::open(raw)?;
    let (mut a, mut b) = (vec![0u8; BUFFER], vec![0u8; BUFFER]);
    let mut pos = 0;
    while pos < size {
        reader.read_exact_at(pos, &mut a)?;
        raw.read_exact(&mut b)?;
        if a != b {
            return Err(format!("the crate's data differs from the raw file near {pos:#x}").into());
        }
        pos += BUFFER as u64;
    }
    Ok(())
}

fn read_with_crate(image: &Path, size: u64) -> Res<()> {
    let img = Qcow2::open_with(File::open(image)?, &OpenOptions::new().secret(SECRET))?;
    let reader = img.reader()?;
    let mut buf = vec![0u8; BUFFER];
    let mut pos = 0;
    while pos < size {
        reader.read_exact_at(pos, &mut buf)?;
        pos += BUFFER as u64;
    }
    std::hint::black_box(&buf);
    Ok(())
}

fn read_with_qemu(image: &Path, size: u64) -> Res<()> {
    let status = Command::new("qemu-img")
        .args(["convert", "-n", "--object"])
        .arg(format!("secret,id=sec0,data={SECRET}"))
        .arg("--image-opts")
        .arg(format!(
            "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
            image.display()
        ))
        .arg("--target-image-opts")
        .arg(format!("driver=null-co,size={size}"))
        .status()?;
    if !status.success() {
        return Err(format!("qemu-img convert to null-co failed: {status}").into());
    }
    Ok(())
}

fn median_mib_s(size: u64, times: &[Duration]) -> f64 {
    let mut s: Vec<f64> = times
        .iter()
        .map(|t| size as f64 / MIB as f64 / t.as_secs_f64().max(1e-9))
        .collect();
    s.sort_by(f64::total_cmp);
    let mid = s.len() / 2;
    if s.len() % 2 == 1 {
        s[mid]
    } else {
        (s[mid - 1] + s[mid]) / 2.0
    }
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
