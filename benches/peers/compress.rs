//! Whole-cluster compression micro-benchmark: which deflate (or zstd) encoder writes QEMU's
//! compressed clusters fastest, how much larger its output is than QEMU's own, and whether
//! QEMU can read every stream.
//!
//! ```text
//! cargo bench -p qcow2-bench-peers --bench compress                      # 16 MiB of each corpus, 64 KiB clusters, 5 rounds
//! cargo bench -p qcow2-bench-peers --features zlib-ng --bench compress   # with zlib-ng (needs cmake)
//! cargo bench -p qcow2-bench-peers --bench compress -- --cluster-kib 4,2048 --only "zlib 6,rs-9 6,deflate 1"
//! ```
//!
//! QEMU (`qcow2_zlib_compress`) makes a new deflate stream for every cluster
//! (`deflateInit2(level 6, Z_DEFLATED, windowBits -12, memLevel 9, Z_DEFAULT_STRATEGY)`), calls
//! `deflate(Z_FINISH)` once into a buffer of cluster_size - 1 bytes, and stores the cluster
//! as it is when the stream does not fit. Its decoder inflates with windowBits -12: a stream
//! that refers further back than 4 KiB is valid deflate that QEMU refuses. zstd:
//! `ZSTD_compressStream2(ZSTD_e_end)` at level 3.
//!
//! The corpora are read into memory first (`--size-mib` each): `text` (the files under
//! /usr/include, or the crate's own sources where that is missing or small), `letters` (random
//! letters from a 16-letter alphabet: the data of the other benches and of issue 22's
//! 1 GiB benchmark) and `binary` (the executables in /usr/bin). Each is cut into clusters;
//! each encoder compresses every cluster into a buffer of cluster_size - 1 bytes, as QEMU
//! does. An untimed pass first checks every stream: inflated by the system zlib with
//! windowBits -12 (QEMU's decoder, the same library), or decoded by zstd, it must give the
//! cluster back. A deflate encoder that cannot limit its window (miniz_oxide, libdeflate)
//! shows how many of its clusters QEMU would refuse; any other failure ends the bench.
//! Then rounds (the order rotating): the median MiB/s of input per CPU second of the thread
//! (and by wall time), and the stored size (a cluster that does not shrink counts whole) over
//! the system zlib's at level 6.
//!
//! Run without `--bench` (as `cargo test -p qcow2-bench-peers --benches` does), it is a smoke
//! test: 64 KiB of each corpus (one cluster), one round.

#[path = "../common/mod.rs"]
mod common;

use std::ffi::c_void;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::{Fill, Res, Rng, MIB};

/// One encoder under test: compresses `input` (one cluster) into `out` (cluster_size - 1
/// bytes); `Some(len)` when it fits, `None` when the cluster is to be stored as it is.
type Encode = Box<dyn FnMut(&[u8], &mut [u8]) -> Option<usize>>;

/// How the untimed pass checks an encoder's streams.
#[derive(Clone, Copy, PartialEq)]
enum Format {
    /// Raw deflate that is meant to fit QEMU's 4 KiB window: a refusal ends the bench.
    DeflateWindow12,
    /// Raw deflate with a 32 KiB window: refusals by a windowBits -12 inflate are counted.
    Deflate32k,
    Zstd,
}

struct Encoder {
    name: String,
    format: Format,
    encode: Encode,
}

struct Config {
    size_mib: usize,
    runs: usize,
    cluster_kib: Vec<usize>,
    only: Vec<String>,
    corpora: Vec<String>,
    smoke: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench -p qcow2-bench-peers --bench compress [-- [--size-mib N] [--runs K] \
         [--cluster-kib 4,64,2048] [--only NAME[,NAME]] [--corpus text,letters,binary]]"
    );
    std::process::exit(2)
}

fn config() -> Config {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let mut c = Config {
        size_mib: 16,
        runs: 5,
        cluster_kib: vec![64],
        only: Vec::new(),
        corpora: ["text", "letters", "binary"].map(String::from).to_vec(),
        smoke,
    };
    if smoke {
        c.size_mib = 0; // 256 KiB, below
        c.runs = 1;
    }
    let list = |v: Option<&String>| -> Vec<String> {
        let v = v.unwrap_or_else(|| usage());
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
    let num = |v: Option<&String>| -> usize {
        v.and_then(|s| s.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| usage())
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--size-mib" => c.size_mib = num(it.next()),
            "--runs" => c.runs = num(it.next()),
            "--cluster-kib" => {
                c.cluster_kib = list(it.next())
                    .iter()
                    .map(|s| s.parse().unwrap_or_else(|_| usage()))
                    .collect()
            }
            "--only" => c.only = list(it.next()),
            "--corpus" => c.corpora = list(it.next()),
            "--help" | "-h" => usage(),
            _ => {} // cargo passes --bench
        }
    }
    c
}

fn main() -> Res<()> {
    let cfg = config();
    if cfg.smoke {
        println!(
            "smoke test (no --bench: 64 KiB of each corpus, one round; the numbers mean nothing)"
        );
    }
    println!("load before: {}", common::loadavg());
    println!(
        "system zlib {} (QEMU's, the reference); zlib-ng: {}",
        system_zlib::version(),
        if cfg!(feature = "zlib-ng") {
            "built in (--features zlib-ng)"
        } else {
            "not built (--features zlib-ng, needs cmake)"
        }
    );
    window_probe()?;
    qemu_reads_far_matches()?;
    let bytes = if cfg.smoke {
        64 << 10
    } else {
        cfg.size_mib * MIB as usize
    };
    for corpus in &cfg.corpora {
        let data = load_corpus(corpus, bytes)?;
        for &kib in &cfg.cluster_kib {
            let cluster = kib << 10;
            if !(512..=2 << 20).contains(&cluster) || !cluster.is_power_of_two() {
                return Err(format!("--cluster-kib {kib}: not a qcow2 cluster size").into());
            }
            let usable = data.len() / cluster * cluster;
            if usable == 0 {
                println!("\n{corpus}: smaller than one {kib} KiB cluster, skipped");
                continue;
            }
            println!(
                "\n{corpus}, {kib} KiB clusters: {} clusters, {:.1} MiB",
                usable / cluster,
                usable as f64 / MIB as f64
            );
            let encoders = encoders(cluster)
                .into_iter()
                .filter(|e| cfg.only.is_empty() || cfg.only.iter().any(|o| names(&e.name, o)))
                .collect();
            race(encoders, &data[..usable], cluster, cfg.runs)?;
        }
    }
    println!("\nload after: {}", common::loadavg());
    Ok(())
}

/// Show that the check can tell a 32 KiB window from a 4 KiB one: a 64 KiB cluster of one
/// random 8 KiB block repeated, compressed by libdeflate (matches 8 KiB back) and by the
/// system zlib with windowBits -12, then inflated as QEMU does and by a streaming decoder.
fn window_probe() -> Res<()> {
    let cluster = 64 << 10;
    let mut block = vec![0u8; 8 << 10];
    Rng(12).fill(&mut block, Fill::Random);
    let input: Vec<u8> = block.iter().copied().cycle().take(cluster).collect();
    let mut out = vec![0u8; 2 * cluster]; // a 4 KiB window cannot shrink it
    let mut back = vec![0u8; cluster];
    println!("window probe: 64 KiB of one random 8 KiB block repeated:");
    let mut deflate = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
    let mut zlib = system_zlib::Deflate::new(6, -12, 9);
    let streams = [
        (
            "libdeflate 6 (32 KiB window)",
            deflate.deflate_compress(&input, &mut out).ok(),
        ),
        ("system zlib 6, windowBits -12", None),
    ];
    for (name, len) in streams {
        let len = match len {
            Some(len) => len,
            None => zlib.compress(&input, &mut out).ok_or("zlib: no stream")?,
        };
        let stream = out[..len].to_vec();
        let mut verdict = |piece| match system_zlib::inflate(&stream, -12, piece, &mut back) {
            Some(n) if n == cluster && back == input => "reads it",
            _ => "REFUSES it",
        };
        println!(
            "  {name}: {len} bytes; QEMU's inflate (windowBits -12, one call) {}, a streaming \
             windowBits -12 inflate ({STREAM_PIECE} B per call) {}",
            verdict(0),
            verdict(STREAM_PIECE)
        );
    }
    Ok(())
}

/// End to end: does QEMU read a cluster whose deflate stream refers 8 KiB back? An image of
/// one 64 KiB cluster (an 8 KiB block of letters, repeated) made by `qemu-img convert -c`,
/// its compressed cluster overwritten in place by libdeflate's stream of the same bytes
/// (shorter: it finds the repeats QEMU's 4 KiB window cannot), then `qemu-img compare` with
/// the raw file and `qemu-img check`.
fn qemu_reads_far_matches() -> Res<()> {
    if !common::qemu_img_or_skip("compress") {
        return Ok(());
    }
    let cluster = 64 << 10;
    let dir = std::env::temp_dir().join(format!("qcow2-bench-compress-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let result = (|| -> Res<String> {
        let mut block = vec![0u8; 8 << 10];
        Rng(8).fill(&mut block, Fill::Compressible);
        let input: Vec<u8> = block.iter().copied().cycle().take(cluster).collect();
        let raw = dir.join("far.raw");
        fs::write(&raw, &input)?;
        let img = dir.join("far.qcow2");
        common::qemu_img(
            std::process::Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2", "-c"])
                .arg(&raw)
                .arg(&img),
        )?;
        let mut file = fs::read(&img)?;
        let (host, room) = first_compressed_cluster(&file)?;
        let mut out = vec![0u8; cluster - 1];
        let mut d = libdeflater::Compressor::new(libdeflater::CompressionLvl::default());
        let len = d.deflate_compress(&input, &mut out)?;
        let stream = &out[..len];
        if len > room {
            return Err(
                format!("libdeflate's stream ({len} B) longer than QEMU's ({room} B)").into(),
            );
        }
        let mut back = vec![0u8; cluster];
        if system_zlib::inflate(stream, -12, STREAM_PIECE, &mut back) == Some(cluster) {
            return Err(
                "libdeflate's stream has no match beyond 4 KiB: the probe proves nothing".into(),
            );
        }
        file.get_mut(host..host + len)
            .ok_or("cluster past the end")?
            .copy_from_slice(stream);
        fs::write(&img, &file)?;
        common::qemu_img(
            std::process::Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "qcow2"])
                .arg(&raw)
                .arg(&img),
        )?;
        common::qemu_img(
            std::process::Command::new("qemu-img")
                .args(["check", "-f", "qcow2"])
                .arg(&img),
        )?;
        Ok(format!(
            "qemu-img compare: identical, qemu-img check: clean (QEMU's stream {room} B, libdeflate's {len} B)"
        ))
    })();
    let _ = fs::remove_dir_all(&dir);
    println!(
        "  end to end: QEMU's cluster replaced by libdeflate's stream (8 KiB distances): {}",
        result?
    );
    Ok(())
}

/// (host offset, bytes up to the end of its last sector) of the compressed cluster at guest
/// offset 0 of a 64 KiB-cluster qcow2 image held in `file`.
fn first_compressed_cluster(file: &[u8]) -> Res<(usize, usize)> {
    let be64 = |at: usize| -> Res<u64> {
        let b = file.get(at..at + 8).ok_or("table past the end")?;
        Ok(u64::from_be_bytes(b.try_into()?))
    };
    let bits = u32::from_be_bytes(file.get(20..24).ok_or("short header")?.try_into()?);
    if bits != 16 {
        return Err(format!("cluster bits {bits}, want 16").into());
    }
    let l1 = be64(40)? as usize;
    let l2 = (be64(l1)? & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = be64(l2)?;
    if entry & (1 << 62) == 0 {
        return Err("qemu-img did not compress the cluster".into());
    }
    let x = 62 - (bits - 8);
    let host = (entry & ((1 << x) - 1)) as usize;
    let sectors = ((entry >> x) & ((1 << (bits - 8)) - 1)) as usize + 1;
    Ok((host, sectors * 512 - (host & 511)))
}

/// Whether `--only` text `part` picks the encoder `name`: found in it, and not followed by a
/// digit ("libdeflate 1" is not "libdeflate 12").
fn names(name: &str, part: &str) -> bool {
    name.match_indices(part).any(|(at, _)| {
        !name[at + part.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// `len` bytes of the corpus `name`, read into memory (files repeated when they are short).
fn load_corpus(name: &str, len: usize) -> Res<Vec<u8>> {
    let mut data = Vec::with_capacity(len);
    match name {
        "letters" => {
            data.resize(len.div_ceil(8) * 8, 0);
            Rng(22).fill(&mut data, Fill::Compressible);
        }
        "text" => {
            let mut files = files_under(Path::new("/usr/include"), &|p| {
                p.extension().is_some_and(|e| e == "h")
            });
            let total: u64 = files.iter().map(|(_, len)| len).sum();
            if total < len as u64 {
                let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../src");
                files = files_under(&src, &|p| p.extension().is_some_and(|e| e == "rs"));
            }
            concat(&files, len, &mut data)?;
        }
        "binary" => {
            let files = files_under(Path::new("/usr/bin"), &|_| true);
            concat(&files, len, &mut data)?;
        }
        _ => return Err(format!("unknown corpus {name} (text, letters, binary)").into()),
    }
    data.truncate(len);
    println!(
        "\ncorpus {name}: {:.1} MiB in memory",
        data.len() as f64 / MIB as f64
    );
    Ok(data)
}

/// Regular files under `dir` that `keep` accepts, with their sizes, in path order.
fn files_under(dir: &Path, keep: &dyn Fn(&Path) -> bool) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(kind) = e.file_type() else { continue };
            let path = e.path();
            if kind.is_dir() {
                todo.push(path);
            } else if kind.is_file() && keep(&path) {
                let len = e.metadata().map_or(0, |m| m.len());
                out.push((path, len));
            }
        }
    }
    out.sort();
    out
}

/// Append the files' bytes to `data`, round after round, until it holds `len` bytes.
fn concat(files: &[(PathBuf, u64)], len: usize, data: &mut Vec<u8>) -> Res<()> {
    while data.len() < len {
        let before = data.len();
        for (path, _) in files {
            if let Ok(bytes) = fs::read(path) {
                data.extend_from_slice(&bytes);
            }
            if data.len() >= len {
                return Ok(());
            }
        }
        if data.len() == before {
            return Err("corpus: no readable file".into());
        }
    }
    Ok(())
}

/// Every encoder, for clusters of `cluster` bytes.
fn encoders(cluster: usize) -> Vec<Encoder> {
    let mut v = Vec::new();
    let enc = |name: String, format: Format, encode: Encode| Encoder {
        name,
        format,
        encode,
    };
    for level in 1..=9 {
        let mut sys = system_zlib::Deflate::qemu(level);
        v.push(enc(
            format!("system zlib {level}, as QEMU (init per cluster)"),
            Format::DeflateWindow12,
            Box::new(move |i, o| sys.once(i, o)),
        ));
    }
    for level in [1, 6] {
        let mut sys = system_zlib::Deflate::new(level, -12, 9);
        v.push(enc(
            format!("system zlib {level}, reset per cluster"),
            Format::DeflateWindow12,
            Box::new(move |i, o| sys.compress(i, o)),
        ));
    }
    for mem_level in [8, 9] {
        for level in 1..=9 {
            let mut rs = zlib_rs::Deflate::new_with_config(zlib_rs::DeflateConfig {
                level,
                window_bits: -12,
                mem_level,
                ..zlib_rs::DeflateConfig::default()
            });
            v.push(enc(
                format!("zlib-rs memLevel {mem_level} level {level}"),
                Format::DeflateWindow12,
                Box::new(move |i, o| {
                    rs.reset();
                    match rs.compress(i, o, zlib_rs::DeflateFlush::Finish) {
                        Ok(zlib_rs::Status::StreamEnd) => Some(rs.total_out() as usize),
                        _ => None,
                    }
                }),
            ));
        }
    }
    {
        // The crate today (src/format/compressor.rs): flate2 on zlib-rs, level 6, window 12.
        use flate2::{Compress, Compression, FlushCompress, Status};
        let mut c = Compress::new_with_window_bits(Compression::new(6), false, 12);
        v.push(enc(
            "flate2 (zlib-rs) 6, the crate today".into(),
            Format::DeflateWindow12,
            Box::new(move |i, o| {
                c.reset();
                match c.compress(i, o, FlushCompress::Finish) {
                    Ok(Status::StreamEnd) => Some(c.total_out() as usize),
                    _ => None,
                }
            }),
        ));
    }
    #[cfg(feature = "zlib-ng")]
    for level in 1..=9 {
        let mut ng = zlib_ng::Deflate::new(level, -12, 9);
        v.push(enc(
            format!("zlib-ng {level}"),
            Format::DeflateWindow12,
            Box::new(move |i, o| ng.compress(i, o)),
        ));
    }
    for level in 1..=9 {
        use miniz_oxide::deflate::core::{
            compress, create_comp_flags_from_zip_params, CompressorOxide, TDEFLFlush, TDEFLStatus,
        };
        // windowBits -15: raw deflate (miniz's window is always 32 KiB).
        let flags = create_comp_flags_from_zip_params(level, -15, 0);
        let mut m = Box::new(CompressorOxide::new(flags));
        v.push(enc(
            format!("miniz_oxide {level}"),
            Format::Deflate32k,
            Box::new(move |i, o| {
                m.reset();
                match compress(&mut m, i, o, TDEFLFlush::Finish) {
                    (TDEFLStatus::Done, _, len) => Some(len),
                    _ => None,
                }
            }),
        ));
    }
    for level in 1..=12 {
        let Ok(lvl) = libdeflater::CompressionLvl::new(level) else {
            continue;
        };
        let mut d = libdeflater::Compressor::new(lvl);
        v.push(enc(
            format!("libdeflate {level}"),
            Format::Deflate32k,
            Box::new(move |i, o| d.deflate_compress(i, o).ok()),
        ));
    }
    for level in [1, 2, 3] {
        let Ok(mut z) = zstd::bulk::Compressor::new(level) else {
            continue;
        };
        v.push(enc(
            format!("zstd {level}"),
            Format::Zstd,
            Box::new(move |i, o| z.compress_to_buffer(i, o).ok()),
        ));
    }
    let _ = cluster;
    v
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to write.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Output per call of the streaming inflate: a decoder that keeps only its 4 KiB window.
const STREAM_PIECE: usize = 512;

/// What the untimed pass found for one encoder.
#[derive(Default)]
struct Checked {
    /// Bytes stored: the compressed clusters' lengths, and whole clusters that did not shrink.
    stored: usize,
    not_shrunk: usize,
    /// Streams QEMU's inflate refuses (windowBits -12, one call into the whole cluster).
    refused_qemu: usize,
    /// Streams a windowBits -12 inflate refuses when it gets its output in pieces.
    refused_streaming: usize,
}

/// Check every encoder once, then time them over all clusters of `data`, `runs` rounds.
fn race(mut encoders: Vec<Encoder>, data: &[u8], cluster: usize, runs: usize) -> Res<()> {
    let mut out = vec![0u8; cluster - 1];
    let mut back = vec![0u8; cluster];
    let mut checked = Vec::with_capacity(encoders.len());
    for e in encoders.iter_mut() {
        let mut c = Checked::default();
        for (k, input) in data.chunks_exact(cluster).enumerate() {
            let Some(len) = (e.encode)(input, &mut out) else {
                c.not_shrunk += 1;
                c.stored += cluster;
                continue;
            };
            c.stored += len;
            let stream = &out[..len];
            let wrong = |what: &str| format!("{}: cluster {k}: {what}", e.name);
            match e.format {
                Format::Zstd => {
                    let n = zstd::bulk::decompress_to_buffer(stream, &mut back)
                        .map_err(|err| wrong(&format!("zstd refuses it: {err}")))?;
                    if back[..n] != *input {
                        return Err(wrong("zstd gives other bytes").into());
                    }
                }
                Format::DeflateWindow12 | Format::Deflate32k => {
                    let reads = |window_bits, piece, back: &mut Vec<u8>| {
                        system_zlib::inflate(stream, window_bits, piece, back) == Some(cluster)
                            && back == input
                    };
                    if !reads(-15, 0, &mut back) {
                        return Err(wrong("zlib cannot inflate it").into());
                    }
                    let qemu = reads(-12, 0, &mut back);
                    let streaming = reads(-12, STREAM_PIECE, &mut back);
                    if e.format == Format::DeflateWindow12 && !(qemu && streaming) {
                        return Err(wrong("a windowBits -12 inflate refuses it").into());
                    }
                    c.refused_qemu += usize::from(!qemu);
                    c.refused_streaming += usize::from(!streaming);
                }
            }
        }
        checked.push(c);
    }
    let mut times: Vec<Vec<(f64, f64)>> = vec![Vec::new(); encoders.len()];
    for round in 0..runs {
        for k in 0..encoders.len() {
            let i = (k + round) % encoders.len();
            let e = &mut encoders[i];
            let (start, cpu_start) = (Instant::now(), thread_cpu_seconds());
            for input in data.chunks_exact(cluster) {
                std::hint::black_box((e.encode)(input, &mut out));
            }
            times[i].push((
                start.elapsed().as_secs_f64(),
                thread_cpu_seconds() - cpu_start,
            ));
        }
    }
    report(&encoders, &checked, &times, data.len(), cluster);
    Ok(())
}

fn report(
    encoders: &[Encoder],
    checked: &[Checked],
    times: &[Vec<(f64, f64)>],
    bytes: usize,
    cluster: usize,
) {
    let clusters = bytes / cluster;
    let reference = encoders
        .iter()
        .zip(checked)
        .find(|(e, _)| e.name.starts_with("system zlib 6, as QEMU"))
        .map(|(_, c)| c.stored);
    let mib = bytes as f64 / MIB as f64;
    let median = |t: &[(f64, f64)], pick: fn(&(f64, f64)) -> f64| {
        let mut v: Vec<f64> = t.iter().map(pick).collect();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let reference_speed = encoders
        .iter()
        .zip(times)
        .find(|(e, _)| e.name.starts_with("system zlib 6, as QEMU"))
        .map(|(_, t)| mib / median(t, |t| t.1).0);
    println!(
        "  {:<46} {:>9} {:>9} {:>15} {:>8} {:>8} {:>10} {:>12} {:>20}",
        "encoder",
        "MiB/s CPU",
        "× QEMU's",
        "MiB/s wall",
        "stored",
        "÷ QEMU's",
        "not shrunk",
        "QEMU refuses",
        "4K streaming refuses"
    );
    for ((e, c), t) in encoders.iter().zip(checked).zip(times) {
        let (cpu, _, _) = median(t, |t| t.1);
        let (wall, lo, hi) = median(t, |t| t.0);
        let speed = mib / cpu;
        println!(
            "  {:<46} {:>9.1} {:>9} {:>6.1} {:>8} {:>7.1}% {:>8} {:>10} {:>12} {:>20}",
            e.name,
            speed,
            reference_speed.map_or("-".into(), |r| format!("{:.2}", speed / r)),
            mib / wall,
            format!("({:.0}-{:.0})", mib / hi, mib / lo),
            100.0 * c.stored as f64 / bytes as f64,
            reference.map_or("-".into(), |r| format!("{:.4}", c.stored as f64 / r as f64)),
            c.not_shrunk,
            match e.format {
                Format::Zstd => "-".into(),
                _ => format!("{} of {clusters}", c.refused_qemu),
            },
            match e.format {
                Format::Zstd => "-".into(),
                _ => format!("{} of {clusters}", c.refused_streaming),
            },
        );
    }
}

/// What zlib's default allocator does (`zcalloc`: `malloc(items * size)`): libz-sys's
/// `z_stream` has no null allocator.
unsafe extern "C" fn zalloc(_: *mut c_void, items: u32, size: u32) -> *mut c_void {
    // SAFETY: plain malloc; zlib checks for null.
    unsafe { libc::malloc(items as usize * size as usize) }
}

unsafe extern "C" fn zfree(_: *mut c_void, ptr: *mut c_void) {
    // SAFETY: `ptr` came from `zalloc`.
    unsafe { libc::free(ptr) }
}

/// A deflate stream of a C zlib (`$sys`: the system zlib, or zlib-ng's native API).
macro_rules! c_zlib {
    ($module:ident, $sys:ident) => {
        mod $module {
            use super::{zalloc, zfree};
            use $sys as z;

            fn blank() -> Box<z::z_stream> {
                Box::new(z::z_stream {
                    next_in: std::ptr::null_mut(),
                    avail_in: 0,
                    total_in: 0,
                    next_out: std::ptr::null_mut(),
                    avail_out: 0,
                    total_out: 0,
                    msg: std::ptr::null_mut(),
                    state: std::ptr::null_mut(),
                    zalloc,
                    zfree,
                    opaque: std::ptr::null_mut(),
                    data_type: 0,
                    adler: 0,
                    reserved: 0,
                })
            }

            /// `deflateInit2` with `level`, `window_bits`, `mem_level`, the default strategy.
            fn init(s: &mut z::z_stream, level: i32, window_bits: i32, mem_level: i32) {
                // SAFETY: `s` is a blank stream with an allocator; the version and size
                // are the library's own.
                let rc = unsafe {
                    z::deflateInit2_(
                        s,
                        level,
                        z::Z_DEFLATED,
                        window_bits,
                        mem_level,
                        z::Z_DEFAULT_STRATEGY,
                        z::zlibVersion(),
                        std::mem::size_of::<z::z_stream>() as i32,
                    )
                };
                assert_eq!(rc, z::Z_OK, "deflateInit2");
            }

            /// One `deflate(Z_FINISH)` of `input` into `out`: the length when it all fits.
            fn finish(s: &mut z::z_stream, input: &[u8], out: &mut [u8]) -> Option<usize> {
                s.next_in = input.as_ptr().cast_mut();
                s.avail_in = input.len() as u32;
                s.next_out = out.as_mut_ptr();
                s.avail_out = out.len() as u32;
                // SAFETY: the stream is initialized; its buffers are `input` and `out`,
                // alive for the call.
                let rc = unsafe { z::deflate(s, z::Z_FINISH) };
                let len = out.len() - s.avail_out as usize;
                s.next_in = std::ptr::null_mut();
                s.next_out = std::ptr::null_mut();
                (rc == z::Z_STREAM_END).then_some(len)
            }

            /// A deflate stream made once and reset for each cluster.
            pub struct Deflate(Box<z::z_stream>, i32);

            impl Deflate {
                pub fn new(level: i32, window_bits: i32, mem_level: i32) -> Self {
                    let mut s = blank();
                    init(&mut s, level, window_bits, mem_level);
                    Deflate(s, level)
                }

                /// QEMU's parameters (windowBits -12, memLevel 9), used as QEMU does by
                /// [`Deflate::once`].
                #[allow(dead_code)]
                pub fn qemu(level: i32) -> Self {
                    Deflate(blank(), level)
                }

                pub fn compress(&mut self, input: &[u8], out: &mut [u8]) -> Option<usize> {
                    // SAFETY: the stream was initialized by `new`.
                    unsafe { z::deflateReset(&mut *self.0) };
                    finish(&mut self.0, input, out)
                }

                /// As `qcow2_zlib_compress`: `deflateInit2`, one `deflate`, `deflateEnd`.
                #[allow(dead_code)]
                pub fn once(&mut self, input: &[u8], out: &mut [u8]) -> Option<usize> {
                    init(&mut self.0, self.1, -12, 9);
                    let len = finish(&mut self.0, input, out);
                    // SAFETY: initialized just above.
                    unsafe { z::deflateEnd(&mut *self.0) };
                    len
                }
            }

            impl Drop for Deflate {
                fn drop(&mut self) {
                    if !self.0.state.is_null() {
                        // SAFETY: an initialized stream (`new`), ended once.
                        unsafe { z::deflateEnd(&mut *self.0) };
                    }
                }
            }

            /// The library's version string.
            #[allow(dead_code)]
            pub fn version() -> String {
                // SAFETY: zlibVersion returns a static C string.
                unsafe { std::ffi::CStr::from_ptr(z::zlibVersion()) }
                    .to_string_lossy()
                    .into_owned()
            }

            /// Inflate `stream` (raw deflate, `window_bits` negative) into `out`, as QEMU does
            /// (`piece` 0: one `inflate(Z_FINISH)` into the whole of `out`) or as a streaming
            /// decoder does (`piece` bytes of output per call): the length when the stream
            /// ends there, `None` when the library refuses it.
            #[allow(dead_code)]
            pub fn inflate(
                stream: &[u8],
                window_bits: i32,
                piece: usize,
                out: &mut [u8],
            ) -> Option<usize> {
                let mut s = blank();
                // SAFETY: a blank stream with an allocator; the library's version and size.
                let rc = unsafe {
                    z::inflateInit2_(
                        &mut *s,
                        window_bits,
                        z::zlibVersion(),
                        std::mem::size_of::<z::z_stream>() as i32,
                    )
                };
                assert_eq!(rc, z::Z_OK, "inflateInit2");
                s.next_in = stream.as_ptr().cast_mut();
                s.avail_in = stream.len() as u32;
                let mut done = 0;
                let rc = loop {
                    let len = match piece {
                        0 => out.len() - done,
                        _ => piece.min(out.len() - done),
                    };
                    s.next_out = out[done..].as_mut_ptr();
                    s.avail_out = len as u32;
                    let flush = if piece == 0 {
                        z::Z_FINISH
                    } else {
                        z::Z_NO_FLUSH
                    };
                    // SAFETY: initialized; the buffers outlive the call.
                    let rc = unsafe { z::inflate(&mut *s, flush) };
                    done += len - s.avail_out as usize;
                    if rc != z::Z_OK || piece == 0 || done == out.len() {
                        break rc;
                    }
                };
                // SAFETY: initialized above, ended once.
                unsafe { z::inflateEnd(&mut *s) };
                (rc == z::Z_STREAM_END).then_some(done)
            }
        }
    };
}

c_zlib!(system_zlib, libz_sys);
#[cfg(feature = "zlib-ng")]
c_zlib!(zlib_ng, libz_ng_sys);
