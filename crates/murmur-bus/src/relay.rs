//! The hub's relay: `com.atproto.sync.subscribeRepos` served from the frame stream, for
//! private networks.
//!
//! The hub stores the original frame of every event it verified (`#commit` with the signed
//! commit and its CAR slice as the PDS sent them, `#identity`, `#account`) in the frame stream
//! ([`StreamSettings::frame_stream`]), in order per DID. The relay reads that stream with one
//! ordered consumer per connection and sends each frame with `seq` set to the frame stream's
//! sequence (the `seq` is not signed; nothing else in the frame changes), so one merged stream
//! over all the hub's PDS hosts has one numbering, and a consumer's cursor is a stream
//! sequence.
//!
//! `#sync` events and commits without ops (a new account's first commit) are verified and
//! relayed like the others. Not relayed: frames larger than a NATS message (the server's
//! `max_payload`, 1 MB by default). A verifying consumer that already follows such a repo sees
//! its next commit break the chain (murmur's watcher reports the gap and resyncs the repo);
//! one that does not yet takes the next commit as the chain's start.
//!
//! Cursor semantics (the atproto event-stream spec):
//! - no cursor: live events only;
//! - a cursor inside the window: every event after it, then live;
//! - a cursor older than the window: an `#info` frame `OutdatedCursor`, then every event
//!   from the oldest kept;
//! - a cursor ahead of the stream: the error frame `FutureCursor`, and the connection closes.
//!
//! The same address answers the relay's other sync endpoints: `listHosts` (the hub's hosts,
//! with the last seq read from each), `listRepos` (every host's repos, one host after the
//! other) and `getRepoStatus` from the hosts; `getRepo` and `getRecord` redirect (HTTP 302)
//! to the host that has the repo; `requestCrawl` adds a PDS host the hub's crawl policy
//! allows ([`HubBuilder::allow_crawl`](crate::HubBuilder::allow_crawl)), and is refused with
//! `MethodNotImplemented` when it allows none.
//!
//! Slow consumers: frames are read from the stream only as fast as the consumer's socket takes
//! them, so a consumer costs the same memory however far behind it is. A consumer whose socket
//! takes no frame for [`RelayConfig::write_timeout`], or that fell more than
//! [`RelayConfig::max_lag`] events behind the head after it had caught up, gets the error
//! frame `ConsumerTooSlow` and is disconnected.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, http};
use tracing::{debug, info, warn};

use crate::BusError;
use crate::stream::StreamSettings;
use crate::subject::Subjects;

/// Frames one consumer's ordered consumer pulls ahead of its socket.
const RELAY_PULL_BATCH: i64 = 32;

/// The path the relay serves the event stream on.
pub const SUBSCRIBE_REPOS_PATH: &str = "/xrpc/com.atproto.sync.subscribeRepos";

/// How the relay treats its consumers.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// How long one frame may wait for a consumer's socket before the consumer is dropped
    /// with `ConsumerTooSlow` (default 10 s).
    pub write_timeout: Duration,
    /// How many events a consumer that has caught up may fall behind the stream's head before
    /// it is dropped with `ConsumerTooSlow` (default 100,000). A consumer replaying from an
    /// old cursor is not held to it until it has caught up.
    pub max_lag: u64,
    /// Most consumers at once; a connection beyond it is refused with HTTP 503 (default 1024).
    pub max_consumers: usize,
    /// The kernel send buffer of each consumer's socket, in bytes (`SO_SNDBUF`; default: the
    /// system's). With the one frame in flight, this bounds what a stalled consumer holds.
    pub send_buffer: Option<u32>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            write_timeout: Duration::from_secs(10),
            max_lag: 100_000,
            max_consumers: 1024,
            send_buffer: None,
        }
    }
}

/// What the relay has done so far.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Consumers connected now.
    pub consumers: AtomicU64,
    /// Frames sent, over all consumers.
    pub frames_sent: AtomicU64,
    /// Consumers dropped with `ConsumerTooSlow`.
    pub too_slow: AtomicU64,
    /// Consumers refused with `FutureCursor`.
    pub future_cursors: AtomicU64,
    /// Consumers told `OutdatedCursor`.
    pub outdated_cursors: AtomicU64,
}

/// `com.atproto.sync.subscribeRepos` over the frame stream (see the [module docs](self)).
/// [`Hub`](crate::Hub) runs one when built with
/// [`serve_relay`](crate::HubBuilder::serve_relay); [`Relay::bind`] runs one on its own, on a
/// frame stream a hub writes.
pub struct Relay {
    listener: TcpListener,
    shared: Arc<Shared>,
}

struct Shared {
    js: jetstream::Context,
    hosts: crate::relay_http::Hosts,
    stream: String,
    filter: String,
    config: RelayConfig,
    stats: Arc<RelayStats>,
    /// Connections not yet known to be consumers (their request head is awaited) and plain
    /// HTTP requests being answered: bounded, so a flood of idle or XRPC connections cannot
    /// grow memory or fan out fetches to the hosts without limit.
    unsorted: tokio::sync::Semaphore,
}

/// Connections at once whose request head is awaited or whose plain HTTP request is served.
const MAX_UNSORTED_CONNECTIONS: usize = 256;

impl Relay {
    /// Listens on `addr` and serves the frame stream of the bus `settings` describes (which
    /// must exist: a hub with a relay creates it).
    pub async fn bind(
        addr: SocketAddr,
        js: jetstream::Context,
        settings: &StreamSettings,
        config: RelayConfig,
    ) -> Result<Relay, BusError> {
        let subjects = settings.subjects()?;
        let hosts = crate::relay_http::Hosts::new(Vec::new(), None);
        Self::bind_with(addr, js, settings, &subjects, config, hosts).await
    }

    /// The PDS hosts whose repos the frame stream carries (`http(s)://host` or their
    /// `subscribeRepos` URLs): `listHosts`, `listRepos` and `getRepoStatus` answer from them,
    /// `getRepo` and `getRecord` redirect to them. A hub's relay has its hub's hosts.
    pub fn with_hosts(mut self, hosts: Vec<String>) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.hosts = crate::relay_http::Hosts::new(hosts, None);
        }
        self
    }

    pub(crate) async fn bind_with(
        addr: SocketAddr,
        js: jetstream::Context,
        settings: &StreamSettings,
        subjects: &Subjects,
        config: RelayConfig,
        hosts: crate::relay_http::Hosts,
    ) -> Result<Relay, BusError> {
        let stream = settings.frame_stream();
        js.get_stream(&stream)
            .await
            .map_err(|e| BusError::js(format!("get stream {stream}"), e))?;
        let listen_error = |e: std::io::Error| BusError::Listen {
            addr: addr.to_string(),
            reason: e.to_string(),
        };
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(listen_error)?;
        socket.set_reuseaddr(true).map_err(listen_error)?;
        if let Some(size) = config.send_buffer {
            // Accepted sockets inherit it.
            socket.set_send_buffer_size(size).map_err(listen_error)?;
        }
        socket.bind(addr).map_err(listen_error)?;
        let listener = socket.listen(1024).map_err(listen_error)?;
        Ok(Relay {
            listener,
            shared: Arc::new(Shared {
                js,
                hosts,
                stream,
                filter: subjects.frames_all(),
                config,
                stats: Arc::default(),
                unsorted: tokio::sync::Semaphore::new(MAX_UNSORTED_CONNECTIONS),
            }),
        })
    }

    /// The address the relay listens on (the port chosen when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Counters of what the relay did.
    pub fn stats(&self) -> Arc<RelayStats> {
        Arc::clone(&self.shared.stats)
    }

    /// Serves consumers until the future is dropped (which closes every connection).
    pub async fn run(self) {
        info!(addr = %self.local_addr(), stream = %self.shared.stream, "relay listening");
        let shared = self.shared;
        accept_loop(&self.listener, "relay", |tcp, peer| {
            serve(Arc::clone(&shared), tcp, peer)
        })
        .await
    }
}

/// Accepts connections on `listener` and serves each on a task of its own with `serve`, until
/// the future is dropped (which drops every connection's task). `what` names the server in
/// logs.
pub(crate) async fn accept_loop<F, Fut>(listener: &TcpListener, what: &'static str, serve: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    connections.spawn(serve(tcp, peer));
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, go on.
                    warn!(error = %e, "{what}: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Where a connection starts reading the frame stream.
#[derive(Debug, PartialEq, Eq)]
enum Start {
    /// New events only.
    Live,
    /// From this stream sequence.
    From(u64),
    /// The cursor is older than the window: `OutdatedCursor`, then from the oldest.
    Outdated,
    /// The cursor is ahead of the stream.
    Future { last: u64 },
}

/// Applies the spec's cursor semantics to a stream whose kept sequences are `first..=last`
/// (`first > last` when it keeps none).
fn start_for(cursor: Option<i64>, first: u64, last: u64) -> Start {
    let Some(cursor) = cursor else {
        return Start::Live;
    };
    let cursor = u64::try_from(cursor).unwrap_or(0);
    if cursor > last {
        Start::Future { last }
    } else if cursor + 1 < first {
        Start::Outdated
    } else {
        Start::From(cursor + 1)
    }
}

/// Reads `cursor` from a query string; a clear message when it is not an integer.
fn cursor_of(query: Option<&str>) -> Result<Option<i64>, String> {
    let Some(query) = query else { return Ok(None) };
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == "cursor" {
            return value
                .parse::<i64>()
                .map(Some)
                .map_err(|_| format!("cursor must be an integer, not {value:?}"));
        }
    }
    Ok(None)
}

/// An XRPC error answer (`{"error", "message"}`) to a handshake.
pub(crate) fn http_error(status: u16, error: &str, message: &str) -> ErrorResponse {
    let body = format!(
        "{{\"error\":{},\"message\":{}}}",
        json_string(error),
        json_string(message)
    );
    let mut response = http::Response::new(Some(body));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Decrements the consumer count when a connection ends.
struct Connected(Arc<RelayStats>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.consumers.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("murmur_relay_consumers").decrement(1.0);
    }
}

/// One connection: a plain XRPC request (see `relay_http`), or a consumer of the event
/// stream: handshake, cursor, then frames until it leaves or is dropped.
async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let Ok(unsorted) = shared.unsorted.try_acquire() else {
        debug!(%peer, "relay: too many connections awaiting their request; closed");
        return;
    };
    let Some(head) = crate::relay_http::peek_head(&tcp).await else {
        return;
    };
    if !crate::relay_http::is_upgrade(&head) {
        crate::relay_http::serve(&shared.hosts, tcp, head).await;
        return;
    }
    // A consumer: from here `max_consumers` bounds it.
    drop(unsorted);
    let stats = &shared.stats;
    let mut cursor = None;
    // Counted before the handshake, so handshakes at once cannot all get past the limit.
    let full =
        stats.consumers.fetch_add(1, Ordering::Relaxed) >= shared.config.max_consumers as u64;
    metrics::gauge!("murmur_relay_consumers").increment(1.0);
    let _connected = Connected(Arc::clone(stats));
    // The handshake callback's error type is tungstenite's (an HTTP response), large or not.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| {
        if request.uri().path() != SUBSCRIBE_REPOS_PATH {
            return Err(http_error(
                404,
                "MethodNotImplemented",
                "this relay serves com.atproto.sync.subscribeRepos",
            ));
        }
        if full {
            return Err(http_error(503, "Unavailable", "too many consumers"));
        }
        match cursor_of(request.uri().query()) {
            Ok(c) => {
                cursor = c;
                Ok(response)
            }
            Err(message) => Err(http_error(400, "InvalidRequest", &message)),
        }
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(64 * 1024))
        .max_frame_size(Some(64 * 1024));
    let socket =
        match tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(config)).await {
            Ok(socket) => socket,
            Err(e) => {
                debug!(%peer, error = %e, "relay: handshake failed");
                return;
            }
        };
    let (mut sink, mut incoming) = socket.split();
    let closing = |error: &str, message: &str| {
        Message::Binary(murmur_sync::error_frame(error, message).into())
    };

    let stream = match shared.js.get_stream(&shared.stream).await {
        Ok(stream) => stream,
        Err(e) => {
            warn!(%peer, error = %e, "relay: frame stream unavailable");
            let _ = sink
                .send(closing(
                    "InternalServerError",
                    "the relay's stream is unavailable",
                ))
                .await;
            return;
        }
    };
    let state = match stream.get_info().await {
        Ok(info) => info.state,
        Err(e) => {
            warn!(%peer, error = %e, "relay: frame stream info unavailable");
            let _ = sink
                .send(closing(
                    "InternalServerError",
                    "the relay's stream is unavailable",
                ))
                .await;
            return;
        }
    };
    let deliver_policy = match start_for(cursor, state.first_sequence, state.last_sequence) {
        Start::Live => DeliverPolicy::New,
        Start::From(seq) => DeliverPolicy::ByStartSequence {
            start_sequence: seq,
        },
        Start::Outdated => {
            stats.outdated_cursors.fetch_add(1, Ordering::Relaxed);
            let info = murmur_sync::info_frame(
                "OutdatedCursor",
                &format!(
                    "cursor {} is older than the oldest event kept ({}); replaying from it",
                    cursor.unwrap_or_default(),
                    state.first_sequence
                ),
            );
            if sink.send(Message::Binary(info.into())).await.is_err() {
                return;
            }
            DeliverPolicy::All
        }
        Start::Future { last } => {
            stats.future_cursors.fetch_add(1, Ordering::Relaxed);
            let message = format!(
                "cursor {} is ahead of the stream (last seq {last})",
                cursor.unwrap_or_default()
            );
            let _ = sink.send(closing("FutureCursor", &message)).await;
            let _ = sink.send(Message::Close(None)).await;
            return;
        }
    };
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: shared.filter.clone(),
            deliver_policy,
            // The client pulls this many frames ahead of the socket (500 by default): a
            // small batch bounds what one consumer holds, whatever the frames' size.
            max_batch: RELAY_PULL_BATCH,
            ..Default::default()
        })
        .await;
    let mut messages = match consumer {
        Ok(consumer) => match consumer.messages().await {
            Ok(messages) => messages,
            Err(e) => {
                warn!(%peer, error = %e, "relay: cannot read the frame stream");
                return;
            }
        },
        Err(e) => {
            warn!(%peer, error = %e, "relay: cannot create a consumer");
            return;
        }
    };
    debug!(%peer, ?cursor, "relay: consumer connected");
    // A consumer starting live is caught up from the start; one replaying is once it reads
    // the head.
    let mut caught_up = cursor.is_none();
    loop {
        tokio::select! {
            next = messages.next() => {
                let message = match next {
                    Some(Ok(message)) => message,
                    Some(Err(e)) => {
                        warn!(%peer, error = %e, "relay: frame stream read failed; closing");
                        let _ = sink.send(closing("InternalServerError", "the relay's stream failed")).await;
                        return;
                    }
                    None => return,
                };
                let (seq, pending) = match message.info() {
                    Ok(info) => (info.stream_sequence, info.pending),
                    Err(e) => {
                        warn!(%peer, error = %e, "relay: message without stream info; skipped");
                        continue;
                    }
                };
                if pending == 0 {
                    caught_up = true;
                } else if caught_up && pending > shared.config.max_lag {
                    too_slow(&mut sink, stats, peer, &format!("{pending} events behind the head")).await;
                    return;
                }
                let frame = match murmur_sync::with_seq(&message.payload, seq) {
                    Ok(frame) => frame,
                    Err(e) => {
                        warn!(%peer, seq, error = %e, "relay: stored frame unreadable; skipped");
                        continue;
                    }
                };
                let sent = tokio::time::timeout(
                    shared.config.write_timeout,
                    sink.send(Message::Binary(frame.into())),
                )
                .await;
                match sent {
                    Ok(Ok(())) => {
                        stats.frames_sent.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("murmur_relay_frames_total").increment(1);
                    }
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "relay: consumer gone");
                        return;
                    }
                    Err(_) => {
                        let why = format!("no frame taken for {:?}", shared.config.write_timeout);
                        too_slow(&mut sink, stats, peer, &why).await;
                        return;
                    }
                }
            }
            read = incoming.next() => match read {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => {
                    debug!(%peer, "relay: consumer left");
                    return;
                }
                // Pings are answered by the socket; consumers send nothing else that matters.
                Some(Ok(_)) => {}
            },
        }
    }
}

/// Drops a consumer with the error frame `ConsumerTooSlow` (sent if its socket still takes
/// it within a second).
async fn too_slow<S>(sink: &mut S, stats: &RelayStats, peer: SocketAddr, why: &str)
where
    S: futures_util::Sink<Message> + Unpin,
{
    info!(%peer, why, "relay: consumer too slow; disconnected");
    stats.too_slow.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("murmur_relay_too_slow_total").increment(1);
    let frame = murmur_sync::error_frame("ConsumerTooSlow", why);
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        sink.send(Message::Binary(frame.into())),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_follow_the_event_stream_spec() {
        // Kept: 5..=9.
        assert_eq!(start_for(None, 5, 9), Start::Live);
        assert_eq!(start_for(Some(4), 5, 9), Start::From(5));
        assert_eq!(start_for(Some(7), 5, 9), Start::From(8));
        assert_eq!(start_for(Some(9), 5, 9), Start::From(10));
        assert_eq!(start_for(Some(3), 5, 9), Start::Outdated);
        assert_eq!(start_for(Some(0), 5, 9), Start::Outdated);
        assert_eq!(start_for(Some(10), 5, 9), Start::Future { last: 9 });
        assert_eq!(start_for(Some(-1), 5, 9), Start::Outdated);
        // A new stream keeps nothing: 0 is now, 1 is ahead.
        assert_eq!(start_for(Some(0), 0, 0), Start::From(1));
        assert_eq!(start_for(Some(1), 0, 0), Start::Future { last: 0 });
        // Everything kept was removed (first = last + 1).
        assert_eq!(start_for(Some(9), 10, 9), Start::From(10));
        assert_eq!(start_for(Some(2), 10, 9), Start::Outdated);
    }

    #[test]
    fn cursor_parameter() {
        assert_eq!(cursor_of(None), Ok(None));
        assert_eq!(cursor_of(Some("")), Ok(None));
        assert_eq!(cursor_of(Some("cursor=42")), Ok(Some(42)));
        assert_eq!(cursor_of(Some("x=1&cursor=7")), Ok(Some(7)));
        assert!(cursor_of(Some("cursor=abc")).is_err());
        assert!(cursor_of(Some("cursor=")).is_err());
    }

    #[test]
    fn xrpc_errors_are_json() {
        let response = http_error(400, "InvalidRequest", "a \"quoted\"\nline");
        assert_eq!(response.status(), 400);
        assert_eq!(
            response.body().as_deref(),
            Some(r#"{"error":"InvalidRequest","message":"a \"quoted\"\u000aline"}"#)
        );
    }
}
