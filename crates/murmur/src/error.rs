//! The one error type of the Agent runtime.

use std::time::Duration;

/// Everything that can go wrong in the Agent runtime.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A write to the agent's own repo failed.
    #[error(transparent)]
    Write(#[from] murmur_pds::Error),

    /// The watcher could not be configured or stopped for good.
    #[error(transparent)]
    Watch(#[from] murmur_firehose::FirehoseError),

    /// Nobody answered a request in time. The task stays posted; a late result is still
    /// written to the worker's repo, but this handle no longer waits for it.
    #[error(
        "no result for task {task} after {:.1} s ({state}); start a worker with the task's \
         capability, or wait longer",
        waited.as_secs_f64()
    )]
    Timeout {
        /// at-uri of the task.
        task: String,
        /// How long the caller waited.
        waited: Duration,
        /// Where the task stood when the wait ended (open, assigned to a DID, ...).
        state: String,
    },

    /// Every allowed assignment of a task lapsed without a result (`maxAttempts` reached).
    #[error(
        "task {task} was given up after {attempts} attempt(s) whose leases lapsed; \
         raise maxAttempts or leaseSeconds, or check the workers"
    )]
    AttemptsExhausted {
        /// at-uri of the task.
        task: String,
        /// Assignments made.
        attempts: u32,
    },

    /// The agent was stopped while the caller was waiting.
    #[error("the agent stopped before the task {task} had a result; restart it and ask again")]
    Stopped {
        /// at-uri of the task.
        task: String,
    },

    /// The agent's own repo could not be read while rebuilding its open tasks at start.
    #[error(
        "could not read {what} to recover open tasks: {source}; check that the PDS is \
         reachable, or start without recovery (.recover(false))"
    )]
    Recover {
        /// What was being read.
        what: String,
        /// The read's error.
        #[source]
        source: murmur_pds::Error,
    },

    /// The agent was built without the requester role, so it cannot follow its own tasks.
    #[error(
        "this agent was built with .requester(false); build it with the requester role to call request()"
    )]
    NotARequester,

    /// A value the caller passed is malformed.
    #[error("invalid {what}: {message}")]
    InvalidArgument {
        /// What kind of value.
        what: &'static str,
        /// What is wrong with it.
        message: String,
    },

    /// Sealing needs this agent's encryption keys: build it with `.keyring(..)` or
    /// `.key_file(..)`.
    #[error(
        "this agent has no encryption keys; build it with .keyring(..) or .key_file(..) to seal or open payloads"
    )]
    NoKeyring,

    /// A recipient's encryption key could not be found.
    #[error(
        "no encryption key for {did}: {reason}; it must publish encryptionKeys in its agent.comms.profile"
    )]
    NoEncryptionKey {
        /// The recipient.
        did: String,
        /// Why not.
        reason: String,
    },

    /// Sealing a payload or using the key file failed (no key material in the message).
    #[error(transparent)]
    Seal(#[from] murmur_seal::Error),

    /// A sealed blob did not open for this agent: not a recipient
    /// ([`OpenError::NotForMe`](murmur_seal::OpenError::NotForMe)), tampered with, copied
    /// from another record or repo ([`OpenError::WrongContext`](murmur_seal::OpenError::WrongContext)),
    /// or sealed to a key this agent does not hold. The message names no content.
    #[error("sealed blob {cid} of {did} did not open: {reason}")]
    BlobOpen {
        /// The repo (author) the envelope is in.
        did: String,
        /// The blob's CID.
        cid: String,
        /// Why it did not open.
        #[source]
        reason: murmur_seal::OpenError,
    },

    /// A sealed blob could not be read intact from its author's PDS: not there
    /// ([`murmur_pds::Error::BlobNotFound`], naming the repo), larger than its ref says,
    /// bytes that do not hash to its CID ([`murmur_pds::Error::BlobMismatch`]), or the PDS
    /// unreachable.
    #[error("could not read blob {cid}: {source}")]
    BlobRead {
        /// The blob's CID.
        cid: String,
        /// The read's error.
        #[source]
        source: murmur_pds::Error,
    },

    /// The PDS hosting a DID could not be found (PLC or did:web look-up).
    #[error("could not find the PDS of {did}: {message}; check the PLC directory URL (.plc_url)")]
    Resolve {
        /// The DID.
        did: String,
        /// What went wrong.
        message: String,
    },
}
