//! Where events come from: `com.atproto.sync.subscribeRepos` on a PDS or relay.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::{SinkExt, Stream, StreamExt};
use tokio_tungstenite::tungstenite::{self, Message};

/// One message read from a source.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SourceMessage {
    /// A binary event-stream frame (DAG-CBOR header + body), as subscribeRepos sends; the
    /// decoded event's CAR slice shares this buffer.
    Frame(murmur_sync::Bytes),
}

/// Why a source could not connect or stopped reading.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// HTTP 429: wait before reconnecting.
    #[error("rate limited (HTTP 429); retry after {retry_after:?}")]
    RateLimited {
        /// From `Retry-After` (or `ratelimit-reset`), when the server sent it.
        retry_after: Option<Duration>,
    },
    /// The server does not offer this endpoint (HTTP 501 and friends): retrying will not help.
    #[error("the server refuses the stream (HTTP {status}): {reason}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Response body or reason phrase.
        reason: String,
    },
    /// Transport failure (connect, TLS, reset, protocol error): reconnect with backoff.
    #[error("connection failed: {0}")]
    Transport(String),
    /// Connecting (TCP, TLS and the WebSocket handshake) took longer than the connect timeout.
    #[error("no connection within {0:?} (TCP, TLS and WebSocket handshake)")]
    ConnectTimeout(Duration),
    /// The server sent an error frame (op -1); it closes the stream after one.
    #[error("the server sent the error frame {0}")]
    ErrorFrame(murmur_sync::StreamError),
    /// Nothing arrived within the idle timeout, pings included.
    #[error("no data for {0:?}; the connection looks dead")]
    Idle(Duration),
    /// The server closed the stream.
    #[error("the server closed the stream{}", .0.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Closed(Option<String>),
}

/// A stream of messages from one connection.
pub type MessageStream = Pin<Box<dyn Stream<Item = Result<SourceMessage, SourceError>> + Send>>;

/// A place events come from. The watcher owns reconnects, backoff and cursors; a source only
/// opens one connection at a time, starting after `cursor`.
#[async_trait]
pub trait Source: Send + Sync + 'static {
    /// A stable identifier (its URL): the key of its stored cursor.
    fn url(&self) -> &str;
    /// Opens a connection that delivers events after `cursor` (live-only when `None`).
    async fn connect(&self, cursor: Option<i64>) -> Result<MessageStream, SourceError>;
}

/// `com.atproto.sync.subscribeRepos` over WebSocket, from a PDS or a relay.
///
/// `wss://` (and `https://`) URLs connect over TLS (rustls with the ring provider), trusting
/// the Mozilla root certificates (webpki-roots) unless
/// [`with_tls_config`](Self::with_tls_config) says otherwise.
#[derive(Debug, Clone)]
pub struct SubscribeRepos {
    url: String,
    ping_interval: Duration,
    idle_timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl SubscribeRepos {
    /// A source for the host at `base` (`http(s)://` or `ws(s)://`, with or without the
    /// `/xrpc/...` path).
    pub fn new(base: &str) -> Self {
        let base = base.trim_end_matches('/');
        let base = base
            .strip_suffix("/xrpc/com.atproto.sync.subscribeRepos")
            .unwrap_or(base);
        let ws = if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else {
            base.to_string()
        };
        SubscribeRepos {
            url: format!("{ws}/xrpc/com.atproto.sync.subscribeRepos"),
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            tls: None,
        }
    }

    /// The TLS client configuration for `wss://` URLs: e.g. a root store with a private CA.
    pub fn with_tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Sends a ping this often and treats `idle_timeout` of silence as a dead connection.
    pub fn with_keepalive(mut self, ping_interval: Duration, idle_timeout: Duration) -> Self {
        self.ping_interval = ping_interval;
        self.idle_timeout = idle_timeout;
        self
    }
}

#[async_trait]
impl Source for SubscribeRepos {
    fn url(&self) -> &str {
        &self.url
    }

    async fn connect(&self, cursor: Option<i64>) -> Result<MessageStream, SourceError> {
        let url = match cursor {
            Some(c) => format!("{}?cursor={c}", self.url),
            None => self.url.clone(),
        };
        let connector = match &self.tls {
            Some(config) => Some(Arc::clone(config)),
            None if self.url.starts_with("wss://") => Some(default_tls()?),
            None => None,
        }
        .map(tokio_tungstenite::Connector::Rustls);
        let (socket, _) =
            tokio_tungstenite::connect_async_tls_with_config(url, None, true, connector)
                .await
                .map_err(handshake_error)?;
        let (mut sink, mut read) = socket.split();
        let (ping_interval, idle) = (self.ping_interval, self.idle_timeout);
        let stream = async_stream(move |tx| async move {
            let mut ping = tokio::time::interval(ping_interval);
            ping.tick().await;
            // Moved on by whatever arrives (pongs included), not by our own pings.
            let mut deadline = tokio::time::Instant::now() + idle;
            loop {
                tokio::select! {
                    _ = ping.tick() => {
                        if let Err(e) = sink.send(Message::Ping(Vec::new().into())).await {
                            let _ = tx.send(Err(SourceError::Transport(e.to_string()))).await;
                            return;
                        }
                    }
                    () = tokio::time::sleep_until(deadline) => {
                        let _ = tx.send(Err(SourceError::Idle(idle))).await;
                        return;
                    }
                    next = read.next() => {
                        deadline = tokio::time::Instant::now() + idle;
                        let item = match next {
                            None => Err(SourceError::Closed(None)),
                            Some(Err(e)) => Err(SourceError::Transport(e.to_string())),
                            Some(Ok(Message::Binary(bytes))) => Ok(SourceMessage::Frame(bytes)),
                            Some(Ok(Message::Close(frame))) => {
                                Err(SourceError::Closed(frame.map(|f| f.reason.to_string())))
                            }
                            Some(Ok(_)) => continue,
                        };
                        let stop = item.is_err();
                        if tx.send(item).await.is_err() || stop {
                            return;
                        }
                    }
                }
            }
        });
        Ok(stream)
    }
}

/// TLS with the webpki (Mozilla) roots on the ring provider, chosen explicitly: the process
/// default provider is ambiguous when an application's dependencies enable another one.
pub(crate) fn default_tls() -> Result<Arc<rustls::ClientConfig>, SourceError> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| SourceError::Transport(format!("TLS configuration: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A stream fed by a task through a small channel (the channel's bound keeps reads paced).
fn async_stream<F, Fut>(f: F) -> MessageStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<SourceMessage, SourceError>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let task = tokio::spawn(f(tx));
    let stream =
        futures_util::stream::unfold((rx, AbortOnDrop(task)), |(mut rx, task)| async move {
            rx.recv().await.map(|item| (item, (rx, task)))
        });
    Box::pin(stream)
}

/// Stops the reader task when the stream is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(crate) fn handshake_error(e: tungstenite::Error) -> SourceError {
    match e {
        tungstenite::Error::Http(response) => {
            let status = response.status().as_u16();
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if status == 429 {
                let retry_after = header("retry-after")
                    .map(Duration::from_secs)
                    .or_else(|| header("ratelimit-reset").map(reset_to_delay));
                return SourceError::RateLimited { retry_after };
            }
            let reason = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_else(|| response.status().to_string());
            if matches!(status, 400..=499 | 501) {
                SourceError::Refused { status, reason }
            } else {
                SourceError::Transport(format!("HTTP {status}: {reason}"))
            }
        }
        other => SourceError::Transport(other.to_string()),
    }
}

/// `ratelimit-reset` is a unix time in seconds on atproto servers.
fn reset_to_delay(reset: u64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Duration::from_secs(reset.saturating_sub(now).min(3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_normalise_to_the_subscribe_repos_endpoint() {
        for base in [
            "http://localhost:2583",
            "http://localhost:2583/",
            "ws://localhost:2583",
            "http://localhost:2583/xrpc/com.atproto.sync.subscribeRepos",
        ] {
            assert_eq!(
                SubscribeRepos::new(base).url(),
                "ws://localhost:2583/xrpc/com.atproto.sync.subscribeRepos"
            );
        }
        assert_eq!(
            SubscribeRepos::new("https://bsky.network").url(),
            "wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos"
        );
    }
}
