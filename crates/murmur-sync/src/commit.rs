//! What a verified commit holds: the signed commit, its ops with their records, and the
//! MST inversion that proves the ops against it.

use cid::Cid;
use serde::Deserialize;
use sha2::{Digest, Sha256};

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

/// The fields of a commit block, borrowed from it.
#[derive(Deserialize)]
struct CommitData<'a> {
    did: &'a str,
    version: u64,
    data: Cid,
    rev: &'a str,
    prev: Option<Cid>,
    sig: &'a [u8],
}

/// A commit block decoded in place: its fields borrowed from the block, and what the
/// signature covers known as the block's own byte ranges, so checking the signature copies
/// nothing. What the verifier reads; [`SignedCommit`] is its owned form.
pub(crate) struct CommitView<'a> {
    pub did: &'a str,
    pub version: u64,
    pub data: Cid,
    pub rev: &'a str,
    pub prev: Option<Cid>,
    pub sig: &'a [u8],
    block: &'a [u8],
    /// The entries of the block's map other than `sig`: (start, end) in `block`.
    unsigned: Vec<(usize, usize)>,
}

impl<'a> CommitView<'a> {
    /// Decodes a commit block.
    pub fn decode(block: &'a [u8]) -> Result<CommitView<'a>, SyncError> {
        let spans = cbor::map_spans(block, 8, "commit block")?;
        let c: CommitData<'a> = serde_ipld_dagcbor::from_slice(block)
            .map_err(|e| SyncError::decode("commit block", e))?;
        let unsigned = spans
            .entries
            .iter()
            .filter(|(k, _, _)| *k != "sig")
            .map(|(_, start, end)| (*start, *end))
            .collect();
        Ok(CommitView {
            did: c.did,
            version: c.version,
            data: c.data,
            rev: c.rev,
            prev: c.prev,
            sig: c.sig,
            block,
            unsigned,
        })
    }

    /// The head of the unsigned commit's map. Canonical DAG-CBOR minus one entry is the
    /// canonical encoding of the rest: drop `sig` and decrement the map length (the head
    /// stays short for the few commit fields).
    fn unsigned_head(&self) -> Vec<u8> {
        let mut head = Vec::with_capacity(9);
        cbor::write_head(&mut head, 5, self.unsigned.len() as u64);
        head
    }

    /// The SHA-256 of the bytes the signature covers, hashed from the block's own bytes.
    pub fn unsigned_digest(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.unsigned_head());
        for (start, end) in &self.unsigned {
            hasher.update(&self.block[*start..*end]);
        }
        hasher.finalize().into()
    }

    /// The owned form, with the bytes the signature covers put together.
    pub fn to_signed_commit(&self) -> SignedCommit {
        let mut unsigned = self.unsigned_head();
        for (start, end) in &self.unsigned {
            unsigned.extend_from_slice(&self.block[*start..*end]);
        }
        SignedCommit {
            did: self.did.to_string(),
            version: self.version,
            data: self.data,
            rev: self.rev.to_string(),
            prev: self.prev,
            sig: self.sig.to_vec(),
            unsigned,
        }
    }
}

impl SignedCommit {
    /// Decodes a commit block and computes the bytes its signature covers.
    pub fn decode(block: &[u8]) -> Result<SignedCommit, SyncError> {
        CommitView::decode(block).map(|c| c.to_signed_commit())
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

/// The ops match the tree at `data` (the signed commit's), and undoing them gives `prevData`.
pub(crate) fn check_inversion(
    car: &CarSlice<'_>,
    data: Cid,
    ev: &CommitEvent,
) -> Result<(), SyncError> {
    let fail = |reason: String| SyncError::MstInversion {
        did: ev.repo.clone(),
        rev: ev.rev.clone(),
        reason,
    };
    // One key per node has its height hashed; the op keys below are hashed too (why that
    // suffices: mst::Heights::Layer).
    let mut tree = PartialTree::load_for_inversion(car, data)?;
    // Nodes loaded in the MST's own shape rebuild to their root by construction (and the
    // builder reuses them); only a tree in a shape no MST has must be rebuilt to show it.
    if !tree.loaded_canonical() && tree.root().ok() != Some(data) {
        return Err(fail(
            "the MST nodes do not rebuild to the commit's data root".into(),
        ));
    }
    for op in ev.ops.iter().rev() {
        let key = op.path.as_bytes();
        tree.check_height(key).map_err(fail)?;
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
        (None, None) => PartialTree::default().root().unwrap_or(data),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::car::{DAG_CBOR, cid_for};
    use crate::crypto::PublicKey;

    /// The node at layer 0 over `keys`, each with the value `value`.
    fn leaf_node(keys: &[&str], value: Cid) -> (Cid, Vec<u8>) {
        let entries: Vec<ipld_core::ipld::Ipld> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let p = if i == 0 {
                    0
                } else {
                    crate::mst::common_prefix_len(keys[i - 1].as_bytes(), k.as_bytes())
                };
                ipld_core::ipld!({
                    "k": ipld_core::ipld::Ipld::Bytes(k.as_bytes()[p..].to_vec()),
                    "p": p as u64, "t": null, "v": value,
                })
            })
            .collect();
        let bytes =
            serde_ipld_dagcbor::to_vec(&ipld_core::ipld!({"e": entries, "l": null})).unwrap();
        (cid_for(DAG_CBOR, &bytes), bytes)
    }

    #[test]
    fn an_op_key_at_a_height_its_hash_does_not_give_fails_inversion() {
        let key_at = |height: u32, prefix: &str| {
            (0..)
                .map(|i| format!("{prefix}{i}"))
                .find(|k| crate::mst::key_height(k.as_bytes()) == height)
                .unwrap()
        };
        let (low, high) = (key_at(0, "app.x.a/"), key_at(1, "app.x.b/"));
        let value = cid_for(crate::car::RAW, b"record");
        // The key created is of height 1 but sits in the layer-0 node: undoing it would give
        // the tree before, had its height not been checked.
        let after = leaf_node(&[&low, &high], value);
        let before = leaf_node(&[&low], value);
        let car = crate::car::write_car(after.0, [(after.0, after.1.as_slice())]);
        let ev = CommitEvent {
            seq: 1,
            repo: "did:plc:abc".into(),
            commit: after.0,
            rev: "3lon5dzeaihj2".into(),
            since: Some("3lon5dzeaihj1".into()),
            blocks: car.clone().into(),
            ops: vec![crate::frame::RepoOp {
                action: Action::Create,
                path: high.clone(),
                cid: Some(value),
                prev: None,
            }],
            prev_data: Some(before.0),
            time: "2026-01-01T00:00:00Z".into(),
            too_big: false,
        };
        let slice = CarSlice::parse(&car).unwrap();
        let err = check_inversion(&slice, after.0, &ev).unwrap_err();
        assert!(
            matches!(&err, SyncError::MstInversion { reason, .. } if reason.contains("height")),
            "{err}"
        );
        // The same op on a key of height 0 inverts.
        let other = key_at(0, "app.x.b/");
        let after = leaf_node(&[&low, &other], value);
        let car = crate::car::write_car(after.0, [(after.0, after.1.as_slice())]);
        let ev = CommitEvent {
            commit: after.0,
            blocks: car.clone().into(),
            ops: vec![crate::frame::RepoOp {
                path: other,
                ..ev.ops[0].clone()
            }],
            ..ev
        };
        check_inversion(&CarSlice::parse(&car).unwrap(), after.0, &ev).unwrap();
    }

    #[test]
    fn the_unsigned_digest_is_the_hash_of_the_commit_without_sig() {
        use k256::ecdsa::signature::Signer;
        let key = k256::ecdsa::SigningKey::from_slice(&[3u8; 32]).unwrap();
        let public = PublicKey::K256(*key.verifying_key());
        let data = cid_for(DAG_CBOR, b"\xa0");
        let unsigned = serde_ipld_dagcbor::to_vec(&ipld_core::ipld!({
            "did": "did:plc:abc", "version": 3, "data": data, "rev": "3lon5dzeaihj2", "prev": null,
        }))
        .unwrap();
        let sig: k256::ecdsa::Signature = key.sign(&unsigned);
        let block = serde_ipld_dagcbor::to_vec(&ipld_core::ipld!({
            "did": "did:plc:abc", "version": 3, "data": data, "rev": "3lon5dzeaihj2", "prev": null,
            "sig": ipld_core::ipld::Ipld::Bytes(sig.to_bytes().to_vec()),
        }))
        .unwrap();
        let view = CommitView::decode(&block).unwrap();
        assert_eq!(
            (view.did, view.version, view.data, view.rev, view.prev),
            ("did:plc:abc", 3, data, "3lon5dzeaihj2", None)
        );
        assert_eq!(view.sig, sig.to_bytes().as_slice());
        let digest: [u8; 32] = Sha256::digest(&unsigned).into();
        assert_eq!(view.unsigned_digest(), digest);
        public
            .verify_prehash(&view.unsigned_digest(), view.sig)
            .unwrap();
        let owned = SignedCommit::decode(&block).unwrap();
        assert_eq!(owned.unsigned, unsigned);
        assert_eq!(owned, view.to_signed_commit());
        assert_eq!(
            (owned.did.as_str(), owned.rev.as_str(), owned.sig.as_slice()),
            (view.did, view.rev, view.sig)
        );
        // Not a commit: typed errors.
        assert!(CommitView::decode(&unsigned).is_err());
        assert!(CommitView::decode(b"\x80").is_err());
    }
}
