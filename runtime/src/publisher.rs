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
//! - [`Publisher::send`] returns as soon as the message is written and hands back a
//!   [`Sent`] future for the confirm; nothing is retried after the write.
//! - While no broker of the local zone is up (or the pinned broker's publish connection is
//!   down), or the broker blocks publishing (`connection.blocked`), a publish waits for at
//!   most its timeout and then fails with `NoBroker` / `BrokerUnavailable` or `Blocked`;
//!   never forever. `confirm.select` on a new channel is bounded by `operation_timeout`.
//! - A message carries a W3C `traceparent` header (`trace`): a child of
//!   `PublishOptions::trace`, else of the handler whose work this is; a publish outside
//!   any trace carries none (calls and casts always name one).
//! - A refusal by the broker (e.g. 404, no such exchange) is not retried; input AMQP cannot
//!   carry (a routing key over 255 bytes) is `Invalid` before anything is written.
//!
//! It owns one confirm-mode channel per broker on that broker's publish connection;
//! consumers' channels are not its business.

use std::borrow::Borrow;
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
use crate::trace;

mod sequence;
pub use sequence::{Declare, Sequence};

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
    /// The confirm-mode channel of each broker, indexed by `BrokerId`.
    channels: RwLock<Vec<Option<Open>>>,
    /// One opener per broker at a time; the others wait for its channel.
    opening: Vec<Mutex<()>>,
    /// The broker the primary publisher last wrote to.
    last_primary: RwLock<Option<BrokerId>>,
    window: Arc<Semaphore>,
    timeout: Duration,
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
/// Writes started one after the other by one task reach the broker in that order.
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

/// A message written by [`Publisher::send`]: resolves to the broker's answer within what
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
                opening: (0..brokers).map(|_| Mutex::new(())).collect(),
                last_primary: RwLock::new(None),
                window: Arc::new(Semaphore::new(config.confirm_window.max(1))),
                timeout: config.timeout,
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

    /// The broker publishes currently go to, if a channel is open there.
    pub fn broker(&self) -> Option<BrokerId> {
        let broker = match self.target {
            Target::Primary => (*self.inner.last_primary.read())?,
            Target::Broker(broker) => broker,
        };
        let channels = self.inner.channels.read();
        channels
            .get(broker.0)
            .and_then(Option::as_ref)
            .filter(|o| o.channel.status().connected())
            .map(|o| o.broker)
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
        let properties = match trace::outgoing(options.trace) {
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
            let (open, confirm) = self
                .write(&outgoing, deadline, options.timeout, &mut last_loss)
                .await?;
            let written = Instant::now();
            let answer =
                match tokio::time::timeout_at(deadline, confirm::confirmation(confirm)).await {
                    Ok(answer) => answer,
                    Err(_) => Err(self.late(open.broker, options.timeout)),
                };
            let figures = &self.inner.figures;
            figures.record(open.broker, written, outgoing.body.len(), &answer);
            match answer {
                Ok(published) => return Ok(published),
                Err(error) if error.is_retryable() => {
                    tracing::debug!(broker = %open.broker, %error, "publish lost with its channel; retrying");
                    self.forget(&open);
                    if Instant::now() + RETRY_PAUSE >= deadline {
                        return Err(error);
                    }
                    last_loss = Some(error.to_string());
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(error) => {
                    if matches!(error, PublishError::Refused(_)) {
                        self.forget(&open);
                    }
                    return Err(error);
                }
            }
        }
    }

    /// Waits (within `options.timeout`) for an open, unblocked confirm-mode channel on the
    /// target, writes the message and returns; the [`Sent`] future gives the broker's
    /// answer within the rest of the timeout. A write that fails because the channel is
    /// already gone is tried again on a fresh channel; after a successful write nothing is
    /// retried.
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
        let mut last_loss = None;
        let (open, confirm) = self
            .write(&outgoing, deadline, options.timeout, &mut last_loss)
            .await?;
        let broker = open.broker;
        let this = self.clone();
        let timeout = options.timeout;
        let (written, bytes) = (Instant::now(), outgoing.body.len());
        let future = async move {
            let _permit: OwnedSemaphorePermit = permit;
            let answer =
                match tokio::time::timeout_at(deadline, confirm::confirmation(confirm)).await {
                    Ok(Err(error @ PublishError::Refused(_))) => {
                        this.forget(&open);
                        Err(error)
                    }
                    Ok(result) => result,
                    Err(_) => Err(this.late(open.broker, timeout)),
                };
            this.inner
                .figures
                .record(open.broker, written, bytes, &answer);
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
        let properties = match trace::outgoing(options.trace) {
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
    ) -> Result<(Open, PublisherConfirm), PublishError> {
        loop {
            let open = match self.channel(deadline, timeout).await {
                Ok(open) => open,
                Err(PublishError::Timeout(_)) if last_loss.is_some() => {
                    return Err(PublishError::Channel(last_loss.take().unwrap_or_default()));
                }
                Err(error) => return Err(error),
            };
            let written = match start_write(&open, outgoing) {
                Ok(writing) => tokio::time::timeout_at(deadline, writing).await,
                Err(error) => Ok(Err(error)),
            };
            match written {
                Ok(Ok(confirm)) => {
                    if self.target == Target::Primary {
                        *self.inner.last_primary.write() = Some(open.broker);
                    }
                    return Ok((open, confirm));
                }
                Ok(Err(error)) if error.is_retryable() => {
                    tracing::debug!(broker = %open.broker, %error, "write failed with its channel; trying a new one");
                    self.forget(&open);
                    if Instant::now() + RETRY_PAUSE >= deadline {
                        return Err(error);
                    }
                    *last_loss = Some(error.to_string());
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Ok(Err(error)) => {
                    if matches!(error, PublishError::Refused(_)) {
                        self.forget(&open);
                    }
                    return Err(error);
                }
                Err(_) => return Err(self.late(open.broker, timeout)),
            }
        }
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

    /// Stop using a channel that failed.
    fn forget(&self, open: &Open) {
        let mut channels = self.inner.channels.write();
        if let Some(slot) = channels.get_mut(open.broker.0)
            && slot
                .as_ref()
                .is_some_and(|c| c.channel.id() == open.channel.id())
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

    /// A confirm-mode channel on the target, waiting (until `deadline`) for the target to
    /// exist, to have a publish connection and not to block publishing.
    async fn channel(&self, deadline: Instant, timeout: Duration) -> Result<Open, PublishError> {
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
            if let Some(open) = self.usable(broker, status.publish_generation) {
                return Ok(open);
            }
            let Some(lock) = self.inner.opening.get(broker.0) else {
                return Err(unavailable());
            };
            let Ok(_guard) = tokio::time::timeout_at(deadline, lock.lock()).await else {
                return Err(PublishError::Timeout(timeout));
            };
            if let Some(open) = self.usable(broker, status.publish_generation) {
                return Ok(open);
            }
            match self.open(broker, deadline, timeout).await {
                Ok(Some(open)) => return Ok(open),
                Ok(None) => {}
                Err(error) => return Err(error),
            }
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(PublishError::Timeout(timeout));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
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
                tracing::debug!(%broker, generation = open.generation, "publishing to this broker");
                if let Some(slot) = self.inner.channels.write().get_mut(broker.0) {
                    *slot = Some(open.clone());
                }
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

/// Waits for the registry to change; false once the deadline passed.
async fn wait_for_change(changes: &mut watch::Receiver<u64>, deadline: Instant) -> bool {
    matches!(
        tokio::time::timeout_at(deadline, changes.changed()).await,
        Ok(Ok(()))
    )
}
