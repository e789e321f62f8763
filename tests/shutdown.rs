//! One shutdown budget, handed down (#10 point 5), against the local RabbitMQ: a node
//! whose apps' handlers all hang stops within `[service] shutdown_timeout_secs` (+ 1 s)
//! without being killed, and every message those handlers held is back in its queue.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::client::Client;
use common::{SOON, config_text, unique_node};
use warren_listeners::{
    App, AppContext, Envelope, Event, Listener, ListenerSpec, QueueSpec, app_child,
};
use warren_runtime::config::{AppConfig, Config};
use warren_runtime::node::Node;
use warren_runtime::supervisor::ChildSpec;
use warren_test_support::{eventually, local_uri};

/// Seconds of `[service] shutdown_timeout_secs` in the test.
const BUDGET_SECS: u64 = 6;

/// A listener on a named queue whose one responder never returns.
struct Hung {
    name: String,
    queue: String,
    started: Arc<AtomicUsize>,
}

impl Listener for Hung {
    fn spec(&self) -> ListenerSpec {
        let started = self.started.clone();
        ListenerSpec::new(&self.name)
            .queue(QueueSpec::named(&self.queue))
            .responder("t", "hang", move |_event: Event| {
                let started = started.clone();
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                    Ok(())
                }
            })
    }
}

/// An app of two such listeners.
struct HungApp {
    name: &'static str,
    queues: [String; 2],
    started: Arc<AtomicUsize>,
}

impl App for HungApp {
    fn name(&self) -> &'static str {
        self.name
    }

    fn version(&self) -> &'static str {
        "0.0.0-test"
    }

    fn children(&self, ctx: &AppContext) -> Vec<ChildSpec> {
        self.queues
            .iter()
            .enumerate()
            .map(|(i, queue)| {
                ctx.listener(Hung {
                    name: format!("{}-{i}", self.name),
                    queue: queue.clone(),
                    started: self.started.clone(),
                })
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hung_handlers_in_several_apps_stop_within_the_budget_and_their_messages_return() {
    common::init_logs();
    let name = unique_node("budget");
    let started = Arc::new(AtomicUsize::new(0));
    let apps: Vec<HungApp> = ["alpha", "beta"]
        .into_iter()
        .map(|app| HungApp {
            name: app,
            queues: [format!("{name}-{app}-0"), format!("{name}-{app}-1")],
            started: started.clone(),
        })
        .collect();
    let queues: Vec<String> = apps.iter().flat_map(|app| app.queues.clone()).collect();
    // Each listener alone asks for more than the whole budget.
    let text = config_text(
        &name,
        &[local_uri()],
        "\n[listener]\nstop_timeout_ms = 5000",
    )
    .replace(
        "shutdown_timeout_secs = 10",
        &format!("shutdown_timeout_secs = {BUDGET_SECS}"),
    );
    let config = Config::parse(&text, Path::new("test.ini"), &[], None).expect("test config");
    let node = Node::try_start(config, |node| {
        apps.iter()
            .map(|app| {
                let app_config = AppConfig::new(app.name, node.pool);
                app_child(app, AppContext::new(app, node.clone(), app_config))
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .expect("the node starts");
    let client = Client::connect(&local_uri(), &name).await;
    // Every listener consumes: each queue is declared before anything is published to it.
    assert!(
        node.context().readiness.wait_ready(SOON).await,
        "every listener consumes"
    );
    for queue in &queues {
        client.publish("", queue, &Envelope::new("t", "hang")).await;
    }
    assert!(
        eventually(SOON, || started.load(Ordering::SeqCst) == queues.len()).await,
        "every handler is running: {}",
        started.load(Ordering::SeqCst)
    );

    let stopping = Instant::now();
    let stopped = node.stop().await;
    let took = stopping.elapsed();
    assert!(
        stopped.is_ok(),
        "the node stops by its own deadlines, nothing is killed at the root: {stopped:?}"
    );
    assert!(
        took <= Duration::from_secs(BUDGET_SECS + 1),
        "the stop took {took:?} of a {BUDGET_SECS} s budget"
    );
    for queue in &queues {
        assert!(
            common::until(SOON, || async { client.ready(queue).await == 1 }).await,
            "the hung handler's message is back in {queue}"
        );
        client.delete_queue(queue).await;
    }
}
