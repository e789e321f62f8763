//! Parking: a message that cannot succeed, on a queue without a dead-letter exchange, is
//! copied to the listener's parking queue (`<queue>.parked`, `<listener>.parked` for an
//! anonymous queue) with the reason in its headers, and only then acked. Nothing is
//! dropped: if the copy cannot be made, the message goes back to its queue.
//!
//! The parking queue is durable and declared on first use on each channel. The copy keeps
//! the body and properties as they arrived, and adds `x-warren-parked-reason`,
//! `x-warren-parked-from` (the queue), `x-warren-original-exchange` and
//! `x-warren-original-routing-key`, so an operator can inspect it and shovel it back.

use std::sync::atomic::Ordering;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, LongString};
use warren_runtime::confirm::{PublishOptions, Published};

use super::shared::{GrantContext, ListenerShared};
use super::topology;

/// Longest reason kept in the header.
const MAX_REASON: usize = 512;

/// The message to park, as it arrived.
pub(crate) struct Message<'a> {
    pub data: Vec<u8>,
    pub properties: &'a BasicProperties,
    pub exchange: &'a str,
    pub routing_key: &'a str,
}

/// Copies `message` to the parking queue, through the publish connection of the broker it
/// came from, and waits for the broker to confirm it.
pub(crate) async fn park(
    shared: &ListenerShared,
    context: &GrantContext,
    message: Message<'_>,
    reason: &str,
) -> Result<(), String> {
    let settings = &shared.settings;
    if !context.parking_declared.load(Ordering::Relaxed) {
        topology::declare_parking(
            &context.channel,
            &settings.parking,
            settings.quorum,
            settings.operation_timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
        context.parking_declared.store(true, Ordering::Relaxed);
    }
    let queue = shared.topology.lock().queue_name.clone();
    let mut headers = message.properties.headers().clone().unwrap_or_default();
    let mut text = |key: &str, value: &str| {
        headers.insert(
            key.into(),
            AMQPValue::LongString(LongString::from(value.as_bytes().to_vec())),
        );
    };
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    text("x-warren-parked-reason", &reason[..end]);
    text("x-warren-parked-from", &queue);
    text("x-warren-original-exchange", message.exchange);
    text("x-warren-original-routing-key", message.routing_key);
    let properties = message
        .properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(2);
    let options = PublishOptions::new(settings.publish_timeout).mandatory();
    match context
        .publisher
        .publish_raw("", &settings.parking, message.data, properties, options)
        .await
    {
        Ok(Published::Routed) => Ok(()),
        Ok(Published::Returned(_)) => {
            // Deleted since it was declared on this channel: declare it again next time.
            context.parking_declared.store(false, Ordering::Relaxed);
            Err(format!(
                "the parking queue `{}` does not exist",
                settings.parking
            ))
        }
        Err(error) => Err(error.to_string()),
    }
}
