//! The writer: one authenticated account on one PDS and its record operations (create, put,
//! delete, batches, blobs, reads of its own repo).

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use atrium_api::client::AtpServiceClient;
use atrium_api::com::atproto::{repo, server};
use atrium_api::types::string::{AtIdentifier, Did};
use atrium_api::types::{BlobRef, Collection};
use atrium_api::xrpc::{InputDataOrBytes, OutputDataOrBytes, XrpcClient, XrpcRequest};
use ipld_core::cid::Cid;
use murmur_lexicon::Validate;
use serde::Serialize;

use crate::arguments::{nsid, record_key};
use crate::client::{Auth, Client, Replay};
use crate::encode::{self, Encoded};
use crate::session::SessionCell;
use crate::transport::{Call, RateLimit};
use crate::written::commit_ref;
use crate::{
    Batch, CommitRef, Error, Page, Result, ServerLimits, Session, Stored, TidGenerator,
    WriterBuilder, Written,
};

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
            .field("pds", &self.inner.client.base())
            .finish_non_exhaustive()
    }
}

impl Writer {
    /// Starts configuring a writer for the PDS at `pds_url`.
    pub fn builder(pds_url: impl Into<String>) -> WriterBuilder {
        WriterBuilder::new(pds_url.into())
    }

    /// Logs in to `pds_url` with a handle or DID and a password; no session file.
    pub async fn login(pds_url: &str, identifier: &str, password: &str) -> Result<Writer> {
        Writer::builder(pds_url).login(identifier, password).await
    }

    /// A writer for `session`, kept in `file` (if any) on refresh.
    pub(crate) fn assemble(
        client: Client,
        session: Session,
        file: Option<PathBuf>,
    ) -> Result<Writer> {
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

    /// Writes the session to the session file, if there is one.
    pub(crate) fn persist_session(&self) -> Result<()> {
        self.inner.session.persist()
    }

    /// The account's DID: the repo every write goes to.
    pub fn did(&self) -> &str {
        self.inner.did.as_str()
    }

    /// The PDS base URL.
    pub fn pds_url(&self) -> &str {
        self.inner.client.base()
    }

    /// A copy of the current session (tokens stay wrapped in [`Secret`](crate::Secret)).
    pub fn session(&self) -> Session {
        self.inner.session.session()
    }

    /// Session refreshes attempted so far (by this writer and its clones).
    pub fn session_refreshes(&self) -> u64 {
        self.inner.session.refresh_attempts()
    }

    /// HTTP requests this writer (and its clones) has sent so far.
    pub fn http_requests(&self) -> u64 {
        self.inner.client.requests()
    }

    /// The RateLimit-* headers of the latest response that carried them.
    pub fn rate_limit(&self) -> Option<RateLimit> {
        self.inner.client.rate_limit()
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
        let backoff = self.inner.client.backoff();
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
            let Some(wait) = backoff.delay(tries - 1).filter(|_| may_have_landed) else {
                return Err(err);
            };
            tokio::time::sleep(wait).await;
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
