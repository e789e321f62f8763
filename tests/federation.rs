//! Federation across two zones on private RabbitMQ nodes: zone `local` (broker A, the
//! node's own) and zone `west` (broker B). A kapi requester on B publishes to a federated
//! binding and gets its reply on B; an unfederated binding never reaches B; a federated
//! binding added at run time is consumed on B when the call returns, and removing it stops
//! the consumer there; B SIGKILLed and restarted under load loses no confirmed request;
//! zone A is served throughout (and fails over within itself while B is down), and the
//! node stays ready without B.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::client::Client;
use common::{Broker, SOON, app_context, config_text, start_node, unique_node};
use lapin::options::{BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Confirmation, ExchangeKind};
use parking_lot::Mutex;
use warren_listeners::{
    Binding, Event, Exchange, HandlerError, Listener, ListenerHandle, ListenerSpec, Notice,
    QueueSpec, spawn_listener,
};
use warren_runtime::config::Config;
use warren_runtime::confirm::PublishOptions;
use warren_runtime::envelope::{Envelope, publish_properties};
use warren_runtime::node::Node;

/// The exchange requests are published to, in both zones (durable: its bindings survive a
/// broker restart).
const EXCHANGE: &str = "fed-requests";

/// A node in zone `local` on `a`, with zone `west` on `b`; remote brokers retried quickly.
fn two_zones(name: &str, a: &Broker, b: &Broker) -> Config {
    let text = format!(
        "{}\n[zones.west]\nbrokers = [\"{}\"]\n",
        config_text(name, &[a.uri()], "remote_reconnect_max_ms = 500"),
        b.uri()
    );
    match Config::parse(&text, Path::new("test.ini"), &[], None) {
        Ok(config) => config,
        Err(error) => panic!("test config is invalid: {error}\n{text}"),
    }
}

/// A listener answering every `fed` request with where it came from, and recording its
/// notices.
struct Answering {
    spec: ListenerSpec,
    notices: Arc<Mutex<Vec<String>>>,
}

impl Answering {
    /// `persistent`: replies are persistent (they survive a restart of the requester's
    /// broker once confirmed, in a durable reply queue).
    fn new(spec: ListenerSpec, persistent: bool) -> (Self, Arc<Mutex<Vec<String>>>) {
        let notices = Arc::new(Mutex::new(Vec::new()));
        let spec = spec
            .exchange(Exchange::topic(EXCHANGE).durable())
            .responder("fed", "*", move |event: Event| async move {
                let mut reply = Envelope::new("fed", "answer")
                    .with("Zone", event.amqp_broker_zone())
                    .with("Federated", event.is_federated());
                let sent = if persistent {
                    let server_id = event.envelope().server_id().unwrap_or("").to_string();
                    reply.set("Msg-ID", event.envelope().msg_id().unwrap_or(""));
                    let mut options = PublishOptions::new(Duration::from_secs(5));
                    options.persistent = true;
                    event
                        .publish_with("targeted", &server_id, reply, options)
                        .await
                } else {
                    event.reply(reply).await
                };
                sent.map_err(|e| HandlerError::Retry(format!("reply not sent: {e}")))?;
                Ok(())
            });
        let listener = Answering {
            spec,
            notices: notices.clone(),
        };
        (listener, notices)
    }
}

impl Listener for Answering {
    fn spec(&self) -> ListenerSpec {
        self.spec.clone()
    }

    fn on_notice(&self, notice: &Notice) {
        if let Notice::FederatorsConsuming = notice {
            self.notices.lock().push("federators_consuming".to_string());
        }
    }
}

/// A requester's client on one broker, with the request exchange declared as the
/// listener declares it.
async fn client(broker: &Broker, name: &str) -> Client {
    let client = Client::connect(&broker.uri(), name).await;
    client
        .channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("request exchange");
    client
}

/// Publishes `request` mandatory and confirmed; whether a queue took it (not returned).
async fn routed(client: &Client, routing_key: &str, request: &Envelope) -> bool {
    let confirm = client
        .channel
        .basic_publish(
            EXCHANGE.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &request.encode(),
            publish_properties(false).with_delivery_mode(2),
        )
        .await
        .expect("publish");
    match confirm.await.expect("confirm") {
        Confirmation::Ack(None) => true,
        Confirmation::Ack(Some(_)) => false,
        other => panic!("the request was not confirmed: {other:?}"),
    }
}

/// Starts `listener` on `node` and waits until it consumes at home.
async fn serving(node: &Node, listener: Answering) -> ListenerHandle {
    let handle = spawn_listener(listener, &app_context(node, "fed"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);
    handle
}

/// Whether `queue` on the client's broker comes to have `n` consumers (within `SOON`).
async fn consumed_by(client: &Client, queue: &str, n: u32) -> bool {
    common::until(SOON, || async { consumers(client, queue).await == n }).await
}

/// Consumers of `queue` on the client's broker (0 if it does not exist).
async fn consumers(client: &Client, queue: &str) -> u32 {
    let channel = client
        .connection
        .create_channel()
        .await
        .expect("a channel for a passive declare");
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    declared.map_or(0, |queue| queue.consumer_count())
}

/// Publishes one persistent `load` request answered to `replies`; whether the broker
/// confirmed it (a nack fails the test; a connection lost on the way is no confirm).
async fn send(client: &Client, replies: &str, msg_id: &str) -> bool {
    let request = Envelope::new("fed", "load")
        .with("Server-ID", replies)
        .with("Msg-ID", msg_id);
    let published = client
        .channel
        .basic_publish(
            EXCHANGE.into(),
            "load.work".into(),
            BasicPublishOptions::default(),
            &request.encode(),
            publish_properties(false).with_delivery_mode(2),
        )
        .await;
    let Ok(confirm) = published else {
        return false;
    };
    match confirm.await {
        Ok(Confirmation::Ack(_)) => true,
        Ok(Confirmation::Nack(_)) => panic!("the broker nacked a request"),
        Ok(Confirmation::NotRequested) => panic!("a channel without confirms"),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_in_the_other_zone_is_answered_there_and_unfederated_bindings_stay_home() {
    let brokers = Broker::start_many(2).await;
    let (a, b) = (&brokers[0], &brokers[1]);
    let name = unique_node("fed");
    let node = start_node(two_zones(&name, a, b)).await;
    let queue = format!("{name}.requests");
    let (listener, notices) = Answering::new(
        ListenerSpec::new("fed")
            .queue(QueueSpec::named(&queue))
            .federate(EXCHANGE, "fed.*")
            .bind(EXCHANGE, "home.*"),
        false,
    );
    let handle = serving(&node, listener).await;

    let mut remote = client(b, &format!("{name}-west")).await;
    let federated_queue = format!("{queue}-local");
    assert!(
        consumed_by(&remote, &federated_queue, 1).await,
        "a federator consumes `{federated_queue}` on B"
    );
    assert!(
        common::until(SOON, || async {
            notices.lock().contains(&"federators_consuming".to_string())
        })
        .await,
        "the listener heard that its federators consume"
    );

    // A requester in zone west publishes there and gets the reply there.
    let request = remote.request("fed", "ping");
    assert!(routed(&remote, "fed.ping", &request).await);
    let reply = remote.reply(SOON).await.expect("a reply on B");
    assert_eq!(
        reply.msg_id(),
        request.msg_id(),
        "the requester's own Msg-ID"
    );
    assert_eq!(reply.get_str("Zone"), Some("west"));
    assert_eq!(reply.get("Federated"), Some(&serde_json::Value::Bool(true)));

    // The unfederated binding is not on B: nothing there takes `home.*`.
    let home = remote.request("fed", "home");
    assert!(
        !routed(&remote, "home.ping", &home).await,
        "an unfederated binding must not reach zone west"
    );

    // At home, both bindings are served by the listener itself.
    let mut local = client(a, &format!("{name}-local")).await;
    for key in ["fed.ping", "home.ping"] {
        let request = local.request("fed", "ping");
        assert!(routed(&local, key, &request).await);
        let reply = local.reply(SOON).await.expect("a reply on A");
        assert_eq!(reply.msg_id(), request.msg_id());
        assert_eq!(reply.get_str("Zone"), Some("local"));
        assert_eq!(
            reply.get("Federated"),
            Some(&serde_json::Value::Bool(false))
        );
    }

    handle.stop().await.expect("listener stops");
    assert!(
        consumed_by(&remote, &federated_queue, 0).await,
        "the federator stopped with its listener"
    );
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_federated_binding_added_at_run_time_reaches_the_other_zone_and_its_removal_stops_it() {
    let brokers = Broker::start_many(2).await;
    let (a, b) = (&brokers[0], &brokers[1]);
    let name = unique_node("fedrt");
    let node = start_node(two_zones(&name, a, b)).await;
    let queue = format!("{name}.runtime");
    let (listener, _) = Answering::new(
        ListenerSpec::new("fedrt")
            .queue(QueueSpec::named(&queue))
            .bind(EXCHANGE, "home.*"),
        false,
    );
    let handle = serving(&node, listener).await;
    let mut remote = client(b, &format!("{name}-west")).await;
    let federated_queue = format!("{queue}-local");
    assert_eq!(
        consumers(&remote, &federated_queue).await,
        0,
        "nothing federated yet"
    );

    let binding = Binding::new(EXCHANGE, "late.*").federate(true);
    let started = Instant::now();
    handle
        .add_binding(binding.clone())
        .await
        .expect("federated binding added");
    let request = remote.request("fed", "late");
    assert!(
        routed(&remote, "late.ping", &request).await,
        "bound on B when add_binding returned"
    );
    let reply = remote.reply(SOON).await.expect("a reply on B");
    let took = started.elapsed();
    eprintln!("add_binding, a request on B and its reply: {took:?}");
    assert_eq!(reply.msg_id(), request.msg_id());
    assert!(
        took < Duration::from_secs(1),
        "works on B within a second of the call: add, publish and reply took {took:?}"
    );

    assert!(
        handle
            .remove_binding(binding)
            .await
            .expect("federated binding removed")
    );
    assert!(
        consumed_by(&remote, &federated_queue, 0).await,
        "removing the last federated binding stops consumption on B"
    );
    handle.stop().await.expect("listener stops");
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_other_zone_killed_and_restarted_under_load_loses_no_confirmed_request() {
    let brokers = Broker::start_many(2).await;
    let (a, b) = (&brokers[0], &brokers[1]);
    let name = unique_node("fedkill");
    let node = start_node(two_zones(&name, a, b)).await;
    let queue = format!("{name}.load");
    let (listener, _) = Answering::new(
        ListenerSpec::new("fedkill")
            .queue(QueueSpec::named(&queue).durable())
            .federate(EXCHANGE, "load.*"),
        true,
    );
    let handle = serving(&node, listener).await;
    let federated_queue = format!("{queue}-local");
    // The requester's replies go to a durable queue of its own on B, which survives B.
    let replies = format!("{name}-replies");
    let requester = |tag: &'static str| {
        let (b, replies, name) = (b.clone(), replies.clone(), name.clone());
        async move {
            let client = client(&b, &format!("{name}-{tag}")).await;
            client.queue(&replies, FieldTable::default()).await;
            client
                .channel
                .queue_bind(
                    replies.as_str().into(),
                    "targeted".into(),
                    replies.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("bind the replies");
            client
        }
    };
    let first = requester("before").await;
    assert!(
        consumed_by(&first, &federated_queue, 1).await,
        "a federator consumes on B"
    );
    // Requests keep going to B while it is killed: those B confirmed must be answered.
    let confirmed = Arc::new(Mutex::new(Vec::new()));
    let load = tokio::spawn({
        let (confirmed, replies, name) = (confirmed.clone(), replies.clone(), name.clone());
        async move {
            for i in 0..10_000 {
                let msg_id = format!("{name}-{i}");
                if !send(&first, &replies, &msg_id).await {
                    return;
                }
                confirmed.lock().push(msg_id);
            }
        }
    });
    assert!(
        common::until(SOON, || async { confirmed.lock().len() >= 40 }).await,
        "requests confirmed on B before the kill"
    );
    b.kill().await;
    assert!(
        tokio::time::timeout(SOON, load).await.is_ok(),
        "the requester stops when B dies"
    );
    let mut sent = confirmed.lock().clone();

    // Zone west is gone: the node is still ready, and zone local is served.
    assert!(
        node.context().readiness.is_ready(),
        "a remote zone never makes the node not ready: {}",
        node.context().readiness.describe_pending()
    );
    let mut local = client(a, &format!("{name}-local")).await;
    let home = local.request("fed", "home");
    assert!(routed(&local, "load.home", &home).await);
    let reply = local
        .reply(SOON)
        .await
        .expect("zone local answers with B down");
    assert_eq!(reply.msg_id(), home.msg_id());

    b.restart().await;
    let second = requester("after").await;
    for i in 0..40 {
        let msg_id = format!("{name}-after-{i}");
        assert!(
            send(&second, &replies, &msg_id).await,
            "confirmed after the restart"
        );
        sent.push(msg_id);
    }
    let mut answered = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while answered.len() < sent.len() && Instant::now() < deadline {
        for (_, envelope) in second.drain(&replies).await {
            if let Some(msg_id) = envelope.as_ref().and_then(|e| e.msg_id()) {
                answered.insert(msg_id.to_string());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let missing: Vec<&String> = sent.iter().filter(|id| !answered.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "confirmed requests never answered: {missing:?}"
    );

    handle.stop().await.expect("listener stops");
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn failover_at_home_is_unaffected_while_the_other_zone_is_down() {
    let brokers = Broker::start_many(3).await;
    let (a1, a2, b) = (&brokers[0], &brokers[1], &brokers[2]);
    let name = unique_node("fedfail");
    let text = format!(
        "{}\n[zones.west]\nbrokers = [\"{}\"]\n",
        config_text(
            name.as_str(),
            &[a1.uri(), a2.uri()],
            "remote_reconnect_max_ms = 500"
        ),
        b.uri()
    );
    let config = Config::parse(&text, Path::new("test.ini"), &[], None).expect("config");
    let node = start_node(config).await;
    let queue = format!("{name}.home");
    let (listener, _) = Answering::new(
        ListenerSpec::new("fedfail")
            .queue(QueueSpec::named(&queue))
            .federate(EXCHANGE, "fail.*"),
        false,
    );
    let handle = serving(&node, listener).await;
    b.kill().await;
    a1.kill().await;
    assert!(
        common::until(SOON, || async {
            handle.current().is_some_and(|(broker, _)| broker.0 == 1) && handle.is_consuming()
        })
        .await,
        "the listener moved to the second broker of its zone with the other zone down"
    );
    let mut local = client(a2, &format!("{name}-local")).await;
    let request = local.request("fed", "ping");
    assert!(routed(&local, "fail.ping", &request).await);
    let reply = local
        .reply(SOON)
        .await
        .expect("answered on the second broker");
    assert_eq!(reply.msg_id(), request.msg_id());
    assert!(
        common::until(SOON, || async { node.context().readiness.is_ready() }).await,
        "ready on the second broker without the other zone: {}",
        node.context().readiness.describe_pending()
    );
    handle.stop().await.expect("listener stops");
    node.stop().await.expect("node stops");
}
