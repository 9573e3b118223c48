//! Dispatch throughput: recorded frames replayed from memory through one watcher with a
//! no-op handler (prints figures; not a timed test).
//!
//! `cargo bench -p murmur-firehose --bench dispatch` (`MURMUR_BENCH_PASSES`, default 3000)
//!
//! The corpus is the one recorded from the local PDS for murmur-sync's benchmarks
//! (`crates/murmur-sync/tests/fixtures/corpus/frames.bin`: commits of `agent.comms.task`
//! records plus `#identity`, `#account` and `#sync` events of two accounts). It is replayed
//! as many passes; each pass gets its own DIDs and fresh seqs, so the stream looks like a
//! relay carrying many repos, every rev chain stays valid and no event is a replay.
//! Verification is `None`: signatures are k256-bound and measured by `cargo bench -p
//! murmur-sync` (rewriting the DIDs would break them anyway).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use atrium_api::types::Collection;
use futures_util::StreamExt;
use ipld_core::ipld::Ipld;
use murmur_firehose::{MessageStream, Source, SourceError, SourceMessage, Watcher};
use murmur_lexicon::{Validate, ValidationError};
use murmur_sync::{Action, Frame, VerifyLevel};
use serde::{Deserialize, Serialize};

/// The task records in the corpus, recorded with an early draft of `agent.comms.task`
/// (title, input, priority): the handler decodes each one into this type, as a typed
/// handler would.
#[derive(Debug)]
struct Task;

#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)] // decoded to measure decoding; the no-op handler reads none of it
struct TaskRecord {
    title: String,
    input: TaskInput,
    priority: i64,
    created_at: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[allow(dead_code)]
struct TaskInput {
    uri: String,
    bytes: i64,
}

impl Collection for Task {
    const NSID: &'static str = "agent.comms.task";
    type Record = TaskRecord;
}

impl Validate for TaskRecord {
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}

fn corpus() -> Vec<Vec<u8>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../murmur-sync/tests/fixtures/corpus/frames.bin"
    );
    let bytes = std::fs::read(path).expect("the recorded corpus");
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while rest.len() >= 4 {
        let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        out.push(rest[4..4 + n].to_vec());
        rest = &rest[4 + n..];
    }
    out
}

/// A did:plc of the same length as `did` whose last four characters encode `pass`.
fn did_for_pass(did: &str, pass: usize) -> String {
    const B32: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = did[..did.len() - 4].to_string();
    for i in (0..4).rev() {
        out.push(B32[(pass >> (5 * i)) & 31] as char);
    }
    out
}

/// Re-encodes one frame with a new seq and the pass's DID.
fn rewrite(frame: &[u8], seq: i64, pass: usize) -> Vec<u8> {
    let mut reader = frame;
    let header: Ipld = serde_ipld_dagcbor::de::from_reader_once(&mut reader).expect("header");
    let mut body: Ipld = serde_ipld_dagcbor::de::from_reader_once(&mut reader).expect("body");
    let Ipld::Map(fields) = &mut body else {
        panic!("frame body is not a map")
    };
    if fields.contains_key("seq") {
        fields.insert("seq".into(), Ipld::Integer(seq.into()));
    }
    for key in ["repo", "did"] {
        if let Some(Ipld::String(did)) = fields.get(key) {
            let did = did_for_pass(did, pass);
            fields.insert(key.into(), Ipld::String(did));
        }
    }
    let mut out = serde_ipld_dagcbor::to_vec(&header).expect("header");
    out.extend(serde_ipld_dagcbor::to_vec(&body).expect("body"));
    out
}

/// Replays frames from memory; after them, the stream stays open and silent.
struct Replay {
    frames: Arc<Vec<Vec<u8>>>,
}

#[async_trait]
impl Source for Replay {
    fn url(&self) -> &str {
        "memory://replay"
    }

    async fn connect(&self, _cursor: Option<i64>) -> Result<MessageStream, SourceError> {
        let frames = Arc::clone(&self.frames);
        let items = (0..frames.len()).map(move |i| Ok(SourceMessage::Frame(frames[i].clone())));
        Ok(Box::pin(
            futures_util::stream::iter(items).chain(futures_util::stream::pending()),
        ))
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let passes: usize = std::env::var("MURMUR_BENCH_PASSES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let recorded = corpus();
    let t0 = Instant::now();
    let mut frames = Vec::with_capacity(recorded.len() * passes);
    let mut seq = 0;
    for pass in 0..passes {
        for frame in &recorded {
            seq += 1;
            frames.push(rewrite(frame, seq, pass));
        }
    }
    let mut ops = 0u64;
    for f in &frames {
        if let Ok(Frame::Commit(c)) = Frame::decode(f) {
            ops += c
                .ops
                .iter()
                .filter(|op| op.action == Action::Create && op.collection() == Task::NSID)
                .count() as u64;
        }
    }
    println!(
        "corpus: {} recorded frames x {passes} passes = {} events, {ops} agent.comms.task creates ({:.1?} to build)",
        recorded.len(),
        frames.len(),
        t0.elapsed()
    );
    let frames = Arc::new(frames);

    let handled = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&handled);
    let watcher = Watcher::builder()
        .source(Replay {
            frames: Arc::clone(&frames),
        })
        .verification(VerifyLevel::None)
        .collections(["agent.comms.*"])
        .on_create::<Task, _, _>(move |_task, _op| {
            counter.fetch_add(1, Ordering::Relaxed);
            async { Ok(()) }
        })
        .build()
        .expect("watcher");
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let start = Instant::now();
    let running = tokio::spawn(watcher.run());
    let mut last = (0, Instant::now());
    while handled.load(Ordering::Relaxed) < ops {
        tokio::time::sleep(Duration::from_micros(200)).await;
        let now = handled.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(10) {
            panic!(
                "stalled at {now} of {ops} creates handled: {:?}",
                metrics.snapshot()
            );
        }
    }
    let elapsed = start.elapsed();
    stop.shutdown();
    running.await.expect("watcher task").expect("watcher");
    let m = metrics.snapshot();
    assert_eq!(m.events_in, frames.len() as u64, "every frame was read");
    println!(
        "dispatch throughput (verification None, no-op Record<Task> handler, 2 worker threads):\n  \
         {:>9.0} events/s   {:>9.0} handled creates/s   ({} events, {} creates handled in {elapsed:.2?})",
        frames.len() as f64 / elapsed.as_secs_f64(),
        m.handled as f64 / elapsed.as_secs_f64(),
        frames.len(),
        m.handled,
    );
}
