//! The listener behaviour against the local RabbitMQ: notices in order, responder matching,
//! every outcome (ack, retry, reject, panic, bad JSON, the redelivery limit), run-time
//! bindings surviving a forced close, pause/resume across a reconnect, a graceful stop with
//! a hung handler, at-least-once delivery across a closed connection, and the echo app.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::client::Client;
use common::{SOON, app_context, blocking, config, start_node, unique_node};
use lapin::types::FieldTable;
use lapin::{BasicProperties, ExchangeKind};
use parking_lot::Mutex;
use serde_json::json;
use warren_listeners::{
    Binding, Dispatch, Envelope, Event, Exchange, HandlerError, Listener, ListenerSpec, Notice,
    QueueSpec, spawn_listener,
};
use warren_test_support::{close_connections, eventually, local_ctl, local_uri};

/// A listener for tests: a spec, a record of notices, and a category whose events the hook
/// suppresses.
struct TestListener {
    spec: ListenerSpec,
    notices: Arc<Mutex<Vec<String>>>,
}

impl TestListener {
    fn new(spec: ListenerSpec) -> (Self, Arc<Mutex<Vec<String>>>) {
        let notices = Arc::new(Mutex::new(Vec::new()));
        (
            TestListener {
                spec,
                notices: notices.clone(),
            },
            notices,
        )
    }
}

impl Listener for TestListener {
    fn spec(&self) -> ListenerSpec {
        self.spec.clone()
    }

    fn on_event(&self, event: &Event) -> Dispatch {
        if event.category() == "skip" {
            Dispatch::Suppress
        } else {
            Dispatch::Responders
        }
    }

    fn on_notice(&self, notice: &Notice) {
        let text = match notice {
            Notice::QueueCreated { queue, .. } => format!("queue_created:{queue}"),
            Notice::Consuming(on) => format!("consuming:{on}"),
            Notice::ChannelLost => "channel_lost".to_string(),
            Notice::Returned(_) => "returned".to_string(),
            Notice::FederatorsConsuming => "federators_consuming".to_string(),
        };
        self.notices.lock().push(text);
    }
}

fn counter() -> Arc<AtomicUsize> {
    Arc::new(AtomicUsize::new(0))
}

/// A responder that counts its calls.
fn counting(
    count: &Arc<AtomicUsize>,
) -> impl Fn(Event) -> futures::future::Ready<warren_listeners::HandlerResult> + Send + Sync + 'static
{
    let count = count.clone();
    move |_event| {
        count.fetch_add(1, Ordering::SeqCst);
        futures::future::ready(Ok(()))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn notices_come_in_order() {
    let name = unique_node("notices");
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let (listener, notices) = TestListener::new(ListenerSpec::new("order"));
    let handle = spawn_listener(listener, &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await, "never consuming");
    let queue = handle.queue_name();
    assert!(
        queue.starts_with("order-"),
        "a client-generated name: {queue}"
    );
    handle.stop().await.expect("stop");
    assert_eq!(
        *notices.lock(),
        vec![
            format!("queue_created:{queue}"),
            "consuming:true".to_string(),
            "consuming:false".to_string()
        ]
    );
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_matching_responder_runs_and_the_hook_can_suppress() {
    let name = unique_node("responders");
    let exchange = format!("{name}-ex");
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let (ab, a_any, any_b, any_any) = (counter(), counter(), counter(), counter());
    let spec = ListenerSpec::new("responders")
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "#")
        .responder("a", "b", counting(&ab))
        .responder("a", "*", counting(&a_any))
        .responder("*", "b", counting(&any_b))
        .responder("*", "*", counting(&any_any));
    let (listener, _) = TestListener::new(spec);
    let handle = spawn_listener(listener, &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);
    let client = Client::connect(&local_uri(), &name).await;
    for (category, event) in [("a", "b"), ("a", "c"), ("z", "b"), ("skip", "b")] {
        client
            .publish(&exchange, "k", &Envelope::new(category, event))
            .await;
    }
    assert!(
        eventually(SOON, || handle.stats().received == 4
            && handle.stats().acked == 4)
        .await,
        "{:?}",
        handle.stats()
    );
    assert_eq!(ab.load(Ordering::SeqCst), 1, "(a,b) only for a/b");
    assert_eq!(a_any.load(Ordering::SeqCst), 2, "(a,*) for a/b and a/c");
    assert_eq!(any_b.load(Ordering::SeqCst), 2, "(*,b) for a/b and z/b");
    assert_eq!(
        any_any.load(Ordering::SeqCst),
        3,
        "(*,*) for all but the suppressed one"
    );
    assert_eq!(handle.stats().suppressed, 1);
    handle.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_outcome_acks_requeues_or_dead_letters() {
    let name = unique_node("outcomes");
    let (exchange, dlx, dlq, queue) = (
        format!("{name}-ex"),
        format!("{name}-dlx"),
        format!("{name}-dlq"),
        format!("{name}-q"),
    );
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let client = Client::connect(&local_uri(), &name).await;
    client.declare_exchange(&dlx, ExchangeKind::Fanout).await;
    client.queue(&dlq, FieldTable::default()).await;
    client
        .channel
        .queue_bind(
            dlq.as_str().into(),
            dlx.as_str().into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the dead-letter queue");

    let retried = counter();
    let retried_in = retried.clone();
    let spec = ListenerSpec::new("outcomes")
        .queue(QueueSpec::named(&queue).dead_letter_exchange(&dlx))
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "#")
        .concurrency(4)
        .max_redeliveries(2)
        .responder("t", "ok", |_e: Event| async { Ok(()) })
        .responder("t", "retry-once", move |event: Event| {
            let retried = retried_in.clone();
            async move {
                if event.delivery().redelivered {
                    Ok(())
                } else {
                    retried.fetch_add(1, Ordering::SeqCst);
                    Err(HandlerError::retry("not yet"))
                }
            }
        })
        .responder("t", "reject", |_e: Event| async {
            Err(HandlerError::reject("never"))
        })
        .responder("t", "panic", |_e: Event| async {
            panic!("this handler always panics");
        });
    let (listener, _) = TestListener::new(spec);
    let handle = spawn_listener(listener, &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);

    for event in ["ok", "retry-once", "reject", "panic"] {
        client
            .publish(&exchange, "k", &Envelope::new("t", event))
            .await;
    }
    client
        .publish_raw(
            &exchange,
            "k",
            b"{not json",
            BasicProperties::default().with_content_type("application/json".into()),
        )
        .await;

    // ok 1 + retry-once 2 + reject 1 + panic 3 (max_redeliveries 2: its third failure
    // dead-letters it at once) + bad JSON 1
    assert!(
        eventually(Duration::from_secs(20), || handle.stats().received == 8
            && handle.stats().rejected == 3)
        .await,
        "{:?}",
        handle.stats()
    );
    let stats = handle.stats();
    assert_eq!(stats.acked, 2, "ok and retry-once: {stats:?}");
    assert_eq!(stats.requeued, 3, "one retry and two panics: {stats:?}");
    assert_eq!(stats.handler_panics, 3, "{stats:?}");
    assert_eq!(stats.redelivery_limit, 1, "{stats:?}");
    assert_eq!(
        stats.undecodable, 1,
        "bad JSON seen once, never requeued: {stats:?}"
    );
    assert_eq!(retried.load(Ordering::SeqCst), 1);

    // The listener lives on after the panics.
    client
        .publish(&exchange, "k", &Envelope::new("t", "ok"))
        .await;
    assert!(eventually(SOON, || handle.stats().acked == 3).await);

    // Rejected, past-the-limit and undecodable messages are dead-lettered.
    let mut dead = Vec::new();
    let deadline = Instant::now() + SOON;
    while dead.len() < 3 && Instant::now() < deadline {
        dead.extend(client.drain(&dlq).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut names: Vec<String> = dead
        .iter()
        .map(|(body, envelope)| match envelope {
            Some(envelope) => envelope.name().to_string(),
            None => String::from_utf8_lossy(body).into_owned(),
        })
        .collect();
    names.sort();
    assert_eq!(names, vec!["panic", "reject", "{not json"]);
    assert_eq!(client.ready(&queue).await, 0, "nothing left to retry");

    handle.stop().await.expect("stop");
    client.delete_queue(&queue).await;
    client.delete_queue(&dlq).await;
    node.stop().await.expect("node stops");
}

/// The broker's consumer count of a queue (`None` if the queue does not exist).
fn consumers_of(queue: &str) -> Option<u32> {
    queue_column(queue, "consumers").and_then(|v| v.parse().ok())
}

/// One column of `rabbitmqctl list_queues` for a queue, as the broker sees it (without
/// touching the queue: no declare, so no expiry is reset).
fn queue_column(queue: &str, column: &str) -> Option<String> {
    local_ctl(&["list_queues", "-q", "--no-table-headers", "name", column])
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            let mut fields = line.split('\t');
            (fields.next()? == queue).then(|| fields.next().unwrap_or("").to_string())
        })
}

/// `rabbitmqctl list_bindings` rows (exchange, routing key) for one queue.
fn bindings_of(queue: &str) -> Vec<(String, String)> {
    let out = local_ctl(&[
        "list_bindings",
        "-q",
        "--no-table-headers",
        "source_name",
        "destination_name",
        "routing_key",
    ])
    .unwrap_or_default();
    out.lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            let source = fields.next()?.to_string();
            let destination = fields.next()?;
            let key = fields.next()?.to_string();
            (destination == queue && !source.is_empty()).then_some((source, key))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_bindings_and_responders_survive_a_forced_close() {
    let name = unique_node("rebind");
    let exchange = format!("{name}-ex");
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let added = counter();
    let spec = ListenerSpec::new("rebind")
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "static.key");
    let (listener, notices) = TestListener::new(spec);
    let handle = spawn_listener(listener, &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);
    let queue = handle.queue_name();
    handle
        .add_binding(Binding::new(&exchange, "added.key"))
        .await
        .expect("add a binding");
    handle.add_responder("t", "added", counting(&added));
    let before = blocking({
        let queue = queue.clone();
        move || bindings_of(&queue)
    })
    .await;
    assert!(
        before.contains(&(exchange.clone(), "added.key".to_string())),
        "{before:?}"
    );

    let closed = blocking({
        let name = name.clone();
        move || close_connections(local_ctl, &format!("{name}/consume"), "test: forced close")
    })
    .await
    .expect("close the connection");
    assert_eq!(closed, 1);
    assert!(
        eventually(SOON, || handle
            .current()
            .is_some_and(|(_, grant)| grant == 2)
            && handle.is_consuming())
        .await,
        "no new grant after the forced close"
    );
    let after = blocking({
        let queue = queue.clone();
        move || bindings_of(&queue)
    })
    .await;
    for key in ["static.key", "added.key"] {
        assert!(
            after.contains(&(exchange.clone(), key.to_string())),
            "{key} missing after the reconnect: {after:?}"
        );
    }
    assert_eq!(handle.queue_name(), queue, "the same queue name is re-used");
    let created = notices
        .lock()
        .iter()
        .filter(|n| n.starts_with("queue_created"))
        .count();
    assert_eq!(
        created,
        2,
        "the topology is replayed exactly once per loss: {:?}",
        notices.lock()
    );
    assert!(notices.lock().contains(&"channel_lost".to_string()));

    let client = Client::connect(&local_uri(), &name).await;
    client
        .publish(&exchange, "added.key", &Envelope::new("t", "added"))
        .await;
    assert!(eventually(SOON, || added.load(Ordering::SeqCst) == 1).await);

    assert!(
        handle
            .remove_binding(Binding::new(&exchange, "added.key"))
            .await
            .expect("remove")
    );
    let removed = blocking({
        let queue = queue.clone();
        move || bindings_of(&queue)
    })
    .await;
    assert!(
        !removed.contains(&(exchange.clone(), "added.key".to_string())),
        "{removed:?}"
    );
    handle.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_and_resume_survive_a_reconnect() {
    let name = unique_node("pause");
    let (exchange, queue) = (format!("{name}-ex"), format!("{name}-q"));
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let handled = counter();
    let spec = ListenerSpec::new("pause")
        .queue(QueueSpec::named(&queue))
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "#")
        .responder("t", "*", counting(&handled));
    let (listener, _) = TestListener::new(spec);
    let handle = spawn_listener(listener, &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);
    handle.pause().await.expect("pause");
    assert!(
        handle.wait_consuming(false, SOON).await,
        "still consuming after pause"
    );

    let client = Client::connect(&local_uri(), &name).await;
    client
        .publish(&exchange, "k", &Envelope::new("t", "x"))
        .await;
    blocking({
        let name = name.clone();
        move || close_connections(local_ctl, &format!("{name}/consume"), "test: forced close")
    })
    .await
    .expect("close");
    assert!(
        eventually(SOON, || handle
            .current()
            .is_some_and(|(_, grant)| grant == 2))
        .await,
        "no new grant"
    );
    // The status is a round trip to the actor: it answers after the new channel's set-up
    // finished, which would have started a consumer had the pause been forgotten.
    let status = handle.status().await.expect("status");
    assert!(
        status.declared && status.paused && !status.consuming,
        "paused across the reconnect: {status:?}"
    );
    assert_eq!(
        consumers_of(&queue),
        Some(0),
        "the broker sees no consumer on the queue"
    );
    assert_eq!(handled.load(Ordering::SeqCst), 0);
    assert_eq!(
        client.ready(&queue).await,
        1,
        "the message waits in the queue"
    );

    handle.resume().await.expect("resume");
    assert!(eventually(SOON, || handled.load(Ordering::SeqCst) == 1).await);
    handle.stop().await.expect("stop");
    client.delete_queue(&queue).await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn graceful_stop_does_not_wait_for_a_hung_handler() {
    let name = unique_node("hung");
    let (exchange, queue) = (format!("{name}-ex"), format!("{name}-q"));
    let node = start_node(config(
        &name,
        &[local_uri()],
        "\n[listener]\nstop_timeout_ms = 1000",
    ))
    .await;
    let started = Arc::new(AtomicBool::new(false));
    let started_in = started.clone();
    let spec = ListenerSpec::new("hung")
        .queue(QueueSpec::named(&queue))
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "#")
        .concurrency(2)
        .responder("t", "quick", |_e: Event| async { Ok(()) })
        .responder("t", "hang", move |_e: Event| {
            let started = started_in.clone();
            async move {
                started.store(true, Ordering::SeqCst);
                std::future::pending::<()>().await;
                Ok(())
            }
        });
    let (listener, _) = TestListener::new(spec);
    let handle = spawn_listener(listener, &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);
    let client = Client::connect(&local_uri(), &name).await;
    client
        .publish(&exchange, "k", &Envelope::new("t", "quick"))
        .await;
    assert!(eventually(SOON, || handle.stats().acked == 1).await);
    client
        .publish(&exchange, "k", &Envelope::new("t", "hang"))
        .await;
    assert!(eventually(SOON, || started.load(Ordering::SeqCst)).await);

    let stopping = Instant::now();
    handle.stop().await.expect("stop");
    let took = stopping.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "waited for the handler: {took:?}"
    );
    assert!(
        took < Duration::from_secs(4),
        "a hung handler must not hang the stop: {took:?}"
    );
    assert_eq!(handle.stats().acked, 1, "what finished was acked");
    let mut back = 0;
    for _ in 0..100 {
        back = client.ready(&queue).await;
        if back == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(back, 1, "the hung handler's message is back in the queue");
    client.delete_queue(&queue).await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_message_is_handled_at_least_once_across_a_closed_connection() {
    const MESSAGES: usize = 10_000;
    let name = unique_node("alo");
    let (exchange, queue) = (format!("{name}-ex"), format!("{name}-q"));
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::new(Mutex::new(HashMap::new()));
    let seen_in = seen.clone();
    // From the 3,000th message on, handlers wait until the connection was closed, so the
    // close certainly lands mid-stream with messages in flight.
    let closed = Arc::new(AtomicBool::new(false));
    let closed_in = closed.clone();
    let spec = ListenerSpec::new("alo")
        .queue(QueueSpec::named(&queue).durable())
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "#")
        .prefetch(100)
        .concurrency(8)
        .responder("t", "n", move |event: Event| {
            let seen = seen_in.clone();
            let closed = closed_in.clone();
            async move {
                let gate = Instant::now() + Duration::from_secs(30);
                while seen.lock().len() >= 3_000
                    && !closed.load(Ordering::SeqCst)
                    && Instant::now() < gate
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let id = event.envelope().msg_id().unwrap_or("").to_string();
                *seen.lock().entry(id).or_insert(0) += 1;
                Ok(())
            }
        });
    let (listener, _) = TestListener::new(spec);
    let handle = spawn_listener(listener, &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);

    let client = Client::connect(&local_uri(), &name).await;
    let publisher = {
        let channel = client.channel.clone();
        let exchange = exchange.clone();
        tokio::spawn(async move {
            let mut confirms = Vec::with_capacity(MESSAGES);
            for i in 0..MESSAGES {
                let envelope = Envelope::new("t", "n").with("Msg-ID", format!("m-{i}"));
                let confirm = channel
                    .basic_publish(
                        exchange.as_str().into(),
                        "k".into(),
                        Default::default(),
                        &envelope.encode(),
                        warren_runtime::envelope::publish_properties(false).with_delivery_mode(2),
                    )
                    .await
                    .expect("publish");
                confirms.push(confirm);
            }
            for confirm in confirms {
                common::client::expect_ack(confirm).await;
            }
        })
    };
    assert!(
        eventually(Duration::from_secs(60), || seen.lock().len() >= 3_000).await,
        "consuming too slowly"
    );
    let closed_count = blocking({
        let name = name.clone();
        move || close_connections(local_ctl, &format!("{name}/consume"), "test: mid-stream")
    })
    .await
    .expect("close the connection mid-stream");
    assert_eq!(closed_count, 1);
    closed.store(true, Ordering::SeqCst);
    publisher.await.expect("publisher");
    assert!(
        eventually(Duration::from_secs(120), || seen.lock().len() == MESSAGES).await,
        "only {} of {MESSAGES} handled",
        seen.lock().len()
    );
    let duplicates: u32 = seen.lock().values().map(|n| n - 1).sum();
    println!(
        "at-least-once: {MESSAGES} distinct messages handled, {duplicates} duplicates after the forced close"
    );
    let deadline = Instant::now() + SOON;
    while client.ready(&queue).await > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(client.ready(&queue).await, 0, "the queue is drained");
    assert!(
        eventually(SOON, || handle
            .current()
            .is_some_and(|(_, grant)| grant >= 2))
        .await,
        "the listener moved to a new channel"
    );
    handle.stop().await.expect("stop");
    client.delete_queue(&queue).await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn echo_answers_kapi_requests() {
    let name = unique_node("echo");
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let handle = spawn_listener(
        warren_app_echo::EchoListener::default(),
        &app_context(&node, "echo"),
    )
    .await
    .expect("echo starts");
    assert!(handle.wait_consuming(true, SOON).await);
    assert_eq!(handle.queue_name(), "echo");

    let mut client = Client::connect(&local_uri(), &name).await;
    let request = client
        .request("echo", "req")
        .with("Payload", json!({"text": "hello", "n": [1, 2, 3]}));
    client.publish("echo", "echo.req", &request).await;
    let reply = client.reply(SOON).await.expect("a reply");
    assert_eq!(reply.category(), "echo");
    assert_eq!(reply.name(), "resp");
    assert_eq!(reply.msg_id(), request.msg_id(), "same Msg-ID");
    assert_eq!(
        reply.get("Payload"),
        Some(&json!({"text": "hello", "n": [1, 2, 3]}))
    );
    assert_eq!(reply.app_name(), Some("echo"));
    assert!(reply.node().is_some_and(|n| n == name), "Node is stamped");

    // Without a Server-ID there is nobody to answer: rejected, not retried forever.
    let rejected_before = handle.stats().rejected;
    client
        .publish("echo", "echo.req", &Envelope::new("echo", "req"))
        .await;
    assert!(eventually(SOON, || handle.stats().rejected == rejected_before + 1).await);
    handle.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_returned_reply_is_the_handlers_when_awaited_else_a_retry_never_an_ack() {
    let name = unique_node("returned");
    let exchange = format!("{name}-ex");
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let outcome: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let runs = counter();
    let (outcome_in, runs_in, target) = (outcome.clone(), runs.clone(), exchange.clone());
    let spec = ListenerSpec::new("returned")
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "in")
        .max_redeliveries(1)
        .responder("t", "*", move |event: Event| {
            let (outcome, runs, target) = (outcome_in.clone(), runs_in.clone(), target.clone());
            async move {
                let options = warren_runtime::confirm::PublishOptions::new(SOON).mandatory();
                let reply = Envelope::new("t", "lost");
                let pending = event
                    .publish_with(&target, "nobody.listens", reply, options)
                    .await?;
                if event.name() == "awaits" {
                    // The handler takes the answer: what it does with it counts.
                    let published = pending.await?;
                    *outcome.lock() = Some(format!("{published:?}"));
                } else {
                    // Left to the delivery, which waits for it: a return is a retry.
                    runs.fetch_add(1, Ordering::SeqCst);
                }
                Ok(())
            }
        });
    let (listener, notices) = TestListener::new(spec);
    let handle = spawn_listener(listener, &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);
    let client = Client::connect(&local_uri(), &name).await;
    client
        .publish(&exchange, "in", &Envelope::new("t", "awaits"))
        .await;
    assert!(eventually(SOON, || handle.stats().acked == 1).await);
    let outcome = outcome.lock().clone().unwrap_or_default();
    assert!(outcome.starts_with("Returned"), "{outcome}");
    assert!(
        outcome.contains("NO_ROUTE") || outcome.contains("312"),
        "{outcome}"
    );
    assert!(notices.lock().contains(&"returned".to_string()));

    client
        .publish(&exchange, "in", &Envelope::new("t", "leaves"))
        .await;
    // A retry, then (max_redeliveries 1) parked: never acked as if the reply had gone out.
    assert!(
        eventually(SOON, || handle.stats().parked == 1).await,
        "{:?}",
        handle.stats()
    );
    let stats = handle.stats();
    assert_eq!(runs.load(Ordering::SeqCst), 2, "handled twice");
    assert_eq!((stats.acked, stats.requeued), (1, 1), "{stats:?}");
    assert_eq!(stats.unconfirmed, 2, "{stats:?}");
    handle.stop().await.expect("stop");
    client
        .delete_queue(&format!("{}.parked", handle.queue_name()))
        .await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_concurrency_one_the_next_delivery_starts_before_the_reply_is_confirmed() {
    let broker = common::Broker::start_many(1).await.remove(0);
    let name = unique_node("pipelined");
    let (exchange, queue) = (format!("{name}-ex"), format!("{name}-q"));
    let node = start_node(config(&name, &[broker.uri()], "")).await;
    let gate = Arc::new(AtomicBool::new(true));
    let started: Arc<Mutex<Vec<String>>> = Arc::default();
    let (gate_in, started_in, target) = (gate.clone(), started.clone(), exchange.clone());
    let spec = ListenerSpec::new("pipelined")
        .queue(QueueSpec::named(&queue))
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "in.*")
        .prefetch(10)
        .concurrency(1)
        .responder("t", "*", move |event: Event| {
            let (gate, started, target) = (gate_in.clone(), started_in.clone(), target.clone());
            async move {
                started.lock().push(event.name().to_string());
                let until = Instant::now() + Duration::from_secs(30);
                while !gate.load(Ordering::SeqCst) && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                // Routed nowhere, but confirmed: the broker has it.
                let reply = Envelope::new("t", "reply");
                event.publish(&target, "out", reply).await?;
                Ok(())
            }
        });
    let (listener, _) = TestListener::new(spec);
    let handle = spawn_listener(listener, &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);
    let client = Client::connect(&broker.uri(), &name).await;
    // Warm up: the publish channel is open before the broker is frozen.
    client
        .publish(&exchange, "in.warm", &Envelope::new("t", "warm"))
        .await;
    assert!(eventually(SOON, || handle.stats().acked == 1).await);

    // The first handler waits; the other two messages reach the listener meanwhile.
    gate.store(false, Ordering::SeqCst);
    for name in ["first", "second", "third"] {
        client
            .publish(&exchange, "in.x", &Envelope::new("t", name))
            .await;
    }
    assert!(
        common::until(SOON, || async { client.ready(&queue).await == 0 }).await,
        "all three delivered to the listener"
    );
    // A frozen broker takes the replies but confirms none of them.
    broker.freeze().await;
    gate.store(true, Ordering::SeqCst);
    let overtaken = eventually(Duration::from_secs(3), || started.lock().len() == 4).await;
    let acked_while_frozen = handle.stats().acked;
    broker.thaw().await;
    assert!(
        overtaken,
        "the next deliveries waited for a confirm: started {:?}",
        started.lock()
    );
    assert_eq!(
        *started.lock(),
        ["warm", "first", "second", "third"],
        "one at a time, in queue order"
    );
    assert_eq!(
        acked_while_frozen, 1,
        "nothing acked before its reply was confirmed"
    );
    assert!(
        eventually(SOON, || handle.stats().acked == 4).await,
        "settled once the confirms came: {:?}",
        handle.stats()
    );
    let stats = handle.stats();
    assert_eq!((stats.requeued, stats.unconfirmed), (0, 0), "{stats:?}");
    handle.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn pausing_keeps_an_anonymous_queue_and_stopping_deletes_it() {
    let name = unique_node("anon");
    let exchange = format!("{name}-ex");
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let handled = counter();
    let spec = ListenerSpec::new("anon")
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "#")
        .responder("t", "*", counting(&handled));
    let (listener, _) = TestListener::new(spec);
    let handle = spawn_listener(listener, &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);
    let queue = handle.queue_name();
    handle.pause().await.expect("pause");
    assert!(handle.wait_consuming(false, SOON).await);
    let client = Client::connect(&local_uri(), &name).await;
    client
        .publish(&exchange, "k", &Envelope::new("t", "while-paused"))
        .await;
    assert_eq!(
        client.ready(&queue).await,
        1,
        "the queue outlives the pause with its message"
    );
    handle.resume().await.expect("resume");
    assert!(eventually(SOON, || handled.load(Ordering::SeqCst) == 1).await);
    assert_eq!(
        handle.current().map(|(_, grant)| grant),
        Some(1),
        "no new channel was needed"
    );

    handle.stop().await.expect("stop");
    let gone = client
        .channel
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(
        gone.is_err(),
        "a stopped listener deletes its anonymous queue"
    );
    node.stop().await.expect("node stops");
}

/// A listener whose hook panics on category "boom" and whose notices panic too.
struct Panicky(ListenerSpec);

impl Listener for Panicky {
    fn spec(&self) -> ListenerSpec {
        self.0.clone()
    }

    fn on_event(&self, event: &Event) -> Dispatch {
        if event.category() == "boom" {
            panic!("on_event cannot take this");
        }
        Dispatch::Responders
    }

    fn on_notice(&self, notice: &Notice) {
        if let Notice::QueueCreated { .. } = notice {
            panic!("on_notice cannot take this either");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panic_in_on_event_is_a_nack_and_the_listener_keeps_consuming() {
    let name = unique_node("hookpanic");
    let (exchange, queue) = (format!("{name}-ex"), format!("{name}-q"));
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let handled = counter();
    let spec = ListenerSpec::new("hookpanic")
        .queue(QueueSpec::named(&queue))
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "#")
        .max_redeliveries(1)
        .responder("t", "*", counting(&handled));
    let handle = spawn_listener(Panicky(spec), &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);
    assert!(handle.stats().notice_panics >= 1, "{:?}", handle.stats());
    let client = Client::connect(&local_uri(), &name).await;
    client
        .publish(&exchange, "k", &Envelope::new("boom", "x"))
        .await;
    client
        .publish(&exchange, "k", &Envelope::new("t", "after"))
        .await;
    assert!(
        eventually(SOON, || handled.load(Ordering::SeqCst) == 1).await,
        "the listener handles the next message: {:?}",
        handle.stats()
    );
    // Two failures (max_redeliveries 1): parked, not requeued forever.
    assert!(
        eventually(SOON, || handle.stats().parked == 1).await,
        "{:?}",
        handle.stats()
    );
    let stats = handle.stats();
    assert_eq!(stats.handler_panics, 2, "{stats:?}");
    assert_eq!(stats.requeued, 1, "{stats:?}");
    assert!(handle.is_consuming());
    assert_eq!(client.ready(&format!("{queue}.parked")).await, 1);
    assert_eq!(client.ready(&queue).await, 0);
    handle.stop().await.expect("stop");
    client.delete_queue(&queue).await;
    client.delete_queue(&format!("{queue}.parked")).await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_and_resume_back_to_back_leave_the_listener_consuming() {
    let name = unique_node("flicker");
    let exchange = format!("{name}-ex");
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let handled = counter();
    let spec = ListenerSpec::new("flicker")
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "#")
        .responder("t", "*", counting(&handled));
    let (listener, _) = TestListener::new(spec);
    let handle = spawn_listener(listener, &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);
    for _ in 0..20 {
        handle.pause().await.expect("pause");
        handle.resume().await.expect("resume");
    }
    assert!(
        eventually(SOON, || handle.is_consuming()).await,
        "consuming after the last resume"
    );
    let client = Client::connect(&local_uri(), &name).await;
    client
        .publish(&exchange, "k", &Envelope::new("t", "x"))
        .await;
    assert!(
        eventually(SOON, || handled.load(Ordering::SeqCst) == 1).await,
        "a message after the flicker is handled: {:?}",
        handle.status().await
    );
    let status = handle.status().await.expect("status");
    assert!(status.consuming && !status.paused, "{status:?}");
    assert_eq!(consumers_of(&handle.queue_name()), Some(1), "one consumer");
    handle.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_channel_lets_running_handlers_finish() {
    let name = unique_node("inflight");
    let (exchange, queue) = (format!("{name}-ex"), format!("{name}-q"));
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let started = counter();
    let finished: Arc<Mutex<Vec<usize>>> = Arc::new(Mutex::new(Vec::new()));
    let closed = Arc::new(AtomicBool::new(false));
    let (started_in, finished_in, closed_in) = (started.clone(), finished.clone(), closed.clone());
    let spec = ListenerSpec::new("inflight")
        .queue(QueueSpec::named(&queue))
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "#")
        .responder("t", "slow", move |_e: Event| {
            let (started, finished, closed) =
                (started_in.clone(), finished_in.clone(), closed_in.clone());
            async move {
                let run = started.fetch_add(1, Ordering::SeqCst) + 1;
                // The first run is still at an await point when its channel dies, and goes
                // on after that.
                let until = Instant::now() + Duration::from_secs(30);
                while run == 1 && !closed.load(Ordering::SeqCst) && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                finished.lock().push(run);
                Ok(())
            }
        });
    let (listener, _) = TestListener::new(spec);
    let handle = spawn_listener(listener, &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);
    let client = Client::connect(&local_uri(), &name).await;
    client
        .publish(&exchange, "k", &Envelope::new("t", "slow"))
        .await;
    assert!(eventually(SOON, || started.load(Ordering::SeqCst) == 1).await);
    let closed_count = blocking({
        let name = name.clone();
        move || close_connections(local_ctl, &format!("{name}/consume"), "test: mid-handler")
    })
    .await
    .expect("close");
    assert_eq!(closed_count, 1);
    closed.store(true, Ordering::SeqCst);
    assert!(
        eventually(SOON, || finished.lock().contains(&1)).await,
        "the handler running when the channel died was dropped mid-flight: finished {:?}",
        finished.lock()
    );
    // Its ack went nowhere: the broker redelivered, and the message was handled again.
    assert!(eventually(SOON, || finished.lock().len() == 2).await);
    assert!(eventually(SOON, || handle.stats().acked >= 1).await);
    handle.stop().await.expect("stop");
    client.delete_queue(&queue).await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_anonymous_queue_does_not_expire() {
    let name = unique_node("expiry");
    let exchange = format!("{name}-ex");
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let handled = counter();
    let spec = ListenerSpec::new("expiry")
        .queue(QueueSpec::anonymous().expires(Duration::from_millis(1500)))
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "#")
        .responder("t", "*", counting(&handled));
    let (listener, _) = TestListener::new(spec);
    let handle = spawn_listener(listener, &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);
    let queue = handle.queue_name();
    handle.pause().await.expect("pause");
    assert!(handle.wait_consuming(false, SOON).await);
    // Three expiry periods without a consumer: the broker only looks (list_queues does not
    // count as a use of the queue).
    let until = Instant::now() + Duration::from_millis(4500);
    while Instant::now() < until {
        assert!(
            queue_column(&queue, "name").is_some(),
            "the paused listener's queue expired"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    handle.resume().await.expect("resume");
    let client = Client::connect(&local_uri(), &name).await;
    client
        .publish(&exchange, "k", &Envelope::new("t", "x"))
        .await;
    assert!(eventually(SOON, || handled.load(Ordering::SeqCst) == 1).await);
    handle.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_anonymous_queue_expiry_is_the_configured_one() {
    let name = unique_node("expirykey");
    let node = start_node(config(
        &name,
        &[local_uri()],
        "\n[listener]\nanonymous_queue_expiry_ms = 45000",
    ))
    .await;
    let (listener, _) = TestListener::new(ListenerSpec::new("expirykey"));
    let handle = spawn_listener(listener, &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);
    let arguments = queue_column(&handle.queue_name(), "arguments").unwrap_or_default();
    assert!(arguments.contains("45000"), "{arguments}");
    handle.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}

/// A listener on a classic queue without a dead-letter exchange whose handlers fail.
async fn poison_listener(
    node: &warren_runtime::node::Node,
    name: &str,
    exchange: &str,
    queue: &str,
) -> (warren_listeners::ListenerHandle, Arc<AtomicUsize>) {
    let runs = counter();
    let runs_in = runs.clone();
    let spec = ListenerSpec::new(name)
        .queue(QueueSpec::named(queue))
        .exchange(Exchange::topic(exchange))
        .bind(exchange, "#")
        .max_redeliveries(2)
        .responder("t", "retry", move |_e: Event| {
            runs_in.fetch_add(1, Ordering::SeqCst);
            async { Err(HandlerError::retry("never works")) }
        })
        .responder("t", "reject", |_e: Event| async {
            Err(HandlerError::reject("not for us"))
        });
    let (listener, _) = TestListener::new(spec);
    let handle = spawn_listener(listener, &app_context(node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);
    (handle, runs)
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_are_parked_and_a_crafted_delivery_count_is_ignored() {
    let name = unique_node("poison");
    let (exchange, queue) = (format!("{name}-ex"), format!("{name}-q"));
    let parked = format!("{queue}.parked");
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let (handle, runs) = poison_listener(&node, "poison", &exchange, &queue).await;
    let client = Client::connect(&local_uri(), &name).await;
    // A publisher claims the message was never delivered before.
    let mut headers = FieldTable::default();
    headers.insert(
        "x-delivery-count".into(),
        lapin::types::AMQPValue::LongLongInt(0),
    );
    let crafted = Envelope::new("t", "retry").with("Msg-ID", "crafted");
    client
        .publish_raw(
            &exchange,
            "k",
            &crafted.encode(),
            warren_runtime::envelope::publish_properties(false).with_headers(headers),
        )
        .await;
    client
        .publish(&exchange, "k", &Envelope::new("t", "reject"))
        .await;
    assert!(
        eventually(Duration::from_secs(20), || handle.stats().parked == 2).await,
        "{:?}",
        handle.stats()
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "max_redeliveries 2: three runs, then parked"
    );
    assert_eq!(client.ready(&queue).await, 0, "nothing left to retry");
    let mut parked_messages = Vec::new();
    let deadline = Instant::now() + SOON;
    while parked_messages.len() < 2 && Instant::now() < deadline {
        parked_messages.extend(client.drain(&parked).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut names: Vec<String> = parked_messages
        .iter()
        .filter_map(|(_, envelope)| envelope.as_ref().map(|e| e.name().to_string()))
        .collect();
    names.sort();
    assert_eq!(names, ["reject", "retry"], "both parked, bodies intact");
    let stats = handle.stats();
    assert_eq!(
        (stats.rejected, stats.redelivery_limit),
        (2, 1),
        "{stats:?}"
    );
    handle.stop().await.expect("stop");
    client.delete_queue(&queue).await;
    client.delete_queue(&parked).await;
    node.stop().await.expect("node stops");
}

/// A listener on a quorum queue whose one responder always asks for a retry.
async fn retrying_quorum_listener(
    node: &warren_runtime::node::Node,
    queue: QueueSpec,
    exchange: &str,
    max_redeliveries: u32,
) -> (warren_listeners::ListenerHandle, Arc<AtomicUsize>) {
    let runs = counter();
    let runs_in = runs.clone();
    let spec = ListenerSpec::new("quorum")
        .queue(queue)
        .exchange(Exchange::topic(exchange))
        .bind(exchange, "#")
        .max_redeliveries(max_redeliveries)
        .responder("t", "retry", move |_e: Event| {
            runs_in.fetch_add(1, Ordering::SeqCst);
            async { Err(HandlerError::retry("never works")) }
        });
    let (listener, _) = TestListener::new(spec);
    let handle = spawn_listener(listener, &app_context(node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);
    (handle, runs)
}

/// Waits for `count` messages in `queue` and returns their Event-Names.
async fn drained_names(client: &Client, queue: &str, count: usize) -> Vec<String> {
    let mut drained = Vec::new();
    let deadline = Instant::now() + SOON;
    while drained.len() < count && Instant::now() < deadline {
        drained.extend(client.drain(queue).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drained
        .iter()
        .filter_map(|(_, envelope)| envelope.as_ref().map(|e| e.name().to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quorum_queue_parks_by_the_brokers_count_and_its_delivery_limit_loses_nothing() {
    let name = unique_node("quorum");
    let (exchange, queue) = (format!("{name}-ex"), format!("{name}-q"));
    let parked = format!("{queue}.parked");
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let client = Client::connect(&local_uri(), &name).await;

    // 1. warren's own limit, counted by the broker (x-delivery-count): three runs, parked.
    let spec = QueueSpec::named(&queue).quorum();
    let (handle, runs) = retrying_quorum_listener(&node, spec, &exchange, 2).await;
    let arguments = queue_column(&queue, "arguments").unwrap_or_default();
    assert!(
        arguments.contains("quorum") && arguments.contains(&parked),
        "a quorum queue dead-letters to its parking queue: {arguments}"
    );
    client
        .publish(&exchange, "k", &Envelope::new("t", "retry"))
        .await;
    assert!(
        eventually(Duration::from_secs(20), || handle.stats().parked == 1).await,
        "{:?}",
        handle.stats()
    );
    assert_eq!(runs.load(Ordering::SeqCst), 3, "max_redeliveries 2");
    assert_eq!(drained_names(&client, &parked, 1).await, ["retry"]);
    handle.stop().await.expect("stop");
    client.delete_queue(&queue).await;

    // 2. A listener whose own limit is above the broker's delivery limit: the broker
    //    dead-letters the message, and it lands in the parking queue, not in the void.
    let spec = QueueSpec::named(&queue)
        .quorum()
        .argument("x-delivery-limit", lapin::types::AMQPValue::LongUInt(1));
    let (handle, runs) = retrying_quorum_listener(&node, spec, &exchange, 100).await;
    client
        .publish(&exchange, "k", &Envelope::new("t", "retry"))
        .await;
    assert_eq!(drained_names(&client, &parked, 1).await, ["retry"]);
    assert_eq!(client.ready(&queue).await, 0, "nothing left to retry");
    let stats = handle.stats();
    assert_eq!(
        stats.parked, 0,
        "the broker parked it, not warren: {stats:?}"
    );
    assert!(
        runs.load(Ordering::SeqCst) >= 2,
        "delivered up to the limit"
    );
    handle.stop().await.expect("stop");
    client.delete_queue(&queue).await;
    client.delete_queue(&parked).await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn redeliveries_caused_by_lost_channels_are_not_failures() {
    let name = unique_node("notpoison");
    let (exchange, queue) = (format!("{name}-ex"), format!("{name}-q"));
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let runs = counter();
    let closes = counter();
    let (runs_in, closes_in) = (runs.clone(), closes.clone());
    let spec = ListenerSpec::new("notpoison")
        .queue(QueueSpec::named(&queue))
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "#")
        .max_redeliveries(1)
        .responder("t", "x", move |_e: Event| {
            let (runs, closes) = (runs_in.clone(), closes_in.clone());
            async move {
                let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
                // The first three runs are cut short by a lost channel; the fourth succeeds.
                let until = Instant::now() + Duration::from_secs(20);
                while run <= 3 && closes.load(Ordering::SeqCst) < run && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(())
            }
        });
    let (listener, _) = TestListener::new(spec);
    let handle = spawn_listener(listener, &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);
    let client = Client::connect(&local_uri(), &name).await;
    client
        .publish(&exchange, "k", &Envelope::new("t", "x"))
        .await;
    for cut in 1..=3 {
        assert!(
            eventually(SOON, || runs.load(Ordering::SeqCst) == cut).await,
            "run {cut} did not start: {:?}",
            handle.stats()
        );
        blocking({
            let name = name.clone();
            move || close_connections(local_ctl, &format!("{name}/consume"), "test: cut")
        })
        .await
        .expect("close");
        closes.store(cut, Ordering::SeqCst);
    }
    assert!(
        eventually(Duration::from_secs(20), || handle.stats().acked == 1).await,
        "{:?}",
        handle.stats()
    );
    let stats = handle.stats();
    assert_eq!(
        (stats.parked, stats.redelivery_limit, stats.rejected),
        (0, 0, 0),
        "three redeliveries after lost channels are not three failures: {stats:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 4);
    handle.stop().await.expect("stop");
    client.delete_queue(&queue).await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_cancel_sets_the_listener_up_again_and_lets_running_handlers_finish() {
    let name = unique_node("cancelled");
    let (exchange, queue) = (format!("{name}-ex"), format!("{name}-q"));
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let started = counter();
    let finished: Arc<Mutex<Vec<usize>>> = Arc::new(Mutex::new(Vec::new()));
    let release = Arc::new(AtomicBool::new(false));
    let (started_in, finished_in, release_in) =
        (started.clone(), finished.clone(), release.clone());
    let spec = ListenerSpec::new("cancelled")
        .queue(QueueSpec::named(&queue))
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "#")
        .responder("t", "x", move |_e: Event| {
            let (started, finished, release) =
                (started_in.clone(), finished_in.clone(), release_in.clone());
            async move {
                let run = started.fetch_add(1, Ordering::SeqCst) + 1;
                // The first run is in flight when the broker cancels the consumer.
                let until = Instant::now() + Duration::from_secs(30);
                while run == 1 && !release.load(Ordering::SeqCst) && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                finished.lock().push(run);
                Ok(())
            }
        });
    let (listener, _) = TestListener::new(spec);
    let handle = spawn_listener(listener, &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);
    let client = Client::connect(&local_uri(), &name).await;
    client
        .publish(&exchange, "k", &Envelope::new("t", "x"))
        .await;
    assert!(eventually(SOON, || started.load(Ordering::SeqCst) == 1).await);

    // Deleting the queue makes the broker send basic.cancel.
    blocking({
        let queue = queue.clone();
        move || local_ctl(&["delete_queue", &queue])
    })
    .await
    .expect("delete_queue");
    assert!(
        eventually(SOON, || consumers_of(&queue) == Some(1)).await,
        "the listener did not declare its queue and consume again after the cancel"
    );
    assert_eq!(
        bindings_of(&queue),
        vec![(exchange.clone(), "#".to_string())],
        "the bindings came back with the queue"
    );
    release.store(true, Ordering::SeqCst);
    assert!(
        eventually(SOON, || finished.lock().contains(&1)).await,
        "the handler running at the cancel was dropped: finished {:?}",
        finished.lock()
    );
    for _ in 0..5 {
        client
            .publish(&exchange, "k", &Envelope::new("t", "x"))
            .await;
    }
    assert!(
        eventually(SOON, || finished.lock().len() == 6).await,
        "messages after the cancel were not handled: finished {:?}",
        finished.lock()
    );
    assert!(eventually(SOON, || handle.stats().acked >= 5).await);
    handle.stop().await.expect("stop");
    client.delete_queue(&queue).await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_channel_the_broker_closes_for_a_consumer_timeout_is_recovered_and_loses_nothing() {
    // A node that gives a consumer 1 s to acknowledge and checks every 200 ms.
    let broker = blocking(|| {
        warren_test_support::BrokerNode::start_with_advanced(
            &["consumer_timeout = 1000"],
            "[{rabbit, [{channel_tick_interval, 200}]}].\n",
        )
    })
    .await
    .expect("a node with a short consumer timeout");
    let name = unique_node("timeout");
    let (exchange, queue) = (format!("{name}-ex"), format!("{name}-q"));
    let node = start_node(config(&name, &[broker.uri()], "")).await;
    let runs = counter();
    let runs_in = runs.clone();
    let spec = ListenerSpec::new("slow")
        .queue(QueueSpec::named(&queue).durable())
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "#")
        .responder("t", "x", move |_e: Event| {
            let run = runs_in.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                // The first run outlives the consumer timeout; the redelivery is quick.
                if run == 1 {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                Ok(())
            }
        });
    let (listener, _) = TestListener::new(spec);
    let handle = spawn_listener(listener, &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);
    let client = Client::connect(&broker.uri(), &name).await;
    client
        .publish(&exchange, "k", &Envelope::new("t", "x"))
        .await;
    // The broker closes the channel (406 PRECONDITION_FAILED, delivery acknowledgement
    // timed out); the listener takes a new one, consumes again, and the redelivered
    // message is handled and acked there.
    assert!(
        eventually(Duration::from_secs(20), || runs.load(Ordering::SeqCst) >= 2
            && handle.stats().acked == 1)
        .await,
        "runs {}, {:?}",
        runs.load(Ordering::SeqCst),
        handle.stats()
    );
    assert!(handle.wait_consuming(true, SOON).await);
    let status = handle.status().await.expect("status");
    assert!(
        status.active.is_some_and(|(_, grant)| grant >= 2),
        "the listener is on a new channel: {status:?}"
    );
    assert_eq!(
        handle.stats().received,
        2,
        "delivered, then redelivered once"
    );
    assert_eq!(client.ready(&queue).await, 0, "nothing left behind");
    handle.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}
