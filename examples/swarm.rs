//! A task swarm: one coordinator and N workers on 2 PDS hosts, coordinating through records
//! alone (task, claim, assignment, status, result). One worker is killed mid-task; its lease
//! lapses and the task moves to another worker. Every task is done exactly once.
//!
//! ```sh
//! cargo run --example swarm                              # local network, 4 workers, 40 tasks
//! cargo run --example swarm -- PDS_A PDS_B PLC_URL       # existing hosts (sign-ups open)
//! ```
//! The full demo with live progress is `cargo run -p murmur-cli -- swarm`.

use std::error::Error;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use murmur::comms::Claim;
use murmur::{Author, Created, HandlerError, Job, State, TaskSpec, Worker, handler};

mod support;
use support::Network;

const WORKERS: usize = 4;
const TASKS: usize = 40;

fn main() -> ExitCode {
    support::run(2, swarm)
}

async fn swarm(net: &Network) -> Result<(), Box<dyn Error>> {
    let boss_w = net.account(0, "coordinator").await?;
    let mut worker_ws = Vec::new();
    for i in 0..WORKERS {
        worker_ws.push(net.account(i, &format!("worker{i}")).await?);
    }
    let mut peers: Vec<String> = worker_ws.iter().map(|w| w.did().to_string()).collect();
    peers.push(boss_w.did().to_string());

    let mut workers = Vec::new();
    for w in worker_ws {
        let work = Worker::new(|job: Job| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let n = job.payload_json()["n"].as_u64().unwrap_or(0);
            Ok(serde_json::json!({ "square": n * n }))
        })
        .capabilities(["square"]);
        workers.push(
            net.agent(w, &peers)
                .requester(false)
                .worker(work)
                .presence_every(Duration::from_secs(5))
                .start()
                .await?,
        );
    }
    let claims = Claims::default();
    let boss = net
        .agent(boss_w, &peers)
        .state(claims.clone())
        .handler(count_claim)
        .start()
        .await?;
    while boss.registry().live().len() < WORKERS {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let started = Instant::now();
    let mut handles = Vec::new();
    for n in 0..TASKS {
        let spec = TaskSpec::new("square")
            .payload(serde_json::json!({ "n": n }))
            .lease(Duration::from_secs(2));
        handles.push((n, boss.request(spec).await?));
    }
    // Kill worker 0 as soon as it is in the middle of a task.
    while workers[0].active_tasks() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    workers[0].kill();
    println!("killed {} mid-task", workers[0].did());

    for (n, h) in handles {
        let r = h.await_result(Duration::from_secs(60)).await?;
        if r.output_json()["square"] != serde_json::json!(n * n) {
            return Err(format!("task {n}: wrong result {}", r.output_json()).into());
        }
    }
    let s = boss.task_stats();
    println!(
        "{} tasks done in {:.1} s by {} workers; {} lease(s) lapsed and reassigned; duplicates {}",
        s.done,
        started.elapsed().as_secs_f64(),
        s.done_by.len(),
        s.lease_expiries,
        s.duplicates
    );
    for (did, n) in &s.done_by {
        println!("  {did}: {n}");
    }
    println!(
        "{} claims seen by the coordinator's own handler",
        claims.0.load(Ordering::Relaxed)
    );
    if s.done != TASKS as u64 {
        return Err(format!("{} of {TASKS} tasks done", s.done).into());
    }
    Ok(())
}

/// How many claims the coordinator's stream carried (one handler beside the task protocol's).
#[derive(Clone, Default)]
struct Claims(Arc<AtomicUsize>);

/// Runs for every claim any worker posts, next to the Agent's own claim handling.
#[handler]
async fn count_claim(
    _claim: Created<Claim>,
    _worker: Author,
    State(claims): State<Claims>,
) -> Result<(), HandlerError> {
    claims.0.fetch_add(1, Ordering::Relaxed);
    Ok(())
}
