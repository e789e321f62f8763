//! The inbound side: a client's `publish` frame becomes a persistent, confirmed message on
//! `in_exchange` (routing key = the feed, queue `IN_<FEED>`) carrying the client's id and
//! a correlation id; a frame with a `request_id` becomes a warren RPC call (write and
//! wait) whose one answer is the one reply frame.
//!
//! Owns the messages back-ends receive. Must not touch the socket (it returns frames).

use serde_json::{Value, json};
use warren_listeners::prelude::*;

use crate::distributor::CATEGORY;
use crate::feed::Feed;
use crate::frame::{Distribution, FrameError, error_frame, published_frame, reply_frame};
use crate::gateway::Gateway;

/// Event-Name of a client's message on `IN_<FEED>`.
pub const IN: &str = "in";
/// The RPC method a write-and-wait request calls on the feed's topic (`IN_<FEED>`).
pub const REQUEST: &str = "request";

/// Publishes `message` of client `id` to `feed`'s inbound queue; the frame to answer with
/// (published, or an error naming why).
pub async fn publish(
    gateway: &Gateway,
    id: &str,
    feed: Feed,
    message: &Value,
    distribution: Option<&Distribution>,
) -> String {
    let mut envelope = Envelope::new(CATEGORY, IN)
        .with("client_id", id)
        .with("channel", feed.as_str())
        .with("message", message.clone());
    if let Some(distribution) = distribution {
        envelope.set("distribution", distribution.to_json());
    }
    let correlation_id = envelope.ensure_msg_id().to_string();
    envelope.set("correlation_id", correlation_id.clone());
    let config = gateway.config();
    let options = PublishOptions::new(config.request_timeout)
        .persistent()
        .mandatory();
    let published = gateway
        .publisher()
        .publish(&config.in_exchange, feed.as_str(), envelope, options)
        .await;
    match published {
        Ok(Published::Routed) => published_frame(feed, &correlation_id),
        Ok(Published::Returned(_)) => error_frame(
            &FrameError::new(
                "channel",
                &format!(
                    "no back-end queue takes feed {feed} ({})",
                    feed.in_queue(&config.queue_prefix)
                ),
            ),
            None,
        ),
        Err(error) => error_frame(
            &FrameError::new("message", &format!("not published: {error}")),
            None,
        ),
    }
}

/// Sends request `request_id` of client `id` to one back-end of `feed` and waits; the one
/// frame to answer with: the reply, or an error frame carrying the request id.
pub async fn request(
    gateway: &Gateway,
    id: &str,
    feed: Feed,
    request_id: &str,
    message: &Value,
) -> String {
    let config = gateway.config();
    let target = Target::new(feed.rpc_topic()).exchange(&config.in_exchange);
    let args = json!({"client_id": id, "request_id": request_id, "message": message});
    let answer = gateway
        .ctx()
        .pool
        .call_target(&target, REQUEST, args, config.request_timeout)
        .await;
    let reason = match answer {
        Ok(reply) => return reply_frame(feed, request_id, reply),
        Err(RpcError::Timeout(after)) => {
            format!("timeout: no reply within {} ms", after.as_millis())
        }
        Err(RpcError::Returned(_)) => format!("no back-end serves requests of feed {feed}"),
        Err(RpcError::Remote(error)) => {
            format!("the back-end failed: {}: {}", error.kind, error.message)
        }
        Err(error) => format!("not sent: {error}"),
    };
    error_frame(&FrameError::new("request_id", &reason), Some(request_id))
}
