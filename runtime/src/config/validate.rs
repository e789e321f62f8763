//! From the file as written ([`RawConfig`]) to the checked [`Config`]: defaults filled
//! in, meaning checked (the node name's length, zones, brokers and their tags, zero
//! values, pools, apps), every refusal located.
//!
//! Checks run in the order of the file's sections and the first mistake is reported.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::error::{ConfigError, Problem};
use super::locate::{Source, join};
use super::raw::{
    self, BrokerForm, RawAmqp, RawApp, RawBroker, RawConfig, RawExchange, RawHttp, RawListener,
    RawPool, RawPublisher, RawRouter, RawRpc, RawRpcAmqp10, RawService, RawTls, RawZone,
};
use super::read::closest;
use super::rules::positive;
use super::{
    Amqp10Mapping, AmqpConfig, AppConfig, Config, ConfiguredBroker, ExchangeOverride, HttpConfig,
    ListenerConfig, MAX_NODE_BYTES, PoolConfig, PublisherConfig, RouterConfig, RpcConfig,
    RpcTransport, ServiceConfig, Zone,
};
use crate::tls::{Tls, TlsFiles, TlsKey, valid_server_name};
use crate::uri::BrokerUri;

/// What validation needs besides the raw file.
pub(super) struct Inputs<'a> {
    pub source: Source<'a>,
    pub known_apps: &'a [&'a str],
    /// WARREN_ZONE, if set and not blank.
    pub zone_override: Option<&'a str>,
}

/// Checks `raw` and builds the effective configuration.
pub(super) fn validate(raw: RawConfig, inputs: &Inputs<'_>) -> Result<Config, ConfigError> {
    let source = &inputs.source;
    let service = service(&raw.service, source)?;
    let amqp = amqp(&raw.amqp, inputs)?;
    let zones = zones(&raw.zones, &raw.amqp, &amqp.zone, inputs)?;
    let tls = tls(&raw.tls, &zones, source)?;
    let listener = listener(&raw.listener, source)?;
    let router = router(&raw.router, source)?;
    let publisher = publisher(&raw.publisher, source)?;
    let pool = pool(&raw.pool, source)?;
    let rpc = rpc(&raw.rpc, &zones, source)?;
    let http = http(&raw.http, source)?;
    let exchanges = exchanges(&raw.exchanges, source)?;
    let apps = apps(&raw.apps, pool, inputs)?;
    Ok(Config {
        path: source.path.to_path_buf(),
        service,
        amqp,
        tls,
        zones,
        listener,
        router,
        publisher,
        pool,
        rpc,
        http,
        exchanges,
        apps,
    })
}

/// The prefix of the default node name, `warren@<hostname>`.
const DEFAULT_NODE_PREFIX: &str = "warren@";

/// `[service]`: the node name at most [`MAX_NODE_BYTES`] long.
fn service(raw: &RawService, source: &Source<'_>) -> Result<ServiceConfig, ConfigError> {
    let written = raw
        .node
        .as_ref()
        .map(|node| (node.get_ref().trim(), node.span()));
    let node = match written {
        Some((node, span)) if !node.is_empty() => {
            if node.len() > MAX_NODE_BYTES {
                let problem = Problem::NodeTooLong {
                    length: node.len(),
                    limit: MAX_NODE_BYTES,
                };
                return Err(source.error(span.start, "service.node", problem));
            }
            node.to_string()
        }
        _ => default_node(&hostname()),
    };
    let shutdown = positive(
        raw.shutdown_timeout_secs.as_ref(),
        raw::SHUTDOWN_TIMEOUT_SECS,
        "service.shutdown_timeout_secs",
        source,
    )?;
    Ok(ServiceConfig {
        node,
        shutdown_timeout: Duration::from_secs(shutdown),
    })
}

/// `[amqp]`, with the local zone resolved (WARREN_ZONE wins over `amqp.zone`).
fn amqp(raw: &RawAmqp, inputs: &Inputs<'_>) -> Result<AmqpConfig, ConfigError> {
    let source = &inputs.source;
    let zone = match (inputs.zone_override, &raw.zone) {
        (Some(zone), _) => zone.to_string(),
        (None, Some(zone)) if zone.get_ref().trim().is_empty() => {
            return Err(source.error(zone.span().start, "amqp.zone", Problem::EmptyZoneName));
        }
        (None, Some(zone)) => zone.get_ref().clone(),
        (None, None) => raw::ZONE.to_string(),
    };
    let prefetch = positive(
        raw.prefetch.as_ref(),
        raw::PREFETCH,
        "amqp.prefetch",
        source,
    )?;
    let connect_timeout = positive(
        raw.connect_timeout_ms.as_ref(),
        raw::CONNECT_TIMEOUT_MS,
        "amqp.connect_timeout_ms",
        source,
    )?;
    let reconnect_min = positive(
        raw.reconnect_min_ms.as_ref(),
        raw::RECONNECT_MIN_MS,
        "amqp.reconnect_min_ms",
        source,
    )?;
    let reconnect_max = raw
        .reconnect_max_ms
        .as_ref()
        .map_or(raw::RECONNECT_MAX_MS, |max| *max.get_ref());
    if reconnect_min > reconnect_max {
        // At the minimum when the file sets it, else at the maximum that undercuts it.
        let (offset, key) = match (&raw.reconnect_min_ms, &raw.reconnect_max_ms) {
            (Some(min), _) => (min.span().start, "amqp.reconnect_min_ms"),
            (None, Some(max)) => (max.span().start, "amqp.reconnect_max_ms"),
            (None, None) => (0, "amqp.reconnect_min_ms"),
        };
        return Err(source.error(
            offset,
            key,
            Problem::ReconnectRange {
                min: reconnect_min,
                max: reconnect_max,
            },
        ));
    }
    let remote_reconnect_max = positive(
        raw.remote_reconnect_max_ms.as_ref(),
        raw::REMOTE_RECONNECT_MAX_MS,
        "amqp.remote_reconnect_max_ms",
        source,
    )?;
    let startup_timeout = positive(
        raw.startup_timeout_secs.as_ref(),
        raw::STARTUP_TIMEOUT_SECS,
        "amqp.startup_timeout_secs",
        source,
    )?;
    let operation_timeout = positive(
        raw.operation_timeout_ms.as_ref(),
        raw::OPERATION_TIMEOUT_MS,
        "amqp.operation_timeout_ms",
        source,
    )?;
    Ok(AmqpConfig {
        zone,
        prefetch,
        heartbeat_secs: raw.heartbeat_secs.unwrap_or(raw::HEARTBEAT_SECS),
        connect_timeout: Duration::from_millis(connect_timeout),
        reconnect_min: Duration::from_millis(reconnect_min),
        reconnect_max: Duration::from_millis(reconnect_max),
        // Never below the local bound: a remote zone is not retried more often.
        remote_reconnect_max: Duration::from_millis(remote_reconnect_max.max(reconnect_max)),
        startup_timeout: Duration::from_secs(startup_timeout),
        prechannels: raw.prechannels.unwrap_or(raw::PRECHANNELS),
        operation_timeout: Duration::from_millis(operation_timeout),
    })
}

/// `[listener]`.
fn listener(raw: &RawListener, source: &Source<'_>) -> Result<ListenerConfig, ConfigError> {
    let stop_timeout = positive(
        raw.stop_timeout_ms.as_ref(),
        raw::STOP_TIMEOUT_MS,
        "listener.stop_timeout_ms",
        source,
    )?;
    let publish_timeout = positive(
        raw.publish_timeout_ms.as_ref(),
        raw::PUBLISH_TIMEOUT_MS,
        "listener.publish_timeout_ms",
        source,
    )?;
    let max_message_bytes = positive(
        raw.max_message_bytes.as_ref(),
        raw::MAX_MESSAGE_BYTES,
        "listener.max_message_bytes",
        source,
    )?;
    let drain_timeout = positive(
        raw.drain_timeout_ms.as_ref(),
        raw::DRAIN_TIMEOUT_MS,
        "listener.drain_timeout_ms",
        source,
    )?;
    let fail_back_watch = raw
        .fail_back_watch_ms
        .as_ref()
        .map_or(raw::FAIL_BACK_WATCH_MS, |watch| *watch.get_ref());
    let expiry = positive(
        raw.anonymous_queue_expiry_ms.as_ref(),
        raw::ANONYMOUS_QUEUE_EXPIRY_MS,
        "listener.anonymous_queue_expiry_ms",
        source,
    )?;
    Ok(ListenerConfig {
        max_redeliveries: raw.max_redeliveries.unwrap_or(raw::MAX_REDELIVERIES),
        stop_timeout: Duration::from_millis(stop_timeout),
        publish_timeout: Duration::from_millis(publish_timeout),
        max_message_bytes,
        drain_timeout: Duration::from_millis(drain_timeout),
        fail_back_watch: Duration::from_millis(fail_back_watch),
        anonymous_queue_expiry: Duration::from_millis(u64::from(expiry)),
    })
}

/// `[publisher]`.
fn publisher(raw: &RawPublisher, source: &Source<'_>) -> Result<PublisherConfig, ConfigError> {
    let timeout = positive(
        raw.timeout_ms.as_ref(),
        raw::PUBLISHER_TIMEOUT_MS,
        "publisher.timeout_ms",
        source,
    )?;
    let confirm_window = positive(
        raw.confirm_window.as_ref(),
        raw::CONFIRM_WINDOW,
        "publisher.confirm_window",
        source,
    )?;
    Ok(PublisherConfig {
        timeout: Duration::from_millis(timeout),
        confirm_window,
        new_traces: raw.new_traces.unwrap_or(true),
    })
}

/// `[http]`: `listen` is `host:port` with an IP address (a name would be resolved at
/// start, and could fail there instead of here), or empty for no endpoint.
fn http(raw: &RawHttp, source: &Source<'_>) -> Result<HttpConfig, ConfigError> {
    let listen = match &raw.listen {
        None => None,
        Some(written) if written.get_ref().trim().is_empty() => None,
        Some(written) => match written.get_ref().trim().parse::<std::net::SocketAddr>() {
            Ok(address) => Some(address),
            Err(_) => {
                return Err(source.error(
                    written.span().start,
                    "http.listen",
                    Problem::InvalidValue {
                        expected:
                            "an IP address and port such as \"127.0.0.1:9090\", or \"\" for none"
                                .to_string(),
                        found: format!("{:?}", written.get_ref()),
                    },
                ));
            }
        },
    };
    Ok(HttpConfig { listen })
}

/// `[router]`.
fn router(raw: &RawRouter, source: &Source<'_>) -> Result<RouterConfig, ConfigError> {
    let exchange = match &raw.exchange {
        Some(name) if name.get_ref().trim().is_empty() => {
            return Err(source.error(name.span().start, "router.exchange", Problem::EmptyExchange));
        }
        Some(name) if name.get_ref().len() > 255 || name.get_ref().starts_with("amq.") => {
            return Err(source.error(
                name.span().start,
                "router.exchange",
                Problem::BadExchange(name.get_ref().clone()),
            ));
        }
        Some(name) => name.get_ref().clone(),
        None => raw::ROUTER_EXCHANGE.to_string(),
    };
    let buffer = positive(
        raw.buffer.as_ref(),
        raw::ROUTER_BUFFER,
        "router.buffer",
        source,
    )?;
    Ok(RouterConfig { exchange, buffer })
}

/// `[rpc]`: prefixes that are non-empty AMQP short strings without routing wildcards,
/// exchanges that can be declared, a positive queue expiry.
fn rpc(raw: &RawRpc, zones: &[Zone], source: &Source<'_>) -> Result<RpcConfig, ConfigError> {
    let defaults = RpcConfig::default();
    let transport = match &raw.transport {
        None => RpcTransport::default(),
        Some(written) => match written.get_ref().as_str() {
            "amqp091" => RpcTransport::Amqp091,
            "amqp10" => RpcTransport::Amqp10,
            other => {
                return Err(source.error(
                    written.span().start,
                    "rpc.transport",
                    Problem::InvalidValue {
                        expected: "\"amqp091\" or \"amqp10\"".to_string(),
                        found: format!("{other:?}"),
                    },
                ));
            }
        },
    };
    if transport == RpcTransport::Amqp10
        && let Some(local) = zones.iter().find(|zone| zone.local)
        && local.amqp10_brokers.is_empty()
    {
        let at = raw.transport.as_ref().map_or(0, |t| t.span().start);
        let problem = Problem::NoAmqp10Brokers {
            zone: local.name.clone(),
        };
        return Err(source.error(at, "rpc.transport", problem));
    }
    let amqp10 = amqp10_mapping(raw.amqp10.as_ref(), source)?;
    let prefix = |value: Option<&Spanned<String>>, key: &str, default: String| match value {
        None => Ok(default),
        Some(written) => {
            let text = written.get_ref();
            if text.is_empty() || text.len() > 64 || text.contains(['#', '*']) {
                return Err(source.error(
                    written.span().start,
                    key,
                    Problem::InvalidValue {
                        expected: "a non-empty prefix of at most 64 bytes without `#` or `*`"
                            .to_string(),
                        found: format!("{text:?}"),
                    },
                ));
            }
            Ok(text.clone())
        }
    };
    let exchange = |value: Option<&Spanned<String>>, key: &str, default: String| match value {
        None => Ok(default),
        Some(name) if name.get_ref().trim().is_empty() => {
            Err(source.error(name.span().start, key, Problem::EmptyExchange))
        }
        Some(name) if name.get_ref().len() > 255 || name.get_ref().starts_with("amq.") => {
            Err(source.error(
                name.span().start,
                key,
                Problem::BadExchange(name.get_ref().clone()),
            ))
        }
        Some(name) => Ok(name.get_ref().clone()),
    };
    let expiry = positive(
        raw.server_queue_expiry_ms.as_ref(),
        raw::RPC_SERVER_QUEUE_EXPIRY_MS,
        "rpc.server_queue_expiry_ms",
        source,
    )?;
    Ok(RpcConfig {
        server_request_prefix: prefix(
            raw.server_request_prefix.as_ref(),
            "rpc.server_request_prefix",
            defaults.server_request_prefix,
        )?,
        group_request_prefix: prefix(
            raw.group_request_prefix.as_ref(),
            "rpc.group_request_prefix",
            defaults.group_request_prefix,
        )?,
        broadcast_prefix: prefix(
            raw.broadcast_prefix.as_ref(),
            "rpc.broadcast_prefix",
            defaults.broadcast_prefix,
        )?,
        exchange: exchange(raw.exchange.as_ref(), "rpc.exchange", defaults.exchange)?,
        notifications_exchange: exchange(
            raw.notifications_exchange.as_ref(),
            "rpc.notifications_exchange",
            defaults.notifications_exchange,
        )?,
        server_queue_expiry: Duration::from_millis(u64::from(expiry)),
        transport,
        amqp10,
    })
}

/// `[rpc.amqp10]`: templates that name at least one placeholder.
fn amqp10_mapping(
    raw: Option<&RawRpcAmqp10>,
    source: &Source<'_>,
) -> Result<Amqp10Mapping, ConfigError> {
    let defaults = Amqp10Mapping::default();
    let Some(raw) = raw else {
        return Ok(defaults);
    };
    let template = |value: Option<&Spanned<String>>, key: &str, default: String| match value {
        None => Ok(default),
        Some(written) => {
            let text = written.get_ref();
            if !text.contains("{address}") && !text.contains("{name}") {
                return Err(source.error(
                    written.span().start,
                    key,
                    Problem::InvalidValue {
                        expected: "a template with `{address}` or `{name}` in it".to_string(),
                        found: format!("{text:?}"),
                    },
                ));
            }
            Ok(text.clone())
        }
    };
    Ok(Amqp10Mapping {
        anycast: template(raw.anycast.as_ref(), "rpc.amqp10.anycast", defaults.anycast)?,
        multicast: template(
            raw.multicast.as_ref(),
            "rpc.amqp10.multicast",
            defaults.multicast,
        )?,
        reply: template(raw.reply.as_ref(), "rpc.amqp10.reply", defaults.reply)?,
    })
}

/// One broker entry of the file, before parsing.
struct Listed<'r> {
    zone: &'r str,
    /// `zones.<zone>.brokers[i]`.
    key: String,
    /// The key and span of each URI: the entry itself in the plain form, its `uri` in the
    /// table form, `cluster[j]` for a cluster's members. Never empty.
    uris: Vec<(String, Range<usize>)>,
    raw: &'r RawBroker,
}

impl Listed<'_> {
    /// Where the entry starts, for file order.
    fn start(&self) -> usize {
        self.uris.first().map_or(0, |(_, span)| span.start)
    }
}

/// `[zones.*]`: names, broker lists, URIs, tags, duplicates, and the local zone's presence.
/// The local zone comes first, then the others by name.
fn zones(
    raw: &BTreeMap<Spanned<String>, RawZone>,
    raw_amqp: &RawAmqp,
    local: &str,
    inputs: &Inputs<'_>,
) -> Result<Vec<Zone>, ConfigError> {
    let source = &inputs.source;
    let mut listed = Vec::new();
    for (name, zone) in raw {
        let zone_key = join("zones", name.get_ref());
        if name.get_ref().trim().is_empty() {
            return Err(source.error(name.span().start, &zone_key, Problem::EmptyZoneName));
        }
        let no_brokers = || Problem::NoBrokers {
            zone: name.get_ref().clone(),
        };
        let Some(brokers) = &zone.brokers else {
            return Err(source.error(name.span().start, &zone_key, no_brokers()));
        };
        let brokers_key = format!("{zone_key}.brokers");
        if brokers.get_ref().is_empty() {
            return Err(source.error(brokers.span().start, &brokers_key, no_brokers()));
        }
        for (index, broker) in brokers.get_ref().iter().enumerate() {
            listed.push(listed_broker(name.get_ref(), &brokers_key, index, broker));
        }
    }
    // Report mistakes in file order, and call "first" what comes first in the file.
    listed.sort_by_key(Listed::start);
    // Every URI parsed so far, with the key it is written at (duplicates across entries
    // and across a cluster's members are refused alike).
    let mut seen: Vec<(String, usize, BrokerUri)> = Vec::new();
    let mut parsed: Vec<(&Listed<'_>, ConfiguredBroker)> = Vec::new();
    for entry in &listed {
        let mut members = Vec::new();
        for ((key, span), raw_uri) in entry.uris.iter().zip(&entry.raw.uris) {
            let uri = BrokerUri::parse(&raw_uri.text)
                .map_err(|err| source.error(span.start, key, Problem::InvalidUri(Box::new(err))))?;
            if let Some((first_key, first_line, _)) =
                seen.iter().find(|(_, _, other)| same_broker(other, &uri))
            {
                let problem = Problem::DuplicateBroker {
                    first_key: first_key.clone(),
                    first_line: *first_line,
                };
                return Err(source.error(span.start, key, problem));
            }
            if let Some(first) = members.first()
                && let Some(what) = member_differs(first, &uri)
            {
                let problem = Problem::ClusterMemberDiffers {
                    first_key: entry.uris[0].0.clone(),
                    what,
                };
                return Err(source.error(span.start, key, problem));
            }
            seen.push((key.clone(), source.line(span.start), uri.clone()));
            members.push(uri);
        }
        let tags = tags(entry, source)?;
        let server_name = server_name(entry, source)?;
        let cluster = entry.raw.form == BrokerForm::Cluster;
        parsed.push((
            entry,
            ConfiguredBroker {
                uri: members[0].clone(),
                members,
                cluster,
                tags,
                server_name,
            },
        ));
    }
    if !raw.keys().any(|name| name.get_ref() == local) {
        return Err(local_zone_missing(raw, raw_amqp, local, inputs));
    }
    let mut zones: Vec<Zone> = Vec::with_capacity(raw.len());
    for (name, zone) in raw {
        zones.push(Zone {
            name: name.get_ref().clone(),
            local: name.get_ref() == local,
            brokers: Vec::new(),
            amqp10_brokers: amqp10_brokers(name.get_ref(), zone, source)?,
        });
    }
    // `parsed` is in file order, which within one zone is the list's order.
    for (entry, broker) in parsed {
        if let Some(zone) = zones.iter_mut().find(|zone| zone.name == entry.zone) {
            zone.brokers.push(broker);
        }
    }
    zones.sort_by_key(|zone| !zone.local);
    Ok(zones)
}

/// A zone's `amqp10_brokers`: `amqp10://` URIs, none listed twice.
fn amqp10_brokers(
    zone: &str,
    raw: &RawZone,
    source: &Source<'_>,
) -> Result<Vec<BrokerUri>, ConfigError> {
    let Some(listed) = &raw.amqp10_brokers else {
        return Ok(Vec::new());
    };
    let key = format!("{}.amqp10_brokers", join("zones", zone));
    let mut brokers: Vec<(String, usize, BrokerUri)> = Vec::new();
    for (index, written) in listed.get_ref().iter().enumerate() {
        let entry_key = format!("{key}[{index}]");
        let at = written.span().start;
        let uri = BrokerUri::parse_amqp10(written.get_ref())
            .map_err(|err| source.error(at, &entry_key, Problem::InvalidUri(Box::new(err))))?;
        if let Some((first_key, first_line, _)) = brokers
            .iter()
            .find(|(_, _, other)| same_broker(other, &uri))
        {
            let problem = Problem::DuplicateBroker {
                first_key: first_key.clone(),
                first_line: *first_line,
            };
            return Err(source.error(at, &entry_key, problem));
        }
        brokers.push((entry_key, source.line(at), uri));
    }
    Ok(brokers.into_iter().map(|(_, _, uri)| uri).collect())
}

/// Entry `index` of a zone's `brokers`, with the keys and spans its URIs are reported at.
fn listed_broker<'r>(
    zone: &'r str,
    brokers_key: &str,
    index: usize,
    broker: &'r Spanned<RawBroker>,
) -> Listed<'r> {
    let key = format!("{brokers_key}[{index}]");
    let raw = broker.get_ref();
    let uris = raw
        .uris
        .iter()
        .enumerate()
        .map(|(member, uri)| {
            let span = uri.span.clone().unwrap_or_else(|| broker.span());
            let key = match raw.form {
                BrokerForm::Plain => key.clone(),
                BrokerForm::Uri => format!("{key}.uri"),
                BrokerForm::Cluster => format!("{key}.cluster[{member}]"),
            };
            (key, span)
        })
        .collect();
    Listed {
        zone,
        key,
        uris,
        raw,
    }
}

/// What a cluster member has that the first member has not: the members of one cluster
/// serve the same vhost, over TLS or not alike.
fn member_differs(first: &BrokerUri, member: &BrokerUri) -> Option<&'static str> {
    if first.amqp().vhost != member.amqp().vhost {
        Some("vhost")
    } else if first.is_tls() != member.is_tls() {
        Some("scheme (amqp:// or amqps://)")
    } else {
        None
    }
}

/// The tags of one broker entry: each one non-empty word.
fn tags(entry: &Listed<'_>, source: &Source<'_>) -> Result<Vec<String>, ConfigError> {
    let mut tags = Vec::new();
    for (index, tag) in entry.raw.tags.iter().enumerate() {
        if let Some(problem) = tag_problem(tag.get_ref()) {
            let key = format!("{}.tags[{index}]", entry.key);
            return Err(source.error(tag.span().start, &key, problem));
        }
        tags.push(tag.get_ref().clone());
    }
    Ok(tags)
}

/// The `server_name` of one broker entry: a DNS name or an IP address.
fn server_name(entry: &Listed<'_>, source: &Source<'_>) -> Result<Option<String>, ConfigError> {
    let Some(name) = &entry.raw.server_name else {
        return Ok(None);
    };
    let written = name.get_ref().trim();
    if !valid_server_name(written) {
        let key = format!("{}.server_name", entry.key);
        let problem = Problem::InvalidServerName {
            name: name.get_ref().clone(),
        };
        return Err(source.error(name.span().start, &key, problem));
    }
    Ok(Some(written.to_string()))
}

/// `[tls]`: read and checked when written, or when a broker uses `amqps://` (then with
/// the system's roots if nothing is written); `None` when no broker needs it.
fn tls(raw: &RawTls, zones: &[Zone], source: &Source<'_>) -> Result<Option<Tls>, ConfigError> {
    let written = raw.ca_file.is_some() || raw.cert_file.is_some() || raw.key_file.is_some();
    let amqps = zones.iter().any(|zone| {
        zone.brokers.iter().any(|broker| broker.uri.is_tls())
            || zone.amqp10_brokers.iter().any(BrokerUri::is_tls)
    });
    if !written && !amqps {
        return Ok(None);
    }
    let base = source.path.parent().unwrap_or(Path::new("."));
    let path =
        |file: &Option<Spanned<String>>| file.as_ref().map(|file| base.join(file.get_ref().trim()));
    match (&raw.cert_file, &raw.key_file) {
        (Some(cert), None) => {
            let problem = Problem::HalfClientIdentity {
                missing: "tls.key_file",
            };
            return Err(source.error(cert.span().start, "tls.cert_file", problem));
        }
        (None, Some(key)) => {
            let problem = Problem::HalfClientIdentity {
                missing: "tls.cert_file",
            };
            return Err(source.error(key.span().start, "tls.key_file", problem));
        }
        _ => {}
    }
    let files = TlsFiles {
        ca_file: path(&raw.ca_file),
        cert_file: path(&raw.cert_file),
        key_file: path(&raw.key_file),
    };
    Tls::load(files).map(Some).map_err(|(key, error)| {
        let (spanned, name) = match key {
            TlsKey::CaFile => (&raw.ca_file, "tls.ca_file"),
            TlsKey::CertFile => (&raw.cert_file, "tls.cert_file"),
            TlsKey::KeyFile => (&raw.key_file, "tls.key_file"),
        };
        let offset = spanned.as_ref().map_or(0, |file| file.span().start);
        source.error(offset, name, Problem::Tls(Box::new(error)))
    })
}

/// What is wrong with a tag, if anything.
fn tag_problem(tag: &str) -> Option<Problem> {
    if tag.is_empty() {
        Some(Problem::EmptyTag)
    } else if tag.chars().any(char::is_whitespace) {
        Some(Problem::TagWithWhitespace {
            tag: tag.to_string(),
        })
    } else {
        None
    }
}

/// Two entries name the same broker when they reach the same host, port and vhost,
/// whatever the credentials: one broker must not be connected to twice.
fn same_broker(a: &BrokerUri, b: &BrokerUri) -> bool {
    a.host().eq_ignore_ascii_case(b.host())
        && a.port() == b.port()
        && a.amqp().vhost == b.amqp().vhost
}

/// The error for a local zone without a section, located at `amqp.zone` when the file
/// chose the zone, else at the top of the file.
fn local_zone_missing(
    raw: &BTreeMap<Spanned<String>, RawZone>,
    raw_amqp: &RawAmqp,
    local: &str,
    inputs: &Inputs<'_>,
) -> ConfigError {
    let from_env = inputs.zone_override.is_some();
    let offset = match (&raw_amqp.zone, from_env) {
        (Some(zone), false) => zone.span().start,
        _ => 0,
    };
    let problem = Problem::LocalZoneMissing {
        zone: local.to_string(),
        from_env,
        defined: raw.keys().map(|name| name.get_ref().clone()).collect(),
    };
    inputs.source.error(offset, &join("zones", local), problem)
}

/// `[pool]`: the defaults of every app's pool.
fn pool(raw: &RawPool, source: &Source<'_>) -> Result<PoolConfig, ConfigError> {
    let size = pool_size(raw.size.as_ref(), raw::POOL_SIZE, "pool.size", source)?;
    let checkout = positive(
        raw.checkout_timeout_ms.as_ref(),
        raw::CHECKOUT_TIMEOUT_MS,
        "pool.checkout_timeout_ms",
        source,
    )?;
    let idle = positive(
        raw.idle_timeout_ms.as_ref(),
        raw::IDLE_TIMEOUT_MS,
        "pool.idle_timeout_ms",
        source,
    )?;
    Ok(PoolConfig {
        size,
        overflow: raw.overflow.unwrap_or(raw::POOL_OVERFLOW),
        checkout_timeout: Duration::from_millis(checkout),
        idle_timeout: Duration::from_millis(idle),
    })
}

/// `[exchanges.*]`: flags per exchange name, sorted by name.
fn exchanges(
    raw: &BTreeMap<Spanned<String>, RawExchange>,
    source: &Source<'_>,
) -> Result<Vec<ExchangeOverride>, ConfigError> {
    let mut exchanges = Vec::new();
    for (name, exchange) in raw {
        if name.get_ref().trim().is_empty() {
            let key = join("exchanges", name.get_ref());
            return Err(source.error(name.span().start, &key, Problem::EmptyExchange));
        }
        exchanges.push(ExchangeOverride {
            name: name.get_ref().clone(),
            durable: exchange.durable,
            auto_delete: exchange.auto_delete,
        });
    }
    Ok(exchanges)
}

/// `[apps.*]`: only apps this binary knows, each pool defaulting from `[pool]`.
fn apps(
    raw: &BTreeMap<Spanned<String>, RawApp>,
    defaults: PoolConfig,
    inputs: &Inputs<'_>,
) -> Result<Vec<AppConfig>, ConfigError> {
    let source = &inputs.source;
    let mut apps = Vec::new();
    for (name, app) in raw {
        let key = join("apps", name.get_ref());
        if !inputs.known_apps.contains(&name.get_ref().as_str()) {
            let problem = Problem::UnknownApp {
                suggestion: closest(name.get_ref(), inputs.known_apps.iter().copied()),
                known: inputs
                    .known_apps
                    .iter()
                    .map(|app| app.to_string())
                    .collect(),
            };
            return Err(source.error(name.span().start, &key, problem));
        }
        let size = pool_size(
            app.pool_size.as_ref(),
            defaults.size,
            &format!("{key}.pool_size"),
            source,
        )?;
        let default_checkout =
            u64::try_from(defaults.checkout_timeout.as_millis()).unwrap_or(u64::MAX);
        let checkout = positive(
            app.checkout_timeout_ms.as_ref(),
            default_checkout,
            &format!("{key}.checkout_timeout_ms"),
            source,
        )?;
        let default_idle = u64::try_from(defaults.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let idle = positive(
            app.idle_timeout_ms.as_ref(),
            default_idle,
            &format!("{key}.idle_timeout_ms"),
            source,
        )?;
        let event_pusher = super::pusher::event_pusher(name.get_ref(), app, &key, source)?;
        let gateway = super::gateway::gateway(name.get_ref(), app, &key, source)?;
        apps.push(AppConfig {
            event_pusher,
            gateway,
            name: name.get_ref().clone(),
            enabled: app.enabled.unwrap_or(true),
            quorum_queues: app.quorum_queues.unwrap_or(false),
            federate: app.federate.unwrap_or(false),
            pool: PoolConfig {
                size,
                overflow: app.pool_overflow.unwrap_or(defaults.overflow),
                checkout_timeout: Duration::from_millis(checkout),
                idle_timeout: Duration::from_millis(idle),
            },
        });
    }
    Ok(apps)
}

/// A pool size (never zero), or its default when absent.
fn pool_size(
    value: Option<&Spanned<usize>>,
    default: usize,
    key: &str,
    source: &Source<'_>,
) -> Result<usize, ConfigError> {
    match value {
        None => Ok(default),
        Some(value) if *value.get_ref() == 0 => {
            Err(source.error(value.span().start, key, Problem::ZeroPoolSize))
        }
        Some(value) => Ok(*value.get_ref()),
    }
}

/// `warren@<hostname>`, the host name cut (at a character boundary) so that the whole
/// stays within [`MAX_NODE_BYTES`].
fn default_node(hostname: &str) -> String {
    let room = MAX_NODE_BYTES - DEFAULT_NODE_PREFIX.len();
    let mut end = hostname.len().min(room);
    while !hostname.is_char_boundary(end) {
        end -= 1;
    }
    format!("{DEFAULT_NODE_PREFIX}{}", &hostname[..end])
}

/// This machine's host name, for the default node name.
fn hostname() -> String {
    hostname_from(Path::new("/proc/sys/kernel/hostname"))
}

/// The trimmed content of `file`, or "localhost" when it is unreadable or blank.
fn hostname_from(file: &Path) -> String {
    std::fs::read_to_string(file)
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_falls_back_to_localhost() {
        assert_eq!(
            hostname_from(Path::new("/nonexistent/hostname")),
            "localhost"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hostname");
        std::fs::write(&file, "  \n").unwrap();
        assert_eq!(hostname_from(&file), "localhost");
        std::fs::write(&file, "box-1\n").unwrap();
        assert_eq!(hostname_from(&file), "box-1");
    }

    #[test]
    fn a_long_hostname_is_cut_to_fit_the_node_limit() {
        assert_eq!(default_node("box-1"), "warren@box-1");
        let long = "h".repeat(300);
        let node = default_node(&long);
        assert_eq!(node.len(), MAX_NODE_BYTES);
        assert!(node.starts_with("warren@hhh"));
        // Never inside a character: 2-byte characters around the cut.
        let wide = "é".repeat(100);
        let node = default_node(&wide);
        assert!(node.len() <= MAX_NODE_BYTES && node.len() >= MAX_NODE_BYTES - 1);
        assert!(node.ends_with('é'));
        let exact = "x".repeat(MAX_NODE_BYTES - DEFAULT_NODE_PREFIX.len());
        assert_eq!(default_node(&exact), format!("warren@{exact}"));
    }

    #[test]
    fn same_broker_ignores_credentials_but_not_vhost() {
        let a = BrokerUri::parse("amqp://a:x@Host:5672/%2f").unwrap();
        let b = BrokerUri::parse("amqp://b:y@host/%2f").unwrap();
        let c = BrokerUri::parse("amqp://a:x@host:5672/other").unwrap();
        assert!(same_broker(&a, &b));
        assert!(!same_broker(&a, &c));
    }
}
