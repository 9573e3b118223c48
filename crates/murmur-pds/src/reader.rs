//! Reads of records: the [`Reader`] (public, unauthenticated reads of any repo hosted on one
//! PDS) and the getRecord/listRecords calls it shares with the [`Writer`](crate::Writer).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use atrium_api::client::AtpServiceClient;
use atrium_api::com::atproto::{repo, sync};
use atrium_api::types::string::AtIdentifier;
use atrium_api::types::{Collection, LimitedNonZeroU8, LimitedNonZeroU16};
use ipld_core::cid::{Cid, Version};

use crate::arguments::{did_identifier, nsid, record_key};
use crate::client::{Auth, Client, Replay, RetryPolicy};
use crate::encode::{self, RAW, SHA2_256, blob_cid};
use crate::session::SessionCell;
use crate::{Error, Page, Result, Stored};

/// Reads records of any repo on one PDS, without an account: `getRecord`, `listRecords`,
/// blobs (`getBlob`, checked against their CID) and the repos the host serves
/// (`listRepos`). Reads are retried like the writer's. Cheap to clone.
///
/// ```no_run
/// # async fn demo() -> Result<(), murmur_pds::Error> {
/// use murmur_pds::Reader;
/// #[derive(Debug)]
/// struct Notes;
/// impl murmur_pds::Collection for Notes {
///     const NSID: &'static str = "com.example.note";
///     type Record = serde_json::Value;
/// }
/// let reader = Reader::new("http://localhost:2583")?;
/// let page = reader.list::<Notes>("did:plc:alice", 50, None, false).await?;
/// for note in page.records {
///     println!("{} {}", note.uri, note.value);
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Reader {
    client: Arc<Client>,
}

impl fmt::Debug for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader")
            .field("pds", &self.client.base())
            .finish_non_exhaustive()
    }
}

impl Reader {
    /// A reader of the PDS at `pds_url` (default retry policy, 30 s per request).
    pub fn new(pds_url: &str) -> Result<Reader> {
        Reader::with_http_client(pds_url, None, RetryPolicy::default())
    }

    /// A reader using this reqwest client (or a default one) and retry policy.
    pub fn with_http_client(
        pds_url: &str,
        http: Option<reqwest::Client>,
        policy: RetryPolicy,
    ) -> Result<Reader> {
        let pds = pds_url.trim_end_matches('/');
        Ok(Reader {
            client: Arc::new(Client::new(pds, policy, http, Duration::from_secs(30))?),
        })
    }

    /// The PDS base URL.
    pub fn pds_url(&self) -> &str {
        self.client.base()
    }

    /// HTTP requests this reader (and its clones) has sent so far.
    pub fn http_requests(&self) -> u64 {
        self.client.requests()
    }

    /// Reads the record of `C` at `rkey` in `repo_did`; `None` if there is none.
    pub async fn get<C>(&self, repo_did: &str, rkey: &str) -> Result<Option<Stored<C::Record>>>
    where
        C: Collection,
    {
        self.client.get::<C>(None, Auth::None, repo_did, rkey).await
    }

    /// Lists records of `C` in `repo_did`, `limit` (1..=100) at a time, newest first unless
    /// `reverse`. Pass the returned cursor to get the next page.
    pub async fn list<C>(
        &self,
        repo_did: &str,
        limit: u8,
        cursor: Option<&str>,
        reverse: bool,
    ) -> Result<Page<C::Record>>
    where
        C: Collection,
    {
        self.client
            .list::<C>(
                None,
                Auth::None,
                did_identifier(repo_did)?,
                limit,
                cursor,
                reverse,
            )
            .await
    }

    /// The blob `cid` of `did`'s repo (`com.atproto.sync.getBlob`), its bytes checked
    /// against the CID ([`Error::BlobNotFound`] when the PDS has no such blob, for that repo
    /// or not yet referenced by a record). At most `max_bytes` are read (pass the `size` of
    /// the blob's ref): a larger answer is [`Error::ResponseTooLarge`].
    /// Bytes that do not hash to `cid` are [`Error::BlobMismatch`], never returned. Only blob
    /// CIDs (CIDv1, raw, sha2-256) are asked for; another is [`Error::InvalidArgument`] and
    /// nothing is sent.
    pub async fn get_blob(&self, did: &str, cid: &Cid, max_bytes: usize) -> Result<Vec<u8>> {
        did_identifier(did)?;
        let hash = cid.hash();
        if cid.version() != Version::V1
            || cid.codec() != RAW
            || hash.code() != SHA2_256
            || hash.size() != 32
        {
            return Err(Error::InvalidArgument {
                what: "blob CID",
                message: format!(
                    "{cid}: a blob's CID is CIDv1 with the raw codec (0x55) and sha2-256"
                ),
            });
        }
        let cid_text = cid.to_string();
        let result = self
            .client
            .xrpc(
                None,
                sync::get_blob::NSID,
                Auth::None,
                Replay::Idempotent,
                |call| {
                    let (did, cid) = (did.to_string(), cid_text.clone());
                    async move {
                        call.get_capped::<sync::get_blob::Error>(
                            sync::get_blob::NSID,
                            &[("did", did.as_str()), ("cid", cid.as_str())],
                            max_bytes,
                        )
                        .await
                    }
                },
            )
            .await;
        let bytes = match result {
            Ok(bytes) => bytes,
            // The lexicon's error name, or what the reference PDS answers instead.
            Err(Error::Xrpc { error, message, .. })
                if error == "BlobNotFound"
                    || (error == "InvalidRequest" && message == "Blob not found") =>
            {
                return Err(Error::BlobNotFound {
                    did: did.to_string(),
                    cid: cid_text,
                });
            }
            Err(e) => return Err(e),
        };
        if blob_cid(&bytes) != *cid {
            return Err(Error::BlobMismatch {
                did: did.to_string(),
                cid: cid_text,
            });
        }
        Ok(bytes)
    }

    /// DIDs of the repos this host serves, `limit` (1..=1000) at a time. Pass the returned
    /// cursor to get the next page (`None` at the end).
    pub async fn list_repos(
        &self,
        limit: u16,
        cursor: Option<&str>,
    ) -> Result<(Vec<String>, Option<String>)> {
        let limit =
            LimitedNonZeroU16::<1000>::try_from(limit).map_err(|e| Error::InvalidArgument {
                what: "list limit",
                message: format!("{limit}: {e}; use 1 to 1000"),
            })?;
        let params: sync::list_repos::Parameters = sync::list_repos::ParametersData {
            cursor: cursor.map(str::to_string),
            limit: Some(limit),
        }
        .into();
        let out = self
            .client
            .xrpc(
                None,
                sync::list_repos::NSID,
                Auth::None,
                Replay::Idempotent,
                |call| {
                    let params = params.clone();
                    async move {
                        AtpServiceClient::new(call)
                            .service
                            .com
                            .atproto
                            .sync
                            .list_repos(params)
                            .await
                    }
                },
            )
            .await?;
        let dids = out
            .data
            .repos
            .iter()
            .filter(|r| r.active != Some(false))
            .map(|r| r.did.as_str().to_string())
            .collect();
        Ok((dids, out.data.cursor))
    }
}

/// getRecord and listRecords, shared by the [`Reader`] (no account) and the
/// [`Writer`](crate::Writer) (its session).
impl Client {
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
}
