//! The `qcow2` command's manners, as `qemu-img`'s: usage errors exit with status 1; sizes
//! and offsets in every form `qemu-img` reads, refused with its messages; a reader that
//! leaves the pipe (`| head -c1`) ends the command quietly; open failures in qemu-img's one
//! format, `qcow2: Could not open 'X': ...`.

use crate::common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{Qemu, TempDir};

fn qcow2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qcow2"))
        .args(args)
        .output()
        .expect("running the qcow2 binary")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

#[test]
fn usage_errors_exit_with_status_1() {
    for args in [
        &["info"][..],
        &["frobnicate"][..],
        &[][..],
        &["check", "--bogus", "x.qcow2"][..],
        &["map", "--output=xml", "x.qcow2"][..],
        &["info", "-f", "raw", "x.qcow2"][..],
        &["convert", "-m", "99", "x.qcow2", "-"][..],
    ] {
        let out = qcow2(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            !stderr.is_empty() && !stderr.contains("panicked"),
            "{args:?}"
        );
    }
    for args in [&["--help"][..], &["--version"][..], &["map", "--help"][..]] {
        let out = qcow2(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(!out.stdout.is_empty(), "{args:?}");
    }
}

/// Inputs for sizes and offsets, with qemu-img's verdicts on each.
const SIZES: &[&str] = &[
    "0",
    "1",
    "4096",
    "512",
    "4k",
    "4K",
    "1.5k",
    "1.k",
    ".5k",
    "+.5k",
    " 4k",
    "\t4k",
    "+4k",
    "00001k",
    "0.5k",
    "0.0007k",
    "1.00000000001k",
    ".9999999999999999999999k",
    "1.5e",
    "1.5E",
    "1e",
    "1E",
    "0.5E",
    "7.99E",
    "1.5M",
    "16M",
    "17M",
    "1b",
    "1B",
    "1.0",
    "1.0k",
    "0x1000",
    "0X1000",
    "0x10",
    " 0x10",
    "+0x10",
    "0x7fffffffffffffff",
    "9223372036854775807",
    "8191.99999999999999P",
    "0.00000000000000000001k",
    "0.9999999999999999999999",
    // Refused as not sizes.
    "",
    "abc",
    "x",
    "4k ",
    "4kb",
    "5kk",
    "1k5",
    "1e3",
    "1.5",
    "1.5b",
    "0.5",
    "0.1b",
    ".5",
    "1.1",
    "1..5k",
    "1.-5k",
    "5.5.5k",
    "1,5k",
    "0x",
    "0xg",
    "0x1000k",
    "0x1.5",
    "0x+10",
    "00x10",
    "0x0x10",
    "0x1000 ",
    "-4k",
    "-.5k",
    " -.5k",
    "-0x10",
    "inf",
    "nan",
    "0b1",
    "0.00000000000000000001",
    "99999999999999999999k",
    ".",
    "-",
    "+",
    // Refused as out of range.
    "-0",
    "-5",
    "-1",
    "8E",
    "16E",
    "15.999999999E",
    "7.9999999999999999999E",
    "0x8000000000000000",
    "0x10000000000000000",
    "9223372036854775808",
    "18446744073709551615",
    "99999999999999999999",
    "18446744073709551615k",
];

/// `qemu-img ARGS` and `qcow2 ARGS`: the same exit status, stdout and stderr (each
/// `qemu-img:` prefix read as `qcow2:`), or the difference.
fn same_as_qemu_img(qemu: &Qemu, theirs: &[&str], ours: &[&str]) -> Option<String> {
    let t = Command::new(&qemu.img).args(theirs).output().unwrap();
    let o = qcow2(ours);
    let t_err = String::from_utf8_lossy(&t.stderr).replace("qemu-img: ", "qcow2: ");
    let o_err = String::from_utf8_lossy(&o.stderr).into_owned();
    (t.status.code() != o.status.code() || t.stdout != o.stdout || t_err != o_err).then(|| {
        format!(
            "{ours:?}: qemu-img {} {:?} {t_err:?}, qcow2 {} {:?} {o_err:?}",
            t.status,
            String::from_utf8_lossy(&t.stdout),
            o.status,
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

#[test]
fn sizes_and_offsets_read_as_qemu_img_reads_them() {
    let Some(qemu) = Qemu::find_or_skip("sizes_and_offsets_read_as_qemu_img_reads_them") else {
        return;
    };
    let dir = TempDir::new("cli-sizes");
    let image = dir.join("a.qcow2");
    let image = path_str(&image);
    qemu.img(dir.path(), &["create", "-q", "-f", "qcow2", image, "1M"]);
    qemu.io(dir.path(), "qcow2", image, &["write -P 7 64k 64k"]);
    let mut differences = Vec::new();
    for size in SIZES {
        let start = format!("--start-offset={size}");
        let json = ["map", "--output=json", "-s", size, image];
        let runs: [(Vec<&str>, Vec<&str>); 3] = [
            (
                vec!["map", "--output=json", &start, image],
                vec!["map", "--output=json", &start, image],
            ),
            (json.to_vec(), json.to_vec()),
            (
                vec!["map", "--output=json", "--max-length", size, image],
                vec!["map", "--output=json", "--max-length", size, image],
            ),
        ];
        for (theirs, ours) in &runs {
            differences.extend(same_as_qemu_img(&qemu, theirs, ours));
        }
    }
    // -S of convert: the same reading, then qemu-img's own bounds (multiples of 512 up to
    // 16 MiB). The outputs are compared too.
    for size in SIZES {
        let (t_out, o_out) = (dir.join("t.raw"), dir.join("o.raw"));
        let (t_out, o_out) = (path_str(&t_out), path_str(&o_out));
        let theirs = ["convert", "-S", size, "-O", "raw", image, t_out];
        let ours = ["convert", "-S", size, image, o_out];
        differences.extend(same_as_qemu_img(&qemu, &theirs, &ours));
        let read = |p: &str| std::fs::read(p).ok();
        if read(t_out) != read(o_out) {
            differences.push(format!("convert -S {size:?}: outputs differ"));
        }
        let _ = std::fs::remove_file(t_out);
        let _ = std::fs::remove_file(o_out);
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

/// Run `qcow2 ARGS` with stdout a pipe read for one byte, then closed (`| head -c1`). With
/// `merged`, stderr is that pipe too (`2>&1 | head -c1`). Returns the exit status and
/// stderr (empty when merged).
fn head_c1(args: &[&str], merged: bool) -> (Option<i32>, String) {
    let mut cmd = if merged {
        let mut sh = Command::new("sh");
        sh.arg("-c")
            .arg("exec \"$0\" \"$@\" 2>&1")
            .arg(env!("CARGO_BIN_EXE_qcow2"))
            .args(args);
        sh
    } else {
        let mut c = Command::new(env!("CARGO_BIN_EXE_qcow2"));
        c.args(args);
        c
    };
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(if merged {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut byte = [0u8; 1];
    stdout.read_exact(&mut byte).unwrap();
    drop(stdout);
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut stderr).unwrap();
    }
    (child.wait().unwrap().code(), stderr)
}

#[test]
fn a_reader_that_leaves_the_pipe_ends_the_command_quietly() {
    let Some(qemu) = Qemu::find_or_skip("a_reader_that_leaves_the_pipe_ends_the_command_quietly")
    else {
        return;
    };
    let dir = TempDir::new("cli-pipe");
    let image = dir.join("big.qcow2");
    let image = path_str(&image);
    // 64 MiB of guest disk, and a map of 1024 extents (far more than a pipe holds).
    qemu.img(dir.path(), &["create", "-q", "-f", "qcow2", image, "64M"]);
    let writes: Vec<String> = (0..512)
        .map(|i| format!("write -P 1 {}k 64k", i * 128))
        .collect();
    qemu.io(dir.path(), "qcow2", image, &writes);
    for args in [
        &["convert", image, "-"][..],
        &["map", image][..],
        &["map", "--output=json", image][..],
    ] {
        for merged in [false, true] {
            let (code, stderr) = head_c1(args, merged);
            assert_eq!(
                code,
                Some(0),
                "{args:?} (stderr merged: {merged}): {stderr}"
            );
            assert_eq!(stderr, "", "{args:?}");
        }
    }
}

#[test]
fn open_failures_read_as_qemu_img_s() {
    let Some(qemu) = Qemu::find_or_skip("open_failures_read_as_qemu_img_s") else {
        return;
    };
    let dir = TempDir::new("cli-open");
    let missing = dir.join("missing.qcow2");
    let missing = path_str(&missing);
    let not_qcow2 = dir.join("text");
    std::fs::write(&not_qcow2, b"hello, world\n").unwrap();
    let not_qcow2 = path_str(&not_qcow2);
    let out = dir.join("out.raw");
    let out = path_str(&out);
    let prefix = |file: &str| format!("Could not open '{file}': ");
    for file in [missing, not_qcow2] {
        let runs: Vec<(Vec<&str>, Vec<&str>)> = vec![
            (vec!["info", file], vec!["info", "-f", "qcow2", file]),
            (
                vec!["info", "--backing-chain", file],
                vec!["info", "--backing-chain", "-f", "qcow2", file],
            ),
            (
                vec!["snapshot", "-l", file],
                vec!["snapshot", "-l", "-f", "qcow2", file],
            ),
            (vec!["map", file], vec!["map", "-f", "qcow2", file]),
            (
                vec!["check", "-f", "qcow2", file],
                vec!["check", "-f", "qcow2", file],
            ),
            (
                vec!["convert", "-f", "qcow2", file, out],
                vec!["convert", "-f", "qcow2", "-O", "raw", file, out],
            ),
            (
                vec!["bitmap", "--dump", "b", file],
                vec!["info", "-f", "qcow2", file],
            ),
        ];
        for (ours, theirs) in runs {
            let o = qcow2(&ours);
            let t = Command::new(&qemu.img).args(&theirs).output().unwrap();
            let (o_err, t_err) = (
                String::from_utf8_lossy(&o.stderr),
                String::from_utf8_lossy(&t.stderr),
            );
            assert_eq!(o.status.code(), Some(1), "{ours:?}: {o_err}");
            assert_eq!(o_err.lines().count(), 1, "{ours:?}: {o_err:?}");
            assert!(
                o_err.starts_with(&format!("qcow2: {}", prefix(file))),
                "{ours:?}: {o_err:?}"
            );
            assert!(
                t_err.starts_with(&format!("qemu-img: {}", prefix(file))),
                "{theirs:?}: {t_err:?}"
            );
        }
    }
}

/// The percentages of qemu-img's `-p` records (`    (x.xx/100%)\r`... then `\n`), or why
/// `text` is not made of them.
fn progress_records(text: &[u8]) -> Result<Vec<f64>, String> {
    let text = std::str::from_utf8(text).map_err(|e| e.to_string())?;
    let body = text.strip_suffix('\n').ok_or("no final newline")?;
    let body = body.strip_suffix('\r').ok_or("no final \\r")?;
    body.split('\r')
        .map(|r| {
            let pct = r
                .strip_prefix("    (")
                .and_then(|r| r.strip_suffix("/100%)"))
                .ok_or(format!("not a record: {r:?}"))?;
            let (whole, frac) = pct.split_once('.').ok_or(format!("{r:?}"))?;
            if frac.len() != 2 || whole.is_empty() {
                return Err(format!("not %3.2f: {r:?}"));
            }
            pct.parse::<f64>().map_err(|e| format!("{r:?}: {e}"))
        })
        .collect()
}

#[test]
fn progress_without_a_terminal_is_qemu_img_s() {
    let Some(qemu) = Qemu::find_or_skip("progress_without_a_terminal_is_qemu_img_s") else {
        return;
    };
    let dir = TempDir::new("cli-progress");
    let image = dir.join("p.qcow2");
    let image = path_str(&image);
    qemu.img(dir.path(), &["create", "-q", "-f", "qcow2", image, "64M"]);
    let writes: Vec<String> = (0..64).map(|i| format!("write -P 3 {}M 512k", i)).collect();
    qemu.io(dir.path(), "qcow2", image, &writes);
    let out = dir.join("out.raw");
    let out = path_str(&out);
    // qemu-img prints its records on stdout, whatever stderr is.
    let theirs = Command::new(&qemu.img)
        .args(["convert", "-p", "-O", "raw", image, out])
        .output()
        .unwrap();
    assert!(theirs.status.success());
    let t = progress_records(&theirs.stdout).unwrap();
    let ours = qcow2(&["convert", "-p", image, out]);
    assert!(
        ours.status.success(),
        "{}",
        String::from_utf8_lossy(&ours.stderr)
    );
    assert!(ours.stderr.is_empty());
    let o = progress_records(&ours.stdout).unwrap();
    assert_eq!((o[0], o[o.len() - 1]), (t[0], t[t.len() - 1]), "{o:?}");
    assert!(o.len() > 10, "{o:?}");
    assert!(o.windows(2).all(|w| w[0] < w[1]), "{o:?}");
    // With the disk on stdout, the records go to stderr; the disk is unchanged.
    let piped = qcow2(&["convert", "-p", image, "-"]);
    assert!(piped.status.success());
    assert!(piped.stdout == std::fs::read(out).unwrap());
    let p = progress_records(&piped.stderr).unwrap();
    assert_eq!((p[0], p[p.len() - 1]), (0.0, 100.0), "{p:?}");
    // -q wins.
    let quiet = qcow2(&["convert", "-q", "-p", image, out]);
    assert!(quiet.status.success() && quiet.stdout.is_empty() && quiet.stderr.is_empty());
}
