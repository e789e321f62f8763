//! `warren`: the service binary. It reads config.ini, starts the supervision tree with the
//! apps compiled in, and stops it in order on SIGINT/SIGTERM; `warren call` sends one
//! request through a pool; `warren status` lists the live nodes or prints one node's
//! status; `warren check-config` validates a config file.
//!
//! Exit codes: 0 stopped cleanly; 1 could not start or the tree failed; 2 bad
//! configuration or bad command line.

mod apps;
mod call;
mod cli;
mod log_format;
mod run;
mod status;

use std::process::ExitCode;

use clap::Parser;
use warren_runtime::config::Config;

use crate::cli::{Cli, Command};

/// Exit code for configuration and usage errors.
pub const EXIT_CONFIG: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run => run::run(&cli.config).await,
        Command::CheckConfig { path } => check_config(path.as_deref().unwrap_or(&cli.config)),
        Command::Call {
            exchange,
            routing_key,
            json,
            timeout_ms,
        } => {
            if let Err(exit) = client_logging() {
                return exit;
            }
            call::call(call::Call {
                config: &cli.config,
                exchange: &exchange,
                routing_key: &routing_key,
                json: &json,
                timeout: std::time::Duration::from_millis(timeout_ms),
            })
            .await
        }
        Command::Status {
            node,
            json,
            timeout_ms,
        } => {
            if let Err(exit) = client_logging() {
                return exit;
            }
            status::status(status::Status {
                config: &cli.config,
                node: node.as_deref(),
                json,
                timeout: std::time::Duration::from_millis(timeout_ms),
            })
            .await
        }
    }
}

/// Logging for the client commands (`call`, `status`): warnings only, in the format
/// `WARREN_LOG_FORMAT` asks for; an unknown format is a usage error (exit 2).
fn client_logging() -> Result<(), ExitCode> {
    run::init_logging("warn").map_err(|error| {
        eprintln!("warren: {error}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// `warren check-config [PATH]`: validate and print the effective config, passwords redacted.
fn check_config(path: &std::path::Path) -> ExitCode {
    match Config::load(path, &apps::names()) {
        Ok(config) => {
            print!("{}", config.effective_toml());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("warren: {error}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}
