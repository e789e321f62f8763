//! Declarations a broker refuses because the object exists there with other flags (406):
//! one probe per backoff interval for every listener of the process that needs the same
//! object on the same broker, instead of each of them retrying on its own.
//!
//! A node runs many listeners that declare the same exchange (`targeted`, an app's
//! exchange): with a refused declaration, a dozen listeners each backing off on their own
//! still hit the broker a dozen times per round. Here the first failure opens an entry;
//! afterwards one listener at a time may try (the probe) once the entry's time has come,
//! and the others wait for the next round. A success closes the entry, so the rest follow
//! at their next look.
//!
//! Owns only the table of refused (broker, declaration) pairs and their schedule.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use warren_runtime::backoff::Backoff;

/// The schedule of probes for one refused declaration.
const PROBES: Backoff = Backoff {
    min: Duration::from_millis(200),
    max: Duration::from_secs(30),
};

/// How long a probe may take before another listener may probe instead.
const PROBE_GRACE: Duration = Duration::from_secs(10);

/// The refused declarations of this process.
pub(crate) static REFUSALS: LazyLock<Refusals> = LazyLock::new(Refusals::default);

/// Refused declarations, keyed by broker and step.
#[derive(Default)]
pub(crate) struct Refusals {
    entries: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    /// Probes that failed so far.
    failures: u32,
    /// No listener tries before this.
    until: Instant,
    /// A listener is trying now.
    probing: bool,
}

impl Refusals {
    /// Whether a listener whose last set-up failed on `key` may try now (it is then the
    /// probe); otherwise when to look again.
    pub fn turn(&self, key: &str, now: Instant) -> Result<(), Instant> {
        let mut entries = self.entries.lock();
        let Some(entry) = entries.get_mut(key) else {
            return Ok(());
        };
        if now < entry.until {
            return Err(entry.until);
        }
        entry.probing = true;
        entry.until = now + PROBE_GRACE;
        Ok(())
    }

    /// A set-up failed on `key`: when the next probe may run.
    pub fn failed(&self, key: &str, now: Instant) -> Instant {
        let mut entries = self.entries.lock();
        match entries.get_mut(key) {
            Some(entry) if entry.probing => {
                entry.failures = entry.failures.saturating_add(1);
                entry.probing = false;
                entry.until = now + PROBES.delay(entry.failures - 1);
                entry.until
            }
            // Another listener failed at the same time as the one that opened the entry.
            Some(entry) => entry.until,
            None => {
                let until = now + PROBES.delay(0);
                entries.insert(
                    key.to_string(),
                    Entry {
                        failures: 1,
                        until,
                        probing: false,
                    },
                );
                until
            }
        }
    }

    /// A set-up that had failed on `key` succeeded: everyone may try again.
    pub fn succeeded(&self, key: &str) {
        self.entries.lock().remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_probe_per_round_and_a_success_opens_the_way() {
        let refusals = Refusals::default();
        let t0 = Instant::now();
        assert_eq!(refusals.turn("b|x", t0), Ok(()), "nothing refused yet");
        let next = refusals.failed("b|x", t0);
        assert!(next > t0);
        // Others that failed at the same time do not push the schedule.
        assert_eq!(refusals.failed("b|x", t0), next);
        assert_eq!(refusals.turn("b|x", t0), Err(next));
        assert_eq!(refusals.turn("b|x", next), Ok(()), "the probe");
        assert!(
            refusals.turn("b|x", next).is_err(),
            "only one probe at a time"
        );
        let later = refusals.failed("b|x", next);
        assert!(later > next, "the probe failed: the next round is later");
        assert_eq!(refusals.turn("other|x", t0), Ok(()), "keys are independent");
        refusals.succeeded("b|x");
        assert_eq!(refusals.turn("b|x", next), Ok(()));
    }
}
