//! Counting redeliveries, so that a message that keeps failing is rejected (dead-lettered)
//! instead of being requeued forever.
//!
//! Quorum queues count deliveries themselves (`x-delivery-count`); that count is used when
//! present. Classic queues only flag a message as redelivered, so the listener counts the
//! redeliveries it sees itself, keyed by a hash of the body (a redelivered message carries
//! the same body, even when it has no Msg-ID). The table is bounded: when full it is
//! cleared, which can only make a poison message survive a few more rounds.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use lapin::message::Delivery;
use lapin::types::AMQPValue;
use parking_lot::Mutex;

/// Entries kept before the table is cleared.
const CAPACITY: usize = 10_000;

/// Redeliveries seen per message body.
#[derive(Default)]
pub(crate) struct RedeliveryCounts {
    counts: Mutex<HashMap<u64, u32>>,
}

/// Identifies one message body across its redeliveries.
pub(crate) type BodyKey = u64;

impl RedeliveryCounts {
    /// How many times this delivery has been redelivered (0 for a first delivery), and the
    /// key under which it was counted, if it was.
    pub fn observe(&self, delivery: &Delivery) -> (u32, Option<BodyKey>) {
        if !delivery.redelivered {
            return (0, None);
        }
        if let Some(count) = delivery_count_header(delivery) {
            return (count, None);
        }
        let mut hasher = DefaultHasher::new();
        delivery.data.hash(&mut hasher);
        delivery.routing_key.as_str().hash(&mut hasher);
        let key = hasher.finish();
        let mut counts = self.counts.lock();
        if counts.len() >= CAPACITY && !counts.contains_key(&key) {
            counts.clear();
        }
        let count = counts.entry(key).or_insert(0);
        *count += 1;
        (*count, Some(key))
    }

    /// The message is settled for good (acked or rejected): forget it.
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

    #[test]
    fn first_deliveries_are_not_counted() {
        let counts = RedeliveryCounts::default();
        assert_eq!(counts.observe(&delivery(b"a", false, None)).0, 0);
    }

    #[test]
    fn classic_queue_redeliveries_are_counted_per_body() {
        let counts = RedeliveryCounts::default();
        let (first, key) = counts.observe(&delivery(b"a", true, None));
        assert_eq!(first, 1);
        assert_eq!(counts.observe(&delivery(b"a", true, None)).0, 2);
        assert_eq!(counts.observe(&delivery(b"b", true, None)).0, 1);
        counts.forget(key.expect("counted under a key"));
        assert_eq!(counts.observe(&delivery(b"a", true, None)).0, 1);
    }

    #[test]
    fn quorum_delivery_count_wins() {
        let counts = RedeliveryCounts::default();
        let mut headers = FieldTable::default();
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(7));
        assert_eq!(
            counts.observe(&delivery(b"a", true, Some(headers))),
            (7, None)
        );
    }
}
