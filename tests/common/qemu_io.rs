//! qemu-io command scripts made from a seed, and running one script through `qemu-io` and
//! through `qcow2 io` to compare what they print.
//!
//! [`ScriptGen`] keeps a model of the guest (what every byte reads) so that its reads check
//! what they must see: `read -P` over a stretch of one byte,
//! `read -P -s -l` over the first run of a mixed stretch, `read -v` (a hex dump both tools
//! print) over short ones. Offsets and lengths are aligned and not, small and large, near
//! cluster and L2 table boundaries and over what was written before; writes, zero writes
//! with and without `-u`, discards, flushes and `alloc` come in between. The model follows QEMU's
//! qcow2 driver: zero writes read as zeros; a discard makes the whole clusters of its range
//! read as zeros and leaves the partial clusters at its ends alone, except in a version 2
//! image over a backing file, where QEMU does not discard at all (it could not hide the
//! backing file's data).

use std::path::Path;
use std::process::Command;

use super::Rng;

/// The shape of the image a script runs on.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// Guest size in bytes (a multiple of the cluster size).
    pub size: u64,
    /// Cluster size in bytes.
    pub cluster: u64,
    /// Guest bytes one L2 table maps (`cluster / 8 * cluster`, half that with extended L2).
    pub l2_span: u64,
    /// Whether discards do nothing (a version 2 image over a backing file).
    pub discard_ignored: bool,
}

impl Geometry {
    /// An image of `size` bytes with `cluster`-byte clusters and 8-byte L2 entries, whose
    /// discards take effect.
    pub fn new(size: u64, cluster: u64) -> Geometry {
        Geometry {
            size,
            cluster,
            l2_span: cluster / 8 * cluster,
            discard_ignored: false,
        }
    }
}

/// Makes the commands of a script, one at a time, following each in its model of the guest.
#[derive(Debug)]
pub struct ScriptGen {
    rng: Rng,
    geo: Geometry,
    /// What each guest byte reads now.
    guest: Vec<u8>,
    /// Ranges written lately, where reads and later writes like to land.
    recent: Vec<(u64, u64)>,
}

impl ScriptGen {
    /// A generator for a guest that reads `initial` now (`geo.size` bytes).
    pub fn new(seed: u64, geo: Geometry, initial: &[u8]) -> ScriptGen {
        assert_eq!(initial.len() as u64, geo.size, "initial guest");
        ScriptGen {
            rng: Rng::new(seed),
            geo,
            guest: initial.to_vec(),
            recent: Vec::new(),
        }
    }

    /// `count` commands, then `map` and `info` (what the image holds, as both tools see it).
    pub fn script(&mut self, count: usize) -> Vec<String> {
        let mut commands: Vec<String> = (0..count).map(|_| self.next_command()).collect();
        commands.push("map".to_owned());
        commands.push("info".to_owned());
        commands
    }

    /// One command, its effect applied to the model.
    pub fn next_command(&mut self) -> String {
        let quiet = if self.rng.below(20) == 0 { "-q " } else { "" };
        match self.rng.below(100) {
            0..=34 => {
                let (off, len) = self.range();
                let byte = 1 + self.rng.below(255) as u8;
                self.fill(off, len, byte);
                self.recent_push(off, len);
                // Both spellings of a pattern byte qemu-io takes.
                if self.rng.below(2) == 0 {
                    format!("write {quiet}-P {byte:#04x} {off} {len}")
                } else {
                    format!("write {quiet}-P {byte} {off} {len}")
                }
            }
            35..=44 => {
                let (off, len) = self.range();
                self.fill(off, len, 0);
                format!("write {quiet}-z {off} {len}")
            }
            45..=52 => {
                let (off, len) = self.range();
                self.fill(off, len, 0);
                format!("write {quiet}-z -u {off} {len}")
            }
            53..=60 => {
                let (off, len) = self.range();
                self.discard(off, len);
                format!("discard {quiet}{off} {len}")
            }
            61..=66 => "flush".to_owned(),
            67..=69 => {
                let (off, len) = self.range();
                format!("alloc {off} {len}")
            }
            _ => self.read(quiet),
        }
    }

    /// A read that checks what the model knows of its range.
    fn read(&mut self, quiet: &str) -> String {
        let (off, len) = if !self.recent.is_empty() && self.rng.below(2) == 0 {
            // Inside (or across the end of) something written lately.
            let (r_off, r_len) = self.recent[self.rng.below(self.recent.len() as u64) as usize];
            let start = r_off + self.rng.below(r_len);
            let len = 1 + self.rng.below(r_len + self.geo.cluster);
            (start, len.min(self.geo.size - start))
        } else {
            self.range()
        };
        // Some reads check nothing but that they succeed (qemu-io's plain `read`).
        let plain = self.rng.below(10) == 0;
        let seen = &self.guest[off as usize..(off + len) as usize];
        // Short reads are dumped (both tools print the bytes), some longer ones too.
        if quiet.is_empty() && (len <= 96 || (len <= 2048 && self.rng.below(8) == 0)) {
            return format!("read -v {off} {len}");
        }
        let first = seen[0];
        let run = seen.iter().take_while(|&&b| b == first).count() as u64;
        if plain {
            format!("read {quiet}{off} {len}")
        } else if run == len {
            format!("read {quiet}-P {first} {off} {len}")
        } else {
            format!("read {quiet}-P {first} -s 0 -l {run} {off} {len}")
        }
    }

    /// An offset and a length within the guest: aligned or not, near boundaries or not.
    fn range(&mut self) -> (u64, u64) {
        let Geometry {
            size,
            cluster,
            l2_span,
            ..
        } = self.geo;
        let near = |rng: &mut Rng, boundary: u64| {
            let k = rng.below((size / boundary).max(1));
            (k * boundary + rng.below(2048)).saturating_sub(1024)
        };
        let off = match self.rng.below(7) {
            0 | 1 => self.rng.below(size),
            2 => self.rng.below(size / 512) * 512,
            3 => self.rng.below(size / cluster) * cluster,
            4 => near(&mut self.rng, cluster),
            5 if l2_span < size => near(&mut self.rng, l2_span),
            _ if !self.recent.is_empty() => {
                self.recent[self.rng.below(self.recent.len() as u64) as usize].0
            }
            _ => self.rng.below(size),
        };
        let len = match self.rng.below(6) {
            0 => 1 + self.rng.below(600),
            1 => (1 + self.rng.below(16)) * 512,
            2 => (1 + self.rng.below(3)) * cluster,
            3 => 1 + self.rng.below(3 * cluster),
            4 => 1 + self.rng.below((size / 4).min(1 << 20)),
            _ => 1 + self.rng.below(cluster),
        };
        let off = off.min(size - 1);
        (off, len.min(size - off))
    }

    fn fill(&mut self, off: u64, len: u64, value: u8) {
        self.guest[off as usize..(off + len) as usize].fill(value);
    }

    /// QEMU's discard: the whole clusters of the range read as zeros.
    fn discard(&mut self, off: u64, len: u64) {
        let c = self.geo.cluster;
        let start = off.next_multiple_of(c);
        let end = (off + len) / c * c;
        if end > start && !self.geo.discard_ignored {
            self.guest[start as usize..end as usize].fill(0);
        }
    }

    fn recent_push(&mut self, off: u64, len: u64) {
        if self.recent.len() == 16 {
            self.recent.remove(0);
        }
        self.recent.push((off, len));
    }
}

/// What one run of `qemu-io` or `qcow2 io` printed, and how it ended.
#[derive(Debug, Clone)]
pub struct IoRun {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// The exit status (`None`: killed by a signal).
    pub status: Option<i32>,
}

impl IoRun {
    /// Standard output without the timing lines (`4 KiB, 1 ops; 00.00 sec (...)`), which
    /// differ from run to run.
    pub fn stdout_untimed(&self) -> String {
        self.stdout
            .lines()
            .filter(|l| !is_timing_line(l))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    /// The lines of `map` (`N (0x..) bytes     allocated at offset ...`).
    pub fn map_lines(&self) -> String {
        self.stdout
            .lines()
            .filter(|l| is_map_line(l))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    /// [`IoRun::stdout_untimed`] without the lines of `map`.
    pub fn stdout_unmapped(&self) -> String {
        self.stdout_untimed()
            .lines()
            .filter(|l| !is_map_line(l))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    /// Standard error with qemu-io's prefix spelled as `qcow2 io` spells it.
    pub fn stderr_normalised(&self) -> String {
        self.stderr
            .lines()
            .map(|l| match l.strip_prefix("qemu-io: ") {
                Some(rest) => format!("qcow2: {rest}\n"),
                None => format!("{l}\n"),
            })
            .collect()
    }
}

/// Whether `line` tells what the image itself holds: a line of qemu-io's `map`, or what
/// `alloc` prints.
pub fn is_map_line(line: &str) -> bool {
    line.contains(" bytes     allocated at offset ")
        || line.contains(" bytes not allocated at offset ")
        || line.contains(" bytes allocated at offset ")
}

/// The runs of qemu-io's `map` lines in `stdout`: `(offset, length, allocated)`, read from
/// the hexadecimal numbers each line carries.
pub fn map_runs(stdout: &str) -> Vec<(u64, u64, bool)> {
    let hex = |s: &str| u64::from_str_radix(s, 16).expect("a hexadecimal number in a map line");
    stdout
        .lines()
        .filter(|l| l.contains(" allocated at offset ") && l.ends_with(')'))
        .filter(|l| !l.contains('/'))
        .map(|l| {
            let numbers: Vec<&str> = l
                .split("(0x")
                .skip(1)
                .map(|part| part.split(')').next().unwrap_or_default())
                .collect();
            assert_eq!(numbers.len(), 2, "map line {l:?}");
            (
                hex(numbers[1]),
                hex(numbers[0]),
                l.contains("     allocated"),
            )
        })
        .collect()
}

/// The stretches where the allocation of two maps differs (both cover the same guest).
pub fn allocation_differences(a: &[(u64, u64, bool)], b: &[(u64, u64, bool)]) -> Vec<(u64, u64)> {
    let at = |runs: &[(u64, u64, bool)], pos: u64| {
        runs.iter()
            .find(|(off, len, _)| *off <= pos && pos < off + len)
            .map(|&(off, len, allocated)| (off + len, allocated))
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while let (Some((end_a, alloc_a)), Some((end_b, alloc_b))) = (at(a, pos), at(b, pos)) {
        let end = end_a.min(end_b);
        if alloc_a != alloc_b {
            match out.last_mut() {
                Some((off, len)) if *off + *len == pos => *len += end - pos,
                _ => out.push((pos, end - pos)),
            }
        }
        pos = end;
    }
    out
}

/// Whether `line` is the timing line qemu-io prints after a request.
pub fn is_timing_line(line: &str) -> bool {
    line.contains(" ops; ") && line.ends_with(" ops/sec)")
}

/// Run `PROGRAM [PREFIX...] ARGS... IMAGE -c CMD...` in `dir` (PREFIX is `io` for the
/// crate's command, nothing for `qemu-io`).
pub fn run_io(
    program: &Path,
    prefix: &[&str],
    dir: &Path,
    args: &[String],
    image: &str,
    commands: &[String],
) -> IoRun {
    let mut cmd = Command::new(program);
    cmd.current_dir(dir).args(prefix).args(args).arg(image);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    IoRun {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        status: out.status.code(),
    }
}

/// Assert that `ours` printed what `theirs` printed (timing lines aside, qemu-io's prefix
/// spelled as ours) and ended the same way; `what` names the case in the messages.
pub fn assert_same_output(what: &str, theirs: &IoRun, ours: &IoRun) {
    assert_same_lines(
        what,
        "stdout",
        &theirs.stdout_untimed(),
        &ours.stdout_untimed(),
        ours,
    );
    assert_eq!(
        ours.stderr_normalised(),
        theirs.stderr_normalised(),
        "{what}: stderr differs from qemu-io's"
    );
    assert_eq!(
        ours.status, theirs.status,
        "{what}: exit status differs from qemu-io's\nour stderr: {}",
        ours.stderr
    );
}

/// Assert that the texts `t` (qemu-io's) and `o` (ours) are equal, showing the lines
/// around the first difference.
pub fn assert_same_lines(what: &str, label: &str, t: &str, o: &str, ours: &IoRun) {
    if t != o {
        let at = t
            .lines()
            .zip(o.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| t.lines().count().min(o.lines().count()));
        let window = |s: &str| {
            s.lines()
                .skip(at.saturating_sub(3))
                .take(8)
                .collect::<Vec<_>>()
                .join("\n")
        };
        panic!(
            "{what}: {label} differs from qemu-io's at line {}\nqemu-io:\n{}\nqcow2 io:\n{}\nqcow2 io stderr:\n{}",
            at + 1,
            window(t),
            window(o),
            ours.stderr
        );
    }
}
