// Temporary measurement probe (not committed).
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;
use qcow2::{Chunk, OpenOptions, ParallelRead, Qcow2};

fn sample(b: &[u8]) -> u64 { b.chunks(4096).map(|c| c[0] as u64).sum() }

fn raw(path: &str, bs: usize) -> u64 {
    let f = File::open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let mut buf = vec![0u8; bs];
    let mut s = 0; let mut pos = 0;
    while pos < size { let n = (size - pos).min(bs as u64) as usize; f.read_exact_at(&mut buf[..n], pos).unwrap(); s += sample(&buf[..n]); pos += n as u64; }
    s
}
fn raw2(path: &str, bs: usize) -> u64 {
    let f = File::open(path).unwrap();
    let size = f.metadata().unwrap().len();
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..2u64).map(|t| { let f = &f; sc.spawn(move || {
            let mut buf = vec![0u8; bs]; let mut s = 0; let (mut pos, end) = (t * size / 2, (t + 1) * size / 2);
            while pos < end { let n = (end - pos).min(bs as u64) as usize; f.read_exact_at(&mut buf[..n], pos).unwrap(); s += sample(&buf[..n]); pos += n as u64; }
            s })}).collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    })
}
fn par(path: &str, threads: usize, chunk: u64) -> u64 {
    let image = Qcow2::open_path_with(path, &OpenOptions::new().threads(threads)).unwrap();
    let r = image.reader().unwrap();
    let mut s = 0;
    r.read_parallel(.., &ParallelRead::new().threads(threads).chunk_size(chunk), |c| { if let Chunk::Data { bytes, .. } = c { s += sample(bytes); } Ok(()) }).unwrap();
    s
}
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (rawp, img) = (&a[1], &a[2]);
    let rounds: usize = a.get(3).map_or(3, |x| x.parse().unwrap());
    let mut res: Vec<(String, Vec<f64>)> = Vec::new();
    for _ in 0..rounds {
        let mut cases: Vec<(String, Box<dyn Fn() -> u64>)> = vec![
            ("raw 1M".into(), Box::new(|| raw(rawp, 1 << 20))),
            ("raw2 1M".into(), Box::new(|| raw2(rawp, 1 << 20))),
        ];
        for (t, c) in [(2usize, 1u64 << 20), (2, 128 << 10), (2, 256 << 10), (2, 512 << 10)] {
            cases.push((format!("par t{t} c{}k", c >> 10), Box::new(move || par(img, t, c))));
        }
        for (name, f) in cases {
            let c0 = cpu(); let t = Instant::now(); let s = f(); let e = t.elapsed().as_secs_f64(); let cp = cpu() - c0;
            match res.iter_mut().find(|r| r.0 == format!("{name} cpu")) { Some(r) => r.1.push(cp), None => res.push((format!("{name} cpu"), vec![cp])) }
            std::hint::black_box(s);
            match res.iter_mut().find(|r| r.0 == name) { Some(r) => r.1.push(e), None => res.push((name, vec![e])) }
        }
    }
    for (n, mut v) in res { v.sort_by(|a, b| a.partial_cmp(b).unwrap()); println!("{n:16} median {:.0} ms  min {:.0}", v[v.len()/2]*1e3, v[0]*1e3); }
}

fn cpu() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(u.ru_utime) + tv(u.ru_stime)
}
