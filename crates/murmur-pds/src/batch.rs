//! applyWrites batches: many writes, one commit, all or nothing.

use atrium_api::client::AtpServiceClient;
use atrium_api::com::atproto::repo::apply_writes;
use atrium_api::types::Collection;
use ipld_core::cid::Cid;
use murmur_lexicon::Validate;

use crate::arguments::{nsid, record_key};
use crate::client::Replay;
use crate::encode::{self, MAX_REQUEST_JSON_BYTES};
use crate::written::commit_ref;
use crate::{CommitRef, Error, Result, Writer, Written};

/// Most writes the reference PDS accepts in one applyWrites call.
pub const MAX_BATCH_WRITES: usize = 200;

/// The outcome of one write in a batch, in the order the writes were added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// A record was created.
    Created(Written),
    /// A record was created or replaced.
    Updated(Written),
    /// A record was deleted.
    Deleted {
        /// The deleted record's `at://` URI.
        uri: String,
    },
}

impl BatchOutcome {
    /// The written record, for creates and updates.
    pub fn written(&self) -> Option<&Written> {
        match self {
            BatchOutcome::Created(w) | BatchOutcome::Updated(w) => Some(w),
            BatchOutcome::Deleted { .. } => None,
        }
    }
}

/// What one applyWrites call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchWritten {
    /// The single commit carrying every write.
    pub commit: Option<CommitRef>,
    /// One outcome per write, in order.
    pub outcomes: Vec<BatchOutcome>,
}

/// Builds an applyWrites call. Each record is validated and size-checked when it is added,
/// so a bad record is refused (with its index) before anything is sent.
///
/// A batch is not replayed after a failure that may have reached the server: it is atomic,
/// and a replay would fail on its own creates. It is retried on 429 and on connection
/// failures that never reached the server.
#[derive(Debug)]
pub struct Batch {
    writer: Writer,
    writes: Vec<apply_writes::InputWritesItem>,
    planned: Vec<(String, String, Option<Cid>)>,
    json_len: usize,
    swap_commit: Option<Cid>,
}

impl Batch {
    pub(crate) fn new(writer: Writer) -> Batch {
        Batch {
            writer,
            writes: Vec::new(),
            planned: Vec::new(),
            json_len: 0,
            swap_commit: None,
        }
    }

    /// Writes in the batch so far.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// True if nothing was added.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Makes the whole batch conditional on the repo's current commit being `commit`;
    /// otherwise [`Error::Conflict`] with [`Swap::Commit`](crate::Swap::Commit).
    pub fn swap_commit(&mut self, commit: Cid) -> &mut Self {
        self.swap_commit = Some(commit);
        self
    }

    fn index_error(&self, err: Error) -> Error {
        match err {
            Error::InvalidRecord {
                nsid,
                path,
                message,
            } => Error::InvalidRecord {
                nsid,
                path,
                message: format!("{message} (batch write #{})", self.writes.len()),
            },
            other => other,
        }
    }

    /// Adds a create with a fresh TID record key; returns that key.
    pub fn create<C>(&mut self, record: &C::Record) -> Result<String>
    where
        C: Collection,
        C::Record: Validate,
    {
        let rkey = self.writer.next_rkey();
        self.create_with_rkey::<C>(&rkey, record)?;
        Ok(rkey)
    }

    /// Adds a create under a chosen record key.
    pub fn create_with_rkey<C>(&mut self, rkey: &str, record: &C::Record) -> Result<&mut Self>
    where
        C: Collection,
        C::Record: Validate,
    {
        let enc = encode::encode::<C>(record).map_err(|e| self.index_error(e))?;
        self.writes
            .push(apply_writes::InputWritesItem::Create(Box::new(
                apply_writes::CreateData {
                    collection: nsid(C::NSID)?,
                    rkey: Some(record_key(rkey)?),
                    value: enc.value,
                }
                .into(),
            )));
        self.planned
            .push((C::NSID.to_string(), rkey.to_string(), Some(enc.cid)));
        self.json_len += enc.json_len;
        Ok(self)
    }

    /// Adds a create-or-replace at `rkey`.
    pub fn update<C>(&mut self, rkey: &str, record: &C::Record) -> Result<&mut Self>
    where
        C: Collection,
        C::Record: Validate,
    {
        let enc = encode::encode::<C>(record).map_err(|e| self.index_error(e))?;
        self.writes
            .push(apply_writes::InputWritesItem::Update(Box::new(
                apply_writes::UpdateData {
                    collection: nsid(C::NSID)?,
                    rkey: record_key(rkey)?,
                    value: enc.value,
                }
                .into(),
            )));
        self.planned
            .push((C::NSID.to_string(), rkey.to_string(), Some(enc.cid)));
        self.json_len += enc.json_len;
        Ok(self)
    }

    /// Adds a delete of `rkey`.
    pub fn delete<C>(&mut self, rkey: &str) -> Result<&mut Self>
    where
        C: Collection,
    {
        self.writes
            .push(apply_writes::InputWritesItem::Delete(Box::new(
                apply_writes::DeleteData {
                    collection: nsid(C::NSID)?,
                    rkey: record_key(rkey)?,
                }
                .into(),
            )));
        self.planned
            .push((C::NSID.to_string(), rkey.to_string(), None));
        Ok(self)
    }

    /// Sends the batch as one applyWrites call: every write lands in one commit, or none.
    pub async fn commit(self) -> Result<BatchWritten> {
        let count = self.writes.len();
        if count == 0 || count > MAX_BATCH_WRITES {
            return Err(Error::BatchSize {
                count,
                limit: MAX_BATCH_WRITES,
            });
        }
        if self.json_len > MAX_REQUEST_JSON_BYTES {
            return Err(Error::RecordTooLarge {
                nsid: "com.atproto.repo.applyWrites".into(),
                encoding: "JSON request body",
                size: self.json_len,
                limit: MAX_REQUEST_JSON_BYTES,
            });
        }
        let writer = self.writer.clone();
        let input: apply_writes::Input = apply_writes::InputData {
            repo: atrium_api::types::string::AtIdentifier::Did(
                atrium_api::types::string::Did::new(writer.did().to_string()).map_err(|e| {
                    Error::InvalidArgument {
                        what: "DID",
                        message: e.to_string(),
                    }
                })?,
            ),
            swap_commit: self.swap_commit.map(atrium_api::types::string::Cid::new),
            validate: None,
            writes: self.writes,
        }
        .into();
        let out = writer
            .call(apply_writes::NSID, Replay::NotIdempotent, |call| {
                let input = input.clone();
                async move {
                    AtpServiceClient::new(call)
                        .service
                        .com
                        .atproto
                        .repo
                        .apply_writes(input)
                        .await
                }
            })
            .await?;
        let results = out.data.results.unwrap_or_default();
        let mut outcomes = Vec::with_capacity(count);
        for (i, (collection, rkey, local_cid)) in self.planned.into_iter().enumerate() {
            let uri = format!("at://{}/{collection}/{rkey}", writer.did());
            let written = |uri: String, cid: Option<Cid>| Written {
                uri,
                cid: cid.or(local_cid).unwrap_or_default(),
                rkey: rkey.clone(),
                commit: out.data.commit.clone().map(commit_ref),
            };
            let outcome = match results.get(i) {
                Some(apply_writes::OutputResultsItem::CreateResult(r)) => {
                    BatchOutcome::Created(written(r.uri.clone(), Some(*r.cid.as_ref())))
                }
                Some(apply_writes::OutputResultsItem::UpdateResult(r)) => {
                    BatchOutcome::Updated(written(r.uri.clone(), Some(*r.cid.as_ref())))
                }
                Some(apply_writes::OutputResultsItem::DeleteResult(_)) => {
                    BatchOutcome::Deleted { uri }
                }
                // Older servers return no results: our locally computed CIDs stand in.
                None if local_cid.is_some() => BatchOutcome::Created(written(uri, None)),
                None => BatchOutcome::Deleted { uri },
            };
            outcomes.push(outcome);
        }
        Ok(BatchWritten {
            commit: out.data.commit.map(commit_ref),
            outcomes,
        })
    }
}
