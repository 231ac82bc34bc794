//! Issue 24's `check -r all` row: `qemu-img check -r all` against the crate's `qcow2 check
//! -r all` on a copy (made before every pass, untimed) of an S MiB image of random data with
//! a few leaked clusters: the whole check, the repair and the check of the repaired image.
//!
//! Register it in `rows.rs`'s `ALL` as `("check-r-all", crate::jobs_check::repair_all)` (and
//! `mod jobs_check;` in `main.rs`).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::common::{make_qcow2, make_raw, Fill, Res, MIB};
use crate::contest::{Contestant, Output, Workload};
use crate::Config;

/// Leaked clusters: as many past the end of the file (refcount 1, nothing references them)
/// and as many data clusters with their refcount raised to 2.
const LEAKS: u64 = 4;

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A copy of `image` with leaked clusters, unless one is there already.
fn leaky_copy(image: &Path) -> Res<PathBuf> {
    let path = image.with_file_name(format!(
        "{}-leaks.qcow2",
        image
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("image")
    ));
    if path.is_file() {
        println!("reusing {}", path.display());
        return Ok(path);
    }
    let tmp = path.with_extension("qcow2.tmp");
    std::fs::copy(image, &tmp)?;
    leak(&tmp)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Give clusters nothing references a refcount (past the end of the file), and raise the
/// refcount of data clusters (16-bit refcounts, all in the first refcount block).
fn leak(path: &Path) -> Res<()> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let mut header = [0u8; 104];
    file.read_exact_at(&mut header, 0)?;
    let be32 = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().unwrap_or_default());
    let be64 = |at: usize| u64::from_be_bytes(header[at..at + 8].try_into().unwrap_or_default());
    let cluster_bits = be32(20);
    if be32(96) != 4 {
        return Err("the leak maker expects 16-bit refcounts".into());
    }
    let mut entry = [0u8; 8];
    file.read_exact_at(&mut entry, be64(48))?;
    let block = u64::from_be_bytes(entry);
    let end = file.metadata()?.len().div_ceil(1 << cluster_bits);
    if end + LEAKS > (8u64 << cluster_bits) / 16 {
        return Err("the image is larger than one refcount block covers".into());
    }
    file.set_len((end + LEAKS) << cluster_bits)?;
    let set =
        |cluster: u64, count: u16| file.write_all_at(&count.to_be_bytes(), block + 2 * cluster);
    for i in 0..LEAKS {
        set(end + i, 1)?;
        // Data clusters lie past the metadata at the start of the file.
        set(end / 2 + i * 7, 2)?;
    }
    file.sync_all()?;
    Ok(())
}

/// `check -r all` of an S MiB image of random data with 2 x [`LEAKS`] leaked clusters.
pub fn repair_all(cfg: &Config) -> Res<Workload> {
    let bin = crate::write::qcow2_bin(cfg)?;
    let raw = cfg.dir.join(format!("random-{}m.raw", cfg.size / MIB));
    make_raw(&raw, cfg.size, Fill::Random)?;
    let image = make_qcow2(&raw, "plain", &[])?;
    let template = leaky_copy(&image)?;
    let mut programs = vec![("qemu-img", "qemu-img".to_string())];
    if let Some(bin) = &bin {
        programs.push(("crate", s(bin)));
    }
    let mut contestants = Vec::new();
    let mut outputs = Vec::new();
    for (who, program) in programs {
        let k = contestants.len();
        let img = cfg.write_dir().join(format!(
            "qcow2-bench-write-{}-check-r-all-{k}.qcow2",
            std::process::id()
        ));
        let prepare = vec![vec!["cp".into(), s(&template), s(&img)]];
        let argv = [program.as_str(), "check", "-r", "all", &s(&img)];
        let mut c = Contestant::command(
            &format!("{who}: check -r all"),
            cfg.size as f64 / MIB as f64,
            &argv,
        )
        .prepare(prepare);
        c.required = who == "crate" && !cfg.smoke;
        contestants.push(c);
        outputs.push(Output {
            contestant: k,
            path: img,
            source: raw.clone(),
            source_format: "raw",
            size_versus: (k != 0).then_some(0),
            label: "repaired image".into(),
        });
    }
    let ratios = if contestants.len() == 2 {
        vec![(
            "time crate / qemu-img, check -r all (issue 24: <= 1)".to_string(),
            0,
            1,
        )]
    } else {
        Vec::new()
    };
    Ok(Workload {
        title: format!(
            "check -r all: a {} MiB image of random data with {} leaked clusters",
            cfg.size / MIB,
            2 * LEAKS
        ),
        unit: "MiB",
        contestants,
        baseline: 0,
        ratios,
        inputs: vec![template.clone()],
        notes: vec![format!(
            "both are commands timed from spawn to exit, each on its own copy of {} made \
             before every pass (untimed); rates are MiB of guest per second",
            template.display()
        )],
        outputs,
    })
}
