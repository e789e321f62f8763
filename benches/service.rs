//! `cargo bench --bench service`: the whole service as a user runs it. The real `warren`
//! binary with the shipped config.ini (apps/echo) against a hand-written lapin echo service
//! written for speed (the reply confirmed before the request is acked, acks coalesced with
//! `multiple`), each its own process, one at a time against the local broker, driven by
//! the same raw-lapin load generator, in interleaved rounds.
//!
//! Both services send the same messages in each pair compared. warren as shipped writes a
//! W3C `traceparent` on every reply (the request's trace, or a new one), and RabbitMQ
//! decodes the headers table of every message that has one, on the cores the services
//! share with it; so it runs against a lapin echo that writes the same header
//! (`lapin-traced`), and warren with `[publisher] new_traces = false` (no header on replies
//! to untraced requests: the generator sends none) against the bare lapin echo. Each pair
//! is reported, the first one as the headline.
//!
//! Figures per side and round:
//!
//! - (a) one caller, sequential calls: p50 and p99;
//! - (b) 64 concurrent callers for a fixed time: calls/s, p50, p99, and the service
//!   process's CPU time per 1,000 calls (from /proc) and its resident memory;
//! - (c) requests queued while the service is stopped, then drained: msg/s from the first
//!   reply to the last.
//!
//! Every reply is checked (Msg-ID and Payload; a wrong one stops the bench); replies that
//! do not come in time are counted as missing and must be none (reported, then asserted).
//! Medians and spreads (min–max) are printed; the last line is one JSON object:
//! `{"bench":"service","warren":<(b) calls/s>,"lapin":<(b) calls/s>,"ratio":…, …}` with
//! the other figures in the same object.
//!
//! Env: WARREN_BENCH_ROUNDS (default 3), WARREN_BENCH_SECONDS ((b) per round, default 20),
//! WARREN_BENCH_SEQUENTIAL ((a), default 5000), WARREN_BENCH_BACKLOG ((c), default 100000).
//! The bench binary is also the lapin echo service when WARREN_BENCH_ROLE=lapin-echo.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, ExchangeKind};
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::oneshot;
use warren_runtime::envelope::{Envelope, publish_properties};
use warren_runtime::trace::TraceContext;

/// The echo app's exchange, routing key and queue, as shipped.
const EXCHANGE: &str = "echo";
const ROUTING_KEY: &str = "echo.req";
const QUEUE: &str = "echo";
/// The shipped `[amqp] prefetch`; the lapin service uses the same.
const PREFETCH: u16 = 50;
const CALLERS: usize = 64;
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    if std::env::var("WARREN_BENCH_ROLE").as_deref() == Ok("lapin-echo") {
        return lapin_echo_service().await;
    }
    let rounds = env_number("WARREN_BENCH_ROUNDS", 3);
    let seconds = env_number("WARREN_BENCH_SECONDS", 20) as u64;
    let sequential = env_number("WARREN_BENCH_SEQUENTIAL", 5_000);
    let backlog = env_number("WARREN_BENCH_BACKLOG", 100_000);

    let generator = Generator::connect().await;
    let mut figures: HashMap<Side, Vec<Round>> = HashMap::new();
    for round in 1..=rounds {
        // Each round starts with the next side, so that no side always runs first.
        let mut sides = Side::ALL;
        sides.rotate_left((round - 1) % Side::ALL.len());
        for side in sides {
            let figure = generator
                .round(side, sequential, Duration::from_secs(seconds), backlog)
                .await;
            eprintln!("round {round} {}: {figure}", side.name());
            figures.entry(side).or_default().push(figure);
        }
    }
    let missing = generator.missing.load(Ordering::Relaxed);
    eprintln!("missing replies: {missing}");
    report(&figures, missing);
    assert_eq!(missing, 0, "requests without a reply");
}

/// A service under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Side {
    /// `warren run` with the shipped config.ini: a `traceparent` on every reply.
    Warren,
    /// The lapin echo writing the same `traceparent` on every reply.
    LapinTraced,
    /// `warren run` with the shipped config.ini and `[publisher] new_traces = false`.
    WarrenUntraced,
    /// The lapin echo, replies without headers.
    Lapin,
}

/// The pairs compared (warren, lapin, name): each pair's services send the same messages.
const PAIRS: [(Side, Side, &str); 2] = [
    (Side::Warren, Side::LapinTraced, "traced"),
    (Side::WarrenUntraced, Side::Lapin, "untraced"),
];

impl Side {
    const ALL: [Side; 4] = [
        Side::Warren,
        Side::LapinTraced,
        Side::WarrenUntraced,
        Side::Lapin,
    ];

    fn name(self) -> &'static str {
        match self {
            Side::Warren => "warren",
            Side::LapinTraced => "lapin-traced",
            Side::WarrenUntraced => "warren-untraced",
            Side::Lapin => "lapin",
        }
    }

    /// Starts the service process; it consumes the echo queue when this returns.
    async fn start(self, generator: &Generator) -> Service {
        let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config.ini");
        let warren = |config: &std::path::Path| {
            let mut command = Command::new(env!("CARGO_BIN_EXE_warren"));
            command.arg("--config").arg(config).arg("run");
            command.env("RUST_LOG", "warn");
            command
        };
        let lapin = |traced: bool| {
            let mut command = Command::new(std::env::current_exe().expect("bench binary"));
            command.env("WARREN_BENCH_ROLE", "lapin-echo");
            if traced {
                command.env("WARREN_BENCH_TRACE", "1");
            }
            command
        };
        let mut command = match self {
            Side::Warren => warren(&shipped),
            Side::WarrenUntraced => warren(&untraced_config(&shipped)),
            Side::LapinTraced => lapin(true),
            Side::Lapin => lapin(false),
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the service");
        let service = Service { child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while generator.consumers().await == 0 {
            assert!(
                Instant::now() < deadline,
                "{} never consumed the echo queue",
                self.name()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        service
    }
}

/// The shipped config.ini with `[publisher] new_traces = false`, written beside the
/// other temporary files of this run.
fn untraced_config(shipped: &std::path::Path) -> PathBuf {
    let text = std::fs::read_to_string(shipped).expect("the shipped config.ini");
    let key = "\nnew_traces = true\n";
    assert!(text.contains(key), "config.ini shows new_traces = true");
    let path = std::env::temp_dir().join(common::of_this_run("warren-bench-untraced") + ".ini");
    std::fs::write(&path, text.replace(key, "\nnew_traces = false\n")).expect("write config");
    path
}

/// A running service process.
struct Service {
    child: Child,
}

impl Service {
    /// CPU time (user + system) the process used so far.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("/proc/<pid>/stat");
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks: u64 =
            fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
        // SAFETY: sysconf has no preconditions.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis(ticks * 1000 / per_second)
    }

    /// Resident memory, in MiB.
    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    }

    /// SIGTERM (an orderly stop), then waits for the exit.
    fn stop(mut self) {
        // SAFETY: kill with a pid we own and a valid signal.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One side's figures in one round.
struct Round {
    sequential_p50: f64,
    sequential_p99: f64,
    calls_per_sec: f64,
    concurrent_p50: f64,
    concurrent_p99: f64,
    cpu_ms_per_1000: f64,
    rss_mib: f64,
    drain_per_sec: f64,
}

impl std::fmt::Display for Round {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "(a) p50 {:.0} µs p99 {:.0} µs; (b) {:.0} calls/s p50 {:.0} µs p99 {:.0} µs, \
             CPU {:.1} ms per 1,000 calls, RSS {:.1} MiB; (c) drain {:.0} msg/s",
            self.sequential_p50,
            self.sequential_p99,
            self.calls_per_sec,
            self.concurrent_p50,
            self.concurrent_p99,
            self.cpu_ms_per_1000,
            self.rss_mib,
            self.drain_per_sec
        )
    }
}

/// The raw-lapin load generator: requests published with confirms (a nack stops the
/// bench), replies on the generator's own queue bound to `targeted`, matched by Msg-ID.
struct Generator {
    _connection: lapin::Connection,
    channel: Channel,
    reply_queue: String,
    waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Envelope>>>>,
    /// Replies that matched no call (late, duplicate, or wrong).
    strays: Arc<AtomicU64>,
    /// Calls and queued requests that got no reply in time.
    missing: AtomicU64,
}

impl Generator {
    async fn connect() -> Generator {
        let (connection, channel) = common::setup_channel("bench-service/generator").await;
        declare_echo(&channel).await;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let reply_queue = common::of_this_run("bench-service-replies");
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        common::declare_queue(&channel, &reply_queue, options).await;
        common::bind(&channel, &reply_queue, "targeted", &reply_queue).await;
        let mut replies = common::consume_no_ack(&channel, &reply_queue, "replies").await;
        let waiting: Arc<Mutex<HashMap<String, oneshot::Sender<Envelope>>>> = Arc::default();
        let strays = Arc::new(AtomicU64::new(0));
        let (waiting_in, strays_in) = (waiting.clone(), strays.clone());
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = replies.next().await {
                let reply = Envelope::decode(&delivery.data, None, None).ok();
                let waiter = reply
                    .as_ref()
                    .and_then(|reply| reply.msg_id())
                    .and_then(|id| waiting_in.lock().remove(id));
                match (reply, waiter) {
                    (Some(reply), Some(waiter)) => {
                        let _ = waiter.send(reply);
                    }
                    _ => {
                        strays_in.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Generator {
            _connection: connection,
            channel,
            reply_queue,
            waiting,
            strays,
            missing: AtomicU64::new(0),
        }
    }

    /// Consumers on the echo queue.
    async fn consumers(&self) -> u32 {
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        self.channel
            .queue_declare(QUEUE.into(), options, FieldTable::default())
            .await
            .map(|queue| queue.consumer_count())
            .unwrap_or(0)
    }

    /// A request with a unique Msg-ID and a payload to echo.
    fn request(&self, n: u64) -> (String, Value, Vec<u8>) {
        let msg_id = format!("{:016x}{n:016x}", std::process::id());
        let payload = Value::String(format!("payload-{n}"));
        let request = Envelope::new("echo", "req")
            .with("Msg-ID", msg_id.as_str())
            .with("Server-ID", self.reply_queue.as_str())
            .with("App-Name", "bench")
            .with("App-Version", "1")
            .with("Node", "bench@generator")
            .with("Payload", payload.clone());
        (msg_id, payload, request.encode())
    }

    /// Publishes one request (confirmed in the background; a nack stops the bench).
    async fn send(&self, body: &[u8]) {
        let confirm = self
            .channel
            .basic_publish(
                EXCHANGE.into(),
                ROUTING_KEY.into(),
                BasicPublishOptions::default(),
                body,
                publish_properties(false),
            )
            .await
            .expect("publish a request");
        tokio::spawn(common::expect_ack(confirm));
    }

    /// One call: the reply's Msg-ID and Payload are checked; returns the round trip in µs,
    /// or `None` (counted as missing) when no reply came in time.
    async fn call(&self, n: u64) -> Option<f64> {
        let (msg_id, payload, body) = self.request(n);
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().insert(msg_id.clone(), tx);
        let started = Instant::now();
        self.send(&body).await;
        let Ok(Ok(reply)) = tokio::time::timeout(CALL_TIMEOUT, rx).await else {
            self.waiting.lock().remove(&msg_id);
            self.missing.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let elapsed = started.elapsed().as_secs_f64() * 1e6;
        check(&reply, &msg_id, &payload);
        Some(elapsed)
    }

    /// One round of one side: (a), (b), then (c).
    async fn round(
        &self,
        side: Side,
        sequential: usize,
        duration: Duration,
        backlog: usize,
    ) -> Round {
        let next = AtomicU64::new(0);
        let number = || next.fetch_add(1, Ordering::Relaxed);
        let service = side.start(self).await;
        for _ in 0..200 {
            let _ = self.call(number()).await;
        }
        let mut latencies = Vec::with_capacity(sequential);
        for _ in 0..sequential {
            latencies.extend(self.call(number()).await);
        }
        let (sequential_p50, sequential_p99) = percentiles(latencies);

        let cpu_before = service.cpu();
        let stop = AtomicBool::new(false);
        let started = Instant::now();
        let callers = (0..CALLERS).map(|_| async {
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                latencies.extend(self.call(number()).await);
            }
            latencies
        });
        let timer = async {
            tokio::time::sleep(duration).await;
            stop.store(true, Ordering::Relaxed);
        };
        let (all, ()) = tokio::join!(futures::future::join_all(callers), timer);
        let elapsed = started.elapsed();
        let cpu = service.cpu().saturating_sub(cpu_before);
        let rss_mib = service.rss_mib();
        let latencies: Vec<f64> = all.into_iter().flatten().collect();
        let calls = latencies.len();
        let (concurrent_p50, concurrent_p99) = percentiles(latencies);
        service.stop();

        let drain_per_sec = self.drain(side, backlog, &number).await;
        assert_eq!(
            self.strays.load(Ordering::Relaxed),
            0,
            "replies that matched no call"
        );
        assert!(self.waiting.lock().is_empty(), "calls without a reply");
        Round {
            sequential_p50,
            sequential_p99,
            calls_per_sec: calls as f64 / elapsed.as_secs_f64(),
            concurrent_p50,
            concurrent_p99,
            cpu_ms_per_1000: cpu.as_secs_f64() * 1e3 / calls as f64 * 1000.0,
            rss_mib,
            drain_per_sec,
        }
    }

    /// (c): `backlog` requests queued while the service is stopped, then drained.
    async fn drain(&self, side: Side, backlog: usize, number: &impl Fn() -> u64) -> f64 {
        self.channel
            .queue_purge(QUEUE.into(), QueuePurgeOptions::default())
            .await
            .expect("purge");
        let mut expected = HashMap::with_capacity(backlog);
        let mut receivers = Vec::with_capacity(backlog);
        let requests = (0..backlog).map(|_| {
            let (msg_id, payload, body) = self.request(number());
            let (tx, rx) = oneshot::channel();
            self.waiting.lock().insert(msg_id.clone(), tx);
            receivers.push((msg_id.clone(), rx));
            expected.insert(msg_id, payload);
            (ROUTING_KEY.to_string(), body)
        });
        common::publish_all(&self.channel, EXCHANGE, requests).await;
        let service = side.start(self).await;
        let mut first = None;
        for (msg_id, rx) in receivers {
            let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(120), rx).await else {
                self.waiting.lock().remove(&msg_id);
                self.missing.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            first.get_or_insert_with(Instant::now);
            check(&reply, &msg_id, &expected[&msg_id]);
        }
        let elapsed = first.map_or(Duration::ZERO, |first| first.elapsed());
        service.stop();
        backlog.saturating_sub(1) as f64 / elapsed.as_secs_f64().max(1e-9)
    }
}

/// A reply must carry the request's Msg-ID and echo its Payload.
fn check(reply: &Envelope, msg_id: &str, payload: &Value) {
    assert_eq!(reply.msg_id(), Some(msg_id), "reply Msg-ID");
    assert_eq!(
        reply.get("Payload"),
        Some(payload),
        "reply Payload of {msg_id}"
    );
}

/// The echo app's exchanges and queue as warren declares them, so that either service
/// finds them and requests queued while no service runs are kept.
async fn declare_echo(channel: &Channel) {
    for (name, kind) in [
        (EXCHANGE, ExchangeKind::Topic),
        ("targeted", ExchangeKind::Direct),
    ] {
        channel
            .exchange_declare(
                name.into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("exchange");
    }
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    common::declare_queue(channel, QUEUE, options).await;
    common::bind(channel, QUEUE, EXCHANGE, ROUTING_KEY).await;
}

/// The lapin echo service: the same guarantee as warren's echo (the reply is confirmed
/// before the request is acked), written for speed: requests handled in order, replies
/// written at once, confirms awaited in order by a second task that acks with `multiple`.
/// With `WARREN_BENCH_TRACE` set, each reply carries a `traceparent` as warren's do: a
/// child of the request's, else of a new trace.
async fn lapin_echo_service() {
    let traced = std::env::var_os("WARREN_BENCH_TRACE").is_some();
    let (connection, consume) = common::setup_channel("bench-service/lapin-echo").await;
    declare_echo(&consume).await;
    let publish = connection.create_channel().await.expect("channel");
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut deliveries = common::consume_acked(&consume, QUEUE, "lapin-echo", PREFETCH).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, lapin::PublisherConfirm)>();
    let acker = {
        let consume = consume.clone();
        tokio::spawn(async move {
            while let Some((mut tag, confirm)) = rx.recv().await {
                let mut ok = matches!(confirm.await, Ok(lapin::Confirmation::Ack(_)));
                // Coalesce what is confirmed already into one `multiple` ack.
                while ok && let Ok((next, confirm)) = rx.try_recv() {
                    ok = matches!(confirm.await, Ok(lapin::Confirmation::Ack(_)));
                    tag = next;
                }
                if ok {
                    let options = BasicAckOptions { multiple: true };
                    let _ = consume.basic_ack(tag, options).await;
                } else {
                    let options = BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    };
                    let _ = consume.basic_nack(tag, options).await;
                }
            }
        })
    };
    while let Some(Ok(delivery)) = deliveries.next().await {
        let tag = delivery.delivery_tag;
        let Ok(request) = Envelope::decode(&delivery.data, None, None) else {
            let _ = consume.basic_reject(tag, Default::default()).await;
            continue;
        };
        let Some(server_id) = request.server_id() else {
            let _ = consume.basic_reject(tag, Default::default()).await;
            continue;
        };
        let payload = request.get("Payload").cloned().unwrap_or(Value::Null);
        let mut reply = Envelope::new("echo", "resp").with("Payload", payload);
        if let Some(msg_id) = request.msg_id() {
            reply.set("Msg-ID", msg_id);
        }
        reply.set("Node", "lapin-echo@bench");
        let properties = if traced {
            TraceContext::from_properties(&delivery.properties)
                .unwrap_or_else(TraceContext::new_root)
                .child()
                .inject(publish_properties(false))
        } else {
            publish_properties(false)
        };
        let confirm = publish
            .basic_publish(
                "targeted".into(),
                server_id.into(),
                BasicPublishOptions::default(),
                &reply.encode(),
                properties,
            )
            .await
            .expect("publish a reply");
        if tx.send((tag, confirm)).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = acker.await;
}

fn percentiles(mut values: Vec<f64>) -> (f64, f64) {
    values.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| values[((values.len() as f64 * q) as usize).min(values.len() - 1)];
    (at(0.50), at(0.99))
}

/// Median and spread of one figure over the rounds.
fn summary(rounds: &[Round], figure: impl Fn(&Round) -> f64) -> (f64, f64, f64) {
    let mut values: Vec<f64> = rounds.iter().map(figure).collect();
    values.sort_by(|a, b| a.total_cmp(b));
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

/// One figure of a round.
type Figure = fn(&Round) -> f64;

fn report(figures: &HashMap<Side, Vec<Round>>, missing: u64) {
    let figure_names: [(&str, Figure); 8] = [
        ("a_p50_us", |r| r.sequential_p50),
        ("a_p99_us", |r| r.sequential_p99),
        ("b_calls_per_sec", |r| r.calls_per_sec),
        ("b_p50_us", |r| r.concurrent_p50),
        ("b_p99_us", |r| r.concurrent_p99),
        ("cpu_ms_per_1000_calls", |r| r.cpu_ms_per_1000),
        ("rss_mib", |r| r.rss_mib),
        ("c_drain_msg_per_sec", |r| r.drain_per_sec),
    ];
    let mut fields = Vec::new();
    for (warren_side, lapin_side, pair) in PAIRS {
        let (warren, lapin) = (&figures[&warren_side], &figures[&lapin_side]);
        let (w_name, l_name) = (warren_side.name(), lapin_side.name());
        eprintln!("{pair}: {w_name} against {l_name}");
        for (name, figure) in figure_names {
            let (w, w_min, w_max) = summary(warren, figure);
            let (l, l_min, l_max) = summary(lapin, figure);
            eprintln!(
                "  {name}: {w_name} {w:.1} ({w_min:.1}–{w_max:.1}), {l_name} {l:.1} ({l_min:.1}–{l_max:.1}), ratio {:.3}",
                w / l
            );
            fields.push(format!(
                "\"{pair}_{name}_warren\":{w:.1},\"{pair}_{name}_lapin\":{l:.1},\"{pair}_{name}_ratio\":{:.3}",
                w / l
            ));
        }
    }
    // warren as shipped against the bare lapin echo (different messages), for the record.
    let (w, _, _) = summary(&figures[&Side::Warren], |r| r.calls_per_sec);
    let (l, _, _) = summary(&figures[&Side::Lapin], |r| r.calls_per_sec);
    eprintln!(
        "b_calls_per_sec: warren {w:.1} against the bare lapin echo {l:.1}, ratio {:.3}",
        w / l
    );
    fields.push(format!("\"shipped_vs_bare_b_ratio\":{:.3}", w / l));
    let (warren, lapin, _) = PAIRS[0];
    let (w, _, _) = summary(&figures[&warren], |r| r.calls_per_sec);
    let (l, _, _) = summary(&figures[&lapin], |r| r.calls_per_sec);
    println!(
        "{{\"bench\":\"service\",\"warren\":{w:.1},\"lapin\":{l:.1},\"ratio\":{:.3},\"missing\":{missing},{}}}",
        w / l,
        fields.join(",")
    );
}
