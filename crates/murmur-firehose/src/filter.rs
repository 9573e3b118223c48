//! Which events the watcher looks at: repo DIDs, collections, actions, identity/account events.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::Action;

/// A collection pattern: an exact NSID (`agent.comms.task`) or a prefix (`agent.comms.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CollectionPattern {
    /// Exactly this NSID.
    Exact(String),
    /// Every NSID starting with this prefix (stored with its trailing dot).
    Prefix(String),
}

impl CollectionPattern {
    /// Parses `a.b.c` (exact) or `a.b.*` (prefix); `*` alone matches everything.
    pub fn parse(pattern: &str) -> CollectionPattern {
        match pattern.strip_suffix('*') {
            Some(prefix) => CollectionPattern::Prefix(prefix.to_string()),
            None => CollectionPattern::Exact(pattern.to_string()),
        }
    }

    /// Whether `collection` matches.
    pub fn matches(&self, collection: &str) -> bool {
        match self {
            CollectionPattern::Exact(nsid) => nsid == collection,
            CollectionPattern::Prefix(prefix) => collection.starts_with(prefix.as_str()),
        }
    }
}

/// A DID allowlist that can change while the watcher runs. Clones share the same list.
#[derive(Debug, Clone, Default)]
pub struct DidAllowlist(Arc<AllowlistInner>);

#[derive(Debug)]
struct AllowlistInner {
    set: RwLock<Option<HashSet<String>>>,
    /// Counts changes, so a source that filters in its server (Jetstream) can follow them.
    changes: watch::Sender<u64>,
}

impl Default for AllowlistInner {
    fn default() -> Self {
        AllowlistInner {
            set: RwLock::default(),
            changes: watch::channel(0).0,
        }
    }
}

impl DidAllowlist {
    /// Allows only these DIDs from now on.
    pub fn set(&self, dids: impl IntoIterator<Item = impl Into<String>>) {
        *self.write() = Some(dids.into_iter().map(Into::into).collect());
        self.changed();
    }

    /// Adds a DID (turning an allow-all list into a list of one).
    pub fn insert(&self, did: impl Into<String>) {
        self.write()
            .get_or_insert_with(HashSet::new)
            .insert(did.into());
        self.changed();
    }

    /// Removes a DID.
    pub fn remove(&self, did: &str) {
        if let Some(set) = self.write().as_mut() {
            set.remove(did);
        }
        self.changed();
    }

    /// Allows every DID again.
    pub fn allow_all(&self) {
        *self.write() = None;
        self.changed();
    }

    /// Whether `did` passes.
    pub fn allows(&self, did: &str) -> bool {
        self.read().as_ref().is_none_or(|set| set.contains(did))
    }

    /// The DIDs allowed now, sorted; `None` when every DID is.
    pub fn list(&self) -> Option<Vec<String>> {
        self.read().as_ref().map(|set| {
            let mut dids: Vec<String> = set.iter().cloned().collect();
            dids.sort();
            dids
        })
    }

    /// A receiver that sees every change made after it was taken.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.changes.subscribe()
    }

    fn changed(&self) {
        self.0.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Option<HashSet<String>>> {
        self.0.set.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Option<HashSet<String>>> {
        self.0.set.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the watcher lets through. The default lets every commit op through and drops
/// identity and account events.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Repo DIDs (changeable while running).
    pub dids: DidAllowlist,
    /// Collections; empty means all.
    pub collections: Vec<CollectionPattern>,
    /// Actions; empty means all.
    pub actions: Vec<Action>,
    /// Deliver `#identity` events to the application.
    pub identity_events: bool,
    /// Deliver `#account` events to the application.
    pub account_events: bool,
}

impl Filter {
    /// Whether ops of this repo may pass.
    pub fn allows_repo(&self, did: &str) -> bool {
        self.dids.allows(did)
    }

    /// Whether an op on `path` (`collection/rkey`) with `action` passes.
    pub fn allows_op(&self, path: &str, action: Action) -> bool {
        let collection = path.split_once('/').map_or(path, |(c, _)| c);
        (self.collections.is_empty() || self.collections.iter().any(|p| p.matches(collection)))
            && (self.actions.is_empty() || self.actions.contains(&action))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_and_exact_patterns() {
        let f = Filter {
            collections: vec![
                CollectionPattern::parse("agent.comms.*"),
                CollectionPattern::parse("app.bsky.feed.post"),
            ],
            actions: vec![Action::Create],
            ..Default::default()
        };
        assert!(f.allows_op("agent.comms.task/3l2", Action::Create));
        assert!(f.allows_op("app.bsky.feed.post/1", Action::Create));
        assert!(!f.allows_op("app.bsky.feed.like/1", Action::Create));
        assert!(!f.allows_op("agent.commsx.task/1", Action::Create));
        assert!(!f.allows_op("agent.comms.task/3l2", Action::Delete));
    }

    #[test]
    fn allowlist_changes_while_shared() {
        let list = DidAllowlist::default();
        let f = Filter {
            dids: list.clone(),
            ..Default::default()
        };
        assert!(f.allows_repo("did:plc:a"));
        list.set(["did:plc:b"]);
        assert!(!f.allows_repo("did:plc:a"));
        list.insert("did:plc:a");
        assert!(f.allows_repo("did:plc:a"));
        list.remove("did:plc:a");
        assert!(!f.allows_repo("did:plc:a"));
        list.allow_all();
        assert!(f.allows_repo("did:plc:z"));
    }

    #[test]
    fn changes_are_announced_and_listed() {
        let list = DidAllowlist::default();
        let mut changes = list.subscribe();
        assert_eq!(list.list(), None);
        assert!(!changes.has_changed().unwrap());
        list.set(["did:plc:b", "did:plc:a"]);
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();
        assert_eq!(
            list.list(),
            Some(vec!["did:plc:a".to_string(), "did:plc:b".to_string()])
        );
        list.clone().remove("did:plc:a");
        assert!(changes.has_changed().unwrap(), "a clone's change is seen");
    }
}
