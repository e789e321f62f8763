//! Exponential backoff with jitter.
//!
//! Owns the one delay policy warren uses wherever something is retried: broker
//! reconnects, channel takes, TCP probes and supervisor restarts. It is a plain value type with no clock and
//! no sleeping; callers decide how to wait (usually a scheduled self-message).

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with jitter, bounded by [min, max]: used for reconnects and supervisor restarts.
///
/// It exists so that every retry loop in warren spaces its attempts the same way:
/// the first retry waits between `min / 2` and `min`, each further attempt doubles the
/// base delay up to `max`, and jitter (the first attempt's too) spreads simultaneous
/// retries (many consumers losing the same broker) so they do not hit the broker in
/// lockstep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Base delay of the first attempt (which waits between `min / 2` and `min`), and the
    /// lower bound of every later delay.
    pub min: Duration,
    /// Upper bound of every delay.
    pub max: Duration,
}

impl Backoff {
    /// The pause between a supervisor's restarts of a failed child: from 100 ms, doubling
    /// to 5 s. Every supervisor below the root uses it, so a crash loop never spins and a
    /// change of policy is made here once.
    pub fn for_restarts() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// A backoff between `min` and `max`; a `max` below `min` is raised to `min`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
        }
    }

    /// The delay before retry number `attempt` (0-based).
    ///
    /// The base delay is `min * 2^attempt`, capped at `max` (no overflow for any
    /// `attempt`). Attempt 0 is drawn uniformly from `[min / 2, min]`; a later one from
    /// `[max(min, base / 2), base]`. So the first retry is jittered too (clients that lost
    /// the same broker at the same moment do not return in lockstep), no delay exceeds
    /// `max`, and only the first one is below `min`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self.base(attempt);
        let low = if attempt == 0 {
            base / 2
        } else {
            self.min.max(base / 2)
        };
        if low >= base {
            return base;
        }
        low + random_up_to(base - low)
    }

    /// `min * 2^attempt`, capped at `max`, without overflowing.
    fn base(&self, attempt: u32) -> Duration {
        // Bounds stated as fields may be inconsistent (they are public); the larger wins.
        let max = self.max.max(self.min);
        let mut base = self.min;
        for _ in 0..attempt {
            // Zero never grows, and once at the cap there is nothing left to do:
            // this keeps the loop short for any `attempt`, up to u32::MAX.
            if base.is_zero() || base >= max {
                break;
            }
            base = base.saturating_mul(2);
        }
        base.min(max)
    }
}

/// A uniformly random duration in `[0, span]`, at nanosecond resolution.
fn random_up_to(span: Duration) -> Duration {
    let nanos: u128 = rand::rng().random_range(0..=span.as_nanos());
    let secs = (nanos / 1_000_000_000) as u64;
    let subsec = (nanos % 1_000_000_000) as u32;
    Duration::new(secs, subsec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn new_raises_max_to_min() {
        let b = Backoff::new(ms(500), ms(100));
        assert_eq!(b.min, ms(500));
        assert_eq!(b.max, ms(500));
    }

    #[test]
    fn every_delay_stays_within_bounds() {
        let b = Backoff::new(ms(100), Duration::from_secs(30));
        for _ in 0..50 {
            let d = b.delay(0);
            assert!(d >= b.min / 2 && d <= b.min, "attempt 0: {d:?}");
        }
        for attempt in 1..=200 {
            let d = b.delay(attempt);
            assert!(d >= b.min && d <= b.max, "attempt {attempt}: {d:?}");
        }
        // The extremes of u32 neither overflow nor loop for long.
        for attempt in [u32::MAX - 1, u32::MAX] {
            let d = b.delay(attempt);
            assert!(d >= b.max / 2 && d <= b.max, "attempt {attempt}: {d:?}");
        }
    }

    #[test]
    fn first_attempt_is_jittered_below_min() {
        let b = Backoff::new(ms(250), Duration::from_secs(10));
        let delays: Vec<Duration> = (0..50).map(|_| b.delay(0)).collect();
        for d in &delays {
            assert!(*d >= ms(125) && *d <= ms(250), "{d:?}");
        }
        let first = delays[0];
        assert!(
            delays.iter().any(|d| *d != first),
            "no jitter on the first attempt: {delays:?}"
        );
    }

    #[test]
    fn delays_grow_exponentially() {
        let b = Backoff::new(ms(100), Duration::from_secs(100));
        // Attempt n lies in [100ms * 2^(n-1), 100ms * 2^n]: each range starts
        // where the previous one ended.
        for attempt in 1..10u32 {
            let d = b.delay(attempt);
            let base = ms(100) * 2u32.pow(attempt);
            assert!(d >= base / 2 && d <= base, "attempt {attempt}: {d:?}");
        }
        let early: Duration = (0..20).map(|_| b.delay(2)).sum();
        let late: Duration = (0..20).map(|_| b.delay(6)).sum();
        assert!(late > early * 4, "early {early:?}, late {late:?}");
    }

    #[test]
    fn delays_at_the_cap_vary_within_upper_half() {
        let b = Backoff::new(ms(10), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..100).map(|_| b.delay(50)).collect();
        for d in &delays {
            assert!(*d >= b.max / 2 && *d <= b.max, "{d:?}");
        }
        let first = delays[0];
        assert!(
            delays.iter().any(|d| *d != first),
            "no jitter in {delays:?}"
        );
    }

    #[test]
    fn min_equal_to_max_is_constant_after_the_first_attempt() {
        let b = Backoff::new(ms(300), ms(300));
        let first = b.delay(0);
        assert!(first >= ms(150) && first <= ms(300), "{first:?}");
        for attempt in [1, 5, 64, 200, u32::MAX] {
            assert_eq!(b.delay(attempt), ms(300));
        }
    }

    #[test]
    fn zero_min_means_no_delay() {
        let b = Backoff::new(Duration::ZERO, Duration::from_secs(5));
        for attempt in [0, 1, 10, 200, u32::MAX] {
            assert_eq!(b.delay(attempt), Duration::ZERO);
        }
        let zero = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(zero.delay(7), Duration::ZERO);
    }

    #[test]
    fn huge_bounds_do_not_overflow() {
        let b = Backoff::new(Duration::from_secs(1), Duration::MAX);
        let d = b.delay(0);
        assert!(d >= b.min / 2 && d <= b.min, "attempt 0: {d:?}");
        for attempt in [1, 63, 64, 65, 200, u32::MAX] {
            let d = b.delay(attempt);
            assert!(d >= b.min && d <= b.max, "attempt {attempt}: {d:?}");
        }
    }
}
