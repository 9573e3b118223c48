//! Rust SDK for AI agents that coordinate over the AT Protocol.
//!
//! An [`Agent`] is one identity: a [`Writer`](pds::Writer) for its own repo and a
//! [`Watcher`](firehose::Watcher) over the event streams of every PDS host of the swarm.
//! Agents talk through `agent.comms.*` records ([`comms`]): messages ([`Agent::send`]),
//! profiles and presence (the [`Registry`]), and the task protocol:
//!
//! 1. the requester posts a `task` ([`Agent::request`]);
//! 2. workers with a free slot post a `claim` ([`Worker`]);
//! 3. the requester creates one `assignment` at the task's record key for the claim its
//!    [`ClaimPolicy`] chooses (default [`FirstCome`]; [`AgentBuilder::claim_window`] lets it
//!    compare the claims of a short window) — one record per key, so exactly one winner;
//!    other claimants see it and stand down;
//! 4. the assigned worker renews its lease with `status` records and writes one `result` at
//!    the task's record key;
//! 5. if the lease lapses the requester withdraws the assignment (delete with swapRecord),
//!    which reopens the task for a new claim; after `maxAttempts` lapses it gives up;
//! 6. the first result matching the task's strongRef is accepted: the requester writes an
//!    `ack` (`accepted`, subject the result) at the task's record key, which closes the task
//!    for good, then completes [`TaskHandle::await_result`]; any later result is counted as
//!    a duplicate.
//!
//! The repo is the source of truth: a requester that restarts (same identity, with or
//! without its state directory) rebuilds its open tasks — those without a closing ack — from
//! its own records and the workers' repos, accepts results written while it was away, keeps
//! watching leases, and assigns the rest ([`AgentBuilder::recover`],
//! [`Agent::recovered_tasks`]).
//!
//! A worker that joins late learns the tasks posted before it started from the repos too:
//! an agent with a worker copies its peers' repos (or every repo the watched hosts list)
//! when it starts ([`AgentBuilder::backfill`]) and reads the copied records as it reads the
//! stream. A task with an ack at its key is closed, one whose assignment names another
//! worker is taken (until that assignment is withdrawn or its lapse recorded), one it
//! answered already is done; the open ones are claimed like fresh ones.
//!
//! ```no_run
//! use std::time::Duration;
//! use murmur::{Agent, Job, TaskSpec, Worker};
//!
//! # async fn demo(alice: murmur::pds::Writer, bob: murmur::pds::Writer, hosts: [&str; 2])
//! # -> Result<(), murmur::AgentError> {
//! let _bob = Agent::builder(bob)
//!     .watch_all(hosts)
//!     .requester(false)
//!     .worker(Worker::new(|job: Job| async move { Ok(job.payload_json()) }).capabilities(["echo"]))
//!     .start()
//!     .await?;
//! let alice = Agent::builder(alice).watch_all(hosts).start().await?;
//! let result = alice
//!     .request(TaskSpec::new("echo").payload(serde_json::json!({"hello": "world"})))
//!     .await?
//!     .await_result(Duration::from_secs(30))
//!     .await?;
//! assert_eq!(result.output_json()["hello"], "world");
//! # Ok(()) }
//! ```

mod agent;
mod blobs;
mod error;
mod policy;
mod protocol;
mod recovery;
mod registry;
mod repos;
mod requester;
mod sealing;
mod task;
mod worker;

pub use agent::{Agent, AgentBuilder};
pub use blobs::SealedBlobs;
pub use error::AgentError;
pub use policy::{ClaimContext, ClaimOffer, ClaimPolicy, FirstCome};
pub use registry::{AgentInfo, Registry};
pub use task::{Recovery, TaskEvent, TaskHandle, TaskResult, TaskSpec, TaskStats};
pub use worker::{Job, Worker};

/// Scale-out on NATS JetStream: a hub verifies once and publishes; agents read through a
/// durable consumer, `Agent::builder(writer).feed(bus::BusSource::new(nats, durable))`
/// (re-export of `murmur-bus`; feature `bus`, on by default).
#[cfg(feature = "bus")]
pub use murmur_bus as bus;
/// The record types of the agent.comms vocabulary (re-export of `murmur-comms`).
pub use murmur_comms as comms;
/// The watcher: event streams in, typed handlers called (re-export of `murmur-firehose`).
pub use murmur_firehose as firehose;
/// Lexicon parsing, validation and codegen (re-export of `murmur-lexicon`).
pub use murmur_lexicon as lexicon;
/// The writer: typed record writes to a PDS (re-export of `murmur-pds`).
pub use murmur_pds as pds;
/// Sealed payloads: encryption keys, seal and open (re-export of `murmur-seal`).
pub use murmur_seal as seal;
/// Event-stream frames and commit verification (re-export of `murmur-sync`).
pub use murmur_sync as sync;

pub use murmur_firehose::{
    AccountStatus, Author, CommitInfo, Created, Deleted, Handler, HandlerError, OpEvent, Record,
    RecordRef, State, Unsealed, Updated, handler,
};

/// Items the `#[handler]` macro expands to; not part of the public API.
#[doc(hidden)]
pub mod __private {
    pub use murmur_firehose::__private::*;
}

// `#[handler]` names `::murmur` when used inside this crate's own tests and docs.
extern crate self as murmur;

/// The README, so that its Rust blocks are compiled (and the offline ones run) as doctests.
#[doc = include_str!("../../../README.md")]
#[doc(hidden)]
#[cfg(feature = "bus")] // the README's bus example names `murmur::bus`
pub mod readme {}

/// A strong reference to a record: its at-uri and CID.
pub type StrongRef = atrium_api::com::atproto::repo::strong_ref::Main;

/// The current time as an atproto datetime (RFC 3339, milliseconds, UTC).
pub fn now() -> String {
    datetime(chrono::Utc::now())
}

/// Locks, carrying on after a panic elsewhere (each table stays consistent per operation).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn datetime(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// JSON to the lexicon `unknown` type: objects as they are, other values as `{"value": ..}`.
pub(crate) fn to_unknown(value: serde_json::Value) -> Option<atrium_api::types::Unknown> {
    let object = match value {
        serde_json::Value::Null => return None,
        serde_json::Value::Object(_) => value,
        other => serde_json::json!({ "value": other }),
    };
    serde_json::from_value(object).ok()
}
