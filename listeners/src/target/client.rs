//! The client side of RPC targets: calls through the pool, casts through a pool checkout
//! (and the pool's check-out-cast-check-in wrappers).
//!
//! A call publishes its request (mandatory, confirmed) to where its [`Target`] routes, with
//! `message_id` = its `Msg-ID`, `reply_to` = the pool's reply queue and `expiration` = the
//! timeout, and waits for the reply on that queue (which the server publishes to through
//! the default exchange), correlated by `Msg-ID`; the pool's reply queue does the waiting,
//! so a call ends with its reply, `Returned`, a publish error or `Timeout`, never later
//! than its timeout, and takes no worker. A reply that comes after that is dropped and
//! counted (`warren_pool_late_replies`).
//!
//! With `[rpc] transport = "amqp10"` every one of these goes over the node's AMQP 1.0
//! transport instead (see `amqp10`); the pool's wrappers then take no worker either.
//!
//! Owns: turning targets, methods and arguments into requests and replies into results.
//! Must not touch: the pool's waiting and correlation (`pool::replies`), the server.

use std::time::Duration;

use serde_json::Value;
use warren_runtime::confirm::{Correlation, PublishOptions, Published};

use lapin::ExchangeKind;
use warren_runtime::publisher::Publisher;

use super::address::{Route, Target, TargetError};
use super::{amqp10, wire};
use crate::pool::{Checkout, ListenerPool, RpcError};

impl Checkout {
    /// [`ListenerPool::call_target`] of the checkout's pool: a call takes no worker (its
    /// reply comes to the pool's reply queue), so the checked-out one stays free.
    pub async fn call_target(
        &mut self,
        target: &Target,
        method: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, RpcError> {
        self.pool().call_target(target, method, args, timeout).await
    }

    /// Sends `method` to `target` without waiting for a result (fire and forget, but
    /// confirmed: `Ok` once the broker took it and a queue was bound for it, `Returned`
    /// when none was). No reply is asked for. A fanout target reaches every server.
    /// `timeout` bounds the publish; the request does not expire.
    pub async fn cast_target(
        &mut self,
        target: &Target,
        method: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<(), RpcError> {
        let node = self.node();
        if let Some(transport) = &node.amqp10 {
            return amqp10::cast(transport, node, target, method, args, timeout).await;
        }
        let route = target.route(&node.rpc)?;
        let mut request = wire::request(method, args)
            .map_err(|_| TargetError::ArgsNotObject(method.to_string()))?;
        let correlation = Correlation {
            message_id: Some(request.ensure_msg_id().to_string()),
            ..Correlation::default()
        };
        let options = PublishOptions::new(timeout)
            .mandatory()
            .trace(warren_runtime::trace::for_call())
            .correlation(correlation);
        declare_route(self.publisher(), &route, target.fanout, timeout).await?;
        let published = self
            .publisher()
            .publish(&route.exchange, &route.routing_key, request, options)
            .await;
        match published {
            Ok(Published::Routed) => Ok(()),
            Ok(Published::Returned(returned)) => Err(RpcError::Returned(returned)),
            Err(error) => Err(RpcError::Publish(error)),
        }
    }

    /// Casts `method` to every server of `target`'s topic (the target as a fanout one).
    pub async fn fanout_cast(
        &mut self,
        target: &Target,
        method: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<(), RpcError> {
        let all = target.clone().fanout();
        self.cast_target(&all, method, args, timeout).await
    }
}

/// Declares the exchange a request to `route` goes to as its servers declare it (durable;
/// topic, or fanout for a broadcast), once per broker, so that a request sent before any
/// server of its topic ran comes back `Returned` (no server) rather than refused with 404
/// (oslo.messaging's clients declare it too).
async fn declare_route(
    publisher: &Publisher,
    route: &Route,
    fanout: bool,
    timeout: Duration,
) -> Result<(), RpcError> {
    let kind = if fanout {
        ExchangeKind::Fanout
    } else {
        ExchangeKind::Topic
    };
    publisher
        .declare(&route.exchange, kind, true, timeout)
        .await
        .map_err(RpcError::Publish)
}

impl ListenerPool {
    /// Calls `method` on one server of `target` (the named one, or any of the group) and
    /// returns its result, or why there is none: `Remote` (the server's error),
    /// `Timeout`, `Returned` (no server's queue took the request), `FanoutCall` (a fanout
    /// target: refused, nothing published), `Target` (a bad target or arguments that are
    /// not a JSON object), `Publish`, `Pool` (the pool's reply queue did not consume
    /// within the checkout timeout). It takes no worker: the reply comes to the pool's
    /// reply queue.
    pub async fn call_target(
        &self,
        target: &Target,
        method: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, RpcError> {
        let node = self.node();
        if let Some(transport) = &node.amqp10 {
            // Over AMQP 1.0 the node's reply link takes the reply.
            return amqp10::call(transport, node, target, method, args, timeout).await;
        }
        if target.fanout {
            return Err(RpcError::FanoutCall(target.topic.clone()));
        }
        let route = target.route(&node.rpc)?;
        let mut request = wire::request(method, args)
            .map_err(|_| TargetError::ArgsNotObject(method.to_string()))?;
        let replies = self.replies().await?;
        // Peers that read only AMQP properties find the id, their answer's queue and the
        // caller's patience there.
        let correlation = Correlation {
            message_id: Some(request.ensure_msg_id().to_string()),
            correlation_id: None,
            reply_to: Some(replies.queue().to_string()),
        };
        let options = PublishOptions::new(timeout)
            .expiration(timeout)
            .correlation(correlation);
        declare_route(replies.publisher(), &route, target.fanout, timeout).await?;
        let reply = replies
            .call(&route.exchange, &route.routing_key, request, options)
            .await?;
        wire::outcome(reply.envelope()).map_err(RpcError::Remote)
    }

    /// Checkout, [`Checkout::cast_target`], check-in.
    pub async fn cast_target(
        &self,
        target: &Target,
        method: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<(), RpcError> {
        let node = self.node();
        if let Some(transport) = &node.amqp10 {
            return amqp10::cast(transport, node, target, method, args, timeout).await;
        }
        let cast = async |checkout: &mut Checkout| {
            checkout.cast_target(target, method, args, timeout).await
        };
        self.with_checkout(cast).await?
    }

    /// [`ListenerPool::cast_target`] to every server of `target`'s topic (the target as a
    /// fanout one).
    pub async fn fanout_cast(
        &self,
        target: &Target,
        method: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<(), RpcError> {
        self.cast_target(&target.clone().fanout(), method, args, timeout)
            .await
    }
}
