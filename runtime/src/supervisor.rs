//! A small OTP-style supervisor on ractor, used for every supervisor in warren's
//! process tree (root, `connections`, `apps`, `app:<name>`).
//!
//! ractor links actors but has no restart strategies, restart intensity or
//! backoff, and its default `handle_supervisor_evt` stops the supervisor when any
//! child exits. This module supplies what OTP's `supervisor` does:
//!
//! - children start in order when the supervisor starts (`spawn` returns once all
//!   are up; a start failure stops the started ones and fails the spawn with a
//!   readable chain of reasons);
//! - `OneForOne` or `RestForOne` restarts, per child `Permanent` / `Transient` /
//!   `Temporary`, each after an exponential backoff delivered as a scheduled
//!   self-message (a handler never sleeps);
//! - a restart intensity over a sliding window, past which the supervisor stops
//!   its children and fails upward;
//! - an orderly shutdown out of one budget: children stop one at a time in reverse
//!   start order (or all at once, for independent children), each told its deadline
//!   out of the supervisor's own (`deadline`), then killed there.
//!
//! Supervised actors are not registered under a name (ractor names are global
//! and released only as an actor stops); a child's id is a label for logs and for
//! `TerminateChild`. This module owns supervision only: it must not know what its
//! children do, and a child must do its I/O in messages it sends itself, never in
//! `pre_start`.

mod actor;
mod child;
pub mod deadline;
mod error;
mod intensity;
#[cfg(test)]
mod tests;

use std::time::Duration;

use ractor::concurrency::JoinHandle;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorCell, ActorRef, RpcReplyPort, SpawnErr};

use crate::backoff::Backoff;

pub use child::{ChildSpec, DEFAULT_SHUTDOWN, Restart};
pub use deadline::{StopDeadline, StopOrder};
pub use error::{SupervisorError, spawn_error_reason};
pub use intensity::Intensity;

/// How long the convenience functions wait for a supervisor's answer.
///
/// The supervisor handles one request at a time, and starting or terminating a
/// child includes the child's own start or shutdown, so this is generous.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How a supervisor reacts when one child dies (OTP strategies).
///
/// It exists because children are not always independent: in warren's root,
/// later children depend on earlier ones (the registry before the connections
/// that report into it), so their restart must follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Restart only the child that died.
    OneForOne,
    /// Stop every child started after the dead one (gracefully, in reverse
    /// order), then restart the dead one and those, in order.
    RestForOne,
}

/// A supervisor's whole definition.
///
/// It exists so that a subtree is described as data, in one place, and can be
/// started again as a whole when the supervisor itself is restarted by its parent.
#[derive(Clone, Debug)]
pub struct SupervisorSpec {
    /// Label for logs (not a registered actor name).
    pub name: String,
    /// What happens to the other children when one dies.
    pub strategy: Strategy,
    /// How many restarts are tolerated before the supervisor gives up.
    pub intensity: Intensity,
    /// Delay before each restart.
    pub backoff: Backoff,
    /// One at a time in reverse start order, or all at once.
    pub stop: StopOrder,
    /// Children, in start order.
    pub children: Vec<ChildSpec>,
}

impl SupervisorSpec {
    /// A one-for-one supervisor that restarts with [`Backoff::for_restarts`]: what every
    /// supervisor of the tree but the root is.
    pub fn one_for_one(
        name: impl Into<String>,
        stop: StopOrder,
        intensity: Intensity,
        children: Vec<ChildSpec>,
    ) -> Self {
        SupervisorSpec {
            name: name.into(),
            strategy: Strategy::OneForOne,
            intensity,
            backoff: Backoff::for_restarts(),
            stop,
            children,
        }
    }

    /// What this supervisor asks of its parent to stop: its children's wishes (in
    /// sequence, or the largest when they stop together) and a margin for itself.
    pub fn shutdown(&self) -> Duration {
        deadline::declared(
            self.stop,
            self.children.iter().map(|child| child.shutdown),
            deadline::MARGIN,
        )
    }
}

/// The supervisor actor.
///
/// It exists because ractor only links actors: it neither restarts children nor
/// limits restarts. Every supervisor in warren's tree is one of these, each with
/// its own [`SupervisorSpec`]. Spawn it with [`Supervisor::spawn`] or [`Supervisor::spawn_linked`]; talk to it
/// with [`SupervisorMsg`] or the convenience functions [`start_child`],
/// [`terminate_child`] and [`children`].
pub struct Supervisor;

/// What a supervisor can be asked to do.
///
/// It exists for the dynamic part of a tree (apps and their listeners come and
/// go at run time) and for inspection.
pub enum SupervisorMsg {
    /// Start a dynamic child, appended after the existing ones.
    StartChild(ChildSpec, RpcReplyPort<Result<ActorCell, SupervisorError>>),
    /// Stop a child gracefully (its shutdown timeout, then kill) and remove it.
    /// Answers whether the child existed.
    TerminateChild(String, RpcReplyPort<bool>),
    /// The children, in start order.
    Children(RpcReplyPort<Vec<ChildInfo>>),
    /// Internal: a restart delay has elapsed. Only the supervisor can build one.
    RestartDue(RestartToken),
}

/// Identifies one scheduled restart, so a timer that outlived its purpose
/// (the child was terminated, or restarted by `RestForOne`) is ignored.
pub struct RestartToken {
    child: String,
    token: u64,
}

/// A snapshot of one child, as answered to [`SupervisorMsg::Children`].
///
/// It exists for callers that need a child's current cell (to message or
/// monitor it) and for tests and diagnostics.
#[derive(Clone, Debug)]
pub struct ChildInfo {
    /// The child's id.
    pub id: String,
    /// The running actor; `None` while it waits to be restarted.
    pub cell: Option<ActorCell>,
    /// How many times the supervisor has started it again.
    pub restarts: u32,
    /// Of those, how many are inside the restart intensity's window now (the ones that
    /// count towards giving up).
    pub recent_restarts: u32,
}

impl Supervisor {
    /// Start a supervisor and, in order, all of its children.
    ///
    /// Returns once every child is up. If a child fails to start, the children
    /// already started are stopped in reverse order and the spawn fails; the
    /// error's text (see [`spawn_error_reason`]) names the child and its reason.
    pub async fn spawn(
        spec: SupervisorSpec,
    ) -> Result<(ActorRef<SupervisorMsg>, JoinHandle<()>), SpawnErr> {
        Self::spawn_told(spec, StopDeadline::default()).await
    }

    /// As [`Supervisor::spawn`], stopping by the deadline written to `deadline` (by
    /// whoever stops it; without one it takes [`SupervisorSpec::shutdown`]).
    pub async fn spawn_told(
        spec: SupervisorSpec,
        deadline: StopDeadline,
    ) -> Result<(ActorRef<SupervisorMsg>, JoinHandle<()>), SpawnErr> {
        <Self as Actor>::spawn(None, Supervisor, (spec, deadline)).await
    }

    /// As [`Supervisor::spawn`], linked to `parent`, which then sees this
    /// supervisor's exit (an `ActorFailed` when it gives up), and told its stop deadline
    /// through `deadline` (pass the same to the child spec's [`ChildSpec::told`]).
    pub async fn spawn_linked(
        spec: SupervisorSpec,
        deadline: StopDeadline,
        parent: ActorCell,
    ) -> Result<(ActorRef<SupervisorMsg>, JoinHandle<()>), SpawnErr> {
        <Self as Actor>::spawn_linked(None, Supervisor, (spec, deadline), parent).await
    }
}

impl ChildSpec {
    /// A child that is itself a supervisor: how subtrees are nested.
    ///
    /// The id is the spec's name. It asks for [`SupervisorSpec::shutdown`] and stops by
    /// the deadline its parent tells it; override the wish with [`ChildSpec::shutdown`]
    /// if it gains dynamic children.
    pub fn supervisor(spec: SupervisorSpec) -> ChildSpec {
        let shutdown = spec.shutdown();
        let id = spec.name.clone();
        let deadline = StopDeadline::default();
        let told = deadline.clone();
        ChildSpec::new(id, move |parent| {
            let (spec, deadline) = (spec.clone(), deadline.clone());
            async move {
                Supervisor::spawn_linked(spec, deadline, parent)
                    .await
                    .map(|(sup, _)| sup.get_cell())
            }
        })
        .shutdown(shutdown)
        .told(told)
    }
}

/// Start a dynamic child under `sup`; it is appended after the existing children.
pub async fn start_child(
    sup: &ActorRef<SupervisorMsg>,
    spec: ChildSpec,
) -> Result<ActorCell, SupervisorError> {
    call(sup, |reply| SupervisorMsg::StartChild(spec, reply)).await?
}

/// Stop the child `id` of `sup` gracefully and remove it; `false` if there was no such child.
pub async fn terminate_child(
    sup: &ActorRef<SupervisorMsg>,
    id: &str,
) -> Result<bool, SupervisorError> {
    let id = id.to_string();
    call(sup, |reply| SupervisorMsg::TerminateChild(id, reply)).await
}

/// The children of `sup`, in start order.
pub async fn children(sup: &ActorRef<SupervisorMsg>) -> Result<Vec<ChildInfo>, SupervisorError> {
    call(sup, SupervisorMsg::Children).await
}

/// One request to a supervisor, answered within [`CALL_TIMEOUT`].
async fn call<T, F>(sup: &ActorRef<SupervisorMsg>, build: F) -> Result<T, SupervisorError>
where
    T: Send + 'static,
    F: FnOnce(RpcReplyPort<T>) -> SupervisorMsg,
{
    match sup.call(build, Some(CALL_TIMEOUT)).await {
        Ok(CallResult::Success(answer)) => Ok(answer),
        Ok(CallResult::Timeout) => Err(SupervisorError::Unavailable(format!(
            "no answer within {CALL_TIMEOUT:?}"
        ))),
        Ok(CallResult::SenderError) => Err(SupervisorError::Unavailable(
            "the request was dropped unanswered".to_string(),
        )),
        Err(err) => Err(SupervisorError::Unavailable(err.to_string())),
    }
}
