//! Swarm scaling, direct vs bus, measured side by side in one run (prints figures beside their
//! goals; not a timed test).
//!
//! `cargo bench -p murmur-cli --bench swarm`
//!
//! Runs the real `murmur swarm` binary with 2, 8 and 24 workers (`MURMUR_BENCH_WORKERS`,
//! comma-separated) in three modes (`MURMUR_BENCH_MODES`, comma-separated, default all three),
//! interleaved, on one local network and one nats-server started here:
//! - `shared`: direct mode, every agent in one process, all sharing one verified subscription
//!   per PDS host (an in-process `Fanout`: each commit verified once);
//! - `separate`: direct mode with `--separate-subscriptions`, every agent subscribing to the
//!   PDS hosts and verifying every commit itself;
//! - `bus`: `--bus`, a hub verifies once, each agent a separate process reading a durable
//!   consumer.
//!
//! Same tasks (`MURMUR_BENCH_TASKS`, default 200) and work (`--work-ms 50`) in every run.
//! Goals: issue 13, over the bus, p50 at 24 workers within 1.5x of p50 at 2 workers, and at
//! least 2x the separate direct mode's throughput at 24 workers; issue 15, at 24 workers the
//! shared direct mode costs the PDS hosts less CPU per task than separate subscriptions, with
//! no less throughput.
//!
//! Only the issue 15 comparison: `MURMUR_BENCH_WORKERS=24 MURMUR_BENCH_MODES=shared,separate
//! cargo bench -p murmur-cli --bench swarm`.

use std::process::Command;

use murmur_devnet::cpu;
use murmur_devnet::nats::NatsServer;
use murmur_devnet::{Devnet, DevnetConfig};
use serde_json::Value;

/// One run's summary, from `murmur swarm --json`.
struct Run {
    tasks_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    lost: u64,
    duplicates: u64,
    /// CPU milliseconds per task the PDS processes used, and the whole machine.
    pds_ms_per_task: f64,
    machine_ms_per_task: f64,
}

/// How a run's agents hear the PDS hosts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Shared,
    Separate,
    Bus,
}

impl Mode {
    fn parse(name: &str) -> Option<Mode> {
        match name.trim() {
            "shared" => Some(Mode::Shared),
            "separate" => Some(Mode::Separate),
            "bus" => Some(Mode::Bus),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Shared => "shared",
            Mode::Separate => "separate",
            Mode::Bus => "bus",
        }
    }
}

fn swarm(net: &Devnet, mode: Mode, nats: &str, workers: usize, tasks: usize) -> Run {
    let hosts: Vec<String> = net
        .pds_hosts()
        .iter()
        .map(|h| h.url().to_string())
        .collect();
    let plc = net.plc_url();
    let pds_cpu = || -> f64 {
        net.pds_hosts()
            .iter()
            .filter_map(|h| h.pid().and_then(cpu::process_seconds))
            .sum()
    };
    let machine_cpu = || cpu::machine_busy_seconds().unwrap_or(f64::NAN);
    let before = (pds_cpu(), machine_cpu());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_murmur"));
    cmd.args(["swarm", "--json", "--work-ms", "50"])
        .args(["--workers", &workers.to_string()])
        .args(["--tasks", &tasks.to_string()])
        .args(["--plc", plc]);
    for host in &hosts {
        cmd.args(["--pds", host]);
    }
    match mode {
        Mode::Shared => {}
        Mode::Separate => {
            cmd.arg("--separate-subscriptions");
        }
        Mode::Bus => {
            cmd.arg(format!("--bus={nats}"));
        }
    }
    let out = cmd.output().expect("murmur swarm runs");
    let after = (pds_cpu(), machine_cpu());
    let per_task = |a: f64, b: f64| (a - b) * 1000.0 / tasks as f64;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Value = stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| {
            panic!(
                "no JSON summary from murmur swarm (status {}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let num = |k: &str| summary[k].as_f64().unwrap_or(f64::NAN);
    Run {
        tasks_per_s: num("tasks_per_s"),
        p50_ms: num("p50_ms"),
        p99_ms: num("p99_ms"),
        lost: summary["lost"].as_u64().unwrap_or(u64::MAX),
        duplicates: summary["duplicates"].as_u64().unwrap_or(u64::MAX),
        pds_ms_per_task: per_task(after.0, before.0),
        machine_ms_per_task: per_task(after.1, before.1),
    }
}

fn main() {
    let workers: Vec<usize> = std::env::var("MURMUR_BENCH_WORKERS")
        .unwrap_or_else(|_| "2,8,24".into())
        .split(',')
        .filter_map(|w| w.trim().parse().ok())
        .collect();
    let tasks: usize = std::env::var("MURMUR_BENCH_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let modes: Vec<Mode> = std::env::var("MURMUR_BENCH_MODES")
        .unwrap_or_else(|_| "shared,separate,bus".into())
        .split(',')
        .filter_map(Mode::parse)
        .collect();
    let net = Devnet::start(DevnetConfig {
        pds: 2,
        ..Default::default()
    })
    .expect("local network");
    let nats = modes
        .contains(&Mode::Bus)
        .then(|| NatsServer::start(Default::default()).expect("nats-server"));
    println!(
        "swarm scaling: {tasks} tasks, --work-ms 50, 2 PDS hosts{}",
        nats.as_ref().map_or(String::new(), |n| format!(
            ", nats-server {}",
            n.binary().version
        ))
    );
    println!(
        "  {:<8} {:>7} {:>8} {:>8} {:>8} {:>5} {:>5} {:>14} {:>18}",
        "mode",
        "workers",
        "tasks/s",
        "p50 ms",
        "p99 ms",
        "lost",
        "dups",
        "PDS CPU ms/task",
        "machine CPU ms/task"
    );
    let nats_url = nats.as_ref().map_or("", |n| n.url());
    let mut rows = Vec::new();
    for &n in &workers {
        for &mode in &modes {
            let run = swarm(&net, mode, nats_url, n, tasks);
            println!(
                "  {:<8} {n:>7} {:>8.1} {:>8.0} {:>8.0} {:>5} {:>5} {:>15.1} {:>19.1}",
                mode.name(),
                run.tasks_per_s,
                run.p50_ms,
                run.p99_ms,
                run.lost,
                run.duplicates,
                run.pds_ms_per_task,
                run.machine_ms_per_task
            );
            rows.push((mode, n, run));
        }
    }
    let find = |mode: Mode, n: usize| rows.iter().find(|(m, w, _)| *m == mode && *w == n);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let (lo, hi) = (workers.iter().min(), workers.iter().max());
    if let (Some(&lo), Some(&hi)) = (lo, hi)
        && let (Some(bus_lo), Some(bus_hi), Some(direct_hi)) = (
            find(Mode::Bus, lo),
            find(Mode::Bus, hi),
            find(Mode::Separate, hi),
        )
    {
        let p50_ratio = bus_hi.2.p50_ms / bus_lo.2.p50_ms;
        let speedup = bus_hi.2.tasks_per_s / direct_hi.2.tasks_per_s;
        println!(
            "  goal: bus p50 at {hi} workers within 1.5x of p50 at {lo}: {p50_ratio:.2}x ({})",
            verdict(p50_ratio <= 1.5)
        );
        println!(
            "  goal: bus throughput at {hi} workers >= 2x direct (separate): {speedup:.2}x ({})",
            verdict(speedup >= 2.0)
        );
    }
    if let Some(&hi) = hi
        && let (Some(shared), Some(separate)) = (find(Mode::Shared, hi), find(Mode::Separate, hi))
    {
        let (sh, se) = (&shared.2, &separate.2);
        println!(
            "  goal: direct at {hi} workers, shared vs separate subscriptions: PDS CPU per task lower: \
             {:.1} vs {:.1} ms ({:.2}x) ({})",
            sh.pds_ms_per_task,
            se.pds_ms_per_task,
            sh.pds_ms_per_task / se.pds_ms_per_task,
            verdict(sh.pds_ms_per_task < se.pds_ms_per_task)
        );
        println!(
            "  goal: direct at {hi} workers, shared throughput >= separate: {:.1} vs {:.1} tasks/s \
             ({:.2}x) ({}); p50 {:.0} vs {:.0} ms, p99 {:.0} vs {:.0} ms; machine CPU per task \
             {:.1} vs {:.1} ms",
            sh.tasks_per_s,
            se.tasks_per_s,
            sh.tasks_per_s / se.tasks_per_s,
            verdict(sh.tasks_per_s >= se.tasks_per_s),
            sh.p50_ms,
            se.p50_ms,
            sh.p99_ms,
            se.p99_ms,
            sh.machine_ms_per_task,
            se.machine_ms_per_task
        );
    }
    // Little's law: claim-to-result latency is about (workers x concurrency) / throughput, so
    // p50 stays flat only while throughput grows with the workers; the machine's cores over
    // the CPU one task costs bound that throughput.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    if let Some((_, n, run)) = rows
        .iter()
        .find(|(m, w, _)| *m == Mode::Bus && Some(w) == hi)
    {
        println!(
            "  ceiling on this machine at {n} workers over the bus: {cores} cores / {:.1} ms CPU per task = {:.0} tasks/s \
             (the PDS alone: {:.0} tasks/s)",
            run.machine_ms_per_task,
            cores * 1000.0 / run.machine_ms_per_task,
            cores * 1000.0 / run.pds_ms_per_task
        );
    }
}
