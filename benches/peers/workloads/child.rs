//! The in-process contestants (the crate, imago, `pread`), each run in a child process of the
//! bench (`workloads --child KIND ARGS..`), so that each has its own peak RSS and CPU time.
//! A child prints one line, `sum=<checksum> secs=<seconds of the work alone>`.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use imago::{FormatAccess, FormatDriverBuilder, Mapping, PermissiveImplicitOpenGate};
use positioned_io::ReadAt;
use qcow2::{
    compare, convert_to_file, Chunk, CompareOptions, Comparison, ConvertOptions, ExtentKind,
    OpenOptions, ParallelReadOptions, Qcow2, RawDisk,
};

use crate::common::{mix, Res, MIB};

/// The first argument that makes the bench a child.
pub const FLAG: &str = "--child";

/// Size of the reads of the random-read workloads.
pub const RANDOM_READ: usize = 4096;

type Imago = FormatAccess<imago::file::File>;

/// Run the child workload named by `args` and print its line.
pub fn main(args: &[String]) -> Res<()> {
    let arg = |i: usize| -> Res<&str> {
        args.get(i)
            .map(String::as_str)
            .ok_or_else(|| format!("child: argument {i} missing in {args:?}").into())
    };
    let num = |i: usize| -> Res<u64> { Ok(arg(i)?.parse()?) };
    *WORK_START.lock().map_err(|e| e.to_string())? = Some(Instant::now());
    let sum = match arg(0)? {
        "seq-crate" => seq_crate(Path::new(arg(1)?), num(2)? as usize, num(3)? as usize, None)?,
        "seq-crate-pool" => seq_crate(
            Path::new(arg(1)?),
            num(2)? as usize,
            num(3)? as usize,
            Some(num(4)? as usize),
        )?,
        "seq-parallel" => seq_parallel(Path::new(arg(1)?), num(2)? as usize)?,
        "seq-imago" => seq_imago(Path::new(arg(1)?), num(2)? as usize)?,
        "seq-raw" => seq_raw(Path::new(arg(1)?), num(2)? as usize)?,
        "seq-raw-host" => seq_raw_host(Path::new(arg(1)?), num(2)? as usize)?,
        "seq-raw-split" => seq_raw_split(Path::new(arg(1)?), num(2)? as usize, num(3)? as usize)?,
        "map-crate" => map_crate(Path::new(arg(1)?), arg(2)? == "read")?,
        "map-imago" => map_imago(Path::new(arg(1)?), arg(2)? == "read")?,
        "rand-crate" => rand_crate(Path::new(arg(1)?), Path::new(arg(2)?), num(3)? as usize)?,
        "rand-imago" => rand_imago(Path::new(arg(1)?), Path::new(arg(2)?))?,
        "rand-raw-host" => rand_raw_host(Path::new(arg(1)?), Path::new(arg(2)?))?,
        "rand-raw" => rand_raw(
            Path::new(arg(1)?),
            Path::new(arg(2)?),
            arg(3).map_or(Ok(1), |n| n.parse())?,
        )?,
        "convert-crate" => convert_crate(Path::new(arg(1)?), Path::new(arg(2)?))?,
        "compare-crate" => compare_crate(Path::new(arg(1)?), Path::new(arg(2)?))?,
        // Nothing: the peak RSS of a child before any work, for reference.
        "noop" => 0,
        other => return Err(format!("child: unknown workload {other}").into()),
    };
    let start = WORK_START
        .lock()
        .map_err(|e| e.to_string())?
        .ok_or("child: no start time")?;
    println!("sum={sum} secs={}", start.elapsed().as_secs_f64());
    Ok(())
}

/// When the child's work started: set before it, and again by a child whose setup is not
/// part of what it measures ([`restart_clock`]).
static WORK_START: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);

/// Start the child's clock again, after setup that is not the work measured.
fn restart_clock() -> Res<()> {
    *WORK_START.lock().map_err(|e| e.to_string())? = Some(Instant::now());
    Ok(())
}

/// `qemu-img convert -O raw IMG OUT` done by the crate (`convert_to_file` with the default
/// options: one thread per core, up to 8): the output's length.
fn convert_crate(img: &Path, out: &Path) -> Res<u64> {
    let image = Qcow2::open_path(img)?;
    let reader = image.reader()?;
    let file = File::create(out)?;
    convert_to_file(&reader, &file, &ConvertOptions::new(), |_, _| {})?;
    Ok(file.metadata()?.len())
}

/// `qemu-img compare IMG RAW` done by the crate; the images must be identical.
fn compare_crate(img: &Path, raw: &Path) -> Res<u64> {
    let image = Qcow2::open_path(img)?;
    let reader = image.reader()?;
    let disk = RawDisk::open_path(raw)?;
    match compare(&reader, &disk, &CompareOptions::new())? {
        Comparison::Identical => Ok(0),
        other => Err(format!("{} and {}: {other:?}", img.display(), raw.display()).into()),
    }
}

/// A checksum of what a contestant read that does not depend on how the reads were cut or
/// ordered (the first word of every 4 KiB block, hashed and added), so contestants reading the
/// same bytes agree, and costs one load per 4 KiB.
fn sample(buf: &[u8]) -> u64 {
    buf.chunks(4096)
        .map(|b| {
            mix(b
                .get(..8)
                .map_or(0, |w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8]))))
        })
        .fold(0u64, u64::wrapping_add)
}

/// Read `[start, end)` with `read` in `bs`-byte pieces; the checksum of it.
fn read_range(
    start: u64,
    end: u64,
    bs: usize,
    read: impl FnMut(u64, &mut [u8]) -> Res<()>,
) -> Res<u64> {
    read_range_with(&mut vec![0u8; bs], start, end, read)
}

/// [`read_range`] in pieces the size of `buf`, which a walk reuses for every extent (a fresh
/// 1 MiB buffer per 64 KiB extent would cost more than the reads).
fn read_range_with(
    buf: &mut [u8],
    start: u64,
    end: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> Res<()>,
) -> Res<u64> {
    let bs = buf.len();
    let mut sum = 0u64;
    let mut pos = start;
    while pos < end {
        let n = (end - pos).min(bs as u64) as usize;
        read(pos, &mut buf[..n])?;
        sum = sum.wrapping_add(sample(&buf[..n]));
        pos += n as u64;
    }
    Ok(sum)
}

/// The whole guest of `img` (following its backing chain), in `bs`-byte reads, by `threads`
/// threads each owning a contiguous share of it and sharing one image.
/// `bs`-byte reads by `threads` threads, the image opened with `pool` threads of its own
/// (`OpenOptions::threads`; by default one per core).
fn seq_crate(img: &Path, bs: usize, threads: usize, pool: Option<usize>) -> Res<u64> {
    let options = match pool {
        Some(n) => OpenOptions::new().threads(n),
        None => OpenOptions::new(),
    };
    let image = Qcow2::open_path_with(img, &options)?;
    let reader = image.reader()?;
    let size = image.guest_size();
    let read = |pos: u64, buf: &mut [u8]| -> Res<()> { Ok(reader.read_exact_at(pos, buf)?) };
    read_in_shares(size, bs, threads, read)
}

/// `[0, size)` in `bs`-byte reads by `threads` threads, each owning a contiguous share; the
/// checksum of it all.
fn read_in_shares(
    size: u64,
    bs: usize,
    threads: usize,
    read: impl Fn(u64, &mut [u8]) -> Res<()> + Copy + Sync,
) -> Res<u64> {
    let share = size.div_ceil(threads as u64).next_multiple_of(MIB);
    sum_on_threads(threads, |t| {
        let t = t as u64;
        let (start, end) = ((t * share).min(size), ((t + 1) * share).min(size));
        read_range(start, end, bs, read).map_err(|e| e.to_string())
    })
}

/// The sum of `part(t)` for `t` in `0..threads`, each on a thread of its own (one thread: the
/// calling one, as the raw baselines read).
fn sum_on_threads(threads: usize, part: impl Fn(usize) -> Result<u64, String> + Sync) -> Res<u64> {
    if threads == 1 {
        return Ok(part(0)?);
    }
    let part = &part;
    std::thread::scope(|s| {
        let parts: Vec<_> = (0..threads).map(|t| s.spawn(move || part(t))).collect();
        parts.into_iter().try_fold(0u64, |sum, p| {
            let part = p.join().map_err(|_| "a reading thread panicked")??;
            Ok(sum.wrapping_add(part))
        })
    })
}

/// The whole guest of `img` through `Reader::read_parallel` on `threads` threads of the
/// image's pool (an image opened with that many threads), the checksum taken by the sink.
fn seq_parallel(img: &Path, threads: usize) -> Res<u64> {
    let image = Qcow2::open_path_with(img, &OpenOptions::new().threads(threads))?;
    let reader = image.reader()?;
    let mut sum = 0u64;
    let options = ParallelReadOptions::new().threads(threads);
    reader.read_parallel(.., &options, |chunk| {
        let part = match chunk {
            Chunk::Data { bytes, .. } => sample(bytes),
            // Zeros are not read: their 4 KiB blocks count as `sample` counts zero blocks.
            Chunk::Zeros { len, .. } => mix(0).wrapping_mul(len.div_ceil(4096)),
            _ => 0,
        };
        sum = sum.wrapping_add(part);
        Ok(())
    })?;
    Ok(sum)
}

/// imago's qcow2 driver, following the backing chain the image names.
fn imago_open(img: &Path) -> Res<Imago> {
    let image = imago::qcow2::Qcow2::<imago::file::File>::builder_path(img)
        .open(PermissiveImplicitOpenGate::default())?;
    Ok(FormatAccess::new(image))
}

fn seq_imago(img: &Path, bs: usize) -> Res<u64> {
    let image = imago_open(img)?;
    read_range(0, image.size(), bs, |pos, buf| Ok(image.read(buf, pos)?))
}

/// The raw baseline: `pread` of the whole file.
fn seq_raw(file: &Path, bs: usize) -> Res<u64> {
    let f = File::open(file)?;
    let size = f.metadata()?.len();
    read_range(0, size, bs, |pos, buf| {
        Ok(FileExt::read_exact_at(&f, buf, pos)?)
    })
}

/// What a bare `pread` loop takes to read an image's data where the crate reads it: the data
/// extents of `img` (mapped by the crate beforehand, untimed work being negligible), read from
/// the image file itself in `bs`-byte pieces. Against the raw baseline it shows what the file
/// costs; against the crate, what the crate adds.
fn seq_raw_host(img: &Path, bs: usize) -> Res<u64> {
    let runs = data_runs(img)?;
    restart_clock()?;
    let f = File::open(img)?;
    let mut buf = vec![0u8; bs];
    let mut sum = 0u64;
    for (start, length, host) in runs {
        let part = read_range_with(&mut buf, start, start + length, |p, buf| {
            Ok(FileExt::read_exact_at(&f, buf, host + (p - start))?)
        })?;
        sum = sum.wrapping_add(part);
    }
    Ok(sum)
}

/// (guest start, length, host offset) of every extent of a fully allocated image, in order.
fn data_runs(img: &Path) -> Res<Vec<(u64, u64, u64)>> {
    let image = Qcow2::open_path(img)?;
    let reader = image.reader()?;
    let mut runs = Vec::new();
    let mut pos = 0;
    while let Some(e) = reader.extent_at(pos)? {
        match e.kind {
            ExtentKind::Data { host_offset } => runs.push((e.start, e.length, host_offset)),
            _ => return Err(format!("{}: not fully allocated at {pos}", img.display()).into()),
        }
        pos = e.start + e.length;
    }
    Ok(runs)
}

/// The raw baseline on `threads` threads, each `pread`ing its own contiguous share: what the
/// machine gives two copying threads at the moment, the ideal of a parallel read.
fn seq_raw_split(file: &Path, bs: usize, threads: usize) -> Res<u64> {
    let f = File::open(file)?;
    let size = f.metadata()?.len();
    let read = |pos: u64, buf: &mut [u8]| -> Res<()> { Ok(FileExt::read_exact_at(&f, buf, pos)?) };
    read_in_shares(size, bs, threads, read)
}

/// Walk the allocation map of `img` (its own layer) and, with `read`, read what it stores
/// (data and compressed extents, in pieces of at most 1 MiB); without, count the extents.
fn map_crate(img: &Path, read: bool) -> Res<u64> {
    let image = Qcow2::open_path(img)?;
    let reader = image.reader()?;
    let mut buf = vec![0u8; MIB as usize];
    let mut sum = 0u64;
    let mut pos = 0;
    while let Some(e) = reader.extent_at(pos)? {
        let stored = matches!(
            e.kind,
            ExtentKind::Data { .. } | ExtentKind::Compressed { .. }
        );
        if read && stored {
            let part = read_range_with(&mut buf, e.start, e.start + e.length, |p, buf| {
                Ok(reader.read_exact_at(p, buf)?)
            })?;
            sum = sum.wrapping_add(part);
        } else if !read {
            sum += 1;
        }
        pos = e.start + e.length;
    }
    Ok(sum)
}

/// The same with imago's mapping walk (`get_mapping`, which resolves the chain).
fn map_imago(img: &Path, read: bool) -> Res<u64> {
    let image = imago_open(img)?;
    let size = image.size();
    let mut buf = vec![0u8; MIB as usize];
    let mut sum = 0u64;
    let mut pos = 0;
    while pos < size {
        let (mapping, len) = image.get_mapping(pos, size - pos)?;
        let stored = match mapping {
            Mapping::Raw { .. } | Mapping::Special { .. } => true,
            Mapping::Zero { .. } => false,
            Mapping::Eof { .. } => break,
            _ => return Err("imago: unknown mapping kind".into()),
        };
        if len == 0 {
            return Err(format!("imago: empty mapping at {pos:#x}").into());
        }
        if read && stored {
            let part = read_range_with(&mut buf, pos, pos + len, |p, buf| Ok(image.read(buf, p)?))?;
            sum = sum.wrapping_add(part);
        } else if !read {
            sum += 1;
        }
        pos += len;
    }
    Ok(sum)
}

/// The offsets of a random-read workload: little-endian `u64`s.
pub fn write_offsets(path: &Path, offsets: &[u64]) -> Res<()> {
    let bytes: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
    fs::write(path, bytes)?;
    Ok(())
}

fn read_offsets(path: &Path) -> Res<Vec<u64>> {
    let bytes = fs::read(path)?;
    Ok(bytes
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])))
        .collect())
}

/// `RANDOM_READ` bytes at each offset, by `threads` threads sharing one image (a reader each,
/// as the crate's docs advise), each taking every `threads`-th offset.
fn rand_crate(img: &Path, offsets: &Path, threads: usize) -> Res<u64> {
    let offsets = read_offsets(offsets)?;
    let image = Qcow2::open_path(img)?;
    let (image, offsets) = (&image, &offsets);
    let share = |t: usize| -> Result<u64, String> {
        let reader = image.reader().map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; RANDOM_READ];
        let mut sum = 0u64;
        for &o in offsets.iter().skip(t).step_by(threads) {
            reader
                .read_exact_at(o, &mut buf)
                .map_err(|e| e.to_string())?;
            sum = sum.wrapping_add(sample(&buf));
        }
        Ok(sum)
    };
    sum_on_threads(threads, share)
}

fn rand_imago(img: &Path, offsets: &Path) -> Res<u64> {
    let offsets = read_offsets(offsets)?;
    let image = imago_open(img)?;
    let mut buf = vec![0u8; RANDOM_READ];
    let mut sum = 0u64;
    for o in offsets {
        image.read(&mut buf[..], o)?;
        sum = sum.wrapping_add(sample(&buf));
    }
    Ok(sum)
}

/// The baseline: a `pread` loop on the raw file at the same offsets, by `threads` threads
/// (each every `threads`-th offset).
/// The `pread` loop over the image file itself, at the host offsets of the guest `offsets`
/// (mapped by the crate first, untimed): what the image file costs against the raw file,
/// apart from what the crate adds.
fn rand_raw_host(img: &Path, offsets: &Path) -> Res<u64> {
    let mut hosts = read_offsets(offsets)?;
    {
        let image = Qcow2::open_path(img)?;
        let reader = image.reader()?;
        for o in hosts.iter_mut() {
            let e = reader.extent_in(*o..*o + RANDOM_READ as u64)?;
            match e.map(|e| e.kind) {
                Some(ExtentKind::Data { host_offset }) => *o = host_offset,
                _ => return Err(format!("{}: no data at {o}", img.display()).into()),
            }
        }
    }
    restart_clock()?;
    let f = File::open(img)?;
    let mut buf = vec![0u8; RANDOM_READ];
    let mut sum = 0u64;
    for &o in &hosts {
        FileExt::read_exact_at(&f, &mut buf, o)?;
        sum = sum.wrapping_add(sample(&buf));
    }
    Ok(sum)
}

fn rand_raw(file: &Path, offsets: &Path, threads: usize) -> Res<u64> {
    let offsets = read_offsets(offsets)?;
    let f = File::open(file)?;
    sum_on_threads(threads, |t| {
        let mut buf = vec![0u8; RANDOM_READ];
        let mut sum = 0u64;
        for &o in offsets.iter().skip(t).step_by(threads) {
            FileExt::read_exact_at(&f, &mut buf, o).map_err(|e| e.to_string())?;
            sum = sum.wrapping_add(sample(&buf));
        }
        Ok(sum)
    })
}
