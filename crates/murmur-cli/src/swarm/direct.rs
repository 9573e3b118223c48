//! Direct mode: every agent in this process, each subscribed to every PDS host itself.

use std::time::{Duration, Instant};

use murmur::Agent;
use murmur::pds::Writer;

use super::summary::{Outcome, Report, count, worker_event};
use super::{
    SwarmArgs, account, closed_by_ack, merged, post_tasks, square_worker, worker_host,
    worker_profile, workers_online,
};

/// Runs the swarm in this process; true when nothing was lost or duplicated and every task
/// was closed by an accepted ack.
pub(super) async fn swarm(
    args: &SwarmArgs,
    hosts: &[String],
    plc: &str,
) -> Result<bool, Box<dyn std::error::Error>> {
    let mut report = Report::new("direct", args.tasks, args.json);
    let coordinator = account(&hosts[0], "coordinator").await?;
    let mut worker_writers = Vec::new();
    for i in 0..args.workers {
        worker_writers.push(account(worker_host(hosts, i), &format!("worker{i}")).await?);
    }
    let mut peers: Vec<String> = worker_writers.iter().map(|w| w.did().to_string()).collect();
    peers.push(coordinator.did().to_string());

    let mut workers = Vec::new();
    for (i, w) in worker_writers.into_iter().enumerate() {
        let name = format!("worker{i}");
        report.add_worker(w.did(), &name, w.pds_url());
        let agent = Agent::builder(w)
            .watch_all(hosts.iter().cloned())
            .plc_url(plc)
            .start_cursor(0)
            .peers(peers.clone())
            .requester(false)
            .worker(square_worker(args.work_ms, args.concurrency))
            .profile(worker_profile(&name, args.concurrency))
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

    workers_online(&boss, args.workers).await?;
    report.say(format_args!(
        "swarm: 1 coordinator on {}, {} workers on {} PDS host(s), {} tasks",
        hosts[0],
        args.workers,
        hosts.len(),
        args.tasks
    ));

    // Per-worker progress from the workers' own events.
    for w in &workers {
        let mut events = w.events();
        let did = w.did().to_string();
        let per_worker = report.per_worker();
        tokio::spawn(async move {
            while let Ok(ev) = events.recv().await {
                if let Some((event, _)) = worker_event(&ev) {
                    count(&per_worker, &did, event);
                }
            }
        });
    }

    let run_started = Instant::now();
    let posters = vec![post_tasks(&boss, args.tasks, args.lease)];

    // Kill workers in the middle of a task.
    let mut killed = Vec::new();
    for w in workers.iter().take(args.kill) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while w.active_tasks() == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let in_hand = w.active_tasks();
        w.kill();
        killed.push(w.did().to_string());
        report.killed(w.did(), in_hand);
    }

    let deadline = Duration::from_secs(args.timeout);
    let mut posting = None;
    let mut timed_out = false;
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
            report.say(format_args!(
                "killed the coordinator with {} of {} tasks done; restarting it in 2 s",
                s.done, args.tasks
            ));
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
                report.say(format_args!(
                    "coordinator restarted: {} open task(s) recovered in {} ms ({} done while \
                     it was away, {} still assigned, {} to assign from {} claim(s) in the repos)",
                    r.open,
                    r.elapsed.as_millis(),
                    r.done_while_away,
                    r.assigned,
                    r.unassigned,
                    r.claims_found
                ));
            }
            continue;
        }
        report.progress(&s, run_started.elapsed());
        if s.posted >= args.tasks as u64 && posting.is_none() {
            posting = Some(run_started.elapsed());
        }
        if s.done + s.given_up >= args.tasks as u64 {
            break;
        }
        if run_started.elapsed() > deadline {
            timed_out = true;
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
    let ok = report.summary(&Outcome {
        stats: (&s).into(),
        closed,
        elapsed_ms: millis(elapsed),
        posting_ms: posting.map(millis),
        timed_out,
    });
    for w in workers
        .iter()
        .filter(|w| !killed.contains(&w.did().to_string()))
    {
        w.shutdown().await;
    }
    boss.shutdown().await;
    Ok(ok)
}

/// A duration in whole milliseconds.
pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
