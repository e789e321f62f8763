//! The router's subscribers and how an event reaches them.
//!
//! Subscribers are grouped by pattern, so each distinct pattern is matched once per event.
//! Delivery never waits: each subscriber has a bounded buffer; when it is full the event is
//! dropped for that subscriber only, a counter rises, and the subscriber is marked lagged.
//! A lagged subscriber's next item is a `Resync` marker, placed before any later event,
//! so it knows exactly where it lost events. After a broker-side gap every subscriber is
//! marked lagged.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::RwLock;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::pattern::Pattern;
use super::{ConfigEvent, RouterEvent};

/// One subscriber's side of the table.
pub(crate) struct Subscriber {
    pub id: u64,
    /// For self-origin suppression: the cache name this subscriber stands for.
    pub origin: Option<String>,
    tx: mpsc::Sender<RouterEvent>,
    /// Events were dropped; a `Resync` is owed.
    pub lagged: AtomicBool,
    pub dropped: AtomicU64,
}

impl Subscriber {
    /// Hands an item over without waiting; a full buffer drops it and marks the lag.
    fn deliver(&self, event: &Arc<ConfigEvent>, stats: &Counters) {
        if self.lagged.load(Ordering::Acquire) {
            match self.tx.try_send(RouterEvent::Resync) {
                Ok(()) => {
                    self.lagged.store(false, Ordering::Release);
                    stats.resyncs.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Full(_)) => {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(TrySendError::Closed(_)) => return,
            }
        }
        match self.tx.try_send(RouterEvent::Event(event.clone())) {
            Ok(()) => {
                stats.delivered.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_)) => {
                self.lagged.store(true, Ordering::Release);
                self.dropped.fetch_add(1, Ordering::Relaxed);
                stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Closed(_)) => {}
        }
    }

    /// A gap on the broker side: this subscriber must resync.
    fn resync(&self, stats: &Counters) {
        if self.tx.try_send(RouterEvent::Resync).is_ok() {
            stats.resyncs.fetch_add(1, Ordering::Relaxed);
        } else {
            self.lagged.store(true, Ordering::Release);
        }
    }
}

/// Subscribers of one pattern.
struct Group {
    pattern: Pattern,
    subscribers: Vec<Arc<Subscriber>>,
}

/// Router-wide counters.
#[derive(Default)]
pub(crate) struct Counters {
    pub events: AtomicU64,
    pub delivered: AtomicU64,
    pub dropped: AtomicU64,
    pub resyncs: AtomicU64,
    pub suppressed: AtomicU64,
}

/// All subscribers of a node's router.
pub(crate) struct Table {
    /// This node's name, for self-origin suppression.
    node: String,
    buffer: usize,
    groups: RwLock<Vec<Group>>,
    next_id: AtomicU64,
    pub counters: Counters,
}

impl Table {
    pub fn new(node: String, buffer: usize) -> Self {
        Table {
            node,
            buffer: buffer.max(1),
            groups: RwLock::new(Vec::new()),
            next_id: AtomicU64::new(1),
            counters: Counters::default(),
        }
    }

    /// Adds a subscriber; returns it and its receiving end.
    pub fn add(
        &self,
        pattern: Pattern,
        origin: Option<String>,
    ) -> (Arc<Subscriber>, mpsc::Receiver<RouterEvent>) {
        let (tx, rx) = mpsc::channel(self.buffer);
        let subscriber = Arc::new(Subscriber {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            origin,
            tx,
            lagged: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        });
        let mut groups = self.groups.write();
        match groups.iter_mut().find(|g| g.pattern == pattern) {
            Some(group) => group.subscribers.push(subscriber.clone()),
            None => groups.push(Group {
                pattern,
                subscribers: vec![subscriber.clone()],
            }),
        }
        (subscriber, rx)
    }

    /// Removes a subscriber (and its group when it was the last).
    pub fn remove(&self, id: u64) {
        let mut groups = self.groups.write();
        for group in groups.iter_mut() {
            group.subscribers.retain(|s| s.id != id);
        }
        groups.retain(|g| !g.subscribers.is_empty());
    }

    /// Delivers one event to every matching subscriber, except the cache of this node that
    /// caused it.
    pub fn dispatch(&self, event: Arc<ConfigEvent>) {
        self.counters.events.fetch_add(1, Ordering::Relaxed);
        let envelope = event.envelope();
        let own_origin = (envelope.node() == Some(self.node.as_str()))
            .then(|| envelope.get_str("Origin-Cache"))
            .flatten();
        let groups = self.groups.read();
        for group in groups.iter() {
            if !group.pattern.matches(event.routing_key()) {
                continue;
            }
            for subscriber in &group.subscribers {
                if own_origin.is_some() && subscriber.origin.as_deref() == own_origin {
                    self.counters.suppressed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                subscriber.deliver(&event, &self.counters);
            }
        }
    }

    /// A broker-side gap: every subscriber gets a `Resync`.
    pub fn resync_all(&self) {
        for group in self.groups.read().iter() {
            for subscriber in &group.subscribers {
                subscriber.resync(&self.counters);
            }
        }
    }

    /// (subscribers, distinct patterns).
    pub fn size(&self) -> (usize, usize) {
        let groups = self.groups.read();
        (
            groups.iter().map(|g| g.subscribers.len()).sum(),
            groups.len(),
        )
    }
}
