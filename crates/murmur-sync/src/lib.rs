//! The atproto event-stream wire and its trust: frames, hash-checked CAR slices, commit
//! verification, identity. It knows nothing of the event stream's sockets: it takes the
//! bytes of each frame. What verification must look up it fetches over HTTP, all in one
//! module: DID documents (PLC directory, did:web), and repos and record proofs
//! (`com.atproto.sync.getRepo`/`getRecord`) from a DID's PDS; a host that cannot be reached
//! is [`SyncError::Unavailable`] (retry later), never a failed verification.
//!
//! The path of one `com.atproto.sync.subscribeRepos` message:
//!
//! 1. [`Frame::decode`] splits header `{op, t}` from the DAG-CBOR body and returns a typed
//!    event ([`CommitEvent`], [`SyncEvent`], [`IdentityEvent`], [`AccountEvent`],
//!    [`InfoEvent`], or `Unknown`). Error frames (op -1) are `Err(SyncError::Stream(..))`.
//!    [`Limits`] (frame 5 MB, blocks 2 MB, 200 ops, record 1 MB, nesting 32) are enforced.
//!    `#commit` and `#sync` bodies are read in one pass; given the frame as a [`Bytes`] (as
//!    WebSocket and NATS clients hand it over), their CAR slice is a view of it, not a copy.
//! 2. Pre-filter for free: `commit.repo` and `commit.ops` (`action`, `path`) are decoded,
//!    the CAR slice in `commit.blocks` is not. For a commit nobody wants, call
//!    [`Verifier::observe_commit`] so the DID's rev chain still moves on.
//! 3. [`Verifier::verify_commit`] parses the CAR slice ([`CarSlice`], every block re-hashed),
//!    checks the signed commit against the event (did, rev), the signature with the DID's key
//!    ([`IdentityResolver`], cached, refreshed once on failure), inverts the ops on the partial
//!    MST to reach `prevData` (sync 1.1), and checks `since`/`prevData` against the last commit
//!    of that DID. It returns [`VerifiedCommit`] with each record's CID and DAG-CBOR bytes.
//! 4. `#sync` goes to [`Verifier::verify_sync`] (resets the chain), `#identity` to
//!    [`Verifier::on_identity`] (drops the cached key).
//!
//! One op of a verified commit can travel on its own, with its proof: [`op_proof`] (or
//! [`op_proofs`] for a batch) cuts from the commit's CAR slice a CAR shaped like a
//! `com.atproto.sync.getRecord` answer (the signed commit, the MST nodes on the op's search
//! path, the record block; written with [`write_car`]), and [`Verifier::verify_op_proof`]
//! checks it for that DID, rev and path against the DID's key: the record for a create or
//! update, the path's absence for a delete. The record's CID before the op (`prev`) is not
//! in such a proof. The same check proves the ops of a `tooBig` commit from the repo's PDS
//! ([`Verifier::verify_record_proof`] reads any `getRecord` answer).
//!
//! The repo's Merkle Search Tree is public too: [`Mst`] is a whole tree of `(collection/rkey,
//! CID)` entries (keys checked with [`check_key`]; [`MstError`] says what is wrong) with its
//! root, node blocks ([`Mst::blocks`], for [`write_car`]), loading from a CAR ([`Mst::load`],
//! what [`Verifier::verify_repo`] walks), the diff of two trees ([`Mst::diff`], [`MstDiff`]),
//! and the blocks a commit's CAR slice needs to prove its ops ([`Mst::proof_blocks`]).
//! [`PartialTree`] is the tree such a slice proves, on which the ops are undone (sync 1.1).
//!
//! ```no_run
//! use std::sync::Arc;
//! use murmur_sync::{Frame, IdentityResolver, SyncError, Verifier};
//!
//! # async fn handle(bytes: &[u8], verifier: &Verifier) -> Result<(), SyncError> {
//! match Frame::decode(bytes)? {
//!     Frame::Commit(commit) => {
//!         if commit.any_op(|op| op.collection() == "agent.comms.task") {
//!             match verifier.verify_commit(&commit).await {
//!                 Ok(verified) => {
//!                     if let Some(why) = &verified.chain_break {
//!                         // A gap: report it and re-fetch the repo (com.atproto.sync.getRepo).
//!                         eprintln!("missed events of {}: {why}", verified.repo);
//!                     }
//!                     for op in &verified.ops {
//!                         let record: Option<serde_json::Value> = op.decode()?;
//!                         println!("{} {} {:?}", op.action.as_str(), op.path, record);
//!                     }
//!                 }
//!                 Err(e) => eprintln!("rejected: {e}"),
//!             }
//!         } else {
//!             verifier.observe_commit(&commit).ok();
//!         }
//!     }
//!     Frame::Sync(sync) => {
//!         verifier.verify_sync(&sync).await?;
//!     }
//!     Frame::Identity(identity) => verifier.on_identity(&identity.did),
//!     _ => {}
//! }
//! # Ok(()) }
//! # fn main() {
//! let resolver = IdentityResolver::new().with_plc_url("http://localhost:2582");
//! let verifier = Verifier::new(Arc::new(resolver));
//! # }
//! ```

mod car;
mod cbor;
mod chain;
mod commit;
mod crypto;
mod error;
mod fetch;
mod frame;
mod identity;
mod mst;
mod proof;
mod repo;
mod verify;

pub use bytes::Bytes;
pub use car::{CarSlice, DAG_CBOR, RAW, check_block, cid_for, write_car};
pub use chain::{ChainHead, tid_micros};
pub use cid::Cid;
pub use commit::{
    SignedCommit, VerifiedCommit, VerifiedOp, VerifiedSync, VerifyLevel, decode_record,
};
pub use crypto::{PublicKey, SignatureFault};
pub use error::{StreamError, SyncError};
pub use fetch::{ListedRepo, RepoList};
pub use frame::{
    AccountEvent, Action, CommitEvent, Frame, FrameBytes, IdentityEvent, InfoEvent, Limits, RepoOp,
    SyncEvent, error_frame, info_frame, split_frame, with_seq,
};
pub use identity::{DEFAULT_PLC_URL, Identity, IdentityResolver};
pub use mst::{
    MAX_KEY_LEN, Mst, MstDiff, MstError, PartialTree, check_key, common_prefix_len, key_height,
};
pub use proof::{op_proof, op_proofs};
pub use repo::{RepoRecord, VerifiedRepo};
pub use verify::Verifier;
