//! A pool worker: a listener with its own channel and its own anonymous queue, bound to
//! `targeted` with the queue's name as routing key (its `Server-ID`), whose deliveries go
//! to whoever holds the worker's checkout. Its channel only consumes: call requests go out on
//! the publish connection of the worker's broker (see `rpc`).
//!
//! The worker consumes without acks (`no_ack`, as Kazoo's workers do): what reaches its
//! queue is replies, which die with their call anyway (a worker whose channel is lost
//! cannot receive the reply, and the call ends with its timeout), and deliveries of the
//! holder's temporary bindings. Acking each reply cost a call about 50 µs at p50 on the
//! rpc bench (1.13 → 1.03 of raw lapin's round trip), for a guarantee nobody could use.
//!
//! Replies (deliveries to the worker's own queue via `targeted` or the default exchange)
//! reach the holder only for the `Msg-ID`s it is waiting for; late replies are dropped and
//! counted. Deliveries of temporary bindings go to the holder's delivery stream. Both
//! buffers are bounded: a holder that does not read makes the worker's consumer wait; a
//! delivery that finds no room for a second is dropped and counted
//! (`warren_pool_dropped_deliveries`) with a rate-limited warning, so a holder that binds
//! must read what it asked for.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::mpsc;
use warren_runtime::exchanges::TARGETED;
use warren_runtime::log_limit::LogLimit;

use crate::listener::{
    AckMode, Event, HandlerError, Listener, ListenerHandle, ListenerSpec, QueueSpec,
};

/// Replies buffered for the holder.
pub(crate) const REPLY_BUFFER: usize = 64;
/// Deliveries of temporary bindings buffered for the holder.
pub(crate) const DELIVERY_BUFFER: usize = 256;
/// How long a delivery may wait for room in a full holder buffer before it is dropped.
const ROOM_WAIT: Duration = Duration::from_secs(1);

/// Where a worker's deliveries go while it is checked out.
#[derive(Default)]
pub(crate) struct Inbox {
    holder: Mutex<Option<Holder>>,
    /// Replies nobody waits for (their call ended): dropped, counted for the pool.
    pub late: Arc<AtomicU64>,
    /// Deliveries of temporary bindings the holder did not make room for: dropped,
    /// counted for the pool.
    pub dropped: Arc<AtomicU64>,
}

/// The current checkout's side of the inbox.
struct Holder {
    replies: mpsc::Sender<Event>,
    deliveries: mpsc::Sender<Event>,
    /// Msg-IDs of calls in progress.
    awaiting: HashSet<String>,
}

/// The receiving ends a checkout reads.
pub(crate) struct Mailbox {
    pub replies: mpsc::Receiver<Event>,
    pub deliveries: mpsc::Receiver<Event>,
}

impl Inbox {
    /// A new holder: fresh buffers, so nothing of the previous checkout leaks into this one.
    pub fn open(&self) -> Mailbox {
        let (replies, replies_rx) = mpsc::channel(REPLY_BUFFER);
        let (deliveries, deliveries_rx) = mpsc::channel(DELIVERY_BUFFER);
        *self.holder.lock() = Some(Holder {
            replies,
            deliveries,
            awaiting: HashSet::new(),
        });
        Mailbox {
            replies: replies_rx,
            deliveries: deliveries_rx,
        }
    }

    /// The checkout is over: later deliveries are dropped.
    pub fn close(&self) {
        *self.holder.lock() = None;
    }

    /// The holder waits for replies carrying `msg_id`.
    pub fn expect(&self, msg_id: &str) {
        if let Some(holder) = self.holder.lock().as_mut() {
            holder.awaiting.insert(msg_id.to_string());
        }
    }

    /// The holder no longer waits for `msg_id`.
    pub fn forget(&self, msg_id: &str) {
        if let Some(holder) = self.holder.lock().as_mut() {
            holder.awaiting.remove(msg_id);
        }
    }

    /// Where an event should go, if anywhere.
    fn route(&self, event: &Event) -> Option<mpsc::Sender<Event>> {
        let holder = self.holder.lock();
        let delivery = event.delivery();
        // Replies come through `targeted` (kapi) or the default exchange (RPC targets).
        let is_reply = (delivery.exchange == TARGETED || delivery.exchange.is_empty())
            && *delivery.routing_key == *delivery.queue;
        let awaited = |holder: &Holder| {
            let msg_id = event.envelope().msg_id()?;
            holder
                .awaiting
                .contains(msg_id)
                .then(|| holder.replies.clone())
        };
        if is_reply {
            let sender = holder.as_ref().and_then(awaited);
            if sender.is_none() {
                self.late.fetch_add(1, Ordering::Relaxed);
            }
            sender
        } else {
            let holder = holder.as_ref()?;
            Some(holder.deliveries.clone())
        }
    }
}

/// The listener behind a worker.
pub(crate) struct WorkerListener {
    pub name: String,
    pub inbox: Arc<Inbox>,
}

impl Listener for WorkerListener {
    fn spec(&self) -> ListenerSpec {
        let inbox = self.inbox.clone();
        ListenerSpec::new(self.name.clone())
            .queue(QueueSpec::anonymous())
            .bind_own_queue(TARGETED)
            // One at a time: the holder sees deliveries in queue order; forwarding is quick.
            .concurrency(1)
            // Replies die with their call: no acks (see the module docs).
            .ack(AckMode::Broker)
            .responder("*", "*", move |event: Event| {
                let inbox = inbox.clone();
                async move { forward(&inbox, event).await }
            })
    }
}

/// Hands an event to the checkout holder, waiting a little for room.
async fn forward(inbox: &Inbox, event: Event) -> Result<(), HandlerError> {
    let Some(sender) = inbox.route(&event) else {
        tracing::debug!(
            msg_id = event.envelope().msg_id(),
            "nobody waits for this delivery; dropped"
        );
        return Ok(());
    };
    let event = match sender.try_send(event) {
        Ok(()) => return Ok(()),
        Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
        Err(mpsc::error::TrySendError::Full(event)) => event,
    };
    match tokio::time::timeout(ROOM_WAIT, sender.send(event)).await {
        Ok(Ok(())) => Ok(()),
        // The checkout ended meanwhile: nobody wants it any more.
        Ok(Err(_)) => Ok(()),
        Err(_) => {
            inbox.dropped.fetch_add(1, Ordering::Relaxed);
            if let Some(held) = DROPS.allow("pool") {
                tracing::warn!(
                    suppressed = held,
                    "a checkout holder does not read the deliveries of its temporary bindings; one was dropped"
                );
            }
            Ok(())
        }
    }
}

/// The rate limit of the "dropped" warning.
static DROPS: LazyLock<LogLimit> = LazyLock::new(LogLimit::default);

/// One worker of a pool.
pub(crate) struct Worker {
    /// Its child id under the pool's supervisor.
    pub id: String,
    pub handle: ListenerHandle,
    pub inbox: Arc<Inbox>,
    /// Started on demand beyond the pool's size; retires when idle.
    pub overflow: bool,
    /// When it was last checked in.
    pub idle_since: Mutex<Instant>,
}
