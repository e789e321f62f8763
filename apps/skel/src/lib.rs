//! skel: the template app. Copy this crate to start a new app.
//!
//! An app is a name plus the children warren supervises for it. Enable it in config.ini
//! with an `[apps.skel]` section.

use warren_listeners::{App, AppContext};
use warren_runtime::supervisor::ChildSpec;

/// The template app.
pub struct Skel;

impl App for Skel {
    fn name(&self) -> &'static str {
        "skel"
    }

    fn children(&self, _ctx: &AppContext) -> Vec<ChildSpec> {
        Vec::new()
    }
}
