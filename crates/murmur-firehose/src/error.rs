//! The watcher's error type and the errors handlers return.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use murmur_sync::{StreamError, SyncError};

use crate::OpEvent;

/// Errors of the watcher itself (not of handlers).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FirehoseError {
    /// Reading or writing a state file (cursor, dedup, dead letters) failed.
    #[error("state file {path}: {reason}")]
    Store {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The watcher was configured inconsistently.
    #[error("watcher configuration: {0}")]
    Config(String),
    /// A source failed for good (reconnect attempts exhausted, or an error it must not retry).
    #[error("source {url}: {reason}")]
    Source {
        /// The source URL.
        url: String,
        /// Why it stopped.
        reason: String,
    },
    /// The server answered every reconnect with the same error frame: retrying blindly will
    /// not help, so the source stopped.
    #[error(
        "source {url}: the server answered {repeated} connections in a row with the error frame {error} (cursor {cursor:?}); {hint}",
        hint = error_frame_hint(error)
    )]
    ErrorFrame {
        /// The source URL.
        url: String,
        /// The error the server kept sending.
        error: StreamError,
        /// How many times in a row.
        repeated: u32,
        /// The cursor the watcher asked from.
        cursor: Option<i64>,
    },
    /// A stored cursor is not a sequence number any server sends (negative or beyond
    /// 2^53 - 1): the store was corrupted or written by something else.
    #[error(
        "the stored cursor of {source_url} is {seq}, which no server sends ({reason}); remove it from the cursor store (or the cursors/ directory of the state dir) to start from the live stream"
    )]
    InvalidCursor {
        /// The source URL.
        source_url: String,
        /// The stored value.
        seq: i64,
        /// Which rule it breaks.
        reason: String,
    },
}

fn error_frame_hint(error: &StreamError) -> &'static str {
    match error {
        StreamError::Other { error, .. } if error == "InvalidRequest" => {
            "the server may reject the cursor: check the stored cursor, or start without one"
        }
        _ => "check the source URL and the server",
    }
}

impl FirehoseError {
    pub(crate) fn store(path: &Path, e: impl std::fmt::Display) -> Self {
        FirehoseError::Store {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    }
}

/// What a handler returns when it did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HandlerError {
    /// A passing failure: run the handler again after a backoff (or after `after`).
    #[error("retryable: {reason}")]
    Retry {
        /// Why it failed.
        reason: String,
        /// Wait at least this long before the next attempt.
        after: Option<Duration>,
    },
    /// A permanent failure: send the op to the dead-letter store and move on.
    #[error("failed: {0}")]
    Fail(String),
}

impl HandlerError {
    /// A retryable error.
    pub fn retry(reason: impl std::fmt::Display) -> Self {
        HandlerError::Retry {
            reason: reason.to_string(),
            after: None,
        }
    }

    /// A permanent error.
    pub fn fail(reason: impl std::fmt::Display) -> Self {
        HandlerError::Fail(reason.to_string())
    }
}

/// Why an op (or a `#sync` event) never reached a handler.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The commit failed hash, signature, MST, proof or chain checks; the cause says which
    /// (e.g. [`SyncError::Unproven`] for an op of a `tooBig` commit the repo does not bear out).
    #[error("verification failed: {0}")]
    Verification(#[source] Arc<SyncError>),
    /// The record does not decode as its collection's type.
    #[error("record {path} does not decode as {nsid}: {reason}")]
    Decode {
        /// `collection/rkey`.
        path: String,
        /// The expected record type.
        nsid: &'static str,
        /// The decoder's message.
        reason: String,
    },
    /// The record decodes but breaks its lexicon.
    #[error("record {path} breaks lexicon {nsid}: {reason}")]
    Lexicon {
        /// `collection/rkey`.
        path: String,
        /// The lexicon.
        nsid: &'static str,
        /// The first broken constraint, with its JSON path.
        reason: String,
    },
    /// The handler reads `State<S>` but the watcher was given no such state.
    #[error("the handler needs State<{0}>, but the watcher has no such state (add .state(..))")]
    MissingState(&'static str),
    /// The handler takes another kind of event than this one (e.g. an `Identity` handler
    /// given a record op through `.tail(..)`).
    #[error("{path} is not a {wanted} event")]
    NotThisEvent {
        /// The op's path.
        path: String,
        /// The event the handler takes.
        wanted: &'static str,
    },
    /// The op carries no record where the handler needs one (e.g. a delete).
    #[error("op {path} has no record")]
    MissingRecord {
        /// `collection/rkey`.
        path: String,
    },
    /// The record holds a payload sealed for other agents (`agent.comms.defs#sealed`), or
    /// this watcher has no [`Keyring`](murmur_seal::Keyring) state: not for this agent.
    /// Someone else's mail rather than an attack; an [`Unsealed`](crate::Unsealed) handler
    /// is not called for it.
    #[error("record {path} is sealed for other agents")]
    NotForMe {
        /// `collection/rkey`.
        path: String,
    },
    /// A sealed payload addressed to this agent did not open: tampered, copied from another
    /// record or repo, sealed to a key this agent does not hold, or malformed. The reason
    /// says which.
    #[error("sealed field {field} of record {path} did not open: {reason}")]
    Sealed {
        /// `collection/rkey`.
        path: String,
        /// The record field holding the sealed payload.
        field: String,
        /// Why it did not open.
        reason: murmur_seal::OpenError,
    },
}

/// What was rejected: one op of a commit, or a whole `#sync` event.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Rejected {
    /// A record op (its record is absent when the commit failed verification).
    Op(OpEvent),
    /// A `#sync` event (it resets a repo's chain) that failed verification.
    Sync {
        /// The source URL.
        source: Arc<str>,
        /// The repo DID.
        did: String,
        /// The rev it claimed.
        rev: String,
        /// Its seq on the source.
        seq: i64,
    },
    /// A copy of a repo (`com.atproto.sync.getRepo`, for a backfill or a resync) that failed
    /// verification: none of its records reach handlers.
    Repo {
        /// The repo DID.
        did: String,
    },
}

impl Rejected {
    /// The repo DID.
    pub fn did(&self) -> &str {
        match self {
            Rejected::Op(op) => &op.data().did,
            Rejected::Sync { did, .. } | Rejected::Repo { did } => did,
        }
    }

    /// The event's seq on its source (0 for a repo copy).
    pub fn seq(&self) -> i64 {
        match self {
            Rejected::Op(op) => op.data().seq,
            Rejected::Sync { seq, .. } => *seq,
            Rejected::Repo { .. } => 0,
        }
    }

    /// The op, when an op was rejected.
    pub fn op(&self) -> Option<&OpEvent> {
        match self {
            Rejected::Op(op) => Some(op),
            Rejected::Sync { .. } | Rejected::Repo { .. } => None,
        }
    }

    /// `at://did/collection/rkey` for an op, `at://did` for a `#sync` or a repo copy.
    pub fn uri(&self) -> String {
        match self {
            Rejected::Op(op) => op.uri(),
            Rejected::Sync { did, .. } | Rejected::Repo { did } => format!("at://{did}"),
        }
    }
}
