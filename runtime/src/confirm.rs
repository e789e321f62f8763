//! Publishing one envelope on a channel in confirm mode, and what came of it: routed,
//! returned (mandatory and unroutable), nacked, refused (the broker closed the channel),
//! or lost with the connection.
//!
//! Used by the node's [`Publisher`](crate::publisher::Publisher), through which every
//! publish of warren goes (handlers' replies, pool calls, parking), on publish connections.
//! The channel must be in confirm mode (`confirm_select`); on a channel without confirms a
//! publish counts as routed once written.
//!
//! Every AMQP short string a caller hands in (exchange, routing key, header keys) is
//! checked here before anything is written: longer than 255 bytes is
//! [`PublishError::Invalid`], never a panic (lapin's `ShortString::from` panics).
//!
//! This module owns the meaning of a publish result and of valid publish input; it does not
//! choose channels or brokers.

use std::time::Duration;

use lapin::message::BasicReturnMessage;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};

use crate::envelope::{Envelope, publish_properties};
use crate::trace::TraceContext;

/// How to publish one message.
#[derive(Clone, Debug)]
pub struct PublishOptions {
    /// Ask the broker to return the message if no queue is bound for it.
    pub mandatory: bool,
    /// Delivery mode 2: written to disk by durable queues.
    pub persistent: bool,
    /// Compress the body (content-encoding gzip).
    pub gzip: bool,
    /// Bound for the whole publish: the write, the broker's confirm and any retry.
    pub timeout: Duration,
    /// The trace the message belongs to: it carries a child span of this context in its
    /// `traceparent` header. `None`: the trace of the handler whose work this is (the
    /// task-local of [`crate::trace`]), else a new trace.
    pub trace: Option<TraceContext>,
    /// AMQP `expiration`: the broker drops the message once it has waited this long in a
    /// queue (an RPC request whose caller gave up). `None`: it never expires.
    pub expiration: Option<Duration>,
    /// The AMQP properties that tie a request to its reply (RPC targets). `None`: none.
    pub correlation: Option<Correlation>,
}

impl PublishOptions {
    pub fn new(timeout: Duration) -> Self {
        PublishOptions {
            mandatory: false,
            persistent: false,
            gzip: false,
            timeout,
            trace: None,
            expiration: None,
            correlation: None,
        }
    }

    /// The message carries `correlation`'s `message_id`, `correlation_id` and `reply_to`.
    pub fn correlation(mut self, correlation: Correlation) -> Self {
        self.correlation = Some(correlation);
        self
    }

    /// The message expires after waiting `ttl` in a queue (AMQP `expiration`, whole
    /// milliseconds, at least 1).
    pub fn expiration(mut self, ttl: Duration) -> Self {
        self.expiration = Some(ttl);
        self
    }

    pub fn mandatory(mut self) -> Self {
        self.mandatory = true;
        self
    }

    pub fn persistent(mut self) -> Self {
        self.persistent = true;
        self
    }

    pub fn gzip(mut self) -> Self {
        self.gzip = true;
        self
    }

    /// The message belongs to `trace` (see [`PublishOptions::trace`]).
    pub fn trace(mut self, trace: TraceContext) -> Self {
        self.trace = Some(trace);
        self
    }

    /// The body and AMQP properties of `envelope` under these options (the
    /// `traceparent` header is the publisher's to add, see [`crate::trace::outgoing`]).
    pub fn encode(&self, envelope: &Envelope) -> (Vec<u8>, BasicProperties) {
        let body = if self.gzip {
            envelope.encode_gzip()
        } else {
            envelope.encode()
        };
        let mut properties = publish_properties(self.gzip);
        if self.persistent {
            properties = properties.with_delivery_mode(2);
        }
        if let Some(ttl) = self.expiration {
            let millis = ttl.as_millis().max(1);
            properties = properties.with_expiration(ShortString::from(millis.to_string()));
        }
        (body, properties)
    }
}

/// The AMQP properties that tie a request to its reply: `message_id`, `correlation_id`
/// and `reply_to` (RPC targets; kapi requests carry the same in their body instead).
///
/// It exists so that peers that read only AMQP properties (oslo.messaging-style clients,
/// a plain pika program) can correlate replies without parsing the body. Each value is
/// an AMQP short string: longer than 255 bytes is [`PublishError::Invalid`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Correlation {
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
}

impl Correlation {
    /// `properties` with these values set (those that are `Some`).
    pub fn apply(&self, mut properties: BasicProperties) -> Result<BasicProperties, PublishError> {
        if let Some(id) = &self.message_id {
            properties = properties.with_message_id(short_string("the message_id", id)?);
        }
        if let Some(id) = &self.correlation_id {
            properties = properties.with_correlation_id(short_string("the correlation_id", id)?);
        }
        if let Some(queue) = &self.reply_to {
            properties = properties.with_reply_to(short_string("the reply_to", queue)?);
        }
        Ok(properties)
    }
}

/// A mandatory message the broker could not route and sent back.
#[derive(Clone, Debug)]
pub struct Returned {
    pub reply_code: u16,
    pub reply_text: String,
    pub exchange: String,
    pub routing_key: String,
    /// The returned body, if it still decodes as an envelope.
    pub envelope: Option<Envelope>,
}

/// What the broker did with a published message.
#[derive(Clone, Debug)]
pub enum Published {
    /// Accepted (and routed, if mandatory).
    Routed,
    /// Mandatory and unroutable: returned.
    Returned(Returned),
}

/// A publish that did not reach the broker, or that the broker refused.
#[derive(Clone, Debug, thiserror::Error)]
pub enum PublishError {
    /// The channel or its connection failed before the broker confirmed; the message may
    /// or may not have arrived.
    #[error("the channel failed before the broker confirmed: {0}")]
    Channel(String),
    /// The broker closed the channel over this publish (e.g. 404: no such exchange).
    #[error("the broker refused the publish: {0}")]
    Refused(String),
    #[error("the broker refused the message (basic.nack)")]
    Nacked,
    #[error("no confirm from the broker within {0:?}")]
    Timeout(Duration),
    /// The broker blocked publishing (a resource alarm) for the whole timeout.
    #[error("the broker blocks publishing ({reason}); gave up after {waited:?}")]
    Blocked { reason: String, waited: Duration },
    #[error("the request has no Server-ID to reply to")]
    NoServerId,
    #[error("no broker of the local zone was available within {0:?}")]
    NoBroker(Duration),
    /// The one broker this publish must go to had no publish connection for the whole
    /// timeout (see `Publisher::to_broker`).
    #[error("broker {broker} had no publish connection within {waited:?}")]
    BrokerUnavailable { broker: String, waited: Duration },
    /// The publish cannot be expressed in AMQP (e.g. a routing key over 255 bytes); nothing
    /// was written. The message names the field and its length, never its value.
    #[error("invalid publish: {0}")]
    Invalid(String),
}

impl PublishError {
    /// Whether the publish may succeed on another channel (its connection died).
    pub fn is_retryable(&self) -> bool {
        matches!(self, PublishError::Channel(_))
    }

    /// Whether the broker refused the publish because its exchange does not exist (404
    /// `NOT_FOUND`, the only 404 a publish can meet).
    pub fn is_no_exchange(&self) -> bool {
        matches!(self, PublishError::Refused(text) if text.contains("NOT_FOUND"))
    }
}

/// Longest AMQP short string, in bytes.
const SHORT_STRING_MAX: usize = 255;

/// `value` as an AMQP short string, or `Invalid` naming `what` and the length (not the
/// value) when it is longer than 255 bytes.
pub fn short_string(what: &str, value: &str) -> Result<ShortString, PublishError> {
    ShortString::try_new(value).map_err(|_| {
        PublishError::Invalid(format!(
            "{what} is {} bytes long; AMQP allows at most {SHORT_STRING_MAX}",
            value.len()
        ))
    })
}

/// The exchange and routing key of a publish as AMQP short strings, or `Invalid`.
pub fn address(
    exchange: &str,
    routing_key: &str,
) -> Result<(ShortString, ShortString), PublishError> {
    Ok((
        short_string("the exchange name", exchange)?,
        short_string("the routing key", routing_key)?,
    ))
}

/// An AMQP header table from `(key, value)` pairs, or `Invalid` if a key is longer than
/// 255 bytes. Use it instead of building a `FieldTable` with `ShortString::from`, which
/// panics on such a key.
pub fn headers<'a>(
    pairs: impl IntoIterator<Item = (&'a str, AMQPValue)>,
) -> Result<FieldTable, PublishError> {
    let mut table = FieldTable::default();
    for (key, value) in pairs {
        table.insert(short_string("a header key", key)?, value);
    }
    Ok(table)
}

/// Writes one message on `channel` and returns once it is written (handed to the
/// connection), with the confirm to wait for; see [`confirmation`].
pub async fn write(
    channel: &Channel,
    exchange: ShortString,
    routing_key: ShortString,
    body: &[u8],
    properties: BasicProperties,
    mandatory: bool,
) -> Result<PublisherConfirm, PublishError> {
    channel
        .basic_publish(
            exchange,
            routing_key,
            BasicPublishOptions {
                mandatory,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await
        .map_err(classify)
}

/// What the broker answered to a written message, however long that takes; callers bound
/// it.
pub async fn confirmation(confirm: PublisherConfirm) -> Result<Published, PublishError> {
    match confirm.await.map_err(classify)? {
        Confirmation::Nack(_) => Err(PublishError::Nacked),
        Confirmation::Ack(Some(message)) => Ok(Published::Returned(returned(&message))),
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(Published::Routed),
    }
}

/// A returned message as warren reports it.
fn returned(message: &BasicReturnMessage) -> Returned {
    let properties = &message.delivery.properties;
    let envelope = Envelope::decode(
        &message.delivery.data,
        properties.content_type().as_ref().map(|s| s.as_str()),
        properties.content_encoding().as_ref().map(|s| s.as_str()),
    )
    .ok();
    Returned {
        reply_code: message.reply_code,
        reply_text: message.reply_text.to_string(),
        exchange: message.delivery.exchange.to_string(),
        routing_key: message.delivery.routing_key.to_string(),
        envelope,
    }
}

/// A channel-level AMQP error means the broker refused this publish; anything else means
/// the channel or connection is gone.
fn classify(error: lapin::Error) -> PublishError {
    if error.is_amqp_soft_error() {
        PublishError::Refused(error.to_string())
    } else {
        PublishError::Channel(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_strings_up_to_255_bytes_pass() {
        let longest = "k".repeat(255);
        let (exchange, routing_key) = address("", &longest).expect("255 bytes is fine");
        assert_eq!(exchange.as_str(), "");
        assert_eq!(routing_key.as_str().len(), 255);
        // Length is in bytes: 127 two-byte characters are 254 bytes.
        assert!(short_string("x", &"é".repeat(127)).is_ok());
    }

    #[test]
    fn a_long_exchange_or_routing_key_is_invalid_without_echoing_it() {
        let secret = format!("secret-{}", "x".repeat(300));
        for (exchange, routing_key, field) in [
            (secret.as_str(), "rk", "exchange"),
            ("ex", secret.as_str(), "routing key"),
        ] {
            match address(exchange, routing_key) {
                Err(PublishError::Invalid(message)) => {
                    assert!(message.contains(field), "{message}");
                    assert!(message.contains(&secret.len().to_string()), "{message}");
                    assert!(!message.contains("secret"), "the value leaked: {message}");
                }
                other => panic!("expected Invalid, got {other:?}"),
            }
        }
        // 128 two-byte characters are 256 bytes: over the limit although 128 chars.
        assert!(matches!(
            short_string("the routing key", &"é".repeat(128)),
            Err(PublishError::Invalid(_))
        ));
    }

    #[test]
    fn a_long_header_key_is_invalid() {
        let table = headers([("ok", AMQPValue::Boolean(true))]).expect("a short key");
        assert_eq!(table.inner().len(), 1);
        let long = "h".repeat(256);
        match headers([
            ("ok", AMQPValue::Boolean(true)),
            (long.as_str(), AMQPValue::Void),
        ]) {
            Err(PublishError::Invalid(message)) => {
                assert!(message.contains("header key"), "{message}");
                assert!(!message.contains(&long), "{message}");
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
        assert!(!PublishError::Invalid(String::new()).is_retryable());
    }
}
