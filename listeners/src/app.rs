//! The application contract: a name and the children warren supervises for the app.
//!
//! Every enabled app runs under its own one_for_one supervisor `app:<name>`, a child of the
//! node's `apps` supervisor, so a crashing app is restarted (within its restart intensity)
//! without touching the others. This module owns that wiring and nothing else.

use std::time::Duration;

use warren_runtime::backoff::Backoff;
use warren_runtime::config::AppConfig;
use warren_runtime::node::NodeContext;
use warren_runtime::supervisor::{ChildSpec, Intensity, Strategy, SupervisorSpec};

/// An application that runs inside a warren node. Implement this in `apps/<name>`.
pub trait App: Send + Sync + 'static {
    /// The name used in config.ini (`[apps.<name>]`) and in logs.
    fn name(&self) -> &'static str;

    /// The app's children (listeners, pools), started in order under `app:<name>`.
    fn children(&self, ctx: &AppContext) -> Vec<ChildSpec>;
}

/// What an app is built with: the node's handles and the app's own config section.
#[derive(Clone)]
pub struct AppContext {
    pub node: NodeContext,
    pub config: AppConfig,
}

/// The supervisor child `app:<name>` that runs one app's children.
pub fn app_child(app: &dyn App, ctx: AppContext) -> ChildSpec {
    ChildSpec::supervisor(SupervisorSpec {
        name: format!("app:{}", app.name()),
        strategy: Strategy::OneForOne,
        intensity: Intensity {
            max_restarts: 5,
            within: Duration::from_secs(30),
        },
        backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
        children: app.children(&ctx),
    })
}
