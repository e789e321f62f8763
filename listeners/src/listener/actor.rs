//! The listener actor: it holds the listener's lease, replays the topology on every new
//! channel (exactly once per grant), runs the consumer loop, applies run-time changes,
//! drains an old lease after a fail-back, and stops gracefully.
//!
//! Broker I/O never happens in `pre_start`: the lease request is made in `post_start` and
//! everything else in messages. State shared with the handle (topology, responders, stats)
//! lives in `ListenerShared`; the actor is the only one that changes the topology.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::Channel;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use warren_runtime::assignments::{Lease, LeaseClient, LeaseEvent};
use warren_runtime::backoff::Backoff;
use warren_runtime::registry::Broker;

use super::Notice;
use super::consumer::{ConsumerLoop, Control, Ended};
use super::handle::{ListenerError, ListenerShared};
use super::spec::{AckMode, Binding};
use super::topology;

/// How often a draining lease checks whether its queue is empty.
const DRAIN_CHECK_EVERY: Duration = Duration::from_millis(200);
/// Bound for closing a channel.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Messages of the listener actor.
pub(crate) enum ListenerMsg {
    /// From assignments.
    Lease(LeaseEvent),
    /// A consumer loop ended.
    ConsumerEnded {
        lease: u64,
        task: u64,
        ended: Ended,
    },
    /// Check whether a draining lease's queue is empty.
    DrainCheck {
        lease: u64,
    },
    /// The topology could not be set up on this lease; ask for another channel.
    RetrySetup {
        lease: u64,
    },
    AddBinding(Binding, RpcReplyPort<Result<(), ListenerError>>),
    RemoveBinding(Binding, RpcReplyPort<Result<bool, ListenerError>>),
    Pause(RpcReplyPort<()>),
    Resume(RpcReplyPort<Result<(), ListenerError>>),
}

/// A consumer loop running on a lease's channel.
struct RunningConsumer {
    task: u64,
    control: watch::Sender<Control>,
    handle: JoinHandle<()>,
}

/// A lease the listener holds.
struct Held {
    lease: u64,
    channel: Channel,
    broker: Arc<Broker>,
    /// The topology is declared on this channel.
    ready: bool,
    consumer: Option<RunningConsumer>,
}

impl Held {
    fn stop_consumer(&self, deadline: Instant, finish_buffered: bool) {
        if let Some(consumer) = &self.consumer {
            let _ = consumer.control.send(Control::Stop {
                deadline,
                finish_buffered,
            });
        }
    }
}

/// State of the listener actor.
pub(crate) struct ListenerState {
    shared: Arc<ListenerShared>,
    client: Option<LeaseClient>,
    forward: Option<JoinHandle<()>>,
    active: Option<Held>,
    draining: Vec<Held>,
    next_task: u64,
    setup_failures: u32,
}

/// The actor behind a listener.
pub(crate) struct ListenerActor;

fn close_channel(channel: Channel) {
    tokio::spawn(async move {
        if channel.status().connected() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "warren: done".into()))
                .await;
        }
    });
}

impl ListenerState {
    fn notice(&self, notice: Notice) {
        self.shared.listener.on_notice(&notice);
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

    /// A new channel: declare everything on it, then consume (unless paused).
    async fn setup(&mut self, myself: &ActorRef<ListenerMsg>, lease: Lease) {
        let topology = self.shared.topology.lock().clone();
        let held = Held {
            lease: lease.generation,
            channel: lease.channel,
            broker: lease.broker,
            ready: false,
            consumer: None,
        };
        let prefetch = match self.shared.settings.ack {
            AckMode::Broker => None,
            _ => Some(self.shared.settings.prefetch),
        };
        let result = topology::declare(&held.channel, &topology, prefetch).await;
        let broker = held.broker.clone();
        let lease_generation = held.lease;
        self.active = Some(held);
        if let Err(error) = result {
            self.setup_failed(myself, lease_generation, &error.to_string());
            return;
        }
        if let Some(held) = self.active.as_mut() {
            held.ready = true;
            self.shared.channel.send_replace(Some(held.channel.clone()));
        }
        *self.shared.current.write() = Some((broker.id, lease_generation));
        tracing::info!(listener = %self.shared.name, queue = %topology.queue_name, broker = %broker, lease = lease_generation, "topology declared");
        self.notice(Notice::QueueCreated {
            queue: topology.queue_name.clone(),
            broker: broker.uri.redacted().to_string(),
        });
        if !topology.paused {
            self.start_consumer(myself).await;
        }
    }

    /// The topology could not be declared: ask for another channel after a backoff, so a
    /// persistent error (a missing exchange, a queue declared differently elsewhere) does
    /// not spin.
    fn setup_failed(&mut self, myself: &ActorRef<ListenerMsg>, lease: u64, error: &str) {
        self.setup_failures = self.setup_failures.saturating_add(1);
        let delay = Backoff::new(Duration::from_millis(100), Duration::from_secs(30))
            .delay(self.setup_failures - 1);
        tracing::warn!(listener = %self.shared.name, lease, %error, retry_in_ms = delay.as_millis() as u64, "cannot set up the listener on this channel");
        myself.send_after(delay, move || ListenerMsg::RetrySetup { lease });
    }

    async fn start_consumer(&mut self, myself: &ActorRef<ListenerMsg>) {
        let topology = self.shared.topology.lock().clone();
        self.next_task += 1;
        let task = self.next_task;
        let Some(held) = self.active.as_mut() else {
            return;
        };
        let tag = format!("{}.{}.{}", self.shared.consumer_tag, held.lease, task);
        let no_ack = self.shared.settings.ack == AckMode::Broker;
        match topology::consume(&held.channel, &topology, &tag, no_ack).await {
            Ok(consumer) => {
                let (control, control_rx) = watch::channel(Control::Run);
                let consumer_loop = ConsumerLoop {
                    lease: held.lease,
                    task,
                    tag,
                    channel: held.channel.clone(),
                    consumer,
                    queue: topology.queue_name.clone(),
                    broker: held.broker.clone(),
                    shared: self.shared.clone(),
                    control: control_rx,
                    actor: myself.clone(),
                };
                held.consumer = Some(RunningConsumer {
                    task,
                    control,
                    handle: tokio::spawn(consumer_loop.run()),
                });
                self.setup_failures = 0;
                self.set_consuming(true);
            }
            Err(error) => {
                let lease = held.lease;
                self.setup_failed(myself, lease, &error.to_string());
            }
        }
    }

    /// The active lease is gone: forget it and tell the listener.
    fn drop_active(&mut self) {
        if let Some(held) = self.active.take() {
            if let Some(consumer) = held.consumer {
                consumer.handle.abort();
            }
            close_channel(held.channel);
            *self.shared.current.write() = None;
            self.shared.channel.send_replace(None);
            self.notice(Notice::ChannelLost);
            self.set_consuming(false);
        }
    }

    /// A drained (or lost) old lease: delete its anonymous queue, close it, give it back.
    fn release_draining(&mut self, lease: u64) {
        if let Some(i) = self.draining.iter().position(|h| h.lease == lease) {
            let held = self.draining.remove(i);
            if let Some(consumer) = held.consumer {
                consumer.handle.abort();
            }
            let topology = self.shared.topology.lock().clone();
            let channel = held.channel;
            tokio::spawn(async move {
                topology::delete_if_anonymous(&channel, &topology).await;
                close_channel(channel);
            });
            tracing::info!(listener = %self.shared.name, lease, "old lease drained and released");
            if let Some(client) = &self.client {
                client.release(lease);
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
        let Some(held) = self.active.as_ref().filter(|h| h.ready) else {
            // Applied with the rest of the topology on the next channel.
            return Ok(());
        };
        if let Err(error) = topology::bind(&held.channel, &queue, &binding).await {
            self.shared
                .topology
                .lock()
                .bindings
                .retain(|b| b != &binding);
            return Err(ListenerError::Broker(error.to_string()));
        }
        Ok(())
    }

    async fn remove_binding(&mut self, binding: Binding) -> Result<bool, ListenerError> {
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
            return Ok(false);
        }
        if let Some(held) = self.active.as_ref().filter(|h| h.ready) {
            topology::unbind(&held.channel, &queue, &binding)
                .await
                .map_err(|e| ListenerError::Broker(e.to_string()))?;
        }
        Ok(true)
    }
}

impl Actor for ListenerActor {
    type Msg = ListenerMsg;
    type State = ListenerState;
    type Arguments = Arc<ListenerShared>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        shared: Arc<ListenerShared>,
    ) -> Result<Self::State, ActorProcessingErr> {
        *shared.actor.write() = Some(myself);
        Ok(ListenerState {
            shared,
            client: None,
            forward: None,
            active: None,
            draining: Vec::new(),
            next_task: 0,
            setup_failures: 0,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut ListenerState,
    ) -> Result<(), ActorProcessingErr> {
        let (client, mut events) = state.shared.assignments.register(
            format!("listener:{}", state.shared.name),
            state.shared.settings.channel.clone(),
        )?;
        state.client = Some(client);
        state.forward = Some(tokio::spawn(async move {
            while let Some(event) = events.next().await {
                if myself.cast(ListenerMsg::Lease(event)).is_err() {
                    break;
                }
            }
        }));
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut ListenerState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ListenerMsg::Lease(LeaseEvent::Granted(lease)) => {
                match lease.replaces {
                    Some(old) if state.active.as_ref().is_some_and(|h| h.lease == old) => {
                        // Make-before-break: the old lease keeps consuming until drained.
                        if let Some(held) = state.active.take() {
                            tracing::info!(listener = %state.shared.name, old, new = lease.generation, broker = %lease.broker, "moving back to the primary; draining the old lease");
                            state.draining.push(held);
                            myself.send_after(DRAIN_CHECK_EVERY, move || ListenerMsg::DrainCheck {
                                lease: old,
                            });
                        }
                    }
                    Some(old) => {
                        // The lease to replace is already gone: nothing to drain.
                        if let Some(client) = &state.client {
                            client.release(old);
                        }
                        state.drop_active();
                    }
                    None => state.drop_active(),
                }
                state.setup(&myself, lease).await;
            }
            ListenerMsg::Lease(LeaseEvent::Lost { generation }) => {
                if state.active.as_ref().is_some_and(|h| h.lease == generation) {
                    tracing::warn!(listener = %state.shared.name, lease = generation, "channel lost");
                    state.drop_active();
                } else if let Some(i) = state.draining.iter().position(|h| h.lease == generation) {
                    let held = state.draining.remove(i);
                    if let Some(consumer) = held.consumer {
                        consumer.handle.abort();
                    }
                }
            }
            ListenerMsg::ConsumerEnded { lease, task, ended } => {
                let is_active = state.active.as_ref().is_some_and(|h| {
                    h.lease == lease && h.consumer.as_ref().is_some_and(|c| c.task == task)
                });
                if is_active {
                    if let Some(held) = state.active.as_mut() {
                        held.consumer = None;
                    }
                    match ended {
                        Ended::Stopped => state.set_consuming(false),
                        Ended::Lost(reason) => {
                            tracing::warn!(listener = %state.shared.name, lease, %reason, "consumer failed; asking for a new channel");
                            state.drop_active();
                            if let Some(client) = &state.client {
                                client.report_lost(lease);
                            }
                        }
                        Ended::Cancelled => {
                            tracing::warn!(listener = %state.shared.name, lease, "the broker cancelled the consumer; setting up again on a new channel");
                            state.drop_active();
                            if let Some(client) = &state.client {
                                client.report_lost(lease);
                            }
                        }
                    }
                } else if state.draining.iter().any(|h| h.lease == lease) {
                    state.release_draining(lease);
                }
            }
            ListenerMsg::DrainCheck { lease } => {
                let Some(held) = state.draining.iter().find(|h| h.lease == lease) else {
                    return Ok(());
                };
                if held.consumer.is_none() {
                    state.release_draining(lease);
                    return Ok(());
                }
                let queue = state.shared.topology.lock().queue_name.clone();
                match topology::is_empty(&held.channel, &queue).await {
                    Ok(true) => {
                        let deadline = Instant::now() + state.shared.settings.stop_timeout;
                        held.stop_consumer(deadline, true);
                    }
                    Ok(false) => {
                        myself.send_after(DRAIN_CHECK_EVERY, move || ListenerMsg::DrainCheck {
                            lease,
                        });
                    }
                    Err(error) => {
                        tracing::debug!(listener = %state.shared.name, lease, %error, "old lease gone while draining");
                        state.release_draining(lease);
                    }
                }
            }
            ListenerMsg::RetrySetup { lease } => {
                let still_failing = state
                    .active
                    .as_ref()
                    .is_some_and(|h| h.lease == lease && h.consumer.is_none());
                let paused = state.shared.topology.lock().paused;
                let ready = state.active.as_ref().is_some_and(|h| h.ready);
                if still_failing && !(ready && paused) {
                    if let Some(held) = state.active.take() {
                        close_channel(held.channel);
                        *state.shared.current.write() = None;
                        state.shared.channel.send_replace(None);
                    }
                    if let Some(client) = &state.client {
                        client.report_lost(lease);
                    }
                }
            }
            ListenerMsg::AddBinding(binding, reply) => {
                let _ = reply.send(state.add_binding(binding).await);
            }
            ListenerMsg::RemoveBinding(binding, reply) => {
                let _ = reply.send(state.remove_binding(binding).await);
            }
            ListenerMsg::Pause(reply) => {
                state.shared.topology.lock().paused = true;
                if let Some(held) = &state.active {
                    // Handle what the broker already sent, without a deadline of our own.
                    held.stop_consumer(Instant::now() + Duration::from_secs(86_400), true);
                }
                let _ = reply.send(());
            }
            ListenerMsg::Resume(reply) => {
                state.shared.topology.lock().paused = false;
                let idle = state
                    .active
                    .as_ref()
                    .is_some_and(|h| h.ready && h.consumer.is_none());
                if idle {
                    state.start_consumer(&myself).await;
                }
                let _ = reply.send(Ok(()));
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut ListenerState,
    ) -> Result<(), ActorProcessingErr> {
        // Cancel, let handlers finish until the deadline, ack, then close the channels. The
        // lease is given back only afterwards, so assignments cannot close the channel under
        // the handlers.
        let timeout = state.shared.settings.stop_timeout;
        let deadline = Instant::now() + timeout;
        let mut held_all: Vec<Held> = state.active.take().into_iter().collect();
        held_all.append(&mut state.draining);
        for held in &held_all {
            held.stop_consumer(deadline, false);
        }
        for held in &mut held_all {
            if let Some(consumer) = held.consumer.take() {
                let mut handle = consumer.handle;
                if tokio::time::timeout(timeout + Duration::from_secs(1), &mut handle)
                    .await
                    .is_err()
                {
                    handle.abort();
                }
            }
            if held.channel.status().connected() {
                let topology = state.shared.topology.lock().clone();
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                    topology::delete_if_anonymous(&held.channel, &topology).await;
                    held.channel
                        .close(200, "warren: listener stopping".into())
                        .await
                })
                .await;
            }
        }
        state.set_consuming(false);
        *state.shared.current.write() = None;
        state.shared.channel.send_replace(None);
        if let Some(forward) = state.forward.take() {
            forward.abort();
        }
        state.client = None;
        let mut actor = state.shared.actor.write();
        if actor
            .as_ref()
            .is_some_and(|a| a.get_id() == myself.get_id())
        {
            *actor = None;
        }
        tracing::info!(listener = %state.shared.name, "listener stopped");
        Ok(())
    }
}
