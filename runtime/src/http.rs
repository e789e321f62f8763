//! The operator endpoint (`[http] listen`): Prometheus metrics, Kubernetes-style health
//! probes and the node's status as JSON.
//!
//! - `GET /metrics`: every registered source's figures, Prometheus text format;
//! - `GET /health/live`: 200 while the supervision tree runs, 503 once it gave up;
//! - `GET /health/ready`: 200 when a local broker is up (there is a primary) and every
//!   listener, pool worker and the router consume; 503 with the reason otherwise;
//! - `GET /status`: the node, its brokers and the state of each part, as JSON;
//! - the routes apps mounted through [`HttpRoutes`] while the node built them (e.g.
//!   apps/event_pusher's `POST /events`), served beside the operator's.
//!
//! The socket is bound before the tree starts, so a port in use is a start error naming
//! the address. Owns the HTTP server and its shutdown; must not touch what it reports
//! (the registry, readiness and metrics own that) nor what mounted routes do (their app's).

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ractor::ActorStatus;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::actor_slot::ActorSlot;
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::registry::ConnectionRegistry;
use crate::supervisor::SupervisorMsg;

/// Routes apps add to the node's HTTP server (`[http] listen`).
///
/// It exists so that an app can take requests on the node's one HTTP server without a
/// server of its own: apps mount their routes while the node builds them, the server
/// serves them from its start. A route that clashes with the operator's (`/metrics`,
/// `/health/*`, `/status`) or with another app's is refused at mount time. Without
/// `[http] listen` nothing is served and mounted routes are dropped. Connections a route
/// upgraded (WebSockets) outlive the server's graceful shutdown: their route awaits
/// [`HttpRoutes::stopping`] to close them when the node stops.
#[derive(Clone)]
pub struct HttpRoutes {
    mounted: std::sync::Arc<parking_lot::Mutex<Vec<(String, Router)>>>,
    stopping: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for HttpRoutes {
    fn default() -> Self {
        HttpRoutes {
            mounted: std::sync::Arc::default(),
            stopping: std::sync::Arc::new(tokio::sync::watch::channel(false).0),
        }
    }
}

/// A route an app tried to mount clashes with one already there.
#[derive(Debug, thiserror::Error)]
#[error("HTTP path `{path}` is taken")]
pub struct RouteTaken {
    pub path: String,
}

/// Paths the operator endpoint serves itself.
const OPERATOR_PATHS: [&str; 4] = ["/metrics", "/health/live", "/health/ready", "/status"];

impl HttpRoutes {
    /// Adds `router`, which serves `path` (the path it was built with; one per call).
    pub fn mount(&self, path: &str, router: Router) -> Result<(), RouteTaken> {
        let mut mounted = self.mounted.lock();
        let taken = OPERATOR_PATHS.contains(&path) || mounted.iter().any(|(p, _)| p == path);
        if taken {
            return Err(RouteTaken {
                path: path.to_string(),
            });
        }
        mounted.push((path.to_string(), router));
        Ok(())
    }

    /// Completes once the node began to stop (at once if it already did).
    pub fn stopping(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stopping = self.stopping.subscribe();
        async move {
            let _ = stopping.wait_for(|stopping| *stopping).await;
        }
    }

    /// Tells the routes the node stops (the node does, first thing when it stops).
    pub fn announce_stop(&self) {
        self.stopping.send_replace(true);
    }

    /// The paths mounted so far.
    pub fn paths(&self) -> Vec<String> {
        self.mounted.lock().iter().map(|(p, _)| p.clone()).collect()
    }

    /// Every mounted router merged into `app`.
    fn merge_into(&self, mut app: Router) -> Router {
        for (_, router) in self.mounted.lock().iter() {
            app = app.merge(router.clone());
        }
        app
    }
}

/// What the endpoint reads to answer.
#[derive(Clone)]
pub struct Observed {
    pub node: String,
    pub metrics: Metrics,
    pub readiness: Readiness,
    pub registry: ConnectionRegistry,
    /// The root supervisor, once the tree started.
    pub root: std::sync::Arc<ActorSlot<SupervisorMsg>>,
    /// What apps mounted.
    pub routes: HttpRoutes,
}

/// The running endpoint. It exists so that the node stops it with the tree.
pub struct HttpEndpoint {
    address: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// The endpoint could not start (the address is in use, not local, …).
#[derive(Debug, thiserror::Error)]
#[error("cannot serve [http] listen = \"{address}\": {source}")]
pub struct BindError {
    pub address: SocketAddr,
    pub source: std::io::Error,
}

impl HttpEndpoint {
    /// Binds `address` and serves until [`HttpEndpoint::stop`].
    pub async fn start(address: SocketAddr, observed: Observed) -> Result<Self, BindError> {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| BindError { address, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| BindError { address, source })?;
        let routes = observed.routes.clone();
        let operator = Router::new()
            .route("/metrics", get(metrics))
            .route("/health/live", get(live))
            .route("/health/ready", get(ready))
            .route("/status", get(status))
            .with_state(observed);
        let app = routes.merge_into(operator);
        let paths = routes.paths();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            // Peer addresses for routes that need them (apps/gateway's trusted proxies).
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(error) = served {
                tracing::warn!(%error, "the HTTP endpoint stopped");
            }
        });
        tracing::info!(address = %bound, apps = ?paths, "HTTP endpoint serving /metrics, /health/live, /health/ready, /status");
        Ok(HttpEndpoint {
            address: bound,
            shutdown: Some(shutdown),
            task,
        })
    }

    /// The address it serves on (the port the system chose for port 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Stops serving: open requests finish, new connections are refused.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), &mut self.task).await;
        self.task.abort();
    }
}

async fn metrics(State(observed): State<Observed>) -> Response {
    let text = observed.metrics.encode();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn is_live(observed: &Observed) -> bool {
    observed
        .root
        .get()
        .is_some_and(|root| root.get_status() == ActorStatus::Running)
}

async fn live(State(observed): State<Observed>) -> Response {
    if is_live(&observed) {
        probe(true, json!({"status": "live"}))
    } else {
        probe(
            false,
            json!({"status": "dead", "reason": "the supervision tree is not running"}),
        )
    }
}

/// Why the node is not ready, or `None` when it is.
fn not_ready(observed: &Observed) -> Option<String> {
    if !is_live(observed) {
        return Some("the supervision tree is not running".to_string());
    }
    crate::status::not_ready(&observed.registry, &observed.readiness)
}

async fn ready(State(observed): State<Observed>) -> Response {
    match not_ready(&observed) {
        None => probe(true, json!({"status": "ready"})),
        Some(reason) => probe(false, json!({"status": "not ready", "reason": reason})),
    }
}

async fn status(State(observed): State<Observed>) -> Response {
    let live = is_live(&observed);
    let not_ready = not_ready(&observed);
    let mut body = crate::status::document(
        &observed.node,
        &observed.registry,
        &observed.readiness,
        &observed.metrics,
        live,
        not_ready,
    );
    if let Some(root) = observed.root.get() {
        body["tree"] = crate::status::tree("warren", &root).await;
    }
    (StatusCode::OK, axum::Json(body)).into_response()
}

fn probe(ok: bool, body: Value) -> Response {
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}
