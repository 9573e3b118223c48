//! The hub's Jetstream (`Hub::builder().serve_jetstream(..)`) against the real local network
//! and a real nats-server, checked by clients we did not write: `@atcute/jetstream` (which
//! opens with `requireHello` and validates every event against its own schema of Jetstream's
//! events) and `@skyware/jetstream` (filters in the query, switched with `options_update`),
//! both pinned in the devnet's package.json, and Node's own zstd with Jetstream's dictionary
//! for `compress=true`. A raw client holds the server to the protocol's edges: bad options,
//! `requireHello`, `maxMessageSizeBytes`, a cursor in the future.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use murmur_bus::{JetstreamConfig, StreamSettings};
use murmur_devnet::{Account, Devnet};
use murmur_e2e::nats::{cleanup, settings};
use murmur_e2e::{Note, account, note, run_node_script, shared};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

struct RunningHub {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

/// A hub over every host of `net`, serving Jetstream on a free loopback port.
async fn start_hub(net: &Devnet, settings: &StreamSettings) -> RunningHub {
    let hub = murmur_e2e::nats::start_hub(net, settings, |b| {
        b.serve_jetstream("127.0.0.1:0".parse().unwrap(), JetstreamConfig::default())
    })
    .await;
    RunningHub {
        addr: hub.jetstream.unwrap(),
        task: hub.task,
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

async fn node(script: &'static str, input: Value) -> Value {
    let install = tokio::task::spawn_blocking(murmur_devnet::provision)
        .await
        .unwrap()
        .unwrap();
    let out = tokio::task::spawn_blocking(move || run_node_script(&install, script, &input))
        .await
        .unwrap();
    serde_json::from_slice(&out).expect("node prints JSON")
}

/// Waits until the hub's Jetstream serves note `n` of `did` (so everything written before it
/// is in the frame stream).
async fn wait_until_served(addr: SocketAddr, cursor: i64, did: &str, n: u64) {
    wait_for_event(addr, cursor, did, &format!("note {n}"), |e| {
        e["commit"]["record"]["n"] == n
    })
    .await;
}

/// Reads the events of `did` the hub's Jetstream serves from `cursor` until one satisfies
/// `found` (`what` names it in the panic if none comes within a minute).
async fn wait_for_event(
    addr: SocketAddr,
    cursor: i64,
    did: &str,
    what: &str,
    found: impl Fn(&Value) -> bool,
) {
    let url = format!("ws://{addr}/subscribe?wantedDids={did}&cursor={cursor}");
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                if found(&serde_json::from_str(&text).unwrap()) {
                    return;
                }
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("waiting for {what} of {did}: {other:?}"),
        }
    }
}

/// A new account on host `pds` of `net`, returned once `hub` serves the `#account` event of
/// its creation. The hub stamps each event's `time_us` when it stores it, which can be after
/// the PDS has answered: a cursor taken before then would see the account's creation events
/// (`#identity`, `#account`, which pass every collection filter) as new.
async fn settled_account(
    net: &Devnet,
    hub: SocketAddr,
    pds: usize,
    name: &str,
) -> (Account, murmur_pds::Writer) {
    let before = now_us();
    let (account, writer) = account(net, pds, name).await;
    wait_for_event(hub, before, &account.did, "the #account event", |e| {
        e["kind"] == "account"
    })
    .await;
    (account, writer)
}

/// `@atcute/jetstream` (requireHello, schema-validated events) replays from a time cursor and
/// gets exactly the notes of the DIDs and collection it asked for, in order per DID, deletes
/// included; `@skyware/jetstream` then switches its filters on the live connection with
/// `options_update` and from then on gets only what the new filters let through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npm_jetstream_clients_get_exactly_the_filtered_events() {
    let net = shared().await;
    let settings = settings("jetstream");
    let hub = start_hub(net, &settings).await;
    let (alice, alice_w) = settled_account(net, hub.addr, 0, "jsa").await;
    let (bob, bob_w) = settled_account(net, hub.addr, 1, "jsb").await;
    let (carol, carol_w) = settled_account(net, hub.addr, 0, "jsc").await;
    let t0 = now_us();

    for n in 0..5 {
        alice_w.create::<Note>(&note(n)).await.unwrap();
        bob_w.create::<Note>(&note(100 + n)).await.unwrap();
        carol_w.create::<Note>(&note(200 + n)).await.unwrap();
    }
    let first_of_bob = bob_w.list::<Note>(100, None, true).await.unwrap().records;
    let rkey = first_of_bob
        .iter()
        .find(|r| r.value.n == 100)
        .unwrap()
        .rkey
        .clone();
    bob_w.delete::<Note>(&rkey, None).await.unwrap();
    for n in 0..2 {
        let other = murmur_lexicon::data::json_to_data(&json!({
            "$type": "test.murmur.other", "n": 50 + n
        }))
        .unwrap();
        alice_w
            .create_untyped("test.murmur.other", other, |_| Ok(()))
            .await
            .unwrap();
    }
    carol_w.create::<Note>(&note(299)).await.unwrap();
    wait_until_served(hub.addr, t0, &carol.did, 299).await;

    // @atcute/jetstream: the notes of alice and bob, nothing of carol or of other collections.
    let result = node(
        include_str!("jetstream_ts/atcute.mjs"),
        json!({
            "url": format!("ws://{}", hub.addr),
            "cursor": t0,
            "collections": ["test.murmur.note"],
            "dids": [&alice.did, &bob.did],
            "expect": 11,
            "timeoutMs": 60_000,
        }),
    )
    .await;
    assert_eq!(result["errors"], json!([]), "{result}");
    let events = result["events"].as_array().unwrap();
    let commits: Vec<&Value> = events.iter().filter(|e| e["kind"] == "commit").collect();
    let of = |did: &str, operation: &str| -> Vec<u64> {
        commits
            .iter()
            .filter(|e| e["did"] == did && e["operation"] == operation)
            .map(|e| e["n"].as_u64().unwrap_or(u64::MAX))
            .collect()
    };
    assert_eq!(of(&alice.did, "create"), [0, 1, 2, 3, 4], "{result}");
    assert_eq!(
        of(&bob.did, "create"),
        [100, 101, 102, 103, 104],
        "{result}"
    );
    let deletes: Vec<&&Value> = commits
        .iter()
        .filter(|e| e["operation"] == "delete")
        .collect();
    assert_eq!(deletes.len(), 1, "{result}");
    assert_eq!(
        (&deletes[0]["did"], &deletes[0]["rkey"]),
        (&json!(bob.did), &json!(rkey))
    );
    assert_eq!(deletes[0]["cid"], Value::Null, "a delete carries no cid");
    assert_eq!(commits.len(), 11, "nothing else: {result}");
    assert!(
        events
            .iter()
            .all(|e| e["did"] == alice.did || e["did"] == bob.did),
        "{result}"
    );
    let times: Vec<i64> = events
        .iter()
        .map(|e| e["time_us"].as_i64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert!(times[0] >= t0);

    // @skyware/jetstream: alice under test.murmur.* (notes and the other collection), then
    // switched to carol's notes while alice and carol keep writing.
    let writing = Arc::new(AtomicBool::new(true));
    let writer_task = {
        let writing = Arc::clone(&writing);
        tokio::spawn(async move {
            let mut n = 0;
            while writing.load(Ordering::Relaxed) && n < 200 {
                alice_w.create::<Note>(&note(1000 + n)).await.unwrap();
                carol_w.create::<Note>(&note(300 + n)).await.unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let result = node(
        include_str!("jetstream_ts/skyware.mjs"),
        json!({
            "url": format!("ws://{}/subscribe", hub.addr),
            "cursor": t0,
            "collections": ["test.murmur.*"],
            "dids": [&alice.did],
            "expect": 7,
            "switchTo": {"dids": [&carol.did], "collections": ["test.murmur.note"]},
            "expectAfter": 3,
            "timeoutMs": 60_000,
        }),
    )
    .await;
    writing.store(false, Ordering::Relaxed);
    writer_task.await.unwrap();
    assert_eq!(result["errors"], json!([]), "{result}");
    let before = result["before"].as_array().unwrap();
    let after = result["after"].as_array().unwrap();
    assert!(before.iter().all(|e| e["did"] == alice.did), "{result}");
    let replayed: Vec<(String, u64)> = before
        .iter()
        .take(7)
        .map(|e| {
            (
                e["collection"].as_str().unwrap().to_string(),
                e["n"].as_u64().unwrap(),
            )
        })
        .collect();
    let note_of = |n| ("test.murmur.note".to_string(), n);
    let other_of = |n| ("test.murmur.other".to_string(), n);
    assert_eq!(
        replayed,
        [
            note_of(0),
            note_of(1),
            note_of(2),
            note_of(3),
            note_of(4),
            other_of(50),
            other_of(51)
        ],
        "{result}"
    );
    assert!(after.len() >= 3, "{result}");
    for e in after {
        assert_eq!(e["did"], carol.did, "only carol after the switch: {result}");
        assert_eq!(e["collection"], "test.murmur.note");
        assert!(e["n"].as_u64().unwrap() >= 300, "{result}");
    }

    hub.task.abort();
    cleanup(&settings).await;
}

/// `compress=true`: every message is binary, and Node's own zstd with Jetstream's dictionary
/// turns it into the same JSON a plain subscriber gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_events_open_with_jetstreams_dictionary() {
    let net = shared().await;
    let settings = settings("jetstreamz");
    let hub = start_hub(net, &settings).await;
    let (dave, dave_w) = settled_account(net, hub.addr, 1, "jsd").await;
    let t0 = now_us();
    for n in 0..6 {
        dave_w.create::<Note>(&note(n)).await.unwrap();
    }
    wait_until_served(hub.addr, t0, &dave.did, 5).await;

    let dictionary = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(dictionary.path(), murmur_jetstream::ZSTD_DICTIONARY).unwrap();
    let query = format!("wantedDids={}&cursor={t0}", dave.did);
    let compressed = node(
        include_str!("jetstream_ts/zstd.mjs"),
        json!({
            "url": format!("ws://{}/subscribe?{query}&compress=true", hub.addr),
            "dictionary": dictionary.path(),
            "expect": 6,
            "timeoutMs": 60_000,
        }),
    )
    .await;
    assert_eq!(compressed["errors"], json!([]), "{compressed}");

    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/subscribe?{query}", hub.addr))
            .await
            .unwrap();
    let mut plain = Vec::new();
    while plain.len() < 6 {
        match tokio::time::timeout(Duration::from_secs(30), socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                plain.push(serde_json::from_str::<Value>(&text).unwrap())
            }
            other => panic!("plain subscriber: {other:?}"),
        }
    }
    assert_eq!(compressed["events"], Value::Array(plain.clone()));
    let ns: Vec<u64> = plain
        .iter()
        .map(|e| e["commit"]["record"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, [0, 1, 2, 3, 4, 5]);

    hub.task.abort();
    cleanup(&settings).await;
}

/// Every op of a batch has a `time_us` of its own, increasing in stream order, and a cursor
/// in the middle of a commit resumes at that op (inclusive), not at the commit's first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_op_has_a_time_of_its_own_and_a_cursor_resumes_inside_a_commit() {
    let net = shared().await;
    let settings = settings("jetstreamt");
    let hub = start_hub(net, &settings).await;
    let (fay, fay_w) = settled_account(net, hub.addr, 1, "jsf").await;
    let t0 = now_us();
    let mut batch = fay_w.batch();
    for n in 0..3 {
        batch.create::<Note>(&note(n)).unwrap();
    }
    batch.commit().await.unwrap();
    fay_w.create::<Note>(&note(3)).await.unwrap();
    wait_until_served(hub.addr, t0, &fay.did, 3).await;

    let read = |cursor: i64, n: usize| {
        let url = format!(
            "ws://{}/subscribe?wantedDids={}&cursor={cursor}",
            hub.addr, fay.did
        );
        async move {
            let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            let mut events = Vec::new();
            while events.len() < n {
                match tokio::time::timeout(Duration::from_secs(30), socket.next()).await {
                    Ok(Some(Ok(Message::Text(text)))) => {
                        let event: Value = serde_json::from_str(&text).unwrap();
                        events.push((
                            event["time_us"].as_i64().unwrap(),
                            event["commit"]["record"]["n"].as_u64().unwrap(),
                        ));
                    }
                    other => panic!("{other:?}"),
                }
            }
            events
        }
    };
    let all = read(t0, 4).await;
    assert_eq!(all.iter().map(|e| e.1).collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert!(
        all.windows(2).all(|w| w[0].0 < w[1].0),
        "strictly increasing: {all:?}"
    );
    // Resume at the batch's second op: it comes again, then the rest; not the first.
    let resumed = read(all[1].0, 3).await;
    assert_eq!(resumed, all[1..].to_vec());

    hub.task.abort();
    cleanup(&settings).await;
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The `n` of the next note a plain subscriber gets (the account's `identity` and `account`
/// events, which may reach the stream after a live subscriber connected, are passed over).
async fn next_n(socket: &mut Socket) -> Option<u64> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let event: Value = serde_json::from_str(&text).unwrap();
                if event["kind"] == "commit" {
                    return event["commit"]["record"]["n"].as_u64();
                }
            }
            other => panic!("{other:?}"),
        }
    }
}

/// What a raw client gets at the protocol's edges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_are_held_to_the_protocol() {
    let net = shared().await;
    let settings = settings("jetstreame");
    let hub = start_hub(net, &settings).await;
    let (erin, erin_w) = settled_account(net, hub.addr, 0, "jse").await;
    let base = format!("ws://{}/subscribe", hub.addr);

    // Options that are not valid: refused at the handshake, with the option named.
    for query in [
        "wantedCollections=app.bsky.feed.po*",
        "wantedDids=nope",
        "cursor=yesterday",
    ] {
        match tokio_tungstenite::connect_async(format!("{base}?{query}")).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 400, "{query}");
                let body = String::from_utf8(response.body().clone().unwrap()).unwrap();
                let option = query.split('=').next().unwrap();
                assert!(body.contains(option), "{query}: {body}");
            }
            other => panic!("{query}: {other:?}"),
        }
    }
    match tokio_tungstenite::connect_async(format!("ws://{}/xrpc/x", hub.addr)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 404)
        }
        other => panic!("another path: {other:?}"),
    }

    // requireHello: nothing before the hello; its filters apply from then on.
    let t0 = now_us();
    let (mut held, _) = tokio_tungstenite::connect_async(format!(
        "{base}?requireHello=true&cursor={t0}&wantedDids=did:plc:nobody"
    ))
    .await
    .unwrap();
    // maxMessageSizeBytes: a long note is left out, short ones come.
    let (mut small, _) = tokio_tungstenite::connect_async(format!(
        "{base}?wantedDids={}&maxMessageSizeBytes=1000",
        erin.did
    ))
    .await
    .unwrap();
    // A cursor in the future is live.
    let (mut future, _) = tokio_tungstenite::connect_async(format!(
        "{base}?wantedDids={}&cursor={}",
        erin.did,
        now_us() + 3_600_000_000
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    erin_w.create::<Note>(&note(1)).await.unwrap();
    let mut long = note(2);
    long.text = "x".repeat(2_000);
    erin_w.create::<Note>(&long).await.unwrap();
    erin_w.create::<Note>(&note(3)).await.unwrap();

    assert_eq!(next_n(&mut small).await, Some(1));
    assert_eq!(
        next_n(&mut small).await,
        Some(3),
        "the long note is left out"
    );
    for n in [1, 2, 3] {
        assert_eq!(next_n(&mut future).await, Some(n));
    }
    // The held connection got nothing so far.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), held.next())
            .await
            .is_err(),
        "nothing before the hello"
    );
    let hello = json!({"type": "options_update", "payload": {"wantedDids": [&erin.did]}});
    held.send(Message::Text(hello.to_string().into()))
        .await
        .unwrap();
    for n in [1, 2, 3] {
        assert_eq!(
            next_n(&mut held).await,
            Some(n),
            "replayed from the cursor after the hello"
        );
    }

    // An options_update that is not valid closes the connection with the reason.
    let dids: Vec<String> = (0..10_001).map(|i| format!("did:plc:{i}")).collect();
    let update = json!({"type": "options_update", "payload": {"wantedDids": dids}});
    held.send(Message::Text(update.to_string().into()))
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), held.next()).await {
        Ok(Some(Ok(Message::Close(Some(frame))))) => {
            assert_eq!(frame.code, CloseCode::Policy);
            assert!(frame.reason.contains("wantedDids"), "{}", frame.reason);
        }
        other => panic!("a close frame: {other:?}"),
    }

    hub.task.abort();
    cleanup(&settings).await;
}
