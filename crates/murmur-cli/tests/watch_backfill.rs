//! `murmur watch --backfill` against the real local network: a repo's existing records are
//! printed once, marked `backfill`, then its new ones once, marked `live`.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Lines, Reaper, create_record};
use murmur_devnet::Devnet;

const COLLECTION: &str = "agent.comms.message";

/// The JSON op lines printed so far (every stdout line must be one).
fn ops(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// How many times each at-uri was printed with `origin`.
fn printed(lines: &[String], origin: &str) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for op in ops(lines) {
        if op["origin"] == origin {
            *seen
                .entry(op["uri"].as_str().expect("a uri").to_string())
                .or_default() += 1;
        }
    }
    seen
}

#[tokio::test]
async fn backfill_prints_existing_records_once_then_live_ones() {
    let net = tokio::task::spawn_blocking(|| Devnet::shared().map_err(|e| e.to_string()))
        .await
        .unwrap()
        .unwrap();
    let carol = net
        .create_account(0, &net.unique_handle("backfillcli"), "pw-3")
        .await
        .unwrap();
    let mut old = Vec::new();
    for n in 0..30 {
        old.push(create_record(&carol, COLLECTION, &format!("old {n}")).await);
    }

    let mut child = Command::new(env!("CARGO_BIN_EXE_murmur"))
        .args([
            "watch",
            "--pds",
            net.pds(0).unwrap().url(),
            "--plc",
            net.plc_url(),
        ])
        .args(["--did", &carol.did, "--backfill", "--json"])
        .args(["--backfill-concurrency", "2"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = Lines::new(child.stdout.take().unwrap());
    let mut stderr = Lines::new(child.stderr.take().unwrap());
    let child = Reaper(child);

    let copied = stdout.wait_until(Duration::from_secs(60), |lines| lines.len() >= old.len());
    assert!(copied, "not every old record printed:\n{}", stdout.dump());
    // stderr is not a terminal: progress comes as plain lines, the last one when finished.
    let finished = stderr.wait_until(Duration::from_secs(30), |lines| {
        lines.iter().any(|l| l.starts_with("backfill finished: "))
    });
    assert!(finished, "no finished progress line:\n{}", stderr.dump());
    let last = stderr
        .seen
        .iter()
        .find(|l| l.starts_with("backfill finished: "))
        .unwrap();
    assert!(last.contains("1/1 repos, 30 records"), "{last}");

    let backfilled = printed(&stdout.seen, "backfill");
    for uri in &old {
        assert_eq!(
            backfilled.get(uri),
            Some(&1),
            "{uri} not printed exactly once as backfill:\n{}",
            stdout.dump()
        );
    }
    for op in ops(&stdout.seen) {
        assert_eq!(op["did"], carol.did.as_str());
        assert_eq!(op["action"], "create");
        assert_eq!(op["seq"], 0, "a backfilled op has no stream seq: {op}");
        assert!(
            op["record"]["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("old ")),
            "{op}"
        );
    }

    let mut new = Vec::new();
    for n in 0..3 {
        new.push(create_record(&carol, COLLECTION, &format!("new {n}")).await);
    }
    let all = old.len() + new.len();
    let live = stdout.wait_until(Duration::from_secs(30), |lines| lines.len() >= all);
    assert!(live, "not every new record printed:\n{}", stdout.dump());
    // Anything printed twice would come right behind: give it a moment.
    stdout.wait_until(Duration::from_secs(1), |lines| lines.len() > all);
    assert_eq!(
        stdout.seen.len(),
        all,
        "ops printed more than once:\n{}",
        stdout.dump()
    );
    let lived = printed(&stdout.seen, "live");
    for uri in &new {
        assert_eq!(
            lived.get(uri),
            Some(&1),
            "{uri} not printed exactly once as live:\n{}",
            stdout.dump()
        );
    }
    for op in &ops(&stdout.seen)[old.len()..] {
        assert!(op["seq"].as_i64().is_some_and(|s| s > 0), "{op}");
    }
    drop(child);
}

#[test]
fn backfill_concurrency_needs_backfill() {
    let out = Command::new(env!("CARGO_BIN_EXE_murmur"))
        .args([
            "watch",
            "--pds",
            "http://127.0.0.1:9",
            "--backfill-concurrency",
            "2",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--backfill"), "{err}");
}
