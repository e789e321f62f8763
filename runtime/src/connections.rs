//! The connections supervisor (one_for_one over one connection actor per broker) and the
//! handle the rest of warren uses to add brokers and take channels.
//!
//! The supervisor's children are the brokers the registry marks as added; when the
//! supervisor itself is restarted it starts one connection actor per added broker again,
//! so nothing depends on bootstrap running twice. It keeps the directory of the connection
//! actor serving each broker (recorded as the supervisor starts one), through which
//! channels are taken. This module owns the wiring only: the connection life-cycle is in
//! `connection_actor`, availability in `registry`.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use ractor::{Actor, ActorCell, ActorRef, ActorStatus};

use crate::actor_slot::ActorSlot;
use crate::broker::{Broker, BrokerId};
use crate::connection_actor::{
    ChannelError, ConnectionActor, ConnectionArgs, ConnectionMsg, ConnectionReport,
    ConnectionSettings, STOP_WISH, TakenChannel,
};
use crate::registry::ConnectionRegistry;
use crate::supervisor::{
    self, ChildSpec, Intensity, StopDeadline, StopOrder, Supervisor, SupervisorMsg, SupervisorSpec,
    deadline,
};

/// How long a caller waits for a connection actor to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// Handle to the node's broker connections: cheap to clone.
#[derive(Clone)]
pub struct Connections {
    registry: ConnectionRegistry,
    settings: ConnectionSettings,
    supervisor: Arc<ActorSlot<SupervisorMsg>>,
    /// The connection actor last started for each broker, indexed by `BrokerId`.
    directory: Arc<Mutex<Vec<Option<ActorRef<ConnectionMsg>>>>>,
}

/// Why a broker could not be added.
#[derive(Debug, thiserror::Error)]
pub enum AddBrokerError {
    #[error("no broker {0} in the configuration")]
    Unknown(BrokerId),
    #[error("the connections supervisor is not running")]
    NotRunning,
    #[error("cannot start the connection of {broker}: {reason}")]
    Start { broker: String, reason: String },
}

impl Connections {
    pub fn new(registry: ConnectionRegistry, settings: ConnectionSettings) -> Self {
        let directory = vec![None; registry.brokers().len()];
        Connections {
            registry,
            settings,
            supervisor: Arc::default(),
            directory: Arc::new(Mutex::new(directory)),
        }
    }

    /// The registry these connections report to.
    pub fn registry(&self) -> &ConnectionRegistry {
        &self.registry
    }

    /// The settings every connection actor runs with (timeouts, backoff, buffer size).
    pub fn settings(&self) -> &ConnectionSettings {
        &self.settings
    }

    /// The child spec of the connections supervisor, for the node's root supervisor.
    pub fn supervisor_child(&self) -> ChildSpec {
        let this = self.clone();
        let deadline = StopDeadline::default();
        let told = deadline.clone();
        ChildSpec::new("connections", move |parent: ActorCell| {
            let (this, deadline) = (this.clone(), deadline.clone());
            async move {
                let children = this
                    .registry
                    .added()
                    .into_iter()
                    .map(|broker| this.connection_child(broker))
                    .collect();
                // One broker's connections never wait for another's.
                let spec = SupervisorSpec::one_for_one(
                    "connections",
                    StopOrder::Concurrent,
                    Intensity::new(10, Duration::from_secs(30)),
                    children,
                );
                let (actor, _) = Supervisor::spawn_linked(spec, deadline.clone(), parent).await?;
                this.supervisor.set(actor.clone());
                Ok(actor.get_cell())
            }
        })
        .shutdown(STOP_WISH + deadline::MARGIN)
        .told(told)
    }

    /// A broker's connection actor as a child; each (re)start records it in the directory.
    fn connection_child(&self, broker: Arc<Broker>) -> ChildSpec {
        let this = self.clone();
        let id = format!("connection:{}", broker.uri.redacted());
        let deadline = StopDeadline::default();
        let told = deadline.clone();
        ChildSpec::new(id, move |parent: ActorCell| {
            let args = ConnectionArgs {
                broker: broker.clone(),
                registry: this.registry.clone(),
                settings: this.settings.clone(),
                deadline: deadline.clone(),
            };
            let directory = this.directory.clone();
            async move {
                let id = args.broker.id;
                let (actor, _) = Actor::spawn_linked(None, ConnectionActor, args, parent).await?;
                if let Some(slot) = directory.lock().get_mut(id.0) {
                    *slot = Some(actor.clone());
                }
                Ok(actor.get_cell())
            }
        })
        .shutdown(STOP_WISH)
        .told(told)
    }

    /// The connection actor serving a broker now, if one runs.
    pub fn connection(&self, id: BrokerId) -> Option<ActorRef<ConnectionMsg>> {
        let actor = self.directory.lock().get(id.0).cloned().flatten()?;
        let gone = matches!(
            actor.get_status(),
            ActorStatus::Stopping | ActorStatus::Stopped
        );
        (!gone).then_some(actor)
    }

    /// Adds a broker: marks it in the registry and starts its connection actor, which
    /// connects in the background. Adding a broker twice is a no-op.
    pub async fn add_broker(&self, id: BrokerId) -> Result<(), AddBrokerError> {
        let broker = self
            .registry
            .broker(id)
            .cloned()
            .ok_or(AddBrokerError::Unknown(id))?;
        if !self.registry.mark_added(id) {
            return Ok(());
        }
        let supervisor = self.supervisor.get().ok_or(AddBrokerError::NotRunning)?;
        supervisor::start_child(&supervisor, self.connection_child(broker.clone()))
            .await
            .map(|_| ())
            .map_err(|e| AddBrokerError::Start {
                broker: broker.uri.redacted().to_string(),
                reason: e.to_string(),
            })
    }

    fn actor(&self, id: BrokerId) -> Result<ActorRef<ConnectionMsg>, ChannelError> {
        self.connection(id)
            .ok_or_else(|| ChannelError::NotConnected {
                broker: self.broker_name(id),
            })
    }

    fn broker_name(&self, id: BrokerId) -> String {
        self.registry
            .broker(id)
            .map_or_else(|| id.to_string(), |b| b.uri.redacted().to_string())
    }

    /// Takes a channel from a broker's prechannel buffer (opened on demand when it is empty).
    pub async fn take_channel(&self, id: BrokerId) -> Result<TakenChannel, ChannelError> {
        let actor = self.actor(id)?;
        ractor::call_t!(
            actor,
            ConnectionMsg::TakeChannel,
            ASK_TIMEOUT.as_millis() as u64
        )
        .map_err(|_| ChannelError::NoAnswer {
            broker: self.broker_name(id),
        })?
    }

    /// Opens a channel on a broker's publish connection (its generation is the publish
    /// connection's, see `BrokerStatus::publish_generation`).
    pub async fn publish_channel(&self, id: BrokerId) -> Result<TakenChannel, ChannelError> {
        let actor = self.actor(id)?;
        ractor::call_t!(
            actor,
            ConnectionMsg::OpenPublishChannel,
            ASK_TIMEOUT.as_millis() as u64
        )
        .map_err(|_| ChannelError::NoAnswer {
            broker: self.broker_name(id),
        })?
    }

    /// What a broker's connection actor says about itself.
    pub async fn inspect(&self, id: BrokerId) -> Result<ConnectionReport, ChannelError> {
        let actor = self.actor(id)?;
        ractor::call_t!(
            actor,
            ConnectionMsg::Inspect,
            ASK_TIMEOUT.as_millis() as u64
        )
        .map_err(|_| ChannelError::NoAnswer {
            broker: self.broker_name(id),
        })
    }
}
