//! RPC targets and notifications over AMQP 1.0 (`[rpc] transport = "amqp10"`): the
//! oslo.messaging AMQP 1.0 driver spec's mapping, on the node's [`Amqp10Transport`].
//!
//! | pattern | logical address | RabbitMQ 3.x (default `[rpc.amqp10]`) | receivers |
//! |---|---|---|---|
//! | one named server | `[<exchange>/]<server_request_prefix>/<topic>/<server>` | `/queue/exclusive.<topic>.<server>` | anycast: `move` |
//! | one of a group | `[<exchange>/]<group_request_prefix>/<topic>` | `/queue/unicast.<topic>` | anycast: `move` |
//! | all of a group | `[<exchange>/]<broadcast_prefix>/<topic>` | `/exchange/amq.topic/broadcast.<topic>` | multicast: `copy` |
//! | notifications | `<notifications_exchange>/<topic>.<priority>` | `/queue/openstack.<topic>.<priority>` | anycast: `move` |
//! | replies | `reply/<node>` | `/queue/reply.<node>` | the node's one reply link |
//!
//! (The broadcast prefix is used without its surrounding `/`.) Requests and replies are
//! sent pre-settled (at most once, as the spec says): a request's `to` is its address,
//! its message-id the envelope's `Msg-ID`, its TTL the call's timeout; the reply's
//! correlation-id is that id. Notifications are durable and unsettled: `notify` returns
//! once the intermediary accepted one, and a listener settles each after its handler
//! (accepted; released to be tried again; rejected past `max_redeliveries` or when the
//! handler says never).
//!
//! Owns: the logical addresses and their mapping, and serving targets and notifications
//! on links. Must not touch: connections and links (the transport's), the method table
//! (`server`), the bodies (`wire`).

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use serde_json::Value;
use warren_runtime::amqp10::{
    Amqp10Error, Amqp10Transport, Disposition, Distribution, Handler, Incoming, Outgoing,
    Receiving, ReceivingHandle,
};
use warren_runtime::config::{Amqp10Mapping, RpcConfig};
use warren_runtime::envelope::{DecodeLimits, Envelope, decode_owned};
use warren_runtime::log_limit::LogLimit;
use warren_runtime::node::NodeContext;
use warren_runtime::supervisor::ChildSpec;

use super::address::{Target, TargetError};
use super::notify::{Notification, address as notification_key};
use super::server::{RpcServer, Served};
use super::wire::{self, RemoteError};
use crate::listener::HandlerError;
use crate::pool::RpcError;

/// Where a request to `target` goes, on the intermediary: rule C when `fanout`, else A
/// with a server, else B.
pub(crate) fn request_address(target: &Target, config: &RpcConfig) -> Result<String, TargetError> {
    target.check()?;
    let mapping = &config.amqp10;
    Ok(if target.fanout {
        Amqp10Mapping::apply(&mapping.multicast, &broadcast(target, config))
    } else {
        let logical = match &target.server {
            Some(server) => server_address(target, config, server),
            None => group(target, config),
        };
        Amqp10Mapping::apply(&mapping.anycast, &logical)
    })
}

/// Rule A: `[<exchange>/]<server_request_prefix>/<topic>/<server>`.
fn server_address(target: &Target, config: &RpcConfig, server: &str) -> String {
    logical(
        target,
        &[&config.server_request_prefix, &target.topic, server],
    )
}

/// Rule B: `[<exchange>/]<group_request_prefix>/<topic>`.
fn group(target: &Target, config: &RpcConfig) -> String {
    logical(target, &[&config.group_request_prefix, &target.topic])
}

/// Rule C: `[<exchange>/]<broadcast_prefix>/<topic>`.
fn broadcast(target: &Target, config: &RpcConfig) -> String {
    logical(target, &[&config.broadcast_prefix, &target.topic])
}

/// The segments joined by `/`, each without its own leading or trailing `/`, under the
/// target's exchange when it names one.
fn logical(target: &Target, segments: &[&str]) -> String {
    target
        .exchange
        .as_deref()
        .into_iter()
        .chain(segments.iter().copied())
        .map(|segment| segment.trim_matches('/'))
        .filter(|segment| !segment.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

/// Where notifications of `topic` at `priority` on `exchange` go, on the intermediary.
pub(crate) fn notification_address(
    config: &RpcConfig,
    exchange: &str,
    (topic, priority): (&str, &str),
) -> Result<String, TargetError> {
    let key = notification_key(topic, priority)?;
    let logical = format!("{}/{key}", exchange.trim_matches('/'));
    Ok(Amqp10Mapping::apply(&config.amqp10.anycast, &logical))
}

/// What a failed send or call is to a caller.
fn rpc_error(error: Amqp10Error) -> RpcError {
    match error {
        Amqp10Error::Timeout(after) => RpcError::Timeout(after),
        other => RpcError::Amqp10(other),
    }
}

/// A request for `method` of `target`, addressed, with its id.
fn request(
    target: &Target,
    config: &RpcConfig,
    method: &str,
    args: Value,
) -> Result<(String, Outgoing), RpcError> {
    let address = request_address(target, config)?;
    let mut request =
        wire::request(method, args).map_err(|_| TargetError::ArgsNotObject(method.to_string()))?;
    let id = request.ensure_msg_id().to_string();
    let mut outgoing = Outgoing::new(request.encode());
    outgoing.message_id = Some(id);
    outgoing.to = Some(address.clone());
    outgoing.subject = Some(method.to_string());
    Ok((address, outgoing))
}

/// Calls `method` on one server of `target` over AMQP 1.0 (see the module docs).
pub(crate) async fn call(
    transport: &Amqp10Transport,
    node: &NodeContext,
    target: &Target,
    method: &str,
    args: Value,
    timeout: Duration,
) -> Result<Value, RpcError> {
    if target.fanout {
        return Err(RpcError::FanoutCall(target.topic.clone()));
    }
    let (address, mut outgoing) = request(target, &node.rpc, method, args)?;
    outgoing.ttl = Some(timeout);
    let reply = transport
        .call(&address, outgoing, timeout)
        .await
        .map_err(rpc_error)?;
    let reply = decode(reply.body, limits(node)).await.map_err(|error| {
        RpcError::Remote(RemoteError::new(
            RemoteError::BAD_REPLY,
            format!("an unreadable reply: {error}"),
        ))
    })?;
    wire::outcome(&reply).map_err(RpcError::Remote)
}

/// Sends `method` to `target` over AMQP 1.0 without waiting for a result: pre-settled,
/// `Ok` once written (the spec's at-most-once requests).
pub(crate) async fn cast(
    transport: &Amqp10Transport,
    node: &NodeContext,
    target: &Target,
    method: &str,
    args: Value,
    timeout: Duration,
) -> Result<(), RpcError> {
    let (address, outgoing) = request(target, &node.rpc, method, args)?;
    transport
        .send(&address, outgoing, true, timeout)
        .await
        .map_err(rpc_error)
}

/// Publishes a notification over AMQP 1.0: durable, and `Ok` once the intermediary
/// accepted it.
pub(crate) async fn notify(
    transport: &Amqp10Transport,
    config: &RpcConfig,
    (topic, priority): (&str, &str),
    (event_type, payload): (&str, Value),
    timeout: Duration,
) -> Result<(), RpcError> {
    let address = notification_address(config, &config.notifications_exchange, (topic, priority))?;
    let mut body = wire::notification(event_type, priority, payload, transport.node());
    let mut outgoing = Outgoing::new(Vec::new());
    outgoing.message_id = Some(body.ensure_msg_id().to_string());
    outgoing.body = body.encode();
    outgoing.to = Some(address.clone());
    outgoing.subject = Some(event_type.to_string());
    outgoing.durable = true;
    transport
        .send(&address, outgoing, false, timeout)
        .await
        .map_err(rpc_error)
}

/// An [`RpcServer`] served over AMQP 1.0: its three receiver links.
///
/// It exists so that a server (or a test) can wait until the links are attached and stop
/// them in order; under an app the supervised child holds it.
pub struct Amqp10Server {
    links: Vec<ReceivingHandle>,
}

impl Amqp10Server {
    /// Subscribes `server`'s three links on `node`'s transport (rules A and B anycast,
    /// C multicast), with the node's name as server name.
    pub fn start(server: RpcServer, node: &NodeContext) -> Result<Amqp10Server, TargetError> {
        let Some(transport) = node.amqp10.clone() else {
            return Err(TargetError::NoAmqp10);
        };
        let config = &node.rpc;
        let target = server.target(&node.node);
        target.check()?;
        let label = server.label();
        let mapping = &config.amqp10;
        let sources = [
            (
                "server",
                Amqp10Mapping::apply(
                    &mapping.anycast,
                    &server_address(&target, config, &node.node),
                ),
                Distribution::Move,
            ),
            (
                "group",
                Amqp10Mapping::apply(&mapping.anycast, &group(&target, config)),
                Distribution::Move,
            ),
            (
                "all",
                Amqp10Mapping::apply(&mapping.multicast, &broadcast(&target, config)),
                Distribution::Copy,
            ),
        ];
        let exchange = target.request_exchange(config).to_string();
        let (served, concurrency) = server.served(node, &exchange);
        let serving = Arc::new(Serving {
            served,
            limits: limits(node),
            transport: transport.clone(),
            failures: LogLimit::default(),
        });
        let credit = u32::try_from(concurrency).unwrap_or(u32::MAX);
        let links = sources
            .into_iter()
            .map(|(kind, source, distribution)| {
                let serving = serving.clone();
                let handler: Handler = Arc::new(move |request: Incoming| {
                    let serving = serving.clone();
                    async move { serving.serve(request).await }.boxed()
                });
                let receiving = Receiving {
                    link: format!("{}/rpc-{label}-{kind}", node.node),
                    source,
                    distribution,
                    presettled: true,
                    credit,
                };
                transport.receive(receiving, handler)
            })
            .collect();
        Ok(Amqp10Server { links })
    }

    /// Waits up to `timeout` until all three links are attached.
    pub async fn attached(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        for link in &self.links {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !link.attached(left).await {
                return false;
            }
        }
        true
    }

    /// Detaches the links (each within `timeout`), letting running methods end.
    pub async fn stop(self, timeout: Duration) {
        futures::future::join_all(self.links.into_iter().map(|link| link.stop(timeout))).await;
    }
}

/// Links that stop as one: what a supervised AMQP 1.0 child holds.
type Stop = Box<dyn FnOnce(Duration) -> futures::future::BoxFuture<'static, ()> + Send>;

/// Starts an AMQP 1.0 child's links; `Err` when they cannot be (a bad target).
type Start = Arc<dyn Fn() -> Result<Stop, String> + Send + Sync>;

/// A supervised child that holds AMQP 1.0 links (an RPC server's three, or a
/// notification link) from its start to its stop: the links follow reconnects by
/// themselves, so the child only starts and stops them.
struct LinksActor;

impl ractor::Actor for LinksActor {
    type Msg = ();
    type State = (Option<Stop>, Duration);
    type Arguments = (Start, Duration);

    async fn pre_start(
        &self,
        _myself: ractor::ActorRef<()>,
        (start, stop_timeout): (Start, Duration),
    ) -> Result<Self::State, ractor::ActorProcessingErr> {
        let stop = start()?;
        Ok((Some(stop), stop_timeout))
    }

    async fn post_stop(
        &self,
        _myself: ractor::ActorRef<()>,
        (stop, timeout): &mut Self::State,
    ) -> Result<(), ractor::ActorProcessingErr> {
        if let Some(stop) = stop.take() {
            stop(*timeout).await;
        }
        Ok(())
    }
}

/// The supervised child `id` holding the links `start` attaches.
fn links_child(id: String, node: &NodeContext, start: Start) -> ChildSpec {
    let stop_timeout = node.listeners.listener.stop_timeout;
    ChildSpec::actor(id, move || (LinksActor, (start.clone(), stop_timeout)))
        .shutdown(stop_timeout + Duration::from_secs(1))
}

/// `server` as a supervised child over AMQP 1.0 (see `AppContext::rpc_server`).
pub(super) fn server_child(id: String, server: RpcServer, node: &NodeContext) -> ChildSpec {
    let context = node.clone();
    let start: Start = Arc::new(move || {
        let links = Amqp10Server::start(server.clone(), &context).map_err(|e| e.to_string())?;
        Ok(Box::new(move |timeout| links.stop(timeout).boxed()) as Stop)
    });
    links_child(id, node, start)
}

/// A notification handler as a supervised child over AMQP 1.0 (see
/// `AppContext::notifications`).
pub(super) fn notifications_child(
    id: String,
    node: &NodeContext,
    (exchange, topic, priority): (String, String, String),
    max_redeliveries: u32,
    handler: NotificationHandler,
) -> ChildSpec {
    let context = node.clone();
    let start: Start = Arc::new(move || {
        let handler = handler.clone();
        let links = Amqp10Notifications::start(
            &context,
            &exchange,
            (&topic, &priority),
            max_redeliveries,
            move |n| handler(n),
        )
        .map_err(|e| e.to_string())?;
        Ok(Box::new(move |timeout| links.stop(timeout).boxed()) as Stop)
    });
    links_child(id, node, start)
}

/// A server's method table and the transport its replies go out on.
struct Serving {
    served: Served,
    /// What a request may be (`[listener] max_message_bytes`).
    limits: DecodeLimits,
    transport: Amqp10Transport,
    /// Rate limit of the "reply not sent" warning.
    failures: LogLimit,
}

impl Serving {
    /// Runs one request's method and, for a call, sends its reply (pre-settled).
    async fn serve(&self, request: Incoming) -> Disposition {
        let envelope = decode(request.body, self.limits).await;
        let msg_id = request
            .message_id
            .clone()
            .or_else(|| {
                envelope
                    .as_ref()
                    .ok()
                    .and_then(|e| e.msg_id().map(str::to_string))
            })
            .unwrap_or_default();
        let outcome = match &envelope {
            Ok(envelope) => self.served.once(envelope, &msg_id).await,
            Err(error) => Err(RemoteError::bad_request(error.clone())),
        };
        let Some(reply_to) = request.reply_to.filter(|to| !to.is_empty()) else {
            return Disposition::Accept;
        };
        let reply = wire::reply(&msg_id, &outcome);
        let mut outgoing = Outgoing::new(reply.encode());
        outgoing.correlation_id = Some(msg_id);
        outgoing.to = Some(reply_to.clone());
        let sent = self
            .transport
            .send(&reply_to, outgoing, true, self.served.publish_timeout())
            .await;
        if let Err(error) = sent
            && let Some(held) = self.failures.allow(self.served.topic())
        {
            tracing::warn!(topic = %self.served.topic(), %error, held_back = held, "AMQP 1.0: an RPC reply was not sent");
        }
        Disposition::Accept
    }
}

/// What a received body may be on `node`: `[listener] max_message_bytes`, as on AMQP
/// 0-9-1.
fn limits(node: &NodeContext) -> DecodeLimits {
    DecodeLimits::new(node.listeners.listener.max_message_bytes)
}

/// A received body as an envelope within `limits`, or why it is not one.
async fn decode(body: Vec<u8>, limits: DecodeLimits) -> Result<Envelope, String> {
    let (_, decoded) = decode_owned(body, Some("application/json".to_string()), None, limits).await;
    decoded.map_err(|error| error.to_string())
}

/// A notification handler, boxed.
pub(super) type NotificationHandler = Arc<
    dyn Fn(Notification) -> futures::future::BoxFuture<'static, crate::listener::HandlerResult>
        + Send
        + Sync,
>;

/// Notifications of one topic and priority consumed over AMQP 1.0: one unsettled
/// receiver link, each notification settled after its handler.
///
/// It exists for the same reason as [`super::NotificationListener`], on the other
/// transport: an app gets it from `ctx.notifications(..)` when the node runs AMQP 1.0.
pub struct Amqp10Notifications {
    link: ReceivingHandle,
}

impl Amqp10Notifications {
    /// Subscribes `handler` to notifications of `topic` at `priority` published to
    /// `exchange` (the node's `[rpc] notifications_exchange` as a rule), on `node`'s
    /// transport. A handler error releases the notification to be tried again, at most
    /// `max_redeliveries` times; then (or at once for `HandlerError::Reject`) it is
    /// rejected: the intermediary drops or dead-letters it.
    pub fn start<F, Fut>(
        node: &NodeContext,
        exchange: &str,
        (topic, priority): (&str, &str),
        max_redeliveries: u32,
        handler: F,
    ) -> Result<Amqp10Notifications, TargetError>
    where
        F: Fn(Notification) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = crate::listener::HandlerResult> + Send + 'static,
    {
        let Some(transport) = node.amqp10.clone() else {
            return Err(TargetError::NoAmqp10);
        };
        let source = notification_address(&node.rpc, exchange, (topic, priority))?;
        let handler: NotificationHandler = Arc::new(move |n| handler(n).boxed());
        let state = Arc::new(Handling {
            handler,
            limits: limits(node),
            max: max_redeliveries,
            tries: parking_lot::Mutex::new(HashMap::new()),
        });
        let link: Handler = Arc::new(move |incoming: Incoming| {
            let state = state.clone();
            async move { state.handle(incoming).await }.boxed()
        });
        let receiving = Receiving {
            link: format!("{}/notifications-{topic}.{priority}", node.node),
            source,
            distribution: Distribution::Move,
            presettled: false,
            credit: u32::from(node.listeners.prefetch.max(1)),
        };
        Ok(Amqp10Notifications {
            link: transport.receive(receiving, link),
        })
    }

    /// Waits up to `timeout` until the link is attached.
    pub async fn attached(&self, timeout: Duration) -> bool {
        self.link.attached(timeout).await
    }

    /// Detaches the link within `timeout`, letting running handlers end.
    pub async fn stop(self, timeout: Duration) {
        self.link.stop(timeout).await;
    }
}

/// Most notifications whose failures are remembered at once; past it one count is
/// forgotten (that notification gets its tries again), so memory stays bounded.
const TRIES_KEPT: usize = 10_000;

/// A notification handler and the failures of each notification so far (the
/// intermediary does not count redeliveries: RabbitMQ 3.x leaves delivery-count at 0).
/// Notifications are told apart by message-id (else `Msg-ID`).
struct Handling {
    handler: NotificationHandler,
    limits: DecodeLimits,
    max: u32,
    tries: parking_lot::Mutex<HashMap<String, u32>>,
}

impl Handling {
    async fn handle(&self, incoming: Incoming) -> Disposition {
        let envelope = match decode(incoming.body, self.limits).await {
            Ok(envelope) => envelope,
            Err(error) => {
                tracing::warn!(%error, "AMQP 1.0: an unreadable notification; rejected");
                return Disposition::Reject;
            }
        };
        let id = incoming
            .message_id
            .or_else(|| envelope.msg_id().map(str::to_string))
            .unwrap_or_default();
        let failed_before = self.tries.lock().get(&id).copied().unwrap_or(0);
        let notification = Notification::read(&envelope, incoming.redelivered || failed_before > 0);
        let handling = (self.handler)(notification);
        let result = AssertUnwindSafe(handling)
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Err(HandlerError::retry("the handler panicked")));
        let error = match result {
            Ok(()) => {
                self.tries.lock().remove(&id);
                return Disposition::Accept;
            }
            Err(error) => error,
        };
        let failures = failed_before + 1;
        match error {
            HandlerError::Defer(_) => Disposition::Release,
            HandlerError::Retry(reason) if failures <= self.max => {
                let mut tries = self.tries.lock();
                if tries.len() >= TRIES_KEPT
                    && let Some(oldest) = tries.keys().next().cloned()
                {
                    tries.remove(&oldest);
                }
                tries.insert(id, failures);
                tracing::debug!(%reason, failures, "AMQP 1.0: a notification handler failed; released");
                Disposition::Release
            }
            HandlerError::Retry(reason) | HandlerError::Reject(reason) => {
                self.tries.lock().remove(&id);
                tracing::warn!(%reason, failures, "AMQP 1.0: a notification rejected (past its tries, or the handler said never)");
                Disposition::Reject
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_logical_addresses_follow_the_spec_and_map_onto_rabbitmq() {
        let config = RpcConfig::default();
        let target = Target::new("compute");
        assert_eq!(
            server_address(&target, &config, "n1"),
            "exclusive/compute/n1"
        );
        assert_eq!(group(&target, &config), "unicast/compute");
        assert_eq!(broadcast(&target, &config), "broadcast/compute");
        assert_eq!(
            request_address(&target.clone().server("n1"), &config).unwrap(),
            "/queue/exclusive.compute.n1"
        );
        assert_eq!(
            request_address(&target, &config).unwrap(),
            "/queue/unicast.compute"
        );
        assert_eq!(
            request_address(&target.clone().fanout(), &config).unwrap(),
            "/exchange/amq.topic/broadcast.compute"
        );
        let nova = Target::new("compute").exchange("nova");
        assert_eq!(group(&nova, &config), "nova/unicast/compute");
        assert_eq!(
            notification_address(&config, "openstack", ("monitor", "info")).unwrap(),
            "/queue/openstack.monitor.info"
        );
        assert!(request_address(&Target::new("a.b"), &config).is_err());
    }

    #[test]
    fn a_router_mapping_keeps_the_logical_address() {
        let config = RpcConfig {
            amqp10: Amqp10Mapping {
                anycast: "{address}".into(),
                multicast: "{address}".into(),
                reply: "{address}".into(),
            },
            ..RpcConfig::default()
        };
        assert_eq!(
            request_address(&Target::new("compute").server("n1.example"), &config).unwrap(),
            "exclusive/compute/n1.example"
        );
        assert_eq!(
            request_address(&Target::new("compute").fanout(), &config).unwrap(),
            "broadcast/compute"
        );
    }
}
