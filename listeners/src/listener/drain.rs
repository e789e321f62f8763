//! The fail-back drain of one old grant, as decisions: when the listener moves back to
//! the primary, the queue it leaves on the old broker is consumed until it is empty (ready
//! and unacknowledged) or `drain_timeout` passed; a named queue is then still consumed for
//! `fail_back_watch` (other publishers may still send there); finally the consumer is
//! cancelled and the queue checked once more: what arrived meanwhile is drained again
//! (within a fresh `drain_timeout`), and only an empty anonymous queue is deleted.
//!
//! This file decides; the actor does the broker work and asks again. Nothing here touches
//! a channel or a clock of its own.

use std::time::{Duration, Instant};

/// How often a draining grant's queue is checked.
pub(crate) const CHECK_EVERY: Duration = Duration::from_millis(200);

/// Where a drain stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Consuming until the queue is empty or the deadline.
    Draining,
    /// Empty once; still consuming a named queue until `until`.
    Watching { until: Instant },
    /// The consumer was asked to stop; the last check follows when it has.
    Closing,
}

/// The drain of one old grant.
#[derive(Clone, Debug)]
pub(crate) struct Drain {
    pub phase: Phase,
    /// When the fail-back began it (for the drain time).
    pub started: Instant,
    /// The drain gives up (the queue is left as it is, never deleted) after this.
    pub deadline: Instant,
    timeout: Duration,
    /// How long a named queue is watched; zero for anonymous queues.
    watch: Duration,
    /// The queue is the listener's own (anonymous): deleted once empty.
    anonymous: bool,
}

/// What the actor does next with a draining grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Check again after this long.
    CheckIn(Duration),
    /// Stop the consumer (handling what it has) and call [`Drain::closed`] when it ended.
    Close,
}

/// What to do once the consumer of a closing drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Closed {
    /// Done: give the grant back; delete the (anonymous, empty) queue first if `delete`.
    Release { delete: bool },
    /// Messages arrived meanwhile: consume again and keep checking.
    DrainAgain,
}

impl Drain {
    /// A drain starting `now`.
    pub fn new(now: Instant, timeout: Duration, watch: Duration, anonymous: bool) -> Drain {
        Drain {
            phase: Phase::Draining,
            started: now,
            deadline: now + timeout,
            timeout,
            watch: if anonymous { Duration::ZERO } else { watch },
            anonymous,
        }
    }

    /// A check of a consuming drain: `ready` messages in the queue on the broker,
    /// `in_flight` received by this consumer and not settled yet.
    pub fn checked(&mut self, now: Instant, ready: u32, in_flight: usize) -> Step {
        match self.phase {
            Phase::Closing => Step::CheckIn(CHECK_EVERY),
            Phase::Watching { until } if now >= until => self.close(now),
            Phase::Watching { until } => Step::CheckIn(until - now),
            Phase::Draining if ready == 0 && in_flight == 0 => {
                if self.watch.is_zero() {
                    self.close(now)
                } else {
                    let until = now + self.watch;
                    self.phase = Phase::Watching { until };
                    Step::CheckIn(self.watch)
                }
            }
            Phase::Draining if now >= self.deadline => {
                self.phase = Phase::Closing;
                Step::Close
            }
            Phase::Draining => Step::CheckIn(CHECK_EVERY),
        }
    }

    /// Ends the watch (or an empty drain): stop, then one last look within a fresh bound.
    fn close(&mut self, now: Instant) -> Step {
        self.phase = Phase::Closing;
        self.deadline = self.deadline.max(now + self.timeout);
        Step::Close
    }

    /// The consumer of a closing drain ended; `ready` messages are in the queue now.
    pub fn closed(&mut self, now: Instant, ready: u32) -> Closed {
        if ready == 0 {
            return Closed::Release {
                delete: self.anonymous,
            };
        }
        if now >= self.deadline {
            // Out of time: the queue keeps its messages (never deleted).
            return Closed::Release { delete: false };
        }
        self.phase = Phase::Draining;
        self.watch = Duration::ZERO;
        Closed::DrainAgain
    }

    /// The listener was paused and resumes: the drain gets its full time again.
    pub fn resumed(&mut self, now: Instant) {
        self.deadline = self.deadline.max(now + self.timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn an_anonymous_queue_closes_once_empty_and_is_deleted() {
        let t0 = Instant::now();
        let mut drain = Drain::new(t0, 10 * SECOND, 30 * SECOND, true);
        assert_eq!(drain.checked(t0, 5, 0), Step::CheckIn(CHECK_EVERY));
        assert_eq!(
            drain.checked(t0, 0, 2),
            Step::CheckIn(CHECK_EVERY),
            "unacked ones still count"
        );
        assert_eq!(drain.checked(t0, 0, 0), Step::Close, "no watch for it");
        assert_eq!(drain.closed(t0, 0), Closed::Release { delete: true });
    }

    #[test]
    fn a_named_queue_is_watched_then_checked_once_more() {
        let t0 = Instant::now();
        let mut drain = Drain::new(t0, 10 * SECOND, 30 * SECOND, false);
        assert_eq!(drain.checked(t0, 0, 0), Step::CheckIn(30 * SECOND));
        assert!(matches!(drain.phase, Phase::Watching { .. }));
        assert_eq!(
            drain.checked(t0 + 5 * SECOND, 3, 0),
            Step::CheckIn(25 * SECOND)
        );
        assert_eq!(drain.checked(t0 + 30 * SECOND, 0, 0), Step::Close);
        // Something arrived between the last delivery and the cancel: drain it too.
        assert_eq!(drain.closed(t0 + 31 * SECOND, 2), Closed::DrainAgain);
        assert_eq!(drain.phase, Phase::Draining);
        assert_eq!(
            drain.checked(t0 + 32 * SECOND, 0, 0),
            Step::Close,
            "no second watch"
        );
        assert_eq!(
            drain.closed(t0 + 32 * SECOND, 0),
            Closed::Release { delete: false },
            "a named queue is never deleted"
        );
    }

    #[test]
    fn a_drain_out_of_time_never_deletes_what_is_left() {
        let t0 = Instant::now();
        let mut drain = Drain::new(t0, 10 * SECOND, Duration::ZERO, true);
        assert_eq!(drain.checked(t0 + 10 * SECOND, 7, 1), Step::Close);
        assert_eq!(
            drain.closed(t0 + 10 * SECOND, 7),
            Closed::Release { delete: false }
        );
    }

    #[test]
    fn resuming_gives_the_drain_its_time_again() {
        let t0 = Instant::now();
        let mut drain = Drain::new(t0, 10 * SECOND, Duration::ZERO, true);
        drain.resumed(t0 + 60 * SECOND);
        assert_eq!(
            drain.checked(t0 + 65 * SECOND, 1, 0),
            Step::CheckIn(CHECK_EVERY)
        );
    }
}
