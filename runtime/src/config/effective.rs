//! Rendering the effective configuration back as config.ini-shaped TOML: the same
//! sections and key names, every default filled in, every broker password redacted.
//!
//! Operators read this (e.g. at startup or from a `--print-config` flag) to see what a
//! node actually runs with; it parses back as a valid config.ini.

use std::fmt::{self, Write};
use std::time::Duration;

use super::locate::segment;
use super::{Config, ConfiguredBroker, PoolConfig};

/// The effective configuration as TOML text, headed by a comment naming its source.
pub(super) fn render(config: &Config) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail, so there is no error to pass on.
    let _ = write_config(&mut out, config);
    out
}

/// Writes every section of `config` to `out`.
fn write_config(out: &mut String, config: &Config) -> fmt::Result {
    let source = config.path.display().to_string().replace(['\n', '\r'], " ");
    writeln!(
        out,
        "# effective configuration loaded from {source} (defaults filled in, passwords redacted)"
    )?;

    let service = &config.service;
    writeln!(out, "\n[service]")?;
    key(out, "node", quote(&service.node))?;
    secs(out, "shutdown_timeout_secs", service.shutdown_timeout)?;

    let amqp = &config.amqp;
    writeln!(out, "\n[amqp]")?;
    key(out, "zone", quote(&amqp.zone))?;
    key(out, "prefetch", amqp.prefetch)?;
    key(out, "heartbeat_secs", amqp.heartbeat_secs)?;
    millis(out, "connect_timeout_ms", amqp.connect_timeout)?;
    millis(out, "reconnect_min_ms", amqp.reconnect_min)?;
    millis(out, "reconnect_max_ms", amqp.reconnect_max)?;
    millis(out, "remote_reconnect_max_ms", amqp.remote_reconnect_max)?;
    secs(out, "startup_timeout_secs", amqp.startup_timeout)?;
    key(out, "prechannels", amqp.prechannels)?;
    millis(out, "operation_timeout_ms", amqp.operation_timeout)?;

    if let Some(tls) = &config.tls {
        writeln!(out, "\n[tls]")?;
        let files = tls.files();
        let written = [
            ("ca_file", &files.ca_file),
            ("cert_file", &files.cert_file),
            ("key_file", &files.key_file),
        ];
        for (name, path) in written {
            if let Some(path) = path {
                key(out, name, quote(&path.display().to_string()))?;
            }
        }
    }

    for zone in &config.zones {
        let brokers: Vec<String> = zone.brokers.iter().map(broker).collect();
        writeln!(out, "\n[zones.{}]", segment(&zone.name))?;
        writeln!(out, "brokers = [{}]", brokers.join(", "))?;
        if !zone.amqp10_brokers.is_empty() {
            let amqp10: Vec<String> = zone
                .amqp10_brokers
                .iter()
                .map(|uri| quote(uri.redacted()))
                .collect();
            writeln!(out, "amqp10_brokers = [{}]", amqp10.join(", "))?;
        }
    }

    let listener = &config.listener;
    writeln!(out, "\n[listener]")?;
    key(out, "max_redeliveries", listener.max_redeliveries)?;
    millis(out, "stop_timeout_ms", listener.stop_timeout)?;
    millis(out, "publish_timeout_ms", listener.publish_timeout)?;
    key(out, "max_message_bytes", listener.max_message_bytes)?;
    millis(out, "drain_timeout_ms", listener.drain_timeout)?;
    millis(out, "fail_back_watch_ms", listener.fail_back_watch)?;
    millis(
        out,
        "anonymous_queue_expiry_ms",
        listener.anonymous_queue_expiry,
    )?;

    let publisher = &config.publisher;
    writeln!(out, "\n[publisher]")?;
    millis(out, "timeout_ms", publisher.timeout)?;
    key(out, "confirm_window", publisher.confirm_window)?;
    key(out, "new_traces", publisher.new_traces)?;

    writeln!(out, "\n[router]")?;
    key(out, "exchange", quote(&config.router.exchange))?;
    key(out, "buffer", config.router.buffer)?;

    writeln!(out, "\n[pool]")?;
    pool_lines(out, "", &config.pool)?;

    let rpc = &config.rpc;
    writeln!(out, "\n[rpc]")?;
    key(
        out,
        "server_request_prefix",
        quote(&rpc.server_request_prefix),
    )?;
    key(
        out,
        "group_request_prefix",
        quote(&rpc.group_request_prefix),
    )?;
    key(out, "broadcast_prefix", quote(&rpc.broadcast_prefix))?;
    key(out, "exchange", quote(&rpc.exchange))?;
    key(
        out,
        "notifications_exchange",
        quote(&rpc.notifications_exchange),
    )?;
    millis(out, "server_queue_expiry_ms", rpc.server_queue_expiry)?;
    key(out, "transport", quote(rpc.transport.name()))?;
    writeln!(out, "\n[rpc.amqp10]")?;
    key(out, "anycast", quote(&rpc.amqp10.anycast))?;
    key(out, "multicast", quote(&rpc.amqp10.multicast))?;
    key(out, "reply", quote(&rpc.amqp10.reply))?;

    writeln!(out, "\n[http]")?;
    let listen = config
        .http
        .listen
        .map(|a| a.to_string())
        .unwrap_or_default();
    key(out, "listen", quote(&listen))?;

    for exchange in &config.exchanges {
        writeln!(out, "\n[exchanges.{}]", segment(&exchange.name))?;
        if let Some(durable) = exchange.durable {
            key(out, "durable", durable)?;
        }
        if let Some(auto_delete) = exchange.auto_delete {
            key(out, "auto_delete", auto_delete)?;
        }
    }

    for app in &config.apps {
        writeln!(out, "\n[apps.{}]", segment(&app.name))?;
        key(out, "enabled", app.enabled)?;
        key(out, "quorum_queues", app.quorum_queues)?;
        key(out, "federate", app.federate)?;
        pool_lines(out, "pool_", &app.pool)?;
        if app.name == super::pusher::APP {
            pusher_lines(out, &app.event_pusher)?;
        }
        if app.name == super::gateway::APP {
            gateway_lines(out, &app.gateway)?;
        }
    }
    Ok(())
}

/// `[apps.event_pusher]`'s own keys, MongooseIM's dotted names for the exchanges.
fn pusher_lines(out: &mut String, pusher: &super::EventPusherConfig) -> fmt::Result {
    for (field, exchange, topics) in [
        ("presence_exchange", &pusher.presence_exchange, false),
        ("chat_msg_exchange", &pusher.chat_msg_exchange, true),
        (
            "groupchat_msg_exchange",
            &pusher.groupchat_msg_exchange,
            true,
        ),
    ] {
        key(
            out,
            &format!("{field}.name"),
            format!("{:?}", exchange.name),
        )?;
        key(
            out,
            &format!("{field}.type"),
            format!("{:?}", exchange.kind.as_str()),
        )?;
        if topics {
            key(
                out,
                &format!("{field}.sent_topic"),
                format!("{:?}", exchange.sent_topic),
            )?;
            key(
                out,
                &format!("{field}.recv_topic"),
                format!("{:?}", exchange.recv_topic),
            )?;
        }
    }
    key(out, "lanes", pusher.lanes)?;
    key(out, "lane_window", pusher.lane_window)?;
    key(out, "max_request_bytes", pusher.max_request_bytes)?;
    key(out, "max_batch", pusher.max_batch)?;
    key(out, "persistent", pusher.persistent)?;
    key(out, "durable_exchanges", pusher.durable_exchanges)
}

/// `[apps.gateway]`'s own keys; `jwt_secret` is never printed (a comment says whether it
/// is set).
fn gateway_lines(out: &mut String, gateway: &super::GatewayConfig) -> fmt::Result {
    let list = |items: Vec<String>| {
        let quoted: Vec<String> = items.iter().map(|i| quote(i)).collect();
        format!("[{}]", quoted.join(", "))
    };
    key(out, "path", quote(&gateway.path))?;
    key(out, "in_exchange", quote(&gateway.in_exchange))?;
    key(out, "out_exchange", quote(&gateway.out_exchange))?;
    key(out, "client_exchange", quote(&gateway.client_exchange))?;
    key(out, "queue_prefix", quote(&gateway.queue_prefix))?;
    millis(out, "client_queue_expiry_ms", gateway.client_queue_expiry)?;
    millis(out, "request_timeout_ms", gateway.request_timeout)?;
    if gateway.jwt_secret.is_empty() {
        writeln!(out, "# jwt_secret: not set")?;
    } else {
        writeln!(out, "# jwt_secret: set (not shown)")?;
    }
    key(out, "jwt_audience", quote(&gateway.jwt_audience))?;
    key(out, "identity_header", quote(&gateway.identity_header))?;
    key(
        out,
        "trusted_proxies",
        list(
            gateway
                .trusted_proxies
                .iter()
                .map(ToString::to_string)
                .collect(),
        ),
    )?;
    key(
        out,
        "allowed_origins",
        list(gateway.allowed_origins.clone()),
    )?;
    key(out, "max_frame_bytes", gateway.max_frame_bytes)?;
    key(out, "max_frames_per_sec", gateway.max_frames_per_sec)?;
    key(out, "max_subscriptions", gateway.max_subscriptions)
}

/// The three pool keys, named `size`/`overflow` in `[pool]` and `pool_size`/`pool_overflow`
/// in `[apps.*]`.
fn pool_lines(out: &mut String, prefix: &str, pool: &PoolConfig) -> fmt::Result {
    writeln!(out, "{prefix}size = {}", pool.size)?;
    writeln!(out, "{prefix}overflow = {}", pool.overflow)?;
    millis(out, "checkout_timeout_ms", pool.checkout_timeout)?;
    millis(out, "idle_timeout_ms", pool.idle_timeout)
}

/// One `key = value` line.
fn key(out: &mut String, key: &str, value: impl fmt::Display) -> fmt::Result {
    writeln!(out, "{key} = {value}")
}

/// A `…_ms` key.
fn millis(out: &mut String, key_name: &str, value: Duration) -> fmt::Result {
    key(out, key_name, value.as_millis())
}

/// A `…_secs` key.
fn secs(out: &mut String, key_name: &str, value: Duration) -> fmt::Result {
    key(out, key_name, value.as_secs())
}

/// One entry of `brokers`: the redacted URI as a string, or an inline table when the
/// broker has tags or a server name, or is a cluster.
fn broker(broker: &ConfiguredBroker) -> String {
    let uri = quote(broker.uri.redacted());
    if !broker.cluster && broker.tags.is_empty() && broker.server_name.is_none() {
        return uri;
    }
    let mut table = if broker.cluster {
        let members: Vec<String> = broker
            .members
            .iter()
            .map(|member| quote(member.redacted()))
            .collect();
        format!("{{ cluster = [{}]", members.join(", "))
    } else {
        format!("{{ uri = {uri}")
    };
    if !broker.tags.is_empty() {
        let tags: Vec<String> = broker.tags.iter().map(|tag| quote(tag)).collect();
        let _ = write!(table, ", tags = [{}]", tags.join(", "));
    }
    if let Some(name) = &broker.server_name {
        let _ = write!(table, ", server_name = {}", quote(name));
    }
    table.push_str(" }");
    table
}

/// A TOML string literal, escaped as needed.
fn quote(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}
