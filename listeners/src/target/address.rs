//! Targets and their AMQP names: the three address rules and how each maps onto
//! exchanges, queues and bindings.
//!
//! Owns: [`Target`], the address rules and their checks ([`TargetError`]). Must not touch:
//! declaring or publishing (the server and the client do, from what this file names).
//!
//! | address | name | exchange (kind) | queue |
//! |---|---|---|---|
//! | one named server | `<server_request_prefix>.<topic>.<server>` | `[rpc] exchange` (topic) | the address: durable, `x-expires`, shared by processes of that server name |
//! | one of a group | `<group_request_prefix>.<topic>` | `[rpc] exchange` (topic) | the address: durable, shared by every server of the topic |
//! | all of a group | `<broadcast_prefix><topic>` | the address itself (fanout) | `<address>.<server>` per server: durable, `x-expires` |
//!
//! A target naming an exchange `X` uses `X/<address>` (a doubled `/` collapsed) and
//! publishes requests of the first two kinds to `X` instead of `[rpc] exchange`.

use warren_runtime::config::RpcConfig;

/// The longest AMQP short string (queue, exchange and routing key names), in bytes.
const SHORT_STRING_MAX: usize = 255;

/// Bytes of a topic kept in listener names (consumer tags must fit 255 bytes).
pub(crate) const NAME_TOPIC_MAX: usize = 40;

/// `topic` cut to at most [`NAME_TOPIC_MAX`] bytes, on a character boundary.
pub(crate) fn shortened(topic: &str) -> &str {
    let mut end = topic.len().min(NAME_TOPIC_MAX);
    while !topic.is_char_boundary(end) {
        end -= 1;
    }
    &topic[..end]
}

/// Who should get a request: oslo.messaging's `Target` (topic, server, fanout, exchange).
///
/// It exists so that callers and servers name services by topic and server instead of by
/// exchanges and routing keys; [`Target::route`] turns it into those.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The service: every server of a topic serves the same methods.
    pub topic: String,
    /// One server of the topic (its node name); `None`: any one of them.
    pub server: Option<String>,
    /// Every server of the topic (`server` is then not used): casts only.
    pub fanout: bool,
    /// An exchange of the target's own instead of `[rpc] exchange`; also prefixes its
    /// addresses (`X/<address>`).
    pub exchange: Option<String>,
}

/// A target that cannot be expressed in AMQP, or a request it cannot carry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("a target needs a topic")]
    EmptyTopic,
    #[error("topic `{0}`: `.`, `#` and `*` would break routing by address")]
    BadTopic(String),
    #[error("a server name must not be empty")]
    EmptyServer,
    #[error("server `{0}`: `#` and `*` would break routing by address")]
    BadServer(String),
    #[error("priority `{0}`: must be non-empty without `.`, `#` or `*`")]
    BadPriority(String),
    #[error("exchange `{0}`: must be neither the default exchange (\"\") nor `amq.`-prefixed")]
    BadExchange(String),
    /// A queue, exchange or routing key built from the target is over AMQP's 255 bytes.
    #[error("{what} would be {bytes} bytes long; AMQP allows at most 255")]
    TooLong { what: &'static str, bytes: usize },
    /// `[rpc] transport = "amqp10"` parts on a node that runs AMQP 0-9-1 only.
    #[error("the node has no AMQP 1.0 transport ([rpc] transport is not \"amqp10\")")]
    NoAmqp10,
    /// A request's arguments must be a JSON object (oslo's keyword arguments).
    #[error("the arguments of `{0}` must be a JSON object (or null for none)")]
    ArgsNotObject(String),
}

/// Where a request to a target is published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub exchange: String,
    pub routing_key: String,
}

impl Target {
    /// Any one server of `topic`.
    pub fn new(topic: impl Into<String>) -> Self {
        Target {
            topic: topic.into(),
            server: None,
            fanout: false,
            exchange: None,
        }
    }

    /// The one server of the topic named `server` (a node name).
    pub fn server(mut self, server: impl Into<String>) -> Self {
        self.server = Some(server.into());
        self
    }

    /// Every server of the topic.
    pub fn fanout(mut self) -> Self {
        self.fanout = true;
        self
    }

    /// Under an exchange of its own (see [`Target::exchange`]).
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = Some(exchange.into());
        self
    }

    /// Checks the topic, server and exchange (not the lengths of the names built from
    /// them: [`Target::route`] and the server's names do).
    pub fn check(&self) -> Result<(), TargetError> {
        if self.topic.is_empty() {
            return Err(TargetError::EmptyTopic);
        }
        if self.topic.contains(['.', '#', '*']) {
            return Err(TargetError::BadTopic(self.topic.clone()));
        }
        if let Some(server) = &self.server {
            if server.is_empty() {
                return Err(TargetError::EmptyServer);
            }
            if server.contains(['#', '*']) {
                return Err(TargetError::BadServer(server.clone()));
            }
        }
        if let Some(exchange) = &self.exchange
            && (exchange.is_empty() || exchange.starts_with("amq."))
        {
            return Err(TargetError::BadExchange(exchange.clone()));
        }
        Ok(())
    }

    /// The exchange requests to one server or one of a group go to.
    pub fn request_exchange<'a>(&'a self, config: &'a RpcConfig) -> &'a str {
        self.exchange.as_deref().unwrap_or(&config.exchange)
    }

    /// The address of one named server of the topic (rule A).
    pub fn server_address(&self, config: &RpcConfig, server: &str) -> String {
        self.prefixed(format!(
            "{}.{}.{server}",
            config.server_request_prefix, self.topic
        ))
    }

    /// The address of one server of the topic's group (rule B).
    pub fn group_address(&self, config: &RpcConfig) -> String {
        self.prefixed(format!("{}.{}", config.group_request_prefix, self.topic))
    }

    /// The address of every server of the topic (rule C): the fanout exchange's name.
    pub fn broadcast_address(&self, config: &RpcConfig) -> String {
        self.prefixed(format!("{}{}", config.broadcast_prefix, self.topic))
    }

    /// The queue of `server` bound to the broadcast exchange.
    pub fn broadcast_queue(&self, config: &RpcConfig, server: &str) -> String {
        format!("{}.{server}", self.broadcast_address(config))
    }

    /// `X/<address>` when the target names exchange `X`, one `/` between them.
    fn prefixed(&self, address: String) -> String {
        match &self.exchange {
            None => address,
            Some(exchange) => format!(
                "{}/{}",
                exchange.trim_end_matches('/'),
                address.trim_start_matches('/')
            ),
        }
    }

    /// Where a request to this target goes: rule C when `fanout`, else A with a server,
    /// else B. Checked, names included.
    pub fn route(&self, config: &RpcConfig) -> Result<Route, TargetError> {
        self.check()?;
        let route = if self.fanout {
            let address = self.broadcast_address(config);
            Route {
                exchange: address.clone(),
                routing_key: address,
            }
        } else {
            let routing_key = match &self.server {
                Some(server) => self.server_address(config, server),
                None => self.group_address(config),
            };
            Route {
                exchange: self.request_exchange(config).to_string(),
                routing_key,
            }
        };
        short("the exchange name", &route.exchange)?;
        short("the address", &route.routing_key)?;
        Ok(route)
    }
}

/// `Ok` if `name` fits an AMQP short string.
pub(crate) fn short(what: &'static str, name: &str) -> Result<(), TargetError> {
    if name.len() > SHORT_STRING_MAX {
        return Err(TargetError::TooLong {
            what,
            bytes: name.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_topics_are_cut_on_a_char_boundary_in_names() {
        let topic = "é".repeat(30);
        let cut = shortened(&topic);
        assert!(cut.len() <= NAME_TOPIC_MAX && topic.starts_with(cut));
        assert_eq!(shortened("compute"), "compute");
    }

    #[test]
    fn the_three_addresses_follow_the_default_prefixes() {
        let config = RpcConfig::default();
        let target = Target::new("compute");
        assert_eq!(
            target.server_address(&config, "node1"),
            "exclusive.compute.node1"
        );
        assert_eq!(target.group_address(&config), "unicast.compute");
        assert_eq!(target.broadcast_address(&config), "/broadcast/compute");
        assert_eq!(
            target.broadcast_queue(&config, "node1"),
            "/broadcast/compute.node1"
        );
    }

    #[test]
    fn an_exchange_prefixes_the_address_with_one_slash() {
        let config = RpcConfig::default();
        let target = Target::new("compute").exchange("nova");
        assert_eq!(
            target.server_address(&config, "n1"),
            "nova/exclusive.compute.n1"
        );
        assert_eq!(target.group_address(&config), "nova/unicast.compute");
        assert_eq!(target.broadcast_address(&config), "nova/broadcast/compute");
        let slashed = Target::new("compute").exchange("nova/");
        assert_eq!(slashed.broadcast_address(&config), "nova/broadcast/compute");
    }

    #[test]
    fn routes_pick_the_rule_and_the_exchange() {
        let config = RpcConfig::default();
        let route = |t: Target| t.route(&config).unwrap();
        assert_eq!(
            route(Target::new("t").server("s")),
            Route {
                exchange: "openstack".into(),
                routing_key: "exclusive.t.s".into()
            }
        );
        assert_eq!(
            route(Target::new("t")),
            Route {
                exchange: "openstack".into(),
                routing_key: "unicast.t".into()
            }
        );
        // fanout wins over a server, as in oslo.messaging.
        assert_eq!(
            route(Target::new("t").server("s").fanout()),
            Route {
                exchange: "/broadcast/t".into(),
                routing_key: "/broadcast/t".into()
            }
        );
        assert_eq!(route(Target::new("t").exchange("x")).exchange, "x");
    }

    #[test]
    fn configured_prefixes_are_used() {
        let config = RpcConfig {
            server_request_prefix: "one".into(),
            group_request_prefix: "any".into(),
            broadcast_prefix: "all.".into(),
            ..RpcConfig::default()
        };
        let target = Target::new("t");
        assert_eq!(target.server_address(&config, "s"), "one.t.s");
        assert_eq!(target.group_address(&config), "any.t");
        assert_eq!(target.broadcast_address(&config), "all.t");
    }

    #[test]
    fn bad_targets_are_typed_errors() {
        let config = RpcConfig::default();
        let err = |t: Target| t.route(&config).unwrap_err();
        assert_eq!(err(Target::new("")), TargetError::EmptyTopic);
        for topic in ["a.b", "a#", "*"] {
            assert_eq!(err(Target::new(topic)), TargetError::BadTopic(topic.into()));
        }
        assert_eq!(err(Target::new("t").server("")), TargetError::EmptyServer);
        assert_eq!(
            err(Target::new("t").server("s*")),
            TargetError::BadServer("s*".into())
        );
        assert_eq!(
            err(Target::new("t").exchange("")),
            TargetError::BadExchange(String::new())
        );
        assert!(matches!(
            err(Target::new("t".repeat(300))),
            TargetError::TooLong { .. }
        ));
        // A dotted server name (a host name) routes fine: the binding key is exact.
        assert!(
            Target::new("t")
                .server("warren@host.example")
                .route(&config)
                .is_ok()
        );
    }
}
