//! The distributor: takes what back-ends publish on `OUT_<FEED>` and hands each message to
//! the clients its `distribution` names, through their own queues.
//!
//! Every gateway node runs one distributor listener per feed on the same `OUT_<FEED>`
//! queue, a single-active-consumer queue: one node distributes a feed at a time, in the
//! back-end's order, and another takes over when it goes (competing consumers would
//! reorder one client's messages between nodes). A message is acked only once every copy it
//! became is confirmed by the broker (the listener's pipelined settlement), so a gateway
//! node that dies loses nothing. Broadcast: one copy with routing key `feed.<feed>` on the
//! client exchange (every client queue subscribed to the feed is bound with it);
//! multicast and direct: one copy per client id with routing key `client.<id>`.
//!
//! Owns the outbound routing. Must not touch sockets (`session`), nor the inbound side.

use std::time::Duration;

use serde_json::Value;
use warren_listeners::prelude::*;

use crate::feed::{Feed, client_key};
use crate::frame::Distribution;

/// Event-Category of every message the gateway and its back-ends exchange.
pub const CATEGORY: &str = "gateway";
/// Event-Name of a back-end's message on `OUT_<FEED>`.
pub const OUT: &str = "out";
/// Event-Name of a copy on a client's own queue.
pub const DELIVER: &str = "deliver";

/// Bound for the broker's confirm of one copy.
const COPY_TIMEOUT: Duration = Duration::from_secs(5);

/// The distributor of one feed (a listener on `OUT_<FEED>`).
///
/// It exists so that back-ends address clients by id or by feed and never know which
/// gateway node holds a client's socket.
pub struct Distributor {
    pub feed: Feed,
    pub config: GatewayConfig,
}

/// The three exchanges of the gateway, declared by every distributor (so that they exist
/// once any gateway node runs, and again after a failover).
pub fn exchanges(config: &GatewayConfig) -> [Exchange; 3] {
    [
        Exchange::topic(&config.in_exchange).durable(),
        Exchange::topic(&config.out_exchange).durable(),
        Exchange::direct(&config.client_exchange).durable(),
    ]
}

impl Listener for Distributor {
    fn spec(&self) -> ListenerSpec {
        let feed = self.feed;
        let client_exchange = self.config.client_exchange.clone();
        // One distributor of a feed at a time (single active consumer), one message at a
        // time: the copies for one client are written in the order the back-end sent them.
        // The other nodes' distributors wait on the queue and take over when it goes.
        let queue = QueueSpec::named(feed.out_queue(&self.config.queue_prefix))
            .durable()
            .argument("x-single-active-consumer", AMQPValue::Boolean(true));
        let mut spec = ListenerSpec::new(format!("gateway.out.{feed}"))
            .queue(queue)
            .concurrency(1);
        for exchange in exchanges(&self.config) {
            spec = spec.exchange(exchange);
        }
        spec.bind(&self.config.out_exchange, feed.as_str())
            .responder(CATEGORY, OUT, move |event: Event| {
                let client_exchange = client_exchange.clone();
                async move { distribute(feed, &client_exchange, event).await }
            })
    }
}

/// Publishes the copies of one outbound message; a message that names nobody valid is
/// rejected (parked), never retried.
async fn distribute(feed: Feed, client_exchange: &str, event: Event) -> HandlerResult {
    let envelope = event.envelope();
    let distribution = envelope
        .get("distribution")
        .ok_or_else(|| HandlerError::reject("`distribution`: missing"))
        .and_then(|value| {
            Distribution::parse(value, "distribution").map_err(HandlerError::reject)
        })?;
    let message = envelope.get("message").cloned().unwrap_or(Value::Null);
    let subject = envelope.get_str("subject").map(str::to_string);
    let copy = || {
        let mut copy = Envelope::new(CATEGORY, DELIVER)
            .with("channel", feed.as_str())
            .with("distribution", distribution.to_json())
            .with("message", message.clone());
        if let Some(subject) = &subject {
            copy.set("subject", subject.clone());
        }
        copy
    };
    let options = || PublishOptions::new(COPY_TIMEOUT).persistent();
    if distribution.broadcast {
        event
            .publish_with(client_exchange, &feed.broadcast_key(), copy(), options())
            .await?;
        return Ok(());
    }
    for id in distribution.recipients() {
        event
            .publish_with(client_exchange, &client_key(&id), copy(), options())
            .await?;
    }
    Ok(())
}
