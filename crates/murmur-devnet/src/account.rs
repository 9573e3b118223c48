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
    let body = serde_json::json!({
        "handle": handle,
        "email": format!("{local}@murmur.example"),
        "password": password,
    });
    let http = |reason: String| DevnetError::Http {
        what: what.clone(),
        reason,
    };
    let response = reqwest::Client::new()
        .post(format!(
            "{}/xrpc/com.atproto.server.createAccount",
            host.url()
        ))
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
    let out: CreateAccountOutput =
        serde_json::from_str(&text).map_err(|e| http(format!("unexpected response: {e}")))?;
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
