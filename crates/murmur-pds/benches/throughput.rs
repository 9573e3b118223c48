//! Write throughput on the local PDS: sequential createRecord versus applyWrites batches of
//! 10, 50 and 200, and create latency percentiles. `cargo bench -p murmur-pds`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use murmur_devnet::{Devnet, DevnetConfig};
use murmur_pds::Writer;
use support::{Note, Notes};

fn note(i: usize) -> Note {
    Note {
        text: format!("benchmark task {i}: summarise the incident report and post the result"),
        tags: vec!["bench".into(), "task".into()],
        priority: 3,
        attachment: None,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn main() {
    let sequential: usize = std::env::var("MURMUR_BENCH_CREATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let batched: usize = std::env::var("MURMUR_BENCH_BATCHED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let net = Devnet::start(DevnetConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let acct = net
            .create_account(0, &net.unique_handle("bench"), "bench-pw")
            .await
            .unwrap();
        let w = Writer::login(&acct.pds_url, &acct.handle, &acct.password)
            .await
            .unwrap();
        // Warm-up: connection, JIT of the PDS's code paths.
        for i in 0..20 {
            w.create::<Notes>(&note(i)).await.unwrap();
        }

        let mut latencies = Vec::with_capacity(sequential);
        let started = Instant::now();
        for i in 0..sequential {
            let t = Instant::now();
            w.create::<Notes>(&note(i)).await.unwrap();
            latencies.push(t.elapsed());
        }
        let elapsed = started.elapsed();
        latencies.sort();
        println!(
            "sequential createRecord: {sequential} records in {:.2} s = {:.0} records/s; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            elapsed.as_secs_f64(),
            sequential as f64 / elapsed.as_secs_f64(),
            percentile(&latencies, 0.50).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3,
            latencies.last().unwrap().as_secs_f64() * 1e3,
        );

        for size in [10usize, 50, 200] {
            let batches = batched.div_ceil(size);
            let mut commit_latencies = Vec::with_capacity(batches);
            let started = Instant::now();
            for b in 0..batches {
                let mut batch = w.batch();
                for i in 0..size {
                    batch.create::<Notes>(&note(b * size + i)).unwrap();
                }
                let t = Instant::now();
                batch.commit().await.unwrap();
                commit_latencies.push(t.elapsed());
            }
            let elapsed = started.elapsed();
            commit_latencies.sort();
            let records = batches * size;
            println!(
                "applyWrites batch of {size:>3}: {records} records in {:.2} s = {:.0} records/s; per-commit p50 {:.1} ms, p99 {:.1} ms",
                elapsed.as_secs_f64(),
                records as f64 / elapsed.as_secs_f64(),
                percentile(&commit_latencies, 0.50).as_secs_f64() * 1e3,
                percentile(&commit_latencies, 0.99).as_secs_f64() * 1e3,
            );
        }
    });
}
