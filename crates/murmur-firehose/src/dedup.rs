//! Remembers which ops were fully handled, so a restart does not run their handlers again.

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::path::PathBuf;

use async_trait::async_trait;
use tokio::sync::Mutex;

use crate::FirehoseError;
use crate::cursor::write_atomically;

/// The idempotency key of one op: (did, rev, path). Handlers and dedup stores use it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OpKey {
    /// Repo DID.
    pub did: String,
    /// Commit revision.
    pub rev: String,
    /// `collection/rkey`.
    pub path: String,
}

/// Records finished ops. [`contains`](DedupStore::contains) is asked before a handler runs.
#[async_trait]
pub trait DedupStore: Send + Sync + 'static {
    /// Whether the op was already fully handled.
    async fn contains(&self, key: &OpKey) -> Result<bool, FirehoseError>;
    /// Marks the op as fully handled.
    async fn insert(&self, key: OpKey) -> Result<(), FirehoseError>;
}

/// A dedup store that appends keys to a file and keeps the newest `capacity` in memory.
///
/// Appends survive the process being killed (they are in the kernel's page cache once
/// `write` returns); call [`FileDedupStore::with_fsync`] to also survive power loss.
#[derive(Debug)]
pub struct FileDedupStore {
    path: PathBuf,
    capacity: usize,
    fsync: bool,
    inner: Mutex<DedupState>,
}

#[derive(Debug, Default)]
struct DedupState {
    keys: HashSet<OpKey>,
    order: VecDeque<OpKey>,
    file: Option<std::fs::File>,
    /// Lines in the file; it is rewritten with only the kept keys at twice the capacity.
    lines: usize,
}

impl FileDedupStore {
    /// Opens (or creates) the store at `path`, keeping up to 1,000,000 keys.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, FirehoseError> {
        Self::open_with_capacity(path, 1_000_000)
    }

    /// Opens the store keeping up to `capacity` keys (oldest forgotten first).
    pub fn open_with_capacity(
        path: impl Into<PathBuf>,
        capacity: usize,
    ) -> Result<Self, FirehoseError> {
        let path = path.into();
        let mut state = DedupState::default();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                for line in text.lines() {
                    state.lines += 1;
                    let mut parts = line.splitn(3, ' ');
                    if let (Some(did), Some(rev), Some(p)) =
                        (parts.next(), parts.next(), parts.next())
                    {
                        state.remember(
                            OpKey {
                                did: did.into(),
                                rev: rev.into(),
                                path: p.into(),
                            },
                            capacity,
                        );
                    }
                    // A torn last line (killed mid-write) is skipped: its op reruns, at-least-once.
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(FirehoseError::store(&path, e)),
        }
        Ok(FileDedupStore {
            path,
            capacity: capacity.max(1),
            fsync: false,
            inner: Mutex::new(state),
        })
    }

    /// Fsync after every insert (slower; survives power loss).
    pub fn with_fsync(mut self) -> Self {
        self.fsync = true;
        self
    }

    fn compact(&self, state: &mut DedupState) -> Result<(), FirehoseError> {
        let mut text = String::new();
        for k in &state.order {
            text.push_str(&format!("{} {} {}\n", k.did, k.rev, k.path));
        }
        let dir = self.path.parent().map(PathBuf::from).unwrap_or_default();
        write_atomically(&dir, &self.path, text.as_bytes())?;
        state.file = None;
        state.lines = state.order.len();
        Ok(())
    }
}

impl DedupState {
    fn remember(&mut self, key: OpKey, capacity: usize) {
        if self.keys.insert(key.clone()) {
            self.order.push_back(key);
        }
        while self.order.len() > capacity {
            if let Some(old) = self.order.pop_front() {
                self.keys.remove(&old);
            }
        }
    }
}

#[async_trait]
impl DedupStore for FileDedupStore {
    async fn contains(&self, key: &OpKey) -> Result<bool, FirehoseError> {
        Ok(self.inner.lock().await.keys.contains(key))
    }

    async fn insert(&self, key: OpKey) -> Result<(), FirehoseError> {
        let mut state = self.inner.lock().await;
        if state.keys.contains(&key) {
            return Ok(());
        }
        let line = format!("{} {} {}\n", key.did, key.rev, key.path);
        state.remember(key, self.capacity);
        if state.lines >= 2 * self.capacity {
            return self.compact(&mut state);
        }
        if state.file.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| FirehoseError::store(dir, e))?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| FirehoseError::store(&self.path, e))?;
            state.file = Some(file);
        }
        state.lines += 1;
        let Some(file) = state.file.as_mut() else {
            unreachable!("opened above")
        };
        file.write_all(line.as_bytes())
            .map_err(|e| FirehoseError::store(&self.path, e))?;
        if self.fsync {
            file.sync_data()
                .map_err(|e| FirehoseError::store(&self.path, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> OpKey {
        OpKey {
            did: "did:plc:abc".into(),
            rev: format!("3l{i:011}"),
            path: format!("agent.comms.task/{i}"),
        }
    }

    #[tokio::test]
    async fn remembers_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/dedup.log");
        let store = FileDedupStore::open(&path).unwrap();
        store.insert(key(1)).await.unwrap();
        store.insert(key(2)).await.unwrap();
        drop(store);
        let store = FileDedupStore::open(&path).unwrap();
        assert!(store.contains(&key(1)).await.unwrap());
        assert!(store.contains(&key(2)).await.unwrap());
        assert!(!store.contains(&key(3)).await.unwrap());
    }

    #[tokio::test]
    async fn forgets_oldest_beyond_capacity_and_skips_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dedup.log");
        let store = FileDedupStore::open_with_capacity(&path, 10).unwrap();
        for i in 0..50 {
            store.insert(key(i)).await.unwrap();
        }
        assert!(!store.contains(&key(0)).await.unwrap());
        assert!(store.contains(&key(49)).await.unwrap());
        drop(store);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("did:plc:torn 3l");
        std::fs::write(&path, text).unwrap();
        let store = FileDedupStore::open_with_capacity(&path, 10).unwrap();
        assert!(store.contains(&key(49)).await.unwrap());
    }
}
