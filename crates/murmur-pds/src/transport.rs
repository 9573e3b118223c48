//! One XRPC call on the wire: atrium's typed client over atrium-xrpc-client's reqwest
//! client, with our bearer token, a request counter, and the response headers kept for
//! rate-limit handling (atrium drops them).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use atrium_api::xrpc::http::{Request, Response};
use atrium_api::xrpc::types::AuthorizationToken;
use atrium_api::xrpc::{HttpClient, XrpcClient};
use atrium_xrpc_client::reqwest::ReqwestClient;

/// The RateLimit-* headers of a PDS response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RateLimit {
    /// `RateLimit-Limit`: requests allowed in the window.
    pub limit: Option<u64>,
    /// `RateLimit-Remaining`: requests left in the window.
    pub remaining: Option<u64>,
    /// `RateLimit-Reset`: when the window resets.
    pub reset: Option<SystemTime>,
    /// `RateLimit-Policy`, e.g. `3000;w=300`.
    pub policy: Option<String>,
}

/// What we keep of a response besides its body.
#[derive(Debug, Clone, Default)]
pub(crate) struct ResponseMeta {
    pub status: u16,
    pub rate_limit: Option<RateLimit>,
    pub retry_after: Option<Duration>,
}

impl ResponseMeta {
    pub(crate) fn from_response<B>(response: &Response<B>, now: SystemTime) -> ResponseMeta {
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        let num = |name: &str| header(name).and_then(|v| v.parse::<u64>().ok());
        let reset = num("ratelimit-reset").map(|v| {
            // atproto's PDS sends epoch seconds; the IETF draft sends delta seconds.
            if v > 1_000_000_000 {
                UNIX_EPOCH + Duration::from_secs(v)
            } else {
                now + Duration::from_secs(v)
            }
        });
        let rate_limit = RateLimit {
            limit: num("ratelimit-limit"),
            remaining: num("ratelimit-remaining"),
            reset,
            policy: header("ratelimit-policy").map(str::to_string),
        };
        let rate_limit = (rate_limit != RateLimit::default()).then_some(rate_limit);
        let retry_after = header("retry-after").and_then(|v| parse_retry_after(v, now));
        ResponseMeta {
            status: response.status().as_u16(),
            rate_limit,
            retry_after,
        }
    }

    /// How long the server asked us to wait: Retry-After, else RateLimit-Reset.
    pub(crate) fn wait_hint(&self, now: SystemTime) -> Option<Duration> {
        self.retry_after.or_else(|| {
            self.rate_limit
                .as_ref()
                .and_then(|l| l.reset)
                .map(|reset| reset.duration_since(now).unwrap_or(Duration::ZERO))
        })
    }
}

/// Retry-After is either delta seconds or an HTTP-date (IMF-fixdate).
pub(crate) fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = parse_http_date(v)?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Parses `Sun, 06 Nov 1994 08:49:37 GMT`.
fn parse_http_date(v: &str) -> Option<SystemTime> {
    let rest = v.split_once(", ")?.1;
    let mut parts = rest.split(' ');
    let day: u64 = parts.next()?.parse().ok()?;
    let month = match parts.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':');
    let (h, m, s): (u64, u64, u64) = (
        hms.next()?.parse().ok()?,
        hms.next()?.parse().ok()?,
        hms.next()?.parse().ok()?,
    );
    if parts.next()? != "GMT" || day == 0 || day > 31 || h > 23 || m > 59 || s > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days).ok()? * 86_400 + h * 3600 + m * 60 + s;
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

/// The HTTP side shared by every call of one writer.
#[derive(Clone)]
pub(crate) struct Transport {
    client: ReqwestClient,
    /// The same HTTP client, for the bodies read with a cap ([`Call::get_capped`]).
    http: reqwest::Client,
    base: Arc<str>,
    requests: Arc<AtomicU64>,
}

impl Transport {
    pub(crate) fn new(base: &str, http: reqwest::Client) -> Transport {
        let base = base.trim_end_matches('/');
        Transport {
            client: atrium_xrpc_client::reqwest::ReqwestClientBuilder::new(base)
                .client(http.clone())
                .build(),
            http,
            base: base.into(),
            requests: Arc::new(AtomicU64::new(0)),
        }
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// A client for one call, carrying `token` and recording the response's headers.
    pub(crate) fn call(&self, token: Option<String>) -> Call {
        Call {
            client: self.client.clone(),
            http: self.http.clone(),
            token,
            meta: Arc::new(Mutex::new(None)),
            requests: self.requests.clone(),
        }
    }
}

/// The XRPC client of one call. Its Debug never shows the token.
#[derive(Clone)]
pub(crate) struct Call {
    client: ReqwestClient,
    http: reqwest::Client,
    token: Option<String>,
    pub(crate) meta: Arc<Mutex<Option<ResponseMeta>>>,
    requests: Arc<AtomicU64>,
}

/// Error bodies are short JSON; more than this is not read.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// A response body over the caller's cap: the call stops reading it.
#[derive(Debug, Clone)]
pub(crate) struct BodyTooLarge {
    pub(crate) limit: usize,
}

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the response body is over {} bytes", self.limit)
    }
}

impl std::error::Error for BodyTooLarge {}

impl Call {
    pub(crate) fn meta(&self) -> Option<ResponseMeta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// GETs the query `nsid` with `params` (name, value) and returns its body, reading at
    /// most `max` bytes of it: a larger body (announced or streamed) fails with
    /// [`BodyTooLarge`] before it is all in memory. Errors come as atrium's, so the retry loop
    /// sorts them as for any call. (atrium's own calls read the whole body, whatever its
    /// size, and parse a JSON-typed one: a blob's bytes must come back as they are.)
    pub(crate) async fn get_capped<E: serde::de::DeserializeOwned + std::fmt::Debug>(
        &self,
        nsid: &str,
        params: &[(&str, &str)],
        max: usize,
    ) -> atrium_api::xrpc::Result<Vec<u8>, E> {
        use atrium_api::xrpc::Error as X;
        use atrium_api::xrpc::error::{XrpcError, XrpcErrorKind};
        let http_error = |e: Box<dyn std::error::Error + Send + Sync>| X::HttpClient(e);
        let url = format!("{}/xrpc/{nsid}", self.client.base_uri());
        let mut request = self.http.get(&url).query(params);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(%nsid, "xrpc request (capped body)");
        let mut response = request.send().await.map_err(|e| http_error(e.into()))?;
        let status = response.status();
        {
            let mut head = Response::builder().status(status.as_u16());
            for (k, v) in response.headers() {
                head = head.header(k.as_str(), v.as_bytes());
            }
            if let Ok(head) = head.body(()) {
                let meta = ResponseMeta::from_response(&head, SystemTime::now());
                *self.meta.lock().unwrap_or_else(|p| p.into_inner()) = Some(meta);
            }
        }
        let cap = if status.is_success() {
            max
        } else {
            MAX_ERROR_BODY
        };
        if response.content_length().is_some_and(|n| n > cap as u64) && status.is_success() {
            return Err(http_error(Box::new(BodyTooLarge { limit: cap })));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| http_error(e.into()))? {
            if body.len() + chunk.len() > cap {
                if !status.is_success() {
                    break;
                }
                return Err(http_error(Box::new(BodyTooLarge { limit: cap })));
            }
            body.extend_from_slice(&chunk);
        }
        if status.is_success() {
            return Ok(body);
        }
        Err(X::XrpcResponse(XrpcError {
            status: atrium_api::xrpc::http::StatusCode::from_u16(status.as_u16())
                .unwrap_or(atrium_api::xrpc::http::StatusCode::BAD_GATEWAY),
            error: serde_json::from_slice::<XrpcErrorKind<E>>(&body).ok(),
        }))
    }
}

impl HttpClient for Call {
    async fn send_http(
        &self,
        request: Request<Vec<u8>>,
    ) -> Result<Response<Vec<u8>>, Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        tracing::trace!(uri = %request.uri(), method = %request.method(), "xrpc request");
        let response = self.client.send_http(request).await?;
        let meta = ResponseMeta::from_response(&response, SystemTime::now());
        *self.meta.lock().unwrap_or_else(|p| p.into_inner()) = Some(meta);
        Ok(response)
    }
}

impl XrpcClient for Call {
    fn base_uri(&self) -> String {
        self.client.base_uri()
    }

    async fn authorization_token(&self, _is_refresh: bool) -> Option<AuthorizationToken> {
        self.token.clone().map(AuthorizationToken::Bearer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(headers: &[(&str, &str)]) -> Response<Vec<u8>> {
        let mut b = Response::builder().status(429);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Vec::new()).unwrap()
    }

    #[test]
    fn reads_atproto_ratelimit_headers() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let meta = ResponseMeta::from_response(
            &response(&[
                ("RateLimit-Limit", "3000"),
                ("RateLimit-Remaining", "0"),
                ("RateLimit-Reset", "1800000012"),
                ("RateLimit-Policy", "3000;w=300"),
            ]),
            now,
        );
        let limit = meta.rate_limit.clone().unwrap();
        assert_eq!(limit.limit, Some(3000));
        assert_eq!(limit.remaining, Some(0));
        assert_eq!(limit.policy.as_deref(), Some("3000;w=300"));
        assert_eq!(meta.wait_hint(now), Some(Duration::from_secs(12)));
    }

    #[test]
    fn retry_after_wins_over_reset_and_accepts_http_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_770); // Sun, 06 Nov 1994 08:49:30 GMT
        let meta = ResponseMeta::from_response(
            &response(&[("Retry-After", "3"), ("RateLimit-Reset", "1800000012")]),
            now,
        );
        assert_eq!(meta.wait_hint(now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
