//! Connections against real brokers: reconnect after a SIGKILL, the primary moving to the
//! second broker and back, the prechannel buffer keeping its size, blocked connections
//! recorded in the registry, and connections closed on an orderly stop.

mod common;

use std::time::{Duration, Instant};

use common::{SOON, blocking, config, unique_node};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use warren_runtime::broker::BrokerId;
use warren_runtime::node::Node;
use warren_test_support::{
    BrokerNode, channel_count, eventually, list_connections, local_ctl, local_uri,
};

const FIRST: BrokerId = BrokerId(0);
const SECOND: BrokerId = BrokerId(1);

/// The port of an `amqp://…@127.0.0.1:<port>/…` URI.
fn port_of(uri: &str) -> u16 {
    uri.rsplit(':')
        .next()
        .and_then(|tail| tail.split('/').next())
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no port in {uri}"))
}

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
async fn a_dead_consumer_loses_its_grant_and_its_channel() {
    use warren_runtime::assignments::{ChannelKind, GrantEvent};
    let name = unique_node("dead-consumer");
    let node = start_node(config(&name, &[local_uri()], "prechannels = 2")).await;
    let assignments = node.context().assignments.clone();
    let (client, mut events) = assignments
        .register("doomed", ChannelKind::Float)
        .expect("register");
    let grant = match tokio::time::timeout(SOON, events.next()).await {
        Ok(Some(GrantEvent::Granted(grant))) => grant,
        _ => panic!("no channel granted"),
    };
    assert_eq!(grant.number, 1);
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
        "2 prechannels + the granted one"
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
                .is_ok_and(|r| r.grants.is_empty() && r.reservations.is_empty())
        })
        .await,
        "the grant is released"
    );
    assert!(
        blocking({
            let check = channels(2);
            move || warren_test_support::eventually_blocking(SOON, check)
        })
        .await,
        "its channel is closed on the broker"
    );
    assert!(!grant.channel.status().connected());
    node.stop().await.expect("orderly stop");
}

/// A connection actor killed and restarted by its supervisor never hands out a generation
/// it handed out before: stale channels must never look current.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_connection_actor_never_reuses_a_generation() {
    let node = start_node(config(
        &unique_node("generation"),
        &[local_uri()],
        "prechannels = 1",
    ))
    .await;
    let registry = node.context().registry.clone();
    let connections = node.context().connections.clone();
    let before = registry.status(FIRST).map(|s| s.generation);
    assert_eq!(before, Some(1));
    let actor = connections.connection(FIRST).expect("a connection actor");
    let old_id = actor.get_id();
    actor.kill();
    // The new actor is connected, and the registry shows what it reported.
    let restarted = common::until(SOON, || async {
        let new_actor = connections
            .connection(FIRST)
            .is_some_and(|a| a.get_id() != old_id);
        new_actor
            && connections.inspect(FIRST).await.is_ok_and(|r| {
                r.connected
                    && registry
                        .status(FIRST)
                        .is_some_and(|s| s.available && s.generation == r.generation)
            })
    })
    .await;
    assert!(
        restarted,
        "the supervisor did not restart the connection actor"
    );
    let after = registry.status(FIRST).map(|s| s.generation).unwrap_or(0);
    assert!(
        after > 1,
        "the restarted actor reused generation {after} (before: 1)"
    );
    node.stop().await.expect("orderly stop");
}

/// Losing only the publish connection leaves consumers alone (their channels live on the
/// consume connection), and publishing comes back on its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_publish_connection_does_not_touch_consumers() {
    use warren_runtime::assignments::{ChannelKind, GrantEvent};
    use warren_runtime::confirm::Published;
    use warren_runtime::envelope::Envelope;

    let name = unique_node("publish-loss");
    let node = start_node(config(&name, &[local_uri()], "prechannels = 2")).await;
    let registry = node.context().registry.clone();
    let publisher = node.context().publisher.clone();
    let (_client, mut events) = node
        .context()
        .assignments
        .register("survivor", ChannelKind::Float)
        .expect("register");
    let grant = match tokio::time::timeout(SOON, events.next()).await {
        Ok(Some(GrantEvent::Granted(grant))) => grant,
        _ => panic!("no channel granted"),
    };
    let queue = format!("{name}-q");
    grant
        .channel
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("declare a queue");
    let consume_generation = registry.status(FIRST).map(|s| s.generation);

    let publish_name = format!("{name}/publish");
    let closed = blocking(move || {
        warren_test_support::close_connections(local_ctl, &publish_name, "test: publish only")
    })
    .await
    .expect("close the publish connection");
    assert_eq!(closed, 1, "exactly the publish connection is closed");

    // The client hears nothing: no Lost, no new grant.
    match tokio::time::timeout(Duration::from_secs(3), events.next()).await {
        Err(_) => {}
        Ok(Some(GrantEvent::Lost { number })) => {
            panic!("the client lost grant {number} with the publish connection")
        }
        Ok(Some(GrantEvent::Granted(l))) => panic!("unexpected new grant {}", l.number),
        Ok(None) => panic!("assignments stopped"),
    }
    assert!(
        grant.channel.status().connected(),
        "the grant's channel is open"
    );
    assert_eq!(
        registry.status(FIRST).map(|s| s.generation),
        consume_generation,
        "the consume connection was not replaced"
    );

    let started = Instant::now();
    let published = publisher
        .publish(
            "",
            &queue,
            Envelope::new("test", "publish-loss"),
            publisher.options().mandatory(),
        )
        .await;
    assert!(
        matches!(published, Ok(Published::Routed)),
        "publishing after the loss: {published:?}"
    );
    println!("published again {:?} after the check", started.elapsed());
    node.stop().await.expect("orderly stop");
}

/// A returning primary is connected to within a second of accepting connections, even
/// after the reconnect backoff has grown to its maximum (5 s here): the port is probed
/// cheaply while it refuses TCP.
#[tokio::test(flavor = "multi_thread")]
async fn a_returning_broker_is_noticed_within_a_second_after_a_long_outage() {
    let broker = common::Broker::start_many(1).await.remove(0);
    let text = common::config_text(&unique_node("fast-return"), &[broker.uri()], "")
        .replace("reconnect_max_ms = 500", "reconnect_max_ms = 5000");
    let config =
        warren_runtime::config::Config::parse(&text, std::path::Path::new("test.ini"), &[], None)
            .expect("config");
    let node = start_node(config).await;
    let registry = node.context().registry.clone();
    let mut returns = Vec::new();
    for cycle in 0..3 {
        broker.kill().await;
        assert!(
            eventually(Duration::from_secs(30), || registry
                .status(FIRST)
                .is_some_and(|s| !s.available && s.failed_attempts >= 6))
            .await,
            "cycle {cycle}: the backoff did not grow"
        );
        let grown = registry.status(FIRST).map_or(0, |s| s.failed_attempts);
        // When the port starts accepting TCP again (polled every 5 ms, bounded).
        let port = port_of(&broker.uri());
        let accepting = tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            None
        });
        broker.restart().await;
        let restarted = Instant::now();
        assert!(
            eventually(Duration::from_secs(15), || registry.is_available(FIRST)).await,
            "cycle {cycle}: no reconnect"
        );
        let available = Instant::now();
        let accepted = accepting.await.ok().flatten().expect("the port accepts");
        let after_accept = available.saturating_duration_since(accepted);
        let after_restart = available.saturating_duration_since(restarted);
        println!(
            "cycle {cycle}: available {after_accept:?} after the port accepted, \
             {after_restart:?} after restart() returned ({grown} failed attempts before)"
        );
        returns.push(after_accept.max(after_restart));
    }
    returns.sort();
    let median = returns[returns.len() / 2];
    assert!(
        median < Duration::from_secs(1),
        "median return {median:?} of {returns:?}"
    );
    node.stop().await.expect("orderly stop");
}

/// Events of `warren_runtime` seen by the process-wide counting subscriber: (level,
/// message, every field rendered), so a test can count the lines about its own broker.
mod events {
    use std::sync::{Mutex, OnceLock};

    use tracing::field::{Field, Visit};
    use tracing::{Event, Level, Metadata, Subscriber};
    use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

    /// One recorded event.
    #[derive(Clone, Debug)]
    pub struct Seen {
        pub level: Level,
        pub message: String,
        pub fields: String,
        pub at: std::time::Instant,
    }

    static SEEN: Mutex<Vec<Seen>> = Mutex::new(Vec::new());
    /// The counting layer keeps at most this many events (a bound for a long test run).
    const CAP: usize = 200_000;

    struct Counting;

    struct Fields {
        message: String,
        fields: String,
    }

    impl Visit for Fields {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                self.message = format!("{value:?}");
            } else {
                self.fields
                    .push_str(&format!(" {}={value:?}", field.name()));
            }
        }

        fn record_str(&mut self, field: &Field, value: &str) {
            if field.name() == "message" {
                self.message = value.to_string();
            } else {
                self.fields.push_str(&format!(" {}={value}", field.name()));
            }
        }
    }

    impl<S: Subscriber> Layer<S> for Counting {
        fn enabled(&self, metadata: &Metadata<'_>, _: Context<'_, S>) -> bool {
            metadata.target().starts_with("warren_runtime")
        }

        fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
            let mut fields = Fields {
                message: String::new(),
                fields: String::new(),
            };
            event.record(&mut fields);
            let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
            if seen.len() < CAP {
                seen.push(Seen {
                    level: *event.metadata().level(),
                    message: fields.message,
                    fields: fields.fields,
                    at: std::time::Instant::now(),
                });
            }
        }
    }

    /// Installs the counting subscriber once for the whole test process.
    pub fn install() {
        static ONCE: OnceLock<()> = OnceLock::new();
        ONCE.get_or_init(|| {
            let subscriber = tracing_subscriber::registry().with(Counting);
            let _ = tracing::subscriber::set_global_default(subscriber);
        });
    }

    /// Events recorded so far that mention `needle` in a field and satisfy `keep`.
    pub fn about(needle: &str, keep: impl Fn(&Seen) -> bool) -> Vec<Seen> {
        SEEN.lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|e| e.fields.contains(needle) && keep(e))
            .cloned()
            .collect()
    }
}

/// A broker that refuses channels (channel_max reached) is retried with a growing,
/// jittered delay per consumer, and the refusals are logged a few times, not once per
/// retry.
#[tokio::test(flavor = "multi_thread")]
async fn channel_refusals_are_retried_slowly_and_logged_rarely() {
    use warren_runtime::assignments::ChannelKind;

    events::install();
    let broker =
        blocking(|| BrokerNode::start_with(&["channel_max = 8"]).expect("broker node")).await;
    let port = format!("127.0.0.1:{}", broker.amqp_port());
    let node = start_node(config(
        &unique_node("channel-max"),
        &[broker.uri()],
        "prechannels = 2",
    ))
    .await;
    let assignments = node.context().assignments.clone();
    const CONSUMERS: usize = 12;
    let mut held = Vec::new();
    for i in 0..CONSUMERS {
        held.push(
            assignments
                .register(format!("greedy-{i}"), ChannelKind::Float)
                .expect("register"),
        );
    }
    let window_start = Instant::now();
    let is_refusal = |e: &events::Seen| e.message.starts_with("no channel from the broker");
    assert!(
        eventually(SOON, || !events::about(&port, is_refusal).is_empty()).await,
        "no channel was refused"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let window = window_start.elapsed();
    let report = assignments.inspect().await.expect("inspect");
    let waiting = report.reservations.len();
    assert!(waiting > 0, "some consumers must wait for a channel");
    let warnings: Vec<_> = events::about(&port, |e| {
        e.level == tracing::Level::WARN && e.at <= window_start + window
    });
    let attempts = events::about(&port, |e| is_refusal(e) && e.at <= window_start + window).len();
    println!(
        "{waiting} consumers waiting; {attempts} refused takes and {} warnings in {window:?}",
        warnings.len()
    );
    assert!(
        warnings.len() <= 3,
        "{} warnings in {window:?}: {:#?}",
        warnings.len(),
        warnings.iter().map(|w| &w.message).collect::<Vec<_>>()
    );
    let per_consumer = attempts as f64 / waiting as f64;
    assert!(
        per_consumer <= 7.0,
        "{per_consumer:.1} take attempts per waiting consumer in {window:?}"
    );
    drop(held);
    node.stop().await.expect("orderly stop");
    drop(broker);
}

/// With heartbeats off, a broker that hangs (SIGSTOP) never closes the connection; a
/// channel open must still give up within `operation_timeout` instead of waiting forever.
#[tokio::test(flavor = "multi_thread")]
async fn a_channel_open_on_a_hung_broker_gives_up_within_the_operation_timeout() {
    use warren_runtime::connection_actor::ChannelError;

    let broker = common::Broker::start_many(1).await.remove(0);
    let node = start_node(config(
        &unique_node("hung-open"),
        &[broker.uri()],
        "heartbeat_secs = 0\noperation_timeout_ms = 500\nprechannels = 0",
    ))
    .await;
    let connections = node.context().connections.clone();
    broker.freeze().await;
    let started = Instant::now();
    let taken = connections.take_channel(FIRST).await;
    let waited = started.elapsed();
    broker.thaw().await;
    match taken {
        Err(ChannelError::Open { error, .. }) => {
            assert!(error.contains("500 ms"), "{error}")
        }
        Err(other) => panic!("expected a timed-out open, got {other}"),
        Ok(_) => panic!("a frozen broker opened a channel"),
    }
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(2),
        "gave up after {waited:?}"
    );
    // The broker is back: the connection (never lost) serves channels again.
    assert!(
        common::until(SOON, || async {
            connections.take_channel(FIRST).await.is_ok()
        })
        .await,
        "no channel after the thaw"
    );
    node.stop().await.expect("orderly stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_whose_members_are_partly_down_connects_to_one_that_answers_at_once() {
    // Two members that refuse TCP and the shared broker: whatever the shuffled order,
    // the node is up on the live member without waiting through a reconnect backoff.
    let dead: Vec<String> = (0..2)
        .map(|_| {
            let port = warren_test_support::free_port();
            format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
        })
        .collect();
    let live = local_uri();
    let members = [dead[0].clone(), live.clone(), dead[1].clone()]
        .iter()
        .map(|m| format!("\"{m}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let name = unique_node("partial-cluster");
    // A backoff of 5–10 s: reaching the live member through it would take far longer.
    let text = common::config_text(&name, &["PLACEHOLDER".to_string()], "")
        .replace("\"PLACEHOLDER\"", &format!("{{ cluster = [{members}] }}"))
        .replace("reconnect_min_ms = 50", "reconnect_min_ms = 10000")
        .replace("reconnect_max_ms = 500", "reconnect_max_ms = 10000");
    let config =
        warren_runtime::config::Config::parse(&text, std::path::Path::new("test.ini"), &[], None)
            .expect("valid config");
    let started = Instant::now();
    let node = start_node(config).await;
    let registry = node.context().registry.clone();
    assert!(
        eventually(SOON, || registry.is_available(FIRST)).await,
        "the cluster is available"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "reached the live member without a backoff: {:?}",
        started.elapsed()
    );
    let report = node
        .context()
        .connections
        .inspect(FIRST)
        .await
        .expect("inspect");
    assert!(report.connected);
    assert_eq!(port_of(&report.member), port_of(&live), "{report:?}");
    node.stop().await.expect("node stops");
}
