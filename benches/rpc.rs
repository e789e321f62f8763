//! `cargo bench --bench rpc`: request/reply round trips through a warren pool (checkout,
//! call, check-in) against raw lapin request/reply on a pre-declared reply queue, both
//! calling the same fast raw-lapin responder on the local RabbitMQ, in the same run, with
//! the same guarantee: the request mandatory and confirmed (a nack or a return is a
//! failure), the reply and the confirm awaited together.
//!
//! Reports the p50 and p99 of sequential calls for both, and calls per second with 64
//! concurrent callers, each the median of seven interleaved rounds with the spread. Both
//! sides' callers run as tasks on the runtime's worker threads, where app code runs. The
//! last line is one JSON object:
//! `{"bench":"rpc","warren":<p50 µs>,"lapin":<p50 µs>,"ratio":<warren p50 / lapin p50>}`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ExchangeKind};
use tokio::sync::Mutex;
use warren_listeners::{AppContext, ListenerPool};
use warren_runtime::config::{AppConfig, PoolConfig};
use warren_runtime::envelope::{Envelope, publish_properties};
use warren_runtime::node::Node;

const SEQUENTIAL: usize = 3_000;
const CONCURRENT_CALLERS: usize = 64;
const CONCURRENT_CALLS: usize = 20_000;
const EXCHANGE: &str = "warren-bench-rpc";
const TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() {
    // Callers run as tasks on the runtime's workers, as an app's code does (handlers,
    // spawned tasks), not on the thread that blocks on `main`: both sides alike.
    tokio::spawn(bench())
        .await
        .expect("the bench ran to its end");
}

async fn bench() {
    let responder = start_responder().await;
    let node = common::start_node("rpc", "").await;
    let pool = start_pool(&node).await;
    let lapin = LapinClient::connect("bench-rpc/lapin").await;

    // Warm both paths up.
    for _ in 0..200 {
        lapin.call().await;
        warren_call(&pool).await;
    }
    // Interleaved rounds: each side's sequential p50 (and p99), then its calls/s with
    // concurrent callers.
    let (mut p50s, mut p99s, mut rates) = (
        common::Rounds::default(),
        common::Rounds::default(),
        common::Rounds::default(),
    );
    for round in 1..=common::rounds() {
        let ((warren_p50, warren_p99), (lapin_p50, lapin_p99)) = common::in_turn(
            round,
            async { percentiles(sequential(|| warren_call(&pool)).await) },
            async { percentiles(sequential(|| lapin.call()).await) },
        )
        .await;
        p50s.push(round, "µs p50", warren_p50, lapin_p50);
        p99s.push(round, "µs p99", warren_p99, lapin_p99);
        let (warren_rate, lapin_rate) =
            common::in_turn(round, concurrent_warren(&pool), concurrent_lapin()).await;
        rates.push(round, "calls/s", warren_rate, lapin_rate);
    }
    p99s.report("rpc_p99");
    rates.report("rpc_calls_per_sec_64");
    pool.stop().await;
    let _ = node.stop().await;
    drop(responder);
    p50s.report("rpc");
}

async fn sequential<F, Fut>(call: F) -> Vec<f64>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut latencies = Vec::with_capacity(SEQUENTIAL);
    for _ in 0..SEQUENTIAL {
        let started = Instant::now();
        call().await;
        latencies.push(started.elapsed().as_secs_f64() * 1e6);
    }
    latencies
}

/// (p50, p99) in microseconds.
fn percentiles(mut values: Vec<f64>) -> (f64, f64) {
    values.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| values[((values.len() as f64 * q) as usize).min(values.len() - 1)];
    (at(0.50), at(0.99))
}

fn request() -> Envelope {
    Envelope::new("bench", "ping").with("Payload", "x".repeat(128))
}

/// A responder written for speed: no-ack consumer, replies without confirms.
async fn start_responder() -> Connection {
    let connection = common::connect("bench-rpc/responder").await;
    let channel = connection.create_channel().await.expect("channel");
    declare(&channel).await;
    let queue = common::of_this_run("warren-bench-rpc");
    bound_queue(&channel, &queue, EXCHANGE, "ping").await;
    let mut consumer = common::consume_no_ack(&channel, &queue, "responder").await;
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let Ok(request) = Envelope::decode(&delivery.data, None, None) else {
                continue;
            };
            let Some(server) = request.server_id() else {
                continue;
            };
            let reply = request.reply("bench", "pong");
            let _ = channel
                .basic_publish(
                    "targeted".into(),
                    server.into(),
                    BasicPublishOptions::default(),
                    &reply.encode(),
                    publish_properties(false),
                )
                .await;
        }
    });
    connection
}

/// An exclusive, auto-deleted queue bound to `exchange` with `key`.
async fn bound_queue(channel: &Channel, queue: &str, exchange: &str, key: &str) {
    let options = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    common::declare_queue(channel, queue, options).await;
    common::bind(channel, queue, exchange, key).await;
}

async fn declare(channel: &Channel) {
    // `targeted` as warren declares it: durable.
    for (name, kind, durable) in [
        (EXCHANGE, ExchangeKind::Topic, false),
        ("targeted", ExchangeKind::Direct, true),
    ] {
        channel
            .exchange_declare(
                name.into(),
                kind,
                ExchangeDeclareOptions {
                    durable,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("exchange");
    }
}

/// A raw lapin caller: its own reply queue bound to `targeted`, replies matched by Msg-ID.
struct LapinClient {
    _connection: Connection,
    channel: Channel,
    queue: String,
    replies: Mutex<lapin::Consumer>,
}

impl LapinClient {
    async fn connect(name: &str) -> LapinClient {
        let connection = common::connect(name).await;
        let channel = connection.create_channel().await.expect("channel");
        declare(&channel).await;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let queue = format!("{name}-{}", warren_runtime::envelope::new_msg_id());
        bound_queue(&channel, &queue, "targeted", &queue).await;
        let replies = common::consume_no_ack(&channel, &queue, "replies").await;
        LapinClient {
            _connection: connection,
            channel,
            queue,
            replies: Mutex::new(replies),
        }
    }

    /// The same guarantee as a pool call: the request mandatory and confirmed (a nack or a
    /// return fails the bench), the reply and the confirm awaited together.
    async fn call(&self) {
        let mut request = request().with("Server-ID", self.queue.as_str());
        let msg_id = request.ensure_msg_id().to_string();
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirm = self
            .channel
            .basic_publish(
                EXCHANGE.into(),
                "ping".into(),
                options,
                &request.encode(),
                publish_properties(false),
            )
            .await
            .expect("publish");
        let reply = async {
            let mut replies = self.replies.lock().await;
            loop {
                let delivery = tokio::time::timeout(TIMEOUT, replies.next())
                    .await
                    .expect("a reply in time")
                    .expect("stream open")
                    .expect("delivery");
                let reply = Envelope::decode(&delivery.data, None, None).expect("reply");
                if reply.msg_id() == Some(msg_id.as_str()) {
                    return;
                }
            }
        };
        let (confirmed, ()) = tokio::join!(confirm, reply);
        match confirmed {
            Ok(lapin::Confirmation::Ack(None)) => {}
            other => panic!("the request was not confirmed as routed: {other:?}"),
        }
    }
}

async fn start_pool(node: &Node) -> ListenerPool {
    let ctx = AppContext::with_version(
        "bench",
        node.context().clone(),
        AppConfig::new(
            "bench",
            PoolConfig {
                size: CONCURRENT_CALLERS,
                overflow: 0,
                checkout_timeout: TIMEOUT,
                idle_timeout: Duration::from_secs(60),
            },
        ),
    );
    ctx.pool.spawn().await.expect("pool starts");
    // Wait until every worker consumes, so no call waits for a worker's start-up.
    let mut ready = Vec::new();
    for _ in 0..CONCURRENT_CALLERS {
        ready.push(ctx.pool.checkout().await.expect("checkout"));
    }
    for checkout in ready {
        let _ = checkout
            .publisher()
            .publish(
                "",
                "nowhere",
                Envelope::new("bench", "warm"),
                ctx.node.publisher.options(),
            )
            .await;
        checkout.checkin().await;
    }
    ctx.pool
}

async fn warren_call(pool: &ListenerPool) {
    pool.call(EXCHANGE, "ping", request(), TIMEOUT)
        .await
        .expect("warren call");
}

async fn concurrent_lapin() -> f64 {
    let mut clients = Vec::new();
    for i in 0..CONCURRENT_CALLERS {
        clients.push(Arc::new(
            LapinClient::connect(&format!("bench-rpc/lapin-{i}")).await,
        ));
    }
    let started = Instant::now();
    let per_caller = CONCURRENT_CALLS / CONCURRENT_CALLERS;
    futures::future::join_all(clients.iter().map(|client| async move {
        for _ in 0..per_caller {
            client.call().await;
        }
    }))
    .await;
    common::rate(per_caller * CONCURRENT_CALLERS, started.elapsed())
}

async fn concurrent_warren(pool: &ListenerPool) -> f64 {
    let started = Instant::now();
    let per_caller = CONCURRENT_CALLS / CONCURRENT_CALLERS;
    futures::future::join_all((0..CONCURRENT_CALLERS).map(|_| async move {
        for _ in 0..per_caller {
            warren_call(pool).await;
        }
    }))
    .await;
    common::rate(per_caller * CONCURRENT_CALLERS, started.elapsed())
}
