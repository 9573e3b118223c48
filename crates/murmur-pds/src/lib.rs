//! The murmur writer: typed, validated, retry-safe record writes to an atproto PDS.
//!
//! A [`Writer`] is one account logged in to its PDS. Every write validates the record
//! against its lexicon ([`murmur_lexicon::Validate`]), adds `$type`, and checks the
//! DAG-CBOR and request size limits before any HTTP call; a bad record is refused with an
//! error naming the field. Record keys are TIDs generated locally ([`TidGenerator`]),
//! monotonic even if the clock steps back, so a create can be retried without duplicating
//! the record. Each write returns the record's `uri` and `cid` and the commit's `rev`, which
//! is how an agent recognises its own writes on the event stream.
//!
//! Sessions persist to a 0600 file, written atomically; an expired access token is refreshed
//! once, single-flight, across all clones and tasks. Tokens and passwords never appear in
//! logs, `Debug` output or errors ([`Secret`]). A stored session is resumed only for its own
//! account on the PDS that issued it, and its tokens are sent to no other host (redirects to
//! another host are refused, [`Error::RedirectRefused`]).
//!
//! ```no_run
//! use atrium_api::types::Collection;
//! use murmur_lexicon::{Validate, ValidationError};
//! use murmur_pds::Writer;
//!
//! #[derive(Debug, serde::Serialize, serde::Deserialize)]
//! struct Note { text: String }
//! impl Validate for Note {
//!     fn validate(&self) -> Result<(), ValidationError> { Ok(()) }
//! }
//! #[derive(Debug)]
//! struct Notes;
//! impl Collection for Notes {
//!     const NSID: &'static str = "com.example.note";
//!     type Record = Note;
//! }
//!
//! # async fn demo() -> Result<(), murmur_pds::Error> {
//! let writer = Writer::builder("http://localhost:2583")
//!     .session_file(".murmur/session.json")
//!     .resume_or_login("alice.test", "app-password")
//!     .await?;
//! let written = writer.create::<Notes>(&Note { text: "hello".into() }).await?;
//! println!("{} {} rev {:?}", written.uri, written.cid, written.commit.map(|c| c.rev));
//!
//! let mut batch = writer.batch();
//! for i in 0..50 {
//!     batch.create::<Notes>(&Note { text: format!("note {i}") })?;
//! }
//! let done = batch.commit().await?;   // one commit, 50 records
//! # Ok(()) }
//! ```
//!
//! # Retries
//!
//! 429 answers wait for `Retry-After` (or `RateLimit-Reset`) and retry, up to
//! [`RetryPolicy::max_rate_limit_wait`]; connection failures that never reached the server
//! are retried for every call. Failures that may have reached the server (5xx, timeouts,
//! resets) are retried only for idempotent calls: getRecord, listRecords, describeServer,
//! uploadBlob, putRecord and deleteRecord without `swapRecord`. createRecord needs care: its
//! TID key is fixed before the first attempt, and after a failure that may have reached the
//! server the writer reads the key back; if it holds a record with our CID the create
//! happened (returned with `commit: None`), if it is empty the create is sent again, so a
//! record is never duplicated. Not replayed: putRecord/deleteRecord with `swapRecord`,
//! applyWrites batches, createSession and refreshSession.

mod arguments;
mod batch;
mod client;
mod encode;
mod error;
mod login;
mod reader;
mod session;
mod tid;
mod transport;
mod writer;
mod written;

pub use atrium_api::types::{BlobRef, Collection};
pub use batch::{Batch, BatchOutcome, BatchWritten, MAX_BATCH_WRITES};
pub use client::RetryPolicy;
pub use encode::{
    MAX_RECORD_CBOR_BYTES, MAX_REQUEST_JSON_BYTES, blob_cid, record_cid, record_cid_untyped,
};
pub use error::{Error, Result, Swap};
pub use ipld_core::cid::Cid;
pub use login::WriterBuilder;
pub use murmur_lexicon::{Validate, ValidationError};
pub use reader::Reader;
pub use session::{Secret, Session};
pub use tid::{Tid, TidGenerator};
pub use transport::RateLimit;
pub use writer::Writer;
pub use written::{CommitRef, Page, ServerLimits, Stored, Written};
