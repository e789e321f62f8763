//! A pool's reply queue: one listener of the pool that takes the replies of every call of
//! an RPC target made through the pool, so that such a call takes no worker (as
//! oslo.messaging's clients keep one reply queue per process).
//!
//! The queue is anonymous (a name of its own, re-declared after every reconnect, with the
//! expiry of anonymous queues): a reply written while the listener is between channels
//! waits in it, and after a failover the queue is declared on the new broker. Requests
//! go out through the broker the queue is on now, so their replies come back to it. The
//! listener consumes without acks, like a worker: a reply dies with its call anyway. It
//! starts with the first call that needs it, under the pool's supervisor (restarted like
//! any child), and goes with the pool's epoch.
//!
//! A call registers its `Msg-ID` and waits on a one-shot channel for its reply, for the
//! request's confirm (`Returned`, a publish error) and for its deadline together; a reply
//! nobody waits for (its call ended) is dropped and counted as late.
//!
//! Owns: the reply queue's listener, the calls waiting on it. Must not touch: workers and
//! checkouts (`worker`, `checkout`), the request's body and address (`target`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::time::Instant;
use warren_runtime::confirm::{PublishOptions, Published};
use warren_runtime::envelope::{Envelope, keys};
use warren_runtime::publisher::Publisher;
use warren_runtime::supervisor::{self, Restart};

use super::rpc::{RpcError, Waited, last_word};
use super::{ListenerPool, PoolError, PoolInner};
use crate::listener::{
    AckMode, Dispatch, Event, Listener, ListenerHandle, ListenerSpec, QueueSpec,
    node_listener_child,
};

/// The reply queue of a pool's current epoch, once a call started it.
#[derive(Default)]
pub(super) struct ReplySlot {
    /// The running reply queue (cleared when the pool starts a new epoch).
    current: Mutex<Option<Arc<ReplyQueue>>>,
    /// Held while one is being started, so that concurrent first calls start one.
    starting: tokio::sync::Mutex<()>,
}

impl ReplySlot {
    /// The pool starts a new epoch: the old reply queue went with its supervisor.
    pub fn reset(&self) {
        *self.current.lock() = None;
    }
}

/// One running reply queue: its listener and the calls waiting on it.
pub(super) struct ReplyQueue {
    handle: ListenerHandle,
    waiting: Arc<Waiting>,
}

/// The calls waiting for a reply, by `Msg-ID`.
struct Waiting {
    calls: Mutex<HashMap<String, oneshot::Sender<Event>>>,
    /// The pool's late-reply count.
    late: Arc<AtomicU64>,
}

impl Waiting {
    /// Hands a reply to its call, or counts it as late.
    fn answer(&self, event: Event) {
        let call = event
            .envelope()
            .msg_id()
            .and_then(|id| self.calls.lock().remove(id));
        let delivered = match call {
            Some(call) => call.send(event).is_ok(),
            None => false,
        };
        if !delivered {
            self.late.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("a reply came after its call ended; dropped");
        }
    }
}

/// The listener behind a reply queue: it hands replies over in its `on_event`, without
/// a responder.
struct ReplyListener {
    name: String,
    waiting: Arc<Waiting>,
}

impl Listener for ReplyListener {
    fn spec(&self) -> ListenerSpec {
        ListenerSpec::new(self.name.clone())
            // Reached through the default exchange only: no binding.
            .queue(QueueSpec::anonymous())
            .concurrency(1)
            // Replies die with their call: no acks (see the module docs).
            .ack(AckMode::Broker)
    }

    /// Hands each reply to its call right here, so that no handler runs for it.
    fn on_event(&self, event: &Event) -> Dispatch {
        self.waiting.answer(event.clone());
        Dispatch::Suppress
    }
}

/// A pool's reply queue, ready for a call: requests go out through its broker.
pub(crate) struct Replies {
    pool: Arc<PoolInner>,
    queue: Arc<ReplyQueue>,
    /// The queue's name.
    name: String,
    publisher: Publisher,
}

/// Removes a call's registration however the call ends (also when it is dropped).
struct Registered<'a> {
    waiting: &'a Waiting,
    msg_id: String,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.waiting.calls.lock().remove(&self.msg_id);
    }
}

impl ListenerPool {
    /// The pool's reply queue, started by the first call that needs it; waits up to the
    /// checkout timeout for it to consume (`NotReady` otherwise).
    pub(crate) async fn replies(&self) -> Result<Replies, PoolError> {
        let inner = &self.inner;
        let started = Instant::now();
        let deadline = started + inner.config.checkout_timeout;
        if inner.supervisor.is_empty() {
            return Err(PoolError::NotRunning(inner.name.clone()));
        }
        let running = inner.replies.current.lock().clone();
        let queue = match running {
            Some(queue) => queue,
            None => {
                // Started in a task of its own: a caller that gives up half-way leaves no
                // listener unrecorded.
                let starter = inner.clone();
                let start = tokio::spawn(async move { starter.start_replies().await });
                match tokio::time::timeout_at(deadline, start).await {
                    Ok(Ok(result)) => result?,
                    Ok(Err(_)) => return Err(PoolError::NotRunning(inner.name.clone())),
                    Err(_) => return Err(not_ready(inner, started)),
                }
            }
        };
        let handle = &queue.handle;
        if !handle.is_consuming()
            && !handle
                .wait_consuming(true, deadline.saturating_duration_since(Instant::now()))
                .await
        {
            return Err(not_ready(inner, started));
        }
        let publisher = match handle.current() {
            Some((broker, _)) => inner.ctx.publisher.to_broker(broker),
            None => inner.ctx.publisher.clone(),
        };
        Ok(Replies {
            pool: inner.clone(),
            name: handle.queue_name(),
            queue,
            publisher,
        })
    }
}

fn not_ready(inner: &PoolInner, started: Instant) -> PoolError {
    PoolError::NotReady {
        pool: inner.name.clone(),
        waited: started.elapsed(),
    }
}

impl PoolInner {
    /// Starts the reply queue of the current epoch, unless a concurrent call did.
    async fn start_replies(self: Arc<Self>) -> Result<Arc<ReplyQueue>, PoolError> {
        let not_running = || PoolError::NotRunning(self.name.clone());
        let _starting = self.replies.starting.lock().await;
        if let Some(queue) = self.replies.current.lock().clone() {
            return Ok(queue);
        }
        let epoch = self.state.lock().epoch;
        let supervisor = self.supervisor.get().ok_or_else(not_running)?;
        let waiting = Arc::new(Waiting {
            calls: Mutex::default(),
            late: self.rpc.late.clone(),
        });
        let listener = ReplyListener {
            name: format!("pool-{}-replies", self.name),
            waiting: waiting.clone(),
        };
        let (child, handle) = node_listener_child(listener, &self.ctx.node, self.ctx.stamp.clone())
            .map_err(|error| {
                // The spec is warren's own; only a bug gets here.
                tracing::error!(pool = %self.name, %error, "cannot build the pool's reply queue");
                not_running()
            })?;
        supervisor::start_child(&supervisor, child.restart(Restart::Permanent))
            .await
            .map_err(|_| not_running())?;
        let queue = Arc::new(ReplyQueue { handle, waiting });
        let mut current = self.replies.current.lock();
        if self.state.lock().epoch != epoch {
            // The supervisor it started under is gone already.
            return Err(not_running());
        }
        *current = Some(queue.clone());
        tracing::debug!(pool = %self.name, "reply queue started");
        Ok(queue)
    }
}

impl Replies {
    /// The publisher of the broker the reply queue is on: a request's exchange is declared
    /// and its request written there.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// The reply queue's name (a request's `reply_to`).
    pub fn queue(&self) -> &str {
        &self.name
    }

    /// Sends `request` (mandatory, with `options`; `Server-ID` and `reply_to` = the reply
    /// queue) and returns its reply, or why there is none, never later than
    /// `options.timeout`.
    pub async fn call(
        &self,
        exchange: &str,
        routing_key: &str,
        request: Envelope,
        options: PublishOptions,
    ) -> Result<Event, RpcError> {
        self.pool
            .rpc
            .timed(self.call_once(exchange, routing_key, request, options))
            .await
    }

    async fn call_once(
        &self,
        exchange: &str,
        routing_key: &str,
        mut request: Envelope,
        options: PublishOptions,
    ) -> Result<Event, RpcError> {
        let timeout = options.timeout;
        let deadline = Instant::now() + timeout;
        let msg_id = request.ensure_msg_id().to_string();
        request.set(keys::SERVER_ID, self.name.clone());
        let waiting = &self.queue.waiting;
        let (tx, mut reply) = oneshot::channel();
        waiting.calls.lock().insert(msg_id.clone(), tx);
        let _registered = Registered { waiting, msg_id };
        let options = options.mandatory().trace(warren_runtime::trace::for_call());
        let mut sent = Some(
            self.publisher
                .send(exchange, routing_key, request, options)
                .await
                .map_err(RpcError::Publish)?,
        );
        loop {
            let confirm = async {
                match sent.as_mut() {
                    Some(sent) => sent.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                answered = tokio::time::timeout_at(deadline, &mut reply) => {
                    return match answered {
                        Ok(Ok(event)) => Ok(event),
                        // Its sender went without a reply (not while the call is
                        // registered): no reply can come.
                        Ok(Err(_)) => Err(RpcError::Timeout(timeout)),
                        Err(_) => match last_word(&mut sent).await {
                            Waited::Returned(returned) => Err(RpcError::Returned(returned)),
                            Waited::Failed(error) => Err(RpcError::Publish(error)),
                            Waited::Reply(_) | Waited::Deadline => Err(RpcError::Timeout(timeout)),
                        },
                    };
                }
                confirmed = confirm => {
                    sent = None;
                    match confirmed {
                        Ok(Published::Routed) => {}
                        Ok(Published::Returned(returned)) => return Err(RpcError::Returned(returned)),
                        Err(error) => return Err(RpcError::Publish(error)),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::TestEvent;

    fn listener() -> (ReplyListener, Arc<Waiting>) {
        let waiting = Arc::new(Waiting {
            calls: Mutex::default(),
            late: Arc::default(),
        });
        let listener = ReplyListener {
            name: "pool-test-replies".to_string(),
            waiting: waiting.clone(),
        };
        (listener, waiting)
    }

    fn reply(msg_id: &str) -> TestEvent {
        TestEvent::new(Envelope::new("rpc", "reply").with(keys::MSG_ID, msg_id))
    }

    #[tokio::test]
    async fn a_reply_reaches_its_call_without_a_handler_and_a_stray_one_is_counted() {
        let (listener, waiting) = listener();
        let (tx, call) = oneshot::channel();
        waiting.calls.lock().insert("a".to_string(), tx);
        let handled = reply("a").run(&listener).await.expect("a valid spec");
        assert!(handled.suppressed && handled.responders == 0, "{handled:?}");
        let answer = call.await.expect("the call got its reply");
        assert_eq!(answer.envelope().msg_id(), Some("a"));
        assert!(waiting.calls.lock().is_empty());
        // Its copy, and a reply of no call: late.
        reply("a").run(&listener).await.expect("a valid spec");
        reply("b").run(&listener).await.expect("a valid spec");
        assert_eq!(waiting.late.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_call_that_ends_forgets_its_registration() {
        let (_listener, waiting) = listener();
        let (tx, _call) = oneshot::channel();
        waiting.calls.lock().insert("a".to_string(), tx);
        drop(Registered {
            waiting: &waiting,
            msg_id: "a".to_string(),
        });
        assert!(waiting.calls.lock().is_empty());
    }
}
