//! The typed configuration of a warren node, read from `config.ini`.
//!
//! config.ini is INI-shaped but parsed as TOML. This module owns the public types
//! ([`Config`] and its sections) and the loading entry points; the work is split into:
//! `raw` (the file's shape and defaults), `read` (TOML errors made readable), `validate`
//! (meaning and defaults), `locate` (line, column and key of a mistake), `effective`
//! (rendering back as TOML) and `error` ([`ConfigError`], [`Problem`]).
//!
//! It reads a file and one environment variable (WARREN_ZONE) and nothing else: no
//! broker I/O, no knowledge of any particular app.

mod effective;
mod error;
mod gateway;
mod locate;
mod pusher;
mod raw;
mod read;
mod rules;
mod validate;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use self::error::{ConfigError, Problem};
use self::locate::Source;
/// `[amqp] prefetch` when config.ini does not set it.
pub use self::raw::PREFETCH as DEFAULT_PREFETCH;
use self::raw::RawConfig;
use self::validate::Inputs;
use crate::uri::BrokerUri;

/// The environment variable that overrides `[amqp] zone`.
pub const ZONE_ENV: &str = "WARREN_ZONE";

/// The longest `[service] node`, in bytes (128).
///
/// It exists because warren builds AMQP short strings (at most 255 bytes) from the node
/// name: anonymous queue names `{listener}-{node}-{12 hex}` and consumer tags
/// `{listener}.{node}.{12 hex}.{grant}.{task}` (grant and task up to 20 digits each). With
/// a node of at most 128 bytes, a listener name of up to 64 bytes keeps every one within
/// 255 (64 + 128 + 56 = 248). A longer node is a config error, not a restart loop.
pub const MAX_NODE_BYTES: usize = 128;

/// The whole validated configuration of one warren node.
///
/// It exists so that the rest of the runtime never sees a raw or partial configuration:
/// every default is filled in and every value has been checked when a `Config` exists.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// `[service]`.
    pub service: ServiceConfig,
    /// `[amqp]`.
    pub amqp: AmqpConfig,
    /// `[tls]`, read and checked: present when a broker uses `amqps://` (with the
    /// system's root certificates unless `[tls]` says otherwise) or `[tls]` is written.
    pub tls: Option<crate::tls::Tls>,
    /// `[zones.*]`: the local zone first, then the others sorted by name.
    pub zones: Vec<Zone>,
    /// `[listener]`: how listeners treat messages and stop.
    pub listener: ListenerConfig,
    /// `[router]`: the node's configuration-event router.
    pub router: RouterConfig,
    /// `[publisher]`: how long a publish may take and how many await a confirm.
    pub publisher: PublisherConfig,
    /// `[pool]`: the defaults every app's pool started from.
    pub pool: PoolConfig,
    /// `[rpc]`: how RPC targets are addressed and where notifications go.
    pub rpc: RpcConfig,
    /// `[http]`: the operator endpoint, off unless `listen` is set.
    pub http: HttpConfig,
    /// `[exchanges.*]` sorted by name: declaration flags an operator fixed for exchanges
    /// that warren or an app declares (e.g. to match what a Kazoo deployment declared).
    pub exchanges: Vec<ExchangeOverride>,
    /// `[apps.*]` sorted by name; an app without a section is not here and does not run.
    pub apps: Vec<AppConfig>,
}

/// `[service]`: how this node presents itself and stops.
///
/// It exists to keep node identity and shutdown policy apart from broker settings.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Node name put in envelopes ("Node"); an empty `node` becomes `warren@<hostname>`
    /// (the host name cut short if need be). At most [`MAX_NODE_BYTES`] long.
    pub node: String,
    /// Bound for an orderly stop on SIGINT/SIGTERM.
    pub shutdown_timeout: Duration,
}

/// `[amqp]`: connection behaviour shared by every broker.
///
/// It exists so connections, assignments and bootstrap read one checked set of values.
#[derive(Clone, Debug)]
pub struct AmqpConfig {
    /// This node's (local) zone, after WARREN_ZONE.
    pub zone: String,
    /// Default consumer prefetch (basic.qos).
    pub prefetch: u16,
    /// Heartbeat interval asked of the broker; 0 disables heartbeats.
    pub heartbeat_secs: u16,
    /// Bound for one connection attempt.
    pub connect_timeout: Duration,
    /// First reconnect delay (before jitter).
    pub reconnect_min: Duration,
    /// Largest reconnect delay.
    pub reconnect_max: Duration,
    /// Largest reconnect delay to a broker of another zone (it serves federation only, so
    /// a remote zone that is down is tried less often); at least `reconnect_max`.
    pub remote_reconnect_max: Duration,
    /// How long startup waits for a broker of the local zone.
    pub startup_timeout: Duration,
    /// Channels opened ahead on each connection.
    pub prechannels: usize,
    /// Bound for one broker operation (channel open, declare, bind, unbind, qos, consume,
    /// cancel, delete, confirm.select); one that takes longer counts as a lost channel.
    pub operation_timeout: Duration,
}

/// One `[zones.<name>]`: a group of brokers.
///
/// It exists because the primary broker is chosen only from the local zone, while other
/// zones are connected (for federation) but never primary.
#[derive(Clone, Debug)]
pub struct Zone {
    /// The zone name.
    pub name: String,
    /// Whether this is the node's own zone.
    pub local: bool,
    /// The brokers in file order: in the local zone the first is the primary and the
    /// rest are used in order while it is down.
    pub brokers: Vec<ConfiguredBroker>,
    /// `amqp10_brokers`: AMQP 1.0 intermediaries in file order, used like `brokers` (the
    /// first while it is up) when `[rpc] transport = "amqp10"`.
    pub amqp10_brokers: Vec<BrokerUri>,
}

/// One entry of a zone's `brokers`: where the broker is and the tags it carries.
///
/// It exists because a broker is more than its URI: sticky consumers ask for "the first
/// available broker carrying tag T" (`ChannelKind::Tag`), and the tags come from here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfiguredBroker {
    /// The broker's name in logs and reports: its URI, or a cluster's first member.
    pub uri: BrokerUri,
    /// Where to connect: `uri` alone, or every member of a RabbitMQ cluster in file
    /// order (`cluster = [...]`). Never empty; the first is `uri`.
    pub members: Vec<BrokerUri>,
    /// Written as `cluster = [...]` (even with one member).
    pub cluster: bool,
    /// The tags written for this broker, in file order (possibly none). The zone's name
    /// is an implicit tag of every broker and is not repeated here.
    pub tags: Vec<String>,
    /// For `amqps://`: the name the broker's certificate is checked against, when it is
    /// not the URI's host (e.g. a broker reached by IP address).
    pub server_name: Option<String>,
}

/// How every listener treats messages and stops (`[listener]`).
///
/// It exists so that the redelivery limit and the stop deadline are operators' choices,
/// the same for every app.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerConfig {
    /// A message redelivered more than this many times is rejected (dead-lettered).
    pub max_redeliveries: u32,
    /// Graceful stop: how long in-flight handlers may run before their messages go back.
    pub stop_timeout: Duration,
    /// How long a publish from a handler waits for the broker's confirm.
    pub publish_timeout: Duration,
    /// Largest message body a listener accepts, before and after gzip decoding; a larger
    /// one is rejected unread (parked).
    pub max_message_bytes: usize,
    /// Longest a fail-back drain of an old queue on another broker may take.
    pub drain_timeout: Duration,
    /// After a fail-back, how long a listener keeps consuming the named queue it left on
    /// the old broker, for messages other publishers still send there.
    pub fail_back_watch: Duration,
    /// `x-expires` of anonymous queues: how long the broker keeps one that nobody uses
    /// (its listener died); a live listener re-declares its queue well within this.
    pub anonymous_queue_expiry: Duration,
}

/// What every listener of a node is built with: `[listener]`, the `[amqp]` values a
/// listener uses, and the operator's `[exchanges]` flags.
///
/// It exists so that listeners receive the settings they use, not the whole file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerSettings {
    /// `[listener]`.
    pub listener: ListenerConfig,
    /// `[amqp] prefetch`: a listener's prefetch where its spec sets none.
    pub prefetch: u16,
    /// `[amqp] operation_timeout_ms`: the bound of one broker operation.
    pub operation_timeout: Duration,
    /// `[exchanges.<name>]`: flags that override a declaration.
    pub exchanges: Vec<ExchangeOverride>,
}

impl ListenerSettings {
    pub fn from_config(config: &Config) -> Self {
        ListenerSettings {
            listener: config.listener,
            prefetch: config.amqp.prefetch,
            operation_timeout: config.amqp.operation_timeout,
            exchanges: config.exchanges.clone(),
        }
    }

    /// The operator's flags for exchange `name`, if the file has an `[exchanges.<name>]`.
    pub fn exchange(&self, name: &str) -> Option<&ExchangeOverride> {
        exchange_override(&self.exchanges, name)
    }
}

/// The override for exchange `name` among `exchanges`.
fn exchange_override<'a>(
    exchanges: &'a [ExchangeOverride],
    name: &str,
) -> Option<&'a ExchangeOverride> {
    exchanges.iter().find(|exchange| exchange.name == name)
}

/// How publishing behaves (`[publisher]`).
///
/// It exists so that the bound on one publish and the back-pressure limit on unconfirmed
/// publishes are operators' choices, checked once, the same for every publisher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublisherConfig {
    /// Bound for one publish: the write, the broker's confirm and any retry on a new
    /// primary (also the longest wait while no broker is up or the connection is blocked).
    pub timeout: Duration,
    /// Publishes awaiting a broker confirm at once, per node (never 0).
    pub confirm_window: usize,
    /// Write the traces this node starts (for a message that arrived without a
    /// `traceparent`, or a call made outside any handler); off, only traces a message
    /// brought are passed on, and the others stay in this node's logs.
    pub new_traces: bool,
}

/// The operator endpoint (`[http]`): Prometheus metrics, health probes and the live
/// status of the tree over HTTP.
///
/// It exists so that an operator (or Kubernetes) can see what a node is doing without
/// reading its logs; it is off unless `listen` is set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HttpConfig {
    /// Where to serve; `None`: no endpoint.
    pub listen: Option<std::net::SocketAddr>,
}

/// The node's configuration-event router (`[router]`).
///
/// It exists so the exchange the router binds to and each subscriber's buffer are the
/// operator's choice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouterConfig {
    /// The topic exchange of configuration events (Kazoo: `configuration`).
    pub exchange: String,
    /// Events buffered per subscriber; one that falls further behind gets a `Resync`.
    pub buffer: usize,
}

/// How RPC targets map onto AMQP names (`[rpc]`), oslo.messaging's scheme.
///
/// It exists so that the three address prefixes, the control exchange and the
/// notifications exchange are the operator's choice (to meet peers that use other names),
/// checked once, the same for every app of the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RpcConfig {
    /// Prefix of the address of one named server: `<prefix>.<topic>.<server>`.
    pub server_request_prefix: String,
    /// Prefix of the address of one server of a group: `<prefix>.<topic>`.
    pub group_request_prefix: String,
    /// Prefix of the address of every server of a group: `<prefix><topic>`.
    pub broadcast_prefix: String,
    /// The durable topic exchange requests to one server or one of a group go to, when
    /// a target names none.
    pub exchange: String,
    /// The durable topic exchange notifications go to (routing key `<topic>.<priority>`).
    pub notifications_exchange: String,
    /// `x-expires` of a server's own queues (one named server, broadcast): how long the
    /// broker keeps one whose server is gone.
    pub server_queue_expiry: Duration,
    /// Which protocol carries RPC and notifications (`[rpc] transport`).
    pub transport: RpcTransport,
    /// `[rpc.amqp10]`: how logical AMQP 1.0 addresses map onto the intermediary's.
    pub amqp10: Amqp10Mapping,
}

/// The protocol RPC targets and notifications travel on (`[rpc] transport`).
///
/// It exists because oslo.messaging's AMQP 1.0 driver targets a protocol rather than a
/// broker: with `Amqp10`, the same `Target` API runs over any AMQP 1.0 intermediary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RpcTransport {
    /// AMQP 0-9-1 on the node's brokers (exchanges, queues, bindings).
    #[default]
    Amqp091,
    /// AMQP 1.0 on the local zone's `amqp10_brokers` (links to addresses).
    Amqp10,
}

impl RpcTransport {
    /// The name written in config.ini.
    pub fn name(self) -> &'static str {
        match self {
            RpcTransport::Amqp091 => "amqp091",
            RpcTransport::Amqp10 => "amqp10",
        }
    }
}

/// `[rpc.amqp10]`: templates that turn a logical AMQP 1.0 address (the spec's
/// `exclusive/<topic>/<server>`, …) into an address of the intermediary.
///
/// It exists because AMQP 1.0 leaves address syntax to the intermediary: RabbitMQ 3.x
/// wants `/queue/<name>` and `/exchange/<x>/<key>`, a Qpid Dispatch Router takes the
/// address itself. In a template `{address}` is the logical address and `{name}` the same
/// with every `/` turned into `.` (a queue name or routing key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Amqp10Mapping {
    /// Competing consumers (one named server, one of a group, notifications): each
    /// message goes to one receiver.
    pub anycast: String,
    /// Every server of a group: each receiver gets a copy.
    pub multicast: String,
    /// The node's reply address.
    pub reply: String,
}

impl Amqp10Mapping {
    /// `template` with its placeholders filled from `address`.
    pub fn apply(template: &str, address: &str) -> String {
        template
            .replace("{address}", address)
            .replace("{name}", &address.replace('/', "."))
    }
}

impl Default for Amqp10Mapping {
    /// RabbitMQ 3.x's AMQP 1.0 plugin.
    fn default() -> Self {
        Amqp10Mapping {
            anycast: raw::RPC_AMQP10_ANYCAST.to_string(),
            multicast: raw::RPC_AMQP10_MULTICAST.to_string(),
            reply: raw::RPC_AMQP10_REPLY.to_string(),
        }
    }
}

impl Default for RpcConfig {
    /// The values config.ini gets when `[rpc]` says nothing.
    fn default() -> Self {
        RpcConfig {
            server_request_prefix: raw::RPC_SERVER_REQUEST_PREFIX.to_string(),
            group_request_prefix: raw::RPC_GROUP_REQUEST_PREFIX.to_string(),
            broadcast_prefix: raw::RPC_BROADCAST_PREFIX.to_string(),
            exchange: raw::RPC_EXCHANGE.to_string(),
            notifications_exchange: raw::RPC_EXCHANGE.to_string(),
            server_queue_expiry: Duration::from_millis(u64::from(raw::RPC_SERVER_QUEUE_EXPIRY_MS)),
            transport: RpcTransport::default(),
            amqp10: Amqp10Mapping::default(),
        }
    }
}

/// One `[exchanges.<name>]`: flags that override the declaration of exchange `name`.
///
/// It exists because an exchange's flags are fixed on the broker by whoever declared it
/// first (a Kazoo deployment declares its exchanges transient): a declare with other flags
/// is refused (406), so the operator states the flags the broker already has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeOverride {
    /// The exchange's name.
    pub name: String,
    /// Survives a broker restart; `None` keeps what the declaring code asks for.
    pub durable: Option<bool>,
    /// Deleted with its last binding; `None` keeps what the declaring code asks for.
    pub auto_delete: Option<bool>,
}

/// Sizing of one listener pool.
///
/// It exists so `[pool]` defaults and each app's effective pool share one type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Workers kept (never 0).
    pub size: usize,
    /// Extra workers allowed under load; idle ones retire.
    pub overflow: usize,
    /// How long a checkout waits before failing with `PoolFull`.
    pub checkout_timeout: Duration,
    /// How long an overflow worker may stay idle before it retires.
    pub idle_timeout: Duration,
}

/// One `[apps.<name>]`: whether an app runs and how its pool is sized.
///
/// It exists so the binary starts exactly the apps the operator listed, with their pools.
#[derive(Clone, Debug)]
pub struct AppConfig {
    /// The app's name, one of the binary's known apps.
    pub name: String,
    /// Whether the app runs.
    pub enabled: bool,
    /// `quorum_queues = true`: the app's named queues are declared as quorum queues
    /// (`QueueSpec::quorum`), whatever type the app's code gives them. Anonymous and
    /// exclusive queues stay as they are (a quorum queue is neither).
    pub quorum_queues: bool,
    /// `federate = true`: the app federates the bindings it offers to federate (it reads
    /// this when it builds its listeners; warren federates nothing on its own).
    pub federate: bool,
    /// The app's pool, its absent keys taken from `[pool]`.
    pub pool: PoolConfig,
    /// `[apps.event_pusher]`'s own keys (MongooseIM's `mod_event_pusher_rabbit` names);
    /// the defaults for any other app, which may not set them.
    pub event_pusher: EventPusherConfig,
    /// `[apps.gateway]`'s own keys; the defaults for any other app, which may not set them.
    pub gateway: GatewayConfig,
}

impl AppConfig {
    /// An enabled app named `name` with `pool`, nothing else set (classic queues, no
    /// federation, its own keys at their defaults): what config.ini's `[apps.<name>]`
    /// with only a pool would give. For apps started by code (tools, tests, benches).
    pub fn new(name: impl Into<String>, pool: PoolConfig) -> Self {
        AppConfig {
            name: name.into(),
            enabled: true,
            quorum_queues: false,
            federate: false,
            pool,
            event_pusher: EventPusherConfig::default(),
            gateway: GatewayConfig::default(),
        }
    }
}

/// `[apps.gateway]`: the WebSocket gateway's names on the broker, who may connect and the
/// limits of one connection.
///
/// It exists so that the gateway is configured and checked like every other section
/// (a mistake names the file, line and key). `Debug` never shows `jwt_secret`.
#[derive(Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// The WebSocket route on the node's HTTP endpoint (`path`); the demo page is `GET /`.
    pub path: String,
    /// Exchange clients publish to, feeding `IN_<FEED>` (`in_exchange`, durable direct).
    pub in_exchange: String,
    /// Exchange back-ends publish to, feeding `OUT_<FEED>` (`out_exchange`, durable direct).
    pub out_exchange: String,
    /// Exchange of the clients' own queues (`client_exchange`, durable direct).
    pub client_exchange: String,
    /// Put before every queue name the gateway declares (`queue_prefix`, default empty).
    pub queue_prefix: String,
    /// `x-expires` of a client's own queue: how long it outlives its socket.
    pub client_queue_expiry: Duration,
    /// How long a write-and-wait request waits for its reply.
    pub request_timeout: Duration,
    /// HS256 key bearer tokens are verified with (`jwt_secret`; empty: no tokens).
    pub jwt_secret: String,
    /// The `aud` a token must carry (`jwt_audience`; empty: not checked).
    pub jwt_audience: String,
    /// Header naming the client, trusted from `trusted_proxies` only (empty: off).
    pub identity_header: String,
    /// Peer addresses whose `identity_header` is believed.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// `Origin` values accepted (empty: any, e.g. non-browser clients only).
    pub allowed_origins: Vec<String>,
    /// Largest frame a client may send (bytes).
    pub max_frame_bytes: usize,
    /// Frames a client may send per second.
    pub max_frames_per_sec: u32,
    /// Subscriptions (feed × consume target) one connection may hold.
    pub max_subscriptions: usize,
}

impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
            .field("path", &self.path)
            .field("in_exchange", &self.in_exchange)
            .field("out_exchange", &self.out_exchange)
            .field("client_exchange", &self.client_exchange)
            .field("queue_prefix", &self.queue_prefix)
            .field("client_queue_expiry", &self.client_queue_expiry)
            .field("request_timeout", &self.request_timeout)
            .field(
                "jwt_secret",
                &(!self.jwt_secret.is_empty()).then_some("<hidden>"),
            )
            .field("jwt_audience", &self.jwt_audience)
            .field("identity_header", &self.identity_header)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("allowed_origins", &self.allowed_origins)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("max_frames_per_sec", &self.max_frames_per_sec)
            .field("max_subscriptions", &self.max_subscriptions)
            .finish()
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            path: "/ws".to_string(),
            in_exchange: "gateway.in".to_string(),
            out_exchange: "gateway.out".to_string(),
            client_exchange: "gateway.clients".to_string(),
            queue_prefix: String::new(),
            client_queue_expiry: Duration::from_millis(u64::from(
                raw::GATEWAY_CLIENT_QUEUE_EXPIRY_MS,
            )),
            request_timeout: Duration::from_millis(raw::GATEWAY_REQUEST_TIMEOUT_MS),
            jwt_secret: String::new(),
            jwt_audience: String::new(),
            identity_header: String::new(),
            trusted_proxies: Vec::new(),
            allowed_origins: Vec::new(),
            max_frame_bytes: raw::GATEWAY_MAX_FRAME_BYTES,
            max_frames_per_sec: raw::GATEWAY_MAX_FRAMES_PER_SEC,
            max_subscriptions: raw::GATEWAY_MAX_SUBSCRIPTIONS,
        }
    }
}

/// The exchange of one kind of apps/event_pusher's events: MongooseIM's
/// `presence_exchange` / `chat_msg_exchange` / `groupchat_msg_exchange`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PusherExchange {
    /// `name`.
    pub name: String,
    /// `type`: `topic` (MongooseIM's default) or `direct` (faster past ~100k users).
    pub kind: PusherExchangeKind,
    /// `sent_topic` (messages only): the routing key's suffix of a sent message.
    pub sent_topic: String,
    /// `recv_topic` (messages only): the routing key's suffix of a received message.
    pub recv_topic: String,
}

/// The AMQP type of an event exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PusherExchangeKind {
    Topic,
    Direct,
}

impl PusherExchangeKind {
    /// The name config.ini and AMQP use.
    pub fn as_str(self) -> &'static str {
        match self {
            PusherExchangeKind::Topic => "topic",
            PusherExchangeKind::Direct => "direct",
        }
    }
}

/// `[apps.event_pusher]`: where chat-server events go and how they are published.
///
/// It exists so that the event pusher is configured with MongooseIM's key names
/// (consumers written for MongooseIM keep working) and checked like every other section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventPusherConfig {
    pub presence_exchange: PusherExchange,
    pub chat_msg_exchange: PusherExchange,
    pub groupchat_msg_exchange: PusherExchange,
    /// Ordered lanes events are spread over by bare JID (`lanes`).
    pub lanes: usize,
    /// Events in flight (written, confirm owed) per lane (`lane_window`).
    pub lane_window: usize,
    /// Largest `POST /events` body accepted (`max_request_bytes`).
    pub max_request_bytes: usize,
    /// Most events in one `POST /events` (`max_batch`).
    pub max_batch: usize,
    /// Events are published persistent (delivery mode 2) (`persistent`).
    pub persistent: bool,
    /// Exchanges are declared durable (`durable_exchanges`).
    pub durable_exchanges: bool,
}

impl Default for EventPusherConfig {
    /// MongooseIM's names and types; warren's lanes.
    fn default() -> Self {
        let exchange = |name: &str, sent: &str, recv: &str| PusherExchange {
            name: name.to_string(),
            kind: PusherExchangeKind::Topic,
            sent_topic: sent.to_string(),
            recv_topic: recv.to_string(),
        };
        EventPusherConfig {
            presence_exchange: exchange("presence", "", ""),
            chat_msg_exchange: exchange("chat_msg", "chat_msg_sent", "chat_msg_recv"),
            groupchat_msg_exchange: exchange(
                "groupchat_msg",
                "groupchat_msg_sent",
                "groupchat_msg_recv",
            ),
            lanes: raw::PUSHER_LANES,
            lane_window: raw::PUSHER_LANE_WINDOW,
            max_request_bytes: raw::PUSHER_MAX_REQUEST_BYTES,
            max_batch: raw::PUSHER_MAX_BATCH,
            persistent: true,
            durable_exchanges: true,
        }
    }
}

impl Config {
    /// Reads and checks the file at `path`; WARREN_ZONE (when set and not blank)
    /// overrides `[amqp] zone`. `known_apps` are the apps this binary contains.
    pub fn load(path: &Path, known_apps: &[&str]) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let zone_override = std::env::var(ZONE_ENV).ok();
        if let Some(zone) = &zone_override {
            tracing::debug!(zone = %zone, "{ZONE_ENV} overrides [amqp] zone");
        }
        Config::parse(&text, path, known_apps, zone_override.as_deref())
    }

    /// Checks config.ini's `text` as if read from `path` (pure, for tests). A blank
    /// `zone_override` counts as none.
    pub fn parse(
        text: &str,
        path: &Path,
        known_apps: &[&str],
        zone_override: Option<&str>,
    ) -> Result<Config, ConfigError> {
        let source = Source { text, path };
        let document =
            toml::de::Deserializer::parse(text).map_err(|err| read::syntax_error(&source, &err))?;
        let raw = RawConfig::deserialize(document)
            .map_err(|err| read::deserialize_error(&source, &err))?;
        let inputs = Inputs {
            source,
            known_apps,
            zone_override: zone_override.map(str::trim).filter(|zone| !zone.is_empty()),
        };
        validate::validate(raw, &inputs)
    }

    /// This node's zone.
    ///
    /// # Panics
    ///
    /// Only for a `Config` built by hand with no zones: a loaded one always has its
    /// local zone (validation refuses a file without it) and lists it first.
    pub fn local_zone(&self) -> &Zone {
        self.zones
            .iter()
            .find(|zone| zone.local)
            .unwrap_or(&self.zones[0])
    }

    /// The operator's flags for exchange `name`, if the file has an `[exchanges.<name>]`.
    pub fn exchange(&self, name: &str) -> Option<&ExchangeOverride> {
        exchange_override(&self.exchanges, name)
    }

    /// The section of app `name`, if the file has one.
    pub fn app(&self, name: &str) -> Option<&AppConfig> {
        self.apps.iter().find(|app| app.name == name)
    }

    /// The effective configuration as config.ini-shaped TOML (same key names, defaults
    /// filled in, broker passwords redacted), headed by a comment naming the source path.
    pub fn effective_toml(&self) -> String {
        effective::render(self)
    }
}
