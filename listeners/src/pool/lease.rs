//! A checked-out worker. Through a lease a task publishes (with confirms, through the
//! node's publisher and its publish connection, so a broker that blocks publishing never
//! stalls the worker's consumer), adds temporary bindings to the worker's queue and reads
//! their deliveries, and makes calls on the worker's channel (see `rpc`).
//!
//! The lease goes back to the pool when it is dropped, also when its holder panics; check-in
//! removes the bindings the lease added. `checkin().await` does the same and waits for it.

use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use warren_runtime::envelope::Envelope;
use warren_runtime::publish::{PublishError, PublishOptions, Published};
use warren_runtime::publisher::Publisher;

use super::PoolInner;
use super::worker::{Mailbox, Worker};
use crate::listener::{Binding, Event, ListenerError};

/// A worker checked out of a pool.
pub struct PoolLease {
    pub(super) pool: Arc<PoolInner>,
    /// The node's publisher, stamping as the app.
    pub(super) publisher: Option<Publisher>,
    pub(super) worker: Arc<Worker>,
    /// Checked in already (by `checkin`).
    pub(super) released: bool,
    pub(super) mailbox: Mailbox,
    pub(super) added: Vec<Binding>,
    /// The pool generation the worker belongs to.
    pub(super) generation: u64,
}

impl PoolLease {
    pub(super) fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }

    /// The worker's queue: its `Server-ID`.
    pub fn queue(&self) -> String {
        self.worker().handle.queue_name()
    }

    /// Publishes with confirms (stamped as the app) and waits for the broker's answer.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        envelope: Envelope,
        options: PublishOptions,
    ) -> Result<Published, PublishError> {
        match &self.publisher {
            Some(publisher) => {
                publisher
                    .publish(exchange, routing_key, envelope, options)
                    .await
            }
            None => Err(PublishError::NoBroker(options.timeout)),
        }
    }

    /// Binds the worker's queue for the time of this lease; removed at check-in.
    pub async fn bind(&mut self, binding: Binding) -> Result<(), ListenerError> {
        if self.added.contains(&binding) {
            return Ok(());
        }
        let existing = self.worker().handle.bindings().contains(&binding);
        self.worker().handle.add_binding(binding.clone()).await?;
        if !existing {
            self.added.push(binding);
        }
        Ok(())
    }

    /// The next delivery of a temporary binding, if one arrives within `timeout`.
    pub async fn next_delivery(&mut self, timeout: Duration) -> Option<Event> {
        tokio::time::timeout(timeout, self.mailbox.deliveries.recv())
            .await
            .ok()
            .flatten()
    }

    /// The deliveries of the temporary bindings, as a stream.
    pub fn deliveries(&mut self) -> impl Stream<Item = Event> + '_ {
        futures::stream::poll_fn(move |cx| self.mailbox.deliveries.poll_recv(cx))
    }

    /// Gives the worker back, after removing the lease's bindings.
    pub async fn checkin(mut self) {
        self.released = true;
        let added = std::mem::take(&mut self.added);
        release(
            self.pool.clone(),
            self.worker.clone(),
            added,
            self.generation,
        )
        .await;
    }
}

impl Drop for PoolLease {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let worker = self.worker.clone();
        let (pool, added, generation) = (
            self.pool.clone(),
            std::mem::take(&mut self.added),
            self.generation,
        );
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(release(pool, worker, added, generation));
            }
            // No runtime (process exit): the bindings die with the worker's queue.
            Err(_) => {
                worker.inbox.close();
                pool.checkin(worker, generation, added.is_empty());
            }
        }
    }
}

/// Check-in: stop routing to this lease, remove its bindings, return the worker.
async fn release(pool: Arc<PoolInner>, worker: Arc<Worker>, added: Vec<Binding>, generation: u64) {
    worker.inbox.close();
    let mut clean = true;
    for binding in added {
        if let Err(error) = worker.handle.remove_binding(binding).await {
            tracing::warn!(pool = %pool.name, worker = %worker.id, %error, "cannot remove a temporary binding");
            clean = false;
        }
    }
    pool.checkin(worker, generation, clean);
}
