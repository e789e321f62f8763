//! skel: the template app. Copy this crate to start a new one, add it to the catalogue in
//! the binary's `src/apps.rs`, and enable it in config.ini with an `[apps.<name>]` section.
//!
//! An app is a name and the children warren supervises for it; here one listener: an
//! anonymous queue bound to the topic exchange `skel`, and one responder.

use warren_listeners::prelude::*;

/// The template app.
pub struct Skel;

impl App for Skel {
    fn name(&self) -> &'static str {
        "skel"
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn children(&self, ctx: &AppContext) -> Vec<ChildSpec> {
        vec![ctx.listener(SkelListener)]
    }
}

/// The app's listener: what it consumes and who handles it.
struct SkelListener;

impl Listener for SkelListener {
    fn spec(&self) -> ListenerSpec {
        ListenerSpec::new("skel")
            .exchange(Exchange::topic("skel"))
            .bind("skel", "skel.#")
            .responder("skel", "*", hello)
    }
}

/// A responder: ok → ack, `Err(HandlerError::retry(..))` → requeue, `reject` → dead-letter.
async fn hello(event: Event) -> HandlerResult {
    tracing::info!(
        name = event.name(),
        msg_id = event.envelope().msg_id(),
        "skel got an event"
    );
    Ok(())
}
