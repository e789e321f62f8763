//! The shared broker, and what brokers report about their connections.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::SupportError;
use crate::process::{bin_dir, run_captured};

/// Upper bound for one rabbitmqctl call (it has its own, longer, RPC timeouts).
pub(crate) const CTL_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the system node keeps the Erlang cookie that rabbitmqctl needs.
const SYSTEM_RABBITMQ_HOME: &str = "/var/lib/rabbitmq";

/// URI of the shared broker most integration tests use: `WARREN_TEST_AMQP_URI` if set,
/// otherwise the system node at 127.0.0.1:5672 with guest/guest.
pub fn local_uri() -> String {
    std::env::var("WARREN_TEST_AMQP_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// `rabbitmqctl -q <args>` against the default node (`rabbit@localhost`), returning stdout.
///
/// As root with the system cookie readable, this runs the unwrapped script with
/// `HOME=/var/lib/rabbitmq` (about 0.4 s); otherwise it falls back to `rabbitmqctl` from
/// `PATH`, whose Debian wrapper switches to the rabbitmq user (about 1.2 s).
pub fn local_ctl(args: &[&str]) -> Result<String, SupportError> {
    let home = Path::new(SYSTEM_RABBITMQ_HOME);
    let mut cmd = if std::fs::File::open(home.join(".erlang.cookie")).is_ok() {
        let mut cmd = Command::new(bin_dir().join("rabbitmqctl"));
        cmd.env("HOME", home).current_dir(home);
        cmd
    } else {
        Command::new("rabbitmqctl")
    };
    cmd.arg("-q").args(args);
    run_captured(cmd, CTL_TIMEOUT)
}

/// One AMQP connection as the broker sees it. Exists so tests can assert on what the broker
/// observes (did the runtime reconnect? how many channels does it hold?) rather than on the
/// client's own view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionRow {
    /// Erlang pid of the connection process, e.g. `<rabbit@localhost.1795372241.870.0>`;
    /// what `rabbitmqctl close_connection` takes.
    pub pid: String,
    /// Client-provided connection name (`connection_name` client property), "" if none.
    pub name: String,
    /// Number of open channels.
    pub channels: u32,
    /// Connection state as reported by the broker (`running`, `blocked`, `flow`, ...).
    pub state: String,
}

/// Columns we ask for; `client_properties` must stay last because it is free-form text.
const CONNECTION_COLUMNS: [&str; 4] = ["pid", "channels", "state", "client_properties"];

/// Lists the connections of the broker that `ctl` talks to (`local_ctl`, or
/// `|args| node.ctl(args)` for a [`crate::BrokerNode`]).
pub fn list_connections(
    ctl: impl Fn(&[&str]) -> Result<String, SupportError>,
) -> Result<Vec<ConnectionRow>, SupportError> {
    let mut args = vec!["list_connections", "--no-table-headers"];
    args.extend(CONNECTION_COLUMNS);
    parse_connections(&ctl(&args)?)
}

/// Closes (`rabbitmqctl close_connection <pid> <reason>`) every connection whose client
/// name contains `name_contains`; returns how many were closed. An empty pattern is
/// refused: on the shared broker it would close other tests' connections.
pub fn close_connections(
    ctl: impl Fn(&[&str]) -> Result<String, SupportError>,
    name_contains: &str,
    reason: &str,
) -> Result<usize, SupportError> {
    if name_contains.is_empty() {
        return Err(SupportError::InvalidState(
            "close_connections: refusing an empty name pattern (would close every connection)"
                .into(),
        ));
    }
    let mut closed = 0;
    for row in list_connections(&ctl)? {
        if row.name.contains(name_contains) {
            // Closing a connection that has gone away meanwhile still succeeds (exit 0).
            ctl(&["close_connection", &row.pid, reason])?;
            closed += 1;
        }
    }
    Ok(closed)
}

/// Total channels over all connections whose client name contains `name_contains`.
pub fn channel_count(
    ctl: impl Fn(&[&str]) -> Result<String, SupportError>,
    name_contains: &str,
) -> Result<u32, SupportError> {
    Ok(list_connections(ctl)?
        .iter()
        .filter(|row| row.name.contains(name_contains))
        .map(|row| row.channels)
        .sum())
}

/// Parses `list_connections --no-table-headers pid channels state client_properties`.
/// Rows are tab-separated; lines that don't start with a pid (`<`) are informational
/// output and skipped.
pub(crate) fn parse_connections(output: &str) -> Result<Vec<ConnectionRow>, SupportError> {
    let mut rows = Vec::new();
    for line in output.lines() {
        let line = line.trim_end_matches('\r');
        if !line.starts_with('<') {
            continue;
        }
        let parse_err = || SupportError::Parse {
            what: "rabbitmqctl list_connections row".into(),
            input: line.to_string(),
        };
        let mut fields = line.splitn(CONNECTION_COLUMNS.len(), '\t');
        let (Some(pid), Some(channels), Some(state), Some(props)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(parse_err());
        };
        rows.push(ConnectionRow {
            pid: pid.to_string(),
            name: connection_name(props).unwrap_or_default(),
            channels: channels.trim().parse().map_err(|_| parse_err())?,
            state: state.to_string(),
        });
    }
    Ok(rows)
}

/// Extracts `connection_name` from client properties as rabbitmqctl prints them:
/// `[{"capabilities",[...]},{"connection_name","my \"name\""},{"product","lapin"}]`.
/// Strings are double-quoted with backslash escapes, so a literal `{"connection_name","`
/// can only be the property itself.
fn connection_name(props: &str) -> Option<String> {
    const KEY: &str = "{\"connection_name\",\"";
    let start = props.find(KEY)? + KEY.len();
    let mut name = String::new();
    let mut chars = props[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(name),
            '\\' => match chars.next()? {
                'n' => name.push('\n'),
                't' => name.push('\t'),
                'r' => name.push('\r'),
                c @ ('"' | '\\') => name.push(c),
                other => {
                    name.push('\\');
                    name.push(other);
                }
            },
            c => name.push(c),
        }
    }
    None // unterminated string: treat as no name rather than guess
}
