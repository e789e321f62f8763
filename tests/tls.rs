//! TLS against brokers of the test's own (certificates made at test time): a node
//! connects over `amqps://` with the operator's CA and consumes; a broker that requires a
//! client certificate accepts one and refuses a node without; a wrong CA, an expired
//! broker certificate and a wrong server name are refused at start-up with an error that
//! names the broker and hides its password.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{SOON, Seen, SpecListener, app_context, blocking, recording, unique_node};
use warren_listeners::{Envelope, Exchange, ListenerSpec, QueueSpec, spawn_listener};
use warren_runtime::config::Config;
use warren_runtime::confirm::Published;
use warren_runtime::node::Node;
use warren_test_support::{BrokerNode, TEST_SERVER_NAME, TestCerts, eventually};

async fn certs() -> Arc<TestCerts> {
    Arc::new(blocking(|| TestCerts::generate().expect("test certificates")).await)
}

async fn tls_broker(certs: &Arc<TestCerts>, server: &'static str, require: bool) -> BrokerNode {
    let certs = certs.clone();
    blocking(move || BrokerNode::start_tls(&certs, server, require).expect("TLS broker starts"))
        .await
}

/// A config.ini for one broker given as a `brokers` entry, with a `[tls]` section, written
/// next to the certificates (so relative file names resolve there).
fn tls_config(certs: &TestCerts, node: &str, broker: &str, tls: &str) -> Config {
    let text = format!(
        "[service]\nnode = \"{node}\"\n\n\
         [amqp]\nreconnect_min_ms = 50\nreconnect_max_ms = 500\nconnect_timeout_ms = 2000\n\
         startup_timeout_secs = 4\nprechannels = 2\n\n\
         [tls]\n{tls}\n\n[zones.local]\nbrokers = [{broker}]\n"
    );
    let path = certs.dir().join("config.ini");
    match Config::parse(&text, &path, &[], None) {
        Ok(config) => config,
        Err(error) => panic!("test config is invalid: {error}\n{text}"),
    }
}

/// Starts a node; `Err` with the start error's text.
async fn start(config: Config) -> Result<Node, String> {
    common::init_logs();
    Node::start(config, |_| Vec::new())
        .await
        .map_err(|error| error.to_string())
}

fn quoted(uri: &str) -> String {
    format!("\"{uri}\"")
}

/// Whether each connection the broker shows for `node` is TLS (`"true"` / `"false"`).
fn ssl_of_connections(broker: &BrokerNode, node: &str) -> Vec<String> {
    let listed = broker
        .ctl(&[
            "list_connections",
            "--no-table-headers",
            "ssl",
            "client_properties",
        ])
        .unwrap_or_default();
    listed
        .lines()
        .filter(|line| line.contains(node))
        .filter_map(|line| line.split('\t').next())
        .map(|ssl| ssl.trim().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_connects_over_tls_with_the_operators_ca_and_consumes() {
    let certs = certs().await;
    let broker = tls_broker(&certs, "server", false).await;
    let name = unique_node("tls");
    // Relative file names resolve against the config file's directory.
    let config = tls_config(
        &certs,
        &name,
        &quoted(&broker.tls_uri()),
        "ca_file = \"ca.pem\"",
    );
    let node = start(config).await.expect("the node starts over TLS");

    let ssl = ssl_of_connections(&broker, &name);
    assert_eq!(ssl.len(), 2, "consume and publish connections: {ssl:?}");
    assert!(ssl.iter().all(|ssl| ssl == "true"), "{ssl:?}");

    // End to end over TLS: a listener consumes what the node's publisher sends.
    let seen = Seen::default();
    let exchange = format!("{name}-ex");
    let spec = ListenerSpec::new("tls")
        .queue(QueueSpec::named(format!("{name}-q")))
        .exchange(Exchange::direct(&exchange))
        .bind(&exchange, "k")
        .responder("t", "x", recording(&seen, Duration::ZERO));
    let handle = spawn_listener(SpecListener(spec), &app_context(&node, "tls"))
        .await
        .expect("listener starts");
    assert!(
        handle.wait_consuming(true, SOON).await,
        "consuming over TLS"
    );
    let publisher = node.context().publisher.clone();
    for i in 0..20 {
        let message = Envelope::new("t", "x").with("Msg-ID", format!("tls-{i}"));
        let published = publisher
            .publish(&exchange, "k", message, publisher.options().mandatory())
            .await;
        assert!(
            matches!(published, Ok(Published::Routed)),
            "published and confirmed over TLS: {published:?}"
        );
    }
    assert!(
        eventually(SOON, || seen.distinct() == 20).await,
        "handled {} of 20",
        seen.distinct()
    );
    handle.stop().await.expect("stop");
    let _ = node.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_that_requires_a_client_certificate_accepts_ours_and_refuses_none() {
    let certs = certs().await;
    let broker = tls_broker(&certs, "server", true).await;
    let uri = quoted(&broker.tls_uri());

    let name = unique_node("mtls");
    let with_cert = "ca_file = \"ca.pem\"\ncert_file = \"client.pem\"\nkey_file = \"client.key\"";
    let node = start(tls_config(&certs, &name, &uri, with_cert))
        .await
        .expect("the node starts with its client certificate");
    assert_eq!(ssl_of_connections(&broker, &name).len(), 2);
    let _ = node.stop().await;

    let name = unique_node("mtls-none");
    let error = start(tls_config(&certs, &name, &uri, "ca_file = \"ca.pem\""))
        .await
        .err()
        .expect("a node without a client certificate is refused");
    assert!(error.contains("amqps://guest:***@127.0.0.1"), "{error}");
    assert!(!error.contains("guest:guest"), "{error}");
    assert!(ssl_of_connections(&broker, &name).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_ca_an_expired_certificate_or_a_wrong_name_is_a_clear_start_error() {
    let certs = certs().await;
    let broker = tls_broker(&certs, "server", false).await;
    let uri = broker.tls_uri();

    // The broker's certificate is signed by a CA the node does not trust.
    let error = start(tls_config(
        &certs,
        &unique_node("tls-ca"),
        &quoted(&uri),
        "ca_file = \"other-ca.pem\"",
    ))
    .await
    .err()
    .expect("a wrong CA is refused");
    assert!(error.contains("amqps://guest:***@127.0.0.1"), "{error}");
    assert!(error.contains("not signed by a trusted CA"), "{error}");
    assert!(!error.contains("guest:guest"), "{error}");

    // The broker reached by address, its certificate checked for another name: the
    // configured server_name it carries passes, one it does not carry fails.
    let named = format!("{{ uri = \"{uri}\", server_name = \"{TEST_SERVER_NAME}\" }}");
    let node = start(tls_config(
        &certs,
        &unique_node("tls-name"),
        &named,
        "ca_file = \"ca.pem\"",
    ))
    .await
    .expect("the certificate carries the configured server name");
    let _ = node.stop().await;
    let wrong = format!("{{ uri = \"{uri}\", server_name = \"elsewhere.example\" }}");
    let error = start(tls_config(
        &certs,
        &unique_node("tls-wrong-name"),
        &wrong,
        "ca_file = \"ca.pem\"",
    ))
    .await
    .err()
    .expect("a name the certificate does not carry is refused");
    assert!(error.contains("server name elsewhere.example"), "{error}");
    assert!(error.contains("does not carry this name"), "{error}");

    // A broker showing a certificate past its date.
    let expired = tls_broker(&certs, "expired", false).await;
    let error = start(tls_config(
        &certs,
        &unique_node("tls-expired"),
        &quoted(&expired.tls_uri()),
        "ca_file = \"ca.pem\"",
    ))
    .await
    .err()
    .expect("an expired certificate is refused");
    assert!(error.contains("has expired"), "{error}");
    assert!(
        error.contains(&format!("127.0.0.1:{}", expired.tls_port().unwrap_or(0))),
        "{error}"
    );
    assert!(Path::new(&certs.path("ca.pem")).exists());
}
