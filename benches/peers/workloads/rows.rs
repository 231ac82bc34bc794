//! The workloads of issue 9, one function each: its inputs, its contestants, its ratios
//! (and, at the end of [`ALL`], issue 22's, which write images: `write.rs`).

use std::path::Path;

use crate::child::RANDOM_READ;
use crate::common::{guest_size, Res, MIB};
use crate::contest::{Contestant, Workload};
use crate::inputs::{self, CLUSTER, L2_SPAN, TIB};
use crate::Config;

/// Makes a workload's inputs and names its contestants.
type MakeWorkload = fn(&Config) -> Res<Workload>;

/// Every workload, by the name `--only` matches.
pub const ALL: [(&str, MakeWorkload); 24] = [
    ("seq-64k", seq_plain),
    ("seq-zlib", seq_zlib),
    ("seq-zstd", seq_zstd),
    ("seq-chain", seq_chain),
    ("sparse-1t", sparse_map),
    ("empty-16t", empty_map),
    ("rand-64k", rand_plain),
    ("rand-1t", rand_sweep),
    ("overlay-zlib", overlay_zlib),
    ("convert", convert_job),
    ("compare", compare_job),
    ("write-c", crate::write::compressed),
    ("write-plain", crate::write::plain),
    ("write-recompress", crate::write::recompress),
    ("bench-seq-1m", crate::bench::seq_1m),
    ("bench-4k-new", crate::bench::new_4k),
    ("bench-4k-new-flush", crate::bench::new_4k_flush),
    ("bench-4k-over", crate::bench::over_4k),
    ("bench-read", crate::bench::read),
    ("commit-1g", crate::jobs::commit),
    ("rebase-1g", crate::jobs::rebase),
    ("snapshot-c", crate::jobs::snapshot_create),
    ("snapshot-d", crate::jobs::snapshot_delete),
    ("check-r-all", crate::jobs_check::repair_all),
];

const ONE_MIB: &str = "1048576";
const SIXTY_FOUR_KIB: &str = "65536";

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

fn qemu_convert(label: &str, img: &Path, size: u64) -> Contestant {
    let target = format!("driver=null-co,size={size}");
    Contestant::command(
        label,
        mib(size),
        &[
            "qemu-img",
            "convert",
            "-n",
            "-f",
            "qcow2",
            s(img),
            "--target-image-opts",
            &target,
        ],
    )
}

/// The contestants every sequential read has: raw `pread` (the baseline, index 0), the
/// crate, imago and `qemu-img convert` to the null driver, all with 1 MiB reads.
fn sequential(title: String, img: &Path, raw: &Path, size: u64) -> Workload {
    let work = mib(size);
    Workload {
        title,
        unit: "MiB",
        contestants: vec![
            Contestant::child(
                "raw: pread 1 MiB (baseline)",
                work,
                &["seq-raw", s(raw), ONE_MIB],
            )
            .class("guest"),
            Contestant::child(
                "crate: read_exact_at 1 MiB",
                work,
                &["seq-crate", s(img), ONE_MIB, "1"],
            )
            .class("guest"),
            Contestant::child(
                "imago 0.2 (sync): read 1 MiB",
                work,
                &["seq-imago", s(img), ONE_MIB],
            )
            .class("guest"),
            qemu_convert("qemu-img convert -> null-co", img, size),
        ],
        baseline: 0,
        ratios: vec![
            ("crate / qemu-img convert".into(), 1, 3),
            ("crate / imago".into(), 1, 2),
        ],
        inputs: vec![img.to_path_buf(), raw.to_path_buf()],
        notes: vec![],
        outputs: vec![],
    }
}

fn seq_plain(cfg: &Config) -> Res<Workload> {
    let (img, raw) = inputs::plain(&cfg.dir, cfg.size)?;
    let title = format!(
        "sequential, 64 KiB clusters, {} MiB fully allocated",
        cfg.size / MIB
    );
    let mut w = sequential(title, &img, &raw, cfg.size);
    let work = mib(cfg.size);
    let dd_if = format!("if={}", raw.display());
    w.contestants.extend([
        Contestant::command(
            "raw: dd bs=1M (a process)",
            work,
            &["dd", &dd_if, "of=/dev/null", "bs=1M", "status=none"],
        ),
        Contestant::child(
            "crate: read_exact_at 64 KiB",
            work,
            &["seq-crate", s(&img), SIXTY_FOUR_KIB, "1"],
        )
        .class("guest"),
        Contestant::child(
            "crate: read_parallel, 2 threads",
            work,
            &["seq-parallel", s(&img), "2"],
        )
        .class("guest"),
        Contestant::child(
            "raw: pread 1 MiB, 2 threads, one half each",
            work,
            &["seq-raw-split", s(&raw), ONE_MIB, "2"],
        )
        .class("guest"),
        Contestant::child(
            "raw: pread 1 MiB of the image's own data",
            work,
            &["seq-raw-host", s(&img), ONE_MIB],
        )
        .class("guest"),
    ]);
    w.ratios.push((
        "time of crate read_exact_at 1 MiB / time of pread of the image's own data".into(),
        8,
        1,
    ));
    w.ratios.push((
        "crate read_parallel 2 threads / read_exact_at 1 thread".into(),
        6,
        1,
    ));
    // Rates inverted: the time of read_parallel over the time of raw pread.
    w.ratios.push((
        "time of crate read_parallel 2 threads / time of raw pread (issue 9: <= 0.6)".into(),
        0,
        6,
    ));
    w.ratios.push((
        "time of crate read_parallel 2 threads / time of raw pread on 2 threads".into(),
        7,
        6,
    ));
    w.notes.push(
        "read_parallel: an image opened with 2 threads, Reader::read_parallel of the whole \
         guest on its pool (512 KiB chunks, the default), the checksum taken in the sink on the calling thread"
            .into(),
    );
    w.notes.push(
        "pread of the image file: the same bytes, from the same file at the same offsets, as \
         the crate reads them, by a bare pread loop: what the image file costs against the raw \
         file, and what the crate adds to it"
            .into(),
    );
    w.notes.push(
        "raw on 2 threads is the ideal of a parallel read: what the machine gives two threads \
         copying from the page cache at the moment (on a loaded machine, little)"
            .into(),
    );
    Ok(w)
}

fn seq_zlib(cfg: &Config) -> Res<Workload> {
    let (raw, zlib, _) = inputs::compressed(&cfg.dir, cfg.zlib_size)?;
    let title = format!(
        "sequential, {} MiB, every cluster zlib-compressed",
        cfg.zlib_size / MIB
    );
    Ok(sequential(title, &zlib, &raw, cfg.zlib_size))
}

fn seq_zstd(cfg: &Config) -> Res<Workload> {
    let (raw, _, zstd) = inputs::compressed(&cfg.dir, cfg.zlib_size)?;
    let title = format!(
        "sequential, {} MiB, every cluster zstd-compressed",
        cfg.zlib_size / MIB
    );
    Ok(sequential(title, &zstd, &raw, cfg.zlib_size))
}

fn seq_chain(cfg: &Config) -> Res<Workload> {
    let (base, raw) = inputs::plain(&cfg.dir, cfg.size)?;
    let (mid, top) = inputs::chain(&raw, &base)?;
    let title = format!(
        "sequential, {} MiB, 3-deep chain, the layer changes every cluster",
        cfg.size / MIB
    );
    let mut w = sequential(title, &top, &raw, cfg.size);
    // Its 1 MiB reads read the lower layers' runs on the image's pool; with one thread, all
    // on the calling thread.
    w.contestants.push(
        Contestant::child(
            "crate: read_exact_at 1 MiB, OpenOptions::threads(1)",
            mib(cfg.size),
            &["seq-crate-pool", s(&top), ONE_MIB, "1", "1"],
        )
        .class("guest"),
    );
    w.ratios
        .push(("crate default threads / crate threads(1)".into(), 1, 4));
    w.inputs.extend([base, mid]);
    Ok(w)
}

/// Map walk of a 1 TiB image holding scattered clusters, reading only the data.
fn sparse_map(cfg: &Config) -> Res<Workload> {
    let (img, dense) = inputs::sparse(&cfg.dir, cfg.clusters)?;
    let data = cfg.clusters * CLUSTER;
    let work = mib(data);
    let dd_if = format!("if={}", dense.display());
    let source = format!(
        "driver=qcow2,file.driver=file,file.filename={},file.aio={}",
        img.display(),
        cfg.aio
    );
    let target = format!("driver=null-co,size={TIB}");
    Ok(Workload {
        title: format!(
            "1 TiB virtual, {} scattered 64 KiB clusters: map walk + read only the data ({} MiB)",
            cfg.clusters,
            data / MIB
        ),
        unit: "MiB",
        contestants: vec![
            Contestant::child(
                "raw: pread 1 MiB of the data alone (baseline)",
                work,
                &["seq-raw", s(&dense), ONE_MIB],
            )
            .class("data"),
            Contestant::command(
                "raw: dd bs=1M of the data alone",
                work,
                &["dd", &dd_if, "of=/dev/null", "bs=1M", "status=none"],
            ),
            Contestant::child(
                "crate: extent_at walk + read the data",
                work,
                &["map-crate", s(&img), "read"],
            )
            .class("data"),
            Contestant::child(
                "imago: get_mapping walk + read the data",
                work,
                &["map-imago", s(&img), "read"],
            )
            .class("data"),
            Contestant::command(
                &format!("qemu-img convert --target-is-zero ({})", cfg.aio),
                work,
                &[
                    "qemu-img",
                    "convert",
                    "-n",
                    "--target-is-zero",
                    "--image-opts",
                    &source,
                    "--target-image-opts",
                    &target,
                ],
            ),
            Contestant::child(
                "crate: extent_at walk only",
                work,
                &["map-crate", s(&img), "walk"],
            ),
            Contestant::child(
                "imago: get_mapping walk only",
                work,
                &["map-imago", s(&img), "walk"],
            ),
            Contestant::command(
                "qemu-img map alone",
                work,
                &["qemu-img", "map", "-f", "qcow2", s(&img)],
            ),
        ],
        baseline: 0,
        ratios: vec![
            ("crate walk+read / qemu-img convert".into(), 2, 4),
            ("crate walk+read / imago walk+read".into(), 2, 3),
            ("crate walk / qemu-img map".into(), 5, 7),
            ("crate walk / imago walk".into(), 5, 6),
        ],
        inputs: vec![img, dense],
        notes: vec![
            "rates are MiB of data per second for every contestant, walks included, so the \
             columns compare times"
                .into(),
        ],
        outputs: vec![],
    })
}

/// Map walk of a 16 TiB image with nothing allocated.
fn empty_map(cfg: &Config) -> Res<Workload> {
    let img = inputs::empty(&cfg.dir)?;
    Ok(Workload {
        title: "a 16 TiB image with nothing allocated: map walk".into(),
        unit: "walks",
        contestants: vec![
            Contestant::command(
                "qemu-img map (baseline)",
                1.0,
                &["qemu-img", "map", "-f", "qcow2", s(&img)],
            ),
            Contestant::child(
                "crate: extent_at walk",
                1.0,
                &["map-crate", s(&img), "walk"],
            ),
            Contestant::child(
                "imago: get_mapping walk",
                1.0,
                &["map-imago", s(&img), "walk"],
            ),
        ],
        baseline: 0,
        ratios: vec![
            ("crate / qemu-img map".into(), 1, 0),
            ("crate / imago".into(), 1, 2),
        ],
        inputs: vec![img],
        notes: vec![
            "qemu-img map's time includes its process start-up (under 20 ms); the others' do not"
                .into(),
        ],
        outputs: vec![],
    })
}

/// `qemu-img bench` reading `count` 4 KiB requests, `depth` at a time, `step` bytes apart.
fn qemu_bench(cfg: &Config, img: &Path, count: usize, depth: u32, step: u64) -> Contestant {
    let (c, d, st) = (count.to_string(), depth.to_string(), step.to_string());
    let label = format!("qemu-img bench -i {} -d {depth} (its stride)", cfg.aio);
    let bs = RANDOM_READ.to_string();
    Contestant::qemu_bench(
        &label,
        count as f64,
        &[
            "qemu-img",
            "bench",
            "-f",
            "qcow2",
            "-c",
            &c,
            "-d",
            &d,
            "-s",
            &bs,
            "-S",
            &st,
            "-i",
            &cfg.aio,
            s(img),
        ],
    )
}

fn stride_note(step: u64) -> String {
    format!(
        "qemu-img bench reads offsets k*{step} mod size (-S {step}), not the PRNG list; \
         \"crate, qemu's stride\" reads that very list one at a time, so crate vs qemu-img is \
         like for like there except for qemu's queue depth"
    )
}

/// Random 4 KiB reads on the fully allocated 64 KiB-cluster image.
fn rand_plain(cfg: &Config) -> Res<Workload> {
    let (img, raw) = inputs::plain(&cfg.dir, cfg.size)?;
    let n = cfg.reads;
    let offs = inputs::random_offsets(
        &cfg.dir.join(format!("rand-{}m-{n}.off", cfg.size / MIB)),
        cfg.size,
        n,
        false,
    )?;
    // An odd number of 4 KiB blocks: a full-period stride through every block of the disk.
    let step = 40_503 * RANDOM_READ as u64;
    let stride = inputs::stride_offsets(
        &cfg.dir.join(format!("stride-{}m-{n}.off", cfg.size / MIB)),
        cfg.size,
        n,
        step,
    )?;
    let w = n as f64;
    Ok(Workload {
        title: format!(
            "random 4 KiB reads on the {} MiB 64 KiB-cluster image ({n} reads)",
            cfg.size / MIB
        ),
        unit: "reads",
        contestants: vec![
            Contestant::child(
                "raw: pread loop (baseline)",
                w,
                &["rand-raw", s(&raw), s(&offs)],
            )
            .class("random"),
            Contestant::child(
                "crate: 1 thread",
                w,
                &["rand-crate", s(&img), s(&offs), "1"],
            )
            .class("random"),
            Contestant::child(
                "crate: 2 threads, a reader each",
                w,
                &["rand-crate", s(&img), s(&offs), "2"],
            )
            .class("random"),
            Contestant::child("imago: 1 thread", w, &["rand-imago", s(&img), s(&offs)])
                .class("random"),
            Contestant::child(
                "crate: 1 thread, qemu's stride",
                w,
                &["rand-crate", s(&img), s(&stride), "1"],
            ),
            qemu_bench(cfg, &img, n, 64, step),
            Contestant::child(
                "raw: pread loop, 2 threads",
                w,
                &["rand-raw", s(&raw), s(&offs), "2"],
            )
            .class("random"),
            Contestant::child(
                "raw: pread loop over the image's own data",
                w,
                &["rand-raw-host", s(&img), s(&offs)],
            )
            .class("random"),
        ],
        baseline: 0,
        ratios: vec![
            ("crate IOPS 2 threads / 1 thread".into(), 2, 1),
            ("raw pread IOPS 2 threads / 1 thread".into(), 6, 0),
            ("crate / pread of the image's own data".into(), 1, 7),
            ("crate / imago".into(), 1, 3),
            ("crate (qemu's stride) / qemu-img bench -d 64".into(), 4, 5),
        ],
        inputs: vec![img, raw],
        notes: vec![stride_note(step)],
        outputs: vec![],
    })
}

/// Random 4 KiB reads sweeping the 1 TiB image, each in another L2 table than the last.
fn rand_sweep(cfg: &Config) -> Res<Workload> {
    let (img, _) = inputs::sparse(&cfg.dir, cfg.clusters)?;
    let n = cfg.reads;
    let size = guest_size(&img)?;
    let offs = inputs::random_offsets(&cfg.dir.join(format!("sweep-1t-{n}.off")), size, n, true)?;
    // Just over one L2 table's span: every read in another table, drifting through them.
    let step = L2_SPAN + 17 * RANDOM_READ as u64;
    let stride = inputs::stride_offsets(
        &cfg.dir.join(format!("sweep-stride-1t-{n}.off")),
        size,
        n,
        step,
    )?;
    let w = n as f64;
    Ok(Workload {
        title: format!(
            "random 4 KiB reads sweeping the 1 TiB image, each in another L2 table ({n} reads)"
        ),
        unit: "reads",
        contestants: vec![
            qemu_bench(cfg, &img, n, 1, step),
            Contestant::child(
                "crate: 1 thread, qemu's stride",
                w,
                &["rand-crate", s(&img), s(&stride), "1"],
            ),
            Contestant::child(
                "crate: 1 thread, PRNG offsets",
                w,
                &["rand-crate", s(&img), s(&offs), "1"],
            )
            .class("sweep"),
            Contestant::child(
                "imago: 1 thread, PRNG offsets",
                w,
                &["rand-imago", s(&img), s(&offs)],
            )
            .class("sweep"),
        ],
        baseline: 0,
        ratios: vec![
            ("crate (qemu's stride) / qemu-img bench -d 1".into(), 1, 0),
            ("crate / imago (PRNG offsets)".into(), 2, 3),
        ],
        inputs: vec![img],
        notes: vec![stride_note(step), l2_note(cfg.clusters)],
        outputs: vec![],
    })
}

/// How many L2 tables the sparse image has, and so what a sweep measures.
fn l2_note(clusters: u64) -> String {
    let all = TIB / L2_SPAN;
    let tables = if TIB / clusters >= L2_SPAN {
        clusters
    } else {
        all
    };
    format!(
        "{tables} of the {all} L2 tables exist (--clusters {clusters}; 2048 or more fill them \
         all); a read elsewhere stops at an empty L1 entry, and nearly every read lands on an \
         unallocated cluster: this measures the table lookups"
    )
}

/// A zlib-compressed base under an empty overlay, read in 64 KiB pieces, against the base
/// read alone.
fn overlay_zlib(cfg: &Config) -> Res<Workload> {
    let (_, base, _) = inputs::compressed(&cfg.dir, cfg.zlib_size)?;
    let top = inputs::overlay(&base)?;
    let w = mib(cfg.zlib_size);
    let k = SIXTY_FOUR_KIB;
    Ok(Workload {
        title: format!(
            "a {} MiB zlib-compressed base under an empty overlay, 64 KiB reads, vs the base alone",
            cfg.zlib_size / MIB
        ),
        unit: "MiB",
        contestants: vec![
            Contestant::child(
                "crate: base alone (baseline)",
                w,
                &["seq-crate", s(&base), k, "1"],
            )
            .class("z"),
            Contestant::child(
                "crate: through the overlay",
                w,
                &["seq-crate", s(&top), k, "1"],
            )
            .class("z"),
            Contestant::child("imago: base alone", w, &["seq-imago", s(&base), k]).class("z"),
            Contestant::child("imago: through the overlay", w, &["seq-imago", s(&top), k])
                .class("z"),
            qemu_convert("qemu-img convert: base alone", &base, cfg.zlib_size),
            qemu_convert("qemu-img convert: through the overlay", &top, cfg.zlib_size),
        ],
        baseline: 0,
        ratios: vec![
            ("crate overlay / base".into(), 1, 0),
            ("imago overlay / base".into(), 3, 2),
            ("qemu-img overlay / base".into(), 5, 4),
        ],
        inputs: vec![base, top],
        notes: vec!["qemu-img convert reads in its own request sizes, not 64 KiB pieces".into()],
        outputs: vec![],
    })
}

/// Where the `convert` row writes its output: `/dev/shm` (memory, so that the disk's
/// write-back does not time the row) when there is one, else the inputs' directory. The
/// bench removes it when done ([`remove_convert_output`]).
pub fn convert_output(cfg: &Config) -> std::path::PathBuf {
    scratch_dir(cfg).join(format!("qcow2-bench-convert-{}.raw", std::process::id()))
}

/// Where the rows that write put their outputs: `/dev/shm` when there is one, else the
/// inputs' directory.
pub fn scratch_dir(cfg: &Config) -> &Path {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        cfg.dir.as_path()
    }
}

pub fn remove_convert_output(cfg: &Config) {
    let _ = std::fs::remove_file(convert_output(cfg));
}

/// `qemu-img convert -O raw` of the zstd image and of the fully allocated one, against the
/// crate's `convert_to_file` with its default options (one thread per core; each creates
/// the output file anew on every pass).
fn convert_job(cfg: &Config) -> Res<Workload> {
    let (_, _, zstd) = inputs::compressed(&cfg.dir, cfg.zlib_size)?;
    let (img, _) = inputs::plain(&cfg.dir, cfg.size)?;
    let out = convert_output(cfg);
    let qemu = |label: &str, img: &Path, size: u64| {
        let args = [
            "qemu-img",
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            s(img),
            s(&out),
        ];
        Contestant::command(label, mib(size), &args)
    };
    let crate_ = |label: &str, img: &Path, size: u64| {
        Contestant::child(label, mib(size), &["convert-crate", s(img), s(&out)])
    };
    Ok(Workload {
        title: format!(
            "convert to a raw file ({}): the {} MiB zstd image, the {} MiB fully allocated one",
            out.parent().map_or("", s),
            cfg.zlib_size / MIB,
            cfg.size / MIB
        ),
        unit: "MiB",
        contestants: vec![
            qemu(
                "qemu-img convert -O raw, zstd (baseline)",
                &zstd,
                cfg.zlib_size,
            ),
            crate_(
                "crate: convert_to_file (threads = cores), zstd",
                &zstd,
                cfg.zlib_size,
            ),
            qemu("qemu-img convert -O raw, 64 KiB clusters", &img, cfg.size),
            crate_(
                "crate: convert_to_file (threads = cores), 64 KiB",
                &img,
                cfg.size,
            ),
        ],
        baseline: 0,
        ratios: vec![
            ("crate / qemu-img, zstd".into(), 1, 0),
            ("crate / qemu-img, 64 KiB clusters".into(), 3, 2),
        ],
        inputs: vec![zstd, img],
        notes: vec![
            "both write the whole output file on every pass, start-up included for qemu-img".into(),
        ],
        outputs: vec![],
    })
}

/// `qemu-img compare` of the zstd image and of the fully allocated one with their raw files
/// (identical), against the crate's `compare`.
fn compare_job(cfg: &Config) -> Res<Workload> {
    let (text, _, zstd) = inputs::compressed(&cfg.dir, cfg.zlib_size)?;
    let (img, raw) = inputs::plain(&cfg.dir, cfg.size)?;
    let qemu = |label: &str, img: &Path, raw: &Path, size: u64| {
        let args = [
            "qemu-img",
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            s(img),
            s(raw),
        ];
        Contestant::command(label, mib(size), &args)
    };
    let crate_ = |label: &str, img: &Path, raw: &Path, size: u64| {
        Contestant::child(label, mib(size), &["compare-crate", s(img), s(raw)])
    };
    Ok(Workload {
        title: format!(
            "compare with the raw file: the {} MiB zstd image, the {} MiB fully allocated one",
            cfg.zlib_size / MIB,
            cfg.size / MIB
        ),
        unit: "MiB",
        contestants: vec![
            qemu(
                "qemu-img compare, zstd (baseline)",
                &zstd,
                &text,
                cfg.zlib_size,
            ),
            crate_("crate: compare, zstd", &zstd, &text, cfg.zlib_size),
            qemu("qemu-img compare, 64 KiB clusters", &img, &raw, cfg.size),
            crate_("crate: compare, 64 KiB clusters", &img, &raw, cfg.size),
        ],
        baseline: 0,
        ratios: vec![
            ("crate / qemu-img, zstd".into(), 1, 0),
            ("crate / qemu-img, 64 KiB clusters".into(), 3, 2),
        ],
        inputs: vec![zstd, text, img, raw],
        notes: vec!["qemu-img's times include its start-up".into()],
        outputs: vec![],
    })
}
