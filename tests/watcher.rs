//! The watcher against the real local network: delivery, ordering, restarts, faults, retries,
//! dead letters, rejections, backpressure, wss:// through a TLS proxy.
//!
//! Records use a small fixture collection (`test.murmur.note`) so these tests exercise the
//! watcher alone; the agent.comms types are exercised by the agent tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atrium_api::types::Collection;
use murmur_devnet::{Devnet, DevnetConfig};
use murmur_e2e::{Note, NoteRecord, account, account_xrpc, note, shared, wait_for};
use murmur_firehose::{
    Author, CommitInfo, Created, DeadLetterStore, FileDeadLetterStore, HandlerError, OpEvent,
    Record, State, Watcher, handler,
};
use murmur_pds::Writer;

#[derive(Debug)]
struct Other;

impl Collection for Other {
    const NSID: &'static str = "test.murmur.other";
    type Record = NoteRecord;
}

/// Writes `count` notes in batches of `batch` (1 = single creates).
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

type Seen = Arc<Mutex<Vec<(String, u64)>>>;

fn assert_exactly_once_in_order(seen: &[(String, u64)], expected: &HashMap<String, u64>) {
    let mut per_did: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (did, n) in seen {
        per_did.entry(did).or_default().push(*n);
    }
    for (did, count) in expected {
        let got = per_did.get(did.as_str()).cloned().unwrap_or_default();
        let want: Vec<u64> = (0..*count).collect();
        assert_eq!(got, want, "records of {did}: exactly once, in order");
    }
    assert_eq!(
        per_did.len(),
        expected.len(),
        "records from unexpected repos"
    );
}

#[handler]
async fn record_note(
    note: Record<Note>,
    from: Author,
    _commit: CommitInfo,
    State(seen): State<Seen>,
) -> Result<(), HandlerError> {
    seen.lock().unwrap().push((from.0, note.n));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_records_from_two_pds_reach_handlers_exactly_once_in_order() {
    let net = shared().await;
    let mut accounts = Vec::new();
    for (pds, name) in [(0, "w1a"), (0, "w1b"), (1, "w1c"), (1, "w1d")] {
        accounts.push(account(net, pds, name).await);
    }
    let seen: Seen = Arc::default();
    let other_seen = Arc::new(Mutex::new(0usize));
    let other = Arc::clone(&other_seen);
    let watcher = Watcher::builder()
        .pds(net.pds(0).unwrap().url())
        .pds(net.pds(1).unwrap().url())
        .plc_url(net.plc_url())
        .start_cursor(0)
        .dids(accounts.iter().map(|(a, _)| a.did.clone()))
        .collections(["test.murmur.*"])
        .state(Arc::clone(&seen))
        .handler(record_note)
        .handler(move |_rec: Created<Other>, _op: OpEvent| {
            let other = Arc::clone(&other);
            async move {
                *other.lock().unwrap() += 1;
                Ok(())
            }
        })
        .build()
        .unwrap();
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());

    let started = Instant::now();
    let mut writes = Vec::new();
    for (i, (_, writer)) in accounts.iter().enumerate() {
        let writer = writer.clone();
        writes.push(tokio::spawn(async move {
            // Mix single creates and applyWrites batches; 250 notes per repo.
            write_notes(&writer, 0..50, 1).await;
            write_notes(&writer, 50..250, if i % 2 == 0 { 50 } else { 25 }).await;
            // Records of a collection the note handler does not take.
            writer.create::<Other>(&note(9_999)).await.unwrap();
        }));
    }
    for w in writes {
        w.await.unwrap();
    }
    let expected: HashMap<String, u64> =
        accounts.iter().map(|(a, _)| (a.did.clone(), 250)).collect();
    wait_for("1,000 records", Duration::from_secs(60), || {
        seen.lock().unwrap().len() >= 1000 && *other_seen.lock().unwrap() >= 4
    })
    .await;
    let elapsed = started.elapsed();
    // Give stragglers a moment to show up as duplicates if there were any.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.shutdown();
    running.await.unwrap().unwrap();
    assert_exactly_once_in_order(&seen.lock().unwrap(), &expected);
    assert_eq!(
        *other_seen.lock().unwrap(),
        4,
        "other collection: its own handler only"
    );
    let m = metrics.snapshot();
    assert_eq!(m.rejected, 0, "{m:?}");
    assert_eq!(m.handled, 1004, "{m:?}");
    eprintln!("1,004 records written and handled in {elapsed:?}; metrics {m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_kill_loses_nothing_and_repeats_no_effect() {
    let net = shared().await;
    let (alice, writer) = account(net, 0, "restart").await;
    let state = tempfile::tempdir().unwrap();
    // Effects are keyed by the op's idempotency key; `runs` counts every handler run.
    let effects: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let runs = Arc::new(Mutex::new(0usize));
    let start_watcher = || {
        let (effects, runs) = (Arc::clone(&effects), Arc::clone(&runs));
        Watcher::builder()
            .pds(net.pds(0).unwrap().url())
            .plc_url(net.plc_url())
            .start_cursor(0)
            .dids([alice.did.clone()])
            .state_dir(state.path())
            .handler(move |rec: Created<Note>, op: OpEvent| {
                let (effects, runs) = (Arc::clone(&effects), Arc::clone(&runs));
                async move {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    *runs.lock().unwrap() += 1;
                    let key = format!("{:?}", op.key());
                    effects.lock().unwrap().entry(key).or_insert(rec.n);
                    Ok(())
                }
            })
            .build()
            .unwrap()
    };

    let first = tokio::spawn(start_watcher().run());
    let writing = {
        let writer = writer.clone();
        tokio::spawn(async move { write_notes(&writer, 0..300, 10).await })
    };
    wait_for("a third of the records", Duration::from_secs(60), || {
        effects.lock().unwrap().len() >= 100
    })
    .await;
    // Kill: no graceful shutdown, no final cursor flush.
    first.abort();
    let _ = first.await;
    let handled_before_kill = effects.lock().unwrap().len();
    writing.await.unwrap();

    let second = start_watcher();
    let stop = second.shutdown_handle();
    let metrics = second.metrics();
    let running = tokio::spawn(second.run());
    wait_for("all 300 records", Duration::from_secs(60), || {
        effects.lock().unwrap().len() >= 300
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.shutdown();
    running.await.unwrap().unwrap();

    let effects = effects.lock().unwrap();
    let mut ns: Vec<u64> = effects.values().copied().collect();
    ns.sort_unstable();
    assert_eq!(
        ns,
        (0..300).collect::<Vec<_>>(),
        "every record handled once"
    );
    let runs = *runs.lock().unwrap();
    let skipped = metrics.snapshot().skipped_duplicates;
    eprintln!(
        "killed after {handled_before_kill} records; handler runs {runs} for 300 records; \
         {skipped} replayed ops skipped by the dedup store"
    );
    // A kill between a handler's effect and its dedup mark may re-run that one op (at-least-once);
    // everything the dedup store recorded is never re-run.
    assert!(
        runs <= 300 + 2,
        "handlers re-ran {} times after the restart",
        runs - 300
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pds_restart_mid_run_loses_nothing() {
    let net = tokio::task::spawn_blocking(|| Devnet::start(DevnetConfig::default()))
        .await
        .unwrap()
        .unwrap();
    let net = Arc::new(net);
    let (alice, writer) = account(&net, 0, "fault").await;
    let seen: Seen = Arc::default();
    let watcher = Watcher::builder()
        .pds(net.pds(0).unwrap().url())
        .plc_url(net.plc_url())
        .start_cursor(0)
        .dids([alice.did.clone()])
        .reconnect(murmur_firehose::Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            ..Default::default()
        })
        .state(Arc::clone(&seen))
        .handler(record_note)
        .build()
        .unwrap();
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());

    write_notes(&writer, 0..100, 10).await;
    wait_for("first 100", Duration::from_secs(30), || {
        seen.lock().unwrap().len() >= 100
    })
    .await;
    let n = Arc::clone(&net);
    tokio::task::spawn_blocking(move || n.pds(0).unwrap().stop())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n = Arc::clone(&net);
    tokio::task::spawn_blocking(move || n.pds(0).unwrap().start())
        .await
        .unwrap()
        .unwrap();
    let writer = Writer::login(&alice.pds_url, &alice.did, "password-1")
        .await
        .unwrap();
    write_notes(&writer, 100..200, 10).await;
    wait_for("all 200", Duration::from_secs(60), || {
        seen.lock().unwrap().len() >= 200
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.shutdown();
    running.await.unwrap().unwrap();
    let expected = HashMap::from([(alice.did.clone(), 200)]);
    assert_exactly_once_in_order(&seen.lock().unwrap(), &expected);
    assert!(
        metrics.snapshot().reconnects >= 1,
        "{:?}",
        metrics.snapshot()
    );
    tokio::task::spawn_blocking(move || drop(net))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_then_dead_letters_and_goes_on() {
    let net = shared().await;
    let (alice, writer) = account(net, 1, "retry").await;
    let state = tempfile::tempdir().unwrap();
    let attempts: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let a = Arc::clone(&attempts);
    let watcher = Watcher::builder()
        .pds(net.pds(1).unwrap().url())
        .plc_url(net.plc_url())
        .start_cursor(0)
        .dids([alice.did.clone()])
        .state_dir(state.path())
        .retry(murmur_firehose::Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(50),
            factor: 2.0,
            max_attempts: Some(3),
        })
        .handler(move |rec: Created<Note>, _op: OpEvent| {
            let a = Arc::clone(&a);
            async move {
                let attempt = {
                    let mut a = a.lock().unwrap();
                    let e = a.entry(rec.n).or_default();
                    *e += 1;
                    *e
                };
                match rec.n {
                    // Fails twice, then succeeds.
                    1 if attempt <= 2 => Err(HandlerError::retry("flaky dependency")),
                    // Always fails.
                    2 => Err(HandlerError::retry("dependency down")),
                    // Fails permanently at once.
                    3 => Err(HandlerError::fail("bad payload")),
                    _ => Ok(()),
                }
            }
        })
        .build()
        .unwrap();
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    write_notes(&writer, 0..6, 1).await;
    wait_for(
        "all six handled or dead-lettered",
        Duration::from_secs(30),
        || {
            let m = metrics.snapshot();
            m.handled + m.dead_lettered >= 6
        },
    )
    .await;
    stop.shutdown();
    running.await.unwrap().unwrap();

    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts[&1], 3, "failed twice, then succeeded");
    assert_eq!(attempts[&2], 4, "first try + 3 retries");
    assert_eq!(attempts[&3], 1, "permanent failures are not retried");
    for n in [0, 4, 5] {
        assert_eq!(attempts[&n], 1);
    }
    let letters = FileDeadLetterStore::new(state.path().join("dead-letters.jsonl"))
        .list()
        .await
        .unwrap();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(letters[0].error.contains("dependency down"), "{letters:?}");
    assert_eq!(letters[0].attempts, 4);
    assert!(letters[1].error.contains("bad payload"), "{letters:?}");
    let m = metrics.snapshot();
    assert_eq!((m.handled, m.dead_lettered, m.retries), (4, 2, 5), "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_records_never_reach_typed_handlers() {
    let net = shared().await;
    let (alice, writer) = account(net, 0, "reject").await;
    let seen: Seen = Arc::default();
    let rejected: Arc<Mutex<Vec<String>>> = Arc::default();
    let r = Arc::clone(&rejected);
    let watcher = Watcher::builder()
        .pds(net.pds(0).unwrap().url())
        .plc_url(net.plc_url())
        .start_cursor(0)
        .dids([alice.did.clone()])
        .state(Arc::clone(&seen))
        .handler(record_note)
        .on_rejected(move |rejected, why| {
            let path = &rejected.op().expect("an op").data().path;
            r.lock().unwrap().push(format!("{path} {why}"))
        })
        .build()
        .unwrap();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());

    // The writer refuses invalid records, so write them the way a hostile agent would.
    let http = reqwest::Client::new();
    for record in [
        serde_json::json!({"$type": "test.murmur.note", "text": "INVALID text", "n": 1, "createdAt": "x"}),
        serde_json::json!({"$type": "test.murmur.note", "text": "wrong shape", "n": "one"}),
    ] {
        http.post(format!("{}/xrpc/com.atproto.repo.createRecord", alice.pds_url))
            .bearer_auth(&alice.access_jwt)
            .json(&serde_json::json!({"repo": alice.did, "collection": "test.murmur.note", "record": record}))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap();
    }
    writer.create::<Note>(&note(0)).await.unwrap();
    wait_for("the valid record", Duration::from_secs(30), || {
        !seen.lock().unwrap().is_empty()
    })
    .await;
    wait_for("two rejections", Duration::from_secs(10), || {
        rejected.lock().unwrap().len() >= 2
    })
    .await;
    stop.shutdown();
    running.await.unwrap().unwrap();
    assert_eq!(seen.lock().unwrap().as_slice(), &[(alice.did.clone(), 0)]);
    let rejected = rejected.lock().unwrap();
    assert!(
        rejected[0].contains("breaks lexicon") && rejected[0].contains("$.text"),
        "{rejected:?}"
    );
    assert!(rejected[1].contains("does not decode"), "{rejected:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handler_bounds_the_queue() {
    let net = shared().await;
    let (alice, writer) = account(net, 1, "slow").await;
    let done = Arc::new(Mutex::new(0usize));
    let d = Arc::clone(&done);
    const CAPACITY: usize = 8;
    let watcher = Watcher::builder()
        .pds(net.pds(1).unwrap().url())
        .plc_url(net.plc_url())
        .start_cursor(0)
        .dids([alice.did.clone()])
        .queue_capacity(CAPACITY)
        .handler(move |_rec: Created<Note>, _op: OpEvent| {
            let d = Arc::clone(&d);
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                *d.lock().unwrap() += 1;
                Ok(())
            }
        })
        .build()
        .unwrap();
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    // A fast writer: 400 records in batches of 100, far faster than 20 ms per record.
    write_notes(&writer, 0..400, 100).await;
    let mut max_depth = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while *done.lock().unwrap() < 400 {
        assert!(Instant::now() < deadline, "slow handler did not finish");
        max_depth = max_depth.max(metrics.snapshot().queue_depth);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.shutdown();
    running.await.unwrap().unwrap();
    assert!(max_depth as usize <= CAPACITY, "queue grew to {max_depth}");
    assert!(
        max_depth >= 2,
        "the queue was never exercised ({max_depth})"
    );
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM"))
                .map(str::to_string)
        })
        .unwrap_or_default();
    eprintln!(
        "slow handler: max queue depth {max_depth} (capacity {CAPACITY}); peak RSS of the test process: {rss}"
    );
}

/// A TLS-terminating proxy on 127.0.0.1 in front of `upstream` (`http://host:port`), with a
/// certificate for `localhost` issued by a fresh private CA. Returns the proxy's port and a
/// client configuration trusting that CA.
async fn tls_proxy(upstream: &str) -> (u16, Arc<rustls::ClientConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();

    let upstream = upstream
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (port, Arc::new(client))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_source_over_tls_delivers_and_checks_the_certificate() {
    let net = shared().await;
    let (alice, writer) = account(net, 0, "tls").await;
    let (port, client_tls) = tls_proxy(net.pds(0).unwrap().url()).await;
    let wss = format!("wss://localhost:{port}");

    // The default roots (webpki) do not include the private CA: a typed transport error
    // naming the certificate problem.
    let refused =
        murmur_firehose::Source::connect(&murmur_firehose::SubscribeRepos::new(&wss), None)
            .await
            .err()
            .expect("an untrusted certificate must not connect");
    match &refused {
        murmur_firehose::SourceError::Transport(msg) => {
            assert!(msg.to_lowercase().contains("certificate"), "{msg}")
        }
        other => panic!("expected a transport error, got {other:?}"),
    }

    write_notes(&writer, 0..20, 5).await;
    let seen: Seen = Arc::default();
    let watcher = Watcher::builder()
        .source(murmur_firehose::SubscribeRepos::new(&wss).with_tls_config(client_tls))
        .plc_url(net.plc_url())
        .start_cursor(0)
        .dids([alice.did.clone()])
        .state(Arc::clone(&seen))
        .handler(record_note)
        .build()
        .unwrap();
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for("20 records over wss", Duration::from_secs(30), || {
        seen.lock().unwrap().len() >= 20
    })
    .await;
    let live = metrics.snapshot();
    assert_eq!((live.sources, live.sources_connected), (1, 1), "{live:?}");
    stop.shutdown();
    running.await.unwrap().unwrap();
    assert_eq!(metrics.snapshot().sources_connected, 0);
    let expected = HashMap::from([(alice.did.clone(), 20)]);
    assert_exactly_once_in_order(&seen.lock().unwrap(), &expected);
}

/// Frames from memory, then an open, silent stream.
struct Replay(Arc<Vec<Vec<u8>>>);

#[async_trait::async_trait]
impl murmur_firehose::Source for Replay {
    fn url(&self) -> &str {
        "memory://replay"
    }

    async fn connect(
        &self,
        _cursor: Option<i64>,
    ) -> Result<murmur_firehose::MessageStream, murmur_firehose::SourceError> {
        use futures_util::StreamExt;
        let items: Vec<_> = self
            .0
            .iter()
            .map(|f| Ok(murmur_firehose::SourceMessage::Frame(f.clone().into())))
            .collect();
        Ok(Box::pin(
            futures_util::stream::iter(items).chain(futures_util::stream::pending()),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_break_reports_a_gap_and_refetches_the_verified_repo() {
    use futures_util::StreamExt;
    use murmur_sync::Frame;
    let net = shared().await;
    let (alice, writer) = account(net, 0, "resync").await;
    let mut paths = Vec::new();
    for n in 0..3 {
        let created = writer.create::<Note>(&note(n)).await.unwrap();
        paths.push(format!(
            "{}/{}",
            Note::NSID,
            created.uri.rsplit('/').next().unwrap()
        ));
    }

    // Record alice's real frames from the PDS, then replay them with the second note's
    // commit missing: a missed event, as after a dropped connection past the replay window.
    let ws = format!(
        "{}/xrpc/com.atproto.sync.subscribeRepos?cursor=0",
        net.pds(0).unwrap().url().replacen("http", "ws", 1)
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(ws).await.unwrap();
    let mut frames = Vec::new();
    let mut note_commits = 0;
    while note_commits < 3 {
        let msg = tokio::time::timeout(Duration::from_secs(20), socket.next())
            .await
            .expect("alice's commits on the stream")
            .unwrap()
            .unwrap();
        let tokio_tungstenite::tungstenite::Message::Binary(bytes) = msg else {
            continue;
        };
        let frame = Frame::decode(&bytes).unwrap();
        if frame.did() != Some(alice.did.as_str()) {
            continue;
        }
        if let Frame::Commit(c) = &frame
            && c.ops.iter().any(|op| op.collection() == Note::NSID)
        {
            note_commits += 1;
            if note_commits == 2 {
                continue; // the missed event
            }
        }
        frames.push(bytes.to_vec());
    }

    let seen: Seen = Arc::default();
    let gaps = Arc::new(Mutex::new(Vec::new()));
    let resynced = Arc::new(Mutex::new(Vec::new()));
    let (g, r) = (Arc::clone(&gaps), Arc::clone(&resynced));
    let watcher = Watcher::builder()
        .source(Replay(Arc::new(frames)))
        .plc_url(net.plc_url())
        .state(Arc::clone(&seen))
        .handler(record_note)
        .on_gap(move |gap| g.lock().unwrap().push(gap.kind.clone()))
        .on_resync(move |did, repo| r.lock().unwrap().push((did.to_string(), repo)))
        .build()
        .unwrap();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for("the re-fetched repo", Duration::from_secs(20), || {
        !resynced.lock().unwrap().is_empty()
    })
    .await;
    stop.shutdown();
    running.await.unwrap().unwrap();

    let notes: Vec<u64> = seen.lock().unwrap().iter().map(|(_, n)| *n).collect();
    assert_eq!(notes, vec![0, 2], "the stream delivered what it carried");
    assert_eq!(
        *gaps.lock().unwrap(),
        vec![murmur_firehose::GapKind::ChainBreak {
            did: alice.did.clone()
        }]
    );
    let resynced = resynced.lock().unwrap();
    let [(did, Ok(repo))] = &resynced[..] else {
        panic!("one successful re-fetch expected, got {resynced:?}")
    };
    assert_eq!(did, &alice.did);
    assert_eq!(repo.level, murmur_sync::VerifyLevel::Full);
    let in_repo: Vec<&str> = repo
        .records
        .iter()
        .filter(|r| r.collection() == Note::NSID)
        .map(|r| r.path.as_str())
        .collect();
    let mut want: Vec<&str> = paths.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(in_repo, want, "the repo shows the note the stream missed");
    let missed: NoteRecord = serde_ipld_dagcbor::from_slice(
        &repo
            .records
            .iter()
            .find(|r| r.path == paths[1])
            .unwrap()
            .record,
    )
    .unwrap();
    assert_eq!(missed.n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_account_events_reach_their_handlers_in_order_with_commits() {
    use murmur_firehose::{AccountStatus, Identity};
    let net = shared().await;
    let (alice, writer) = account(net, 0, "events").await;
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let (l1, l2, l3) = (Arc::clone(&log), Arc::clone(&log), Arc::clone(&log));
    let watcher = Watcher::builder()
        .pds(net.pds(0).unwrap().url())
        .plc_url(net.plc_url())
        .dids([alice.did.clone()])
        .collections([Note::NSID])
        .handler(move |note: Created<Note>| {
            l1.lock().unwrap().push(format!("note {}", note.n));
            async { Ok(()) }
        })
        .handler(move |identity: Identity| {
            l2.lock()
                .unwrap()
                .push(format!("identity {}", identity.handle.unwrap_or_default()));
            async { Ok(()) }
        })
        .handler(move |account: AccountStatus| {
            l3.lock().unwrap().push(format!(
                "account {} {}",
                account.active,
                account.status.unwrap_or_default()
            ));
            async { Ok(()) }
        })
        .build()
        .unwrap();
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for("the watcher connected", Duration::from_secs(20), || {
        metrics.snapshot().sources_connected == 1
    })
    .await;

    writer.create::<Note>(&note(0)).await.unwrap();
    let new_handle = net.unique_handle("events-renamed");
    account_xrpc(
        &alice,
        "com.atproto.identity.updateHandle",
        Some(serde_json::json!({ "handle": new_handle })),
    )
    .await;
    account_xrpc(
        &alice,
        "com.atproto.server.deactivateAccount",
        Some(serde_json::json!({})),
    )
    .await;
    account_xrpc(&alice, "com.atproto.server.activateAccount", None).await;
    writer.create::<Note>(&note(1)).await.unwrap();
    wait_for(
        "note 1 after the reactivation",
        Duration::from_secs(30),
        || log.lock().unwrap().iter().any(|l| l == "note 1"),
    )
    .await;
    stop.shutdown();
    running.await.unwrap().unwrap();

    let log = log.lock().unwrap().clone();
    let position = |want: &str| {
        log.iter()
            .position(|l| l == want)
            .unwrap_or_else(|| panic!("{want:?} not seen in {log:?}"))
    };
    let renamed = position(&format!("identity {new_handle}"));
    let deactivated = position("account false deactivated");
    let reactivated = log
        .iter()
        .rposition(|l| l == "account true ")
        .unwrap_or_else(|| panic!("no reactivation in {log:?}"));
    assert!(
        position("note 0") < renamed
            && renamed < deactivated
            && deactivated < reactivated
            && reactivated < position("note 1"),
        "events in repo order: {log:?}"
    );
}
