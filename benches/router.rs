//! `cargo bench --bench router`: 100 subscribers of the configuration-event router (5
//! patterns, each matching every event, so every event is delivered 100 times) against one
//! raw lapin consumer of the same events, in the same run. Each subscriber's buffer holds a
//! whole run (the events are shared, so this costs a pointer per event), so that the
//! figure is throughput, not loss.
//!
//! The router's listener is paused while 100,000 events are published once to the
//! exchange; a plain queue bound with `#` gets the same events. The lapin consumer (manual
//! acks coalesced, prefetch 200) drains its copy, and the router, resumed, is timed until
//! every subscriber has every event; the two take turns going first. Seven interleaved rounds; the median and the
//! spread are printed. The last line is one JSON object (events/s).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use warren_listeners::{ConfigRouter, RouterEvent};
use warren_runtime::kapi_conf::{DocAction, DocUpdate};

const EVENTS: usize = 100_000;
const SUBSCRIBERS: usize = 100;
const PATTERNS: [&str; 5] = [
    "#",
    "doc_edited.#",
    "*.bench.*.*",
    "*.*.user.*",
    "doc_edited.bench.user.*",
];
const PREFETCH: u16 = 200;

#[tokio::main]
async fn main() {
    let exchange = common::of_this_run("warren-bench-conf");
    let node = common::start_node(
        "router",
        &format!(
            "[amqp]\nprefetch = {PREFETCH}\n[router]\nexchange = \"{exchange}\"\nbuffer = {EVENTS}"
        ),
    )
    .await;
    let router = ConfigRouter::new(node.context()).expect("the router's spec");
    router.spawn().await.expect("router starts");
    assert!(
        router
            .listener()
            .wait_consuming(true, Duration::from_secs(10))
            .await
    );

    // 100 subscribers that count what they receive.
    let received: Arc<Vec<AtomicU64>> =
        Arc::new((0..SUBSCRIBERS).map(|_| AtomicU64::new(0)).collect());
    let resyncs = Arc::new(AtomicU64::new(0));
    for i in 0..SUBSCRIBERS {
        let mut subscription = router
            .subscribe(PATTERNS[i % PATTERNS.len()])
            .await
            .expect("subscribe");
        let (received, resyncs) = (received.clone(), resyncs.clone());
        tokio::spawn(async move {
            while let Some(item) = subscription.next().await {
                match item {
                    RouterEvent::Event(_) => received[i].fetch_add(1, Ordering::Relaxed),
                    RouterEvent::Resync => resyncs.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }

    let (_setup, channel) = common::setup_channel("bench-router/setup").await;
    let queue = format!("{exchange}-lapin");
    let mut rounds = common::Rounds::default();
    for round in 1..=common::rounds() {
        common::recreate_queue(&channel, &exchange, &queue).await;
        router.listener().pause().await.expect("pause the router");
        assert!(
            router
                .listener()
                .wait_consuming(false, Duration::from_secs(10))
                .await
        );
        publish_events(&exchange).await;

        let lapin = common::fast_lapin_consumer(&queue, EVENTS, PREFETCH, common::Reads::Routing);
        let warren = async {
            let before: Vec<u64> = received.iter().map(|r| r.load(Ordering::Relaxed)).collect();
            let started = Instant::now();
            router.listener().resume().await.expect("resume the router");
            let deadline = Instant::now() + Duration::from_secs(300);
            loop {
                let done = received
                    .iter()
                    .zip(&before)
                    .all(|(now, before)| now.load(Ordering::Relaxed) - before >= EVENTS as u64);
                if done {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "subscribers did not get every event: {:?}",
                    router.stats()
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            common::rate(EVENTS, started.elapsed())
        };
        let (warren, lapin) = common::in_turn(round, warren, lapin).await;
        rounds.push(round, "events/s", warren, lapin);
        eprintln!(
            "  the router's events went to {SUBSCRIBERS} subscribers ({:.0} deliveries/s); resyncs so far {}",
            warren * SUBSCRIBERS as f64,
            resyncs.load(Ordering::Relaxed)
        );
    }
    let stats = router.stats();
    eprintln!("router stats: {stats:?}");
    assert_eq!(stats.dropped, 0, "no subscriber fell behind");
    common::delete_queue(&channel, &queue).await;
    router.stop().await;
    let _ = node.stop().await;
    rounds.report("router");
}

/// Publishes the events once (confirmed, pipelined); both queues get them.
async fn publish_events(exchange: &str) {
    let connection = common::connect("bench-router/publisher").await;
    let channel = connection.create_channel().await.expect("channel");
    let events = (0..EVENTS).map(|i| {
        let update = DocUpdate::doc(DocAction::Edited, "bench", "user", format!("id{i}"));
        let mut envelope = update.envelope();
        envelope.set("Node", "bench@publisher");
        envelope.ensure_msg_id();
        (update.routing_key(), envelope.encode())
    });
    common::publish_all(&channel, exchange, events).await;
    let _ = connection.close(200, "done".into()).await;
}
