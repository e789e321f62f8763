//! The configuration-event router against the local RabbitMQ: one binding per distinct
//! pattern (100 subscribers on 5 patterns → 5 bindings), the binding going with its last
//! subscriber, matching, a slow subscriber getting `Resync` without slowing the others, a
//! forced reconnect giving every subscriber `Resync`, and self-origin suppression. Each
//! test uses an exchange of its own (`[router] exchange`).

mod common;

use std::time::Duration;

use common::{SOON, blocking, config, start_node, unique_node};
use warren_listeners::{ConfigRouter, RouterEvent, Subscription};
use warren_runtime::kapi_conf::{DbAction, DocAction, DocUpdate, binding_key};
use warren_runtime::node::Node;
use warren_test_support::{close_connections, eventually, local_ctl, local_uri};

/// A node running a router on an exchange of the test's own.
async fn router_node(label: &str, buffer: usize) -> (Node, ConfigRouter, String) {
    let name = unique_node(label);
    let exchange = format!("{name}-conf");
    let node = start_node(config(
        &name,
        &[local_uri()],
        &format!("\n[router]\nexchange = \"{exchange}\"\nbuffer = {buffer}"),
    ))
    .await;
    let router = ConfigRouter::new(node.context()).expect("the router's spec");
    router.spawn().await.expect("router starts");
    assert!(
        router.listener().wait_consuming(true, SOON).await,
        "the router consumes"
    );
    (node, router, exchange)
}

/// Routing keys the broker has bound to the router's queue on `exchange`.
async fn broker_bindings(exchange: &str, queue: &str) -> Vec<String> {
    let (exchange, queue) = (exchange.to_string(), queue.to_string());
    blocking(move || {
        local_ctl(&[
            "list_bindings",
            "-q",
            "--no-table-headers",
            "source_name",
            "destination_name",
            "routing_key",
        ])
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            let (source, destination, key) = (fields.next()?, fields.next()?, fields.next()?);
            (source == exchange && destination == queue).then(|| key.to_string())
        })
        .collect()
    })
    .await
}

async fn publish(node: &Node, exchange: &str, update: &DocUpdate) {
    let publisher = node.context().publisher.clone();
    update
        .publish(&publisher, exchange)
        .await
        .expect("publish a configuration event");
}

/// The next event's routing key, or "resync".
async fn next_key(subscription: &mut Subscription) -> Option<String> {
    match subscription.next_within(SOON).await? {
        RouterEvent::Event(event) => Some(event.routing_key().to_string()),
        RouterEvent::Resync => Some("resync".to_string()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_binding_per_pattern_and_the_last_subscriber_takes_it_away() {
    let (node, router, exchange) = router_node("router-bindings", 100).await;
    let queue = router.listener().queue_name();
    let patterns: Vec<String> = vec![
        binding_key(None, Some("db1"), None, None),
        binding_key(None, None, Some("user"), None),
        binding_key(Some("doc_edited"), None, None, None),
        binding_key(None, Some("db2"), Some("device"), None),
        binding_key(None, None, None, None),
    ];
    let mut subscriptions = Vec::new();
    for i in 0..100 {
        let pattern = &patterns[i % patterns.len()];
        subscriptions.push(router.subscribe(pattern).await.expect("subscribe"));
    }
    let stats = router.stats();
    assert_eq!((stats.subscribers, stats.patterns), (100, 5));
    let mut bound = broker_bindings(&exchange, &queue).await;
    bound.sort();
    let mut expected = patterns.clone();
    expected.sort();
    assert_eq!(
        bound, expected,
        "exactly one broker binding per distinct pattern"
    );

    // All but the last subscriber of "*.db1.*.*" leave: the binding stays.
    let db1 = patterns[0].clone();
    let mut of_db1: Vec<Subscription> = Vec::new();
    let mut others = Vec::new();
    for subscription in subscriptions {
        if subscription.pattern() == db1 {
            of_db1.push(subscription);
        } else {
            others.push(subscription);
        }
    }
    let last = of_db1.pop().expect("a subscriber of db1");
    for subscription in of_db1 {
        subscription.unsubscribe().await;
    }
    assert!(broker_bindings(&exchange, &queue).await.contains(&db1));
    // The last one takes it away.
    last.unsubscribe().await;
    let bound = broker_bindings(&exchange, &queue).await;
    assert!(!bound.contains(&db1), "{bound:?}");
    assert_eq!(bound.len(), 4);
    assert_eq!(router.stats().patterns, 4);
    // Dropping a subscription unsubscribes too.
    drop(others);
    assert!(
        common::until(SOON, || async {
            broker_bindings(&exchange, &queue).await.is_empty()
        })
        .await,
        "dropped subscriptions remove their bindings"
    );
    router.stop().await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribers_get_exactly_the_events_their_patterns_match() {
    let (node, router, exchange) = router_node("router-match", 100).await;
    let mut by_db = router.subscribe("*.db1.*.*").await.expect("subscribe");
    let mut by_type = router.subscribe("*.*.user.#").await.expect("subscribe");
    let mut databases = router.subscribe("db_created.#").await.expect("subscribe");
    let mut everything = router.subscribe("#").await.expect("subscribe");
    let updates = [
        DocUpdate::doc(DocAction::Edited, "db1", "user", "u.1"),
        DocUpdate::doc(DocAction::Created, "db2", "user", "u2"),
        DocUpdate::doc(DocAction::Deleted, "db1", "device", "d1"),
        DocUpdate::db(DbAction::Created, "db3"),
    ];
    for update in &updates {
        publish(&node, &exchange, update).await;
    }
    let keys: Vec<String> = updates.iter().map(DocUpdate::routing_key).collect();
    let mut all = Vec::new();
    for _ in 0..4 {
        all.push(next_key(&mut everything).await.expect("an event"));
    }
    assert_eq!(all, keys, "`#` gets every event, in order");
    assert_eq!(
        next_key(&mut by_db).await.as_deref(),
        Some(keys[0].as_str())
    );
    assert_eq!(
        next_key(&mut by_db).await.as_deref(),
        Some(keys[2].as_str())
    );
    assert_eq!(
        next_key(&mut by_type).await.as_deref(),
        Some(keys[0].as_str())
    );
    assert_eq!(
        next_key(&mut by_type).await.as_deref(),
        Some(keys[1].as_str())
    );
    assert_eq!(
        next_key(&mut databases).await.as_deref(),
        Some(keys[3].as_str())
    );
    assert_eq!(keys[0], "doc_edited.db1.user.u%2E1", "the id is escaped");
    for subscription in [&mut by_db, &mut by_type, &mut databases] {
        assert!(
            subscription
                .next_within(Duration::from_millis(300))
                .await
                .is_none(),
            "nothing else matches"
        );
    }
    router.stop().await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_subscriber_gets_resync_and_the_others_are_not_slowed() {
    const EVENTS: usize = 200;
    const BUFFER: usize = 10;
    let (node, router, exchange) = router_node("router-slow", BUFFER).await;
    let mut slow = router.subscribe("#").await.expect("subscribe");
    let mut fast = router.subscribe("#").await.expect("subscribe");
    // Published in rounds smaller than a buffer, each read by the fast subscriber before the
    // next: it can never lag, however the machine schedules it, while the slow one (never
    // read) fills up after the first round. Were delivery to wait on a full buffer, the
    // second round would never reach the fast one.
    const ROUND: usize = BUFFER / 2;
    let mut published = Vec::new();
    let mut fast_keys = Vec::new();
    for round in 0..EVENTS / ROUND {
        for i in round * ROUND..(round + 1) * ROUND {
            let update = DocUpdate::doc(DocAction::Edited, "db", "user", format!("{i}"));
            published.push(update.routing_key());
            publish(&node, &exchange, &update).await;
        }
        while fast_keys.len() < published.len() {
            match fast.next_within(SOON).await {
                Some(RouterEvent::Event(event)) => fast_keys.push(event.routing_key().to_string()),
                Some(RouterEvent::Resync) => panic!("the fast subscriber never lags"),
                None => panic!("round {round}: the fast subscriber waited in vain"),
            }
        }
    }
    assert_eq!(
        fast_keys, published,
        "the fast subscriber got every event, in order"
    );

    // The slow one: its buffer's worth of events, then Resync where the rest was lost.
    let mut slow_items = Vec::new();
    while let Some(item) = slow.next_within(Duration::from_millis(300)).await {
        slow_items.push(match item {
            RouterEvent::Event(event) => event.routing_key().to_string(),
            RouterEvent::Resync => "resync".to_string(),
        });
    }
    assert_eq!(slow_items.len(), BUFFER + 1, "{slow_items:?}");
    assert_eq!(&slow_items[..BUFFER], &published[..BUFFER]);
    assert_eq!(slow_items[BUFFER], "resync");
    assert_eq!(slow.dropped(), (EVENTS - BUFFER) as u64);
    assert_eq!(router.stats().dropped, (EVENTS - BUFFER) as u64);

    // After the Resync it receives new events again.
    let update = DocUpdate::doc(DocAction::Edited, "db", "user", "after");
    publish(&node, &exchange, &update).await;
    assert_eq!(next_key(&mut slow).await, Some(update.routing_key()));
    router.stop().await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forced_reconnect_gives_every_subscriber_resync() {
    let (node, router, exchange) = router_node("router-gap", 100).await;
    let mut subscriptions = Vec::new();
    for pattern in ["#", "*.db.*.*", "doc_edited.#"] {
        subscriptions.push(router.subscribe(pattern).await.expect("subscribe"));
    }
    let grant_before = router.listener().current().map(|(_, grant)| grant);
    let name = node.context().node.clone();
    let closed = blocking(move || {
        close_connections(local_ctl, &format!("{name}/consume"), "test: router gap")
    })
    .await
    .expect("close");
    assert_eq!(closed, 1);
    for subscription in &mut subscriptions {
        assert_eq!(
            next_key(subscription).await.as_deref(),
            Some("resync"),
            "every subscriber is told about the gap"
        );
    }
    assert_ne!(
        router.listener().current().map(|(_, grant)| grant),
        grant_before
    );
    // Bindings are back: events flow again.
    let update = DocUpdate::doc(DocAction::Edited, "db", "user", "1");
    publish(&node, &exchange, &update).await;
    for subscription in &mut subscriptions {
        assert_eq!(next_key(subscription).await, Some(update.routing_key()));
    }
    router.stop().await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_from_this_node_skips_the_cache_that_made_it() {
    let (node, router, exchange) = router_node("router-origin", 100).await;
    let mut users = router.subscribe_as("#", "users").await.expect("subscribe");
    let mut devices = router
        .subscribe_as("#", "devices")
        .await
        .expect("subscribe");
    let mut plain = router.subscribe("#").await.expect("subscribe");

    // From this node (the publisher stamps its Node) by the cache "users".
    let own = DocUpdate::doc(DocAction::Edited, "db", "user", "mine").origin_cache("users");
    publish(&node, &exchange, &own).await;
    // The same cache name from another node is delivered to everyone.
    let elsewhere = DocUpdate::doc(DocAction::Edited, "db", "user", "theirs").origin_cache("users");
    let mut foreign = elsewhere.envelope();
    foreign.set("Node", "another@node");
    node.context()
        .publisher
        .publish(
            &exchange,
            &elsewhere.routing_key(),
            foreign,
            node.context().publisher.options(),
        )
        .await
        .expect("publish");

    assert_eq!(
        next_key(&mut users).await,
        Some(elsewhere.routing_key()),
        "its own change is skipped"
    );
    for subscription in [&mut devices, &mut plain] {
        assert_eq!(next_key(subscription).await, Some(own.routing_key()));
        assert_eq!(next_key(subscription).await, Some(elsewhere.routing_key()));
    }
    assert!(eventually(SOON, || router.stats().suppressed == 1).await);
    router.stop().await;
    node.stop().await.expect("node stops");
}
