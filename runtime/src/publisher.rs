//! The node's publisher: envelopes go out on the primary broker's publish connection with
//! publisher confirms, and follow the primary when it changes.
//!
//! - Confirms are awaited per publish, but many publishes are in flight at once (any
//!   number of tasks, or one task with many publish futures), bounded by `confirm_window`:
//!   the only buffer, and a bounded one.
//! - A publish whose connection dies before the confirm is retried on whatever broker is
//!   primary then, until its timeout; past it the caller gets a clear error. A retried
//!   message may arrive twice (at least once).
//! - While no broker of the local zone is up, or the broker blocks publishing
//!   (`connection.blocked`), a publish waits for at most its timeout and then fails with
//!   `NoBroker` or `Blocked`; never forever.
//! - A refusal by the broker (e.g. 404, no such exchange) is not retried.
//!
//! It owns one channel on the primary's publish connection; consumers' channels are not
//! its business.

use std::sync::Arc;
use std::time::Duration;

use lapin::Channel;
use lapin::options::ConfirmSelectOptions;
use parking_lot::RwLock;
use tokio::sync::{Mutex, Semaphore, watch};
use tokio::time::Instant;

use crate::config::PublisherConfig;
use crate::connections::Connections;
use crate::envelope::{Envelope, Stamp};
use crate::publish::{PublishError, PublishOptions, Published, send};
use crate::registry::{BrokerId, ConnectionRegistry};

/// Pause before trying again after a failed channel open or a lost publish.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Publishes envelopes on the primary with confirms; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
    stamp: Option<Arc<Stamp>>,
}

struct Inner {
    connections: Connections,
    registry: ConnectionRegistry,
    current: RwLock<Option<Open>>,
    /// One opener at a time; the others wait for its channel.
    opening: Mutex<()>,
    window: Semaphore,
    timeout: Duration,
}

/// The channel publishes currently go to.
#[derive(Clone)]
struct Open {
    channel: Channel,
    broker: BrokerId,
    generation: u64,
}

impl Publisher {
    pub fn new(connections: Connections, config: &PublisherConfig) -> Self {
        Publisher {
            inner: Arc::new(Inner {
                registry: connections.registry().clone(),
                connections,
                current: RwLock::new(None),
                opening: Mutex::new(()),
                window: Semaphore::new(config.confirm_window.max(1)),
                timeout: config.timeout,
            }),
            stamp: None,
        }
    }

    /// The same publisher, stamping outgoing envelopes (App-Name, App-Version, Node,
    /// Msg-ID) where they lack them.
    pub fn with_stamp(&self, stamp: Stamp) -> Publisher {
        Publisher {
            inner: self.inner.clone(),
            stamp: Some(Arc::new(stamp)),
        }
    }

    /// Options with the configured timeout (`[publisher] timeout_ms`).
    pub fn options(&self) -> PublishOptions {
        PublishOptions::new(self.inner.timeout)
    }

    /// The broker publishes currently go to, if a channel is open.
    pub fn broker(&self) -> Option<BrokerId> {
        self.inner.current.read().as_ref().map(|o| o.broker)
    }

    /// Publishes `envelope` and waits for the broker's confirm (see the module docs).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        mut envelope: Envelope,
        options: PublishOptions,
    ) -> Result<Published, PublishError> {
        match &self.stamp {
            Some(stamp) => envelope.stamp(stamp),
            None => {
                envelope.ensure_msg_id();
            }
        }
        let (body, properties) = options.encode(&envelope);
        let deadline = Instant::now() + options.timeout;
        let Ok(Ok(_permit)) = tokio::time::timeout_at(deadline, self.inner.window.acquire()).await
        else {
            return Err(PublishError::Timeout(options.timeout));
        };
        let mut last_loss: Option<String> = None;
        loop {
            let open = match self.channel(deadline, options.timeout).await {
                Ok(open) => open,
                Err(PublishError::Timeout(_)) if last_loss.is_some() => {
                    return Err(PublishError::Channel(last_loss.unwrap_or_default()));
                }
                Err(error) => return Err(error),
            };
            let sent = tokio::time::timeout_at(
                deadline,
                send(
                    &open.channel,
                    exchange,
                    routing_key,
                    &body,
                    properties.clone(),
                    options.mandatory,
                ),
            )
            .await;
            match sent {
                Ok(Ok(published)) => return Ok(published),
                Ok(Err(error)) if error.is_retryable() => {
                    tracing::debug!(broker = %open.broker, %error, "publish lost with its channel; retrying on the primary");
                    self.forget(&open);
                    last_loss = Some(error.to_string());
                    if Instant::now() + RETRY_PAUSE >= deadline {
                        return Err(error);
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Ok(Err(error)) => {
                    if matches!(error, PublishError::Refused(_)) {
                        self.forget(&open);
                    }
                    return Err(error);
                }
                Err(_) => return Err(self.late(open.broker, options.timeout)),
            }
        }
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

    /// Stop using a channel that failed.
    fn forget(&self, open: &Open) {
        let mut current = self.inner.current.write();
        if current
            .as_ref()
            .is_some_and(|c| c.broker == open.broker && c.channel.id() == open.channel.id())
        {
            *current = None;
        }
    }

    /// The current channel if it still lives on the primary's current connection.
    fn usable(&self, primary: BrokerId, generation: u64) -> Option<Open> {
        self.inner
            .current
            .read()
            .as_ref()
            .filter(|o| {
                o.broker == primary && o.generation == generation && o.channel.status().connected()
            })
            .cloned()
    }

    /// A confirm-mode channel on the primary, waiting (until `deadline`) for a primary to
    /// exist and not to block publishing.
    async fn channel(&self, deadline: Instant, timeout: Duration) -> Result<Open, PublishError> {
        let registry = &self.inner.registry;
        let mut changes = registry.subscribe();
        loop {
            let Some(primary) = registry.primary() else {
                if !wait_for_change(&mut changes, deadline).await {
                    return Err(PublishError::NoBroker(timeout));
                }
                continue;
            };
            let Some(status) = registry.status(primary.id) else {
                return Err(PublishError::NoBroker(timeout));
            };
            if !status.publish_available {
                if !wait_for_change(&mut changes, deadline).await {
                    return Err(PublishError::NoBroker(timeout));
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
            if let Some(open) = self.usable(primary.id, status.publish_generation) {
                return Ok(open);
            }
            let Ok(_guard) = tokio::time::timeout_at(deadline, self.inner.opening.lock()).await
            else {
                return Err(PublishError::Timeout(timeout));
            };
            if let Some(open) = self.usable(primary.id, status.publish_generation) {
                return Ok(open);
            }
            match tokio::time::timeout_at(
                deadline,
                self.inner.connections.publish_channel(primary.id),
            )
            .await
            {
                Err(_) => return Err(PublishError::Timeout(timeout)),
                Ok(Err(error)) => {
                    tracing::debug!(broker = %primary, %error, "cannot open a publish channel yet");
                }
                Ok(Ok(taken)) => {
                    let confirm = taken
                        .channel
                        .confirm_select(ConfirmSelectOptions::default())
                        .await;
                    if let Err(error) = confirm {
                        tracing::debug!(broker = %primary, %error, "confirm.select failed");
                    } else {
                        let open = Open {
                            channel: taken.channel,
                            broker: taken.broker,
                            generation: taken.generation,
                        };
                        tracing::debug!(broker = %primary, "publishing to this broker");
                        *self.inner.current.write() = Some(open.clone());
                        return Ok(open);
                    }
                }
            }
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(PublishError::Timeout(timeout));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
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
