//! A client's mailbox: its own durable queue (`gateway.client.<id>`, with `x-expires` =
//! `client_queue_expiry_ms`), consumed by a listener while the client's socket is open
//! on this node.
//!
//! The queue outlives the socket: what arrives while the client is away waits there, and
//! the next connection of the same identity (on any gateway node) consumes it in order.
//! One delivery at a time (concurrency 1), acked only once its frame was written to the
//! socket; a delivery the socket could not take goes back to the queue (requeued in
//! place, so the order holds).
//!
//! Owns the queue's spec and the hand-over of deliveries to the socket's writer. Must
//! not touch frames from the client (`session`) nor other clients' queues: the queue is
//! bound only with `client.<own id>` and `feed.<feed>` keys.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use warren_listeners::prelude::*;

use crate::distributor::{CATEGORY, DELIVER, exchanges};
use crate::feed::{Feed, client_key, client_queue};
use crate::frame::delivery_frame;

/// How long a delivery waits for the socket to take its frame before it is requeued.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A frame for the socket's writer; `written` is answered once it is on the wire.
///
/// It exists so that a mailbox delivery is acked only after its frame was written, while
/// replies and errors (`written: None`) need no answer.
pub struct Outgoing {
    pub text: String,
    pub written: Option<oneshot::Sender<()>>,
}

/// Subjects a connection narrowed each feed's broadcasts to (no entry: everything).
pub type Targets = Arc<Mutex<HashMap<Feed, HashSet<String>>>>;

/// The listener on one client's own queue, for one connection.
///
/// It exists so that each connection consumes exactly its identity's queue and nothing
/// else, with the runtime's recovery (failover, re-declare) underneath.
pub struct Mailbox {
    pub name: String,
    pub id: String,
    pub config: GatewayConfig,
    pub writer: mpsc::Sender<Outgoing>,
    pub targets: Targets,
}

impl Listener for Mailbox {
    fn spec(&self) -> ListenerSpec {
        let writer = self.writer.clone();
        let targets = self.targets.clone();
        let mut spec = ListenerSpec::new(self.name.clone()).queue(
            QueueSpec::named(client_queue(&self.config.queue_prefix, &self.id))
                .durable()
                .expires(self.config.client_queue_expiry),
        );
        for exchange in exchanges(&self.config) {
            spec = spec.exchange(exchange);
        }
        spec.bind(&self.config.client_exchange, client_key(&self.id))
            .concurrency(1)
            .responder(CATEGORY, DELIVER, move |event: Event| {
                let writer = writer.clone();
                let targets = targets.clone();
                async move { deliver(event, writer, targets).await }
            })
    }
}

/// Writes one delivery's frame to the socket and waits until it is written.
async fn deliver(event: Event, writer: mpsc::Sender<Outgoing>, targets: Targets) -> HandlerResult {
    let envelope = event.envelope();
    let feed = envelope.get_str("channel").unwrap_or_default();
    let subject = envelope.get_str("subject");
    let broadcast = envelope
        .get("distribution")
        .and_then(|d| d.get("broadcast"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if broadcast && let (Some(feed), Some(subject)) = (Feed::parse(feed), subject) {
        let wanted = targets
            .lock()
            .get(&feed)
            .is_none_or(|subjects| subjects.contains(subject));
        if !wanted {
            return Ok(());
        }
    }
    let text = delivery_frame(
        feed,
        envelope.get("distribution").unwrap_or(&Value::Null),
        envelope.get("message").unwrap_or(&Value::Null),
        subject,
    );
    let (written, done) = oneshot::channel();
    let outgoing = Outgoing {
        text,
        written: Some(written),
    };
    if writer.send(outgoing).await.is_err() {
        return Err(HandlerError::defer("the socket is closed"));
    }
    match tokio::time::timeout(WRITE_TIMEOUT, done).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(HandlerError::defer("the socket did not take the frame")),
    }
}
