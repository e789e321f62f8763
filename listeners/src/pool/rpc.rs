//! RPC over the kapi envelope, through a leased worker (Kazoo's kz_amqp_worker calls).
//!
//! A request carries the worker's queue as `Server-ID` and a `Msg-ID`; responders reply
//! to `targeted` with routing key = `Server-ID` and the same `Msg-ID`.
//! - `call`: the first reply; one marked `Defer-Response` is held until a normal reply
//!   comes or the timeout, and then returned.
//! - `call_collect`: replies until a count, a predicate or the timeout; says which ended it
//!   and returns the replies so far.
//! - `cast`: publish only (confirmed, through the node's publisher).
//!
//! A call's request goes out on the worker's own channel, mandatory and without confirm
//! mode: the reply is the confirmation, and an unroutable request comes back from the
//! broker (`basic.return`) within milliseconds as `Returned`, instead of waiting for a reply
//! that cannot come.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;
use warren_runtime::envelope::{Envelope, keys};
use warren_runtime::publish::{PublishError, PublishOptions, Published, Returned, take_returned};

use super::PoolError;
use super::lease::PoolLease;

/// First look for a returned request this long after publishing; then twice as long, up
/// to `RETURN_CHECK_MAX`. A reply usually comes before the first look.
const RETURN_CHECK_FIRST: Duration = Duration::from_millis(1);
const RETURN_CHECK_MAX: Duration = Duration::from_millis(50);

/// Why a call did not produce a reply.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("unroutable: no queue is bound to exchange `{}` with routing key `{}` ({} {})", .0.exchange, .0.routing_key, .0.reply_code, .0.reply_text)]
    Returned(Returned),
    #[error("publishing the request failed: {0}")]
    Publish(PublishError),
    #[error(transparent)]
    Pool(#[from] PoolError),
}

/// A condition on the replies collected so far.
pub type ReplyPredicate = Box<dyn Fn(&[Envelope]) -> bool + Send + Sync>;

/// When `call_collect` stops collecting.
pub enum Until {
    /// After this many replies.
    Count(usize),
    /// As soon as the predicate holds for the replies so far.
    Predicate(ReplyPredicate),
    /// Only at the timeout (everything that came).
    Timeout,
}

impl fmt::Debug for Until {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Until::Count(n) => write!(f, "Count({n})"),
            Until::Predicate(_) => f.write_str("Predicate"),
            Until::Timeout => f.write_str("Timeout"),
        }
    }
}

/// What ended a `call_collect`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CollectEnd {
    Count,
    Predicate,
    Timeout,
}

/// The replies a `call_collect` gathered, oldest first, and what ended it.
#[derive(Debug)]
pub struct Collected {
    pub replies: Vec<Envelope>,
    pub ended: CollectEnd,
}

/// What happened while waiting for a reply.
enum Waited {
    Reply(Envelope),
    Returned(Returned),
    Deadline,
}

/// One call in progress: its Msg-ID, deadline, and when to look for a return next.
struct Pending {
    msg_id: String,
    deadline: Instant,
    check_every: Duration,
    next_check: Instant,
}

impl PoolLease {
    /// Publishes a request on the worker's channel (mandatory); the call is then pending.
    async fn send_request(
        &self,
        exchange: &str,
        routing_key: &str,
        mut request: Envelope,
        timeout: Duration,
    ) -> Result<Pending, RpcError> {
        let deadline = Instant::now() + timeout;
        let msg_id = request.ensure_msg_id().to_string();
        request.set(keys::SERVER_ID, self.queue());
        let worker = self.worker();
        worker.inbox.expect(&msg_id);
        let options = PublishOptions::new(timeout).mandatory();
        let failure = match worker
            .handle
            .publish(exchange, routing_key, request, options)
            .await
        {
            Ok(Published::Routed) => {
                let now = Instant::now();
                return Ok(Pending {
                    msg_id,
                    deadline,
                    check_every: RETURN_CHECK_FIRST,
                    next_check: now + RETURN_CHECK_FIRST,
                });
            }
            Ok(Published::Returned(returned)) => RpcError::Returned(returned),
            Err(error) => RpcError::Publish(error),
        };
        worker.inbox.forget(&msg_id);
        Err(failure)
    }

    /// The next reply to the pending call, a return of its request, or the deadline.
    async fn wait(&mut self, pending: &mut Pending) -> Waited {
        loop {
            let wake = pending.deadline.min(pending.next_check);
            match tokio::time::timeout_at(wake, self.mailbox.replies.recv()).await {
                Ok(Some(event)) => {
                    if event.envelope().msg_id() == Some(pending.msg_id.as_str()) {
                        return Waited::Reply(event.envelope().clone());
                    }
                }
                Ok(None) => return Waited::Deadline,
                Err(_) if Instant::now() >= pending.deadline => return Waited::Deadline,
                Err(_) => {
                    if let Some(channel) = self.worker().handle.channel() {
                        for returned in take_returned(&channel).await {
                            let ours = returned.envelope.as_ref().and_then(|e| e.msg_id())
                                == Some(pending.msg_id.as_str());
                            if ours {
                                return Waited::Returned(returned);
                            }
                        }
                    }
                    pending.check_every = (pending.check_every * 2).min(RETURN_CHECK_MAX);
                    pending.next_check = Instant::now() + pending.check_every;
                }
            }
        }
    }

    /// Sends a request and returns the first reply (see the module docs).
    pub async fn call(
        &mut self,
        exchange: &str,
        routing_key: &str,
        request: Envelope,
        timeout: Duration,
    ) -> Result<Envelope, RpcError> {
        let mut pending = self
            .send_request(exchange, routing_key, request, timeout)
            .await?;
        let mut deferred = None;
        let result = loop {
            match self.wait(&mut pending).await {
                Waited::Reply(reply) if reply.defer_response() => deferred = Some(reply),
                Waited::Reply(reply) => break Ok(reply),
                Waited::Returned(returned) => break Err(RpcError::Returned(returned)),
                Waited::Deadline => break deferred.take().ok_or(RpcError::Timeout(timeout)),
            }
        };
        self.worker().inbox.forget(&pending.msg_id);
        result
    }

    /// Sends a request and collects replies until `until` holds or the timeout.
    pub async fn call_collect(
        &mut self,
        exchange: &str,
        routing_key: &str,
        request: Envelope,
        until: Until,
        timeout: Duration,
    ) -> Result<Collected, RpcError> {
        let mut pending = self
            .send_request(exchange, routing_key, request, timeout)
            .await?;
        let mut replies = Vec::new();
        let result = loop {
            if let Some(ended) = finished(&until, &replies) {
                break Ok(Collected { replies, ended });
            }
            match self.wait(&mut pending).await {
                Waited::Reply(reply) => replies.push(reply),
                Waited::Returned(returned) => break Err(RpcError::Returned(returned)),
                Waited::Deadline => {
                    break Ok(Collected {
                        replies,
                        ended: CollectEnd::Timeout,
                    });
                }
            }
        };
        self.worker().inbox.forget(&pending.msg_id);
        result
    }

    /// Publishes a request without waiting for replies: confirmed and mandatory, so an
    /// unroutable one is `Returned`.
    pub async fn cast(
        &mut self,
        exchange: &str,
        routing_key: &str,
        request: Envelope,
        timeout: Duration,
    ) -> Result<(), RpcError> {
        let options = PublishOptions::new(timeout).mandatory();
        match self.publish(exchange, routing_key, request, options).await {
            Ok(Published::Routed) => Ok(()),
            Ok(Published::Returned(returned)) => Err(RpcError::Returned(returned)),
            Err(error) => Err(RpcError::Publish(error)),
        }
    }
}

/// Whether the replies so far end the collection.
fn finished(until: &Until, replies: &[Envelope]) -> Option<CollectEnd> {
    match until {
        Until::Count(n) if replies.len() >= *n => Some(CollectEnd::Count),
        Until::Predicate(done) if !replies.is_empty() && done(replies) => {
            Some(CollectEnd::Predicate)
        }
        _ => None,
    }
}
