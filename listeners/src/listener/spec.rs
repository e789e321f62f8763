//! What a listener declares, in one place: exchanges, its queue and queue options,
//! bindings, prefetch, ack mode, handler concurrency, channel kind and responders.
//!
//! A [`ListenerSpec`] is plain data plus responders. The listener keeps its own copy of the
//! topology, changes it at run time (bindings added and removed), and replays all of it on
//! every new channel, so nothing depends on the broker remembering anything.

use std::time::Duration;

use lapin::ExchangeKind;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use warren_runtime::assignments::ChannelKind;

use super::dedup::Dedup;
use super::responders::{HandlerFn, Responders};

/// An exchange the listener declares (on every channel) before its queue.
#[derive(Clone, Debug, PartialEq)]
pub struct Exchange {
    pub name: String,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    /// Declared passively: the exchange must exist already (someone else declares it);
    /// warren checks it is there and never creates or changes it.
    pub passive: bool,
    pub arguments: FieldTable,
}

impl Exchange {
    /// An exchange of the given kind; transient and not auto-deleted, as Kazoo declares
    /// them. Declare an exchange `durable()` when a durable queue is bound to it: a
    /// transient exchange (and with it the binding) is gone after a broker restart.
    pub fn new(name: impl Into<String>, kind: ExchangeKind) -> Self {
        Exchange {
            name: name.into(),
            kind,
            durable: false,
            auto_delete: false,
            internal: false,
            passive: false,
            arguments: FieldTable::default(),
        }
    }

    /// An exchange another party declares: the listener binds to it and checks that it
    /// exists (a passive declare), but never creates it. Its kind does not matter.
    pub fn existing(name: impl Into<String>) -> Self {
        Exchange {
            passive: true,
            ..Exchange::new(name, ExchangeKind::Topic)
        }
    }

    pub fn topic(name: impl Into<String>) -> Self {
        Exchange::new(name, ExchangeKind::Topic)
    }

    pub fn direct(name: impl Into<String>) -> Self {
        Exchange::new(name, ExchangeKind::Direct)
    }

    pub fn fanout(name: impl Into<String>) -> Self {
        Exchange::new(name, ExchangeKind::Fanout)
    }

    pub fn headers(name: impl Into<String>) -> Self {
        Exchange::new(name, ExchangeKind::Headers)
    }

    /// Survives a broker restart.
    pub fn durable(mut self) -> Self {
        self.durable = true;
        self
    }

    /// The same exchange with the flags an operator fixed for it (`[exchanges.<name>]`).
    pub(crate) fn overridden(mut self, config: &warren_runtime::config::ListenerSettings) -> Self {
        if self.passive {
            return self;
        }
        if let Some(fixed) = config.exchange(&self.name) {
            self.durable = fixed.durable.unwrap_or(self.durable);
            self.auto_delete = fixed.auto_delete.unwrap_or(self.auto_delete);
        }
        self
    }
}

/// How the listener's queue is named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueName {
    /// Exactly this name (shared with other consumers of the same name).
    Named(String),
    /// A unique name the listener generates once and re-uses after every reconnect
    /// (never a server-generated `amq.gen-*` name, which cannot be re-declared).
    Anonymous,
}

/// Deliveries of one message a quorum queue made by [`QueueSpec::quorum`] allows before
/// the broker dead-letters it (to the parking queue): well above `max_redeliveries`
/// (default 5), so that warren's own count decides in every case but a consumer that
/// never comes to a verdict.
pub const QUORUM_DELIVERY_LIMIT: u32 = 50;

/// The listener's queue and its options.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueSpec {
    pub name: QueueName,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    /// Queue arguments (`x-queue-type`, `x-dead-letter-exchange`, …). warren adds no
    /// limit of its own: no silent max-length or TTL.
    pub arguments: FieldTable,
}

impl QueueSpec {
    /// A named queue: transient, not exclusive, not auto-deleted.
    pub fn named(name: impl Into<String>) -> Self {
        QueueSpec {
            name: QueueName::Named(name.into()),
            durable: false,
            exclusive: false,
            auto_delete: false,
            arguments: FieldTable::default(),
        }
    }

    /// A queue of this listener alone. It is deleted when the listener stops, and expires
    /// after `[listener] anonymous_queue_expiry_ms` unused (its node died; a live listener
    /// re-declares it well within that time, also while paused); it is not auto-deleted,
    /// so pausing the listener or a short broker connection gap keeps it and its messages.
    ///
    /// It is durable (with that expiry): RabbitMQ 4 deprecates transient queues that are
    /// not exclusive and refuses them from 4.3, and an exclusive queue could not be drained
    /// from another connection at fail-back.
    pub fn anonymous() -> Self {
        QueueSpec {
            name: QueueName::Anonymous,
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: FieldTable::default(),
        }
    }

    /// The broker deletes the queue after it has been unused (no consumer, no declare)
    /// this long (`x-expires`).
    pub fn expires(self, after: Duration) -> Self {
        let millis = u32::try_from(after.as_millis()).unwrap_or(u32::MAX);
        self.argument("x-expires", AMQPValue::LongUInt(millis))
    }

    /// Survives a broker restart (its persistent messages too).
    pub fn durable(mut self) -> Self {
        self.durable = true;
        self
    }

    /// Only this connection may use the queue; deleted with it.
    pub fn exclusive(mut self) -> Self {
        self.exclusive = true;
        self
    }

    /// Deleted once its last consumer is gone.
    pub fn auto_delete(mut self, auto_delete: bool) -> Self {
        self.auto_delete = auto_delete;
        self
    }

    /// Any queue argument.
    pub fn argument(mut self, key: &str, value: AMQPValue) -> Self {
        self.arguments.insert(ShortString::from(key), value);
        self
    }

    /// A quorum queue: durable, replicated, counting deliveries in `x-delivery-count`
    /// (which then drives `max_redeliveries`), with defaults that lose nothing:
    ///
    /// - `x-delivery-limit` = [`QUORUM_DELIVERY_LIMIT`], a backstop above the listener's
    ///   own limit for a message that never reaches a handler's verdict (a process that
    ///   crashes on it, again and again). RabbitMQ 4 sets a limit of 20 by default and
    ///   drops what passes it; here what passes it is dead-lettered, not dropped:
    /// - unless the spec names a dead-letter exchange of its own, the listener points the
    ///   queue's dead-lettering at its parking queue (`<queue>.parked`, declared first),
    ///   through the default exchange;
    /// - `x-dead-letter-strategy = at-least-once` (with `x-overflow = reject-publish`,
    ///   which it needs), so the broker keeps a dead-lettered message until the parking
    ///   queue confirmed it.
    ///
    /// Messages warren itself parks or rejects take the usual way (see `max_redeliveries`).
    /// A queue that already exists with other arguments is refused by the broker (406,
    /// reported as a mismatch): declare it the same way, or delete it.
    pub fn quorum(self) -> Self {
        let text = |value: &str| AMQPValue::LongString(LongString::from(value));
        self.durable()
            .auto_delete(false)
            .argument("x-queue-type", text("quorum"))
            .argument(
                "x-delivery-limit",
                AMQPValue::LongUInt(QUORUM_DELIVERY_LIMIT),
            )
            .argument("x-dead-letter-strategy", text("at-least-once"))
            .argument("x-overflow", text("reject-publish"))
    }

    /// Rejected messages (and messages past the redelivery limit) go to this exchange.
    pub fn dead_letter_exchange(self, exchange: &str) -> Self {
        self.argument(
            "x-dead-letter-exchange",
            AMQPValue::LongString(LongString::from(exchange)),
        )
    }

    /// Whether the queue is a quorum queue (the broker counts deliveries in
    /// `x-delivery-count`, which warren then trusts).
    pub fn is_quorum(&self) -> bool {
        matches!(
            self.arguments.inner().get("x-queue-type"),
            Some(AMQPValue::LongString(kind)) if kind.as_bytes() == b"quorum"
        )
    }

    /// Whether rejected messages go to a dead-letter exchange of the queue's own.
    pub fn has_dead_letter_exchange(&self) -> bool {
        self.arguments
            .inner()
            .contains_key("x-dead-letter-exchange")
    }

    /// Routing key for dead-lettered messages (defaults to their own).
    pub fn dead_letter_routing_key(self, routing_key: &str) -> Self {
        self.argument(
            "x-dead-letter-routing-key",
            AMQPValue::LongString(LongString::from(routing_key)),
        )
    }
}

/// One binding of the listener's queue.
#[derive(Clone, Debug, PartialEq)]
pub struct Binding {
    pub exchange: String,
    pub routing_key: String,
    pub arguments: FieldTable,
    /// Also consumed on every broker of the other zones, by the listener's federators
    /// (Kazoo's `federate`); bound locally as well.
    pub federated: bool,
}

impl Binding {
    pub fn new(exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        Binding {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            arguments: FieldTable::default(),
            federated: false,
        }
    }

    /// Marks the binding federated (or not, with `false`): see [`Binding::federated`].
    pub fn federate(mut self, federated: bool) -> Self {
        self.federated = federated;
        self
    }

    /// The same binding as a federator declares it on a remote broker: not federated
    /// again from there.
    pub fn remote_copy(&self) -> Binding {
        self.clone().federate(false)
    }
}

/// When a message is acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AckMode {
    /// After the responders finished: ok → ack, retry → nack + requeue, reject → reject.
    #[default]
    Manual,
    /// As soon as the message is received, before the responders run (at most once).
    OnReceipt,
    /// The broker considers a message delivered once sent (`no_ack`); prefetch has no
    /// effect in this mode.
    Broker,
}

/// Everything a listener declares.
#[derive(Clone)]
pub struct ListenerSpec {
    /// Used in logs, queue names and consumer tags.
    pub name: String,
    pub exchanges: Vec<Exchange>,
    pub queue: QueueSpec,
    pub bindings: Vec<Binding>,
    /// Exchanges the queue is also bound to with its own name as the routing key (how
    /// requesters reach it: `targeted` + `Server-ID`).
    pub own_queue_bindings: Vec<String>,
    /// `basic.qos`; `None` = `[amqp] prefetch`.
    pub prefetch: Option<u16>,
    pub ack: AckMode,
    /// Messages handled at once. 1 keeps the order of the queue.
    pub concurrency: usize,
    pub channel: ChannelKind,
    /// Consume exclusively (no other consumer may use the queue).
    pub exclusive_consumer: bool,
    /// `None` = `[listener] max_redeliveries`.
    pub max_redeliveries: Option<u32>,
    /// A federator's named queue keeps the listener's queue name on the remote broker
    /// (one queue shared by every zone), instead of `<queue>-<local zone>` (one per
    /// consuming zone). Kazoo's `federated_queue_name_is_global`.
    pub federated_name_is_global: bool,
    /// The de-duplication window, if the listener opts into one ([`ListenerSpec::dedup`]).
    pub dedup: Option<Dedup>,
    pub responders: Responders,
}

impl ListenerSpec {
    /// A listener with an anonymous queue, no bindings and no responders yet.
    pub fn new(name: impl Into<String>) -> Self {
        ListenerSpec {
            name: name.into(),
            exchanges: Vec::new(),
            queue: QueueSpec::anonymous(),
            bindings: Vec::new(),
            own_queue_bindings: Vec::new(),
            prefetch: None,
            ack: AckMode::Manual,
            concurrency: 1,
            channel: ChannelKind::Float,
            exclusive_consumer: false,
            max_redeliveries: None,
            federated_name_is_global: false,
            dedup: None,
            responders: Responders::default(),
        }
    }

    pub fn queue(mut self, queue: QueueSpec) -> Self {
        self.queue = queue;
        self
    }

    pub fn exchange(mut self, exchange: Exchange) -> Self {
        if !self.exchanges.iter().any(|e| e.name == exchange.name) {
            self.exchanges.push(exchange);
        }
        self
    }

    /// Binds the queue to `exchange` with `routing_key`.
    pub fn bind(self, exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        self.binding(Binding::new(exchange, routing_key))
    }

    /// Binds the queue to `exchange` with the queue's own name as the routing key (e.g.
    /// `targeted`, so that replies to this listener's `Server-ID` reach it).
    pub fn bind_own_queue(mut self, exchange: impl Into<String>) -> Self {
        let exchange = exchange.into();
        if !self.own_queue_bindings.contains(&exchange) {
            self.own_queue_bindings.push(exchange);
        }
        self
    }

    /// Binds the queue to `exchange` with `routing_key`, and federates that binding: every
    /// broker of the other zones gets a federator consuming it there (Kazoo's `federate`).
    pub fn federate(self, exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        self.binding(Binding::new(exchange, routing_key).federate(true))
    }

    /// Federated queues keep the listener's queue name on remote brokers (see
    /// [`ListenerSpec::federated_name_is_global`]).
    pub fn federated_name_is_global(mut self) -> Self {
        self.federated_name_is_global = true;
        self
    }

    pub fn binding(mut self, binding: Binding) -> Self {
        if !self.bindings.contains(&binding) {
            self.bindings.push(binding);
        }
        self
    }

    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = Some(prefetch);
        self
    }

    pub fn ack(mut self, ack: AckMode) -> Self {
        self.ack = ack;
        self
    }

    /// How many messages are handled at once: at least 1 and at most the prefetch (the
    /// app's start fails otherwise). Above 1, a message's handlers start on the delivery
    /// loop and go on in a task of their own from their first wait: CPU-heavy work before
    /// that wait holds the loop, so it belongs in `tokio::task::spawn_blocking`.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Float (default) or sticky to a broker or a broker tag.
    pub fn channel(mut self, kind: ChannelKind) -> Self {
        self.channel = kind;
        self
    }

    pub fn exclusive_consumer(mut self) -> Self {
        self.exclusive_consumer = true;
        self
    }

    pub fn max_redeliveries(mut self, max: u32) -> Self {
        self.max_redeliveries = Some(max);
        self
    }

    /// Effectively once: a message whose Msg-ID was handled successfully within the window
    /// (a redelivery after a lost channel or a failover, or a re-sent copy) is acked
    /// without running the handlers again (see [`Dedup`]).
    pub fn dedup(mut self, window: Dedup) -> Self {
        self.dedup = Some(window);
        self
    }

    /// Runs `handler` for every event whose `Event-Category` and `Event-Name` match;
    /// `"*"` matches a whole field.
    pub fn responder(
        mut self,
        category: impl Into<String>,
        name: impl Into<String>,
        handler: impl HandlerFn,
    ) -> Self {
        self.responders.add(category, name, handler);
        self
    }
}
