//! `cargo bench --bench rpc_target`: calls to an RPC target's group (address B,
//! `unicast.<topic>`) through warren — `ListenerPool::call_target`, its replies coming
//! to the pool's reply queue, answered by a warren `RpcServer` on the same node — against the same
//! exchange of messages done with raw lapin in the same run, on the local RabbitMQ.
//!
//! Both sides exchange the same messages with the same guarantees: the request JSON
//! (`Event-Category` `rpc`, `Event-Name` = the method, `Msg-ID`, `Args`) is published to
//! the durable topic exchange `openstack` with routing key `unicast.<topic>`, mandatory and
//! confirmed, with `message_id`, `reply_to` (the caller's own queue), `expiration`,
//! `content_type` and a W3C `traceparent` header (a new trace per call, as a warren call
//! outside any handler starts one); the server consumes the durable queue `unicast.<topic>` with manual
//! acks, decodes the request, publishes the reply (`Result` = the arguments) to the
//! default exchange with routing key = `reply_to`, mandatory and confirmed, with
//! `correlation_id` and the request's trace continued in its `traceparent`, and acks the request once the reply is confirmed; the caller awaits
//! the reply and the request's confirm together and checks the reply is its own. A nack
//! or a return on either side fails the bench (any panic ends the process). The lapin
//! side is written for speed: one connection per side, replies matched to callers by
//! `correlation_id` through one map, the server publishing inline and awaiting confirms
//! off its consume loop. Each side's lapin or warren server runs its own topic.
//!
//! The same calls also go over warren's AMQP 1.0 transport (`[rpc] transport = "amqp10"`)
//! in every round: a second warren node whose server and callers use AMQP 1.0 links to a
//! private RabbitMQ node with `rabbitmq_amqp1_0` (RabbitMQ's AMQP 1.0 plugin is not
//! enabled on the local broker), requests and replies pre-settled as the driver spec
//! says; reported beside the others with their ratio to lapin's 0-9-1 figures.
//!
//! Reports the p50 and p99 of sequential calls and the calls per second of 64 concurrent
//! callers, each the median of `common::rounds()` interleaved rounds with the spread; every
//! measured section runs in `tokio::spawn`ed tasks (callers as runtime tasks, as app code
//! runs). The last line is one JSON object: `{"bench":"rpc_target","warren":<p50 µs>,
//! "lapin":<p50 µs>,"ratio":<warren p50 / lapin p50>,"amqp10_p50":<µs>,
//! "amqp10_calls_per_sec":<calls/s>}`; the target is a ratio ≤ 1.15.

mod common;

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use warren_listeners::{Amqp10Server, AppContext, ListenerHandle, ListenerPool, RpcServer, Target};
use warren_runtime::config::{AppConfig, PoolConfig};
use warren_runtime::node::Node;
use warren_runtime::trace::TraceContext;

/// Sequential calls per side and round.
const SEQUENTIAL: usize = 2_000;
/// Concurrent callers (and requests a server handles at once).
const CALLERS: usize = 64;
/// Calls per concurrent caller and round.
const PER_CALLER: usize = 200;
/// The default `[rpc] exchange`.
const CONTROL: &str = "openstack";
const METHOD: &str = "echo";
const TIMEOUT: Duration = Duration::from_secs(10);

/// The arguments of call `i`: its number (checked in the reply) and some padding.
fn args(i: u64) -> Value {
    json!({"i": i, "pad": "x".repeat(100)})
}

#[tokio::main]
async fn main() {
    // A panic anywhere (a server task included) fails the bench instead of a hang.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::exit(101);
    }));
    let pid = std::process::id();
    let (warren_topic, lapin_topic) = (
        format!("bench-rpc-target-warren-{pid}"),
        format!("bench-rpc-target-lapin-{pid}"),
    );
    let node = common::start_node("rpc-target", "").await;
    let (ctx, servers) = start_warren(&node, &warren_topic).await;
    let pool = ctx.pool.clone();
    let lapin_server = start_lapin_server(&lapin_topic).await;
    let lapin = Arc::new(LapinClient::connect(&lapin_topic).await);
    let amqp10 = Amqp10Side::start(&format!("bench-rpc-target-amqp10-{pid}")).await;

    // Warm both paths up.
    for i in 0..200 {
        lapin.call(i).await;
        warren_call(&pool, &warren_topic, i).await;
        warren_target_call(&amqp10.pool, &amqp10.target, i).await;
    }
    let warren_target = Arc::new(Target::new(&warren_topic));
    let warren = {
        let (pool, target) = (pool.clone(), warren_target.clone());
        move |i: u64| {
            let (pool, target) = (pool.clone(), target.clone());
            async move { warren_target_call(&pool, &target, i).await }
        }
    };
    let raw = {
        let lapin = lapin.clone();
        move |i: u64| {
            let lapin = lapin.clone();
            async move { lapin.call(i).await }
        }
    };
    // Interleaved rounds: each side's sequential p50 (and p99), then its calls/s with
    // concurrent callers.
    let (mut p50s, mut p99s, mut rates) = (
        common::Rounds::default(),
        common::Rounds::default(),
        common::Rounds::default(),
    );
    // Warren over AMQP 1.0 against the same lapin figures.
    let (mut amqp10_p50s, mut amqp10_rates) =
        (common::Rounds::default(), common::Rounds::default());
    let over_amqp10 = {
        let (pool, target) = (amqp10.pool.clone(), amqp10.target.clone());
        move |i: u64| {
            let (pool, target) = (pool.clone(), target.clone());
            async move { warren_target_call(&pool, &target, i).await }
        }
    };
    for round in 1..=common::rounds() {
        let ((warren_p50, warren_p99), (lapin_p50, lapin_p99)) = common::in_turn(
            round,
            async { percentiles(sequential(warren.clone()).await) },
            async { percentiles(sequential(raw.clone()).await) },
        )
        .await;
        p50s.push(round, "µs p50", warren_p50, lapin_p50);
        p99s.push(round, "µs p99", warren_p99, lapin_p99);
        let (warren_rate, lapin_rate) =
            common::in_turn(round, concurrent(warren.clone()), concurrent(raw.clone())).await;
        rates.push(round, "calls/s", warren_rate, lapin_rate);
        let (amqp10_p50, _) = percentiles(sequential(over_amqp10.clone()).await);
        amqp10_p50s.push(
            round,
            "µs p50 (warren over AMQP 1.0)",
            amqp10_p50,
            lapin_p50,
        );
        let amqp10_rate = concurrent(over_amqp10.clone()).await;
        amqp10_rates.push(
            round,
            "calls/s (warren over AMQP 1.0)",
            amqp10_rate,
            lapin_rate,
        );
    }
    p99s.report("rpc_target_p99");
    rates.report("rpc_target_calls_per_sec_64");
    let extra = format!(
        ",\"amqp10_p50\":{:.1},\"amqp10_calls_per_sec\":{:.1}",
        amqp10_p50s.warren_median(),
        amqp10_rates.warren_median()
    );
    amqp10_p50s.report("rpc_target_amqp10");
    amqp10_rates.report("rpc_target_amqp10_calls_per_sec_64");
    amqp10.stop().await;

    pool.stop().await;
    for server in servers {
        let _ = server.stop().await;
    }
    let server_name = node.context().node.clone();
    let _ = node.stop().await;
    clean_up(&warren_topic, &server_name, &lapin_topic).await;
    drop(lapin_server);
    p50s.report_with("rpc_target", &extra);
}

/// The AMQP 1.0 side: a private RabbitMQ node with `rabbitmq_amqp1_0`, a warren node on it
/// with `[rpc] transport = "amqp10"`, its echo server's three links and a pool to call
/// through (calls over AMQP 1.0 take no worker: the node's reply link takes the replies).
struct Amqp10Side {
    broker: warren_test_support::BrokerNode,
    node: Node,
    server: Amqp10Server,
    pool: ListenerPool,
    target: Arc<Target>,
}

impl Amqp10Side {
    async fn start(topic: &str) -> Amqp10Side {
        let broker = tokio::task::spawn_blocking(|| {
            warren_test_support::BrokerNode::start_with_plugins(&["rabbitmq_amqp1_0"], &[])
        })
        .await
        .expect("the broker start")
        .expect("a node with rabbitmq_amqp1_0");
        let port = broker.amqp_port();
        let text = format!(
            "[service]\nnode = \"bench-amqp10-{}\"\n[zones.local]\nbrokers = [\"{}\"]\n\
             amqp10_brokers = [\"amqp10://guest:guest@127.0.0.1:{port}\"]\n\
             [rpc]\ntransport = \"amqp10\"\n",
            std::process::id(),
            broker.uri()
        );
        let config = warren_runtime::config::Config::parse(
            &text,
            std::path::Path::new("bench.ini"),
            &[],
            None,
        )
        .expect("bench config");
        let node = Node::start(config, |_| Vec::new())
            .await
            .expect("node starts");
        let server = RpcServer::new(topic)
            .concurrency(CALLERS)
            .method(METHOD, |args: Value| async move { Ok(args) });
        let server = Amqp10Server::start(server, node.context()).expect("the server starts");
        assert!(server.attached(TIMEOUT).await, "the server's links attach");
        let ctx = AppContext::with_version(
            "bench",
            node.context().clone(),
            AppConfig::new("bench", node.context().pool),
        );
        Amqp10Side {
            broker,
            node,
            server,
            pool: ctx.pool,
            target: Arc::new(Target::new(topic)),
        }
    }

    async fn stop(self) {
        self.server.stop(TIMEOUT).await;
        let _ = self.node.stop().await;
        drop(self.broker);
    }
}

/// `SEQUENTIAL` calls one after the other in one runtime task; their latencies in µs.
async fn sequential<F, Fut>(call: F) -> Vec<f64>
where
    F: Fn(u64) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let task = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(SEQUENTIAL);
        for i in 0..SEQUENTIAL as u64 {
            let started = Instant::now();
            call(i).await;
            latencies.push(started.elapsed().as_secs_f64() * 1e6);
        }
        latencies
    });
    task.await.expect("the sequential caller")
}

/// `CALLERS` runtime tasks making `PER_CALLER` calls each; calls per second.
async fn concurrent<F, Fut>(call: F) -> f64
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let started = Instant::now();
    let callers: Vec<_> = (0..CALLERS)
        .map(|caller| {
            let call = call.clone();
            tokio::spawn(async move {
                for k in 0..PER_CALLER {
                    call((caller * PER_CALLER + k) as u64).await;
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.expect("a concurrent caller");
    }
    common::rate(CALLERS * PER_CALLER, started.elapsed())
}

/// (p50, p99) in microseconds.
fn percentiles(mut values: Vec<f64>) -> (f64, f64) {
    values.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| values[((values.len() as f64 * q) as usize).min(values.len() - 1)];
    (at(0.50), at(0.99))
}

/// The warren side: an `RpcServer` of `topic` (echo: returns its arguments) and a pool
/// whose reply queue consumes (calls take no worker).
async fn start_warren(node: &Node, topic: &str) -> (AppContext, Vec<ListenerHandle>) {
    let ctx = AppContext::with_version(
        "bench",
        node.context().clone(),
        AppConfig::new(
            "bench",
            PoolConfig {
                size: 1,
                overflow: 0,
                checkout_timeout: TIMEOUT,
                idle_timeout: Duration::from_secs(60),
            },
        ),
    );
    let server = RpcServer::new(topic)
        .concurrency(CALLERS)
        .method(METHOD, |args: Value| async move { Ok(args) });
    let servers = warren_listeners::spawn_rpc_server(server, &ctx)
        .await
        .expect("the RPC server starts");
    for server in &servers {
        assert!(
            server.wait_consuming(true, TIMEOUT).await,
            "{} consumes",
            server.name()
        );
    }
    ctx.pool.spawn().await.expect("pool starts");
    // The first call starts the pool's reply queue: no measured call waits for it.
    warren_call(&ctx.pool, topic, 0).await;
    (ctx, servers)
}

async fn warren_call(pool: &ListenerPool, topic: &str, i: u64) {
    warren_target_call(pool, &Target::new(topic), i).await;
}

/// One call through the pool; its result must echo call `i`.
async fn warren_target_call(pool: &ListenerPool, target: &Target, i: u64) {
    let result = pool
        .call_target(target, METHOD, args(i), TIMEOUT)
        .await
        .unwrap_or_else(|error| panic!("warren call {i}: {error}"));
    assert_eq!(result["i"], i, "the reply to call {i}");
}

/// A request as the README's wire format has it.
#[derive(serde::Serialize)]
struct RequestOut<'a> {
    #[serde(rename = "Event-Category")]
    category: &'static str,
    #[serde(rename = "Event-Name")]
    name: &'static str,
    #[serde(rename = "Msg-ID")]
    msg_id: &'a str,
    #[serde(rename = "Args")]
    args: Value,
}

/// A request as the lapin server reads it.
#[derive(serde::Deserialize)]
struct RequestIn<'a> {
    #[serde(rename = "Event-Category", borrow)]
    category: Cow<'a, str>,
    #[serde(rename = "Event-Name", borrow)]
    name: Cow<'a, str>,
    #[serde(rename = "Msg-ID", borrow, default)]
    msg_id: Option<Cow<'a, str>>,
    #[serde(rename = "Args", default)]
    args: Value,
}

/// A reply as the lapin server writes it.
#[derive(serde::Serialize)]
struct ReplyOut<'a> {
    #[serde(rename = "Event-Category")]
    category: &'static str,
    #[serde(rename = "Event-Name")]
    name: &'static str,
    #[serde(rename = "Msg-ID")]
    msg_id: &'a str,
    #[serde(rename = "Result", skip_serializing_if = "Option::is_none")]
    result: Option<&'a Value>,
    #[serde(rename = "Failure", skip_serializing_if = "Option::is_none")]
    failure: Option<Value>,
}

/// A reply as the lapin client reads it: the echoed call number.
#[derive(serde::Deserialize)]
struct ReplyIn {
    #[serde(rename = "Result")]
    result: Option<Echoed>,
    #[serde(rename = "Failure")]
    failure: Option<Value>,
}

#[derive(serde::Deserialize)]
struct Echoed {
    i: u64,
}

fn json_properties() -> BasicProperties {
    BasicProperties::default().with_content_type(ShortString::from("application/json"))
}

/// The B queue of `topic` as warren's server declares it: durable, no arguments, bound to
/// the durable topic exchange `openstack` with its name.
async fn declare_group_queue(channel: &Channel, queue: &str) {
    channel
        .exchange_declare(
            CONTROL.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the control exchange");
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    common::declare_queue(channel, queue, durable).await;
    common::bind(channel, queue, CONTROL, queue).await;
}

/// The raw lapin server of `topic`: consumes `unicast.<topic>` (prefetch `CALLERS`),
/// answers each request with its arguments and acks it once the reply is confirmed.
async fn start_lapin_server(topic: &str) -> Connection {
    let connection = common::connect("bench-rpc-target/lapin-server").await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let queue = format!("unicast.{topic}");
    declare_group_queue(&channel, &queue).await;
    let prefetch = u16::try_from(CALLERS).expect("a prefetch");
    let mut requests = common::consume_acked(&channel, &queue, "lapin-server", prefetch).await;
    tokio::spawn(async move {
        while let Some(delivery) = requests.next().await {
            let delivery = delivery.expect("a request delivery");
            let properties = &delivery.properties;
            let reply_to = properties
                .reply_to()
                .as_ref()
                .expect("a call has reply_to")
                .to_string();
            let request: RequestIn =
                serde_json::from_slice(&delivery.data).expect("a request body");
            assert_eq!(request.category, "rpc", "a request");
            let msg_id = properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string())
                .or_else(|| request.msg_id.map(Cow::into_owned))
                .expect("a request id");
            let reply = if request.name == METHOD {
                ReplyOut {
                    category: "rpc",
                    name: "reply",
                    msg_id: &msg_id,
                    result: Some(&request.args),
                    failure: None,
                }
            } else {
                let message = format!("the server has no method `{}`", request.name);
                ReplyOut {
                    category: "rpc",
                    name: "reply",
                    msg_id: &msg_id,
                    result: None,
                    failure: Some(json!({"type": "UnknownMethod", "message": message})),
                }
            };
            let body = serde_json::to_vec(&reply).expect("a reply body");
            let trace = TraceContext::from_properties(properties)
                .unwrap_or_else(TraceContext::new_root)
                .child();
            let properties =
                trace.inject(json_properties().with_correlation_id(msg_id.as_str().into()));
            let confirm = channel
                .basic_publish(
                    "".into(),
                    reply_to.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    properties,
                )
                .await
                .expect("the reply is published");
            let (channel, tag) = (channel.clone(), delivery.delivery_tag);
            tokio::spawn(async move {
                match confirm.await {
                    Ok(lapin::Confirmation::Ack(None)) => {}
                    other => panic!("a lapin reply was not confirmed as routed: {other:?}"),
                }
                channel
                    .basic_ack(tag, BasicAckOptions::default())
                    .await
                    .expect("the request is acked");
            });
        }
    });
    connection
}

/// Callers waiting for their replies, by request id.
type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>>;

/// The raw lapin caller shared by every caller task: one connection, one confirmed
/// channel, its own exclusive reply queue, replies handed to their callers by
/// `correlation_id`.
struct LapinClient {
    _connection: Connection,
    channel: Channel,
    queue: String,
    routing_key: String,
    waiting: Waiting,
}

impl LapinClient {
    async fn connect(topic: &str) -> LapinClient {
        let connection = common::connect("bench-rpc-target/lapin-client").await;
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        let queue = channel
            .queue_declare("".into(), exclusive, FieldTable::default())
            .await
            .expect("the reply queue")
            .name()
            .to_string();
        let mut replies = common::consume_no_ack(&channel, &queue, "replies").await;
        let waiting: Waiting = Arc::default();
        let dispatch = waiting.clone();
        tokio::spawn(async move {
            while let Some(delivery) = replies.next().await {
                let delivery = delivery.expect("a reply delivery");
                let id = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .expect("a reply has correlation_id")
                    .to_string();
                let Some(caller) = dispatch.lock().remove(&id) else {
                    panic!("a reply to no waiting call: {id}");
                };
                let _ = caller.send(delivery.data);
            }
        });
        LapinClient {
            _connection: connection,
            channel,
            queue,
            routing_key: format!("unicast.{topic}"),
            waiting,
        }
    }

    /// Call `i`: the request mandatory and confirmed (a nack or a return fails the bench),
    /// its reply and the confirm awaited together; the reply must echo `i`.
    async fn call(&self, i: u64) {
        let msg_id = warren_runtime::envelope::new_msg_id();
        let body = serde_json::to_vec(&RequestOut {
            category: "rpc",
            name: METHOD,
            msg_id: &msg_id,
            args: args(i),
        })
        .expect("a request body");
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().insert(msg_id.clone(), tx);
        let properties = json_properties()
            .with_message_id(msg_id.as_str().into())
            .with_reply_to(self.queue.as_str().into())
            .with_expiration(ShortString::from(TIMEOUT.as_millis().to_string()));
        let properties = TraceContext::new_root().child().inject(properties);
        let confirm = self
            .channel
            .basic_publish(
                CONTROL.into(),
                self.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            )
            .await
            .expect("the request is published");
        let reply = async {
            tokio::time::timeout(TIMEOUT, rx)
                .await
                .unwrap_or_else(|_| panic!("no reply to lapin call {i} within {TIMEOUT:?}"))
                .expect("the reply dispatcher lives")
        };
        let (confirmed, reply) = tokio::join!(confirm, reply);
        match confirmed {
            Ok(lapin::Confirmation::Ack(None)) => {}
            other => panic!("a lapin request was not confirmed as routed: {other:?}"),
        }
        let reply: ReplyIn = serde_json::from_slice(&reply).expect("a reply body");
        match (reply.result, reply.failure) {
            (Some(echoed), None) => assert_eq!(echoed.i, i, "the reply to lapin call {i}"),
            (_, failure) => panic!("lapin call {i} failed: {failure:?}"),
        }
    }
}

/// Deletes what both sides declared (the group queues have no expiry).
async fn clean_up(warren_topic: &str, server: &str, lapin_topic: &str) {
    let (connection, channel) = common::setup_channel("bench-rpc-target/clean-up").await;
    for queue in [
        format!("unicast.{warren_topic}"),
        format!("exclusive.{warren_topic}.{server}"),
        format!("/broadcast/{warren_topic}.{server}"),
        format!("unicast.{lapin_topic}"),
    ] {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = channel
        .exchange_delete(
            format!("/broadcast/{warren_topic}").as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = connection.close(200, "done".into()).await;
}
