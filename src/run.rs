//! `warren run`: start the tree, log one line when ready, stop in order on a signal. Also
//! the logging every command sets up: RUST_LOG, within caps that keep bodies and passwords
//! out of the log, in the format `WARREN_LOG_FORMAT` asks for.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::filter::{FilterExt, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};
use warren_runtime::config::Config;
use warren_runtime::node::{Node, StartError};

use crate::log_format::{self, LogFormat};
use crate::{EXIT_CONFIG, apps};

pub async fn run(config_path: &Path) -> ExitCode {
    if let Err(error) = init_logging("info") {
        eprintln!("warren: {error}");
        return ExitCode::from(EXIT_CONFIG);
    }
    let config = match Config::load(config_path, &apps::names()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("warren: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let node_name = config.service.node.clone();
    let startup_timeout = config.amqp.startup_timeout;
    let app_configs = config.apps.clone();
    let enabled: Vec<String> = config
        .apps
        .iter()
        .filter(|a| a.enabled)
        .map(|a| a.name.clone())
        .collect();
    tracing::info!(config = %config_path.display(), node = %node_name, "starting");

    let mut node = match Node::try_start(config, |node| apps::children(node, &app_configs)).await {
        Ok(node) => node,
        Err(StartError::Refused(error)) => {
            // A bad listener spec is found before anything starts; like a config error,
            // restarting cannot fix it.
            eprintln!("warren: an app cannot start:\n{error}");
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(error) => {
            eprintln!("warren: cannot start: {error}");
            return ExitCode::FAILURE;
        }
    };
    let context = node.context().clone();
    let ready_line = {
        let (node_name, enabled) = (node_name.clone(), enabled.join(","));
        move |context: &warren_runtime::node::NodeContext| {
            let registry = &context.registry;
            let primary = registry
                .primary()
                .map_or_else(|| "none".to_string(), |b| b.uri.redacted().to_string());
            let up = registry.availability().iter().filter(|a| **a).count();
            tracing::info!(
                node = %node_name,
                primary = %primary,
                brokers_up = up,
                brokers = registry.brokers().len(),
                apps = %enabled,
                "warren ready"
            );
        }
    };
    // Ready means every listener consumes, not merely that the actors started: a refused
    // declaration keeps the node not ready, and says why, until it is fixed.
    let readiness = context.readiness.clone();
    let _announce = tokio::spawn(async move {
        if !readiness.wait_ready(startup_timeout).await {
            tracing::warn!(
                waited_secs = startup_timeout.as_secs(),
                pending = %readiness.describe_pending(),
                "warren not ready yet"
            );
            while !readiness.wait_ready(Duration::from_secs(3600)).await {}
        }
        ready_line(&context);
    });

    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(error) => {
            eprintln!("warren: cannot install signal handlers: {error}");
            let _ = node.stop().await;
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        name = signals.next() => tracing::info!(signal = name, "stopping"),
        _ = node.terminated() => {
            tracing::error!("supervision tree gave up after too many restarts");
            return ExitCode::FAILURE;
        }
    }
    tokio::select! {
        result = node.stop() => match result {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(error) => {
                tracing::warn!(%error, "stopped late");
                ExitCode::FAILURE
            }
        },
        name = signals.next() => {
            tracing::warn!(signal = name, "second signal: exiting at once");
            ExitCode::from(130)
        }
    }
}

/// Logs go to stderr, as text or JSON lines (`WARREN_LOG_FORMAT`, see [`log_format`]);
/// the level comes from RUST_LOG (default: `level`, and warn for ractor, whose per-actor
/// spans would prefix every line), within [`log_caps`], which no RUST_LOG can lift. An
/// unknown `WARREN_LOG_FORMAT` is an error: nothing is set up, and the caller exits.
pub fn init_logging(level: &str) -> Result<(), String> {
    let format = LogFormat::from_env()?;
    let wanted = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},ractor=warn")));
    // Two filters, both of which must let an event through: RUST_LOG cannot outrank the
    // caps, whatever directives it holds.
    let layer = log_format::layer(format, std::io::stderr, std::io::stderr().is_terminal())
        .with_filter(wanted.and(log_caps()));
    tracing_subscriber::registry().with(layer).init();
    Ok(())
}

/// What is never logged, whatever RUST_LOG says: lapin's events, which dump message
/// bodies (returned messages at warn, deliveries at error, every frame at trace, the
/// AMQP start-ok with the password among them) and report what warren handles and logs
/// itself; and amq-protocol's below info (amq-protocol-tcp traces the whole AMQP URI,
/// password included).
fn log_caps() -> Targets {
    Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("lapin", LevelFilter::OFF)
        .with_target("amq_protocol", LevelFilter::INFO)
}

/// SIGINT and SIGTERM.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::log_caps;

    #[test]
    fn the_caps_silence_lapin_and_amq_protocol_below_info() {
        let caps = log_caps();
        for level in [Level::ERROR, Level::WARN, Level::TRACE] {
            assert!(!caps.would_enable("lapin", &level), "lapin at {level}");
            assert!(!caps.would_enable("lapin::io_loop", &level), "{level}");
        }
        for target in ["amq_protocol_tcp", "amq_protocol_uri", "amq_protocol"] {
            assert!(!caps.would_enable(target, &Level::DEBUG), "{target}");
            assert!(!caps.would_enable(target, &Level::TRACE), "{target}");
            assert!(caps.would_enable(target, &Level::INFO), "{target}");
        }
        for target in ["warren", "warren_runtime::connection_actor", "ractor"] {
            assert!(caps.would_enable(target, &Level::TRACE), "{target}");
        }
    }
}
