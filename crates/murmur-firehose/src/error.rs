//! The watcher's error type and the errors handlers return.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors of the watcher itself (not of handlers).
#[derive(Debug, thiserror::Error)]
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

/// Why an op never reached a typed handler.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The commit failed signature, hash, MST or chain checks.
    #[error("verification failed: {0}")]
    Verification(String),
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
    /// The op carries no record where the handler needs one (e.g. a delete).
    #[error("op {path} has no record")]
    MissingRecord {
        /// `collection/rkey`.
        path: String,
    },
}
