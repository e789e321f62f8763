//! The application contract: a name and the children warren supervises for the app.
//!
//! Every enabled app runs under its own one_for_one supervisor `app:<name>`, a child of the
//! node's `apps` supervisor, so a crashing app is restarted (within its restart intensity)
//! without touching the others. This module owns that wiring and nothing else.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use ractor::ActorCell;
use warren_runtime::config::AppConfig;
use warren_runtime::envelope::Stamp;
use warren_runtime::node::NodeContext;
use warren_runtime::supervisor::{ChildSpec, Intensity, StopOrder, SupervisorSpec};

use crate::listener::{Listener, SpecError, listener_child};
use crate::pool::ListenerPool;
use crate::router::ConfigRouter;

/// An application that runs inside a warren node. Implement this in `apps/<name>`.
pub trait App: Send + Sync + 'static {
    /// The name used in config.ini (`[apps.<name>]`) and in logs; also `App-Name` in the
    /// envelopes the app sends.
    fn name(&self) -> &'static str;

    /// `App-Version` in the envelopes the app sends: the app crate's own version, so
    /// write `env!("CARGO_PKG_VERSION")` (a default here would give warren-listeners'
    /// version instead).
    fn version(&self) -> &'static str;

    /// The app's children (listeners, pools), started in order under `app:<name>`.
    fn children(&self, ctx: &AppContext) -> Vec<ChildSpec>;
}

/// What an app is built with: the node's handles and the app's own config section.
#[derive(Clone)]
pub struct AppContext {
    pub node: NodeContext,
    pub config: AppConfig,
    /// Who is sending (app name and version, node): filled into the app's outgoing
    /// envelopes where missing.
    stamp: Stamp,
    /// The app's pool of workers (`[apps.<name>] pool_size` …), run under `app:<name>`.
    pub pool: ListenerPool,
    /// The node's configuration-event router, when the node runs one.
    pub router: Option<ConfigRouter>,
    /// Listener specs refused while the app built its children; [`app_child`] reports them.
    refused: Arc<Mutex<Vec<SpecError>>>,
}

/// An app could not be built: its listeners' specs break rules. `warren run` exits 2.
#[derive(Debug, thiserror::Error)]
#[error("app `{app}`: {}", .errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct AppError {
    pub app: String,
    pub errors: Vec<SpecError>,
}

impl AppContext {
    /// The context of `app` on a node (the binary builds it from config.ini; tests can
    /// build their own).
    pub fn new(app: &dyn App, node: NodeContext, config: AppConfig) -> Self {
        Self::with_version(app.version(), node, config)
    }

    /// The context of an app of this name and version (tools and tests without an `App`).
    pub fn with_version(version: &str, node: NodeContext, config: AppConfig) -> Self {
        let stamp = Stamp {
            app_name: config.name.clone(),
            app_version: version.to_string(),
            node: node.node.clone(),
        };
        let pool = ListenerPool::new(&config.name, config.pool, node.clone(), stamp.clone());
        AppContext {
            node,
            config,
            stamp,
            pool,
            router: None,
            refused: Arc::default(),
        }
    }

    /// The same context with the node's router.
    pub fn with_router(mut self, router: ConfigRouter) -> Self {
        self.router = Some(router);
        self
    }

    /// Who is sending: filled into the app's outgoing envelopes where missing.
    pub fn stamp(&self) -> Stamp {
        self.stamp.clone()
    }

    /// The app's version, for `App-Version`.
    pub fn version(&self) -> &str {
        &self.stamp.app_version
    }

    /// A listener of this app as a supervised child. A spec that breaks a rule is kept
    /// for [`app_child`], which then refuses the app; the child returned in its place
    /// fails to start with the same error.
    pub fn listener(&self, listener: impl Listener) -> ChildSpec {
        match listener_child(listener, self) {
            Ok((child, _)) => child,
            Err(error) => self.refuse(format!("listener:{}", error.listener), error),
        }
    }

    /// Keeps `error` for [`app_child`] (which then refuses the app) and returns a child
    /// `id` that fails to start with it.
    pub(crate) fn refuse(&self, id: String, error: SpecError) -> ChildSpec {
        let reason = error.to_string();
        self.refused.lock().push(error);
        ChildSpec::new(id, move |_parent: ActorCell| {
            let reason = reason.clone();
            async move { Err(ractor::SpawnErr::StartupFailed(reason.into())) }
        })
    }
}

/// The supervisor child `app:<name>` that runs one app: its pool first, then its children.
/// Refused if a listener's spec breaks a rule, naming every such listener and field.
pub fn app_child(app: &dyn App, ctx: AppContext) -> Result<ChildSpec, AppError> {
    let mut children = vec![ctx.pool.child()];
    children.extend(app.children(&ctx));
    let errors = std::mem::take(&mut *ctx.refused.lock());
    if !errors.is_empty() {
        return Err(AppError {
            app: app.name().to_string(),
            errors,
        });
    }
    // In reverse start order: the app's listeners before the pool they may use.
    Ok(ChildSpec::supervisor(SupervisorSpec::one_for_one(
        format!("app:{}", app.name()),
        StopOrder::Sequential,
        Intensity::new(5, Duration::from_secs(30)),
        children,
    )))
}
