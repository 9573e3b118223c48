//! Trouble on a source that the watcher handled by its policy, reported instead of kept quiet.

use std::sync::Arc;
use std::time::Duration;

use murmur_sync::{StreamError, SyncError};

use crate::SourceError;

/// Something went wrong reading a source, and the watcher dealt with it without losing data:
/// it reconnected, retried, or skipped a frame that cannot be trusted. Each one is logged,
/// counted ([`MetricsSnapshot::errors`](crate::MetricsSnapshot::errors)) and passed to
/// [`WatcherBuilder::on_error`](crate::WatcherBuilder::on_error).
///
/// Missed events are not errors but [`Gap`](crate::Gap)s; records that fail verification are
/// [`Rejection`](crate::Rejection)s.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum WatchError {
    /// Connecting failed, or the handshake did not finish within the connect timeout. The
    /// watcher reconnects with backoff.
    Connect {
        /// The source URL.
        source: String,
        /// Why.
        error: SourceError,
    },
    /// An open connection ended. The watcher reconnects after the last event it read.
    Disconnected {
        /// The source URL.
        source: String,
        /// Why.
        error: SourceError,
    },
    /// The server sent an error frame (op -1) and closed the stream. The watcher reconnects;
    /// when the same error comes back [`ERROR_FRAME_REPEATS`](crate::ERROR_FRAME_REPEATS)
    /// times in a row with no event between, the source stops with
    /// [`FirehoseError::ErrorFrame`](crate::FirehoseError::ErrorFrame) (`FutureCursor`,
    /// `OutdatedCursor` and `ConsumerTooSlow` have policies of their own and never stop it).
    ErrorFrame {
        /// The source URL.
        source: String,
        /// The error the server sent.
        error: StreamError,
        /// How many times in a row the server has sent this error (1 the first time).
        repeated: u32,
    },
    /// A frame that does not decode was skipped (it has no trustworthy seq).
    UndecodableFrame {
        /// The source URL.
        source: String,
        /// What is wrong with it.
        error: Arc<SyncError>,
    },
    /// A frame whose seq no server would send (negative, beyond 2^53 - 1, or far ahead of the
    /// previous frame) was skipped: it does not move the cursor and its ops are not handled.
    InvalidSeq {
        /// The source URL.
        source: String,
        /// The seq it carried.
        seq: i64,
        /// The seq of the frame before it on this connection.
        previous: Option<i64>,
        /// Which rule it broke.
        reason: String,
    },
    /// A commit could not be verified because a host verification needs (the PLC directory,
    /// the repo's PDS) was unreachable. Nothing is skipped: the event stays unfinished (the
    /// cursor does not pass it) and is verified again after `retry_in`; reading this source
    /// waits meanwhile, so the DID's order is kept.
    VerificationStalled {
        /// The source URL.
        source: String,
        /// The repo whose event waits.
        did: String,
        /// The event's seq.
        seq: i64,
        /// Attempts so far (1 after the first failure).
        attempt: u32,
        /// When the next attempt starts.
        retry_in: Duration,
        /// What failed.
        error: Arc<SyncError>,
    },
    /// A [`Feed`](crate::Feed) ran into trouble it handles by its own policy (its server
    /// unreachable and retried, a message it could not decode and set aside).
    Feed {
        /// The feed's name.
        source: String,
        /// What happened.
        error: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// A backfill could not list a host's repos (`com.atproto.sync.listRepos` refused or
    /// unreadable): its repos are not copied in this run.
    Backfill {
        /// The host.
        source: String,
        /// Why.
        error: Arc<murmur_sync::SyncError>,
    },
}

impl WatchError {
    /// The source URL it happened on.
    pub fn source_url(&self) -> &str {
        match self {
            WatchError::Connect { source, .. }
            | WatchError::Disconnected { source, .. }
            | WatchError::ErrorFrame { source, .. }
            | WatchError::UndecodableFrame { source, .. }
            | WatchError::InvalidSeq { source, .. }
            | WatchError::VerificationStalled { source, .. }
            | WatchError::Feed { source, .. }
            | WatchError::Backfill { source, .. } => source,
        }
    }
}

impl std::fmt::Display for WatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WatchError::Connect { source, error } => {
                write!(f, "{source}: connect failed ({error}); reconnecting")
            }
            WatchError::Disconnected { source, error } => {
                write!(f, "{source}: disconnected ({error}); reconnecting")
            }
            WatchError::ErrorFrame {
                source,
                error,
                repeated,
            } => write!(
                f,
                "{source}: the server sent error frame {error} ({repeated} time(s) in a row)"
            ),
            WatchError::UndecodableFrame { source, error } => {
                write!(f, "{source}: undecodable frame skipped: {error}")
            }
            WatchError::InvalidSeq {
                source,
                seq,
                previous,
                reason,
            } => write!(
                f,
                "{source}: frame with seq {seq} skipped (previous {previous:?}): {reason}"
            ),
            WatchError::VerificationStalled {
                source,
                did,
                seq,
                attempt,
                retry_in,
                error,
            } => write!(
                f,
                "{source}: event {seq} of {did} waits for verification (attempt {attempt}, next in {retry_in:?}): {error}"
            ),
            WatchError::Feed { source, error } => write!(f, "{source}: {error}"),
            WatchError::Backfill { source, error } => {
                write!(
                    f,
                    "{source}: backfill could not list the host's repos: {error}"
                )
            }
        }
    }
}

impl std::error::Error for WatchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WatchError::Connect { error, .. } | WatchError::Disconnected { error, .. } => {
                Some(error)
            }
            WatchError::UndecodableFrame { error, .. }
            | WatchError::VerificationStalled { error, .. } => Some(error.as_ref()),
            WatchError::Feed { error, .. } => Some(error.as_ref()),
            WatchError::Backfill { error, .. } => Some(error.as_ref()),
            WatchError::ErrorFrame { .. } | WatchError::InvalidSeq { .. } => None,
        }
    }
}
