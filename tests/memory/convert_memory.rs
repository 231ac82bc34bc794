//! `convert_into_qcow2` keeps its memory bounded by the threads and cluster size, not the
//! disk: a sparse 1 TiB image converts on the calling thread (counted by the per-thread
//! allocator) with a small peak, in time proportional to its data.

use crate::alloc_count::peak_during;
use crate::common;

use std::process::Command;

use common::{Qemu, TempDir};
use qcow2::{convert_into_qcow2, ConvertOptions, OpenOptions, Qcow2};

#[test]
fn a_sparse_terabyte_converts_in_bounded_memory() {
    let Some(qemu) = Qemu::find_or_skip("a_sparse_terabyte_converts_in_bounded_memory") else {
        return;
    };
    let tmp = TempDir::new("convert-memory");
    let dir = tmp.path();
    qemu.img(dir, &["create", "-q", "-f", "qcow2", "src.qcow2", "1T"]);
    qemu.io(
        dir,
        "qcow2",
        "src.qcow2",
        &[
            "write -P 1 0 1M",
            "write -P 2 500G 3M",
            "write -P 3 1048575M 1M",
        ],
    );
    qemu.img(dir, &["create", "-q", "-f", "qcow2", "out.qcow2", "1T"]);
    let source = Qcow2::open_path(dir.join("src.qcow2")).unwrap();
    let reader = source.reader().unwrap();
    let options = ConvertOptions::new().threads(1);
    let (result, peak) = peak_during(|| {
        convert_into_qcow2(
            &reader,
            dir.join("out.qcow2"),
            &OpenOptions::new(),
            &options,
            |_, _| {},
        )
    });
    result.unwrap();
    eprintln!("1 TiB sparse: peak {} KiB", peak >> 10);
    assert!(peak < 16 << 20, "peak {peak} bytes");
    let check = Command::new(&qemu.img)
        .current_dir(dir)
        .args(["check", "out.qcow2"])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let compare = Command::new(&qemu.img)
        .current_dir(dir)
        .args(["compare", "src.qcow2", "out.qcow2"])
        .output()
        .unwrap();
    assert!(
        compare.status.success(),
        "{}",
        String::from_utf8_lossy(&compare.stdout)
    );
}
