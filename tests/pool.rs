//! Per-app pools and RPC against real RabbitMQ: every call outcome, the three
//! oslo.messaging patterns (one named server, one of a group, all), PoolFull, idle overflow
//! retiring, growth under 200 concurrent callers, checkouts returned on panic, temporary
//! bindings removed at check-in, blocked publishing, and channel churn.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::client::Client;
use common::{Broker, SOON, SpecListener, app_context, config, start_node, unique_node, until};
use futures::{FutureExt, StreamExt};
use lapin::ExchangeKind;
use serde_json::json;
use warren_listeners::{
    AppContext, Binding, Checkout, CollectEnd, Collected, Envelope, Event, Exchange,
    ListenerHandle, ListenerPool, ListenerSpec, PoolError, QueueSpec, RpcError, Until,
    spawn_listener,
};
use warren_runtime::config::{AppConfig, PoolConfig};
use warren_runtime::confirm::PublishError;
use warren_runtime::exchanges::TARGETED;
use warren_runtime::node::Node;
use warren_test_support::{channel_count, eventually, local_ctl, local_uri};

/// A pool for a test app with the given sizing, started outside the tree.
async fn pool(
    node: &Node,
    name: &str,
    size: usize,
    overflow: usize,
    checkout_ms: u64,
    idle_ms: u64,
) -> ListenerPool {
    let context = node.context().clone();
    let ctx = AppContext::with_version(
        "0.0.0-test",
        context,
        AppConfig::new(
            name,
            PoolConfig {
                size,
                overflow,
                checkout_timeout: Duration::from_millis(checkout_ms),
                idle_timeout: Duration::from_millis(idle_ms),
            },
        ),
    );
    ctx.pool.spawn().await.expect("pool starts");
    ctx.pool
}

/// Replies to ("rpc", name) requests on `exchange` (routing key `rpc.<name>`).
async fn responder(node: &Node, name: &str, exchange: &str) -> ListenerHandle {
    let spec = ListenerSpec::new(name)
        .exchange(Exchange::topic(exchange))
        .bind(exchange, "rpc.#")
        .bind_own_queue(TARGETED)
        .concurrency(32)
        .responder("rpc", "echo", |event: Event| async move {
            let payload = event.envelope().get("Payload").cloned().unwrap_or_default();
            event
                .reply(Envelope::new("rpc", "echo_resp").with("Payload", payload))
                .await?;
            Ok(())
        })
        .responder("rpc", "defer", |event: Event| async move {
            // A deferred reply first, the real one a little later.
            event
                .reply(
                    Envelope::new("rpc", "resp")
                        .with("Payload", "deferred")
                        .with("Defer-Response", true),
                )
                .await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            event
                .reply(Envelope::new("rpc", "resp").with("Payload", "final"))
                .await?;
            Ok(())
        })
        .responder("rpc", "only-defer", |event: Event| async move {
            event
                .reply(
                    Envelope::new("rpc", "resp")
                        .with("Payload", "deferred")
                        .with("Defer-Response", true),
                )
                .await?;
            Ok(())
        })
        .responder("rpc", "three", |event: Event| async move {
            for n in 1..=3 {
                event
                    .reply(Envelope::new("rpc", "resp").with("N", n))
                    .await?;
            }
            Ok(())
        })
        .responder("rpc", "silent", |_event: Event| async { Ok(()) });
    let handle = spawn_listener(SpecListener(spec), &app_context(node, "responders"))
        .await
        .expect("responder starts");
    assert!(handle.wait_consuming(true, SOON).await);
    handle
}

/// Checkout, call_collect, check-in; the replies (or the test fails).
async fn collect(
    pool: &ListenerPool,
    (exchange, key): (&str, &str),
    request: Envelope,
    until: Until,
    timeout: Duration,
) -> Collected {
    let call = async |checkout: &mut Checkout| {
        checkout
            .call_collect(exchange, key, request, until, timeout)
            .await
    };
    pool.with_checkout(call)
        .await
        .expect("checkout")
        .expect("collect")
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rpc_outcome() {
    let name = unique_node("rpc");
    let exchange = format!("{name}-ex");
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let server = responder(&node, "server", &exchange).await;
    let pool = pool(&node, "rpc", 2, 2, 2000, 30_000).await;
    let timeout = Duration::from_secs(2);

    // A reply: the same Msg-ID, the responder's payload.
    let request = Envelope::new("rpc", "echo").with("Payload", json!({"a": 1}));
    let reply = pool
        .call(&exchange, "rpc.echo", request, timeout)
        .await
        .expect("a reply");
    assert_eq!(reply.name(), "echo_resp");
    assert_eq!(reply.get("Payload"), Some(&json!({"a": 1})));

    // A timeout: nobody answers.
    let started = Instant::now();
    let silent = pool
        .call(
            &exchange,
            "rpc.silent",
            Envelope::new("rpc", "silent"),
            Duration::from_millis(500),
        )
        .await;
    assert!(matches!(silent, Err(RpcError::Timeout(_))), "{silent:?}");
    assert!(started.elapsed() >= Duration::from_millis(480));

    // A deferred reply is held until the real one comes…
    let reply = pool
        .call(
            &exchange,
            "rpc.defer",
            Envelope::new("rpc", "defer"),
            timeout,
        )
        .await
        .expect("the final reply");
    assert_eq!(reply.get_str("Payload"), Some("final"));
    // …or returned at the timeout if nothing else comes.
    let started = Instant::now();
    let reply = pool
        .call(
            &exchange,
            "rpc.only-defer",
            Envelope::new("rpc", "only-defer"),
            Duration::from_millis(1500),
        )
        .await
        .expect("the deferred reply");
    assert_eq!(reply.get_str("Payload"), Some("deferred"));
    assert!(
        started.elapsed() >= Duration::from_millis(1480),
        "held until the timeout"
    );

    // Collect by count, by predicate, and until the timeout.
    let collected = collect(
        &pool,
        (&exchange, "rpc.three"),
        Envelope::new("rpc", "three"),
        Until::Count(2),
        timeout,
    )
    .await;
    assert_eq!(
        (collected.replies.len(), collected.ended),
        (2, CollectEnd::Count)
    );
    let until_three = Until::Predicate(Box::new(|replies: &[Envelope]| {
        replies.iter().any(|r| r.get("N") == Some(&json!(3)))
    }));
    let collected = collect(
        &pool,
        (&exchange, "rpc.three"),
        Envelope::new("rpc", "three"),
        until_three,
        timeout,
    )
    .await;
    assert_eq!(
        (collected.replies.len(), collected.ended),
        (3, CollectEnd::Predicate)
    );
    let collected = collect(
        &pool,
        (&exchange, "rpc.three"),
        Envelope::new("rpc", "three"),
        Until::Count(4),
        Duration::from_millis(1500),
    )
    .await;
    assert_eq!(collected.ended, CollectEnd::Timeout);
    assert_eq!(collected.replies.len(), 3, "the replies so far");

    // Unroutable: returned at once, not a timeout.
    let started = Instant::now();
    let unroutable = pool
        .call(
            &exchange,
            "nobody.listens",
            Envelope::new("rpc", "echo"),
            timeout,
        )
        .await;
    match unroutable {
        Err(RpcError::Returned(returned)) => {
            assert_eq!(returned.reply_code, 312);
            assert_eq!(returned.routing_key, "nobody.listens");
        }
        other => panic!("expected Returned, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    let cast = pool
        .cast(
            &exchange,
            "nobody.listens",
            Envelope::new("rpc", "echo"),
            timeout,
        )
        .await;
    assert!(matches!(cast, Err(RpcError::Returned(_))), "{cast:?}");
    pool.cast(
        &exchange,
        "rpc.silent",
        Envelope::new("rpc", "silent"),
        timeout,
    )
    .await
    .expect("a routable cast");

    pool.stop().await;
    server.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_three_oslo_patterns() {
    let name = unique_node("oslo");
    let (exchange, fanout, group) = (
        format!("{name}-ex"),
        format!("{name}-all"),
        format!("{name}-group"),
    );
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let ctx = app_context(&node, "servers");
    // Three servers: each has its own queue (reachable by name through `targeted`), a
    // binding to the fanout exchange, and a share of the group's queue.
    let mut servers = Vec::new();
    let mut members = Vec::new();
    for i in 0..3 {
        let me = format!("server{i}");
        let reply_with = me.clone();
        let spec = ListenerSpec::new(&me)
            .bind_own_queue(TARGETED)
            .exchange(Exchange::fanout(&fanout))
            .bind(&fanout, "")
            .responder("rpc", "who", move |event: Event| {
                let me = reply_with.clone();
                async move {
                    event
                        .reply(Envelope::new("rpc", "me").with("Server", me))
                        .await?;
                    Ok(())
                }
            });
        servers.push(
            spawn_listener(SpecListener(spec), &ctx)
                .await
                .expect("server"),
        );
        let member = me.clone();
        let spec = ListenerSpec::new(format!("{me}-member"))
            .queue(QueueSpec::named(&group).auto_delete(true))
            .exchange(Exchange::topic(&exchange))
            .bind(&exchange, "group.who")
            .responder("rpc", "who", move |event: Event| {
                let me = member.clone();
                async move {
                    event
                        .reply(Envelope::new("rpc", "me").with("Server", me))
                        .await?;
                    Ok(())
                }
            });
        members.push(
            spawn_listener(SpecListener(spec), &ctx)
                .await
                .expect("member"),
        );
    }
    for handle in servers.iter().chain(&members) {
        assert!(handle.wait_consuming(true, SOON).await);
    }
    let pool = pool(&node, "oslo", 2, 0, 2000, 30_000).await;
    let who = || Envelope::new("rpc", "who");

    // To one named server: its own queue through `targeted`.
    let target = servers[1].queue_name();
    let reply = pool
        .call(TARGETED, &target, who(), Duration::from_secs(2))
        .await
        .expect("the named server answers");
    assert_eq!(reply.get_str("Server"), Some("server1"));

    // To one of a group: the shared queue gives each request to exactly one member.
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let collected = collect(
            &pool,
            (&exchange, "group.who"),
            who(),
            Until::Count(2),
            Duration::from_millis(1500),
        )
        .await;
        assert_eq!(
            collected.ended,
            CollectEnd::Timeout,
            "a second answer never comes"
        );
        assert_eq!(collected.replies.len(), 1, "exactly one member answers");
        answered.insert(
            collected.replies[0]
                .get_str("Server")
                .unwrap_or("")
                .to_string(),
        );
    }
    assert!(
        answered.len() > 1,
        "requests are spread over the group: {answered:?}"
    );

    // To all: the fanout reaches every server.
    let collected = collect(
        &pool,
        (&fanout, ""),
        who(),
        Until::Count(3),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(collected.ended, CollectEnd::Count);
    let mut all: Vec<_> = collected
        .replies
        .iter()
        .filter_map(|r| r.get_str("Server").map(str::to_string))
        .collect();
    all.sort();
    assert_eq!(all, ["server0", "server1", "server2"]);

    pool.stop().await;
    for handle in servers.iter().chain(&members) {
        handle.stop().await.expect("stop");
    }
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn checkout_fails_with_pool_full_and_idle_overflow_retires() {
    let name = unique_node("poolfull");
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let pool = pool(&node, "full", 2, 1, 1000, 400).await;
    let mut checkouts = Vec::new();
    for _ in 0..3 {
        checkouts.push(pool.checkout().await.expect("size + overflow checkouts"));
    }
    assert_eq!(pool.stats().workers, 3);
    assert_eq!(pool.stats().overflow_started, 1);
    let started = Instant::now();
    let full = pool.checkout().await;
    assert!(
        matches!(full, Err(PoolError::Full { .. })),
        "{:?}",
        full.err()
    );
    assert!(
        started.elapsed() >= Duration::from_millis(980),
        "waited for the checkout timeout"
    );
    assert!(
        full.err()
            .is_some_and(|e| e.to_string().contains("PoolFull"))
    );
    assert_eq!(pool.stats().full, 1);

    // A waiting checkout is woken by the first checkout that comes back (not by its timeout,
    // and not because it came late and found the worker idle).
    let waiting = tokio::spawn({
        let pool = pool.clone();
        async move {
            let checkout = pool.checkout().await;
            (Instant::now(), checkout.map(|checkout| checkout.queue()))
        }
    });
    assert!(
        eventually(SOON, || pool.stats().waiting == 1).await,
        "the checkout waits"
    );
    let returned = checkouts.pop().expect("a checkout");
    let queue = returned.queue();
    returned.checkin().await;
    let checked_in = Instant::now();
    let (woken, got) = waiting.await.expect("task");
    assert_eq!(got.expect("checkout"), queue);
    assert!(
        woken.saturating_duration_since(checked_in) < Duration::from_millis(500),
        "woken by the check-in, not by its 1 s timeout"
    );

    drop(checkouts);
    // The overflow worker retires after being idle for the idle timeout; the base stays.
    assert!(
        eventually(Duration::from_secs(5), || pool.stats().overflow_retired
            == 1
            && pool.stats().workers == 2
            && pool.stats().busy == 0)
        .await,
        "{:?}",
        pool.stats()
    );
    let checkout = pool.checkout().await.expect("the base workers still serve");
    checkout.checkin().await;
    pool.stop().await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pool_grows_under_two_hundred_concurrent_callers() {
    let name = unique_node("grow");
    let exchange = format!("{name}-ex");
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let server = responder(&node, "server", &exchange).await;
    let pool = pool(&node, "grow", 2, 30, 10_000, 30_000).await;
    let calls = (0..200).map(|i| {
        let (pool, exchange) = (pool.clone(), exchange.clone());
        async move {
            let request = Envelope::new("rpc", "echo").with("Payload", i);
            let reply = pool
                .call(&exchange, "rpc.echo", request, Duration::from_secs(10))
                .await?;
            Ok::<_, RpcError>(reply.get("Payload") == Some(&json!(i)))
        }
    });
    // Channels on the node's consume connection while the callers run: the workers' and
    // the runtime's own (prechannels, the responder).
    let consume = format!("{name}/consume");
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (sampling, consume) = (sampling.clone(), consume.clone());
        std::thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(Ordering::SeqCst) {
                peak = peak.max(channel_count(local_ctl, &consume).unwrap_or(0));
            }
            peak
        })
    };
    let results = futures::future::join_all(calls).await;
    sampling.store(false, Ordering::SeqCst);
    let peak = sampler.join().expect("sampler");
    let failures: Vec<_> = results.iter().filter(|r| !matches!(r, Ok(true))).collect();
    assert!(
        failures.is_empty(),
        "{} calls failed: {:?}",
        failures.len(),
        failures.first()
    );
    let stats = pool.stats();
    println!("200 concurrent callers: {stats:?}");
    assert!(stats.overflow_started > 0, "the pool grew: {stats:?}");
    // Prechannels (10 by default) and the responder's channel besides the workers'.
    let own = 10 + 1;
    assert!(
        peak as usize <= 2 + 30 + own,
        "the broker saw {peak} channels: more than size + overflow + the runtime's {own}"
    );
    assert!(
        peak as usize > own,
        "the sampler saw the workers' channels ({peak})"
    );
    pool.stop().await;
    server.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkout_comes_back_when_its_holder_panics() {
    let name = unique_node("panic");
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let pool = pool(&node, "panic", 1, 0, 1000, 30_000).await;
    let holder = tokio::spawn({
        let pool = pool.clone();
        async move {
            let _checkout = pool.checkout().await.expect("checkout");
            panic!("the holder dies with the checkout");
        }
    });
    assert!(holder.await.is_err(), "the holder panicked");
    assert!(
        eventually(SOON, || pool.stats().busy == 0).await,
        "the checkout went back"
    );
    let checkout = pool
        .checkout()
        .await
        .expect("the worker is available again");
    checkout.checkin().await;
    pool.stop().await;
    node.stop().await.expect("node stops");
}

/// `rabbitmqctl list_bindings` routing keys bound to one queue.
fn keys_bound_to(queue: &str) -> Vec<String> {
    local_ctl(&[
        "list_bindings",
        "-q",
        "--no-table-headers",
        "destination_name",
        "routing_key",
    ])
    .unwrap_or_default()
    .lines()
    .filter_map(|line| {
        let mut fields = line.split('\t');
        (fields.next()? == queue).then(|| fields.next().unwrap_or("").to_string())
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn temporary_bindings_deliver_to_the_checkout_and_go_at_check_in() {
    let name = unique_node("tempbind");
    let exchange = format!("{name}-ex");
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let client = Client::connect(&local_uri(), &name).await;
    client
        .declare_exchange(&exchange, ExchangeKind::Topic)
        .await;
    let pool = pool(&node, "temp", 1, 0, 1000, 30_000).await;
    let mut checkout = pool.checkout().await.expect("checkout");
    let queue = checkout.queue();
    checkout
        .bind(Binding::new(&exchange, "calls.42.#"))
        .await
        .expect("bind");
    assert!(keys_bound_to(&queue).contains(&"calls.42.#".to_string()));
    for n in 0..3 {
        client
            .publish(
                &exchange,
                "calls.42.event",
                &Envelope::new("call", "event").with("N", n),
            )
            .await;
    }
    let events: Vec<Event> = checkout.deliveries().take(3).collect::<Vec<_>>().await;
    let numbers: Vec<_> = events
        .iter()
        .map(|e| e.envelope().get("N").cloned())
        .collect();
    assert_eq!(numbers, [Some(json!(0)), Some(json!(1)), Some(json!(2))]);
    checkout.checkin().await;
    let keys = keys_bound_to(&queue);
    assert!(
        !keys.contains(&"calls.42.#".to_string()),
        "removed at check-in: {keys:?}"
    );
    assert!(
        keys.contains(&queue),
        "the worker's own binding stays: {keys:?}"
    );
    // The next holder does not get what reached the old checkout and was never read: a
    // delivery of another binding, routed to the worker's queue while the first checkout held it.
    let mut checkout = pool.checkout().await.expect("checkout");
    assert_eq!(checkout.queue(), queue, "the same worker again");
    checkout
        .bind(Binding::new(&exchange, "calls.43.#"))
        .await
        .expect("bind");
    client
        .publish(
            &exchange,
            "calls.43.event",
            &Envelope::new("call", "unread"),
        )
        .await;
    assert!(
        eventually(SOON, || keys_bound_to(&queue)
            .contains(&"calls.43.#".to_string()))
        .await
    );
    assert!(
        until(SOON, || async { client.ready(&queue).await == 0 }).await,
        "the delivery reached the worker"
    );
    checkout.checkin().await;
    let mut next = pool.checkout().await.expect("checkout");
    assert_eq!(next.queue(), queue, "the same worker again");
    assert!(
        next.next_delivery(Duration::from_millis(500))
            .await
            .is_none(),
        "the next holder got a delivery meant for the previous one"
    );
    next.checkin().await;
    pool.stop().await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn blocked_publishing_fails_with_blocked_and_recovers() {
    let brokers = Broker::start_many(1).await;
    let broker = &brokers[0];
    let name = unique_node("blocked");
    let node = start_node(config(
        &name,
        &[broker.uri()],
        "prechannels = 1\n\n[publisher]\ntimeout_ms = 1000",
    ))
    .await;
    let publisher = node.context().publisher.clone();
    publisher
        .publish("", "nowhere", Envelope::new("t", "x"), publisher.options())
        .await
        .expect("publishes before the alarm");

    broker.ctl(&["set_vm_memory_high_watermark", "0"]).await;
    // The broker blocks a connection when it publishes during the alarm.
    let started = Instant::now();
    let mut outcome = publisher
        .publish("", "nowhere", Envelope::new("t", "x"), publisher.options())
        .await;
    if outcome.is_ok() {
        // The first publish may slip through before the block; the next one may not.
        outcome = publisher
            .publish("", "nowhere", Envelope::new("t", "x"), publisher.options())
            .await;
    }
    let waited = started.elapsed();
    let blocked = matches!(outcome, Err(PublishError::Blocked { .. }));
    broker.ctl(&["set_vm_memory_high_watermark", "0.4"]).await;
    assert!(blocked, "expected Blocked, got {outcome:?}");
    assert!(
        waited >= Duration::from_millis(900),
        "waited for the timeout: {waited:?}"
    );
    assert!(waited < Duration::from_secs(4), "{waited:?}");
    println!(
        "blocked: {}",
        outcome.err().map(|e| e.to_string()).unwrap_or_default()
    );

    assert!(
        until(SOON, || async {
            publisher
                .publish("", "nowhere", Envelope::new("t", "x"), publisher.options())
                .await
                .is_ok()
        })
        .await,
        "publishing recovers once the alarm is lifted"
    );
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_short_tasks_share_the_pool_channels() {
    const TASKS: usize = 10_000;
    const CONCURRENCY: usize = 64;
    let name = unique_node("churn");
    let exchange = format!("{name}-ex");
    let node = start_node(config(&name, &[local_uri()], "prechannels = 2")).await;
    let server = responder(&node, "server", &exchange).await;
    let client = Client::connect(&local_uri(), &name).await;
    client
        .declare_exchange(&exchange, ExchangeKind::Topic)
        .await;
    let (size, overflow) = (8, 16);
    let pool = pool(&node, "churn", size, overflow, 10_000, 30_000).await;

    // Peak channels of the node's consume connection, sampled while the tasks run.
    let consume = format!("{name}/consume");
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (sampling, consume) = (sampling.clone(), consume.clone());
        std::thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(Ordering::SeqCst) {
                peak = peak.max(channel_count(local_ctl, &consume).unwrap_or(0));
            }
            peak
        })
    };
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    futures::stream::iter(0..TASKS)
        .for_each_concurrent(CONCURRENCY, |i| {
            let (pool, exchange, done) = (pool.clone(), exchange.clone(), done.clone());
            async move {
                let mut checkout = pool.checkout().await.expect("checkout");
                checkout
                    .bind(Binding::new(&exchange, format!("task.{i}")))
                    .await
                    .expect("bind");
                let reply = checkout
                    .call(
                        &exchange,
                        "rpc.echo",
                        Envelope::new("rpc", "echo").with("Payload", i),
                        Duration::from_secs(10),
                    )
                    .await
                    .expect("call");
                assert_eq!(reply.get("Payload"), Some(&json!(i)));
                checkout.checkin().await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
        .await;
    let pooled_time = started.elapsed();
    sampling.store(false, Ordering::SeqCst);
    let pooled_peak = sampler.join().expect("sampler");
    assert_eq!(done.load(Ordering::Relaxed), TASKS);
    let stats = pool.stats();
    // Runtime's own channels on that connection: prechannels and the responder's one.
    let own = 2 + 1;
    assert!(
        pooled_peak as usize <= size + overflow + own,
        "peak {pooled_peak} channels > pool {} + runtime {own}",
        size + overflow
    );

    // The same workload with a channel (and a reply queue) per task.
    let per_task = Client::connect(&local_uri(), &format!("{name}-per-task")).await;
    let per_task_name = format!("{name}-per-task/client");
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (sampling, name) = (sampling.clone(), per_task_name.clone());
        std::thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(Ordering::SeqCst) {
                peak = peak.max(channel_count(local_ctl, &name).unwrap_or(0));
            }
            peak
        })
    };
    let started = Instant::now();
    let opened = Arc::new(AtomicUsize::new(0));
    futures::stream::iter(0..TASKS)
        .for_each_concurrent(CONCURRENCY, |i| {
            let (connection, exchange, opened) =
                (&per_task.connection, exchange.clone(), opened.clone());
            async move {
                common::client::one_shot_call(connection, &exchange, i).await;
                opened.fetch_add(1, Ordering::Relaxed);
            }
        })
        .await;
    let per_task_time = started.elapsed();
    sampling.store(false, Ordering::SeqCst);
    let per_task_peak = sampler.join().expect("sampler");
    println!(
        "churn, {TASKS} tasks × (checkout, bind, call, check-in), {CONCURRENCY} at a time:\n  \
         pool ({size}+{overflow}): peak {pooled_peak} channels on the node's connection \
         (incl. {own} of the runtime), {} worker channels opened in all, {pooled_time:?}\n  \
         channel per task: peak {per_task_peak} channels, {} channels opened, {per_task_time:?}",
        size as u64 + stats.overflow_started,
        opened.load(Ordering::Relaxed),
    );
    pool.stop().await;
    server.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}

/// `pool.stats()` from another thread, so that a pool whose own lock is stuck fails the test
/// instead of hanging it.
fn stats_within(pool: &ListenerPool, bound: Duration) -> Option<warren_listeners::PoolStats> {
    let (tx, rx) = std::sync::mpsc::channel();
    let pool = pool.clone();
    std::thread::spawn(move || {
        let _ = tx.send(pool.stats());
    });
    rx.recv_timeout(bound).ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_overflow_worker_not_ready_in_time_leaves_the_pool_usable() {
    // A pool stuck on its own lock blocks the runtime's threads, so no timer inside the
    // test would fire: a watchdog thread ends the test process instead.
    let _watchdog = common::Watchdog::new("an_overflow_worker_not_ready", Duration::from_secs(90));
    overflow_worker_not_ready().await;
}

async fn overflow_worker_not_ready() {
    let brokers = Broker::start_many(1).await;
    let broker = &brokers[0];
    let name = unique_node("notready");
    let node = start_node(config(
        &name,
        &[broker.uri()],
        "prechannels = 1\nheartbeat_secs = 5",
    ))
    .await;
    let pool = pool(&node, "notready", 1, 1, 1000, 60_000).await;
    let first = pool.checkout().await.expect("the base worker");
    // No broker: the overflow worker cannot consume by the checkout deadline.
    broker.kill().await;
    assert!(eventually(SOON, || node.context().registry.primary().is_none()).await);
    let started = Instant::now();
    let second = tokio::time::timeout(Duration::from_secs(5), pool.checkout())
        .await
        .expect("the checkout ends by its deadline");
    assert!(
        matches!(second, Err(PoolError::NotReady { .. })),
        "{:?}",
        second.err()
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let stats = stats_within(&pool, Duration::from_secs(2)).expect("stats() answers");
    assert_eq!(
        (stats.busy, stats.workers),
        (1, 2),
        "the held checkout is busy; the late worker is counted, idle: {stats:?}"
    );
    tokio::time::timeout(Duration::from_secs(5), first.checkin())
        .await
        .expect("a check-in completes");
    let stats = stats_within(&pool, Duration::from_secs(2)).expect("stats() answers");
    assert_eq!((stats.busy, stats.workers), (0, 2), "{stats:?}");

    // Back up: both workers serve at once, and the broker sees exactly their channels.
    broker.restart().await;
    let (a, b) = tokio::time::timeout(Duration::from_secs(15), async {
        let a = until_checked_out(&pool).await;
        let b = until_checked_out(&pool).await;
        (a, b)
    })
    .await
    .expect("two checkouts once the broker is back");
    assert_ne!(a.queue(), b.queue());
    let consume = format!("{name}/consume");
    // One prechannel and the two workers' channels on the consume connection.
    assert!(
        until(SOON, || async { broker.channels(&consume).await == 1 + 2 }).await,
        "channels on the broker: {}",
        broker.channels(&consume).await
    );
    assert_eq!(pool.stats().busy, 2);
    a.checkin().await;
    b.checkin().await;
    assert_eq!(pool.stats().busy, 0);
    pool.stop().await;
    node.stop().await.expect("node stops");
}

/// Checks out, retrying while workers are not ready yet (bounded by the caller).
async fn until_checked_out(pool: &ListenerPool) -> warren_listeners::Checkout {
    loop {
        match pool.checkout().await {
            Ok(checkout) => return checkout,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_check_in_or_checkout_loses_no_worker() {
    let name = unique_node("cancel");
    let exchange = format!("{name}-ex");
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let client = Client::connect(&local_uri(), &name).await;
    client
        .declare_exchange(&exchange, ExchangeKind::Topic)
        .await;
    let pool = pool(&node, "cancel", 1, 1, 2000, 60_000).await;

    // A check-in whose future is dropped after its first step still returns the worker.
    let mut checkout = pool.checkout().await.expect("checkout");
    checkout
        .bind(Binding::new(&exchange, "cancelled.#"))
        .await
        .expect("bind");
    let queue = checkout.queue();
    assert!(
        checkout.checkin().now_or_never().is_none(),
        "still removing the binding"
    );
    assert!(
        eventually(SOON, || pool.stats().busy == 0).await,
        "the worker came back: {:?}",
        pool.stats()
    );
    assert!(
        !keys_bound_to(&queue).contains(&"cancelled.#".to_string()),
        "and its binding is gone"
    );

    // Checkouts given up while an overflow worker starts for them.
    let held = pool.checkout().await.expect("checkout");
    for _ in 0..3 {
        let _ = tokio::time::timeout(Duration::from_micros(50), pool.checkout()).await;
    }
    assert!(
        eventually(SOON, || {
            let stats = pool.stats();
            stats.busy == 1 && stats.workers <= 2
        })
        .await,
        "{:?}",
        pool.stats()
    );
    let second = tokio::time::timeout(SOON, until_checked_out(&pool))
        .await
        .expect("size + overflow are still usable");
    assert_eq!(pool.stats().busy, 2);
    held.checkin().await;
    second.checkin().await;
    assert_eq!(pool.stats().busy, 0);
    pool.stop().await;
    node.stop().await.expect("node stops");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_binding_left_on_another_broker_retires_the_worker() {
    let brokers = Broker::start_many(2).await;
    let (a, b) = (&brokers[0], &brokers[1]);
    let name = unique_node("unclean");
    let exchange = format!("{name}-ex");
    let node = start_node(config(
        &name,
        &[a.uri(), b.uri()],
        "prechannels = 1\nheartbeat_secs = 5",
    ))
    .await;
    for broker in [a, b] {
        let client = Client::connect(&broker.uri(), &format!("{name}-prep")).await;
        client
            .declare_exchange(&exchange, ExchangeKind::Topic)
            .await;
        let _ = client.connection.close(200, "prepared".into()).await;
    }
    let pool = pool(&node, "unclean", 1, 0, 5000, 60_000).await;
    let mut holder_a = pool.checkout().await.expect("checkout");
    let first_queue = holder_a.queue();
    holder_a
        .bind(Binding::new(&exchange, "k.only-for-a"))
        .await
        .expect("bind on A");

    // A goes into maintenance: its connections close, its queues (and the binding) stay.
    a.upgrade(&["drain"]).await;
    assert!(
        eventually(SOON, || node.context().registry.primary().map(|p| p.id)
            == Some(warren_runtime::broker::BrokerId(1)))
        .await,
        "failover to B"
    );
    // Holder A checks in while the worker is on B: the binding is removed there, not on A.
    tokio::time::timeout(SOON, holder_a.checkin())
        .await
        .expect("check-in completes");
    assert!(
        eventually(SOON, || pool.stats().unclean_retired == 1).await,
        "the worker cannot prove it is clean: {:?}",
        pool.stats()
    );
    a.upgrade(&["revive"]).await;
    let mut holder_b = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let checkout = until_checked_out(&pool).await;
            if checkout.broker() == Some(warren_runtime::broker::BrokerId(0)) {
                return checkout;
            }
            checkout.checkin().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a worker on A again");
    assert_ne!(
        holder_b.queue(),
        first_queue,
        "the old worker was not reused"
    );
    // (Maintenance closed every client connection of A: connect after the revive.)
    let client_a = Client::connect(&a.uri(), &format!("{name}-a")).await;
    client_a
        .publish(&exchange, "k.only-for-a", &Envelope::new("t", "old"))
        .await;
    assert!(
        holder_b
            .next_delivery(Duration::from_millis(1500))
            .await
            .is_none(),
        "holder B got a delivery of holder A's binding"
    );
    holder_b.checkin().await;
    pool.stop().await;
    node.stop().await.expect("node stops");
}

/// `rabbitmqctl list_queues` of a private node: (ready, unacked) of one queue.
async fn depth(broker: &Broker, queue: &str) -> Option<(u32, u32)> {
    let out = broker
        .ctl(&[
            "list_queues",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])
        .await;
    out.lines().find_map(|line| {
        let mut fields = line.split('\t');
        (fields.next()? == queue).then(|| {
            let ready = fields.next()?.trim().parse().ok()?;
            let unacked = fields.next()?.trim().parse().ok()?;
            Some((ready, unacked))
        })?
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blocked_broker_fails_publishes_with_blocked_while_consumers_keep_acking() {
    let brokers = Broker::start_many(1).await;
    let broker = &brokers[0];
    let name = unique_node("alarm");
    let (exchange, queue) = (format!("{name}-ex"), format!("{name}-q"));
    let node = start_node(config(
        &name,
        &[broker.uri()],
        "prechannels = 2\n\n[listener]\npublish_timeout_ms = 1000\n\n[publisher]\ntimeout_ms = 1000",
    ))
    .await;
    let replies: Arc<parking_lot::Mutex<Vec<String>>> = Arc::default();
    let replies_in = replies.clone();
    let noops = Arc::new(AtomicUsize::new(0));
    let noops_in = noops.clone();
    let spec = ListenerSpec::new("alarm")
        .queue(QueueSpec::named(&queue))
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "#")
        .responder("t", "noop", move |_e: Event| {
            noops_in.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        })
        .responder("t", "publish", move |event: Event| {
            let replies = replies_in.clone();
            async move {
                let outcome = event
                    .publish("", "nowhere", Envelope::new("t", "out"))
                    .await;
                // Awaited here: the handler acts on the broker's answer itself.
                let outcome = match outcome {
                    Ok(pending) => pending.await,
                    Err(error) => Err(error),
                };
                replies.lock().push(match outcome {
                    Ok(_) => "ok".to_string(),
                    Err(error) => error.to_string(),
                });
                Ok(())
            }
        });
    let handle = spawn_listener(SpecListener(spec), &app_context(&node, "alarm"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);
    handle.pause().await.expect("pause");
    assert!(handle.wait_consuming(false, SOON).await);
    let client = Client::connect(&broker.uri(), &name).await;
    client
        .publish(&exchange, "k", &Envelope::new("t", "publish"))
        .await;
    for _ in 0..20 {
        client
            .publish(&exchange, "k", &Envelope::new("t", "noop"))
            .await;
    }
    let pool = pool(&node, "alarm", 1, 0, 2000, 60_000).await;

    broker.ctl(&["set_vm_memory_high_watermark", "0"]).await;
    handle.resume().await.expect("resume");
    let started = Instant::now();
    let blocked_in_time = eventually(Duration::from_secs(5), || !replies.lock().is_empty()).await;
    let waited = started.elapsed();
    // Consumers on the blocked broker still receive and ack: the broker sees them settled.
    let settled = until(SOON, || async {
        depth(broker, &queue).await == Some((0, 0))
    })
    .await;
    let call_started = Instant::now();
    let call = pool
        .call(
            &exchange,
            "k",
            Envelope::new("t", "noop"),
            Duration::from_millis(1000),
        )
        .await;
    let call_took = call_started.elapsed();
    broker.ctl(&["set_vm_memory_high_watermark", "0.4"]).await;

    assert!(blocked_in_time, "the handler's publish hung");
    let first = replies.lock().first().cloned().unwrap_or_default();
    assert!(
        first.contains("blocks publishing"),
        "a handler's publish fails with Blocked: {first} (after {waited:?})"
    );
    assert!(
        settled,
        "the broker still holds unsettled messages: {:?} (noops handled: {})",
        depth(broker, &queue).await,
        noops.load(Ordering::SeqCst)
    );
    assert!(
        matches!(call, Err(RpcError::Publish(PublishError::Blocked { .. }))),
        "a pool call fails with Blocked: {call:?}"
    );
    assert!(call_took < Duration::from_secs(3), "{call_took:?}");

    // Unblocked: publishing from handlers works again.
    client
        .publish(&exchange, "k", &Envelope::new("t", "publish"))
        .await;
    assert!(
        eventually(SOON, || replies.lock().iter().any(|r| r == "ok")).await,
        "{:?}",
        replies.lock()
    );
    pool.stop().await;
    handle.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}
