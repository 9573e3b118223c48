//! Bus mode: this process is the launcher. It starts what is missing (the local network, a
//! nats-server), runs the hub, creates the accounts and starts every agent as a process of
//! its own (`murmur swarm-agent`), which hears the swarm through its own durable consumer.
//!
//! The hub runs inside the launcher rather than as a `murmur hub` child: it is not an agent
//! (the agents still meet only through the PDS hosts and the bus), its errors reach the
//! launcher typed, it stops with it, and there is no log to scrape for "ready". `murmur hub`
//! is there for running one on its own.
//!
//! Secrets: each agent's session goes to it in a file of its own (mode 0600, in a 0700
//! temporary directory removed at the end; the agent removes its file once read), never on a
//! command line or in a log. The agents
//! report on stdout, one JSON object a line ([`AgentLine`]); the launcher prints the same
//! progress and summary as direct mode from them.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use murmur_bus::{Hub, StreamSettings};
use murmur_devnet::nats::NatsServer;
use tokio::sync::mpsc;

use murmur::TaskStats;
use murmur::pds::Session;

use super::agent::{AgentSpec, Role};
use super::direct::millis;
use super::summary::{AgentLine, Outcome, Report, WorkerEvent};
use super::{SwarmArgs, account, merged, worker_host};

/// How long the agents may take to start and see each other before posting starts.
const STARTUP: Duration = Duration::from_secs(120);
/// How long the agents may take to stop once the run is over.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// Checks a `--bus` value: one or more comma-separated `nats://host[:port]` (or `tls://`)
/// URLs, without credentials (they would show in process lists and logs).
pub(super) fn check_url(url: &str) -> Result<String, String> {
    if url.contains('@') {
        // Not echoed: the URL holds a secret.
        return Err(
            "--bus: credentials in the URL are not supported (they would show in \
                    process lists and logs)"
                .into(),
        );
    }
    let bad = |why: &str| format!("--bus {url:?}: {why} (expected nats://host:port)");
    for part in url.split(',').map(str::trim) {
        let hostport = part
            .strip_prefix("nats://")
            .or_else(|| part.strip_prefix("tls://"))
            .ok_or_else(|| bad("not a nats:// URL"))?
            .trim_end_matches('/');
        let (host, port) = match hostport.strip_prefix('[') {
            // [IPv6]:port
            Some(v6) => match v6.split_once(']') {
                Some((host, rest)) => (host, rest.strip_prefix(':')),
                None => return Err(bad("unclosed [")),
            },
            None => match hostport.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (hostport, None),
            },
        };
        if host.is_empty() || host.contains('/') {
            return Err(bad("no host"));
        }
        if let Some(port) = port
            && port.parse::<u16>().map_or(true, |p| p == 0)
        {
            return Err(bad("bad port"));
        }
    }
    Ok(url.trim().to_string())
}

/// Runs the swarm with each agent in its own process; true when nothing was lost or
/// duplicated, every task was closed by an accepted ack, and no agent died unexpectedly.
pub(super) fn run(
    args: &SwarmArgs,
    url: Option<String>,
    hosts: &[String],
    plc: &str,
) -> Result<bool, Box<dyn std::error::Error>> {
    // Stopped (killed) when dropped, after the runtime and the agents.
    let mut _server = None;
    let nats = match url {
        Some(url) => url,
        None => {
            eprintln!("starting a local nats-server with JetStream...");
            let server = NatsServer::start(Default::default())?;
            let url = server.url().to_string();
            _server = Some(server);
            url
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(launch(args, &nats, hosts, plc))
}

/// One agent process.
struct Proc {
    name: String,
    role: Role,
    did: String,
    child: Child,
    /// Closing it tells the agent to stop.
    stdin: Option<ChildStdin>,
    /// The pid the agent reported itself.
    pid: Option<u32>,
    exited: Option<ExitStatus>,
    killed: bool,
    /// Attempts started and not finished yet.
    in_hand: usize,
    /// Its stdout reached its end.
    eof: bool,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

enum Msg {
    Line(usize, String),
    Eof(usize),
}

/// Writes `bytes` to a new file at `path` with mode 0600.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

async fn launch(
    args: &SwarmArgs,
    nats: &str,
    hosts: &[String],
    plc: &str,
) -> Result<bool, Box<dyn std::error::Error>> {
    let mut report = Report::new("bus", args.tasks, args.json);
    // A stream of this run's own, removed at the end: a shared server keeps no trace of it.
    let id = fastrand::u32(..);
    let settings = StreamSettings {
        name: format!("SWARM_{id:08X}"),
        prefix: format!("swarm{id:08x}"),
        max_age: Duration::from_secs(3600),
        ..Default::default()
    };
    // Fails early and clearly on a server that is unreachable or too old.
    let client = murmur_bus::connect(nats, "murmur swarm")
        .await
        .map_err(|e| format!("--bus: {e}"))?;
    let outcome = run_swarm(args, &mut report, nats, &settings, hosts, plc).await;
    if let Err(e) = murmur_bus::delete_streams(&jetstream::new(client), &settings).await {
        eprintln!("the run's stream was not removed: {e}");
    }
    outcome
}

async fn run_swarm(
    args: &SwarmArgs,
    report: &mut Report,
    nats: &str,
    settings: &StreamSettings,
    hosts: &[String],
    plc: &str,
) -> Result<bool, Box<dyn std::error::Error>> {
    // The hub: verifies every commit of the hosts once and publishes it to the stream.
    let mut hub = Hub::builder()
        .nats(nats)
        .plc_url(plc)
        .stream(settings.clone())
        .name("murmur swarm hub");
    for host in hosts {
        hub = hub.pds(host);
    }
    let hub = hub.build().await?;
    let hub_metrics = hub.watcher_metrics();
    let hub_stop = hub.shutdown_handle();
    let mut hub_task = tokio::spawn(hub.run());
    // Everything written from here on reaches the stream.
    let started = Instant::now();
    loop {
        let m = hub_metrics.snapshot();
        if m.sources_connected >= hosts.len() as u64 {
            break;
        }
        if hub_task.is_finished() {
            return Err(match (&mut hub_task).await {
                Ok(Err(e)) => format!("the hub stopped: {e}"),
                Ok(Ok(())) => "the hub stopped".into(),
                Err(e) => format!("the hub failed: {e}"),
            }
            .into());
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err(format!(
                "the hub connected to {} of {} PDS host(s) within 30 s",
                m.sources_connected,
                hosts.len()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let coordinator = account(&hosts[0], "coordinator").await?;
    let mut workers = Vec::new();
    for i in 0..args.workers {
        workers.push(account(worker_host(hosts, i), &format!("worker{i}")).await?);
    }
    let mut peers: Vec<String> = workers.iter().map(|w| w.did().to_string()).collect();
    peers.push(coordinator.did().to_string());

    // Sessions and specs, 0600 each, in a 0700 directory removed when this returns.
    let dir = tempfile::Builder::new().prefix("murmur-swarm-").tempdir()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut run = Run {
        args,
        hosts,
        report,
        dir: dir.path(),
        exe: std::env::current_exe()?,
        tx,
        procs: Vec::new(),
        online: None,
        outcome: None,
        last: None,
        posting_ms: None,
        restart: None,
    };
    let base = AgentSpec {
        role: Role::Worker,
        name: String::new(),
        session: Default::default(),
        pds: String::new(),
        plc: plc.to_string(),
        hosts: hosts.to_vec(),
        peers,
        nats: nats.to_string(),
        stream: settings.name.clone(),
        prefix: settings.prefix.clone(),
        durable: String::new(),
        workers: args.workers,
        tasks: args.tasks,
        concurrency: args.concurrency,
        work_ms: args.work_ms,
        lease: args.lease,
        timeout: args.timeout,
        restarted: false,
    };
    let coordinator_session = coordinator.session();
    let agents = workers
        .into_iter()
        .enumerate()
        .map(|(i, w)| (format!("worker{i}"), Role::Worker, w))
        .chain([("coordinator".to_string(), Role::Coordinator, coordinator)]);
    for (name, role, writer) in agents {
        if role == Role::Worker {
            run.report.add_worker(writer.did(), &name, writer.pds_url());
        }
        let spec = AgentSpec {
            role,
            name: name.clone(),
            pds: writer.pds_url().to_string(),
            durable: format!("{}-{name}", settings.prefix),
            ..base.clone()
        };
        run.spawn(spec, &writer.session(), &name)?;
    }
    let mut coordinator = run.procs.len() - 1;

    let mut failures: Vec<String> = Vec::new();
    let mut next_kill = 0;
    let mut kill_turn: Option<Instant> = None;
    let give_up = Instant::now() + STARTUP + Duration::from_secs(args.timeout + 30);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    // Ctrl-C or SIGTERM: stop cleanly (agents, stream, temporary files) instead of dying.
    let mut interrupted = std::pin::pin!(crate::signal::interrupted());
    while run.outcome.is_none() {
        tokio::select! {
            // Never closed: the launcher holds a sender for agents it starts later.
            Some(msg) = rx.recv() => run.take(msg),
            _ = tick.tick() => {}
            signal = &mut interrupted => return Err(format!("stopped by {signal}").into()),
        }
        // Agents that died without being killed.
        let mut died = Vec::new();
        for (i, p) in run.procs.iter_mut().enumerate() {
            if p.exited.is_none()
                && let Some(status) = p.child.try_wait()?
            {
                p.exited = Some(status);
                if !p.killed {
                    died.push(i);
                }
            }
        }
        for i in died {
            let p = &run.procs[i];
            let (name, pid, role) = (p.name.clone(), p.child.id(), p.role);
            let status = p.exited.map_or("?".into(), |s| s.to_string());
            if role == Role::Coordinator {
                // Its last lines may still be in the pipe: read up to its end.
                while !run.procs[i].eof {
                    match rx.recv().await {
                        Some(msg) => run.take(msg),
                        None => break,
                    }
                }
                if run.outcome.is_none() {
                    return Err(format!(
                        "the coordinator (pid {pid}) exited before its summary: {status}"
                    )
                    .into());
                }
            } else {
                let why = format!("{name} (pid {pid}) exited unexpectedly: {status}");
                run.report.say(&why);
                failures.push(why);
            }
        }
        // Kill workers in the middle of a task (in order, each once it has one in hand).
        if run.online.is_some() && next_kill < args.kill && run.outcome.is_none() {
            let turn = *kill_turn.get_or_insert_with(Instant::now);
            let p = &mut run.procs[next_kill];
            if p.exited.is_some() {
                next_kill += 1;
                kill_turn = None;
            } else if p.in_hand > 0 || turn.elapsed() > Duration::from_secs(10) {
                let in_hand = p.in_hand;
                p.child.kill()?; // SIGKILL
                p.exited = Some(p.child.wait()?);
                p.killed = true;
                let did = p.did.clone();
                run.report.killed(&did, in_hand);
                next_kill += 1;
                kill_turn = None;
            }
        }
        // Kill the coordinator a third of the way through, and start it again.
        if let (true, None, None, Some(s), Some(online)) = (
            args.restart_coordinator,
            &run.restart,
            &run.outcome,
            &run.last,
            run.online,
        ) && s.posted >= args.tasks as u64
            && s.done * 3 >= args.tasks as u64
        {
            let before = s.clone();
            let p = &mut run.procs[coordinator];
            let pid = p.child.id();
            p.child.kill()?; // SIGKILL
            p.exited = Some(p.child.wait()?);
            p.killed = true;
            run.report.say(format_args!(
                "killed the coordinator (pid {pid}, SIGKILL) with {} of {} tasks done; \
                 restarting it in 2 s",
                before.done, args.tasks
            ));
            tokio::time::sleep(Duration::from_secs(2)).await;
            run.restart = Some(Restart {
                before,
                closed_before: None,
                offset: online.elapsed(),
            });
            // Same identity and durable consumer, no local state.
            let spec = AgentSpec {
                role: Role::Coordinator,
                name: "coordinator".into(),
                pds: coordinator_session.pds.clone(),
                durable: format!("{}-coordinator", settings.prefix),
                restarted: true,
                ..base.clone()
            };
            run.spawn(spec, &coordinator_session, "coordinator-restarted")?;
            coordinator = run.procs.len() - 1;
        }
        if Instant::now() > give_up {
            return Err(format!(
                "the swarm did not finish within {} s (--timeout plus start-up)",
                STARTUP.as_secs() + args.timeout + 30
            )
            .into());
        }
    }
    let outcome = run.outcome.take().ok_or("no outcome")?;

    // Tell the agents to stop, and wait for them.
    for p in &mut run.procs {
        p.stdin = None;
    }
    let stop_by = Instant::now() + STOP_GRACE;
    for p in run.procs.iter_mut().filter(|p| p.exited.is_none()) {
        loop {
            if let Some(status) = p.child.try_wait()? {
                p.exited = Some(status);
                if !status.success() {
                    let why = format!("{} (pid {}) exited with {status}", p.name, p.child.id());
                    run.report.say(&why);
                    failures.push(why);
                }
                break;
            }
            if Instant::now() > stop_by {
                let why = format!(
                    "{} (pid {}) did not stop within {} s; killed",
                    p.name,
                    p.child.id(),
                    STOP_GRACE.as_secs()
                );
                run.report.say(&why);
                failures.push(why);
                let _ = p.child.kill();
                p.exited = p.child.wait().ok();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let ok = run.report.summary(&outcome);
    for why in &failures {
        run.report.say(format_args!("  failure: {why}"));
    }
    hub_stop.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(5), hub_task).await;
    Ok(ok && failures.is_empty())
}

/// A coordinator restarted by `--restart-coordinator`.
struct Restart {
    /// The first coordinator's last counters.
    before: TaskStats,
    /// Its tasks closed in the repo, as the restarted one found them (`None` until it says).
    closed_before: Option<u64>,
    /// From the first coordinator's start of posting to the restart.
    offset: Duration,
}

/// The launcher's state while the swarm runs.
struct Run<'a> {
    args: &'a SwarmArgs,
    hosts: &'a [String],
    report: &'a mut Report,
    dir: &'a Path,
    exe: PathBuf,
    tx: mpsc::UnboundedSender<Msg>,
    procs: Vec<Proc>,
    /// When the coordinator saw every worker (posting started).
    online: Option<Instant>,
    outcome: Option<Outcome>,
    /// The coordinator's last counters.
    last: Option<TaskStats>,
    posting_ms: Option<u64>,
    restart: Option<Restart>,
}

impl Run<'_> {
    /// Starts an agent process: its session in a file of its own, its spec, `murmur
    /// swarm-agent --spec FILE`, and a thread reading its report lines. `file` names the files.
    fn spawn(
        &mut self,
        mut spec: AgentSpec,
        session: &Session,
        file: &str,
    ) -> Result<(), Box<dyn std::error::Error>> {
        spec.session = self.dir.join(format!("{file}.session.json"));
        session.save(&spec.session)?;
        let spec_path = self.dir.join(format!("{file}.spec.json"));
        write_private(&spec_path, &serde_json::to_vec(&spec)?)?;
        let child_args: Vec<OsString> = vec![
            "swarm-agent".into(),
            "--spec".into(),
            spec_path.into_os_string(),
        ];
        let name = spec.name.clone();
        let mut child = murmur_devnet::spawn_tied(&self.exe, child_args, |command| {
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
        })
        .map_err(|e| format!("cannot start the {name} process: {e}"))?;
        let index = self.procs.len();
        let stdout = child.stdout.take();
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            if let Some(stdout) = stdout {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let _ = tx.send(Msg::Line(index, line));
                }
            }
            let _ = tx.send(Msg::Eof(index));
        });
        self.procs.push(Proc {
            name,
            role: spec.role,
            did: session.did.clone(),
            stdin: child.stdin.take(),
            child,
            pid: None,
            exited: None,
            killed: false,
            in_hand: 0,
            eof: false,
        });
        Ok(())
    }

    /// Takes one message from an agent's stdout.
    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Line(i, line) => match serde_json::from_str::<AgentLine>(&line) {
                Ok(line) => self.handle(i, line),
                Err(e) => eprintln!("{}: unexpected report line ({e})", self.procs[i].name),
            },
            Msg::Eof(i) => self.procs[i].eof = true,
        }
    }

    /// Takes one report line of agent `i`.
    fn handle(&mut self, i: usize, line: AgentLine) {
        let tasks = self.args.tasks as u64;
        match line {
            AgentLine::Ready { pid, did } => {
                let p = &mut self.procs[i];
                if p.child.id() != pid || p.did != did {
                    eprintln!(
                        "warning: {} reported pid {pid} and {did}; started as pid {} for {}",
                        p.name,
                        p.child.id(),
                        p.did
                    );
                }
                p.pid = Some(pid);
                self.report.add_pid(&p.name, pid);
                if self.restart.is_none() && self.procs.iter().all(|p| p.pid.is_some()) {
                    let list: Vec<String> = self
                        .procs
                        .iter()
                        .map(|p| format!("{} {}", p.name, p.pid.unwrap_or_default()))
                        .collect();
                    self.report.say(format_args!(
                        "agent processes (launcher {}): {}",
                        std::process::id(),
                        list.join(", ")
                    ));
                }
            }
            AgentLine::Online => {
                self.online = Some(Instant::now());
                self.report.say(format_args!(
                    "swarm: 1 coordinator on {}, {} workers on {} PDS host(s), {} tasks, each \
                     agent a process hearing the swarm through the bus",
                    self.hosts[0],
                    self.args.workers,
                    self.hosts.len(),
                    self.args.tasks
                ));
            }
            AgentLine::Event { kind, .. } => {
                let p = &mut self.procs[i];
                match kind {
                    WorkerEvent::Started => p.in_hand += 1,
                    WorkerEvent::Finished | WorkerEvent::Dropped => {
                        p.in_hand = p.in_hand.saturating_sub(1)
                    }
                    WorkerEvent::Claimed => {}
                }
                let did = p.did.clone();
                self.report.worker_event(&did, kind);
            }
            AgentLine::Recovered {
                open,
                done_while_away,
                assigned,
                unassigned,
                claims_found,
                elapsed_ms,
            } => {
                if let Some(r) = &mut self.restart {
                    r.closed_before = Some(tasks.saturating_sub(open as u64));
                }
                self.report.say(format_args!(
                    "coordinator restarted (pid {}): {open} open task(s) recovered in \
                     {elapsed_ms} ms ({done_while_away} done while it was away, {assigned} \
                     still assigned, {unassigned} to assign from {claims_found} claim(s) in the \
                     repos)",
                    self.procs[i].pid.unwrap_or_default()
                ));
            }
            AgentLine::Stats { stats, elapsed_ms } => {
                let s: TaskStats = stats.into();
                let elapsed = Duration::from_millis(elapsed_ms);
                match &self.restart {
                    None => {
                        if s.posted >= tasks && self.posting_ms.is_none() {
                            self.posting_ms = Some(elapsed_ms);
                        }
                        self.report.progress(&s, elapsed);
                        self.last = Some(s);
                    }
                    Some(Restart {
                        before,
                        closed_before: Some(closed),
                        offset,
                    }) => {
                        let s = merged(before, &s, *closed);
                        self.report.progress(&s, *offset + elapsed);
                    }
                    // Counters of the coordinator that was killed, or before recovery.
                    Some(_) => {}
                }
            }
            AgentLine::Done(mut done) => {
                if let Some(Restart {
                    before,
                    closed_before,
                    offset,
                }) = &self.restart
                {
                    let after: TaskStats = done.stats.clone().into();
                    let s = merged(before, &after, closed_before.unwrap_or(0));
                    done.stats = (&s).into();
                    done.elapsed_ms += millis(*offset);
                    done.posting_ms = self.posting_ms;
                }
                self.outcome = Some(*done);
            }
        }
    }
}
