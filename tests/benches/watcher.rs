//! Watcher benchmarks on the real local network (prints figures; not a timed test).
//!
//! `cargo bench -p murmur-e2e --bench watcher` (set `MURMUR_BENCH_RECORDS`, default 1000)
//!
//! Write-to-handler latency: sequential creates on one PDS; for each record, the time from
//! the start of the createRecord call until (a) a bare WebSocket client that only decodes
//! frame headers sees its `#commit` frame, and (b) a murmur watcher (Full verification)
//! calls the handler. Reported side by side: p50/p99 of each and of the added latency.
//!
//! Dispatch throughput (no network) is `cargo bench -p murmur-firehose --bench dispatch`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atrium_api::types::Collection;
use futures_util::StreamExt;
use murmur_devnet::{Devnet, DevnetConfig};
use murmur_e2e::bench::{env_or, latency_line};
use murmur_firehose::{Created, OpEvent, Watcher};
use murmur_lexicon::{Validate, ValidationError};
use murmur_pds::Writer;
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug)]
struct Note;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NoteRecord {
    text: String,
    n: u64,
    created_at: String,
}

impl Collection for Note {
    const NSID: &'static str = "bench.murmur.note";
    type Record = NoteRecord;
}

impl Validate for NoteRecord {
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}

#[derive(Deserialize)]
struct Header {
    t: Option<String>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let records: u64 = env_or("MURMUR_BENCH_RECORDS", 1000);
    let net = tokio::task::spawn_blocking(|| Devnet::start(DevnetConfig::default()))
        .await
        .unwrap()
        .expect("local network");
    let pds = net.pds(0).unwrap().url().to_string();
    let alice = net
        .create_account(0, "bench.test", "bench-pass")
        .await
        .unwrap();
    let writer = Writer::login(&pds, &alice.did, "bench-pass").await.unwrap();

    // The bare client: header-only decoding, remembers when each #commit arrived.
    let bare_times: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let ws = format!(
        "{}/xrpc/com.atproto.sync.subscribeRepos",
        pds.replacen("http", "ws", 1)
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(ws).await.unwrap();
    {
        let bare_times = Arc::clone(&bare_times);
        tokio::spawn(async move {
            while let Some(Ok(msg)) = socket.next().await {
                let Message::Binary(bytes) = msg else {
                    continue;
                };
                let now = Instant::now();
                let mut rest: &[u8] = &bytes;
                let header: Header = serde_ipld_dagcbor::de::from_reader_once(&mut rest).unwrap();
                if header.t.as_deref() == Some("#commit") {
                    bare_times.lock().unwrap().push(now);
                }
            }
        });
    }

    let handled: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let h = Arc::clone(&handled);
    let watcher = Watcher::builder()
        .pds(&pds)
        .plc_url(net.plc_url())
        .dids([alice.did.clone()])
        .handler(move |rec: Created<Note>, _op: OpEvent| {
            let now = Instant::now();
            h.lock().unwrap().insert(rec.n, now);
            async { Ok(()) }
        })
        .build()
        .unwrap();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());

    // Warm-up: both clients connected, identity resolved, connections pooled.
    let mut warm = 0u64;
    let wait = |n: u64, commits: usize| {
        let (handled, bare_times) = (Arc::clone(&handled), Arc::clone(&bare_times));
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let seen = handled.lock().unwrap().contains_key(&n)
                    && bare_times.lock().unwrap().len() >= commits;
                if seen {
                    return true;
                }
                if Instant::now() > deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
    };
    let base = 1_000_000u64;
    loop {
        let before = bare_times.lock().unwrap().len();
        writer
            .create::<Note>(&NoteRecord {
                text: "warm".into(),
                n: base + warm,
                created_at: "2026-11-23T12:00:00.000Z".into(),
            })
            .await
            .unwrap();
        warm += 1;
        if wait(base + warm - 1, before + 1).await || warm > 20 {
            break;
        }
    }

    let (mut bare_ms, mut murmur_ms, mut added_ms) = (Vec::new(), Vec::new(), Vec::new());
    let started = Instant::now();
    for n in 0..records {
        let commits_before = bare_times.lock().unwrap().len();
        let t0 = Instant::now();
        writer
            .create::<Note>(&NoteRecord {
                text: format!("note {n}"),
                n,
                created_at: "2026-11-23T12:00:00.000Z".into(),
            })
            .await
            .unwrap();
        assert!(
            wait(n, commits_before + 1).await,
            "record {n} not seen within 10 s"
        );
        let bare = bare_times.lock().unwrap()[commits_before];
        let ours = handled.lock().unwrap()[&n];
        bare_ms.push(bare.duration_since(t0).as_secs_f64() * 1e3);
        murmur_ms.push(ours.duration_since(t0).as_secs_f64() * 1e3);
        added_ms.push(
            (ours.duration_since(t0).as_secs_f64() - bare.duration_since(t0).as_secs_f64()) * 1e3,
        );
    }
    let elapsed = started.elapsed();
    stop.shutdown();
    running.await.unwrap().unwrap();

    println!(
        "write-to-handler latency, {records} sequential creates on the local PDS ({elapsed:.1?}):"
    );
    latency_line("bare WebSocket (headers only)", &bare_ms);
    latency_line("murmur watcher (Full verification)", &murmur_ms);
    latency_line("added by murmur", &added_ms);

    tokio::task::spawn_blocking(move || drop(net))
        .await
        .unwrap();
}
