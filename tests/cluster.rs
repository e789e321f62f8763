//! A RabbitMQ cluster as one broker entry (`cluster = [...]`): three private nodes joined
//! into one cluster (`tests/support`'s `BrokerCluster`), a quorum queue, confirmed
//! publishes at about 1,000 msg/s, and members SIGKILLed under that load.
//!
//! Proves: losing the member warren is connected to moves warren to another member (the
//! same broker: the primary never goes away, so no failover), it consumes again, and every
//! confirmed message is handled; losing the queue's leader while warren is on another
//! member does not even cost warren its connection. Pauses and duplicates are printed.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Seen, SpecListener, app_context, blocking, config_text, start_node, unique_node};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Connection, ConnectionProperties};
use parking_lot::Mutex;
use warren_listeners::{Event, Exchange, ListenerSpec, QueueSpec, spawn_listener};
use warren_runtime::broker::BrokerId;
use warren_runtime::config::Config;
use warren_runtime::envelope::{Envelope, publish_properties};
use warren_runtime::node::Node;
use warren_test_support::{BrokerCluster, eventually};

/// Confirmed publishes per second while members are killed.
const RATE: u64 = 1_000;
/// Bound for the cluster and warren to settle after a kill.
const SETTLE: Duration = Duration::from_secs(60);

/// What a publisher got through.
struct Published {
    /// The confirmed Msg-IDs.
    confirmed: Vec<String>,
    /// The longest wait for one confirm (the broker stalled publishing meanwhile).
    longest_confirm: Duration,
}

/// Publishes `Msg-ID`s `<prefix>0`, `<prefix>1`… at `RATE` to `exchange` through `uri`
/// until `stop`, each confirmed; returns the confirmed ids. A nack fails the test.
async fn publish_until(
    prefix: &'static str,
    uri: String,
    exchange: String,
    stop: Arc<AtomicBool>,
) -> Published {
    let connection = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .expect("publisher connects");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut confirmed = Vec::new();
    let mut longest_confirm = Duration::ZERO;
    let started = Instant::now();
    let mut sent: u64 = 0;
    while !stop.load(Ordering::SeqCst) {
        let due = started + Duration::from_micros(sent * 1_000_000 / RATE);
        tokio::time::sleep_until(due.into()).await;
        let id = format!("{prefix}{sent}");
        sent += 1;
        let body = Envelope::new("t", "work")
            .with("Msg-ID", id.as_str())
            .encode();
        let confirm = channel
            .basic_publish(
                exchange.as_str().into(),
                "k".into(),
                BasicPublishOptions::default(),
                &body,
                publish_properties(false).with_delivery_mode(2),
            )
            .await
            .expect("publish");
        let asked = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(30), confirm).await;
        longest_confirm = longest_confirm.max(asked.elapsed());
        match answer {
            Ok(Ok(lapin::Confirmation::Ack(_))) => confirmed.push(id),
            Ok(Ok(other)) => panic!("publish of {id} not acked: {other:?}"),
            Ok(Err(error)) => panic!("publish of {id} failed: {error}"),
            Err(_) => panic!("no confirm for {id} within 30 s"),
        }
    }
    let _ = connection.close(200, "done".into()).await;
    Published {
        confirmed,
        longest_confirm,
    }
}

/// The longest gap between two first handlings, over the run: the pause a kill caused.
fn longest_pause(seen: &Seen, confirmed: &[String]) -> Duration {
    let mut firsts: Vec<Instant> = confirmed
        .iter()
        .filter_map(|id| seen.first_seen(id))
        .collect();
    firsts.sort();
    firsts
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap_or_default()
}

/// Which member (by index) warren's consume connection is on.
async fn connected_member(node: &Node, cluster: &Arc<Mutex<BrokerCluster>>) -> Option<usize> {
    let report = node.context().connections.inspect(BrokerId(0)).await.ok()?;
    if !report.connected {
        return None;
    }
    let cluster = cluster.lock();
    (0..cluster.len()).find(|&i| {
        report
            .member
            .contains(&format!(":{}", cluster.member(i).amqp_port()))
    })
}

/// The member the quorum queue's leader is on, once it has one.
async fn leader_index(cluster: &Arc<Mutex<BrokerCluster>>, queue: &str) -> usize {
    let deadline = Instant::now() + SETTLE;
    loop {
        let leader = cluster.lock().leader_of(queue).ok().flatten();
        if let Some(index) = leader.and_then(|l| cluster.lock().member_index_of(&l)) {
            return index;
        }
        assert!(Instant::now() < deadline, "the queue has no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_is_one_broker_whose_members_can_die_under_load() {
    common::init_logs();
    let cluster = blocking(|| BrokerCluster::start(3))
        .await
        .expect("a 3-node cluster starts");
    let members: Vec<String> = cluster.uris();
    let cluster = Arc::new(Mutex::new(cluster));
    let name = unique_node("cluster");
    let entry = format!(
        "{{ cluster = [{}] }}",
        members
            .iter()
            .map(|m| format!("\"{m}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let text =
        config_text(&name, &["PLACEHOLDER".to_string()], "").replace("\"PLACEHOLDER\"", &entry);
    let config = Config::parse(&text, std::path::Path::new("test.ini"), &[], None)
        .expect("the cluster config is valid");
    let node = start_node(config).await;

    // Nothing may ever take the primary away: a member's loss is not a failover.
    let registry = node.context().registry.clone();
    let primary_lost = Arc::new(AtomicBool::new(false));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (lost, watching) = (primary_lost.clone(), watching.clone());
        tokio::spawn(async move {
            while watching.load(Ordering::SeqCst) {
                if registry.primary().is_none() {
                    lost.store(true, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let (exchange, queue) = (format!("{name}-ex"), format!("{name}-work"));
    let seen = Seen::default();
    let seen_in = seen.clone();
    let spec = ListenerSpec::new("work")
        .queue(QueueSpec::named(&queue).quorum())
        .exchange(Exchange::topic(&exchange).durable())
        .bind(&exchange, "#")
        .responder("t", "work", move |event: Event| {
            if let Some(id) = event.envelope().msg_id() {
                seen_in.record(id);
            }
            async { Ok(()) }
        });
    let handle = spawn_listener(SpecListener(spec), &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, Duration::from_secs(20)).await);
    let first = connected_member(&node, &cluster)
        .await
        .expect("warren is on a member");
    // The queue was declared through that member: its leader is there (client-local).
    let leader = cluster.lock().leader_of(&queue).expect("leader");
    eprintln!("warren on member {first}, leader of `{queue}` {leader:?}");

    // 1. Kill the member warren is on (the leader too) under load.
    let publish_via = (first + 1) % 3;
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(publish_until(
        "a",
        members[publish_via].clone(),
        exchange.clone(),
        stop.clone(),
    ));
    assert!(eventually(SETTLE, || seen.distinct() >= 1_000).await);
    {
        let cluster = cluster.clone();
        blocking(move || cluster.lock().kill(first))
            .await
            .expect("kill");
    }
    let moved_to = {
        let deadline = Instant::now() + SETTLE;
        loop {
            if let Some(member) = connected_member(&node, &cluster).await
                && member != first
            {
                break member;
            }
            assert!(
                Instant::now() < deadline,
                "warren did not move to another member"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    assert!(handle.wait_consuming(true, SETTLE).await);
    let before = seen.distinct();
    assert!(
        eventually(SETTLE, || seen.distinct() >= before + 1_000).await,
        "warren consumes again on member {moved_to}"
    );
    stop.store(true, Ordering::SeqCst);
    let published = publisher.await.expect("publisher");
    let confirmed = &published.confirmed;
    assert!(
        eventually(SETTLE, || confirmed
            .iter()
            .all(|id| seen.first_seen(id).is_some()))
        .await,
        "every confirmed message is handled: {} of {} seen",
        confirmed
            .iter()
            .filter(|id| seen.first_seen(id).is_some())
            .count(),
        confirmed.len()
    );
    eprintln!(
        "member {first} (warren's, the leader) killed: warren moved to member {moved_to}; \
         {} confirmed, all handled, {} duplicates, longest pause in handling {:?} \
         (longest wait for a confirm {:?})",
        confirmed.len(),
        seen.duplicates(),
        longest_pause(&seen, confirmed),
        published.longest_confirm
    );
    {
        let cluster = cluster.clone();
        blocking(move || cluster.lock().restart(first))
            .await
            .expect("the killed member comes back and rejoins");
    }

    // 2. Kill the queue's leader while warren is on another member.
    let mut leader = leader_index(&cluster, &queue).await;
    if leader == moved_to {
        // Move the leader off warren's member: take that member's replica out of the
        // queue (a new leader is elected among the others), then give it back.
        let node_name = cluster.lock().member(moved_to).node_name().to_string();
        let other = (moved_to + 1) % 3;
        let (cluster_in, queue_in) = (cluster.clone(), queue.clone());
        blocking(move || {
            let cluster = cluster_in.lock();
            let tool = |args: &[&str]| cluster.member(other).tool("rabbitmq-queues", args);
            tool(&["delete_member", &queue_in, &node_name]).expect("delete_member");
            tool(&["add_member", &queue_in, &node_name]).expect("add_member");
        })
        .await;
        leader = leader_index(&cluster, &queue).await;
        assert_ne!(leader, moved_to, "the leader left warren's member");
    }
    {
        let generation = node
            .context()
            .connections
            .inspect(BrokerId(0))
            .await
            .expect("inspect")
            .generation;
        let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let publisher = tokio::spawn(publish_until(
            "b",
            members[others[0]].clone(),
            exchange.clone(),
            stop.clone(),
        ));
        let start = seen.distinct();
        assert!(eventually(SETTLE, || seen.distinct() >= start + 1_000).await);
        {
            let cluster = cluster.clone();
            blocking(move || cluster.lock().kill(leader))
                .await
                .expect("kill the leader");
        }
        let after_kill = seen.distinct();
        assert!(
            eventually(SETTLE, || seen.distinct() >= after_kill + 1_000).await,
            "handling goes on under a new leader"
        );
        stop.store(true, Ordering::SeqCst);
        let published = publisher.await.expect("publisher");
        let confirmed = &published.confirmed;
        assert!(
            eventually(SETTLE, || confirmed
                .iter()
                .all(|id| seen.first_seen(id).is_some()))
            .await,
            "every confirmed message is handled after the leader's loss"
        );
        let report = node
            .context()
            .connections
            .inspect(BrokerId(0))
            .await
            .expect("inspect");
        assert_eq!(
            report.generation, generation,
            "warren's connection survived the leader's loss"
        );
        eprintln!(
            "leader (member {leader}) killed while warren was on member {moved_to}: {} \
             confirmed, all handled, {} duplicates (both kills), longest pause in handling \
             {:?} (longest wait for a confirm {:?})",
            confirmed.len(),
            seen.duplicates(),
            longest_pause(&seen, confirmed),
            published.longest_confirm
        );
    }
    watching.store(false, Ordering::SeqCst);
    let _ = watcher.await;
    assert!(
        !primary_lost.load(Ordering::SeqCst),
        "the cluster never stopped being the primary: no failover"
    );
    handle.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}
