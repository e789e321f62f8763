//! `[apps.gateway]`: the WebSocket gateway's exchanges and queue names, who may connect
//! (bearer tokens, a trusted proxy's header, Origin) and the limits of one connection,
//! checked like every other section.
//!
//! Owns the meaning of those keys and their defaults (in `raw` and `GatewayConfig`); must
//! not touch the other keys of `[apps.<name>]` (`validate::apps`, `pusher`) nor what the
//! app does with them.

use std::net::IpAddr;
use std::time::Duration;

use toml::Spanned;

use super::GatewayConfig;
use super::error::{ConfigError, Problem};
use super::locate::Source;
use super::raw::RawApp;
use super::rules::{OwnKey, only_under, positive};

/// The app these keys belong to.
pub(super) const APP: &str = "gateway";

/// The gateway's settings from `app` (`key` = `apps.<name>`), or the defaults. Any of its
/// keys under another app is an error naming the key.
pub(super) fn gateway(
    name: &str,
    app: &RawApp,
    key: &str,
    source: &Source<'_>,
) -> Result<GatewayConfig, ConfigError> {
    let defaults = GatewayConfig::default();
    if name != APP {
        let stray: [OwnKey<'_>; _] = [
            ("path", app.path.as_ref().map(Spanned::span)),
            ("in_exchange", app.in_exchange.as_ref().map(Spanned::span)),
            ("out_exchange", app.out_exchange.as_ref().map(Spanned::span)),
            (
                "client_exchange",
                app.client_exchange.as_ref().map(Spanned::span),
            ),
            ("queue_prefix", app.queue_prefix.as_ref().map(Spanned::span)),
            (
                "client_queue_expiry_ms",
                app.client_queue_expiry_ms.as_ref().map(Spanned::span),
            ),
            (
                "request_timeout_ms",
                app.request_timeout_ms.as_ref().map(Spanned::span),
            ),
            ("jwt_secret", app.jwt_secret.as_ref().map(Spanned::span)),
            ("jwt_audience", app.jwt_audience.as_ref().map(Spanned::span)),
            (
                "identity_header",
                app.identity_header.as_ref().map(Spanned::span),
            ),
            (
                "trusted_proxies",
                app.trusted_proxies.as_ref().map(Spanned::span),
            ),
            (
                "allowed_origins",
                app.allowed_origins.as_ref().map(Spanned::span),
            ),
            (
                "max_frame_bytes",
                app.max_frame_bytes.as_ref().map(Spanned::span),
            ),
            (
                "max_frames_per_sec",
                app.max_frames_per_sec.as_ref().map(Spanned::span),
            ),
            (
                "max_subscriptions",
                app.max_subscriptions.as_ref().map(Spanned::span),
            ),
        ];
        only_under(APP, &stray, key, source)?;
        return Ok(defaults);
    }
    let invalid = |at: usize, field: &str, expected: &str, found: String| {
        source.error(
            at,
            &format!("{key}.{field}"),
            Problem::InvalidValue {
                expected: expected.to_string(),
                found,
            },
        )
    };
    let exchange = |value: &Option<Spanned<String>>, field: &str, default: String| match value {
        None => Ok(default),
        Some(name) if name.get_ref().trim().is_empty() => Err(source.error(
            name.span().start,
            &format!("{key}.{field}"),
            Problem::EmptyExchange,
        )),
        Some(name) if name.get_ref().len() > 255 || name.get_ref().starts_with("amq.") => {
            Err(source.error(
                name.span().start,
                &format!("{key}.{field}"),
                Problem::BadExchange(name.get_ref().clone()),
            ))
        }
        Some(name) => Ok(name.get_ref().clone()),
    };
    let path = match &app.path {
        None => defaults.path,
        Some(path) if !path.get_ref().starts_with('/') || path.get_ref() == "/" => {
            return Err(invalid(
                path.span().start,
                "path",
                "a path starting with `/`, other than `/` (the demo page)",
                format!("{:?}", path.get_ref()),
            ));
        }
        Some(path) => path.get_ref().clone(),
    };
    let queue_prefix = match &app.queue_prefix {
        None => defaults.queue_prefix,
        Some(prefix) if prefix.get_ref().len() > 100 || prefix.get_ref().starts_with("amq.") => {
            return Err(invalid(
                prefix.span().start,
                "queue_prefix",
                "at most 100 bytes, not starting with `amq.`",
                format!("{:?}", prefix.get_ref()),
            ));
        }
        Some(prefix) => prefix.get_ref().clone(),
    };
    let identity_header = match &app.identity_header {
        None => defaults.identity_header,
        Some(header) if axum_header_name(header.get_ref()).is_none() => {
            return Err(invalid(
                header.span().start,
                "identity_header",
                "an HTTP header name (letters, digits, `-`)",
                format!("{:?}", header.get_ref()),
            ));
        }
        Some(header) => header.get_ref().to_ascii_lowercase(),
    };
    let mut trusted_proxies = Vec::new();
    if let Some(list) = &app.trusted_proxies {
        for entry in list.get_ref() {
            match entry.get_ref().parse::<IpAddr>() {
                Ok(address) => trusted_proxies.push(address),
                Err(_) => {
                    return Err(invalid(
                        entry.span().start,
                        "trusted_proxies",
                        "an IP address",
                        format!("{:?}", entry.get_ref()),
                    ));
                }
            }
        }
    }
    if !identity_header.is_empty() && trusted_proxies.is_empty() {
        let at = app.identity_header.as_ref().map_or(0, |h| h.span().start);
        return Err(invalid(
            at,
            "identity_header",
            "trusted_proxies listing the proxies allowed to set it",
            "no trusted_proxies".to_string(),
        ));
    }
    let mut allowed_origins = Vec::new();
    if let Some(list) = &app.allowed_origins {
        for entry in list.get_ref() {
            let origin = entry.get_ref();
            if !(origin.starts_with("http://") || origin.starts_with("https://"))
                || origin.ends_with('/')
            {
                return Err(invalid(
                    entry.span().start,
                    "allowed_origins",
                    "an origin such as \"https://app.example.com\" (scheme, host, optional port, no path)",
                    format!("{origin:?}"),
                ));
            }
            allowed_origins.push(origin.clone());
        }
    }
    let expiry = positive(
        app.client_queue_expiry_ms.as_ref(),
        u32::try_from(defaults.client_queue_expiry.as_millis()).unwrap_or(u32::MAX),
        &format!("{key}.client_queue_expiry_ms"),
        source,
    )?;
    let request_timeout = positive(
        app.request_timeout_ms.as_ref(),
        u64::try_from(defaults.request_timeout.as_millis()).unwrap_or(u64::MAX),
        &format!("{key}.request_timeout_ms"),
        source,
    )?;
    Ok(GatewayConfig {
        path,
        in_exchange: exchange(&app.in_exchange, "in_exchange", defaults.in_exchange)?,
        out_exchange: exchange(&app.out_exchange, "out_exchange", defaults.out_exchange)?,
        client_exchange: exchange(
            &app.client_exchange,
            "client_exchange",
            defaults.client_exchange,
        )?,
        queue_prefix,
        client_queue_expiry: Duration::from_millis(u64::from(expiry)),
        request_timeout: Duration::from_millis(request_timeout),
        jwt_secret: app
            .jwt_secret
            .as_ref()
            .map_or(defaults.jwt_secret, |s| s.get_ref().clone()),
        jwt_audience: app
            .jwt_audience
            .as_ref()
            .map_or(defaults.jwt_audience, |s| s.get_ref().clone()),
        identity_header,
        trusted_proxies,
        allowed_origins,
        max_frame_bytes: positive(
            app.max_frame_bytes.as_ref(),
            defaults.max_frame_bytes,
            &format!("{key}.max_frame_bytes"),
            source,
        )?,
        max_frames_per_sec: positive(
            app.max_frames_per_sec.as_ref(),
            defaults.max_frames_per_sec,
            &format!("{key}.max_frames_per_sec"),
            source,
        )?,
        max_subscriptions: positive(
            app.max_subscriptions.as_ref(),
            defaults.max_subscriptions,
            &format!("{key}.max_subscriptions"),
            source,
        )?,
    })
}

/// `Some` when `name` is a valid HTTP header name (RFC 9110 token).
fn axum_header_name(name: &str) -> Option<()> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    ok.then_some(())
}
