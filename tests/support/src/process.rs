//! Running RabbitMQ's scripts: where they are, a clean environment, bounded waits.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::SupportError;

/// Directory holding the unwrapped RabbitMQ scripts (`rabbitmq-server`, `rabbitmqctl`).
/// `/usr/sbin/rabbitmq*` are wrappers that `su` to the rabbitmq user; as root we call the
/// real scripts directly.
pub(crate) fn bin_dir() -> PathBuf {
    std::env::var_os("WARREN_TEST_RABBITMQ_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/rabbitmq/bin"))
}

/// Removes inherited `RABBITMQ_*` / `ERL_*` variables so a developer's shell settings can't
/// redirect a test node (or its rabbitmqctl) to another node, config or cookie.
pub(crate) fn scrub_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("RABBITMQ_") || k.starts_with("ERL_") || k == "CONF_ENV_FILE" {
            cmd.env_remove(&key);
        }
    }
}

/// Human-readable command line for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Polls `child` until it exits or `timeout` passes; `Ok(None)` means still running.
pub(crate) fn wait_with_deadline(
    child: &mut Child,
    timeout: Duration,
) -> Result<Option<ExitStatus>, SupportError> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(Some(status)),
            Ok(None) if Instant::now() >= deadline => return Ok(None),
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(SupportError::io("waiting for child process", e)),
        }
    }
}

/// Runs `cmd` to completion (killing it after `timeout`) and returns its stdout, or a
/// [`SupportError::Ctl`] with both streams when it exits non-zero. Output goes to anonymous
/// temp files rather than pipes so a chatty command can't block on a full pipe while we poll.
pub(crate) fn run_captured(mut cmd: Command, timeout: Duration) -> Result<String, SupportError> {
    let command = describe(&cmd);
    let tmp = |what: &str| {
        tempfile::tempfile()
            .map_err(|e| SupportError::io(format!("temp file for {what} of `{command}`"), e))
    };
    let mut out = tmp("stdout")?;
    let mut err = tmp("stderr")?;
    let clone = |f: &File| {
        f.try_clone()
            .map_err(|e| SupportError::io("cloning temp file handle", e))
    };
    cmd.stdin(Stdio::null())
        .stdout(clone(&out)?)
        .stderr(clone(&err)?);
    let mut child = cmd
        .spawn()
        .map_err(|e| SupportError::io(format!("spawning `{command}`"), e))?;
    let status = match wait_with_deadline(&mut child, timeout)? {
        Some(status) => status,
        None => {
            // Best effort: the process may have exited in the meantime.
            let _ = child.kill();
            let _ = child.wait();
            return Err(SupportError::Timeout {
                what: format!("`{command}` to finish"),
                after: timeout,
            });
        }
    };
    let read_all = |f: &mut File, what: &str| -> Result<String, SupportError> {
        let mut buf = Vec::new();
        f.seek(SeekFrom::Start(0))
            .and_then(|_| f.read_to_end(&mut buf))
            .map_err(|e| SupportError::io(format!("reading {what} of `{command}`"), e))?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let stdout = read_all(&mut out, "stdout")?;
    if status.success() {
        return Ok(stdout);
    }
    let stderr = read_all(&mut err, "stderr")?;
    Err(SupportError::Ctl {
        command,
        status: status.to_string(),
        stdout,
        stderr,
    })
}
