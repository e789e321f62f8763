//! The `warren` binary as an operator meets it: config errors (exit 2, file:line:column and
//! key), `check-config` redacting passwords, start-up blocking until a broker appears, the
//! start-up timeout naming every broker, an orderly stop on SIGTERM, and logs that no
//! RUST_LOG can make print a password or a message body.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use common::client::Client;
use common::{config_text, unique_node};
use warren_test_support::{
    BrokerNode, eventually_blocking, free_port, list_connections, local_ctl, local_uri,
};

use common::service::{Running, WARREN};

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("config.ini");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Runs `warren <args>` to completion and returns (status, stdout, stderr).
fn warren(args: &[&str]) -> (ExitStatus, String, String) {
    warren_with_log(args, None)
}

/// [`warren`] with RUST_LOG set to `rust_log` (`None`: as the test runs).
fn warren_with_log(args: &[&str], rust_log: Option<&str>) -> (ExitStatus, String, String) {
    let mut command = Command::new(WARREN);
    command
        .args(args)
        .env_remove("WARREN_ZONE")
        .env_remove("WARREN_CONFIG")
        .env_remove("WARREN_LOG_FORMAT");
    if let Some(rust_log) = rust_log {
        command.env("RUST_LOG", rust_log);
    }
    let output = command.output().expect("run warren");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Each bad config: exit code 2, nothing started, and the message names file:line:col and key.
#[test]
fn config_errors_name_file_line_column_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = "[amqp]\nzone = \"local\"\n\n[zones.local]\nbrokers = [\"amqp://guest:guest@127.0.0.1:5672/%2f\"]\n";
    let cases: &[(&str, String, &str, &str)] = &[
        (
            "syntax error",
            "[amqp]\nprefetch = = 5\n".to_string(),
            ":2:",
            "amqp.prefetch",
        ),
        (
            "unknown key with a suggestion",
            good.replace("zone = \"local\"", "zone = \"local\"\nprefech = 5"),
            ":3:1:",
            "did you mean `prefetch`",
        ),
        (
            "invalid AMQP URI",
            good.replace("127.0.0.1:5672", "127.0.0.1:notaport"),
            ":5:",
            "zones.local.brokers[0]",
        ),
        (
            "local zone missing",
            good.replace("zone = \"local\"", "zone = \"west\""),
            ":2:",
            "`zones.west`: this node's zone `west` has no [zones.west] section",
        ),
        (
            "local zone without brokers",
            good.replace(
                "brokers = [\"amqp://guest:guest@127.0.0.1:5672/%2f\"]",
                "brokers = []",
            ),
            ":5:",
            "zones.local.brokers",
        ),
        (
            "pool size 0",
            format!("{good}\n[pool]\nsize = 0\n"),
            ":8:",
            "pool.size",
        ),
        (
            "reconnect_min > reconnect_max",
            good.replace(
                "zone = \"local\"",
                "zone = \"local\"\nreconnect_min_ms = 6000\nreconnect_max_ms = 5000",
            ),
            ":3:",
            "amqp.reconnect_min_ms",
        ),
        (
            "operation timeout 0",
            good.replace(
                "zone = \"local\"",
                "zone = \"local\"\noperation_timeout_ms = 0",
            ),
            ":3:",
            "amqp.operation_timeout_ms",
        ),
        (
            "an anonymous queue expiry beyond x-expires",
            format!("{good}\n[listener]\nanonymous_queue_expiry_ms = 5000000000\n"),
            ":8:",
            "listener.anonymous_queue_expiry_ms",
        ),
        (
            "exchange flags of the wrong type",
            format!("{good}\n[exchanges.targeted]\ndurable = \"no\"\n"),
            ":8:",
            "exchanges.targeted.durable",
        ),
    ];
    for (what, text, position, fragment) in cases {
        let path = write_config(dir.path(), text);
        for command in [&["check-config"][..], &["run"][..]] {
            let mut args: Vec<&str> = command.to_vec();
            args.extend(["--config", path.to_str().expect("utf-8 path")]);
            let (status, stdout, stderr) = warren(&args);
            assert_eq!(status.code(), Some(2), "{what} ({command:?}): {stderr}");
            let expected_prefix = format!("{}{position}", path.display());
            assert!(
                stderr.contains(&expected_prefix),
                "{what}: expected `{expected_prefix}` in: {stderr}"
            );
            assert!(
                stderr.contains(fragment),
                "{what}: expected `{fragment}` in: {stderr}"
            );
            assert!(
                !stderr.contains("warren ready"),
                "{what}: nothing may start"
            );
            assert!(stdout.is_empty(), "{what}: no effective config printed");
        }
    }
    // The password of a bad URI never appears in the error.
    let text = good.replace(
        "guest:guest@127.0.0.1:5672",
        "guest:s3cret@127.0.0.1:notaport",
    );
    let path = write_config(dir.path(), &text);
    let (_, _, stderr) = warren(&["check-config", path.to_str().expect("utf-8 path")]);
    assert!(!stderr.contains("s3cret"), "password leaked: {stderr}");
}

#[test]
fn check_config_prints_the_effective_config_with_passwords_redacted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = "[zones.local]\nbrokers = [\"amqp://app:s3cret@127.0.0.1:5672/%2f\", \"amqp://app:0ther%40pw@127.0.0.1:5673/%2f\"]\n\n[zones.east]\nbrokers = [\"amqp://app:east-secret@127.0.0.1:5674/%2f\"]\n";
    let path = write_config(dir.path(), text);
    let (status, stdout, stderr) = warren(&["check-config", path.to_str().expect("utf-8 path")]);
    assert!(status.success(), "check-config failed: {stderr}");
    for secret in ["s3cret", "0ther", "east-secret"] {
        assert!(
            !stdout.contains(secret),
            "password `{secret}` printed: {stdout}"
        );
    }
    assert!(
        stdout.contains("amqp://app:***@127.0.0.1:5672/%2f"),
        "{stdout}"
    );
    assert!(
        stdout.contains("prefetch = 50"),
        "defaults are filled in: {stdout}"
    );
    assert!(stdout.contains("[zones.east]"), "{stdout}");
    // WARREN_CONFIG names the file when no path is given.
    let output = Command::new(WARREN)
        .arg("check-config")
        .env("WARREN_CONFIG", &path)
        .env_remove("WARREN_ZONE")
        .output()
        .expect("run warren");
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("127.0.0.1:5674"));
}

#[test]
fn run_gives_up_after_the_startup_timeout_naming_every_broker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (free_port(), free_port());
    let brokers = [
        format!("amqp://guest:s3cret@127.0.0.1:{a}/%2f"),
        format!("amqp://guest:s3cret@127.0.0.1:{b}/%2f"),
    ];
    let text = config_text(&unique_node("timeout"), &brokers, "")
        .replace("startup_timeout_secs = 30", "startup_timeout_secs = 2");
    let path = write_config(dir.path(), &text);
    let started = Instant::now();
    let mut run = Running::start(&path);
    let status = run
        .wait_exit(Duration::from_secs(20))
        .expect("warren run exits");
    let output = run.output();
    assert!(!status.success(), "{output}");
    assert_eq!(status.code(), Some(1));
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "it waited for the timeout"
    );
    for port in [a, b] {
        assert!(
            output.contains(&format!("amqp://guest:***@127.0.0.1:{port}/%2f")),
            "broker {port} not named: {output}"
        );
    }
    assert!(
        output.contains("refused"),
        "the last error is given: {output}"
    );
    assert!(!output.contains("s3cret"), "password leaked: {output}");
}

#[test]
fn start_up_blocks_until_a_broker_appears() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut broker = BrokerNode::prepare().expect("prepare a broker node");
    let text = config_text(&unique_node("late-broker"), &[broker.uri()], "");
    let path = write_config(dir.path(), &text);
    let mut run = Running::start(&path);
    assert!(
        eventually_blocking(Duration::from_secs(10), || run.saw("cannot connect")),
        "warren should be trying to connect: {}",
        run.output()
    );
    assert!(!run.saw("warren ready"), "ready without a broker");
    assert!(run.alive(), "it keeps waiting");

    broker
        .start_again_in_background()
        .expect("start the broker");
    assert!(
        eventually_blocking(Duration::from_secs(30), || run.saw("warren ready")),
        "warren did not become ready once the broker was up: {}",
        run.output()
    );
    run.signal("TERM");
    let status = run
        .wait_exit(Duration::from_secs(15))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{}", run.output());
}

#[test]
fn sigterm_stops_in_order_and_closes_the_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_node("sigterm");
    let path = write_config(dir.path(), &config_text(&name, &[local_uri()], ""));
    let mut run = Running::start(&path);
    assert!(
        eventually_blocking(Duration::from_secs(30), || run.saw("warren ready")),
        "{}",
        run.output()
    );
    let ours = |rows: &[warren_test_support::ConnectionRow]| {
        rows.iter().filter(|r| r.name.starts_with(&name)).count()
    };
    let rows = list_connections(local_ctl).expect("list connections");
    assert_eq!(ours(&rows), 2, "a consume and a publish connection");

    run.signal("TERM");
    let status = run
        .wait_exit(Duration::from_secs(15))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{}", run.output());
    assert!(run.saw("stopped"), "{}", run.output());
    let order: Vec<usize> = ["supervisor=apps", "supervisor=connections"]
        .iter()
        .filter_map(|needle| {
            run.lines()
                .iter()
                .position(|l| l.contains("stopping its children") && l.contains(needle))
        })
        .collect();
    assert_eq!(order.len(), 2, "{}", run.output());
    assert!(
        order[0] < order[1],
        "apps stop before connections: {}",
        run.output()
    );
    assert!(
        eventually_blocking(Duration::from_secs(5), || list_connections(local_ctl)
            .is_ok_and(|rows| ours(&rows) == 0)),
        "the broker still lists the node's connections"
    );
}

/// `warren run` with the echo app enabled answers a kapi request from a plain AMQP client.
#[tokio::test(flavor = "multi_thread")]
async fn the_service_answers_echo_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_node("echo-service");
    let text = format!(
        "{}\n[apps.echo]\nenabled = true\n",
        config_text(&name, &[local_uri()], "")
    );
    let path = write_config(dir.path(), &text);
    let run = Running::start(&path);
    run.wait_echo_ready().await;

    let mut client = Client::connect(&local_uri(), &name).await;
    let request = client.request("echo", "req").with("Payload", "ping");
    client.publish("echo", "echo.req", &request).await;
    let reply = client
        .reply(Duration::from_secs(10))
        .await
        .expect("a reply");
    assert_eq!((reply.category(), reply.name()), ("echo", "resp"));
    assert_eq!(reply.msg_id(), request.msg_id());
    assert_eq!(reply.get_str("Payload"), Some("ping"));
    run.signal("TERM");
}

/// `warren call` prints the reply as JSON, and exits non-zero with a clear message on a
/// timeout or an unroutable request.
#[tokio::test(flavor = "multi_thread")]
async fn warren_call_prints_the_reply_and_explains_failures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_node("call");
    let path = write_config(dir.path(), &config_text(&name, &[local_uri()], ""));
    let node = common::start_node(common::config(&name, &[local_uri()], "")).await;
    let echo = warren_listeners::spawn_listener(
        warren_app_echo::EchoListener::default(),
        &common::app_context(&node, "echo"),
    )
    .await
    .expect("echo starts");
    assert!(echo.wait_consuming(true, Duration::from_secs(10)).await);

    let config = path.to_str().expect("utf-8 path").to_string();
    let call = move |exchange: &'static str, key: &'static str, json: &'static str| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            warren(&[
                "call",
                "--config",
                &config,
                "--exchange",
                exchange,
                "--routing-key",
                key,
                "--json",
                json,
                "--timeout-ms",
                "1000",
            ])
        })
    };
    let (status, stdout, stderr) = call(
        "echo",
        "echo.req",
        r#"{"Event-Category": "echo", "Event-Name": "req", "Payload": {"hi": [1, 2]}}"#,
    )
    .await
    .expect("call");
    assert!(status.success(), "{stderr}");
    let reply: serde_json::Value = serde_json::from_str(&stdout).expect("the reply is JSON");
    assert_eq!(reply["Event-Name"], "resp");
    assert_eq!(reply["Payload"], serde_json::json!({"hi": [1, 2]}));

    let (status, stdout, stderr) = call(
        "targeted",
        "nobody-listens-here",
        r#"{"Event-Category": "echo", "Event-Name": "req"}"#,
    )
    .await
    .expect("call");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("unroutable") && stderr.contains("NO_ROUTE"),
        "{stderr}"
    );

    // Routable but nobody answers: echo gets ("echo", "nothing") and has no responder.
    let (status, _, stderr) = call(
        "echo",
        "echo.req",
        r#"{"Event-Category": "echo", "Event-Name": "nothing"}"#,
    )
    .await
    .expect("call");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no reply within 1000 ms"), "{stderr}");

    let (status, _, stderr) = call("echo", "echo.req", "[1, 2]").await.expect("call");
    assert_eq!(status.code(), Some(2), "{stderr}");
    echo.stop().await.expect("stop");
    node.stop().await.expect("node stops");
}

/// A `[service] node` too long for the queue names built from it stops `check-config` and
/// `run` with exit 2 at the key, instead of a node that restarts its listeners forever.
#[test]
fn a_node_name_too_long_for_amqp_names_exits_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "[service]\nnode = \"{}\"\n\n[zones.local]\nbrokers = [\"{}\"]\n",
        "n".repeat(129),
        local_uri()
    );
    let path = write_config(dir.path(), &text);
    let config = path.to_str().expect("utf-8 path");
    for command in ["check-config", "run"] {
        let (status, stdout, stderr) = warren(&[command, "--config", config]);
        assert_eq!(status.code(), Some(2), "{command}: {stderr}");
        assert!(
            stderr.contains(&format!("{}:2:8: `service.node`", path.display())),
            "{command}: {stderr}"
        );
        assert!(
            stderr.contains("129 bytes long; at most 128"),
            "{command}: {stderr}"
        );
        assert!(!stderr.contains("warren ready"), "{command}: {stderr}");
        assert!(stdout.is_empty(), "{command}: {stdout}");
    }
}

/// Whether `output` shows `secret`, as text or as the decimal bytes that a Debug-printed
/// byte buffer (a frame, a body, a SASL response) shows it as.
fn shows(output: &str, secret: &str) -> bool {
    let bytes = secret
        .bytes()
        .map(|byte| byte.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    output.contains(secret) || output.contains(&bytes)
}

/// A user of the shared broker with a password found nowhere else, deleted on drop.
struct BrokerUser {
    name: String,
    password: String,
}

impl BrokerUser {
    fn create(label: &str) -> BrokerUser {
        let name = unique_node(label);
        let password = format!("pw{}", &warren_runtime::envelope::new_msg_id()[..20]);
        local_ctl(&["add_user", &name, &password]).expect("add a broker user");
        local_ctl(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"])
            .expect("grant the user the default vhost");
        BrokerUser { name, password }
    }

    fn uri(&self) -> String {
        format!("amqp://{}:{}@127.0.0.1:5672/%2f", self.name, self.password)
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = local_ctl(&["delete_user", &self.name]);
    }
}

/// Whatever RUST_LOG says, neither lapin (which traces the AMQP start-ok, SASL response
/// and all) nor amq-protocol-tcp (which traces the URI) gets to print the password.
#[test]
fn rust_log_never_prints_the_broker_password() {
    let user = BrokerUser::create("log-password");
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_node("log-password");
    let path = write_config(dir.path(), &config_text(&name, &[user.uri()], ""));
    for rust_log in [
        "trace",
        "info,lapin=trace,amq_protocol_tcp=trace,amq_protocol=trace",
    ] {
        let mut run = Running::start_with_log(&path, rust_log);
        assert!(
            eventually_blocking(Duration::from_secs(30), || run.saw("warren ready")),
            "{rust_log}: not ready: {}",
            run.output()
        );
        run.signal("TERM");
        let status = run.wait_exit(Duration::from_secs(15));
        let output = run.output();
        assert!(
            status.is_some_and(|s| s.success()),
            "{rust_log}: {status:?}"
        );
        assert!(
            !shows(&output, &user.password),
            "{rust_log}: the password was logged"
        );
        assert!(
            !output.contains(" lapin::") && !output.contains(" amq_protocol_tcp:"),
            "{rust_log}: lapin or amq-protocol-tcp logged"
        );
        if rust_log == "trace" {
            assert!(
                output.contains(" TRACE ") || output.contains(" DEBUG "),
                "RUST_LOG=trace still shows other crates' detail: {output}"
            );
        }
    }
}

/// A mandatory request nobody can route comes back from the broker; lapin would log the
/// returned message, body and all, at warn. With RUST_LOG=trace the body stays out of the
/// log, and the operator still gets warren's own message.
#[tokio::test(flavor = "multi_thread")]
async fn rust_log_never_prints_a_message_body() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_node("log-body");
    let path = write_config(dir.path(), &config_text(&name, &[local_uri()], ""));
    let marker = format!(
        "body-marker-{}",
        &warren_runtime::envelope::new_msg_id()[..12]
    );
    let json =
        format!(r#"{{"Event-Category": "echo", "Event-Name": "req", "Payload": "{marker}"}}"#);
    let config = path.to_str().expect("utf-8 path").to_string();
    let routing_key = format!("{name}-nobody");
    let (status, stdout, stderr) = tokio::task::spawn_blocking(move || {
        warren_with_log(
            &[
                "call",
                "--config",
                &config,
                "--exchange",
                "targeted",
                "--routing-key",
                &routing_key,
                "--json",
                &json,
                "--timeout-ms",
                "1000",
            ],
            Some("trace"),
        )
    })
    .await
    .expect("call");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("unroutable") && stderr.contains("NO_ROUTE"),
        "the returned message was seen: {stderr}"
    );
    assert!(!shows(&stderr, &marker), "the body was logged: {stderr}");
}

/// A `targeted` exchange declared by someone else with other flags (Kazoo declares it
/// transient) is one clear error naming the object and the flags, the node is not ready
/// (no "warren ready"), retries back off, and no lapin error lines appear.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_declaration_is_one_clear_error_and_the_node_is_not_ready() {
    let brokers = common::Broker::start_many(1).await;
    let broker = &brokers[0];
    // Declared transient, as a Kazoo deployment does.
    let connection =
        lapin::Connection::connect(&broker.uri(), lapin::ConnectionProperties::default())
            .await
            .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .exchange_declare(
            "targeted".into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("a transient targeted");
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_node("refused");
    let text = format!(
        "{}\n[apps.echo]\nenabled = true\n",
        config_text(&name, &[broker.uri()], "")
            .replace("startup_timeout_secs = 30", "startup_timeout_secs = 3")
    );
    let path = write_config(dir.path(), &text);
    let mut run = Running::start(&path);
    let watched = Instant::now();
    let saw_not_ready = run
        .wait_line(Duration::from_secs(20), |l| {
            l.contains("warren not ready yet")
        })
        .await;
    // Let the retries run a while longer, then count.
    let until = watched + Duration::from_secs(8);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let window = watched.elapsed();
    let output = run.output();
    run.signal("TERM");
    let _ = run.wait_exit(Duration::from_secs(15));
    assert!(saw_not_ready, "{output}");
    assert!(!output.contains("warren ready"), "{output}");
    let refusals: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("a declaration is refused"))
        .collect();
    // One line, then at most one per 10 s while it lasts.
    let allowed = 1 + (window.as_secs() / 10) as usize;
    assert!(
        !refusals.is_empty() && refusals.len() <= allowed,
        "one clear error (per 10 s), got {} in {window:?}:\n{output}",
        refusals.len()
    );
    let refusal = refusals[0];
    for needed in ["exchange `targeted`", "durable", "[exchanges.targeted]"] {
        assert!(
            refusal.contains(needed),
            "`{needed}` missing from: {refusal}"
        );
    }
    assert!(
        !output.contains("lapin"),
        "lapin's own error lines leak through:\n{output}"
    );
    // The broker saw the refused declarations: few, spaced out by the backoff.
    let log = std::fs::read_to_string(broker.node_log()).unwrap_or_default();
    let attempts = log
        .lines()
        .filter(|l| l.contains("inequivalent arg 'durable'"))
        .count();
    println!("{attempts} refused declarations in {window:?}");
    assert!(
        attempts <= 30,
        "{attempts} declarations in {window:?}: retries do not back off"
    );
    let _ = connection.close(200, "done".into()).await;
}

/// Starts a node that runs the nodes service (as `warren run` does) and no apps.
async fn announcing_node(name: &str) -> warren_runtime::node::Node {
    common::init_logs();
    let config = common::config(name, &[local_uri()], "");
    let started = warren_runtime::node::Node::try_start(config, |context| {
        let nodes = warren_listeners::NodesService::new(context, vec!["echo".to_string()])?;
        Ok::<_, warren_listeners::SpecError>(warren_runtime::node::Children {
            services: vec![nodes.child()],
            apps: Vec::new(),
        })
    })
    .await;
    started.unwrap_or_else(|error| panic!("node did not start: {error}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn warren_status_lists_the_live_nodes_and_prints_one_nodes_tree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, second) = (unique_node("status-a"), unique_node("status-b"));
    let path = write_config(
        dir.path(),
        &config_text(&unique_node("status-cli"), &[local_uri()], ""),
    );
    let a = announcing_node(&first).await;
    let b = announcing_node(&second).await;
    let config = path.to_str().expect("utf-8 path").to_string();
    let status = move |args: Vec<String>| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            let mut all = vec!["status".to_string(), "--config".to_string(), config];
            all.extend(args);
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            warren(&all)
        })
    };

    // Both are listed once their listeners consume; the table has a header.
    let mut listed = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let (code, stdout, stderr) = status(vec![]).await.expect("status");
        listed = format!("{stdout}{stderr}");
        if code.success() && stdout.contains(&first) && stdout.contains(&second) {
            break;
        }
    }
    assert!(
        listed.starts_with("NODE") && listed.contains(&first) && listed.contains(&second),
        "{listed}"
    );
    assert!(
        listed
            .lines()
            .any(|line| line.starts_with(&first) && line.contains("echo")),
        "{listed}"
    );

    let (code, stdout, stderr) = status(vec![
        "--node".to_string(),
        first.clone(),
        "--json".to_string(),
    ])
    .await
    .expect("status --node");
    assert!(code.success(), "{stderr}");
    let document: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(document["node"], serde_json::json!(first));
    assert_eq!(document["ready"], serde_json::json!(true), "{stdout}");
    assert_eq!(document["tree"]["name"], "warren", "{stdout}");
    assert!(
        document["parts"]
            .as_array()
            .is_some_and(|parts| parts.iter().any(|p| p["name"] == "listener:nodes")),
        "{stdout}"
    );
    let (code, stdout, _) = status(vec!["--node".to_string(), second.clone()])
        .await
        .expect("status --node");
    assert!(code.success());
    assert!(
        stdout.starts_with(&second) && stdout.contains("├─ brokers"),
        "{stdout}"
    );

    // A node that does not answer is reported, exit 1.
    let (code, _, stderr) = status(vec![
        "--node".to_string(),
        "nobody@nowhere".to_string(),
        "--timeout-ms".to_string(),
        "1000".to_string(),
    ])
    .await
    .expect("status --node");
    assert_eq!(code.code(), Some(1), "{stderr}");
    assert!(stderr.contains("did not answer"), "{stderr}");

    // A stopped node is listed no more.
    b.stop().await.expect("node stops");
    let (code, stdout, stderr) = status(vec!["--json".to_string()]).await.expect("status");
    assert!(code.success(), "{stderr}");
    assert!(
        stdout.contains(&first) && !stdout.contains(&second),
        "{stdout}"
    );
    a.stop().await.expect("node stops");
}
