//! A listener's topology and how it is replayed on a channel: exchanges (the `targeted`
//! exchange first) → queue → qos → bindings; consuming is started by the actor once all of
//! that succeeded. (Nothing is published on this channel: publishes go out on publish
//! connections, so the consume channel needs no confirm mode.)
//!
//! Every broker operation here is bounded by the node's `operation_timeout`: a broker that
//! hangs (or a path that drops everything, with heartbeats off) is a timed-out step, which
//! the actor treats as a lost channel, never a hung actor. A declaration the broker refuses
//! because the object exists with other flags (406) is reported once, naming the object,
//! warren's flags and the broker's complaint, so an operator can fix it.
//!
//! The topology is the listener's own record: bindings added at run time are in it, so a
//! new channel on any broker gets everything. Nothing here keeps state of its own.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Consumer, ErrorKind};

use super::spec::{Binding, Exchange, QueueName, QueueSpec};

/// What the listener declares on every channel, including run-time changes.
#[derive(Clone, Debug)]
pub(crate) struct Topology {
    /// Every exchange declared before the queue (`targeted` first), with the flags the
    /// operator fixed in `[exchanges.<name>]` applied.
    pub exchanges: Vec<Exchange>,
    pub queue: QueueSpec,
    /// The queue's name on the broker (anonymous queues get one generated once).
    pub queue_name: String,
    pub bindings: Vec<Binding>,
    pub exclusive_consumer: bool,
    /// Consuming was paused by the app; a new channel does not resume it.
    pub paused: bool,
    /// The queue dead-letters to the parking queue (a quorum queue past its delivery
    /// limit): declare that one first, so that nothing is dead-lettered into the void.
    pub parking_first: Option<String>,
}

/// Why a broker operation failed.
#[derive(Debug)]
pub(crate) enum Cause {
    /// The broker (or the connection) said no.
    Broker(lapin::Error),
    /// The object exists on the broker with other flags or arguments (406).
    Mismatch(String),
    /// No answer within the operation timeout.
    Timeout(Duration),
}

/// One step of the replay (or of a run-time change) failed.
#[derive(Debug)]
pub(crate) struct SetupError {
    /// What was being done, e.g. "declaring exchange `targeted` (direct, durable)".
    pub step: String,
    pub cause: Cause,
}

impl SetupError {
    /// The channel cannot be trusted any more (timed out, or closed by the broker).
    pub fn is_timeout(&self) -> bool {
        matches!(self.cause, Cause::Timeout(_))
    }

    /// A declaration refused because the object exists with other flags: it will fail the
    /// same way on every channel until an operator acts.
    pub fn is_mismatch(&self) -> bool {
        matches!(self.cause, Cause::Mismatch(_))
    }
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cause {
            Cause::Broker(error) => write!(f, "{}: {error}", self.step),
            Cause::Timeout(after) => write!(f, "{}: no answer within {after:?}", self.step),
            Cause::Mismatch(hint) => write!(f, "{}: {hint}", self.step),
        }
    }
}

impl std::error::Error for SetupError {}

/// Runs one broker operation within `timeout`, naming it in the error.
pub(crate) async fn bounded<T>(
    timeout: Duration,
    step: impl FnOnce() -> String,
    operation: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, SetupError> {
    match tokio::time::timeout(timeout, operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(SetupError {
            step: step(),
            cause: Cause::Broker(error),
        }),
        Err(_) => Err(SetupError {
            step: step(),
            cause: Cause::Timeout(timeout),
        }),
    }
}

/// The broker's text for a 406 PRECONDITION_FAILED, if that is what `error` is.
fn precondition_failed(error: &SetupError) -> Option<String> {
    let Cause::Broker(error) = &error.cause else {
        return None;
    };
    match error.kind() {
        ErrorKind::ProtocolError(amqp) if amqp.get_id() == 406 => {
            Some(amqp.get_message().to_string())
        }
        _ => None,
    }
}

/// How an exchange is declared, in words (for errors).
fn exchange_flags(exchange: &Exchange) -> String {
    format!(
        "{:?}, {}, {}{}",
        exchange.kind,
        if exchange.durable {
            "durable"
        } else {
            "transient"
        },
        if exchange.auto_delete {
            "auto-delete"
        } else {
            "not auto-delete"
        },
        if exchange.internal { ", internal" } else { "" }
    )
    .to_lowercase()
}

/// How a queue is declared, in words (for errors).
fn queue_flags(queue: &QueueSpec) -> String {
    let mut flags = vec![
        if queue.durable {
            "durable"
        } else {
            "transient"
        }
        .to_string(),
        if queue.exclusive {
            "exclusive"
        } else {
            "not exclusive"
        }
        .to_string(),
        if queue.auto_delete {
            "auto-delete"
        } else {
            "not auto-delete"
        }
        .to_string(),
    ];
    for (key, value) in queue.arguments.inner() {
        flags.push(format!("{key} = {value:?}"));
    }
    flags.join(", ")
}

/// Exchanges, queue, qos and bindings, in that order, each step bounded.
pub(crate) async fn declare(
    channel: &Channel,
    topology: &Topology,
    prefetch: Option<u16>,
    timeout: Duration,
) -> Result<(), SetupError> {
    for exchange in &topology.exchanges {
        declare_exchange(channel, exchange, timeout).await?;
    }
    if let Some(parking) = &topology.parking_first {
        declare_parking(channel, parking, true, timeout).await?;
    }
    declare_queue(channel, topology, timeout).await?;
    if let Some(prefetch) = prefetch {
        bounded(
            timeout,
            || format!("basic.qos {prefetch}"),
            channel.basic_qos(prefetch, BasicQosOptions { global: false }),
        )
        .await?;
    }
    for binding in &topology.bindings {
        change_binding(
            channel,
            &topology.queue_name,
            binding,
            BindingChange::Add,
            timeout,
        )
        .await?;
    }
    Ok(())
}

async fn declare_exchange(
    channel: &Channel,
    exchange: &Exchange,
    timeout: Duration,
) -> Result<(), SetupError> {
    let declared = bounded(
        timeout,
        || {
            if exchange.passive {
                format!("checking that exchange `{}` exists", exchange.name)
            } else {
                format!(
                    "declaring exchange `{}` ({})",
                    exchange.name,
                    exchange_flags(exchange)
                )
            }
        },
        channel.exchange_declare(
            exchange.name.as_str().into(),
            exchange.kind.clone(),
            ExchangeDeclareOptions {
                passive: exchange.passive,
                durable: exchange.durable,
                auto_delete: exchange.auto_delete,
                internal: exchange.internal,
                nowait: false,
            },
            exchange.arguments.clone(),
        ),
    )
    .await;
    declared.map_err(|error| match precondition_failed(&error) {
        Some(broker) => SetupError {
            step: error.step,
            cause: Cause::Mismatch(format!(
                "the broker has this exchange with other flags ({broker}); declare it as the \
                 broker has it with [exchanges.{}] in config.ini (durable / auto_delete), or \
                 delete it on the broker",
                exchange.name
            )),
        },
        None => error,
    })
}

/// Declares the listener's queue (also to keep an anonymous queue from expiring).
pub(crate) async fn declare_queue(
    channel: &Channel,
    topology: &Topology,
    timeout: Duration,
) -> Result<(), SetupError> {
    let queue = &topology.queue;
    let declared = bounded(
        timeout,
        || {
            format!(
                "declaring queue `{}` ({})",
                topology.queue_name,
                queue_flags(queue)
            )
        },
        channel.queue_declare(
            topology.queue_name.as_str().into(),
            QueueDeclareOptions {
                passive: false,
                durable: queue.durable,
                exclusive: queue.exclusive,
                auto_delete: queue.auto_delete,
                nowait: false,
            },
            queue.arguments.clone(),
        ),
    )
    .await;
    declared
        .map(|_| ())
        .map_err(|error| match precondition_failed(&error) {
            Some(broker) => SetupError {
                step: error.step,
                cause: Cause::Mismatch(format!(
                    "the broker has this queue with other flags or arguments ({broker}); declare \
                 it the same way in the listener's QueueSpec, or delete it on the broker"
                )),
            },
            None => error,
        })
}

/// Whether a binding is added to the queue or removed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BindingChange {
    Add,
    Remove,
}

/// Adds a binding to the queue or removes it, bounded by `timeout`.
pub(crate) async fn change_binding(
    channel: &Channel,
    queue: &str,
    binding: &Binding,
    change: BindingChange,
    timeout: Duration,
) -> Result<(), SetupError> {
    let step = || {
        let verb = match change {
            BindingChange::Add => "binding to",
            BindingChange::Remove => "unbinding from",
        };
        format!(
            "{verb} `{}` with `{}`",
            binding.exchange, binding.routing_key
        )
    };
    let (exchange, routing_key) = (binding.exchange.as_str(), binding.routing_key.as_str());
    let arguments = binding.arguments.clone();
    match change {
        BindingChange::Add => {
            let options = QueueBindOptions::default();
            let call = channel.queue_bind(
                queue.into(),
                exchange.into(),
                routing_key.into(),
                options,
                arguments,
            );
            bounded(timeout, step, call).await
        }
        BindingChange::Remove => {
            let call =
                channel.queue_unbind(queue.into(), exchange.into(), routing_key.into(), arguments);
            bounded(timeout, step, call).await
        }
    }
}

/// Starts consuming the queue.
pub(crate) async fn consume(
    channel: &Channel,
    topology: &Topology,
    tag: &str,
    no_ack: bool,
    timeout: Duration,
) -> Result<Consumer, SetupError> {
    bounded(
        timeout,
        || format!("basic.consume on `{}`", topology.queue_name),
        channel.basic_consume(
            topology.queue_name.as_str().into(),
            tag.into(),
            BasicConsumeOptions {
                no_local: false,
                no_ack,
                exclusive: topology.exclusive_consumer,
                nowait: false,
            },
            FieldTable::default(),
        ),
    )
    .await
}

/// Cancels a consumer.
pub(crate) async fn cancel(
    channel: &Channel,
    tag: &str,
    timeout: Duration,
) -> Result<(), SetupError> {
    bounded(
        timeout,
        || format!("basic.cancel of `{tag}`"),
        channel.basic_cancel(tag.into(), BasicCancelOptions::default()),
    )
    .await
}

/// Ready messages in the queue (a passive declare: it never creates the queue).
pub(crate) async fn ready_count(
    channel: &Channel,
    queue: &str,
    timeout: Duration,
) -> Result<u32, SetupError> {
    let queue = bounded(
        timeout,
        || format!("checking queue `{queue}`"),
        channel.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        ),
    )
    .await?;
    Ok(queue.message_count())
}

/// Deletes the listener's queue if it is anonymous (its messages are nobody else's), and
/// only if it is empty and nobody consumes it: a queue that still holds messages, or that
/// a newer grant consumes, stays. Whether it was deleted.
pub(crate) async fn delete_if_anonymous(
    channel: &Channel,
    topology: &Topology,
    timeout: Duration,
) -> bool {
    if topology.queue.name != QueueName::Anonymous || !channel.status().connected() {
        return false;
    }
    let deleted = bounded(
        timeout,
        || format!("deleting queue `{}`", topology.queue_name),
        channel.queue_delete(
            topology.queue_name.as_str().into(),
            QueueDeleteOptions {
                if_unused: true,
                if_empty: true,
                nowait: false,
            },
        ),
    )
    .await;
    match deleted {
        Ok(_) => true,
        Err(error) => {
            tracing::debug!(queue = %topology.queue_name, %error, "the anonymous queue stays");
            false
        }
    }
}

/// The durable queue a listener's messages that cannot succeed go to when its queue has
/// no dead-letter exchange: `<queue>.parked`, or `<listener>.parked` for an anonymous
/// queue (whose own name dies with the listener).
pub(crate) fn parking_queue(topology: &Topology, listener: &str) -> String {
    match topology.queue.name {
        QueueName::Named(_) => format!("{}.parked", topology.queue_name),
        QueueName::Anonymous => format!("{listener}.parked"),
    }
}

/// Declares a parking queue: durable, classic; a quorum queue for a quorum queue's
/// listener (a classic queue lives on one node of a cluster: with that node down it could
/// neither take parked messages nor be declared, and the listener could not set up).
pub(crate) async fn declare_parking(
    channel: &Channel,
    name: &str,
    quorum: bool,
    timeout: Duration,
) -> Result<(), SetupError> {
    let mut arguments = FieldTable::default();
    if quorum {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    bounded(
        timeout,
        || format!("declaring the parking queue `{name}`"),
        channel.queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        ),
    )
    .await
    .map(|_| ())
}
