//! A watcher on the hub's Jetstream (`WatcherBuilder::jetstream`), against the real local
//! network and a real nats-server: with proofs on, it gets exactly the records its filters
//! let through, once each, each proven from its author's PDS; a change of its DID allowlist
//! reaches the server; a restart resumes from its stored cursor without running anything
//! twice.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use murmur_bus::{Hub, JetstreamConfig, StreamSettings};
use murmur_devnet::Devnet;
use murmur_e2e::nats::{cleanup, settings, url as nats_url};
use murmur_e2e::{Note, NoteRecord, account, note, shared, wait_for};
use murmur_firehose::{OpEvent, Provenance, Watcher};
use serde_json::json;

/// A hub over every host of `net`, serving Jetstream on a free loopback port.
async fn start_hub(
    net: &Devnet,
    settings: &StreamSettings,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let mut builder = Hub::builder()
        .nats(nats_url())
        .plc_url(net.plc_url())
        .stream(settings.clone())
        .serve_jetstream("127.0.0.1:0".parse().unwrap(), JetstreamConfig::default());
    for host in net.pds_hosts() {
        builder = builder.pds(host.url());
    }
    let hub = builder.build().await.unwrap();
    let addr = hub.jetstream_addr().unwrap();
    let metrics = hub.watcher_metrics();
    let task = tokio::spawn(async move { hub.run().await.unwrap() });
    let hosts = net.pds_hosts().len() as u64;
    wait_for(
        "the hub to connect to every host",
        Duration::from_secs(30),
        || metrics.snapshot().sources_connected >= hosts,
    )
    .await;
    (addr, task)
}

/// What a watcher's handler saw: (did, n, provenance) per op, and what was rejected.
#[derive(Clone, Default)]
struct Seen {
    notes: Arc<Mutex<Vec<(String, u64, Provenance)>>>,
    rejected: Arc<Mutex<Vec<String>>>,
}

impl Seen {
    fn count(&self) -> usize {
        self.notes.lock().unwrap().len()
    }

    fn of(&self, did: &str) -> Vec<u64> {
        self.notes
            .lock()
            .unwrap()
            .iter()
            .filter(|(d, _, _)| d == did)
            .map(|(_, n, _)| *n)
            .collect()
    }

    fn watcher(
        &self,
        net: &Devnet,
        addr: SocketAddr,
        dids: &[&str],
        state: &std::path::Path,
    ) -> Watcher {
        let (notes, rejected) = (Arc::clone(&self.notes), Arc::clone(&self.rejected));
        Watcher::builder()
            .jetstream(&format!("ws://{addr}"))
            .jetstream_proofs(true)
            .plc_url(net.plc_url())
            .dids(dids.iter().copied())
            .collections(["test.murmur.note"])
            .state_dir(state)
            .tail(move |op: OpEvent| {
                let notes = Arc::clone(&notes);
                async move {
                    let record: NoteRecord =
                        serde_ipld_dagcbor::from_slice(op.data().record.as_deref().unwrap())
                            .unwrap();
                    notes
                        .lock()
                        .unwrap()
                        .push((op.data().did.clone(), record.n, op.provenance()));
                    Ok(())
                }
            })
            .on_rejected(move |op, why| {
                rejected
                    .lock()
                    .unwrap()
                    .push(format!("{}: {why}", op.uri()))
            })
            .build()
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_on_the_hubs_jetstream_with_proofs_gets_exactly_the_filtered_records_once() {
    let net = shared().await;
    let settings = settings("jswatch");
    let (addr, hub) = start_hub(net, &settings).await;
    let (alice, alice_w) = account(net, 0, "jwa").await;
    let (bob, bob_w) = account(net, 1, "jwb").await;
    let (carol, carol_w) = account(net, 0, "jwc").await;
    let state = tempfile::tempdir().unwrap();

    let seen = Seen::default();
    let watcher = seen.watcher(net, addr, &[&alice.did, &bob.did], state.path());
    let metrics = watcher.metrics();
    let dids = watcher.dids();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for("the watcher to connect", Duration::from_secs(30), || {
        metrics.snapshot().sources_connected >= 1
    })
    .await;

    for n in 0..3 {
        alice_w.create::<Note>(&note(n)).await.unwrap();
        bob_w.create::<Note>(&note(100 + n)).await.unwrap();
        // Not on the allowlist.
        carol_w.create::<Note>(&note(200 + n)).await.unwrap();
    }
    // Not a collection the watcher takes.
    let other = murmur_lexicon::data::json_to_data(&json!({
        "$type": "test.murmur.other", "n": 50
    }))
    .unwrap();
    alice_w
        .create_untyped("test.murmur.other", other, |_| Ok(()))
        .await
        .unwrap();
    wait_for("six notes", Duration::from_secs(60), || seen.count() >= 6).await;

    // Carol joins the allowlist: the server is told, and her next note comes.
    dids.insert(carol.did.clone());
    // The options_update is sent as soon as the change is seen; a note written right after
    // it may reach the server first, so write until one arrives.
    let mut n = 0;
    while seen.of(&carol.did).is_empty() {
        assert!(n < 50, "carol's notes never came");
        carol_w.create::<Note>(&note(300 + n)).await.unwrap();
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.shutdown();
    running.await.unwrap().unwrap();

    assert_eq!(seen.of(&alice.did), [0, 1, 2]);
    assert_eq!(seen.of(&bob.did), [100, 101, 102]);
    let carols = seen.of(&carol.did);
    assert!(
        carols.iter().all(|n| (300..350).contains(n)),
        "only carol's notes after she was allowed: {carols:?}"
    );
    let mut unique = carols.clone();
    unique.dedup();
    assert_eq!(unique, carols, "each once");
    assert!(
        seen.notes
            .lock()
            .unwrap()
            .iter()
            .all(|(_, _, p)| *p == Provenance::Verified),
        "every op proven from its author's PDS"
    );
    assert_eq!(*seen.rejected.lock().unwrap(), Vec::<String>::new());

    // A new watcher on the same state resumes from the stored cursor (rewound a little):
    // nothing it finished runs again; what was written while it was down comes once.
    alice_w.create::<Note>(&note(3)).await.unwrap();
    let again = Seen::default();
    let watcher = again.watcher(net, addr, &[&alice.did, &bob.did], state.path());
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for("alice's fourth note", Duration::from_secs(60), || {
        again.count() >= 1
    })
    .await;
    bob_w.create::<Note>(&note(103)).await.unwrap();
    wait_for("bob's fourth note", Duration::from_secs(60), || {
        again.count() >= 2
    })
    .await;
    stop.shutdown();
    running.await.unwrap().unwrap();
    assert_eq!(again.of(&alice.did), [3]);
    assert_eq!(again.of(&bob.did), [103]);

    hub.abort();
    cleanup(&settings).await;
}

/// Two agents that hear each other through the hub's Jetstream (proofs on): a task posted by
/// one is claimed, done and answered by the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_over_the_hubs_jetstream_run_a_task() {
    let net = shared().await;
    let settings = settings("jsagent");
    let (addr, hub) = start_hub(net, &settings).await;
    let boss_w = murmur_e2e::writer(net, 0, "jsboss").await;
    let worker_w = murmur_e2e::writer(net, 1, "jsworker").await;
    let peers = vec![boss_w.did().to_string(), worker_w.did().to_string()];
    let url = format!("ws://{addr}");
    let agent = |writer: murmur::pds::Writer| {
        murmur::Agent::builder(writer)
            .watch_all(murmur_e2e::hosts(net))
            .plc_url(net.plc_url())
            .jetstream(&url)
            .peers(peers.clone())
    };
    let worker = agent(worker_w)
        .requester(false)
        .worker(
            murmur::Worker::new(|job: murmur::Job| async move {
                Ok(json!({ "doubled": job.payload_json()["n"].as_u64().unwrap() * 2 }))
            })
            .capabilities(["double"]),
        )
        .start()
        .await
        .unwrap();
    let boss = agent(boss_w).start().await.unwrap();
    let result = boss
        .request(murmur::TaskSpec::new("double").payload(json!({ "n": 21 })))
        .await
        .unwrap()
        .await_result(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(result.output_json()["doubled"], 42, "{result:?}");
    boss.shutdown().await;
    worker.shutdown().await;
    hub.abort();
    cleanup(&settings).await;
}
