//! The public MST: interop vectors (tests/fixtures/interop/mst, CC0), the reference
//! implementation's known roots, diffs, the proof blocks of random commits (inverted on a
//! partial tree of exactly those blocks), and hostile input.

use std::collections::{BTreeMap, BTreeSet};

use murmur_sync::{
    Action, CarSlice, Cid, DAG_CBOR, Mst, MstError, PartialTree, RAW, SyncError, check_key,
    cid_for, common_prefix_len, key_height, write_car,
};
use serde_json::Value;

fn fixture(path: &str) -> String {
    let full = format!(
        "{}/tests/fixtures/interop/{path}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&full).unwrap()
}

/// The leaf value of the reference implementation's MST tests.
fn cid1() -> Cid {
    "bafyreie5cvv4h45feadgeuwhbcutmh6t2ceseocckahdoe6uat64zmz454"
        .parse()
        .unwrap()
}

fn car_of(root: Cid, blocks: &[(Cid, Vec<u8>)]) -> Vec<u8> {
    write_car(root, blocks.iter().map(|(c, b)| (*c, b.as_slice())))
}

/// A small deterministic PRNG (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn key(&mut self) -> String {
        const COLLECTIONS: [&str; 3] = ["app.bsky.feed.post", "agent.comms.task", "a.b"];
        const CHARS: &[u8] = b"234567abcdefghijklmnopqrstuvwxyz";
        let rkey: String = (0..1 + self.below(13))
            .map(|_| CHARS[self.below(CHARS.len())] as char)
            .collect();
        format!("{}/{rkey}", COLLECTIONS[self.below(3)])
    }
    fn value(&mut self) -> Cid {
        cid_for(RAW, &self.next().to_be_bytes())
    }
}

#[test]
fn interop_key_heights() {
    let vectors: Value = serde_json::from_str(&fixture("mst/key_heights.json")).unwrap();
    let vectors = vectors.as_array().unwrap();
    assert!(!vectors.is_empty());
    for v in vectors {
        let key = v["key"].as_str().unwrap();
        assert_eq!(
            u64::from(key_height(key.as_bytes())),
            v["height"].as_u64().unwrap(),
            "{key}"
        );
    }
}

#[test]
fn interop_common_prefix_lengths() {
    let vectors: Value = serde_json::from_str(&fixture("mst/common_prefix.json")).unwrap();
    let vectors = vectors.as_array().unwrap();
    assert!(vectors.len() >= 10);
    for v in vectors {
        let (left, right) = (v["left"].as_str().unwrap(), v["right"].as_str().unwrap());
        assert_eq!(
            common_prefix_len(left.as_bytes(), right.as_bytes()) as u64,
            v["len"].as_u64().unwrap(),
            "{left:?} {right:?}"
        );
    }
}

#[test]
fn interop_example_keys_build_one_tree_in_any_order() {
    let text = fixture("mst/example_keys.txt");
    let keys: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(keys.len(), 156);
    for key in &keys {
        // The digit after the first letter is the key's height.
        let digit = key.as_bytes()[1] - b'0';
        assert_eq!(key_height(key.as_bytes()), u32::from(digit), "{key}");
        assert_eq!(check_key(key.as_bytes()).unwrap(), *key);
    }
    let mst = Mst::from_entries(keys.iter().map(|k| (*k, cid1()))).unwrap();
    assert_eq!(mst.len(), keys.len());
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(mst.entries().map(|(k, _)| k).collect::<Vec<_>>(), sorted);
    // Insertion order does not matter.
    let reversed = Mst::from_entries(keys.iter().rev().map(|k| (*k, cid1()))).unwrap();
    assert_eq!(reversed.root(), mst.root());
    let mut rng = Rng(7);
    let mut shuffled = keys.clone();
    for i in (1..shuffled.len()).rev() {
        shuffled.swap(i, rng.below(i + 1));
    }
    let mut incremental = Mst::new();
    for k in &shuffled {
        incremental.insert(k, cid1()).unwrap();
    }
    assert_eq!(incremental.root(), mst.root());
    // Round trip through a CAR of its blocks; every node is in the CAR.
    let blocks = mst.blocks();
    assert_eq!(blocks.last().unwrap().0, mst.root());
    let car = car_of(mst.root(), &blocks);
    let slice = CarSlice::parse(&car).unwrap();
    assert_eq!(slice.len(), blocks.len());
    assert_eq!(Mst::load(&slice, mst.root()).unwrap(), mst);
    // Five layers above the leaves: the root holds the height-5 keys.
    let root_node = &blocks.last().unwrap().1;
    let tree = PartialTree::load(&slice, mst.root()).unwrap();
    assert!(tree.is_complete());
    assert_eq!(tree.root().unwrap(), mst.root());
    assert!(root_node.len() > 26 * 10);
}

#[test]
fn reference_known_roots() {
    let root = |keys: &[&str]| {
        Mst::from_entries(
            keys.iter()
                .map(|k| (format!("com.example.record/{k}"), cid1())),
        )
        .unwrap()
        .root()
        .to_string()
    };
    // From @atproto/repo tests/mst.test.ts ("MST Interop Known Maps" and edge cases).
    assert_eq!(
        root(&[]),
        "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
    );
    assert_eq!(
        root(&["3jqfcqzm3fo2j"]),
        "bafyreibj4lsc3aqnrvphp5xmrnfoorvru4wynt6lwidqbm2623a6tatzdu"
    );
    assert_eq!(
        root(&["3jqfcqzm3fx2j"]),
        "bafyreih7wfei65pxzhauoibu3ls7jgmkju4bspy4t2ha2qdjnzqvoy33ai"
    );
    let simple = [
        "3jqfcqzm3fp2j",
        "3jqfcqzm3fr2j",
        "3jqfcqzm3fs2j",
        "3jqfcqzm3ft2j",
        "3jqfcqzm4fc2j",
    ];
    assert_eq!(
        root(&simple),
        "bafyreicmahysq4n6wfuxo522m6dpiy7z7qzym3dzs756t5n7nfdgccwq7m"
    );
    // Trims the top of the tree on delete.
    let l1 = [
        "3jqfcqzm3fn2j",
        "3jqfcqzm3fo2j",
        "3jqfcqzm3fp2j",
        "3jqfcqzm3fs2j",
        "3jqfcqzm3ft2j",
        "3jqfcqzm3fu2j",
    ];
    assert_eq!(
        root(&l1),
        "bafyreifnqrwbk6ffmyaz5qtujqrzf5qmxf7cbxvgzktl4e3gabuxbtatv4"
    );
    let l0: Vec<&str> = l1
        .iter()
        .copied()
        .filter(|k| *k != "3jqfcqzm3fs2j")
        .collect();
    assert_eq!(
        root(&l0),
        "bafyreie4kjuxbwkhzg2i5dljaswcroeih4dgiqq6pazcmunwt2byd725vi"
    );
    // An insertion that splits two layers down.
    let mut split = vec![
        "3jqfcqzm3fo2j",
        "3jqfcqzm3fp2j",
        "3jqfcqzm3fr2j",
        "3jqfcqzm3fs2j",
        "3jqfcqzm3ft2j",
        "3jqfcqzm3fz2j",
        "3jqfcqzm4fc2j",
        "3jqfcqzm4fd2j",
        "3jqfcqzm4ff2j",
        "3jqfcqzm4fg2j",
        "3jqfcqzm4fh2j",
    ];
    assert_eq!(
        root(&split),
        "bafyreiettyludka6fpgp33stwxfuwhkzlur6chs4d2v4nkmq2j3ogpdjem"
    );
    split.push("3jqfcqzm3fx2j");
    assert_eq!(
        root(&split),
        "bafyreid2x5eqs4w4qxvc5jiwda4cien3gw2q6cshofxwnvv7iucrmfohpm"
    );
    // New layers two higher than the existing ones.
    assert_eq!(
        root(&["3jqfcqzm3ft2j", "3jqfcqzm3fz2j"]),
        "bafyreidfcktqnfmykz2ps3dbul35pepleq7kvv526g47xahuz3rqtptmky"
    );
    assert_eq!(
        root(&["3jqfcqzm3ft2j", "3jqfcqzm3fz2j", "3jqfcqzm3fx2j"]),
        "bafyreiavxaxdz7o7rbvr3zg2liox2yww46t7g6hkehx4i4h3lwudly7dhy"
    );
    assert_eq!(
        root(&[
            "3jqfcqzm3ft2j",
            "3jqfcqzm3fz2j",
            "3jqfcqzm3fx2j",
            "3jqfcqzm4fd2j"
        ]),
        "bafyreig4jv3vuajbsybhyvb7gggvpwh2zszwfyttjrj6qwvcsp24h6popu"
    );
    // The same trees reached by insert and remove, not only built at once.
    let mut mst = Mst::from_entries(
        split
            .iter()
            .map(|k| (format!("com.example.record/{k}"), cid1())),
    )
    .unwrap();
    assert_eq!(mst.remove("com.example.record/3jqfcqzm3fx2j"), Some(cid1()));
    assert_eq!(
        mst.root().to_string(),
        "bafyreiettyludka6fpgp33stwxfuwhkzlur6chs4d2v4nkmq2j3ogpdjem"
    );
}

/// Undoes `ops` (in commit order; `prev` is the value before the op) on the partial tree
/// loaded from a CAR of `blocks` at `root`, as a commit consumer does: the root before.
fn invert(
    root: Cid,
    blocks: &[(Cid, Vec<u8>)],
    ops: &[(String, Action, Option<Cid>, Option<Cid>)],
) -> Result<Cid, String> {
    let car = car_of(root, blocks);
    let slice = CarSlice::parse(&car).map_err(|e| e.to_string())?;
    let mut tree = PartialTree::load(&slice, root).map_err(|e| e.to_string())?;
    if tree.root().map_err(|e| e.to_string())? != root {
        return Err("the partial tree does not rebuild to its root".into());
    }
    for (key, action, prev, value) in ops.iter().rev() {
        let key = key.as_bytes();
        let now = tree.get(key).map_err(|e| e.to_string())?;
        if now != *value {
            return Err(format!("{action:?}: the tree has {now:?}, not {value:?}"));
        }
        match (action, prev) {
            (Action::Create, None) => tree.remove(key).map(drop),
            (Action::Update | Action::Delete, Some(prev)) => tree.set(key, *prev).map(drop),
            _ => panic!("bad op in the test"),
        }
        .map_err(|e| e.to_string())?;
    }
    tree.root().map_err(|e| e.to_string())
}

/// A random commit on `old`: up to `max_ops` creates, updates and deletes of distinct keys.
/// Returns the tree after it and its ops `(key, action, prev, value)` in commit order.
#[allow(clippy::type_complexity)]
fn random_commit(
    rng: &mut Rng,
    old: &Mst,
    max_ops: usize,
) -> (Mst, Vec<(String, Action, Option<Cid>, Option<Cid>)>) {
    let keys: Vec<String> = old.entries().map(|(k, _)| k.to_string()).collect();
    let mut new = old.clone();
    let mut ops = Vec::new();
    let mut touched = BTreeSet::new();
    for _ in 0..1 + rng.below(max_ops) {
        let pick = rng.below(3);
        if pick == 0 || keys.is_empty() {
            let key = rng.key();
            if old.get(&key).is_some() || !touched.insert(key.clone()) {
                continue;
            }
            let value = rng.value();
            new.insert(&key, value).unwrap();
            ops.push((key, Action::Create, None, Some(value)));
        } else {
            let key = keys[rng.below(keys.len())].clone();
            if !touched.insert(key.clone()) {
                continue;
            }
            let prev = old.get(&key);
            if pick == 1 {
                let value = rng.value();
                new.insert(&key, value).unwrap();
                ops.push((key, Action::Update, prev, Some(value)));
            } else {
                new.remove(&key);
                ops.push((key, Action::Delete, prev, None));
            }
        }
    }
    (new, ops)
}

#[test]
fn proof_blocks_of_random_commits_invert_to_the_old_root_and_none_is_spare() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut cases, mut blocks_total, mut tree_blocks_total, mut dropped) = (0, 0, 0, 0);
    let mut covering_total = 0;
    for case in 0..400 {
        let size = match case % 4 {
            0 => rng.below(8),
            1 => rng.below(60),
            _ => rng.below(400),
        };
        let mut old = Mst::new();
        for _ in 0..size {
            old.insert(rng.key(), rng.value()).unwrap();
        }
        let max_ops = if case % 3 == 0 { 1 } else { 12 };
        let (new, ops) = random_commit(&mut rng, &old, max_ops);
        if ops.is_empty() {
            continue;
        }
        cases += 1;
        let proof = new
            .proof_blocks(ops.iter().map(|(k, a, _, _)| (k.as_str(), *a)))
            .unwrap_or_else(|e| panic!("case {case}: {e}"));
        assert_eq!(proof[0].0, new.root(), "case {case}: the root comes first");
        let all: BTreeMap<Cid, Vec<u8>> = new.blocks().into_iter().collect();
        for (cid, bytes) in &proof {
            assert_eq!(
                all.get(cid),
                Some(bytes),
                "case {case}: not a node of the tree"
            );
        }
        // The reference-style covering proof holds every block needed.
        let covering = new
            .covering_proof_blocks(ops.iter().map(|o| o.0.as_str()))
            .unwrap();
        assert!(
            proof.iter().all(|b| covering.contains(b)),
            "case {case}: {ops:?}"
        );
        assert_eq!(
            invert(new.root(), &covering, &ops),
            Ok(old.root()),
            "case {case}"
        );
        blocks_total += proof.len();
        covering_total += covering.len();
        tree_blocks_total += all.len();
        assert_eq!(
            invert(new.root(), &proof, &ops),
            Ok(old.root()),
            "case {case}: {ops:?}"
        );
        // No block is spare: without any one of them the inversion fails or goes astray.
        for i in 0..proof.len() {
            let mut fewer = proof.clone();
            let (gone, _) = fewer.remove(i);
            let got = invert(new.root(), &fewer, &ops);
            assert_ne!(
                got,
                Ok(old.root()),
                "case {case}: {gone} is not needed; ops {ops:?}"
            );
            dropped += 1;
        }
        // The diff of the two trees is the commit.
        let diff = old.diff(&new);
        let mut created: Vec<_> = ops
            .iter()
            .filter(|o| o.1 == Action::Create)
            .map(|o| (o.0.clone(), o.3.unwrap()))
            .collect();
        created.sort();
        assert_eq!(diff.created, created, "case {case}");
        assert_eq!(
            diff.updated.len() + diff.deleted.len() + diff.created.len(),
            ops.iter()
                .filter(|o| o.1 != Action::Update || o.2 != o.3)
                .count()
        );
    }
    assert!(cases > 350, "{cases}");
    println!(
        "{cases} commits: {blocks_total} proof blocks ({covering_total} in covering proofs) of {tree_blocks_total} tree blocks, {dropped} drops checked"
    );
}

#[test]
fn proof_blocks_from_and_to_the_empty_tree() {
    let mut rng = Rng(42);
    let keys: Vec<String> = (0..40).map(|_| rng.key()).collect();
    let full = Mst::from_entries(keys.iter().map(|k| (k.as_str(), cid1()))).unwrap();
    // Everything created at once (the first commit of a repo).
    let ops: Vec<_> = full
        .entries()
        .map(|(k, v)| (k.to_string(), Action::Create, None, Some(v)))
        .collect();
    let proof = full
        .proof_blocks(ops.iter().map(|o| (o.0.as_str(), o.1)))
        .unwrap();
    assert_eq!(
        proof.len(),
        full.blocks().len(),
        "every node is on some path"
    );
    assert_eq!(invert(full.root(), &proof, &ops), Ok(Mst::new().root()));
    // Everything deleted at once.
    let empty = Mst::new();
    let ops: Vec<_> = full
        .entries()
        .map(|(k, v)| (k.to_string(), Action::Delete, Some(v), None))
        .collect();
    let proof = empty
        .proof_blocks(ops.iter().map(|o| (o.0.as_str(), o.1)))
        .unwrap();
    assert_eq!(proof, empty.blocks());
    assert_eq!(invert(empty.root(), &proof, &ops), Ok(full.root()));
    // No ops: the root alone.
    let proof = full.proof_blocks(Vec::<(&str, Action)>::new()).unwrap();
    assert_eq!(proof.len(), 1);
    assert_eq!(invert(full.root(), &proof, &[]), Ok(full.root()));
}

/// The atproto commit-proof vectors (tests/fixtures/interop/firehose): the proof blocks of
/// each commit are among the reference's `blocksInProof` and invert to `rootBeforeCommit`.
#[test]
fn commit_proof_vectors_reference_blocks_cover_ours() {
    let vectors: Value =
        serde_json::from_str(&fixture("firehose/commit-proof-fixtures.json")).unwrap();
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    for t in vectors.as_array().unwrap() {
        let comment = t["comment"].as_str().unwrap();
        let value: Cid = t["leafValue"].as_str().unwrap().parse().unwrap();
        let keys = strings(&t["keys"]);
        let (adds, dels) = (strings(&t["adds"]), strings(&t["dels"]));
        let old = Mst::from_entries(keys.iter().map(|k| (k.as_str(), value))).unwrap();
        assert_eq!(
            old.root().to_string(),
            t["rootBeforeCommit"].as_str().unwrap(),
            "{comment}"
        );
        let mut new = old.clone();
        let mut ops = Vec::new();
        for a in &adds {
            new.insert(a, value).unwrap();
            ops.push((a.clone(), Action::Create, None, Some(value)));
        }
        for d in &dels {
            new.remove(d);
            ops.push((d.clone(), Action::Delete, Some(value), None));
        }
        assert_eq!(
            new.root().to_string(),
            t["rootAfterCommit"].as_str().unwrap(),
            "{comment}"
        );
        let proof = new
            .proof_blocks(ops.iter().map(|o| (o.0.as_str(), o.1)))
            .unwrap();
        let reference: BTreeSet<String> = strings(&t["blocksInProof"]).into_iter().collect();
        let ours: BTreeSet<String> = proof.iter().map(|(c, _)| c.to_string()).collect();
        assert!(
            ours.is_subset(&reference),
            "{comment}: {ours:?} vs {reference:?}"
        );
        println!(
            "{comment}: {} of the reference's {} blocks",
            ours.len(),
            reference.len()
        );
        assert_eq!(
            invert(new.root(), &proof, &ops),
            Ok(old.root()),
            "{comment}"
        );
        // The reference's covering proof, computed here, is exactly the vector's set.
        let covering: BTreeSet<String> = new
            .covering_proof_blocks(ops.iter().map(|o| o.0.as_str()))
            .unwrap()
            .iter()
            .map(|(c, _)| c.to_string())
            .collect();
        assert_eq!(covering, reference, "{comment}");
        // The reference's own set inverts too.
        let all: BTreeMap<String, (Cid, Vec<u8>)> = new
            .blocks()
            .into_iter()
            .map(|(c, b)| (c.to_string(), (c, b)))
            .collect();
        let theirs: Vec<(Cid, Vec<u8>)> = reference.iter().map(|c| all[c].clone()).collect();
        assert_eq!(
            invert(new.root(), &theirs, &ops),
            Ok(old.root()),
            "{comment}"
        );
    }
}

#[test]
fn diff_matches_a_naive_comparison() {
    let mut rng = Rng(99);
    for _ in 0..50 {
        let mut a = Mst::new();
        let mut b = Mst::new();
        for _ in 0..rng.below(200) {
            let (k, v) = (rng.key(), rng.value());
            match rng.below(3) {
                0 => {
                    a.insert(&k, v).unwrap();
                }
                1 => {
                    b.insert(&k, v).unwrap();
                }
                _ => {
                    a.insert(&k, v).unwrap();
                    let v2 = if rng.below(2) == 0 { v } else { rng.value() };
                    b.insert(&k, v2).unwrap();
                }
            }
        }
        let diff = a.diff(&b);
        let expect_created: Vec<_> = b
            .entries()
            .filter(|(k, _)| a.get(k).is_none())
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let expect_deleted: Vec<_> = a
            .entries()
            .filter(|(k, _)| b.get(k).is_none())
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let expect_updated: Vec<_> = a
            .entries()
            .filter_map(|(k, v)| match b.get(k) {
                Some(v2) if v2 != v => Some((k.to_string(), v, v2)),
                _ => None,
            })
            .collect();
        assert_eq!(diff.created, expect_created);
        assert_eq!(diff.deleted, expect_deleted);
        assert_eq!(diff.updated, expect_updated);
        assert!(a.diff(&a).is_empty());
        // Applying the diff to the older tree gives the newer one.
        let mut c = a.clone();
        for (k, v) in &diff.created {
            c.insert(k, *v).unwrap();
        }
        for (k, _, v) in &diff.updated {
            c.insert(k, *v).unwrap();
        }
        for (k, _) in &diff.deleted {
            c.remove(k);
        }
        assert_eq!(c, b);
        assert_eq!(c.root(), b.root());
    }
}

#[test]
fn bad_keys_are_typed_errors() {
    let long = format!("a/{}", "b".repeat(1023));
    let ok_long = format!("a/{}", "b".repeat(1022));
    let non_utf8: &[u8] = b"app.x/\xff";
    let cases: Vec<(&[u8], &str)> = vec![
        (b"", "empty"),
        (b"nocollection", "exactly one '/'"),
        (b"a/b/c", "exactly one '/'"),
        (b"/rkey", "collection"),
        (b"coll/", "record key"),
        (b"app.x/with space", "character"),
        (b"app.x/\xc3\xa9", "character"),
        (non_utf8, "character"),
        (b"app.x/a#b", "character"),
        (long.as_bytes(), "1024"),
    ];
    let mut mst = Mst::new();
    for (key, reason) in cases {
        let err = check_key(key).unwrap_err();
        assert!(
            matches!(&err, MstError::InvalidKey { reason: r, .. } if r.contains(reason)),
            "{key:?}: {err}"
        );
        assert_eq!(mst.insert(key, cid1()), Err(err));
        assert!(Mst::from_entries([(key, cid1())]).is_err());
        let err = Mst::new()
            .proof_blocks([(key, Action::Delete)])
            .unwrap_err();
        assert!(matches!(err, MstError::InvalidKey { .. }), "{err}");
    }
    assert!(mst.is_empty());
    assert!(check_key(ok_long.as_bytes()).is_ok());
    assert!(check_key(b"app.bsky.feed.post/3k:a~b-c_d.e").is_ok());
    // Missing keys are simply absent; ops contradicting the tree are typed errors.
    assert_eq!(mst.get("not a key"), None);
    assert_eq!(mst.remove("not a key"), None);
    mst.insert("c.x/a", cid1()).unwrap();
    for (key, action) in [
        ("c.x/b", Action::Create),
        ("c.x/b", Action::Update),
        ("c.x/a", Action::Delete),
    ] {
        let err = mst.proof_blocks([(key, action)]).unwrap_err();
        assert!(matches!(err, MstError::OpMismatch { .. }), "{err}");
    }
    let err = mst
        .proof_blocks([("c.x/a", Action::Update), ("c.x/a", Action::Update)])
        .unwrap_err();
    assert!(matches!(err, MstError::OpMismatch { .. }), "{err}");
}

/// A tree of three layers, to cut pieces out of.
fn layered() -> Mst {
    let mut rng = Rng(5);
    let mut mst = Mst::new();
    while mst.blocks().len() < 12 {
        mst.insert(rng.key(), rng.value()).unwrap();
    }
    mst
}

#[test]
fn a_car_missing_a_node_names_it() {
    let mst = layered();
    let blocks = mst.blocks();
    // Without the root.
    let car = car_of(mst.root(), &blocks[..blocks.len() - 1]);
    let err = Mst::load(&CarSlice::parse(&car).unwrap(), mst.root()).unwrap_err();
    assert!(
        matches!(&err, SyncError::MissingBlock { cid, what: "MST root" } if *cid == mst.root().to_string()),
        "{err}"
    );
    // Without an inner node: the partial tree holds it as a stub, the whole tree names it.
    for i in 0..blocks.len() - 1 {
        let mut fewer = blocks.clone();
        let (gone, _) = fewer.remove(i);
        let car = car_of(mst.root(), &fewer);
        let slice = CarSlice::parse(&car).unwrap();
        match Mst::load(&slice, mst.root()) {
            Err(SyncError::MissingBlock { cid, what }) => {
                assert_eq!((cid, what), (gone.to_string(), "MST node"));
            }
            other => panic!("{other:?}"),
        }
        let partial = PartialTree::load(&slice, mst.root()).unwrap();
        assert!(!partial.is_complete());
        assert_eq!(partial.stubs().collect::<Vec<_>>(), [gone]);
        assert_eq!(partial.root(), Ok(mst.root()));
        // A key in the hidden subtree is reported with the stub that hides it.
        let hidden = mst
            .entries()
            .map(|(k, _)| k)
            .find(|k| partial.leaves().all(|(l, _)| l != k.as_bytes()))
            .unwrap();
        assert_eq!(
            partial.get(hidden.as_bytes()),
            Err(MstError::Hidden {
                key: hidden.to_string(),
                stub: gone
            })
        );
    }
}

/// The DAG-CBOR of an MST node, written independently of the crate.
fn node(left: Option<Cid>, entries: &[(&str, usize, Option<Cid>)]) -> (Cid, Vec<u8>) {
    use ipld_core::ipld::Ipld;
    let link = |c: Option<Cid>| c.map_or(Ipld::Null, Ipld::Link);
    let e: Vec<Ipld> = entries
        .iter()
        .map(|(k, p, t)| {
            Ipld::Map(
                [
                    (
                        "k".to_string(),
                        Ipld::Bytes(k.as_bytes().get(*p..).unwrap_or_default().to_vec()),
                    ),
                    ("p".to_string(), Ipld::Integer(*p as i128)),
                    ("t".to_string(), link(*t)),
                    ("v".to_string(), Ipld::Link(cid1())),
                ]
                .into(),
            )
        })
        .collect();
    let node = Ipld::Map(
        [
            ("e".to_string(), Ipld::List(e)),
            ("l".to_string(), link(left)),
        ]
        .into(),
    );
    let bytes = serde_ipld_dagcbor::to_vec(&node).unwrap();
    (cid_for(DAG_CBOR, &bytes), bytes)
}

/// Keys of height 0 (found by counting).
fn flat_keys(n: usize) -> Vec<String> {
    let mut keys: Vec<String> = (0..)
        .map(|i| format!("c.x/k{i:04}"))
        .filter(|k| key_height(k.as_bytes()) == 0)
        .take(n)
        .collect();
    keys.sort();
    keys
}

#[test]
fn malformed_nodes_are_typed_errors() {
    let keys = flat_keys(3);
    let load = |(cid, bytes): &(Cid, Vec<u8>)| {
        let car = car_of(*cid, &[(*cid, bytes.clone())]);
        Mst::load(&CarSlice::parse(&car).unwrap(), *cid)
    };
    // A well-formed node loads.
    let p = common_prefix_len(keys[0].as_bytes(), keys[1].as_bytes());
    let good = node(None, &[(&keys[0], 0, None), (&keys[1], p, None)]);
    assert_eq!(load(&good).unwrap().len(), 2);
    // The same keys, the prefix left uncompressed: the same entries under another CID.
    let loose = node(None, &[(&keys[0], 0, None), (&keys[1], 0, None)]);
    assert_ne!(loose.0, good.0);
    assert!(matches!(load(&loose), Err(SyncError::Mst { .. })));
    // Keys out of order.
    let swapped = node(None, &[(&keys[1], 0, None), (&keys[0], 0, None)]);
    let err = load(&swapped).unwrap_err();
    assert!(
        matches!(&err, SyncError::Mst { reason, .. } if reason.contains("increasing")),
        "{err}"
    );
    // A repeated key.
    let twice = node(None, &[(&keys[0], 0, None), (&keys[0], 0, None)]);
    assert!(matches!(load(&twice), Err(SyncError::Mst { .. })));
    // A prefix longer than the key before.
    let long_prefix = node(None, &[(&keys[0], 0, None), (&keys[1], 40, None)]);
    assert!(matches!(load(&long_prefix), Err(SyncError::Mst { .. })));
    // A key that is not a repo path.
    let bad = (0..)
        .map(|i| format!("nokey{i}"))
        .find(|k| key_height(k.as_bytes()) == 0)
        .unwrap();
    let bad_key = node(None, &[(&bad, 0, None)]);
    let err = load(&bad_key).unwrap_err();
    assert!(
        matches!(&err, SyncError::Mst { reason, .. } if reason.contains("invalid MST key")),
        "{err}"
    );
    // A layer-0 node with a subtree.
    let child = node(None, &[(&keys[2], 0, None)]);
    let parent = node(None, &[(&keys[0], 0, Some(child.0))]);
    let car = car_of(parent.0, &[parent.clone(), child]);
    let err = Mst::load(&CarSlice::parse(&car).unwrap(), parent.0).unwrap_err();
    assert!(matches!(err, SyncError::Mst { .. }), "{err}");
    // Well-formed nodes in a shape no MST has: an empty node below a key.
    let k1 = (0..)
        .map(|i| format!("c.x/h{i}"))
        .find(|k| key_height(k.as_bytes()) == 1)
        .unwrap();
    let empty = node(None, &[]);
    let parent = node(None, &[(&k1, 0, Some(empty.0))]);
    let car = car_of(parent.0, &[parent.clone(), empty]);
    let slice = CarSlice::parse(&car).unwrap();
    assert_eq!(
        PartialTree::load(&slice, parent.0)
            .unwrap()
            .leaves()
            .count(),
        1
    );
    let err = Mst::load(&slice, parent.0).unwrap_err();
    assert!(
        matches!(&err, SyncError::Mst { reason, .. } if reason.contains("not the MST of their keys")),
        "{err}"
    );
    // Not DAG-CBOR at all.
    let junk = b"\xa1\x61e\x01".to_vec();
    let junk = (cid_for(DAG_CBOR, &junk), junk);
    assert!(matches!(load(&junk), Err(SyncError::Mst { .. })));
    let raw = b"raw bytes".to_vec();
    let raw = (cid_for(RAW, &raw), raw);
    assert!(matches!(load(&raw), Err(SyncError::Mst { .. })));
}

#[test]
fn partial_tree_errors_are_typed() {
    let mut tree = PartialTree::new();
    assert_eq!(
        tree.remove(b"c.x/a"),
        Err(MstError::NotFound {
            key: "c.x/a".into()
        })
    );
    assert_eq!(tree.set(b"c.x/a", cid1()), Ok(None));
    assert_eq!(tree.set(b"c.x/a", cid1()), Ok(Some(cid1())));
    assert_eq!(tree.get(b"c.x/a"), Ok(Some(cid1())));
    assert_eq!(tree.remove(b"c.x/a"), Ok(cid1()));
    assert_eq!(tree.root(), Ok(Mst::new().root()));
    // A tree of two stubs side by side cannot be rebuilt: the error names one.
    let mst = layered();
    let blocks = mst.blocks();
    let car = car_of(mst.root(), &blocks[blocks.len() - 1..]);
    let mut partial = PartialTree::load(&CarSlice::parse(&car).unwrap(), mst.root()).unwrap();
    assert_eq!(partial.root(), Ok(mst.root()));
    let (first, _) = partial
        .leaves()
        .next()
        .map(|(k, v)| (k.to_vec(), v))
        .unwrap();
    partial.remove(&first).unwrap();
    match partial.root() {
        Err(MstError::NeedsNode { stub }) => assert!(partial.stubs().any(|s| s == stub)),
        other => panic!("{other:?}"),
    }
}
