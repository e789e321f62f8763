//! Tests of the supervisor with real ractor actors: children that crash on
//! request (panic or `Err`), record their starts and stops into a shared log,
//! refuse to start, or hang in `post_stop`. Tests wait on conditions with
//! deadlines, never on fixed sleeps.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, ActorStatus};
use tokio::time::Instant;

use super::*;

/// How long any condition may take before a test fails.
const DEADLINE: Duration = Duration::from_secs(10);

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// What test children did, in order: "start:a", "stop:a", "crash:a".
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<(String, Instant)>>>);

impl Log {
    fn record(&self, what: &str, id: &str) {
        self.0
            .lock()
            .unwrap()
            .push((format!("{what}:{id}"), Instant::now()));
    }

    fn entries(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(e, _)| e.clone())
            .collect()
    }

    /// Entries recorded after the first `n`.
    fn entries_after(&self, n: usize) -> Vec<String> {
        self.entries().split_off(n)
    }

    /// When `entry` was recorded for the `nth` time (0-based).
    fn time_of(&self, entry: &str, nth: usize) -> Instant {
        let log = self.0.lock().unwrap();
        let found = log.iter().filter(|(e, _)| e == entry).nth(nth);
        found
            .unwrap_or_else(|| panic!("no {entry} #{nth} in log"))
            .1
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A child actor for tests.
struct TestChild;

#[derive(Clone)]
struct TestArgs {
    id: String,
    log: Log,
    /// `post_stop` never returns (after logging "stop").
    hang_on_stop: bool,
    /// `pre_start` fails with this text.
    fail_start: Option<String>,
}

enum TestMsg {
    Panic,
    Fail,
    StopNormally,
}

impl Actor for TestChild {
    type Msg = TestMsg;
    type State = TestArgs;
    type Arguments = TestArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<TestMsg>,
        args: TestArgs,
    ) -> Result<TestArgs, ActorProcessingErr> {
        if let Some(reason) = &args.fail_start {
            return Err(reason.clone().into());
        }
        args.log.record("start", &args.id);
        Ok(args)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<TestMsg>,
        state: &mut TestArgs,
    ) -> Result<(), ActorProcessingErr> {
        state.log.record("stop", &state.id);
        if state.hang_on_stop {
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<TestMsg>,
        message: TestMsg,
        state: &mut TestArgs,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            TestMsg::Panic => {
                state.log.record("crash", &state.id);
                panic!("test child {} panics on purpose", state.id);
            }
            TestMsg::Fail => {
                state.log.record("crash", &state.id);
                Err(format!("test child {} fails on purpose", state.id).into())
            }
            TestMsg::StopNormally => {
                myself.stop(None);
                Ok(())
            }
        }
    }
}

fn args(id: &str, log: &Log) -> TestArgs {
    TestArgs {
        id: id.to_string(),
        log: log.clone(),
        hang_on_stop: false,
        fail_start: None,
    }
}

fn spec_for(args: TestArgs) -> ChildSpec {
    let id = args.id.clone();
    ChildSpec::new(id, move |sup| {
        let args = args.clone();
        async move {
            Actor::spawn_linked(None, TestChild, args, sup)
                .await
                .map(|(child, _)| child.get_cell())
        }
    })
}

fn child(id: &str, log: &Log) -> ChildSpec {
    spec_for(args(id, log))
}

fn sup_spec(name: &str, strategy: Strategy, children: Vec<ChildSpec>) -> SupervisorSpec {
    SupervisorSpec {
        name: name.to_string(),
        strategy,
        intensity: Intensity {
            max_restarts: 10,
            within: Duration::from_secs(60),
        },
        backoff: Backoff::new(ms(1), ms(10)),
        stop: StopOrder::Sequential,
        children,
    }
}

async fn start(spec: SupervisorSpec) -> ActorRef<SupervisorMsg> {
    let (sup, _) = Supervisor::spawn(spec).await.expect("supervisor starts");
    sup
}

fn info<'a>(infos: &'a [ChildInfo], id: &str) -> &'a ChildInfo {
    infos
        .iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("no child {id} in {infos:?}"))
}

fn cell_of(infos: &[ChildInfo], id: &str) -> ActorCell {
    info(infos, id).cell.clone().expect("child is running")
}

fn ids(infos: &[ChildInfo]) -> Vec<String> {
    infos.iter().map(|c| c.id.clone()).collect()
}

/// Poll `children(sup)` until `check` holds; returns that answer.
async fn wait_children(
    sup: &ActorRef<SupervisorMsg>,
    what: &str,
    check: impl Fn(&[ChildInfo]) -> bool,
) -> Vec<ChildInfo> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let infos = children(sup).await.expect("supervisor answers");
        if check(&infos) {
            return infos;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; children: {infos:?}"
        );
        tokio::time::sleep(ms(5)).await;
    }
}

fn is_back(infos: &[ChildInfo], id: &str, restarts: u32) -> bool {
    infos
        .iter()
        .any(|c| c.id == id && c.restarts == restarts && c.cell.is_some())
}

async fn wait_stopped(cell: &ActorCell) {
    cell.wait(Some(DEADLINE)).await.expect("actor stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_for_one_restarts_only_the_crashed_child() {
    let log = Log::default();
    let sup = start(sup_spec(
        "one_for_one",
        Strategy::OneForOne,
        vec![child("a", &log), child("b", &log), child("c", &log)],
    ))
    .await;
    let before = children(&sup).await.unwrap();
    assert_eq!(log.entries(), strings(&["start:a", "start:b", "start:c"]));

    cell_of(&before, "b").send_message(TestMsg::Panic).unwrap();
    let after = wait_children(&sup, "b restarted", |c| is_back(c, "b", 1)).await;
    assert_ne!(
        cell_of(&after, "b").get_id(),
        cell_of(&before, "b").get_id()
    );
    for id in ["a", "c"] {
        assert_eq!(cell_of(&after, id).get_id(), cell_of(&before, id).get_id());
        assert_eq!(info(&after, id).restarts, 0);
    }

    // An `Err` from a handler is a failure too.
    cell_of(&after, "b").send_message(TestMsg::Fail).unwrap();
    let after = wait_children(&sup, "b restarted again", |c| is_back(c, "b", 2)).await;
    assert_eq!(ids(&after), strings(&["a", "b", "c"]));
    assert_eq!(info(&after, "a").restarts + info(&after, "c").restarts, 0);
    assert_eq!(
        log.entries(),
        strings(&[
            "start:a", "start:b", "start:c", "crash:b", "start:b", "crash:b", "start:b"
        ])
    );
    sup.stop_and_wait(None, Some(DEADLINE)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_for_one_restarts_the_crashed_child_and_later_ones_in_order() {
    let log = Log::default();
    let sup = start(sup_spec(
        "rest_for_one",
        Strategy::RestForOne,
        vec![child("a", &log), child("b", &log), child("c", &log)],
    ))
    .await;
    let before = children(&sup).await.unwrap();

    cell_of(&before, "b").send_message(TestMsg::Fail).unwrap();
    wait_children(&sup, "b and c restarted", |c| {
        is_back(c, "b", 1) && is_back(c, "c", 1)
    })
    .await;
    assert_eq!(
        log.entries_after(3),
        strings(&["crash:b", "stop:c", "start:b", "start:c"])
    );
    // Asked again: the exit event of the c we stopped on purpose was ignored.
    let after = children(&sup).await.unwrap();
    assert!(
        is_back(&after, "b", 1) && is_back(&after, "c", 1),
        "{after:?}"
    );
    assert_eq!(
        cell_of(&after, "a").get_id(),
        cell_of(&before, "a").get_id()
    );
    assert_eq!(info(&after, "a").restarts, 0);

    // The first child takes everyone with it, and they come back in order.
    cell_of(&after, "a").send_message(TestMsg::Panic).unwrap();
    wait_children(&sup, "all restarted", |c| {
        is_back(c, "a", 1) && is_back(c, "b", 2) && is_back(c, "c", 2)
    })
    .await;
    assert_eq!(
        log.entries_after(7),
        strings(&[
            "crash:a", "stop:c", "stop:b", "start:a", "start:b", "start:c"
        ])
    );

    // The last child has nobody after it.
    let now = children(&sup).await.unwrap();
    cell_of(&now, "c").send_message(TestMsg::Panic).unwrap();
    wait_children(&sup, "c restarted", |c| is_back(c, "c", 3)).await;
    assert_eq!(log.entries_after(13), strings(&["crash:c", "start:c"]));
    sup.stop_and_wait(None, Some(DEADLINE)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_for_one_removes_later_temporary_children() {
    let log = Log::default();
    let sup = start(sup_spec(
        "rest_for_one_temporary",
        Strategy::RestForOne,
        vec![
            child("a", &log),
            child("tmp", &log).restart(Restart::Temporary),
            child("c", &log),
        ],
    ))
    .await;
    let before = children(&sup).await.unwrap();
    cell_of(&before, "a").send_message(TestMsg::Panic).unwrap();
    let after = wait_children(&sup, "a and c restarted", |c| {
        is_back(c, "a", 1) && is_back(c, "c", 1)
    })
    .await;
    assert_eq!(ids(&after), strings(&["a", "c"]));
    assert_eq!(
        log.entries_after(3),
        strings(&["crash:a", "stop:c", "stop:tmp", "start:a", "start:c"])
    );
    sup.stop_and_wait(None, Some(DEADLINE)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intensity_exceeded_stops_children_and_ends_the_supervisor() {
    let log = Log::default();
    let mut spec = sup_spec(
        "fragile",
        Strategy::OneForOne,
        vec![child("steady", &log), child("crashy", &log)],
    );
    spec.intensity = Intensity {
        max_restarts: 2,
        within: Duration::from_secs(60),
    };
    let (sup, handle) = Supervisor::spawn(spec).await.unwrap();

    for restarts in 1..=2 {
        let now = children(&sup).await.unwrap();
        cell_of(&now, "crashy")
            .send_message(TestMsg::Panic)
            .unwrap();
        wait_children(&sup, "crashy restarted", |c| is_back(c, "crashy", restarts)).await;
    }
    let now = children(&sup).await.unwrap();
    let steady = cell_of(&now, "steady");
    cell_of(&now, "crashy")
        .send_message(TestMsg::Panic)
        .unwrap();

    tokio::time::timeout(DEADLINE, handle)
        .await
        .expect("supervisor ends")
        .unwrap();
    assert_eq!(sup.get_status(), ActorStatus::Stopped);
    assert_eq!(steady.get_status(), ActorStatus::Stopped);
    assert_eq!(log.entries().last().unwrap(), "stop:steady");
    assert_eq!(
        log.entries()
            .iter()
            .filter(|e| *e == "start:crashy")
            .count(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intensity_exceeded_fails_upward_to_the_parent() {
    let log = Log::default();
    let mut inner = sup_spec(
        "inner",
        Strategy::OneForOne,
        vec![child("steady", &log), child("crashy", &log)],
    );
    // No restart allowed: the first crash makes `inner` give up.
    inner.intensity.max_restarts = 0;
    // Transient: the parent restarts it only if it *failed*.
    let inner_child = ChildSpec::supervisor(inner).restart(Restart::Transient);
    let outer = start(sup_spec("outer", Strategy::OneForOne, vec![inner_child])).await;

    let first = children(&outer).await.unwrap();
    let inner_ref: ActorRef<SupervisorMsg> = cell_of(&first, "inner").into();
    let inner_children = children(&inner_ref).await.unwrap();
    cell_of(&inner_children, "crashy")
        .send_message(TestMsg::Panic)
        .unwrap();

    let after = wait_children(&outer, "inner restarted by outer", |c| {
        is_back(c, "inner", 1)
    })
    .await;
    assert_ne!(cell_of(&after, "inner").get_id(), inner_ref.get_id());
    assert_eq!(inner_ref.get_status(), ActorStatus::Stopped);
    assert_eq!(
        log.entries(),
        strings(&[
            "start:steady",
            "start:crashy",
            "crash:crashy",
            "stop:steady",
            "start:steady",
            "start:crashy"
        ])
    );
    outer.stop_and_wait(None, Some(DEADLINE)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_delay_is_applied_before_a_restart() {
    let log = Log::default();
    let mut spec = sup_spec("slow", Strategy::OneForOne, vec![child("b", &log)]);
    spec.backoff = Backoff::new(ms(300), Duration::from_secs(1));
    let sup = start(spec).await;

    let before = children(&sup).await.unwrap();
    cell_of(&before, "b").send_message(TestMsg::Panic).unwrap();
    // While it waits, the child has no cell.
    wait_children(&sup, "b waiting", |c| info(c, "b").cell.is_none()).await;
    wait_children(&sup, "b restarted", |c| is_back(c, "b", 1)).await;

    let crashed = log.time_of("crash:b", 0);
    let restarted = log.time_of("start:b", 1);
    let waited = restarted.duration_since(crashed);
    // The first restart waits between min / 2 and min (jittered).
    assert!(waited >= ms(150), "restarted after {waited:?}");
    sup.stop_and_wait(None, Some(DEADLINE)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_child_is_restarted_only_after_a_failure() {
    let log = Log::default();
    let sup = start(sup_spec(
        "transient",
        Strategy::OneForOne,
        vec![child("t", &log).restart(Restart::Transient)],
    ))
    .await;

    let before = children(&sup).await.unwrap();
    cell_of(&before, "t").send_message(TestMsg::Panic).unwrap();
    let after = wait_children(&sup, "t restarted", |c| is_back(c, "t", 1)).await;

    cell_of(&after, "t")
        .send_message(TestMsg::StopNormally)
        .unwrap();
    wait_children(&sup, "t removed", |c| c.is_empty()).await;
    assert_eq!(
        log.entries(),
        strings(&["start:t", "crash:t", "start:t", "stop:t"])
    );
    // Removed, so nothing is pending that could bring it back.
    assert!(children(&sup).await.unwrap().is_empty());
    sup.stop_and_wait(None, Some(DEADLINE)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_child_is_removed_when_it_exits() {
    let log = Log::default();
    let sup = start(sup_spec(
        "temporary",
        Strategy::OneForOne,
        vec![
            child("crashes", &log).restart(Restart::Temporary),
            child("finishes", &log).restart(Restart::Temporary),
            child("keep", &log),
        ],
    ))
    .await;

    let before = children(&sup).await.unwrap();
    cell_of(&before, "crashes")
        .send_message(TestMsg::Panic)
        .unwrap();
    cell_of(&before, "finishes")
        .send_message(TestMsg::StopNormally)
        .unwrap();
    let after = wait_children(&sup, "temporaries removed", |c| c.len() == 1).await;
    assert_eq!(ids(&after), strings(&["keep"]));
    assert_eq!(info(&after, "keep").restarts, 0);
    let entries = log.entries();
    assert_eq!(
        entries.iter().filter(|e| e.starts_with("start:")).count(),
        3
    );
    sup.stop_and_wait(None, Some(DEADLINE)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_children_start_and_terminate() {
    let log = Log::default();
    let sup = start(sup_spec(
        "dynamic",
        Strategy::OneForOne,
        vec![child("a", &log)],
    ))
    .await;

    let dynamic = start_child(&sup, child("dyn", &log)).await.unwrap();
    assert_eq!(ids(&children(&sup).await.unwrap()), strings(&["a", "dyn"]));

    let duplicate = start_child(&sup, child("dyn", &log)).await.unwrap_err();
    assert!(matches!(duplicate, SupervisorError::DuplicateId(ref id) if id == "dyn"));

    let mut refusing = args("refuses", &log);
    refusing.fail_start = Some("not today".to_string());
    let refused = start_child(&sup, spec_for(refusing)).await.unwrap_err();
    assert_eq!(
        refused.to_string(),
        "child `refuses` failed to start: not today"
    );

    let panicking = ChildSpec::new(
        "panics",
        |_sup| -> std::future::Ready<Result<ActorCell, ractor::SpawnErr>> {
            panic!("start function bug")
        },
    );
    let panicked = start_child(&sup, panicking).await.unwrap_err();
    assert!(
        panicked.to_string().contains("start function bug"),
        "{panicked}"
    );
    assert_eq!(ids(&children(&sup).await.unwrap()), strings(&["a", "dyn"]));

    // A dynamic child is supervised like the others.
    dynamic.send_message(TestMsg::Panic).unwrap();
    let after = wait_children(&sup, "dyn restarted", |c| is_back(c, "dyn", 1)).await;
    let dynamic = cell_of(&after, "dyn");

    assert!(terminate_child(&sup, "dyn").await.unwrap());
    assert_eq!(dynamic.get_status(), ActorStatus::Stopped);
    assert_eq!(log.entries().last().unwrap(), "stop:dyn");
    assert_eq!(ids(&children(&sup).await.unwrap()), strings(&["a"]));
    assert!(!terminate_child(&sup, "dyn").await.unwrap());
    assert!(!terminate_child(&sup, "missing").await.unwrap());
    sup.stop_and_wait(None, Some(DEADLINE)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_failure_stops_started_children_and_names_the_child() {
    let log = Log::default();
    let mut failing = args("b", &log);
    failing.fail_start = Some("no local broker ready after 30s".to_string());
    let err = Supervisor::spawn(sup_spec(
        "failing",
        Strategy::OneForOne,
        vec![
            child("a", &log),
            spec_for(failing.clone()),
            child("c", &log),
        ],
    ))
    .await
    .unwrap_err();
    assert_eq!(
        spawn_error_reason(&err),
        "child `b` failed to start: no local broker ready after 30s"
    );
    assert_eq!(log.entries(), strings(&["start:a", "stop:a"]));

    // Nested: the reasons read as a chain, and both levels clean up.
    let log = Log::default();
    failing.log = log.clone();
    let inner = sup_spec(
        "inner",
        Strategy::OneForOne,
        vec![child("y", &log), spec_for(failing)],
    );
    let err = Supervisor::spawn(sup_spec(
        "outer",
        Strategy::RestForOne,
        vec![child("x", &log), ChildSpec::supervisor(inner)],
    ))
    .await
    .unwrap_err();
    assert_eq!(
        spawn_error_reason(&err),
        "child `inner` failed to start: child `b` failed to start: no local broker ready after 30s"
    );
    assert_eq!(
        log.entries(),
        strings(&["start:x", "start:y", "stop:y", "stop:x"])
    );

    // Duplicate ids in a static spec are a start failure too.
    let log = Log::default();
    let err = Supervisor::spawn(sup_spec(
        "duplicates",
        Strategy::OneForOne,
        vec![child("a", &log), child("a", &log)],
    ))
    .await
    .unwrap_err();
    assert!(spawn_error_reason(&err).contains("`a`"), "{err}");
    assert_eq!(log.entries(), strings(&["start:a", "stop:a"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orderly_shutdown_stops_children_in_reverse_order() {
    let log = Log::default();
    let sup = start(sup_spec(
        "orderly",
        Strategy::OneForOne,
        vec![child("a", &log), child("b", &log), child("c", &log)],
    ))
    .await;
    let cells = children(&sup).await.unwrap();
    sup.stop_and_wait(None, Some(DEADLINE)).await.unwrap();
    assert_eq!(
        log.entries_after(3),
        strings(&["stop:c", "stop:b", "stop:a"])
    );
    for child in &cells {
        assert_eq!(
            child.cell.as_ref().unwrap().get_status(),
            ActorStatus::Stopped
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orderly_shutdown_goes_depth_first_through_nested_supervisors() {
    let log = Log::default();
    let inner = sup_spec(
        "inner",
        Strategy::OneForOne,
        vec![child("x", &log), child("y", &log)],
    );
    let sup = start(sup_spec(
        "outer",
        Strategy::RestForOne,
        vec![
            child("a", &log),
            ChildSpec::supervisor(inner),
            child("c", &log),
        ],
    ))
    .await;
    assert_eq!(
        log.entries(),
        strings(&["start:a", "start:x", "start:y", "start:c"])
    );
    sup.stop_and_wait(None, Some(DEADLINE)).await.unwrap();
    assert_eq!(
        log.entries_after(4),
        strings(&["stop:c", "stop:y", "stop:x", "stop:a"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_child_is_killed_after_its_shutdown_timeout() {
    let log = Log::default();
    let mut hanging = args("hang", &log);
    hanging.hang_on_stop = true;
    let sup = start(sup_spec(
        "hangs",
        Strategy::OneForOne,
        vec![
            child("a", &log),
            spec_for(hanging.clone()).shutdown(ms(200)),
        ],
    ))
    .await;
    let cells = children(&sup).await.unwrap();

    let began = Instant::now();
    sup.stop_and_wait(None, Some(DEADLINE)).await.unwrap();
    let took = began.elapsed();
    assert!(took >= ms(200), "stopped after {took:?}");
    assert!(took < Duration::from_secs(3), "stopped after {took:?}");
    assert_eq!(cell_of(&cells, "hang").get_status(), ActorStatus::Stopped);
    assert_eq!(log.entries_after(2), strings(&["stop:hang", "stop:a"]));

    // The same bound applies to TerminateChild.
    let log = Log::default();
    hanging.log = log.clone();
    let sup = start(sup_spec("hangs_again", Strategy::OneForOne, vec![])).await;
    let cell = start_child(&sup, spec_for(hanging).shutdown(ms(200)))
        .await
        .unwrap();
    let began = Instant::now();
    assert!(terminate_child(&sup, "hang").await.unwrap());
    assert!(began.elapsed() >= ms(200));
    wait_stopped(&cell).await;
    sup.stop_and_wait(None, Some(DEADLINE)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_restarts_back_off_retry_and_count_toward_intensity() {
    // Start attempts after the first fail while `failures` is above zero.
    fn flaky(id: &str, log: &Log, failures: Arc<AtomicU32>, starts: Arc<AtomicU32>) -> ChildSpec {
        let args = args(id, log);
        ChildSpec::new(id, move |sup| {
            let args = args.clone();
            let failures = failures.clone();
            let attempt = starts.fetch_add(1, Ordering::SeqCst);
            async move {
                if attempt > 0
                    && failures
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                {
                    return Err(ractor::SpawnErr::StartupFailed("broker said no".into()));
                }
                Actor::spawn_linked(None, TestChild, args, sup)
                    .await
                    .map(|(child, _)| child.get_cell())
            }
        })
    }

    // Two failed attempts, then success: within an intensity of 3 restarts.
    let log = Log::default();
    let starts = Arc::new(AtomicU32::new(0));
    let mut spec = sup_spec(
        "flaky",
        Strategy::OneForOne,
        vec![flaky(
            "f",
            &log,
            Arc::new(AtomicU32::new(2)),
            starts.clone(),
        )],
    );
    spec.intensity.max_restarts = 3;
    let sup = start(spec).await;
    let before = children(&sup).await.unwrap();
    cell_of(&before, "f").send_message(TestMsg::Panic).unwrap();
    wait_children(&sup, "f restarted", |c| is_back(c, "f", 1)).await;
    assert_eq!(starts.load(Ordering::SeqCst), 4);
    sup.stop_and_wait(None, Some(DEADLINE)).await.unwrap();

    // Failing for good: the supervisor gives up after its intensity.
    let log = Log::default();
    let starts = Arc::new(AtomicU32::new(0));
    let mut spec = sup_spec(
        "broken",
        Strategy::OneForOne,
        vec![
            child("other", &log),
            flaky(
                "f",
                &log,
                Arc::new(AtomicU32::new(u32::MAX)),
                starts.clone(),
            ),
        ],
    );
    spec.intensity.max_restarts = 3;
    let (sup, handle) = Supervisor::spawn(spec).await.unwrap();
    let before = children(&sup).await.unwrap();
    cell_of(&before, "f").send_message(TestMsg::Panic).unwrap();
    tokio::time::timeout(DEADLINE, handle)
        .await
        .expect("supervisor gives up")
        .unwrap();
    // The initial start, then three failed restarts; the fourth is refused.
    assert_eq!(starts.load(Ordering::SeqCst), 4);
    assert_eq!(log.entries().last().unwrap(), "stop:other");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exits_of_unknown_actors_are_ignored() {
    let log = Log::default();
    let sup = start(sup_spec(
        "strangers",
        Strategy::OneForOne,
        vec![child("a", &log)],
    ))
    .await;
    // An actor linked to the supervisor behind its back is not a child.
    let (stranger, _) =
        Actor::spawn_linked(None, TestChild, args("stranger", &log), sup.get_cell())
            .await
            .unwrap();
    stranger.send_message(TestMsg::Panic).unwrap();
    wait_stopped(&stranger.get_cell()).await;
    let infos = children(&sup).await.unwrap();
    assert_eq!(ids(&infos), strings(&["a"]));
    assert_eq!(info(&infos, "a").restarts, 0);
    assert_eq!(sup.get_status(), ActorStatus::Running);
    sup.stop_and_wait(None, Some(DEADLINE)).await.unwrap();
}

/// A child that ends before its start is checked (the node's temporary bootstrap, when
/// the broker is ready at once) was linked: ractor unlinks an actor once it has told its
/// supervisor it ended. So it is not taken for a child spawned unlinked (which logged a
/// warning on every start of `warren run`), while one really spawned unlinked still is.
#[tokio::test]
async fn a_child_that_ended_during_its_start_is_not_taken_for_an_unlinked_one() {
    use super::child::{LinkState, link_state};
    let log = Log::default();
    let sup = start(sup_spec("links", Strategy::OneForOne, vec![])).await;
    let sup_cell = sup.get_cell();
    let (linked, _) = Actor::spawn_linked(None, TestChild, args("linked", &log), sup_cell.clone())
        .await
        .unwrap();
    assert_eq!(link_state(&linked.get_cell(), &sup_cell), LinkState::Linked);
    linked.send_message(TestMsg::StopNormally).unwrap();
    wait_stopped(&linked.get_cell()).await;
    assert_eq!(link_state(&linked.get_cell(), &sup_cell), LinkState::Ended);
    let (unlinked, _) = Actor::spawn(None, TestChild, args("unlinked", &log))
        .await
        .unwrap();
    assert_eq!(
        link_state(&unlinked.get_cell(), &sup_cell),
        LinkState::Unlinked
    );
    unlinked.stop_and_wait(None, Some(DEADLINE)).await.unwrap();
    assert_eq!(sup.get_status(), ActorStatus::Running);
    sup.stop_and_wait(None, Some(DEADLINE)).await.unwrap();
}

/// A supervisor told a deadline stops every child by it, however much they ask for: a
/// hung child that asks for seconds is killed in time for the ones after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_told_deadline_bounds_the_whole_stop_and_leaves_the_later_children_their_floor() {
    let log = Log::default();
    let mut hung = args("hung", &log);
    hung.hang_on_stop = true;
    let deadline = StopDeadline::default();
    let mut spec = sup_spec(
        "told",
        Strategy::OneForOne,
        vec![
            child("first", &log),
            spec_for(hung).shutdown(Duration::from_secs(30)),
        ],
    );
    spec.stop = StopOrder::Sequential;
    let (sup, _) = Supervisor::spawn_told(spec, deadline.clone())
        .await
        .expect("supervisor starts");
    let cells = children(&sup).await.unwrap();
    let began = Instant::now();
    deadline.set(tokio::time::Instant::now() + ms(1500));
    sup.stop_and_wait(None, Some(DEADLINE)).await.unwrap();
    let took = began.elapsed();
    assert!(
        took < ms(1900),
        "the stop kept to its 1.5 s deadline: {took:?}"
    );
    // The hung child (stopped first) got the budget less one floor for "first".
    let hung_stopped = log.time_of("stop:hung", 0);
    let first_stopped = log.time_of("stop:first", 0);
    let waited = first_stopped.duration_since(hung_stopped);
    assert!(
        waited >= ms(900) && waited <= ms(1300),
        "the hung child was killed after {waited:?}, leaving a floor for the next"
    );
    assert_eq!(cell_of(&cells, "hung").get_status(), ActorStatus::Stopped);
}

/// Concurrent children stop together: two hung children cost one deadline, not two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_children_stop_together() {
    let log = Log::default();
    let hung = |id: &str| {
        let mut a = args(id, &log);
        a.hang_on_stop = true;
        spec_for(a).shutdown(ms(400))
    };
    let mut spec = sup_spec("together", Strategy::OneForOne, vec![hung("x"), hung("y")]);
    spec.stop = StopOrder::Concurrent;
    let sup = start(spec).await;
    let began = Instant::now();
    sup.stop_and_wait(None, Some(DEADLINE)).await.unwrap();
    let took = began.elapsed();
    assert!(took >= ms(400), "each was given its 400 ms: {took:?}");
    assert!(took < ms(750), "both in one 400 ms, not two: {took:?}");
    let mut stops = log.entries();
    stops.sort();
    assert_eq!(stops, strings(&["start:x", "start:y", "stop:x", "stop:y"]));
}
