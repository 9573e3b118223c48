//! A watcher on the hub's Jetstream (`WatcherBuilder::jetstream`), against the real local
//! network and a real nats-server: with proofs on, it gets exactly the records its filters
//! let through, once each, each proven from its author's PDS; a change of its DID allowlist
//! reaches the server; a restart resumes from its stored cursor without running anything
//! twice.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use murmur_bus::{JetstreamConfig, StreamSettings};
use murmur_devnet::Devnet;
use murmur_e2e::nats::{cleanup, settings};
use murmur_e2e::{Note, NoteRecord, account, note, shared, wait_for};
use murmur_firehose::{OpEvent, Provenance, Watcher};
use serde_json::json;

/// A hub over every host of `net`, serving Jetstream on a free loopback port.
async fn start_hub(
    net: &Devnet,
    settings: &StreamSettings,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let hub = murmur_e2e::nats::start_hub(net, settings, |b| {
        b.serve_jetstream("127.0.0.1:0".parse().unwrap(), JetstreamConfig::default())
    })
    .await;
    (hub.jetstream.unwrap(), hub.task)
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
    // Alice shares carol's host: once her next note is through, carol's notes above are in
    // the hub's stream too (one host's events are stored in its order), before carol is
    // allowed. (One written before but stored after the change would count as after it.)
    alice_w.create::<Note>(&note(3)).await.unwrap();
    wait_for("seven notes", Duration::from_secs(60), || seen.count() >= 7).await;

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

    assert_eq!(seen.of(&alice.did), [0, 1, 2, 3]);
    assert_eq!(seen.of(&bob.did), [100, 101, 102]);
    let carols = seen.of(&carol.did);
    assert!(
        carols.iter().all(|n| (300..350).contains(n)),
        "only carol's notes after she was allowed: {carols:?}"
    );
    let unique: std::collections::HashSet<u64> = carols.iter().copied().collect();
    assert_eq!(unique.len(), carols.len(), "each once: {carols:?}");
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

/// The first commit event of `did` the hub's Jetstream serves from `cursor`, as it sent it.
/// The account's creation events (`#identity`, `#account`) pass every collection filter and
/// may be stamped after `cursor` (the hub stamps an event when it stores it): skipped.
async fn first_event(addr: SocketAddr, cursor: i64, did: &str) -> serde_json::Value {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let url = format!(
        "ws://{addr}/subscribe?wantedDids={did}&wantedCollections=test.murmur.note&cursor={cursor}"
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(60), socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let event: serde_json::Value = serde_json::from_str(&text).unwrap();
                if event["kind"] == "commit" {
                    return event;
                }
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("waiting for a commit event of {did}: {other:?}"),
        }
    }
}

/// `event` with its record's `n` set to `n` and the CID computed again, so that it passes the
/// hash check: only a proof can tell it from the author's.
fn forged(event: &serde_json::Value, n: u64, rkey: Option<&str>) -> String {
    let mut event = event.clone();
    event["commit"]["record"]["n"] = json!(n);
    if let Some(rkey) = rkey {
        event["commit"]["rkey"] = json!(rkey);
    }
    let data = murmur_lexicon::data::json_to_data(&event["commit"]["record"]).unwrap();
    let bytes = murmur_lexicon::data::to_dag_cbor(&data).unwrap();
    event["commit"]["cid"] = json!(murmur_sync::cid_for(0x71, &bytes).to_string());
    event.to_string()
}

/// A Jetstream that forges records of a real author (each hashing to the CID it names) and
/// passes on one genuine event: with proofs on, only the genuine one reaches a handler,
/// proven from the author's PDS; without, all three do, each saying it is unverified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_jetstream_records_fail_their_proofs_and_never_reach_handlers() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;

    let net = shared().await;
    let settings = settings("jsforge");
    let (addr, hub) = start_hub(net, &settings).await;
    let (alice, alice_w) = account(net, 0, "jwf").await;
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    alice_w.create::<Note>(&note(1)).await.unwrap();
    let genuine = first_event(addr, t0, &alice.did).await;
    assert_eq!(genuine["commit"]["record"]["n"], 1);
    let messages = [
        // A record alice never wrote, at a key she does not use.
        forged(&genuine, 666, Some("3zzzzzzzzzzzz")),
        // Alice's record at its own key, altered.
        forged(&genuine, 667, None),
        genuine.to_string(),
    ];

    for proofs in [true, false] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        let script = messages.clone();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut socket = tokio_tungstenite::accept_async(stream).await.unwrap();
            for message in script {
                socket.send(Message::Text(message.into())).await.unwrap();
            }
            // Held open until the watcher goes.
            while let Some(Ok(_)) = futures_util::StreamExt::next(&mut socket).await {}
        });
        let seen = Seen::default();
        let (notes, rejected) = (Arc::clone(&seen.notes), Arc::clone(&seen.rejected));
        let watcher = Watcher::builder()
            .feed(
                murmur_firehose::JetstreamSource::new(&url)
                    .proofs(proofs)
                    .compress(false),
            )
            .plc_url(net.plc_url())
            .collections(["test.murmur.note"])
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
            .unwrap();
        let stop = watcher.shutdown_handle();
        let running = tokio::spawn(watcher.run());
        if proofs {
            wait_for(
                "the genuine note and two rejections",
                Duration::from_secs(60),
                || seen.count() + seen.rejected.lock().unwrap().len() >= 3,
            )
            .await;
            assert_eq!(
                *seen.notes.lock().unwrap(),
                [(alice.did.clone(), 1, Provenance::Verified)]
            );
            let rejected = seen.rejected.lock().unwrap().clone();
            assert_eq!(rejected.len(), 2, "{rejected:?}");
            assert!(rejected[0].contains("3zzzzzzzzzzzz"), "{rejected:?}");
        } else {
            wait_for("three notes", Duration::from_secs(60), || seen.count() >= 3).await;
            let notes = seen.notes.lock().unwrap().clone();
            assert_eq!(
                notes.iter().map(|(_, n, p)| (*n, *p)).collect::<Vec<_>>(),
                [
                    (666, Provenance::Unverified),
                    (667, Provenance::Unverified),
                    (1, Provenance::Unverified)
                ]
            );
        }
        stop.shutdown();
        running.await.unwrap().unwrap();
        server.abort();
    }
    hub.abort();
    cleanup(&settings).await;
}
