//! Errors a supervisor reports: to whoever spawned it, to callers of its
//! messages, and upward (as its failure reason) when it gives up.

use std::time::Duration;

use ractor::SpawnErr;

/// Why a supervisor, or a request to one, failed.
///
/// It exists so that failures read as a chain through nested supervisors
/// ("child `bootstrap` failed to start: no local broker ready after 30s: …")
/// and so callers can tell a bad request (duplicate id) from a dead child.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// A child's start function failed; `reason` is the child's own error text.
    #[error("child `{child}` failed to start: {reason}")]
    ChildStart {
        /// The child's id.
        child: String,
        /// The child's own error text.
        reason: String,
    },
    /// A child with this id is already supervised.
    #[error("a child with id `{0}` is already supervised")]
    DuplicateId(String),
    /// Restarting `child` would have exceeded the supervisor's restart intensity.
    #[error(
        "restarting child `{child}` would make {restarts} restarts within {within:?}, more than allowed; giving up"
    )]
    IntensityExceeded {
        /// The child whose restart was refused.
        child: String,
        /// Restarts within the window over all children, counting the refused one.
        restarts: u32,
        /// The window length.
        within: Duration,
    },
    /// The supervisor could not be reached or did not answer in time.
    #[error("supervisor did not answer: {0}")]
    Unavailable(String),
}

/// The text of a spawn error without ractor's "Actor panicked during startup" wrapper.
///
/// ractor wraps every `pre_start` error in that sentence; stripping it keeps the
/// chain through nested supervisors readable. Use it when printing why a
/// supervisor (or the whole tree) failed to start.
pub fn spawn_error_reason(err: &SpawnErr) -> String {
    match err {
        SpawnErr::StartupFailed(inner) => inner.to_string(),
        other => other.to_string(),
    }
}
