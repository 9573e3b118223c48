//! `murmur swarm`: the main demo. One coordinator and N workers on 2 PDS hosts run a batch of
//! tasks through the record-only task protocol, with live progress and an exactly-once summary.
//!
//! Two modes, one summary ([`summary`]):
//! - direct (default, [`direct`]): every agent runs in this process; they share one verified
//!   subscription per PDS host (an in-process `Fanout`), or with `--separate-subscriptions`
//!   each subscribes to every host itself;
//! - `--bus [URL]` ([`bus`]): this process is a launcher. It starts the network (and a NATS
//!   server when no URL is given), runs the hub, creates the accounts, and starts each agent
//!   as a process of its own (`murmur swarm-agent`, [`agent`]) that hears the swarm through
//!   its own durable consumer of the hub's stream. The agents meet only through the PDS hosts
//!   and the bus.

pub(crate) mod agent;
mod bus;
mod direct;
mod summary;

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::Duration;

use murmur::comms::agent::comms::profile;
use murmur::comms::{Ack, Result as ResultC, Task};
use murmur::pds::Writer;
use murmur::{Job, TaskSpec, TaskStats, Worker};
use murmur_devnet::{Devnet, DevnetConfig};

/// Arguments of `murmur swarm`.
#[derive(clap::Args)]
pub struct SwarmArgs {
    /// Number of worker agents (spread over the PDS hosts).
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Number of tasks the coordinator posts.
    #[arg(long, default_value_t = 200)]
    tasks: usize,
    /// Tasks each worker claims or runs at once.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Simulated work per task, in milliseconds.
    #[arg(long, default_value_t = 50)]
    work_ms: u64,
    /// Lease per assignment, in seconds; a worker renews it with status records.
    #[arg(long, default_value_t = 5)]
    lease: u64,
    /// Kill this many workers in the middle of a task, to watch leases lapse and tasks move
    /// (with --bus: SIGKILL to their processes).
    #[arg(long, default_value_t = 0)]
    kill: usize,
    /// Kill the coordinator abruptly once a third of the tasks are done, and start it again
    /// (same identity, no local state) 2 s later: it recovers its open tasks from the repos.
    /// With --bus: SIGKILL to its process, and a new process on the same durable consumer.
    #[arg(long)]
    restart_coordinator: bool,
    /// Run each agent as its own process, hearing the swarm through a hub on NATS JetStream
    /// (verify once, fan out) instead of subscribing to every PDS host itself. With no URL a
    /// local nats-server is started; a given server must be nats-server 2.10 or newer.
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "")]
    bus: Option<String>,
    /// Direct mode: every agent subscribes to every PDS host and verifies every commit itself
    /// (one socket per agent per host), instead of all agents sharing one verified
    /// subscription per host through an in-process fan-out. For comparison.
    #[arg(long, conflicts_with = "bus")]
    separate_subscriptions: bool,
    /// Seal every task for one worker (round robin) and every result for the coordinator
    /// (agent.comms.defs#sealed, HPKE): only those two can read them; the other workers see
    /// that a task exists and leave it. The run ends with a check that no task payload or
    /// result output in the repos is readable. Direct mode; a sealed task waits for its one
    /// worker, so it does not combine with --kill.
    #[arg(long, conflicts_with_all = ["bus", "kill"])]
    sealed: bool,
    /// Print the summary as one JSON object on stdout (the human output goes to stderr).
    #[arg(long)]
    json: bool,
    /// PDS hosts to use (repeat the flag); accounts are created on them. Default: start a
    /// local network with 2 PDS hosts.
    #[arg(long = "pds", requires = "plc")]
    pds: Vec<String>,
    /// The PLC directory of those hosts.
    #[arg(long)]
    plc: Option<String>,
    /// Give up if the swarm has not finished after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

/// Runs the demo.
pub fn run(args: SwarmArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if args.workers == 0 || args.tasks == 0 {
        return Err("--workers and --tasks must be at least 1".into());
    }
    if args.kill > args.workers {
        return Err(format!(
            "--kill {} is more than the {} worker(s)",
            args.kill, args.workers
        )
        .into());
    }
    let bus_url = match args.bus.as_deref() {
        None => None,
        Some("") => Some(None),
        Some(url) => Some(Some(bus::check_url(url)?)),
    };
    // The network outlives the runtime: dropping it stops its processes.
    let (_net, hosts, plc) = if args.pds.is_empty() {
        eprintln!("starting a local network (PLC + 2 PDS hosts)...");
        let net = Devnet::start(DevnetConfig {
            pds: 2,
            ..Default::default()
        })?;
        let hosts: Vec<String> = net
            .pds_hosts()
            .iter()
            .map(|h| h.url().to_string())
            .collect();
        let plc = net.plc_url().to_string();
        (Some(net), hosts, plc)
    } else {
        let plc = args.plc.clone().ok_or("--pds needs --plc")?;
        let hosts = args.pds.iter().map(|h| h.trim_end_matches('/').to_string());
        (None, hosts.collect(), plc)
    };
    let ok = match bus_url {
        Some(url) => bus::run(&args, url, &hosts, &plc)?,
        None => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(direct::swarm(&args, &hosts, &plc))?
        }
    };
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Creates an account named after `name` on `pds` and logs in as it (local and test PDS
/// hosts accept sign-ups without an invite).
async fn account(pds: &str, name: &str) -> Result<Writer, Box<dyn std::error::Error>> {
    let account = murmur_devnet::sign_up(pds, name).await?;
    Ok(Writer::login(pds, &account.did, &account.password).await?)
}

/// The host of worker `i`: the coordinator is on the first host, workers go round them all
/// starting with the second.
fn worker_host(hosts: &[String], i: usize) -> &str {
    &hosts[(i + 1) % hosts.len()]
}

/// The demo's work: squares `n` after a simulated delay, jittered around `work_ms`.
fn square_worker(work_ms: u64, concurrency: usize) -> Worker {
    Worker::new(move |job: Job| async move {
        let ms = work_ms / 2 + fastrand::u64(..=work_ms.max(1));
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let n = job.payload_json()["n"].as_u64().unwrap_or(0);
        Ok(serde_json::json!({ "n": n, "square": n * n }))
    })
    .capabilities(["square"])
    .max_concurrent(concurrency)
}

/// A demo worker's profile.
fn worker_profile(name: &str, concurrency: usize) -> profile::RecordData {
    profile::RecordData {
        name: name.to_string(),
        description: Some("murmur swarm demo worker".into()),
        capabilities: Some(vec!["square".into()]),
        accepted_nsids: Some(vec!["agent.comms.task".into()]),
        operator: None,
        max_concurrent_tasks: i64::try_from(concurrency).ok(),
        encryption_keys: None,
        created_at: murmur::now(),
    }
}

/// The demo's tasks: square 0..total; with `sealed_for`, task `n` is sealed for worker
/// `n mod len` of them.
fn task_specs(total: usize, lease: u64, sealed_for: Vec<String>) -> impl Iterator<Item = TaskSpec> {
    (0..total).map(move |n| {
        let spec = TaskSpec::new("square")
            .title(format!("square {n}"))
            .payload(serde_json::json!({ "n": n }))
            .lease(Duration::from_secs(lease))
            .max_attempts(5);
        match sealed_for.get(n % sealed_for.len().max(1)) {
            Some(worker) => spec.sealed_for([worker.clone()]),
            None => spec,
        }
    })
}

/// Reads the repos after a sealed run: every task payload of the coordinator and every
/// result output of the workers must be a sealed object with no plaintext field in sight.
/// Returns (records checked, records whose payload is readable).
async fn plaintext_check(
    coordinator: &Writer,
    workers: &[Writer],
) -> Result<(usize, usize), murmur::pds::Error> {
    let readable = |value: Option<serde_json::Value>| {
        let Some(value) = value else {
            return false; // no payload at all: nothing to read
        };
        let sealed = value.get("$type").and_then(|t| t.as_str()) == Some(murmur::seal::SEALED_TYPE)
            && value.get("ciphertext").is_some();
        let text = value.to_string();
        !sealed
            || ["\"n\"", "\"square\"", "\"error\""]
                .iter()
                .any(|k| text.contains(k))
    };
    let mut checked = 0;
    let mut visible = 0;
    for task in list_all::<Task>(coordinator).await? {
        checked += 1;
        let payload = task
            .value
            .payload
            .as_ref()
            .and_then(|p| serde_json::to_value(p).ok());
        visible += usize::from(payload.is_none() || readable(payload));
    }
    for worker in workers {
        for result in list_all::<ResultC>(worker).await? {
            checked += 1;
            let output = result
                .value
                .output
                .as_ref()
                .and_then(|o| serde_json::to_value(o).ok());
            visible += usize::from(readable(output));
        }
    }
    Ok((checked, visible))
}

/// Waits until the coordinator sees all `workers` workers' presences (then every worker's
/// stream is up), for at most 60 s.
async fn workers_online(boss: &murmur::Agent, workers: usize) -> Result<(), String> {
    let started = std::time::Instant::now();
    loop {
        let online = boss.registry().live_with("square").len();
        if online >= workers {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "{online} of {workers} workers came online within 60 s"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Posts the demo's tasks in applyWrites batches (20 tasks per commit), in the background so
/// progress shows while tasks are still going out.
fn post_tasks(
    boss: &murmur::Agent,
    total: usize,
    lease: u64,
    sealed_for: Vec<String>,
) -> tokio::task::JoinHandle<Vec<murmur::TaskHandle>> {
    let boss = boss.clone();
    tokio::spawn(async move {
        match boss
            .request_many(task_specs(total, lease, sealed_for), 20)
            .await
        {
            Ok(handles) => handles,
            Err(err) => {
                eprintln!("posting tasks failed: {err}");
                Vec::new()
            }
        }
    })
}

/// Counters of two coordinator runs (before and after a restart) as one. Tasks done count
/// from the repo: those the restarted coordinator found closed (acks the first one wrote,
/// including any that landed as it died), plus those it closed itself.
pub(crate) fn merged(before: &TaskStats, after: &TaskStats, closed_before: u64) -> TaskStats {
    let mut s = after.clone();
    s.posted += before.posted;
    s.claimed += before.claimed;
    s.assignments += before.assignments;
    s.done += closed_before;
    s.lease_expiries += before.lease_expiries;
    s.given_up += before.given_up;
    s.duplicates += before.duplicates;
    for (did, n) in &before.done_by {
        *s.done_by.entry(did.clone()).or_default() += n;
    }
    s.latencies.extend(before.latencies.iter().copied());
    s
}

/// Every record of `C` in the coordinator's repo.
async fn list_all<C: murmur::pds::Collection>(
    writer: &Writer,
) -> Result<Vec<murmur::pds::Stored<C::Record>>, murmur::pds::Error> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = writer.list::<C>(100, cursor.as_deref(), false).await?;
        let last = page.cursor.is_none() || page.records.is_empty();
        out.extend(page.records);
        if last {
            return Ok(out);
        }
        cursor = page.cursor;
    }
}

/// Tasks in the coordinator's repo closed by an `accepted` ack naming one of their results.
async fn closed_by_ack(writer: &Writer) -> Result<usize, murmur::pds::Error> {
    let tasks: HashSet<String> = list_all::<Task>(writer)
        .await?
        .into_iter()
        .map(|t| t.rkey)
        .collect();
    let result_nsid = format!("/{}/", <ResultC as murmur::pds::Collection>::NSID);
    Ok(list_all::<Ack>(writer)
        .await?
        .into_iter()
        .filter(|a| {
            tasks.contains(&a.rkey)
                && a.value.state == "accepted"
                && a.value.subject.uri.contains(&result_nsid)
                && a.value.subject.uri.ends_with(&format!("/{}", a.rkey))
        })
        .count())
}
