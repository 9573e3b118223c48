//! The relay's plain XRPC endpoints (everything but `subscribeRepos`): `listHosts`,
//! `listRepos` and `getRepoStatus` answered from the hub's PDS hosts, `getRepo` and
//! `getRecord` redirected to the host that has the repo, `requestCrawl` refused (the hub's
//! hosts are fixed when it starts). One request per connection (`Connection: close`).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest request head read.
const MAX_HEAD: usize = 16 * 1024;

/// What the endpoints need: the hosts' base URLs (`http://host:port`) and, for `listHosts`,
/// the watcher's per-source figures.
pub(crate) struct Hosts {
    pub urls: Vec<String>,
    pub metrics: Option<Arc<murmur_firehose::Metrics>>,
    pub http: reqwest::Client,
}

impl Hosts {
    pub(crate) fn new(urls: Vec<String>, metrics: Option<Arc<murmur_firehose::Metrics>>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        let urls = urls
            .into_iter()
            .map(|u| {
                let u = u.trim_end_matches('/');
                let u = u
                    .strip_suffix("/xrpc/com.atproto.sync.subscribeRepos")
                    .unwrap_or(u);
                if let Some(rest) = u.strip_prefix("ws://") {
                    format!("http://{rest}")
                } else if let Some(rest) = u.strip_prefix("wss://") {
                    format!("https://{rest}")
                } else {
                    u.to_string()
                }
            })
            .collect();
        Hosts {
            urls,
            metrics,
            http,
        }
    }
}

/// Whether a complete request head (`head`) asks for a WebSocket upgrade.
pub(crate) fn is_upgrade(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    text.lines()
        .any(|l| l.starts_with("upgrade:") && l.contains("websocket"))
}

/// Reads as much of the request head as has arrived, without consuming it; `None` when the
/// connection closed or sent no complete head within `MAX_HEAD` bytes or 5 s.
pub(crate) async fn peek_head(tcp: &TcpStream) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; MAX_HEAD];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = tokio::time::timeout_at(deadline, tcp.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if let Some(end) = find(&buf[..n], b"\r\n\r\n") {
            return Some(buf[..end + 4].to_vec());
        }
        if n == buf.len() {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Answers one plain HTTP request whose head is `head` (already peeked).
pub(crate) async fn serve(hosts: &Hosts, mut tcp: TcpStream, head: Vec<u8>) {
    let mut consumed = vec![0u8; head.len()];
    if tcp.read_exact(&mut consumed).await.is_err() {
        return;
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let request_line = text.lines().next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let response = match (method, path) {
        ("GET", "/xrpc/com.atproto.sync.listHosts") => Reply::Json(200, list_hosts(hosts)),
        ("GET", "/xrpc/com.atproto.sync.listRepos") => {
            list_repos(hosts, param("cursor"), param("limit")).await
        }
        ("GET", "/xrpc/com.atproto.sync.getRepoStatus") => match param("did") {
            Some(did) => match host_of(hosts, did).await {
                Some((_, status)) => Reply::Json(200, status),
                None => error(
                    404,
                    "RepoNotFound",
                    &format!("no host of this relay has {did}"),
                ),
            },
            None => error(400, "InvalidRequest", "did is required"),
        },
        ("GET", "/xrpc/com.atproto.sync.getRepo" | "/xrpc/com.atproto.sync.getRecord") => {
            match param("did") {
                Some(did) => match host_of(hosts, did).await {
                    Some((host, _)) => Reply::Redirect(format!("{host}{path}?{query}")),
                    None => error(
                        404,
                        "RepoNotFound",
                        &format!("no host of this relay has {did}"),
                    ),
                },
                None => error(400, "InvalidRequest", "did is required"),
            }
        }
        ("POST", "/xrpc/com.atproto.sync.requestCrawl") => error(
            501,
            "MethodNotImplemented",
            "this relay crawls the hosts it was started with; add a host with murmur hub --pds",
        ),
        (_, "/xrpc/com.atproto.sync.subscribeRepos") => error(
            400,
            "InvalidRequest",
            "subscribeRepos is a WebSocket endpoint",
        ),
        _ => error(404, "MethodNotImplemented", "not an endpoint of this relay"),
    };
    let (status, headers, body) = match response {
        Reply::Json(status, value) => (
            status,
            "Content-Type: application/json\r\n".to_string(),
            value.to_string(),
        ),
        Reply::Redirect(location) => (302, format!("Location: {location}\r\n"), String::new()),
    };
    let reason = match status {
        200 => "OK",
        302 => "Found",
        400 => "Bad Request",
        404 => "Not Found",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        _ => "Error",
    };
    let out = format!(
        "HTTP/1.1 {status} {reason}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.write_all(out.as_bytes()).await;
    let _ = tcp.shutdown().await;
}

enum Reply {
    Json(u16, Value),
    Redirect(String),
}

fn error(status: u16, error: &str, message: &str) -> Reply {
    Reply::Json(status, json!({ "error": error, "message": message }))
}

/// Percent-decoding of a query component (`+` is a space).
fn decode(s: &str) -> String {
    let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16)).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                (Some(high), Some(low)) => {
                    out.push(high * 16 + low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `listHosts`: the hub's hosts, with the last seq read from each.
fn list_hosts(hosts: &Hosts) -> Value {
    let sources = hosts
        .metrics
        .as_ref()
        .map(|m| m.sources())
        .unwrap_or_default();
    let list: Vec<Value> = hosts
        .urls
        .iter()
        .map(|url| {
            let hostname = url
                .split_once("://")
                .map_or(url.as_str(), |(_, rest)| rest)
                .to_string();
            let source = sources
                .iter()
                .find(|s| s.url.contains(&format!("://{hostname}/")));
            let mut host = json!({
                "hostname": hostname,
                "status": if source.is_some_and(|s| !s.connected) { "offline" } else { "active" },
            });
            if let Some(seq) = source.and_then(|s| s.last_seq) {
                host["seq"] = json!(seq);
            }
            host
        })
        .collect();
    json!({ "hosts": list })
}

/// `listRepos` over every host, one after the other: the cursor is `{host index}:{the host's
/// cursor}`.
async fn list_repos(hosts: &Hosts, cursor: Option<&str>, limit: Option<&str>) -> Reply {
    let limit = match limit.map(str::parse::<u32>) {
        None => 500,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => return error(400, "InvalidRequest", "limit is 1 to 1000"),
    };
    let (mut index, mut host_cursor) = match cursor {
        None | Some("") => (0usize, String::new()),
        Some(c) => match c
            .split_once(':')
            .and_then(|(i, c)| Some((i.parse().ok()?, c)))
        {
            Some((i, c)) => (i, c.to_string()),
            None => return error(400, "InvalidRequest", "not a cursor of this relay"),
        },
    };
    let mut repos = Vec::new();
    while index < hosts.urls.len() && repos.len() < limit as usize {
        let url = format!("{}/xrpc/com.atproto.sync.listRepos", hosts.urls[index]);
        let mut query = vec![("limit", (limit as usize - repos.len()).to_string())];
        if !host_cursor.is_empty() {
            query.push(("cursor", host_cursor.clone()));
        }
        let page: Value = match hosts.http.get(&url).query(&query).send().await {
            Ok(r) if r.status().is_success() => match r.json().await {
                Ok(v) => v,
                Err(e) => return error(502, "UpstreamFailure", &e.to_string()),
            },
            Ok(r) => {
                return error(
                    502,
                    "UpstreamFailure",
                    &format!("{} answered {}", hosts.urls[index], r.status()),
                );
            }
            Err(e) => return error(502, "UpstreamFailure", &e.to_string()),
        };
        if let Some(list) = page["repos"].as_array() {
            repos.extend(list.iter().cloned());
        }
        match page["cursor"].as_str() {
            Some(c) if page["repos"].as_array().is_some_and(|l| !l.is_empty()) => {
                host_cursor = c.to_string()
            }
            _ => {
                index += 1;
                host_cursor.clear();
            }
        }
    }
    let mut body = json!({ "repos": repos });
    if index < hosts.urls.len() {
        body["cursor"] = json!(format!("{index}:{host_cursor}"));
    }
    Reply::Json(200, body)
}

/// The host that has `did` and its `getRepoStatus` answer.
async fn host_of(hosts: &Hosts, did: &str) -> Option<(String, Value)> {
    for host in &hosts.urls {
        let url = format!("{host}/xrpc/com.atproto.sync.getRepoStatus");
        let Ok(r) = hosts.http.get(&url).query(&[("did", did)]).send().await else {
            continue;
        };
        if r.status().is_success()
            && let Ok(status) = r.json::<Value>().await
        {
            return Some((host.clone(), status));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_components_are_decoded() {
        assert_eq!(decode("did%3Aplc%3Aabc"), "did:plc:abc");
        assert_eq!(decode("a+b"), "a b");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
        assert_eq!(decode("%4"), "%4");
        assert_eq!(decode("é%C3%A9"), "éé");
    }

    #[test]
    fn upgrades_are_told_from_plain_requests() {
        assert!(is_upgrade(
            b"GET /x HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        ));
        assert!(!is_upgrade(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"));
    }

    #[test]
    fn host_urls_are_http_bases() {
        let hosts = Hosts::new(
            vec![
                "http://localhost:2583/".into(),
                "ws://h:1/xrpc/com.atproto.sync.subscribeRepos".into(),
                "wss://pds.example".into(),
            ],
            None,
        );
        assert_eq!(
            hosts.urls,
            ["http://localhost:2583", "http://h:1", "https://pds.example"]
        );
    }
}
