//! apps/event_pusher against real RabbitMQ: each event type's exchange, routing key and
//! exact body (MongooseIM's wire format), `direct` exchanges, bad `POST /events` input,
//! 503 without a broker, and no loss nor reordering across a SIGKILL of the primary (the
//! Rust API, 1,000 users × 50 events, and an HTTP client retrying on 503).

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Broker, SOON, config_text, init_logs, unique_node};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Value, json};
use warren_app_event_pusher::{EventPusher, EventPusherApp};
use warren_listeners::{AppContext, app_child};
use warren_runtime::config::Config;
use warren_runtime::node::Node;
use warren_test_support::{eventually, local_uri};

/// `[apps.event_pusher]` with exchanges of this test's own (`<prefix>-presence`, …).
fn pusher_section(prefix: &str, kind: &str, extra: &str) -> String {
    format!(
        "\n[http]\nlisten = \"127.0.0.1:0\"\n\n[apps.event_pusher]\n\
         presence_exchange.name = \"{prefix}-presence\"\npresence_exchange.type = \"{kind}\"\n\
         chat_msg_exchange.name = \"{prefix}-chat\"\nchat_msg_exchange.type = \"{kind}\"\n\
         groupchat_msg_exchange.name = \"{prefix}-groupchat\"\ngroupchat_msg_exchange.type = \"{kind}\"\n\
         {extra}\n"
    )
}

/// A node running the event pusher on `brokers`; `amqp` is added to `[amqp]`, `tail` after
/// the pusher's section (e.g. `[publisher]`).
async fn start(
    brokers: &[String],
    prefix: &str,
    kind: &str,
    amqp: &str,
    tail: &str,
) -> (Node, EventPusher) {
    init_logs();
    let name = unique_node("pusher");
    let text = format!(
        "{}{}{tail}",
        config_text(&name, brokers, amqp),
        pusher_section(prefix, kind, "max_request_bytes = 20000")
    );
    let config = match Config::parse(&text, Path::new("test.ini"), &["event_pusher"], None) {
        Ok(config) => config,
        Err(error) => panic!("test config is invalid: {error}\n{text}"),
    };
    let app_config = config.app("event_pusher").expect("section").clone();
    let app = Arc::new(EventPusherApp::default());
    let building = app.clone();
    let node = Node::try_start(config, move |node| {
        let ctx = AppContext::new(building.as_ref(), node.clone(), app_config);
        app_child(building.as_ref(), ctx).map(|child| vec![child])
    })
    .await
    .unwrap_or_else(|error| panic!("node did not start: {error}"));
    let pusher = app.pusher().expect("the app built its pusher");
    (node, pusher)
}

fn url(node: &Node) -> String {
    format!(
        "http://{}/events",
        node.http_address().expect("HTTP serves")
    )
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client")
}

/// POST `body` to /events: (status, Retry-After, JSON reply).
async fn post(client: &reqwest::Client, node: &Node, body: String) -> (u16, Option<String>, Value) {
    let response = client
        .post(url(node))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST /events: {e}"));
    let status = response.status().as_u16();
    let retry = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = response.text().await.unwrap_or_default();
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, retry, value)
}

async fn connect(uri: &str) -> (Connection, Channel) {
    let connection = Connection::connect(uri, ConnectionProperties::default())
        .await
        .expect("test client connects");
    let channel = connection.create_channel().await.expect("channel");
    (connection, channel)
}

/// Declares a durable queue bound with `key` to `exchange` (declared as the pusher does:
/// durable, of `kind`).
async fn bind(channel: &Channel, queue: &str, exchange: &str, kind: ExchangeKind, key: &str) {
    channel
        .exchange_declare(
            exchange.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange as the pusher declares it");
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue");
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
}

/// One message as a consumer sees it.
#[derive(Debug)]
struct Got {
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    content_type: Option<String>,
}

/// Takes `n` messages from `queue` (no-ack), or fewer if the deadline passes first.
async fn take(channel: &Channel, queue: &str, n: usize, within: Duration) -> Vec<Got> {
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            format!("take-{}", unique_node("c")).into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Some(Ok(delivery))) => got.push(Got {
                exchange: delivery.exchange.to_string(),
                routing_key: delivery.routing_key.to_string(),
                content_type: delivery
                    .properties
                    .content_type()
                    .as_ref()
                    .map(|t| t.to_string()),
                body: delivery.data,
            }),
            _ => break,
        }
    }
    got
}

/// Ready messages in `queue`.
async fn ready(channel: &Channel, queue: &str) -> usize {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|q| q.message_count() as usize)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_event_reaches_its_exchange_with_mongooseims_key_and_body() {
    let prefix = unique_node("wire");
    let (node, pusher) = start(&[local_uri()], &prefix, "topic", "", "").await;
    let (_connection, channel) = connect(&local_uri()).await;
    let queue = format!("{prefix}-all");
    for exchange in ["presence", "chat", "groupchat"] {
        bind(
            &channel,
            &queue,
            &format!("{prefix}-{exchange}"),
            ExchangeKind::Topic,
            "#",
        )
        .await;
    }
    let events = json!([
        {"type": "presence", "user_id": "Alice@LocalHost/Res1", "present": true},
        {"type": "chat_sent", "from_user_id": "alice@localhost/res1", "to_user_id": "bob@localhost/res1", "message": "Hello, Bob"},
        {"type": "chat_recv", "from_user_id": "alice@localhost/res1", "to_user_id": "Bob@localhost/Res1", "message": "Hi \"there\""},
        {"type": "groupchat_sent", "from_user_id": "alice@localhost/res1", "to_user_id": "room@muc.localhost", "message": "to all"},
        {"type": "groupchat_recv", "from_user_id": "room@muc.localhost/alice", "to_user_id": "bob@localhost/res2", "message": "from room"}
    ]);
    let client = http();
    let (status, _, reply) = post(&client, &node, events.to_string()).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, json!({"events": 5, "confirmed": 5}));
    // And one through the Rust API.
    pusher
        .presence("carol@localhost", false)
        .await
        .expect("confirmed");
    let got = take(&channel, &queue, 6, SOON).await;
    // Events of different users keep no order among themselves (they take other lanes).
    let mut seen: Vec<(String, String, String)> = got
        .iter()
        .map(|g| {
            (
                g.exchange.clone(),
                g.routing_key.clone(),
                String::from_utf8_lossy(&g.body).into_owned(),
            )
        })
        .collect();
    let mut expected: Vec<(String, String, String)> = [
        ("presence", "alice@localhost", r#"{"user_id":"Alice@LocalHost/Res1","present":true}"#),
        ("chat", "alice@localhost.chat_msg_sent", r#"{"to_user_id":"bob@localhost/res1","message":"Hello, Bob","from_user_id":"alice@localhost/res1"}"#),
        ("chat", "bob@localhost.chat_msg_recv", r#"{"to_user_id":"bob@localhost/Res1","message":"Hi \"there\"","from_user_id":"alice@localhost/res1"}"#),
        ("groupchat", "alice@localhost.groupchat_msg_sent", r#"{"to_user_id":"room@muc.localhost","message":"to all","from_user_id":"alice@localhost/res1"}"#),
        ("groupchat", "bob@localhost.groupchat_msg_recv", r#"{"to_user_id":"bob@localhost/res2","message":"from room","from_user_id":"room@muc.localhost/alice"}"#),
        ("presence", "carol@localhost", r#"{"user_id":"carol@localhost","present":false}"#),
    ]
    .into_iter()
    .map(|(e, k, b)| (format!("{prefix}-{e}"), k.to_string(), b.to_string()))
    .collect();
    seen.sort();
    expected.sort();
    assert_eq!(seen, expected);
    assert!(
        got.iter()
            .all(|g| g.content_type.as_deref() == Some("application/json"))
    );
    // MongooseIM's metric names, with the broker as label.
    let report = node.context().metrics.report();
    let published = report
        .value("warren_event_pusher_messages_published", &[])
        .unwrap_or(0);
    assert_eq!(published, 6);
    let text = node.context().metrics.encode();
    for name in [
        "warren_event_pusher_connections_active",
        "warren_event_pusher_connections_opened_total",
        "warren_event_pusher_message_publish_time_seconds_count",
        "warren_event_pusher_message_payload_size_bytes_count",
        "warren_event_pusher_messages_timeout_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    clean_up(&channel, &prefix, &queue).await;
    node.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn direct_exchanges_route_by_the_exact_key() {
    let prefix = unique_node("direct");
    let (node, pusher) = start(&[local_uri()], &prefix, "direct", "", "").await;
    let (_connection, channel) = connect(&local_uri()).await;
    let queue = format!("{prefix}-alice");
    // A direct binding per user, as MongooseIM advises past ~100k users.
    bind(
        &channel,
        &queue,
        &format!("{prefix}-presence"),
        ExchangeKind::Direct,
        "alice@localhost",
    )
    .await;
    bind(
        &channel,
        &queue,
        &format!("{prefix}-chat"),
        ExchangeKind::Direct,
        "alice@localhost.chat_msg_sent",
    )
    .await;
    pusher
        .presence("alice@localhost/phone", true)
        .await
        .expect("confirmed");
    pusher
        .presence("bob@localhost/phone", true)
        .await
        .expect("confirmed");
    pusher
        .chat_sent("alice@localhost/phone", "bob@localhost", "hi")
        .await
        .expect("confirmed");
    pusher
        .chat_recv("bob@localhost", "alice@localhost/phone", "not bound")
        .await
        .expect("confirmed");
    let got = take(&channel, &queue, 2, SOON).await;
    let keys: Vec<&str> = got.iter().map(|g| g.routing_key.as_str()).collect();
    assert_eq!(keys, ["alice@localhost", "alice@localhost.chat_msg_sent"]);
    assert_eq!(
        ready(&channel, &queue).await,
        0,
        "bob's and unbound events are not routed here"
    );
    clean_up(&channel, &prefix, &queue).await;
    node.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_naming_the_event_and_field() {
    let prefix = unique_node("bad");
    let (node, _pusher) = start(&[local_uri()], &prefix, "topic", "", "").await;
    let (_connection, channel) = connect(&local_uri()).await;
    let queue = format!("{prefix}-all");
    bind(
        &channel,
        &queue,
        &format!("{prefix}-presence"),
        ExchangeKind::Topic,
        "#",
    )
    .await;
    let client = http();
    let good = json!({"type": "presence", "user_id": "refused@localhost", "present": true});
    let cases = [
        (json!([good, {"type": "presence", "user_id": "alice@@localhost", "present": true}]).to_string(), Some(1), Some("user_id")),
        (json!([good, good, {"type": "presence", "present": true}]).to_string(), Some(2), Some("user_id")),
        (json!({"type": "presence", "user_id": "a@b", "present": "yes"}).to_string(), Some(0), Some("present")),
        (json!({"type": "chat_sent", "from_user_id": "a@b", "to_user_id": 7, "message": "x"}).to_string(), Some(0), Some("to_user_id")),
        (json!({"type": "chat_sent", "from_user_id": "a@b", "to_user_id": "c@d"}).to_string(), Some(0), Some("message")),
        (json!({"type": "typing", "user_id": "a@b"}).to_string(), Some(0), Some("type")),
        ("{not json".to_string(), None, None),
        (json!([]).to_string(), None, None),
        // Above max_request_bytes = 20000.
        (json!({"type": "chat_sent", "from_user_id": "a@b", "to_user_id": "c@d", "message": "x".repeat(30_000)}).to_string(), None, None),
    ];
    for (body, index, field) in cases {
        let (status, _, reply) = post(&client, &node, body).await;
        assert_eq!(status, 400, "{reply}");
        assert!(reply["error"].is_string(), "{reply}");
        assert_eq!(
            reply.get("index").and_then(Value::as_u64),
            index.map(|i| i as u64),
            "{reply}"
        );
        assert_eq!(reply.get("field").and_then(Value::as_str), field, "{reply}");
    }
    // Nothing of a refused batch was published (its first events were valid): the one
    // event of a valid request is the first and only one in the queue.
    let valid = json!({"type": "presence", "user_id": "alice@localhost", "present": true});
    let (status, _, _) = post(&client, &node, valid.to_string()).await;
    assert_eq!(status, 200);
    let got = take(&channel, &queue, 1, SOON).await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].routing_key, "alice@localhost",
        "a refused event was published"
    );
    assert_eq!(ready(&channel, &queue).await, 0);
    clean_up(&channel, &prefix, &queue).await;
    node.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_broker_is_a_503_with_retry_after_within_the_bound() {
    let brokers = Broker::start_many(1).await;
    let broker = &brokers[0];
    let prefix = unique_node("gone");
    let (node, pusher) = start(
        &[broker.uri()],
        &prefix,
        "topic",
        "",
        "\n[publisher]\ntimeout_ms = 1000\n",
    )
    .await;
    pusher
        .presence("alice@localhost", true)
        .await
        .expect("confirmed while up");
    broker.kill().await;
    let client = http();
    let started = Instant::now();
    let body =
        json!([{"type": "presence", "user_id": "alice@localhost", "present": false}]).to_string();
    let (status, retry, reply) = post(&client, &node, body).await;
    assert_eq!(status, 503, "{reply}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(reply["confirmed"], json!(0), "{reply}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered after {:?}, the bound is 1 s",
        started.elapsed()
    );
    assert!(pusher.presence("alice@localhost", false).await.is_err());
    node.stop().await.expect("stops");
}

/// 1,000 users × 50 chat events through the Rust API, and an HTTP client posting batches
/// of presence events and retrying on 503, while the primary is SIGKILLed (and restarted
/// later, so that what it had confirmed can be counted): every confirmed event arrives,
/// and on each broker every user's events arrive in order (a re-sent stretch may repeat,
/// nothing overtakes).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nothing_is_lost_or_reordered_when_the_primary_is_killed() {
    const USERS: usize = 1000;
    const EVENTS: usize = 50;
    let brokers = Broker::start_many(2).await;
    let (a, b) = (&brokers[0], &brokers[1]);
    let prefix = unique_node("kill");
    let chat_queue = "order";
    let presence_queue = "http";
    for broker in [a, b] {
        let (_connection, channel) = connect(&broker.uri()).await;
        bind(
            &channel,
            chat_queue,
            &format!("{prefix}-chat"),
            ExchangeKind::Topic,
            "#",
        )
        .await;
        bind(
            &channel,
            presence_queue,
            &format!("{prefix}-presence"),
            ExchangeKind::Topic,
            "#",
        )
        .await;
    }
    let (node, pusher) = start(
        &[a.uri(), b.uri()],
        &prefix,
        "topic",
        "heartbeat_secs = 5",
        // Four lanes (the default is one), so that rewinds of several lanes at once are
        // covered. 50,000 persistent events queue up at once: a bound that lets the last
        // of them through at a few thousand a second.
        "lanes = 4\nlane_window = 128\n\n[publisher]\ntimeout_ms = 20000\n",
    )
    .await;

    // The Rust API: one task per user pushes its 50 events as one batch (all queued in
    // order on the user's lane, many in flight), retrying the whole batch on a failure.
    let confirmed = Arc::new(AtomicUsize::new(0));
    let retried = Arc::new(AtomicUsize::new(0));
    let mut users = Vec::new();
    for user in 0..USERS {
        let pusher = pusher.clone();
        let confirmed = confirmed.clone();
        let retried = retried.clone();
        users.push(tokio::spawn(async move {
            let from = format!("user{user}@localhost/res");
            let events: Vec<_> = (0..EVENTS)
                .map(|seq| {
                    warren_app_event_pusher::PushEvent::message(
                        warren_app_event_pusher::Kind::ChatSent,
                        &from,
                        "bob@localhost",
                        &seq.to_string(),
                    )
                    .expect("valid")
                })
                .collect();
            for _attempt in 0..10 {
                let outcome = pusher.push_all(events.clone()).await;
                if outcome.failure.is_none() {
                    confirmed.fetch_add(EVENTS, Ordering::Relaxed);
                    return true;
                }
                retried.fetch_add(1, Ordering::Relaxed);
            }
            false
        }));
    }

    // The HTTP client: batches of 100 presence events with ids never used twice, retried
    // on 503 until answered 200; the ids of 200s are what must arrive.
    let answered: Arc<parking_lot::Mutex<HashSet<String>>> = Arc::default();
    let unavailable = Arc::new(AtomicUsize::new(0));
    let http_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let batches = Arc::new(AtomicUsize::new(0));
    let http_task = {
        let answered = answered.clone();
        let unavailable = unavailable.clone();
        let http_done = http_done.clone();
        let batches = batches.clone();
        let url = url(&node);
        tokio::spawn(async move {
            let client = http();
            let mut batch_no = 0;
            let started = Instant::now();
            while !http_done.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60)
            {
                let ids: Vec<String> = (0..100)
                    .map(|i| format!("h{batch_no}-{i}@localhost"))
                    .collect();
                let body: Vec<Value> = ids
                    .iter()
                    .map(|id| json!({"type": "presence", "user_id": id, "present": true}))
                    .collect();
                let body = Value::Array(body).to_string();
                let mut tries = 0;
                loop {
                    tries += 1;
                    assert!(tries <= 30, "batch {batch_no} never answered 200");
                    let response = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await;
                    match response.map(|r| r.status().as_u16()) {
                        Ok(200) => {
                            answered.lock().extend(ids.iter().cloned());
                            batches.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Ok(503) => {
                            unavailable.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        other => panic!("unexpected answer {other:?}"),
                    }
                }
                batch_no += 1;
            }
        })
    };

    // Kill the primary once a fifth of the chat events are confirmed.
    let metrics = node.context().metrics.clone();
    let published = move || {
        metrics
            .report()
            .value("warren_event_pusher_messages_published", &[])
            .unwrap_or(0) as usize
    };
    assert!(
        eventually(Duration::from_secs(60), || published()
            >= USERS * EVENTS / 5
            || users.iter().all(|u| u.is_finished()))
        .await
    );
    let at_kill = published();
    assert!(
        at_kill < USERS * EVENTS,
        "the load finished before the kill; nothing tested"
    );
    a.kill().await;
    let mut all_confirmed = true;
    for user in users {
        all_confirmed &= tokio::time::timeout(Duration::from_secs(60), user)
            .await
            .expect("a user's events settle within 60 s")
            .expect("user task");
    }
    assert!(all_confirmed, "a user's batch failed 10 times");
    // The HTTP client's batches queued behind the chat load; let it post some on its own.
    let after = batches.load(Ordering::Relaxed);
    assert!(
        eventually(Duration::from_secs(30), || batches.load(Ordering::Relaxed)
            >= after + 10)
        .await
    );
    http_done.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(60), http_task)
        .await
        .expect("the HTTP client ends")
        .expect("HTTP client task");
    eprintln!(
        "confirmed {} chat events ({} at the kill, {} batches retried), {} presence events answered 200 ({} answers 503)",
        confirmed.load(Ordering::Relaxed),
        at_kill,
        retried.load(Ordering::Relaxed),
        answered.lock().len(),
        unavailable.load(Ordering::Relaxed)
    );
    node.stop().await.expect("stops");

    // What A confirmed before it died is on its disk: restart it and read both.
    a.restart().await;
    let mut per_broker: Vec<HashMap<usize, Vec<usize>>> = Vec::new();
    let mut presence_ids = HashSet::new();
    for broker in [a, b] {
        let (_connection, channel) = connect(&broker.uri()).await;
        let n = ready(&channel, chat_queue).await;
        let got = take(&channel, chat_queue, n, Duration::from_secs(60)).await;
        assert_eq!(got.len(), n, "every ready message is read");
        let mut users: HashMap<usize, Vec<usize>> = HashMap::new();
        for message in got {
            let body: Value = serde_json::from_slice(&message.body).expect("JSON body");
            let from = body["from_user_id"].as_str().expect("from_user_id");
            let user: usize = from
                .trim_start_matches("user")
                .split('@')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("user number");
            let seq: usize = body["message"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("seq");
            users.entry(user).or_default().push(seq);
        }
        per_broker.push(users);
        let n = ready(&channel, presence_queue).await;
        for message in take(&channel, presence_queue, n, Duration::from_secs(60)).await {
            let body: Value = serde_json::from_slice(&message.body).expect("JSON body");
            presence_ids.insert(body["user_id"].as_str().unwrap_or_default().to_string());
        }
    }
    let mut reordered = Vec::new();
    let mut missing = 0;
    let mut duplicates = 0;
    for user in 0..USERS {
        let mut union = HashSet::new();
        for users in &per_broker {
            let Some(seqs) = users.get(&user) else {
                continue;
            };
            // First arrivals on one broker strictly increase; a repeat is a rewound stretch.
            let mut first = HashSet::new();
            let mut last_first = None;
            for &seq in seqs {
                if first.insert(seq) {
                    if last_first.is_some_and(|last| seq < last) {
                        reordered.push((user, seqs.clone()));
                        break;
                    }
                    last_first = Some(seq);
                } else {
                    duplicates += 1;
                }
            }
            union.extend(first);
        }
        if union.len() < EVENTS && missing < 200 {
            let lists: Vec<_> = per_broker
                .iter()
                .map(|users| users.get(&user).cloned())
                .collect();
            eprintln!("user {user} incomplete: {lists:?}");
        }
        missing += EVENTS - union.len().min(EVENTS);
    }
    eprintln!(
        "chat events: {missing} missing, {duplicates} repeated; presence: {} read",
        presence_ids.len()
    );
    assert!(
        reordered.is_empty(),
        "reordered: {:?}",
        &reordered[..reordered.len().min(3)]
    );
    assert_eq!(missing, 0, "confirmed chat events lost");
    let answered = answered.lock();
    assert!(answered.len() >= 100, "the HTTP client got answers");
    let lost: Vec<&String> = answered
        .iter()
        .filter(|id| !presence_ids.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} events answered 200 never arrived",
        lost.len()
    );
}

/// Deletes the test's three exchanges (named after `prefix`) and its queue.
async fn clean_up(channel: &Channel, prefix: &str, queue: &str) {
    for exchange in ["presence", "chat", "groupchat"] {
        let _ = channel
            .exchange_delete(
                format!("{prefix}-{exchange}").as_str().into(),
                Default::default(),
            )
            .await;
    }
    let _ = channel.queue_delete(queue.into(), Default::default()).await;
}
