//! Channels leased to one mandatory publish at a time.
//!
//! A `basic.return` carries no delivery tag, and lapin attaches it to whichever confirm it
//! completes next (a multiple ack completes its tags in hash order). On a channel that
//! concurrent mandatory publishes share, an unroutable message can therefore read as
//! `Routed` while a routed one reads as `Returned`. A channel that carries one publish at
//! a time has nothing to mix up: the broker sends a message's return before its ack, so
//! the confirm that completes is always the publish's own, and the channel goes back to
//! the idle set only once that confirm came (so no stray return waits on it).
//!
//! Owns each broker's idle leased channels and the bound on how many exist at once; must
//! not touch the shared channel, the confirm window or the retry policy (the publisher's).

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::Open;
use crate::broker::BrokerId;

/// Leased channels at once per broker: mandatory publishes in flight beyond this wait for
/// one to come back (within their timeout).
pub(super) const LEASED_PER_BROKER: usize = 64;

/// The leased channels of every broker, indexed by `BrokerId`.
pub(super) struct LeasedChannels {
    brokers: Vec<Arc<Pool>>,
}

/// One broker's leased channels.
struct Pool {
    /// Channels whose last publish was answered, ready for the next.
    idle: Mutex<Vec<Open>>,
    /// One permit per channel that may exist (idle or leased).
    slots: Arc<Semaphore>,
}

/// What [`LeasedChannels::lease`] found.
pub(super) enum Leasing {
    /// An idle channel on the current publish connection.
    Idle(Lease),
    /// A slot for a channel the caller opens: [`Lease::new`] with it.
    Slot(Slot),
    /// No slot came free before the deadline.
    Timeout,
}

/// The right to open one leased channel on a broker.
pub(super) struct Slot {
    pool: Arc<Pool>,
    permit: OwnedSemaphorePermit,
}

/// A channel carrying one mandatory publish; dropping it gives the channel back (if
/// [`Lease::settled`] was called) or closes it.
pub(super) struct Lease {
    open: Open,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
    settled: bool,
}

impl LeasedChannels {
    /// Leased channels for `brokers` brokers, none open yet.
    pub(super) fn new(brokers: usize) -> Self {
        LeasedChannels {
            brokers: (0..brokers)
                .map(|_| {
                    Arc::new(Pool {
                        idle: Mutex::new(Vec::new()),
                        slots: Arc::new(Semaphore::new(LEASED_PER_BROKER)),
                    })
                })
                .collect(),
        }
    }

    /// An idle channel of `broker` on its publish connection of `generation`, or a slot to
    /// open one, waiting for a slot until `deadline`. `None`: no such broker.
    pub(super) async fn lease(
        &self,
        broker: BrokerId,
        generation: u64,
        deadline: Instant,
    ) -> Option<Leasing> {
        let pool = self.brokers.get(broker.0)?;
        let Ok(Ok(permit)) =
            tokio::time::timeout_at(deadline, pool.slots.clone().acquire_owned()).await
        else {
            return Some(Leasing::Timeout);
        };
        let usable = {
            let mut idle = pool.idle.lock();
            let fresh =
                |open: &Open| open.generation == generation && open.channel.status().connected();
            match idle.pop() {
                Some(open) if fresh(&open) => Some(open),
                None => None,
                Some(_stale) => {
                    // A channel of an older connection (or a closed one): the set is swept
                    // once (dropping them closes what is left of them), not on every lease.
                    idle.retain(fresh);
                    idle.pop()
                }
            }
        };
        let pool = pool.clone();
        Some(match usable {
            Some(open) => Leasing::Idle(Lease {
                open,
                pool,
                _permit: permit,
                settled: false,
            }),
            None => Leasing::Slot(Slot { pool, permit }),
        })
    }
}

impl LeasedChannels {
    /// Whether `broker` has a leased channel open (idle and connected, or leased out).
    pub(super) fn any_open(&self, broker: BrokerId) -> bool {
        self.brokers.get(broker.0).is_some_and(|pool| {
            pool.slots.available_permits() < LEASED_PER_BROKER
                || pool
                    .idle
                    .lock()
                    .iter()
                    .any(|open| open.channel.status().connected())
        })
    }
}

impl Lease {
    /// A lease of the channel `open`, just opened with `slot`.
    pub(super) fn new(slot: Slot, open: Open) -> Self {
        Lease {
            open,
            pool: slot.pool,
            _permit: slot.permit,
            settled: false,
        }
    }

    /// The leased channel.
    pub(super) fn open(&self) -> &Open {
        &self.open
    }

    /// The broker answered the publish (ack, nack or return): the channel has nothing
    /// outstanding and goes back to the idle set when the lease is dropped.
    pub(super) fn settled(&mut self) {
        self.settled = true;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.settled && self.open.channel.status().connected() {
            self.pool.idle.lock().push(self.open.clone());
        }
        // Otherwise the channel may still owe a confirm (or a return): dropping its last
        // handle (this one) closes it.
    }
}
