//! The AMQP 1.0 transport (`[rpc] transport = "amqp10"`): one connection and session per
//! node to the local zone's `amqp10_brokers`, a cache of sender links by address, and
//! receiver links that come back after a reconnect.
//!
//! oslo.messaging's AMQP 1.0 driver spec targets the protocol, not a broker: RabbitMQ's
//! AMQP 1.0 plugin, a Qpid Dispatch Router, qpidd or ActiveMQ carry the same traffic.
//! This module knows links and messages only; what travels on them (RPC requests,
//! replies, notifications) is the listeners crate's `target` module.
//!
//! Files: `keeper` (the connection, its session, failover and fail-back), `receiving`
//! (one receiver link and its handlers), `message` (bodies and properties).
//!
//! Owns: [`Amqp10Transport`] and its errors. Must not touch: the AMQP 0-9-1 side
//! (registry, connections, channels), which knows nothing of this one.

mod keeper;
mod message;
mod receiving;
mod replies;

use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::Sender;
use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp::link::{LinkStateError, SendError, SenderAttachError};
use fe2o3_amqp::types::messaging::Outcome;
use fe2o3_amqp::types::messaging::Target as LinkTarget;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::{Report, Source};
use crate::readiness::Readiness;

pub use keeper::KeeperSettings;
pub use message::{Incoming, Outgoing};
pub use receiving::{Disposition, Distribution, Handler, Receiving, ReceivingHandle};

use keeper::Live;
use receiving::Bounds;
use replies::Pending;

/// Why a message was not sent, or not taken.
///
/// It exists so that callers tell "try later" (no intermediary, a lost link, no answer in
/// time) from "the intermediary said no" (released, rejected, modified).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Amqp10Error {
    /// No connection to any `amqp10_brokers` entry within the bound.
    #[error("no AMQP 1.0 intermediary is connected")]
    Unavailable,
    /// The bound passed before the intermediary answered.
    #[error("the AMQP 1.0 intermediary did not answer within {0:?}")]
    Timeout(Duration),
    /// The link (or its connection) failed while sending.
    #[error("AMQP 1.0 link to `{address}` failed: {reason}")]
    Link { address: String, reason: String },
    /// The connection a call was sent on went before its reply came (its request, sent
    /// pre-settled, may be lost with it).
    #[error("the AMQP 1.0 connection was lost before the reply came")]
    Lost,
    /// The intermediary settled the message with another outcome than accepted.
    #[error("the AMQP 1.0 intermediary did not take the message: {0}")]
    Refused(String),
}

/// The node's AMQP 1.0 connection: sends to addresses and receives from them.
///
/// It exists so that everything sent over AMQP 1.0 shares one connection and one
/// session, as the driver spec asks, and follows failover without its users knowing:
/// a sender link is attached on first use of its address and dropped with its
/// connection; a receiving attaches again on the next one. Cheap to clone.
#[derive(Clone)]
pub struct Amqp10Transport {
    inner: Arc<Inner>,
}

struct Inner {
    node: String,
    live: watch::Receiver<Option<Arc<Live>>>,
    stop: watch::Sender<bool>,
    bounds: Bounds,
    /// Where every receiving says whether its link is attached.
    readiness: Readiness,
    /// The node's reply address (`reply_to` of every call).
    reply_address: String,
    /// The calls waiting for their reply.
    pending: Arc<Pending>,
    /// The receiver link of the reply address.
    replies: ReceivingHandle,
}

impl Amqp10Transport {
    /// Starts the keeper (it connects in the background) and the receiver of
    /// `reply_address` (the node's replies), and returns at once. `operation_timeout`
    /// bounds each link attach and detach. Every receiver link is a part of `readiness`,
    /// ready while it is attached.
    pub fn start(
        settings: KeeperSettings,
        operation_timeout: Duration,
        reply_address: String,
        readiness: &Readiness,
    ) -> Self {
        let (live_tx, live) = watch::channel(None);
        let (stop, stopped) = watch::channel(false);
        let bounds = Bounds {
            operation: operation_timeout,
            backoff: settings.backoff,
        };
        let node = settings.node.clone();
        tokio::spawn(keeper::keep(settings, live_tx, stopped.clone()));
        let pending = Arc::new(Pending::default());
        let answered = pending.clone();
        let handler: Handler = Arc::new(move |reply: Incoming| {
            answered.answer(reply);
            Box::pin(async { Disposition::Accept })
        });
        let replies = receiving::start(
            Receiving {
                link: format!("{node}/replies"),
                source: reply_address.clone(),
                distribution: Distribution::Move,
                presettled: true,
                credit: 200,
            },
            handler,
            live.clone(),
            bounds,
            readiness,
        );
        tokio::spawn(fail_lost_calls(live.clone(), stopped, pending.clone()));
        Amqp10Transport {
            inner: Arc::new(Inner {
                node,
                live,
                stop,
                bounds,
                readiness: readiness.clone(),
                reply_address,
                pending,
                replies,
            }),
        }
    }

    /// Sends `request` to `address` pre-settled with `reply_to` = the node's reply
    /// address and waits for the reply whose correlation-id is the request's message-id
    /// (set here when the request has none). `Timeout` when none came in time; `Lost`
    /// when the connection went first.
    pub async fn call(
        &self,
        address: &str,
        mut request: Outgoing,
        timeout: Duration,
    ) -> Result<Incoming, Amqp10Error> {
        let deadline = Instant::now() + timeout;
        let id = request
            .message_id
            .get_or_insert_with(|| format!("{}-{}", self.inner.node, next_id()))
            .clone();
        request.reply_to = Some(self.inner.reply_address.clone());
        // Without the reply link attached, the reply would be lost: wait for it.
        let left = deadline.saturating_duration_since(Instant::now());
        if !self.inner.replies.attached(left).await {
            return Err(Amqp10Error::Unavailable);
        }
        let live = self.current(deadline).await?;
        let answer = self.inner.pending.wait(&id, live.generation);
        let left = deadline.saturating_duration_since(Instant::now());
        if let Err(error) = self.send(address, request, true, left).await {
            self.inner.pending.forget(&id);
            return Err(error);
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(Amqp10Error::Lost),
            Err(_) => {
                self.inner.pending.forget(&id);
                Err(Amqp10Error::Timeout(timeout))
            }
        }
    }

    /// Replies that came after their call had ended (timed out or failed).
    pub fn late_replies(&self) -> u64 {
        self.inner.pending.late()
    }

    /// The node's reply address.
    pub fn reply_address(&self) -> &str {
        &self.inner.reply_address
    }

    /// The node's name (the connection's container id).
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// The intermediary connected to now (redacted), if any.
    pub fn connected(&self) -> Option<String> {
        self.inner
            .live
            .borrow()
            .as_ref()
            .map(|live| live.broker.redacted().to_string())
    }

    /// Waits up to `timeout` for a connection.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        self.current(Instant::now() + timeout).await.is_ok()
    }

    /// Sends `message` to `address`. Pre-`settled`, it returns once written (at most
    /// once: the spec's RPC requests and replies); otherwise once the intermediary
    /// accepted it. Everything within `timeout`, the wait for a connection included.
    pub async fn send(
        &self,
        address: &str,
        message: Outgoing,
        settled: bool,
        timeout: Duration,
    ) -> Result<(), Amqp10Error> {
        let deadline = Instant::now() + timeout;
        let live = self.current(deadline).await?;
        let sender = self.sender(&live, address, deadline, timeout).await?;
        let sendable = Sendable::builder()
            .message(message.into_message())
            .settled(settled)
            .build();
        let written = tokio::time::timeout_at(deadline, async {
            let mut sender = sender.lock().await;
            sender.send_batchable(sendable).await
        })
        .await
        .map_err(|_| Amqp10Error::Timeout(timeout))?;
        let outcome = match written {
            Ok(outcome) => outcome,
            Err(error) => return Err(self.lost(&live, address, &sender, &error)),
        };
        if settled {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, outcome).await {
            Err(_) => Err(Amqp10Error::Timeout(timeout)),
            Ok(Ok(Outcome::Accepted(_))) => Ok(()),
            Ok(Ok(other)) => Err(Amqp10Error::Refused(outcome_name(&other).to_string())),
            Ok(Err(error)) => Err(self.lost(&live, address, &sender, &error)),
        }
    }

    /// Runs `handler` on every message from `receiving`'s source, on this and every later
    /// connection, until the handle is stopped.
    pub fn receive(&self, receiving: Receiving, handler: Handler) -> ReceivingHandle {
        receiving::start(
            receiving,
            handler,
            self.inner.live.clone(),
            self.inner.bounds,
            &self.inner.readiness,
        )
    }

    /// Closes the connection (within the connect bound) and stops reconnecting.
    pub fn close(&self) {
        let _ = self.inner.stop.send(true);
    }

    /// The current connection, waiting for one until `deadline`.
    async fn current(&self, deadline: Instant) -> Result<Arc<Live>, Amqp10Error> {
        let mut live = self.inner.live.clone();
        let up = tokio::time::timeout_at(deadline, live.wait_for(Option::is_some))
            .await
            .map_err(|_| Amqp10Error::Unavailable)?
            .map_err(|_| Amqp10Error::Unavailable)?;
        up.clone().ok_or(Amqp10Error::Unavailable)
    }

    /// The cached sender link to `address`, attached now if there is none.
    async fn sender(
        &self,
        live: &Live,
        address: &str,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Arc<tokio::sync::Mutex<Sender>>, Amqp10Error> {
        if let Some(sender) = live.senders.lock().get(address) {
            return Ok(sender.clone());
        }
        let attach = async {
            let mut session = live.session.lock().await;
            // Another caller may have attached it while this one waited for the session.
            if let Some(sender) = live.senders.lock().get(address) {
                return Ok(sender.clone());
            }
            let name = format!("{}/to/{address}", self.inner.node);
            let sender = Sender::builder()
                .name(name)
                .target(LinkTarget::builder().address(address.to_string()).build())
                .attach(&mut session)
                .await
                .map_err(|error| {
                    if matches!(error, SenderAttachError::SessionStopped(_)) {
                        live.session_lost();
                    }
                    Amqp10Error::Link {
                        address: address.to_string(),
                        reason: error.to_string(),
                    }
                })?;
            let sender = Arc::new(tokio::sync::Mutex::new(sender));
            live.senders
                .lock()
                .insert(address.to_string(), sender.clone());
            Ok(sender)
        };
        tokio::time::timeout_at(deadline, attach)
            .await
            .map_err(|_| Amqp10Error::Timeout(timeout))?
    }

    /// Forgets a sender link that failed (the next send attaches a new one).
    fn lost(
        &self,
        live: &Live,
        address: &str,
        sender: &Arc<tokio::sync::Mutex<Sender>>,
        error: &SendError,
    ) -> Amqp10Error {
        if matches!(
            error,
            SendError::LinkStateError(LinkStateError::SessionStopped(_))
        ) {
            live.session_lost();
        }
        let mut senders = live.senders.lock();
        if senders
            .get(address)
            .is_some_and(|cached| Arc::ptr_eq(cached, sender))
        {
            senders.remove(address);
        }
        Amqp10Error::Link {
            address: address.to_string(),
            reason: error.to_string(),
        }
    }
}

impl Source for Amqp10Transport {
    fn report(&self, report: &mut Report) {
        let connected = self.connected();
        report.gauge(
            "warren_amqp10_connected",
            "Whether the node's AMQP 1.0 connection is up (broker: the intermediary).",
            vec![("broker", connected.clone().unwrap_or_default())],
            i64::from(connected.is_some()),
        );
        report.counter(
            "warren_amqp10_late_replies",
            "AMQP 1.0 replies that came after their call had ended (timed out or failed); dropped.",
            Vec::new(),
            self.late_replies(),
        );
    }

    /// Under `amqp10` in `/status`: the intermediary connected to (none while down), the
    /// connection's generation, the reply address and the late replies.
    fn describe(&self) -> Option<(&'static str, serde_json::Value)> {
        let live = self.inner.live.borrow().clone();
        let value = serde_json::json!({
            "connected": live.as_ref().map(|up| up.broker.redacted().to_string()),
            "generation": live.as_ref().map(|up| up.generation),
            "reply_address": self.inner.reply_address,
            "late_replies": self.late_replies(),
        });
        Some(("amqp10", value))
    }
}

/// A number for request ids unique in this process.
fn next_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Fails the calls of each connection as it goes (see `replies`).
async fn fail_lost_calls(
    mut live: watch::Receiver<Option<Arc<Live>>>,
    mut stop: watch::Receiver<bool>,
    pending: Arc<Pending>,
) {
    loop {
        tokio::select! {
            changed = live.changed() => {
                if changed.is_err() {
                    pending.lost_before(None);
                    return;
                }
                let generation = live.borrow().as_ref().map(|up| up.generation);
                pending.lost_before(generation);
            }
            _ = stop.wait_for(|stop| *stop) => {
                pending.lost_before(None);
                return;
            }
        }
    }
}

/// The name of an outcome other than accepted.
fn outcome_name(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Accepted(_) => "accepted",
        Outcome::Rejected(_) => "rejected",
        Outcome::Released(_) => "released",
        Outcome::Modified(_) => "modified",
        #[allow(unreachable_patterns)]
        _ => "another outcome",
    }
}
