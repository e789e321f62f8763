//! The app surface checks itself: a listener spec that breaks a rule refuses the app's
//! start before anything starts (naming app, listener and field), and `on_failed` sees
//! every message that leaves the queue for good, against the local RabbitMQ.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::client::Client;
use common::{SOON, SpecListener, app_context, config, start_node, unique_node};
use parking_lot::Mutex;
use warren_listeners::prelude::*;
use warren_listeners::{ListenerError, SpecError, app_child, spawn_listener};
use warren_runtime::config::AppConfig;
use warren_runtime::node::{Node, StartError};
use warren_test_support::{eventually, list_connections, local_ctl, local_uri};

/// An app whose one listener handles more at once than its prefetch lets it hold.
struct Overcommitted;

impl App for Overcommitted {
    fn name(&self) -> &'static str {
        "overcommitted"
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn children(&self, ctx: &AppContext) -> Vec<ChildSpec> {
        let spec = ListenerSpec::new("greedy")
            .prefetch(4)
            .concurrency(16)
            .responder("t", "*", |_event: Event| async { Ok(()) });
        vec![ctx.listener(SpecListener(spec))]
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_spec_refuses_the_app_before_anything_starts() {
    common::init_logs();
    let name = unique_node("badspec");
    let result = Node::try_start(config(&name, &[local_uri()], ""), |node| {
        let app_config = AppConfig::new("overcommitted", node.pool);
        let ctx = AppContext::new(&Overcommitted, node.clone(), app_config);
        app_child(&Overcommitted, ctx).map(|app| vec![app])
    })
    .await;
    let message = match result {
        Err(StartError::Refused(message)) => message,
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(node) => {
            node.stop().await.expect("stop");
            panic!("a node with a bad spec started");
        }
    };
    assert!(
        message.contains("app `overcommitted`")
            && message.contains("listener `greedy`")
            && message.contains("`concurrency`")
            && message.contains("16 is above its prefetch (4)"),
        "{message}"
    );
    let connections = list_connections(local_ctl).expect("list_connections");
    assert!(
        connections.iter().all(|c| !c.name.starts_with(&name)),
        "nothing connected: {connections:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn spawning_a_listener_with_a_bad_spec_is_a_spec_error() {
    let name = unique_node("badspawn");
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let spec = ListenerSpec::new("dangling").bind(format!("{name}-nowhere"), "#");
    match spawn_listener(SpecListener(spec), &app_context(&node, "test")).await {
        Err(ListenerError::Spec(SpecError {
            listener, field, ..
        })) => {
            assert_eq!((listener.as_str(), field), ("dangling", "bind"));
        }
        Err(other) => panic!("another error: {other}"),
        Ok(handle) => {
            handle.stop().await.expect("stop");
            panic!("a listener bound to an undeclared exchange started");
        }
    }
    node.stop().await.expect("node stops");
}

/// Records what `on_failed` was told.
struct Failing {
    spec: ListenerSpec,
    failed: Arc<Mutex<Vec<(String, String)>>>,
}

impl Listener for Failing {
    fn spec(&self) -> ListenerSpec {
        self.spec.clone()
    }

    fn on_failed(&self, event: &Event, reason: &str) {
        self.failed
            .lock()
            .push((event.name().to_string(), reason.to_string()));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn on_failed_sees_rejected_and_exhausted_messages_once_each() {
    let name = unique_node("onfailed");
    let (exchange, queue) = (format!("{name}-ex"), format!("{name}-q"));
    let node = start_node(config(&name, &[local_uri()], "")).await;
    let handled = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let spec = ListenerSpec::new("onfailed")
        .queue(QueueSpec::named(&queue))
        .exchange(Exchange::topic(&exchange))
        .bind(&exchange, "#")
        .max_redeliveries(1)
        .responder("t", "ok", {
            let handled = handled.clone();
            move |_event: Event| {
                handled.fetch_add(1, Ordering::SeqCst);
                async { Ok(()) }
            }
        })
        .responder("t", "never", |_event: Event| async {
            Err(HandlerError::reject("never works"))
        })
        .responder("t", "flaky", |_event: Event| async {
            Err(HandlerError::retry("not now"))
        });
    let listener = Failing {
        spec,
        failed: failed.clone(),
    };
    let handle = spawn_listener(listener, &app_context(&node, "test"))
        .await
        .expect("listener starts");
    assert!(handle.wait_consuming(true, SOON).await);
    let client = Client::connect(&local_uri(), &name).await;
    for event in ["never", "flaky", "ok"] {
        client
            .publish(&exchange, "k", &Envelope::new("t", event))
            .await;
    }
    // The consumer may finish `never` and both tries of `flaky` before `ok` is even
    // published (each publish waits for its confirm): wait for all three outcomes.
    assert!(
        eventually(SOON, || handle.stats().parked == 2
            && handled.load(Ordering::SeqCst) == 1)
        .await,
        "{:?}",
        handle.stats()
    );
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    let mut seen = failed.lock().clone();
    seen.sort();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].0, "flaky");
    assert!(seen[0].1.contains("failed on it 2 times"), "{seen:?}");
    assert_eq!(
        seen[1],
        ("never".to_string(), "rejected by a handler".to_string())
    );
    handle.stop().await.expect("stop");
    client.delete_queue(&queue).await;
    client.delete_queue(&format!("{queue}.parked")).await;
    node.stop().await.expect("node stops");
}
