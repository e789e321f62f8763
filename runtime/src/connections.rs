//! The connections supervisor (one_for_one over one connection actor per broker) and the
//! handle the rest of warren uses to add brokers and take channels.
//!
//! The supervisor's children are the brokers the registry marks as added; when the
//! supervisor itself is restarted it starts one connection actor per added broker again,
//! so nothing depends on bootstrap running twice. This module owns the wiring only: the
//! connection life-cycle is in `connection`, availability in `registry`.

use std::sync::Arc;
use std::time::Duration;

use ractor::{ActorCell, ActorRef};

use crate::actor_slot::ActorSlot;
use crate::backoff::Backoff;
use crate::connection::{
    ChannelError, ConnectionActor, ConnectionArgs, ConnectionMsg, ConnectionReport,
    ConnectionSettings, TakenChannel,
};
use crate::registry::{Broker, BrokerId, ConnectionRegistry};
use crate::supervisor::{
    self, ChildSpec, Intensity, Strategy, Supervisor, SupervisorMsg, SupervisorSpec,
};

/// How long a caller waits for a connection actor to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// Handle to the node's broker connections: cheap to clone.
#[derive(Clone)]
pub struct Connections {
    registry: ConnectionRegistry,
    settings: ConnectionSettings,
    supervisor: Arc<ActorSlot<SupervisorMsg>>,
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
        Connections {
            registry,
            settings,
            supervisor: Arc::default(),
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
        ChildSpec::new("connections", move |parent: ActorCell| {
            let this = this.clone();
            async move {
                let children = this
                    .registry
                    .added()
                    .into_iter()
                    .map(|broker| this.connection_child(broker))
                    .collect();
                let spec = SupervisorSpec {
                    name: "connections".to_string(),
                    strategy: Strategy::OneForOne,
                    intensity: Intensity {
                        max_restarts: 10,
                        within: Duration::from_secs(30),
                    },
                    backoff: Backoff::for_restarts(),
                    children,
                };
                let (actor, _) = Supervisor::spawn_linked(spec, parent).await?;
                this.supervisor.set(actor.clone());
                Ok(actor.get_cell())
            }
        })
    }

    fn connection_child(&self, broker: Arc<Broker>) -> ChildSpec {
        let registry = self.registry.clone();
        let settings = self.settings.clone();
        let id = format!("connection:{}", broker.uri.redacted());
        ChildSpec::actor(id, move || {
            let args = ConnectionArgs {
                broker: broker.clone(),
                registry: registry.clone(),
                settings: settings.clone(),
            };
            (ConnectionActor, args)
        })
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
        self.registry
            .connection(id)
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
