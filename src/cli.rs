//! The command line: `warren run`, `warren check-config`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// A supervised runtime for RabbitMQ services.
#[derive(Parser, Debug)]
#[command(name = "warren", version, about)]
pub struct Cli {
    /// Path of config.ini.
    #[arg(
        long,
        global = true,
        env = "WARREN_CONFIG",
        default_value = "config.ini"
    )]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start the node and run until SIGINT or SIGTERM.
    Run,
    /// Validate a config file and print the effective configuration (passwords redacted).
    CheckConfig {
        /// The file to check (defaults to --config).
        path: Option<PathBuf>,
    },
}
