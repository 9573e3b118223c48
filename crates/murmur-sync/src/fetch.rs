//! The one place murmur-sync makes HTTP requests: DID documents from a PLC directory or a
//! did:web host, and repo CARs (`getRepo`, `getRecord`) from a DID's PDS. Each failure is
//! classified: passing ones ([`SyncError::Unavailable`]) are worth retrying, the rest are not.

use serde_json::Value;

use crate::verify::Verifier;
use crate::{RepoRecord, SyncError, VerifiedRepo};

/// HTTP statuses that say "not now" rather than "no": retry later.
fn is_passing(status: reqwest::StatusCode) -> bool {
    status.is_server_error()
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
}

/// A request that could not be made or followed (a malformed endpoint in a DID document, a
/// redirect refused): the data's fault, not a passing one.
fn is_definitive(e: &reqwest::Error) -> bool {
    e.is_builder() || e.is_redirect()
}

/// A transport error with its kind spelled out (reqwest's Display hides the cause).
fn transport_reason(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "transport error"
    };
    let mut reason = format!("{kind}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        reason.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    reason
}

/// GETs `url` with `query` (within `timeout`, when given). A transport error is `fail`ed when
/// the request could not be made as asked and `unavailable` otherwise; a passing status
/// (5xx, 408, 429) is `unavailable`. Any other failing status is `Ok(Err((status, body)))`,
/// with the first 300 characters of the body, for the caller to read.
async fn get(
    http: &reqwest::Client,
    url: &str,
    query: &[(&str, &str)],
    timeout: Option<std::time::Duration>,
    fail: impl Fn(String) -> SyncError,
    unavailable: impl Fn(String) -> SyncError,
) -> Result<Result<reqwest::Response, (reqwest::StatusCode, String)>, SyncError> {
    let mut request = http.get(url).query(query);
    if let Some(timeout) = timeout {
        request = request.timeout(timeout);
    }
    let response = request.send().await.map_err(|e| {
        if is_definitive(&e) {
            fail(transport_reason(&e))
        } else {
            unavailable(transport_reason(&e))
        }
    })?;
    let status = response.status();
    if is_passing(status) {
        return Err(unavailable(format!("HTTP {status}")));
    }
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Ok(Err((status, body.trim().chars().take(300).collect())));
    }
    Ok(Ok(response))
}

/// GETs the DID document of `did` at `url`.
pub(crate) async fn did_document(
    http: &reqwest::Client,
    did: &str,
    url: &str,
) -> Result<Value, SyncError> {
    let fail = |reason: String| SyncError::Resolve {
        did: did.to_string(),
        reason,
    };
    let unavailable = |reason: String| SyncError::Unavailable {
        did: did.to_string(),
        url: url.to_string(),
        reason,
    };
    let response = match get(http, url, &[], None, &fail, &unavailable).await? {
        Ok(response) => response,
        Err((status, _)) => {
            let what = if status == reqwest::StatusCode::NOT_FOUND
                || status == reqwest::StatusCode::GONE
            {
                "the DID is unknown or tombstoned"
            } else {
                "the directory refused the request"
            };
            return Err(fail(format!("GET {url}: HTTP {status}: {what}")));
        }
    };
    let body = response
        .bytes()
        .await
        .map_err(|e| unavailable(transport_reason(&e)))?;
    serde_json::from_slice(&body).map_err(|e| fail(format!("GET {url}: body is not JSON: {e}")))
}

/// One page of `com.atproto.sync.listRepos`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoList {
    /// The repos of this page, in the host's order.
    pub repos: Vec<ListedRepo>,
    /// Where the next page starts; `None` on the last page.
    pub cursor: Option<String>,
}

/// One repo a host lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedRepo {
    /// The repo DID.
    pub did: String,
    /// Its current rev, as the host says (unverified).
    pub rev: String,
    /// Whether the host serves it (absent in the answer: active).
    pub active: bool,
}

impl Verifier {
    /// Lists one page (up to 1,000) of the repos a host serves
    /// (`com.atproto.sync.listRepos` at `host`, an `http(s)://` or `ws(s)://` base URL, with
    /// or without an `/xrpc/...` path). What it says is unverified: each repo is verified
    /// when it is fetched.
    pub async fn list_repos(
        &self,
        host: &str,
        cursor: Option<&str>,
    ) -> Result<RepoList, SyncError> {
        let base = host.trim_end_matches('/');
        let base = base.split("/xrpc/").next().unwrap_or(base);
        let base = if let Some(rest) = base.strip_prefix("ws://") {
            format!("http://{rest}")
        } else if let Some(rest) = base.strip_prefix("wss://") {
            format!("https://{rest}")
        } else {
            base.to_string()
        };
        let url = format!("{base}/xrpc/com.atproto.sync.listRepos");
        let unavailable = |reason: String| SyncError::Unavailable {
            did: String::new(),
            url: url.clone(),
            reason,
        };
        let fail = |reason: String| SyncError::FetchRepo {
            did: String::new(),
            url: url.clone(),
            reason,
        };
        let mut query = vec![("limit", "1000")];
        if let Some(cursor) = cursor {
            query.push(("cursor", cursor));
        }
        let timeout = Some(std::time::Duration::from_secs(60));
        let response = match get(
            self.resolver.http(),
            &url,
            &query,
            timeout,
            &fail,
            &unavailable,
        )
        .await?
        {
            Ok(response) => response,
            Err((status, body)) => return Err(fail(format!("HTTP {status}: {body}"))),
        };
        let body = response
            .bytes()
            .await
            .map_err(|e| unavailable(transport_reason(&e)))?;
        #[derive(serde::Deserialize)]
        struct Page {
            repos: Vec<Repo>,
            cursor: Option<String>,
        }
        #[derive(serde::Deserialize)]
        struct Repo {
            did: String,
            #[serde(default)]
            rev: String,
            active: Option<bool>,
        }
        let page: Page = serde_json::from_slice(&body)
            .map_err(|e| fail(format!("the answer is not a listRepos page: {e}")))?;
        Ok(RepoList {
            cursor: page
                .cursor
                .filter(|c| !c.is_empty() && !page.repos.is_empty()),
            repos: page
                .repos
                .into_iter()
                .map(|r| ListedRepo {
                    did: r.did,
                    rev: r.rev,
                    active: r.active.unwrap_or(true),
                })
                .collect(),
        })
    }

    /// Fetches the whole repo of `did` from its PDS (`com.atproto.sync.getRepo`, the endpoint
    /// from its DID document) and verifies it with [`verify_repo`](Self::verify_repo): what a
    /// consumer does after a chain break to learn what it missed.
    pub async fn fetch_repo(&self, did: &str) -> Result<VerifiedRepo, SyncError> {
        let bytes = self
            .fetch_car(did, "com.atproto.sync.getRepo", &[("did", did)])
            .await?
            .ok_or_else(|| SyncError::FetchRepo {
                did: did.to_string(),
                url: "com.atproto.sync.getRepo".into(),
                reason: "the PDS does not have this repo".into(),
            })?;
        self.verify_repo(did, &bytes).await
    }

    /// Fetches one record of `did` with its proof (`com.atproto.sync.getRecord`: the signed
    /// commit and the MST path to the key) and verifies it: the record a repo holds now,
    /// signed by its owner, whoever served it. `Ok(None)` when the proof shows the key absent
    /// (or the PDS says the record is not found).
    pub async fn fetch_record(
        &self,
        did: &str,
        collection: &str,
        rkey: &str,
    ) -> Result<Option<RepoRecord>, SyncError> {
        let query = [("did", did), ("collection", collection), ("rkey", rkey)];
        let Some(bytes) = self
            .fetch_car(did, "com.atproto.sync.getRecord", &query)
            .await?
        else {
            return Ok(None);
        };
        self.verify_record_proof(did, &format!("{collection}/{rkey}"), &bytes)
            .await
    }

    /// GETs a CAR from the PDS of `did` (from its DID document), bounded by
    /// [`Limits::max_repo_bytes`](crate::Limits::max_repo_bytes). `Ok(None)` on HTTP 404 or an XRPC `*NotFound` error.
    pub(crate) async fn fetch_car(
        &self,
        did: &str,
        method: &str,
        query: &[(&str, &str)],
    ) -> Result<Option<Vec<u8>>, SyncError> {
        let identity = self.resolver.resolve(did).await?;
        let pds = identity.pds.as_deref().ok_or_else(|| SyncError::Resolve {
            did: did.to_string(),
            reason: "the DID document names no #atproto_pds service endpoint".into(),
        })?;
        let url = format!("{}/xrpc/{method}", pds.trim_end_matches('/'));
        let fetch_err = |reason: String| SyncError::FetchRepo {
            did: did.to_string(),
            url: url.clone(),
            reason,
        };
        let unavailable = |reason: String| SyncError::Unavailable {
            did: did.to_string(),
            url: url.clone(),
            reason,
        };
        let timeout = Some(std::time::Duration::from_secs(120));
        let http = self.resolver.http();
        let got = get(http, &url, query, timeout, &fetch_err, &unavailable).await?;
        let mut response = match got {
            Ok(response) => response,
            Err((status, body)) => {
                if status == reqwest::StatusCode::NOT_FOUND
                    || (status == reqwest::StatusCode::BAD_REQUEST && body.contains("NotFound"))
                {
                    return Ok(None);
                }
                return Err(fetch_err(format!("HTTP {status}: {body}")));
            }
        };
        let limit = self.limits.max_repo_bytes;
        let too_large = |size: usize| SyncError::TooLarge {
            what: "repo CAR",
            size,
            limit,
        };
        if let Some(size) = response.content_length()
            && size > limit as u64
        {
            return Err(too_large(usize::try_from(size).unwrap_or(usize::MAX)));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| unavailable(transport_reason(&e)))?
        {
            if bytes.len() + chunk.len() > limit {
                return Err(too_large(bytes.len() + chunk.len()));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Some(bytes))
    }
}
