//! Notifications (oslo.messaging's notifier and notification listener): events published
//! persistent, mandatory and confirmed to a durable topic exchange with routing key
//! `<topic>.<priority>`, and consumed from a durable queue of that name with manual acks
//! after the handler.
//!
//! Owns: [`notify`] (and `AppContext::notify`), [`Notification`], [`NotificationListener`].
//! Must not touch: acks, requeues and parking (the listener machinery does them: a
//! handler error requeues, past `max_redeliveries` the message is parked).

use std::future::Future;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;
use warren_runtime::config::RpcConfig;
use warren_runtime::confirm::Published;
use warren_runtime::envelope::{Envelope, keys};
use warren_runtime::publisher::Publisher;

use super::address::{TargetError, short, shortened};
use super::wire;
use crate::app::AppContext;
use crate::listener::{
    Event, Exchange, HandlerResult, Listener, ListenerSpec, QueueSpec, SpecError,
};
use crate::pool::RpcError;
use warren_runtime::supervisor::ChildSpec;

/// One received notification.
///
/// It exists so that a notification handler reads typed fields instead of an envelope.
#[derive(Clone, Debug, PartialEq)]
pub struct Notification {
    /// What happened (`Event-Name`), e.g. `compute.instance.create.end`.
    pub event_type: String,
    /// `Priority`, e.g. `info` or `error`.
    pub priority: String,
    /// `Payload` (null when absent).
    pub payload: Value,
    /// `Publisher-ID`: the publishing node.
    pub publisher_id: Option<String>,
    /// `Timestamp` as sent (RFC 3339).
    pub timestamp: Option<String>,
    /// `Msg-ID`.
    pub msg_id: Option<String>,
    /// The broker delivered it before (a handler failed on it, or a consumer died).
    pub redelivered: bool,
}

/// `<topic>.<priority>`: the routing key, binding and queue name of notifications.
pub(super) fn address(topic: &str, priority: &str) -> Result<String, TargetError> {
    if topic.is_empty() {
        return Err(TargetError::EmptyTopic);
    }
    if topic.contains(['#', '*']) {
        return Err(TargetError::BadTopic(topic.to_string()));
    }
    if priority.is_empty() || priority.contains(['.', '#', '*']) {
        return Err(TargetError::BadPriority(priority.to_string()));
    }
    let address = format!("{topic}.{priority}");
    short("the notification address", &address)?;
    Ok(address)
}

/// Publishes a notification of `event_type` with `payload` to `exchange`, routing key
/// `<topic>.<priority>`: persistent, mandatory and confirmed. `Ok` once the broker has it
/// in a queue; `Returned` when no queue is bound for it (nobody listens), `Publish` when
/// it failed (e.g. `Refused` when the exchange does not exist yet).
pub async fn notify(
    publisher: &Publisher,
    exchange: &str,
    (topic, priority): (&str, &str),
    event_type: &str,
    payload: Value,
    publisher_id: &str,
) -> Result<(), RpcError> {
    let routing_key = address(topic, priority)?;
    let body = wire::notification(event_type, priority, payload, publisher_id);
    let options = publisher.options().persistent().mandatory();
    match publisher
        .publish(exchange, &routing_key, body, options)
        .await
    {
        Ok(Published::Routed) => Ok(()),
        Ok(Published::Returned(returned)) => Err(RpcError::Returned(returned)),
        Err(error) => Err(RpcError::Publish(error)),
    }
}

impl AppContext {
    /// Publishes a notification as this app to `[rpc] notifications_exchange` (see
    /// [`notify`]); `Publisher-ID` is the node's name. Over AMQP 1.0 when the node's
    /// `[rpc] transport` is `amqp10` (durable, `Ok` once the intermediary accepted it).
    pub async fn notify(
        &self,
        topic: &str,
        priority: &str,
        event_type: &str,
        payload: Value,
    ) -> Result<(), RpcError> {
        if let Some(transport) = &self.node.amqp10 {
            let timeout = self.node.listeners.listener.publish_timeout;
            return super::amqp10::notify(
                transport,
                &self.node.rpc,
                (topic, priority),
                (event_type, payload),
                timeout,
            )
            .await;
        }
        let publisher = self.node.publisher.with_stamp(self.stamp());
        notify(
            &publisher,
            &self.node.rpc.notifications_exchange,
            (topic, priority),
            event_type,
            payload,
            &self.node.node,
        )
        .await
    }

    /// A [`NotificationListener`] on this node's `[rpc] notifications_exchange`.
    pub fn notification_listener<F, Fut>(
        &self,
        topic: impl Into<String>,
        priority: impl Into<String>,
        handler: F,
    ) -> NotificationListener
    where
        F: Fn(Notification) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        NotificationListener::new(topic, priority, handler)
            .exchange(&self.node.rpc.notifications_exchange)
    }

    /// Serves `listener` as a supervised child on the node's RPC transport: its listener
    /// over AMQP 0-9-1, or one receiver link over AMQP 1.0 when `[rpc] transport =
    /// "amqp10"` (released on a handler error, rejected past `max_redeliveries`).
    pub fn notifications(&self, listener: NotificationListener) -> ChildSpec {
        if self.node.amqp10.is_none() {
            return self.listener(listener);
        }
        let exchange = listener
            .exchange
            .clone()
            .unwrap_or_else(|| self.node.rpc.notifications_exchange.clone());
        let id = format!("notifications:{}.{}", listener.topic, listener.priority);
        if let Err(error) = address(&listener.topic, &listener.priority) {
            let refusal = SpecError {
                listener: id.clone(),
                field: "topic",
                problem: error.to_string(),
            };
            return self.refuse(id, refusal);
        }
        let max = listener
            .max_redeliveries
            .unwrap_or(self.node.listeners.listener.max_redeliveries);
        super::amqp10::notifications_child(
            id,
            &self.node,
            (exchange, listener.topic, listener.priority),
            max,
            listener.handler,
        )
    }
}

/// A notification handler, boxed.
type Handler = Arc<dyn Fn(Notification) -> BoxFuture<'static, HandlerResult> + Send + Sync>;

/// A listener for the notifications of one topic and priority (oslo's notification
/// listener): the durable queue `<topic>.<priority>`, bound with that key to the
/// notifications exchange (a durable topic exchange it declares), acked after the handler.
///
/// It exists so that an app consumes notifications by topic and priority without writing
/// the queue, binding and decoding itself. A handler error requeues the notification;
/// past `max_redeliveries` it is parked, as for any listener.
pub struct NotificationListener {
    topic: String,
    priority: String,
    exchange: Option<String>,
    max_redeliveries: Option<u32>,
    handler: Handler,
}

impl NotificationListener {
    /// Notifications of `topic` at `priority`, handled by `handler`. The exchange is
    /// `[rpc] notifications_exchange`'s default (`openstack`) unless [`Self::exchange`]
    /// names another; `ctx.notification_listener(..)` uses the node's configured one.
    pub fn new<F, Fut>(topic: impl Into<String>, priority: impl Into<String>, handler: F) -> Self
    where
        F: Fn(Notification) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        NotificationListener {
            topic: topic.into(),
            priority: priority.into(),
            exchange: None,
            max_redeliveries: None,
            handler: Arc::new(move |notification| handler(notification).boxed()),
        }
    }

    /// Consumes from this notifications exchange.
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = Some(exchange.into());
        self
    }

    /// Failures before a notification is parked (default `[listener] max_redeliveries`).
    pub fn max_redeliveries(mut self, max: u32) -> Self {
        self.max_redeliveries = Some(max);
        self
    }
}

impl Listener for NotificationListener {
    fn spec(&self) -> ListenerSpec {
        let exchange = self
            .exchange
            .clone()
            .unwrap_or_else(|| RpcConfig::default().notifications_exchange);
        // A bad topic or priority leaves the queue name empty: the spec check refuses it
        // (naming the listener) before anything reaches a broker.
        let queue = address(&self.topic, &self.priority).unwrap_or_default();
        let handler = self.handler.clone();
        let mut spec = ListenerSpec::new(format!("notifications-{}", shortened(&queue)))
            .queue(QueueSpec::named(&queue).durable())
            .exchange(Exchange::topic(&exchange).durable())
            .bind(&exchange, &queue)
            .responder("*", "*", move |event: Event| {
                let handler = handler.clone();
                async move { handler(notification(&event)).await }
            });
        if let Some(max) = self.max_redeliveries {
            spec = spec.max_redeliveries(max);
        }
        spec
    }
}

/// The notification an event carries.
fn notification(event: &Event) -> Notification {
    Notification::read(event.envelope(), event.delivery().redelivered)
}

impl Notification {
    /// The notification a received envelope carries.
    pub(super) fn read(envelope: &Envelope, redelivered: bool) -> Notification {
        let text = |key: &str| envelope.get_str(key).map(str::to_string);
        Notification {
            event_type: envelope.name().to_string(),
            priority: text(wire::PRIORITY).unwrap_or_default(),
            payload: envelope.get(wire::PAYLOAD).cloned().unwrap_or(Value::Null),
            publisher_id: text(wire::PUBLISHER_ID),
            timestamp: text(wire::TIMESTAMP),
            msg_id: text(keys::MSG_ID),
            redelivered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_topic_dot_priority() {
        assert_eq!(
            address("notifications", "info").unwrap(),
            "notifications.info"
        );
        assert_eq!(address("a.b", "error").unwrap(), "a.b.error");
        assert_eq!(address("", "info").unwrap_err(), TargetError::EmptyTopic);
        assert!(address("t#", "info").is_err());
        assert_eq!(
            address("t", "in.fo").unwrap_err(),
            TargetError::BadPriority("in.fo".into())
        );
        assert!(address("t", "").is_err());
    }
}
