//! The verifier: commits and `#sync` events checked against the signed commit, the DID's
//! key, the MST and the DID's rev chain.

use std::sync::Arc;
use std::time::Duration;

use cid::Cid;

use crate::car::CarSlice;
use crate::chain::{ChainHead, Chains};
use crate::commit::{
    CommitView, SignedCommit, VerifiedCommit, VerifiedOp, VerifiedSync, VerifyLevel,
    check_inversion,
};
use crate::frame::{Action, CommitEvent, Limits, SyncEvent};
use crate::proof::RevRule;
use crate::{IdentityResolver, SyncError};

/// The one root of a repo, proof or commit CAR.
pub(crate) fn single_root(car: &CarSlice<'_>) -> Result<Cid, SyncError> {
    match car.roots() {
        [root] => Ok(*root),
        roots => Err(SyncError::Car {
            offset: 0,
            reason: format!("a repo CAR has one root, this one has {}", roots.len()),
        }),
    }
}

/// Verifies commits and keeps each DID's rev chain. Share it (`Arc`) across tasks; methods
/// take `&self`. Events of one DID must be fed in stream order.
#[derive(Debug)]
pub struct Verifier {
    pub(crate) level: VerifyLevel,
    pub(crate) limits: Limits,
    max_clock_skew: Duration,
    pub(crate) resolver: Arc<IdentityResolver>,
    chains: Chains,
}

impl Verifier {
    /// A verifier at [`VerifyLevel::Full`] with default [`Limits`] and 5 minutes of clock skew.
    pub fn new(resolver: Arc<IdentityResolver>) -> Self {
        Verifier {
            level: VerifyLevel::Full,
            limits: Limits::default(),
            max_clock_skew: Duration::from_secs(300),
            resolver,
            chains: Chains::default(),
        }
    }

    /// Sets the verification level.
    pub fn with_level(mut self, level: VerifyLevel) -> Self {
        self.level = level;
        self
    }

    /// Sets the limits (record size, nesting) applied to commit contents.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// How far in the future a rev may be before it is rejected.
    pub fn with_max_clock_skew(mut self, skew: Duration) -> Self {
        self.max_clock_skew = skew;
        self
    }

    /// The verification level.
    pub fn level(&self) -> VerifyLevel {
        self.level
    }

    /// The identity resolver.
    pub fn resolver(&self) -> &Arc<IdentityResolver> {
        &self.resolver
    }

    /// The last commit seen for `did`.
    pub fn chain_head(&self, did: &str) -> Option<ChainHead> {
        self.chains.head(did)
    }

    /// Sets the chain head of `did`, e.g. after re-fetching the repo with `getRepo`.
    pub fn resync(&self, did: &str, rev: &str, data: Option<Cid>) {
        self.chains.set(did, rev, data);
    }

    /// Forgets everything about `did` (an account deleted).
    pub fn forget(&self, did: &str) {
        self.chains.remove(did);
        self.resolver.forget(did);
    }

    /// Handles an `#identity` event: the cached signing key of `did` is dropped.
    pub fn on_identity(&self, did: &str) {
        self.resolver.invalidate(did);
    }

    fn advance(
        &self,
        did: &str,
        rev: &str,
        data: Option<Cid>,
        broke: Option<String>,
    ) -> Result<(), SyncError> {
        self.resync(did, rev, data);
        match broke {
            Some(reason) => Err(SyncError::RepoDesynchronized {
                did: did.to_string(),
                rev: rev.to_string(),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// Chain bookkeeping only, for a commit the pre-filter skipped: rev checks and the DID's
    /// chain head move on without parsing the CAR slice. Reports a break like [`Verifier::verify_commit`].
    pub fn observe_commit(&self, ev: &CommitEvent) -> Result<(), SyncError> {
        let broke = self.chains.check(ev, self.max_clock_skew)?;
        self.advance(&ev.repo, &ev.rev, None, broke)
    }

    /// Verifies a `#commit` at the configured level and returns its ops with record bytes.
    ///
    /// A commit that verifies but does not follow the last one seen is returned with
    /// [`VerifiedCommit::chain_break`] set (its ops are still good; earlier events were missed)
    /// and becomes the DID's chain head. Every error leaves the chain as it was.
    ///
    /// At [`VerifyLevel::Full`] every op is proven against the signed commit before it is
    /// returned: by inverting the ops on the commit's partial MST. A `tooBig` commit (sync
    /// 1.1 deprecates it) whose slice cannot prove its ops that way, or lacks their records,
    /// has each such op proven from the repo's PDS instead (`com.atproto.sync.getRecord`: the record, or its absence, under
    /// a commit signed by the DID's key); an op the repo does not bear out is
    /// [`SyncError::Unproven`], and the whole commit is rejected. A PDS that cannot be
    /// reached makes it [`SyncError::Unavailable`]: retry later.
    pub async fn verify_commit(&self, ev: &CommitEvent) -> Result<VerifiedCommit, SyncError> {
        if ev.ops.len() > self.limits.max_ops {
            return Err(SyncError::TooManyOps {
                count: ev.ops.len(),
                limit: self.limits.max_ops,
            });
        }
        let broke = self.chains.check(ev, self.max_clock_skew)?;
        let car = CarSlice::parse(&ev.blocks)?;
        let mut data = None;
        let mut needs_proofs = false;
        if self.level != VerifyLevel::None {
            let commit = self
                .check_signed(&car, &ev.commit, &ev.repo, &ev.rev)
                .await?;
            if self.level == VerifyLevel::Full {
                match check_inversion(&car, commit.data, ev) {
                    Ok(()) => {}
                    // The slice of a tooBig commit may lack what inversion needs: prove each
                    // op from the repo instead.
                    Err(_) if ev.too_big => needs_proofs = true,
                    Err(e) => return Err(e),
                }
            }
            data = Some(commit.data);
        }
        let mut ops = Vec::with_capacity(ev.ops.len());
        for op in &ev.ops {
            let record = match (op.action, op.cid) {
                (Action::Delete, _) => None,
                (_, None) => {
                    return Err(SyncError::Decode {
                        context: "#commit op",
                        reason: format!("{} of {} has no cid", op.action.as_str(), op.path),
                    });
                }
                (_, Some(cid)) => match car.get(&cid) {
                    Some(bytes) => Some(bytes.to_vec()),
                    None if ev.too_big => None,
                    None => {
                        return Err(SyncError::MissingBlock {
                            cid: cid.to_string(),
                            what: "record",
                        });
                    }
                },
            };
            ops.push(VerifiedOp {
                action: op.action,
                path: op.path.clone(),
                cid: op.cid,
                prev: op.prev,
                record,
            });
        }
        if self.level == VerifyLevel::Full && ev.too_big {
            for op in &mut ops {
                // Unproven ops, and records a tooBig slice left out, come from the repo.
                let record_missing = op.action != Action::Delete && op.record.is_none();
                if needs_proofs || record_missing {
                    op.record = self.prove_op(ev, op).await?;
                }
            }
        }
        for op in &ops {
            if let Some(bytes) = &op.record
                && bytes.len() > self.limits.max_record_bytes
            {
                return Err(SyncError::TooLarge {
                    what: "record",
                    size: bytes.len(),
                    limit: self.limits.max_record_bytes,
                });
            }
        }
        self.resync(&ev.repo, &ev.rev, data);
        Ok(VerifiedCommit {
            seq: ev.seq,
            repo: ev.repo.clone(),
            rev: ev.rev.clone(),
            since: ev.since.clone(),
            commit: ev.commit,
            data,
            time: ev.time.clone(),
            ops,
            level: self.level,
            chain_break: broke,
        })
    }

    /// Proves one op of a `tooBig` commit from the repo as its PDS serves it now
    /// (`getRecord`, verified by the same check as [`Verifier::verify_op_proof`]): a create or
    /// update holds when the repo has the op's CID at its path, a delete when the repo proves
    /// the path absent. Returns the record bytes.
    ///
    /// The proof is of the repo's current commit, which is this commit or a later one: an op
    /// that a later commit overwrote cannot be proven any more and is reported as unproven,
    /// like a forged one (the later commit carries the newer state).
    async fn prove_op(
        &self,
        ev: &CommitEvent,
        op: &VerifiedOp,
    ) -> Result<Option<Vec<u8>>, SyncError> {
        let expected = match (op.action, op.cid) {
            (Action::Delete, _) => None,
            (_, Some(cid)) => Some(cid),
            (action, None) => {
                return Err(SyncError::Unproven {
                    did: ev.repo.clone(),
                    rev: ev.rev.clone(),
                    path: op.path.clone(),
                    reason: format!("the {} has no cid", action.as_str()),
                });
            }
        };
        self.prove_from_pds(&ev.repo, &ev.rev, &op.path, expected, Some(ev.commit))
            .await
    }

    /// Proves one op from the repo as the DID's PDS serves it now
    /// (`com.atproto.sync.getRecord`, verified like [`Verifier::verify_op_proof`]): the path
    /// holds `expected` (a create or update; its record bytes are returned) or is proven
    /// absent (`None`, a delete), under a commit signed by the DID's key whose rev is `rev`
    /// or later. For an op that travelled without its proof (e.g. too big for a bus message).
    ///
    /// An op a later commit overwrote cannot be proven any more and is
    /// [`SyncError::Unproven`], like a forged one; an unreachable PDS is
    /// [`SyncError::Unavailable`] (retry later).
    pub async fn prove_op_from_pds(
        &self,
        did: &str,
        rev: &str,
        path: &str,
        expected: Option<Cid>,
    ) -> Result<Option<Vec<u8>>, SyncError> {
        self.prove_from_pds(did, rev, path, expected, None).await
    }

    async fn prove_from_pds(
        &self,
        did: &str,
        rev: &str,
        path: &str,
        expected: Option<Cid>,
        commit: Option<Cid>,
    ) -> Result<Option<Vec<u8>>, SyncError> {
        let unproven = |reason: String| SyncError::Unproven {
            did: did.to_string(),
            rev: rev.to_string(),
            path: path.to_string(),
            reason,
        };
        let Some((collection, rkey)) = path.split_once('/') else {
            return Err(unproven("the path is not collection/rkey".into()));
        };
        let query = [("did", did), ("collection", collection), ("rkey", rkey)];
        let Some(bytes) = self
            .fetch_car(did, "com.atproto.sync.getRecord", &query)
            .await?
        else {
            return Err(unproven(
                "the repo's PDS has no proof for it (record not found)".into(),
            ));
        };
        let car = CarSlice::parse(&bytes)?;
        let rule = RevRule::SameOrLater { commit };
        self.check_op(&car, did, rev, path, expected, rule).await
    }

    /// The root CID and signed commit of a repo or proof CAR: DID and version checked, and
    /// the signature unless the level is `None`.
    pub(crate) async fn signed_root(
        &self,
        car: &CarSlice<'_>,
        did: &str,
    ) -> Result<(Cid, SignedCommit), SyncError> {
        let root = single_root(car)?;
        let block = car.get(&root).ok_or_else(|| SyncError::MissingBlock {
            cid: root.to_string(),
            what: "commit",
        })?;
        match self.level {
            VerifyLevel::None => {
                let commit = SignedCommit::decode(block)?;
                if commit.did != did {
                    return Err(SyncError::CommitMismatch {
                        field: "did",
                        signed: commit.did,
                        event: did.to_string(),
                    });
                }
                Ok((root, commit))
            }
            _ => {
                let rev = CommitView::decode(block)?.rev;
                let commit = self.check_signed(car, &root, did, rev).await?;
                Ok((root, commit.to_signed_commit()))
            }
        }
    }

    /// Verifies a `#sync` event (signature unless the level is `None`) and resets the DID's
    /// chain to it.
    pub async fn verify_sync(&self, ev: &SyncEvent) -> Result<VerifiedSync, SyncError> {
        crate::chain::tid_micros(&ev.rev).ok_or_else(|| SyncError::InvalidRev(ev.rev.clone()))?;
        let car = CarSlice::parse(&ev.blocks)?;
        let root = *car.roots().first().ok_or(SyncError::Car {
            offset: 0,
            reason: "#sync CAR slice has no root".into(),
        })?;
        let commit = if self.level == VerifyLevel::None {
            let block = car.get(&root).ok_or_else(|| SyncError::MissingBlock {
                cid: root.to_string(),
                what: "commit",
            })?;
            CommitView::decode(block)?
        } else {
            self.check_signed(&car, &root, &ev.did, &ev.rev).await?
        };
        self.resync(&ev.did, commit.rev, Some(commit.data));
        Ok(VerifiedSync {
            seq: ev.seq,
            did: ev.did.clone(),
            rev: commit.rev.to_string(),
            data: commit.data,
            commit: root,
        })
    }

    /// The commit block matches the event and carries a valid signature of the DID's key
    /// (refreshing the key once if the cached one fails). The key is the one the resolver
    /// parsed once for the DID; the check is one SHA-256 of the unsigned commit, hashed from
    /// the block's own bytes, and one ECDSA verification of that digest.
    async fn check_signed<'a>(
        &self,
        car: &CarSlice<'a>,
        commit_cid: &Cid,
        did: &str,
        rev: &str,
    ) -> Result<CommitView<'a>, SyncError> {
        if car.roots() != [*commit_cid] {
            return Err(SyncError::CommitMismatch {
                field: "commit",
                signed: format!("{:?}", car.roots()),
                event: commit_cid.to_string(),
            });
        }
        let block = car.get(commit_cid).ok_or_else(|| SyncError::MissingBlock {
            cid: commit_cid.to_string(),
            what: "commit",
        })?;
        let commit = CommitView::decode(block)?;
        for (field, signed, event) in [("did", commit.did, did), ("rev", commit.rev, rev)] {
            if signed != event {
                return Err(SyncError::CommitMismatch {
                    field,
                    signed: signed.to_string(),
                    event: event.to_string(),
                });
            }
        }
        if commit.version != 3 {
            return Err(SyncError::CommitMismatch {
                field: "version",
                signed: commit.version.to_string(),
                event: "3".into(),
            });
        }
        let identity = self.resolver.resolve(did).await?;
        let digest = commit.unsigned_digest();
        if let Err(fault) = identity.signing_key.verify_prehash(&digest, commit.sig) {
            let bad = |fault: crate::SignatureFault| SyncError::BadSignature {
                did: did.to_string(),
                commit: commit_cid.to_string(),
                reason: fault.as_str(),
            };
            if fault != crate::SignatureFault::Mismatch {
                return Err(bad(fault));
            }
            // The key may have rotated since it was cached: fetch once more (at most once a
            // minute per DID, so forged commits cannot turn into a flood of DID look-ups).
            let fresh = self
                .resolver
                .refresh_after_failure(did, Duration::from_secs(60))
                .await?;
            fresh
                .signing_key
                .verify_prehash(&digest, commit.sig)
                .map_err(bad)?;
        }
        Ok(commit)
    }
}
