//! Ordered publishing: a [`Sequence`] keeps its writes on one channel, so that the broker
//! routes them in the order they were written, and declares the exchanges it publishes to
//! on every channel it adopts.
//!
//! A publisher's plain [`Publisher::send`] takes whatever channel is current for each
//! message: two messages written one after the other can land on two channels (the first
//! one died in between) and a retry of the first then comes after the second. A sequence
//! never does that: it pins the channel of its first write and writes there until the
//! caller, having settled everything in flight, lets it go ([`Sequence::unpin`]). Over one
//! channel (one TCP stream), what the broker routed before a loss is a prefix of what was
//! written, so re-sending from the first unconfirmed message keeps the order (with
//! duplicates of that prefix: at least once).
//!
//! Owns the pinned channel and the exchanges declared on it. Must not touch the choice of
//! brokers (the publisher's `channel`) nor confirms' meaning (`confirm`).

use std::sync::Arc;
use std::time::Duration;

use lapin::BasicProperties;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Declare, Open, Outgoing, Publisher, Sent, Target, start_write};
use crate::confirm::{self, PublishError, PublishOptions};

/// Writes kept on one channel, in order; see the module docs.
///
/// It exists for publishers that promise an order (apps/event_pusher's lanes: one user's
/// events in the order they were accepted) while keeping many messages in flight.
pub struct Sequence {
    publisher: Publisher,
    pinned: Option<Open>,
    declare: Arc<[Declare]>,
    /// The registry's changes: while none came since the channel was found current,
    /// [`Sequence::moved`] needs no look at the registry (it runs once per write).
    changes: watch::Receiver<u64>,
}

impl Publisher {
    /// A sequence on this publisher's target, sharing its confirm window and figures, that
    /// declares `declare` on every channel it adopts.
    pub fn sequence(&self, declare: Vec<Declare>) -> Sequence {
        Sequence {
            publisher: self.clone(),
            pinned: None,
            declare: declare.into(),
            changes: self.inner.registry.subscribe(),
        }
    }
}

impl Sequence {
    /// Writes a body as it is on the pinned channel (or, unpinned, on the target's current
    /// channel, which it then pins after declaring the exchanges there) and returns the
    /// [`Sent`] future of its confirm. The message's frames are queued on the channel
    /// before this returns (so successive calls keep their order); the socket write and
    /// the confirm are the `Sent` future's to wait for, and a failed write is its error. Waits (within `options.timeout`) for a window slot
    /// and, unpinned, for a channel. Pinned to a channel that is gone, blocked or no longer
    /// the target's, nothing is written: `Err(Channel)`; settle what is in flight,
    /// [`Sequence::unpin`], and write again. A mandatory message is `Invalid`: a return
    /// could not be told apart from another in-flight message's. Pinned, it never waits for a window slot:
    /// with none free it returns `Err(Timeout(0))` at once, so that the caller settles
    /// its confirms (freeing slots) rather than wait for slots it holds itself.
    pub async fn send_raw(
        &mut self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        options: PublishOptions,
    ) -> Result<Sent, PublishError> {
        if options.mandatory {
            // On one channel with many messages in flight, a return cannot be matched to
            // its message (see `lease`).
            return Err(PublishError::Invalid(
                "a sequence does not take mandatory messages (publish them with Publisher::publish)"
                    .into(),
            ));
        }
        let (exchange, routing_key) = confirm::address(exchange, routing_key)?;
        let deadline = Instant::now() + options.timeout;
        let publisher = self.publisher.clone();
        let permit = if self.pinned.is_some() {
            // Something of this sequence may be in flight, holding slots that only its
            // caller's polling frees: never wait for a slot here, or sequences that hold
            // the whole window wait on each other until their deadlines.
            match publisher.inner.window.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => return Err(PublishError::Timeout(Duration::ZERO)),
            }
        } else {
            publisher.permit(deadline, options.timeout).await?
        };
        let moved = self.moved();
        let open = match &mut self.pinned {
            Some(open) if moved => {
                return Err(PublishError::Channel(format!(
                    "the sequence's channel on broker {} is gone",
                    open.broker
                )));
            }
            Some(open) => open,
            None => {
                self.changes.mark_unchanged();
                // Not mandatory (refused above): the target's shared channel.
                let open = publisher
                    .channel(deadline, options.timeout, false)
                    .await?
                    .open()
                    .clone();
                publisher
                    .declare_on(&open, &self.declare, deadline, options.timeout)
                    .await?;
                self.pinned.insert(open)
            }
        };
        // The frames are queued now, in the order of the calls; the socket write is the
        // `Sent` future's to wait for, so that a lane keeps many writes going (one thread
        // hop per message, not a round trip to the I/O loop before the next write).
        let outgoing = Outgoing {
            exchange,
            routing_key,
            body: body.to_vec(),
            properties,
            mandatory: false,
        };
        let write = match start_write(open, outgoing) {
            Ok(write) => write,
            Err(error) => {
                if !error.is_retryable() || matches!(error, PublishError::Refused(_)) {
                    publisher.forget_shared(open);
                }
                // Still pinned: what was written before may be in flight on it.
                return Err(error);
            }
        };
        publisher.wrote_to(open.broker);
        let (at, bytes, timeout) = (Instant::now(), body.len(), options.timeout);
        // What the future needs of the channel, not a clone of it (one per message).
        let (broker, channel, generation) = (open.broker, open.channel.id(), open.generation);
        let future = async move {
            let _permit = permit;
            let confirmed = async {
                let confirm = write.await?;
                confirm::confirmation(confirm).await
            };
            let answer = match tokio::time::timeout_at(deadline, confirmed).await {
                Ok(Err(error @ PublishError::Refused(_))) => {
                    publisher.forget_channel(broker, channel, generation);
                    Err(error)
                }
                Ok(result) => result,
                Err(_) => Err(publisher.late(broker, timeout)),
            };
            publisher.inner.figures.record(broker, at, bytes, &answer);
            answer
        };
        Ok(Sent {
            broker,
            confirm: Box::pin(future),
        })
    }

    /// Whether the pinned channel can no longer take writes in order: it is gone (its
    /// connection's generation changed, or it closed), its broker blocks publishing, or it
    /// is no longer the target's (the primary moved). False when unpinned.
    pub fn moved(&mut self) -> bool {
        let Some(open) = &self.pinned else {
            return false;
        };
        if !open.channel.status().connected() {
            return true;
        }
        // Nothing changed in the registry since the channel was found current.
        if matches!(self.changes.has_changed(), Ok(false)) {
            return false;
        }
        let registry = &self.publisher.inner.registry;
        let Some(status) = registry.status(open.broker) else {
            return true;
        };
        let lost = !status.publish_available
            || status.publish_generation != open.generation
            || !open.channel.status().connected();
        let elsewhere = match self.publisher.target {
            Target::Primary => registry.primary().map(|b| b.id) != Some(open.broker),
            Target::Broker(broker) => broker != open.broker,
        };
        let moved = lost || status.publish_blocked.is_some() || elsewhere;
        if !moved {
            self.changes.mark_unchanged();
        }
        moved
    }

    /// Whether writes are held to one channel now.
    pub fn is_pinned(&self) -> bool {
        self.pinned.is_some()
    }

    /// Lets the pinned channel go: the next write takes the target's current channel. Call
    /// it only with nothing in flight, or the order is lost.
    pub fn unpin(&mut self) {
        self.pinned = None;
    }
}
