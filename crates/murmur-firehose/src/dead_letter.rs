//! Where events go whose handlers failed for good, so the watcher can move on without losing them.

use std::io::Write;
use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::FirehoseError;

/// An op whose handler failed for good (a fatal error, or retries exhausted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// `at://did/collection/rkey` of the record: the repo still holds it for a later replay.
    pub uri: String,
    /// Repo DID.
    pub did: String,
    /// Commit revision.
    pub rev: String,
    /// Event sequence number on its source.
    pub seq: i64,
    /// `create`, `update` or `delete`.
    pub action: String,
    /// CID of the record (absent for deletes).
    pub cid: Option<String>,
    /// The handler that failed.
    pub handler: String,
    /// The last error it returned.
    pub error: String,
    /// How many times it ran.
    pub attempts: u32,
    /// When it was given up on (RFC 3339).
    pub failed_at: String,
}

/// Keeps dead letters.
#[async_trait]
pub trait DeadLetterStore: Send + Sync + 'static {
    /// Stores one dead letter durably.
    async fn put(&self, letter: DeadLetter) -> Result<(), FirehoseError>;
    /// Every dead letter stored so far, oldest first.
    async fn list(&self) -> Result<Vec<DeadLetter>, FirehoseError>;
}

/// A dead-letter store appending JSON lines to a file, fsynced per letter.
#[derive(Debug)]
pub struct FileDeadLetterStore {
    path: PathBuf,
    lock: Mutex<()>,
}

impl FileDeadLetterStore {
    /// A store at `path` (created on first letter).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileDeadLetterStore {
            path: path.into(),
            lock: Mutex::new(()),
        }
    }
}

#[async_trait]
impl DeadLetterStore for FileDeadLetterStore {
    async fn put(&self, letter: DeadLetter) -> Result<(), FirehoseError> {
        let _guard = self.lock.lock().await;
        let mut line = serde_json::to_string(&letter).map_err(|e| FirehoseError::Store {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        line.push('\n');
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| FirehoseError::store(dir, e))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| FirehoseError::store(&self.path, e))?;
        file.write_all(line.as_bytes())
            .and_then(|()| file.sync_data())
            .map_err(|e| FirehoseError::store(&self.path, e))
    }

    async fn list(&self) -> Result<Vec<DeadLetter>, FirehoseError> {
        let _guard = self.lock.lock().await;
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(FirehoseError::store(&self.path, e)),
        };
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| FirehoseError::Store {
                    path: self.path.clone(),
                    reason: format!("line {}: {e}", i + 1),
                })
            })
            .collect()
    }
}

/// A dead-letter store in memory: the default when the watcher has no state directory.
/// Letters last as long as the process; read them with [`Watcher::dead_letters`](crate::Watcher::dead_letters).
#[derive(Debug, Default)]
pub struct MemoryDeadLetterStore {
    letters: std::sync::Mutex<Vec<DeadLetter>>,
}

#[async_trait]
impl DeadLetterStore for MemoryDeadLetterStore {
    async fn put(&self, letter: DeadLetter) -> Result<(), FirehoseError> {
        self.letters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(letter);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<DeadLetter>, FirehoseError> {
        Ok(self
            .letters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone())
    }
}
