//! The record index: for each repo the watcher follows, the records its handlers have seen
//! (path -> CID), and whether that view is complete (a *baseline*). After a gap, a fresh copy
//! of the repo diffed against the index says exactly which creates, updates and deletes were
//! missed; a backfill is the same diff against an empty index.
//!
//! Kept in memory and, with a state directory, in an append-only log (`records.log`) that is
//! replayed on start and rewritten when it holds twice as many lines as live entries. A torn
//! last line (a kill mid-write) is skipped.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use murmur_sync::Cid;

use crate::FirehoseError;
use crate::cursor::write_atomically;

/// What the index knows of one repo.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct RepoIndex {
    /// `Some(rev)` once the index holds every matching record of the repo as of `rev` (a
    /// copy of the repo was delivered). Ops at or below it are reflected already.
    pub baseline: Option<String>,
    /// path -> record CID, for the records delivered to handlers.
    pub records: BTreeMap<String, Cid>,
}

/// A change to the index.
#[derive(Debug, Clone, Copy)]
pub(crate) enum IndexChange<'a> {
    /// A record now has this CID.
    Put(&'a str, Cid),
    /// A record is gone.
    Remove(&'a str),
}

#[derive(Default)]
struct State {
    repos: HashMap<String, RepoIndex>,
    file: Option<std::fs::File>,
    lines: usize,
    entries: usize,
}

/// The record index of a watcher. See the module docs.
pub(crate) struct RecordIndex {
    path: Option<PathBuf>,
    /// Off: nothing is recorded, no repo has a baseline (resyncs only call `on_resync`).
    enabled: bool,
    state: Mutex<State>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RecordIndex {
    /// An index kept in memory only (no state directory).
    pub(crate) fn in_memory() -> Self {
        RecordIndex {
            path: None,
            enabled: true,
            state: Mutex::default(),
        }
    }

    /// No index: nothing is recorded.
    pub(crate) fn disabled() -> Self {
        RecordIndex {
            enabled: false,
            ..RecordIndex::in_memory()
        }
    }

    /// Opens (or creates) the index logged at `path`.
    pub(crate) fn open(path: impl Into<PathBuf>) -> Result<Self, FirehoseError> {
        let path = path.into();
        let mut state = State::default();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                for line in text.lines() {
                    state.lines += 1;
                    state.entries = state.entries.saturating_add_signed(
                        Line::parse(line).map_or(0, |l| l.apply(&mut state.repos)),
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(FirehoseError::store(&path, e)),
        }
        Ok(RecordIndex {
            path: Some(path),
            enabled: true,
            state: Mutex::new(state),
        })
    }

    /// Whether the index records anything.
    pub(crate) fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// A copy of what the index holds for `did`.
    pub(crate) fn repo(&self, did: &str) -> RepoIndex {
        lock(&self.state)
            .repos
            .get(did)
            .cloned()
            .unwrap_or_default()
    }

    /// The baseline rev of `did`, if the index is complete for it.
    pub(crate) fn baseline(&self, did: &str) -> Option<String> {
        if !self.enabled {
            return None;
        }
        lock(&self.state)
            .repos
            .get(did)
            .and_then(|r| r.baseline.clone())
    }

    /// The repos with a baseline.
    pub(crate) fn complete_repos(&self) -> Vec<String> {
        lock(&self.state)
            .repos
            .iter()
            .filter(|(_, r)| r.baseline.is_some())
            .map(|(did, _)| did.clone())
            .collect()
    }

    /// Records a change to one record of `did`.
    pub(crate) fn change(&self, did: &str, change: IndexChange<'_>) -> Result<(), FirehoseError> {
        let line = match change {
            IndexChange::Put(path, cid) => Line::Put(did, path, cid),
            IndexChange::Remove(path) => Line::Remove(did, path),
        };
        self.append(line)
    }

    /// Marks `did` complete as of `rev`.
    pub(crate) fn set_baseline(&self, did: &str, rev: &str) -> Result<(), FirehoseError> {
        self.append(Line::Baseline(did, rev))
    }

    /// Applies `line` in memory and, with a state directory, appends it to the log. The text
    /// is formatted only for the log (an index in memory, or off, formats nothing).
    fn append(&self, line: Line<'_>) -> Result<(), FirehoseError> {
        if !self.enabled {
            return Ok(());
        }
        let mut state = lock(&self.state);
        let delta = line.apply(&mut state.repos);
        state.entries = state.entries.saturating_add_signed(delta);
        let Some(path) = &self.path else {
            return Ok(());
        };
        if state.lines >= 2 * state.entries.max(1024) {
            return self.compact(&mut state);
        }
        if state.file.is_none() {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| FirehoseError::store(dir, e))?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| FirehoseError::store(path, e))?;
            state.file = Some(file);
        }
        state.lines += 1;
        let Some(file) = state.file.as_mut() else {
            unreachable!("opened above")
        };
        file.write_all(line.text().as_bytes())
            .map_err(|e| FirehoseError::store(path, e))
    }

    /// Rewrites the log with only the live entries.
    fn compact(&self, state: &mut State) -> Result<(), FirehoseError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut text = String::new();
        let mut entries = 0;
        for (did, repo) in &state.repos {
            for (p, cid) in &repo.records {
                text.push_str(&Line::Put(did, p, *cid).text());
                entries += 1;
            }
            if let Some(rev) = &repo.baseline {
                text.push_str(&Line::Baseline(did, rev).text());
            }
            entries += 1;
        }
        let dir = path.parent().map(PathBuf::from).unwrap_or_default();
        write_atomically(&dir, path, text.as_bytes())?;
        state.file = None;
        state.lines = entries;
        state.entries = entries;
        Ok(())
    }
}

/// One line of the log: a record put or removed, or a repo's baseline.
#[derive(Debug, Clone, Copy)]
enum Line<'a> {
    /// `+ did path cid`
    Put(&'a str, &'a str, Cid),
    /// `- did path`
    Remove(&'a str, &'a str),
    /// `B did rev`
    Baseline(&'a str, &'a str),
}

impl<'a> Line<'a> {
    /// Reads one log line; `None` for a malformed (torn) one.
    fn parse(line: &'a str) -> Option<Line<'a>> {
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("+"), Some(did), Some(path), Some(cid)) => {
                Some(Line::Put(did, path, cid.parse().ok()?))
            }
            (Some("-"), Some(did), Some(path), None) => Some(Line::Remove(did, path)),
            (Some("B"), Some(did), rev, None) => Some(Line::Baseline(did, rev.unwrap_or_default())),
            _ => None,
        }
    }

    /// The line as the log holds it, newline included.
    fn text(self) -> String {
        match self {
            Line::Put(did, path, cid) => format!("+ {did} {path} {cid}\n"),
            Line::Remove(did, path) => format!("- {did} {path}\n"),
            Line::Baseline(did, rev) => format!("B {did} {rev}\n"),
        }
    }

    /// Applies the line. Returns the change in the number of live entries (records and
    /// baselines), which decides when the log is compacted.
    fn apply(self, repos: &mut HashMap<String, RepoIndex>) -> isize {
        match self {
            Line::Put(did, path, cid) => {
                let records = &mut repos.entry(did.to_string()).or_default().records;
                isize::from(records.insert(path.to_string(), cid).is_none())
            }
            Line::Remove(did, path) => repos
                .get_mut(did)
                .map_or(0, |repo| -isize::from(repo.records.remove(path).is_some())),
            Line::Baseline(did, rev) => {
                let baseline = &mut repos.entry(did.to_string()).or_default().baseline;
                let new = baseline.is_none();
                *baseline = Some(rev.to_string());
                isize::from(new)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cid(n: u8) -> Cid {
        murmur_sync::cid_for(murmur_sync::RAW, &[n])
    }

    #[test]
    fn survives_reopen_and_torn_lines_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.log");
        let index = RecordIndex::open(&path).unwrap();
        index
            .change("did:plc:a", IndexChange::Put("c/1", cid(1)))
            .unwrap();
        index
            .change("did:plc:a", IndexChange::Put("c/2", cid(2)))
            .unwrap();
        index
            .change("did:plc:a", IndexChange::Remove("c/1"))
            .unwrap();
        index.set_baseline("did:plc:a", "3rev").unwrap();
        drop(index);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("+ did:plc:a c/9 bafy");
        std::fs::write(&path, text).unwrap();
        let index = RecordIndex::open(&path).unwrap();
        let repo = index.repo("did:plc:a");
        assert_eq!(repo.baseline.as_deref(), Some("3rev"));
        assert_eq!(repo.records.len(), 1);
        assert_eq!(repo.records.get("c/2"), Some(&cid(2)));
        // Many rewrites of one record: the log is compacted, the content kept.
        for i in 0..5000u32 {
            index
                .change("did:plc:a", IndexChange::Put("c/3", cid((i % 200) as u8)))
                .unwrap();
        }
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines < 3000, "{lines} lines");
        drop(index);
        let repo = RecordIndex::open(&path).unwrap().repo("did:plc:a");
        assert_eq!(repo.records.get("c/3"), Some(&cid((4999 % 200) as u8)));
        assert_eq!(repo.baseline.as_deref(), Some("3rev"));
    }
}
