//! RPC over the kapi envelope, through a checked-out worker (Kazoo's kz_amqp_worker calls).
//!
//! A request carries the worker's queue as `Server-ID` and a `Msg-ID`; responders reply
//! to `targeted` with routing key = `Server-ID` and the same `Msg-ID`.
//! - `call`: the first reply; one marked `Defer-Response` is held until a normal reply
//!   comes or the timeout, and then returned.
//! - `call_collect`: replies until a count, a predicate or the timeout; says which ended it
//!   and returns the replies so far.
//! - `cast`: publish only (confirmed, through the node's publisher).
//!
//! A call's request goes out on the publish connection of the broker the worker's queue is
//! on (its replies come back there), mandatory and confirmed: the call waits for the reply
//! and the confirm at once, so the confirm adds no latency, and an unroutable request
//! comes back as `Returned` within milliseconds instead of waiting for a reply that cannot
//! come. A broker that blocks publishing makes the call fail with `Blocked` after its
//! timeout; it never stalls the worker's consumer.

use std::fmt;
use std::time::Duration;

use tokio::time::Instant;
use warren_runtime::confirm::{PublishError, PublishOptions, Published, Returned};
use warren_runtime::envelope::{Envelope, keys};
use warren_runtime::publisher::Sent;

use super::PoolError;
use super::checkout::Checkout;

/// How long, at a call's deadline, the request's confirm may still take to say why no
/// reply came (e.g. `Blocked`).
const LAST_WORD: Duration = Duration::from_millis(50);

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
    /// The server answered with an error: its method failed, panicked, or does not exist
    /// (see [`RemoteError`](crate::target::RemoteError)'s kinds).
    #[error("the server answered with an error: {0}")]
    Remote(crate::target::RemoteError),
    /// A call to a fanout target: every server would answer, so it is refused before
    /// anything is published (use `fanout_cast`).
    #[error("cannot call fanout target `{0}` (every server would answer); cast to it instead")]
    FanoutCall(String),
    /// The target (or the request's arguments) cannot be expressed in AMQP; nothing was
    /// published.
    #[error(transparent)]
    Target(#[from] crate::target::TargetError),
    /// Over AMQP 1.0 (`[rpc] transport = "amqp10"`): no intermediary, a lost link or
    /// connection, or a message the intermediary did not take.
    #[error("AMQP 1.0: {0}")]
    Amqp10(warren_runtime::amqp10::Amqp10Error),
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
pub(super) enum Waited {
    Reply(Envelope),
    Returned(Returned),
    /// The request's publish failed (nacked, blocked, channel lost).
    Failed(PublishError),
    Deadline,
}

/// One call in progress: its Msg-ID, deadline, and the request's confirm until it came.
struct Pending {
    msg_id: String,
    deadline: Instant,
    sent: Option<Sent>,
}

impl Checkout {
    /// Writes a request (mandatory) through the worker's broker; the call is then pending
    /// until `options.timeout`.
    async fn send_request(
        &self,
        exchange: &str,
        routing_key: &str,
        mut request: Envelope,
        options: PublishOptions,
    ) -> Result<Pending, RpcError> {
        let deadline = Instant::now() + options.timeout;
        let msg_id = request.ensure_msg_id().to_string();
        let queue = self.queue();
        request.set(keys::SERVER_ID, queue.clone());
        let worker = self.worker();
        worker.inbox.expect(&msg_id);
        let options = options.mandatory().trace(warren_runtime::trace::for_call());
        let sent = self
            .request_publisher()
            .send(exchange, routing_key, request, options)
            .await;
        match sent {
            Ok(sent) => Ok(Pending {
                msg_id,
                deadline,
                sent: Some(sent),
            }),
            Err(error) => {
                worker.inbox.forget(&msg_id);
                Err(RpcError::Publish(error))
            }
        }
    }

    /// The next reply to the pending call, the request's failure, or the deadline.
    async fn wait(&mut self, pending: &mut Pending) -> Waited {
        loop {
            let confirm = async {
                match pending.sent.as_mut() {
                    Some(sent) => sent.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                reply = tokio::time::timeout_at(pending.deadline, self.mailbox.replies.recv()) => {
                    match reply {
                        Ok(Some(event)) => {
                            if event.envelope().msg_id() == Some(pending.msg_id.as_str()) {
                                return Waited::Reply(event.envelope().clone());
                            }
                        }
                        Ok(None) => return Waited::Deadline,
                        Err(_) => return last_word(&mut pending.sent).await,
                    }
                }
                confirmed = confirm => {
                    pending.sent = None;
                    match confirmed {
                        Ok(Published::Routed) => {}
                        Ok(Published::Returned(returned)) => return Waited::Returned(returned),
                        Err(error) => return Waited::Failed(error),
                    }
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
        let pool = self.pool.clone();
        let options = PublishOptions::new(timeout);
        pool.rpc
            .timed(self.call_once(exchange, routing_key, request, options))
            .await
    }

    async fn call_once(
        &mut self,
        exchange: &str,
        routing_key: &str,
        request: Envelope,
        options: PublishOptions,
    ) -> Result<Envelope, RpcError> {
        let timeout = options.timeout;
        let mut pending = self
            .send_request(exchange, routing_key, request, options)
            .await?;
        let mut deferred = None;
        let result = loop {
            match self.wait(&mut pending).await {
                Waited::Reply(reply) if reply.defer_response() => deferred = Some(reply),
                Waited::Reply(reply) => break Ok(reply),
                Waited::Returned(returned) => break Err(RpcError::Returned(returned)),
                Waited::Failed(error) => break Err(RpcError::Publish(error)),
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
        let pool = self.pool.clone();
        pool.rpc
            .timed(self.collect_once(exchange, routing_key, request, until, timeout))
            .await
    }

    async fn collect_once(
        &mut self,
        exchange: &str,
        routing_key: &str,
        request: Envelope,
        until: Until,
        timeout: Duration,
    ) -> Result<Collected, RpcError> {
        let mut pending = self
            .send_request(exchange, routing_key, request, PublishOptions::new(timeout))
            .await?;
        let mut replies = Vec::new();
        let result = loop {
            if let Some(ended) = finished(&until, &replies) {
                break Ok(Collected { replies, ended });
            }
            match self.wait(&mut pending).await {
                Waited::Reply(reply) => replies.push(reply),
                Waited::Returned(returned) => break Err(RpcError::Returned(returned)),
                Waited::Failed(error) => break Err(RpcError::Publish(error)),
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
        let options = PublishOptions::new(timeout)
            .mandatory()
            .trace(warren_runtime::trace::for_call());
        let published = self
            .publisher
            .publish(exchange, routing_key, request, options);
        match published.await {
            Ok(Published::Routed) => Ok(()),
            Ok(Published::Returned(returned)) => Err(RpcError::Returned(returned)),
            Err(error) => Err(RpcError::Publish(error)),
        }
    }
}

/// At the deadline without a reply: the request's confirm, if it is still due, may say why
/// (`Blocked`, `Nacked`); otherwise it is a plain timeout.
pub(super) async fn last_word(sent: &mut Option<Sent>) -> Waited {
    let Some(sent) = sent.take() else {
        return Waited::Deadline;
    };
    match tokio::time::timeout(LAST_WORD, sent).await {
        Ok(Ok(Published::Returned(returned))) => Waited::Returned(returned),
        Ok(Err(error @ (PublishError::Blocked { .. } | PublishError::Nacked))) => {
            Waited::Failed(error)
        }
        _ => Waited::Deadline,
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
