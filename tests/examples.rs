//! The example programs, run the way their users run them: the built binary
//! (`target/debug/examples/NAME PDS_URL... PLC_URL`) against one local network of three PDS
//! hosts shared by this test binary, one example at a time (several of them measure time:
//! leases, presence TTLs, vote deadlines). Each example checks its own outcome and exits
//! non-zero when the check fails; the test also looks for the lines that show the pattern
//! happened.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use murmur_devnet::{Devnet, DevnetConfig};

/// Longest an example may run before the test kills it.
const TIMEOUT: Duration = Duration::from_secs(180);

/// One example runs at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Builds the examples once and returns the directory of their binaries. After
/// `cargo test --workspace` (which builds them, with the same features) this is a no-op.
fn examples_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .args(["build", "--quiet", "--workspace", "--examples"])
            .current_dir(&root);
        // Without the variables cargo sets for this test process: build scripts that watch
        // them (ring's) would otherwise run again and rebuild half the tree.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                ]
                .contains(&&*name)
                || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "OUT_DIR"].contains(&&*name)
            {
                cargo.env_remove(&*name);
            }
        }
        let out = cargo.output().expect("cargo runs");
        assert!(
            out.status.success(),
            "building the examples failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| root.join("target"), PathBuf::from)
            .join("debug/examples")
    })
}

/// The local network the examples run on (three PDS hosts: the pipeline needs three).
fn network() -> &'static Devnet {
    static NET: OnceLock<Devnet> = OnceLock::new();
    NET.get_or_init(|| {
        Devnet::start(DevnetConfig {
            pds: 3,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{e}"))
    })
}

/// Runs example `name` with `args`; returns its exit status, stdout and stderr. Kills it
/// after [`TIMEOUT`].
fn run(name: &str, args: &[String]) -> (std::process::ExitStatus, String, String) {
    let binary = examples_dir().join(name);
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let mut child = Command::new(&binary)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", binary.display()));
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = read(Box::new(child.stdout.take().expect("piped")));
    let stderr = read(Box::new(child.stderr.take().expect("piped")));
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the example") {
            break status;
        }
        if started.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{name} still running after {TIMEOUT:?}; its output:\n{}",
                stdout.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    eprintln!(
        "{name}: {status} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    (status, stdout, stderr)
}

/// Runs example `name` on the shared network and checks that it succeeds and printed
/// every one of `expected`.
fn run_on_network(name: &str, expected: &[&str]) {
    let net = network();
    let mut args: Vec<String> = net
        .pds_hosts()
        .iter()
        .map(|h| h.url().to_string())
        .collect();
    args.push(net.plc_url().to_string());
    let (status, stdout, stderr) = run(name, &args);
    assert!(
        status.success(),
        "{name} failed ({status}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    for line in expected {
        assert!(
            stdout.contains(line),
            "{name} did not print {line:?}:\n{stdout}"
        );
    }
}

#[test]
fn map_reduce_matches_the_local_count() {
    run_on_network(
        "map_reduce",
        &[
            "reducer: merged chunk",
            "the reduced counts equal the local count",
        ],
    );
}

#[test]
fn pipeline_is_rejected_once_and_published_with_its_chain() {
    run_on_network(
        "pipeline",
        &[
            "reviewer: draft 1 rejected",
            "drafter: draft 2 written",
            "reviewer: draft 2 accepted",
            "publisher: published",
            "6 records, all verified, on 3 PDS hosts",
        ],
    );
}

#[test]
fn quorum_closes_by_quorum_and_by_deadline_and_the_recount_agrees() {
    run_on_network(
        "quorum",
        &[
            "closed by quorum: decided",
            "closed by deadline: no-quorum",
            "both tallies agree with the recount",
        ],
    );
}

#[test]
fn supervisor_reassigns_a_lapsed_workers_role() {
    run_on_network(
        "supervisor",
        &[
            "** killed worker1 mid-role",
            "supervisor: worker1's presence lapsed; index to the standby",
            "supervisor: index done by standby",
        ],
    );
}

#[test]
fn ping_pong_plays_five_rounds() {
    run_on_network(
        "ping_pong",
        &["alice <- pong 5", "5 rounds across 2 PDS hosts"],
    );
}

#[test]
fn handoff_ends_with_the_reviewers_result() {
    run_on_network(
        "handoff",
        &["the reviewer answered the task the drafter was assigned"],
    );
}

#[test]
fn swarm_does_every_task_despite_a_killed_worker() {
    run_on_network("swarm", &["killed", "40 tasks done"]);
}

#[test]
fn custom_lexicon_runs_offline() {
    let (status, stdout, stderr) = run("custom_lexicon", &[]);
    assert!(status.success(), "{stdout}\n{stderr}");
}

#[test]
fn an_example_given_too_few_hosts_says_how_to_run_it_and_fails() {
    let args = ["http://127.0.0.1:1", "http://127.0.0.1:2"].map(String::from);
    let (status, stdout, stderr) = run("pipeline", &args);
    assert!(!status.success(), "{stdout}");
    assert!(
        stderr.contains("2 URL(s) given; usage:") && stderr.contains("at least 3 PDS hosts"),
        "{stderr}"
    );
}
