//! event_pusher: chat-server events (presence, chat and groupchat messages) to RabbitMQ,
//! wire-compatible with MongooseIM's `mod_event_pusher_rabbit` (same exchanges, routing
//! keys and JSON bodies), with the guarantees it lacks: every event confirmed before its
//! caller hears `Ok` (nothing lost silently), confirms windowed (many in flight), retried
//! across a failover, and one user's events kept in order (see `lanes`).
//!
//! Input: the Rust API ([`EventPusher`]) and `POST /events` on the node's HTTP endpoint
//! (`http`). Its exchanges are declared when the app starts by a listener that consumes
//! nothing (it re-declares them on every new channel, and the node is not ready until
//! they exist), and by each lane on every channel it adopts, so a publish after a
//! failover never meets a missing exchange.
//!
//! Files: `event` (JSON in, MongooseIM's wire form out), `lanes` (ordered, windowed
//! publishing), `pusher` (the API), `http` (the route), `figures` (the metrics). Owns the
//! app; must not touch the runtime (it imports `warren_listeners::prelude` only).

mod event;
mod figures;
mod http;
mod lanes;
mod pusher;

use std::sync::{Arc, OnceLock};

use warren_listeners::prelude::*;

pub use event::{EventError, Kind, Outgoing, PushEvent};
pub use http::{PATH, router};
pub use pusher::{BatchOutcome, EventPusher, PushError, declarations, exchange_kind};

/// The event pusher app (`[apps.event_pusher]`).
///
/// It exists to run the pusher under the node: its exchanges' listener supervised, its
/// route on the node's HTTP endpoint, its figures in `/metrics`. [`EventPusherApp::pusher`]
/// hands the running pusher to code embedded in the same binary.
#[derive(Default)]
pub struct EventPusherApp {
    pusher: Arc<OnceLock<EventPusher>>,
}

impl EventPusherApp {
    /// The pusher, once the node built the app.
    pub fn pusher(&self) -> Option<EventPusher> {
        self.pusher.get().cloned()
    }
}

impl App for EventPusherApp {
    fn name(&self) -> &'static str {
        "event_pusher"
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn children(&self, ctx: &AppContext) -> Vec<ChildSpec> {
        let config = ctx.config.event_pusher.clone();
        let pusher = self
            .pusher
            .get_or_init(|| {
                EventPusher::new(
                    &ctx.node.publisher,
                    ctx.node.registry.clone(),
                    Some(&ctx.node.metrics),
                    config.clone(),
                )
            })
            .clone();
        if let Err(error) = ctx.node.http.mount(PATH, router(pusher)) {
            tracing::warn!(%error, "event_pusher: POST /events not served");
        }
        vec![ctx.listener(ExchangesListener { config })]
    }
}

/// Declares the pusher's three exchanges when the app starts and on every new channel
/// (a failover), consuming nothing: its anonymous queue has no binding.
pub struct ExchangesListener {
    pub config: EventPusherConfig,
}

impl Listener for ExchangesListener {
    fn spec(&self) -> ListenerSpec {
        let mut spec = ListenerSpec::new("event_pusher").queue(QueueSpec::anonymous());
        for declare in declarations(&self.config) {
            let mut exchange = Exchange::new(declare.name, declare.kind);
            if declare.durable {
                exchange = exchange.durable();
            }
            spec = spec.exchange(exchange);
        }
        spec
    }
}
