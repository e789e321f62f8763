//! What warren sends and receives over AMQP 1.0: a body of bytes and the few properties
//! RPC and notifications use, turned into and read from fe2o3-amqp's messages.
//!
//! Owns [`Outgoing`] and [`Incoming`] and their mapping onto AMQP 1.0 sections (one
//! `data` section for the body, so that RabbitMQ hands AMQP 0-9-1 peers the same bytes;
//! `properties`; the `header`'s `ttl` and `durable`). Must not touch: links, connections.

use std::time::Duration;

use fe2o3_amqp::types::messaging::{
    Body, Data, Header, Message, MessageId, Properties, message::Builder,
};
use fe2o3_amqp::types::primitives::{Binary, Value};

/// Content type of every body warren sends.
const JSON: &str = "application/json";

/// A message to send: the body and the properties a request, reply or notification sets.
///
/// It exists so that callers above the transport never build AMQP 1.0 sections
/// themselves: the same few fields as the AMQP 0-9-1 side's `PublishOptions`.
#[derive(Clone, Debug, Default)]
pub struct Outgoing {
    /// The body (warren's JSON envelopes), sent as one `data` section.
    pub body: Vec<u8>,
    /// `properties.message-id`.
    pub message_id: Option<String>,
    /// `properties.correlation-id`: a reply's request id.
    pub correlation_id: Option<String>,
    /// `properties.reply-to`: where the answer goes.
    pub reply_to: Option<String>,
    /// `properties.to`: the address the message is sent to.
    pub to: Option<String>,
    /// `properties.subject`: a request's method, a notification's event type.
    pub subject: Option<String>,
    /// `header.ttl`: how long the message may wait for a receiver.
    pub ttl: Option<Duration>,
    /// `header.durable`: kept across an intermediary's restart.
    pub durable: bool,
}

impl Outgoing {
    /// A message with `body` and no properties set yet.
    pub fn new(body: Vec<u8>) -> Self {
        Outgoing {
            body,
            ..Outgoing::default()
        }
    }

    /// The fe2o3-amqp message.
    pub(crate) fn into_message(self) -> Message<Data> {
        let header = (self.ttl.is_some() || self.durable).then(|| Header {
            durable: self.durable,
            ttl: self
                .ttl
                .map(|ttl| u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX)),
            ..Header::default()
        });
        let properties = Properties {
            message_id: self.message_id.map(MessageId::String),
            correlation_id: self.correlation_id.map(MessageId::String),
            reply_to: self.reply_to,
            to: self.to,
            subject: self.subject,
            content_type: Some(JSON.into()),
            ..Properties::default()
        };
        let builder: Builder<Data> = Message::builder()
            .properties(properties)
            .data(Binary::from(self.body));
        match header {
            Some(header) => builder.header(header).build(),
            None => builder.build(),
        }
    }
}

/// A message received: its body as bytes and the properties warren reads.
///
/// It exists so that handlers read one plain value whatever body section the peer chose
/// (`data`, or an `amqp-value` holding a string or binary, as some clients send).
#[derive(Clone, Debug, Default)]
pub struct Incoming {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub to: Option<String>,
    pub subject: Option<String>,
    /// Delivered before and given back, as far as the intermediary says (`header.
    /// delivery-count` above 0; RabbitMQ 3.x leaves it at 0).
    pub redelivered: bool,
}

impl Incoming {
    /// Reads `message`; `None` when its body is neither bytes nor a string (an AMQP map
    /// or list, which warren's envelopes never are).
    pub(crate) fn from_message(message: Message<Body<Value>>) -> Option<Incoming> {
        let body = match message.body {
            Body::Data(sections) => sections.into_iter().flat_map(|d| d.0.into_vec()).collect(),
            Body::Value(value) => match value.0 {
                Value::String(text) => text.into_bytes(),
                Value::Binary(bytes) => bytes.into_vec(),
                _ => return None,
            },
            Body::Empty => Vec::new(),
            Body::Sequence(_) => return None,
        };
        let redelivered = message
            .header
            .as_ref()
            .is_some_and(|h| h.delivery_count > 0);
        let properties = message.properties.unwrap_or_default();
        Some(Incoming {
            body,
            message_id: properties.message_id.map(id_text),
            correlation_id: properties.correlation_id.map(id_text),
            reply_to: properties.reply_to,
            to: properties.to,
            subject: properties.subject,
            redelivered,
        })
    }
}

/// A message id as text (ids of other types, from other peers, in their usual form).
fn id_text(id: MessageId) -> String {
    match id {
        MessageId::String(text) => text,
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(uuid) => format!("{uuid:?}"),
        MessageId::Binary(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use fe2o3_amqp::types::messaging::AmqpValue;

    use super::*;

    #[test]
    fn an_outgoing_message_carries_its_fields_and_comes_back_the_same() {
        let mut outgoing = Outgoing::new(b"{\"a\":1}".to_vec());
        outgoing.message_id = Some("m-1".into());
        outgoing.reply_to = Some("/queue/reply.n1".into());
        outgoing.ttl = Some(Duration::from_millis(1500));
        let message = outgoing.into_message();
        assert_eq!(message.header.as_ref().and_then(|h| h.ttl), Some(1500));
        // The same message as a receiver reads it.
        let received = Message {
            header: message.header,
            delivery_annotations: None,
            message_annotations: None,
            properties: message.properties,
            application_properties: None,
            body: Body::Data(vec![message.body].into()),
            footer: None,
        };
        let incoming = Incoming::from_message(received).unwrap();
        assert_eq!(incoming.body, b"{\"a\":1}");
        assert_eq!(incoming.message_id.as_deref(), Some("m-1"));
        assert_eq!(incoming.reply_to.as_deref(), Some("/queue/reply.n1"));
        assert!(!incoming.redelivered);
    }

    #[test]
    fn string_and_binary_values_are_read_as_bodies() {
        let message = |body| Message::builder().body(body).build();
        let text = message(Body::Value(AmqpValue(Value::String("hi".into()))));
        assert_eq!(Incoming::from_message(text).unwrap().body, b"hi");
        let map = message(Body::Value(AmqpValue(Value::Ulong(3))));
        assert!(Incoming::from_message(map).is_none());
    }
}
