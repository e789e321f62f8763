//! Who a connecting client is, and whether it may connect: the `Origin` check, a bearer
//! token (a JWT verified with the configured HS256 key, by the `jsonwebtoken` crate), or
//! the identity header a trusted proxy (an API gateway such as Kong) sets.
//!
//! Owns those decisions. Must not touch sockets or the broker. Never logs a token or a
//! header's value.

use std::net::IpAddr;

use axum::http::{HeaderMap, StatusCode, header};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};
use serde::Deserialize;
use warren_listeners::prelude::GatewayConfig;

use crate::frame::is_client_id;

/// Why a connection was refused before the WebSocket upgrade: the HTTP status and a
/// sentence without secrets.
///
/// It exists so that the HTTP answer (401, 403) and the log line say the same thing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: &'static str,
}

impl Refusal {
    fn unauthorized(reason: &'static str) -> Refusal {
        Refusal {
            status: StatusCode::UNAUTHORIZED,
            reason,
        }
    }
}

/// The claims the gateway reads from a token; `exp` is checked by the crate.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
}

/// The client's identity, or why it may not connect. `token` is the `access_token` query
/// parameter (browsers cannot set headers on a WebSocket).
pub fn authenticate(
    config: &GatewayConfig,
    headers: &HeaderMap,
    peer: IpAddr,
    token: Option<&str>,
) -> Result<String, Refusal> {
    check_origin(config, headers)?;
    if !config.identity_header.is_empty()
        && config.trusted_proxies.contains(&peer)
        && let Some(value) = headers.get(config.identity_header.as_str())
    {
        return match value.to_str() {
            Ok(id) if is_client_id(id) => Ok(id.to_string()),
            _ => Err(Refusal::unauthorized(
                "the identity header does not hold a client id",
            )),
        };
    }
    if config.jwt_secret.is_empty() {
        return Err(Refusal::unauthorized(
            "no identity: no trusted identity header, and bearer tokens are not configured",
        ));
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or(token);
    let Some(bearer) = bearer else {
        return Err(Refusal::unauthorized(
            "no bearer token (Authorization header or access_token)",
        ));
    };
    let mut validation = Validation::new(Algorithm::HS256);
    if config.jwt_audience.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&[config.jwt_audience.as_str()]);
    }
    let key = DecodingKey::from_secret(config.jwt_secret.as_bytes());
    match decode::<Claims>(bearer, &key, &validation) {
        Ok(data) if is_client_id(&data.claims.sub) => Ok(data.claims.sub),
        Ok(_) => Err(Refusal::unauthorized(
            "the token's `sub` is not a client id",
        )),
        Err(_) => Err(Refusal::unauthorized(
            "the bearer token is invalid or expired",
        )),
    }
}

/// With `allowed_origins` set, a connection must carry one of them as its `Origin`.
fn check_origin(config: &GatewayConfig, headers: &HeaderMap) -> Result<(), Refusal> {
    if config.allowed_origins.is_empty() {
        return Ok(());
    }
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    match origin {
        Some(origin) if config.allowed_origins.iter().any(|o| o == origin) => Ok(()),
        _ => Err(Refusal {
            status: StatusCode::FORBIDDEN,
            reason: "the Origin is not in allowed_origins",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use jsonwebtoken::{EncodingKey, Header, encode};

    fn token(sub: &str, secret: &str, exp_from_now: i64) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let claims = serde_json::json!({"sub": sub, "exp": now + exp_from_now});
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap_or_default()
    }

    fn config() -> GatewayConfig {
        GatewayConfig {
            jwt_secret: "k".into(),
            identity_header: "x-consumer-username".into(),
            trusted_proxies: vec![IpAddr::from([10, 0, 0, 1])],
            allowed_origins: vec!["https://app.example.com".into()],
            ..GatewayConfig::default()
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            if let Ok(value) = HeaderValue::from_str(value) {
                map.insert(*name, value);
            }
        }
        map
    }

    #[test]
    fn tokens_headers_and_origins() {
        let config = config();
        let origin = ("origin", "https://app.example.com");
        let here = IpAddr::from([127, 0, 0, 1]);
        let good = token("alice", "k", 60);
        assert_eq!(
            authenticate(&config, &headers(&[origin]), here, Some(&good)),
            Ok("alice".to_string())
        );
        let bearer = format!("Bearer {good}");
        assert_eq!(
            authenticate(
                &config,
                &headers(&[origin, ("authorization", &bearer)]),
                here,
                None
            ),
            Ok("alice".to_string())
        );
        let refused = |h: HeaderMap, peer: IpAddr, t: Option<&str>| {
            authenticate(&config, &h, peer, t).map_err(|r| r.status)
        };
        assert_eq!(
            refused(headers(&[]), here, Some(&good)),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            refused(
                headers(&[("origin", "https://evil.example")]),
                here,
                Some(&good)
            ),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            refused(headers(&[origin]), here, Some(&token("alice", "other", 60))),
            Err(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            refused(headers(&[origin]), here, Some(&token("alice", "k", -3600))),
            Err(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            refused(headers(&[origin]), here, None),
            Err(StatusCode::UNAUTHORIZED)
        );
        let proxied = headers(&[origin, ("x-consumer-username", "bob")]);
        assert_eq!(
            authenticate(&config, &proxied, IpAddr::from([10, 0, 0, 1]), None),
            Ok("bob".to_string())
        );
        // The same header from anyone else is ignored: a token is still needed.
        assert_eq!(refused(proxied, here, None), Err(StatusCode::UNAUTHORIZED));
    }
}
