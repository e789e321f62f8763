//! One event through the app's code: the listener's hook, then every matching responder,
//! panics caught, and their results combined into one [`Outcome`].
//!
//! Owns: what app code decides about an event, with no broker in sight, so that the
//! consumer loop and the test kit run exactly the same steps. Must not touch: channels,
//! acks, counters or logs (the consumer loop reports what this returns).

use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use warren_runtime::trace;

use super::event::Event;
use super::outcome::Outcome;
use super::responders::{Handler, HandlerError, HandlerResult, Matched};
use super::{Dispatch, Listener};

/// How one handler ended.
pub(crate) enum HandlerEnd {
    Returned(HandlerResult),
    Panicked(String),
}

impl HandlerEnd {
    /// What this handler's end means for the message.
    pub(crate) fn outcome(&self) -> Outcome {
        match self {
            HandlerEnd::Returned(Ok(())) => Outcome::Ack,
            HandlerEnd::Returned(Err(HandlerError::Retry(_))) | HandlerEnd::Panicked(_) => {
                Outcome::Requeue
            }
            HandlerEnd::Returned(Err(HandlerError::Reject(_))) => Outcome::Reject,
            HandlerEnd::Returned(Err(HandlerError::Defer(_))) => Outcome::Defer,
        }
    }
}

/// Runs `on_event`; its panic is caught and its text returned (a failure of the message).
pub(crate) fn hook(listener: &dyn Listener, event: &Event) -> Result<Dispatch, String> {
    std::panic::catch_unwind(AssertUnwindSafe(|| listener.on_event(event)))
        .map_err(|panic| panic_text(panic.as_ref()).to_string())
}

/// Runs every matching handler at once, each with its panics caught and with the event's
/// trace as the trace of its work (so its publishes and pool calls carry it), tells
/// `ended` how each one ended (in handler order), and returns their combined outcome: the
/// most severe wins; no handler is an ack.
pub(crate) async fn run(
    event: &Event,
    handlers: Matched,
    mut ended: impl FnMut(&HandlerEnd),
) -> Outcome {
    let trace = event.trace();
    let guarded = |handler: Handler| {
        let event = event.clone();
        trace::scope(
            trace,
            AssertUnwindSafe(async move { handler(event).await }).catch_unwind(),
        )
    };
    let mut outcome = Outcome::Ack;
    let mut end = |result: std::thread::Result<HandlerResult>| {
        let end = match result {
            Ok(result) => HandlerEnd::Returned(result),
            Err(panic) => HandlerEnd::Panicked(panic_text(panic.as_ref()).to_string()),
        };
        outcome = outcome.combine(end.outcome());
        ended(&end);
    };
    match handlers {
        Matched::None => {}
        Matched::One(handler) => end(guarded(handler).await),
        Matched::Many(all) => {
            for result in futures::future::join_all(all.into_iter().map(guarded)).await {
                end(result);
            }
        }
    }
    outcome
}

/// Tells the listener that a message failed for good (`on_failed`); a panic in it is
/// caught and returned.
pub(crate) fn failed(listener: &dyn Listener, event: &Event, reason: &str) -> Result<(), String> {
    std::panic::catch_unwind(AssertUnwindSafe(|| listener.on_failed(event, reason)))
        .map_err(|panic| panic_text(panic.as_ref()).to_string())
}

/// The message of a caught panic.
pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(text) = panic.downcast_ref::<&str>() {
        text
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text
    } else {
        "(not a string)"
    }
}
