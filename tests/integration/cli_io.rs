//! `qcow2 io` against `qemu-io`: the same arguments print the same lines (timing lines
//! aside; qemu-io's `qemu-io: ` prefix is `qcow2: ` here) and end with the same status, for
//! the commands' errors (missing file, read-only file, unknown command, bad options and
//! counts, writes past the end, bad patterns), for `-r` on every committed fixture, and for
//! commands read from stdin; `truncate` growing and shrinking.

use crate::common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::qemu_io::{assert_same_output, is_timing_line, run_io, IoRun};
use common::{Env, Qemu};

const BIN: &str = env!("CARGO_BIN_EXE_qcow2");

/// Run `args` (options and the image) with `commands` through both tools in `dir`, assert
/// the same output and status, and return ours.
fn same(qemu: &Qemu, dir: &Path, args: &[&str], image: &str, commands: &[&str]) -> IoRun {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let commands: Vec<String> = commands.iter().map(|c| c.to_string()).collect();
    let theirs = run_io(&qemu.io, &[], dir, &args, image, &commands);
    let ours = run_io(Path::new(BIN), &["io"], dir, &args, image, &commands);
    let what = format!("{args:?} {image} {commands:?}");
    assert_same_output(&what, &theirs, &ours);
    ours
}

#[test]
fn errors_and_statuses_match_qemu_io() {
    let Some(env) = Env::new("cli_io::errors_and_statuses") else {
        return;
    };
    let dir = env.dir.path();
    let q = &env.qemu;
    env.create("a.qcow2", 1 << 20, "");
    let f = ["-f", "qcow2"];
    // A missing file; a file that is not qcow2 with -f qcow2.
    same(q, dir, &f, "missing.qcow2", &["read 0 1"]);
    std::fs::write(env.path("raw.img"), [0u8; 4096]).unwrap();
    same(q, dir, &f, "raw.img", &["read 0 1"]);
    // Unknown commands, counts, options, sizes and patterns: each fails, the next still runs.
    let commands = [
        "foo",
        "read 0",
        "read 0 1 2",
        "flush now",
        "map x",
        "read -x 0 1",
        "read 0 1 -P",
        "read -l 1 0 1",
        "read -P 0 -s 2 0 1",
        "read 0 x",
        "read 0 1k1",
        "read 99999999999999999999 1",
        "read 0 3G",
        "read -P 0x100 0 1",
        "read -P ab 0 1",
        "read -P -1 0 1",
        "read -1 1",
        "write -u 0 1",
        "write -n 0 1",
        "write -z -P 1 0 1",
        "write -f -c 0 512",
        "write -z 0 3G",
        "discard 0 3G",
        "discard -x 0 1",
        "write",
        "",
        "read 0 1",
    ];
    same(q, dir, &f, "a.qcow2", &commands);
    // Past the end, at the end and across it.
    let commands = [
        "write 1M 512",
        "write 1048575 2",
        "write -z 1M 1",
        "write -z 1M 0",
        "discard 1M 1",
        "discard 2M 0",
        "read 1M 0",
        "read 1048575 1",
        "read 1048575 2",
        "read 2M 0",
        "write 0 0",
        "read 1048575 1",
    ];
    same(q, dir, &f, "a.qcow2", &commands);
    // Pattern verification: failures are reported with the range checked, and fail.
    let commands = [
        "write -P 0xab 0 4k",
        "read -P 0xab 0 4k",
        "read -P 0xac 0 4k",
        "read -P 0xab -s 100 -l 10 0 4k",
        "read -P 0 -s 4095 -l 1 1 4k",
        "read -P 171 4k 1",
        "read -P 0253 0 1",
        "read -q -P 1 0 1",
        "write -q -P 1 0 1",
        "read -v 4090 40",
        "read -v 0 0",
    ];
    same(q, dir, &f, "a.qcow2", &commands);
    // Read-only: writes are refused before their arguments are read, reads still work.
    let commands = [
        "write 0 1",
        "write -x",
        "discard 0 64k",
        "write -z 0 1",
        "truncate 1M",
        "flush",
        "read -P 1 0 1",
    ];
    same(q, dir, &["-r", "-f", "qcow2"], "a.qcow2", &commands);
    // Modes: bad ones refused before the image is opened; discards ignored with -d ignore.
    same(
        q,
        dir,
        &["-d", "foo", "-f", "qcow2"],
        "a.qcow2",
        &["read 0 1"],
    );
    same(
        q,
        dir,
        &["-t", "foo", "-f", "qcow2"],
        "a.qcow2",
        &["read 0 1"],
    );
    let commands = [
        "write -P 9 64k 64k",
        "discard 64k 64k",
        "read -P 9 64k 64k",
        "write -z -u 64k 64k",
        "map",
    ];
    let args = ["-d", "ignore", "-t", "writethrough", "-f", "qcow2"];
    same(q, dir, &args, "a.qcow2", &commands);
    // A pattern file (`-s`): repeated, empty, missing, or given no byte to read.
    std::fs::write(env.path("abc.bin"), b"abc").unwrap();
    std::fs::write(env.path("empty.bin"), b"").unwrap();
    let commands = [
        "write -s abc.bin 0 10",
        "read -v 0 10",
        "write -s empty.bin 0 1",
        "write -s missing.bin 0 1",
        "write -s abc.bin 0 0",
        "write -s abc.bin -P 1 0 1",
    ];
    same(q, dir, &f, "a.qcow2", &commands);
    // All well: status 0.
    let ours = same(
        q,
        dir,
        &f,
        "a.qcow2",
        &["write -P 7 1k 1k", "flush", "length"],
    );
    assert_eq!(ours.status, Some(0));
}

#[test]
fn a_read_only_file_is_refused_as_qemu_io_refuses_it() {
    let Some(env) = Env::new("cli_io::read_only_file") else {
        return;
    };
    env.create("ro.qcow2", 1 << 20, "");
    let path = env.path("ro.qcow2");
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&path, perms).unwrap();
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !root {
        same(
            &env.qemu,
            env.dir.path(),
            &["-f", "qcow2"],
            "ro.qcow2",
            &["read 0 1"],
        );
        same(
            &env.qemu,
            env.dir.path(),
            &["-r"],
            "ro.qcow2",
            &["read 0 1", "write 0 1"],
        );
        return;
    }
    // Root writes read-only files: run both tools as nobody, where setpriv can.
    let nobody = |program: &Path, prefix: &[&str], args: &[&str]| {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(program)
            .args(prefix)
            .args(args)
            .current_dir(env.dir.path())
            .output();
        out.ok().map(|o| IoRun {
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            status: o.status.code(),
        })
    };
    // The temp dir and the binary must be reachable by nobody.
    let _ = std::fs::set_permissions(
        env.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    );
    for args in [
        &["-f", "qcow2", "ro.qcow2", "-c", "read 0 1"][..],
        &["-r", "ro.qcow2", "-c", "read 0 1", "-c", "write 0 1"][..],
    ] {
        let theirs = nobody(&env.qemu.io, &[], args);
        let ours = nobody(Path::new(BIN), &["io"], args);
        match (theirs, ours) {
            // setpriv itself could not run a tool (not installed, or nobody may not run it).
            (Some(t), Some(o))
                if t.stderr.starts_with("setpriv:") || o.stderr.starts_with("setpriv:") =>
            {
                eprintln!(
                    "SKIPPED: setpriv cannot run the tools as nobody: {}{}",
                    t.stderr, o.stderr
                );
                return;
            }
            (Some(theirs), Some(ours)) => {
                assert_same_output(&format!("as nobody: {args:?}"), &theirs, &ours);
            }
            _ => {
                eprintln!("SKIPPED: cannot run the tools as nobody (setpriv)");
                return;
            }
        }
    }
}

#[test]
fn read_only_runs_match_qemu_io_on_every_fixture() {
    let Some(qemu) = Qemu::find_or_skip("cli_io::fixtures") else {
        return;
    };
    let dir = common::fixtures_dir();
    let commands = [
        "map",
        "info",
        "length",
        "read -v 0 40",
        "read -v 4090 20",
        "alloc 0 64k",
        "alloc 1 1",
        "read 4096 8k",
    ];
    let mut compared = 0;
    for image in common::fixture_images() {
        // Encrypted fixtures: refused without their secret, read with it.
        same(&qemu, &dir, &["-r", "-f", "qcow2"], &image, &commands);
        if cfg!(feature = "encryption") && (image == "luks.qcow2" || image == "aes.qcow2") {
            let opts = format!("driver=qcow2,file.filename={image},encrypt.key-secret=sec0");
            let args = ["-r", "--object", "secret,id=sec0,data=abc", "--image-opts"];
            let ours = same(&qemu, &dir, &args, &opts, &commands);
            assert_eq!(ours.status, Some(0), "{image}: {}", ours.stderr);
            if image == "luks.qcow2" {
                let args = [
                    "-r",
                    "--object",
                    "secret,id=sec0,data=wrong",
                    "--image-opts",
                ];
                let ours = same(&qemu, &dir, &args, &opts, &commands);
                assert!(ours.stderr.contains("Invalid password"), "{}", ours.stderr);
            }
        }
        compared += 1;
    }
    assert!(compared >= 30, "only {compared} fixtures");
}

#[test]
fn commands_from_stdin_match_qemu_io() {
    let Some(env) = Env::new("cli_io::stdin") else {
        return;
    };
    env.create("a.qcow2", 1 << 20, "");
    env.copy("a.qcow2", "b.qcow2");
    let script = "write -P 5 0 4k\nread -P 5 0 4k\nfoo\nmap\nquit\nread 0 1\n";
    let run = |program: &Path, prefix: &[&str], image: &str| {
        let mut child = Command::new(program)
            .current_dir(env.dir.path())
            .args(prefix)
            .args(["-f", "qcow2", image])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        IoRun {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            status: out.status.code(),
        }
    };
    let theirs = run(&env.qemu.io, &[], "a.qcow2");
    let ours = run(Path::new(BIN), &["io"], "b.qcow2");
    assert_same_output("commands on stdin", &theirs, &ours);
    assert!(
        ours.stdout.starts_with("qemu-io> wrote 4096/4096"),
        "{}",
        ours.stdout
    );
}

#[test]
fn report_lines_have_qemu_io_layout() {
    let Some(env) = Env::new("cli_io::report_lines") else {
        return;
    };
    env.create("a.qcow2", 4 << 20, "");
    let commands: Vec<String> = [
        "write 0 4k",
        "read 0 3M",
        "read 0 20",
        "discard 0 64k",
        "read -C 0 1",
    ]
    .iter()
    .map(|c| c.to_string())
    .collect();
    let args = ["-f".to_owned(), "qcow2".to_owned()];
    let ours = run_io(
        Path::new(BIN),
        &["io"],
        env.dir.path(),
        &args,
        "a.qcow2",
        &commands,
    );
    let lines: Vec<&str> = ours.stdout.lines().collect();
    let timing: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| is_timing_line(l))
        .collect();
    assert_eq!(timing.len(), 4, "{}", ours.stdout);
    for (line, size) in timing.iter().zip(["4 KiB", "3 MiB", "20 bytes", "64 KiB"]) {
        // `4 KiB, 1 ops; 00.00 sec (1.206 MiB/sec and 308.7050 ops/sec)`
        let rest = line
            .strip_prefix(&format!("{size}, 1 ops; "))
            .unwrap_or_else(|| panic!("{line}"));
        let (time, rate) = rest
            .split_once(" sec (")
            .unwrap_or_else(|| panic!("{line}"));
        assert!(time.len() == 5 && time.as_bytes()[2] == b'.', "{line}");
        let (bytes, ops) = rate
            .split_once("/sec and ")
            .unwrap_or_else(|| panic!("{line}"));
        let unit = bytes.rsplit(' ').next().unwrap();
        assert!(
            ["bytes", "KiB", "MiB", "GiB", "TiB"].contains(&unit),
            "{line}"
        );
        let ops = ops
            .strip_suffix(" ops/sec)")
            .unwrap_or_else(|| panic!("{line}"));
        assert_eq!(ops.split('.').nth(1).map(str::len), Some(4), "{line}");
    }
    // -C: bytes,ops,H:MM:SS.ss,bytes/sec,ops/sec
    let machine = lines.last().unwrap();
    let fields: Vec<&str> = machine.split(',').collect();
    assert_eq!(fields.len(), 5, "{machine}");
    assert_eq!(&fields[..2], ["1", "1"], "{machine}");
    assert!(fields[2].starts_with("0:00:"), "{machine}");
}

#[test]
fn truncate_grows_and_shrinks_as_qemu_io_does() {
    let Some(env) = Env::new("cli_io::truncate") else {
        return;
    };
    let dir = env.dir.path();
    env.create("theirs.qcow2", 1 << 20, "cluster_size=512");
    env.io("theirs.qcow2", &["write -P 3 0 1M"]);
    std::fs::copy(dir.join("theirs.qcow2"), dir.join("ours.qcow2")).unwrap();
    // Growing (the L1 table of 512-byte clusters moves), a size QEMU refuses, then data
    // past the old end.
    let commands: Vec<String> = [
        "truncate 64M",
        "truncate 1000",
        "length",
        "write -P 4 63M 64k",
        "read -P 4 63M 64k",
        "read -P 0 32M 64k",
        "read -P 3 0 1M",
    ]
    .iter()
    .map(|c| c.to_string())
    .collect();
    let args = ["-f".to_owned(), "qcow2".to_owned()];
    let theirs = run_io(&env.qemu.io, &[], dir, &args, "theirs.qcow2", &commands);
    let ours = run_io(Path::new(BIN), &["io"], dir, &args, "ours.qcow2", &commands);
    assert_same_output("truncate", &theirs, &ours);
    assert_eq!(
        env.convert("theirs.qcow2", &[]),
        env.convert("ours.qcow2", &[])
    );
    // Shrinking, then growing back: the part past the shrunk end reads as zeros.
    let shrink: Vec<String> = ["truncate 1M", "length", "truncate 2M", "read -P 0 1M 1M"]
        .iter()
        .map(|c| c.to_string())
        .collect();
    let theirs = run_io(&env.qemu.io, &[], dir, &args, "theirs.qcow2", &shrink);
    let ours = run_io(Path::new(BIN), &["io"], dir, &args, "ours.qcow2", &shrink);
    assert_same_output("truncate smaller", &theirs, &ours);
    assert_eq!(ours.stdout.lines().next(), Some("1 MiB"));
    assert_eq!(
        env.convert("theirs.qcow2", &[]),
        env.convert("ours.qcow2", &[])
    );
}

#[test]
fn writes_through_qcow2_io_read_back_in_qemu() {
    let Some(env) = Env::new("cli_io::writes_read_back") else {
        return;
    };
    env.create("a.qcow2", 4 << 20, "");
    let commands: Vec<String> = [
        "write -P 0x5a 1000 70000",
        "write -z 64k 4k",
        "write -f -P 1 2M 512",
        "flush",
    ]
    .iter()
    .map(|c| c.to_string())
    .collect();
    let args = ["-f".to_owned(), "qcow2".to_owned()];
    let ours = run_io(
        Path::new(BIN),
        &["io"],
        env.dir.path(),
        &args,
        "a.qcow2",
        &commands,
    );
    assert_eq!(ours.status, Some(0), "{}", ours.stderr);
    let guest = env.convert("a.qcow2", &[]);
    assert!(guest[1000..65536].iter().all(|&b| b == 0x5a));
    assert!(guest[65536..69632].iter().all(|&b| b == 0));
    assert!(guest[69632..71000].iter().all(|&b| b == 0x5a));
    assert!(guest[2 << 20..(2 << 20) + 512].iter().all(|&b| b == 1));
    assert!(common::is_all_zero(&guest[..1000]));
    let check = env.img(&["check", "a.qcow2"]);
    assert!(String::from_utf8_lossy(&check).contains("No errors were found"));
}
