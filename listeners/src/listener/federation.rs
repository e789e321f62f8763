//! Federation (Kazoo's `listener_federator`): a listener whose bindings are marked
//! federated also consumes them on every broker of the other zones, so that requests
//! published in another zone reach it, and its replies go back there.
//!
//! Each remote broker gets one federator: a listener like any other, run by the same actor,
//! that declares the parent's queue options under `<queue>-<local zone>` (one queue per
//! consuming zone; the parent's own name with `federated_name_is_global`, an anonymous
//! name of its own for anonymous queues), binds only the federated bindings, sticks to its
//! broker, and runs the parent's hook and responders on what it consumes, acking on its own
//! channel in the parent's ack mode. Its events carry their broker (`Event::is_federated`),
//! and their publishes and replies go out on that broker, to the requester's `Server-ID`.
//! The federators are supervised under the listener (`federators:<listener>`, one for
//! one), started when the first federated binding is there and stopped with the last one.
//! They report to a readiness of their own: a remote zone that is down never makes the
//! node not ready; the parent hears `Notice::FederatorsConsuming` when every federator
//! whose broker is up consumes.
//!
//! Owns: which brokers get a federator, what a federator declares, and starting, changing
//! and stopping the federators. Must not touch: how a federator consumes and handles (the
//! listener actor's, as for any listener).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{ActorCell, ActorId, ActorRef};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use warren_runtime::assignments::ChannelKind;
use warren_runtime::broker::Broker;
use warren_runtime::readiness::Readiness;
use warren_runtime::registry::ConnectionRegistry;
use warren_runtime::supervisor::{
    Intensity, StopDeadline, StopOrder, Supervisor, SupervisorMsg, SupervisorSpec, deadline,
    spawn_error_reason,
};

use super::actor::ListenerMsg;
use super::event::Event;
use super::handle::{ListenerHandle, federator_child};
use super::shared::ListenerShared;
use super::spec::{Binding, ListenerSpec, QueueName};
use super::status::ListenerError;
use super::{Dispatch, Listener, Notice};

/// How often the federators may restart before their supervisor gives up (and the
/// listener with it), as for a pool's workers.
const INTENSITY: Intensity = Intensity::new(10, Duration::from_secs(30));

/// The listener one federator runs: its parent's, seen from one remote broker.
pub(crate) struct Federator {
    pub parent: Arc<ListenerShared>,
    pub broker: Arc<Broker>,
}

/// A federator's name: the parent's, the zone and the broker's number.
pub(crate) fn federator_name(parent: &str, broker: &Broker) -> String {
    format!("{parent}@{}.{}", broker.zone, broker.id.0)
}

impl Listener for Federator {
    fn spec(&self) -> ListenerSpec {
        let mut spec = self.parent.listener.spec();
        let local_zone = self.parent.origin.node.registry.local_zone().to_string();
        spec.name = federator_name(&self.parent.name, &self.broker);
        if let QueueName::Named(name) = &spec.queue.name
            && !spec.federated_name_is_global
        {
            spec.queue.name = QueueName::Named(format!("{name}-{local_zone}"));
        }
        spec.bindings = federated(&self.parent);
        spec.own_queue_bindings.clear();
        spec.channel = ChannelKind::Broker(self.broker.id);
        spec
    }

    fn on_event(&self, event: &Event) -> Dispatch {
        self.parent.listener.on_event(event)
    }

    fn on_notice(&self, notice: &Notice) {
        // The parent hears of its federators as a whole (`FederatorsConsuming`); a
        // returned publish of a handler is the app's to know.
        if let Notice::Returned(_) = notice {
            self.parent.listener.on_notice(notice);
        }
    }

    fn on_failed(&self, event: &Event, reason: &str) {
        self.parent.listener.on_failed(event, reason);
    }
}

/// The federated bindings of the parent now, as a federator declares them.
fn federated(parent: &ListenerShared) -> Vec<Binding> {
    parent
        .topology
        .lock()
        .bindings
        .iter()
        .filter(|b| b.federated)
        .map(Binding::remote_copy)
        .collect()
}

/// Whether the parent has a federated binding now.
pub(crate) fn has_federated(parent: &ListenerShared) -> bool {
    parent.topology.lock().bindings.iter().any(|b| b.federated)
}

/// The running federators of one listener.
pub(crate) struct Federators {
    supervisor: ActorRef<SupervisorMsg>,
    deadline: StopDeadline,
    members: Vec<ListenerHandle>,
    watcher: JoinHandle<()>,
}

impl Federators {
    /// Starts one federator per broker of the other zones under a supervisor linked to
    /// the listener's actor `parent`; `None` when there is no other zone. It returns once
    /// the federators are started, not once they consume: a remote broker that is down
    /// delays nothing.
    pub async fn start(
        shared: &Arc<ListenerShared>,
        parent: &ActorRef<ListenerMsg>,
    ) -> Result<Option<Federators>, String> {
        let registry = shared.origin.node.registry.clone();
        let remote: Vec<Arc<Broker>> = registry
            .brokers()
            .iter()
            .filter(|b| !b.local)
            .cloned()
            .collect();
        if remote.is_empty() {
            return Ok(None);
        }
        let readiness = Readiness::default();
        let mut children = Vec::with_capacity(remote.len());
        let mut members = Vec::with_capacity(remote.len());
        for broker in remote {
            let (child, member) =
                federator_child(shared, broker, &readiness).map_err(|e| e.to_string())?;
            children.push(child);
            members.push(member);
        }
        let spec = SupervisorSpec::one_for_one(
            format!("federators:{}", shared.name),
            StopOrder::Concurrent,
            INTENSITY,
            children,
        );
        let told = StopDeadline::default();
        let cell: ActorCell = parent.get_cell();
        let (supervisor, _) = Supervisor::spawn_linked(spec, told.clone(), cell)
            .await
            .map_err(|e| spawn_error_reason(&e))?;
        let watcher = tokio::spawn(watch_consuming(members.clone(), registry, parent.clone()));
        tracing::info!(listener = %shared.name, federators = members.len(), "federators started");
        Ok(Some(Federators {
            supervisor,
            deadline: told,
            members,
            watcher,
        }))
    }

    /// The federators' supervisor (its exit reaches the listener's actor).
    pub fn supervisor(&self) -> ActorId {
        self.supervisor.get_id()
    }

    /// Adds a federated binding on every federator at once; the errors of those that
    /// could not (a federator whose broker is down applies it on its next channel).
    pub async fn add_binding(&self, binding: &Binding) -> Vec<ListenerError> {
        let copy = binding.remote_copy();
        let all = self.members.iter().map(|m| m.add_binding(copy.clone()));
        futures::future::join_all(all)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect()
    }

    /// Removes a federated binding from every federator at once.
    pub async fn remove_binding(&self, binding: &Binding) -> Vec<ListenerError> {
        let copy = binding.remote_copy();
        let all = self.members.iter().map(|m| m.remove_binding(copy.clone()));
        futures::future::join_all(all)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect()
    }

    /// Waits up to `timeout` until every federator whose broker is up consumes; whether
    /// they all did.
    pub async fn wait_consuming(&self, registry: &ConnectionRegistry, timeout: Duration) -> bool {
        let reachable = self.members.iter().filter(|member| {
            member
                .sticky_broker()
                .is_some_and(|id| registry.is_available(id))
        });
        futures::future::join_all(reachable.map(|member| member.wait_consuming(true, timeout)))
            .await
            .into_iter()
            .all(|consuming| consuming)
    }

    /// Stops every federator at once, all by `end`.
    pub async fn stop(self, end: Instant) {
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

/// Tells the listener each time every federator whose broker is up consumes (after one
/// did not): Kazoo's `federators_consuming`.
async fn watch_consuming(
    members: Vec<ListenerHandle>,
    registry: ConnectionRegistry,
    parent: ActorRef<ListenerMsg>,
) {
    let mut receivers: Vec<watch::Receiver<bool>> =
        members.iter().map(ListenerHandle::consuming).collect();
    let mut brokers = registry.subscribe();
    let mut told = false;
    loop {
        let all = members.iter().zip(&receivers).all(|(member, consuming)| {
            *consuming.borrow()
                || member
                    .sticky_broker()
                    .is_none_or(|id| !registry.is_available(id))
        });
        if all && !told && parent.cast(ListenerMsg::FederatorsConsuming).is_err() {
            return;
        }
        told = all;
        let changes = receivers.iter_mut().map(|r| Box::pin(r.changed()));
        tokio::select! {
            (changed, _, _) = futures::future::select_all(changes) => {
                if changed.is_err() {
                    return;
                }
            }
            changed = brokers.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}
