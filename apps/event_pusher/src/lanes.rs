//! Lanes: how events are published with many confirms owed and yet one user's events reach
//! the exchange in the order they were accepted, across a failover too.
//!
//! Events are spread over N lanes by a hash of their subject (the lowercased bare JID of
//! the routing key), so all events of one user take one lane, in the order they were
//! accepted. A lane is one task; it writes its events in order through a [`Sequence`],
//! which keeps every write on one channel, with up to `lane_window` confirms owed. It
//! settles its events in order too: the oldest unconfirmed event first.
//!
//! - A confirm arrives: that event is done (its caller hears `Ok`).
//! - A confirm fails (the channel or connection died, or the broker nacked): the lane
//!   **rewinds**: that event and every later one in flight are written again, in order,
//!   on a channel taken afresh (the new primary after a failover), never overtaking each
//!   other. Over one channel the broker routed a prefix of what was written, so the
//!   exchange sees a user's events in order, possibly with a repeated stretch (at least
//!   once, never reordered; a consumer that wants each event once keeps the highest it saw
//!   per user). The one exception is a nack followed by acks on the same channel, which
//!   RabbitMQ gives only for internal errors or a queue's `reject-publish` overflow: the
//!   later events then arrive before the re-sent one.
//! - The channel of the events in flight cannot take more (it died, its broker blocks, or
//!   the primary moved): the lane writes nothing new until they are settled, then moves.
//! - An event still unconfirmed at its deadline (accepted + `[publisher] timeout_ms`)
//!   fails: its caller hears the error (HTTP: 503), nothing is dropped silently.
//!
//! Owns the lanes and their order. Must not touch JSON or HTTP, nor which broker is
//! primary (the publisher's).

use std::collections::VecDeque;
use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use warren_listeners::prelude::*;

use crate::event::Outgoing;
use crate::figures::PusherFigures;

/// Pause before writing again after a write found no usable channel.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// What became of one event: confirmed on a broker, or the publish error it ended with.
pub type Outcome = Result<BrokerId, PublishError>;

/// One event given to a lane.
pub struct Job {
    pub outgoing: Outgoing,
    /// When it fails if it is not confirmed yet.
    pub deadline: Instant,
    pub done: oneshot::Sender<Outcome>,
}

/// An event written and not yet confirmed.
struct InFlight {
    job: Job,
    sent: Sent,
    written: Instant,
}

/// The lanes of one event pusher. Dropping it ends the lanes once they settled what they
/// hold.
///
/// It exists so that callers hand events over without knowing lanes: [`Lanes::lane_of`]
/// picks the lane by subject, [`Lanes::submit`] queues in order.
pub struct Lanes {
    senders: Vec<mpsc::Sender<Job>>,
}

/// How the lanes publish.
pub struct LaneSettings {
    pub lanes: usize,
    pub window: usize,
    pub properties: BasicProperties,
    pub declare: Vec<Declare>,
}

impl Lanes {
    /// Starts `settings.lanes` lane tasks publishing through `publisher`.
    pub fn start(
        publisher: &Publisher,
        settings: LaneSettings,
        figures: Arc<PusherFigures>,
    ) -> Lanes {
        let senders = (0..settings.lanes.max(1))
            .map(|_| {
                // Room for a full window more queued: beyond it callers wait (bounded by
                // their deadline), which is the back-pressure.
                let (sender, receiver) = mpsc::channel(settings.window.max(1) * 2);
                let lane = Lane {
                    receiver,
                    sequence: publisher.sequence(settings.declare.clone()),
                    window: settings.window.max(1),
                    properties: settings.properties.clone(),
                    figures: figures.clone(),
                    in_flight: VecDeque::new(),
                    again: VecDeque::new(),
                    closed: false,
                };
                tokio::spawn(lane.run());
                sender
            })
            .collect();
        Lanes { senders }
    }

    /// The lane of `subject`: the same for every event of one user.
    pub fn lane_of(&self, subject: &str) -> usize {
        let mut hasher = DefaultHasher::new();
        subject.hash(&mut hasher);
        (hasher.finish() % self.senders.len() as u64) as usize
    }

    /// Queues `job` on its lane, waiting for room until its deadline. Jobs queued one
    /// after the other by one caller keep that order within their lane.
    pub async fn submit(&self, job: Job) -> Result<(), Job> {
        let lane = self.lane_of(&job.outgoing.subject);
        let Some(sender) = self.senders.get(lane) else {
            return Err(job);
        };
        let deadline = job.deadline;
        match sender.try_send(job) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(job)) => Err(job),
            Err(mpsc::error::TrySendError::Full(job)) => {
                let permit = tokio::time::timeout_at(deadline, sender.reserve()).await;
                match permit {
                    Ok(Ok(permit)) => {
                        permit.send(job);
                        Ok(())
                    }
                    _ => Err(job),
                }
            }
        }
    }
}

/// What woke a lane up.
enum Step {
    Answer(Result<Published, PublishError>),
    Job(Option<Job>),
}

/// One lane: its queue, its sequence and what it has in flight.
struct Lane {
    receiver: mpsc::Receiver<Job>,
    sequence: Sequence,
    window: usize,
    properties: BasicProperties,
    figures: Arc<PusherFigures>,
    /// Written, confirm owed, oldest first.
    in_flight: VecDeque<InFlight>,
    /// To write (again) before anything new, in order.
    again: VecDeque<Job>,
    /// Every sender is gone: settle what is held, then end.
    closed: bool,
}

impl Lane {
    async fn run(mut self) {
        loop {
            self.fill().await;
            if self.in_flight.is_empty() {
                if !self.again.is_empty() {
                    continue;
                }
                if self.closed {
                    return;
                }
                match self.receiver.recv().await {
                    Some(job) => self.again.push_back(job),
                    None => self.closed = true,
                }
                continue;
            }
            let room = self.in_flight.len() < self.window && self.again.is_empty() && !self.closed;
            let Some(head) = self.in_flight.front_mut() else {
                continue;
            };
            let step = tokio::select! {
                biased;
                answer = &mut head.sent => Step::Answer(answer),
                job = self.receiver.recv(), if room => Step::Job(job),
            };
            match step {
                Step::Answer(answer) => {
                    self.settle(answer);
                    self.settle_ready();
                }
                Step::Job(Some(job)) => self.again.push_back(job),
                Step::Job(None) => self.closed = true,
            }
        }
    }

    /// Writes what waits (again first, then new jobs) while the window has room and the
    /// channel of what is in flight can take it.
    async fn fill(&mut self) {
        while self.in_flight.len() < self.window {
            let job = match self.again.pop_front() {
                Some(job) => job,
                None if self.closed => return,
                None => match self.receiver.try_recv() {
                    Ok(job) => job,
                    Err(mpsc::error::TryRecvError::Empty) => return,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        self.closed = true;
                        return;
                    }
                },
            };
            if self.in_flight.is_empty() {
                // Nothing owed: the lane may move to whatever channel is current.
                self.sequence.unpin();
            } else if self.sequence.moved() || !self.sequence.is_pinned() {
                self.again.push_front(job);
                return;
            }
            let now = Instant::now();
            if now >= job.deadline {
                self.fail(job, PublishError::Timeout(Duration::ZERO));
                continue;
            }
            let options = PublishOptions::new(job.deadline - now);
            let out = &job.outgoing;
            let written = self
                .sequence
                .send_raw(
                    &out.exchange,
                    &out.routing_key,
                    &out.body,
                    self.properties.clone(),
                    options,
                )
                .await;
            match written {
                Ok(sent) => self.in_flight.push_back(InFlight {
                    job,
                    sent,
                    written: Instant::now(),
                }),
                Err(error) if !self.in_flight.is_empty() => {
                    // The channel of what is in flight failed: settle that first.
                    tracing::debug!(%error, "lane write failed; settling what is in flight");
                    self.again.push_front(job);
                    return;
                }
                Err(error) if retryable(&error) && Instant::now() + RETRY_PAUSE < job.deadline => {
                    tracing::debug!(%error, "lane write failed; writing again");
                    self.sequence.unpin();
                    self.again.push_front(job);
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Err(error) => self.fail(job, error),
            }
        }
    }

    /// Settles, oldest first, the events in flight whose answers are already here: a
    /// multiple ack answers many at once, and settling them together wakes their callers
    /// together and lets the next writes go out as one batch (one wake-up of the I/O loop,
    /// not one per event).
    fn settle_ready(&mut self) {
        while let Some(head) = self.in_flight.front_mut() {
            let mut peek = Context::from_waker(Waker::noop());
            let Poll::Ready(answer) = Pin::new(&mut head.sent).poll(&mut peek) else {
                return;
            };
            self.settle(answer);
        }
    }

    /// The oldest event in flight got its answer.
    fn settle(&mut self, answer: Result<Published, PublishError>) {
        let Some(head) = self.in_flight.pop_front() else {
            return;
        };
        let broker = head.sent.broker();
        match answer {
            Ok(_) => {
                self.figures.published(
                    broker,
                    head.written.elapsed(),
                    head.job.outgoing.body.len(),
                );
                let _ = head.job.done.send(Ok(broker));
            }
            Err(error) => {
                // Rewind: this event and all after it go again, in order, on a channel
                // taken afresh once nothing is owed any more.
                let later: Vec<Job> = self.in_flight.drain(..).map(|f| f.job).collect();
                for job in later.into_iter().rev() {
                    self.again.push_front(job);
                }
                if retryable(&error) && Instant::now() + RETRY_PAUSE < head.job.deadline {
                    tracing::debug!(%broker, %error, "publish not confirmed; the lane rewinds");
                    self.again.push_front(head.job);
                } else {
                    self.figures.failed(broker, &error);
                    let _ = head.job.done.send(Err(error));
                }
                self.sequence.unpin();
            }
        }
    }

    fn fail(&mut self, job: Job, error: PublishError) {
        self.figures.unpublished(&error);
        let _ = job.done.send(Err(error));
    }
}

/// Whether writing the event again may succeed: its channel died, or the broker nacked it.
fn retryable(error: &PublishError) -> bool {
    matches!(error, PublishError::Channel(_) | PublishError::Nacked)
}
