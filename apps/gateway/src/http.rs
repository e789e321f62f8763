//! The gateway's routes on the node's HTTP endpoint: the WebSocket (`path`, default
//! `/ws`) and the demo page (`GET /`).
//!
//! The upgrade is refused with 401 or 403 (before any socket exists) when the client has
//! no identity or its Origin is not allowed. Owns the HTTP side of a connection. Must not
//! touch what a connection does once open (`session`).

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use crate::gateway::Gateway;
use crate::identity::authenticate;
use crate::session;

/// Read and write buffer of one WebSocket, bytes.
const SOCKET_BUFFER: usize = 4 * 1024;

/// The demo page's path.
pub const PAGE: &str = "/";

/// The demo page: connect, subscribe, publish, write and wait, see what arrives.
const PAGE_HTML: &str = include_str!("page.html");

/// The WebSocket route at `gateway.config().path`.
pub fn socket_router(gateway: Gateway) -> Router {
    let path = gateway.config().path.clone();
    Router::new().route(&path, get(upgrade)).with_state(gateway)
}

/// The demo page's route.
pub fn page_router(gateway: Gateway) -> Router {
    Router::new().route(PAGE, get(page)).with_state(gateway)
}

async fn page(State(gateway): State<Gateway>) -> Html<String> {
    Html(PAGE_HTML.replace("{{PATH}}", &gateway.config().path))
}

async fn upgrade(
    State(gateway): State<Gateway>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let token = query.get("access_token").map(String::as_str);
    let id = match authenticate(gateway.config(), &headers, peer.ip(), token) {
        Ok(id) => id,
        Err(refusal) => {
            tracing::debug!(%peer, reason = refusal.reason, "gateway: connection refused");
            return (refusal.status, refusal.reason).into_response();
        }
    };
    // Up to twice the limit is read so that the session can close with 1009 and a reason;
    // anything larger ends the connection at once.
    let limit = gateway.config().max_frame_bytes.saturating_mul(2);
    // Small buffers (tungstenite's default is 128 KiB each way): an idle connection costs
    // little, and every frame is flushed as it is written anyway.
    upgrade
        .max_message_size(limit)
        .max_frame_size(limit)
        .read_buffer_size(SOCKET_BUFFER)
        .write_buffer_size(SOCKET_BUFFER)
        .on_upgrade(move |socket| session::run(gateway, socket, id))
}
