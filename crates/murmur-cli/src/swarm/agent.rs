//! `murmur swarm-agent` (hidden): one agent of `murmur swarm --bus`, in its own process.
//!
//! The launcher writes the agent's spec and session (each mode 0600, in a 0700 temporary
//! directory) and starts this with `--spec FILE`. The agent takes over the session (and
//! removes its file), hears the swarm through its own durable consumer of the hub's stream,
//! writes to its own PDS, and reports to the launcher with JSON lines on stdout
//! ([`AgentLine`]); its logs go to stderr.
//! It stops when its stdin closes (the launcher is done with it or gone); it is also tied to
//! the launcher's life by `setpriv --pdeathsig KILL` where available.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use murmur::Agent;
use murmur::pds::{Session, Writer};
use murmur_bus::{BusSource, StartAt, StreamSettings};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot};

use super::direct::millis;
use super::summary::{AgentLine, Outcome, StatsWire, worker_event};
use super::{closed_by_ack, post_tasks, square_worker, worker_profile, workers_online};

/// Arguments of `murmur swarm-agent`.
#[derive(clap::Args)]
pub struct AgentArgs {
    /// The agent's spec file, written by `murmur swarm --bus`.
    #[arg(long, value_name = "FILE")]
    spec: PathBuf,
}

/// What an agent process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Role {
    /// Posts the tasks and follows them to their acks.
    Coordinator,
    /// Claims and runs tasks.
    Worker,
}

/// Everything an agent process needs, but its session (in its own file).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct AgentSpec {
    pub role: Role,
    /// e.g. `worker3`.
    pub name: String,
    /// The session file (0600) to resume.
    pub session: PathBuf,
    /// The agent's own PDS.
    pub pds: String,
    pub plc: String,
    /// Every PDS host of the swarm (repo reads: recovery, candidates).
    pub hosts: Vec<String>,
    /// Every agent's DID.
    pub peers: Vec<String>,
    /// NATS URL, the bus stream's name and subject prefix.
    pub nats: String,
    pub stream: String,
    pub prefix: String,
    /// This agent's durable consumer.
    pub durable: String,
    pub workers: usize,
    pub tasks: usize,
    pub concurrency: usize,
    pub work_ms: u64,
    pub lease: u64,
    pub timeout: u64,
    /// A coordinator started again after it was killed: it posts nothing, and follows the
    /// open tasks it recovers from the repos to their end.
    #[serde(default)]
    pub restarted: bool,
}

/// Runs one agent until its work is done (coordinator) or its stdin closes (worker).
pub fn run(args: AgentArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let spec = read_spec(&args.spec)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match spec.role {
            Role::Coordinator => coordinator(&spec).await,
            Role::Worker => worker(&spec).await,
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

fn read_spec(path: &Path) -> Result<AgentSpec, String> {
    let bytes =
        std::fs::read(path).map_err(|e| format!("cannot read the spec {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is not a swarm agent spec: {e}", path.display()))
}

/// Writes one report line for the launcher. A launcher that is gone cannot read it; the
/// agent then stops when its stdin closes.
fn emit(line: &AgentLine) {
    let mut out = std::io::stdout().lock();
    if serde_json::to_writer(&mut out, line).is_ok() {
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    }
}

/// Resolves when stdin reaches its end: the launcher closed it, or died.
fn stdin_closed() -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = tx.send(());
    });
    rx
}

/// The agent's writer, from the session the launcher handed over. The file is removed once
/// read: the session (and its refreshes) lives on only in this process.
async fn writer(spec: &AgentSpec) -> Result<Writer, Box<dyn std::error::Error>> {
    let session = Session::load(&spec.session)?;
    std::fs::remove_file(&spec.session)
        .map_err(|e| format!("cannot remove {}: {e}", spec.session.display()))?;
    Ok(Writer::builder(spec.pds.as_str()).with_session(session)?)
}

/// The agent's durable consumer of the run's stream, from its first message.
fn feed(spec: &AgentSpec) -> BusSource {
    BusSource::new(spec.nats.as_str(), spec.durable.as_str())
        .stream(StreamSettings {
            name: spec.stream.clone(),
            prefix: spec.prefix.clone(),
            ..Default::default()
        })
        .start_at(StartAt::All)
}

async fn worker(spec: &AgentSpec) -> Result<(), Box<dyn std::error::Error>> {
    let agent = Agent::builder(writer(spec).await?)
        .watch_all(spec.hosts.iter().cloned())
        .plc_url(&spec.plc)
        .peers(spec.peers.iter().cloned())
        .feed(feed(spec))
        .requester(false)
        .worker(square_worker(spec.work_ms, spec.concurrency))
        .profile(worker_profile(&spec.name, spec.concurrency))
        .presence_every(Duration::from_secs(5))
        .start()
        .await?;
    let mut events = agent.events();
    emit(&AgentLine::Ready {
        pid: std::process::id(),
        did: agent.did().to_string(),
    });
    let report = async {
        loop {
            match events.recv().await {
                Ok(ev) => {
                    if let Some((kind, task)) = worker_event(&ev) {
                        emit(&AgentLine::Event {
                            kind,
                            task: task.to_string(),
                        });
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    };
    tokio::select! {
        _ = report => {}
        _ = stdin_closed() => {}
    }
    agent.shutdown().await;
    Ok(())
}

async fn coordinator(spec: &AgentSpec) -> Result<(), Box<dyn std::error::Error>> {
    let writer = writer(spec).await?;
    let boss = Agent::builder(writer.clone())
        .watch_all(spec.hosts.iter().cloned())
        .plc_url(&spec.plc)
        .peers(spec.peers.iter().cloned())
        .feed(feed(spec))
        .start()
        .await?;
    emit(&AgentLine::Ready {
        pid: std::process::id(),
        did: boss.did().to_string(),
    });
    let mut stop = stdin_closed();

    if spec.restarted {
        let r = boss.recovery().unwrap_or_default();
        emit(&AgentLine::Recovered {
            open: r.open,
            done_while_away: r.done_while_away,
            assigned: r.assigned,
            unassigned: r.unassigned,
            claims_found: r.claims_found,
            elapsed_ms: millis(r.elapsed),
        });
        return follow(spec, &boss, &writer, None, r.open as u64, &mut stop).await;
    }

    tokio::select! {
        online = workers_online(&boss, spec.workers) => online?,
        _ = &mut stop => return Err("the launcher closed our stdin".into()),
    }
    emit(&AgentLine::Online);

    let poster = post_tasks(&boss, spec.tasks, spec.lease, Vec::new());
    follow(
        spec,
        &boss,
        &writer,
        Some(poster),
        spec.tasks as u64,
        &mut stop,
    )
    .await
}

/// Reports the coordinator's counters until `tasks` of its tasks are done (or given up), then
/// its outcome.
async fn follow(
    spec: &AgentSpec,
    boss: &Agent,
    writer: &Writer,
    poster: Option<tokio::task::JoinHandle<Vec<murmur::TaskHandle>>>,
    tasks: u64,
    stop: &mut oneshot::Receiver<()>,
) -> Result<(), Box<dyn std::error::Error>> {
    let run_started = Instant::now();
    let mut posting = None;
    let mut timed_out = false;
    loop {
        let s = boss.task_stats();
        emit(&AgentLine::Stats {
            stats: StatsWire::from(&s),
            elapsed_ms: millis(run_started.elapsed()),
        });
        if s.posted >= tasks && posting.is_none() {
            posting = Some(run_started.elapsed());
        }
        if s.done + s.given_up >= tasks {
            break;
        }
        if run_started.elapsed() > Duration::from_secs(spec.timeout) {
            timed_out = true;
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = &mut *stop => return Err("the launcher closed our stdin".into()),
        }
    }
    let elapsed = run_started.elapsed();
    // Give late duplicates a moment to show up before counting.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let s = boss.task_stats();
    let closed = closed_by_ack(writer).await?;
    emit(&AgentLine::Done(Box::new(Outcome {
        stats: (&s).into(),
        closed,
        elapsed_ms: millis(elapsed),
        posting_ms: posting.map(millis),
        timed_out,
    })));
    if let Some(poster) = poster {
        poster.abort();
    }
    boss.shutdown().await;
    Ok(())
}
