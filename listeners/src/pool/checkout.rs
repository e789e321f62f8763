//! A checked-out worker. Through a checkout a task publishes (with confirms, through the
//! node's publisher and its publish connection, so a broker that blocks publishing never
//! stalls the worker's consumer), adds temporary bindings to the worker's queue and reads
//! their deliveries, and makes calls on the worker's channel (see `rpc`).
//!
//! The checkout goes back to the pool when it is dropped, also when its holder panics; check-in
//! removes the bindings the checkout added. `checkin().await` does the same and waits for it;
//! the check-in runs as a task of its own, so a caller that drops the `checkin` future (or
//! any checkout call) half-way still gives the worker back. A worker whose bindings cannot be
//! shown to be gone from every broker is retired instead of being handed out again.

use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use warren_runtime::publisher::Publisher;

use super::PoolInner;
use super::worker::{Mailbox, Worker};
use crate::listener::{Binding, Event, ListenerError};

/// A worker checked out of a pool.
pub struct Checkout {
    pub(super) pool: Arc<PoolInner>,
    /// The node's publisher, stamping as the app.
    pub(super) publisher: Publisher,
    pub(super) worker: Arc<Worker>,
    /// Checked in already (by `checkin`).
    pub(super) released: bool,
    pub(super) mailbox: Mailbox,
    pub(super) added: Vec<Binding>,
    /// The pool epoch the worker belongs to.
    pub(super) epoch: u64,
}

impl Checkout {
    pub(crate) fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }

    /// The pool the worker belongs to.
    pub(crate) fn pool(&self) -> super::ListenerPool {
        super::ListenerPool {
            inner: self.pool.clone(),
        }
    }

    /// The node the worker runs on (see `ListenerPool::node`).
    pub(crate) fn node(&self) -> &warren_runtime::node::NodeContext {
        &self.pool.ctx.node
    }

    /// The worker's queue: its `Server-ID`.
    pub fn queue(&self) -> String {
        self.worker().handle.queue_name()
    }

    /// The broker the worker consumes on now, if it has a channel.
    pub fn broker(&self) -> Option<warren_runtime::broker::BrokerId> {
        self.worker()
            .handle
            .current()
            .filter(|_| self.worker().handle.is_consuming())
            .map(|(broker, _)| broker)
    }

    /// The publisher a call's request goes out through: the worker's broker (where its
    /// queue, and so the reply, is), or the primary while it is between channels.
    pub(crate) fn request_publisher(&self) -> Publisher {
        match self.worker().handle.current() {
            Some((broker, _)) => self.publisher.to_broker(broker),
            None => self.publisher.clone(),
        }
    }

    /// The node's publisher, stamping as the app: publishes with confirms on the primary,
    /// through the publish connection, so a blocked broker never stalls the worker.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// Binds the worker's queue for the time of this checkout; removed at check-in. The
    /// binding is recorded before the broker is asked, so that a caller that gives up
    /// half-way cannot leave it behind for the next holder.
    pub async fn bind(&mut self, binding: Binding) -> Result<(), ListenerError> {
        if self.added.contains(&binding) {
            return Ok(());
        }
        let existing = self.worker().handle.bindings().contains(&binding);
        if !existing {
            self.added.push(binding.clone());
        }
        self.worker().handle.add_binding(binding).await
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

    /// Gives the worker back, after removing the checkout's bindings; returns once done.
    /// Dropping this future does not stop the check-in.
    pub async fn checkin(mut self) {
        self.released = true;
        let added = std::mem::take(&mut self.added);
        if added.is_empty() {
            // Nothing to unbind: the check-in is immediate, so there is nothing for a
            // caller that gives up half-way to interrupt.
            self.worker.inbox.close();
            self.pool.checkin(self.worker.clone(), self.epoch, true);
            return;
        }
        let release = tokio::spawn(release(
            self.pool.clone(),
            self.worker.clone(),
            added,
            self.epoch,
        ));
        let _ = release.await;
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let worker = self.worker.clone();
        let (pool, added, epoch) = (
            self.pool.clone(),
            std::mem::take(&mut self.added),
            self.epoch,
        );
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(release(pool, worker, added, epoch));
            }
            // No runtime (process exit): the bindings cannot be removed; the worker is not
            // reused unless it had none.
            Err(_) => {
                worker.inbox.close();
                pool.checkin(worker, epoch, added.is_empty());
            }
        }
    }
}

/// Check-in: stop routing to this checkout, remove its bindings, return the worker — clean
/// only if every binding is gone from every broker its queue may have it on.
async fn release(pool: Arc<PoolInner>, worker: Arc<Worker>, added: Vec<Binding>, epoch: u64) {
    worker.inbox.close();
    let mut clean = true;
    for binding in added {
        match worker.handle.remove_binding_cleanly(binding).await {
            Ok(removed) => clean &= removed.clean,
            Err(error) => {
                tracing::warn!(pool = %pool.name, worker = %worker.id, %error, "cannot remove a temporary binding");
                clean = false;
            }
        }
    }
    pool.checkin(worker, epoch, clean);
}
