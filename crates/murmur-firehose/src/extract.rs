//! Handler arguments: each is built from the op before the handler runs.

use std::marker::PhantomData;
use std::ops::Deref;

use atrium_api::types::Collection;
use murmur_lexicon::Validate;

use crate::route::Route;
use crate::{Action, OpEvent, Rejection};
use murmur_sync::Cid;

/// Something a handler can take as an argument, built from the op it handles.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a murmur handler argument",
    label = "not an extractor",
    note = "handler arguments are extractors: Record<C>, Created<C>, Updated<C>, Deleted<C>, Identity, AccountStatus, Author, RecordRef, CommitInfo, Origin, State<S> or OpEvent"
)]
pub trait FromOp: Sized + Send + 'static {
    /// The ops this argument selects, for the one argument of a handler that fixes its route
    /// ([`Record`], [`Created`], [`Updated`], [`Deleted`], [`Identity`], [`AccountStatus`]);
    /// `None` for every other extractor.
    const ROUTE: Option<Route> = None;

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
/// Its type fixes the handler's route: `Record<Task>` handles creates and updates of
/// `agent.comms.task`; [`Created`] and [`Updated`] select one of the two.
#[non_exhaustive]
pub struct Record<C: Collection> {
    /// The record.
    pub value: C::Record,
    /// `at://did/collection/rkey`.
    pub uri: String,
    /// The record's CID, hash-checked against the record bytes.
    pub cid: Cid,
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
            cid: atrium_api::types::string::Cid::new(self.cid),
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
    const ROUTE: Option<Route> = Some(Route::records::<C>());

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
        let cid = data.cid.ok_or_else(|| Rejection::Decode {
            path: data.path.clone(),
            nsid: C::NSID,
            reason: "the op has a record but no record CID".into(),
        })?;
        Ok(Record {
            value,
            uri: op.uri(),
            cid,
        })
    }
}

/// A created record of collection `C`: a [`Record`] whose handler sees creates only.
///
/// Derefs to the [`Record`] (and on to the record value).
#[derive(Debug)]
pub struct Created<C: Collection>(pub Record<C>);

/// An updated record of collection `C` (a putRecord on an existing key): a [`Record`], the
/// new version, whose handler sees updates only. The former CID is in [`RecordRef::prev`].
///
/// Derefs to the [`Record`] (and on to the record value).
#[derive(Debug)]
pub struct Updated<C: Collection>(pub Record<C>);

macro_rules! one_action_record {
    ($name:ident, $action:expr) => {
        impl<C: Collection> $name<C> {
            /// The record.
            pub fn into_inner(self) -> C::Record {
                self.0.value
            }

            /// The [`Record`] extractor it wraps.
            pub fn into_record(self) -> Record<C> {
                self.0
            }
        }

        impl<C: Collection> Deref for $name<C> {
            type Target = Record<C>;
            fn deref(&self) -> &Record<C> {
                &self.0
            }
        }

        impl<C> FromOp for $name<C>
        where
            C: Collection + Send + 'static,
            C::Record: Validate + Send,
        {
            const ROUTE: Option<Route> = Some(Route::action::<C>($action));

            fn from_op(op: &OpEvent) -> Result<Self, Rejection> {
                Record::from_op(op).map($name)
            }
        }
    };
}

one_action_record!(Created, Action::Create);
one_action_record!(Updated, Action::Update);

/// A deleted record of collection `C`: its path and the CID it had.
#[non_exhaustive]
pub struct Deleted<C: Collection> {
    /// `at://did/collection/rkey` of the deleted record.
    pub uri: String,
    /// Its record key.
    pub rkey: String,
    /// The CID the record had before the delete (sync 1.1 sources send it).
    pub prev: Option<Cid>,
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
    const ROUTE: Option<Route> = Some(Route::action::<C>(Action::Delete));

    fn from_op(op: &OpEvent) -> Result<Self, Rejection> {
        Ok(Deleted {
            uri: op.uri(),
            rkey: op.rkey().to_string(),
            prev: op.data().prev,
            _collection: PhantomData,
        })
    }
}

/// How the op reached the watcher: [`Origin::Live`](crate::Origin::Live) from the stream,
/// [`Origin::Backfill`](crate::Origin::Backfill) from the repo copy taken when the watcher
/// joined, [`Origin::Resync`](crate::Origin::Resync) from the repo copy taken after a gap.
impl FromOp for crate::Origin {
    fn from_op(op: &OpEvent) -> Result<Self, Rejection> {
        Ok(op.origin())
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

/// Where the record is: at-uri, CIDs and record key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecordRef {
    /// `at://did/collection/rkey`.
    pub uri: String,
    /// The record's CID (absent for deletes).
    pub cid: Option<Cid>,
    /// The CID before this op (updates and deletes, from sync 1.1 sources).
    pub prev: Option<Cid>,
    /// The record key.
    pub rkey: String,
}

impl FromOp for RecordRef {
    fn from_op(op: &OpEvent) -> Result<Self, Rejection> {
        Ok(RecordRef {
            uri: op.uri(),
            cid: op.data().cid,
            prev: op.data().prev,
            rkey: op.rkey().to_string(),
        })
    }
}

/// The commit the op belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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

/// An `#identity` event: the DID's handle, signing key or PDS may have changed. A handler
/// taking it is called for every such event of the repos the DID filter admits, in order
/// with their commits. (The watcher itself re-resolves the DID's key before verifying its
/// next commit.)
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Identity {
    /// The DID.
    pub did: String,
    /// The handle the server reports now, if any (unverified: resolve it to trust it).
    pub handle: Option<String>,
    /// Sequence number on its source.
    pub seq: i64,
    /// When the server emitted it.
    pub time: String,
}

impl FromOp for Identity {
    const ROUTE: Option<Route> = Some(Route::repo_events(crate::op::IDENTITY_EVENTS));

    fn from_op(op: &OpEvent) -> Result<Self, Rejection> {
        let d = op.data();
        match &d.repo_event {
            Some(crate::RepoEvent::Identity { handle }) => Ok(Identity {
                did: d.did.clone(),
                handle: handle.clone(),
                seq: d.seq,
                time: d.time.clone(),
            }),
            _ => Err(Rejection::NotThisEvent {
                path: d.path.clone(),
                wanted: "#identity",
            }),
        }
    }
}

/// An `#account` event: whether the repo is active (hosted, its commits delivered) and, if
/// not, why. While a repo is not active the watcher delivers none of its commits, as the sync
/// spec asks; a handler taking `AccountStatus` hears of both changes, in order with the
/// commits.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AccountStatus {
    /// The DID.
    pub did: String,
    /// Whether the account is active.
    pub active: bool,
    /// Why not: `takendown`, `suspended`, `deactivated`, `deleted`, `desynchronized`,
    /// `throttled`, ...
    pub status: Option<String>,
    /// Sequence number on its source.
    pub seq: i64,
    /// When the server emitted it.
    pub time: String,
}

impl FromOp for AccountStatus {
    const ROUTE: Option<Route> = Some(Route::repo_events(crate::op::ACCOUNT_EVENTS));

    fn from_op(op: &OpEvent) -> Result<Self, Rejection> {
        let d = op.data();
        match &d.repo_event {
            Some(crate::RepoEvent::Account { active, status }) => Ok(AccountStatus {
                did: d.did.clone(),
                active: *active,
                status: status.clone(),
                seq: d.seq,
                time: d.time.clone(),
            }),
            _ => Err(Rejection::NotThisEvent {
                path: d.path.clone(),
                wanted: "#account",
            }),
        }
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
