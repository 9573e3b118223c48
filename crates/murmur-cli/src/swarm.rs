//! `murmur swarm`: the main demo. One coordinator and N workers on 2 PDS hosts run a batch of
//! tasks through the record-only task protocol, with live progress and an exactly-once summary.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use murmur::comms::agent::comms::profile;
use murmur::comms::{Ack, Result as ResultC, Task};
use murmur::pds::Writer;
use murmur::{Agent, Job, TaskEvent, TaskSpec, TaskStats, Worker};
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
    /// Kill this many workers in the middle of a task, to watch leases lapse and tasks move.
    #[arg(long, default_value_t = 0)]
    kill: usize,
    /// Kill the coordinator abruptly once a third of the tasks are done, and start it again
    /// (same identity, no local state) 2 s later: it recovers its open tasks from the repos.
    #[arg(long)]
    restart_coordinator: bool,
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
        (None, args.pds.clone(), plc)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let ok = runtime.block_on(swarm(&args, &hosts, &plc))?;
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Creates an account on `pds` (local and test PDS hosts accept sign-ups without an invite).
async fn account(
    http: &reqwest::Client,
    pds: &str,
    name: &str,
) -> Result<Writer, Box<dyn std::error::Error>> {
    // The PDS takes short first labels only: at most 8 letters of the name plus 6 hex digits.
    let suffix = fastrand::u32(..0x0100_0000);
    let short_name: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    let handle = format!("{short_name}{suffix:06x}.test");
    let password = format!("swarm-{:016x}", fastrand::u64(..));
    let res = http
        .post(format!("{pds}/xrpc/com.atproto.server.createAccount"))
        .json(&serde_json::json!({
            "handle": handle,
            "email": format!("{short_name}{suffix:06x}@example.test"),
            "password": password,
        }))
        .send()
        .await?;
    if !res.status().is_success() {
        let status = res.status();
        let body = res.text().await.unwrap_or_default();
        return Err(format!(
            "creating an account on {pds} failed ({status}): {body}; does this PDS allow sign-ups without an invite code?"
        )
        .into());
    }
    let body: serde_json::Value = res.json().await?;
    let did = body["did"]
        .as_str()
        .ok_or("createAccount answered without a did")?;
    Ok(Writer::login(pds, did, &password).await?)
}

/// Counters of two coordinator runs (before and after a restart) as one. Tasks done count
/// from the repo: those the restarted coordinator found closed (acks the first one wrote,
/// including any that landed as it died), plus those it closed itself.
fn merged(before: &TaskStats, after: &TaskStats, closed_before: u64) -> TaskStats {
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
    let tasks: std::collections::HashSet<String> = list_all::<Task>(writer)
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

fn short(did: &str) -> &str {
    did.strip_prefix("did:plc:")
        .map_or(did, |s| &s[..s.len().min(8)])
}

async fn swarm(
    args: &SwarmArgs,
    hosts: &[String],
    plc: &str,
) -> Result<bool, Box<dyn std::error::Error>> {
    let http = reqwest::Client::new();
    let coordinator = account(&http, &hosts[0], "coordinator").await?;
    let mut worker_writers = Vec::new();
    for i in 0..args.workers {
        let host = &hosts[(i + 1) % hosts.len()];
        worker_writers.push(account(&http, host, &format!("worker{i}")).await?);
    }
    let mut peers: Vec<String> = worker_writers.iter().map(|w| w.did().to_string()).collect();
    peers.push(coordinator.did().to_string());

    let work_ms = args.work_ms;
    let mut workers = Vec::new();
    let mut names = BTreeMap::new();
    for (i, w) in worker_writers.into_iter().enumerate() {
        let name = format!("worker{i}");
        names.insert(w.did().to_string(), (name.clone(), w.pds_url().to_string()));
        let work = Worker::new(move |job: Job| async move {
            // Simulated work: jittered around --work-ms.
            let ms = work_ms / 2 + fastrand::u64(..=work_ms.max(1));
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let n = job.payload_json()["n"].as_u64().unwrap_or(0);
            Ok(serde_json::json!({ "n": n, "square": n * n }))
        })
        .capabilities(["square"])
        .max_concurrent(args.concurrency);
        let agent = Agent::builder(w)
            .watch_all(hosts.iter().cloned())
            .plc_url(plc)
            .start_cursor(0)
            .peers(peers.clone())
            .requester(false)
            .worker(work)
            .profile(profile::RecordData {
                name: name.clone(),
                description: Some("murmur swarm demo worker".into()),
                capabilities: Some(vec!["square".into()]),
                accepted_nsids: Some(vec!["agent.comms.task".into()]),
                operator: None,
                max_concurrent_tasks: i64::try_from(args.concurrency).ok(),
                created_at: murmur::now(),
            })
            .presence_every(Duration::from_secs(5))
            .start()
            .await?;
        workers.push(agent);
    }
    let coordinator_pds = coordinator.pds_url().to_string();
    let coordinator_session = coordinator.session();
    let coordinator_writer = coordinator.clone();
    let mut boss = Agent::builder(coordinator)
        .watch_all(hosts.iter().cloned())
        .plc_url(plc)
        .start_cursor(0)
        .peers(peers.clone())
        .start()
        .await?;

    // Every worker's stream is up once the coordinator sees all their presences.
    let started = Instant::now();
    while boss.registry().live_with("square").len() < args.workers {
        if started.elapsed() > Duration::from_secs(60) {
            return Err("the workers did not come online within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "swarm: 1 coordinator on {}, {} workers on {} PDS host(s), {} tasks",
        hosts[0],
        args.workers,
        hosts.len(),
        args.tasks
    );

    // Per-worker progress from the workers' own events.
    let per_worker: Arc<std::sync::Mutex<BTreeMap<String, (u64, u64)>>> = Arc::default();
    for w in &workers {
        let mut events = w.events();
        let did = w.did().to_string();
        let per_worker = Arc::clone(&per_worker);
        tokio::spawn(async move {
            while let Ok(ev) = events.recv().await {
                let mut map = per_worker.lock().unwrap_or_else(|e| e.into_inner());
                let entry = map.entry(did.clone()).or_default();
                match ev {
                    TaskEvent::ClaimSent { .. } => entry.0 += 1,
                    TaskEvent::Finished { .. } => entry.1 += 1,
                    _ => {}
                }
            }
        });
    }

    let run_started = Instant::now();
    // Post in applyWrites batches (20 tasks per commit), in the background so progress
    // shows while tasks are still going out.
    let posters = {
        let boss = boss.clone();
        let (total, lease) = (args.tasks, args.lease);
        vec![tokio::spawn(async move {
            let specs = (0..total).map(|n| {
                TaskSpec::new("square")
                    .title(format!("square {n}"))
                    .payload(serde_json::json!({ "n": n }))
                    .lease(Duration::from_secs(lease))
                    .max_attempts(5)
            });
            match boss.request_many(specs, 20).await {
                Ok(handles) => handles,
                Err(err) => {
                    eprintln!("posting tasks failed: {err}");
                    Vec::new()
                }
            }
        })]
    };

    // Kill workers in the middle of a task.
    let mut killed = Vec::new();
    for w in workers.iter().take(args.kill) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while w.active_tasks() == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        w.kill();
        killed.push(w.did().to_string());
        println!(
            "killed {} with {} task(s) in hand",
            names[w.did()].0,
            1.max(w.active_tasks())
        );
    }

    let deadline = Duration::from_secs(args.timeout);
    let mut posting = None;
    let mut last = String::new();
    // The first coordinator, once it has been killed: results it was accepting when it
    // died still count (their acks landed), so its counters are read to the end.
    let mut before: Option<Agent> = None;
    let mut closed_before = 0;
    loop {
        let s = match &before {
            Some(b) => merged(&b.task_stats(), &boss.task_stats(), closed_before),
            None => boss.task_stats(),
        };
        if args.restart_coordinator
            && before.is_none()
            && s.posted >= args.tasks as u64
            && s.done * 3 >= args.tasks as u64
        {
            boss.kill();
            before = Some(boss.clone());
            println!(
                "killed the coordinator with {} of {} tasks done; restarting it in 2 s",
                s.done, args.tasks
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
            // Same identity, its saved session, no local state, live stream only.
            let writer = Writer::builder(coordinator_pds.as_str())
                .with_session(coordinator_session.clone())?;
            boss = Agent::builder(writer)
                .watch_all(hosts.iter().cloned())
                .plc_url(plc)
                .peers(peers.clone())
                .start()
                .await?;
            if let Some(r) = boss.recovery() {
                closed_before = (args.tasks as u64).saturating_sub(r.open as u64);
                println!(
                    "coordinator restarted: {} open task(s) recovered in {} ms ({} done while \
                     it was away, {} still assigned, {} to assign from {} claim(s) in the repos)",
                    r.open,
                    r.elapsed.as_millis(),
                    r.done_while_away,
                    r.assigned,
                    r.unassigned,
                    r.claims_found
                );
            }
            continue;
        }
        let line = format!(
            "[{:>5.1}s] posted {}/{}  claimed {}  done {}  reassigned {}  duplicates {}",
            run_started.elapsed().as_secs_f64(),
            s.posted,
            args.tasks,
            s.claimed,
            s.done,
            s.lease_expiries,
            s.duplicates
        );
        if line != last {
            let map = per_worker.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let per: Vec<String> = names
                .iter()
                .map(|(did, (name, _))| {
                    let (_, done) = map.get(did).copied().unwrap_or_default();
                    let dead = if killed.contains(did) { "†" } else { "" };
                    format!("{}{dead}:{done}", name.trim_start_matches("worker"))
                })
                .collect();
            println!("{line}  | per worker {}", per.join(" "));
            last = line;
        }
        if s.posted >= args.tasks as u64 && posting.is_none() {
            posting = Some(run_started.elapsed());
        }
        if s.done + s.given_up >= args.tasks as u64 {
            break;
        }
        if run_started.elapsed() > deadline {
            println!("timed out after {} s", args.timeout);
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let elapsed = run_started.elapsed();
    // Give late duplicates a moment to show up before counting.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let s = match &before {
        Some(b) => merged(&b.task_stats(), &boss.task_stats(), closed_before),
        None => boss.task_stats(),
    };
    let closed = closed_by_ack(&coordinator_writer).await?;
    for p in posters {
        p.abort();
    }

    let lost = args.tasks as u64 - s.done.min(args.tasks as u64);
    let ms = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{} ms", d.as_millis()));
    println!();
    println!("summary");
    println!(
        "  tasks done   {} / {}  in {:.1} s ({:.1} tasks/s; posting took {:.1} s)",
        s.done,
        args.tasks,
        elapsed.as_secs_f64(),
        s.done as f64 / elapsed.as_secs_f64(),
        posting.unwrap_or(elapsed).as_secs_f64()
    );
    println!("  lost         {lost}");
    println!(
        "  closed in the repo by an accepted ack  {closed} / {}",
        args.tasks
    );
    println!("  duplicates   {}", s.duplicates);
    println!(
        "  assignments  {} ({} lease(s) lapsed and reassigned, {} given up)",
        s.assignments, s.lease_expiries, s.given_up
    );
    println!(
        "  claim-to-result latency  p50 {}  p99 {}",
        ms(s.latency_quantile(0.5)),
        ms(s.latency_quantile(0.99))
    );
    println!("  per worker");
    for (did, (name, host)) in &names {
        let done = s.done_by.get(did).copied().unwrap_or(0);
        let dead = if killed.contains(did) {
            " (killed)"
        } else {
            ""
        };
        println!(
            "    {name:<9} {:<10} on {host}  done {done}{dead}",
            short(did)
        );
    }
    for w in workers
        .iter()
        .filter(|w| !killed.contains(&w.did().to_string()))
    {
        w.shutdown().await;
    }
    boss.shutdown().await;
    Ok(lost == 0 && s.duplicates == 0 && closed == args.tasks)
}
