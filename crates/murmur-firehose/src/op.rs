//! One verified record op as handlers see it.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

pub use murmur_sync::Action;

/// Shared application state, looked up by type by the [`State`](crate::State) extractor.
#[derive(Default, Clone)]
pub(crate) struct StateMap(HashMap<TypeId, Arc<dyn Any + Send + Sync>>);

impl StateMap {
    pub(crate) fn insert<S: Send + Sync + 'static>(&mut self, value: S) {
        self.0.insert(TypeId::of::<S>(), Arc::new(value));
    }

    pub(crate) fn get<S: Send + Sync + 'static>(&self) -> Option<&S> {
        self.0
            .get(&TypeId::of::<S>())
            .and_then(|v| v.downcast_ref())
    }

    pub(crate) fn contains(&self, id: TypeId) -> bool {
        self.0.contains_key(&id)
    }
}

/// A verified record op: one entry of a commit's `ops`, with its record.
///
/// Cheap to clone (shared). Its idempotency key is [`OpEvent::key`]: (did, rev, path).
#[derive(Clone)]
pub struct OpEvent {
    pub(crate) inner: Arc<OpData>,
    pub(crate) state: Arc<StateMap>,
    pub(crate) attempts: Arc<AtomicU32>,
}

/// The data of an [`OpEvent`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OpData {
    /// The source (PDS or relay URL) the event came from.
    pub source: Arc<str>,
    /// Repo DID (the author).
    pub did: String,
    /// Commit revision (a TID).
    pub rev: String,
    /// Sequence number on its source.
    pub seq: i64,
    /// Commit time as the source reported it (RFC 3339).
    pub time: String,
    /// What happened.
    pub action: Action,
    /// `collection/rkey`.
    pub path: String,
    /// CID of the new record (absent for deletes).
    pub cid: Option<murmur_sync::Cid>,
    /// CID of the record before this op (updates and deletes, sync 1.1).
    pub prev: Option<murmur_sync::Cid>,
    /// The record, DAG-CBOR encoded, hash-checked against `cid` (absent for deletes).
    pub record: Option<Vec<u8>>,
    /// For an `#identity` or `#account` event (path `#identity/{seq}` or `#account/{seq}`,
    /// action `Update`, no rev): what it says. `None` for record ops.
    pub repo_event: Option<RepoEvent>,
    /// A CAR with the signed commit at its root that proves this op: the commit's whole CAR
    /// slice when the watcher keeps proofs
    /// ([`WatcherBuilder::keep_proofs`](crate::WatcherBuilder::keep_proofs)), shared by the
    /// commit's ops; `None` otherwise.
    pub proof: Option<Arc<[u8]>>,
    /// The original `subscribeRepos` frame (header and body, as the source sent it) of the
    /// verified `#commit`, `#identity` or `#account` event this op came from, when the watcher
    /// keeps frames ([`WatcherBuilder::keep_frames`](crate::WatcherBuilder::keep_frames)):
    /// shared by the commit's ops; `None` otherwise and for ops from a copy of the repo.
    pub frame: Option<Arc<[u8]>>,
    /// How the op reached the watcher: from the stream, or from a copy of the repo (a
    /// backfill, or a resync after a gap).
    pub origin: Origin,
    /// Whether the op was checked against its author's signature ([`Provenance::Verified`])
    /// or taken as its upstream sent it ([`Provenance::Unverified`]: e.g. from Jetstream
    /// without proofs).
    pub provenance: Provenance,
}

/// Whether an op was checked against its author's signature. Every op's record hashes to its
/// CID either way; only a verified one is known to be the author's.
///
/// An op is unverified unless whoever made it checked it: [`OpData::new`] makes unverified
/// ops (a [`Feed`](crate::Feed) that verifies an op says so with
/// [`OpData::with_provenance`]). `#identity` and `#account` events are never signed, so they
/// are always unverified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Provenance {
    /// Proven from a commit signed by the author's key: the event's commit and MST path, a
    /// repo copy, or a proof fetched from the author's PDS (`com.atproto.sync.getRecord`).
    Verified,
    /// Taken as the upstream sent it, with nothing tying it to the author's key: an op read
    /// from Jetstream without [`jetstream_proofs`](crate::WatcherBuilder::jetstream_proofs),
    /// from a bus consumer that trusts its hub, or verified at
    /// [`VerifyLevel::None`](murmur_sync::VerifyLevel::None). Whoever runs the upstream could
    /// have made it up.
    #[default]
    Unverified,
}

impl Provenance {
    /// `"verified"` or `"unverified"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Provenance::Verified => "verified",
            Provenance::Unverified => "unverified",
        }
    }
}

/// How an op reached the watcher. Ops from a copy of the repo (`getRepo`) carry the repo's
/// rev at the time of the copy, its time (from the rev), seq 0 and no proof; an op that
/// changed a record carries the CID the watcher had seen before in `prev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Origin {
    /// Read from the stream (or a feed) as it happened.
    #[default]
    Live,
    /// A record the repo already held when the watcher joined
    /// ([`WatcherBuilder::backfill`](crate::WatcherBuilder::backfill)).
    Backfill,
    /// A change the stream did not deliver (a broken rev chain, a `#sync`, a seq regression,
    /// an unprovable `tooBig` commit), found by diffing a fresh copy of the repo against the
    /// records the watcher had seen.
    Resync,
}

impl Origin {
    /// `"live"`, `"backfill"` or `"resync"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Origin::Live => "live",
            Origin::Backfill => "backfill",
            Origin::Resync => "resync",
        }
    }
}

impl OpData {
    /// A record op of `did` at commit `rev` (for a [`Feed`](crate::Feed) to deliver): no CID,
    /// record or previous CID yet (see [`with_record`](Self::with_record),
    /// [`with_prev`](Self::with_prev)).
    pub fn new(
        source: impl Into<Arc<str>>,
        did: impl Into<String>,
        rev: impl Into<String>,
        seq: i64,
        time: impl Into<String>,
        action: Action,
        path: impl Into<String>,
    ) -> Self {
        OpData {
            source: source.into(),
            did: did.into(),
            rev: rev.into(),
            seq,
            time: time.into(),
            action,
            path: path.into(),
            cid: None,
            prev: None,
            record: None,
            repo_event: None,
            proof: None,
            frame: None,
            origin: Origin::Live,
            provenance: Provenance::Unverified,
        }
    }

    /// An `#identity` or `#account` event of `did` (path `#identity/{seq}` or
    /// `#account/{seq}`, action `Update`, the event's time standing in for a rev).
    pub fn repo_event(
        source: impl Into<Arc<str>>,
        did: impl Into<String>,
        seq: i64,
        time: impl Into<String>,
        event: RepoEvent,
    ) -> Self {
        let time = time.into();
        // A sync or an empty commit has a rev of its own; the others' time stands in for one.
        let rev = match &event {
            RepoEvent::Sync { rev } | RepoEvent::EmptyCommit { rev } => rev.clone(),
            _ => time.clone(),
        };
        let path = format!("{}/{seq}", event.kind());
        OpData {
            repo_event: Some(event),
            ..OpData::new(source, did, rev, seq, time, Action::Update, path)
        }
    }

    /// Sets the new record's CID, and its DAG-CBOR bytes when known.
    pub fn with_record(mut self, cid: murmur_sync::Cid, record: Option<Vec<u8>>) -> Self {
        self.cid = Some(cid);
        self.record = record;
        self
    }

    /// Sets whether the op was checked against its author's signature (a feed that delivers
    /// ops it did not verify says [`Provenance::Unverified`]).
    pub fn with_provenance(mut self, provenance: Provenance) -> Self {
        self.provenance = provenance;
        self
    }

    /// Sets the CID the record had before this op.
    pub fn with_prev(mut self, prev: Option<murmur_sync::Cid>) -> Self {
        self.prev = prev;
        self
    }

    /// The collection NSID (or `#identity`/`#account`).
    pub fn collection(&self) -> &str {
        self.path.split_once('/').map_or(&self.path, |(c, _)| c)
    }
}

/// What an `#identity` or `#account` event says about a repo (or, for a relay, a verified
/// `#sync` or empty commit whose frame is passed on).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RepoEvent {
    /// The DID's identity (handle, signing key, PDS) may have changed.
    Identity {
        /// The handle the server reports now, if any.
        handle: Option<String>,
    },
    /// The account's hosting status changed.
    Account {
        /// Whether the repo is active (its commits are delivered).
        active: bool,
        /// Why not (`takendown`, `suspended`, `deactivated`, `deleted`, ...).
        status: Option<String>,
    },
    /// A verified `#sync`: the repo's current signed commit, which replaces its rev chain.
    /// Passed on only by a watcher that keeps frames
    /// ([`WatcherBuilder::keep_frames`](crate::WatcherBuilder::keep_frames)), to its tail,
    /// so a relay can serve the frame; handlers never get it.
    Sync {
        /// The commit's rev.
        rev: String,
    },
    /// A verified `#commit` that changed no record (a new account's first commit). Passed on
    /// as [`RepoEvent::Sync`] is, so a relay's consumers see an unbroken rev chain.
    EmptyCommit {
        /// The commit's rev.
        rev: String,
    },
}

/// The pseudo-collection of `#identity` events in [`OpData::path`] and routes. NSIDs never
/// start with `#`, so it cannot clash with a record collection.
pub const IDENTITY_EVENTS: &str = "#identity";
/// The pseudo-collection of `#account` events (see [`IDENTITY_EVENTS`]).
pub const ACCOUNT_EVENTS: &str = "#account";
/// The pseudo-collection of verified `#sync` events ([`RepoEvent::Sync`]).
pub const SYNC_EVENTS: &str = "#sync";
/// The pseudo-collection of verified commits without ops ([`RepoEvent::EmptyCommit`]).
pub const EMPTY_COMMITS: &str = "#commit";

impl RepoEvent {
    /// The event's pseudo-collection: [`IDENTITY_EVENTS`], [`ACCOUNT_EVENTS`],
    /// [`SYNC_EVENTS`] or [`EMPTY_COMMITS`].
    pub fn kind(&self) -> &'static str {
        match self {
            RepoEvent::Identity { .. } => IDENTITY_EVENTS,
            RepoEvent::Account { .. } => ACCOUNT_EVENTS,
            RepoEvent::Sync { .. } => SYNC_EVENTS,
            RepoEvent::EmptyCommit { .. } => EMPTY_COMMITS,
        }
    }

    /// Whether it only carries a frame for a relay ([`RepoEvent::Sync`],
    /// [`RepoEvent::EmptyCommit`]): no handler takes it.
    pub fn is_frame_only(&self) -> bool {
        matches!(self, RepoEvent::Sync { .. } | RepoEvent::EmptyCommit { .. })
    }
}

impl OpEvent {
    pub(crate) fn new(data: OpData, state: Arc<StateMap>) -> Self {
        OpEvent {
            inner: Arc::new(data),
            state,
            attempts: Arc::new(AtomicU32::new(0)),
        }
    }

    /// The op's data.
    pub fn data(&self) -> &OpData {
        &self.inner
    }

    /// The collection NSID.
    pub fn collection(&self) -> &str {
        self.inner
            .path
            .split_once('/')
            .map_or(&self.inner.path, |(c, _)| c)
    }

    /// The record key.
    pub fn rkey(&self) -> &str {
        self.inner.path.split_once('/').map_or("", |(_, r)| r)
    }

    /// `at://did/collection/rkey`.
    pub fn uri(&self) -> String {
        let (did, path) = (&self.inner.did, &self.inner.path);
        let mut uri = String::with_capacity("at://".len() + did.len() + 1 + path.len());
        for part in ["at://", did, "/", path] {
            uri.push_str(part);
        }
        uri
    }

    /// The idempotency key (did, rev, path).
    pub fn key(&self) -> crate::OpKey {
        crate::OpKey {
            did: self.inner.did.clone(),
            rev: self.inner.rev.clone(),
            path: self.inner.path.clone(),
        }
    }

    /// How the op reached the watcher (live, backfill, resync).
    pub fn origin(&self) -> Origin {
        self.inner.origin
    }

    /// Whether the op was checked against its author's signature (see [`Provenance`]).
    pub fn provenance(&self) -> Provenance {
        self.inner.provenance
    }

    /// How many times a handler has started on this op so far.
    pub fn attempts(&self) -> u32 {
        self.attempts.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for OpEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpEvent")
            .field("did", &self.inner.did)
            .field("rev", &self.inner.rev)
            .field("seq", &self.inner.seq)
            .field("action", &self.inner.action)
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}
