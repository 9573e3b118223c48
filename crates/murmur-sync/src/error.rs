//! The crate's one error type: every way bytes from the wire can be wrong or untrusted.

/// An error frame (op -1) sent by the server; the server closes the stream after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// The requested cursor is ahead of the server's sequence: ask again without a cursor.
    FutureCursor {
        /// The server's message, if any.
        message: Option<String>,
    },
    /// The consumer read too slowly and the server dropped it: reconnect from the last cursor.
    ConsumerTooSlow {
        /// The server's message, if any.
        message: Option<String>,
    },
    /// The cursor is older than the server's replay window: events were missed (a gap).
    ///
    /// The lexicon sends this as an `#info` message; some servers send it as an error frame.
    OutdatedCursor {
        /// The server's message, if any.
        message: Option<String>,
    },
    /// Any other error name.
    Other {
        /// The error name from the frame body.
        error: String,
        /// The server's message, if any.
        message: Option<String>,
    },
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (name, message) = match self {
            StreamError::FutureCursor { message } => ("FutureCursor", message),
            StreamError::ConsumerTooSlow { message } => ("ConsumerTooSlow", message),
            StreamError::OutdatedCursor { message } => ("OutdatedCursor", message),
            StreamError::Other { error, message } => (error.as_str(), message),
        };
        match message {
            Some(m) => write!(f, "{name}: {m}"),
            None => write!(f, "{name}"),
        }
    }
}

/// Everything that can go wrong decoding or verifying event-stream data.
///
/// Variants fall in five groups: malformed input (`Cbor`, `Frame`, `Car`, `Mst`, ...), limits
/// (`TooLarge`, `TooManyOps`, `TooDeep`), untrusted input (`BadSignature`, `CidMismatch`,
/// `MstInversion`, `CommitMismatch`, `Unproven`, ...), chain state (`RepoDesynchronized`,
/// `RevNotNewer`, `FutureRev`) and a host that could not be reached (`Unavailable`).
/// [`SyncError::is_desync`] tells the watcher when to emit a gap and re-fetch;
/// [`SyncError::is_transient`] when to retry later instead of rejecting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The server sent an error frame (op -1).
    #[error("the server sent an error frame: {0}")]
    Stream(StreamError),
    /// Bytes are not well-formed DAG-CBOR.
    #[error("malformed DAG-CBOR in {context} at byte {offset}: {reason}")]
    Cbor {
        /// What was being decoded (`frame header`, `commit block`, ...).
        context: &'static str,
        /// Byte offset into that input.
        offset: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A DAG-CBOR value did not have the expected shape.
    #[error("{context} does not match its schema: {reason}")]
    Decode {
        /// What was being decoded.
        context: &'static str,
        /// The decoder's explanation.
        reason: String,
    },
    /// The frame header is invalid (wrong `op`, missing `t`).
    #[error("invalid frame header: {0}")]
    Frame(String),
    /// An input is over its size limit.
    #[error("{what} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Which input (`frame`, `blocks`, `record`).
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit in force ([`crate::Limits`]).
        limit: usize,
    },
    /// A commit carries more ops than allowed.
    #[error("commit has {count} ops, over the limit of {limit}")]
    TooManyOps {
        /// Ops in the commit.
        count: usize,
        /// The limit in force.
        limit: usize,
    },
    /// DAG-CBOR nested deeper than allowed.
    #[error("{context} nests deeper than {limit} levels")]
    TooDeep {
        /// What was being decoded.
        context: &'static str,
        /// The limit in force.
        limit: usize,
    },
    /// A CAR slice is malformed.
    #[error("malformed CAR slice at byte {offset}: {reason}")]
    Car {
        /// Byte offset into the CAR bytes.
        offset: usize,
        /// What is wrong.
        reason: String,
    },
    /// A CID uses a codec or hash this crate does not accept (atproto: CIDv1, dag-cbor or raw, sha2-256).
    #[error("unsupported CID {cid}: {reason}")]
    UnsupportedCid {
        /// The CID.
        cid: String,
        /// Why it is not accepted.
        reason: &'static str,
    },
    /// A block's bytes do not hash to its CID: the data was altered.
    #[error("block {cid} does not hash to its CID (got {actual})")]
    CidMismatch {
        /// The CID the block claims.
        cid: String,
        /// The CID of its bytes.
        actual: String,
    },
    /// A block the verification needs is not in the CAR slice.
    #[error("block {cid} ({what}) is missing from the CAR slice")]
    MissingBlock {
        /// The missing CID.
        cid: String,
        /// What the block is (`commit`, `record`, `MST root`, `MST node`).
        what: &'static str,
    },
    /// The signed commit does not match the event that carried it.
    #[error(
        "signed commit does not match the event: {field} is {signed:?} in the commit but {event:?} in the event"
    )]
    CommitMismatch {
        /// The field that differs (`did`, `rev`, `commit`, `version`).
        field: &'static str,
        /// The value inside the signed commit.
        signed: String,
        /// The value in the event.
        event: String,
    },
    /// The commit signature does not verify with the DID's current signing key.
    #[error("commit {commit} of {did} has a bad signature: {reason}")]
    BadSignature {
        /// The repo DID.
        did: String,
        /// The commit CID.
        commit: String,
        /// Why it failed (`does not verify`, `high-S`, `malformed`).
        reason: &'static str,
    },
    /// A public key or did:key is malformed or of an unsupported curve.
    #[error("invalid public key {key:?}: {reason}")]
    InvalidKey {
        /// The key as given.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The DID could not be resolved to a document with an `#atproto` signing key.
    #[error("cannot resolve {did}: {reason}")]
    Resolve {
        /// The DID.
        did: String,
        /// What failed.
        reason: String,
    },
    /// The MST in the CAR slice is malformed (bad layer, unsorted keys, bad prefix).
    #[error("malformed MST node {node}: {reason}")]
    Mst {
        /// The node's CID.
        node: String,
        /// What is wrong.
        reason: String,
    },
    /// An MST operation failed: a key that is not a repo path, a key or node a partial tree
    /// does not hold, ops that do not match the tree ([`crate::MstError`]).
    #[error(transparent)]
    Tree(#[from] crate::MstError),
    /// The ops do not match the MST, or undoing them does not give `prevData`.
    #[error("MST inversion failed for {did} rev {rev}: {reason}")]
    MstInversion {
        /// The repo DID.
        did: String,
        /// The commit rev.
        rev: String,
        /// Which check failed.
        reason: String,
    },
    /// `since`/`prevData` do not follow the last commit seen for this DID: events were missed.
    ///
    /// The commit itself verified and is now the DID's chain head; the watcher should report a
    /// gap and re-fetch the repo (`com.atproto.sync.getRepo`).
    #[error("repo {did} desynchronized at rev {rev}: {reason}")]
    RepoDesynchronized {
        /// The repo DID.
        did: String,
        /// The rev of the commit that broke the chain.
        rev: String,
        /// What did not chain (`since` or `prevData` vs. the last commit).
        reason: String,
    },
    /// The rev is not newer than the last rev seen for this DID (a replay or reorder).
    #[error("rev {rev} of {did} is not newer than the last seen rev {last}")]
    RevNotNewer {
        /// The repo DID.
        did: String,
        /// The rejected rev.
        rev: String,
        /// The last rev seen.
        last: String,
    },
    /// The rev is a timestamp too far in the future.
    #[error("rev {rev} of {did} is {ahead_secs} s in the future (allowed: {allowed_secs} s)")]
    FutureRev {
        /// The repo DID.
        did: String,
        /// The rev.
        rev: String,
        /// How far ahead of now.
        ahead_secs: u64,
        /// The allowed clock skew.
        allowed_secs: u64,
    },
    /// A rev is not a valid TID.
    #[error("invalid rev {0:?}: not a TID")]
    InvalidRev(String),
    /// A record proof does not show the op: the proof of an op
    /// ([`crate::Verifier::verify_op_proof`]) is of another rev or its tree holds something
    /// else at the path (the op is forged or altered); or an op of a `tooBig` commit (whose
    /// CAR slice cannot prove its ops by MST inversion) is not borne out by the record's
    /// proof from the repo's PDS (`com.atproto.sync.getRecord`): the op is forged, or the
    /// record changed since.
    #[error("op {path} of {did} rev {rev} is not proven by the signed repo: {reason}")]
    Unproven {
        /// The repo DID.
        did: String,
        /// The rev of the commit that carried the op.
        rev: String,
        /// `collection/rkey`.
        path: String,
        /// What the proof showed instead.
        reason: String,
    },
    /// A host needed for verification could not be reached or answered with a passing
    /// failure (connection refused, timeout, HTTP 5xx or 429): nothing was learned about the
    /// data, so retry later rather than reject it.
    #[error("cannot reach {url} for {did} (a passing failure; retry later): {reason}")]
    Unavailable {
        /// The DID being resolved or fetched.
        did: String,
        /// The URL asked.
        url: String,
        /// The transport error or HTTP status.
        reason: String,
    },
    /// An event of a DID came from a host that is not the DID's PDS (its DID document's
    /// `#atproto_pds` endpoint): a host may only speak for the repos it hosts.
    #[error("{did} is hosted at {pds}, not at {source_host}: its events from there are not taken")]
    NotAuthoritative {
        /// The DID.
        did: String,
        /// The host the event came from.
        source_host: String,
        /// The DID's PDS, from its DID document (`none` when it names none).
        pds: String,
    },
    /// A repo or record proof could not be fetched (`com.atproto.sync.getRepo`/`getRecord`)
    /// for a reason retrying will not fix (e.g. HTTP 400).
    #[error("cannot fetch the repo of {did} from {url}: {reason}")]
    FetchRepo {
        /// The repo DID.
        did: String,
        /// The URL asked.
        url: String,
        /// What went wrong (HTTP status and body, or the transport error).
        reason: String,
    },
}

impl SyncError {
    /// True when the repo lost continuity and should be re-fetched (emit a gap).
    pub fn is_desync(&self) -> bool {
        matches!(self, SyncError::RepoDesynchronized { .. })
    }

    /// True when nothing is wrong with the data: a host it depends on (the PLC directory, a
    /// DID's PDS) was unreachable or overloaded. Keep the data and try again later; do not
    /// move a cursor past it.
    pub fn is_transient(&self) -> bool {
        matches!(self, SyncError::Unavailable { .. })
    }

    pub(crate) fn decode(context: &'static str, e: impl std::fmt::Display) -> Self {
        SyncError::Decode {
            context,
            reason: e.to_string(),
        }
    }
}
