//! These run against real RabbitMQ: the system node at :5672 and nodes started here.
//! Timings are printed (`cargo test -- --nocapture`) for the report.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

use crate::ctl::parse_connections;
use crate::node::accepts_amqp;
use crate::*;

/// A runtime that outlives the calls into it, so lapin connections opened in one
/// `block_on` stay alive (and notice closes) while the test runs blocking code.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn block_on<F: Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

async fn connect_named(uri: &str, name: &str) -> Connection {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(uri, props)
        .await
        .unwrap_or_else(|e| panic!("connect to {uri}: {e}"))
}

fn refuses(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    matches!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

fn unique(label: &str) -> String {
    format!("warren-support-{label}-{}", std::process::id())
}

#[test]
fn parses_list_connections_output() {
    let out = "<rabbit@localhost.1795372241.870.0>\t2\trunning\t[{\"capabilities\",[{\"basic.nack\",true}]},{\"connection_name\",\"a \\\"q\\\" \\t tab é\"},{\"product\",\"lapin\"}]\n\
               <rabbit@localhost.1795372241.900.0>\t0\tblocked\t[{\"product\",\"other\"}]\n\
               \n\
               Listing connections ...\n";
    let rows = parse_connections(out).expect("parse");
    assert_eq!(
        rows,
        vec![
            ConnectionRow {
                pid: "<rabbit@localhost.1795372241.870.0>".into(),
                name: "a \"q\" \t tab é".into(),
                channels: 2,
                state: "running".into(),
            },
            ConnectionRow {
                pid: "<rabbit@localhost.1795372241.900.0>".into(),
                name: String::new(),
                channels: 0,
                state: "blocked".into(),
            },
        ]
    );
    assert!(parse_connections("<x>\tnot-a-number\trunning\t[]").is_err());
    assert!(parse_connections("<x>\t1").is_err());
    assert_eq!(parse_connections("").expect("empty").len(), 0);
}

#[test]
fn free_ports_are_distinct_and_bindable() {
    let ports: Vec<u16> = (0..20).map(|_| free_port()).collect();
    let mut dedup = ports.clone();
    dedup.sort_unstable();
    dedup.dedup();
    assert_eq!(dedup.len(), ports.len());
    for p in ports {
        assert!(!(35672..=35682).contains(&p) && p != 5672 && p != 25672);
        TcpListener::bind((Ipv4Addr::LOCALHOST, p)).expect("free port is bindable");
    }
}

#[test]
fn eventually_flavours() {
    let start = Instant::now();
    assert!(!eventually_blocking(Duration::from_millis(100), || false));
    assert!(start.elapsed() >= Duration::from_millis(100));
    let mut n = 0;
    assert!(eventually_blocking(Duration::from_secs(5), || {
        n += 1;
        n == 3
    }));
    block_on(async {
        let start = Instant::now();
        assert!(!eventually(Duration::from_millis(100), || false).await);
        assert!(start.elapsed() >= Duration::from_millis(100));
        let mut n = 0;
        assert!(
            eventually(Duration::from_secs(5), || {
                n += 1;
                n == 3
            })
            .await
        );
    });
}

#[test]
fn local_broker_connections_can_be_listed_and_closed() {
    assert!(
        accepts_amqp(5672, Duration::from_secs(2)),
        "system broker at :5672"
    );
    let name = unique("local-conn");
    block_on(async {
        let conn = connect_named(&local_uri(), &name).await;
        let _ch1 = conn.create_channel().await.expect("channel 1");
        let _ch2 = conn.create_channel().await.expect("channel 2");

        let t = Instant::now();
        let rows = list_connections(local_ctl).expect("list_connections");
        eprintln!("local list_connections took {:?}", t.elapsed());
        let row = rows
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("{name} not in {rows:?}"));
        assert_eq!(row.channels, 2);
        assert_eq!(row.state, "running");
        assert!(row.pid.starts_with("<rabbit@localhost."), "{}", row.pid);
        assert_eq!(channel_count(local_ctl, &name).expect("channel_count"), 2);

        assert!(close_connections(local_ctl, "", "x").is_err());
        let closed = close_connections(local_ctl, &name, "closed by warren-test-support")
            .expect("close_connections");
        assert_eq!(closed, 1);
        assert!(
            eventually(Duration::from_secs(10), || !conn.status().connected()).await,
            "client noticed the close"
        );
        assert!(
            eventually(Duration::from_secs(10), || {
                list_connections(local_ctl).is_ok_and(|rows| rows.iter().all(|r| r.name != name))
            })
            .await
        );
        assert_eq!(channel_count(local_ctl, &name).expect("channel_count"), 0);
    });
}

#[test]
fn local_ctl_reaches_the_system_node() {
    let status = local_ctl(&["status"]).expect("status");
    assert!(status.contains("rabbit@localhost"), "{status}");
}

#[test]
fn node_lifecycle_kill_restart_stop() {
    let t = Instant::now();
    let mut node = BrokerNode::start().expect("start node");
    eprintln!("node start took {:?} ({node:?})", t.elapsed());
    let port = node.amqp_port();
    let name = node.node_name().to_string();
    assert!(name.starts_with(&format!("warren-test-{}-", std::process::id())));
    assert!(name.ends_with("@localhost"));
    assert_eq!(
        node.uri(),
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
    );
    assert!(node.is_running());
    assert!(accepts_amqp(port, Duration::from_secs(2)));

    let t = Instant::now();
    let status = node.ctl(&["status"]).expect("ctl status");
    eprintln!("node ctl status took {:?}", t.elapsed());
    assert!(status.contains(&name), "{status}");
    assert!(status.contains(&format!("OS PID: {}", node.os_pid().expect("pid"))));

    let conn_name = unique("node-conn");
    let queue = "warren-support-durable";
    let rt = runtime();
    let conn = rt.block_on(async {
        let conn = connect_named(&node.uri(), &conn_name).await;
        let ch = conn.create_channel().await.expect("channel");
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(queue.into(), durable, FieldTable::default())
            .await
            .expect("declare durable queue");
        conn
    });
    node.sync_metadata().expect("sync the declaration to disk");
    let rows = list_connections(|a| node.ctl(a)).expect("list_connections on node");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].name, conn_name);
    assert!(rows[0].pid.starts_with(&format!("<{name}.")), "{rows:?}");

    let t = Instant::now();
    node.kill().expect("kill");
    eprintln!("kill until port refused took {:?}", t.elapsed());
    assert!(refuses(port));
    assert!(!node.is_running());
    assert_eq!(node.os_pid(), None);
    assert!(node.ctl(&["status"]).is_err());
    assert!(
        eventually_blocking(Duration::from_secs(10), || !conn.status().connected()),
        "client noticed the crash"
    );
    node.kill().expect("kill is idempotent");

    let t = Instant::now();
    node.restart().expect("restart");
    eprintln!("restart after kill took {:?}", t.elapsed());
    assert_eq!(node.amqp_port(), port);
    assert_eq!(node.node_name(), name);
    assert!(node.is_running());
    let queues = node
        .ctl(&["list_queues", "--no-table-headers", "name", "durable"])
        .expect("list_queues");
    assert!(
        queues.contains(&format!("{queue}\ttrue")),
        "durable queue survived the crash: {queues:?}"
    );

    let t = Instant::now();
    node.stop().expect("stop");
    eprintln!("graceful stop took {:?}", t.elapsed());
    assert!(!node.is_running());
    assert!(refuses(port));
    node.stop().expect("stop is idempotent");

    let t = Instant::now();
    node.start_again_in_background()
        .expect("start in background");
    assert!(t.elapsed() < Duration::from_secs(1), "returns at once");
    assert!(node.is_running());
    node.wait_ready(Duration::from_secs(60)).expect("ready");
    eprintln!("background start until ready took {:?}", t.elapsed());

    // Restarting a running node SIGKILLs it first.
    let old_pid = node.os_pid();
    node.restart().expect("restart while running");
    assert_ne!(node.os_pid(), old_pid);
    assert!(accepts_amqp(port, Duration::from_secs(2)));
}

#[test]
fn parallel_nodes_are_isolated_and_drop_cleans_up() {
    let t = Instant::now();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(BrokerNode::start);
        let b = s.spawn(|| {
            // The "start after the code under test" path: prepare, then start later.
            let mut b = BrokerNode::prepare()?;
            assert!(!b.is_running());
            assert!(refuses(b.amqp_port()));
            b.start_again_in_background()?;
            b.wait_ready(Duration::from_secs(60))?;
            Ok::<_, SupportError>(b)
        });
        (
            a.join().expect("thread a").expect("start a"),
            b.join().expect("thread b").expect("start b"),
        )
    });
    eprintln!("two nodes started in parallel in {:?}", t.elapsed());
    assert_ne!(a.amqp_port(), b.amqp_port());
    assert_ne!(a.dist_port(), b.dist_port());
    assert_ne!(a.node_name(), b.node_name());
    assert_ne!(a.dir(), b.dir());
    assert!(accepts_amqp(a.amqp_port(), Duration::from_secs(2)));
    assert!(accepts_amqp(b.amqp_port(), Duration::from_secs(2)));
    assert!(
        a.ctl(&["status"])
            .expect("a status")
            .contains(a.node_name())
    );
    assert!(
        b.ctl(&["status"])
            .expect("b status")
            .contains(b.node_name())
    );

    let pid = a.os_pid().expect("a pid");
    let dir = a.dir().to_path_buf();
    let port = a.amqp_port();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let t = Instant::now();
    drop(a);
    eprintln!("drop took {:?}", t.elapsed());
    assert!(!dir.exists(), "temp dir removed");
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "process gone");
    assert!(refuses(port));
    assert!(
        accepts_amqp(b.amqp_port(), Duration::from_secs(2)),
        "b unaffected"
    );
}

#[test]
fn start_failure_includes_log_tail() {
    // Hold the AMQP port so the node cannot bind it.
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let mut node = BrokerNode::create(port, free_port()).expect("create");
    let t = Instant::now();
    node.spawn().expect("spawn");
    let err = node
        .wait_ready(Duration::from_secs(60))
        .expect_err("port is taken");
    eprintln!("failed start detected after {:?}", t.elapsed());
    let text = err.to_string();
    if std::env::var_os("WARREN_TEST_SHOW_ERRORS").is_some() {
        eprintln!("{text}");
    }
    assert!(
        matches!(err, SupportError::Start { .. }),
        "unexpected error: {text}"
    );
    assert!(text.contains("eaddrinuse"), "{text}");
    assert!(text.contains(node.node_name()), "{text}");
}

#[test]
fn sweep_kills_orphaned_nodes_and_removes_their_dirs() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};

    // A pid that no longer exists stands in for a test process that died (Ctrl-C).
    let mut gone = Command::new("true").spawn().expect("spawn true");
    let dead_pid = gone.id();
    gone.wait().expect("wait true");
    let tmp = std::env::temp_dir();
    let orphan_dir = tmp.join(format!("warren-test-node-{dead_pid}-7-AbCdEf"));
    let own_dir = tmp.join(format!(
        "warren-test-node-{}-999-AbCdEf",
        std::process::id()
    ));
    let unrelated = tmp.join(format!("warren-test-node-{dead_pid}"));
    for d in [&orphan_dir, &own_dir, &unrelated] {
        std::fs::create_dir_all(d.join("home")).expect("mkdir");
    }
    // Stands in for the orphaned BEAM: a process with `-home <dir>/home` in its argv.
    let home = orphan_dir.join("home");
    let mut fake_beam = Command::new("sh")
        .args(["-c", "read _x", "sh", "-home"])
        .arg(&home)
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn fake beam");
    // Until the child has exec'd, its cmdline is still ours: sweeping then would miss it.
    let cmdline = format!("/proc/{}/cmdline", fake_beam.id());
    assert!(
        eventually_blocking(Duration::from_secs(5), || {
            std::fs::read(&cmdline).is_ok_and(|c| c.windows(5).any(|w| w == b"-home"))
        }),
        "the fake beam did not start"
    );

    crate::node::sweep_orphans();

    let status = fake_beam.wait().expect("wait fake beam");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(!orphan_dir.exists(), "orphan's dir removed");
    assert!(own_dir.exists(), "our own dirs are left alone");
    assert!(
        unrelated.exists(),
        "dirs not named like ours are left alone"
    );
    for d in [&own_dir, &unrelated] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Issue #19: `start` and `restart` used to return as soon as the port accepted AMQP, which
/// happens a few boot steps (150–250 ms idle, seconds under load) before the node has
/// booted; a `rabbitmqctl` command sent at once (the lifecycle test's `list_queues`) then
/// met a node still booting. Now they return after the node logged the end of its boot.
#[test]
fn start_and_restart_return_once_the_node_has_booted() {
    let boots = |node: &BrokerNode| {
        let log = node
            .dir()
            .join("log")
            .join(format!("{}.log", node.node_name()));
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches("Server startup complete")
            .count()
    };
    let mut node = BrokerNode::start().expect("start node");
    assert_eq!(boots(&node), 1, "start returned before the boot was over");
    let rt = runtime();
    let uri = node.uri();
    let queue = "warren-support-booted";
    rt.block_on(async {
        let conn = connect_named(&uri, &unique("booted")).await;
        let ch = conn.create_channel().await.expect("channel");
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(queue.into(), durable, FieldTable::default())
            .await
            .expect("declare durable queue");
        let _ = conn.close(200, "done".into()).await;
    });
    node.sync_metadata().expect("sync the declaration to disk");
    node.kill().expect("kill");
    let t = Instant::now();
    node.restart().expect("restart");
    let took = t.elapsed();
    let after_restart = boots(&node);
    eprintln!("restart until booted took {took:?}");
    assert_eq!(
        after_restart, 2,
        "restart returned before the boot was over"
    );
    let queues = node
        .ctl(&["list_queues", "--no-table-headers", "name", "durable"])
        .expect("list_queues");
    assert!(
        queues.contains(&format!("{queue}\ttrue")),
        "durable queue listed right after restart: {queues:?}"
    );
}

#[test]
fn parses_cluster_cli_output() {
    use crate::cluster::{parse_leader, parse_node_list};

    assert_eq!(
        parse_node_list("['warren-test-1-1@localhost',\n 'warren-test-1-2@localhost']\n"),
        Some(vec![
            "warren-test-1-1@localhost".to_string(),
            "warren-test-1-2@localhost".to_string()
        ])
    );
    assert_eq!(
        parse_node_list("[rabbit@localhost]"),
        Some(vec!["rabbit@localhost".to_string()])
    );
    assert_eq!(parse_node_list("[]\n"), Some(Vec::new()));
    assert_eq!(parse_node_list("{badrpc,nodedown}"), None);
    assert_eq!(parse_node_list("[ok]"), None);

    let out = "other\twarren-test-1-2@localhost\nq\twarren-test-1-1@localhost\ndown\t\n";
    assert_eq!(
        parse_leader(out, "q"),
        Some(Some("warren-test-1-1@localhost".to_string()))
    );
    assert_eq!(parse_leader(out, "down"), Some(None));
    assert_eq!(parse_leader(out, "missing"), None);
}

/// Declares a durable quorum queue on `ch`.
async fn declare_quorum(ch: &lapin::Channel, queue: &str) {
    use lapin::types::{AMQPValue, LongString};
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(queue.into(), durable, args)
        .await
        .expect("declare quorum queue");
}

/// A 3-node cluster forms (every member sees all three running); a quorum queue declared
/// through member 0 gets its leader there (3.10's default `client-local` leader locator);
/// SIGKILLing the leader moves leadership to another member within a deadline, the
/// confirmed messages can all be consumed through a surviving member, and the killed
/// member rejoins when restarted. One test rather than two so the cluster starts once.
#[test]
fn cluster_forms_and_a_quorum_queue_survives_its_leaders_crash() {
    use lapin::BasicProperties;
    use lapin::Confirmation;
    use lapin::options::ConfirmSelectOptions;
    use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions};
    use std::collections::BTreeSet;

    let t = Instant::now();
    let mut cluster = BrokerCluster::start(3).expect("start cluster");
    eprintln!("3-node cluster up in {:?}", t.elapsed());
    assert_eq!(cluster.len(), 3);
    let names: Vec<String> = (0..3)
        .map(|i| cluster.member(i).node_name().to_string())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 3, "distinct node names: {names:?}");
    for (i, name) in names.iter().enumerate() {
        assert_eq!(cluster.member_index_of(name), Some(i));
        assert_eq!(
            cluster.running_nodes(i).expect("running nodes"),
            sorted,
            "member {i}'s view"
        );
        // The CLI's own view agrees.
        let status = cluster
            .member(i)
            .ctl(&["cluster_status"])
            .expect("cluster_status");
        let running = status
            .split("Running Nodes")
            .nth(1)
            .unwrap_or_else(|| panic!("no Running Nodes section: {status}"));
        for n in &names {
            assert!(running.contains(n.as_str()), "{n} not running per {status}");
        }
    }
    assert_eq!(cluster.member_index_of("rabbit@localhost"), None);
    let uris = cluster.uris();
    assert_eq!(uris.len(), 3);
    assert_eq!(uris.iter().collect::<BTreeSet<_>>().len(), 3);

    let queue = "warren-support-quorum";
    let rt = runtime();
    rt.block_on(async {
        let conn = connect_named(&uris[0], &unique("cluster-publish")).await;
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        declare_quorum(&ch, queue).await;
        for i in 0..10u8 {
            let confirm = ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &[i],
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish")
                .await
                .expect("confirm");
            assert!(matches!(confirm, Confirmation::Ack(None)), "{confirm:?}");
        }
        let _ = conn.close(200, "published".into()).await;
    });
    let leader = cluster
        .leader_of(queue)
        .expect("leader_of")
        .expect("the new queue has a leader");
    let leader_idx = cluster
        .member_index_of(&leader)
        .unwrap_or_else(|| panic!("leader {leader} is not a member: {names:?}"));
    eprintln!("quorum queue declared via member 0 has its leader on member {leader_idx}");
    assert_eq!(
        leader_idx, 0,
        "client-local: the leader is where the client declared it"
    );

    let t = Instant::now();
    cluster.kill(leader_idx).expect("kill the leader");
    eprintln!("kill until the others see it down took {:?}", t.elapsed());
    let t = Instant::now();
    let mut new_leader = None;
    assert!(
        eventually_blocking(Duration::from_secs(30), || {
            new_leader = cluster.leader_of(queue).ok().flatten();
            new_leader.as_ref().is_some_and(|l| *l != leader)
        }),
        "no new leader for {queue} after killing {leader}: {:?}",
        cluster.leader_of(queue)
    );
    let new_leader = new_leader.expect("new leader");
    let new_idx = cluster.member_index_of(&new_leader).expect("a member");
    eprintln!(
        "new leader on member {new_idx} after {:?} (was {leader_idx})",
        t.elapsed()
    );
    assert_ne!(new_idx, leader_idx);

    // Consume through the survivor that is not the leader: the queue is reached across
    // the cluster, and what it holds is what was confirmed.
    let via = (0..3)
        .find(|&i| i != leader_idx && i != new_idx)
        .expect("a third member");
    let bodies = rt.block_on(async {
        let conn = connect_named(&uris[via], &unique("cluster-consume")).await;
        let ch = conn.create_channel().await.expect("channel");
        let mut bodies = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while bodies.len() < 10 && Instant::now() < deadline {
            match ch
                .basic_get(queue.into(), BasicGetOptions::default())
                .await
                .expect("basic.get")
            {
                Some(msg) => {
                    msg.delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .expect("ack");
                    bodies.push(msg.delivery.data);
                }
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let _ = conn.close(200, "consumed".into()).await;
        bodies
    });
    assert_eq!(
        bodies,
        (0..10u8).map(|i| vec![i]).collect::<Vec<_>>(),
        "all ten confirmed messages, in order"
    );

    let t = Instant::now();
    cluster
        .restart(leader_idx)
        .expect("restart the killed member");
    eprintln!("restart until rejoined took {:?}", t.elapsed());
    for i in 0..3 {
        assert_eq!(cluster.running_nodes(i).expect("running nodes"), sorted);
    }
    // The restarted member's replica of the queue is back too: one leader, two followers.
    let mut status = String::new();
    assert!(
        eventually_blocking(Duration::from_secs(30), || {
            status = cluster
                .member(leader_idx)
                .tool(
                    "rabbitmq-queues",
                    &["quorum_status", queue, "--formatter", "json"],
                )
                .unwrap_or_else(|e| e.to_string());
            status.matches("\"leader\"").count() == 1
                && status.matches("\"follower\"").count() == 2
                && names.iter().all(|n| status.contains(n.as_str()))
        }),
        "quorum_status after the restart: {status}"
    );
    let pids: Vec<u32> = (0..3)
        .map(|i| cluster.member(i).os_pid().expect("running"))
        .collect();
    let dirs: Vec<_> = (0..3)
        .map(|i| cluster.member(i).dir().to_path_buf())
        .collect();
    drop(cluster);
    for (pid, dir) in pids.iter().zip(&dirs) {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "{pid} gone");
        assert!(!dir.exists(), "{} removed", dir.display());
    }
}
