//! apps/gateway (with its sample back-end apps/tickets) against real RabbitMQ: the frame
//! protocol and its error frames, broadcast / multicast / direct, write and wait, tokens,
//! Origin and limits with their close codes, a client's queue outliving its socket and
//! read from another gateway node, in order.
//!
//! Each test has exchanges and queues of its own (a unique prefix), deleted at the end.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{config_text, init_logs, unique_node};
use futures::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use warren_app_gateway::GatewayApp;
use warren_app_tickets::Tickets;
use warren_listeners::prelude::GatewayConfig;
use warren_listeners::{AppContext, app_child};
use warren_runtime::config::Config;
use warren_runtime::node::Node;
use warren_test_support::local_uri;

const SECRET: &str = "gateway-test-secret";
/// Bound for any one frame the tests expect.
const FRAME: Duration = Duration::from_secs(10);

/// A node running the gateway (and the tickets back-end when `tickets`) with names of
/// prefix `prefix`; `extra` goes into `[apps.gateway]`.
async fn start(prefix: &str, extra: &str, tickets: bool) -> (Node, GatewayConfig) {
    start_on(
        &[local_uri()],
        prefix,
        extra,
        Apps {
            gateway: true,
            tickets,
        },
    )
    .await
}

/// Which apps a test node runs.
#[derive(Clone, Copy)]
struct Apps {
    gateway: bool,
    tickets: bool,
}

/// A node on `brokers` running `apps` with names of prefix `prefix`.
async fn start_on(
    brokers: &[String],
    prefix: &str,
    extra: &str,
    apps: Apps,
) -> (Node, GatewayConfig) {
    init_logs();
    let name = unique_node("gateway");
    let text = format!(
        "{}\n[http]\nlisten = \"127.0.0.1:0\"\n\n[apps.gateway]\nenabled = {}\n\
         in_exchange = \"{prefix}.in\"\nout_exchange = \"{prefix}.out\"\n\
         client_exchange = \"{prefix}.clients\"\nqueue_prefix = \"{prefix}.\"\n\
         jwt_secret = \"{SECRET}\"\nclient_queue_expiry_ms = 60000\n{extra}\n\
         \n[apps.tickets]\nenabled = {}\n",
        config_text(&name, brokers, ""),
        apps.gateway,
        apps.tickets,
    );
    let config = match Config::parse(&text, Path::new("test.ini"), &["gateway", "tickets"], None) {
        Ok(config) => config,
        Err(error) => panic!("test config is invalid: {error}\n{text}"),
    };
    let gateway_config = config.app("gateway").expect("gateway section").clone();
    let tickets_config = config.app("tickets").expect("tickets section").clone();
    let names = gateway_config.gateway.clone();
    let for_tickets = names.clone();
    let node = Node::try_start(config, move |node| {
        let mut children = Vec::new();
        if apps.gateway {
            let gateway = GatewayApp::default();
            let ctx = AppContext::new(&gateway, node.clone(), gateway_config);
            children.push(app_child(&gateway, ctx)?);
        }
        if apps.tickets {
            let tickets = Tickets {
                config: for_tickets,
            };
            let ctx = AppContext::new(&tickets, node.clone(), tickets_config);
            children.push(app_child(&tickets, ctx)?);
        }
        Ok::<_, warren_listeners::AppError>(children)
    })
    .await
    .unwrap_or_else(|error| panic!("node did not start: {error}"));
    wait_ready(&node).await;
    (node, names)
}

/// Waits (bounded) until the node's `/health/ready` says 200: every listener consumes.
async fn wait_ready(node: &Node) {
    let url = format!(
        "http://{}/health/ready",
        node.http_address().expect("HTTP serves")
    );
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        if let Ok(response) = client.get(&url).send().await
            && response.status().as_u16() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the node was not ready within 30 s");
}

/// A token for `sub`, valid for a minute.
fn token(sub: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = json!({"sub": sub, "exp": now + 60});
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("a token")
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The WebSocket URL of `node`'s gateway.
fn ws_url(node: &Node, query: &str) -> String {
    format!(
        "ws://{}/ws{query}",
        node.http_address().expect("HTTP serves")
    )
}

/// A client connected as `id`.
async fn connect(node: &Node, id: &str) -> Socket {
    let url = ws_url(node, &format!("?access_token={}", token(id)));
    match connect_async(url).await {
        Ok((socket, _)) => socket,
        Err(error) => panic!("{id} could not connect: {error}"),
    }
}

/// The HTTP status of an upgrade refused before any socket (or 101 when accepted).
async fn refused_status(
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
) -> u16 {
    match connect_async(request).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(error) => panic!("unexpected: {error}"),
    }
}

async fn send(socket: &mut Socket, frame: Value) {
    socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .expect("the frame is sent");
}

/// What the next frame was.
#[derive(Debug)]
enum Next {
    Frame(Value),
    Closed(Option<u16>),
    Nothing,
}

/// The next frame, a close, or nothing within `within`.
async fn next(socket: &mut Socket, within: Duration) -> Next {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => return Next::Nothing,
            Ok(None) | Ok(Some(Err(_))) => return Next::Closed(None),
            Ok(Some(Ok(Message::Text(text)))) => {
                return Next::Frame(serde_json::from_str(text.as_str()).unwrap_or(Value::Null));
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                return Next::Closed(frame.map(|f| u16::from(f.code)));
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// The next frame; fails the test on a close or silence.
async fn frame(socket: &mut Socket) -> Value {
    match next(socket, FRAME).await {
        Next::Frame(frame) => frame,
        other => panic!("expected a frame, got {other:?}"),
    }
}

/// The close code the connection ends with (frames before it are skipped, at most 100).
async fn close_code(socket: &mut Socket) -> Option<u16> {
    for _ in 0..100 {
        match next(socket, FRAME).await {
            Next::Frame(_) => continue,
            Next::Closed(code) => return code,
            Next::Nothing => return None,
        }
    }
    None
}

async fn subscribe(socket: &mut Socket, feeds: Value) {
    send(
        socket,
        json!({"packet_action": "consume", "channel": feeds, "consume_target": []}),
    )
    .await;
    let answer = frame(socket).await;
    assert!(answer.get("subscribed").is_some(), "{answer}");
}

/// Deletes the test's exchanges and queues from the local broker.
async fn clean_up(names: &GatewayConfig, clients: &[&str]) {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let Ok(connection) =
        lapin::Connection::connect(&local_uri(), lapin::ConnectionProperties::default()).await
    else {
        return;
    };
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    let p = &names.queue_prefix;
    let mut queues: Vec<String> = ["VOICE", "CHAT", "TICKETS"]
        .iter()
        .flat_map(|f| [format!("{p}IN_{f}"), format!("{p}OUT_{f}")])
        .collect();
    queues.extend(clients.iter().map(|id| format!("{p}gateway.client.{id}")));
    // The back-end's write-and-wait queues (RPC target groups, durable): `<exchange>/unicast.<topic>`.
    queues.extend(
        ["VOICE", "CHAT", "TICKETS"]
            .iter()
            .map(|f| format!("{}/unicast.IN_{f}", names.in_exchange)),
    );
    for queue in queues {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    // The back-end's broadcast exchanges (RPC target fan-out): `<exchange>/broadcast/<topic>`.
    let broadcasts =
        ["VOICE", "CHAT", "TICKETS"].map(|f| format!("{}/broadcast/IN_{f}", names.in_exchange));
    for exchange in [
        &names.in_exchange,
        &names.out_exchange,
        &names.client_exchange,
    ]
    .into_iter()
    .chain(&broadcasts)
    {
        let _ = channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "done".into()).await;
}

fn prefix(label: &str) -> String {
    unique_node(&format!("gw-{label}"))
}

// ------------------------------------------------------------------------------ point 1

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_error_frames_naming_the_field_and_the_connection_stays_open() {
    let p = prefix("proto");
    let (node, names) = start(&p, "", true).await;
    let mut alice = connect(&node, "alice").await;
    let cases = [
        (json!("just a string"), "frame"),
        (json!({"channel": {"tickets": true}}), "packet_action"),
        (
            json!({"packet_action": "consume", "channel": {"video": true}}),
            "channel.video",
        ),
        (
            json!({"packet_action": "publish", "channel": {"tickets": true}}),
            "message",
        ),
        (
            json!({"packet_action": "publish", "channel": {"tickets": true}, "message": {},
                   "distribution": {"direct": ["a", "b"]}}),
            "distribution.direct",
        ),
        (
            json!({"packet_action": "publish", "channel": {"tickets": true}, "message": {},
                   "publish_target": "elsewhere"}),
            "publish_target",
        ),
    ];
    for (bad, field) in cases {
        send(&mut alice, bad.clone()).await;
        let answer = frame(&mut alice).await;
        assert_eq!(answer["error"]["field"], field, "{bad} → {answer}");
    }
    // Still open: a good frame works.
    subscribe(&mut alice, json!({"tickets": true})).await;
    let _ = node.stop().await;
    clean_up(&names, &["alice"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_reach_the_multicast_ids_and_broadcasts_only_the_subscribers() {
    let p = prefix("dist");
    let (node, names) = start(&p, "", true).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    let mut carol = connect(&node, "carol").await;
    subscribe(&mut alice, json!({"tickets": true})).await;
    subscribe(&mut bob, json!({"tickets": true})).await;
    // A ticket to bob: the back-end answers to [alice, bob] (multicast).
    send(
        &mut alice,
        json!({"packet_action": "publish", "channel": {"tickets": true},
               "publish_target": names.in_exchange, "message": {"to": "bob", "text": "printer"}}),
    )
    .await;
    let mut acked = false;
    let mut got_alice = None;
    for _ in 0..2 {
        let f = frame(&mut alice).await;
        if f.get("published").is_some() {
            acked = true;
        } else {
            got_alice = Some(f);
        }
    }
    assert!(acked, "alice's publish was confirmed");
    let got_alice = got_alice.expect("alice got the ticket");
    let got_bob = frame(&mut bob).await;
    for got in [&got_alice, &got_bob] {
        assert_eq!(got["channel"]["tickets"], true, "{got}");
        assert_eq!(got["message"]["from"], "alice", "{got}");
        assert_eq!(got["message"]["body"]["text"], "printer", "{got}");
    }
    assert_eq!(
        got_bob["distribution"]["multicast"],
        json!(["alice", "bob"])
    );
    // A ticket to nobody in particular: broadcast to every subscriber of tickets.
    send(
        &mut bob,
        json!({"packet_action": "publish", "channel": {"tickets": true}, "message": {"text": "all"}}),
    )
    .await;
    let broadcast = frame(&mut alice).await;
    assert_eq!(broadcast["distribution"]["broadcast"], true, "{broadcast}");
    assert_eq!(broadcast["message"]["body"]["text"], "all");
    // carol never subscribed: the next thing she gets is a ticket addressed to her, not
    // the broadcast.
    send(
        &mut bob,
        json!({"packet_action": "publish", "channel": {"tickets": true},
               "message": {"to": "carol", "text": "yours"}}),
    )
    .await;
    let first = frame(&mut carol).await;
    assert_eq!(first["message"]["body"]["text"], "yours", "{first}");
    let _ = node.stop().await;
    clean_up(&names, &["alice", "bob", "carol"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_without_a_back_end_is_an_error_frame_not_a_silent_loss() {
    let p = prefix("noback");
    let (node, names) = start(&p, "", true).await;
    let mut alice = connect(&node, "alice").await;
    send(
        &mut alice,
        json!({"packet_action": "publish", "channel": {"voice": true}, "message": {"x": 1}}),
    )
    .await;
    let answer = frame(&mut alice).await;
    assert_eq!(answer["error"]["field"], "channel", "{answer}");
    let _ = node.stop().await;
    clean_up(&names, &["alice"]).await;
}

// ------------------------------------------------------------------------------ point 2

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_and_wait_gets_exactly_one_reply_or_one_timeout_frame() {
    let p = prefix("rpc");
    let (node, names) = start(&p, "request_timeout_ms = 1000", true).await;
    // A back-end of `chat` that answers only when the test lets it, and says when it did.
    let (release, released) = tokio::sync::mpsc::channel::<()>(1);
    let released = std::sync::Arc::new(tokio::sync::Mutex::new(released));
    let (answered, mut answers) = tokio::sync::mpsc::channel::<()>(1);
    let slow = warren_listeners::RpcServer::new("IN_CHAT")
        .exchange(&names.in_exchange)
        .method("request", move |_args: Value| {
            let released = released.clone();
            let answered = answered.clone();
            async move {
                let _ = released.lock().await.recv().await;
                let _ = answered.send(()).await;
                Ok(json!({"late": true}))
            }
        });
    let ctx = common::app_context(&node, "slow");
    let handles = warren_listeners::spawn_rpc_server(slow, &ctx)
        .await
        .expect("the slow server starts");
    for handle in &handles {
        assert!(
            handle.wait_consuming(true, FRAME).await,
            "slow server consumes"
        );
    }
    let mut alice = connect(&node, "alice").await;
    for i in 0..5 {
        send(
            &mut alice,
            json!({"packet_action": "publish", "channel": {"tickets": true},
                   "request_id": format!("r-{i}"), "message": {"text": i}}),
        )
        .await;
    }
    let mut ids = Vec::new();
    for _ in 0..5 {
        let reply = frame(&mut alice).await;
        assert_eq!(reply["message"]["status"], "open", "{reply}");
        assert_eq!(
            reply["message"]["body"]["text"],
            reply["request_id"]
                .as_str()
                .and_then(|r| r.strip_prefix("r-"))
                .and_then(|n| n.parse::<u64>().ok())
                .map(Value::from)
                .unwrap_or(Value::Null),
            "{reply}"
        );
        ids.push(reply["request_id"].as_str().unwrap_or_default().to_string());
    }
    ids.sort();
    assert_eq!(ids, ["r-0", "r-1", "r-2", "r-3", "r-4"]);
    // The slow one: one timeout frame with its id ...
    send(
        &mut alice,
        json!({"packet_action": "publish", "channel": {"chat": true}, "request_id": "slow", "message": {}}),
    )
    .await;
    let timeout = frame(&mut alice).await;
    assert_eq!(timeout["request_id"], "slow", "{timeout}");
    assert_eq!(timeout["error"]["field"], "request_id", "{timeout}");
    assert!(
        timeout["error"]["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("timeout"),
        "{timeout}"
    );
    // ... and nothing more once the back-end answered late: the next frame is the answer
    // to the next frame sent.
    let _ = release.send(()).await;
    assert!(
        tokio::time::timeout(FRAME, answers.recv()).await.is_ok(),
        "the slow method answered"
    );
    subscribe(&mut alice, json!({"voice": true})).await;
    for handle in handles {
        let _ = handle.stop().await;
    }
    let _ = node.stop().await;
    clean_up(&names, &["alice"]).await;
}

// ------------------------------------------------------------------------------ point 4

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_identity_or_from_other_origins_are_refused() {
    let p = prefix("auth");
    let (node, names) = start(&p, "allowed_origins = [\"http://good.example\"]", false).await;
    let request = |query: String, origin: Option<&str>| {
        let mut request = ws_url(&node, &query)
            .into_client_request()
            .expect("a request");
        if let Some(origin) = origin
            && let Ok(value) = HeaderValue::from_str(origin)
        {
            request.headers_mut().insert("origin", value);
        }
        request
    };
    let good = format!("?access_token={}", token("alice"));
    assert_eq!(
        refused_status(request(String::new(), Some("http://good.example"))).await,
        401
    );
    assert_eq!(
        refused_status(request(
            "?access_token=forged.token.value".into(),
            Some("http://good.example")
        ))
        .await,
        401
    );
    assert_eq!(
        refused_status(request(good.clone(), Some("http://evil.example"))).await,
        403
    );
    assert_eq!(refused_status(request(good.clone(), None)).await, 403);
    assert_eq!(
        refused_status(request(good, Some("http://good.example"))).await,
        101
    );
    let _ = node.stop().await;
    clean_up(&names, &["alice"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_close_the_connection_with_their_codes() {
    let p = prefix("limits");
    let extra = "max_frame_bytes = 1024\nmax_frames_per_sec = 5\nmax_subscriptions = 2";
    let (node, names) = start(&p, extra, false).await;
    let mut big = connect(&node, "big").await;
    let padding = "x".repeat(1500);
    send(
        &mut big,
        json!({"packet_action": "consume", "channel": {"voice": true}, "pad": padding}),
    )
    .await;
    assert_eq!(close_code(&mut big).await, Some(1009));
    let mut fast = connect(&node, "fast").await;
    for _ in 0..10 {
        if fast.send(Message::Text("{}".into())).await.is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut fast).await, Some(4029));
    let mut greedy = connect(&node, "greedy").await;
    send(
        &mut greedy,
        json!({"packet_action": "consume", "channel": {"voice": true}, "consume_target": ["a", "b", "c"]}),
    )
    .await;
    assert_eq!(close_code(&mut greedy).await, Some(4030));
    // A newer connection of an identity replaces the older one on this node.
    let mut first = connect(&node, "twice").await;
    let mut second = connect(&node, "twice").await;
    assert_eq!(close_code(&mut first).await, Some(4409));
    subscribe(&mut second, json!({"chat": true})).await;
    let _ = node.stop().await;
    clean_up(&names, &["big", "fast", "greedy", "twice"]).await;
}

/// Publishes an outbound message as a back-end would (confirmed; a nack fails the test).
async fn back_end_publish(names: &GatewayConfig, feed: &str, body: Value) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let connection =
        lapin::Connection::connect(&local_uri(), lapin::ConnectionProperties::default())
            .await
            .expect("test client connects");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let confirm = channel
        .basic_publish(
            names.out_exchange.as_str().into(),
            feed.into(),
            BasicPublishOptions::default(),
            body.to_string().as_bytes(),
            lapin::BasicProperties::default().with_content_type("application/json".into()),
        )
        .await
        .expect("published")
        .await
        .expect("confirmed");
    assert!(confirm.is_ack(), "the broker nacked the test's publish");
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_never_gets_another_identitys_direct_messages() {
    let p = prefix("direct");
    let (node, names) = start(&p, "", false).await;
    let mut bob = connect(&node, "bob").await;
    let mut eve = connect(&node, "eve").await;
    subscribe(&mut bob, json!({"tickets": true})).await;
    subscribe(&mut eve, json!({"tickets": true})).await;
    let out = |to: &str, text: &str| {
        json!({"Event-Category": "gateway", "Event-Name": "out",
               "distribution": {"direct": [to]}, "message": {"text": text}})
    };
    back_end_publish(&names, "tickets", out("bob", "for bob only")).await;
    back_end_publish(&names, "tickets", out("eve", "for eve")).await;
    let got_bob = frame(&mut bob).await;
    assert_eq!(got_bob["message"]["text"], "for bob only", "{got_bob}");
    let got_eve = frame(&mut eve).await;
    assert_eq!(got_eve["message"]["text"], "for eve", "{got_eve}");
    let _ = node.stop().await;
    clean_up(&names, &["bob", "eve"]).await;
}

// ------------------------------------------------------------------------------ point 3

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_queue_outlives_its_socket_and_another_node_delivers_it_in_order() {
    let p = prefix("away");
    let (a, names) = start(&p, "", true).await;
    let (b, _) = start(&p, "", false).await;
    let mut bob = connect(&a, "bob").await;
    subscribe(&mut bob, json!({"tickets": true})).await;
    let _ = bob.close(None).await;
    let mut alice = connect(&a, "alice").await;
    const N: u64 = 30;
    for n in 0..N {
        send(
            &mut alice,
            json!({"packet_action": "publish", "channel": {"tickets": true},
                   "message": {"to": "bob", "n": n}}),
        )
        .await;
    }
    // alice sees her N publishes confirmed and her N copies (she is in the multicast).
    let (mut confirmed, mut copies) = (0, 0);
    for _ in 0..(4 * N) {
        if confirmed == N && copies == N {
            break;
        }
        let f = frame(&mut alice).await;
        if f.get("published").is_some() {
            confirmed += 1;
        } else if f.get("message").is_some() {
            copies += 1;
        }
    }
    assert_eq!((confirmed, copies), (N, N));
    // bob comes back on the other node: everything, in order, once.
    let mut bob = connect(&b, "bob").await;
    for n in 0..N {
        let f = frame(&mut bob).await;
        assert_eq!(f["message"]["body"]["n"], n, "{f}");
    }
    let _ = a.stop().await;
    let _ = b.stop().await;
    clean_up(&names, &["alice", "bob"]).await;
}

// ------------------------------------------------------------------------------ point 6

/// A chromedriver this test started (on a free port), killed when dropped.
struct Driver {
    child: std::process::Child,
    url: String,
}

impl Driver {
    /// Starts `chromedriver` and waits (bounded) until it accepts connections.
    async fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let child = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("chromedriver did not start ({e}): run scripts/ensure-chromium")
            });
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver did not listen within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        driver
    }

    /// A new headless Chromium session.
    async fn page(&self) -> fantoccini::Client {
        // fantoccini's rustls wants a process-wide crypto provider: ring, as lapin's.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_string(),
            json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                            "--disable-dev-shm-usage", "--window-size=1000,800"]}),
        );
        fantoccini::ClientBuilder::rustls()
            .expect("a WebDriver client")
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("no Chromium session: {e}"))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (bounded) until the text of `css` on `page` contains `wanted`; returns it.
async fn page_text(page: &fantoccini::Client, css: &str, wanted: &str) -> String {
    let deadline = tokio::time::Instant::now() + FRAME;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        if let Ok(element) = page.find(fantoccini::Locator::Css(css)).await
            && let Ok(text) = element.text().await
        {
            if text.contains(wanted) {
                return text;
            }
            last = text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("`{css}` never showed {wanted:?}; last: {last:?}");
}

async fn click(page: &fantoccini::Client, id: &str) {
    page.find(fantoccini::Locator::Id(id))
        .await
        .unwrap_or_else(|e| panic!("#{id}: {e}"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("click #{id}: {e}"));
}

/// Saves a screenshot of `page` as `target/gateway-browser/<name>.png` (a test artefact).
async fn screenshot(page: &fantoccini::Client, name: &str) {
    let dir = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("gateway-browser");
    let png = page.screenshot().await.expect("a screenshot");
    std::fs::create_dir_all(&dir).expect("the artefact directory");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("the screenshot is saved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browser_pages_exchange_a_ticket_through_the_back_end() {
    let p = prefix("browser");
    let (node, names) = start(&p, "", true).await;
    let driver = Driver::start().await;
    let base = format!("http://{}/", node.http_address().expect("HTTP serves"));
    let (alice, bob) = (driver.page().await, driver.page().await);
    for (page, id) in [(&alice, "alice"), (&bob, "bob")] {
        page.goto(&format!("{base}?token={}", token(id)))
            .await
            .expect("the demo page loads");
        click(page, "connect").await;
        page_text(page, "#state", "open").await;
        click(page, "subscribe").await;
        page_text(page, "#log", "subscribed").await;
    }
    let message = alice
        .find(fantoccini::Locator::Id("message"))
        .await
        .expect("the message box");
    message.clear().await.expect("cleared");
    message
        .send_keys(r#"{"to": "bob", "text": "printer on fire"}"#)
        .await
        .expect("typed");
    click(&alice, "publish").await;
    let seen = page_text(&bob, "#log .received", "printer on fire").await;
    assert!(seen.contains("\"from\":\"alice\""), "{seen}");
    page_text(&alice, "#log", "\"published\"").await;
    click(&bob, "request").await;
    let reply = page_text(&bob, "#log .reply", "\"status\":\"open\"").await;
    assert!(reply.contains("r-1"), "{reply}");
    screenshot(&alice, "alice").await;
    screenshot(&bob, "bob").await;
    let _ = alice.close().await;
    let _ = bob.close().await;
    drop(driver);
    let _ = node.stop().await;
    clean_up(&names, &["alice", "bob"]).await;
}

// ------------------------------------------------------------------------------ point 7

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_dropped_for_ten_seconds_gets_everything_in_order() {
    let p = prefix("drop");
    let (node, names) = start(&p, "", true).await;
    let mut bob = connect(&node, "bob").await;
    subscribe(&mut bob, json!({"tickets": true})).await;
    let _ = bob.close(None).await;
    let away = std::time::Instant::now();
    let mut alice = connect(&node, "alice").await;
    // 40 tickets for bob over 10 s while he is away (paced load, not a wait).
    const N: u64 = 40;
    let mut pace = tokio::time::interval(Duration::from_millis(250));
    for n in 0..N {
        pace.tick().await;
        send(
            &mut alice,
            json!({"packet_action": "publish", "channel": {"tickets": true},
                   "message": {"to": "bob", "n": n}}),
        )
        .await;
    }
    let mut confirmed = 0;
    for _ in 0..(4 * N) {
        if confirmed == N {
            break;
        }
        if frame(&mut alice).await.get("published").is_some() {
            confirmed += 1;
        }
    }
    assert_eq!(confirmed, N, "every publish confirmed");
    assert!(
        away.elapsed() >= Duration::from_secs(9),
        "bob was away ~10 s"
    );
    let mut bob = connect(&node, "bob").await;
    for n in 0..N {
        let f = frame(&mut bob).await;
        assert_eq!(f["message"]["body"]["n"], n, "{f}");
    }
    let _ = node.stop().await;
    clean_up(&names, &["alice", "bob"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_back_end_stopped_with_requests_in_flight_and_started_again_answers_each_once() {
    let p = prefix("restart");
    let extra = "request_timeout_ms = 30000\nmax_frames_per_sec = 1000";
    let only = |gateway, tickets| Apps { gateway, tickets };
    let (gateway, names) = start_on(&[local_uri()], &p, extra, only(true, false)).await;
    let (back_end, _) = start_on(&[local_uri()], &p, extra, only(false, true)).await;
    let (mut sink, mut alice) = connect(&gateway, "alice").await.split();
    const N: usize = 200;
    // Requests at a steady pace (2 s in all), so that some are in flight or queued while
    // the back-end is away.
    let sending = tokio::spawn(async move {
        let mut pace = tokio::time::interval(Duration::from_millis(10));
        for i in 0..N {
            pace.tick().await;
            let frame = json!({"packet_action": "publish", "channel": {"tickets": true},
                               "request_id": format!("r-{i}"), "message": {"i": i}});
            if sink
                .send(Message::Text(frame.to_string().into()))
                .await
                .is_err()
            {
                break;
            }
        }
        sink
    });
    let mut answered = std::collections::HashMap::<String, u32>::new();
    let record = |answered: &mut std::collections::HashMap<String, u32>, f: &Value| {
        assert!(f.get("error").is_none(), "no request fails: {f}");
        let id = f["request_id"].as_str().unwrap_or_default().to_string();
        let echoed = f["message"]["body"]["i"].as_u64().map(|i| format!("r-{i}"));
        assert_eq!(echoed, Some(id.clone()), "{f}");
        *answered.entry(id).or_default() += 1;
    };
    // Some answers, then the back-end goes with the rest in flight or still to come.
    for _ in 0..20 {
        let f = split_frame(&mut alice).await;
        record(&mut answered, &f);
    }
    let _ = back_end.stop().await;
    let before_restart = answered.len();
    let (back_end, _) = start_on(&[local_uri()], &p, extra, only(false, true)).await;
    while answered.len() < N {
        let f = split_frame(&mut alice).await;
        record(&mut answered, &f);
    }
    assert!(
        before_restart < N,
        "the restarted back-end answered some ({before_restart} before)"
    );
    let sink = sending.await.expect("the sender");
    let mut alice = sink.reunite(alice).expect("one socket");
    assert!(
        answered.values().all(|&n| n == 1),
        "each request answered once"
    );
    // Nothing more comes: the next frame answers the next frame sent.
    subscribe(&mut alice, json!({"voice": true})).await;
    let _ = back_end.stop().await;
    let _ = gateway.stop().await;
    clean_up(&names, &["alice"]).await;
}

/// The next frame of the read half of a socket (bounded: 40 s, past a back-end restart).
async fn split_frame(alice: &mut futures::stream::SplitStream<Socket>) -> Value {
    match tokio::time::timeout(Duration::from_secs(40), alice.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => {
            serde_json::from_str(text.as_str()).unwrap_or(Value::Null)
        }
        other => panic!("expected a frame, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_keep_receiving_through_the_secondary_when_the_primary_is_killed() {
    let brokers = common::Broker::start_many(2).await;
    let uris = [brokers[0].uri(), brokers[1].uri()];
    let p = prefix("failover");
    let both = Apps {
        gateway: true,
        tickets: true,
    };
    let (node, _) = start_on(&uris, &p, "max_frames_per_sec = 1000", both).await;
    let (mut sink, mut alice) = connect(&node, "alice").await.split();
    let mut bob = connect(&node, "bob").await;
    subscribe(&mut bob, json!({"tickets": true})).await;
    let ticket = |n: u64| {
        let frame = json!({"packet_action": "publish", "channel": {"tickets": true},
                           "message": {"to": "bob", "n": n}});
        Message::Text(frame.to_string().into())
    };
    sink.send(ticket(0)).await.expect("sent");
    let first = frame(&mut bob).await;
    assert_eq!(first["message"]["body"]["n"], 0, "{first}");
    // alice's own frames (acks, her copies, errors during the failover) are read and
    // dropped; her socket must stay open.
    let draining = tokio::spawn(async move {
        let mut closed = false;
        while let Some(message) = alice.next().await {
            if matches!(message, Err(_) | Ok(Message::Close(_))) {
                closed = true;
                break;
            }
        }
        closed
    });
    brokers[0].kill().await;
    // alice keeps sending tickets (a client sends again what was refused); bob must get
    // ten of those sent after the kill, through the secondary, on the same socket.
    let mut after_kill = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    let mut n = 1;
    while after_kill.len() < 10 && tokio::time::Instant::now() < deadline {
        sink.send(ticket(n)).await.expect("alice's socket is open");
        n += 1;
        match next(&mut bob, Duration::from_millis(100)).await {
            Next::Frame(f) => {
                if let Some(got) = f["message"]["body"]["n"].as_u64() {
                    after_kill.insert(got);
                }
            }
            Next::Closed(code) => panic!("bob's socket closed ({code:?}) during the failover"),
            Next::Nothing => {}
        }
    }
    assert!(
        after_kill.len() >= 10,
        "bob got {} tickets through the secondary",
        after_kill.len()
    );
    // Her reader still runs: her socket was not closed during the failover.
    assert!(!draining.is_finished(), "alice's socket stayed open");
    let _ = sink.close().await;
    draining.abort();
    let _ = node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_node_that_stops_leaves_its_clients_to_the_other_with_nothing_lost() {
    let p = prefix("nodes");
    // A starts first: its distributors are the active ones; B's wait on the queues.
    let (a, names) = start(&p, "", true).await;
    let (b, _) = start(&p, "", false).await;
    let mut bob = connect(&a, "bob").await;
    subscribe(&mut bob, json!({"tickets": true})).await;
    let _ = a.stop().await;
    // The node closes its sockets first, "going away": bob knows to reconnect.
    assert_eq!(close_code(&mut bob).await, Some(1001));
    // The back-end went with A: start it again beside B (a back-end of its own node).
    let back_end = Apps {
        gateway: false,
        tickets: true,
    };
    let (t, _) = start_on(&[local_uri()], &p, "", back_end).await;
    let mut alice = connect(&b, "alice").await;
    const N: u64 = 20;
    for n in 0..N {
        send(
            &mut alice,
            json!({"packet_action": "publish", "channel": {"tickets": true},
                   "message": {"to": "bob", "n": n}}),
        )
        .await;
    }
    let mut bob = connect(&b, "bob").await;
    for n in 0..N {
        let f = frame(&mut bob).await;
        assert_eq!(f["message"]["body"]["n"], n, "{f}");
    }
    let _ = t.stop().await;
    let _ = b.stop().await;
    clean_up(&names, &["alice", "bob"]).await;
}
