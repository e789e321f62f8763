//! A pool's figures for `/metrics`: its occupancy and counters (read at a scrape), and
//! its calls and checkout waits (observed as they happen).
//!
//! Owns the metric names of pools. Must not touch checkouts or calls themselves.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use tokio::time::Instant;
use warren_runtime::metrics::{Histogram, Metrics, Report, Source};

use super::rpc::RpcError;
use super::{ListenerPool, PoolInner};

/// Calls through a pool's checkouts, and how long checkouts waited.
pub(crate) struct RpcFigures {
    calls: AtomicU64,
    timeouts: AtomicU64,
    returned: AtomicU64,
    /// Replies that came after their call ended (shared with every worker's inbox and the
    /// reply queue).
    pub late: Arc<AtomicU64>,
    /// Deliveries of temporary bindings dropped because their holder did not read
    /// (shared with every worker's inbox).
    pub dropped: Arc<AtomicU64>,
    call_seconds: Option<Histogram>,
    checkout_seconds: Option<Histogram>,
}

impl RpcFigures {
    /// Counters at zero; histograms as `metrics` has them.
    pub fn new(metrics: &Metrics) -> Self {
        RpcFigures {
            calls: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            returned: AtomicU64::new(0),
            late: Arc::default(),
            dropped: Arc::default(),
            call_seconds: metrics.seconds(),
            checkout_seconds: metrics.seconds(),
        }
    }

    /// A call (or collecting call) started at `started` ended with `error`, if any.
    pub fn call(&self, started: Instant, error: Option<&RpcError>) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match error {
            Some(RpcError::Timeout(_)) => {
                self.timeouts.fetch_add(1, Ordering::Relaxed);
            }
            Some(RpcError::Returned(_)) => {
                self.returned.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        if let Some(seconds) = &self.call_seconds {
            seconds.observe(started.elapsed().as_secs_f64());
        }
    }

    /// Runs a call and records it (its time, and how it failed).
    pub async fn timed<T>(
        &self,
        call: impl Future<Output = Result<T, RpcError>>,
    ) -> Result<T, RpcError> {
        let started = Instant::now();
        let result = call.await;
        self.call(started, result.as_ref().err());
        result
    }

    /// A checkout got its worker after waiting since `started`.
    pub fn checkout(&self, started: Instant) {
        if let Some(seconds) = &self.checkout_seconds {
            seconds.observe(started.elapsed().as_secs_f64());
        }
    }
}

/// A pool's figures for `/metrics` (held weakly: the pool owns its registration).
pub(crate) struct PoolFigures(pub Weak<PoolInner>);

impl Source for PoolFigures {
    fn report(&self, report: &mut Report) {
        let Some(inner) = self.0.upgrade() else {
            return;
        };
        let pool = inner.name.clone();
        let stats = ListenerPool {
            inner: inner.clone(),
        }
        .stats();
        let labels = || vec![("pool", pool.clone())];
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        for (name, help, value) in [
            (
                "warren_pool_workers",
                "Workers running or starting.",
                stats.workers,
            ),
            ("warren_pool_busy", "Workers checked out now.", stats.busy),
            (
                "warren_pool_waiting",
                "Checkouts waiting for a free worker now.",
                stats.waiting,
            ),
        ] {
            report.gauge(name, help, labels(), gauge(value));
        }
        for (name, help, value) in [
            (
                "warren_pool_checkouts",
                "Workers checked out.",
                stats.checkouts,
            ),
            (
                "warren_pool_full",
                "Checkouts that failed with PoolFull.",
                stats.full,
            ),
            (
                "warren_pool_workers_started",
                "Overflow workers started.",
                stats.overflow_started,
            ),
            (
                "warren_pool_workers_retired",
                "Overflow workers retired when idle.",
                stats.overflow_retired,
            ),
        ] {
            report.counter(name, help, labels(), value);
        }
        let rpc = &inner.rpc;
        for (name, help, counter) in [
            (
                "warren_rpc_calls",
                "Calls made through the pool's checkouts.",
                &rpc.calls,
            ),
            (
                "warren_rpc_timeouts",
                "Calls without a reply within their timeout.",
                &rpc.timeouts,
            ),
            (
                "warren_rpc_returned",
                "Calls whose request was returned as unroutable.",
                &rpc.returned,
            ),
            (
                "warren_pool_late_replies",
                "Replies that reached a worker after their call had ended; dropped.",
                &*rpc.late,
            ),
            (
                "warren_pool_dropped_deliveries",
                "Deliveries of a checkout's temporary bindings dropped: the holder left no room in its buffer for a second.",
                &*rpc.dropped,
            ),
        ] {
            report.counter(name, help, labels(), counter.load(Ordering::Relaxed));
        }
        report.histogram(
            "warren_rpc_call_seconds",
            "Time from a call's request to its outcome.",
            labels(),
            rpc.call_seconds.as_ref(),
        );
        report.histogram(
            "warren_pool_checkout_seconds",
            "Time a checkout waited for its worker.",
            labels(),
            rpc.checkout_seconds.as_ref(),
        );
    }

    fn describe(&self) -> Option<(&'static str, serde_json::Value)> {
        let inner = self.0.upgrade()?;
        let pool = inner.name.clone();
        let (size, overflow) = (inner.config.size, inner.config.overflow);
        let stats = ListenerPool { inner }.stats();
        Some((
            "pools",
            serde_json::json!({
                "pool": pool,
                "size": size,
                "overflow": overflow,
                "workers": stats.workers,
                "busy": stats.busy,
                "waiting": stats.waiting,
                "full": stats.full,
            }),
        ))
    }
}
