//! `murmur send` checks a record completely (lexicon, data model, DAG-CBOR size) before it
//! makes any HTTP call: an oversized record fails without a login.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// No maxLength: only the writer's size limits can refuse a long text.
const LEXICON: &str = r#"{
  "lexicon": 1,
  "id": "test.murmur.note",
  "defs": {
    "main": {
      "type": "record",
      "key": "tid",
      "record": {
        "type": "object",
        "required": ["text"],
        "properties": { "text": { "type": "string" } }
      }
    }
  }
}"#;

/// A loopback "PDS" that counts connections and refuses every request with a 401.
fn recorder() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { return };
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = sock.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match sock.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body =
                r#"{"error":"AuthenticationRequired","message":"Invalid identifier or password"}"#;
            let _ = write!(
                sock,
                "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, hits)
}

fn send(pds: &str, dir: &Path, file: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_murmur"))
        .args(["send", "--pds", pds, "--handle", "alice.test"])
        .args(["--password-env", "MURMUR_SEND_TEST_PASSWORD"])
        .arg("--lexicons")
        .arg(dir.join("lexicons"))
        .arg("test.murmur.note")
        .arg(dir.join(file))
        .env("MURMUR_SEND_TEST_PASSWORD", "pw-not-logged")
        .output()
        .unwrap()
}

#[test]
fn an_oversized_record_is_refused_before_any_http_request() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("lexicons/test/murmur")).unwrap();
    std::fs::write(dir.path().join("lexicons/test/murmur/note.json"), LEXICON).unwrap();
    let big = serde_json::json!({ "text": "x".repeat(1_100_000) });
    std::fs::write(dir.path().join("big.json"), big.to_string()).unwrap();
    std::fs::write(dir.path().join("small.json"), r#"{"text":"hello"}"#).unwrap();
    let (pds, hits) = recorder();

    let out = send(&pds, dir.path(), "big.json");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("as DAG-CBOR, over the 1048576-byte limit"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was sent"), "{stderr}");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "no HTTP request was made");

    // The recorder does see a send that gets as far as logging in.
    let out = send(&pds, dir.path(), "small.json");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("login refused"), "{stderr}");
    assert!(hits.load(Ordering::SeqCst) >= 1);
    assert!(!stderr.contains("pw-not-logged"), "{stderr}");
}
