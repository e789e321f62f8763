//! The connection registry: which brokers exist, in which zone, and which are available.
//!
//! Readers (assignments, publishers, tests, the binary) look at a `parking_lot` snapshot
//! without a message round trip, the way Kazoo callers read the `kz_amqp_connections` ETS
//! table. Only the registry actor writes the status table; connection actors send it their
//! status. A registry actor that (re)starts bumps a counter every connection actor watches,
//! and each reports its status again: its state is rebuilt from them, not from nothing. It
//! never holds a connection actor's address.
//!
//! A broker has two connections, reported separately: the consume connection (consumers,
//! prechannels, the primary) and the publish connection (publishers). The registry also
//! hands out connection generations, per broker and connection, from counters that live
//! as long as the registry: a restarted connection actor never reuses one.
//!
//! This module owns availability and connection generations (broker identity is `broker`'s).
//! It must not touch lapin connections, channels or connection actors: those belong to
//! `connection_actor` and `connections`.

mod intermediaries;

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::watch;

use crate::actor_slot::ActorSlot;
use crate::broker::{Broker, BrokerId, Role};
use crate::config::Config;

use intermediaries::Intermediaries;
pub use intermediaries::Intermediary;

/// What the registry knows about one broker right now.
///
/// It exists so that everyone who needs a broker (assignments, the publisher, bootstrap,
/// tests) reads one snapshot instead of asking the connection actor.
#[derive(Clone, Debug)]
pub struct BrokerStatus {
    /// The broker's consume connection is up: consumers and prechannels can be served,
    /// and a local broker can be primary.
    pub available: bool,
    /// Generation of the consume connection: it grows each time that connection comes
    /// up and is never reused for the broker (not even by a restarted connection actor),
    /// so consumers tell an old connection's channels from a new one's.
    pub generation: u64,
    /// The broker's publish connection is up (it lives and reconnects independently of
    /// the consume connection).
    pub publish_available: bool,
    /// Generation of the publish connection, with the same guarantees as `generation`.
    pub publish_generation: u64,
    /// Failed connect attempts of the publish connection since it was last up.
    pub publish_failed_attempts: u32,
    /// `connection.blocked` reason for the publish connection, if the broker blocked it.
    pub publish_blocked: Option<String>,
    /// `connection.blocked` reason for the consume connection, if the broker blocked it.
    pub consume_blocked: Option<String>,
    /// The last connect or connection error of either connection (passwords redacted;
    /// the message names the connection).
    pub last_error: Option<String>,
    /// Failed connect attempts of the consume connection since it was last up.
    pub failed_attempts: u32,
    /// When `available` last changed.
    pub since: Instant,
}

impl BrokerStatus {
    fn new() -> Self {
        BrokerStatus {
            available: false,
            generation: 0,
            publish_available: false,
            publish_generation: 0,
            publish_failed_attempts: 0,
            publish_blocked: None,
            consume_blocked: None,
            last_error: None,
            failed_attempts: 0,
            since: Instant::now(),
        }
    }
}

/// A change a connection actor reports about one of its broker's connections.
#[derive(Clone, Debug)]
pub enum StatusUpdate {
    /// The connection is up, with this generation (from [`ConnectionRegistry::next_generation`]).
    Up { role: Role, generation: u64 },
    /// The connection went down, or a connect attempt failed.
    Down {
        role: Role,
        error: String,
        failed_attempts: u32,
    },
    /// The connection actor stopped (node shutdown or a restart of the actor): both
    /// connections are gone.
    Stopped,
    /// The broker blocked or unblocked the connection (`reason` None = unblocked).
    Blocked { role: Role, reason: Option<String> },
}

/// Startup gave up: no local broker became available in time. Names every broker tried.
#[derive(Debug, thiserror::Error)]
#[error("no broker of the local zone `{zone}` became available within {}s; tried:{}", .waited.as_secs(), tried_list(.tried))]
pub struct NotReady {
    pub zone: String,
    pub waited: Duration,
    /// (redacted URI, zone, last error) for every broker.
    pub tried: Vec<(String, String, Option<String>)>,
}

fn tried_list(tried: &[(String, String, Option<String>)]) -> String {
    let mut out = String::new();
    for (uri, zone, error) in tried {
        let error = error
            .as_deref()
            .unwrap_or("no connection attempt finished yet");
        out.push_str(&format!("\n  {uri} (zone {zone}): {error}"));
    }
    out
}

/// How often one of a broker's connections opened, was lost and failed to open.
/// A copy of one connection's counts: opened, lost, failed attempts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionTally {
    pub opened: u64,
    pub lost: u64,
    pub failed: u64,
}

#[derive(Default)]
struct ConnectionCounts {
    opened: AtomicU64,
    lost: AtomicU64,
    failed: AtomicU64,
    channels_opened: AtomicU64,
    /// The state of every channel opened on the current connection, shared with lapin
    /// (it does not keep a channel open): the open ones are counted at a scrape.
    channels: Mutex<Vec<lapin::ChannelStatus>>,
}

impl ConnectionCounts {
    /// The channels open now; forgets those that closed.
    fn open_channels(&self) -> usize {
        let mut channels = self.channels.lock();
        channels.retain(|status| !is_closed(status));
        channels.iter().filter(|status| status.connected()).count()
    }
}

/// Whether a channel is closed for good (closed, failed, or its connection gone).
fn is_closed(status: &lapin::ChannelStatus) -> bool {
    !(status.connected() || status.initializing() || status.closing())
}

/// What happened to a connection, for the counts the metrics report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionEvent {
    Opened,
    Lost,
    Failed,
}

/// Shared handle to the registry: cheap to clone, read without a round trip.
#[derive(Clone)]
pub struct ConnectionRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    local_zone: String,
    brokers: Vec<Arc<Broker>>,
    /// Indexed by `BrokerId`. Written only by the registry actor.
    status: RwLock<Vec<BrokerStatus>>,
    /// Brokers that bootstrap (or an operator) added; the connections supervisor starts
    /// one connection actor for each. Indexed by `BrokerId`.
    added: RwLock<Vec<bool>>,
    /// Bumped each time a registry actor starts: connection actors watch it and report
    /// again, so a restarted registry is rebuilt from them.
    restarts: watch::Sender<u64>,
    /// The registry actor, for connection actors to send their status to.
    actor: ActorSlot<RegistryMsg>,
    /// The last generation handed out per broker, [consume, publish]. Outlives connection
    /// actors (and the registry actor), so generations are never reused.
    generations: Mutex<Vec<[u64; 2]>>,
    /// Connections opened, lost and failed to open per broker, [consume, publish]; like
    /// the generations, they outlive connection actors.
    counts: Vec<[ConnectionCounts; 2]>,
    /// Bumped on every status change; `wait_until_ready` and subscribers watch it.
    version: watch::Sender<u64>,
    /// The local zone's AMQP 1.0 intermediaries (`amqp10_brokers`): the AMQP 1.0
    /// keeper's list and what it reported.
    intermediaries: Intermediaries,
}

impl ConnectionRegistry {
    /// Builds the broker list from the config: local zone first, then the other zones, each
    /// in config order. No broker is added (connected) yet; bootstrap does that.
    pub fn new(config: &Config) -> Self {
        // Local zone first, then the other zones; brokers in config order within a zone.
        let zones = config
            .zones
            .iter()
            .filter(|z| z.local)
            .chain(config.zones.iter().filter(|z| !z.local));
        let mut brokers: Vec<Arc<Broker>> = Vec::new();
        for zone in zones {
            for configured in &zone.brokers {
                brokers.push(Arc::new(Broker {
                    id: BrokerId(brokers.len()),
                    zone: zone.name.clone(),
                    local: zone.local,
                    uri: configured.uri.clone(),
                    members: configured.members.clone(),
                    tags: configured.tags.clone(),
                    server_name: configured.server_name.clone(),
                }));
            }
        }
        let n = brokers.len();
        let (version, _) = watch::channel(0);
        ConnectionRegistry {
            inner: Arc::new(Inner {
                local_zone: config.amqp.zone.clone(),
                brokers,
                status: RwLock::new((0..n).map(|_| BrokerStatus::new()).collect()),
                added: RwLock::new(vec![false; n]),
                restarts: watch::Sender::new(0),
                actor: ActorSlot::default(),
                generations: Mutex::new(vec![[0, 0]; n]),
                counts: (0..n).map(|_| Default::default()).collect(),
                version,
                intermediaries: Intermediaries::new(&config.local_zone().amqp10_brokers),
            }),
        }
    }

    /// The local zone's AMQP 1.0 intermediaries, in `amqp10_brokers` order (the first is
    /// the primary), with what the AMQP 1.0 keeper reported of each.
    pub fn intermediaries(&self) -> Vec<Intermediary> {
        self.inner.intermediaries.snapshot()
    }

    /// The AMQP 1.0 keeper is connected to intermediary `index`, as `generation`.
    pub fn intermediary_up(&self, index: usize, generation: u64) {
        self.inner.intermediaries.up(index, generation);
        self.inner.version.send_modify(|v| *v += 1);
    }

    /// An attempt to intermediary `index` failed (`failed`), or its connection ended.
    pub fn intermediary_down(&self, index: usize, error: &str, failed: bool) {
        self.inner.intermediaries.down(index, error, failed);
        self.inner.version.send_modify(|v| *v += 1);
    }

    /// Counts a connection event of `role` on broker `id` (connection actors call this).
    pub fn count(&self, id: BrokerId, role: Role, event: ConnectionEvent) {
        let Some(counts) = self.inner.counts.get(id.0) else {
            return;
        };
        let counts = &counts[role_index(role)];
        let counter = match event {
            ConnectionEvent::Opened => &counts.opened,
            ConnectionEvent::Lost => &counts.lost,
            ConnectionEvent::Failed => &counts.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if event == ConnectionEvent::Lost {
            // Its channels went with it.
            counts.channels.lock().clear();
        }
    }

    /// Counts a channel opened on the connection of `role` to broker `id`, and keeps its
    /// state to count it while it is open.
    pub fn channel_opened(&self, id: BrokerId, role: Role, channel: &lapin::Channel) {
        let Some(counts) = self.inner.counts.get(id.0) else {
            return;
        };
        let counts = &counts[role_index(role)];
        counts.channels_opened.fetch_add(1, Ordering::Relaxed);
        let mut channels = counts.channels.lock();
        channels.retain(|status| !is_closed(status));
        channels.push(channel.status().clone());
    }

    /// This node's zone.
    pub fn local_zone(&self) -> &str {
        &self.inner.local_zone
    }

    /// Every configured broker, local zone first.
    pub fn brokers(&self) -> &[Arc<Broker>] {
        &self.inner.brokers
    }

    /// How often one of `broker`'s connections opened, was lost and failed to connect
    /// (what `warren_broker_connections_*` report), for parts that report them under
    /// names of their own (apps/event_pusher's MongooseIM-named metrics).
    pub fn connection_counts(&self, broker: BrokerId, role: Role) -> Option<ConnectionTally> {
        let counts = self.inner.counts.get(broker.0)?.get(role_index(role))?;
        Some(ConnectionTally {
            opened: counts.opened.load(Ordering::Relaxed),
            lost: counts.lost.load(Ordering::Relaxed),
            failed: counts.failed.load(Ordering::Relaxed),
        })
    }

    /// One broker by id.
    pub fn broker(&self, id: BrokerId) -> Option<&Arc<Broker>> {
        self.inner.brokers.get(id.0)
    }

    /// The brokers of one zone, in config order.
    pub fn brokers_in_zone(&self, zone: &str) -> Vec<Arc<Broker>> {
        self.inner
            .brokers
            .iter()
            .filter(|b| b.zone == zone)
            .cloned()
            .collect()
    }

    /// The primary: the first available broker of the local zone, in config order.
    pub fn primary(&self) -> Option<Arc<Broker>> {
        let status = self.inner.status.read();
        self.inner
            .brokers
            .iter()
            .find(|b| b.local && status[b.id.0].available)
            .cloned()
    }

    /// Whether a broker's consume connection is up.
    pub fn is_available(&self, id: BrokerId) -> bool {
        self.inner
            .status
            .read()
            .get(id.0)
            .is_some_and(|s| s.available)
    }

    /// Whether a broker's publish connection is up.
    pub fn is_publish_available(&self, id: BrokerId) -> bool {
        self.inner
            .status
            .read()
            .get(id.0)
            .is_some_and(|s| s.publish_available)
    }

    /// A new generation for one of a broker's connections: larger than every generation
    /// handed out for it before, by any connection actor. 0 for an unknown broker.
    pub(crate) fn next_generation(&self, id: BrokerId, role: Role) -> u64 {
        let mut generations = self.inner.generations.lock();
        let Some(slot) = generations.get_mut(id.0) else {
            return 0;
        };
        let counter = &mut slot[role.index()];
        *counter += 1;
        *counter
    }

    /// A copy of one broker's status.
    pub fn status(&self, id: BrokerId) -> Option<BrokerStatus> {
        self.inner.status.read().get(id.0).cloned()
    }

    /// Availability (of the consume connection) of every broker, indexed by `BrokerId`.
    pub fn availability(&self) -> Vec<bool> {
        self.inner
            .status
            .read()
            .iter()
            .map(|s| s.available)
            .collect()
    }

    /// A receiver that changes whenever any broker's status changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.version.subscribe()
    }

    /// Waits until a broker of the local zone is available and returns it (the primary).
    /// The condition is re-checked on every change, so a broker of another zone coming up
    /// does not end the wait.
    pub async fn wait_until_ready(&self, timeout: Duration) -> Result<Arc<Broker>, NotReady> {
        let mut changes = self.subscribe();
        let waited = tokio::time::timeout(timeout, async {
            loop {
                if let Some(primary) = self.primary() {
                    return Some(primary);
                }
                if changes.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        match waited {
            Ok(Some(primary)) => Ok(primary),
            _ => Err(self.not_ready(timeout)),
        }
    }

    fn not_ready(&self, waited: Duration) -> NotReady {
        let status = self.inner.status.read();
        NotReady {
            zone: self.inner.local_zone.clone(),
            waited,
            tried: self
                .inner
                .brokers
                .iter()
                .map(|b| {
                    (
                        b.uri.redacted().to_string(),
                        b.zone.clone(),
                        status[b.id.0].last_error.clone(),
                    )
                })
                .collect(),
        }
    }

    /// Marks a broker as added; the connections supervisor runs a connection for each
    /// added broker. Returns false if it was added already.
    pub(crate) fn mark_added(&self, id: BrokerId) -> bool {
        let mut added = self.inner.added.write();
        match added.get_mut(id.0) {
            Some(slot) if !*slot => {
                *slot = true;
                true
            }
            _ => false,
        }
    }

    /// Brokers that have been added, in id order.
    pub fn added(&self) -> Vec<Arc<Broker>> {
        let added = self.inner.added.read();
        self.inner
            .brokers
            .iter()
            .filter(|b| added[b.id.0])
            .cloned()
            .collect()
    }

    /// Changes each time a registry actor starts; a connection actor reports its status
    /// again on every change.
    pub(crate) fn restarts(&self) -> watch::Receiver<u64> {
        self.inner.restarts.subscribe()
    }

    /// Sends a status change to the registry actor. If the actor is restarting the update
    /// is lost, which is fine: the restarted actor asks every connection to report again.
    pub(crate) fn report(&self, id: BrokerId, update: StatusUpdate) {
        if let Some(actor) = self.inner.actor.get() {
            let _ = actor.cast(RegistryMsg::Update(id, update));
        }
    }

    /// Applies one update; only the registry actor calls this.
    fn apply(&self, id: BrokerId, update: StatusUpdate) {
        let Some(broker) = self.broker(id).cloned() else {
            return;
        };
        let primary_before = self.primary().map(|b| b.id);
        let stopping = matches!(update, StatusUpdate::Stopped);
        {
            let mut table = self.inner.status.write();
            let Some(status) = table.get_mut(id.0) else {
                return;
            };
            match update {
                StatusUpdate::Up { role, generation } => {
                    Self::up(&broker, status, role, generation)
                }
                StatusUpdate::Down {
                    role,
                    error,
                    failed_attempts,
                } => Self::down(&broker, status, role, error, failed_attempts),
                StatusUpdate::Stopped => {
                    tracing::debug!(broker = %broker, "connection actor stopped");
                    if status.available {
                        status.since = Instant::now();
                    }
                    status.available = false;
                    status.publish_available = false;
                    status.publish_blocked = None;
                    status.consume_blocked = None;
                }
                StatusUpdate::Blocked { role, reason } => {
                    match &reason {
                        Some(reason) => {
                            tracing::warn!(broker = %broker, connection = role.name(), %reason, "broker blocked the connection")
                        }
                        None => {
                            tracing::info!(broker = %broker, connection = role.name(), "broker unblocked the connection")
                        }
                    }
                    match role {
                        Role::Publish => status.publish_blocked = reason,
                        Role::Consume => status.consume_blocked = reason,
                    }
                }
            }
        }
        let primary_after = self.primary();
        if primary_before != primary_after.as_ref().map(|b| b.id) {
            match &primary_after {
                Some(p) => tracing::info!(primary = %p, "primary broker changed"),
                None if stopping => {}
                None => tracing::warn!(zone = %self.inner.local_zone, "no local broker available"),
            }
        }
        self.inner.version.send_modify(|v| *v += 1);
    }

    /// One connection came up.
    fn up(broker: &Broker, status: &mut BrokerStatus, role: Role, generation: u64) {
        match role {
            Role::Consume => {
                if !status.available {
                    tracing::info!(broker = %broker, generation, "broker available");
                    status.since = Instant::now();
                }
                status.available = true;
                status.generation = generation;
                status.failed_attempts = 0;
                status.consume_blocked = None;
            }
            Role::Publish => {
                if !status.publish_available {
                    tracing::info!(broker = %broker, generation, "publish connection up");
                }
                status.publish_available = true;
                status.publish_generation = generation;
                status.publish_failed_attempts = 0;
                status.publish_blocked = None;
            }
        }
    }

    /// One connection went down, or a connect attempt failed.
    fn down(
        broker: &Broker,
        status: &mut BrokerStatus,
        role: Role,
        error: String,
        failed_attempts: u32,
    ) {
        match role {
            Role::Consume => {
                if status.available {
                    tracing::warn!(broker = %broker, %error, "broker unavailable");
                    status.since = Instant::now();
                }
                status.available = false;
                status.failed_attempts = failed_attempts;
                status.consume_blocked = None;
            }
            Role::Publish => {
                if status.publish_available {
                    tracing::warn!(broker = %broker, %error, "publish connection down");
                }
                status.publish_available = false;
                status.publish_failed_attempts = failed_attempts;
                status.publish_blocked = None;
            }
        }
        status.last_error = Some(error);
    }
}

/// Messages of the registry actor.
pub enum RegistryMsg {
    /// A connection actor reports a change of its broker.
    Update(BrokerId, StatusUpdate),
}

/// The actor that owns writes to the registry's status table.
pub struct RegistryActor;

impl Actor for RegistryActor {
    type Msg = RegistryMsg;
    type State = ConnectionRegistry;
    type Arguments = ConnectionRegistry;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        registry: ConnectionRegistry,
    ) -> Result<Self::State, ActorProcessingErr> {
        registry.inner.actor.set(myself);
        Ok(registry)
    }

    async fn post_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        registry: &mut ConnectionRegistry,
    ) -> Result<(), ActorProcessingErr> {
        // Rebuild from the connections: each actor reports its status again.
        registry.inner.restarts.send_modify(|n| *n += 1);
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        registry: &mut ConnectionRegistry,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RegistryMsg::Update(id, update) => registry.apply(id, update),
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        registry: &mut ConnectionRegistry,
    ) -> Result<(), ActorProcessingErr> {
        registry.inner.actor.clear_if(&myself);
        Ok(())
    }
}

fn role_index(role: Role) -> usize {
    match role {
        Role::Consume => 0,
        Role::Publish => 1,
    }
}

/// Per broker and connection: up, blocked, and how often it opened, was lost and failed.
impl crate::metrics::Source for ConnectionRegistry {
    fn report(&self, report: &mut crate::metrics::Report) {
        let status = self.inner.status.read().clone();
        for (broker, status) in self.inner.brokers.iter().zip(status) {
            for role in [Role::Consume, Role::Publish] {
                let labels = || {
                    vec![
                        ("broker", broker.uri.redacted().to_string()),
                        ("zone", broker.zone.clone()),
                        ("connection", role.name().to_string()),
                    ]
                };
                let (up, blocked) = match role {
                    Role::Consume => (status.available, status.consume_blocked.is_some()),
                    Role::Publish => (status.publish_available, status.publish_blocked.is_some()),
                };
                report.gauge(
                    "warren_broker_connection_up",
                    "Whether the connection to the broker is open (1) or not (0).",
                    labels(),
                    i64::from(up),
                );
                report.gauge(
                    "warren_broker_connection_blocked",
                    "Whether the broker blocked the connection (connection.blocked, e.g. a memory alarm).",
                    labels(),
                    i64::from(blocked),
                );
                let counts = &self.inner.counts[broker.id.0][role_index(role)];
                for (name, help, counter) in [
                    (
                        "warren_broker_connections_opened",
                        "Connections opened to the broker.",
                        &counts.opened,
                    ),
                    (
                        "warren_broker_connections_lost",
                        "Open connections lost (closed by the broker, the network or a missed heartbeat).",
                        &counts.lost,
                    ),
                    (
                        "warren_broker_connections_failed",
                        "Connection attempts that failed.",
                        &counts.failed,
                    ),
                    (
                        "warren_broker_channels_opened",
                        "Channels opened on the connection (channel churn).",
                        &counts.channels_opened,
                    ),
                ] {
                    report.counter(name, help, labels(), counter.load(Ordering::Relaxed));
                }
                report.gauge(
                    "warren_broker_channels_open",
                    "Channels open now on the connection.",
                    labels(),
                    i64::try_from(counts.open_channels()).unwrap_or(i64::MAX),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn brokers_carry_their_tags_and_their_zone_name() {
        let text = r#"
[zones.west]
brokers = [{ uri = "amqp://w:5672/%2f", tags = ["reports"] }]
[zones.local]
brokers = ["amqp://a:5672/%2f", { uri = "amqp://b:5672/%2f", tags = ["reports", "eu"] }]
"#;
        let config = Config::parse(text, Path::new("config.ini"), &[], None).unwrap();
        let registry = ConnectionRegistry::new(&config);
        let brokers: Vec<_> = registry
            .brokers()
            .iter()
            .map(|b| (b.uri.host(), b.zone.as_str(), b.local))
            .collect();
        assert_eq!(
            brokers,
            [
                ("a", "local", true),
                ("b", "local", true),
                ("w", "west", false)
            ]
        );
        let tagged = |tag: &str| -> Vec<&str> {
            registry
                .brokers()
                .iter()
                .filter(|b| b.has_tag(tag))
                .map(|b| b.uri.host())
                .collect()
        };
        assert_eq!(tagged("reports"), ["b", "w"]);
        assert_eq!(tagged("eu"), ["b"]);
        assert_eq!(tagged("local"), ["a", "b"]);
        assert_eq!(tagged("west"), ["w"]);
        assert!(tagged("Reports").is_empty(), "tags are case-sensitive");
        assert!(registry.brokers()[0].tags.is_empty());
        let in_zone = |zone: &str| -> Vec<String> {
            registry
                .brokers_in_zone(zone)
                .iter()
                .map(|b| b.uri.host().to_string())
                .collect()
        };
        assert_eq!(in_zone("local"), ["a", "b"], "config order");
        assert_eq!(in_zone("west"), ["w"]);
        assert!(in_zone("east").is_empty());
        assert!(registry.primary().is_none(), "nothing is available yet");
    }

    #[test]
    fn generations_grow_per_broker_and_connection_and_are_never_reused() {
        let text = "[zones.local]\nbrokers = [\"amqp://a:5672/%2f\", \"amqp://b:5672/%2f\"]\n";
        let config = Config::parse(text, Path::new("config.ini"), &[], None).unwrap();
        let registry = ConnectionRegistry::new(&config);
        let (a, b) = (BrokerId(0), BrokerId(1));
        assert_eq!(registry.next_generation(a, Role::Consume), 1);
        assert_eq!(registry.next_generation(a, Role::Consume), 2);
        assert_eq!(registry.next_generation(a, Role::Publish), 1, "own counter");
        assert_eq!(registry.next_generation(b, Role::Consume), 1, "per broker");
        // A clone (what a restarted connection actor gets) shares the counters.
        let again = registry.clone();
        assert_eq!(again.next_generation(a, Role::Consume), 3);
        assert_eq!(registry.next_generation(BrokerId(9), Role::Consume), 0);
    }

    /// Connection actors re-report when the counter changes: every start of a registry
    /// actor must change it, and updates sent to it land in the shared table.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_start_of_a_registry_actor_asks_the_connections_to_report_again() {
        let text = "[zones.local]\nbrokers = [\"amqp://a:5672/%2f\"]\n";
        let config = Config::parse(text, Path::new("config.ini"), &[], None).unwrap();
        let registry = ConnectionRegistry::new(&config);
        let mut restarts = registry.restarts();
        let wait = Duration::from_secs(5);
        for round in 1..=2u64 {
            let (actor, handle) = Actor::spawn(None, RegistryActor, registry.clone())
                .await
                .expect("registry actor");
            tokio::time::timeout(wait, restarts.changed())
                .await
                .expect("the counter changes in time")
                .expect("the registry is alive");
            assert_eq!(*restarts.borrow_and_update(), round);
            registry.report(
                BrokerId(0),
                StatusUpdate::Up {
                    role: Role::Consume,
                    generation: round,
                },
            );
            let mut version = registry.subscribe();
            let applied = tokio::time::timeout(
                wait,
                version.wait_for(|_| {
                    registry
                        .status(BrokerId(0))
                        .is_some_and(|s| s.generation == round)
                }),
            )
            .await;
            assert!(
                applied.is_ok(),
                "round {round}: the report reached the table"
            );
            actor.stop(None);
            handle.await.expect("the actor stops");
        }
    }
}
