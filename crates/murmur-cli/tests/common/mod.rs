//! Helpers shared by the CLI tests: reading a child's output line by line with deadlines.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The lines of one output stream of a child process, read on a thread.
pub struct Lines {
    rx: mpsc::Receiver<String>,
    /// Every line read so far, for assertions and failure messages.
    pub seen: Vec<String>,
}

impl Lines {
    pub fn new(stream: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
        }
    }

    /// Reads until `done` holds for the lines seen so far; false at the deadline or at the end
    /// of the stream.
    pub fn wait_until(&mut self, timeout: Duration, done: impl Fn(&[String]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.seen) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => return done(&self.seen),
            }
        }
    }

    /// Reads the rest of the stream (the child must have exited).
    pub fn rest(&mut self, timeout: Duration) -> &[String] {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => return &self.seen,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("the stream did not end within {timeout:?}")
                }
            }
        }
    }

    pub fn dump(&self) -> String {
        self.seen.join("\n")
    }
}

/// Kills the child when dropped, so a failing test leaves no process behind.
pub struct Reaper(pub Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Creates a record `{"$type": collection, "text": text}` in `account`'s repo with its access
/// token, failing the test unless the PDS stores it; returns the record's at-uri.
pub async fn create_record(
    account: &murmur_devnet::Account,
    collection: &str,
    text: &str,
) -> String {
    let out: serde_json::Value = reqwest::Client::new()
        .post(format!(
            "{}/xrpc/com.atproto.repo.createRecord",
            account.pds_url
        ))
        .bearer_auth(&account.access_jwt)
        .json(&serde_json::json!({
            "repo": account.did,
            "collection": collection,
            "record": {"$type": collection, "text": text, "createdAt": "2026-11-23T12:00:00.000Z"},
        }))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    out["uri"].as_str().unwrap().to_string()
}
