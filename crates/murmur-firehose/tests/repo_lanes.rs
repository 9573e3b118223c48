//! One connection's events verified on several cores (`WatcherBuilder::repo_concurrency`):
//! passes of the recorded corpus (tests/support/corpus.rs) signed again by one key, so every
//! commit goes through Full verification (signature, MST inversion, rev chain) with that key
//! pinned for its DID, replayed from memory.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use murmur_firehose::{Created, CursorStore, FileCursorStore, OpEvent, Watcher};
use murmur_sync::{Frame, Identity, IdentityResolver, PublicKey, Verifier, VerifyLevel};
use support::corpus::{self, Replay, Task};

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn key() -> k256::ecdsa::SigningKey {
    k256::ecdsa::SigningKey::from_slice(&[9u8; 32]).unwrap()
}

/// `passes` passes signed by [`key`], one after the other.
fn signed_passes(passes: std::ops::Range<usize>) -> Vec<Vec<u8>> {
    let recorded = corpus::recorded();
    let mut frames = Vec::new();
    for p in passes {
        let first = frames.len() as i64 + 1;
        frames.extend(corpus::signed_pass(&recorded, p, first, &key()));
    }
    frames
}

/// A Full verifier knowing the key of `pinned`; any other DID is looked up in a directory
/// that refuses connections, so its verification waits (and is retried) for good.
fn verifier(pinned: &[String]) -> Verifier {
    let resolver = IdentityResolver::new().with_plc_url("http://127.0.0.1:9");
    for did in pinned {
        resolver.pin(Identity {
            did: did.clone(),
            signing_key: PublicKey::K256(*key().verifying_key()),
            handle: None,
            pds: None,
        });
    }
    Verifier::new(Arc::new(resolver)).with_level(VerifyLevel::Full)
}

/// (DID, seq) of every task create handled, in the order the handlers ran.
type Seen = Arc<Mutex<Vec<(String, i64)>>>;

fn creates_by_did(seen: &Seen) -> BTreeMap<String, Vec<i64>> {
    let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (did, seq) in seen.lock().unwrap().iter() {
        out.entry(did.clone()).or_default().push(*seq);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repos_verified_in_parallel_keep_each_repos_order_and_lose_nothing() {
    let frames = signed_passes(0..24);
    let dids = corpus::dids(&frames);
    let creates = corpus::task_creates(&frames);
    let seen: Seen = Arc::default();
    let s = Arc::clone(&seen);
    let watcher = Watcher::builder()
        .source(Replay {
            frames: Arc::new(frames),
        })
        .verifier(verifier(&dids))
        .repo_concurrency(2)
        .handler(move |_task: Created<Task>, op: OpEvent| {
            s.lock()
                .unwrap()
                .push((op.data().did.clone(), op.data().seq));
            async {
                // Let the other lane run in between.
                tokio::task::yield_now().await;
                Ok(())
            }
        })
        .build()
        .unwrap();
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for("every create handled", || {
        seen.lock().unwrap().len() as u64 >= creates
    })
    .await;
    stop.shutdown();
    running.await.unwrap().unwrap();
    let m = metrics.snapshot();
    assert_eq!(m.rejected, 0, "{m:?}");
    assert_eq!(m.handled, creates, "{m:?}");
    let by_did = creates_by_did(&seen);
    assert_eq!(by_did.len(), 48, "24 passes of 2 accounts");
    for (did, seqs) in by_did {
        assert!(
            // A batched commit's creates share its seq.
            seqs.windows(2).all(|w| w[0] <= w[1]),
            "{did}: handled out of stream order: {seqs:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repo_whose_verification_waits_holds_neither_the_other_repos_nor_the_cursor_beyond_it() {
    let frames = signed_passes(0..8);
    let dids = corpus::dids(&frames);
    // The first repo's key cannot be resolved: its first event that needs the key (a
    // commit with a task create, or a #sync) waits, and so does the rest of its lane.
    let stuck = dids[0].clone();
    let first_stuck_commit = frames
        .iter()
        .find_map(|f| match Frame::decode(f) {
            Ok(Frame::Commit(c))
                if c.repo == stuck
                    && c.ops.iter().any(|op| op.collection() == "agent.comms.task") =>
            {
                Some(c.seq)
            }
            Ok(Frame::Sync(s)) if s.did == stuck => Some(s.seq),
            _ => None,
        })
        .unwrap();
    let pinned: Vec<String> = dids.iter().filter(|d| **d != stuck).cloned().collect();
    let stuck_creates = frames
        .iter()
        .filter_map(|f| match Frame::decode(f) {
            Ok(Frame::Commit(c)) if c.repo == stuck => Some(
                c.ops
                    .iter()
                    .filter(|op| {
                        op.action == murmur_sync::Action::Create
                            && op.collection() == "agent.comms.task"
                    })
                    .count() as u64,
            ),
            _ => None,
        })
        .sum::<u64>();
    assert!(stuck_creates > 0);
    let others = corpus::task_creates(&frames) - stuck_creates;
    let last_seq = frames.len() as i64;

    let state = tempfile::tempdir().unwrap();
    let seen: Seen = Arc::default();
    let s = Arc::clone(&seen);
    let watcher = Watcher::builder()
        .source(Replay {
            frames: Arc::new(frames),
        })
        .verifier(verifier(&pinned))
        .repo_concurrency(2)
        .cursor_store(FileCursorStore::new(state.path()))
        .handler(move |_task: Created<Task>, op: OpEvent| {
            s.lock()
                .unwrap()
                .push((op.data().did.clone(), op.data().seq));
            async { Ok(()) }
        })
        .build()
        .unwrap();
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for("the other repos' creates handled", || {
        seen.lock().unwrap().len() as u64 >= others
    })
    .await;
    wait_for("the stuck verification reported", || {
        metrics.snapshot().verifications_waiting > 0
    })
    .await;
    // Two cursor flushes later, the stored cursor is still before the waiting commit,
    // although every event after it is done.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let by_did = creates_by_did(&seen);
    assert!(!by_did.contains_key(&stuck), "{by_did:?}");
    assert_eq!(seen.lock().unwrap().len() as u64, others);
    let cursor = FileCursorStore::new(state.path())
        .load("memory://replay")
        .await
        .unwrap();
    assert!(
        cursor.is_some_and(|c| c < first_stuck_commit),
        "cursor {cursor:?} passed the waiting commit {first_stuck_commit} (last seq {last_seq})"
    );
    stop.shutdown();
    running.await.unwrap().unwrap();
    let cursor = FileCursorStore::new(state.path())
        .load("memory://replay")
        .await
        .unwrap();
    assert!(
        cursor.is_some_and(|c| c < first_stuck_commit),
        "after shutdown: cursor {cursor:?}, waiting commit {first_stuck_commit}"
    );
}
