//! Write a file's bytes into the guest disk of a qcow2 image at a given offset (creating the
//! image first when it does not exist), the way `qemu-io -c 'write -s FILE OFFSET LEN'` does,
//! then flush and close: a crash at any point leaves the image as it was or with the file in
//! place, never corrupt.
//!
//! ```sh
//! cargo run --example put -- disk.qcow2 1048576 boot.img
//! ```

use std::io::Read;

use qcow2::{CreateOptions, OpenOptions, Qcow2};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [image, offset, file] = args.as_slice() else {
        eprintln!("usage: put IMAGE OFFSET FILE");
        std::process::exit(2);
    };
    let offset: u64 = offset.parse()?;
    let mut source = std::fs::File::open(file)?;
    let len = source.metadata()?.len();
    if !std::path::Path::new(image).exists() {
        // Big enough for the file, in whole MiB.
        let size = (offset + len).next_multiple_of(1 << 20);
        qcow2::create(image, &CreateOptions::new(size))?;
    }
    let disk = Qcow2::open_path_with(image, &OpenOptions::new().write(true))?.into_writer()?;
    // In pieces of 4 MiB: memory stays small whatever the file's size.
    let mut buf = vec![0u8; 4 << 20];
    let mut at = offset;
    loop {
        let n = source.read(&mut buf)?;
        if n == 0 {
            break;
        }
        disk.write_all_at(at, &buf[..n])?;
        at += n as u64;
    }
    disk.flush()?;
    let image = disk.close()?;
    println!(
        "wrote {} bytes at guest offset {offset} of a {}-byte disk",
        at - offset,
        image.guest_size()
    );
    Ok(())
}
