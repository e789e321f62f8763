//! The handle to a listener, and the state it shares with the listener's actor and
//! consumer loops.
//!
//! A [`ListenerHandle`] outlives restarts of the actor: the topology (with run-time
//! bindings), the responders and the counters live here, so a restarted actor carries on
//! with them. Run-time changes that touch the broker go through the actor; responders are
//! a local table the handle edits directly.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lapin::Channel;
use parking_lot::{Mutex, RwLock};
use ractor::{Actor, ActorRef};
use tokio::sync::watch;
use warren_runtime::actor_slot::ActorSlot;
use warren_runtime::assignments::{Assignments, ChannelKind};
use warren_runtime::envelope::{Envelope, Stamp};
use warren_runtime::exchanges::TARGETED;
use warren_runtime::node::NodeContext;
use warren_runtime::publish::{PublishError, PublishOptions, Published};
use warren_runtime::publisher::Publisher;
use warren_runtime::readiness::Readiness;
use warren_runtime::registry::BrokerId;
use warren_runtime::supervisor::ChildSpec;

use super::Listener;
use super::actor::{ListenerActor, ListenerMsg};
use super::event::Event;
use super::redelivery::FailureCounts;
use super::responders::{HandlerResult, ResponderId, Responders};
use super::spec::{AckMode, Binding, Exchange, QueueName};
use super::topology::Topology;
use super::validate::{SpecDefaults, SpecError};
use crate::app::AppContext;

/// How long handle calls wait for the actor.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a run-time change or a query failed.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("the listener is not running")]
    NotRunning,
    #[error("the broker refused: {0}")]
    Broker(String),
    #[error("cannot start the listener: {0}")]
    Start(String),
    /// The listener's spec breaks a rule (see [`SpecError`]).
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The broker did not answer within `[amqp] operation_timeout_ms`; the channel is
    /// treated as lost and replaced.
    #[error("the broker did not answer: {0}")]
    Timeout(String),
}

/// A counter readable while it is being updated.
#[derive(Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    pub fn increment(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What happened to the listener's messages.
#[derive(Default)]
pub(crate) struct Stats {
    pub received: Counter,
    pub acked: Counter,
    pub requeued: Counter,
    pub rejected: Counter,
    pub handler_panics: Counter,
    pub undecodable: Counter,
    pub redelivery_limit: Counter,
    pub suppressed: Counter,
    pub unmatched: Counter,
    pub parked: Counter,
    pub deferred: Counter,
    pub notice_panics: Counter,
}

/// A copy of a listener's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub received: u64,
    pub acked: u64,
    /// Nacked with requeue (retry, panic).
    pub requeued: u64,
    /// Taken off the queue for good because they cannot succeed (handler reject,
    /// undecodable, too large, invalid fields, past the redelivery limit): dead-lettered
    /// to the queue's DLX, or parked (see `parked`).
    pub rejected: u64,
    /// Panics in app code on a message: a responder or `on_event`.
    pub handler_panics: u64,
    /// Bodies that are not a kapi envelope (or too large, or with invalid fields).
    pub undecodable: u64,
    pub redelivery_limit: u64,
    pub suppressed: u64,
    pub unmatched: u64,
    /// Of `rejected`: moved to the parking queue (the queue has no dead-letter exchange).
    pub parked: u64,
    /// Requeued without counting as a failure (e.g. a pool worker whose holder did not
    /// read).
    pub deferred: u64,
    /// Panics in `on_notice` (logged and ignored).
    pub notice_panics: u64,
}

/// What a listener's actor says about itself (for operators and tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerStatus {
    /// The broker and lease generation of the active channel, if any.
    pub active: Option<(BrokerId, u64)>,
    /// The topology is declared on the active channel.
    pub declared: bool,
    /// A consumer runs on the active channel.
    pub consuming: bool,
    /// Paused by the app.
    pub paused: bool,
    /// Old leases still drained (or watched) after a fail-back: broker and generation.
    pub draining: Vec<(BrokerId, u64)>,
    /// Of `draining`: those whose queue was empty once and are still consumed for
    /// `[listener] fail_back_watch_ms`.
    pub watching: Vec<(BrokerId, u64)>,
}

/// What removing a binding did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Removed {
    /// The listener had the binding.
    pub existed: bool,
    /// It is gone from every broker where the queue may have had it: nothing routed by
    /// it can reach the queue any more.
    pub clean: bool,
}

/// Settings fixed when the listener is created.
pub(crate) struct Settings {
    pub ack: AckMode,
    pub concurrency: usize,
    pub prefetch: u16,
    pub max_redeliveries: u32,
    pub stop_timeout: Duration,
    pub publish_timeout: Duration,
    /// Bound for one broker operation.
    pub operation_timeout: Duration,
    /// Bound for a fail-back drain.
    pub drain_timeout: Duration,
    /// How long a named queue left on the old broker is still consumed after a drain.
    pub fail_back_watch: Duration,
    /// How often a queue without a consumer (paused) is re-declared so that it does not
    /// expire; `None` when the queue has no `x-expires`.
    pub keepalive: Option<Duration>,
    /// Largest body accepted, before and after gzip.
    pub max_message_bytes: usize,
    /// The queue is a quorum queue: trust `x-delivery-count`.
    pub quorum: bool,
    /// Messages that cannot succeed go to the queue's dead-letter exchange; otherwise to
    /// `parking`.
    pub dead_letter: bool,
    /// The parking queue.
    pub parking: String,
    pub channel: ChannelKind,
    /// The node's publisher, stamping as the app: handlers' publishes and replies, and
    /// parking, go out on publish connections, never on the consume channel.
    pub publisher: Publisher,
}

/// State shared by a listener's handle, actor and consumer loops.
pub(crate) struct ListenerShared {
    pub name: String,
    /// Prefix of consumer tags (unique per listener instance).
    pub consumer_tag: String,
    pub listener: Arc<dyn Listener>,
    pub settings: Settings,
    pub topology: Mutex<Topology>,
    pub responders: RwLock<Responders>,
    pub stats: Stats,
    pub failures: FailureCounts,
    pub consuming: watch::Sender<bool>,
    /// The channel the topology is declared on, for publishing outside events.
    pub channel: watch::Sender<Option<Channel>>,
    /// The broker and lease of the current channel.
    pub current: RwLock<Option<(BrokerId, u64)>>,
    pub actor: ActorSlot<ListenerMsg>,
    pub assignments: Assignments,
    pub readiness: Readiness,
}

/// The longest listener name used inside queue names and consumer tags: with the longest
/// node name config.ini allows, they stay within AMQP's 255 bytes.
const NAME_IN_TAGS: usize = 64;

/// `name` cut to at most `max` bytes, at a character boundary.
fn cut(name: &str, max: usize) -> &str {
    let mut end = name.len().min(max);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

impl ListenerShared {
    fn new(
        listener: Arc<dyn Listener>,
        node: &NodeContext,
        stamp: Stamp,
    ) -> Result<Arc<Self>, SpecError> {
        let spec = listener.spec();
        let config = &node.config;
        spec.validate(SpecDefaults {
            prefetch: config.amqp.prefetch,
        })?;
        let suffix = warren_runtime::envelope::new_msg_id();
        let unique = &suffix[..12];
        let short_name = cut(&spec.name, NAME_IN_TAGS);
        let mut queue = spec.queue.clone();
        let queue_name = match &spec.queue.name {
            QueueName::Named(name) => name.clone(),
            QueueName::Anonymous => {
                format!("{short_name}-{}-{unique}", config.service.node)
            }
        };
        let anonymous = spec.queue.name == QueueName::Anonymous;
        if anonymous && !queue.arguments.inner().contains_key("x-expires") {
            queue = queue.expires(config.listener.anonymous_queue_expiry);
        }
        let keepalive =
            expiry_of(&queue).map(|expiry| (expiry / 3).max(Duration::from_millis(500)));
        let mut bindings = spec.bindings.clone();
        for exchange in &spec.own_queue_bindings {
            let own = Binding::new(exchange.as_str(), queue_name.as_str());
            if !bindings.contains(&own) {
                bindings.push(own);
            }
        }
        // `targeted` first (replies reach requesters through it), durable unless the
        // operator fixed other flags; then the app's exchanges, with their fixed flags.
        let mut exchanges = vec![Exchange::direct(TARGETED).durable().overridden(config)];
        for exchange in &spec.exchanges {
            if exchange.name != TARGETED {
                exchanges.push(exchange.clone().overridden(config));
            }
        }
        let topology = Topology {
            exchanges,
            queue: queue.clone(),
            queue_name,
            bindings,
            exclusive_consumer: spec.exclusive_consumer,
            paused: false,
        };
        let parking = super::topology::parking_queue(&topology, &spec.name);
        let (consuming, _) = watch::channel(false);
        let (channel, _) = watch::channel(None);
        let prefetch = spec.prefetch.unwrap_or(config.amqp.prefetch);
        Ok(Arc::new(ListenerShared {
            consumer_tag: format!("{short_name}.{}.{unique}", config.service.node),
            name: spec.name.clone(),
            settings: Settings {
                ack: spec.ack,
                concurrency: spec.concurrency,
                prefetch,
                max_redeliveries: spec
                    .max_redeliveries
                    .unwrap_or(config.listener.max_redeliveries),
                stop_timeout: config.listener.stop_timeout,
                publish_timeout: config.listener.publish_timeout,
                operation_timeout: config.amqp.operation_timeout,
                drain_timeout: config.listener.drain_timeout,
                fail_back_watch: config.listener.fail_back_watch,
                keepalive,
                max_message_bytes: config.listener.max_message_bytes,
                quorum: queue.is_quorum(),
                dead_letter: queue.has_dead_letter_exchange(),
                parking,
                channel: spec.channel.clone(),
                publisher: node.publisher.with_stamp(stamp),
            },
            topology: Mutex::new(topology),
            responders: RwLock::new(spec.responders),
            stats: Stats::default(),
            failures: FailureCounts::default(),
            consuming,
            channel,
            current: RwLock::new(None),
            actor: ActorSlot::default(),
            assignments: node.assignments.clone(),
            readiness: node.readiness.clone(),
            listener,
        }))
    }
}

/// The queue's `x-expires`, if it has one.
fn expiry_of(queue: &super::spec::QueueSpec) -> Option<Duration> {
    use lapin::types::AMQPValue;
    let millis = match queue.arguments.inner().get("x-expires")? {
        AMQPValue::LongUInt(n) => u64::from(*n),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok()?,
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok()?,
        AMQPValue::ShortUInt(n) => u64::from(*n),
        _ => return None,
    };
    Some(Duration::from_millis(millis))
}

/// A handle to one listener: query it, change it at run time, stop it.
#[derive(Clone)]
pub struct ListenerHandle {
    shared: Arc<ListenerShared>,
}

/// The listener as a supervised child (for an app's `children`), and its handle; a spec
/// that breaks a rule is refused here, before anything reaches a broker.
pub fn listener_child(
    listener: impl Listener,
    ctx: &AppContext,
) -> Result<(ChildSpec, ListenerHandle), SpecError> {
    node_listener_child(listener, &ctx.node, ctx.stamp())
}

/// As [`listener_child`], from the node's handles and a stamp (pool workers).
pub(crate) fn node_listener_child(
    listener: impl Listener,
    node: &NodeContext,
    stamp: Stamp,
) -> Result<(ChildSpec, ListenerHandle), SpecError> {
    let shared = ListenerShared::new(Arc::new(listener), node, stamp)?;
    let handle = ListenerHandle {
        shared: shared.clone(),
    };
    let shutdown = shared.settings.stop_timeout + Duration::from_secs(3);
    let id = format!("listener:{}", shared.name);
    let child = ChildSpec::actor(id, move || (ListenerActor, shared.clone())).shutdown(shutdown);
    Ok((child, handle))
}

/// Starts a listener outside any supervisor (tests, tools); stop it with
/// [`ListenerHandle::stop`].
pub async fn spawn_listener(
    listener: impl Listener,
    ctx: &AppContext,
) -> Result<ListenerHandle, ListenerError> {
    let shared = ListenerShared::new(Arc::new(listener), &ctx.node, ctx.stamp())?;
    Actor::spawn(None, ListenerActor, shared.clone())
        .await
        .map_err(|e| ListenerError::Start(e.to_string()))?;
    Ok(ListenerHandle { shared })
}

impl ListenerHandle {
    fn actor(&self) -> Result<ActorRef<ListenerMsg>, ListenerError> {
        self.shared.actor.get().ok_or(ListenerError::NotRunning)
    }

    /// The listener's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The queue's name on the broker (stable across reconnects).
    pub fn queue_name(&self) -> String {
        self.shared.topology.lock().queue_name.clone()
    }

    /// The current bindings, including those added at run time.
    pub fn bindings(&self) -> Vec<Binding> {
        self.shared.topology.lock().bindings.clone()
    }

    pub fn is_consuming(&self) -> bool {
        *self.shared.consuming.borrow()
    }

    /// Waits until the listener consumes (or stops consuming), up to `timeout`.
    pub async fn wait_consuming(&self, consuming: bool, timeout: Duration) -> bool {
        let mut rx = self.shared.consuming.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c == consuming))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The channel the topology is declared on, if there is one now.
    pub fn channel(&self) -> Option<Channel> {
        self.shared.channel.borrow().clone()
    }

    /// The broker and lease generation of the current channel.
    pub fn current(&self) -> Option<(BrokerId, u64)> {
        *self.shared.current.read()
    }

    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.shared.stats;
        StatsSnapshot {
            received: s.received.get(),
            acked: s.acked.get(),
            requeued: s.requeued.get(),
            rejected: s.rejected.get(),
            handler_panics: s.handler_panics.get(),
            undecodable: s.undecodable.get(),
            redelivery_limit: s.redelivery_limit.get(),
            suppressed: s.suppressed.get(),
            unmatched: s.unmatched.get(),
            parked: s.parked.get(),
            deferred: s.deferred.get(),
            notice_panics: s.notice_panics.get(),
        }
    }

    /// What the listener's actor says about itself (a round trip to the actor, so it
    /// reflects every change the actor made before).
    pub async fn status(&self) -> Result<ListenerStatus, ListenerError> {
        let actor = self.actor()?;
        ractor::call_t!(actor, ListenerMsg::Status, CALL_TIMEOUT.as_millis() as u64)
            .map_err(|_| ListenerError::NotRunning)
    }

    /// Adds a binding now (and on every later channel).
    pub async fn add_binding(&self, binding: Binding) -> Result<(), ListenerError> {
        let actor = self.actor()?;
        ractor::call_t!(
            actor,
            ListenerMsg::AddBinding,
            CALL_TIMEOUT.as_millis() as u64,
            binding
        )
        .map_err(|_| ListenerError::NotRunning)?
    }

    /// Removes a binding; false if the listener did not have it.
    pub async fn remove_binding(&self, binding: Binding) -> Result<bool, ListenerError> {
        Ok(self.remove_binding_cleanly(binding).await?.existed)
    }

    /// Removes a binding and says whether it is gone from every broker the queue may
    /// have had it on (pool workers are reused only then).
    pub(crate) async fn remove_binding_cleanly(
        &self,
        binding: Binding,
    ) -> Result<Removed, ListenerError> {
        let actor = self.actor()?;
        ractor::call_t!(
            actor,
            ListenerMsg::RemoveBinding,
            CALL_TIMEOUT.as_millis() as u64,
            binding
        )
        .map_err(|_| ListenerError::NotRunning)?
    }

    /// Adds a responder for (`category`, `name`) (`"*"` = any).
    pub fn add_responder<F, Fut>(
        &self,
        category: impl Into<String>,
        name: impl Into<String>,
        handler: F,
    ) -> ResponderId
    where
        F: Fn(Event) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = HandlerResult> + Send + 'static,
    {
        self.shared.responders.write().add(category, name, handler)
    }

    pub fn remove_responder(&self, id: ResponderId) -> bool {
        self.shared.responders.write().remove(id)
    }

    /// Publishes through the broker the listener consumes from (waiting, within
    /// `options.timeout`, for a channel if the listener is between channels), on that
    /// broker's publish connection, and waits for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        envelope: Envelope,
        options: PublishOptions,
    ) -> Result<Published, PublishError> {
        let deadline = tokio::time::Instant::now() + options.timeout;
        let mut rx = self.shared.channel.subscribe();
        let ready = tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some))
            .await
            .is_ok_and(|r| r.is_ok());
        let broker = self.current().map(|(broker, _)| broker);
        let (true, Some(broker)) = (ready, broker) else {
            return Err(PublishError::Channel(format!(
                "listener `{}` has no channel",
                self.shared.name
            )));
        };
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let options = PublishOptions {
            timeout: remaining,
            ..options
        };
        self.shared
            .settings
            .publisher
            .to_broker(broker)
            .publish(exchange, routing_key, envelope, options)
            .await
    }

    /// Stops consuming (messages already received are handled); stays paused across
    /// reconnects until [`ListenerHandle::resume`].
    pub async fn pause(&self) -> Result<(), ListenerError> {
        let actor = self.actor()?;
        ractor::call_t!(actor, ListenerMsg::Pause, CALL_TIMEOUT.as_millis() as u64)
            .map_err(|_| ListenerError::NotRunning)
    }

    pub async fn resume(&self) -> Result<(), ListenerError> {
        let actor = self.actor()?;
        ractor::call_t!(actor, ListenerMsg::Resume, CALL_TIMEOUT.as_millis() as u64)
            .map_err(|_| ListenerError::NotRunning)?
    }

    /// Stops a listener started with [`spawn_listener`] gracefully and waits for it.
    pub async fn stop(&self) -> Result<(), ListenerError> {
        let actor = self.actor()?;
        let bound = self.shared.settings.stop_timeout + Duration::from_secs(5);
        actor
            .stop_and_wait(Some("stopped by its handle".to_string()), Some(bound))
            .await
            .map_err(|_| ListenerError::NotRunning)
    }
}
