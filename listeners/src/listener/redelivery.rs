//! Counting handler failures, so that a message that keeps failing is dead-lettered (or
//! parked) instead of being requeued forever — and only such a message.
//!
//! A message counts as failing only when a handler failed on it (an error asking for a
//! retry, or a panic). A redelivery caused by the infrastructure (a channel that died, a
//! stop that requeued it, a pool worker whose holder did not read) is not a failure.
//!
//! Quorum queues count deliveries themselves (`x-delivery-count`); that count is trusted on
//! quorum queues only. On a classic queue any publisher can set the header (a crafted
//! `x-delivery-count: 0` would otherwise disable the limit), so there the listener counts
//! failures itself, keyed by a hash of the body and routing key (a redelivered message
//! carries the same ones, even without a Msg-ID). The table is bounded: when full it is
//! cleared, which can only make a poison message survive a few more rounds.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use lapin::message::Delivery;
use lapin::types::AMQPValue;
use parking_lot::Mutex;

/// Entries kept before the table is cleared.
const CAPACITY: usize = 10_000;

/// Handler failures seen per message, on classic queues.
#[derive(Default)]
pub(crate) struct FailureCounts {
    counts: Mutex<HashMap<u64, u32>>,
}

/// Identifies one message across its redeliveries.
pub(crate) type BodyKey = u64;

/// The key a message is counted under.
pub(crate) fn body_key(data: &[u8], routing_key: &str) -> BodyKey {
    let mut hasher = DefaultHasher::new();
    data.hash(&mut hasher);
    routing_key.hash(&mut hasher);
    hasher.finish()
}

impl FailureCounts {
    /// How often handlers failed on this delivery before. `quorum`: the queue is a quorum
    /// queue, whose `x-delivery-count` is the broker's own count.
    pub fn before(&self, delivery: &Delivery, quorum: bool) -> u32 {
        if quorum {
            return delivery_count_header(delivery).unwrap_or(0);
        }
        if !delivery.redelivered {
            return 0;
        }
        let key = body_key(&delivery.data, delivery.routing_key.as_str());
        self.counts.lock().get(&key).copied().unwrap_or(0)
    }

    /// A handler failed on the message: its failures so far, this one included.
    /// `before` is what [`FailureCounts::before`] said at its delivery.
    pub fn failed(&self, key: BodyKey, before: u32, quorum: bool) -> u32 {
        if quorum {
            return before.saturating_add(1);
        }
        let mut counts = self.counts.lock();
        if counts.len() >= CAPACITY && !counts.contains_key(&key) {
            counts.clear();
        }
        let count = counts.entry(key).or_insert(0);
        *count = (*count).max(before).saturating_add(1);
        *count
    }

    /// The message is settled for good (acked, dead-lettered, parked): forget it.
    pub fn forget(&self, key: BodyKey) {
        self.counts.lock().remove(&key);
    }
}

/// `x-delivery-count` as set by quorum queues (deliveries before this one).
fn delivery_count_header(delivery: &Delivery) -> Option<u32> {
    let headers = delivery.properties.headers().as_ref()?;
    let value = headers.inner().get("x-delivery-count")?;
    match value {
        AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(*n),
        AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u32::from(*n)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::BasicProperties;
    use lapin::types::{FieldTable, ShortString};

    fn delivery(body: &[u8], redelivered: bool, headers: Option<FieldTable>) -> Delivery {
        let mut properties = BasicProperties::default();
        if let Some(headers) = headers {
            properties = properties.with_headers(headers);
        }
        let mut delivery = Delivery::mock(
            1,
            ShortString::from("ex"),
            ShortString::from("rk"),
            redelivered,
            body.to_vec(),
        );
        delivery.properties = properties;
        delivery
    }

    fn count_header(n: i64) -> FieldTable {
        let mut headers = FieldTable::default();
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(n));
        headers
    }

    #[test]
    fn only_handler_failures_count() {
        let counts = FailureCounts::default();
        let key = body_key(b"a", "rk");
        // Redelivered after a channel loss, nothing failed: no failure.
        assert_eq!(counts.before(&delivery(b"a", true, None), false), 0);
        assert_eq!(counts.failed(key, 0, false), 1);
        assert_eq!(counts.before(&delivery(b"a", true, None), false), 1);
        assert_eq!(counts.failed(key, 1, false), 2);
        assert_eq!(
            counts.before(&delivery(b"a", false, None), false),
            0,
            "a first delivery (the same body published again) starts at 0"
        );
        assert_eq!(counts.before(&delivery(b"b", true, None), false), 0);
        counts.forget(key);
        assert_eq!(counts.before(&delivery(b"a", true, None), false), 0);
    }

    #[test]
    fn a_crafted_delivery_count_is_ignored_on_classic_queues() {
        let counts = FailureCounts::default();
        let key = body_key(b"a", "rk");
        counts.failed(key, 0, false);
        counts.failed(key, 1, false);
        let crafted = delivery(b"a", true, Some(count_header(0)));
        assert_eq!(counts.before(&crafted, false), 2, "the header says 0");
        let crafted = delivery(b"c", true, Some(count_header(1000)));
        assert_eq!(counts.before(&crafted, false), 0, "nor can it park");
    }

    #[test]
    fn quorum_queues_use_the_brokers_count() {
        let counts = FailureCounts::default();
        let quorum = delivery(b"a", true, Some(count_header(7)));
        assert_eq!(counts.before(&quorum, true), 7);
        assert_eq!(counts.failed(body_key(b"a", "rk"), 7, true), 8);
    }
}
