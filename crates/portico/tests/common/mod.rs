//! Helpers shared by the binary's integration tests: running commands in network namespaces
//! and the skip-or-fail rule for what a test needs.

#![allow(dead_code)]

use std::process::{Command, Stdio};

pub mod bgplab;
pub mod k8s;
pub mod kernellab;

/// Whether `cmd` is on the PATH.
pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `true` when the test can run: root (for `why_root`) and every command of `cmds`; otherwise
/// prints `skipped: …` and returns `false`, or panics under `PORTICO_CI`.
pub fn require(why_root: &str, cmds: &[&str]) -> bool {
    let missing = if !sys::is_root() {
        Some(format!("needs root ({why_root})"))
    } else {
        cmds.iter()
            .find(|t| !have(t))
            .map(|t| format!("needs `{t}` (scripts/test-all installs it)"))
    };
    match missing {
        None => true,
        Some(why) => {
            sys::skip_test(&why);
            false
        }
    }
}

/// Runs `ip` with `args`; panics with its error when it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Output of a command run inside namespace `ns` (bounded by the command's own timeout flags).
pub fn in_ns(ns: &str, cmd: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .expect("ip netns exec runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}
