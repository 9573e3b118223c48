//! What a verified commit holds: the signed commit, its ops with their records, and the
//! MST inversion that proves the ops against it.

use cid::Cid;
use serde::Deserialize;

use crate::car::CarSlice;
use crate::frame::{Action, CommitEvent, Limits};
use crate::mst::PartialTree;
use crate::{SyncError, cbor};

/// How much of a commit is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VerifyLevel {
    /// Everything: block hashes, signed commit vs. event, signature, MST inversion, rev chain.
    #[default]
    Full,
    /// Block hashes, signed commit vs. event and signature; no MST inversion.
    SignatureOnly,
    /// Block hashes and rev chain only: trust the source. For replays of already-verified data.
    None,
}

/// The signed commit object inside a CAR slice (repo format v3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCommit {
    /// The repo DID.
    pub did: String,
    /// Repo format version (3).
    pub version: u64,
    /// The MST root after this commit.
    pub data: Cid,
    /// The commit's rev.
    pub rev: String,
    /// The previous commit's CID (usually null in v3).
    pub prev: Option<Cid>,
    /// The signature over the commit without `sig`.
    pub sig: Vec<u8>,
    /// The DAG-CBOR bytes the signature covers (the commit minus its `sig` entry).
    pub unsigned: Vec<u8>,
}

#[derive(Deserialize)]
struct CommitData {
    did: String,
    version: u64,
    data: Cid,
    rev: String,
    prev: Option<Cid>,
    #[serde(with = "serde_bytes")]
    sig: Vec<u8>,
}

impl SignedCommit {
    /// Decodes a commit block and computes the bytes its signature covers.
    pub fn decode(block: &[u8]) -> Result<SignedCommit, SyncError> {
        let spans = cbor::map_spans(block, 8, "commit block")?;
        let c: CommitData = serde_ipld_dagcbor::from_slice(block)
            .map_err(|e| SyncError::decode("commit block", e))?;
        // Canonical DAG-CBOR minus one entry is the canonical encoding of the rest: drop `sig`
        // and decrement the map length (the head stays one byte for the few commit fields).
        let mut unsigned = Vec::with_capacity(block.len());
        let kept = spans.entries.iter().filter(|(k, _, _)| *k != "sig").count();
        cbor::write_head(&mut unsigned, 5, kept as u64);
        for (key, start, end) in &spans.entries {
            if *key != "sig" {
                unsigned.extend_from_slice(&block[*start..*end]);
            }
        }
        Ok(SignedCommit {
            did: c.did,
            version: c.version,
            data: c.data,
            rev: c.rev,
            prev: c.prev,
            sig: c.sig,
            unsigned,
        })
    }
}

/// A commit that passed verification at [`VerifiedCommit::level`].
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedCommit {
    /// Stream sequence number.
    pub seq: i64,
    /// The repo DID.
    pub repo: String,
    /// The commit's rev.
    pub rev: String,
    /// The previous rev.
    pub since: Option<String>,
    /// The commit CID.
    pub commit: Cid,
    /// The MST root after the commit (unknown at [`VerifyLevel::None`]).
    pub data: Option<Cid>,
    /// When the server emitted the event.
    pub time: String,
    /// The ops with their record bytes.
    pub ops: Vec<VerifiedOp>,
    /// The level it was verified at.
    pub level: VerifyLevel,
    /// Set when this commit does not follow the last one seen for the repo (`since` or
    /// `prevData` differ): the commit itself verified and its ops are good, but events before
    /// it were missed. Report a gap and re-fetch the repo (`com.atproto.sync.getRepo`).
    pub chain_break: Option<String>,
}

/// One op of a verified commit.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedOp {
    /// What happened.
    pub action: Action,
    /// `collection/rkey`.
    pub path: String,
    /// The record CID (`None` for deletes).
    pub cid: Option<Cid>,
    /// The previous record CID (updates and deletes, sync 1.1).
    pub prev: Option<Cid>,
    /// The record's DAG-CBOR bytes, hash-checked against `cid` (`None` for deletes, or when
    /// the event was `tooBig`).
    pub record: Option<Vec<u8>>,
}

impl VerifiedOp {
    /// The collection NSID.
    pub fn collection(&self) -> &str {
        self.path.split_once('/').map_or(&self.path, |(c, _)| c)
    }

    /// The record key.
    pub fn rkey(&self) -> &str {
        self.path.split_once('/').map_or("", |(_, r)| r)
    }

    /// Decodes the record into `T` (with the default [`Limits`]); `Ok(None)` when there is no record.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<Option<T>, SyncError> {
        self.record
            .as_deref()
            .map(|r| decode_record(r, &Limits::default()))
            .transpose()
    }
}

/// Decodes a record's DAG-CBOR bytes into `T`, enforcing the record size and nesting limits.
pub fn decode_record<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    limits: &Limits,
) -> Result<T, SyncError> {
    if bytes.len() > limits.max_record_bytes {
        return Err(SyncError::TooLarge {
            what: "record",
            size: bytes.len(),
            limit: limits.max_record_bytes,
        });
    }
    let end = cbor::item_end(bytes, 0, limits.max_depth, "record")?;
    if end != bytes.len() {
        return Err(SyncError::Cbor {
            context: "record",
            offset: end,
            reason: "trailing bytes after the record",
        });
    }
    serde_ipld_dagcbor::from_slice(bytes).map_err(|e| SyncError::decode("record", e))
}

/// A `#sync` event that passed verification: the DID's chain now starts here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSync {
    /// Stream sequence number.
    pub seq: i64,
    /// The repo DID.
    pub did: String,
    /// The commit rev.
    pub rev: String,
    /// The MST root.
    pub data: Cid,
    /// The commit CID.
    pub commit: Cid,
}

/// The ops match the tree at `commit.data`, and undoing them gives `prevData`.
pub(crate) fn check_inversion(
    car: &CarSlice<'_>,
    commit: &SignedCommit,
    ev: &CommitEvent,
) -> Result<(), SyncError> {
    let fail = |reason: String| SyncError::MstInversion {
        did: ev.repo.clone(),
        rev: ev.rev.clone(),
        reason,
    };
    let mut tree = PartialTree::load(car, commit.data)?;
    if tree.root().ok() != Some(commit.data) {
        return Err(fail(
            "the MST nodes do not rebuild to the commit's data root".into(),
        ));
    }
    for op in ev.ops.iter().rev() {
        let key = op.path.as_bytes();
        let current = tree
            .get(key)
            .map_err(|e| fail(format!("{} is hidden by a missing MST node ({e})", op.path)))?;
        let expected = match op.action {
            Action::Delete => None,
            Action::Create | Action::Update => op.cid,
        };
        if current != expected {
            return Err(fail(format!(
                "{} {} says {:?} but the MST has {:?}",
                op.action.as_str(),
                op.path,
                expected,
                current
            )));
        }
        let undone = match (op.action, op.prev) {
            (Action::Create, None) => tree.remove(key).map(drop),
            (Action::Create, Some(_)) => {
                return Err(fail(format!("create {} has a prev", op.path)));
            }
            (Action::Update | Action::Delete, Some(prev)) => tree.set(key, prev).map(drop),
            (Action::Update | Action::Delete, None) => {
                return Err(fail(format!(
                    "{} {} has no prev (not a sync 1.1 event)",
                    op.action.as_str(),
                    op.path
                )));
            }
        };
        undone.map_err(|e| {
            fail(format!(
                "undoing {} needs a missing MST node ({e})",
                op.path
            ))
        })?;
    }
    let prev_data = match (ev.prev_data, &ev.since) {
        (Some(prev), _) => prev,
        // The first commit of a repo starts from the empty tree.
        (None, None) => PartialTree::default().root().unwrap_or(commit.data),
        (None, Some(_)) => {
            return Err(fail(
                "the event has no prevData (not a sync 1.1 event)".into(),
            ));
        }
    };
    match tree.root() {
        Ok(root) if root == prev_data => Ok(()),
        Ok(root) => Err(fail(format!(
            "undoing the ops gives {root}, but prevData is {prev_data}"
        ))),
        Err(e) => Err(fail(format!(
            "rebuilding the previous root needs a missing MST node ({e})"
        ))),
    }
}
