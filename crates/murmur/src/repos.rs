//! Reading other agents' repos: a DID resolved to its PDS (PLC or did:web), then public reads
//! there. Used to rebuild tasks after a restart and to look for a result the stream may not
//! have delivered.
//!
//! Single records ([`Repos::get`]: results, statuses) come with their proof
//! (`com.atproto.sync.getRecord`) and are verified like stream commits — signature, MST
//! path, hash, lexicon — before anything acts on them. Listings (claims, handoffs) have no
//! proofs; they only ever lead to an assignment or a look-up, never to accepting a result.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use murmur_pds::{Collection, Reader, Stored, Validate};
use murmur_sync::{IdentityResolver, Limits, Verifier, VerifyLevel};

/// Readers of the repos of the swarm, one per PDS host.
pub(crate) struct Repos {
    resolver: Arc<IdentityResolver>,
    /// Verifies single records read back with their proofs (Full level).
    verifier: Verifier,
    readers: Mutex<HashMap<String, Reader>>,
    /// DID -> PDS URL, for agents whose host is known without a look-up (our own).
    known: Mutex<HashMap<String, String>>,
}

/// Why a repo could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RepoError {
    #[error("resolving {did}: {message}")]
    Resolve { did: String, message: String },
    #[error(transparent)]
    Read(#[from] murmur_pds::Error),
    #[error("record {uri} failed verification: {message}")]
    Verify { uri: String, message: String },
}

impl Repos {
    pub(crate) fn new(plc_url: Option<&str>) -> Arc<Self> {
        let mut resolver = IdentityResolver::new();
        if let Some(url) = plc_url {
            resolver = resolver.with_plc_url(url);
        }
        let resolver = Arc::new(resolver);
        Arc::new(Repos {
            verifier: Verifier::new(Arc::clone(&resolver)).with_level(VerifyLevel::Full),
            resolver,
            readers: Mutex::new(HashMap::new()),
            known: Mutex::new(HashMap::new()),
        })
    }

    /// Records that `did` is hosted at `pds_url` (skips the identity look-up).
    pub(crate) fn host(&self, did: &str, pds_url: &str) {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(did.to_string(), pds_url.trim_end_matches('/').to_string());
    }

    /// A reader of the PDS at `url` (shared per host).
    pub(crate) fn reader_at(&self, url: &str) -> Result<Reader, RepoError> {
        let url = url.trim_end_matches('/');
        let mut readers = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = readers.get(url) {
            return Ok(r.clone());
        }
        let reader = Reader::new(url)?;
        readers.insert(url.to_string(), reader.clone());
        Ok(reader)
    }

    /// A reader of the PDS that hosts `did`.
    pub(crate) async fn reader_for(&self, did: &str) -> Result<Reader, RepoError> {
        let known = self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(did)
            .cloned();
        let url = match known {
            Some(url) => url,
            None => {
                let identity =
                    self.resolver
                        .resolve(did)
                        .await
                        .map_err(|e| RepoError::Resolve {
                            did: did.to_string(),
                            message: e.to_string(),
                        })?;
                identity.pds.clone().ok_or_else(|| RepoError::Resolve {
                    did: did.to_string(),
                    message: "the DID document names no #atproto_pds service".into(),
                })?
            }
        };
        self.reader_at(&url)
    }

    /// The record of `C` at `rkey` in `did`'s repo, verified: fetched with its proof (signed
    /// commit + MST path), hash-checked, decoded and validated against its lexicon.
    pub(crate) async fn get<C: Collection>(
        &self,
        did: &str,
        rkey: &str,
    ) -> Result<Option<Stored<C::Record>>, RepoError>
    where
        C::Record: Validate,
    {
        let uri = format!("at://{did}/{}/{rkey}", C::NSID);
        let invalid = |message: String| RepoError::Verify {
            uri: uri.clone(),
            message,
        };
        let Some(record) = self
            .verifier
            .fetch_record(did, C::NSID, rkey)
            .await
            .map_err(|e| invalid(e.to_string()))?
        else {
            return Ok(None);
        };
        let value: C::Record = murmur_sync::decode_record(&record.record, &Limits::default())
            .map_err(|e| invalid(e.to_string()))?;
        value.validate().map_err(|e| invalid(e.to_string()))?;
        Ok(Some(Stored {
            uri: uri.clone(),
            cid: record.cid,
            rkey: rkey.to_string(),
            value,
        }))
    }

    /// Records of `C` in `did`'s repo, newest first, until `older` says a record is older
    /// than anything the caller cares about (record keys are TIDs: time order).
    pub(crate) async fn list_recent<C: Collection>(
        &self,
        did: &str,
        older: impl Fn(&Stored<C::Record>) -> bool,
    ) -> Result<Vec<Stored<C::Record>>, RepoError> {
        let reader = self.reader_for(did).await?;
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = reader.list::<C>(did, 100, cursor.as_deref(), false).await?;
            let mut done = page.cursor.is_none() || page.records.is_empty();
            for r in page.records {
                if older(&r) {
                    done = true;
                    break;
                }
                out.push(r);
            }
            if done {
                return Ok(out);
            }
            cursor = page.cursor;
        }
    }
}
