//! The Merkle Search Tree (MST) of an atproto repo: a whole tree built from its entries
//! ([`Mst`]), the diff of two trees ([`MstDiff`]), the blocks a commit must carry to prove its
//! ops ([`Mst::proof_blocks`]), and a tree known only in part ([`PartialTree`]), as a CAR
//! slice carries it, on which a commit's ops are undone (sync 1.1 inversion).
//!
//! A partial tree is kept as its in-order sequence of leaves and *stubs* (subtrees whose
//! blocks are not in the slice, known only by CID and layer). Because an MST's shape is a
//! function of its keys, any tree can be rebuilt from that sequence as long as no change has
//! to look inside a stub; when one would, the slice is not a sufficient proof and the
//! operation fails with [`MstError::Hidden`] or [`MstError::NeedsNode`].

use std::collections::{BTreeMap, HashMap, HashSet};

use cid::Cid;
use sha2::{Digest, Sha256};

use crate::SyncError;
use crate::car::{CarSlice, DAG_CBOR, RAW, cid_for};
use crate::cbor::{write_bytes, write_cid, write_head, write_null, write_text};
use crate::frame::Action;

/// The MST layer of a key: leading zero bits of SHA-256(key), counted in pairs (fanout 4).
///
/// ```
/// use murmur_sync::key_height;
/// // Vectors from the atproto interop tests.
/// assert_eq!(key_height(b""), 0);
/// assert_eq!(key_height(b"blue"), 1);
/// assert_eq!(key_height(b"app.bsky.feed.post/9adeb165882c"), 8);
/// ```
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

/// The length of the longest common prefix of two keys, in bytes (how much of a key an MST
/// node leaves out, `p`, after the key before it).
///
/// ```
/// use murmur_sync::common_prefix_len;
/// assert_eq!(common_prefix_len(b"abcde", b"abc1"), 3);
/// assert_eq!(common_prefix_len(b"", b"abc"), 0);
/// ```
pub fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The longest MST key allowed, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// Checks that `key` is a valid MST key of an atproto repo, `collection/rkey`: non-empty, at
/// most [`MAX_KEY_LEN`] bytes, exactly one `/` with something on each side, and only the
/// characters `A-Z a-z 0-9 . - _ : ~` besides it. Returns the key as text.
///
/// ```
/// use murmur_sync::{MstError, check_key};
/// assert_eq!(check_key(b"app.bsky.feed.post/3jui7kd2z2y2e").unwrap(), "app.bsky.feed.post/3jui7kd2z2y2e");
/// assert!(matches!(check_key(b"no-slash"), Err(MstError::InvalidKey { .. })));
/// assert!(matches!(check_key(b"a/b/c"), Err(MstError::InvalidKey { .. })));
/// ```
pub fn check_key(key: &[u8]) -> Result<&str, MstError> {
    let bad = |reason: &'static str| MstError::InvalidKey {
        key: String::from_utf8_lossy(&key[..key.len().min(MAX_KEY_LEN + 16)]).into_owned(),
        reason,
    };
    if key.is_empty() {
        return Err(bad("the key is empty"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(bad("the key is longer than 1024 bytes"));
    }
    let mut slashes = 0;
    for &b in key {
        match b {
            b'/' => slashes += 1,
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b':' | b'~' => {}
            _ => {
                return Err(bad(
                    "the key has a character outside A-Z a-z 0-9 . - _ : ~ /",
                ));
            }
        }
    }
    if slashes != 1 {
        return Err(bad("the key does not have exactly one '/'"));
    }
    if key.first() == Some(&b'/') {
        return Err(bad("the collection before '/' is empty"));
    }
    if key.last() == Some(&b'/') {
        return Err(bad("the record key after '/' is empty"));
    }
    // Only ASCII is allowed above, so this cannot fail.
    std::str::from_utf8(key).map_err(|_| bad("the key is not UTF-8"))
}

/// What went wrong with an MST operation: a bad key, a key or subtree a partial tree does not
/// hold, or ops that do not match the tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MstError {
    /// The key is not a valid repo path ([`check_key`]).
    #[error("invalid MST key {key:?}: {reason}")]
    InvalidKey {
        /// The key (lossy UTF-8, cut after 1040 bytes).
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A partial tree cannot tell where `key` is: the subtree where it would be is a stub
    /// (a node whose block was not given).
    #[error("MST key {key:?} is hidden by the missing node {stub}")]
    Hidden {
        /// The key (lossy UTF-8).
        key: String,
        /// The CID of the node that would have to be loaded.
        stub: Cid,
    },
    /// The key to remove is not in the tree.
    #[error("MST key {key:?} is not in the tree")]
    NotFound {
        /// The key (lossy UTF-8).
        key: String,
    },
    /// Rebuilding the tree needs the contents of a node whose block was not given (the tree
    /// changed around it, so it must be split or merged).
    #[error("rebuilding the MST needs the missing node {stub}")]
    NeedsNode {
        /// The CID of the node that would have to be loaded.
        stub: Cid,
    },
    /// An op given to [`Mst::proof_blocks`] does not match the tree after the commit.
    #[error("op {action} {key:?} does not match the tree: {reason}")]
    OpMismatch {
        /// The op's key.
        key: String,
        /// `create`, `update` or `delete`.
        action: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
}

fn lossy(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

/// The origin of an item that no loaded node holds as it was loaded: a leaf inserted or set
/// to another value, or a child of a stub opened since.
const CHANGED: usize = usize::MAX;

/// Where one key is in a tree's key buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    start: usize,
    end: usize,
}

impl Span {
    /// The key's bytes in `keys`, the buffer it was written to.
    fn get(self, keys: &[u8]) -> &[u8] {
        &keys[self.start..self.end]
    }

    /// Writes `key` at the end of `keys`.
    fn push(keys: &mut Vec<u8>, key: &[u8]) -> Span {
        let start = keys.len();
        keys.extend_from_slice(key);
        Span {
            start,
            end: keys.len(),
        }
    }
}

/// One element of a tree's in-order sequence. A key is a [`Span`] of the tree's key buffer;
/// `origin` is the item's index in the sequence as it was loaded ([`CHANGED`] if it was not
/// loaded as it is now), which tells the builder which runs of items are loaded nodes
/// unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Item {
    Leaf {
        key: Span,
        value: Cid,
        /// The key's MST height, hashed once.
        height: u32,
        origin: usize,
    },
    Stub {
        cid: Cid,
        layer: u32,
        origin: usize,
    },
    /// A key known to have been in the tree, since removed: not part of the tree, but it still
    /// separates what is before it from what is after it (a stub on one side holds only keys
    /// on that side), so removing a key does not make its neighbours' places unknown.
    Bound {
        key: Span,
        height: u32,
    },
}

impl<T: Elem> Elem for &T {
    fn leaf<'k>(&'k self, keys: &'k [u8]) -> Option<(&'k [u8], Cid, u32)> {
        (*self).leaf(keys)
    }
    #[inline]
    fn height(&self) -> Option<u32> {
        (*self).height()
    }
    fn stub(&self) -> Option<(Cid, u32)> {
        (*self).stub()
    }
    fn origin(&self) -> usize {
        (*self).origin()
    }
}

/// What the node builder needs of a sequence element.
trait Elem {
    /// `(key, value, height)` of a leaf; `keys` is the key buffer of the tree it is in.
    fn leaf<'k>(&'k self, keys: &'k [u8]) -> Option<(&'k [u8], Cid, u32)>;
    /// The height of a leaf: what the builder looks at first, without copying its value.
    fn height(&self) -> Option<u32>;
    /// `(cid, layer)` of a stub.
    fn stub(&self) -> Option<(Cid, u32)>;
    /// Its index in the sequence as loaded, [`CHANGED`] if none.
    fn origin(&self) -> usize;
}

impl Elem for Item {
    fn leaf<'k>(&'k self, keys: &'k [u8]) -> Option<(&'k [u8], Cid, u32)> {
        match self {
            Item::Leaf {
                key, value, height, ..
            } => Some((key.get(keys), *value, *height)),
            Item::Stub { .. } | Item::Bound { .. } => None,
        }
    }
    #[inline]
    fn height(&self) -> Option<u32> {
        match self {
            Item::Leaf { height, .. } => Some(*height),
            Item::Stub { .. } | Item::Bound { .. } => None,
        }
    }
    fn stub(&self) -> Option<(Cid, u32)> {
        match self {
            Item::Stub { cid, layer, .. } => Some((*cid, *layer)),
            Item::Leaf { .. } | Item::Bound { .. } => None,
        }
    }
    fn origin(&self) -> usize {
        match self {
            Item::Leaf { origin, .. } | Item::Stub { origin, .. } => *origin,
            Item::Bound { .. } => CHANGED,
        }
    }
}

impl Elem for (&[u8], Cid, u32) {
    fn leaf<'k>(&'k self, _: &'k [u8]) -> Option<(&'k [u8], Cid, u32)> {
        Some(*self)
    }
    #[inline]
    fn height(&self) -> Option<u32> {
        Some(self.2)
    }
    fn stub(&self) -> Option<(Cid, u32)> {
        None
    }
    fn origin(&self) -> usize {
        CHANGED
    }
}

/// A node as it was loaded: the items `start..start + len` of the sequence, at `layer`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Loaded {
    cid: Cid,
    layer: u32,
    start: usize,
    len: usize,
}

/// Where a key is in a sequence.
#[cfg_attr(test, derive(Debug, PartialEq))]
enum Position {
    Found(usize),
    /// Absent, where a removed key was (an [`Item::Bound`]) at this index.
    Removed(usize),
    /// Absent; inserting it goes at this index.
    Absent(usize),
    /// Absent from the loaded part, but this stub covers the gap where it would be.
    Unknown(Cid),
}

/// A Merkle Search Tree known in part: its in-order sequence of leaves (key, value) and
/// *stubs* (subtrees whose blocks were not given, known by CID and layer).
///
/// This is what a commit's CAR slice proves: load it with [`PartialTree::load`] at the
/// commit's `data` root, undo the commit's ops ([`PartialTree::remove`] a created key,
/// [`PartialTree::set`] an updated or deleted key back to its `prev`), and [`PartialTree::root`]
/// gives the tree's root before the commit (sync 1.1 `prevData`). Keys are bytes here and are
/// not checked against the repo-path rules ([`check_key`]).
///
/// ```
/// use murmur_sync::{CarSlice, Cid, Mst, PartialTree, RAW, cid_for, write_car};
/// use murmur_sync::Action;
///
/// let value = cid_for(RAW, b"record");
/// let mut before = Mst::new();
/// for i in 0..50 {
///     before.insert(format!("app.example.post/{i:04}"), value).unwrap();
/// }
/// let mut after = before.clone();
/// after.insert("app.example.post/new", value).unwrap();
///
/// // The commit carries only the blocks needed to undo its op.
/// let ops = [("app.example.post/new", Action::Create)];
/// let proof = after.proof_blocks(ops).unwrap();
/// let car = write_car(after.root(), proof.iter().map(|(c, b)| (*c, b.as_slice())));
/// let slice = CarSlice::parse(&car).unwrap();
///
/// let mut tree = PartialTree::load(&slice, after.root()).unwrap();
/// assert_eq!(tree.root().unwrap(), after.root());
/// assert_eq!(tree.get(b"app.example.post/new").unwrap(), Some(value));
/// tree.remove(b"app.example.post/new").unwrap();
/// assert_eq!(tree.root().unwrap(), before.root());
/// ```
///
/// Rebuilding is cheap where nothing changed: a run of items that was a loaded node, still
/// unchanged and at the same layer, is that node again, and its CID is reused without
/// encoding or hashing it (the nodes are checked canonical when loaded, so this is exactly
/// what rebuilding it would give).
#[derive(Debug, Clone, Default)]
pub struct PartialTree {
    pub(crate) items: Vec<Item>,
    /// Every key of `items`, whole, back to back. The blocks hold keys prefix-compressed (a
    /// key is whole in them only at the start of a node), so the tree writes each key once
    /// here: one buffer per tree, none per key.
    keys: Vec<u8>,
    /// The nodes loaded, by `start` (a parent before its first child, which starts with it).
    loaded: Vec<Loaded>,
    /// Loaded, with every node in the one shape the MST of its keys has: until something
    /// changes, [`PartialTree::root`] is the root it was loaded from.
    canonical: bool,
}

impl PartialEq for PartialTree {
    /// The same sequence of leaves (key, value), stubs (CID, layer) and removed keys.
    fn eq(&self, other: &PartialTree) -> bool {
        self.items.len() == other.items.len()
            && self
                .items
                .iter()
                .zip(&other.items)
                .all(|(a, b)| match (a, b) {
                    (
                        Item::Leaf {
                            key: k1, value: v1, ..
                        },
                        Item::Leaf {
                            key: k2, value: v2, ..
                        },
                    ) => self.key(*k1) == other.key(*k2) && v1 == v2,
                    (
                        Item::Stub {
                            cid: c1, layer: l1, ..
                        },
                        Item::Stub {
                            cid: c2, layer: l2, ..
                        },
                    ) => c1 == c2 && l1 == l2,
                    (Item::Bound { key: k1, .. }, Item::Bound { key: k2, .. }) => {
                        self.key(*k1) == other.key(*k2)
                    }
                    _ => false,
                })
    }
}

impl Eq for PartialTree {}

fn mst_err(node: Cid, reason: impl Into<String>) -> SyncError {
    SyncError::Mst {
        node: node.to_string(),
        reason: reason.into(),
    }
}

impl PartialTree {
    /// The empty tree (no leaves, no stubs).
    ///
    /// ```
    /// use murmur_sync::PartialTree;
    /// let root = PartialTree::new().root().unwrap();
    /// assert_eq!(root.to_string(), "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm");
    /// ```
    pub fn new() -> PartialTree {
        PartialTree::default()
    }

    /// Flattens the tree rooted at `root` from the blocks in `car`; subtrees whose blocks are
    /// absent become stubs. Every node present is checked: its bytes are the canonical
    /// DAG-CBOR of an MST node (map `{e, l}`, entries `{k, p, t, v}`, shortest lengths, each
    /// prefix `p` the whole prefix shared with the key before, keys of at most
    /// [`MAX_KEY_LEN`] bytes), keys strictly increasing
    /// across the whole tree, all keys of a node of its height, each node one layer below its
    /// parent, no node referenced twice.
    ///
    /// Errors: [`SyncError::MissingBlock`] if the root itself is absent, [`SyncError::Mst`]
    /// for a malformed node.
    ///
    /// ```
    /// use murmur_sync::{CarSlice, Mst, PartialTree, RAW, cid_for, write_car};
    /// let mut mst = Mst::new();
    /// mst.insert("app.example.post/a", cid_for(RAW, b"a")).unwrap();
    /// let car = write_car(mst.root(), mst.blocks());
    /// let tree = PartialTree::load(&CarSlice::parse(&car).unwrap(), mst.root()).unwrap();
    /// assert!(tree.is_complete());
    /// assert_eq!(tree.root().unwrap(), mst.root());
    /// ```
    pub fn load(car: &CarSlice<'_>, root: Cid) -> Result<PartialTree, SyncError> {
        PartialTree::load_with(|c| car.get(c), root, Heights::All)
    }

    /// [`PartialTree::load`] for inverting a commit's ops ([`crate::commit`]): every check of
    /// [`PartialTree::load`] but one, the height of every key. Here one key per node is
    /// hashed, its first, which gives the node's layer (as the reference implementations
    /// infer it); the caller hashes the keys of the ops ([`PartialTree::check_height`]).
    /// See [`Heights::Layer`] for why that is enough to prove the ops.
    pub(crate) fn load_for_inversion(
        car: &CarSlice<'_>,
        root: Cid,
    ) -> Result<PartialTree, SyncError> {
        PartialTree::load_with(|c| car.get(c), root, Heights::Layer)
    }

    /// [`PartialTree::load`] from any block source.
    pub(crate) fn load_with<'a>(
        lookup: impl Fn(&Cid) -> Option<&'a [u8]>,
        root: Cid,
        heights: Heights,
    ) -> Result<PartialTree, SyncError> {
        let bytes = lookup(&root).ok_or_else(|| SyncError::MissingBlock {
            cid: root.to_string(),
            what: "MST root",
        })?;
        // Sized for a commit's slice (about ten nodes of a few entries each): a few
        // allocations per tree, not one per key or per node.
        let mut load = Load {
            tree: PartialTree {
                items: Vec::with_capacity(128),
                keys: Vec::with_capacity(1024),
                loaded: Vec::with_capacity(16),
                canonical: true,
            },
            entries: Vec::with_capacity(32),
            keyless: Vec::new(),
            last: None,
            root,
            heights,
        };
        load_node(&lookup, &mut load, root, bytes, None)?;
        let mut tree = load.tree;
        // Keys strictly increasing (checked while loading) leave only nodes without keys to
        // be referenced twice unnoticed: those are checked here (no MST has one, so this is
        // nearly always empty).
        let mut cids = load.keyless;
        cids.sort_unstable();
        if let Some(twice) = cids.windows(2).find(|w| w[0] == w[1]) {
            return Err(mst_err(twice[0], "node is referenced twice"));
        }
        if !tree.canonical {
            // Rebuilding it gives other nodes than those loaded: none can be reused.
            tree.loaded.clear();
        }
        Ok(tree)
    }

    /// True when the tree was loaded ([`PartialTree::load`]) from nodes all in the shape the
    /// MST of their keys has: [`PartialTree::root`] is then the root it was loaded from, until
    /// the tree changes, without having to compute it.
    pub(crate) fn loaded_canonical(&self) -> bool {
        self.canonical
    }

    fn key(&self, span: Span) -> &[u8] {
        span.get(&self.keys)
    }

    /// Checks that `key`, if the tree holds it (or held it: a removed key keeps its height),
    /// is at the height hashing it gives: the key of an op, in a tree loaded with
    /// [`PartialTree::load_for_inversion`], which hashes only one key per node.
    pub(crate) fn check_height(&self, key: &[u8]) -> Result<(), String> {
        let held = match self.locate(key) {
            Position::Found(i) | Position::Removed(i) => match self.items[i] {
                Item::Leaf { height, .. } | Item::Bound { height, .. } => Some(height),
                Item::Stub { .. } => None,
            },
            Position::Absent(_) | Position::Unknown(_) => None,
        };
        match held {
            Some(layer) if layer != key_height(key) => Err(format!(
                "{} is in a node of layer {layer}, but its height is {}",
                lossy(key),
                key_height(key)
            )),
            _ => Ok(()),
        }
    }

    /// True when no subtree is missing: the whole tree is known.
    pub fn is_complete(&self) -> bool {
        !self.items.iter().any(|i| matches!(i, Item::Stub { .. }))
    }

    /// The leaves known, `(key, value)` in key order.
    pub fn leaves(&self) -> impl Iterator<Item = (&[u8], Cid)> + '_ {
        self.items.iter().filter_map(|i| match i {
            Item::Leaf { key, value, .. } => Some((self.key(*key), *value)),
            Item::Stub { .. } | Item::Bound { .. } => None,
        })
    }

    /// The CIDs of the subtrees whose blocks were not given, in key order.
    pub fn stubs(&self) -> impl Iterator<Item = Cid> + '_ {
        self.items.iter().filter_map(|i| match i {
            Item::Stub { cid, .. } => Some(*cid),
            Item::Leaf { .. } | Item::Bound { .. } => None,
        })
    }

    /// Where `key` is, by binary search over the items (in key order: loading checks it,
    /// and changes keep it). A stub sorts as the keyed item to its left (before everything
    /// with none): between two keys there is at most one stub, since a loaded node holds
    /// keys, so this looks back one item or two per step.
    fn locate(&self, key: &[u8]) -> Position {
        let before = |mut i: usize| loop {
            match &self.items[i] {
                Item::Leaf { key: k, .. } | Item::Bound { key: k, .. } => {
                    return self.key(*k) < key;
                }
                Item::Stub { .. } if i == 0 => return true,
                Item::Stub { .. } => i -= 1,
            }
        };
        let (mut low, mut high) = (0, self.items.len());
        while low < high {
            let mid = low + (high - low) / 2;
            if before(mid) {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        // `low` is the first keyed item not before `key` (or the end).
        match self.items.get(low) {
            Some(Item::Leaf { key: k, .. }) if self.key(*k) == key => return Position::Found(low),
            Some(Item::Bound { key: k, .. }) if self.key(*k) == key => {
                return Position::Removed(low);
            }
            _ => {}
        }
        match low.checked_sub(1).map(|i| &self.items[i]) {
            // A stub after the last key before `key`: `key` would be in it.
            Some(Item::Stub { cid, .. }) => Position::Unknown(*cid),
            _ => Position::Absent(low),
        }
    }

    /// [`locate`](Self::locate) by walking every item: the reference the binary search is
    /// tested against.
    #[cfg(test)]
    fn locate_by_walking(&self, key: &[u8]) -> Position {
        let mut stub_since_leaf = None;
        for (i, item) in self.items.iter().enumerate() {
            let (k, removed) = match item {
                Item::Stub { cid, .. } => {
                    stub_since_leaf = Some(*cid);
                    continue;
                }
                Item::Leaf { key, .. } => (*key, false),
                Item::Bound { key, .. } => (*key, true),
            };
            match self.key(k).cmp(key) {
                std::cmp::Ordering::Less => stub_since_leaf = None,
                std::cmp::Ordering::Equal if removed => return Position::Removed(i),
                std::cmp::Ordering::Equal => return Position::Found(i),
                std::cmp::Ordering::Greater => {
                    return match stub_since_leaf {
                        Some(stub) => Position::Unknown(stub),
                        None => Position::Absent(i),
                    };
                }
            }
        }
        match stub_since_leaf {
            Some(stub) => Position::Unknown(stub),
            None => Position::Absent(self.items.len()),
        }
    }

    /// The value stored under `key`: `Ok(None)` if provably absent, [`MstError::Hidden`] if a
    /// stub covers the place where it would be.
    pub fn get(&self, key: &[u8]) -> Result<Option<Cid>, MstError> {
        match self.locate(key) {
            Position::Found(i) => Ok(self.items[i].leaf(&self.keys).map(|(_, v, _)| v)),
            Position::Absent(_) | Position::Removed(_) => Ok(None),
            Position::Unknown(stub) => Err(MstError::Hidden {
                key: lossy(key),
                stub,
            }),
        }
    }

    /// Sets `key` to `value` (insert or replace); returns the value it replaced.
    /// [`MstError::Hidden`] if a stub covers the place where it goes.
    pub fn set(&mut self, key: &[u8], value: Cid) -> Result<Option<Cid>, MstError> {
        match self.locate(key) {
            Position::Found(i) => {
                let mut old = None;
                if let Item::Leaf {
                    value: v, origin, ..
                } = &mut self.items[i]
                {
                    if *v != value {
                        *origin = CHANGED;
                    }
                    old = Some(std::mem::replace(v, value));
                }
                Ok(old)
            }
            Position::Absent(i) => {
                let leaf = Item::Leaf {
                    key: Span::push(&mut self.keys, key),
                    value,
                    height: key_height(key),
                    origin: CHANGED,
                };
                self.items.insert(i, leaf);
                Ok(None)
            }
            Position::Removed(i) => {
                if let Item::Bound { key, height } = self.items[i] {
                    self.items[i] = Item::Leaf {
                        key,
                        value,
                        height,
                        origin: CHANGED,
                    };
                }
                Ok(None)
            }
            Position::Unknown(stub) => Err(MstError::Hidden {
                key: lossy(key),
                stub,
            }),
        }
    }

    /// Removes `key` and returns its value: [`MstError::NotFound`] if it is provably absent,
    /// [`MstError::Hidden`] if a stub covers the place where it would be.
    pub fn remove(&mut self, key: &[u8]) -> Result<Cid, MstError> {
        match self.locate(key) {
            Position::Found(i) => match self.items[i] {
                Item::Leaf {
                    key, value, height, ..
                } => {
                    self.items[i] = Item::Bound { key, height };
                    Ok(value)
                }
                // locate only finds leaves.
                Item::Stub { .. } | Item::Bound { .. } => {
                    Err(MstError::NotFound { key: lossy(key) })
                }
            },
            Position::Absent(_) | Position::Removed(_) => {
                Err(MstError::NotFound { key: lossy(key) })
            }
            Position::Unknown(stub) => Err(MstError::Hidden {
                key: lossy(key),
                stub,
            }),
        }
    }

    /// The root CID of the tree, rebuilt node by node (loaded nodes that did not change are
    /// reused, not rebuilt). [`MstError::NeedsNode`] if building it needs the contents of a
    /// stub (one that must be split or merged with its neighbours).
    pub fn root(&self) -> Result<Cid, MstError> {
        let mut build = Build {
            keys: &self.keys,
            loaded: &self.loaded,
            blocks: None,
            scratch: Vec::new(),
        };
        let built = if self.items.iter().any(|i| matches!(i, Item::Bound { .. })) {
            build.root(&self.tree_items())
        } else {
            build.root(&self.items)
        };
        built.map_err(|stub| MstError::NeedsNode { stub })
    }

    /// The leaves and stubs, without the bounds of removed keys.
    fn tree_items(&self) -> Vec<&Item> {
        self.items
            .iter()
            .filter(|i| !matches!(i, Item::Bound { .. }))
            .collect()
    }

    /// Replaces the stub `stub` by the entries and child stubs of its node, decoded from
    /// `bytes` (which must hash to `stub`). Returns false if there is no such stub.
    fn expand(&mut self, stub: Cid, bytes: &[u8]) -> Result<bool, SyncError> {
        let Some(i) = self
            .items
            .iter()
            .position(|it| matches!(it, Item::Stub { cid, .. } if *cid == stub))
        else {
            return Ok(false);
        };
        let Item::Stub { layer, .. } = self.items[i] else {
            return Ok(false);
        };
        let mut entries = Vec::new();
        let node = decode_node(stub, bytes, Some(layer), &mut self.keys, &mut entries)?;
        // (Every key's height checked: stubs are opened to build proofs, not to invert.)
        let mut out = Vec::with_capacity(2 * entries.len() + 1);
        if let Some(layer) = node.layer {
            let child = |c: Option<Cid>, out: &mut Vec<Item>| {
                if let Some(cid) = c {
                    out.push(Item::Stub {
                        cid,
                        layer: layer - 1,
                        origin: CHANGED,
                    });
                }
            };
            child(node.left, &mut out);
            for e in entries {
                out.push(Item::Leaf {
                    key: e.key,
                    value: e.value,
                    height: layer,
                    origin: CHANGED,
                });
                child(e.right, &mut out);
            }
        }
        self.items.splice(i..=i, out);
        Ok(true)
    }
}

/// One decoded MST node: its layer (`None` only for the root of an empty tree), its left
/// subtree, and how many entries it appended to the caller's entry list.
struct Node {
    layer: Option<u32>,
    left: Option<Cid>,
    entries: usize,
}

/// One entry of a node: its key (whole, in the caller's key buffer), value and right subtree.
#[derive(Debug, Clone, Copy)]
struct Entry {
    key: Span,
    value: Cid,
    right: Option<Cid>,
}

/// Reads the one encoding an MST node has in canonical DAG-CBOR; anything else is an error
/// naming the node.
struct NodeReader<'b> {
    b: &'b [u8],
    pos: usize,
    cid: Cid,
}

impl<'b> NodeReader<'b> {
    #[cold]
    #[inline(never)]
    fn fail(&self, reason: &str) -> SyncError {
        mst_err(self.cid, format!("{reason} (at byte {})", self.pos))
    }

    /// Exactly the bytes `lit` (compared as an array: no call to memcmp).
    #[inline(always)]
    fn literal<const N: usize>(
        &mut self,
        lit: &[u8; N],
        reason: &'static str,
    ) -> Result<(), SyncError> {
        let at: Option<&[u8; N]> = self
            .b
            .get(self.pos..self.pos + N)
            .and_then(|s| s.try_into().ok());
        if at != Some(lit) {
            return Err(self.fail(reason));
        }
        self.pos += N;
        Ok(())
    }

    /// A head of major type `major` in its shortest form: its argument.
    #[inline(always)]
    fn head(&mut self, major: u8, reason: &'static str) -> Result<u64, SyncError> {
        let Some(&first) = self.b.get(self.pos) else {
            return Err(self.fail(reason));
        };
        if first >> 5 != major {
            return Err(self.fail(reason));
        }
        let (arg, len) = match first & 0x1f {
            info @ 0..=23 => (u64::from(info), 0),
            info @ 24..=27 => {
                let n = 1usize << (info - 24);
                let Some(bytes) = self.b.get(self.pos + 1..self.pos + 1 + n) else {
                    return Err(self.fail("the node ends inside an item head"));
                };
                let arg = bytes.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
                (arg, n)
            }
            _ => return Err(self.fail("indefinite or reserved length (not DAG-CBOR)")),
        };
        let shortest = match len {
            0 => true,
            1 => arg >= 24,
            2 => arg > 0xff,
            4 => arg > 0xffff,
            _ => arg > 0xffff_ffff,
        };
        if !shortest {
            return Err(self
                .fail("a length or integer is not in its shortest form (not canonical DAG-CBOR)"));
        }
        self.pos += 1 + len;
        Ok(arg)
    }

    #[inline(always)]
    fn byte_string(&mut self, reason: &'static str) -> Result<&'b [u8], SyncError> {
        let len = self.head(2, reason)?;
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| self.pos.checked_add(l))
            .filter(|&e| e <= self.b.len());
        let Some(end) = end else {
            return Err(self.fail("a byte string runs past the end of the node"));
        };
        let out = &self.b[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    #[inline(always)]
    fn link_or_null(&mut self) -> Result<Option<Cid>, SyncError> {
        if self.b.get(self.pos) == Some(&0xf6) {
            self.pos += 1;
            return Ok(None);
        }
        self.link().map(Some)
    }

    /// A CID link: tag 42 over a byte string holding 0x00 and the binary CID (read whole, so
    /// in its one encoding: the varints are checked minimal).
    #[inline(always)]
    fn link(&mut self) -> Result<Cid, SyncError> {
        // The links of a repo, whole: tag 42, a byte string of 37 bytes, 0x00, CIDv1, dag-cbor
        // or raw, sha2-256 of 32 bytes. Read in one piece; anything else goes the long way.
        if let Some(
            &[
                0xd8,
                42,
                0x58,
                37,
                0,
                1,
                codec @ (0x71 | 0x55),
                0x12,
                32,
                ref digest @ ..,
            ],
        ) = self
            .b
            .get(self.pos..self.pos + 41)
            .and_then(|s| <&[u8; 41]>::try_from(s).ok())
            && let Ok(hash) = multihash::Multihash::<64>::wrap(0x12, digest)
        {
            self.pos += 41;
            return Ok(Cid::new_v1(u64::from(codec), hash));
        }
        self.literal(&[0xd8, 42], "expected a CID link (tag 42) or null")?;
        let bytes = self.byte_string("a CID link is not a byte string")?;
        let Some((0, mut binary)) = bytes.split_first() else {
            return Err(self.fail("a CID link lacks its 0x00 prefix"));
        };
        // The CIDs of a repo (v1, dag-cbor or raw, sha2-256) are built directly; the general
        // reader below gives the same CID for these bytes, one varint byte at a time.
        if let [1, codec @ (0x71 | 0x55), 0x12, 32, digest @ ..] = binary
            && digest.len() == 32
            && let Ok(hash) = multihash::Multihash::<64>::wrap(0x12, digest)
        {
            return Ok(Cid::new_v1(u64::from(*codec), hash));
        }
        match Cid::read_bytes(&mut binary) {
            Ok(cid) if binary.is_empty() => Ok(cid),
            _ => Err(self.fail("a CID link is not a valid CID")),
        }
    }
}

const NOT_A_NODE: &str = "not an MST node: expected the map {e, l}";
const NOT_AN_ENTRY: &str = "not an MST entry: expected the map {k, p, t, v}";

/// Which keys of a node have their height hashed and checked when it is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Heights {
    /// Every key: the node is checked to be at the height of each of its keys, as the MST of
    /// its keys has it. For everything but commit inversion (whole trees, proofs, searches).
    All,
    /// The first key only: it gives the node's layer, which must be one below its parent's.
    /// For inverting a commit's ops ([`PartialTree::load_for_inversion`]), whose caller
    /// hashes the keys of the ops as well.
    ///
    /// Why this proves the ops all the same. What inversion shows is a fact about the two
    /// trees as maps from key to value: the tree at the signed `data` root, undone op by op,
    /// is the tree at `prevData`, so the two maps differ by exactly the ops. Heights do not
    /// enter that argument. Each loaded node is hash-checked, decoded canonically, its keys
    /// strictly increasing across the whole tree and each node one layer below its parent,
    /// so the loaded sequence is the signed tree's, whatever heights its keys hash to. Every
    /// loaded key is given its node's layer as its height, so rebuilding what did not change
    /// gives back the same nodes (the loaded node is reused by CID, or re-encoded to the same
    /// bytes), and subtrees not in the slice are stubs, opaque CIDs, the same in both trees.
    /// The nodes the undo changes are rebuilt from those heights and the hashed heights of
    /// the op keys; if the rebuilt root is `prevData`, then by collision resistance the tree
    /// at `prevData` is exactly that tree, whose map is the signed map with the ops undone.
    ///
    /// A key at a height its hash does not give would make a tree in a shape no MST of its
    /// keys has: a fault of the signer's tree, not a way to hide or forge an op. It is found
    /// where the shape is checked in full: [`Mst::load`] (every key of the whole repo, at
    /// backfill), [`PartialTree::load`], proofs and searches ([`Heights::All`]).
    Layer,
}

/// Decodes the node `cid` (whose bytes the CAR slice hash-checked) and checks it on its own:
/// canonical DAG-CBOR of a node (so encoding its contents again gives exactly `bytes`),
/// prefixes, keys strictly increasing and all of one height, that height one below the
/// parent's (`expected_layer`), no subtrees under layer 0. Keys are written whole to `keys`,
/// entries appended to `entries`.
fn decode_node(
    cid: Cid,
    bytes: &[u8],
    expected_layer: Option<u32>,
    keys: &mut Vec<u8>,
    entries: &mut Vec<Entry>,
) -> Result<Node, SyncError> {
    decode_node_with(cid, bytes, expected_layer, keys, entries, Heights::All)
}

/// [`decode_node`], with the heights of only the first key checked for [`Heights::Layer`]
/// (which the layer is taken from).
fn decode_node_with(
    cid: Cid,
    bytes: &[u8],
    expected_layer: Option<u32>,
    keys: &mut Vec<u8>,
    entries: &mut Vec<Entry>,
    heights: Heights,
) -> Result<Node, SyncError> {
    if cid.codec() != DAG_CBOR {
        return Err(mst_err(cid, "node is not dag-cbor"));
    }
    let first = entries.len();
    let mut r = NodeReader {
        b: bytes,
        pos: 0,
        cid,
    };
    r.literal(&[0xa2, 0x61, b'e'], NOT_A_NODE)?;
    let count = r.head(4, NOT_A_NODE)?;
    for _ in 0..count {
        r.literal(&[0xa4, 0x61, b'k'], NOT_AN_ENTRY)?;
        let suffix = r.byte_string(NOT_AN_ENTRY)?;
        r.literal(&[0x61, b'p'], NOT_AN_ENTRY)?;
        let p = r.head(0, NOT_AN_ENTRY)?;
        r.literal(&[0x61, b't'], NOT_AN_ENTRY)?;
        let right = r.link_or_null()?;
        r.literal(&[0x61, b'v'], NOT_AN_ENTRY)?;
        let value = r.link()?;
        let prev = entries[first..].last().map(|e| e.key);
        let prev_len = prev.map_or(0, |s| s.end - s.start);
        let p = match usize::try_from(p) {
            Ok(p) if p <= prev_len => p,
            _ => {
                return Err(mst_err(
                    cid,
                    "prefix length is longer than the previous key",
                ));
            }
        };
        if p + suffix.len() > MAX_KEY_LEN {
            // Each key may repeat all of the one before: unbounded, a node of many entries
            // would make keys of quadratic total size.
            return Err(mst_err(cid, "a key is longer than 1024 bytes"));
        }
        let start = keys.len();
        if let Some(prev) = prev {
            keys.extend_from_within(prev.start..prev.start + p);
        }
        keys.extend_from_slice(suffix);
        let key = Span {
            start,
            end: keys.len(),
        };
        if let Some(prev) = prev {
            let (key, prev) = (key.get(keys), prev.get(keys));
            if key <= prev {
                return Err(mst_err(cid, "keys are not in strictly increasing order"));
            }
            if prev.get(p).is_some() && prev.get(p) == suffix.first() {
                return Err(mst_err(
                    cid,
                    "prefix length is not the whole prefix shared with the previous key (not canonical)",
                ));
            }
        }
        entries.push(Entry { key, value, right });
    }
    r.literal(&[0x61, b'l'], NOT_A_NODE)?;
    let left = r.link_or_null()?;
    if r.pos != bytes.len() {
        return Err(r.fail("trailing bytes after the node"));
    }
    let mine = &entries[first..];
    let layer = match mine.first() {
        Some(e) => key_height(e.key.get(keys)),
        None => match expected_layer {
            Some(l) => l,
            None if left.is_none() => {
                return Ok(Node {
                    layer: None,
                    left: None,
                    entries: 0,
                });
            }
            None => return Err(mst_err(cid, "root node has no entries")),
        },
    };
    if expected_layer.is_some_and(|l| l != layer) {
        return Err(mst_err(cid, "node is not one layer below its parent"));
    }
    // Each key hashed once (the first above), its height kept by the caller as the layer.
    // For inversion, the first alone (see Heights::Layer).
    if heights == Heights::All
        && mine
            .iter()
            .skip(1)
            .any(|e| key_height(e.key.get(keys)) != layer)
    {
        return Err(mst_err(cid, "keys of different heights in one node"));
    }
    if layer == 0 && (left.is_some() || mine.iter().any(|e| e.right.is_some())) {
        return Err(mst_err(cid, "layer-0 node has a subtree"));
    }
    Ok(Node {
        layer: Some(layer),
        left,
        entries: mine.len(),
    })
}

/// A tree being loaded: the tree so far, the entries of the nodes being walked, the last
/// leaf's key (keys must increase across the whole tree).
struct Load {
    tree: PartialTree,
    entries: Vec<Entry>,
    /// The nodes loaded that hold no keys.
    keyless: Vec<Cid>,
    last: Option<Span>,
    root: Cid,
    heights: Heights,
}

fn load_node<'a>(
    lookup: &impl Fn(&Cid) -> Option<&'a [u8]>,
    load: &mut Load,
    cid: Cid,
    bytes: &[u8],
    expected_layer: Option<u32>,
) -> Result<(), SyncError> {
    let first = load.entries.len();
    let node = decode_node_with(
        cid,
        bytes,
        expected_layer,
        &mut load.tree.keys,
        &mut load.entries,
        load.heights,
    )?;
    let Some(layer) = node.layer else {
        return Ok(());
    };
    if node.entries == 0 {
        load.keyless.push(cid);
        if expected_layer.is_some() && node.left.is_none() {
            // An empty subtree: well-formed, but no MST has one (a gap without keys has no
            // subtree), so rebuilding the tree gives another root.
            load.tree.canonical = false;
        }
    }
    let slot = load.tree.loaded.len();
    let start = load.tree.items.len();
    load.tree.loaded.push(Loaded {
        cid,
        layer,
        start,
        len: 0,
    });
    load_child(lookup, load, cid, node.left, layer)?;
    for i in first..first + node.entries {
        let Entry { key, value, right } = load.entries[i];
        if let Some(last) = load.last
            && last.get(&load.tree.keys) >= key.get(&load.tree.keys)
        {
            return Err(mst_err(
                load.root,
                "keys are not in strictly increasing order",
            ));
        }
        load.last = Some(key);
        let origin = load.tree.items.len();
        load.tree.items.push(Item::Leaf {
            key,
            value,
            height: layer,
            origin,
        });
        load_child(lookup, load, cid, right, layer)?;
    }
    load.entries.truncate(first);
    load.tree.loaded[slot].len = load.tree.items.len() - start;
    Ok(())
}

/// Loads the subtree `child` of the node `parent` at `layer`, or notes it as a stub.
fn load_child<'a>(
    lookup: &impl Fn(&Cid) -> Option<&'a [u8]>,
    load: &mut Load,
    parent: Cid,
    child: Option<Cid>,
    layer: u32,
) -> Result<(), SyncError> {
    let Some(child) = child else {
        return Ok(());
    };
    // decode_node rejects subtrees under layer 0.
    let Some(layer) = layer.checked_sub(1) else {
        return Err(mst_err(parent, "layer-0 node has a subtree"));
    };
    match lookup(&child) {
        Some(bytes) => load_node(lookup, load, child, bytes, Some(layer)),
        None => {
            let origin = load.tree.items.len();
            load.tree.items.push(Item::Stub {
                cid: child,
                layer,
                origin,
            });
            Ok(())
        }
    }
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
    let (mut keys, mut entries) = (Vec::new(), Vec::new());
    // Exclusive bounds on the keys of the current node, from the entries around the pointer
    // that led to it.
    let (mut lo, mut hi): (Option<Span>, Option<Span>) = (None, None);
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
        entries.clear();
        let node = decode_node(cid, bytes, expected_layer, &mut keys, &mut entries)?;
        let Some(layer) = node.layer else {
            return Ok(Search { nodes, value: None });
        };
        if let (Some(lo), Some(first)) = (lo, entries.first())
            && first.key.get(&keys) <= lo.get(&keys)
        {
            return Err(mst_err(
                cid,
                "keys are not above the parent's key before them",
            ));
        }
        if let (Some(hi), Some(last)) = (hi, entries.last())
            && last.key.get(&keys) >= hi.get(&keys)
        {
            return Err(mst_err(
                cid,
                "keys are not below the parent's key after them",
            ));
        }
        let i = entries.partition_point(|e| e.key.get(&keys) < key);
        if let Some(e) = entries.get(i)
            && e.key.get(&keys) == key
        {
            return Ok(Search {
                nodes,
                value: Some(e.value),
            });
        }
        let next = match i.checked_sub(1) {
            None => node.left,
            Some(before) => entries[before].right,
        };
        let Some(next) = next else {
            return Ok(Search { nodes, value: None });
        };
        if let Some(before) = i.checked_sub(1) {
            lo = Some(entries[before].key);
        }
        if let Some(after) = entries.get(i) {
            hi = Some(after.key);
        }
        // decode_node rejects subtrees under layer 0.
        let Some(below) = layer.checked_sub(1) else {
            return Err(mst_err(cid, "layer-0 node has a subtree"));
        };
        expected_layer = Some(below);
        cid = next;
    }
}

/// Builds nodes from a sequence: `keys` is the key buffer of the items' tree, `loaded` the
/// nodes as loaded (a run of items that is one of them unchanged is that node again, its CID
/// reused), `blocks` collects each node built with its bytes (children first).
struct Build<'t> {
    keys: &'t [u8],
    loaded: &'t [Loaded],
    blocks: Option<&'t mut Vec<(Cid, Vec<u8>)>>,
    /// The bytes of the node being encoded: one buffer for every node built.
    scratch: Vec<u8>,
}

impl<'t> Build<'t> {
    /// The root of the tree over `items`; `Err(stub)` if that needs the contents of `stub`.
    fn root<T: Elem>(&mut self, items: &[T]) -> Result<Cid, Cid> {
        let max_leaf = items.iter().filter_map(Elem::height).max();
        match max_leaf {
            None => match items {
                [] => Ok(self.encode(None, &[])),
                [only] => only.stub().map(|s| s.0).ok_or(Cid::default()),
                [first, ..] => Err(first.stub().map_or(Cid::default(), |s| s.0)),
            },
            Some(layer) => match self.reuse(items, layer) {
                Some(cid) => Ok(cid),
                None => self.node(items, layer, &mut Vec::with_capacity(64)),
            },
        }
    }

    /// The CID of the loaded node that `items` are at `layer`, if they are all its items
    /// unchanged.
    fn reuse<T: Elem>(&self, items: &[T], layer: u32) -> Option<Cid> {
        let first = items.first()?.origin();
        if first == CHANGED {
            return None;
        }
        let at = self.loaded.partition_point(|n| n.start < first);
        let node = self.loaded[at..]
            .iter()
            .take_while(|n| n.start == first)
            .find(|n| n.layer == layer)?;
        let unchanged = node.len == items.len()
            && items
                .iter()
                .zip(first..)
                .all(|(item, origin)| item.origin() == origin);
        unchanged.then_some(node.cid)
    }

    /// Builds the node at `layer` holding `items` (whose leaves are all at most `layer` high).
    /// `Err(stub)`: a stub that would have to be opened. `entries` is the stack every node
    /// being built writes its entries to (one allocation for the whole tree): this node's go
    /// on top, above its parents', and are gone again when it returns.
    fn node<'i, T: Elem>(
        &mut self,
        items: &'i [T],
        layer: u32,
        entries: &mut Vec<(&'i [u8], Cid, Option<Cid>)>,
    ) -> Result<Cid, Cid>
    where
        't: 'i,
    {
        let keys = self.keys;
        let mine = entries.len();
        let mut left = None;
        let mut gap_start = 0;
        for (i, item) in items.iter().enumerate() {
            if item.height() == Some(layer)
                && let Some((key, value, _)) = item.leaf(keys)
            {
                // Leaves above `layer` cannot be here: the root is built at the highest leaf's
                // layer and each gap holds only the leaves below its bounding entries.
                let sub = self.subtree(&items[gap_start..i], layer, entries)?;
                match entries[mine..].last_mut() {
                    Some(last) => last.2 = sub,
                    None => left = sub,
                }
                entries.push((key, value, None));
                gap_start = i + 1;
            }
        }
        let sub = self.subtree(&items[gap_start..], layer, entries)?;
        match entries[mine..].last_mut() {
            Some(last) => last.2 = sub,
            None => left = sub,
        }
        let cid = self.encode(left, &entries[mine..]);
        entries.truncate(mine);
        Ok(cid)
    }

    /// Builds the subtree for a gap between leaves of a node at `parent_layer`.
    fn subtree<'i, T: Elem>(
        &mut self,
        gap: &'i [T],
        parent_layer: u32,
        entries: &mut Vec<(&'i [u8], Cid, Option<Cid>)>,
    ) -> Result<Option<Cid>, Cid>
    where
        't: 'i,
    {
        let Some(first) = gap.first() else {
            return Ok(None);
        };
        if parent_layer == 0 {
            // Only stubs can be below layer 0 (a leaf's height is at least 0).
            return Err(gap
                .iter()
                .find_map(|i| i.stub().map(|s| s.0))
                .unwrap_or_default());
        }
        let layer = parent_layer - 1;
        if gap.len() == 1
            && let Some((cid, l)) = first.stub()
            && l == layer
        {
            return Ok(Some(cid));
        }
        if let Some(cid) = self.reuse(gap, layer) {
            return Ok(Some(cid));
        }
        if let Some((cid, _)) = gap.iter().filter_map(Elem::stub).find(|(_, l)| *l >= layer) {
            return Err(cid);
        }
        self.node(gap, layer, entries).map(Some)
    }

    fn encode(&mut self, left: Option<Cid>, entries: &[(&[u8], Cid, Option<Cid>)]) -> Cid {
        self.scratch.clear();
        write_node(&mut self.scratch, left, entries);
        let cid = cid_for(DAG_CBOR, &self.scratch);
        if let Some(blocks) = &mut self.blocks {
            blocks.push((cid, self.scratch.clone()));
        }
        cid
    }
}

/// The DAG-CBOR bytes of a node (keys prefix-compressed in order).
#[cfg(test)]
fn node_bytes(left: Option<Cid>, entries: &[(&[u8], Cid, Option<Cid>)]) -> Vec<u8> {
    let mut out = Vec::new();
    write_node(&mut out, left, entries);
    out
}

/// Appends the DAG-CBOR bytes of a node to `out`.
fn write_node(out: &mut Vec<u8>, left: Option<Cid>, entries: &[(&[u8], Cid, Option<Cid>)]) {
    out.reserve(64 + entries.len() * 120);
    write_head(out, 5, 2);
    write_text(out, "e");
    write_head(out, 4, entries.len() as u64);
    let mut prev: &[u8] = &[];
    for (key, value, right) in entries {
        let p = common_prefix_len(prev, key);
        write_head(out, 5, 4);
        write_text(out, "k");
        write_bytes(out, &key[p..]);
        write_text(out, "p");
        write_head(out, 0, p as u64);
        write_text(out, "t");
        match right {
            Some(c) => write_cid(out, c),
            None => write_null(out),
        }
        write_text(out, "v");
        write_cid(out, value);
        prev = key;
    }
    write_text(out, "l");
    match left {
        Some(c) => write_cid(out, &c),
        None => write_null(out),
    }
}

/// A whole Merkle Search Tree: the (key, CID) entries of a repo, keys being repo paths
/// `collection/rkey` ([`check_key`]). Its shape, root and node blocks are a function of its
/// entries alone, whatever the order they were inserted in.
///
/// Nodes are computed when asked for: [`Mst::root`] and [`Mst::blocks`] hash every node (O(n));
/// everything else works on the sorted entries.
///
/// ```
/// use murmur_sync::{Mst, RAW, cid_for, write_car, CarSlice};
///
/// let record = cid_for(RAW, b"a record");
/// let mut mst = Mst::new();
/// assert_eq!(mst.insert("app.example.post/1", record).unwrap(), None);
/// assert_eq!(mst.insert("app.example.post/2", record).unwrap(), None);
/// assert!(mst.insert("not a path", record).is_err());
/// assert_eq!(mst.len(), 2);
///
/// // Write it out as a CAR and read it back.
/// let car = write_car(mst.root(), mst.blocks());
/// let loaded = Mst::load(&CarSlice::parse(&car).unwrap(), mst.root()).unwrap();
/// assert_eq!(loaded, mst);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mst {
    /// key -> (value, key height).
    entries: BTreeMap<String, (Cid, u32)>,
}

/// The difference between two trees ([`Mst::diff`]), each list in key order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MstDiff {
    /// Keys only in the newer tree, with their CID.
    pub created: Vec<(String, Cid)>,
    /// Keys in both trees whose CID changed: (key, older CID, newer CID).
    pub updated: Vec<(String, Cid, Cid)>,
    /// Keys only in the older tree, with their CID there.
    pub deleted: Vec<(String, Cid)>,
}

impl MstDiff {
    /// True when the two trees hold the same entries.
    pub fn is_empty(&self) -> bool {
        self.created.is_empty() && self.updated.is_empty() && self.deleted.is_empty()
    }
}

impl Mst {
    /// The empty tree.
    ///
    /// ```
    /// use murmur_sync::Mst;
    /// assert_eq!(Mst::new().root().to_string(), "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm");
    /// ```
    pub fn new() -> Mst {
        Mst::default()
    }

    /// The tree of `entries` (a later duplicate key replaces an earlier one).
    /// [`MstError::InvalidKey`] for the first key that is not a repo path.
    ///
    /// ```
    /// use murmur_sync::{Mst, RAW, cid_for};
    /// let v = cid_for(RAW, b"x");
    /// let mst = Mst::from_entries([("app.example.post/b", v), ("app.example.post/a", v)]).unwrap();
    /// let keys: Vec<&str> = mst.entries().map(|(k, _)| k).collect();
    /// assert_eq!(keys, ["app.example.post/a", "app.example.post/b"]);
    /// ```
    pub fn from_entries<K: AsRef<[u8]>>(
        entries: impl IntoIterator<Item = (K, Cid)>,
    ) -> Result<Mst, MstError> {
        let mut mst = Mst::new();
        for (key, value) in entries {
            mst.insert(key, value)?;
        }
        Ok(mst)
    }

    /// Sets `key` to `value`; returns the value it replaced. [`MstError::InvalidKey`] (and
    /// the tree unchanged) if the key is not a repo path.
    ///
    /// ```
    /// use murmur_sync::{Mst, RAW, cid_for};
    /// let (a, b) = (cid_for(RAW, b"a"), cid_for(RAW, b"b"));
    /// let mut mst = Mst::new();
    /// assert_eq!(mst.insert("app.example.post/x", a).unwrap(), None);
    /// assert_eq!(mst.insert("app.example.post/x", b).unwrap(), Some(a));
    /// ```
    pub fn insert(&mut self, key: impl AsRef<[u8]>, value: Cid) -> Result<Option<Cid>, MstError> {
        let key = check_key(key.as_ref())?;
        if let Some(entry) = self.entries.get_mut(key) {
            return Ok(Some(std::mem::replace(&mut entry.0, value)));
        }
        let height = key_height(key.as_bytes());
        self.entries.insert(key.to_string(), (value, height));
        Ok(None)
    }

    /// Removes `key`; returns its value, `None` if it was not there.
    ///
    /// ```
    /// use murmur_sync::{Mst, RAW, cid_for};
    /// let a = cid_for(RAW, b"a");
    /// let mut mst = Mst::from_entries([("app.example.post/x", a)]).unwrap();
    /// assert_eq!(mst.remove("app.example.post/x"), Some(a));
    /// assert_eq!(mst.remove("app.example.post/x"), None);
    /// assert_eq!(mst.root(), Mst::new().root());
    /// ```
    pub fn remove(&mut self, key: &str) -> Option<Cid> {
        self.entries.remove(key).map(|(v, _)| v)
    }

    /// The value of `key`, if present.
    ///
    /// ```
    /// use murmur_sync::{Mst, RAW, cid_for};
    /// let a = cid_for(RAW, b"a");
    /// let mst = Mst::from_entries([("app.example.post/x", a)]).unwrap();
    /// assert_eq!(mst.get("app.example.post/x"), Some(a));
    /// assert_eq!(mst.get("app.example.post/y"), None);
    /// ```
    pub fn get(&self, key: &str) -> Option<Cid> {
        self.entries.get(key).map(|(v, _)| *v)
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the tree has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries `(key, value)` in key order.
    pub fn entries(&self) -> impl ExactSizeIterator<Item = (&str, Cid)> + '_ {
        self.entries.iter().map(|(k, (v, _))| (k.as_str(), *v))
    }

    fn seq(&self) -> Vec<(&[u8], Cid, u32)> {
        self.entries
            .iter()
            .map(|(k, (v, h))| (k.as_bytes(), *v, *h))
            .collect()
    }

    /// The root CID (of the empty node `{e: [], l: null}` for the empty tree).
    pub fn root(&self) -> Cid {
        let mut build = Build {
            keys: &[],
            loaded: &[],
            blocks: None,
            scratch: Vec::new(),
        };
        // A sequence of leaves only never needs a stub opened.
        build.root(&self.seq()).unwrap_or_default()
    }

    /// Every node block of the tree, `(CID, DAG-CBOR bytes)`, children before their parent
    /// (the root is last). With the records' blocks, this is what a CAR of the repo's data
    /// holds ([`crate::write_car`]).
    ///
    /// ```
    /// use murmur_sync::{Mst, RAW, cid_for};
    /// let mst = Mst::from_entries((0..100).map(|i| (format!("app.example.post/{i}"), cid_for(RAW, b"r")))).unwrap();
    /// let blocks = mst.blocks();
    /// assert_eq!(blocks.last().unwrap().0, mst.root());
    /// assert!(blocks.len() > 1);
    /// ```
    pub fn blocks(&self) -> Vec<(Cid, Vec<u8>)> {
        let mut blocks = Vec::new();
        let mut build = Build {
            keys: &[],
            loaded: &[],
            blocks: Some(&mut blocks),
            scratch: Vec::new(),
        };
        let _ = build.root(&self.seq());
        blocks
    }

    /// Loads the complete tree rooted at `root` from the blocks of `car` (every node is
    /// checked as [`PartialTree::load`] checks it, and every key with [`check_key`]).
    ///
    /// Errors: [`SyncError::MissingBlock`] naming the first node `car` lacks (`MST root` or
    /// `MST node`), [`SyncError::Mst`] for a malformed node, an invalid key, or nodes shaped
    /// otherwise than the MST of their keys (rebuilding them gives another root).
    pub fn load(car: &CarSlice<'_>, root: Cid) -> Result<Mst, SyncError> {
        let tree = PartialTree::load(car, root)?;
        let mut entries = BTreeMap::new();
        for item in &tree.items {
            match item {
                Item::Bound { .. } => {}
                Item::Leaf {
                    key, value, height, ..
                } => {
                    let key = check_key(tree.key(*key))
                        .map_err(|e| mst_err(root, e.to_string()))?
                        .to_string();
                    entries.insert(key, (*value, *height));
                }
                Item::Stub { cid, .. } => {
                    return Err(SyncError::MissingBlock {
                        cid: cid.to_string(),
                        what: "MST node",
                    });
                }
            }
        }
        let mst = Mst { entries };
        if tree.loaded_canonical() {
            // Every node is the canonical node of its keys: rebuilding gives `root` again.
            return Ok(mst);
        }
        // The nodes are hash-checked, but their shape is one no MST has (an empty subtree
        // node): the same entries have another root.
        let rebuilt = mst.root();
        if rebuilt != root {
            return Err(mst_err(
                root,
                format!("the nodes are not the MST of their keys, which has root {rebuilt}"),
            ));
        }
        Ok(mst)
    }

    /// What changed from `self` to `newer`: one merge walk over both sorted entry lists
    /// (O(n + m), no hashing).
    ///
    /// ```
    /// use murmur_sync::{Mst, RAW, cid_for};
    /// let (a, b) = (cid_for(RAW, b"a"), cid_for(RAW, b"b"));
    /// let old = Mst::from_entries([("c.x/1", a), ("c.x/2", a)]).unwrap();
    /// let new = Mst::from_entries([("c.x/2", b), ("c.x/3", a)]).unwrap();
    /// let diff = old.diff(&new);
    /// assert_eq!(diff.created, [("c.x/3".to_string(), a)]);
    /// assert_eq!(diff.updated, [("c.x/2".to_string(), a, b)]);
    /// assert_eq!(diff.deleted, [("c.x/1".to_string(), a)]);
    /// ```
    pub fn diff(&self, newer: &Mst) -> MstDiff {
        let mut diff = MstDiff::default();
        let mut old = self.entries().peekable();
        let mut new = newer.entries().peekable();
        loop {
            match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(&(k, v)), None) => {
                    diff.deleted.push((k.to_string(), v));
                    old.next();
                }
                (None, Some(&(k, v))) => {
                    diff.created.push((k.to_string(), v));
                    new.next();
                }
                (Some(&(ko, vo)), Some(&(kn, vn))) => match ko.cmp(kn) {
                    std::cmp::Ordering::Less => {
                        diff.deleted.push((ko.to_string(), vo));
                        old.next();
                    }
                    std::cmp::Ordering::Greater => {
                        diff.created.push((kn.to_string(), vn));
                        new.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if vo != vn {
                            diff.updated.push((ko.to_string(), vo, vn));
                        }
                        old.next();
                        new.next();
                    }
                },
            }
        }
        diff
    }

    /// The node blocks a commit's CAR slice must carry to prove `ops` (sync 1.1), `self`
    /// being the tree after the commit: with exactly these blocks, [`PartialTree::load`] at
    /// [`Mst::root`] finds every op's key (or its absence), and undoing the ops (remove a
    /// created key, set an updated or deleted key back to its previous CID) rebuilds the
    /// root before the commit. The record blocks and the signed commit are not included.
    ///
    /// The blocks are the root, the nodes on each op key's search path, and the nodes that
    /// undoing the ops splits or merges (around a created key, the nodes on both sides that
    /// merge when it is removed); no other, so dropping any one of them makes this crate's
    /// inversion ([`PartialTree`], as [`crate::Verifier::verify_commit`] runs it) fail or
    /// reach another root. It can be fewer than the reference implementation's covering
    /// proof ([`Mst::covering_proof_blocks`]), never more: a commit for consumers that invert
    /// the reference's way should carry that one. The root comes first, then nodes in the
    /// order the proof needed them.
    ///
    /// Errors: [`MstError::InvalidKey`], or [`MstError::OpMismatch`] for an op the tree
    /// contradicts (a created or updated key absent, a deleted key present) or a key given
    /// twice. Cost: the whole tree is hashed once (as [`Mst::blocks`]).
    ///
    /// ```
    /// use murmur_sync::{Action, Mst, RAW, cid_for};
    /// let v = cid_for(RAW, b"r");
    /// let mut mst = Mst::from_entries((0..1000).map(|i| (format!("app.example.post/{i:05}"), v))).unwrap();
    /// mst.remove("app.example.post/00500");
    /// let proof = mst.proof_blocks([("app.example.post/00500", Action::Delete)]).unwrap();
    /// assert_eq!(proof[0].0, mst.root());
    /// assert!(proof.len() < mst.blocks().len() / 10);
    /// ```
    pub fn proof_blocks<K: AsRef<[u8]>>(
        &self,
        ops: impl IntoIterator<Item = (K, Action)>,
    ) -> Result<Vec<(Cid, Vec<u8>)>, MstError> {
        let mut checked: Vec<(String, Action)> = Vec::new();
        let mut keys = HashSet::new();
        for (key, action) in ops {
            let key = check_key(key.as_ref())?;
            let mismatch = |reason| MstError::OpMismatch {
                key: key.to_string(),
                action: action.as_str(),
                reason,
            };
            if !keys.insert(key.to_string()) {
                return Err(mismatch("the key has another op in the same commit"));
            }
            match (action, self.entries.contains_key(key)) {
                (Action::Create | Action::Update, false) => {
                    return Err(mismatch("the key is not in the tree after the commit"));
                }
                (Action::Delete, true) => {
                    return Err(mismatch("the key is still in the tree after the commit"));
                }
                _ => {}
            }
            checked.push((key.to_string(), action));
        }
        let (all, mut tree, mut opened) = self.opener()?;
        let mut open = |tree: &mut PartialTree, stub: Cid| open_stub(&all, tree, &mut opened, stub);
        // Any CID stands for the previous value: the shape depends on the keys only.
        let placeholder = cid_for(RAW, b"");
        for (key, action) in checked.iter().rev() {
            loop {
                let undone = match action {
                    Action::Create => tree.remove(key.as_bytes()).map(drop),
                    Action::Update | Action::Delete => {
                        tree.set(key.as_bytes(), placeholder).map(drop)
                    }
                };
                match undone {
                    Ok(()) => break,
                    Err(MstError::Hidden { stub, .. }) => open(&mut tree, stub)?,
                    Err(e) => return Err(e),
                }
            }
        }
        loop {
            let needed = tree.stubs_to_open(&all);
            if needed.is_empty() {
                match tree.root() {
                    Ok(_) => break,
                    // Not expected once no stub has to be opened; open it all the same.
                    Err(MstError::NeedsNode { stub }) => open(&mut tree, stub)?,
                    Err(e) => return Err(e),
                }
            }
            for stub in needed {
                open(&mut tree, stub)?;
            }
        }
        Ok(opened)
    }

    /// The reference implementation's covering proof of `keys` in this tree (what
    /// `@atproto/repo` puts in a commit's slice: `getCoveringProof` of each op's key): the
    /// root, the nodes on each key's search path, and those on the paths to the keys just
    /// before and after it. A superset of [`Mst::proof_blocks`] for the same keys (sometimes
    /// larger: the paths to the neighbours are taken whether or not undoing the ops needs
    /// them), for consumers whose inversion wants every neighbour loaded. The root comes
    /// first. [`MstError::InvalidKey`] for a key that is not a repo path.
    ///
    /// ```
    /// use murmur_sync::{Action, Mst, RAW, cid_for};
    /// let v = cid_for(RAW, b"r");
    /// let mst = Mst::from_entries((0..500).map(|i| (format!("app.example.post/{i:05}"), v))).unwrap();
    /// let key = "app.example.post/00250";
    /// let covering = mst.covering_proof_blocks([key]).unwrap();
    /// let needed = mst.proof_blocks([(key, Action::Create)]).unwrap();
    /// assert!(needed.iter().all(|b| covering.contains(b)));
    /// ```
    pub fn covering_proof_blocks<K: AsRef<[u8]>>(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Vec<(Cid, Vec<u8>)>, MstError> {
        use std::ops::Bound::{Excluded, Unbounded};
        let mut targets: Vec<String> = Vec::new();
        for key in keys {
            let key = check_key(key.as_ref())?;
            let before = self
                .entries
                .range::<str, _>((Unbounded, Excluded(key)))
                .next_back();
            let after = self
                .entries
                .range::<str, _>((Excluded(key), Unbounded))
                .next();
            targets.push(key.to_string());
            targets.extend(before.into_iter().chain(after).map(|(k, _)| k.clone()));
        }
        let (all, mut tree, mut opened) = self.opener()?;
        for key in targets {
            while let Err(e) = tree.get(key.as_bytes()) {
                match e {
                    MstError::Hidden { stub, .. } => {
                        open_stub(&all, &mut tree, &mut opened, stub)?;
                    }
                    e => return Err(e),
                }
            }
        }
        Ok(opened)
    }

    /// What the proofs start from: every node by CID, and the tree as its root opened.
    #[allow(clippy::type_complexity)]
    fn opener(
        &self,
    ) -> Result<(HashMap<Cid, Vec<u8>>, PartialTree, Vec<(Cid, Vec<u8>)>), MstError> {
        let all: HashMap<Cid, Vec<u8>> = self.blocks().into_iter().collect();
        let root = self.root();
        let top = self.entries.values().map(|(_, h)| *h).max().unwrap_or(0);
        let mut tree = PartialTree {
            items: vec![Item::Stub {
                cid: root,
                layer: top,
                origin: CHANGED,
            }],
            ..PartialTree::default()
        };
        let mut opened = Vec::new();
        // The root is always needed: the slice is loaded from it.
        open_stub(&all, &mut tree, &mut opened, root)?;
        Ok((all, tree, opened))
    }
}

/// Opens the stub `stub` of `tree` with its block from `all`, noting the block in `opened`.
fn open_stub(
    all: &HashMap<Cid, Vec<u8>>,
    tree: &mut PartialTree,
    opened: &mut Vec<(Cid, Vec<u8>)>,
    stub: Cid,
) -> Result<(), MstError> {
    let bytes = all.get(&stub).ok_or(MstError::NeedsNode { stub })?;
    // Our own nodes decode; a failure here would be a bug, reported, not a panic.
    match tree.expand(stub, bytes) {
        Ok(true) => {
            opened.push((stub, bytes.clone()));
            Ok(())
        }
        _ => Err(MstError::NeedsNode { stub }),
    }
}

impl PartialTree {
    /// The stubs that rebuilding the tree must open: those that cannot stay whole subtrees.
    ///
    /// A stub at layer `l` stays a subtree only if it is alone in its gap: each neighbour in
    /// the sequence is a leaf higher than `l` (or the end). A neighbour leaf at most `l` high,
    /// or a neighbour stub at most at layer `l`, shares the node with it, and opening other
    /// stubs can never change that (an opened stub at layer `m` <= `l` shows items at most
    /// `m` high at its ends); so each stub found here is needed. A stub that is the whole
    /// tree stays only if its node has entries (a root is never an entry-less node).
    fn stubs_to_open(&self, blocks: &HashMap<Cid, Vec<u8>>) -> Vec<Cid> {
        let low = |item: Option<&&Item>, l: u32| match item {
            None | Some(Item::Bound { .. }) => false,
            Some(Item::Leaf { height, .. }) => *height <= l,
            Some(Item::Stub { layer, .. }) => *layer <= l,
        };
        let items = self.tree_items();
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if let Item::Stub { cid, layer, .. } = item {
                let before = i.checked_sub(1).and_then(|j| items.get(j));
                let after = items.get(i + 1);
                let alone_without_entries = items.len() == 1
                    && blocks
                        .get(cid)
                        .and_then(|b| {
                            decode_node(*cid, b, Some(*layer), &mut Vec::new(), &mut Vec::new())
                                .ok()
                        })
                        .is_some_and(|n| n.entries == 0);
                if low(before, *layer) || low(after, *layer) || alone_without_entries {
                    out.push(*cid);
                }
            }
        }
        out
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// An item of a hand-made sequence: a leaf `(key, value n)` or a stub.
    enum Spec<'s> {
        Leaf(&'s str, u8),
        Stub(Cid, u32),
    }

    fn tree_of(spec: &[Spec<'_>]) -> PartialTree {
        let mut tree = PartialTree::new();
        for s in spec {
            let item = match s {
                Spec::Leaf(key, n) => Item::Leaf {
                    key: Span::push(&mut tree.keys, key.as_bytes()),
                    value: cid_for(crate::car::RAW, &[*n]),
                    height: key_height(key.as_bytes()),
                    origin: CHANGED,
                },
                Spec::Stub(cid, layer) => Item::Stub {
                    cid: *cid,
                    layer: *layer,
                    origin: CHANGED,
                },
            };
            tree.items.push(item);
        }
        tree
    }

    #[test]
    fn empty_tree_root_is_the_spec_cid() {
        // The empty MST node {e: [], l: null}, as in the atproto reference implementation.
        let root = PartialTree::new().root().unwrap();
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
        let mut tree = PartialTree::new();
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
        let mut rev = PartialTree::new();
        for (i, k) in keys.iter().enumerate().rev() {
            rev.set(k.as_bytes(), cid_for(crate::car::RAW, &[i as u8]))
                .unwrap();
        }
        assert_eq!(rev.root().unwrap(), full);
    }

    #[test]
    fn a_stub_in_the_way_is_reported() {
        let mut tree = tree_of(&[
            Spec::Leaf("a", 1),
            Spec::Stub(cid_for(crate::car::RAW, &[9]), 0),
            Spec::Leaf("c", 2),
        ]);
        let stub = cid_for(crate::car::RAW, &[9]);
        assert_eq!(
            tree.get(b"b"),
            Err(MstError::Hidden {
                key: "b".into(),
                stub
            })
        );
        assert!(matches!(
            tree.set(b"b", cid_for(crate::car::RAW, &[3])),
            Err(MstError::Hidden { .. })
        ));
        assert_eq!(
            tree.remove(b"0"),
            Err(MstError::NotFound { key: "0".into() })
        );
        assert_eq!(
            tree.get(b"a").unwrap(),
            Some(cid_for(crate::car::RAW, &[1]))
        );
    }

    #[test]
    fn binary_search_finds_what_walking_every_item_finds() {
        // Random sequences: keys with gaps, removed keys (bounds), stubs anywhere (leading,
        // trailing, several in a row); every key up to past the last is looked up both ways.
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        for trial in 0..300 {
            let mut keys = Vec::new();
            let mut spec_stubs = Vec::new();
            let mut n = 0u64;
            for i in 0..(rng.next() % 40) {
                while rng.next().is_multiple_of(3) {
                    spec_stubs.push((
                        keys.len(),
                        cid_for(crate::car::RAW, &[trial as u8, i as u8]),
                    ));
                }
                n += 1 + rng.next() % 3;
                keys.push(format!("k/{n:04}"));
            }
            let mut spec = Vec::new();
            let mut stubs = spec_stubs.iter().peekable();
            for (i, key) in keys.iter().enumerate() {
                while let Some((_, cid)) = stubs.next_if(|(at, _)| *at == i) {
                    spec.push(Spec::Stub(*cid, 0));
                }
                spec.push(Spec::Leaf(key, i as u8));
            }
            if rng.next().is_multiple_of(2) {
                spec.push(Spec::Stub(cid_for(crate::car::RAW, &[trial as u8, 255]), 0));
            }
            let mut tree = tree_of(&spec);
            for key in &keys {
                if rng.next().is_multiple_of(4) {
                    // A key hidden only behind a stub cannot be removed; the others can.
                    let _ = tree.remove(key.as_bytes());
                }
            }
            for probe in 0..=n + 2 {
                let key = format!("k/{probe:04}");
                assert_eq!(
                    tree.locate(key.as_bytes()),
                    tree.locate_by_walking(key.as_bytes()),
                    "trial {trial}, {key}"
                );
            }
            for probe in ["", "a", "k/", "z"] {
                assert_eq!(
                    tree.locate(probe.as_bytes()),
                    tree.locate_by_walking(probe.as_bytes()),
                    "trial {trial}, {probe:?}"
                );
            }
        }
    }

    #[test]
    fn a_removed_key_still_bounds_its_neighbours() {
        let stub = cid_for(crate::car::RAW, &[9]);
        let spec = [
            Spec::Stub(stub, 0),
            Spec::Leaf("c/b", 1),
            Spec::Leaf("c/d", 2),
        ];
        let mut tree = tree_of(&spec);
        // "c/c" is after "c/b", so not in the stub, before and after "c/b" is removed.
        assert_eq!(tree.get(b"c/c"), Ok(None));
        tree.remove(b"c/b").unwrap();
        assert_eq!(tree.get(b"c/c"), Ok(None));
        assert_eq!(tree.get(b"c/b"), Ok(None));
        assert!(matches!(tree.get(b"c/a"), Err(MstError::Hidden { .. })));
        assert!(tree.leaves().all(|(k, _)| k != b"c/b"));
        // Setting it again restores the same tree.
        tree.set(b"c/b", cid_for(crate::car::RAW, &[1])).unwrap();
        assert_eq!(tree, tree_of(&spec));
        assert!(matches!(tree.items[1], Item::Leaf { height, .. } if height == key_height(b"c/b")));
        assert_eq!(
            tree.remove(b"c/x"),
            Err(MstError::NotFound { key: "c/x".into() })
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
    fn an_empty_node_referenced_twice_is_refused() {
        // root (layer 1): [l -> x] k1 [t -> x], x an empty node: no key shows it twice.
        let x = node(None, &[]);
        let k1 = key_at(1, "c/b");
        let root = node(Some(x.0), &[(&k1, Some(x.0))]);
        let car = car_of(root.0, &[&root, &x]);
        let slice = CarSlice::parse(&car).unwrap();
        for heights in [Heights::All, Heights::Layer] {
            let err = PartialTree::load_with(|c| slice.get(c), root.0, heights).unwrap_err();
            assert!(err.to_string().contains("referenced twice"), "{err}");
        }
        // Once is well-formed (though no MST has an empty subtree).
        let once = node(Some(x.0), &[(&k1, None)]);
        let car = car_of(once.0, &[&once, &x]);
        let slice = CarSlice::parse(&car).unwrap();
        assert!(PartialTree::load(&slice, once.0).is_ok());
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

    /// A small deterministic PRNG (xorshift64*).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        /// Keys sharing long prefixes (one collection, record keys on a few stems), so that
        /// nodes compress most of each key away.
        fn key(&mut self) -> String {
            const STEMS: [&str; 3] = ["3kaaaaaaa", "3kaaaab", "3l"];
            let stem = STEMS[(self.next() % 3) as usize];
            format!("app.bsky.feed.like/{stem}{:x}", self.next() % 100_000)
        }
        fn value(&mut self) -> Cid {
            cid_for(crate::car::RAW, &self.next().to_be_bytes())
        }
    }

    fn car_of_blocks(root: Cid, blocks: &[(Cid, Vec<u8>)]) -> Vec<u8> {
        crate::car::write_car(root, blocks.iter().map(|(c, d)| (*c, d.as_slice())))
    }

    /// The root of `tree` rebuilt with the nodes built collected, and rebuilt from scratch
    /// (no loaded node reused).
    fn rebuild(tree: &PartialTree) -> (Cid, Vec<Cid>, Cid) {
        let mut built = Vec::new();
        let items = tree.tree_items();
        let mut build = Build {
            keys: &tree.keys,
            loaded: &tree.loaded,
            blocks: Some(&mut built),
            scratch: Vec::new(),
        };
        let root = build.root(&items).unwrap();
        let mut scratch = Build {
            keys: &tree.keys,
            loaded: &[],
            blocks: None,
            scratch: Vec::new(),
        };
        let from_scratch = scratch.root(&items).unwrap();
        (
            root,
            built.into_iter().map(|(c, _)| c).collect(),
            from_scratch,
        )
    }

    #[test]
    fn inversion_loads_hash_one_key_per_node_and_the_op_keys_are_checked() {
        // A layer-0 node whose second key is of height 1: a shape no MST has.
        let low = key_at(0, "c.x/a");
        let high = key_at(1, "c.x/b");
        let forged = node(None, &[(&low, None), (&high, None)]);
        let bytes = car_of(forged.0, &[&forged]);
        let car = CarSlice::parse(&bytes).unwrap();
        let err = PartialTree::load(&car, forged.0).unwrap_err();
        assert!(
            matches!(&err, SyncError::Mst { reason, .. } if reason.contains("different heights")),
            "{err}"
        );
        let tree = PartialTree::load_for_inversion(&car, forged.0).unwrap();
        assert_eq!(tree.leaves().count(), 2);
        assert_eq!(tree.root().unwrap(), forged.0);
        // The keys an op names are hashed: the second key is found out.
        assert_eq!(tree.check_height(low.as_bytes()), Ok(()));
        let err = tree.check_height(high.as_bytes()).unwrap_err();
        assert!(err.contains("its height is 1"), "{err}");
        // Removed, it keeps the height it had; a key not in the tree has none to check.
        let mut tree = tree;
        tree.remove(high.as_bytes()).unwrap();
        assert!(tree.check_height(high.as_bytes()).is_err());
        assert_eq!(tree.check_height(b"c.x/c/000000"), Ok(()));
        // The whole-tree load finds it too.
        assert!(Mst::load(&car, forged.0).is_err());
    }

    #[test]
    fn decoded_nodes_encode_back_to_their_bytes_with_keys_whole_and_heights_hashed_once() {
        let mut rng = Rng(11);
        let mut mst = Mst::new();
        for _ in 0..600 {
            mst.insert(rng.key(), rng.value()).unwrap();
        }
        let blocks = mst.blocks();
        for (cid, bytes) in &blocks {
            let (mut keys, mut entries) = (Vec::new(), Vec::new());
            // A node without entries has its parent's layer less one: any will do here.
            let entryless = bytes.starts_with(&[0xa2, 0x61, b'e', 0x80]);
            let expected = entryless.then_some(7);
            let node = decode_node(*cid, bytes, expected, &mut keys, &mut entries).unwrap();
            let whole: Vec<(&[u8], Cid, Option<Cid>)> = entries
                .iter()
                .map(|e| (e.key.get(&keys), e.value, e.right))
                .collect();
            assert_eq!(node_bytes(node.left, &whole), *bytes, "{cid}");
            for e in &entries {
                assert_eq!(Some(key_height(e.key.get(&keys))), node.layer);
            }
        }
        let car = car_of_blocks(mst.root(), &blocks);
        let tree = PartialTree::load(&CarSlice::parse(&car).unwrap(), mst.root()).unwrap();
        assert!(tree.loaded_canonical());
        assert_eq!(tree.loaded.len(), blocks.len());
        let leaves: Vec<(&[u8], Cid)> = tree.leaves().collect();
        let expected: Vec<(&[u8], Cid)> = mst.entries().map(|(k, v)| (k.as_bytes(), v)).collect();
        assert_eq!(leaves, expected);
        // Each key is in the buffer once, whole, and its height is the one hashing gives.
        assert_eq!(
            tree.keys.len(),
            mst.entries().map(|(k, _)| k.len()).sum::<usize>()
        );
        for item in &tree.items {
            if let Item::Leaf { key, height, .. } = item {
                assert_eq!(*height, key_height(tree.key(*key)));
            }
        }
        // Loaded unchanged, the tree is its root without building anything.
        assert_eq!(rebuild(&tree), (mst.root(), vec![], mst.root()));
    }

    #[test]
    fn untouched_nodes_keep_their_cids_and_only_changed_ones_are_built() {
        let mut rng = Rng(23);
        for case in 0..60 {
            let mut old = Mst::new();
            for _ in 0..(50 + 40 * case) {
                old.insert(rng.key(), rng.value()).unwrap();
            }
            let keys: Vec<String> = old.entries().map(|(k, _)| k.to_string()).collect();
            let mut new = old.clone();
            // A create, an update and a delete, or one of them.
            let created = rng.key();
            let updated = keys[(rng.next() % keys.len() as u64) as usize].clone();
            let deleted = keys[(rng.next() % keys.len() as u64) as usize].clone();
            let mut ops = Vec::new();
            if old.get(&created).is_none() && (case % 3 != 1) {
                new.insert(&created, rng.value()).unwrap();
                ops.push((created, Action::Create));
            }
            if case % 3 != 2 && updated != deleted {
                new.insert(&updated, rng.value()).unwrap();
                ops.push((updated, Action::Update));
            }
            if case % 3 != 0 && new.remove(&deleted).is_some() {
                ops.push((deleted, Action::Delete));
            }
            // The whole tree, and the proof's part of it.
            let proof = new
                .proof_blocks(ops.iter().map(|(k, a)| (k.as_str(), *a)))
                .unwrap();
            for blocks in [new.blocks(), proof] {
                let car = car_of_blocks(new.root(), &blocks);
                let slice = CarSlice::parse(&car).unwrap();
                let mut tree = PartialTree::load(&slice, new.root()).unwrap();
                assert!(tree.loaded_canonical(), "case {case}");
                assert_eq!(rebuild(&tree), (new.root(), vec![], new.root()));
                for (key, action) in ops.iter().rev() {
                    match action {
                        Action::Create => tree.remove(key.as_bytes()).map(drop),
                        _ => tree.set(key.as_bytes(), old.get(key).unwrap()).map(drop),
                    }
                    .unwrap();
                }
                let (root, built, from_scratch) = rebuild(&tree);
                assert_eq!(
                    (root, from_scratch),
                    (old.root(), old.root()),
                    "case {case}"
                );
                // Built: exactly the old tree's nodes the new one does not have; every other
                // node of the old tree is a node loaded unchanged, reused.
                let new_nodes: HashSet<Cid> = new.blocks().into_iter().map(|(c, _)| c).collect();
                let mut changed: Vec<Cid> = old
                    .blocks()
                    .into_iter()
                    .map(|(c, _)| c)
                    .filter(|c| !new_nodes.contains(c))
                    .collect();
                let mut built = built;
                built.sort();
                changed.sort();
                assert_eq!(built, changed, "case {case}: {ops:?}");
                assert_eq!(tree.root(), Ok(old.root()));
            }
        }
    }

    #[test]
    fn a_key_removed_and_set_again_keeps_its_height() {
        let mut rng = Rng(5);
        let mut mst = Mst::new();
        for _ in 0..200 {
            mst.insert(rng.key(), rng.value()).unwrap();
        }
        let car = car_of_blocks(mst.root(), &mst.blocks());
        let mut tree = PartialTree::load(&CarSlice::parse(&car).unwrap(), mst.root()).unwrap();
        let (key, value) = mst
            .entries()
            .find(|(k, _)| key_height(k.as_bytes()) > 0)
            .unwrap();
        let buffer = tree.keys.len();
        tree.remove(key.as_bytes()).unwrap();
        assert_ne!(tree.root(), Ok(mst.root()));
        tree.set(key.as_bytes(), value).unwrap();
        // The removed key's place, bytes and height are taken back: nothing written again.
        assert_eq!(tree.keys.len(), buffer);
        let height = tree.items.iter().find_map(|i| match i {
            Item::Leaf { key: k, height, .. } if tree.key(*k) == key.as_bytes() => Some(*height),
            _ => None,
        });
        assert_eq!(height, Some(key_height(key.as_bytes())));
        assert_eq!(tree.root(), Ok(mst.root()));
    }

    #[test]
    fn non_canonical_encodings_are_rejected_and_odd_shapes_rebuilt() {
        let k0 = key_at(0, "c/a");
        let k1 = key_at(0, "c/b");
        let good = node(None, &[(&k0, None), (&k1, None)]);
        let load = |bytes: &[u8]| {
            let cid = cid_for(DAG_CBOR, bytes);
            let car = car_of(cid, &[&(cid, bytes.to_vec())]);
            PartialTree::load(&CarSlice::parse(&car).unwrap(), cid)
        };
        assert!(load(&good.1).unwrap().loaded_canonical());
        // The same node with one length in a longer form than needed, a field added, a byte
        // after it: each is the same node under another CID, so no MST has it.
        let long_array = [&[0xa2, 0x61, b'e', 0x98, 2][..], &good.1[4..]].concat();
        let extra_field = [&[0xa3][..], &good.1[1..], &[0x61, b'x', 0xf6][..]].concat();
        let trailing = [&good.1[..], &[0xf6][..]].concat();
        for (bytes, reason) in [
            (long_array, "shortest form"),
            (extra_field, "expected the map {e, l}"),
            (trailing, "trailing bytes"),
        ] {
            match load(&bytes) {
                Err(SyncError::Mst { reason: r, .. }) => assert!(r.contains(reason), "{r}"),
                other => panic!("{reason}: {other:?}"),
            }
        }
        // A key longer than any repo path.
        let long = key_at(0, &format!("c/{}", "x".repeat(1020)));
        assert!(long.len() > MAX_KEY_LEN);
        match load(&node(None, &[(&long, None)]).1) {
            Err(SyncError::Mst { reason, .. }) => assert!(reason.contains("1024"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // An empty node below a key: well-formed, loaded, but not the MST's shape, so the
        // tree is rebuilt (to another root) rather than taken as loaded.
        let k_top = key_at(1, "c/m");
        let empty = node(None, &[]);
        let parent = node(None, &[(&k_top, Some(empty.0))]);
        let bytes = car_of(parent.0, &[&parent, &empty]);
        let tree = PartialTree::load(&CarSlice::parse(&bytes).unwrap(), parent.0).unwrap();
        assert!(!tree.loaded_canonical());
        assert_eq!(tree.leaves().count(), 1);
        let rebuilt = tree.root().unwrap();
        assert_ne!(rebuilt, parent.0);
        assert_eq!(rebuilt, node(None, &[(&k_top, None)]).0);
    }
}
