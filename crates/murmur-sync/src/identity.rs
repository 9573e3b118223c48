//! DID resolution (did:plc, did:web) to the repo signing key, with a TTL cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{PublicKey, SyncError};

/// The public PLC directory.
pub const DEFAULT_PLC_URL: &str = "https://plc.directory";

/// What verification needs from a DID document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The DID.
    pub did: String,
    /// The `#atproto` verification method: the key that signs repo commits.
    pub signing_key: PublicKey,
    /// The handle claimed in `alsoKnownAs` (`at://handle`), unverified.
    pub handle: Option<String>,
    /// The `#atproto_pds` service endpoint, where `getRepo` re-fetches the repo.
    pub pds: Option<String>,
}

impl Identity {
    /// Reads an identity from a DID document (JSON).
    pub fn from_did_document(did: &str, doc: &Value) -> Result<Identity, SyncError> {
        let fail = |reason: &str| SyncError::Resolve {
            did: did.to_string(),
            reason: reason.to_string(),
        };
        if doc.get("id").and_then(Value::as_str) != Some(did) {
            return Err(fail("document id does not match the DID"));
        }
        let is_frag = |v: &Value, frag: &str| {
            v.get("id")
                .and_then(Value::as_str)
                .is_some_and(|id| id == frag || id.strip_prefix(did) == Some(frag))
        };
        let method = doc
            .get("verificationMethod")
            .and_then(Value::as_array)
            .and_then(|ms| ms.iter().find(|m| is_frag(m, "#atproto")))
            .ok_or_else(|| fail("no #atproto verification method"))?;
        let multibase = method
            .get("publicKeyMultibase")
            .and_then(Value::as_str)
            .ok_or_else(|| fail("#atproto verification method has no publicKeyMultibase"))?;
        let signing_key = match method.get("type").and_then(Value::as_str) {
            Some("Multikey") | None => PublicKey::from_multikey(multibase)?,
            Some(suite) => PublicKey::from_legacy_multibase(suite, multibase)?,
        };
        let handle = doc
            .get("alsoKnownAs")
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .find_map(|s| s.strip_prefix("at://"))
            })
            .map(str::to_string);
        let pds = doc
            .get("service")
            .and_then(Value::as_array)
            .and_then(|ss| ss.iter().find(|s| is_frag(s, "#atproto_pds")))
            .and_then(|s| s.get("serviceEndpoint"))
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(Identity {
            did: did.to_string(),
            signing_key,
            handle,
            pds,
        })
    }
}

struct Cached {
    identity: Arc<Identity>,
    fetched: Instant,
    /// Fetched because a signature failed with the previous key.
    after_failure: bool,
    /// Dropped by an `#identity` event: fetched again before use, but kept as the
    /// last-known identity while the directory cannot be reached.
    stale: bool,
}

/// Resolves DIDs to [`Identity`] over HTTP (did:plc via a PLC directory, did:web via
/// `/.well-known/did.json`), caching each for a TTL. Cheap to share behind an `Arc`.
pub struct IdentityResolver {
    http: reqwest::Client,
    plc_url: String,
    ttl: Duration,
    cache: Mutex<HashMap<String, Cached>>,
    pinned: Mutex<HashMap<String, Arc<Identity>>>,
}

impl Default for IdentityResolver {
    fn default() -> Self {
        IdentityResolver::new()
    }
}

impl std::fmt::Debug for IdentityResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityResolver")
            .field("plc_url", &self.plc_url)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl IdentityResolver {
    /// A resolver using the public PLC directory and a one-hour TTL.
    pub fn new() -> Self {
        IdentityResolver {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default(),
            plc_url: DEFAULT_PLC_URL.to_string(),
            ttl: Duration::from_secs(3600),
            cache: Mutex::new(HashMap::new()),
            pinned: Mutex::new(HashMap::new()),
        }
    }

    /// Uses another PLC directory (e.g. the local network's).
    pub fn with_plc_url(mut self, url: impl Into<String>) -> Self {
        self.plc_url = url.into().trim_end_matches('/').to_string();
        self
    }

    /// How long a resolved identity is trusted before it is fetched again.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The HTTP client used for resolution (and for fetching repos).
    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Uses this HTTP client (timeouts, proxies).
    pub fn with_http_client(mut self, client: reqwest::Client) -> Self {
        self.http = client;
        self
    }

    /// Fixes the identity of a DID: it is never fetched, refreshed or dropped. For tests,
    /// benchmarks and offline replays.
    pub fn pin(&self, identity: Identity) {
        lock(&self.pinned).insert(identity.did.clone(), Arc::new(identity));
    }

    /// The identity of `did`, from the cache while fresh, else fetched.
    ///
    /// When the fetch fails with a passing failure ([`SyncError::Unavailable`]: the PLC
    /// directory or did:web host is down, slow or overloaded) and an identity of `did` was
    /// fetched before and has only outlived its TTL (no `#identity` event made it stale),
    /// that last-known identity is returned: a commit whose signature checks
    /// under it is genuine, and one that does not makes the verifier ask again
    /// ([`refresh_after_failure`](Self::refresh_after_failure)), which then fails as
    /// unavailable rather than as a bad signature.
    pub async fn resolve(&self, did: &str) -> Result<Arc<Identity>, SyncError> {
        if let Some(id) = lock(&self.pinned).get(did) {
            return Ok(id.clone());
        }
        let last_known = match lock(&self.cache).get(did) {
            Some(c) if !c.stale && c.fetched.elapsed() < self.ttl => {
                return Ok(c.identity.clone());
            }
            // Only an identity that merely aged out may stand in during an outage: one an
            // `#identity` event made stale may have had its key rotated away.
            Some(c) if !c.stale => Some(c.identity.clone()),
            _ => None,
        };
        match (self.refresh(did).await, last_known) {
            (Err(e), Some(last)) if e.is_transient() => {
                tracing::warn!(did, error = %e, "identity unavailable; using the last-known one");
                Ok(last)
            }
            (result, _) => result,
        }
    }

    /// Fetches the identity of `did` now, replacing the cached one.
    pub async fn refresh(&self, did: &str) -> Result<Arc<Identity>, SyncError> {
        self.fetch(did, false).await
    }

    /// Re-fetches after a signature failed with the cached key, at most once per
    /// `min_interval` per DID, so forged commits cannot turn into a flood of look-ups.
    pub async fn refresh_after_failure(
        &self,
        did: &str,
        min_interval: Duration,
    ) -> Result<Arc<Identity>, SyncError> {
        if let Some(c) = lock(&self.cache).get(did)
            && c.after_failure
            && !c.stale
            && c.fetched.elapsed() < min_interval
        {
            return Ok(c.identity.clone());
        }
        self.fetch(did, true).await
    }

    /// Puts an identity in the cache as if it had just been fetched (it expires like one):
    /// warm-starts a cache saved elsewhere.
    pub fn insert(&self, identity: Identity) {
        lock(&self.cache).insert(
            identity.did.clone(),
            Cached {
                identity: Arc::new(identity),
                fetched: Instant::now(),
                after_failure: false,
                stale: false,
            },
        );
    }

    async fn fetch(&self, did: &str, after_failure: bool) -> Result<Arc<Identity>, SyncError> {
        if let Some(id) = lock(&self.pinned).get(did) {
            return Ok(id.clone());
        }
        let url = self.document_url(did)?;
        let doc = crate::fetch::did_document(&self.http, did, &url).await?;
        let identity = Arc::new(Identity::from_did_document(did, &doc)?);
        lock(&self.cache).insert(
            did.to_string(),
            Cached {
                identity: identity.clone(),
                fetched: Instant::now(),
                after_failure,
                stale: false,
            },
        );
        Ok(identity)
    }

    /// Marks the cached identity of `did` as stale (on an `#identity` event): the next use
    /// fetches it again, and it is kept only as the last-known identity for when the
    /// directory cannot be reached.
    pub fn invalidate(&self, did: &str) {
        if let Some(c) = lock(&self.cache).get_mut(did) {
            c.stale = true;
        }
    }

    /// Forgets everything about `did` (an account deleted).
    pub fn forget(&self, did: &str) {
        lock(&self.cache).remove(did);
    }

    fn document_url(&self, did: &str) -> Result<String, SyncError> {
        let fail = |reason: &str| SyncError::Resolve {
            did: did.to_string(),
            reason: reason.to_string(),
        };
        if let Some(id) = did.strip_prefix("did:plc:") {
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(fail("malformed did:plc"));
            }
            Ok(format!("{}/{did}", self.plc_url))
        } else if let Some(host) = did.strip_prefix("did:web:") {
            if host.contains(':') {
                return Err(fail("did:web with a path is not supported by atproto"));
            }
            let host = host.replace("%3A", ":").replace("%3a", ":");
            if host.is_empty()
                || !host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b))
            {
                return Err(fail("malformed did:web host"));
            }
            let scheme = if host.starts_with("localhost") || host.starts_with("127.0.0.1") {
                "http"
            } else {
                "https"
            };
            Ok(format!("{scheme}://{host}/.well-known/did.json"))
        } else {
            Err(fail("only did:plc and did:web are supported"))
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a map half-updated; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_plc_style_document() {
        let did = "did:plc:abc234";
        let doc = json!({
            "id": did,
            "alsoKnownAs": ["at://alice.test"],
            "verificationMethod": [{
                "id": format!("{did}#atproto"),
                "type": "Multikey",
                "controller": did,
                "publicKeyMultibase": "zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJwc",
            }],
            "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": "http://localhost:1234"}],
        });
        let id = Identity::from_did_document(did, &doc).unwrap();
        assert_eq!(id.handle.as_deref(), Some("alice.test"));
        assert_eq!(id.pds.as_deref(), Some("http://localhost:1234"));
        assert!(matches!(id.signing_key, PublicKey::K256(_)));
        assert!(Identity::from_did_document("did:plc:other", &doc).is_err());
    }

    #[test]
    fn document_urls() {
        let r = IdentityResolver::new().with_plc_url("http://localhost:9/");
        assert_eq!(
            r.document_url("did:plc:abc").unwrap(),
            "http://localhost:9/did:plc:abc"
        );
        assert_eq!(
            r.document_url("did:web:example.com").unwrap(),
            "https://example.com/.well-known/did.json"
        );
        assert_eq!(
            r.document_url("did:web:localhost%3A8080").unwrap(),
            "http://localhost:8080/.well-known/did.json"
        );
        assert!(r.document_url("did:plc:../x").is_err());
        assert!(r.document_url("did:key:z").is_err());
    }
}
