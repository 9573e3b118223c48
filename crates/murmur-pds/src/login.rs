//! Opening a writer: the [`WriterBuilder`] (login, resume, resume-or-login, an existing
//! session) and the policy deciding when a stored session may be used.

use std::path::PathBuf;
use std::time::Duration;

use atrium_api::client::AtpServiceClient;
use atrium_api::com::atproto::server;

use crate::client::{Auth, Client, Replay, RetryPolicy};
use crate::{Error, Result, Secret, Session, Writer};

/// A PDS URL reduced to what names the server: scheme and host (lowercase), port (the
/// scheme's default filled in) and path without trailing slashes. Two URLs with the same
/// `PdsUrl` reach the same PDS, so a session may be used with either.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PdsUrl {
    scheme: String,
    host: String,
    port: Option<u16>,
    path: String,
}

impl PdsUrl {
    /// `None` unless `url` is an absolute `http://` or `https://` URL with a host.
    fn parse(url: &str) -> Option<PdsUrl> {
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
fn same_pds(a: &str, b: &str) -> bool {
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
    /// A builder for the PDS at `pds` with the defaults: no session file, the default retry
    /// policy, the default HTTP client with a 30 s timeout.
    pub(crate) fn new(pds: String) -> WriterBuilder {
        WriterBuilder {
            pds: pds.trim_end_matches('/').to_string(),
            session_file: None,
            policy: RetryPolicy::default(),
            http: None,
            timeout: Duration::from_secs(30),
        }
    }

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
            pds: client.base().to_string(),
            access_jwt: Secret::new(out.data.access_jwt),
            refresh_jwt: Secret::new(out.data.refresh_jwt),
        };
        tracing::info!(did = %session.did, pds = %session.pds, "logged in");
        let writer = Writer::assemble(client, session, self.session_file)?;
        writer.persist_session()?;
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
