//! `cargo bench --bench event_pusher`: apps/event_pusher's Rust API (`EventPusher::push`,
//! every event confirmed, per-user lanes) against raw lapin written for speed publishing
//! the same bodies to the same exchange with the same routing keys, confirm mode and a
//! confirm window of the same size (written and confirmed concurrently), in the same run:
//! events per second, the median of interleaved rounds.
//!
//! Reported beside it, not compared: the same events published one confirm at a time
//! (MongooseIM's `confirms_enabled` mode, one worker: publish, wait for the confirm,
//! next), and requests per second through `POST /events` with batches of 100 events
//! (16 clients at once), and the CPU time of the bench process per event of each side (every
//! thread, lapin's I/O threads included: less bound to the machine's load than events/s).
//! Events are chat messages of 10,000 users, non-persistent, to a
//! transient exchange with one queue bound (`#`), so the broker's disk is not measured.
//! The last line is one JSON object. Plain AMQP only (no TLS variant).

mod common;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel};
use serde_json::{Value, json};
use warren_app_event_pusher::{EventPusher, Kind, Outgoing, PATH, PushEvent, router};
use warren_runtime::node::Node;

const EVENTS: usize = 100_000;
const USERS: usize = 10_000;
/// The shipped defaults (`lanes`, `lane_window`).
const LANES: usize = 1;
const LANE_WINDOW: usize = 1000;
/// Confirms owed at once, on both sides.
const WINDOW: usize = LANES * LANE_WINDOW;
const ROUNDS: usize = 5;
/// Events published one confirm at a time (it is slow).
const ONE_AT_A_TIME: usize = 5_000;
const HTTP_BATCH: usize = 100;
const HTTP_CLIENTS: usize = 16;
const HTTP_REQUESTS: usize = 500;
const PREFIX: &str = "warren-bench-ep";

#[tokio::main]
async fn main() {
    let (_setup, channel) = common::setup_channel("bench-event_pusher/setup").await;
    let exchange = common::of_this_run(&format!("{PREFIX}-chat"));
    let queue = common::of_this_run(PREFIX);
    let (node, pusher) = start(&exchange).await;
    let events = events();
    let bodies: Arc<Vec<Outgoing>> = Arc::new(
        events
            .iter()
            .map(|e| e.encode(pusher.config()).expect("encodes"))
            .collect(),
    );
    let mut rounds = common::Rounds::default();
    let (mut warren_cpu, mut lapin_cpu) = (Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        // Both sides publish from a runtime task, where app code runs (not the thread
        // blocking on `main`).
        let lapin = async {
            common::fresh_queue(&channel, &exchange, &queue).await;
            let bodies = bodies.clone();
            let cpu = common::process_cpu();
            let rate = tokio::spawn(async move { lapin_windowed(&bodies).await })
                .await
                .expect("the lapin publisher");
            (rate, common::process_cpu() - cpu)
        };
        let warren = async {
            common::fresh_queue(&channel, &exchange, &queue).await;
            let (pusher, events) = (pusher.clone(), events.to_vec());
            let cpu = common::process_cpu();
            let rate = tokio::spawn(async move { warren_api(&pusher, events).await })
                .await
                .expect("the warren publisher");
            (rate, common::process_cpu() - cpu)
        };
        let ((warren, warren_used), (lapin, lapin_used)) =
            common::in_turn(round, warren, lapin).await;
        let per_event = |cpu: Duration| cpu.as_secs_f64() * 1e6 / EVENTS as f64;
        eprintln!(
            "round {round}: CPU of the process per event: warren {:.2} µs, lapin {:.2} µs",
            per_event(warren_used),
            per_event(lapin_used)
        );
        warren_cpu.push(per_event(warren_used));
        lapin_cpu.push(per_event(lapin_used));
        rounds.push(round, "events/s", warren, lapin);
    }
    let (warren_cpu, lapin_cpu) = (common::median(warren_cpu), common::median(lapin_cpu));
    eprintln!(
        "CPU of the process per event (median): warren {warren_cpu:.2} µs, lapin {lapin_cpu:.2} µs, ratio {:.3}",
        warren_cpu / lapin_cpu
    );
    common::fresh_queue(&channel, &exchange, &queue).await;
    let one = lapin_one_at_a_time(&bodies[..ONE_AT_A_TIME]).await;
    eprintln!("one confirm at a time (MongooseIM's mode, lapin): {one:.1} events/s");
    common::fresh_queue(&channel, &exchange, &queue).await;
    let (requests, http_events) = http_batches(&node).await;
    eprintln!(
        "POST /events, batches of {HTTP_BATCH}, {HTTP_CLIENTS} clients: {requests:.1} requests/s ({http_events:.0} events/s)"
    );
    common::delete_queue(&channel, &queue).await;
    common::delete_exchange(&channel, &exchange).await;
    let _ = node.stop().await;
    rounds.report_with(
        "event_pusher",
        &format!(
            ",\"unit\":\"events/s\",\"cpu_us_per_event\":{{\"warren\":{warren_cpu:.2},\"lapin\":{lapin_cpu:.2}}},\"window\":{WINDOW},\"one_at_a_time\":{one:.1},\"http_requests_per_s\":{requests:.1},\"http_events_per_s\":{http_events:.1},\"http_batch\":{HTTP_BATCH}"
        ),
    );
}

/// A node running the pusher (histograms on, as in production) with its route; its chat
/// events go to `chat` (this run's exchange).
async fn start(chat: &str) -> (Node, EventPusher) {
    let text = format!(
        "[service]\nnode = \"bench-event_pusher-{}\"\n[publisher]\nconfirm_window = {WINDOW}\n{}\n\
         [zones.local]\nbrokers = [\"{}\"]\n\n[apps.event_pusher]\n\
         chat_msg_exchange.name = \"{chat}\"\npresence_exchange.name = \"{PREFIX}-presence\"\n\
         groupchat_msg_exchange.name = \"{PREFIX}-groupchat\"\nlanes = {LANES}\nlane_window = {LANE_WINDOW}\n\
         persistent = false\ndurable_exchanges = false\n",
        std::process::id(),
        common::METRICS_ON,
        common::broker_uri()
    );
    let config = warren_runtime::config::Config::parse(
        &text,
        std::path::Path::new("bench.ini"),
        &["event_pusher"],
        None,
    )
    .expect("bench config");
    let settings = config
        .app("event_pusher")
        .expect("section")
        .event_pusher
        .clone();
    let built: Arc<OnceLock<EventPusher>> = Arc::default();
    let building = built.clone();
    let node = Node::start(config, move |ctx| {
        let pusher = EventPusher::new(
            &ctx.publisher,
            ctx.registry.clone(),
            Some(&ctx.metrics),
            settings,
        );
        ctx.http
            .mount(PATH, router(pusher.clone()))
            .expect("route mounted");
        let _ = building.set(pusher);
        Vec::new()
    })
    .await
    .expect("node starts");
    let pusher = built.get().expect("built").clone();
    (node, pusher)
}

/// Chat messages of `USERS` users, about 180 bytes each on the wire.
fn events() -> Vec<PushEvent> {
    (0..EVENTS)
        .map(|i| {
            let from = format!("user{}@localhost/phone", i % USERS);
            let to = format!("friend{}@localhost/desk", i % 97);
            let text = format!("message {i:>8} {}", "x".repeat(48));
            PushEvent::message(Kind::ChatSent, &from, &to, &text).expect("valid")
        })
        .collect()
}

/// `WINDOW` callers at once, each awaiting its event's confirm.
async fn warren_api(pusher: &EventPusher, events: Vec<PushEvent>) -> f64 {
    let started = Instant::now();
    let mut inflight = FuturesUnordered::new();
    for event in events {
        if inflight.len() == WINDOW
            && let Some(result) = inflight.next().await
        {
            let result: Result<(), warren_app_event_pusher::PushError> = result;
            result.expect("confirmed");
        }
        let pusher = pusher.clone();
        inflight.push(async move { pusher.push(event).await });
    }
    while let Some(result) = inflight.next().await {
        result.expect("confirmed");
    }
    common::rate(EVENTS, started.elapsed())
}

fn properties() -> BasicProperties {
    BasicProperties::default().with_content_type("application/json".into())
}

async fn confirm_channel(name: &str) -> (lapin::Connection, Channel) {
    let connection = common::connect(name).await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    (connection, channel)
}

/// Confirm mode, `WINDOW` publishes in flight (written and confirmed concurrently); a nack
/// stops the bench.
async fn lapin_windowed(bodies: &[Outgoing]) -> f64 {
    let (connection, channel) = confirm_channel("bench-event_pusher/lapin").await;
    let started = Instant::now();
    let mut inflight = FuturesUnordered::new();
    for out in bodies {
        if inflight.len() == WINDOW
            && let Some(acked) = inflight.next().await
        {
            let acked: bool = acked;
            assert!(acked, "nacked");
        }
        let channel = channel.clone();
        inflight.push(async move {
            let confirm = channel
                .basic_publish(
                    out.exchange.as_str().into(),
                    out.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &out.body,
                    properties(),
                )
                .await
                .expect("publish");
            confirm.await.expect("confirm").is_ack()
        });
    }
    while let Some(acked) = inflight.next().await {
        assert!(acked, "nacked");
    }
    let rate = common::rate(bodies.len(), started.elapsed());
    let _ = connection.close(200, "done".into()).await;
    rate
}

/// MongooseIM's `confirms_enabled` worker: publish, wait for the confirm, next.
async fn lapin_one_at_a_time(bodies: &[Outgoing]) -> f64 {
    let (connection, channel) = confirm_channel("bench-event_pusher/one").await;
    let started = Instant::now();
    for out in bodies {
        let confirm = channel
            .basic_publish(
                out.exchange.as_str().into(),
                out.routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &out.body,
                properties(),
            )
            .await
            .expect("publish");
        assert!(confirm.await.expect("confirm").is_ack(), "nacked");
    }
    let rate = common::rate(bodies.len(), started.elapsed());
    let _ = connection.close(200, "done".into()).await;
    rate
}

/// `HTTP_REQUESTS` requests of `HTTP_BATCH` events from `HTTP_CLIENTS` clients at once:
/// (requests/s, events/s); every answer must be 200 with every event confirmed.
async fn http_batches(node: &Node) -> (f64, f64) {
    let url = format!(
        "http://{}{PATH}",
        node.http_address().expect("the HTTP endpoint serves")
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let bodies: Vec<String> = (0..HTTP_REQUESTS)
        .map(|r| {
            let batch: Vec<Value> = (0..HTTP_BATCH)
                .map(|i| {
                    json!({"type": "chat_sent", "from_user_id": format!("user{}@localhost/phone", (r * HTTP_BATCH + i) % USERS),
                           "to_user_id": "friend@localhost/desk", "message": format!("message {r} {i}")})
                })
                .collect();
            Value::Array(batch).to_string()
        })
        .collect();
    let started = Instant::now();
    let mut inflight = FuturesUnordered::new();
    for body in bodies {
        if inflight.len() == HTTP_CLIENTS
            && let Some(status) = inflight.next().await
        {
            let status: u16 = status;
            assert_eq!(status, 200, "POST /events refused");
        }
        let (client, url) = (client.clone(), url.clone());
        inflight.push(async move {
            let response = client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("POST /events answered");
            response.status().as_u16()
        });
    }
    while let Some(status) = inflight.next().await {
        assert_eq!(status, 200, "POST /events refused");
    }
    let elapsed = started.elapsed();
    (
        common::rate(HTTP_REQUESTS, elapsed),
        common::rate(HTTP_REQUESTS * HTTP_BATCH, elapsed),
    )
}
