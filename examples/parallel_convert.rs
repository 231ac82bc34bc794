//! Convert a qcow2 image (with its backing chain) to a sparse raw file with
//! `Reader::read_parallel`: the image's pool reads the chunks, this thread writes them in
//! guest order and leaves holes where the guest reads as zeros.
//!
//! ```sh
//! cargo run --release --example parallel_convert -- IMAGE OUT.raw [THREADS]
//! ```

use std::fs::File;
use std::time::Instant;

use qcow2::{Chunk, OpenOptions, ParallelReadOptions, PositionalSink, Qcow2};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(image_path), Some(out_path)) = (args.first(), args.get(1)) else {
        eprintln!("usage: parallel_convert IMAGE OUT.raw [THREADS]");
        std::process::exit(2);
    };
    let threads = match args.get(2) {
        Some(n) => n.parse()?,
        None => std::thread::available_parallelism().map_or(1, |n| n.get().min(8)),
    };

    let start = Instant::now();
    // The pool is the image's: its size is set when opening.
    let image = Qcow2::open_path_with(image_path, &OpenOptions::new().threads(threads))?;
    let reader = image.reader()?;
    let out = File::create(out_path)?;
    let (mut data, mut zeros) = (0u64, 0u64);
    reader.read_parallel(.., &ParallelReadOptions::new().threads(threads), |chunk| {
        match chunk {
            Chunk::Data { offset, bytes } => {
                data += bytes.len() as u64;
                out.write_all_at(offset, bytes)
            }
            // Zeros through the whole chain: a hole in the new file.
            Chunk::Zeros { len, .. } => {
                zeros += len;
                Ok(())
            }
            _ => Ok(()),
        }
    })?;
    PositionalSink::set_len(&out, image.guest_size())?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{out_path}: {} MiB of data written, {} MiB of zeros left as holes, {threads} threads, \
         {secs:.2} s ({:.0} MiB/s of guest)",
        data >> 20,
        zeros >> 20,
        (data + zeros) as f64 / secs / (1 << 20) as f64
    );
    Ok(())
}
