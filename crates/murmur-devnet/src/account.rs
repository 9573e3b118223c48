//! Accounts on the local network's PDS hosts.

use std::fmt;

use serde::Deserialize;

use crate::{DevnetError, PdsHost};

/// An account created on a local PDS, with a fresh session.
#[derive(Clone)]
pub struct Account {
    /// The account's DID (`did:plc:...`, registered in the local PLC).
    pub did: String,
    /// The account's handle, e.g. `alice-0.test`.
    pub handle: String,
    /// The password it was created with.
    pub password: String,
    /// Access token of the session opened at creation.
    pub access_jwt: String,
    /// Refresh token of that session.
    pub refresh_jwt: String,
    /// Base URL of the PDS hosting the account.
    pub pds_url: String,
    /// Index of that PDS in its network.
    pub pds_index: usize,
    /// URL of the PLC directory the DID is registered in.
    pub plc_url: String,
}

// Secrets never reach logs: Debug shows who, not how to log in.
impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("did", &self.did)
            .field("handle", &self.handle)
            .field("pds_url", &self.pds_url)
            .field("password", &"<redacted>")
            .field("access_jwt", &"<redacted>")
            .field("refresh_jwt", &"<redacted>")
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateAccountOutput {
    did: String,
    handle: String,
    access_jwt: String,
    refresh_jwt: String,
}

pub(crate) async fn create(
    host: &PdsHost,
    plc_url: &str,
    handle: &str,
    password: &str,
) -> Result<Account, DevnetError> {
    let what = format!("createAccount {handle} on pds {}", host.index());
    let local = handle.split('.').next().unwrap_or(handle);
    let email = format!("{local}@murmur.example");
    let out = create_account(host.url(), handle, &email, password, what).await?;
    Ok(Account {
        did: out.did,
        handle: out.handle,
        password: password.to_string(),
        access_jwt: out.access_jwt,
        refresh_jwt: out.refresh_jwt,
        pds_url: host.url().to_string(),
        pds_index: host.index(),
        plc_url: plc_url.to_string(),
    })
}

/// An account made by [`sign_up`]: who it is and how to log in as it.
#[derive(Clone)]
pub struct SignedUp {
    /// The account's DID.
    pub did: String,
    /// Its handle, e.g. `worker3a1b2c3.test`.
    pub handle: String,
    /// The random password it was created with.
    pub password: String,
    /// Base URL of the PDS hosting it.
    pub pds_url: String,
}

// Secrets never reach logs.
impl fmt::Debug for SignedUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedUp")
            .field("did", &self.did)
            .field("handle", &self.handle)
            .field("pds_url", &self.pds_url)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Creates a fresh account named after `name` on the PDS at `pds_url` (any host whose
/// sign-ups need no invite code: the local network's, or a test PDS), with a random
/// password. The handle is `{name}{6 hex digits}.test`, `name` cut to its first 8 ASCII
/// letters and digits (the PDS takes short first labels only).
pub async fn sign_up(pds_url: &str, name: &str) -> Result<SignedUp, DevnetError> {
    let pds_url = pds_url.trim_end_matches('/');
    let suffix = fastrand::u32(..0x0100_0000);
    let short_name: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(8)
        .collect();
    let local = format!("{short_name}{suffix:06x}");
    let handle = format!("{local}.test");
    let password = format!("murmur-{:016x}", fastrand::u64(..));
    let what = format!("createAccount {handle} on {pds_url}");
    let out = create_account(
        pds_url,
        &handle,
        &format!("{local}@example.test"),
        &password,
        what,
    )
    .await
    .map_err(|e| match e {
        DevnetError::Http { what, reason } => DevnetError::Http {
            what,
            reason: format!("{reason}; does this PDS accept sign-ups without an invite code?"),
        },
        other => other,
    })?;
    Ok(SignedUp {
        did: out.did,
        handle: out.handle,
        password,
        pds_url: pds_url.to_string(),
    })
}

/// `com.atproto.server.createAccount` on `pds_url`.
async fn create_account(
    pds_url: &str,
    handle: &str,
    email: &str,
    password: &str,
    what: String,
) -> Result<CreateAccountOutput, DevnetError> {
    let body = serde_json::json!({
        "handle": handle,
        "email": email,
        "password": password,
    });
    let http = |reason: String| DevnetError::Http {
        what: what.clone(),
        reason,
    };
    let response = reqwest::Client::new()
        .post(format!("{pds_url}/xrpc/com.atproto.server.createAccount"))
        .json(&body)
        .send()
        .await
        .map_err(|e| http(e.without_url().to_string()))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| http(e.without_url().to_string()))?;
    if !status.is_success() {
        return Err(http(format!("HTTP {status}: {text}")));
    }
    serde_json::from_str(&text).map_err(|e| http(format!("unexpected response: {e}")))
}
