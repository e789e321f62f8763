//! The running gateway: what every connection shares (the app's context, its config, the
//! connections of this node by identity).
//!
//! Owns the table of connections and the rule "one connection per identity per node: the
//! newest takes over". Must not touch the broker (`inbound`, `mailbox`, `distributor`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::oneshot;
use warren_listeners::prelude::*;

/// The gateway of one node, shared by its HTTP routes and connections.
///
/// It exists so that a route handler reaches the app's pool, publisher and config, and so
/// that a second connection of an identity closes the first.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    ctx: AppContext,
    config: GatewayConfig,
    publisher: Publisher,
    next: AtomicU64,
    /// Warnings that can repeat once per connection.
    log_limit: LogLimit,
    /// Identity → (connection number, how to tell that connection it was replaced).
    connections: Mutex<HashMap<String, (u64, oneshot::Sender<()>)>>,
}

impl Gateway {
    /// The gateway of an app context (its `[apps.gateway]` section).
    pub fn new(ctx: &AppContext) -> Gateway {
        Gateway::with_config(ctx, ctx.config.gateway.clone())
    }

    /// The gateway with an explicit config (tests).
    pub fn with_config(ctx: &AppContext, config: GatewayConfig) -> Gateway {
        Gateway {
            inner: Arc::new(Inner {
                publisher: ctx.node.publisher.with_stamp(ctx.stamp()),
                ctx: ctx.clone(),
                config,
                next: AtomicU64::new(1),
                log_limit: LogLimit::default(),
                connections: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.inner.config
    }

    pub fn ctx(&self) -> &AppContext {
        &self.inner.ctx
    }

    pub fn publisher(&self) -> &Publisher {
        &self.inner.publisher
    }

    /// Logs `what` as a warning unless the same `what` was logged within the last 10 s
    /// (then it is counted and the next line says how many were held back).
    pub fn warn_limited(&self, what: &'static str, error: &dyn std::fmt::Display) {
        if let Some(held_back) = self.inner.log_limit.allow(what) {
            tracing::warn!(%error, held_back, "gateway: {what}");
        }
    }

    /// Connections open on this node.
    pub fn connections(&self) -> usize {
        self.inner.connections.lock().len()
    }

    /// Registers a connection of `id`: its number and a receiver that fires when a newer
    /// connection of the same identity takes over (the older one is told at once).
    pub fn register(&self, id: &str) -> (u64, oneshot::Receiver<()>) {
        let number = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let (replace, replaced) = oneshot::channel();
        let older = self
            .inner
            .connections
            .lock()
            .insert(id.to_string(), (number, replace));
        if let Some((_, older)) = older {
            let _ = older.send(());
        }
        (number, replaced)
    }

    /// Forgets connection `number` of `id` (not a newer one that took over).
    pub fn unregister(&self, id: &str, number: u64) {
        let mut connections = self.inner.connections.lock();
        if connections.get(id).is_some_and(|(n, _)| *n == number) {
            connections.remove(id);
        }
    }
}
