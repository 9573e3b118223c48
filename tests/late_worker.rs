//! Workers that join after the tasks were posted, against the real local network (2 PDS
//! hosts): they learn the tasks from the agent's backfill (copies of the peers' repos), not
//! from a replayed stream, claim the open ones and none that are closed or assigned.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use murmur::comms::{Ack, Claim, Result as ResultC, Task};
use murmur::pds::Writer;
use murmur::{Agent, Job, TaskSpec, Worker};
use murmur_devnet::Devnet;
use murmur_e2e::{hosts, list_all, shared, writer};

/// An agent hearing only `peers`, from the live stream on (no replay): what was written
/// before it started reaches it only through the backfill.
fn agent(net: &Devnet, writer: Writer, peers: &[String]) -> murmur::AgentBuilder {
    Agent::builder(writer)
        .watch_all(hosts(net))
        .plc_url(net.plc_url())
        .peers(peers.to_vec())
}

fn sleeper(ms: u64) -> Worker {
    Worker::new(move |job: Job| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(serde_json::json!({ "n": job.payload_json()["n"] }))
    })
    .capabilities(["sleep", "hang"])
}

/// For the tasks `keys` of `boss`: each closed by one accepted ack naming its one result
/// (across `workers`), and no claim by the workers made after the task was closed. Returns
/// the claims per worker (task at-uris).
async fn check_repos(
    boss: &Writer,
    keys: &[String],
    workers: &[&Writer],
) -> HashMap<String, Vec<String>> {
    let acks: HashMap<String, _> = list_all::<Ack>(boss)
        .await
        .into_iter()
        .filter(|a| keys.contains(&a.rkey))
        .map(|a| (a.rkey.clone(), a.value))
        .collect();
    let mut results: HashMap<String, Vec<String>> = HashMap::new();
    let mut claims = HashMap::new();
    for w in workers {
        for r in list_all::<ResultC>(w).await {
            results.entry(r.rkey.clone()).or_default().push(r.uri);
        }
        let mut mine = Vec::new();
        for c in list_all::<Claim>(w).await {
            let key = c.value.task.uri.rsplit('/').next().unwrap().to_string();
            if let Some(ack) = acks.get(&key) {
                // Both written by murmur: RFC 3339, UTC, milliseconds (they sort as text).
                assert!(
                    c.value.created_at <= ack.created_at,
                    "{} claimed task {key} at {} after it was closed at {}",
                    w.did(),
                    c.value.created_at,
                    ack.created_at
                );
            }
            mine.push(c.value.task.uri.clone());
        }
        claims.insert(w.did().to_string(), mine);
    }
    for key in keys {
        let found = results.get(key).cloned().unwrap_or_default();
        assert_eq!(found.len(), 1, "task {key}: one result, not {found:?}");
        let ack = acks
            .get(key)
            .unwrap_or_else(|| panic!("task {key} not closed"));
        assert_eq!(ack.state, "accepted", "task {key}");
        assert_eq!(ack.subject.uri, found[0], "task {key} accepted its result");
    }
    claims
}

fn rkeys(uris: &[String]) -> Vec<String> {
    uris.iter()
        .map(|u| u.rsplit('/').next().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_started_after_fifty_tasks_were_posted_complete_them_all_once() {
    const TASKS: usize = 50;
    let net = shared().await;
    let boss_w = writer(net, 0, "late-boss").await;
    let w1 = writer(net, 0, "late-1").await;
    let w2 = writer(net, 1, "late-2").await;
    let dids: Vec<String> = [&boss_w, &w1, &w2]
        .iter()
        .map(|w| w.did().to_string())
        .collect();
    let boss = agent(net, boss_w.clone(), &dids).start().await.unwrap();
    let specs = (0..TASKS).map(|n| {
        TaskSpec::new("sleep")
            .payload(serde_json::json!({ "n": n }))
            .lease(Duration::from_secs(20))
            .max_attempts(3)
    });
    let handles = boss.request_many(specs, 25).await.unwrap();
    let uris: Vec<String> = handles.iter().map(|h| h.uri.clone()).collect();
    assert_eq!(list_all::<Task>(&boss_w).await.len(), TASKS);

    // Nobody works yet; the stream moves on past the tasks.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in [&w1, &w2] {
        workers.push(
            agent(net, w.clone(), &dids)
                .requester(false)
                .worker(sleeper(50).max_concurrent(4))
                .start()
                .await
                .unwrap(),
        );
    }
    let mut outputs = HashSet::new();
    for h in handles {
        let result = h.await_result(Duration::from_secs(120)).await.unwrap();
        assert_eq!(result.record.outcome, "success");
        outputs.insert(result.output_json()["n"].as_u64().unwrap());
    }
    eprintln!(
        "{TASKS} tasks done {:?} after the workers started",
        started.elapsed()
    );
    assert_eq!(outputs.len(), TASKS);
    for w in &workers {
        let copied = w.metrics().backfill();
        eprintln!("{}: {copied:?}", w.did());
        assert!(
            copied.records >= TASKS as u64,
            "the tasks came from the copy"
        );
    }
    // Every result reached the requester (none left uncounted), then the repos agree.
    let deadline = Instant::now() + Duration::from_secs(20);
    let stats = loop {
        let mut written = 0;
        for w in [&w1, &w2] {
            written += list_all::<ResultC>(w).await.len() as u64;
        }
        let stats = boss.task_stats();
        if stats.done + stats.duplicates >= written {
            break stats;
        }
        assert!(Instant::now() < deadline, "{written} results, {stats:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("{stats:?}");
    assert_eq!(stats.done, TASKS as u64);
    assert_eq!(stats.duplicates, 0);
    let claims = check_repos(&boss_w, &rkeys(&uris), &[&w1, &w2]).await;
    for (worker, claimed) in &claims {
        eprintln!("{worker} claimed {} tasks", claimed.len());
    }
    assert!(
        claims.values().all(|c| !c.is_empty()),
        "both workers took part: {claims:?}"
    );
    for w in workers.iter().chain([&boss]) {
        w.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_after_others_finished_tasks_claims_none_of_the_closed_ones() {
    let net = shared().await;
    let boss_w = writer(net, 0, "late-boss2").await;
    let early_w = writer(net, 1, "early").await;
    let late_w = writer(net, 0, "latecomer").await;
    let dids: Vec<String> = [&boss_w, &early_w, &late_w]
        .iter()
        .map(|w| w.did().to_string())
        .collect();
    let boss = agent(net, boss_w.clone(), &dids).start().await.unwrap();

    // The early worker finishes ten tasks, then takes one that never ends, and dies.
    let hanging = Arc::new(AtomicBool::new(false));
    let early_work = {
        let hanging = Arc::clone(&hanging);
        Worker::new(move |job: Job| {
            let hanging = Arc::clone(&hanging);
            async move {
                if job.task.task_type == "hang" {
                    hanging.store(true, Ordering::SeqCst);
                    std::future::pending::<()>().await;
                }
                Ok(serde_json::json!({ "n": job.payload_json()["n"] }))
            }
        })
        .capabilities(["sleep", "hang"])
        .max_concurrent(4)
    };
    let early = agent(net, early_w.clone(), &dids)
        .requester(false)
        .worker(early_work)
        .start()
        .await
        .unwrap();
    let specs = (0..10).map(|n| {
        TaskSpec::new("sleep")
            .payload(serde_json::json!({ "n": n }))
            .lease(Duration::from_secs(20))
    });
    let first = boss.request_many(specs, 10).await.unwrap();
    let closed: Vec<String> = first.iter().map(|h| h.uri.clone()).collect();
    for h in first {
        h.await_result(Duration::from_secs(60)).await.unwrap();
    }
    // Assigned to the early worker with a lease that outlasts the test.
    let held = boss
        .request(TaskSpec::new("hang").lease(Duration::from_secs(300)))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !hanging.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the hanging task never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    early.kill();
    let specs = (10..15).map(|n| {
        TaskSpec::new("sleep")
            .payload(serde_json::json!({ "n": n }))
            .lease(Duration::from_secs(20))
    });
    let open = boss.request_many(specs, 5).await.unwrap();
    let open_uris: Vec<String> = open.iter().map(|h| h.uri.clone()).collect();

    let late = agent(net, late_w.clone(), &dids)
        .requester(false)
        .worker(sleeper(50).max_concurrent(4))
        .start()
        .await
        .unwrap();
    for h in open {
        let result = h.await_result(Duration::from_secs(60)).await.unwrap();
        assert_eq!(result.worker, late.did(), "the late worker answered");
    }
    assert!(late.metrics().backfill().records > 0);
    // Give a wrong claim time to be written, then read the repos.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all: Vec<String> = closed.iter().chain(&open_uris).cloned().collect();
    let claims = check_repos(&boss_w, &rkeys(&all), &[&early_w, &late_w]).await;
    let late_claims: HashSet<&String> = claims[late.did()].iter().collect();
    assert_eq!(
        late_claims.len(),
        claims[late.did()].len(),
        "no task claimed twice"
    );
    for uri in &closed {
        assert!(
            !late_claims.contains(uri),
            "the late worker claimed {uri}, closed"
        );
    }
    assert!(
        !late_claims.contains(&held.uri),
        "the late worker claimed the task assigned to the early one"
    );
    let expected: HashSet<&String> = open_uris.iter().collect();
    assert_eq!(
        late_claims, expected,
        "it claimed the open tasks, once each"
    );
    let stats = boss.task_stats();
    eprintln!("{stats:?}");
    assert_eq!(stats.duplicates, 0);
    late.shutdown().await;
    boss.shutdown().await;
}
