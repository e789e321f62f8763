//! Private RabbitMQ nodes for failover tests.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Read, Seek, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, Once, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

use crate::SupportError;
use crate::ctl::CTL_TIMEOUT;
use crate::ports::try_free_port;
use crate::process::{bin_dir, describe, run_captured, scrub_env, wait_with_deadline};

/// How long [`BrokerNode::start`] / [`BrokerNode::restart`] wait for the node to be ready.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long we wait for a SIGKILLed node to be reaped and its port to close.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful stop may take before we SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Fresh ports are tried this many times when the node reports a port already in use
/// (another process grabbed a port between [`try_free_port`] and the node binding it).
const START_ATTEMPTS: u32 = 3;
/// Lines of each log file quoted in start errors.
const LOG_TAIL_LINES: usize = 30;
/// Temp dir prefix; the owning test process's pid follows, so stale nodes can be found.
const DIR_PREFIX: &str = "warren-test-node-";
/// What RabbitMQ logs once its boot is over (boot state `ready`: every boot step ran,
/// durable queues are recovered, `rabbitmqctl` commands that need the app accept).
/// The AMQP listener starts a few boot steps earlier, 150–250 ms before this line on an
/// idle machine and seconds before it on a loaded one.
const BOOT_COMPLETE: &str = "Server startup complete";

static NEXT_NODE: AtomicU32 = AtomicU32::new(1);
static SWEEP: Once = Once::new();

/// A RabbitMQ node of its own for one test: its own node name, AMQP and distribution ports,
/// Erlang cookie, data and log dirs under a temp dir. Exists because failover tests must
/// SIGKILL and restart a broker, which they cannot do to the shared node at :5672.
///
/// The node runs in its own process group with the BEAM as our direct child, so `kill`
/// is a real crash (no graceful shutdown) and nothing is left behind. Dropping it kills the
/// node and removes the temp dir. If a test process dies without dropping (Ctrl-C), the
/// next [`BrokerNode::start`] or [`BrokerNode::prepare`] in any process kills the orphaned
/// nodes and removes their dirs.
///
/// All methods block; from async tests call them directly only on a multi-thread runtime
/// (or via `spawn_blocking`).
pub struct BrokerNode {
    name: String,
    amqp_port: u16,
    dist_port: u16,
    /// The AMQPS port, for a node started with [`BrokerNode::start_tls`].
    tls_port: Option<u16>,
    /// Root of everything the node writes; removed on drop.
    dir: TempDir,
    /// Lines appended to `rabbitmq.conf` (see [`BrokerNode::start_with`]).
    extra_config: Vec<String>,
    /// The node's `advanced.config`, if any (see [`BrokerNode::start_with_advanced`]).
    advanced_config: Option<String>,
    /// Plugins written to the node's `enabled_plugins` (see
    /// [`BrokerNode::start_with_plugins`]); none by default.
    plugins: Vec<String>,
    /// The Erlang cookie in the node's `$HOME`, which its `rabbitmqctl` calls read too: one
    /// of its own, or the one shared by the members of a [`crate::BrokerCluster`].
    cookie: String,
    /// Length of the node's log file when the node was last spawned: readiness is read
    /// from what the node logged after that.
    log_offset: u64,
    proc: Mutex<ProcState>,
}

enum ProcState {
    NotRunning,
    Running(Child),
    /// Reaped; kept for error messages.
    Exited(ExitStatus),
}

impl BrokerNode {
    /// Starts a fresh node and waits (up to 60 s) until it is ready: it accepts AMQP and
    /// has finished booting (see [`BrokerNode::wait_ready`]).
    pub fn start() -> Result<BrokerNode, SupportError> {
        BrokerNode::start_with(&[])
    }

    /// Like [`BrokerNode::start`], with `config_lines` appended to the node's
    /// `rabbitmq.conf` (new-style `key = value` lines, e.g. `"channel_max = 8"`). They stay
    /// in effect across restarts.
    pub fn start_with(config_lines: &[&str]) -> Result<BrokerNode, SupportError> {
        BrokerNode::start_inner(config_lines, None, None, &[])
    }

    /// Like [`BrokerNode::start_with`], with `advanced` as the node's `advanced.config`
    /// (Erlang terms, e.g. `[{rabbit, [{channel_tick_interval, 1000}]}].`): for settings
    /// `rabbitmq.conf` cannot express.
    pub fn start_with_advanced(
        config_lines: &[&str],
        advanced: &str,
    ) -> Result<BrokerNode, SupportError> {
        BrokerNode::start_inner(config_lines, None, Some(advanced), &[])
    }

    /// Like [`BrokerNode::start_with`], with `plugins` (e.g. `"rabbitmq_amqp1_0"`) enabled.
    /// Exists for tests of protocols a plugin serves (AMQP 1.0): nodes otherwise start with
    /// no plugins, and enabling one on a running node would need `rabbitmq-plugins` and a
    /// wait for it. The AMQP 1.0 plugin listens on [`BrokerNode::amqp_port`] alongside
    /// AMQP 0-9-1. Avoid plugins with fixed ports of their own (management, prometheus):
    /// every node would want the same port.
    pub fn start_with_plugins(
        plugins: &[&str],
        config_lines: &[&str],
    ) -> Result<BrokerNode, SupportError> {
        BrokerNode::start_inner(config_lines, None, None, plugins)
    }

    /// Like [`BrokerNode::start`], with `cookie` as the node's Erlang cookie instead of one
    /// of its own. Exists for [`crate::BrokerCluster`]: nodes (and the `rabbitmqctl` calls
    /// that join them) only talk to each other if they share a cookie.
    pub(crate) fn start_with_cookie(cookie: &str) -> Result<BrokerNode, SupportError> {
        BrokerNode::start_inner(&[], Some(cookie), None, &[])
    }

    fn start_inner(
        config_lines: &[&str],
        cookie: Option<&str>,
        advanced: Option<&str>,
        plugins: &[&str],
    ) -> Result<BrokerNode, SupportError> {
        SWEEP.call_once(sweep_orphans);
        let mut attempt = 1;
        loop {
            let amqp_port = try_free_port()?;
            let dist_port = try_free_port()?;
            let mut node = BrokerNode::create_with(
                amqp_port,
                dist_port,
                config_lines,
                cookie,
                advanced,
                plugins,
            )?;
            node.spawn()?;
            match node.wait_ready(START_TIMEOUT) {
                Ok(()) => return Ok(node),
                Err(SupportError::Start { log_tail, .. })
                    if attempt < START_ATTEMPTS && port_clash(&log_tail) =>
                {
                    attempt += 1; // dropping `node` cleans up; retry on fresh ports
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Like [`BrokerNode::start`], with an `amqps://` listener too (on
    /// [`BrokerNode::tls_port`]) showing `certs`' `<server>.pem` (`"server"`, or `"expired"`),
    /// trusting `certs`' CA, and requiring a client certificate when `require_client_cert`.
    pub fn start_tls(
        certs: &crate::TestCerts,
        server: &str,
        require_client_cert: bool,
    ) -> Result<BrokerNode, SupportError> {
        BrokerNode::start_tls_with_plugins(certs, server, require_client_cert, &[])
    }

    /// Like [`BrokerNode::start_tls`], with `plugins` enabled (see
    /// [`BrokerNode::start_with_plugins`]): AMQP 1.0 over TLS is served on the same
    /// `amqps://` listener.
    pub fn start_tls_with_plugins(
        certs: &crate::TestCerts,
        server: &str,
        require_client_cert: bool,
        plugins: &[&str],
    ) -> Result<BrokerNode, SupportError> {
        let port = try_free_port()?;
        let path = |name: &str| certs.path(name).display().to_string();
        let lines = [
            format!("listeners.ssl.default = 127.0.0.1:{port}"),
            format!("ssl_options.cacertfile = {}", path("ca.pem")),
            format!("ssl_options.certfile = {}", path(&format!("{server}.pem"))),
            format!("ssl_options.keyfile = {}", path(&format!("{server}.key"))),
            "ssl_options.verify = verify_peer".to_string(),
            format!("ssl_options.fail_if_no_peer_cert = {require_client_cert}"),
        ];
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        let mut node = BrokerNode::start_inner(&lines, None, None, plugins)?;
        node.tls_port = Some(port);
        Ok(node)
    }

    /// A node with its name, free ports and dirs set up but not started. For tests that
    /// start the broker only after the code under test (saves a start and a kill): call
    /// [`BrokerNode::start_again_in_background`] or [`BrokerNode::restart`] to start it.
    pub fn prepare() -> Result<BrokerNode, SupportError> {
        SWEEP.call_once(sweep_orphans);
        BrokerNode::create(try_free_port()?, try_free_port()?)
    }

    /// Prepares dirs and config for a node on the given ports without starting it.
    pub(crate) fn create(amqp_port: u16, dist_port: u16) -> Result<BrokerNode, SupportError> {
        BrokerNode::create_with(amqp_port, dist_port, &[], None, None, &[])
    }

    /// `cookie`: the Erlang cookie to use; `None` makes one for this node alone.
    /// `plugins`: what `enabled_plugins` lists (none if empty).
    fn create_with(
        amqp_port: u16,
        dist_port: u16,
        config_lines: &[&str],
        cookie: Option<&str>,
        advanced: Option<&str>,
        plugins: &[&str],
    ) -> Result<BrokerNode, SupportError> {
        let n = NEXT_NODE.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("warren-test-{pid}-{n}@localhost");
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{pid}-{n}-"))
            .tempdir()
            .map_err(|e| SupportError::io("creating node temp dir", e))?;
        let node = BrokerNode {
            cookie: cookie.map_or_else(|| make_cookie(&name), str::to_string),
            name,
            amqp_port,
            dist_port,
            tls_port: None,
            dir,
            extra_config: config_lines.iter().map(|l| l.to_string()).collect(),
            advanced_config: advanced.map(str::to_string),
            plugins: plugins.iter().map(|p| p.to_string()).collect(),
            log_offset: 0,
            proc: Mutex::new(ProcState::NotRunning),
        };
        node.write_files()?;
        Ok(node)
    }

    fn write_files(&self) -> Result<(), SupportError> {
        let io = |what: &str, e| SupportError::io(format!("writing {what} for {}", self.name), e);
        for d in [self.home(), self.path("mnesia"), self.log_dir()] {
            fs::create_dir_all(&d).map_err(|e| io("node dirs", e))?;
        }
        // The node's cookie (Erlang insists on owner-only permissions), written before the
        // node starts so a concurrent rabbitmqctl can't race the node to create it.
        let mut cookie = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(self.home().join(".erlang.cookie"))
            .map_err(|e| io("Erlang cookie", e))?;
        cookie
            .write_all(self.cookie.as_bytes())
            .map_err(|e| io("Erlang cookie", e))?;
        let mut config = format!(
            "listeners.tcp.1 = 127.0.0.1:{}\n\
             loopback_users.guest = true\n\
             disk_free_limit.absolute = 1MB\n\
             log.file.level = info\n",
            self.amqp_port
        );
        for line in &self.extra_config {
            config.push_str(line);
            config.push('\n');
        }
        fs::write(self.path("rabbitmq.conf"), config).map_err(|e| io("rabbitmq.conf", e))?;
        if let Some(advanced) = &self.advanced_config {
            fs::write(self.path("advanced.config"), advanced)
                .map_err(|e| io("advanced.config", e))?;
        }
        // No plugins unless asked for: management/prometheus would take fixed ports shared
        // by all nodes.
        let plugins = format!("[{}].\n", self.plugins.join(","));
        fs::write(self.path("enabled_plugins"), plugins).map_err(|e| io("enabled_plugins", e))?;
        // Replaces /etc/rabbitmq/rabbitmq-env.conf, which names the system node.
        fs::write(self.path("rabbitmq-env.conf"), "").map_err(|e| io("rabbitmq-env.conf", e))?;
        Ok(())
    }

    /// Spawns `rabbitmq-server` in its own process group; does not wait.
    pub(crate) fn spawn(&mut self) -> Result<(), SupportError> {
        if let ProcState::Running(_) = *self.proc_state() {
            return Err(SupportError::InvalidState(format!(
                "node {} is already running",
                self.name
            )));
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stdout_log())
            .map_err(|e| SupportError::io("opening node stdout log", e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| SupportError::io("cloning node stdout log", e))?;
        let mut cmd = Command::new(bin_dir().join("rabbitmq-server"));
        scrub_env(&mut cmd);
        cmd.env("HOME", self.home())
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_CONF_ENV_FILE", self.path("rabbitmq-env.conf"))
            .env("RABBITMQ_CONFIG_FILE", self.path("rabbitmq.conf"))
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                self.path("advanced.config"),
            )
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.path("enabled_plugins"),
            )
            .env("RABBITMQ_MNESIA_BASE", self.path("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.log_dir())
            .env("RABBITMQ_PID_FILE", self.path("rabbitmq.pid"))
            // Without this the script backgrounds the BEAM and `wait`s for it, so our child
            // would be a shell and the BEAM an orphan after SIGKILL (PID 1 here reaps slowly).
            // With it the script execs erl and our child *is* beam.smp. It would also enable
            // the Erlang shell on stdin, hence -noinput; stdin is /dev/null anyway.
            .env("RABBITMQ_ALLOW_INPUT", "true")
            .env("RABBITMQ_SERVER_START_ARGS", "-noinput -noshell")
            // Distribution on loopback only, like the system node.
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        // Readiness is judged by what the node logs from now on.
        self.log_offset = fs::metadata(self.node_log()).map_or(0, |m| m.len());
        let child = cmd
            .spawn()
            .map_err(|e| SupportError::io(format!("spawning `{}`", describe(&cmd)), e))?;
        *self.proc_state() = ProcState::Running(child);
        Ok(())
    }

    /// The AMQPS port of a node started with [`BrokerNode::start_tls`].
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// `amqps://guest:guest@127.0.0.1:<tls port>/%2f` (port 0 for a node without TLS).
    pub fn tls_uri(&self) -> String {
        format!(
            "amqps://guest:guest@127.0.0.1:{}/%2f",
            self.tls_port.unwrap_or(0)
        )
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// The AMQP port; stays the same across restarts.
    pub fn amqp_port(&self) -> u16 {
        self.amqp_port
    }

    /// The Erlang distribution port; stays the same across restarts.
    pub fn dist_port(&self) -> u16 {
        self.dist_port
    }

    /// Erlang node name, `warren-test-<pid>-<n>@localhost`.
    pub fn node_name(&self) -> &str {
        &self.name
    }

    /// The temp dir holding data, logs and config (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// OS pid of the node's BEAM process while it runs (it is our child and the leader of
    /// the node's process group).
    pub fn os_pid(&self) -> Option<u32> {
        self.poll();
        match &*self.proc_state() {
            ProcState::Running(child) => Some(child.id()),
            _ => None,
        }
    }

    /// Whether the node's process is alive (says nothing about readiness).
    pub fn is_running(&self) -> bool {
        self.os_pid().is_some()
    }

    /// SIGKILLs the node's process group (a crash, no shutdown) and returns once the process
    /// is reaped and the AMQP port refuses connections. A no-op on a node that isn't running.
    pub fn kill(&mut self) -> Result<(), SupportError> {
        if self.kill_process()? {
            self.wait_port_closed(KILL_TIMEOUT)?;
        }
        Ok(())
    }

    /// SIGKILLs and reaps the node; returns whether it was running.
    fn kill_process(&self) -> Result<bool, SupportError> {
        let mut state = self.proc_state();
        let ProcState::Running(child) = &mut *state else {
            return Ok(false);
        };
        // Only while our child is unreaped is its pid guaranteed to still name our group.
        if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: plain syscall; the group exists (its leader is our unreaped child).
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
        // Belt and braces in case the group kill was refused.
        let _ = child.kill();
        match wait_with_deadline(child, KILL_TIMEOUT)? {
            Some(status) => {
                *state = ProcState::Exited(status);
                Ok(true)
            }
            None => Err(SupportError::Timeout {
                what: format!("SIGKILLed node {} to exit", self.name),
                after: KILL_TIMEOUT,
            }),
        }
    }

    /// SIGSTOPs the node: its sockets stay open but nothing answers, as with a broker
    /// that hangs or a network path that drops everything. [`BrokerNode::thaw`] resumes it.
    /// Returns once every thread of the node's BEAM is stopped: `kill` only queues the
    /// signal, and a thread running on another core may still serve a request meanwhile.
    pub fn freeze(&self) -> Result<(), SupportError> {
        self.signal_group(libc::SIGSTOP)?;
        let pid = self.os_pid().ok_or_else(|| {
            SupportError::InvalidState(format!("node {} is not running", self.name))
        })?;
        let deadline = Instant::now() + KILL_TIMEOUT;
        while Instant::now() < deadline {
            if all_threads_stopped(pid) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Err(SupportError::Timeout {
            what: format!("node {} to stop on SIGSTOP", self.name),
            after: KILL_TIMEOUT,
        })
    }

    /// SIGCONTs a node stopped by [`BrokerNode::freeze`].
    pub fn thaw(&self) -> Result<(), SupportError> {
        self.signal_group(libc::SIGCONT)
    }

    fn signal_group(&self, signal: libc::c_int) -> Result<(), SupportError> {
        let state = self.proc_state();
        let ProcState::Running(child) = &*state else {
            return Err(SupportError::InvalidState(format!(
                "node {} is not running",
                self.name
            )));
        };
        if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: plain syscall; the group exists (its leader is our unreaped child).
            unsafe {
                libc::kill(-pgid, signal);
            }
        }
        Ok(())
    }

    /// Graceful stop with `rabbitmqctl stop`; waits for the process to exit and the port to
    /// close. Falls back to SIGKILL (and reports the error) if that fails or takes > 60 s.
    pub fn stop(&mut self) -> Result<(), SupportError> {
        if !self.is_running() {
            return Ok(());
        }
        if let Err(e) = self.ctl(&["stop"]) {
            self.kill()?;
            return Err(e);
        }
        let exited = {
            let mut state = self.proc_state();
            match &mut *state {
                ProcState::Running(child) => match wait_with_deadline(child, STOP_TIMEOUT)? {
                    Some(status) => {
                        *state = ProcState::Exited(status);
                        true
                    }
                    None => false,
                },
                _ => true,
            }
        };
        if !exited {
            self.kill()?;
            return Err(SupportError::Timeout {
                what: format!("node {} to stop (killed it)", self.name),
                after: STOP_TIMEOUT,
            });
        }
        self.wait_port_closed(KILL_TIMEOUT)
    }

    /// Starts the node again on the same ports, name and data dir and waits until it is
    /// ready (see [`BrokerNode::wait_ready`]). A node that is still running is SIGKILLed
    /// first.
    pub fn restart(&mut self) -> Result<(), SupportError> {
        self.start_again_in_background()?;
        self.wait_ready(START_TIMEOUT)
    }

    /// Like [`BrokerNode::restart`] but returns as soon as the process is spawned; use
    /// [`BrokerNode::wait_ready`] (or the code under test's own retries) to wait for it.
    pub fn start_again_in_background(&mut self) -> Result<(), SupportError> {
        self.kill()?;
        self.spawn()
    }

    /// Waits until the node is ready: it accepts AMQP (TCP connect, send the AMQP 0-9-1
    /// header, receive the first byte of a method frame) **and** has finished booting (it
    /// logged `Server startup complete` since it was spawned), so durable queues are
    /// recovered and `rabbitmqctl` commands see a running node. Accepting AMQP alone is
    /// not enough: the listener starts a few boot steps before the end, and commands sent
    /// in between met a node still booting (issue #19). Fails early if the node process
    /// exits.
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), SupportError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll();
            let exited = match &*self.proc_state() {
                ProcState::Running(_) => None,
                ProcState::Exited(status) => Some(format!("node process exited ({status})")),
                ProcState::NotRunning => Some("node was never started".to_string()),
            };
            if let Some(reason) = exited {
                return Err(self.start_error(reason));
            }
            let booted = self.logged_since_spawn(BOOT_COMPLETE);
            if booted && accepts_amqp(self.amqp_port, Duration::from_millis(500)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let what = if booted {
                    "not accepting AMQP"
                } else {
                    "boot not complete (no `Server startup complete` in its log)"
                };
                return Err(self.start_error(format!(
                    "{what} on 127.0.0.1:{} after {timeout:?}",
                    self.amqp_port
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `rabbitmqctl -n <node> -q <args>`; returns stdout.
    pub fn ctl(&self, args: &[&str]) -> Result<String, SupportError> {
        self.tool("rabbitmqctl", args)
    }

    /// Another of RabbitMQ's CLI tools against this node, e.g. `rabbitmq-upgrade drain`
    /// (maintenance mode: client connections closed, listeners suspended, queues kept) and
    /// `rabbitmq-upgrade revive`; returns stdout.
    pub fn tool(&self, tool: &str, args: &[&str]) -> Result<String, SupportError> {
        let mut cmd = Command::new(bin_dir().join(tool));
        scrub_env(&mut cmd);
        cmd.env("HOME", self.home())
            .env("RABBITMQ_CONF_ENV_FILE", self.path("rabbitmq-env.conf"))
            // The CLI finds plugin commands (e.g. `list_amqp10_connections`) through the
            // enabled plugins file; without this it reads the system node's.
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.path("enabled_plugins"),
            )
            .current_dir(self.dir.path())
            .args(["-n", &self.name, "-q"])
            .args(args);
        run_captured(cmd, CTL_TIMEOUT)
    }

    /// Forces the node's metadata store (Mnesia's transaction log) to disk. Mnesia writes a
    /// declaration to its log asynchronously, so a durable queue declared a moment before a
    /// SIGKILL can be gone after the restart (CI saw it on a loaded machine); a test that
    /// kills a node and expects a durable object back calls this first.
    pub fn sync_metadata(&self) -> Result<(), SupportError> {
        let out = self.ctl(&["eval", "mnesia:sync_log()."])?;
        if out.trim() == "ok" {
            Ok(())
        } else {
            Err(SupportError::Parse {
                what: format!("the answer to mnesia:sync_log() on {}", self.name),
                input: out,
            })
        }
    }

    /// Whether the node's log has a line containing `text` written since the last spawn.
    fn logged_since_spawn(&self, text: &str) -> bool {
        let Ok(mut file) = fs::File::open(self.node_log()) else {
            return false;
        };
        let mut bytes = Vec::new();
        if file
            .seek(std::io::SeekFrom::Start(self.log_offset))
            .and_then(|_| file.read_to_end(&mut bytes))
            .is_err()
        {
            return false;
        }
        String::from_utf8_lossy(&bytes).contains(text)
    }

    /// The last lines of the node's stdout/stderr and of its log file.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for path in [self.stdout_log(), self.node_log()] {
            out.push_str(&format!("==> {} <==\n", path.display()));
            match fs::read(&path) {
                Ok(bytes) => {
                    let text = String::from_utf8_lossy(&bytes);
                    let lines: Vec<&str> = text.lines().collect();
                    for line in &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..] {
                        out.push_str(line);
                        out.push('\n');
                    }
                }
                Err(e) => out.push_str(&format!("({e})\n")),
            }
        }
        out
    }

    fn start_error(&self, reason: String) -> SupportError {
        SupportError::Start {
            node: self.name.clone(),
            reason,
            log_tail: self.log_tail(),
        }
    }

    /// Reaps the child if it has exited.
    fn poll(&self) {
        let mut state = self.proc_state();
        if let ProcState::Running(child) = &mut *state
            && let Ok(Some(status)) = child.try_wait()
        {
            *state = ProcState::Exited(status);
        }
    }

    fn wait_port_closed(&self, timeout: Duration) -> Result<(), SupportError> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.amqp_port));
        let deadline = Instant::now() + timeout;
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Ok(()),
                _ if Instant::now() >= deadline => {
                    return Err(SupportError::Timeout {
                        what: format!("port {} to refuse connections", self.amqp_port),
                        after: timeout,
                    });
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    fn proc_state(&self) -> MutexGuard<'_, ProcState> {
        self.proc.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn home(&self) -> PathBuf {
        self.path("home")
    }

    fn log_dir(&self) -> PathBuf {
        self.path("log")
    }

    /// The node's own log file (RabbitMQ names it after the node).
    pub fn node_log(&self) -> PathBuf {
        self.log_dir().join(format!("{}.log", self.name))
    }

    fn stdout_log(&self) -> PathBuf {
        self.log_dir().join("stdout.log")
    }
}

impl Drop for BrokerNode {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too; thawing first just lets it exit at once.
        let _ = self.thaw();
        // Errors can't be reported from drop; the temp dir is removed by TempDir's drop.
        let _ = self.kill_process();
    }
}

impl std::fmt::Debug for BrokerNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerNode")
            .field("name", &self.name)
            .field("amqp_port", &self.amqp_port)
            .field("dist_port", &self.dist_port)
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// Whether every thread of process `pid` is stopped (state `T`, or `t` under a tracer).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for task in tasks.flatten() {
        let Ok(stat) = fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // `pid (comm) S …`: the state follows the last `)`, since comm may hold spaces.
        let state = stat
            .rfind(')')
            .and_then(|end| stat[end + 1..].trim_start().chars().next());
        match state {
            Some('T' | 't') => any = true,
            _ => return false,
        }
    }
    any
}

/// Whether a failed start was caused by one of its ports being taken: the AMQP listener
/// reports `eaddrinuse`, the distribution listener `dist_port_already_used`.
fn port_clash(log_tail: &str) -> bool {
    log_tail.contains("eaddrinuse") || log_tail.contains("dist_port_already_used")
}

/// True if something on `port` speaks AMQP 0-9-1: after our protocol header a broker
/// sends connection.start, a method frame (type byte 1).
pub(crate) fn accepts_amqp(port: u16, timeout: Duration) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let mut first = [0u8; 1];
    stream.set_read_timeout(Some(timeout)).is_ok()
        && stream.set_write_timeout(Some(timeout)).is_ok()
        && stream.write_all(b"AMQP\x00\x00\x09\x01").is_ok()
        && stream.read_exact(&mut first).is_ok()
        && first[0] == 1
}

/// A cookie unique enough for a throwaway node or cluster (no need for crypto: loopback
/// only).
pub(crate) fn make_cookie(name: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write(name.as_bytes());
    hasher.write_u128(nanos);
    format!("WARRENTEST{:016X}", hasher.finish())
}

/// Kills nodes left behind by test processes that died without dropping their
/// `BrokerNode` (e.g. Ctrl-C on `cargo test`) and removes their temp dirs. A node is
/// recognised by the `-home <tmp>/warren-test-node-<pid>-<n>-XXXXXX/home` argument of its BEAM;
/// it is an orphan if process `<pid>` no longer exists.
pub(crate) fn sweep_orphans() {
    let owner_dead = |dir_name: &str| -> bool {
        let Some(rest) = dir_name.strip_prefix(DIR_PREFIX) else {
            return false;
        };
        let mut parts = rest.splitn(3, '-');
        let (Some(pid), Some(n), Some(_random)) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        match (pid.parse::<u32>(), n.parse::<u32>()) {
            (Ok(pid), Ok(_)) => {
                pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
            }
            _ => false,
        }
    };
    let Ok(procs) = fs::read_dir("/proc") else {
        return;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let Some(home) = args
            .windows(2)
            .find(|w| w[0] == b"-home")
            .map(|w| PathBuf::from(String::from_utf8_lossy(w[1]).into_owned()))
        else {
            continue;
        };
        let Some(node_dir) = home.parent() else {
            continue;
        };
        let is_orphan = node_dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(owner_dead);
        if is_orphan {
            // SAFETY: plain syscall on a pid we just identified as an orphaned test node.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    let Ok(tmp) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in tmp.flatten() {
        if entry.file_name().to_str().is_some_and(owner_dead) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
