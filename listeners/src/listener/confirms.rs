//! Pipelined settlement: the confirms a delivery's publishes still owe, and what they make
//! of its outcome.
//!
//! A handler's publish (or reply) returns once the message is queued on its channel; the
//! socket write and the broker's confirm are awaited with the delivery, not by the handler,
//! so the next delivery can start while the reply is on its way. The delivery is settled
//! once its handlers finished **and** every confirm came: a publish the broker nacked, did
//! not confirm in time, lost with its channel, or returned (mandatory) turns a success into
//! a retry; a rejection stays a rejection. A handler that needs the broker's answer before
//! going on awaits the [`Pending`] its publish gave; that answer is then the handler's to
//! act on, and the delivery does not judge it again.
//!
//! Owns: [`Pending`], the per-event list of owed confirms and the rule above. Must not
//! touch: acks (the consumer loop settles), the publisher (it only observes its confirms).

use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use parking_lot::Mutex;
use warren_runtime::confirm::{PublishError, Published};

use super::outcome::Outcome;

/// One publish's confirm, observed by the handler (if it awaits it) and by the delivery.
type Confirm = Shared<BoxFuture<'static, Result<Published, PublishError>>>;

/// A publish an event made, written to the broker. Its confirm settles with the delivery;
/// `.await` it (or [`Pending::confirmed`]) to wait for the broker's answer: `Routed`,
/// `Returned` for an unroutable mandatory message, or the error.
#[derive(Clone)]
pub struct Pending {
    owed: OwedConfirm,
}

impl Pending {
    /// A publish whose answer is known already (the test kit's recorder).
    pub(crate) fn answered(result: Result<Published, PublishError>) -> Self {
        Pending {
            owed: OwedConfirm::new(futures::future::ready(result).boxed()),
        }
    }

    /// Waits for the broker's answer (bounded by the publish's timeout); from then on the
    /// handler decides what it means.
    pub async fn confirmed(self) -> Result<Published, PublishError> {
        let answer = self.owed.confirm.await;
        self.owed.seen.store(true, Ordering::Release);
        answer
    }
}

impl IntoFuture for Pending {
    type Output = Result<Published, PublishError>;
    type IntoFuture = BoxFuture<'static, Result<Published, PublishError>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.confirmed())
    }
}

/// A confirm the delivery waits for, and whether the handler has seen its answer.
#[derive(Clone)]
pub(crate) struct OwedConfirm {
    confirm: Confirm,
    seen: Arc<AtomicBool>,
}

impl OwedConfirm {
    fn new(confirm: BoxFuture<'static, Result<Published, PublishError>>) -> Self {
        OwedConfirm {
            confirm: confirm.shared(),
            seen: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// The confirms one event's publishes owe, taken by the consumer loop when the handlers
/// finished.
#[derive(Default)]
pub(crate) struct Owed(Mutex<Vec<OwedConfirm>>);

impl Owed {
    /// Tracks `confirm` with the delivery and gives the handler its own view of it.
    pub fn track(&self, confirm: BoxFuture<'static, Result<Published, PublishError>>) -> Pending {
        let owed = OwedConfirm::new(confirm);
        self.0.lock().push(owed.clone());
        Pending { owed }
    }

    /// Everything owed so far; publishes made later (by work the handler left running) are
    /// the handler's own to await.
    pub fn take(&self) -> Vec<OwedConfirm> {
        std::mem::take(&mut *self.0.lock())
    }
}

/// Why the confirms change an outcome, for the log line.
pub(crate) struct Unconfirmed {
    pub failed: usize,
    pub first: String,
}

/// Waits for every owed confirm and returns the outcome they leave: `outcome` itself when
/// all were routed; otherwise at least a retry (a publish lost with its channel is not the
/// message's fault: a deferral, not a counted failure).
pub(crate) async fn settle(
    confirms: Vec<OwedConfirm>,
    outcome: Outcome,
) -> (Outcome, Option<Unconfirmed>) {
    // An answer the handler awaited is the handler's: it decided with it.
    let unseen = confirms
        .into_iter()
        .filter(|owed| !owed.seen.load(Ordering::Acquire))
        .map(|owed| owed.confirm);
    let results = futures::future::join_all(unseen).await;
    let mut worst = Outcome::Ack;
    let mut unconfirmed: Option<Unconfirmed> = None;
    for result in &results {
        let (becomes, why) = match result {
            Ok(Published::Routed) => continue,
            Ok(Published::Returned(returned)) => (
                Outcome::Requeue,
                format!(
                    "returned as unroutable ({} with `{}`)",
                    returned.exchange, returned.routing_key
                ),
            ),
            Err(error) if error.is_retryable() => (Outcome::Defer, error.to_string()),
            Err(error) => (Outcome::Requeue, error.to_string()),
        };
        worst = worst.combine(becomes);
        match &mut unconfirmed {
            Some(unconfirmed) => unconfirmed.failed += 1,
            None => {
                unconfirmed = Some(Unconfirmed {
                    failed: 1,
                    first: why,
                })
            }
        }
    }
    (outcome.combine(worst), unconfirmed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_runtime::confirm::Returned;

    fn owed(results: Vec<Result<Published, PublishError>>) -> Vec<OwedConfirm> {
        let owed = Owed::default();
        for result in results {
            let _ = owed.track(futures::future::ready(result).boxed());
        }
        owed.take()
    }

    fn returned() -> Published {
        Published::Returned(Returned {
            exchange: "targeted".into(),
            routing_key: "gone".into(),
            reply_code: 312,
            reply_text: "NO_ROUTE".into(),
            envelope: None,
        })
    }

    #[tokio::test]
    async fn routed_confirms_keep_the_outcome() {
        let confirms = owed(vec![Ok(Published::Routed), Ok(Published::Routed)]);
        let (outcome, why) = settle(confirms, Outcome::Ack).await;
        assert_eq!(outcome, Outcome::Ack);
        assert!(why.is_none());
        assert_eq!(settle(Vec::new(), Outcome::Defer).await.0, Outcome::Defer);
    }

    #[tokio::test]
    async fn a_nacked_or_returned_publish_makes_a_success_a_retry() {
        let nacked = owed(vec![Ok(Published::Routed), Err(PublishError::Nacked)]);
        let (outcome, why) = settle(nacked, Outcome::Ack).await;
        assert_eq!(outcome, Outcome::Requeue);
        assert_eq!(why.map(|w| w.failed), Some(1));
        let (outcome, _) = settle(owed(vec![Ok(returned())]), Outcome::Ack).await;
        assert_eq!(outcome, Outcome::Requeue);
    }

    #[tokio::test]
    async fn a_rejection_stays_a_rejection_and_a_lost_channel_defers() {
        let (outcome, _) = settle(owed(vec![Err(PublishError::Nacked)]), Outcome::Reject).await;
        assert_eq!(outcome, Outcome::Reject);
        let lost = owed(vec![Err(PublishError::Channel("gone".into()))]);
        let (outcome, why) = settle(lost, Outcome::Ack).await;
        assert_eq!(outcome, Outcome::Defer);
        assert!(why.is_some_and(|w| w.first.contains("gone")));
    }

    #[tokio::test]
    async fn an_answer_the_handler_awaited_is_the_handlers_to_judge() {
        let owed = Owed::default();
        let awaited = owed.track(futures::future::ready(Err(PublishError::Nacked)).boxed());
        let _left = owed.track(futures::future::ready(Ok(Published::Routed)).boxed());
        assert!(matches!(awaited.await, Err(PublishError::Nacked)));
        let (outcome, why) = settle(owed.take(), Outcome::Ack).await;
        assert_eq!(
            outcome,
            Outcome::Ack,
            "the handler saw the nack and chose to succeed"
        );
        assert!(why.is_none());
        assert!(owed.take().is_empty(), "taken once");
    }

    #[tokio::test]
    async fn an_answer_the_handler_left_is_the_deliverys() {
        let owed = Owed::default();
        let left = owed.track(futures::future::ready(Err(PublishError::Nacked)).boxed());
        drop(left);
        let (outcome, _) = settle(owed.take(), Outcome::Ack).await;
        assert_eq!(outcome, Outcome::Requeue);
    }
}
