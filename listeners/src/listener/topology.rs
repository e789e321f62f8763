//! A listener's topology and how it is replayed on a channel: confirm mode (for publishes
//! from handlers, unless switched off) → exchanges (the `targeted` exchange first) → queue → qos → bindings;
//! consuming is started by the actor once all of that succeeded.
//!
//! The topology is the listener's own record: bindings added at run time are in it, so a
//! new channel on any broker gets everything. Nothing here keeps state of its own.

use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer, ExchangeKind};
use warren_runtime::exchanges::TARGETED;

use super::spec::{Binding, Exchange, QueueName, QueueSpec};

/// What the listener declares on every channel, including run-time changes.
#[derive(Clone, Debug)]
pub(crate) struct Topology {
    pub exchanges: Vec<Exchange>,
    pub queue: QueueSpec,
    /// The queue's name on the broker (anonymous queues get one generated once).
    pub queue_name: String,
    pub bindings: Vec<Binding>,
    pub exclusive_consumer: bool,
    /// Confirm mode on the channel.
    pub confirms: bool,
    /// Consuming was paused by the app; a new channel does not resume it.
    pub paused: bool,
}

/// A step of the replay failed; the channel is probably closed by the broker.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SetupError {
    #[error("confirm.select: {0}")]
    Confirm(lapin::Error),
    #[error("declaring exchange `{name}`: {error}")]
    Exchange { name: String, error: lapin::Error },
    #[error("declaring queue `{name}`: {error}")]
    Queue { name: String, error: lapin::Error },
    #[error("basic.qos: {0}")]
    Qos(lapin::Error),
    #[error("binding to `{exchange}` with `{routing_key}`: {error}")]
    Bind {
        exchange: String,
        routing_key: String,
        error: lapin::Error,
    },
    #[error("basic.consume on `{queue}`: {error}")]
    Consume { queue: String, error: lapin::Error },
}

/// Confirm mode, exchanges, queue, qos and bindings, in that order.
pub(crate) async fn declare(
    channel: &Channel,
    topology: &Topology,
    prefetch: Option<u16>,
) -> Result<(), SetupError> {
    if topology.confirms {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(SetupError::Confirm)?;
    }
    let targeted = Exchange::new(TARGETED, ExchangeKind::Direct);
    for exchange in std::iter::once(&targeted).chain(&topology.exchanges) {
        declare_exchange(channel, exchange).await?;
    }
    let queue = &topology.queue;
    channel
        .queue_declare(
            topology.queue_name.as_str().into(),
            QueueDeclareOptions {
                passive: false,
                durable: queue.durable,
                exclusive: queue.exclusive,
                auto_delete: queue.auto_delete,
                nowait: false,
            },
            queue.arguments.clone(),
        )
        .await
        .map_err(|error| SetupError::Queue {
            name: topology.queue_name.clone(),
            error,
        })?;
    if let Some(prefetch) = prefetch {
        channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .map_err(SetupError::Qos)?;
    }
    for binding in &topology.bindings {
        bind(channel, &topology.queue_name, binding).await?;
    }
    Ok(())
}

async fn declare_exchange(channel: &Channel, exchange: &Exchange) -> Result<(), SetupError> {
    channel
        .exchange_declare(
            exchange.name.as_str().into(),
            exchange.kind.clone(),
            ExchangeDeclareOptions {
                passive: false,
                durable: exchange.durable,
                auto_delete: exchange.auto_delete,
                internal: exchange.internal,
                nowait: false,
            },
            exchange.arguments.clone(),
        )
        .await
        .map_err(|error| SetupError::Exchange {
            name: exchange.name.clone(),
            error,
        })
}

/// Binds the queue.
pub(crate) async fn bind(
    channel: &Channel,
    queue: &str,
    binding: &Binding,
) -> Result<(), SetupError> {
    channel
        .queue_bind(
            queue.into(),
            binding.exchange.as_str().into(),
            binding.routing_key.as_str().into(),
            QueueBindOptions::default(),
            binding.arguments.clone(),
        )
        .await
        .map_err(|error| SetupError::Bind {
            exchange: binding.exchange.clone(),
            routing_key: binding.routing_key.clone(),
            error,
        })
}

/// Removes a binding of the queue.
pub(crate) async fn unbind(
    channel: &Channel,
    queue: &str,
    binding: &Binding,
) -> Result<(), SetupError> {
    channel
        .queue_unbind(
            queue.into(),
            binding.exchange.as_str().into(),
            binding.routing_key.as_str().into(),
            binding.arguments.clone(),
        )
        .await
        .map_err(|error| SetupError::Bind {
            exchange: binding.exchange.clone(),
            routing_key: binding.routing_key.clone(),
            error,
        })
}

/// Starts consuming the queue.
pub(crate) async fn consume(
    channel: &Channel,
    topology: &Topology,
    tag: &str,
    no_ack: bool,
) -> Result<Consumer, SetupError> {
    channel
        .basic_consume(
            topology.queue_name.as_str().into(),
            tag.into(),
            BasicConsumeOptions {
                no_local: false,
                no_ack,
                exclusive: topology.exclusive_consumer,
                nowait: false,
            },
            FieldTable::default(),
        )
        .await
        .map_err(|error| SetupError::Consume {
            queue: topology.queue_name.clone(),
            error,
        })
}

/// Whether the queue has no ready messages left (for draining an old lease).
pub(crate) async fn is_empty(channel: &Channel, queue: &str) -> Result<bool, lapin::Error> {
    let queue = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(queue.message_count() == 0)
}

/// Deletes the listener's queue if it is anonymous (its messages are nobody else's).
pub(crate) async fn delete_if_anonymous(channel: &Channel, topology: &Topology) {
    if topology.queue.name != QueueName::Anonymous || !channel.status().connected() {
        return;
    }
    if let Err(error) = channel
        .queue_delete(
            topology.queue_name.as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
    {
        tracing::debug!(queue = %topology.queue_name, %error, "cannot delete the anonymous queue");
    }
}
