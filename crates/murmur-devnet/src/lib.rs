//! A real local AT Protocol network on loopback: the official PLC directory and N official
//! PDS hosts (TypeScript, npm `@atproto/dev-env`), for tests and demos.
//!
//! On first use the pinned Node 22 and `@atproto/*` packages are installed into a cache
//! outside the repository (`$MURMUR_CACHE_DIR`, else `~/.cache/murmur`), keyed by the
//! committed lockfile's hash; later runs reuse it. Each service is its own `node` process
//! bound to `127.0.0.1`, so one PDS can be stopped and started again on the same data and
//! port. Dropping the [`Devnet`] stops every process it started; the processes also exit on
//! their own when this process dies, because they watch the stdin pipe we hold.
//!
//! The [`nats`] module runs NATS JetStream servers (one, or a cluster on loopback) the same
//! way: a pinned nats-server installed into the cache on first use, processes that can be
//! killed and restarted on the same port and store, and that die with this process.
//!
//! ```no_run
//! # async fn demo() -> Result<(), murmur_devnet::DevnetError> {
//! use murmur_devnet::{Devnet, DevnetConfig};
//!
//! let net = Devnet::start(DevnetConfig { pds: 2, ..Default::default() })?;
//! let alice = net.create_account(0, &net.unique_handle("alice"), "hunter22").await?;
//! println!("{} lives on {} (PLC {})", alice.did, alice.pds_url, net.plc_url());
//! # Ok(()) }
//! ```

mod account;
pub mod cpu;
pub mod nats;
mod provision;
mod service;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

pub use account::{Account, SignedUp, sign_up};
pub use nats::spawn_tied;
pub use provision::{NodeInstall, cache_root, provision};
pub use service::ServiceExit;
use service::{Service, ServiceSpec, free_port};

/// Everything that can go wrong while provisioning or running the local network.
#[derive(Debug, thiserror::Error)]
pub enum DevnetError {
    /// Installing Node 22 or the atproto packages failed.
    #[error(
        "provisioning the local atproto network failed at step `{step}`: {reason}\n  to fix: {hint}"
    )]
    Provision {
        /// The step that failed, e.g. `npm ci`.
        step: &'static str,
        /// What went wrong.
        reason: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// A PLC or PDS process did not come up.
    #[error("{service} did not start: {reason}\n--- last lines of its log ---\n{log_tail}")]
    Start {
        /// Which service, e.g. `pds 1`.
        service: String,
        /// What went wrong.
        reason: String,
        /// The end of the service's log.
        log_tail: String,
    },
    /// There is no PDS with this index.
    #[error("no PDS with index {index}: this network has {count} (indices start at 0)")]
    NoSuchPds {
        /// The index asked for.
        index: usize,
        /// How many PDS hosts the network has.
        count: usize,
    },
    /// An HTTP call to a local service failed.
    #[error("{what}: {reason}")]
    Http {
        /// The call, e.g. `createAccount on pds 0`.
        what: String,
        /// The transport error or the server's error response.
        reason: String,
    },
    /// The shared network of this process failed to start earlier.
    #[error("the shared local network failed to start: {0}")]
    Shared(String),
    /// A nats-server binary is missing or does not run.
    #[error(
        "nats-server `{path}` cannot be used: {reason}\n  to fix: set MURMUR_NATS_SERVER to a \
         nats-server binary >= 2.10, or unset it to use the pinned release (installed on first use)",
        path = path.display()
    )]
    NatsBinary {
        /// The binary tried.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// There is no node with this index in the NATS cluster.
    #[error("no NATS node with index {index}: this cluster has {count} (indices start at 0)")]
    NoSuchNode {
        /// The index asked for.
        index: usize,
        /// How many nodes the cluster has.
        count: usize,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
}

impl DevnetError {
    fn provision(step: &'static str, reason: impl Into<String>, hint: &'static str) -> Self {
        DevnetError::Provision {
            step,
            reason: reason.into(),
            hint,
        }
    }
}

/// How to start a [`Devnet`].
#[derive(Debug, Clone)]
pub struct DevnetConfig {
    /// Number of PDS hosts (at least 1).
    pub pds: usize,
    /// How long one service may take to report that it listens.
    pub startup_timeout: Duration,
}

impl Default for DevnetConfig {
    fn default() -> Self {
        DevnetConfig {
            pds: 1,
            startup_timeout: Duration::from_secs(60),
        }
    }
}

/// A running local network: one PLC directory and N PDS hosts sharing it.
#[derive(Debug)]
pub struct Devnet {
    plc: Mutex<Service>,
    plc_url: String,
    pds: Vec<PdsHost>,
    next_handle: AtomicU64,
    install: NodeInstall,
    // Declared last so it is removed after every process above has stopped.
    run_dir: tempfile::TempDir,
}

/// One PDS host of a [`Devnet`]; it can be stopped and started again on the same data and port.
#[derive(Debug)]
pub struct PdsHost {
    index: usize,
    port: u16,
    url: String,
    data_dir: PathBuf,
    plc_url: String,
    install: NodeInstall,
    startup_timeout: Duration,
    process: Mutex<Option<Service>>,
}

impl Devnet {
    /// Provisions (first run only) and starts a network. Blocks until every service listens.
    pub fn start(config: DevnetConfig) -> Result<Devnet, DevnetError> {
        let install = provision()?;
        remove_stale_run_dirs("murmur-devnet-");
        let run_dir = tempfile::Builder::new()
            .prefix(&format!("murmur-devnet-{}-", std::process::id()))
            .tempdir()
            .map_err(|e| DevnetError::Start {
                service: "devnet".into(),
                reason: format!("create a temporary directory: {e}"),
                log_tail: String::new(),
            })?;

        // All services boot at once (loading the PDS takes seconds of CPU each); a PDS needs
        // the PLC's URL to start, not a PLC that already answers.
        let mut attempt = 0;
        let (plc, plc_url, pds) = loop {
            attempt += 1;
            match start_services(&install, &run_dir, &config) {
                Ok(started) => break started,
                // A port picked as free can be taken before the service binds it.
                Err(e) if attempt < 3 && is_early_exit(&e) => continue,
                Err(e) => return Err(e),
            }
        };
        Ok(Devnet {
            plc: Mutex::new(plc),
            plc_url,
            pds,
            next_handle: AtomicU64::new(0),
            install,
            run_dir,
        })
    }

    /// The network shared by every test of this process (2 PDS hosts), started on first use.
    ///
    /// Its processes exit when this process exits. If it failed to start, every caller gets
    /// the same error, so tests fail with the provisioning message rather than skip.
    pub fn shared() -> Result<&'static Devnet, DevnetError> {
        static SHARED: OnceLock<Result<Devnet, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                Devnet::start(DevnetConfig {
                    pds: 2,
                    ..Default::default()
                })
                .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| DevnetError::Shared(e.clone()))
    }

    /// The PLC directory's URL, e.g. `http://localhost:41234`.
    pub fn plc_url(&self) -> &str {
        &self.plc_url
    }

    /// The operating-system id of the PLC directory's process, for fault tests (e.g. `kill
    /// -STOP` to make the directory hang, `kill -CONT` to let it go on).
    pub fn plc_pid(&self) -> u32 {
        lock(&self.plc).pid()
    }

    /// The services whose processes exited since the last call without being stopped through
    /// this API (a crash, a kill from outside). Each exit is reported once; an exited PDS
    /// counts as stopped, so [`PdsHost::start`] can start it again. Does not block.
    pub fn check_exits(&self) -> Vec<ServiceExit> {
        let mut exits: Vec<ServiceExit> = lock(&self.plc).check_exit().into_iter().collect();
        for host in &self.pds {
            let mut process = host.lock();
            if let Some(exit) = process.as_mut().and_then(Service::check_exit) {
                *process = None;
                exits.push(exit);
            }
        }
        exits
    }

    /// The PDS hosts, in index order.
    pub fn pds_hosts(&self) -> &[PdsHost] {
        &self.pds
    }

    /// The PDS host with this index (0-based).
    pub fn pds(&self, index: usize) -> Result<&PdsHost, DevnetError> {
        self.pds.get(index).ok_or(DevnetError::NoSuchPds {
            index,
            count: self.pds.len(),
        })
    }

    /// The Node install running this network (for interop scripts with `@atproto/api` or
    /// `@atproto/lexicon`).
    pub fn node(&self) -> &NodeInstall {
        &self.install
    }

    /// The directory holding every service's data and log files.
    pub fn run_dir(&self) -> &Path {
        self.run_dir.path()
    }

    /// A handle no other account of this network has: `{prefix}-{n}.test`.
    pub fn unique_handle(&self, prefix: &str) -> String {
        let n = self.next_handle.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{n}.test")
    }

    /// Creates an account on PDS `pds` and returns its DID and session tokens.
    pub async fn create_account(
        &self,
        pds: usize,
        handle: &str,
        password: &str,
    ) -> Result<Account, DevnetError> {
        let host = self.pds(pds)?;
        account::create(host, &self.plc_url, handle, password).await
    }
}

impl Drop for Devnet {
    fn drop(&mut self) {
        for host in &self.pds {
            host.stop();
        }
        lock(&self.plc).stop();
    }
}

impl PdsHost {
    /// Index of this host in its network (0-based).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The base URL, e.g. `http://localhost:41235`; stays the same across stop and start.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding its SQLite databases and blobs.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether its process is running (as far as this API knows: a process that died on its
    /// own counts as running until [`Devnet::check_exits`] reports it).
    pub fn is_running(&self) -> bool {
        self.lock().is_some()
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.lock().as_ref().map(Service::pid)
    }

    /// Stops the PDS process (it closes its databases and exits). Idempotent. Blocks.
    pub fn stop(&self) {
        if let Some(mut service) = self.lock().take() {
            service.stop();
        }
    }

    /// Starts the PDS again on the same data directory and port. Idempotent. Blocks until it
    /// listens.
    pub fn start(&self) -> Result<(), DevnetError> {
        let mut process = self.lock();
        if process.is_none() {
            *process = Some(Service::start(self.spec(self.port))?);
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Option<Service>> {
        lock(&self.process)
    }

    fn spec(&self, port: u16) -> ServiceSpec<'_> {
        ServiceSpec {
            name: format!("pds {}", self.index),
            kind: "pds",
            port,
            args: vec![
                "--plc".into(),
                self.plc_url.clone(),
                "--data".into(),
                self.data_dir.display().to_string(),
            ],
            log: self
                .data_dir
                .with_file_name(format!("pds{}.log", self.index)),
            install: &self.install,
            startup_timeout: self.startup_timeout,
        }
    }
}

/// Spawns the PLC and every PDS on free ports, then waits for all of them.
fn start_services(
    install: &NodeInstall,
    run_dir: &tempfile::TempDir,
    config: &DevnetConfig,
) -> Result<(Service, String, Vec<PdsHost>), DevnetError> {
    let plc_port = free_port()?;
    let plc_url = format!("http://localhost:{plc_port}");
    let plc = Service::spawn(ServiceSpec {
        name: "plc".into(),
        kind: "plc",
        port: plc_port,
        args: vec![],
        log: run_dir.path().join("plc.log"),
        install,
        startup_timeout: config.startup_timeout,
    })?;
    let mut hosts = Vec::new();
    let mut starting = Vec::new();
    for index in 0..config.pds.max(1) {
        let port = free_port()?;
        let host = PdsHost {
            index,
            port,
            url: format!("http://localhost:{port}"),
            data_dir: run_dir.path().join(format!("pds{index}")),
            plc_url: plc_url.clone(),
            install: install.clone(),
            startup_timeout: config.startup_timeout,
            process: Mutex::new(None),
        };
        starting.push(Service::spawn(host.spec(port))?);
        hosts.push(host);
    }
    // Wait for every service even after a failure, so none is left half-started.
    let plc = plc.wait_ready();
    let mut first_error = None;
    for (host, starting) in hosts.iter_mut().zip(starting) {
        match starting.wait_ready() {
            Ok(service) => {
                *host.process.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(service)
            }
            Err(e) => first_error = first_error.or(Some(e)),
        }
    }
    match (plc, first_error) {
        (Ok(plc), None) => Ok((plc, plc_url, hosts)),
        (Err(e), _) | (Ok(_), Some(e)) => Err(e),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_early_exit(e: &DevnetError) -> bool {
    matches!(e, DevnetError::Start { reason, .. } if reason.starts_with("exited"))
}

/// Removes run directories (`{prefix}{pid}-...` in the temporary directory) left by processes
/// that died without cleaning up (e.g. SIGKILL, or the never-dropped shared network).
pub(crate) fn remove_stale_run_dirs(prefix: &str) {
    // Liveness is read from /proc; elsewhere leave the directories alone.
    if !cfg!(target_os = "linux") {
        return;
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
