//! Remembers which ops were fully handled, so a restart does not run their handlers again.

use std::collections::{HashSet, VecDeque};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

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
/// An [`insert`](DedupStore::insert) returns once its line is written to the file, so a key
/// survives the process being killed (it is in the kernel's page cache once `write`
/// returns); call [`FileDedupStore::with_fsync`] to also survive power loss. Inserts that
/// arrive while a write is under way are written together by the next one (group commit):
/// one `write` (and one fsync) for the whole group, each insert still returning only once
/// its own line is written.
///
/// In memory each key is 128 bits of its SHA-256 (did, rev and path), not its text; the
/// file keeps the text (`did rev path` per line), so it stays readable and is rewritten
/// with only the kept keys once it holds twice the capacity.
#[derive(Debug)]
pub struct FileDedupStore {
    path: PathBuf,
    capacity: usize,
    fsync: bool,
    inner: Mutex<DedupState>,
}

/// 128 bits of SHA-256 over a key's did, rev and path: the key as the store remembers it.
type KeyDigest = u128;

pub(crate) fn digest_of(did: &str, rev: &str, path: &str) -> KeyDigest {
    let mut h = Sha256::new();
    for part in [did, rev, path] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let out = h.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&out[..16]);
    u128::from_le_bytes(first)
}

/// The largest group text whose buffers are kept for the next group.
const SPARE_TEXT_MAX: usize = 64 * 1024;

/// Lines accepted but not written yet, and who waits for them.
#[derive(Debug, Default)]
struct Batch {
    text: Vec<u8>,
    keys: Vec<KeyDigest>,
    waiting: Vec<oneshot::Sender<Result<(), String>>>,
}

#[derive(Debug, Default)]
struct DedupState {
    keys: HashSet<KeyDigest>,
    order: VecDeque<KeyDigest>,
    file: Option<std::fs::File>,
    /// Lines in the file; it is rewritten with only the kept keys at twice the capacity.
    lines: usize,
    /// The next group to write.
    batch: Batch,
    /// Emptied buffers of the last group written, for the next.
    spare: Batch,
    /// Whether an insert is writing a group now (the others add to `batch` and wait).
    writing: bool,
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
        let capacity = capacity.max(1);
        let mut state = DedupState::default();
        match std::fs::File::open(&path) {
            Ok(file) => {
                for line in std::io::BufReader::new(file).split(b'\n') {
                    let line = line.map_err(|e| FirehoseError::store(&path, e))?;
                    state.lines += 1;
                    // A torn last line (killed mid-write) is skipped: its op reruns,
                    // at-least-once.
                    if let Some(key) = parse_line(&line) {
                        state.remember(key, capacity);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(FirehoseError::store(&path, e)),
        }
        Ok(FileDedupStore {
            path,
            capacity,
            fsync: false,
            inner: Mutex::new(state),
        })
    }

    /// Fsync after every write (slower; survives power loss). Inserts written together
    /// share one fsync.
    pub fn with_fsync(mut self) -> Self {
        self.fsync = true;
        self
    }

    fn state(&self) -> MutexGuard<'_, DedupState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes groups until none is waiting. Called by the insert that found no write under
    /// way, whose own line is in the first group: the first group's outcome is returned to
    /// it. The others wait for their group's outcome.
    fn write_groups(&self) -> Result<(), String> {
        let mut first = None;
        loop {
            let (mut batch, compact, mut file) = {
                let mut state = self.state();
                if state.batch.keys.is_empty() {
                    state.writing = false;
                    return first.unwrap_or(Ok(()));
                }
                // The buffers of the last group written are reused for the next.
                let spare = std::mem::take(&mut state.spare);
                let batch = std::mem::replace(&mut state.batch, spare);
                let compact = state.lines + batch.keys.len() >= 2 * self.capacity;
                if !compact && state.file.is_none() {
                    match self.open_for_append() {
                        Ok(file) => state.file = Some(file),
                        Err(e) => {
                            drop(state);
                            fail(batch, &e);
                            first.get_or_insert(Err(e));
                            continue;
                        }
                    }
                }
                (batch, compact, state.file.take())
            };
            // The file is only touched by the one insert writing (`writing` is set), so the
            // lock is not held across the system calls.
            let written = if compact {
                self.compact_with(&batch)
            } else {
                file.as_mut()
                    .map_or(Ok(()), |f| self.append(f, &batch.text))
            };
            let waiting = std::mem::take(&mut batch.waiting);
            {
                let mut state = self.state();
                match &written {
                    Ok(()) => {
                        if compact {
                            state.file = None;
                        } else {
                            state.file = file;
                            state.lines += batch.keys.len();
                        }
                        for &key in &batch.keys {
                            state.remember(key, self.capacity);
                        }
                        if compact {
                            state.lines = state.order.len();
                        }
                    }
                    // Not remembered: the inserts fail and are retried by their callers.
                    Err(_) => state.file = None,
                }
                // Kept for the next group unless a burst made them large.
                if batch.text.capacity() <= SPARE_TEXT_MAX {
                    batch.text.clear();
                    batch.keys.clear();
                    state.spare = batch;
                }
            }
            for tx in waiting {
                let _ = tx.send(written.clone());
            }
            first.get_or_insert(written);
        }
    }

    fn open_for_append(&self) -> Result<std::fs::File, String> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| e.to_string())
    }

    fn append(&self, file: &mut std::fs::File, text: &[u8]) -> Result<(), String> {
        file.write_all(text).map_err(|e| e.to_string())?;
        if self.fsync {
            file.sync_data().map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Rewrites the file with the keys kept after `batch` is remembered, and `batch`'s
    /// lines: the file holds the text the memory does not.
    fn compact_with(&self, batch: &Batch) -> Result<(), String> {
        let mut kept: HashSet<KeyDigest> = {
            let state = self.state();
            let mut order = state.order.clone();
            order.extend(batch.keys.iter().copied());
            let drop = order.len().saturating_sub(self.capacity);
            order.into_iter().skip(drop).collect()
        };
        let mut text = Vec::new();
        let mut keep = |line: &[u8]| {
            // Each kept key once, at its first line.
            if let Some(key) = parse_line(line)
                && kept.remove(&key)
            {
                text.extend_from_slice(line);
                text.push(b'\n');
            }
        };
        match std::fs::File::open(&self.path) {
            Ok(file) => {
                for line in std::io::BufReader::new(file).split(b'\n') {
                    keep(&line.map_err(|e| e.to_string())?);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.to_string()),
        }
        for line in batch.text.split(|&b| b == b'\n') {
            keep(line);
        }
        let dir = self.path.parent().map(PathBuf::from).unwrap_or_default();
        write_atomically(&dir, &self.path, &text).map_err(|e| e.to_string())
    }
}

/// Answers every insert of a group that could not be written.
fn fail(batch: Batch, error: &str) {
    for tx in batch.waiting {
        let _ = tx.send(Err(error.to_string()));
    }
}

/// The key of one `did rev path` line, or `None` for a torn or foreign line.
fn parse_line(line: &[u8]) -> Option<KeyDigest> {
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.splitn(3, ' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(did), Some(rev), Some(path)) if !did.is_empty() && !rev.is_empty() => {
            Some(digest_of(did, rev, path))
        }
        _ => None,
    }
}

impl DedupState {
    fn remember(&mut self, key: KeyDigest, capacity: usize) {
        if self.keys.insert(key) {
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
        let digest = digest_of(&key.did, &key.rev, &key.path);
        Ok(self.state().keys.contains(&digest))
    }

    async fn insert(&self, key: OpKey) -> Result<(), FirehoseError> {
        let digest = digest_of(&key.did, &key.rev, &key.path);
        let waiting = {
            let mut state = self.state();
            if state.keys.contains(&digest) {
                return Ok(());
            }
            let batch = &mut state.batch;
            for (i, part) in [&key.did, &key.rev, &key.path].into_iter().enumerate() {
                if i > 0 {
                    batch.text.push(b' ');
                }
                batch.text.extend_from_slice(part.as_bytes());
            }
            batch.text.push(b'\n');
            batch.keys.push(digest);
            if std::mem::replace(&mut state.writing, true) {
                // A write is under way: this line goes with the next group, and its
                // outcome comes back here.
                let (tx, rx) = oneshot::channel();
                state.batch.waiting.push(tx);
                Some(rx)
            } else {
                None
            }
        };
        let outcome = match waiting {
            // No write under way: this insert writes, its line in the first group. Short
            // appends to the page cache, done on this thread.
            None => self.write_groups(),
            Some(rx) => rx
                .await
                .unwrap_or_else(|_| Err("the write of this key was abandoned".into())),
        };
        outcome.map_err(|reason| FirehoseError::store(&self.path, reason))
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_inserts_are_all_written_once_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dedup.log");
        let store = std::sync::Arc::new(FileDedupStore::open(&path).unwrap());
        let mut tasks = Vec::new();
        for t in 0..8u32 {
            let store = std::sync::Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                for i in 0..250 {
                    let k = key(t * 1000 + i);
                    store.insert(k.clone()).await.unwrap();
                    // Written before insert returned: a kill -9 now would keep it.
                    let text = std::fs::read_to_string(store.path.clone()).unwrap();
                    assert!(
                        text.contains(&format!(" {}\n", k.path)),
                        "{k:?} not in the file"
                    );
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2000);
        drop(store);
        let store = FileDedupStore::open(&path).unwrap();
        for t in 0..8u32 {
            for i in 0..250 {
                assert!(store.contains(&key(t * 1000 + i)).await.unwrap());
            }
        }
        assert!(!store.contains(&key(999)).await.unwrap());
    }

    #[tokio::test]
    async fn a_failed_write_is_an_error_naming_the_file_and_remembers_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("state");
        let path = blocker.join("dedup.log");
        let store = FileDedupStore::open(&path).unwrap();
        // The store's directory becomes a file: nothing can be written under it.
        std::fs::write(&blocker, b"not a directory").unwrap();
        let err = store.insert(key(1)).await.unwrap_err();
        assert!(err.to_string().contains("dedup.log"), "{err}");
        assert!(!store.contains(&key(1)).await.unwrap());
        // Once the directory can be made, the retried insert lands.
        std::fs::remove_file(&blocker).unwrap();
        store.insert(key(1)).await.unwrap();
        assert!(store.contains(&key(1)).await.unwrap());
        assert!(
            FileDedupStore::open(&path)
                .unwrap()
                .contains(&key(1))
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn compaction_keeps_the_newest_keys_with_their_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dedup.log");
        let store = FileDedupStore::open_with_capacity(&path, 10).unwrap();
        for i in 0..45 {
            store.insert(key(i)).await.unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.lines().count() <= 20, "{text}");
        assert!(text.contains("agent.comms.task/44\n"), "{text}");
        drop(store);
        let store = FileDedupStore::open_with_capacity(&path, 10).unwrap();
        for i in 35..45 {
            assert!(store.contains(&key(i)).await.unwrap(), "{i}");
        }
        for i in 0..30 {
            assert!(!store.contains(&key(i)).await.unwrap(), "{i}");
        }
    }
}
