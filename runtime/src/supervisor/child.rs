//! One supervised child: its specification (how to start it, when to restart
//! it, how long it may take to stop) and the two operations a supervisor performs
//! on it, start and graceful stop.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use ractor::{Actor, ActorCell, ActorStatus, SpawnErr};
use tokio::time::Instant;

use super::deadline::StopDeadline;
use super::error::{SupervisorError, spawn_error_reason};

/// Default time a child gets to stop gracefully before it is killed.
pub const DEFAULT_SHUTDOWN: Duration = Duration::from_secs(5);

/// How long to wait for a killed child to be gone before giving up on it.
/// A kill interrupts any await at once, so this only matters for a child that
/// blocks its thread.
const KILL_GRACE: Duration = Duration::from_secs(1);

/// When a child is restarted (OTP restart types).
///
/// It exists because not every child should come back: a worker that finished
/// its job (transient) or a one-shot task (temporary) must not be restarted
/// forever, while a connection owner (permanent) always must.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// Always restarted, whether it failed or stopped normally.
    Permanent,
    /// Restarted only after a failure (`ActorFailed`: a panic or an `Err` from a
    /// handler); a normal stop, or a kill by someone else, removes it.
    Transient,
    /// Never restarted; removed when it exits, normally or not.
    Temporary,
}

/// The start function of a child: spawns it linked to the given supervisor cell.
type StartFn =
    Arc<dyn Fn(ActorCell) -> BoxFuture<'static, Result<ActorCell, SpawnErr>> + Send + Sync>;

/// One child: how to start it and how to treat it.
///
/// It exists so a supervisor can restart a child without knowing its actor type:
/// the spec captures the start function (and its arguments) once, and the
/// supervisor calls it again for every restart.
#[derive(Clone)]
pub struct ChildSpec {
    /// Unique among the supervisor's children; a label for logs, not an actor name.
    pub id: String,
    /// When the child is restarted.
    pub restart: Restart,
    /// The most the child asks for to stop gracefully (default 5 s); its parent gives it
    /// a deadline out of its own budget, never later than this.
    pub shutdown: Duration,
    /// Where the parent writes the child's stop deadline, for a child that plans its stop
    /// by it (see [`ChildSpec::told`]).
    told: Option<StopDeadline>,
    start: StartFn,
}

impl ChildSpec {
    /// `start` spawns the child linked to the given supervisor cell, e.g. `|sup| async move { Actor::spawn_linked(None, MyActor, args, sup).await.map(|(r, _)| r.get_cell()) }`.
    ///
    /// Pass `None` as the actor name: names are global in ractor and are released
    /// only as an actor stops, so a restarted child could collide with its old self.
    /// The child starts as `Permanent` with a 5 s shutdown timeout.
    pub fn new<F, Fut>(id: impl Into<String>, start: F) -> Self
    where
        F: Fn(ActorCell) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<ActorCell, SpawnErr>> + Send + 'static,
    {
        let start: StartFn = Arc::new(move |sup: ActorCell| start(sup).boxed());
        Self {
            id: id.into(),
            restart: Restart::Permanent,
            shutdown: DEFAULT_SHUTDOWN,
            told: None,
            start,
        }
    }

    /// A child that is one actor, spawned linked and unnamed: `make` gives the actor and
    /// its arguments for each (re)start. The common case of [`ChildSpec::new`].
    pub fn actor<A, F>(id: impl Into<String>, make: F) -> Self
    where
        A: Actor,
        F: Fn() -> (A, A::Arguments) + Send + Sync + 'static,
    {
        ChildSpec::new(id, move |parent: ActorCell| {
            let (actor, arguments) = make();
            async move {
                let (actor, _) = Actor::spawn_linked(None, actor, arguments, parent).await?;
                Ok(actor.get_cell())
            }
        })
    }

    /// Set when the child is restarted.
    pub fn restart(mut self, r: Restart) -> Self {
        self.restart = r;
        self
    }

    /// Set the most the child may take to stop before it is killed.
    pub fn shutdown(mut self, d: Duration) -> Self {
        self.shutdown = d;
        self
    }

    /// The child reads its stop deadline from `deadline`: the parent writes it there just
    /// before it asks the child to stop.
    pub fn told(mut self, deadline: StopDeadline) -> Self {
        self.told = Some(deadline);
        self
    }

    /// Start the child linked to `supervisor`.
    ///
    /// A panic in the start function itself is reported as a start failure, not
    /// propagated: nothing a child does may bring its supervisor down by panic.
    pub(super) async fn start(&self, supervisor: &ActorCell) -> Result<ActorCell, SupervisorError> {
        // The start function is called inside the guarded future, so a panic
        // before it returns its future is caught as well.
        let start = async { (self.start)(supervisor.clone()).await };
        let outcome = AssertUnwindSafe(start).catch_unwind().await;
        let cell = match outcome {
            Ok(Ok(cell)) => cell,
            Ok(Err(err)) => {
                return Err(SupervisorError::ChildStart {
                    child: self.id.clone(),
                    reason: spawn_error_reason(&err),
                });
            }
            Err(panic) => {
                return Err(SupervisorError::ChildStart {
                    child: self.id.clone(),
                    reason: format!("start function panicked: {}", panic_text(panic.as_ref())),
                });
            }
        };
        match link_state(&cell, supervisor) {
            LinkState::Linked => {}
            // Its exit went to the supervisor it was linked to, which ractor then
            // unlinked (a temporary child such as the node's bootstrap often ends
            // before this look); nothing to link, nothing wrong.
            LinkState::Ended => {
                tracing::debug!(child = %self.id, "child ended while it was being started");
            }
            LinkState::Unlinked => {
                // Without the link no exit event would ever reach us.
                tracing::warn!(
                    child = %self.id,
                    "start function did not link the child to its supervisor; linking it now"
                );
                cell.link(supervisor.clone());
            }
        }
        Ok(cell)
    }
}

/// How a just-started child stands towards its supervisor.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum LinkState {
    Linked,
    /// Stopping or stopped already: ractor unlinks an actor when it ends, after telling
    /// its supervisor, so a missing link says nothing about how it was started.
    Ended,
    /// Running but not linked to the supervisor: its start function spawned it
    /// unlinked.
    Unlinked,
}

/// Whether `cell` is linked to `supervisor`, or ended before anyone could tell.
pub(super) fn link_state(cell: &ActorCell, supervisor: &ActorCell) -> LinkState {
    let linked = cell
        .try_get_supervisor()
        .is_some_and(|sup| sup.get_id() == supervisor.get_id());
    if linked {
        LinkState::Linked
    } else if cell.get_status() >= ActorStatus::Stopping {
        LinkState::Ended
    } else {
        LinkState::Unlinked
    }
}

impl std::fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSpec")
            .field("id", &self.id)
            .field("restart", &self.restart)
            .field("shutdown", &self.shutdown)
            .finish_non_exhaustive()
    }
}

/// Stop a child gracefully: tell it its deadline, ask it to stop, wait until the
/// deadline, then kill it.
///
/// Uses `stop` + `wait` rather than `stop_and_wait`: ractor's stop port is
/// one-shot, so if someone else already asked the child to stop,
/// `stop_and_wait` would return at once instead of waiting for the exit.
pub(super) async fn stop_child(spec: &ChildSpec, cell: &ActorCell, deadline: Instant) {
    let id = &spec.id;
    if let Some(told) = &spec.told {
        told.set(deadline);
    }
    cell.stop(None);
    let shutdown = deadline.saturating_duration_since(Instant::now());
    if cell.wait(Some(shutdown)).await.is_ok() {
        tracing::debug!(child = %id, "child stopped");
        return;
    }
    tracing::warn!(child = %id, ?shutdown, "child did not stop by its deadline; killing it");
    cell.kill();
    if cell.wait(Some(KILL_GRACE)).await.is_err() {
        tracing::error!(child = %id, "child still running after kill; abandoning it");
    }
}

/// The message of a caught panic, when it is a string.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        text.to_string()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "unknown panic".to_string()
    }
}
