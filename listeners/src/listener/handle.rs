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
use ractor::{Actor, ActorRef};
use warren_runtime::actor_slot::ActorSlot;
use warren_runtime::broker::BrokerId;
use warren_runtime::confirm::{PublishError, PublishOptions, Published};
use warren_runtime::envelope::{Envelope, Stamp};
use warren_runtime::node::NodeContext;
use warren_runtime::supervisor::{ChildSpec, StopDeadline, deadline};

use super::Listener;
use super::actor::{ListenerActor, ListenerMsg, Started, stop_wish};
use super::event::Event;
use super::responders::{HandlerResult, ResponderId};
use super::shared::ListenerShared;
use super::spec::Binding;
use super::status::{ListenerError, ListenerStatus, Removed, StatsSnapshot};
use super::validate::SpecError;
use crate::app::AppContext;

/// How long handle calls wait for the actor.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

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
    node_listener_child(listener, &ctx.node, ctx.stamp())
}

/// As [`listener_child`], from the node's handles and a stamp (pool workers).
pub(crate) fn node_listener_child(
    listener: impl Listener,
    node: &NodeContext,
    stamp: Stamp,
) -> Result<(ChildSpec, ListenerHandle), SpecError> {
    let handle = ListenerHandle::new(ListenerShared::new(Arc::new(listener), node, stamp)?);
    let id = format!("listener:{}", handle.shared.name);
    let started = handle.started();
    let child = ChildSpec::actor(id, move || (ListenerActor, started.clone()))
        .shutdown(handle.stop_wish())
        .told(handle.deadline.clone());
    Ok((child, handle))
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
        *self.shared.current.read()
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
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
