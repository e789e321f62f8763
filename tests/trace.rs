//! Traces across services (W3C `traceparent`) against the local RabbitMQ: the echo app run
//! as `warren run` answers a request carrying a `traceparent` with the same trace id and a
//! new span id, starts a trace for a request without one (or with a malformed one), and,
//! with `WARREN_LOG_FORMAT=json`, logs JSON lines whose handler span carries the trace id;
//! a pool call made inside a handler carries the handler's trace, and one made outside
//! any handler starts a new trace; with `[publisher] new_traces = false` a node passes on
//! the traces it receives and writes none of its own.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::client::{Client, reply_queue};
use common::service::Running;
use common::{SOON, SpecListener, app_context, config, config_text, start_node, unique_node};
use futures::StreamExt;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Consumer};
use warren_listeners::{Envelope, Event, Exchange, ListenerSpec, spawn_listener};
use warren_runtime::envelope::publish_properties;
use warren_runtime::exchanges::TARGETED;
use warren_runtime::trace::{HEADER, TraceContext};
use warren_test_support::local_uri;

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("config.ini");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Publish properties as a kapi client sets them, with a `traceparent` header if given.
fn properties(traceparent: Option<&str>) -> BasicProperties {
    let properties = publish_properties(false);
    let Some(value) = traceparent else {
        return properties;
    };
    let mut headers = FieldTable::default();
    headers.insert(
        HEADER.into(),
        AMQPValue::LongString(LongString::from(value.as_bytes())),
    );
    headers.insert("x-kept".into(), AMQPValue::LongInt(1));
    properties.with_headers(headers)
}

/// A channel of the client's connection besides its own (whose consumer tag `replies` is
/// taken by the client's reply queue).
async fn second_channel(client: &Client) -> Channel {
    client.connection.create_channel().await.expect("channel")
}

/// The next message on `consumer` (within [`SOON`]): its envelope and trace context.
async fn next(consumer: &mut Consumer) -> (Envelope, Option<TraceContext>) {
    let delivery = tokio::time::timeout(SOON, consumer.next())
        .await
        .expect("a message in time")
        .expect("the consumer is open")
        .expect("a delivery");
    let envelope = Envelope::decode(&delivery.data, None, None).expect("an envelope");
    (
        envelope,
        TraceContext::from_properties(&delivery.properties),
    )
}

/// The one test to run echo as `warren run`, so that no other test's echo listener
/// shares its queue (and its log lines) in this binary.
#[tokio::test(flavor = "multi_thread")]
async fn traceparent_round_trip_through_echo() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_node("trace-echo");
    let text = format!(
        "{}\n[apps.echo]\nenabled = true\n",
        config_text(&name, &[local_uri()], "")
    );
    let path = write_config(dir.path(), &text);
    let run = Running::start_with_env(&path, "info", &[("WARREN_LOG_FORMAT", "json")]);
    let ready = run
        .wait_line(Duration::from_secs(60), |line| {
            line.contains("topology declared") && line.contains(r#""listener":"echo""#)
        })
        .await;
    assert!(ready, "the echo listener did not start: {}", run.output());

    let client = Client::connect(&local_uri(), &name).await;
    let queue = format!("{name}-traced");
    let channel = second_channel(&client).await;
    let mut replies = reply_queue(&channel, &queue, true).await;
    let request = |payload: &str| {
        let mut request = Envelope::new("echo", "req")
            .with("Server-ID", queue.as_str())
            .with("Payload", payload);
        request.ensure_msg_id();
        request
    };

    // A traceparent comes back with the same trace id, a new span id and its flags.
    let sent = TraceContext::new_root();
    let traced = request("traced");
    client
        .publish_raw(
            "echo",
            "echo.req",
            &traced.encode(),
            properties(Some(&sent.to_string())),
        )
        .await;
    let (reply, trace) = next(&mut replies).await;
    assert_eq!(reply.msg_id(), traced.msg_id());
    let trace = trace.expect("the reply carries a valid traceparent");
    assert_eq!(trace.trace_id(), sent.trace_id(), "the same trace");
    assert_ne!(trace.span_id(), sent.span_id(), "a span of its own");
    assert_eq!(trace.flags(), sent.flags());

    // Without one (or with a malformed one) the request starts a trace, and is answered.
    for (payload, header) in [("plain", None), ("malformed", Some("00-not-a-trace-01"))] {
        let plain = request(payload);
        client
            .publish_raw("echo", "echo.req", &plain.encode(), properties(header))
            .await;
        let (reply, trace) = next(&mut replies).await;
        assert_eq!(reply.msg_id(), plain.msg_id(), "{payload}");
        let trace = trace.unwrap_or_else(|| panic!("{payload}: a valid traceparent"));
        assert_ne!(trace.trace_id(), sent.trace_id(), "{payload}: a new trace");
    }

    // A line logged while the handler runs carries its span: here echo's rejection of a
    // request without Server-ID, logged as one JSON object with the trace id.
    let rejected = TraceContext::new_root();
    let trace_id = rejected.trace_id().to_string();
    client
        .publish_raw(
            "echo",
            "echo.req",
            &Envelope::new("echo", "req").encode(),
            properties(Some(&rejected.to_string())),
        )
        .await;
    let logged = run
        .wait_line(SOON, move |line| {
            let Ok(line) = serde_json::from_str::<serde_json::Value>(line) else {
                return false;
            };
            line["message"] == "handler rejected the message"
                && line["span"]["name"] == "handle"
                && line["span"]["trace_id"] == trace_id.as_str()
                && line["span"]["queue"] == "echo"
                && line["span"]["event_category"] == "echo"
                && line["span"]["event_name"] == "req"
        })
        .await;
    assert!(
        logged,
        "no JSON line with the handler's span: {}",
        run.output()
    );
    for line in run.lines() {
        let parsed: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|error| panic!("not a JSON line ({error}): {line}"));
        assert!(parsed.is_object(), "{line}");
    }
    run.signal("TERM");
}

/// An unknown `WARREN_LOG_FORMAT` stops `warren run` at once with exit 2, naming it.
#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_log_format_is_a_start_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = unique_node("trace-format");
    let path = write_config(dir.path(), &config_text(&name, &[local_uri()], ""));
    let mut run = Running::start_with_env(&path, "info", &[("WARREN_LOG_FORMAT", "yaml")]);
    let status = tokio::task::spawn_blocking(move || {
        let status = run.wait_exit(SOON);
        (status, run.output())
    })
    .await
    .expect("wait");
    let (status, output) = status;
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{output}");
    assert!(
        output.contains("WARREN_LOG_FORMAT") && output.contains("yaml"),
        "{output}"
    );
}

/// A node started with `extra` config, whose relay listener sends a `probe` `req` to the
/// probe queue for every `relay` `req` it gets on its own exchange: a pool call (nobody
/// answers: it times out, which is fine here) or a cast. The client reads the probes.
struct Relay {
    node: warren_runtime::node::Node,
    ctx: warren_listeners::AppContext,
    relay: warren_listeners::ListenerHandle,
    client: Client,
    exchange: String,
    probe: String,
    probes: Consumer,
}

impl Relay {
    async fn start(prefix: &str, extra: &str, call: bool) -> Relay {
        let name = unique_node(prefix);
        let node = start_node(config(&name, &[local_uri()], extra)).await;
        let ctx = app_context(&node, &name);
        ctx.pool.spawn().await.expect("pool starts");
        let client = Client::connect(&local_uri(), &name).await;
        let probe = format!("{name}-probe");
        let channel = second_channel(&client).await;
        let probes = reply_queue(&channel, &probe, true).await;
        let exchange = format!("{name}-ex");
        let (pool, target) = (ctx.pool.clone(), probe.clone());
        let spec = ListenerSpec::new(format!("{name}-relay"))
            .exchange(Exchange::topic(&exchange))
            .bind(&exchange, "relay.req")
            .responder("relay", "req", move |_event: Event| {
                let (pool, target) = (pool.clone(), target.clone());
                async move {
                    let probe = Envelope::new("probe", "req");
                    // A failed cast shows as a missing probe.
                    let _ = if call {
                        let timeout = Duration::from_millis(500);
                        pool.call(TARGETED, &target, probe, timeout).await.map(drop)
                    } else {
                        let timeout = Duration::from_secs(5);
                        pool.cast(TARGETED, &target, probe, timeout).await
                    };
                    Ok(())
                }
            });
        let relay = spawn_listener(SpecListener(spec), &ctx)
            .await
            .expect("relay starts");
        assert!(relay.wait_consuming(true, SOON).await);
        Relay {
            node,
            ctx,
            relay,
            client,
            exchange,
            probe,
            probes,
        }
    }

    /// Sends a `relay` `req` with this `traceparent` (if any) and returns the trace of
    /// the probe it makes the handler send.
    async fn relayed(&mut self, traceparent: Option<&str>) -> Option<TraceContext> {
        self.client
            .publish_raw(
                &self.exchange,
                "relay.req",
                &Envelope::new("relay", "req").encode(),
                properties(traceparent),
            )
            .await;
        let (probe, trace) = next(&mut self.probes).await;
        assert_eq!((probe.category(), probe.name()), ("probe", "req"));
        trace
    }

    /// Casts a `probe` `cast` from outside any handler; returns the trace it arrives with.
    async fn cast_outside(&mut self) -> Option<TraceContext> {
        let cast = Envelope::new("probe", "cast");
        let timeout = Duration::from_secs(5);
        let sent = self.ctx.pool.cast(TARGETED, &self.probe, cast, timeout);
        sent.await.expect("cast");
        let (cast, trace) = next(&mut self.probes).await;
        assert_eq!(cast.name(), "cast");
        trace
    }

    async fn stop(self) {
        self.relay.stop().await.expect("relay stops");
        self.ctx.pool.stop().await;
        self.node.stop().await.expect("node stops");
    }
}

/// A pool call made by handler code carries the handler's trace id; a pool cast made
/// outside any handler starts a new trace.
#[tokio::test(flavor = "multi_thread")]
async fn a_pool_call_inside_a_handler_carries_its_trace() {
    let mut relay = Relay::start("trace-pool", "", true).await;
    let sent = TraceContext::new_root();
    let trace = relay.relayed(Some(&sent.to_string())).await;
    let trace = trace.expect("the pool request carries a traceparent");
    assert_eq!(trace.trace_id(), sent.trace_id(), "the handler's trace");
    assert_ne!(trace.span_id(), sent.span_id());

    let trace = relay.cast_outside().await;
    let trace = trace.expect("a traceparent outside any handler too");
    assert_ne!(trace.trace_id(), sent.trace_id(), "a new trace");
    relay.stop().await;
}

/// With `[publisher] new_traces = false` a node passes on the traces its messages bring and
/// writes none of its own: a handler's cast carries the trace of a traced request, and
/// nothing for an untraced one; a cast outside any handler carries nothing either.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_without_new_traces_continues_traces_and_starts_none() {
    let extra = "\n[publisher]\nnew_traces = false\n";
    let mut relay = Relay::start("trace-continue", extra, false).await;
    let sent = TraceContext::new_root();
    let trace = relay.relayed(Some(&sent.to_string())).await;
    let trace = trace.expect("a trace the request brought is passed on");
    assert_eq!(trace.trace_id(), sent.trace_id());

    let trace = relay.relayed(None).await;
    assert_eq!(
        trace, None,
        "no trace of this node's own on an untraced request's cast"
    );
    assert_eq!(relay.cast_outside().await, None, "nor outside any handler");
    relay.stop().await;
}
