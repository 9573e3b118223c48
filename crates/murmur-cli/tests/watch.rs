//! `murmur watch` against the real local network: JSON lines of verified ops, resumable.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::create_record;
use murmur_devnet::Devnet;

fn start_watch(
    net: &Devnet,
    did: &str,
    state: &std::path::Path,
) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_murmur"))
        .args([
            "watch",
            "--pds",
            net.pds(0).unwrap().url(),
            "--plc",
            net.plc_url(),
        ])
        .args([
            "--did",
            did,
            "--collection",
            "agent.comms.*",
            "--cursor",
            "0",
            "--json",
        ])
        .arg("--state")
        .arg(state)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

fn next_line(rx: &mpsc::Receiver<String>) -> serde_json::Value {
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("murmur watch printed nothing within 30 s");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

#[tokio::test]
async fn tails_verified_ops_as_json_and_resumes_from_its_state() {
    let net = tokio::task::spawn_blocking(|| Devnet::shared().map_err(|e| e.to_string()))
        .await
        .unwrap()
        .unwrap();
    let alice = net
        .create_account(0, &net.unique_handle("watchcli"), "pw-1")
        .await
        .unwrap();
    let state = tempfile::tempdir().unwrap();

    let (mut child, rx) = start_watch(net, &alice.did, state.path());
    create_record(&alice, "app.example.ignored", "not agent.comms").await;
    let first = create_record(&alice, "agent.comms.message", "first").await;
    let line = next_line(&rx);
    assert_eq!(line["uri"], first.as_str());
    assert_eq!(line["action"], "create");
    assert_eq!(line["did"], alice.did.as_str());
    assert_eq!(line["record"]["text"], "first");
    // Wait until the cursor on disk covers the first event, then kill without a graceful stop.
    let seq = line["seq"].as_i64().expect("a seq");
    let cursors = state.path().join("cursors");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let stored = std::fs::read_dir(&cursors)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|text| text.trim().parse::<i64>().ok())
            .max();
        if stored.is_some_and(|c| c >= seq) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the cursor never reached {seq} on disk (stored: {stored:?})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let second = create_record(&alice, "agent.comms.message", "second").await;
    let (mut child, rx) = start_watch(net, &alice.did, state.path());
    let line = next_line(&rx);
    assert_eq!(
        line["uri"],
        second.as_str(),
        "resumed after the first record"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn without_plc_a_local_network_gets_a_hint_to_pass_plc() {
    let net = tokio::task::spawn_blocking(|| Devnet::shared().map_err(|e| e.to_string()))
        .await
        .unwrap()
        .unwrap();
    let bob = net
        .create_account(0, &net.unique_handle("noplc"), "pw-2")
        .await
        .unwrap();
    // No --plc: bob's did:plc is looked up in the public directory, which does not know it
    // (or cannot be reached from here).
    let mut child = Command::new(env!("CARGO_BIN_EXE_murmur"))
        .args([
            "watch",
            "--pds",
            net.pds(0).unwrap().url(),
            "--did",
            &bob.did,
        ])
        .args(["--collection", "agent.comms.*", "--cursor", "0"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let uri = create_record(&bob, "agent.comms.message", "unverifiable").await;

    // Where the public directory answers, it does not know bob: the op is rejected. Where it
    // cannot be reached (as on a machine without internet), that is an outage, not a
    // rejection: the watcher waits to verify and says so. Either way the hint is given.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let rejection = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with(&format!("rejected {uri}: ")) => break line,
            Ok(line) if line.starts_with(&format!("waiting to verify {}:", bob.did)) => {
                break line;
            }
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "no rejection of {uri} or wait on stderr:\n{}",
                    seen.join("\n")
                )
            }
        }
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        rejection.contains(&format!("cannot resolve {}", bob.did))
            || rejection.starts_with("waiting to verify"),
        "{rejection}"
    );
    assert!(rejection.contains("--plc URL"), "{rejection}");
    assert!(rejection.contains("https://plc.directory"), "{rejection}");
}
