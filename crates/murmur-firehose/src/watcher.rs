//! The watcher: sources in, verified ops out to handlers, cursor persisted behind them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::dispatch::{Dispatcher, HandlerEntry, Runtime};
use crate::feed::{Feed, FeedSink};
use crate::filter::CollectionPattern;
use crate::handler::Erased;
use crate::hooks::{ErrorHook, GapHook, RejectedHook, ResyncHook};
use crate::op::StateMap;
use crate::pipeline::{DEFAULT_MAX_SEQ_JUMP, Pipeline, check_seq_range};
use crate::progress::Progress;
use crate::reader::{SourceReader, stopped};
use crate::repo_lanes::RepoLanes;
use crate::{
    Action, Backoff, CursorStore, DeadLetterStore, DedupStore, DidAllowlist, FileCursorStore,
    FileDeadLetterStore, FileDedupStore, Filter, FirehoseError, Gap, Handler,
    MemoryDeadLetterStore, Metrics, Rejected, Source, SubscribeRepos, WatchError,
};

/// Configures a [`Watcher`]. Start with [`Watcher::builder`].
pub struct WatcherBuilder {
    sources: Vec<Arc<dyn Source>>,
    feeds: Vec<Arc<dyn Feed>>,
    jetstreams: Vec<String>,
    jetstream_proofs: bool,
    filter: Filter,
    handlers: Vec<Box<dyn Handler>>,
    state: StateMap,
    cursor_store: Option<Arc<dyn CursorStore>>,
    dedup: Option<Arc<dyn DedupStore>>,
    dead_letters: Option<Arc<dyn DeadLetterStore>>,
    state_dir: Option<PathBuf>,
    verifier: Option<murmur_sync::Verifier>,
    verification: murmur_sync::VerifyLevel,
    plc_url: Option<String>,
    reconnect: Backoff,
    healthy_after: Duration,
    retry: Backoff,
    timeout: Option<Duration>,
    queue_capacity: usize,
    concurrency: usize,
    handler_concurrency: Option<usize>,
    start_cursor: Option<i64>,
    on_rejected: Option<RejectedHook>,
    on_gap: Option<GapHook>,
    on_resync: Option<ResyncHook>,
    on_error: Option<ErrorHook>,
    connect_timeout: Duration,
    verification_retry: Backoff,
    max_seq_jump: i64,
    keep_proofs: bool,
    keep_frames: bool,
    authoritative_hosts: bool,
    tail: Option<Box<dyn Handler>>,
    backfill: Option<crate::Backfill>,
    record_index: Option<bool>,
    repo_concurrency: Option<usize>,
}

impl Default for WatcherBuilder {
    fn default() -> Self {
        WatcherBuilder {
            sources: Vec::new(),
            feeds: Vec::new(),
            jetstreams: Vec::new(),
            jetstream_proofs: false,
            filter: Filter::default(),
            handlers: Vec::new(),
            state: StateMap::default(),
            cursor_store: None,
            dedup: None,
            dead_letters: None,
            state_dir: None,
            verifier: None,
            verification: murmur_sync::VerifyLevel::Full,
            plc_url: None,
            reconnect: Backoff::default(),
            healthy_after: Duration::from_secs(30),
            retry: Backoff::retries(5),
            timeout: None,
            queue_capacity: 1024,
            concurrency: 64,
            handler_concurrency: None,
            start_cursor: None,
            on_rejected: None,
            on_gap: None,
            on_resync: None,
            on_error: None,
            connect_timeout: Duration::from_secs(20),
            verification_retry: Backoff::default(),
            max_seq_jump: DEFAULT_MAX_SEQ_JUMP,
            keep_proofs: false,
            keep_frames: false,
            authoritative_hosts: false,
            tail: None,
            backfill: None,
            record_index: None,
            repo_concurrency: None,
        }
    }
}

impl WatcherBuilder {
    /// Watches a PDS's own `subscribeRepos` (call once per host: each keeps its own cursor).
    pub fn pds(self, url: &str) -> Self {
        self.source(SubscribeRepos::new(url))
    }

    /// Watches a relay's `subscribeRepos`.
    pub fn relay(self, url: &str) -> Self {
        self.source(SubscribeRepos::new(url))
    }

    /// Adds any [`Source`].
    pub fn source(mut self, source: impl Source) -> Self {
        self.sources.push(Arc::new(source));
        self
    }

    /// Adds a [`Feed`]: ops delivered one by one and acknowledged to it when their handlers
    /// are done (e.g. murmur-bus's NATS JetStream consumer). A watcher may have feeds and
    /// sources together; feeds keep no cursor here (their upstream does), except a
    /// [`JetstreamSource`](crate::JetstreamSource), which keeps its time cursor in the cursor
    /// store.
    pub fn feed(mut self, feed: impl Feed) -> Self {
        self.feeds.push(Arc::new(feed));
        self
    }

    /// Watches a [Jetstream](https://github.com/bluesky-social/jetstream) (`/subscribe`, v1;
    /// `url` with or without the path): fewer bytes than `subscribeRepos` (JSON, no CAR,
    /// compressed, filtered in the server by the watcher's collections and DID allowlist),
    /// but **no proofs**: its ops are [`Provenance::Unverified`](crate::Provenance) unless
    /// [`jetstream_proofs`](Self::jetstream_proofs) is on. Each record must hash to the CID
    /// the event names. The cursor (unix microseconds) is kept under the URL in the cursor
    /// store ([`start_cursor`](Self::start_cursor), a seq, does not apply: see
    /// [`JetstreamSource::start_cursor`](crate::JetstreamSource::start_cursor)). See
    /// [`JetstreamSource`](crate::JetstreamSource), which [`feed`](Self::feed) takes for more
    /// options.
    pub fn jetstream(mut self, url: &str) -> Self {
        self.jetstreams.push(url.to_string());
        self
    }

    /// Whether each op matched from a [`jetstream`](Self::jetstream) is proven from its
    /// author's PDS (`com.atproto.sync.getRecord`, verified with the watcher's verifier)
    /// before its handlers run (default off). An op whose proof fails never reaches a
    /// handler; one a later commit already changed cannot be proven any more and is
    /// rejected too.
    pub fn jetstream_proofs(mut self, on: bool) -> Self {
        self.jetstream_proofs = on;
        self
    }

    /// Only ops of these repos (changeable later through [`Watcher::dids`]).
    pub fn dids(self, dids: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.filter.dids.set(dids);
        self
    }

    /// Only these collections: exact NSIDs or prefixes like `agent.comms.*`.
    pub fn collections(mut self, patterns: impl IntoIterator<Item = impl AsRef<str>>) -> Self {
        self.filter.collections.extend(
            patterns
                .into_iter()
                .map(|p| CollectionPattern::parse(p.as_ref())),
        );
        self
    }

    /// Only these actions.
    pub fn actions(mut self, actions: impl IntoIterator<Item = Action>) -> Self {
        self.filter.actions.extend(actions);
        self
    }

    /// Whether the [`tail`](Self::tail) handler also sees `#identity` and `#account` events
    /// (as ops with paths `#identity/{seq}` and `#account/{seq}`, action `Update`, and
    /// [`OpData::repo_event`](crate::OpData::repo_event) set). Off by default. Handlers
    /// taking [`Identity`](crate::Identity) or [`AccountStatus`](crate::AccountStatus) get
    /// their events either way.
    pub fn identity_events(mut self, on: bool) -> Self {
        self.filter.identity_events = on;
        self.filter.account_events = on;
        self
    }

    /// Adds a handler: any async fn or closure whose arguments are extractors (one of them
    /// [`Record<C>`](crate::Record), [`Created<C>`](crate::Created),
    /// [`Updated<C>`](crate::Updated) or [`Deleted<C>`](crate::Deleted), which fixes the ops it
    /// gets), an async fn with `#[handler]`, a [`Handler::layer`]ed one, or any [`Handler`].
    ///
    /// ```no_run
    /// use murmur_firehose::{Author, Created, HandlerError, OpEvent, Watcher};
    /// # use atrium_api::types::Collection;
    /// # #[derive(Debug)] struct Task;
    /// # #[derive(Debug, serde::Serialize, serde::Deserialize)] struct TaskRecord;
    /// # impl Collection for Task { const NSID: &'static str = "agent.comms.task"; type Record = TaskRecord; }
    /// # impl murmur_lexicon::Validate for TaskRecord { fn validate(&self) -> Result<(), murmur_lexicon::ValidationError> { Ok(()) } }
    ///
    /// async fn on_task(task: Created<Task>, from: Author) -> Result<(), HandlerError> {
    ///     println!("{} posted {}", from.0, task.uri);
    ///     Ok(())
    /// }
    ///
    /// # fn main() -> Result<(), murmur_firehose::FirehoseError> {
    /// let watcher = Watcher::builder()
    ///     .pds("http://localhost:2583")
    ///     .handler(on_task)
    ///     .handler(|task: Created<Task>, op: OpEvent| async move {
    ///         println!("attempt {} for {}", op.attempts(), task.uri);
    ///         Ok(())
    ///     })
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn handler<T: 'static, H: Handler<T>>(mut self, handler: H) -> Self {
        self.handlers.push(Box::new(Erased::new(handler)));
        self
    }

    /// Sees every verified op that passes the filter, whatever its collection (e.g. to tail a
    /// stream): its route is not used. Runs under the same ordering, retry and dead-letter
    /// rules as handlers.
    pub fn tail<T: 'static, H: Handler<T>>(mut self, handler: H) -> Self {
        self.tail = Some(Box::new(Erased::new(handler)));
        self
    }

    /// Shared state for `State<S>` arguments.
    pub fn state<S: Clone + Send + Sync + 'static>(mut self, state: S) -> Self {
        self.state.insert(state);
        self
    }

    /// Keeps cursors, the dedup log and dead letters as files under `dir` (unless a store was
    /// set explicitly): `cursors/`, `dedup.log`, `dead-letters.jsonl`.
    ///
    /// Without a state directory (and without explicit stores) a watcher keeps nothing across
    /// restarts: it starts from [`start_cursor`](Self::start_cursor) or the live stream, has
    /// no dedup store, and keeps dead letters in memory ([`Watcher::dead_letters`]).
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// Where cursors are stored (default: none, or files under [`state_dir`](Self::state_dir)).
    pub fn cursor_store(mut self, store: impl CursorStore) -> Self {
        self.cursor_store = Some(Arc::new(store));
        self
    }

    /// Where finished ops are remembered across restarts.
    pub fn dedup_store(mut self, store: impl DedupStore) -> Self {
        self.dedup = Some(Arc::new(store));
        self
    }

    /// Where failed ops go (default: `dead-letters.jsonl` under the
    /// [`state_dir`](Self::state_dir), or memory without one).
    pub fn dead_letter_store(mut self, store: impl DeadLetterStore) -> Self {
        self.dead_letters = Some(Arc::new(store));
        self
    }

    /// How much of each commit to verify (default [`VerifyLevel::Full`](murmur_sync::VerifyLevel::Full)).
    pub fn verification(mut self, level: murmur_sync::VerifyLevel) -> Self {
        self.verification = level;
        self
    }

    /// The PLC directory used to resolve `did:plc` identities (default: the public one).
    pub fn plc_url(mut self, url: impl Into<String>) -> Self {
        self.plc_url = Some(url.into());
        self
    }

    /// How many repos' events are verified and routed at once. By default, with
    /// verification on, one per thread of the runtime the watcher runs on, at most 4 (a
    /// current-thread runtime: 1); with [`VerifyLevel::None`](murmur_sync::VerifyLevel::None)
    /// (nothing costly to spread), 1.
    ///
    /// Each repo's events are handled in stream order (its rev chain is checked commit after
    /// commit); events of different repos from the same connection are verified in
    /// parallel, on as many of the runtime's threads. With 1, each event is handled before
    /// the next frame is read. Either way the stored cursor never passes an event that is
    /// not finished, and at most 64 events per source wait between the socket and
    /// verification.
    pub fn repo_concurrency(mut self, n: usize) -> Self {
        self.repo_concurrency = Some(n.max(1));
        self
    }

    /// A fully configured verifier (overrides [`verification`](Self::verification) and
    /// [`plc_url`](Self::plc_url)).
    pub fn verifier(mut self, verifier: murmur_sync::Verifier) -> Self {
        self.verifier = Some(verifier);
        self
    }

    /// How long connecting may take, TCP, TLS and WebSocket handshake together, before the
    /// attempt is abandoned and retried with the reconnect backoff (default 20 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How verification is retried when a host it needs cannot be reached (the PLC
    /// directory, the repo's PDS for a proof): default 200 ms doubling to 30 s, jittered. It
    /// never gives up (a `max_attempts` only stops the delay from growing past `max`): the
    /// event waits, unfinished, and reading its source waits with it, so nothing is rejected
    /// or skipped for a host's outage. Each attempt is reported as
    /// [`WatchError::VerificationStalled`].
    pub fn verification_retry(mut self, backoff: Backoff) -> Self {
        self.verification_retry = backoff;
        self
    }

    /// How far one frame's seq may jump ahead of the previous one on the same connection
    /// before the frame is skipped as [`WatchError::InvalidSeq`] (default
    /// [`DEFAULT_MAX_SEQ_JUMP`](crate::DEFAULT_MAX_SEQ_JUMP)). Seqs below 0 or above 2^53 - 1
    /// are always skipped.
    pub fn max_seq_jump(mut self, jump: i64) -> Self {
        self.max_seq_jump = jump.max(1);
        self
    }

    /// Whether each delivered op carries its commit's CAR slice in
    /// [`OpData::proof`](crate::OpData::proof), so it can be passed on with its proof (what
    /// murmur-bus's hub publishes). Off by default: it keeps the slice alive until the
    /// commit's ops are handled.
    pub fn keep_proofs(mut self, on: bool) -> Self {
        self.keep_proofs = on;
        self
    }

    /// Takes a DID's events only from its own PDS: an event whose DID's document names
    /// another `#atproto_pds` endpoint than the source's host is rejected
    /// ([`SyncError::NotAuthoritative`](murmur_sync::SyncError::NotAuthoritative)) before
    /// anything else is done with it, as a relay must for hosts it does not control (a host
    /// could otherwise replay other repos' old commits or speak for their `#identity` and
    /// `#account`). For sources that are PDS hosts, not relays. Off by default.
    pub fn authoritative_hosts(mut self, on: bool) -> Self {
        self.authoritative_hosts = on;
        self
    }

    /// Whether each delivered op carries the original frame of its event in
    /// [`OpData::frame`](crate::OpData::frame), so the verified events can be passed on as
    /// the source sent them (what murmur-bus's relay serves). Off by default: it keeps a copy
    /// of each frame until its event is handled.
    ///
    /// With it on, the tail also gets, for their frames, the verified events that change no
    /// record: [`RepoEvent::Sync`](crate::RepoEvent::Sync) (path `#sync/{seq}`) and
    /// [`RepoEvent::EmptyCommit`](crate::RepoEvent::EmptyCommit) (path `#commit/{seq}`), both
    /// with action `Update` and no CID ([`RepoEvent::is_frame_only`](crate::RepoEvent::is_frame_only)).
    pub fn keep_frames(mut self, on: bool) -> Self {
        self.keep_frames = on;
        self
    }

    /// The reconnect policy (default: 200 ms doubling to 30 s, jittered, never giving up).
    pub fn reconnect(mut self, backoff: Backoff) -> Self {
        self.reconnect = backoff;
        self
    }

    /// The handler retry policy (default: 5 retries, 50 ms doubling to 5 s).
    pub fn retry(mut self, backoff: Backoff) -> Self {
        self.retry = backoff;
        self
    }

    /// A time limit per handler attempt (a timeout counts as retryable).
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Most ops queued or running at once; when full, reading the socket waits (default 1024).
    pub fn queue_capacity(mut self, ops: usize) -> Self {
        self.queue_capacity = ops;
        self
    }

    /// Most DIDs handled at the same time (default 64).
    pub fn concurrency(mut self, dids: usize) -> Self {
        self.concurrency = dids;
        self
    }

    /// Most concurrent calls of each handler (default: no limit of its own).
    pub fn handler_concurrency(mut self, calls: usize) -> Self {
        self.handler_concurrency = Some(calls);
        self
    }

    /// The cursor to start from when no cursor is stored (default: live events only).
    pub fn start_cursor(mut self, seq: i64) -> Self {
        self.start_cursor = Some(seq);
        self
    }

    /// Called with every op, or `#sync` event, that failed verification or lexicon checks.
    pub fn on_rejected(
        mut self,
        hook: impl Fn(&Rejected, &crate::Rejection) + Send + Sync + 'static,
    ) -> Self {
        self.on_rejected = Some(Arc::new(hook));
        self
    }

    /// Called with every [`WatchError`]: failed connects, disconnects, error frames, frames
    /// skipped as untrustworthy, verifications waiting for an unreachable host. They are
    /// logged (tracing, `warn`) and counted either way.
    pub fn on_error(mut self, hook: impl Fn(&WatchError) + Send + Sync + 'static) -> Self {
        self.on_error = Some(Arc::new(hook));
        self
    }

    /// Called with every gap (missed events the application should reconcile from the repo).
    pub fn on_gap(mut self, hook: impl Fn(&Gap) + Send + Sync + 'static) -> Self {
        self.on_gap = Some(Arc::new(hook));
        self
    }

    /// Called with each copy of a repo taken after a gap in its stream (or the error that
    /// stopped it), for applications that want the whole repo.
    ///
    /// When the [record index](Self::record_index) is complete for the repo (it was
    /// [backfilled](Self::backfill)), the watcher itself copies the repo after
    /// a broken rev chain, a `#sync`, a seq regression or an unprovable `tooBig` commit, and
    /// hands the handlers exactly the missed creates, updates and deletes
    /// ([`Origin::Resync`](crate::Origin)); the hook then sees the same copy. Otherwise, after
    /// a broken rev chain ([`GapKind::ChainBreak`](crate::GapKind)) the repo is fetched
    /// (`getRepo` from the DID's PDS, verified at the watcher's level) only for this hook, on
    /// its own task while the stream goes on, and handlers are not called for its records:
    /// compare them with your own state, e.g. by path and CID, to find what the gap hid.
    ///
    /// Only repos the DID filter lets through are fetched, one fetch per DID at a time and a
    /// few at once; the body is capped (`Limits::max_repo_bytes`, 256 MB by default). Fetches
    /// stop with the watcher.
    pub fn on_resync(
        mut self,
        hook: impl Fn(&str, Result<murmur_sync::VerifiedRepo, murmur_sync::SyncError>)
        + Send
        + Sync
        + 'static,
    ) -> Self {
        self.on_resync = Some(Arc::new(hook));
        self
    }

    /// Copies repos when the watcher starts: every record of them that the filters and
    /// handlers take is delivered once, marked [`Origin::Backfill`](crate::Origin), before
    /// the repo's later stream ops; then the stream goes on. See [`Backfill`](crate::Backfill).
    ///
    /// The stream is read from the start: the copies begin once every source is connected
    /// (or from the stored cursor), so nothing written meanwhile is missed, and a stream op
    /// already reflected in a repo's copy (its rev at or below the copy's) is not delivered
    /// again. With a [`state_dir`](Self::state_dir), a restart does not copy again the repos
    /// whose records were all handled, and resumes the others without repeating handled
    /// records. Progress: [`Watcher::backfill_progress`].
    ///
    /// ```no_run
    /// use murmur_firehose::{Backfill, Origin, OpEvent, Watcher};
    ///
    /// # fn main() -> Result<(), murmur_firehose::FirehoseError> {
    /// let watcher = Watcher::builder()
    ///     .pds("http://localhost:2583")
    ///     .collections(["agent.comms.*"])
    ///     .backfill(Backfill::listed())
    ///     .state_dir("./state")
    ///     .tail(|op: OpEvent, origin: Origin| async move {
    ///         println!("{} {} ({})", op.data().action.as_str(), op.uri(), origin.as_str());
    ///         Ok(())
    ///     })
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn backfill(mut self, backfill: crate::Backfill) -> Self {
        self.backfill = Some(backfill);
        self
    }

    /// Whether the watcher keeps its record index (default: on with a
    /// [backfill](Self::backfill), off without): for each repo, the path and CID of every
    /// record its handlers have seen (about 100 bytes a record, in memory and in
    /// `records.log` under the [`state_dir`](Self::state_dir)). With it, a gap in a
    /// backfilled repo's stream (a broken rev chain, a `#sync`, a seq regression, an
    /// unprovable `tooBig` commit) re-runs handlers for exactly the missed creates, updates
    /// and deletes, once, marked [`Origin::Resync`](crate::Origin), and a backfill resumed
    /// after a crash does not repeat records. Without it a backfill still works, but a crash
    /// mid-copy repeats the repo's records on restart.
    pub fn record_index(mut self, on: bool) -> Self {
        self.record_index = Some(on);
        self
    }

    /// Checks the configuration and builds the watcher.
    pub fn build(mut self) -> Result<Watcher, FirehoseError> {
        for url in std::mem::take(&mut self.jetstreams) {
            self.feeds.push(Arc::new(
                crate::JetstreamSource::new(&url)
                    .proofs(self.jetstream_proofs)
                    .reconnect(self.reconnect.clone())
                    .connect_timeout(self.connect_timeout),
            ));
        }
        if self.sources.is_empty() && self.feeds.is_empty() {
            return Err(FirehoseError::Config(
                "no source: add .pds(url), .relay(url), .jetstream(url) or a .feed(..)".into(),
            ));
        }
        if self.handlers.is_empty() && self.tail.is_none() {
            return Err(FirehoseError::Config(
                "no handler: add .handler(..) or .tail(..)".into(),
            ));
        }
        if let Some((h, why)) = self
            .handlers
            .iter()
            .find_map(|h| h.route_error().map(|why| (h, why)))
        {
            return Err(FirehoseError::Config(format!(
                "handler `{}` cannot be routed: {why}",
                h.name()
            )));
        }
        let mut missing: Vec<&str> = Vec::new();
        for h in self.handlers.iter().chain(&self.tail) {
            for (id, name) in h.required_state() {
                if !self.state.contains(id) && !missing.contains(&name) {
                    missing.push(name);
                }
            }
        }
        if !missing.is_empty() {
            return Err(FirehoseError::Config(format!(
                "handlers read State<{}> but the watcher has none: add .state(value)",
                missing.join(">, State<")
            )));
        }
        let cursor_store = self.cursor_store.or_else(|| {
            self.state_dir
                .as_ref()
                .map(|d| Arc::new(FileCursorStore::new(d.join("cursors"))) as Arc<dyn CursorStore>)
        });
        let dedup = match (self.dedup, &self.state_dir) {
            (Some(d), _) => Some(d),
            (None, Some(dir)) => {
                Some(Arc::new(FileDedupStore::open(dir.join("dedup.log"))?) as Arc<dyn DedupStore>)
            }
            (None, None) => None,
        };
        let dead_letters = self.dead_letters.unwrap_or_else(|| match &self.state_dir {
            Some(dir) => Arc::new(FileDeadLetterStore::new(dir.join("dead-letters.jsonl"))),
            None => Arc::new(MemoryDeadLetterStore::default()),
        });
        let keep_index = self.record_index.unwrap_or(self.backfill.is_some());
        let index = Arc::new(match (&self.state_dir, keep_index) {
            (_, false) => crate::index::RecordIndex::disabled(),
            (Some(dir), true) => crate::index::RecordIndex::open(dir.join("records.log"))?,
            (None, true) => crate::index::RecordIndex::in_memory(),
        });
        let metrics = Arc::new(Metrics::for_sources(self.sources.iter().map(|s| s.url())));
        metrics.sources.store(
            (self.sources.len() + self.feeds.len()) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let runtime = Arc::new(Runtime {
            metrics: Arc::clone(&metrics),
            dedup,
            dead_letters,
            progress: self
                .sources
                .iter()
                .map(|_| Mutex::new(Progress::default()))
                .collect(),
            on_rejected: self.on_rejected,
            index: Arc::clone(&index),
        });
        let entry = |handler: Box<dyn Handler>| {
            Arc::new(HandlerEntry::new(
                handler,
                &self.retry,
                self.timeout,
                self.handler_concurrency,
                &metrics,
            ))
        };
        let handlers: Vec<_> = self.handlers.into_iter().map(&entry).collect();
        let tail = self.tail.map(&entry);
        let (shutdown, _) = watch::channel(false);
        Ok(Watcher {
            repo_concurrency: self.repo_concurrency,
            sources: self.sources,
            feeds: self.feeds,
            backfill: self.backfill,
            pipeline: Arc::new_cyclic(|me| Pipeline {
                filter: self.filter,
                handlers,
                tail,
                state: Arc::new(self.state),
                verifier: Arc::new(self.verifier.unwrap_or_else(|| {
                    let mut resolver = murmur_sync::IdentityResolver::new();
                    if let Some(url) = self.plc_url {
                        resolver = resolver.with_plc_url(url);
                    }
                    murmur_sync::Verifier::new(Arc::new(resolver)).with_level(self.verification)
                })),
                dispatcher: Arc::new(Dispatcher::new(
                    Arc::clone(&runtime),
                    self.queue_capacity,
                    self.concurrency,
                )),
                on_gap: self.on_gap,
                on_resync: self.on_resync,
                on_error: self.on_error,
                verify_retry: self.verification_retry,
                max_seq_jump: self.max_seq_jump,
                keep_proofs: self.keep_proofs,
                keep_frames: self.keep_frames,
                authoritative_hosts: self.authoritative_hosts,
                resyncing: Arc::default(),
                inactive: Mutex::default(),
                resync_slots: Arc::new(tokio::sync::Semaphore::new(
                    crate::pipeline::RESYNC_CONCURRENCY,
                )),
                cursor_store: cursor_store.clone(),
                metrics,
                index,
                gates: Mutex::default(),
                me: me.clone(),
            }),
            cursor_store,
            start_cursor: self.start_cursor,
            reconnect: self.reconnect,
            connect_timeout: self.connect_timeout,
            healthy_after: self.healthy_after,
            shutdown: Arc::new(shutdown),
        })
    }
}

/// A running or ready-to-run watcher. See the crate docs for an example.
pub struct Watcher {
    backfill: Option<crate::Backfill>,
    sources: Vec<Arc<dyn Source>>,
    feeds: Vec<Arc<dyn Feed>>,
    pipeline: Arc<Pipeline>,
    cursor_store: Option<Arc<dyn CursorStore>>,
    start_cursor: Option<i64>,
    reconnect: Backoff,
    connect_timeout: Duration,
    healthy_after: Duration,
    shutdown: Arc<watch::Sender<bool>>,
    /// Repos whose events are handled at once (see [`WatcherBuilder::repo_concurrency`]);
    /// `None`: the default, decided on the runtime `run` is called on.
    repo_concurrency: Option<usize>,
}

/// The most repos handled at once by default (one per runtime thread up to this).
const DEFAULT_REPO_CONCURRENCY_MAX: usize = 4;

/// Stops a running watcher gracefully: stop reading, drain handlers, persist cursors.
#[derive(Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

impl ShutdownHandle {
    /// Asks the watcher to stop; [`Watcher::run`] returns once it has drained.
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

impl Watcher {
    /// Starts configuring a watcher.
    pub fn builder() -> WatcherBuilder {
        WatcherBuilder::default()
    }

    /// The live metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.pipeline.metrics)
    }

    /// How far the [backfill](WatcherBuilder::backfill) has got.
    pub fn backfill_progress(&self) -> crate::BackfillProgress {
        self.pipeline.metrics.backfill()
    }

    /// The dead-letter store: ops whose handlers failed for good.
    pub fn dead_letters(&self) -> Arc<dyn DeadLetterStore> {
        Arc::clone(&self.pipeline.dispatcher.runtime().dead_letters)
    }

    /// The DID allowlist; changes apply to the next event (and are sent to a Jetstream
    /// source's server as an `options_update`).
    pub fn dids(&self) -> DidAllowlist {
        self.pipeline.filter.dids.clone()
    }

    /// A handle that stops [`run`](Self::run) gracefully.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(Arc::clone(&self.shutdown))
    }

    /// Runs until shut down (or until a source fails for good): reads every source, dispatches,
    /// and persists each source's cursor (the low-water mark of fully handled events).
    ///
    /// Dropping the future before it returns stops everything at once, like a process kill:
    /// handlers in flight are dropped, queued ops are not run, and the cursor is not
    /// flushed again, so a new watcher on the same state resumes from the stored cursor.
    pub async fn run(self) -> Result<(), FirehoseError> {
        let mut on_drop = KillOnDrop {
            dispatcher: Arc::clone(&self.pipeline.dispatcher),
            flusher: None,
        };
        let rt = Arc::clone(self.pipeline.dispatcher.runtime());
        let mut starts = Vec::new();
        for (i, source) in self.sources.iter().enumerate() {
            let stored = match &self.cursor_store {
                Some(store) => store.load(source.url()).await?,
                None => None,
            };
            let start = stored.or(self.start_cursor);
            if let Some(seq) = start
                && let Err(reason) = check_seq_range(seq)
            {
                return Err(FirehoseError::InvalidCursor {
                    source_url: source.url().to_string(),
                    seq,
                    reason,
                });
            }
            *rt.progress[i].lock().unwrap_or_else(|e| e.into_inner()) =
                Progress::resume_from(start);
            if let Some(seq) = start {
                rt.metrics.seq_done(i, seq);
            }
            info!(source = source.url(), cursor = ?start, "starting");
            starts.push(start);
        }

        if let Some(dids) = self.backfill.as_ref().and_then(|b| b.dids.as_ref()) {
            // Repos named up front wait for their copies from the first stream op on.
            self.pipeline.await_copies(dids);
        }
        let mut readers = tokio::task::JoinSet::new();
        let repo_concurrency = self.repo_concurrency.unwrap_or_else(|| {
            if self.pipeline.verifier.level() == murmur_sync::VerifyLevel::None {
                1
            } else {
                tokio::runtime::Handle::current()
                    .metrics()
                    .num_workers()
                    .clamp(1, DEFAULT_REPO_CONCURRENCY_MAX)
            }
        });
        let lane_workers = Arc::new(tokio::sync::Semaphore::new(repo_concurrency));
        for (i, (source, start)) in self.sources.iter().zip(starts).enumerate() {
            let lanes = (repo_concurrency > 1).then(|| {
                RepoLanes::new(
                    Arc::clone(&self.pipeline),
                    Arc::clone(&lane_workers),
                    self.shutdown.subscribe(),
                )
            });
            let reader = SourceReader {
                index: i,
                source: Arc::clone(source),
                pipeline: Arc::clone(&self.pipeline),
                reconnect: self.reconnect.clone(),
                connect_timeout: self.connect_timeout,
                healthy_after: self.healthy_after,
                shutdown: self.shutdown.subscribe(),
                lanes,
            };
            readers.spawn(reader.run(start));
        }
        for feed in &self.feeds {
            let sink = FeedSink {
                pipeline: Arc::clone(&self.pipeline),
                name: Arc::from(feed.name()),
                shutdown: self.shutdown.subscribe(),
            };
            info!(feed = feed.name(), "starting");
            readers.spawn(Arc::clone(feed).run(sink));
        }
        let flusher = CursorFlusher {
            sources: self.sources.iter().map(|s| s.url().to_string()).collect(),
            store: self.cursor_store.clone(),
            runtime: Arc::clone(&rt),
            stored: vec![None; self.sources.len()],
        };
        let mut flusher_shutdown = self.shutdown.subscribe();
        let flush_task = tokio::spawn(async move {
            let mut flusher = flusher;
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    _ = tick.tick() => flusher.flush().await,
                    _ = stopped(&mut flusher_shutdown) => return flusher,
                }
            }
        });

        on_drop.flusher = Some(flush_task.abort_handle());
        if let Some(backfill) = self.backfill.clone() {
            let pipeline = Arc::clone(&self.pipeline);
            let hosts = self.sources.iter().map(|s| s.url().to_string()).collect();
            let mut stop = self.shutdown.subscribe();
            self.pipeline.dispatcher.spawn_until_killed(async move {
                tokio::select! {
                    _ = stopped(&mut stop) => {}
                    () = pipeline.run_backfill(backfill, hosts) => {}
                }
            });
        }

        let mut result = Ok(());
        while let Some(joined) = readers.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if result.is_ok() {
                        result = Err(e);
                    }
                    self.shutdown.send_replace(true);
                }
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => {}
            }
        }
        self.shutdown.send_replace(true);
        self.pipeline.dispatcher.drain().await;
        let mut flusher = flush_task
            .await
            .map_err(|e| FirehoseError::Config(format!("cursor task failed: {e}")))?;
        flusher.flush().await;
        info!("stopped; cursors persisted");
        result
    }
}

/// Stops a watcher's lane and flusher tasks when [`Watcher::run`] is dropped before it ends
/// (after a graceful end the lanes are drained and the flusher has finished: nothing to stop).
struct KillOnDrop {
    dispatcher: Arc<crate::dispatch::Dispatcher>,
    flusher: Option<tokio::task::AbortHandle>,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.dispatcher.kill();
        if let Some(flusher) = &self.flusher {
            flusher.abort();
        }
    }
}

/// Persists each source's low-water mark when it moved.
struct CursorFlusher {
    sources: Vec<String>,
    store: Option<Arc<dyn CursorStore>>,
    runtime: Arc<Runtime>,
    stored: Vec<Option<i64>>,
}

impl CursorFlusher {
    async fn flush(&mut self) {
        for (i, url) in self.sources.iter().enumerate() {
            let low = self.runtime.progress[i]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .low_water();
            if let Some(seq) = low {
                self.runtime.metrics.seq_done(i, seq);
            }
            if low == self.stored[i] {
                continue;
            }
            let (Some(store), Some(seq)) = (&self.store, low) else {
                continue;
            };
            match store.store(url, seq).await {
                Ok(()) => self.stored[i] = low,
                Err(e) => warn!(source = %url, error = %e, "cursor not persisted; will retry"),
            }
        }
    }
}
