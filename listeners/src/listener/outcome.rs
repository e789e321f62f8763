//! What happens to one message ([`Outcome`]), and how several verdicts on it combine.
//!
//! Owns: the outcome and its order of severity, which responders, the confirms of their
//! publishes and the ack policy all speak in. Must not touch: anything that decides one
//! (responders, confirms) or sends one (acks): it sits below them all, so that none of
//! them needs another to name an outcome.

/// What happens to one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ack,
    /// Nack with requeue: a handler failed (counted towards `max_redeliveries`).
    Requeue,
    /// Off the queue for good: dead-lettered to the queue's DLX, or parked.
    Reject,
    /// Nack with requeue, not counted as a failure.
    Defer,
}

impl Outcome {
    /// The outcome of several responders: the most severe wins.
    pub fn combine(self, other: Outcome) -> Outcome {
        match (self, other) {
            (Outcome::Reject, _) | (_, Outcome::Reject) => Outcome::Reject,
            (Outcome::Requeue, _) | (_, Outcome::Requeue) => Outcome::Requeue,
            (Outcome::Defer, _) | (_, Outcome::Defer) => Outcome::Defer,
            _ => Outcome::Ack,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_combine_to_the_most_severe() {
        use Outcome::*;
        assert_eq!(Ack.combine(Ack), Ack);
        assert_eq!(Ack.combine(Requeue), Requeue);
        assert_eq!(Requeue.combine(Reject), Reject);
        assert_eq!(Reject.combine(Ack), Reject);
        assert_eq!(Defer.combine(Ack), Defer);
        assert_eq!(Defer.combine(Requeue), Requeue);
    }
}
