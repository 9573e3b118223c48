//! Op proofs: one op of a verified commit, carried with the blocks that prove it, so that
//! whoever receives the op can check it against the repo's signing key without trusting the
//! carrier.
//!
//! A proof is a CAR shaped like the answer of `com.atproto.sync.getRecord`: its root is the
//! signed commit, and it holds the commit block, every MST node visited when searching the
//! op's path from the commit's `data` root, and the record block when the path holds one.
//! The nodes on the search path prove presence (the node with the key as an entry) and
//! absence alike (the node whose gap where the key would be has no subtree).
//!
//! What such a proof cannot show is the record's CID *before* the op (`prev` of an update or
//! delete): the commit's tree only holds the state after it. A create and an update look the
//! same (the path holds the CID), and so do every delete and a path that never held anything.
//! Proving `prev` takes the previous commit (the whole commit's CAR slice, inverted as
//! [`Verifier::verify_commit`] does).

use cid::Cid;

use crate::car::{CarSlice, write_car};
use crate::commit::SignedCommit;
use crate::verify::{Verifier, single_root};
use crate::{SyncError, mst};

/// Builds the proof of the op at `path` from a commit's CAR slice (`CommitEvent::blocks`,
/// whose root is the signed commit, as a verified commit has it): a CAR with the commit CID
/// as root, and only the commit block, the MST nodes on the search path of `path` from the
/// commit's `data` root (root first), and the record block if the tree holds one at `path`.
///
/// The slice is parsed (every block re-hashed) but not verified again: verify the commit
/// first ([`Verifier::verify_commit`]). Check the proof with [`Verifier::verify_op_proof`].
///
/// Errors: the slice's own parse errors; [`SyncError::MissingBlock`] naming the commit, MST
/// node (`MST root`, `MST node`) or record the slice lacks (e.g. the slice of a `tooBig`
/// commit), so no proof can be built from it; [`SyncError::Mst`] for a malformed node on the
/// path.
pub fn op_proof(commit_blocks: &[u8], path: &str) -> Result<Vec<u8>, SyncError> {
    let car = CarSlice::parse(commit_blocks)?;
    let commit = SliceCommit::read(&car)?;
    commit.proof(&car, path)
}

/// [`op_proof`] for several paths of one commit, parsing and re-hashing the slice once (for
/// a batch of many ops): one result per path, in order. The outer error is the slice's
/// (parse, root, commit block); each inner one a path's ([`SyncError::MissingBlock`] for a
/// node or record the slice lacks, [`SyncError::Mst`]).
pub fn op_proofs<'p>(
    commit_blocks: &[u8],
    paths: impl IntoIterator<Item = &'p str>,
) -> Result<Vec<Result<Vec<u8>, SyncError>>, SyncError> {
    let car = CarSlice::parse(commit_blocks)?;
    let commit = SliceCommit::read(&car)?;
    Ok(paths.into_iter().map(|p| commit.proof(&car, p)).collect())
}

/// The signed commit at the root of a commit's CAR slice.
struct SliceCommit<'a> {
    cid: Cid,
    block: &'a [u8],
    data: Cid,
}

impl<'a> SliceCommit<'a> {
    fn read(car: &CarSlice<'a>) -> Result<Self, SyncError> {
        let cid = single_root(car)?;
        let block = car.get(&cid).ok_or_else(|| SyncError::MissingBlock {
            cid: cid.to_string(),
            what: "commit",
        })?;
        let data = SignedCommit::decode(block)?.data;
        Ok(SliceCommit { cid, block, data })
    }

    /// The proof CAR of `path`: the commit, the search path's nodes, the record if any.
    fn proof(&self, car: &CarSlice<'a>, path: &str) -> Result<Vec<u8>, SyncError> {
        let found = mst::search(car, self.data, path.as_bytes())?;
        let mut blocks: Vec<(Cid, &[u8])> = Vec::with_capacity(found.nodes.len() + 2);
        blocks.push((self.cid, self.block));
        blocks.extend(found.nodes);
        if let Some(value) = found.value {
            let record = car.get(&value).ok_or_else(|| SyncError::MissingBlock {
                cid: value.to_string(),
                what: "record",
            })?;
            // A record identical to a block already in (the same bytes) is written once.
            if !blocks.iter().any(|(c, _)| *c == value) {
                blocks.push((value, record));
            }
        }
        Ok(write_car(self.cid, blocks))
    }
}

/// Which commits may prove an op.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RevRule {
    /// Only the commit of the op's own rev: a proof that travels with the op.
    Exact,
    /// The op's commit (this CID, when known) or any later one: the repo as its PDS serves it
    /// now, which is all a `tooBig` commit (or an op published without its proof) can be
    /// checked against.
    SameOrLater {
        /// The CID of the op's commit, when known.
        commit: Option<Cid>,
    },
}

/// What a record proof CAR shows at one path, under its signed commit.
pub(crate) struct PathProof<'a> {
    /// The commit CID (the CAR's root).
    pub root: Cid,
    /// The signed commit, checked ([`Verifier::signed_root`]).
    pub commit: SignedCommit,
    /// What the commit's tree holds at the path (`None`: proven absent).
    pub value: Option<Cid>,
    /// The block of `value`, if the CAR has it (hash-checked by the CAR parser).
    pub record: Option<&'a [u8]>,
}

impl Verifier {
    /// Verifies the proof of one op (as [`op_proof`] builds it, or a `getRecord` answer of
    /// the op's commit) and returns the record bytes: `Some` when `expected` is `Some(cid)`
    /// (a create or update: the record, hash-checked against `cid`), `None` when `expected`
    /// is `None` (a delete: the path is proven absent).
    ///
    /// Checked: every block's hash; the signed commit at the proof's single root (its DID is
    /// `did`, version 3, and the signature verifies with the DID's key from the resolver,
    /// refreshed once on failure; at [`crate::VerifyLevel::None`] the signature is skipped,
    /// as for every proof this verifier reads); its rev is exactly `rev`; the MST search
    /// path from its `data` root to `path` is complete and well-formed and ends at
    /// `expected`. Extra blocks are ignored. The proof is limited to
    /// [`crate::Limits::max_blocks_bytes`] and the record to
    /// [`crate::Limits::max_record_bytes`]. The DID's rev chain is left alone.
    ///
    /// Not proven: the record's previous CID (`prev` of an update or delete), which only the
    /// previous commit shows; a create and an update are the same to this check.
    ///
    /// Errors: [`SyncError::Unproven`] when the proof is of another rev or the path holds
    /// something other than `expected`; [`SyncError::MissingBlock`] when a node on the path
    /// (or the commit, or the record) is not in the proof; and the parse, [`SyncError::Mst`],
    /// [`SyncError::CommitMismatch`], [`SyncError::BadSignature`], [`SyncError::TooLarge`]
    /// or resolver errors as they arise ([`SyncError::Unavailable`] when the DID's key could
    /// not be looked up: retry later).
    pub async fn verify_op_proof(
        &self,
        did: &str,
        rev: &str,
        path: &str,
        expected: Option<Cid>,
        proof: &[u8],
    ) -> Result<Option<Vec<u8>>, SyncError> {
        if proof.len() > self.limits.max_blocks_bytes {
            return Err(SyncError::TooLarge {
                what: "op proof",
                size: proof.len(),
                limit: self.limits.max_blocks_bytes,
            });
        }
        let car = CarSlice::parse(proof)?;
        self.check_op(&car, did, rev, path, expected, RevRule::Exact)
            .await
    }

    /// The one check that a proof CAR shows an op: the commit at its root is signed by `did`
    /// and allowed by `rule` for `rev`, and its tree holds `expected` at `path` (`None`:
    /// absent). Returns the record bytes when `expected` is `Some`.
    pub(crate) async fn check_op(
        &self,
        car: &CarSlice<'_>,
        did: &str,
        rev: &str,
        path: &str,
        expected: Option<Cid>,
        rule: RevRule,
    ) -> Result<Option<Vec<u8>>, SyncError> {
        let unproven = |reason: String| SyncError::Unproven {
            did: did.to_string(),
            rev: rev.to_string(),
            path: path.to_string(),
            reason,
        };
        let proven = self.prove_path(car, did, path).await?;
        let (root, proof_rev) = (proven.root, proven.commit.rev.as_str());
        match rule {
            RevRule::Exact if proof_rev != rev => {
                return Err(unproven(format!(
                    "the proof is of commit {root} rev {proof_rev}, not of rev {rev}"
                )));
            }
            RevRule::SameOrLater { commit }
                if proof_rev < rev || (proof_rev == rev && commit.is_some_and(|c| c != root)) =>
            {
                return Err(unproven(format!(
                    "the proof is of commit {root} rev {proof_rev}, not this commit or a later one"
                )));
            }
            _ => {}
        }
        let show = |c: Option<Cid>| c.map_or("nothing".to_string(), |c| c.to_string());
        if proven.value != expected {
            return Err(unproven(format!(
                "after the op the path should hold {}, but the repo at rev {proof_rev} holds {}",
                show(expected),
                show(proven.value),
            )));
        }
        let Some(cid) = expected else {
            return Ok(None);
        };
        let record = proven.record.ok_or_else(|| SyncError::MissingBlock {
            cid: cid.to_string(),
            what: "record",
        })?;
        if record.len() > self.limits.max_record_bytes {
            return Err(SyncError::TooLarge {
                what: "record",
                size: record.len(),
                limit: self.limits.max_record_bytes,
            });
        }
        Ok(Some(record.to_vec()))
    }

    /// What a record proof CAR shows at `path`: the signed commit at its root
    /// ([`Verifier::signed_root`]) and the end of the MST search path from its `data` root.
    pub(crate) async fn prove_path<'a>(
        &self,
        car: &CarSlice<'a>,
        did: &str,
        path: &str,
    ) -> Result<PathProof<'a>, SyncError> {
        let (root, commit) = self.signed_root(car, did).await?;
        let found = mst::search(car, commit.data, path.as_bytes())?;
        Ok(PathProof {
            root,
            commit,
            value: found.value,
            record: found.value.and_then(|c| car.get(&c)),
        })
    }
}
