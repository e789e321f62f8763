//! RPC targets and notifications over AMQP 1.0 (`[rpc] transport = "amqp10"`) against
//! private RabbitMQ nodes with `rabbitmq_amqp1_0`: the three patterns between two warren
//! nodes, error replies, notifications acked at both ends, a broker kill mid-call, and
//! interop with `tests/peers/amqp10_peer.py`, a Qpid Proton peer written only from the
//! README (Debian's `python3-qpid-proton`, which `scripts/test` installs; a missing
//! proton fails the test, it does not skip it): it calls a warren server and serves a
//! warren client.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::python::{json_lines, require_module, run_python, spawn_python};
use common::rpc::Calls;
use common::{Broker, SOON, blocking, config_text, init_logs, unique_node};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use warren_listeners::{
    Amqp10Notifications, Amqp10Server, AppContext, HandlerError, ListenerPool, RemoteError,
    RpcError, Target,
};
use warren_runtime::amqp10::{Amqp10Error, Outgoing};
use warren_runtime::config::{AppConfig, Config, PoolConfig};
use warren_runtime::node::Node;
use warren_test_support::BrokerNode;
use warren_test_support::eventually as until;

/// A private node serving AMQP 1.0 too (on its AMQP port).
async fn amqp10_broker() -> Broker {
    let node = blocking(|| BrokerNode::start_with_plugins(&["rabbitmq_amqp1_0"], &[]))
        .await
        .expect("a node with rabbitmq_amqp1_0");
    Broker::from_node(node)
}

/// A warren node on `brokers` (AMQP 0-9-1 and 1.0 alike, the first as primary), RPC
/// over AMQP 1.0.
async fn node(label: &str, brokers: &[&Broker]) -> Node {
    node_with(label, brokers, "").await
}

/// [`node`] with `extra` config sections.
async fn node_with(label: &str, brokers: &[&Broker], extra: &str) -> Node {
    init_logs();
    let amqp10 = brokers
        .iter()
        .map(|b| format!("\"amqp10://guest:guest@127.0.0.1:{}\"", b.port()))
        .collect::<Vec<_>>()
        .join(", ");
    let amqp091: Vec<String> = brokers.iter().map(|b| b.uri()).collect();
    let text = format!(
        "{}amqp10_brokers = [{amqp10}]\n[rpc]\ntransport = \"amqp10\"\n",
        config_text(&unique_node(label), &amqp091, extra)
    );
    let config = Config::parse(&text, std::path::Path::new("test.ini"), &[], None)
        .unwrap_or_else(|error| panic!("{error}\n{text}"));
    match Node::start(config, |_| Vec::new()).await {
        Ok(node) => node,
        Err(error) => panic!("node did not start: {error}"),
    }
}

/// A started pool of two workers on `node` (the callers' side).
async fn pool(node: &Node) -> ListenerPool {
    let config = AppConfig::new(
        "caller",
        PoolConfig {
            size: 2,
            overflow: 0,
            checkout_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
        },
    );
    let ctx = AppContext::with_version("0.0.0-test", node.context().clone(), config);
    ctx.pool.spawn().await.expect("pool starts");
    ctx.pool
}

/// `topic` served on `node` as its node name, its three links attached.
async fn serve(node: &Node, topic: &str, calls: &Calls) -> Amqp10Server {
    let me = node.context().node.clone();
    let server = common::rpc::server(topic, &me, calls);
    let links = Amqp10Server::start(server, node.context()).expect("the server starts");
    assert!(links.attached(SOON).await, "the server's links attach");
    links
}

fn remote(result: Result<Value, RpcError>) -> RemoteError {
    match result {
        Err(RpcError::Remote(error)) => error,
        other => panic!("expected a remote error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_patterns_reach_one_named_server_one_of_the_group_or_all() {
    let broker = amqp10_broker().await;
    let brokers = [&broker];
    // b takes requests of at most 4 KiB (`[listener] max_message_bytes`).
    let small = "\n[listener]\nmax_message_bytes = 4096\n";
    let (a, b) = tokio::join!(node("a10", &brokers), node_with("b10", &brokers, small));
    let calls = Calls::default();
    let topic = format!("compute{}", std::process::id());
    let (server_a, server_b) = tokio::join!(serve(&a, &topic, &calls), serve(&b, &topic, &calls));
    let callers = pool(&a).await;
    let name_b = b.context().node.clone();
    // Every link attached: the node is ready (its AMQP 1.0 links are parts of it).
    let readiness = a.context().readiness.clone();
    assert!(
        until(SOON, || readiness.is_ready()).await,
        "{}",
        readiness.describe_pending()
    );

    // (A) one named server: always that one.
    let to_b = Target::new(&topic).server(&name_b);
    for _ in 0..5 {
        let answer = callers
            .call_target(&to_b, "whoami", Value::Null, SOON)
            .await;
        assert_eq!(answer.unwrap(), json!(name_b));
    }
    // (B) one of the group: every call answered exactly once, by one of the two.
    let before = calls.answered.load(Ordering::SeqCst);
    let group = Target::new(&topic);
    let mut by = std::collections::HashSet::new();
    for _ in 0..20 {
        let answer = callers
            .call_target(&group, "whoami", Value::Null, SOON)
            .await;
        by.insert(answer.unwrap().as_str().unwrap().to_string());
    }
    assert_eq!(calls.answered.load(Ordering::SeqCst) - before, 20);
    assert!(
        by.iter().all(|n| *n == name_b || *n == a.context().node),
        "{by:?}"
    );
    // (C) all of the group: a fanout cast reaches both servers once.
    callers
        .fanout_cast(&group, "note", json!({"n": 7}), SOON)
        .await
        .expect("the cast is sent");
    assert!(
        until(SOON, || calls.notes.lock().len() == 2).await,
        "{:?}",
        calls.notes.lock()
    );
    let mut servers: Vec<String> = calls.notes.lock().iter().map(|(s, _)| s.clone()).collect();
    servers.sort();
    let mut expected = vec![a.context().node.clone(), name_b.clone()];
    expected.sort();
    assert_eq!(servers, expected);

    // Failures are typed replies, never timeouts.
    let failed = remote(callers.call_target(&group, "fail", Value::Null, SOON).await);
    assert_eq!(
        (failed.kind.as_str(), failed.message.as_str()),
        ("NotFound", "no such thing")
    );
    let panicked = remote(callers.call_target(&group, "boom", Value::Null, SOON).await);
    assert_eq!(panicked.kind, RemoteError::PANIC);
    let unknown = remote(callers.call_target(&group, "nope", Value::Null, SOON).await);
    assert_eq!(unknown.kind, RemoteError::UNKNOWN_METHOD);
    // `[listener] max_message_bytes` holds over AMQP 1.0 as over 0-9-1: b refuses a
    // request above its 4 KiB with a typed error (not run, not a timeout); a, with the
    // default limit, answers the same request.
    let big = json!({"pad": "x".repeat(8 * 1024)});
    let too_big = remote(
        callers
            .call_target(&to_b, "whoami", big.clone(), SOON)
            .await,
    );
    assert_eq!(too_big.kind, RemoteError::BAD_REQUEST, "{too_big:?}");
    let to_a = Target::new(&topic).server(&a.context().node);
    let answer = callers.call_target(&to_a, "whoami", big, SOON).await;
    assert_eq!(answer.unwrap(), json!(a.context().node));
    // A call on a fanout target is refused before anything is sent.
    let refused = callers
        .call_target(&group.clone().fanout(), "whoami", Value::Null, SOON)
        .await;
    assert!(
        matches!(refused, Err(RpcError::FanoutCall(_))),
        "{refused:?}"
    );
    // A call nobody answers in time times out by its timeout.
    let started = Instant::now();
    let slow = callers
        .call_target(
            &group,
            "slow",
            json!({"ms": 3000}),
            Duration::from_millis(500),
        )
        .await;
    assert!(matches!(slow, Err(RpcError::Timeout(_))), "{slow:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // RabbitMQ ends the whole session when it refuses an attach (here: an exchange that
    // does not exist): the refusal is the sender's error, and the node's other links come
    // back on a new session by themselves.
    let transport = a.context().amqp10.clone().expect("an AMQP 1.0 node");
    let refused = transport
        .send(
            "/exchange/nope/k",
            Outgoing::new(b"{}".to_vec()),
            false,
            SOON,
        )
        .await;
    assert!(
        matches!(refused, Err(Amqp10Error::Link { .. })),
        "{refused:?}"
    );
    let deadline = Instant::now() + SOON;
    let mut answer = Err(RpcError::Timeout(Duration::ZERO));
    while Instant::now() < deadline && answer.is_err() {
        answer = callers
            .call_target(&to_b, "whoami", Value::Null, Duration::from_secs(2))
            .await;
    }
    assert_eq!(
        answer.expect("calls go on after the refusal"),
        json!(name_b)
    );

    tokio::join!(server_a.stop(SOON), server_b.stop(SOON));
    let _ = tokio::join!(a.stop(), b.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_are_acked_when_published_and_when_handled() {
    let broker = amqp10_broker().await;
    let n = node("n10", &[&broker]).await;
    let ctx = AppContext::with_version(
        "0.0.0-test",
        n.context().clone(),
        AppConfig::new("notes", n.context().pool),
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let failing = Arc::new(AtomicUsize::new(0));
    let (seen_in, failing_in) = (seen.clone(), failing.clone());
    let listener = Amqp10Notifications::start(
        n.context(),
        "openstack",
        ("monitor", "info"),
        2,
        move |note: warren_listeners::Notification| {
            let (seen, failing) = (seen_in.clone(), failing_in.clone());
            async move {
                if note.event_type == "always.fails" {
                    failing.fetch_add(1, Ordering::SeqCst);
                    return Err(HandlerError::retry("not today"));
                }
                seen.lock().push((note.event_type, note.payload));
                Ok(())
            }
        },
    )
    .expect("the listener starts");
    assert!(listener.attached(SOON).await);

    // Published: Ok only once the intermediary accepted it.
    ctx.notify("monitor", "info", "instance.created", json!({"id": 1}))
        .await
        .expect("accepted");
    assert!(until(SOON, || seen.lock().len() == 1).await);
    assert_eq!(
        seen.lock()[0],
        ("instance.created".to_string(), json!({"id": 1}))
    );
    // A handler that keeps failing runs once plus its two retries, then the notification
    // is rejected (gone), and what follows is still handled.
    ctx.notify("monitor", "info", "always.fails", Value::Null)
        .await
        .expect("accepted");
    assert!(until(SOON, || failing.load(Ordering::SeqCst) == 3).await);
    ctx.notify("monitor", "info", "after", Value::Null)
        .await
        .expect("accepted");
    assert!(until(SOON, || seen.lock().len() == 2).await);
    assert_eq!(failing.load(Ordering::SeqCst), 3);
    let queue = "openstack.monitor.info";
    let listed = broker.ctl(&["list_queues", "name", "messages"]).await;
    let line = listed
        .lines()
        .find(|l| l.starts_with(queue))
        .unwrap_or_default();
    assert!(line.ends_with("\t0"), "{queue} not empty: {listed}");

    listener.stop(SOON).await;
    let _ = n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_when_its_broker_dies_fails_clearly_and_calls_go_on_on_the_next() {
    let (first, second) = tokio::join!(amqp10_broker(), amqp10_broker());
    let n = node("k10", &[&first, &second]).await;
    let calls = Calls::default();
    let topic = format!("kill{}", std::process::id());
    let server = serve(&n, &topic, &calls).await;
    let callers = pool(&n).await;
    let group = Target::new(&topic);
    assert_eq!(
        callers
            .call_target(&group, "whoami", Value::Null, SOON)
            .await
            .unwrap(),
        json!(n.context().node)
    );
    let transport = n.context().amqp10.clone().expect("an AMQP 1.0 node");
    assert!(
        transport
            .connected()
            .unwrap_or_default()
            .contains(&first.port().to_string())
    );
    let table = n.context().registry.intermediaries();
    assert!(
        table[0].up && !table[1].up && table[0].generation > 0,
        "{table:?}"
    );

    // A call in flight while the broker it went through is killed.
    let timeout = Duration::from_secs(8);
    let in_flight = {
        let (callers, group) = (callers.clone(), group.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let result = callers
                .call_target(&group, "slow", json!({"ms": 1500}), timeout)
                .await;
            (result, started.elapsed())
        })
    };
    let started = calls.slow_started.clone();
    assert!(
        until(SOON, || started.load(Ordering::SeqCst) == 1).await,
        "the slow call never reached the server"
    );
    first.kill().await;
    let (result, took) = in_flight.await.expect("the call ends");
    assert!(
        matches!(result, Err(RpcError::Amqp10(_)) | Err(RpcError::Timeout(_))),
        "{result:?}"
    );
    assert!(took <= timeout + Duration::from_secs(1), "{took:?}");
    // Calls go on through the second broker once the links are back.
    let mut answered = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(answer) = callers
            .call_target(&group, "whoami", Value::Null, Duration::from_secs(2))
            .await
        {
            assert_eq!(answer, json!(n.context().node));
            answered = true;
            break;
        }
    }
    assert!(answered, "no call answered after the failover");
    assert!(
        transport
            .connected()
            .unwrap_or_default()
            .contains(&second.port().to_string())
    );
    // The registry's table of intermediaries says the same, and why the first is not used.
    let table = n.context().registry.intermediaries();
    assert!(!table[0].up && table[1].up, "{table:?}");
    assert!(table[0].last_error.is_some(), "{table:?}");

    server.stop(SOON).await;
    let _ = n.stop().await;
}

/// The proton peer's script.
fn peer_script() -> String {
    format!("{}/tests/peers/amqp10_peer.py", env!("CARGO_MANIFEST_DIR"))
}

/// The peer's URL for `broker`.
fn peer_url(broker: &Broker) -> String {
    format!("amqp://guest:guest@127.0.0.1:{}", broker.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proton_peer_calls_a_warren_server_by_each_pattern() {
    require_module("proton", "python3-qpid-proton").await;
    let broker = amqp10_broker().await;
    let n = node("p10", &[&broker]).await;
    let calls = Calls::default();
    let topic = format!("interop{}", std::process::id());
    let server = serve(&n, &topic, &calls).await;
    let me = n.context().node.clone();
    let (script, url) = (peer_script(), peer_url(&broker));
    let peer = |mode: &'static str, address: String, method: &'static str, count: &'static str| {
        let (script, url) = (script.clone(), url.clone());
        async move {
            let args = [
                script.as_str(),
                mode,
                "--url",
                &url,
                "--address",
                &address,
                "--method",
                method,
                "--count",
                count,
                "--args",
                r#"{"n": 1}"#,
            ];
            let output = run_python(&args).await;
            assert!(
                output.status.success(),
                "peer {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            json_lines(&output.stdout)
        }
    };
    // (A) the named server, addressed as the README's table says.
    let replies = peer(
        "call",
        format!("/queue/exclusive.{topic}.{me}"),
        "whoami",
        "1",
    )
    .await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0]["reply"]["Result"], json!(me));
    assert_eq!(replies[0]["reply"]["Msg-ID"], replies[0]["id"]);
    // (B) the group: three calls, three answers.
    let before = calls.answered.load(Ordering::SeqCst);
    let replies = peer("call", format!("/queue/unicast.{topic}"), "whoami", "3").await;
    assert_eq!(replies.len(), 3);
    assert_eq!(calls.answered.load(Ordering::SeqCst) - before, 3);
    // An unknown method is a typed failure, not a timeout.
    let replies = peer("call", format!("/queue/unicast.{topic}"), "nope", "1").await;
    assert_eq!(
        replies[0]["reply"]["Failure"]["type"],
        json!(RemoteError::UNKNOWN_METHOD)
    );
    // (C) a cast to every server of the topic.
    let sent = peer(
        "cast",
        format!("/exchange/amq.topic/broadcast.{topic}"),
        "note",
        "1",
    )
    .await;
    assert_eq!(sent.len(), 1);
    assert!(until(SOON, || calls.notes.lock().len() == 1).await);
    assert_eq!(calls.notes.lock()[0], (me.clone(), 1));

    server.stop(SOON).await;
    let _ = n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warren_client_calls_a_proton_peer_server() {
    require_module("proton", "python3-qpid-proton").await;
    let broker = amqp10_broker().await;
    let n = node("q10", &[&broker]).await;
    let topic = format!("peer{}", std::process::id());
    // The peer serves the topic's group address for three requests.
    let address = format!("/queue/unicast.{topic}");
    let (script, url) = (peer_script(), peer_url(&broker));
    let mut child = spawn_python(&[
        &script,
        "serve",
        "--url",
        &url,
        "--address",
        &address,
        "--count",
        "3",
        "--timeout",
        "20",
    ]);
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(SOON, lines.next_line()).await;
    assert!(
        matches!(&ready, Ok(Ok(Some(line))) if line.contains("ready")),
        "the peer did not start: {ready:?}"
    );
    let callers = pool(&n).await;
    let group = Target::new(&topic);
    for i in 0..2 {
        let answer = callers
            .call_target(&group, "echo", json!({"i": i}), SOON)
            .await
            .expect("the peer answers");
        assert_eq!(answer, json!({"i": i}));
    }
    let unknown = remote(
        callers
            .call_target(&group, "other", Value::Null, SOON)
            .await,
    );
    assert_eq!(unknown.kind, RemoteError::UNKNOWN_METHOD);
    let status = tokio::time::timeout(SOON, child.wait()).await;
    assert!(
        matches!(&status, Ok(Ok(status)) if status.success()),
        "the peer did not end well: {status:?}"
    );
    let _ = n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_amqp10_intermediary_is_down_is_not_ready_and_says_so() {
    init_logs();
    let closed = warren_test_support::free_port();
    let text = format!(
        "{}amqp10_brokers = [\"amqp10://guest:guest@127.0.0.1:{closed}\"]\n[rpc]\ntransport = \"amqp10\"\n",
        config_text(
            &unique_node("down10"),
            &[warren_test_support::local_uri()],
            ""
        )
    );
    let config = Config::parse(&text, std::path::Path::new("test.ini"), &[], None)
        .unwrap_or_else(|error| panic!("{error}\n{text}"));
    let n = Node::start(config, |_| Vec::new())
        .await
        .expect("the node starts");
    // The AMQP 0-9-1 side is up; the reply link has nowhere to attach.
    let readiness = n.context().readiness.clone();
    assert!(!readiness.is_ready());
    assert!(
        readiness.describe_pending().contains("amqp10 link"),
        "{}",
        readiness.describe_pending()
    );
    // A call fails by its timeout with a clear error, not a hang.
    let callers = pool(&n).await;
    let started = Instant::now();
    let result = callers
        .call_target(
            &Target::new("nobody"),
            "whoami",
            Value::Null,
            Duration::from_secs(1),
        )
        .await;
    assert!(
        matches!(result, Err(RpcError::Amqp10(Amqp10Error::Unavailable))),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let _ = n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_go_over_amqp10s_with_the_tls_settings() {
    init_logs();
    let (certs, node) = blocking(|| {
        let certs = warren_test_support::TestCerts::generate().expect("test certificates");
        let node =
            BrokerNode::start_tls_with_plugins(&certs, "server", false, &["rabbitmq_amqp1_0"]);
        (certs, node.expect("a TLS node with rabbitmq_amqp1_0"))
    })
    .await;
    let ca = certs.path("ca.pem");
    let tls_port = node.tls_port().expect("a TLS port");
    let broker = Broker::from_node(node);
    let text = format!(
        "{}amqp10_brokers = [\"amqp10s://guest:guest@127.0.0.1:{tls_port}\"]\n\
         [rpc]\ntransport = \"amqp10\"\n[tls]\nca_file = \"{}\"\n",
        config_text(&unique_node("tls10"), &[broker.uri()], ""),
        ca.display()
    );
    let config = Config::parse(&text, std::path::Path::new("test.ini"), &[], None)
        .unwrap_or_else(|error| panic!("{error}\n{text}"));
    let n = Node::start(config, |_| Vec::new())
        .await
        .expect("the node starts");
    let calls = Calls::default();
    let topic = format!("tls{}", std::process::id());
    let server = serve(&n, &topic, &calls).await;
    let callers = pool(&n).await;
    let answer = callers
        .call_target(&Target::new(&topic), "whoami", Value::Null, SOON)
        .await
        .expect("a call over TLS");
    assert_eq!(answer, json!(n.context().node));
    let transport = n.context().amqp10.clone().expect("an AMQP 1.0 node");
    assert!(
        transport
            .connected()
            .unwrap_or_default()
            .starts_with("amqp10s://"),
        "{:?}",
        transport.connected()
    );
    server.stop(SOON).await;
    let _ = n.stop().await;
}
