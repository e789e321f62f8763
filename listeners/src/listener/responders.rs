//! Responders: handlers keyed by (`Event-Category`, `Event-Name`), `*` standing for a
//! whole field, and what their results mean for the message.
//!
//! Every matching responder runs for an event. Their results combine into one outcome:
//! any reject → reject; else any retry or panic → nack with requeue (a failure, counted
//! towards `max_redeliveries`); else any defer → nack with requeue, not counted; else ack.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::future::BoxFuture;

use super::event::Event;

/// What a handler returns.
pub type HandlerResult = Result<(), HandlerError>;

/// Why a handler did not succeed; decides what happens to the message.
///
/// Any error converts into `Retry` with `?`. Use [`HandlerError::reject`] for a message
/// that will never succeed (it is dead-lettered when the queue has a dead-letter exchange).
#[derive(Debug)]
pub enum HandlerError {
    /// Try again later: nack with requeue (until `max_redeliveries`).
    Retry(String),
    /// Never: the message is taken off the queue for good (dead-lettered to the queue's
    /// DLX, or parked when it has none).
    Reject(String),
    /// Not this message's fault (no capacity right now): requeue it without counting a
    /// failure towards `max_redeliveries`.
    Defer(String),
}

impl HandlerError {
    pub fn retry(reason: impl fmt::Display) -> Self {
        HandlerError::Retry(reason.to_string())
    }

    pub fn reject(reason: impl fmt::Display) -> Self {
        HandlerError::Reject(reason.to_string())
    }

    pub fn defer(reason: impl fmt::Display) -> Self {
        HandlerError::Defer(reason.to_string())
    }
}

impl<E: std::error::Error> From<E> for HandlerError {
    fn from(error: E) -> Self {
        HandlerError::Retry(error.to_string())
    }
}

/// Any async function of an event that can be a responder's handler: the one bound
/// `ListenerSpec::responder`, `ListenerHandle::add_responder` and `Responders::add` share
/// (a closure `|event| async move { … }` is one).
pub trait HandlerFn: Fn(Event) -> <Self as HandlerFn>::Output + Send + Sync + 'static {
    /// The future the handler returns.
    type Output: Future<Output = HandlerResult> + Send + 'static;
}

impl<F, Fut> HandlerFn for F
where
    F: Fn(Event) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    type Output = Fut;
}

/// A handler, boxed so that responders of any closure type live in one table.
pub(crate) type Handler = Arc<dyn Fn(Event) -> BoxFuture<'static, HandlerResult> + Send + Sync>;

/// The handlers of the responders matching one event; one (the common case) without a
/// list.
pub(crate) enum Matched {
    None,
    One(Handler),
    Many(Vec<Handler>),
}

impl Matched {
    pub fn len(&self) -> usize {
        match self {
            Matched::None => 0,
            Matched::One(_) => 1,
            Matched::Many(all) => all.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        matches!(self, Matched::None)
    }
}

/// Identifies one registered responder, to remove it later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ResponderId(u64);

#[derive(Clone)]
struct Responder {
    id: ResponderId,
    category: String,
    name: String,
    handler: Handler,
}

impl Responder {
    fn matches(&self, category: &str, name: &str) -> bool {
        (self.category == "*" || self.category == category)
            && (self.name == "*" || self.name == name)
    }
}

/// The responder table of a listener.
#[derive(Clone, Default)]
pub struct Responders {
    entries: Vec<Responder>,
}

impl fmt::Debug for Responders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.keys()).finish()
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Responders {
    /// Adds a responder for (`category`, `name`); `"*"` matches any value of that field.
    pub fn add(
        &mut self,
        category: impl Into<String>,
        name: impl Into<String>,
        handler: impl HandlerFn,
    ) -> ResponderId {
        let id = ResponderId(NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let handler: Handler = Arc::new(move |event| Box::pin(handler(event)));
        self.entries.push(Responder {
            id,
            category: category.into(),
            name: name.into(),
            handler,
        });
        id
    }

    /// Removes one responder; false if it was not there.
    pub fn remove(&mut self, id: ResponderId) -> bool {
        let before = self.entries.len();
        self.entries.retain(|r| r.id != id);
        self.entries.len() != before
    }

    /// Removes every responder registered for exactly this key; returns how many.
    pub fn remove_key(&mut self, category: &str, name: &str) -> usize {
        let before = self.entries.len();
        self.entries
            .retain(|r| !(r.category == category && r.name == name));
        before - self.entries.len()
    }

    /// The keys, in registration order.
    pub fn keys(&self) -> Vec<(String, String)> {
        self.entries
            .iter()
            .map(|r| (r.category.clone(), r.name.clone()))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The handlers matching an event, in registration order.
    pub(crate) fn matching(&self, category: &str, name: &str) -> Matched {
        let mut matched = Matched::None;
        for responder in self.entries.iter().filter(|r| r.matches(category, name)) {
            let handler = responder.handler.clone();
            matched = match matched {
                Matched::None => Matched::One(handler),
                Matched::One(first) => Matched::Many(vec![first, handler]),
                Matched::Many(mut all) => {
                    all.push(handler);
                    Matched::Many(all)
                }
            };
        }
        matched
    }

    /// Number of responders matching an event (for tests and diagnostics).
    pub fn count_matching(&self, category: &str, name: &str) -> usize {
        self.entries
            .iter()
            .filter(|r| r.matches(category, name))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Responders {
        let mut responders = Responders::default();
        for (c, n) in [("a", "b"), ("a", "*"), ("*", "b"), ("*", "*")] {
            responders.add(c, n, |_event: Event| async { Ok(()) });
        }
        responders
    }

    #[test]
    fn every_matching_responder_runs_and_star_is_a_whole_field() {
        let responders = table();
        assert_eq!(responders.count_matching("a", "b"), 4);
        assert_eq!(responders.count_matching("a", "c"), 2, "(a,*) and (*,*)");
        assert_eq!(responders.count_matching("x", "b"), 2, "(*,b) and (*,*)");
        assert_eq!(responders.count_matching("x", "y"), 1, "(*,*) only");
        // `*` is not a pattern inside a field.
        let mut partial = Responders::default();
        partial.add("a*", "b", |_event: Event| async { Ok(()) });
        assert_eq!(partial.count_matching("abc", "b"), 0);
        assert_eq!(partial.count_matching("a*", "b"), 1);
    }

    #[test]
    fn responders_are_removed_by_id_or_key() {
        let mut responders = table();
        let id = responders.add("c", "d", |_event: Event| async { Ok(()) });
        assert!(responders.remove(id));
        assert!(!responders.remove(id));
        assert_eq!(responders.remove_key("a", "*"), 1);
        assert_eq!(responders.count_matching("a", "c"), 1);
        assert_eq!(responders.keys().len(), 3);
    }

    #[test]
    fn errors_convert_to_retry_with_question_mark() {
        fn fails() -> Result<(), HandlerError> {
            let _: u32 = "x".parse::<u32>()?;
            Ok(())
        }
        assert!(matches!(fails(), Err(HandlerError::Retry(_))));
    }
}
