//! The writer: one authenticated account on one PDS, typed record operations, retries.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use atrium_api::client::AtpServiceClient;
use atrium_api::com::atproto::{repo, server};
use atrium_api::types::string::{AtIdentifier, Did, Nsid, RecordKey};
use atrium_api::types::{BlobRef, Collection, LimitedNonZeroU8};
use atrium_api::xrpc::error::XrpcErrorKind;
use atrium_api::xrpc::{InputDataOrBytes, OutputDataOrBytes, XrpcClient, XrpcRequest};
use ipld_core::cid::Cid;
use murmur_lexicon::Validate;
use serde::Serialize;

use crate::encode::{self, Encoded};
use crate::session::{Seen, Session, SessionCell};
use crate::transport::{Call, RateLimit, RetryPolicy, Transport};
use crate::{Batch, Error, Result, Secret, Swap, TidGenerator};

/// A commit of the writer's repo: what an agent matches against `#commit` events on the
/// stream (`commit` CID and `rev`) to recognise its own writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitRef {
    /// CID of the commit object.
    pub cid: Cid,
    /// Revision (a TID) of the commit.
    pub rev: String,
}

/// A record the writer created or updated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// `at://did/collection/rkey`.
    pub uri: String,
    /// CID of the record as stored.
    pub cid: Cid,
    /// Record key.
    pub rkey: String,
    /// The commit that carried the write. `None` only when a retried create found its
    /// record already stored by an attempt whose answer was lost.
    pub commit: Option<CommitRef>,
}

impl Written {
    /// The `com.atproto.repo.strongRef` to cite this record from another one.
    pub fn strong_ref(&self) -> repo::strong_ref::Main {
        repo::strong_ref::MainData {
            uri: self.uri.clone(),
            cid: atrium_api::types::string::Cid::new(self.cid),
        }
        .into()
    }
}

/// A record read back from a repo.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored<R> {
    /// `at://did/collection/rkey`.
    pub uri: String,
    /// CID of the record.
    pub cid: Cid,
    /// Record key.
    pub rkey: String,
    /// The decoded record.
    pub value: R,
}

/// One page of [`Writer::list`].
#[derive(Debug, Clone, PartialEq)]
pub struct Page<R> {
    /// Records on this page.
    pub records: Vec<Stored<R>>,
    /// Pass to the next call to continue; `None` at the end.
    pub cursor: Option<String>,
}

/// What the PDS says about itself that the writer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// Largest blob `uploadBlob` accepts, when the server advertises it.
    pub blob_upload_limit: Option<usize>,
}

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
}

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

/// A PDS URL reduced to what names the server: scheme and host (lowercase), port (the
/// scheme's default filled in) and path without trailing slashes. Two URLs with the same
/// `PdsUrl` reach the same PDS, so a session may be used with either.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PdsUrl {
    scheme: String,
    host: String,
    port: Option<u16>,
    path: String,
}

impl PdsUrl {
    /// `None` unless `url` is an absolute `http://` or `https://` URL with a host.
    pub(crate) fn parse(url: &str) -> Option<PdsUrl> {
        let parsed = reqwest::Url::parse(url.trim()).ok()?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return None;
        }
        Some(PdsUrl {
            scheme: parsed.scheme().to_ascii_lowercase(),
            host: parsed.host_str()?.to_ascii_lowercase(),
            port: parsed.port_or_known_default(),
            path: parsed.path().trim_end_matches('/').to_string(),
        })
    }
}

/// Whether two PDS URLs name the same server (see [`PdsUrl`]). Unparsable URLs never match.
pub(crate) fn same_pds(a: &str, b: &str) -> bool {
    match (PdsUrl::parse(a), PdsUrl::parse(b)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// A URL fit for an error message: scheme, host, port and path, never a user or password.
fn shown_url(url: &str) -> String {
    match reqwest::Url::parse(url.trim()) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string().trim_end_matches('/').to_string()
        }
        Err(_) => "(not a URL)".to_string(),
    }
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

/// The HTTP side of a writer: transport, retry policy, last rate-limit state.
pub(crate) struct Client {
    transport: Transport,
    policy: RetryPolicy,
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
                    let wait = hint.unwrap_or_else(|| policy.backoff(attempt));
                    if attempt < policy.max_attempts && wait <= policy.max_rate_limit_wait {
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
                    if may_retry && attempt < policy.max_attempts {
                        tracing::debug!(nsid, %message, sent, "transport failure");
                        retry_in(policy.backoff(attempt)).await;
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
                    if transient
                        && (replay == Replay::Idempotent || status == 503)
                        && attempt < policy.max_attempts
                    {
                        tracing::debug!(nsid, status, %error, "transient server error");
                        retry_in(policy.backoff(attempt)).await;
                        continue;
                    }
                    return Err(status_error(nsid, status, error, message));
                }
                Failure::Protocol(message) => return Err(Error::Protocol { nsid, message }),
                Failure::Redirect(CrossHostRedirect { from, to }) => {
                    return Err(Error::RedirectRefused { from, to });
                }
            }
        }
    }

    /// getRecord of `repo_did`; `None` when there is no record at `rkey`.
    pub(crate) async fn get<C>(
        &self,
        session: Option<&SessionCell>,
        auth: Auth,
        repo_did: &str,
        rkey: &str,
    ) -> Result<Option<Stored<C::Record>>>
    where
        C: Collection,
    {
        let Some(out) = self
            .get_record(session, auth, did_identifier(repo_did)?, C::NSID, rkey)
            .await?
        else {
            return Ok(None);
        };
        let cid = out
            .cid
            .as_ref()
            .map(|c| *c.as_ref())
            .ok_or_else(|| Error::Protocol {
                nsid: repo::get_record::NSID,
                message: "getRecord answered without a cid".into(),
            })?;
        let value = encode::decode(&out.uri, C::NSID, &out.value)?;
        Ok(Some(Stored {
            uri: out.data.uri,
            cid,
            rkey: rkey.to_string(),
            value,
        }))
    }

    pub(crate) async fn get_record(
        &self,
        session: Option<&SessionCell>,
        auth: Auth,
        repo_id: AtIdentifier,
        collection: &str,
        rkey: &str,
    ) -> Result<Option<repo::get_record::Output>> {
        let params: repo::get_record::Parameters = repo::get_record::ParametersData {
            cid: None,
            collection: nsid(collection)?,
            repo: repo_id,
            rkey: record_key(rkey)?,
        }
        .into();
        let result = self
            .xrpc(
                session,
                repo::get_record::NSID,
                auth,
                Replay::Idempotent,
                |call| {
                    let params = params.clone();
                    async move {
                        AtpServiceClient::new(call)
                            .service
                            .com
                            .atproto
                            .repo
                            .get_record(params)
                            .await
                    }
                },
            )
            .await;
        match result {
            Ok(out) => Ok(Some(out)),
            Err(Error::Xrpc { error, .. }) if error == "RecordNotFound" => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// listRecords of collection `C` in `repo_id`.
    pub(crate) async fn list<C>(
        &self,
        session: Option<&SessionCell>,
        auth: Auth,
        repo_id: AtIdentifier,
        limit: u8,
        cursor: Option<&str>,
        reverse: bool,
    ) -> Result<Page<C::Record>>
    where
        C: Collection,
    {
        let limit =
            LimitedNonZeroU8::<100>::try_from(limit).map_err(|e| Error::InvalidArgument {
                what: "list limit",
                message: format!("{limit}: {e}; use 1 to 100"),
            })?;
        let params: repo::list_records::Parameters = repo::list_records::ParametersData {
            collection: nsid(C::NSID)?,
            cursor: cursor.map(str::to_string),
            limit: Some(limit),
            repo: repo_id,
            reverse: reverse.then_some(true),
        }
        .into();
        let out = self
            .xrpc(
                session,
                repo::list_records::NSID,
                auth,
                Replay::Idempotent,
                |call| {
                    let params = params.clone();
                    async move {
                        AtpServiceClient::new(call)
                            .service
                            .com
                            .atproto
                            .repo
                            .list_records(params)
                            .await
                    }
                },
            )
            .await?;
        let mut records = Vec::with_capacity(out.records.len());
        for r in &out.records {
            records.push(Stored {
                uri: r.uri.clone(),
                cid: *r.cid.as_ref(),
                rkey: r.uri.rsplit('/').next().unwrap_or_default().to_string(),
                value: encode::decode(&r.uri, C::NSID, &r.value)?,
            });
        }
        Ok(Page {
            records,
            cursor: out.data.cursor,
        })
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

/// Whether `session` is the account named by `identifier`: its DID, or its handle
/// (handles are case-insensitive).
fn is_account(session: &Session, identifier: &str) -> bool {
    let identifier = identifier.trim();
    if identifier.starts_with("did:") {
        session.did == identifier
    } else {
        session.handle.eq_ignore_ascii_case(identifier)
    }
}

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

/// Configures and opens a [`Writer`].
#[derive(Debug, Clone)]
pub struct WriterBuilder {
    pds: String,
    session_file: Option<PathBuf>,
    policy: RetryPolicy,
    http: Option<reqwest::Client>,
    timeout: Duration,
}

impl WriterBuilder {
    /// Keeps the session in this file (mode 0600, rewritten atomically on login and refresh).
    pub fn session_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.session_file = Some(path.into());
        self
    }

    /// Sets the retry policy (default: [`RetryPolicy::default`]).
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Uses this reqwest client (its timeouts, proxy and TLS settings) for every call.
    ///
    /// Its redirect policy applies too. The default client follows redirects only within
    /// the PDS's own origin and fails with [`Error::RedirectRefused`] otherwise; reqwest's
    /// default policy drops the `Authorization` header on a redirect to another host but
    /// replays a 307/308 request body (a login's password) there. Build the client with
    /// `reqwest::redirect::Policy::none()` unless you need redirects.
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.http = Some(client);
        self
    }

    /// Per-request timeout of the default HTTP client (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn client(&self) -> Result<Client> {
        Client::new(
            &self.pds,
            self.policy.clone(),
            self.http.clone(),
            self.timeout,
        )
    }

    /// Logs in with a handle or DID and a password (an app password works the same way).
    /// The password is sent once and not kept.
    pub async fn login(self, identifier: &str, password: &str) -> Result<Writer> {
        let client = self.client()?;
        let input: server::create_session::Input = server::create_session::InputData {
            allow_takendown: None,
            auth_factor_token: None,
            identifier: identifier.to_string(),
            password: password.to_string(),
        }
        .into();
        let out = client
            .xrpc(
                None,
                server::create_session::NSID,
                Auth::None,
                Replay::NotIdempotent,
                |call| {
                    let input = input.clone();
                    async move {
                        AtpServiceClient::new(call)
                            .service
                            .com
                            .atproto
                            .server
                            .create_session(input)
                            .await
                    }
                },
            )
            .await
            .map_err(|e| match e {
                Error::Xrpc {
                    status: 400 | 401,
                    error,
                    ..
                } => Error::LoginRefused { error },
                other => other,
            })?;
        let session = Session {
            did: out.did.to_string(),
            handle: out.handle.to_string(),
            pds: client.transport.base().to_string(),
            access_jwt: Secret::new(out.data.access_jwt),
            refresh_jwt: Secret::new(out.data.refresh_jwt),
        };
        tracing::info!(did = %session.did, pds = %session.pds, "logged in");
        let writer = Writer::assemble(client, session, self.session_file)?;
        writer.inner.session.persist()?;
        Ok(writer)
    }

    /// Resumes the session saved in the session file, without any network call. An expired
    /// access token is refreshed on first use.
    ///
    /// Fails with [`Error::SessionPdsMismatch`] if the session was issued by another PDS
    /// than this builder's: a session's tokens only ever go to the host that issued them.
    pub fn resume(self) -> Result<Writer> {
        let path = self.session_file.clone().ok_or(Error::InvalidArgument {
            what: "session file",
            message: "resume needs WriterBuilder::session_file".into(),
        })?;
        let session = Session::load(&path)?;
        self.with_session(session)
    }

    /// Resumes the session in the session file if it is this account's (`identifier` is its
    /// DID, or its handle in any letter case) on this builder's PDS; otherwise logs in and
    /// writes the new session over the file. A stored session never stands in for another
    /// account, and its tokens are never sent to another PDS.
    pub async fn resume_or_login(self, identifier: &str, password: &str) -> Result<Writer> {
        if let Some(path) = &self.session_file
            && path.exists()
        {
            let session = Session::load(path)?;
            let same_account = is_account(&session, identifier);
            let same_host = same_pds(&session.pds, &self.pds);
            if same_account && same_host {
                return self.with_session(session);
            }
            tracing::info!(
                file = %path.display(),
                same_account,
                same_host,
                "the stored session is for another account or PDS; logging in anew"
            );
        }
        self.login(identifier, password).await
    }

    /// Uses an existing session (from elsewhere, e.g. an account created by a test network).
    ///
    /// Fails with [`Error::SessionPdsMismatch`], sending nothing, if `session.pds` is not
    /// this builder's PDS (compared by scheme, host, port and path, ignoring letter case,
    /// default ports and trailing slashes).
    pub fn with_session(self, session: Session) -> Result<Writer> {
        let client = self.client()?;
        if !same_pds(&session.pds, client.base()) {
            return Err(Error::SessionPdsMismatch {
                session_pds: shown_url(&session.pds),
                pds: shown_url(client.base()),
            });
        }
        Writer::assemble(client, session, self.session_file)
    }
}

/// Writes records to one account's repo on its PDS. Cheap to clone; clones share the
/// session (and its single-flight refresh), the TID generator and the HTTP connections.
#[derive(Clone)]
pub struct Writer {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    session: SessionCell,
    did: Did,
    tids: TidGenerator,
    limits: tokio::sync::OnceCell<ServerLimits>,
}

impl fmt::Debug for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writer")
            .field("did", &self.inner.did.as_str())
            .field("pds", &self.inner.client.transport.base())
            .finish_non_exhaustive()
    }
}

impl Writer {
    /// Starts configuring a writer for the PDS at `pds_url`.
    pub fn builder(pds_url: impl Into<String>) -> WriterBuilder {
        WriterBuilder {
            pds: pds_url.into().trim_end_matches('/').to_string(),
            session_file: None,
            policy: RetryPolicy::default(),
            http: None,
            timeout: Duration::from_secs(30),
        }
    }

    /// Logs in to `pds_url` with a handle or DID and a password; no session file.
    pub async fn login(pds_url: &str, identifier: &str, password: &str) -> Result<Writer> {
        Writer::builder(pds_url).login(identifier, password).await
    }

    fn assemble(client: Client, session: Session, file: Option<PathBuf>) -> Result<Writer> {
        let did = Did::new(session.did.clone()).map_err(|e| Error::InvalidArgument {
            what: "DID",
            message: format!("{:?}: {e}", session.did),
        })?;
        Ok(Writer {
            inner: Arc::new(Inner {
                client,
                session: SessionCell::new(session, file),
                did,
                tids: TidGenerator::new(),
                limits: tokio::sync::OnceCell::new(),
            }),
        })
    }

    /// The account's DID: the repo every write goes to.
    pub fn did(&self) -> &str {
        self.inner.did.as_str()
    }

    /// The PDS base URL.
    pub fn pds_url(&self) -> &str {
        self.inner.client.transport.base()
    }

    /// A copy of the current session (tokens stay wrapped in [`Secret`]).
    pub fn session(&self) -> Session {
        self.inner.session.session()
    }

    /// Session refreshes attempted so far (by this writer and its clones).
    pub fn session_refreshes(&self) -> u64 {
        self.inner.session.refresh_attempts()
    }

    /// HTTP requests this writer (and its clones) has sent so far.
    pub fn http_requests(&self) -> u64 {
        self.inner.client.transport.requests()
    }

    /// The RateLimit-* headers of the latest response that carried them.
    pub fn rate_limit(&self) -> Option<RateLimit> {
        self.inner
            .client
            .rate_limit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The next record key from this writer's TID generator.
    pub fn next_rkey(&self) -> String {
        self.inner.tids.next_tid().to_string()
    }

    fn repo(&self) -> AtIdentifier {
        AtIdentifier::Did(self.inner.did.clone())
    }

    pub(crate) async fn call<O, E, F, Fut>(
        &self,
        nsid: &'static str,
        replay: Replay,
        f: F,
    ) -> Result<O>
    where
        F: Fn(Call) -> Fut,
        Fut: Future<Output = atrium_api::xrpc::Result<O, E>>,
        E: Serialize + fmt::Debug + fmt::Display,
    {
        self.inner
            .client
            .xrpc(Some(&self.inner.session), nsid, Auth::Session, replay, f)
            .await
    }

    /// Creates a record with a fresh TID record key, after validating it and checking its
    /// size. Safe to retry: the key is fixed before the first attempt.
    pub async fn create<C>(&self, record: &C::Record) -> Result<Written>
    where
        C: Collection,
        C::Record: Validate,
    {
        let encoded = encode::encode::<C>(record)?;
        let rkey = self.next_rkey();
        self.create_encoded(encoded, rkey).await
    }

    /// Creates a record under a record key of the caller's choice.
    pub async fn create_with_rkey<C>(&self, rkey: &str, record: &C::Record) -> Result<Written>
    where
        C: Collection,
        C::Record: Validate,
    {
        let encoded = encode::encode::<C>(record)?;
        self.create_encoded(encoded, rkey.to_string()).await
    }

    /// Creates a record given in data-model form, for tools that only know the collection
    /// at run time (`murmur send`). `validate` checks it against its lexicon (e.g. with
    /// `murmur_lexicon::LexiconSet::validate_record`); the writer then applies the same
    /// `$type`, data-model and size checks as [`Writer::create`], all before any HTTP call.
    pub async fn create_untyped<F>(
        &self,
        collection: &str,
        value: ipld_core::ipld::Ipld,
        validate: F,
    ) -> Result<Written>
    where
        F: FnOnce(
            &ipld_core::ipld::Ipld,
        ) -> std::result::Result<(), murmur_lexicon::ValidationError>,
    {
        nsid(collection)?;
        validate(&value).map_err(|e| Error::InvalidRecord {
            nsid: collection.to_string(),
            path: e.path,
            message: e.message,
        })?;
        let encoded = encode::encode_value(collection, value)?;
        let rkey = self.next_rkey();
        self.create_encoded(encoded, rkey).await
    }

    async fn create_encoded(&self, encoded: Encoded, rkey: String) -> Result<Written> {
        let input: repo::create_record::Input = repo::create_record::InputData {
            collection: nsid(&encoded.nsid)?,
            record: encoded.value.clone(),
            repo: self.repo(),
            rkey: Some(record_key(&rkey)?),
            swap_commit: None,
            validate: None,
        }
        .into();
        // The reference PDS answers a create on an existing key with a 500, so a blind replay
        // cannot tell "our earlier attempt landed" from a real failure. Instead, after a
        // failure that may have reached the server, look: if the key holds our record (same
        // CID), the create happened; if it holds nothing, create again.
        let policy = &self.inner.client.policy;
        let mut tries = 0;
        let out = loop {
            tries += 1;
            let result = self
                .call(repo::create_record::NSID, Replay::NotIdempotent, |call| {
                    let input = input.clone();
                    async move {
                        AtpServiceClient::new(call)
                            .service
                            .com
                            .atproto
                            .repo
                            .create_record(input)
                            .await
                    }
                })
                .await;
            let err = match result {
                Ok(out) => break out,
                Err(err) => err,
            };
            let may_have_landed = matches!(
                err,
                Error::Unreachable { sent: true, .. }
                    | Error::Xrpc {
                        status: 500 | 502 | 503 | 504,
                        ..
                    }
            );
            if !may_have_landed || tries >= policy.max_attempts {
                return Err(err);
            }
            tokio::time::sleep(policy.backoff(tries)).await;
            match self.get_raw(&encoded.nsid, &rkey).await? {
                Some((cid, uri)) if cid == encoded.cid => {
                    tracing::debug!(%uri, "create had landed before its answer was lost");
                    return Ok(Written {
                        uri,
                        cid,
                        rkey,
                        commit: None,
                    });
                }
                Some(_) => return Err(err),
                None => continue,
            }
        };
        let cid = *out.cid.as_ref();
        if cid != encoded.cid {
            tracing::warn!(local = %encoded.cid, server = %cid, "PDS computed another record CID");
        }
        Ok(Written {
            uri: out.data.uri,
            cid,
            rkey,
            commit: out.data.commit.map(commit_ref),
        })
    }

    /// Creates or replaces the record at `rkey`. With `swap_record`, the write only happens
    /// if the current record has that CID (`None` inside means "must not exist"), else
    /// [`Error::Conflict`]. Retried on transient failures only without a swap.
    pub async fn put<C>(
        &self,
        rkey: &str,
        record: &C::Record,
        swap_record: Option<Cid>,
    ) -> Result<Written>
    where
        C: Collection,
        C::Record: Validate,
    {
        let encoded = encode::encode::<C>(record)?;
        let input: repo::put_record::Input = repo::put_record::InputData {
            collection: nsid(&encoded.nsid)?,
            record: encoded.value,
            repo: self.repo(),
            rkey: record_key(rkey)?,
            swap_commit: None,
            swap_record: swap_record.map(atrium_api::types::string::Cid::new),
            validate: None,
        }
        .into();
        let replay = if swap_record.is_some() {
            Replay::NotIdempotent
        } else {
            Replay::Idempotent
        };
        let out = self
            .call(repo::put_record::NSID, replay, |call| {
                let input = input.clone();
                async move {
                    AtpServiceClient::new(call)
                        .service
                        .com
                        .atproto
                        .repo
                        .put_record(input)
                        .await
                }
            })
            .await?;
        Ok(Written {
            cid: *out.cid.as_ref(),
            uri: out.data.uri,
            rkey: rkey.to_string(),
            commit: out.data.commit.map(commit_ref),
        })
    }

    /// Deletes the record at `rkey` (succeeds if it is already gone). With `swap_record`,
    /// only if the current record has that CID. Returns the commit, if one was made.
    pub async fn delete<C>(&self, rkey: &str, swap_record: Option<Cid>) -> Result<Option<CommitRef>>
    where
        C: Collection,
    {
        let input: repo::delete_record::Input = repo::delete_record::InputData {
            collection: nsid(C::NSID)?,
            repo: self.repo(),
            rkey: record_key(rkey)?,
            swap_commit: None,
            swap_record: swap_record.map(atrium_api::types::string::Cid::new),
        }
        .into();
        let replay = if swap_record.is_some() {
            Replay::NotIdempotent
        } else {
            Replay::Idempotent
        };
        let out = self
            .call(repo::delete_record::NSID, replay, |call| {
                let input = input.clone();
                async move {
                    AtpServiceClient::new(call)
                        .service
                        .com
                        .atproto
                        .repo
                        .delete_record(input)
                        .await
                }
            })
            .await?;
        Ok(out.data.commit.map(commit_ref))
    }

    /// Reads one record of this writer's repo; `None` if there is none at `rkey`.
    pub async fn get<C>(&self, rkey: &str) -> Result<Option<Stored<C::Record>>>
    where
        C: Collection,
    {
        self.get_from::<C>(self.did(), rkey).await
    }

    /// Reads one record of any repo on this PDS.
    pub async fn get_from<C>(&self, repo_did: &str, rkey: &str) -> Result<Option<Stored<C::Record>>>
    where
        C: Collection,
    {
        self.inner
            .client
            .get::<C>(Some(&self.inner.session), Auth::Session, repo_did, rkey)
            .await
    }

    async fn get_raw(&self, collection: &str, rkey: &str) -> Result<Option<(Cid, String)>> {
        let out = self
            .inner
            .client
            .get_record(
                Some(&self.inner.session),
                Auth::Session,
                self.repo(),
                collection,
                rkey,
            )
            .await?;
        Ok(out.and_then(|o| o.cid.as_ref().map(|c| (*c.as_ref(), o.data.uri.clone()))))
    }

    /// Lists records of collection `C` in this writer's repo, `limit` (1..=100) at a time,
    /// newest first unless `reverse`. Pass the returned cursor to get the next page.
    pub async fn list<C>(
        &self,
        limit: u8,
        cursor: Option<&str>,
        reverse: bool,
    ) -> Result<Page<C::Record>>
    where
        C: Collection,
    {
        self.inner
            .client
            .list::<C>(
                Some(&self.inner.session),
                Auth::Session,
                self.repo(),
                limit,
                cursor,
                reverse,
            )
            .await
    }

    /// Starts an applyWrites batch (up to 200 writes, one commit).
    pub fn batch(&self) -> Batch {
        Batch::new(self.clone())
    }

    /// The server's limits, from describeServer (fetched once, then cached).
    pub async fn server_limits(&self) -> Result<ServerLimits> {
        self.inner
            .limits
            .get_or_try_init(|| async {
                let out = self
                    .inner
                    .client
                    .xrpc(
                        None,
                        server::describe_server::NSID,
                        Auth::None,
                        Replay::Idempotent,
                        |call| async move {
                            AtpServiceClient::new(call)
                                .service
                                .com
                                .atproto
                                .server
                                .describe_server()
                                .await
                        },
                    )
                    .await?;
                Ok(ServerLimits {
                    blob_upload_limit: out
                        .data
                        .blob_upload_limit
                        .and_then(|l| usize::try_from(l).ok()),
                })
            })
            .await
            .cloned()
    }

    /// Uploads a blob and returns the reference to put in a record. Refused with
    /// [`Error::BlobTooLarge`] before upload when over the server's advertised limit.
    /// Idempotent (blobs are content-addressed), so transient failures are retried.
    pub async fn upload_blob(&self, bytes: Vec<u8>, mime_type: &str) -> Result<BlobRef> {
        if let Some(limit) = self.server_limits().await?.blob_upload_limit
            && bytes.len() > limit
        {
            return Err(Error::BlobTooLarge {
                size: bytes.len(),
                limit,
            });
        }
        let bytes = Arc::new(bytes);
        let mime = mime_type.to_string();
        let out = self
            .call(repo::upload_blob::NSID, Replay::Idempotent, |call| {
                let request = XrpcRequest::<(), ()> {
                    method: atrium_api::xrpc::http::Method::POST,
                    nsid: repo::upload_blob::NSID.into(),
                    parameters: None,
                    input: Some(InputDataOrBytes::Bytes(bytes.as_ref().clone())),
                    encoding: Some(mime.clone()),
                };
                async move {
                    match call
                        .send_xrpc::<(), (), repo::upload_blob::Output, repo::upload_blob::Error>(
                            &request,
                        )
                        .await?
                    {
                        OutputDataOrBytes::Data(out) => Ok(out),
                        OutputDataOrBytes::Bytes(_) => {
                            Err(atrium_api::xrpc::Error::UnexpectedResponseType)
                        }
                    }
                }
            })
            .await
            .map_err(|e| match e {
                Error::Xrpc {
                    status: 413,
                    message,
                    ..
                } => Error::BlobTooLarge {
                    size: bytes.len(),
                    limit: message
                        .split(|c: char| !c.is_ascii_digit())
                        .filter_map(|n| n.parse().ok())
                        .next()
                        .unwrap_or(0),
                },
                other => other,
            })?;
        Ok(out.data.blob)
    }
}

pub(crate) fn commit_ref(c: repo::defs::CommitMeta) -> CommitRef {
    CommitRef {
        cid: *c.cid.as_ref(),
        rev: c.data.rev.as_str().to_string(),
    }
}

pub(crate) fn nsid(s: &str) -> Result<Nsid> {
    Nsid::new(s.to_string()).map_err(|e| Error::InvalidArgument {
        what: "NSID",
        message: format!("{s:?}: {e}"),
    })
}

pub(crate) fn did_identifier(did: &str) -> Result<AtIdentifier> {
    Ok(AtIdentifier::Did(Did::new(did.to_string()).map_err(
        |e| Error::InvalidArgument {
            what: "DID",
            message: format!("{did:?}: {e}"),
        },
    )?))
}

pub(crate) fn record_key(s: &str) -> Result<RecordKey> {
    RecordKey::new(s.to_string()).map_err(|e| Error::InvalidArgument {
        what: "record key",
        message: format!("{s:?}: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pds_urls_match_up_to_case_default_port_and_trailing_slash() {
        for (a, b) in [
            ("http://localhost:2583", "http://localhost:2583/"),
            ("HTTP://LocalHost:2583", "http://localhost:2583"),
            ("https://pds.example", "https://pds.example:443/"),
            ("http://pds.example", "http://pds.example:80"),
            ("https://pds.example/base/", "https://pds.example/base"),
        ] {
            assert!(same_pds(a, b), "{a} = {b}");
        }
        for (a, b) in [
            ("http://localhost:2583", "http://localhost:2584"),
            ("http://localhost:2583", "https://localhost:2583"),
            ("http://localhost:2583", "http://127.0.0.1:2583"),
            ("https://pds.example", "https://pds.example.evil"),
            ("https://pds.example/a", "https://pds.example/b"),
            ("not a url", "not a url"),
            ("ftp://pds.example", "ftp://pds.example"),
        ] {
            assert!(!same_pds(a, b), "{a} != {b}");
        }
    }

    #[test]
    fn shown_urls_carry_no_credentials() {
        let shown = shown_url("https://user:hunter2@pds.example/x?token=abc");
        assert_eq!(shown, "https://pds.example/x");
    }

    #[test]
    fn a_session_is_the_account_named_by_its_did_or_any_case_of_its_handle() {
        let session = Session {
            did: "did:plc:alice".into(),
            handle: "alice.test".into(),
            pds: "http://localhost:1".into(),
            access_jwt: Secret::new("a"),
            refresh_jwt: Secret::new("r"),
        };
        assert!(is_account(&session, "alice.test"));
        assert!(is_account(&session, "Alice.TEST"));
        assert!(is_account(&session, "did:plc:alice"));
        assert!(!is_account(&session, "bob.test"));
        assert!(!is_account(&session, "did:plc:bob"));
        assert!(!is_account(&session, "alice.test.evil"));
    }
}
