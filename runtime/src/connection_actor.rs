//! One broker's connections: a consume connection with a buffer of pre-opened channels,
//! and a dedicated publish connection. The two live, fail and reconnect independently: a
//! dead publish connection never takes consumers' channels with it.
//!
//! The actor connects in messages it sends itself (never in `pre_start`). After a failed
//! attempt it retries with exponential backoff and jitter (the first retry too). While the
//! broker's port refuses TCP it also probes the port cheaply (a plain TCP connect every
//! 125–250 ms) and tries AMQP as soon as the port accepts, whatever the backoff has grown
//! to, so a returning broker is noticed within a fraction of a second. A failure after TCP
//! was accepted (handshake, authentication, no answer) keeps backing off: a broker that
//! accepts TCP but refuses AMQP is not hammered. "cannot connect" is logged once per broker
//! and interval, with a count. Each connection takes its generation from the registry, so a
//! restarted actor never reuses one. Channel opens are bounded by `operation_timeout`.
//!
//! The actor always drains lapin's event streams, records `connection.blocked` in the
//! registry, and reports every change of either connection. lapin's own auto-recovery stays
//! off: warren moves channels itself, and two recovery layers would make duplicate consumers.
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
use crate::broker::{Broker, BrokerId, Role};
use crate::config::Config;
use crate::forward;
use crate::log_limit::LogLimit;
use crate::members::MemberCursor;
use crate::registry::{ConnectionEvent, ConnectionRegistry, StatusUpdate};
use crate::supervisor::StopDeadline;
use crate::tls::{self, Tls};
use crate::uri::{BrokerUri, redact_uri};

/// How often the actor double-checks that its connections are still up, in case an event
/// was missed. lapin reports a closed socket at once; this is only a backstop.
const HEALTH_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Bound for closing both connections on shutdown (less when the stop deadline is nearer).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Kept after closing, before the deadline, for reporting and exiting.
const CLOSE_MARGIN: Duration = Duration::from_millis(100);
/// What a connection actor asks of its parent to stop: closing, and a little for itself.
pub const STOP_WISH: Duration = Duration::from_millis(2500);
/// Pause between two TCP probes of a port that refuses connections: `delay(0)` of this
/// backoff, i.e. uniform in 125–250 ms.
const PROBE_PAUSE: Backoff = Backoff {
    min: Duration::from_millis(250),
    max: Duration::from_millis(250),
};
/// Bound of one TCP probe.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// Connection settings shared by every broker of a node.
#[derive(Clone, Debug)]
pub struct ConnectionSettings {
    /// The node name, used in the connection names the broker shows.
    pub node: String,
    pub heartbeat_secs: u16,
    pub connect_timeout: Duration,
    pub reconnect: Backoff,
    /// The backoff for brokers of other zones (longer at most).
    pub remote_reconnect: Backoff,
    /// Size of the prechannel buffer.
    pub prechannels: usize,
    /// Bound for one broker operation: a channel open here, `confirm.select` in the
    /// publisher. One that takes longer is an error like any other.
    pub operation_timeout: Duration,
    /// The TLS client settings for `amqps://` brokers (checked with the configuration).
    pub tls: Option<Tls>,
}

impl ConnectionSettings {
    pub fn from_config(config: &Config) -> Self {
        ConnectionSettings {
            node: config.service.node.clone(),
            heartbeat_secs: config.amqp.heartbeat_secs,
            connect_timeout: config.amqp.connect_timeout,
            reconnect: Backoff::new(config.amqp.reconnect_min, config.amqp.reconnect_max),
            remote_reconnect: Backoff::new(
                config.amqp.reconnect_min,
                config.amqp.remote_reconnect_max,
            ),
            prechannels: config.amqp.prechannels,
            operation_timeout: config.amqp.operation_timeout,
            tls: config.tls.clone(),
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

/// What a connection actor says about itself (for operators and tests). The unprefixed
/// fields describe the consume connection.
#[derive(Clone, Debug)]
pub struct ConnectionReport {
    pub connected: bool,
    /// The member the consume connection uses or tries next (redacted URI): the broker's
    /// URI, or one member of its cluster.
    pub member: String,
    /// The consume connection's current generation, or its last one while it is down.
    pub generation: u64,
    /// Channels ready in the buffer.
    pub prechannels: usize,
    /// Buffer refills in flight.
    pub opening: usize,
    pub failed_attempts: u32,
    pub last_error: Option<String>,
    pub publish_connected: bool,
    /// The member the publish connection uses or tries next (redacted URI).
    pub publish_member: String,
    pub publish_generation: u64,
    pub publish_failed_attempts: u32,
    pub publish_last_error: Option<String>,
}

/// Result of a connect attempt, sent by the connect task to the actor.
pub struct Attempt(Result<Connection, ConnectFailure>);

/// Why a connect attempt failed.
struct ConnectFailure {
    error: String,
    /// The broker's port refused the TCP connection (nothing listens there now).
    refused: bool,
}

/// Messages of a connection actor.
pub enum ConnectionMsg {
    /// Try to connect one connection (self-sent: at start and after a backoff delay).
    /// `token` names the wait it ends; a stale one is ignored.
    Connect { role: Role, token: u64 },
    /// The TCP probe saw the broker's port accept connections again.
    ProbeAccepted,
    /// A connect attempt finished.
    Opened { role: Role, attempt: Attempt },
    /// An event from one of lapin's event streams.
    Event {
        generation: u64,
        role: Role,
        event: Event,
    },
    /// A prechannel finished opening (or failed, or timed out).
    PrechannelOpened {
        generation: u64,
        result: Result<Channel, String>,
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
    /// By when the actor must have stopped, written by its parent as it stops it.
    pub deadline: StopDeadline,
}

/// The actor that owns one broker's connections.
pub struct ConnectionActor;

/// A live connection and the task draining its events.
struct Link {
    generation: u64,
    connection: Arc<Connection>,
    events: JoinHandle<()>,
}

impl Link {
    fn is_up(&self) -> bool {
        self.connection.status().connected()
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.events.abort();
    }
}

/// One of the broker's connections and its reconnect state.
struct Slot {
    role: Role,
    link: Option<Link>,
    /// A connect attempt is in flight.
    connecting: bool,
    /// Names the current wait between attempts; a `Connect` carrying another token comes
    /// from an earlier wait's timer and is ignored.
    token: u64,
    /// The last generation this connection had (0 before the first).
    generation: u64,
    /// Failed attempts since the connection was last up (reported).
    failed_attempts: u32,
    /// Exponent of the backoff: reset when the connection comes up, is lost, or when the
    /// port accepts again after refusing.
    step: u32,
    /// The last attempt failed because the port refused TCP: the probe may cut the wait.
    refused: bool,
    last_error: Option<String>,
    /// The cluster member this connection uses or tries next (one member for a plain
    /// broker).
    members: MemberCursor,
    /// The connection was lost and is moving to another member of the cluster: the
    /// registry hears of it only if no member answers.
    switching: bool,
}

impl Slot {
    fn new(role: Role, members: MemberCursor) -> Self {
        Slot {
            members,
            switching: false,
            role,
            link: None,
            connecting: false,
            token: 0,
            generation: 0,
            failed_attempts: 0,
            step: 0,
            refused: false,
            last_error: None,
        }
    }

    /// Waiting for its next attempt (neither connected nor connecting).
    fn waiting(&self) -> bool {
        self.link.is_none() && !self.connecting
    }

    fn status(&self) -> StatusUpdate {
        match &self.link {
            Some(link) => StatusUpdate::Up {
                role: self.role,
                generation: link.generation,
            },
            None => StatusUpdate::Down {
                role: self.role,
                error: self
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "not connected yet".to_string()),
                failed_attempts: self.failed_attempts,
            },
        }
    }
}

/// State of a connection actor.
pub struct ConnectionState {
    broker: Arc<Broker>,
    registry: ConnectionRegistry,
    settings: ConnectionSettings,
    deadline: StopDeadline,
    consume: Slot,
    publish: Slot,
    /// Prechannels on the consume connection (of `consume.link`'s generation).
    prechannels: VecDeque<Channel>,
    /// Buffer refills in flight.
    opening: usize,
    /// Probes the broker's port while it refuses TCP.
    probe: Option<JoinHandle<()>>,
    /// Keeps "cannot connect" and its kin to one line per interval.
    logs: LogLimit,
    health: Option<JoinHandle<()>>,
    /// Reports the status again whenever a registry actor starts.
    rereport: Option<JoinHandle<()>>,
}

impl ConnectionState {
    fn slot(&self, role: Role) -> &Slot {
        match role {
            Role::Consume => &self.consume,
            Role::Publish => &self.publish,
        }
    }

    fn slot_mut(&mut self, role: Role) -> &mut Slot {
        match role {
            Role::Consume => &mut self.consume,
            Role::Publish => &mut self.publish,
        }
    }

    fn report(&self) -> ConnectionReport {
        ConnectionReport {
            connected: self.consume.link.is_some(),
            member: self.member(Role::Consume).redacted().to_string(),
            generation: self.consume.generation,
            prechannels: self.prechannels.len(),
            opening: self.opening,
            failed_attempts: self.consume.failed_attempts,
            last_error: self.consume.last_error.clone(),
            publish_connected: self.publish.link.is_some(),
            publish_member: self.member(Role::Publish).redacted().to_string(),
            publish_generation: self.publish.generation,
            publish_failed_attempts: self.publish.failed_attempts,
            publish_last_error: self.publish.last_error.clone(),
        }
    }

    fn broker_name(&self) -> String {
        self.broker.uri.redacted().to_string()
    }

    /// The member `role`'s connection uses or tries next.
    fn member(&self, role: Role) -> &BrokerUri {
        let index = self.slot(role).members.current();
        self.broker.members.get(index).unwrap_or(&self.broker.uri)
    }

    fn not_connected(&self) -> ChannelError {
        ChannelError::NotConnected {
            broker: self.broker_name(),
        }
    }

    /// Starts a connect attempt for `role` if `token` names its current wait.
    fn connect(&mut self, myself: &ActorRef<ConnectionMsg>, role: Role, token: u64) {
        let slot = self.slot_mut(role);
        if !slot.waiting() || slot.token != token {
            return;
        }
        slot.connecting = true;
        let broker = self.broker.clone();
        let member = self.member(role).clone();
        let settings = self.settings.clone();
        let myself = myself.clone();
        tokio::spawn(async move {
            let attempt = Attempt(open_connection(&broker, &member, &settings, role).await);
            let _ = myself.cast(ConnectionMsg::Opened { role, attempt });
        });
    }

    /// The port accepts TCP again: every connection that was waiting because it refused
    /// tries at once, with its backoff started over.
    fn probe_accepted(&mut self, myself: &ActorRef<ConnectionMsg>) {
        self.probe = None;
        for role in [Role::Consume, Role::Publish] {
            let slot = self.slot_mut(role);
            if slot.waiting() && slot.refused {
                tracing::debug!(broker = %self.broker, role = role.name(), "the port accepts again; connecting now");
                let slot = self.slot_mut(role);
                slot.refused = false;
                slot.step = 0;
                slot.token += 1;
                let token = slot.token;
                self.connect(myself, role, token);
            }
        }
    }

    /// A connect attempt finished.
    fn opened(
        &mut self,
        myself: &ActorRef<ConnectionMsg>,
        role: Role,
        result: Result<Connection, ConnectFailure>,
    ) {
        self.slot_mut(role).connecting = false;
        match result {
            Ok(connection) => self.up(myself, role, connection),
            Err(failure) => self.failed(myself, role, failure),
        }
    }

    fn up(&mut self, myself: &ActorRef<ConnectionMsg>, role: Role, connection: Connection) {
        let generation = self.registry.next_generation(self.broker.id, role);
        self.registry
            .count(self.broker.id, role, ConnectionEvent::Opened);
        let events = drain_events(&connection, generation, role, myself.clone());
        let slot = self.slot_mut(role);
        slot.link = Some(Link {
            generation,
            connection: Arc::new(connection),
            events,
        });
        slot.generation = generation;
        slot.failed_attempts = 0;
        slot.step = 0;
        slot.refused = false;
        slot.switching = false;
        slot.members.connected();
        let member = self.member(role).redacted();
        tracing::info!(broker = %self.broker, %member, role = role.name(), generation, "connected");
        self.registry
            .report(self.broker.id, StatusUpdate::Up { role, generation });
        if self.consume.link.is_some() && self.publish.link.is_some() {
            self.stop_probe();
        }
        if role == Role::Consume {
            self.prechannels.clear();
            self.opening = 0;
            self.refill(myself);
        }
    }

    fn failed(&mut self, myself: &ActorRef<ConnectionMsg>, role: Role, failure: ConnectFailure) {
        let member = self.member(role).redacted().to_string();
        self.registry
            .count(self.broker.id, role, ConnectionEvent::Failed);
        let slot = self.slot_mut(role);
        slot.failed_attempts = slot.failed_attempts.saturating_add(1);
        slot.refused = failure.refused;
        slot.last_error = Some(failure.error.clone());
        let attempts = slot.failed_attempts;
        // Another member of the cluster not tried since the last success: at once.
        let next_member = slot.members.failed();
        let switching = slot.switching && next_member;
        slot.switching = switching;
        match self.logs.allow("cannot connect") {
            Some(held_back) => {
                tracing::warn!(broker = %self.broker, %member, role = role.name(), attempts, held_back, error = %failure.error, "cannot connect")
            }
            None => {
                tracing::debug!(broker = %self.broker, %member, role = role.name(), attempts, error = %failure.error, "cannot connect")
            }
        }
        if !switching {
            self.registry.report(
                self.broker.id,
                StatusUpdate::Down {
                    role,
                    error: failure.error,
                    failed_attempts: attempts,
                },
            );
        }
        if next_member {
            self.connect_now(myself, role);
            return;
        }
        self.schedule_connect(myself, role);
        if failure.refused {
            self.start_probe(myself);
        }
    }

    /// Starts an attempt of `role` at once (on another member of the cluster).
    fn connect_now(&mut self, myself: &ActorRef<ConnectionMsg>, role: Role) {
        let slot = self.slot_mut(role);
        slot.token += 1;
        let token = slot.token;
        self.connect(myself, role, token);
    }

    /// Schedules the next attempt of `role` after its backoff delay.
    fn schedule_connect(&mut self, myself: &ActorRef<ConnectionMsg>, role: Role) {
        let reconnect = if self.broker.local {
            self.settings.reconnect
        } else {
            self.settings.remote_reconnect
        };
        let slot = self.slot_mut(role);
        let delay = reconnect.delay(slot.step);
        slot.step = slot.step.saturating_add(1);
        slot.token += 1;
        let token = slot.token;
        tracing::debug!(broker = %self.broker, role = role.name(), delay_ms = delay.as_millis() as u64, "reconnect scheduled");
        myself.send_after(delay, move || ConnectionMsg::Connect { role, token });
    }

    /// Probes the broker's port until it accepts TCP (one probe task per broker).
    fn start_probe(&mut self, myself: &ActorRef<ConnectionMsg>) {
        if self.probe.as_ref().is_some_and(|p| !p.is_finished()) {
            return;
        }
        // Both connections try the same member unless one of them moved on alone; the
        // consume connection's is the one that matters for consumers.
        let member = self.member(Role::Consume);
        let host = member.host().to_string();
        let port = member.port();
        let myself = myself.clone();
        self.probe = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_PAUSE.delay(0)).await;
                let connect = tokio::net::TcpStream::connect((host.as_str(), port));
                if let Ok(Ok(_stream)) = tokio::time::timeout(PROBE_TIMEOUT, connect).await {
                    let _ = myself.cast(ConnectionMsg::ProbeAccepted);
                    return;
                }
            }
        }));
    }

    fn stop_probe(&mut self) {
        if let Some(probe) = self.probe.take() {
            probe.abort();
        }
    }

    /// A connection died: report, drop it (and, for consume, its prechannels), and
    /// schedule a reconnect. The other connection is not touched.
    fn lose(&mut self, myself: &ActorRef<ConnectionMsg>, role: Role, reason: String) {
        let reason = redact_uri(&reason);
        let slot = self.slot_mut(role);
        let Some(link) = slot.link.take() else {
            return;
        };
        slot.last_error = Some(reason.clone());
        slot.failed_attempts = 0;
        slot.step = 0;
        slot.refused = false;
        let generation = link.generation;
        close_in_background(link);
        self.registry
            .count(self.broker.id, role, ConnectionEvent::Lost);
        let member = self.member(role).redacted().to_string();
        if self.slot_mut(role).members.lost() {
            // A cluster: the same broker on another member, not a failover. The
            // registry keeps the broker (its grants die with this generation).
            let slot = self.slot_mut(role);
            slot.switching = true;
            let next = self.member(role).redacted().to_string();
            tracing::warn!(broker = %self.broker, %member, next_member = %next, role = role.name(), generation, %reason, "connection to a cluster member lost; moving to the next member");
            if role == Role::Consume {
                self.prechannels.clear();
                self.opening = 0;
            }
            self.connect_now(myself, role);
            return;
        }
        let key = format!("lost {}", role.name());
        match self.logs.allow(&key) {
            Some(held_back) => {
                tracing::warn!(broker = %self.broker, role = role.name(), generation, held_back, %reason, "connection lost")
            }
            None => {
                tracing::debug!(broker = %self.broker, role = role.name(), generation, %reason, "connection lost")
            }
        }
        if role == Role::Consume {
            // Dropping them closes them if the broker still has them.
            self.prechannels.clear();
            self.opening = 0;
        }
        self.registry.report(
            self.broker.id,
            StatusUpdate::Down {
                role,
                error: reason,
                failed_attempts: 0,
            },
        );
        self.schedule_connect(myself, role);
    }

    /// Starts as many channel opens as the buffer is short of.
    fn refill(&mut self, myself: &ActorRef<ConnectionMsg>) {
        let target = self.settings.prechannels;
        let Some(link) = self.consume.link.as_ref() else {
            return;
        };
        while self.prechannels.len() + self.opening < target {
            self.opening += 1;
            let connection = link.connection.clone();
            let generation = link.generation;
            let timeout = self.settings.operation_timeout;
            let myself = myself.clone();
            let opened = (self.registry.clone(), self.broker.id, Role::Consume);
            tokio::spawn(async move {
                let result = open_channel(&connection, timeout, opened).await;
                let _ = myself.cast(ConnectionMsg::PrechannelOpened { generation, result });
            });
        }
    }

    fn event(
        &mut self,
        myself: &ActorRef<ConnectionMsg>,
        role: Role,
        generation: u64,
        event: Event,
    ) {
        let Some(link) = self
            .slot(role)
            .link
            .as_ref()
            .filter(|l| l.generation == generation)
        else {
            return;
        };
        match event {
            Event::Error(error) => {
                if link.is_up() {
                    // A channel-level error: the channel's owner sees it itself.
                    tracing::debug!(broker = %self.broker, role = role.name(), %error, "channel error");
                } else {
                    self.lose(myself, role, format!("{} connection: {error}", role.name()));
                }
            }
            Event::ConnectionBlocked(reason) => self.registry.report(
                self.broker.id,
                StatusUpdate::Blocked {
                    role,
                    reason: Some(reason),
                },
            ),
            Event::ConnectionUnblocked => self
                .registry
                .report(self.broker.id, StatusUpdate::Blocked { role, reason: None }),
            other => {
                tracing::debug!(broker = %self.broker, role = role.name(), event = ?other, "connection event")
            }
        }
    }

    fn prechannel_opened(
        &mut self,
        myself: &ActorRef<ConnectionMsg>,
        generation: u64,
        result: Result<Channel, String>,
    ) {
        let Some(link) = self
            .consume
            .link
            .as_ref()
            .filter(|l| l.generation == generation)
        else {
            // A channel of a dead link: dropping it closes it if it is still open.
            return;
        };
        self.opening = self.opening.saturating_sub(1);
        match result {
            Ok(channel) => self.prechannels.push_back(channel),
            Err(error) if link.is_up() => match self.logs.allow("prechannel") {
                Some(held_back) => {
                    tracing::warn!(broker = %self.broker, held_back, %error, "cannot open a prechannel; retrying at the next check")
                }
                None => {
                    tracing::debug!(broker = %self.broker, %error, "cannot open a prechannel; retrying at the next check")
                }
            },
            Err(error) => self.lose(myself, Role::Consume, format!("opening a channel: {error}")),
        }
    }

    fn take_channel(
        &mut self,
        myself: &ActorRef<ConnectionMsg>,
        reply: RpcReplyPort<Result<TakenChannel, ChannelError>>,
    ) {
        let Some(link) = self.consume.link.as_ref() else {
            let _ = reply.send(Err(self.not_connected()));
            return;
        };
        let broker = self.broker.id;
        let generation = link.generation;
        let connection = link.connection.clone();
        // Skip channels the broker closed while they waited in the buffer.
        while let Some(channel) = self.prechannels.pop_front() {
            if channel.status().connected() {
                let _ = reply.send(Ok(TakenChannel {
                    channel,
                    broker,
                    generation,
                }));
                self.refill(myself);
                return;
            }
        }
        // Buffer empty: open one for this caller without making the actor wait.
        open_for(
            connection,
            self.settings.operation_timeout,
            broker,
            generation,
            self.broker_name(),
            (self.registry.clone(), self.broker.id, Role::Consume),
            reply,
        );
        self.refill(myself);
    }

    fn open_publish_channel(&self, reply: RpcReplyPort<Result<TakenChannel, ChannelError>>) {
        let Some(link) = self.publish.link.as_ref() else {
            let _ = reply.send(Err(self.not_connected()));
            return;
        };
        open_for(
            link.connection.clone(),
            self.settings.operation_timeout,
            self.broker.id,
            link.generation,
            self.broker_name(),
            (self.registry.clone(), self.broker.id, Role::Publish),
            reply,
        );
    }

    /// Reports both connections (and any block) to the registry again.
    fn report_status(&self) {
        for slot in [&self.consume, &self.publish] {
            self.registry.report(self.broker.id, slot.status());
            if slot
                .link
                .as_ref()
                .is_some_and(|l| l.connection.status().blocked())
            {
                self.registry.report(
                    self.broker.id,
                    StatusUpdate::Blocked {
                        role: slot.role,
                        reason: Some("blocked (reported again)".to_string()),
                    },
                );
            }
        }
    }

    /// The periodic backstop: a connection that closed without an event is lost; the
    /// buffer is topped up.
    fn check(&mut self, myself: &ActorRef<ConnectionMsg>) {
        for role in [Role::Consume, Role::Publish] {
            if self.slot(role).link.as_ref().is_some_and(|l| !l.is_up()) {
                self.lose(myself, role, format!("{} connection closed", role.name()));
            }
        }
        self.refill(myself);
    }
}

/// Closes a dead or unwanted connection without making the actor wait.
fn close_in_background(link: Link) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, close_link(&link)).await;
    });
}

async fn close_link(link: &Link) {
    let _ = link.connection.close(200, "warren: closing".into()).await;
}

/// Opens one lapin connection with the node's settings and a bounded handshake.
async fn open_connection(
    broker: &Broker,
    member: &BrokerUri,
    settings: &ConnectionSettings,
    role: Role,
) -> Result<Connection, ConnectFailure> {
    let mut uri = member.amqp().clone();
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(settings.heartbeat_secs);
    }
    let timeout_ms = settings.connect_timeout.as_millis() as u64;
    uri.query.connection_timeout = Some(timeout_ms);
    let name = format!("{}/{}", settings.node, role.name());
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let connect = async {
        match (&settings.tls, member.is_tls()) {
            (Some(tls), true) => {
                tls::connect(uri, tls, broker.server_name(member), properties).await
            }
            // The configuration loads TLS settings whenever a broker uses amqps://.
            (None, true) => Err(lapin::Error::from(std::io::Error::other(
                "amqps:// without TLS settings",
            ))),
            (_, false) => Connection::connect_uri(uri, properties).await,
        }
    };
    match tokio::time::timeout(settings.connect_timeout, connect).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(ConnectFailure {
            refused: refused(&error),
            error: redact_uri(&format!("{} connection: {error}", role.name())),
        }),
        Err(_) => Err(ConnectFailure {
            error: format!(
                "{} connection: no answer within {timeout_ms} ms",
                role.name()
            ),
            refused: false,
        }),
    }
}

/// Whether a connect error means nothing accepts TCP on the broker's port (so probing the
/// port tells when to try again), as opposed to a failure after TCP was accepted.
fn refused(error: &lapin::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        lapin::ErrorKind::IOError(io) if matches!(
            io.kind(),
            ErrorKind::ConnectionRefused | ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable
        )
    )
}

/// Where an opened channel is counted: the registry, the broker and the connection.
type ChannelOpened = (ConnectionRegistry, BrokerId, Role);

/// Opens a channel, waiting at most `timeout` for the broker's `channel.open-ok`. A channel
/// that arrives later is dropped, which closes it.
async fn open_channel(
    connection: &Connection,
    timeout: Duration,
    opened: ChannelOpened,
) -> Result<Channel, String> {
    match tokio::time::timeout(timeout, connection.create_channel()).await {
        Ok(Ok(channel)) => {
            let (registry, broker, role) = opened;
            registry.channel_opened(broker, role, &channel);
            Ok(channel)
        }
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!(
            "no channel.open-ok within {} ms",
            timeout.as_millis()
        )),
    }
}

/// Opens a channel on `connection` for a caller and answers it, without making the actor
/// wait for the broker.
fn open_for(
    connection: Arc<Connection>,
    timeout: Duration,
    broker: BrokerId,
    generation: u64,
    name: String,
    opened: ChannelOpened,
    reply: RpcReplyPort<Result<TakenChannel, ChannelError>>,
) {
    tokio::spawn(async move {
        let result = open_channel(&connection, timeout, opened)
            .await
            .map(|channel| TakenChannel {
                channel,
                broker,
                generation,
            })
            .map_err(|error| ChannelError::Open {
                broker: name,
                error,
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
        args.deadline.clear();
        for role in [Role::Consume, Role::Publish] {
            // A restarted actor has no connection yet, whatever its killed predecessor
            // last reported: grants of the old generations are dead.
            args.registry.report(
                args.broker.id,
                StatusUpdate::Down {
                    role,
                    error: format!("{} connection: connecting", role.name()),
                    failed_attempts: 0,
                },
            );
            myself.cast(ConnectionMsg::Connect { role, token: 0 })?;
        }
        // One order for both connections, so that they start on the same member.
        let members = MemberCursor::shuffled(args.broker.members.len());
        Ok(ConnectionState {
            broker: args.broker,
            registry: args.registry,
            settings: args.settings,
            deadline: args.deadline,
            consume: Slot::new(Role::Consume, members.clone()),
            publish: Slot::new(Role::Publish, members),
            prechannels: VecDeque::new(),
            opening: 0,
            probe: None,
            logs: LogLimit::default(),
            health: None,
            rereport: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut ConnectionState,
    ) -> Result<(), ActorProcessingErr> {
        state.health = Some(myself.send_interval(HEALTH_CHECK_EVERY, || ConnectionMsg::Check));
        // A restarted registry knows nothing: tell it again what this actor knows.
        state.rereport = Some(forward::each_change(
            state.registry.restarts(),
            myself,
            || ConnectionMsg::ReportStatus,
        ));
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut ConnectionState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ConnectionMsg::Connect { role, token } => state.connect(&myself, role, token),
            ConnectionMsg::ProbeAccepted => state.probe_accepted(&myself),
            ConnectionMsg::Opened { role, attempt } => state.opened(&myself, role, attempt.0),
            ConnectionMsg::Event {
                generation,
                role,
                event,
            } => state.event(&myself, role, generation, event),
            ConnectionMsg::PrechannelOpened { generation, result } => {
                state.prechannel_opened(&myself, generation, result)
            }
            ConnectionMsg::TakeChannel(reply) => state.take_channel(&myself, reply),
            ConnectionMsg::OpenPublishChannel(reply) => state.open_publish_channel(reply),
            ConnectionMsg::Inspect(reply) => {
                let _ = reply.send(state.report());
            }
            ConnectionMsg::ReportStatus => state.report_status(),
            ConnectionMsg::Check => state.check(&myself),
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut ConnectionState,
    ) -> Result<(), ActorProcessingErr> {
        for task in [state.health.take(), state.rereport.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
        state.stop_probe();
        state.prechannels.clear();
        let links: Vec<Link> = [state.consume.link.take(), state.publish.link.take()]
            .into_iter()
            .flatten()
            .collect();
        if !links.is_empty() {
            let closing = futures::future::join_all(links.iter().map(close_link));
            let left = state
                .deadline
                .or_own(STOP_WISH)
                .saturating_duration_since(tokio::time::Instant::now());
            let bound = CLOSE_TIMEOUT.min(left.saturating_sub(CLOSE_MARGIN));
            if tokio::time::timeout(bound, closing).await.is_err() {
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
