//! Effectively once: a listener's de-duplication window (`ListenerSpec::dedup`) against
//! real RabbitMQ. A copy of a handled message is acked without running the handler; a
//! failed one runs again; and broker kills under load, which make the broker redeliver
//! messages whose acks were lost, cause no second handler run with the window (and print
//! how many without it).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::client::Client;
use common::{Broker, SOON, Seen, app_context, config, recording, start_node, unique_node};
use warren_listeners::{
    Binding, Dedup, Envelope, Exchange, HandlerError, ListenerHandle, ListenerSpec, QueueSpec,
    spawn_listener,
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

/// The chaos test: a private broker killed twice while two listeners work through a
/// backlog of persistent messages (each message reaches both: one listener has the window,
/// the other not). Messages handled whose acks die with the broker are redelivered after
/// its restart: the window acks them without a second run.
#[tokio::test]
async fn broker_kills_under_load_cause_no_duplicate_handler_runs_with_the_window() {
    const MESSAGES: usize = 3_000;
    let broker = Broker::start_many(1).await.remove(0);
    let name = unique_node("dedup-chaos");
    let node = start_node(config(&name, &[broker.uri()], "")).await;
    let exchange = format!("{name}-ex");
    let (with, without) = (Seen::default(), Seen::default());
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
    let client = Client::connect(&broker.uri(), &name).await;
    for i in 0..MESSAGES {
        client
            .publish(&exchange, "k", &message(&format!("c-{i}")))
            .await;
    }
    drop(client);
    for share in [4, 2] {
        // Kill while both listeners are busy: at a quarter, then at half of the backlog.
        let mark = MESSAGES / share;
        assert!(
            eventually(Duration::from_secs(60), || with.distinct() >= mark
                && without.distinct() >= mark)
            .await,
            "both listeners reach {mark} messages"
        );
        broker.kill().await;
        broker.restart().await;
    }
    let everything = eventually(Duration::from_secs(120), || {
        with.distinct() == MESSAGES && without.distinct() == MESSAGES
    })
    .await;
    assert!(
        everything,
        "every message handled after the kills: with the window {}, without {} of {MESSAGES}",
        with.distinct(),
        without.distinct()
    );
    println!(
        "broker killed twice under load: {} duplicate handler runs without the window, {} with it ({} copies acked unhandled)",
        without.duplicates(),
        with.duplicates(),
        deduped.stats().duplicates
    );
    assert_eq!(with.duplicates(), 0, "the window let a handler run twice");
    let _ = deduped.stop().await;
    let _ = plain.stop().await;
    let _ = node.stop().await;
    broker.kill().await;
}
