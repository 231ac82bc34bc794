//! Crash safety across two files: an image with an external data file, written through a
//! [`Writer`] whose image and data file are storages logging into one log. A power cut
//! before any event keeps, of each file, everything up to that file's last sync and a
//! subset of its writes after it (all, none, every other); a killed process keeps all. The
//! oracle: `qemu-img check` clean, writes before the last completed flush read back, every
//! other sector holds its old content or something written there.

use crate::common;

use std::sync::{Arc, Mutex};

use common::{Env, Rng};
use qcow2::positioned_io::ReadAt;
use qcow2::{OpenOptions, PositionalSink, Qcow2, Storage};

const SECTOR: usize = 512;
const GUEST: u64 = 4 << 20;

#[derive(Debug, Clone)]
enum Event {
    Write {
        file: usize,
        at: u64,
        data: Vec<u8>,
    },
    SetLen {
        file: usize,
        len: u64,
    },
    Sync {
        file: usize,
    },
    /// A flush returned: everything written before it must read back.
    Flushed,
}

/// One file of the pair, logging into the shared log.
#[derive(Clone)]
struct Logged {
    file: usize,
    data: Arc<Mutex<Vec<u8>>>,
    log: Arc<Mutex<Vec<Event>>>,
}

impl ReadAt for Logged {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let data = self.data.lock().unwrap();
        let start = (pos as usize).min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }
}

impl PositionalSink for Logged {
    fn write_all_at(&self, pos: u64, buf: &[u8]) -> std::io::Result<()> {
        apply_write(&mut self.data.lock().unwrap(), pos, buf);
        self.log.lock().unwrap().push(Event::Write {
            file: self.file,
            at: pos,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.data.lock().unwrap().resize(len as usize, 0);
        self.log.lock().unwrap().push(Event::SetLen {
            file: self.file,
            len,
        });
        Ok(())
    }
}

impl Storage for Logged {
    fn length(&self) -> std::io::Result<u64> {
        Ok(self.data.lock().unwrap().len() as u64)
    }

    fn sync(&self) -> std::io::Result<()> {
        self.log
            .lock()
            .unwrap()
            .push(Event::Sync { file: self.file });
        Ok(())
    }
}

fn apply_write(data: &mut Vec<u8>, at: u64, bytes: &[u8]) {
    let end = at as usize + bytes.len();
    if data.len() < end {
        data.resize(end, 0);
    }
    data[at as usize..end].copy_from_slice(bytes);
}

/// Which pending writes (those after their file's last sync) a cut keeps.
#[derive(Debug, Clone, Copy)]
enum Keep {
    All,
    None,
    EveryOther,
}

/// The two files as a cut before event `cut` leaves them.
fn replay(initial: &[Vec<u8>; 2], log: &[Event], cut: usize, keep: Keep) -> [Vec<u8>; 2] {
    let mut last_sync = [None; 2];
    for (i, e) in log[..cut].iter().enumerate() {
        if let Event::Sync { file } = e {
            last_sync[*file] = Some(i);
        }
    }
    let mut files = initial.clone();
    let mut pending = 0usize;
    for (i, e) in log[..cut].iter().enumerate() {
        let file = match e {
            Event::Write { file, .. } | Event::SetLen { file, .. } => *file,
            _ => continue,
        };
        let durable = last_sync[file].is_some_and(|s| i < s);
        let kept = durable
            || match keep {
                Keep::All => true,
                Keep::None => false,
                Keep::EveryOther => {
                    pending += 1;
                    pending % 2 == 0
                }
            };
        if !kept {
            continue;
        }
        match e {
            Event::Write { at, data, .. } => apply_write(&mut files[file], *at, data),
            Event::SetLen { len, .. } => files[file].resize(*len as usize, 0),
            _ => {}
        }
    }
    files
}

#[test]
fn an_image_with_a_data_file_survives_a_crash_at_every_write() {
    let Some(env) = Env::new("crash_data_file::every_write") else {
        return;
    };
    let dir = env.dir.path();
    let opts = "data_file=img.data,cluster_size=65536";
    env.qemu.img(
        dir,
        &["create", "-q", "-f", "qcow2", "-o", opts, "img.qcow2", "4M"],
    );
    let initial = [
        std::fs::read(dir.join("img.qcow2")).unwrap(),
        std::fs::read(dir.join("img.data")).unwrap(),
    ];
    let log = Arc::new(Mutex::new(Vec::new()));
    let file = |file: usize| Logged {
        file,
        data: Arc::new(Mutex::new(initial[file].clone())),
        log: Arc::clone(&log),
    };
    // The workload, and for each sector the values it may hold after each event.
    let mut image = Qcow2::open_with(file(0), &OpenOptions::new().write(true)).unwrap();
    image.set_data_storage(file(1)).unwrap();
    let writer = image.into_writer().unwrap();
    let sectors = (GUEST as usize) / SECTOR;
    // (log position when written, sector, value)
    let mut writes: Vec<(usize, usize, u8)> = Vec::new();
    let mut flushes: Vec<usize> = Vec::new();
    let mut rng = Rng::new(77);
    for i in 0..60u64 {
        if i % 7 == 6 {
            writer.flush().unwrap();
            let mut l = log.lock().unwrap();
            l.push(Event::Flushed);
            flushes.push(l.len());
            continue;
        }
        let len = (1 + rng.below(200)) as usize * SECTOR;
        let at = rng.below((sectors - len / SECTOR) as u64) as usize * SECTOR;
        let value = (i % 250) as u8 + 1;
        let before = log.lock().unwrap().len();
        writer.write_all_at(at as u64, &vec![value; len]).unwrap();
        for s in at / SECTOR..(at + len) / SECTOR {
            writes.push((before, s, value));
        }
    }
    writer.close().unwrap();
    let log = log.lock().unwrap().clone();
    let mut judged = 0;
    for cut in 0..=log.len() {
        for keep in [Keep::All, Keep::None, Keep::EveryOther] {
            let [img, data] = replay(&initial, &log, cut, keep);
            std::fs::write(dir.join("cut.qcow2"), &img).unwrap();
            std::fs::write(dir.join("img.data"), &data).unwrap();
            judge(&env, cut, keep, &writes, &flushes);
            judged += 1;
        }
    }
    eprintln!("{} events, {judged} images judged", log.len());
}

/// `qemu-img check` of the cut image, then every sector against what it may hold.
fn judge(env: &Env, cut: usize, keep: Keep, writes: &[(usize, usize, u8)], flushes: &[usize]) {
    let dir = env.dir.path();
    let out = std::process::Command::new(&env.qemu.img)
        .current_dir(dir)
        .args(["check", "--output=json", "cut.qcow2"])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "cut {cut} {keep:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        report.get("corruptions").is_none_or(|c| c == 0)
            && report.get("check-errors").is_none_or(|c| c == 0),
        "cut {cut} {keep:?}: {report}"
    );
    let guest = env.qemu.convert_to_raw(dir, "cut.qcow2", &[] as &[&str]);
    // The last flush that returned before the cut: what was written before it is durable.
    let durable_until = flushes
        .iter()
        .rev()
        .find(|f| **f <= cut)
        .copied()
        .unwrap_or(0);
    let sectors = (GUEST as usize) / SECTOR;
    let mut durable = vec![0u8; sectors];
    let mut allowed: Vec<Vec<u8>> = vec![vec![0]; sectors];
    for &(at, s, v) in writes {
        if at < durable_until {
            durable[s] = v;
            allowed[s] = vec![v];
        } else if at < cut {
            allowed[s].push(v);
        }
    }
    for s in 0..sectors {
        let got = &guest[s * SECTOR..(s + 1) * SECTOR];
        let value = got[0];
        assert!(
            got.iter().all(|b| *b == value) && allowed[s].contains(&value),
            "cut {cut} {keep:?}: sector {s} holds {value:#x}, allowed {:?} (durable {:#x})",
            allowed[s],
            durable[s]
        );
    }
}
