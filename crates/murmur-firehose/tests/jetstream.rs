//! A watcher on a Jetstream source, against a Jetstream server scripted here: it sends the
//! event shapes Jetstream's README shows (plain and compressed) and hostile messages, and
//! checks the query and the `options_update`s it receives.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use murmur_firehose::{
    Action, FileCursorStore, JetstreamSource, OpEvent, Provenance, Watcher, WatcherBuilder,
};
use murmur_jetstream::{Compressor, Options};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

/// The like event of Jetstream's README, byte for byte.
const README_COMMIT: &str = r#"{"did":"did:plc:eygmaihciaxprqvxpfvl6flk","time_us":1725911162329308,"kind":"commit","commit":{"rev":"3l3qo2vutsw2b","operation":"create","collection":"app.bsky.feed.like","rkey":"3l3qo2vuowo2b","record":{"$type":"app.bsky.feed.like","createdAt":"2024-09-09T19:46:02.102Z","subject":{"cid":"bafyreidc6sydkkbchcyg62v77wbhzvb2mvytlmsychqgwf2xojjtirmzj4","uri":"at://did:plc:wa7b35aakoll7hugkrjtf3xf/app.bsky.feed.post/3l3pte3p2e325"}},"cid":"bafyreidwaivazkwu67xztlmuobx35hs2lnfh3kolmgfmucldvhd3sgzcqi"}}"#;
/// The delete event of Jetstream's README (a follow: not a collection these watchers take).
const README_DELETE: &str = r#"{"did":"did:plc:rfov6bpyztcnedeyyzgfq42k","time_us":1725516666833633,"kind":"commit","commit":{"rev":"3l3f6nzl3cv2s","operation":"delete","collection":"app.bsky.graph.follow","rkey":"3l3dn7tku762u"}}"#;

const DID: &str = "did:plc:eygmaihciaxprqvxpfvl6flk";

/// One connection to the scripted server: the query it asked with, and the socket.
struct Connection {
    query: Options,
    socket: WebSocketStream<TcpStream>,
}

impl Connection {
    async fn send_text(&mut self, json: &str) {
        self.socket
            .send(Message::Text(json.to_string().into()))
            .await
            .unwrap();
    }

    async fn send_compressed(&mut self, json: &str) {
        let bytes = Compressor::new().compress(json.as_bytes());
        self.socket
            .send(Message::Binary(bytes.into()))
            .await
            .unwrap();
    }

    /// The next text message the subscriber sends (an `options_update`).
    async fn next_text(&mut self) -> String {
        loop {
            let message = tokio::time::timeout(Duration::from_secs(20), self.socket.next())
                .await
                .expect("a message from the subscriber")
                .expect("the connection is open")
                .unwrap();
            if let Message::Text(text) = message {
                return text.to_string();
            }
        }
    }
}

/// A Jetstream server on a free port: its URL, and the connections it accepts.
async fn server() -> (String, mpsc::Receiver<Connection>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let mut query = None;
            // The callback's signature is tungstenite's.
            #[allow(clippy::result_large_err)]
            let socket = tokio_tungstenite::accept_hdr_async(
                stream,
                |request: &Request, response: Response| {
                    assert_eq!(request.uri().path(), "/subscribe");
                    query = Some(request.uri().query().unwrap_or("").to_string());
                    Ok(response)
                },
            )
            .await;
            let Ok(socket) = socket else { continue };
            let query = Options::from_query(&query.unwrap()).expect("a valid Jetstream query");
            if tx.send(Connection { query, socket }).await.is_err() {
                return;
            }
        }
    });
    (url, rx)
}

async fn accept(connections: &mut mpsc::Receiver<Connection>) -> Connection {
    tokio::time::timeout(Duration::from_secs(20), connections.recv())
        .await
        .expect("the watcher connects")
        .unwrap()
}

/// A like of `did` at `time_us` (its CID computed from its record).
fn like(did: &str, time_us: i64, rkey: &str) -> String {
    let record = serde_json::json!({
        "$type": "app.bsky.feed.like",
        "createdAt": "2026-12-07T20:00:00.000Z",
        "subject": {
            "cid": "bafyreidc6sydkkbchcyg62v77wbhzvb2mvytlmsychqgwf2xojjtirmzj4",
            "uri": "at://did:plc:wa7b35aakoll7hugkrjtf3xf/app.bsky.feed.post/3l3pte3p2e325"
        }
    });
    let bytes =
        murmur_lexicon::data::to_dag_cbor(&murmur_lexicon::data::json_to_data(&record).unwrap())
            .unwrap();
    let cid = murmur_sync::cid_for(0x71, &bytes);
    // A TID of its own per record key (TIDs use base32-sortable letters and 2-7 only).
    let suffix: String = rkey[rkey.len() - 2..]
        .chars()
        .map(|c| {
            if matches!(c, '2'..='7' | 'a'..='z') {
                c
            } else {
                'a'
            }
        })
        .collect();
    let rev = format!("3l3qo2vutsw{suffix}");
    serde_json::json!({
        "did": did, "time_us": time_us, "kind": "commit",
        "commit": {"rev": rev, "operation": "create",
            "collection": "app.bsky.feed.like", "rkey": rkey, "record": record, "cid": cid.to_string()}
    })
    .to_string()
}

/// What a watcher's handlers and hooks saw.
#[derive(Clone, Default)]
struct Seen {
    ops: Arc<Mutex<Vec<OpEvent>>>,
    rejected: Arc<Mutex<Vec<String>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Seen {
    fn paths(&self) -> Vec<String> {
        self.ops
            .lock()
            .unwrap()
            .iter()
            .map(|op| op.data().path.clone())
            .collect()
    }

    fn watcher(&self, builder: WatcherBuilder) -> Watcher {
        let (ops, rejected, errors) = (
            Arc::clone(&self.ops),
            Arc::clone(&self.rejected),
            Arc::clone(&self.errors),
        );
        builder
            .collections(["app.bsky.feed.*"])
            .tail(move |op: OpEvent| {
                let ops = Arc::clone(&ops);
                async move {
                    ops.lock().unwrap().push(op);
                    Ok(())
                }
            })
            .on_rejected(move |op, why| {
                rejected
                    .lock()
                    .unwrap()
                    .push(format!("{}: {why}", op.uri()))
            })
            .on_error(move |e| errors.lock().unwrap().push(e.to_string()))
            .build()
            .unwrap()
    }
}

fn fast_reconnect() -> murmur_firehose::Backoff {
    murmur_firehose::Backoff {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(100),
        ..Default::default()
    }
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn plain_and_compressed_events_reach_handlers_unverified_and_bad_ones_never_do() {
    let (url, mut connections) = server().await;
    let seen = Seen::default();
    let watcher = seen.watcher(Watcher::builder().jetstream(&url));
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());

    let mut conn = accept(&mut connections).await;
    assert_eq!(conn.query.wanted_collections, vec!["app.bsky.feed.*"]);
    assert!(conn.query.compress, "compressed by default");
    assert_eq!(conn.query.cursor, None, "live: no cursor stored");
    assert!(conn.query.wanted_dids.is_empty(), "every DID");

    conn.send_compressed(README_COMMIT).await;
    // Not a collection the watcher takes (a real Jetstream would not send it).
    conn.send_text(README_DELETE).await;
    // The like with its record altered and its CID kept.
    conn.send_text(&README_COMMIT.replace("2024-09-09T19:46:02.102Z", "2024-09-09T19:46:02.103Z"))
        .await;
    // Hostile messages: not zstd, not JSON, not an event, a zstd bomb.
    conn.socket
        .send(Message::Binary(
            vec![0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3].into(),
        ))
        .await
        .unwrap();
    conn.send_text("{not json").await;
    conn.send_text(r#"{"did":"did:plc:x","time_us":1,"kind":"commit"}"#)
        .await;
    conn.send_compressed(&" ".repeat(murmur_jetstream::MAX_EVENT_BYTES + 1))
        .await;
    // The connection survives them all: a plain event after them still arrives.
    conn.send_text(&like(DID, 1725911162329400, "3l3qo2vuowo3c"))
        .await;

    wait_for("both likes", || seen.ops.lock().unwrap().len() == 2).await;
    assert_eq!(
        seen.paths(),
        [
            "app.bsky.feed.like/3l3qo2vuowo2b",
            "app.bsky.feed.like/3l3qo2vuowo3c"
        ]
    );
    let first = seen.ops.lock().unwrap()[0].clone();
    assert_eq!(first.provenance(), Provenance::Unverified);
    assert_eq!(first.data().action, Action::Create);
    assert_eq!(first.data().source.as_ref(), format!("{url}/subscribe"));
    assert_eq!(
        murmur_sync::cid_for(0x71, first.data().record.as_deref().unwrap()),
        first.data().cid.unwrap()
    );
    let rejected = seen.rejected.lock().unwrap().clone();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(
        rejected[0].contains("does not hash to its CID"),
        "{rejected:?}"
    );
    let errors = seen.errors.lock().unwrap().clone();
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(
        errors.iter().any(|e| e.contains("decompress")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("more than")),
        "the bomb is refused: {errors:?}"
    );
    assert!(
        connections.try_recv().is_err(),
        "no reconnect: the connection was kept"
    );

    stop.shutdown();
    running.await.unwrap().unwrap();
}

/// A narrower allowlist is sent as an `options_update` on the live connection; a wider one
/// reconnects from the cursor (so the new repos' events sent before Jetstream would have
/// applied an update are not missed); an allowlist too long for a URL goes as the hello.
#[tokio::test]
async fn a_change_of_the_did_allowlist_is_sent_as_an_options_update() {
    let (url, mut connections) = server().await;
    let seen = Seen::default();
    let watcher = seen.watcher(
        Watcher::builder()
            .feed(JetstreamSource::new(&url).compress(false))
            .dids([DID]),
    );
    let dids = watcher.dids();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());

    let conn = accept(&mut connections).await;
    assert_eq!(conn.query.wanted_dids, vec![DID]);
    assert!(!conn.query.compress);

    // Wider: a new connection asks for both.
    dids.insert("did:plc:ufbl4k27gp6kzas5glhz7fim");
    let mut conn = accept(&mut connections).await;
    assert_eq!(
        conn.query.wanted_dids,
        vec![DID, "did:plc:ufbl4k27gp6kzas5glhz7fim"]
    );
    assert_eq!(conn.query.wanted_collections, vec!["app.bsky.feed.*"]);
    let mut options = conn.query.clone();

    // Events of a DID no longer allowed are dropped here, whatever the server sends.
    dids.remove(DID);
    options
        .apply_subscriber_message(conn.next_text().await.as_bytes())
        .unwrap();
    assert_eq!(
        options.wanted_dids,
        vec!["did:plc:ufbl4k27gp6kzas5glhz7fim"]
    );
    conn.send_text(README_COMMIT).await;
    // The newly allowed DID's like from before it was allowed: skipped.
    conn.send_text(&like(
        "did:plc:ufbl4k27gp6kzas5glhz7fim",
        1725911162329500,
        "3l3qo2vuowo4c",
    ))
    .await;
    conn.send_text(&like(
        "did:plc:ufbl4k27gp6kzas5glhz7fim",
        // Stored after the DID was allowed (the watcher skips what came before).
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as i64,
        "3l3qo2vuowo4d",
    ))
    .await;
    wait_for("the allowed DID's like", || {
        seen.ops.lock().unwrap().len() == 1
    })
    .await;
    assert_eq!(
        seen.ops.lock().unwrap()[0].data().path,
        "app.bsky.feed.like/3l3qo2vuowo4d"
    );

    // Too many DIDs for a URL: the query asks for a hello, and the hello carries them.
    let many: Vec<String> = (0..300).map(|i| format!("did:plc:{i:024}")).collect();
    dids.set(many.clone());
    let mut conn = accept(&mut connections).await;
    assert!(conn.query.require_hello);
    assert!(conn.query.wanted_dids.is_empty());
    let mut hello = conn.query.clone();
    hello
        .apply_subscriber_message(conn.next_text().await.as_bytes())
        .unwrap();
    let mut sent = hello.wanted_dids.clone();
    sent.sort();
    let mut expected = many;
    expected.sort();
    assert_eq!(sent, expected);
    assert_eq!(hello.wanted_collections, vec!["app.bsky.feed.*"]);

    stop.shutdown();
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn reconnects_resume_from_the_stored_cursor_with_a_rewind_and_replays_run_once() {
    let (url, mut connections) = server().await;
    let state = tempfile::tempdir().unwrap();
    let seen = Seen::default();
    let source = || {
        JetstreamSource::new(&url)
            .rewind(Duration::from_secs(1))
            .reconnect(fast_reconnect())
    };
    let second = 1_000_000i64;
    let t0 = 1_700_000_000 * second;
    let watcher = seen.watcher(Watcher::builder().feed(source()).state_dir(state.path()));
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());

    let mut conn = accept(&mut connections).await;
    for (i, rkey) in ["3l3qo2vuowo11", "3l3qo2vuowo12", "3l3qo2vuowo13"]
        .iter()
        .enumerate()
    {
        conn.send_text(&like(DID, t0 + i as i64 * second, rkey))
            .await;
    }
    wait_for("three likes", || seen.ops.lock().unwrap().len() == 3).await;
    drop(conn);

    // The cursor is the last event finished (t0 + 2 s), less the rewind.
    let mut conn = accept(&mut connections).await;
    assert_eq!(conn.query.cursor, Some(t0 + second));
    conn.send_text(&like(DID, t0 + second, "3l3qo2vuowo12"))
        .await;
    conn.send_text(&like(DID, t0 + 2 * second, "3l3qo2vuowo13"))
        .await;
    conn.send_text(&like(DID, t0 + 3 * second, "3l3qo2vuowo14"))
        .await;
    wait_for("the fourth like", || seen.ops.lock().unwrap().len() == 4).await;
    stop.shutdown();
    running.await.unwrap().unwrap();
    assert_eq!(
        seen.paths(),
        [
            "app.bsky.feed.like/3l3qo2vuowo11",
            "app.bsky.feed.like/3l3qo2vuowo12",
            "app.bsky.feed.like/3l3qo2vuowo13",
            "app.bsky.feed.like/3l3qo2vuowo14"
        ],
        "the replayed likes were dropped"
    );
    let stored = FileCursorStore::new(state.path().join("cursors"));
    use murmur_firehose::CursorStore as _;
    assert_eq!(
        stored.load(&format!("{url}/subscribe")).await.unwrap(),
        Some(t0 + 3 * second)
    );

    // A new process on the same state: the dedup store drops what the first one finished.
    let again = Seen::default();
    let watcher = again.watcher(Watcher::builder().feed(source()).state_dir(state.path()));
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    let mut conn = accept(&mut connections).await;
    assert_eq!(conn.query.cursor, Some(t0 + 2 * second));
    conn.send_text(&like(DID, t0 + 2 * second, "3l3qo2vuowo13"))
        .await;
    conn.send_text(&like(DID, t0 + 3 * second, "3l3qo2vuowo14"))
        .await;
    conn.send_text(&like(DID, t0 + 4 * second, "3l3qo2vuowo15"))
        .await;
    wait_for("the fifth like", || !again.ops.lock().unwrap().is_empty()).await;
    stop.shutdown();
    running.await.unwrap().unwrap();
    assert_eq!(again.paths(), ["app.bsky.feed.like/3l3qo2vuowo15"]);
}

#[tokio::test]
async fn an_oversized_message_resets_the_connection_and_reading_goes_on() {
    let (url, mut connections) = server().await;
    let seen = Seen::default();
    let watcher = seen
        .watcher(Watcher::builder().feed(JetstreamSource::new(&url).reconnect(fast_reconnect())));
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());

    let mut conn = accept(&mut connections).await;
    let _ = conn
        .socket
        .send(Message::Text(
            " ".repeat(murmur_jetstream::MAX_EVENT_BYTES + 1).into(),
        ))
        .await;
    let mut conn = accept(&mut connections).await;
    conn.send_text(README_COMMIT).await;
    wait_for("the like", || seen.ops.lock().unwrap().len() == 1).await;
    let errors = seen.errors.lock().unwrap().clone();
    assert!(
        errors.iter().any(|e| e.contains("disconnected")),
        "{errors:?}"
    );

    stop.shutdown();
    running.await.unwrap().unwrap();
}

/// A server that goes silent (it stops reading, so not even pongs come) is given up after the
/// idle timeout, whatever pings and cursor flushes the watcher does meanwhile, and the watcher
/// connects again. Events with a time that cannot be a cursor (negative, or far ahead of this
/// clock) or a rev that is not a TID never reach a handler and leave the cursor where it was.
#[tokio::test]
async fn a_silent_server_is_left_and_events_with_bad_times_or_revs_are_refused() {
    let (url, mut connections) = server().await;
    let state = tempfile::tempdir().unwrap();
    let seen = Seen::default();
    let source = JetstreamSource::new(&url)
        .with_keepalive(Duration::from_millis(100), Duration::from_millis(700))
        .reconnect(fast_reconnect());
    let watcher = seen.watcher(Watcher::builder().feed(source).state_dir(state.path()));
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());

    let mut conn = accept(&mut connections).await;
    let t = 1_700_000_000_000_000i64;
    conn.send_text(&like(DID, t, "3l3qo2vuowo2c")).await;
    conn.send_text(&like(DID, -5, "3l3qo2vuowo2d")).await;
    conn.send_text(&like(DID, i64::MAX, "3l3qo2vuowo2e")).await;
    conn.send_text(&like(DID, t + 1, "3l3qo2vuowo2f").replace("3l3qo2vutsw2f", "not-a-tid"))
        .await;
    wait_for("the good like", || seen.ops.lock().unwrap().len() == 1).await;
    wait_for("the bad times reported", || {
        seen.errors
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.contains("is not a time"))
            .count()
            == 2
    })
    .await;
    wait_for("the bad rev rejected", || {
        seen.rejected
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.contains("not a TID"))
    })
    .await;
    assert_eq!(seen.paths(), ["app.bsky.feed.like/3l3qo2vuowo2c"]);

    // Silent from here on (the socket is held, never read): a new connection comes, and its
    // cursor is the last event read with a usable time (the rejected one), less the rewind.
    let started = Instant::now();
    let next = accept(&mut connections).await;
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    let rewind = murmur_firehose::DEFAULT_JETSTREAM_REWIND.as_micros() as i64;
    assert_eq!(next.query.cursor, Some(t + 1 - rewind));
    assert!(
        seen.errors
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.contains("no data")),
        "{:?}",
        seen.errors.lock().unwrap()
    );
    drop(conn);
    stop.shutdown();
    running.await.unwrap().unwrap();
}
