//! The hub's per-source cursors in a NATS key-value bucket.

use async_nats::jetstream::kv;
use async_trait::async_trait;
use murmur_firehose::{CursorStore, FirehoseError};

/// Keeps each source's cursor (the seq up to which every event is in the stream) in a
/// JetStream key-value bucket, so a hub restarted anywhere, or a second hub, resumes from it.
#[derive(Clone)]
pub struct KvCursorStore {
    bucket: kv::Store,
    name: String,
}

impl KvCursorStore {
    /// A store in `bucket` (named `name` in errors).
    pub fn new(bucket: kv::Store, name: impl Into<String>) -> Self {
        KvCursorStore {
            bucket,
            name: name.into(),
        }
    }

    fn error(&self, source: &str, e: impl std::fmt::Display) -> FirehoseError {
        FirehoseError::Store {
            path: format!("nats kv {}/{}", self.name, key_for(source)).into(),
            reason: e.to_string(),
        }
    }
}

/// A key-value key for a source URL: bytes outside `[A-Za-z0-9_-]` written as `=XX` (hex), so
/// every URL has its own valid key.
pub fn key_for(source: &str) -> String {
    let mut key = String::with_capacity(source.len() + 16);
    for b in source.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            key.push(b as char);
        } else {
            key.push_str(&format!("={b:02X}"));
        }
    }
    key
}

#[async_trait]
impl CursorStore for KvCursorStore {
    async fn load(&self, source: &str) -> Result<Option<i64>, FirehoseError> {
        let value = self
            .bucket
            .get(key_for(source))
            .await
            .map_err(|e| self.error(source, e))?;
        let Some(value) = value else { return Ok(None) };
        let text = std::str::from_utf8(&value).map_err(|e| self.error(source, e))?;
        text.trim()
            .parse::<i64>()
            .map(Some)
            .map_err(|e| self.error(source, format!("stored cursor {text:?}: {e}")))
    }

    async fn store(&self, source: &str, seq: i64) -> Result<(), FirehoseError> {
        self.bucket
            .put(key_for(source), seq.to_string().into())
            .await
            .map(|_| ())
            .map_err(|e| self.error(source, e))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keys_are_valid_and_distinct() {
        let a = super::key_for("ws://localhost:2583/xrpc/com.atproto.sync.subscribeRepos");
        assert_eq!(
            a,
            "ws=3A=2F=2Flocalhost=3A2583=2Fxrpc=2Fcom=2Eatproto=2Esync=2EsubscribeRepos"
        );
        assert_ne!(super::key_for("a.b"), super::key_for("a/b"));
        assert_ne!(super::key_for("a=2Eb"), super::key_for("a.b"));
    }
}
