//! The test kit: runs an event through a listener's own code without a broker, the way
//! `Broadway.test_message` does for Broadway pipelines.
//!
//! Owns: building an [`Event`] from an envelope and AMQP headers, checking the listener's
//! spec, and reporting what the listener did with the event (its [`Outcome`], the handler
//! errors, what it replied and published, whether `on_failed` ran). It runs the same steps
//! as a consumer loop (`on_event`, every matching responder with panics caught, results
//! combined), and the envelope goes through the same encode and decode with the same
//! limits as one from the broker. Must not touch: brokers, actors, config files.
//!
//! ```no_run
//! # use warren_listeners::prelude::*;
//! # use warren_listeners::testkit::TestEvent;
//! # async fn example(listener: impl Listener) {
//! let request = Envelope::new("echo", "req")
//!     .with("Server-ID", "caller-queue")
//!     .with("Payload", 42);
//! let handled = TestEvent::new(request).run(&listener).await.expect("a valid spec");
//! assert_eq!(handled.outcome, Outcome::Ack);
//! let payload = handled.replies()[0].get("Payload").and_then(|value| value.as_u64());
//! assert_eq!(payload, Some(42));
//! # }
//! ```

use std::sync::Arc;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use warren_runtime::broker::{Broker, BrokerId};
use warren_runtime::config::DEFAULT_PREFETCH;
use warren_runtime::confirm::{PublishError, headers};
use warren_runtime::envelope::{Envelope, publish_properties};
use warren_runtime::exchanges::TARGETED;
use warren_runtime::trace::{self, TraceContext};
use warren_runtime::uri::BrokerUri;

use crate::listener::handling::{self, HandlerEnd};
use crate::listener::{
    DeliveryInfo, Dispatch, Event, HandlerError, Listener, Outcome, Recorded, Recorder,
    SpecDefaults, SpecError,
};

/// The broker a test event claims to come from.
const TEST_BROKER: &str = "amqp://guest:guest@localhost:5672/%2f";

/// Checks a listener's spec as the app's start would, with config.ini's default
/// `[amqp] prefetch` (a node configured with a smaller one checks against that).
pub fn check(listener: &dyn Listener) -> Result<(), SpecError> {
    listener.spec().validate(SpecDefaults {
        prefetch: DEFAULT_PREFETCH,
    })
}

/// One event to run through a listener: an envelope and what the delivery carried.
#[derive(Clone, Debug)]
pub struct TestEvent {
    envelope: Envelope,
    exchange: String,
    routing_key: String,
    headers: Vec<(String, AMQPValue)>,
    redelivered: bool,
    last_attempt: bool,
    fail_publishes: Option<PublishError>,
}

/// What a listener did with a [`TestEvent`].
#[derive(Debug)]
pub struct Handled {
    /// What would happen to the message: ack, requeue, reject (dead-letter or park), defer.
    pub outcome: Outcome,
    /// `on_event` returned [`Dispatch::Suppress`] (the message is acked unhandled).
    pub suppressed: bool,
    /// How many responders ran.
    pub responders: usize,
    /// Why handlers did not succeed: their errors and panics, in responder order.
    pub errors: Vec<String>,
    /// Every publish the handlers made, replies included, in order.
    pub published: Vec<Recorded>,
    /// The reason `on_failed` was called with, if the message failed for good.
    pub failed: Option<String>,
}

impl Handled {
    /// The envelopes the handlers sent as replies (to the `targeted` exchange).
    pub fn replies(&self) -> Vec<&Envelope> {
        self.published
            .iter()
            .filter(|p| p.exchange == TARGETED)
            .map(|p| &p.envelope)
            .collect()
    }
}

impl TestEvent {
    /// An event carrying `envelope`, as if published to `exchange` "test" with routing key
    /// `<category>.<name>`.
    pub fn new(envelope: Envelope) -> Self {
        let routing_key = format!("{}.{}", envelope.category(), envelope.name());
        TestEvent {
            envelope,
            exchange: "test".to_string(),
            routing_key,
            headers: Vec::new(),
            redelivered: false,
            last_attempt: false,
            fail_publishes: None,
        }
    }

    /// The exchange the delivery came through.
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = exchange.into();
        self
    }

    /// The delivery's routing key.
    pub fn routing_key(mut self, routing_key: impl Into<String>) -> Self {
        self.routing_key = routing_key.into();
        self
    }

    /// An AMQP header of the delivery.
    pub fn header(mut self, key: impl Into<String>, value: AMQPValue) -> Self {
        self.headers.push((key.into(), value));
        self
    }

    /// The delivery carries this trace context (its `traceparent` header); without it
    /// the event starts a new trace, as one from the broker would.
    pub fn trace(self, trace: TraceContext) -> Self {
        self.header(
            trace::HEADER,
            AMQPValue::LongString(trace.to_string().into()),
        )
    }

    /// The broker delivered the message before.
    pub fn redelivered(mut self) -> Self {
        self.redelivered = true;
        self
    }

    /// The message has used up its `max_redeliveries`: a handler failure now is final, so
    /// `on_failed` runs (as it does for a rejection on any attempt).
    pub fn last_attempt(mut self) -> Self {
        self.last_attempt = true;
        self
    }

    /// Every publish of the handlers fails with `error` (a blocked or lost broker).
    pub fn publishes_fail_with(mut self, error: PublishError) -> Self {
        self.fail_publishes = Some(error);
        self
    }

    /// Runs the event through `listener`: its spec is checked first (as at the app's
    /// start), then the envelope is encoded and decoded as on the wire, then `on_event`
    /// and every matching responder run.
    pub async fn run(self, listener: &impl Listener) -> Result<Handled, SpecError> {
        check(listener)?;
        let spec = listener.spec();
        let last_attempt = self.last_attempt;
        let recorder = Recorder {
            published: Default::default(),
            fail_with: self.fail_publishes.clone(),
        };
        let event = self.into_event(&spec.name, recorder.clone());
        let event = match event {
            Ok(event) => event,
            Err(problem) => {
                // What the consumer loop does with a message it cannot read: off the queue
                // once, before any handler.
                return Ok(Handled {
                    outcome: Outcome::Reject,
                    suppressed: false,
                    responders: 0,
                    errors: vec![problem],
                    published: Vec::new(),
                    failed: None,
                });
            }
        };
        let mut handled = Handled {
            outcome: Outcome::Ack,
            suppressed: false,
            responders: 0,
            errors: Vec::new(),
            published: Vec::new(),
            failed: None,
        };
        match handling::hook(listener, &event) {
            Ok(Dispatch::Suppress) => handled.suppressed = true,
            Ok(Dispatch::Responders) => {
                let handlers = spec.responders.matching(event.category(), event.name());
                handled.responders = handlers.len();
                let mut errors = Vec::new();
                handled.outcome = handling::run(&event, handlers, |end| {
                    errors.extend(error_text(end));
                })
                .await;
                handled.errors = errors;
            }
            Err(panic) => {
                handled.outcome = Outcome::Requeue;
                handled.errors.push(format!("on_event panicked: {panic}"));
            }
        }
        let reason = match handled.outcome {
            Outcome::Reject => Some("rejected by a handler".to_string()),
            Outcome::Requeue if last_attempt => {
                Some("handlers failed on it more than max_redeliveries times".to_string())
            }
            _ => None,
        };
        if let Some(reason) = reason {
            if let Err(panic) = handling::failed(listener, &event, &reason) {
                handled.errors.push(format!("on_failed panicked: {panic}"));
            }
            handled.failed = Some(reason);
        }
        handled.published = std::mem::take(&mut *recorder.published.lock());
        Ok(handled)
    }

    /// The event as a consumer loop would build it: the envelope encoded and decoded with
    /// the default limits, the headers checked as AMQP short strings.
    fn into_event(self, listener: &str, recorder: Recorder) -> Result<Event, String> {
        let body = self.envelope.encode();
        let envelope = Envelope::decode(&body, Some("application/json"), None)
            .map_err(|error| format!("not a valid envelope: {error}"))?;
        let table: FieldTable = headers(self.headers.iter().map(|(k, v)| (k.as_str(), v.clone())))
            .map_err(|error| error.to_string())?;
        let properties: BasicProperties = publish_properties(false).with_headers(table);
        let uri = BrokerUri::parse(TEST_BROKER).map_err(|error| error.to_string())?;
        let broker = Broker {
            id: BrokerId(0),
            zone: "local".to_string(),
            local: true,
            members: vec![uri.clone()],
            uri,
            tags: Vec::new(),
            server_name: None,
        };
        let delivery = DeliveryInfo {
            exchange: self.exchange,
            routing_key: self.routing_key,
            redelivered: self.redelivered || self.last_attempt,
            delivery_tag: 1,
            properties,
            queue: format!("{listener}-test").into(),
            broker: Arc::new(broker),
            grant: 1,
        };
        Ok(Event::recorded(envelope, delivery, recorder))
    }
}

/// A handler's failure as text, or `None` if it succeeded.
fn error_text(end: &HandlerEnd) -> Option<String> {
    match end {
        HandlerEnd::Returned(Ok(())) => None,
        HandlerEnd::Returned(Err(HandlerError::Retry(reason))) => Some(format!("retry: {reason}")),
        HandlerEnd::Returned(Err(HandlerError::Reject(reason))) => {
            Some(format!("reject: {reason}"))
        }
        HandlerEnd::Returned(Err(HandlerError::Defer(reason))) => Some(format!("defer: {reason}")),
        HandlerEnd::Panicked(panic) => Some(format!("panicked: {panic}")),
    }
}
