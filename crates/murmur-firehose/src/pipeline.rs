//! From a frame's bytes to queued jobs: decode, pre-filter, verify, route.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use murmur_sync::{CommitEvent, Frame, StreamError, SyncError, SyncEvent, Verifier};
use tracing::{debug, error, info, warn};

use crate::dispatch::{Completion, Dispatcher, HandlerEntry, Job};
use crate::hooks::{ErrorHook, GapHook, RejectedHook, ResyncHook};
use crate::op::{ACCOUNT_EVENTS, IDENTITY_EVENTS, OpData, RepoEvent, StateMap};
use crate::progress::EventToken;
use crate::{
    Action, Backoff, Filter, Gap, GapKind, Metrics, OpEvent, Rejected, Rejection, SourceError,
    WatchError,
};

/// Repo re-fetches (`getRepo`) running at once, across DIDs.
pub(crate) const RESYNC_CONCURRENCY: usize = 4;

/// The largest seq a server sends: atproto integers stay within 2^53 - 1 (the range every
/// client, JavaScript included, reads exactly).
pub const MAX_SEQ: i64 = (1 << 53) - 1;

/// How far one frame's seq may jump ahead of the previous frame's on the same connection
/// before the frame is taken for a forgery (default of
/// [`WatcherBuilder::max_seq_jump`](crate::WatcherBuilder::max_seq_jump)). Servers number
/// every event they send; even a relay skipping filtered events does not jump this far
/// between two frames.
pub const DEFAULT_MAX_SEQ_JUMP: i64 = 1 << 30;

/// Checks a seq read from a source or a cursor store: `Err` says which rule it breaks.
pub(crate) fn check_seq_range(seq: i64) -> Result<(), String> {
    if seq < 0 {
        Err("a seq is never negative".into())
    } else if seq > MAX_SEQ {
        Err(format!("a seq never exceeds 2^53 - 1 ({MAX_SEQ})"))
    } else {
        Ok(())
    }
}

/// An event of one repo read from a source, waiting to be handled in that repo's order.
pub(crate) struct ReadEvent {
    /// The source's index.
    pub index: usize,
    /// The source's URL.
    pub url: Arc<str>,
    /// A `#commit`, `#sync`, `#identity` or `#account` frame.
    pub frame: Frame,
    /// Its place in the source's progress, begun with one unit of work: handling it.
    pub token: EventToken,
    /// The frame's bytes as read, when the watcher keeps frames.
    pub raw: Option<Arc<[u8]>>,
}

impl ReadEvent {
    /// The repo the event is about.
    pub(crate) fn did(&self) -> &str {
        self.frame.did().unwrap_or_default()
    }
}

/// Which event of which source a piece of work belongs to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EventRef {
    index: usize,
    token: EventToken,
}

/// Where a source's reader is.
#[derive(Debug, Default)]
pub(crate) struct ReadPosition {
    /// The last seq read: where a reconnect asks to continue from.
    pub cursor: Option<i64>,
    /// The last seq read on the current connection (`None` right after connecting).
    pub connection_last: Option<i64>,
}

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
    pub on_error: Option<ErrorHook>,
    /// Retries of verifications that failed for a passing reason (a host unreachable).
    pub verify_retry: Backoff,
    /// See [`DEFAULT_MAX_SEQ_JUMP`].
    pub max_seq_jump: i64,
    /// Whether ops carry their commit's CAR slice ([`OpData::proof`]).
    pub keep_proofs: bool,
    /// Whether ops carry their event's original frame ([`OpData::frame`]).
    pub keep_frames: bool,
    /// Events of a DID are taken only from its own PDS (see
    /// [`WatcherBuilder::authoritative_hosts`](crate::WatcherBuilder::authoritative_hosts)).
    pub authoritative_hosts: bool,
    /// DIDs whose repo is being re-fetched.
    pub resyncing: Arc<Mutex<HashSet<String>>>,
    /// Repos whose last `#account` event said they are not active, with the status given:
    /// their commits are not delivered until an `#account` event says they are active again.
    pub inactive: Mutex<HashMap<String, String>>,
    /// Bounds concurrent repo re-fetches.
    pub resync_slots: Arc<tokio::sync::Semaphore>,
    /// The cursor store, for [`Pipeline::anchor_cursor`].
    pub cursor_store: Option<Arc<dyn crate::CursorStore>>,
    pub metrics: Arc<Metrics>,
    /// What handlers have seen of each repo (shared with the dispatcher's runtime).
    pub index: Arc<crate::index::RecordIndex>,
    /// Each repo's place between the stream and copies of it (see `backfill.rs`).
    pub gates: Mutex<HashMap<String, Arc<crate::backfill::Gate>>>,
    /// The pipeline itself, for work it starts on tasks of their own.
    pub me: std::sync::Weak<Pipeline>,
}

impl Pipeline {
    /// The provenance of the ops this pipeline verifies itself: unverified at
    /// [`VerifyLevel::None`](murmur_sync::VerifyLevel::None) (no signature is checked).
    pub(crate) fn provenance(&self) -> crate::Provenance {
        match self.verifier.level() {
            murmur_sync::VerifyLevel::None => crate::Provenance::Unverified,
            _ => crate::Provenance::Verified,
        }
    }

    /// Reads one frame of source `index`: decodes it, checks its seq and handles what
    /// concerns the whole stream (`#info`, gaps in the seqs). An event of one repo is
    /// returned, registered in the source's progress, for [`Pipeline::handle`] to run in
    /// that repo's order. An `Err` asks the reader to reconnect (after an error frame).
    pub(crate) async fn read(
        &self,
        index: usize,
        url: &Arc<str>,
        bytes: &murmur_sync::Bytes,
        position: &mut ReadPosition,
    ) -> Result<Option<ReadEvent>, SourceError> {
        self.metrics.frame_in(index);
        let shared_url = url;
        let frame = match Frame::decode(bytes) {
            Ok(frame) => frame,
            Err(SyncError::Stream(e)) => return Err(self.stream_error(url, e, position)),
            Err(e) => {
                // A frame we cannot decode has no trustworthy seq: count it, report, go on.
                self.metrics.rejected_from(url);
                self.report(WatchError::UndecodableFrame {
                    source: url.to_string(),
                    error: Arc::new(e),
                });
                return Ok(None);
            }
        };
        let url: &str = url;
        if let Some(seq) = frame.seq() {
            if let Err(reason) = self.check_seq(seq, position.connection_last) {
                // A seq no server sends must not become the cursor: skip the frame.
                self.metrics.rejected_from(url);
                self.report(WatchError::InvalidSeq {
                    source: url.to_string(),
                    seq,
                    previous: position.connection_last,
                    reason,
                });
                return Ok(None);
            }
            if let Some(last) = position.cursor
                && seq <= last
            {
                self.gap(
                    url,
                    GapKind::SeqRegression { last, now: seq },
                    "the source's seq went backwards".into(),
                );
            }
            let first = position.cursor.is_none();
            position.cursor = Some(seq);
            position.connection_last = Some(seq);
            self.metrics.seq_seen(index, seq);
            if first {
                self.anchor_cursor(url, seq).await;
            }
        }
        match frame {
            Frame::Info(info) => {
                if info.is_outdated_cursor() {
                    self.gap(
                        url,
                        GapKind::OutdatedCursor,
                        info.message.unwrap_or_default(),
                    );
                }
                Ok(None)
            }
            Frame::Unknown { t } => {
                debug!(source = url, t, "unknown message type ignored");
                Ok(None)
            }
            frame => {
                let seq = frame.seq().unwrap_or_default();
                let token = lock(&self.dispatcher.runtime().progress[index]).begin(seq, 1);
                Ok(Some(ReadEvent {
                    index,
                    url: Arc::clone(shared_url),
                    frame,
                    token,
                    raw: self.keep_frames.then(|| Arc::from(&bytes[..])),
                }))
            }
        }
    }

    /// Handles one event of one repo, read by [`Pipeline::read`]: after the repo's earlier
    /// events, independently of other repos' events.
    pub(crate) async fn handle(&self, event: ReadEvent) {
        let ReadEvent {
            index,
            url,
            frame,
            token,
            raw,
        } = event;
        let ev = EventRef { index, token };
        let shared_url = url;
        let url: &str = &shared_url;
        if self.authoritative_hosts
            && let Some(did) = frame.did()
            && self.filter.allows_repo(did)
        {
            let seq = frame.seq().unwrap_or_default();
            let checked = self
                .until_verified(url, did, seq, || self.check_host(url, did))
                .await;
            if let Err(e) = checked {
                match &frame {
                    Frame::Commit(commit) => self.reject_commit(url, commit, e),
                    Frame::Sync(sync) => self.reject_sync(url, sync, e),
                    _ => {
                        warn!(source = url, did, seq, error = %e, "event not taken");
                        self.metrics.rejected_from(url);
                    }
                }
                self.finish_event(ev);
                return;
            }
        }
        match frame {
            Frame::Commit(commit) => self.commit(ev, &shared_url, &commit, raw).await,
            Frame::Sync(sync) if !self.filter.allows_repo(&sync.did) => {
                // A repo nobody watches: keep its chain current without verifying (as for
                // its commits), so a host that cannot resolve it never holds the stream.
                self.verifier.resync(&sync.did, &sync.rev, None);
                self.finish_event(ev);
            }
            Frame::Sync(sync) => {
                let verified = self
                    .until_verified(url, &sync.did, sync.seq, || {
                        self.verifier.verify_sync(&sync)
                    })
                    .await;
                match verified {
                    Err(e) => self.reject_sync(url, &sync, e),
                    // The repo changed in ways the stream does not show: copy it again.
                    Ok(_) => {
                        self.resync_if_complete(&sync.did).await;
                        if self.keep_frames {
                            // Passed on for a relay, after the copy.
                            let event = RepoEvent::Sync {
                                rev: sync.rev.clone(),
                            };
                            let mut data =
                                OpData::repo_event(url, &sync.did, sync.seq, &sync.time, event);
                            data.frame = raw;
                            self.repo_event(ev, data).await;
                            return;
                        }
                    }
                }
                self.finish_event(ev);
            }
            Frame::Identity(identity) => {
                let event = RepoEvent::Identity {
                    handle: identity.handle.clone(),
                };
                self.note_repo_event(url, &identity.did, &event);
                let mut data =
                    OpData::repo_event(url, &identity.did, identity.seq, &identity.time, event);
                data.frame = raw;
                self.repo_event(ev, data).await;
            }
            Frame::Account(account) => {
                let event = RepoEvent::Account {
                    active: account.active,
                    status: account.status.clone(),
                };
                self.note_repo_event(url, &account.did, &event);
                let mut data =
                    OpData::repo_event(url, &account.did, account.seq, &account.time, event);
                data.frame = raw;
                self.repo_event(ev, data).await;
            }
            // Not returned by `read`.
            Frame::Info(_) | Frame::Unknown { .. } => self.finish_event(ev),
        }
    }

    /// Whether the source at `url` is `did`'s PDS (see `authoritative_hosts`).
    async fn check_host(&self, url: &str, did: &str) -> Result<(), SyncError> {
        let identity = self.verifier.resolver().resolve(did).await?;
        let source_host = authority(url);
        match identity.pds.as_deref() {
            Some(pds) if source_host.is_some() && authority(pds) == source_host => Ok(()),
            pds => Err(SyncError::NotAuthoritative {
                did: did.to_string(),
                source_host: source_host.unwrap_or_else(|| url.to_string()),
                pds: pds.unwrap_or("none").to_string(),
            }),
        }
    }

    fn check_seq(&self, seq: i64, previous: Option<i64>) -> Result<(), String> {
        check_seq_range(seq)?;
        match previous {
            Some(previous) if seq.abs_diff(previous) > self.max_seq_jump.unsigned_abs() => {
                Err(format!(
                    "it jumps {} {} the previous frame on this connection (at most {} allowed)",
                    seq.abs_diff(previous),
                    if seq > previous { "ahead of" } else { "behind" },
                    self.max_seq_jump
                ))
            }
            _ => Ok(()),
        }
    }

    /// Runs `verify` until it succeeds or fails for a reason of the data's own. A passing
    /// failure (a host unreachable) is reported and retried with backoff, forever: the event
    /// is neither delivered nor rejected until it can be verified, and the cursor waits.
    pub(crate) async fn until_verified<T, Fut>(
        &self,
        url: &str,
        did: &str,
        seq: i64,
        mut verify: impl FnMut() -> Fut,
    ) -> Result<T, SyncError>
    where
        Fut: Future<Output = Result<T, SyncError>>,
    {
        let mut attempt = 0u32;
        let mut _waiting = None;
        loop {
            match verify().await {
                Err(e) if e.is_transient() => {
                    // Never faster than 100 ms, whatever the policy says: no hot loop.
                    let retry_in = self
                        .verify_retry
                        .delay(attempt)
                        .unwrap_or(self.verify_retry.max)
                        .max(std::time::Duration::from_millis(100));
                    attempt = attempt.saturating_add(1);
                    _waiting.get_or_insert_with(|| WaitingVerification::new(&self.metrics));
                    self.report(WatchError::VerificationStalled {
                        source: url.to_string(),
                        did: did.to_string(),
                        seq,
                        attempt,
                        retry_in,
                        error: Arc::new(e),
                    });
                    tokio::time::sleep(retry_in).await;
                }
                result => {
                    if attempt > 0 {
                        info!(
                            source = url,
                            did,
                            seq,
                            attempts = attempt + 1,
                            "verification went through after waiting"
                        );
                    }
                    return result;
                }
            }
        }
    }

    /// Logs, counts and hands a [`WatchError`] to the application's hook.
    pub(crate) fn report(&self, error: WatchError) {
        Metrics::inc(&self.metrics.errors);
        log_watch_error(&error);
        if let Some(hook) = &self.on_error
            && std::panic::catch_unwind(AssertUnwindSafe(|| hook(&error))).is_err()
        {
            error!("the on_error hook panicked; the watcher goes on");
        }
    }

    /// Hands an `#identity` or `#account` event to the handlers that take it ([`Identity`](crate::Identity),
    /// [`AccountStatus`](crate::AccountStatus)) and, with `identity_events(true)`, to the
    /// tail: in the DID's lane, in stream order with its commits. The DID filter applies;
    /// collection and action filters do not. `data` is the event as
    /// [`OpData::repo_event`] makes it: its time stands in for a rev, so the idempotency key
    /// (did, time, kind/seq) of one event stays unique when a source's seqs restart.
    async fn repo_event(&self, ev: EventRef, data: OpData) {
        let handlers = match &data.repo_event {
            Some(event) => self.repo_event_handlers(&data.did, event),
            None => Vec::new(),
        };
        if handlers.is_empty() {
            self.finish_event(ev);
            return;
        }
        let op = OpEvent::new(data, Arc::clone(&self.state));
        self.submit(ev, vec![(op, handlers)]).await;
    }

    /// The handlers an `#identity` or `#account` event of `did` goes to: those routed to its
    /// kind and, when the filter asks for such events, the tail. The DID filter applies;
    /// collection and action filters do not. One routing for stream and feed events.
    pub(crate) fn repo_event_handlers(
        &self,
        did: &str,
        event: &RepoEvent,
    ) -> Vec<Arc<HandlerEntry>> {
        if !self.filter.allows_repo(did) {
            return Vec::new();
        }
        let (kind, tail_wants) = match event {
            RepoEvent::Identity { .. } => (IDENTITY_EVENTS, self.filter.identity_events),
            RepoEvent::Account { .. } => (ACCOUNT_EVENTS, self.filter.account_events),
            // Frames for a relay: the tail only, never a handler.
            RepoEvent::Sync { .. } | RepoEvent::EmptyCommit { .. } => {
                return if self.keep_frames {
                    self.tail.iter().cloned().collect()
                } else {
                    Vec::new()
                };
            }
        };
        let tail = self.tail.iter().filter(|_| tail_wants);
        self.routes(kind, Action::Update)
            .chain(tail.cloned())
            .collect()
    }

    /// What the watcher itself learns from an `#identity` or `#account` event of `url`: a
    /// changed identity drops the DID's cached key; an account's status decides whether its
    /// commits are delivered.
    pub(crate) fn note_repo_event(&self, url: &str, did: &str, event: &RepoEvent) {
        match event {
            RepoEvent::Identity { .. } => self.verifier.on_identity(did),
            RepoEvent::Account { active, status } => {
                self.track_account(url, did, *active, status.as_deref())
            }
            RepoEvent::Sync { .. } | RepoEvent::EmptyCommit { .. } => {}
        }
    }

    /// Tracks whether a repo is active, as the sync spec asks of consumers: while an account
    /// is taken down, suspended, deactivated or deleted, its commits are not passed on.
    pub(crate) fn track_account(&self, url: &str, did: &str, active: bool, status: Option<&str>) {
        if !self.filter.allows_repo(did) {
            return;
        }
        if active {
            if lock(&self.inactive).remove(did).is_some() {
                info!(
                    source = url,
                    did, "account active again; its commits are delivered"
                );
            }
            return;
        }
        let status = status.unwrap_or("inactive").to_string();
        info!(
            source = url,
            did, status, "account not active; its commits are not delivered until it is"
        );
        if status == "deleted" {
            self.verifier.forget(did);
        }
        lock(&self.inactive).insert(did.to_string(), status);
    }

    /// Whether the repo's last `#account` event said it is not active.
    pub(crate) fn is_inactive(&self, did: &str) -> bool {
        lock(&self.inactive).contains_key(did)
    }

    async fn commit(
        &self,
        ev: EventRef,
        shared_url: &Arc<str>,
        commit: &CommitEvent,
        raw: Option<Arc<[u8]>>,
    ) {
        let url: &str = shared_url;
        let seq = commit.seq;
        if let Some(status) = lock(&self.inactive).get(&commit.repo) {
            debug!(source = url, did = %commit.repo, seq, status, "commit of an inactive account not delivered");
            Metrics::inc(&self.metrics.inactive_skipped);
            if let Err(e) = self.verifier.observe_commit(commit) {
                self.chain_problem(url, commit, &e);
            }
            self.finish_event(ev);
            return;
        }
        let repo_allowed = self.filter.allows_repo(&commit.repo);
        let wanted = repo_allowed
            && commit.any_op(|op| {
                self.filter.allows_op(&op.path, op.action)
                    && (self.tail.is_some()
                        || self.routes(op.collection(), op.action).next().is_some())
            });
        if repo_allowed && self.is_reflected(&commit.repo, &commit.rev) {
            // A copy of the repo delivered already includes this commit.
            Metrics::inc(&self.metrics.reflected_skipped);
            self.finish_event(ev);
            return;
        }
        if repo_allowed && commit.ops.is_empty() && self.keep_frames && self.tail.is_some() {
            self.empty_commit(ev, url, commit, raw).await;
            return;
        }
        if !wanted {
            // Nobody wants it: skip the CAR, but keep the repo's rev chain current.
            if let Err(e) = self.verifier.observe_commit(commit) {
                self.chain_problem(url, commit, &e);
                if e.is_desync() && repo_allowed && self.has_baseline(&commit.repo) {
                    self.needs_copy(&commit.repo, crate::Origin::Resync);
                    self.sync_in_background(&commit.repo);
                }
            }
            self.finish_event(ev);
            return;
        }
        // A copy this repo needs goes first; it may include this commit.
        self.settle(&commit.repo).await;
        if self.is_reflected(&commit.repo, &commit.rev) {
            Metrics::inc(&self.metrics.reflected_skipped);
            self.finish_event(ev);
            return;
        }
        let verified = self
            .until_verified(url, &commit.repo, seq, || {
                self.verifier.verify_commit(commit)
            })
            .await;
        let verified = match verified {
            Ok(verified) => verified,
            Err(e) => {
                let too_big = commit.too_big;
                self.reject_commit(url, commit, e);
                if too_big {
                    // Its ops could not be proven: a copy of the repo shows what changed.
                    self.resync_if_complete(&commit.repo).await;
                }
                self.finish_event(ev);
                return;
            }
        };
        if let Some(reason) = &verified.chain_break {
            // What came before this commit was missed.
            self.gap(
                url,
                GapKind::ChainBreak {
                    did: commit.repo.clone(),
                },
                reason.clone(),
            );
            if self.resync_if_complete(&commit.repo).await {
                // The copy delivered what was missed, this commit included.
                self.finish_event(ev);
                return;
            }
        }
        let proof = self
            .keep_proofs
            .then(|| Arc::<[u8]>::from(&commit.blocks[..]));
        let mut jobs = Vec::new();
        for op in verified.ops {
            // A collection is an NSID, never `#...`: such a path must not reach the
            // `#identity`/`#account` handlers.
            if op.collection().starts_with('#') || !self.filter.allows_op(&op.path, op.action) {
                continue;
            }
            let handlers: Vec<_> = self
                .routes(op.collection(), op.action)
                .chain(self.tail.iter().cloned())
                .collect();
            if handlers.is_empty() {
                continue;
            }
            let data = OpData {
                source: Arc::clone(shared_url),
                did: verified.repo.clone(),
                rev: verified.rev.clone(),
                seq,
                time: verified.time.clone(),
                action: op.action,
                path: op.path,
                cid: op.cid,
                prev: op.prev,
                record: op.record,
                repo_event: None,
                proof: proof.clone(),
                frame: raw.clone(),
                origin: crate::Origin::Live,
                provenance: self.provenance(),
            };
            jobs.push((OpEvent::new(data, Arc::clone(&self.state)), handlers));
        }
        self.submit(ev, jobs).await;
    }

    /// A commit without ops, for a watcher that keeps frames: verified like any commit, then
    /// passed to the tail as [`RepoEvent::EmptyCommit`] so a relay serves its frame.
    async fn empty_commit(
        &self,
        ev: EventRef,
        url: &str,
        commit: &CommitEvent,
        raw: Option<Arc<[u8]>>,
    ) {
        self.settle(&commit.repo).await;
        let verified = self
            .until_verified(url, &commit.repo, commit.seq, || {
                self.verifier.verify_commit(commit)
            })
            .await;
        match verified {
            Err(e) => {
                self.reject_commit(url, commit, e);
                self.finish_event(ev);
            }
            Ok(verified) => {
                if let Some(reason) = &verified.chain_break {
                    let kind = GapKind::ChainBreak {
                        did: commit.repo.clone(),
                    };
                    self.gap(url, kind, reason.clone());
                    self.resync_if_complete(&commit.repo).await;
                }
                let event = RepoEvent::EmptyCommit {
                    rev: commit.rev.clone(),
                };
                let mut data =
                    OpData::repo_event(url, &commit.repo, commit.seq, &commit.time, event);
                data.frame = raw;
                self.repo_event(ev, data).await;
            }
        }
    }

    /// Queues the jobs of one event; the event is done when all of them are.
    async fn submit(&self, ev: EventRef, jobs: Vec<(OpEvent, Vec<Arc<HandlerEntry>>)>) {
        lock(&self.dispatcher.runtime().progress[ev.index]).resolve(ev.token, jobs.len());
        for (op, handlers) in jobs {
            Metrics::inc(&self.metrics.ops_matched);
            // Waits while the queue is full: the socket is read no faster than handlers run.
            let permit = self.dispatcher.reserve().await;
            self.dispatcher.submit(Job {
                op,
                handlers,
                completion: Completion::Event {
                    source: ev.index,
                    event: ev.token,
                },
                _permit: permit,
            });
        }
    }

    pub(crate) fn routes<'a>(
        &'a self,
        collection: &'a str,
        action: murmur_sync::Action,
    ) -> impl Iterator<Item = Arc<HandlerEntry>> + 'a {
        self.handlers
            .iter()
            .filter(move |h| h.handler.route().matches(collection, action))
            .cloned()
    }

    /// A source started without a cursor (live) reads its first event, `seq`: before anything
    /// of it is handled, `seq - 1` is stored as the source's cursor. Otherwise a watcher that
    /// dies before its first cursor flush would start live again, and lose every event of
    /// the sources written while it was down, some of them after events it had handled.
    async fn anchor_cursor(&self, url: &str, seq: i64) {
        let Some(store) = &self.cursor_store else {
            return;
        };
        let anchor = (seq - 1).max(0);
        let stored = Backoff::retries(5)
            .retry(
                || store.store(url, anchor),
                |e, _, delay| warn!(source = url, error = %e, ?delay, "first cursor not stored; retrying"),
            )
            .await;
        match stored {
            Ok(()) => debug!(source = url, cursor = anchor, "first cursor stored"),
            Err(e) => {
                warn!(source = url, error = %e, "first cursor not stored; it is stored with the next flush")
            }
        }
    }

    /// An event with no ops to run is done as soon as it is read.
    fn finish_event(&self, ev: EventRef) {
        lock(&self.dispatcher.runtime().progress[ev.index]).resolve(ev.token, 0);
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
    fn reject_commit(&self, url: &str, commit: &CommitEvent, e: SyncError) {
        warn!(source = url, did = %commit.repo, seq = commit.seq, error = %e, "commit failed verification; its ops never reach handlers");
        let rejection = Rejection::Verification(Arc::new(e));
        for op in &commit.ops {
            self.metrics.rejected_from(url);
            if let Some(hook) = &self.dispatcher.runtime().on_rejected {
                let data = OpData {
                    source: Arc::from(url),
                    did: commit.repo.clone(),
                    rev: commit.rev.clone(),
                    seq: commit.seq,
                    time: commit.time.clone(),
                    action: op.action,
                    path: op.path.clone(),
                    cid: op.cid,
                    prev: op.prev,
                    record: None,
                    repo_event: None,
                    proof: None,
                    frame: None,
                    origin: crate::Origin::Live,
                    provenance: self.provenance(),
                };
                let op = Rejected::Op(OpEvent::new(data, Arc::clone(&self.state)));
                self.call_rejected_hook(hook, &op, &rejection);
            }
        }
    }

    /// A `#sync` that failed verification is rejected like a commit: counted, logged, and
    /// passed to `on_rejected`. The repo's chain stays where it was, so the next commit
    /// reports the break.
    fn reject_sync(&self, url: &str, sync: &SyncEvent, e: SyncError) {
        warn!(source = url, did = %sync.did, seq = sync.seq, error = %e, "#sync failed verification");
        self.metrics.rejected_from(url);
        if let Some(hook) = &self.dispatcher.runtime().on_rejected {
            let rejected = Rejected::Sync {
                source: Arc::from(url),
                did: sync.did.clone(),
                rev: sync.rev.clone(),
                seq: sync.seq,
            };
            self.call_rejected_hook(hook, &rejected, &Rejection::Verification(Arc::new(e)));
        }
    }

    pub(crate) fn call_rejected_hook(
        &self,
        hook: &RejectedHook,
        rejected: &Rejected,
        rejection: &Rejection,
    ) {
        if std::panic::catch_unwind(AssertUnwindSafe(|| hook(rejected, rejection))).is_err() {
            error!(
                did = rejected.did(),
                seq = rejected.seq(),
                "the on_rejected hook panicked; the watcher goes on"
            );
        }
    }

    fn stream_error(&self, url: &str, e: StreamError, position: &mut ReadPosition) -> SourceError {
        match &e {
            StreamError::FutureCursor { .. } => {
                self.gap(url, GapKind::FutureCursor, e.to_string());
                // Our cursor is ahead of the server: continue from its live stream.
                position.cursor = None;
            }
            StreamError::OutdatedCursor { .. } => {
                self.gap(url, GapKind::OutdatedCursor, e.to_string());
                // Asking again with the same cursor would get the same answer: the gap is
                // reported, continue from the live stream.
                position.cursor = None;
            }
            StreamError::ConsumerTooSlow { .. } | StreamError::Other { .. } => {}
        }
        SourceError::ErrorFrame(e)
    }

    fn gap(&self, url: &str, kind: GapKind, detail: String) {
        self.report_gap(Gap {
            source: url.to_string(),
            kind,
            detail,
        });
    }

    /// Counts, logs and hands a gap to the application's hooks (`on_gap`, and `on_resync`
    /// for a chain break).
    pub(crate) fn report_gap(&self, gap: Gap) {
        Metrics::inc(&self.metrics.gaps);
        warn!(source = %gap.source, gap = ?gap.kind, detail = %gap.detail, "gap");
        if let Some(hook) = &self.on_gap
            && std::panic::catch_unwind(AssertUnwindSafe(|| hook(&gap))).is_err()
        {
            error!("the on_gap hook panicked; the watcher goes on");
        }
        match (&gap.kind, &self.on_resync) {
            // A repo with a complete index is resynced through it (and `on_resync` called
            // with the copy); without one only the hook can reconcile.
            (GapKind::ChainBreak { did }, Some(hook)) if !self.has_baseline(did) => {
                self.resync(did, hook);
            }
            (
                GapKind::SeqRegression { .. }
                | GapKind::OutdatedCursor
                | GapKind::FutureCursor
                | GapKind::Upstream { .. },
                _,
            ) => self.resync_all_complete(),
            _ => {}
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

/// Counts one event waiting for a verification that failed for a passing reason.
struct WaitingVerification(Arc<Metrics>);

impl WaitingVerification {
    fn new(metrics: &Arc<Metrics>) -> Self {
        metrics
            .verifications_waiting
            .fetch_add(1, Ordering::Relaxed);
        WaitingVerification(Arc::clone(metrics))
    }
}

impl Drop for WaitingVerification {
    fn drop(&mut self) {
        self.0.verifications_waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One log line per [`WatchError`], under the watcher's target, with a stable message and the
/// details as fields (`RUST_LOG=murmur_firehose::watcher=warn` shows them all).
fn log_watch_error(error: &WatchError) {
    const TARGET: &str = "murmur_firehose::watcher";
    match error {
        WatchError::Connect { source, error } => {
            warn!(target: TARGET, source, error = %error, "connect failed")
        }
        WatchError::Disconnected { source, error } => {
            warn!(target: TARGET, source, reason = %error, "disconnected")
        }
        WatchError::ErrorFrame {
            source,
            error,
            repeated,
        } => {
            warn!(target: TARGET, source, error = %error, repeated, "the server sent an error frame")
        }
        WatchError::UndecodableFrame { source, error } => {
            warn!(target: TARGET, source, error = %error, "undecodable frame skipped")
        }
        WatchError::InvalidSeq {
            source,
            seq,
            previous,
            reason,
        } => {
            warn!(target: TARGET, source, seq, ?previous, reason = %reason, "frame with an impossible seq skipped")
        }
        WatchError::VerificationStalled {
            source,
            did,
            seq,
            attempt,
            retry_in,
            error,
        } => {
            warn!(target: TARGET, source, did, seq, attempt, ?retry_in, error = %error, "verification waits for an unreachable host; the event is kept")
        }
        WatchError::Feed { source, error } => {
            warn!(target: TARGET, source, error = %error, "feed trouble")
        }
        WatchError::Backfill { source, error } => {
            warn!(target: TARGET, source, error = %error, "backfill could not list the host's repos")
        }
    }
}

/// The `host:port` a URL points at, lowercase, with the scheme's default port made explicit
/// (`ws`/`http` 80, `wss`/`https` 443), so `https://pds.example` and
/// `wss://pds.example:443/xrpc/...` compare equal. `None` without a known scheme.
fn authority(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => 80,
        "https" | "wss" => 443,
        _ => return None,
    };
    let authority = rest.split(['/', '?', '#']).next()?.to_ascii_lowercase();
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let has_port = match authority.rfind(':') {
        Some(i) => !authority[i..].contains(']'),
        None => false,
    };
    Some(if has_port {
        authority
    } else {
        format!("{authority}:{default_port}")
    })
}

#[cfg(test)]
mod authority_tests {
    use super::authority;

    #[test]
    fn authorities_compare_across_schemes_and_default_ports() {
        let same = |a: &str, b: &str| authority(a).is_some() && authority(a) == authority(b);
        assert!(same(
            "https://PDS.example",
            "wss://pds.example:443/xrpc/com.atproto.sync.subscribeRepos"
        ));
        assert!(same("http://localhost:2583", "ws://localhost:2583/xrpc/x"));
        assert!(same("http://[::1]:80/", "ws://[::1]/x"));
        assert!(!same("https://pds.example", "ws://pds.example/xrpc"));
        assert!(!same("https://pds.example", "https://pds.example.evil"));
        assert!(!same("https://a@pds.example", "https://pds.example"));
        assert_eq!(authority("pds.example"), None);
        assert_eq!(authority("ftp://pds.example"), None);
    }
}
