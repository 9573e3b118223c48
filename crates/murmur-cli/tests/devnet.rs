//! `murmur devnet up` says on stderr when one of its node processes dies.
#![cfg(unix)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Lines, Reaper};

fn signal(pid: u64, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid} failed");
}

#[test]
fn devnet_up_reports_a_node_process_that_dies() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_murmur"))
        .args(["devnet", "up", "--pds", "2", "--json"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = Lines::new(child.stdout.take().unwrap());
    let mut stderr = Lines::new(child.stderr.take().unwrap());
    let mut child = Reaper(child);

    // The first start provisions Node and the atproto packages (minutes).
    let started = stdout.wait_until(Duration::from_secs(900), |lines| !lines.is_empty());
    assert!(
        started,
        "murmur devnet up printed no URLs.\nstderr:\n{}",
        stderr.dump()
    );
    let urls: serde_json::Value = serde_json::from_str(&stdout.seen[0]).unwrap();
    let plc_pid = urls["pids"]["plc"].as_u64().expect("pids.plc");
    let pds_pids: Vec<u64> = urls["pids"]["pds"]
        .as_array()
        .expect("pids.pds")
        .iter()
        .map(|p| p.as_u64().expect("a pid per PDS"))
        .collect();
    assert_eq!(pds_pids.len(), 2);
    assert_eq!(urls["pds"].as_array().unwrap().len(), 2);
    assert_ne!(plc_pid, pds_pids[1]);

    signal(pds_pids[1], "-KILL");
    let expected = format!("pds 1 (pid {}) exited unexpectedly", pds_pids[1]);
    let reported = stderr.wait_until(Duration::from_secs(30), |lines| {
        lines
            .iter()
            .any(|l| l.contains(&expected) && l.contains("SIGKILL"))
    });
    assert!(
        reported,
        "no `{expected}: ... SIGKILL` on stderr:\n{}",
        stderr.dump()
    );
    let points_at_log = stderr.wait_until(Duration::from_secs(10), |lines| {
        lines.iter().any(|l| l.contains("pds1.log"))
    });
    assert!(
        points_at_log,
        "the report points at its log:\n{}",
        stderr.dump()
    );

    // The rest keeps running and stops cleanly on SIGTERM; nothing else was reported dead.
    signal(child.0.id().into(), "-TERM");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "murmur devnet up did not stop within 60 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "murmur devnet up exited with {status}");
    let lines = stderr.rest(Duration::from_secs(10));
    let dead: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("exited unexpectedly"))
        .collect();
    assert_eq!(dead.len(), 1, "only pds 1 died: {dead:?}");
}
