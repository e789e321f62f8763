//! `warren call`: one request through a pool, the reply printed as JSON (the operator's
//! tool). A timeout or an unroutable request exits non-zero with a clear message.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use warren_listeners::{AppContext, Envelope, RpcError};
use warren_runtime::config::{AppConfig, Config, PoolConfig};
use warren_runtime::node::Node;

use crate::EXIT_CONFIG;

/// What to call.
pub struct Call<'a> {
    pub config: &'a Path,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub json: &'a str,
    pub timeout: Duration,
}

pub async fn call(call: Call<'_>) -> ExitCode {
    let request = match request(call.json) {
        Ok(request) => request,
        Err(error) => {
            eprintln!("warren: --json: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut config = match Config::load(call.config, &crate::apps::names()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("warren: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    config.service.node = format!("{}/call", config.service.node);
    let checkout = config.pool.checkout_timeout;
    let node = match Node::start(config, |_| Vec::new()).await {
        Ok(node) => node,
        Err(error) => {
            eprintln!("warren: cannot start: {error}");
            return ExitCode::FAILURE;
        }
    };
    let ctx = AppContext::with_version(
        env!("CARGO_PKG_VERSION"),
        node.context().clone(),
        AppConfig::new(
            "call",
            PoolConfig {
                size: 1,
                overflow: 0,
                checkout_timeout: checkout + call.timeout,
                idle_timeout: Duration::from_secs(30),
            },
        ),
    );
    let outcome = match ctx.pool.spawn().await {
        Ok(()) => {
            ctx.pool
                .call(call.exchange, call.routing_key, request, call.timeout)
                .await
        }
        Err(error) => Err(RpcError::Pool(error)),
    };
    ctx.pool.stop().await;
    let _ = node.stop().await;
    match outcome {
        Ok(reply) => match serde_json::to_string_pretty(reply.fields()) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("warren: cannot print the reply: {error}");
                ExitCode::FAILURE
            }
        },
        Err(RpcError::Timeout(waited)) => {
            eprintln!(
                "warren: no reply within {} ms from exchange `{}` with routing key `{}`",
                waited.as_millis(),
                call.exchange,
                call.routing_key
            );
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("warren: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The request: a JSON object with at least Event-Category and Event-Name.
fn request(json: &str) -> Result<Envelope, String> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let serde_json::Value::Object(map) = value else {
        return Err("the request must be a JSON object".to_string());
    };
    Envelope::from_map(map).map_err(|e| e.to_string())
}
