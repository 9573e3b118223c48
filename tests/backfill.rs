//! Joining late on the real local network: a watcher started after hundreds of records were
//! written delivers each of them once (a copy of the repo, verified), then the records written
//! while it copied, then goes on live; one killed mid-backfill resumes without losing or
//! repeating a record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use murmur_e2e::{Note, account, note, shared, wait_for};
use murmur_firehose::{Backfill, Created, OpEvent, Origin, Watcher};
use murmur_pds::Writer;

/// Writes notes `from..to` in applyWrites batches of up to 100; returns their paths.
async fn write_notes(writer: &Writer, from: u64, to: u64) -> Vec<String> {
    let mut paths = Vec::new();
    let mut n = from;
    while n < to {
        let mut batch = writer.batch();
        for _ in 0..100.min(to - n) {
            let rkey = batch.create::<Note>(&note(n)).unwrap();
            paths.push(format!("test.murmur.note/{rkey}"));
            n += 1;
        }
        batch.commit().await.unwrap();
    }
    paths
}

type Seen = Arc<Mutex<HashMap<String, Vec<Origin>>>>;

/// A watcher of `did`'s notes on PDS 0 with a backfill (the repos PDS 0 lists, filtered to
/// `did`), recording each created note's path and origin; `delay` per op.
fn watcher(
    net: &murmur_devnet::Devnet,
    did: &str,
    state: &std::path::Path,
    seen: &Seen,
    delay: Duration,
) -> Watcher {
    let seen = Arc::clone(seen);
    Watcher::builder()
        .pds(net.pds(0).unwrap().url())
        .plc_url(net.plc_url())
        .dids([did.to_string()])
        .state_dir(state)
        .backfill(Backfill::listed().concurrency(2))
        .handler(move |_note: Created<Note>, op: OpEvent| {
            let seen = Arc::clone(&seen);
            async move {
                tokio::time::sleep(delay).await;
                seen.lock()
                    .unwrap()
                    .entry(op.data().path.clone())
                    .or_default()
                    .push(op.origin());
                Ok(())
            }
        })
        .build()
        .unwrap()
}

fn repeated(seen: &Seen) -> Vec<(String, Vec<Origin>)> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(_, origins)| origins.len() > 1)
        .map(|(p, o)| (p.clone(), o.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_started_after_500_records_delivers_each_once_and_then_the_live_ones() {
    let net = shared().await;
    let (alice, writer) = account(net, 0, "backfill").await;
    let before = write_notes(&writer, 0, 500).await;

    let state = tempfile::tempdir().unwrap();
    let seen: Seen = Arc::default();
    let watcher = watcher(net, &alice.did, state.path(), &seen, Duration::ZERO);
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    // Written while the backfill lists and copies: in the copy or on the stream, once.
    let mut during = Vec::new();
    for n in 500..520 {
        during.push(format!(
            "test.murmur.note/{}",
            writer
                .create::<Note>(&note(n))
                .await
                .unwrap()
                .uri
                .rsplit('/')
                .next()
                .unwrap()
        ));
    }
    wait_for("all 520 records", Duration::from_secs(60), || {
        seen.lock().unwrap().len() >= 520
    })
    .await;
    wait_for("the backfill to finish", Duration::from_secs(30), || {
        metrics.backfill().finished
    })
    .await;
    // Live after the backfill.
    let after = write_notes(&writer, 520, 530).await;
    wait_for("the live records", Duration::from_secs(30), || {
        seen.lock().unwrap().len() >= 530
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.shutdown();
    running.await.unwrap().unwrap();

    assert_eq!(repeated(&seen), vec![], "no record delivered twice");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 530);
    for path in &before {
        assert_eq!(seen[path], [Origin::Backfill], "{path} comes from the copy");
    }
    for path in &during {
        assert!(
            seen.contains_key(path),
            "{path} written during the backfill"
        );
    }
    for path in &after {
        assert_eq!(seen[path], [Origin::Live], "{path} comes from the stream");
    }
    let progress = metrics.backfill();
    assert_eq!(
        (
            progress.repos_total,
            progress.repos_done,
            progress.repos_failed
        ),
        (1, 1, 0)
    );
    assert!(progress.records >= 500, "{progress:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_killed_midway_resumes_without_losing_or_repeating_a_record() {
    let net = shared().await;
    let (bob, writer) = account(net, 0, "backfill-kill").await;
    let written = write_notes(&writer, 0, 300).await;
    let state = tempfile::tempdir().unwrap();
    let seen: Seen = Arc::default();

    // The first run is killed (its future dropped: no drain, no flush) a third of the way in.
    let first = watcher(net, &bob.did, state.path(), &seen, Duration::from_millis(3));
    let running = tokio::spawn(first.run());
    wait_for("a third of the records", Duration::from_secs(60), || {
        seen.lock().unwrap().len() >= 100
    })
    .await;
    running.abort();
    let _ = running.await;
    let handled_first = seen.lock().unwrap().len();
    assert!(handled_first < 300, "killed before the end");
    let more = write_notes(&writer, 300, 310).await;

    // The second run, on the same state directory, resumes.
    let second = watcher(net, &bob.did, state.path(), &seen, Duration::ZERO);
    let metrics = second.metrics();
    let stop = second.shutdown_handle();
    let running = tokio::spawn(second.run());
    wait_for("every record", Duration::from_secs(60), || {
        seen.lock().unwrap().len() >= 310
    })
    .await;
    wait_for("the backfill to finish", Duration::from_secs(30), || {
        metrics.backfill().finished
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.shutdown();
    running.await.unwrap().unwrap();

    assert_eq!(repeated(&seen), vec![], "no record delivered twice");
    let seen = seen.lock().unwrap();
    for path in written.iter().chain(&more) {
        assert!(seen.contains_key(path), "{path} was lost");
    }
    assert_eq!(seen.len(), 310);
    assert!(
        metrics.backfill().records as usize <= 310 - handled_first + 1,
        "the second run did not copy again what the first had handled: {:?}",
        metrics.backfill()
    );
}

/// The stream replayed from the start and a copy of the repo at once: every commit the
/// stream replays is already in the copy (its rev at or below the copy's) and is not
/// delivered a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_ops_already_in_the_copy_are_not_delivered_twice() {
    let net = shared().await;
    let (carol, writer) = account(net, 0, "backfill-replay").await;
    let mut written = Vec::new();
    for n in 0..20 {
        written.push(writer.create::<Note>(&note(n)).await.unwrap().uri);
    }
    let seen: Seen = Arc::default();
    let s = Arc::clone(&seen);
    let watcher = Watcher::builder()
        .pds(net.pds(0).unwrap().url())
        .plc_url(net.plc_url())
        .dids([carol.did.clone()])
        .start_cursor(0)
        .backfill(Backfill::dids([carol.did.clone()]))
        .handler(move |_note: Created<Note>, op: OpEvent| {
            s.lock()
                .unwrap()
                .entry(op.data().path.clone())
                .or_default()
                .push(op.origin());
            async { Ok(()) }
        })
        .build()
        .unwrap();
    let metrics = watcher.metrics();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for("the copy and the replay", Duration::from_secs(60), || {
        metrics.backfill().finished && metrics.snapshot().reflected_skipped >= 20
    })
    .await;
    let last = writer.create::<Note>(&note(20)).await.unwrap().uri;
    wait_for("the live record", Duration::from_secs(30), || {
        seen.lock().unwrap().len() >= 21
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.shutdown();
    running.await.unwrap().unwrap();

    assert_eq!(repeated(&seen), vec![], "no record delivered twice");
    let seen = seen.lock().unwrap();
    for uri in &written {
        let path = format!("test.murmur.note/{}", uri.rsplit('/').next().unwrap());
        assert_eq!(seen[&path], [Origin::Backfill]);
    }
    let path = format!("test.murmur.note/{}", last.rsplit('/').next().unwrap());
    assert_eq!(seen[&path], [Origin::Live]);
}
