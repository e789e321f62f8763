//! Exchanges declared by the publishing side: a [`Sequence`](super::Sequence)'s on each
//! channel it adopts, and [`Publisher::declare`]'s once per broker, so that a message sent
//! before its consumers ever ran meets an exchange (and comes back `Returned` when
//! mandatory) instead of closing its channel with 404.
//!
//! Owns the exchange declarations and which brokers have had them. Must not touch the
//! choice of channels (the publisher's) or publishing.

use std::time::Duration;

use lapin::ExchangeKind;
use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use tokio::time::Instant;

use super::{Open, Publisher};
use crate::broker::BrokerId;
use crate::confirm::{self, PublishError};

/// An exchange the publishing side declares (as its consumers would: same kind and
/// durability, or the broker refuses it with 406).
#[derive(Clone, Debug)]
pub struct Declare {
    pub name: String,
    pub kind: ExchangeKind,
    pub durable: bool,
}

impl Publisher {
    /// Declares exchange `name` (`kind`, `durable`) on the target's broker, once per
    /// broker: later calls return at once (no round trip) unless a publish since met no
    /// exchange of that name there (404), which makes the next call declare it again.
    /// Bounded by `timeout` and the operation timeout; a refusal (e.g. 406, another kind)
    /// is `Refused`.
    pub async fn declare(
        &self,
        name: &str,
        kind: ExchangeKind,
        durable: bool,
        timeout: Duration,
    ) -> Result<(), PublishError> {
        // The broker publishes go to (no look at its channels: this runs on every call).
        let broker = match self.target {
            super::Target::Primary => *self.inner.last_primary.read(),
            super::Target::Broker(broker) => Some(broker),
        };
        if let Some(broker) = broker
            && self
                .inner
                .declared
                .lock()
                .get(&broker)
                .is_some_and(|names| names.contains(name))
        {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        let open = self.channel(deadline, timeout, false).await?.open().clone();
        let exchange = Declare {
            name: name.to_string(),
            kind,
            durable,
        };
        self.declare_on(&open, std::slice::from_ref(&exchange), deadline, timeout)
            .await?;
        self.inner
            .declared
            .lock()
            .entry(open.broker)
            .or_default()
            .insert(exchange.name);
        Ok(())
    }

    /// A publish to `exchange` on `broker` met no such exchange: [`Publisher::declare`]
    /// declares it again.
    pub(super) fn undeclared(&self, broker: BrokerId, exchange: &str) {
        if let Some(names) = self.inner.declared.lock().get_mut(&broker) {
            names.remove(exchange);
        }
    }

    /// Declares `exchanges` on the shared channel `open`, each bounded by the operation
    /// timeout; a failure closes the channel (the next publish opens another).
    pub(super) async fn declare_on(
        &self,
        open: &Open,
        exchanges: &[Declare],
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), PublishError> {
        let bound = self.inner.operation_timeout;
        for exchange in exchanges {
            let name = confirm::short_string("the exchange name", &exchange.name)?;
            let declared = tokio::time::timeout_at(
                deadline.min(Instant::now() + bound),
                open.channel.exchange_declare(
                    name,
                    exchange.kind.clone(),
                    ExchangeDeclareOptions {
                        durable: exchange.durable,
                        ..Default::default()
                    },
                    FieldTable::default(),
                ),
            )
            .await;
            match declared {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    self.forget_shared(open);
                    let what = format!("declaring exchange `{}`: {error}", exchange.name);
                    return Err(if error.is_amqp_soft_error() {
                        PublishError::Refused(what)
                    } else {
                        PublishError::Channel(what)
                    });
                }
                Err(_) => {
                    self.forget_shared(open);
                    return Err(PublishError::Timeout(timeout));
                }
            }
        }
        Ok(())
    }
}
