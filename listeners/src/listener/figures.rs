//! A listener's figures for `/metrics`: its message counters (kept by the consumer loop
//! anyway, read only at a scrape), messages in flight, handler and drain times, and
//! whether it consumes.
//!
//! Owns the metric names of listeners. Must not touch counting (the consumer loop's).

use std::sync::Arc;

use serde_json::{Value, json};
use warren_runtime::metrics::{Report, Source};

use super::shared::ListenerShared;

/// The figures of one listener, registered while its actor runs.
pub(crate) struct ListenerFigures(pub Arc<ListenerShared>);

impl Source for ListenerFigures {
    fn report(&self, report: &mut Report) {
        let shared = &self.0;
        let stats = shared.stats.snapshot();
        let labels = || vec![("listener", shared.name.clone())];
        for (name, help, value) in [
            (
                "warren_listener_deliveries",
                "Messages the broker delivered to the listener.",
                stats.received,
            ),
            (
                "warren_listener_acks",
                "Messages acknowledged (handled, or parked).",
                stats.acked,
            ),
            (
                "warren_listener_nacks",
                "Messages given back to the queue (a retry, a panic, deferred).",
                stats.requeued,
            ),
            (
                "warren_listener_rejects",
                "Messages taken off the queue for good (dead-lettered or parked).",
                stats.rejected,
            ),
            (
                "warren_listener_parked",
                "Of the rejects: messages moved to the parking queue.",
                stats.parked,
            ),
            (
                "warren_listener_undecodable",
                "Messages that are not a valid envelope (or too large, or with invalid fields).",
                stats.undecodable,
            ),
            (
                "warren_listener_handler_panics",
                "Panics of app code on a message.",
                stats.handler_panics,
            ),
            (
                "warren_listener_unconfirmed",
                "Messages retried because a publish of their handlers was not confirmed.",
                stats.unconfirmed,
            ),
            (
                "warren_listener_duplicates",
                "Messages acked without running the handlers: their Msg-ID was handled already (dedup window).",
                stats.duplicates,
            ),
        ] {
            report.counter(name, help, labels(), value);
        }
        report.gauge(
            "warren_listener_in_flight",
            "Messages received and not settled yet (handlers running or confirms owed).",
            labels(),
            i64::try_from(shared.in_flight()).unwrap_or(i64::MAX),
        );
        report.histogram(
            "warren_listener_handler_seconds",
            "How long the handlers of one message ran.",
            labels(),
            shared.handler_seconds.as_ref(),
        );
        report.histogram(
            "warren_listener_drain_seconds",
            "How long fail-back drains took, from the fail-back to the old queue let go.",
            labels(),
            shared.drain_seconds.as_ref(),
        );
        report.gauge(
            "warren_listener_consuming",
            "Whether the listener consumes now (1) or not (0).",
            labels(),
            i64::from(*shared.consuming.borrow()),
        );
    }

    fn describe(&self) -> Option<(&'static str, Value)> {
        let shared = &self.0;
        let stats = shared.stats.snapshot();
        let current = *shared.current.read();
        Some((
            "listeners",
            json!({
                "listener": shared.name,
                "queue": shared.topology.lock().queue_name,
                "broker": current.map(|current| current.broker.0),
                "grant": current.map(|current| current.grant),
                "generation": current.map(|current| current.connection),
                "consuming": *shared.consuming.borrow(),
                "in_flight": shared.in_flight(),
                "deliveries": stats.received,
                "acks": stats.acked,
                "nacks": stats.requeued,
                "rejects": stats.rejected,
            }),
        ))
    }
}
