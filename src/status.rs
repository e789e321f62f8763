//! `warren status`: the live nodes of the cluster, asked over AMQP (every node announces
//! itself at once when queried), as a table or JSON; `--node NAME` asks that node for its
//! status document and prints it. A node that does not answer within the timeout (or no
//! node at all) is reported and exits 1.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use warren_listeners::nodes::{ANNOUNCE_KEY, CATEGORY, QUERY_KEY};
use warren_listeners::{
    AppContext, Envelope, Event, Exchange, Listener, ListenerSpec, NodeInfo, QueueSpec,
    spawn_listener,
};
use warren_runtime::config::{AppConfig, Config, PoolConfig};
use warren_runtime::exchanges::{NODES, TARGETED};
use warren_runtime::node::Node;

use crate::EXIT_CONFIG;

/// What to ask.
pub struct Status<'a> {
    pub config: &'a Path,
    /// One node's status document instead of the list.
    pub node: Option<&'a str>,
    pub json: bool,
    pub timeout: Duration,
}

/// Collects announcements.
struct Collector(mpsc::UnboundedSender<NodeInfo>);

impl Listener for Collector {
    fn spec(&self) -> ListenerSpec {
        let tx = self.0.clone();
        ListenerSpec::new("status")
            .queue(QueueSpec::anonymous())
            .exchange(Exchange::topic(NODES))
            .bind(NODES, ANNOUNCE_KEY)
            .responder(CATEGORY, "advertise", move |event: Event| {
                if let Some((info, false)) = NodeInfo::from_envelope(event.envelope()) {
                    let _ = tx.send(info);
                }
                async { Ok(()) }
            })
    }
}

pub async fn status(status: Status<'_>) -> ExitCode {
    let mut config = match Config::load(status.config, &crate::apps::names()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("warren: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    config.service.node = format!("{}/status", config.service.node);
    let node = match Node::start(config, |_| Vec::new()).await {
        Ok(node) => node,
        Err(error) => {
            eprintln!("warren: cannot start: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = ask(&node, &status).await;
    let _ = node.stop().await;
    code
}

async fn ask(node: &Node, status: &Status<'_>) -> ExitCode {
    let ctx = AppContext::with_version(
        env!("CARGO_PKG_VERSION"),
        node.context().clone(),
        AppConfig::new(
            "status",
            PoolConfig {
                size: 1,
                overflow: 0,
                checkout_timeout: status.timeout,
                idle_timeout: Duration::from_secs(30),
            },
        ),
    );
    let (tx, mut rx) = mpsc::unbounded_channel();
    let collector = match spawn_listener(Collector(tx), &ctx).await {
        Ok(handle) => handle,
        Err(error) => {
            eprintln!("warren: cannot listen for announcements: {error}");
            return ExitCode::FAILURE;
        }
    };
    if !collector.wait_consuming(true, status.timeout).await {
        eprintln!("warren: cannot consume announcements from exchange `{NODES}`");
        let _ = collector.stop().await;
        return ExitCode::FAILURE;
    }
    let publisher = &node.context().publisher;
    let query = Envelope::new(CATEGORY, "query");
    if let Err(error) = publisher
        .publish(NODES, QUERY_KEY, query, publisher.options())
        .await
    {
        eprintln!("warren: cannot ask the nodes: {error}");
        let _ = collector.stop().await;
        return ExitCode::FAILURE;
    }
    // Every live node answers a query at once; collect for a short window.
    let window = status.timeout.min(Duration::from_secs(2));
    let deadline = tokio::time::Instant::now() + window;
    let mut nodes: Vec<NodeInfo> = Vec::new();
    while let Ok(Some(info)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        let asked_for = status.node.is_some_and(|name| name == info.node);
        nodes.retain(|known| known.node != info.node);
        nodes.push(info);
        if asked_for {
            break;
        }
    }
    let _ = collector.stop().await;
    nodes.sort_by(|a, b| a.node.cmp(&b.node));
    match status.node {
        None => list(&nodes, status.json, window),
        Some(name) => one(&ctx, &nodes, name, status).await,
    }
}

fn list(nodes: &[NodeInfo], json: bool, window: Duration) -> ExitCode {
    if json {
        let all: Vec<Value> = nodes.iter().map(|n| n.to_json(Duration::ZERO)).collect();
        println!("{}", Value::Array(all));
    } else if !nodes.is_empty() {
        println!("{}", table(nodes, now_secs()));
    }
    if nodes.is_empty() {
        eprintln!(
            "warren: no node answered within {} ms (none running, or on other brokers)",
            window.as_millis()
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// The nodes as an aligned table.
fn table(nodes: &[NodeInfo], now: u64) -> String {
    let rows: Vec<[String; 5]> = nodes
        .iter()
        .map(|n| {
            [
                n.node.clone(),
                n.zone.clone(),
                n.version.clone(),
                if n.apps.is_empty() {
                    "-".to_string()
                } else {
                    n.apps.join(",")
                },
                uptime(now.saturating_sub(n.started_at)),
            ]
        })
        .collect();
    let header = ["NODE", "ZONE", "VERSION", "APPS", "UP"].map(str::to_string);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    std::iter::once(&header)
        .chain(&rows)
        .map(|row| {
            row.iter()
                .zip(widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn uptime(seconds: u64) -> String {
    match seconds {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86_400 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn one(ctx: &AppContext, nodes: &[NodeInfo], name: &str, status: &Status<'_>) -> ExitCode {
    let Some(info) = nodes.iter().find(|n| n.node == name) else {
        eprintln!(
            "warren: node `{name}` did not answer within {} ms",
            status.timeout.min(Duration::from_secs(2)).as_millis()
        );
        return ExitCode::FAILURE;
    };
    let answer = match ctx.pool.spawn().await {
        Ok(()) => {
            let request = Envelope::new(CATEGORY, "status_req");
            ctx.pool
                .call(TARGETED, &info.queue, request, status.timeout)
                .await
        }
        Err(error) => Err(warren_listeners::RpcError::Pool(error)),
    };
    ctx.pool.stop().await;
    let document = match answer {
        Ok(reply) => reply.get("Status").cloned().unwrap_or(Value::Null),
        Err(error) => {
            eprintln!("warren: node `{name}` did not answer: {error}");
            return ExitCode::FAILURE;
        }
    };
    if status.json {
        println!("{document}");
    } else {
        println!("{}", tree(&document));
    }
    ExitCode::SUCCESS
}

/// A node's status document as an indented tree.
fn tree(document: &Value) -> String {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    let mut out = vec![format!(
        "{} (zone {}, version {}, {})",
        text(&document["node"]),
        text(&document["zone"]),
        text(&document["version"]),
        if document["ready"] == Value::Bool(true) {
            "ready".to_string()
        } else {
            format!("not ready: {}", text(&document["not_ready"]))
        }
    )];
    out.push("├─ brokers".to_string());
    for broker in document["brokers"].as_array().into_iter().flatten() {
        let connection = |c: &Value| {
            let up = if c["up"] == Value::Bool(true) {
                "up"
            } else {
                "down"
            };
            match &c["blocked"] {
                Value::String(reason) => format!("{up} (blocked: {reason})"),
                _ => format!("{up} (generation {})", text(&c["generation"])),
            }
        };
        out.push(format!(
            "│  ├─ {} zone {}{}: consume {}, publish {}",
            text(&broker["broker"]),
            text(&broker["zone"]),
            if broker["primary"] == Value::Bool(true) {
                " primary"
            } else {
                ""
            },
            connection(&broker["consume"]),
            connection(&broker["publish"]),
        ));
    }
    out.push("├─ supervision tree".to_string());
    supervision(&document["tree"], 1, &mut out);
    let listeners = document["listeners"].as_array().into_iter().flatten();
    for (n, listener) in listeners.enumerate() {
        if n == 0 {
            out.push("├─ listeners".to_string());
        }
        out.push(format!(
            "│  ├─ {} queue {} broker #{} generation {} grant {} {}, {} in flight",
            text(&listener["listener"]),
            text(&listener["queue"]),
            text(&listener["broker"]),
            text(&listener["generation"]),
            text(&listener["grant"]),
            if listener["consuming"] == Value::Bool(true) {
                "consuming"
            } else {
                "not consuming"
            },
            text(&listener["in_flight"]),
        ));
    }
    for pool in document["pools"].as_array().into_iter().flatten() {
        out.push(format!(
            "├─ pool {}: {} workers, {} busy, {} waiting (size {}, overflow {})",
            text(&pool["pool"]),
            text(&pool["workers"]),
            text(&pool["busy"]),
            text(&pool["waiting"]),
            text(&pool["size"]),
            text(&pool["overflow"]),
        ));
    }
    for router in document["router"].as_array().into_iter().flatten() {
        out.push(format!(
            "├─ router: {} subscribers, {} drops, {} resyncs",
            text(&router["subscribers"]),
            text(&router["drops"]),
            text(&router["resyncs"]),
        ));
    }
    out.push("└─ parts".to_string());
    for part in document["parts"].as_array().into_iter().flatten() {
        let reason = match &part["reason"] {
            Value::String(reason) => format!(": {reason}"),
            _ => String::new(),
        };
        out.push(format!(
            "   ├─ {} {}{reason}",
            text(&part["name"]),
            text(&part["state"])
        ));
    }
    out.join("\n")
}

/// One supervisor or child of the tree, indented by `depth`.
fn supervision(node: &Value, depth: usize, out: &mut Vec<String>) {
    if node.is_null() {
        return;
    }
    let name = node["name"].as_str().unwrap_or("?");
    let state = node["state"].as_str().unwrap_or("?");
    let restarts = node["restarts"].as_u64().unwrap_or(0);
    let recent = node["recent_restarts"].as_u64().unwrap_or(0);
    let restarts = if restarts > 0 {
        format!(", {restarts} restarts, {recent} in the window")
    } else {
        String::new()
    };
    out.push(format!(
        "│{}├─ {name} ({state}{restarts})",
        "  ".repeat(depth)
    ));
    for child in node["children"].as_array().into_iter().flatten() {
        supervision(child, depth + 1, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_aligned_with_uptimes() {
        let node = |name: &str, apps: &[&str], started_at| NodeInfo {
            node: name.to_string(),
            zone: "local".to_string(),
            version: "0.1.0".to_string(),
            apps: apps.iter().map(|a| a.to_string()).collect(),
            started_at,
            queue: String::new(),
        };
        let text = table(
            &[
                node("a@h", &["echo", "skel"], 1000),
                node("bb@host", &[], 4000),
            ],
            7_400,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "NODE     ZONE   VERSION  APPS       UP");
        assert_eq!(lines[1], "a@h      local  0.1.0    echo,skel  1h46m");
        assert_eq!(lines[2], "bb@host  local  0.1.0    -          56m40s");
    }
}
