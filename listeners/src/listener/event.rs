//! What a responder receives: the decoded envelope, the delivery's metadata, and a way to
//! publish and reply through the broker the event came from.
//!
//! An [`Event`] is cheap to clone (every matching responder gets one). Publishing goes out
//! on that broker's publish connection (never on the channel the listener consumes on, so a
//! broker that blocks publishing during a resource alarm cannot stall the consumers).
//! `reply().await` returns once the reply is queued on the publish channel (in order with
//! the handler's other publishes), without waiting for the I/O loop to write it; the write
//! and the confirm settle with the delivery (`confirms`), and `reply(..).await?.await`
//! waits for them. A blocked broker makes a publish fail with `Blocked` after the publish
//! timeout.
//!
//! Every event has a trace context ([`Event::trace`]): the delivery's W3C `traceparent`
//! header, or a new trace when it has none (or a malformed one). Its publishes and replies
//! carry a child span of it, so a caller that sent a `traceparent` gets its trace id back.

use std::sync::Arc;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::FieldTable;
use parking_lot::Mutex;
use warren_runtime::broker::Broker;
use warren_runtime::confirm::{PublishError, PublishOptions, Published, address};
use warren_runtime::envelope::{Envelope, keys};
use warren_runtime::exchanges::TARGETED;
use warren_runtime::publisher::Publisher;
use warren_runtime::trace::TraceContext;

use super::confirms::{Owed, Pending};
use super::{Listener, Notice};

/// Publish bound of test kit events (a listener's events use `publish_timeout_ms`).
const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how a message arrived.
#[derive(Clone, Debug)]
pub struct DeliveryInfo {
    pub exchange: String,
    pub routing_key: String,
    /// The broker delivered this message before (to this or another consumer).
    pub redelivered: bool,
    pub delivery_tag: u64,
    /// AMQP properties (content type, headers, …).
    pub properties: BasicProperties,
    /// The listener's queue (shared by all its deliveries).
    pub queue: Arc<str>,
    /// The broker the message came from.
    pub broker: Arc<Broker>,
    /// The number of the grant it came on (see `assignments::Grant`).
    pub grant: u64,
}

impl DeliveryInfo {
    /// The AMQP headers, if any.
    pub fn headers(&self) -> Option<&FieldTable> {
        self.properties.headers().as_ref()
    }
}

/// Publishing through the broker an event came from.
#[derive(Clone)]
pub(crate) struct Outbox {
    /// The node's publisher, stamping as the app, pinned to the event's broker.
    pub publisher: Publisher,
    pub timeout: Duration,
    pub listener: Arc<dyn Listener>,
}

/// A publish an event made under the test kit ([`crate::testkit`]) instead of reaching a
/// broker: what the handler asked for, after the same checks a real publish makes.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub exchange: String,
    pub routing_key: String,
    pub envelope: Envelope,
    pub options: PublishOptions,
}

/// The test kit's stand-in for the broker: what was published, and the error every
/// publish fails with, if the test asked for one.
#[derive(Clone, Default)]
pub(crate) struct Recorder {
    pub published: Arc<Mutex<Vec<Recorded>>>,
    pub fail_with: Option<PublishError>,
}

impl Recorder {
    /// Checks and records one publish, or fails it as the test asked.
    fn record(&self, publish: Recorded) -> Result<Published, PublishError> {
        address(&publish.exchange, &publish.routing_key)?;
        if let Some(error) = &self.fail_with {
            return Err(error.clone());
        }
        self.published.lock().push(publish);
        Ok(Published::Routed)
    }
}

/// Where an event's publishes go.
#[derive(Clone)]
enum Outlet {
    Broker(Outbox),
    Recorder(Recorder),
}

/// One decoded message, as a responder sees it.
#[derive(Clone)]
pub struct Event {
    inner: Arc<EventInner>,
}

struct EventInner {
    envelope: Envelope,
    delivery: DeliveryInfo,
    /// The delivery's trace context, or a new trace.
    trace: TraceContext,
    outlet: Outlet,
    /// The confirms of this event's publishes, awaited before the delivery is settled.
    owed: Owed,
}

impl Event {
    pub(crate) fn new(envelope: Envelope, delivery: DeliveryInfo, outbox: Outbox) -> Self {
        Event {
            inner: Arc::new(EventInner {
                envelope,
                trace: TraceContext::of_delivery(&delivery.properties),
                delivery,
                outlet: Outlet::Broker(outbox),
                owed: Owed::default(),
            }),
        }
    }

    /// An event whose publishes go to `recorder` (the test kit).
    pub(crate) fn recorded(envelope: Envelope, delivery: DeliveryInfo, recorder: Recorder) -> Self {
        Event {
            inner: Arc::new(EventInner {
                envelope,
                trace: TraceContext::of_delivery(&delivery.properties),
                delivery,
                outlet: Outlet::Recorder(recorder),
                owed: Owed::default(),
            }),
        }
    }

    /// The decoded kapi body.
    pub fn envelope(&self) -> &Envelope {
        &self.inner.envelope
    }

    pub fn delivery(&self) -> &DeliveryInfo {
        &self.inner.delivery
    }

    /// The trace this event belongs to: the delivery's `traceparent` (its span id is the
    /// sender's), or a new trace. Handlers run with it as the trace of their work: their
    /// publishes, replies and pool calls carry a child span of it.
    pub fn trace(&self) -> TraceContext {
        self.inner.trace
    }

    /// The event came from a broker of another zone, through one of the listener's
    /// federators; its replies go back there (see [`Event::reply`]).
    pub fn is_federated(&self) -> bool {
        !self.inner.delivery.broker.local
    }

    /// The broker the event came from, with its password hidden (Kazoo's `AMQP-Broker`).
    pub fn amqp_broker(&self) -> String {
        self.inner.delivery.broker.uri.redacted().to_string()
    }

    /// The zone of the broker the event came from (Kazoo's `AMQP-Broker-Zone`).
    pub fn amqp_broker_zone(&self) -> &str {
        &self.inner.delivery.broker.zone
    }

    /// `Event-Category`.
    pub fn category(&self) -> &str {
        self.inner.envelope.category()
    }

    /// `Event-Name`.
    pub fn name(&self) -> &str {
        self.inner.envelope.name()
    }

    /// Replies to the request: publishes `reply` to the `targeted` exchange with routing key
    /// = the request's `Server-ID`, carrying the request's `Msg-ID`, on the broker the
    /// request came from (a federated request's reply goes back to its zone).
    pub async fn reply(&self, mut reply: Envelope) -> Result<Pending, PublishError> {
        let server_id = self
            .inner
            .envelope
            .server_id()
            .filter(|s| !s.is_empty())
            .ok_or(PublishError::NoServerId)?
            .to_string();
        if let Some(msg_id) = self.inner.envelope.msg_id() {
            reply.set(keys::MSG_ID, msg_id);
        }
        self.publish(TARGETED, &server_id, reply).await
    }

    /// Publishes through the event's broker; returns once the message is queued (its
    /// confirm settles with the delivery; await the [`Pending`] to wait for it).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        envelope: Envelope,
    ) -> Result<Pending, PublishError> {
        let timeout = match &self.inner.outlet {
            Outlet::Broker(outbox) => outbox.timeout,
            Outlet::Recorder(_) => DEFAULT_PUBLISH_TIMEOUT,
        };
        self.publish_with(
            exchange,
            routing_key,
            envelope,
            PublishOptions::new(timeout),
        )
        .await
    }

    /// Publishes with explicit options (mandatory, persistent, gzip, timeout), as
    /// [`Event::publish`] does. A returned mandatory message is also reported to the
    /// listener as [`Notice::Returned`]. The message belongs to the event's trace unless
    /// `options.trace` names another.
    pub async fn publish_with(
        &self,
        exchange: &str,
        routing_key: &str,
        envelope: Envelope,
        mut options: PublishOptions,
    ) -> Result<Pending, PublishError> {
        options.trace.get_or_insert(self.inner.trace);
        let outbox = match &self.inner.outlet {
            Outlet::Broker(outbox) => outbox,
            Outlet::Recorder(recorder) => {
                let recorded = Recorded {
                    exchange: exchange.to_string(),
                    routing_key: routing_key.to_string(),
                    envelope,
                    options,
                };
                return recorder
                    .record(recorded)
                    .map(|published| Pending::answered(Ok(published)));
            }
        };
        let sent = outbox
            .publisher
            .send(exchange, routing_key, envelope, options)
            .await?;
        let listener = outbox.listener.clone();
        let confirm = async move {
            let published = sent.await;
            if let Ok(Published::Returned(returned)) = &published {
                let notice = Notice::Returned(returned.clone());
                // App code: a panic here must not lose the publish's answer.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    listener.on_notice(&notice)
                }));
            }
            published
        };
        Ok(self.inner.owed.track(Box::pin(confirm)))
    }

    /// The confirms owed so far (the consumer loop, once the handlers finished).
    pub(crate) fn owed(&self) -> &Owed {
        &self.inner.owed
    }
}
