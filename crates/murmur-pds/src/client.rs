//! The XRPC client behind a writer or a reader: runs one call with auth, a single-flight
//! session refresh and retries, and turns failures into [`Error`]s.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use atrium_api::client::AtpServiceClient;
use atrium_api::com::atproto::{repo, server};
use atrium_api::xrpc::error::XrpcErrorKind;
use murmur_backoff::Backoff;
use serde::Serialize;

use crate::session::{Seen, Session, SessionCell};
use crate::transport::{BodyTooLarge, Call, RateLimit, Transport};
use crate::{Error, Result, Secret, Swap};

/// How the writer authenticates a call.
#[derive(Clone)]
pub(crate) enum Auth {
    None,
    /// The session's access token, refreshed once on expiry.
    Session,
    /// A fixed token (the refresh token, for refreshSession).
    Bearer(Secret),
}

/// Whether a call may be replayed after a failure that may have reached the server.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Replay {
    Idempotent,
    NotIdempotent,
}

/// Why an attempt failed, as the retry loop sees it.
enum Failure {
    Auth {
        error: String,
    },
    Status {
        status: u16,
        error: String,
        message: String,
    },
    Transport {
        message: String,
        sent: bool,
    },
    Protocol(String),
    Redirect(CrossHostRedirect),
    /// A body over the caller's cap ([`Call::get_capped`](crate::transport::Call)).
    TooLarge(usize),
}

/// Sorts an atrium error into a [`Failure`].
fn classify<E: Serialize + fmt::Debug + fmt::Display>(err: atrium_api::xrpc::Error<E>) -> Failure {
    use atrium_api::xrpc::Error as X;
    match err {
        X::Authentication(_) => Failure::Auth {
            error: "AuthenticationRequired".into(),
        },
        X::XrpcResponse(e) => {
            let status = e.status.as_u16();
            let (error, message) = match e.error {
                Some(XrpcErrorKind::Custom(custom)) => {
                    let v = serde_json::to_value(&custom).unwrap_or_default();
                    (
                        v["error"].as_str().unwrap_or_default().to_string(),
                        v["message"].as_str().unwrap_or_default().to_string(),
                    )
                }
                Some(XrpcErrorKind::Undefined(body)) => (
                    body.error.unwrap_or_default(),
                    body.message.unwrap_or_default(),
                ),
                None => (String::new(), String::new()),
            };
            if status == 401 || error == "ExpiredToken" || error == "InvalidToken" {
                Failure::Auth { error }
            } else {
                Failure::Status {
                    status,
                    error,
                    message,
                }
            }
        }
        X::HttpClient(e) => {
            if let Some(refused) = find_source::<CrossHostRedirect>(e.as_ref()) {
                return Failure::Redirect(refused.clone());
            }
            if let Some(over) = find_source::<BodyTooLarge>(e.as_ref()) {
                return Failure::TooLarge(over.limit);
            }
            let sent = match e.downcast_ref::<reqwest::Error>() {
                Some(re) => !re.is_connect(),
                None => true,
            };
            Failure::Transport {
                message: error_chain(e.as_ref()),
                sent,
            }
        }
        other => Failure::Protocol(other.to_string()),
    }
}

/// The first error of type `T` in `e`'s source chain, `e` included.
fn find_source<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(found) = err.downcast_ref::<T>() {
            return Some(found);
        }
        current = err.source();
    }
    None
}

/// Why the default HTTP client stopped at a redirect: it pointed to another origin.
#[derive(Debug, Clone)]
pub(crate) struct CrossHostRedirect {
    from: String,
    to: String,
}

impl fmt::Display for CrossHostRedirect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refused a redirect from {} to {}", self.from, self.to)
    }
}

impl std::error::Error for CrossHostRedirect {}

/// Redirects the default HTTP client follows: up to 10, each to the same origin (scheme,
/// host, port) as the request. Anything else stops the call, so a bearer token or a login
/// body is never replayed to another host.
fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let Some(first) = attempt.previous().first() else {
            return attempt.follow();
        };
        if attempt.url().origin() != first.origin() {
            let refused = CrossHostRedirect {
                from: first.origin().ascii_serialization(),
                to: attempt.url().origin().ascii_serialization(),
            };
            attempt.error(refused)
        } else if attempt.previous().len() > 10 {
            attempt.error("too many redirects")
        } else {
            attempt.follow()
        }
    })
}

/// `e` and its sources, joined with `: `.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// When and how the writer retries.
///
/// Which calls are retried after a failure that may have reached the server (5xx, timeout,
/// connection reset) is decided per call, by idempotency: reads, putRecord and deleteRecord
/// without a swap, and uploadBlob are replayed; createRecord reads its (fixed, TID) key back
/// before sending again, so it never duplicates a record. Calls that never reached the
/// server (connection refused) and 429 answers are retried for every call.
///
/// The waits between attempts come from murmur's one backoff type, `murmur_backoff::Backoff`
/// (the watcher's `murmur_firehose::Backoff`), built from these fields.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts per call, the first included. 1 disables retries.
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles each time, with jitter.
    pub initial_backoff: Duration,
    /// Cap on one backoff.
    pub max_backoff: Duration,
    /// Longest wait the writer accepts from a 429's Retry-After / RateLimit-Reset before
    /// giving up with [`Error::RateLimited`](crate::Error::RateLimited).
    pub max_rate_limit_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            max_rate_limit_wait: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The delays between attempts: retry `n` (0-based) waits a random duration in
    /// `[ceiling/2, ceiling]`, `ceiling = min(initial_backoff * 2^n, max_backoff)`, and there
    /// are `max_attempts - 1` retries.
    pub(crate) fn backoff(&self) -> Backoff {
        Backoff {
            initial: self.initial_backoff,
            max: self.max_backoff,
            factor: 2.0,
            max_attempts: Some(self.max_attempts.saturating_sub(1)),
        }
    }
}

/// The HTTP side of a writer or a reader: transport, retry policy, last rate-limit state.
pub(crate) struct Client {
    transport: Transport,
    policy: RetryPolicy,
    backoff: Backoff,
    rate_limit: Mutex<Option<RateLimit>>,
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl Client {
    /// The HTTP side for the PDS at `pds` (`http://` or `https://`).
    pub(crate) fn new(
        pds: &str,
        policy: RetryPolicy,
        http: Option<reqwest::Client>,
        timeout: Duration,
    ) -> Result<Client> {
        if !pds.starts_with("http://") && !pds.starts_with("https://") {
            return Err(Error::InvalidArgument {
                what: "PDS URL",
                message: format!("{pds:?} must start with http:// or https://"),
            });
        }
        let http = match http {
            Some(c) => c,
            None => reqwest::Client::builder()
                .use_rustls_tls()
                .redirect(same_origin_redirects())
                .timeout(timeout)
                .user_agent(concat!("murmur-pds/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| Error::InvalidArgument {
                    what: "HTTP client",
                    message: e.to_string(),
                })?,
        };
        Ok(Client {
            transport: Transport::new(pds, http),
            backoff: policy.backoff(),
            policy,
            rate_limit: Mutex::new(None),
        })
    }

    pub(crate) fn base(&self) -> &str {
        self.transport.base()
    }

    pub(crate) fn requests(&self) -> u64 {
        self.transport.requests()
    }

    /// The delays between attempts of a call, from the retry policy.
    pub(crate) fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// The RateLimit-* headers of the latest response that carried them.
    pub(crate) fn rate_limit(&self) -> Option<RateLimit> {
        self.rate_limit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs one XRPC call built by `f`, with auth, refresh and retries.
    pub(crate) async fn xrpc<O, E, F, Fut>(
        &self,
        session: Option<&SessionCell>,
        nsid: &'static str,
        auth: Auth,
        replay: Replay,
        f: F,
    ) -> Result<O>
    where
        F: Fn(Call) -> Fut,
        Fut: Future<Output = atrium_api::xrpc::Result<O, E>>,
        E: Serialize + fmt::Debug + fmt::Display,
    {
        let policy = &self.policy;
        let mut attempt = 0u32;
        let mut refreshed = false;
        loop {
            attempt += 1;
            let (token, seen) = match (&auth, session) {
                (Auth::None, _) => (None, None),
                (Auth::Bearer(t), _) => (Some(t.expose().to_string()), None),
                (Auth::Session, Some(cell)) => {
                    let t = cell.tokens();
                    (
                        Some(t.access),
                        Some(Seen {
                            generation: t.generation,
                            refresh_attempts: t.refresh_attempts,
                        }),
                    )
                }
                (Auth::Session, None) => (None, None),
            };
            let call = self.transport.call(token);
            let result = f(call.clone()).await;
            let meta = call.meta().unwrap_or_default();
            if let Some(limit) = &meta.rate_limit {
                *self.rate_limit.lock().unwrap_or_else(|p| p.into_inner()) = Some(limit.clone());
            }
            let failure = match result {
                Ok(out) => return Ok(out),
                Err(e) => classify(e),
            };
            let retry_in = |wait: Duration| {
                tracing::debug!(nsid, attempt, ?wait, "retrying");
                tokio::time::sleep(wait)
            };
            // The wait before the next attempt; `None` once the attempts are used up.
            let backoff = self.backoff.delay(attempt - 1);
            match failure {
                Failure::Auth { error } => match (&auth, session, seen) {
                    (Auth::Session, Some(cell), Some(seen)) if !refreshed => {
                        refreshed = true;
                        attempt -= 1;
                        cell.refresh_once(seen, |refresh_token| {
                            self.refresh_session(Secret::new(refresh_token))
                        })
                        .await?;
                    }
                    (Auth::None, _, _) => {
                        return Err(Error::Xrpc {
                            nsid,
                            status: meta.status,
                            error,
                            message: String::new(),
                        });
                    }
                    _ => return Err(Error::SessionExpired { error }),
                },
                Failure::Status { status: 429, .. } => {
                    let hint = meta.wait_hint(SystemTime::now());
                    let wait = backoff
                        .map(|b| hint.unwrap_or(b))
                        .filter(|w| *w <= policy.max_rate_limit_wait);
                    if let Some(wait) = wait {
                        tracing::info!(nsid, ?wait, "rate limited by the PDS; waiting");
                        retry_in(wait).await;
                    } else {
                        return Err(Error::RateLimited {
                            retry_after: hint,
                            limit: meta.rate_limit,
                        });
                    }
                }
                Failure::Transport { message, sent } => {
                    let may_retry = !sent || replay == Replay::Idempotent;
                    if let Some(wait) = backoff.filter(|_| may_retry) {
                        tracing::debug!(nsid, %message, sent, "transport failure");
                        retry_in(wait).await;
                    } else {
                        return Err(Error::Unreachable {
                            url: self.transport.base().to_string(),
                            message,
                            attempts: attempt,
                            sent,
                        });
                    }
                }
                Failure::Status {
                    status,
                    error,
                    message,
                } => {
                    let transient = matches!(status, 500 | 502 | 503 | 504);
                    let may_retry = transient && (replay == Replay::Idempotent || status == 503);
                    if let Some(wait) = backoff.filter(|_| may_retry) {
                        tracing::debug!(nsid, status, %error, "transient server error");
                        retry_in(wait).await;
                        continue;
                    }
                    return Err(status_error(nsid, status, error, message));
                }
                Failure::Protocol(message) => return Err(Error::Protocol { nsid, message }),
                Failure::Redirect(CrossHostRedirect { from, to }) => {
                    return Err(Error::RedirectRefused { from, to });
                }
                Failure::TooLarge(limit) => {
                    return Err(Error::ResponseTooLarge { nsid, limit });
                }
            }
        }
    }

    fn refresh_session(&self, refresh_token: Secret) -> BoxFuture<'_, Result<Session>> {
        Box::pin(async move {
            let out = self
                .xrpc(
                    None,
                    server::refresh_session::NSID,
                    Auth::Bearer(refresh_token),
                    Replay::NotIdempotent,
                    |call| async move {
                        AtpServiceClient::new(call)
                            .service
                            .com
                            .atproto
                            .server
                            .refresh_session()
                            .await
                    },
                )
                .await
                .map_err(|e| match e {
                    Error::Xrpc { error, status, .. } if status == 400 || status == 401 => {
                        Error::SessionExpired { error }
                    }
                    other => other,
                })?;
            Ok(Session {
                did: out.did.to_string(),
                handle: out.handle.to_string(),
                pds: self.transport.base().to_string(),
                access_jwt: Secret::new(out.data.access_jwt),
                refresh_jwt: Secret::new(out.data.refresh_jwt),
            })
        })
    }
}

/// The error of a call the PDS refused: a swap conflict, or the XRPC error as it came.
fn status_error(nsid: &'static str, status: u16, error: String, message: String) -> Error {
    if error == "InvalidSwap" {
        let swap = if nsid == repo::apply_writes::NSID || message.starts_with("Commit") {
            Swap::Commit
        } else {
            Swap::Record
        };
        return Error::Conflict { swap, message };
    }
    Error::Xrpc {
        nsid,
        status,
        error,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_stops_after_max_attempts() {
        let p = RetryPolicy::default();
        let backoff = p.backoff();
        let first = backoff.delay(0).unwrap();
        assert!(first >= p.initial_backoff / 2 && first <= p.initial_backoff);
        for retry in 0..p.max_attempts - 1 {
            let d = backoff.delay(retry).unwrap();
            assert!(d <= p.max_backoff, "{d:?}");
        }
        assert_eq!(
            backoff.delay(p.max_attempts - 1),
            None,
            "4 attempts, 3 retries"
        );
        let capped = RetryPolicy {
            max_attempts: 20,
            ..p.clone()
        };
        for retry in 0..19 {
            let d = capped.backoff().delay(retry).unwrap();
            assert!(d <= p.max_backoff, "{d:?}");
        }
        assert_eq!(RetryPolicy::none().backoff().delay(0), None);
    }
}
