//! Dispatch throughput: recorded frames replayed from memory through one watcher with a
//! no-op typed handler (prints figures beside their goals; not a timed test).
//!
//! `cargo bench -p murmur-firehose --bench dispatch` (`MURMUR_BENCH_PASSES`, default 3000;
//! `MURMUR_BENCH_SIGNED_PASSES`, default 300; `MURMUR_BENCH_ROUNDS`, default 3;
//! `MURMUR_BENCH_ONLY=state` runs only the setups whose names contain that text, for a
//! profiler)
//!
//! The corpus (tests/support/corpus.rs) is the one recorded from the local PDS for
//! murmur-sync, replayed as many passes; each pass gets its own DIDs and fresh seqs, so the
//! stream looks like a relay carrying many repos, every rev chain stays valid and no event
//! is a replay. Every `agent.comms.task` create is decoded into its record type, as a typed
//! handler's argument is. Rounds are interleaved; each row prints min / median.
//!
//! 1. **Verification `None`**: without state, and with a state directory (cursor file, and
//!    the dedup log written for every op: group commit). Goal (issue 15): with a state
//!    directory, >= 100k events/s.
//! 2. **Full verification, one connection**: the passes signed again by one key pinned for
//!    every DID (so signatures, MST inversion and rev chains are all checked); the watcher on
//!    one core (a current-thread runtime, one repo at a time) vs two cores (two runtime
//!    threads and the watcher's default, one repo lane per thread: two repos verified at
//!    once). Goal: >= 1.7x the one-core rate.

#[path = "../tests/support/corpus.rs"]
mod corpus;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use murmur_firehose::{Created, OpEvent, Watcher};
use murmur_sync::{Identity, IdentityResolver, PublicKey, Verifier, VerifyLevel};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One way of running the watcher.
#[derive(Clone, Copy)]
struct Setup {
    name: &'static str,
    /// Runtime worker threads; 0 = a current-thread runtime (one core).
    threads: usize,
    /// `None`: the watcher's default (with verification on, one repo per runtime thread).
    repo_concurrency: Option<usize>,
    state_dir: bool,
    signed: bool,
}

fn main() {
    let passes = env_or("MURMUR_BENCH_PASSES", 3000);
    let signed_passes = env_or("MURMUR_BENCH_SIGNED_PASSES", 300);
    let rounds = env_or("MURMUR_BENCH_ROUNDS", 3).max(1);
    let recorded = corpus::recorded();
    let t0 = Instant::now();
    let mut frames = Vec::with_capacity(recorded.len() * passes);
    for p in 0..passes {
        frames.extend(corpus::pass(&recorded, p, frames.len() as i64 + 1));
    }
    let key = k256::ecdsa::SigningKey::from_slice(&[42u8; 32]).expect("bench key");
    let mut signed = Vec::with_capacity(recorded.len() * signed_passes);
    for p in 0..signed_passes {
        signed.extend(corpus::signed_pass(
            &recorded,
            p,
            signed.len() as i64 + 1,
            &key,
        ));
    }
    let dids = corpus::dids(&signed);
    println!(
        "corpus: {} recorded frames x {passes} passes = {} events; {signed_passes} passes signed again = {} events of {} repos ({:.1?} to build)",
        recorded.len(),
        frames.len(),
        signed.len(),
        dids.len(),
        t0.elapsed()
    );
    let frames = Arc::new(frames);
    let signed = Arc::new(signed);
    let pinned = PublicKey::K256(*key.verifying_key());

    let setups = [
        Setup {
            name: "None, no state dir",
            threads: 2,
            repo_concurrency: Some(1),
            state_dir: false,
            signed: false,
        },
        Setup {
            name: "None, state dir (cursor, dedup log)",
            threads: 2,
            repo_concurrency: Some(1),
            state_dir: true,
            signed: false,
        },
        Setup {
            name: "Full, 1 core (1 repo at a time)",
            threads: 0,
            repo_concurrency: Some(1),
            state_dir: false,
            signed: true,
        },
        Setup {
            name: "Full, 2 cores (default: 2 repos at a time)",
            threads: 2,
            repo_concurrency: None,
            state_dir: false,
            signed: true,
        },
    ];
    let only = std::env::var("MURMUR_BENCH_ONLY").ok();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    for round in 0..rounds {
        for (i, setup) in setups.iter().enumerate() {
            if only.as_deref().is_some_and(|o| !setup.name.contains(o)) {
                continue;
            }
            let input = if setup.signed { &signed } else { &frames };
            let rate = run(*setup, input, &dids, &pinned);
            println!(
                "  round {}: {:<44} {rate:>9.0} events/s",
                round + 1,
                setup.name
            );
            rates[i].push(rate);
        }
    }
    println!("dispatch throughput, no-op Record<Task> handler (min / median of {rounds} rounds):");
    let stat = |v: &Vec<f64>| {
        let mut v = v.clone();
        v.sort_by(f64::total_cmp);
        (v[0], v[v.len() / 2])
    };
    for (setup, r) in setups.iter().zip(&rates) {
        if r.is_empty() {
            continue;
        }
        let (min, median) = stat(r);
        println!("  {:<44} {min:>9.0} / {median:>9.0} events/s", setup.name);
    }
    if rates.iter().any(Vec::is_empty) {
        return;
    }
    let (_, with_state) = stat(&rates[1]);
    println!(
        "  goal: with a state dir >= 100,000 events/s (median {with_state:.0}: {})",
        if with_state >= 100_000.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    let (_, one) = stat(&rates[2]);
    let (_, two) = stat(&rates[3]);
    println!(
        "  goal: Full on 2 cores >= 1.7x 1 core (medians: {:.2}x: {})",
        two / one,
        if two / one >= 1.7 { "met" } else { "NOT met" }
    );
}

/// Runs one watcher over `frames` until every task create is handled; events per second.
fn run(setup: Setup, frames: &Arc<Vec<Vec<u8>>>, dids: &[String], key: &PublicKey) -> f64 {
    let rt = if setup.threads == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(setup.threads);
        b
    }
    .enable_all()
    .build()
    .expect("runtime");
    rt.block_on(async {
        let creates = corpus::task_creates(frames);
        let handled = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&handled);
        let mut builder = Watcher::builder()
            .source(corpus::Replay {
                frames: Arc::clone(frames),
            })
            .collections(["agent.comms.*"])
            .handler(move |_task: Created<corpus::Task>, _op: OpEvent| {
                counter.fetch_add(1, Ordering::Relaxed);
                async { Ok(()) }
            });
        if let Some(n) = setup.repo_concurrency {
            builder = builder.repo_concurrency(n);
        }
        builder = if setup.signed {
            // Nothing to resolve over the network: every DID's key is pinned.
            let resolver = IdentityResolver::new().with_plc_url("http://127.0.0.1:9");
            for did in dids {
                resolver.pin(Identity {
                    did: did.clone(),
                    signing_key: key.clone(),
                    handle: None,
                    pds: None,
                });
            }
            builder.verifier(Verifier::new(Arc::new(resolver)).with_level(VerifyLevel::Full))
        } else {
            builder.verification(VerifyLevel::None)
        };
        let state = tempfile::tempdir().expect("temp dir");
        if setup.state_dir {
            builder = builder.state_dir(state.path());
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
                    "{}: stalled at {now} of {creates} creates handled: {:?}",
                    setup.name,
                    metrics.snapshot()
                );
            }
        }
        let elapsed = start.elapsed();
        stop.shutdown();
        running.await.expect("watcher task").expect("watcher");
        let m = metrics.snapshot();
        assert_eq!(m.events_in, frames.len() as u64, "every frame was read");
        assert_eq!(m.rejected, 0, "{}: nothing rejected", setup.name);
        frames.len() as f64 / elapsed.as_secs_f64()
    })
}
