//! The bus (murmur-bus) against the real local network and a real nats-server with
//! JetStream: one hub verifies and publishes, consumers get every op once through durable
//! consumers, forged messages never reach handlers, and the faults of the issue: a hub killed
//! and restarted, two hubs at once, a consumer killed mid-handler, the NATS server killed and
//! restarted, a node of a 3-node cluster (R3 stream) lost. (The `murmur hub` process killed
//! with SIGKILL is in crates/murmur-cli/tests/hub.rs.)
//!
//! The NATS server is one the test binary starts (murmur-devnet's pinned nats-server, on a
//! free loopback port), or `MURMUR_TEST_NATS`; each test uses its own stream and subject
//! prefix and deletes them at the end. The server and cluster fault tests start servers of
//! their own.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use murmur_bus::{BusMessage, BusSource, Hub, StartAt, StreamSettings};
use murmur_devnet::Devnet;
use murmur_devnet::nats::{NatsCluster, NatsServer};
use murmur_e2e::nats::{cleanup, servers, settings, url as nats_url};
use murmur_e2e::{Note, account, note, shared, wait_for};
use murmur_firehose::{Author, CommitInfo, HandlerError, Record, Rejected, Rejection, Watcher};

fn hub(net: &Devnet, nats: &str, settings: &StreamSettings) -> murmur_bus::HubBuilder {
    let mut builder = Hub::builder()
        .nats(nats)
        .plc_url(net.plc_url())
        .stream(settings.clone());
    for host in net.pds_hosts() {
        builder = builder.pds(host.url());
    }
    builder
}

/// Starts a hub on its own task; dropping the handle's task (abort) kills it like a process
/// kill: publishes in flight are cut, the cursor is not flushed again.
async fn start_hub(net: &Devnet, settings: &StreamSettings) -> tokio::task::JoinHandle<()> {
    start_hub_on(net, &nats_url(), settings).await
}

async fn start_hub_on(
    net: &Devnet,
    nats: &str,
    settings: &StreamSettings,
) -> tokio::task::JoinHandle<()> {
    let hub = hub(net, nats, settings).build().await.unwrap();
    let metrics = hub.watcher_metrics();
    let task = tokio::spawn(async move {
        hub.run().await.unwrap();
    });
    // Connected to every host before the test writes: a hub without a cursor starts live.
    let hosts = net.pds_hosts().len() as u64;
    wait_for(
        "the hub to connect to every host",
        Duration::from_secs(30),
        || metrics.snapshot().sources_connected >= hosts,
    )
    .await;
    task
}

/// Every message of the stream, decoded.
async fn stream_messages(settings: &StreamSettings) -> Vec<BusMessage> {
    stream_messages_on(&nats_url(), settings).await
}

async fn stream_messages_on(nats: &str, settings: &StreamSettings) -> Vec<BusMessage> {
    let client = async_nats::connect(servers(nats)).await.unwrap();
    let js = jetstream::new(client);
    // A cluster that just lost a node answers once it elected new leaders.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (stream, last) = loop {
        let info = async {
            let mut stream = js
                .get_stream(&settings.name)
                .await
                .map_err(|e| e.to_string())?;
            let last = stream
                .info()
                .await
                .map_err(|e| e.to_string())?
                .state
                .last_sequence;
            Ok::<_, String>((stream, last))
        };
        match info.await {
            Ok(found) => break found,
            Err(e) => assert!(std::time::Instant::now() < deadline, "stream info: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut out = Vec::new();
    for seq in 1..=last {
        let raw = loop {
            match stream.get_raw_message(seq).await {
                Ok(raw) => break Some(raw),
                Err(e)
                    if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                {
                    break None;
                }
                Err(e) => assert!(std::time::Instant::now() < deadline, "message {seq}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        if let Some(raw) = raw {
            out.push(BusMessage::decode(&raw.payload).unwrap());
        }
    }
    out
}

/// How many times each note number of `did` is in the stream.
async fn stream_counts(settings: &StreamSettings, did: &str) -> BTreeMap<u64, usize> {
    notes_of(&stream_messages(settings).await, did)
}

/// How many times each note number of `did` is among `messages`.
fn notes_of(messages: &[BusMessage], did: &str) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::new();
    for m in messages {
        if m.did == did
            && m.path
                .as_deref()
                .is_some_and(|p| p.starts_with("test.murmur.note/"))
        {
            let record: murmur_e2e::NoteRecord =
                serde_ipld_dagcbor::from_slice(m.record.as_deref().unwrap()).unwrap();
            *counts.entry(record.n).or_default() += 1;
        }
    }
    counts
}

type Seen = Arc<Mutex<Vec<(String, u64)>>>;

fn consumer_watcher(
    settings: &StreamSettings,
    durable: &str,
    plc: &str,
    seen: Seen,
    rejected_log: Arc<Mutex<Vec<String>>>,
) -> Watcher {
    consumer_watcher_on(
        BusSource::new(nats_url(), durable)
            .stream(settings.clone())
            .start_at(StartAt::All),
        plc,
        seen,
        rejected_log,
    )
}

fn consumer_watcher_on(
    source: BusSource,
    plc: &str,
    seen: Seen,
    rejected_log: Arc<Mutex<Vec<String>>>,
) -> Watcher {
    Watcher::builder()
        .feed(source)
        .plc_url(plc)
        .collections(["test.murmur.*"])
        .handler(move |note: Record<Note>, from: Author| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().unwrap().push((from.0, note.n));
                Ok::<_, HandlerError>(())
            }
        })
        .on_rejected(move |rejected: &Rejected, why: &Rejection| {
            rejected_log
                .lock()
                .unwrap()
                .push(format!("{} {why:?}", rejected.uri()));
        })
        .build()
        .unwrap()
}

fn counts_of(seen: &Seen, did: &str) -> BTreeMap<u64, usize> {
    let mut counts = BTreeMap::new();
    for (d, n) in seen.lock().unwrap().iter() {
        if d == did {
            *counts.entry(*n).or_default() += 1;
        }
    }
    counts
}

fn once_each(range: std::ops::Range<u64>) -> BTreeMap<u64, usize> {
    range.map(|n| (n, 1)).collect()
}

/// One hub, one consumer: every note reaches the handler once, verified from its proof, in
/// order per DID; the consumer's watcher never talks to a PDS for the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_publishes_each_op_once_and_a_consumer_handles_it_once() {
    let net = shared().await;
    let settings = settings("once");
    let hub_task = start_hub(net, &settings).await;
    let (alice, alice_w) = account(net, 0, "busa").await;
    let (bob, bob_w) = account(net, 1, "busb").await;

    let seen: Seen = Arc::default();
    let rejected = Arc::default();
    let watcher = consumer_watcher(
        &settings,
        "once",
        net.plc_url(),
        Arc::clone(&seen),
        Arc::clone(&rejected),
    );
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let consumer = tokio::spawn(watcher.run());

    for n in 0..20 {
        alice_w.create::<Note>(&note(n)).await.unwrap();
        bob_w.create::<Note>(&note(100 + n)).await.unwrap();
    }
    wait_for("40 notes handled", Duration::from_secs(60), || {
        counts_of(&seen, &alice.did).len() + counts_of(&seen, &bob.did).len() >= 40
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(counts_of(&seen, &alice.did), once_each(0..20));
    assert_eq!(counts_of(&seen, &bob.did), once_each(100..120));
    // Per-DID order.
    let alice_order: Vec<u64> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(d, _)| d == &alice.did)
        .map(|(_, n)| *n)
        .collect();
    assert_eq!(alice_order, (0..20).collect::<Vec<_>>());
    assert!(
        rejected.lock().unwrap().is_empty(),
        "{:?}",
        rejected.lock().unwrap()
    );
    // Every op in the stream carries a proof.
    let messages = stream_messages(&settings).await;
    let notes: Vec<_> = messages
        .iter()
        .filter(|m| {
            m.path
                .as_deref()
                .is_some_and(|p| p.starts_with("test.murmur.note/"))
        })
        .collect();
    assert!(notes.len() >= 40);
    assert!(
        notes
            .iter()
            .all(|m| m.proof.is_some() && m.record.is_some())
    );
    assert!(metrics.snapshot().handled >= 40);
    // The hub's cursor of each host is in the key-value bucket, past the notes.
    let kv = jetstream::new(async_nats::connect(nats_url()).await.unwrap())
        .get_key_value(settings.cursor_bucket())
        .await
        .unwrap();
    let last_note_seq = stream_messages(&settings)
        .await
        .iter()
        .filter(|m| m.did == alice.did)
        .map(|m| m.seq)
        .max()
        .unwrap();
    let key = murmur_bus::key_for(murmur_firehose::Source::url(
        &murmur_firehose::SubscribeRepos::new(net.pds(0).unwrap().url()),
    ));
    let mut stored = None;
    for _ in 0..50 {
        stored = kv.get(&key).await.unwrap();
        if stored.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored: i64 = std::str::from_utf8(&stored.expect("a stored cursor"))
        .unwrap()
        .parse()
        .unwrap();
    assert!(stored >= last_note_seq, "cursor {stored} < {last_note_seq}");

    stop.shutdown();
    consumer.await.unwrap().unwrap();
    hub_task.abort();
    cleanup(&settings).await;
}

/// Messages published straight to the stream, not by the hub: an altered record, a record
/// swapped for another's, a proof from another op, a create with no proof for a record that
/// does not exist. None reaches the handler; each goes to on_rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_messages_on_the_bus_never_reach_handlers() {
    let net = shared().await;
    let settings = settings("forged");
    let hub_task = start_hub(net, &settings).await;
    let (alice, alice_w) = account(net, 0, "forger").await;
    alice_w.create::<Note>(&note(1)).await.unwrap();
    alice_w.create::<Note>(&note(2)).await.unwrap();
    wait_for_stream(&settings, &alice.did, 2).await;
    hub_task.abort();

    let originals: Vec<BusMessage> = stream_messages(&settings)
        .await
        .into_iter()
        .filter(|m| {
            m.did == alice.did
                && m.path
                    .as_deref()
                    .is_some_and(|p| p.starts_with("test.murmur.note/"))
        })
        .collect();
    let (one, two) = (&originals[0], &originals[1]);
    let subjects = murmur_bus::Subjects::new(&settings.prefix, settings.partitions).unwrap();
    let subject = subjects
        .op(
            &alice.did,
            murmur_firehose::Action::Create,
            "test.murmur.note",
        )
        .unwrap();

    let mut forged = Vec::new();
    // 1. The record altered (its CID no longer matches).
    let mut m = one.clone();
    m.rev = "forged-1".into();
    m.record = Some(serde_ipld_dagcbor::to_vec(&note(666)).unwrap());
    forged.push(("altered record", m));
    // 2. The record and cid of note 2 under note 1's path and proof.
    let mut m = one.clone();
    m.cid = two.cid;
    m.record = two.record.clone();
    m.rev = "forged-2".into();
    forged.push(("swapped record", m));
    // 3. Note 2's proof for note 1's op (another rev, another path).
    let mut m = one.clone();
    m.proof = two.proof.clone();
    forged.push(("proof of another op", m));
    // 4. A path that does not exist, without proof: the consumer asks the PDS, which has
    //    no such record.
    let mut m = one.clone();
    m.path = Some("test.murmur.note/3forgedrkey22".into());
    m.proof = None;
    forged.push(("no proof, no such record", m));
    // 5. A later rev claimed for note 1 (the proof's commit has another rev).
    let mut m = one.clone();
    m.rev = "3zzzzzzzzzzzz".into();
    forged.push(("rev not the proof's", m));

    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = jetstream::new(client);
    for (what, m) in &forged {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("forged {what}").as_str(),
        );
        js.publish_with_headers(subject.clone(), headers, m.encode().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // And bytes that are no bus message at all.
    js.publish(subject.clone(), b"not cbor".to_vec().into())
        .await
        .unwrap()
        .await
        .unwrap();

    let seen: Seen = Arc::default();
    let rejected: Arc<Mutex<Vec<String>>> = Arc::default();
    let watcher = consumer_watcher(
        &settings,
        "forged",
        net.plc_url(),
        Arc::clone(&seen),
        Arc::clone(&rejected),
    );
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let consumer = tokio::spawn(watcher.run());
    wait_for("the 5 forgeries rejected", Duration::from_secs(30), || {
        rejected.lock().unwrap().len() >= forged.len()
    })
    .await;
    wait_for("the 2 real notes", Duration::from_secs(30), || {
        seen.lock().unwrap().len() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        counts_of(&seen, &alice.did),
        once_each(1..3),
        "only the real notes are handled"
    );
    let log = rejected.lock().unwrap().clone();
    assert_eq!(log.len(), forged.len(), "{log:#?}");
    assert!(log.iter().all(|r| r.contains("Verification")), "{log:#?}");
    assert!(
        metrics.snapshot().errors >= 1,
        "the undecodable message is reported"
    );

    stop.shutdown();
    consumer.await.unwrap().unwrap();
    cleanup(&settings).await;
}

async fn wait_for_stream(settings: &StreamSettings, did: &str, notes: usize) {
    for _ in 0..300 {
        if stream_counts(settings, did).await.len() >= notes {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the stream never held {notes} notes of {did}");
}

/// Two hubs on the same hosts at once, one of them killed mid-run and started again: every op
/// is in the stream exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_and_a_killed_hub_store_each_op_once() {
    let net = shared().await;
    let settings = settings("ha");
    let first = start_hub(net, &settings).await;
    let second = start_hub(net, &settings).await;
    let (alice, alice_w) = account(net, 0, "hubha").await;
    let writes = async {
        for n in 0..60 {
            alice_w.create::<Note>(&note(n)).await.unwrap();
        }
    };
    let killer = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        first.abort();
        tokio::time::sleep(Duration::from_millis(700)).await;
        // Boxed in an Option: an async block yielding a JoinHandle reads as a missed await.
        Some(start_hub(net, &settings).await)
    };
    let (_, restarted) = tokio::join!(writes, killer);
    let restarted = restarted.expect("the restarted hub");
    wait_for_stream(&settings, &alice.did, 60).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(stream_counts(&settings, &alice.did).await, once_each(0..60));
    second.abort();
    restarted.abort();
    cleanup(&settings).await;
}

/// A consumer killed while a handler runs: the op comes back to the next consumer on the same
/// durable name, and its effect happens once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_handler_leaves_the_op_to_its_successor() {
    let net = shared().await;
    let settings = settings("kill");
    let hub_task = start_hub(net, &settings).await;
    let (alice, alice_w) = account(net, 0, "killc").await;

    let started = Arc::new(AtomicUsize::new(0));
    let effects: Seen = Arc::default();
    let slow_watcher = |started: Arc<AtomicUsize>, effects: Seen, slow: bool| {
        short_ack_watcher(net, &settings, "killc", &alice.did)
            .handler(move |note: Record<Note>, from: Author, _c: CommitInfo| {
                let (started, effects) = (Arc::clone(&started), Arc::clone(&effects));
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    if slow && note.n == 3 {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    effects.lock().unwrap().push((from.0, note.n));
                    Ok::<_, HandlerError>(())
                }
            })
            .build()
            .unwrap()
    };
    let first = tokio::spawn(slow_watcher(Arc::clone(&started), Arc::clone(&effects), true).run());
    for n in 0..6 {
        alice_w.create::<Note>(&note(n)).await.unwrap();
    }
    wait_for(
        "the handler of note 3 to start",
        Duration::from_secs(30),
        || effects.lock().unwrap().len() >= 3 && started.load(Ordering::SeqCst) >= 4,
    )
    .await;
    first.abort(); // the process dies mid-handler
    let _ = first.await;
    assert!(!effects.lock().unwrap().iter().any(|(_, n)| *n == 3));

    let second = slow_watcher(Arc::new(AtomicUsize::new(0)), Arc::clone(&effects), false);
    let stop = second.shutdown_handle();
    let second = tokio::spawn(second.run());
    wait_for("all 6 effects", Duration::from_secs(30), || {
        counts_of(&effects, &alice.did).len() >= 6
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(counts_of(&effects, &alice.did), once_each(0..6));
    stop.shutdown();
    second.await.unwrap().unwrap();
    hub_task.abort();
    cleanup(&settings).await;
}

/// Notes each of the two accounts of a fault run writes.
const FAULT_NOTES: u64 = 40;

/// One fault, end to end: a hub and a bus consumer on `nats` (one URL or several,
/// comma-separated), an account on each PDS host writing notes while `fault` runs. Then every
/// note is in the stream exactly once (one message id each) and its handler ran exactly once.
async fn fault_run(
    tag: &str,
    nats: &str,
    settings: StreamSettings,
    fault: impl Future<Output = ()>,
) {
    let net = shared().await;
    let hub_task = start_hub_on(net, nats, &settings).await;
    let (alice, alice_w) = account(net, 0, &format!("{tag}a")).await;
    let (bob, bob_w) = account(net, 1, &format!("{tag}b")).await;

    let seen: Seen = Arc::default();
    let rejected: Arc<Mutex<Vec<String>>> = Arc::default();
    let watcher = consumer_watcher_on(
        BusSource::new(nats, tag)
            .stream(settings.clone())
            .start_at(StartAt::All)
            .ack_wait(Duration::from_secs(4)),
        net.plc_url(),
        Arc::clone(&seen),
        Arc::clone(&rejected),
    );
    let stop = watcher.shutdown_handle();
    let consumer = tokio::spawn(watcher.run());

    let started = std::time::Instant::now();
    let write = |writer: murmur_pds::Writer, first: u64| async move {
        for n in first..first + FAULT_NOTES {
            writer.create::<Note>(&note(n)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    };
    tokio::join!(write(alice_w, 0), write(bob_w, 1000), fault);
    eprintln!("{tag}: writes and fault done in {:?}", started.elapsed());
    wait_for("every note handled", Duration::from_secs(90), || {
        counts_of(&seen, &alice.did).len() + counts_of(&seen, &bob.did).len()
            >= 2 * FAULT_NOTES as usize
    })
    .await;
    eprintln!("{tag}: every note handled after {:?}", started.elapsed());
    // Long enough for a repeat to show: a message whose ack was lost comes back after ack_wait.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let messages = stream_messages_on(nats, &settings).await;
    assert_eq!(
        notes_of(&messages, &alice.did),
        once_each(0..FAULT_NOTES),
        "alice's notes in the stream"
    );
    assert_eq!(
        notes_of(&messages, &bob.did),
        once_each(1000..1000 + FAULT_NOTES),
        "bob's notes in the stream"
    );
    let mut ids = std::collections::HashSet::new();
    for m in &messages {
        assert!(
            ids.insert(m.msg_id()),
            "message id {} twice in the stream",
            m.msg_id()
        );
    }
    assert_eq!(
        counts_of(&seen, &alice.did),
        once_each(0..FAULT_NOTES),
        "alice's notes handled"
    );
    assert_eq!(
        counts_of(&seen, &bob.did),
        once_each(1000..1000 + FAULT_NOTES),
        "bob's notes handled"
    );
    assert!(
        rejected.lock().unwrap().is_empty(),
        "{:?}",
        rejected.lock().unwrap()
    );

    stop.shutdown();
    tokio::time::timeout(Duration::from_secs(30), consumer)
        .await
        .expect("the consumer stops")
        .unwrap()
        .unwrap();
    hub_task.abort();
}

/// The NATS server killed (SIGKILL) mid-run and started again on its port and store: the hub
/// and the consumer reconnect; nothing is lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_server_restarted_mid_run_loses_and_repeats_nothing() {
    let server = tokio::task::spawn_blocking(|| NatsServer::start(Default::default()))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"));
    let server = Arc::new(server);
    let url = server.url().to_string();
    let fault = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let server = Arc::clone(&server);
        tokio::task::spawn_blocking(move || {
            server.kill();
            std::thread::sleep(Duration::from_secs(1));
            server.restart().unwrap_or_else(|e| panic!("{e}"));
        })
        .await
        .unwrap();
    };
    fault_run("natsrestart", &url, settings("natsrestart"), fault).await;
}

/// A 3-node cluster with an R3 stream, the stream's leader killed mid-run (and left down):
/// hub and consumer, given every node's URL, go on with the other two; nothing is lost or
/// repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_r3_stream_losing_a_node_mid_run_loses_and_repeats_nothing() {
    let cluster = tokio::task::spawn_blocking(|| NatsCluster::start(3))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"));
    let cluster = Arc::new(cluster);
    let urls = cluster.urls().join(",");
    let mut settings = settings("r3");
    settings.replicas = 3;
    let fault = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let client = async_nats::connect(servers(&urls)).await.unwrap();
        let mut stream = jetstream::new(client)
            .get_stream(&settings.name)
            .await
            .unwrap();
        let info = stream.info().await.unwrap();
        let leader = info
            .cluster
            .clone()
            .and_then(|c| c.leader)
            .expect("an R3 stream has a leader");
        eprintln!("killing {leader}, the stream's leader");
        let cluster = Arc::clone(&cluster);
        tokio::task::spawn_blocking(move || {
            cluster.node_named(&leader).expect("one of ours").kill();
        })
        .await
        .unwrap();
    };
    fault_run("r3", &urls, settings.clone(), fault).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_op_whose_handler_fails_goes_to_the_dead_letter_stream_once() {
    let net = shared().await;
    let settings = settings("dead");
    let hub_task = start_hub(net, &settings).await;
    let (alice, alice_w) = account(net, 0, "deadl").await;

    let effects: Seen = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (effects, calls) = (Arc::clone(&effects), Arc::clone(&calls));
        short_ack_watcher(net, &settings, "deadl", &alice.did)
            .handler(move |note: Record<Note>, from: Author| {
                let (effects, calls) = (Arc::clone(&effects), Arc::clone(&calls));
                async move {
                    if note.n == 2 {
                        calls.fetch_add(1, Ordering::SeqCst);
                        return Err(HandlerError::fail("note 2 cannot be handled"));
                    }
                    effects.lock().unwrap().push((from.0, note.n));
                    Ok(())
                }
            })
            .build()
            .unwrap()
    };
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    for n in 0..5 {
        alice_w.create::<Note>(&note(n)).await.unwrap();
    }
    wait_for("the other notes", Duration::from_secs(30), || {
        counts_of(&effects, &alice.did).len() >= 4
    })
    .await;

    // The failed op is in the dead-letter stream once, with its reason, and is not delivered
    // again (terminated): the handler ran once, and the DID's later ops went on.
    let js = jetstream::new(async_nats::connect(nats_url()).await.unwrap());
    let mut dead = js.get_stream(settings.dead_letter_stream()).await.unwrap();
    wait_for_async_count(&mut dead, 1).await;
    let raw = dead.get_raw_message(1).await.unwrap();
    let letter = BusMessage::decode(&raw.payload).unwrap();
    assert_eq!(letter.did, alice.did);
    let headers = raw.headers;
    assert!(
        headers
            .get("Murmur-Error")
            .is_some_and(|v| v.as_str().contains("note 2 cannot be handled")),
        "{headers:?}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await; // past ack_wait: no redelivery
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(dead.info().await.unwrap().state.messages, 1);
    let mut expected = once_each(0..5);
    expected.remove(&2);
    assert_eq!(counts_of(&effects, &alice.did), expected);

    stop.shutdown();
    running.await.unwrap().unwrap();
    hub_task.abort();
    cleanup(&settings).await;
}

/// A watcher of `did`'s notes on the bus through durable `durable`, from the stream's start,
/// whose unacknowledged messages come back after 2 s.
fn short_ack_watcher(
    net: &Devnet,
    settings: &StreamSettings,
    durable: &str,
    did: &str,
) -> murmur_firehose::WatcherBuilder {
    Watcher::builder()
        .feed(
            BusSource::new(nats_url(), durable)
                .stream(settings.clone())
                .start_at(StartAt::All)
                .ack_wait(Duration::from_secs(2)),
        )
        .plc_url(net.plc_url())
        .collections(["test.murmur.*"])
        .dids([did.to_string()])
}

/// Waits until `stream` holds `n` messages.
async fn wait_for_async_count(stream: &mut jetstream::stream::Stream, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let have = stream.info().await.unwrap().state.messages;
        if have >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{have} of {n} messages"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_split_by_partition_handles_each_op_once_in_per_did_order() {
    let net = shared().await;
    let settings = settings("pool"); // 4 partitions
    let hub_task = start_hub(net, &settings).await;
    let mut writers = Vec::new();
    for i in 0..6 {
        writers.push(account(net, i % 2, &format!("pool{i}")).await);
    }

    // Two members: the first owns partitions 0 and 1, the second 2 and 3; one durable per
    // partition, one feed each.
    let handled: Arc<Mutex<Vec<(usize, String, u64)>>> = Arc::default();
    let members: Vec<(usize, [u16; 2])> = vec![(0, [0, 1]), (1, [2, 3])];
    let mut running = Vec::new();
    for (member, owned) in &members {
        let mut builder = Watcher::builder();
        for k in owned {
            builder = builder.feed(
                BusSource::new(nats_url(), format!("pool-p{k}"))
                    .stream(settings.clone())
                    .start_at(StartAt::All)
                    .partition(*k),
            );
        }
        let (handled, member) = (Arc::clone(&handled), *member);
        let watcher = builder
            .plc_url(net.plc_url())
            .collections(["test.murmur.*"])
            .dids(writers.iter().map(|(a, _)| a.did.clone()))
            .handler(move |note: Record<Note>, from: Author| {
                let handled = Arc::clone(&handled);
                async move {
                    // Long enough for two ops of one DID to overlap if order were not kept.
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(1..15))).await;
                    handled.lock().unwrap().push((member, from.0, note.n));
                    Ok::<_, HandlerError>(())
                }
            })
            .build()
            .unwrap();
        let stop = watcher.shutdown_handle();
        running.push((stop, tokio::spawn(watcher.run())));
    }
    const NOTES: u64 = 8;
    let mut writes = Vec::new();
    for (_, w) in &writers {
        let w = w.clone();
        writes.push(tokio::spawn(async move {
            for n in 0..NOTES {
                w.create::<Note>(&note(n)).await.unwrap();
            }
        }));
    }
    for w in writes {
        w.await.unwrap();
    }
    let total = writers.len() * NOTES as usize;
    wait_for("every note handled", Duration::from_secs(60), || {
        handled.lock().unwrap().len() >= total
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let handled = handled.lock().unwrap().clone();
    assert_eq!(handled.len(), total, "each op once: {handled:?}");
    for (account, _) in &writers {
        let of_did: Vec<&(usize, String, u64)> = handled
            .iter()
            .filter(|(_, d, _)| *d == account.did)
            .collect();
        let order: Vec<u64> = of_did.iter().map(|(_, _, n)| *n).collect();
        assert_eq!(order, (0..NOTES).collect::<Vec<_>>(), "{}", account.did);
        let partition = murmur_bus::subject::partition_of(&account.did, settings.partitions);
        let owner = members
            .iter()
            .find(|(_, owned)| owned.contains(&partition))
            .map(|(m, _)| *m)
            .unwrap();
        assert!(
            of_did.iter().all(|(m, _, _)| *m == owner),
            "{} (partition {partition}) handled off its owner: {of_did:?}",
            account.did
        );
    }
    for (stop, task) in running {
        stop.shutdown();
        task.await.unwrap().unwrap();
    }
    hub_task.abort();
    cleanup(&settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_sharing_one_durable_handles_each_op_once() {
    let net = shared().await;
    let settings = settings("shared");
    let hub_task = start_hub(net, &settings).await;
    let (alice, alice_w) = account(net, 0, "shareda").await;
    let (bob, bob_w) = account(net, 1, "sharedb").await;

    let handled: Arc<Mutex<Vec<(usize, String, u64)>>> = Arc::default();
    let mut running = Vec::new();
    for member in 0..2 {
        let handled = Arc::clone(&handled);
        let watcher = Watcher::builder()
            .feed(
                BusSource::new(nats_url(), "shared")
                    .stream(settings.clone())
                    .start_at(StartAt::All),
            )
            .plc_url(net.plc_url())
            .collections(["test.murmur.*"])
            .dids([alice.did.clone(), bob.did.clone()])
            .handler(move |note: Record<Note>, from: Author| {
                let handled = Arc::clone(&handled);
                async move {
                    handled.lock().unwrap().push((member, from.0, note.n));
                    Ok::<_, HandlerError>(())
                }
            })
            .build()
            .unwrap();
        let stop = watcher.shutdown_handle();
        running.push((stop, tokio::spawn(watcher.run())));
    }
    for n in 0..20 {
        alice_w.create::<Note>(&note(n)).await.unwrap();
        bob_w.create::<Note>(&note(n)).await.unwrap();
    }
    wait_for("every note handled", Duration::from_secs(60), || {
        handled.lock().unwrap().len() >= 40
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let handled = handled.lock().unwrap().clone();
    let once = |did: &str| {
        let mut counts = BTreeMap::new();
        for (_, d, n) in &handled {
            if d == did {
                *counts.entry(*n).or_default() += 1;
            }
        }
        counts
    };
    assert_eq!(once(&alice.did), once_each(0..20), "{handled:?}");
    assert_eq!(once(&bob.did), once_each(0..20), "{handled:?}");
    for (stop, task) in running {
        stop.shutdown();
        task.await.unwrap().unwrap();
    }
    hub_task.abort();
    cleanup(&settings).await;
}
