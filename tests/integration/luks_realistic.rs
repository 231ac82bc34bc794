//! A LUKS image as `qemu-img create -o encrypt.format=luks` makes it with its default settings
//! (`iter-time` 2 s: 8.6 million PBKDF2-SHA256 iterations for its key slot, 2.2 million for
//! the master-key digest, measured by qemu-img on the machine that made it). Every other
//! encrypted fixture was made with a short `iter-time`, so that the test suite stays quick;
//! this one shows what a real image costs to open. Ignored by default: in a debug build it
//! takes minutes unless the PBKDF2 code is optimized (see `OpenOptions::secret`).
//!
//! ```text
//! cargo test --release --test integration -- --ignored --nocapture luks_realistic::
//! ```
//!
//! Made with: `qemu-img create -f qcow2 --object secret,id=sec0,data=qemu
//! -o encrypt.format=luks,encrypt.key-secret=sec0 fixtures/encrypted/luks-default-iter.qcow2 1M`.

use std::time::Instant;

use positioned_io::ReadAt;
use qcow2::{OpenOptions, Qcow2};

#[test]
#[ignore = "seconds in release, minutes in an unoptimized build: PBKDF2 with qemu-img's defaults"]
fn luks_image_with_qemu_img_default_iterations_opens() {
    let path = crate::common::fixture("encrypted/luks-default-iter.qcow2");
    let start = Instant::now();
    let image = Qcow2::open_path_with(&path, &OpenOptions::new().secret("qemu")).unwrap();
    let opened = start.elapsed();
    let info = image.encryption().expect("encrypted");
    let iters: Vec<u32> = info.slots.iter().filter_map(|s| s.iters).collect();
    assert_eq!(iters, [8_600_524]);
    assert_eq!(info.master_key_iters, Some(2_160_194));
    let mut buf = vec![0xffu8; 1 << 20];
    image.reader().unwrap().read_exact_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "a new image reads as zeros");
    println!(
        "opened in {:.2} s ({} build)",
        opened.as_secs_f64(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    // A wrong secret is refused, after trying the one active slot.
    let wrong = Qcow2::open_path_with(&path, &OpenOptions::new().secret("wrong"));
    assert!(
        matches!(wrong, Err(qcow2::Error::WrongSecret { .. })),
        "{wrong:?}"
    );
}
