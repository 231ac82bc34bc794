//! Helpers shared by integration tests that drive QEMU's tools.
//!
//! Each test binary's `main.rs` declares it once (`#[path = "../common/mod.rs"] mod common;`)
//! and its modules `use crate::common;`. Not every module uses every helper, hence the
//! `dead_code` allowance below.
//!
//! * [`Qemu::find_or_skip`]: locate `qemu-img` and `qemu-io` (or `$QEMU_IMG` / `$QEMU_IO`).
//!   When they are missing the test FAILS if the environment says `CI=true`, and otherwise
//!   prints a loud `SKIPPED: qemu-img not found` to stderr and the caller returns. Never skip
//!   silently.
//! * [`Env`]: one test's QEMU tools and temp dir, with the `qemu-img` / `qemu-io` calls tests
//!   make on images in that dir (create, write, compress, convert, map, patch bytes).
//! * [`TempDir`]: a fresh directory under [`std::env::temp_dir`], removed on drop (kept when
//!   `QCOW2_KEEP_TEMP` is set, to inspect images after a failure).
//! * [`run`] / [`Qemu::img`] / [`Qemu::io`]: run a command, panicking with its command line,
//!   exit status, stdout and stderr when it fails.
//! * [`first_difference`], [`describe_difference`], [`sha256_hex`], [`is_all_zero`]: compare
//!   buffers and report the first differing offset instead of dumping megabytes.
//! * [`Rng`]: a tiny deterministic PRNG for test data and read offsets.
//! * [`read_full`]: read through a `ReadAt` until the buffer is full or the source ends.
#![allow(dead_code)]

pub mod qemu_io;

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use positioned_io::ReadAt;

pub mod crash_storage;
#[cfg(unix)]
pub mod nbd;

/// Whether we run under CI (`CI=true` or `CI=1`), where missing tools are a failure.
pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v.eq_ignore_ascii_case("true") || v == "1")
        .unwrap_or(false)
}

/// Find an executable: `$env_var` if set (must exist), else the first `name` on `$PATH`.
pub fn find_tool(name: &str, env_var: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Report a missing tool: panic under CI, else print a loud skip notice to stderr.
pub fn missing_tool(test: &str, tool: &str) {
    let msg = format!("SKIPPED: {tool} not found (test {test}); install QEMU's tools to run it");
    if in_ci() {
        panic!("{msg}; CI=true, so this is a failure");
    }
    // Write to the real stderr, not through `eprintln!`: the test harness captures that
    // for passing tests, which would make the skip silent.
    use std::io::Write;
    let bar = "!".repeat(72);
    let _ = writeln!(io::stderr(), "\n{bar}\n!!! {msg}\n{bar}\n");
}

/// Paths of QEMU's `qemu-img` and `qemu-io`.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// `qemu-img`.
    pub img: PathBuf,
    /// `qemu-io`.
    pub io: PathBuf,
}

impl Qemu {
    /// Both tools, or `None` after reporting the skip (panics instead under CI).
    ///
    /// ```ignore
    /// let Some(qemu) = common::Qemu::find_or_skip("my_test") else { return };
    /// ```
    pub fn find_or_skip(test: &str) -> Option<Qemu> {
        let Some(img) = find_tool("qemu-img", "QEMU_IMG") else {
            missing_tool(test, "qemu-img");
            return None;
        };
        let Some(io) = find_tool("qemu-io", "QEMU_IO") else {
            missing_tool(test, "qemu-io");
            return None;
        };
        Some(Qemu { img, io })
    }

    /// Run `qemu-img ARGS` in `dir`; panics on failure. Returns stdout.
    pub fn img<S: AsRef<OsStr>>(&self, dir: &Path, args: &[S]) -> Vec<u8> {
        let mut cmd = Command::new(&self.img);
        cmd.current_dir(dir).args(args);
        run(&mut cmd).stdout
    }

    /// Run `qemu-io -f FORMAT -c CMD... IMAGE` in `dir` (one open for all commands);
    /// panics on failure (qemu-io exits non-zero when a command fails).
    pub fn io<S: AsRef<str>>(&self, dir: &Path, format: &str, image: &str, cmds: &[S]) {
        let mut cmd = Command::new(&self.io);
        cmd.current_dir(dir).args(["-f", format]);
        for c in cmds {
            cmd.args(["-c", c.as_ref()]);
        }
        cmd.arg(image);
        run(&mut cmd);
    }

    /// Like [`Qemu::io`] but the last command is expected to kill qemu-io (`sigraise 9`),
    /// leaving the image as a crashed VM would: only the exit by signal is accepted.
    pub fn io_crash<S: AsRef<str>>(&self, dir: &Path, format: &str, image: &str, cmds: &[S]) {
        let mut cmd = Command::new(&self.io);
        cmd.current_dir(dir).args(["-f", format]);
        for c in cmds {
            cmd.args(["-c", c.as_ref()]);
        }
        cmd.args(["-c", "sigraise 9"]).arg(image);
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        assert!(
            out.status.code().is_none(),
            "{cmd:?} was expected to die by signal, exited with {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `qemu-img create -f qcow2 -b BACKING -F qcow2 TOP` in `dir`: an empty overlay of the
    /// backing image's size.
    pub fn create_overlay(&self, dir: &Path, backing: &str, top: &str) {
        let args = [
            "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", top,
        ];
        self.img(dir, &args);
    }

    /// `qemu-img convert [EXTRA...] -O raw IMAGE` into a file in `dir`, read back and removed.
    pub fn convert_to_raw<S: AsRef<OsStr>>(&self, dir: &Path, image: &str, extra: &[S]) -> Vec<u8> {
        let out = unique_name(dir, "convert", "raw");
        let mut cmd = Command::new(&self.img);
        cmd.current_dir(dir).arg("convert").args(extra);
        cmd.args(["-O", "raw"]).arg(image).arg(&out);
        run(&mut cmd);
        let data = std::fs::read(&out).unwrap_or_else(|e| panic!("reading {}: {e}", out.display()));
        let _ = std::fs::remove_file(&out);
        data
    }

    /// `qemu-img convert -q -c -f raw -O qcow2 [-o OPTS] RAW IMAGE` in `dir`: a compressed image
    /// of the raw file `raw` (`opts` empty: QEMU's defaults).
    pub fn compress(&self, dir: &Path, raw: &str, image: &str, opts: &str) {
        let mut args = vec!["convert", "-q", "-c", "-f", "raw", "-O", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([raw, image]);
        self.img(dir, &args);
    }

    /// `qemu-img map --output=json IMAGE` in `dir`, parsed: the list of extents.
    pub fn map_json(&self, dir: &Path, image: &str) -> serde_json::Value {
        let out = self.img(dir, &["map", "--output=json", image]);
        serde_json::from_slice(&out).expect("qemu-img map JSON")
    }

    /// `qemu-img info --output=json [--backing-chain] IMAGE`, parsed.
    pub fn info_json(&self, dir: &Path, image: &str, backing_chain: bool) -> serde_json::Value {
        let mut args = vec!["info", "--output=json"];
        if backing_chain {
            args.push("--backing-chain");
        }
        args.push(image);
        let out = self.img(dir, &args);
        serde_json::from_slice(&out).unwrap_or_else(|e| {
            panic!(
                "qemu-img info output is not JSON ({e}):\n{}",
                String::from_utf8_lossy(&out)
            )
        })
    }
}

/// One test's QEMU tools and temp dir; image names are relative to the dir (QEMU's tools run
/// in it).
#[derive(Debug)]
pub struct Env {
    /// `qemu-img` and `qemu-io`.
    pub qemu: Qemu,
    /// Where the test's images live, removed at the end.
    pub dir: TempDir,
}

impl Env {
    /// The tools and a fresh dir, or `None` after reporting the skip (panics instead under
    /// CI): `let Some(env) = Env::new("my_test") else { return };`.
    pub fn new(test: &str) -> Option<Env> {
        let qemu = Qemu::find_or_skip(test)?;
        Some(Env {
            qemu,
            dir: TempDir::new(test),
        })
    }

    /// `name` in the test's dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `qemu-img ARGS`; panics on failure. Returns stdout.
    pub fn img<S: AsRef<OsStr>>(&self, args: &[S]) -> Vec<u8> {
        self.qemu.img(self.dir.path(), args)
    }

    /// `qemu-io -f qcow2 -c CMD... IMAGE` (one open for all commands); panics on failure.
    pub fn io<S: AsRef<str>>(&self, image: &str, cmds: &[S]) {
        self.qemu.io(self.dir.path(), "qcow2", image, cmds);
    }

    /// `qemu-img create -q -f qcow2 [-o OPTS] NAME SIZE`.
    pub fn create(&self, name: &str, size: u64, opts: &str) {
        let size = size.to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([name, size.as_str()]);
        self.img(&args);
    }

    /// `qemu-img create -q -f qcow2 -b BACKING -F FMT [-o OPTS] NAME SIZE`.
    pub fn create_over(&self, name: &str, size: u64, opts: &str, backing: &str, fmt: &str) {
        let size = size.to_string();
        let mut args = vec!["create", "-q", "-f", "qcow2", "-b", backing, "-F", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([name, size.as_str()]);
        self.img(&args);
    }

    /// [`Qemu::compress`]: `qemu-img convert -q -c -f raw -O qcow2 [-o OPTS] RAW IMAGE`.
    pub fn compress(&self, raw: &str, image: &str, opts: &str) {
        self.qemu.compress(self.dir.path(), raw, image, opts);
    }

    /// [`Qemu::convert_to_raw`]: QEMU's bytes of `image` (`qemu-img convert [EXTRA] -O raw`);
    /// panics when qemu-img fails.
    pub fn convert(&self, image: &str, extra: &[&str]) -> Vec<u8> {
        self.qemu.convert_to_raw(self.dir.path(), image, extra)
    }

    /// `qemu-img convert -O raw IMAGE`: its bytes, or QEMU's error message.
    pub fn qemu_reads(&self, image: &str) -> Result<Vec<u8>, String> {
        let out = self.path("qemu-out.raw");
        let result = Command::new(&self.qemu.img)
            .current_dir(self.dir.path())
            .args(["convert", "-O", "raw", image])
            .arg(&out)
            .output()
            .expect("run qemu-img");
        if !result.status.success() {
            return Err(String::from_utf8_lossy(&result.stderr).into_owned());
        }
        let data = std::fs::read(&out).expect("read qemu-img output");
        let _ = std::fs::remove_file(&out);
        Ok(data)
    }

    /// How many `qemu-img map --output=json` extents of `image` have `key: true` (e.g.
    /// "compressed", "zero"): makes sure an image really has what a case is about.
    pub fn map_count(&self, image: &str, key: &str) -> usize {
        let map = self.qemu.map_json(self.dir.path(), image);
        map.as_array()
            .map(|a| a.iter().filter(|e| e[key] == true).count())
            .unwrap_or(0)
    }

    /// A copy of image `from` named `to`.
    pub fn copy(&self, from: &str, to: &str) {
        std::fs::copy(self.path(from), self.path(to)).expect("copy image");
    }

    /// The bytes of the file `image`.
    pub fn read_file(&self, image: &str) -> Vec<u8> {
        std::fs::read(self.path(image)).expect("read image")
    }

    /// Overwrite the file `image` at `at` with `bytes`.
    pub fn patch(&self, image: &str, at: u64, bytes: &[u8]) {
        let path = self.path(image);
        let mut data = std::fs::read(&path).expect("read image");
        data[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        std::fs::write(&path, data).expect("write image");
    }
}

/// Run a command to completion; panic with everything useful if it fails to start or exits
/// non-zero.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "command failed ({}): {cmd:?}\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{nanos}-{n}", std::process::id())
}

/// A path in `dir` that no other caller of this function gets.
pub fn unique_name(dir: &Path, stem: &str, ext: &str) -> PathBuf {
    dir.join(format!("{stem}-{}.{ext}", unique_suffix()))
}

/// A fresh temporary directory, removed (with its contents) on drop unless the environment
/// variable `QCOW2_KEEP_TEMP` is set.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Create `$TMPDIR/qcow2-TAG-<pid>-<nanos>-<n>`.
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("qcow2-{tag}-{}", unique_suffix()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `self.path().join(name)`.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("QCOW2_KEEP_TEMP").is_some() {
            eprintln!("keeping temp dir {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Whether files in `dir` can be sparse: a file extended to `size` bytes without writing
/// must allocate (almost) nothing. Used before asking QEMU for huge sparse raw outputs.
pub fn supports_sparse_files(dir: &Path, size: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    let probe = unique_name(dir, "sparse-probe", "raw");
    let ok = (|| -> io::Result<bool> {
        let f = std::fs::File::create(&probe)?;
        f.set_len(size)?;
        let meta = f.metadata()?;
        Ok(meta.len() == size && meta.blocks() * 512 < (1 << 20))
    })()
    .unwrap_or(false);
    let _ = std::fs::remove_file(&probe);
    ok
}

/// Offset of the first byte where `a` and `b` differ, or where the shorter one ends when
/// one is a prefix of the other; `None` when they are equal.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    // Compare in blocks first: fast even in debug builds.
    const BLOCK: usize = 4096;
    let common = a.len().min(b.len());
    let mut start = 0;
    while start < common {
        let end = (start + BLOCK).min(common);
        if a[start..end] != b[start..end] {
            return (start..end).find(|&i| a[i] != b[i]);
        }
        start = end;
    }
    (a.len() != b.len()).then_some(common)
}

/// `None` when equal; otherwise a one-paragraph description of the first difference
/// (absolute offset = `base` + index) with a few bytes of context from both sides.
pub fn describe_difference(label: &str, base: u64, ours: &[u8], theirs: &[u8]) -> Option<String> {
    let i = first_difference(ours, theirs)?;
    let ctx = |d: &[u8]| {
        let lo = i.min(d.len());
        let hi = (i + 16).min(d.len());
        d[lo..hi]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    Some(format!(
        "{label}: first difference at guest offset {} ({:#x}); ours [{}], qemu [{}] \
         (lengths {} vs {})",
        base + i as u64,
        base + i as u64,
        ctx(ours),
        ctx(theirs),
        ours.len(),
        theirs.len()
    ))
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether every byte is zero.
pub fn is_all_zero(data: &[u8]) -> bool {
    data.chunks(4096).all(|c| c.iter().all(|&b| b == 0))
}

/// Read at `pos` until `buf` is full or the source returns 0; returns the bytes read.
pub fn read_full(source: &impl ReadAt, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match source.read_at(pos + done as u64, &mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// A small deterministic PRNG (SplitMix64): reproducible test data and offsets.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fill with random (incompressible) bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
    }

    /// Fill with compressible text made of a small vocabulary.
    pub fn fill_text(&mut self, buf: &mut [u8]) {
        const WORDS: &[&str] = &[
            "qcow2",
            "cluster",
            "refcount",
            "table",
            "header",
            "snapshot",
            "backing",
            "image",
            "sector",
            "offset",
            "guest",
            "host",
            "zero",
            "compressed",
            "zlib",
            "zstd",
            "the",
            "a",
            "of",
            "to",
            "and",
            "l1",
            "l2",
            "subcluster",
            "data",
            "file",
            "raw",
        ];
        let mut i = 0;
        while i < buf.len() {
            let r = self.next_u64();
            let word = WORDS[(r % WORDS.len() as u64) as usize].as_bytes();
            let sep = if r >> 60 == 0 { b'\n' } else { b' ' };
            for &b in word.iter().chain(std::iter::once(&sep)) {
                if i == buf.len() {
                    break;
                }
                buf[i] = b;
                i += 1;
            }
        }
    }
}

/// The committed fixtures directory.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A committed fixture: `fixtures/NAME` (NAME may hold a subdirectory).
pub fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// The images listed in `fixtures/manifest.tsv` (snapshot lines `IMAGE@SNAP` left out).
pub fn fixture_images() -> Vec<String> {
    let manifest = std::fs::read_to_string(fixtures_dir().join("manifest.tsv"))
        .unwrap_or_else(|e| panic!("reading fixtures/manifest.tsv: {e}"));
    manifest
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split('\t').next())
        .filter(|n| !n.is_empty() && !n.contains('@'))
        .map(str::to_owned)
        .collect()
}
