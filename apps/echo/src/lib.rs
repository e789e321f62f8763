//! echo: answers kapi requests ("echo", "req") with ("echo", "resp") carrying the request's
//! `Payload`, to the requester's `Server-ID` through the `targeted` exchange, with the same
//! `Msg-ID`. Any AMQP client that follows the kapi convention can call it.
//!
//! The queue `echo` is durable, named and consumed non-exclusively, so several warren
//! nodes share it; it is bound to the durable topic exchange `echo` with key `echo.req`
//! (durable like the queue, so the binding survives a broker restart).

use serde_json::Value;
use warren_listeners::prelude::*;

/// The echo app.
pub struct Echo;

impl App for Echo {
    fn name(&self) -> &'static str {
        "echo"
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn children(&self, ctx: &AppContext) -> Vec<ChildSpec> {
        vec![ctx.listener(EchoListener {
            federate: ctx.config.federate,
        })]
    }
}

/// The listener behind the echo app.
#[derive(Default)]
pub struct EchoListener {
    /// `[apps.echo] federate = true`: requests published in the other zones reach it too.
    pub federate: bool,
}

impl Listener for EchoListener {
    fn spec(&self) -> ListenerSpec {
        ListenerSpec::new("echo")
            .queue(QueueSpec::named("echo").durable())
            .exchange(Exchange::topic("echo").durable())
            .binding(Binding::new("echo", "echo.req").federate(self.federate))
            .responder("echo", "req", echo)
    }
}

/// Replies with the request's `Payload`.
async fn echo(request: Event) -> HandlerResult {
    let payload = request
        .envelope()
        .get("Payload")
        .cloned()
        .unwrap_or(Value::Null);
    let reply = Envelope::new("echo", "resp").with("Payload", payload);
    match request.reply(reply).await {
        Ok(_) => Ok(()),
        // Without a Server-ID there is nobody to answer: retrying cannot help.
        Err(PublishError::NoServerId) => Err(HandlerError::reject("request without Server-ID")),
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use warren_listeners::testkit::TestEvent;

    fn request() -> Envelope {
        Envelope::new("echo", "req")
            .with("Server-ID", "caller-queue")
            .with("Msg-ID", "m-1")
            .with("Payload", json!({"n": 42}))
    }

    #[test]
    fn federate_marks_the_request_binding_federated() {
        let federated = |federate: bool| {
            EchoListener { federate }
                .spec()
                .bindings
                .iter()
                .any(|b| b.routing_key == "echo.req" && b.federated)
        };
        assert!(federated(true));
        assert!(!federated(false));
    }

    #[tokio::test]
    async fn a_request_is_answered_to_its_server_id_with_its_payload() {
        let handled = TestEvent::new(request())
            .run(&EchoListener::default())
            .await
            .expect("a valid spec");
        assert_eq!(handled.outcome, Outcome::Ack, "{:?}", handled.errors);
        assert_eq!(handled.responders, 1);
        let [reply] = handled.published.as_slice() else {
            panic!("one reply: {:?}", handled.published);
        };
        assert_eq!(
            (reply.exchange.as_str(), reply.routing_key.as_str()),
            ("targeted", "caller-queue")
        );
        assert_eq!(
            (reply.envelope.category(), reply.envelope.name()),
            ("echo", "resp")
        );
        assert_eq!(reply.envelope.msg_id(), Some("m-1"));
        assert_eq!(reply.envelope.get("Payload"), Some(&json!({"n": 42})));
    }

    #[tokio::test]
    async fn a_request_without_server_id_is_rejected_not_retried() {
        let mut envelope = request();
        envelope.remove("Server-ID");
        let handled = TestEvent::new(envelope)
            .run(&EchoListener::default())
            .await
            .expect("spec");
        assert_eq!(handled.outcome, Outcome::Reject);
        assert!(handled.published.is_empty());
        assert_eq!(handled.failed.as_deref(), Some("rejected by a handler"));
    }

    #[tokio::test]
    async fn a_blocked_broker_makes_the_request_retry() {
        let blocked = PublishError::Blocked {
            reason: "low on memory".to_string(),
            waited: std::time::Duration::from_secs(5),
        };
        let handled = TestEvent::new(request())
            .publishes_fail_with(blocked)
            .run(&EchoListener::default())
            .await
            .expect("spec");
        assert_eq!(handled.outcome, Outcome::Requeue);
        assert_eq!(
            handled.failed, None,
            "a retry is not final before the last attempt"
        );
    }

    #[tokio::test]
    async fn the_reply_belongs_to_the_request_trace() {
        let trace = TraceContext::new_root();
        let handled = TestEvent::new(request())
            .trace(trace)
            .run(&EchoListener::default())
            .await
            .expect("spec");
        let [reply] = handled.published.as_slice() else {
            panic!("one reply: {:?}", handled.published);
        };
        assert_eq!(reply.options.trace, Some(trace));
        // Without a traceparent the request starts a trace of its own.
        let handled = TestEvent::new(request())
            .run(&EchoListener::default())
            .await
            .expect("spec");
        let [reply] = handled.published.as_slice() else {
            panic!("one reply: {:?}", handled.published);
        };
        let started = reply.options.trace.expect("a trace");
        assert_ne!(started.trace_id(), trace.trace_id());
    }

    #[tokio::test]
    async fn other_events_reach_no_responder() {
        let handled = TestEvent::new(Envelope::new("echo", "other"))
            .run(&EchoListener::default())
            .await
            .expect("spec");
        assert_eq!((handled.outcome, handled.responders), (Outcome::Ack, 0));
    }
}
