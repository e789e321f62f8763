//! tickets: apps/gateway's sample back-end (the POC's "server"): consumes `IN_TICKETS`, answers
//! on `OUT_TICKETS` (sender and `message.to`, else everyone) and write-and-wait requests (RPC
//! `request` of topic `IN_TICKETS`). Owns nothing else; must not touch sockets (prelude only).
use std::sync::{Arc, atomic::AtomicU64, atomic::Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use warren_listeners::prelude::*;

/// The back-end app (`[apps.tickets]`); `config` names the gateway's exchanges and queues.
#[derive(Default)]
pub struct Tickets {
    pub config: GatewayConfig,
}

impl App for Tickets {
    fn name(&self) -> &'static str {
        "tickets"
    }
    fn version(&self) -> &'static str {
        env!("CARGO_PKG_VERSION")
    }
    fn children(&self, ctx: &AppContext) -> Vec<ChildSpec> {
        let (c, next) = (&self.config, Arc::new(AtomicU64::new(1)));
        let number = move || format!("T-{}", next.fetch_add(1, Ordering::Relaxed));
        let (numbered, out) = (number.clone(), c.out_exchange.clone());
        let inbox = ListenerSpec::new("tickets.in")
            .queue(QueueSpec::named(format!("{}IN_TICKETS", c.queue_prefix)).durable())
            .exchange(Exchange::topic(&c.in_exchange).durable())
            .exchange(Exchange::topic(&out).durable())
            .bind(&c.in_exchange, "tickets")
            .responder("gateway", "in", move |event: Event| {
                let (out, ticket, wait) = (out.clone(), numbered(), Duration::from_secs(5));
                async move {
                    let e = event.envelope();
                    let from = e.get_str("client_id").unwrap_or_default().to_string();
                    let body = e.get("message").cloned().unwrap_or(Value::Null);
                    let to = match body.get("to").and_then(Value::as_str) {
                        Some(to) => json!({"multicast": [from, to]}),
                        None => json!({"broadcast": true}),
                    };
                    let answer = json!({"ticket": ticket, "from": from, "body": body});
                    let reply = Envelope::new("gateway", "out").with("distribution", to);
                    let options = PublishOptions::new(wait).persistent();
                    let sent =
                        event.publish_with(&out, "tickets", reply.with("message", answer), options);
                    sent.await.map(drop).map_err(HandlerError::retry)
                }
            });
        let method = move |args: Value| {
            let answer = json!({"ticket": number(), "status": "open", "body": args["message"]});
            async move { Ok(answer) }
        };
        let server = RpcServer::new("IN_TICKETS")
            .exchange(&c.in_exchange)
            .method("request", method);
        vec![ctx.listener(inbox), ctx.rpc_server(server)]
    }
}
