//! What a listener's ack mode means for each message ([`AckPolicy`]), and coalesced
//! acknowledgements for one channel ([`AckTracker`]).
//!
//! The ack mode matters at three points of a delivery: when it is received (track it?
//! ack it at once?), when it is refused before any handler ran (is it still the queue's
//! to take off?), and when its handlers finished (does their outcome settle it?). The
//! policy answers all three, and what the consumer and the qos ask of the broker, so the
//! consumer loop asks it instead of testing the mode.
//!
//! Deliveries are settled in any order (handlers finish when they finish). A success is
//! not acked on its own: one `basic.ack` with `multiple = true` acknowledges every
//! delivery up to a tag. Nacks and rejects are sent at once, each for its own tag.
//!
//! RabbitMQ looks for the exact tag of an ack among the unacked deliveries, even with
//! `multiple` (an unknown tag closes the channel with 406). So the tag of a multiple ack is
//! always a success not acked yet whose predecessors are all settled; a nacked tag, or one
//! acked before, never is. The consumer loop flushes when enough acks are pending, when it
//! is about to wait for the broker, and after a short delay at most.
//!
//! Writing a settlement is bounded by the operation timeout: one that cannot be written
//! (a broker that hangs with heartbeats off) is reported, and the loop treats the channel
//! as lost.

use std::collections::VecDeque;
use std::future::Future;
use std::time::{Duration, Instant};

use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};

use super::outcome::Outcome;
use super::spec::AckMode;

/// Longest an ack may wait to be coalesced with others.
pub(crate) const MAX_ACK_DELAY: Duration = Duration::from_millis(10);

/// A listener's ack mode, asked at each point of a delivery where it matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct AckPolicy(AckMode);

/// What to do with a delivery when it arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Received {
    /// No-ack: the broker considers it delivered; nothing is ever sent for it.
    Untracked,
    /// Ack it at once, before the responders run.
    AckNow,
    /// Hold it until its handlers finish.
    Hold,
}

/// A delivery refused before any handler ran (undecodable, too large, past the
/// redelivery limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// It is not the queue's any more (no-ack): nothing to do.
    Gone,
    /// Take it off the queue once: dead-letter or park it.
    TakeOff,
}

/// A delivery whose handlers finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finished {
    /// Their outcome settles it (ack, requeue, reject).
    ByOutcome,
    /// It was settled before (acked on receipt, or no-ack).
    Settled,
}

impl AckPolicy {
    pub fn new(mode: AckMode) -> Self {
        AckPolicy(mode)
    }

    /// What to do with a delivery when it arrives.
    pub fn received(self) -> Received {
        match self.0 {
            AckMode::Broker => Received::Untracked,
            AckMode::OnReceipt => Received::AckNow,
            AckMode::Manual => Received::Hold,
        }
    }

    /// What to do with a delivery refused before any handler ran. It is refused before an
    /// ack on receipt, so only no-ack leaves nothing to do.
    pub fn undecodable(self) -> Refused {
        match self.0 {
            AckMode::Broker => Refused::Gone,
            AckMode::OnReceipt | AckMode::Manual => Refused::TakeOff,
        }
    }

    /// What to do with a delivery whose handlers finished.
    pub fn finished(self) -> Finished {
        match self.0 {
            AckMode::Manual => Finished::ByOutcome,
            AckMode::OnReceipt | AckMode::Broker => Finished::Settled,
        }
    }

    /// The consumer is registered with `no_ack`.
    pub fn no_ack(self) -> bool {
        self.0 == AckMode::Broker
    }

    /// The `basic.qos` prefetch to set: none under no-ack, where it has no effect.
    pub fn qos(self, prefetch: u16) -> Option<u16> {
        (!self.no_ack()).then_some(prefetch)
    }
}

/// Where one delivery stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Its handlers are running.
    Running,
    /// Succeeded; to be covered by a multiple ack.
    Succeeded,
    /// Nacked or rejected already (sent on its own).
    Settled,
}

/// Settlement state of one channel's deliveries.
pub(crate) struct AckTracker {
    /// Deliveries not yet covered by a sent ack, in delivery order (tags increase).
    outstanding: VecDeque<(u64, State)>,
    /// The tag the next multiple ack will carry: a success whose predecessors are settled.
    ack_upto: Option<u64>,
    /// Successes the next multiple ack will cover.
    pending: usize,
    /// When the oldest of them became ready.
    pending_since: Option<Instant>,
    /// Flush once this many acks are pending.
    batch: usize,
}

impl AckTracker {
    /// `prefetch` bounds how many deliveries can be unsettled; flushing at a quarter of it
    /// keeps the broker sending while acks are coalesced.
    pub fn new(prefetch: u16) -> Self {
        AckTracker {
            outstanding: VecDeque::new(),
            ack_upto: None,
            pending: 0,
            pending_since: None,
            batch: (usize::from(prefetch) / 4).max(1),
        }
    }

    /// A delivery arrived and will be settled later.
    pub fn delivered(&mut self, tag: u64) {
        self.outstanding.push_back((tag, State::Running));
    }

    /// Records a delivery's outcome (the nack or reject itself is sent by `settle`).
    fn record(&mut self, tag: u64, outcome: Outcome) {
        let state = match outcome {
            Outcome::Ack => State::Succeeded,
            Outcome::Requeue | Outcome::Reject | Outcome::Defer => State::Settled,
        };
        if let Some(entry) = self.outstanding.iter_mut().find(|(t, _)| *t == tag) {
            entry.1 = state;
        }
        while let Some(&(front, state)) = self.outstanding.front() {
            match state {
                State::Running => break,
                State::Succeeded => {
                    self.ack_upto = Some(front);
                    self.pending += 1;
                    self.pending_since.get_or_insert_with(Instant::now);
                }
                State::Settled => {}
            }
            self.outstanding.pop_front();
        }
    }

    /// The tag to ack with `multiple = true` now, if any; it counts as sent.
    fn take_flush(&mut self) -> Option<u64> {
        let upto = self.ack_upto.take()?;
        self.pending = 0;
        self.pending_since = None;
        Some(upto)
    }

    /// Settles one delivery: a nack or reject goes out at once, an ack is coalesced.
    /// `Err` when the settlement could not be written within `timeout`.
    pub async fn settle(
        &mut self,
        channel: &Channel,
        tag: u64,
        outcome: Outcome,
        timeout: Duration,
    ) -> Result<(), Stuck> {
        let sent = match outcome {
            Outcome::Ack => Ok(()),
            Outcome::Requeue | Outcome::Defer => {
                let options = BasicNackOptions {
                    multiple: false,
                    requeue: true,
                };
                write(timeout, tag, "nack", channel.basic_nack(tag, options)).await
            }
            Outcome::Reject => {
                let options = BasicRejectOptions { requeue: false };
                write(timeout, tag, "reject", channel.basic_reject(tag, options)).await
            }
        };
        self.record(tag, outcome);
        sent
    }

    /// Whether enough acks are pending to flush now.
    pub fn due(&self) -> bool {
        self.pending >= self.batch
    }

    /// When the oldest pending ack must be flushed at the latest.
    pub fn deadline(&self) -> Option<Instant> {
        self.pending_since.map(|since| since + MAX_ACK_DELAY)
    }

    /// Sends the multiple ack covering every success settled in order so far.
    pub async fn flush(&mut self, channel: &Channel, timeout: Duration) -> Result<(), Stuck> {
        match self.take_flush() {
            Some(upto) => {
                let options = BasicAckOptions { multiple: true };
                write(timeout, upto, "ack", channel.basic_ack(upto, options)).await
            }
            None => Ok(()),
        }
    }
}

/// A settlement that could not be written in time: the channel is stuck.
#[derive(Debug)]
pub(crate) struct Stuck(pub String);

/// Writes one settlement, within `timeout`. A channel that is gone is no error here (its
/// deliveries come back to the queue; the consumer stream reports the loss).
async fn write(
    timeout: Duration,
    tag: u64,
    what: &str,
    sent: impl Future<Output = lapin::Result<()>>,
) -> Result<(), Stuck> {
    match tokio::time::timeout(timeout, sent).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => {
            tracing::debug!(tag, %error, "{what} not sent: the channel is gone");
            Ok(())
        }
        Err(_) => Err(Stuck(format!(
            "a {what} could not be written within {timeout:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_answers_for_each_mode() {
        let manual = AckPolicy::new(AckMode::Manual);
        let receipt = AckPolicy::new(AckMode::OnReceipt);
        let broker = AckPolicy::new(AckMode::Broker);
        assert_eq!(
            [manual.received(), receipt.received(), broker.received()],
            [Received::Hold, Received::AckNow, Received::Untracked]
        );
        assert_eq!(
            [
                manual.undecodable(),
                receipt.undecodable(),
                broker.undecodable()
            ],
            [Refused::TakeOff, Refused::TakeOff, Refused::Gone]
        );
        assert_eq!(
            [manual.finished(), receipt.finished(), broker.finished()],
            [Finished::ByOutcome, Finished::Settled, Finished::Settled]
        );
        assert_eq!(
            [manual.qos(7), receipt.qos(7), broker.qos(7)],
            [Some(7), Some(7), None]
        );
        assert!(broker.no_ack() && !manual.no_ack() && !receipt.no_ack());
    }

    fn tracker(tags: std::ops::RangeInclusive<u64>) -> AckTracker {
        let mut acks = AckTracker::new(200);
        for tag in tags {
            acks.delivered(tag);
        }
        acks
    }

    #[test]
    fn in_order_successes_are_one_multiple_ack() {
        let mut acks = tracker(1..=3);
        for tag in 1..=3 {
            acks.record(tag, Outcome::Ack);
        }
        assert_eq!(acks.take_flush(), Some(3));
        assert_eq!(acks.take_flush(), None, "never the same ack twice");
    }

    #[test]
    fn a_success_waits_for_an_earlier_running_delivery() {
        let mut acks = tracker(1..=3);
        acks.record(2, Outcome::Ack);
        acks.record(3, Outcome::Ack);
        assert_eq!(acks.take_flush(), None, "1 is still running");
        acks.record(1, Outcome::Ack);
        assert_eq!(acks.take_flush(), Some(3));
    }

    #[test]
    fn the_multiple_ack_tag_is_never_a_nacked_one() {
        let mut acks = tracker(1..=3);
        acks.record(1, Outcome::Ack);
        acks.record(2, Outcome::Ack);
        acks.record(3, Outcome::Requeue);
        assert_eq!(acks.take_flush(), Some(2), "3 was nacked on its own");
        let mut acks = tracker(1..=2);
        acks.record(1, Outcome::Reject);
        acks.record(2, Outcome::Requeue);
        assert_eq!(acks.take_flush(), None, "nothing left to ack");
    }

    #[test]
    fn an_acked_tag_is_not_acked_again_after_later_failures() {
        let mut acks = tracker(1..=4);
        acks.record(1, Outcome::Ack);
        assert_eq!(acks.take_flush(), Some(1));
        acks.record(2, Outcome::Reject);
        assert_eq!(acks.take_flush(), None);
        acks.record(4, Outcome::Ack);
        acks.record(3, Outcome::Ack);
        assert_eq!(acks.take_flush(), Some(4));
    }

    #[test]
    fn flushing_is_due_at_a_quarter_of_prefetch() {
        let mut acks = AckTracker::new(8);
        for tag in 1..=2 {
            acks.delivered(tag);
            acks.record(tag, Outcome::Ack);
        }
        assert!(acks.due());
        assert!(acks.deadline().is_some());
        acks.take_flush();
        assert!(!acks.due());
        assert!(acks.deadline().is_none());
    }
}
