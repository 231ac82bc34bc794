//! Where a file has data and where holes, from `lseek(SEEK_DATA/SEEK_HOLE)`: the convert
//! tests compare the holes of the crate's raw output with qemu-img's.
#![allow(dead_code, unsafe_code)]

use std::os::unix::io::AsRawFd;
use std::path::Path;

/// The byte ranges of `path` that hold data (not holes), in order.
pub fn data_ranges(path: &Path) -> Vec<(u64, u64)> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let size = file.metadata().unwrap().len();
    let fd = file.as_raw_fd();
    let seek = |pos: u64, whence: i32| -> Option<u64> {
        // SAFETY: lseek on a file descriptor we own, no memory passed.
        let r = unsafe { libc::lseek(fd, pos as libc::off_t, whence) };
        (r >= 0).then_some(r as u64)
    };
    let mut ranges = Vec::new();
    let mut pos = 0;
    while pos < size {
        let Some(start) = seek(pos, libc::SEEK_DATA) else {
            break;
        }; // ENXIO: no more data
        let end = seek(start, libc::SEEK_HOLE).unwrap_or(size);
        ranges.push((start, end));
        pos = end;
    }
    ranges
}

/// Panics unless every data range of `ours` lies inside data of `theirs` (QEMU's output):
/// the crate's output is at least as sparse.
pub fn assert_not_less_sparse(label: &str, ours: &Path, theirs: &Path) {
    let a = data_ranges(ours);
    let b = data_ranges(theirs);
    for &(start, end) in &a {
        let covered = b.iter().any(|&(s, e)| s <= start && end <= e);
        assert!(
            covered,
            "{label}: our output has data at {start:#x}..{end:#x} where qemu-img's has a hole\n\
             ours:    {a:x?}\nqemu-img: {b:x?}"
        );
    }
}

/// Bytes of `path` allocated on disk.
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}
