//! The status document of a node: what `/status` serves and what a node answers to
//! `warren status --node`. The node, whether it is live and ready, each broker with
//! both of its connections, and each part (listener, pool worker, router) with its
//! readiness.
//!
//! Owns the shape of the document. Must not touch what it reports (the registry and
//! readiness own that).

use serde_json::{Value, json};

use crate::readiness::{PartState, Readiness};
use crate::registry::ConnectionRegistry;

/// The document; `not_ready` is why the node is not ready (`None`: it is).
pub fn document(
    node: &str,
    registry: &ConnectionRegistry,
    readiness: &Readiness,
    live: bool,
    not_ready: Option<String>,
) -> Value {
    let primary = registry.primary().map(|b| b.id);
    let brokers: Vec<Value> = registry
        .brokers()
        .iter()
        .map(|broker| {
            let status = registry.status(broker.id);
            json!({
                "broker": broker.uri.redacted().to_string(),
                "zone": broker.zone,
                "local": broker.local,
                "primary": primary == Some(broker.id),
                "consume": status.as_ref().map(|s| json!({
                    "up": s.available,
                    "generation": s.generation,
                    "blocked": s.consume_blocked,
                    "failed_attempts": s.failed_attempts,
                })),
                "publish": status.as_ref().map(|s| json!({
                    "up": s.publish_available,
                    "generation": s.publish_generation,
                    "blocked": s.publish_blocked,
                    "failed_attempts": s.publish_failed_attempts,
                })),
                "last_error": status.and_then(|s| s.last_error),
            })
        })
        .collect();
    let parts: Vec<Value> = readiness
        .parts()
        .into_iter()
        .map(|(name, state)| {
            let (state, reason) = match state {
                PartState::Starting => ("starting", None),
                PartState::Ready => ("ready", None),
                PartState::NotReady(reason) => ("not ready", Some(reason)),
            };
            json!({"name": name, "state": state, "reason": reason})
        })
        .collect();
    json!({
        "node": node,
        "live": live,
        "ready": not_ready.is_none(),
        "not_ready": not_ready,
        "brokers": brokers,
        "parts": parts,
    })
}

/// Why the node is not ready: no local broker, or parts not consuming; `None` when ready.
pub fn not_ready(registry: &ConnectionRegistry, readiness: &Readiness) -> Option<String> {
    if registry.primary().is_none() {
        return Some(format!(
            "no broker of the local zone `{}` is up",
            registry.local_zone()
        ));
    }
    if !readiness.is_ready() {
        return Some(format!(
            "not consuming yet: {}",
            readiness.describe_pending()
        ));
    }
    None
}
