//! Why sealing, a key file or opening failed.

use std::path::PathBuf;

/// Why a payload could not be sealed, or a key file not used. No message carries key
/// material or plaintext.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Sealing needs at least one recipient.
    #[error("a sealed payload needs at least one recipient")]
    NoRecipients,
    /// More recipients than the lexicon allows (100).
    #[error("{0} recipients: a sealed payload takes at most 100")]
    TooManyRecipients(usize),
    /// A recipient's public key is not a usable X25519 key (wrong length, or a low-order
    /// point that HPKE refuses).
    #[error("the encryption key {key_id} of {did} is not a usable X25519 public key")]
    BadPublicKey {
        /// The recipient.
        did: String,
        /// The key's id.
        key_id: String,
    },
    /// A keyring needs at least one key.
    #[error("a keyring needs at least one key")]
    NoKeys,
    /// A secret key is not 32 bytes.
    #[error("a secret key is 32 bytes")]
    BadSecretKey,
    /// The operating system's random number generator failed.
    #[error("the system random number generator failed: {0}")]
    Random(String),
    /// The key file cannot be read, written or understood; the message says what to do.
    #[error("key file {path}: {message}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// What went wrong (never the key itself).
        message: String,
    },
}

/// Why a sealed payload did not open for this agent: each is a typed outcome, never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The payload is sealed for other agents: this one is not among its recipients. Not an
    /// attack, just someone else's mail.
    #[error("sealed for other agents, not for {did}")]
    NotForMe {
        /// The agent that tried to open it.
        did: String,
    },
    /// This agent is a recipient, but through a key id it does not hold (a key rotated away
    /// and deleted, or a key id that was never this agent's).
    #[error("sealed to key id {key_id}, which this agent does not hold")]
    UnknownKey {
        /// The key id named in the payload.
        key_id: String,
    },
    /// The payload was sealed for another author, collection or field: it was copied from
    /// another record (or another repo) into this one.
    #[error(
        "sealed for another record context (author, collection or field): copied from elsewhere"
    )]
    WrongContext,
    /// The payload does not authenticate: its ciphertext, keys or recipient list were
    /// changed after sealing.
    #[error("the sealed payload does not authenticate: it was tampered with")]
    Tampered,
    /// The scheme is not one this version opens.
    #[error("sealed with scheme {0:?}, which this version does not open")]
    UnsupportedScheme(String),
    /// A field is not what the scheme needs (bad base64url, wrong length, no ciphertext).
    #[error("malformed sealed payload: {0}")]
    Malformed(&'static str),
    /// The plaintext is not the JSON the record type needs.
    #[error("the opened payload is not valid JSON for its field: {0}")]
    NotJson(String),
}
