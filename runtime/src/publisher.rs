//! The node's publisher: envelopes go out on a broker's publish connection with publisher
//! confirms. By default they follow the primary when it changes; [`Publisher::to_broker`]
//! pins them to one broker.
//!
//! - Confirms are awaited per publish, but many publishes are in flight at once (any
//!   number of tasks, or one task with many publish futures), bounded by `confirm_window`:
//!   the only buffer, and a bounded one. Every publisher made from one `Publisher::new`
//!   (stamped, pinned) shares that window.
//! - [`Publisher::publish`]: a publish whose connection dies before the confirm is retried
//!   on whatever broker is primary then, until its timeout; past it the caller gets a clear
//!   error. A retried message may arrive twice (at least once).
//! - [`Publisher::send`] returns as soon as the message's frames are queued on a channel
//!   (so that successive sends keep their order) and hands back a [`Sent`] future for the
//!   socket write and the confirm; nothing is retried after the queueing. It does not wait
//!   for the I/O loop to write the frames: a handler that replies goes on at once, one
//!   thread hop per message saved (a channel lost in between fails the `Sent` future).
//! - While no broker of the local zone is up (or the pinned broker's publish connection is
//!   down), or the broker blocks publishing (`connection.blocked`), a publish waits for at
//!   most its timeout and then fails with `NoBroker` / `BrokerUnavailable` or `Blocked`;
//!   never forever. `confirm.select` on a new channel is bounded by `operation_timeout`.
//! - A message carries a W3C `traceparent` header (`trace`): a child of
//!   `PublishOptions::trace`, else of the handler whose work this is; a publish outside
//!   any trace carries none (calls and casts always name one). A trace this node started
//!   is written only while `[publisher] new_traces` is on.
//! - A refusal by the broker (e.g. 404, no such exchange) is not retried; input AMQP cannot
//!   carry (a routing key over 255 bytes) is `Invalid` before anything is written.
//! - A mandatory publish goes on a channel of its own for its round trip (`lease`), so its
//!   `Returned` or `Routed` is its own (lapin gives a `basic.return` to whichever confirm
//!   completes next); the others share one channel per broker.
//!
//! It owns the confirm-mode channels (one shared, and the leased ones) per broker on that
//! broker's publish connection; consumers' channels are not its business.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, PublisherConfirm};
use parking_lot::RwLock;
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

use crate::broker::BrokerId;
use crate::config::PublisherConfig;
use crate::confirm::{self, PublishError, PublishOptions, Published};
use crate::connections::Connections;
use crate::envelope::{Envelope, Stamp};
use crate::metrics::Metrics;
use crate::publish_figures::PublishFigures;
use crate::registry::ConnectionRegistry;
use crate::trace::{self, TraceContext};

mod declare;
mod lease;
mod sequence;
pub use declare::Declare;
use lease::{Lease, LeasedChannels, Leasing};
pub use sequence::Sequence;

/// Pause before trying again after a failed channel open or a lost publish.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Publishes envelopes with confirms, on the primary or on one broker; cheap to clone.
///
/// It exists so that apps publish without knowing brokers: it waits (bounded) for a
/// broker, follows failover, applies back-pressure (the confirm window, a blocked broker)
/// and reports every outcome as a typed result.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
    stamp: Option<Arc<Stamp>>,
    target: Target,
}

/// Where a publisher's messages go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// The current primary.
    Primary,
    /// This broker only.
    Broker(BrokerId),
}

struct Inner {
    connections: Connections,
    registry: ConnectionRegistry,
    /// The confirm-mode channel of each broker, indexed by `BrokerId`, shared by every
    /// publish that is not mandatory.
    channels: RwLock<Vec<Option<Open>>>,
    /// Confirm-mode channels each carrying one mandatory publish at a time (`lease`).
    leased: LeasedChannels,
    /// The exchanges [`Publisher::declare`] declared, per broker.
    declared: parking_lot::Mutex<HashMap<BrokerId, HashSet<String>>>,
    /// One opener per broker at a time; the others wait for its channel.
    opening: Vec<Mutex<()>>,
    /// The broker the primary publisher last wrote to.
    last_primary: RwLock<Option<BrokerId>>,
    window: Arc<Semaphore>,
    timeout: Duration,
    /// Write traces this node started (`[publisher] new_traces`).
    new_traces: bool,
    /// What was published, per broker (reported at each scrape).
    figures: Arc<PublishFigures>,
    /// Bound for `confirm.select` on a new channel.
    operation_timeout: Duration,
}

/// A channel publishes go to.
#[derive(Clone)]
struct Open {
    channel: Channel,
    broker: BrokerId,
    /// The publish connection's generation.
    generation: u64,
    /// Held while a message takes its delivery tag and queues its frames (see
    /// [`start_write`]).
    write_lock: Arc<parking_lot::Mutex<()>>,
}

/// The channel a write went out on.
enum Route {
    /// The broker's shared channel (a publish that is not mandatory).
    Shared(Open),
    /// A channel leased to this mandatory publish alone (see `lease`).
    Leased(Lease),
}

impl Route {
    fn open(&self) -> &Open {
        match self {
            Route::Shared(open) => open,
            Route::Leased(lease) => lease.open(),
        }
    }

    fn broker(&self) -> BrokerId {
        self.open().broker
    }

    /// The broker answered the publish: a leased channel can carry the next one.
    fn answered(&mut self) {
        if let Route::Leased(lease) = self {
            lease.settled();
        }
    }
}

/// The rest of a write [`start_write`] began: the I/O loop's write of the frames.
type Writing<'a> =
    Pin<Box<dyn Future<Output = Result<PublisherConfirm, PublishError>> + Send + 'a>>;

/// Starts writing one message on `open`: it takes its delivery tag and queues its frames
/// under the channel's write lock, and the returned future waits for the I/O loop to
/// write them. lapin takes a publish's delivery tag and queues its frames under two
/// separate locks, so two tasks publishing on one channel at once can put their frames
/// on the wire in the other order than their tags: the broker's confirm of one is then
/// taken for the other's, and a message the broker never confirmed (lost with a killed
/// broker) reads as confirmed. Under one lock per channel, wire order is tag order.
/// Writes started one after the other by one task on one channel reach the broker in that
/// order (mandatory publishes each have a channel of their own: no order among them).
/// `outgoing` is borrowed (a retry writes it again) or owned (a write that outlives its
/// caller); either way the body is copied once, into the frames.
fn start_write<'a>(
    open: &Open,
    outgoing: impl Borrow<Outgoing> + Send + 'a,
) -> Result<Writing<'a>, PublishError> {
    let channel = open.channel.clone();
    let mut write: Writing<'a> = Box::pin(async move {
        let outgoing = outgoing.borrow();
        confirm::write(
            &channel,
            outgoing.exchange.clone(),
            outgoing.routing_key.clone(),
            &outgoing.body,
            outgoing.properties.clone(),
            outgoing.mandatory,
        )
        .await
    });
    // lapin does both in the publish's first poll, before it waits for the I/O loop.
    let first = {
        let _queueing = open.write_lock.lock();
        write
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    };
    match first {
        Poll::Pending => Ok(write),
        Poll::Ready(Ok(confirm)) => Ok(Box::pin(async move { Ok(confirm) })),
        Poll::Ready(Err(error)) => Err(error),
    }
}

/// A message queued by [`Publisher::send`]: resolves to the broker's answer within what
/// is left of the publish timeout, and holds its confirm-window slot until then.
///
/// It exists so that a caller can write many messages in order and await their confirms
/// later (or elsewhere): `Returned` for an unroutable mandatory message, `Nacked`,
/// `Blocked` if the broker blocked the connection meanwhile, `Timeout`, or `Channel` if
/// the connection died first. Nothing is retried.
#[must_use = "a Sent future does nothing unless awaited; dropping it forgets the confirm"]
pub struct Sent {
    broker: BrokerId,
    confirm: Pin<Box<dyn Future<Output = Result<Published, PublishError>> + Send + 'static>>,
}

impl Sent {
    /// The broker the message was written to.
    pub fn broker(&self) -> BrokerId {
        self.broker
    }
}

impl Future for Sent {
    type Output = Result<Published, PublishError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.confirm.as_mut().poll(cx)
    }
}

/// A message ready to be written: validated, stamped and encoded once.
struct Outgoing {
    exchange: ShortString,
    routing_key: ShortString,
    body: Vec<u8>,
    properties: BasicProperties,
    mandatory: bool,
}

impl Publisher {
    /// A publisher on `connections`; its figures keep histograms as `metrics` has them.
    pub fn new(connections: Connections, config: &PublisherConfig, metrics: &Metrics) -> Self {
        let registry = connections.registry().clone();
        let brokers = registry.brokers().len();
        Publisher {
            inner: Arc::new(Inner {
                operation_timeout: connections.settings().operation_timeout,
                figures: Arc::new(PublishFigures::new(registry.clone(), metrics)),
                registry,
                connections,
                channels: RwLock::new(vec![None; brokers]),
                leased: LeasedChannels::new(brokers),
                declared: parking_lot::Mutex::default(),
                opening: (0..brokers).map(|_| Mutex::new(())).collect(),
                last_primary: RwLock::new(None),
                window: Arc::new(Semaphore::new(config.confirm_window.max(1))),
                timeout: config.timeout,
                new_traces: config.new_traces,
            }),
            stamp: None,
            target: Target::Primary,
        }
    }

    /// The same publisher, stamping outgoing envelopes (App-Name, App-Version, Node,
    /// Msg-ID) where they lack them.
    pub fn with_stamp(&self, stamp: Stamp) -> Publisher {
        Publisher {
            inner: self.inner.clone(),
            stamp: Some(Arc::new(stamp)),
            target: self.target,
        }
    }

    /// The same publisher (window, timeout, stamp), publishing only on `broker`'s publish
    /// connection: it never moves to another broker. While that connection is down a
    /// publish waits up to its timeout and then fails with `BrokerUnavailable` naming the
    /// broker; while the broker blocks publishing, with `Blocked`.
    pub fn to_broker(&self, broker: BrokerId) -> Publisher {
        Publisher {
            inner: self.inner.clone(),
            stamp: self.stamp.clone(),
            target: Target::Broker(broker),
        }
    }

    /// Options with the configured timeout (`[publisher] timeout_ms`).
    pub fn options(&self) -> PublishOptions {
        PublishOptions::new(self.inner.timeout)
    }

    /// A publish to the primary was written to `broker`: [`Publisher::broker`] says so
    /// from now on. Takes the write lock only when the broker changes (every publish
    /// passes here).
    fn wrote_to(&self, broker: BrokerId) {
        if self.target == Target::Primary && *self.inner.last_primary.read() != Some(broker) {
            *self.inner.last_primary.write() = Some(broker);
        }
    }

    /// The broker publishes currently go to, if a channel (shared or leased) is open there.
    pub fn broker(&self) -> Option<BrokerId> {
        let broker = match self.target {
            Target::Primary => (*self.inner.last_primary.read())?,
            Target::Broker(broker) => broker,
        };
        let shared = self
            .inner
            .channels
            .read()
            .get(broker.0)
            .and_then(Option::as_ref)
            .is_some_and(|o| o.channel.status().connected());
        (shared || self.inner.leased.any_open(broker)).then_some(broker)
    }

    /// Publishes `envelope` and waits for the broker's confirm, retrying on the current
    /// target when the channel dies first (see the module docs).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        envelope: Envelope,
        options: PublishOptions,
    ) -> Result<Published, PublishError> {
        let outgoing = self.prepare(exchange, routing_key, envelope, &options)?;
        self.publish_outgoing(outgoing, options).await
    }

    /// Publishes a body as it is (no envelope, no stamp: e.g. a message moved to a parking
    /// queue, with its own properties) and waits for the confirm, as
    /// [`Publisher::publish`] does. `options.gzip` and `options.persistent` are ignored:
    /// `properties` say what the body is. A `traceparent` header in `properties` is kept;
    /// without one the message gets one as [`Publisher::publish`] would give it (if any).
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: Vec<u8>,
        properties: BasicProperties,
        options: PublishOptions,
    ) -> Result<Published, PublishError> {
        let (exchange, routing_key) = confirm::address(exchange, routing_key)?;
        let properties = match self.trace(options.trace) {
            Some(trace) => trace.inject_if_absent(properties),
            None => properties,
        };
        let outgoing = Outgoing {
            exchange,
            routing_key,
            body,
            properties,
            mandatory: options.mandatory,
        };
        self.publish_outgoing(outgoing, options).await
    }

    async fn publish_outgoing(
        &self,
        outgoing: Outgoing,
        options: PublishOptions,
    ) -> Result<Published, PublishError> {
        let deadline = Instant::now() + options.timeout;
        let _permit = self.permit(deadline, options.timeout).await?;
        let mut last_loss: Option<String> = None;
        loop {
            let (mut route, confirm) = self
                .write(&outgoing, deadline, options.timeout, &mut last_loss)
                .await?;
            let broker = route.broker();
            let written = Instant::now();
            let answer =
                match tokio::time::timeout_at(deadline, confirm::confirmation(confirm)).await {
                    Ok(answer) => answer,
                    Err(_) => Err(self.late(broker, options.timeout)),
                };
            if is_answer(&answer) {
                route.answered();
            }
            let figures = &self.inner.figures;
            figures.record(broker, written, outgoing.body.len(), &answer);
            match answer {
                Ok(published) => return Ok(published),
                Err(error) if error.is_retryable() => {
                    tracing::debug!(%broker, %error, "publish lost with its channel; retrying");
                    self.forget(route);
                    if Instant::now() + RETRY_PAUSE >= deadline {
                        return Err(error);
                    }
                    last_loss = Some(error.to_string());
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(error) => {
                    if error.is_no_exchange() {
                        self.undeclared(broker, outgoing.exchange.as_str());
                    }
                    if matches!(error, PublishError::Refused(_)) {
                        self.forget(route);
                    }
                    return Err(error);
                }
            }
        }
    }

    /// Waits (within `options.timeout`) for an open, unblocked confirm-mode channel on the
    /// target, queues the message's frames there and returns; the [`Sent`] future waits
    /// for the I/O loop's write and gives the broker's answer within the rest of the
    /// timeout. A channel found gone when queueing is replaced by a fresh one; once the
    /// frames are queued nothing is retried (a channel lost before the write fails the
    /// `Sent` future with `Channel`, like one lost before the confirm).
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        envelope: Envelope,
        options: PublishOptions,
    ) -> Result<Sent, PublishError> {
        let outgoing = self.prepare(exchange, routing_key, envelope, &options)?;
        let deadline = Instant::now() + options.timeout;
        let permit = self.permit(deadline, options.timeout).await?;
        let outgoing = Arc::new(outgoing);
        let mut last_loss = None;
        let (mut route, writing) = self
            .queue(outgoing.clone(), deadline, options.timeout, &mut last_loss)
            .await?;
        let broker = route.broker();
        self.wrote_to(broker);
        let this = self.clone();
        let timeout = options.timeout;
        let (written, bytes) = (Instant::now(), outgoing.body.len());
        // The frames are queued: the socket write is this future's to wait for, so that
        // the caller goes on at once (see the module docs).
        let future = async move {
            let _permit: OwnedSemaphorePermit = permit;
            let answered = async { confirm::confirmation(writing.await?).await };
            let answer = match tokio::time::timeout_at(deadline, answered).await {
                Ok(Err(error @ PublishError::Refused(_))) => {
                    if error.is_no_exchange() {
                        this.undeclared(broker, outgoing.exchange.as_str());
                    }
                    this.forget(route);
                    Err(error)
                }
                Ok(result) => {
                    if is_answer(&result) {
                        route.answered();
                    }
                    result
                }
                Err(_) => Err(this.late(broker, timeout)),
            };
            this.inner.figures.record(broker, written, bytes, &answer);
            answer
        };
        Ok(Sent {
            broker,
            confirm: Box::pin(future),
        })
    }

    /// Validates, stamps and encodes one message.
    fn prepare(
        &self,
        exchange: &str,
        routing_key: &str,
        mut envelope: Envelope,
        options: &PublishOptions,
    ) -> Result<Outgoing, PublishError> {
        let (exchange, routing_key) = confirm::address(exchange, routing_key)?;
        match &self.stamp {
            Some(stamp) => envelope.stamp(stamp),
            None => {
                envelope.ensure_msg_id();
            }
        }
        let (body, properties) = options.encode(&envelope);
        let properties = match &options.correlation {
            Some(correlation) => correlation.apply(properties)?,
            None => properties,
        };
        let properties = match self.trace(options.trace) {
            Some(trace) => trace.inject(properties),
            None => properties,
        };
        Ok(Outgoing {
            exchange,
            routing_key,
            body,
            properties,
            mandatory: options.mandatory,
        })
    }

    /// The trace an outgoing message carries ([`trace::outgoing`]), unless it is one this
    /// node started and `[publisher] new_traces` is off: then the message carries none
    /// (RabbitMQ decodes the headers table of every message that has one).
    fn trace(&self, explicit: Option<TraceContext>) -> Option<TraceContext> {
        trace::outgoing(explicit).filter(|trace| self.inner.new_traces || !trace.started_here())
    }

    /// A slot of the confirm window, waiting for one until `deadline`.
    async fn permit(
        &self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<OwnedSemaphorePermit, PublishError> {
        let window = self.inner.window.clone();
        match tokio::time::timeout_at(deadline, window.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(PublishError::Timeout(timeout)),
        }
    }

    /// Writes `outgoing` on a channel of the target, trying a fresh channel when the write
    /// fails because its channel died. `last_loss` carries the last loss across calls, so
    /// that running out of time after one reports the loss rather than a bare timeout.
    async fn write(
        &self,
        outgoing: &Outgoing,
        deadline: Instant,
        timeout: Duration,
        last_loss: &mut Option<String>,
    ) -> Result<(Route, PublisherConfirm), PublishError> {
        loop {
            let (route, writing) = self.queue(outgoing, deadline, timeout, last_loss).await?;
            let broker = route.broker();
            match tokio::time::timeout_at(deadline, writing).await {
                Ok(Ok(confirm)) => {
                    self.wrote_to(broker);
                    return Ok((route, confirm));
                }
                Ok(Err(error)) => {
                    self.failed_write(route, error, &outgoing.exchange, deadline, last_loss)?;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(_) => return Err(self.late(broker, timeout)),
            }
        }
    }

    /// Queues `outgoing`'s frames on a channel of the target, trying a fresh channel when
    /// the one found is already gone; the returned future waits for the I/O loop to write
    /// them. `last_loss` as in [`Publisher::write`].
    async fn queue<'a, O>(
        &self,
        outgoing: O,
        deadline: Instant,
        timeout: Duration,
        last_loss: &mut Option<String>,
    ) -> Result<(Route, Writing<'a>), PublishError>
    where
        O: Borrow<Outgoing> + Clone + Send + 'a,
    {
        loop {
            let mandatory = outgoing.borrow().mandatory;
            let route = match self.channel(deadline, timeout, mandatory).await {
                Ok(route) => route,
                Err(PublishError::Timeout(_)) if last_loss.is_some() => {
                    return Err(PublishError::Channel(last_loss.take().unwrap_or_default()));
                }
                Err(error) => return Err(error),
            };
            match start_write(route.open(), outgoing.clone()) {
                Ok(writing) => return Ok((route, writing)),
                Err(error) => {
                    let exchange = &outgoing.borrow().exchange;
                    self.failed_write(route, error, exchange, deadline, last_loss)?;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }

    /// A write on `route` failed with `error`: `Ok` to try a fresh channel after
    /// `RETRY_PAUSE` (the channel died and there is time left), else the error to give.
    fn failed_write(
        &self,
        route: Route,
        error: PublishError,
        exchange: &ShortString,
        deadline: Instant,
        last_loss: &mut Option<String>,
    ) -> Result<(), PublishError> {
        let broker = route.broker();
        if error.is_retryable() {
            tracing::debug!(%broker, %error, "write failed with its channel; trying a new one");
            self.forget(route);
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(error);
            }
            *last_loss = Some(error.to_string());
            return Ok(());
        }
        if error.is_no_exchange() {
            self.undeclared(broker, exchange.as_str());
        }
        if matches!(error, PublishError::Refused(_)) {
            self.forget(route);
        }
        Err(error)
    }

    /// What this publisher (and every publisher sharing its window) published, per broker.
    pub fn figures(&self) -> Arc<PublishFigures> {
        self.inner.figures.clone()
    }

    /// The error for a publish that ran out of time on `broker`.
    fn late(&self, broker: BrokerId, waited: Duration) -> PublishError {
        match self
            .inner
            .registry
            .status(broker)
            .and_then(|s| s.publish_blocked)
        {
            Some(reason) => PublishError::Blocked { reason, waited },
            None => PublishError::Timeout(waited),
        }
    }

    fn broker_name(&self, broker: BrokerId) -> String {
        self.inner
            .registry
            .broker(broker)
            .map_or_else(|| broker.to_string(), |b| b.uri.redacted().to_string())
    }

    /// Stop using a channel that failed: the shared one is replaced on the next publish; a
    /// leased one is closed.
    fn forget(&self, route: Route) {
        if let Route::Shared(open) = route {
            self.forget_shared(&open);
        }
    }

    /// Stop using the shared channel `open`; the next publish opens another.
    fn forget_shared(&self, open: &Open) {
        self.forget_channel(open.broker, open.channel.id(), open.generation);
    }

    /// [`Publisher::forget_shared`] by what identifies the channel (for a future that
    /// outlives the caller's `Open` and need not hold a clone of it).
    fn forget_channel(&self, broker: BrokerId, channel: u16, generation: u64) {
        let mut channels = self.inner.channels.write();
        if let Some(slot) = channels.get_mut(broker.0)
            && slot
                .as_ref()
                .is_some_and(|c| c.channel.id() == channel && c.generation == generation)
        {
            *slot = None;
        }
    }

    /// The broker's channel if it still lives on the broker's current publish connection.
    fn usable(&self, broker: BrokerId, generation: u64) -> Option<Open> {
        self.inner
            .channels
            .read()
            .get(broker.0)
            .and_then(Option::as_ref)
            .filter(|o| o.generation == generation && o.channel.status().connected())
            .cloned()
    }

    /// A confirm-mode channel on the target (the shared one, or for a `mandatory` publish a
    /// leased one), waiting (until `deadline`) for the target to exist, to have a publish
    /// connection and not to block publishing.
    async fn channel(
        &self,
        deadline: Instant,
        timeout: Duration,
        mandatory: bool,
    ) -> Result<Route, PublishError> {
        let registry = &self.inner.registry;
        let mut changes = registry.subscribe();
        loop {
            let broker = match self.target {
                Target::Primary => registry.primary().map(|b| b.id),
                Target::Broker(broker) => Some(broker),
            };
            let Some(broker) = broker else {
                if !wait_for_change(&mut changes, deadline).await {
                    return Err(PublishError::NoBroker(timeout));
                }
                continue;
            };
            let unavailable = || PublishError::BrokerUnavailable {
                broker: self.broker_name(broker),
                waited: timeout,
            };
            let Some(status) = registry.status(broker) else {
                return Err(unavailable());
            };
            if !status.publish_available {
                if !wait_for_change(&mut changes, deadline).await {
                    return Err(unavailable());
                }
                continue;
            }
            if let Some(reason) = status.publish_blocked {
                if !wait_for_change(&mut changes, deadline).await {
                    return Err(PublishError::Blocked {
                        reason,
                        waited: timeout,
                    });
                }
                continue;
            }
            let route = if mandatory {
                self.leased(broker, status.publish_generation, deadline, timeout)
                    .await
            } else {
                self.shared(broker, status.publish_generation, deadline, timeout)
                    .await
            };
            match route {
                Ok(Some(route)) => return Ok(route),
                Ok(None) => {}
                Err(error) => return Err(error),
            }
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(PublishError::Timeout(timeout));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// The shared channel of `broker`, opened by one caller at a time when the publish
    /// connection of `generation` has none yet. `Ok(None)`: not this time, try again.
    async fn shared(
        &self,
        broker: BrokerId,
        generation: u64,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Option<Route>, PublishError> {
        if let Some(open) = self.usable(broker, generation) {
            return Ok(Some(Route::Shared(open)));
        }
        let Some(lock) = self.inner.opening.get(broker.0) else {
            return Ok(None);
        };
        let Ok(_guard) = tokio::time::timeout_at(deadline, lock.lock()).await else {
            return Err(PublishError::Timeout(timeout));
        };
        if let Some(open) = self.usable(broker, generation) {
            return Ok(Some(Route::Shared(open)));
        }
        let open = self.open(broker, deadline, timeout).await?;
        if let Some(open) = &open
            && let Some(slot) = self.inner.channels.write().get_mut(broker.0)
        {
            *slot = Some(open.clone());
        }
        Ok(open.map(Route::Shared))
    }

    /// A channel of `broker` leased to one mandatory publish: an idle one of the publish
    /// connection of `generation`, or a new one. `Ok(None)`: not this time, try again.
    async fn leased(
        &self,
        broker: BrokerId,
        generation: u64,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Option<Route>, PublishError> {
        match self.inner.leased.lease(broker, generation, deadline).await {
            None => Ok(None),
            Some(Leasing::Timeout) => Err(PublishError::Timeout(timeout)),
            Some(Leasing::Idle(lease)) => Ok(Some(Route::Leased(lease))),
            Some(Leasing::Slot(slot)) => Ok(self
                .open(broker, deadline, timeout)
                .await?
                .map(|open| Route::Leased(Lease::new(slot, open)))),
        }
    }

    /// Opens a channel on `broker`'s publish connection and puts it in confirm mode (bounded
    /// by `operation_timeout`). `Ok(None)`: not this time (logged), try again.
    async fn open(
        &self,
        broker: BrokerId,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Option<Open>, PublishError> {
        let taken =
            match tokio::time::timeout_at(deadline, self.inner.connections.publish_channel(broker))
                .await
            {
                Err(_) => return Err(PublishError::Timeout(timeout)),
                Ok(Err(error)) => {
                    tracing::debug!(%broker, %error, "cannot open a publish channel yet");
                    return Ok(None);
                }
                Ok(Ok(taken)) => taken,
            };
        let bound = self.inner.operation_timeout;
        let confirm = tokio::time::timeout_at(
            deadline.min(Instant::now() + bound),
            taken
                .channel
                .confirm_select(ConfirmSelectOptions::default()),
        )
        .await;
        match confirm {
            Ok(Ok(())) => {
                let open = Open {
                    channel: taken.channel,
                    broker: taken.broker,
                    generation: taken.generation,
                    write_lock: Arc::default(),
                };
                tracing::debug!(%broker, generation = open.generation, "a confirm-mode channel on this broker");
                Ok(Some(open))
            }
            Ok(Err(error)) => {
                tracing::debug!(%broker, %error, "confirm.select failed");
                Ok(None)
            }
            Err(_) => {
                // Dropping the channel closes it; the next attempt opens a new one.
                tracing::debug!(%broker, bound_ms = bound.as_millis() as u64, "no confirm.select-ok in time");
                Ok(None)
            }
        }
    }
}

/// Whether the broker answered the publish (so its channel owes nothing more).
fn is_answer(answer: &Result<Published, PublishError>) -> bool {
    matches!(answer, Ok(_) | Err(PublishError::Nacked))
}

/// Waits for the registry to change; false once the deadline passed.
async fn wait_for_change(changes: &mut watch::Receiver<u64>, deadline: Instant) -> bool {
    matches!(
        tokio::time::timeout_at(deadline, changes.changed()).await,
        Ok(Ok(()))
    )
}
