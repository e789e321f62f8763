//! Connections against real brokers: reconnect after a SIGKILL, the primary moving to the
//! second broker and back, the prechannel buffer keeping its size, blocked connections
//! recorded in the registry, and connections closed on an orderly stop.

mod common;

use std::time::{Duration, Instant};

use common::{SOON, blocking, config, unique_node};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use warren_runtime::node::Node;
use warren_runtime::registry::BrokerId;
use warren_test_support::{
    BrokerNode, channel_count, eventually, list_connections, local_ctl, local_uri,
};

const FIRST: BrokerId = BrokerId(0);
const SECOND: BrokerId = BrokerId(1);

async fn start_broker() -> BrokerNode {
    blocking(|| BrokerNode::start().expect("broker node starts")).await
}

async fn start_node(config: warren_runtime::config::Config) -> Node {
    match Node::start(config, |_| Vec::new()).await {
        Ok(node) => node,
        Err(error) => panic!("node did not start: {error}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnects_after_the_broker_is_killed_and_restarted() {
    let broker = start_broker().await;
    let node = start_node(config(
        &unique_node("reconnect"),
        &[broker.uri()],
        "prechannels = 4",
    ))
    .await;
    let registry = node.context().registry.clone();
    let connections = node.context().connections.clone();
    assert!(registry.is_available(FIRST));
    let first_generation = registry.status(FIRST).map(|s| s.generation);
    assert_eq!(first_generation, Some(1));

    let mut broker = blocking(move || {
        let mut broker = broker;
        broker.kill().expect("kill");
        broker
    })
    .await;
    assert!(
        eventually(SOON, || !registry.is_available(FIRST)).await,
        "the registry still says available after SIGKILL"
    );
    assert!(registry.primary().is_none());
    let error = registry.status(FIRST).and_then(|s| s.last_error);
    assert!(error.is_some(), "the loss is recorded with a reason");

    broker = blocking(move || {
        broker.restart().expect("restart");
        broker
    })
    .await;
    assert!(
        eventually(Duration::from_secs(15), || registry.is_available(FIRST)).await,
        "no reconnect after the broker came back"
    );
    assert_eq!(registry.status(FIRST).map(|s| s.generation), Some(2));
    let mut refilled = false;
    for _ in 0..200 {
        if matches!(connections.inspect(FIRST).await, Ok(report) if report.prechannels == 4) {
            refilled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        refilled,
        "the prechannel buffer was refilled on the new connection"
    );
    let channel = connections
        .take_channel(FIRST)
        .await
        .expect("a channel after reconnect");
    assert_eq!(channel.generation, 2);
    node.stop().await.expect("orderly stop");
    drop(broker);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_primary_moves_to_the_second_broker_and_back() {
    let (first, second) = tokio::join!(start_broker(), start_broker());
    let node = start_node(config(
        &unique_node("primary"),
        &[first.uri(), second.uri()],
        "",
    ))
    .await;
    let registry = node.context().registry.clone();
    assert!(
        eventually(SOON, || registry.is_available(FIRST)
            && registry.is_available(SECOND))
        .await,
        "both brokers should come up"
    );
    assert_eq!(
        registry.primary().map(|b| b.id),
        Some(FIRST),
        "first in config order is primary"
    );

    let killed_at = Instant::now();
    let first = blocking(move || {
        let mut first = first;
        first.kill().expect("kill");
        first
    })
    .await;
    assert!(
        eventually(SOON, || registry.primary().map(|b| b.id) == Some(SECOND)).await,
        "the primary did not move to the second broker"
    );
    println!(
        "primary moved to the second broker {:?} after SIGKILL",
        killed_at.elapsed()
    );

    let first = blocking(move || {
        let mut first = first;
        first.restart().expect("restart");
        first
    })
    .await;
    assert!(
        eventually(Duration::from_secs(15), || registry.primary().map(|b| b.id)
            == Some(FIRST))
        .await,
        "the primary did not move back to the first broker"
    );
    assert!(
        registry.is_available(SECOND),
        "the second broker stays connected"
    );
    node.stop().await.expect("orderly stop");
    drop((first, second));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_prechannel_buffer_keeps_its_size() {
    let name = unique_node("prechannels");
    let node = start_node(config(&name, &[local_uri()], "prechannels = 5")).await;
    let connections = node.context().connections.clone();
    let consume_name = format!("{name}/consume");
    let broker_channels = |expected: u32| {
        let consume_name = consume_name.clone();
        move || channel_count(local_ctl, &consume_name).is_ok_and(|n| n == expected)
    };
    assert!(
        blocking({
            let check = broker_channels(5);
            move || warren_test_support::eventually_blocking(SOON, check)
        })
        .await,
        "the broker does not show 5 prechannels"
    );

    let mut taken = Vec::new();
    for _ in 0..3 {
        taken.push(
            connections
                .take_channel(FIRST)
                .await
                .expect("take a channel"),
        );
    }
    assert!(
        blocking({
            let check = broker_channels(8);
            move || warren_test_support::eventually_blocking(SOON, check)
        })
        .await,
        "5 prechannels + 3 taken channels expected on the broker"
    );
    let report = connections.inspect(FIRST).await.expect("inspect");
    assert_eq!(
        report.prechannels + report.opening,
        5,
        "the buffer is refilled to its size"
    );

    drop(taken);
    assert!(
        blocking({
            let check = broker_channels(5);
            move || warren_test_support::eventually_blocking(SOON, check)
        })
        .await,
        "dropped channels are closed on the broker"
    );
    node.stop().await.expect("orderly stop");
    let rows = blocking(|| list_connections(local_ctl).expect("list connections")).await;
    assert!(
        rows.iter().all(|row| !row.name.starts_with(&name)),
        "an orderly stop closes the node's connections"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blocked_publish_connection_is_recorded_in_the_registry() {
    let broker = start_broker().await;
    let node = start_node(config(&unique_node("blocked"), &[broker.uri()], "")).await;
    let registry = node.context().registry.clone();
    let connections = node.context().connections.clone();

    let broker = blocking(move || {
        broker
            .ctl(&["set_vm_memory_high_watermark", "0"])
            .expect("raise a memory alarm");
        broker
    })
    .await;
    // RabbitMQ blocks a connection when it publishes during an alarm.
    let publisher = connections
        .publish_channel(FIRST)
        .await
        .expect("publish channel");
    let _ = publisher
        .channel
        .basic_publish(
            "".into(),
            "nowhere".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await;
    assert!(
        eventually(SOON, || registry
            .status(FIRST)
            .is_some_and(|s| s.publish_blocked.is_some()))
        .await,
        "connection.blocked was not recorded"
    );
    assert!(registry.is_available(FIRST), "blocked is not unavailable");

    let broker = blocking(move || {
        broker
            .ctl(&["set_vm_memory_high_watermark", "0.4"])
            .expect("clear the alarm");
        broker
    })
    .await;
    assert!(
        eventually(SOON, || registry
            .status(FIRST)
            .is_some_and(|s| s.publish_blocked.is_none()))
        .await,
        "connection.unblocked was not recorded"
    );
    node.stop().await.expect("orderly stop");
    drop(broker);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_consumer_loses_its_lease_and_its_channel() {
    use warren_runtime::assignments::{ChannelKind, LeaseEvent};
    let name = unique_node("dead-consumer");
    let node = start_node(config(&name, &[local_uri()], "prechannels = 2")).await;
    let assignments = node.context().assignments.clone();
    let (client, mut events) = assignments
        .register("doomed", ChannelKind::Float)
        .expect("register");
    let lease = match tokio::time::timeout(SOON, events.next()).await {
        Ok(Some(LeaseEvent::Granted(lease))) => lease,
        _ => panic!("no lease granted"),
    };
    assert_eq!(lease.generation, 1);
    let consume_name = format!("{name}/consume");
    let channels = |expected: u32| {
        let consume_name = consume_name.clone();
        move || channel_count(local_ctl, &consume_name).is_ok_and(|n| n == expected)
    };
    assert!(
        blocking({
            let check = channels(3);
            move || warren_test_support::eventually_blocking(SOON, check)
        })
        .await,
        "2 prechannels + the leased one"
    );

    // The consumer dies without releasing anything (it even keeps a clone of the channel):
    // assignments notices and closes the channel itself.
    drop(events);
    drop(client);
    assert!(
        common::until(SOON, || async {
            assignments
                .inspect()
                .await
                .is_ok_and(|r| r.leases.is_empty() && r.reservations.is_empty())
        })
        .await,
        "the lease is released"
    );
    assert!(
        blocking({
            let check = channels(2);
            move || warren_test_support::eventually_blocking(SOON, check)
        })
        .await,
        "its channel is closed on the broker"
    );
    assert!(!lease.channel.status().connected());
    node.stop().await.expect("orderly stop");
}
