//! Peers written in Python (tests/peers/*.py), run with Debian's interpreter as
//! subprocesses under a hard bound.

use std::process::Stdio;
use std::time::Duration;

/// Debian's interpreter, which has `python3-pika` and `python3-qpid-proton`
/// (`scripts/ensure-python-peers`); a `python3` earlier on PATH may not.
pub const PYTHON: &str = "/usr/bin/python3";

/// A peer run's hard bound: it is killed past it.
pub const PEER_BOUND: Duration = Duration::from_secs(30);

/// Runs `python args…` with a hard bound; past it the child is killed (kill_on_drop,
/// when the timed-out wait is dropped) and the test fails.
pub async fn run_python(args: &[&str]) -> std::process::Output {
    let child = spawn_python(args);
    match tokio::time::timeout(PEER_BOUND, child.wait_with_output()).await {
        Ok(output) => output.unwrap_or_else(|error| panic!("{PYTHON} {args:?}: {error}")),
        Err(_) => panic!("{PYTHON} {args:?} still ran after {PEER_BOUND:?}: killed"),
    }
}

/// Starts `python args…` with piped stdout and stderr, killed when dropped.
pub fn spawn_python(args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(PYTHON)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|error| panic!("cannot run {PYTHON}: {error}"))
}

/// Fails the test unless `/usr/bin/python3` imports `module` (from `package`).
pub async fn require_module(module: &str, package: &str) {
    let output = run_python(&["-c", &format!("import {module}")]).await;
    assert!(
        output.status.success(),
        "the interop peer needs {module} for {PYTHON}: install {package} \
         (scripts/test does, through scripts/ensure-python-peers)\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The JSON lines a peer printed.
pub fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("peer printed {line:?}, not JSON: {error}"))
        })
        .collect()
}
