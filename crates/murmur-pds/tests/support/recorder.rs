//! A tiny HTTP server that records every request (method, path, headers, body) and answers
//! with whatever the test's responder says. Stands in for "another host" that must never
//! see a token or a password.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header names in lowercase.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What to answer: status, extra headers, JSON body.
pub type Answer = (u16, Vec<(String, String)>, String);

pub type Responder = Arc<dyn Fn(&Request) -> Answer + Send + Sync>;

/// A running recorder.
pub struct Recorder {
    pub url: String,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Recorder {
    /// Every request received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Panics if any request carried `secret` anywhere: a header (Authorization or any
    /// other), the path or the body.
    pub fn assert_never_saw(&self, secret: &str) {
        for r in self.requests() {
            for (k, v) in &r.headers {
                assert!(
                    !v.contains(secret),
                    "{} {} reached {} with the secret in header {k}",
                    r.method,
                    r.path,
                    self.url
                );
            }
            assert!(!r.path.contains(secret), "secret in the path {}", r.path);
            assert!(
                !String::from_utf8_lossy(&r.body).contains(secret),
                "{} {} reached {} with the secret in its body",
                r.method,
                r.path,
                self.url
            );
        }
    }
}

/// A 401 `AuthenticationRequired` for every request.
pub fn refuse_all() -> Responder {
    Arc::new(|_| {
        (
            401,
            vec![],
            r#"{"error":"AuthenticationRequired","message":"Invalid identifier or password"}"#
                .into(),
        )
    })
}

/// Starts a recorder on a free loopback port.
pub async fn start(respond: Responder) -> Recorder {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = requests.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (log, respond) = (log.clone(), respond.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let end = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break end;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let mut lines = head.split("\r\n");
                let mut first = lines.next().unwrap_or_default().split(' ');
                let method = first.next().unwrap_or_default().to_string();
                let path = first.next().unwrap_or_default().to_string();
                let headers: Vec<(String, String)> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                while buf.len() < end + 4 + len {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = buf[end + 4..].to_vec();
                let request = Request {
                    method,
                    path,
                    headers,
                    body,
                };
                let (status, extra, body) = respond(&request);
                log.lock().unwrap().push(request);
                let mut out = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n",
                    body.len()
                );
                for (k, v) in extra {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str("\r\n");
                out.push_str(&body);
                let _ = sock.write_all(out.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Recorder { url, requests }
}
