//! Commit verification: signed commit vs. event, signature, MST inversion, per-DID rev chain.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cid::Cid;
use serde::Deserialize;

use crate::car::CarSlice;
use crate::frame::{Action, CommitEvent, Limits, SyncEvent};
use crate::mst::PartialTree;
use crate::{IdentityResolver, SyncError, cbor};

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

/// The last commit seen for a DID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    /// Its rev.
    pub rev: String,
    /// Its MST root, when it was parsed.
    pub data: Option<Cid>,
}

/// Verifies commits and keeps each DID's rev chain. Share it (`Arc`) across tasks; methods
/// take `&self`. Events of one DID must be fed in stream order.
#[derive(Debug)]
pub struct Verifier {
    level: VerifyLevel,
    limits: Limits,
    max_clock_skew: Duration,
    resolver: Arc<IdentityResolver>,
    chains: Mutex<HashMap<String, ChainHead>>,
}

/// Decodes a 13-character TID into microseconds since the Unix epoch.
pub fn tid_micros(tid: &str) -> Option<u64> {
    const ALPHABET: &[u8; 32] = b"234567abcdefghijklmnopqrstuvwxyz";
    if tid.len() != 13 {
        return None;
    }
    let mut v: u64 = 0;
    for (i, b) in tid.bytes().enumerate() {
        let d = ALPHABET.iter().position(|&a| a == b)? as u64;
        if i == 0 && d >= 16 {
            return None; // the top bit of a TID is 0
        }
        v = (v << 5) | d;
    }
    Some(v >> 10)
}

impl Verifier {
    /// A verifier at [`VerifyLevel::Full`] with default [`Limits`] and 5 minutes of clock skew.
    pub fn new(resolver: Arc<IdentityResolver>) -> Self {
        Verifier {
            level: VerifyLevel::Full,
            limits: Limits::default(),
            max_clock_skew: Duration::from_secs(300),
            resolver,
            chains: Mutex::new(HashMap::new()),
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
        self.chains().get(did).cloned()
    }

    /// Sets the chain head of `did`, e.g. after re-fetching the repo with `getRepo`.
    pub fn resync(&self, did: &str, rev: &str, data: Option<Cid>) {
        self.chains().insert(
            did.to_string(),
            ChainHead {
                rev: rev.to_string(),
                data,
            },
        );
    }

    /// Forgets everything about `did` (an account deleted).
    pub fn forget(&self, did: &str) {
        self.chains().remove(did);
        self.resolver.forget(did);
    }

    /// Handles an `#identity` event: the cached signing key of `did` is dropped.
    pub fn on_identity(&self, did: &str) {
        self.resolver.invalidate(did);
    }

    fn chains(&self) -> std::sync::MutexGuard<'_, HashMap<String, ChainHead>> {
        self.chains.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks rev syntax, future revs and rev order; returns why the chain broke, if it did.
    fn check_chain(&self, ev: &CommitEvent) -> Result<Option<String>, SyncError> {
        let micros = tid_micros(&ev.rev).ok_or_else(|| SyncError::InvalidRev(ev.rev.clone()))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as u64;
        let allowed = self.max_clock_skew.as_micros() as u64;
        if micros > now + allowed {
            return Err(SyncError::FutureRev {
                did: ev.repo.clone(),
                rev: ev.rev.clone(),
                ahead_secs: (micros - now) / 1_000_000,
                allowed_secs: self.max_clock_skew.as_secs(),
            });
        }
        let chains = self.chains();
        let Some(head) = chains.get(&ev.repo) else {
            return Ok(None);
        };
        if ev.rev <= head.rev {
            return Err(SyncError::RevNotNewer {
                did: ev.repo.clone(),
                rev: ev.rev.clone(),
                last: head.rev.clone(),
            });
        }
        if ev.since.as_deref() != Some(head.rev.as_str()) {
            return Ok(Some(format!(
                "since is {:?} but the last rev seen is {:?}",
                ev.since, head.rev
            )));
        }
        if let (Some(last), Some(prev)) = (head.data, ev.prev_data)
            && last != prev
        {
            return Ok(Some(format!(
                "prevData is {prev} but the last commit's data is {last}"
            )));
        }
        Ok(None)
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
        let broke = self.check_chain(ev)?;
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
        let broke = self.check_chain(ev)?;
        let car = CarSlice::parse(&ev.blocks)?;
        let mut data = None;
        let mut needs_proofs = false;
        if self.level != VerifyLevel::None {
            let commit = self
                .check_signed(&car, &ev.commit, &ev.repo, &ev.rev)
                .await?;
            if self.level == VerifyLevel::Full {
                match check_inversion(&car, &commit, ev) {
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
    /// (`getRecord`, verified): a create or update holds when the repo has the op's CID at
    /// its path, a delete when the repo proves the path absent. Returns the record bytes.
    ///
    /// The proof is of the repo's current commit, which is this commit or a later one: an op
    /// that a later commit overwrote cannot be proven any more and is reported as unproven,
    /// like a forged one (the later commit carries the newer state).
    async fn prove_op(
        &self,
        ev: &CommitEvent,
        op: &VerifiedOp,
    ) -> Result<Option<Vec<u8>>, SyncError> {
        let unproven = |reason: String| SyncError::Unproven {
            did: ev.repo.clone(),
            rev: ev.rev.clone(),
            path: op.path.clone(),
            reason,
        };
        let query = [
            ("did", ev.repo.as_str()),
            ("collection", op.collection()),
            ("rkey", op.rkey()),
        ];
        let Some(bytes) = self
            .fetch_car(&ev.repo, "com.atproto.sync.getRecord", &query)
            .await?
        else {
            return Err(unproven(
                "the repo's PDS has no proof for it (record not found)".into(),
            ));
        };
        let car = CarSlice::parse(&bytes)?;
        let (root, commit) = self.signed_root(&car, &ev.repo).await?;
        if commit.rev < ev.rev || (commit.rev == ev.rev && root != ev.commit) {
            return Err(unproven(format!(
                "the proof is of commit {root} rev {}, not this commit or a later one",
                commit.rev
            )));
        }
        let tree = PartialTree::load(&car, commit.data)?;
        let held = tree.get(op.path.as_bytes()).map_err(|()| SyncError::Mst {
            node: commit.data.to_string(),
            reason: format!("the proof does not include the path to {}", op.path),
        })?;
        match (op.action, held, op.cid) {
            (Action::Delete, None, _) => Ok(None),
            (Action::Delete, Some(cid), _) => Err(unproven(format!(
                "the op deletes it, but the repo at rev {} holds {cid}",
                commit.rev
            ))),
            (_, Some(held), Some(cid)) if held == cid => {
                let record = car.get(&cid).ok_or_else(|| SyncError::MissingBlock {
                    cid: cid.to_string(),
                    what: "record",
                })?;
                Ok(Some(record.to_vec()))
            }
            (action, held, cid) => Err(unproven(format!(
                "the op {} it as {}, but the repo at rev {} holds {}",
                if action == Action::Create {
                    "creates"
                } else {
                    "updates"
                },
                cid.map_or("nothing".into(), |c| c.to_string()),
                commit.rev,
                held.map_or("nothing".into(), |c| c.to_string()),
            ))),
        }
    }

    /// Fetches the whole repo of `did` from its PDS (`com.atproto.sync.getRepo`, the endpoint
    /// from its DID document) and verifies it with [`verify_repo`](Self::verify_repo): what a
    /// consumer does after a chain break to learn what it missed.
    pub async fn fetch_repo(&self, did: &str) -> Result<VerifiedRepo, SyncError> {
        let bytes = self
            .fetch_car(did, "com.atproto.sync.getRepo", &[("did", did)])
            .await?
            .ok_or_else(|| SyncError::FetchRepo {
                did: did.to_string(),
                url: "com.atproto.sync.getRepo".into(),
                reason: "the PDS does not have this repo".into(),
            })?;
        self.verify_repo(did, &bytes).await
    }

    /// Fetches one record of `did` with its proof (`com.atproto.sync.getRecord`: the signed
    /// commit and the MST path to the key) and verifies it: the record a repo holds now,
    /// signed by its owner, whoever served it. `Ok(None)` when the proof shows the key absent
    /// (or the PDS says the record is not found).
    pub async fn fetch_record(
        &self,
        did: &str,
        collection: &str,
        rkey: &str,
    ) -> Result<Option<RepoRecord>, SyncError> {
        let query = [("did", did), ("collection", collection), ("rkey", rkey)];
        let Some(bytes) = self
            .fetch_car(did, "com.atproto.sync.getRecord", &query)
            .await?
        else {
            return Ok(None);
        };
        self.verify_record_proof(did, &format!("{collection}/{rkey}"), &bytes)
            .await
    }

    /// Verifies a record proof CAR (as `com.atproto.sync.getRecord` returns it): block hashes,
    /// the signed commit at its root (signature unless the level is `None`), and the MST
    /// path from the commit's data root to `path`. `Ok(None)` when the proof shows `path`
    /// absent; an error when the CAR does not prove either way.
    pub async fn verify_record_proof(
        &self,
        did: &str,
        path: &str,
        car: &[u8],
    ) -> Result<Option<RepoRecord>, SyncError> {
        let car = CarSlice::parse(car)?;
        let (_, commit) = self.signed_root(&car, did).await?;
        let tree = crate::mst::PartialTree::load(&car, commit.data)?;
        let cid = match tree.get(path.as_bytes()) {
            Ok(Some(cid)) => cid,
            Ok(None) => return Ok(None),
            Err(()) => {
                return Err(SyncError::Mst {
                    node: commit.data.to_string(),
                    reason: format!("the proof does not include the path to {path}"),
                });
            }
        };
        let record = car.get(&cid).ok_or_else(|| SyncError::MissingBlock {
            cid: cid.to_string(),
            what: "record",
        })?;
        Ok(Some(RepoRecord {
            path: path.to_string(),
            cid,
            record: record.to_vec(),
        }))
    }

    /// GETs a CAR from the PDS of `did` (from its DID document), bounded by
    /// [`Limits::max_repo_bytes`]. `Ok(None)` on HTTP 404 or an XRPC `*NotFound` error.
    async fn fetch_car(
        &self,
        did: &str,
        method: &str,
        query: &[(&str, &str)],
    ) -> Result<Option<Vec<u8>>, SyncError> {
        let identity = self.resolver.resolve(did).await?;
        let pds = identity.pds.as_deref().ok_or_else(|| SyncError::Resolve {
            did: did.to_string(),
            reason: "the DID document names no #atproto_pds service endpoint".into(),
        })?;
        let url = format!("{}/xrpc/{method}", pds.trim_end_matches('/'));
        let fetch_err = |reason: String| SyncError::FetchRepo {
            did: did.to_string(),
            url: url.clone(),
            reason,
        };
        let unavailable = |reason: String| SyncError::Unavailable {
            did: did.to_string(),
            url: url.clone(),
            reason,
        };
        let mut response = self
            .resolver
            .http()
            .get(&url)
            .query(query)
            .timeout(std::time::Duration::from_secs(120))
            .send()
            .await
            .map_err(|e| unavailable(crate::identity::transport_reason(&e)))?;
        let status = response.status();
        if crate::identity::is_passing(status) {
            return Err(unavailable(format!("HTTP {status}")));
        }
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let body: String = body.trim().chars().take(300).collect();
            if status == reqwest::StatusCode::NOT_FOUND
                || (status == reqwest::StatusCode::BAD_REQUEST && body.contains("NotFound"))
            {
                return Ok(None);
            }
            return Err(fetch_err(format!("HTTP {status}: {body}")));
        }
        let limit = self.limits.max_repo_bytes;
        let too_large = |size: usize| SyncError::TooLarge {
            what: "repo CAR",
            size,
            limit,
        };
        if let Some(size) = response.content_length()
            && size > limit as u64
        {
            return Err(too_large(usize::try_from(size).unwrap_or(usize::MAX)));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| unavailable(crate::identity::transport_reason(&e)))?
        {
            if bytes.len() + chunk.len() > limit {
                return Err(too_large(bytes.len() + chunk.len()));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Some(bytes))
    }

    /// The root CID and signed commit of a repo or proof CAR: DID and version checked, and
    /// the signature unless the level is `None`.
    async fn signed_root(
        &self,
        car: &CarSlice<'_>,
        did: &str,
    ) -> Result<(Cid, SignedCommit), SyncError> {
        let root = match car.roots() {
            [root] => *root,
            roots => {
                return Err(SyncError::Car {
                    offset: 0,
                    reason: format!("a repo CAR has one root, this one has {}", roots.len()),
                });
            }
        };
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
                let rev = SignedCommit::decode(block)?.rev;
                Ok((root, self.check_signed(car, &root, did, &rev).await?))
            }
        }
    }

    /// Verifies a whole repo CAR (as `getRepo` returns it): every block's hash, the commit at
    /// its root (DID, version, and signature unless the level is `None`), and a complete MST
    /// whose leaves all point at records present in the CAR.
    ///
    /// The DID's chain head is left alone: the stream keeps its own place.
    pub async fn verify_repo(&self, did: &str, car: &[u8]) -> Result<VerifiedRepo, SyncError> {
        let car = CarSlice::parse(car)?;
        let (root, commit) = self.signed_root(&car, did).await?;
        let tree = crate::mst::PartialTree::load(&car, commit.data)?;
        let mut records = Vec::with_capacity(tree.items.len());
        for item in tree.items {
            match item {
                crate::mst::Item::Leaf { key, value, .. } => {
                    let path = String::from_utf8(key).map_err(|_| SyncError::Mst {
                        node: commit.data.to_string(),
                        reason: "a key is not UTF-8".into(),
                    })?;
                    let record = car.get(&value).ok_or_else(|| SyncError::MissingBlock {
                        cid: value.to_string(),
                        what: "record",
                    })?;
                    records.push(RepoRecord {
                        path,
                        cid: value,
                        record: record.to_vec(),
                    });
                }
                crate::mst::Item::Stub { cid, .. } => {
                    return Err(SyncError::MissingBlock {
                        cid: cid.to_string(),
                        what: "MST node",
                    });
                }
            }
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

    /// Verifies a `#sync` event (signature unless the level is `None`) and resets the DID's
    /// chain to it.
    pub async fn verify_sync(&self, ev: &SyncEvent) -> Result<VerifiedSync, SyncError> {
        tid_micros(&ev.rev).ok_or_else(|| SyncError::InvalidRev(ev.rev.clone()))?;
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
            SignedCommit::decode(block)?
        } else {
            self.check_signed(&car, &root, &ev.did, &ev.rev).await?
        };
        self.resync(&ev.did, &commit.rev, Some(commit.data));
        Ok(VerifiedSync {
            seq: ev.seq,
            did: ev.did.clone(),
            rev: commit.rev,
            data: commit.data,
            commit: root,
        })
    }

    /// The commit block matches the event and carries a valid signature of the DID's key
    /// (refreshing the key once if the cached one fails).
    async fn check_signed(
        &self,
        car: &CarSlice<'_>,
        commit_cid: &Cid,
        did: &str,
        rev: &str,
    ) -> Result<SignedCommit, SyncError> {
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
        let commit = SignedCommit::decode(block)?;
        for (field, signed, event) in [("did", &commit.did, did), ("rev", &commit.rev, rev)] {
            if signed != event {
                return Err(SyncError::CommitMismatch {
                    field,
                    signed: signed.clone(),
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
        if let Err(fault) = identity.signing_key.verify(&commit.unsigned, &commit.sig) {
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
                .verify(&commit.unsigned, &commit.sig)
                .map_err(bad)?;
        }
        Ok(commit)
    }
}

/// The ops match the tree at `commit.data`, and undoing them gives `prevData`.
fn check_inversion(
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
    if tree.root() != Ok(commit.data) {
        return Err(fail(
            "the MST nodes do not rebuild to the commit's data root".into(),
        ));
    }
    for op in ev.ops.iter().rev() {
        let key = op.path.as_bytes();
        let current = tree
            .get(key)
            .map_err(|()| fail(format!("{} is hidden by a missing MST node", op.path)))?;
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
            (Action::Create, None) => tree.remove(key),
            (Action::Create, Some(_)) => {
                return Err(fail(format!("create {} has a prev", op.path)));
            }
            (Action::Update | Action::Delete, Some(prev)) => tree.set(key, prev),
            (Action::Update | Action::Delete, None) => {
                return Err(fail(format!(
                    "{} {} has no prev (not a sync 1.1 event)",
                    op.action.as_str(),
                    op.path
                )));
            }
        };
        undone.map_err(|()| fail(format!("undoing {} needs a missing MST node", op.path)))?;
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
        Err(()) => Err(fail(
            "rebuilding the previous root needs a missing MST node".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tids_decode() {
        assert_eq!(tid_micros("2222222222222"), Some(0));
        assert!(tid_micros("3jzfcijpj2z2a").is_some());
        assert_eq!(tid_micros("zzzzzzzzzzzzz"), None);
        assert_eq!(tid_micros("short"), None);
        assert_eq!(tid_micros("3jzfcijpj2z2!"), None);
    }
}
