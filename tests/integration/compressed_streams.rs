//! Corners of compressed-cluster decoding, each judged by QEMU in the same test.
//!
//! Each case replaces the compressed data of guest cluster 0 of a `qemu-img convert -c` image
//! (64 KiB clusters) with a crafted stream: the stream is appended to the file, padded with
//! zeros to a sector, and the L2 entry pointed at it. Then `qemu-img convert -O raw` reads the
//! image and the crate reads cluster 0: both must refuse, or both must give the same bytes.
//! The verdict QEMU is expected to give is stated with each case, and checked too, so that a
//! case tests the corner it is named after.
//!
//! QEMU's rules (block/qcow2-threads.c): zlib is one `inflate(Z_FINISH)` into the cluster,
//! a success when the cluster is full, whatever follows; zstd decodes frame after frame, and
//! the frame that fills the cluster must end there.

use crate::common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::{Qemu, Rng, TempDir};
use positioned_io::ReadAt;
use qcow2::Qcow2;

const CLUSTER: usize = 64 << 10;
const CLUSTER_BITS: u32 = 16;
/// spec: a compressed L2 entry has bit 62 set; its host offset takes bits 0..x and its sector
/// count minus one the bits above, x = 62 - (cluster_bits - 8).
const COMPRESSED: u64 = 1 << 62;
const OFFSET_BITS: u32 = 62 - (CLUSTER_BITS - 8);

/// What QEMU does with a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Reads,
    Refuses,
}

/// The guest data of the base image: two clusters of text.
fn guest_data() -> Vec<u8> {
    let mut data = vec![0u8; 2 * CLUSTER];
    Rng::new(9).fill_text(&mut data);
    data
}

/// A `qemu-img convert -c` image of `guest_data()` in `dir`.
fn base_image(qemu: &Qemu, dir: &Path, kind: &str) -> String {
    fs::write(dir.join("guest.raw"), guest_data()).unwrap();
    let name = format!("base-{kind}.qcow2");
    let opts = format!("cluster_size={CLUSTER},compression_type={kind}");
    qemu.compress(dir, "guest.raw", &name, &opts);
    name
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// A copy of `base` whose guest cluster 0 is the compressed `stream` (appended, padded with
/// zeros to a sector boundary).
fn with_cluster0(dir: &Path, base: &str, name: &str, stream: &[u8]) -> String {
    let mut img = fs::read(dir.join(base)).unwrap();
    let l1 = be64(&img, 40) as usize;
    let l2 = (be64(&img, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    assert_ne!(
        be64(&img, l2) & COMPRESSED,
        0,
        "{base}: cluster 0 is not compressed"
    );
    let host = img.len().next_multiple_of(512);
    let sectors = stream.len().div_ceil(512) as u64;
    assert!(
        (1..=1 << (CLUSTER_BITS - 8)).contains(&sectors),
        "{name}: stream too long"
    );
    img.resize(host, 0);
    img.extend_from_slice(stream);
    img.resize(host + sectors as usize * 512, 0);
    let entry = COMPRESSED | (sectors - 1) << OFFSET_BITS | host as u64;
    img[l2..l2 + 8].copy_from_slice(&entry.to_be_bytes());
    let file = format!("{name}.qcow2");
    fs::write(dir.join(&file), img).unwrap();
    file
}

/// QEMU's reading of guest cluster 0: its bytes, or the error message.
fn qemu_reads(qemu: &Qemu, dir: &Path, image: &str) -> Result<Vec<u8>, String> {
    let out = dir.join(format!("{image}.raw"));
    let result = Command::new(&qemu.img)
        .current_dir(dir)
        .args(["convert", "-f", "qcow2", "-O", "raw", image])
        .arg(&out)
        .output()
        .unwrap();
    if !result.status.success() {
        return Err(String::from_utf8_lossy(&result.stderr).trim().to_owned());
    }
    let mut data = fs::read(&out).unwrap();
    data.truncate(CLUSTER);
    Ok(data)
}

/// The crate's reading of guest cluster 0.
fn crate_reads(dir: &Path, image: &str) -> Result<Vec<u8>, String> {
    let img = Qcow2::open(fs::File::open(dir.join(image)).unwrap()).map_err(|e| e.to_string())?;
    let mut data = vec![0u8; CLUSTER];
    img.reader()
        .map_err(|e| e.to_string())?
        .read_exact_at(0, &mut data)
        .map_err(|e| e.to_string())?;
    Ok(data)
}

/// Run every case; return a failure report per case that went wrong.
fn check_cases(qemu: &Qemu, dir: &Path, base: &str, cases: Vec<(&str, Verdict, Vec<u8>)>) {
    let mut failures = Vec::new();
    for (name, expected, stream) in cases {
        let image = with_cluster0(dir, base, name, &stream);
        let theirs = qemu_reads(qemu, dir, &image);
        let ours = crate_reads(dir, &image);
        let verdict = if theirs.is_ok() {
            Verdict::Reads
        } else {
            Verdict::Refuses
        };
        println!(
            "{name}: QEMU {verdict:?}, crate {}",
            if ours.is_ok() { "reads" } else { "refuses" }
        );
        if verdict != expected {
            failures.push(format!(
                "{name}: QEMU {verdict:?}, expected {expected:?}: {theirs:?}"
            ));
        }
        match (&theirs, &ours) {
            (Ok(a), Ok(b)) if a != b => failures.push(format!(
                "{name}: the crate's bytes differ from QEMU's at {:?}",
                common::first_difference(a, b)
            )),
            (Ok(_), Err(e)) => failures.push(format!("{name}: QEMU reads, the crate refuses: {e}")),
            (Err(e), Ok(_)) => {
                failures.push(format!("{name}: QEMU refuses ({e}), the crate reads"))
            }
            _ => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A raw deflate stored block (spec: RFC 1951 3.2.4) holding `data`, byte aligned.
fn stored(last: bool, data: &[u8]) -> Vec<u8> {
    let len = u16::try_from(data.len()).unwrap();
    let mut b = vec![u8::from(last)]; // BFINAL, BTYPE 00, then padding to the byte
    b.extend(len.to_le_bytes());
    b.extend((!len).to_le_bytes());
    b.extend(data);
    b
}

/// Writes deflate's bit stream: values LSB first, Huffman codes MSB first.
#[derive(Default)]
struct Bits {
    out: Vec<u8>,
    used: u32,
}

impl Bits {
    fn value(&mut self, value: u32, bits: u32) {
        for i in 0..bits {
            if self.used % 8 == 0 {
                self.out.push(0);
            }
            let last = self.out.len() - 1;
            self.out[last] |= (((value >> i) & 1) as u8) << (self.used % 8);
            self.used += 1;
        }
    }

    fn code(&mut self, code: u32, bits: u32) {
        let reversed = code.reverse_bits() >> (32 - bits);
        self.value(reversed, bits);
    }

    /// A symbol of the fixed literal/length code (RFC 1951 3.2.6).
    fn fixed_litlen(&mut self, sym: u32) {
        match sym {
            0..=143 => self.code(0x30 + sym, 8),
            144..=255 => self.code(0x190 + sym - 144, 9),
            256..=279 => self.code(sym - 256, 7),
            _ => self.code(0xc0 + sym - 280, 8),
        }
    }
}

/// One fixed-Huffman block filling the cluster with `a`: a literal, a match of length symbol
/// `first_len_sym` at distance 1, then matches of 258 and 3 at distance 1. With symbol 285 the
/// stream is valid; 286 is reserved (zlib refuses it, libdeflate reads it as 258).
fn fixed_block_of_a(first_len_sym: u32) -> Vec<u8> {
    let mut b = Bits::default();
    b.value(1, 1); // BFINAL
    b.value(1, 2); // BTYPE 01: fixed Huffman codes
    b.fixed_litlen(u32::from(b'a'));
    let mut left = CLUSTER - 1;
    let mut first = true;
    while left > 0 {
        let (sym, len) = if first {
            (first_len_sym, 258)
        } else if left >= 258 + 3 || left == 258 {
            (285, 258)
        } else {
            (257, 3) // 65535 = 254 * 258 + 3
        };
        first = false;
        b.fixed_litlen(sym);
        b.code(0, 5); // distance symbol 0: distance 1
        left -= len;
    }
    b.fixed_litlen(256); // end of block
    b.out
}

fn deflate_raw(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

#[test]
fn zlib_stream_corners_read_as_qemu_reads_them() {
    let Some(qemu) = Qemu::find_or_skip("zlib_stream_corners_read_as_qemu_reads_them") else {
        return;
    };
    let tmp = TempDir::new("zlib-corners");
    let dir = tmp.path();
    let base = base_image(&qemu, dir, "zlib");
    let data = guest_data();
    let (half1, half2) = data[..CLUSTER].split_at(CLUSTER / 2);
    let full = [stored(false, half1), stored(false, half2)].concat();
    let exact = [stored(false, half1), stored(true, half2)].concat();
    // Data repeating every 10000 bytes: distances beyond QEMU's 4 KiB window (windowBits -12).
    let far: Vec<u8> = (0..CLUSTER).map(|i| data[i % 10_000]).collect();
    let mut bad_len = stored(false, b"xyz");
    bad_len[3] ^= 1; // NLEN no longer the complement of LEN
    use Verdict::*;
    let cases = vec![
        ("exact", Reads, exact.clone()),
        (
            "exact-then-garbage",
            Reads,
            [&exact[..], &[0xa5; 700]].concat(),
        ),
        (
            "stream-longer-than-a-cluster",
            Reads,
            [
                stored(false, half1),
                stored(true, &data[CLUSTER / 2..CLUSTER + 1000]),
            ]
            .concat(),
        ),
        (
            "stream-one-byte-short",
            Refuses,
            [stored(false, half1), stored(true, &half2[1..])].concat(),
        ),
        // The cluster is full: zlib still reads the next block header (and refuses a bad one)
        // but stops before writing.
        (
            "full-then-more-blocks",
            Reads,
            [&full[..], &stored(true, b"more")].concat(),
        ),
        (
            "full-then-block-type-3",
            Refuses,
            [&full[..], &[0x07][..]].concat(),
        ),
        (
            "full-then-bad-stored-length",
            Refuses,
            [&full[..], &bad_len].concat(),
        ),
        ("full-then-zero-padding", Refuses, full.clone()),
        ("distances-beyond-4-kib", Reads, deflate_raw(&far)),
        ("fixed-huffman-block", Reads, fixed_block_of_a(285)),
        ("garbage", Refuses, vec![0x5a; 3000]),
    ];
    check_cases(&qemu, dir, &base, cases);
}

/// The one known difference: libdeflate, which the crate uses for speed, reads a length symbol
/// that deflate reserves (286) where zlib, and so QEMU, refuses the stream. No encoder writes
/// it; if this test fails, the difference is gone (or another decoder is in use).
#[test]
fn reserved_deflate_symbols_are_the_known_difference() {
    let Some(qemu) = Qemu::find_or_skip("reserved_deflate_symbols_are_the_known_difference") else {
        return;
    };
    let tmp = TempDir::new("zlib-reserved");
    let dir = tmp.path();
    let base = base_image(&qemu, dir, "zlib");
    let image = with_cluster0(dir, &base, "symbol-286", &fixed_block_of_a(286));
    assert!(
        qemu_reads(&qemu, dir, &image).is_err(),
        "QEMU reads symbol 286"
    );
    assert_eq!(crate_reads(dir, &image), Ok(vec![b'a'; CLUSTER]));
}

fn zstd_frame(data: &[u8], content_size: bool) -> Vec<u8> {
    use std::io::Write;
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    enc.include_contentsize(content_size).unwrap();
    if content_size {
        enc.set_pledged_src_size(Some(data.len() as u64)).unwrap();
    }
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

#[test]
fn zstd_stream_corners_read_as_qemu_reads_them() {
    let Some(qemu) = Qemu::find_or_skip("zstd_stream_corners_read_as_qemu_reads_them") else {
        return;
    };
    let tmp = TempDir::new("zstd-corners");
    let dir = tmp.path();
    let base = base_image(&qemu, dir, "zstd");
    let data = guest_data();
    let cluster = &data[..CLUSTER];
    let one = zstd_frame(cluster, true);
    // spec (RFC 8878 3.1.2): magic 0x184D2A5?, 4-byte length, then that many bytes.
    let skippable = [
        &0x184d_2a50u32.to_le_bytes()[..],
        &3u32.to_le_bytes(),
        b"abc",
    ]
    .concat();
    use Verdict::*;
    let cases = vec![
        ("one-frame", Reads, one.clone()),
        (
            "one-frame-no-content-size",
            Reads,
            zstd_frame(cluster, false),
        ),
        (
            "one-frame-then-garbage",
            Reads,
            [&one[..], &[0xa5; 700]].concat(),
        ),
        (
            "three-frames",
            Reads,
            [
                zstd_frame(&cluster[..1000], true),
                zstd_frame(&cluster[1000..40_000], false),
                zstd_frame(&cluster[40_000..], true),
            ]
            .concat(),
        ),
        (
            "skippable-then-frame",
            Reads,
            [&skippable[..], &one].concat(),
        ),
        (
            "frame-longer-than-a-cluster",
            Refuses,
            zstd_frame(&data[..CLUSTER + 10], true),
        ),
        (
            "frame-longer-no-content-size",
            Refuses,
            zstd_frame(&data[..CLUSTER + 10], false),
        ),
        (
            "frame-one-byte-short",
            Refuses,
            zstd_frame(&cluster[1..], true),
        ),
        ("garbage", Refuses, vec![0x5a; 3000]),
    ];
    check_cases(&qemu, dir, &base, cases);
}
