//! The errors of loading config.ini: [`ConfigError`] says where (file, line, column, key),
//! [`Problem`] says what, in one sentence an operator can act on.
//!
//! Nothing here may print a broker password: URIs appear only in redacted form.

use std::fmt;
use std::path::PathBuf;

use crate::tls::TlsError;
use crate::uri::UriError;

/// Why a configuration could not be loaded.
///
/// It exists so that the service refuses to start with one precise message naming the
/// file, the position and the dotted key (e.g. `amqp.reconnect_min_ms`), instead of
/// starting with a half-understood configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file was read but is not a valid configuration.
    #[error("{}:{line}:{column}: `{key}`: {problem}", path.display())]
    Invalid {
        /// The file that holds the mistake.
        path: PathBuf,
        /// 1-based line of the mistake.
        line: usize,
        /// 1-based column (in characters) of the mistake.
        column: usize,
        /// Dotted key path, e.g. `zones.local.brokers[1]`.
        key: String,
        /// What is wrong.
        problem: Problem,
    },
}

/// What is wrong with one place of config.ini.
///
/// It exists to keep each kind of mistake a distinct, testable value with a sentence of
/// its own; [`ConfigError::Invalid`] adds the location.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The text is not valid TOML.
    #[error("invalid TOML syntax: {message}")]
    Syntax {
        /// The TOML parser's description.
        message: String,
    },
    /// A key that warren does not know (often a typo).
    #[error("unknown key{}", Hint(suggestion.as_deref(), valid))]
    UnknownKey {
        /// The closest valid key, when one is close enough.
        suggestion: Option<String>,
        /// All keys valid at this place.
        valid: Vec<String>,
    },
    /// A value of the wrong TOML type, e.g. a string where a number belongs.
    #[error("wrong type: expected {expected}, found {found}")]
    WrongType {
        /// What the key needs, in words.
        expected: String,
        /// What was written.
        found: String,
    },
    /// A value of the right type but out of range, e.g. a negative number.
    #[error("invalid value {found}: expected {expected}")]
    InvalidValue {
        /// What the key needs, in words.
        expected: String,
        /// What was written.
        found: String,
    },
    /// A required key left out, e.g. `uri` in a broker table.
    #[error("missing key `{name}`")]
    MissingKey {
        /// The key that must be written here.
        name: String,
    },
    /// Any other refusal of the TOML reader.
    #[error("{message}")]
    Unreadable {
        /// The reader's description, with URIs redacted.
        message: String,
    },
    /// A broker URI that cannot be used (boxed to keep `ConfigError` small).
    #[error("invalid broker URI: {0}")]
    InvalidUri(Box<UriError>),
    /// A TLS file (CA bundle, client certificate or key) that cannot be used (boxed to
    /// keep `ConfigError` small).
    #[error("{0}")]
    Tls(Box<TlsError>),
    /// A client certificate without its key, or a key without its certificate.
    #[error(
        "a client certificate needs both tls.cert_file and tls.key_file; `{missing}` is missing"
    )]
    HalfClientIdentity {
        /// The key that is not written.
        missing: &'static str,
    },
    /// A `server_name` that is neither a DNS name nor an IP address.
    #[error("{name:?} is not a DNS name or an IP address a certificate can be checked against")]
    InvalidServerName {
        /// The name as written.
        name: String,
    },
    /// A broker tag that is an empty string.
    #[error("a tag must not be empty")]
    EmptyTag,
    /// A broker tag with whitespace in it (a tag is one word, e.g. `reports`).
    #[error("tag {tag:?} contains whitespace; a tag is one word, e.g. \"reports\"")]
    TagWithWhitespace {
        /// The tag as written.
        tag: String,
    },
    /// The same broker (host, port and vhost) listed twice, in one zone or across zones.
    /// The broker is the one at the error's key; this says where it was listed first.
    #[error(
        "this broker is already listed as `{first_key}` on line {first_line} \
         (same host, port and vhost)"
    )]
    DuplicateBroker {
        /// Where it was listed first.
        first_key: String,
        /// The line of the first listing.
        first_line: usize,
    },
    /// A cluster member whose vhost or scheme differs from the first member's: one
    /// cluster serves the same vhosts on every node, and warren moves between its members
    /// as if they were one broker.
    #[error(
        "every member of a cluster must have the same {what} as its first member `{first_key}`"
    )]
    ClusterMemberDiffers {
        /// Where the first member is written.
        first_key: String,
        /// What differs.
        what: &'static str,
    },
    /// No `[zones.<zone>]` section for this node's zone.
    #[error(
        "this node's zone `{zone}`{} has no [zones.{zone}] section; {}",
        if *from_env { " (set by WARREN_ZONE)" } else { "" },
        DefinedZones(defined)
    )]
    LocalZoneMissing {
        /// The effective local zone.
        zone: String,
        /// Whether the zone name came from the WARREN_ZONE environment variable.
        from_env: bool,
        /// The zones the file does define.
        defined: Vec<String>,
    },
    /// A zone without brokers (`brokers` absent or an empty list).
    #[error(
        "zone `{zone}` lists no brokers; give at least one, e.g. brokers = [\"amqp://user:password@host:5672/%2f\"]"
    )]
    NoBrokers {
        /// The zone.
        zone: String,
    },
    /// `[rpc] transport = "amqp10"` while the local zone lists no AMQP 1.0 broker.
    #[error(
        "transport \"amqp10\" needs at least one amqp10:// URI in `amqp10_brokers` of [zones.{zone}]"
    )]
    NoAmqp10Brokers {
        /// The local zone.
        zone: String,
    },
    /// An empty zone name (in `amqp.zone`, WARREN_ZONE or a `[zones.""]` section).
    #[error("a zone name must not be empty")]
    EmptyZoneName,
    /// An exchange name that is empty.
    #[error("the exchange name must not be empty")]
    EmptyExchange,
    /// An exchange name the broker would refuse: longer than 255 bytes or `amq.`-prefixed.
    #[error(
        "`{0}` cannot be declared: exchange names are at most 255 bytes and `amq.` names are the broker's"
    )]
    BadExchange(String),
    /// Zero where only a positive number makes sense.
    #[error("must be greater than 0")]
    Zero,
    /// A pool that could never hand out a worker.
    #[error("a pool needs at least one worker: the size must be greater than 0")]
    ZeroPoolSize,
    /// The reconnect backoff's lower bound above its upper bound.
    #[error("reconnect_min_ms ({min}) is greater than reconnect_max_ms ({max})")]
    ReconnectRange {
        /// `amqp.reconnect_min_ms`.
        min: u64,
        /// `amqp.reconnect_max_ms`.
        max: u64,
    },
    /// A `[service] node` too long for the queue names and consumer tags built from it.
    #[error(
        "the node name is {length} bytes long; at most {limit} are allowed, so that the \
         queue names and consumer tags built from it fit AMQP's 255 bytes"
    )]
    NodeTooLong {
        /// The node name's length, in bytes (after trimming).
        length: usize,
        /// The most allowed ([`crate::config::MAX_NODE_BYTES`]).
        limit: usize,
    },
    /// An `[apps.<name>]` section for an app this binary does not contain (the name is
    /// the last segment of the error's key, as for [`Problem::UnknownKey`]).
    #[error("unknown app{}", Hint(suggestion.as_deref(), known))]
    UnknownApp {
        /// The closest known app, when one is close enough.
        suggestion: Option<String>,
        /// The apps this binary contains.
        known: Vec<String>,
    },
}

/// Renders " (did you mean `x`?)" or " (expected one of `a`, `b`)" after a name.
struct Hint<'a>(Option<&'a str>, &'a [String]);

impl fmt::Display for Hint<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Some(suggestion), _) => write!(f, " (did you mean `{suggestion}`?)"),
            (None, []) => f.write_str(" (nothing is expected here)"),
            (None, valid) => write!(f, " (expected one of {})", Ticked(valid)),
        }
    }
}

/// Renders "the file defines `a`, `b`" or "the file defines no zone".
struct DefinedZones<'a>(&'a [String]);

impl fmt::Display for DefinedZones<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("the file defines no zone")
        } else {
            write!(f, "the file defines {}", Ticked(self.0))
        }
    }
}

/// Renders a list as "`a`, `b`, `c`".
struct Ticked<'a>(&'a [String]);

impl fmt::Display for Ticked<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, item) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "`{item}`")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_names_file_line_column_and_key() {
        let err = ConfigError::Invalid {
            path: PathBuf::from("config.ini"),
            line: 3,
            column: 1,
            key: "amqp.prefech".to_string(),
            problem: Problem::UnknownKey {
                suggestion: Some("prefetch".to_string()),
                valid: vec!["prefetch".to_string()],
            },
        };
        assert_eq!(
            err.to_string(),
            "config.ini:3:1: `amqp.prefech`: unknown key (did you mean `prefetch`?)"
        );
    }

    #[test]
    fn read_error_names_the_file() {
        let err = ConfigError::Read {
            path: PathBuf::from("/etc/warren/config.ini"),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let text = err.to_string();
        assert!(text.starts_with("cannot read config file /etc/warren/config.ini: "));
    }

    #[test]
    fn hints_without_a_suggestion_list_the_valid_names() {
        let problem = Problem::UnknownApp {
            suggestion: None,
            known: vec!["skel".to_string(), "echo".to_string()],
        };
        assert_eq!(
            problem.to_string(),
            "unknown app (expected one of `skel`, `echo`)"
        );
    }

    #[test]
    fn local_zone_missing_mentions_warren_zone() {
        let problem = Problem::LocalZoneMissing {
            zone: "west".to_string(),
            from_env: true,
            defined: vec!["local".to_string()],
        };
        assert_eq!(
            problem.to_string(),
            "this node's zone `west` (set by WARREN_ZONE) has no [zones.west] section; \
             the file defines `local`"
        );
    }
}
