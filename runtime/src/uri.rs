//! Broker addresses: parsing the `amqp://` URIs listed in config.ini, and keeping their
//! passwords out of logs and error messages.
//!
//! Owns [`BrokerUri`] (a validated broker address, with a redacted form for display),
//! [`UriError`] and [`redact_uri`]. It knows nothing about zones or connections.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

use lapin::uri::AMQPUri;

/// What replaces a password in every redacted URI.
const MASK: &str = "***";

/// A broker address from config.ini: the full URI (secret) plus a redacted form for logs.
///
/// It exists so that the password travels with the address without ever being printed:
/// `Display` and `Debug` both show the redacted form, and only [`BrokerUri::amqp`] hands
/// out the secret, for connecting. Two values are equal when they parse to the same
/// AMQP URI (scheme, credentials, host, port, vhost, query).
#[derive(Clone)]
pub struct BrokerUri {
    /// lapin's canonical rendering of `amqp` (secret): the identity for `Eq` and `Hash`,
    /// because `AMQPUri` itself does not implement `Hash`.
    canonical: String,
    redacted: String,
    amqp: AMQPUri,
}

/// Why a broker URI from config.ini was refused.
///
/// It exists to give each mistake a clear sentence. Every variant carries the URI in its
/// redacted form only, so displaying the error never shows a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// The string is empty (or only whitespace).
    #[error("the broker URI is empty")]
    Empty,
    /// No `scheme://` prefix at all.
    #[error("`{uri}` is not an AMQP URI (expected amqp://user:password@host:port/vhost)")]
    NotAUri {
        /// The offending text, redacted.
        uri: String,
    },
    /// A scheme other than `amqp`.
    #[error("`{uri}` has the scheme `{scheme}`; only amqp:// and amqps:// are supported")]
    UnsupportedScheme {
        /// The offending URI, redacted.
        uri: String,
        /// The scheme that was given.
        scheme: String,
    },
    /// `amqp://` followed by no host name.
    #[error("`{uri}` names no host")]
    MissingHost {
        /// The offending URI, redacted.
        uri: String,
    },
    /// The port is not a number from 1 to 65535.
    #[error("`{uri}` has an invalid port `{port}` (expected a number from 1 to 65535)")]
    InvalidPort {
        /// The offending URI, redacted.
        uri: String,
        /// The port text as written.
        port: String,
    },
    /// A URI listed under `amqp10_brokers` that is not `amqp10://`.
    #[error(
        "`{uri}` is not an AMQP 1.0 URI (expected amqp10://user:password@host:port, or amqp10s:// for TLS)"
    )]
    NotAmqp10 {
        /// The offending URI, redacted.
        uri: String,
    },
    /// Anything else the URI parser refused.
    #[error("`{uri}` is malformed: {reason}")]
    Malformed {
        /// The offending URI, redacted.
        uri: String,
        /// What is wrong, never containing the password.
        reason: String,
    },
}

impl BrokerUri {
    /// Parses and validates one broker URI (surrounding whitespace is ignored).
    pub fn parse(raw: &str) -> Result<BrokerUri, UriError> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(UriError::Empty);
        }
        let Some(parts) = split(raw) else {
            return Err(UriError::NotAUri {
                uri: redact_unparsed(raw),
            });
        };
        let redacted = redact_one(raw);
        check_scheme(parts.scheme, &redacted)?;
        if parts.authority_userinfo.is_none() && redacted != raw {
            // The only `@` sits after a `/`, `?` or `#`: the password contains one of
            // them unencoded, and the parser would take part of it for the host.
            return Err(UriError::Malformed {
                uri: redacted,
                reason: "the password contains an unencoded `/`, `?` or `#`; \
                         percent-encode it (%2F, %3F, %23)"
                    .to_string(),
            });
        }
        let (host, port) = split_host_port(parts.host_port);
        if host.is_empty() {
            return Err(UriError::MissingHost { uri: redacted });
        }
        if let Some(port) = port {
            check_port(port, &redacted)?;
        }
        let mut amqp = AMQPUri::from_str(raw).map_err(|reason| UriError::Malformed {
            reason: sanitize_reason(&reason, raw, &redacted, parts.password()),
            uri: redacted.clone(),
        })?;
        // lapin reads the host with `Url::domain()`, which is `None` for an IPv6
        // literal, and then silently falls back to "localhost": put the real host back.
        if let Some(literal) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            amqp.authority.host = literal.to_string();
        }
        if amqp.authority.host.is_empty() {
            return Err(UriError::MissingHost { uri: redacted });
        }
        Ok(BrokerUri {
            canonical: amqp.to_string(),
            redacted,
            amqp,
        })
    }

    /// Parses an AMQP 1.0 intermediary's URI, `amqp10://user:password@host:port` (port
    /// 5672 when none is given) or `amqp10s://…` (TLS, port 5671); a path names a RabbitMQ
    /// vhost. Kept as the same kind of value as an AMQP 0-9-1 broker's, so that it is
    /// redacted the same way everywhere.
    pub fn parse_amqp10(raw: &str) -> Result<BrokerUri, UriError> {
        let raw = raw.trim();
        let (scheme, rest) = match raw.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("amqp10") => ("amqp", rest),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("amqp10s") => ("amqps", rest),
            _ => {
                return Err(UriError::NotAmqp10 {
                    uri: redact_unparsed(raw),
                });
            }
        };
        let written = if scheme == "amqps" {
            "amqp10s"
        } else {
            "amqp10"
        };
        let mut uri = BrokerUri::parse(&format!("{scheme}://{rest}")).map_err(|mut err| {
            // Report the URI as written, not as handed to the parser.
            if let UriError::NotAUri { uri }
            | UriError::UnsupportedScheme { uri, .. }
            | UriError::MissingHost { uri }
            | UriError::InvalidPort { uri, .. }
            | UriError::NotAmqp10 { uri }
            | UriError::Malformed { uri, .. } = &mut err
                && let Some(tail) = uri.split_once("://").map(|(_, tail)| tail.to_string())
            {
                *uri = format!("{written}://{tail}");
            }
            err
        })?;
        uri.redacted = redact_one(raw);
        Ok(uri)
    }

    /// The URI with its password replaced by `***`, e.g. `amqp://guest:***@127.0.0.1:5672/%2f`.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// The parsed URI, password included, for connecting.
    pub fn amqp(&self) -> &lapin::uri::AMQPUri {
        &self.amqp
    }

    /// The broker's host (an IPv6 address without brackets).
    pub fn host(&self) -> &str {
        &self.amqp.authority.host
    }

    /// The broker's port (5672 when the URI names none, 5671 for `amqps://`).
    pub fn port(&self) -> u16 {
        self.amqp.authority.port
    }

    /// Whether the URI is `amqps://` (TLS).
    pub fn is_tls(&self) -> bool {
        self.amqp.scheme == lapin::uri::AMQPScheme::AMQPS
    }
}

impl PartialEq for BrokerUri {
    fn eq(&self, other: &Self) -> bool {
        self.canonical == other.canonical
    }
}

impl Eq for BrokerUri {}

impl Hash for BrokerUri {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.canonical.hash(state);
    }
}

impl fmt::Display for BrokerUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for BrokerUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BrokerUri").field(&self.redacted).finish()
    }
}

/// Redacts the password of every URI found in `text`, valid or not.
///
/// A URI starts at `scheme://` and runs to where the next one starts. Its userinfo ends
/// at the last `@` of the authority (which ends at `/`, `?`, `#` or whitespace). When
/// the authority holds no `@` yet reads `user:secret` rather than `host:port`, the
/// password contains an unencoded `/`, `?`, `#` or space, and the last `@` of the URI
/// ends it: hiding too much is preferred to hiding too little. Text without a password
/// is returned unchanged.
pub fn redact_uri(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = next_uri_start(rest) {
        out.push_str(&rest[..start]);
        let candidate = &rest[start..];
        // The candidate's own `://` lies past its scheme; the next URI starts after it.
        let end = candidate
            .find("://")
            .and_then(|sep| next_uri_start(&candidate[sep + 3..]).map(|next| sep + 3 + next))
            .unwrap_or(candidate.len());
        out.push_str(&redact_one(&candidate[..end]));
        rest = &candidate[end..];
    }
    out.push_str(rest);
    out
}

/// The pieces of `scheme://authority...` that validation and redaction need.
struct Parts<'a> {
    scheme: &'a str,
    /// The userinfo found before the last `@` of the authority, if any.
    authority_userinfo: Option<&'a str>,
    /// `host[:port]` of the authority.
    host_port: &'a str,
}

impl<'a> Parts<'a> {
    /// The password as written (still percent-encoded), if any.
    fn password(&self) -> Option<&'a str> {
        let userinfo = self.authority_userinfo?;
        let (_, password) = userinfo.split_once(':')?;
        Some(password)
    }
}

/// Splits `scheme://[userinfo@]host[:port][/path][?query][#fragment]` strictly.
fn split(uri: &str) -> Option<Parts<'_>> {
    let (scheme, after) = uri.split_once("://")?;
    if !is_scheme(scheme) {
        return None;
    }
    let authority = &after[..authority_end(after)];
    let (authority_userinfo, host_port) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    Some(Parts {
        scheme,
        authority_userinfo,
        host_port,
    })
}

/// Where the authority after `://` ends: at the first `/`, `?` or `#`.
fn authority_end(after_scheme: &str) -> usize {
    after_scheme
        .find(['/', '?', '#'])
        .unwrap_or(after_scheme.len())
}

/// A scheme as RFC 3986 spells it: a letter, then letters, digits, `+`, `-` or `.`.
fn is_scheme(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// The byte index in `text` where the next `scheme://` begins, if any.
fn next_uri_start(text: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(found) = text[from..].find("://") {
        let sep = from + found;
        let before = &text[..sep];
        let scheme_start = before
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |i| i + 1);
        // Skip leading characters that cannot start a scheme (digits, `+`, `-`, `.`).
        let scheme_start = before[scheme_start..]
            .find(|c: char| c.is_ascii_alphabetic())
            .map(|i| scheme_start + i);
        if let Some(start) = scheme_start {
            return Some(start);
        }
        from = sep + 3;
    }
    None
}

/// Redacts the password of one URI-looking string (which starts with its scheme).
fn redact_one(uri: &str) -> String {
    let Some((scheme, after)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let authority_end = after
        .find(|c: char| matches!(c, '/' | '?' | '#') || c.is_whitespace())
        .unwrap_or(after.len());
    let authority = &after[..authority_end];
    let at = match authority.rfind('@') {
        Some(at) => at,
        None if is_host_port(authority) => return uri.to_string(),
        None => match after.rfind('@') {
            Some(at) => at,
            None => return uri.to_string(),
        },
    };
    let userinfo = &after[..at];
    match userinfo.split_once(':') {
        Some((user, password)) if !password.is_empty() => {
            format!("{scheme}://{user}:{MASK}{}", &after[at..])
        }
        _ => uri.to_string(),
    }
}

/// Whether an authority without `@` reads as `host`, `host:port` or `[ipv6]...` (and so
/// cannot be the start of `user:password`).
fn is_host_port(authority: &str) -> bool {
    if authority.starts_with('[') {
        return true;
    }
    match authority.split_once(':') {
        None => true,
        Some((_, port)) => port.chars().all(|c| c.is_ascii_digit()),
    }
}

/// Hides everything before the last `@` of text that is not a URI at all, in case it is
/// a mistyped one (`amqp:user:secret@host`).
fn redact_unparsed(text: &str) -> String {
    match text.rfind('@') {
        Some(at) => format!("{MASK}{}", &text[at..]),
        None => text.to_string(),
    }
}

/// Refuses every scheme but `amqp` and `amqps`.
fn check_scheme(scheme: &str, redacted: &str) -> Result<(), UriError> {
    if scheme.eq_ignore_ascii_case("amqp") || scheme.eq_ignore_ascii_case("amqps") {
        Ok(())
    } else {
        Err(UriError::UnsupportedScheme {
            uri: redacted.to_string(),
            scheme: scheme.to_string(),
        })
    }
}

/// Splits `host[:port]`, keeping an IPv6 literal's brackets on the host.
fn split_host_port(host_port: &str) -> (&str, Option<&str>) {
    if host_port.starts_with('[')
        && let Some(close) = host_port.find(']')
    {
        let (host, after) = host_port.split_at(close + 1);
        return (host, after.strip_prefix(':'));
    }
    match host_port.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (host_port, None),
    }
}

/// Accepts an empty port (the default applies) or a number from 1 to 65535.
fn check_port(port: &str, redacted: &str) -> Result<(), UriError> {
    if port.is_empty() {
        return Ok(());
    }
    let valid = port.chars().all(|c| c.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|number| number != 0);
    if valid {
        Ok(())
    } else {
        Err(UriError::InvalidPort {
            uri: redacted.to_string(),
            port: port.to_string(),
        })
    }
}

/// Makes lapin's error text safe to show: the raw URI is replaced by its redacted form,
/// and a text that still contains the password is replaced altogether.
fn sanitize_reason(reason: &str, raw: &str, redacted: &str, password: Option<&str>) -> String {
    let reason = redact_uri(&reason.replace(raw, redacted));
    match password {
        Some(password) if !password.is_empty() && reason.contains(password) => {
            "the URI parser refused it".to_string()
        }
        _ => reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

    #[test]
    fn parses_a_full_uri() {
        let uri = BrokerUri::parse(LOCAL).unwrap();
        assert_eq!(uri.host(), "127.0.0.1");
        assert_eq!(uri.port(), 5672);
        assert_eq!(uri.amqp().vhost, "/");
        assert_eq!(uri.amqp().authority.userinfo.username, "guest");
        assert_eq!(uri.amqp().authority.userinfo.password, "guest");
        assert_eq!(uri.redacted(), "amqp://guest:***@127.0.0.1:5672/%2f");
    }

    #[test]
    fn port_defaults_to_5672() {
        let uri = BrokerUri::parse("amqp://rabbit.example.com/%2f").unwrap();
        assert_eq!(uri.host(), "rabbit.example.com");
        assert_eq!(uri.port(), 5672);
        assert_eq!(uri.redacted(), "amqp://rabbit.example.com/%2f");
    }

    #[test]
    fn keeps_an_ipv6_host() {
        let uri = BrokerUri::parse("amqp://u:p@[::1]:5673/%2f").unwrap();
        assert_eq!(uri.host(), "::1");
        assert_eq!(uri.port(), 5673);
    }

    #[test]
    fn accepts_a_password_with_a_space_and_hides_it() {
        let uri = BrokerUri::parse("amqp://u:sec ret@h:5672/%2f").unwrap();
        assert_eq!(uri.amqp().authority.userinfo.password, "sec ret");
        assert_eq!(uri.redacted(), "amqp://u:***@h:5672/%2f");
    }

    #[test]
    fn decodes_a_percent_encoded_password() {
        let uri = BrokerUri::parse("amqp://u:p%40ss%3Aw%2Frd@h:5672/%2f").unwrap();
        assert_eq!(uri.amqp().authority.userinfo.password, "p@ss:w/rd");
        assert_eq!(uri.redacted(), "amqp://u:***@h:5672/%2f");
        assert_eq!(uri.host(), "h");
    }

    #[test]
    fn equal_when_parsed_equal() {
        let a = BrokerUri::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        let b = BrokerUri::parse("amqp://guest:guest@127.0.0.1/%2f").unwrap();
        let c = BrokerUri::parse("amqp://guest:guest@127.0.0.1:5673/%2f").unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let set: std::collections::HashSet<_> = [a, b, c].into_iter().collect();
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn accepts_amqps_with_its_own_default_port() {
        let uri = BrokerUri::parse("amqps://u:secret@h/%2f").unwrap();
        assert!(uri.is_tls());
        assert_eq!(uri.port(), 5671);
        assert_eq!(uri.redacted(), "amqps://u:***@h/%2f");
        assert!(!BrokerUri::parse(LOCAL).unwrap().is_tls());
    }

    #[test]
    fn refuses_other_schemes() {
        let err = BrokerUri::parse("http://u:secret@h/").unwrap_err();
        assert_eq!(
            err,
            UriError::UnsupportedScheme {
                uri: "http://u:***@h/".to_string(),
                scheme: "http".to_string()
            }
        );
    }

    #[test]
    fn refuses_text_that_is_no_uri() {
        assert_eq!(BrokerUri::parse("  ").unwrap_err(), UriError::Empty);
        let err = BrokerUri::parse("127.0.0.1:5672").unwrap_err();
        assert!(matches!(err, UriError::NotAUri { .. }), "{err:?}");
        let err = BrokerUri::parse("amqp:guest:secret@h/%2f").unwrap_err();
        assert_eq!(
            err,
            UriError::NotAUri {
                uri: "***@h/%2f".to_string()
            }
        );
    }

    #[test]
    fn refuses_a_missing_host() {
        let err = BrokerUri::parse("amqp://u:secret@:5672/%2f").unwrap_err();
        assert!(matches!(err, UriError::MissingHost { .. }), "{err:?}");
        assert!(!err.to_string().contains("secret"));
        let err = BrokerUri::parse("amqp:///%2f").unwrap_err();
        assert!(matches!(err, UriError::MissingHost { .. }), "{err:?}");
    }

    #[test]
    fn refuses_a_bad_port_without_leaking() {
        let err = BrokerUri::parse("amqp://u:secret@host:notaport/%2f").unwrap_err();
        assert_eq!(
            err.to_string(),
            "`amqp://u:***@host:notaport/%2f` has an invalid port `notaport` \
             (expected a number from 1 to 65535)"
        );
        for port in ["0", "65536", "-1"] {
            let err = BrokerUri::parse(&format!("amqp://h:{port}")).unwrap_err();
            assert!(matches!(err, UriError::InvalidPort { .. }), "{err:?}");
        }
    }

    #[test]
    fn refuses_an_unencoded_slash_in_the_password() {
        let err = BrokerUri::parse("amqp://u:se/cret@host:5672/%2f").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("percent-encode"), "{text}");
        assert!(
            !text.contains("se/cret") && !text.contains("cret"),
            "{text}"
        );
        assert!(text.contains("`amqp://u:***@host:5672/%2f`"), "{text}");
    }

    #[test]
    fn parser_errors_never_show_the_password() {
        // A query parameter lapin cannot read: its error text is passed on, sanitized.
        let err = BrokerUri::parse("amqp://u:hunter2@h/%2f?heartbeat=abc").unwrap_err();
        assert!(matches!(err, UriError::Malformed { .. }), "{err:?}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");
    }

    #[test]
    fn sanitize_drops_a_reason_that_echoes_the_password() {
        let reason = sanitize_reason("bad thing near hunter2", "raw", "red", Some("hunter2"));
        assert_eq!(reason, "the URI parser refused it");
        let reason = sanitize_reason("Invalid URL: 'amqp://u:pw@h'", "amqp://u:pw@h", "R", None);
        assert_eq!(reason, "Invalid URL: 'R'");
    }

    #[test]
    fn display_and_debug_are_redacted() {
        let uri = BrokerUri::parse("amqp://admin:s3cr3t@rabbit:5672/prod").unwrap();
        assert_eq!(uri.to_string(), "amqp://admin:***@rabbit:5672/prod");
        let debug = format!("{uri:?}");
        assert_eq!(debug, "BrokerUri(\"amqp://admin:***@rabbit:5672/prod\")");
        assert!(!format!("{:?}", vec![uri.clone()]).contains("s3cr3t"));
        assert!(!format!("{uri:#?}").contains("s3cr3t"));
    }

    #[test]
    fn redacts_valid_and_invalid_uris() {
        let cases = [
            (LOCAL, "amqp://guest:***@127.0.0.1:5672/%2f"),
            (
                "amqp://u:secret@host:notaport",
                "amqp://u:***@host:notaport",
            ),
            ("amqp://u:p%40ss@h/%2f", "amqp://u:***@h/%2f"),
            ("amqp://u:p@ss@h:5672", "amqp://u:***@h:5672"),
            ("amqp://u:p:a:ss@h", "amqp://u:***@h"),
            ("amqp://u:pa/ss@h/v", "amqp://u:***@h/v"),
            ("amqp://:secret@h", "amqp://:***@h"),
            ("amqp://u:p@h/v@x", "amqp://u:***@h/v@x"),
            ("amqps://u:p@h", "amqps://u:***@h"),
            ("amqp://u:sec ret@h:5672", "amqp://u:***@h:5672"),
            ("amqp://u:p?ss#w@h", "amqp://u:***@h"),
        ];
        for (input, expected) in cases {
            assert_eq!(redact_uri(input), expected, "input: {input}");
        }
    }

    #[test]
    fn leaves_text_without_a_password_unchanged() {
        for input in [
            "amqp://h:5672/%2f",
            "amqp://user@h:5672",
            "amqp://user:@h",
            "amqp://h/a:b",
            "no uri here: a:b@c",
            "",
            "://x:y@z",
            "amqp://h:5672/%2f failed for guest@example.com",
            "amqp://[::1]:5672/a@b",
        ] {
            assert_eq!(redact_uri(input), input);
        }
    }

    #[test]
    fn redacts_uris_inside_longer_text() {
        let text = r#"invalid type: string "amqp://u:secret@h:5672", expected u16"#;
        assert_eq!(
            redact_uri(text),
            r#"invalid type: string "amqp://u:***@h:5672", expected u16"#
        );
        let spaced = r#"invalid type: string "amqp://u:sec ret@h", expected u16"#;
        assert_eq!(
            redact_uri(spaced),
            r#"invalid type: string "amqp://u:***@h", expected u16"#
        );
        let after = "amqp://u:p@h:5672 failed, ask admin@example.com";
        assert_eq!(
            redact_uri(after),
            "amqp://u:***@h:5672 failed, ask admin@example.com"
        );
        let list = r#"["amqp://a:one@h1","amqp://b:two@h2"] and amqp://c:three@h3 end"#;
        assert_eq!(
            redact_uri(list),
            r#"["amqp://a:***@h1","amqp://b:***@h2"] and amqp://c:***@h3 end"#
        );
    }
}
