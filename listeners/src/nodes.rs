//! Nodes know each other, as Kazoo's `kz_nodes` do: each node announces itself on the
//! `nodes` exchange every [`ANNOUNCE_INTERVAL`] (and once more, leaving, when it stops),
//! keeps the list of the nodes it heard from, and forgets one after [`EXPIRY`] without
//! an announcement. A `query` makes every node announce at once (what `warren status`
//! sends); a `status_req` sent to a node's own queue through `targeted` is answered with
//! its status document (what `warren status --node` sends).
//!
//! ```text
//! nodes (one_for_one)
//! ├─ listener:nodes   the `nodes` exchange (announce, query) and its own queue (targeted)
//! └─ announcer        an actor that announces on a timer, and leaving when stopped
//! ```
//!
//! Owns the table of live nodes and the announcement format. Must not touch what the
//! status document says (`warren_runtime::status`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::{Value, json};
use warren_runtime::envelope::{Envelope, Stamp};
use warren_runtime::exchanges::{NODES, TARGETED};
use warren_runtime::node::NodeContext;
use warren_runtime::supervisor::{ChildSpec, Intensity, StopOrder, SupervisorSpec};

use crate::listener::node_listener_child;
use crate::listener::{
    Event, Exchange, Listener, ListenerHandle, ListenerSpec, QueueSpec, SpecError,
};

/// How often a node announces itself.
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(5);
/// A node not heard from for this long is no longer listed (three missed announcements).
pub const EXPIRY: Duration = Duration::from_secs(15);
/// Routing key of announcements on the `nodes` exchange.
pub const ANNOUNCE_KEY: &str = "announce";
/// Routing key of queries (every node announces at once).
pub const QUERY_KEY: &str = "query";
/// Event-Category of everything on the `nodes` exchange.
pub const CATEGORY: &str = "nodes";

/// What a node says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub node: String,
    pub zone: String,
    pub version: String,
    /// The apps it runs.
    pub apps: Vec<String>,
    /// When it started (seconds since the Unix epoch).
    pub started_at: u64,
    /// Its own queue: status requests go there through `targeted`.
    pub queue: String,
}

impl NodeInfo {
    /// The announcement (`leaving`: the node stops).
    pub fn envelope(&self, leaving: bool) -> Envelope {
        Envelope::new(CATEGORY, "advertise")
            .with("Node-Name", self.node.as_str())
            .with("Zone", self.zone.as_str())
            .with("Version", self.version.as_str())
            .with("Apps", json!(self.apps))
            .with("Started-At", self.started_at)
            .with("Queue", self.queue.as_str())
            .with("Leaving", leaving)
    }

    /// Reads an announcement; `None` when it lacks a field. The flag says leaving.
    pub fn from_envelope(envelope: &Envelope) -> Option<(NodeInfo, bool)> {
        let text = |key: &str| {
            envelope
                .get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let apps = envelope
            .get("Apps")?
            .as_array()?
            .iter()
            .filter_map(|app| app.as_str().map(str::to_string))
            .collect();
        let info = NodeInfo {
            node: text("Node-Name")?,
            zone: text("Zone")?,
            version: text("Version")?,
            apps,
            started_at: envelope.get("Started-At")?.as_u64()?,
            queue: text("Queue").unwrap_or_default(),
        };
        let leaving = envelope
            .get("Leaving")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Some((info, leaving))
    }

    /// As JSON, with how long ago it was heard from.
    pub fn to_json(&self, seen_ago: Duration) -> Value {
        json!({
            "node": self.node,
            "zone": self.zone,
            "version": self.version,
            "apps": self.apps,
            "started_at": self.started_at,
            "queue": self.queue,
            "seen_ms_ago": u64::try_from(seen_ago.as_millis()).unwrap_or(u64::MAX),
        })
    }
}

/// The nodes service of a node: cheap to clone.
///
/// It exists so that every node (and `warren status`) can tell which nodes of the cluster
/// are alive and ask any of them what it is doing, without a registry of its own.
#[derive(Clone)]
pub struct NodesService {
    inner: Arc<Inner>,
}

struct Inner {
    context: NodeContext,
    zone: String,
    apps: Vec<String>,
    started_at: u64,
    handle: ListenerHandle,
    listener_child: ChildSpec,
    table: Arc<Mutex<BTreeMap<String, (NodeInfo, Instant)>>>,
}

/// The listener behind the service.
struct NodesListener {
    table: Arc<Mutex<BTreeMap<String, (NodeInfo, Instant)>>>,
    /// Set once the service exists (the listener is built first).
    service: Arc<Mutex<Option<std::sync::Weak<Inner>>>>,
}

impl Listener for NodesListener {
    fn spec(&self) -> ListenerSpec {
        let table = self.table.clone();
        let on_query = self.service.clone();
        let on_status = self.service.clone();
        ListenerSpec::new("nodes")
            .queue(QueueSpec::anonymous())
            .exchange(Exchange::topic(NODES))
            .bind(NODES, ANNOUNCE_KEY)
            .bind(NODES, QUERY_KEY)
            .bind_own_queue(TARGETED)
            .responder(CATEGORY, "advertise", move |event: Event| {
                if let Some((info, leaving)) = NodeInfo::from_envelope(event.envelope()) {
                    let mut table = table.lock();
                    if leaving {
                        table.remove(&info.node);
                    } else {
                        table.insert(info.node.clone(), (info, Instant::now()));
                    }
                }
                async { Ok(()) }
            })
            .responder(CATEGORY, "query", move |_event: Event| {
                let service = upgrade(&on_query);
                async move {
                    if let Some(service) = service {
                        service.announce(false).await;
                    }
                    Ok(())
                }
            })
            .responder(CATEGORY, "status_req", move |event: Event| {
                let service = upgrade(&on_status);
                async move {
                    let Some(service) = service else {
                        return Ok(());
                    };
                    let reply = Envelope::new(CATEGORY, "status_resp")
                        .with("Status", service.status().await)
                        .with("Nodes", service.nodes_json());
                    event.reply(reply).await?;
                    Ok(())
                }
            })
    }
}

fn upgrade(slot: &Mutex<Option<std::sync::Weak<Inner>>>) -> Option<NodesService> {
    let inner = slot.lock().as_ref()?.upgrade()?;
    Some(NodesService { inner })
}

impl NodesService {
    /// The service of `node`, which runs `apps`.
    pub fn new(node: &NodeContext, apps: Vec<String>) -> Result<Self, SpecError> {
        let table = Arc::new(Mutex::new(BTreeMap::new()));
        let service = Arc::new(Mutex::new(None));
        let listener = NodesListener {
            table: table.clone(),
            service: service.clone(),
        };
        let (mut listener_child, handle) = node_listener_child(listener, node, stamp(node))?;
        listener_child.id = "listener:nodes".to_string();
        let started_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let inner = Arc::new(Inner {
            context: node.clone(),
            zone: node.registry.local_zone().to_string(),
            apps,
            started_at,
            handle,
            listener_child,
            table,
        });
        *service.lock() = Some(Arc::downgrade(&inner));
        Ok(NodesService { inner })
    }

    /// The supervisor child `nodes`: the listener, then the announcer.
    pub fn child(&self) -> ChildSpec {
        let service = self.clone();
        let announcer = ChildSpec::actor("announcer", move || (Announcer, service.clone()));
        ChildSpec::supervisor(SupervisorSpec::one_for_one(
            "nodes",
            StopOrder::Sequential,
            Intensity::new(5, Duration::from_secs(30)),
            // Stopped in reverse: the announcer says it leaves while the listener runs.
            vec![self.inner.listener_child.clone(), announcer],
        ))
    }

    /// What this node says about itself.
    pub fn info(&self) -> NodeInfo {
        let inner = &self.inner;
        NodeInfo {
            node: inner.context.node.clone(),
            zone: inner.zone.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            apps: inner.apps.clone(),
            started_at: inner.started_at,
            queue: inner.handle.queue_name(),
        }
    }

    /// The nodes heard from within [`EXPIRY`] (this one too, once its own announcement
    /// came back), by name.
    pub fn live(&self) -> Vec<(NodeInfo, Duration)> {
        let mut table = self.inner.table.lock();
        table.retain(|_, (_, seen)| seen.elapsed() < EXPIRY);
        table
            .values()
            .map(|(info, seen)| (info.clone(), seen.elapsed()))
            .collect()
    }

    fn nodes_json(&self) -> Value {
        Value::Array(
            self.live()
                .iter()
                .map(|(info, ago)| info.to_json(*ago))
                .collect(),
        )
    }

    /// This node's status document, with its supervision tree.
    pub async fn status(&self) -> Value {
        let context = &self.inner.context;
        let not_ready = warren_runtime::status::not_ready(&context.registry, &context.readiness);
        let mut document = warren_runtime::status::document(
            &context.node,
            &context.registry,
            &context.readiness,
            &context.metrics,
            true,
            not_ready,
        );
        document["zone"] = json!(self.inner.zone);
        document["version"] = json!(env!("CARGO_PKG_VERSION"));
        document["apps"] = json!(self.inner.apps);
        document["started_at"] = json!(self.inner.started_at);
        if let Some(root) = context.root.get() {
            document["tree"] = warren_runtime::status::tree("warren", &root).await;
        }
        document
    }

    /// Publishes this node's announcement (best effort: a node that cannot publish is
    /// not live to the others, which is the truth).
    async fn announce(&self, leaving: bool) {
        if self.inner.handle.queue_name().is_empty() {
            return;
        }
        let publisher = &self.inner.context.publisher;
        let mut options = publisher.options();
        options.timeout = options.timeout.min(ANNOUNCE_INTERVAL);
        let envelope = self.info().envelope(leaving);
        if let Err(error) = publisher
            .publish(NODES, ANNOUNCE_KEY, envelope, options)
            .await
        {
            tracing::debug!(%error, leaving, "cannot announce this node");
        }
    }
}

fn stamp(node: &NodeContext) -> Stamp {
    Stamp {
        app_name: "warren".to_string(),
        app_version: env!("CARGO_PKG_VERSION").to_string(),
        node: node.node.clone(),
    }
}

/// Announces its node on a timer, and leaving when it stops.
struct Announcer;

/// A tick of the announcer.
struct Tick;

/// The announcer's state: its service, its timer, and whether the timer runs at the
/// regular pace yet.
struct Announcing {
    service: NodesService,
    timer: ractor::concurrency::JoinHandle<()>,
    regular: bool,
}

impl Actor for Announcer {
    type Msg = Tick;
    type State = Announcing;
    type Arguments = NodesService;

    async fn pre_start(
        &self,
        myself: ActorRef<Tick>,
        service: NodesService,
    ) -> Result<Self::State, ActorProcessingErr> {
        // Quickly at first: the listener may still be setting up its queue.
        let timer = myself.send_interval(Duration::from_millis(500), || Tick);
        Ok(Announcing {
            service,
            timer,
            regular: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Tick>,
        _tick: Tick,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.service.announce(false).await;
        // Once its own announcement came back, at the regular pace.
        let own = state.service.inner.context.node.clone();
        if !state.regular
            && state
                .service
                .live()
                .iter()
                .any(|(info, _)| info.node == own)
        {
            state.timer.abort();
            state.timer = myself.send_interval(ANNOUNCE_INTERVAL, || Tick);
            state.regular = true;
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Tick>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.timer.abort();
        state.service.announce(true).await;
        Ok(())
    }
}
