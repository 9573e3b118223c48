//! `murmur` logs to stderr through `tracing`, filtered by `RUST_LOG`; `murmur watch` says
//! when it connects, is disconnected and fails to connect.

mod common;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Lines, Reaper};

/// Starts `murmur watch --pds url` with stdout and stderr captured.
fn watch(url: &str, rust_log: Option<&str>) -> (Reaper, Lines, Lines) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_murmur"));
    cmd.args(["watch", "--pds", url, "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match rust_log {
        Some(spec) => cmd.env("RUST_LOG", spec),
        None => cmd.env_remove("RUST_LOG"),
    };
    let mut child = cmd.spawn().unwrap();
    let stdout = Lines::new(child.stdout.take().unwrap());
    let stderr = Lines::new(child.stderr.take().unwrap());
    (Reaper(child), stdout, stderr)
}

/// A TCP server that accepts every connection and closes it at once (no WebSocket handshake).
fn closing_server() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
            count.fetch_add(1, Ordering::SeqCst);
        }
    });
    (url, accepted)
}

fn count(lines: &[String], needle: &str, addr: &str) -> usize {
    lines
        .iter()
        .filter(|l| l.contains(needle) && l.contains(addr))
        .count()
}

#[test]
fn watch_reports_connect_failures_on_stderr_unless_rust_log_is_off() {
    let (url, accepted) = closing_server();
    let addr = url.trim_start_matches("http://").to_string();

    // The default filter shows the watcher's warnings, each attempt, on stderr only.
    let (mut child, mut stdout, mut stderr) = watch(&url, None);
    let reported = stderr.wait_until(Duration::from_secs(30), |lines| {
        count(lines, "connect failed", &addr) >= 2
    });
    assert!(
        reported,
        "no two `connect failed` lines for {addr} on stderr:\n{}",
        stderr.dump()
    );
    assert!(
        stderr
            .seen
            .iter()
            .any(|l| l.contains("WARN") && l.contains("murmur_firehose::watcher")),
        "the level and target are shown:\n{}",
        stderr.dump()
    );
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    assert!(
        stdout.rest(Duration::from_secs(10)).is_empty(),
        "logs never go to stdout: {:?}",
        stdout.seen
    );

    // RUST_LOG=off: the same failures, nothing on stderr.
    let before = accepted.load(Ordering::SeqCst);
    let (mut child, _stdout, mut stderr) = watch(&url, Some("off"));
    let deadline = Instant::now() + Duration::from_secs(30);
    // A third connection means two failed attempts went through the logging code.
    while accepted.load(Ordering::SeqCst) < before + 3 {
        assert!(
            Instant::now() < deadline,
            "murmur watch did not retry within 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let lines = stderr.rest(Duration::from_secs(10));
    assert!(lines.is_empty(), "RUST_LOG=off still logged: {lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reports_connects_and_disconnects_on_stderr() {
    // A server that completes the WebSocket handshake and then closes the stream.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await {
                    let _ = ws.close(None).await;
                }
            });
        }
    });

    let (mut child, _stdout, mut stderr) = watch(&format!("http://{addr}"), None);
    let is_connected =
        |l: &String| l.contains("INFO") && l.contains(" connected ") && l.contains(addr.as_str());
    let is_disconnected = |l: &String| {
        l.contains("WARN") && l.contains(" disconnected ") && l.contains(addr.as_str())
    };
    let reconnected = tokio::task::block_in_place(|| {
        stderr.wait_until(Duration::from_secs(30), |lines| {
            // connected, then disconnected (with the reason), then connected again.
            let Some(first) = lines.iter().position(is_connected) else {
                return false;
            };
            let Some(gone) = lines[first..].iter().position(is_disconnected) else {
                return false;
            };
            lines[first + gone..].iter().any(is_connected)
        })
    });
    assert!(
        reconnected,
        "no connected / disconnected / connected sequence for {addr} on stderr:\n{}",
        stderr.dump()
    );
    assert!(
        stderr
            .seen
            .iter()
            .any(|l| is_disconnected(l) && l.contains("reason=")),
        "a disconnect says why:\n{}",
        stderr.dump()
    );
    child.0.kill().unwrap();
    child.0.wait().unwrap();
}
