//! Offline watcher tests on the frames recorded from the local PDS (tests/support/corpus.rs),
//! replayed from memory: seq regressions, dead letters without a state directory, and what
//! dropping a running watcher stops. Everything involving a live PDS is in the workspace's
//! tests/watcher.rs.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use murmur_firehose::{
    Created, CursorStore, FileCursorStore, GapKind, HandlerError, OpEvent, Watcher,
};
use murmur_sync::VerifyLevel;
use support::corpus::{self, Replay, Task};

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seq_regression_is_a_gap_and_the_stored_cursor_moves_into_the_new_seq_space() {
    let recorded = corpus::recorded();
    // Old seq space 1001.., then the source restarts its sequence at 1.
    let mut frames = corpus::pass(&recorded, 0, 1001);
    frames.extend(corpus::pass(&recorded, 1, 1));
    let creates = corpus::task_creates(&frames);
    let last_old = 1000 + recorded.len() as i64;
    let last_new = recorded.len() as i64;

    let state = tempfile::tempdir().unwrap();
    let gaps = Arc::new(Mutex::new(Vec::new()));
    let handled = Arc::new(AtomicU64::new(0));
    let (g, h) = (Arc::clone(&gaps), Arc::clone(&handled));
    let watcher = Watcher::builder()
        .source(Replay {
            frames: Arc::new(frames),
        })
        .verification(VerifyLevel::None)
        .cursor_store(FileCursorStore::new(state.path()))
        .on_gap(move |gap| g.lock().unwrap().push(gap.kind.clone()))
        .handler(move |_task: Created<Task>, _op: OpEvent| {
            h.fetch_add(1, Ordering::Relaxed);
            async { Ok(()) }
        })
        .build()
        .unwrap();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for("every create handled", || {
        handled.load(Ordering::Relaxed) == creates
    })
    .await;
    stop.shutdown();
    running.await.unwrap().unwrap();

    assert_eq!(
        *gaps.lock().unwrap(),
        vec![GapKind::SeqRegression {
            last: last_old,
            now: 1
        }]
    );
    let stored = FileCursorStore::new(state.path())
        .load("memory://replay")
        .await
        .unwrap();
    assert_eq!(
        stored,
        Some(last_new),
        "the cursor is the last seq of the new space, not {last_old} from the old one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_state_dir_dead_letters_are_kept_in_memory_and_no_file_is_written() {
    let recorded = corpus::recorded();
    let frames = corpus::pass(&recorded, 0, 1);
    let creates = corpus::task_creates(&frames);
    let cwd_letters = std::path::Path::new("murmur-dead-letters.jsonl");
    let existed = cwd_letters.exists();

    let watcher = Watcher::builder()
        .source(Replay {
            frames: Arc::new(frames),
        })
        .verification(VerifyLevel::None)
        .handler(|task: Created<Task>, _op: OpEvent| async move {
            Err(HandlerError::fail(format!("cannot do {:?}", task.title)))
        })
        .build()
        .unwrap();
    let letters = watcher.dead_letters();
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for("every create dead-lettered", || {
        metrics.snapshot().dead_lettered == creates
    })
    .await;
    stop.shutdown();
    running.await.unwrap().unwrap();

    let letters = letters.list().await.unwrap();
    assert_eq!(letters.len() as u64, creates);
    // A closure handler is named by its type name: the fn it is written in.
    assert!(letters.iter().all(|l| l.handler.contains(
        "without_a_state_dir_dead_letters_are_kept_in_memory_and_no_file_is_written::{{closure}}"
    ) && l.action == "create"
        && l.error.starts_with("failed: cannot do")
        && l.attempts == 1));
    assert_eq!(
        cwd_letters.exists(),
        existed,
        "nothing written to the working directory"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_running_watcher_stops_its_handlers_like_a_kill() {
    let recorded = corpus::recorded();
    let frames = corpus::pass(&recorded, 0, 1);
    let creates = corpus::task_creates(&frames);
    let state = tempfile::tempdir().unwrap();
    let finished = Arc::new(AtomicU64::new(0));
    let f = Arc::clone(&finished);
    let watcher = Watcher::builder()
        .source(Replay {
            frames: Arc::new(frames),
        })
        .verification(VerifyLevel::None)
        .state_dir(state.path())
        .handler(move |_task: Created<Task>, _op: OpEvent| {
            let f = Arc::clone(&f);
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                f.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        })
        .build()
        .unwrap();
    let running = tokio::spawn(watcher.run());
    wait_for("a few creates handled", || {
        finished.load(Ordering::Relaxed) >= 3
    })
    .await;
    running.abort();
    let _ = running.await;
    let at_kill = finished.load(Ordering::Relaxed);
    let cursors = FileCursorStore::new(state.path().join("cursors"));
    let cursor_at_kill = cursors.load("memory://replay").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = finished.load(Ordering::Relaxed);
    assert!(at_kill < creates, "the kill came before the end");
    // One handler per DID lane may have been past its last await when the kill landed.
    assert!(
        later <= at_kill + 2,
        "handlers kept running after the watcher was dropped: {at_kill} -> {later}"
    );
    let cursor_later = cursors.load("memory://replay").await.unwrap();
    assert_eq!(
        cursor_at_kill, cursor_later,
        "the cursor is not flushed after the kill"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_a_dead_letter_and_its_lane_goes_on() {
    let recorded = corpus::recorded();
    let frames = corpus::pass(&recorded, 0, 1);
    let creates = corpus::task_creates(&frames);
    let calls = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&calls);
    let watcher = Watcher::builder()
        .source(Replay {
            frames: Arc::new(frames),
        })
        .verification(VerifyLevel::None)
        .handler(move |task: Created<Task>, _op: OpEvent| {
            let n = c.fetch_add(1, Ordering::Relaxed);
            // Every third call panics: on the first poll, or after an await.
            let fut = async move {
                if n % 3 == 1 {
                    tokio::task::yield_now().await;
                    panic!("boom after an await on {}", task.title);
                }
                Ok(())
            };
            if n.is_multiple_of(3) {
                panic!("boom before the future on call {n}");
            }
            fut
        })
        .build()
        .unwrap();
    let letters = watcher.dead_letters();
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for("every create handled or dead-lettered", || {
        let m = metrics.snapshot();
        m.handled + m.dead_lettered == creates
    })
    .await;
    stop.shutdown();
    running.await.unwrap().unwrap();

    let m = metrics.snapshot();
    let panicking = (0..creates).filter(|n| n % 3 != 2).count() as u64;
    assert_eq!(
        (m.handled, m.dead_lettered),
        (creates - panicking, panicking)
    );
    let letters = letters.list().await.unwrap();
    assert_eq!(letters.len() as u64, panicking);
    assert!(
        letters
            .iter()
            .all(|l| l.error.starts_with("failed: handler panicked: boom")),
        "{letters:?}"
    );
}

/// The corpus's tasks under a type they do not decode as: every op is rejected.
#[derive(Debug)]
struct Strict;

#[derive(Debug, serde::Deserialize, serde::Serialize)]
struct StrictRecord {
    required_but_absent: String,
}

impl atrium_api::types::Collection for Strict {
    const NSID: &'static str = "agent.comms.task";
    type Record = StrictRecord;
}

impl murmur_lexicon::Validate for StrictRecord {
    fn validate(&self) -> Result<(), murmur_lexicon::ValidationError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_on_rejected_hook_leaves_the_op_unfinished_and_the_watcher_reading() {
    let recorded = corpus::recorded();
    let frames = corpus::pass(&recorded, 0, 1);
    let (events, creates) = (frames.len() as u64, corpus::task_creates(&frames));
    let state = tempfile::tempdir().unwrap();
    let hooked = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&hooked);
    let watcher = Watcher::builder()
        .source(Replay {
            frames: Arc::new(frames),
        })
        .verification(VerifyLevel::None)
        .cursor_store(FileCursorStore::new(state.path()))
        .handler(|_rec: Created<Strict>, _op: OpEvent| async { Ok(()) })
        .on_rejected(move |op, _why| {
            h.fetch_add(1, Ordering::Relaxed);
            panic!("hook bug on {}", op.uri());
        })
        .build()
        .unwrap();
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for("every op through the panicking hook", || {
        hooked.load(Ordering::Relaxed) == creates && metrics.snapshot().events_in == events
    })
    .await;
    stop.shutdown();
    running.await.unwrap().unwrap();
    assert_eq!(metrics.snapshot().handled, 0);
    let stored = FileCursorStore::new(state.path())
        .load("memory://replay")
        .await
        .unwrap();
    let first_task_seq = 1 + recorded
        .iter()
        .position(|f| corpus::task_creates(std::slice::from_ref(f)) > 0)
        .unwrap() as i64;
    assert!(
        stored.is_none_or(|seq| seq < first_task_seq),
        "the cursor stays before the first unfinished op (seq {first_task_seq}): {stored:?}"
    );
}
