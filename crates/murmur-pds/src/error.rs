//! The one error type of the writer.

use std::path::PathBuf;
use std::time::Duration;

use crate::RateLimit;

/// Everything that can go wrong while writing to a PDS.
///
/// No variant ever carries a token or a password.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The record breaks its lexicon. Nothing was sent.
    #[error("{nsid} record is invalid at {path}: {message}; fix that field before writing")]
    InvalidRecord {
        /// Collection NSID of the record.
        nsid: String,
        /// JSON path of the offending field, e.g. `$.text`.
        path: String,
        /// What is wrong with it.
        message: String,
    },

    /// The record is too large once encoded. Nothing was sent.
    #[error(
        "{nsid} record is {size} bytes as {encoding}, over the {limit}-byte limit; \
         move large content into a blob (Writer::upload_blob) and reference it"
    )]
    RecordTooLarge {
        /// Collection NSID of the record.
        nsid: String,
        /// `DAG-CBOR` or `JSON request body`.
        encoding: &'static str,
        /// Encoded size.
        size: usize,
        /// The limit it broke.
        limit: usize,
    },

    /// An applyWrites batch is empty or has more writes than the PDS accepts. Nothing was sent.
    #[error("a batch holds {count} writes; applyWrites takes 1 to {limit}: split the batch")]
    BatchSize {
        /// Writes in the batch.
        count: usize,
        /// Most writes per batch.
        limit: usize,
    },

    /// A blob is over the server's upload limit. Nothing was sent.
    #[error(
        "blob is {size} bytes, over the PDS's upload limit of {limit} bytes; \
         compress or split it"
    )]
    BlobTooLarge {
        /// Blob size.
        size: usize,
        /// The server's `blobUploadLimit`.
        limit: usize,
    },

    /// A swapRecord or swapCommit precondition failed: someone else changed the record or
    /// the repo first. Re-read, merge and write again.
    #[error("write conflict ({swap}): {message}; re-read the current version and retry")]
    Conflict {
        /// Which precondition failed.
        swap: Swap,
        /// The server's message.
        message: String,
    },

    /// A value the caller passed is malformed (record key, DID, NSID, URL...). Nothing was sent.
    #[error("invalid {what}: {message}")]
    InvalidArgument {
        /// What kind of value.
        what: &'static str,
        /// What is wrong with it.
        message: String,
    },

    /// Login was refused.
    #[error("login refused by the PDS ({error}): check the handle or DID and the (app) password")]
    LoginRefused {
        /// The XRPC error name, e.g. `AuthenticationRequired`.
        error: String,
    },

    /// The session can no longer be refreshed (refresh token expired or revoked).
    #[error("the session has expired and could not be refreshed ({error}); log in again")]
    SessionExpired {
        /// The XRPC error name, e.g. `ExpiredToken`.
        error: String,
    },

    /// The session was issued by another PDS than the one this writer talks to. Its tokens
    /// are only ever sent to the host that issued them, so nothing was sent.
    #[error(
        "the session belongs to the PDS at {session_pds}, not to {pds}; its tokens are sent \
         only to the host that issued them: log in to {pds} (or point the writer at \
         {session_pds})"
    )]
    SessionPdsMismatch {
        /// The PDS named in the session (normalised to scheme, host and port).
        session_pds: String,
        /// The PDS the writer was built for.
        pds: String,
    },

    /// The PDS answered with a redirect to another host (scheme, host or port). The writer
    /// does not follow it: tokens and passwords go only to the PDS itself.
    #[error(
        "the PDS at {from} redirected to another host ({to}); tokens and passwords are sent \
         only to the PDS itself: use the PDS's own URL"
    )]
    RedirectRefused {
        /// Origin (scheme, host, port) of the PDS that answered with the redirect.
        from: String,
        /// Origin the redirect pointed to.
        to: String,
    },

    /// Reading or writing the session file failed.
    #[error("session file {}: {message}", path.display())]
    SessionFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },

    /// The PDS is rate-limiting us and asked for a longer wait than the retry policy allows.
    #[error(
        "rate limited by the PDS{}; wait and retry, or raise RetryPolicy::max_rate_limit_wait",
        retry_after.map(|d| format!(" for {:.1} s", d.as_secs_f64())).unwrap_or_default()
    )]
    RateLimited {
        /// How long the server asked us to wait, from Retry-After or RateLimit-Reset.
        retry_after: Option<Duration>,
        /// The RateLimit-* headers of the refusal.
        limit: Option<RateLimit>,
    },

    /// The PDS could not be reached, or the connection broke. `sent` says whether the request
    /// may have reached the server (then a non-idempotent write may or may not have happened).
    #[error(
        "could not reach the PDS at {url} after {attempts} attempt(s): {message}; \
         check that it is running and reachable"
    )]
    Unreachable {
        /// The PDS base URL.
        url: String,
        /// The transport's description.
        message: String,
        /// Attempts made.
        attempts: u32,
        /// Whether the last attempt may have reached the server.
        sent: bool,
    },

    /// The PDS answered with an XRPC error not covered by another variant.
    #[error("the PDS refused {nsid} with {status} {error}: {message}")]
    Xrpc {
        /// The XRPC method.
        nsid: &'static str,
        /// HTTP status.
        status: u16,
        /// XRPC error name (`InvalidRequest`, `InternalServerError`...).
        error: String,
        /// The server's message, if any.
        message: String,
    },

    /// The PDS's answer was larger than the caller allows (a blob over the size its ref
    /// declares, or over the cap given to [`Reader::get_blob`](crate::Reader::get_blob));
    /// reading stopped there and nothing of it is returned.
    #[error(
        "the PDS's answer to {nsid} is over the {limit} bytes allowed; it was not read further"
    )]
    ResponseTooLarge {
        /// The XRPC method.
        nsid: &'static str,
        /// The cap it broke.
        limit: usize,
    },

    /// The PDS has no blob with this CID in this repo (or it is not referenced by a record
    /// yet: a PDS serves only blobs a record points to).
    #[error("the PDS has no blob {cid} in the repo of {did}")]
    BlobNotFound {
        /// The repo.
        did: String,
        /// The CID asked for.
        cid: String,
    },

    /// The bytes the PDS served for a blob do not hash to the blob's CID: a broken or
    /// hostile server. They were discarded.
    #[error(
        "the PDS served bytes for blob {cid} of {did} that do not hash to that CID; \
         they were discarded"
    )]
    BlobMismatch {
        /// The repo the blob was read from.
        did: String,
        /// The CID asked for.
        cid: String,
    },

    /// A record read back does not decode into the requested type.
    #[error("{uri} does not decode as {nsid}: {message}")]
    Decode {
        /// The record.
        uri: String,
        /// The type it was read as.
        nsid: String,
        /// The decoder's message.
        message: String,
    },

    /// The PDS answered something that is not valid XRPC; a server bug or a wrong URL.
    #[error("unexpected response from the PDS for {nsid}: {message}; is the URL a PDS?")]
    Protocol {
        /// The XRPC method.
        nsid: &'static str,
        /// What was wrong.
        message: String,
    },
}

/// Which compare-and-swap precondition failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swap {
    /// `swapRecord` on putRecord / deleteRecord.
    Record,
    /// `swapCommit` on applyWrites (or another write).
    Commit,
}

impl std::fmt::Display for Swap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Swap::Record => "swapRecord",
            Swap::Commit => "swapCommit",
        })
    }
}

impl Error {
    /// True for a swapRecord / swapCommit conflict.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
