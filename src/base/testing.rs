//! Helpers for the unit tests that run QEMU's tools (the integration tests have their own in
//! `tests/common`, which unit tests cannot reach).

use std::path::PathBuf;
use std::process::{Command, Output};

/// A tool from `$ENV_VAR`, else from `PATH`.
fn find(name: &str, env_var: &str) -> Option<PathBuf> {
    std::env::var_os(env_var).map(PathBuf::from).or_else(|| {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// `qemu-img` (`$QEMU_IMG`), or `None` after a loud skip notice (a failure under CI).
#[cfg_attr(not(feature = "encryption"), allow(dead_code))] // LUKS tests only
pub(crate) fn qemu_img(test: &str) -> Option<PathBuf> {
    found_or_skip(test, "qemu-img", find("qemu-img", "QEMU_IMG"))
}

/// `qemu-img` and `qemu-io` (`$QEMU_IO`), or `None` after a loud skip notice (a failure
/// under CI).
pub(crate) fn qemu_img_and_io(test: &str) -> Option<(PathBuf, PathBuf)> {
    let found = find("qemu-img", "QEMU_IMG").zip(find("qemu-io", "QEMU_IO"));
    found_or_skip(test, "qemu-img or qemu-io", found)
}

fn found_or_skip<T>(test: &str, what: &str, found: Option<T>) -> Option<T> {
    if found.is_none() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
        let msg = format!("SKIPPED: {what} not found (test {test})");
        assert!(!ci, "{msg}; CI=true, so this is a failure");
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "\n!!! {msg}\n");
    }
    found
}

/// Run `cmd`; panics with its output unless it succeeds.
pub(crate) fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
