//! The shape of config.ini as written: serde structs that mirror the file key for key,
//! and the default of every key.
//!
//! Every struct denies unknown keys, and every value a later check must point at is a
//! `toml::Spanned` (byte range in the file). Nothing here checks meaning: that is
//! `validate`'s job. Absent keys stay `None` here; `validate` fills in the defaults below.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use toml::Spanned;

/// `[service] shutdown_timeout_secs`.
pub(super) const SHUTDOWN_TIMEOUT_SECS: u64 = 10;
/// `[amqp] zone`.
pub(super) const ZONE: &str = "local";
/// `[amqp] prefetch`.
pub const PREFETCH: u16 = 50;
/// `[amqp] heartbeat_secs`.
pub(super) const HEARTBEAT_SECS: u16 = 10;
/// `[amqp] connect_timeout_ms`.
pub(super) const CONNECT_TIMEOUT_MS: u64 = 2000;
/// `[amqp] reconnect_min_ms`.
pub(super) const RECONNECT_MIN_MS: u64 = 100;
/// `[amqp] reconnect_max_ms`.
pub(super) const RECONNECT_MAX_MS: u64 = 5000;
/// `[amqp] remote_reconnect_max_ms`.
pub(super) const REMOTE_RECONNECT_MAX_MS: u64 = 30000;
/// `[amqp] startup_timeout_secs`.
pub(super) const STARTUP_TIMEOUT_SECS: u64 = 30;
/// `[amqp] prechannels`.
pub(super) const PRECHANNELS: usize = 10;
/// `[amqp] operation_timeout_ms`.
pub(super) const OPERATION_TIMEOUT_MS: u64 = 5000;
/// `[listener] max_redeliveries`.
pub(super) const MAX_REDELIVERIES: u32 = 5;
/// `[listener] stop_timeout_ms`.
pub(super) const STOP_TIMEOUT_MS: u64 = 5000;
/// `[listener] publish_timeout_ms`.
pub(super) const PUBLISH_TIMEOUT_MS: u64 = 5000;
/// `[listener] max_message_bytes` (16 MiB).
pub(super) const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// `[listener] drain_timeout_ms`.
pub(super) const DRAIN_TIMEOUT_MS: u64 = 30_000;
/// `[listener] fail_back_watch_ms`.
pub(super) const FAIL_BACK_WATCH_MS: u64 = 30_000;
/// `[listener] anonymous_queue_expiry_ms` (10 minutes).
pub(super) const ANONYMOUS_QUEUE_EXPIRY_MS: u32 = 600_000;
/// `[publisher] timeout_ms`.
pub(super) const PUBLISHER_TIMEOUT_MS: u64 = 5000;
/// `[publisher] confirm_window`.
pub(super) const CONFIRM_WINDOW: usize = 1000;
/// `[apps.event_pusher] lanes`.
pub(super) const PUSHER_LANES: usize = 1;
/// `[apps.event_pusher] lane_window`.
pub(super) const PUSHER_LANE_WINDOW: usize = 1000;
/// `[apps.event_pusher] max_request_bytes` (1 MiB).
pub(super) const PUSHER_MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// `[apps.event_pusher] max_batch`.
pub(super) const PUSHER_MAX_BATCH: usize = 1000;
/// `[apps.gateway] client_queue_expiry_ms` (10 minutes).
pub(super) const GATEWAY_CLIENT_QUEUE_EXPIRY_MS: u32 = 600_000;
/// `[apps.gateway] request_timeout_ms`.
pub(super) const GATEWAY_REQUEST_TIMEOUT_MS: u64 = 5000;
/// `[apps.gateway] max_frame_bytes` (64 KiB).
pub(super) const GATEWAY_MAX_FRAME_BYTES: usize = 64 * 1024;
/// `[apps.gateway] max_frames_per_sec`.
pub(super) const GATEWAY_MAX_FRAMES_PER_SEC: u32 = 50;
/// `[apps.gateway] max_subscriptions`.
pub(super) const GATEWAY_MAX_SUBSCRIPTIONS: usize = 16;
/// `[router] exchange`.
pub(super) const ROUTER_EXCHANGE: &str = "configuration";
/// `[router] buffer`.
pub(super) const ROUTER_BUFFER: usize = 1000;
/// `[rpc] server_request_prefix`: addresses of one named server (oslo's "exclusive").
pub(super) const RPC_SERVER_REQUEST_PREFIX: &str = "exclusive";
/// `[rpc] group_request_prefix`: addresses of one server of a group (oslo's "unicast").
pub(super) const RPC_GROUP_REQUEST_PREFIX: &str = "unicast";
/// `[rpc] broadcast_prefix`: addresses of every server of a group.
pub(super) const RPC_BROADCAST_PREFIX: &str = "/broadcast/";
/// `[rpc] exchange`: oslo's default control exchange.
pub(super) const RPC_EXCHANGE: &str = "openstack";
/// `[rpc] server_queue_expiry_ms` (10 minutes).
pub(super) const RPC_SERVER_QUEUE_EXPIRY_MS: u32 = 600_000;
/// `[rpc.amqp10] anycast`: RabbitMQ 3.x's AMQP 1.0 plugin, a queue of the address's name.
pub(super) const RPC_AMQP10_ANYCAST: &str = "/queue/{name}";
/// `[rpc.amqp10] multicast`: RabbitMQ 3.x, `amq.topic` with the address's name as key.
pub(super) const RPC_AMQP10_MULTICAST: &str = "/exchange/amq.topic/{name}";
/// `[rpc.amqp10] reply`: RabbitMQ 3.x, a queue of the address's name.
pub(super) const RPC_AMQP10_REPLY: &str = "/queue/{name}";
/// `[pool] size`.
pub(super) const POOL_SIZE: usize = 10;
/// `[pool] overflow`.
pub(super) const POOL_OVERFLOW: usize = 20;
/// `[pool] idle_timeout_ms`.
pub(super) const IDLE_TIMEOUT_MS: u64 = 30_000;
/// `[pool] checkout_timeout_ms`.
pub(super) const CHECKOUT_TIMEOUT_MS: u64 = 2000;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub service: RawService,
    #[serde(default)]
    pub amqp: RawAmqp,
    /// `[tls]`: certificates for `amqps://` brokers.
    #[serde(default)]
    pub tls: RawTls,
    /// `[zones.<name>]`, keyed by the zone name with its span in the file.
    #[serde(default)]
    pub zones: BTreeMap<Spanned<String>, RawZone>,
    #[serde(default)]
    pub listener: RawListener,
    #[serde(default)]
    pub publisher: RawPublisher,
    #[serde(default)]
    pub router: RawRouter,
    #[serde(default)]
    pub pool: RawPool,
    /// `[rpc]`: RPC target addresses and notifications.
    #[serde(default)]
    pub rpc: RawRpc,
    /// `[http]`: the operator endpoint (metrics, health, status).
    #[serde(default)]
    pub http: RawHttp,
    /// `[exchanges.<name>]`, keyed by the exchange name with its span in the file.
    #[serde(default)]
    pub exchanges: BTreeMap<Spanned<String>, RawExchange>,
    /// `[apps.<name>]`, keyed by the app name with its span in the file.
    #[serde(default)]
    pub apps: BTreeMap<Spanned<String>, RawApp>,
}

/// `[service]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub node: Option<Spanned<String>>,
    pub shutdown_timeout_secs: Option<Spanned<u64>>,
}

/// `[amqp]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAmqp {
    pub zone: Option<Spanned<String>>,
    pub prefetch: Option<Spanned<u16>>,
    pub heartbeat_secs: Option<u16>,
    pub connect_timeout_ms: Option<Spanned<u64>>,
    pub reconnect_min_ms: Option<Spanned<u64>>,
    pub reconnect_max_ms: Option<Spanned<u64>>,
    pub remote_reconnect_max_ms: Option<Spanned<u64>>,
    pub startup_timeout_secs: Option<Spanned<u64>>,
    pub prechannels: Option<usize>,
    pub operation_timeout_ms: Option<Spanned<u64>>,
}

/// `[tls]`: files are relative to the config file's directory unless absolute.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub ca_file: Option<Spanned<String>>,
    pub cert_file: Option<Spanned<String>>,
    pub key_file: Option<Spanned<String>>,
}

/// `[zones.<name>]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawZone {
    pub brokers: Option<Spanned<Vec<Spanned<RawBroker>>>>,
    /// `amqp10://` URIs: where `[rpc] transport = "amqp10"` sends RPC and notifications.
    pub amqp10_brokers: Option<Spanned<Vec<Spanned<String>>>>,
}

/// One entry of `brokers`: a plain URI string, or a table `{ uri = "…", tags = [...],
/// server_name = "…" }`, or for a RabbitMQ cluster `{ cluster = ["…", "…"], … }`.
#[derive(Debug)]
pub(super) struct RawBroker {
    /// Where to connect: one URI, or a cluster's member URIs in file order (never empty).
    pub uris: Vec<RawUri>,
    /// How the entry gives them.
    pub form: BrokerForm,
    pub tags: Vec<Spanned<String>>,
    /// The name the broker's TLS certificate is checked against, when not its host.
    pub server_name: Option<Spanned<String>>,
}

/// One URI of a broker entry.
#[derive(Debug)]
pub(super) struct RawUri {
    pub text: String,
    /// Where it is written; `None` in the plain form, where the entry itself is the URI.
    pub span: Option<Range<usize>>,
}

/// Which form a broker entry is written in: it decides the key its URIs are reported at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BrokerForm {
    /// `"amqp://…"`: the entry is the URI.
    Plain,
    /// `{ uri = "…" }`.
    Uri,
    /// `{ cluster = ["…", …] }`: the members of one RabbitMQ cluster.
    Cluster,
}

/// The table form of a broker entry, read strictly like every other table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBrokerTable {
    uri: Option<Spanned<String>>,
    cluster: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    tags: Vec<Spanned<String>>,
    server_name: Option<Spanned<String>>,
}

impl<'de> Deserialize<'de> for RawBroker {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawBrokerVisitor)
    }
}

/// Accepts either form of a broker entry.
struct RawBrokerVisitor;

impl<'de> Visitor<'de> for RawBrokerVisitor {
    type Value = RawBroker;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or a table")
    }

    fn visit_str<E: de::Error>(self, uri: &str) -> Result<RawBroker, E> {
        Ok(RawBroker {
            uris: vec![RawUri {
                text: uri.to_string(),
                span: None,
            }],
            form: BrokerForm::Plain,
            tags: Vec::new(),
            server_name: None,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawBroker, A::Error> {
        let table = RawBrokerTable::deserialize(MapAccessDeserializer::new(map))?;
        let spanned = |uri: Spanned<String>| RawUri {
            span: Some(uri.span()),
            text: uri.into_inner(),
        };
        let (uris, form) = match (table.uri, table.cluster) {
            (Some(uri), None) => (vec![spanned(uri)], BrokerForm::Uri),
            (None, Some(members)) if members.is_empty() => {
                return Err(de::Error::custom(
                    "`cluster` lists no member; give the URIs of the cluster's nodes",
                ));
            }
            (None, Some(members)) => (
                members.into_iter().map(spanned).collect(),
                BrokerForm::Cluster,
            ),
            (Some(_), Some(_)) => {
                return Err(de::Error::custom(
                    "give either `uri` (one broker) or `cluster` (the URIs of one cluster's \
                     nodes), not both",
                ));
            }
            (None, None) => return Err(de::Error::missing_field("uri")),
        };
        Ok(RawBroker {
            uris,
            form,
            tags: table.tags,
            server_name: table.server_name,
        })
    }
}

/// `[listener]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub max_redeliveries: Option<u32>,
    pub stop_timeout_ms: Option<Spanned<u64>>,
    pub publish_timeout_ms: Option<Spanned<u64>>,
    pub max_message_bytes: Option<Spanned<usize>>,
    pub drain_timeout_ms: Option<Spanned<u64>>,
    pub fail_back_watch_ms: Option<Spanned<u64>>,
    pub anonymous_queue_expiry_ms: Option<Spanned<u32>>,
}

/// `[publisher]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPublisher {
    pub timeout_ms: Option<Spanned<u64>>,
    pub confirm_window: Option<Spanned<usize>>,
    pub new_traces: Option<bool>,
}

/// `[http]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    /// `host:port` to serve on; empty or absent: no endpoint.
    pub listen: Option<Spanned<String>>,
}

/// `[router]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouter {
    pub exchange: Option<Spanned<String>>,
    pub buffer: Option<Spanned<usize>>,
}

/// `[pool]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    pub size: Option<Spanned<usize>>,
    pub overflow: Option<usize>,
    pub checkout_timeout_ms: Option<Spanned<u64>>,
    pub idle_timeout_ms: Option<Spanned<u64>>,
}

/// `[apps.event_pusher] presence_exchange` / `chat_msg_exchange` / `groupchat_msg_exchange`
/// (a table, or dotted keys `presence_exchange.name = "…"` as MongooseIM writes them).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPusherExchange {
    pub name: Option<Spanned<String>>,
    #[serde(rename = "type")]
    pub kind: Option<Spanned<String>>,
    pub sent_topic: Option<Spanned<String>>,
    pub recv_topic: Option<Spanned<String>>,
}

/// `[rpc]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRpc {
    pub server_request_prefix: Option<Spanned<String>>,
    pub group_request_prefix: Option<Spanned<String>>,
    pub broadcast_prefix: Option<Spanned<String>>,
    pub exchange: Option<Spanned<String>>,
    pub notifications_exchange: Option<Spanned<String>>,
    pub server_queue_expiry_ms: Option<Spanned<u32>>,
    pub transport: Option<Spanned<String>>,
    pub amqp10: Option<RawRpcAmqp10>,
}

/// `[rpc.amqp10]`: how logical AMQP 1.0 addresses become the intermediary's own.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRpcAmqp10 {
    pub anycast: Option<Spanned<String>>,
    pub multicast: Option<Spanned<String>>,
    pub reply: Option<Spanned<String>>,
}

/// `[exchanges.<name>]`: declaration flags that override what warren or an app declares.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawExchange {
    pub durable: Option<bool>,
    pub auto_delete: Option<bool>,
}

/// `[apps.<name>]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApp {
    pub enabled: Option<bool>,
    pub quorum_queues: Option<bool>,
    pub federate: Option<bool>,
    pub pool_size: Option<Spanned<usize>>,
    pub pool_overflow: Option<usize>,
    pub checkout_timeout_ms: Option<Spanned<u64>>,
    pub idle_timeout_ms: Option<Spanned<u64>>,
    // apps/event_pusher only (MongooseIM's mod_event_pusher_rabbit names):
    pub presence_exchange: Option<Spanned<RawPusherExchange>>,
    pub chat_msg_exchange: Option<Spanned<RawPusherExchange>>,
    pub groupchat_msg_exchange: Option<Spanned<RawPusherExchange>>,
    pub lanes: Option<Spanned<usize>>,
    pub lane_window: Option<Spanned<usize>>,
    pub max_request_bytes: Option<Spanned<usize>>,
    pub max_batch: Option<Spanned<usize>>,
    pub persistent: Option<Spanned<bool>>,
    pub durable_exchanges: Option<Spanned<bool>>,
    // apps/gateway only:
    pub path: Option<Spanned<String>>,
    pub in_exchange: Option<Spanned<String>>,
    pub out_exchange: Option<Spanned<String>>,
    pub client_exchange: Option<Spanned<String>>,
    pub queue_prefix: Option<Spanned<String>>,
    pub client_queue_expiry_ms: Option<Spanned<u32>>,
    pub request_timeout_ms: Option<Spanned<u64>>,
    pub jwt_secret: Option<Spanned<String>>,
    pub jwt_audience: Option<Spanned<String>>,
    pub identity_header: Option<Spanned<String>>,
    pub trusted_proxies: Option<Spanned<Vec<Spanned<String>>>>,
    pub allowed_origins: Option<Spanned<Vec<Spanned<String>>>>,
    pub max_frame_bytes: Option<Spanned<usize>>,
    pub max_frames_per_sec: Option<Spanned<u32>>,
    pub max_subscriptions: Option<Spanned<usize>>,
}
