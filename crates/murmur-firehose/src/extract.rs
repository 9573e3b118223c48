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

/// A created or updated record of collection `C` whose sealed payloads
/// (`agent.comms.defs#sealed`, in any top-level field) were opened for this agent: the
/// handler sees plaintext. Records with nothing sealed pass through as they are.
///
/// The agent's keys come from the watcher's state: `.state(keyring)` with a
/// [`murmur_seal::Keyring`]. A record sealed for others is rejected as
/// [`Rejection::NotForMe`] (as is every sealed record when there is no keyring); one that
/// does not open (tampered, copied from another record or repo, unknown key id) as
/// [`Rejection::Sealed`] with the reason. Neither reaches the handler; both reach
/// `on_rejected`.
#[non_exhaustive]
pub struct Unsealed<C: Collection> {
    /// The record with its sealed fields replaced by their plaintext.
    pub record: Record<C>,
    /// The fields that were sealed (empty when the record was public).
    pub sealed: Vec<String>,
}

impl<C: Collection> Unsealed<C> {
    /// The plaintext record.
    pub fn into_inner(self) -> C::Record {
        self.record.value
    }

    /// The [`Record`] (plaintext) it holds.
    pub fn into_record(self) -> Record<C> {
        self.record
    }

    /// Whether any field was sealed.
    pub fn was_sealed(&self) -> bool {
        !self.sealed.is_empty()
    }
}

impl<C: Collection> Deref for Unsealed<C> {
    type Target = Record<C>;
    fn deref(&self) -> &Record<C> {
        &self.record
    }
}

impl<C: Collection> std::fmt::Debug for Unsealed<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unsealed")
            .field("uri", &self.record.uri)
            .field("sealed", &self.sealed)
            .finish_non_exhaustive()
    }
}

impl<C> FromOp for Unsealed<C>
where
    C: Collection + Send + 'static,
    C::Record: Validate + Send,
{
    const ROUTE: Option<Route> = Some(Route::records::<C>());

    fn from_op(op: &OpEvent) -> Result<Self, Rejection> {
        let record = Record::<C>::from_op(op)?;
        let keys = op.state.get::<murmur_seal::Keyring>();
        let Record { value, uri, cid } = record;
        let (value, sealed) = unseal::<C>(value, &op.data().did, keys, &op.data().path)?;
        Ok(Unsealed {
            record: Record { value, uri, cid },
            sealed,
        })
    }
}

/// Opens the sealed top-level fields of `value`, a `C` record in `author`'s repo, with
/// `keys`: the plaintext record and the names of the fields that were sealed. The one
/// place sealed records are opened: the [`Unsealed`] extractor and reads of records from
/// repos both use it. `path` (`collection/rkey`) is for the rejection.
pub fn unseal<C: Collection>(
    value: C::Record,
    author: &str,
    keys: Option<&murmur_seal::Keyring>,
    path: &str,
) -> Result<(C::Record, Vec<String>), Rejection>
where
    C::Record: Validate,
{
    let reject = |field: &str, reason: murmur_seal::OpenError| Rejection::Sealed {
        path: path.to_string(),
        field: field.to_string(),
        reason,
    };
    let mut json = serde_json::to_value(&value).map_err(|e| Rejection::Decode {
        path: path.to_string(),
        nsid: C::NSID,
        reason: e.to_string(),
    })?;
    let Some(fields) = json.as_object_mut() else {
        return Err(Rejection::Decode {
            path: path.to_string(),
            nsid: C::NSID,
            reason: "the record is not an object".into(),
        });
    };
    let mut sealed = Vec::new();
    for (field, v) in fields.iter_mut() {
        if v.get("$type").and_then(|t| t.as_str()) != Some(murmur_seal::SEALED_TYPE) {
            continue;
        }
        let Some(keys) = keys else {
            return Err(Rejection::NotForMe {
                path: path.to_string(),
            });
        };
        let envelope: murmur_seal::Sealed = serde_json::from_value(v.clone()).map_err(|_| {
            reject(
                field,
                murmur_seal::OpenError::Malformed("not a #sealed object"),
            )
        })?;
        if envelope.validate().is_err() {
            return Err(reject(
                field,
                murmur_seal::OpenError::Malformed("breaks agent.comms.defs#sealed"),
            ));
        }
        let ctx = murmur_seal::Context::new(author, C::NSID, field.as_str());
        let plaintext = keys.open(&envelope, &ctx).map_err(|e| match e {
            murmur_seal::OpenError::NotForMe { .. } => Rejection::NotForMe {
                path: path.to_string(),
            },
            other => reject(field, other),
        })?;
        *v = serde_json::from_slice(&plaintext)
            .map_err(|e| reject(field, plaintext_json_error(&e)))?;
        sealed.push(field.clone());
    }
    if sealed.is_empty() {
        return Ok((value, sealed));
    }
    let opened: C::Record = serde_json::from_value(json)
        .map_err(|e| reject(&sealed.join(","), plaintext_json_error(&e)))?;
    // The lexicon's messages can quote the value: only where it broke is said.
    opened.validate().map_err(|e| Rejection::Lexicon {
        path: path.to_string(),
        nsid: C::NSID,
        reason: format!("the opened payload breaks the lexicon at {}", e.path),
    })?;
    Ok((opened, sealed))
}

/// What is wrong with an opened payload's JSON, without quoting it: serde's messages can
/// carry the plaintext (`invalid type: string "…"`), and rejections are logged.
fn plaintext_json_error(e: &serde_json::Error) -> murmur_seal::OpenError {
    use serde_json::error::Category;
    murmur_seal::OpenError::NotJson(match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            format!("not JSON (line {}, column {})", e.line(), e.column())
        }
        Category::Data => "JSON that does not fit the record type (content not shown)".into(),
    })
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

#[cfg(test)]
mod tests {
    use super::plaintext_json_error;

    #[test]
    fn errors_about_opened_payloads_never_quote_the_plaintext() {
        // serde's own message quotes the value; the rejection's must not.
        let wrong_type = serde_json::from_value::<u64>(serde_json::json!("TOPSECRET")).unwrap_err();
        assert!(wrong_type.to_string().contains("TOPSECRET"));
        let said = plaintext_json_error(&wrong_type).to_string();
        assert!(!said.contains("TOPSECRET"), "{said}");
        assert!(said.contains("does not fit the record type"), "{said}");

        let not_json = serde_json::from_slice::<serde_json::Value>(b"TOPSECRET").unwrap_err();
        let said = plaintext_json_error(&not_json).to_string();
        assert!(!said.contains("TOPSECRET"), "{said}");
        assert!(said.contains("not JSON (line 1, column 1)"), "{said}");
    }
}
