//! Offline tests on frames recorded from the local PDS (tests/fixtures/corpus, see
//! tests/devnet.rs): the corpus verifies at every level, and forged variants built by mutating
//! its frames are rejected with the matching error.

mod common;

use common::{blocks_of, car, commits, corpus, keys, pin, resign, verifier};
use murmur_sync::{
    Action, CommitEvent, DAG_CBOR, Frame, PublicKey, SignatureFault, SignedCommit, SyncError,
    VerifyLevel, cid_for,
};

/// A commit with several ops, one create, in a repo with history.
fn batch() -> CommitEvent {
    commits()
        .into_iter()
        .find(|c| c.ops.len() >= 5 && c.ops.iter().any(|o| o.action == Action::Delete))
        .expect("an applyWrites batch with a delete in the corpus")
}

fn single_create() -> CommitEvent {
    commits()
        .into_iter()
        .find(|c| c.ops.len() == 1 && c.ops[0].action == Action::Create && c.since.is_some())
        .unwrap()
}

async fn verify_all(level: VerifyLevel) -> usize {
    let v = verifier(level);
    let mut n = 0;
    for f in corpus() {
        match Frame::decode(&f).unwrap() {
            Frame::Commit(c) => {
                let verified = v
                    .verify_commit(&c)
                    .await
                    .unwrap_or_else(|e| panic!("{level:?}: {e}"));
                assert_eq!(verified.ops.len(), c.ops.len());
                n += 1;
            }
            Frame::Sync(s) => {
                v.verify_sync(&s).await.unwrap();
            }
            _ => {}
        }
    }
    n
}

#[tokio::test]
async fn recorded_corpus_verifies_at_every_level() {
    for level in [
        VerifyLevel::Full,
        VerifyLevel::SignatureOnly,
        VerifyLevel::None,
    ] {
        assert!(verify_all(level).await >= 20);
    }
}

#[tokio::test]
async fn recorded_records_decode_and_match_their_cids() {
    let v = verifier(VerifyLevel::Full);
    let mut records = 0;
    for c in commits() {
        for op in v.verify_commit(&c).await.unwrap().ops {
            if let Some(bytes) = &op.record {
                assert_eq!(cid_for(DAG_CBOR, bytes), op.cid.unwrap());
                let value: serde_json::Value = op.decode().unwrap().unwrap();
                assert!(value["$type"].as_str().unwrap().starts_with("agent.comms."));
                records += 1;
            }
        }
    }
    assert!(records > 50);
}

#[tokio::test]
async fn commit_resigned_with_another_key_is_a_bad_signature() {
    let other = k256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap();
    let forged = resign(&single_create(), |msg| {
        let sig: k256::ecdsa::Signature = k256::ecdsa::signature::Signer::sign(&other, msg);
        sig.to_bytes().to_vec()
    });
    let err = verifier(VerifyLevel::Full)
        .verify_commit(&forged)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::BadSignature { .. }), "{err}");
    let err = verifier(VerifyLevel::SignatureOnly)
        .verify_commit(&forged)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::BadSignature { .. }), "{err}");
    // Level None trusts the source.
    verifier(VerifyLevel::None)
        .verify_commit(&forged)
        .await
        .unwrap();
}

#[tokio::test]
async fn high_s_twin_of_a_valid_signature_is_rejected() {
    let ev = single_create();
    let blocks = blocks_of(&ev);
    let commit =
        SignedCommit::decode(&blocks.iter().find(|(c, _)| *c == ev.commit).unwrap().1).unwrap();
    let forged = resign(&ev, |_| {
        let sig = k256::ecdsa::Signature::from_slice(&commit.sig).unwrap();
        let (r, s) = sig.split_scalars();
        k256::ecdsa::Signature::from_scalars(r, -*s)
            .unwrap()
            .to_bytes()
            .to_vec()
    });
    let err = verifier(VerifyLevel::Full)
        .verify_commit(&forged)
        .await
        .unwrap_err();
    assert!(
        matches!(err, SyncError::BadSignature { reason, .. } if reason == SignatureFault::HighS.as_str()),
        "{err}"
    );
}

#[tokio::test]
async fn did_whose_document_has_another_key_is_a_bad_signature() {
    let ev = single_create();
    let v = verifier(VerifyLevel::Full);
    let stranger = k256::ecdsa::SigningKey::from_slice(&[9u8; 32]).unwrap();
    pin(
        v.resolver(),
        &ev.repo,
        PublicKey::K256(*stranger.verifying_key()),
    );
    let err = v.verify_commit(&ev).await.unwrap_err();
    assert!(matches!(err, SyncError::BadSignature { .. }), "{err}");
}

#[tokio::test]
async fn commit_claimed_for_another_did_is_a_mismatch() {
    let mut ev = single_create();
    let other = keys().into_iter().find(|(d, _)| *d != ev.repo).unwrap().0;
    ev.repo = other;
    let err = verifier(VerifyLevel::Full)
        .verify_commit(&ev)
        .await
        .unwrap_err();
    assert!(
        matches!(err, SyncError::CommitMismatch { field: "did", .. }),
        "{err}"
    );
}

#[tokio::test]
async fn record_block_swapped_under_its_cid_is_a_cid_mismatch() {
    let mut ev = single_create();
    let record = ev.ops[0].cid.unwrap();
    let mut blocks = blocks_of(&ev);
    let b = blocks.iter_mut().find(|(c, _)| *c == record).unwrap();
    let text = b.1.windows(9).position(|w| w == b"summarise").unwrap();
    b.1[text] = b'S';
    ev.blocks = car(&ev.commit, &blocks).into();
    let err = verifier(VerifyLevel::Full)
        .verify_commit(&ev)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::CidMismatch { .. }), "{err}");
}

#[tokio::test]
async fn record_replaced_with_another_block_does_not_match_the_mst() {
    let mut ev = single_create();
    let fake = serde_ipld_dagcbor::to_vec(
        &ipld_core::ipld!({"$type": "agent.comms.task", "title": "wire money"}),
    )
    .unwrap();
    let fake_cid = cid_for(DAG_CBOR, &fake);
    let mut blocks = blocks_of(&ev);
    blocks.push((fake_cid, fake));
    ev.blocks = car(&ev.commit, &blocks).into();
    ev.ops[0].cid = Some(fake_cid);
    let err = verifier(VerifyLevel::Full)
        .verify_commit(&ev)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::MstInversion { .. }), "{err}");
    // SignatureOnly does not look at the MST: that is what Full is for.
    verifier(VerifyLevel::SignatureOnly)
        .verify_commit(&ev)
        .await
        .unwrap();
}

#[tokio::test]
async fn ops_that_do_not_match_the_mst_are_rejected() {
    // An op renamed to another path.
    let mut ev = batch();
    ev.ops[0].path = format!("{}/forged", ev.ops[0].collection());
    let err = verifier(VerifyLevel::Full)
        .verify_commit(&ev)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::MstInversion { .. }), "{err}");
    // An op left out of the batch: undoing the rest does not give prevData.
    let mut ev = batch();
    ev.ops.remove(0);
    let err = verifier(VerifyLevel::Full)
        .verify_commit(&ev)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::MstInversion { .. }), "{err}");
    // A delete turned into an update.
    let mut ev = batch();
    let d = ev
        .ops
        .iter()
        .position(|o| o.action == Action::Delete)
        .unwrap();
    ev.ops[d].action = Action::Update;
    ev.ops[d].cid = ev.ops[0].cid;
    let err = verifier(VerifyLevel::Full)
        .verify_commit(&ev)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::MstInversion { .. }), "{err}");
}

#[tokio::test]
async fn wrong_prev_data_is_rejected() {
    let mut ev = single_create();
    ev.prev_data = Some(cid_for(DAG_CBOR, b"\xa0"));
    let err = verifier(VerifyLevel::Full)
        .verify_commit(&ev)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::MstInversion { .. }), "{err}");
}

#[tokio::test]
async fn rev_going_backward_is_rejected_and_the_chain_is_kept() {
    let all = commits();
    let v = verifier(VerifyLevel::Full);
    for c in &all {
        v.verify_commit(c).await.unwrap();
    }
    let last = all.last().unwrap();
    let head = v.chain_head(&last.repo).unwrap();
    let replayed = all
        .iter()
        .find(|c| c.repo == last.repo && c.ops.len() == 1)
        .unwrap();
    let err = v.verify_commit(replayed).await.unwrap_err();
    assert!(matches!(err, SyncError::RevNotNewer { .. }), "{err}");
    assert_eq!(v.chain_head(&last.repo).unwrap(), head);
    // The same commit twice is a replay too.
    let err = v.verify_commit(last).await.unwrap_err();
    assert!(matches!(err, SyncError::RevNotNewer { .. }), "{err}");
}

#[tokio::test]
async fn a_missed_commit_desynchronizes_the_repo_and_the_chain_resumes_after() {
    let all = commits();
    let did = all
        .iter()
        .rev()
        .find(|c| c.ops.len() == 1)
        .unwrap()
        .repo
        .clone();
    let mine: Vec<&CommitEvent> = all.iter().filter(|c| c.repo == did).collect();
    assert!(mine.len() >= 4);
    let v = verifier(VerifyLevel::Full);
    v.verify_commit(mine[0]).await.unwrap();
    v.verify_commit(mine[1]).await.unwrap();
    // mine[2] is lost: mine[3] still verifies, with the break reported.
    let after_gap = v.verify_commit(mine[3]).await.unwrap();
    assert!(after_gap.chain_break.is_some(), "{after_gap:?}");
    assert_eq!(after_gap.ops.len(), mine[3].ops.len());
    assert_eq!(v.chain_head(&did).unwrap().rev, mine[3].rev);
    for c in &mine[4..] {
        v.verify_commit(c).await.unwrap();
    }
}

#[tokio::test]
async fn rev_far_in_the_future_is_rejected() {
    let mut ev = single_create();
    ev.rev = "7zzzzzzzzzzzz".into();
    let err = verifier(VerifyLevel::Full)
        .verify_commit(&ev)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::FutureRev { .. }), "{err}");
    ev.rev = "not-a-tid".into();
    let err = verifier(VerifyLevel::Full)
        .verify_commit(&ev)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::InvalidRev(_)), "{err}");
}

#[tokio::test]
async fn observed_commits_keep_the_chain_without_parsing() {
    let all = commits();
    let v = verifier(VerifyLevel::Full);
    for (i, c) in all.iter().enumerate() {
        if i % 2 == 0 {
            v.observe_commit(c).unwrap();
        } else {
            v.verify_commit(c).await.unwrap();
        }
    }
}

#[test]
fn every_truncation_of_every_frame_is_an_error_not_a_panic() {
    for f in corpus() {
        for cut in 0..f.len() {
            assert!(
                Frame::decode(&f[..cut]).is_err(),
                "cut {cut} of {}",
                f.len()
            );
        }
    }
}

/// What a verified commit says, minus the fields no signature covers (`seq`, `time`, and
/// `since`, which only feeds the chain check).
fn signed_content(v: &murmur_sync::VerifiedCommit) -> impl PartialEq + std::fmt::Debug + '_ {
    (&v.repo, &v.rev, &v.commit, &v.data, &v.ops, v.level)
}

#[tokio::test]
async fn every_single_byte_flip_in_a_commit_frame_is_rejected_or_harmless() {
    let frames = corpus();
    for f in frames.iter().filter(|f| {
        matches!(Frame::decode(f), Ok(Frame::Commit(c)) if c.ops.len() == 1 || c.ops.len() >= 5)
    }) {
        let Ok(Frame::Commit(original)) = Frame::decode(f) else {
            unreachable!()
        };
        let want = verifier(VerifyLevel::Full)
            .verify_commit(&original)
            .await
            .unwrap();
        let (mut rejected, mut harmless) = (0, 0);
        for i in 0..f.len() {
            let mut g = f.clone();
            g[i] ^= 0x41;
            let Ok(Frame::Commit(c)) = Frame::decode(&g) else {
                rejected += 1;
                continue;
            };
            // A fresh verifier per flip: no chain state, so only the commit itself decides.
            match verifier(VerifyLevel::Full).verify_commit(&c).await {
                Err(_) => rejected += 1,
                Ok(got) => {
                    // Accepted: then it must say exactly what the signed original says.
                    assert_eq!(
                        signed_content(&got),
                        signed_content(&want),
                        "flipping byte {i} of {} changed what a verified commit says",
                        f.len()
                    );
                    harmless += 1;
                }
            }
        }
        assert_eq!(rejected + harmless, f.len());
        assert!(
            rejected > f.len() * 9 / 10,
            "most flips hit signed or hashed bytes ({rejected} of {})",
            f.len()
        );
    }
}

#[tokio::test]
async fn a_too_big_commit_with_a_forged_op_is_never_verified() {
    // The genuine signed batch, marked tooBig, with one op's path swapped for a key the repo
    // never had. Without a PDS to prove it from, it cannot pass; with inversion it fails.
    let mut ev = batch();
    ev.too_big = true;
    let i = ev
        .ops
        .iter()
        .position(|o| o.action == Action::Create)
        .unwrap();
    ev.ops[i].path = format!("{}/3forgedforged", ev.ops[i].collection());
    let err = verifier(VerifyLevel::Full)
        .verify_commit(&ev)
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");

    // The same commit untouched but marked tooBig still verifies from its own slice.
    let mut ev = batch();
    ev.too_big = true;
    let verified = verifier(VerifyLevel::Full)
        .verify_commit(&ev)
        .await
        .unwrap();
    assert!(
        verified
            .ops
            .iter()
            .all(|o| o.action == Action::Delete || o.record.is_some())
    );
}

#[tokio::test]
async fn sync_event_resets_the_chain() {
    let frames: Vec<Frame> = corpus().iter().map(|f| Frame::decode(f).unwrap()).collect();
    let sync = frames
        .iter()
        .find_map(|f| match f {
            Frame::Sync(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    let theirs: Vec<&CommitEvent> = frames
        .iter()
        .filter_map(|f| match f {
            Frame::Commit(c) if c.repo == sync.did => Some(&**c),
            _ => None,
        })
        .collect();
    let next = theirs
        .iter()
        .find(|c| c.since.as_deref() == Some(&sync.rev))
        .unwrap();
    let v = verifier(VerifyLevel::Full);
    // The chain is somewhere later...
    v.verify_commit(theirs.last().unwrap()).await.unwrap();
    assert!(v.verify_commit(next).await.is_err());
    // ...until #sync puts it back at the sync's commit; the commit after it then chains.
    let synced = v.verify_sync(&sync).await.unwrap();
    assert_eq!(v.chain_head(&sync.did).unwrap().rev, synced.rev);
    v.verify_commit(next).await.unwrap();
}
