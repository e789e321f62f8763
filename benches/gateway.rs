//! `cargo bench --bench gateway`: apps/gateway with apps/tickets on one node against the
//! local RabbitMQ, driven by 1,000 WebSocket clients in the same process.
//!
//! - round trips: each client publishes tickets to itself, one after the other (socket →
//!   `IN_TICKETS` → back-end → `OUT_TICKETS` → distributor → the client's queue → socket):
//!   p50 / p99 latency and messages per second over all clients;
//! - broadcast fan-out: broadcasts to the 1,000 subscribed sockets, deliveries per second
//!   until every socket got every broadcast;
//! - memory per idle connection: first 1,000 clients in a child process (this bench's own
//!   binary, run with `WARREN_BENCH_GATEWAY_CLIENTS` = the gateway's address) connect and
//!   subscribe; the server's figure is this process's resident set after they did minus
//!   before, divided by their number (the server alone: the clients' memory is the
//!   child's, reported beside it). The round trips and the fan-out then use 1,000 other
//!   clients in this process.
//!
//! No lapin baseline: nothing in lapin does what the gateway does. The last line is one
//! JSON object. Queues and exchanges are this run's own (deleted or expiring after).

mod common;

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async_with_config};
use warren_app_gateway::GatewayApp;
use warren_app_tickets::Tickets;
use warren_listeners::{AppContext, app_child};
use warren_runtime::node::Node;

const CLIENTS: usize = 1000;
const TRIPS: usize = 5;
const BROADCASTS: usize = 10;
const SECRET: &str = "bench-secret";
/// Bound for any one frame.
const FRAME: Duration = Duration::from_secs(60);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Set in the child process that holds the idle clients of the server-only memory figure:
/// the gateway's address.
const CLIENTS_ONLY: &str = "WARREN_BENCH_GATEWAY_CLIENTS";

#[tokio::main]
async fn main() {
    if let Ok(address) = std::env::var(CLIENTS_ONLY) {
        return clients_only(&address).await;
    }
    let prefix = format!("warren-bench-gw-{}", std::process::id());
    let node = start(&prefix).await;
    let address = node.http_address().expect("HTTP serves");
    let (server_share, clients_share) = server_memory(address).await;
    eprintln!(
        "{CLIENTS} idle clients in a child process: the server's resident set grew {server_share:.1} KiB per connection (the clients' process: {clients_share:.1} KiB per connection)"
    );
    let sockets = connect_all(address, "c").await;

    // Round trips, every client at once, each one after the other.
    let started = Instant::now();
    let trips = sockets.into_iter().enumerate().map(|(i, socket)| {
        tokio::spawn(async move {
            let mut socket = socket;
            let mut latencies = Vec::with_capacity(TRIPS);
            for k in 0..TRIPS {
                let sent = Instant::now();
                send(
                    &mut socket,
                    json!({"packet_action": "publish", "channel": {"tickets": true},
                                        "message": {"to": format!("c{i}"), "k": k}}),
                )
                .await;
                loop {
                    let f = frame(&mut socket).await;
                    if f["message"]["body"]["k"] == k {
                        latencies.push(sent.elapsed());
                        break;
                    }
                }
            }
            (socket, latencies)
        })
    });
    let mut latencies = Vec::new();
    let mut sockets = Vec::with_capacity(CLIENTS);
    for joined in futures::future::join_all(trips).await {
        let (socket, mine) = joined.expect("a client task");
        sockets.push(socket);
        latencies.extend(mine);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    let (p50, p99) = (p(0.50), p(0.99));
    let round_trips = common::rate(latencies.len(), elapsed);
    eprintln!(
        "round trips: {} in {elapsed:?}: {round_trips:.0} messages/s, p50 {p50:?}, p99 {p99:?}",
        latencies.len()
    );

    // Broadcast fan-out: one client broadcasts, every socket counts its broadcasts.
    let mut sender = sockets.pop().expect("a client");
    let receivers: Vec<_> = sockets
        .into_iter()
        .map(|mut socket| {
            tokio::spawn(async move {
                let mut got = 0;
                while got < BROADCASTS {
                    if frame(&mut socket).await["distribution"]["broadcast"] == true {
                        got += 1;
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    for b in 0..BROADCASTS {
        send(
            &mut sender,
            json!({"packet_action": "publish", "channel": {"tickets": true},
                                 "message": {"b": b}}),
        )
        .await;
    }
    for receiver in futures::future::join_all(receivers).await {
        receiver.expect("a receiver");
    }
    let elapsed = started.elapsed();
    let deliveries = common::rate((CLIENTS - 1) * BROADCASTS, elapsed);
    eprintln!(
        "broadcast: {BROADCASTS} x {} sockets in {elapsed:?}: {deliveries:.0} deliveries/s",
        CLIENTS - 1
    );
    let _ = node.stop().await;
    clean_up(&prefix).await;
    println!(
        "{}",
        json!({"bench": "gateway", "clients": CLIENTS, "round_trips_per_s": round_trips.round(),
               "p50_ms": p50.as_secs_f64() * 1000.0, "p99_ms": p99.as_secs_f64() * 1000.0,
               "broadcast_deliveries_per_s": deliveries.round(),
               "kib_per_idle_connection": (server_share * 10.0).round() / 10.0,
               "kib_per_idle_connection_clients": (clients_share * 10.0).round() / 10.0})
    );
}

/// A node running the gateway and the tickets back-end with names of `prefix`.
async fn start(prefix: &str) -> Node {
    let text = format!(
        "[service]\nnode = \"{prefix}\"\n[amqp]\nprefetch = 50\n[http]\nlisten = \"127.0.0.1:0\"\n\
         [zones.local]\nbrokers = [\"{}\"]\n\n[apps.gateway]\nin_exchange = \"{prefix}.in\"\n\
         out_exchange = \"{prefix}.out\"\nclient_exchange = \"{prefix}.clients\"\n\
         queue_prefix = \"{prefix}.\"\njwt_secret = \"{SECRET}\"\nclient_queue_expiry_ms = 60000\n\
         max_frames_per_sec = 1000\n\n[apps.tickets]\n",
        common::broker_uri()
    );
    let config = warren_runtime::config::Config::parse(
        &text,
        std::path::Path::new("bench.ini"),
        &["gateway", "tickets"],
        None,
    )
    .expect("bench config");
    let gateway_config = config.app("gateway").expect("section").clone();
    let tickets_config = config.app("tickets").expect("section").clone();
    let names = gateway_config.gateway.clone();
    let node = Node::try_start(config, move |node| {
        let gateway = GatewayApp::default();
        let tickets = Tickets { config: names };
        let ctx = AppContext::new(&gateway, node.clone(), gateway_config);
        let mut children = vec![app_child(&gateway, ctx)?];
        let ctx = AppContext::new(&tickets, node.clone(), tickets_config);
        children.push(app_child(&tickets, ctx)?);
        Ok::<_, warren_listeners::AppError>(children)
    })
    .await
    .expect("node starts");
    let url = format!("http://{}/health/ready", node.http_address().expect("HTTP"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if reqwest::get(&url)
            .await
            .is_ok_and(|r| r.status().as_u16() == 200)
        {
            return node;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the node was not ready within 30 s");
}

/// `CLIENTS` clients `<identity><i>`, connected and subscribed (50 at a time).
async fn connect_all(address: std::net::SocketAddr, identity: &str) -> Vec<Socket> {
    let mut sockets = Vec::with_capacity(CLIENTS);
    for batch in 0..CLIENTS.div_ceil(50) {
        let connecting = (batch * 50..(batch * 50 + 50).min(CLIENTS))
            .map(|i| client(address, format!("{identity}{i}")));
        sockets.extend(futures::future::join_all(connecting).await);
    }
    sockets
}

/// The server's and the clients' resident set per idle connection (KiB), with the clients
/// in a child process: what the server's own process grew by while they connected and
/// subscribed, and what the child grew by.
async fn server_memory(address: std::net::SocketAddr) -> (f64, f64) {
    use tokio::io::AsyncBufReadExt;
    let exe = std::env::current_exe().expect("the bench's own binary");
    let before = rss_kib();
    let mut child = tokio::process::Command::new(exe)
        .env(CLIENTS_ONLY, address.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the clients' process starts");
    let stdout = child.stdout.take().expect("its stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
        .await
        .expect("the clients connect within 120 s")
        .expect("the clients' process reports")
        .expect("a line");
    let after = rss_kib();
    let clients: f64 = line
        .strip_prefix("connected ")
        .and_then(|kib| kib.parse().ok())
        .expect("`connected <KiB per client>`");
    // Closing its stdin ends the child (its sockets close).
    drop(child.stdin.take());
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    (
        after.saturating_sub(before) as f64 / CLIENTS as f64,
        clients,
    )
}

/// The child process of [`server_memory`]: connects `CLIENTS` clients (`m<i>`), prints
/// `connected <its resident set growth per client, KiB>` and holds them until its stdin
/// closes (or 300 s).
async fn clients_only(address: &str) {
    let address: std::net::SocketAddr = address.parse().expect("the gateway's address");
    let before = rss_kib();
    let sockets = connect_all(address, "m").await;
    let per_client = rss_kib().saturating_sub(before) as f64 / CLIENTS as f64;
    println!("connected {per_client:.1}");
    let closed = tokio::task::spawn_blocking(|| {
        use std::io::Read;
        let mut rest = Vec::new();
        std::io::stdin().read_to_end(&mut rest)
    });
    let _ = tokio::time::timeout(Duration::from_secs(300), closed).await;
    drop(sockets);
}

/// Client `identity`, connected and subscribed to tickets.
async fn client(address: std::net::SocketAddr, identity: String) -> Socket {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 3600;
    let token = encode(
        &Header::default(),
        &json!({"sub": identity, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("a token");
    // The clients' buffers as small as the gateway's, so that they weigh little in the
    // memory figure.
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(8 * 1024);
    let url = format!("ws://{address}/ws?access_token={token}");
    let (mut socket, _) = connect_async_with_config(url, Some(config), false)
        .await
        .expect("a client connects");
    send(
        &mut socket,
        json!({"packet_action": "consume", "channel": {"tickets": true}}),
    )
    .await;
    assert!(
        frame(&mut socket).await.get("subscribed").is_some(),
        "subscribed"
    );
    socket
}

async fn send(socket: &mut Socket, frame: Value) {
    socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .expect("the frame is sent");
}

/// The next text frame (bounded).
async fn frame(socket: &mut Socket) -> Value {
    loop {
        match tokio::time::timeout(FRAME, socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                return serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a frame, got {other:?}"),
        }
    }
}

/// The process's resident set, KiB (Linux).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Deletes the run's shared queues and exchanges (the 1,000 client queues expire).
async fn clean_up(prefix: &str) {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let (_connection, channel) = common::setup_channel("bench-gateway/clean-up").await;
    for feed in ["VOICE", "CHAT", "TICKETS"] {
        for queue in [
            format!("{prefix}.IN_{feed}"),
            format!("{prefix}.OUT_{feed}"),
            // The back-end's write-and-wait queue (an RPC target group, durable).
            format!("{prefix}.in/unicast.IN_{feed}"),
        ] {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    let broadcasts = ["VOICE", "CHAT", "TICKETS"].map(|feed| format!("in/broadcast/IN_{feed}"));
    for exchange in ["in", "out", "clients"]
        .into_iter()
        .chain(broadcasts.iter().map(String::as_str))
    {
        let name = format!("{prefix}.{exchange}");
        let _ = channel
            .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}
