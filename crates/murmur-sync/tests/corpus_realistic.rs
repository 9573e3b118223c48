//! The realistic corpus (tests/fixtures/corpus-realistic, recorded by
//! examples/record_realistic_corpus.rs): commits on grown repos decode the same from slices
//! and shared buffers, verify under Full in stream order with the recorded keys, and are
//! shaped as the benchmark claims (several MST nodes per commit, single ops and batches).

mod common;

use common::{REALISTIC, frames_in, verifier_for};
use murmur_sync::{Action, Bytes, CarSlice, Frame, VerifyLevel};

#[tokio::test]
async fn every_frame_decodes_alike_and_verifies_under_full_in_order() {
    let frames = frames_in(REALISTIC);
    assert!(frames.len() >= 500, "{} frames", frames.len());
    let verifier = verifier_for(REALISTIC, VerifyLevel::Full);
    let (mut nodes, mut batches) = (0, 0);
    let mut actions = std::collections::BTreeSet::new();
    let mut seen = std::collections::BTreeSet::new();
    for (i, f) in frames.iter().enumerate() {
        let from_slice = Frame::decode(f).unwrap_or_else(|e| panic!("frame {i}: {e}"));
        let shared = Bytes::from(f.clone());
        let from_bytes = Frame::decode(&shared).unwrap();
        assert_eq!(from_slice, from_bytes, "frame {i}");
        let Frame::Commit(c) = from_bytes else {
            panic!("frame {i} is not a #commit")
        };
        let verified = verifier
            .verify_commit(&c)
            .await
            .unwrap_or_else(|e| panic!("frame {i} (seq {}): {e}", c.seq));
        // Each DID's first commit starts its chain; every later one follows it.
        if !seen.insert(c.repo.clone()) {
            assert!(verified.chain_break.is_none(), "frame {i}");
        }
        let car = CarSlice::parse(&c.blocks).unwrap();
        let records = c
            .ops
            .iter()
            .filter(|op| op.cid.is_some_and(|cid| car.get(&cid).is_some()))
            .count();
        nodes += car.len() - 1 - records;
        batches += usize::from(c.ops.len() > 1);
        actions.extend(c.ops.iter().map(|op| op.action.as_str()));
    }
    // Grown repos: commits carry deep MST paths, not the one or two nodes of a tiny repo.
    assert!(nodes >= frames.len() * 5, "{nodes} MST nodes");
    assert!(batches >= frames.len() / 5, "{batches} batches");
    let all = [Action::Create, Action::Update, Action::Delete].map(Action::as_str);
    assert!(all.iter().all(|a| actions.contains(a)), "{actions:?}");
}

#[test]
fn truncated_frames_are_errors_not_panics() {
    let frames = frames_in(REALISTIC);
    for f in frames.iter().step_by(97) {
        for cut in 0..f.len() {
            assert!(
                Frame::decode(&f[..cut]).is_err(),
                "cut {cut} of {}",
                f.len()
            );
        }
    }
}
