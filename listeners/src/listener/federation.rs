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
//! Owns: which brokers get a federator, what a federator declares and runs, and when its
//! listener hears that they consume. Must not touch: running them (the listener's actor
//! starts, changes and stops its federators, which are listener actors like itself).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use warren_runtime::assignments::ChannelKind;
use warren_runtime::broker::{Broker, BrokerId};
use warren_runtime::readiness::Readiness;
use warren_runtime::registry::ConnectionRegistry;
use warren_runtime::supervisor::{ChildSpec, Intensity, StopOrder, SupervisorSpec};

use super::event::Event;
use super::shared::ListenerShared;
use super::spec::{Binding, ListenerSpec, QueueName};
use super::validate::SpecError;
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

/// A federator as the watcher sees it: its broker, and whether it consumes.
pub(crate) struct Watched {
    pub broker: BrokerId,
    pub consuming: watch::Receiver<bool>,
}

/// Calls `notify` each time every federator whose broker is up consumes (after one did
/// not): Kazoo's `federators_consuming`. Ends when `notify` says nobody listens.
pub(crate) async fn watch_consuming(
    mut members: Vec<Watched>,
    registry: ConnectionRegistry,
    notify: impl Fn() -> bool,
) {
    let mut brokers = registry.subscribe();
    let mut told = false;
    loop {
        let all = members
            .iter()
            .all(|m| *m.consuming.borrow() || !registry.is_available(m.broker));
        if all && !told && !notify() {
            return;
        }
        told = all;
        let changes = members.iter_mut().map(|m| Box::pin(m.consuming.changed()));
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

/// The state of the federator of `parent` on the remote `broker`: it runs the parent's
/// responders and reports to `readiness` (the federators' own, not the node's).
pub(crate) fn federator_shared(
    parent: &Arc<ListenerShared>,
    broker: Arc<Broker>,
    readiness: &Readiness,
) -> Result<Arc<ListenerShared>, SpecError> {
    let federator = Federator {
        parent: parent.clone(),
        broker,
    };
    let mut origin = parent.origin.clone();
    origin.node.readiness = readiness.clone();
    ListenerShared::build(Arc::new(federator), origin, Some(parent.responders.clone()))
}

/// The brokers of the other zones: one federator each.
pub(crate) fn remote_brokers(parent: &ListenerShared) -> Vec<Arc<Broker>> {
    parent
        .origin
        .node
        .registry
        .brokers()
        .iter()
        .filter(|b| !b.local)
        .cloned()
        .collect()
}

/// The supervisor spec of a listener's federators: one for one, stopped all at once.
pub(crate) fn supervisor_spec(parent: &ListenerShared, children: Vec<ChildSpec>) -> SupervisorSpec {
    SupervisorSpec::one_for_one(
        format!("federators:{}", parent.name),
        StopOrder::Concurrent,
        INTENSITY,
        children,
    )
}
