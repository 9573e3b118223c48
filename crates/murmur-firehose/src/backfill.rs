//! Joining late and staying consistent: copies of repos (`com.atproto.sync.getRepo`, verified)
//! diffed against the [record index](crate::index), delivered to the same handlers.
//!
//! One path serves both uses:
//! - **Backfill** ([`WatcherBuilder::backfill`](crate::WatcherBuilder::backfill)): a repo the
//!   watcher has never seen is diffed against an empty index, so every matching record is
//!   delivered once ([`Origin::Backfill`]).
//! - **Resync**: after a broken rev chain, a `#sync`, an unprovable `tooBig` commit or a seq
//!   regression, a repo whose index is complete (it has a *baseline*) is diffed against it, so
//!   exactly the missed creates, updates and deletes are delivered ([`Origin::Resync`]).
//!
//! The copy is taken only once every op handed to the repo's lane before has finished (so the
//! index holds them), and the repo's later stream ops wait until the copy's ops are queued, in
//! key order, in the same lane: handlers see one order per repo. A stream op whose rev is at or
//! below the copy's rev is reflected in it already and is not delivered again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::StreamExt;
use murmur_sync::{Action, Cid, Mst, MstDiff, RepoRecord};
use tracing::{debug, info, warn};

use crate::dispatch::{Completion, Job};
use crate::index::IndexChange;
use crate::metrics::Metrics;
use crate::op::{OpData, Origin};
use crate::pipeline::Pipeline;
use crate::{OpEvent, Rejected, Rejection, WatchError};

/// Which repos a watcher copies when it starts, before (and while) it follows the stream. Set
/// it with [`WatcherBuilder::backfill`](crate::WatcherBuilder::backfill).
///
/// Every record of those repos that the watcher's filters and handlers take is delivered
/// once, marked [`Origin::Backfill`], then the stream goes on from a cursor taken before the
/// listing began. Repos finished in an earlier run (with a state directory) are not fetched
/// again.
#[derive(Debug, Clone)]
pub struct Backfill {
    pub(crate) dids: Option<Vec<String>>,
    pub(crate) hosts: Vec<String>,
    pub(crate) concurrency: usize,
}

impl Backfill {
    /// The repos each PDS host the watcher reads lists (`com.atproto.sync.listRepos`), those
    /// the DID filter admits. Add [`hosts`](Self::hosts) to list others (e.g. when the
    /// watcher reads a relay or a bus).
    pub fn listed() -> Self {
        Backfill {
            dids: None,
            hosts: Vec::new(),
            concurrency: 4,
        }
    }

    /// These repos (the DID filter still applies).
    pub fn dids(dids: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Backfill {
            dids: Some(dids.into_iter().map(Into::into).collect()),
            ..Backfill::listed()
        }
    }

    /// Lists the repos of these hosts (base URLs) instead of the watcher's own sources.
    pub fn hosts(mut self, hosts: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.hosts = hosts.into_iter().map(Into::into).collect();
        self
    }

    /// Repos fetched and delivered at once (default 4). Each repo's records are held in memory
    /// until they are queued.
    pub fn concurrency(mut self, repos: usize) -> Self {
        self.concurrency = repos.max(1);
        self
    }
}

/// How far a backfill has got ([`Watcher::backfill_progress`](crate::Watcher::backfill_progress),
/// also in [`Metrics::backfill`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackfillProgress {
    /// Repos to copy, once listed (repos finished in an earlier run included).
    pub repos_total: u64,
    /// Repos whose records have all been handled (or that an earlier run finished).
    pub repos_done: u64,
    /// Repos whose copy failed verification (reported to `on_rejected`).
    pub repos_failed: u64,
    /// Backfilled records handled so far.
    pub records: u64,
    /// Whether every listed repo is done or failed.
    pub finished: bool,
}

/// A repo's place between the stream and copies of it.
#[derive(Default)]
pub(crate) struct Gate {
    /// Held while a copy is fetched, diffed and queued.
    syncing: tokio::sync::Mutex<()>,
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    /// A copy is needed before the repo's next stream op (and why).
    needed: Option<Origin>,
    /// The rev of the last copy queued: stream ops at or below it are reflected in it.
    synced: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pipeline {
    fn gate(&self, did: &str) -> Arc<Gate> {
        Arc::clone(lock(&self.gates).entry(did.to_string()).or_default())
    }

    fn existing_gate(&self, did: &str) -> Option<Arc<Gate>> {
        lock(&self.gates).get(did).cloned()
    }

    /// Whether the index holds every record of `did` the watcher takes (a copy of the repo
    /// was delivered: a backfill, or a resync since).
    pub(crate) fn has_baseline(&self, did: &str) -> bool {
        let copied = self
            .existing_gate(did)
            .is_some_and(|g| lock(&g.state).synced.is_some());
        self.index.is_enabled() && (copied || self.index.baseline(did).is_some())
    }

    /// The rev at or below which `did`'s ops are reflected in a copy already delivered
    /// (`None`: no copy, deliver everything).
    pub(crate) fn reflected(&self, did: &str) -> Option<String> {
        let synced = self
            .existing_gate(did)
            .and_then(|g| lock(&g.state).synced.clone());
        synced.or_else(|| self.index.baseline(did))
    }

    /// Whether an op of `did` at `rev` is reflected in a copy already delivered.
    pub(crate) fn is_reflected(&self, did: &str, rev: &str) -> bool {
        self.reflected(did).is_some_and(|r| rev <= r.as_str())
    }

    /// Runs the copy `did` needs, if it needs one, before one of its stream ops goes on.
    pub(crate) async fn settle(&self, did: &str) {
        if let Some(gate) = self.existing_gate(did)
            && lock(&gate.state).needed.is_some()
        {
            self.sync_repo(did).await;
        }
    }

    /// Marks `did` as needing a copy: its next stream op waits for it.
    pub(crate) fn needs_copy(&self, did: &str, origin: Origin) {
        let gate = self.gate(did);
        let mut state = lock(&gate.state);
        // A backfill still to come covers a resync.
        if state.needed != Some(Origin::Backfill) {
            state.needed = Some(origin);
        }
    }

    /// Resyncs `did` now if its index is complete; returns whether it did.
    pub(crate) async fn resync_if_complete(&self, did: &str) -> bool {
        if !self.filter.allows_repo(did) || !self.has_baseline(did) {
            return false;
        }
        self.needs_copy(did, Origin::Resync);
        self.sync_repo(did).await;
        true
    }

    /// Copies `did` on a task of its own (its stream ops wait for the copy).
    pub(crate) fn sync_in_background(&self, did: &str) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let did = did.to_string();
        self.dispatcher
            .spawn_until_killed(async move { me.sync_repo(&did).await });
    }

    /// After a gap that may hide ops of any repo (a seq regression, a cursor the source no
    /// longer has): every repo with a complete index is resynced, a few at once, on tasks of
    /// their own; their stream ops wait for their copies.
    pub(crate) fn resync_all_complete(&self) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let dids: Vec<String> = self
            .index
            .complete_repos()
            .into_iter()
            .filter(|did| self.filter.allows_repo(did))
            .collect();
        if dids.is_empty() {
            return;
        }
        info!(
            repos = dids.len(),
            "resyncing every repo with a complete index"
        );
        for did in &dids {
            self.needs_copy(did, Origin::Resync);
        }
        self.dispatcher.spawn_until_killed(async move {
            futures_util::stream::iter(dids)
                .for_each_concurrent(crate::pipeline::RESYNC_CONCURRENCY, |did| {
                    let me = Arc::clone(&me);
                    async move { me.sync_repo(&did).await }
                })
                .await;
        });
    }

    /// Whether the watcher delivers ops on `path` at all (some action passes the filter and
    /// reaches a handler or the tail).
    fn follows_path(&self, path: &str) -> bool {
        let Some((collection, _)) = path.split_once('/') else {
            return false;
        };
        !collection.starts_with('#')
            && [Action::Create, Action::Update, Action::Delete]
                .into_iter()
                .any(|action| {
                    self.filter.allows_op(path, action)
                        && (self.tail.is_some() || self.routes(collection, action).next().is_some())
                })
    }

    /// Fetches a copy of `did`'s repo (verified), diffs it against the index and queues the
    /// difference in key order, if the repo still needs a copy. One copy per repo at a time;
    /// a host that cannot be reached is retried (and reported) until it answers.
    pub(crate) async fn sync_repo(&self, did: &str) {
        let gate = self.gate(did);
        let _syncing = gate.syncing.lock().await;
        let Some(origin) = lock(&gate.state).needed else {
            return;
        };
        // Every op queued for this repo before must be finished, so the index holds it.
        self.dispatcher.lane_idle(did).await;
        let what = "com.atproto.sync.getRepo";
        let repo = self
            .until_verified(what, did, 0, || self.verifier.fetch_repo(did))
            .await;
        let repo = match repo {
            Ok(repo) => repo,
            Err(e) => {
                warn!(did, origin = origin.as_str(), error = %e, "the copy of the repo failed; its records are not delivered");
                {
                    let mut state = lock(&gate.state);
                    state.needed = None;
                }
                if origin == Origin::Backfill {
                    Metrics::inc(&self.metrics.backfill_repos_failed);
                    self.metrics.backfill_check_finished();
                }
                self.metrics.rejected_from(what);
                if let Some(hook) = &self.dispatcher.runtime().on_rejected {
                    let rejected = Rejected::Repo {
                        did: did.to_string(),
                    };
                    self.call_rejected_hook(hook, &rejected, &Rejection::Verification(Arc::new(e)));
                }
                return;
            }
        };
        // Stream commits from here on follow the copy.
        self.verifier.resync(did, &repo.rev, Some(repo.data));
        let known = self.index.repo(did);
        let known = Mst::from_entries(
            known
                .records
                .iter()
                .filter(|(path, _)| self.follows_path(path))
                .map(|(path, cid)| (path.as_str(), *cid)),
        );
        let now = Mst::from_entries(
            repo.records
                .iter()
                .filter(|r| self.follows_path(&r.path))
                .map(|r| (r.path.as_str(), r.cid)),
        );
        let missed = match (known, now) {
            (Ok(known), Ok(now)) => known.diff(&now),
            // Keys come from verified commits and a verified tree: this is a bug, not data.
            (Err(e), _) | (_, Err(e)) => {
                warn!(did, error = %e, "the repo copy cannot be compared with the record index");
                lock(&gate.state).needed = None;
                return;
            }
        };
        let missed_ops = missed.created.len() + missed.updated.len() + missed.deleted.len();
        info!(
            did,
            rev = %repo.rev,
            origin = origin.as_str(),
            records = repo.records.len(),
            ops = missed_ops,
            "repo copied; delivering what the watcher had not seen"
        );
        if origin == Origin::Resync {
            Metrics::inc(&self.metrics.resyncs);
        }
        let rev = repo.rev.clone();
        let time = murmur_sync::tid_micros(&rev)
            .and_then(|us| chrono::DateTime::from_timestamp_micros(us as i64))
            .unwrap_or_else(chrono::Utc::now)
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let resync_hook_repo = self.on_resync.as_ref().map(|_| repo.clone());
        let mut records: HashMap<String, RepoRecord> = repo
            .records
            .into_iter()
            .map(|r| (r.path.clone(), r))
            .collect();
        {
            let mut state = lock(&gate.state);
            state.needed = None;
            state.synced = Some(rev.clone());
        }
        let ops = in_key_order(missed);
        // One more than the ops: the last decrement (after queueing) may finish the repo.
        let remaining = Arc::new(AtomicUsize::new(ops.len() + 1));
        let finish = RepoFinish {
            did: did.to_string(),
            rev: rev.clone(),
            origin,
            remaining: Arc::clone(&remaining),
            index: Arc::clone(&self.index),
            metrics: Arc::clone(&self.metrics),
        };
        let finish = Arc::new(finish);
        for (path, action, cid, prev) in ops {
            let record = cid.and_then(|_| records.remove(&path)).map(|r| r.record);
            let collection = path.split_once('/').map_or("", |(c, _)| c).to_string();
            let handlers: Vec<_> = if self.filter.allows_op(&path, action) {
                self.routes(&collection, action)
                    .chain(self.tail.iter().cloned())
                    .collect()
            } else {
                Vec::new()
            };
            if handlers.is_empty() {
                // Nobody takes this action here: the index still learns the record's state.
                let change = match cid {
                    Some(cid) => IndexChange::Put(&path, cid),
                    None => IndexChange::Remove(&path),
                };
                if let Err(e) = self.index.change(did, change) {
                    warn!(did, path, error = %e, "record index not updated");
                }
                finish.one_done(false);
                continue;
            }
            let data = OpData {
                source: Arc::from(what),
                did: did.to_string(),
                rev: rev.clone(),
                seq: 0,
                time: time.clone(),
                action,
                path,
                cid,
                prev,
                record,
                repo_event: None,
                proof: None,
                frame: None,
                origin,
                provenance: self.provenance(),
            };
            Metrics::inc(&self.metrics.ops_matched);
            let permit = self.dispatcher.reserve().await;
            let finish = Arc::clone(&finish);
            self.dispatcher.submit(Job {
                op: OpEvent::new(data, Arc::clone(&self.state)),
                handlers,
                completion: Completion::Callback(Box::new(move |_| finish.one_done(true))),
                _permit: permit,
            });
        }
        finish.one_done(false);
        if let Some(hook) = &self.on_resync
            && let Some(repo) = resync_hook_repo
            && origin == Origin::Resync
        {
            hook(did, Ok(repo));
        }
    }

    /// The backfill: waits until every source is connected (from then on, the stream holds
    /// every later write), lists the repos, and copies those not finished in an earlier run.
    pub(crate) async fn run_backfill(self: Arc<Self>, config: Backfill, hosts: Vec<String>) {
        let sources = self.metrics.per_source.len() as u64;
        let feeds = self.metrics.sources.load(Ordering::Relaxed) - sources;
        while self.metrics.sources_connected.load(Ordering::Relaxed) < sources + feeds {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let dids = match &config.dids {
            Some(dids) => dids.clone(),
            None => {
                let hosts = if config.hosts.is_empty() {
                    hosts
                } else {
                    config.hosts.clone()
                };
                let mut dids = Vec::new();
                for host in &hosts {
                    dids.extend(self.list_host(host).await);
                }
                dids
            }
        };
        let mut seen = std::collections::HashSet::new();
        let dids: Vec<String> = dids
            .into_iter()
            .filter(|d| self.filter.allows_repo(d) && seen.insert(d.clone()))
            .collect();
        let pending = self.await_copies(&dids);
        self.metrics
            .backfill_repos_done
            .fetch_add((dids.len() - pending.len()) as u64, Ordering::Relaxed);
        self.metrics
            .backfill_repos_total
            .store(dids.len() as u64, Ordering::Relaxed);
        self.metrics.backfill_listed.store(1, Ordering::Relaxed);
        info!(
            repos = dids.len(),
            to_copy = pending.len(),
            "backfill: repos listed"
        );
        self.metrics.backfill_check_finished();
        futures_util::stream::iter(pending)
            .for_each_concurrent(config.concurrency, |did| {
                let me = Arc::clone(&self);
                async move { me.sync_repo(&did).await }
            })
            .await;
    }

    /// Marks the repos of `dids` not finished in an earlier run as waiting for a backfill
    /// copy (their stream ops wait for it); returns them.
    pub(crate) fn await_copies(&self, dids: &[String]) -> Vec<String> {
        let mut pending = Vec::new();
        for did in dids {
            if self.filter.allows_repo(did) && self.index.baseline(did).is_none() {
                self.needs_copy(did, Origin::Backfill);
                pending.push(did.clone());
            }
        }
        pending
    }

    /// Every active repo `host` lists (paged); a host that cannot be reached is retried.
    async fn list_host(&self, host: &str) -> Vec<String> {
        let mut dids = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = self
                .until_verified(host, "", 0, || {
                    self.verifier.list_repos(host, cursor.as_deref())
                })
                .await;
            match page {
                Ok(page) => {
                    dids.extend(page.repos.into_iter().filter(|r| r.active).map(|r| r.did));
                    match page.cursor {
                        Some(next) => cursor = Some(next),
                        None => return dids,
                    }
                }
                Err(e) => {
                    self.report(WatchError::Backfill {
                        source: host.to_string(),
                        error: Arc::new(e),
                    });
                    return dids;
                }
            }
        }
    }
}

/// Counts a copy's ops down; when the last is handled, the repo's index is complete.
struct RepoFinish {
    did: String,
    rev: String,
    origin: Origin,
    remaining: Arc<AtomicUsize>,
    index: Arc<crate::index::RecordIndex>,
    metrics: Arc<Metrics>,
}

impl RepoFinish {
    fn one_done(&self, delivered: bool) {
        if delivered {
            match self.origin {
                Origin::Backfill => Metrics::inc(&self.metrics.backfill_records),
                _ => Metrics::inc(&self.metrics.resync_ops),
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        if let Err(e) = self.index.set_baseline(&self.did, &self.rev) {
            warn!(did = %self.did, error = %e, "record index baseline not stored; the repo is copied again on restart");
        }
        debug!(did = %self.did, rev = %self.rev, origin = self.origin.as_str(), "repo copy handled");
        if self.origin == Origin::Backfill {
            Metrics::inc(&self.metrics.backfill_repos_done);
            self.metrics.backfill_check_finished();
        }
    }
}

/// A diff's ops merged in key order: (path, action, new CID, CID the index had).
fn in_key_order(diff: MstDiff) -> Vec<(String, Action, Option<Cid>, Option<Cid>)> {
    let mut ops: Vec<(String, Action, Option<Cid>, Option<Cid>)> =
        Vec::with_capacity(diff.created.len() + diff.updated.len() + diff.deleted.len());
    ops.extend(
        diff.created
            .into_iter()
            .map(|(path, cid)| (path, Action::Create, Some(cid), None)),
    );
    ops.extend(
        diff.updated
            .into_iter()
            .map(|(path, old, new)| (path, Action::Update, Some(new), Some(old))),
    );
    ops.extend(
        diff.deleted
            .into_iter()
            .map(|(path, old)| (path, Action::Delete, None, Some(old))),
    );
    ops.sort_by(|a, b| a.0.cmp(&b.0));
    ops
}
