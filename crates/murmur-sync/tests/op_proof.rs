//! Op proofs (`op_proof`, `Verifier::verify_op_proof`) on the recorded corpus
//! (tests/fixtures/corpus) and the atproto commit-proof interop vectors: every op of every
//! recorded commit is proven by its own proof, and altered proofs are rejected with the
//! matching error.

mod common;

use std::collections::BTreeSet;

use common::{blocks_in, car, commits, keys, pin, resign_car, verifier};
use murmur_sync::{
    Action, CarSlice, Cid, CommitEvent, DAG_CBOR, Identity, IdentityResolver, Limits, PublicKey,
    RepoOp, SignedCommit, SyncError, Verifier, VerifyLevel, cid_for, key_height, op_proof,
    op_proofs,
};

/// What the tree holds at the op's path after the op.
fn expected(op: &RepoOp) -> Option<Cid> {
    match op.action {
        Action::Delete => None,
        Action::Create | Action::Update => op.cid,
    }
}

fn stats(mut v: Vec<usize>) -> String {
    v.sort_unstable();
    format!(
        "min {}, median {}, max {}",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    )
}

/// (commit, index of the op) for the first op matching `pred` in a commit with history.
fn find_op(pred: impl Fn(&CommitEvent, &RepoOp) -> bool) -> (CommitEvent, usize) {
    commits()
        .into_iter()
        .filter(|c| c.since.is_some())
        .find_map(|c| {
            let i = c.ops.iter().position(|op| pred(&c, op))?;
            Some((c, i))
        })
        .expect("such an op in the corpus")
}

fn single_create() -> (CommitEvent, usize) {
    find_op(|c, op| c.ops.len() == 1 && op.action == Action::Create)
}

fn batch_delete() -> (CommitEvent, usize) {
    find_op(|c, op| c.ops.len() >= 5 && op.action == Action::Delete)
}

async fn check(
    v: &Verifier,
    c: &CommitEvent,
    op: &RepoOp,
    proof: &[u8],
) -> Result<Option<Vec<u8>>, SyncError> {
    v.verify_op_proof(&c.repo, &c.rev, &op.path, expected(op), proof)
        .await
}

#[tokio::test]
async fn every_op_of_the_corpus_is_proven_by_its_own_proof() {
    let v = verifier(VerifyLevel::Full);
    let (mut records, mut deletes) = (0, 0);
    let (mut sizes, mut block_counts, mut single_op) = (Vec::new(), Vec::new(), Vec::new());
    for c in commits() {
        let slice = CarSlice::parse(&c.blocks).unwrap();
        let batch = op_proofs(&c.blocks, c.ops.iter().map(|op| op.path.as_str())).unwrap();
        assert_eq!(batch.len(), c.ops.len());
        for (op, from_batch) in c.ops.iter().zip(batch) {
            let at = format!("{} rev {} {}", c.repo, c.rev, op.path);
            let proof = op_proof(&c.blocks, &op.path).unwrap_or_else(|e| panic!("{at}: {e}"));
            assert_eq!(from_batch.unwrap(), proof, "{at}");
            let parsed = CarSlice::parse(&proof).unwrap();
            assert_eq!(parsed.roots(), &[c.commit], "{at}");
            // Only blocks of the slice, each once: the proof is never larger than the slice.
            for (cid, data) in parsed.blocks() {
                assert_eq!(
                    slice.get(&cid),
                    Some(data),
                    "{at}: {cid} is not in the slice"
                );
            }
            assert!(proof.len() <= c.blocks.len(), "{at}");
            let got = check(&v, &c, op, &proof)
                .await
                .unwrap_or_else(|e| panic!("{at}: {e}"));
            match op.action {
                Action::Delete => {
                    assert_eq!(got, None, "{at}");
                    deletes += 1;
                }
                Action::Create | Action::Update => {
                    let cid = op.cid.unwrap();
                    assert_eq!(got.as_deref(), Some(slice.get(&cid).unwrap()), "{at}");
                    assert_eq!(cid_for(DAG_CBOR, got.as_deref().unwrap()), cid);
                    records += 1;
                }
            }
            // Read as a getRecord answer, the proof says the same.
            let record = v
                .verify_record_proof(&c.repo, &op.path, &proof)
                .await
                .unwrap();
            assert_eq!(record.map(|r| r.record), got, "{at}");
            // The opposite claim is not proven: a delete of a path that holds the record, a
            // create or update of a path the proof shows empty.
            let opposite = match op.action {
                Action::Delete => op.prev,
                Action::Create | Action::Update => None,
            };
            if opposite != expected(op) {
                let err = v
                    .verify_op_proof(&c.repo, &c.rev, &op.path, opposite, &proof)
                    .await
                    .unwrap_err();
                assert!(matches!(err, SyncError::Unproven { .. }), "{at}: {err}");
            }
            sizes.push(proof.len());
            block_counts.push(parsed.len());
            if c.ops.len() == 1 {
                single_op.push((proof.len(), c.blocks.len()));
            }
        }
    }
    assert!(
        records > 50 && deletes > 0,
        "{records} records, {deletes} deletes"
    );
    println!(
        "op proofs of {} ops ({records} with a record, {deletes} deletes): {} bytes; {} blocks",
        sizes.len(),
        stats(sizes.clone()),
        stats(block_counts)
    );
    println!(
        "single-op commits: proof {} bytes; whole commit slice {} bytes",
        stats(single_op.iter().map(|p| p.0).collect()),
        stats(single_op.iter().map(|p| p.1).collect())
    );
}

#[tokio::test]
async fn every_block_of_a_proof_is_needed_and_a_missing_one_is_named() {
    let v = verifier(VerifyLevel::Full);
    let mut removed = 0;
    for c in commits() {
        for op in &c.ops {
            let proof = op_proof(&c.blocks, &op.path).unwrap();
            let blocks = blocks_in(&proof);
            let commit_block = &blocks.iter().find(|(b, _)| *b == c.commit).unwrap().1;
            let data = SignedCommit::decode(commit_block).unwrap().data;
            for (i, (cid, _)) in blocks.iter().enumerate() {
                let mut fewer = blocks.clone();
                fewer.remove(i);
                let err = check(&v, &c, op, &car(&c.commit, &fewer))
                    .await
                    .unwrap_err();
                let what = if *cid == c.commit {
                    "commit"
                } else if Some(*cid) == op.cid {
                    "record"
                } else if *cid == data {
                    "MST root"
                } else {
                    "MST node"
                };
                match &err {
                    SyncError::MissingBlock {
                        cid: missing,
                        what: w,
                    } if *missing == cid.to_string() && *w == what => {}
                    _ => panic!("{} {} without {what} {cid}: {err}", c.rev, op.path),
                }
                removed += 1;
            }
        }
    }
    assert!(removed > 300, "{removed}");
}

#[tokio::test]
async fn a_commit_slice_without_the_path_gives_no_proof() {
    // As the slice of a tooBig commit may be: each block of the proof, missing from the slice.
    for (c, i) in [single_create(), batch_delete()] {
        let op = &c.ops[i];
        let proof = op_proof(&c.blocks, &op.path).unwrap();
        let slice = blocks_in(&c.blocks);
        for (cid, _) in blocks_in(&proof) {
            let without: Vec<_> = slice.iter().filter(|(c, _)| *c != cid).cloned().collect();
            let without = car(&c.commit, &without);
            let err = op_proof(&without, &op.path).unwrap_err();
            // In a batch: the commit block is the whole slice's; a node or record the path's.
            match op_proofs(&without, c.ops.iter().map(|op| op.path.as_str())) {
                Err(SyncError::MissingBlock { what: "commit", .. }) if cid == c.commit => {}
                Ok(batch) if cid != c.commit => assert!(
                    matches!(&batch[i], Err(SyncError::MissingBlock { cid: m, .. }) if *m == cid.to_string()),
                    "{}",
                    op.path
                ),
                other => panic!("{} without {cid}: {other:?}", op.path),
            }
            assert!(
                matches!(&err, SyncError::MissingBlock { cid: missing, .. } if *missing == cid.to_string()),
                "{}: {err}",
                op.path
            );
        }
    }
    // A slice without a single root is not a commit's.
    let (c, i) = single_create();
    let blocks = blocks_in(&c.blocks);
    let mut two_roots = car(&c.commit, &blocks);
    let header = serde_ipld_dagcbor::to_vec(
        &ipld_core::ipld!({"roots": [c.commit, c.commit], "version": 1}),
    )
    .unwrap();
    let old_len = usize::from(two_roots[0]) + 1;
    two_roots.splice(..old_len, [vec![header.len() as u8], header].concat());
    let err = op_proof(&two_roots, &c.ops[i].path).unwrap_err();
    assert!(matches!(err, SyncError::Car { .. }), "{err}");
    let err = verifier(VerifyLevel::Full)
        .verify_op_proof(&c.repo, &c.rev, &c.ops[i].path, c.ops[i].cid, &two_roots)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::Car { .. }), "{err}");
}

#[tokio::test]
async fn every_single_byte_flip_in_a_proof_is_rejected_or_harmless() {
    for (c, i) in [single_create(), batch_delete()] {
        let op = &c.ops[i];
        let proof = op_proof(&c.blocks, &op.path).unwrap();
        let v = verifier(VerifyLevel::Full);
        let want = check(&v, &c, op, &proof).await.unwrap();
        let (mut rejected, mut harmless) = (0, 0);
        for b in 0..proof.len() {
            let mut flipped = proof.clone();
            flipped[b] ^= 0x41;
            match check(&v, &c, op, &flipped).await {
                Err(_) => rejected += 1,
                Ok(got) => {
                    assert_eq!(
                        got,
                        want,
                        "flipping byte {b} of {} changed the proven op",
                        proof.len()
                    );
                    harmless += 1;
                }
            }
        }
        assert_eq!(rejected + harmless, proof.len());
        assert!(
            rejected > proof.len() * 9 / 10,
            "most flips hit hashed bytes ({rejected} of {})",
            proof.len()
        );
    }
}

#[tokio::test]
async fn a_proof_checked_for_another_path_does_not_prove_it() {
    let v = verifier(VerifyLevel::Full);
    let (c, i) = single_create();
    let op = &c.ops[i];
    let proof = op_proof(&c.blocks, &op.path).unwrap();
    let collection = op.path.split_once('/').unwrap().0;
    // Another key with the same record: absent where the proof's nodes show it, or hidden
    // behind a node the proof does not have.
    for other in [
        format!("{collection}/2222222222222"),
        format!("{}x", op.path),
        "agent.comms.zzz/self".to_string(),
    ] {
        let err = v
            .verify_op_proof(&c.repo, &c.rev, &other, op.cid, &proof)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                SyncError::Unproven { .. }
                    | SyncError::MissingBlock {
                        what: "MST node",
                        ..
                    }
            ),
            "{other}: {err}"
        );
    }
    // In a batch: the proof of one op, checked for each other op of the commit.
    let (c, _) = batch_delete();
    let v = verifier(VerifyLevel::Full);
    for a in &c.ops {
        let proof = op_proof(&c.blocks, &a.path).unwrap();
        for b in c.ops.iter().filter(|b| b.path != a.path) {
            match check(&v, &c, b, &proof).await {
                Err(SyncError::Unproven { .. } | SyncError::MissingBlock { .. }) => {}
                // A delete next to `a` is proven absent by `a`'s nodes: that is a proof of it.
                Ok(None) if b.action == Action::Delete => {}
                other => panic!("{} proven by the proof of {}: {other:?}", b.path, a.path),
            }
        }
    }
}

#[tokio::test]
async fn a_proof_with_the_wrong_expected_cid_is_unproven() {
    let v = verifier(VerifyLevel::Full);
    let (c, i) = single_create();
    let op = &c.ops[i];
    let proof = op_proof(&c.blocks, &op.path).unwrap();
    let forged = cid_for(DAG_CBOR, b"\xa1e$typepagent.comms.task");
    for wrong in [Some(forged), None] {
        let err = v
            .verify_op_proof(&c.repo, &c.rev, &op.path, wrong, &proof)
            .await
            .unwrap_err();
        match err {
            SyncError::Unproven {
                did,
                rev,
                path,
                reason,
            } => {
                assert_eq!(
                    (did, rev, path),
                    (c.repo.clone(), c.rev.clone(), op.path.clone())
                );
                assert!(reason.contains(&op.cid.unwrap().to_string()), "{reason}");
            }
            err => panic!("{err}"),
        }
    }
}

#[tokio::test]
async fn a_proof_of_another_commit_is_unproven_even_when_its_tree_agrees() {
    // An op of commit A that a later commit B of the same repo leaves as it is: B's tree
    // shows the same at the path (A's record, or its absence), and only the rev tells that
    // B's proof is not A's.
    let v = verifier(VerifyLevel::Full);
    let all = commits();
    let mut agreeing = 0;
    for (n, a) in all.iter().enumerate() {
        let Some(b) = all[n + 1..].iter().find(|b| b.repo == a.repo) else {
            continue;
        };
        let a_slice = CarSlice::parse(&a.blocks).unwrap();
        for op in &a.ops {
            // B's slice has B's records only: give it A's record too.
            let mut b_blocks = blocks_in(&b.blocks);
            if let Some(cid) = expected(op) {
                b_blocks.push((cid, a_slice.get(&cid).unwrap().to_vec()));
            }
            let Ok(proof) = op_proof(&car(&b.commit, &b_blocks), &op.path) else {
                continue; // B's slice does not cover this path
            };
            if v.verify_op_proof(&b.repo, &b.rev, &op.path, expected(op), &proof)
                .await
                .is_err()
            {
                continue; // B changed it
            }
            let err = check(&v, a, op, &proof).await.unwrap_err();
            match err {
                SyncError::Unproven { reason, .. } => {
                    assert!(
                        reason.contains(&b.rev) && reason.contains(&a.rev),
                        "{reason}"
                    );
                }
                err => panic!("{err}"),
            }
            agreeing += 1;
        }
        // A's own proofs checked under B's rev.
        for op in &a.ops {
            let proof = op_proof(&a.blocks, &op.path).unwrap();
            let err = v
                .verify_op_proof(&b.repo, &b.rev, &op.path, expected(op), &proof)
                .await
                .unwrap_err();
            assert!(matches!(err, SyncError::Unproven { .. }), "{err}");
        }
    }
    println!("{agreeing} ops proven by a later commit's tree, rejected by the rev");
    assert!(agreeing > 0, "no later commit's slice shows an earlier op");
}

#[tokio::test]
async fn a_swapped_record_block_is_rejected() {
    let v = verifier(VerifyLevel::Full);
    let (c, i) = single_create();
    let op = &c.ops[i];
    let cid = op.cid.unwrap();
    let blocks = blocks_in(&op_proof(&c.blocks, &op.path).unwrap());
    // Altered under its CID: the CAR parser re-hashes it.
    let mut altered = blocks.clone();
    let r = altered.iter_mut().find(|(c, _)| *c == cid).unwrap();
    let at = r.1.windows(9).position(|w| w == b"summarise").unwrap();
    r.1[at] = b'S';
    let err = check(&v, &c, op, &car(&c.commit, &altered))
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::CidMismatch { .. }), "{err}");
    // Replaced by another genuine record: the tree does not point at it.
    let other = commits()
        .iter()
        .find_map(|o| {
            let other = o.ops.iter().filter_map(|op| op.cid).find(|c| *c != cid)?;
            let bytes = CarSlice::parse(&o.blocks).unwrap().get(&other)?.to_vec();
            Some((other, bytes))
        })
        .expect("another record in the corpus");
    let mut replaced: Vec<(Cid, Vec<u8>)> =
        blocks.iter().filter(|(c, _)| *c != cid).cloned().collect();
    replaced.push(other.clone());
    let replaced = car(&c.commit, &replaced);
    let err = check(&v, &c, op, &replaced).await.unwrap_err();
    assert!(
        matches!(&err, SyncError::MissingBlock { cid: m, what: "record" } if *m == cid.to_string()),
        "{err}"
    );
    // ...and claiming the other record's CID is unproven.
    let err = v
        .verify_op_proof(&c.repo, &c.rev, &op.path, Some(other.0), &replaced)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::Unproven { .. }), "{err}");
}

#[tokio::test]
async fn a_proof_signed_by_another_key_is_a_bad_signature() {
    let (c, i) = single_create();
    let op = &c.ops[i];
    let proof = op_proof(&c.blocks, &op.path).unwrap();
    let stranger = k256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
    let (_, forged) = resign_car(&proof, |msg| {
        let sig: k256::ecdsa::Signature = k256::ecdsa::signature::Signer::sign(&stranger, msg);
        sig.to_bytes().to_vec()
    });
    let v = verifier(VerifyLevel::Full);
    let err = check(&v, &c, op, &forged).await.unwrap_err();
    assert!(matches!(err, SyncError::BadSignature { .. }), "{err}");
    // The key is the DID's as the resolver has it: with the stranger's key pinned for the DID,
    // the forged proof verifies and the genuine one does not.
    pin(
        v.resolver(),
        &c.repo,
        PublicKey::K256(*stranger.verifying_key()),
    );
    assert!(check(&v, &c, op, &forged).await.unwrap().is_some());
    let err = check(&v, &c, op, &proof).await.unwrap_err();
    assert!(matches!(err, SyncError::BadSignature { .. }), "{err}");
    // Another DID's key for this DID (as a lying resolver would give) fails the same way.
    let v = verifier(VerifyLevel::Full);
    let (other_did, other_key) = keys().into_iter().find(|(d, _)| *d != c.repo).unwrap();
    pin(
        v.resolver(),
        &c.repo,
        PublicKey::from_did_key(&other_key).unwrap(),
    );
    let err = check(&v, &c, op, &proof).await.unwrap_err();
    assert!(matches!(err, SyncError::BadSignature { .. }), "{err}");
    // The proof of one DID's op claimed for another DID: the commit names its own.
    let err = verifier(VerifyLevel::Full)
        .verify_op_proof(&other_did, &c.rev, &op.path, op.cid, &proof)
        .await
        .unwrap_err();
    assert!(
        matches!(err, SyncError::CommitMismatch { field: "did", .. }),
        "{err}"
    );
    // Level None trusts the source: the signature is not checked, the rest is.
    let none = verifier(VerifyLevel::None);
    assert!(check(&none, &c, op, &forged).await.unwrap().is_some());
    let err = none
        .verify_op_proof(&c.repo, &c.rev, &op.path, None, &forged)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::Unproven { .. }), "{err}");
}

#[tokio::test]
async fn proofs_over_the_limits_are_too_large() {
    let (c, i) = single_create();
    let op = &c.ops[i];
    let proof = op_proof(&c.blocks, &op.path).unwrap();
    let small = |limits: Limits| verifier(VerifyLevel::Full).with_limits(limits);
    let err = check(
        &small(Limits {
            max_blocks_bytes: proof.len() - 1,
            ..Limits::default()
        }),
        &c,
        op,
        &proof,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            SyncError::TooLarge {
                what: "op proof",
                ..
            }
        ),
        "{err}"
    );
    let err = check(
        &small(Limits {
            max_record_bytes: 10,
            ..Limits::default()
        }),
        &c,
        op,
        &proof,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, SyncError::TooLarge { what: "record", .. }),
        "{err}"
    );
}

// The atproto commit-proof vectors (tests/fixtures/interop/firehose): for each, the MST after
// the commit is built here from its keys (its root must be the vector's), and a commit slice
// holding only the vector's `blocksInProof` must prove every op of the commit.

/// Encodes the MST node at `layer` over `keys` (sorted, each with its height), pushing every
/// node block; returns the node's CID. An independent encoder: the vectors' roots check it.
fn mst_node(keys: &[(&str, u32)], layer: u32, value: Cid, blocks: &mut Vec<(Cid, Vec<u8>)>) -> Cid {
    use ipld_core::ipld::Ipld;
    let sub = |group: &[(&str, u32)], blocks: &mut Vec<(Cid, Vec<u8>)>| {
        if group.is_empty() {
            Ipld::Null
        } else {
            Ipld::Link(mst_node(group, layer - 1, value, blocks))
        }
    };
    let on_layer: Vec<usize> = (0..keys.len()).filter(|&i| keys[i].1 == layer).collect();
    let left = sub(
        &keys[..on_layer.first().copied().unwrap_or(keys.len())],
        blocks,
    );
    let mut entries = Vec::new();
    let mut prev: &[u8] = b"";
    for (n, &i) in on_layer.iter().enumerate() {
        let key = keys[i].0.as_bytes();
        let end = on_layer.get(n + 1).copied().unwrap_or(keys.len());
        let right = sub(&keys[i + 1..end], blocks);
        let p = prev.iter().zip(key).take_while(|(a, b)| a == b).count();
        entries.push(Ipld::Map(
            [
                ("k".to_string(), Ipld::Bytes(key[p..].to_vec())),
                ("p".to_string(), Ipld::Integer(p as i128)),
                ("t".to_string(), right),
                ("v".to_string(), Ipld::Link(value)),
            ]
            .into(),
        ));
        prev = key;
    }
    let node = Ipld::Map(
        [
            ("e".to_string(), Ipld::List(entries)),
            ("l".to_string(), left),
        ]
        .into(),
    );
    let bytes = serde_ipld_dagcbor::to_vec(&node).unwrap();
    let cid = cid_for(DAG_CBOR, &bytes);
    blocks.push((cid, bytes));
    cid
}

/// The root of the MST over `keys`, with all its node blocks.
fn mst(keys: &BTreeSet<String>, value: Cid) -> (Cid, Vec<(Cid, Vec<u8>)>) {
    let keys: Vec<(&str, u32)> = keys
        .iter()
        .map(|k| (k.as_str(), key_height(k.as_bytes())))
        .collect();
    let top = keys.iter().map(|k| k.1).max().unwrap_or(0);
    let mut blocks = Vec::new();
    let root = mst_node(&keys, top, value, &mut blocks);
    (root, blocks)
}

#[tokio::test]
async fn commit_proof_vectors_prove_each_op_from_the_reference_blocks() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/interop/firehose/commit-proof-fixtures.json"
    );
    let vectors: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let did = "did:plc:interopcommitproof";
    let rev = "3lon5dzeaihj2";
    let key = k256::ecdsa::SigningKey::from_slice(&[5u8; 32]).unwrap();
    let resolver = IdentityResolver::new().with_plc_url("http://127.0.0.1:9");
    resolver.pin(Identity {
        did: did.to_string(),
        signing_key: PublicKey::K256(*key.verifying_key()),
        handle: None,
        pds: None,
    });
    let v = Verifier::new(std::sync::Arc::new(resolver));
    let cid = |v: &serde_json::Value| v.as_str().unwrap().parse::<Cid>().unwrap();
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    let vectors = vectors.as_array().unwrap();
    assert_eq!(vectors.len(), 6);
    let mut ops = 0;
    for t in vectors {
        let comment = t["comment"].as_str().unwrap();
        let value = cid(&t["leafValue"]);
        let before: BTreeSet<String> = strings(&t["keys"]).into_iter().collect();
        let (adds, dels) = (strings(&t["adds"]), strings(&t["dels"]));
        let mut after = before.clone();
        after.extend(adds.iter().cloned());
        for d in &dels {
            after.remove(d);
        }
        assert_eq!(
            mst(&before, value).0,
            cid(&t["rootBeforeCommit"]),
            "{comment}"
        );
        let (root, all_blocks) = mst(&after, value);
        assert_eq!(root, cid(&t["rootAfterCommit"]), "{comment}");
        // The commit's slice: the signed commit and the reference's proof blocks only.
        let unsigned = ipld_core::ipld!({
            "did": did, "version": 3, "data": root, "rev": rev, "prev": null,
        });
        let unsigned = serde_ipld_dagcbor::to_vec(&unsigned).unwrap();
        let sig: k256::ecdsa::Signature = k256::ecdsa::signature::Signer::sign(&key, &unsigned);
        let signed = ipld_core::ipld!({
            "did": did, "version": 3, "data": root, "rev": rev, "prev": null,
            "sig": ipld_core::ipld::Ipld::Bytes(sig.to_bytes().to_vec()),
        });
        let commit_block = serde_ipld_dagcbor::to_vec(&signed).unwrap();
        let commit = cid_for(DAG_CBOR, &commit_block);
        let in_proof: Vec<Cid> = t["blocksInProof"]
            .as_array()
            .unwrap()
            .iter()
            .map(cid)
            .collect();
        let mut slice = vec![(commit, commit_block)];
        for c in &in_proof {
            let block = all_blocks.iter().find(|(b, _)| b == c);
            slice.push(
                block
                    .unwrap_or_else(|| panic!("{comment}: {c} is not a node"))
                    .clone(),
            );
        }
        let slice = car(&commit, &slice);
        for d in &dels {
            let proof = op_proof(&slice, d).unwrap_or_else(|e| panic!("{comment}: {d}: {e}"));
            let got = v.verify_op_proof(did, rev, d, None, &proof).await;
            assert_eq!(got.unwrap(), None, "{comment}: {d}");
            let err = v
                .verify_op_proof(did, rev, d, Some(value), &proof)
                .await
                .unwrap_err();
            assert!(
                matches!(err, SyncError::Unproven { .. }),
                "{comment}: {d}: {err}"
            );
            ops += 1;
        }
        for a in &adds {
            // The vectors have no record block for `leafValue`: the search path is all there,
            // the record is named missing.
            let err = op_proof(&slice, a).unwrap_err();
            assert!(
                matches!(&err, SyncError::MissingBlock { cid, what: "record" } if *cid == value.to_string()),
                "{comment}: {a}: {err}"
            );
            let err = v
                .verify_op_proof(did, rev, a, Some(value), &slice)
                .await
                .unwrap_err();
            assert!(
                matches!(&err, SyncError::MissingBlock { what: "record", .. }),
                "{comment}: {a}: {err}"
            );
            let err = v
                .verify_op_proof(did, rev, a, None, &slice)
                .await
                .unwrap_err();
            assert!(
                matches!(err, SyncError::Unproven { .. }),
                "{comment}: {a}: {err}"
            );
            ops += 1;
        }
    }
    assert_eq!(ops, 10);
}
