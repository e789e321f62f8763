//! The state a listener's handle, actor and consumer loops share: what the listener is
//! (name, settings, topology, responders), what happened to its messages (counters,
//! failure counts), what it runs on now (consuming, channel, broker and grant), and the
//! context of one grant that a consumer loop and its messages' work share.
//!
//! Owns: building that state from a spec and the node's configuration. Must not touch: the
//! actor (the handle holds the actor's address, not this state), the broker.

use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use lapin::Channel;
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;
use warren_runtime::assignments::ChannelKind;
use warren_runtime::broker::{Broker, BrokerId};
use warren_runtime::envelope::Stamp;
use warren_runtime::exchanges::TARGETED;
use warren_runtime::metrics::Histogram;
use warren_runtime::node::NodeContext;
use warren_runtime::publisher::Publisher;

use super::Listener;
use super::acks::AckPolicy;
use super::dedup::Window;
use super::redelivery::FailureCounts;
use super::responders::Responders;
use super::spec::{Binding, Exchange, QueueName, QueueSpec};
use super::status::StatsSnapshot;
use super::topology::{self, Topology};
use super::validate::{SpecDefaults, SpecError};

/// A counter readable while it is being updated.
#[derive(Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    pub fn increment(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
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
    pub unconfirmed: Counter,
    /// Messages acked without running the handlers: handled already (dedup window).
    pub duplicates: Counter,
}

impl Stats {
    /// A copy of the counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            received: self.received.get(),
            acked: self.acked.get(),
            requeued: self.requeued.get(),
            rejected: self.rejected.get(),
            handler_panics: self.handler_panics.get(),
            undecodable: self.undecodable.get(),
            redelivery_limit: self.redelivery_limit.get(),
            suppressed: self.suppressed.get(),
            unmatched: self.unmatched.get(),
            parked: self.parked.get(),
            deferred: self.deferred.get(),
            notice_panics: self.notice_panics.get(),
            unconfirmed: self.unconfirmed.get(),
            duplicates: self.duplicates.get(),
        }
    }
}

/// Settings fixed when the listener is created.
pub(crate) struct Settings {
    pub ack: AckPolicy,
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

/// State shared by a listener's handle, actor and consumer loops; it outlives restarts
/// of the actor.
pub(crate) struct ListenerShared {
    pub name: String,
    /// Prefix of consumer tags (unique per listener instance).
    pub consumer_tag: String,
    pub listener: Arc<dyn Listener>,
    pub settings: Settings,
    pub topology: Mutex<Topology>,
    /// Shared with the listener's federators, which run the same responders.
    pub responders: Arc<RwLock<Responders>>,
    pub stats: Stats,
    /// How long the handlers of one message ran (confirms not included); `None` when the
    /// node keeps no histograms.
    pub handler_seconds: Option<Histogram>,
    /// How long fail-back drains took, from the fail-back to the old grant given back.
    pub drain_seconds: Option<Histogram>,
    /// The in-flight counts of the running consumer loops (one per grant consumed); a
    /// loop's count goes when the loop and its actor let go.
    pub in_flight_counts: Mutex<Vec<Weak<AtomicUsize>>>,
    pub failures: FailureCounts,
    /// The de-duplication window, shared by every consumer loop of the listener.
    pub dedup: Option<Arc<Window>>,
    pub consuming: watch::Sender<bool>,
    /// The channel the topology is declared on, for publishing outside events.
    pub channel: watch::Sender<Option<Channel>>,
    /// Where the current channel is, while there is one.
    pub current: RwLock<Option<Current>>,
    /// What the listener was built from, for building its federators.
    pub origin: Origin,
}

/// Where a listener's current channel is: its broker, its grant, and the generation of
/// the broker connection it lives on (for the status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Current {
    pub broker: BrokerId,
    pub grant: u64,
    pub connection: u64,
}

/// The node, stamp and queue rule a listener was built with; its federators are built
/// from the same.
#[derive(Clone)]
pub(crate) struct Origin {
    pub node: NodeContext,
    pub stamp: Stamp,
    pub quorum_queues: bool,
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
    /// Counts the messages in flight of a new consumer loop among the listener's.
    pub fn track_in_flight(&self, in_flight: &Arc<AtomicUsize>) {
        let mut all = self.in_flight_counts.lock();
        all.retain(|count| count.strong_count() > 0);
        all.push(Arc::downgrade(in_flight));
    }

    /// Messages received and not settled yet, over every consumer loop running now.
    pub fn in_flight(&self) -> usize {
        let mut all = self.in_flight_counts.lock();
        all.retain(|count| count.strong_count() > 0);
        all.iter()
            .filter_map(Weak::upgrade)
            .map(|count| count.load(Ordering::Relaxed))
            .sum()
    }

    /// `quorum_queues`: a named queue is declared as a quorum queue whatever the spec
    /// says (`[apps.<name>] quorum_queues`).
    pub fn new(
        listener: Arc<dyn Listener>,
        node: &NodeContext,
        stamp: Stamp,
        quorum_queues: bool,
    ) -> Result<Arc<Self>, SpecError> {
        let origin = Origin {
            node: node.clone(),
            stamp,
            quorum_queues,
        };
        Self::build(listener, origin, None)
    }

    /// As [`ListenerShared::new`]; `responders`: another listener's table to run instead
    /// of the spec's (a federator runs its parent's).
    pub fn build(
        listener: Arc<dyn Listener>,
        origin: Origin,
        responders: Option<Arc<RwLock<Responders>>>,
    ) -> Result<Arc<Self>, SpecError> {
        let (node, stamp, quorum_queues) =
            (&origin.node, origin.stamp.clone(), origin.quorum_queues);
        let spec = listener.spec();
        let config = &node.listeners;
        spec.validate(SpecDefaults {
            prefetch: config.prefetch,
        })?;
        let suffix = warren_runtime::envelope::new_msg_id();
        let unique = &suffix[..12];
        let short_name = cut(&spec.name, NAME_IN_TAGS);
        let mut queue = spec.queue.clone();
        if quorum_queues
            && matches!(queue.name, QueueName::Named(_))
            && !queue.exclusive
            && !queue.is_quorum()
        {
            queue = queue.quorum();
        }
        let queue_name = match &spec.queue.name {
            QueueName::Named(name) => name.clone(),
            QueueName::Anonymous => {
                format!("{short_name}-{}-{unique}", node.node)
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
        let mut topology = Topology {
            exchanges,
            queue: queue.clone(),
            queue_name,
            bindings,
            exclusive_consumer: spec.exclusive_consumer,
            paused: false,
            parking_first: None,
        };
        let parking = topology::parking_queue(&topology, &spec.name);
        if queue.is_quorum() && !queue.has_dead_letter_exchange() {
            // What passes the broker's delivery limit goes to the parking queue, not away.
            topology.queue = queue
                .clone()
                .dead_letter_exchange("")
                .dead_letter_routing_key(&parking);
            topology.parking_first = Some(parking.clone());
        }
        let (consuming, _) = watch::channel(false);
        let (channel, _) = watch::channel(None);
        let prefetch = spec.prefetch.unwrap_or(config.prefetch);
        Ok(Arc::new(ListenerShared {
            consumer_tag: format!("{short_name}.{}.{unique}", node.node),
            name: spec.name.clone(),
            settings: Settings {
                ack: AckPolicy::new(spec.ack),
                concurrency: spec.concurrency,
                prefetch,
                max_redeliveries: spec
                    .max_redeliveries
                    .unwrap_or(config.listener.max_redeliveries),
                stop_timeout: config.listener.stop_timeout,
                publish_timeout: config.listener.publish_timeout,
                operation_timeout: config.operation_timeout,
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
            responders: responders.unwrap_or_else(|| Arc::new(RwLock::new(spec.responders))),
            stats: Stats::default(),
            handler_seconds: node.metrics.seconds(),
            drain_seconds: node.metrics.seconds(),
            in_flight_counts: Mutex::new(Vec::new()),
            failures: FailureCounts::default(),
            dedup: spec.dedup.map(Window::new),
            consuming,
            channel,
            current: RwLock::new(None),
            listener,
            origin,
        }))
    }
}

/// The queue's `x-expires`, if it has one.
fn expiry_of(queue: &QueueSpec) -> Option<Duration> {
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

/// The grant a consumer loop runs on, shared with its messages' work.
pub(crate) struct GrantContext {
    pub grant: u64,
    /// The generation of the broker connection the channel lives on.
    pub connection: u64,
    pub channel: Channel,
    pub broker: Arc<Broker>,
    /// The listener's publisher pinned to this broker (replies, parking).
    pub publisher: Publisher,
    /// The parking queue was declared on this channel.
    pub parking_declared: AtomicBool,
}
