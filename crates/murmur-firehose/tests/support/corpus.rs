//! The frames recorded from the local PDS for murmur-sync (`crates/murmur-sync/tests/fixtures/
//! corpus/frames.bin`: commits of `agent.comms.task` records plus `#identity`, `#account` and
//! `#sync` events of two accounts), rewritten into longer streams, and a source replaying them.
//! Shared by the offline tests and the dispatch benchmark.

#![allow(dead_code)] // each includer uses part of it

use std::sync::Arc;

use async_trait::async_trait;
use atrium_api::types::Collection;
use futures_util::StreamExt;
use ipld_core::ipld::Ipld;
use murmur_firehose::{MessageStream, Source, SourceError, SourceMessage};
use murmur_lexicon::{Validate, ValidationError};
use serde::{Deserialize, Serialize};

/// The recorded frames, in stream order.
pub fn recorded() -> Vec<Vec<u8>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../murmur-sync/tests/fixtures/corpus/frames.bin"
    );
    let bytes = std::fs::read(path).expect("the recorded corpus");
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while rest.len() >= 4 {
        let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        out.push(rest[4..4 + n].to_vec());
        rest = &rest[4 + n..];
    }
    out
}

/// The recorded frames as pass `pass` of a longer stream: seqs from `first_seq` on, and DIDs
/// of the same length whose last four characters encode `pass`, so every pass has its own
/// repos and every rev chain stays valid. Signatures no longer match (use `VerifyLevel::None`).
pub fn pass(recorded: &[Vec<u8>], pass: usize, first_seq: i64) -> Vec<Vec<u8>> {
    recorded
        .iter()
        .zip(first_seq..)
        .map(|(frame, seq)| rewrite(frame, seq, pass))
        .collect()
}

/// Like [`pass`], but every commit (and `#sync`) is signed again by `key` for its new DID, so
/// the pass verifies at `VerifyLevel::Full` with `key` pinned for each of its DIDs
/// ([`dids`] lists them).
pub fn signed_pass(
    recorded: &[Vec<u8>],
    pass: usize,
    first_seq: i64,
    key: &k256::ecdsa::SigningKey,
) -> Vec<Vec<u8>> {
    recorded
        .iter()
        .zip(first_seq..)
        .map(|(frame, seq)| rewrite_signed(frame, seq, pass, Some(key)))
        .collect()
}

/// The DIDs the frames are about, each once.
pub fn dids(frames: &[Vec<u8>]) -> Vec<String> {
    let mut out: Vec<String> = frames
        .iter()
        .filter_map(|f| {
            murmur_sync::Frame::decode(f)
                .ok()?
                .did()
                .map(str::to_string)
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

fn rewrite(frame: &[u8], seq: i64, pass: usize) -> Vec<u8> {
    rewrite_signed(frame, seq, pass, None)
}

/// Signs the commit block of a `#commit`'s or `#sync`'s CAR slice again for `did`: the
/// block's `did` is replaced and its signature made by `key`; the slice gets the new block
/// and root, the frame the new commit CID.
fn resign(
    fields: &mut std::collections::BTreeMap<String, Ipld>,
    did: &str,
    key: &k256::ecdsa::SigningKey,
) {
    let Some(Ipld::Bytes(car)) = fields.get("blocks") else {
        return;
    };
    let slice = murmur_sync::CarSlice::parse(car).expect("recorded CAR slice");
    let root = slice.roots()[0];
    let mut blocks: Vec<(cid::Cid, Vec<u8>)> =
        slice.blocks().map(|(c, b)| (c, b.to_vec())).collect();
    let at = blocks
        .iter()
        .position(|(c, _)| *c == root)
        .expect("commit block");
    let mut commit: Ipld = serde_ipld_dagcbor::from_slice(&blocks[at].1).expect("commit");
    let Ipld::Map(map) = &mut commit else {
        panic!("commit is not a map")
    };
    map.insert("did".into(), Ipld::String(did.to_string()));
    map.remove("sig");
    let unsigned = serde_ipld_dagcbor::to_vec(&commit).expect("unsigned commit");
    let sig: k256::ecdsa::Signature = k256::ecdsa::signature::Signer::sign(key, &unsigned);
    let Ipld::Map(map) = &mut commit else {
        unreachable!()
    };
    map.insert("sig".into(), Ipld::Bytes(sig.to_bytes().to_vec()));
    let block = serde_ipld_dagcbor::to_vec(&commit).expect("signed commit");
    let cid = murmur_sync::cid_for(murmur_sync::DAG_CBOR, &block);
    blocks[at] = (cid, block);
    let car = murmur_sync::write_car(cid, blocks.iter().map(|(c, b)| (*c, b.as_slice())));
    fields.insert("blocks".into(), Ipld::Bytes(car));
    if fields.contains_key("commit") {
        fields.insert("commit".into(), Ipld::Link(cid));
    }
}

fn rewrite_signed(
    frame: &[u8],
    seq: i64,
    pass: usize,
    key: Option<&k256::ecdsa::SigningKey>,
) -> Vec<u8> {
    let mut reader = frame;
    let header: Ipld = serde_ipld_dagcbor::de::from_reader_once(&mut reader).expect("header");
    let mut body: Ipld = serde_ipld_dagcbor::de::from_reader_once(&mut reader).expect("body");
    let Ipld::Map(fields) = &mut body else {
        panic!("frame body is not a map")
    };
    if fields.contains_key("seq") {
        fields.insert("seq".into(), Ipld::Integer(seq.into()));
    }
    for field in ["repo", "did"] {
        if let Some(Ipld::String(did)) = fields.get(field) {
            let did = did_for_pass(did, pass);
            fields.insert(field.into(), Ipld::String(did.clone()));
            if let Some(key) = key {
                resign(fields, &did, key);
            }
        }
    }
    let mut out = serde_ipld_dagcbor::to_vec(&header).expect("header");
    out.extend(serde_ipld_dagcbor::to_vec(&body).expect("body"));
    out
}

fn did_for_pass(did: &str, pass: usize) -> String {
    const B32: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = did[..did.len() - 4].to_string();
    for i in (0..4).rev() {
        out.push(B32[(pass >> (5 * i)) & 31] as char);
    }
    out
}

/// Creates of `agent.comms.task` in `frames`.
pub fn task_creates(frames: &[Vec<u8>]) -> u64 {
    task_ops(frames, murmur_sync::Action::Create)
}

/// Ops of `agent.comms.task` with `action` in `frames`.
pub fn task_ops(frames: &[Vec<u8>], action: murmur_sync::Action) -> u64 {
    frames
        .iter()
        .filter_map(|f| match murmur_sync::Frame::decode(f) {
            Ok(murmur_sync::Frame::Commit(c)) => Some(
                c.ops
                    .iter()
                    .filter(|op| op.action == action && op.collection() == Task::NSID)
                    .count() as u64,
            ),
            _ => None,
        })
        .sum()
}

/// Replays frames from memory on every connect (whatever the cursor); after them the
/// stream stays open and silent.
pub struct Replay {
    pub frames: Arc<Vec<Vec<u8>>>,
}

#[async_trait]
impl Source for Replay {
    fn url(&self) -> &str {
        "memory://replay"
    }

    async fn connect(&self, _cursor: Option<i64>) -> Result<MessageStream, SourceError> {
        let frames = Arc::clone(&self.frames);
        let items =
            (0..frames.len()).map(move |i| Ok(SourceMessage::Frame(frames[i].clone().into())));
        Ok(Box::pin(
            futures_util::stream::iter(items).chain(futures_util::stream::pending()),
        ))
    }
}

/// The task records in the corpus, written with an early draft of `agent.comms.task`
/// (title, input, priority).
#[derive(Debug)]
pub struct Task;

/// An early-draft task record.
#[derive(Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRecord {
    pub title: String,
    pub input: TaskInput,
    pub priority: i64,
    pub created_at: String,
}

/// What an early-draft task works on.
#[derive(Debug, Deserialize, Serialize)]
pub struct TaskInput {
    pub uri: String,
    pub bytes: i64,
}

impl Collection for Task {
    const NSID: &'static str = "agent.comms.task";
    type Record = TaskRecord;
}

impl Validate for TaskRecord {
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}
