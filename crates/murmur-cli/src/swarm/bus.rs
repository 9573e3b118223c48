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
use std::path::Path;
use std::process::{Child, ChildStdin, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use murmur_bus::{Hub, StreamSettings};
use murmur_devnet::nats::NatsServer;
use tokio::sync::mpsc;

use super::agent::{AgentSpec, Role};
use super::summary::{AgentLine, Outcome, Report, WorkerEvent};
use super::{SwarmArgs, account, worker_host};

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
    let js = jetstream::new(client);
    let _ = js.delete_stream(&settings.name).await;
    let _ = js.delete_stream(settings.dead_letter_stream()).await;
    let _ = js.delete_key_value(settings.cursor_bucket()).await;
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
    let exe = std::env::current_exe()?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut procs: Vec<Proc> = Vec::new();
    let agents = workers
        .into_iter()
        .enumerate()
        .map(|(i, w)| (format!("worker{i}"), Role::Worker, w))
        .chain([("coordinator".to_string(), Role::Coordinator, coordinator)]);
    for (name, role, writer) in agents {
        let session = dir.path().join(format!("{name}.session.json"));
        writer.session().save(&session)?;
        if role == Role::Worker {
            report.add_worker(writer.did(), &name, writer.pds_url());
        }
        let spec = AgentSpec {
            role,
            name: name.clone(),
            session,
            pds: writer.pds_url().to_string(),
            plc: plc.to_string(),
            hosts: hosts.to_vec(),
            peers: peers.clone(),
            nats: nats.to_string(),
            stream: settings.name.clone(),
            prefix: settings.prefix.clone(),
            durable: format!("{}-{name}", settings.prefix),
            workers: args.workers,
            tasks: args.tasks,
            concurrency: args.concurrency,
            work_ms: args.work_ms,
            lease: args.lease,
            timeout: args.timeout,
        };
        let spec_path = dir.path().join(format!("{name}.spec.json"));
        write_private(&spec_path, &serde_json::to_vec(&spec)?)?;
        let child_args: Vec<OsString> = vec![
            "swarm-agent".into(),
            "--spec".into(),
            spec_path.into_os_string(),
        ];
        let mut child = murmur_devnet::spawn_tied(&exe, child_args, |command| {
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
        })
        .map_err(|e| format!("cannot start the {name} process: {e}"))?;
        let index = procs.len();
        let stdout = child.stdout.take();
        let tx = tx.clone();
        std::thread::spawn(move || {
            if let Some(stdout) = stdout {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let _ = tx.send(Msg::Line(index, line));
                }
            }
            let _ = tx.send(Msg::Eof(index));
        });
        procs.push(Proc {
            name,
            role,
            did: writer.did().to_string(),
            stdin: child.stdin.take(),
            child,
            pid: None,
            exited: None,
            killed: false,
            in_hand: 0,
            eof: false,
        });
    }
    drop(tx);

    let mut online: Option<Instant> = None;
    let mut outcome: Option<Outcome> = None;
    let mut failures: Vec<String> = Vec::new();
    let mut next_kill = 0;
    let mut kill_turn: Option<Instant> = None;
    let give_up = Instant::now() + STARTUP + Duration::from_secs(args.timeout + 30);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut reading = true;
    while outcome.is_none() {
        tokio::select! {
            msg = rx.recv(), if reading => match msg {
                Some(Msg::Line(i, line)) => {
                    let parsed: Result<AgentLine, _> = serde_json::from_str(&line);
                    match parsed {
                        Ok(line) => {
                            handle(line, i, &mut procs, report, args, hosts, &mut online, &mut outcome);
                        }
                        Err(e) => eprintln!("{}: unexpected report line ({e})", procs[i].name),
                    }
                }
                Some(Msg::Eof(i)) => procs[i].eof = true,
                None => reading = false,
            },
            _ = tick.tick() => {}
        }
        // Agents that died without being killed.
        let mut died = Vec::new();
        for (i, p) in procs.iter_mut().enumerate() {
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
            let (name, pid) = (procs[i].name.clone(), procs[i].child.id());
            let status = procs[i].exited.map_or("?".into(), |s| s.to_string());
            if procs[i].role == Role::Coordinator {
                // Its last lines may still be in the pipe: read up to its end.
                while !procs[i].eof {
                    match rx.recv().await {
                        Some(Msg::Line(j, line)) => {
                            if let Ok(line) = serde_json::from_str::<AgentLine>(&line) {
                                handle(
                                    line,
                                    j,
                                    &mut procs,
                                    report,
                                    args,
                                    hosts,
                                    &mut online,
                                    &mut outcome,
                                );
                            }
                        }
                        Some(Msg::Eof(j)) => procs[j].eof = true,
                        None => break,
                    }
                }
                if outcome.is_none() {
                    return Err(format!(
                        "the coordinator (pid {pid}) exited before its summary: {status}"
                    )
                    .into());
                }
            } else {
                let why = format!("{name} (pid {pid}) exited unexpectedly: {status}");
                report.say(&why);
                failures.push(why);
            }
        }
        // Kill workers in the middle of a task (in order, each once it has one in hand).
        if online.is_some() && next_kill < args.kill && outcome.is_none() {
            let turn = *kill_turn.get_or_insert_with(Instant::now);
            let p = &mut procs[next_kill];
            if p.exited.is_some() {
                next_kill += 1;
                kill_turn = None;
            } else if p.in_hand > 0 || turn.elapsed() > Duration::from_secs(10) {
                let in_hand = p.in_hand;
                p.child.kill()?; // SIGKILL
                p.exited = Some(p.child.wait()?);
                p.killed = true;
                report.killed(&p.did, in_hand);
                next_kill += 1;
                kill_turn = None;
            }
        }
        if Instant::now() > give_up {
            return Err(format!(
                "the swarm did not finish within {} s (--timeout plus start-up)",
                STARTUP.as_secs() + args.timeout + 30
            )
            .into());
        }
    }
    let outcome = outcome.ok_or("no outcome")?;

    // Tell the agents to stop, and wait for them.
    for p in &mut procs {
        p.stdin = None;
    }
    let stop_by = Instant::now() + STOP_GRACE;
    for p in procs.iter_mut().filter(|p| p.exited.is_none()) {
        loop {
            if let Some(status) = p.child.try_wait()? {
                p.exited = Some(status);
                if !status.success() {
                    let why = format!("{} (pid {}) exited with {status}", p.name, p.child.id());
                    report.say(&why);
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
                report.say(&why);
                failures.push(why);
                let _ = p.child.kill();
                p.exited = p.child.wait().ok();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let ok = report.summary(&outcome);
    for why in &failures {
        report.say(format_args!("  failure: {why}"));
    }
    hub_stop.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(5), hub_task).await;
    Ok(ok && failures.is_empty())
}

/// Takes one report line of agent `i`.
#[allow(clippy::too_many_arguments)]
fn handle(
    line: AgentLine,
    i: usize,
    procs: &mut [Proc],
    report: &mut Report,
    args: &SwarmArgs,
    hosts: &[String],
    online: &mut Option<Instant>,
    outcome: &mut Option<Outcome>,
) {
    match line {
        AgentLine::Ready { pid, did } => {
            let Some(p) = procs.get_mut(i) else { return };
            if p.child.id() != pid || p.did != did {
                eprintln!(
                    "warning: {} reported pid {pid} and {did}; started as pid {} for {}",
                    p.name,
                    p.child.id(),
                    p.did
                );
            }
            p.pid = Some(pid);
            report.add_pid(&p.name, pid);
            if procs.iter().all(|p| p.pid.is_some()) {
                let list: Vec<String> = procs
                    .iter()
                    .map(|p| format!("{} {}", p.name, p.pid.unwrap_or_default()))
                    .collect();
                report.say(format_args!(
                    "agent processes (launcher {}): {}",
                    std::process::id(),
                    list.join(", ")
                ));
            }
        }
        AgentLine::Online => {
            *online = Some(Instant::now());
            report.say(format_args!(
                "swarm: 1 coordinator on {}, {} workers on {} PDS host(s), {} tasks, each agent \
                 a process hearing the swarm through the bus",
                hosts[0],
                args.workers,
                hosts.len(),
                args.tasks
            ));
        }
        AgentLine::Event { kind, .. } => {
            let Some(p) = procs.get_mut(i) else { return };
            match kind {
                WorkerEvent::Started => p.in_hand += 1,
                WorkerEvent::Finished | WorkerEvent::Dropped => {
                    p.in_hand = p.in_hand.saturating_sub(1)
                }
                WorkerEvent::Claimed => {}
            }
            report.worker_event(&p.did, kind);
        }
        AgentLine::Stats { stats, elapsed_ms } => {
            report.progress(&stats.into(), Duration::from_millis(elapsed_ms));
        }
        AgentLine::Done(done) => *outcome = Some(*done),
    }
}
