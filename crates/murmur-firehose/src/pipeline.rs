//! From a frame's bytes to queued jobs: decode, pre-filter, verify, route.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use murmur_sync::{CommitEvent, Frame, StreamError, SyncError, Verifier};
use tracing::{debug, info, warn};

use crate::dispatch::{Dispatcher, HandlerEntry, Job};
use crate::op::{OpData, StateMap};
use crate::watcher::{GapHook, ResyncHook};
use crate::{Filter, Gap, GapKind, Metrics, OpEvent, Rejection, SourceError};

/// Repo re-fetches (`getRepo`) running at once, across DIDs.
pub(crate) const RESYNC_CONCURRENCY: usize = 4;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Everything shared by the source readers.
pub(crate) struct Pipeline {
    pub filter: Filter,
    pub handlers: Vec<Arc<HandlerEntry>>,
    pub tail: Option<Arc<HandlerEntry>>,
    pub state: Arc<StateMap>,
    pub verifier: Arc<Verifier>,
    pub dispatcher: Arc<Dispatcher>,
    pub on_gap: Option<GapHook>,
    pub on_resync: Option<ResyncHook>,
    /// DIDs whose repo is being re-fetched.
    pub resyncing: Arc<Mutex<HashSet<String>>>,
    /// Bounds concurrent repo re-fetches.
    pub resync_slots: Arc<tokio::sync::Semaphore>,
    pub metrics: Arc<Metrics>,
}

impl Pipeline {
    /// Handles one frame of source `index`. `cursor` is the last seq read from that source.
    /// An `Err` asks the reader to reconnect (after an error frame).
    pub(crate) async fn process(
        &self,
        index: usize,
        url: &str,
        bytes: &[u8],
        cursor: &mut Option<i64>,
    ) -> Result<(), SourceError> {
        Metrics::inc(&self.metrics.events_in);
        let frame = match Frame::decode(bytes) {
            Ok(frame) => frame,
            Err(SyncError::Stream(e)) => return Err(self.stream_error(url, e, cursor)),
            Err(e) => {
                // A frame we cannot decode has no trustworthy seq: count it, report, go on.
                Metrics::inc(&self.metrics.rejected);
                warn!(source = url, error = %e, "undecodable frame skipped");
                return Ok(());
            }
        };
        if let Some(seq) = frame.seq() {
            if let Some(last) = *cursor
                && seq <= last
            {
                self.gap(
                    url,
                    GapKind::SeqRegression { last, now: seq },
                    "the source's seq went backwards".into(),
                );
            }
            *cursor = Some(seq);
            self.metrics.last_seq_seen.store(seq, Ordering::Relaxed);
        }
        match frame {
            Frame::Commit(commit) => self.commit(index, url, &commit).await,
            Frame::Sync(sync) => {
                if let Err(e) = self.verifier.verify_sync(&sync).await {
                    Metrics::inc(&self.metrics.rejected);
                    warn!(source = url, did = %sync.did, error = %e, "#sync rejected");
                }
                self.finish_event(index, sync.seq);
            }
            Frame::Identity(identity) => {
                self.verifier.on_identity(&identity.did);
                self.finish_event(index, identity.seq);
            }
            Frame::Account(account) => self.finish_event(index, account.seq),
            Frame::Info(info) => {
                if info.is_outdated_cursor() {
                    self.gap(
                        url,
                        GapKind::OutdatedCursor,
                        info.message.unwrap_or_default(),
                    );
                }
            }
            Frame::Unknown { t } => debug!(source = url, t, "unknown message type ignored"),
        }
        Ok(())
    }

    async fn commit(&self, index: usize, url: &str, commit: &CommitEvent) {
        let seq = commit.seq;
        let repo_allowed = self.filter.allows_repo(&commit.repo);
        let wanted = repo_allowed
            && commit.any_op(|op| {
                self.filter.allows_op(&op.path, op.action)
                    && (self.tail.is_some()
                        || self.routes(op.collection(), op.action).next().is_some())
            });
        if !wanted {
            // Nobody wants it: skip the CAR, but keep the repo's rev chain current.
            if let Err(e) = self.verifier.observe_commit(commit) {
                self.chain_problem(url, commit, &e);
            }
            self.finish_event(index, seq);
            return;
        }
        let verified = match self.verifier.verify_commit(commit).await {
            Ok(verified) => verified,
            Err(e) => {
                self.reject_commit(url, commit, &e);
                self.finish_event(index, seq);
                return;
            }
        };
        if let Some(reason) = &verified.chain_break {
            // The commit is good and is delivered; what came before it was missed.
            self.gap(
                url,
                GapKind::ChainBreak {
                    did: commit.repo.clone(),
                },
                reason.clone(),
            );
        }
        let mut jobs = Vec::new();
        for op in verified.ops {
            if !self.filter.allows_op(&op.path, op.action) {
                continue;
            }
            let collection = op.collection().to_string();
            let handlers: Vec<_> = self
                .routes(&collection, op.action)
                .chain(self.tail.iter().cloned())
                .collect();
            if handlers.is_empty() {
                continue;
            }
            let data = OpData {
                source: Arc::from(url),
                did: verified.repo.clone(),
                rev: verified.rev.clone(),
                seq,
                time: verified.time.clone(),
                action: op.action,
                path: op.path,
                cid: op.cid.map(|c| c.to_string()),
                prev: op.prev.map(|c| c.to_string()),
                record: op.record,
            };
            jobs.push((OpEvent::new(data, Arc::clone(&self.state)), handlers));
        }
        let event = self.dispatcher.runtime().progress[index]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .begin(seq, jobs.len());
        for (op, handlers) in jobs {
            Metrics::inc(&self.metrics.ops_matched);
            // Waits while the queue is full: the socket is read no faster than handlers run.
            let permit = self.dispatcher.reserve().await;
            self.dispatcher.submit(Job {
                op,
                handlers,
                source: index,
                event,
                _permit: permit,
            });
        }
    }

    fn routes<'a>(
        &'a self,
        collection: &'a str,
        action: murmur_sync::Action,
    ) -> impl Iterator<Item = Arc<HandlerEntry>> + 'a {
        self.handlers
            .iter()
            .filter(move |h| h.handler.route().matches(collection, action))
            .cloned()
    }

    /// An event with no ops to run is done as soon as it is read.
    fn finish_event(&self, index: usize, seq: i64) {
        self.dispatcher.runtime().progress[index]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .begin(seq, 0);
    }

    fn chain_problem(&self, url: &str, commit: &CommitEvent, e: &SyncError) {
        if e.is_desync() {
            self.gap(
                url,
                GapKind::ChainBreak {
                    did: commit.repo.clone(),
                },
                e.to_string(),
            );
        }
    }

    /// Every op of a commit that failed verification is counted and reported, never handled.
    fn reject_commit(&self, url: &str, commit: &CommitEvent, e: &SyncError) {
        warn!(source = url, did = %commit.repo, seq = commit.seq, error = %e, "commit failed verification; its ops never reach handlers");
        let rejection = Rejection::Verification(e.to_string());
        for op in &commit.ops {
            Metrics::inc(&self.metrics.rejected);
            if let Some(hook) = &self.dispatcher.runtime().on_rejected {
                let data = OpData {
                    source: Arc::from(url),
                    did: commit.repo.clone(),
                    rev: commit.rev.clone(),
                    seq: commit.seq,
                    time: commit.time.clone(),
                    action: op.action,
                    path: op.path.clone(),
                    cid: op.cid.map(|c| c.to_string()),
                    prev: op.prev.map(|c| c.to_string()),
                    record: None,
                };
                hook(&OpEvent::new(data, Arc::clone(&self.state)), &rejection);
            }
        }
    }

    fn stream_error(&self, url: &str, e: StreamError, cursor: &mut Option<i64>) -> SourceError {
        match &e {
            StreamError::FutureCursor { .. } => {
                self.gap(url, GapKind::FutureCursor, e.to_string());
                // Our cursor is ahead of the server: continue from its live stream.
                *cursor = None;
            }
            StreamError::OutdatedCursor { .. } => {
                self.gap(url, GapKind::OutdatedCursor, e.to_string());
            }
            StreamError::ConsumerTooSlow { .. } | StreamError::Other { .. } => {}
        }
        SourceError::Closed(Some(format!("error frame: {e}")))
    }

    fn gap(&self, url: &str, kind: GapKind, detail: String) {
        Metrics::inc(&self.metrics.gaps);
        let gap = Gap {
            source: url.to_string(),
            kind,
            detail,
        };
        warn!(source = url, gap = ?gap.kind, detail = %gap.detail, "gap");
        if let Some(hook) = &self.on_gap {
            hook(&gap);
        }
        if let (GapKind::ChainBreak { did }, Some(hook)) = (&gap.kind, &self.on_resync) {
            self.resync(did, hook);
        }
    }

    /// Re-fetches a repo after a chain break: only repos the filter lets through, one fetch
    /// per DID at a time, at most [`RESYNC_CONCURRENCY`] at once, stopped with the watcher.
    fn resync(&self, did: &str, hook: &ResyncHook) {
        if !self.filter.allows_repo(did) {
            return;
        }
        if !lock(&self.resyncing).insert(did.to_string()) {
            debug!(did, "a re-fetch of this repo is already under way");
            return;
        }
        let (did, hook, verifier) = (
            did.to_string(),
            Arc::clone(hook),
            Arc::clone(&self.verifier),
        );
        let (slots, resyncing) = (Arc::clone(&self.resync_slots), Arc::clone(&self.resyncing));
        self.dispatcher.spawn_until_killed(async move {
            let _slot = slots.acquire_owned().await;
            let repo = verifier.fetch_repo(&did).await;
            lock(&resyncing).remove(&did);
            match &repo {
                Ok(repo) => {
                    info!(did = %did, rev = %repo.rev, records = repo.records.len(), "repo re-fetched after a chain break")
                }
                Err(e) => {
                    warn!(did = %did, error = %e, "repo re-fetch after a chain break failed")
                }
            }
            hook(&did, repo);
        });
    }
}
