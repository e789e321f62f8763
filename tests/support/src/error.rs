use std::fmt;
use std::time::Duration;

/// Everything that can go wrong while driving RabbitMQ from a test. Exists so that failures
/// of the environment (a node that won't boot, a rabbitmqctl error, a busy port) surface as
/// readable test failures with enough context (command, exit status, log tail) to debug them
/// instead of panics deep inside the support code.
#[derive(Debug)]
pub enum SupportError {
    /// An OS-level operation failed (spawning, file I/O, sockets).
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A node did not come up (exited early, or not accepting AMQP before the deadline).
    Start {
        /// Node name, e.g. `warren-test-1234-1@localhost`.
        node: String,
        /// Why we gave up.
        reason: String,
        /// The last lines of the node's stdout/stderr and log file.
        log_tail: String,
    },
    /// A wait with a deadline ran out.
    Timeout {
        /// What we were waiting for.
        what: String,
        /// How long we waited.
        after: Duration,
    },
    /// rabbitmqctl exited unsuccessfully.
    Ctl {
        /// The command line, for copy and paste.
        command: String,
        /// Exit status as text.
        status: String,
        /// Captured stdout.
        stdout: String,
        /// Captured stderr.
        stderr: String,
    },
    /// Output from rabbitmqctl that we could not make sense of.
    Parse {
        /// What we were parsing.
        what: String,
        /// The offending input.
        input: String,
    },
    /// The operation does not make sense in the node's current state.
    InvalidState(String),
}

impl SupportError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        SupportError::Io {
            context: context.into(),
            source,
        }
    }
}

impl fmt::Display for SupportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SupportError::Io { context, source } => write!(f, "{context}: {source}"),
            SupportError::Start {
                node,
                reason,
                log_tail,
            } => write!(
                f,
                "RabbitMQ node {node} failed to start: {reason}\n--- node output (tail) ---\n{log_tail}"
            ),
            SupportError::Timeout { what, after } => {
                write!(f, "timed out after {after:?} waiting for {what}")
            }
            SupportError::Ctl {
                command,
                status,
                stdout,
                stderr,
            } => write!(
                f,
                "`{command}` failed ({status})\nstdout: {}\nstderr: {}",
                stdout.trim_end(),
                stderr.trim_end()
            ),
            SupportError::Parse { what, input } => {
                write!(f, "cannot parse {what}: {input:?}")
            }
            SupportError::InvalidState(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for SupportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SupportError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
