//! Dispatch throughput: recorded frames replayed from memory through one watcher with a
//! no-op typed handler (prints figures; not a timed test).
//!
//! `cargo bench -p murmur-firehose --bench dispatch` (`MURMUR_BENCH_PASSES`, default 3000)
//!
//! The corpus (tests/support/corpus.rs) is the one recorded from the local PDS for
//! murmur-sync, replayed as many passes; each pass gets its own DIDs and fresh seqs, so the
//! stream looks like a relay carrying many repos, every rev chain stays valid and no event
//! is a replay. Every `agent.comms.task` create is decoded into its record type, as a typed
//! handler's argument is. Verification is `None`: signatures are k256-bound and measured by
//! `cargo bench -p murmur-sync` (rewriting the DIDs would break them anyway). Two runs: without
//! state, and with a state directory (cursor file, and a dedup log written once per op).

#[path = "../tests/support/corpus.rs"]
mod corpus;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use murmur_firehose::{Created, OpEvent, Watcher};
use murmur_sync::VerifyLevel;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let passes: usize = std::env::var("MURMUR_BENCH_PASSES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let recorded = corpus::recorded();
    let t0 = Instant::now();
    let mut frames = Vec::with_capacity(recorded.len() * passes);
    for p in 0..passes {
        frames.extend(corpus::pass(&recorded, p, frames.len() as i64 + 1));
    }
    let creates = corpus::task_creates(&frames);
    println!(
        "corpus: {} recorded frames x {passes} passes = {} events, {creates} agent.comms.task creates ({:.1?} to build)",
        recorded.len(),
        frames.len(),
        t0.elapsed()
    );
    let frames = Arc::new(frames);
    println!(
        "dispatch throughput (verification None, no-op Record<Task> handler, 2 worker threads):"
    );
    run("no state dir", &frames, creates, None).await;
    let state = tempfile::tempdir().expect("temp dir");
    run(
        "state dir (cursor file, dedup log)",
        &frames,
        creates,
        Some(state.path()),
    )
    .await;
}

async fn run(
    name: &str,
    frames: &Arc<Vec<Vec<u8>>>,
    creates: u64,
    state: Option<&std::path::Path>,
) {
    let handled = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&handled);
    let mut builder = Watcher::builder()
        .source(corpus::Replay {
            frames: Arc::clone(frames),
        })
        .verification(VerifyLevel::None)
        .collections(["agent.comms.*"])
        .handler(move |_task: Created<corpus::Task>, _op: OpEvent| {
            counter.fetch_add(1, Ordering::Relaxed);
            async { Ok(()) }
        });
    if let Some(dir) = state {
        builder = builder.state_dir(dir);
    }
    let watcher = builder.build().expect("watcher");
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let start = Instant::now();
    let running = tokio::spawn(watcher.run());
    let mut last = (0, Instant::now());
    while handled.load(Ordering::Relaxed) < creates {
        tokio::time::sleep(Duration::from_micros(200)).await;
        let now = handled.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(10) {
            panic!(
                "stalled at {now} of {creates} creates handled: {:?}",
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
        "  {name:<36} {:>9.0} events/s   {:>9.0} handled creates/s   ({} events, {} creates in {elapsed:.2?})",
        frames.len() as f64 / elapsed.as_secs_f64(),
        m.handled as f64 / elapsed.as_secs_f64(),
        frames.len(),
        m.handled,
    );
}
