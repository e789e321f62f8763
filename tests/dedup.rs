//! Effectively once: the de-duplication window of listeners (`ListenerSpec::dedup`) and
//! RPC servers (`RpcServer::dedup`) against real RabbitMQ. A copy of a handled message is
//! acked without running the handler; a failed one runs again; a re-sent RPC request gets
//! the first reply and its method runs once; and broker kills under load, which make the
//! broker redeliver messages whose acks were lost, cause no second run with the window
//! (the test prints how many without it).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::client::Client;
use common::{Broker, SOON, Seen, app_context, config, recording, start_node, unique_node};
use futures::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use warren_listeners::{
    Binding, Dedup, Envelope, Exchange, HandlerError, ListenerHandle, ListenerSpec, QueueSpec,
    RpcServer, spawn_listener, spawn_rpc_server,
};
use warren_runtime::node::Node;
use warren_test_support::{eventually, local_uri};

/// A listener on a durable queue `queue` bound to the durable topic exchange `exchange`
/// with `#`, recording what it handles in `seen`.
async fn recorder(
    node: &Node,
    (exchange, queue): (&str, &str),
    dedup: Option<Dedup>,
    seen: &Seen,
    pause: Duration,
) -> ListenerHandle {
    let mut spec = ListenerSpec::new(queue)
        .queue(QueueSpec::named(queue).durable())
        .exchange(Exchange::topic(exchange).durable())
        .binding(Binding::new(exchange, "#"))
        .responder("t", "x", recording(seen, pause));
    if let Some(window) = dedup {
        spec = spec.dedup(window);
    }
    let handle = spawn_listener(common::SpecListener(spec), &app_context(node, "test"))
        .await
        .expect("listener starts");
    assert!(eventually(SOON, || handle.is_consuming()).await);
    handle
}

fn message(id: &str) -> Envelope {
    Envelope::new("t", "x").with("Msg-ID", id)
}

/// An RPC server of `topic` whose method `work` records each run's request id in `seen`
/// (after `pause`) and answers with how many runs there were so far.
async fn rpc_server(
    node: &Node,
    topic: &str,
    dedup: Option<Dedup>,
    seen: &Seen,
    pause: Duration,
) -> Vec<ListenerHandle> {
    let (seen, runs) = (seen.clone(), Arc::new(AtomicUsize::new(0)));
    let mut server = RpcServer::new(topic).method("work", move |args: Value| {
        let (seen, runs) = (seen.clone(), runs.clone());
        async move {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            seen.record(args.get("id").and_then(Value::as_str).unwrap_or(""));
            Ok(json!(runs.fetch_add(1, Ordering::SeqCst) + 1))
        }
    });
    if let Some(window) = dedup {
        server = server.dedup(window);
    }
    let handles = spawn_rpc_server(server, &app_context(node, "svc"))
        .await
        .expect("the RPC server starts");
    for handle in &handles {
        assert!(handle.wait_consuming(true, SOON).await, "{}", handle.name());
    }
    handles
}

/// A request for `work` as the README's wire format has it, with `id` as its message id
/// and argument; a call when `reply_to` is given.
fn work_request(id: &str, reply_to: Option<&str>) -> (Vec<u8>, BasicProperties) {
    let body = json!({
        "Event-Category": "rpc",
        "Event-Name": "work",
        "Msg-ID": id,
        "Args": {"id": id},
    });
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(id.into())
        .with_delivery_mode(2);
    if let Some(queue) = reply_to {
        properties = properties.with_reply_to(queue.into());
    }
    (body.to_string().into_bytes(), properties)
}

#[tokio::test]
async fn a_copy_of_a_handled_message_is_acked_without_running_the_handler() {
    let name = unique_node("dedup-copy");
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let exchange = format!("{name}-ex");
    let (with, without) = (Seen::default(), Seen::default());
    let deduped = recorder(
        &node,
        (&exchange, &format!("{name}-dedup")),
        Some(Dedup::default()),
        &with,
        Duration::ZERO,
    )
    .await;
    let plain = recorder(
        &node,
        (&exchange, &format!("{name}-plain")),
        None,
        &without,
        Duration::ZERO,
    )
    .await;
    let client = Client::connect(&local_uri(), &name).await;
    for id in ["m-1", "m-1", "m-2", "m-1"] {
        client.publish(&exchange, "k", &message(id)).await;
    }
    assert!(
        eventually(SOON, || deduped.stats().acked == 4
            && plain.stats().acked == 4)
        .await,
        "every copy is acked: dedup {:?}, plain {:?}",
        deduped.stats(),
        plain.stats()
    );
    assert_eq!(with.duplicates(), 0, "the window ran a handler twice");
    assert_eq!(with.distinct(), 2);
    assert_eq!(deduped.stats().duplicates, 2);
    assert_eq!(without.duplicates(), 2, "without a window every copy runs");
    assert_eq!(plain.stats().duplicates, 0);
    let _ = deduped.stop().await;
    let _ = plain.stop().await;
    let _ = node.stop().await;
}

#[tokio::test]
async fn a_message_whose_handler_failed_runs_again_with_the_window() {
    let name = unique_node("dedup-retry");
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let exchange = format!("{name}-ex");
    let queue = format!("{name}-q");
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let spec = ListenerSpec::new(queue.as_str())
        .queue(QueueSpec::named(queue.as_str()).durable())
        .exchange(Exchange::topic(exchange.as_str()).durable())
        .binding(Binding::new(exchange.as_str(), "#"))
        .dedup(Dedup::default())
        .responder("t", "x", move |_event| {
            let run = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                if run == 0 {
                    Err(HandlerError::retry("first run fails"))
                } else {
                    Ok(())
                }
            }
        });
    let handle = spawn_listener(common::SpecListener(spec), &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(eventually(SOON, || handle.is_consuming()).await);
    let client = Client::connect(&local_uri(), &name).await;
    client.publish(&exchange, "k", &message("r-1")).await;
    assert!(
        eventually(SOON, || handle.stats().acked == 1).await,
        "the retried message is handled: {:?}",
        handle.stats()
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "a failed run is not remembered"
    );
    assert_eq!(handle.stats().requeued, 1);
    assert_eq!(handle.stats().duplicates, 0);
    // Handled now: a later copy is not run.
    client.publish(&exchange, "k", &message("r-1")).await;
    assert!(eventually(SOON, || handle.stats().acked == 2).await);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let _ = handle.stop().await;
    let _ = node.stop().await;
}

#[tokio::test]
async fn a_re_sent_rpc_request_gets_the_first_reply_and_its_method_runs_once() {
    let name = unique_node("dedup-rpc");
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let client = Client::connect(&local_uri(), &name).await;
    let replies_queue = format!("{name}-rpc-replies");
    client
        .channel
        .queue_declare(
            replies_queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("reply queue");
    let mut replies = client
        .channel
        .basic_consume(
            replies_queue.as_str().into(),
            "rpc-replies".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume replies");
    for (dedup, runs_expected) in [(Some(Dedup::default()), 1), (None, 2)] {
        let topic = format!("{name}-{}", runs_expected);
        let seen = Seen::default();
        let server = rpc_server(&node, &topic, dedup, &seen, Duration::ZERO).await;
        let id = format!("{topic}-req");
        let (body, properties) = work_request(&id, Some(&replies_queue));
        for _ in 0..2 {
            client
                .publish_raw(
                    "openstack",
                    &format!("unicast.{topic}"),
                    &body,
                    properties.clone(),
                )
                .await;
        }
        let mut results = Vec::new();
        for _ in 0..2 {
            let delivery = tokio::time::timeout(SOON, replies.next())
                .await
                .expect("a reply in time")
                .expect("stream open")
                .expect("delivery");
            let correlation = delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string());
            assert_eq!(correlation.as_deref(), Some(id.as_str()));
            let reply: Value = serde_json::from_slice(&delivery.data).expect("reply JSON");
            results.push(reply.get("Result").cloned().unwrap_or(Value::Null));
        }
        assert_eq!(seen.runs(), runs_expected, "method runs (dedup {dedup:?})");
        if dedup.is_some() {
            assert_eq!(
                results,
                [json!(1), json!(1)],
                "the copy gets the first reply"
            );
        } else {
            assert_eq!(
                results,
                [json!(1), json!(2)],
                "without the window it runs again"
            );
        }
        for handle in &server {
            let _ = handle.stop().await;
        }
        client.delete_queue(&format!("unicast.{topic}")).await;
        client
            .delete_queue(&format!("exclusive.{topic}.{name}"))
            .await;
        client
            .delete_queue(&format!("/broadcast/{topic}.{name}"))
            .await;
    }
    let _ = node.stop().await;
}

/// The chaos test: a private broker killed twice while two listeners and an RPC server
/// work through a backlog of persistent messages (each message reaches both listeners: one
/// has the window, the other not; the server, with its window, gets as many casts).
/// Messages handled whose acks die with the broker are redelivered after its restart: the
/// windows ack them without a second run.
#[tokio::test]
async fn broker_kills_under_load_cause_no_duplicate_handler_runs_with_the_window() {
    const MESSAGES: usize = 3_000;
    let broker = Broker::start_many(1).await.remove(0);
    let name = unique_node("dedup-chaos");
    let node = start_node(config(&name, &[broker.uri()], "")).await;
    let exchange = format!("{name}-ex");
    let (with, without, served) = (Seen::default(), Seen::default(), Seen::default());
    let pause = Duration::from_millis(1);
    let deduped = recorder(
        &node,
        (&exchange, &format!("{name}-dedup")),
        Some(Dedup::default()),
        &with,
        pause,
    )
    .await;
    let plain = recorder(
        &node,
        (&exchange, &format!("{name}-plain")),
        None,
        &without,
        pause,
    )
    .await;
    let topic = format!("{name}-rpc");
    let server = rpc_server(&node, &topic, Some(Dedup::default()), &served, pause).await;
    let client = Client::connect(&broker.uri(), &name).await;
    let group = format!("unicast.{topic}");
    for i in 0..MESSAGES {
        let id = format!("c-{i}");
        client.publish(&exchange, "k", &message(&id)).await;
        let (body, properties) = work_request(&id, None);
        client
            .publish_raw("openstack", &group, &body, properties)
            .await;
    }
    drop(client);
    let all = [&with, &without, &served];
    for share in [4, 2] {
        // Kill while everyone is busy: at a quarter, then at half of the backlog.
        let mark = MESSAGES / share;
        assert!(
            eventually(Duration::from_secs(60), || all
                .iter()
                .all(|seen| seen.distinct() >= mark))
            .await,
            "everyone reaches {mark} messages"
        );
        broker.kill().await;
        broker.restart().await;
    }
    let everything = eventually(Duration::from_secs(120), || {
        all.iter().all(|seen| seen.distinct() == MESSAGES)
    })
    .await;
    assert!(
        everything,
        "every message handled after the kills: listener with the window {}, without {}, RPC server {} of {MESSAGES}",
        with.distinct(),
        without.distinct(),
        served.distinct()
    );
    println!(
        "broker killed twice under load: {} duplicate handler runs without the window; with it {} (listener, {} copies acked unhandled) and {} (RPC server)",
        without.duplicates(),
        with.duplicates(),
        deduped.stats().duplicates,
        served.duplicates()
    );
    assert_eq!(
        with.duplicates(),
        0,
        "the listener's window let a handler run twice"
    );
    assert_eq!(
        served.duplicates(),
        0,
        "the server's window let a method run twice"
    );
    let _ = deduped.stop().await;
    let _ = plain.stop().await;
    for handle in &server {
        let _ = handle.stop().await;
    }
    let _ = node.stop().await;
    broker.kill().await;
}
