//! A RabbitMQ cluster as one broker entry (`cluster = [...]`): three private nodes joined
//! into one cluster (`tests/support`'s `BrokerCluster`), a quorum queue, confirmed
//! publishes at about 1,000 msg/s, and members SIGKILLed under that load.
//!
//! Proves: losing the member warren is connected to moves warren to another member (the
//! same broker: the primary never goes away, so no failover), it consumes again, and every
//! confirmed message is handled; losing the queue's leader while warren is on another
//! member does not even cost warren its connection. Pauses and duplicates are printed.

mod common;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::service::Running;
use common::{Seen, SpecListener, app_context, blocking, config_text, start_node, unique_node};
use futures::FutureExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Connection, ConnectionProperties};
use parking_lot::Mutex;
use warren_listeners::{Event, Exchange, ListenerSpec, QueueSpec, spawn_listener};
use warren_runtime::broker::BrokerId;
use warren_runtime::config::Config;
use warren_runtime::envelope::{Envelope, publish_properties};
use warren_runtime::node::Node;
use warren_test_support::{BrokerCluster, eventually};

/// One cluster at a time: two would crowd the machine's two cores.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
    /// Publishes lost with their connection (a member went away before confirming).
    lost: usize,
    /// Publishes the broker nacked (a quorum queue without a leader yet), each published
    /// again, as a real publisher does, until acked.
    nacked: usize,
}

/// How long one message may keep being nacked before the test fails: a broker that
/// refuses it for longer is not recovering.
const MAX_NACKED_FOR: Duration = Duration::from_secs(60);

/// How long a nacked message waits before it is published again.
const NACK_BACKOFF: Duration = Duration::from_millis(100);

/// Confirms awaited at once by a test publisher.
const IN_FLIGHT: usize = 64;

/// Publishes envelopes `make(<prefix>0)`, `make(<prefix>1)`… at `RATE` to `exchange`
/// (routing key `routing_key`) until `stop`, each confirmed, through the first of `uris`
/// that answers; when that member goes away, through the next. Returns the confirmed ids;
/// a nacked publish is never counted as confirmed: it is counted and published again
/// after [`NACK_BACKOFF`] (as a real publisher does), and one still nacked
/// [`MAX_NACKED_FOR`] after its first nack fails the test; a publish lost with its
/// connection is counted, not expected.
async fn publish_until(
    prefix: &'static str,
    uris: Vec<String>,
    (exchange, routing_key): (String, &'static str),
    make: fn(&str) -> Envelope,
    stop: Arc<AtomicBool>,
) -> Published {
    let mut published = Published {
        confirmed: Vec::new(),
        longest_confirm: Duration::ZERO,
        lost: 0,
        nacked: 0,
    };
    let started = Instant::now();
    let mut sent: u64 = 0;
    // Nacked ids to publish again (not before the instant), and when each was first nacked.
    let mut again: VecDeque<(String, Instant)> = VecDeque::new();
    let mut first_nacked: HashMap<String, Instant> = HashMap::new();
    let mut member = 0;
    'connections: while !stop.load(Ordering::SeqCst) {
        let uri = &uris[member % uris.len()];
        member += 1;
        let Ok(Ok(connection)) = tokio::time::timeout(
            Duration::from_secs(5),
            Connection::connect(uri, ConnectionProperties::default()),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(channel) = connection.create_channel().await else {
            continue;
        };
        if channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .is_err()
        {
            continue;
        }
        let mut waiting: VecDeque<(String, Instant, lapin::PublisherConfirm)> = VecDeque::new();
        loop {
            let more = !stop.load(Ordering::SeqCst);
            // Settle what the broker answered; all of it once stopping.
            while let Some((id, asked, confirm)) = waiting.pop_front() {
                let must_wait = !more || waiting.len() + 1 >= IN_FLIGHT;
                let mut confirm = confirm;
                let answer = if must_wait {
                    tokio::time::timeout(Duration::from_secs(30), &mut confirm)
                        .await
                        .ok()
                } else {
                    (&mut confirm).now_or_never()
                };
                let Some(answer) = answer else {
                    if must_wait {
                        panic!("no confirm for {id} within 30 s");
                    }
                    waiting.push_front((id, asked, confirm));
                    break;
                };
                published.longest_confirm = published.longest_confirm.max(asked.elapsed());
                match answer {
                    Ok(lapin::Confirmation::Ack(None)) => published.confirmed.push(id),
                    Ok(lapin::Confirmation::Nack(None)) => {
                        let first = *first_nacked.entry(id.clone()).or_insert_with(Instant::now);
                        assert!(
                            first.elapsed() < MAX_NACKED_FOR,
                            "publish of {id} still nacked {:?} after its first nack",
                            first.elapsed()
                        );
                        published.nacked += 1;
                        again.push_back((id, Instant::now() + NACK_BACKOFF));
                    }
                    Ok(other) => panic!("publish of {id} not acked: {other:?}"),
                    Err(_) => {
                        // The member went away: this and every later one are lost.
                        published.lost += 1 + waiting.len();
                        continue 'connections;
                    }
                }
            }
            if !more && again.is_empty() {
                break 'connections;
            }
            let due = started + Duration::from_micros(sent * 1_000_000 / RATE);
            tokio::time::sleep_until(due.into()).await;
            let id = match again.front() {
                Some((_, not_before)) if *not_before <= Instant::now() => {
                    again.pop_front().map(|(id, _)| id).unwrap_or_default()
                }
                // While stopping, only nacked messages are left to publish.
                Some((_, not_before)) if !more => {
                    tokio::time::sleep_until((*not_before).into()).await;
                    continue;
                }
                _ => {
                    sent += 1;
                    format!("{prefix}{}", sent - 1)
                }
            };
            let body = make(&id).encode();
            let Ok(confirm) = channel
                .basic_publish(
                    exchange.as_str().into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    &body,
                    publish_properties(false).with_delivery_mode(2),
                )
                .await
            else {
                published.lost += 1 + waiting.len();
                continue 'connections;
            };
            waiting.push_back((id, Instant::now(), confirm));
        }
    }
    published
}

/// A work item for the in-process listener.
fn work(id: &str) -> Envelope {
    Envelope::new("t", "work").with("Msg-ID", id)
}

/// Waits until every confirmed id was seen at least once; fails the test naming `what`.
async fn assert_all_seen(seen: &Seen, confirmed: &[String], what: &str) {
    let all = eventually(SETTLE, || {
        confirmed.iter().all(|id| seen.first_seen(id).is_some())
    })
    .await;
    let missing = confirmed
        .iter()
        .filter(|id| seen.first_seen(id).is_none())
        .count();
    assert!(
        all,
        "{what}: {missing} of {} confirmed never seen",
        confirmed.len()
    );
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

/// config.ini text for a node whose one broker is the cluster of `members`; `apps` is
/// appended.
fn cluster_config(name: &str, members: &[String], apps: &str) -> String {
    let entry = format!(
        "{{ cluster = [{}] }}",
        members
            .iter()
            .map(|m| format!("\"{m}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let text =
        config_text(name, &["PLACEHOLDER".to_string()], "").replace("\"PLACEHOLDER\"", &entry);
    format!("{text}\n{apps}")
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

/// Moves `queue`'s leader off `member`: takes that member's replica out of the queue, waits
/// until the others have elected a leader, then gives the replica back. RabbitMQ may still
/// be tearing the old replica down when the first `add_member` comes (CI saw one hang for
/// the tool's whole minute), so a failed ask is made again, up to three times.
async fn move_leader_off(cluster: &Arc<Mutex<BrokerCluster>>, queue: &str, member: usize) {
    let node_name = cluster.lock().member(member).node_name().to_string();
    let other = (member + 1) % 3;
    let queues = |args: Vec<String>| {
        let cluster = cluster.clone();
        blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cluster.lock().member(other).tool("rabbitmq-queues", &args)
        })
    };
    let ask = |verb: &str| vec![verb.to_string(), queue.to_string(), node_name.clone()];
    queues(ask("delete_member")).await.expect("delete_member");
    let deadline = Instant::now() + SETTLE;
    while leader_index(cluster, queue).await == member {
        assert!(
            Instant::now() < deadline,
            "no leader elected off member {member}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for attempt in 1..=3 {
        match queues(ask("add_member")).await {
            Ok(_) => return,
            Err(error) if error.to_string().contains("already") => return,
            Err(error) if attempt < 3 => {
                eprintln!("add_member, attempt {attempt}: {error}; asking again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => panic!("add_member failed three times: {error}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_is_one_broker_whose_members_can_die_under_load() {
    let _one = ONE_CLUSTER.lock().await;
    common::init_logs();
    let cluster = blocking(|| BrokerCluster::start(3))
        .await
        .expect("a 3-node cluster starts");
    let members: Vec<String> = cluster.uris();
    let cluster = Arc::new(Mutex::new(cluster));
    let name = unique_node("cluster");
    let text = cluster_config(&name, &members, "");
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
        vec![members[publish_via].clone()],
        (exchange.clone(), "k"),
        work,
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
    assert_all_seen(&seen, confirmed, "every confirmed message is handled").await;
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
        move_leader_off(&cluster, &queue, moved_to).await;
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
            vec![members[others[0]].clone()],
            (exchange.clone(), "k"),
            work,
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
        assert_all_seen(
            &seen,
            confirmed,
            "every confirmed message is handled after the leader's loss",
        )
        .await;
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
    {
        let cluster = cluster.clone();
        blocking(move || cluster.lock().restart(leader))
            .await
            .expect("the killed leader comes back and rejoins");
    }

    // 3. A rolling restart: each member stopped and started in turn, under load, with the
    //    publisher moving between members as they go.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(publish_until(
        "c",
        members.clone(),
        (exchange.clone(), "k"),
        work,
        stop.clone(),
    ));
    for member in 0..3 {
        let before = seen.distinct();
        assert!(
            eventually(SETTLE, || seen.distinct() >= before + 500).await,
            "handling goes on before member {member} restarts"
        );
        let cluster = cluster.clone();
        blocking(move || {
            let mut cluster = cluster.lock();
            cluster.member_mut(member).stop().expect("stop the member");
            cluster.restart(member).expect("the member comes back")
        })
        .await;
    }
    let before = seen.distinct();
    assert!(
        eventually(SETTLE, || seen.distinct() >= before + 500).await,
        "handling goes on after the rolling restart"
    );
    stop.store(true, Ordering::SeqCst);
    let published = publisher.await.expect("publisher");
    let confirmed = &published.confirmed;
    assert_all_seen(
        &seen,
        confirmed,
        "every confirmed message is handled across the rolling restart",
    )
    .await;
    eprintln!(
        "rolling restart of the 3 members: {} confirmed, all handled, {} publishes lost \
         with their connection (not confirmed, not expected), {} nacks (published again), {} duplicates in all, longest \
         pause in handling {:?} (longest wait for a confirm {:?})",
        confirmed.len(),
        published.lost,
        published.nacked,
        seen.duplicates(),
        longest_pause(&seen, confirmed),
        published.longest_confirm
    );
    watching.store(false, Ordering::SeqCst);
    let _ = watcher.await;
    assert!(
        !primary_lost.load(Ordering::SeqCst),
        "the cluster never stopped being the primary: no failover"
    );
    handle.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}

/// An echo request whose reply goes to the test's reply queue.
fn echo_request(id: &str) -> Envelope {
    Envelope::new("echo", "req")
        .with("Msg-ID", id)
        .with("Server-ID", REPLIES)
        .with("Payload", id)
}

/// The reply queue of the two-process test (on the cluster of that test alone).
const REPLIES: &str = "cluster-test-replies";

/// Records the Msg-ID of every echo reply that reaches [`REPLIES`] through `uri`.
async fn collect_replies(uri: &str, seen: Seen) -> Connection {
    let connection = Connection::connect(uri, ConnectionProperties::default())
        .await
        .expect("the reply collector connects");
    let channel = connection.create_channel().await.expect("channel");
    let mut replies = common::client::reply_queue(&channel, REPLIES, true).await;
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = futures::StreamExt::next(&mut replies).await {
            if let Ok(reply) = Envelope::decode(&delivery.data, Some("application/json"), None)
                && let Some(id) = reply.msg_id()
            {
                seen.record(id);
            }
        }
    });
    connection
}

#[tokio::test(flavor = "multi_thread")]
async fn two_warren_processes_share_a_quorum_queue_and_one_dies_under_load() {
    let _one = ONE_CLUSTER.lock().await;
    let cluster = blocking(|| BrokerCluster::start(3))
        .await
        .expect("a 3-node cluster starts");
    let members = cluster.uris();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut services = Vec::new();
    for label in ["svc-a", "svc-b"] {
        let text = cluster_config(
            &unique_node(label),
            &members,
            "[apps.echo]\nenabled = true\nquorum_queues = true\n",
        );
        let path = dir.path().join(format!("{label}.ini"));
        std::fs::write(&path, text).expect("write config");
        services.push(Running::start(&path));
    }
    for service in &services {
        service.wait_echo_ready().await;
    }
    let leader = cluster.leader_of("echo").expect("leader_of");
    assert!(leader.is_some(), "`echo` is a quorum queue with a leader");

    let replies = Seen::default();
    let _collector = collect_replies(&members[0], replies.clone()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(publish_until(
        "e",
        vec![members[0].clone()],
        ("echo".to_string(), "echo.req"),
        echo_request,
        stop.clone(),
    ));
    assert!(
        eventually(SETTLE, || replies.distinct() >= 2_000).await,
        "both services answer: {} replies",
        replies.distinct()
    );
    let mut survivor = services.pop().expect("two services");
    let mut victim = services.pop().expect("two services");
    victim.kill();
    let at_kill = replies.distinct();
    assert!(
        eventually(SETTLE, || replies.distinct() >= at_kill + 2_000).await,
        "the other service carries on"
    );
    stop.store(true, Ordering::SeqCst);
    let published = publisher.await.expect("publisher");
    let confirmed = &published.confirmed;
    assert_all_seen(&replies, confirmed, "every confirmed request is answered").await;
    assert!(survivor.alive(), "{}", survivor.output());
    eprintln!(
        "two `warren run` on the quorum queue `echo`, one SIGKILLed under load: {} requests \
         confirmed, all answered, {} answers beyond the first (the killed one's unacked \
         deliveries, redelivered to the other), longest pause in replies {:?}",
        confirmed.len(),
        replies.duplicates(),
        longest_pause(&replies, confirmed)
    );
    assert!(survivor.stop().is_some_and(|status| status.success()));
    drop(cluster);
}
