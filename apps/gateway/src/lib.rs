//! gateway: the WebSocket ↔ AMQP services aggregator of issue #17. Browser or app clients
//! hold one WebSocket each; the gateway translates their JSON frames into messages on
//! `IN_<FEED>` queues and hands back-end messages from `OUT_<FEED>` queues to the clients
//! their `distribution` names. Back-ends only consume and publish, knowing nothing of
//! sockets (see `apps/tickets`).
//!
//! Files: `feed` (voice, chat, tickets and their names on the broker), `frame` (the
//! protocol), `identity` (tokens, trusted proxy header, Origin), `limits` (per-connection
//! limits, close codes), `gateway` (the shared state), `session` (one connection),
//! `inbound` (publish, write and wait), `mailbox` (a client's own queue), `distributor`
//! (`OUT_<FEED>` to client queues), `http` (the routes), `page.html` (the demo page).
//! Owns the app; must not touch the runtime (it imports `warren_listeners::prelude` only).

mod distributor;
mod feed;
mod frame;
mod gateway;
mod http;
mod identity;
mod inbound;
mod limits;
mod mailbox;
mod session;

use std::sync::{Arc, OnceLock};

use warren_listeners::prelude::*;

pub use distributor::{CATEGORY, DELIVER, Distributor, OUT};
pub use feed::{Feed, client_key, client_queue};
pub use frame::{ClientFrame, Distribution, FrameError};
pub use gateway::Gateway;
pub use inbound::{IN, REQUEST};
pub use limits::CloseCode;

/// The gateway app (`[apps.gateway]`).
///
/// It exists to run the gateway under the node: its distributors supervised, its
/// WebSocket and demo page on the node's HTTP endpoint. [`GatewayApp::gateway`] hands the
/// running gateway to tests and embedding code.
#[derive(Default)]
pub struct GatewayApp {
    gateway: Arc<OnceLock<Gateway>>,
}

impl GatewayApp {
    /// The gateway, once the node built the app.
    pub fn gateway(&self) -> Option<Gateway> {
        self.gateway.get().cloned()
    }
}

impl App for GatewayApp {
    fn name(&self) -> &'static str {
        "gateway"
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn children(&self, ctx: &AppContext) -> Vec<ChildSpec> {
        let gateway = self.gateway.get_or_init(|| Gateway::new(ctx)).clone();
        let config = gateway.config().clone();
        if let Err(error) = ctx
            .node
            .http
            .mount(&config.path, http::socket_router(gateway.clone()))
        {
            tracing::warn!(%error, "gateway: the WebSocket route is not served");
        }
        if let Err(error) = ctx.node.http.mount(http::PAGE, http::page_router(gateway)) {
            tracing::warn!(%error, "gateway: the demo page is not served");
        }
        Feed::ALL
            .into_iter()
            .map(|feed| {
                ctx.listener(Distributor {
                    feed,
                    config: config.clone(),
                })
            })
            .collect()
    }
}
