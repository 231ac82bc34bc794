//! temp
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let p = &a[1];
    let size: u64 = a[2].parse().unwrap();
    let step: u64 = a[3].parse().unwrap();
    let count: u64 = a[4].parse().unwrap();
    let flush: u64 = a[5].parse().unwrap();
    let w = qcow2::Qcow2::open_path_with(p, &qcow2::OpenOptions::new().write(true))
        .unwrap()
        .into_writer()
        .unwrap();
    let buf = vec![0xa5u8; size as usize];
    let t = std::time::Instant::now();
    let gs = w.guest_size();
    for i in 0..count {
        w.write_all_at((i * step) % gs, &buf).unwrap();
        if flush > 0 && (i + 1) % flush == 0 {
            w.flush().unwrap();
        }
    }
    w.close().unwrap();
    println!("{:.3}", t.elapsed().as_secs_f64());
}
