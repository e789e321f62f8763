//! Shared by the benchmarks: the broker to use, pre-publishing fixed-size envelopes, rates,
//! and the one JSON line each benchmark ends with.

#![allow(dead_code)]

use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use warren_runtime::envelope::{Envelope, publish_properties};

/// A RabbitMQ node of the bench's own with an `amqps://` listener, for both sides over
/// TLS (env WARREN_BENCH_TLS=1), and the certificates it was made with.
pub struct TlsBroker {
    certs: warren_test_support::TestCerts,
    node: warren_test_support::BrokerNode,
}

static TLS: std::sync::Mutex<Option<TlsBroker>> = std::sync::Mutex::new(None);

/// Whether the benchmark runs over TLS (WARREN_BENCH_TLS=1).
pub fn over_tls() -> bool {
    std::env::var("WARREN_BENCH_TLS").is_ok_and(|v| v == "1")
}

/// Starts the TLS node when the benchmark runs over TLS (call first, off the async
/// workers or before they are busy).
pub fn start_tls() {
    if !over_tls() {
        return;
    }
    let certs = warren_test_support::TestCerts::generate().expect("bench certificates");
    let node = warren_test_support::BrokerNode::start_tls(&certs, "server", false)
        .expect("a TLS RabbitMQ node for the bench");
    *TLS.lock().unwrap_or_else(|e| e.into_inner()) = Some(TlsBroker { certs, node });
}

/// Kills the TLS node (the end of a benchmark run over TLS).
pub fn stop_tls() {
    if let Some(mut tls) = TLS.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = tls.node.kill();
    }
}

/// The CA file of the TLS node, when the benchmark runs over TLS.
fn tls_ca() -> Option<std::path::PathBuf> {
    let tls = TLS.lock().unwrap_or_else(|e| e.into_inner());
    tls.as_ref().map(|tls| tls.certs.path("ca.pem"))
}

/// The broker the benchmarks run against (env WARREN_BENCH_AMQP_URI overrides; the TLS
/// node's when over TLS).
pub fn broker_uri() -> String {
    if let Some(tls) = TLS.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return tls.node.tls_uri();
    }
    std::env::var("WARREN_BENCH_AMQP_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

pub async fn connect(name: &str) -> Connection {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let connected = match tls_ca() {
        Some(ca) => {
            let tls = lapin::tcp::OwnedTLSConfig {
                identity: None,
                cert_chain: Some(std::fs::read_to_string(ca).expect("the bench CA")),
            };
            let runtime = lapin::runtime::default_runtime().expect("a tokio runtime");
            Connection::connect_with_config(&broker_uri(), properties, tls, runtime).await
        }
        None => Connection::connect(&broker_uri(), properties).await,
    };
    connected.expect("the benchmark needs RabbitMQ at 127.0.0.1:5672 (scripts/ensure-rabbitmq)")
}

/// An envelope whose encoded body is exactly `size` bytes.
pub fn envelope_of_size(category: &str, name: &str, i: usize, size: usize) -> Vec<u8> {
    let mut envelope = Envelope::new(category, name)
        .with("Msg-ID", format!("{i:032x}"))
        .with("App-Name", "bench")
        .with("App-Version", "1")
        .with("Node", "bench@localhost")
        .with("Payload", "");
    let base = envelope.encode().len();
    envelope.set("Payload", "x".repeat(size.saturating_sub(base)));
    let body = envelope.encode();
    assert_eq!(body.len(), size, "envelope size");
    body
}

/// Messages per round in the consume and publish benchmarks, so their figures compare.
pub const MESSAGES: usize = 200_000;
/// The encoded size of each benchmark envelope, in bytes.
pub const SIZE: usize = 256;
/// Rounds per benchmark, interleaved (see [`in_turn`]); the median is reported with the
/// spread, so one or two noisy rounds cannot move the figure. `WARREN_BENCH_ROUNDS`
/// asks for more on a noisy machine (never fewer than [`MIN_ROUNDS`]).
pub const ROUNDS: usize = 7;
/// The fewest rounds a micro-benchmark's median is taken over.
pub const MIN_ROUNDS: usize = 5;

/// The rounds to run: `WARREN_BENCH_ROUNDS` if set (at least [`MIN_ROUNDS`]), else
/// [`ROUNDS`].
pub fn rounds() -> usize {
    match std::env::var("WARREN_BENCH_ROUNDS") {
        Ok(value) => match value.trim().parse::<usize>() {
            Ok(rounds) => rounds.max(MIN_ROUNDS),
            Err(_) => panic!("WARREN_BENCH_ROUNDS must be a number of rounds, not {value:?}"),
        },
        Err(_) => ROUNDS,
    }
}

/// A set-up connection and a channel on it.
pub async fn setup_channel(name: &str) -> (Connection, Channel) {
    let connection = connect(name).await;
    let channel = connection.create_channel().await.expect("channel");
    (connection, channel)
}

/// Declares a topic exchange and a queue bound to it with `#`, empty.
pub async fn fresh_queue(channel: &Channel, exchange: &str, queue: &str) {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("exchange");
    recreate_queue(channel, exchange, queue).await;
    channel
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await
        .expect("purge");
}

/// How long a bench's queue outlives a run that was interrupted before deleting it
/// (RabbitMQ's `x-expires`: unused, no consumer and not declared again, for this long).
/// Far longer than any round, in which the queue is declared again or consumed.
pub const ABANDONED_QUEUE_EXPIRY: Duration = Duration::from_secs(600);

/// A name of this run's own (an exchange, a queue, a file): `base` and the process id. A
/// bench publishes to an exchange of its run, so that a queue left behind by an interrupted
/// run (bound to that run's exchange) never receives this run's messages: a stale queue
/// bound to a shared exchange took a copy of every later message, and its growing backlog
/// slowed the broker for every run after it.
pub fn of_this_run(base: &str) -> String {
    format!("{base}-{}", std::process::id())
}

/// Deletes `queue`, declares it again (expiring [`ABANDONED_QUEUE_EXPIRY`] after its run
/// stops using it) and binds it to `exchange` with `#`.
pub async fn recreate_queue(channel: &Channel, exchange: &str, queue: &str) {
    let _ = channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let mut arguments = FieldTable::default();
    let expiry = u32::try_from(ABANDONED_QUEUE_EXPIRY.as_millis()).unwrap_or(u32::MAX);
    arguments.insert("x-expires".into(), AMQPValue::LongUInt(expiry));
    channel
        .queue_declare(queue.into(), QueueDeclareOptions::default(), arguments)
        .await
        .expect("queue");
    bind(channel, queue, exchange, "#").await;
}

/// Declares `queue` with `options` and no arguments.
pub async fn declare_queue(channel: &Channel, queue: &str, options: QueueDeclareOptions) {
    channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await
        .expect("queue");
}

/// Binds `queue` to `exchange` with `key`.
pub async fn bind(channel: &Channel, queue: &str, exchange: &str, key: &str) {
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

/// Consumes `queue` with manual acks, at most `prefetch` unacked.
pub async fn consume_acked(
    channel: &Channel,
    queue: &str,
    tag: &str,
    prefetch: u16,
) -> lapin::Consumer {
    channel
        .basic_qos(prefetch, lapin::options::BasicQosOptions::default())
        .await
        .expect("qos");
    channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume")
}

/// Consumes `queue` without acks.
pub async fn consume_no_ack(channel: &Channel, queue: &str, tag: &str) -> lapin::Consumer {
    let options = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    channel
        .basic_consume(queue.into(), tag.into(), options, FieldTable::default())
        .await
        .expect("consume")
}

/// Publishes `count` envelopes of `size` bytes (confirmed, pipelined).
pub async fn prepublish(channel: &Channel, exchange: &str, count: usize, size: usize) {
    let messages = (0..count).map(|i| {
        (
            "bench".to_string(),
            envelope_of_size("bench", "msg", i, size),
        )
    });
    publish_all(channel, exchange, messages).await;
}

/// Publishes (routing key, body) pairs with confirms, 1000 in flight at a time.
pub async fn publish_all(
    channel: &Channel,
    exchange: &str,
    messages: impl Iterator<Item = (String, Vec<u8>)>,
) {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut confirms = Vec::with_capacity(1000);
    for (routing_key, body) in messages {
        confirms.push(
            channel
                .basic_publish(
                    exchange.into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    publish_properties(false),
                )
                .await
                .expect("publish"),
        );
        if confirms.len() == 1000 {
            for confirm in confirms.drain(..) {
                expect_ack(confirm).await;
            }
        }
    }
    for confirm in confirms {
        expect_ack(confirm).await;
    }
}

/// Waits for a publisher confirm; a nack (a message the broker lost) stops the bench.
pub async fn expect_ack(confirm: lapin::PublisherConfirm) {
    match confirm.await {
        Ok(lapin::Confirmation::Ack(_)) => {}
        Ok(lapin::Confirmation::Nack(_)) => panic!("the broker nacked a publish"),
        Ok(lapin::Confirmation::NotRequested) => panic!("publish on a channel without confirms"),
        Err(error) => panic!("no confirm: {error}"),
    }
}

/// Messages per second.
pub fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

/// The middle value.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// Runs one round of both sides, one after the other: lapin first in odd rounds, warren
/// first in even ones, so that neither side always runs on a broker the other has just
/// loaded (the second run of a pair was measurably slower on a busy broker). Gives
/// `(warren, lapin)`.
pub async fn in_turn<W, L>(
    round: usize,
    warren: impl std::future::Future<Output = W>,
    lapin: impl std::future::Future<Output = L>,
) -> (W, L) {
    if round % 2 == 1 {
        let lapin = lapin.await;
        (warren.await, lapin)
    } else {
        let warren = warren.await;
        (warren, lapin.await)
    }
}

/// The figures of every round, for both sides. The ratio reported is the median of the
/// per-round ratios (each round pairs the two sides back to back, so a slow spell of the
/// broker hits both); the medians of each side are reported beside it.
#[derive(Default)]
pub struct Rounds {
    warren: Vec<f64>,
    lapin: Vec<f64>,
}

impl Rounds {
    /// Records one round's figures (and prints them in `unit`).
    pub fn push(&mut self, round: usize, unit: &str, warren: f64, lapin: f64) {
        eprintln!("round {round}: lapin {lapin:.1} {unit}, warren {warren:.1} {unit}");
        self.warren.push(warren);
        self.lapin.push(lapin);
    }

    /// The lapin side's figure of every round.
    pub fn lapin_rates(&self) -> Vec<f64> {
        self.lapin.clone()
    }

    /// The median of the warren side's figures.
    pub fn warren_median(&self) -> f64 {
        median(self.warren.clone())
    }

    /// The median of the per-round ratios (warren / lapin).
    pub fn ratio(&self) -> f64 {
        median(
            self.warren
                .iter()
                .zip(&self.lapin)
                .map(|(w, l)| w / l)
                .collect(),
        )
    }

    /// Prints the medians with their spread, then the last line: the medians and the
    /// median of the per-round ratios (warren / lapin).
    pub fn report(self, bench: &str) {
        self.report_with(bench, "");
    }

    /// As [`Rounds::report`], with `extra` (`,"key":value…`) added to the JSON object.
    pub fn report_with(self, bench: &str, extra: &str) {
        let spread = |values: &[f64]| {
            let min = values.iter().copied().fold(f64::INFINITY, f64::min);
            let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!("{min:.1}–{max:.1}")
        };
        let (warren_spread, lapin_spread) = (spread(&self.warren), spread(&self.lapin));
        let ratios: Vec<f64> = self
            .warren
            .iter()
            .zip(&self.lapin)
            .map(|(w, l)| w / l)
            .collect();
        let ratio_min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let ratio_max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let rounds = ratios.len();
        let ratio = median(ratios);
        let (warren, lapin) = (median(self.warren), median(self.lapin));
        eprintln!(
            "{bench} over {rounds} rounds: warren {warren:.0} ({warren_spread}), lapin {lapin:.0} ({lapin_spread}); \
             ratio {ratio:.3} (median of the rounds; of the medians {:.3}), per round {ratio_min:.3}–{ratio_max:.3}",
            warren / lapin
        );
        println!(
            "{{\"bench\":\"{bench}\",\"warren\":{warren:.1},\"lapin\":{lapin:.1},\"ratio\":{ratio:.3}{extra}}}"
        );
    }
}

/// A global allocator that counts allocations while counting is on, for allocations per
/// message: a bench declares `#[global_allocator] static A: common::Counting =
/// common::Counting;` and measures in rounds of their own (timed rounds run with counting
/// off, at the cost of one relaxed load per allocation).
pub struct Counting;

static COUNTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static ALLOCATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Allocations (and reallocations) made while `work` ran, with [`Counting`] as the global
/// allocator (by every thread: run nothing else meanwhile).
pub async fn allocations_during<T>(work: impl std::future::Future<Output = T>) -> (T, u64) {
    use std::sync::atomic::Ordering;
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
    let value = work.await;
    COUNTING.store(false, Ordering::Relaxed);
    (value, ALLOCATIONS.load(Ordering::Relaxed) - before)
}

fn count() {
    use std::sync::atomic::Ordering;
    if COUNTING.load(Ordering::Relaxed) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        count();
        // SAFETY: as above.
        unsafe { std::alloc::System.realloc(ptr, layout, size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: as above.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

/// CPU time this process has used so far (user + system, every thread).
pub fn process_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// Deletes a benchmark's queue at the end (best effort).
pub async fn delete_queue(channel: &Channel, queue: &str) {
    let _ = channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
}

/// Deletes this run's `exchange` (see [`of_this_run`]) at its end.
pub async fn delete_exchange(channel: &Channel, exchange: &str) {
    let _ = channel
        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await;
}

/// Config text that turns a bench node's metrics on, as in production: the HTTP endpoint
/// on a port the system picks (histograms are observed only when it is on).
pub const METRICS_ON: &str = "[http]\nlisten = \"127.0.0.1:0\"\n";

/// The price of metrics on the hot path: the same warren side run with metrics on and
/// off in each round, back to back (the order alternating), reported as the median of
/// the per-round ratios (on / off).
#[derive(Default)]
pub struct MetricsCost {
    on: Vec<f64>,
    off: Vec<f64>,
}

impl MetricsCost {
    /// Records one round (and prints it).
    pub fn push(&mut self, round: usize, unit: &str, on: f64, off: f64) {
        eprintln!(
            "round {round}: warren with metrics {on:.1} {unit}, without {off:.1} {unit} ({:.3})",
            on / off
        );
        self.on.push(on);
        self.off.push(off);
    }

    /// `,"warren_no_metrics":…,"ratio_metrics":…` for the bench's JSON line, and a line
    /// with the spread on stderr.
    pub fn json(&self) -> String {
        let ratios: Vec<f64> = self.on.iter().zip(&self.off).map(|(a, b)| a / b).collect();
        let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let ratio = median(ratios);
        let off = median(self.off.clone());
        eprintln!(
            "metrics on / off: {ratio:.3} (median of the rounds), per round {min:.3}–{max:.3}"
        );
        format!(",\"warren_no_metrics\":{off:.1},\"ratio_metrics\":{ratio:.3}")
    }
}

/// A node with no apps for a benchmark; `extra` is more config.ini text.
pub async fn start_node(label: &str, extra: &str) -> warren_runtime::node::Node {
    let tls = tls_ca()
        .map(|ca| format!("[tls]\nca_file = \"{}\"\n", ca.display()))
        .unwrap_or_default();
    let text = format!(
        "[service]\nnode = \"bench-{label}-{}\"\n{extra}\n{tls}[zones.local]\nbrokers = [\"{}\"]\n",
        std::process::id(),
        broker_uri()
    );
    let config =
        warren_runtime::config::Config::parse(&text, std::path::Path::new("bench.ini"), &[], None)
            .expect("bench config");
    warren_runtime::node::Node::start(config, |_| Vec::new())
        .await
        .expect("node starts")
}

/// What the lapin consumer reads of each delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reads {
    /// Nothing: it only counts and acks (a drain, not a consumer of envelopes).
    Nothing,
    /// The two headers a consumer of kapi envelopes dispatches on (Event-Category and
    /// Event-Name), borrowed from the body by one `serde_json` pass: the least a
    /// hand-written consumer does to know what a message is, as warren's listener must.
    Routing,
}

/// The headers a hand-written consumer dispatches on, borrowed from the body.
#[derive(serde::Deserialize)]
struct Routing<'a> {
    #[serde(rename = "Event-Category", borrow)]
    category: std::borrow::Cow<'a, str>,
    #[serde(rename = "Event-Name", borrow)]
    name: std::borrow::Cow<'a, str>,
}

/// Whether `body` is an envelope a consumer can dispatch (both headers there).
fn dispatches(body: &[u8]) -> bool {
    serde_json::from_slice::<Routing>(body)
        .is_ok_and(|routing| !routing.category.is_empty() && !routing.name.is_empty())
}

/// The fastest plain lapin consumer: manual acks coalesced with `multiple = true` (it
/// takes every delivery already there, then acks them all at once, and at least every
/// quarter of the prefetch), reading what `reads` says of each delivery (a delivery that
/// does not read as a bench envelope stops the bench). Consumes `count` messages;
/// messages per second from the first delivery to the last ack.
pub async fn fast_lapin_consumer(queue: &str, count: usize, prefetch: u16, reads: Reads) -> f64 {
    use futures::{FutureExt, StreamExt};
    use lapin::options::BasicAckOptions;

    let connection = connect("bench/lapin-consumer").await;
    let channel = connection.create_channel().await.expect("channel");
    let mut consumer = consume_acked(&channel, queue, "bench-lapin", prefetch).await;
    let tag = |item: Option<lapin::Result<lapin::message::Delivery>>| {
        let delivery = item.expect("stream open").expect("delivery");
        if reads == Reads::Routing {
            assert!(dispatches(&delivery.data), "an envelope with both headers");
        }
        delivery.delivery_tag
    };
    let ack = |tag: u64| {
        let channel = channel.clone();
        async move {
            channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await
                .expect("ack");
        }
    };
    let batch = usize::from(prefetch / 4).max(1);
    let mut started = None;
    let mut received = 0;
    while received < count {
        let mut last = tag(consumer.next().await);
        started.get_or_insert_with(std::time::Instant::now);
        received += 1;
        let mut unacked = 1;
        while received < count {
            let Some(item) = consumer.next().now_or_never() else {
                break;
            };
            last = tag(item);
            received += 1;
            unacked += 1;
            if unacked == batch {
                ack(last).await;
                unacked = 0;
            }
        }
        if unacked > 0 {
            ack(last).await;
        }
    }
    let elapsed = started.map_or(Duration::ZERO, |s| s.elapsed());
    let _ = connection.close(200, "done".into()).await;
    rate(count, elapsed)
}
