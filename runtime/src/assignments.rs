//! Assignments: which client holds which channel, on which broker.
//!
//! A client never picks a broker. It registers with a [`ChannelKind`] and receives
//! [`GrantEvent`]s: `Granted(grant)` with a channel, and `Lost { number }` when that
//! channel's connection dies. Float clients are served from the current primary and are
//! moved at once when it is lost (no fixed deferral); when a broker ahead of the current
//! primary returns, each float client gets a new grant there first (`replaces` names the
//! old one; make-before-break). From then on the old grant is the client's alone: it drains
//! it, decides when the drain ends, and gives the channel back with [`Client::release`];
//! assignments keeps no record of it. Sticky clients never move. Every grant carries a
//! number, so a stale event or a late channel is recognised and dropped.
//!
//! A broker that cannot hand out a channel (down, or refusing channels) is asked again per
//! client after a jittered, growing delay (reset by a success), and the refusals are
//! logged once per broker and interval with a count, not once per retry.
//!
//! Assignments owns grants and reservations, and closes every channel it handed out (the
//! one closer: two closes of one channel racing each other make lapin drop the whole
//! connection). Channels come from the connections' prechannel buffers
//! (`Connections::take_channel`); availability comes from the registry. It must not touch
//! queues, AMQP consumers, messages or drains: those belong to the listener.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::Channel;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::actor_slot::ActorSlot;
use crate::backoff::Backoff;
use crate::broker::{Broker, BrokerId};
use crate::connection_actor::{ChannelError, TakenChannel};
use crate::connections::Connections;
use crate::forward;
use crate::log_limit::LogLimit;
use crate::registry::ConnectionRegistry;
use crate::supervisor::ChildSpec;

/// Delays between a client's attempts to take a channel from a broker that could not
/// hand one out: 100–200 ms for the first retry, doubling up to 5 s.
const RETRY_TAKE: Backoff = Backoff {
    min: Duration::from_millis(200),
    max: Duration::from_secs(5),
};

/// Where a client's channel may come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelKind {
    /// From the current primary; moved on failover and back on fail-back (the default).
    Float,
    /// From this broker only; waits while it is down, never moves.
    Broker(BrokerId),
    /// From the first available broker carrying this tag, in registry order (local zone
    /// first): a tag written for the broker in config.ini (`tags = [...]`) or its zone's
    /// name, which every broker carries (see `Broker::has_tag`). Once granted it sticks
    /// to that broker.
    Tag(String),
}

/// A channel granted to one client.
pub struct Grant {
    pub channel: Channel,
    pub broker: Arc<Broker>,
    /// Increases with every grant of the same client; events for older numbers are
    /// stale.
    pub number: u64,
    /// The generation of the broker connection the channel lives on.
    pub connection: u64,
    /// Set on fail-back: the number of the grant this one replaces. That grant is the
    /// client's from now on: it drains it, and gives its channel back with
    /// [`Client::release`] (or, if it does not hold it any more, has nothing to do).
    pub replaces: Option<u64>,
}

/// What assignments tells a client.
pub enum GrantEvent {
    /// A new channel: replay the topology on it.
    Granted(Grant),
    /// The channel of the client's current grant is gone (its connection died). A float
    /// client gets a new grant right after; a sticky one when its broker returns. A
    /// replaced grant the client drains is its own to watch.
    Lost { number: u64 },
}

/// Identifies a registered client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientId(u64);

/// A client's side of the conversation: report losses and releases. Dropping the
/// matching [`Grants`] unregisters the client and closes its channels.
#[derive(Clone)]
pub struct Client {
    id: ClientId,
    actor: ActorRef<AssignmentsMsg>,
}

impl Client {
    /// The client gave up on the channel of this grant (e.g. its AMQP consumer stream
    /// ended with an error) and gives it back. Assignments closes it, and answers with
    /// `Lost` (if it did not know yet) and a new grant.
    pub fn report_lost(&self, number: u64, channel: Channel) {
        let _ = self
            .actor
            .cast(AssignmentsMsg::LostReported(self.id, number, channel));
    }

    /// The client is done with the channel of a grant that was replaced (it drained it):
    /// assignments closes it.
    pub fn release(&self, channel: Channel) {
        let _ = self.actor.cast(AssignmentsMsg::Release(channel));
    }
}

/// The stream of grant events of one client.
pub struct Grants {
    rx: mpsc::UnboundedReceiver<GrantEvent>,
}

impl Grants {
    /// The next event; `None` once assignments stopped.
    pub async fn next(&mut self) -> Option<GrantEvent> {
        self.rx.recv().await
    }
}

impl futures::Stream for Grants {
    type Item = GrantEvent;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<GrantEvent>> {
        self.rx.poll_recv(cx)
    }
}

/// Why a client could not register.
#[derive(Debug, thiserror::Error)]
pub enum AssignmentsError {
    #[error("assignments is not running")]
    NotRunning,
}

/// One grant as reported by [`Assignments::inspect`].
#[derive(Clone, Debug)]
pub struct GrantInfo {
    pub client: String,
    pub kind: ChannelKind,
    pub broker: BrokerId,
    pub number: u64,
}

/// What assignments holds right now (for operators and tests).
#[derive(Clone, Debug, Default)]
pub struct AssignmentsReport {
    pub grants: Vec<GrantInfo>,
    /// Clients waiting for a channel.
    pub reservations: Vec<String>,
}

/// Handle to the assignments actor: cheap to clone, survives its restarts.
#[derive(Clone)]
pub struct Assignments {
    actor: Arc<ActorSlot<AssignmentsMsg>>,
    connections: Connections,
    next_id: Arc<std::sync::atomic::AtomicU64>,
    /// Failovers and fail-backs so far; they outlive restarts of the actor.
    figures: Arc<AssignmentFigures>,
}

/// How often grants moved: to another broker when theirs was lost (failover), and back
/// to the primary once it returned (fail-back).
#[derive(Default)]
pub struct AssignmentFigures {
    failovers: std::sync::atomic::AtomicU64,
    fail_backs: std::sync::atomic::AtomicU64,
}

impl crate::metrics::Source for Assignments {
    fn report(&self, report: &mut crate::metrics::Report) {
        use std::sync::atomic::Ordering::Relaxed;
        report.counter(
            "warren_assignments_failovers",
            "Channels granted on another broker after the client's broker was lost.",
            vec![],
            self.figures.failovers.load(Relaxed),
        );
        report.counter(
            "warren_assignments_fail_backs",
            "Channels granted back on the primary once it returned (make-before-break).",
            vec![],
            self.figures.fail_backs.load(Relaxed),
        );
    }
}

impl Assignments {
    pub fn new(connections: Connections) -> Self {
        Assignments {
            actor: Arc::default(),
            connections,
            next_id: Arc::new(std::sync::atomic::AtomicU64::new(1)),
            figures: Arc::default(),
        }
    }

    /// The child spec of the assignments actor, for the node's root supervisor.
    pub fn child(&self) -> ChildSpec {
        let this = self.clone();
        ChildSpec::new("assignments", move |parent: ActorCell| {
            let this = this.clone();
            async move {
                let args = (this.connections.clone(), this.figures.clone());
                let (actor, _) = Actor::spawn_linked(None, AssignmentsActor, args, parent).await?;
                this.actor.set(actor.clone());
                Ok(actor.get_cell())
            }
        })
    }

    /// Registers a client. Its channel arrives later as `Granted` on the returned events.
    pub fn register(
        &self,
        label: impl Into<String>,
        kind: ChannelKind,
    ) -> Result<(Client, Grants), AssignmentsError> {
        let actor = self.actor.get().ok_or(AssignmentsError::NotRunning)?;
        let id = ClientId(
            self.next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        );
        let (tx, rx) = mpsc::unbounded_channel();
        actor
            .cast(AssignmentsMsg::Register {
                id,
                label: label.into(),
                kind,
                tx,
            })
            .map_err(|_| AssignmentsError::NotRunning)?;
        Ok((Client { id, actor }, Grants { rx }))
    }

    /// The current grants and reservations.
    pub async fn inspect(&self) -> Result<AssignmentsReport, AssignmentsError> {
        let actor = self.actor.get().ok_or(AssignmentsError::NotRunning)?;
        ractor::call_t!(actor, AssignmentsMsg::Inspect, 5_000)
            .map_err(|_| AssignmentsError::NotRunning)
    }
}

/// Messages of the assignments actor.
pub enum AssignmentsMsg {
    Register {
        id: ClientId,
        label: String,
        kind: ChannelKind,
        tx: mpsc::UnboundedSender<GrantEvent>,
    },
    /// The client's event receiver is gone (it stopped or died).
    Unregister(ClientId),
    LostReported(ClientId, u64, Channel),
    /// A client gives back the channel of a replaced grant.
    Release(Channel),
    /// A channel requested for a client arrived (or could not be had).
    Taken {
        id: ClientId,
        token: u64,
        result: Box<Result<TakenChannel, ChannelError>>,
    },
    /// Retry serving a client after a failed take.
    Retry(ClientId),
    /// Some broker's status changed.
    RegistryChanged,
    Inspect(RpcReplyPort<AssignmentsReport>),
}

/// A grant as assignments keeps it.
struct Held {
    number: u64,
    broker: BrokerId,
    /// The broker connection generation the channel lives on.
    connection: u64,
    channel: Channel,
}

/// Why a channel is being taken for a client.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Purpose {
    /// The client has no active grant.
    Fresh,
    /// The client has a float grant off the primary: make-before-break.
    FailBack,
}

struct Pending {
    token: u64,
    purpose: Purpose,
    broker: BrokerId,
}

struct ClientEntry {
    label: String,
    kind: ChannelKind,
    tx: mpsc::UnboundedSender<GrantEvent>,
    /// For `Tag` clients: the broker the tag resolved to at the first grant.
    stuck_to: Option<BrokerId>,
    active: Option<Held>,
    pending: Option<Pending>,
    /// A retry is scheduled after a failed take.
    retrying: bool,
    /// Failed takes in a row (the retry backoff's exponent); reset by a granted channel.
    take_failures: u32,
    next_number: u64,
    /// The broker of the client's last grant: a fresh grant elsewhere is a failover.
    last_broker: Option<BrokerId>,
    watcher: JoinHandle<()>,
}

impl Drop for ClientEntry {
    fn drop(&mut self) {
        self.watcher.abort();
        if let Some(held) = self.active.take() {
            close_in_background(held.channel);
        }
    }
}

/// State of the assignments actor.
pub struct AssignmentsState {
    connections: Connections,
    registry: ConnectionRegistry,
    clients: HashMap<ClientId, ClientEntry>,
    next_token: u64,
    registry_watch: Option<JoinHandle<()>>,
    /// Keeps "no channel from the broker" to one line per broker and interval.
    logs: LogLimit,
    figures: Arc<AssignmentFigures>,
}

/// The actor behind [`Assignments`].
pub struct AssignmentsActor;

fn close_in_background(channel: Channel) {
    tokio::spawn(async move {
        if channel.status().connected() {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                channel.close(200, "warren: grant released".into()),
            )
            .await;
        }
    });
}

impl AssignmentsState {
    /// Whether a held grant still lives on a connection that is up.
    fn alive(&self, held: &Held) -> bool {
        self.registry
            .status(held.broker)
            .is_some_and(|s| s.available && s.generation == held.connection)
    }

    /// The broker a client should be served from now, if any.
    fn target(&mut self, id: ClientId) -> Option<BrokerId> {
        let registry = self.registry.clone();
        let entry = self.clients.get_mut(&id)?;
        match &entry.kind {
            ChannelKind::Float => registry.primary().map(|b| b.id),
            ChannelKind::Broker(broker) => registry.is_available(*broker).then_some(*broker),
            ChannelKind::Tag(tag) => match entry.stuck_to {
                Some(broker) => registry.is_available(broker).then_some(broker),
                None => registry
                    .brokers()
                    .iter()
                    .find(|b| b.has_tag(tag) && registry.is_available(b.id))
                    .map(|b| b.id),
            },
        }
    }

    /// Brings one client in line with the registry: drop a dead grant (telling the
    /// client), serve a client without a grant, start fail-back for a float client
    /// that is off the primary.
    fn reconcile(&mut self, myself: &ActorRef<AssignmentsMsg>, id: ClientId) {
        let Some(entry) = self.clients.get(&id) else {
            return;
        };
        if entry.active.as_ref().is_some_and(|h| !self.alive(h)) {
            self.lose(id);
        }

        let Some(entry) = self.clients.get(&id) else {
            return;
        };
        if entry.pending.is_some() || entry.retrying {
            return;
        }
        let active_broker = entry.active.as_ref().map(|h| h.broker);
        let is_float = entry.kind == ChannelKind::Float;
        let Some(target) = self.target(id) else {
            if active_broker.is_none() {
                tracing::debug!(client = %self.label(id), "no broker for this client yet; reserved");
            }
            return;
        };
        match active_broker {
            None => self.take(myself, id, target, Purpose::Fresh),
            Some(current) if is_float && current != target => {
                self.take(myself, id, target, Purpose::FailBack)
            }
            Some(_) => {}
        }
    }

    fn label(&self, id: ClientId) -> String {
        self.clients
            .get(&id)
            .map_or_else(|| format!("{id:?}"), |e| e.label.clone())
    }

    /// Tells the client that its grant is lost and forgets it.
    fn lose(&mut self, id: ClientId) {
        let Some(entry) = self.clients.get_mut(&id) else {
            return;
        };
        let Some(held) = entry.active.take() else {
            return;
        };
        tracing::info!(client = %entry.label, number = held.number, broker = %held.broker, "grant lost");
        let _ = entry.tx.send(GrantEvent::Lost {
            number: held.number,
        });
        close_in_background(held.channel);
    }

    /// Asks the broker's connection for a channel without blocking the actor.
    fn take(
        &mut self,
        myself: &ActorRef<AssignmentsMsg>,
        id: ClientId,
        broker: BrokerId,
        purpose: Purpose,
    ) {
        self.next_token += 1;
        let token = self.next_token;
        let Some(entry) = self.clients.get_mut(&id) else {
            return;
        };
        entry.pending = Some(Pending {
            token,
            purpose,
            broker,
        });
        let connections = self.connections.clone();
        let myself = myself.clone();
        tokio::spawn(async move {
            let result = connections.take_channel(broker).await;
            let _ = myself.cast(AssignmentsMsg::Taken {
                id,
                token,
                result: Box::new(result),
            });
        });
    }

    fn taken(
        &mut self,
        myself: &ActorRef<AssignmentsMsg>,
        id: ClientId,
        token: u64,
        result: Result<TakenChannel, ChannelError>,
    ) {
        let registry = self.registry.clone();
        let Some(entry) = self.clients.get_mut(&id) else {
            return;
        };
        let Some(pending) = entry.pending.take_if(|p| p.token == token) else {
            // A stale answer: the channel (if any) is dropped, which closes it.
            return;
        };
        let taken = match result {
            Ok(taken) => taken,
            Err(error) => {
                let delay = RETRY_TAKE.delay(entry.take_failures);
                entry.take_failures = entry.take_failures.saturating_add(1);
                entry.retrying = true;
                myself.send_after(delay, move || AssignmentsMsg::Retry(id));
                let key = format!("no channel {}", pending.broker);
                let broker = registry
                    .broker(pending.broker)
                    .map_or_else(|| pending.broker.to_string(), |b| b.to_string());
                let retry_ms = delay.as_millis() as u64;
                let attempts = entry.take_failures;
                match self.logs.allow(&key) {
                    Some(held_back) => {
                        tracing::warn!(%broker, client = %entry.label, attempts, held_back, retry_ms, %error, "no channel from the broker; retrying")
                    }
                    None => {
                        tracing::debug!(%broker, client = %entry.label, attempts, retry_ms, %error, "no channel from the broker; retrying")
                    }
                }
                return;
            }
        };
        entry.take_failures = 0;
        let current = registry.status(taken.broker);
        if !current.is_some_and(|s| s.available && s.generation == taken.generation) {
            // The connection died while the channel was on its way.
            self.reconcile(myself, id);
            return;
        }
        let Some(broker) = registry.broker(taken.broker).cloned() else {
            return;
        };
        entry.next_number += 1;
        let number = entry.next_number;
        if let ChannelKind::Tag(_) = entry.kind {
            entry.stuck_to.get_or_insert(taken.broker);
        }
        let held = Held {
            number,
            broker: taken.broker,
            connection: taken.generation,
            channel: taken.channel.clone(),
        };
        let counter = match pending.purpose {
            Purpose::FailBack => Some(&self.figures.fail_backs),
            Purpose::Fresh if entry.last_broker.is_some_and(|b| b != taken.broker) => {
                Some(&self.figures.failovers)
            }
            Purpose::Fresh => None,
        };
        if let Some(counter) = counter {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        entry.last_broker = Some(taken.broker);
        // On fail-back the old grant becomes the client's to drain and give back.
        let (replaced, replaces) = match pending.purpose {
            Purpose::FailBack => {
                let old = entry.active.take();
                let number = old.as_ref().map(|old| old.number);
                (old, number)
            }
            Purpose::Fresh => {
                if let Some(old) = entry.active.take() {
                    close_in_background(old.channel);
                }
                (None, None)
            }
        };
        entry.active = Some(held);
        tracing::info!(client = %entry.label, number, broker = %broker, replaces, "channel granted");
        let grant = Grant {
            channel: taken.channel,
            broker,
            number,
            connection: taken.generation,
            replaces,
        };
        if entry.tx.send(GrantEvent::Granted(grant)).is_err() {
            // Nobody took the old grant over: it is still ours to close.
            if let Some(old) = replaced {
                close_in_background(old.channel);
            }
            self.clients.remove(&id);
            return;
        }
        // The registry may have changed while the channel was on its way (e.g. the primary
        // returned): check again, which starts a fail-back if needed.
        self.reconcile(myself, id);
    }
}

impl Actor for AssignmentsActor {
    type Msg = AssignmentsMsg;
    type State = AssignmentsState;
    type Arguments = (Connections, Arc<AssignmentFigures>);

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        (connections, figures): (Connections, Arc<AssignmentFigures>),
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(AssignmentsState {
            registry: connections.registry().clone(),
            connections,
            figures,
            clients: HashMap::new(),
            next_token: 0,
            registry_watch: None,
            logs: LogLimit::default(),
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut AssignmentsState,
    ) -> Result<(), ActorProcessingErr> {
        state.registry_watch = Some(forward::each_change(
            state.registry.subscribe(),
            myself,
            || AssignmentsMsg::RegistryChanged,
        ));
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut AssignmentsState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            AssignmentsMsg::Register {
                id,
                label,
                kind,
                tx,
            } => {
                let watcher = {
                    let tx = tx.clone();
                    let myself = myself.clone();
                    tokio::spawn(async move {
                        tx.closed().await;
                        let _ = myself.cast(AssignmentsMsg::Unregister(id));
                    })
                };
                tracing::debug!(client = %label, ?kind, "client registered");
                state.clients.insert(
                    id,
                    ClientEntry {
                        label,
                        kind,
                        tx,
                        stuck_to: None,
                        active: None,
                        pending: None,
                        retrying: false,
                        take_failures: 0,
                        next_number: 0,
                        last_broker: None,
                        watcher,
                    },
                );
                state.reconcile(&myself, id);
            }
            AssignmentsMsg::Unregister(id) => {
                if let Some(entry) = state.clients.remove(&id) {
                    tracing::debug!(client = %entry.label, "client gone; its channels are closed");
                }
            }
            AssignmentsMsg::LostReported(id, number, channel) => {
                let is_active = state
                    .clients
                    .get(&id)
                    .and_then(|e| e.active.as_ref())
                    .is_some_and(|h| h.number == number);
                if is_active {
                    // `lose` closes the active grant's channel, which is this one.
                    state.lose(id);
                } else {
                    // A grant already replaced (handed over on fail-back): ours to close.
                    close_in_background(channel);
                }
                state.reconcile(&myself, id);
            }
            AssignmentsMsg::Release(channel) => close_in_background(channel),
            AssignmentsMsg::Taken { id, token, result } => {
                state.taken(&myself, id, token, *result);
            }
            AssignmentsMsg::Retry(id) => {
                if let Some(entry) = state.clients.get_mut(&id) {
                    entry.retrying = false;
                }
                state.reconcile(&myself, id);
            }
            AssignmentsMsg::RegistryChanged => {
                let ids: Vec<ClientId> = state.clients.keys().copied().collect();
                for id in ids {
                    state.reconcile(&myself, id);
                }
            }
            AssignmentsMsg::Inspect(reply) => {
                let mut report = AssignmentsReport::default();
                for entry in state.clients.values() {
                    if let Some(held) = &entry.active {
                        report.grants.push(GrantInfo {
                            client: entry.label.clone(),
                            kind: entry.kind.clone(),
                            broker: held.broker,
                            number: held.number,
                        });
                    }
                    if entry.active.is_none() {
                        report.reservations.push(entry.label.clone());
                    }
                }
                let _ = reply.send(report);
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut AssignmentsState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(watch) = state.registry_watch.take() {
            watch.abort();
        }
        state.clients.clear();
        Ok(())
    }
}
