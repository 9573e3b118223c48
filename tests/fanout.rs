//! The in-process fan-out against the real local network: one verified subscription per host
//! shared by several watchers, each seeing every op it takes exactly once, in per-DID order;
//! a slow subscriber holding the upstream's cursor; a subscriber that leaves releasing it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use murmur_e2e::{Note, account, note, shared, wait_for};
use murmur_firehose::{Fanout, Identity, OpEvent, Record, Watcher};
use murmur_pds::Writer;
use tokio::sync::watch;

/// (did, n) of every note a watcher's handler saw, in the order it saw them.
type Seen = Arc<Mutex<Vec<(String, u64)>>>;

async fn write_notes(writer: &Writer, range: std::ops::Range<u64>, batch: usize) {
    let ns: Vec<u64> = range.collect();
    for chunk in ns.chunks(batch) {
        if batch == 1 {
            writer.create::<Note>(&note(chunk[0])).await.unwrap();
        } else {
            let mut b = writer.batch();
            for &n in chunk {
                b.create::<Note>(&note(n)).unwrap();
            }
            b.commit().await.unwrap();
        }
    }
}

fn assert_exactly_once_in_order(who: &str, seen: &[(String, u64)], expected: &HashMap<&str, u64>) {
    let mut per_did: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (did, n) in seen {
        per_did.entry(did).or_default().push(*n);
    }
    for (did, count) in expected {
        let got = per_did.get(did).cloned().unwrap_or_default();
        let want: Vec<u64> = (0..*count).collect();
        assert_eq!(got, want, "{who}: notes of {did}, exactly once, in order");
    }
    assert_eq!(
        per_did.len(),
        expected.len(),
        "{who}: notes from other repos"
    );
}

fn count(seen: &Seen) -> usize {
    seen.lock().unwrap().len()
}

/// A watcher on `feed` recording every note (of `dids`, when given) into `seen`.
fn note_watcher(
    feed: murmur_firehose::FanoutSubscriber,
    seen: &Seen,
    dids: Option<Vec<String>>,
) -> Watcher {
    let s = Arc::clone(seen);
    let mut builder = Watcher::builder()
        .feed(feed)
        .handler(move |n: Record<Note>, op: OpEvent| {
            s.lock().unwrap().push((op.data().did.clone(), n.n));
            async { Ok(()) }
        });
    if let Some(dids) = dids {
        builder = builder.dids(dids);
    }
    builder.build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_on_one_fanout_each_see_every_op_once_in_order_over_one_subscription_per_host() {
    let net = shared().await;
    let mut accounts = Vec::new();
    for (pds, name) in [(0, "fan1a"), (0, "fan1b"), (1, "fan1c")] {
        accounts.push(account(net, pds, name).await);
    }
    let dids: Vec<String> = accounts.iter().map(|(a, _)| a.did.clone()).collect();
    let fanout = Fanout::builder()
        .pds(net.pds(0).unwrap().url())
        .pds(net.pds(1).unwrap().url())
        .plc_url(net.plc_url())
        .start_cursor(0)
        .dids(dids.clone())
        .collections(["test.murmur.*"])
        .build()
        .unwrap();

    // Two watchers take every repo; the third only the first two (its own filter).
    let seen: Vec<Seen> = (0..3).map(|_| Seen::default()).collect();
    let mut watchers = Vec::new();
    for (i, s) in seen.iter().enumerate() {
        let only = (i == 2).then(|| dids[..2].to_vec());
        watchers.push(note_watcher(fanout.subscriber(&format!("w{i}")), s, only));
    }
    // A fourth hears the repos' #identity events through the fan-out.
    let identities = Arc::new(Mutex::new(Vec::<String>::new()));
    let ids = Arc::clone(&identities);
    watchers.push(
        Watcher::builder()
            .feed(fanout.subscriber("identities"))
            .handler(move |identity: Identity| {
                ids.lock().unwrap().push(identity.did.clone());
                async { Ok(()) }
            })
            .build()
            .unwrap(),
    );
    assert_eq!(fanout.subscribers(), 4);
    let metrics: Vec<_> = watchers.iter().map(Watcher::metrics).collect();
    let stops: Vec<_> = watchers.iter().map(Watcher::shutdown_handle).collect();
    let running: Vec<_> = watchers
        .into_iter()
        .map(|w| tokio::spawn(w.run()))
        .collect();
    let upstream = {
        let f = fanout.clone();
        tokio::spawn(async move { f.run().await })
    };

    let mut writes = Vec::new();
    for (i, (_, writer)) in accounts.iter().enumerate() {
        let writer = writer.clone();
        writes.push(tokio::spawn(async move {
            write_notes(&writer, 0..20, 1).await;
            write_notes(&writer, 20..120, if i == 0 { 50 } else { 25 }).await;
        }));
    }
    for w in writes {
        w.await.unwrap();
    }
    wait_for(
        "every note at every watcher",
        Duration::from_secs(90),
        || count(&seen[0]) >= 360 && count(&seen[1]) >= 360 && count(&seen[2]) >= 240,
    )
    .await;
    wait_for("the identity events", Duration::from_secs(30), || {
        let ids = identities.lock().unwrap();
        dids.iter().all(|d| ids.contains(d))
    })
    .await;

    // One subscription per host, read by the fan-out; the subscribers open none.
    let up = fanout.metrics();
    let sources = up.sources();
    assert_eq!(sources.len(), 2, "{sources:?}");
    assert!(sources.iter().all(|s| s.connected), "{sources:?}");
    for m in &metrics {
        let snap = m.snapshot();
        assert!(m.sources().is_empty(), "a subscriber opened a socket");
        assert_eq!((snap.sources, snap.sources_connected), (1, 1), "{snap:?}");
        assert_eq!(snap.rejected, 0, "{snap:?}");
    }
    // Each commit verified once: the upstream handed each op out once.
    let handed = up.snapshot();
    assert_eq!(handed.rejected, 0, "{handed:?}");
    assert!(handed.ops_matched >= 360, "{handed:?}");

    for stop in &stops {
        stop.shutdown();
    }
    for r in running {
        r.await.unwrap().unwrap();
    }
    assert_eq!(fanout.subscribers(), 0, "stopped subscribers leave");
    fanout.shutdown();
    upstream.await.unwrap().unwrap();

    let all: HashMap<&str, u64> = dids.iter().map(|d| (d.as_str(), 120)).collect();
    let two: HashMap<&str, u64> = dids[..2].iter().map(|d| (d.as_str(), 120)).collect();
    assert_exactly_once_in_order("w0", &seen[0].lock().unwrap(), &all);
    assert_exactly_once_in_order("w1", &seen[1].lock().unwrap(), &all);
    assert_exactly_once_in_order("w2 (two repos)", &seen[2].lock().unwrap(), &two);
    assert_eq!(
        metrics[0].snapshot().handled,
        360,
        "each note handled once by w0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_holds_the_upstream_cursor_and_a_leaving_one_releases_it() {
    let net = shared().await;
    let (alice, alice_writer) = account(net, 0, "fan2a").await;
    let (bob, bob_writer) = account(net, 0, "fan2b").await;
    let state = tempfile::tempdir().unwrap();
    let fanout = Fanout::builder()
        .pds(net.pds(0).unwrap().url())
        .plc_url(net.plc_url())
        .dids([alice.did.clone(), bob.did.clone()])
        .collections(["test.murmur.*"])
        .state_dir(state.path())
        .build()
        .unwrap();

    let fast: Seen = Seen::default();
    let fast_watcher = note_watcher(fanout.subscriber("fast"), &fast, None);
    // The slow one stops at alice's note 5 until released, and records each note's seq.
    let slow: Seen = Seen::default();
    let seqs = Arc::new(Mutex::new(HashMap::<(String, u64), i64>::new()));
    let (release, released) = watch::channel(false);
    let held = Arc::new(Mutex::new(None::<i64>));
    let (s, q, h, alice_did) = (
        Arc::clone(&slow),
        Arc::clone(&seqs),
        Arc::clone(&held),
        alice.did.clone(),
    );
    let slow_watcher = Watcher::builder()
        .feed(fanout.subscriber("slow"))
        .handler(move |n: Record<Note>, op: OpEvent| {
            let (s, q, h, mut released) = (
                Arc::clone(&s),
                Arc::clone(&q),
                Arc::clone(&h),
                released.clone(),
            );
            let hold = op.data().did == alice_did && n.n == 5;
            async move {
                let key = (op.data().did.clone(), n.n);
                q.lock().unwrap().insert(key.clone(), op.data().seq);
                if hold {
                    *h.lock().unwrap() = Some(op.data().seq);
                    released.wait_for(|r| *r).await.unwrap();
                }
                s.lock().unwrap().push(key);
                Ok(())
            }
        })
        .build()
        .unwrap();
    let slow_stop = slow_watcher.shutdown_handle();
    let fast_running = tokio::spawn(fast_watcher.run());
    let slow_running = tokio::spawn(slow_watcher.run());
    let metrics = fanout.metrics();
    let upstream = {
        let f = fanout.clone();
        tokio::spawn(async move { f.run().await })
    };
    wait_for("the fan-out connected", Duration::from_secs(20), || {
        metrics.snapshot().sources_connected == 1
    })
    .await;
    let cursor = || metrics.sources()[0].cursor.unwrap_or(-1);

    // Ten notes of alice, one commit each.
    write_notes(&alice_writer, 0..10, 1).await;
    wait_for(
        "the slow subscriber at note 5",
        Duration::from_secs(30),
        || held.lock().unwrap().is_some(),
    )
    .await;
    let held_seq = held.lock().unwrap().unwrap();
    let seq_of = |did: &str, n: u64| seqs.lock().unwrap()[&(did.to_string(), n)];
    // Everything before note 5 is finished everywhere: the cursor gets there, no further.
    let before = seq_of(&alice.did, 4);
    wait_for("the cursor up to note 4", Duration::from_secs(30), || {
        cursor() >= before
    })
    .await;
    // Bob's notes go on meanwhile (another DID), at both subscribers, past alice's seq.
    write_notes(&bob_writer, 0..3, 1).await;
    wait_for("bob's notes at both", Duration::from_secs(30), || {
        let bob_at = |seen: &Seen| {
            seen.lock()
                .unwrap()
                .iter()
                .filter(|(d, _)| *d == bob.did)
                .count()
        };
        bob_at(&fast) == 3 && bob_at(&slow) == 3
    })
    .await;
    // Bob's notes are handled and seqs later than alice's held note; the flusher has had its
    // ticks (it writes every 200 ms) while they went through.
    let bob_last = seq_of(&bob.did, 2);
    assert!(bob_last > held_seq);
    let alice_notes = |seen: &Seen| -> Vec<u64> {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(d, _)| *d == alice.did)
            .map(|(_, n)| *n)
            .collect()
    };
    assert!(
        cursor() < held_seq,
        "the cursor ({}) passed the op the slow subscriber holds ({held_seq})",
        cursor()
    );
    // Per DID, everyone waits for the slow one: the fast one has alice's 0..=5, not 6.
    assert_eq!(alice_notes(&fast), (0..=5).collect::<Vec<_>>());

    // Released: everything goes through, once, in order, and the cursor passes it all.
    release.send_replace(true);
    wait_for("alice's notes at both", Duration::from_secs(30), || {
        alice_notes(&fast).len() == 10 && alice_notes(&slow).len() == 10
    })
    .await;
    assert_eq!(alice_notes(&fast), (0..10).collect::<Vec<_>>());
    assert_eq!(alice_notes(&slow), (0..10).collect::<Vec<_>>());
    let last = seq_of(&alice.did, 9).max(bob_last);
    wait_for(
        "the cursor past every note",
        Duration::from_secs(30),
        || cursor() >= last,
    )
    .await;

    // The slow one leaves; the fan-out no longer waits for it.
    slow_stop.shutdown();
    slow_running.await.unwrap().unwrap();
    write_notes(&alice_writer, 10..13, 1).await;
    wait_for(
        "notes after the slow one left",
        Duration::from_secs(30),
        || alice_notes(&fast).len() == 13,
    )
    .await;
    assert_eq!(fanout.subscribers(), 1);
    assert_eq!(
        alice_notes(&slow).len(),
        10,
        "a subscriber that left gets nothing"
    );

    // Shutting the fan-out down ends the remaining subscriber's feed: its watcher stops.
    fanout.shutdown();
    upstream.await.unwrap().unwrap();
    fast_running.await.unwrap().unwrap();
}

/// Agents on one fan-out: a coordinator hears it from the start; two workers join after the
/// tasks were posted (live from where the fan-out is) and learn them from their backfill,
/// which copies the peers' repos through the hosts the agents watch. Every task is done once,
/// and the PDS hosts serve the fan-out's subscriptions alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_on_one_fanout_late_workers_backfill_and_complete_every_task_once() {
    use murmur::{Agent, Job, TaskSpec, Worker};
    const TASKS: usize = 20;
    let net = shared().await;
    let hosts = murmur_e2e::hosts(net);
    let boss_w = murmur_e2e::writer(net, 0, "fan3-boss").await;
    let w1 = murmur_e2e::writer(net, 0, "fan3-w1").await;
    let w2 = murmur_e2e::writer(net, 1, "fan3-w2").await;
    let peers: Vec<String> = [&boss_w, &w1, &w2]
        .iter()
        .map(|w| w.did().to_string())
        .collect();
    let mut upstream = Fanout::builder()
        .plc_url(net.plc_url())
        .dids(peers.clone())
        .collections(["agent.comms.*"]);
    for h in &hosts {
        upstream = upstream.pds(h);
    }
    let fanout = upstream.build().unwrap();
    let running = {
        let f = fanout.clone();
        tokio::spawn(async move { f.run().await })
    };
    let agent = |writer: Writer, name: &str| {
        Agent::builder(writer)
            .watch_all(hosts.clone())
            .plc_url(net.plc_url())
            .peers(peers.clone())
            .feed(fanout.subscriber(name))
    };
    let boss = agent(boss_w.clone(), "boss").start().await.unwrap();
    let specs = (0..TASKS).map(|n| {
        TaskSpec::new("echo")
            .payload(serde_json::json!({ "n": n }))
            .lease(Duration::from_secs(20))
            .max_attempts(3)
    });
    let handles = boss.request_many(specs, 10).await.unwrap();
    let up = fanout.metrics();
    let task_ops = |m: &murmur_firehose::Metrics| m.snapshot().handled;
    // The fan-out has handed the tasks out (to the coordinator alone) before the workers join.
    wait_for("the tasks handed out", Duration::from_secs(30), || {
        task_ops(&up) >= TASKS as u64
    })
    .await;

    let mut workers = Vec::new();
    for (w, name) in [(&w1, "w1"), (&w2, "w2")] {
        let worker = agent(w.clone(), name)
            .requester(false)
            .worker(
                Worker::new(|job: Job| async move { Ok(job.payload_json()) })
                    .capabilities(["echo"])
                    .max_concurrent(4),
            )
            .start()
            .await
            .unwrap();
        workers.push(worker);
    }
    let mut outputs = std::collections::HashSet::new();
    for h in handles {
        let result = h.await_result(Duration::from_secs(120)).await.unwrap();
        outputs.insert(result.output_json()["n"].as_u64().unwrap());
    }
    assert_eq!(outputs.len(), TASKS);
    for w in &workers {
        let copied = w.metrics().backfill();
        assert!(copied.finished, "{copied:?}");
        assert!(
            copied.records >= TASKS as u64,
            "the tasks came from the copy: {copied:?}"
        );
        assert!(w.metrics().sources().is_empty(), "an agent opened a socket");
    }
    assert!(
        boss.metrics().sources().is_empty(),
        "an agent opened a socket"
    );
    assert_eq!(up.sources().len(), hosts.len());
    wait_for("every result counted", Duration::from_secs(20), || {
        let s = boss.task_stats();
        s.done >= TASKS as u64
    })
    .await;
    let stats = boss.task_stats();
    assert_eq!(stats.done, TASKS as u64, "{stats:?}");
    assert_eq!(stats.duplicates, 0, "{stats:?}");

    for w in workers.iter().chain([&boss]) {
        w.shutdown().await;
    }
    fanout.shutdown();
    running.await.unwrap().unwrap();
}
