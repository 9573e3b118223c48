//! Direct mode: every agent in this process. By default they share one verified subscription
//! per PDS host: a [`Fanout`] reads and verifies each commit once and hands its ops to every
//! agent's watcher. With `--separate-subscriptions` each agent subscribes to every host and
//! verifies every commit itself (what the benchmark compares against).

use std::time::{Duration, Instant};

use murmur::firehose::{Fanout, FanoutSubscriber};
use murmur::pds::Writer;
use murmur::seal::{KeyPair, Keyring};
use murmur::{Agent, AgentBuilder};

use super::summary::{Outcome, Report, count, worker_event};
use super::{
    SwarmArgs, account, closed_by_ack, merged, plaintext_check, post_tasks, square_worker,
    worker_host, worker_profile, workers_online,
};

/// With `--sealed`, an agent has encryption keys (its profile publishes the public half).
fn keys(agent: AgentBuilder, ring: Option<&Keyring>) -> AgentBuilder {
    match ring {
        Some(ring) => agent.keyring(ring.clone()),
        None => agent,
    }
}

/// A fresh key pair for `did` with `--sealed`.
fn new_ring(sealed: bool, did: &str) -> Result<Option<Keyring>, murmur::seal::Error> {
    if !sealed {
        return Ok(None);
    }
    Ok(Some(Keyring::from_keys(did, vec![KeyPair::generate()?])?))
}

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

    let fanout = if args.separate_subscriptions {
        report.subscriptions("separate");
        None
    } else {
        report.subscriptions("shared");
        let mut upstream = Fanout::builder()
            .plc_url(plc)
            .start_cursor(0)
            .dids(peers.iter().cloned())
            .collections(["agent.comms.*"]);
        for host in hosts {
            upstream = upstream.pds(host);
        }
        Some(upstream.build()?)
    };
    // Every agent's subscriber exists before the upstream starts, so each hears the whole
    // stream (the upstream waits for the agents not started yet; none waits on the stream to
    // start).
    let mut worker_feeds: Vec<Option<FanoutSubscriber>> = (0..args.workers)
        .map(|i| fanout.as_ref().map(|f| f.subscriber(&format!("worker{i}"))))
        .collect();
    let boss_feed = fanout.as_ref().map(|f| f.subscriber("coordinator"));
    let upstream = fanout.clone().map(|f| {
        tokio::spawn(async move {
            if let Err(err) = f.run().await {
                eprintln!("the shared subscription stopped: {err}");
            }
        })
    });

    let mut workers = Vec::new();
    let kept_writers = worker_writers.clone();
    for (i, w) in worker_writers.into_iter().enumerate() {
        let name = format!("worker{i}");
        report.add_worker(w.did(), &name, w.pds_url());
        let ring = new_ring(args.sealed, w.did())?;
        let agent = keys(
            hear(Agent::builder(w), hosts, worker_feeds[i].take()),
            ring.as_ref(),
        )
        .plc_url(plc)
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
    let boss_ring = new_ring(args.sealed, coordinator.did())?;
    let mut boss = keys(
        hear(Agent::builder(coordinator), hosts, boss_feed),
        boss_ring.as_ref(),
    )
    .plc_url(plc)
    .peers(peers.clone())
    .start()
    .await?;

    workers_online(&boss, args.workers).await?;
    report.say(format_args!(
        "swarm: 1 coordinator on {}, {} workers on {} PDS host(s), {} tasks; {}",
        hosts[0],
        args.workers,
        hosts.len(),
        args.tasks,
        if fanout.is_some() {
            "the agents share one verified subscription per host"
        } else {
            "each agent subscribes to every host itself"
        }
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
    if args.sealed {
        report.say("sealed: each task sealed for one worker (round robin) and the coordinator; each result for the coordinator");
    }
    let sealed_for: Vec<String> = if args.sealed {
        workers.iter().map(|w| w.did().to_string()).collect()
    } else {
        Vec::new()
    };
    let posters = vec![post_tasks(&boss, args.tasks, args.lease, sealed_for)];

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
            // Live stream only: it joins the shared subscription where that is now.
            let mut restarted = keys(
                Agent::builder(writer).watch_all(hosts.iter().cloned()),
                boss_ring.as_ref(),
            );
            if let Some(f) = &fanout {
                restarted = restarted.feed(f.subscriber("coordinator-restarted"));
            }
            boss = restarted.plc_url(plc).peers(peers.clone()).start().await?;
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
    if args.sealed {
        let (checked, visible) = plaintext_check(&coordinator_writer, &kept_writers).await?;
        report.sealed(checked, visible);
    }
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
    if let (Some(fanout), Some(upstream)) = (&fanout, upstream) {
        fanout.shutdown();
        let _ = upstream.await;
    }
    Ok(ok)
}

/// How an agent hears the swarm: through its subscriber of the shared subscription, or
/// (without one) by subscribing to every host itself from the start of the streams. The
/// hosts are where it reads repos either way.
fn hear(agent: AgentBuilder, hosts: &[String], feed: Option<FanoutSubscriber>) -> AgentBuilder {
    let agent = agent.watch_all(hosts.iter().cloned());
    match feed {
        Some(feed) => agent.feed(feed),
        None => agent.start_cursor(0),
    }
}

/// A duration in whole milliseconds.
pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
