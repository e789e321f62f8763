//! Interop of RPC targets with a peer that is not warren: `tests/peers/oslo_peer.py`, a
//! pika client written only from the README's address table, RabbitMQ mapping and wire
//! format, run as a subprocess (with Debian's `/usr/bin/python3` and `python3-pika`, which
//! `scripts/test` installs; a missing pika fails the test, it does not skip it).
//!
//! Proves, against two warren nodes serving the same topic: the peer's call to one named
//! server (A) is answered by that node; its calls to the group (B) are each run and
//! answered exactly once; its fanout cast (C) reaches both nodes once each; its cast to
//! one named server reaches that one; an unknown method comes back as an `UnknownMethod`
//! failure; a call nobody serves is returned to the peer.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::python::{json_lines, require_module, run_python};
use common::{SOON, app_context, config, start_node, unique_node, until};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use parking_lot::Mutex;
use serde_json::{Value, json};
use warren_listeners::{ListenerHandle, RpcServer, spawn_rpc_server};
use warren_runtime::node::Node;
use warren_test_support::local_uri;

/// The peer script.
fn peer_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/oslo_peer.py")
}

/// What a peer run gave: its exit code, the JSON lines it printed, its stderr.
#[derive(Debug)]
struct PeerRun {
    code: Option<i32>,
    lines: Vec<Value>,
    stderr: String,
}

/// Fails the test unless `/usr/bin/python3` imports pika.
async fn require_pika() {
    require_module("pika", "python3-pika").await;
}

/// Runs the peer in `mode` against the local broker with `args`.
async fn peer(mode: &str, args: &[&str]) -> PeerRun {
    let script = peer_script();
    let uri = local_uri();
    let mut all = vec![
        script.to_str().expect("a UTF-8 path"),
        mode,
        "--uri",
        uri.as_str(),
    ];
    all.extend_from_slice(args);
    let output = run_python(&all).await;
    let lines = json_lines(&output.stdout);
    PeerRun {
        code: output.status.code(),
        lines,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs the peer and expects it to succeed.
async fn peer_ok(mode: &str, args: &[&str]) -> Vec<Value> {
    let run = peer(mode, args).await;
    assert_eq!(run.code, Some(0), "peer {mode} {args:?} failed: {run:?}");
    run.lines
}

/// The one reply of a single call: its `Result` (the call must have succeeded).
fn result_of(lines: &[Value]) -> &Value {
    assert_eq!(lines.len(), 1, "one reply: {lines:?}");
    let reply = &lines[0]["reply"];
    assert!(reply.get("Failure").is_none(), "a Result: {reply}");
    &reply["Result"]
}

/// What the servers' methods ran: (node, method, args), in order.
#[derive(Clone, Default)]
struct Runs(Arc<Mutex<Vec<(String, String, Value)>>>);

impl Runs {
    fn count(&self, node: &str, method: &str, args: &Value) -> usize {
        self.0
            .lock()
            .iter()
            .filter(|(n, m, a)| n == node && m == method && a == args)
            .count()
    }
}

/// The topic's server on node `me`: `echo` answers `{"node": me, "echo": args}`, `note`
/// (for casts) records and answers null.
fn server(topic: &str, me: &str, runs: &Runs) -> RpcServer {
    let (echoer, echoes) = (me.to_string(), runs.clone());
    let (noter, notes) = (me.to_string(), runs.clone());
    RpcServer::new(topic)
        .method("echo", move |args: Value| {
            let node = echoer.clone();
            echoes
                .0
                .lock()
                .push((node.clone(), "echo".into(), args.clone()));
            async move { Ok(json!({"node": node, "echo": args})) }
        })
        .method("note", move |args: Value| {
            notes.0.lock().push((noter.clone(), "note".into(), args));
            async { Ok(Value::Null) }
        })
}

/// A node named `name` on the local broker, serving `topic`; its three listeners consume.
async fn serving(name: &str, topic: &str, runs: &Runs) -> (Node, Vec<ListenerHandle>) {
    let node = start_node(config(name, &[local_uri()], "")).await;
    let handles = spawn_rpc_server(server(topic, name, runs), &app_context(&node, "svc"))
        .await
        .expect("the RPC server starts");
    for handle in &handles {
        assert!(handle.wait_consuming(true, SOON).await, "{}", handle.name());
    }
    (node, handles)
}

/// Requests acked by the listeners of `kind` (`server`, `group`, `all`) among `handles`.
fn acked(handles: &[&[ListenerHandle]], kind: &str) -> u64 {
    handles
        .iter()
        .flat_map(|h| h.iter())
        .filter(|h| h.name().ends_with(&format!("-{kind}")))
        .map(|h| h.stats().acked)
        .sum()
}

/// Stops the servers and nodes, and deletes what serving `topic` on `nodes` declared.
async fn clean_up(topic: &str, nodes: Vec<(String, Node, Vec<ListenerHandle>)>) {
    let connection = Connection::connect(
        &local_uri(),
        ConnectionProperties::default().with_connection_name("interop/clean-up".into()),
    )
    .await
    .expect("raw connection");
    let channel = connection.create_channel().await.expect("raw channel");
    let mut queues = vec![format!("unicast.{topic}")];
    for (name, node, handles) in nodes {
        for handle in handles {
            handle.stop().await.expect("the listener stops");
        }
        node.stop().await.expect("the node stops");
        queues.push(format!("exclusive.{topic}.{name}"));
        queues.push(format!("/broadcast/{topic}.{name}"));
    }
    for queue in queues {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = channel
        .exchange_delete(
            format!("/broadcast/{topic}").as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_from_the_readme_calls_one_server_the_group_and_fans_out_to_all() {
    require_pika().await;
    let (one, two) = (unique_node("interop-a"), unique_node("interop-b"));
    let topic = format!("interop-{one}");
    let runs = Runs::default();
    let (node1, handles1) = serving(&one, &topic, &runs).await;
    let (node2, handles2) = serving(&two, &topic, &runs).await;

    // A: a call to each named server is answered by that node.
    for name in [&one, &two] {
        let lines = peer_ok(
            "call",
            &[
                "--topic",
                &topic,
                "--server",
                name,
                "--method",
                "echo",
                "--args",
                r#"{"x":1}"#,
            ],
        )
        .await;
        assert_eq!(
            result_of(&lines),
            &json!({"node": name, "echo": {"x": 1}}),
            "exclusive.{topic}.{name} is answered by {name}"
        );
        assert_eq!(runs.count(name, "echo", &json!({"x": 1})), 1);
    }

    // B: six calls to the group, each answered once, each run once over both nodes.
    let lines = peer_ok(
        "call",
        &[
            "--topic",
            &topic,
            "--method",
            "echo",
            "--args",
            r#"{"x":2}"#,
            "--count",
            "6",
        ],
    )
    .await;
    assert_eq!(lines.len(), 6, "one reply per call: {lines:?}");
    let ids: std::collections::BTreeSet<&str> =
        lines.iter().filter_map(|l| l["id"].as_str()).collect();
    assert_eq!(ids.len(), 6, "six distinct requests: {lines:?}");
    for line in &lines {
        let node = line["reply"]["Result"]["node"].as_str().unwrap_or_default();
        assert!(node == one || node == two, "answered by a server: {line}");
        assert_eq!(line["reply"]["Result"]["echo"], json!({"x": 2}));
    }
    // Every request acked (no copy left to run again), then exactly six runs.
    let both: [&[ListenerHandle]; 2] = [&handles1, &handles2];
    assert!(
        until(SOON, || async { acked(&both, "group") == 6 }).await,
        "the group acked the six requests: {}",
        acked(&both, "group")
    );
    let x2 = json!({"x": 2});
    let (by1, by2) = (runs.count(&one, "echo", &x2), runs.count(&two, "echo", &x2));
    assert_eq!(by1 + by2, 6, "each call ran once: {by1} + {by2}");
    assert!(
        by1 > 0 && by2 > 0,
        "the group shares the calls: {by1} / {by2}"
    );

    // C: a fanout cast reaches both nodes, once each.
    let n7 = json!({"n": 7});
    let published = peer_ok(
        "fanout",
        &[
            "--topic",
            &topic,
            "--method",
            "note",
            "--args",
            r#"{"n":7}"#,
        ],
    )
    .await;
    assert_eq!(published.len(), 1, "{published:?}");
    assert!(
        until(SOON, || async { acked(&both, "all") == 2 }).await,
        "each node's broadcast queue acked the cast: {}",
        acked(&both, "all")
    );
    assert_eq!(runs.count(&one, "note", &n7), 1, "{one} got the cast once");
    assert_eq!(runs.count(&two, "note", &n7), 1, "{two} got the cast once");

    // A cast to one named server reaches it alone.
    let n8 = json!({"n": 8});
    peer_ok(
        "cast",
        &[
            "--topic",
            &topic,
            "--server",
            &two,
            "--method",
            "note",
            "--args",
            r#"{"n":8}"#,
        ],
    )
    .await;
    // The server listeners acked both A calls and now the cast.
    assert!(
        until(SOON, || async { acked(&both, "server") == 3 }).await,
        "{}",
        acked(&both, "server")
    );
    assert_eq!(runs.count(&two, "note", &n8), 1);
    assert_eq!(runs.count(&one, "note", &n8), 0);

    clean_up(&topic, vec![(one, node1, handles1), (two, node2, handles2)]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_gets_unknown_method_failures_and_returns() {
    require_pika().await;
    let name = unique_node("interop-err");
    let topic = format!("interop-{name}");
    let runs = Runs::default();
    let (node, handles) = serving(&name, &topic, &runs).await;

    let lines = peer_ok(
        "call",
        &["--topic", &topic, "--server", &name, "--method", "nope"],
    )
    .await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let reply = &lines[0]["reply"];
    assert!(reply.get("Result").is_none(), "{reply}");
    assert_eq!(reply["Failure"]["type"], "UnknownMethod", "{reply}");
    assert!(
        reply["Failure"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nope")),
        "{reply}"
    );
    // The group address answers an unknown method the same way.
    let lines = peer_ok("call", &["--topic", &topic, "--method", "nope"]).await;
    assert_eq!(lines[0]["reply"]["Failure"]["type"], "UnknownMethod");

    // A call nobody serves is returned to the peer (mandatory), not left to time out.
    let nobody = format!("nobody-{name}");
    let run = peer("call", &["--topic", &nobody, "--method", "echo"]).await;
    assert_eq!(run.code, Some(3), "returned: {run:?}");
    assert!(run.stderr.contains("returned"), "{run:?}");

    clean_up(&topic, vec![(name, node, handles)]).await;
}
