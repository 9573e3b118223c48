//! The watcher against hostile or failing peers: a stream server (a small tokio-tungstenite
//! server in this file) that replays real signed commits from the local PDS with forged ops,
//! absurd seqs or endless error frames, a server that accepts TCP and never answers, and the
//! real devnet PLC directory frozen with SIGSTOP while records are written.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atrium_api::types::Collection;
use futures_util::{SinkExt, StreamExt};
use ipld_core::ipld::Ipld;
use murmur_devnet::{Account, Devnet, DevnetConfig};
use murmur_e2e::{Note, account_xrpc, note, shared, wait_for};
use murmur_firehose::{
    Backoff, Created, Deleted, FileCursorStore, FirehoseError, GapKind, OpEvent, Rejection,
    SourceError, SubscribeRepos, WatchError, Watcher,
};
use murmur_pds::Writer;
use murmur_sync::{CarSlice, Cid, Frame, StreamError, SyncError};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

async fn account(net: &Devnet, name: &str) -> (Account, Writer) {
    let account = net
        .create_account(0, &net.unique_handle(name), "password-1")
        .await
        .unwrap();
    let writer = Writer::login(&account.pds_url, &account.did, "password-1")
        .await
        .unwrap();
    (account, writer)
}

fn fast_reconnect() -> Backoff {
    Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(100),
        factor: 2.0,
        max_attempts: None,
    }
}

/// The `#commit` frames of `did` on the PDS, from the start of its stream, until `count`
/// commits touching `test.murmur.note` were read.
async fn note_commits(net: &Devnet, did: &str, count: usize) -> Vec<Vec<u8>> {
    let ws = format!(
        "{}/xrpc/com.atproto.sync.subscribeRepos?cursor=0",
        net.pds(0).unwrap().url().replacen("http", "ws", 1)
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(ws).await.unwrap();
    let mut frames = Vec::new();
    while frames.len() < count {
        let msg = tokio::time::timeout(Duration::from_secs(20), socket.next())
            .await
            .expect("the commits on the stream")
            .unwrap()
            .unwrap();
        let Message::Binary(bytes) = msg else {
            continue;
        };
        if let Frame::Commit(c) = Frame::decode(&bytes).unwrap()
            && c.repo == did
            && c.ops.iter().any(|op| op.collection() == Note::NSID)
        {
            frames.push(bytes.to_vec());
        }
    }
    frames
}

/// A frame split into its DAG-CBOR header and body, to be edited and put back together.
struct EditableFrame {
    header: Ipld,
    body: std::collections::BTreeMap<String, Ipld>,
}

impl EditableFrame {
    fn parse(bytes: &[u8]) -> Self {
        // The header is the first DAG-CBOR item; find where it ends by re-encoding it.
        for end in 1..bytes.len() {
            if let Ok(header) = serde_ipld_dagcbor::from_slice::<Ipld>(&bytes[..end])
                && let Ok(Ipld::Map(body)) = serde_ipld_dagcbor::from_slice::<Ipld>(&bytes[end..])
            {
                return EditableFrame { header, body };
            }
        }
        panic!("not a frame")
    }

    fn set(&mut self, key: &str, value: Ipld) -> &mut Self {
        self.body.insert(key.to_string(), value);
        self
    }

    fn get(&self, key: &str) -> &Ipld {
        &self.body[key]
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = serde_ipld_dagcbor::to_vec(&self.header).unwrap();
        out.extend(serde_ipld_dagcbor::to_vec(&Ipld::Map(self.body.clone())).unwrap());
        out
    }
}

fn error_frame(error: &str, message: &str) -> Vec<u8> {
    let mut out = serde_ipld_dagcbor::to_vec(&ipld_core::ipld!({"op": -1})).unwrap();
    out.extend(
        serde_ipld_dagcbor::to_vec(&ipld_core::ipld!({"error": error, "message": message}))
            .unwrap(),
    );
    out
}

fn write_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// The CAR slice `car` without the block `drop`.
fn car_without(car: &[u8], drop: &Cid) -> Vec<u8> {
    let slice = CarSlice::parse(car).unwrap();
    let header =
        serde_ipld_dagcbor::to_vec(&ipld_core::ipld!({"roots": [slice.roots()[0]], "version": 1}))
            .unwrap();
    let mut out = Vec::new();
    write_varint(&mut out, header.len());
    out.extend(header);
    for (cid, data) in slice.blocks() {
        if cid != *drop {
            let c = cid.to_bytes();
            write_varint(&mut out, c.len() + data.len());
            out.extend(c);
            out.extend(data);
        }
    }
    out
}

fn op(action: &str, path: &str, cid: Option<Cid>, prev: Option<Cid>) -> Ipld {
    let mut map = std::collections::BTreeMap::new();
    map.insert("action".to_string(), Ipld::String(action.into()));
    map.insert("path".to_string(), Ipld::String(path.into()));
    map.insert("cid".to_string(), cid.map_or(Ipld::Null, Ipld::Link));
    if let Some(prev) = prev {
        map.insert("prev".to_string(), Ipld::Link(prev));
    }
    Ipld::Map(map)
}

/// What the hostile server sends on one connection (numbered from 0), then whether it closes.
type Script = Arc<dyn Fn(usize) -> (Vec<Vec<u8>>, bool) + Send + Sync>;

/// A subscribeRepos server that follows `script`; returns its ws:// base URL and a count of
/// connections made.
async fn hostile_server(script: Script) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&connections);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let n = count.fetch_add(1, Ordering::SeqCst);
            let script = Arc::clone(&script);
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let (frames, close) = script(n);
                for frame in frames {
                    if ws.send(Message::Binary(frame.into())).await.is_err() {
                        return;
                    }
                }
                if close {
                    let _ = ws.close(None).await;
                } else {
                    // Hold the connection open, answering pings, until the client goes.
                    while let Some(Ok(_)) = ws.next().await {}
                }
            });
        }
    });
    (url, connections)
}

type Rejections = Arc<Mutex<Vec<(String, Rejection)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_ops_on_a_signed_too_big_commit_never_reach_handlers() {
    let net = shared().await;
    let (alice, writer) = account(net, "toobig").await;
    let first = writer.create::<Note>(&note(0)).await.unwrap();
    let second = writer.create::<Note>(&note(1)).await.unwrap();
    let path = |uri: &str| format!("{}/{}", Note::NSID, uri.rsplit('/').next().unwrap());
    let (p0, p1) = (path(&first.uri), path(&second.uri));
    let cid0: Cid = first.cid;
    let cid1: Cid = second.cid;
    let frames = note_commits(net, &alice.did, 2).await;
    let genuine = EditableFrame::parse(&frames[1]); // the commit that created note 1

    // 1. The genuine signed commit, marked tooBig, carrying a delete of note 0 (which the
    //    repo still holds): what a relay in the middle could invent to cancel work.
    let mut forged_delete = EditableFrame::parse(&frames[1]);
    forged_delete
        .set("tooBig", Ipld::Bool(true))
        .set("seq", Ipld::Integer(101))
        .set("ops", Ipld::List(vec![op("delete", &p0, None, Some(cid0))]));
    // 2. The same commit, tooBig, creating a record the repo never had.
    let forged_path = format!("{}/3forgedforged", Note::NSID);
    let mut forged_create = EditableFrame::parse(&frames[1]);
    forged_create
        .set("tooBig", Ipld::Bool(true))
        .set("seq", Ipld::Integer(102))
        .set(
            "ops",
            Ipld::List(vec![op("create", &forged_path, Some(cid1), None)]),
        );
    // 3. The genuine commit, tooBig, its record block left out (as tooBig commits did): the
    //    op is proven from the PDS (getRecord) and delivered with the record.
    let Ipld::Bytes(blocks) = genuine.get("blocks") else {
        panic!("blocks are bytes")
    };
    let mut genuine_too_big = EditableFrame::parse(&frames[1]);
    genuine_too_big
        .set("tooBig", Ipld::Bool(true))
        .set("seq", Ipld::Integer(103))
        .set("blocks", Ipld::Bytes(car_without(blocks, &cid1)));
    let script_frames = vec![
        forged_delete.encode(),
        forged_create.encode(),
        genuine_too_big.encode(),
    ];
    let (url, _) = hostile_server(Arc::new(move |_| (script_frames.clone(), false))).await;

    let created = Arc::new(Mutex::new(Vec::new()));
    let deleted = Arc::new(Mutex::new(Vec::new()));
    let rejected: Rejections = Arc::default();
    let (c, d, r) = (
        Arc::clone(&created),
        Arc::clone(&deleted),
        Arc::clone(&rejected),
    );
    let watcher = Watcher::builder()
        .source(SubscribeRepos::new(&url))
        .plc_url(net.plc_url())
        .handler(move |note: Created<Note>, op: OpEvent| {
            c.lock().unwrap().push((op.data().path.clone(), note.n));
            async { Ok(()) }
        })
        .handler(move |_gone: Deleted<Note>, op: OpEvent| {
            d.lock().unwrap().push(op.data().path.clone());
            async { Ok(()) }
        })
        .on_rejected(move |what, why| r.lock().unwrap().push((what.uri(), why.clone())))
        .build()
        .unwrap();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for(
        "the proven op and both rejections",
        Duration::from_secs(30),
        || !created.lock().unwrap().is_empty() && rejected.lock().unwrap().len() >= 2,
    )
    .await;
    stop.shutdown();
    running.await.unwrap().unwrap();

    assert!(
        deleted.lock().unwrap().is_empty(),
        "a forged delete reached a handler: {:?}",
        deleted.lock().unwrap()
    );
    assert_eq!(
        *created.lock().unwrap(),
        vec![(p1.clone(), 1)],
        "only the genuine op, proven by getRecord, reaches the handler"
    );
    let rejected = rejected.lock().unwrap();
    let uris: Vec<&str> = rejected.iter().map(|(u, _)| u.as_str()).collect();
    assert_eq!(
        uris,
        vec![
            format!("at://{}/{p0}", alice.did),
            format!("at://{}/{forged_path}", alice.did)
        ]
    );
    for (uri, why) in rejected.iter() {
        let Rejection::Verification(cause) = why else {
            panic!("{uri}: not a verification rejection: {why}")
        };
        assert!(
            matches!(cause.as_ref(), SyncError::Unproven { .. }),
            "{uri}: the reason is typed as unproven, got {cause}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_error_frame_stops_the_source_with_a_typed_error() {
    let (url, connections) = hostile_server(Arc::new(|_| {
        (
            vec![error_frame("InvalidRequest", "cursor is not valid")],
            true,
        )
    }))
    .await;
    let reported = Arc::new(Mutex::new(Vec::new()));
    let r = Arc::clone(&reported);
    let watcher = Watcher::builder()
        .source(SubscribeRepos::new(&url))
        .start_cursor(12)
        .reconnect(fast_reconnect())
        .handler(|_: Created<Note>, _: OpEvent| async { Ok(()) })
        .on_error(move |e| r.lock().unwrap().push(e.clone()))
        .build()
        .unwrap();
    let metrics = watcher.metrics();
    let result = tokio::time::timeout(Duration::from_secs(30), watcher.run())
        .await
        .expect("the watcher stops instead of reconnecting forever");
    match result {
        Err(FirehoseError::ErrorFrame {
            error: StreamError::Other { error, .. },
            repeated,
            cursor,
            ..
        }) => {
            assert_eq!(error, "InvalidRequest");
            assert_eq!(repeated, murmur_firehose::ERROR_FRAME_REPEATS);
            assert_eq!(cursor, Some(12));
        }
        other => panic!("expected a typed error-frame stop, got {other:?}"),
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        murmur_firehose::ERROR_FRAME_REPEATS as usize
    );
    let reported = reported.lock().unwrap();
    let repeats: Vec<u32> = reported
        .iter()
        .filter_map(|e| match e {
            WatchError::ErrorFrame { repeated, .. } => Some(*repeated),
            _ => None,
        })
        .collect();
    assert_eq!(repeats, vec![1, 2, 3], "every error frame is reported");
    assert_eq!(metrics.snapshot().errors, reported.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_finishes_times_out_and_reconnects() {
    // Accepts TCP, never answers the WebSocket handshake.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = Arc::clone(&held);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            h.lock().unwrap().push(tcp);
        }
    });
    let reported = Arc::new(Mutex::new(Vec::new()));
    let r = Arc::clone(&reported);
    let watcher = Watcher::builder()
        .source(SubscribeRepos::new(&url))
        .connect_timeout(Duration::from_millis(300))
        .reconnect(fast_reconnect())
        .handler(|_: Created<Note>, _: OpEvent| async { Ok(()) })
        .on_error(move |e| r.lock().unwrap().push(e.clone()))
        .build()
        .unwrap();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for("two connect timeouts", Duration::from_secs(20), || {
        reported
            .lock()
            .unwrap()
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    WatchError::Connect {
                        error: SourceError::ConnectTimeout(_),
                        ..
                    }
                )
            })
            .count()
            >= 2
    })
    .await;
    stop.shutdown();
    running.await.unwrap().unwrap();
    assert!(held.lock().unwrap().len() >= 2, "it connected again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_seqs_never_become_the_cursor() {
    let net = shared().await;
    let (alice, writer) = account(net, "seq").await;
    for n in 0..3 {
        writer.create::<Note>(&note(n)).await.unwrap();
    }
    let frames = note_commits(net, &alice.did, 3).await;
    let with_seq = |i: usize, seq: i64| {
        let mut f = EditableFrame::parse(&frames[i]);
        f.set("seq", Ipld::Integer(seq.into()));
        f.encode()
    };
    let script_frames = vec![
        with_seq(0, 10),
        with_seq(1, i64::MAX),          // beyond 2^53 - 1
        with_seq(1, 1 << 53),           // just beyond
        with_seq(1, -5),                // negative
        with_seq(1, 10 + (1i64 << 40)), // a jump no server makes
        with_seq(1, 11),
        with_seq(2, 12),
    ];
    let (url, _) = hostile_server(Arc::new(move |_| (script_frames.clone(), false))).await;

    let state = tempfile::tempdir().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let reported = Arc::new(Mutex::new(Vec::new()));
    let gaps = Arc::new(Mutex::new(Vec::new()));
    let (s, r, g) = (Arc::clone(&seen), Arc::clone(&reported), Arc::clone(&gaps));
    let watcher = Watcher::builder()
        .source(SubscribeRepos::new(&url))
        .plc_url(net.plc_url())
        .state_dir(state.path())
        .handler(move |note: Created<Note>, op: OpEvent| {
            s.lock().unwrap().push((op.data().seq, note.n));
            async { Ok(()) }
        })
        .on_error(move |e| r.lock().unwrap().push(e.clone()))
        .on_gap(move |gap| g.lock().unwrap().push(gap.kind.clone()))
        .build()
        .unwrap();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for("the three notes", Duration::from_secs(30), || {
        seen.lock().unwrap().len() >= 3
    })
    .await;
    stop.shutdown();
    running.await.unwrap().unwrap();

    assert_eq!(*seen.lock().unwrap(), vec![(10, 0), (11, 1), (12, 2)]);
    let skipped: Vec<i64> = reported
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            WatchError::InvalidSeq { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(skipped, vec![i64::MAX, 1 << 53, -5, 10 + (1i64 << 40)]);
    assert!(
        !gaps
            .lock()
            .unwrap()
            .iter()
            .any(|g| matches!(g, GapKind::SeqRegression { .. })),
        "skipped frames never moved the seq: {:?}",
        gaps.lock().unwrap()
    );
    let store = FileCursorStore::new(state.path().join("cursors"));
    let source = SubscribeRepos::new(&url);
    let stored = murmur_firehose::CursorStore::load(&store, murmur_firehose::Source::url(&source))
        .await
        .unwrap();
    assert_eq!(stored, Some(12));

    // A stored cursor no server sends is refused when it is loaded, with a typed error.
    murmur_firehose::CursorStore::store(&store, murmur_firehose::Source::url(&source), i64::MAX)
        .await
        .unwrap();
    let watcher = Watcher::builder()
        .source(SubscribeRepos::new(&url))
        .plc_url(net.plc_url())
        .state_dir(state.path())
        .handler(|_: Created<Note>, _: OpEvent| async { Ok(()) })
        .build()
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), watcher.run()).await {
        Ok(Err(FirehoseError::InvalidCursor { seq, .. })) => assert_eq!(seq, i64::MAX),
        other => panic!("expected InvalidCursor, got {other:?}"),
    }
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

/// Resumes the PLC even when an assertion fails, so the network can shut down.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        signal(self.0, "-CONT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plc_outage_delays_records_but_loses_none() {
    // A network of its own: freezing the shared PLC would stall the other tests.
    let net = tokio::task::spawn_blocking(|| {
        Devnet::start(DevnetConfig {
            pds: 1,
            ..Default::default()
        })
        .unwrap()
    })
    .await
    .unwrap();
    let (alice, writer) = account(&net, "outage").await;

    let state = tempfile::tempdir().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let reported = Arc::new(Mutex::new(Vec::new()));
    let rejected: Rejections = Arc::default();
    let (s, r, j) = (
        Arc::clone(&seen),
        Arc::clone(&reported),
        Arc::clone(&rejected),
    );
    let fast_retry = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(500),
        factor: 2.0,
        max_attempts: None,
    };
    let watcher = Watcher::builder()
        .pds(net.pds(0).unwrap().url())
        .plc_url(net.plc_url())
        .dids([alice.did.clone()])
        .state_dir(state.path())
        .verification_retry(fast_retry)
        .handler(move |note: Created<Note>, _op: OpEvent| {
            s.lock().unwrap().push(note.n);
            async { Ok(()) }
        })
        .on_error(move |e| r.lock().unwrap().push(e.clone()))
        .on_rejected(move |what, why| j.lock().unwrap().push((what.uri(), why.clone())))
        .build()
        .unwrap();
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for("the watcher connected", Duration::from_secs(20), || {
        metrics.snapshot().sources_connected == 1
    })
    .await;

    // The watcher has never resolved alice: with the directory frozen, it cannot.
    signal(net.plc_pid(), "-STOP");
    let frozen = Resume(net.plc_pid());
    for n in 0..5 {
        writer.create::<Note>(&note(n)).await.unwrap();
    }
    wait_for("a verification waiting for the PLC", Duration::from_secs(60), || {
        metrics.snapshot().verifications_waiting == 1
            && reported
                .lock()
                .unwrap()
                .iter()
                .any(|e| matches!(e, WatchError::VerificationStalled { did, .. } if *did == alice.did))
    })
    .await;
    assert!(seen.lock().unwrap().is_empty());
    assert!(
        rejected.lock().unwrap().is_empty(),
        "an outage is not a rejection: {:?}",
        rejected.lock().unwrap()
    );
    let stalled = reported
        .lock()
        .unwrap()
        .iter()
        .find_map(|e| match e {
            WatchError::VerificationStalled { error, .. } => Some(Arc::clone(error)),
            _ => None,
        })
        .unwrap();
    assert!(stalled.is_transient(), "{stalled}");
    drop(frozen); // SIGCONT

    wait_for(
        "every note after the outage",
        Duration::from_secs(60),
        || seen.lock().unwrap().len() >= 5,
    )
    .await;
    wait_for("the cursor flushed", Duration::from_secs(10), || {
        metrics.snapshot().seq_lag == 0
    })
    .await;
    stop.shutdown();
    running.await.unwrap().unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![0, 1, 2, 3, 4],
        "each record once, in order"
    );
    assert!(rejected.lock().unwrap().is_empty());
    assert_eq!(metrics.snapshot().verifications_waiting, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_event_that_fails_verification_is_passed_to_on_rejected() {
    let net = shared().await;
    let (alice, _) = account(net, "sync-a").await;
    let (bob, _) = account(net, "sync-b").await;
    // Alice's real #sync frame (a new account's repo starts with one), claimed for bob: the
    // signed commit inside names alice.
    let ws = format!(
        "{}/xrpc/com.atproto.sync.subscribeRepos?cursor=0",
        net.pds(0).unwrap().url().replacen("http", "ws", 1)
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(ws).await.unwrap();
    let sync = loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), socket.next())
            .await
            .expect("alice's #sync on the stream")
            .unwrap()
            .unwrap();
        let Message::Binary(bytes) = msg else {
            continue;
        };
        if let Frame::Sync(s) = Frame::decode(&bytes).unwrap()
            && s.did == alice.did
        {
            break bytes.to_vec();
        }
    };
    let mut forged = EditableFrame::parse(&sync);
    forged
        .set("did", Ipld::String(bob.did.clone()))
        .set("seq", Ipld::Integer(7));
    let script_frames = vec![forged.encode()];
    let (url, _) = hostile_server(Arc::new(move |_| (script_frames.clone(), false))).await;

    let rejected = Arc::new(Mutex::new(Vec::new()));
    let r = Arc::clone(&rejected);
    let watcher = Watcher::builder()
        .source(SubscribeRepos::new(&url))
        .plc_url(net.plc_url())
        .handler(|_: Created<Note>| async { Ok(()) })
        .on_rejected(move |what, why| r.lock().unwrap().push((what.clone(), why.clone())))
        .build()
        .unwrap();
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for("the #sync rejection", Duration::from_secs(20), || {
        !rejected.lock().unwrap().is_empty()
    })
    .await;
    stop.shutdown();
    running.await.unwrap().unwrap();

    let rejected = rejected.lock().unwrap();
    let [(what, why)] = &rejected[..] else {
        panic!("one rejection expected, got {rejected:?}")
    };
    match what {
        murmur_firehose::Rejected::Sync { did, seq, .. } => {
            assert_eq!(did, &bob.did);
            assert_eq!(*seq, 7);
        }
        other => panic!("expected a #sync rejection, got {other:?}"),
    }
    assert_eq!(what.uri(), format!("at://{}", bob.did));
    let Rejection::Verification(cause) = why else {
        panic!("{why}")
    };
    assert!(
        matches!(
            cause.as_ref(),
            SyncError::CommitMismatch { field: "did", .. }
        ),
        "{cause}"
    );
    assert_eq!(metrics.snapshot().rejected, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_of_an_inactive_account_are_not_delivered_until_it_is_active_again() {
    let net = shared().await;
    let (alice, writer) = account(net, "inactive").await;
    writer.create::<Note>(&note(0)).await.unwrap();
    account_xrpc(
        &alice,
        "com.atproto.server.deactivateAccount",
        Some(serde_json::json!({})),
    )
    .await;
    account_xrpc(&alice, "com.atproto.server.activateAccount", None).await;
    writer.create::<Note>(&note(1)).await.unwrap();

    // Alice's real frames: her note commits and her #account events.
    let ws = format!(
        "{}/xrpc/com.atproto.sync.subscribeRepos?cursor=0",
        net.pds(0).unwrap().url().replacen("http", "ws", 1)
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(ws).await.unwrap();
    let (mut notes, mut inactive, mut active) = (Vec::new(), None, None);
    while notes.len() < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(20), socket.next())
            .await
            .expect("alice's events on the stream")
            .unwrap()
            .unwrap();
        let Message::Binary(bytes) = msg else {
            continue;
        };
        match Frame::decode(&bytes).unwrap() {
            Frame::Commit(c)
                if c.repo == alice.did && c.ops.iter().any(|o| o.collection() == Note::NSID) =>
            {
                notes.push(bytes.to_vec())
            }
            Frame::Account(a) if a.did == alice.did && !a.active => inactive = Some(bytes.to_vec()),
            Frame::Account(a) if a.did == alice.did && inactive.is_some() => {
                active = Some(bytes.to_vec())
            }
            _ => {}
        }
    }
    let (inactive, active) = (
        inactive.expect("a deactivation event"),
        active.expect("a reactivation event"),
    );
    // A relay replaying note 0's commit while the account is deactivated: it must not be
    // passed on. After the reactivation, note 1 is.
    let seq = |bytes: &[u8], seq: i64| {
        let mut f = EditableFrame::parse(bytes);
        f.set("seq", Ipld::Integer(seq.into()));
        f.encode()
    };
    let script_frames = vec![
        seq(&inactive, 1),
        seq(&notes[0], 2),
        seq(&active, 3),
        seq(&notes[1], 4),
    ];
    let (url, _) = hostile_server(Arc::new(move |_| (script_frames.clone(), false))).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = Arc::clone(&seen);
    let watcher = Watcher::builder()
        .source(SubscribeRepos::new(&url))
        .plc_url(net.plc_url())
        .handler(move |note: Created<Note>| {
            s.lock().unwrap().push(note.n);
            async { Ok(()) }
        })
        .build()
        .unwrap();
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for("note 1", Duration::from_secs(20), || {
        !seen.lock().unwrap().is_empty()
    })
    .await;
    wait_for("every frame read", Duration::from_secs(10), || {
        metrics.snapshot().seq_lag == 0 && metrics.snapshot().events_in == 4
    })
    .await;
    stop.shutdown();
    running.await.unwrap().unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![1]);
    assert_eq!(metrics.snapshot().inactive_skipped, 1);
}

/// A relay in the middle that loses commits: each client connection is forwarded the live
/// stream of PDS 0, except the `#commit` frames `lose` picks, and the first connection also
/// gets the frames sent on `inject`. Returns its ws:// base URL.
async fn lossy_relay(
    net: &Devnet,
    lose: Arc<dyn Fn(&Frame) -> bool + Send + Sync>,
    inject: Option<tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>>,
) -> String {
    let upstream = format!(
        "{}/xrpc/com.atproto.sync.subscribeRepos",
        net.pds(0).unwrap().url().replacen("http", "ws", 1)
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let mut inject = inject;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (upstream, lose) = (upstream.clone(), Arc::clone(&lose));
            let mut inject = inject.take();
            tokio::spawn(async move {
                let Ok((mut from, _)) = tokio_tungstenite::connect_async(upstream).await else {
                    return;
                };
                let Ok(mut to) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                loop {
                    let injected = async {
                        match inject.as_mut() {
                            Some(rx) => rx.recv().await,
                            None => std::future::pending().await,
                        }
                    };
                    let msg = tokio::select! {
                        msg = from.next() => match msg {
                            Some(Ok(msg)) => msg,
                            _ => return,
                        },
                        Some(frame) = injected => Message::Binary(frame.into()),
                    };
                    if let Message::Binary(bytes) = &msg
                        && Frame::decode(bytes).is_ok_and(|f| lose(&f))
                    {
                        continue;
                    }
                    if to.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

/// Each created or deleted note a watcher's handlers got: path, action, origin.
type NoteOps = Arc<Mutex<Vec<(String, &'static str, murmur_firehose::Origin)>>>;

/// A watcher of `did`'s notes through the relay at `url`, backfilled, recording into `seen`.
fn backfilled_notes(
    net: &Devnet,
    url: &str,
    did: &str,
    seen: &NoteOps,
) -> murmur_firehose::WatcherBuilder {
    let (c, d) = (Arc::clone(seen), Arc::clone(seen));
    Watcher::builder()
        .relay(url)
        .plc_url(net.plc_url())
        .dids([did.to_string()])
        .backfill(murmur_firehose::Backfill::dids([did.to_string()]))
        .handler(move |_note: Created<Note>, op: OpEvent| {
            c.lock()
                .unwrap()
                .push((op.data().path.clone(), "create", op.origin()));
            async { Ok(()) }
        })
        .handler(move |_gone: Deleted<Note>, op: OpEvent| {
            d.lock()
                .unwrap()
                .push((op.data().path.clone(), "delete", op.origin()));
            async { Ok(()) }
        })
}

/// Notes 1-3 written to a repo, and a relay that will lose the commit creating note 4.
struct LossyRelay {
    /// The paths of notes 1-3.
    paths: Vec<String>,
    /// The record key note 4 will have, and its path.
    rkey4: String,
    p4: String,
    /// The relay's ws:// base URL.
    url: String,
}

/// Writes notes 1-3 with `writer` and starts a [`lossy_relay`] that loses the commit creating
/// note 4 (written later at `rkey4`, see [`create_4_delete_2`]).
async fn notes_and_a_lossy_relay(
    net: &Devnet,
    writer: &Writer,
    inject: Option<tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>>,
) -> LossyRelay {
    let mut paths = Vec::new();
    for n in 1..=3 {
        let uri = writer.create::<Note>(&note(n)).await.unwrap().uri;
        paths.push(format!(
            "{}/{}",
            Note::NSID,
            uri.rsplit('/').next().unwrap()
        ));
    }
    let rkey4 = writer.next_rkey();
    let p4 = format!("{}/{rkey4}", Note::NSID);
    let lost = p4.clone();
    let url = lossy_relay(
        net,
        Arc::new(move |f| matches!(f, Frame::Commit(c) if c.ops.iter().any(|op| op.path == lost))),
        inject,
    )
    .await;
    LossyRelay {
        paths,
        rkey4,
        p4,
        url,
    }
}

/// One commit: creates note 4 at `rkey4` and deletes the note at `path2`.
async fn create_4_delete_2(writer: &Writer, rkey4: &str, path2: &str) {
    let mut batch = writer.batch();
    batch
        .create_with_rkey::<Note>(rkey4, &note(4))
        .unwrap()
        .delete::<Note>(path2.rsplit('/').next().unwrap())
        .unwrap();
    batch.commit().await.unwrap();
}

/// A relay loses one commit of a backfilled repo: the watcher sees the rev chain break,
/// copies the repo again (getRepo from the real PDS), diffs it against the records its
/// handlers saw, and hands them exactly the missed create and delete, once, marked
/// `Origin::Resync`; the commit that revealed the gap is in the copy and is not delivered a
/// second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_losing_a_commit_is_resynced_and_handlers_get_exactly_what_was_missed() {
    use murmur_firehose::Origin;
    let net = shared().await;
    let (alice, writer) = account(net, "resync").await;
    // The relay loses the commit that creates note 4 (and deletes note 2).
    let lossy = notes_and_a_lossy_relay(net, &writer, None).await;
    let (paths, rkey4, p4, url) = (lossy.paths, lossy.rkey4, lossy.p4, lossy.url);
    let path = |uri: &str| format!("{}/{}", Note::NSID, uri.rsplit('/').next().unwrap());

    let seen: NoteOps = Arc::default();
    let gaps = Arc::new(Mutex::new(Vec::new()));
    let g = Arc::clone(&gaps);
    let state = tempfile::tempdir().unwrap();
    let watcher = backfilled_notes(net, &url, &alice.did, &seen)
        .state_dir(state.path())
        .on_gap(move |gap| g.lock().unwrap().push(gap.kind.clone()))
        .build()
        .unwrap();
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for("the backfill", Duration::from_secs(30), || {
        metrics.backfill().finished && seen.lock().unwrap().len() == 3
    })
    .await;

    create_4_delete_2(&writer, &rkey4, &paths[1]).await;
    let p5 = path(&writer.create::<Note>(&note(5)).await.unwrap().uri);
    wait_for("the resynced ops", Duration::from_secs(30), || {
        seen.lock().unwrap().len() >= 6
    })
    .await;
    // Nothing more arrives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.shutdown();
    running.await.unwrap().unwrap();

    let seen = seen.lock().unwrap().clone();
    let backfilled: Vec<_> = paths
        .iter()
        .map(|p| (p.clone(), "create", Origin::Backfill))
        .collect();
    assert_eq!(seen[..3], backfilled[..], "notes 1-3 from the first copy");
    let mut missed = [
        (paths[1].clone(), "delete", Origin::Resync),
        (p4.clone(), "create", Origin::Resync),
        (p5.clone(), "create", Origin::Resync),
    ];
    missed.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen[3..],
        missed[..],
        "the missed ops, once each, in key order"
    );
    assert!(
        gaps.lock()
            .unwrap()
            .iter()
            .any(|k| matches!(k, GapKind::ChainBreak { did } if *did == alice.did)),
        "the chain break is reported"
    );
    let snapshot = metrics.snapshot();
    assert_eq!((snapshot.resyncs, snapshot.resync_ops), (1, 3));
}

/// A `#sync` for a backfilled repo (its signed commit at the repo's head, as a host sends
/// after an import or a repair): the watcher copies the repo again and hands the handlers what
/// changed since its index, here a create and a delete whose commit the relay lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_event_for_a_backfilled_repo_resyncs_it_through_the_handlers() {
    use murmur_firehose::Origin;
    let net = shared().await;
    let (alice, writer) = account(net, "sync-resync").await;
    let (inject, injected) = tokio::sync::mpsc::unbounded_channel();
    let lossy = notes_and_a_lossy_relay(net, &writer, Some(injected)).await;
    let (paths, rkey4, p4, url) = (lossy.paths, lossy.rkey4, lossy.p4, lossy.url);

    let seen: NoteOps = Arc::default();
    let watcher = backfilled_notes(net, &url, &alice.did, &seen)
        .build()
        .unwrap();
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for("the backfill", Duration::from_secs(30), || {
        metrics.backfill().finished && seen.lock().unwrap().len() == 3
    })
    .await;

    create_4_delete_2(&writer, &rkey4, &paths[1]).await;
    // The #sync: the repo's signed head commit, alone in its CAR.
    let pds = net.pds(0).unwrap().url();
    let http = reqwest::Client::new();
    let car = http
        .get(format!(
            "{pds}/xrpc/com.atproto.sync.getRepo?did={}",
            alice.did
        ))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let head: serde_json::Value = http
        .get(format!(
            "{pds}/xrpc/com.atproto.sync.getLatestCommit?did={}",
            alice.did
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let slice = CarSlice::parse(&car).unwrap();
    let root = slice.roots()[0];
    let blocks = murmur_sync::write_car(root, [(root, slice.get(&root).unwrap())]);
    let mut frame = serde_ipld_dagcbor::to_vec(&ipld_core::ipld!({"op": 1, "t": "#sync"})).unwrap();
    frame.extend(
        serde_ipld_dagcbor::to_vec(&ipld_core::ipld!({
            "seq": 100_000_000,
            "did": alice.did.clone(),
            "blocks": Ipld::Bytes(blocks),
            "rev": head["rev"].as_str().unwrap(),
            "time": "2026-12-07T12:00:00.000Z",
        }))
        .unwrap(),
    );
    inject.send(frame).unwrap();
    wait_for("the resynced ops", Duration::from_secs(30), || {
        seen.lock().unwrap().len() >= 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.shutdown();
    running.await.unwrap().unwrap();

    let seen = seen.lock().unwrap().clone();
    let mut missed = [
        (paths[1].clone(), "delete", Origin::Resync),
        (p4.clone(), "create", Origin::Resync),
    ];
    missed.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen[3..],
        missed[..],
        "the changes behind the #sync, once each"
    );
    assert!(metrics.snapshot().resyncs >= 1);
}

/// The relay's seq goes backwards (a reset): every backfilled repo may have missed events, so
/// each is copied again and its handlers get what changed since its index, here a create
/// and a delete whose commit the relay lost, with no broken rev chain to reveal it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seq_regression_resyncs_every_backfilled_repo_through_the_handlers() {
    use murmur_firehose::Origin;
    let net = shared().await;
    let (alice, writer) = account(net, "regress-resync").await;
    let (_bob, bob_writer) = account(net, "regress-other").await;
    let (inject, injected) = tokio::sync::mpsc::unbounded_channel();
    let lossy = notes_and_a_lossy_relay(net, &writer, Some(injected)).await;
    let (paths, rkey4, p4, url) = (lossy.paths, lossy.rkey4, lossy.p4, lossy.url);
    let seen: NoteOps = Arc::default();
    let gaps = Arc::new(Mutex::new(Vec::new()));
    let g = Arc::clone(&gaps);
    let watcher = backfilled_notes(net, &url, &alice.did, &seen)
        .on_gap(move |gap| g.lock().unwrap().push(gap.kind.clone()))
        .build()
        .unwrap();
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for("the backfill", Duration::from_secs(30), || {
        metrics.backfill().finished && seen.lock().unwrap().len() == 3
    })
    .await;

    create_4_delete_2(&writer, &rkey4, &paths[1]).await;
    // A frame far ahead of the host's seqs (an #identity of another repo), then any real
    // frame: the seq went backwards.
    let mut frame =
        serde_ipld_dagcbor::to_vec(&ipld_core::ipld!({"op": 1, "t": "#identity"})).unwrap();
    frame.extend(
        serde_ipld_dagcbor::to_vec(&ipld_core::ipld!({
            "seq": 100_000_000,
            "did": "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa",
            "time": "2026-12-07T12:00:00.000Z",
        }))
        .unwrap(),
    );
    inject.send(frame).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    bob_writer.create::<Note>(&note(99)).await.unwrap();
    wait_for("the resynced ops", Duration::from_secs(30), || {
        seen.lock().unwrap().len() >= 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.shutdown();
    running.await.unwrap().unwrap();

    let seen = seen.lock().unwrap().clone();
    let mut missed = [
        (paths[1].clone(), "delete", Origin::Resync),
        (p4.clone(), "create", Origin::Resync),
    ];
    missed.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen[3..],
        missed[..],
        "the changes the relay lost, once each"
    );
    assert!(
        gaps.lock()
            .unwrap()
            .iter()
            .any(|k| matches!(k, GapKind::SeqRegression { .. })),
        "the regression is reported"
    );
    assert!(
        !gaps
            .lock()
            .unwrap()
            .iter()
            .any(|k| matches!(k, GapKind::ChainBreak { .. })),
        "no chain break revealed it"
    );
}
