//! One shutdown budget, handed down: by when each child must have stopped.
//!
//! The node's `[service] shutdown_timeout_secs` is the whole budget. When a parent stops
//! a child it computes the child's deadline out of its own and tells it through the
//! child's [`StopDeadline`] before asking it to stop; the child (a supervisor, a listener,
//! a connection) plans its own stop by that deadline, and the parent kills it there. A
//! child's declared `shutdown` is the most it asks for, never more than it gets.
//!
//! Sequential children (reverse start order) each get what they ask for, but never the
//! time kept for the children still to stop after them ([`FLOOR`] each), so a hung child
//! cannot eat its successors' whole budget; what a quick child leaves flows to the next.
//! Concurrent children all get the parent's deadline, capped by what each asks for.
//!
//! Owns: the deadline cell and the arithmetic. Must not touch: actors.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Kept for each sequential child still to stop after the one being stopped.
pub const FLOOR: Duration = Duration::from_millis(500);

/// What a supervisor asks for itself beyond its children's stop, and how long a caller
/// that stops one waits past the deadline for it to report that it stopped.
pub const MARGIN: Duration = Duration::from_millis(500);

/// How a supervisor stops its children.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StopOrder {
    /// One at a time, in reverse start order (OTP): later children may depend on
    /// earlier ones.
    #[default]
    Sequential,
    /// All at once: the children are independent (the apps, the workers of a pool, the
    /// connections of the brokers).
    Concurrent,
}

/// By when a child must have stopped: written by its parent just before the stop, read by
/// the child as it stops. Empty while the child runs (a child clears it as it starts), so
/// a child that stops on its own plans by its own bound.
#[derive(Clone, Debug, Default)]
pub struct StopDeadline(Arc<Mutex<Option<Instant>>>);

impl StopDeadline {
    /// The parent's word: stop by `at`.
    pub fn set(&self, at: Instant) {
        *self.0.lock() = Some(at);
    }

    /// Forgets an earlier stop's deadline (a child calls this as it starts).
    pub fn clear(&self) {
        *self.0.lock() = None;
    }

    /// The deadline the parent gave, if it gave one for this stop.
    pub fn get(&self) -> Option<Instant> {
        *self.0.lock()
    }

    /// The deadline the parent gave, or `now + own` when it gave none.
    pub fn or_own(&self, own: Duration) -> Instant {
        self.get().unwrap_or_else(|| Instant::now() + own)
    }
}

/// The deadline of a sequential child that asks for `wish`, with `later` children still
/// to stop after it, out of a parent that must be done by `end`.
pub fn sequential(now: Instant, end: Instant, wish: Duration, later: usize) -> Instant {
    let kept = FLOOR.saturating_mul(u32::try_from(later).unwrap_or(u32::MAX));
    let latest = end.checked_sub(kept).unwrap_or(now).max(now);
    (now + wish).min(latest)
}

/// The deadline of a concurrent child that asks for `wish`.
pub fn concurrent(now: Instant, end: Instant, wish: Duration) -> Instant {
    (now + wish).min(end).max(now)
}

/// What a supervisor asks of its own parent: its children's wishes (all of them one after
/// another, or the largest when they stop together) and `margin` for itself.
pub fn declared(
    order: StopOrder,
    wishes: impl Iterator<Item = Duration>,
    margin: Duration,
) -> Duration {
    let children = match order {
        StopOrder::Sequential => wishes.fold(Duration::ZERO, Duration::saturating_add),
        StopOrder::Concurrent => wishes.max().unwrap_or_default(),
    };
    children.saturating_add(margin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// Every child uses all it is given: the last still ends by the parent's deadline, and
    /// each later child had at least the floor.
    #[test]
    fn sequential_children_that_use_everything_still_fit_the_budget() {
        let now = Instant::now();
        let end = now + secs(4.0);
        let wishes = [secs(6.0), secs(6.0), secs(0.2), secs(3.0)];
        let mut at = now;
        let mut given = Vec::new();
        for (i, wish) in wishes.iter().enumerate() {
            let later = wishes.len() - i - 1;
            let deadline = sequential(at, end, *wish, later);
            given.push(deadline - at);
            at = deadline;
        }
        assert!(at <= end, "the last child ends by the deadline");
        let total: Duration = given.iter().sum();
        assert!(total <= secs(4.0), "{given:?}");
        assert_eq!(
            given[0],
            secs(2.5),
            "the first keeps a floor for each later one"
        );
        assert_eq!(
            given[1],
            secs(0.5),
            "the hung first child left only the floors"
        );
        assert_eq!(
            given[2],
            secs(0.2),
            "a quick child takes only what it asks for"
        );
        assert_eq!(given[3], secs(0.8), "and what it leaves flows to the next");
    }

    #[test]
    fn a_spent_budget_gives_no_time_and_never_a_deadline_in_the_past() {
        let now = Instant::now();
        let end = now + secs(1.0);
        assert_eq!(sequential(now, end, secs(5.0), 3), now);
        assert_eq!(concurrent(now, now, secs(5.0)), now);
        assert_eq!(concurrent(now, end, secs(0.3)), now + secs(0.3));
        assert_eq!(concurrent(now, end, secs(5.0)), end);
    }

    #[test]
    fn a_supervisor_declares_its_childrens_wishes() {
        let wishes = || [secs(1.0), secs(3.0), secs(2.0)].into_iter();
        let margin = secs(0.5);
        assert_eq!(declared(StopOrder::Sequential, wishes(), margin), secs(6.5));
        assert_eq!(declared(StopOrder::Concurrent, wishes(), margin), secs(3.5));
    }

    #[test]
    fn a_deadline_is_forgotten_when_the_child_starts_again() {
        let deadline = StopDeadline::default();
        let own = secs(2.0);
        let before = Instant::now();
        assert!(deadline.or_own(own) >= before + own);
        let at = before + secs(0.1);
        deadline.set(at);
        assert_eq!(deadline.or_own(own), at);
        deadline.clear();
        assert_eq!(deadline.get(), None);
    }
}
