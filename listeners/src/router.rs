//! The configuration-event router (Kazoo's "AMQP router", kz_cache_listener with
//! kazoo_bindings), with its gaps closed: one listener per node on the `configuration`
//! topic exchange binds once per distinct pattern and fans events out in the process.
//!
//! - Subscribers register routing-key patterns (`*` one word, `#` zero or more) and get a
//!   stream of [`RouterEvent`]s.
//! - One broker binding per distinct pattern, reference-counted: it is added with the first
//!   subscriber of the pattern and removed with the last.
//! - Fan-out never waits: every matching subscriber gets every matching event, in order,
//!   into a bounded buffer; one that falls behind gets `Resync` where events were dropped,
//!   a counter rises, and the others are not slowed.
//! - After any broker-side gap (a new channel after a loss, a failover or a fail-back) every
//!   subscriber gets `Resync`, so caches can flush.
//! - An event carrying this node's `Node` and `Origin-Cache = C` is not delivered to the
//!   subscriber registered as origin C (the cache that made the change), but to the others.
//!
//! Files: `pattern` (topic matching), `table` (subscribers and delivery).

mod pattern;
mod table;

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::sync::{Mutex, mpsc};
use warren_runtime::actor_slot::ActorSlot;
use warren_runtime::envelope::{Envelope, Stamp};
use warren_runtime::metrics::{MetricsEntry, Report, Source};
use warren_runtime::node::NodeContext;
use warren_runtime::supervisor::{
    ChildSpec, Intensity, StopOrder, Supervisor, SupervisorMsg, SupervisorSpec,
};

pub use pattern::Pattern;
use table::{Subscriber, Table};

use crate::listener::{
    Binding, Event, Exchange, Listener, ListenerHandle, ListenerSpec, Notice, SpecError,
    node_listener_child,
};

/// A configuration event as subscribers receive it (shared by all of them, not copied).
pub struct ConfigEvent {
    event: Event,
}

impl ConfigEvent {
    /// The routing key it was published with (`doc_edited.<db>.<type>.<id>`, …).
    pub fn routing_key(&self) -> &str {
        &self.event.delivery().routing_key
    }

    /// The decoded body (`Event-Name` doc_edited …, `Database`, `Type`, `ID`, …).
    pub fn envelope(&self) -> &Envelope {
        self.event.envelope()
    }
}

impl fmt::Debug for ConfigEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigEvent")
            .field("routing_key", &self.routing_key())
            .field("envelope", self.envelope())
            .finish()
    }
}

/// What a subscription yields.
#[derive(Clone, Debug)]
pub enum RouterEvent {
    Event(Arc<ConfigEvent>),
    /// Events were lost here (this subscriber fell behind, or the broker connection had a
    /// gap): flush what depends on them.
    Resync,
}

/// Why a subscription could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("routing-key pattern longer than 255 bytes")]
    InvalidPattern,
    #[error("the router is not running")]
    NotRunning,
    #[error("the broker refused the binding: {0}")]
    Broker(String),
}

/// Counters of a router.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouterStats {
    pub subscribers: usize,
    /// Distinct patterns, each one broker binding.
    pub patterns: usize,
    /// Events received from the broker.
    pub events: u64,
    /// Events handed to subscribers.
    pub delivered: u64,
    /// Events dropped for subscribers that fell behind.
    pub dropped: u64,
    /// `Resync` markers handed out.
    pub resyncs: u64,
    /// Events withheld from the cache of this node that caused them.
    pub suppressed: u64,
}

/// The node's router: cheap to clone.
#[derive(Clone)]
pub struct ConfigRouter {
    inner: Arc<RouterInner>,
}

struct RouterInner {
    exchange: String,
    table: Arc<Table>,
    handle: ListenerHandle,
    child: ChildSpec,
    /// Subscribers per pattern; changes to bindings happen under this lock, in order.
    bindings: Mutex<HashMap<String, usize>>,
    /// A router started with `spawn` (outside the tree).
    standalone: ActorSlot<SupervisorMsg>,
}

/// The router's figures for `/metrics`.
struct RouterFigures(Arc<Table>);

impl Source for RouterFigures {
    fn report(&self, report: &mut Report) {
        let counters = &self.0.counters;
        let (subscribers, patterns) = self.0.size();
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        report.gauge(
            "warren_router_subscribers",
            "Subscribers of the configuration-event router.",
            vec![],
            count(subscribers),
        );
        report.gauge(
            "warren_router_patterns",
            "Distinct patterns, each one broker binding.",
            vec![],
            count(patterns),
        );
        for (name, help, counter) in [
            (
                "warren_router_events",
                "Events received from the broker.",
                &counters.events,
            ),
            (
                "warren_router_deliveries",
                "Events handed to subscribers.",
                &counters.delivered,
            ),
            (
                "warren_router_drops",
                "Events dropped for subscribers that fell behind.",
                &counters.dropped,
            ),
            (
                "warren_router_resyncs",
                "Resync markers handed out.",
                &counters.resyncs,
            ),
        ] {
            report.counter(name, help, vec![], counter.load(Ordering::Relaxed));
        }
    }

    fn describe(&self) -> Option<(&'static str, serde_json::Value)> {
        let counters = &self.0.counters;
        let (subscribers, patterns) = self.0.size();
        Some((
            "router",
            serde_json::json!({
                "subscribers": subscribers,
                "patterns": patterns,
                "events": counters.events.load(Ordering::Relaxed),
                "drops": counters.dropped.load(Ordering::Relaxed),
                "resyncs": counters.resyncs.load(Ordering::Relaxed),
            }),
        ))
    }
}

/// The listener behind the router.
struct RouterListener {
    exchange: String,
    table: Arc<Table>,
    /// Channels the router has set up; every one after the first follows a gap.
    channels: AtomicUsize,
    /// The router's figures in `/metrics`, for as long as its listener exists (the tree
    /// holds it; handles of the router may all be gone).
    _figures: MetricsEntry,
}

impl Listener for RouterListener {
    fn spec(&self) -> ListenerSpec {
        let table = self.table.clone();
        ListenerSpec::new("router")
            .exchange(Exchange::topic(&self.exchange))
            .responder("*", "*", move |event: Event| {
                table.dispatch(Arc::new(ConfigEvent { event }));
                async { Ok(()) }
            })
    }

    fn on_notice(&self, notice: &Notice) {
        if let Notice::QueueCreated { .. } = notice
            && self.channels.fetch_add(1, Ordering::SeqCst) > 0
        {
            // A new channel after a loss or a move: events may have been missed since
            // the last one. The bindings are in place again before this notice.
            tracing::info!("router on a new channel: every subscriber resyncs");
            self.table.resync_all();
        }
    }
}

impl ConfigRouter {
    /// The router of a node (`[router]` exchange and buffer); it runs once its child (or
    /// `spawn`) is started. Fails only if config.ini's `[router] exchange` cannot be an
    /// exchange name (config validation refuses such names first).
    pub fn new(node: &NodeContext) -> Result<Self, SpecError> {
        let config = &node.router;
        let table = Arc::new(Table::new(node.node.clone(), config.buffer));
        let listener = RouterListener {
            exchange: config.exchange.clone(),
            table: table.clone(),
            channels: AtomicUsize::new(0),
            _figures: node
                .metrics
                .register(Arc::new(RouterFigures(table.clone()))),
        };
        let stamp = Stamp {
            app_name: "warren".to_string(),
            app_version: env!("CARGO_PKG_VERSION").to_string(),
            node: node.node.clone(),
        };
        let (mut child, handle) = node_listener_child(listener, node, stamp)?;
        child.id = "router".to_string();
        Ok(ConfigRouter {
            inner: Arc::new(RouterInner {
                exchange: config.exchange.clone(),
                table: table.clone(),
                handle,
                child,
                bindings: Mutex::new(HashMap::new()),
                standalone: ActorSlot::default(),
            }),
        })
    }

    /// The supervisor child `router` (the node runs it between bootstrap and the apps).
    pub fn child(&self) -> ChildSpec {
        self.inner.child.clone()
    }

    /// Starts the router outside the tree (tools, tests); stop it with `stop`.
    pub async fn spawn(&self) -> Result<(), RouterError> {
        let spec = SupervisorSpec::one_for_one(
            "router",
            StopOrder::Sequential,
            Intensity::new(5, Duration::from_secs(30)),
            vec![self.child()],
        );
        let (supervisor, _) = Supervisor::spawn(spec)
            .await
            .map_err(|_| RouterError::NotRunning)?;
        self.inner.standalone.set(supervisor);
        Ok(())
    }

    /// Stops a router started with `spawn`.
    pub async fn stop(&self) {
        let supervisor = self.inner.standalone.take();
        if let Some(supervisor) = supervisor {
            let _ = supervisor
                .stop_and_wait(None, Some(Duration::from_secs(15)))
                .await;
        }
    }

    /// The router's own listener (its queue, consuming state, current grant).
    pub fn listener(&self) -> &ListenerHandle {
        &self.inner.handle
    }

    /// Subscribes to the events whose routing key matches `pattern`.
    pub async fn subscribe(&self, pattern: &str) -> Result<Subscription, RouterError> {
        self.subscribe_with(pattern, None).await
    }

    /// Subscribes as the cache `origin`: events this node publishes with
    /// `Origin-Cache = origin` are not delivered to this subscription.
    pub async fn subscribe_as(
        &self,
        pattern: &str,
        origin: &str,
    ) -> Result<Subscription, RouterError> {
        self.subscribe_with(pattern, Some(origin.to_string())).await
    }

    async fn subscribe_with(
        &self,
        text: &str,
        origin: Option<String>,
    ) -> Result<Subscription, RouterError> {
        let pattern = Pattern::parse(text).ok_or(RouterError::InvalidPattern)?;
        let mut bindings = self.inner.bindings.lock().await;
        let first = !bindings.contains_key(text);
        if first {
            self.inner
                .handle
                .add_binding(Binding::new(&self.inner.exchange, text))
                .await
                .map_err(|e| match e {
                    crate::listener::ListenerError::NotRunning => RouterError::NotRunning,
                    other => RouterError::Broker(other.to_string()),
                })?;
        }
        *bindings.entry(text.to_string()).or_insert(0) += 1;
        let (subscriber, rx) = self.inner.table.add(pattern, origin);
        Ok(Subscription {
            rx,
            subscriber,
            pattern: text.to_string(),
            router: Some(self.clone()),
        })
    }

    /// Removes one subscriber of `pattern`; the binding goes with the last one.
    async fn unsubscribe(&self, id: u64, pattern: &str) {
        self.inner.table.remove(id);
        let mut bindings = self.inner.bindings.lock().await;
        let last = match bindings.get_mut(pattern) {
            Some(count) => {
                *count -= 1;
                *count == 0
            }
            None => false,
        };
        if last {
            bindings.remove(pattern);
            let binding = Binding::new(&self.inner.exchange, pattern);
            if let Err(error) = self.inner.handle.remove_binding(binding).await {
                tracing::warn!(pattern, %error, "cannot remove the router's binding");
            }
        }
    }

    /// The patterns the router's queue is bound with.
    pub fn patterns(&self) -> Vec<String> {
        self.inner
            .handle
            .bindings()
            .into_iter()
            .filter(|b| b.exchange == self.inner.exchange)
            .map(|b| b.routing_key)
            .collect()
    }

    pub fn stats(&self) -> RouterStats {
        let counters = &self.inner.table.counters;
        let (subscribers, patterns) = self.inner.table.size();
        RouterStats {
            subscribers,
            patterns,
            events: counters.events.load(Ordering::Relaxed),
            delivered: counters.delivered.load(Ordering::Relaxed),
            dropped: counters.dropped.load(Ordering::Relaxed),
            resyncs: counters.resyncs.load(Ordering::Relaxed),
            suppressed: counters.suppressed.load(Ordering::Relaxed),
        }
    }
}

/// One subscriber's stream of events. Dropping it unsubscribes.
pub struct Subscription {
    rx: mpsc::Receiver<RouterEvent>,
    subscriber: Arc<Subscriber>,
    pattern: String,
    router: Option<ConfigRouter>,
}

impl Subscription {
    /// The next event or `Resync`; `None` once the router is gone.
    pub async fn next(&mut self) -> Option<RouterEvent> {
        std::future::poll_fn(|cx| self.poll(cx)).await
    }

    /// The next event within `timeout`.
    pub async fn next_within(&mut self, timeout: Duration) -> Option<RouterEvent> {
        tokio::time::timeout(timeout, self.next())
            .await
            .ok()
            .flatten()
    }

    /// Events dropped for this subscriber because it fell behind.
    pub fn dropped(&self) -> u64 {
        self.subscriber.dropped.load(Ordering::Relaxed)
    }

    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Unsubscribes now (the binding goes with the pattern's last subscriber).
    pub async fn unsubscribe(mut self) {
        if let Some(router) = self.router.take() {
            router.unsubscribe(self.subscriber.id, &self.pattern).await;
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<RouterEvent>> {
        if let Ok(event) = self.rx.try_recv() {
            return Poll::Ready(Some(event));
        }
        // Everything buffered before the loss is read: the `Resync` goes here.
        if self.subscriber.lagged.swap(false, Ordering::AcqRel) {
            return Poll::Ready(Some(RouterEvent::Resync));
        }
        self.rx.poll_recv(cx)
    }
}

impl Stream for Subscription {
    type Item = RouterEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<RouterEvent>> {
        self.poll(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let Some(router) = self.router.take() else {
            return;
        };
        let (id, pattern) = (self.subscriber.id, self.pattern.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { router.unsubscribe(id, &pattern).await });
            }
            Err(_) => router.inner.table.remove(id),
        }
    }
}
