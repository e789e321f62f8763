//! Push events: what a chat server reports (presence, chat and groupchat messages), read
//! from JSON or built in Rust, checked, and turned into MongooseIM's wire form: exchange,
//! routing key and body.
//!
//! JIDs are parsed and normalised with the `jid` crate (RFC 7622 stringprep: node and
//! domain lowercased, resource kept), as MongooseIM's `jid:to_lower` does. The routing key
//! is the lowercased bare JID (presence) or `<bare jid>.<topic>` (messages); bodies carry
//! MongooseIM's fields only (never the input's `type`), compact JSON, in the order its
//! source writes them.
//!
//! Owns reading, checking and encoding one event. Must not touch publishing (`lanes`) or
//! HTTP (`http`).

use jid::Jid;
use serde_json::{Map, Value};
use warren_listeners::prelude::EventPusherConfig;

/// The five kinds of push event, by their `type` in `POST /events`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Presence,
    ChatSent,
    ChatRecv,
    GroupchatSent,
    GroupchatRecv,
}

impl Kind {
    /// The `type` of the event in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Presence => "presence",
            Kind::ChatSent => "chat_sent",
            Kind::ChatRecv => "chat_recv",
            Kind::GroupchatSent => "groupchat_sent",
            Kind::GroupchatRecv => "groupchat_recv",
        }
    }

    fn parse(text: &str) -> Option<Kind> {
        [
            Kind::Presence,
            Kind::ChatSent,
            Kind::ChatRecv,
            Kind::GroupchatSent,
            Kind::GroupchatRecv,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == text)
    }
}

/// One chat-server happening to publish: a user's presence changed, or a chat or
/// groupchat message was sent or received.
///
/// It exists so that the Rust API and `POST /events` share one checked form: JIDs are
/// valid, and the user whose order it keeps (its **subject**) is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushEvent {
    /// `{"user_id": …, "present": …}` on the presence exchange, key `<bare jid>`.
    Presence {
        /// The JID as the caller wrote it (MongooseIM sends it so, not lowercased).
        user_id: String,
        user: Jid,
        present: bool,
    },
    /// `{"to_user_id": …, "message": …, "from_user_id": …}` on the chat or groupchat
    /// exchange; the key is the sender's (sent) or the receiver's (recv) bare JID and topic.
    Message {
        kind: Kind,
        from: Jid,
        to: Jid,
        message: String,
    },
}

/// Why an event was refused: the field and what is wrong with it (never its value: a
/// message body is not logged).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {problem}")]
pub struct EventError {
    pub field: &'static str,
    pub problem: String,
}

impl EventError {
    fn new(field: &'static str, problem: impl Into<String>) -> Self {
        EventError {
            field,
            problem: problem.into(),
        }
    }
}

/// An event in MongooseIM's wire form, ready to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    /// The lowercased bare JID whose order this event keeps (the lane key).
    pub subject: String,
}

/// A JID from `text`, or why not.
pub fn parse_jid(field: &'static str, text: &str) -> Result<Jid, EventError> {
    Jid::new(text).map_err(|error| EventError::new(field, format!("not a valid JID ({error})")))
}

impl PushEvent {
    /// A presence change of `user_id`.
    pub fn presence(user_id: &str, present: bool) -> Result<PushEvent, EventError> {
        let user = parse_jid("user_id", user_id)?;
        Ok(PushEvent::Presence {
            user_id: user_id.to_string(),
            user,
            present,
        })
    }

    /// A chat or groupchat message of `kind` (not `Presence`).
    pub fn message(
        kind: Kind,
        from_user_id: &str,
        to_user_id: &str,
        message: &str,
    ) -> Result<PushEvent, EventError> {
        if kind == Kind::Presence {
            return Err(EventError::new("type", "presence is not a message"));
        }
        Ok(PushEvent::Message {
            kind,
            from: parse_jid("from_user_id", from_user_id)?,
            to: parse_jid("to_user_id", to_user_id)?,
            message: message.to_string(),
        })
    }

    /// An event from its JSON form: MongooseIM's body plus `type`.
    pub fn from_json(value: &Value) -> Result<PushEvent, EventError> {
        let Some(object) = value.as_object() else {
            return Err(EventError::new("event", "not a JSON object"));
        };
        let kind_text = string(object, "type")?;
        let Some(kind) = Kind::parse(kind_text) else {
            return Err(EventError::new(
                "type",
                "unknown type (presence, chat_sent, chat_recv, groupchat_sent, groupchat_recv)",
            ));
        };
        let allowed: &[&str] = match kind {
            Kind::Presence => &["type", "user_id", "present"],
            _ => &["type", "from_user_id", "to_user_id", "message"],
        };
        if let Some(extra) = object.keys().find(|k| !allowed.contains(&k.as_str())) {
            // Named by position only when it is one of ours; an unknown key is echoed
            // (keys are not message content).
            let shown: String = extra.chars().take(64).collect();
            return Err(EventError::new(
                "event",
                format!("unknown field `{shown}` for type {}", kind.as_str()),
            ));
        }
        match kind {
            Kind::Presence => {
                let present = match object.get("present") {
                    None => return Err(EventError::new("present", "missing")),
                    Some(Value::Bool(present)) => *present,
                    Some(_) => {
                        return Err(EventError::new("present", "wrong type: expected a boolean"));
                    }
                };
                PushEvent::presence(string(object, "user_id")?, present)
            }
            _ => PushEvent::message(
                kind,
                string(object, "from_user_id")?,
                string(object, "to_user_id")?,
                string(object, "message")?,
            ),
        }
    }

    /// The kind of event.
    pub fn kind(&self) -> Kind {
        match self {
            PushEvent::Presence { .. } => Kind::Presence,
            PushEvent::Message { kind, .. } => *kind,
        }
    }

    /// Exchange, routing key, body and subject under `config`, or why the event cannot be
    /// published (a routing key over AMQP's 255 bytes).
    pub fn encode(&self, config: &EventPusherConfig) -> Result<Outgoing, EventError> {
        let (exchange, subject, field, topic, body) = match self {
            PushEvent::Presence {
                user_id,
                user,
                present,
            } => {
                let body = serde_json::to_vec(&PresenceBody {
                    user_id,
                    present: *present,
                });
                let subject = user.to_bare().to_string();
                (
                    &config.presence_exchange.name,
                    subject,
                    "user_id",
                    None,
                    body,
                )
            }
            PushEvent::Message {
                kind,
                from,
                to,
                message,
            } => {
                let exchange = match kind {
                    Kind::ChatSent | Kind::ChatRecv => &config.chat_msg_exchange,
                    _ => &config.groupchat_msg_exchange,
                };
                let (field, subject, topic) = match kind {
                    Kind::ChatSent | Kind::GroupchatSent => {
                        ("from_user_id", from, &exchange.sent_topic)
                    }
                    _ => ("to_user_id", to, &exchange.recv_topic),
                };
                let body = serde_json::to_vec(&MessageBody {
                    to_user_id: to.as_str(),
                    message,
                    from_user_id: from.as_str(),
                });
                let subject = subject.to_bare().to_string();
                (&exchange.name, subject, field, Some(topic), body)
            }
        };
        let routing_key = match topic {
            Some(topic) => format!("{subject}.{topic}"),
            None => subject.clone(),
        };
        if routing_key.len() > 255 {
            return Err(EventError::new(
                field,
                format!(
                    "the routing key would be {} bytes, AMQP allows 255",
                    routing_key.len()
                ),
            ));
        }
        // Serialising strings and booleans cannot fail.
        let body = body.unwrap_or_default();
        Ok(Outgoing {
            exchange: exchange.clone(),
            routing_key,
            body,
            subject,
        })
    }
}

/// MongooseIM's presence body, fields in the order its source writes them.
#[derive(serde::Serialize)]
struct PresenceBody<'a> {
    user_id: &'a str,
    present: bool,
}

/// MongooseIM's chat and groupchat body, fields in the order its source writes them.
#[derive(serde::Serialize)]
struct MessageBody<'a> {
    to_user_id: &'a str,
    message: &'a str,
    from_user_id: &'a str,
}

/// The string field `name` of `object`, or why not.
fn string<'a>(object: &'a Map<String, Value>, name: &'static str) -> Result<&'a str, EventError> {
    match object.get(name) {
        None => Err(EventError::new(name, "missing")),
        Some(Value::String(text)) => Ok(text),
        Some(_) => Err(EventError::new(name, "wrong type: expected a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn encode(value: Value) -> Outgoing {
        PushEvent::from_json(&value)
            .expect("valid")
            .encode(&EventPusherConfig::default())
            .expect("encodes")
    }

    #[test]
    fn presence_goes_to_the_bare_jid_with_mongooseims_body() {
        let out =
            encode(json!({"type": "presence", "user_id": "Alice@LocalHost/Res1", "present": true}));
        assert_eq!(out.exchange, "presence");
        assert_eq!(out.routing_key, "alice@localhost");
        assert_eq!(
            String::from_utf8_lossy(&out.body),
            r#"{"user_id":"Alice@LocalHost/Res1","present":true}"#
        );
    }

    #[test]
    fn messages_go_to_the_subjects_bare_jid_and_topic() {
        let sent = encode(
            json!({"type": "chat_sent", "from_user_id": "alice@localhost/res1",
            "to_user_id": "bob@localhost/res1", "message": "Hello, Bob"}),
        );
        assert_eq!(
            (sent.exchange.as_str(), sent.routing_key.as_str()),
            ("chat_msg", "alice@localhost.chat_msg_sent")
        );
        assert_eq!(
            String::from_utf8_lossy(&sent.body),
            r#"{"to_user_id":"bob@localhost/res1","message":"Hello, Bob","from_user_id":"alice@localhost/res1"}"#
        );
        let recv = encode(
            json!({"type": "groupchat_recv", "from_user_id": "room@muc.localhost/alice",
            "to_user_id": "Bob@localhost/res1", "message": "hi"}),
        );
        assert_eq!(
            (
                recv.exchange.as_str(),
                recv.routing_key.as_str(),
                recv.subject.as_str()
            ),
            (
                "groupchat_msg",
                "bob@localhost.groupchat_msg_recv",
                "bob@localhost"
            )
        );
    }

    #[test]
    fn bad_input_names_the_field() {
        let field = |value: Value| PushEvent::from_json(&value).expect_err("refused").field;
        assert_eq!(
            field(json!({"type": "presence", "present": true})),
            "user_id"
        );
        assert_eq!(
            field(json!({"type": "presence", "user_id": "a@b", "present": "yes"})),
            "present"
        );
        assert_eq!(
            field(json!({"type": "presence", "user_id": "@b", "present": true})),
            "user_id"
        );
        assert_eq!(field(json!({"type": "shout", "user_id": "a@b"})), "type");
        assert_eq!(field(json!({"type": 3})), "type");
        assert_eq!(field(json!([1])), "event");
        assert_eq!(
            field(
                json!({"type": "chat_sent", "from_user_id": "a@b", "to_user_id": "b@b", "message": 1})
            ),
            "message"
        );
    }
}
