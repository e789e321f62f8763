//! One warren node: the root supervision tree and the handles apps are built with.
//!
//! ```text
//! warren (rest_for_one)
//! ├─ registry      ConnectionRegistry writer
//! ├─ connections   one_for_one, a connection actor per broker
//! ├─ assignments   which consumer holds which channel (float / sticky grants)
//! ├─ bootstrap     adds brokers, blocks start until a local broker is ready (temporary)
//! ├─ services      given by the caller (the configuration-event router)
//! └─ apps          one_for_one, a supervisor per enabled app
//! ```
//! Stopping the node stops the children in reverse order (apps, router, assignments,
//! connections),
//! each within its own shutdown timeout, the whole within `[service] shutdown_timeout_secs`.
//! This module owns the tree's shape; each child owns its own behaviour.

use std::sync::Arc;
use std::time::Duration;

use ractor::ActorRef;
use tokio::task::JoinHandle;

use crate::actor_slot::ActorSlot;
use crate::amqp10::{Amqp10Transport, KeeperSettings};
use crate::assignments::Assignments;
use crate::backoff::Backoff;
use crate::bootstrap::{Bootstrap, BootstrapArgs};
use crate::config::{
    Amqp10Mapping, Config, ListenerSettings, PoolConfig, RouterConfig, RpcConfig, RpcTransport,
};
use crate::connection_actor::ConnectionSettings;
use crate::connections::Connections;
use crate::envelope::Stamp;
use crate::http::{HttpEndpoint, HttpRoutes, Observed};
use crate::metrics::{Metrics, MetricsEntry};
use crate::publisher::Publisher;
use crate::readiness::Readiness;
use crate::registry::{ConnectionRegistry, RegistryActor};
use crate::supervisor::{
    ChildSpec, Intensity, Restart, StopDeadline, StopOrder, Strategy, Supervisor, SupervisorMsg,
    SupervisorSpec, deadline, spawn_error_reason,
};

/// Handles to a running node's services, given to apps when they build their children.
#[derive(Clone)]
pub struct NodeContext {
    /// This node's name (`[service] node`): in connection and queue names, consumer tags
    /// and the `Node` of envelopes.
    pub node: String,
    /// What the node's listeners are built with.
    pub listeners: ListenerSettings,
    /// `[router]`: the configuration-event router's exchange and buffer.
    pub router: RouterConfig,
    /// `[pool]`: an app's pool sizing where its own section sets none.
    pub pool: PoolConfig,
    /// `[rpc]`: how RPC targets are addressed and where notifications go.
    pub rpc: RpcConfig,
    pub registry: ConnectionRegistry,
    pub connections: Connections,
    pub assignments: Assignments,
    /// Publishes on the primary with confirms (follows failover and fail-back); stamps
    /// envelopes as the node (`App-Name` warren) where they lack the fields.
    pub publisher: Publisher,
    /// Whether every listener, pool worker and the router consume (and why not).
    pub readiness: Readiness,
    /// Where every part registers its figures for `/metrics`.
    pub metrics: Metrics,
    /// The root supervisor, once the tree started: for the status document's tree.
    pub root: Arc<ActorSlot<SupervisorMsg>>,
    /// Routes apps add to the HTTP endpoint (`[http] listen`) while they are built.
    pub http: HttpRoutes,
    /// With `[rpc] transport = "amqp10"`: the node's AMQP 1.0 connection, which RPC
    /// targets and notifications then travel on.
    pub amqp10: Option<Amqp10Transport>,
}

/// What a caller adds to the tree: services (the configuration-event router) start after
/// bootstrap and before the apps, and stop after them.
#[derive(Default)]
pub struct Children {
    pub services: Vec<ChildSpec>,
    pub apps: Vec<ChildSpec>,
}

impl From<Vec<ChildSpec>> for Children {
    /// Apps only.
    fn from(apps: Vec<ChildSpec>) -> Self {
        Children {
            services: Vec::new(),
            apps,
        }
    }
}

/// A running node. Dropping it does not stop the tree; call [`Node::stop`].
pub struct Node {
    root: ActorRef<SupervisorMsg>,
    done: JoinHandle<()>,
    context: NodeContext,
    /// `[service] shutdown_timeout_secs`: the whole stop budget.
    shutdown_timeout: Duration,
    /// Where the stop deadline is written for the root.
    deadline: StopDeadline,
    /// `[http] listen`: the operator endpoint, when configured.
    http: Option<HttpEndpoint>,
    /// The node's own metric sources (brokers, publisher), registered while it runs.
    _figures: Vec<MetricsEntry>,
}

/// The AMQP 1.0 transport of `[rpc] transport = "amqp10"`: the local zone's
/// `amqp10_brokers` (through the registry's table of them), the `[amqp]` bounds, the reply address `[rpc.amqp10] reply` gives
/// `reply/<node>`.
fn amqp10_transport(
    config: &Config,
    registry: &ConnectionRegistry,
    readiness: &Readiness,
) -> Amqp10Transport {
    let amqp = &config.amqp;
    let settings = KeeperSettings {
        node: config.service.node.clone(),
        registry: registry.clone(),
        connect_timeout: amqp.connect_timeout,
        heartbeat: Duration::from_secs(u64::from(amqp.heartbeat_secs)),
        backoff: Backoff::new(amqp.reconnect_min, amqp.reconnect_max),
        tls: config.tls.clone(),
    };
    let reply = Amqp10Mapping::apply(
        &config.rpc.amqp10.reply,
        &format!("reply/{}", config.service.node),
    );
    Amqp10Transport::start(settings, amqp.operation_timeout, reply, readiness)
}

/// The node could not start. The message is the readable chain of causes.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The children could not be built (an app's listener spec breaks a rule); nothing
    /// was started.
    #[error("{0}")]
    Refused(String),
    /// A child failed to start, e.g. no broker within the startup timeout.
    #[error("{0}")]
    Failed(String),
}

/// The node did not stop within its shutdown timeout; what was left was killed.
#[derive(Debug, thiserror::Error)]
#[error("the node did not stop within {0:?}; remaining actors were killed")]
pub struct StopTimeout(pub Duration);

impl Node {
    /// Starts the tree. Returns once a local broker is ready and every service and app has
    /// started. `children` builds the services and the apps from the node's handles.
    pub async fn start<C: Into<Children>>(
        config: Config,
        children: impl FnOnce(&NodeContext) -> C,
    ) -> Result<Node, StartError> {
        Node::try_start(config, |context| {
            Ok::<_, std::convert::Infallible>(children(context))
        })
        .await
    }

    /// As [`Node::start`], with children that may refuse to be built: their error is
    /// [`StartError::Refused`] and nothing is started.
    pub async fn try_start<C: Into<Children>, E: std::fmt::Display>(
        config: Config,
        children: impl FnOnce(&NodeContext) -> Result<C, E>,
    ) -> Result<Node, StartError> {
        let registry = ConnectionRegistry::new(&config);
        let connections =
            Connections::new(registry.clone(), ConnectionSettings::from_config(&config));
        let assignments = Assignments::new(connections.clone());
        // Histograms only when something can scrape them.
        let metrics = Metrics::new(config.http.listen.is_some());
        let readiness = Readiness::default();
        let context = NodeContext {
            node: config.service.node.clone(),
            listeners: ListenerSettings::from_config(&config),
            router: config.router.clone(),
            pool: config.pool,
            rpc: config.rpc.clone(),
            registry: registry.clone(),
            connections: connections.clone(),
            assignments: assignments.clone(),
            publisher: Publisher::new(connections.clone(), &config.publisher, &metrics).with_stamp(
                Stamp {
                    app_name: "warren".to_string(),
                    app_version: env!("CARGO_PKG_VERSION").to_string(),
                    node: config.service.node.clone(),
                },
            ),
            readiness: readiness.clone(),
            metrics: metrics.clone(),
            root: Arc::default(),
            http: HttpRoutes::default(),
            amqp10: (config.rpc.transport == RpcTransport::Amqp10)
                .then(|| amqp10_transport(&config, &registry, &readiness)),
        };
        let Children { services, apps } = match children(&context) {
            Ok(children) => children.into(),
            Err(error) => {
                if let Some(amqp10) = &context.amqp10 {
                    amqp10.close();
                }
                return Err(StartError::Refused(error.to_string()));
            }
        };
        let mut figures = vec![
            context.metrics.register(Arc::new(registry.clone())),
            context.metrics.register(context.publisher.figures()),
            context.metrics.register(Arc::new(assignments.clone())),
        ];
        if let Some(amqp10) = &context.amqp10 {
            figures.push(context.metrics.register(Arc::new(amqp10.clone())));
        }
        // Bound before the tree starts: a port in use stops the start with its address.
        let http = match config.http.listen {
            Some(address) => {
                let observed = Observed {
                    node: context.node.clone(),
                    metrics: context.metrics.clone(),
                    readiness: context.readiness.clone(),
                    registry: registry.clone(),
                    root: context.root.clone(),
                    routes: context.http.clone(),
                };
                let endpoint = HttpEndpoint::start(address, observed)
                    .await
                    .map_err(|error| StartError::Failed(error.to_string()))?;
                Some(endpoint)
            }
            None => None,
        };

        let registry_child = {
            let registry = registry.clone();
            ChildSpec::actor("registry", move || (RegistryActor, registry.clone()))
        };
        let bootstrap_child = {
            let connections = connections.clone();
            let startup_timeout = config.amqp.startup_timeout;
            ChildSpec::actor("bootstrap", move || {
                let args = BootstrapArgs {
                    connections: connections.clone(),
                    startup_timeout,
                };
                (Bootstrap, args)
            })
            .restart(Restart::Temporary)
        };
        // The apps are independent: they stop together, each by the same deadline.
        let apps_child = ChildSpec::supervisor(SupervisorSpec::one_for_one(
            "apps",
            StopOrder::Concurrent,
            Intensity::new(10, Duration::from_secs(60)),
            apps,
        ));

        let root = SupervisorSpec {
            name: "warren".to_string(),
            strategy: Strategy::RestForOne,
            stop: StopOrder::Sequential,
            intensity: Intensity {
                max_restarts: 3,
                within: Duration::from_secs(60),
            },
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
            children: [
                registry_child,
                connections.supervisor_child(),
                assignments.child(),
                bootstrap_child,
            ]
            .into_iter()
            .chain(services)
            .chain([apps_child])
            .collect(),
        };
        let deadline = StopDeadline::default();
        let (root, done) = match Supervisor::spawn_told(root, deadline.clone()).await {
            Ok(spawned) => spawned,
            Err(error) => {
                if let Some(http) = http {
                    http.stop().await;
                }
                if let Some(amqp10) = &context.amqp10 {
                    amqp10.close();
                }
                return Err(StartError::Failed(spawn_error_reason(&error)));
            }
        };
        context.root.set(root.clone());
        tracing::info!(node = %config.service.node, "supervision tree started");
        Ok(Node {
            root,
            done,
            context,
            shutdown_timeout: config.service.shutdown_timeout,
            deadline,
            http,
            _figures: figures,
        })
    }

    /// Where the operator endpoint serves (`[http] listen`, with the port the system
    /// chose for port 0), if it is configured.
    pub fn http_address(&self) -> Option<std::net::SocketAddr> {
        self.http.as_ref().map(HttpEndpoint::address)
    }

    /// The node's handles.
    pub fn context(&self) -> &NodeContext {
        &self.context
    }

    /// Resolves when the root supervisor has terminated on its own (it gave up after too
    /// many restarts). A healthy node never resolves this.
    pub async fn terminated(&mut self) {
        let _ = (&mut self.done).await;
    }

    /// Stops the tree in order: apps, services, assignments, connections, registry, out
    /// of one budget, `[service] shutdown_timeout_secs`: each supervisor hands its
    /// children deadlines out of its own (see `supervisor::deadline`).
    pub async fn stop(mut self) -> Result<(), StopTimeout> {
        // Upgraded connections (WebSockets) close first, while the tree still runs.
        self.context.http.announce_stop();
        // The tree's own children hold the context: the root must not be kept alive
        // through it while it stops.
        self.context.root.take();
        let timeout = self.shutdown_timeout;
        self.deadline.set(tokio::time::Instant::now() + timeout);
        let stopped = match self
            .root
            .stop_and_wait(
                Some("node stopping".to_string()),
                Some(timeout + deadline::MARGIN),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(ractor::RactorErr::Timeout) => {
                self.root.kill();
                Err(StopTimeout(timeout))
            }
            // The root had already stopped.
            Err(_) => Ok(()),
        };
        // The apps that used it are stopped.
        if let Some(amqp10) = &self.context.amqp10 {
            amqp10.close();
        }
        // Last: probes see the node stopping until the tree is gone.
        if let Some(http) = self.http.take() {
            http.stop().await;
        }
        stopped
    }
}
