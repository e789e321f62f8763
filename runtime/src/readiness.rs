//! Readiness: whether every part of the node that must talk to a broker does so now, and
//! for those that do not, why.
//!
//! A part (a listener, a pool worker, the router) registers when it starts and says
//! `ready` once its topology is declared and it consumes (or is paused on purpose), and
//! `not_ready(reason)` when a declaration is refused or its channel is gone. The node is
//! ready when every registered part is. `warren run` logs "warren ready" only then, and an
//! operator sees the reasons otherwise (a 406 on a declare names the object and the flags).
//!
//! Owns the table of parts and their states; it must not decide anything about brokers or
//! channels: the parts report, this only collects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

/// Where one part stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartState {
    /// Registered, not set up yet (no channel so far).
    Starting,
    /// Doing its work.
    Ready,
    /// Cannot do its work, and why (for operators).
    NotReady(String),
}

/// The readiness of a node's parts: cheap to clone, read without a round trip.
///
/// It exists so that "the node is up" means more than "the actors started": a listener
/// whose exchange declaration the broker refuses keeps the node not ready, with the reason.
#[derive(Clone)]
pub struct Readiness {
    inner: Arc<Inner>,
}

struct Inner {
    parts: Mutex<BTreeMap<u64, (String, PartState)>>,
    next: AtomicU64,
    changed: watch::Sender<u64>,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            inner: Arc::new(Inner {
                parts: Mutex::new(BTreeMap::new()),
                next: AtomicU64::new(1),
                changed: watch::channel(0).0,
            }),
        }
    }
}

impl Readiness {
    /// Registers a part, starting; it is removed when the returned entry is dropped.
    pub fn register(&self, name: impl Into<String>) -> ReadinessEntry {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        self.inner
            .parts
            .lock()
            .insert(id, (name.into(), PartState::Starting));
        self.bump();
        ReadinessEntry {
            id,
            readiness: self.clone(),
        }
    }

    /// Every registered part and its state, in registration order.
    pub fn parts(&self) -> Vec<(String, PartState)> {
        self.inner.parts.lock().values().cloned().collect()
    }

    /// Whether every registered part is ready.
    pub fn is_ready(&self) -> bool {
        self.inner
            .parts
            .lock()
            .values()
            .all(|(_, state)| *state == PartState::Ready)
    }

    /// The parts that are not ready, with their state, in registration order.
    pub fn pending(&self) -> Vec<(String, PartState)> {
        self.inner
            .parts
            .lock()
            .values()
            .filter(|(_, state)| *state != PartState::Ready)
            .cloned()
            .collect()
    }

    /// Waits until every part is ready, up to `timeout`; whether it became ready.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut changes = self.inner.changed.subscribe();
        let waited = tokio::time::timeout(timeout, async {
            loop {
                if self.is_ready() {
                    return true;
                }
                if changes.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await;
        waited.unwrap_or(false)
    }

    /// The pending parts as one line for a log: `listener:echo (no channel yet), …`.
    pub fn describe_pending(&self) -> String {
        self.pending()
            .iter()
            .map(|(name, state)| match state {
                PartState::Starting => format!("{name} (starting)"),
                PartState::NotReady(reason) => format!("{name} ({reason})"),
                PartState::Ready => name.clone(),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn set(&self, id: u64, state: PartState) {
        let changed = {
            let mut parts = self.inner.parts.lock();
            match parts.get_mut(&id) {
                Some(part) if part.1 != state => {
                    part.1 = state;
                    true
                }
                _ => false,
            }
        };
        if changed {
            self.bump();
        }
    }

    fn bump(&self) {
        self.inner.changed.send_modify(|v| *v += 1);
    }
}

/// One registered part's way to report; dropping it removes the part.
pub struct ReadinessEntry {
    id: u64,
    readiness: Readiness,
}

impl ReadinessEntry {
    /// The part does its work.
    pub fn ready(&self) {
        self.readiness.set(self.id, PartState::Ready);
    }

    /// The part cannot do its work now.
    pub fn not_ready(&self, reason: impl Into<String>) {
        self.readiness
            .set(self.id, PartState::NotReady(reason.into()));
    }
}

impl Drop for ReadinessEntry {
    fn drop(&mut self) {
        self.readiness.inner.parts.lock().remove(&self.id);
        self.readiness.bump();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_when_every_part_is_and_parts_leave_when_dropped() {
        let readiness = Readiness::default();
        assert!(readiness.is_ready(), "nothing registered");
        let a = readiness.register("listener:a");
        let b = readiness.register("listener:b");
        assert!(!readiness.is_ready());
        a.ready();
        b.not_ready("exchange `x` refused (406)");
        assert_eq!(
            readiness.describe_pending(),
            "listener:b (exchange `x` refused (406))"
        );
        assert!(!readiness.wait_ready(Duration::from_millis(20)).await);
        let waiter = tokio::spawn({
            let readiness = readiness.clone();
            async move { readiness.wait_ready(Duration::from_secs(5)).await }
        });
        b.ready();
        assert!(waiter.await.unwrap_or(false), "woken by the change");
        let c = readiness.register("listener:c");
        assert!(!readiness.is_ready());
        drop(c);
        assert!(readiness.is_ready(), "a dropped part is gone");
    }
}
