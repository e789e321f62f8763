//! Restart intensity: how many restarts a supervisor tolerates, and the sliding
//! window that counts them.
//!
//! Pure bookkeeping over instants; the supervisor actor decides what to do when
//! the limit is reached. Uses tokio's clock so tests can pause time.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Restart intensity: more than `max_restarts` restarts within `within` makes the supervisor give up and fail upward.
///
/// It exists to stop restart loops: a child that keeps dying is not fixed by
/// restarting it forever, so past this limit the supervisor stops its children
/// and fails, letting its own parent (ultimately the service) react, as in OTP.
/// `max_restarts = 0` means no restart is ever attempted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Intensity {
    /// Restarts allowed within the window; one more makes the supervisor give up.
    pub max_restarts: u32,
    /// Length of the sliding window.
    pub within: Duration,
}

impl Intensity {
    /// At most `max_restarts` within `within`.
    pub const fn new(max_restarts: u32, within: Duration) -> Self {
        Intensity {
            max_restarts,
            within,
        }
    }
}

/// The restarts a supervisor made recently, over all of its children.
#[derive(Debug, Default)]
pub(super) struct RestartWindow {
    /// When each restart was decided, and for which child; oldest first.
    restarts: VecDeque<(Instant, String)>,
}

impl RestartWindow {
    /// Forget restarts that happened longer than `within` before `now`.
    pub(super) fn prune(&mut self, now: Instant, within: Duration) {
        while let Some((at, _)) = self.restarts.front() {
            if now.saturating_duration_since(*at) > within {
                self.restarts.pop_front();
            } else {
                break;
            }
        }
    }

    /// Restarts in the window, over all children.
    pub(super) fn total(&self) -> u32 {
        u32::try_from(self.restarts.len()).unwrap_or(u32::MAX)
    }

    /// Restarts of one child in the window: the backoff attempt number of its next restart.
    pub(super) fn count_for(&self, child: &str) -> u32 {
        self.count(child, |_| true)
    }

    /// Restarts of one child no longer than `within` before `now` (without forgetting
    /// older ones: for a report).
    pub(super) fn count_within(&self, child: &str, now: Instant, within: Duration) -> u32 {
        self.count(child, |at| now.saturating_duration_since(at) <= within)
    }

    /// Restarts of one child at instants `counted` accepts.
    fn count(&self, child: &str, counted: impl Fn(Instant) -> bool) -> u32 {
        let count = self
            .restarts
            .iter()
            .filter(|(at, id)| id == child && counted(*at))
            .count();
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    /// Remember one restart of `child` decided at `now`.
    pub(super) fn record(&mut self, child: &str, now: Instant) {
        self.restarts.push_back((now, child.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_restarts_per_child_and_in_total() {
        let now = Instant::now();
        let mut window = RestartWindow::default();
        window.record("a", now);
        window.record("b", now);
        window.record("a", now);
        assert_eq!(window.total(), 3);
        assert_eq!(window.count_for("a"), 2);
        assert_eq!(window.count_for("b"), 1);
        assert_eq!(window.count_for("c"), 0);
    }

    #[test]
    fn a_report_counts_only_the_restarts_inside_the_window() {
        let start = Instant::now();
        let within = Duration::from_secs(10);
        let mut window = RestartWindow::default();
        window.record("a", start);
        window.record("a", start + Duration::from_secs(8));
        window.record("b", start + Duration::from_secs(8));
        let later = start + Duration::from_secs(12);
        assert_eq!(window.count_within("a", later, within), 1);
        assert_eq!(window.count_within("b", later, within), 1);
        assert_eq!(window.count_within("a", start + within, within), 2);
        assert_eq!(window.total(), 3, "a report forgets nothing");
    }

    #[test]
    fn old_restarts_slide_out_of_the_window() {
        let start = Instant::now();
        let within = Duration::from_secs(10);
        let mut window = RestartWindow::default();
        window.record("a", start);
        window.record("b", start + Duration::from_secs(5));

        window.prune(start + Duration::from_secs(10), within);
        assert_eq!(window.total(), 2, "exactly `within` old is still inside");

        window.prune(start + Duration::from_secs(11), within);
        assert_eq!(window.total(), 1);
        assert_eq!(window.count_for("a"), 0);
        assert_eq!(window.count_for("b"), 1);

        window.prune(start + Duration::from_secs(60), within);
        assert_eq!(window.total(), 0);
    }

    #[test]
    fn pruning_with_an_earlier_instant_keeps_everything() {
        let start = Instant::now();
        let mut window = RestartWindow::default();
        window.record("a", start + Duration::from_secs(1));
        window.prune(start, Duration::ZERO);
        assert_eq!(window.total(), 1);
    }
}
