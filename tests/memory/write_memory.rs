//! The writer keeps its memory within the table cache's budget, not the disk: writes spread
//! over a 4 TiB disk (each into its own L2 table) with a 1 MiB cache write the tables back
//! as they go, on the calling thread (counted by the per-thread allocator).

use crate::alloc_count::peak_during;
use crate::common;

use std::process::Command;

use common::{Qemu, TempDir};
use qcow2::{Limits, OpenOptions, Qcow2};

#[test]
fn writes_across_a_large_disk_stay_within_the_table_budget() {
    let Some(qemu) = Qemu::find_or_skip("writes_across_a_large_disk_stay_within_the_table_budget")
    else {
        return;
    };
    let tmp = TempDir::new("write-memory");
    let dir = tmp.path();
    qemu.img(dir, &["create", "-q", "-f", "qcow2", "disk.qcow2", "4T"]);
    let mut limits = Limits::default();
    limits.l2_cache_bytes = 1 << 20;
    let options = OpenOptions::new().write(true).limits(limits).threads(1);
    let writer = Qcow2::open_path_with(dir.join("disk.qcow2"), &options)
        .unwrap()
        .into_writer()
        .unwrap();
    // 1024 writes of 4 KiB, 4 GiB apart: 1024 L2 tables (64 MiB of them) touched.
    let data = vec![0x5au8; 4096];
    let ((), peak) = peak_during(|| {
        for i in 0..1024u64 {
            writer.write_all_at(i * (4 << 30), &data).unwrap();
        }
        writer.flush().unwrap();
    });
    writer.close().unwrap();
    eprintln!(
        "1024 L2 tables touched with a 1 MiB cache: peak {} KiB",
        peak >> 10
    );
    assert!(peak < 8 << 20, "peak {peak} bytes");
    let check = Command::new(&qemu.img)
        .current_dir(dir)
        .args(["check", "disk.qcow2"])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let read = Command::new(&qemu.io)
        .current_dir(dir)
        .args([
            "-c",
            "read -P 0x5a 2T 4k",
            "-c",
            "read -P 0 2199023259648 4k",
            "disk.qcow2",
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&read.stdout);
    assert!(read.status.success() && !out.contains("failed"), "{out}");
}
