//! Helpers shared by the whole-system tests: configs built from broker URIs, unique node
//! names, and running blocking broker operations off the async runtime.

#![allow(dead_code)]

pub mod client;
pub mod python;
pub mod rpc;
pub mod service;

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

/// Logs of the code under test, shown for failing tests (level from RUST_LOG, default
/// warn).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,lapin=error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Starts a node with no apps.
pub async fn start_node(config: Config) -> Node {
    init_logs();
    match Node::start(config, |_| Vec::new()).await {
        Ok(node) => node,
        Err(error) => panic!("node did not start: {error}"),
    }
}

/// The context of a test app named `name` on `node`, for starting listeners by hand.
pub fn app_context(node: &Node, name: &str) -> AppContext {
    let context = node.context().clone();
    let pool = context.pool;
    AppContext::with_version("0.0.0-test", context, AppConfig::new(name, pool))
}

/// A private broker node shared by a test's tasks; its blocking operations run off the
/// async workers.
#[derive(Clone)]
pub struct Broker(std::sync::Arc<std::sync::Mutex<warren_test_support::BrokerNode>>);

impl Broker {
    /// Starts `n` nodes in parallel.
    pub async fn start_many(n: usize) -> Vec<Broker> {
        let starts = (0..n).map(|_| {
            blocking(|| warren_test_support::BrokerNode::start().expect("broker node starts"))
        });
        futures::future::join_all(starts)
            .await
            .into_iter()
            .map(|node| Broker(std::sync::Arc::new(std::sync::Mutex::new(node))))
            .collect()
    }

    /// A broker around a node started some other way (with plugins, say).
    pub fn from_node(node: warren_test_support::BrokerNode) -> Broker {
        Broker(std::sync::Arc::new(std::sync::Mutex::new(node)))
    }

    /// The node's AMQP port (AMQP 1.0 too, with its plugin).
    pub fn port(&self) -> u16 {
        self.node().amqp_port()
    }

    fn node(&self) -> std::sync::MutexGuard<'_, warren_test_support::BrokerNode> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn uri(&self) -> String {
        self.node().uri()
    }

    /// The node's own log file.
    pub fn node_log(&self) -> std::path::PathBuf {
        self.node().node_log()
    }

    /// SIGKILL; returns once the port refuses connections.
    pub async fn kill(&self) {
        let this = self.clone();
        blocking(move || this.node().kill().expect("kill")).await;
    }

    /// Forces the broker's metadata (Mnesia's log) to disk: a durable declaration made a
    /// moment before a SIGKILL can otherwise be gone after the restart (see
    /// `BrokerNode::sync_metadata`).
    pub async fn sync_metadata(&self) {
        let this = self.clone();
        blocking(move || this.node().sync_metadata().expect("metadata synced")).await;
    }

    /// Starts again on the same port and data; returns once it has booted (it accepts
    /// AMQP somewhat earlier: see `restart_timed`).
    pub async fn restart(&self) {
        let this = self.clone();
        blocking(move || this.node().restart().expect("restart")).await;
    }

    /// Starts again and returns when the port first accepted AMQP (after waiting for the
    /// boot to finish): the moment clients can see the broker again.
    pub async fn restart_timed(&self) -> std::time::Instant {
        let this = self.clone();
        let port = blocking(move || {
            let mut node = this.node();
            node.start_again_in_background().expect("start again");
            node.amqp_port()
        })
        .await;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let accepted = blocking(move || {
            while std::time::Instant::now() < deadline {
                if speaks_amqp(port) {
                    return std::time::Instant::now();
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!("the restarted broker did not accept AMQP within 60 s");
        })
        .await;
        let this = self.clone();
        blocking(move || {
            this.node()
                .wait_ready(Duration::from_secs(60))
                .expect("booted")
        })
        .await;
        accepted
    }

    /// SIGSTOP: the broker hangs with its sockets open.
    pub async fn freeze(&self) {
        let this = self.clone();
        blocking(move || this.node().freeze().expect("freeze")).await;
    }

    /// SIGCONT after `freeze`.
    pub async fn thaw(&self) {
        let this = self.clone();
        blocking(move || this.node().thaw().expect("thaw")).await;
    }

    /// `rabbitmqctl -n <node> <args>`.
    pub async fn ctl(&self, args: &[&str]) -> String {
        let this = self.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            this.node().ctl(&args).unwrap_or_default()
        })
        .await
    }

    /// `rabbitmq-upgrade -n <node> <args>` (`drain`: maintenance mode, client connections
    /// closed and refused while queues stay; `revive`: back in service).
    pub async fn upgrade(&self, args: &[&str]) -> String {
        let this = self.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            match this.node().tool("rabbitmq-upgrade", &args) {
                Ok(out) => out,
                Err(error) => panic!("rabbitmq-upgrade {args:?}: {error}"),
            }
        })
        .await
    }

    /// Channels of the connections whose client name contains `name`.
    pub async fn channels(&self, name: &str) -> u32 {
        let this = self.clone();
        let name = name.to_string();
        blocking(move || {
            let node = this.node();
            warren_test_support::channel_count(|a| node.ctl(a), &name).unwrap_or(u32::MAX)
        })
        .await
    }
}

/// Whether something on `port` answers the AMQP 0-9-1 header with a method frame.
fn speaks_amqp(port: u16) -> bool {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let timeout = Duration::from_millis(200);
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let mut first = [0u8; 1];
    stream.set_read_timeout(Some(timeout)).is_ok()
        && stream.write_all(b"AMQP\x00\x00\x09\x01").is_ok()
        && stream.read_exact(&mut first).is_ok()
        && first[0] == 1
}

/// Which messages a test listener handled, how often, and when first.
#[derive(Clone, Default)]
pub struct Seen(
    std::sync::Arc<
        parking_lot::Mutex<std::collections::HashMap<String, (u32, std::time::Instant)>>,
    >,
);

impl Seen {
    pub fn record(&self, id: &str) {
        let mut seen = self.0.lock();
        seen.entry(id.to_string())
            .or_insert((0, std::time::Instant::now()))
            .0 += 1;
    }

    /// Distinct messages handled.
    pub fn distinct(&self) -> usize {
        self.0.lock().len()
    }

    pub fn first_seen(&self, id: &str) -> Option<std::time::Instant> {
        self.0.lock().get(id).map(|(_, at)| *at)
    }

    /// Handlings beyond the first, over all messages.
    pub fn duplicates(&self) -> u32 {
        self.0.lock().values().map(|(n, _)| n - 1).sum()
    }

    /// Handlings, over all messages.
    pub fn runs(&self) -> u32 {
        self.0.lock().values().map(|(n, _)| n).sum()
    }
}

/// A listener that is just its spec.
pub struct SpecListener(pub warren_listeners::ListenerSpec);

impl warren_listeners::Listener for SpecListener {
    fn spec(&self) -> warren_listeners::ListenerSpec {
        self.0.clone()
    }
}

/// A responder that records each event's Msg-ID in `seen`, after an optional pause.
pub fn recording(
    seen: &Seen,
    pause: Duration,
) -> impl Fn(
    warren_listeners::Event,
) -> futures::future::BoxFuture<'static, warren_listeners::HandlerResult>
+ Send
+ Sync
+ 'static {
    let seen = seen.clone();
    move |event| {
        let seen = seen.clone();
        Box::pin(async move {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            seen.record(event.envelope().msg_id().unwrap_or(""));
            Ok(())
        })
    }
}

/// Waits until the async condition holds or `timeout` passes; whether it held.
pub async fn until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Ends the test process if it is still running after a bound: for tests whose failure
/// mode is a deadlock that blocks the async runtime's threads (no timer would fire).
pub struct Watchdog(Option<std::sync::mpsc::Sender<()>>);

impl Watchdog {
    pub fn new(name: &'static str, bound: Duration) -> Watchdog {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(bound) {
                eprintln!(
                    "{name}: still running after {bound:?} (deadlocked?); aborting the test process"
                );
                std::process::exit(101);
            }
        });
        Watchdog(Some(tx))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}
