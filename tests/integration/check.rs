//! `Qcow2::check` against `qemu-img check` (read-only, no `-r`): on every committed fixture,
//! on fresh images QEMU makes, and on images corrupted here byte by byte. For each image the
//! counts (the JSON fields), the problem lines (QEMU's stderr) and the exit status must be
//! QEMU's, and a check in many small windows must find exactly what a one-window check finds.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::{Qemu, TempDir};
use qcow2::{CheckOptions, CheckReport, OpenOptions, Qcow2};
use serde_json::{json, Map, Value};

/// What `qemu-img check --output=json` said about an image.
struct QemuCheck {
    /// The JSON, or `None` when the check failed (nothing on stdout).
    json: Option<Value>,
    /// Its stderr lines, less qemu-img's own `qemu-img: ...` messages and the qcow2 driver's
    /// one-time `qcow2: Image is corrupt: ...` notice (not a counted problem).
    problems: Vec<String>,
    status: i32,
}

fn qemu_check(qemu: &Qemu, dir: &Path, name: &str) -> QemuCheck {
    let out = Command::new(&qemu.img)
        .current_dir(dir)
        .args(["check", "--output=json", name])
        .output()
        .expect("running qemu-img check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = (!stdout.trim().is_empty()).then(|| {
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("qemu-img JSON: {e}\n{stdout}"))
    });
    // Opening an image with a stale bitmaps extension prints this without a newline.
    let stale = "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix.";
    QemuCheck {
        json,
        problems: String::from_utf8_lossy(&out.stderr)
            .replace(stale, "")
            .lines()
            .filter(|l| !l.starts_with("qemu-img:") && !l.starts_with("qcow2: "))
            .map(str::to_owned)
            .collect(),
        status: out.status.code().expect("qemu-img exited by signal"),
    }
}

/// The report as qemu-img's JSON, built field by field (zero counts left out, as qemu-img
/// leaves them out), so the comparison does not depend on the crate's serializer.
fn report_json(r: &CheckReport) -> Value {
    let mut m = Map::new();
    m.insert("filename".into(), json!(r.filename));
    m.insert("format".into(), json!(r.format));
    m.insert("check-errors".into(), json!(r.check_errors));
    for (key, n) in [
        ("image-end-offset", r.image_end_offset),
        ("corruptions", r.corruptions),
        ("leaks", r.leaks),
        ("corruptions-fixed", r.corruptions_fixed),
        ("leaks-fixed", r.leaks_fixed),
        ("total-clusters", r.total_clusters),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ] {
        if n != 0 {
            m.insert(key.into(), json!(n));
        }
    }
    Value::Object(m)
}

fn problem_lines(r: &CheckReport) -> Vec<String> {
    r.problems
        .iter()
        .flat_map(|p| p.to_string().lines().map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

/// Check `dir/name` with the crate and with qemu-img; everything must agree.
/// Returns the crate's report, or `None` when both failed (to open, or to check).
fn assert_same_as_qemu(qemu: &Qemu, dir: &Path, name: &str) -> Option<CheckReport> {
    let q = qemu_check(qemu, dir, name);
    let options = OpenOptions::new().backing_as_zeros(true);
    let image = match Qcow2::open_path_with(dir.join(name), &options) {
        Ok(image) => image,
        Err(e) => {
            // What the crate refuses to open, qemu-img must fail to check.
            assert!(
                q.json.is_none(),
                "{name}: open failed ({e}), qemu-img checked it"
            );
            assert_eq!(q.status, 1, "{name}: qemu-img status");
            return None;
        }
    };
    let result = image.check();
    let Some(qemu_json) = q.json else {
        assert!(
            result.is_err(),
            "{name}: qemu-img check failed (status {}), the crate's check passed: {result:?}",
            q.status
        );
        assert_eq!(q.status, 1, "{name}: qemu-img status");
        return None;
    };
    let mut report = result.unwrap_or_else(|e| panic!("{name}: check failed: {e}"));
    report.filename = name.to_owned();
    assert_eq!(
        report_json(&report),
        qemu_json,
        "{name}: counts differ from qemu-img"
    );
    #[cfg(feature = "serde")]
    assert_eq!(
        serde_json::to_value(&report).unwrap(),
        qemu_json,
        "{name}: serialized report differs from qemu-img's JSON"
    );
    assert_eq!(
        problem_lines(&report),
        q.problems,
        "{name}: problem lines differ from qemu-img's stderr"
    );
    assert_eq!(
        i32::from(report.exit_status()),
        q.status,
        "{name}: exit status"
    );
    // Many small windows (several passes over the metadata) find exactly the same.
    for budget in [1, 24, 4096] {
        let options = CheckOptions::new().memory_budget(budget);
        let mut windowed = image.check_with(&options).expect("windowed check");
        windowed.filename = name.to_owned();
        assert_eq!(
            windowed, report,
            "{name}: check with a {budget}-byte budget differs"
        );
    }
    Some(report)
}

#[test]
fn every_fixture_checks_as_qemu_img_checks_it() {
    let Some(qemu) = Qemu::find_or_skip("every_fixture_checks_as_qemu_img_checks_it") else {
        return;
    };
    let dir = common::fixtures_dir();
    let mut checked = 0;
    for name in common::fixture_images() {
        let options = OpenOptions::new().backing_as_zeros(true);
        match Qcow2::open_path_with(dir.join(&name), &options) {
            Ok(_) => {
                assert_same_as_qemu(&qemu, &dir, &name);
                checked += 1;
            }
            // Encrypted images and the corrupt bit are refused on open (the CLI checks the
            // corrupt one; qemu-img cannot open the encrypted ones without their key either).
            Err(e) => assert!(
                ["luks.qcow2", "aes.qcow2", "v3-corrupt.qcow2"].contains(&name.as_str()),
                "{name}: {e}"
            ),
        }
    }
    assert!(checked >= 25, "only {checked} fixtures checked");
}

// ---------------------------------------------------------------------------------------------
// Fresh images made by QEMU.

/// One way to make an image: `qemu-img create` options and size, then steps.
struct Fresh {
    name: &'static str,
    create: &'static [&'static str],
    size: &'static str,
    steps: &'static [Step],
}

enum Step {
    /// `qemu-io` commands, one open.
    Io(&'static [&'static str]),
    /// `qemu-io` commands, then the process is killed (a crash: a dirty image).
    Crash(&'static [&'static str]),
    /// A `qemu-img` command; the image name is appended.
    Img(&'static [&'static str]),
}

const FRESH: &[Fresh] = &[
    Fresh {
        name: "writes",
        create: &[],
        size: "8M",
        steps: &[Step::Io(&[
            "write -P 1 0 64k",
            "write -P 2 1M 192k",
            "write -P 3 100k 3k",
            "write 7M 4k",
        ])],
    },
    Fresh {
        name: "discards",
        create: &["-o", "cluster_size=4096"],
        size: "2M",
        steps: &[Step::Io(&[
            "write -P 5 0 1M",
            "discard 64k 128k",
            "write -z 512k 64k",
            "write -z -u 600k 8k",
            "write -P 6 1536k 64k",
        ])],
    },
    Fresh {
        name: "snapshots",
        create: &["-o", "cluster_size=8192"],
        size: "4M",
        steps: &[
            Step::Io(&["write -P 1 0 256k", "write -c -P 4 1M 64k"]),
            Step::Img(&["snapshot", "-c", "s1"]),
            Step::Io(&["write -P 2 64k 64k", "discard 128k 64k"]),
            Step::Img(&["snapshot", "-c", "s2"]),
            Step::Io(&["write -P 3 0 8k", "write 3M 64k"]),
            Step::Img(&["snapshot", "-d", "s1"]),
        ],
    },
    Fresh {
        name: "compressed",
        create: &["-o", "cluster_size=4096"],
        size: "1M",
        steps: &[Step::Io(&[
            "write -c -P 1 0 64k",
            "write -c 128k 4k",
            "write -P 2 4k 4k",
            "write -c -P 3 256k 128k",
        ])],
    },
    Fresh {
        name: "zstd",
        create: &["-o", "compression_type=zstd"],
        size: "1M",
        steps: &[Step::Io(&["write -c -P 7 0 256k", "write -P 8 64k 4k"])],
    },
    Fresh {
        name: "bitmaps",
        create: &[],
        size: "16M",
        steps: &[
            Step::Img(&["bitmap", "--add", "--granularity", "512"]),
            // qemu-img bitmap names the bitmap after the image; add a second one too.
            Step::Io(&["write -P 1 0 1M", "write 8M 64k"]),
        ],
    },
    Fresh {
        name: "cluster512",
        create: &["-o", "cluster_size=512"],
        size: "2M",
        steps: &[Step::Io(&[
            "write -P 1 0 40k",
            "write -P 2 100000 3000",
            "write -c 1M 1k",
            "discard 8k 2k",
        ])],
    },
    Fresh {
        name: "refcount1",
        create: &["-o", "refcount_bits=1,cluster_size=4096"],
        size: "1M",
        steps: &[Step::Io(&["write -P 1 0 100k", "discard 8k 8k"])],
    },
    Fresh {
        name: "refcount64",
        create: &["-o", "refcount_bits=64,cluster_size=4096"],
        size: "1M",
        steps: &[
            Step::Io(&["write -P 1 0 100k"]),
            Step::Img(&["snapshot", "-c", "s1"]),
            Step::Io(&["write -P 2 0 8k"]),
        ],
    },
    Fresh {
        name: "extended_l2",
        create: &["-o", "extended_l2=on,cluster_size=65536"],
        size: "4M",
        steps: &[Step::Io(&[
            "write -P 1 0 3k",
            "write -P 2 70k 2k",
            "write -z 128k 8k",
            "write -z 300k 64k",
            "discard 0 2k",
        ])],
    },
    Fresh {
        name: "v2",
        create: &["-o", "compat=0.10"],
        size: "4M",
        steps: &[
            Step::Io(&["write -P 1 0 128k"]),
            Step::Img(&["snapshot", "-c", "s1"]),
            Step::Io(&["write -P 2 0 64k"]),
        ],
    },
    Fresh {
        name: "prealloc_metadata",
        create: &["-o", "preallocation=metadata,cluster_size=4096"],
        size: "512k",
        steps: &[Step::Io(&["write -P 1 4k 8k", "write -z 64k 64k"])],
    },
    Fresh {
        // Lazy refcounts, then a crash: QEMU's read-only check reports what it finds.
        name: "lazy_refcounts_crash",
        create: &["-o", "lazy_refcounts=on,cluster_size=4096"],
        size: "1M",
        steps: &[
            Step::Io(&["write -P 1 0 16k"]),
            Step::Crash(&["write -P 2 64k 64k", "write -P 3 512k 4k"]),
        ],
    },
];

fn make(qemu: &Qemu, dir: &Path, fresh: &Fresh) -> String {
    let name = format!("{}.qcow2", fresh.name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(fresh.create);
    args.extend([name.as_str(), fresh.size]);
    qemu.img(dir, &args);
    for step in fresh.steps {
        match step {
            Step::Io(cmds) => qemu.io(dir, "qcow2", &name, cmds),
            Step::Crash(cmds) => qemu.io_crash(dir, "qcow2", &name, cmds),
            Step::Img(args) => {
                let mut args = args.to_vec();
                args.push(&name);
                if args[0] == "bitmap" {
                    args.push("b0");
                }
                qemu.img(dir, &args);
            }
        }
    }
    name
}

#[test]
fn fresh_images_check_as_qemu_img_checks_them() {
    let Some(qemu) = Qemu::find_or_skip("fresh_images_check_as_qemu_img_checks_them") else {
        return;
    };
    let tmp = TempDir::new("check-fresh");
    for fresh in FRESH {
        let name = make(&qemu, tmp.path(), fresh);
        let report = assert_same_as_qemu(&qemu, tmp.path(), &name)
            .unwrap_or_else(|| panic!("{name}: qemu-img check failed"));
        match fresh.name {
            "lazy_refcounts_crash" => assert!(!report.is_clean(), "the crash left no trace"),
            "compressed" | "zstd" => assert!(report.compressed_clusters > 0),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Images corrupted on purpose (the ways QEMU's iotests 060, 061, 138 and 261 corrupt them).

const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// An image file in memory, with the header fields needed to patch it.
struct Img {
    bytes: Vec<u8>,
    cluster_bits: u32,
    l1_offset: u64,
    reftable_offset: u64,
    order: u32,
    entry_len: u64,
}

impl Img {
    fn load(path: &Path) -> Img {
        let bytes = std::fs::read(path).unwrap();
        let u32_at = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
        let version = u32_at(4);
        let extl2 = version >= 3 && u64_at(72) & (1 << 4) != 0;
        Img {
            cluster_bits: u32_at(20),
            l1_offset: u64_at(40),
            reftable_offset: u64_at(48),
            order: if version >= 3 { u32_at(96) } else { 4 },
            entry_len: if extl2 { 16 } else { 8 },
            bytes,
        }
    }
    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    fn u64_at(&self, at: u64) -> u64 {
        let at = at as usize;
        u64::from_be_bytes(self.bytes[at..at + 8].try_into().unwrap())
    }
    fn set_u64(&mut self, at: u64, value: u64) {
        let at = at as usize;
        self.bytes[at..at + 8].copy_from_slice(&value.to_be_bytes());
    }
    fn l1_at(&self, index: u64) -> u64 {
        self.l1_offset + 8 * index
    }
    /// File position of the L2 entry of guest cluster `guest`.
    fn l2_at(&self, guest: u64) -> u64 {
        let per_table = self.cluster_size() / self.entry_len;
        let l2 = self.u64_at(self.l1_at(guest / per_table)) & OFFSET_MASK;
        assert_ne!(l2, 0, "guest cluster {guest} has no L2 table");
        l2 + (guest % per_table) * self.entry_len
    }
    /// Host offset of guest cluster `guest`'s data.
    fn host(&self, guest: u64) -> u64 {
        self.u64_at(self.l2_at(guest)) & OFFSET_MASK
    }
    fn reftable_at(&self, index: u64) -> u64 {
        self.reftable_offset + 8 * index
    }
    /// Byte position, bit shift and width in bits of host cluster `cluster`'s refcount.
    fn refcount_place(&self, cluster: u64) -> (usize, u32, u32) {
        let block_bits = self.cluster_bits + 3 - self.order;
        let block = self.u64_at(self.reftable_at(cluster >> block_bits)) & !0x1ff;
        assert_ne!(block, 0, "cluster {cluster} has no refcount block");
        let bit = (cluster & ((1 << block_bits) - 1)) << self.order;
        let width = 1u32 << self.order;
        if width < 8 {
            ((block + bit / 8) as usize, (bit % 8) as u32, width)
        } else {
            ((block + bit / 8) as usize, 0, width)
        }
    }
    fn refcount(&self, cluster: u64) -> u64 {
        let (at, shift, width) = self.refcount_place(cluster);
        if width < 8 {
            u64::from(self.bytes[at] >> shift) & ((1 << width) - 1)
        } else {
            let n = (width / 8) as usize;
            self.bytes[at..at + n]
                .iter()
                .fold(0, |acc, &b| (acc << 8) | u64::from(b))
        }
    }
    fn set_refcount(&mut self, cluster: u64, value: u64) {
        let (at, shift, width) = self.refcount_place(cluster);
        if width < 8 {
            let mask = ((1u8 << width) - 1) << shift;
            self.bytes[at] = (self.bytes[at] & !mask) | ((value as u8) << shift & mask);
        } else {
            let n = (width / 8) as usize;
            let be = value.to_be_bytes();
            self.bytes[at..at + n].copy_from_slice(&be[8 - n..]);
        }
    }
    /// The first cluster past the end of the file.
    fn end_cluster(&self) -> u64 {
        (self.bytes.len() as u64).div_ceil(self.cluster_size())
    }
}

struct Corruption {
    name: &'static str,
    create: &'static [&'static str],
    io: &'static [&'static str],
    /// Make a snapshot after the writes.
    snapshot: bool,
    patch: fn(&mut Img),
}

impl Img {
    /// Offset of the first bitmap's table (from the bitmaps header extension).
    fn first_bitmap_table(&self) -> u64 {
        let header_len = u32::from_be_bytes(self.bytes[100..104].try_into().unwrap()) as usize;
        let mut at = header_len;
        loop {
            let magic = u32::from_be_bytes(self.bytes[at..at + 4].try_into().unwrap());
            let len = u32::from_be_bytes(self.bytes[at + 4..at + 8].try_into().unwrap()) as usize;
            assert_ne!(magic, 0, "no bitmaps extension");
            if magic == 0x2385_2875 {
                let directory = self.u64_at(at as u64 + 8 + 16);
                return self.u64_at(directory);
            }
            at += 8 + len.div_ceil(8) * 8;
        }
    }
}

/// Guest data at guest clusters 0-2 and 8, 64 KiB clusters unless the case says otherwise.
const WRITES: &[&str] = &["write -P 1 0 192k", "write -P 2 512k 64k"];

/// Writes that a bitmap (added before them) records: its table gets a data cluster.
const BITMAP_WRITES: &[&str] = &["write -P 1 0 512k"];

const CORRUPTIONS: &[Corruption] = &[
    Corruption {
        name: "leak_bumped_refcount",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let c = img.host(1) >> img.cluster_bits;
            img.set_refcount(c, img.refcount(c) + 1);
        },
    },
    Corruption {
        name: "leak_unreferenced_cluster",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let end = img.end_cluster();
            img.bytes
                .resize(((end + 2) << img.cluster_bits) as usize, 0);
            img.set_refcount(end + 1, 1);
        },
    },
    Corruption {
        name: "refcount_zeroed",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let c = img.host(0) >> img.cluster_bits;
            img.set_refcount(c, 0);
        },
    },
    Corruption {
        name: "l2_table_refcount_zeroed",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let l2 = img.u64_at(img.l1_at(0)) & OFFSET_MASK;
            img.set_refcount(l2 >> img.cluster_bits, 0);
        },
    },
    Corruption {
        name: "two_l2_entries_one_cluster",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let e = img.u64_at(img.l2_at(0));
            let at = img.l2_at(2);
            img.set_u64(at, e);
        },
    },
    Corruption {
        name: "data_entry_unaligned",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let at = img.l2_at(1);
            img.set_u64(at, img.u64_at(at) + 0x200);
        },
    },
    Corruption {
        name: "zero_entry_unaligned",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let at = img.l2_at(1);
            img.set_u64(at, (img.u64_at(at) + 0x200) | 1);
        },
    },
    Corruption {
        name: "data_entry_past_eof",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let at = img.l2_at(2);
            let past = (img.end_cluster() + 10) << img.cluster_bits;
            img.set_u64(at, COPIED | past);
        },
    },
    Corruption {
        name: "data_entry_just_past_eof",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            // The cluster right after the end: QEMU grows its table by one cluster.
            let at = img.l2_at(2);
            let past = img.end_cluster() << img.cluster_bits;
            img.set_u64(at, COPIED | past);
        },
    },
    Corruption {
        name: "l2_copied_flag_cleared",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let at = img.l2_at(8);
            img.set_u64(at, img.u64_at(at) & !COPIED);
        },
    },
    Corruption {
        name: "l1_copied_flag_cleared",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let at = img.l1_at(0);
            img.set_u64(at, img.u64_at(at) & !COPIED);
        },
    },
    Corruption {
        name: "copied_flag_set_on_shared_clusters",
        create: &[],
        io: WRITES,
        snapshot: true,
        patch: |img| {
            // After a snapshot the active entries must not have COPIED.
            for guest in [0, 1, 8] {
                let at = img.l2_at(guest);
                img.set_u64(at, img.u64_at(at) | COPIED);
            }
        },
    },
    Corruption {
        name: "l2_table_is_the_refcount_table",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let at = img.l1_at(0);
            img.set_u64(at, COPIED | img.reftable_offset);
        },
    },
    Corruption {
        name: "l2_table_is_the_l1_table",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let at = img.l1_at(0);
            img.set_u64(at, COPIED | img.l1_offset);
        },
    },
    Corruption {
        name: "l1_entry_reserved_bits",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let at = img.l1_at(0);
            img.set_u64(at, img.u64_at(at) | (1 << 60) | 2);
        },
    },
    Corruption {
        name: "l2_entry_reserved_bits",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let at = img.l2_at(0);
            img.set_u64(at, img.u64_at(at) | (1 << 57) | 4);
        },
    },
    Corruption {
        name: "l2_table_unaligned",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let at = img.l1_at(0);
            img.set_u64(at, img.u64_at(at) + 0x200);
        },
    },
    Corruption {
        name: "refcount_block_unaligned",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let at = img.reftable_at(0);
            img.set_u64(at, img.u64_at(at) + 0x200);
        },
    },
    Corruption {
        name: "refcount_table_entry_reserved_bits",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let at = img.reftable_at(0);
            img.set_u64(at, img.u64_at(at) | 1);
        },
    },
    // Bit 63 is part of the offset for QEMU (REFT_OFFSET_MASK keeps it): the block lies
    // past what QEMU may read (EIO), so every refcount it holds is unreadable, and the check
    // goes on ("Can't get refcount for cluster N").
    Corruption {
        name: "refcount_table_entry_bit_63",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let at = img.reftable_at(0);
            img.set_u64(at, img.u64_at(at) | 1 << 63);
        },
    },
    Corruption {
        name: "refcount_table_entry_bit_63_snapshot",
        create: &[],
        io: WRITES,
        snapshot: true,
        patch: |img| {
            let at = img.reftable_at(0);
            img.set_u64(at, img.u64_at(at) | 1 << 63);
        },
    },
    // Below QEMU's largest offset (2^63 - 2^30) the block reads as zeros past the end.
    Corruption {
        name: "refcount_table_entry_bit_62",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let at = img.reftable_at(0);
            img.set_u64(at, img.u64_at(at) | 1 << 62);
        },
    },
    // The last cluster QEMU may read, and the one past it.
    Corruption {
        name: "refcount_block_at_qemus_last_offset",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let at = img.reftable_at(0);
            img.set_u64(at, (1 << 63) - (1 << 30) - img.cluster_size());
        },
    },
    Corruption {
        name: "refcount_block_past_qemus_last_offset",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let at = img.reftable_at(0);
            img.set_u64(at, (1 << 63) - (1 << 30));
        },
    },
    Corruption {
        name: "refcount_block_outside_image",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let at = img.reftable_at(1);
            img.set_u64(at, (img.end_cluster() + 100) << img.cluster_bits);
        },
    },
    Corruption {
        name: "refcount_block_twice",
        create: &[],
        io: WRITES,
        snapshot: false,
        patch: |img| {
            let first = img.u64_at(img.reftable_at(0));
            let at = img.reftable_at(1);
            img.set_u64(at, first);
        },
    },
    Corruption {
        name: "compressed_with_copied_flag",
        create: &["-o", "cluster_size=4096"],
        io: &["write -c -P 1 0 64k", "write -P 2 64k 4k"],
        snapshot: false,
        patch: |img| {
            let at = img.l2_at(3);
            assert_ne!(img.u64_at(at) & COMPRESSED, 0);
            img.set_u64(at, img.u64_at(at) | COPIED);
        },
    },
    Corruption {
        name: "compressed_refcount_zeroed",
        create: &["-o", "cluster_size=4096"],
        io: &["write -c -P 1 0 64k"],
        snapshot: false,
        patch: |img| {
            // Several compressed clusters share each host cluster.
            let host = (img.u64_at(img.l2_at(2)) & ((1 << 58) - 1)) >> img.cluster_bits;
            img.set_refcount(host, 0);
        },
    },
    Corruption {
        name: "refcount1_overflow",
        create: &["-o", "refcount_bits=1,cluster_size=4096"],
        io: &["write -P 1 0 16k"],
        snapshot: false,
        patch: |img| {
            let e = img.u64_at(img.l2_at(0));
            let at = img.l2_at(3);
            img.set_u64(at, e);
        },
    },
    Corruption {
        // An overflowing reference, then a problem found right after it: the order holds
        // however the clusters fall into windows.
        name: "refcount1_overflow_then_unaligned_l2",
        create: &["-o", "refcount_bits=1,cluster_size=1024"],
        io: &["write -P 1 0 256k"],
        snapshot: false,
        patch: |img| {
            let first = img.u64_at(img.l1_at(0));
            let at = img.l1_at(1);
            img.set_u64(at, first | 0x200);
        },
    },
    Corruption {
        name: "refcount64_leak",
        create: &["-o", "refcount_bits=64,cluster_size=4096"],
        io: &["write -P 1 0 16k"],
        snapshot: false,
        patch: |img| {
            let c = img.host(1) >> img.cluster_bits;
            img.set_refcount(c, 1 << 40);
        },
    },
    Corruption {
        name: "cluster512_shared_and_leaked",
        create: &["-o", "cluster_size=512"],
        io: &["write -P 1 0 8k", "write -P 2 300k 2k"],
        snapshot: false,
        patch: |img| {
            let e = img.u64_at(img.l2_at(1));
            let at = img.l2_at(2);
            img.set_u64(at, e);
        },
    },
    Corruption {
        name: "snapshot_l1_unaligned",
        create: &[],
        io: WRITES,
        snapshot: true,
        patch: |img| {
            let table = img.u64_at(64);
            img.set_u64(table, img.u64_at(table) + 0x200);
        },
    },
    Corruption {
        name: "snapshot_l1_entry_cleared",
        create: &[],
        io: WRITES,
        snapshot: true,
        patch: |img| {
            // The snapshot drops its reference to the shared L2 table: refcounts of 2 for
            // one reference each, leaks.
            let snap_l1 = img.u64_at(img.u64_at(64));
            img.set_u64(snap_l1, 0);
        },
    },
    Corruption {
        name: "extl2_allocated_and_zero",
        create: &["-o", "extended_l2=on"],
        io: &["write -P 1 0 64k", "write -P 2 64k 4k"],
        snapshot: false,
        patch: |img| {
            let at = img.l2_at(1) + 8;
            img.set_u64(at, img.u64_at(at) | (img.u64_at(at) << 32));
        },
    },
    Corruption {
        name: "extl2_unallocated_with_allocated_subclusters",
        create: &["-o", "extended_l2=on"],
        io: &["write -P 1 0 64k"],
        snapshot: false,
        patch: |img| {
            let at = img.l2_at(5) + 8;
            img.set_u64(at, 0b101);
        },
    },
    Corruption {
        // QEMU's check fails on a bitmap table it cannot load (status 1), and so does ours.
        name: "bitmap_table_entry_reserved_bits",
        create: &[],
        io: BITMAP_WRITES,
        snapshot: false,
        patch: |img| {
            let table = img.first_bitmap_table();
            img.set_u64(table, img.u64_at(table) | 2);
        },
    },
    Corruption {
        name: "bitmap_data_refcount_zeroed",
        create: &[],
        io: BITMAP_WRITES,
        snapshot: false,
        patch: |img| {
            let data = img.u64_at(img.first_bitmap_table()) & OFFSET_MASK;
            assert_ne!(data, 0, "the bitmap has no data cluster");
            img.set_refcount(data >> img.cluster_bits, 0);
        },
    },
    Corruption {
        name: "bitmap_table_is_an_l2_table",
        create: &[],
        io: BITMAP_WRITES,
        snapshot: false,
        patch: |img| {
            let l2 = img.u64_at(img.l1_at(0)) & OFFSET_MASK;
            let table = img.first_bitmap_table();
            img.set_u64(table, l2);
        },
    },
    // One L2 table named by 31 L1 entries: QEMU walks it 31 times, and so does the crate
    // (the walk budget's floor, 65536 tables of 512-byte clusters, is far off).
    Corruption {
        name: "l2_table_named_again",
        create: &["-o", "cluster_size=512"],
        io: &["write -P 1 0 4k"],
        snapshot: false,
        patch: |img| {
            let first = img.u64_at(img.l1_at(0));
            for i in 1..32 {
                img.set_u64(img.l1_at(i), first);
            }
        },
    },
    Corruption {
        name: "truncated_file",
        create: &["-o", "cluster_size=4096"],
        io: &["write -P 1 0 64k", "write -P 2 512k 64k"],
        snapshot: false,
        patch: |img| {
            let len = img.bytes.len() - 5 * 4096;
            img.bytes.truncate(len);
        },
    },
];

#[test]
fn corrupted_images_check_as_qemu_img_checks_them() {
    let Some(qemu) = Qemu::find_or_skip("corrupted_images_check_as_qemu_img_checks_them") else {
        return;
    };
    let tmp = TempDir::new("check-corrupt");
    for case in CORRUPTIONS {
        let name = format!("{}.qcow2", case.name);
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(case.create);
        args.extend([name.as_str(), "1M"]);
        qemu.img(tmp.path(), &args);
        if case.io == BITMAP_WRITES {
            let add = ["bitmap", "--add", "--granularity", "512", &name, "b0"];
            qemu.img(tmp.path(), &add);
        }
        qemu.io(tmp.path(), "qcow2", &name, case.io);
        if case.snapshot {
            qemu.img(tmp.path(), &["snapshot", "-c", "s1", &name]);
        }
        let path = tmp.join(&name);
        let mut img = Img::load(&path);
        (case.patch)(&mut img);
        std::fs::write(&path, &img.bytes).unwrap();
        match assert_same_as_qemu(&qemu, tmp.path(), &name) {
            Some(report) => assert!(!report.is_clean(), "{name}: the corruption went unseen"),
            None => eprintln!("{name}: both checks failed, as they should"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Random damage to the metadata of the fixtures, each image checked by both.

/// Byte ranges of an image's metadata past the header: the L1 table, the refcount table,
/// every refcount block and L2 table in the file, and the start of the snapshot table.
fn metadata_regions(img: &Img) -> Vec<(u64, u64)> {
    let cs = img.cluster_size();
    let len = img.bytes.len() as u64;
    let l1_entries = u64::from(u32::from_be_bytes(img.bytes[36..40].try_into().unwrap()));
    let reftable_clusters = u64::from(u32::from_be_bytes(img.bytes[56..60].try_into().unwrap()));
    let mut regions = vec![
        (img.l1_offset, l1_entries * 8),
        (img.reftable_offset, reftable_clusters * cs),
    ];
    for i in 0..reftable_clusters * cs / 8 {
        let block = img.u64_at(img.reftable_at(i)) & !0x1ff;
        if block != 0 && block + cs <= len {
            regions.push((block, cs));
        }
    }
    for i in 0..l1_entries {
        let l2 = img.u64_at(img.l1_at(i)) & OFFSET_MASK;
        if l2 != 0 && l2 + cs <= len {
            regions.push((l2, cs));
        }
    }
    let snapshots = img.u64_at(64);
    if img.bytes[60..64] != [0; 4] && snapshots + 256 <= len {
        regions.push((snapshots, 256));
    }
    regions.retain(|&(at, n)| n >= 8 && at + n <= len);
    regions
}

#[test]
fn damaged_metadata_checks_as_qemu_img_checks_it() {
    let Some(qemu) = Qemu::find_or_skip("damaged_metadata_checks_as_qemu_img_checks_it") else {
        return;
    };
    let tmp = TempDir::new("check-damaged");
    let mut rng = common::Rng::new(0x5eed_c4ec);
    let mut damaged = 0;
    for fixture in [
        "snap.qcow2",
        "zlib-4k-mixed.qcow2",
        "extl2-16k.qcow2",
        "refcount1.qcow2",
        "v3-512-l2cross.qcow2",
        "bitmaps.qcow2",
    ] {
        let original = Img::load(&common::fixtures_dir().join(fixture));
        let regions = metadata_regions(&original);
        for case in 0..25 {
            let mut img = Img::load(&common::fixtures_dir().join(fixture));
            for _ in 0..=rng.below(3) {
                let (start, len) = regions[rng.below(regions.len() as u64) as usize];
                let at = start + rng.below(len / 8) * 8;
                let old = img.u64_at(at);
                let new = match rng.below(4) {
                    0 => old ^ (1 << rng.below(64)),
                    1 => rng.next_u64(),
                    2 => old.wrapping_add([0x200, 0x1000, 0x10000][rng.below(3) as usize]),
                    _ => old ^ COPIED,
                };
                img.set_u64(at, new);
            }
            let name = format!("{case}-{fixture}");
            std::fs::write(tmp.join(&name), &img.bytes).unwrap();
            if assert_same_as_qemu(&qemu, tmp.path(), &name).is_some_and(|r| !r.is_clean()) {
                damaged += 1;
            }
        }
    }
    assert!(damaged > 75, "only {damaged} damaged images had problems");
}

#[test]
fn hostile_images_that_open_check_as_qemu_img_checks_them() {
    let Some(qemu) = Qemu::find_or_skip("hostile_images_that_open_check_as_qemu_img_checks_them")
    else {
        return;
    };
    let dir = common::fixtures_dir().join("hostile");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".qcow2"))
        // qemu-img follows backing loops until it runs out of memory; the crate is not asked
        // to open the backing file here.
        .filter(|n| !n.starts_with("loop-"))
        .collect();
    names.sort();
    let mut checked = 0;
    for name in &names {
        let options = OpenOptions::new().backing_as_zeros(true);
        // Images the crate refuses to open are the business of tests/integration/hostile.rs (QEMU's
        // check mode opens some of them anyway: see docs/check.md).
        if Qcow2::open_path_with(dir.join(name), &options).is_ok() {
            assert_same_as_qemu(&qemu, &dir, name);
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} hostile images opened");
}

/// An L1 table naming one L2 table far more often than the file has clusters would keep a
/// check walking it for hours (QEMU's does): the crate's check stops with an error naming the
/// repetition, after the 1 + 64 walks its budget allows here.
#[test]
fn an_l2_table_named_again_and_again_stops_the_check() {
    let Some(qemu) = Qemu::find_or_skip("an_l2_table_named_again_and_again_stops_the_check") else {
        return;
    };
    let tmp = TempDir::new("check-named-again");
    let name = "again.qcow2";
    // 64 KiB clusters, 1 TiB: 2048 L1 entries, each naming an L2 table of 8192 entries.
    qemu.img(tmp.path(), &["create", "-q", "-f", "qcow2", name, "1T"]);
    qemu.io(tmp.path(), "qcow2", name, &["write -P 1 0 64k"]);
    let path = tmp.join(name);
    let mut img = Img::load(&path);
    let first = img.u64_at(img.l1_at(0));
    for i in 1..2048 {
        img.set_u64(img.l1_at(i), first);
    }
    std::fs::write(&path, &img.bytes).unwrap();
    let image = Qcow2::open_path(&path).expect("the image opens: reads are not affected");
    let mut buf = vec![0u8; 4096];
    use positioned_io::ReadAt;
    image
        .reader()
        .unwrap()
        .read_exact_at(5 << 29, &mut buf)
        .unwrap();
    assert!(
        buf.iter().all(|&b| b == 1),
        "L1 entry 5 reads the named table"
    );
    let err = image.check().expect_err("the check stops");
    let text = err.to_string();
    assert!(
        text.contains("L2 table named again and again")
            && text.contains("and 64 more times in all"),
        "{text}"
    );
}

/// Snapshots share L2 tables: each L1 table walks all 16 here, 25 tables in all, far more
/// walks than the check allows a file that earns none (64): the snapshots' L1 tables, each
/// on its own cluster of the file, earn the walks a sound image needs, and the check is
/// qemu-img's.
#[test]
fn many_snapshots_sharing_l2_tables_check_as_qemu_img_checks_them() {
    let Some(qemu) =
        Qemu::find_or_skip("many_snapshots_sharing_l2_tables_check_as_qemu_img_checks_them")
    else {
        return;
    };
    let tmp = TempDir::new("check-many-snapshots");
    let dir = tmp.path();
    let name = "many.qcow2";
    // 64 KiB clusters: an L2 table maps 512 MiB; 8 GiB is 16 L2 tables.
    qemu.img(dir, &["create", "-q", "-f", "qcow2", name, "8G"]);
    let writes: Vec<String> = (0..16u64)
        .map(|i| format!("write -P {} {} 64k", i + 1, i << 29))
        .collect();
    qemu.io(dir, "qcow2", name, &writes);
    for s in 0..24u64 {
        qemu.img(dir, &["snapshot", "-c", &format!("s{s}"), name]);
        if s % 8 == 0 {
            let at = ((s / 8) << 29) + (64 << 10);
            qemu.io(dir, "qcow2", name, &[format!("write -P 9 {at} 64k")]);
        }
    }
    let report = assert_same_as_qemu(&qemu, dir, name).expect("both checked it");
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(
        Qcow2::open_path(dir.join(name)).unwrap().snapshots().len(),
        24
    );
}

/// Snapshot L1 tables past the end of the file: QEMU counts the reference (a corruption) and
/// reads zeros; the crate reads nothing there, and reports the same.
#[test]
fn snapshot_l1_tables_past_the_end_check_as_qemu_img_checks_them() {
    let Some(qemu) =
        Qemu::find_or_skip("snapshot_l1_tables_past_the_end_check_as_qemu_img_checks_them")
    else {
        return;
    };
    let tmp = TempDir::new("check-snapshot-l1-past-end");
    let dir = tmp.path();
    let name = "past.qcow2";
    qemu.img(dir, &["create", "-q", "-f", "qcow2", name, "1G"]);
    for s in 0..3 {
        qemu.io(
            dir,
            "qcow2",
            name,
            &[format!("write -P {s} {} 64k", s << 20)],
        );
        qemu.img(dir, &["snapshot", "-c", &format!("s{s}"), name]);
    }
    let path = dir.join(name);
    let mut img = Img::load(&path);
    let mut at = img.u64_at(64);
    // (L1 offset, L1 entries) for each snapshot: the third keeps its own.
    for (offset, entries) in [(1u64 << 40, 1u32), (1 << 41, 4 << 20)] {
        img.set_u64(at, offset);
        img.bytes[at as usize + 8..at as usize + 12].copy_from_slice(&entries.to_be_bytes());
        let b = &img.bytes[at as usize..];
        let id = u64::from(u16::from_be_bytes([b[12], b[13]]));
        let name = u64::from(u16::from_be_bytes([b[14], b[15]]));
        let extra = u64::from(u32::from_be_bytes(b[36..40].try_into().unwrap()));
        at += (40 + extra + id + name).div_ceil(8) * 8;
    }
    std::fs::write(&path, &img.bytes).unwrap();
    let report = assert_same_as_qemu(&qemu, dir, name).expect("both checked it");
    assert!(report.corruptions >= 2, "{:?}", report.problems);
}

/// L1 entries naming L2 tables past the end of the file: QEMU counts a reference past the
/// end and reads zeros; the crate reads nothing there, and reports the same.
#[test]
fn l2_tables_past_the_end_check_as_qemu_img_checks_them() {
    let Some(qemu) = Qemu::find_or_skip("l2_tables_past_the_end_check_as_qemu_img_checks_them")
    else {
        return;
    };
    let tmp = TempDir::new("check-l2-past-end");
    let dir = tmp.path();
    let name = "l2-past.qcow2";
    // 64 GiB: an L1 table of 128 entries.
    qemu.img(dir, &["create", "-q", "-f", "qcow2", name, "64G"]);
    qemu.io(
        dir,
        "qcow2",
        name,
        &["write -P 1 0 64k", "write -P 2 1G 64k"],
    );
    let path = dir.join(name);
    let mut img = Img::load(&path);
    let cs = img.cluster_size();
    for i in 3..40 {
        let copied = if i % 2 == 0 { COPIED } else { 0 };
        img.set_u64(img.l1_at(i), copied | ((1 << 40) + i * cs));
    }
    // One partly past the end: its first half is in the file.
    let end = img.bytes.len() as u64;
    img.set_u64(img.l1_at(40), COPIED | (end - cs / 2));
    std::fs::write(&path, &img.bytes).unwrap();
    let report = assert_same_as_qemu(&qemu, dir, name).expect("both checked it");
    assert!(report.corruptions >= 37, "{:?}", report.problems);
}
