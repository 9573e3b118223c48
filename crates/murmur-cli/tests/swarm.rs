//! `murmur swarm` through the real binary, on the real local network (the test binary's shared
//! one, passed with `--pds`/`--plc`) and, with `--bus`, a real nats-server the launcher starts
//! itself: the agents run as processes of their own, two workers are killed with SIGKILL with
//! a task in hand, and the summary must still say nothing was lost or duplicated.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Lines, Reaper};
use murmur_devnet::Devnet;

fn network_args(net: &Devnet) -> Vec<String> {
    let mut args = Vec::new();
    for host in net.pds_hosts() {
        args.push("--pds".to_string());
        args.push(host.url().to_string());
    }
    args.push("--plc".into());
    args.push(net.plc_url().into());
    args
}

/// The parent pid of `pid`, from `/proc/PID/stat` (the field after the command's `)`).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Processes whose parent is `parent` and whose command line is a `murmur swarm-agent`.
fn agent_children(parent: u32) -> BTreeSet<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| parent_of(pid) == Some(parent) && cmdline(pid).contains(" swarm-agent "))
        .collect()
}

/// Runs `murmur swarm ARGS --json` to its end; returns the summary object, and the agent
/// processes seen as children of it while it ran.
fn run_swarm(args: &[String], timeout: Duration) -> (serde_json::Value, BTreeSet<u32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_murmur"))
        .arg("swarm")
        .args(args)
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let launcher = child.id();
    let mut stdout = Lines::new(child.stdout.take().unwrap());
    let mut stderr = Lines::new(child.stderr.take().unwrap());
    let mut child = Reaper(child);
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "murmur swarm did not finish within {timeout:?}; stderr:\n{}",
            stderr.rest(Duration::from_millis(100)).join("\n")
        );
        seen.extend(agent_children(launcher));
        std::thread::sleep(Duration::from_millis(100));
    };
    let err = stderr.rest(Duration::from_secs(10)).join("\n");
    let out = stdout.rest(Duration::from_secs(10)).to_vec();
    assert!(status.success(), "murmur swarm failed ({status}):\n{err}");
    assert_eq!(out.len(), 1, "stdout is the JSON summary alone: {out:?}");
    let summary: serde_json::Value = serde_json::from_str(&out[0]).unwrap();
    (summary, seen, err)
}

fn assert_exactly_once(summary: &serde_json::Value, tasks: u64) {
    assert_eq!(summary["tasks"], tasks, "{summary}");
    assert_eq!(summary["done"], tasks, "{summary}");
    assert_eq!(summary["lost"], 0, "{summary}");
    assert_eq!(summary["duplicates"], 0, "{summary}");
    assert_eq!(summary["closed_by_ack"], tasks, "{summary}");
    assert_eq!(summary["ok"], true, "{summary}");
    assert!(summary["tasks_per_s"].as_f64().unwrap() > 0.0, "{summary}");
    assert!(summary["p50_ms"].as_f64().unwrap() > 0.0, "{summary}");
    assert!(
        summary["p99_ms"].as_f64().unwrap() >= summary["p50_ms"].as_f64().unwrap(),
        "{summary}"
    );
}

#[test]
fn swarm_over_the_bus_runs_agents_as_processes_and_survives_two_sigkilled_workers() {
    let net = Devnet::shared().unwrap_or_else(|e| panic!("{e}"));
    let mut args: Vec<String> = [
        "--bus",
        "--workers",
        "4",
        "--tasks",
        "40",
        "--kill",
        "2",
        "--work-ms",
        "50",
        "--timeout",
        "180",
    ]
    .map(String::from)
    .to_vec();
    args.extend(network_args(net));
    let (summary, seen, stderr) = run_swarm(&args, Duration::from_secs(420));
    assert_eq!(summary["mode"], "bus", "{summary}");
    assert_exactly_once(&summary, 40);
    assert_eq!(summary["killed"], 2, "{summary}");
    // No session token in any log (JWTs start with "eyJ").
    assert!(!stderr.contains("eyJ"), "a token in the logs:\n{stderr}");
    // A worker killed with a task in hand leaves a lease to lapse; the task moves.
    assert!(
        summary["reassigned"].as_u64().unwrap() >= 1,
        "{summary}\n{stderr}"
    );

    // Five agents, each its own process: the pids they reported themselves are distinct, none
    // is the launcher's, and each was seen running `murmur swarm-agent` as its child.
    let processes: BTreeMap<String, u32> =
        serde_json::from_value(summary["processes"].clone()).unwrap();
    let names: Vec<&str> = processes.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["coordinator", "worker0", "worker1", "worker2", "worker3"],
        "{summary}"
    );
    let pids: BTreeSet<u32> = processes.values().copied().collect();
    assert_eq!(pids.len(), 5, "{summary}");
    for (name, pid) in &processes {
        assert!(
            seen.contains(pid),
            "{name} (pid {pid}) was not seen as a swarm-agent child of the launcher; seen {seen:?}"
        );
    }
    let killed: Vec<&serde_json::Value> = summary["per_worker"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["killed"] == true)
        .collect();
    assert_eq!(killed.len(), 2, "{summary}");
    // The agents are gone with the launcher.
    std::thread::sleep(Duration::from_millis(500));
    for pid in &pids {
        assert!(
            !cmdline(*pid).contains(" swarm-agent "),
            "agent process {pid} outlived the launcher"
        );
    }
}

#[test]
fn over_the_bus_a_sigkilled_coordinator_process_is_restarted_and_recovers_its_tasks() {
    let net = Devnet::shared().unwrap_or_else(|e| panic!("{e}"));
    let mut args: Vec<String> = [
        "--bus",
        "--restart-coordinator",
        "--workers",
        "3",
        "--tasks",
        "45",
        "--work-ms",
        "50",
        "--timeout",
        "180",
    ]
    .map(String::from)
    .to_vec();
    args.extend(network_args(net));
    let (summary, seen, stderr) = run_swarm(&args, Duration::from_secs(420));
    assert_eq!(summary["mode"], "bus", "{summary}");
    assert_exactly_once(&summary, 45);
    let killed = stderr
        .lines()
        .find(|l| l.starts_with("killed the coordinator (pid "))
        .unwrap_or_else(|| panic!("no coordinator kill:\n{stderr}"));
    let first: u32 = killed["killed the coordinator (pid ".len()..]
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        stderr.contains("coordinator restarted (pid "),
        "no restart:\n{stderr}"
    );
    // The restarted coordinator is a new process, and both were the launcher's children.
    let second = summary["processes"]["coordinator"].as_u64().unwrap() as u32;
    assert_ne!(first, second, "{summary}");
    assert!(seen.contains(&first) && seen.contains(&second), "{seen:?}");
}

#[test]
fn swarm_in_direct_mode_prints_the_same_json_summary() {
    let net = Devnet::shared().unwrap_or_else(|e| panic!("{e}"));
    for (flag, subscriptions) in [
        (None, "shared"),
        (Some("--separate-subscriptions"), "separate"),
    ] {
        let mut args: Vec<String> = ["--workers", "2", "--tasks", "10", "--work-ms", "20"]
            .map(String::from)
            .to_vec();
        args.extend(flag.map(String::from));
        args.extend(network_args(net));
        let (summary, seen, _) = run_swarm(&args, Duration::from_secs(300));
        assert_eq!(summary["mode"], "direct", "{summary}");
        assert_eq!(summary["subscriptions"], subscriptions, "{summary}");
        assert_exactly_once(&summary, 10);
        assert_eq!(summary["workers"], 2, "{summary}");
        assert!(seen.is_empty(), "direct mode starts no agent processes");
    }
}

#[test]
fn direct_mode_on_a_shared_subscription_survives_a_killed_worker_and_a_restarted_coordinator() {
    let net = Devnet::shared().unwrap_or_else(|e| panic!("{e}"));
    let mut args: Vec<String> = [
        "--workers",
        "3",
        "--tasks",
        "30",
        "--kill",
        "1",
        "--restart-coordinator",
        "--work-ms",
        "50",
        "--timeout",
        "180",
    ]
    .map(String::from)
    .to_vec();
    args.extend(network_args(net));
    let (summary, _, stderr) = run_swarm(&args, Duration::from_secs(300));
    assert_eq!(summary["subscriptions"], "shared", "{summary}");
    assert_exactly_once(&summary, 30);
    assert_eq!(summary["killed"], 1, "{summary}");
    assert!(
        stderr.contains("coordinator restarted"),
        "no restart in:\n{stderr}"
    );
}

#[test]
fn sealed_swarm_loses_nothing_and_leaves_no_readable_payload_in_the_repos() {
    let net = Devnet::shared().unwrap_or_else(|e| panic!("{e}"));
    let mut args: Vec<String> = [
        "--sealed",
        "--restart-coordinator",
        "--workers",
        "3",
        "--tasks",
        "30",
        "--work-ms",
        "30",
        "--timeout",
        "180",
    ]
    .map(String::from)
    .to_vec();
    args.extend(network_args(net));
    let (summary, _, stderr) = run_swarm(&args, Duration::from_secs(300));
    assert_exactly_once(&summary, 30);
    // 30 tasks and 30 results read back, none readable.
    assert_eq!(summary["sealed"]["checked"], 60, "{summary}");
    assert_eq!(summary["sealed"]["plaintext_visible"], 0, "{summary}");
    // Every worker did some: each task was sealed for one of them.
    for w in summary["per_worker"].as_array().unwrap() {
        assert!(w["done"].as_u64().unwrap() >= 1, "{summary}");
    }
    assert!(
        stderr.contains("coordinator restarted"),
        "no restart in:\n{stderr}"
    );
}

#[test]
fn a_bad_bus_url_is_a_clear_error() {
    for (url, why) in [
        ("http://127.0.0.1:4222", "not a nats:// URL"),
        ("nats://user:secret@127.0.0.1:4222", "credentials"),
        ("nats://127.0.0.1:notaport", "bad port"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_murmur"))
            .args([
                "swarm",
                "--bus",
                url,
                "--pds",
                "http://127.0.0.1:1",
                "--plc",
            ])
            .arg("http://127.0.0.1:1")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{url}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--bus") && err.contains(why), "{url}: {err}");
        assert!(!err.contains("secret"), "the password is echoed: {err}");
    }
}

/// The agent process of `name` among the launcher's children.
fn agent_pid(launcher: u32, name: &str) -> Option<u32> {
    let spec = format!("/{name}.spec.json");
    agent_children(launcher)
        .into_iter()
        .find(|&pid| cmdline(pid).contains(&spec))
}

#[test]
fn agent_processes_that_die_unexpectedly_are_reported_with_their_status() {
    let net = Devnet::shared().unwrap_or_else(|e| panic!("{e}"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_murmur"))
        .args([
            "swarm",
            "--bus",
            "--workers",
            "2",
            "--tasks",
            "400",
            "--work-ms",
            "200",
        ])
        .args(network_args(net))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let launcher = child.id();
    let mut stdout = Lines::new(child.stdout.take().unwrap());
    let mut stderr = Lines::new(child.stderr.take().unwrap());
    let mut child = Reaper(child);
    assert!(
        stdout.wait_until(Duration::from_secs(180), |lines| lines
            .iter()
            .any(|l| l.starts_with("swarm: "))),
        "the swarm did not start: {}",
        stdout.dump()
    );
    // A worker killed behind the launcher's back: reported with its status, the run goes on.
    let worker = agent_pid(launcher, "worker0").expect("worker0's process");
    Command::new("kill")
        .args(["-9", &worker.to_string()])
        .status()
        .unwrap();
    let reported = format!("worker0 (pid {worker}) exited unexpectedly: signal: 9 (SIGKILL)");
    assert!(
        stdout.wait_until(Duration::from_secs(30), |lines| lines
            .iter()
            .any(|l| l.contains(&reported))),
        "no report of the dead worker: {}",
        stdout.dump()
    );
    // The coordinator killed: the launcher stops with an error that says so.
    let coordinator = agent_pid(launcher, "coordinator").expect("the coordinator's process");
    let other_worker = agent_pid(launcher, "worker1").expect("worker1's process");
    Command::new("kill")
        .args(["-9", &coordinator.to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the launcher did not stop");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let err = stderr.rest(Duration::from_secs(10)).join("\n");
    assert!(
        err.contains(&format!(
            "error: the coordinator (pid {coordinator}) exited before its summary: signal: 9 (SIGKILL)"
        )),
        "{err}"
    );
    // The other worker went down with the launcher.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !cmdline(other_worker).contains(" swarm-agent "),
        "worker1 (pid {other_worker}) outlived the launcher"
    );
}
