//! The handle to a listener: what apps and tests hold to query it, change it at run time
//! and stop it.
//!
//! Owns: the address of the listener's actor (set by the actor when it starts, cleared
//! when it stops) and the state shared with it. A [`ListenerHandle`] outlives restarts of
//! the actor. Run-time changes that touch the broker go through the actor; responders are
//! a local table the handle edits directly. Must not touch: the broker, the topology.

use std::sync::Arc;
use std::time::Duration;

use lapin::Channel;
use ractor::{Actor, ActorRef, RpcReplyPort};
use warren_runtime::actor_slot::ActorSlot;
use warren_runtime::broker::BrokerId;
use warren_runtime::envelope::Stamp;
use warren_runtime::node::NodeContext;
use warren_runtime::supervisor::{ChildSpec, StopDeadline, deadline};

use super::Listener;
use super::actor::{ListenerActor, ListenerMsg, Started, ask, child_spec, stop_wish};
use super::responders::{HandlerFn, ResponderId};
use super::shared::ListenerShared;
use super::spec::Binding;
use super::status::{ListenerError, ListenerStatus, Removed, StatsSnapshot};
use super::validate::SpecError;
use crate::app::AppContext;

/// A handle to one listener: query it, change it at run time, stop it.
#[derive(Clone)]
pub struct ListenerHandle {
    shared: Arc<ListenerShared>,
    actor: Arc<ActorSlot<ListenerMsg>>,
    /// By when the actor must have stopped, written by whoever stops it.
    deadline: StopDeadline,
}

/// The listener as a supervised child (for an app's `children`), and its handle; a spec
/// that breaks a rule is refused here, before anything reaches a broker.
pub fn listener_child(
    listener: impl Listener,
    ctx: &AppContext,
) -> Result<(ChildSpec, ListenerHandle), SpecError> {
    child_of(listener, &ctx.node, ctx.stamp(), ctx.config.quorum_queues)
}

/// As [`listener_child`], from the node's handles and a stamp (pool workers).
pub(crate) fn node_listener_child(
    listener: impl Listener,
    node: &NodeContext,
    stamp: Stamp,
) -> Result<(ChildSpec, ListenerHandle), SpecError> {
    child_of(listener, node, stamp, false)
}

/// The child and handle of a listener; `quorum_queues`: its named queue is declared as a
/// quorum queue (`[apps.<name>] quorum_queues`).
fn child_of(
    listener: impl Listener,
    node: &NodeContext,
    stamp: Stamp,
    quorum_queues: bool,
) -> Result<(ChildSpec, ListenerHandle), SpecError> {
    let shared = ListenerShared::new(Arc::new(listener), node, stamp, quorum_queues)?;
    let id = format!("listener:{}", shared.name);
    let handle = ListenerHandle::new(shared);
    Ok((child_spec(id, handle.started()), handle))
}

/// Starts a listener outside any supervisor (tests, tools); stop it with
/// [`ListenerHandle::stop`].
pub async fn spawn_listener(
    listener: impl Listener,
    ctx: &AppContext,
) -> Result<ListenerHandle, ListenerError> {
    let handle = ListenerHandle::new(ListenerShared::new(
        Arc::new(listener),
        &ctx.node,
        ctx.stamp(),
        ctx.config.quorum_queues,
    )?);
    Actor::spawn(None, ListenerActor, handle.started())
        .await
        .map_err(|e| ListenerError::Start(e.to_string()))?;
    Ok(handle)
}

impl ListenerHandle {
    fn new(shared: Arc<ListenerShared>) -> Self {
        ListenerHandle {
            shared,
            actor: Arc::default(),
            deadline: StopDeadline::default(),
        }
    }

    /// What an actor of this listener starts from.
    fn started(&self) -> Started {
        Started {
            shared: self.shared.clone(),
            slot: self.actor.clone(),
            deadline: self.deadline.clone(),
        }
    }

    /// What the listener asks of its parent to stop.
    fn stop_wish(&self) -> Duration {
        stop_wish(self.shared.settings.stop_timeout)
    }

    fn actor(&self) -> Result<ActorRef<ListenerMsg>, ListenerError> {
        self.actor.get().ok_or(ListenerError::NotRunning)
    }

    /// One round trip to the actor (see [`ask`]).
    async fn ask<T: Send + 'static>(
        &self,
        message: impl FnOnce(RpcReplyPort<T>) -> ListenerMsg,
    ) -> Result<T, ListenerError> {
        ask(&self.actor, message).await
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

    /// The broker and grant number of the current channel.
    pub fn current(&self) -> Option<(BrokerId, u64)> {
        self.shared
            .current
            .read()
            .map(|current| (current.broker, current.grant))
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// What the listener's actor says about itself (a round trip to the actor, so it
    /// reflects every change the actor made before).
    pub async fn status(&self) -> Result<ListenerStatus, ListenerError> {
        self.ask(ListenerMsg::Status).await
    }

    /// Adds a binding now (and on every later channel).
    pub async fn add_binding(&self, binding: Binding) -> Result<(), ListenerError> {
        self.ask(|reply| ListenerMsg::AddBinding(binding, reply))
            .await?
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
        self.ask(|reply| ListenerMsg::RemoveBinding(binding, reply))
            .await?
    }

    /// Adds a responder for (`category`, `name`) (`"*"` = any).
    pub fn add_responder(
        &self,
        category: impl Into<String>,
        name: impl Into<String>,
        handler: impl HandlerFn,
    ) -> ResponderId {
        self.shared.responders.write().add(category, name, handler)
    }

    pub fn remove_responder(&self, id: ResponderId) -> bool {
        self.shared.responders.write().remove(id)
    }

    /// Stops consuming (messages already received are handled); stays paused across
    /// reconnects until [`ListenerHandle::resume`].
    pub async fn pause(&self) -> Result<(), ListenerError> {
        self.ask(ListenerMsg::Pause).await
    }

    pub async fn resume(&self) -> Result<(), ListenerError> {
        self.ask(ListenerMsg::Resume).await?
    }

    /// Ends the listener's actor at once, skipping its stop steps: what a supervisor does
    /// to a child that overruns its stop deadline. For tests of that path.
    #[doc(hidden)]
    pub fn kill(&self) {
        if let Ok(actor) = self.actor() {
            actor.kill();
        }
    }

    /// Stops a listener started with [`spawn_listener`] gracefully and waits for it.
    pub async fn stop(&self) -> Result<(), ListenerError> {
        let actor = self.actor()?;
        let bound = self.stop_wish();
        self.deadline.set(tokio::time::Instant::now() + bound);
        actor
            .stop_and_wait(
                Some("stopped by its handle".to_string()),
                Some(bound + deadline::MARGIN),
            )
            .await
            .map_err(|_| ListenerError::NotRunning)
    }
}
