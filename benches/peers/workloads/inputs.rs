//! The images of the workloads, made once with `qemu-img` (and reused while they open with
//! the right size), and the offset lists of the random-read workloads.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::child::{write_offsets, RANDOM_READ};
use crate::common::{
    make_qcow2, make_raw, mix, qemu_img, settle, usable_image, Fill, Res, Rng, MIB,
};

pub const CLUSTER: u64 = 64 << 10;
pub const TIB: u64 = 1 << 40;
/// Guest bytes one L2 table of 64 KiB clusters maps (8192 entries).
pub const L2_SPAN: u64 = 512 * MIB;

/// A fully allocated 64 KiB-cluster image of PRNG data next to its raw file.
pub fn plain(dir: &Path, size: u64) -> Res<(PathBuf, PathBuf)> {
    let raw = dir.join(format!("random-{}m.raw", size / MIB));
    make_raw(&raw, size, Fill::Random)?;
    let img = make_qcow2(&raw, "64k", &["-o", "cluster_size=65536"])?;
    Ok((img, raw))
}

/// Compressible data and its images with every cluster compressed: zlib and zstd.
pub fn compressed(dir: &Path, size: u64) -> Res<(PathBuf, PathBuf, PathBuf)> {
    let raw = dir.join(format!("text-{}m.raw", size / MIB));
    make_raw(&raw, size, Fill::Compressible)?;
    let zlib = make_qcow2(&raw, "zlib", &["-c", "-o", "cluster_size=65536"])?;
    let zstd = make_qcow2(
        &raw,
        "zstd",
        &["-c", "-o", "cluster_size=65536,compression_type=zstd"],
    )?;
    Ok((raw, zlib, zstd))
}

/// A 3-deep chain over `base` (the fully allocated image of `raw`) whose guest equals `raw`:
/// cluster `i` is stored in the base when `i % 3 == 0`, in the middle layer when 1, in the
/// top when 2, so the layer changes every cluster. Returns the middle layer and the top.
pub fn chain(raw: &Path, base: &Path) -> Res<(PathBuf, PathBuf)> {
    let size = fs::metadata(raw)?.len();
    let stem = raw.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
    let mid = raw.with_file_name(format!("{stem}-chain-mid.qcow2"));
    let top = raw.with_file_name(format!("{stem}-chain-top.qcow2"));
    if usable_image(&mid, size) && usable_image(&top, size) {
        println!("reusing {}", top.display());
        return Ok((mid, top));
    }
    layer(raw, &mid, base, 1)?;
    layer(raw, &top, &mid, 2)?;
    Ok((mid, top))
}

/// One layer of [`chain`]: `raw`'s clusters `i % 3 == which`, the rest unallocated, over
/// `backing` (recorded by file name: all live in one directory).
fn layer(raw: &Path, out: &Path, backing: &Path, which: u64) -> Res<()> {
    println!("making {}", out.display());
    let size = fs::metadata(raw)?.len();
    let sparse = out.with_extension("raw.tmp");
    let (src, dst) = (File::open(raw)?, File::create(&sparse)?);
    dst.set_len(size)?;
    let mut buf = vec![0u8; CLUSTER as usize];
    for i in (which..size / CLUSTER).step_by(3) {
        src.read_exact_at(&mut buf, i * CLUSTER)?;
        dst.write_all_at(&buf, i * CLUSTER)?;
    }
    drop(dst);
    // The holes of the sparse file stay unallocated in the image.
    let tmp = out.with_extension("qcow2.tmp");
    qemu_img(
        Command::new("qemu-img")
            .args([
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=65536",
            ])
            .arg(&sparse)
            .arg(&tmp),
    )?;
    fs::remove_file(&sparse)?;
    let name = backing.file_name().ok_or("backing without a file name")?;
    qemu_img(
        Command::new("qemu-img")
            .args(["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(name)
            .arg(&tmp),
    )?;
    settle(&tmp)?;
    fs::rename(&tmp, out)?;
    Ok(())
}

/// A 1 TiB image holding `clusters` 64 KiB data clusters, one at a random cluster of each
/// equal slice of the disk, and a dense raw file of the same data in guest order (the `dd`
/// baseline). Made from a sparse raw file, converted and removed.
pub fn sparse(dir: &Path, clusters: u64) -> Res<(PathBuf, PathBuf)> {
    let img = dir.join(format!("sparse-1t-{clusters}.qcow2"));
    let dense = dir.join(format!("sparse-1t-{clusters}-data.raw"));
    let dense_ok = fs::metadata(&dense).is_ok_and(|m| m.len() == clusters * CLUSTER);
    if dense_ok && usable_image(&img, TIB) {
        println!("reusing {}", img.display());
        return Ok((img, dense));
    }
    println!("making {} ({clusters} data clusters)", img.display());
    let raw_tmp = dir.join("sparse-1t.raw.tmp");
    let (raw, mut data) = (File::create(&raw_tmp)?, File::create(&dense)?);
    raw.set_len(TIB)?;
    let slice = TIB / clusters;
    let mut rng = Rng(clusters);
    let mut buf = vec![0u8; CLUSTER as usize];
    for i in 0..clusters {
        let at = i * slice + mix(i) % (slice / CLUSTER) * CLUSTER;
        rng.fill(&mut buf, Fill::Random);
        raw.write_all_at(&buf, at)?;
        data.write_all(&buf)?;
    }
    data.sync_all()?;
    drop(raw);
    let tmp = img.with_extension("qcow2.tmp");
    qemu_img(
        Command::new("qemu-img")
            .args([
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=65536",
            ])
            .arg(&raw_tmp)
            .arg(&tmp),
    )?;
    fs::remove_file(&raw_tmp)?;
    settle(&tmp)?;
    fs::rename(&tmp, &img)?;
    Ok((img, dense))
}

/// A 16 TiB image with nothing allocated.
pub fn empty(dir: &Path) -> Res<PathBuf> {
    let img = dir.join("empty-16t.qcow2");
    if !usable_image(&img, 16 * TIB) {
        qemu_img(
            Command::new("qemu-img")
                .args(["create", "-f", "qcow2", "-o", "cluster_size=65536"])
                .arg(&img)
                .arg("16T"),
        )?;
    }
    Ok(img)
}

/// An empty overlay over `base` (recorded by file name).
pub fn overlay(base: &Path) -> Res<PathBuf> {
    let size = crate::common::guest_size(base)?;
    let stem = base.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
    let img = base.with_file_name(format!("{stem}-overlay.qcow2"));
    if !usable_image(&img, size) {
        let name = base.file_name().ok_or("base without a file name")?;
        qemu_img(
            Command::new("qemu-img")
                .args(["create", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(name)
                .arg(&img),
        )?;
    }
    Ok(img)
}

/// `count` random offsets of `RANDOM_READ`-aligned reads in `[0, size)`; with `new_l2`, each
/// in another L2 table than the one before.
pub fn random_offsets(path: &Path, size: u64, count: usize, new_l2: bool) -> Res<PathBuf> {
    let mut rng = Rng(size ^ count as u64);
    let blocks = size / RANDOM_READ as u64;
    let mut offsets: Vec<u64> = Vec::with_capacity(count);
    while offsets.len() < count {
        let o = rng.next() % blocks * RANDOM_READ as u64;
        let same_l2 = offsets.last().is_some_and(|&p| p / L2_SPAN == o / L2_SPAN);
        if !(new_l2 && same_l2) {
            offsets.push(o);
        }
    }
    write_offsets(path, &offsets)?;
    Ok(path.to_path_buf())
}

/// The offsets `qemu-img bench -c count -S step` reads (from 0, wrapping at `size`), for the
/// crate to read the very same pattern.
pub fn stride_offsets(path: &Path, size: u64, count: usize, step: u64) -> Res<PathBuf> {
    let offsets: Vec<u64> = (0..count as u64)
        .map(|k| (k as u128 * step as u128 % size as u128) as u64)
        .collect();
    write_offsets(path, &offsets)?;
    Ok(path.to_path_buf())
}
