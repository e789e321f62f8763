//! RPC targets and notifications against real RabbitMQ: a call to one named server, to one
//! of a group, a fanout cast to all; error replies (unknown method, a method's error, a
//! panic); a call on a fanout target refused; an unserved call returned; a request's
//! expiration; a late reply; notifications acked, requeued, parked and returned.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::rpc::{Calls, server};
use common::{SOON, app_context, config, start_node, unique_node, until};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use parking_lot::Mutex;
use serde_json::{Value, json};
use warren_listeners::{
    AppContext, HandlerError, ListenerHandle, ListenerPool, Notification, RemoteError, RpcError,
    Target, spawn_listener, spawn_rpc_server,
};
use warren_runtime::config::{AppConfig, PoolConfig, RpcConfig};
use warren_runtime::node::Node;
use warren_test_support::local_uri;

/// The control exchange of the default `[rpc]` section.
const CONTROL: &str = "openstack";

/// A node named `name` on the local broker.
async fn node(name: &str) -> Node {
    start_node(config(name, &[local_uri()], "")).await
}

/// The config of a test app named `name` with a pool of two workers.
fn app_config(name: &str) -> AppConfig {
    AppConfig::new(
        name,
        PoolConfig {
            size: 2,
            overflow: 0,
            checkout_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
        },
    )
}

/// A started pool of two workers for a test app on `node`.
async fn pool(node: &Node) -> ListenerPool {
    let ctx = AppContext::with_version("0.0.0-test", node.context().clone(), app_config("caller"));
    ctx.pool.spawn().await.expect("pool starts");
    ctx.pool
}

/// Serves `topic` on `node` (as its node name) and waits until its three listeners consume.
async fn serve(node: &Node, topic: &str, calls: &Calls) -> Vec<ListenerHandle> {
    let me = node.context().node.clone();
    let handles = spawn_rpc_server(server(topic, &me, calls), &app_context(node, "svc"))
        .await
        .expect("the RPC server starts");
    for handle in &handles {
        assert!(handle.wait_consuming(true, SOON).await, "{}", handle.name());
    }
    handles
}

async fn stop_all(handles: &[ListenerHandle]) {
    for handle in handles {
        handle.stop().await.expect("stops");
    }
}

/// A plain AMQP channel for looking at the broker side.
async fn raw_channel(name: &str) -> (Connection, Channel) {
    let connection = Connection::connect(
        &local_uri(),
        ConnectionProperties::default().with_connection_name(format!("{name}/raw").into()),
    )
    .await
    .expect("raw connection");
    let channel = connection.create_channel().await.expect("raw channel");
    (connection, channel)
}

/// Declares `exchange` as warren does (durable, of `kind`).
async fn declare_exchange(channel: &Channel, exchange: &str, kind: ExchangeKind) {
    channel
        .exchange_declare(
            exchange.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange declared");
}

/// A transient queue of the test bound to `exchange` with `key`, consumed at once.
async fn tap(channel: &Channel, queue: &str, exchange: &str, key: &str) -> lapin::Consumer {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("tap queue");
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("tap bound");
    channel
        .basic_consume(
            queue.into(),
            format!("{queue}-tag").as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("tap consumes")
}

/// Messages ready in `queue` (a passive declare).
async fn ready(channel: &Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|q| q.message_count())
        .unwrap_or(u32::MAX)
}

/// Deletes the durable queues a test left (the group queue has no expiry).
async fn delete_queues(channel: &Channel, queues: &[String]) {
    for queue in queues {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

/// The durable queues a server of `topic` on nodes `servers` declares.
fn server_queues(topic: &str, servers: &[&str]) -> Vec<String> {
    let mut queues = vec![format!("unicast.{topic}")];
    for server in servers {
        queues.push(format!("exclusive.{topic}.{server}"));
        queues.push(format!("/broadcast/{topic}.{server}"));
    }
    queues
}

fn remote(result: Result<Value, RpcError>) -> RemoteError {
    match result {
        Err(RpcError::Remote(error)) => error,
        other => panic!("expected a Remote error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_reach_the_named_server_one_of_the_group_or_all() {
    let (one, two) = (unique_node("rpc-a"), unique_node("rpc-b"));
    let topic = format!("topic-{one}");
    let (node1, node2) = (node(&one).await, node(&two).await);
    let calls = Calls::default();
    let servers1 = serve(&node1, &topic, &calls).await;
    let servers2 = serve(&node2, &topic, &calls).await;
    let pool = pool(&node1).await;
    let timeout = Duration::from_secs(5);

    // A: the named server only, each time.
    for (name, _) in [(&two, 0), (&one, 1), (&two, 2)] {
        let target = Target::new(&topic).server(name.as_str());
        let answer = pool
            .call_target(&target, "whoami", json!({}), timeout)
            .await
            .expect("the named server answers");
        assert_eq!(answer, json!(name));
    }

    // B: each call is answered by exactly one server of the group.
    let before = calls.answered.load(Ordering::SeqCst);
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let answer = pool
            .call_target(&Target::new(&topic), "whoami", Value::Null, timeout)
            .await
            .expect("one of the group answers");
        answered.insert(answer.as_str().unwrap_or_default().to_string());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        calls.answered.load(Ordering::SeqCst) - before,
        8,
        "exactly one server ran each call"
    );
    assert!(answered.is_subset(&[one.clone(), two.clone()].into()));
    assert_eq!(
        answered.len(),
        2,
        "the group shares the calls: {answered:?}"
    );

    // C: a fanout cast reaches both servers' methods.
    pool.fanout_cast(&Target::new(&topic), "note", json!({"n": 7}), timeout)
        .await
        .expect("the fanout cast is confirmed");
    let both = until(SOON, || async {
        let notes = calls.notes.lock();
        notes.iter().any(|(s, n)| *s == one && *n == 7)
            && notes.iter().any(|(s, n)| *s == two && *n == 7)
    })
    .await;
    assert!(both, "both servers got the cast: {:?}", calls.notes.lock());

    // A cast to one named server reaches it alone.
    pool.cast_target(
        &Target::new(&topic).server(two.as_str()),
        "note",
        json!({"n": 8}),
        timeout,
    )
    .await
    .expect("the cast is confirmed");
    assert!(
        until(SOON, || async {
            calls.notes.lock().iter().any(|(s, n)| *s == two && *n == 8)
        })
        .await
    );
    assert!(!calls.notes.lock().iter().any(|(s, n)| *s == one && *n == 8));

    pool.stop().await;
    stop_all(&servers1).await;
    stop_all(&servers2).await;
    let (_connection, channel) = raw_channel(&one).await;
    delete_queues(&channel, &server_queues(&topic, &[&one, &two])).await;
    node1.stop().await.expect("node stops");
    node2.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_come_back_as_typed_remote_errors() {
    let name = unique_node("rpc-err");
    let topic = format!("topic-{name}");
    let node = node(&name).await;
    let calls = Calls::default();
    let servers = serve(&node, &topic, &calls).await;
    let pool = pool(&node).await;
    let target = Target::new(&topic).server(name.as_str());
    let timeout = Duration::from_secs(10);

    let started = Instant::now();
    let unknown = remote(pool.call_target(&target, "nope", json!({}), timeout).await);
    assert_eq!(unknown.kind, RemoteError::UNKNOWN_METHOD);
    assert!(unknown.message.contains("nope"), "{}", unknown.message);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "an unknown method is answered at once, not at the timeout: {:?}",
        started.elapsed()
    );

    let failed = remote(pool.call_target(&target, "fail", json!({}), timeout).await);
    assert_eq!(failed, RemoteError::new("NotFound", "no such thing"));

    let panicked = remote(pool.call_target(&target, "boom", json!({}), timeout).await);
    assert_eq!(panicked.kind, RemoteError::PANIC);
    assert!(panicked.message.contains("kaboom"), "{}", panicked.message);
    // The server still answers.
    let answer = pool
        .call_target(&target, "whoami", json!({}), timeout)
        .await
        .expect("the server answers after a panic");
    assert_eq!(answer, json!(name));

    // Arguments that are not an object are refused before anything is published.
    assert!(matches!(
        pool.call_target(&target, "whoami", json!([1, 2]), timeout)
            .await,
        Err(RpcError::Target(_))
    ));

    pool.stop().await;
    stop_all(&servers).await;
    let (_connection, channel) = raw_channel(&name).await;
    delete_queues(&channel, &server_queues(&topic, &[&name])).await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_on_a_fanout_target_is_refused_without_publishing() {
    let name = unique_node("rpc-fan");
    let topic = format!("topic-{name}");
    let node = node(&name).await;
    let pool = pool(&node).await;
    let broadcast = format!("/broadcast/{topic}");
    let (_connection, channel) = raw_channel(&name).await;
    declare_exchange(&channel, &broadcast, ExchangeKind::Fanout).await;
    let mut tapped = tap(&channel, &format!("{name}-tap"), &broadcast, "").await;

    let target = Target::new(&topic).fanout();
    let refused = pool
        .call_target(&target, "whoami", json!({}), Duration::from_secs(2))
        .await;
    assert!(
        matches!(&refused, Err(RpcError::FanoutCall(t)) if *t == topic),
        "{refused:?}"
    );
    // A cast after it is the first (and only) message the fanout exchange routed.
    pool.fanout_cast(&target, "note", json!({"n": 1}), Duration::from_secs(5))
        .await
        .expect("the cast is confirmed");
    let first = tokio::time::timeout(SOON, tapped.next())
        .await
        .expect("the cast arrives")
        .expect("a delivery")
        .expect("not an error");
    let body: Value = serde_json::from_slice(&first.data).expect("JSON");
    assert_eq!(
        body["Event-Name"], "note",
        "the refused call published nothing"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), tapped.next())
            .await
            .is_err()
    );

    let _ = channel
        .exchange_delete(broadcast.as_str().into(), Default::default())
        .await;
    pool.stop().await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_nobody_serves_is_returned_at_once() {
    let name = unique_node("rpc-ret");
    let node = node(&name).await;
    let pool = pool(&node).await;
    let (_connection, channel) = raw_channel(&name).await;
    declare_exchange(&channel, CONTROL, ExchangeKind::Topic).await;

    let started = Instant::now();
    let result = pool
        .call_target(
            &Target::new(format!("nobody-{name}")),
            "whoami",
            json!({}),
            Duration::from_secs(10),
        )
        .await;
    assert!(matches!(result, Err(RpcError::Returned(_))), "{result:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    pool.stop().await;
    node.stop().await.expect("node stops");
}

/// Regression: a client declared no exchange, so a call or cast sent before any server of
/// its topic ever ran was refused with 404 (and closed the publisher's channel) instead of
/// coming back `Returned`. The client now declares the exchange as a server would, once per
/// broker, and again after a publish met none (someone deleted it).
#[tokio::test(flavor = "multi_thread")]
async fn a_call_before_any_server_ran_is_returned_and_declares_the_exchange() {
    let name = unique_node("rpc-undeclared");
    let node = node(&name).await;
    let pool = pool(&node).await;
    let (_connection, channel) = raw_channel(&name).await;
    let exchange = format!("{name}-control");
    let target = Target::new(format!("t-{name}")).exchange(exchange.clone());
    let timeout = Duration::from_secs(10);

    let call = pool
        .call_target(&target, "whoami", json!({}), timeout)
        .await;
    assert!(matches!(call, Err(RpcError::Returned(_))), "{call:?}");
    let cast = pool
        .fanout_cast(&target, "whoami", json!({}), timeout)
        .await;
    assert!(matches!(cast, Err(RpcError::Returned(_))), "{cast:?}");

    // Deleted behind the client's back: at most one publish meets no exchange, then the
    // client declares it again.
    channel
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await
        .expect("exchange deleted");
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        outcomes.push(
            pool.call_target(&target, "whoami", json!({}), timeout)
                .await,
        );
    }
    assert!(
        matches!(outcomes.last(), Some(Err(RpcError::Returned(_)))),
        "{outcomes:?}"
    );
    if let Some(Err(RpcError::Publish(error))) = outcomes.first() {
        assert!(error.is_no_exchange(), "{error}");
    }

    let broadcast = target.broadcast_address(&RpcConfig::default());
    for gone in [&exchange, &broadcast] {
        let _ = channel
            .exchange_delete(gone.as_str().into(), Default::default())
            .await;
    }
    pool.stop().await;
    node.stop().await.expect("node stops");
}

/// Regression: two servers of one topic under different exchanges in one app were both
/// the child `rpc:<topic>`, and the app refused to start (duplicate child id). Each is now
/// `rpc:<exchange>/<topic>`, and each answers the calls of its own exchange.
#[tokio::test(flavor = "multi_thread")]
async fn one_app_serves_a_topic_under_two_exchanges() {
    let name = unique_node("rpc-two-exchanges");
    let topic = format!("t-{name}");
    let exchanges = [format!("{name}-x1"), format!("{name}-x2")];
    let calls = Calls::default();
    let node = {
        let (topic, exchanges, calls) = (topic.clone(), exchanges.clone(), calls.clone());
        Node::try_start(config(&name, &[local_uri()], ""), move |node| {
            let ctx = AppContext::with_version("0.0.0-test", node.clone(), app_config("svc"));
            let servers = exchanges
                .iter()
                .map(|exchange| {
                    let me = format!("{}@{exchange}", node.node);
                    ctx.rpc_server(server(&topic, &me, &calls).exchange(exchange.clone()))
                })
                .collect::<Vec<_>>();
            Ok::<_, String>(servers)
        })
        .await
        .unwrap_or_else(|error| panic!("the app starts: {error}"))
    };
    let pool = pool(&node).await;
    let me = node.context().node.clone();
    for exchange in &exchanges {
        let target = Target::new(topic.clone()).exchange(exchange.clone());
        // The servers start under the app's supervisor: `Returned` until they consume.
        let deadline = Instant::now() + SOON;
        let answer = loop {
            let answer = pool
                .call_target(&target, "whoami", json!({}), Duration::from_secs(2))
                .await;
            if answer.is_ok() || Instant::now() >= deadline {
                break answer;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(answer.ok(), Some(json!(format!("{me}@{exchange}"))));
    }

    pool.stop().await;
    node.stop().await.expect("node stops");
    let (_connection, channel) = raw_channel(&name).await;
    let config = RpcConfig::default();
    for exchange in &exchanges {
        let target = Target::new(topic.clone()).exchange(exchange.clone());
        let mut queues = vec![target.group_address(&config)];
        queues.push(target.server_address(&config, &me));
        queues.push(target.broadcast_queue(&config, &me));
        delete_queues(&channel, &queues).await;
        for gone in [exchange.clone(), target.broadcast_address(&config)] {
            let _ = channel
                .exchange_delete(gone.as_str().into(), Default::default())
                .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_carries_its_timeout_as_expiration_and_its_id() {
    let name = unique_node("rpc-exp");
    let topic = format!("topic-{name}");
    let node = node(&name).await;
    let pool = pool(&node).await;
    let (_connection, channel) = raw_channel(&name).await;
    declare_exchange(&channel, CONTROL, ExchangeKind::Topic).await;
    let mut tapped = tap(
        &channel,
        &format!("{name}-tap"),
        CONTROL,
        &format!("unicast.{topic}"),
    )
    .await;

    let result = pool
        .call_target(
            &Target::new(&topic),
            "get_status",
            json!({"id": 3}),
            Duration::from_millis(1500),
        )
        .await;
    assert!(matches!(result, Err(RpcError::Timeout(_))), "{result:?}");
    let request = tokio::time::timeout(SOON, tapped.next())
        .await
        .expect("the request was routed")
        .expect("a delivery")
        .expect("not an error");
    let properties = &request.properties;
    assert_eq!(
        properties.expiration().as_ref().map(|e| e.as_str()),
        Some("1500")
    );
    assert_eq!(
        properties.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    let body: Value = serde_json::from_slice(&request.data).expect("JSON");
    assert_eq!(body["Event-Category"], "rpc");
    assert_eq!(body["Event-Name"], "get_status");
    assert_eq!(body["Args"], json!({"id": 3}));
    assert_eq!(
        properties.message_id().as_ref().map(|m| m.as_str()),
        body["Msg-ID"].as_str(),
        "message_id is the body's Msg-ID"
    );
    assert!(
        properties.reply_to().is_some(),
        "a call names its reply queue"
    );

    pool.stop().await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_reply_is_a_timeout_and_is_counted() {
    let name = unique_node("rpc-late");
    let topic = format!("topic-{name}");
    let node = node(&name).await;
    let calls = Calls::default();
    let servers = serve(&node, &topic, &calls).await;
    let pool = pool(&node).await;
    let started = Instant::now();
    let result = pool
        .call_target(
            &Target::new(&topic),
            "slow",
            json!({"ms": 800}),
            Duration::from_millis(300),
        )
        .await;
    assert!(matches!(result, Err(RpcError::Timeout(_))), "{result:?}");
    assert!(started.elapsed() < Duration::from_millis(700));
    assert!(
        until(SOON, || async { pool.stats().late_replies >= 1 }).await,
        "the late reply is counted: {:?}",
        pool.stats()
    );
    // The pool still calls normally.
    let answer = pool
        .call_target(&Target::new(&topic), "whoami", json!({}), SOON)
        .await
        .expect("answers");
    assert_eq!(answer, json!(name));

    pool.stop().await;
    stop_all(&servers).await;
    let (_connection, channel) = raw_channel(&name).await;
    delete_queues(&channel, &server_queues(&topic, &[&name])).await;
    node.stop().await.expect("node stops");
}

/// Calls of targets take no worker: with both of the pool's workers checked out, 32
/// concurrent calls are all answered through the pool's one reply queue.
#[tokio::test(flavor = "multi_thread")]
async fn calls_take_no_worker_and_share_the_pools_reply_queue() {
    let name = unique_node("rpc-noworker");
    let topic = format!("topic-{name}");
    let node = node(&name).await;
    let calls = Calls::default();
    let servers = serve(&node, &topic, &calls).await;
    let pool = pool(&node).await;
    let held = (
        pool.checkout().await.expect("a worker"),
        pool.checkout().await.expect("the other worker"),
    );
    let before = pool.stats();
    assert_eq!(before.busy, 2, "every worker is checked out: {before:?}");
    let callers: Vec<_> = (0..32)
        .map(|i| {
            let pool = pool.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                pool.call_target(&Target::new(&topic), "echo", json!({"i": i}), SOON)
                    .await
            })
        })
        .collect();
    for (i, caller) in callers.into_iter().enumerate() {
        let answer = caller
            .await
            .expect("the caller did not panic")
            .expect("answered without a worker");
        assert_eq!(answer, json!({"i": i}), "each call gets its own reply");
    }
    let after = pool.stats();
    assert_eq!(after.checkouts, before.checkouts, "no call took a worker");
    assert_eq!(after.late_replies, 0, "no reply went astray: {after:?}");
    held.0.checkin().await;
    held.1.checkin().await;

    pool.stop().await;
    stop_all(&servers).await;
    let (_connection, channel) = raw_channel(&name).await;
    delete_queues(&channel, &server_queues(&topic, &[&name])).await;
    node.stop().await.expect("node stops");
}

/// A call in flight when its broker dies ends by its timeout (with its reply or a clear
/// error), and after the failover the topic is served on the other broker.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_in_flight_during_a_failover_ends_by_its_timeout_and_calls_go_on() {
    let brokers = common::Broker::start_many(2).await;
    let name = unique_node("rpc-failover");
    let topic = format!("topic-{name}");
    let node = start_node(config(&name, &[brokers[0].uri(), brokers[1].uri()], "")).await;
    // The primary is the first available broker: the second for a moment if its
    // connection came up first (CI saw the server and the pool set up on different
    // brokers then, and the first call returned). Start both on the first.
    let registry = node.context().registry.clone();
    let first = warren_runtime::broker::BrokerId(0);
    assert!(
        until(SOON, || async {
            registry.primary().map(|p| p.id) == Some(first)
        })
        .await,
        "the first broker is primary"
    );
    let calls = Calls::default();
    let servers = serve(&node, &topic, &calls).await;
    let pool = pool(&node).await;
    let answer = pool
        .call_target(&Target::new(&topic), "whoami", json!({}), SOON)
        .await
        .expect("answers before the failover");
    assert_eq!(answer, json!(name));
    let group = servers
        .iter()
        .find(|handle| handle.name().ends_with("-group"))
        .expect("the group listener")
        .clone();
    let received = group.stats().received;
    let timeout = Duration::from_secs(4);
    let caller = pool.clone();
    let target = Target::new(&topic);
    let started = Instant::now();
    let call = tokio::spawn(async move {
        caller
            .call_target(&target, "slow", json!({"ms": 1500}), timeout)
            .await
    });
    assert!(
        until(SOON, || async { group.stats().received > received }).await,
        "the slow request reached the server"
    );
    brokers[0].kill().await;
    let result = tokio::time::timeout(timeout + Duration::from_secs(2), call)
        .await
        .expect("the call ends by its timeout, never later")
        .expect("the caller did not panic");
    let took = started.elapsed();
    println!("a call in flight during the failover: {result:?} after {took:?}");
    assert!(
        took <= timeout + Duration::from_millis(500),
        "the call took {took:?}"
    );
    assert!(
        matches!(
            result,
            Ok(_) | Err(RpcError::Timeout(_) | RpcError::Publish(_) | RpcError::Returned(_))
        ),
        "a reply or a clear error: {result:?}"
    );
    // The server and the pool carry on on the other broker.
    assert!(
        until(Duration::from_secs(20), || async {
            pool.call_target(
                &Target::new(&topic),
                "whoami",
                json!({}),
                Duration::from_secs(2),
            )
            .await
            .is_ok()
        })
        .await,
        "calls are answered after the failover"
    );
    pool.stop().await;
    stop_all(&servers).await;
    node.stop().await.expect("node stops");
    for broker in &brokers {
        broker.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_notification_reaches_its_listener_persistent_and_acked() {
    let name = unique_node("notify");
    let topic = format!("notifications-{name}");
    let node = node(&name).await;
    let ctx = app_context(&node, "notes");
    let got: Arc<Mutex<Vec<Notification>>> = Arc::default();
    let seen = got.clone();
    let listener = ctx.notification_listener(&topic, "info", move |notification| {
        seen.lock().push(notification);
        async { Ok(()) }
    });
    let handle = spawn_listener(listener, &ctx)
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);
    let (_connection, channel) = raw_channel(&name).await;
    let mut tapped = tap(
        &channel,
        &format!("{name}-tap"),
        CONTROL,
        &format!("{topic}.info"),
    )
    .await;

    ctx.notify(&topic, "info", "thing.created", json!({"id": 42}))
        .await
        .expect("the notification is confirmed");
    assert!(until(SOON, || async { !got.lock().is_empty() }).await);
    let notification = got.lock()[0].clone();
    assert_eq!(notification.event_type, "thing.created");
    assert_eq!(notification.priority, "info");
    assert_eq!(notification.payload, json!({"id": 42}));
    assert_eq!(notification.publisher_id.as_deref(), Some(name.as_str()));
    assert!(notification.timestamp.is_some() && notification.msg_id.is_some());

    let copy = tokio::time::timeout(SOON, tapped.next())
        .await
        .expect("the copy arrives")
        .expect("a delivery")
        .expect("not an error");
    assert_eq!(copy.properties.delivery_mode(), &Some(2), "persistent");
    assert!(
        until(SOON, || async { handle.stats().acked == 1 }).await,
        "{:?}",
        handle.stats()
    );
    assert_eq!(ready(&channel, &format!("{topic}.info")).await, 0);

    handle.stop().await.expect("stops");
    delete_queues(&channel, &[format!("{topic}.info")]).await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_notification_handler_gets_it_again_then_it_is_parked() {
    let name = unique_node("notify-fail");
    let topic = format!("notifications-{name}");
    let node = node(&name).await;
    let ctx = app_context(&node, "notes");
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    let listener = ctx
        .notification_listener(&topic, "error", move |_notification| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Err(HandlerError::retry("cannot handle it now")) }
        })
        .max_redeliveries(2);
    let handle = spawn_listener(listener, &ctx)
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);

    ctx.notify(&topic, "error", "thing.failed", json!({}))
        .await
        .expect("confirmed");
    let (_connection, channel) = raw_channel(&name).await;
    let parked = format!("{topic}.error.parked");
    assert!(
        until(SOON, || async { ready(&channel, &parked).await == 1 }).await,
        "parked after the limit: {:?}",
        handle.stats()
    );
    assert!(
        attempts.load(Ordering::SeqCst) >= 3,
        "handled again before parking: {}",
        attempts.load(Ordering::SeqCst)
    );
    assert_eq!(ready(&channel, &format!("{topic}.error")).await, 0);

    handle.stop().await.expect("stops");
    delete_queues(&channel, &[format!("{topic}.error"), parked]).await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_notification_nobody_listens_for_is_returned() {
    let name = unique_node("notify-ret");
    let node = node(&name).await;
    let ctx = app_context(&node, "notes");
    let (_connection, channel) = raw_channel(&name).await;
    declare_exchange(&channel, CONTROL, ExchangeKind::Topic).await;
    let result = ctx
        .notify(&format!("nobody-{name}"), "info", "x.y", json!({}))
        .await;
    assert!(matches!(result, Err(RpcError::Returned(_))), "{result:?}");
    node.stop().await.expect("node stops");
}
