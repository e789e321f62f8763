//! Assignments with two RabbitMQ nodes of the test's own, SIGKILLed and restarted: float
//! failover (timed), fail-back make-before-break with drain, sticky grants that never move,
//! no channel leak after kill/restart cycles, zones, publishers following the primary, a
//! 20,000-message end-to-end run across a primary kill and restart, and echo serving
//! through the secondary.

mod common;

use std::time::{Duration, Instant};

use common::client::Client;
use common::{
    Broker, SOON, Seen, SpecListener, app_context, config, recording, start_node, unique_node,
    until,
};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::ExchangeKind;
use lapin::types::FieldTable;
use warren_listeners::{
    ChannelKind, Envelope, Exchange, ListenerHandle, ListenerSpec, QueueSpec, spawn_listener,
};
use warren_runtime::broker::BrokerId;
use warren_runtime::confirm::PublishError;
use warren_runtime::node::Node;
use warren_test_support::eventually;

const A: BrokerId = BrokerId(0);
const B: BrokerId = BrokerId(1);
const PRECHANNELS: u32 = 3;

/// Settings for quick reconnects in tests.
const FAST: &str = "prechannels = 3\nheartbeat_secs = 5";

/// FAST, and a short fail-back watch, for tests that wait for old grants to be released.
const FAST_WATCH: &str =
    "prechannels = 3\nheartbeat_secs = 5\n\n[listener]\nfail_back_watch_ms = 300";

/// Declares the listener's exchange and durable queue on a broker, so messages published
/// there are kept even before the listener arrives.
async fn prepare(client: &Client, exchange: &str, queue: &str, durable_exchange: bool) {
    client
        .channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                durable: durable_exchange,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange");
    client.queue(queue, FieldTable::default()).await;
    client
        .channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "#".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
}

fn on(handle: &ListenerHandle, broker: BrokerId) -> bool {
    handle.is_consuming() && handle.current().is_some_and(|(b, _)| b == broker)
}

/// The listener drains no old grant any more (it gave the channel back).
async fn drained(handle: &ListenerHandle) -> bool {
    handle.status().await.is_ok_and(|s| s.draining.is_empty())
}

/// None of these listeners drains an old grant any more.
async fn no_draining(handles: &[&ListenerHandle]) -> bool {
    for handle in handles {
        if !drained(handle).await {
            return false;
        }
    }
    true
}

/// Fails a listener on A over to B, makes its handlers hang (closes `gate`), publishes
/// `count` messages to B (Msg-IDs `<prefix>-<i>`) and restarts A: a fail-back begins
/// with a backlog on B that cannot drain until the gate opens.
async fn fail_back_with_backlog(
    handle: &ListenerHandle,
    (a, client_b): (&Broker, &Client),
    exchange: &str,
    gate: &std::sync::atomic::AtomicBool,
    (count, prefix): (usize, &str),
) {
    assert!(eventually(SOON, || on(handle, A)).await);
    a.kill().await;
    assert!(eventually(SOON, || on(handle, B)).await, "no failover");
    gate.store(false, std::sync::atomic::Ordering::SeqCst);
    for i in 0..count {
        let message = Envelope::new("t", "x").with("Msg-ID", format!("{prefix}-{i}"));
        client_b.publish(exchange, "k", &message).await;
    }
    a.restart().await;
}

/// Two brokers of the test's own (A primary, B secondary), a node on both, and a client on
/// B that has declared the test's exchange and durable queue there: (brokers, node name,
/// exchange, queue, node, client on B).
async fn two_brokers(
    label: &str,
    settings: &str,
    durable_exchange: bool,
) -> (Vec<Broker>, String, String, String, Node, Client) {
    let brokers = Broker::start_many(2).await;
    let name = unique_node(label);
    let (exchange, queue) = (format!("{name}-ex"), format!("{name}-q"));
    let uris = [brokers[0].uri(), brokers[1].uri()];
    let node = start_node(config(&name, &uris, settings)).await;
    let client_b = Client::connect(&uris[1], &name).await;
    prepare(&client_b, &exchange, &queue, durable_exchange).await;
    (brokers, name, exchange, queue, node, client_b)
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

#[tokio::test(flavor = "multi_thread")]
async fn float_failover_and_fail_back_are_fast_and_exactly_once_per_loss() {
    let setup = two_brokers("failover", FAST_WATCH, false).await;
    let (brokers, _, exchange, queue, node, client_b) = setup;
    let a = &brokers[0];
    let seen = Seen::default();
    let spec = ListenerSpec::new("failover")
        .queue(QueueSpec::named(&queue).durable())
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "#")
        .responder("t", "*", recording(&seen, Duration::ZERO));
    let handle = spawn_listener(SpecListener(spec), &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(
        eventually(SOON, || on(&handle, A)).await,
        "starts on the primary"
    );

    let (mut failovers, mut failbacks) = (Vec::new(), Vec::new());
    for cycle in 0..5 {
        let grant_before = handle.current().map_or(0, |(_, grant)| grant);
        // A message already waiting on B is handled as soon as the listener consumes
        // there: the time from the SIGKILL to its handling is the failover time.
        let id = format!("failover-{cycle}");
        client_b
            .publish(
                &exchange,
                "k",
                &Envelope::new("t", "x").with("Msg-ID", id.as_str()),
            )
            .await;
        let killed = Instant::now();
        a.kill().await;
        assert!(
            eventually(Duration::from_secs(10), || seen.first_seen(&id).is_some()).await,
            "cycle {cycle}: nothing handled on the secondary"
        );
        let failover = seen.first_seen(&id).map_or(Duration::MAX, |at| at - killed);
        assert!(on(&handle, B));
        assert_eq!(
            handle.current().map(|(_, grant)| grant),
            Some(grant_before + 1),
            "exactly one new grant per loss"
        );

        let back = a.restart_timed().await;
        assert!(
            eventually(Duration::from_secs(15), || on(&handle, A)).await,
            "cycle {cycle}: no fail-back"
        );
        let failback = back.elapsed();
        assert!(
            until(SOON, || drained(&handle)).await,
            "cycle {cycle}: the old grant was not released"
        );
        println!("cycle {cycle}: failover {failover:?}, fail-back {failback:?}");
        failovers.push(failover);
        failbacks.push(failback);
    }
    let (failover, failback) = (median(failovers.clone()), median(failbacks.clone()));
    println!(
        "failover (SIGKILL → first message handled on the secondary): median {failover:?} of {failovers:?}"
    );
    println!(
        "fail-back (primary accepting AMQP → consuming on it): median {failback:?} of {failbacks:?}"
    );
    assert!(
        failover <= Duration::from_secs(2),
        "failover median {failover:?} > 2 s"
    );
    assert!(
        failback <= Duration::from_secs(1),
        "fail-back median {failback:?} > 1 s"
    );
    handle.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_back_drains_the_secondary_before_closing_it() {
    let setup = two_brokers("drain", FAST_WATCH, false).await;
    let (brokers, name, exchange, queue, node, client_b) = setup;
    let (a, b) = (&brokers[0], &brokers[1]);
    let seen = Seen::default();
    // While the gate is closed, handlers wait: the backlog is certainly still on B when A
    // comes back.
    let gate = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (gate_in, seen_in) = (gate.clone(), seen.clone());
    let spec = ListenerSpec::new("drain")
        .queue(QueueSpec::named(&queue).durable())
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "#")
        .prefetch(10)
        .responder("t", "*", move |event: warren_listeners::Event| {
            let (gate, seen) = (gate_in.clone(), seen_in.clone());
            async move {
                let until = Instant::now() + Duration::from_secs(30);
                while !gate.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                seen.record(event.envelope().msg_id().unwrap_or(""));
                Ok(())
            }
        });
    let handle = spawn_listener(SpecListener(spec), &app_context(&node, "test"))
        .await
        .expect("listener starts");
    const BACKLOG: usize = 1_000;
    fail_back_with_backlog(&handle, (a, &client_b), &exchange, &gate, (BACKLOG, "b")).await;
    // Make-before-break: the new grant on A is granted while the old one on B still drains.
    let mut saw_both = false;
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && !saw_both {
        if let Ok(status) = handle.status().await {
            let active_on_a = status.active.is_some_and(|(broker, _)| broker == A);
            let draining_on_b = status.draining.iter().any(|(broker, _)| *broker == B);
            saw_both = active_on_a && draining_on_b;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        saw_both,
        "no moment with a new grant on A and a draining one on B"
    );
    assert!(
        client_b.ready(&queue).await > 0,
        "the backlog is still on B when A took over"
    );
    gate.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(30), || seen.distinct() == BACKLOG).await,
        "{} of {BACKLOG} handled: messages stranded on the secondary",
        seen.distinct()
    );
    assert!(
        until(SOON, || drained(&handle)).await,
        "the drained grant was not released"
    );
    assert_eq!(client_b.ready(&queue).await, 0, "nothing left on B");
    assert!(on(&handle, A));
    assert!(
        until(SOON, || async {
            b.channels(&format!("{name}/consume")).await == PRECHANNELS
        })
        .await,
        "B keeps only its prechannels: {}",
        b.channels(&format!("{name}/consume")).await
    );
    println!(
        "fail-back drained {BACKLOG} messages from the secondary, {} duplicates",
        seen.duplicates()
    );
    handle.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn sticky_grants_never_move() {
    let brokers = Broker::start_many(2).await;
    let (a, b) = (&brokers[0], &brokers[1]);
    let name = unique_node("sticky");
    let exchange = format!("{name}-ex");
    let node = start_node(config(&name, &[a.uri(), b.uri()], FAST)).await;
    let seen = Seen::default();
    let spec = ListenerSpec::new("sticky")
        .channel(ChannelKind::Broker(B))
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "#")
        .responder("t", "*", recording(&seen, Duration::ZERO));
    let handle = spawn_listener(SpecListener(spec), &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(
        eventually(SOON, || on(&handle, B)).await,
        "sticky starts on B"
    );

    a.kill().await;
    a.restart().await;
    assert!(
        eventually(SOON, || node.context().registry.primary().map(|p| p.id)
            == Some(A))
        .await
    );
    assert_eq!(
        handle.current(),
        Some((B, 1)),
        "A's loss and return do not move it"
    );

    b.kill().await;
    assert!(eventually(SOON, || !handle.is_consuming()).await);
    let report = node.context().assignments.inspect().await.expect("inspect");
    assert!(
        report.reservations.iter().any(|r| r.contains("sticky")),
        "waits as a reservation: {report:?}"
    );
    assert!(
        report.grants.iter().all(|l| !l.client.contains("sticky")),
        "no grant elsewhere: {report:?}"
    );

    b.restart().await;
    assert!(
        eventually(Duration::from_secs(15), || on(&handle, B)).await,
        "sticky resumes on B"
    );
    assert_eq!(handle.current().map(|(_, grant)| grant), Some(2));
    let client_b = Client::connect(&b.uri(), &name).await;
    client_b
        .publish(
            &exchange,
            "k",
            &Envelope::new("t", "x").with("Msg-ID", "after"),
        )
        .await;
    assert!(eventually(SOON, || seen.first_seen("after").is_some()).await);
    handle.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_channel_leaks_after_five_kill_restart_cycles() {
    let brokers = Broker::start_many(2).await;
    let (a, b) = (&brokers[0], &brokers[1]);
    let name = unique_node("leaks");
    let node = start_node(config(&name, &[a.uri(), b.uri()], FAST)).await;
    let ctx = app_context(&node, "test");
    let mut floats = Vec::new();
    for i in 0..3 {
        let spec = ListenerSpec::new(format!("float{i}"));
        floats.push(
            spawn_listener(SpecListener(spec), &ctx)
                .await
                .expect("float"),
        );
    }
    let sticky = spawn_listener(
        SpecListener(ListenerSpec::new("sticky").channel(ChannelKind::Broker(B))),
        &ctx,
    )
    .await
    .expect("sticky");
    let all_on = |broker: BrokerId| floats.iter().all(|h| on(h, broker));
    assert!(eventually(SOON, || all_on(A) && on(&sticky, B)).await);
    // B is never killed: its connection must live through every cycle (closing one channel
    // from two places at once makes lapin drop the whole connection).
    let b_generation = node.context().registry.status(B).map(|s| s.generation);

    for cycle in 0..5 {
        a.kill().await;
        assert!(
            eventually(SOON, || all_on(B)).await,
            "cycle {cycle}: floats did not fail over"
        );
        a.restart().await;
        assert!(
            eventually(Duration::from_secs(15), || all_on(A)).await,
            "cycle {cycle}: floats did not come back"
        );
        assert!(
            until(SOON, || async {
                let mut all: Vec<&ListenerHandle> = floats.iter().collect();
                all.push(&sticky);
                no_draining(&all).await
            })
            .await,
            "cycle {cycle}: drained grants not given back"
        );
        assert!(on(&sticky, B), "cycle {cycle}: the sticky listener moved");
        if node.context().registry.status(B).map(|s| s.generation) != b_generation {
            let log = std::fs::read_to_string(b.node_log()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "the last lines of B's log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        assert_eq!(
            node.context().registry.status(B).map(|s| s.generation),
            b_generation,
            "cycle {cycle}: B's connection was lost"
        );
    }
    let consume = format!("{name}/consume");
    let expected_a = PRECHANNELS + 3;
    let expected_b = PRECHANNELS + 1;
    let settled = until(SOON, || async {
        a.channels(&consume).await == expected_a && b.channels(&consume).await == expected_b
    })
    .await;
    assert!(
        settled,
        "channels: A {} (expected {expected_a}), B {} (expected {expected_b})",
        a.channels(&consume).await,
        b.channels(&consume).await
    );
    for handle in floats.iter().chain([&sticky]) {
        handle.stop().await.expect("stop");
    }
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_thousand_messages_survive_a_primary_kill_and_restart() {
    const MESSAGES: usize = 20_000;
    let brokers = Broker::start_many(2).await;
    let (a, b) = (&brokers[0], &brokers[1]);
    let name = unique_node("e2e");
    let (exchange, queue) = (format!("{name}-ex"), format!("{name}-q"));
    let node = start_node(config(&name, &[a.uri(), b.uri()], FAST)).await;
    for broker in [a, b] {
        let client = Client::connect(&broker.uri(), &name).await;
        prepare(&client, &exchange, &queue, true).await;
        let _ = client.connection.close(200, "prepared".into()).await;
    }
    let seen = Seen::default();
    let spec = ListenerSpec::new("e2e")
        .queue(QueueSpec::named(&queue).durable())
        .exchange(Exchange::topic(&exchange).durable())
        .bind(&exchange, "#")
        .prefetch(100)
        .concurrency(8)
        .responder("t", "*", recording(&seen, Duration::ZERO));
    let handle = spawn_listener(SpecListener(spec), &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(eventually(SOON, || on(&handle, A)).await);

    let publisher = node.context().publisher.clone();
    let confirmed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let publishing = {
        let (confirmed, exchange) = (confirmed.clone(), exchange.clone());
        tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut inflight = FuturesUnordered::new();
            for i in 0..MESSAGES {
                let (publisher, exchange) = (publisher.clone(), exchange.clone());
                inflight.push(async move {
                    let envelope = Envelope::new("t", "x").with("Msg-ID", format!("e2e-{i}"));
                    let options = publisher.options().persistent();
                    publisher.publish(&exchange, "k", envelope, options).await
                });
                if inflight.len() >= 200
                    && let Some(result) = inflight.next().await
                {
                    match result {
                        Ok(_) => confirmed.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
                        Err(error) => {
                            failures.push(error);
                            0
                        }
                    };
                }
            }
            while let Some(result) = inflight.next().await {
                match result {
                    Ok(_) => {
                        confirmed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Err(error) => failures.push(error),
                }
            }
            failures
        })
    };
    let count = || confirmed.load(std::sync::atomic::Ordering::SeqCst);
    assert!(eventually(Duration::from_secs(60), || count() >= 5_000).await);
    a.kill().await;
    assert!(
        eventually(Duration::from_secs(60), || count() >= 12_000).await,
        "publishing stalled after the kill: {}",
        count()
    );
    a.restart().await;
    let failures = publishing.await.expect("publisher task");
    assert!(
        failures.is_empty(),
        "publishes failed: {:?}",
        &failures[..failures.len().min(5)]
    );
    assert!(
        eventually(Duration::from_secs(120), || seen.distinct() == MESSAGES).await,
        "lost messages: {} of {MESSAGES} handled",
        seen.distinct()
    );
    assert!(
        eventually(Duration::from_secs(15), || on(&handle, A)).await,
        "back on A"
    );
    println!(
        "end to end: {MESSAGES} published with confirms across a primary SIGKILL and restart, all handled, {} duplicates",
        seen.duplicates()
    );
    handle.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn publishing_with_no_broker_waits_for_its_bound_then_fails() {
    let brokers = Broker::start_many(1).await;
    let a = &brokers[0];
    let name = unique_node("nobroker");
    let node = start_node(config(
        &name,
        &[a.uri()],
        "prechannels = 1\n\n[publisher]\ntimeout_ms = 1000",
    ))
    .await;
    let publisher = node.context().publisher.clone();
    publisher
        .publish("", "nowhere", Envelope::new("t", "x"), publisher.options())
        .await
        .expect("publishes while the broker is up");
    a.kill().await;
    assert!(eventually(SOON, || node.context().registry.primary().is_none()).await);
    let started = Instant::now();
    let result = publisher
        .publish("", "nowhere", Envelope::new("t", "x"), publisher.options())
        .await;
    let waited = started.elapsed();
    assert!(
        matches!(result, Err(PublishError::NoBroker(_))),
        "{result:?}"
    );
    assert!(
        waited >= Duration::from_millis(900),
        "waited for its bound: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "and not much longer: {waited:?}"
    );
    println!(
        "no broker: {}",
        result.err().map(|e| e.to_string()).unwrap_or_default()
    );

    a.restart().await;
    assert!(
        eventually(Duration::from_secs(15), || node
            .context()
            .registry
            .primary()
            .is_some())
        .await
    );
    publisher
        .publish("", "nowhere", Envelope::new("t", "x"), publisher.options())
        .await
        .expect("publishes again once the broker is back");
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn other_zones_are_never_primary_but_serve_sticky_grants() {
    let brokers = Broker::start_many(2).await;
    let (a, b) = (&brokers[0], &brokers[1]);
    let name = unique_node("zones");
    let text = format!(
        "{}\n[zones.east]\nbrokers = [\"{}\"]\n",
        common::config_text(&name, &[a.uri()], FAST),
        b.uri()
    );
    let config =
        warren_runtime::config::Config::parse(&text, std::path::Path::new("test.ini"), &[], None)
            .expect("config");
    let node = start_node(config).await;
    let registry = node.context().registry.clone();
    assert!(
        eventually(SOON, || registry.is_available(B)).await,
        "the east broker is connected"
    );
    assert_eq!(
        registry.broker(B).map(|b| b.zone.clone()),
        Some("east".to_string())
    );
    let ctx = app_context(&node, "test");
    let east = spawn_listener(
        SpecListener(ListenerSpec::new("east").channel(ChannelKind::Tag("east".to_string()))),
        &ctx,
    )
    .await
    .expect("east listener");
    let float = spawn_listener(SpecListener(ListenerSpec::new("float")), &ctx)
        .await
        .expect("float listener");
    assert!(eventually(SOON, || on(&east, B) && on(&float, A)).await);

    a.kill().await;
    assert!(eventually(SOON, || registry.primary().is_none()).await);
    assert!(registry.is_available(B));
    assert!(eventually(SOON, || !float.is_consuming()).await);
    assert!(
        float.current().is_none(),
        "a float grant never goes to another zone"
    );
    assert!(on(&east, B), "the sticky one stays on the east broker");
    a.restart().await;
    assert!(eventually(Duration::from_secs(15), || on(&float, A)).await);
    east.stop().await.expect("stop");
    float.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn echo_serves_through_the_secondary_and_moves_back() {
    let brokers = Broker::start_many(2).await;
    let (a, b) = (&brokers[0], &brokers[1]);
    let name = unique_node("echo-failover");
    let node = start_node(config(&name, &[a.uri(), b.uri()], FAST)).await;
    let echo = spawn_listener(
        warren_app_echo::EchoListener::default(),
        &app_context(&node, "echo"),
    )
    .await
    .expect("echo starts");
    assert!(eventually(SOON, || on(&echo, A)).await);
    let call = |uri: String, tag: &'static str| {
        let name = format!("{name}-{tag}");
        async move {
            let mut client = Client::connect(&uri, &name).await;
            let request = client.request("echo", "req").with("Payload", tag);
            client.publish("echo", "echo.req", &request).await;
            let reply = client.reply(SOON).await.expect("an echo reply");
            assert_eq!(reply.get_str("Payload"), Some(tag));
            assert_eq!(reply.msg_id(), request.msg_id());
        }
    };
    call(a.uri(), "via-a").await;
    a.kill().await;
    assert!(eventually(SOON, || on(&echo, B)).await, "echo moved to B");
    call(b.uri(), "via-b").await;
    a.restart().await;
    assert!(
        eventually(Duration::from_secs(15), || on(&echo, A)).await,
        "echo moved back to A"
    );
    call(a.uri(), "via-a-again").await;
    echo.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}

/// A handler that waits while `gate` is closed (bounded), then records the message.
fn gated(
    gate: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    seen: &Seen,
) -> impl warren_listeners::HandlerFn {
    let (gate, seen) = (gate.clone(), seen.clone());
    move |event: warren_listeners::Event| {
        let (gate, seen) = (gate.clone(), seen.clone());
        async move {
            let until = Instant::now() + Duration::from_secs(60);
            while !gate.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen.record(event.envelope().msg_id().unwrap_or(""));
            Ok(())
        }
    }
}

/// Starts `spec` bound to `exchange` with `#`, one message at a time, every message
/// handled by `responder` (a `gated` one).
async fn gated_listener(
    node: &Node,
    spec: ListenerSpec,
    exchange: &str,
    responder: impl warren_listeners::HandlerFn,
) -> ListenerHandle {
    let spec = spec
        .exchange(Exchange::topic(exchange))
        .bind(exchange, "#")
        .prefetch(1)
        .responder("t", "*", responder);
    spawn_listener(SpecListener(spec), &app_context(node, "test"))
        .await
        .expect("listener starts")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_broker_times_out_operations_instead_of_hanging_the_listener() {
    let brokers = Broker::start_many(1).await;
    let a = &brokers[0];
    let name = unique_node("hung");
    let exchange = format!("{name}-ex");
    // No heartbeats: nothing but warren's own deadlines notices a broker that hangs.
    let node = start_node(config(
        &name,
        &[a.uri()],
        "prechannels = 3\nheartbeat_secs = 0\noperation_timeout_ms = 1000",
    ))
    .await;
    let seen = Seen::default();
    let spec = ListenerSpec::new("hung")
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "k")
        .responder("t", "*", recording(&seen, Duration::ZERO));
    let handle = spawn_listener(SpecListener(spec), &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(eventually(SOON, || on(&handle, A)).await);

    a.freeze().await;
    let started = Instant::now();
    let added = handle
        .add_binding(warren_listeners::Binding::new(&exchange, "k2"))
        .await;
    let took = started.elapsed();
    assert!(added.is_err(), "a bind to a hung broker cannot succeed");
    assert!(
        took < Duration::from_secs(3),
        "the bind waited {took:?} for a hung broker"
    );
    let started = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(5), handle.status())
        .await
        .expect("the actor answers while the broker hangs")
        .expect("status");
    println!("while frozen: {status:?} after {:?}", started.elapsed());
    assert!(!status.consuming || status.active.is_some_and(|(_, grant)| grant > 1));

    a.thaw().await;
    assert!(
        eventually(Duration::from_secs(30), || on(&handle, A)
            && handle.current().is_some_and(|(_, grant)| grant > 1))
        .await,
        "consuming again on a new channel once the broker answers"
    );
    let client = Client::connect(&a.uri(), &name).await;
    client
        .publish(
            &exchange,
            "k",
            &Envelope::new("t", "x").with("Msg-ID", "after-thaw"),
        )
        .await;
    assert!(eventually(SOON, || seen.first_seen("after-thaw").is_some()).await);
    handle.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fail_back_drain_is_bounded_and_never_deletes_a_queue_with_messages() {
    let brokers = Broker::start_many(2).await;
    let (a, b) = (&brokers[0], &brokers[1]);
    let name = unique_node("bounded");
    let exchange = format!("{name}-ex");
    let node = start_node(config(
        &name,
        &[a.uri(), b.uri()],
        &format!(
            "{FAST}\n\n[listener]\ndrain_timeout_ms = 1500\nfail_back_watch_ms = 0\nstop_timeout_ms = 500"
        ),
    ))
    .await;
    let gate = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let seen = Seen::default();
    let spec = ListenerSpec::new("bounded");
    let handle = gated_listener(&node, spec, &exchange, gated(&gate, &seen)).await;
    let queue = handle.queue_name();
    let client_b = Client::connect(&b.uri(), &name).await;
    // Handlers hang from now on: the backlog on B cannot drain.
    fail_back_with_backlog(&handle, (a, &client_b), &exchange, &gate, (5, "stuck")).await;
    assert!(eventually(Duration::from_secs(15), || on(&handle, A)).await);
    let draining_since = Instant::now();
    assert!(
        until(Duration::from_secs(15), || drained(&handle)).await,
        "the drain of B did not end by its timeout"
    );
    println!("drain ended after {:?}", draining_since.elapsed());
    assert!(
        until(SOON, || async { client_b.ready(&queue).await == 5 }).await,
        "the old queue keeps its messages: {} ready",
        client_b.ready(&queue).await
    );
    gate.store(true, std::sync::atomic::Ordering::SeqCst);
    handle.stop().await.expect("stop");
    client_b.delete_queue(&queue).await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listener_killed_mid_drain_gives_the_drained_channel_back() {
    let settings =
        format!("{FAST}\n\n[listener]\ndrain_timeout_ms = 60000\nfail_back_watch_ms = 0");
    let setup = two_brokers("killed", &settings, false).await;
    let (brokers, name, exchange, queue, node, client_b) = setup;
    let (a, b) = (&brokers[0], &brokers[1]);
    let gate = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let seen = Seen::default();
    let spec = ListenerSpec::new("killed").queue(QueueSpec::named(&queue).durable());
    let handle = gated_listener(&node, spec, &exchange, gated(&gate, &seen)).await;
    // Handlers hang from now on: the drain of B cannot end by itself.
    const BACKLOG: usize = 5;
    fail_back_with_backlog(&handle, (a, &client_b), &exchange, &gate, (BACKLOG, "held")).await;
    assert!(
        until(Duration::from_secs(15), || async {
            handle.status().await.is_ok_and(|status| {
                status.active.is_some_and(|(broker, _)| broker == A)
                    && status.draining.iter().any(|(broker, _)| *broker == B)
            })
        })
        .await,
        "no drain of B under way"
    );
    let consume_b = format!("{name}/consume");
    assert!(
        b.channels(&consume_b).await > PRECHANNELS,
        "B's grant is open"
    );

    // Killed: no post_stop runs; dropping the drained grant gives its channel back, and
    // assignments closes it.
    handle.kill();
    assert!(
        until(SOON, || async {
            b.channels(&consume_b).await == PRECHANNELS
        })
        .await,
        "the drained channel leaked on B: {} open",
        b.channels(&consume_b).await
    );
    assert!(
        until(SOON, || async {
            client_b.ready(&queue).await == BACKLOG as u32
        })
        .await,
        "the unacked messages are back on B's queue: {} ready",
        client_b.ready(&queue).await
    );
    gate.store(true, std::sync::atomic::Ordering::SeqCst);
    client_b.delete_queue(&queue).await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_primary_flap_during_a_drain_never_deletes_the_queue_a_newer_grant_consumes() {
    let brokers = Broker::start_many(2).await;
    let (a, b) = (&brokers[0], &brokers[1]);
    let name = unique_node("flap");
    let exchange = format!("{name}-ex");
    let node = start_node(config(
        &name,
        &[a.uri(), b.uri()],
        &format!("{FAST}\n\n[listener]\nfail_back_watch_ms = 0"),
    ))
    .await;
    let gate = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let seen = Seen::default();
    let spec = ListenerSpec::new("flap")
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "#")
        .prefetch(1)
        .responder("t", "*", gated(&gate, &seen));
    let handle = spawn_listener(SpecListener(spec), &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(eventually(SOON, || on(&handle, A)).await);
    a.kill().await;
    assert!(eventually(SOON, || on(&handle, B)).await);
    gate.store(false, std::sync::atomic::Ordering::SeqCst);
    let client_b = Client::connect(&b.uri(), &name).await;
    for i in 0..3 {
        client_b
            .publish(
                &exchange,
                "k",
                &Envelope::new("t", "x").with("Msg-ID", format!("flap-{i}")),
            )
            .await;
    }
    a.restart().await;
    assert!(eventually(Duration::from_secs(15), || on(&handle, A)).await);
    // The primary dies again while B is still being drained: the listener is back on B,
    // on the same (anonymous) queue the drain consumes.
    a.kill().await;
    assert!(
        eventually(SOON, || on(&handle, B)).await,
        "no second failover"
    );
    let grant_on_b = handle.current().map(|(_, grant)| grant);
    gate.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(
        eventually(SOON, || seen.distinct() == 3).await,
        "{} of 3 handled",
        seen.distinct()
    );
    assert!(until(SOON, || drained(&handle)).await, "the drain ended");
    assert_eq!(
        handle.current().map(|(_, grant)| grant),
        grant_on_b,
        "the queue under the newer grant was deleted (its consumer was cancelled)"
    );
    client_b
        .publish(
            &exchange,
            "k",
            &Envelope::new("t", "x").with("Msg-ID", "after-flap"),
        )
        .await;
    assert!(eventually(SOON, || seen.first_seen("after-flap").is_some()).await);
    handle.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_sent_to_the_secondary_after_a_fail_back_are_not_stranded() {
    let settings = format!("{FAST}\n\n[listener]\nfail_back_watch_ms = 4000");
    let setup = two_brokers("stranded", &settings, true).await;
    let (brokers, _, exchange, queue, node, client_b) = setup;
    let a = &brokers[0];
    let seen = Seen::default();
    let spec = ListenerSpec::new("stranded")
        .queue(QueueSpec::named(&queue).durable())
        .exchange(Exchange::topic(&exchange).durable())
        .bind(&exchange, "#")
        .responder("t", "*", recording(&seen, Duration::ZERO));
    let handle = spawn_listener(SpecListener(spec), &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(eventually(SOON, || on(&handle, A)).await);
    a.kill().await;
    assert!(eventually(SOON, || on(&handle, B)).await);
    a.restart().await;
    assert!(eventually(Duration::from_secs(15), || on(&handle, A)).await);
    // The drain of B found its queue empty; another publisher still sends there.
    assert!(
        until(SOON, || async {
            client_b.ready(&queue).await == 0
                && (drained(&handle).await
                    || handle.status().await.is_ok_and(|s| !s.watching.is_empty()))
        })
        .await
    );
    let sent = Instant::now();
    for i in 0..5 {
        client_b
            .publish(
                &exchange,
                "k",
                &Envelope::new("t", "x").with("Msg-ID", format!("late-{i}")),
            )
            .await;
    }
    assert!(
        eventually(Duration::from_secs(3), || seen.distinct() == 5).await,
        "{} of 5 requests sent to the secondary after the fail-back were handled",
        seen.distinct()
    );
    println!(
        "late requests on the secondary handled within {:?}",
        sent.elapsed()
    );
    assert_eq!(client_b.ready(&queue).await, 0);
    // The watch ends, and with it the old grant.
    assert!(until(SOON, || drained(&handle)).await);
    assert!(on(&handle, A));
    handle.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_declarations_survive_a_broker_restart() {
    let brokers = Broker::start_many(1).await;
    let a = &brokers[0];
    let name = unique_node("durable");
    let node = start_node(config(&name, &[a.uri()], FAST)).await;
    let echo = spawn_listener(
        warren_app_echo::EchoListener::default(),
        &app_context(&node, "echo"),
    )
    .await
    .expect("echo starts");
    assert!(eventually(SOON, || on(&echo, A)).await);
    echo.stop().await.expect("stop");
    node.stop().await.expect("node stops");
    // Mnesia logs declarations asynchronously: without this, a loaded machine's SIGKILL
    // can come before the queue and its binding reached the disk (CI saw NO_ROUTE).
    a.sync_metadata().await;
    a.kill().await;
    a.restart().await;
    let exchanges = a
        .ctl(&["list_exchanges", "--no-table-headers", "name", "durable"])
        .await;
    for exchange in ["echo", "targeted"] {
        assert!(
            exchanges.contains(&format!("{exchange}\ttrue")),
            "`{exchange}` is durable and survived: {exchanges}"
        );
    }
    // A request published while no warren runs is routed to the echo queue, and kept.
    let client = Client::connect(&a.uri(), &name).await;
    let request = client.request("echo", "req").with("Payload", "while-away");
    let confirm = client
        .channel
        .basic_publish(
            "echo".into(),
            "echo.req".into(),
            lapin::options::BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &request.encode(),
            warren_runtime::envelope::publish_properties(false).with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(
        matches!(confirm, lapin::Confirmation::Ack(None)),
        "routed, not returned: {confirm:?}"
    );
    assert_eq!(
        client.ready("echo").await,
        1,
        "waiting in the durable queue"
    );
}
