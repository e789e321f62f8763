//! Clusters of private RabbitMQ nodes, for failover tests of replicated (quorum) queues.
//!
//! Owns: starting N [`BrokerNode`]s that share one Erlang cookie, joining them into one
//! cluster, waiting (with deadlines) until every member sees every other one running,
//! killing and restarting members, and asking the cluster where a quorum queue's leader is.
//! Must not touch: the shared node at 127.0.0.1:5672 (it is never joined, stopped or asked
//! anything here) or any node this process did not start.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::node::make_cookie;
use crate::{BrokerNode, SupportError};

/// How long joining one member may take, all its attempts included.
const JOIN_TIMEOUT: Duration = Duration::from_secs(90);
/// `join_cluster` is tried this many times: right after a node's boot (or while another
/// member's join is still settling) Mnesia can refuse it transiently.
const JOIN_ATTEMPTS: u32 = 5;
/// Pause between two join attempts (a back-off, not a wait for a condition).
const JOIN_RETRY_PAUSE: Duration = Duration::from_millis(500);
/// How long the members may take to agree on who is running, after a start, a join, a
/// kill or a restart.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two rounds of asking the members who they see running.
const MEMBERSHIP_POLL: Duration = Duration::from_millis(100);

/// Evaluated on a member: the nodes its Mnesia sees running whose `rabbit` app has booted
/// too (`rabbit:is_running/1` is boot state `ready`), so a member that is back in Mnesia
/// but still booting is not counted yet.
const RUNNING_NODES_EXPR: &str =
    "lists:sort([N || N <- rabbit_nodes:all_running(), rabbit:is_running(N)]).";

/// A RabbitMQ cluster of private nodes on loopback, one [`BrokerNode`] per member (each
/// with its own node name, ports, data and log dirs), all sharing one Erlang cookie.
/// Exists because failover tests of quorum queues need a leader they can SIGKILL while a
/// majority of the queue's replicas stays up, which neither the shared node nor a single
/// [`BrokerNode`] can give them.
///
/// Members are numbered from 0; member 0 is the one the others joined. Every member
/// accepts `guest`/`guest` from 127.0.0.1 (see [`BrokerCluster::uris`]). Dropping the
/// cluster SIGKILLs every member and removes their dirs (each member's own drop).
///
/// All methods block (they run `rabbitmqctl`); from async tests call them on a
/// multi-thread runtime or via `spawn_blocking`.
#[derive(Debug)]
pub struct BrokerCluster {
    members: Vec<BrokerNode>,
}

impl BrokerCluster {
    /// Starts `n` fresh nodes (in parallel), joins members 1..n to member 0 one at a time
    /// (`stop_app`, `join_cluster`, `start_app`; a refused join is retried a few times
    /// within a deadline) and waits until every member sees all `n` running. Takes about
    /// 20–30 s for 3 nodes on a 2-core machine. Members started before a failure are
    /// killed again.
    pub fn start(n: usize) -> Result<BrokerCluster, SupportError> {
        if n == 0 {
            return Err(SupportError::InvalidState(
                "a cluster needs at least one node".into(),
            ));
        }
        let cookie = make_cookie("warren-test-cluster");
        let started: Vec<Result<BrokerNode, SupportError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|_| s.spawn(|| BrokerNode::start_with_cookie(&cookie)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(SupportError::InvalidState(
                            "the thread starting a cluster member panicked".into(),
                        ))
                    })
                })
                .collect()
        });
        // On an error, the members already started are dropped (killed) here.
        let members = started.into_iter().collect::<Result<Vec<_>, _>>()?;
        let cluster = BrokerCluster { members };
        for i in 1..n {
            cluster.join(i)?;
        }
        cluster.wait_until_members_agree(MEMBERSHIP_TIMEOUT, "the cluster to form")?;
        Ok(cluster)
    }

    /// Joins member `i` to member 0: `stop_app`, `join_cluster` (retried), `start_app`.
    /// The app is started again even when every join attempt failed, so the member is left
    /// running (standalone) and the error names the last refusal.
    fn join(&self, i: usize) -> Result<(), SupportError> {
        let seed = self.members[0].node_name();
        let node = &self.members[i];
        let deadline = Instant::now() + JOIN_TIMEOUT;
        node.ctl(&["stop_app"])?;
        let mut attempt = 1;
        let joined = loop {
            match node.ctl(&["join_cluster", seed]) {
                Ok(_) => break Ok(()),
                Err(e) if error_mentions(&e, "already_member") => break Ok(()),
                // A transient refusal: try again (the last attempt's error is returned).
                Err(_) if attempt < JOIN_ATTEMPTS && Instant::now() < deadline => {
                    attempt += 1;
                    std::thread::sleep(JOIN_RETRY_PAUSE);
                }
                Err(e) => break Err(e),
            }
        };
        let restarted = node.ctl(&["start_app"]);
        joined?;
        restarted.map(|_| ())
    }

    /// Member `i` (0-based; member 0 is the one the others joined). Exists so tests can
    /// reach a member's own helpers (`ctl`, `uri`, `node_name`, `log_tail`, ...).
    ///
    /// # Panics
    /// If `i >= self.len()` (a bug in the test, not a broker failure).
    pub fn member(&self, i: usize) -> &BrokerNode {
        match self.members.get(i) {
            Some(m) => m,
            None => panic!("cluster member {i} of {}", self.members.len()),
        }
    }

    /// Mutable access to member `i`, for the node-level operations (freeze, stop, ...) that
    /// the cluster does not wrap. After killing or restarting a member this way, use
    /// [`BrokerCluster::wait_until_members_agree`] before relying on the cluster's view.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn member_mut(&mut self, i: usize) -> &mut BrokerNode {
        let len = self.members.len();
        match self.members.get_mut(i) {
            Some(m) => m,
            None => panic!("cluster member {i} of {len}"),
        }
    }

    /// Number of members, running or not.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false for a started cluster; exists to go with [`BrokerCluster::len`].
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f` for every member, in member order; guest
    /// may log in because the connections come from loopback (`loopback_users.guest`).
    /// Exists so a client under test can be given every node of the cluster to fail over to.
    pub fn uris(&self) -> Vec<String> {
        self.members.iter().map(BrokerNode::uri).collect()
    }

    /// Index of the member named `node_name` (e.g. what [`BrokerCluster::leader_of`]
    /// returned), so a test can kill or connect to it.
    pub fn member_index_of(&self, node_name: &str) -> Option<usize> {
        self.members.iter().position(|m| m.node_name() == node_name)
    }

    /// The nodes member `i` sees running (in its Mnesia cluster view, with the `rabbit`
    /// app booted), sorted. Exists so tests can assert on a member's own view of the
    /// cluster rather than on ours.
    pub fn running_nodes(&self, i: usize) -> Result<Vec<String>, SupportError> {
        let member = self.checked(i)?;
        let out = member.ctl(&["eval", RUNNING_NODES_EXPR])?;
        parse_node_list(&out).ok_or_else(|| SupportError::Parse {
            what: format!("the running nodes reported by {}", member.node_name()),
            input: out,
        })
    }

    /// Node name of the live leader of quorum queue `queue` (vhost `/`), as the cluster's
    /// metadata records it (`rabbitmqctl list_queues name leader`, asked of the first
    /// member whose process runs and answers). `Ok(None)` while the queue has no live
    /// leader (its leader's node is down and no new leader has been recorded yet). Exists
    /// so failover tests can kill the leader and watch the queue move.
    pub fn leader_of(&self, queue: &str) -> Result<Option<String>, SupportError> {
        let mut last_error = None;
        for member in self.members.iter().filter(|m| m.is_running()) {
            match member.ctl(&["list_queues", "--no-table-headers", "name", "leader"]) {
                Ok(out) => {
                    return parse_leader(&out, queue).ok_or_else(|| {
                        SupportError::InvalidState(format!(
                            "{} lists no queue named {queue:?}: {out:?}",
                            member.node_name()
                        ))
                    });
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            SupportError::InvalidState("no member of the cluster is running".into())
        }))
    }

    /// SIGKILLs member `i` (a crash: no shutdown, its peers just lose the connection) and
    /// waits until every other running member sees it gone. Exists for failover tests; use
    /// [`BrokerCluster::restart`] to bring it back.
    pub fn kill(&mut self, i: usize) -> Result<(), SupportError> {
        self.checked(i)?;
        self.members[i].kill()?;
        let what = format!(
            "the other members to see {} down",
            self.members[i].node_name()
        );
        self.wait_until_members_agree(MEMBERSHIP_TIMEOUT, &what)
    }

    /// Starts member `i` again (SIGKILLing it first if it still runs) on its name, ports
    /// and data dir, waits until it has booted, and then until every running member sees
    /// every running member again, i.e. it has rejoined. Its data dir still says it belongs
    /// to the cluster, so no new `join_cluster` is needed.
    pub fn restart(&mut self, i: usize) -> Result<(), SupportError> {
        self.checked(i)?;
        self.members[i].restart()?;
        let what = format!("{} to rejoin the cluster", self.members[i].node_name());
        self.wait_until_members_agree(MEMBERSHIP_TIMEOUT, &what)
    }

    /// Waits until every member whose process runs reports exactly the running members as
    /// running (see [`BrokerCluster::running_nodes`]); after a start that is all of them.
    /// Exists for tests that kill or restart members through [`BrokerCluster::member_mut`].
    /// On timeout the error says what each member last reported.
    pub fn wait_until_members_agree(
        &self,
        timeout: Duration,
        what: &str,
    ) -> Result<(), SupportError> {
        let deadline = Instant::now() + timeout;
        let running: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].is_running())
            .collect();
        let expected: BTreeSet<String> = running
            .iter()
            .map(|&i| self.members[i].node_name().to_string())
            .collect();
        // Members that agreed once are not asked again: a member's view only changes when
        // a node goes or comes, which is what the caller is waiting for.
        let mut pending = running;
        let mut last_seen: Vec<(usize, String)> = Vec::new();
        loop {
            let answers: Vec<(usize, Result<Vec<String>, SupportError>)> =
                std::thread::scope(|s| {
                    let handles: Vec<_> = pending
                        .iter()
                        .map(|&i| (i, s.spawn(move || self.running_nodes(i))))
                        .collect();
                    handles
                        .into_iter()
                        .map(|(i, h)| {
                            let answer = h.join().unwrap_or_else(|_| {
                                Err(SupportError::InvalidState(
                                    "the thread asking a member panicked".into(),
                                ))
                            });
                            (i, answer)
                        })
                        .collect()
                });
            last_seen.clear();
            pending.clear();
            for (i, answer) in answers {
                match answer {
                    Ok(seen) if seen.iter().cloned().collect::<BTreeSet<_>>() == expected => {}
                    Ok(seen) => {
                        pending.push(i);
                        last_seen.push((i, format!("{seen:?}")));
                    }
                    Err(e) => {
                        pending.push(i);
                        last_seen.push((i, format!("error: {e}")));
                    }
                }
            }
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let seen: Vec<String> = last_seen
                    .iter()
                    .map(|(i, s)| format!("{} sees {s}", self.members[*i].node_name()))
                    .collect();
                return Err(SupportError::Timeout {
                    what: format!(
                        "{what}: every running member to see {expected:?} running; {}",
                        seen.join("; ")
                    ),
                    after: timeout,
                });
            }
            std::thread::sleep(MEMBERSHIP_POLL);
        }
    }

    fn checked(&self, i: usize) -> Result<&BrokerNode, SupportError> {
        self.members.get(i).ok_or_else(|| {
            SupportError::InvalidState(format!(
                "no member {i} in a cluster of {}",
                self.members.len()
            ))
        })
    }
}

/// Whether a failed command's output mentions `text`.
fn error_mentions(e: &SupportError, text: &str) -> bool {
    match e {
        SupportError::Ctl { stdout, stderr, .. } => stdout.contains(text) || stderr.contains(text),
        _ => false,
    }
}

/// Parses an Erlang list of node names as `rabbitmqctl eval` prints it, e.g.
/// `['a-1@localhost','a-2@localhost']` (possibly wrapped over lines). `None` if it isn't one.
pub(crate) fn parse_node_list(out: &str) -> Option<Vec<String>> {
    let compact: String = out.chars().filter(|c| !c.is_whitespace()).collect();
    let inner = compact.strip_prefix('[')?.strip_suffix(']')?;
    if inner.is_empty() {
        return Some(Vec::new());
    }
    inner
        .split(',')
        .map(|atom| {
            let name = atom
                .strip_prefix('\'')
                .and_then(|a| a.strip_suffix('\''))
                .unwrap_or(atom);
            (name.contains('@') && !name.contains('\'')).then(|| name.to_string())
        })
        .collect()
}

/// Finds `queue` in `list_queues --no-table-headers name leader` output: `Some(None)` if it
/// has no live leader (empty column), `None` if it isn't listed.
pub(crate) fn parse_leader(out: &str, queue: &str) -> Option<Option<String>> {
    out.lines().find_map(|line| {
        let (name, leader) = line.split_once('\t')?;
        (name == queue).then(|| {
            let leader = leader.trim();
            (!leader.is_empty()).then(|| leader.to_string())
        })
    })
}
