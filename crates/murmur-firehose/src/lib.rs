//! The murmur watcher: repo event streams in, typed async handlers called.
//!
//! A [`Watcher`] reads `com.atproto.sync.subscribeRepos` from one relay or several PDS hosts
//! (one cursor each), verifies every commit it cares about (murmur-sync: hashes, signature,
//! MST, rev chain), and routes each matching record op to the handlers registered for its
//! collection. It can also read a Jetstream ([`WatcherBuilder::jetstream`]: JSON without
//! proofs, each record checked against its CID, its ops [`Provenance::Unverified`] unless
//! each is proven from its author's PDS) or any [`Feed`]. The delivery contract:
//!
//! - at-least-once delivery, in repo order per DID; different DIDs run concurrently;
//! - the stored cursor never passes an event whose handlers have not finished;
//! - every op has the idempotency key (did, rev, path); the dedup store uses it so a restart
//!   does not re-run finished handlers;
//! - nothing is dropped silently: missed events surface as a [`Gap`], failed handlers as
//!   [`DeadLetter`]s, rejected records through [`WatcherBuilder::on_rejected`];
//! - a record that fails verification or lexicon validation never reaches a typed handler;
//! - joining late and gaps re-run the same handlers: a [`Backfill`] delivers the records a
//!   repo already holds ([`Origin::Backfill`]), and after a gap in a repo's stream (a broken
//!   rev chain, a `#sync`, a seq regression) a fresh copy of the repo, diffed against the
//!   watcher's record index, delivers exactly the missed creates, updates and deletes
//!   ([`Origin::Resync`]), once, in key order, before the repo's later stream ops.
//!
//! A handler is any async fn or closure whose arguments are extractors ([`FromOp`]), as in
//! axum: exactly one of [`Record<C>`](Record) (creates and updates of collection `C`),
//! [`Created<C>`](Created), [`Updated<C>`](Updated) or [`Deleted<C>`](Deleted) says which ops
//! it gets, by its type; the others ([`Author`], [`RecordRef`], [`CommitInfo`], [`Origin`],
//! [`State`], [`OpEvent`]) describe the op. `#[handler]` is optional: it turns a wrong argument into a
//! compile error naming it and gives the handler the fn's name in logs and dead letters.
//! [`Handler::layer`] wraps a handler in your own tower layers.
//!
//! ```no_run
//! use murmur_firehose::{Author, HandlerError, Record, Watcher, handler};
//! # use atrium_api::types::Collection;
//! # #[derive(Debug)] struct Task;
//! # #[derive(Debug, serde::Serialize, serde::Deserialize)] struct TaskRecord;
//! # impl Collection for Task { const NSID: &'static str = "agent.comms.task"; type Record = TaskRecord; }
//! # impl murmur_lexicon::Validate for TaskRecord { fn validate(&self) -> Result<(), murmur_lexicon::ValidationError> { Ok(()) } }
//!
//! #[handler]
//! async fn on_task(task: Record<Task>, from: Author) -> Result<(), HandlerError> {
//!     println!("{} posted {}", from.0, task.uri);
//!     Ok(())
//! }
//!
//! # async fn run() -> Result<(), murmur_firehose::FirehoseError> {
//! Watcher::builder()
//!     .pds("http://localhost:2583")
//!     .collections(["agent.comms.*"])
//!     .state_dir(".murmur")
//!     .handler(on_task)
//!     .build()?
//!     .run()
//!     .await
//! # }
//! ```

mod backfill;
mod backoff;
mod cursor;
mod dead_letter;
mod dedup;
mod dispatch;
mod error;
mod extract;
mod fanout;
mod feed;
mod filter;
mod gap;
mod handler;
mod hooks;
mod index;
mod jetstream;
mod metrics;
mod op;
mod pipeline;
mod progress;
mod reader;
mod repo_lanes;
mod route;
mod source;
mod watch_error;
mod watcher;

pub use backfill::{Backfill, BackfillProgress};
pub use backoff::Backoff;
pub use cursor::{CursorStore, FileCursorStore};
pub use dead_letter::{DeadLetter, DeadLetterStore, FileDeadLetterStore, MemoryDeadLetterStore};
pub use dedup::{DedupStore, FileDedupStore, OpKey};
pub use error::{FirehoseError, HandlerError, Rejected, Rejection};
pub use extract::{
    AccountStatus, Author, CommitInfo, Created, Deleted, FromOp, Identity, Record, RecordRef,
    State, Unsealed, Updated, unseal,
};
pub use fanout::{Fanout, FanoutBuilder, FanoutSubscriber};
pub use feed::{Delivered, Feed, FeedConnected, FeedSink, OnDelivered};
pub use filter::{CollectionPattern, DidAllowlist, Filter};
pub use gap::{Gap, GapKind};
pub use handler::{BoxFuture, CallError, Handler, HandlerService, Layered};
pub use hooks::{ErrorHook, GapHook, RejectedHook, ResyncHook};
pub use jetstream::{DEFAULT_JETSTREAM_REWIND, JetstreamOp, JetstreamSource};
pub use metrics::{Metrics, MetricsSnapshot, SourceSnapshot};
pub use murmur_macros::handler;
pub use op::{
    ACCOUNT_EVENTS, Action, EMPTY_COMMITS, IDENTITY_EVENTS, OpData, OpEvent, Origin, Provenance,
    RepoEvent, SYNC_EVENTS,
};
pub use pipeline::{DEFAULT_MAX_SEQ_JUMP, MAX_SEQ};
pub use reader::ERROR_FRAME_REPEATS;
pub use route::Route;
/// The TLS library `wss://` sources use, for [`SubscribeRepos::with_tls_config`].
pub use rustls;
pub use source::{MessageStream, Source, SourceError, SourceMessage, SubscribeRepos};
pub use watch_error::WatchError;
pub use watcher::{ShutdownHandle, Watcher, WatcherBuilder};

/// Items the `#[handler]` macro expands to; not part of the public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::handler::private::*;
    pub use crate::{BoxFuture, CallError, FromOp, Handler, HandlerError, OpEvent, Route};
}

// `#[handler]` names `::murmur_firehose` when used inside this crate's own tests and docs.
extern crate self as murmur_firehose;
