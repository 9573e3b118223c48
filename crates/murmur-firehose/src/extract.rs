//! Handler arguments: each is built from the op before the handler runs.

use std::marker::PhantomData;
use std::ops::Deref;

use atrium_api::types::Collection;
use murmur_lexicon::Validate;

use crate::{OpEvent, Rejection};

/// Something a handler can take as an argument, built from the op it handles.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a murmur handler argument",
    label = "not an extractor",
    note = "handler arguments are extractors: Record<T>, Deleted<T>, Author, RecordRef, CommitInfo, State<S> or OpEvent"
)]
pub trait FromOp: Sized + Send + 'static {
    /// Builds the argument, or says why the op cannot reach this handler.
    fn from_op(op: &OpEvent) -> Result<Self, Rejection>;

    /// The shared state type this argument reads, so a missing `.state(..)` is reported when
    /// the watcher is built rather than on the first event.
    fn required_state() -> Option<(std::any::TypeId, &'static str)> {
        None
    }
}

impl FromOp for OpEvent {
    fn from_op(op: &OpEvent) -> Result<Self, Rejection> {
        Ok(op.clone())
    }
}

/// A created or updated record of collection `C`, decoded and lexicon-validated.
///
/// Its type fixes the handler's collection: `Record<Task>` handles `agent.comms.task`.
pub struct Record<C: Collection> {
    /// The record.
    pub value: C::Record,
    /// `at://did/collection/rkey`.
    pub uri: String,
    /// The record's CID.
    pub cid: atrium_api::types::string::Cid,
}

impl<C: Collection> Record<C> {
    /// The record.
    pub fn into_inner(self) -> C::Record {
        self.value
    }

    /// A strong reference (uri + cid) to this record, e.g. for a reply or a result.
    pub fn strong_ref(&self) -> atrium_api::com::atproto::repo::strong_ref::Main {
        atrium_api::com::atproto::repo::strong_ref::MainData {
            uri: self.uri.clone(),
            cid: self.cid.clone(),
        }
        .into()
    }
}

impl<C: Collection> Deref for Record<C> {
    type Target = C::Record;
    fn deref(&self) -> &C::Record {
        &self.value
    }
}

impl<C: Collection> std::fmt::Debug for Record<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("uri", &self.uri)
            .field("cid", &self.cid)
            .field("value", &self.value)
            .finish()
    }
}

impl<C> FromOp for Record<C>
where
    C: Collection + Send + 'static,
    C::Record: Validate + Send,
{
    fn from_op(op: &OpEvent) -> Result<Self, Rejection> {
        let data = op.data();
        let bytes = data
            .record
            .as_deref()
            .ok_or_else(|| Rejection::MissingRecord {
                path: data.path.clone(),
            })?;
        let value: C::Record =
            serde_ipld_dagcbor::from_slice(bytes).map_err(|e| Rejection::Decode {
                path: data.path.clone(),
                nsid: C::NSID,
                reason: e.to_string(),
            })?;
        value.validate().map_err(|e| Rejection::Lexicon {
            path: data.path.clone(),
            nsid: C::NSID,
            reason: e.to_string(),
        })?;
        let cid = data
            .cid
            .as_deref()
            .unwrap_or_default()
            .parse()
            .map_err(|e| Rejection::Decode {
                path: data.path.clone(),
                nsid: C::NSID,
                reason: format!("bad record cid: {e:?}"),
            })?;
        Ok(Record {
            value,
            uri: op.uri(),
            cid,
        })
    }
}

/// A deleted record of collection `C`: its path and the CID it had.
pub struct Deleted<C: Collection> {
    /// `at://did/collection/rkey` of the deleted record.
    pub uri: String,
    /// Its record key.
    pub rkey: String,
    /// The CID the record had before the delete.
    pub prev: Option<String>,
    _collection: PhantomData<fn() -> C>,
}

impl<C: Collection> std::fmt::Debug for Deleted<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deleted")
            .field("uri", &self.uri)
            .field("prev", &self.prev)
            .finish()
    }
}

impl<C: Collection + 'static> FromOp for Deleted<C> {
    fn from_op(op: &OpEvent) -> Result<Self, Rejection> {
        Ok(Deleted {
            uri: op.uri(),
            rkey: op.rkey().to_string(),
            prev: op.data().prev.clone(),
            _collection: PhantomData,
        })
    }
}

/// The DID of the repo the record lives in: who wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Author(pub String);

impl FromOp for Author {
    fn from_op(op: &OpEvent) -> Result<Self, Rejection> {
        Ok(Author(op.data().did.clone()))
    }
}

/// Where the record is: at-uri, CID and record key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRef {
    /// `at://did/collection/rkey`.
    pub uri: String,
    /// The record's CID (absent for deletes).
    pub cid: Option<String>,
    /// The record key.
    pub rkey: String,
}

impl FromOp for RecordRef {
    fn from_op(op: &OpEvent) -> Result<Self, Rejection> {
        Ok(RecordRef {
            uri: op.uri(),
            cid: op.data().cid.clone(),
            rkey: op.rkey().to_string(),
        })
    }
}

/// The commit the op belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitInfo {
    /// Commit revision.
    pub rev: String,
    /// Sequence number on its source.
    pub seq: i64,
    /// Commit time as reported by the source.
    pub time: String,
    /// The source URL.
    pub source: String,
}

impl FromOp for CommitInfo {
    fn from_op(op: &OpEvent) -> Result<Self, Rejection> {
        let d = op.data();
        Ok(CommitInfo {
            rev: d.rev.clone(),
            seq: d.seq,
            time: d.time.clone(),
            source: d.source.to_string(),
        })
    }
}

/// Shared state given to the watcher with `.state(value)`; handlers get a clone.
#[derive(Debug, Clone)]
pub struct State<S>(pub S);

impl<S> Deref for State<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.0
    }
}

impl<S: Clone + Send + Sync + 'static> FromOp for State<S> {
    fn from_op(op: &OpEvent) -> Result<Self, Rejection> {
        op.state
            .get::<S>()
            .cloned()
            .map(State)
            .ok_or(Rejection::MissingState(std::any::type_name::<S>()))
    }

    fn required_state() -> Option<(std::any::TypeId, &'static str)> {
        Some((std::any::TypeId::of::<S>(), std::any::type_name::<S>()))
    }
}
