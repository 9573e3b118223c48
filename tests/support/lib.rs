//! Shared support for the workspace end-to-end tests: the fixture collection
//! `test.murmur.note`, the shared local network, and waiting on what a test can observe.

use std::time::{Duration, Instant};

use atrium_api::types::Collection;
use murmur_devnet::{Account, Devnet};
use murmur_lexicon::{Validate, ValidationError};
use serde::{Deserialize, Serialize};

/// The fixture collection `test.murmur.note`: tests exercise the watcher alone with it.
#[derive(Debug)]
pub struct Note;

/// A `test.murmur.note` record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NoteRecord {
    /// Free text; `INVALID…` breaks the fixture lexicon.
    pub text: String,
    /// Its number in the test's sequence.
    pub n: u64,
    /// RFC 3339.
    pub created_at: String,
}

impl Collection for Note {
    const NSID: &'static str = "test.murmur.note";
    type Record = NoteRecord;
}

impl Validate for NoteRecord {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.text.starts_with("INVALID") {
            return Err(ValidationError {
                path: "$.text".into(),
                message: "must not start with INVALID".into(),
            });
        }
        Ok(())
    }
}

/// Note number `n`.
pub fn note(n: u64) -> NoteRecord {
    NoteRecord {
        text: format!("note {n}"),
        n,
        created_at: "2026-11-23T12:00:00.000Z".into(),
    }
}

/// The test binary's shared 2-PDS network (started on first use).
pub async fn shared() -> &'static Devnet {
    tokio::task::spawn_blocking(|| Devnet::shared().unwrap_or_else(|e| panic!("{e}")))
        .await
        .expect("the devnet start-up task")
}

/// A new account on PDS `pds` of `net` (handle from `name`, password `password-1`) and a
/// writer logged in to it.
pub async fn account(net: &Devnet, pds: usize, name: &str) -> (Account, murmur_pds::Writer) {
    let account = net
        .create_account(pds, &net.unique_handle(name), "password-1")
        .await
        .unwrap();
    let writer = murmur_pds::Writer::login(&account.pds_url, &account.did, "password-1")
        .await
        .unwrap();
    (account, writer)
}

/// Polls `done` until it holds; fails the test naming `what` after `timeout`.
pub async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Calls XRPC procedure `method` on the account's PDS with its access token (a JSON body, or
/// none), and fails the test unless the PDS answers with success.
pub async fn account_xrpc(account: &Account, method: &str, body: Option<serde_json::Value>) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/xrpc/{method}", account.pds_url))
        .bearer_auth(&account.access_jwt);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    assert!(
        status.is_success(),
        "{method}: {status} {}",
        response.text().await.unwrap_or_default()
    );
}
