//! One broker's connections: a consume connection, a dedicated publish connection, and a
//! buffer of pre-opened channels on the consume connection.
//!
//! The actor connects in a message it sends itself (never in `pre_start`), retries with
//! exponential backoff and jitter (the first connect too), always drains lapin's event
//! streams, records `connection.blocked` in the registry, and on any loss reports the broker
//! unavailable and reconnects. lapin's own auto-recovery stays off: warren moves channels
//! itself, and two recovery layers would make duplicate consumers.
//!
//! It owns the lapin `Connection`s and the prechannel buffer. It must not decide which
//! consumer gets which channel (that is assignments' job) nor write the registry directly.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::{Channel, Connection, ConnectionProperties, Event};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::registry::{Broker, BrokerId, ConnectionRegistry, StatusUpdate};
use crate::uri::redact_uri;

/// How often the actor double-checks that its connections are still up, in case an event
/// was missed. lapin reports a closed socket at once; this is only a backstop.
const HEALTH_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Bound for closing both connections on shutdown.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Connection settings shared by every broker of a node.
#[derive(Clone, Debug)]
pub struct ConnectionSettings {
    /// The node name, used in the connection names the broker shows.
    pub node: String,
    pub heartbeat_secs: u16,
    pub connect_timeout: Duration,
    pub reconnect: Backoff,
    /// Size of the prechannel buffer.
    pub prechannels: usize,
}

impl ConnectionSettings {
    pub fn from_config(config: &Config) -> Self {
        ConnectionSettings {
            node: config.service.node.clone(),
            heartbeat_secs: config.amqp.heartbeat_secs,
            connect_timeout: config.amqp.connect_timeout,
            reconnect: Backoff::new(config.amqp.reconnect_min, config.amqp.reconnect_max),
            prechannels: config.amqp.prechannels,
        }
    }
}

/// Which of a broker's two connections an event or channel belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Consumers' channels (and the prechannel buffer).
    Consume,
    /// Publishers' channels, so that a blocked publisher never stalls consumers.
    Publish,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Consume => "consume",
            Role::Publish => "publish",
        }
    }
}

/// A channel handed out by a connection, tagged with the connection generation it lives on.
pub struct TakenChannel {
    pub channel: Channel,
    pub broker: BrokerId,
    pub generation: u64,
}

/// Why a channel could not be handed out.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("broker {broker} is not connected")]
    NotConnected { broker: String },
    #[error("cannot open a channel on {broker}: {error}")]
    Open { broker: String, error: String },
    #[error("the connection actor of broker {broker} did not answer")]
    NoAnswer { broker: String },
}

/// What a connection actor says about itself (for operators and tests).
#[derive(Clone, Debug)]
pub struct ConnectionReport {
    pub connected: bool,
    pub generation: u64,
    /// Channels ready in the buffer.
    pub prechannels: usize,
    /// Buffer refills in flight.
    pub opening: usize,
    pub failed_attempts: u32,
    pub last_error: Option<String>,
}

/// Result of a connect attempt, sent by the connect task to the actor.
pub struct Opened(Result<Box<(Connection, Connection)>, String>);

/// Messages of a connection actor.
pub enum ConnectionMsg {
    /// Try to connect (self-sent, first at start, then after each backoff delay).
    Connect,
    /// A connect attempt finished.
    Opened(Opened),
    /// An event from one of lapin's event streams.
    Event {
        generation: u64,
        role: Role,
        event: Event,
    },
    /// A prechannel finished opening.
    PrechannelOpened {
        generation: u64,
        result: Result<Channel, lapin::Error>,
    },
    /// Take a channel from the buffer (one is opened on demand if the buffer is empty).
    TakeChannel(RpcReplyPort<Result<TakenChannel, ChannelError>>),
    /// Open a channel on the publish connection.
    OpenPublishChannel(RpcReplyPort<Result<TakenChannel, ChannelError>>),
    /// Describe yourself.
    Inspect(RpcReplyPort<ConnectionReport>),
    /// Report your status to the registry again (asked by a restarted registry).
    ReportStatus,
    /// Periodic health check.
    Check,
}

/// Arguments of a connection actor.
pub struct ConnectionArgs {
    pub broker: Arc<Broker>,
    pub registry: ConnectionRegistry,
    pub settings: ConnectionSettings,
}

/// The actor that owns one broker's connections.
pub struct ConnectionActor;

/// A live pair of connections and what hangs off them.
struct Link {
    generation: u64,
    consume: Arc<Connection>,
    publish: Arc<Connection>,
    prechannels: VecDeque<Channel>,
    opening: usize,
    event_tasks: Vec<JoinHandle<()>>,
}

impl Link {
    fn connection(&self, role: Role) -> &Arc<Connection> {
        match role {
            Role::Consume => &self.consume,
            Role::Publish => &self.publish,
        }
    }

    fn is_up(&self) -> bool {
        self.consume.status().connected() && self.publish.status().connected()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for task in &self.event_tasks {
            task.abort();
        }
    }
}

/// State of a connection actor.
pub struct ConnectionState {
    broker: Arc<Broker>,
    registry: ConnectionRegistry,
    settings: ConnectionSettings,
    link: Option<Link>,
    /// Generation of the last link; the next one gets `generation + 1`.
    generation: u64,
    connecting: bool,
    failed_attempts: u32,
    last_error: Option<String>,
    health: Option<JoinHandle<()>>,
}

impl ConnectionState {
    fn report(&self) -> ConnectionReport {
        ConnectionReport {
            connected: self.link.is_some(),
            generation: self.generation,
            prechannels: self.link.as_ref().map_or(0, |l| l.prechannels.len()),
            opening: self.link.as_ref().map_or(0, |l| l.opening),
            failed_attempts: self.failed_attempts,
            last_error: self.last_error.clone(),
        }
    }

    fn broker_name(&self) -> String {
        self.broker.uri.redacted().to_string()
    }

    fn not_connected(&self) -> ChannelError {
        ChannelError::NotConnected {
            broker: self.broker_name(),
        }
    }

    /// Starts as many channel opens as the buffer is short of.
    fn refill(&mut self, myself: &ActorRef<ConnectionMsg>) {
        let target = self.settings.prechannels;
        let Some(link) = self.link.as_mut() else {
            return;
        };
        while link.prechannels.len() + link.opening < target {
            link.opening += 1;
            let connection = link.consume.clone();
            let generation = link.generation;
            let myself = myself.clone();
            tokio::spawn(async move {
                let result = connection.create_channel().await;
                let _ = myself.cast(ConnectionMsg::PrechannelOpened { generation, result });
            });
        }
    }

    /// The link died: report, drop it, and schedule a reconnect.
    fn lose(&mut self, myself: &ActorRef<ConnectionMsg>, reason: String) {
        let Some(link) = self.link.take() else {
            return;
        };
        let reason = redact_uri(&reason);
        tracing::warn!(broker = %self.broker, generation = link.generation, %reason, "connection lost");
        close_in_background(link);
        self.last_error = Some(reason.clone());
        self.failed_attempts = 0;
        self.registry.report(
            self.broker.id,
            StatusUpdate::Down {
                error: reason,
                failed_attempts: 0,
            },
        );
        self.schedule_connect(myself);
    }

    fn schedule_connect(&mut self, myself: &ActorRef<ConnectionMsg>) {
        let delay = self.settings.reconnect.delay(self.failed_attempts);
        tracing::debug!(broker = %self.broker, delay_ms = delay.as_millis() as u64, "reconnect scheduled");
        myself.send_after(delay, || ConnectionMsg::Connect);
    }
}

/// Closes a dead or unwanted link's connections without making the actor wait.
fn close_in_background(link: Link) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, close_link(&link)).await;
    });
}

async fn close_link(link: &Link) {
    let consume = link.consume.close(200, "warren: closing".into());
    let publish = link.publish.close(200, "warren: closing".into());
    let _ = futures::future::join(consume, publish).await;
}

/// Opens one lapin connection with the node's settings and a bounded handshake.
async fn open_connection(
    broker: &Broker,
    settings: &ConnectionSettings,
    role: Role,
) -> Result<Connection, String> {
    let mut uri = broker.uri.amqp().clone();
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(settings.heartbeat_secs);
    }
    let timeout_ms = settings.connect_timeout.as_millis() as u64;
    uri.query.connection_timeout = Some(timeout_ms);
    let name = format!("{}/{}", settings.node, role.name());
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(
        settings.connect_timeout,
        Connection::connect_uri(uri, properties),
    )
    .await
    {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(redact_uri(&format!("{} connection: {error}", role.name()))),
        Err(_) => Err(format!(
            "{} connection: no answer within {timeout_ms} ms",
            role.name()
        )),
    }
}

/// Opens a channel on `connection` for a caller and answers it, without making the actor
/// wait for the broker.
fn open_for(
    connection: Arc<Connection>,
    broker: BrokerId,
    generation: u64,
    name: String,
    reply: RpcReplyPort<Result<TakenChannel, ChannelError>>,
) {
    tokio::spawn(async move {
        let result = connection
            .create_channel()
            .await
            .map(|channel| TakenChannel {
                channel,
                broker,
                generation,
            })
            .map_err(|error| ChannelError::Open {
                broker: name,
                error: error.to_string(),
            });
        let _ = reply.send(result);
    });
}

/// Forwards every event of one connection to the actor, so lapin's queue never grows.
fn drain_events(
    connection: &Connection,
    generation: u64,
    role: Role,
    myself: ActorRef<ConnectionMsg>,
) -> JoinHandle<()> {
    let mut events = connection.events_listener();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if myself
                .cast(ConnectionMsg::Event {
                    generation,
                    role,
                    event,
                })
                .is_err()
            {
                break;
            }
        }
    })
}

impl Actor for ConnectionActor {
    type Msg = ConnectionMsg;
    type State = ConnectionState;
    type Arguments = ConnectionArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ConnectionArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        args.registry
            .attach_connection(args.broker.id, myself.clone());
        myself.cast(ConnectionMsg::Connect)?;
        Ok(ConnectionState {
            broker: args.broker,
            registry: args.registry,
            settings: args.settings,
            link: None,
            generation: 0,
            connecting: false,
            failed_attempts: 0,
            last_error: None,
            health: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut ConnectionState,
    ) -> Result<(), ActorProcessingErr> {
        state.health = Some(myself.send_interval(HEALTH_CHECK_EVERY, || ConnectionMsg::Check));
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut ConnectionState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ConnectionMsg::Connect => {
                if state.link.is_some() || state.connecting {
                    return Ok(());
                }
                state.connecting = true;
                let broker = state.broker.clone();
                let settings = state.settings.clone();
                let myself = myself.clone();
                tokio::spawn(async move {
                    let consume = open_connection(&broker, &settings, Role::Consume).await;
                    let result = match consume {
                        Ok(consume) => open_connection(&broker, &settings, Role::Publish)
                            .await
                            .map(|publish| Box::new((consume, publish))),
                        Err(error) => Err(error),
                    };
                    let _ = myself.cast(ConnectionMsg::Opened(Opened(result)));
                });
            }
            ConnectionMsg::Opened(Opened(result)) => {
                state.connecting = false;
                match result {
                    Ok(pair) => {
                        let (consume, publish) = *pair;
                        state.generation += 1;
                        let generation = state.generation;
                        let event_tasks = vec![
                            drain_events(&consume, generation, Role::Consume, myself.clone()),
                            drain_events(&publish, generation, Role::Publish, myself.clone()),
                        ];
                        state.link = Some(Link {
                            generation,
                            consume: Arc::new(consume),
                            publish: Arc::new(publish),
                            prechannels: VecDeque::new(),
                            opening: 0,
                            event_tasks,
                        });
                        state.failed_attempts = 0;
                        tracing::info!(broker = %state.broker, generation, "connected");
                        state
                            .registry
                            .report(state.broker.id, StatusUpdate::Up { generation });
                        state.refill(&myself);
                    }
                    Err(error) => {
                        state.failed_attempts = state.failed_attempts.saturating_add(1);
                        if state.failed_attempts == 1 || state.failed_attempts.is_multiple_of(10) {
                            tracing::warn!(broker = %state.broker, attempts = state.failed_attempts, %error, "cannot connect");
                        } else {
                            tracing::debug!(broker = %state.broker, attempts = state.failed_attempts, %error, "cannot connect");
                        }
                        state.last_error = Some(error.clone());
                        state.registry.report(
                            state.broker.id,
                            StatusUpdate::Down {
                                error,
                                failed_attempts: state.failed_attempts,
                            },
                        );
                        state.schedule_connect(&myself);
                    }
                }
            }
            ConnectionMsg::Event {
                generation,
                role,
                event,
            } => {
                let Some(link) = state.link.as_ref().filter(|l| l.generation == generation) else {
                    return Ok(());
                };
                match event {
                    Event::Error(error) => {
                        if link.connection(role).status().connected() {
                            // A channel-level error: the channel's owner sees it itself.
                            tracing::debug!(broker = %state.broker, role = role.name(), %error, "channel error");
                        } else {
                            state.lose(&myself, format!("{} connection: {error}", role.name()));
                        }
                    }
                    Event::ConnectionBlocked(reason) => state.registry.report(
                        state.broker.id,
                        StatusUpdate::Blocked {
                            publish: role == Role::Publish,
                            reason: Some(reason),
                        },
                    ),
                    Event::ConnectionUnblocked => state.registry.report(
                        state.broker.id,
                        StatusUpdate::Blocked {
                            publish: role == Role::Publish,
                            reason: None,
                        },
                    ),
                    other => {
                        tracing::debug!(broker = %state.broker, role = role.name(), event = ?other, "connection event")
                    }
                }
            }
            ConnectionMsg::PrechannelOpened { generation, result } => {
                let Some(link) = state.link.as_mut().filter(|l| l.generation == generation) else {
                    // A channel of a dead link: dropping it closes it if it is still open.
                    return Ok(());
                };
                link.opening = link.opening.saturating_sub(1);
                match result {
                    Ok(channel) => link.prechannels.push_back(channel),
                    Err(error) => {
                        if link.is_up() {
                            tracing::warn!(broker = %state.broker, %error, "cannot open a prechannel; retrying at the next check");
                        } else {
                            state.lose(&myself, format!("opening a channel: {error}"));
                        }
                    }
                }
            }
            ConnectionMsg::TakeChannel(reply) => {
                let Some(link) = state.link.as_mut() else {
                    let _ = reply.send(Err(state.not_connected()));
                    return Ok(());
                };
                let broker = state.broker.id;
                let generation = link.generation;
                // Skip channels the broker closed while they waited in the buffer.
                while let Some(channel) = link.prechannels.pop_front() {
                    if channel.status().connected() {
                        let _ = reply.send(Ok(TakenChannel {
                            channel,
                            broker,
                            generation,
                        }));
                        state.refill(&myself);
                        return Ok(());
                    }
                }
                // Buffer empty: open one for this caller without making the actor wait.
                open_for(
                    link.consume.clone(),
                    broker,
                    generation,
                    state.broker_name(),
                    reply,
                );
                state.refill(&myself);
            }
            ConnectionMsg::OpenPublishChannel(reply) => {
                let Some(link) = state.link.as_ref() else {
                    let _ = reply.send(Err(state.not_connected()));
                    return Ok(());
                };
                open_for(
                    link.publish.clone(),
                    state.broker.id,
                    link.generation,
                    state.broker_name(),
                    reply,
                );
            }
            ConnectionMsg::Inspect(reply) => {
                let _ = reply.send(state.report());
            }
            ConnectionMsg::ReportStatus => {
                let update = match &state.link {
                    Some(link) => StatusUpdate::Up {
                        generation: link.generation,
                    },
                    None => StatusUpdate::Down {
                        error: state
                            .last_error
                            .clone()
                            .unwrap_or_else(|| "not connected yet".to_string()),
                        failed_attempts: state.failed_attempts,
                    },
                };
                state.registry.report(state.broker.id, update);
                if let Some(link) = &state.link {
                    for role in [Role::Consume, Role::Publish] {
                        if link.connection(role).status().blocked() {
                            state.registry.report(
                                state.broker.id,
                                StatusUpdate::Blocked {
                                    publish: role == Role::Publish,
                                    reason: Some("blocked (reported again)".to_string()),
                                },
                            );
                        }
                    }
                }
            }
            ConnectionMsg::Check => {
                let down = state.link.as_ref().is_some_and(|l| !l.is_up());
                if down {
                    state.lose(&myself, "connection closed".to_string());
                } else {
                    state.refill(&myself);
                }
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut ConnectionState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(health) = state.health.take() {
            health.abort();
        }
        state.registry.detach_connection(state.broker.id, &myself);
        if let Some(link) = state.link.take() {
            if tokio::time::timeout(CLOSE_TIMEOUT, close_link(&link))
                .await
                .is_err()
            {
                tracing::warn!(broker = %state.broker, "connections did not close in time");
            } else {
                tracing::info!(broker = %state.broker, "connections closed");
            }
        }
        state
            .registry
            .report(state.broker.id, StatusUpdate::Stopped);
        Ok(())
    }
}
