//! The real `warren` binary as a background process (`warren run --config …`), for tests
//! that need the service as an operator runs it: its stderr lines are collected as they
//! come, it can be signalled, SIGKILLed and waited for, and it is killed on drop.
//!
//! Owns: the child process and its log lines. Must not touch: brokers (the tests start
//! and stop those).

// Each test binary uses part of this.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use warren_test_support::eventually_blocking;

/// The `warren` binary cargo built for these tests.
pub const WARREN: &str = env!("CARGO_BIN_EXE_warren");

/// A `warren run` in the background.
pub struct Running {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Running {
    /// `warren run --config <config>` with `RUST_LOG=info`.
    pub fn start(config: &Path) -> Running {
        Running::start_with_log(config, "info")
    }

    /// As [`Running::start`] with this `RUST_LOG`.
    pub fn start_with_log(config: &Path, rust_log: &str) -> Running {
        Running::start_with_env(config, rust_log, &[])
    }

    /// As [`Running::start_with_log`] with these environment variables too (the test's
    /// own `WARREN_ZONE` and `WARREN_LOG_FORMAT` are not passed on).
    pub fn start_with_env(config: &Path, rust_log: &str, env: &[(&str, &str)]) -> Running {
        let mut child = Command::new(WARREN)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", rust_log)
            .env_remove("WARREN_ZONE")
            .env_remove("WARREN_LOG_FORMAT")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn warren run");
        let lines = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    lines.lock().expect("lines lock").push(line);
                }
            });
        }
        Running { child, lines }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines lock").clone()
    }

    pub fn output(&self) -> String {
        self.lines().join("\n")
    }

    /// Whether a log line so far contains `needle`.
    pub fn saw(&self, needle: &str) -> bool {
        self.lines
            .lock()
            .expect("lines lock")
            .iter()
            .any(|l| l.contains(needle))
    }

    /// Waits (off the async workers, until `timeout`) for a log line that `matches`.
    pub async fn wait_line(
        &self,
        timeout: Duration,
        matches: impl Fn(&str) -> bool + Send + 'static,
    ) -> bool {
        let lines = self.lines.clone();
        tokio::task::spawn_blocking(move || {
            eventually_blocking(timeout, || {
                lines
                    .lock()
                    .expect("lines lock")
                    .iter()
                    .any(|line| matches(line))
            })
        })
        .await
        .expect("wait")
    }

    /// Waits until the echo listener has declared its topology.
    pub async fn wait_echo_ready(&self) {
        let ready = self
            .wait_line(Duration::from_secs(60), |l| {
                l.contains("topology declared") && l.contains("listener=echo")
            })
            .await;
        assert!(ready, "the echo listener did not start: {}", self.output());
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The exit status, once it exits within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Sends a signal by name (`TERM`, `INT`, …).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// SIGTERM, then the exit status (bounded).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.wait_exit(Duration::from_secs(20))
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A `VmRSS` / `VmHWM`-style line of /proc/<pid>/status, in bytes.
    pub fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc/<pid>/status");
        let line = status
            .lines()
            .find(|line| line.starts_with(field))
            .unwrap_or_else(|| panic!("no {field} in /proc/<pid>/status"));
        let kib: u64 = line
            .trim_start_matches(field)
            .trim_start_matches(':')
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap_or_else(|error| panic!("{field}: {line:?}: {error}"));
        kib * 1024
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
