//! The node's publisher against real brokers: a publisher pinned to one broker
//! (`to_broker`) while the primary is up and after its broker died, `send` returning at the
//! write with a future for the confirm, input AMQP cannot carry refused before any
//! write, and concurrent publishes on one channel each getting their own confirm.

mod common;

use std::time::{Duration, Instant};

use common::client::Client;
use common::{Broker, SOON, config, start_node, unique_node};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::types::FieldTable;
use warren_runtime::broker::BrokerId;
use warren_runtime::confirm::{PublishError, PublishOptions, Published};
use warren_runtime::envelope::Envelope;
use warren_test_support::{eventually, local_uri};

const A: BrokerId = BrokerId(0);
const B: BrokerId = BrokerId(1);

#[tokio::test(flavor = "multi_thread")]
async fn to_broker_publishes_on_that_broker_and_fails_in_time_when_it_is_down() {
    let b = Broker::start_many(1).await.remove(0);
    let name = unique_node("to-broker");
    let node = start_node(config(&name, &[local_uri(), b.uri()], "")).await;
    let registry = node.context().registry.clone();
    assert!(
        eventually(SOON, || registry.is_publish_available(A)
            && registry.is_publish_available(B))
        .await,
        "both publish connections come up"
    );
    // The primary is the first available broker of the zone: B for a moment if its
    // consume connection came up before A's (CI saw it), then A.
    assert!(
        eventually(SOON, || registry.primary().map(|p| p.id) == Some(A)).await,
        "A is primary: {:?}",
        registry.primary().map(|p| p.id)
    );

    let queue = format!("{name}-on-b");
    let on_b = Client::connect(&b.uri(), &name).await;
    on_b.queue(&queue, FieldTable::default()).await;
    let to_b = node.context().publisher.to_broker(B);
    let published = to_b
        .publish(
            "",
            &queue,
            Envelope::new("test", "to-broker"),
            to_b.options().mandatory(),
        )
        .await;
    assert!(
        matches!(published, Ok(Published::Routed)),
        "routed on B (the queue exists only there): {published:?}"
    );
    assert_eq!(to_b.broker(), Some(B));
    assert_eq!(on_b.ready(&queue).await, 1, "B's queue received it");
    // The primary publisher still goes to A, where that queue does not exist.
    let primary = node.context().publisher.clone();
    let on_a = primary
        .publish(
            "",
            &queue,
            Envelope::new("test", "primary"),
            primary.options().mandatory(),
        )
        .await;
    assert!(
        matches!(on_a, Ok(Published::Returned(_))),
        "the primary publisher published on A: {on_a:?}"
    );
    drop(on_b);

    b.kill().await;
    assert!(
        eventually(SOON, || !registry.is_publish_available(B)).await,
        "B's publish connection is seen down"
    );
    let bound = Duration::from_millis(800);
    let started = Instant::now();
    let outcome = to_b
        .publish(
            "",
            &queue,
            Envelope::new("test", "to-dead-broker"),
            PublishOptions::new(bound),
        )
        .await;
    let waited = started.elapsed();
    match &outcome {
        Err(PublishError::BrokerUnavailable { broker, .. }) => {
            assert!(!broker.contains("guest:guest"), "no password: {broker}");
            assert!(
                broker.contains(&format!("{}", port_of(&b.uri()))),
                "the error names the broker: {broker}"
            );
        }
        other => panic!("expected BrokerUnavailable, got {other:?}"),
    }
    assert!(
        waited >= bound && waited < bound + Duration::from_secs(2),
        "waited {waited:?} for a bound of {bound:?}"
    );
    let still = primary
        .publish(
            "",
            "nowhere",
            Envelope::new("test", "primary"),
            primary.options(),
        )
        .await;
    assert!(
        still.is_ok(),
        "the primary publisher is unaffected: {still:?}"
    );
    node.stop().await.expect("orderly stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn send_returns_at_the_write_and_its_future_gives_the_confirm() {
    let broker = Broker::start_many(1).await.remove(0);
    let node = start_node(config(&unique_node("send"), &[broker.uri()], "")).await;
    let publisher = node.context().publisher.clone();
    let warm = publisher
        .publish(
            "",
            "nowhere",
            Envelope::new("test", "warm-up"),
            publisher.options().mandatory(),
        )
        .await;
    // Mandatory, as the send below: a channel for mandatory publishes is open and idle.
    assert!(warm.is_ok(), "a channel is open: {warm:?}");

    // A frozen broker still takes the bytes (the kernel buffers them) but confirms nothing.
    broker.freeze().await;
    let options = PublishOptions::new(Duration::from_secs(10)).mandatory();
    let sent = tokio::time::timeout(
        Duration::from_secs(3),
        publisher.send("", "nowhere-at-all", Envelope::new("test", "sent"), options),
    )
    .await;
    let mut sent = match sent {
        Ok(Ok(sent)) => sent,
        Ok(Err(error)) => {
            broker.thaw().await;
            panic!("send failed: {error}");
        }
        Err(_) => {
            broker.thaw().await;
            panic!("send did not return at the write");
        }
    };
    let early = tokio::time::timeout(Duration::from_millis(300), &mut sent).await;
    broker.thaw().await;
    assert!(
        early.is_err(),
        "the confirm cannot have arrived from a frozen broker: {early:?}"
    );
    match tokio::time::timeout(SOON, sent).await {
        Ok(Ok(Published::Returned(returned))) => {
            assert_eq!(returned.routing_key, "nowhere-at-all");
            assert_eq!(returned.reply_code, 312, "NO_ROUTE");
        }
        other => panic!("expected Returned, got {other:?}"),
    }
    node.stop().await.expect("orderly stop");
}

/// Regression, for two bugs. (1) lapin takes a publish's delivery tag and queues its frames
/// under two separate locks, so two tasks publishing on one channel at once could put their
/// messages on the wire in the other order than their tags, and each took the other's
/// confirm. (2) A `basic.return` carries no delivery tag and lapin gives it to whichever
/// confirm it completes next (a multiple ack completes its tags in hash order), so on a
/// shared channel a `Returned` landed on another publish (about 2,000 of 16,000 here).
/// Mandatory publishes from several tasks at once, alternating between a queue and
/// nowhere, must each get their own answer: `Routed` for the queue, `Returned` naming
/// their own routing key for nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_on_one_channel_each_get_their_own_confirm() {
    const TASKS: usize = 8;
    const EACH: usize = 2_000;
    const WINDOW: usize = 64;
    let name = unique_node("own-confirm");
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let queue = format!("{name}-routed");
    let nowhere = format!("{name}-nowhere");
    let client = Client::connect(&local_uri(), &name).await;
    client.queue(&queue, FieldTable::default()).await;
    let publisher = node.context().publisher.clone();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (publisher, queue, nowhere) = (publisher.clone(), queue.clone(), nowhere.clone());
            tokio::spawn(async move {
                let mut mixed_up = Vec::new();
                let mut inflight = FuturesUnordered::new();
                for i in 0..EACH {
                    let routed = (task + i) % 2 == 0;
                    let key = if routed {
                        queue.clone()
                    } else {
                        nowhere.clone()
                    };
                    let publisher = publisher.clone();
                    inflight.push(async move {
                        let options = publisher.options().mandatory();
                        let envelope = Envelope::new("test", "own-confirm");
                        let answer = publisher.publish("", &key, envelope, options).await;
                        (routed, key, answer)
                    });
                    if inflight.len() >= WINDOW
                        && let Some(answered) = inflight.next().await
                    {
                        check_own_answer(answered, &mut mixed_up);
                    }
                }
                while let Some(answered) = inflight.next().await {
                    check_own_answer(answered, &mut mixed_up);
                }
                mixed_up
            })
        })
        .collect();
    let mut mixed_up = Vec::new();
    for task in tasks {
        mixed_up.extend(task.await.expect("a publishing task"));
    }
    client.delete_queue(&queue).await;
    node.stop().await.expect("orderly stop");
    assert!(
        mixed_up.is_empty(),
        "{} of {} publishes got another message's confirm, e.g. {:?}",
        mixed_up.len(),
        TASKS * EACH,
        mixed_up.first()
    );
}

/// Records a publish whose answer is not its own (a nack or an error fails the test).
fn check_own_answer(
    (routed, key, answer): (bool, String, Result<Published, PublishError>),
    mixed_up: &mut Vec<String>,
) {
    match answer {
        Ok(Published::Routed) if routed => {}
        Ok(Published::Returned(returned)) if !routed && returned.routing_key == key => {}
        Ok(other) => mixed_up.push(format!("to `{key}` (routed: {routed}): {other:?}")),
        Err(error) => panic!("a publish to `{key}` failed: {error}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn input_amqp_cannot_carry_is_invalid_before_any_write() {
    let node = start_node(config(&unique_node("invalid"), &[local_uri()], "")).await;
    let publisher = node.context().publisher.clone();
    let long = "k".repeat(256);
    let outcomes = [
        publisher
            .publish("", &long, Envelope::new("t", "n"), publisher.options())
            .await
            .map(|_| ()),
        publisher
            .send(&long, "rk", Envelope::new("t", "n"), publisher.options())
            .await
            .map(|_| ()),
        publisher
            .to_broker(A)
            .publish("", &long, Envelope::new("t", "n"), publisher.options())
            .await
            .map(|_| ()),
    ];
    for outcome in outcomes {
        match outcome {
            Err(PublishError::Invalid(message)) => {
                assert!(message.contains("256"), "{message}");
                assert!(
                    !message.contains(&long),
                    "the value is not echoed: {message}"
                );
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }
    assert_eq!(
        publisher.broker(),
        None,
        "nothing was written, so no channel was needed"
    );
    node.stop().await.expect("orderly stop");
}

/// A sequence keeps many messages in flight on one channel, where a return could not be
/// matched to its message: it refuses a mandatory one before writing anything.
#[tokio::test(flavor = "multi_thread")]
async fn a_sequence_refuses_mandatory_messages() {
    let node = start_node(config(&unique_node("seq-mandatory"), &[local_uri()], "")).await;
    let publisher = node.context().publisher.clone();
    let mut sequence = publisher.sequence(Vec::new());
    let options = publisher.options().mandatory();
    let refused = sequence
        .send_raw("", "nowhere", b"{}", Default::default(), options)
        .await
        .map(|_| ());
    match refused {
        Err(PublishError::Invalid(message)) => assert!(message.contains("mandatory"), "{message}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert_eq!(publisher.broker(), None, "nothing was written");
    node.stop().await.expect("orderly stop");
}

/// The port of an `amqp://…@127.0.0.1:<port>/…` URI.
fn port_of(uri: &str) -> u16 {
    uri.rsplit(':')
        .next()
        .and_then(|tail| tail.split('/').next())
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no port in {uri}"))
}
