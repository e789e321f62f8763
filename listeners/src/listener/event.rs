//! What a responder receives: the decoded envelope, the delivery's metadata, and a way to
//! publish and reply on the listener's channel (the one the event arrived on).
//!
//! An [`Event`] is cheap to clone (every matching responder gets one). Publishing waits for
//! the broker's confirm, so `reply().await` returning `Ok` means the broker has the reply.

use std::sync::Arc;
use std::time::Duration;

use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use warren_runtime::envelope::{Envelope, Stamp, keys};
use warren_runtime::exchanges::TARGETED;
use warren_runtime::publish::{PublishError, PublishOptions, Published, publish_confirmed};
use warren_runtime::registry::Broker;

use super::{Listener, Notice};

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
    /// The listener's queue.
    pub queue: String,
    /// The broker the message came from.
    pub broker: Arc<Broker>,
    /// The lease (channel generation) it came on.
    pub lease: u64,
}

impl DeliveryInfo {
    /// The AMQP headers, if any.
    pub fn headers(&self) -> Option<&FieldTable> {
        self.properties.headers().as_ref()
    }
}

/// Publishing on the listener's channel.
#[derive(Clone)]
pub(crate) struct Outbox {
    pub channel: Channel,
    pub stamp: Arc<Stamp>,
    pub timeout: Duration,
    pub listener: Arc<dyn Listener>,
}

/// One decoded message, as a responder sees it.
#[derive(Clone)]
pub struct Event {
    inner: Arc<EventInner>,
}

struct EventInner {
    envelope: Envelope,
    delivery: DeliveryInfo,
    outbox: Option<Outbox>,
}

impl Event {
    pub(crate) fn new(envelope: Envelope, delivery: DeliveryInfo, outbox: Option<Outbox>) -> Self {
        Event {
            inner: Arc::new(EventInner {
                envelope,
                delivery,
                outbox,
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

    /// `Event-Category`.
    pub fn category(&self) -> &str {
        self.inner.envelope.category()
    }

    /// `Event-Name`.
    pub fn name(&self) -> &str {
        self.inner.envelope.name()
    }

    /// Replies to the request: publishes `reply` to the `targeted` exchange with routing key
    /// = the request's `Server-ID`, carrying the request's `Msg-ID`.
    pub async fn reply(&self, mut reply: Envelope) -> Result<Published, PublishError> {
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

    /// Publishes on the listener's channel and waits for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        envelope: Envelope,
    ) -> Result<Published, PublishError> {
        let timeout = self
            .inner
            .outbox
            .as_ref()
            .map_or(Duration::from_secs(5), |o| o.timeout);
        self.publish_with(
            exchange,
            routing_key,
            envelope,
            PublishOptions::new(timeout),
        )
        .await
    }

    /// Publishes with explicit options (mandatory, persistent, gzip, timeout). A returned
    /// mandatory message is also reported to the listener as [`Notice::Returned`].
    pub async fn publish_with(
        &self,
        exchange: &str,
        routing_key: &str,
        mut envelope: Envelope,
        options: PublishOptions,
    ) -> Result<Published, PublishError> {
        let outbox = self
            .inner
            .outbox
            .as_ref()
            .ok_or_else(|| PublishError::Channel("this event has no channel".to_string()))?;
        envelope.stamp(&outbox.stamp);
        let published =
            publish_confirmed(&outbox.channel, exchange, routing_key, &envelope, &options).await?;
        if let Published::Returned(returned) = &published {
            outbox
                .listener
                .on_notice(&Notice::Returned(returned.clone()));
        }
        Ok(published)
    }
}
