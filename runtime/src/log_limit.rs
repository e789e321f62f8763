//! Rate-limited logging: one line per key per interval, with a count of the lines held
//! back, so that a flood (a stream of bad messages, a broker refusing every channel) is a
//! few lines an operator can read instead of one line per event.
//!
//! Owns only the decision "may this line be logged now"; callers keep their own message
//! and level. Keys are few and stable (a listener and what happened, a broker), so the
//! table stays small.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How often a repeating log line may appear by default.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Lets one line through per key and interval, and counts those it held back.
///
/// It exists so that every place that can log once per message or once per retry shares
/// one rule: the first line of a burst is logged at once, and then at most one line per
/// interval, carrying the number of lines suppressed since the last one.
pub struct LogLimit {
    interval: Duration,
    windows: Mutex<HashMap<String, Window>>,
}

struct Window {
    last: Instant,
    held: u64,
}

impl LogLimit {
    /// A limiter letting one line per key through every `interval`.
    pub fn new(interval: Duration) -> Self {
        LogLimit {
            interval,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(n)` when a line for `key` may be logged now, `n` being how many were held back
    /// since the last one; `None` when this one must be held back (it is counted).
    pub fn allow(&self, key: &str) -> Option<u64> {
        let now = Instant::now();
        let mut windows = self.windows.lock();
        match windows.get_mut(key) {
            None => {
                windows.insert(key.to_string(), Window { last: now, held: 0 });
                Some(0)
            }
            Some(window) if now.duration_since(window.last) >= self.interval => {
                let held = std::mem::take(&mut window.held);
                window.last = now;
                Some(held)
            }
            Some(window) => {
                window.held += 1;
                None
            }
        }
    }
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit::new(LOG_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_line_passes_then_one_per_interval_with_a_count() {
        let limit = LogLimit::new(Duration::from_millis(50));
        assert_eq!(limit.allow("a"), Some(0));
        for _ in 0..5 {
            assert_eq!(limit.allow("a"), None);
        }
        assert_eq!(limit.allow("b"), Some(0), "keys are independent");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(limit.allow("a"), Some(5), "the held-back lines are counted");
        assert_eq!(limit.allow("a"), None);
    }
}
