//! `cargo bench --bench consume`: a no-op warren listener against a raw lapin consumer
//! written for speed, both consuming the same number of pre-published 256-byte envelopes
//! (manual ack, prefetch 200) from the local RabbitMQ, in the same run.
//!
//! The lapin baseline acknowledges with `multiple = true` every quarter of the prefetch
//! (the best a hand-written consumer does; one awaited ack per message is several times
//! slower) and reads of each delivery what it must to dispatch it, the Event-Category and
//! Event-Name borrowed by one `serde_json` pass, as warren's listener does before it
//! picks a responder. Each side is timed from its first delivery to its last ack; the
//! median of seven interleaved rounds is reported with the spread, and each round's CPU
//! time of the process per message (every thread, lapin's I/O thread included).
//!
//! A third run per round, a lapin consumer that reads nothing of the body (a drain: it
//! cannot tell one message from another), is reported beside it (`lapin_bare`,
//! `ratio_bare`), so the price of reading an envelope at all stays in view; and a fourth,
//! the same lapin consumer as the baseline run in a spawned task, where app code (and
//! warren's listener) runs, instead of on the thread of `main` (`lapin_task`,
//! `ratio_task`). The reported ratio stays the one against the consumer on `main`. Allocations per
//! message (a counting global allocator, in an untimed round of each side) are reported
//! on a line `{"bench":"consume_allocations",…}`.
//!
//! warren runs with its metrics on (the HTTP endpoint, histograms observed), as in
//! production; the same listener on a second node without them runs back to back with it
//! in each round, and the median ratio is reported (`warren_no_metrics`,
//! `ratio_metrics`): the price of metrics on the hot path. The last line is one JSON
//! object.

mod common;

use common::{MESSAGES, Reads, SIZE};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use warren_listeners::{AppContext, Event, Listener, ListenerSpec, QueueSpec, spawn_listener};
use warren_runtime::config::AppConfig;
use warren_runtime::node::Node;

#[global_allocator]
static ALLOCATOR: common::Counting = common::Counting;

const PREFETCH: u16 = 200;

#[tokio::main]
async fn main() {
    common::start_tls();
    let (_setup, channel) = common::setup_channel("bench-consume/setup").await;
    let node = common::start_node("consume", common::METRICS_ON).await;
    let quiet = common::start_node("consume-quiet", "").await;
    let exchange = common::of_this_run("warren-bench-consume");
    let queue = common::of_this_run("warren-bench-consume");
    let mut rounds = common::Rounds::default();
    let mut bare = common::Rounds::default();
    let mut tasked = common::Rounds::default();
    let mut cost = common::MetricsCost::default();
    for round in 1..=common::rounds() {
        let fill = || async {
            common::fresh_queue(&channel, &exchange, &queue).await;
            common::prepublish(&channel, &exchange, MESSAGES, SIZE).await;
        };
        let lapin = async {
            fill().await;
            let cpu = common::process_cpu();
            let rate =
                common::fast_lapin_consumer(&queue, MESSAGES, PREFETCH, Reads::Routing).await;
            (rate, common::process_cpu() - cpu)
        };
        let queue = queue.as_str();
        let timed = |node| async move {
            fill().await;
            let cpu = common::process_cpu();
            let rate = warren_listener(node, queue).await;
            (rate, common::process_cpu() - cpu)
        };
        let warren = common::in_turn(round, timed(&node), timed(&quiet));
        let (((warren, warren_cpu), (quiet_rate, _)), (lapin, lapin_cpu)) =
            common::in_turn(round, warren, lapin).await;
        cost.push(round, "msg/s", warren, quiet_rate);
        let per_message = |cpu: Duration| cpu.as_secs_f64() * 1e6 / MESSAGES as f64;
        eprintln!(
            "  CPU per message: warren {:.2} µs, lapin {:.2} µs",
            per_message(warren_cpu),
            per_message(lapin_cpu)
        );
        rounds.push(round, "msg/s", warren, lapin);
        fill().await;
        let owned = queue.to_string();
        let in_task = tokio::spawn(async move {
            common::fast_lapin_consumer(&owned, MESSAGES, PREFETCH, Reads::Routing).await
        })
        .await
        .expect("the lapin consumer task");
        eprintln!("  lapin consuming in a spawned task: {in_task:.1} msg/s");
        tasked.push(round, "msg/s (warren, lapin in a task)", warren, in_task);
        fill().await;
        let drained = common::fast_lapin_consumer(queue, MESSAGES, PREFETCH, Reads::Nothing).await;
        eprintln!("  lapin reading nothing of the body: {drained:.1} msg/s");
        bare.push(round, "msg/s (warren, lapin bare)", warren, drained);
    }
    // Allocations per message, in one untimed round of each side.
    common::fresh_queue(&channel, &exchange, &queue).await;
    common::prepublish(&channel, &exchange, MESSAGES, SIZE).await;
    let consume = common::fast_lapin_consumer(&queue, MESSAGES, PREFETCH, Reads::Routing);
    let (_, lapin) = common::allocations_during(consume).await;
    common::fresh_queue(&channel, &exchange, &queue).await;
    common::prepublish(&channel, &exchange, MESSAGES, SIZE).await;
    let (_, warren) = common::allocations_during(warren_listener(&node, &queue)).await;
    let (warren, lapin) = (
        warren as f64 / MESSAGES as f64,
        lapin as f64 / MESSAGES as f64,
    );
    eprintln!("allocations per message: warren {warren:.1}, lapin {lapin:.1}");
    println!(
        "{{\"bench\":\"consume_allocations\",\"warren\":{warren:.1},\"lapin\":{lapin:.1},\"ratio\":{:.3}}}",
        warren / lapin
    );
    common::delete_queue(&channel, &queue).await;
    common::delete_exchange(&channel, &exchange).await;
    let _ = node.stop().await;
    let _ = quiet.stop().await;
    let bare_ratio = bare.ratio();
    let bare_rate = common::median(bare.lapin_rates());
    eprintln!("against a lapin consumer that reads nothing of the body: ratio {bare_ratio:.3}");
    let tasked_ratio = tasked.ratio();
    let tasked_rate = common::median(tasked.lapin_rates());
    eprintln!(
        "against the lapin consumer in a spawned task (where app code runs): ratio {tasked_ratio:.3}"
    );
    let extra = format!(
        ",\"lapin_bare\":{bare_rate:.1},\"ratio_bare\":{bare_ratio:.3},\"lapin_task\":{tasked_rate:.1},\"ratio_task\":{tasked_ratio:.3}{}",
        cost.json()
    );
    let bench = if common::over_tls() {
        "consume_tls"
    } else {
        "consume"
    };
    rounds.report_with(bench, &extra);
    common::stop_tls();
}

/// A no-op listener: one responder that counts.
struct NoOp {
    queue: String,
    handled: Arc<AtomicUsize>,
    first: Arc<OnceLock<Instant>>,
}

impl Listener for NoOp {
    fn spec(&self) -> ListenerSpec {
        let (handled, first) = (self.handled.clone(), self.first.clone());
        ListenerSpec::new("bench")
            .queue(QueueSpec::named(&self.queue))
            .prefetch(PREFETCH)
            .responder("bench", "msg", move |_event: Event| {
                first.get_or_init(Instant::now);
                handled.fetch_add(1, Ordering::Relaxed);
                async { Ok(()) }
            })
    }
}

async fn warren_listener(node: &Node, queue: &str) -> f64 {
    let context = node.context().clone();
    let pool = context.pool;
    let ctx = AppContext::with_version("bench", context, AppConfig::new("bench", pool));
    let first = Arc::new(OnceLock::new());
    let listener = NoOp {
        queue: queue.to_string(),
        handled: Arc::new(AtomicUsize::new(0)),
        first: first.clone(),
    };
    let handle = spawn_listener(listener, &ctx)
        .await
        .expect("listener starts");
    while handle.stats().acked < MESSAGES as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = first.get().map_or(Duration::ZERO, |s| s.elapsed());
    handle.stop().await.expect("stop");
    common::rate(MESSAGES, elapsed)
}
