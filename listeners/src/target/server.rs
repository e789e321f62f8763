//! The server side of RPC targets: an app's table of named methods, served on the three
//! addresses of its topic with the node's name as server name.
//!
//! An [`RpcServer`] becomes one supervised child (`rpc:<topic>`, or `rpc:<exchange>/<topic>` under an exchange of its own; one for one) running three
//! listeners that share the method table: the named-server queue (rule A), the group's
//! shared queue (rule B) and the server's own queue on the broadcast exchange (rule C);
//! see `address` for the names. Each request runs its method; a call (a request with
//! `reply_to`) gets a reply published to the default exchange with routing key =
//! `reply_to`, mandatory and confirmed, `correlation_id` = the request's id. An unknown
//! method, unreadable arguments, a method's error and a method's panic all become error
//! replies (`Failure`), never a crash or a retry; the request is acknowledged once its
//! reply is confirmed. A reply that comes back unroutable (the caller's queue is gone) is
//! counted and logged (rate-limited) and not retried; a reply the broker did not take
//! (nacked, timed out, channel lost) requeues the request, as any failed handler publish.
//!
//! With [`RpcServer::dedup`], a request whose id was served within the window (a
//! redelivery after a failover, or a caller re-sending it) gets the first run's reply
//! again and its method does not run twice; a copy arriving while the first still runs
//! waits for it (at most the listener stop and publish bounds together).
//!
//! Owns: the method table, what the three listeners declare, and turning a request into
//! its reply. Must not touch: the listener machinery (acks, requeues, recovery).

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;
use warren_runtime::confirm::{Correlation, PublishError, PublishOptions, Published};
use warren_runtime::envelope::Envelope;
use warren_runtime::log_limit::LogLimit;
use warren_runtime::metrics::{MetricsEntry, Report, Source};
use warren_runtime::node::NodeContext;
use warren_runtime::supervisor::{ChildSpec, Intensity, StopOrder, SupervisorSpec};

use super::address::{Target, TargetError, short, shortened};
use super::wire::{self, RemoteError};
use crate::app::AppContext;
use crate::listener::{
    Dedup, Event, Exchange, HandlerError, HandlerResult, Listener, ListenerError, ListenerHandle,
    ListenerSpec, QueueSpec, Seen, SpecError, Window, spawn_listener,
};

/// Requests one listener of a server handles at once, unless [`RpcServer::concurrency`]
/// says otherwise.
const CONCURRENCY: usize = 8;

/// What a method returns: its result, or the error the caller gets as `RpcError::Remote`.
pub type MethodResult = Result<Value, RemoteError>;

/// A method, boxed so that methods of any closure type live in one table.
type Method = Arc<dyn Fn(Value) -> BoxFuture<'static, MethodResult> + Send + Sync>;

/// An app's RPC server: a topic and its named methods (oslo.messaging's RPC server).
///
/// It exists so that an app serves methods by name on the three addresses of a topic
/// without declaring queues, bindings or replies itself: `ctx.rpc_server(server)` gives
/// the supervised child.
#[derive(Clone)]
pub struct RpcServer {
    topic: String,
    exchange: Option<String>,
    methods: HashMap<String, Method>,
    concurrency: usize,
    dedup: Option<Dedup>,
}

impl RpcServer {
    /// A server of `topic` with no methods yet.
    pub fn new(topic: impl Into<String>) -> Self {
        RpcServer {
            topic: topic.into(),
            exchange: None,
            methods: HashMap::new(),
            concurrency: CONCURRENCY,
            dedup: None,
        }
    }

    /// Effectively once: a request whose id was served within the window (redelivered
    /// after a failover, or re-sent by its caller) gets the first run's reply again; its
    /// method does not run twice. Off by default.
    pub fn dedup(mut self, window: Dedup) -> Self {
        self.dedup = Some(window);
        self
    }

    /// Serves under an exchange of its own (see `Target::exchange`).
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = Some(exchange.into());
        self
    }

    /// Requests each of the three listeners handles at once (at least 1; default 8).
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Serves `name` with `method`: an async function of the request's `Args` (a JSON
    /// object) returning the result or a [`RemoteError`]. A second method of the same
    /// name replaces the first.
    pub fn method<F, Fut>(mut self, name: impl Into<String>, method: F) -> Self
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = MethodResult> + Send + 'static,
    {
        let method: Method = Arc::new(move |args| method(args).boxed());
        self.methods.insert(name.into(), method);
        self
    }

    /// The topic served.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// What tells this server from another of the same topic in one app: `<exchange>/<topic>`
    /// when it serves under an exchange of its own, else the topic. Its child is
    /// `rpc:<label>` and its listeners `rpc-<label>-<kind>`.
    pub fn label(&self) -> String {
        match &self.exchange {
            Some(exchange) => format!("{exchange}/{}", self.topic),
            None => self.topic.clone(),
        }
    }

    /// The target this server answers as `server` (its node's name).
    pub(super) fn target(&self, server: &str) -> Target {
        Target {
            topic: self.topic.clone(),
            server: Some(server.to_string()),
            fanout: false,
            exchange: self.exchange.clone(),
        }
    }

    /// The method table as served on `node`, counted under `exchange` in `/metrics`.
    pub(super) fn served(self, node: &NodeContext, exchange: &str) -> (Served, usize) {
        let counts = Arc::new(Counts::default());
        let served = Served {
            topic: self.topic.clone(),
            methods: self.methods,
            publish_timeout: node.listeners.listener.publish_timeout,
            hold: node.listeners.listener.publish_timeout + node.listeners.listener.stop_timeout,
            replies: self.dedup.map(Window::new),
            counts: counts.clone(),
            returns: LogLimit::default(),
            _figures: node.metrics.register(Arc::new(ServerFigures {
                topic: self.topic,
                exchange: exchange.to_string(),
                counts,
            })),
        };
        (served, self.concurrency)
    }

    /// The three listeners (A, B, C) serving this table on `node`.
    fn listeners(self, node: &NodeContext) -> Result<Vec<RpcListener>, TargetError> {
        let config = &node.rpc;
        let target = self.target(&node.node);
        target.check()?;
        let exchange = target.request_exchange(config).to_string();
        let one = target.server_address(config, &node.node);
        let group = target.group_address(config);
        let broadcast = target.broadcast_address(config);
        let own = target.broadcast_queue(config, &node.node);
        for (what, name) in [
            ("the exchange name", &exchange),
            ("the server's address", &one),
            ("the group's address", &group),
            ("the broadcast queue", &own),
        ] {
            short(what, name)?;
        }
        let label = self.label();
        let (served, concurrency) = self.served(node, &exchange);
        let served = Arc::new(served);
        let expiry = config.server_queue_expiry;
        let name = |kind: &str| format!("rpc-{}-{kind}", shortened(&label));
        let spec = |kind: &str, queue: QueueSpec| {
            let served = served.clone();
            ListenerSpec::new(name(kind))
                .queue(queue)
                .prefetch(u16::try_from(concurrency).unwrap_or(u16::MAX))
                .concurrency(concurrency)
                .responder("*", "*", move |event: Event| {
                    let served = served.clone();
                    async move { served.serve(event).await }
                })
        };
        let server = spec("server", QueueSpec::named(&one).durable().expires(expiry))
            .exchange(Exchange::topic(&exchange).durable())
            .bind(&exchange, &one);
        let group_spec = spec("group", QueueSpec::named(&group).durable())
            .exchange(Exchange::topic(&exchange).durable())
            .bind(&exchange, &group);
        let all = spec("all", QueueSpec::named(&own).durable().expires(expiry))
            .exchange(Exchange::fanout(&broadcast).durable())
            .bind(&broadcast, "");
        Ok([server, group_spec, all]
            .into_iter()
            .map(|spec| RpcListener { spec })
            .collect())
    }
}

impl AppContext {
    /// `server` as one supervised child of the app (`rpc:<label>`, see [`RpcServer::label`]): its three listeners
    /// under a one-for-one supervisor. A target that cannot be expressed in AMQP refuses
    /// the app, as a bad listener spec does.
    pub fn rpc_server(&self, server: RpcServer) -> ChildSpec {
        let id = format!("rpc:{}", server.label());
        let child = if self.node.amqp10.is_some() {
            // `[rpc] transport = "amqp10"`: three receiver links instead of listeners.
            server
                .target(&self.node.node)
                .check()
                .map(|()| super::amqp10::server_child(id.clone(), server, &self.node))
        } else {
            server.listeners(&self.node).map(|listeners| {
                let children = listeners.into_iter().map(|l| self.listener(l)).collect();
                ChildSpec::supervisor(SupervisorSpec::one_for_one(
                    id.clone(),
                    StopOrder::Concurrent,
                    Intensity::new(10, Duration::from_secs(30)),
                    children,
                ))
            })
        };
        child.unwrap_or_else(|error| {
            let refusal = SpecError {
                listener: id.clone(),
                field: "target",
                problem: error.to_string(),
            };
            self.refuse(id, refusal)
        })
    }
}

/// Starts `server`'s three listeners outside any supervisor (tests, tools); stop each
/// handle with [`ListenerHandle::stop`].
pub async fn spawn_rpc_server(
    server: RpcServer,
    ctx: &AppContext,
) -> Result<Vec<ListenerHandle>, ListenerError> {
    let listeners = server
        .listeners(&ctx.node)
        .map_err(|error| ListenerError::Start(error.to_string()))?;
    let mut handles = Vec::new();
    for listener in listeners {
        handles.push(spawn_listener(listener, ctx).await?);
    }
    Ok(handles)
}

/// One of a server's three listeners: just its spec.
struct RpcListener {
    spec: ListenerSpec,
}

impl Listener for RpcListener {
    fn spec(&self) -> ListenerSpec {
        self.spec.clone()
    }
}

/// What a server counts.
#[derive(Default)]
struct Counts {
    /// Replies returned unroutable (the caller's queue was gone).
    returned: AtomicU64,
    /// Methods that panicked.
    panics: AtomicU64,
    /// Requests answered from the dedup window, without running their method.
    duplicates: AtomicU64,
}

/// A server's figures for `/metrics`.
struct ServerFigures {
    topic: String,
    /// The exchange its requests come through (two servers of one topic may differ).
    exchange: String,
    counts: Arc<Counts>,
}

impl Source for ServerFigures {
    fn report(&self, report: &mut Report) {
        let labels = || {
            vec![
                ("topic", self.topic.clone()),
                ("exchange", self.exchange.clone()),
            ]
        };
        report.counter(
            "warren_rpc_server_returned_replies",
            "Replies of an RPC server that came back unroutable (the caller's queue was gone).",
            labels(),
            self.counts.returned.load(Ordering::Relaxed),
        );
        report.counter(
            "warren_rpc_server_panics",
            "Methods of an RPC server that panicked (answered with a Panic failure).",
            labels(),
            self.counts.panics.load(Ordering::Relaxed),
        );
        report.counter(
            "warren_rpc_server_duplicates",
            "Requests of an RPC server answered from its dedup window: served already, the method not run again.",
            labels(),
            self.counts.duplicates.load(Ordering::Relaxed),
        );
    }
}

/// The method table and what serving it needs, shared by the three listeners (or the
/// three AMQP 1.0 links).
pub(super) struct Served {
    topic: String,
    methods: HashMap<String, Method>,
    publish_timeout: Duration,
    /// How long a copy of a request waits for the first one to be served.
    hold: Duration,
    /// The dedup window: request ids served, with their outcome.
    replies: Option<Arc<Window<MethodResult>>>,
    counts: Arc<Counts>,
    /// Rate limit of the "reply returned" warning.
    returns: LogLimit,
    /// The server's figures in `/metrics`, for as long as it exists.
    _figures: MetricsEntry,
}

impl Served {
    /// The topic served.
    pub(super) fn topic(&self) -> &str {
        &self.topic
    }

    /// The bound of one reply's publish.
    pub(super) fn publish_timeout(&self) -> Duration {
        self.publish_timeout
    }

    /// Runs the request's method and, for a call, publishes its reply.
    async fn serve(&self, event: Event) -> HandlerResult {
        let properties = &event.delivery().properties;
        let msg_id = properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .or_else(|| event.envelope().msg_id().map(str::to_string))
            .unwrap_or_default();
        let reply_to = properties
            .reply_to()
            .as_ref()
            .map(|queue| queue.to_string())
            .filter(|queue| !queue.is_empty());
        let outcome = self.once(event.envelope(), &msg_id).await;
        let Some(reply_to) = reply_to else {
            if let Err(error) = &outcome {
                tracing::debug!(topic = %self.topic, method = event.name(), kind = %error.kind, "a cast failed on the server");
            }
            return Ok(());
        };
        let reply = wire::reply(&msg_id, &outcome);
        let correlation = Correlation {
            correlation_id: Some(msg_id),
            ..Correlation::default()
        };
        let options = PublishOptions::new(self.publish_timeout)
            .mandatory()
            .correlation(correlation);
        let pending = match event.publish_with("", &reply_to, reply, options).await {
            Ok(pending) => pending,
            // A reply_to or id AMQP cannot carry: no retry can help.
            Err(error @ PublishError::Invalid(_)) => return Err(HandlerError::reject(error)),
            Err(error) => return Err(error.into()),
        };
        match pending.confirmed().await {
            Ok(Published::Routed) => Ok(()),
            Ok(Published::Returned(_)) => {
                self.counts.returned.fetch_add(1, Ordering::Relaxed);
                if let Some(held) = self.returns.allow(&self.topic) {
                    tracing::warn!(topic = %self.topic, held_back = held, "an RPC reply came back unroutable: its caller's queue is gone; dropped");
                }
                Ok(())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// The request's outcome, from the dedup window when it was served already.
    pub(super) async fn once(&self, request: &Envelope, msg_id: &str) -> MethodResult {
        let Some(window) = self.replies.as_ref().filter(|_| !msg_id.is_empty()) else {
            return self.run(request).await;
        };
        let claim = match window.claim(msg_id) {
            Seen::New(claim) => Some(claim),
            Seen::Handled(outcome) => return self.again(outcome, msg_id),
            Seen::Running(notify) => match window.wait(msg_id, notify, self.hold).await {
                Seen::New(claim) => Some(claim),
                Seen::Handled(outcome) => return self.again(outcome, msg_id),
                // The first copy still runs past the hold: this one runs too.
                Seen::Running(_) => None,
            },
        };
        let outcome = self.run(request).await;
        if let Some(claim) = claim {
            claim.end(Some(outcome.clone()));
        }
        outcome
    }

    /// A request served already: its first outcome again.
    fn again(&self, outcome: MethodResult, msg_id: &str) -> MethodResult {
        self.counts.duplicates.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(topic = %self.topic, msg_id, "served already; answered from the dedup window");
        outcome
    }

    /// The request's outcome: its method's result, or why there is none.
    async fn run(&self, request: &Envelope) -> MethodResult {
        if request.category() != wire::RPC {
            return Err(RemoteError::bad_request(format!(
                "`Event-Category` must be `{}`",
                wire::RPC
            )));
        }
        let name = request.name();
        let Some(method) = self.methods.get(name) else {
            return Err(RemoteError::unknown_method(name));
        };
        let args = wire::args(request)?;
        let method = method.clone();
        // The call itself runs inside the future, so a panic while building it is caught too.
        let running = async move { method(args).await };
        match AssertUnwindSafe(running).catch_unwind().await {
            Ok(result) => result,
            Err(panic) => {
                self.counts.panics.fetch_add(1, Ordering::Relaxed);
                let message = panic_message(panic.as_ref());
                tracing::error!(topic = %self.topic, method = name, panic = %message, "an RPC method panicked; answered with a Panic failure");
                Err(RemoteError::panic(message))
            }
        }
    }
}

/// The text of a panic's payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "the method panicked".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_payloads_become_messages() {
        assert_eq!(panic_message(&"boom"), "boom");
        assert_eq!(panic_message(&String::from("bang")), "bang");
        assert_eq!(panic_message(&3_u8), "the method panicked");
    }
}
