//! Bus benchmarks on the real local network and a real nats-server with JetStream (prints
//! figures beside their goals; not a timed test).
//!
//! `cargo bench -p murmur-e2e --bench bus`
//!
//! Everything runs in one process, one phase after the other, on a fresh network:
//!
//! 1. **Replay throughput** (`MURMUR_BENCH_BACKLOG` single-record commits, default 4,000,
//!    written by 4 accounts): a direct watcher (Full verification) replaying the PDS from
//!    seq 0, then a hub replaying the same into a fresh stream (verified ops published per
//!    second), then a bus consumer reading that stream (each op's proof verified); two
//!    interleaved rounds, min and median.
//! 2. **Write-to-handler latency** (`MURMUR_BENCH_RECORDS` sequential creates, default 300):
//!    for each record, from the start of its createRecord call until a direct watcher's
//!    handler runs and until a bus consumer's handler runs (behind a hub). Goal: the bus adds
//!    under 2 ms p50.
//! 3. **Fan-out** (`MURMUR_BENCH_AGENTS` agents, default 64; `MURMUR_BENCH_WRITES` writes,
//!    default 300): the agents' watchers subscribed to the PDS directly vs one hub and one bus
//!    consumer per agent (each verifying every op's proof, then trusting the hub). CPU seconds
//!    per 1,000 writes of the PDS process, of this process (watchers, hub, consumers) and of
//!    nats-server, from `/proc`, beside the writes alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use murmur_bus::{BusSource, Hub, StartAt, StreamSettings};
use murmur_devnet::cpu::process_seconds as cpu_seconds;
use murmur_devnet::nats::NatsServer;
use murmur_devnet::{Devnet, DevnetConfig};
use murmur_e2e::bench::{env_or, latency_line, min_median};
use murmur_e2e::{Note, note};
use murmur_firehose::{Created, ShutdownHandle, Watcher};
use murmur_pds::Writer;

/// A running watcher (or hub) and how to stop it.
struct Running {
    stop: ShutdownHandle,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn watcher(watcher: Watcher) -> Running {
        let stop = watcher.shutdown_handle();
        let task = tokio::spawn(async move { watcher.run().await.expect("watcher") });
        Running { stop, task }
    }

    fn hub(hub: Hub) -> Running {
        let stop = hub.shutdown_handle();
        let task = tokio::spawn(async move { hub.run().await.expect("hub") });
        Running { stop, task }
    }

    async fn stop(self) {
        self.stop.shutdown();
        let _ = self.task.await;
    }
}

struct Bench {
    net: Devnet,
    nats: NatsServer,
    pds: String,
}

impl Bench {
    fn settings(&self, tag: &str) -> StreamSettings {
        let id = fastrand::u32(..);
        StreamSettings {
            name: format!("BENCH_{tag}_{id:08x}"),
            prefix: format!("b{id:08x}"),
            ..Default::default()
        }
    }

    async fn hub(&self, settings: &StreamSettings, start_cursor: Option<i64>) -> Hub {
        let mut builder = Hub::builder()
            .nats(self.nats.url())
            .pds(&self.pds)
            .plc_url(self.net.plc_url())
            .stream(settings.clone());
        if let Some(seq) = start_cursor {
            builder = builder.start_cursor(seq);
        }
        builder.build().await.expect("hub")
    }

    /// A watcher over the PDS (`settings` None) or over the bus, counting the notes it handles.
    fn counting_watcher(
        &self,
        settings: Option<&StreamSettings>,
        durable: &str,
        count: Arc<AtomicU64>,
    ) -> Watcher {
        let builder = match settings {
            None => Watcher::builder().pds(&self.pds).start_cursor(0),
            Some(s) => Watcher::builder().feed(
                BusSource::new(self.nats.url(), durable)
                    .stream(s.clone())
                    .start_at(StartAt::All)
                    .max_ack_pending(4096),
            ),
        };
        builder
            .plc_url(self.net.plc_url())
            .collections(["test.murmur.*"])
            .handler(move |_: Created<Note>| {
                count.fetch_add(1, Ordering::Relaxed);
                async { Ok(()) }
            })
            .build()
            .expect("watcher")
    }
}

async fn until(what: &str, timeout: Duration, done: impl Fn() -> bool) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn account(net: &Devnet, name: &str) -> Writer {
    let account = net
        .create_account(0, &net.unique_handle(name), "bench-pass")
        .await
        .expect("account");
    Writer::login(&account.pds_url, &account.did, "bench-pass")
        .await
        .expect("login")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let backlog: u64 = env_or("MURMUR_BENCH_BACKLOG", 4000);
    let records: u64 = env_or("MURMUR_BENCH_RECORDS", 300);
    let agents: usize = env_or("MURMUR_BENCH_AGENTS", 64);
    let writes: u64 = env_or("MURMUR_BENCH_WRITES", 300);
    let (net, nats) = tokio::task::spawn_blocking(|| {
        let net = Devnet::start(DevnetConfig::default()).expect("local network");
        let nats = NatsServer::start(Default::default()).expect("nats-server");
        (net, nats)
    })
    .await
    .unwrap();
    let pds = net.pds(0).unwrap().url().to_string();
    let bench = Bench { net, nats, pds };
    println!(
        "bus benchmarks: local PDS {}, nats-server {} at {}",
        bench.pds,
        bench.nats.binary().version,
        bench.nats.url()
    );

    replay(&bench, backlog).await;
    latency(&bench, records).await;
    fan_out(&bench, agents, writes).await;

    tokio::task::spawn_blocking(move || drop(bench))
        .await
        .unwrap();
}

/// Phase 1: the backlog replayed by a direct watcher, by a hub, and by a bus consumer.
async fn replay(bench: &Bench, backlog: u64) {
    let writers = [
        account(&bench.net, "replay0").await,
        account(&bench.net, "replay1").await,
        account(&bench.net, "replay2").await,
        account(&bench.net, "replay3").await,
    ];
    let per = backlog / writers.len() as u64;
    let backlog = per * writers.len() as u64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, w) in writers.iter().enumerate() {
        let w = w.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..per {
                w.create::<Note>(&note(i as u64 * per + n))
                    .await
                    .expect("create");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "\n1. replay of {backlog} single-record commits (written in {:.1?})",
        started.elapsed()
    );

    let (mut direct, mut hub_rates, mut consumer) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..2 {
        // A direct watcher from seq 0, Full verification.
        let count = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        let w = Running::watcher(bench.counting_watcher(None, "", Arc::clone(&count)));
        let done = until("direct replay", Duration::from_secs(300), || {
            count.load(Ordering::Relaxed) >= backlog
        })
        .await;
        direct.push(backlog as f64 / done.duration_since(t0).as_secs_f64());
        w.stop().await;

        // A hub from seq 0 into a fresh stream.
        let settings = bench.settings(&format!("REPLAY{round}"));
        let hub = bench.hub(&settings, Some(0)).await;
        let stats = hub.stats();
        let t0 = Instant::now();
        let h = Running::hub(hub);
        let done = until("hub replay", Duration::from_secs(300), || {
            stats.published.load(Ordering::Relaxed) as u64 >= backlog
        })
        .await;
        hub_rates.push(backlog as f64 / done.duration_since(t0).as_secs_f64());
        h.stop().await;

        // A bus consumer reading that stream from its start, proofs verified.
        let count = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        let w =
            Running::watcher(bench.counting_watcher(Some(&settings), "replay", Arc::clone(&count)));
        let done = until("bus consumer replay", Duration::from_secs(300), || {
            count.load(Ordering::Relaxed) >= backlog
        })
        .await;
        consumer.push(backlog as f64 / done.duration_since(t0).as_secs_f64());
        w.stop().await;
    }
    let line = |name: &str, rates: &[f64]| {
        let (min, median) = min_median(rates);
        println!("  {name:<46} min {min:>7.0} ops/s   median {median:>7.0} ops/s");
    };
    line("direct watcher, Full verification", &direct);
    line("hub: verified and published (messages/s)", &hub_rates);
    line("bus consumer, each op's proof verified", &consumer);
}

/// Phase 2: write-to-handler latency, direct watcher vs bus consumer behind a hub.
async fn latency(bench: &Bench, records: u64) {
    let writer = account(&bench.net, "latency").await;
    let settings = bench.settings("LATENCY");
    let hub = Running::hub(bench.hub(&settings, None).await);

    type Times = Arc<Mutex<HashMap<u64, Instant>>>;
    let (direct, bus): (Times, Times) = Default::default();
    let timed = |builder: murmur_firehose::WatcherBuilder, times: &Times| {
        let times = Arc::clone(times);
        builder
            .plc_url(bench.net.plc_url())
            .dids([writer.did().to_string()])
            .handler(move |rec: Created<Note>| {
                times.lock().unwrap().insert(rec.n, Instant::now());
                async { Ok(()) }
            })
            .build()
            .expect("watcher")
    };
    let direct_w = Running::watcher(timed(Watcher::builder().pds(&bench.pds), &direct));
    let bus_w = Running::watcher(timed(
        Watcher::builder().feed(BusSource::new(bench.nats.url(), "latency").stream(settings)),
        &bus,
    ));
    let seen =
        |n: u64| direct.lock().unwrap().contains_key(&n) && bus.lock().unwrap().contains_key(&n);

    // Warm-up: both paths connected, the key resolved, connections pooled.
    let base = 1_000_000u64;
    let mut warm = 0;
    loop {
        writer.create::<Note>(&note(base + warm)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        while !seen(base + warm) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if seen(base + warm) {
            break;
        }
        warm += 1;
        assert!(warm < 20, "the watchers never saw a warm-up record");
    }

    let (mut direct_ms, mut bus_ms, mut added_ms) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..records {
        let t0 = Instant::now();
        writer.create::<Note>(&note(n)).await.unwrap();
        until("a record on both paths", Duration::from_secs(10), || {
            seen(n)
        })
        .await;
        let d = direct.lock().unwrap()[&n].duration_since(t0).as_secs_f64() * 1e3;
        let b = bus.lock().unwrap()[&n].duration_since(t0).as_secs_f64() * 1e3;
        direct_ms.push(d);
        bus_ms.push(b);
        added_ms.push(b - d);
    }
    direct_w.stop().await;
    bus_w.stop().await;
    hub.stop().await;
    println!("\n2. write-to-handler latency, {records} sequential creates:");
    latency_line("direct watcher (Full verification)", &direct_ms);
    latency_line("bus consumer behind a hub", &bus_ms);
    let added = latency_line("added by the bus", &added_ms);
    println!(
        "  goal: the bus adds under 2 ms p50 -> {:.3} ms: {}",
        added,
        if added < 2.0 { "met" } else { "NOT met" }
    );
}

/// Phase 3: PDS CPU per 1,000 writes with `agents` direct subscribers vs one hub.
async fn fan_out(bench: &Bench, agents: usize, writes: u64) {
    let writer = account(&bench.net, "fanout").await;
    let pds_pid = bench.net.pds(0).unwrap().pid().expect("the PDS runs");
    let nats_pid = bench.nats.pid().expect("nats-server runs");
    println!("\n3. fan-out: {agents} agents, {writes} writes, CPU seconds per 1,000 writes");
    let mut base = 2_000_000u64;
    let mut results = Vec::new();
    // "no agents" is the baseline: what the writes alone cost the PDS.
    // "trusted" agents read the hub's stream with `trust_hub(true)`: verified once, in the
    // hub, instead of once more in every agent.
    for mode in ["no agents", "direct", "via hub", "trusted"] {
        let settings = bench.settings("FANOUT");
        let hub = if mode == "via hub" || mode == "trusted" {
            Some(Running::hub(bench.hub(&settings, None).await))
        } else {
            None
        };
        let subscribers = if mode == "no agents" { 0 } else { agents };
        let counts: Vec<Arc<AtomicU64>> = (0..subscribers).map(|_| Arc::default()).collect();
        let mut watchers = Vec::new();
        for (i, count) in counts.iter().enumerate() {
            let count = Arc::clone(count);
            let builder = if hub.is_some() {
                Watcher::builder().feed(
                    BusSource::new(bench.nats.url(), format!("agent{i}"))
                        .stream(settings.clone())
                        .trust_hub(mode == "trusted"),
                )
            } else {
                Watcher::builder().pds(&bench.pds)
            };
            watchers.push(Running::watcher(
                builder
                    .plc_url(bench.net.plc_url())
                    .dids([writer.did().to_string()])
                    .handler(move |_: Created<Note>| {
                        count.fetch_add(1, Ordering::Relaxed);
                        async { Ok(()) }
                    })
                    .build()
                    .expect("watcher"),
            ));
        }
        // Every agent has seen a warm-up record before the clock starts (consumers and
        // subscriptions come up in the background; one that starts late misses a record).
        let started = Instant::now();
        while !counts.iter().all(|c| c.load(Ordering::Relaxed) >= 1) {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "timed out: warm-up on every agent"
            );
            writer.create::<Note>(&note(base)).await.unwrap();
            base += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let seen_before: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let cpu = |pid: u32| cpu_seconds(pid).unwrap_or(f64::NAN);
        let me = std::process::id();
        let before = (cpu(pds_pid), cpu(me), cpu(nats_pid));
        let t0 = Instant::now();
        for _ in 0..writes {
            writer.create::<Note>(&note(base)).await.unwrap();
            base += 1;
        }
        until(
            "every write on every agent",
            Duration::from_secs(300),
            || {
                counts
                    .iter()
                    .zip(&seen_before)
                    .all(|(c, before)| c.load(Ordering::Relaxed) >= before + writes)
            },
        )
        .await;
        let elapsed = t0.elapsed();
        let after = (cpu(pds_pid), cpu(me), cpu(nats_pid));
        let per_k = |a: f64, b: f64| (a - b) * 1000.0 / writes as f64;
        let row = (
            per_k(after.0, before.0),
            per_k(after.1, before.1),
            per_k(after.2, before.2),
        );
        println!(
            "  {mode:<9} PDS {:>6.2} s   agents+hub {:>6.2} s   nats-server {:>6.2} s   ({writes} writes in {elapsed:.1?})",
            row.0, row.1, row.2
        );
        results.push(row);
        for w in watchers {
            w.stop().await;
        }
        if let Some(h) = hub {
            h.stop().await;
        }
    }
    if let [alone, direct, bus, trusted] = results[..] {
        println!(
            "  PDS CPU of serving the agents (minus the writes alone): direct {:.2} s, via the hub {:.2} s per 1,000 writes",
            direct.0 - alone.0,
            bus.0 - alone.0
        );
        println!(
            "  all CPU (PDS + agents + hub + nats-server) per 1,000 writes: direct {:.2} s, via the hub {:.2} s, trusting the hub {:.2} s",
            direct.0 + direct.1 + direct.2,
            bus.0 + bus.1 + bus.2,
            trusted.0 + trusted.1 + trusted.2
        );
    }
}
