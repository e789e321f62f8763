//! The listener actor: it holds the listener's grant, replays the topology on every new
//! channel (exactly once per grant), runs the consumer loop, applies run-time changes,
//! drains an old grant after a fail-back, keeps a paused queue from expiring, reports its
//! readiness, and stops gracefully.
//!
//! Broker I/O never happens in `pre_start`: the grant request is made in `post_start` and
//! everything else in messages; every broker operation is bounded (a timeout is a lost
//! channel). State shared with the handle (topology, responders, stats) lives in
//! `ListenerShared`; the actor is the only one that changes the topology. It also knows on
//! which brokers each binding may exist, so that removing a binding can tell whether it is
//! gone everywhere (pool workers are reused only then).

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lapin::Channel;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use warren_runtime::actor_slot::ActorSlot;
use warren_runtime::assignments::{Client, Grant, GrantEvent};
use warren_runtime::backoff::Backoff;
use warren_runtime::broker::BrokerId;
use warren_runtime::forward;
use warren_runtime::log_limit::LogLimit;
use warren_runtime::metrics::MetricsEntry;
use warren_runtime::readiness::ReadinessEntry;

use super::figures::ListenerFigures;
use warren_runtime::assignments::ChannelKind;
use warren_runtime::readiness::Readiness;
use warren_runtime::supervisor::{
    ChildSpec, StopDeadline, Supervisor, SupervisorMsg, deadline, spawn_error_reason,
};

use super::Notice;
use super::consumer::{ConsumerLoop, Control, Ended};
use super::drain::{self, Closed, Drain, Step};
use super::federation;
use super::handling::panic_text;
use super::refusals::REFUSALS;
use super::shared::{Current, GrantContext, ListenerShared};
use super::spec::{Binding, QueueName};
use super::status::{ListenerError, ListenerStatus, Removed};
use super::topology::{self, BindingChange, SetupError};

/// Bound for closing a channel (less when the stop deadline is nearer).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Kept out of a stop's budget for what follows the handlers: the last acks, deleting an
/// anonymous queue, closing the channel. A listener asks its parent for
/// `[listener] stop_timeout` plus this.
const CLOSE_RESERVE: Duration = Duration::from_secs(1);

/// What a listener asks of its parent to stop: its handlers' `stop_timeout`, and the time
/// kept for closing.
pub(crate) fn stop_wish(stop_timeout: Duration) -> Duration {
    stop_timeout + CLOSE_RESERVE
}

/// Set-up failures: one line per failing step (e.g. an exchange declared with other flags,
/// which every listener of the node hits) per interval, with a count.
static SETUP_LOGS: LazyLock<LogLimit> = LazyLock::new(LogLimit::default);

/// What a listener's actor starts from: the state shared with its handle, and the slot
/// where it leaves its address for the handle while it runs.
#[derive(Clone)]
pub(crate) struct Started {
    pub shared: Arc<ListenerShared>,
    pub slot: Arc<ActorSlot<ListenerMsg>>,
    /// By when a stop must be done, written by whoever stops the actor.
    pub deadline: StopDeadline,
}

/// The supervised child `id` running a listener actor from `started`; it asks its parent
/// for `stop_wish(stop_timeout)` and stops by the deadline the parent tells it.
pub(crate) fn child_spec(id: String, started: Started) -> ChildSpec {
    let wish = stop_wish(started.shared.settings.stop_timeout);
    let told = started.deadline.clone();
    ChildSpec::actor(id, move || (ListenerActor, started.clone()))
        .shutdown(wish)
        .told(told)
}

/// How long a call to a listener's actor waits for its answer.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One round trip to the listener actor in `slot`, bounded by [`CALL_TIMEOUT`]; one that
/// is not running (or does not answer in time) is `NotRunning`.
pub(crate) async fn ask<T: Send + 'static>(
    slot: &ActorSlot<ListenerMsg>,
    message: impl FnOnce(RpcReplyPort<T>) -> ListenerMsg,
) -> Result<T, ListenerError> {
    let actor = slot.get().ok_or(ListenerError::NotRunning)?;
    let call = actor.call(message, Some(CALL_TIMEOUT)).await;
    let answer = call.map_err(|_| ListenerError::NotRunning)?;
    answer.success_or(ListenerError::NotRunning)
}

/// The running federators of a listener (see `federation`): listener actors like this
/// one, under a supervisor linked to it.
pub(crate) struct Federators {
    supervisor: ActorRef<SupervisorMsg>,
    deadline: StopDeadline,
    members: Vec<Started>,
    watcher: JoinHandle<()>,
}

impl Federators {
    /// Starts one federator per broker of the other zones under a supervisor linked to
    /// the listener's actor `parent`; `None` when there is no other zone. It returns once
    /// they are started, not once they consume: a remote broker that is down delays
    /// nothing.
    async fn start(
        shared: &Arc<ListenerShared>,
        parent: &ActorRef<ListenerMsg>,
    ) -> Result<Option<Federators>, String> {
        let remote = federation::remote_brokers(shared);
        if remote.is_empty() {
            return Ok(None);
        }
        let readiness = Readiness::default();
        let mut children = Vec::with_capacity(remote.len());
        let mut members = Vec::with_capacity(remote.len());
        for broker in remote {
            let id = format!("federator:{}", broker.uri.redacted());
            let federator = federation::federator_shared(shared, broker, &readiness)
                .map_err(|e| e.to_string())?;
            let started = Started {
                shared: federator,
                slot: Arc::default(),
                deadline: StopDeadline::default(),
            };
            children.push(child_spec(id, started.clone()));
            members.push(started);
        }
        let spec = federation::supervisor_spec(shared, children);
        let told = StopDeadline::default();
        let (supervisor, _) = Supervisor::spawn_linked(spec, told.clone(), parent.get_cell())
            .await
            .map_err(|e| spawn_error_reason(&e))?;
        let watched = members
            .iter()
            .filter_map(|m| match m.shared.settings.channel {
                ChannelKind::Broker(broker) => Some(federation::Watched {
                    broker,
                    consuming: m.shared.consuming.subscribe(),
                }),
                _ => None,
            })
            .collect();
        let registry = shared.origin.node.registry.clone();
        let parent = parent.clone();
        let watcher = tokio::spawn(federation::watch_consuming(watched, registry, move || {
            parent.cast(ListenerMsg::FederatorsConsuming).is_ok()
        }));
        tracing::info!(listener = %shared.name, federators = members.len(), "federators started");
        Ok(Some(Federators {
            supervisor,
            deadline: told,
            members,
            watcher,
        }))
    }

    /// The federators' supervisor (its exit reaches the listener's actor).
    fn supervisor(&self) -> ActorId {
        self.supervisor.get_id()
    }

    /// Changes a binding on every federator at once; the errors of those that could not.
    async fn each(
        &self,
        message: impl Fn(Binding) -> BindingMsg,
        binding: &Binding,
    ) -> Vec<ListenerError> {
        let copy = binding.remote_copy();
        let all = self
            .members
            .iter()
            .map(|member| federator_binding(member, message(copy.clone())));
        futures::future::join_all(all)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect()
    }

    /// Waits up to `timeout` until every federator whose broker is up consumes; whether
    /// they all did.
    async fn wait_consuming(&self, timeout: Duration) -> bool {
        let registry = &self
            .members
            .first()
            .map(|m| m.shared.origin.node.registry.clone());
        let Some(registry) = registry else {
            return true;
        };
        let reachable = self
            .members
            .iter()
            .filter(|member| match member.shared.settings.channel {
                ChannelKind::Broker(id) => registry.is_available(id),
                _ => false,
            });
        let waits = reachable.map(|member| {
            let mut consuming = member.shared.consuming.subscribe();
            async move {
                tokio::time::timeout(timeout, consuming.wait_for(|on| *on))
                    .await
                    .is_ok_and(|seen| seen.is_ok())
            }
        });
        futures::future::join_all(waits)
            .await
            .into_iter()
            .all(|on| on)
    }

    /// Stops every federator at once, all by `end`.
    async fn stop(self, end: Instant) {
        self.watcher.abort();
        let end = tokio::time::Instant::from_std(end);
        self.deadline.set(end);
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        let _ = self
            .supervisor
            .stop_and_wait(None, Some(left + deadline::MARGIN))
            .await;
    }
}

impl Drop for Federators {
    /// A listener's actor that fails skips its stop steps: its federators are told to
    /// stop here (by their own deadline), so that its restart does not run a second set
    /// beside them. After [`Federators::stop`] this asks nothing of a stopped supervisor.
    fn drop(&mut self) {
        self.watcher.abort();
        self.supervisor.stop(None);
    }
}

/// Changes one binding of one federator through its actor; one whose actor is not running
/// (being restarted) gets it in its topology, which its next actor declares. An actor that
/// runs but does not answer in time keeps its topology: the change is its own to make.
async fn federator_binding(member: &Started, message: BindingMsg) -> Result<(), ListenerError> {
    if member.slot.get().is_none() {
        return apply_to_topology(member, message);
    }
    let asked = match message.clone() {
        BindingMsg::Add(binding) => ask(&member.slot, |reply| {
            ListenerMsg::AddBinding(binding, reply)
        })
        .await
        .and_then(|added| added),
        BindingMsg::Remove(binding) => ask(&member.slot, |reply| {
            ListenerMsg::RemoveBinding(binding, reply)
        })
        .await
        .and_then(|removed| removed.map(|_| ())),
    };
    match asked {
        // It stopped meanwhile: its next actor declares the change.
        Err(ListenerError::NotRunning) if member.slot.get().is_none() => {
            apply_to_topology(member, message)
        }
        asked => asked,
    }
}

/// Writes a binding change into a stopped federator's topology.
fn apply_to_topology(member: &Started, message: BindingMsg) -> Result<(), ListenerError> {
    let mut topology = member.shared.topology.lock();
    match message {
        BindingMsg::Add(binding) => {
            if !topology.bindings.contains(&binding) {
                topology.bindings.push(binding);
            }
        }
        BindingMsg::Remove(binding) => topology.bindings.retain(|b| b != &binding),
    }
    Ok(())
}

/// A change of one binding, for every federator.
#[derive(Clone)]
enum BindingMsg {
    Add(Binding),
    Remove(Binding),
}

/// Messages of the listener actor.
pub(crate) enum ListenerMsg {
    /// From assignments.
    Grant(GrantEvent),
    /// A consumer loop ended.
    ConsumerEnded {
        grant: u64,
        task: u64,
        ended: Ended,
    },
    /// Check a draining grant.
    DrainCheck {
        grant: u64,
    },
    /// The topology could not be set up on this grant; ask for another channel.
    RetrySetup {
        grant: u64,
    },
    /// Declare the topology on the active grant now (its turn after a refused
    /// declaration came).
    Declare {
        grant: u64,
    },
    /// Re-declare queues that have no consumer (paused), so that they do not expire.
    KeepAlive,
    AddBinding(Binding, RpcReplyPort<Result<(), ListenerError>>),
    RemoveBinding(Binding, RpcReplyPort<Result<Removed, ListenerError>>),
    Pause(RpcReplyPort<()>),
    Resume(RpcReplyPort<Result<(), ListenerError>>),
    Status(RpcReplyPort<ListenerStatus>),
    /// Every federator whose broker is up consumes.
    FederatorsConsuming,
}

/// A consumer loop running on a grant's channel.
struct RunningConsumer {
    task: u64,
    control: watch::Sender<Control>,
    handle: JoinHandle<()>,
    /// A stop was asked for (pause, drain end).
    stopping: bool,
    /// Deliveries received and not settled.
    in_flight: Arc<AtomicUsize>,
}

/// A grant the listener holds.
struct Held {
    context: Arc<GrantContext>,
    /// The topology is declared on this channel.
    ready: bool,
    consumer: Option<RunningConsumer>,
    /// Set for an old grant being drained after a fail-back.
    drain: Option<Drain>,
    /// Set once assignments handed this grant over (it was replaced on fail-back): the
    /// channel goes back to assignments, which closes it, when this is dropped.
    give_back: Option<Client>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(client) = self.give_back.take() {
            client.release(self.context.channel.clone());
        }
    }
}

impl Held {
    fn grant(&self) -> u64 {
        self.context.grant
    }

    fn broker(&self) -> BrokerId {
        self.context.broker.id
    }

    fn channel(&self) -> &Channel {
        &self.context.channel
    }

    /// Asks the consumer to stop (handling what it has); no-op if it is stopping already.
    fn stop_consumer(&mut self, deadline: Option<Instant>) {
        if let Some(consumer) = self.consumer.as_mut().filter(|c| !c.stopping) {
            consumer.stopping = true;
            let _ = consumer.control.send(Control::Stop {
                deadline,
                finish_buffered: true,
            });
        }
    }

    /// The grant is over: the consumer ends at once and its handlers finish on their own.
    /// The channel is not closed here: assignments closes it when it learns the grant is
    /// over (lost, reported lost, given back or replaced). Two closes of one channel racing
    /// each other make the broker answer twice, and lapin then closes the whole connection
    /// over the unexpected `channel.close-ok`.
    fn abandon(mut self) {
        if let Some(consumer) = self.consumer.take() {
            let _ = consumer.control.send(Control::Abandon);
        }
    }
}

/// Where one binding may exist on the brokers (its queue there has it).
struct Placed {
    binding: Binding,
    brokers: BTreeSet<BrokerId>,
}

/// State of the listener actor.
pub(crate) struct ListenerState {
    shared: Arc<ListenerShared>,
    /// Where the handle finds this actor while it runs.
    slot: Arc<ActorSlot<ListenerMsg>>,
    /// By when a stop must be done.
    deadline: StopDeadline,
    client: Option<Client>,
    forward: Option<JoinHandle<()>>,
    keepalive: Option<JoinHandle<()>>,
    active: Option<Held>,
    draining: Vec<Held>,
    next_task: u64,
    setup_failures: u32,
    readiness: ReadinessEntry,
    /// The listener's figures in `/metrics`, while the actor runs.
    _figures: MetricsEntry,
    /// Bindings of the topology and the brokers they were declared on.
    placed: Vec<Placed>,
    /// Bindings removed while some broker's queue may still have them: unbound there when
    /// the listener is next on that broker.
    tombstones: Vec<Placed>,
    /// The refused declaration (broker and step) the last set-up failed on.
    refused: Option<String>,
    /// The federators, while the listener has a federated binding (and other zones).
    federators: Option<Federators>,
}

/// The actor behind a listener.
pub(crate) struct ListenerActor;

/// A little randomness, so that listeners waiting for the same moment do not all act at
/// once.
fn jitter() -> Duration {
    let spread = Duration::from_millis(100);
    Backoff::new(spread, spread).delay(0)
}

/// Adds `broker` to where `binding` may exist.
fn place(list: &mut Vec<Placed>, binding: &Binding, broker: BrokerId) {
    match list.iter_mut().find(|p| &p.binding == binding) {
        Some(placed) => {
            placed.brokers.insert(broker);
        }
        None => list.push(Placed {
            binding: binding.clone(),
            brokers: BTreeSet::from([broker]),
        }),
    }
}

/// Takes `binding`'s entry out of `list`.
fn take_placed(list: &mut Vec<Placed>, binding: &Binding) -> BTreeSet<BrokerId> {
    match list.iter().position(|p| &p.binding == binding) {
        Some(i) => list.remove(i).brokers,
        None => BTreeSet::new(),
    }
}

impl ListenerState {
    fn notice(&self, notice: Notice) {
        let listener = self.shared.listener.clone();
        let shared = &self.shared;
        if let Err(panic) =
            std::panic::catch_unwind(AssertUnwindSafe(|| listener.on_notice(&notice)))
        {
            shared.stats.notice_panics.increment();
            if let Some(held) = SETUP_LOGS.allow(&format!("{}:notice", shared.name)) {
                tracing::error!(listener = %shared.name, ?notice, panic = panic_text(panic.as_ref()), suppressed = held, "on_notice panicked; ignored");
            }
        }
    }

    fn set_consuming(&self, consuming: bool) {
        let changed = self.shared.consuming.send_if_modified(|current| {
            let changed = *current != consuming;
            *current = consuming;
            changed
        });
        if changed {
            self.notice(Notice::Consuming(consuming));
        }
    }

    fn timeout(&self) -> Duration {
        self.shared.settings.operation_timeout
    }

    fn paused(&self) -> bool {
        self.shared.topology.lock().paused
    }

    fn held_mut(&mut self, grant: u64) -> Option<&mut Held> {
        if self.active.as_ref().is_some_and(|h| h.grant() == grant) {
            return self.active.as_mut();
        }
        self.draining.iter_mut().find(|h| h.grant() == grant)
    }

    fn is_active(&self, grant: u64) -> bool {
        self.active.as_ref().is_some_and(|h| h.grant() == grant)
    }

    /// A new grant from assignments.
    async fn granted(&mut self, myself: &ActorRef<ListenerMsg>, grant: Grant) {
        match grant.replaces {
            Some(old) if self.is_active(old) => {
                // Make-before-break: the old grant keeps consuming until drained.
                if let Some(mut held) = self.active.take() {
                    tracing::info!(listener = %self.shared.name, old, new = grant.number, broker = %grant.broker, "moving back to the primary; draining the old grant");
                    // The old grant is ours now: its channel goes back when we are done.
                    held.give_back = self.client.clone();
                    let settings = &self.shared.settings;
                    let anonymous = self.shared.topology.lock().queue.name == QueueName::Anonymous;
                    held.drain = Some(Drain::new(
                        Instant::now(),
                        settings.drain_timeout,
                        settings.fail_back_watch,
                        anonymous,
                    ));
                    self.draining.push(held);
                    myself.send_after(drain::CHECK_EVERY, move || ListenerMsg::DrainCheck {
                        grant: old,
                    });
                }
            }
            Some(_) => {
                // The grant to replace is already gone (its channel went back with
                // `report_lost`): nothing to drain.
                self.drop_active("replaced");
            }
            None => self.drop_active("replaced"),
        }
        self.setup(myself, grant).await;
    }

    /// A new channel: declare everything on it, then consume (unless paused).
    async fn setup(&mut self, myself: &ActorRef<ListenerMsg>, grant: Grant) {
        let context = Arc::new(GrantContext {
            grant: grant.number,
            connection: grant.connection,
            channel: grant.channel,
            publisher: self.shared.settings.publisher.to_broker(grant.broker.id),
            broker: grant.broker,
            parking_declared: AtomicBool::new(false),
        });
        self.active = Some(Held {
            context,
            ready: false,
            consumer: None,
            drain: None,
            give_back: None,
        });
        self.declare(myself).await;
    }

    /// Declares the topology on the active channel, unless a declaration the broker
    /// refused is being probed by another listener: then it waits for its turn.
    async fn declare(&mut self, myself: &ActorRef<ListenerMsg>) {
        let Some(context) = self
            .active
            .as_ref()
            .filter(|h| !h.ready)
            .map(|h| h.context.clone())
        else {
            return;
        };
        let grant = context.grant;
        if let Some(key) = &self.refused
            && let Err(until) = REFUSALS.turn(key, Instant::now())
        {
            let delay = until.saturating_duration_since(Instant::now()) + jitter();
            myself.send_after(delay, move || ListenerMsg::Declare { grant });
            return;
        }
        let topology = self.shared.topology.lock().clone();
        let prefetch = self.shared.settings.ack.qos(self.shared.settings.prefetch);
        let result = topology::declare(&context.channel, &topology, prefetch, self.timeout()).await;
        let broker = context.broker.clone();
        if let Err(error) = result {
            self.setup_failed(myself, grant, &error);
            return;
        }
        if let Some(key) = self.refused.take() {
            REFUSALS.succeeded(&key);
        }
        for binding in &topology.bindings {
            place(&mut self.placed, binding, broker.id);
        }
        self.clear_tombstones(&context).await;
        if let Some(held) = self.active.as_mut() {
            held.ready = true;
            self.shared
                .channel
                .send_replace(Some(held.channel().clone()));
        }
        *self.shared.current.write() = Some(Current {
            broker: broker.id,
            grant,
            connection: context.connection,
        });
        tracing::info!(listener = %self.shared.name, queue = %topology.queue_name, broker = %broker, grant, "topology declared");
        self.notice(Notice::QueueCreated {
            queue: topology.queue_name.clone(),
            broker: broker.uri.redacted().to_string(),
        });
        if topology.paused {
            // Paused on purpose, with everything declared: that is ready.
            self.readiness.ready();
        } else {
            self.start_consumer(myself, grant).await;
        }
    }

    /// Unbinds, on a new channel, the bindings removed while its broker's queue may have
    /// kept them.
    async fn clear_tombstones(&mut self, context: &GrantContext) {
        let queue = self.shared.topology.lock().queue_name.clone();
        let broker = context.broker.id;
        let timeout = self.timeout();
        for tombstone in &mut self.tombstones {
            if !tombstone.brokers.contains(&broker) {
                continue;
            }
            match topology::change_binding(
                &context.channel,
                &queue,
                &tombstone.binding,
                BindingChange::Remove,
                timeout,
            )
            .await
            {
                Ok(()) => {
                    tombstone.brokers.remove(&broker);
                }
                Err(error) => {
                    tracing::debug!(listener = %self.shared.name, %error, "a removed binding stays for now");
                }
            }
        }
        self.tombstones.retain(|t| !t.brokers.is_empty());
    }

    /// The topology could not be declared: ask for another channel after a backoff, so a
    /// persistent error (a missing exchange, an object declared differently elsewhere)
    /// does not spin; the node is not ready meanwhile and says why.
    fn setup_failed(&mut self, myself: &ActorRef<ListenerMsg>, grant: u64, error: &SetupError) {
        self.setup_failures = self.setup_failures.saturating_add(1);
        let delay = if error.is_mismatch() {
            // Every listener needing this object on this broker fails the same way: one
            // probe per round for all of them.
            let broker = self
                .active
                .as_ref()
                .map(|h| h.context.broker.uri.redacted().to_string())
                .unwrap_or_default();
            let key = format!("{broker}|{}", error.step);
            let until = REFUSALS.failed(&key, Instant::now());
            self.refused = Some(key);
            until.saturating_duration_since(Instant::now()) + jitter()
        } else {
            self.refused = None;
            Backoff::new(Duration::from_millis(100), Duration::from_secs(30))
                .delay(self.setup_failures - 1)
        };
        let text = error.to_string();
        self.readiness.not_ready(text.clone());
        if let Some(held) = SETUP_LOGS.allow(&error.step) {
            if error.is_mismatch() {
                tracing::error!(listener = %self.shared.name, error = %text, retry_in_ms = delay.as_millis() as u64, suppressed = held, "a declaration is refused; the listener is not ready");
            } else {
                tracing::warn!(listener = %self.shared.name, grant, error = %text, retry_in_ms = delay.as_millis() as u64, suppressed = held, "cannot set up the listener on this channel");
            }
        }
        myself.send_after(delay, move || ListenerMsg::RetrySetup { grant });
    }

    /// Starts consuming on the held grant `grant` (active or draining).
    async fn start_consumer(&mut self, myself: &ActorRef<ListenerMsg>, grant: u64) {
        let topology = self.shared.topology.lock().clone();
        self.next_task += 1;
        let task = self.next_task;
        let tag = format!("{}.{grant}.{task}", self.shared.consumer_tag);
        let no_ack = self.shared.settings.ack.no_ack();
        let timeout = self.timeout();
        let shared = self.shared.clone();
        let Some(held) = self.held_mut(grant) else {
            return;
        };
        let context = held.context.clone();
        match topology::consume(&context.channel, &topology, &tag, no_ack, timeout).await {
            Ok(consumer) => {
                let (control, control_rx) = watch::channel(Control::Run);
                let in_flight = Arc::new(AtomicUsize::new(0));
                shared.track_in_flight(&in_flight);
                let consumer_loop = ConsumerLoop {
                    tag,
                    context,
                    consumer,
                    queue: topology.queue_name.as_str().into(),
                    shared,
                    control: control_rx,
                    in_flight: in_flight.clone(),
                };
                let actor = myself.clone();
                let handle = tokio::spawn(async move {
                    let ended = consumer_loop.run().await;
                    let _ = actor.cast(ListenerMsg::ConsumerEnded { grant, task, ended });
                });
                if let Some(held) = self.held_mut(grant) {
                    held.consumer = Some(RunningConsumer {
                        task,
                        control,
                        handle,
                        stopping: false,
                        in_flight,
                    });
                }
                if self.is_active(grant) {
                    self.setup_failures = 0;
                    self.set_consuming(true);
                    self.readiness.ready();
                }
            }
            Err(error) if self.is_active(grant) => self.setup_failed(myself, grant, &error),
            Err(error) => {
                tracing::warn!(listener = %self.shared.name, grant, %error, "cannot consume the old queue any more; it is left as it is");
                self.release_draining(grant, false).await;
            }
        }
    }

    /// The active grant is gone: forget it (its handlers finish on their own) and tell
    /// the listener.
    fn drop_active(&mut self, why: &str) {
        if let Some(held) = self.active.take() {
            held.abandon();
            *self.shared.current.write() = None;
            self.shared.channel.send_replace(None);
            self.readiness.not_ready(format!("no channel ({why})"));
            self.notice(Notice::ChannelLost);
            self.set_consuming(false);
        }
    }

    /// A lost channel seen by the listener itself: give it back to assignments, which
    /// replaces it.
    fn lose_active(&mut self, grant: u64, why: &str) {
        if let Some(channel) = self.active_channel(grant) {
            self.drop_active(why);
            if let Some(client) = &self.client {
                client.report_lost(grant, channel);
            }
        }
    }

    /// The channel of the active grant, if `grant` is the active one.
    fn active_channel(&self, grant: u64) -> Option<Channel> {
        self.active
            .as_ref()
            .filter(|h| h.grant() == grant)
            .map(|h| h.channel().clone())
    }

    /// An old grant is done: delete its queue if that was decided (anonymous and empty,
    /// and no newer grant consumes it on the same broker), close it, give it back.
    async fn release_draining(&mut self, grant: u64, delete: bool) {
        let Some(i) = self.draining.iter().position(|h| h.grant() == grant) else {
            return;
        };
        let held = self.draining.remove(i);
        if let (Some(drain), Some(seconds)) = (&held.drain, &self.shared.drain_seconds) {
            seconds.observe(drain.started.elapsed().as_secs_f64());
        }
        let same_broker = self
            .active
            .as_ref()
            .is_some_and(|a| a.broker() == held.broker())
            || self.draining.iter().any(|d| d.broker() == held.broker());
        let deleted = if delete && !same_broker {
            let topology = self.shared.topology.lock().clone();
            topology::delete_if_anonymous(held.channel(), &topology, self.timeout()).await
        } else {
            false
        };
        tracing::info!(listener = %self.shared.name, grant, deleted, "old grant drained and given back");
        // Dropping it gives its channel back to assignments, which closes it.
        held.abandon();
    }

    /// Periodic look at a draining grant.
    async fn drain_check(&mut self, myself: &ActorRef<ListenerMsg>, grant: u64) {
        let paused = self.paused();
        let queue = self.shared.topology.lock().queue_name.clone();
        let timeout = self.timeout();
        let Some(held) = self.draining.iter().find(|h| h.grant() == grant) else {
            return;
        };
        if !held.channel().status().connected() {
            // Its connection died (paused or not, nobody else tells us): done with it.
            tracing::info!(listener = %self.shared.name, grant, "old grant lost while draining; its queue is left as it is");
            self.release_draining(grant, false).await;
            return;
        }
        let closing = held
            .drain
            .as_ref()
            .is_some_and(|d| d.phase == drain::Phase::Closing);
        match &held.consumer {
            // Paused (the drain waits for the resume), or a stop is under way (its end
            // decides): look again later.
            _ if paused => {
                myself.send_after(drain::CHECK_EVERY, move || ListenerMsg::DrainCheck {
                    grant,
                });
                return;
            }
            Some(consumer) if consumer.stopping => {
                myself.send_after(drain::CHECK_EVERY, move || ListenerMsg::DrainCheck {
                    grant,
                });
                return;
            }
            Some(_) => {}
            None if closing => return self.closed_drain(myself, grant).await,
            None => {
                self.start_consumer(myself, grant).await;
                myself.send_after(drain::CHECK_EVERY, move || ListenerMsg::DrainCheck {
                    grant,
                });
                return;
            }
        }
        let in_flight = held
            .consumer
            .as_ref()
            .map_or(0, |c| c.in_flight.load(Ordering::Relaxed));
        let ready = match topology::ready_count(&held.context.channel, &queue, timeout).await {
            Ok(ready) => ready,
            Err(error) => {
                tracing::warn!(listener = %self.shared.name, grant, %error, "the old grant is gone while draining; its queue is left as it is");
                self.release_draining(grant, false).await;
                return;
            }
        };
        let Some(held) = self.draining.iter_mut().find(|h| h.grant() == grant) else {
            return;
        };
        let Some(drain) = held.drain.as_mut() else {
            return;
        };
        match drain.checked(Instant::now(), ready, in_flight) {
            Step::CheckIn(after) => {
                myself.send_after(after, move || ListenerMsg::DrainCheck { grant });
            }
            Step::Close => {
                if ready > 0 || in_flight > 0 {
                    tracing::warn!(listener = %self.shared.name, grant, ready, in_flight, "the drain ran out of time; what is left stays in the old queue");
                }
                let deadline = Instant::now() + self.shared.settings.stop_timeout;
                held.stop_consumer(Some(deadline));
            }
        }
    }

    /// The consumer of a draining grant ended.
    async fn drain_consumer_ended(
        &mut self,
        myself: &ActorRef<ListenerMsg>,
        grant: u64,
        ended: Ended,
    ) {
        let paused = self.paused();
        match ended {
            Ended::Abandoned => {}
            Ended::Lost(_) | Ended::Cancelled => {
                tracing::debug!(listener = %self.shared.name, grant, "old grant lost while draining");
                self.release_draining(grant, false).await;
            }
            Ended::Stopped => {
                let closing = self
                    .draining
                    .iter()
                    .find(|h| h.grant() == grant)
                    .and_then(|h| h.drain.as_ref())
                    .is_some_and(|d| d.phase == drain::Phase::Closing);
                if !closing {
                    // Stopped for a pause: consume again once resumed.
                    if !paused {
                        self.start_consumer(myself, grant).await;
                    }
                    return;
                }
                self.closed_drain(myself, grant).await;
            }
        }
    }

    /// The last look at a drained queue once its consumer stopped.
    async fn closed_drain(&mut self, myself: &ActorRef<ListenerMsg>, grant: u64) {
        let queue = self.shared.topology.lock().queue_name.clone();
        let timeout = self.timeout();
        let Some(held) = self.draining.iter().find(|h| h.grant() == grant) else {
            return;
        };
        let ready = match topology::ready_count(held.channel(), &queue, timeout).await {
            Ok(ready) => ready,
            Err(_) => {
                self.release_draining(grant, false).await;
                return;
            }
        };
        let Some(drain) = self
            .draining
            .iter_mut()
            .find(|h| h.grant() == grant)
            .and_then(|h| h.drain.as_mut())
        else {
            return;
        };
        match drain.closed(Instant::now(), ready) {
            Closed::Release { delete } => self.release_draining(grant, delete).await,
            Closed::DrainAgain => {
                tracing::info!(listener = %self.shared.name, grant, ready, "messages arrived on the old queue; draining them too");
                self.start_consumer(myself, grant).await;
                myself.send_after(drain::CHECK_EVERY, move || ListenerMsg::DrainCheck {
                    grant,
                });
            }
        }
    }

    /// The consumer of grant `grant`, task `task`, ended.
    async fn consumer_ended(
        &mut self,
        myself: &ActorRef<ListenerMsg>,
        grant: u64,
        task: u64,
        ended: Ended,
    ) {
        let Some(held) = self.held_mut(grant) else {
            return;
        };
        if held.consumer.as_ref().is_none_or(|c| c.task != task) {
            return;
        }
        held.consumer = None;
        if !self.is_active(grant) {
            self.drain_consumer_ended(myself, grant, ended).await;
            return;
        }
        match ended {
            Ended::Stopped if self.paused() => self.set_consuming(false),
            // Resumed while the pause's stop was under way: consume again.
            Ended::Stopped => self.start_consumer(myself, grant).await,
            Ended::Abandoned => {}
            Ended::Lost(reason) => {
                tracing::warn!(listener = %self.shared.name, grant, %reason, "consumer failed; asking for a new channel");
                self.lose_active(grant, "the consumer failed");
            }
            Ended::Cancelled => {
                tracing::warn!(listener = %self.shared.name, grant, "the broker cancelled the consumer; setting up again on a new channel");
                self.lose_active(grant, "the broker cancelled the consumer");
            }
        }
    }

    /// After a set-up failure's backoff: give the channel back and ask for another.
    fn retry_setup(&mut self, grant: u64) {
        let still_failing = self
            .active
            .as_ref()
            .is_some_and(|h| h.grant() == grant && !h.ready);
        if still_failing && let Some(held) = self.active.take() {
            let channel = held.channel().clone();
            held.abandon();
            *self.shared.current.write() = None;
            self.shared.channel.send_replace(None);
            if let Some(client) = &self.client {
                client.report_lost(grant, channel);
            }
        }
    }

    /// Re-declares the queue on every held channel without a running consumer (paused,
    /// or between consumers), so that `x-expires` does not delete it under a live listener.
    async fn keep_alive(&mut self) {
        let topology = self.shared.topology.lock().clone();
        let timeout = self.timeout();
        let idle: Vec<Arc<GrantContext>> = self
            .active
            .iter()
            .chain(&self.draining)
            .filter(|h| h.ready && h.consumer.as_ref().is_none_or(|c| c.stopping))
            .map(|h| h.context.clone())
            .collect();
        for context in idle {
            if let Err(error) = topology::declare_queue(&context.channel, &topology, timeout).await
            {
                tracing::debug!(listener = %self.shared.name, grant = context.grant, %error, "cannot re-declare the queue now");
            }
        }
    }

    async fn add_binding(&mut self, binding: Binding) -> Result<(), ListenerError> {
        let queue = {
            let mut topology = self.shared.topology.lock();
            if topology.bindings.contains(&binding) {
                return Ok(());
            }
            topology.bindings.push(binding.clone());
            topology.queue_name.clone()
        };
        self.tombstones.retain(|t| t.binding != binding);
        let Some(held) = self.active.as_ref().filter(|h| h.ready) else {
            // Applied with the rest of the topology on the next channel.
            return Ok(());
        };
        let (grant, broker) = (held.grant(), held.broker());
        match topology::change_binding(
            held.channel(),
            &queue,
            &binding,
            BindingChange::Add,
            self.timeout(),
        )
        .await
        {
            Ok(()) => {
                place(&mut self.placed, &binding, broker);
                Ok(())
            }
            Err(error) => {
                self.shared
                    .topology
                    .lock()
                    .bindings
                    .retain(|b| b != &binding);
                // The broker closes the channel over a refused bind; a timeout means it
                // cannot be trusted: either way, a new one.
                self.lose_active(grant, "a bind failed");
                Err(if error.is_timeout() {
                    ListenerError::Timeout(error.to_string())
                } else {
                    ListenerError::Broker(error.to_string())
                })
            }
        }
    }

    /// Removes a binding from the topology and from every held channel's queue; what it
    /// may still be bound to elsewhere is remembered and unbound there later.
    async fn remove_binding(&mut self, binding: Binding) -> Result<Removed, ListenerError> {
        let (existed, queue) = {
            let mut topology = self.shared.topology.lock();
            let before = topology.bindings.len();
            topology.bindings.retain(|b| b != &binding);
            (
                topology.bindings.len() != before,
                topology.queue_name.clone(),
            )
        };
        if !existed {
            return Ok(Removed {
                existed: false,
                clean: true,
            });
        }
        let mut brokers = take_placed(&mut self.placed, &binding);
        let timeout = self.timeout();
        let held: Vec<(u64, BrokerId, Channel)> = self
            .active
            .iter()
            .chain(&self.draining)
            .filter(|h| h.ready)
            .map(|h| (h.grant(), h.broker(), h.channel().clone()))
            .collect();
        let mut failure = None;
        for (grant, broker, channel) in held {
            if !brokers.contains(&broker) {
                continue;
            }
            match topology::change_binding(
                &channel,
                &queue,
                &binding,
                BindingChange::Remove,
                timeout,
            )
            .await
            {
                Ok(()) => {
                    brokers.remove(&broker);
                }
                Err(error) => {
                    if self.is_active(grant) {
                        self.lose_active(grant, "an unbind failed");
                    }
                    failure = Some(error);
                }
            }
        }
        let clean = brokers.is_empty();
        if !clean {
            tracing::debug!(listener = %self.shared.name, exchange = %binding.exchange, routing_key = %binding.routing_key, ?brokers, "a removed binding may remain where the listener has no channel now");
            self.tombstones.push(Placed { binding, brokers });
        }
        match failure {
            Some(error) if error.is_timeout() => Err(ListenerError::Timeout(error.to_string())),
            Some(error) => Err(ListenerError::Broker(error.to_string())),
            None => Ok(Removed { existed, clean }),
        }
    }

    /// A federated binding was added: it reaches every federator, started with the first
    /// one. A federator that cannot bind now (its broker is down) binds on its next
    /// channel; one that failed otherwise fails the call.
    async fn federate(
        &mut self,
        myself: &ActorRef<ListenerMsg>,
        binding: &Binding,
    ) -> Result<(), ListenerError> {
        let Some(federators) = &self.federators else {
            // Started with every federated binding there is now; the call returns once
            // those on reachable brokers consume (or the operation timeout passed).
            self.federators = Federators::start(&self.shared, myself)
                .await
                .map_err(ListenerError::Start)?;
            if let Some(federators) = &self.federators
                && !federators.wait_consuming(self.timeout()).await
            {
                tracing::warn!(listener = %self.shared.name, "not every reachable federator consumes yet; they go on trying");
            }
            return Ok(());
        };
        let errors = federators.each(BindingMsg::Add, binding).await;
        errors.into_iter().next().map_or(Ok(()), Err)
    }

    /// A federated binding was removed: from every federator, which stop with the last
    /// one.
    async fn unfederate(&mut self, binding: &Binding) {
        if federation::has_federated(&self.shared) {
            if let Some(federators) = &self.federators {
                for error in federators.each(BindingMsg::Remove, binding).await {
                    tracing::warn!(listener = %self.shared.name, %error, "a federator could not remove a binding; it may stay on the remote queue until the queue goes");
                }
            }
            return;
        }
        if let Some(federators) = self.federators.take() {
            let end = Instant::now() + stop_wish(self.shared.settings.stop_timeout);
            federators.stop(end).await;
            tracing::info!(listener = %self.shared.name, "last federated binding removed; federators stopped");
        }
    }

    fn pause(&mut self) {
        self.shared.topology.lock().paused = true;
        for held in self.active.iter_mut().chain(self.draining.iter_mut()) {
            // Handle what the broker already sent; there is no deadline to a pause.
            held.stop_consumer(None);
        }
        if self.active.as_ref().is_some_and(|h| h.ready) {
            self.readiness.ready();
        }
    }

    async fn resume(&mut self, myself: &ActorRef<ListenerMsg>) {
        self.shared.topology.lock().paused = false;
        let now = Instant::now();
        let mut idle = Vec::new();
        for held in self.active.iter_mut().chain(self.draining.iter_mut()) {
            if let Some(drain) = held.drain.as_mut() {
                drain.resumed(now);
            }
            // A consumer still stopping for the pause starts again when its stop ends.
            if held.ready && held.consumer.is_none() {
                idle.push(held.grant());
            }
        }
        for grant in idle {
            self.start_consumer(myself, grant).await;
        }
    }

    fn status(&self) -> ListenerStatus {
        ListenerStatus {
            active: self.active.as_ref().map(|h| (h.broker(), h.grant())),
            declared: self.active.as_ref().is_some_and(|h| h.ready),
            consuming: self
                .active
                .as_ref()
                .and_then(|h| h.consumer.as_ref())
                .is_some_and(|c| !c.stopping),
            paused: self.paused(),
            draining: self
                .draining
                .iter()
                .map(|h| (h.broker(), h.grant()))
                .collect(),
            watching: self
                .draining
                .iter()
                .filter(|h| {
                    h.drain
                        .as_ref()
                        .is_some_and(|d| matches!(d.phase, drain::Phase::Watching { .. }))
                })
                .map(|h| (h.broker(), h.grant()))
                .collect(),
        }
    }

    /// Grant events from assignments.
    async fn grant_event(&mut self, myself: &ActorRef<ListenerMsg>, event: GrantEvent) {
        match event {
            GrantEvent::Granted(grant) => self.granted(myself, grant).await,
            // Only ever about the active grant: a drained one is ours to watch.
            GrantEvent::Lost { number } => {
                if self.is_active(number) {
                    tracing::warn!(listener = %self.shared.name, grant = number, "channel lost");
                    self.drop_active("channel lost");
                }
            }
        }
    }
}

impl Actor for ListenerActor {
    type Msg = ListenerMsg;
    type State = ListenerState;
    type Arguments = Started;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        Started {
            shared,
            slot,
            deadline,
        }: Started,
    ) -> Result<Self::State, ActorProcessingErr> {
        deadline.clear();
        slot.set(myself);
        let readiness = shared
            .origin
            .node
            .readiness
            .register(format!("listener:{}", shared.name));
        let figures = shared
            .origin
            .node
            .metrics
            .register(Arc::new(ListenerFigures(shared.clone())));
        Ok(ListenerState {
            shared,
            slot,
            deadline,
            client: None,
            forward: None,
            keepalive: None,
            active: None,
            draining: Vec::new(),
            next_task: 0,
            setup_failures: 0,
            readiness,
            _figures: figures,
            placed: Vec::new(),
            tombstones: Vec::new(),
            refused: None,
            federators: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut ListenerState,
    ) -> Result<(), ActorProcessingErr> {
        let (client, events) = state.shared.origin.node.assignments.register(
            format!("listener:{}", state.shared.name),
            state.shared.settings.channel.clone(),
        )?;
        state.client = Some(client);
        if let Some(every) = state.shared.settings.keepalive {
            state.keepalive = Some(myself.send_interval(every, || ListenerMsg::KeepAlive));
        }
        state.forward = Some(forward::each_item(
            events,
            myself.clone(),
            ListenerMsg::Grant,
        ));
        if federation::has_federated(&state.shared) {
            state.federators = Federators::start(&state.shared, &myself).await?;
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut ListenerState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ListenerMsg::Grant(event) => state.grant_event(&myself, event).await,
            ListenerMsg::ConsumerEnded { grant, task, ended } => {
                state.consumer_ended(&myself, grant, task, ended).await;
            }
            ListenerMsg::DrainCheck { grant } => state.drain_check(&myself, grant).await,
            ListenerMsg::RetrySetup { grant } => state.retry_setup(grant),
            ListenerMsg::Declare { grant } => {
                if state.is_active(grant) {
                    state.declare(&myself).await;
                }
            }
            ListenerMsg::KeepAlive => state.keep_alive().await,
            ListenerMsg::AddBinding(binding, reply) => {
                let mut added = state.add_binding(binding.clone()).await;
                if added.is_ok() && binding.federated {
                    added = state.federate(&myself, &binding).await;
                }
                let _ = reply.send(added);
            }
            ListenerMsg::RemoveBinding(binding, reply) => {
                let removed = state.remove_binding(binding.clone()).await;
                if removed.as_ref().is_ok_and(|r| r.existed) && binding.federated {
                    state.unfederate(&binding).await;
                }
                let _ = reply.send(removed);
            }
            ListenerMsg::Pause(reply) => {
                state.pause();
                let _ = reply.send(());
            }
            ListenerMsg::Resume(reply) => {
                state.resume(&myself).await;
                let _ = reply.send(Ok(()));
            }
            ListenerMsg::Status(reply) => {
                let _ = reply.send(state.status());
            }
            ListenerMsg::FederatorsConsuming => state.notice(Notice::FederatorsConsuming),
        }
        Ok(())
    }

    /// The federators' supervisor is the listener's only linked child: its failure (it
    /// gave up restarting them) fails the listener, which its own supervisor restarts; its
    /// end after the last federated binding went is expected.
    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut ListenerState,
    ) -> Result<(), ActorProcessingErr> {
        let ours = |id: ActorId| state.federators.as_ref().map(Federators::supervisor) == Some(id);
        let ended = match event {
            SupervisionEvent::ActorFailed(who, reason) if ours(who.get_id()) => {
                format!("failed: {reason}")
            }
            SupervisionEvent::ActorTerminated(who, _, reason) if ours(who.get_id()) => {
                format!("stopped: {}", reason.unwrap_or_default())
            }
            _ => return Ok(()),
        };
        Err(format!("the federators of listener `{}` {ended}", state.shared.name).into())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut ListenerState,
    ) -> Result<(), ActorProcessingErr> {
        // Cancel, let handlers finish until the deadline, ack, then close the channels. The
        // grant is given back only afterwards, so assignments cannot close the channel under
        // the handlers. All of it by the deadline this stop was given (or the listener's
        // own, stopped on its own): handlers get `stop_timeout` of it, never the time kept
        // for closing.
        let timeout = state.shared.settings.stop_timeout;
        let now = Instant::now();
        let end = state
            .deadline
            .or_own(stop_wish(timeout))
            .into_std()
            .max(now);
        let reserve = CLOSE_RESERVE.min(end.duration_since(now) / 2);
        let deadline = (now + timeout).min(end - reserve);
        let left = move || end.saturating_duration_since(Instant::now());
        // The federators stop at the same time, by the same deadline.
        let federators = state.federators.take().map(|f| tokio::spawn(f.stop(end)));
        let mut held_all: Vec<Held> = state.active.take().into_iter().collect();
        held_all.append(&mut state.draining);
        for held in &mut held_all {
            if let Some(consumer) = held.consumer.as_mut() {
                consumer.stopping = true;
                let _ = consumer.control.send(Control::Stop {
                    deadline: Some(deadline),
                    finish_buffered: false,
                });
            }
        }
        let topology = state.shared.topology.lock().clone();
        let operation = state.shared.settings.operation_timeout.min(CLOSE_TIMEOUT);
        for held in &mut held_all {
            if let Some(consumer) = held.consumer.take() {
                let mut handle = consumer.handle;
                if tokio::time::timeout(left(), &mut handle).await.is_err() {
                    handle.abort();
                }
            }
            if held.channel().status().connected() {
                topology::delete_if_anonymous(held.channel(), &topology, operation.min(left()))
                    .await;
                let _ = tokio::time::timeout(
                    CLOSE_TIMEOUT.min(left()),
                    held.channel()
                        .close(200, "warren: listener stopping".into()),
                )
                .await;
            }
        }
        if let Some(federators) = federators {
            let _ = federators.await;
        }
        state.set_consuming(false);
        *state.shared.current.write() = None;
        state.shared.channel.send_replace(None);
        for task in [state.forward.take(), state.keepalive.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
        state.client = None;
        state.slot.clear_if(&myself);
        tracing::info!(listener = %state.shared.name, "listener stopped");
        Ok(())
    }
}
