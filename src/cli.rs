//! The command line: `warren run`, `warren check-config`, `warren call`, `warren status`.

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
    /// Send one kapi request through a pool and print the reply as JSON.
    Call {
        /// The exchange to publish the request to.
        #[arg(long)]
        exchange: String,
        /// The routing key of the request.
        #[arg(long)]
        routing_key: String,
        /// The request: a JSON object with at least Event-Category and Event-Name.
        #[arg(long)]
        json: String,
        /// How long to wait for the reply.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// List the live nodes of the cluster (asked over AMQP), or print one node's status.
    Status {
        /// Ask this node for its status (supervision parts, brokers, readiness).
        #[arg(long)]
        node: Option<String>,
        /// Print JSON instead of a table or a tree.
        #[arg(long)]
        json: bool,
        /// How long to wait for the answers.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
}
