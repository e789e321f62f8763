//! The status document of a node: what `/status` serves and what a node answers to
//! `warren status --node`. The node, whether it is live and ready, each broker with
//! both of its connections, each AMQP 1.0 intermediary, and each part (listener, pool worker, router) with its
//! readiness.
//!
//! Owns the shape of the document. Must not touch what it reports (the registry and
//! readiness own that).

use futures::FutureExt;
use futures::future::BoxFuture;
use ractor::ActorRef;
use serde_json::{Value, json};

use crate::supervisor::{self, SupervisorMsg};

use crate::metrics::Metrics;
use crate::readiness::{PartState, Readiness};
use crate::registry::ConnectionRegistry;

/// The document; `not_ready` is why the node is not ready (`None`: it is). The parts
/// that describe themselves to `metrics` (listeners, pools, the router) are listed under
/// their kind.
pub fn document(
    node: &str,
    registry: &ConnectionRegistry,
    readiness: &Readiness,
    metrics: &Metrics,
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
                "id": broker.id.0,
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
    let intermediaries: Vec<Value> = registry
        .intermediaries()
        .into_iter()
        .map(|entry| {
            json!({
                "index": entry.index,
                "broker": entry.uri.redacted().to_string(),
                "up": entry.up,
                "generation": entry.generation,
                "failed_attempts": entry.failed_attempts,
                "last_error": entry.last_error,
            })
        })
        .collect();
    let mut document = json!({
        "node": node,
        "live": live,
        "ready": not_ready.is_none(),
        "not_ready": not_ready,
        "brokers": brokers,
        "amqp10_brokers": intermediaries,
        "parts": parts,
    });
    for (kind, described) in metrics.describe() {
        document[kind] = Value::Array(described);
    }
    document
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

/// How deep the tree is walked (the node's tree is four or five levels).
const MAX_DEPTH: usize = 8;

/// The supervision tree under `root` (named `name`): each supervisor with its children,
/// each child running or restarting and how often it was restarted (in all, and inside the
/// restart intensity's window: `recent_restarts`). A supervisor that
/// does not answer within the supervisor call timeout is marked so.
pub async fn tree(name: &str, root: &ActorRef<SupervisorMsg>) -> Value {
    walk(name.to_string(), root.clone(), "running", (0, 0), 0).await
}

fn walk(
    name: String,
    supervisor: ActorRef<SupervisorMsg>,
    state: &'static str,
    (restarts, recent_restarts): (u32, u32),
    depth: usize,
) -> BoxFuture<'static, Value> {
    async move {
        let children = match supervisor::children(&supervisor).await {
            Ok(children) => children,
            Err(error) => {
                return json!({
                    "name": name,
                    "state": "not answering",
                    "restarts": restarts,
                    "recent_restarts": recent_restarts,
                    "error": error.to_string(),
                });
            }
        };
        let mut described = Vec::with_capacity(children.len());
        for child in children {
            let state = if child.cell.is_some() {
                "running"
            } else {
                "restarting"
            };
            let nested = child
                .cell
                .filter(|cell| cell.is_message_type_of::<SupervisorMsg>() == Some(true))
                .filter(|_| depth < MAX_DEPTH);
            let restarts = (child.restarts, child.recent_restarts);
            described.push(match nested {
                Some(cell) => walk(child.id, cell.into(), state, restarts, depth + 1).await,
                None => json!({
                    "name": child.id,
                    "state": state,
                    "restarts": child.restarts,
                    "recent_restarts": child.recent_restarts,
                }),
            });
        }
        json!({
            "name": name,
            "state": state,
            "restarts": restarts,
            "recent_restarts": recent_restarts,
            "children": described,
        })
    }
    .boxed()
}
