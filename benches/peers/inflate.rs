//! Whole-cluster decompression micro-benchmark: the compressed clusters of a `qemu-img
//! convert -c` image, decoded one after another by each candidate decoder, in the same run.
//!
//! ```text
//! cargo bench -p qcow2-bench-peers --bench inflate                         # 64 MiB of text, 7 rounds (seconds)
//! cargo bench -p qcow2-bench-peers --bench inflate -- --size-mib 16 --runs 5
//! ```
//!
//! Makes, once, under `target/bench-inflate/`, a raw file of random letters from a
//! 16-letter alphabet and two images of it with 64 KiB clusters, every cluster compressed:
//! zlib (`qemu-img convert -c`) and zstd (`-o compression_type=zstd`). The compressed
//! clusters are cut out of the images by walking their L1 and L2 tables (the descriptor's
//! whole length, sector padding included, as a reader gets it), then each decoder decodes
//! all of them into a cluster buffer, round after round (the order rotates every round).
//! Every decoder's output is checked once against the raw file. The report gives the median
//! ns per cluster by wall time (with the min-max over rounds) and by the thread's CPU
//! time, and MiB/s of output per CPU second.
//!
//! Run without `--bench` (as `cargo test -p qcow2-bench-peers --benches` does), it is a smoke test on a tiny image
//! in a temporary directory.

#[path = "../common/mod.rs"]
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use common::{make_qcow2, make_raw, Fill, Res, MIB};

const CLUSTER: usize = 64 << 10;

/// One decoder under test: fills `out` (one cluster) from `input`, or fails.
type Decode = Box<dyn FnMut(&[u8], &mut [u8]) -> Result<(), String>>;

struct Config {
    size_mib: u64,
    runs: usize,
    dir: PathBuf,
    smoke: bool,
}

fn usage() -> ! {
    eprintln!("usage: cargo bench -p qcow2-bench-peers --bench inflate [-- [--size-mib N] [--runs K] [--dir PATH]]");
    std::process::exit(2)
}

fn config() -> Config {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let mut c = Config {
        size_mib: 64,
        runs: 7,
        dir: common::target_dir("bench-inflate"),
        smoke,
    };
    if smoke {
        c.size_mib = 2;
        c.runs = 1;
        c.dir = std::env::temp_dir().join(format!("qcow2-bench-inflate-{}", std::process::id()));
    }
    let mut it = args.iter();
    let num = |v: Option<&String>| -> u64 {
        v.and_then(|s| s.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| usage())
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--size-mib" => c.size_mib = num(it.next()),
            "--runs" => c.runs = num(it.next()) as usize,
            "--dir" => c.dir = it.next().map(PathBuf::from).unwrap_or_else(|| usage()),
            "--help" | "-h" => usage(),
            _ => {} // cargo passes --bench
        }
    }
    c
}

fn main() -> Res<()> {
    let cfg = config();
    common::run_in("inflate", &cfg.dir, cfg.smoke, || run(&cfg))
}

fn run(cfg: &Config) -> Res<()> {
    if cfg.smoke {
        println!("smoke test (no --bench: a tiny image, one round; the numbers mean nothing)");
    }
    println!("load before: {}", common::loadavg());
    let raw = cfg.dir.join(format!("text-{}m.raw", cfg.size_mib));
    make_raw(&raw, cfg.size_mib * MIB, Fill::Compressible)?;
    let plain = fs::read(&raw)?;
    for (kind, opts) in [
        ("zlib", &["-c", "-o", "cluster_size=65536"][..]),
        (
            "zstd",
            &["-c", "-o", "cluster_size=65536,compression_type=zstd"][..],
        ),
    ] {
        let image = make_qcow2(&raw, &format!("{kind}-64k"), opts)?;
        let clusters = compressed_clusters(&image)?;
        let stored: usize = clusters.iter().map(|(_, c)| c.len()).sum();
        println!(
            "\n{kind}: {} compressed clusters of 64 KiB, {:.1} KiB stored on average",
            clusters.len(),
            stored as f64 / clusters.len().max(1) as f64 / 1024.0
        );
        let decoders = if kind == "zlib" {
            zlib_decoders()
        } else {
            zstd_decoders()
        };
        race(decoders, &clusters, &plain, cfg.runs)?;
    }
    println!("\nbuffers (no decoding):");
    race(buffer_makers(), &[(0, vec![])], &[], cfg.runs * 2000)?;
    println!("load after: {}", common::loadavg());
    Ok(())
}

/// (guest offset, compressed bytes) of every compressed cluster of a qcow2 image, found by
/// walking its tables (64 KiB clusters).
fn compressed_clusters(path: &Path) -> Res<Vec<(u64, Vec<u8>)>> {
    let file = fs::read(path)?;
    let be64 = |at: usize| -> Res<u64> {
        let b = file
            .get(at..at + 8)
            .ok_or("table past the end of the image")?;
        Ok(u64::from_be_bytes(b.try_into()?))
    };
    let bits = u32::from_be_bytes(file[20..24].try_into()?);
    if 1usize << bits != CLUSTER {
        return Err(format!("{}: cluster bits {bits}, want 16", path.display()).into());
    }
    let l1_size = u32::from_be_bytes(file[36..40].try_into()?) as usize;
    let l1_offset = be64(40)? as usize;
    let per_l2 = CLUSTER / 8;
    let x = 62 - (bits - 8); // spec: the descriptor's offset takes bits 0..x
    let mut out = Vec::new();
    for i in 0..l1_size {
        let l2 = (be64(l1_offset + i * 8)? & 0x00ff_ffff_ffff_fe00) as usize;
        if l2 == 0 {
            continue;
        }
        for j in 0..per_l2 {
            let entry = be64(l2 + j * 8)?;
            if entry & (1 << 62) == 0 {
                continue;
            }
            let host = (entry & ((1 << x) - 1)) as usize;
            let sectors = ((entry >> x) & ((1 << (bits - 8)) - 1)) as usize + 1;
            let len = sectors * 512 - (host & 511);
            let end = (host + len).min(file.len());
            out.push((
                ((i * per_l2 + j) * CLUSTER) as u64,
                file[host..end].to_vec(),
            ));
        }
    }
    Ok(out)
}

fn zlib_decoders() -> Vec<(&'static str, Decode)> {
    use flate2::{Decompress, FlushDecompress, Status};
    let mut flate2 = Decompress::new(false);
    let mut libdeflate = libdeflater::Decompressor::new();
    let mut miniz = Box::<miniz_oxide::inflate::core::DecompressorOxide>::default();
    let decoders: Vec<(&'static str, Decode)> = vec![
        (
            "flate2 (zlib-rs), reused state, Finish (before)",
            Box::new(move |input: &[u8], out: &mut [u8]| {
                flate2.reset(false);
                let status = flate2
                    .decompress(input, out, FlushDecompress::Finish)
                    .map_err(|e| e.to_string())?;
                match status {
                    Status::StreamEnd | Status::BufError | Status::Ok
                        if flate2.total_out() == out.len() as u64 =>
                    {
                        Ok(())
                    }
                    _ => Err("short".into()),
                }
            }),
        ),
        (
            "zlib-rs decompress_slice, windowBits -12",
            Box::new(|input: &[u8], out: &mut [u8]| {
                let config = zlib_rs::InflateConfig { window_bits: -12 };
                let len = out.len();
                let (done, rc) = zlib_rs::decompress_slice(out, input, config);
                match rc {
                    zlib_rs::ReturnCode::Ok if done.len() == len => Ok(()),
                    rc => Err(format!("{rc:?}")),
                }
            }),
        ),
        (
            "miniz_oxide (safe Rust), reused state",
            Box::new(move |input: &[u8], out: &mut [u8]| {
                use miniz_oxide::inflate::core::inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
                use miniz_oxide::inflate::TINFLStatus;
                miniz.init();
                // Raw deflate (no zlib header flag), all input given, output the whole cluster.
                let flags = TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
                let (status, _, n) =
                    miniz_oxide::inflate::core::decompress(&mut miniz, input, out, 0, flags);
                match status {
                    TINFLStatus::Done | TINFLStatus::HasMoreOutput if n == out.len() => Ok(()),
                    status => Err(format!("{status:?}: {n}")),
                }
            }),
        ),
        (
            "zune-inflate (safe Rust), output Vec copied",
            Box::new(|input: &[u8], out: &mut [u8]| {
                let options = zune_inflate::DeflateOptions::default()
                    .set_size_hint(out.len())
                    .set_limit(out.len());
                let mut decoder = zune_inflate::DeflateDecoder::new_with_options(input, options);
                let data = decoder.decode_deflate().map_err(|e| format!("{e:?}"))?;
                let got = data.get(..out.len()).ok_or("short")?;
                out.copy_from_slice(got);
                Ok(())
            }),
        ),
        (
            "fdeflate (safe Rust), zlib header prepended",
            Box::new(|input: &[u8], out: &mut [u8]| {
                let mut decoder = fdeflate::Decompressor::new();
                decoder.ignore_adler32();
                // A zlib header (deflate, 32 KiB window, no dictionary) before the raw stream.
                let (_, n) = decoder
                    .read(&[0x78, 0x01], out, 0, false)
                    .map_err(|e| format!("{e:?}"))?;
                let (_, n) = decoder
                    .read(input, out, n, true)
                    .map_err(|e| format!("{e:?}"))?;
                if n == out.len() {
                    Ok(())
                } else {
                    Err(format!("short: {n}"))
                }
            }),
        ),
        (
            "libdeflater one-shot, reused decompressor",
            Box::new(move |input: &[u8], out: &mut [u8]| {
                match libdeflate.deflate_decompress(input, out) {
                    Ok(n) if n == out.len() => Ok(()),
                    Ok(n) => Err(format!("short: {n}")),
                    Err(e) => Err(e.to_string()),
                }
            }),
        ),
    ];
    decoders.into_iter().chain(crate_decoder(false)).collect()
}

fn zstd_decoders() -> Vec<(&'static str, Decode)> {
    use zstd::zstd_safe::{self, DCtx, InBuffer, OutBuffer};
    let mut bulk = zstd::bulk::Decompressor::new().expect("zstd context");
    let mut dctx = DCtx::create();
    let mut stream = DCtx::create();
    let decoders: Vec<(&'static str, Decode)> = vec![
        (
            "zstd bulk, frame by frame, reused context (before)",
            Box::new(move |input: &[u8], out: &mut [u8]| {
                let (mut rest, mut filled) = (input, 0);
                while filled < out.len() {
                    let n = zstd_safe::find_frame_compressed_size(rest)
                        .map_err(zstd_safe::get_error_name)?;
                    let (frame, after) = rest.split_at(n);
                    filled += bulk
                        .decompress_to_buffer(frame, &mut out[filled..])
                        .map_err(|e| e.to_string())?;
                    rest = after;
                }
                Ok(())
            }),
        ),
        (
            "zstd_safe DCtx::decompress, frame by frame",
            Box::new(move |input: &[u8], out: &mut [u8]| {
                let (mut rest, mut filled) = (input, 0);
                while filled < out.len() {
                    let n = zstd_safe::find_frame_compressed_size(rest)
                        .map_err(zstd_safe::get_error_name)?;
                    let (frame, after) = rest.split_at(n);
                    filled += dctx
                        .decompress(&mut out[filled..], frame)
                        .map_err(zstd_safe::get_error_name)?;
                    rest = after;
                }
                Ok(())
            }),
        ),
        (
            "zstd_safe DCtx::decompress_stream (as QEMU)",
            Box::new(move |input: &[u8], out: &mut [u8]| {
                stream
                    .reset(zstd_safe::ResetDirective::SessionOnly)
                    .map_err(zstd_safe::get_error_name)?;
                let mut src = InBuffer::around(input);
                let mut dst = OutBuffer::around(out);
                while dst.pos() < dst.capacity() && src.pos < src.src.len() {
                    let before = (src.pos, dst.pos());
                    stream
                        .decompress_stream(&mut dst, &mut src)
                        .map_err(zstd_safe::get_error_name)?;
                    if before == (src.pos, dst.pos()) {
                        return Err("no progress".into());
                    }
                }
                if dst.pos() == dst.capacity() {
                    Ok(())
                } else {
                    Err("short".into())
                }
            }),
        ),
    ];
    decoders.into_iter().chain(crate_decoder(true)).collect()
}

/// The crate's own decoder (its internal `Decompressor`, as built here: with `libdeflate`),
/// reached through the `fuzzing` feature's entry points.
fn crate_decoder(zstd: bool) -> Option<(&'static str, Decode)> {
    let mut decoder = qcow2::fuzzing::ClusterDecoder::new();
    Some((
        "qcow2 crate, Decompressor (this build)",
        Box::new(move |input: &[u8], out: &mut [u8]| decoder.decode(zstd, input, out)),
    ))
}

/// Ways to make the `Arc<[u8]>` a cluster is decoded into and shared as (the "decoder"
/// ignores its input; the output check is skipped).
fn buffer_makers() -> Vec<(&'static str, Decode)> {
    let keep = |a: Arc<[u8]>| {
        std::hint::black_box(a);
    };
    let makers: Vec<(&'static str, Decode)> = vec![
        (
            "vec![0; 64 KiB] then Arc::from (before)",
            Box::new(move |_: &[u8], _: &mut [u8]| {
                let mut v = vec![0u8; CLUSTER];
                std::hint::black_box(&mut v[..]);
                keep(Arc::from(v));
                Ok(())
            }),
        ),
        (
            "Arc<[u8]> collected from zeros, then get_mut",
            Box::new(move |_: &[u8], _: &mut [u8]| {
                let mut a: Arc<[u8]> = std::iter::repeat_n(0u8, CLUSTER).collect();
                std::hint::black_box(Arc::get_mut(&mut a).ok_or("shared")?);
                keep(a);
                Ok(())
            }),
        ),
        (
            "Arc::from(&ZEROS[..64 KiB]), then get_mut",
            Box::new(move |_: &[u8], _: &mut [u8]| {
                static ZEROS: [u8; 2 << 20] = [0; 2 << 20];
                let mut a: Arc<[u8]> = Arc::from(&ZEROS[..CLUSTER]);
                std::hint::black_box(Arc::get_mut(&mut a).ok_or("shared")?);
                keep(a);
                Ok(())
            }),
        ),
    ];
    makers
}

/// CPU time of the calling thread, in seconds: less disturbed than wall time when other
/// processes share the cores.
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to write.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Time every decoder over all `clusters`, `runs` rounds, rotating the order; check each
/// decoder's output against `plain` first (unless `plain` is empty).
fn race(
    mut decoders: Vec<(&str, Decode)>,
    clusters: &[(u64, Vec<u8>)],
    plain: &[u8],
    runs: usize,
) -> Res<()> {
    let mut out = vec![0u8; CLUSTER];
    for (name, decode) in decoders.iter_mut() {
        if plain.is_empty() {
            continue;
        }
        for (guest, input) in clusters {
            out.fill(0xa5);
            decode(input, &mut out).map_err(|e| format!("{name}: cluster at {guest:#x}: {e}"))?;
            let want = &plain[*guest as usize..][..CLUSTER];
            if out != want {
                return Err(format!("{name}: wrong bytes in the cluster at {guest:#x}").into());
            }
        }
    }
    // (wall, on-CPU) seconds per cluster, per decoder and round.
    let mut times: Vec<Vec<(f64, f64)>> = vec![Vec::new(); decoders.len()];
    for round in 0..runs {
        for k in 0..decoders.len() {
            let i = (k + round) % decoders.len();
            let (name, decode) = &mut decoders[i];
            let (start, cpu_start) = (Instant::now(), thread_cpu_seconds());
            for (_, input) in clusters {
                decode(input, &mut out).map_err(|e| format!("{name}: {e}"))?;
            }
            let n = clusters.len() as f64;
            times[i].push((
                start.elapsed().as_secs_f64() / n,
                (thread_cpu_seconds() - cpu_start) / n,
            ));
        }
    }
    println!(
        "  {:<48} {:>13} {:>17} {:>12} {:>9}",
        "decoder", "ns/cluster", "(min-max)", "CPU ns/cl.", "MiB/s CPU"
    );
    for ((name, _), t) in decoders.iter().zip(&times) {
        let median = |pick: fn(&(f64, f64)) -> f64| {
            let mut v: Vec<f64> = t.iter().map(pick).collect();
            v.sort_by(f64::total_cmp);
            (v[v.len() / 2], v[0], v[v.len() - 1])
        };
        let (wall, lo, hi) = median(|t| t.0);
        let (cpu, _, _) = median(|t| t.1);
        println!(
            "  {name:<48} {:>13.0} {:>17} {:>12.0} {:>9.0}",
            wall * 1e9,
            format!("({:.0}-{:.0})", lo * 1e9, hi * 1e9),
            cpu * 1e9,
            CLUSTER as f64 / cpu / MIB as f64,
        );
    }
    Ok(())
}
