//! Merkle Search Tree over a partial CAR slice: flatten the nodes present, apply ops in
//! reverse, and recompute the root (sync 1.1 inversion).
//!
//! The tree is kept as its in-order sequence of leaves and *stubs* (subtrees whose blocks are
//! not in the slice, known only by CID and layer). Because an MST's shape is a function of its
//! keys, any tree can be rebuilt from that sequence as long as no change has to look inside a
//! stub; when one would, the slice is not a sufficient proof and inversion fails.

use std::collections::HashSet;

use cid::Cid;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::SyncError;
use crate::car::{CarSlice, DAG_CBOR, cid_for};
use crate::cbor::{write_bytes, write_cid, write_head, write_null, write_text};

/// The MST layer of a key: leading zero bits of SHA-256(key), counted in pairs (fanout 4).
pub fn key_height(key: &[u8]) -> u32 {
    let digest = Sha256::digest(key);
    let mut zeros = 0;
    for byte in digest {
        zeros += byte.leading_zeros();
        if byte != 0 {
            break;
        }
    }
    zeros / 2
}

/// One element of a tree's in-order sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Item {
    Leaf {
        key: Vec<u8>,
        value: Cid,
        height: u32,
    },
    Stub {
        cid: Cid,
        layer: u32,
    },
}

#[derive(Deserialize)]
struct NodeData {
    l: Option<Cid>,
    e: Vec<EntryData>,
}

#[derive(Deserialize)]
struct EntryData {
    p: usize,
    #[serde(with = "serde_bytes")]
    k: Vec<u8>,
    v: Cid,
    t: Option<Cid>,
}

/// Where a key is in a sequence.
enum Position {
    Found(usize),
    /// Absent; inserting it goes at this index.
    Absent(usize),
    /// Absent from the loaded part, but a stub covers the gap where it would be.
    Unknown,
}

/// The in-order sequence of a (partial) tree.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct PartialTree {
    pub items: Vec<Item>,
}

fn mst_err(node: Cid, reason: impl Into<String>) -> SyncError {
    SyncError::Mst {
        node: node.to_string(),
        reason: reason.into(),
    }
}

impl PartialTree {
    /// Flattens the tree rooted at `root` from the blocks in `car`; absent subtrees become stubs.
    pub fn load(car: &CarSlice<'_>, root: Cid) -> Result<PartialTree, SyncError> {
        let mut items = Vec::new();
        let mut seen = HashSet::new();
        load_node(car, root, None, &mut items, &mut seen)?;
        // Keys must be strictly increasing across the whole sequence.
        let mut last: Option<&[u8]> = None;
        for item in &items {
            if let Item::Leaf { key, .. } = item {
                if last.is_some_and(|l| l >= key.as_slice()) {
                    return Err(mst_err(root, "keys are not in strictly increasing order"));
                }
                last = Some(key);
            }
        }
        Ok(PartialTree { items })
    }

    fn locate(&self, key: &[u8]) -> Position {
        let mut stub_since_leaf = false;
        for (i, item) in self.items.iter().enumerate() {
            match item {
                Item::Stub { .. } => stub_since_leaf = true,
                Item::Leaf { key: k, .. } => match k.as_slice().cmp(key) {
                    std::cmp::Ordering::Less => stub_since_leaf = false,
                    std::cmp::Ordering::Equal => return Position::Found(i),
                    std::cmp::Ordering::Greater => {
                        return if stub_since_leaf {
                            Position::Unknown
                        } else {
                            Position::Absent(i)
                        };
                    }
                },
            }
        }
        if stub_since_leaf {
            Position::Unknown
        } else {
            Position::Absent(self.items.len())
        }
    }

    /// The value stored under `key`: `Ok(None)` if provably absent, `Err(())` if a stub hides it.
    pub fn get(&self, key: &[u8]) -> Result<Option<Cid>, ()> {
        match self.locate(key) {
            Position::Found(i) => match &self.items[i] {
                Item::Leaf { value, .. } => Ok(Some(*value)),
                Item::Stub { .. } => Err(()),
            },
            Position::Absent(_) => Ok(None),
            Position::Unknown => Err(()),
        }
    }

    /// Sets `key` to `value` (insert or replace). `Err(())` if a stub hides where it goes.
    pub fn set(&mut self, key: &[u8], value: Cid) -> Result<(), ()> {
        match self.locate(key) {
            Position::Found(i) => {
                if let Item::Leaf { value: v, .. } = &mut self.items[i] {
                    *v = value;
                }
                Ok(())
            }
            Position::Absent(i) => {
                self.items.insert(
                    i,
                    Item::Leaf {
                        key: key.to_vec(),
                        value,
                        height: key_height(key),
                    },
                );
                Ok(())
            }
            Position::Unknown => Err(()),
        }
    }

    /// Removes `key`; `Err(())` if it is not present.
    pub fn remove(&mut self, key: &[u8]) -> Result<(), ()> {
        match self.locate(key) {
            Position::Found(i) => {
                self.items.remove(i);
                Ok(())
            }
            _ => Err(()),
        }
    }

    /// The root CID of the tree, rebuilt node by node. `Err(())` if building it needs the
    /// contents of a stub.
    pub fn root(&self) -> Result<Cid, ()> {
        let items = &self.items[..];
        let max_leaf = items
            .iter()
            .filter_map(|i| match i {
                Item::Leaf { height, .. } => Some(*height),
                Item::Stub { .. } => None,
            })
            .max();
        match max_leaf {
            None => match items {
                [] => Ok(encode_node(None, &[])),
                [Item::Stub { cid, .. }] => Ok(*cid),
                _ => Err(()),
            },
            Some(layer) => build_node(items, layer),
        }
    }
}

/// One decoded MST node, its keys expanded and checked.
struct Node {
    /// `None` only for the root of an empty tree (no entries, no subtree).
    layer: Option<u32>,
    left: Option<Cid>,
    /// (key, value, right subtree), keys strictly increasing.
    entries: Vec<(Vec<u8>, Cid, Option<Cid>)>,
}

/// Decodes the node `cid` (whose bytes the CAR slice hash-checked) and checks it on its own:
/// dag-cbor, prefixes, keys strictly increasing and all of one height, that height one below
/// the parent's (`expected_layer`), no subtrees under layer 0.
fn decode_node(cid: Cid, bytes: &[u8], expected_layer: Option<u32>) -> Result<Node, SyncError> {
    if cid.codec() != DAG_CBOR {
        return Err(mst_err(cid, "node is not dag-cbor"));
    }
    crate::cbor::item_end(bytes, 0, 8, "MST node")?;
    let node: NodeData =
        serde_ipld_dagcbor::from_slice(bytes).map_err(|e| mst_err(cid, e.to_string()))?;
    let mut entries: Vec<(Vec<u8>, Cid, Option<Cid>)> = Vec::with_capacity(node.e.len());
    for e in node.e {
        let prev = entries.last().map_or(&[][..], |(k, _, _)| k.as_slice());
        if e.p > prev.len() {
            return Err(mst_err(
                cid,
                "prefix length is longer than the previous key",
            ));
        }
        let mut key = prev[..e.p].to_vec();
        key.extend_from_slice(&e.k);
        if !entries.is_empty() && key.as_slice() <= prev {
            return Err(mst_err(cid, "keys are not in strictly increasing order"));
        }
        entries.push((key, e.v, e.t));
    }
    let layer = match entries.first() {
        Some((k, _, _)) => key_height(k),
        None => match expected_layer {
            Some(l) => l,
            None if node.l.is_none() => {
                return Ok(Node {
                    layer: None,
                    left: None,
                    entries,
                });
            }
            None => return Err(mst_err(cid, "root node has no entries")),
        },
    };
    if expected_layer.is_some_and(|l| l != layer) {
        return Err(mst_err(cid, "node is not one layer below its parent"));
    }
    if entries.iter().any(|(k, _, _)| key_height(k) != layer) {
        return Err(mst_err(cid, "keys of different heights in one node"));
    }
    if layer == 0 && (node.l.is_some() || entries.iter().any(|(_, _, t)| t.is_some())) {
        return Err(mst_err(cid, "layer-0 node has a subtree"));
    }
    Ok(Node {
        layer: Some(layer),
        left: node.l,
        entries,
    })
}

fn load_node(
    car: &CarSlice<'_>,
    cid: Cid,
    expected_layer: Option<u32>,
    out: &mut Vec<Item>,
    seen: &mut HashSet<Cid>,
) -> Result<(), SyncError> {
    if !seen.insert(cid) {
        return Err(mst_err(cid, "node is referenced twice"));
    }
    let bytes = car.get(&cid).ok_or_else(|| SyncError::MissingBlock {
        cid: cid.to_string(),
        what: "MST root",
    })?;
    let node = decode_node(cid, bytes, expected_layer)?;
    let Some(layer) = node.layer else {
        return Ok(());
    };
    // Below layer 0 there are no subtrees (checked by decode_node), so `layer - 1` is only
    // reached for layer >= 1.
    let child = |c: Option<Cid>, out: &mut Vec<Item>, seen: &mut HashSet<Cid>| match c {
        None => Ok(()),
        Some(c) if car.get(&c).is_some() => load_node(car, c, Some(layer - 1), out, seen),
        Some(c) => {
            out.push(Item::Stub {
                cid: c,
                layer: layer - 1,
            });
            Ok(())
        }
    };
    child(node.left, out, seen)?;
    for (key, value, right) in node.entries {
        out.push(Item::Leaf {
            key,
            value,
            height: layer,
        });
        child(right, out, seen)?;
    }
    Ok(())
}

/// The result of searching one key from an MST root: the nodes visited, root first, and the
/// value found (`None`: the key is absent, shown by the empty gap where it would be).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Search<'a> {
    /// The nodes visited with their bytes, root first.
    pub nodes: Vec<(Cid, &'a [u8])>,
    pub value: Option<Cid>,
}

/// Searches `key` from `root` through the blocks of `car`, as a record proof
/// (`com.atproto.sync.getRecord`) is built and read: from the root, into the subtree whose
/// key range holds `key`, until a node has `key` as an entry (present) or has no subtree
/// where `key` would be (absent). Every node on the way is checked as [`PartialTree::load`]
/// checks it, and its keys must lie between the parent's keys around it, so the answer is
/// the one the whole signed tree gives.
///
/// A node on the way that `car` lacks is [`SyncError::MissingBlock`] with its CID.
pub(crate) fn search<'a>(
    car: &CarSlice<'a>,
    root: Cid,
    key: &[u8],
) -> Result<Search<'a>, SyncError> {
    let mut nodes: Vec<(Cid, &'a [u8])> = Vec::new();
    let mut cid = root;
    let mut expected_layer = None;
    // Exclusive bounds on the keys of the current node, from the entries around the pointer
    // that led to it.
    let (mut lo, mut hi): (Option<Vec<u8>>, Option<Vec<u8>>) = (None, None);
    loop {
        let bytes = car.get(&cid).ok_or_else(|| SyncError::MissingBlock {
            cid: cid.to_string(),
            what: if nodes.is_empty() {
                "MST root"
            } else {
                "MST node"
            },
        })?;
        nodes.push((cid, bytes));
        let node = decode_node(cid, bytes, expected_layer)?;
        let Some(layer) = node.layer else {
            return Ok(Search { nodes, value: None });
        };
        if let (Some(lo), Some((first, _, _))) = (&lo, node.entries.first())
            && first <= lo
        {
            return Err(mst_err(
                cid,
                "keys are not above the parent's key before them",
            ));
        }
        if let (Some(hi), Some((last, _, _))) = (&hi, node.entries.last())
            && last >= hi
        {
            return Err(mst_err(
                cid,
                "keys are not below the parent's key after them",
            ));
        }
        let i = node.entries.partition_point(|(k, _, _)| k.as_slice() < key);
        if let Some((k, value, _)) = node.entries.get(i)
            && k.as_slice() == key
        {
            return Ok(Search {
                nodes,
                value: Some(*value),
            });
        }
        let next = match i.checked_sub(1) {
            None => node.left,
            Some(before) => node.entries[before].2,
        };
        let Some(next) = next else {
            return Ok(Search { nodes, value: None });
        };
        if let Some(before) = i.checked_sub(1) {
            lo = Some(node.entries[before].0.clone());
        }
        if let Some((after, _, _)) = node.entries.get(i) {
            hi = Some(after.clone());
        }
        // decode_node rejects subtrees under layer 0, so layer >= 1 here.
        expected_layer = Some(layer - 1);
        cid = next;
    }
}

/// Builds the node at `layer` holding `items` (whose leaves are all at most `layer` high).
fn build_node(items: &[Item], layer: u32) -> Result<Cid, ()> {
    let mut left = None;
    let mut entries: Vec<(&[u8], Cid, Option<Cid>)> = Vec::new();
    let mut gap_start = 0;
    for (i, item) in items.iter().enumerate() {
        if let Item::Leaf { key, value, height } = item {
            if *height > layer {
                return Err(());
            }
            if *height == layer {
                let sub = build_subtree(&items[gap_start..i], layer)?;
                match entries.last_mut() {
                    Some(last) => last.2 = sub,
                    None => left = sub,
                }
                entries.push((key, *value, None));
                gap_start = i + 1;
            }
        }
    }
    let sub = build_subtree(&items[gap_start..], layer)?;
    match entries.last_mut() {
        Some(last) => last.2 = sub,
        None => left = sub,
    }
    Ok(encode_node(left, &entries))
}

/// Builds the subtree for a gap between leaves of a node at `parent_layer`.
fn build_subtree(gap: &[Item], parent_layer: u32) -> Result<Option<Cid>, ()> {
    if gap.is_empty() {
        return Ok(None);
    }
    if parent_layer == 0 {
        return Err(());
    }
    let layer = parent_layer - 1;
    if let [Item::Stub { cid, layer: l }] = gap
        && *l == layer
    {
        return Ok(Some(*cid));
    }
    if gap
        .iter()
        .any(|i| matches!(i, Item::Stub { layer: l, .. } if *l >= layer))
    {
        return Err(());
    }
    build_node(gap, layer).map(Some)
}

fn encode_node(left: Option<Cid>, entries: &[(&[u8], Cid, Option<Cid>)]) -> Cid {
    cid_for(DAG_CBOR, &node_bytes(left, entries))
}

/// The DAG-CBOR bytes of a node (keys prefix-compressed in order).
fn node_bytes(left: Option<Cid>, entries: &[(&[u8], Cid, Option<Cid>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + entries.len() * 90);
    write_head(&mut out, 5, 2);
    write_text(&mut out, "e");
    write_head(&mut out, 4, entries.len() as u64);
    let mut prev: &[u8] = &[];
    for (key, value, right) in entries {
        let p = prev
            .iter()
            .zip(key.iter())
            .take_while(|(a, b)| a == b)
            .count();
        write_head(&mut out, 5, 4);
        write_text(&mut out, "k");
        write_bytes(&mut out, &key[p..]);
        write_text(&mut out, "p");
        write_head(&mut out, 0, p as u64);
        write_text(&mut out, "t");
        match right {
            Some(c) => write_cid(&mut out, c),
            None => write_null(&mut out),
        }
        write_text(&mut out, "v");
        write_cid(&mut out, value);
        prev = key;
    }
    write_text(&mut out, "l");
    match left {
        Some(c) => write_cid(&mut out, &c),
        None => write_null(&mut out),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(key: &str, n: u8) -> Item {
        Item::Leaf {
            key: key.as_bytes().to_vec(),
            value: cid_for(crate::car::RAW, &[n]),
            height: key_height(key.as_bytes()),
        }
    }

    #[test]
    fn empty_tree_root_is_the_spec_cid() {
        // The empty MST node {e: [], l: null}, as in the atproto reference implementation.
        let root = PartialTree { items: vec![] }.root().unwrap();
        assert_eq!(
            root.to_string(),
            "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
        );
    }

    #[test]
    fn insert_then_remove_restores_the_root() {
        let keys: Vec<String> = (0..300)
            .map(|i| format!("agent.comms.task/{i:06}"))
            .collect();
        let mut tree = PartialTree { items: vec![] };
        for (i, k) in keys.iter().enumerate() {
            tree.set(k.as_bytes(), cid_for(crate::car::RAW, &[i as u8]))
                .unwrap();
        }
        let full = tree.root().unwrap();
        let mut other = tree.clone();
        other
            .set(b"agent.comms.task/zzz", cid_for(crate::car::RAW, &[1]))
            .unwrap();
        assert_ne!(other.root().unwrap(), full);
        other.remove(b"agent.comms.task/zzz").unwrap();
        assert_eq!(other.root().unwrap(), full);
        // Order of insertion does not matter: the shape is a function of the keys.
        let mut rev = PartialTree { items: vec![] };
        for (i, k) in keys.iter().enumerate().rev() {
            rev.set(k.as_bytes(), cid_for(crate::car::RAW, &[i as u8]))
                .unwrap();
        }
        assert_eq!(rev.root().unwrap(), full);
    }

    #[test]
    fn a_stub_in_the_way_is_reported() {
        let mut tree = PartialTree {
            items: vec![
                leaf("a", 1),
                Item::Stub {
                    cid: cid_for(crate::car::RAW, &[9]),
                    layer: 0,
                },
                leaf("c", 2),
            ],
        };
        assert_eq!(tree.get(b"b"), Err(()));
        assert_eq!(tree.set(b"b", cid_for(crate::car::RAW, &[3])), Err(()));
        assert_eq!(
            tree.get(b"a").unwrap(),
            Some(cid_for(crate::car::RAW, &[1]))
        );
    }

    /// A key of MST height `height` (found by counting up).
    fn key_at(height: u32, prefix: &str) -> String {
        (0..)
            .map(|i| format!("{prefix}/{i:06}"))
            .find(|k| key_height(k.as_bytes()) == height)
            .unwrap()
    }

    fn node(left: Option<Cid>, entries: &[(&str, Option<Cid>)]) -> (Cid, Vec<u8>) {
        let value = cid_for(crate::car::RAW, b"record");
        let entries: Vec<(&[u8], Cid, Option<Cid>)> = entries
            .iter()
            .map(|(k, t)| (k.as_bytes(), value, *t))
            .collect();
        let bytes = node_bytes(left, &entries);
        (cid_for(DAG_CBOR, &bytes), bytes)
    }

    fn car_of(root: Cid, blocks: &[&(Cid, Vec<u8>)]) -> Vec<u8> {
        crate::car::write_car(root, blocks.iter().map(|(c, d)| (*c, d.as_slice())))
    }

    #[test]
    fn search_finds_present_and_absent_keys_and_names_a_missing_node() {
        // root (layer 1): [l -> a (layer 0): [a1, a2]] k1 [t -> b (layer 0): [b1]]
        let (a1, a2, b1) = (key_at(0, "c/a1"), key_at(0, "c/a2"), key_at(0, "c/d1"));
        let k1 = key_at(1, "c/b");
        let (mut a_keys, b_keys) = (vec![a1, a2], vec![b1]);
        a_keys.sort();
        assert!(a_keys[1] < k1 && k1 < b_keys[0]);
        let a = node(None, &[(&a_keys[0], None), (&a_keys[1], None)]);
        let b = node(None, &[(&b_keys[0], None)]);
        let root = node(Some(a.0), &[(&k1, Some(b.0))]);
        let bytes = car_of(root.0, &[&root, &a, &b]);
        let car = CarSlice::parse(&bytes).unwrap();
        let value = Some(cid_for(crate::car::RAW, b"record"));
        let found = search(&car, root.0, a_keys[1].as_bytes()).unwrap();
        assert_eq!(found.value, value);
        assert_eq!(
            found.nodes.iter().map(|n| n.0).collect::<Vec<_>>(),
            [root.0, a.0]
        );
        let found = search(&car, root.0, k1.as_bytes()).unwrap();
        assert_eq!((found.value, found.nodes.len()), (value, 1));
        // Absent: between a's two keys (a has no subtrees), and after k1 past b's key.
        let between = format!("{}0", a_keys[0]);
        assert!(between.as_str() < a_keys[1].as_str());
        let found = search(&car, root.0, between.as_bytes()).unwrap();
        assert_eq!((found.value, found.nodes.len()), (None, 2));
        let found = search(&car, root.0, b"c/z").unwrap();
        assert_eq!((found.value, found.nodes.len()), (None, 2));
        // Without b, a key that would be in b is hidden: b is named.
        let bytes = car_of(root.0, &[&root, &a]);
        let car = CarSlice::parse(&bytes).unwrap();
        assert!(search(&car, root.0, a_keys[0].as_bytes()).is_ok());
        match search(&car, root.0, b"c/z") {
            Err(SyncError::MissingBlock { cid, what }) => {
                assert_eq!((cid, what), (b.0.to_string(), "MST node"));
            }
            other => panic!("{other:?}"),
        }
        // The empty tree proves every key absent.
        let empty = node(None, &[]);
        let bytes = car_of(empty.0, &[&empty]);
        let car = CarSlice::parse(&bytes).unwrap();
        let found = search(&car, empty.0, b"c/a").unwrap();
        assert_eq!((found.value, found.nodes.len()), (None, 1));
    }

    #[test]
    fn search_rejects_a_subtree_out_of_its_parents_key_range() {
        // The root's two subtrees swapped: the left one holds a key after the root's key, the
        // right one a key before it. In such a malformed tree a search would "find" keys in the
        // wrong place; it rejects each subtree it enters, as loading the whole tree does.
        let k1 = key_at(1, "c/b");
        let late = key_at(0, "c/x");
        let early = key_at(0, "c/a");
        assert!(early < k1 && k1 < late);
        let child_l = node(None, &[(&late, None)]);
        let child_r = node(None, &[(&early, None)]);
        let root = node(Some(child_l.0), &[(&k1, Some(child_r.0))]);
        let bytes = car_of(root.0, &[&root, &child_l, &child_r]);
        let car = CarSlice::parse(&bytes).unwrap();
        for (key, child, reason) in [
            (
                &early,
                child_l.0,
                "keys are not below the parent's key after them",
            ),
            (
                &late,
                child_r.0,
                "keys are not above the parent's key before them",
            ),
        ] {
            match search(&car, root.0, key.as_bytes()) {
                Err(SyncError::Mst { node, reason: r }) => {
                    assert_eq!((node, r.as_str()), (child.to_string(), reason));
                }
                other => panic!("{other:?}"),
            }
        }
        let loaded = PartialTree::load(&car, root.0);
        assert!(matches!(loaded, Err(SyncError::Mst { .. })), "{loaded:?}");
        // Keys out of order inside one node.
        let (x, y) = (key_at(0, "c/a"), key_at(0, "c/b"));
        let bad = node(None, &[(&y, None), (&x, None)]);
        let bytes = car_of(bad.0, &[&bad]);
        let car = CarSlice::parse(&bytes).unwrap();
        let err = search(&car, bad.0, x.as_bytes()).unwrap_err();
        assert!(matches!(err, SyncError::Mst { .. }), "{err}");
    }
}
