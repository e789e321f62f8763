//! The frame protocol (the POC's JSON): what a client may send, checked field by field,
//! and the frames the gateway writes back (deliveries, replies, acks, errors).
//!
//! A client frame is one JSON object:
//!
//! ```text
//! { "distribution": { "broadcast": false, "multicast": ["id1", "id2"], "direct": ["id1"] },
//!   "channel": { "voice": true, "chat": false, "tickets": false },
//!   "packet_action": "consume" | "publish",
//!   "publish_target": "<in_exchange>",      // optional; must name the inbound exchange
//!   "consume_target": [],                   // consume only: subjects; empty = everything
//!   "request_id": "r-1",                    // publish only: write and wait (one feed)
//!   "message": {} }                         // publish only
//! ```
//!
//! Owns parsing and the wire shape of every frame. Must not touch the broker or sockets.

use serde_json::{Map, Value, json};

use crate::feed::Feed;

/// Longest client id, request id or consume target accepted.
pub const MAX_ID_BYTES: usize = 128;

/// Who a message is for, as the POC's `distribution` object says.
///
/// It exists so that the three ways of addressing (every subscriber of a feed, a list of
/// clients, one client) are checked once and read the same by the distributor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Distribution {
    pub broadcast: bool,
    pub multicast: Vec<String>,
    pub direct: Vec<String>,
}

impl Distribution {
    /// The client ids to deliver to one by one (multicast and direct, each once), or none
    /// for a broadcast.
    pub fn recipients(&self) -> Vec<String> {
        if self.broadcast {
            return Vec::new();
        }
        let mut ids: Vec<String> = Vec::new();
        for id in self.multicast.iter().chain(&self.direct) {
            if !ids.contains(id) {
                ids.push(id.clone());
            }
        }
        ids
    }

    /// The object as the POC writes it.
    pub fn to_json(&self) -> Value {
        json!({"broadcast": self.broadcast, "multicast": self.multicast, "direct": self.direct})
    }

    /// Reads `value` (the field `field`); every mistake names the field.
    pub fn parse(value: &Value, field: &str) -> Result<Distribution, FrameError> {
        let Some(object) = value.as_object() else {
            return Err(FrameError::new(field, "must be an object"));
        };
        let mut distribution = Distribution::default();
        for (key, value) in object {
            let at = format!("{field}.{key}");
            match key.as_str() {
                "broadcast" => {
                    distribution.broadcast = value
                        .as_bool()
                        .ok_or_else(|| FrameError::new(&at, "must be true or false"))?;
                }
                "multicast" => distribution.multicast = ids(value, &at)?,
                "direct" => distribution.direct = ids(value, &at)?,
                _ => return Err(FrameError::new(&at, "unknown field")),
            }
        }
        if distribution.direct.len() > 1 {
            return Err(FrameError::new(
                &format!("{field}.direct"),
                "direct names one client id (use multicast for more)",
            ));
        }
        if !distribution.broadcast && distribution.recipients().is_empty() {
            return Err(FrameError::new(
                field,
                "nobody to deliver to: broadcast is false and multicast and direct are empty",
            ));
        }
        Ok(distribution)
    }
}

/// A list of client ids.
fn ids(value: &Value, field: &str) -> Result<Vec<String>, FrameError> {
    let Some(items) = value.as_array() else {
        return Err(FrameError::new(field, "must be an array of client ids"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item.as_str() {
            Some(id) if is_client_id(id) => Ok(id.to_string()),
            _ => Err(FrameError::new(
                &format!("{field}[{i}]"),
                "not a client id (1 to 128 of A-Z a-z 0-9 . _ @ -)",
            )),
        })
        .collect()
}

/// A client id (and any id the gateway puts in a routing key or queue name): 1 to 128
/// bytes of `A-Z a-z 0-9 . _ @ -`.
pub fn is_client_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b))
}

/// A frame that breaks the protocol: the field at fault and why.
///
/// It exists so that every refusal names its field (`channel.voice`, `message`, …) in
/// the error frame the client gets; the connection stays open.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {reason}")]
pub struct FrameError {
    pub field: String,
    pub reason: String,
}

impl FrameError {
    pub fn new(field: &str, reason: &str) -> FrameError {
        FrameError {
            field: field.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// What a client asked for in one valid frame.
///
/// It exists so that the socket loop acts on checked values only.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientFrame {
    /// Subscribe to `feeds`; `targets` narrows broadcasts to those subjects (empty: all).
    Consume {
        feeds: Vec<Feed>,
        targets: Vec<String>,
    },
    /// Send `message` to the inbound side of `feeds`; with `request_id` (one feed), wait
    /// for the back-end's reply.
    Publish {
        feeds: Vec<Feed>,
        message: Value,
        distribution: Option<Distribution>,
        request_id: Option<String>,
    },
}

/// Fields a client frame may carry.
const FIELDS: [&str; 7] = [
    "distribution",
    "channel",
    "packet_action",
    "publish_target",
    "consume_target",
    "message",
    "request_id",
];

impl ClientFrame {
    /// Reads a text frame; `in_exchange` is the only `publish_target` accepted.
    pub fn parse(text: &str, in_exchange: &str) -> Result<ClientFrame, FrameError> {
        let value: Value =
            serde_json::from_str(text).map_err(|_| FrameError::new("frame", "not JSON"))?;
        let Value::Object(object) = value else {
            return Err(FrameError::new("frame", "must be a JSON object"));
        };
        if let Some(unknown) = object.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(FrameError::new(unknown, "unknown field"));
        }
        let action = match object.get("packet_action") {
            None => return Err(FrameError::new("packet_action", "missing")),
            Some(Value::String(action)) => action.as_str(),
            Some(_) => {
                return Err(FrameError::new(
                    "packet_action",
                    "must be \"consume\" or \"publish\"",
                ));
            }
        };
        let feeds = feeds(&object)?;
        let request_id = match object.get("request_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(id)) if is_client_id(id) => Some(id.clone()),
            Some(_) => {
                return Err(FrameError::new(
                    "request_id",
                    "must be 1 to 128 of A-Z a-z 0-9 . _ @ -",
                ));
            }
        };
        match action {
            "consume" => {
                for field in ["message", "publish_target", "request_id", "distribution"] {
                    if object.get(field).is_some_and(|v| !v.is_null()) {
                        return Err(FrameError::new(field, "not allowed with consume"));
                    }
                }
                let targets = match object.get("consume_target") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Array(items)) => items
                        .iter()
                        .enumerate()
                        .map(|(i, item)| match item.as_str() {
                            Some(target) if is_client_id(target) => Ok(target.to_string()),
                            _ => Err(FrameError::new(
                                &format!("consume_target[{i}]"),
                                "not a subject (1 to 128 of A-Z a-z 0-9 . _ @ -)",
                            )),
                        })
                        .collect::<Result<_, _>>()?,
                    Some(_) => {
                        return Err(FrameError::new(
                            "consume_target",
                            "must be an array of subjects",
                        ));
                    }
                };
                Ok(ClientFrame::Consume { feeds, targets })
            }
            "publish" => {
                if object
                    .get("consume_target")
                    .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
                {
                    return Err(FrameError::new(
                        "consume_target",
                        "not allowed with publish",
                    ));
                }
                match object.get("publish_target") {
                    None | Some(Value::Null) => {}
                    Some(Value::String(target)) if target == in_exchange => {}
                    Some(_) => {
                        return Err(FrameError::new(
                            "publish_target",
                            &format!("must be the inbound exchange \"{in_exchange}\" or absent"),
                        ));
                    }
                }
                let message = match object.get("message") {
                    None | Some(Value::Null) => {
                        return Err(FrameError::new("message", "missing"));
                    }
                    Some(message) => message.clone(),
                };
                let distribution = match object.get("distribution") {
                    None | Some(Value::Null) => None,
                    Some(value) => Some(Distribution::parse(value, "distribution")?),
                };
                if request_id.is_some() && feeds.len() != 1 {
                    return Err(FrameError::new(
                        "channel",
                        "a request (request_id) goes to exactly one feed",
                    ));
                }
                Ok(ClientFrame::Publish {
                    feeds,
                    message,
                    distribution,
                    request_id,
                })
            }
            _ => Err(FrameError::new(
                "packet_action",
                "must be \"consume\" or \"publish\"",
            )),
        }
    }
}

/// The feeds set to `true` in `channel` (at least one).
fn feeds(object: &Map<String, Value>) -> Result<Vec<Feed>, FrameError> {
    let Some(channel) = object.get("channel") else {
        return Err(FrameError::new("channel", "missing"));
    };
    let Some(channel) = channel.as_object() else {
        return Err(FrameError::new(
            "channel",
            "must be an object such as {\"tickets\": true}",
        ));
    };
    let mut feeds = Vec::new();
    for (name, on) in channel {
        let at = format!("channel.{name}");
        let Some(feed) = Feed::parse(name) else {
            return Err(FrameError::new(&at, "unknown feed (voice, chat, tickets)"));
        };
        match on.as_bool() {
            Some(true) => feeds.push(feed),
            Some(false) => {}
            None => return Err(FrameError::new(&at, "must be true or false")),
        }
    }
    if feeds.is_empty() {
        return Err(FrameError::new("channel", "no feed is set to true"));
    }
    Ok(feeds)
}

/// The error frame for `error`, echoing the request id when the frame had one.
pub fn error_frame(error: &FrameError, request_id: Option<&str>) -> String {
    let mut frame = json!({"error": {"field": error.field, "reason": error.reason}});
    if let Some(id) = request_id {
        frame["request_id"] = json!(id);
    }
    frame.to_string()
}

/// The frame that tells a client a publish was confirmed by the broker.
pub fn published_frame(feed: Feed, correlation_id: &str) -> String {
    json!({"published": {"channel": feed.as_str(), "correlation_id": correlation_id}}).to_string()
}

/// The frame that tells a client its subscriptions.
pub fn subscribed_frame(feeds: &[Feed], targets: &[String]) -> String {
    let feeds: Vec<&str> = feeds.iter().map(|f| f.as_str()).collect();
    json!({"subscribed": {"channels": feeds, "consume_target": targets}}).to_string()
}

/// The one reply frame of a write-and-wait request.
pub fn reply_frame(feed: Feed, request_id: &str, message: Value) -> String {
    json!({"request_id": request_id, "channel": {feed.as_str(): true}, "message": message})
        .to_string()
}

/// A message delivered to the client from the outbound side.
pub fn delivery_frame(
    feed: &str,
    distribution: &Value,
    message: &Value,
    subject: Option<&str>,
) -> String {
    let mut frame = json!({
        "distribution": distribution,
        "channel": {feed: true},
        "message": message,
    });
    if let Some(subject) = subject {
        frame["subject"] = json!(subject);
    }
    frame.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> FrameError {
        match ClientFrame::parse(text, "gateway.in") {
            Err(error) => error,
            Ok(frame) => panic!("accepted {text}: {frame:?}"),
        }
    }

    #[test]
    fn the_poc_frame_is_accepted() {
        let frame = ClientFrame::parse(
            r#"{"distribution": {"broadcast": false, "multicast": ["312423dsa", "312423dsb"], "direct": ["312423dsa"]},
                "channel": {"voice": true, "chat": false, "tickets": false},
                "packet_action": "publish", "publish_target": "gateway.in",
                "consume_target": [], "message": {}}"#,
            "gateway.in",
        );
        let Ok(ClientFrame::Publish {
            feeds,
            distribution: Some(d),
            ..
        }) = frame
        else {
            panic!("{frame:?}");
        };
        assert_eq!(feeds, vec![Feed::Voice]);
        assert_eq!(d.recipients(), vec!["312423dsa", "312423dsb"]);
        let frame = ClientFrame::parse(
            r#"{"channel": {"chat": true, "tickets": true}, "packet_action": "consume", "consume_target": ["t-1"]}"#,
            "gateway.in",
        );
        assert_eq!(
            frame,
            Ok(ClientFrame::Consume {
                feeds: vec![Feed::Chat, Feed::Tickets],
                targets: vec!["t-1".into()]
            })
        );
    }

    #[test]
    fn every_mistake_names_its_field() {
        let cases = [
            ("nope", "frame"),
            ("[1]", "frame"),
            (r#"{"channel": {"voice": true}}"#, "packet_action"),
            (
                r#"{"channel": {"voice": true}, "packet_action": "eat"}"#,
                "packet_action",
            ),
            (r#"{"packet_action": "consume"}"#, "channel"),
            (
                r#"{"packet_action": "consume", "channel": {"video": true}}"#,
                "channel.video",
            ),
            (
                r#"{"packet_action": "consume", "channel": {"voice": 1}}"#,
                "channel.voice",
            ),
            (
                r#"{"packet_action": "consume", "channel": {"voice": false}}"#,
                "channel",
            ),
            (
                r#"{"packet_action": "publish", "channel": {"voice": true}}"#,
                "message",
            ),
            (
                r#"{"packet_action": "publish", "channel": {"voice": true}, "message": 1, "publish_target": "x"}"#,
                "publish_target",
            ),
            (
                r#"{"packet_action": "publish", "channel": {"voice": true}, "message": 1, "distribution": {"direct": ["a", "b"]}}"#,
                "distribution.direct",
            ),
            (
                r#"{"packet_action": "publish", "channel": {"voice": true}, "message": 1, "distribution": {"multicast": ["a b"]}}"#,
                "distribution.multicast[0]",
            ),
            (
                r#"{"packet_action": "publish", "channel": {"voice": true, "chat": true}, "message": 1, "request_id": "r"}"#,
                "channel",
            ),
            (
                r#"{"packet_action": "consume", "channel": {"voice": true}, "consume_target": [7]}"#,
                "consume_target[0]",
            ),
            (
                r#"{"packet_action": "consume", "channel": {"voice": true}, "extra": 1}"#,
                "extra",
            ),
        ];
        for (text, field) in cases {
            assert_eq!(refused(text).field, field, "{text}");
        }
        let frame = error_frame(&refused("nope"), Some("r-1"));
        let value: Value = serde_json::from_str(&frame).unwrap_or_default();
        assert_eq!(value["error"]["field"], "frame");
        assert_eq!(value["request_id"], "r-1");
    }
}
