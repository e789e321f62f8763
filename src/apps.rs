//! The apps compiled into this binary. Add a new app's crate here to ship it.

use warren_listeners::{App, AppContext, ConfigRouter, app_child};
use warren_runtime::node::{Children, NodeContext};

/// Every app this binary can run; config.ini's `[apps.<name>]` enables them.
fn catalog() -> Vec<Box<dyn App>> {
    vec![
        Box::new(warren_app_skel::Skel),
        Box::new(warren_app_echo::Echo),
    ]
}

/// The names config.ini may use under `[apps]`.
pub fn names() -> Vec<&'static str> {
    catalog().iter().map(|app| app.name()).collect()
}

/// The node's services (the configuration-event router) and one `app:<name>` supervisor
/// per enabled app, in config order; every app gets the router.
pub fn children(node: &NodeContext) -> Children {
    let router = ConfigRouter::new(node);
    let catalog = catalog();
    let apps = node
        .config
        .apps
        .iter()
        .filter(|app| app.enabled)
        .filter_map(|config| {
            let app = catalog.iter().find(|app| app.name() == config.name)?;
            let ctx = AppContext::new(app.as_ref(), node.clone(), config.clone())
                .with_router(router.clone());
            Some(app_child(app.as_ref(), ctx))
        })
        .collect();
    Children {
        services: vec![router.child()],
        apps,
    }
}
