//! Where the watcher remembers how far it got: one cursor per source.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use crate::FirehoseError;

/// Persists, per source, the low-water mark: the highest `seq` such that every event up to
/// it has been fully handled. A restart resumes from there.
#[async_trait]
pub trait CursorStore: Send + Sync + 'static {
    /// The stored cursor of `source` (a source URL), if any.
    async fn load(&self, source: &str) -> Result<Option<i64>, FirehoseError>;
    /// Durably stores `seq` as the cursor of `source`.
    async fn store(&self, source: &str, seq: i64) -> Result<(), FirehoseError>;
}

/// A cursor store keeping one small file per source in a directory.
///
/// Each write goes to a temporary file that is fsynced and renamed over the old one, so a
/// crash leaves either the old or the new cursor, never a torn one.
#[derive(Debug, Clone)]
pub struct FileCursorStore {
    dir: PathBuf,
}

impl FileCursorStore {
    /// A store under `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileCursorStore { dir: dir.into() }
    }

    fn path(&self, source: &str) -> PathBuf {
        self.dir.join(format!("{}.cursor", file_name_for(source)))
    }
}

/// A file name that identifies `source` readably: `ws://localhost:2583/...` -> `localhost_2583`.
/// Jetstream's path is kept (`ws://hub:6008/subscribe` -> `hub_6008_subscribe`), so a
/// Jetstream feed and a `subscribeRepos` source on one host keep cursors of their own (one
/// counts microseconds, the other seqs); other paths are dropped, as they always were, so the
/// cursor files of existing sources keep their names.
pub(crate) fn file_name_for(source: &str) -> String {
    let rest = source.split("://").nth(1).unwrap_or(source);
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let path = path
        .split(['?', '#'])
        .next()
        .unwrap_or("")
        .trim_end_matches('/');
    let name = if path == "subscribe" {
        format!("{host}/{path}")
    } else {
        host.to_string()
    };
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[async_trait]
impl CursorStore for FileCursorStore {
    async fn load(&self, source: &str) -> Result<Option<i64>, FirehoseError> {
        let path = self.path(source);
        match tokio::fs::read_to_string(&path).await {
            Ok(text) => text
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| FirehoseError::Store {
                    path: path.clone(),
                    reason: format!("cursor file holds {:?}, not a sequence number", text.trim()),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(FirehoseError::store(&path, e)),
        }
    }

    async fn store(&self, source: &str, seq: i64) -> Result<(), FirehoseError> {
        let path = self.path(source);
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            write_atomically(&dir, &path, seq.to_string().as_bytes())
        })
        .await
        .map_err(|e| FirehoseError::Store {
            path: self.path(source),
            reason: e.to_string(),
        })?
    }
}

/// Writes `bytes` to `path` via an fsynced temporary file and a rename.
pub(crate) fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), FirehoseError> {
    use std::io::Write;
    std::fs::create_dir_all(dir).map_err(|e| FirehoseError::store(dir, e))?;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(|e| FirehoseError::store(&tmp, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| FirehoseError::store(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| FirehoseError::store(path, e))?;
    // The rename itself is durable only once the directory is synced.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stores_per_source_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileCursorStore::new(dir.path().join("cursors"));
        assert_eq!(store.load("ws://localhost:1/x").await.unwrap(), None);
        store.store("ws://localhost:1/x", 41).await.unwrap();
        store.store("ws://localhost:1/x", 42).await.unwrap();
        store.store("ws://localhost:2/x", 7).await.unwrap();
        let reopened = FileCursorStore::new(dir.path().join("cursors"));
        assert_eq!(reopened.load("ws://localhost:1/x").await.unwrap(), Some(42));
        assert_eq!(reopened.load("ws://localhost:2/x").await.unwrap(), Some(7));
    }

    #[test]
    fn file_names_keep_jetstreams_path_only() {
        assert_eq!(
            file_name_for("ws://localhost:2583/xrpc/com.atproto.sync.subscribeRepos"),
            "localhost_2583"
        );
        assert_eq!(file_name_for("ws://localhost:2583"), "localhost_2583");
        assert_eq!(
            file_name_for("ws://localhost:2583/subscribe"),
            "localhost_2583_subscribe"
        );
        assert_eq!(
            file_name_for("wss://js.example/subscribe?compress=true"),
            "js.example_subscribe"
        );
        // Other paths keep the names they always had.
        assert_eq!(file_name_for("ws://localhost:2/x"), "localhost_2");
    }

    #[tokio::test]
    async fn corrupt_cursor_is_a_typed_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileCursorStore::new(dir.path());
        std::fs::write(dir.path().join("localhost_1.cursor"), "garbage").unwrap();
        let err = store.load("ws://localhost:1").await.unwrap_err();
        assert!(err.to_string().contains("localhost_1.cursor"), "{err}");
    }
}
