//! A receiving: one receiver link from an address that outlives connections, each
//! delivery handed to a handler and settled with what the handler answers.
//!
//! The task attaches its receiver on the keeper's current connection, runs up to
//! `credit` handlers at once, and settles each delivery (accept, release or reject) as
//! its handler ends; pre-settled links settle nothing. When the connection goes (or the
//! keeper moves to another broker) the receiver is dead: the task waits for the next
//! connection and attaches again. Deliveries not yet settled then are the
//! intermediary's to give again, as with AMQP 0-9-1.
//!
//! Owns: the receiver link and the handlers' bound. Must not touch: the connection (the
//! keeper's), what handlers do.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use fe2o3_amqp::Receiver;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::link::{LinkStateError, ReceiverAttachError, RecvError};
use fe2o3_amqp::types::definitions::{ReceiverSettleMode, SenderSettleMode};
use fe2o3_amqp::types::messaging::{Body, DistributionMode, Source};
use fe2o3_amqp::types::primitives::Value;
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::keeper::Live;
use super::message::Incoming;
use crate::backoff::Backoff;
use crate::log_limit::LogLimit;
use crate::readiness::{Readiness, ReadinessEntry};

/// How a receiver link shares its source with the other receivers of the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distribution {
    /// Competing consumers: each message goes to one receiver (`move`).
    Move,
    /// Every receiver gets a copy (`copy`).
    Copy,
}

/// What to receive from.
///
/// It exists so that callers state the link once; the receiving attaches it again
/// after every reconnect.
#[derive(Clone, Debug)]
pub struct Receiving {
    /// The link's name (unique per connection: the node's name and a purpose).
    pub link: String,
    /// The source address, already mapped onto the intermediary's syntax.
    pub source: String,
    pub distribution: Distribution,
    /// The sender settles before sending (at most once: RPC requests and replies);
    /// otherwise every delivery is settled after its handler.
    pub presettled: bool,
    /// Deliveries handled at once (the link credit).
    pub credit: u32,
}

/// How a handled delivery is settled (unsettled links only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Done with: the intermediary forgets it.
    Accept,
    /// Not done: the intermediary gives it to a receiver again.
    Release,
    /// Never to be done: the intermediary drops or dead-letters it.
    Reject,
}

/// What runs for each delivery.
pub type Handler = Arc<dyn Fn(Incoming) -> BoxFuture<'static, Disposition> + Send + Sync>;

/// A running receiving: stop it with [`ReceivingHandle::stop`].
pub struct ReceivingHandle {
    stop: watch::Sender<bool>,
    attached: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl ReceivingHandle {
    /// Waits until the receiver is attached on the current connection (up to `timeout`).
    pub async fn attached(&self, timeout: Duration) -> bool {
        let mut attached = self.attached.clone();
        tokio::time::timeout(timeout, attached.wait_for(|generation| *generation > 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Detaches the link and ends the task, within `timeout` (then the task is aborted).
    pub async fn stop(self, timeout: Duration) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(timeout, &mut task).await.is_err() {
            task.abort();
        }
    }
}

/// Starts a receiving on the keeper's connections.
pub(crate) fn start(
    receiving: Receiving,
    handler: Handler,
    live: watch::Receiver<Option<Arc<Live>>>,
    bounds: Bounds,
    readiness: &Readiness,
) -> ReceivingHandle {
    let (stop, stopped) = watch::channel(false);
    let (attached_tx, attached) = watch::channel(0);
    let part = readiness.register(format!("amqp10 link {}", receiving.link));
    let task = tokio::spawn(run(
        receiving,
        handler,
        (live, stopped),
        attached_tx,
        bounds,
        part,
    ));
    ReceivingHandle {
        stop,
        attached,
        task,
    }
}

/// How long a receiving waits for the intermediary, and between attempts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounds {
    /// One attach or detach.
    pub operation: Duration,
    pub backoff: Backoff,
}

/// Attaches, consumes, and attaches again after every loss, until stopped; says in
/// `part` whether the link is attached (the node's readiness).
async fn run(
    receiving: Receiving,
    handler: Handler,
    (mut live, mut stop): (watch::Receiver<Option<Arc<Live>>>, watch::Receiver<bool>),
    attached: watch::Sender<u64>,
    bounds: Bounds,
    part: ReadinessEntry,
) {
    let failures = LogLimit::default();
    let mut attempt = 0_u32;
    loop {
        // The current connection, or wait for one.
        let current = tokio::select! {
            up = live.wait_for(Option::is_some) => match up {
                Ok(up) => up.clone(),
                Err(_) => return, // the keeper is gone
            },
            _ = stopped(&mut stop) => return,
        };
        let Some(current) = current else { continue };
        let receiver = match attach(&receiving, &current, bounds.operation).await {
            Ok(receiver) => receiver,
            Err(error) => {
                part.not_ready(format!("cannot attach to `{}`: {error}", receiving.source));
                if let Some(held) = failures.allow(&receiving.link) {
                    tracing::warn!(link = %receiving.link, source = %receiving.source, %error, held_back = held, "AMQP 1.0: cannot attach a receiver");
                }
                let delay = bounds.backoff.delay(attempt);
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = stopped(&mut stop) => return,
                }
            }
        };
        attempt = 0;
        part.ready();
        attached.send_replace(current.generation);
        let ended = consume(
            &receiving,
            &handler,
            receiver,
            &mut live,
            &mut stop,
            &current,
            bounds.operation,
        )
        .await;
        attached.send_replace(0);
        if let Ended::Stopped = ended {
            return;
        }
        part.not_ready("its AMQP 1.0 connection or session is gone; attaching again");
    }
}

/// Attaches the receiver within `bound`.
async fn attach(receiving: &Receiving, live: &Live, bound: Duration) -> Result<Receiver, String> {
    let mode = match receiving.distribution {
        Distribution::Move => DistributionMode::Move,
        Distribution::Copy => DistributionMode::Copy,
    };
    let source = Source::builder()
        .address(receiving.source.clone())
        .distribution_mode(mode)
        .build();
    let settle = if receiving.presettled {
        SenderSettleMode::Settled
    } else {
        SenderSettleMode::Unsettled
    };
    let attach = async {
        let mut session = live.session.lock().await;
        Receiver::builder()
            .name(receiving.link.clone())
            .source(source)
            .sender_settle_mode(settle)
            .receiver_settle_mode(ReceiverSettleMode::First)
            .credit_mode(CreditMode::Auto(receiving.credit.max(1)))
            .auto_accept(false)
            .attach(&mut session)
            .await
            .map_err(|error| {
                if matches!(error, ReceiverAttachError::SessionStopped(_)) {
                    live.session_lost();
                }
                error.to_string()
            })
    };
    tokio::time::timeout(bound, attach)
        .await
        .map_err(|_| format!("no answer within {bound:?}"))?
}

/// Why a receiver stopped being used.
enum Ended {
    /// The receiving is stopped.
    Stopped,
    /// The link or its connection is gone: attach again.
    Lost,
}

/// Receives and handles until the link is lost or the receiving stopped.
async fn consume(
    receiving: &Receiving,
    handler: &Handler,
    mut receiver: Receiver,
    live: &mut watch::Receiver<Option<Arc<Live>>>,
    stop: &mut watch::Receiver<bool>,
    current: &Live,
    bound: Duration,
) -> Ended {
    let credit = receiving.credit.max(1) as usize;
    let (done_tx, mut done) = mpsc::unbounded_channel::<(Option<DeliveryInfo>, Disposition)>();
    let mut running = 0_usize;
    let (mut received, refill) = (0_u32, (receiving.credit / 2).max(1));
    let generation = current.generation;
    let ended = loop {
        tokio::select! {
            biased;
            _ = stopped(stop) => break Ended::Stopped,
            changed = live.changed() => {
                let moved = changed.is_err()
                    || live.borrow().as_ref().is_none_or(|up| up.generation != generation);
                if moved {
                    break Ended::Lost;
                }
            }
            Some((info, disposition)) = done.recv() => {
                running -= 1;
                if let Some(info) = info
                    && settle(&mut receiver, info, disposition).await.is_err()
                {
                    break Ended::Lost;
                }
            }
            delivery = receiver.recv::<Body<Value>>(), if running < credit => {
                let delivery = match delivery {
                    Ok(delivery) => delivery,
                    Err(error) => {
                        if matches!(
                            error,
                            RecvError::LinkStateError(LinkStateError::SessionStopped(_))
                        ) {
                            current.session_lost();
                        }
                        break Ended::Lost;
                    }
                };
                if receiving.presettled {
                    // Credit comes back with dispositions, which settled deliveries
                    // never get: give it back here, half the window at a time.
                    received += 1;
                    if received >= refill {
                        received = 0;
                        if receiver.set_credit(receiving.credit.max(1)).await.is_err() {
                            break Ended::Lost;
                        }
                    }
                }
                let info = (!receiving.presettled).then(|| DeliveryInfo::from(&delivery));
                let Some(incoming) = Incoming::from_message(delivery.into_message()) else {
                    // Not a body warren can read: never to be handled.
                    tracing::warn!(link = %receiving.link, "AMQP 1.0: a message whose body is neither data nor a string; rejected");
                    if let Some(info) = info
                        && receiver.reject(info, None).await.is_err()
                    {
                        break Ended::Lost;
                    }
                    continue;
                };
                running += 1;
                // Called inside the guarded future: a panic while building it is caught too.
                let handler = handler.clone();
                let handling = async move { handler(incoming).await };
                let done_tx = done_tx.clone();
                let link = receiving.link.clone();
                tokio::spawn(async move {
                    let disposition = match AssertUnwindSafe(handling).catch_unwind().await {
                        Ok(disposition) => disposition,
                        Err(_) => {
                            tracing::error!(%link, "AMQP 1.0: a handler panicked; its delivery is released");
                            Disposition::Release
                        }
                    };
                    let _ = done_tx.send((info, disposition));
                });
            }
        }
    };
    if let Ended::Stopped = ended {
        // An orderly stop lets the running handlers end and settles their deliveries.
        let settle_all = async {
            while running > 0 {
                let Some((info, disposition)) = done.recv().await else {
                    break;
                };
                running -= 1;
                if let Some(info) = info {
                    let _ = settle(&mut receiver, info, disposition).await;
                }
            }
        };
        let _ = tokio::time::timeout(bound, settle_all).await;
    }
    // Detached, not closed: RabbitMQ 3.x answers a closing detach with a non-closing
    // one, and fe2o3-amqp then attaches the link again (a new queue for an exchange
    // source) to close it once more.
    let _ = tokio::time::timeout(bound, receiver.detach()).await;
    ended
}

/// Settles one delivery as its handler said.
async fn settle(
    receiver: &mut Receiver,
    info: DeliveryInfo,
    disposition: Disposition,
) -> Result<(), fe2o3_amqp::link::DispositionError> {
    match disposition {
        Disposition::Accept => receiver.accept(info).await,
        Disposition::Release => receiver.release(info).await,
        Disposition::Reject => receiver.reject(info, None).await,
    }
}

/// Returns once the receiving is told to stop (or its handle is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
