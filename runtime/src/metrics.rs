//! Metrics: what every part of a node has done, read when Prometheus scrapes `/metrics`.
//!
//! A part (the broker registry, the publisher, a listener, a pool, the router) registers
//! a [`Source`] while it lives; at each scrape every source writes its figures into a
//! [`Report`], which is encoded in the Prometheus text format by `prometheus-client`.
//! Counters that the parts keep anyway (a listener's stats, a pool's) are read only
//! then, so the hot path pays nothing for them; only histograms are observed as things
//! happen ([`Histogram`], `prometheus-client`'s).
//!
//! Owns the table of sources and the encoding. Must not touch what the figures mean:
//! each source names and documents its own (the README lists them all).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
pub use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of one sample: `(name, value)` pairs, e.g. `[("listener", "echo")]`.
pub type Labels = Vec<(&'static str, String)>;

/// Something that has figures to report at each scrape.
pub trait Source: Send + Sync {
    /// Writes this part's figures into `report`.
    fn report(&self, report: &mut Report);

    /// What this part is doing now, for the status document: its kind (`listeners`,
    /// `pools`, `router`) and a JSON object; `None` for parts described elsewhere.
    fn describe(&self) -> Option<(&'static str, serde_json::Value)> {
        None
    }
}

/// The node's metrics: the sources registered now. Cheap to clone.
///
/// It exists so that one scrape sees every part of the node without any part keeping a
/// registry of its own or paying per message for figures it already counts.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    sources: Mutex<BTreeMap<u64, Arc<dyn Source>>>,
    next: AtomicU64,
    /// Histograms are observed (something scrapes them); counters always are.
    histograms: bool,
}

impl Default for Metrics {
    /// Metrics with histograms on.
    fn default() -> Self {
        Metrics::new(true)
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("sources", &self.inner.sources.lock().len())
            .finish()
    }
}

/// A registered source; it is removed when this is dropped (the part stopped).
pub struct MetricsEntry {
    id: u64,
    metrics: Metrics,
}

impl Drop for MetricsEntry {
    fn drop(&mut self) {
        // The source is dropped after the lock is released: dropping it may drop another
        // entry (a listener's figures hold the listener, which may hold the router's
        // entry), which takes the lock again.
        let removed = self.metrics.inner.sources.lock().remove(&self.id);
        drop(removed);
    }
}

impl Metrics {
    /// Metrics whose histograms are observed only if `histograms` (a node turns them on
    /// with its HTTP endpoint: nothing else reads them). Counters are kept either way: the
    /// parts count them anyway, and the status document reports them.
    pub fn new(histograms: bool) -> Self {
        Metrics {
            inner: Arc::new(Inner {
                sources: Mutex::default(),
                next: AtomicU64::new(0),
                histograms,
            }),
        }
    }

    /// A histogram of durations in seconds to observe, or `None` when histograms are off.
    pub fn seconds(&self) -> Option<Histogram> {
        self.inner.histograms.then(seconds_histogram)
    }

    /// A histogram of sizes in bytes to observe, or `None` when histograms are off.
    pub fn bytes(&self) -> Option<Histogram> {
        self.inner.histograms.then(bytes_histogram)
    }

    /// Adds `source` to every scrape until the returned entry is dropped.
    pub fn register(&self, source: Arc<dyn Source>) -> MetricsEntry {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        self.inner.sources.lock().insert(id, source);
        MetricsEntry {
            id,
            metrics: self.clone(),
        }
    }

    /// Every source's figures now.
    pub fn report(&self) -> Report {
        let sources: Vec<Arc<dyn Source>> = self.inner.sources.lock().values().cloned().collect();
        let mut report = Report::default();
        for source in sources {
            source.report(&mut report);
        }
        report
    }

    /// Every part that describes itself, grouped by kind (in registration order).
    pub fn describe(&self) -> BTreeMap<&'static str, Vec<serde_json::Value>> {
        let sources: Vec<Arc<dyn Source>> = self.inner.sources.lock().values().cloned().collect();
        let mut kinds: BTreeMap<&'static str, Vec<serde_json::Value>> = BTreeMap::new();
        for (kind, value) in sources.iter().filter_map(|source| source.describe()) {
            kinds.entry(kind).or_default().push(value);
        }
        kinds
    }

    /// The Prometheus text exposition of every source's figures now.
    pub fn encode(&self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Snapshot(self.report())));
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

/// One scrape's figures, grouped by metric name.
#[derive(Default)]
pub struct Report {
    families: BTreeMap<&'static str, Family>,
}

struct Family {
    help: &'static str,
    kind: MetricType,
    samples: Vec<(Labels, Value)>,
}

enum Value {
    Counter(u64),
    Gauge(i64),
    Histogram(Histogram),
}

impl Report {
    /// A count that only grows (exposed with the `_total` suffix).
    pub fn counter(&mut self, name: &'static str, help: &'static str, labels: Labels, value: u64) {
        self.add(
            name,
            help,
            MetricType::Counter,
            labels,
            Value::Counter(value),
        );
    }

    /// A value that goes up and down (a size, a state as 0/1).
    pub fn gauge(&mut self, name: &'static str, help: &'static str, labels: Labels, value: i64) {
        self.add(name, help, MetricType::Gauge, labels, Value::Gauge(value));
    }

    /// A distribution observed as things happened; nothing when histograms are off
    /// (`None`).
    pub fn histogram(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: Labels,
        histogram: Option<&Histogram>,
    ) {
        let Some(histogram) = histogram else {
            return;
        };
        let value = Value::Histogram(histogram.clone());
        self.add(name, help, MetricType::Histogram, labels, value);
    }

    fn add(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: MetricType,
        labels: Labels,
        value: Value,
    ) {
        self.families
            .entry(name)
            .or_insert_with(|| Family {
                help,
                kind,
                samples: Vec::new(),
            })
            .samples
            .push((labels, value));
    }

    /// The value of a counter or gauge sample whose labels include all of `labels`, summed
    /// over the samples that match (what a test reads back).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<i64> {
        let family = self.families.get(name)?;
        let mut found = None;
        for (own, value) in &family.samples {
            let matches = labels
                .iter()
                .all(|(k, v)| own.iter().any(|(ok, ov)| ok == k && ov == v));
            let value = match value {
                Value::Counter(v) => i64::try_from(*v).unwrap_or(i64::MAX),
                Value::Gauge(v) => *v,
                Value::Histogram(_) => continue,
            };
            if matches {
                *found.get_or_insert(0) += value;
            }
        }
        found
    }
}

/// A report handed to `prometheus-client` as a collector, encoded once.
struct Snapshot(Report);

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Snapshot")
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, family) in &self.0.families {
            let mut metric = encoder.encode_descriptor(name, family.help, None, family.kind)?;
            if let [(labels, value)] = family.samples.as_slice()
                && labels.is_empty()
            {
                value.encode(metric)?;
                continue;
            }
            for (labels, value) in &family.samples {
                value.encode(metric.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

impl Value {
    fn encode(&self, sample: prometheus_client::encoding::MetricEncoder) -> std::fmt::Result {
        match self {
            Value::Counter(v) => ConstCounter::new(*v).encode(sample),
            Value::Gauge(v) => ConstGauge::new(*v).encode(sample),
            Value::Histogram(h) => h.encode(sample),
        }
    }
}

/// Buckets for durations in seconds, from 50 µs to about 26 s.
pub fn seconds_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_05, 2.0, 20,
    ))
}

/// Buckets for sizes in bytes, from 64 B to 16 MiB.
pub fn bytes_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        64.0, 4.0, 10,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(u64);

    impl Source for Fixed {
        fn report(&self, report: &mut Report) {
            report.counter(
                "warren_test_things",
                "Things done.",
                vec![("part", format!("p{}", self.0))],
                self.0,
            );
            report.gauge(
                "warren_test_up",
                "Up.",
                vec![("part", self.0.to_string())],
                1,
            );
        }
    }

    #[test]
    fn sources_are_encoded_while_registered() {
        let metrics = Metrics::default();
        let first = metrics.register(Arc::new(Fixed(3)));
        let second = metrics.register(Arc::new(Fixed(4)));
        let text = metrics.encode();
        assert!(text.contains("# TYPE warren_test_things counter"), "{text}");
        assert!(
            text.contains("warren_test_things_total{part=\"p3\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("warren_test_things_total{part=\"p4\"} 4"),
            "{text}"
        );
        assert_eq!(
            text.matches("# TYPE warren_test_up gauge").count(),
            1,
            "{text}"
        );
        assert_eq!(metrics.report().value("warren_test_up", &[]), Some(2));
        assert_eq!(
            metrics.report().value("warren_test_up", &[("part", "4")]),
            Some(1)
        );
        drop(second);
        let text = metrics.encode();
        assert!(!text.contains("p4"), "{text}");
        drop(first);
        assert!(!metrics.encode().contains("warren_test_things"));
    }

    /// Regression: dropping an entry whose source owns another entry deadlocked (the
    /// router's figures inside a listener's, at `warren run`'s stop).
    #[test]
    fn a_source_that_owns_another_entry_can_be_dropped() {
        struct Owner(#[allow(dead_code)] MetricsEntry);
        impl Source for Owner {
            fn report(&self, _report: &mut Report) {}
        }
        let metrics = Metrics::default();
        let inner = metrics.register(Arc::new(Fixed(1)));
        let outer = metrics.register(Arc::new(Owner(inner)));
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(outer);
            let _ = done.send(());
        });
        assert!(
            finished
                .recv_timeout(std::time::Duration::from_secs(5))
                .is_ok(),
            "dropping the entry deadlocked"
        );
        assert!(metrics.report().value("warren_test_things", &[]).is_none());
    }

    struct Timed(Option<Histogram>);

    impl Source for Timed {
        fn report(&self, report: &mut Report) {
            report.histogram("warren_test_seconds", "Time.", vec![], self.0.as_ref());
        }
    }

    #[test]
    fn histograms_are_encoded_with_buckets() {
        let metrics = Metrics::default();
        let histogram = metrics.seconds();
        if let Some(histogram) = &histogram {
            histogram.observe(0.001);
        }
        let _entry = metrics.register(Arc::new(Timed(histogram)));
        let text = metrics.encode();
        assert!(text.contains("warren_test_seconds_count 1"), "{text}");
        assert!(
            text.contains("warren_test_seconds_bucket{le=\"+Inf\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn without_histograms_there_is_nothing_to_observe_or_report() {
        let metrics = Metrics::new(false);
        assert!(metrics.seconds().is_none() && metrics.bytes().is_none());
        let _entry = metrics.register(Arc::new(Timed(metrics.seconds())));
        let _counted = metrics.register(Arc::new(Fixed(3)));
        let text = metrics.encode();
        assert!(!text.contains("warren_test_seconds"), "{text}");
        assert!(
            text.contains("warren_test_things_total{part=\"p3\"} 3"),
            "counters are kept: {text}"
        );
    }
}
