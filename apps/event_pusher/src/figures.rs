//! The event pusher's figures under MongooseIM's metric names, as Prometheus metrics with
//! a `broker` label where MongooseIM has a host (`<host>.backends.mod_event_pusher_rabbit.*`
//! becomes `warren_event_pusher_*{broker="…"}`):
//!
//! | MongooseIM | here |
//! |---|---|
//! | `connections_active` | `warren_event_pusher_connections_active` (gauge: the publish connection is up) |
//! | `connections_opened` / `connections_closed` / `connection_failed` | `warren_event_pusher_connections_opened_total` / `_closed_total` / `_failed_total` |
//! | `messages_published` / `messages_failed` / `messages_timeout` | `warren_event_pusher_messages_published_total` / `_failed_total` / `_timeout_total` |
//! | `message_publish_time` | `warren_event_pusher_message_publish_time_seconds` (histogram, confirmed only) |
//! | `message_payload_size` | `warren_event_pusher_message_payload_size_bytes` (histogram, confirmed only) |
//!
//! Events are counted once each, when their outcome is final (a rewound event is not a
//! failure). The connection figures are the node's publish connection's, which the
//! pusher publishes on. Owns these figures; must not touch publishing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use warren_listeners::prelude::*;

/// One broker's counts and histograms.
struct BrokerFigures {
    published: AtomicU64,
    failed: AtomicU64,
    timeout: AtomicU64,
    publish_time: Option<Histogram>,
    payload_size: Option<Histogram>,
}

/// What the event pusher published, per broker.
///
/// It exists so that an operator who watched MongooseIM's event pusher finds the same
/// figures under the same names.
pub struct PusherFigures {
    registry: ConnectionRegistry,
    brokers: Vec<BrokerFigures>,
    /// Events that failed before reaching any broker (no broker, blocked, timed out
    /// waiting for a channel).
    unplaced_timeout: AtomicU64,
    unplaced_failed: AtomicU64,
}

impl PusherFigures {
    pub fn new(registry: ConnectionRegistry, metrics: &Metrics) -> Self {
        let brokers = (0..registry.brokers().len())
            .map(|_| BrokerFigures {
                published: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                timeout: AtomicU64::new(0),
                publish_time: metrics.seconds(),
                payload_size: metrics.bytes(),
            })
            .collect();
        PusherFigures {
            registry,
            brokers,
            unplaced_timeout: AtomicU64::new(0),
            unplaced_failed: AtomicU64::new(0),
        }
    }

    /// An event confirmed by `broker`, `took` after its write, of `bytes`.
    pub fn published(&self, broker: BrokerId, took: Duration, bytes: usize) {
        if let Some(figures) = self.brokers.get(broker.0) {
            figures.published.fetch_add(1, Ordering::Relaxed);
            if let Some(histogram) = &figures.publish_time {
                histogram.observe(took.as_secs_f64());
            }
            if let Some(histogram) = &figures.payload_size {
                histogram.observe(bytes as f64);
            }
        }
    }

    /// An event written to `broker` that failed for good.
    pub fn failed(&self, broker: BrokerId, error: &PublishError) {
        if let Some(figures) = self.brokers.get(broker.0) {
            let counter = if is_timeout(error) {
                &figures.timeout
            } else {
                &figures.failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An event that failed for good without a broker to count it against.
    pub fn unpublished(&self, error: &PublishError) {
        let counter = if is_timeout(error) {
            &self.unplaced_timeout
        } else {
            &self.unplaced_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

fn is_timeout(error: &PublishError) -> bool {
    matches!(
        error,
        PublishError::Timeout(_)
            | PublishError::Blocked { .. }
            | PublishError::NoBroker(_)
            | PublishError::BrokerUnavailable { .. }
    )
}

impl MetricsSource for PusherFigures {
    fn report(&self, report: &mut Report) {
        for (broker, figures) in self.registry.brokers().iter().zip(&self.brokers) {
            let labels = || vec![("broker", broker.uri.redacted().to_string())];
            let up = self
                .registry
                .status(broker.id)
                .is_some_and(|status| status.publish_available);
            report.gauge(
                "warren_event_pusher_connections_active",
                "Whether the publish connection the event pusher uses is open (1) or not (0).",
                labels(),
                i64::from(up),
            );
            let tally = self
                .registry
                .connection_counts(broker.id, Role::Publish)
                .unwrap_or_default();
            for (name, help, value) in [
                (
                    "warren_event_pusher_connections_opened",
                    "Publish connections opened.",
                    tally.opened,
                ),
                (
                    "warren_event_pusher_connections_closed",
                    "Open publish connections lost.",
                    tally.lost,
                ),
                (
                    "warren_event_pusher_connections_failed",
                    "Publish connection attempts that failed.",
                    tally.failed,
                ),
                (
                    "warren_event_pusher_messages_published",
                    "Events the broker confirmed.",
                    figures.published.load(Ordering::Relaxed),
                ),
                (
                    "warren_event_pusher_messages_failed",
                    "Events the broker refused (nacked past their deadline, or refused).",
                    figures.failed.load(Ordering::Relaxed),
                ),
                (
                    "warren_event_pusher_messages_timeout",
                    "Events written to the broker and not confirmed by their deadline.",
                    figures.timeout.load(Ordering::Relaxed),
                ),
            ] {
                report.counter(name, help, labels(), value);
            }
            report.histogram(
                "warren_event_pusher_message_publish_time_seconds",
                "Time from writing an event to its confirm (confirmed events only).",
                labels(),
                figures.publish_time.as_ref(),
            );
            report.histogram(
                "warren_event_pusher_message_payload_size_bytes",
                "Body size of confirmed events.",
                labels(),
                figures.payload_size.as_ref(),
            );
        }
        let none = || vec![("broker", String::new())];
        report.counter(
            "warren_event_pusher_messages_timeout",
            "Events written to the broker and not confirmed by their deadline.",
            none(),
            self.unplaced_timeout.load(Ordering::Relaxed),
        );
        report.counter(
            "warren_event_pusher_messages_failed",
            "Events the broker refused (nacked past their deadline, or refused).",
            none(),
            self.unplaced_failed.load(Ordering::Relaxed),
        );
    }
}
