//! The relay's plain XRPC endpoints (everything but `subscribeRepos`): `listHosts`,
//! `listRepos` and `getRepoStatus` answered from the hub's PDS hosts, `getRepo` and
//! `getRecord` redirected to the host that has the repo, `requestCrawl` adding a host the
//! hub's crawl policy allows (refused when it allows none). One request per connection
//! (`Connection: close`).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest request head read.
const MAX_HEAD: usize = 16 * 1024;

/// What the endpoints need: the hosts' base URLs (`http://host:port`; hosts added by
/// `requestCrawl` join them) and, for `listHosts`, the watchers' per-source figures.
pub(crate) struct Hosts {
    urls: RwLock<Vec<String>>,
    /// The hosts the hub started with (crawled hosts join `urls` after them).
    configured: usize,
    metrics: Option<Arc<murmur_firehose::Metrics>>,
    /// Per crawled host, its watcher's figures (replaced when its watcher is started again).
    crawled: RwLock<std::collections::HashMap<String, Arc<murmur_firehose::Metrics>>>,
    pub http: reqwest::Client,
    pub crawl: Option<Crawl>,
}

/// Which hosts `requestCrawl` may add, and the way to the hub that watches them.
pub(crate) struct Crawl {
    pub policy: CrawlPolicy,
    pub requests: tokio::sync::mpsc::Sender<CrawlRequest>,
}

/// A host `requestCrawl` asked for, passed to the hub; the answer says when it is watched
/// (with its watcher's figures) or why not.
pub(crate) struct CrawlRequest {
    /// The host's base URL (`https://host[:port]`).
    pub url: String,
    pub answer: tokio::sync::oneshot::Sender<Result<Arc<murmur_firehose::Metrics>, String>>,
}

/// The hosts `com.atproto.sync.requestCrawl` may add to a hub at run time (see
/// [`HubBuilder::allow_crawl`](crate::HubBuilder::allow_crawl)). Each pattern is a host
/// (`pds.example.com`: any port), a host and port (`localhost:2583`), a domain's subdomains
/// (`*.example.com`), or `*` (any host: only where every caller is trusted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CrawlPolicy {
    patterns: Vec<String>,
}

impl CrawlPolicy {
    /// A policy allowing the hosts that match any of `patterns`.
    pub fn allow(patterns: impl IntoIterator<Item = impl Into<String>>) -> Self {
        CrawlPolicy {
            patterns: patterns
                .into_iter()
                .map(|p| p.into().to_ascii_lowercase())
                .collect(),
        }
    }

    /// Whether no host may be added.
    pub fn is_closed(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Whether `authority` (`host` or `host:port`, lowercase) may be added.
    pub fn allows(&self, authority: &str) -> bool {
        let host = host_part(authority);
        self.patterns.iter().any(|p| {
            p == "*"
                || p == authority
                || p == host
                || p.strip_prefix("*.").is_some_and(|domain| {
                    host.len() > domain.len() + 1
                        && host.ends_with(domain)
                        && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
                })
        })
    }
}

/// The host of `host[:port]` (an IPv6 literal keeps its brackets).
fn host_part(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .find(']')
            .map_or(authority, |end| &authority[..=end]);
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
}

/// The base URL and authority of the host a `requestCrawl` names: a hostname (`host` or
/// `host:port`, as the spec has it) or, for convenience, a URL with an `http(s)://` or
/// `ws(s)://` scheme and no path. Loopback hosts (`localhost`, `127.0.0.0/8`, `[::1]`) are
/// reached over `http`, every other host over `https` only (its events are not signed all
/// the way: `#identity` and `#account` must not cross a network in the clear). A port that is
/// the scheme's default is dropped, so one host has one spelling.
pub(crate) fn crawl_target(hostname: &str) -> Result<(String, String), String> {
    let given = hostname.trim().trim_end_matches('/');
    let (scheme, authority) = match given.split_once("://") {
        Some(("http" | "ws", rest)) => (Some("http"), rest),
        Some(("https" | "wss", rest)) => (Some("https"), rest),
        Some((other, _)) => return Err(format!("scheme {other:?} is not http(s) or ws(s)")),
        None => (None, given),
    };
    let authority = authority.to_ascii_lowercase();
    let host = host_part(&authority);
    let port = match &authority[host.len()..] {
        "" => None,
        rest => match rest.strip_prefix(':').map(str::parse::<u16>) {
            Some(Ok(port)) if port > 0 => Some(port),
            _ => {
                return Err(format!(
                    "{hostname:?} is not a hostname (host or host:port)"
                ));
            }
        },
    };
    let ip = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .parse::<std::net::IpAddr>()
        .ok();
    let host_ok = match ip {
        Some(std::net::IpAddr::V6(_)) => host.starts_with('['),
        Some(std::net::IpAddr::V4(_)) => true,
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                })
        }
    };
    if !host_ok {
        return Err(format!(
            "{hostname:?} is not a hostname (host or host:port)"
        ));
    }
    let loopback = host == "localhost" || ip.is_some_and(|ip| ip.is_loopback());
    let scheme = match (scheme, loopback) {
        (Some("http"), false) => {
            return Err(format!(
                "{hostname:?}: a host that is not on this machine is crawled over https only"
            ));
        }
        (Some(scheme), _) => scheme,
        (None, true) => "http",
        (None, false) => "https",
    };
    let authority = match port {
        Some(443) if scheme == "https" => host.to_string(),
        Some(80) if scheme == "http" => host.to_string(),
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    Ok((format!("{scheme}://{authority}"), authority))
}

/// Whether two base URLs are the same host (scheme aside, default ports made explicit).
fn same_host(a: &str, b: &str) -> bool {
    let key = |url: &str| {
        let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
        let rest = rest.trim_end_matches('/').to_ascii_lowercase();
        let host = host_part(&rest).to_string();
        let port = match rest[host.len()..].strip_prefix(':') {
            Some(port) => port.to_string(),
            None if matches!(scheme, "http" | "ws") => "80".into(),
            None => "443".into(),
        };
        (host, port)
    };
    key(a) == key(b)
}

/// Most hosts `requestCrawl` may add to one hub.
pub(crate) const MAX_CRAWLED_HOSTS: usize = 1000;

impl Hosts {
    pub(crate) fn new(urls: Vec<String>, metrics: Option<Arc<murmur_firehose::Metrics>>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        let urls: Vec<String> = urls
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
            configured: urls.len(),
            urls: RwLock::new(urls),
            metrics,
            crawled: RwLock::default(),
            http,
            crawl: None,
        }
    }

    /// With `requestCrawl` allowed (by `crawl`'s policy).
    pub(crate) fn with_crawl(mut self, crawl: Option<Crawl>) -> Self {
        self.crawl = crawl;
        self
    }

    /// The hosts' base URLs now.
    pub(crate) fn urls(&self) -> Vec<String> {
        self.urls.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Adds a host (crawled at run time) and its watcher's figures.
    fn add(&self, url: String, metrics: Arc<murmur_firehose::Metrics>) {
        let mut urls = self.urls.write().unwrap_or_else(|e| e.into_inner());
        if !urls.contains(&url) {
            urls.push(url.clone());
        }
        self.crawled
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(url, metrics);
    }

    /// The figures of every watcher: the hub's, then each crawled host's.
    fn all_metrics(&self) -> Vec<Arc<murmur_firehose::Metrics>> {
        let crawled = self.crawled.read().unwrap_or_else(|e| e.into_inner());
        self.metrics
            .iter()
            .cloned()
            .chain(crawled.values().cloned())
            .collect()
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
        ("POST", "/xrpc/com.atproto.sync.requestCrawl") => match &hosts.crawl {
            Some(crawl) => match read_body(&mut tcp, &text).await {
                Ok(body) => request_crawl(hosts, crawl, &body).await,
                Err(reply) => reply,
            },
            None => error(
                501,
                "MethodNotImplemented",
                "this relay crawls the hosts it was started with (its hub allows no \
                 requestCrawl; see murmur hub --allow-crawl)",
            ),
        },
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
        403 => "Forbidden",
        404 => "Not Found",
        413 => "Payload Too Large",
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

/// The largest request body read (a `requestCrawl` input is a hostname).
const MAX_BODY: usize = 4 * 1024;

/// Reads the body the head announces with `Content-Length` (at most [`MAX_BODY`], within 5 s).
async fn read_body(tcp: &mut TcpStream, head: &str) -> Result<Vec<u8>, Reply> {
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .ok_or_else(|| {
            error(
                400,
                "InvalidRequest",
                "a JSON body with Content-Length is required",
            )
        })?;
    if length > MAX_BODY {
        return Err(error(
            413,
            "InvalidRequest",
            &format!("the body is over {MAX_BODY} bytes"),
        ));
    }
    let mut body = vec![0u8; length];
    match tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut body)).await {
        Ok(Ok(_)) => Ok(body),
        _ => Err(error(400, "InvalidRequest", "the body did not arrive")),
    }
}

/// `requestCrawl`: checks the host against the policy and that it answers as a PDS
/// (`describeServer`), then has the hub watch it; answers once it is watched.
async fn request_crawl(hosts: &Hosts, crawl: &Crawl, body: &[u8]) -> Reply {
    let hostname = match serde_json::from_slice::<Value>(body) {
        Ok(input) => match input["hostname"].as_str() {
            Some(h) => h.to_string(),
            None => return error(400, "InvalidRequest", "hostname (a string) is required"),
        },
        Err(e) => return error(400, "InvalidRequest", &format!("the body is not JSON: {e}")),
    };
    let (url, authority) = match crawl_target(&hostname) {
        Ok(target) => target,
        Err(why) => return error(400, "InvalidRequest", &why),
    };
    if !crawl.policy.allows(&authority) {
        return error(
            403,
            "HostNotAllowed",
            &format!("{authority} is not a host this relay may crawl"),
        );
    }
    // A host the hub started with is watched already; a crawled one is checked by the hub
    // (its watcher may have stopped, and is then started again).
    let known = hosts.urls();
    if known[..hosts.configured.min(known.len())]
        .iter()
        .any(|u| same_host(u, &url))
    {
        return Reply::Json(200, json!({}));
    }
    let url = known
        .iter()
        .find(|u| same_host(u, &url))
        .cloned()
        .unwrap_or(url);
    if known.len() >= MAX_CRAWLED_HOSTS {
        return error(
            400,
            "InvalidRequest",
            &format!("this relay watches {} hosts, its most", known.len()),
        );
    }
    let describe = format!("{url}/xrpc/com.atproto.server.describeServer");
    let asked = hosts
        .http
        .get(&describe)
        .timeout(Duration::from_secs(5))
        .send();
    let is_pds = match asked.await {
        Ok(r) if r.status().is_success() && r.content_length().is_none_or(|n| n <= 64 * 1024) => r
            .bytes()
            .await
            .ok()
            .filter(|b| b.len() <= 64 * 1024)
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|v| v["did"].as_str().is_some()),
        _ => false,
    };
    if !is_pds {
        return error(
            400,
            "InvalidRequest",
            &format!("{url} does not answer com.atproto.server.describeServer as a PDS"),
        );
    }
    let (answer, answered) = tokio::sync::oneshot::channel();
    let request = CrawlRequest {
        url: url.clone(),
        answer,
    };
    if crawl.requests.send(request).await.is_err() {
        return error(503, "Unavailable", "the hub is stopping");
    }
    match tokio::time::timeout(Duration::from_secs(30), answered).await {
        Ok(Ok(Ok(metrics))) => {
            hosts.add(url, metrics);
            Reply::Json(200, json!({}))
        }
        Ok(Ok(Err(why))) => error(400, "InvalidRequest", &why),
        _ => error(
            503,
            "Unavailable",
            "the hub did not start watching the host in time",
        ),
    }
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
    let sources: Vec<_> = hosts
        .all_metrics()
        .iter()
        .flat_map(|m| m.sources())
        .collect();
    let list: Vec<Value> = hosts
        .urls()
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
    let urls = hosts.urls();
    let mut repos = Vec::new();
    while index < urls.len() && repos.len() < limit as usize {
        let url = format!("{}/xrpc/com.atproto.sync.listRepos", urls[index]);
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
                    &format!("{} answered {}", urls[index], r.status()),
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
    if index < urls.len() {
        body["cursor"] = json!(format!("{index}:{host_cursor}"));
    }
    Reply::Json(200, body)
}

/// The host that has `did` and its `getRepoStatus` answer.
async fn host_of(hosts: &Hosts, did: &str) -> Option<(String, Value)> {
    for host in hosts.urls() {
        let url = format!("{host}/xrpc/com.atproto.sync.getRepoStatus");
        let Ok(r) = hosts.http.get(&url).query(&[("did", did)]).send().await else {
            continue;
        };
        if r.status().is_success()
            && let Ok(status) = r.json::<Value>().await
        {
            return Some((host, status));
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
            hosts.urls(),
            ["http://localhost:2583", "http://h:1", "https://pds.example"]
        );
    }

    #[test]
    fn crawl_targets_are_hostnames() {
        let target = |h: &str| crawl_target(h).map(|(url, _)| url);
        assert_eq!(
            target("pds.example.com"),
            Ok("https://pds.example.com".into())
        );
        assert_eq!(
            target("PDS.Example.com:8443"),
            Ok("https://pds.example.com:8443".into())
        );
        assert_eq!(target("localhost:2583"), Ok("http://localhost:2583".into()));
        assert_eq!(target("127.0.0.1:2583"), Ok("http://127.0.0.1:2583".into()));
        assert_eq!(target("[::1]:2583"), Ok("http://[::1]:2583".into()));
        assert_eq!(
            target("pds.example.com:443"),
            Ok("https://pds.example.com".into())
        );
        assert_eq!(target("ws://localhost:1/"), Ok("http://localhost:1".into()));
        assert_eq!(target("wss://h.example"), Ok("https://h.example".into()));
        // Not on this machine: https only, whatever the name looks like.
        assert!(target("http://h.example").is_err());
        assert!(target("ws://127.0.0.1.example.com").is_err());
        assert_eq!(
            target("127.0.0.1.example.com"),
            Ok("https://127.0.0.1.example.com".into())
        );
        assert!(same_host("http://localhost:80", "http://localhost"));
        assert!(same_host("https://h.example", "http://h.example:443"));
        assert!(!same_host("https://h.example", "https://h.example:8443"));
        for bad in [
            "",
            "ftp://h",
            "h/xrpc",
            "https://h/path",
            "h:0",
            "h:99999",
            "-h.example",
            "h..example",
            "user@h",
            "h example",
            "[zz]:1",
            "[::1]@evil.example",
            "[::1]x",
            "::1",
            "[::1]@evil.example",
            "[::1]x",
            "::1",
        ] {
            assert!(crawl_target(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_crawl_policy_matches_hosts() {
        let policy = CrawlPolicy::allow(["*.Example.com", "localhost:2583", "pds.internal"]);
        assert!(policy.allows("a.example.com"));
        assert!(policy.allows("a.b.example.com:443"));
        assert!(!policy.allows("example.com"));
        assert!(!policy.allows("badexample.com"));
        assert!(policy.allows("localhost:2583"));
        assert!(!policy.allows("localhost:2584"));
        assert!(policy.allows("pds.internal"));
        assert!(policy.allows("pds.internal:8080"));
        assert!(!policy.allows("pds.internal.evil"));
        assert!(CrawlPolicy::allow(["*"]).allows("anything:1"));
        assert!(CrawlPolicy::default().is_closed());
        assert!(!CrawlPolicy::default().allows("localhost"));
    }
}
