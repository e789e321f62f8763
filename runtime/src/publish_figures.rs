//! What the node's publisher did, per broker: MongooseIM's set of publish metrics.
//!
//! Counted when a publish's outcome is known (the broker's confirm, a return, a nack, the
//! timeout); the two histograms (publish-to-confirm time and payload size) take
//! successful publishes only, so a broker that refuses fast does not look fast.
//!
//! Owns these figures. Must not touch publishing itself (the publisher's).

use std::sync::atomic::{AtomicU64, Ordering};
use tokio::time::Instant;

use crate::broker::BrokerId;
use crate::confirm::{PublishError, Published};
use crate::metrics::{Histogram, Metrics, Report, Source};
use crate::registry::ConnectionRegistry;

/// One broker's publish figures.
struct BrokerFigures {
    published: AtomicU64,
    failed: AtomicU64,
    timed_out: AtomicU64,
    confirm_seconds: Option<Histogram>,
    bytes: Option<Histogram>,
}

/// The publisher's figures, indexed by broker.
///
/// It exists so that an operator sees per broker how many messages went out, how many
/// the broker refused or returned, how many timed out, and how long confirms take.
pub struct PublishFigures {
    registry: ConnectionRegistry,
    brokers: Vec<BrokerFigures>,
}

impl PublishFigures {
    /// Figures for every broker of `registry`; histograms as `metrics` has them.
    pub fn new(registry: ConnectionRegistry, metrics: &Metrics) -> Self {
        let brokers = (0..registry.brokers().len())
            .map(|_| BrokerFigures {
                published: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                timed_out: AtomicU64::new(0),
                confirm_seconds: metrics.seconds(),
                bytes: metrics.bytes(),
            })
            .collect();
        PublishFigures { registry, brokers }
    }

    /// Counts the outcome of a publish of `bytes` written to `broker` at `written`.
    pub fn record(
        &self,
        broker: BrokerId,
        written: Instant,
        bytes: usize,
        outcome: &Result<Published, PublishError>,
    ) {
        let Some(figures) = self.brokers.get(broker.0) else {
            return;
        };
        match outcome {
            Ok(Published::Routed) => {
                figures.published.fetch_add(1, Ordering::Relaxed);
                if let Some(seconds) = &figures.confirm_seconds {
                    seconds.observe(written.elapsed().as_secs_f64());
                }
                if let Some(sizes) = &figures.bytes {
                    sizes.observe(bytes as f64);
                }
            }
            Ok(Published::Returned(_)) | Err(PublishError::Nacked) => {
                figures.failed.fetch_add(1, Ordering::Relaxed);
            }
            Err(PublishError::Timeout(_) | PublishError::Blocked { .. }) => {
                figures.timed_out.fetch_add(1, Ordering::Relaxed);
            }
            // Lost with its channel or refused: counted by the connection figures.
            Err(_) => {}
        }
    }
}

impl Source for PublishFigures {
    fn report(&self, report: &mut Report) {
        for (broker, figures) in self.registry.brokers().iter().zip(&self.brokers) {
            let labels = || vec![("broker", broker.uri.redacted().to_string())];
            for (name, help, counter) in [
                (
                    "warren_published",
                    "Messages the broker confirmed (acked, and routed when mandatory).",
                    &figures.published,
                ),
                (
                    "warren_publish_failed",
                    "Messages the broker nacked or returned as unroutable.",
                    &figures.failed,
                ),
                (
                    "warren_publish_timed_out",
                    "Messages without a confirm within the publish timeout (or blocked that long).",
                    &figures.timed_out,
                ),
            ] {
                report.counter(name, help, labels(), counter.load(Ordering::Relaxed));
            }
            report.histogram(
                "warren_publish_confirm_seconds",
                "Time from writing a message to its confirm (successful publishes).",
                labels(),
                figures.confirm_seconds.as_ref(),
            );
            report.histogram(
                "warren_publish_bytes",
                "Body size of confirmed messages.",
                labels(),
                figures.bytes.as_ref(),
            );
        }
    }
}
