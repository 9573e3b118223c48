//! The hub's relay (`murmur-bus`, `Hub::builder().serve_relay(..)`) against the real local
//! network and a real nats-server: murmur's own watcher reads it with `.relay(url)` and Full
//! verification and gets every record once, in order per DID; the cursor cases of the
//! event-stream spec (replay, `OutdatedCursor`, `FutureCursor`); a consumer that stops reading
//! is dropped with `ConsumerTooSlow`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use futures_util::StreamExt;
use murmur_bus::{Hub, RelayConfig, RelayStats, StreamSettings};
use murmur_devnet::Devnet;
use murmur_e2e::nats::{cleanup, settings, url as nats_url};
use murmur_e2e::{Note, account, note, run_node_script, shared, wait_for};
use murmur_firehose::{Author, HandlerError, Record, Rejected, Rejection, Watcher};
use murmur_sync::{Frame, StreamError, SyncError};
use tokio_tungstenite::tungstenite::Message;

struct RunningHub {
    addr: SocketAddr,
    stats: Arc<RelayStats>,
    task: tokio::task::JoinHandle<()>,
}

/// A hub over every host of `net`, serving a relay on a free loopback port.
async fn start_hub(net: &Devnet, settings: &StreamSettings, config: RelayConfig) -> RunningHub {
    let hub = murmur_e2e::nats::start_hub(net, settings, |b| {
        b.serve_relay("127.0.0.1:0".parse().unwrap(), config)
    })
    .await;
    RunningHub {
        addr: hub.relay.unwrap(),
        stats: hub.relay_stats.unwrap(),
        task: hub.task,
    }
}

type Seen = Arc<Mutex<Vec<(String, u64)>>>;

/// murmur's watcher on the relay, Full verification (the default), every note recorded.
fn relay_watcher(
    addr: SocketAddr,
    plc: &str,
    cursor: Option<i64>,
    seen: Seen,
    rejected: Arc<Mutex<Vec<String>>>,
) -> Watcher {
    let mut builder = Watcher::builder()
        .relay(&format!("ws://{addr}"))
        .plc_url(plc)
        .verification(murmur_sync::VerifyLevel::Full)
        .collections(["test.murmur.*"])
        .handler(move |note: Record<Note>, from: Author| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().unwrap().push((from.0, note.n));
                Ok::<_, HandlerError>(())
            }
        })
        .on_rejected(move |r: &Rejected, why: &Rejection| {
            rejected
                .lock()
                .unwrap()
                .push(format!("{} {why:?}", r.uri()));
        });
    if let Some(cursor) = cursor {
        builder = builder.start_cursor(cursor);
    }
    builder.build().unwrap()
}

fn order_of(seen: &Seen, did: &str) -> Vec<u64> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(d, _)| d == did)
        .map(|(_, n)| *n)
        .collect()
}

/// Frames read from the relay by a plain WebSocket client, until `n` frames or `timeout`.
async fn read_frames(
    addr: SocketAddr,
    cursor: Option<i64>,
    n: usize,
    timeout: Duration,
) -> Vec<Result<Frame, SyncError>> {
    let url = match cursor {
        Some(c) => format!("ws://{addr}/xrpc/com.atproto.sync.subscribeRepos?cursor={c}"),
        None => format!("ws://{addr}/xrpc/com.atproto.sync.subscribeRepos"),
    };
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while frames.len() < n {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Ok(Some(Ok(Message::Binary(bytes)))) => frames.push(Frame::decode(&bytes)),
            Ok(Some(Ok(_))) => {}
            Ok(None) | Ok(Some(Err(_))) | Err(_) => break,
        }
    }
    frames
}

fn seq_of(frame: &Result<Frame, SyncError>) -> u64 {
    frame.as_ref().unwrap().seq().unwrap() as u64
}

/// The relay serves one merged stream over both hosts; murmur's watcher reads it with Full
/// verification and handles every note once, in order per DID; a second watcher replaying
/// from cursor 0 gets them all again, once; the cursor cases follow the spec.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn murmur_watcher_reads_the_relay_with_full_verification() {
    let net = shared().await;
    let settings = settings("watch");
    let hub = start_hub(net, &settings, RelayConfig::default()).await;
    let (alice, alice_w) = account(net, 0, "rela").await;
    let (bob, bob_w) = account(net, 1, "relb").await;

    let seen: Seen = Arc::default();
    let rejected = Arc::new(Mutex::new(Vec::new()));
    let watcher = relay_watcher(
        hub.addr,
        net.plc_url(),
        None,
        Arc::clone(&seen),
        Arc::clone(&rejected),
    );
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let live = tokio::spawn(watcher.run());
    wait_for("the watcher to connect", Duration::from_secs(30), || {
        metrics.snapshot().sources_connected >= 1
    })
    .await;

    for n in 0..15 {
        alice_w.create::<Note>(&note(n)).await.unwrap();
        bob_w.create::<Note>(&note(100 + n)).await.unwrap();
    }
    wait_for(
        "30 notes through the relay",
        Duration::from_secs(60),
        || order_of(&seen, &alice.did).len() + order_of(&seen, &bob.did).len() >= 30,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(order_of(&seen, &alice.did), (0..15).collect::<Vec<_>>());
    assert_eq!(order_of(&seen, &bob.did), (100..115).collect::<Vec<_>>());
    assert!(
        rejected.lock().unwrap().is_empty(),
        "{:?}",
        rejected.lock().unwrap()
    );
    let snapshot = metrics.snapshot();
    assert_eq!(
        snapshot.gaps, 0,
        "no gap on a relay that passes every commit"
    );
    stop.shutdown();
    live.await.unwrap().unwrap();

    // Replay from cursor 0: every note again, once, in order per DID.
    let replayed: Seen = Arc::default();
    let watcher = relay_watcher(
        hub.addr,
        net.plc_url(),
        Some(0),
        Arc::clone(&replayed),
        Arc::clone(&rejected),
    );
    let stop = watcher.shutdown_handle();
    let replay = tokio::spawn(watcher.run());
    wait_for("30 notes replayed", Duration::from_secs(60), || {
        order_of(&replayed, &alice.did).len() + order_of(&replayed, &bob.did).len() >= 30
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(order_of(&replayed, &alice.did), (0..15).collect::<Vec<_>>());
    assert_eq!(
        order_of(&replayed, &bob.did),
        (100..115).collect::<Vec<_>>()
    );
    assert!(rejected.lock().unwrap().is_empty());
    stop.shutdown();
    replay.await.unwrap().unwrap();

    // The frames: one merged numbering, the relay's own (1, 2, 3, ...).
    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = jetstream::new(client);
    let mut frames = js.get_stream(settings.frame_stream()).await.unwrap();
    let last = frames.info().await.unwrap().state.last_sequence;
    assert!(last >= 30, "{last} frames stored");
    let all = read_frames(hub.addr, Some(0), last as usize, Duration::from_secs(20)).await;
    let seqs: Vec<u64> = all.iter().map(seq_of).collect();
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>());
    // A cursor inside the window: what comes after it.
    let after = read_frames(hub.addr, Some(10), 3, Duration::from_secs(20)).await;
    assert_eq!(
        after.iter().map(seq_of).collect::<Vec<_>>(),
        vec![11, 12, 13]
    );
    // A cursor ahead of the stream: the error frame FutureCursor, then the end.
    let ahead = read_frames(hub.addr, Some(last as i64 + 5), 2, Duration::from_secs(20)).await;
    assert_eq!(ahead.len(), 1, "{ahead:?}");
    assert!(
        matches!(
            ahead[0],
            Err(SyncError::Stream(StreamError::FutureCursor { .. }))
        ),
        "{ahead:?}"
    );
    // A cursor older than the window: #info OutdatedCursor, then from the oldest kept.
    frames.purge().sequence(6).await.unwrap();
    let old = read_frames(hub.addr, Some(2), 3, Duration::from_secs(20)).await;
    match &old[0] {
        Ok(Frame::Info(info)) => assert!(info.is_outdated_cursor(), "{info:?}"),
        other => panic!("expected OutdatedCursor, got {other:?}"),
    }
    assert_eq!(old[1..].iter().map(seq_of).collect::<Vec<_>>(), vec![6, 7]);
    assert_eq!(
        hub.stats
            .outdated_cursors
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        hub.stats
            .future_cursors
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    hub.task.abort();
    cleanup(&settings).await;
}

/// A consumer that stops reading is dropped with ConsumerTooSlow; the relay does not hold
/// its backlog, and the other consumers go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_reading_is_dropped() {
    let net = shared().await;
    let settings = settings("slow");
    let config = RelayConfig {
        write_timeout: Duration::from_secs(1),
        send_buffer: Some(4096),
        ..Default::default()
    };
    let hub = start_hub(net, &settings, config).await;
    let (_alice, alice_w) = account(net, 0, "slow").await;

    // A client with a tiny receive window that reads nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(hub.addr).await.unwrap();
    let url = format!("ws://{}/xrpc/com.atproto.sync.subscribeRepos", hub.addr);
    let (mut stalled, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
    wait_for("the consumer to connect", Duration::from_secs(10), || {
        hub.stats
            .consumers
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;

    let writes = tokio::spawn(async move {
        for n in 0..200 {
            alice_w.create::<Note>(&note(n)).await.unwrap();
            if hub_done() {
                break;
            }
        }
    });
    wait_for(
        "the stalled consumer to be dropped",
        Duration::from_secs(120),
        || {
            hub.stats
                .too_slow
                .load(std::sync::atomic::Ordering::Relaxed)
                == 1
        },
    )
    .await;
    DONE.store(true, std::sync::atomic::Ordering::Relaxed);
    wait_for("its connection to close", Duration::from_secs(10), || {
        hub.stats
            .consumers
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
    })
    .await;
    writes.await.unwrap();
    // What it reads now ends: frames the kernel held, then ConsumerTooSlow or a reset,
    // never an endless stream.
    let mut frames = 0;
    let mut ending = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stalled.next()).await {
            Ok(Some(Ok(Message::Binary(bytes)))) => match Frame::decode(&bytes) {
                Ok(_) => frames += 1,
                Err(e) => {
                    ending = Some(format!("{e}"));
                    assert!(
                        matches!(e, SyncError::Stream(StreamError::ConsumerTooSlow { .. })),
                        "{e}"
                    );
                }
            },
            Ok(Some(Ok(_))) => {}
            Ok(None) | Ok(Some(Err(_))) => break,
            Err(_) => panic!("the dropped connection is still open after {frames} frames"),
        }
    }
    assert!(
        frames < 200,
        "it got everything: {frames} frames ({ending:?})"
    );

    hub.task.abort();
    cleanup(&settings).await;
}

static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn hub_done() -> bool {
    DONE.load(std::sync::atomic::Ordering::Relaxed)
}

/// The official `@atproto/sync` Firehose (TypeScript, its verification on: signature and
/// MST proof of every commit), run under the local network's Node, replays the relay from
/// cursor 0 and accepts every commit: each note once, in order per DID, no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atproto_sync_firehose_accepts_every_commit_of_the_relay() {
    let net = shared().await;
    let settings = settings("ts");
    let hub = start_hub(net, &settings, RelayConfig::default()).await;
    let (alice, alice_w) = account(net, 0, "tsa").await;
    let (bob, bob_w) = account(net, 1, "tsb").await;
    for n in 0..10 {
        alice_w.create::<Note>(&note(n)).await.unwrap();
        bob_w.create::<Note>(&note(100 + n)).await.unwrap();
    }
    // The client replays from cursor 0 and goes on live until it has all 20.
    let install = tokio::task::spawn_blocking(murmur_devnet::provision)
        .await
        .unwrap()
        .expect("the local network's node install");
    let input = serde_json::json!({
        "service": format!("ws://{}", hub.addr),
        "plcUrl": net.plc_url(),
        "cursor": 0,
        "collection": "test.murmur.note",
        "dids": [&alice.did, &bob.did],
        "expect": 20,
        "timeoutMs": 60_000,
    });
    let out = tokio::task::spawn_blocking(move || {
        run_node_script(&install, include_str!("relay_ts/firehose.mjs"), &input)
    })
    .await
    .unwrap();
    let result: serde_json::Value = serde_json::from_slice(&out).expect("node prints JSON");
    let errors = result["errors"].as_array().unwrap();
    assert!(
        errors.is_empty(),
        "@atproto/sync reported errors: {errors:?}"
    );
    let events = result["events"].as_array().unwrap();
    let notes_of = |did: &str| -> Vec<u64> {
        events
            .iter()
            .filter(|e| e["did"] == did && e["event"] == "create")
            .map(|e| e["n"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(
        notes_of(&alice.did),
        (0..10).collect::<Vec<_>>(),
        "{events:?}"
    );
    assert_eq!(
        notes_of(&bob.did),
        (100..110).collect::<Vec<_>>(),
        "{events:?}"
    );
    // The seqs it saw are the relay's, increasing.
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    hub.task.abort();
    cleanup(&settings).await;
}

/// The relay's other sync endpoints: listHosts names both hosts, listRepos (paged across
/// hosts) and getRepoStatus find the test's accounts, getRecord and getRepo lead to the host
/// that has the repo, requestCrawl is refused with a typed error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_answers_the_sync_queries() {
    let net = shared().await;
    let settings = settings("xrpc");
    let hub = start_hub(net, &settings, RelayConfig::default()).await;
    let (alice, alice_w) = account(net, 0, "xrpca").await;
    let (bob, _bob_w) = account(net, 1, "xrpcb").await;
    let created = alice_w.create::<Note>(&note(1)).await.unwrap();
    let base = format!("http://{}/xrpc", hub.addr);
    let http = reqwest::Client::new();
    let get = |method: &str, query: Vec<(&str, String)>| {
        http.get(format!("{base}/{method}")).query(&query).send()
    };

    let hosts: serde_json::Value = get("com.atproto.sync.listHosts", vec![])
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = hosts["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["hostname"].as_str().unwrap())
        .collect();
    for host in net.pds_hosts() {
        let url = host.url();
        let name = url.split_once("://").unwrap().1.trim_end_matches('/');
        assert!(names.contains(&name), "{name} not in {hosts}");
    }

    // listRepos, two repos a page, across both hosts.
    let mut dids = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let mut query = vec![("limit", "2".to_string())];
        if let Some(c) = &cursor {
            query.push(("cursor", c.clone()));
        }
        let response = get("com.atproto.sync.listRepos", query).await.unwrap();
        assert_eq!(response.status(), 200);
        let page: serde_json::Value = response.json().await.unwrap();
        let repos = page["repos"].as_array().unwrap();
        assert!(repos.len() <= 2);
        dids.extend(repos.iter().map(|r| r["did"].as_str().unwrap().to_string()));
        match page["cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert!(dids.contains(&alice.did) && dids.contains(&bob.did));
    let unique: std::collections::HashSet<_> = dids.iter().collect();
    assert_eq!(unique.len(), dids.len(), "a repo listed twice");

    let status: serde_json::Value = get(
        "com.atproto.sync.getRepoStatus",
        vec![("did", bob.did.clone())],
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(status["did"], bob.did.as_str());
    assert_eq!(status["active"], true);
    let missing = get(
        "com.atproto.sync.getRepoStatus",
        vec![("did", "did:plc:nobodyhere".to_string())],
    )
    .await
    .unwrap();
    assert_eq!(missing.status(), 404);

    // getRecord: redirected to alice's host, which answers with the record's proof (a CAR).
    let rkey = created.rkey.clone();
    let record = get(
        "com.atproto.sync.getRecord",
        vec![
            ("did", alice.did.clone()),
            ("collection", "test.murmur.note".into()),
            ("rkey", rkey),
        ],
    )
    .await
    .unwrap();
    assert_eq!(record.status(), 200);
    assert!(
        record.url().as_str().starts_with(net.pds(0).unwrap().url()),
        "{}",
        record.url()
    );
    assert!(!record.bytes().await.unwrap().is_empty());
    let repo = get("com.atproto.sync.getRepo", vec![("did", bob.did.clone())])
        .await
        .unwrap();
    assert_eq!(repo.status(), 200);
    assert!(repo.url().as_str().starts_with(net.pds(1).unwrap().url()));

    let crawl = http
        .post(format!("{base}/com.atproto.sync.requestCrawl"))
        .json(&serde_json::json!({"hostname": "pds.example"}))
        .send()
        .await
        .unwrap();
    assert_eq!(crawl.status(), 501);
    let body: serde_json::Value = crawl.json().await.unwrap();
    assert_eq!(body["error"], "MethodNotImplemented");

    hub.task.abort();
    cleanup(&settings).await;
}

/// `requestCrawl` with a crawl policy: a host it does not allow is refused (403), a host that
/// is not a PDS too (400); an allowed PDS is watched from then on: `listHosts` names it, and
/// its records (written before the request as well as after) come through the relay,
/// verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_crawl_adds_an_allowed_host() {
    let net = shared().await;
    let settings = settings("crawl");
    let second = net.pds(1).unwrap().url().to_string();
    let second_authority = second.split_once("://").unwrap().1.to_string();
    let hub = Hub::builder()
        .nats(nats_url())
        .plc_url(net.plc_url())
        .stream(settings.clone())
        .pds(net.pds(0).unwrap().url())
        .serve_relay("127.0.0.1:0".parse().unwrap(), RelayConfig::default())
        .allow_crawl(murmur_bus::CrawlPolicy::allow([
            second_authority.clone(),
            "127.0.0.1:1".into(),
        ]))
        .build()
        .await
        .unwrap();
    let addr = hub.relay_addr().unwrap();
    let task = tokio::spawn(async move { hub.run().await.unwrap() });
    let (bob, bob_w) = account(net, 1, "crawlb").await;
    bob_w.create::<Note>(&note(500)).await.unwrap();

    let seen: Seen = Arc::default();
    let rejected = Arc::new(Mutex::new(Vec::new()));
    let watcher = relay_watcher(
        addr,
        net.plc_url(),
        None,
        Arc::clone(&seen),
        Arc::clone(&rejected),
    );
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let watching = tokio::spawn(watcher.run());
    wait_for("the watcher to connect", Duration::from_secs(30), || {
        metrics.snapshot().sources_connected >= 1
    })
    .await;

    let http = reqwest::Client::new();
    let crawl = |hostname: String| {
        http.post(format!("http://{addr}/xrpc/com.atproto.sync.requestCrawl"))
            .json(&serde_json::json!({ "hostname": hostname }))
            .send()
    };
    let refused = crawl("pds.example.com".into()).await.unwrap();
    assert_eq!(refused.status(), 403);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "HostNotAllowed", "{body}");
    // Allowed, but nothing answers there as a PDS.
    let not_a_pds = crawl("127.0.0.1:1".into()).await.unwrap();
    assert_eq!(not_a_pds.status(), 400);
    let bad = crawl("not a host".into()).await.unwrap();
    assert_eq!(bad.status(), 400);

    let accepted = crawl(second_authority.clone()).await.unwrap();
    assert_eq!(accepted.status(), 200, "{:?}", accepted.text().await);
    let hosts: serde_json::Value = http
        .get(format!("http://{addr}/xrpc/com.atproto.sync.listHosts"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        hosts["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["hostname"] == second_authority.as_str()),
        "{hosts}"
    );
    // Asking again changes nothing.
    assert_eq!(crawl(second_authority).await.unwrap().status(), 200);

    bob_w.create::<Note>(&note(501)).await.unwrap();
    wait_for(
        "bob's notes through the crawled host",
        Duration::from_secs(60),
        || order_of(&seen, &bob.did).len() >= 2,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(order_of(&seen, &bob.did), [500, 501]);
    assert!(rejected.lock().unwrap().is_empty());
    stop.shutdown();
    watching.await.unwrap().unwrap();
    task.abort();
    cleanup(&settings).await;
}

/// A new account's first commit (no ops) and the `#sync` the PDS sends with it are verified
/// and relayed like other events, so a relay consumer sees the repo's whole rev chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_accounts_first_commit_and_sync_are_relayed() {
    let net = shared().await;
    let settings = settings("sync");
    let hub = start_hub(net, &settings, RelayConfig::default()).await;
    let (carol, carol_w) = account(net, 0, "syncc").await;
    carol_w.create::<Note>(&note(7)).await.unwrap();

    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        let frames = read_frames(hub.addr, Some(0), usize::MAX, Duration::from_secs(2)).await;
        seen = frames
            .into_iter()
            .filter_map(|f| f.ok())
            .filter_map(|f| match f {
                Frame::Commit(c) if c.repo == carol.did => {
                    Some(format!("commit {} ops", c.ops.len()))
                }
                Frame::Sync(s) if s.did == carol.did => Some("sync".to_string()),
                Frame::Identity(i) if i.did == carol.did => Some("identity".to_string()),
                Frame::Account(a) if a.did == carol.did => Some("account".to_string()),
                _ => None,
            })
            .collect();
        if seen.iter().any(|s| s == "commit 1 ops") {
            break;
        }
    }
    assert_eq!(
        seen,
        [
            "identity",
            "account",
            "commit 0 ops",
            "sync",
            "commit 1 ops"
        ],
        "carol's events through the relay, in the PDS's order"
    );
    hub.task.abort();
    cleanup(&settings).await;
}

/// A host that answers as a PDS but does not host the repo it sends: serves `describeServer`
/// and, on `subscribeRepos`, the given frames; counts the frames it sent.
async fn impostor_host(
    frames: Vec<Vec<u8>>,
    sent: Arc<std::sync::atomic::AtomicUsize>,
) -> SocketAddr {
    use futures_util::SinkExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let (frames, sent) = (frames.clone(), Arc::clone(&sent));
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                for _ in 0..50 {
                    let n = tcp.peek(&mut buf).await.unwrap_or(0);
                    head = buf[..n].to_vec();
                    if head.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if text.contains("upgrade: websocket") {
                    let Ok(mut socket) = tokio_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    for frame in frames {
                        if socket.send(Message::Binary(frame.into())).await.is_ok() {
                            sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                    while let Some(Ok(_)) = socket.next().await {}
                } else {
                    let _ = tcp.read(&mut buf).await;
                    let body = r#"{"did":"did:web:impostor.localhost","availableUserDomains":[]}"#;
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tcp.write_all(response.as_bytes()).await;
                }
            });
        }
    });
    addr
}

/// A crawled host may speak only for the repos it hosts: one that replays another host's
/// genuine, signed commit (and an `#account` event of that repo) has both refused, and the
/// relay never serves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crawled_host_cannot_speak_for_repos_it_does_not_host() {
    let net = shared().await;
    let settings = settings("impostor");
    // The hub watches only the second host; alice lives on the first.
    let (alice, alice_w) = account(net, 0, "impa").await;
    alice_w.create::<Note>(&note(9)).await.unwrap();
    let pds0 = net.pds(0).unwrap().url().replacen("http", "ws", 1);
    let (mut stream, _) = tokio_tungstenite::connect_async(format!(
        "{pds0}/xrpc/com.atproto.sync.subscribeRepos?cursor=0"
    ))
    .await
    .unwrap();
    let mut stolen = Vec::new();
    while stolen.len() < 2 {
        let Some(Ok(Message::Binary(bytes))) = stream.next().await else {
            panic!("the first host's stream ended")
        };
        match Frame::decode(&bytes).unwrap() {
            Frame::Commit(c) if c.repo == alice.did && !c.ops.is_empty() => {
                stolen.push(bytes.to_vec())
            }
            Frame::Account(a) if a.did == alice.did && stolen.is_empty() => {
                stolen.push(bytes.to_vec())
            }
            _ => {}
        }
    }
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let impostor = impostor_host(stolen, Arc::clone(&sent)).await;

    let hub = Hub::builder()
        .nats(nats_url())
        .plc_url(net.plc_url())
        .stream(settings.clone())
        .pds(net.pds(1).unwrap().url())
        .serve_relay("127.0.0.1:0".parse().unwrap(), RelayConfig::default())
        .allow_crawl(murmur_bus::CrawlPolicy::allow([impostor.to_string()]))
        .build()
        .await
        .unwrap();
    let addr = hub.relay_addr().unwrap();
    let task = tokio::spawn(async move { hub.run().await.unwrap() });
    let crawled = reqwest::Client::new()
        .post(format!("http://{addr}/xrpc/com.atproto.sync.requestCrawl"))
        .json(&serde_json::json!({ "hostname": impostor.to_string() }))
        .send()
        .await
        .unwrap();
    assert_eq!(crawled.status(), 200, "{:?}", crawled.text().await);
    wait_for(
        "the impostor to send its frames to the hub",
        Duration::from_secs(30),
        || sent.load(std::sync::atomic::Ordering::SeqCst) >= 2,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let relayed = read_frames(addr, Some(0), usize::MAX, Duration::from_secs(2)).await;
    let of_alice: Vec<_> = relayed
        .iter()
        .filter_map(|f| f.as_ref().ok())
        .filter(|f| f.did() == Some(alice.did.as_str()))
        .collect();
    assert!(
        of_alice.is_empty(),
        "relayed from the impostor: {of_alice:?}"
    );
    task.abort();
    cleanup(&settings).await;
}
