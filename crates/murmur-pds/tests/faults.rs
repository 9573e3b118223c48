//! Rate limits and faults. 429s and 5xx come from a scripted HTTP stub (the local PDS runs
//! with rate limits off); connection failures come from stopping a real local PDS.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use murmur_devnet::{Devnet, DevnetConfig};
use murmur_pds::{Error, Reader, RetryPolicy, Secret, Session, Writer, blob_cid};
use support::{Note, Notes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn note(text: &str) -> Note {
    Note {
        text: text.into(),
        tags: vec![],
        priority: 1,
        attachment: None,
    }
}

/// A scripted answer: status, extra headers, JSON body.
type Canned = (u16, Vec<(&'static str, String)>, String);

/// Serves `responses` in order (status, extra headers, JSON body), one per request; then 500.
async fn stub(responses: Vec<Canned>) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let responses = Arc::new(responses);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let responses = responses.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read headers, then the body by Content-Length.
                loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        while buf.len() < end + 4 + len {
                            let n = sock.read(&mut chunk).await.unwrap_or(0);
                            if n == 0 {
                                break;
                            }
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        break;
                    }
                }
                let i = counter.fetch_add(1, Ordering::SeqCst);
                let (status, headers, body) = responses.get(i).cloned().unwrap_or((
                    500,
                    vec![],
                    r#"{"error":"InternalServerError"}"#.into(),
                ));
                let mut out = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
                    body.len()
                );
                for (k, v) in headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str("\r\n");
                out.push_str(&body);
                let _ = sock.write_all(out.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (url, hits)
}

fn writer(url: &str, policy: RetryPolicy) -> Writer {
    Writer::builder(url)
        .retry_policy(policy)
        .with_session(Session {
            did: "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa".into(),
            handle: "stub.test".into(),
            pds: url.into(),
            access_jwt: Secret::new("a"),
            refresh_jwt: Secret::new("r"),
        })
        .unwrap()
}

const CID: &str = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm";

fn record_body() -> String {
    format!(
        r#"{{"uri":"at://did:plc:aaaaaaaaaaaaaaaaaaaaaaaa/test.murmur.note/k","cid":"{CID}","value":{{"$type":"test.murmur.note","text":"hi","tags":[],"priority":1}}}}"#
    )
}

fn put_body() -> String {
    format!(r#"{{"uri":"at://did:plc:aaaaaaaaaaaaaaaaaaaaaaaa/test.murmur.note/k","cid":"{CID}"}}"#)
}

#[tokio::test]
async fn a_429_waits_for_retry_after_then_succeeds_and_keeps_ratelimit_headers() {
    let reset = (std::time::SystemTime::now() + Duration::from_secs(30))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (url, hits) = stub(vec![
        (
            429,
            vec![
                ("retry-after", "1".into()),
                ("ratelimit-limit", "100".into()),
                ("ratelimit-remaining", "0".into()),
                ("ratelimit-reset", reset.to_string()),
                ("ratelimit-policy", "100;w=300".into()),
            ],
            r#"{"error":"RateLimitExceeded","message":"Rate Limit Exceeded"}"#.into(),
        ),
        (
            200,
            vec![("ratelimit-remaining", "99".into())],
            record_body(),
        ),
    ])
    .await;
    let w = writer(&url, RetryPolicy::default());
    let started = Instant::now();
    let got = w.get::<Notes>("k").await.unwrap().unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "honoured Retry-After"
    );
    assert_eq!(got.value, note("hi"));
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    assert_eq!(w.rate_limit().unwrap().remaining, Some(99));
}

#[tokio::test]
async fn a_429_asking_for_too_long_a_wait_is_a_typed_error_at_once() {
    let (url, hits) = stub(vec![(
        429,
        vec![
            ("ratelimit-limit", "100".into()),
            ("ratelimit-remaining", "0".into()),
            ("ratelimit-reset", "600".into()),
        ],
        r#"{"error":"RateLimitExceeded"}"#.into(),
    )])
    .await;
    let w = writer(&url, RetryPolicy::default());
    let started = Instant::now();
    let err = w.create::<Notes>(&note("x")).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    match err {
        Error::RateLimited { retry_after, limit } => {
            let wait = retry_after.unwrap();
            assert!(wait > Duration::from_secs(590) && wait <= Duration::from_secs(600));
            assert_eq!(limit.unwrap().limit, Some(100));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn server_errors_are_retried_only_for_idempotent_writes() {
    let fast = RetryPolicy {
        initial_backoff: Duration::from_millis(5),
        ..RetryPolicy::default()
    };
    let err500 = || {
        (
            500,
            vec![],
            r#"{"error":"InternalServerError","message":"boom"}"#.to_string(),
        )
    };
    // put without swapRecord: replayable.
    let (url, hits) = stub(vec![err500(), (200, vec![], put_body())]).await;
    let w = writer(&url, fast.clone());
    w.put::<Notes>("k", &note("hi"), None).await.unwrap();
    assert_eq!(hits.load(Ordering::SeqCst), 2);

    // put with swapRecord: a replay could report a false conflict, so no retry.
    let (url, hits) = stub(vec![err500(), (200, vec![], put_body())]).await;
    let w = writer(&url, fast.clone());
    let cid = CID.parse().unwrap();
    let err = w
        .put::<Notes>("k", &note("hi"), Some(cid))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Xrpc { status: 500, .. }), "{err:?}");
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // applyWrites: not replayed either.
    let (url, hits) = stub(vec![err500(), (200, vec![], "{}".into())]).await;
    let w = writer(&url, fast);
    let mut batch = w.batch();
    batch.create::<Notes>(&note("a")).unwrap();
    assert!(batch.commit().await.is_err());
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_stopped_pds_gives_unreachable_and_the_writer_recovers_after_restart() {
    let net = tokio::task::spawn_blocking(|| Devnet::start(DevnetConfig::default()))
        .await
        .unwrap()
        .unwrap();
    let acct = net
        .create_account(0, &net.unique_handle("fault"), "pw")
        .await
        .unwrap();
    let w = Writer::builder(&acct.pds_url)
        .retry_policy(RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(50),
            ..RetryPolicy::default()
        })
        .login(&acct.handle, &acct.password)
        .await
        .unwrap();
    w.create::<Notes>(&note("before")).await.unwrap();

    let net = tokio::task::spawn_blocking(move || {
        net.pds(0).unwrap().stop();
        net
    })
    .await
    .unwrap();
    let err = w.create::<Notes>(&note("during")).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unreachable {
                attempts: 2,
                sent: false,
                ..
            }
        ),
        "{err:?}"
    );
    let net = tokio::task::spawn_blocking(move || net.pds(0).unwrap().start().map(|()| net))
        .await
        .unwrap()
        .unwrap();
    w.create::<Notes>(&note("after")).await.unwrap();
    let page = w.list::<Notes>(10, None, true).await.unwrap();
    let texts: Vec<_> = page.records.iter().map(|r| r.value.text.as_str()).collect();
    assert_eq!(texts, ["before", "after"]);
    tokio::task::spawn_blocking(move || drop(net))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_create_replayed_after_a_lost_answer_is_not_duplicated() {
    // The same TID key written twice: the second attempt must not create a second record.
    let net = tokio::task::spawn_blocking(Devnet::shared)
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"));
    let acct = net
        .create_account(0, &net.unique_handle("replay"), "pw")
        .await
        .unwrap();
    let w = Writer::login(&acct.pds_url, &acct.handle, &acct.password)
        .await
        .unwrap();
    let rkey = w.next_rkey();
    let first = w
        .create_with_rkey::<Notes>(&rkey, &note("once"))
        .await
        .unwrap();
    assert!(first.commit.is_some());
    // Sending the same create again is what a replay after a lost answer does: the PDS
    // refuses it (with a 500), the writer reads the key back, finds its own record.
    let replay = w
        .create_with_rkey::<Notes>(&rkey, &note("once"))
        .await
        .unwrap();
    assert_eq!(replay.cid, first.cid);
    assert_eq!(replay.uri, first.uri);
    assert_eq!(replay.commit, None, "no new commit");
    // Different content at that key is a real failure, not success.
    let err = w
        .create_with_rkey::<Notes>(&rkey, &note("other"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Xrpc { status: 500, .. }), "{err:?}");
    let page = w.list::<Notes>(10, None, false).await.unwrap();
    assert_eq!(page.records.len(), 1);
}

#[tokio::test]
async fn a_blob_is_returned_only_when_its_bytes_hash_to_its_cid() {
    let did = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa";
    let content = "the bytes of a blob";
    let cid = blob_cid(content.as_bytes());
    let (url, hits) = stub(vec![
        (200, vec![], content.into()),
        // One byte changed: a broken or hostile server.
        (200, vec![], "the bytes of a blub".into()),
        (200, vec![], "x".repeat(1000)),
        (
            400,
            vec![],
            r#"{"error":"BlobNotFound","message":"Blob not found"}"#.into(),
        ),
    ])
    .await;
    let reader = Reader::with_http_client(&url, None, RetryPolicy::none()).unwrap();
    assert_eq!(
        reader.get_blob(did, &cid, 1024).await.unwrap(),
        content.as_bytes()
    );
    let err = reader.get_blob(did, &cid, 1024).await.unwrap_err();
    assert!(
        matches!(&err, Error::BlobMismatch { did: d, cid: c } if d == did && *c == cid.to_string()),
        "{err:?}"
    );
    let err = reader.get_blob(did, &cid, 100).await.unwrap_err();
    assert!(
        matches!(err, Error::ResponseTooLarge { limit: 100, .. }),
        "{err:?}"
    );
    let err = reader.get_blob(did, &cid, 1024).await.unwrap_err();
    assert!(matches!(err, Error::BlobNotFound { .. }), "{err:?}");
    assert_eq!(hits.load(Ordering::SeqCst), 4);

    // A record's CID (dag-cbor) is not a blob's: refused before any request.
    let record: murmur_pds::Cid = CID.parse().unwrap();
    let err = reader.get_blob(did, &record, 1024).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                what: "blob CID",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 4);
}
