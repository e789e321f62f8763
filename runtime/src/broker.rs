//! Broker identity: which brokers a node knows ([`BrokerId`], [`Broker`]) and which of a
//! broker's two connections something belongs to ([`Role`]).
//!
//! Owns: these plain values, built once from the configuration by the registry. Must not
//! touch: availability (the registry's), connections (the connection actors').

use std::fmt;

use crate::uri::BrokerUri;

/// A broker's position in the node's broker list: local zone first, then the other zones,
/// each in config order. Stable for the life of the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BrokerId(pub usize);

impl fmt::Display for BrokerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// One broker as configured: where it is, which zone it serves and the tags it carries.
#[derive(Debug)]
pub struct Broker {
    pub id: BrokerId,
    pub zone: String,
    /// True for brokers of this node's own zone; only they can be primary.
    pub local: bool,
    /// The broker's name in logs and reports: its URI, or a cluster's first member.
    pub uri: BrokerUri,
    /// Where to connect: `uri` alone, or the members of a RabbitMQ cluster (config
    /// order). The connection actor uses one member at a time and moves to the next on
    /// its loss; that is a reconnect to the same broker, not a failover.
    pub members: Vec<BrokerUri>,
    /// The tags configured for this broker (`{ uri = "…", tags = [...] }` in config.ini);
    /// the zone name is an implicit tag and is not repeated here.
    pub tags: Vec<String>,
    /// For `amqps://`: the name its certificate must carry, when not the URI's host.
    pub server_name: Option<String>,
}

impl Broker {
    /// The name the TLS certificate of `member` (one of `members`) is checked against:
    /// the broker's `server_name`, else the member's host.
    pub fn server_name<'a>(&'a self, member: &'a BrokerUri) -> &'a str {
        self.server_name.as_deref().unwrap_or(member.host())
    }

    /// Whether this broker carries `tag`: one of its configured tags, or its zone's name.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.zone == tag || self.tags.iter().any(|own| own == tag)
    }
}

impl fmt::Display for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.members.len() {
            0 | 1 => write!(f, "{} ({})", self.uri, self.zone),
            n => write!(f, "{} (cluster of {n}, {})", self.uri, self.zone),
        }
    }
}

/// Which of a broker's two connections an event, a status or a channel belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Consumers' channels (and the prechannel buffer).
    Consume,
    /// Publishers' channels, so that a blocked publisher never stalls consumers.
    Publish,
}

impl Role {
    /// `consume` or `publish`: the suffix of the connection name the broker shows.
    pub fn name(self) -> &'static str {
        match self {
            Role::Consume => "consume",
            Role::Publish => "publish",
        }
    }

    /// 0 for consume, 1 for publish: for tables indexed by role.
    pub(crate) fn index(self) -> usize {
        match self {
            Role::Consume => 0,
            Role::Publish => 1,
        }
    }
}
