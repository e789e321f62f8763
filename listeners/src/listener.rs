//! The listener behaviour (Kazoo's gen_listener): what an app implements to consume.
//!
//! A [`Listener`] declares, in one place ([`ListenerSpec`]), its exchanges, queue, bindings,
//! prefetch, ack mode, concurrency, channel kind and responders. warren does the rest:
//! it gets a channel from assignments, replays the topology on it (exchanges → queue →
//! qos → bindings → consume), decodes each delivery as a kapi envelope, runs the matching
//! responders, acks / nacks / rejects by their outcome, replays everything on a new channel
//! after any loss, and stops gracefully.
//!
//! Files, from what the app declares to what runs:
//! - `spec` (declarations) and `validate` (the rules a spec must follow);
//! - `shared` (the state handle, actor and consumer loops share: settings, topology,
//!   responders, counters, the grant a loop runs on) and `status` (what a listener
//!   reports: errors, status, counters);
//! - one delivery, top to bottom: `consumer` (the delivery loop) → `event` (what a
//!   handler receives) → `handling` (the hook and the responders, shared with the test kit)
//!   → `responders` (matching) → `confirms` (the confirms its publishes owe, awaited after
//!   the handlers) → `acks` (the ack-mode policy and coalesced acknowledgements), all
//!   speaking `outcome` (what happens to the message), with `redelivery` (counting handler failures) and `parking`
//!   (messages that cannot succeed);
//! - `topology` (replay on a channel, every step bounded), `drain` (the fail-back drain's
//!   decisions), `refusals` (declarations the broker refused), `actor` (grants, run-time
//!   changes, stop; it gets the consumer loop's end as a message) and `handle` (what apps
//!   and tests hold).

mod acks;
mod actor;
mod confirms;
mod consumer;
mod dedup;
mod drain;
mod event;
mod federation;
mod figures;
mod handle;
pub(crate) mod handling;
mod outcome;
mod parking;
mod redelivery;
mod refusals;
mod responders;
mod shared;
mod spec;
mod status;
mod topology;
mod validate;

pub(crate) use actor::stop_wish;
pub use confirms::Pending;
pub use dedup::Dedup;
pub(crate) use dedup::{Seen, Window};
pub(crate) use event::Recorder;
pub use event::{DeliveryInfo, Event, Recorded};
pub(crate) use handle::node_listener_child;
pub use handle::{ListenerHandle, listener_child, spawn_listener};
pub use outcome::Outcome;
pub use responders::{HandlerError, HandlerFn, HandlerResult, ResponderId, Responders};
pub use spec::{
    AckMode, Binding, Exchange, ListenerSpec, QUORUM_DELIVERY_LIMIT, QueueName, QueueSpec,
};
pub use status::{ListenerError, ListenerStatus, StatsSnapshot};
pub(crate) use validate::SpecDefaults;
pub use validate::SpecError;
pub use warren_runtime::confirm::{Published, Returned};

/// What an app implements to consume messages.
///
/// Only [`Listener::spec`] is required. The hooks run on warren's tasks, so keep them quick;
/// use interior mutability for any state they keep.
pub trait Listener: Send + Sync + 'static {
    /// Everything the listener declares (called once, when the listener is created).
    fn spec(&self) -> ListenerSpec;

    /// Sees each decoded event before the responders; [`Dispatch::Suppress`] skips them
    /// (the message is acknowledged).
    fn on_event(&self, _event: &Event) -> Dispatch {
        Dispatch::Responders
    }

    /// Lifecycle notices, in the order they happen.
    fn on_notice(&self, _notice: &Notice) {}

    /// A decoded event leaves the queue for good because its handlers failed: a handler
    /// rejected it, or it failed more than `max_redeliveries` times (Broadway's
    /// `handle_failed`). Runs before the message is dead-lettered or parked, with the
    /// reason warren records; a panic here is logged and ignored. At least once per such
    /// message: if parking fails, the message goes back to the queue and may fail again.
    fn on_failed(&self, _event: &Event, _reason: &str) {}
}

/// A spec alone is a listener without hooks (`ctx.listener(ListenerSpec::new(..)…)`), for
/// apps whose listeners are only a declaration and responders (apps/tickets).
impl Listener for ListenerSpec {
    fn spec(&self) -> ListenerSpec {
        self.clone()
    }
}

/// What [`Listener::on_event`] decides for one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dispatch {
    /// Run the matching responders.
    Responders,
    /// Skip them; the message is acknowledged.
    Suppress,
}

/// Lifecycle notices, delivered to [`Listener::on_notice`].
#[derive(Clone, Debug)]
pub enum Notice {
    /// The queue was declared (after every new channel; an anonymous queue keeps its name).
    QueueCreated { queue: String, broker: String },
    /// Consuming started (`true`) or stopped (`false`: channel lost, paused, stopping).
    Consuming(bool),
    /// The channel was lost; warren is getting a new one and will replay the topology.
    ChannelLost,
    /// A mandatory publish from a handler could not be routed and came back.
    Returned(Returned),
    /// Every federator whose broker is up consumes (after one did not): federated
    /// bindings are served from every reachable zone. Kazoo's `federators_consuming`.
    FederatorsConsuming,
}
