//! The running supervisor: its state, and how it reacts to child exits,
//! scheduled restarts, requests and its own stop.
//!
//! Everything here runs inside the supervisor actor's handlers, one event at a
//! time. A handler never sleeps: restart delays are scheduled self-messages.
//! Stopping a child on purpose first takes it out of the `Running` state, so
//! the exit event it produces later matches no running child and is ignored.

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::time::Instant;

use super::child::{ChildSpec, Restart, stop_child};
use super::deadline::{self, StopDeadline, StopOrder};
use super::error::SupervisorError;
use super::intensity::{Intensity, RestartWindow};
use super::{ChildInfo, RestartToken, Strategy, Supervisor, SupervisorMsg, SupervisorSpec};
use crate::backoff::Backoff;

/// The supervisor's state: its definition and its children, in start order.
///
/// It exists as ractor's `Actor::State` of [`Supervisor`]; nothing outside this
/// module can see into it (ask with [`SupervisorMsg::Children`] instead).
pub struct SupervisorState {
    name: String,
    strategy: Strategy,
    intensity: Intensity,
    backoff: Backoff,
    stop: StopOrder,
    /// Where the parent writes this supervisor's stop deadline.
    deadline: StopDeadline,
    children: Vec<Child>,
    window: RestartWindow,
    next_token: u64,
}

/// One supervised child.
struct Child {
    spec: ChildSpec,
    status: ChildStatus,
    restarts: u32,
}

/// Where a child is in its life.
enum ChildStatus {
    /// Up; exit events from this cell are acted upon.
    Running(ActorCell),
    /// Waiting for its own restart timer, identified by `token`.
    Backoff { token: u64 },
    /// Stopped by `RestForOne`; starts again right after an earlier child restarts.
    Waiting,
}

/// How a child ended.
enum Exit {
    /// It stopped (normally, or killed by someone), with ractor's reason if any.
    Stopped(Option<String>),
    /// It panicked or a handler returned `Err`.
    Failed(String),
}

impl Exit {
    fn describe(&self) -> String {
        match self {
            Exit::Stopped(Some(reason)) => format!("stopped: {reason}"),
            Exit::Stopped(None) => "stopped normally".to_string(),
            Exit::Failed(reason) => format!("failed: {reason}"),
        }
    }
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = (SupervisorSpec, StopDeadline);

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        (spec, deadline): (SupervisorSpec, StopDeadline),
    ) -> Result<SupervisorState, ActorProcessingErr> {
        deadline.clear();
        let mut state = SupervisorState {
            name: spec.name,
            strategy: spec.strategy,
            intensity: spec.intensity,
            backoff: spec.backoff,
            stop: spec.stop,
            deadline,
            children: Vec::with_capacity(spec.children.len()),
            window: RestartWindow::default(),
            next_token: 0,
        };
        for child in spec.children {
            if let Err(err) = state.add_child(&myself, child).await {
                tracing::error!(supervisor = %state.name, error = %err, "supervisor failed to start");
                state.stop_all().await;
                return Err(err.into());
            }
        }
        tracing::info!(
            supervisor = %state.name,
            children = state.children.len(),
            "supervisor started"
        );
        Ok(state)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        tracing::info!(supervisor = %state.name, "supervisor stopping its children");
        state.stop_all().await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        message: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::StartChild(spec, reply) => {
                let id = spec.id.clone();
                let result = state.add_child(&myself, spec).await;
                match &result {
                    Ok(_) => tracing::info!(supervisor = %state.name, child = %id, "child started"),
                    Err(err) => {
                        tracing::warn!(supervisor = %state.name, child = %id, error = %err, "dynamic child not started")
                    }
                }
                let _ = reply.send(result);
            }
            SupervisorMsg::TerminateChild(id, reply) => {
                let existed = state.terminate_child(&id).await;
                let _ = reply.send(existed);
            }
            SupervisorMsg::Children(reply) => {
                let _ = reply.send(state.child_infos());
            }
            SupervisorMsg::RestartDue(token) => {
                state.restart_due(&myself, token).await?;
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                state
                    .child_exited(&myself, cell.get_id(), Exit::Stopped(reason))
                    .await?;
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                state
                    .child_exited(&myself, cell.get_id(), Exit::Failed(err.to_string()))
                    .await?;
            }
            // Starts are expected, and process groups are not our business.
            _ => {}
        }
        Ok(())
    }
}

impl SupervisorState {
    /// Start a child and append it; its id must be new.
    async fn add_child(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        spec: ChildSpec,
    ) -> Result<ActorCell, SupervisorError> {
        if self.children.iter().any(|child| child.spec.id == spec.id) {
            return Err(SupervisorError::DuplicateId(spec.id));
        }
        let cell = spec.start(&myself.get_cell()).await?;
        self.children.push(Child {
            spec,
            status: ChildStatus::Running(cell.clone()),
            restarts: 0,
        });
        Ok(cell)
    }

    /// Stop a child gracefully and forget it. Returns whether it existed.
    async fn terminate_child(&mut self, id: &str) -> bool {
        let Some(index) = self.children.iter().position(|child| child.spec.id == id) else {
            return false;
        };
        let child = self.children.remove(index);
        if let ChildStatus::Running(cell) = child.status {
            stop_child(&child.spec, &cell, Instant::now() + child.spec.shutdown).await;
        }
        tracing::info!(supervisor = %self.name, child = %id, "child terminated on request");
        true
    }

    fn child_infos(&self) -> Vec<ChildInfo> {
        let now = Instant::now();
        self.children
            .iter()
            .map(|child| ChildInfo {
                id: child.spec.id.clone(),
                cell: match &child.status {
                    ChildStatus::Running(cell) => Some(cell.clone()),
                    _ => None,
                },
                restarts: child.restarts,
                recent_restarts: self.window.count_within(
                    &child.spec.id,
                    now,
                    self.intensity.within,
                ),
            })
            .collect()
    }

    /// A linked actor exited: restart it, remove it, or ignore the event.
    async fn child_exited(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        actor: ActorId,
        exit: Exit,
    ) -> Result<(), SupervisorError> {
        let found = self.children.iter().position(
            |child| matches!(&child.status, ChildStatus::Running(cell) if cell.get_id() == actor),
        );
        let Some(index) = found else {
            // Stopped on purpose, already replaced, or never ours.
            tracing::debug!(supervisor = %self.name, %actor, "ignoring exit of an actor that is not a running child");
            return Ok(());
        };
        let child = &self.children[index];
        let restart = match (child.spec.restart, &exit) {
            (Restart::Permanent, _) => true,
            (Restart::Transient, Exit::Failed(_)) => true,
            (Restart::Transient, Exit::Stopped(_)) | (Restart::Temporary, _) => false,
        };
        if !restart {
            tracing::info!(
                supervisor = %self.name,
                child = %child.spec.id,
                restart = ?child.spec.restart,
                reason = %exit.describe(),
                "child exited; not restarting it"
            );
            self.children.remove(index);
            return Ok(());
        }
        self.schedule_restart(myself, index, &exit.describe()).await
    }

    /// Count a restart of child `index` against the intensity, then either give
    /// up or schedule the restart after its backoff delay.
    async fn schedule_restart(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        index: usize,
        reason: &str,
    ) -> Result<(), SupervisorError> {
        let now = Instant::now();
        let id = self.children[index].spec.id.clone();
        self.window.prune(now, self.intensity.within);
        let restarts = self.window.total().saturating_add(1);
        if restarts > self.intensity.max_restarts {
            tracing::error!(
                supervisor = %self.name,
                child = %id,
                reason,
                restarts,
                within = ?self.intensity.within,
                "restart intensity exceeded; stopping all children and failing"
            );
            self.stop_all().await;
            return Err(SupervisorError::IntensityExceeded {
                child: id,
                restarts,
                within: self.intensity.within,
            });
        }
        let attempt = self.window.count_for(&id);
        self.window.record(&id, now);

        if self.strategy == Strategy::RestForOne {
            self.stop_later_children(index).await;
        }

        let delay = self.backoff.delay(attempt);
        tracing::warn!(
            supervisor = %self.name,
            child = %id,
            reason,
            ?delay,
            "child exited; restarting it after a delay"
        );
        self.next_token += 1;
        let token = self.next_token;
        self.children[index].status = ChildStatus::Backoff { token };
        let due = RestartToken { child: id, token };
        // If the supervisor is gone by then, the send fails and that is fine.
        let _timer = myself.send_after(delay, move || SupervisorMsg::RestartDue(due));
        Ok(())
    }

    /// `RestForOne`: stop every child after `index`, last first. They wait for
    /// the restart of the child at `index`; temporary ones are removed.
    async fn stop_later_children(&mut self, index: usize) {
        for later in (index + 1..self.children.len()).rev() {
            let status = std::mem::replace(&mut self.children[later].status, ChildStatus::Waiting);
            let child = &self.children[later];
            if let ChildStatus::Running(cell) = status {
                tracing::info!(supervisor = %self.name, child = %child.spec.id, "stopping child (rest_for_one)");
                stop_child(&child.spec, &cell, Instant::now() + child.spec.shutdown).await;
            }
            if child.spec.restart == Restart::Temporary {
                self.children.remove(later);
            }
        }
    }

    /// A restart delay elapsed: start the child again (and under `RestForOne`
    /// the children waiting after it), unless the timer is stale.
    async fn restart_due(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        due: RestartToken,
    ) -> Result<(), SupervisorError> {
        let found = self.children.iter().position(|child| {
            child.spec.id == due.child
                && matches!(child.status, ChildStatus::Backoff { token } if token == due.token)
        });
        let Some(index) = found else {
            tracing::debug!(supervisor = %self.name, child = %due.child, "ignoring stale restart timer");
            return Ok(());
        };
        if let Err(err) = self.restart_child(myself, index).await {
            return self.schedule_restart(myself, index, &err.to_string()).await;
        }
        if self.strategy == Strategy::RestForOne {
            for later in index + 1..self.children.len() {
                if !matches!(self.children[later].status, ChildStatus::Waiting) {
                    continue;
                }
                if let Err(err) = self.restart_child(myself, later).await {
                    return self.schedule_restart(myself, later, &err.to_string()).await;
                }
            }
        }
        Ok(())
    }

    /// Start child `index` again in place.
    async fn restart_child(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        index: usize,
    ) -> Result<(), SupervisorError> {
        let child = &mut self.children[index];
        let cell = child.spec.start(&myself.get_cell()).await?;
        child.status = ChildStatus::Running(cell);
        child.restarts += 1;
        tracing::info!(
            supervisor = %self.name,
            child = %child.spec.id,
            restarts = child.restarts,
            "child restarted"
        );
        Ok(())
    }

    /// Stop all children, last started first, one at a time, and forget them.
    /// Stops every child by this supervisor's deadline (the one its parent told it, or
    /// its own wish): one at a time in reverse start order, or all at once.
    async fn stop_all(&mut self) {
        let own = deadline::declared(
            self.stop,
            self.children.iter().map(|child| child.spec.shutdown),
            std::time::Duration::ZERO,
        );
        let end = self.deadline.or_own(own);
        let running: Vec<(ChildSpec, ActorCell)> = std::mem::take(&mut self.children)
            .into_iter()
            .rev()
            .filter_map(|child| match child.status {
                ChildStatus::Running(cell) => Some((child.spec, cell)),
                _ => None,
            })
            .collect();
        match self.stop {
            StopOrder::Sequential => {
                let count = running.len();
                for (i, (spec, cell)) in running.iter().enumerate() {
                    let now = Instant::now();
                    let at = deadline::sequential(now, end, spec.shutdown, count - i - 1);
                    stop_child(spec, cell, at).await;
                }
            }
            StopOrder::Concurrent => {
                let now = Instant::now();
                futures::future::join_all(running.iter().map(|(spec, cell)| {
                    stop_child(spec, cell, deadline::concurrent(now, end, spec.shutdown))
                }))
                .await;
            }
        }
    }
}
