//! The delivery loop of one consumer on one channel: lapin's stream → size check and
//! decode → failure limit → the listener's hook → matching responders → the confirms of
//! their publishes → verdict → ack / nack / reject, or parking.
//!
//! Settlements always go to the channel the delivery came on, so an ack for a delivery of
//! an old channel can never reach a new one. At most `concurrency` messages are handled at
//! once; lapin buffers no more than prefetch. Settlement is pipelined: once a message's
//! handlers finished, the confirms of its publishes are awaited outside that limit (so the
//! next message starts while a reply is on its way), and the message is settled when they
//! came (`confirms`). App code never takes the loop down: a panic
//! in a responder or in `on_event` is caught (nack + error log + counter) and the loop
//! lives on. A message that cannot succeed (rejected, undecodable, too large, past
//! `max_redeliveries`) leaves the queue once: to its dead-letter exchange, or to the
//! parking queue. Acks are coalesced (`acks`). The loop ends in one of three ways, and
//! returns which to its caller: the channel failed, the broker cancelled, or the actor
//! asked — to stop (cancel, let handlers finish until a deadline, ack what finished), or to
//! abandon a lost channel (handlers in flight finish on their own; their settlements would
//! go to a dead channel and the broker redelivers those messages).

use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, Stream, StreamExt};
use lapin::Consumer;
use lapin::message::Delivery;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;
use warren_runtime::envelope::{
    DecodeError, DecodeLimits, Envelope, decode_is_small, decode_owned,
};
use warren_runtime::log_limit::LogLimit;

use super::Dispatch;
use super::acks::{AckTracker, Finished, MAX_ACK_DELAY, Received, Refused};
use super::confirms;
use super::dedup::{Claim, Seen};
use super::event::{DeliveryInfo, Event, Outbox};
use super::handling::{self, HandlerEnd, panic_text};
use super::outcome::Outcome;
use super::parking;
use super::redelivery::body_key;
use super::responders::{HandlerError, Matched};
use super::shared::{GrantContext, ListenerShared, Settings};
use super::topology;

/// Repeating warnings about messages (bad bodies, rejects, retries): one line per listener
/// and kind per interval, with a count.
static MESSAGE_LOGS: LazyLock<LogLimit> = LazyLock::new(LogLimit::default);

/// What the actor tells a running consumer loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Control {
    Run,
    /// Cancel the consumer and finish. With `finish_buffered`, messages the broker already
    /// sent are handled too (pause, drain); without, they go back to the queue when the
    /// channel closes (shutdown). Handlers still running at `deadline` (if any) are
    /// abandoned and their messages go back to the queue.
    Stop {
        deadline: Option<Instant>,
        finish_buffered: bool,
    },
    /// The channel is lost: end at once; handlers in flight finish on their own.
    Abandon,
}

/// How a consumer loop ended.
#[derive(Clone, Debug)]
pub(crate) enum Ended {
    /// The channel or connection failed (or a settlement could not be written in time).
    Lost(String),
    /// The broker cancelled the consumer (e.g. the queue was deleted).
    Cancelled,
    /// A stop asked for by the actor completed.
    Stopped,
    /// The actor abandoned the channel.
    Abandoned,
}

/// Everything one consumer loop needs.
pub(crate) struct ConsumerLoop {
    pub tag: String,
    pub context: Arc<GrantContext>,
    pub consumer: Consumer,
    pub queue: Arc<str>,
    pub shared: Arc<ListenerShared>,
    pub control: watch::Receiver<Control>,
    /// Deliveries received and not settled yet (read by the actor while draining).
    pub in_flight: Arc<AtomicUsize>,
}

/// What becomes of one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Ack,
    /// Back to the queue (a failure, already counted, or deferred).
    Requeue,
    /// Rejected to the queue's dead-letter exchange.
    DeadLetter,
    /// Copied to the parking queue; the original is acked.
    Parked,
    /// Nothing to send: the broker considers it delivered (no-ack) or it was acked on
    /// receipt.
    Settled,
}

/// Where a message's work stands when its handlers are done.
enum Stage {
    /// Nothing more to wait for.
    Done(Verdict),
    /// The handlers finished; the confirms of their publishes are still owed. This runs
    /// outside the concurrency limit.
    Confirming(BoxFuture<'static, Verdict>),
}

/// How a message's work runs.
enum Work {
    /// In the consumer loop itself (concurrency 1: no task switch per message).
    Inline(BoxFuture<'static, Stage>),
    /// As a task of its own (concurrency > 1: in parallel, on any core).
    Spawned(JoinHandle<Stage>),
}

/// A message whose work is running.
struct Running {
    tag: u64,
    work: Work,
}

impl Running {
    /// Stops the work (the stop deadline passed).
    fn abort(&self) {
        if let Work::Spawned(handle) = &self.work {
            handle.abort();
        }
    }
}

impl Future for Running {
    type Output = (u64, Stage);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let tag = self.tag;
        let stage = match &mut self.work {
            Work::Inline(future) => future.poll_unpin(cx),
            // The work never panics (panics are caught inside); an aborted one means the
            // stop deadline passed: back to the queue.
            Work::Spawned(handle) => handle
                .poll_unpin(cx)
                .map(|joined| joined.unwrap_or(Stage::Done(Verdict::Requeue))),
        };
        stage.map(|stage| (tag, stage))
    }
}

/// A message whose handlers finished, waiting for the confirms of their publishes.
struct Confirming {
    tag: u64,
    rest: BoxFuture<'static, Verdict>,
}

impl Future for Confirming {
    type Output = (u64, Verdict);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let tag = self.tag;
        self.rest.poll_unpin(cx).map(|verdict| (tag, verdict))
    }
}

/// The messages of one consumer loop that are not settled yet: handlers running (at most
/// `concurrency`), and handlers done with confirms still owed. As a stream it yields each
/// message once its verdict is known.
#[derive(Default)]
struct InFlight {
    running: FuturesUnordered<Running>,
    confirming: FuturesUnordered<Confirming>,
}

impl InFlight {
    fn push(&mut self, running: Running) {
        self.running.push(running);
    }

    /// Whether another message's handlers may start.
    fn has_room(&self, concurrency: usize) -> bool {
        self.running.len() < concurrency
    }

    fn is_empty(&self) -> bool {
        self.running.is_empty() && self.confirming.is_empty()
    }

    fn len(&self) -> usize {
        self.running.len() + self.confirming.len()
    }

    /// Stops the running handlers (the stop deadline passed).
    fn abort(&self) {
        for running in self.running.iter() {
            running.abort();
        }
    }
}

/// What moved on in the messages in flight.
enum Step {
    /// A message's verdict is known: settle it.
    Settled(u64, Verdict),
    /// A message's handlers finished and its confirms are owed: another may start.
    HandlersDone,
}

impl Stream for InFlight {
    type Item = Step;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Step>> {
        if let Poll::Ready(Some((tag, stage))) = self.running.poll_next_unpin(cx) {
            return Poll::Ready(Some(match stage {
                Stage::Done(verdict) => Step::Settled(tag, verdict),
                Stage::Confirming(rest) => {
                    self.confirming.push(Confirming { tag, rest });
                    Step::HandlersDone
                }
            }));
        }
        match self.confirming.poll_next_unpin(cx) {
            Poll::Ready(Some((tag, verdict))) => Poll::Ready(Some(Step::Settled(tag, verdict))),
            Poll::Ready(None) if self.running.is_empty() => Poll::Ready(None),
            _ => Poll::Pending,
        }
    }
}

/// Lets the work of a lost channel finish on its own (its settlements would go to a dead
/// channel; the broker redelivers those messages).
fn detach(inflight: InFlight) {
    if !inflight.is_empty() {
        tokio::spawn(async move { inflight.for_each(|_| async {}).await });
    }
}

/// What went wrong with a message before any handler ran.
enum Refusal {
    Decode(DecodeError),
    TooOften(u32),
}

impl ConsumerLoop {
    /// Runs until the channel is lost, the broker cancels, or the actor stops it, and says
    /// which. A panic inside the loop itself (not app code, which is caught where it runs)
    /// is reported as a lost channel, so the actor sets the listener up again.
    pub async fn run(mut self) -> Ended {
        match AssertUnwindSafe(self.consume()).catch_unwind().await {
            Ok(ended) => ended,
            Err(panic) => Ended::Lost(format!(
                "the consumer loop panicked: {}",
                panic_text(panic.as_ref())
            )),
        }
    }

    fn timeout(&self) -> std::time::Duration {
        self.shared.settings.operation_timeout
    }

    async fn consume(&mut self) -> Ended {
        let mut inflight = InFlight::default();
        let mut acks = AckTracker::new(self.shared.settings.prefetch);
        let concurrency = self.shared.settings.concurrency;
        // One delivery taken while no handler could start, so that the end of the stream
        // (the broker cancelled the consumer, the channel failed) is seen at once even
        // while every handler is busy.
        let mut held: Option<Delivery> = None;
        let mut flush_timer = FlushTimer::new();
        loop {
            let control = *self.control.borrow();
            match control {
                Control::Run => {}
                Control::Abandon => {
                    detach(inflight);
                    return Ended::Abandoned;
                }
                Control::Stop {
                    deadline,
                    finish_buffered,
                } => {
                    if let Some(delivery) = held.take()
                        && let Err(ended) = self
                            .give_back_held(delivery, finish_buffered, &mut inflight, &mut acks)
                            .await
                    {
                        detach(inflight);
                        return ended;
                    }
                    return self.stop(inflight, acks, deadline, finish_buffered).await;
                }
            }
            // Settle what finished and take what arrived, without waiting.
            while let Some(Some(done)) = inflight.next().now_or_never() {
                if let Err(ended) = self.advance(&mut acks, done).await {
                    detach(inflight);
                    return ended;
                }
            }
            let room = inflight.has_room(concurrency);
            if room && let Some(delivery) = held.take() {
                if let Err(ended) = self.accept(delivery, &mut inflight, &mut acks).await {
                    detach(inflight);
                    return ended;
                }
                continue;
            }
            if room && let Some(item) = self.consumer.next().now_or_never() {
                if let Some(ended) = self.item(item, &mut inflight, &mut acks).await {
                    detach(inflight);
                    return ended;
                }
                if acks.due()
                    && let Err(ended) = self.flush(&mut acks).await
                {
                    detach(inflight);
                    return ended;
                }
                continue;
            }
            // Nothing ready: wait for the next thing to happen. Pending acks go out when
            // enough are due or when the oldest has waited `MAX_ACK_DELAY`, never right
            // here, so whoever a handler just woke (e.g. a caller waiting for this reply)
            // runs first.
            if acks.due()
                && let Err(ended) = self.flush(&mut acks).await
            {
                detach(inflight);
                return ended;
            }
            let flush_armed = flush_timer.arm(acks.deadline());
            let ended = tokio::select! {
                item = self.consumer.next(), if room || held.is_none() => match item {
                    // No handler can start yet: keep it for when one can.
                    Some(Ok(delivery)) if !room => {
                        held = Some(delivery);
                        None
                    }
                    item => self.item(item, &mut inflight, &mut acks).await,
                },
                Some(done) = inflight.next(), if !inflight.is_empty() => {
                    self.advance(&mut acks, done).await.err()
                }
                _ = flush_timer.fired(), if flush_armed => {
                    self.flush(&mut acks).await.err()
                }
                changed = self.control.changed() => {
                    if changed.is_err() {
                        // The actor is gone: stop at once.
                        return self.stop(inflight, acks, Some(Instant::now()), false).await;
                    }
                    None
                }
            };
            if let Some(ended) = ended {
                detach(inflight);
                return ended;
            }
        }
    }

    /// A delivery held back when the loop is asked to stop: handled when the stop finishes
    /// what the broker sent (pause, drain), else given back to the queue at once.
    async fn give_back_held(
        &mut self,
        delivery: Delivery,
        finish_buffered: bool,
        inflight: &mut InFlight,
        acks: &mut AckTracker,
    ) -> Result<(), Ended> {
        if finish_buffered {
            return self.accept(delivery, inflight, acks).await;
        }
        if self.shared.settings.ack.received() == Received::Untracked {
            return Ok(());
        }
        self.settle(acks, delivery.delivery_tag, Outcome::Defer)
            .await
    }

    async fn flush(&self, acks: &mut AckTracker) -> Result<(), Ended> {
        acks.flush(&self.context.channel, self.timeout())
            .await
            .map_err(|stuck| Ended::Lost(stuck.0))
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
            Some(Ok(delivery)) => self.accept(delivery, inflight, acks).await.err(),
        }
    }

    /// Checks and decodes a delivery, then starts its work (or settles it at once).
    async fn accept(
        &mut self,
        mut delivery: Delivery,
        inflight: &mut InFlight,
        acks: &mut AckTracker,
    ) -> Result<(), Ended> {
        let shared = self.shared.clone();
        let settings = &shared.settings;
        shared.stats.received.increment();
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let tag = delivery.delivery_tag;
        let received = settings.ack.received();
        if received != Received::Untracked {
            acks.delivered(tag);
        }
        let before = shared.failures.before(&delivery, settings.quorum);
        let decoded = if before > settings.max_redeliveries {
            Err(Refusal::TooOften(before))
        } else {
            decode(&mut delivery, settings.max_message_bytes)
                .await
                .map_err(Refusal::Decode)
        };
        let envelope = match decoded {
            Ok(envelope) => envelope,
            Err(refusal) => return self.refuse(delivery, refusal, inflight, acks).await,
        };
        if received == Received::AckNow {
            shared.stats.acked.increment();
            self.settle(acks, tag, Outcome::Ack).await?;
        }
        let Delivery {
            data,
            exchange,
            routing_key,
            redelivered,
            properties,
            ..
        } = delivery;
        let event = Event::new(
            envelope,
            DeliveryInfo {
                exchange: exchange.into(),
                routing_key: routing_key.into(),
                redelivered,
                delivery_tag: tag,
                properties,
                queue: self.queue.clone(),
                broker: self.context.broker.clone(),
                grant: self.context.grant,
            },
            Outbox {
                publisher: self.context.publisher.clone(),
                timeout: settings.publish_timeout,
                listener: shared.listener.clone(),
            },
        );
        let once = match self.once(&event) {
            Ok(once) => once,
            Err(verdict) => return self.finish(acks, (tag, verdict)).await,
        };
        let handlers = match self.dispatch(&event) {
            Some(handlers) => handlers,
            // `on_event` panicked: a failure of this message, like a responder's panic.
            None => {
                let work = self.conclude(event, data, before, None, once);
                self.start(tag, work, inflight);
                return Ok(());
            }
        };
        if handlers.is_empty() {
            if before > 0 {
                shared
                    .failures
                    .forget(body_key(&data, &event.delivery().routing_key));
            }
            end_claim(once.claim(), Outcome::Ack);
            return self.finish(acks, (tag, handled_verdict(settings))).await;
        }
        let work = self.conclude(event, data, before, Some(handlers), once);
        self.begin(tag, work, inflight, acks).await
    }

    /// The hook, then the matching responders; `None` when the hook panicked.
    fn dispatch(&self, event: &Event) -> Option<Matched> {
        let shared = &self.shared;
        match handling::hook(shared.listener.as_ref(), event) {
            Ok(Dispatch::Responders) => {
                let handlers = shared
                    .responders
                    .read()
                    .matching(event.category(), event.name());
                if handlers.is_empty() {
                    shared.stats.unmatched.increment();
                    tracing::debug!(listener = %shared.name, category = event.category(), name = event.name(), "no responder for this event");
                }
                Some(handlers)
            }
            Ok(Dispatch::Suppress) => {
                shared.stats.suppressed.increment();
                Some(Matched::None)
            }
            Err(panic) => {
                shared.stats.handler_panics.increment();
                log_message(shared, "panic", |held| {
                    tracing::error!(listener = %shared.name, msg_id = event.envelope().msg_id().unwrap_or(""), %panic, suppressed = held, "on_event panicked; message requeued");
                });
                None
            }
        }
    }

    /// A message refused before any handler ran: off the queue once (dead-lettered or
    /// parked), never requeued.
    async fn refuse(
        &mut self,
        delivery: Delivery,
        refusal: Refusal,
        inflight: &mut InFlight,
        acks: &mut AckTracker,
    ) -> Result<(), Ended> {
        let shared = self.shared.clone();
        let reason = match &refusal {
            Refusal::Decode(error) => {
                shared.stats.undecodable.increment();
                log_message(&shared, "undecodable", |held| {
                    tracing::warn!(listener = %shared.name, queue = %self.queue, routing_key = %delivery.routing_key, %error, suppressed = held, "message is not a valid envelope; taken off the queue");
                });
                format!("not a valid envelope: {error}")
            }
            Refusal::TooOften(failures) => {
                shared.stats.redelivery_limit.increment();
                log_message(&shared, "limit", |held| {
                    tracing::warn!(listener = %shared.name, queue = %self.queue, failures, limit = shared.settings.max_redeliveries, suppressed = held, "message failed too often; taken off the queue");
                });
                format!(
                    "handlers failed on it {failures} times (max_redeliveries = {})",
                    shared.settings.max_redeliveries
                )
            }
        };
        if shared.settings.ack.undecodable() == Refused::Gone {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Ok(());
        }
        let tag = delivery.delivery_tag;
        if shared.settings.dead_letter {
            return self.finish(acks, (tag, Verdict::DeadLetter)).await;
        }
        let work = {
            let (shared, context) = (shared.clone(), self.context.clone());
            async move {
                let Delivery {
                    data,
                    exchange,
                    routing_key,
                    properties,
                    ..
                } = delivery;
                let message = parking::Message {
                    data,
                    properties: &properties,
                    exchange: exchange.as_str(),
                    routing_key: routing_key.as_str(),
                };
                Stage::Done(park_or_requeue(&shared, &context, message, &reason).await)
            }
        };
        self.start(tag, Box::pin(work), inflight);
        Ok(())
    }

    /// The work that settles a message whose handlers end with `outcome`: at once when
    /// they published nothing (or when the ack mode settled the message already, then
    /// with the confirms awaited here), else once the confirms came.
    /// `None` for handlers: the hook panicked, a failure of the message.
    fn conclude(
        &self,
        event: Event,
        data: Vec<u8>,
        before: u32,
        handlers: Option<Matched>,
        once: Once,
    ) -> BoxFuture<'static, Stage> {
        let (shared, context) = (self.shared.clone(), self.context.clone());
        Box::pin(async move {
            let claim = match once.settle(&shared).await {
                Ok(claim) => claim,
                // A copy of a message handled meanwhile: acked without its handlers.
                Err(verdict) => return Stage::Done(verdict),
            };
            let outcome = match handlers {
                Some(handlers) => run_handlers(&shared, &event, handlers).await,
                None => Outcome::Requeue,
            };
            let owed = event.owed().take();
            if owed.is_empty() {
                end_claim(claim, outcome);
                return Stage::Done(
                    conclusion(&shared, &context, &event, data, before, outcome).await,
                );
            }
            if shared.settings.ack.finished() == Finished::Settled {
                // Nothing to settle: wait here, so that work in flight stays within the
                // concurrency limit when the broker does not bound it (no-ack).
                let (outcome, _) = confirms::settle(owed, outcome).await;
                end_claim(claim, outcome);
                return Stage::Done(Verdict::Settled);
            }
            Stage::Confirming(Box::pin(async move {
                let (outcome, unconfirmed) = confirms::settle(owed, outcome).await;
                if let Some(unconfirmed) = unconfirmed {
                    shared.stats.unconfirmed.increment();
                    log_message(&shared, "unconfirmed", |held| {
                        tracing::warn!(listener = %shared.name, msg_id = event.envelope().msg_id().unwrap_or(""), failed = unconfirmed.failed, first = %unconfirmed.first, then = after_unconfirmed(outcome), suppressed = held, "a publish of the handlers was not confirmed");
                    });
                }
                end_claim(claim, outcome);
                conclusion(&shared, &context, &event, data, before, outcome).await
            }))
        })
    }

    /// Where a message stands in the listener's de-duplication window (if it has one):
    /// `Err` with its verdict when it was handled already (acked without its handlers).
    fn once(&self, event: &Event) -> Result<Once, Verdict> {
        let shared = &self.shared;
        let Some(window) = &shared.dedup else {
            return Ok(Once::Off);
        };
        let Some(msg_id) = event.envelope().msg_id() else {
            return Ok(Once::Off);
        };
        match window.claim(msg_id) {
            Seen::New(claim) => Ok(Once::First(claim)),
            Seen::Running(notify) => Ok(Once::Copy(msg_id.to_string(), notify)),
            Seen::Handled(()) => {
                shared.stats.duplicates.increment();
                tracing::debug!(listener = %shared.name, msg_id, "handled already; acked without running the handlers");
                Err(handled_verdict(&shared.settings))
            }
        }
    }

    /// Starts a message's work. The work is polled once right here first (at concurrency
    /// 1 only with no other handler running, so handlers stay one at a time): handlers
    /// that are done at once (nothing they await has to wait) settle without a trip
    /// through the set of messages in flight — the common case, and a measurable part of
    /// the cost per delivery; and above concurrency 1, what a handler does before its
    /// first wait (an RPC server's reply is written then) is not delayed by a task
    /// spawn. Otherwise (and if that first poll is pending) the work runs in the set as
    /// usual, spawned above concurrency 1; the set, or the spawned task, polls it again at
    /// once, so the first poll's no-op waker is never relied on.
    async fn begin(
        &mut self,
        tag: u64,
        mut work: BoxFuture<'static, Stage>,
        inflight: &mut InFlight,
        acks: &mut AckTracker,
    ) -> Result<(), Ended> {
        if (self.shared.settings.concurrency > 1 || inflight.running.is_empty())
            && let Some(stage) = (&mut work).now_or_never()
        {
            return match stage {
                Stage::Done(verdict) => self.finish(acks, (tag, verdict)).await,
                Stage::Confirming(rest) => {
                    inflight.confirming.push(Confirming { tag, rest });
                    Ok(())
                }
            };
        }
        self.start(tag, work, inflight);
        Ok(())
    }

    fn start(&self, tag: u64, work: BoxFuture<'static, Stage>, inflight: &mut InFlight) {
        let work = if self.shared.settings.concurrency == 1 {
            Work::Inline(work)
        } else {
            Work::Spawned(tokio::spawn(work))
        };
        inflight.push(Running { tag, work });
    }

    async fn settle(&self, acks: &mut AckTracker, tag: u64, outcome: Outcome) -> Result<(), Ended> {
        acks.settle(&self.context.channel, tag, outcome, self.timeout())
            .await
            .map_err(|stuck| Ended::Lost(stuck.0))
    }

    /// A message's work moved on: settle it once its verdict is known.
    async fn advance(&mut self, acks: &mut AckTracker, step: Step) -> Result<(), Ended> {
        match step {
            Step::Settled(tag, verdict) => self.finish(acks, (tag, verdict)).await,
            Step::HandlersDone => Ok(()),
        }
    }

    /// A message's work finished: settle it and count it.
    async fn finish(
        &mut self,
        acks: &mut AckTracker,
        (tag, verdict): (u64, Verdict),
    ) -> Result<(), Ended> {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let stats = &self.shared.stats;
        let wire = match verdict {
            Verdict::Settled => return Ok(()),
            Verdict::Ack => {
                stats.acked.increment();
                Outcome::Ack
            }
            Verdict::Requeue => {
                stats.requeued.increment();
                Outcome::Requeue
            }
            Verdict::DeadLetter => {
                stats.rejected.increment();
                Outcome::Reject
            }
            Verdict::Parked => {
                stats.rejected.increment();
                stats.parked.increment();
                Outcome::Ack
            }
        };
        self.settle(acks, tag, wire).await
    }

    /// Cancels the consumer and finishes within the deadline.
    async fn stop(
        &mut self,
        mut inflight: InFlight,
        mut acks: AckTracker,
        deadline: Option<Instant>,
        finish_buffered: bool,
    ) -> Ended {
        if let Err(error) = topology::cancel(&self.context.channel, &self.tag, self.timeout()).await
        {
            tracing::debug!(listener = %self.shared.name, %error, "basic.cancel failed");
        }
        let deadline = deadline.map(tokio::time::Instant::from_std);
        let concurrency = self.shared.settings.concurrency;
        let mut control = self.control.clone();
        if finish_buffered {
            // What the broker sent before the cancel is ours: handle it, until cancel-ok.
            loop {
                let room = inflight.has_room(concurrency);
                let step = tokio::select! {
                    item = self.consumer.next(), if room => match item {
                        None => break,
                        Some(Err(error)) => Err(Ended::Lost(error.to_string())),
                        Some(Ok(delivery)) => self.accept(delivery, &mut inflight, &mut acks).await,
                    },
                    Some(done) = inflight.next(), if !inflight.is_empty() => self.advance(&mut acks, done).await,
                    _ = sleep_until(deadline), if deadline.is_some() => break,
                    abandon = abandoned(&mut control) => {
                        if abandon { Err(Ended::Abandoned) } else { Ok(()) }
                    }
                };
                if let Err(ended) = step {
                    detach(inflight);
                    return ended;
                }
            }
        }
        while !inflight.is_empty() {
            let step = tokio::select! {
                Some(done) = inflight.next() => self.advance(&mut acks, done).await,
                _ = sleep_until(deadline), if deadline.is_some() => {
                    tracing::warn!(listener = %self.shared.name, running = inflight.len(), "handlers still running at the stop deadline: abandoned, their messages go back to the queue");
                    inflight.abort();
                    break;
                }
                abandon = abandoned(&mut control) => {
                    if abandon { Err(Ended::Abandoned) } else { Ok(()) }
                }
            };
            if let Err(ended) = step {
                detach(inflight);
                return ended;
            }
        }
        if let Err(ended) = self.flush(&mut acks).await {
            return ended;
        }
        Ended::Stopped
    }
}

/// Resolves when the control changes: true when the actor now abandons the channel.
async fn abandoned(control: &mut watch::Receiver<Control>) -> bool {
    match control.changed().await {
        Ok(()) => *control.borrow() == Control::Abandon,
        Err(_) => {
            // The actor is gone; nothing will change any more.
            std::future::pending::<()>().await;
            false
        }
    }
}

/// Decodes a delivery's body as a kapi envelope within the listener's limits (a body
/// above `max_bytes` is refused unread); a large or compressed body is decoded off the
/// async worker threads.
async fn decode(delivery: &mut Delivery, max_bytes: usize) -> Result<Envelope, DecodeError> {
    let limits = DecodeLimits::new(max_bytes);
    let properties = &delivery.properties;
    let content_type = properties.content_type().as_ref().map(|s| s.as_str());
    let content_encoding = properties.content_encoding().as_ref().map(|s| s.as_str());
    if decode_is_small(delivery.data.len(), content_encoding) {
        return Envelope::decode_with(&delivery.data, content_type, content_encoding, &limits);
    }
    let (content_type, content_encoding) = (
        content_type.map(str::to_string),
        content_encoding.map(str::to_string),
    );
    let body = std::mem::take(&mut delivery.data);
    let (body, decoded) = decode_owned(body, content_type, content_encoding, limits).await;
    delivery.data = body;
    decoded
}

/// Runs every matching handler, each with its panics caught, logs how they failed, times
/// them, and combines their results. They run in one `handle` span carrying the event's trace id,
/// queue, Event-Category and Event-Name, so every line logged while handling it says which
/// trace it belongs to (the trace id is formatted only if a subscriber records the span;
/// `event_name`, not `name`, which JSON logs use for the span's own name).
async fn run_handlers(shared: &ListenerShared, event: &Event, handlers: Matched) -> Outcome {
    let span = tracing::info_span!(
        "handle",
        trace_id = %event.trace().trace_id(),
        queue = %event.delivery().queue,
        event_category = event.category(),
        event_name = event.name(),
    );
    let msg_id = event.envelope().msg_id().unwrap_or("");
    let started = shared.handler_seconds.as_ref().map(|_| Instant::now());
    let outcome = handling::run(event, handlers, |end| match end {
        HandlerEnd::Returned(Ok(())) => {}
        HandlerEnd::Returned(Err(HandlerError::Retry(reason))) => {
            log_message(shared, "retry", |held| {
                tracing::warn!(listener = %shared.name, msg_id, %reason, suppressed = held, "handler asked to retry; message requeued");
            });
        }
        HandlerEnd::Returned(Err(HandlerError::Reject(reason))) => {
            log_message(shared, "reject", |held| {
                tracing::warn!(listener = %shared.name, msg_id, %reason, suppressed = held, "handler rejected the message");
            });
        }
        HandlerEnd::Returned(Err(HandlerError::Defer(reason))) => {
            tracing::debug!(listener = %shared.name, msg_id, %reason, "handler deferred the message");
        }
        HandlerEnd::Panicked(panic) => {
            shared.stats.handler_panics.increment();
            log_message(shared, "panic", |held| {
                tracing::error!(listener = %shared.name, msg_id, category = event.category(), name = event.name(), %panic, suppressed = held, "handler panicked; message requeued");
            });
        }
    })
    .instrument(span)
    .await;
    if let (Some(seconds), Some(started)) = (&shared.handler_seconds, started) {
        seconds.observe(started.elapsed().as_secs_f64());
    }
    outcome
}

/// What becomes of a message whose handlers ended with `outcome`: a failure is counted,
/// and one past the limit (or a rejection) leaves the queue for good.
async fn conclusion(
    shared: &ListenerShared,
    context: &GrantContext,
    event: &Event,
    data: Vec<u8>,
    before: u32,
    outcome: Outcome,
) -> Verdict {
    let settings = &shared.settings;
    if settings.ack.finished() == Finished::Settled {
        return Verdict::Settled;
    }
    let routing_key = event.delivery().routing_key.as_str();
    let reason = match outcome {
        Outcome::Ack => {
            if before > 0 {
                shared.failures.forget(body_key(&data, routing_key));
            }
            return Verdict::Ack;
        }
        Outcome::Defer => {
            shared.stats.deferred.increment();
            return Verdict::Requeue;
        }
        Outcome::Requeue => {
            let key = body_key(&data, routing_key);
            let failures = shared.failures.failed(key, before, settings.quorum);
            if failures <= settings.max_redeliveries {
                return Verdict::Requeue;
            }
            shared.stats.redelivery_limit.increment();
            shared.failures.forget(key);
            log_message(shared, "limit", |held| {
                tracing::warn!(listener = %shared.name, msg_id = event.envelope().msg_id().unwrap_or(""), failures, limit = settings.max_redeliveries, suppressed = held, "message failed too often; taken off the queue");
            });
            format!(
                "handlers failed on it {failures} times (max_redeliveries = {})",
                settings.max_redeliveries
            )
        }
        Outcome::Reject => {
            if before > 0 {
                shared.failures.forget(body_key(&data, routing_key));
            }
            "rejected by a handler".to_string()
        }
    };
    if let Err(panic) = handling::failed(shared.listener.as_ref(), event, &reason) {
        shared.stats.handler_panics.increment();
        log_message(shared, "panic", |held| {
            tracing::error!(listener = %shared.name, msg_id = event.envelope().msg_id().unwrap_or(""), %panic, suppressed = held, "on_failed panicked; ignored");
        });
    }
    if settings.dead_letter {
        return Verdict::DeadLetter;
    }
    let delivery = event.delivery();
    let message = parking::Message {
        data,
        properties: &delivery.properties,
        exchange: &delivery.exchange,
        routing_key,
    };
    park_or_requeue(shared, context, message, &reason).await
}

/// Parks a message; if that fails it goes back to the queue (nothing is dropped).
async fn park_or_requeue(
    shared: &ListenerShared,
    context: &GrantContext,
    message: parking::Message<'_>,
    reason: &str,
) -> Verdict {
    match parking::park(shared, context, message, reason).await {
        Ok(()) => Verdict::Parked,
        Err(error) => {
            log_message(shared, "park", |held| {
                tracing::error!(listener = %shared.name, parking = %shared.settings.parking, %error, suppressed = held, "cannot park a message; it goes back to the queue");
            });
            Verdict::Requeue
        }
    }
}

/// What becomes of a message some of whose publishes were not confirmed, for its log line.
fn after_unconfirmed(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Requeue => "the message is retried",
        Outcome::Defer => "the message goes back to the queue, not counted as a failure",
        Outcome::Reject => "the message stays rejected",
        Outcome::Ack => "the message is acked",
    }
}

/// A message's place in the listener's de-duplication window.
enum Once {
    /// The listener has no window, or the message no Msg-ID.
    Off,
    /// The first copy: handled under this claim.
    First(Claim),
    /// A copy of one being handled elsewhere (on a lost channel): waits for it first.
    Copy(String, Arc<Notify>),
}

impl Once {
    /// The claim to handle the message under (`Err`: acked without handling, the first
    /// copy succeeded). A copy waits for the first copy at most the stop and publish
    /// bounds together (its handlers, then its confirms); past that it is handled.
    async fn settle(self, shared: &ListenerShared) -> Result<Option<Claim>, Verdict> {
        let (msg_id, notify) = match self {
            Once::Off => return Ok(None),
            Once::First(claim) => return Ok(Some(claim)),
            Once::Copy(msg_id, notify) => (msg_id, notify),
        };
        let Some(window) = &shared.dedup else {
            return Ok(None);
        };
        let hold = shared.settings.stop_timeout + shared.settings.publish_timeout;
        match window.wait(&msg_id, notify, hold).await {
            Seen::New(claim) => Ok(Some(claim)),
            Seen::Running(_) => Ok(None),
            Seen::Handled(()) => {
                shared.stats.duplicates.increment();
                tracing::debug!(listener = %shared.name, msg_id, "handled meanwhile; acked without running the handlers");
                Err(handled_verdict(&shared.settings))
            }
        }
    }

    /// The claim, for a message that needs no handling.
    fn claim(self) -> Option<Claim> {
        match self {
            Once::First(claim) => Some(claim),
            Once::Off | Once::Copy(..) => None,
        }
    }
}

/// Ends a message's claim in the window: remembered when its final outcome is an ack.
fn end_claim(claim: Option<Claim>, outcome: Outcome) {
    if let Some(claim) = claim {
        claim.end((outcome == Outcome::Ack).then_some(()));
    }
}

/// The verdict of a message that is done without running handlers.
fn handled_verdict(settings: &Settings) -> Verdict {
    match settings.ack.finished() {
        Finished::ByOutcome => Verdict::Ack,
        Finished::Settled => Verdict::Settled,
    }
}

/// Logs a line about messages of `shared`'s listener, at most once per interval per kind.
fn log_message(shared: &ListenerShared, kind: &str, log: impl FnOnce(u64)) {
    if let Some(held) = MESSAGE_LOGS.allow(&format!("{}:{kind}", shared.name)) {
        log(held);
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The deadline of the oldest pending ack, as one timer that moves only when the
/// deadline does (once per batch of acks), rather than a timer registered and dropped
/// each time the loop waits.
struct FlushTimer {
    sleep: Pin<Box<tokio::time::Sleep>>,
    armed: Option<Instant>,
}

impl FlushTimer {
    fn new() -> FlushTimer {
        FlushTimer {
            sleep: Box::pin(tokio::time::sleep(MAX_ACK_DELAY)),
            armed: None,
        }
    }

    /// Sets the timer to `deadline` if that is new; whether the timer is armed at all.
    fn arm(&mut self, deadline: Option<Instant>) -> bool {
        let Some(deadline) = deadline else {
            return false;
        };
        if self.armed != Some(deadline) {
            self.sleep
                .as_mut()
                .reset(tokio::time::Instant::from_std(deadline));
            self.armed = Some(deadline);
        }
        true
    }

    /// Completes at the armed deadline (at once if it passed).
    fn fired(&mut self) -> &mut Pin<Box<tokio::time::Sleep>> {
        &mut self.sleep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unconfirmed_line_says_what_really_happens() {
        assert_eq!(
            after_unconfirmed(Outcome::Requeue),
            "the message is retried"
        );
        assert!(after_unconfirmed(Outcome::Defer).contains("not counted as a failure"));
        assert_eq!(
            after_unconfirmed(Outcome::Reject),
            "the message stays rejected"
        );
    }
}
