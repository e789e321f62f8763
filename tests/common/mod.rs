//! Helpers shared by the whole-system tests: configs built from broker URIs, unique node
//! names, and running blocking broker operations off the async runtime.

#![allow(dead_code)]

pub mod client;

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use warren_listeners::AppContext;
use warren_runtime::config::{AppConfig, Config};
use warren_runtime::node::Node;

/// A node name unique to this test process and call, so assertions on the shared broker's
/// connections never see another test's.
pub fn unique_node(label: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "wt-{label}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// config.ini text for a node with the given local brokers; `extra` is appended to [amqp].
pub fn config_text(node: &str, brokers: &[String], extra: &str) -> String {
    let list = brokers
        .iter()
        .map(|b| format!("\"{b}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[service]\nnode = \"{node}\"\nshutdown_timeout_secs = 10\n\n\
         [amqp]\nreconnect_min_ms = 50\nreconnect_max_ms = 500\nconnect_timeout_ms = 1000\n\
         startup_timeout_secs = 30\n{extra}\n\n[zones.local]\nbrokers = [{list}]\n"
    )
}

/// A parsed config for a node with the given local brokers and no apps.
pub fn config(node: &str, brokers: &[String], extra: &str) -> Config {
    let text = config_text(node, brokers, extra);
    match Config::parse(&text, Path::new("test.ini"), &[], None) {
        Ok(config) => config,
        Err(error) => panic!("test config is invalid: {error}\n{text}"),
    }
}

/// Runs a blocking operation (starting or killing a broker node) off the async workers.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(error) => panic!("blocking task failed: {error}"),
    }
}

/// Generous deadline for a broker-side change to become visible.
pub const SOON: Duration = Duration::from_secs(10);

/// Starts a node with no apps.
pub async fn start_node(config: Config) -> Node {
    match Node::start(config, |_| Vec::new()).await {
        Ok(node) => node,
        Err(error) => panic!("node did not start: {error}"),
    }
}

/// The context of a test app named `name` on `node`, for starting listeners by hand.
pub fn app_context(node: &Node, name: &str) -> AppContext {
    let context = node.context().clone();
    let pool = context.config.pool;
    AppContext {
        node: context,
        config: AppConfig {
            name: name.to_string(),
            enabled: true,
            pool,
        },
        version: "0.0.0-test".to_string(),
    }
}
