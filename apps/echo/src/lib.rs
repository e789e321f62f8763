//! echo: answers kapi requests ("echo", "req") with ("echo", "resp") carrying the request's
//! `Payload`, to the requester's `Server-ID` through the `targeted` exchange, with the same
//! `Msg-ID`. Any AMQP client that follows the kapi convention can call it.
//!
//! The queue `echo` is durable, named and consumed non-exclusively, so several warren
//! nodes share it; it is bound to the durable topic exchange `echo` with key `echo.req`
//! (durable like the queue, so the binding survives a broker restart).

use serde_json::Value;
use warren_listeners::{
    App, AppContext, Envelope, Event, Exchange, HandlerError, HandlerResult, Listener,
    ListenerSpec, QueueSpec,
};
use warren_runtime::publish::PublishError;
use warren_runtime::supervisor::ChildSpec;

/// The echo app.
pub struct Echo;

impl App for Echo {
    fn name(&self) -> &'static str {
        "echo"
    }

    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }

    fn children(&self, ctx: &AppContext) -> Vec<ChildSpec> {
        vec![ctx.listener(EchoListener)]
    }
}

/// The listener behind the echo app.
pub struct EchoListener;

impl Listener for EchoListener {
    fn spec(&self) -> ListenerSpec {
        ListenerSpec::new("echo")
            .queue(QueueSpec::named("echo").durable())
            .exchange(Exchange::topic("echo").durable())
            .bind("echo", "echo.req")
            .responder("echo", "req", echo)
    }
}

/// Replies with the request's `Payload`.
async fn echo(request: Event) -> HandlerResult {
    let payload = request
        .envelope()
        .get("Payload")
        .cloned()
        .unwrap_or(Value::Null);
    let reply = Envelope::new("echo", "resp").with("Payload", payload);
    match request.reply(reply).await {
        Ok(_) => Ok(()),
        // Without a Server-ID there is nobody to answer: retrying cannot help.
        Err(PublishError::NoServerId) => Err(HandlerError::reject("request without Server-ID")),
        Err(error) => Err(error.into()),
    }
}
