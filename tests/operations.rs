//! The operator endpoint against real RabbitMQ, scraped with a real HTTP client: metrics
//! after known traffic (published, acked, PoolFull), the health probes following the only
//! broker's death and return, messages in flight, handler and drain times, the status
//! document, and a port in use as a start error.

mod common;

use std::time::Duration;

use common::{Broker, SOON, SpecListener, config, start_node, unique_node};
use serde_json::Value;
use warren_listeners::{
    AppContext, Envelope, Event, ListenerSpec, PoolError, QueueSpec, RpcError, spawn_listener,
};
use warren_runtime::broker::BrokerId;
use warren_runtime::config::{AppConfig, PoolConfig};
use warren_runtime::node::{Node, StartError};
use warren_test_support::{eventually, local_uri};

/// The test app `ops`, with a pool of one worker and no overflow (a short checkout wait).
fn ops_app(node: &Node) -> AppContext {
    AppContext::with_version(
        "0.0.0-test",
        node.context().clone(),
        AppConfig::new(
            "ops",
            PoolConfig {
                size: 1,
                overflow: 0,
                checkout_timeout: Duration::from_millis(300),
                idle_timeout: Duration::from_secs(30),
            },
        ),
    )
}

/// `[http]` on a port the system chooses.
const HTTP: &str = "\n[http]\nlisten = \"127.0.0.1:0\"\n";

fn base(node: &Node) -> String {
    let address = node.http_address().expect("the endpoint serves");
    format!("http://{address}")
}

/// GET `path`: (status, body).
async fn get(node: &Node, path: &str) -> (u16, String) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("an HTTP client");
    let response = client
        .get(format!("{}{path}", base(node)))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.expect("a body"))
}

/// The value of the sample `name{labels…}` in a Prometheus text exposition (the labels
/// given must all be on the line; others may be).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.split(['{', ' ']).next() == Some(name)
                && labels
                    .iter()
                    .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}

/// Polls `path` until `check` holds on (status, body), up to `within`; the last answer.
async fn until_answer(
    node: &Node,
    path: &str,
    within: Duration,
    check: impl Fn(u16, &str) -> bool,
) -> (bool, u16, String) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (status, body) = get(node, path).await;
        if check(status, &body) {
            return (true, status, body);
        }
        if tokio::time::Instant::now() >= deadline {
            return (false, status, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_known_traffic_and_the_probes_answer() {
    let name = unique_node("ops");
    let node = start_node(config(&name, &[local_uri()], HTTP)).await;
    let queue = format!("{name}.counted");
    let spec = ListenerSpec::new("counted")
        .queue(QueueSpec::named(&queue).auto_delete(true))
        .responder("ops", "count", |_event: Event| async { Ok(()) });
    let app = ops_app(&node);
    let listener = spawn_listener(SpecListener(spec), &app)
        .await
        .expect("listener starts");
    assert!(listener.wait_consuming(true, SOON).await);

    // 25 messages published through the node's publisher straight to the queue.
    let publisher = &node.context().publisher;
    for _ in 0..25 {
        publisher
            .publish(
                "",
                &queue,
                Envelope::new("ops", "count"),
                publisher.options(),
            )
            .await
            .expect("published");
    }
    assert!(
        eventually(SOON, || listener.stats().acked == 25).await,
        "{:?}",
        listener.stats()
    );

    // One PoolFull: the pool's one worker held, and a second checkout.
    app.pool.spawn().await.expect("pool starts");
    let held = app.pool.checkout().await.expect("the first checkout");
    let full = app.pool.checkout().await;
    assert!(
        matches!(full, Err(PoolError::Full { .. })),
        "the pool is full"
    );

    // One call whose request nobody can route: returned.
    let mut checkout = held;
    let returned = checkout
        .call(
            "",
            &format!("{name}.nowhere"),
            Envelope::new("ops", "ping"),
            SOON,
        )
        .await;
    assert!(
        matches!(returned, Err(RpcError::Returned(_))),
        "{returned:?}"
    );
    let held = checkout;

    let (_, metrics) = get(&node, "/metrics").await;
    let broker = local_uri_redacted();
    assert_eq!(
        sample(&metrics, "warren_rpc_calls_total", &[("pool", "ops")]),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "warren_rpc_returned_total", &[("pool", "ops")]),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "warren_rpc_call_seconds_count",
            &[("pool", "ops")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "warren_pool_checkout_seconds_count",
            &[("pool", "ops")]
        ),
        Some(1.0),
        "the successful checkout is timed, the full one is counted"
    );
    assert_eq!(
        sample(
            &metrics,
            "warren_listener_acks_total",
            &[("listener", "counted")]
        ),
        Some(25.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "warren_listener_deliveries_total",
            &[("listener", "counted")]
        ),
        Some(25.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "warren_listener_consuming",
            &[("listener", "counted")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "warren_listener_handler_seconds_count",
            &[("listener", "counted")]
        ),
        Some(25.0),
        "each message's handlers timed once"
    );
    assert_eq!(
        sample(
            &metrics,
            "warren_listener_in_flight",
            &[("listener", "counted")]
        ),
        Some(0.0),
        "all 25 settled"
    );
    let published = sample(&metrics, "warren_published_total", &[("broker", &broker)])
        .unwrap_or_else(|| panic!("no warren_published_total for {broker}:\n{metrics}"));
    assert!(published >= 25.0, "{published}");
    assert!(
        sample(
            &metrics,
            "warren_publish_confirm_seconds_count",
            &[("broker", &broker)]
        )
        .is_some_and(|n| n >= 25.0)
    );
    assert_eq!(
        sample(&metrics, "warren_pool_full_total", &[("pool", "ops")]),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "warren_pool_busy", &[("pool", "ops")]),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "warren_broker_connection_up",
            &[("broker", &broker), ("connection", "consume")]
        ),
        Some(1.0)
    );
    assert!(
        sample(
            &metrics,
            "warren_broker_connections_opened_total",
            &[("broker", &broker), ("connection", "publish")]
        )
        .is_some_and(|n| n >= 1.0)
    );

    assert!(
        sample(
            &metrics,
            "warren_broker_channels_opened_total",
            &[("broker", &broker), ("connection", "consume")]
        )
        .is_some_and(|n| n >= 2.0),
        "the listener's and the worker's channels at least"
    );
    assert!(
        sample(
            &metrics,
            "warren_broker_channels_open",
            &[("broker", &broker), ("connection", "consume")]
        )
        .is_some_and(|n| n >= 2.0),
        "the listener's and the worker's channels are open now: {metrics}"
    );

    let (live, _) = get(&node, "/health/live").await;
    assert_eq!(live, 200);
    let (ready, status, body) =
        until_answer(&node, "/health/ready", SOON, |status, _| status == 200).await;
    assert!(ready, "{status} {body}");
    let (status, body) = get(&node, "/status").await;
    assert_eq!(status, 200);
    let document: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(document["node"], Value::String(name.clone()));
    assert_eq!(document["brokers"][0]["primary"], Value::Bool(true));
    assert!(
        document["tree"]["recent_restarts"].is_u64(),
        "restarts inside the window: {body}"
    );
    let counted = document["listeners"]
        .as_array()
        .and_then(|all| all.iter().find(|l| l["listener"] == "counted"))
        .unwrap_or_else(|| panic!("the listener in the status: {body}"));
    assert_eq!(counted["in_flight"], 0, "{body}");
    assert!(
        counted["generation"].as_u64().is_some_and(|g| g >= 1),
        "{body}"
    );
    assert!(
        document["parts"].as_array().is_some_and(|parts| parts
            .iter()
            .any(|p| p["name"] == "listener:counted" && p["state"] == "ready")),
        "{body}"
    );

    let open = |metrics: &str| {
        sample(
            metrics,
            "warren_broker_channels_open",
            &[("broker", &broker), ("connection", "consume")],
        )
        .unwrap_or(f64::MAX)
    };
    let (_, metrics) = get(&node, "/metrics").await;
    let before = open(&metrics);
    held.checkin().await;
    listener.stop().await.expect("listener stops");
    app.pool.stop().await;
    let (closed, _, metrics) = until_answer(&node, "/metrics", SOON, |_, metrics| {
        open(metrics) <= before - 2.0
    })
    .await;
    assert!(
        closed,
        "the listener's and the worker's channels closed ({before} open before): {metrics}"
    );
    node.stop().await.expect("node stops");
}

/// The local broker's URI as the metrics name it (no credentials).
fn local_uri_redacted() -> String {
    let uri = warren_runtime::uri::BrokerUri::parse(&local_uri()).expect("the local URI");
    uri.redacted().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_in_flight_are_those_whose_handlers_have_not_finished() {
    let name = unique_node("flight");
    let node = start_node(config(&name, &[local_uri()], HTTP)).await;
    let queue = format!("{name}.held");
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let spec = ListenerSpec::new("held")
        .queue(QueueSpec::named(&queue).auto_delete(true))
        .concurrency(3)
        .responder("ops", "hold", {
            let gate = gate.clone();
            move |_event: Event| {
                let gate = gate.clone();
                async move {
                    let _permit = gate.acquire().await;
                    Ok(())
                }
            }
        });
    let listener = spawn_listener(SpecListener(spec), &ops_app(&node))
        .await
        .expect("listener starts");
    assert!(listener.wait_consuming(true, SOON).await);
    let publisher = &node.context().publisher;
    for _ in 0..3 {
        publisher
            .publish(
                "",
                &queue,
                Envelope::new("ops", "hold"),
                publisher.options(),
            )
            .await
            .expect("published");
    }
    let in_flight = |metrics: &str| {
        sample(
            metrics,
            "warren_listener_in_flight",
            &[("listener", "held")],
        )
    };
    let (three, _, metrics) = until_answer(&node, "/metrics", SOON, |_, metrics| {
        in_flight(metrics) == Some(3.0)
    })
    .await;
    assert!(three, "three handlers wait: {metrics}");
    assert_eq!(
        sample(
            &metrics,
            "warren_listener_acks_total",
            &[("listener", "held")]
        ),
        Some(0.0)
    );

    gate.add_permits(3);
    let (none, _, metrics) = until_answer(&node, "/metrics", SOON, |_, metrics| {
        in_flight(metrics) == Some(0.0)
    })
    .await;
    assert!(none, "all settled: {metrics}");
    assert_eq!(
        sample(
            &metrics,
            "warren_listener_acks_total",
            &[("listener", "held")]
        ),
        Some(3.0)
    );
    listener.stop().await.expect("listener stops");
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_the_only_broker() {
    let broker = Broker::start_many(1).await.remove(0);
    let name = unique_node("ready");
    let node = start_node(config(&name, &[broker.uri()], HTTP)).await;
    let (ready, status, body) =
        until_answer(&node, "/health/ready", SOON, |status, _| status == 200).await;
    assert!(ready, "ready with its broker: {status} {body}");

    broker.kill().await;
    let (down, status, body) =
        until_answer(&node, "/health/ready", SOON, |status, _| status == 503).await;
    assert!(down, "not ready without a broker: {status} {body}");
    let reason: Value = serde_json::from_str(&body).expect("JSON");
    assert!(
        reason["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no broker of the local zone")),
        "{body}"
    );
    // Still live: the tree runs, reconnecting.
    assert_eq!(get(&node, "/health/live").await.0, 200);

    broker.restart().await;
    let (back, status, body) =
        until_answer(&node, "/health/ready", Duration::from_secs(30), |s, _| {
            s == 200
        })
        .await;
    assert!(back, "ready again: {status} {body}");
    let (_, metrics) = get(&node, "/metrics").await;
    assert!(
        sample(
            &metrics,
            "warren_broker_connections_lost_total",
            &[("connection", "consume")]
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn failovers_and_fail_backs_are_counted() {
    let brokers = Broker::start_many(2).await;
    let (a, b) = (&brokers[0], &brokers[1]);
    // B stays up throughout: the listener moves there while A is down.
    let name = unique_node("moves");
    let node = start_node(config(&name, &[a.uri(), b.uri()], HTTP)).await;
    let spec = ListenerSpec::new("mover")
        .queue(QueueSpec::anonymous())
        .responder("ops", "*", |_event: Event| async { Ok(()) });
    let listener = spawn_listener(SpecListener(spec), &ops_app(&node))
        .await
        .expect("listener starts");
    let on = |broker: usize| {
        listener
            .current()
            .is_some_and(|(id, _)| id == BrokerId(broker))
            && listener.is_consuming()
    };
    assert!(eventually(SOON, || on(0)).await, "starts on the primary");
    let counted = |metrics: &str, name: &str| sample(metrics, name, &[]).unwrap_or(0.0);
    let (_, before) = get(&node, "/metrics").await;
    let failovers = counted(&before, "warren_assignments_failovers_total");

    a.kill().await;
    assert!(eventually(SOON, || on(1)).await, "moves to the secondary");
    let (_, after) = get(&node, "/metrics").await;
    assert!(
        counted(&after, "warren_assignments_failovers_total") >= failovers + 1.0,
        "{after}"
    );
    a.restart().await;
    assert!(
        eventually(Duration::from_secs(30), || on(0)).await,
        "back on the primary"
    );
    let (_, back) = get(&node, "/metrics").await;
    assert!(
        counted(&back, "warren_assignments_fail_backs_total") >= 1.0,
        "{back}"
    );
    // The old (anonymous, empty) queue on B is drained and let go: one drain timed.
    let (drained, _, metrics) =
        until_answer(&node, "/metrics", Duration::from_secs(30), |_, metrics| {
            sample(
                metrics,
                "warren_listener_drain_seconds_count",
                &[("listener", "mover")],
            )
            .is_some_and(|n| n >= 1.0)
        })
        .await;
    assert!(drained, "{metrics}");
    listener.stop().await.expect("listener stops");
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_port_in_use_is_a_start_error_naming_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let address = taken.local_addr().expect("its address");
    let name = unique_node("inuse");
    let http = format!("\n[http]\nlisten = \"{address}\"\n");
    common::init_logs();
    let started = Node::start(config(&name, &[local_uri()], &http), |_| Vec::new()).await;
    match started {
        Err(StartError::Failed(reason)) => {
            assert!(reason.contains(&address.to_string()), "{reason}");
            assert!(reason.contains("[http] listen"), "{reason}");
        }
        Err(other) => panic!("another error: {other}"),
        Ok(node) => {
            let _ = node.stop().await;
            panic!("the node started on a port in use");
        }
    }
}
