//! Whole repos (`getRepo`) and record proofs (`getRecord`), verified.

use cid::Cid;

use crate::SyncError;
use crate::car::CarSlice;
use crate::commit::VerifyLevel;
use crate::verify::Verifier;

/// A whole repo as `com.atproto.sync.getRepo` returns it, verified: the signed commit at its
/// root and every record reachable from its MST.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedRepo {
    /// The repo DID.
    pub did: String,
    /// The commit's rev.
    pub rev: String,
    /// The commit CID.
    pub commit: Cid,
    /// The MST root.
    pub data: Cid,
    /// Every record, in key (`collection/rkey`) order.
    pub records: Vec<RepoRecord>,
    /// The level it was verified at (the signature is checked unless [`VerifyLevel::None`]).
    pub level: VerifyLevel,
}

/// One record of a [`VerifiedRepo`].
#[derive(Debug, Clone, PartialEq)]
pub struct RepoRecord {
    /// `collection/rkey`.
    pub path: String,
    /// The record CID.
    pub cid: Cid,
    /// The record's DAG-CBOR bytes, hash-checked against `cid`.
    pub record: Vec<u8>,
}

impl RepoRecord {
    /// The collection NSID.
    pub fn collection(&self) -> &str {
        self.path.split_once('/').map_or(&self.path, |(c, _)| c)
    }
}

impl Verifier {
    /// Verifies a record proof CAR (as `com.atproto.sync.getRecord` returns it): block hashes,
    /// the signed commit at its root (signature unless the level is `None`), and the MST
    /// search path from the commit's data root to `path` (the same check as
    /// [`Verifier::verify_op_proof`], without its rev and expected-CID rules). `Ok(None)` when
    /// the proof shows `path` absent; an error when the CAR does not prove either way
    /// ([`SyncError::MissingBlock`] naming the node on the path, or the record, it lacks).
    pub async fn verify_record_proof(
        &self,
        did: &str,
        path: &str,
        car: &[u8],
    ) -> Result<Option<RepoRecord>, SyncError> {
        let car = CarSlice::parse(car)?;
        let proven = self.prove_path(&car, did, path).await?;
        let Some(cid) = proven.value else {
            return Ok(None);
        };
        let record = proven.record.ok_or_else(|| SyncError::MissingBlock {
            cid: cid.to_string(),
            what: "record",
        })?;
        Ok(Some(RepoRecord {
            path: path.to_string(),
            cid,
            record: record.to_vec(),
        }))
    }

    /// Verifies a whole repo CAR (as `getRepo` returns it): every block's hash, the commit at
    /// its root (DID, version, and signature unless the level is `None`), and a complete MST
    /// whose leaves all point at records present in the CAR.
    ///
    /// The DID's chain head is left alone: the stream keeps its own place.
    pub async fn verify_repo(&self, did: &str, car: &[u8]) -> Result<VerifiedRepo, SyncError> {
        let car = CarSlice::parse(car)?;
        let (root, commit) = self.signed_root(&car, did).await?;
        let tree = crate::mst::Mst::load(&car, commit.data)?;
        let mut records = Vec::with_capacity(tree.len());
        for (path, cid) in tree.entries() {
            let record = car.get(&cid).ok_or_else(|| SyncError::MissingBlock {
                cid: cid.to_string(),
                what: "record",
            })?;
            records.push(RepoRecord {
                path: path.to_string(),
                cid,
                record: record.to_vec(),
            });
        }
        Ok(VerifiedRepo {
            did: did.to_string(),
            rev: commit.rev,
            commit: root,
            data: commit.data,
            records,
            level: self.level,
        })
    }
}
