//! Helpers shared by the offline corpus tests: the recorded frames (tests/fixtures/corpus, see
//! tests/devnet.rs), a verifier with the corpus DIDs' keys pinned (no network), and CAR
//! rewriting for forged variants.

#![allow(dead_code)] // each test crate uses its own subset

use std::sync::Arc;

use murmur_sync::{
    CarSlice, Cid, CommitEvent, DAG_CBOR, Frame, Identity, IdentityResolver, PublicKey,
    SignedCommit, Verifier, VerifyLevel, cid_for, write_car,
};

/// The corpus of small repos (tests/devnet.rs records it).
pub const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/corpus");
/// The corpus of commits on grown repos (examples/record_realistic_corpus.rs records it).
pub const REALISTIC: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/corpus-realistic"
);

pub fn corpus() -> Vec<Vec<u8>> {
    frames_in(CORPUS)
}

/// The length-prefixed frames of `dir`/frames.bin.
pub fn frames_in(dir: &str) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(format!("{dir}/frames.bin")).unwrap();
    let mut frames = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let n = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        frames.push(rest[4..4 + n].to_vec());
        rest = &rest[4 + n..];
    }
    frames
}

pub fn keys() -> Vec<(String, String)> {
    keys_in(CORPUS)
}

/// The DIDs' signing keys (did:key) recorded in `dir`/keys.json.
pub fn keys_in(dir: &str) -> Vec<(String, String)> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/keys.json")).unwrap())
            .unwrap();
    v.as_object()
        .unwrap()
        .iter()
        .map(|(d, k)| (d.clone(), k.as_str().unwrap().to_string()))
        .collect()
}

pub fn pin(resolver: &IdentityResolver, did: &str, key: PublicKey) {
    resolver.pin(Identity {
        did: did.to_string(),
        signing_key: key,
        handle: None,
        pds: None,
    });
}

pub fn verifier(level: VerifyLevel) -> Verifier {
    verifier_for(CORPUS, level)
}

/// A verifier with the keys of the corpus in `dir` pinned (no network).
pub fn verifier_for(dir: &str, level: VerifyLevel) -> Verifier {
    let resolver = IdentityResolver::new().with_plc_url("http://127.0.0.1:9");
    for (did, key) in keys_in(dir) {
        pin(&resolver, &did, PublicKey::from_did_key(&key).unwrap());
    }
    Verifier::new(Arc::new(resolver)).with_level(level)
}

pub fn commits() -> Vec<CommitEvent> {
    corpus()
        .iter()
        .filter_map(|f| match Frame::decode(f).unwrap() {
            Frame::Commit(c) => Some(*c),
            _ => None,
        })
        .collect()
}

/// Re-encodes a CAR slice with `root` and `blocks`.
pub fn car(root: &Cid, blocks: &[(Cid, Vec<u8>)]) -> Vec<u8> {
    write_car(*root, blocks.iter().map(|(c, d)| (*c, d)))
}

/// The blocks of a CAR, in CID order.
pub fn blocks_in(car: &[u8]) -> Vec<(Cid, Vec<u8>)> {
    CarSlice::parse(car)
        .unwrap()
        .blocks()
        .map(|(c, d)| (c, d.to_vec()))
        .collect()
}

/// The blocks of a commit's CAR slice.
pub fn blocks_of(ev: &CommitEvent) -> Vec<(Cid, Vec<u8>)> {
    blocks_in(&ev.blocks)
}

/// Replaces the signature of the commit block at the root of `car` with one made by `sign`
/// over the same commit: the new commit CID and the CAR with it as root.
pub fn resign_car(car_bytes: &[u8], sign: impl Fn(&[u8]) -> Vec<u8>) -> (Cid, Vec<u8>) {
    let root = CarSlice::parse(car_bytes).unwrap().roots()[0];
    let mut blocks = blocks_in(car_bytes);
    let i = blocks.iter().position(|(c, _)| *c == root).unwrap();
    let commit = SignedCommit::decode(&blocks[i].1).unwrap();
    let new_sig = sign(&commit.unsigned);
    let at = blocks[i]
        .1
        .windows(64)
        .position(|w| w == commit.sig.as_slice())
        .unwrap();
    blocks[i].1[at..at + 64].copy_from_slice(&new_sig);
    let new_cid = cid_for(DAG_CBOR, &blocks[i].1);
    blocks[i].0 = new_cid;
    (new_cid, car(&new_cid, &blocks))
}

/// Replaces the commit block's signature with one made by `sign` over the same commit.
pub fn resign(ev: &CommitEvent, sign: impl Fn(&[u8]) -> Vec<u8>) -> CommitEvent {
    let (new_cid, blocks) = resign_car(&ev.blocks, sign);
    let mut out = ev.clone();
    out.commit = new_cid;
    out.blocks = blocks.into();
    out
}
