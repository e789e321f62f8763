//! What a listener reports to its holder: why a call failed, what its actor says about
//! itself, what removing a binding did, and a copy of its counters.
//!
//! Owns: these types. Must not touch: anything running; they are plain values.

use warren_runtime::broker::BrokerId;

use super::validate::SpecError;

/// Why a run-time change or a query failed.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("the listener is not running")]
    NotRunning,
    #[error("the broker refused: {0}")]
    Broker(String),
    #[error("cannot start the listener: {0}")]
    Start(String),
    /// The listener's spec breaks a rule (see [`SpecError`]).
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The broker did not answer within `[amqp] operation_timeout_ms`; the channel is
    /// treated as lost and replaced.
    #[error("the broker did not answer: {0}")]
    Timeout(String),
}

/// A copy of a listener's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub received: u64,
    pub acked: u64,
    /// Nacked with requeue (retry, panic).
    pub requeued: u64,
    /// Taken off the queue for good because they cannot succeed (handler reject,
    /// undecodable, too large, invalid fields, past the redelivery limit): dead-lettered
    /// to the queue's DLX, or parked (see `parked`).
    pub rejected: u64,
    /// Panics in app code on a message: a responder or `on_event`.
    pub handler_panics: u64,
    /// Bodies that are not a kapi envelope (or too large, or with invalid fields).
    pub undecodable: u64,
    pub redelivery_limit: u64,
    pub suppressed: u64,
    pub unmatched: u64,
    /// Of `rejected`: moved to the parking queue (the queue has no dead-letter exchange).
    pub parked: u64,
    /// Requeued without counting as a failure (e.g. a pool worker whose holder did not
    /// read).
    pub deferred: u64,
    /// Panics in `on_notice` (logged and ignored).
    pub notice_panics: u64,
    /// Deliveries whose handlers' publishes were not all confirmed (nacked, timed out,
    /// lost, returned): retried instead of acked.
    pub unconfirmed: u64,
    /// Acked without running the handlers: their Msg-ID was handled already (the
    /// listener's de-duplication window).
    pub duplicates: u64,
}

/// What a listener's actor says about itself (for operators and tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerStatus {
    /// The broker and grant number of the active channel, if any.
    pub active: Option<(BrokerId, u64)>,
    /// The topology is declared on the active channel.
    pub declared: bool,
    /// A consumer runs on the active channel.
    pub consuming: bool,
    /// Paused by the app.
    pub paused: bool,
    /// Old grants still drained (or watched) after a fail-back: broker and grant number.
    pub draining: Vec<(BrokerId, u64)>,
    /// Of `draining`: those whose queue was empty once and are still consumed for
    /// `[listener] fail_back_watch_ms`.
    pub watching: Vec<(BrokerId, u64)>,
}

/// What removing a binding did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Removed {
    /// The listener had the binding.
    pub existed: bool,
    /// It is gone from every broker where the queue may have had it: nothing routed by
    /// it can reach the queue any more.
    pub clean: bool,
}
