//! Per-app listener pools (Kazoo's kz_amqp_worker pool, finished): short-lived work checks
//! a worker out instead of opening a channel of its own.
//!
//! A pool keeps `size` workers running and starts up to `overflow` more on demand; an
//! overflow worker idle for `idle_timeout` retires (not at every check-in, so bursts do not
//! churn channels and queues). Checkout waits up to `checkout_timeout`, then fails with
//! [`PoolError::Full`] (or [`PoolError::NotReady`] when a new worker did not consume in
//! time); the pool's counts stay exact on every path, also when a caller gives up (its
//! future is dropped) half-way. A worker goes back to the idle set only when it is clean:
//! every binding its checkout added is gone from every broker its queue may have it on; one
//! that cannot prove that is retired, and a base worker is replaced. Each worker is a listener (its own channel and queue, see `worker`),
//! supervised by the pool's own supervisor `pool:<app>`, so a crashed worker is restarted
//! and a lost channel is replaced like any listener's.
//!
//! Calls of RPC targets take no worker: their replies come to the pool's one reply queue
//! (see `replies`).
//!
//! Files: `worker` (a worker and how its deliveries reach the holder), `checkout` (a checked-out worker), `rpc` (call / call_collect / cast), `replies` (the reply queue of calls of targets), `figures` (its metrics).

mod checkout;
mod figures;
mod replies;
mod rpc;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use ractor::{ActorCell, ActorRef};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use warren_runtime::actor_slot::ActorSlot;
use warren_runtime::config::PoolConfig;
use warren_runtime::envelope::{Envelope, Stamp};
use warren_runtime::metrics::MetricsEntry;
use warren_runtime::node::NodeContext;
use warren_runtime::publisher::Publisher;
use warren_runtime::supervisor::{
    self, ChildSpec, Intensity, Restart, StopDeadline, StopOrder, Supervisor, SupervisorMsg,
    SupervisorSpec, deadline,
};

pub use checkout::Checkout;
pub use rpc::{CollectEnd, Collected, ReplyPredicate, RpcError, Until};

use crate::listener::{node_listener_child, stop_wish};
use figures::{PoolFigures, RpcFigures};
use worker::{Inbox, Worker, WorkerListener};

/// Why a checkout failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Every worker (size + overflow) was busy for the whole checkout timeout.
    #[error("pool `{pool}` is full: {workers} workers busy for {waited:?} (PoolFull)")]
    Full {
        pool: String,
        workers: usize,
        waited: Duration,
    },
    #[error("pool `{0}` is not running")]
    NotRunning(String),
    #[error("pool `{pool}`: a new worker was not ready within {waited:?}")]
    NotReady { pool: String, waited: Duration },
}

/// Counters of a pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Workers running or starting.
    pub workers: usize,
    /// Workers checked out now.
    pub busy: usize,
    pub checkouts: u64,
    /// Checkouts that failed with `PoolFull`.
    pub full: u64,
    /// Overflow workers started so far.
    pub overflow_started: u64,
    /// Overflow workers retired so far.
    pub overflow_retired: u64,
    /// Checkouts waiting for a worker now.
    pub waiting: usize,
    /// Workers retired at check-in because they could not be proven clean (and replaced,
    /// for base workers).
    pub unclean_retired: u64,
    /// Replies that reached a worker or the reply queue after their call had ended (timed
    /// out, or already answered): dropped.
    pub late_replies: u64,
    /// Deliveries of temporary bindings dropped because their holder did not read.
    pub dropped_deliveries: u64,
}

/// The pool of one app: cheap to clone.
#[derive(Clone)]
pub struct ListenerPool {
    inner: Arc<PoolInner>,
}

pub(crate) struct PoolInner {
    name: String,
    config: PoolConfig,
    /// What workers and checkouts are built with.
    ctx: WorkerContext,
    state: Mutex<PoolState>,
    /// A worker was checked in or capacity freed.
    available: Notify,
    supervisor: ActorSlot<SupervisorMsg>,
    /// By when the pool's supervisor must have stopped, written by whoever stops it.
    deadline: StopDeadline,
    reaper: Mutex<Option<JoinHandle<()>>>,
    next_worker: AtomicU64,
    checkouts: AtomicU64,
    full: AtomicU64,
    overflow_started: AtomicU64,
    overflow_retired: AtomicU64,
    unclean_retired: AtomicU64,
    waiting: std::sync::atomic::AtomicUsize,
    /// Calls and checkout waits, observed as they happen.
    rpc: RpcFigures,
    /// The reply queue of calls of RPC targets, once one was made.
    replies: replies::ReplySlot,
    /// The pool's figures in `/metrics`, for as long as the pool exists.
    _figures: MetricsEntry,
}

struct PoolState {
    /// Idle workers, most recently checked in last.
    idle: Vec<Arc<Worker>>,
    /// The base workers (always kept).
    base: Vec<Arc<Worker>>,
    busy: usize,
    /// Workers running or starting.
    total: usize,
    /// Bumped when the pool's supervisor starts again: checkouts of older workers are dropped.
    epoch: u64,
}

impl ListenerPool {
    /// The node the pool's workers run on: its `[rpc]` settings, its listener limits and,
    /// with `[rpc] transport = "amqp10"`, the AMQP 1.0 transport that RPC targets and
    /// notifications then travel on instead of this pool's workers.
    pub(crate) fn node(&self) -> &NodeContext {
        &self.inner.ctx.node
    }

    /// A pool for the app `name` sized by `config`, whose workers run on `node` and send
    /// as `stamp`; it runs once its child (or `spawn`) is started.
    pub(crate) fn new(name: &str, config: PoolConfig, node: NodeContext, stamp: Stamp) -> Self {
        let publisher = node.publisher.with_stamp(stamp.clone());
        let stop_timeout = node.listeners.listener.stop_timeout;
        let metrics = node.metrics.clone();
        ListenerPool {
            inner: Arc::new_cyclic(|this| PoolInner {
                _figures: metrics.register(Arc::new(PoolFigures(this.clone()))),
                rpc: RpcFigures::new(&metrics),
                replies: replies::ReplySlot::default(),
                name: name.to_string(),
                config,
                ctx: WorkerContext {
                    node,
                    stamp,
                    publisher,
                    stop_timeout,
                },
                state: Mutex::new(PoolState {
                    idle: Vec::new(),
                    base: Vec::new(),
                    busy: 0,
                    total: 0,
                    epoch: 0,
                }),
                available: Notify::new(),
                supervisor: ActorSlot::default(),
                deadline: StopDeadline::default(),
                reaper: Mutex::new(None),
                next_worker: AtomicU64::new(0),
                checkouts: AtomicU64::new(0),
                full: AtomicU64::new(0),
                overflow_started: AtomicU64::new(0),
                overflow_retired: AtomicU64::new(0),
                unclean_retired: AtomicU64::new(0),
                waiting: std::sync::atomic::AtomicUsize::new(0),
            }),
        }
    }

    /// The pool's sizing.
    pub fn config(&self) -> PoolConfig {
        self.inner.config
    }

    pub fn stats(&self) -> PoolStats {
        let state = self.inner.state.lock();
        PoolStats {
            workers: state.total,
            busy: state.busy,
            checkouts: self.inner.checkouts.load(Ordering::Relaxed),
            full: self.inner.full.load(Ordering::Relaxed),
            overflow_started: self.inner.overflow_started.load(Ordering::Relaxed),
            overflow_retired: self.inner.overflow_retired.load(Ordering::Relaxed),
            waiting: self.inner.waiting.load(Ordering::Relaxed),
            unclean_retired: self.inner.unclean_retired.load(Ordering::Relaxed),
            late_replies: self.inner.rpc.late.load(Ordering::Relaxed),
            dropped_deliveries: self.inner.rpc.dropped.load(Ordering::Relaxed),
        }
    }

    /// The supervisor child `pool:<app>`: the base workers, and the overflow ones it starts.
    pub fn child(&self) -> ChildSpec {
        let inner = self.inner.clone();
        let id = format!("pool:{}", inner.name);
        let shutdown = inner_shutdown(&inner);
        let told = inner.deadline.clone();
        ChildSpec::new(id, move |parent: ActorCell| {
            let inner = inner.clone();
            async move {
                let spec = inner.supervisor_spec();
                let deadline = inner.deadline.clone();
                let (actor, _) = Supervisor::spawn_linked(spec, deadline, parent).await?;
                inner.started(actor.clone());
                Ok(actor.get_cell())
            }
        })
        .shutdown(shutdown)
        .told(told)
    }

    /// Starts the pool outside any supervision tree (tools, tests); stop it with `stop`.
    pub async fn spawn(&self) -> Result<(), PoolError> {
        let spec = self.inner.supervisor_spec();
        let (actor, _) = Supervisor::spawn_told(spec, self.inner.deadline.clone())
            .await
            .map_err(|_| PoolError::NotRunning(self.inner.name.clone()))?;
        self.inner.started(actor);
        Ok(())
    }

    /// Stops a pool started with `spawn`.
    pub async fn stop(&self) {
        if let Some(reaper) = self.inner.reaper.lock().take() {
            reaper.abort();
        }
        let supervisor = self.inner.supervisor.take();
        if let Some(supervisor) = supervisor {
            let bound = inner_shutdown(&self.inner);
            self.inner.deadline.set(tokio::time::Instant::now() + bound);
            let _ = supervisor
                .stop_and_wait(None, Some(bound + deadline::MARGIN))
                .await;
        }
    }

    /// Checks a worker out, waiting up to the checkout timeout. Dropping the future at
    /// any point loses nothing: a worker being started for it goes to the idle set.
    pub async fn checkout(&self) -> Result<Checkout, PoolError> {
        let inner = &self.inner;
        let started = tokio::time::Instant::now();
        let deadline = started + inner.config.checkout_timeout;
        loop {
            let available = inner.available.notified();
            tokio::pin!(available);
            available.as_mut().enable();
            let next = {
                let mut state = inner.state.lock();
                if inner.supervisor.is_empty() {
                    return Err(PoolError::NotRunning(inner.name.clone()));
                }
                if let Some(worker) = state.idle.pop() {
                    state.busy += 1;
                    Next::Idle(worker, state.epoch)
                } else if state.total < inner.config.size + inner.config.overflow {
                    state.total += 1;
                    state.busy += 1;
                    Next::Start(state.epoch)
                } else {
                    Next::Wait
                }
            };
            match next {
                Next::Idle(worker, epoch) => {
                    // A checkout is handed out ready: its worker consumes (its queue exists
                    // and is bound), or the checkout waits for that, within its deadline.
                    let checkout = inner.hand_out(worker, epoch);
                    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if checkout.worker().handle.is_consuming()
                        || checkout
                            .worker()
                            .handle
                            .wait_consuming(true, remaining)
                            .await
                    {
                        inner.rpc.checkout(started);
                        return Ok(checkout);
                    }
                    // Dropping the checkout gives the worker back.
                    drop(checkout);
                    return Err(PoolError::NotReady {
                        pool: inner.name.clone(),
                        waited: started.elapsed(),
                    });
                }
                Next::Start(epoch) => {
                    let worker = inner.start_overflow(epoch, deadline).await?;
                    inner.rpc.checkout(started);
                    return Ok(inner.hand_out(worker, epoch));
                }
                Next::Wait => {
                    let _waiting = Waiting::new(&inner.waiting);
                    if tokio::time::timeout_at(deadline, available).await.is_err() {
                        inner.full.fetch_add(1, Ordering::Relaxed);
                        return Err(PoolError::Full {
                            pool: inner.name.clone(),
                            workers: inner.config.size + inner.config.overflow,
                            waited: started.elapsed(),
                        });
                    }
                }
            }
        }
    }

    /// Checks a worker out, runs `work` with it and checks it in again (a checkout that is
    /// dropped half-way, by a panic or a cancelled caller, goes back to the pool too).
    pub async fn with_checkout<T>(
        &self,
        work: impl AsyncFnOnce(&mut Checkout) -> T,
    ) -> Result<T, PoolError> {
        let mut checkout = self.checkout().await?;
        let result = work(&mut checkout).await;
        checkout.checkin().await;
        Ok(result)
    }

    /// Checkout, call, check-in: the first reply to `request` (see [`Checkout::call`]).
    pub async fn call(
        &self,
        exchange: &str,
        routing_key: &str,
        request: Envelope,
        timeout: Duration,
    ) -> Result<Envelope, RpcError> {
        let call = async |checkout: &mut Checkout| {
            checkout.call(exchange, routing_key, request, timeout).await
        };
        self.with_checkout(call).await?
    }

    /// Checkout, cast, check-in.
    pub async fn cast(
        &self,
        exchange: &str,
        routing_key: &str,
        request: Envelope,
        timeout: Duration,
    ) -> Result<(), RpcError> {
        let mut checkout = self.checkout().await?;
        let result = checkout.cast(exchange, routing_key, request, timeout).await;
        checkout.checkin().await;
        result
    }
}

/// What a pool's workers and checkouts need from the node.
#[derive(Clone)]
struct WorkerContext {
    node: NodeContext,
    stamp: Stamp,
    /// The node's publisher, stamping as the app.
    publisher: Publisher,
    /// `[listener] stop_timeout`: how long one worker may take to stop.
    stop_timeout: Duration,
}

/// Counts a waiting checkout for as long as it waits (also when its future is dropped).
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a checkout does next.
enum Next {
    Idle(Arc<Worker>, u64),
    Start(u64),
    Wait,
}

/// What the pool asks of its parent to stop: its workers stop together, each asking for
/// what a listener does.
fn inner_shutdown(inner: &PoolInner) -> Duration {
    let worker = stop_wish(inner.ctx.stop_timeout);
    deadline::declared(
        StopOrder::Concurrent,
        [worker].into_iter(),
        deadline::MARGIN,
    )
}

impl PoolInner {
    /// A new worker (listener child and its shared state).
    fn new_worker(&self, overflow: bool) -> Option<(ChildSpec, Arc<Worker>)> {
        let WorkerContext { node, stamp, .. } = &self.ctx;
        let n = self.next_worker.fetch_add(1, Ordering::Relaxed);
        let mut inbox = Inbox::default();
        inbox.late = self.rpc.late.clone();
        inbox.dropped = self.rpc.dropped.clone();
        let inbox = Arc::new(inbox);
        let listener = WorkerListener {
            name: format!("pool-{}-{n}", self.name),
            inbox: inbox.clone(),
        };
        let (child, handle) = match node_listener_child(listener, node, stamp.clone()) {
            Ok(worker) => worker,
            Err(error) => {
                // The worker's spec is warren's own; only a bug gets here.
                tracing::error!(pool = %self.name, %error, "cannot build a pool worker");
                return None;
            }
        };
        let id = child.id.clone();
        let child = child.restart(if overflow {
            Restart::Transient
        } else {
            Restart::Permanent
        });
        let worker = Arc::new(Worker {
            id,
            handle,
            inbox,
            overflow,
            idle_since: Mutex::new(Instant::now()),
        });
        Some((child, worker))
    }

    /// The pool supervisor with `size` fresh base workers; resets the pool's state.
    fn supervisor_spec(&self) -> SupervisorSpec {
        let mut children = Vec::new();
        let mut base = Vec::new();
        for _ in 0..self.config.size {
            if let Some((child, worker)) = self.new_worker(false) {
                children.push(child);
                base.push(worker);
            }
        }
        {
            let mut state = self.state.lock();
            state.epoch += 1;
            state.idle = base.clone();
            state.total = base.len();
            state.busy = 0;
            state.base = base;
        }
        self.replies.reset();
        // Workers are independent: they stop together.
        SupervisorSpec::one_for_one(
            format!("pool:{}", self.name),
            StopOrder::Concurrent,
            Intensity::new(10, Duration::from_secs(30)),
            children,
        )
    }

    /// The supervisor is up: remember it and start retiring idle overflow workers.
    fn started(self: &Arc<Self>, supervisor: ActorRef<SupervisorMsg>) {
        self.supervisor.set(supervisor);
        let weak = Arc::downgrade(self);
        let every = (self.config.idle_timeout / 4).max(Duration::from_millis(25));
        let reaper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                inner.retire_idle().await;
            }
        });
        if let Some(old) = self.reaper.lock().replace(reaper) {
            old.abort();
        }
        tracing::info!(pool = %self.name, size = self.config.size, overflow = self.config.overflow, "pool started");
        self.available.notify_waiters();
    }

    /// Starts an overflow worker (the caller has counted it in `total` and `busy`) and
    /// waits, until `deadline`, for it to consume. The start runs as a task of its own, so
    /// a caller that gives up loses nothing: the worker then goes to the idle set. On every
    /// error the counts are put right exactly once.
    async fn start_overflow(
        self: &Arc<Self>,
        epoch: u64,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<Worker>, PoolError> {
        let (tx, rx) = oneshot::channel();
        let inner = self.clone();
        tokio::spawn(async move {
            let started = inner.start_overflow_now(epoch, deadline).await;
            if let Err(Ok(worker)) = tx.send(started) {
                // The caller is gone: the worker is the pool's again.
                inner.checkin(worker, epoch, true);
            }
        });
        rx.await
            .unwrap_or_else(|_| Err(PoolError::NotRunning(self.name.clone())))
    }

    async fn start_overflow_now(
        self: &Arc<Self>,
        epoch: u64,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<Worker>, PoolError> {
        let not_running = || PoolError::NotRunning(self.name.clone());
        let started = async {
            let supervisor = self.supervisor.get().ok_or_else(not_running)?;
            let (child, worker) = self.new_worker(true).ok_or_else(not_running)?;
            supervisor::start_child(&supervisor, child)
                .await
                .map_err(|_| not_running())?;
            Ok(worker)
        }
        .await;
        let worker = match started {
            Ok(worker) => worker,
            Err(error) => {
                // Never started: it is not counted any more.
                self.forget_reserved(epoch);
                return Err(error);
            }
        };
        self.overflow_started.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(pool = %self.name, worker = %worker.id, "overflow worker started");
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if !worker.handle.wait_consuming(true, remaining).await {
            // Not ready in time: it stays in the pool, idle, for a later checkout.
            self.checkin(worker, epoch, true);
            return Err(PoolError::NotReady {
                pool: self.name.clone(),
                waited: self.config.checkout_timeout,
            });
        }
        Ok(worker)
    }

    /// A worker counted for a checkout was never started.
    fn forget_reserved(&self, epoch: u64) {
        let mut state = self.state.lock();
        if epoch == state.epoch {
            state.total = state.total.saturating_sub(1);
            state.busy = state.busy.saturating_sub(1);
        }
        drop(state);
        self.available.notify_one();
    }

    fn hand_out(self: &Arc<Self>, worker: Arc<Worker>, epoch: u64) -> Checkout {
        self.checkouts.fetch_add(1, Ordering::Relaxed);
        let mailbox = worker.inbox.open();
        Checkout {
            pool: self.clone(),
            publisher: self.ctx.publisher.clone(),
            worker,
            released: false,
            mailbox,
            added: Vec::new(),
            epoch,
        }
    }

    /// A worker comes back. A clean one goes to the idle set; one whose checkout's bindings
    /// may remain somewhere is retired (a base worker is replaced by a fresh one).
    fn checkin(self: &Arc<Self>, worker: Arc<Worker>, epoch: u64, clean: bool) {
        let mut state = self.state.lock();
        if epoch != state.epoch {
            return;
        }
        state.busy = state.busy.saturating_sub(1);
        if clean {
            *worker.idle_since.lock() = Instant::now();
            state.idle.push(worker);
            drop(state);
            self.available.notify_one();
            return;
        }
        state.total = state.total.saturating_sub(1);
        let base = !worker.overflow;
        if base {
            state.base.retain(|w| !Arc::ptr_eq(w, &worker));
            // The replacement is counted now, so the pool never exceeds its size.
            state.total += 1;
        }
        drop(state);
        self.unclean_retired.fetch_add(1, Ordering::Relaxed);
        tracing::info!(pool = %self.name, worker = %worker.id, "a worker's bindings may remain on a broker: retired, not reused");
        self.terminate(worker);
        if base {
            let inner = self.clone();
            tokio::spawn(async move { inner.replace_base(epoch).await });
        }
        self.available.notify_one();
    }

    /// Starts a base worker in place of a retired one (already counted in `total`).
    async fn replace_base(self: &Arc<Self>, epoch: u64) {
        let Some(supervisor) = self.supervisor.get() else {
            return;
        };
        let Some((child, worker)) = self.new_worker(false) else {
            self.forget_replacement(epoch);
            return;
        };
        if supervisor::start_child(&supervisor, child).await.is_err() {
            self.forget_replacement(epoch);
            return;
        }
        let mut state = self.state.lock();
        if epoch != state.epoch {
            return;
        }
        *worker.idle_since.lock() = Instant::now();
        state.base.push(worker.clone());
        state.idle.push(worker);
        drop(state);
        self.available.notify_one();
    }

    fn forget_replacement(&self, epoch: u64) {
        let mut state = self.state.lock();
        if epoch == state.epoch {
            state.total = state.total.saturating_sub(1);
        }
        drop(state);
        tracing::warn!(pool = %self.name, "cannot start a replacement worker; the pool runs one short");
        self.available.notify_one();
    }

    /// Retires overflow workers idle longer than the idle timeout.
    async fn retire_idle(&self) {
        let retiring: Vec<Arc<Worker>> = {
            let mut state = self.state.lock();
            let now = Instant::now();
            let (old, keep): (Vec<_>, Vec<_>) = state.idle.drain(..).partition(|w| {
                w.overflow && now.duration_since(*w.idle_since.lock()) >= self.config.idle_timeout
            });
            state.idle = keep;
            state.total = state.total.saturating_sub(old.len());
            old
        };
        for worker in retiring {
            self.overflow_retired.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(pool = %self.name, worker = %worker.id, "idle overflow worker retires");
            self.terminate(worker);
        }
    }

    fn terminate(&self, worker: Arc<Worker>) {
        let Some(supervisor) = self.supervisor.get() else {
            return;
        };
        tokio::spawn(async move {
            let _ = supervisor::terminate_child(&supervisor, &worker.id).await;
        });
    }
}
