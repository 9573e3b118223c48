//! Backfill benchmarks on the real local network, on one core (prints figures beside their
//! goals; not a timed test).
//!
//! `cargo bench -p murmur-e2e --bench backfill` (set `MURMUR_BENCH_RECORDS`, default 10,000,
//! and `MURMUR_BENCH_ROUNDS`, default 3)
//!
//! One account writes the records across 3 collections in applyWrites batches of 200, then,
//! in a current-thread tokio runtime (everything of this process on one core; the PDS runs
//! in its own process), each phase runs several rounds (min and median records/s):
//!
//! - (a) `Verifier::fetch_repo`: getRepo from the PDS and Full verification (block hashes,
//!   signed commit, complete MST, every record present);
//! - (b) `Verifier::verify_repo` on the CAR bytes fetched once (no network): the verification
//!   alone. Goal: at least 20,000 records/s;
//! - (c) a whole `Watcher` with `.backfill(Backfill::dids([did]))` and a tail handler counting
//!   the ops it gets: from `run()` (connecting to the PDS's stream first) until
//!   `backfill_progress().finished` and every record handled.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use murmur_devnet::cpu::process_seconds;
use murmur_devnet::{Devnet, DevnetConfig};
use murmur_e2e::account_xrpc;
use murmur_e2e::bench::{env_or, min_median};
use murmur_firehose::{Backfill, OpEvent, Origin, Watcher};
use murmur_sync::{IdentityResolver, Verifier, VerifyLevel};

const COLLECTIONS: [&str; 3] = [
    "bench.murmur.note",
    "bench.murmur.task",
    "bench.murmur.status",
];
const BATCH: usize = 200;
/// Goal for (b), verification alone.
const VERIFY_GOAL: f64 = 20_000.0;

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let records: usize = env_or("MURMUR_BENCH_RECORDS", 10_000);
    let rounds: usize = env_or("MURMUR_BENCH_ROUNDS", 3).max(1);
    let net = tokio::task::spawn_blocking(|| Devnet::start(DevnetConfig::default()))
        .await
        .unwrap()
        .expect("local network");
    let pds = net.pds(0).unwrap().url().to_string();
    let account = net
        .create_account(0, &net.unique_handle("backfill"), "bench-pass")
        .await
        .expect("account");
    let did = account.did.clone();

    // The repo: `records` records across 3 collections, 200 per commit.
    let started = Instant::now();
    let mut n = 0;
    while n < records {
        let writes: Vec<serde_json::Value> = (n..records.min(n + BATCH))
            .map(|i| {
                let collection = COLLECTIONS[i % COLLECTIONS.len()];
                serde_json::json!({
                    "$type": "com.atproto.repo.applyWrites#create",
                    "collection": collection,
                    "value": {
                        "$type": collection,
                        "text": format!("record {i}"),
                        "n": i,
                        "createdAt": "2026-11-23T12:00:00.000Z",
                    },
                })
            })
            .collect();
        n += writes.len();
        account_xrpc(
            &account,
            "com.atproto.repo.applyWrites",
            Some(serde_json::json!({"repo": did, "writes": writes})),
        )
        .await;
    }
    let car = reqwest::Client::new()
        .get(format!("{pds}/xrpc/com.atproto.sync.getRepo"))
        .query(&[("did", did.as_str())])
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .expect("getRepo")
        .bytes()
        .await
        .expect("getRepo body")
        .to_vec();
    println!(
        "backfill benchmarks: {records} records in {} collections written in {:.1?} \
         (applyWrites, {BATCH} a commit); getRepo CAR {:.1} MB; one core (current-thread runtime), \
         {rounds} rounds each",
        COLLECTIONS.len(),
        started.elapsed(),
        car.len() as f64 / 1e6
    );

    let verifier = Verifier::new(Arc::new(
        IdentityResolver::new().with_plc_url(net.plc_url()),
    ))
    .with_level(VerifyLevel::Full);
    // Warm-up: the DID resolved (and cached), connections pooled, the whole repo present.
    let repo = verifier.fetch_repo(&did).await.expect("fetch_repo");
    assert_eq!(repo.records.len(), records, "records in the fetched repo");

    let me = std::process::id();
    let pds_pid = net.pds(0).unwrap().pid();
    let cpu = |pid: Option<u32>| pid.and_then(process_seconds).unwrap_or(f64::NAN);

    // (a) getRepo + Full verification.
    let mut fetch_rates = Vec::new();
    let (mut fetch_cpu, mut fetch_pds_cpu) = (0.0, 0.0);
    for _ in 0..rounds {
        let (c0, p0) = (cpu(Some(me)), cpu(pds_pid));
        let t0 = Instant::now();
        let repo = verifier.fetch_repo(&did).await.expect("fetch_repo");
        let elapsed = t0.elapsed();
        fetch_cpu += cpu(Some(me)) - c0;
        fetch_pds_cpu += cpu(pds_pid) - p0;
        assert_eq!(repo.records.len(), records);
        fetch_rates.push(records as f64 / elapsed.as_secs_f64());
    }

    // (b) Full verification of the CAR bytes alone.
    let mut verify_rates = Vec::new();
    for _ in 0..rounds {
        let t0 = Instant::now();
        let repo = verifier.verify_repo(&did, &car).await.expect("verify_repo");
        let elapsed = t0.elapsed();
        assert_eq!(repo.records.len(), records);
        verify_rates.push(records as f64 / elapsed.as_secs_f64());
    }

    // (c) A whole watcher backfilling the repo, a tail handler counting.
    let mut watcher_rates = Vec::new();
    let mut watcher_cpu = 0.0;
    for _ in 0..rounds {
        let count = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&count);
        let watcher = Watcher::builder()
            .pds(&pds)
            .plc_url(net.plc_url())
            .dids([did.clone()])
            .backfill(Backfill::dids([did.clone()]))
            .tail(move |op: OpEvent| {
                if op.origin() == Origin::Backfill {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                async { Ok(()) }
            })
            .build()
            .expect("watcher");
        let metrics = watcher.metrics();
        let stop = watcher.shutdown_handle();
        let c0 = cpu(Some(me));
        let t0 = Instant::now();
        let running = tokio::spawn(watcher.run());
        let deadline = t0 + Duration::from_secs(600);
        while !(metrics.backfill().finished && count.load(Ordering::Relaxed) >= records as u64) {
            assert!(
                Instant::now() < deadline,
                "the watcher's backfill did not finish: {:?}, {} handled",
                metrics.backfill(),
                count.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let elapsed = t0.elapsed();
        watcher_cpu += cpu(Some(me)) - c0;
        let progress = metrics.backfill();
        assert_eq!(progress.repos_done, 1, "{progress:?}");
        assert_eq!(progress.records, records as u64, "{progress:?}");
        assert_eq!(count.load(Ordering::Relaxed), records as u64);
        stop.shutdown();
        running.await.unwrap().expect("watcher");
        watcher_rates.push(records as f64 / elapsed.as_secs_f64());
    }

    let line = |name: &str, rates: &[f64], goal: &str| {
        let (min, median) = min_median(rates);
        println!("  {name:<48} min {min:>8.0} records/s   median {median:>8.0} records/s   {goal}");
    };
    println!("\nbackfill of one {records}-record repo, Full verification:");
    line(
        "(a) Verifier::fetch_repo (getRepo + verify)",
        &fetch_rates,
        "goal: report",
    );
    let (verify_min, _) = min_median(&verify_rates);
    line(
        "(b) Verifier::verify_repo (CAR bytes, no network)",
        &verify_rates,
        &format!(
            "goal: >= {VERIFY_GOAL:.0} records/s: {}",
            if verify_min >= VERIFY_GOAL {
                "met"
            } else {
                "NOT met"
            }
        ),
    );
    line(
        "(c) Watcher + Backfill::dids, tail handler",
        &watcher_rates,
        "goal: report",
    );
    let per_k = |seconds: f64| seconds * 1000.0 / (records * rounds) as f64;
    println!(
        "  CPU seconds per 1,000 records: (a) this process {:.3} s, the PDS {:.3} s; (c) this process {:.3} s",
        per_k(fetch_cpu),
        per_k(fetch_pds_cpu),
        per_k(watcher_cpu)
    );

    tokio::task::spawn_blocking(move || drop(net))
        .await
        .unwrap();
}
