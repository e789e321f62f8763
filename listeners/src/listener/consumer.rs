//! The delivery loop of one consumer on one channel: lapin's stream → decode → redelivery
//! limit → the listener's hook → matching responders → outcome → ack / nack / reject.
//!
//! Settlements always go to the channel the delivery came on, so an ack for a delivery of
//! an old channel can never reach a new one. At most `concurrency` messages are handled at
//! once; lapin buffers no more than prefetch. Handlers run as their own tasks, so a panic
//! is caught (nack + error log + counter) and the loop lives on. Acks are coalesced
//! (`acks`). A stop cancels the consumer, lets handlers finish until a deadline, acks what
//! finished, and aborts the rest: their messages go back to the queue with the channel.

use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::BasicCancelOptions;
use lapin::{Channel, Consumer};
use ractor::ActorRef;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use warren_runtime::envelope::Envelope;
use warren_runtime::registry::Broker;

use super::Dispatch;
use super::acks::AckTracker;
use super::actor::ListenerMsg;
use super::event::{DeliveryInfo, Event, Outbox};
use super::handle::ListenerShared;
use super::redelivery::BodyKey;
use super::responders::{HandlerError, Outcome};
use super::spec::AckMode;

/// What the actor tells a running consumer loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Control {
    Run,
    /// Cancel the consumer and finish. With `finish_buffered`, messages the broker already
    /// sent are handled too (pause, drain); without, they go back to the queue when the
    /// channel closes (shutdown).
    Stop {
        deadline: Instant,
        finish_buffered: bool,
    },
}

/// Why a consumer loop ended.
#[derive(Clone, Debug)]
pub(crate) enum Ended {
    /// The channel or connection failed.
    Lost(String),
    /// The broker cancelled the consumer (e.g. the queue was deleted).
    Cancelled,
    /// A stop asked for by the actor completed.
    Stopped,
}

/// Everything one consumer loop needs.
pub(crate) struct ConsumerLoop {
    pub lease: u64,
    pub task: u64,
    pub tag: String,
    pub channel: Channel,
    pub consumer: Consumer,
    pub queue: String,
    pub broker: Arc<Broker>,
    pub shared: Arc<ListenerShared>,
    pub control: watch::Receiver<Control>,
    pub actor: ActorRef<ListenerMsg>,
}

/// How a message's handlers run.
enum Work {
    /// In the consumer loop itself (concurrency 1: no task switch per message).
    Inline(BoxFuture<'static, Outcome>),
    /// As a task of its own (concurrency > 1: in parallel, on any core).
    Spawned(JoinHandle<Outcome>),
}

/// A message whose handlers are running.
struct Running {
    tag: u64,
    key: Option<BodyKey>,
    work: Work,
}

impl Running {
    /// Stops the handlers (the stop deadline passed).
    fn abort(&self) {
        if let Work::Spawned(handle) = &self.work {
            handle.abort();
        }
    }
}

impl Future for Running {
    type Output = (u64, Option<BodyKey>, Outcome);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (tag, key) = (self.tag, self.key);
        let outcome = match &mut self.work {
            Work::Inline(future) => future.poll_unpin(cx),
            // The handlers' task never panics (panics are caught inside); an aborted one
            // means the stop deadline passed: requeue.
            Work::Spawned(handle) => handle
                .poll_unpin(cx)
                .map(|joined| joined.unwrap_or(Outcome::Requeue)),
        };
        outcome.map(|outcome| (tag, key, outcome))
    }
}

/// Lets the handlers of a lost channel finish on their own (their settlements would go to
/// a dead channel; the broker redelivers those messages).
fn detach(inflight: InFlight) {
    if !inflight.is_empty() {
        tokio::spawn(async move { inflight.for_each(|_| async {}).await });
    }
}

type InFlight = FuturesUnordered<Running>;

impl ConsumerLoop {
    /// Runs until the channel is lost, the broker cancels, or the actor stops it; then tells
    /// the actor.
    pub async fn run(mut self) {
        let ended = self.consume().await;
        let _ = self.actor.cast(ListenerMsg::ConsumerEnded {
            lease: self.lease,
            task: self.task,
            ended,
        });
    }

    fn settles(&self) -> bool {
        self.shared.settings.ack != AckMode::Broker
    }

    async fn consume(&mut self) -> Ended {
        let mut inflight = InFlight::new();
        let mut acks = AckTracker::new(self.shared.settings.prefetch);
        let concurrency = self.shared.settings.concurrency;
        loop {
            let control = *self.control.borrow();
            if let Control::Stop {
                deadline,
                finish_buffered,
            } = control
            {
                return self.stop(inflight, acks, deadline, finish_buffered).await;
            }
            // Settle what finished and take what arrived, without waiting.
            while let Some(Some(done)) = inflight.next().now_or_never() {
                self.finish(&mut acks, done).await;
            }
            let room = inflight.len() < concurrency;
            if room && let Some(item) = self.consumer.next().now_or_never() {
                if let Some(ended) = self.item(item, &mut inflight, &mut acks).await {
                    detach(inflight);
                    return ended;
                }
                if acks.due() {
                    acks.flush(&self.channel).await;
                }
                continue;
            }
            // Nothing ready: wait for the next thing to happen. Pending acks go out when
            // enough are due or when the oldest has waited `MAX_ACK_DELAY`, never right
            // here, so whoever a handler just woke (e.g. a caller waiting for this reply)
            // runs first.
            if acks.due() {
                acks.flush(&self.channel).await;
            }
            let flush_at = acks.deadline().map(tokio::time::Instant::from_std);
            tokio::select! {
                item = self.consumer.next(), if room => {
                    if let Some(ended) = self.item(item, &mut inflight, &mut acks).await {
                        detach(inflight);
                        return ended;
                    }
                }
                Some(done) = inflight.next(), if !inflight.is_empty() => {
                    self.finish(&mut acks, done).await;
                }
                _ = sleep_until(flush_at), if flush_at.is_some() => {
                    acks.flush(&self.channel).await;
                }
                changed = self.control.changed() => {
                    if changed.is_err() {
                        // The actor is gone: stop at once.
                        return self.stop(inflight, acks, Instant::now(), false).await;
                    }
                }
            }
        }
    }

    /// One item of lapin's stream. `Some` ends the loop.
    async fn item(
        &mut self,
        item: Option<lapin::Result<Delivery>>,
        inflight: &mut InFlight,
        acks: &mut AckTracker,
    ) -> Option<Ended> {
        match item {
            None => Some(Ended::Cancelled),
            Some(Err(error)) => Some(Ended::Lost(error.to_string())),
            Some(Ok(delivery)) => {
                self.accept(delivery, inflight, acks).await;
                None
            }
        }
    }

    /// Decodes a delivery and starts its responders (or settles it at once).
    async fn accept(&mut self, delivery: Delivery, inflight: &mut InFlight, acks: &mut AckTracker) {
        let shared = &self.shared;
        let settings = &shared.settings;
        shared.stats.received.increment();
        let tag = delivery.delivery_tag;
        let settles = self.settles();
        if settles {
            acks.delivered(tag);
        }
        let properties = &delivery.properties;
        let envelope = match Envelope::decode(
            &delivery.data,
            properties.content_type().as_ref().map(|s| s.as_str()),
            properties.content_encoding().as_ref().map(|s| s.as_str()),
        ) {
            Ok(envelope) => envelope,
            Err(error) => {
                tracing::warn!(listener = %shared.name, queue = %self.queue, routing_key = %delivery.routing_key, %error, "message is not a valid envelope; rejected");
                shared.stats.undecodable.increment();
                if settles {
                    shared.stats.rejected.increment();
                    acks.settle(&self.channel, tag, Outcome::Reject).await;
                }
                return;
            }
        };
        let (redeliveries, key) = shared.redeliveries.observe(&delivery);
        if redeliveries > settings.max_redeliveries {
            tracing::warn!(listener = %shared.name, msg_id = envelope.msg_id().unwrap_or(""), redeliveries, limit = settings.max_redeliveries, "message redelivered too often; rejected");
            shared.stats.redelivery_limit.increment();
            if let Some(key) = key {
                shared.redeliveries.forget(key);
            }
            if settles {
                shared.stats.rejected.increment();
                acks.settle(&self.channel, tag, Outcome::Reject).await;
            }
            return;
        }
        if settings.ack == AckMode::OnReceipt {
            shared.stats.acked.increment();
            acks.settle(&self.channel, tag, Outcome::Ack).await;
        }
        let event = Event::new(
            envelope,
            DeliveryInfo {
                exchange: delivery.exchange.to_string(),
                routing_key: delivery.routing_key.to_string(),
                redelivered: delivery.redelivered,
                delivery_tag: tag,
                properties: delivery.properties,
                queue: self.queue.clone(),
                broker: self.broker.clone(),
                lease: self.lease,
            },
            Some(Outbox {
                channel: self.channel.clone(),
                stamp: settings.stamp.clone(),
                timeout: settings.publish_timeout,
                listener: shared.listener.clone(),
            }),
        );
        let dispatch = shared.listener.on_event(&event);
        let handlers = match dispatch {
            Dispatch::Suppress => {
                shared.stats.suppressed.increment();
                Vec::new()
            }
            Dispatch::Responders => {
                let handlers = shared
                    .responders
                    .read()
                    .matching(event.category(), event.name());
                if handlers.is_empty() {
                    shared.stats.unmatched.increment();
                    tracing::debug!(listener = %shared.name, category = event.category(), name = event.name(), "no responder for this event");
                }
                handlers
            }
        };
        if handlers.is_empty() {
            if settings.ack == AckMode::Manual {
                shared.stats.acked.increment();
                acks.settle(&self.channel, tag, Outcome::Ack).await;
            }
            return;
        }
        let shared = shared.clone();
        let work = async move {
            let mut outcome = Outcome::Ack;
            for result in futures::future::join_all(handlers.into_iter().map(|handler| {
                let event = event.clone();
                AssertUnwindSafe(async move { handler(event).await }).catch_unwind()
            }))
            .await
            {
                let this = match result {
                    Ok(Ok(())) => Outcome::Ack,
                    Ok(Err(HandlerError::Retry(reason))) => {
                        tracing::warn!(listener = %shared.name, msg_id = event.envelope().msg_id().unwrap_or(""), %reason, "handler asked to retry; message requeued");
                        Outcome::Requeue
                    }
                    Ok(Err(HandlerError::Reject(reason))) => {
                        tracing::warn!(listener = %shared.name, msg_id = event.envelope().msg_id().unwrap_or(""), %reason, "handler rejected the message");
                        Outcome::Reject
                    }
                    Err(panic) => {
                        shared.stats.handler_panics.increment();
                        tracing::error!(listener = %shared.name, msg_id = event.envelope().msg_id().unwrap_or(""), category = event.category(), name = event.name(), panic = panic_text(panic.as_ref()), "handler panicked; message requeued");
                        Outcome::Requeue
                    }
                };
                outcome = outcome.combine(this);
            }
            outcome
        };
        let work = if self.shared.settings.concurrency == 1 {
            Work::Inline(Box::pin(work))
        } else {
            Work::Spawned(tokio::spawn(work))
        };
        inflight.push(Running { tag, key, work });
    }

    /// A message's handlers finished: settle it (in manual mode) and count it.
    async fn finish(
        &mut self,
        acks: &mut AckTracker,
        (tag, key, outcome): (u64, Option<BodyKey>, Outcome),
    ) {
        if self.shared.settings.ack != AckMode::Manual {
            return;
        }
        let stats = &self.shared.stats;
        match outcome {
            Outcome::Ack => stats.acked.increment(),
            Outcome::Requeue => stats.requeued.increment(),
            Outcome::Reject => stats.rejected.increment(),
        }
        if outcome != Outcome::Requeue
            && let Some(key) = key
        {
            self.shared.redeliveries.forget(key);
        }
        acks.settle(&self.channel, tag, outcome).await;
    }

    /// Cancels the consumer and finishes within the deadline.
    async fn stop(
        &mut self,
        mut inflight: InFlight,
        mut acks: AckTracker,
        deadline: Instant,
        finish_buffered: bool,
    ) -> Ended {
        let deadline = tokio::time::Instant::from_std(deadline);
        if let Err(error) = self
            .channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
            .await
        {
            tracing::debug!(listener = %self.shared.name, %error, "basic.cancel failed");
        }
        let concurrency = self.shared.settings.concurrency;
        if finish_buffered {
            // What the broker sent before the cancel is ours: handle it, until cancel-ok.
            loop {
                let room = inflight.len() < concurrency;
                tokio::select! {
                    item = self.consumer.next(), if room => match item {
                        None => break,
                        Some(Err(error)) => return Ended::Lost(error.to_string()),
                        Some(Ok(delivery)) => self.accept(delivery, &mut inflight, &mut acks).await,
                    },
                    Some(done) = inflight.next(), if !inflight.is_empty() => self.finish(&mut acks, done).await,
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        while !inflight.is_empty() {
            tokio::select! {
                Some(done) = inflight.next() => self.finish(&mut acks, done).await,
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(listener = %self.shared.name, running = inflight.len(), "handlers still running at the stop deadline: aborted, their messages go back to the queue");
                    for running in inflight.iter() {
                        running.abort();
                    }
                    break;
                }
            }
        }
        acks.flush(&self.channel).await;
        Ended::Stopped
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(text) = panic.downcast_ref::<&str>() {
        text
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text
    } else {
        "(not a string)"
    }
}
