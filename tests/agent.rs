//! The Agent runtime and the task protocol against the real local network (2 PDS hosts):
//! a worker killed mid-task, two workers racing for one task, a request nobody answers, a
//! requester that dies and recovers its open tasks from the repos, a claim policy, update
//! and delete handlers.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use murmur::comms::{Ack, Assignment, Claim, Message, Result as ResultC, Task};
use murmur::pds::Writer;
use murmur::{
    Agent, AgentError, ClaimContext, ClaimOffer, Created, Deleted, Job, OpEvent, TaskEvent,
    TaskSpec, Updated, Worker,
};
use murmur_devnet::Devnet;
use murmur_e2e::{hosts, list_all, shared, writer};

/// An agent on the shared network that hears only `peers`, replaying from the start so
/// nothing written before its stream connected is missed.
fn agent(net: &Devnet, writer: Writer, peers: &[String]) -> murmur::AgentBuilder {
    Agent::builder(writer)
        .watch_all(hosts(net))
        .plc_url(net.plc_url())
        .start_cursor(0)
        .peers(peers.to_vec())
}

fn sleeper(ms: u64) -> Worker {
    Worker::new(move |job: Job| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(serde_json::json!({ "n": job.payload_json()["n"] }))
    })
    .capabilities(["sleep"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_mid_task_lease_expires_and_every_task_finishes_once() {
    let net = shared().await;
    let boss = writer(net, 0, "boss").await;
    let w_fast = writer(net, 0, "wfast").await;
    let w_slow = writer(net, 1, "wslow").await;
    let w_doomed = writer(net, 1, "wdoomed").await;
    let w_painter = writer(net, 0, "wpainter").await;
    let dids: Vec<String> = [&boss, &w_fast, &w_slow, &w_doomed, &w_painter]
        .iter()
        .map(|w| w.did().to_string())
        .collect();

    // The doomed worker hangs on its first job and is killed once it has started it.
    let started = Arc::new(AtomicBool::new(false));
    let doomed_work = {
        let started = Arc::clone(&started);
        Worker::new(move |_job: Job| {
            let started = Arc::clone(&started);
            async move {
                started.store(true, Ordering::SeqCst);
                std::future::pending::<()>().await;
                Ok(serde_json::Value::Null)
            }
        })
        .capabilities(["sleep"])
    };
    let doomed = agent(net, w_doomed.clone(), &dids)
        .requester(false)
        .worker(doomed_work)
        .start()
        .await
        .unwrap();
    let fast = agent(net, w_fast.clone(), &dids)
        .requester(false)
        .worker(sleeper(100).max_concurrent(2))
        .start()
        .await
        .unwrap();
    let slow = agent(net, w_slow.clone(), &dids)
        .requester(false)
        .worker(sleeper(300))
        .start()
        .await
        .unwrap();
    // A bystander that takes another type of task: a withdrawn assignment must not
    // reopen a `sleep` task for it.
    let painter = agent(net, w_painter.clone(), &dids)
        .requester(false)
        .worker(
            Worker::new(|_job: Job| async move { Ok(serde_json::Value::Null) })
                .capabilities(["paint"]),
        )
        .start()
        .await
        .unwrap();
    // The doomed worker's claims win when they are among a task's claims (gathered for
    // 300 ms), so it surely gets a task however the claim races go; then first come.
    let doomed_did = doomed.did().to_string();
    let boss = agent(net, boss, &dids)
        .claim_window(Duration::from_millis(300))
        .claim_policy(move |_: &ClaimContext<'_>, offers: &[ClaimOffer]| {
            offers
                .iter()
                .position(|o| o.worker == doomed_did)
                .or((!offers.is_empty()).then_some(0))
        })
        .start()
        .await
        .unwrap();

    // Posted in applyWrites batches of 5 tasks per commit.
    let specs = (0..12).map(|n| {
        TaskSpec::new("sleep")
            .payload(serde_json::json!({ "n": n }))
            .lease(Duration::from_secs(2))
            .max_attempts(3)
    });
    let handles = boss.request_many(specs, 5).await.unwrap();
    assert_eq!(handles.len(), 12);
    let killer = {
        let started = Arc::clone(&started);
        let doomed = doomed.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while !started.load(Ordering::SeqCst) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            doomed.kill();
        })
    };
    let mut outputs = HashMap::new();
    for h in handles {
        let uri = h.uri.clone();
        let result = h.await_result(Duration::from_secs(60)).await.unwrap();
        assert_eq!(result.record.outcome, "success");
        outputs.insert(uri, result.output_json()["n"].clone());
    }
    killer.await.unwrap();
    assert!(
        started.load(Ordering::SeqCst),
        "the doomed worker never got a task"
    );
    // A duplicate in a worker's repo cannot go uncounted: wait until every result there
    // has reached the requester.
    every_result_counted(&boss, &[&w_fast, &w_slow, &w_doomed], 0).await;
    let stats = boss.task_stats();
    eprintln!("{stats:?}");
    assert_eq!(outputs.len(), 12);
    assert_eq!(stats.done, 12, "every task done");
    assert_eq!(stats.duplicates, 0, "no task done twice");
    assert!(
        stats.lease_expiries >= 1,
        "the killed worker's lease lapsed"
    );
    assert!(
        !stats.done_by.contains_key(doomed.did()),
        "the killed worker finished nothing"
    );
    let painter_claims = w_painter.list::<Claim>(100, None, false).await.unwrap();
    assert!(
        painter_claims.records.is_empty(),
        "a worker claimed tasks of a type it does not take after an assignment was withdrawn"
    );

    // In the repos: one result per task in total, across the workers.
    let mut results_per_task: HashMap<String, usize> = HashMap::new();
    for w in [&w_fast, &w_slow, &w_doomed] {
        let page = w.list::<ResultC>(100, None, false).await.unwrap();
        for r in page.records {
            *results_per_task
                .entry(r.value.task.uri.clone())
                .or_default() += 1;
        }
    }
    assert_eq!(results_per_task.len(), 12);
    assert!(
        results_per_task.values().all(|&n| n == 1),
        "{results_per_task:?}"
    );
    for a in [&boss, &fast, &slow, &painter] {
        a.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_racing_for_one_task_get_exactly_one_assignment() {
    let net = shared().await;
    let boss = writer(net, 1, "rboss").await;
    let wa = writer(net, 0, "racer-a").await;
    let wb = writer(net, 1, "racer-b").await;
    let dids: Vec<String> = [&boss, &wa, &wb]
        .iter()
        .map(|w| w.did().to_string())
        .collect();
    let a = agent(net, wa.clone(), &dids)
        .requester(false)
        .worker(sleeper(200))
        .start()
        .await
        .unwrap();
    let b = agent(net, wb.clone(), &dids)
        .requester(false)
        .worker(sleeper(200))
        .start()
        .await
        .unwrap();
    let events_a = a.events();
    let mut events_b = b.events();
    let boss_agent = agent(net, boss.clone(), &dids).start().await.unwrap();
    // Both workers are connected once each has seen the other's profile-less presence.
    for w in [&a, &b] {
        w.publish_presence("online", Duration::from_secs(60))
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while boss_agent.registry().live().len() < 2 {
        assert!(Instant::now() < deadline, "workers never showed up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let handle = boss_agent
        .request(TaskSpec::new("sleep").payload(serde_json::json!({ "n": 7 })))
        .await
        .unwrap();
    let task_uri = handle.uri.clone();
    let rkey = handle.rkey.clone();
    let result = handle.await_result(Duration::from_secs(30)).await.unwrap();

    // Exactly one assignment exists, naming one of them; that one answered.
    let assignments = boss
        .list::<Assignment>(100, None, false)
        .await
        .unwrap()
        .records;
    assert_eq!(assignments.len(), 1, "exactly one assignment");
    assert_eq!(assignments[0].rkey, rkey, "at the task's record key");
    let winner = assignments[0].value.worker.clone();
    assert_eq!(result.worker, winner);
    let (loser, loser_writer, mut loser_events) = if winner == a.did() {
        (&b, &wb, events_b)
    } else {
        events_b = events_a;
        (&a, &wa, events_b)
    };
    // The loser claimed too, then saw the assignment and stood down without starting.
    let (mut claimed, mut stood_down) = (false, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !(claimed && stood_down) {
        let ev = tokio::time::timeout_at(deadline, loser_events.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the loser {}: claimed {claimed}, stood down {stood_down}",
                    loser.did()
                )
            })
            .unwrap();
        assert!(
            !matches!(ev, TaskEvent::Started { .. }),
            "the loser started: {ev:?}"
        );
        claimed |= ev
            == TaskEvent::ClaimSent {
                task: task_uri.clone(),
            };
        stood_down |= ev
            == TaskEvent::StoodDown {
                task: task_uri.clone(),
                winner: winner.clone(),
            };
    }
    while let Ok(ev) = loser_events.try_recv() {
        assert!(
            !matches!(ev, TaskEvent::Started { .. }),
            "the loser started: {ev:?}"
        );
    }
    let claims_a = wa.list::<Claim>(100, None, false).await.unwrap().records;
    let claims_b = wb.list::<Claim>(100, None, false).await.unwrap().records;
    assert_eq!(claims_a.len(), 1, "worker a claimed");
    assert_eq!(claims_b.len(), 1, "worker b claimed");
    assert!(
        loser_writer
            .list::<ResultC>(100, None, false)
            .await
            .unwrap()
            .records
            .is_empty(),
        "the loser wrote no result"
    );
    assert_eq!(boss_agent.task_stats().assignments, 1);
    for x in [&a, &b, &boss_agent] {
        x.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_nobody_answers_times_out_with_a_typed_error() {
    let net = shared().await;
    let lonely = writer(net, 0, "lonely").await;
    let dids = vec![lonely.did().to_string()];
    let agent = agent(net, lonely, &dids).start().await.unwrap();
    let handle = agent
        .request(TaskSpec::new("nobody-does-this"))
        .await
        .unwrap();
    let uri = handle.uri.clone();
    let started = Instant::now();
    let err = handle
        .await_result(Duration::from_millis(1500))
        .await
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(1500));
    match &err {
        AgentError::Timeout {
            task,
            waited,
            state,
        } => {
            assert_eq!(task, &uri);
            assert_eq!(*waited, Duration::from_millis(1500));
            assert!(state.contains("nobody claimed"), "{state}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(err.to_string().contains("start a worker"), "{err}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_attempts_bounds_reassignment_then_the_request_fails_typed() {
    let net = shared().await;
    let boss = writer(net, 0, "mboss").await;
    let boss_w = boss.clone();
    let wa = writer(net, 0, "doomed-a").await;
    let wb = writer(net, 1, "doomed-b").await;
    let dids: Vec<String> = [&boss, &wa, &wb]
        .iter()
        .map(|w| w.did().to_string())
        .collect();
    let worker_dids = [wa.did().to_string(), wb.did().to_string()];
    // Each worker hangs on the task and is killed once it has started: no result, ever.
    let mut workers = Vec::new();
    for w in [wa, wb] {
        let started = Arc::new(tokio::sync::Notify::new());
        let flag = Arc::clone(&started);
        let work = Worker::new(move |_job: Job| {
            let flag = Arc::clone(&flag);
            async move {
                flag.notify_one();
                std::future::pending::<()>().await;
                Ok(serde_json::Value::Null)
            }
        });
        let agent = agent(net, w, &dids)
            .requester(false)
            .worker(work)
            .start()
            .await
            .unwrap();
        let killer = agent.clone();
        tokio::spawn(async move {
            started.notified().await;
            killer.kill();
        });
        workers.push(agent);
    }
    let boss = agent(net, boss, &dids).start().await.unwrap();
    let handle = boss
        .request(
            TaskSpec::new("hang")
                .lease(Duration::from_secs(1))
                .max_attempts(2),
        )
        .await
        .unwrap();
    let uri = handle.uri.clone();
    let err = handle
        .await_result(Duration::from_secs(30))
        .await
        .unwrap_err();
    match err {
        AgentError::AttemptsExhausted { task, attempts } => {
            assert_eq!(task, uri);
            assert_eq!(attempts, 2);
        }
        other => panic!("expected AttemptsExhausted, got {other:?}"),
    }
    let stats = boss.task_stats();
    assert_eq!(stats.assignments, 2, "{stats:?}");
    assert_eq!(stats.given_up, 1, "{stats:?}");
    assert_eq!(stats.done, 0, "{stats:?}");

    // In the repo: each lapse recorded (naming its worker) and the assignment withdrawn,
    // then the task closed as given up by the ack at its key.
    let rkey = uri.rsplit('/').next().unwrap().to_string();
    let acks = list_all::<Ack>(&boss_w).await;
    let closing = acks.iter().find(|a| a.rkey == rkey).expect("a closing ack");
    assert_eq!(closing.value.state, "rejected");
    assert_eq!(closing.value.subject.uri, uri);
    let mut lapses: Vec<String> = acks
        .iter()
        .filter(|a| {
            a.value
                .subject
                .uri
                .ends_with(&format!("/agent.comms.assignment/{rkey}"))
        })
        .map(|a| a.value.reason.clone().unwrap_or_default())
        .collect();
    lapses.sort();
    assert_eq!(lapses.len(), 2, "{lapses:?}");
    for (n, reason) in lapses.iter().enumerate() {
        assert!(
            reason.starts_with(&format!("lease of attempt {} lapsed (worker did:", n + 1)),
            "{reason}"
        );
        assert!(
            worker_dids.iter().any(|d| reason.contains(d.as_str())),
            "{reason}"
        );
    }
    assert!(list_all::<Assignment>(&boss_w).await.is_empty());
    boss.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_lists_live_agents_and_drops_offline_ones() {
    let net = shared().await;
    let watcher_w = writer(net, 0, "observer").await;
    let peer_w = writer(net, 1, "peer").await;
    let dids = vec![watcher_w.did().to_string(), peer_w.did().to_string()];
    let observer = agent(net, watcher_w, &dids).start().await.unwrap();
    let peer = agent(net, peer_w, &dids)
        .profile(murmur::comms::agent::comms::profile::RecordData {
            name: "peer".into(),
            description: None,
            capabilities: Some(vec!["translate".into()]),
            accepted_nsids: None,
            operator: None,
            max_concurrent_tasks: Some(2),
            encryption_keys: None,
            created_at: murmur::now(),
        })
        .presence_every(Duration::from_secs(5))
        .start()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while observer.registry().live_with("translate").is_empty() {
        assert!(Instant::now() < deadline, "the peer never showed up live");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let info = observer.registry().get(peer.did()).unwrap();
    assert_eq!(info.profile.unwrap().name, "peer");
    peer.shutdown().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !observer
        .registry()
        .live()
        .iter()
        .all(|a| a.did != peer.did())
    {
        assert!(
            Instant::now() < deadline,
            "the peer stayed live after going offline"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    observer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_moves_the_task_and_the_receiver_answers() {
    let net = shared().await;
    let boss = writer(net, 0, "hboss").await;
    let drafter_w = writer(net, 0, "drafter").await;
    let reviewer_w = writer(net, 1, "reviewer").await;
    let reviewer_did = reviewer_w.did().to_string();
    let dids: Vec<String> = [&boss, &drafter_w, &reviewer_w]
        .iter()
        .map(|w| w.did().to_string())
        .collect();
    let to = reviewer_did.clone();
    let drafter = Worker::new(move |job: Job| {
        let to = to.clone();
        async move {
            job.hand_off(&to, "review", serde_json::json!({ "draft": 41 }))
                .await
                .map_err(|e| e.to_string())?;
            Ok(serde_json::Value::Null)
        }
    })
    .capabilities(["draft"]);
    let reviewer = Worker::new(|job: Job| async move {
        let draft = job
            .context
            .as_ref()
            .map_or(0, |c| c["draft"].as_i64().unwrap_or(0));
        Ok(serde_json::json!({ "final": draft + 1 }))
    })
    .capabilities(["review"]);
    let _d = agent(net, drafter_w.clone(), &dids)
        .requester(false)
        .worker(drafter)
        .start()
        .await
        .unwrap();
    let _r = agent(net, reviewer_w, &dids)
        .requester(false)
        .worker(reviewer)
        .start()
        .await
        .unwrap();
    let boss = agent(net, boss, &dids).start().await.unwrap();
    let result = boss
        .request(TaskSpec::new("draft"))
        .await
        .unwrap()
        .await_result(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(result.worker, reviewer_did);
    assert_eq!(result.output_json()["final"], 42);
    assert!(
        drafter_w
            .list::<ResultC>(100, None, false)
            .await
            .unwrap()
            .records
            .is_empty(),
        "the drafter wrote no result"
    );
    boss.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_reaches_the_other_agents_handler_across_hosts() {
    let net = shared().await;
    let alice_w = writer(net, 0, "alice").await;
    let bob_w = writer(net, 1, "bob").await;
    let dids = vec![alice_w.did().to_string(), bob_w.did().to_string()];
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let bob = agent(net, bob_w, &dids)
        .handler(move |msg: Created<murmur::comms::Message>, op: OpEvent| {
            let tx = tx.clone();
            async move {
                let _ = tx
                    .send((op.data().did.clone(), msg.text.clone(), msg.to.clone()))
                    .await;
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    let alice = agent(net, alice_w, &dids).start().await.unwrap();
    alice.send(bob.did(), "hello bob").await.unwrap();
    let (from, text, to) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(from, alice.did());
    assert_eq!(text.as_deref(), Some("hello bob"));
    assert_eq!(to, Some(vec![bob.did().to_string()]));
    alice.shutdown().await;
    bob.shutdown().await;
}

/// A worker that hangs on its first job and raises `started` once it has it.
fn hanging(started: &Arc<AtomicBool>) -> Worker {
    let started = Arc::clone(started);
    Worker::new(move |_job: Job| {
        let started = Arc::clone(&started);
        async move {
            started.store(true, Ordering::SeqCst);
            std::future::pending::<()>().await;
            Ok(serde_json::Value::Null)
        }
    })
}

/// Waits until `requester` has counted every result in the `workers`' repos, accepted or
/// as a duplicate (`already`: accepted by an earlier run), so a duplicate cannot be missed
/// by counting too early.
async fn every_result_counted(requester: &Agent, workers: &[&Writer], already: u64) {
    let mut written = 0;
    for w in workers {
        written += list_all::<ResultC>(w).await.len() as u64;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats = requester.task_stats();
        if already + stats.done + stats.duplicates >= written {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{written} results in the repos, {already} accepted before, counted: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_requester_recovers_its_open_tasks_from_the_repos() {
    const TASKS: usize = 12;
    let net = shared().await;
    let boss_account = net
        .create_account(0, &net.unique_handle("phoenix"), "password-1")
        .await
        .unwrap();
    let w1 = writer(net, 0, "steady-1").await;
    let w2 = writer(net, 1, "steady-2").await;
    let w_doomed = writer(net, 1, "doomed-r").await;
    let dids: Vec<String> = [&w1, &w2, &w_doomed]
        .iter()
        .map(|w| w.did().to_string())
        .chain([boss_account.did.clone()])
        .collect();
    let doomed_started = Arc::new(AtomicBool::new(false));
    let doomed = agent(net, w_doomed.clone(), &dids)
        .requester(false)
        .worker(hanging(&doomed_started).capabilities(["sleep"]))
        .start()
        .await
        .unwrap();
    let a = agent(net, w1.clone(), &dids)
        .requester(false)
        .worker(sleeper(300).max_concurrent(2))
        .start()
        .await
        .unwrap();
    let b = agent(net, w2.clone(), &dids)
        .requester(false)
        .worker(sleeper(700).max_concurrent(2))
        .start()
        .await
        .unwrap();

    // The first requester lives in a runtime of its own, which is dropped mid-run: every
    // task of it stops where it stands, nothing is written on the way out.
    let old = {
        let (url, did, hosts, plc, dids) = (
            boss_account.pds_url.clone(),
            boss_account.did.clone(),
            hosts(net),
            net.plc_url().to_string(),
            dids.clone(),
        );
        let doomed_started = Arc::clone(&doomed_started);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let out = rt.block_on(async move {
                let w = Writer::login(&url, &did, "password-1").await.unwrap();
                let boss = Agent::builder(w)
                    .watch_all(hosts)
                    .plc_url(plc)
                    .start_cursor(0)
                    .peers(dids)
                    .start()
                    .await
                    .unwrap();
                let mut events = boss.events();
                let specs = (0..TASKS).map(|n| {
                    TaskSpec::new("sleep")
                        .payload(serde_json::json!({ "n": n }))
                        .lease(Duration::from_secs(3))
                        .max_attempts(3)
                });
                let handles = boss.request_many(specs, 6).await.unwrap();
                // Die once some tasks are done and others are running, the doomed one's too.
                let (mut assigned, mut done) = (0usize, 0usize);
                let deadline = Instant::now() + Duration::from_secs(60);
                while !(done >= 3 && assigned >= done + 2 && doomed_started.load(Ordering::SeqCst))
                {
                    assert!(Instant::now() < deadline, "the swarm never got going");
                    match tokio::time::timeout(Duration::from_millis(50), events.recv()).await {
                        Ok(Ok(TaskEvent::Assigned { .. })) => assigned += 1,
                        Ok(Ok(TaskEvent::Completed { .. })) => done += 1,
                        _ => {}
                    }
                }
                let uris: Vec<String> = handles.iter().map(|h| h.uri.clone()).collect();
                (uris, boss.task_stats().done)
            });
            rt.shutdown_background();
            out
        })
    };
    let (uris, done_before) = tokio::task::spawn_blocking(move || old.join().unwrap())
        .await
        .unwrap();
    doomed.kill();
    eprintln!("requester died with {done_before} of {TASKS} tasks done");
    // Workers carry on while no requester listens: running tasks finish (a result is
    // written that nobody accepted yet), claims pile up.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut written = 0;
        for w in [&w1, &w2] {
            written += list_all::<ResultC>(w).await.len() as u64;
        }
        if written > done_before && a.active_tasks() == 0 && b.active_tasks() == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no task finished while the requester was away ({written} results)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Same identity, new process: a fresh login, a live-only stream, no state directory.
    let boss_w = Writer::login(&boss_account.pds_url, &boss_account.did, "password-1")
        .await
        .unwrap();
    // What the repo says was closed before the restart: the old requester's count can lag
    // an ack it wrote just before it died.
    let task_keys: Vec<&str> = uris.iter().map(|u| u.rsplit('/').next().unwrap()).collect();
    let closed_before = list_all::<Ack>(&boss_w)
        .await
        .iter()
        .filter(|a| task_keys.contains(&a.rkey.as_str()))
        .count() as u64;
    assert!(
        closed_before >= done_before,
        "{closed_before} < {done_before}"
    );
    let boss = Agent::builder(boss_w.clone())
        .watch_all(hosts(net))
        .plc_url(net.plc_url())
        .peers(dids.clone())
        .start()
        .await
        .unwrap();
    let recovery = boss.recovery().expect("the requester recovered");
    eprintln!("{recovery:?}");
    assert_eq!(recovery.open as u64, TASKS as u64 - closed_before);
    assert!(recovery.done_while_away >= 1, "{recovery:?}");
    assert!(
        recovery.assigned >= 1,
        "the doomed worker's task: {recovery:?}"
    );
    assert!(recovery.unreadable.is_empty(), "{recovery:?}");
    let handles = boss.recovered_tasks();
    assert_eq!(handles.len(), recovery.open);
    assert!(
        boss.recovered_tasks().is_empty(),
        "handles are given out once"
    );
    for h in handles {
        assert!(uris.contains(&h.uri), "{} is one of ours", h.uri);
        let result = h.await_result(Duration::from_secs(60)).await.unwrap();
        assert_eq!(result.record.outcome, "success");
    }
    every_result_counted(&boss, &[&w1, &w2, &w_doomed], closed_before).await;
    let stats = boss.task_stats();
    eprintln!("{stats:?}");
    assert_eq!(stats.duplicates, 0, "{stats:?}");
    assert!(
        stats.lease_expiries >= 1,
        "the doomed worker's lease lapsed: {stats:?}"
    );
    assert!(
        !stats.done_by.contains_key(doomed.did()),
        "the killed worker finished nothing"
    );

    // In the repos: every task closed by exactly one accepted ack, naming its one result.
    let tasks: Vec<String> = list_all::<Task>(&boss_w)
        .await
        .into_iter()
        .map(|t| t.rkey)
        .collect();
    assert_eq!(tasks.len(), TASKS);
    let mut results: HashMap<String, Vec<String>> = HashMap::new();
    for w in [&w1, &w2, &w_doomed] {
        for r in list_all::<ResultC>(w).await {
            results.entry(r.rkey.clone()).or_default().push(r.uri);
        }
    }
    let closing: HashMap<String, _> = list_all::<Ack>(&boss_w)
        .await
        .into_iter()
        .filter(|a| tasks.contains(&a.rkey))
        .map(|a| (a.rkey.clone(), a.value))
        .collect();
    for rkey in &tasks {
        let found = results.get(rkey).cloned().unwrap_or_default();
        assert_eq!(found.len(), 1, "task {rkey}: one result, not {found:?}");
        let ack = closing
            .get(rkey)
            .unwrap_or_else(|| panic!("task {rkey} not closed"));
        assert_eq!(ack.state, "accepted");
        assert_eq!(ack.subject.uri, found[0], "task {rkey} accepted its result");
    }
    boss.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_policy_picks_its_worker_over_the_first_claim() {
    let net = shared().await;
    let boss_w = writer(net, 0, "picky").await;
    let wa = writer(net, 0, "eager").await;
    let wb = writer(net, 1, "chosen").await;
    let dids: Vec<String> = [&boss_w, &wa, &wb]
        .iter()
        .map(|w| w.did().to_string())
        .collect();
    let chosen = wb.did().to_string();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let policy = {
        let seen = Arc::clone(&seen);
        move |_ctx: &ClaimContext<'_>, offers: &[ClaimOffer]| {
            let workers: Vec<String> = offers.iter().map(|o| o.worker.clone()).collect();
            seen.lock().unwrap().push(workers);
            offers.iter().position(|o| o.worker == chosen)
        }
    };
    // The requester reads live (no replay from seq 0): otherwise it may still be catching up
    // with the eager worker's host when the chosen worker, which learns of the task from its
    // copy of the requester's repo, claims on the other host; then the second claim would be
    // read first.
    let boss = Agent::builder(boss_w.clone())
        .watch_all(hosts(net))
        .plc_url(net.plc_url())
        .peers(dids.clone())
        .claim_window(Duration::from_secs(3))
        .claim_policy(policy)
        .start()
        .await
        .unwrap();
    let a = agent(net, wa.clone(), &dids)
        .requester(false)
        .worker(sleeper(100))
        .start()
        .await
        .unwrap();
    let mut events_a = a.events();
    let handle = boss
        .request(TaskSpec::new("sleep").payload(serde_json::json!({ "n": 1 })))
        .await
        .unwrap();
    // The eager worker claims first; the chosen one joins only afterwards.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events_a.recv()).await {
            Ok(Ok(TaskEvent::ClaimSent { .. })) => break,
            Ok(_) => {}
            Err(_) => panic!("the eager worker never claimed"),
        }
    }
    // A claim sent is not yet a claim the requester has read (its stream of the eager
    // worker's host takes a few hundred ms here), and the chosen worker, which learns of the
    // task from its copy of the requester's repo, claims within ~100 ms of joining: it joins
    // 2 s later, still inside the 3 s claim window (and a policy that sees only the eager
    // claim waits for more anyway).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _b = agent(net, wb.clone(), &dids)
        .requester(false)
        .worker(sleeper(100))
        .start()
        .await
        .unwrap();
    let result = handle.await_result(Duration::from_secs(30)).await.unwrap();
    assert_eq!(result.worker, wb.did(), "the policy's worker answered");
    let assignments = list_all::<Assignment>(&boss_w).await;
    assert_eq!(assignments.len(), 1);
    assert_eq!(assignments[0].value.worker, wb.did());
    let claims_a = list_all::<Claim>(&wa).await;
    let claims_b = list_all::<Claim>(&wb).await;
    assert_eq!((claims_a.len(), claims_b.len()), (1, 1), "both claimed");
    assert!(
        claims_a[0].value.created_at < claims_b[0].value.created_at,
        "the eager worker claimed first"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.last(),
        Some(&vec![wa.did().to_string(), wb.did().to_string()]),
        "the policy saw both claims, in arrival order: {seen:?}"
    );
    boss.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_update_and_on_delete_reach_the_agents_handlers() {
    let net = shared().await;
    let alice_w = writer(net, 0, "editor").await;
    let bob_w = writer(net, 1, "reader").await;
    let dids = vec![alice_w.did().to_string(), bob_w.did().to_string()];
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let (tx_u, tx_d) = (tx.clone(), tx.clone());
    let bob = agent(net, bob_w, &dids)
        .requester(false)
        .handler(move |msg: Created<Message>, op: OpEvent| {
            let tx = tx.clone();
            async move {
                let _ = tx
                    .send(("create", op.rkey().to_string(), msg.text.clone()))
                    .await;
                Ok(())
            }
        })
        .handler(move |msg: Updated<Message>, op: OpEvent| {
            let tx = tx_u.clone();
            async move {
                let _ = tx
                    .send(("update", op.rkey().to_string(), msg.text.clone()))
                    .await;
                Ok(())
            }
        })
        .handler(move |gone: Deleted<Message>, _op: OpEvent| {
            let tx = tx_d.clone();
            async move {
                let _ = tx.send(("delete", gone.rkey.clone(), None)).await;
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    let alice = agent(net, alice_w, &dids)
        .requester(false)
        .start()
        .await
        .unwrap();
    let sent = alice.send(bob.did(), "first draft").await.unwrap();
    let edited = murmur::comms::agent::comms::message::RecordData {
        to: Some(vec![bob.did().to_string()]),
        thread: None,
        reply_to: None,
        text: Some("final text".into()),
        payload_type: None,
        payload: None,
        created_at: murmur::now(),
    }
    .into_record();
    alice
        .writer()
        .put::<Message>(&sent.rkey, &edited, Some(sent.cid))
        .await
        .unwrap();
    alice
        .writer()
        .delete::<Message>(&sent.rkey, None)
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        let next = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("every change reached bob")
            .unwrap();
        got.push(next);
    }
    let key = sent.rkey.clone();
    assert_eq!(
        got,
        vec![
            ("create", key.clone(), Some("first draft".to_string())),
            ("update", key.clone(), Some("final text".to_string())),
            ("delete", key, None),
        ]
    );
    alice.shutdown().await;
    bob.shutdown().await;
}
