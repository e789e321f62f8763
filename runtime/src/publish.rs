//! Publishing one envelope on a channel in confirm mode, and what came of it: routed,
//! returned (mandatory and unroutable), nacked, or no answer within the deadline.
//!
//! Used by listeners (replies and publishes from handlers on the listener's channel) and
//! by pool workers. The channel must already be in confirm mode (`confirm_select`); on a
//! channel without confirms a publish counts as routed once written. This module owns the
//! meaning of a publish result; it does not choose channels or brokers.

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{Channel, Confirmation};

use crate::envelope::{Envelope, publish_properties};

/// How to publish one message.
#[derive(Clone, Copy, Debug)]
pub struct PublishOptions {
    /// Ask the broker to return the message if no queue is bound for it.
    pub mandatory: bool,
    /// Delivery mode 2: written to disk by durable queues.
    pub persistent: bool,
    /// Compress the body (content-encoding gzip).
    pub gzip: bool,
    /// Bound for the write and the broker's confirm together.
    pub timeout: Duration,
}

impl PublishOptions {
    pub fn new(timeout: Duration) -> Self {
        PublishOptions {
            mandatory: false,
            persistent: false,
            gzip: false,
            timeout,
        }
    }

    pub fn mandatory(mut self) -> Self {
        self.mandatory = true;
        self
    }

    pub fn persistent(mut self) -> Self {
        self.persistent = true;
        self
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
    #[error("the channel failed: {0}")]
    Channel(String),
    #[error("the broker refused the message (basic.nack)")]
    Nacked,
    #[error("no confirm from the broker within {0:?}")]
    Timeout(Duration),
    #[error("the request has no Server-ID to reply to")]
    NoServerId,
    #[error("no broker is available to publish to")]
    NoBroker,
}

/// Publishes `envelope` and waits (up to `options.timeout`) for the broker's confirm.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    envelope: &Envelope,
    options: &PublishOptions,
) -> Result<Published, PublishError> {
    let body = if options.gzip {
        envelope.encode_gzip()
    } else {
        envelope.encode()
    };
    let mut properties = publish_properties(options.gzip);
    if options.persistent {
        properties = properties.with_delivery_mode(2);
    }
    let publish = async {
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: options.mandatory,
                    ..BasicPublishOptions::default()
                },
                &body,
                properties,
            )
            .await
            .map_err(|e| PublishError::Channel(e.to_string()))?;
        confirm
            .await
            .map_err(|e| PublishError::Channel(e.to_string()))
    };
    match tokio::time::timeout(options.timeout, publish).await {
        Err(_) => Err(PublishError::Timeout(options.timeout)),
        Ok(Err(error)) => Err(error),
        Ok(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
        Ok(Ok(Confirmation::Ack(Some(message)))) => Ok(Published::Returned(Returned {
            reply_code: message.reply_code,
            reply_text: message.reply_text.to_string(),
            exchange: message.delivery.exchange.to_string(),
            routing_key: message.delivery.routing_key.to_string(),
            envelope: Envelope::decode(
                &message.delivery.data,
                message
                    .delivery
                    .properties
                    .content_type()
                    .as_ref()
                    .map(|s| s.as_str()),
                message
                    .delivery
                    .properties
                    .content_encoding()
                    .as_ref()
                    .map(|s| s.as_str()),
            )
            .ok(),
        })),
        Ok(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => Ok(Published::Routed),
    }
}
