//! The event pusher's Rust API: `EventPusher::presence(..)`, `::chat_sent(..)`, … and
//! batches, each returning once the broker confirmed (or with why not).
//!
//! Owns turning calls into lane jobs and waiting for their outcomes. Must not touch the
//! lanes' order (`lanes`) or the wire form (`event`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use warren_listeners::prelude::*;

use crate::event::{EventError, Kind, Outgoing, PushEvent};
use crate::figures::PusherFigures;
use crate::lanes::{Job, LaneSettings, Lanes, Outcome};

/// Publishes chat-server events to RabbitMQ as MongooseIM's `mod_event_pusher_rabbit`
/// does, with confirms, retries across a failover and per-user order. Cheap to clone.
///
/// It exists for embedding: a chat server written in Rust calls it directly; `POST
/// /events` calls it too.
#[derive(Clone)]
pub struct EventPusher {
    inner: Arc<Inner>,
}

struct Inner {
    config: EventPusherConfig,
    lanes: Lanes,
    timeout: Duration,
    /// Keeps the figures in `/metrics` while the pusher lives.
    _figures: Option<MetricsEntry>,
}

/// Why events were not published.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The event is not valid (the index within its batch, and what is wrong).
    #[error("event {index}: {error}")]
    Invalid { index: usize, error: EventError },
    /// The broker did not confirm within the publish bound (none up, blocked, lost).
    #[error("event {index} not published: {error}")]
    Unavailable { index: usize, error: PublishError },
    /// The pusher's lanes are gone (the node is stopping).
    #[error("the event pusher is stopped")]
    Stopped,
}

/// What a batch came to: how many events the broker confirmed, and the first failure.
#[derive(Debug)]
pub struct BatchOutcome {
    pub events: usize,
    pub confirmed: usize,
    pub failure: Option<PushError>,
}

impl EventPusher {
    /// A pusher publishing through `publisher` (its timeout bounds each event) with
    /// `config`'s exchanges and lanes; its figures go to `metrics` when given.
    pub fn new(
        publisher: &Publisher,
        registry: ConnectionRegistry,
        metrics: Option<&Metrics>,
        config: EventPusherConfig,
    ) -> EventPusher {
        let figures = Arc::new(PusherFigures::new(
            registry,
            metrics.unwrap_or(&Metrics::new(false)),
        ));
        let entry = metrics.map(|m| m.register(figures.clone()));
        let mut properties =
            BasicProperties::default().with_content_type("application/json".into());
        if config.persistent {
            properties = properties.with_delivery_mode(2);
        }
        let settings = LaneSettings {
            lanes: config.lanes,
            window: config.lane_window,
            properties,
            declare: declarations(&config),
        };
        let lanes = Lanes::start(publisher, settings, figures);
        EventPusher {
            inner: Arc::new(Inner {
                timeout: publisher.options().timeout,
                config,
                lanes,
                _figures: entry,
            }),
        }
    }

    /// The settings it publishes with.
    pub fn config(&self) -> &EventPusherConfig {
        &self.inner.config
    }

    /// `user_id` (a full or bare JID) became available (`present`) or unavailable.
    pub async fn presence(&self, user_id: &str, present: bool) -> Result<(), PushError> {
        let event = PushEvent::presence(user_id, present).map_err(invalid)?;
        self.push(event).await
    }

    /// A private message `from` → `to`, as the sender's server saw it leave.
    pub async fn chat_sent(&self, from: &str, to: &str, message: &str) -> Result<(), PushError> {
        self.message(Kind::ChatSent, from, to, message).await
    }

    /// A private message `from` → `to`, as the receiver's server saw it arrive.
    pub async fn chat_recv(&self, from: &str, to: &str, message: &str) -> Result<(), PushError> {
        self.message(Kind::ChatRecv, from, to, message).await
    }

    /// A groupchat message sent by `from` to room `to`.
    pub async fn groupchat_sent(
        &self,
        from: &str,
        to: &str,
        message: &str,
    ) -> Result<(), PushError> {
        self.message(Kind::GroupchatSent, from, to, message).await
    }

    /// A groupchat message from room `from` received by `to`.
    pub async fn groupchat_recv(
        &self,
        from: &str,
        to: &str,
        message: &str,
    ) -> Result<(), PushError> {
        self.message(Kind::GroupchatRecv, from, to, message).await
    }

    async fn message(&self, kind: Kind, from: &str, to: &str, text: &str) -> Result<(), PushError> {
        let event = PushEvent::message(kind, from, to, text).map_err(invalid)?;
        self.push(event).await
    }

    /// Publishes one event and waits for the broker's confirm.
    pub async fn push(&self, event: PushEvent) -> Result<(), PushError> {
        // One event: what `push_all` does, without its lists (this is the hot path).
        let outgoing = event.encode(&self.inner.config).map_err(invalid)?;
        let deadline = Instant::now() + self.inner.timeout;
        let Ok(answer) = self.submit(outgoing, deadline).await else {
            return Err(self.unsubmitted(0, deadline));
        };
        match answer.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(PushError::Unavailable { index: 0, error }),
            Err(_) => Err(PushError::Stopped),
        }
    }

    /// Hands `outgoing` to its lane (failing at `deadline`): the receiver of its outcome,
    /// or `Err` when no lane took it.
    async fn submit(
        &self,
        outgoing: Outgoing,
        deadline: Instant,
    ) -> Result<oneshot::Receiver<Outcome>, ()> {
        let (done, answer) = oneshot::channel();
        let job = Job {
            outgoing,
            deadline,
            done,
        };
        match self.inner.lanes.submit(job).await {
            Ok(()) => Ok(answer),
            Err(_) => Err(()),
        }
    }

    /// Why event `index` could not be handed to its lane: no room before `deadline`, or
    /// the lanes are gone.
    fn unsubmitted(&self, index: usize, deadline: Instant) -> PushError {
        if Instant::now() >= deadline {
            PushError::Unavailable {
                index,
                error: PublishError::Timeout(self.inner.timeout),
            }
        } else {
            PushError::Stopped
        }
    }

    /// Publishes `events` (in order per user) and waits until every one is confirmed or
    /// failed. Nothing is written unless every event is valid.
    pub async fn push_all(&self, events: Vec<PushEvent>) -> BatchOutcome {
        let count = events.len();
        let mut encoded = Vec::with_capacity(count);
        for (index, event) in events.iter().enumerate() {
            match event.encode(&self.inner.config) {
                Ok(outgoing) => encoded.push(outgoing),
                Err(error) => {
                    return BatchOutcome {
                        events: count,
                        confirmed: 0,
                        failure: Some(PushError::Invalid { index, error }),
                    };
                }
            }
        }
        let deadline = Instant::now() + self.inner.timeout;
        let mut waiting = Vec::with_capacity(count);
        let mut failure = None;
        for (index, outgoing) in encoded.into_iter().enumerate() {
            let Ok(answer) = self.submit(outgoing, deadline).await else {
                failure = Some(self.unsubmitted(index, deadline));
                break;
            };
            waiting.push((index, answer));
        }
        let mut confirmed = 0;
        for (index, answer) in waiting {
            match answer.await {
                Ok(Ok(_)) => confirmed += 1,
                Ok(Err(error)) => {
                    failure.get_or_insert(PushError::Unavailable { index, error });
                }
                Err(_) => {
                    failure.get_or_insert(PushError::Stopped);
                }
            }
        }
        BatchOutcome {
            events: count,
            confirmed,
            failure,
        }
    }
}

fn invalid(error: EventError) -> PushError {
    PushError::Invalid { index: 0, error }
}

/// The three exchanges of `config`, as each lane declares them on a new channel.
pub fn declarations(config: &EventPusherConfig) -> Vec<Declare> {
    [
        &config.presence_exchange,
        &config.chat_msg_exchange,
        &config.groupchat_msg_exchange,
    ]
    .into_iter()
    .map(|exchange| Declare {
        name: exchange.name.clone(),
        kind: exchange_kind(exchange.kind),
        durable: config.durable_exchanges,
    })
    .collect()
}

/// The AMQP kind of a configured exchange type.
pub fn exchange_kind(kind: PusherExchangeKind) -> ExchangeKind {
    match kind {
        PusherExchangeKind::Topic => ExchangeKind::Topic,
        PusherExchangeKind::Direct => ExchangeKind::Direct,
    }
}
