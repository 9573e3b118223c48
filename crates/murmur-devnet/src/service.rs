//! One supervised node process (a PLC or a PDS) and the free-port search behind it.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::DevnetError;
use crate::provision::NodeInstall;

/// How long a graceful stop may take before the process is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A running service. Dropping it stops the process (gracefully, then by force).
#[derive(Debug)]
pub(crate) struct Service {
    name: String,
    child: Child,
    /// Held open for the life of the service: when it closes (also when our process dies
    /// without running destructors) the launcher shuts the service down.
    stdin: Option<ChildStdin>,
    log: PathBuf,
    /// Where this run's output starts in the (appended-to) log.
    log_start: u64,
    /// Set once an exit we did not ask for was reported, so it is reported once.
    exit_reported: bool,
}

/// A node process of the network that exited without being asked to stop.
#[derive(Debug, Clone)]
pub struct ServiceExit {
    /// Which service, e.g. `plc` or `pds 1`.
    pub service: String,
    /// Its process id.
    pub pid: u32,
    /// How it ended (exit code or signal).
    pub status: ExitStatus,
    /// Its log file (its stderr).
    pub log: PathBuf,
    /// The last lines of its log from this run.
    pub log_tail: String,
}

impl std::fmt::Display for ServiceExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (pid {}) exited unexpectedly: {}",
            self.service, self.pid, self.status
        )?;
        if self.log_tail.is_empty() {
            write!(f, "\n(its log {} is empty)", self.log.display())
        } else {
            write!(
                f,
                "\n--- last lines of its log {} ---\n{}",
                self.log.display(),
                self.log_tail
            )
        }
    }
}

/// A service whose process runs but has not yet said it listens.
pub(crate) struct Starting {
    service: Service,
    ready: mpsc::Receiver<Option<std::io::Result<String>>>,
    timeout: Duration,
}

/// What to run: `node devnet.mjs <kind> --port P <args...>`.
pub(crate) struct ServiceSpec<'a> {
    pub name: String,
    pub kind: &'static str,
    pub port: u16,
    pub args: Vec<String>,
    pub log: PathBuf,
    pub install: &'a NodeInstall,
    pub startup_timeout: Duration,
}

impl Service {
    /// Starts the service and waits until it reports that it listens.
    pub(crate) fn start(spec: ServiceSpec<'_>) -> Result<Service, DevnetError> {
        Service::spawn(spec)?.wait_ready()
    }

    /// Spawns the process without waiting, so several services can boot at once.
    pub(crate) fn spawn(spec: ServiceSpec<'_>) -> Result<Starting, DevnetError> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&spec.log)
            .map_err(|e| start_error(&spec.name, format!("open {}: {e}", spec.log.display())))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut child = Command::new(&spec.install.node)
            .arg(spec.install.launcher())
            .arg(spec.kind)
            .arg("--port")
            .arg(spec.port.to_string())
            .args(&spec.args)
            .current_dir(&spec.install.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                start_error(
                    &spec.name,
                    format!("spawn {}: {e}", spec.install.node.display()),
                )
            })?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");
        let service = Service {
            name: spec.name,
            child,
            stdin,
            log: spec.log,
            log_start,
            exit_reported: false,
        };

        // The ready line arrives on stdout; read it on a thread so we can time out.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        Ok(Starting {
            service,
            ready: rx,
            timeout: spec.startup_timeout,
        })
    }

    fn failure(&mut self, what: &str) -> DevnetError {
        self.stop();
        DevnetError::Start {
            service: self.name.clone(),
            reason: what.to_string(),
            log_tail: log_tail(&self.log, self.log_start),
        }
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited on its own: reported once, with its status and the end
    /// of its log. Does not block.
    pub(crate) fn check_exit(&mut self) -> Option<ServiceExit> {
        if self.exit_reported || self.stdin.is_none() {
            // Already reported, or being stopped on purpose.
            return None;
        }
        let status = self.child.try_wait().ok().flatten()?;
        self.exit_reported = true;
        Some(ServiceExit {
            service: self.name.clone(),
            pid: self.pid(),
            status,
            log: self.log.clone(),
            log_tail: log_tail(&self.log, self.log_start),
        })
    }

    /// Stops the service: close stdin (the launcher closes its server and exits), wait, then kill.
    pub(crate) fn stop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Starting {
    /// Waits until the service reports that it listens; stops it on failure.
    pub(crate) fn wait_ready(mut self) -> Result<Service, DevnetError> {
        match self.ready.recv_timeout(self.timeout) {
            Ok(Some(Ok(line))) if line.contains("\"ready\":true") => Ok(self.service),
            Ok(_) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(self.service.failure("exited before it was ready"))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Err(self
                .service
                .failure(&format!("not ready after {:?}", self.timeout))),
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn start_error(service: &str, reason: String) -> DevnetError {
    DevnetError::Start {
        service: service.to_string(),
        reason,
        log_tail: String::new(),
    }
}

/// The last lines the service wrote to its log since `from`.
pub(crate) fn log_tail(path: &Path, from: u64) -> String {
    const WINDOW: u64 = 64 << 10;
    let mut bytes = Vec::new();
    let mut start = from;
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        start = from.max(len.saturating_sub(WINDOW));
        let _ = f.seek(SeekFrom::Start(start));
        let _ = f.take(WINDOW).read_to_end(&mut bytes);
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > from && !lines.is_empty() {
        // The window starts mid-line.
        lines.remove(0);
    }
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A loopback port that was free a moment ago.
pub(crate) fn free_port() -> Result<u16, DevnetError> {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| start_error("port search", format!("bind 127.0.0.1:0: {e}")))
}
