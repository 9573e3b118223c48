//! Sessions: tokens that never leak, a 0600 session file written atomically, and a
//! single-flight refresh that never wedges.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A string that must not be shown: a token or a password. Debug and Display print
/// `<redacted>`; [`Secret::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_string())
    }
}

/// An authenticated session on a PDS: what the session file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    /// The account's DID.
    pub did: String,
    /// The account's handle when the session was made.
    pub handle: String,
    /// The PDS base URL the session belongs to.
    pub pds: String,
    /// The short-lived access token.
    pub access_jwt: Secret,
    /// The long-lived refresh token.
    pub refresh_jwt: Secret,
}

impl Session {
    /// Reads a session file written by [`Session::save`].
    pub fn load(path: &Path) -> Result<Session> {
        let file_err = |message: String| Error::SessionFile {
            path: path.to_path_buf(),
            message,
        };
        let bytes = std::fs::read(path)
            .map_err(|e| file_err(format!("cannot read it ({e}); log in first to create it")))?;
        // serde_json's messages quote no input values, so no token can leak through them.
        serde_json::from_slice(&bytes).map_err(|e| {
            file_err(format!(
                "not a murmur session file ({e}); delete it and log in again"
            ))
        })
    }

    /// Writes the session to `path` with mode 0600, atomically: a temporary file in the same
    /// directory, synced, then renamed over the old one. Readers never see half a file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let file_err = |message: String| Error::SessionFile {
            path: path.to_path_buf(),
            message,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| file_err(format!("cannot create its directory: {e}")))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "session".into());
        let tmp = dir.join(format!(
            ".{name}.tmp-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| file_err(format!("cannot encode the session: {e}")))?;
        let write = || -> std::io::Result<()> {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut file = options.open(&tmp)?;
            file.write_all(&json)?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)?;
            Ok(())
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            file_err(format!("cannot write it: {e}"))
        })
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The tokens in use, with a generation number bumped by every refresh.
pub(crate) struct Tokens {
    pub access: String,
    pub generation: u64,
    pub refresh_attempts: u64,
}

/// The live session of a writer, shared by its clones and tasks.
pub(crate) struct SessionCell {
    current: RwLock<(Session, u64)>,
    file: Option<PathBuf>,
    refresh: tokio::sync::Mutex<RefreshLog>,
    refresh_attempts: AtomicU64,
}

#[derive(Default)]
struct RefreshLog {
    attempts: u64,
    /// The failure of the last attempt, and the generation it tried to replace.
    last_failure: Option<(u64, Error)>,
}

/// What a caller saw when its request failed authentication.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seen {
    pub generation: u64,
    pub refresh_attempts: u64,
}

impl SessionCell {
    pub(crate) fn new(session: Session, file: Option<PathBuf>) -> SessionCell {
        SessionCell {
            current: RwLock::new((session, 0)),
            file,
            refresh: tokio::sync::Mutex::new(RefreshLog::default()),
            refresh_attempts: AtomicU64::new(0),
        }
    }

    pub(crate) fn session(&self) -> Session {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    pub(crate) fn tokens(&self) -> Tokens {
        let guard = self.current.read().unwrap_or_else(|p| p.into_inner());
        Tokens {
            access: guard.0.access_jwt.expose().to_string(),
            generation: guard.1,
            refresh_attempts: self.refresh_attempts.load(Ordering::SeqCst),
        }
    }

    pub(crate) fn refresh_attempts(&self) -> u64 {
        self.refresh_attempts.load(Ordering::SeqCst)
    }

    pub(crate) fn refresh_token(&self) -> String {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .refresh_jwt
            .expose()
            .to_string()
    }

    pub(crate) fn persist(&self) -> Result<()> {
        match &self.file {
            Some(path) => self.session().save(path),
            None => Ok(()),
        }
    }

    /// Refreshes the session once for everyone who saw generation `seen.generation` fail.
    ///
    /// The first caller runs `refresh`; callers that were waiting meanwhile get its outcome:
    /// success if the generation moved on, its error if it failed. A caller that arrives
    /// after a failed attempt tries again, so one failure (the PDS was down) does not wedge
    /// the session.
    pub(crate) async fn refresh_once<F, Fut>(&self, seen: Seen, refresh: F) -> Result<()>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<Session>>,
    {
        let mut log = self.refresh.lock().await;
        if self.current.read().unwrap_or_else(|p| p.into_inner()).1 != seen.generation {
            return Ok(());
        }
        if log.attempts != seen.refresh_attempts
            && let Some((generation, err)) = &log.last_failure
            && *generation == seen.generation
        {
            return Err(err.clone());
        }
        log.attempts += 1;
        self.refresh_attempts.store(log.attempts, Ordering::SeqCst);
        tracing::debug!(generation = seen.generation, "refreshing the session");
        match refresh(self.refresh_token()).await {
            Ok(session) => {
                {
                    let mut guard = self.current.write().unwrap_or_else(|p| p.into_inner());
                    guard.0 = session;
                    guard.1 += 1;
                }
                log.last_failure = None;
                self.persist()
            }
            Err(err) => {
                tracing::warn!(error = %err, "session refresh failed");
                log.last_failure = Some((seen.generation, err.clone()));
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            did: "did:plc:abc".into(),
            handle: "alice.test".into(),
            pds: "http://localhost:1".into(),
            access_jwt: Secret::new("access-SECRET"),
            refresh_jwt: Secret::new("refresh-SECRET"),
        }
    }

    #[test]
    fn debug_never_shows_tokens() {
        let text = format!("{:?}", session());
        assert!(!text.contains("SECRET"), "{text}");
        assert!(text.contains("did:plc:abc"));
    }

    #[test]
    fn session_file_is_0600_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/session.json");
        session().save(&path).unwrap();
        session().save(&path).unwrap(); // overwrite in place
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(Session::load(&path).unwrap(), session());
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }

    #[test]
    fn broken_session_file_error_leaks_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("session.json");
        std::fs::write(&path, r#"{"did":"x","accessJwt":"access-SECRET""#).unwrap();
        let err = Session::load(&path).unwrap_err().to_string();
        assert!(!err.contains("SECRET"), "{err}");
    }

    #[tokio::test]
    async fn concurrent_refreshes_run_once_and_failures_do_not_wedge() {
        use std::sync::Arc;
        let cell = Arc::new(SessionCell::new(session(), None));
        let calls = Arc::new(AtomicU64::new(0));

        // Ten tasks saw the same expired generation: one refresh.
        let seen = {
            let t = cell.tokens();
            Seen {
                generation: t.generation,
                refresh_attempts: t.refresh_attempts,
            }
        };
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (cell, calls) = (cell.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                cell.refresh_once(seen, |_| async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    let mut s = session();
                    s.access_jwt = Secret::new("new-access");
                    Ok(s)
                })
                .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(cell.tokens().access, "new-access");

        // A failed refresh is shared by its waiters, and a later caller tries again.
        let t = cell.tokens();
        let seen = Seen {
            generation: t.generation,
            refresh_attempts: t.refresh_attempts,
        };
        let fail = |_| async {
            Err(Error::Unreachable {
                url: "http://localhost:1".into(),
                message: "connection refused".into(),
                attempts: 1,
                sent: false,
            })
        };
        assert!(cell.refresh_once(seen, fail).await.is_err());
        assert!(
            cell.refresh_once(seen, fail).await.is_err(),
            "waiter shares the failure"
        );
        let t = cell.tokens();
        let later = Seen {
            generation: t.generation,
            refresh_attempts: t.refresh_attempts,
        };
        cell.refresh_once(later, |_| async { Ok(session()) })
            .await
            .unwrap();
        assert_eq!(cell.tokens().access, "access-SECRET");
    }
}
