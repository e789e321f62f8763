//! The application contract: a name and the children warren supervises for the app.
//!
//! Every enabled app runs under its own one_for_one supervisor `app:<name>`, a child of the
//! node's `apps` supervisor, so a crashing app is restarted (within its restart intensity)
//! without touching the others. This module owns that wiring and nothing else.

use std::time::Duration;

use warren_runtime::backoff::Backoff;
use warren_runtime::config::AppConfig;
use warren_runtime::envelope::Stamp;
use warren_runtime::node::NodeContext;
use warren_runtime::supervisor::{ChildSpec, Intensity, Strategy, SupervisorSpec};

use crate::listener::{Listener, listener_child};
use crate::pool::ListenerPool;
use crate::router::ConfigRouter;

/// An application that runs inside a warren node. Implement this in `apps/<name>`.
pub trait App: Send + Sync + 'static {
    /// The name used in config.ini (`[apps.<name>]`) and in logs; also `App-Name` in the
    /// envelopes the app sends.
    fn name(&self) -> &'static str;

    /// `App-Version` in the envelopes the app sends.
    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    /// The app's children (listeners, pools), started in order under `app:<name>`.
    fn children(&self, ctx: &AppContext) -> Vec<ChildSpec>;
}

/// What an app is built with: the node's handles and the app's own config section.
#[derive(Clone)]
pub struct AppContext {
    pub node: NodeContext,
    pub config: AppConfig,
    /// The app's version, for `App-Version`.
    pub version: String,
    /// The app's pool of workers (`[apps.<name>] pool_size` …), run under `app:<name>`.
    pub pool: ListenerPool,
    /// The node's configuration-event router, when the node runs one.
    pub router: Option<ConfigRouter>,
}

impl AppContext {
    /// The context of `app` on a node (the binary builds it from config.ini; tests can
    /// build their own).
    pub fn new(app: &dyn App, node: NodeContext, config: AppConfig) -> Self {
        Self::with_version(app.version(), node, config)
    }

    /// The context of an app of this name and version (tools and tests without an `App`).
    pub fn with_version(version: &str, node: NodeContext, config: AppConfig) -> Self {
        let pool = ListenerPool::new(&config.name, config.pool);
        let ctx = AppContext {
            node,
            config,
            version: version.to_string(),
            pool,
            router: None,
        };
        ctx.pool.attach(ctx.node.clone(), ctx.stamp());
        ctx
    }

    /// The same context with the node's router.
    pub fn with_router(mut self, router: ConfigRouter) -> Self {
        self.router = Some(router);
        self
    }

    /// Who is sending: filled into the app's outgoing envelopes where missing.
    pub fn stamp(&self) -> Stamp {
        Stamp {
            app_name: self.config.name.clone(),
            app_version: self.version.clone(),
            node: self.node.config.service.node.clone(),
        }
    }

    /// A listener of this app as a supervised child.
    pub fn listener(&self, listener: impl Listener) -> ChildSpec {
        listener_child(listener, self).0
    }
}

/// The supervisor child `app:<name>` that runs one app: its pool first, then its children.
pub fn app_child(app: &dyn App, ctx: AppContext) -> ChildSpec {
    let mut children = vec![ctx.pool.child()];
    children.extend(app.children(&ctx));
    ChildSpec::supervisor(SupervisorSpec {
        name: format!("app:{}", app.name()),
        strategy: Strategy::OneForOne,
        intensity: Intensity {
            max_restarts: 5,
            within: Duration::from_secs(30),
        },
        backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
        children,
    })
}
