//! The apps compiled into this binary. Add a new app's crate here to ship it.

use warren_listeners::{App, AppContext, ConfigRouter, NodesService, app_child};
use warren_runtime::config::AppConfig;
use warren_runtime::node::{Children, NodeContext};

/// Every app this binary can run; config.ini's `[apps.<name>]` enables them.
fn catalog() -> Vec<Box<dyn App>> {
    vec![
        Box::new(warren_app_skel::Skel),
        Box::new(warren_app_echo::Echo),
        Box::new(warren_app_event_pusher::EventPusherApp::default()),
        Box::new(warren_app_gateway::GatewayApp::default()),
        Box::new(warren_app_tickets::Tickets::default()),
    ]
}

/// The names config.ini may use under `[apps]`.
pub fn names() -> Vec<&'static str> {
    catalog().iter().map(|app| app.name()).collect()
}

/// The node's services (the configuration-event router, the nodes service) and one `app:<name>` supervisor
/// per enabled app of `configs` (config.ini's `[apps.<name>]`), in config order; every app
/// gets the router. Refused when an app's
/// listener spec breaks a rule: every refusal is named, and nothing starts.
pub fn children(node: &NodeContext, configs: &[AppConfig]) -> Result<Children, String> {
    let router = ConfigRouter::new(node).map_err(|error| format!("router: {error}"))?;
    let enabled = configs
        .iter()
        .filter(|app| app.enabled)
        .map(|app| app.name.clone())
        .collect();
    let nodes = NodesService::new(node, enabled).map_err(|error| format!("nodes: {error}"))?;
    let catalog = catalog();
    let mut apps = Vec::new();
    let mut refused = Vec::new();
    for config in configs.iter().filter(|app| app.enabled) {
        let Some(app) = catalog.iter().find(|app| app.name() == config.name) else {
            continue;
        };
        let ctx =
            AppContext::new(app.as_ref(), node.clone(), config.clone()).with_router(router.clone());
        match app_child(app.as_ref(), ctx) {
            Ok(child) => apps.push(child),
            Err(error) => refused.push(error.to_string()),
        }
    }
    if !refused.is_empty() {
        return Err(refused.join("\n"));
    }
    Ok(Children {
        services: vec![router.child(), nodes.child()],
        apps,
    })
}
