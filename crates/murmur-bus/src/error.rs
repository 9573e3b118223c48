//! The bus's error type.

use murmur_firehose::FirehoseError;

/// What went wrong on the bus.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// The NATS server could not be reached (or refused the connection).
    #[error("NATS server {url}: {reason}")]
    Connect {
        /// The server URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// A JetStream request (stream, consumer or key-value bucket) failed.
    #[error("JetStream {what}: {reason}")]
    JetStream {
        /// What was asked (e.g. `create stream MURMUR`).
        what: String,
        /// The server's or client's answer.
        reason: String,
    },
    /// A stream exists under the name with a configuration the bus cannot use.
    #[error("stream {stream}: {reason}")]
    StreamMismatch {
        /// The stream name.
        stream: String,
        /// What does not fit.
        reason: String,
    },
    /// A message on the bus is not one the hub writes.
    #[error("malformed bus message: {reason}")]
    Message {
        /// What is wrong with it.
        reason: String,
    },
    /// The relay could not listen on its address.
    #[error("relay: cannot listen on {addr}: {reason}")]
    Listen {
        /// The address asked for.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The configuration is inconsistent.
    #[error("bus configuration: {0}")]
    Config(String),
    /// The hub's watcher failed.
    #[error(transparent)]
    Watcher(#[from] FirehoseError),
}

impl BusError {
    pub(crate) fn js(what: impl Into<String>, e: impl std::fmt::Display) -> Self {
        BusError::JetStream {
            what: what.into(),
            reason: e.to_string(),
        }
    }
}
