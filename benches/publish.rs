//! `cargo bench --bench publish`: the node's publisher (confirms, a window of in-flight
//! confirms) against a raw lapin publisher written for speed (confirm mode, the same
//! number of publishes in flight at once, written and confirmed concurrently), publishing the same number of 256-byte
//! envelopes to the local RabbitMQ in the same run. Both build and encode a fresh envelope
//! per message. The median of a few rounds is reported.
//!
//! warren runs with its metrics on (the HTTP endpoint, histograms observed), as in
//! production; the same publisher on a second node without them runs back to back with it
//! in each round, and the median ratio is reported (`warren_no_metrics`,
//! `ratio_metrics`): the price of metrics on the hot path. The last line is one JSON
//! object.

mod common;

use common::{MESSAGES, SIZE};

use std::time::Instant;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use warren_runtime::envelope::{Envelope, publish_properties};
use warren_runtime::node::Node;

const WINDOW: usize = 1000;

#[tokio::main]
async fn main() {
    common::start_tls();
    let (_setup, channel) = common::setup_channel("bench-publish/setup").await;
    let exchange = common::of_this_run("warren-bench-publish");
    let queue = common::of_this_run("warren-bench-publish");
    let settings = format!("[publisher]\nconfirm_window = {WINDOW}\n");
    let node = common::start_node("publish", &(settings.clone() + common::METRICS_ON)).await;
    let quiet = common::start_node("publish-quiet", &settings).await;
    let mut rounds = common::Rounds::default();
    let mut cost = common::MetricsCost::default();
    for round in 1..=common::rounds() {
        let lapin = async {
            common::fresh_queue(&channel, &exchange, &queue).await;
            lapin_publisher(&exchange).await
        };
        let (channel, exchange, queue) = (&channel, exchange.as_str(), queue.as_str());
        let timed = |node| async move {
            common::fresh_queue(channel, exchange, queue).await;
            warren_publisher(node, exchange).await
        };
        let warren = common::in_turn(round, timed(&node), timed(&quiet));
        let ((warren, quiet_rate), lapin) = common::in_turn(round, warren, lapin).await;
        rounds.push(round, "msg/s", warren, lapin);
        cost.push(round, "msg/s", warren, quiet_rate);
    }
    common::delete_queue(&channel, &queue).await;
    common::delete_exchange(&channel, &exchange).await;
    let _ = node.stop().await;
    let _ = quiet.stop().await;
    let bench = if common::over_tls() {
        "publish_tls"
    } else {
        "publish"
    };
    rounds.report_with(bench, &cost.json());
    common::stop_tls();
}

fn envelope(i: usize) -> Envelope {
    let body = common::envelope_of_size("bench", "msg", i, SIZE);
    match Envelope::decode(&body, None, None) {
        Ok(envelope) => envelope,
        Err(error) => panic!("bench envelope: {error}"),
    }
}

/// Confirm mode, `WINDOW` publishes in flight at once (written and confirmed
/// concurrently, the fastest pattern lapin allows).
async fn lapin_publisher(exchange: &str) -> f64 {
    let connection = common::connect("bench-publish/lapin").await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let envelopes: Vec<Envelope> = (0..MESSAGES).map(envelope).collect();
    let started = Instant::now();
    let mut inflight = FuturesUnordered::new();
    for envelope in envelopes {
        if inflight.len() == WINDOW
            && let Some(confirmed) = inflight.next().await
        {
            let confirmed: bool = confirmed;
            assert!(confirmed, "nacked");
        }
        let channel = channel.clone();
        inflight.push(async move {
            let confirm = channel
                .basic_publish(
                    exchange.into(),
                    "bench".into(),
                    BasicPublishOptions::default(),
                    &envelope.encode(),
                    publish_properties(false),
                )
                .await
                .expect("publish");
            confirm.await.expect("confirm").is_ack()
        });
    }
    while let Some(confirmed) = inflight.next().await {
        assert!(confirmed, "nacked");
    }
    let elapsed = started.elapsed();
    let _ = connection.close(200, "done".into()).await;
    common::rate(MESSAGES, elapsed)
}

/// The node's publisher, `WINDOW` publishes in flight.
async fn warren_publisher(node: &Node, exchange: &str) -> f64 {
    let publisher = node.context().publisher.clone();
    let envelopes: Vec<Envelope> = (0..MESSAGES).map(envelope).collect();
    let options = publisher.options();
    let started = Instant::now();
    let mut inflight = FuturesUnordered::new();
    for envelope in envelopes {
        if inflight.len() == WINDOW
            && let Some(result) = inflight.next().await
        {
            let result: Result<_, warren_runtime::confirm::PublishError> = result;
            result.expect("publish");
        }
        let (publisher, options) = (publisher.clone(), options.clone());
        inflight.push(async move {
            publisher
                .publish(exchange, "bench", envelope, options)
                .await
        });
    }
    while let Some(result) = inflight.next().await {
        result.expect("publish");
    }
    common::rate(MESSAGES, started.elapsed())
}
