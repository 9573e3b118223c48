//! The Agent: one identity's writer plus a watcher over every PDS host of the swarm, with
//! the task protocol, the registry and user handlers wired in.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use murmur_comms::agent::comms::{message, presence, profile};
use murmur_comms::{
    Ack, Assignment, Claim, Handoff, Message, Presence, Profile, Result as ResultC, Status, Task,
};
use murmur_firehose::{
    AccountStatus, Action, Backfill, Created, Deleted, Handler, Metrics, OpEvent, Origin, Record,
    ShutdownHandle, Unsealed, Watcher, WatcherBuilder,
};
use murmur_pds::{Collection, Writer, Written};
use murmur_seal::Keyring;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::AgentError;
use crate::blobs::SealedBlobs;
use crate::lock;
use crate::policy::{ClaimPolicy, FirstCome};
use crate::recovery::Candidates;
use crate::registry::Registry;
use crate::repos::Repos;
use crate::requester::{Choosing, Requester};
use crate::sealing::KeyDirectory;
use crate::task::{Recovery, TaskEvent, TaskHandle, TaskSpec, TaskStats};
use crate::worker::{Worker, WorkerRuntime};

/// Configures an [`Agent`]. Start with [`Agent::builder`].
pub struct AgentBuilder {
    writer: Writer,
    hosts: Vec<String>,
    plc_url: Option<String>,
    state_dir: Option<PathBuf>,
    start_cursor: Option<i64>,
    peers: Option<Vec<String>>,
    watcher: WatcherBuilder,
    collections: BTreeSet<&'static str>,
    requester: bool,
    worker: Option<Worker>,
    profile: Option<profile::RecordData>,
    presence_every: Option<Duration>,
    lease_check: Duration,
    claim_policy: Arc<dyn ClaimPolicy>,
    claim_window: Duration,
    recover: bool,
    backfill: Option<bool>,
    via_feed: bool,
    keys: Option<Keys>,
}

/// Where the agent's encryption keys come from.
enum Keys {
    Ring(Keyring),
    File(PathBuf),
}

impl std::fmt::Debug for AgentBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentBuilder")
            .field("did", &self.writer.did())
            .field("hosts", &self.hosts)
            .field("requester", &self.requester)
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

impl AgentBuilder {
    /// Watches this PDS host (call once per host of the swarm). Default: the agent's own PDS.
    pub fn watch(mut self, pds_url: impl Into<String>) -> Self {
        let url = pds_url.into();
        if !self.hosts.contains(&url) {
            self.hosts.push(url);
        }
        self
    }

    /// Hears the swarm through `feed` instead of subscribing to the PDS hosts itself: e.g.
    /// murmur-bus's `BusSource`, a durable consumer of a hub's verified stream, or a
    /// [`Fanout`](murmur_firehose::Fanout) subscriber, one verified subscription per host
    /// shared by the agents of this process. The hosts ([`watch`](Self::watch)) are still
    /// where it looks up repos (recovery, candidates, the [`backfill`](Self::backfill)'s
    /// listing); writes still go to the agent's own PDS. [`start_cursor`](Self::start_cursor)
    /// does not apply: the feed's upstream keeps the position.
    pub fn feed(mut self, feed: impl murmur_firehose::Feed) -> Self {
        self.watcher = self.watcher.feed(feed);
        self.via_feed = true;
        self
    }

    /// Hears the swarm through a [Jetstream](https://github.com/bluesky-social/jetstream) at
    /// `url` (e.g. a hub's `--jetstream-addr`) instead of subscribing to the PDS hosts: fewer
    /// bytes (JSON, compressed, filtered in the server by the agent's collections and
    /// peers), no CAR. Jetstream carries no proofs, so each op the agent takes is proven
    /// from its author's PDS (`com.atproto.sync.getRecord`) before it is handled; one that
    /// fails never is. Otherwise as [`feed`](Self::feed) (a configured
    /// [`JetstreamSource`](murmur_firehose::JetstreamSource) goes there).
    pub fn jetstream(self, url: &str) -> Self {
        self.feed(murmur_firehose::JetstreamSource::new(url).proofs(true))
    }

    /// Watches every one of these PDS hosts.
    pub fn watch_all(mut self, urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        for url in urls {
            self = self.watch(url);
        }
        self
    }

    /// The PLC directory for resolving `did:plc` identities (default: the public one).
    pub fn plc_url(mut self, url: impl Into<String>) -> Self {
        self.plc_url = Some(url.into());
        self
    }

    /// Keeps the watcher's cursors, dedup log and dead letters under `dir`, so a restarted
    /// agent resumes where it stopped (default: a temporary directory).
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// Replays each host's stream from this sequence number when no cursor is stored
    /// (default: live events only). `0` replays everything the hosts still hold.
    pub fn start_cursor(mut self, seq: i64) -> Self {
        self.start_cursor = Some(seq);
        self
    }

    /// Only hears these agents (DIDs); the agent's own DID is always added. Default: every
    /// repo on the watched hosts.
    pub fn peers(mut self, dids: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.peers = Some(dids.into_iter().map(Into::into).collect());
        self
    }

    /// Follows the agent's own tasks: claims, assignments, leases, results (default on).
    /// Turn it off for a pure worker, so its watcher skips other workers' claims and results.
    pub fn requester(mut self, on: bool) -> Self {
        self.requester = on;
        self
    }

    /// Works on tasks posted by others, as `worker` describes.
    pub fn worker(mut self, worker: Worker) -> Self {
        self.worker = Some(worker);
        self
    }

    /// The agent's encryption keys, kept by the application: it can then seal payloads
    /// ([`TaskSpec::sealed_for`], [`Agent::send_sealed`]) and files
    /// ([`Agent::sealed_blobs`]), and open those sealed for it; its
    /// profile lists the public keys. The keyring must be this agent's DID's.
    pub fn keyring(mut self, keys: Keyring) -> Self {
        self.keys = Some(Keys::Ring(keys));
        self
    }

    /// Like [`keyring`](Self::keyring), with the keys in a 0600 file at `path` (e.g. beside
    /// the session file), made with a new key the first time.
    pub fn key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.keys = Some(Keys::File(path.into()));
        self
    }

    /// Publishes this profile (`agent.comms.profile/self`) when the agent starts.
    pub fn profile(mut self, profile: profile::RecordData) -> Self {
        self.profile = Some(profile);
        self
    }

    /// Rewrites the agent's presence every `period` (TTL three periods) while it runs.
    pub fn presence_every(mut self, period: Duration) -> Self {
        self.presence_every = Some(period);
        self
    }

    /// How often lapsed leases are checked (default 250 ms).
    pub fn lease_check(mut self, every: Duration) -> Self {
        self.lease_check = every;
        self
    }

    /// Chooses which claim wins each attempt of this agent's tasks (default [`FirstCome`]).
    /// See [`ClaimPolicy`]; pair it with [`claim_window`](Self::claim_window) so the policy
    /// sees more than the first claim.
    pub fn claim_policy(mut self, policy: impl ClaimPolicy) -> Self {
        self.claim_policy = Arc::new(policy);
        self
    }

    /// How long the claims on an open task are gathered, from the first one, before the
    /// claim policy chooses (default zero: each claim is offered as it arrives, so the first
    /// acceptable one wins). A longer window lets the policy compare; it also delays every
    /// assignment by that much.
    pub fn claim_window(mut self, window: Duration) -> Self {
        self.claim_window = window;
        self
    }

    /// Rebuilds this identity's open tasks from the repos when the agent starts (default on;
    /// requester role only). Tasks without a closing ack are taken over: a result already
    /// in a worker's repo is accepted, assigned tasks have their leases watched again, the
    /// others are assigned from the claims in the workers' repos. Get their handles with
    /// [`Agent::recovered_tasks`]. Costs listing this identity's whole task, ack and
    /// assignment history (listRecords, 100 records a page: grows with every task ever
    /// posted), plus reads of the workers' repos for the open tasks (16 at a time);
    /// [`AgentBuilder::start`](Self::start) waits for it.
    pub fn recover(mut self, on: bool) -> Self {
        self.recover = on;
        self
    }

    /// Copies the swarm's repos when the agent starts, so a worker learns the tasks posted
    /// before it joined (default: on for an agent with a [`worker`](Self::worker), off
    /// otherwise). The repos copied are the [`peers`](Self::peers) (and the agent's own)
    /// when there is an allowlist, else every repo the watched hosts list
    /// (`com.atproto.sync.listRepos`); each is fetched whole (`getRepo`, verified), and its
    /// `agent.comms` records the agent follows are delivered once, marked
    /// [`Origin::Backfill`](crate::Origin), before that repo's later stream ops.
    ///
    /// The worker reads them as it reads the stream: a task with an ack at its key (closed),
    /// an assignment at its key naming another worker (unless the requester recorded that
    /// assignment's lapse), or a result by this agent is not claimed; an open one is
    /// claimed like a fresh one, within the worker's capacity. An assignment naming this
    /// agent (an earlier run of it) is run. Every other handler sees the copied records
    /// too (profiles, presence, your own handlers: check [`Origin`](crate::Origin) if that
    /// matters), except the requester role's, which rebuilds its open tasks from the repos
    /// itself ([`recover`](Self::recover)).
    ///
    /// With a [`state_dir`](Self::state_dir), a restarted agent does not copy again the
    /// repos an earlier run finished: it goes on from its stored stream cursor, so tasks
    /// posted while it was down still reach it, but the open tasks it knew before the stop
    /// are not delivered again. Costs one `getRepo` per repo (4 at a time), memory for one
    /// repo's records while it is delivered, and a record index (about 100 bytes a record).
    pub fn backfill(mut self, on: bool) -> Self {
        self.backfill = Some(on);
        self
    }

    /// Adds a handler: any async fn or closure whose arguments are extractors, one of them
    /// [`Record<C>`](crate::Record) (creates and updates), [`Created<C>`](crate::Created),
    /// [`Updated<C>`](crate::Updated) or [`Deleted<C>`](crate::Deleted), whose collection
    /// the agent then watches; or an async fn with `#[handler]`, or any [`Handler`].
    ///
    /// ```no_run
    /// use murmur::comms::Message;
    /// use murmur::{Agent, Author, Created, HandlerError, handler};
    ///
    /// #[handler]
    /// async fn on_message(msg: Created<Message>, from: Author) -> Result<(), HandlerError> {
    ///     println!("{} says {:?}", from.0, msg.text);
    ///     Ok(())
    /// }
    ///
    /// # async fn demo(writer: murmur::pds::Writer) -> Result<(), murmur::AgentError> {
    /// let agent = Agent::builder(writer)
    ///     .handler(on_message)
    ///     .handler(|gone: murmur::Deleted<Message>| async move {
    ///         println!("{} was deleted", gone.uri);
    ///         Ok(())
    ///     })
    ///     .start()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn handler<T: 'static, H: Handler<T>>(mut self, handler: H) -> Self {
        self.collections.insert(handler.route().collection);
        self.watcher = self.watcher.handler(handler);
        self
    }

    /// Called for every op that never reached a handler, with the reason: failed
    /// verification or lexicon checks, or a sealed payload that is not for this agent
    /// ([`Rejection::NotForMe`](murmur_firehose::Rejection::NotForMe)) or does not open
    /// ([`Rejection::Sealed`](murmur_firehose::Rejection::Sealed): tampered, copied from
    /// another record, unknown key id).
    pub fn on_rejected(
        mut self,
        hook: impl Fn(&murmur_firehose::Rejected, &murmur_firehose::Rejection) + Send + Sync + 'static,
    ) -> Self {
        self.watcher = self.watcher.on_rejected(hook);
        self
    }

    /// Shared state for `State<S>` handler arguments.
    pub fn state<S: Clone + Send + Sync + 'static>(mut self, state: S) -> Self {
        self.watcher = self.watcher.state(state);
        self
    }

    /// Starts the agent: its watcher, the task protocol roles, presence, and publishes its
    /// profile. Must be called inside a tokio runtime.
    pub async fn start(self) -> Result<Agent, AgentError> {
        let AgentBuilder {
            writer,
            mut hosts,
            plc_url,
            state_dir,
            start_cursor,
            peers,
            mut watcher,
            mut collections,
            requester,
            worker,
            profile,
            presence_every,
            lease_check,
            claim_policy,
            claim_window,
            recover,
            backfill,
            via_feed,
            keys,
        } = self;
        let did = writer.did().to_string();
        let keys = match keys {
            None => None,
            Some(Keys::Ring(ring)) if ring.did() != did => {
                return Err(AgentError::InvalidArgument {
                    what: "keyring",
                    message: format!("it holds the keys of {}, not of {did}", ring.did()),
                });
            }
            Some(Keys::Ring(ring)) => Some(ring),
            Some(Keys::File(path)) => Some(Keyring::load_or_create(path, &did)?),
        };
        if let Some(ring) = &keys {
            // The `Unsealed` extractor finds the keys in the watcher's state.
            watcher = watcher.state(ring.clone());
        }
        // With keys, the profile is published (it carries the public keys).
        let profile = match (&keys, profile) {
            (Some(ring), profile) => {
                let mut profile = profile.unwrap_or_else(|| profile::RecordData {
                    name: did.chars().take(64).collect(),
                    description: None,
                    capabilities: None,
                    accepted_nsids: None,
                    operator: None,
                    max_concurrent_tasks: None,
                    encryption_keys: None,
                    created_at: String::new(),
                });
                profile.encryption_keys = Some(ring.profile_keys());
                Some(profile)
            }
            (None, profile) => profile,
        };
        if hosts.is_empty() {
            hosts.push(writer.pds_url().to_string());
        }
        let (events, _) = broadcast::channel(4096);
        let registry = Registry::new();

        collections.insert(Profile::NSID);
        collections.insert(Presence::NSID);
        {
            let r = registry.clone();
            watcher = watcher.handler(move |rec: Record<Profile>, op: OpEvent| {
                r.observe_profile(&op.data().did, rec.into_inner());
                async { Ok(()) }
            });
            let r = registry.clone();
            watcher = watcher.handler(move |rec: Record<Presence>, op: OpEvent| {
                r.observe_presence(&op.data().did, rec.into_inner());
                async { Ok(()) }
            });
            // An account taken down, suspended or deactivated is offline until it is active.
            let r = registry.clone();
            watcher = watcher.handler(move |account: AccountStatus| {
                r.observe_account(&account.did, account.active, account.status.as_deref());
                async { Ok(()) }
            });
            let r = registry.clone();
            watcher = watcher.handler(move |_gone: Deleted<Presence>, op: OpEvent| {
                r.forget_presence(&op.data().did);
                async { Ok(()) }
            });
        }

        let repos = Repos::new(plc_url.as_deref());
        repos.host(&did, writer.pds_url());
        let directory = KeyDirectory::new(&did, keys.clone(), registry.clone(), Arc::clone(&repos));
        let blobs = SealedBlobs::new(
            writer.clone(),
            keys.clone(),
            Arc::clone(&directory),
            Arc::clone(&repos),
        );
        // Handlers open sealed blobs with a `State<SealedBlobs>` argument.
        watcher = watcher.state(blobs.clone());
        let candidates = Candidates {
            peers: peers.clone(),
            hosts: hosts.clone(),
        };
        let requester = requester.then(|| {
            Requester::new(
                writer.clone(),
                events.clone(),
                Choosing {
                    policy: claim_policy,
                    window: claim_window,
                },
                registry.clone(),
                repos,
                keys.clone(),
            )
        });
        if let Some(req) = &requester {
            // The requester rebuilds its open tasks from the repos itself (`recover`): the
            // records of a backfill are not for it; a resync's (missed live ops) are.
            collections.extend([Claim::NSID, Status::NSID, ResultC::NSID]);
            let r = Arc::clone(req);
            watcher = watcher.handler(move |rec: Created<Claim>, op: OpEvent| {
                let r = Arc::clone(&r);
                async move {
                    if op.origin() == Origin::Backfill {
                        return Ok(());
                    }
                    r.on_claim(rec.into_record(), op).await
                }
            });
            let r = Arc::clone(req);
            watcher = watcher.handler(move |rec: Record<Status>, op: OpEvent| {
                let r = Arc::clone(&r);
                async move {
                    if op.origin() == Origin::Backfill {
                        return Ok(());
                    }
                    r.on_status(rec, op).await
                }
            });
            let r = Arc::clone(req);
            // Results are opened for the requester when sealed (one sealed for others, or
            // that does not open, goes to `on_rejected` and never reaches it).
            watcher = watcher.handler(move |rec: Unsealed<ResultC>, op: OpEvent| {
                let r = Arc::clone(&r);
                async move {
                    if op.origin() == Origin::Backfill || op.data().action != Action::Create {
                        return Ok(());
                    }
                    r.on_result(rec.into_record(), op).await
                }
            });
            collections.insert(Handoff::NSID);
            let r = Arc::clone(req);
            watcher = watcher.handler(move |rec: Created<Handoff>, op: OpEvent| {
                let r = Arc::clone(&r);
                async move {
                    if op.origin() == Origin::Backfill {
                        return Ok(());
                    }
                    r.on_handoff(rec.into_record(), op).await
                }
            });
        }
        let backfill = backfill.unwrap_or(worker.is_some());
        let worker = worker
            .map(|w| WorkerRuntime::new(writer.clone(), w, events.clone(), Arc::clone(&directory)));
        if let Some(wk) = &worker {
            // Acks close tasks; its own results tell an agent started again what it answered.
            collections.extend([Task::NSID, Assignment::NSID, Ack::NSID, ResultC::NSID]);
            let w = Arc::clone(wk);
            watcher = watcher.handler(move |rec: Created<Ack>, op: OpEvent| {
                Arc::clone(&w).on_ack(rec.into_record(), op)
            });
            let w = Arc::clone(wk);
            watcher = watcher.handler(move |rec: Created<ResultC>, op: OpEvent| {
                Arc::clone(&w).on_result(rec.into_record(), op)
            });
            let w = Arc::clone(wk);
            // A sealed task is opened for the worker; one sealed for others (or that does not
            // open) never reaches it, so it is never claimed.
            watcher = watcher.handler(move |rec: Unsealed<Task>, op: OpEvent| {
                let w = Arc::clone(&w);
                async move {
                    if op.data().action != Action::Create {
                        return Ok(());
                    }
                    let sealed = rec.was_sealed();
                    w.on_task(rec.into_record(), op, sealed).await
                }
            });
            let w = Arc::clone(wk);
            watcher = watcher.handler(move |rec: Record<Assignment>, op: OpEvent| {
                Arc::clone(&w).on_assignment(rec, op)
            });
            collections.insert(Handoff::NSID);
            let w = Arc::clone(wk);
            watcher = watcher.handler(move |rec: Created<Handoff>, op: OpEvent| {
                Arc::clone(&w).on_handoff(rec.into_record(), op)
            });
            let w = Arc::clone(wk);
            watcher = watcher.handler(move |gone: Deleted<Assignment>, op: OpEvent| {
                Arc::clone(&w).on_assignment_deleted(gone, op)
            });
        }

        if !via_feed {
            for host in &hosts {
                watcher = watcher.pds(host);
            }
        }
        if let Some(plc) = plc_url {
            watcher = watcher.plc_url(plc);
        }
        if let Some(seq) = start_cursor {
            watcher = watcher.start_cursor(seq);
        }
        if backfill {
            let copy = match &peers {
                Some(peers) => Backfill::dids(peers.iter().cloned().chain([did.clone()])),
                None => Backfill::listed(),
            };
            // The watched hosts list the repos, also when the agent hears them via a feed.
            watcher = watcher.backfill(copy.hosts(hosts.iter().cloned()));
        }
        if let Some(mut peers) = peers {
            peers.push(did.clone());
            watcher = watcher.dids(peers);
        }
        let temp_dir = match &state_dir {
            Some(_) => None,
            None => Some(
                tempfile::tempdir().map_err(|e| AgentError::InvalidArgument {
                    what: "state directory",
                    message: format!("cannot create a temporary directory: {e}"),
                })?,
            ),
        };
        let dir = state_dir.unwrap_or_else(|| {
            temp_dir
                .as_ref()
                .map(|t| t.path().to_path_buf())
                .unwrap_or_default()
        });
        let watcher = watcher
            .collections(collections.iter().copied())
            .state_dir(dir)
            .build()?;
        let metrics = watcher.metrics();
        let shutdown = watcher.shutdown_handle();

        if let Some(req) = requester.as_ref().filter(|_| recover) {
            req.begin_deferring();
        }
        let mut background = Vec::new();
        background.push(tokio::spawn(async move {
            if let Err(err) = watcher.run().await {
                tracing::error!(error = %err, "agent watcher stopped");
            }
        }));
        // The watcher is connected before the repos are read, so nothing written after the
        // reads is missed; events about tasks not rebuilt yet wait until recovery is done.
        if recover && requester.is_some() {
            wait_connected(&metrics).await;
        }
        if let Some(req) = requester.as_ref().filter(|_| recover)
            && let Err(err) = req.recover(candidates).await
        {
            shutdown.shutdown();
            for h in background {
                h.abort();
            }
            return Err(err);
        }
        if let Some(req) = &requester {
            let req = Arc::clone(req);
            background.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(lease_check);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    req.check_leases().await;
                }
            }));
        }
        if let Some(wk) = &worker {
            // Frees slots held by unanswered claims, and forgets the facts held for tasks
            // that did not arrive with the copies.
            let wk = Arc::clone(wk);
            let metrics = Arc::clone(&metrics);
            background.push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    wk.claim_more();
                    wk.forget_stale(!backfill || metrics.backfill().finished);
                }
            }));
        }

        let agent = Agent {
            inner: Arc::new(Inner {
                did,
                writer,
                registry,
                requester,
                worker,
                events,
                metrics,
                shutdown,
                background: Mutex::new(background),
                _temp_dir: temp_dir,
                keys,
                directory,
                blobs,
                profile: Mutex::new(None),
            }),
        };
        if let Some(profile) = profile {
            agent.publish_profile(profile).await?;
        }
        if let Some(period) = presence_every {
            agent.publish_presence("online", period * 3).await?;
            let me = agent.clone();
            let handle = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(period).await;
                    let state = if me.active_tasks() > 0 {
                        "busy"
                    } else {
                        "online"
                    };
                    if let Err(err) = me.publish_presence(state, period * 3).await {
                        tracing::warn!(error = %err, "presence not written");
                    }
                }
            });
            lock(&agent.inner.background).push(handle);
        }
        Ok(agent)
    }
}

struct Inner {
    did: String,
    writer: Writer,
    registry: Registry,
    requester: Option<Arc<Requester>>,
    worker: Option<Arc<WorkerRuntime>>,
    events: broadcast::Sender<TaskEvent>,
    metrics: Arc<Metrics>,
    shutdown: ShutdownHandle,
    background: Mutex<Vec<JoinHandle<()>>>,
    _temp_dir: Option<tempfile::TempDir>,
    keys: Option<Keyring>,
    directory: Arc<KeyDirectory>,
    blobs: SealedBlobs,
    /// The profile last published, republished with the new keys on a rotation.
    profile: Mutex<Option<profile::RecordData>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for h in lock(&self.background).drain(..) {
            h.abort();
        }
        if let Some(w) = &self.worker {
            w.stop();
        }
    }
}

/// One agent: an identity that writes coordination records to its own repo and hears
/// everyone's on the stream. Cheap to clone (shared).
///
/// ```no_run
/// # async fn demo(writer: murmur::pds::Writer, other: &str) -> Result<(), murmur::AgentError> {
/// use std::time::Duration;
/// use murmur::{Agent, TaskSpec};
///
/// let agent = Agent::builder(writer)
///     .watch("http://localhost:2583")
///     .watch("http://localhost:2584")
///     .start()
///     .await?;
/// agent.send(other, "hello").await?;
/// let result = agent
///     .request(TaskSpec::new("echo").payload(serde_json::json!({"n": 1})))
///     .await?
///     .await_result(Duration::from_secs(30))
///     .await?;
/// println!("{} answered {}", result.worker, result.output_json());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("did", &self.inner.did)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Starts configuring an agent acting as `writer`'s account.
    pub fn builder(writer: Writer) -> AgentBuilder {
        AgentBuilder {
            writer,
            hosts: Vec::new(),
            plc_url: None,
            state_dir: None,
            start_cursor: None,
            peers: None,
            watcher: Watcher::builder(),
            collections: BTreeSet::new(),
            requester: true,
            worker: None,
            profile: None,
            presence_every: None,
            lease_check: Duration::from_millis(250),
            claim_policy: Arc::new(FirstCome),
            claim_window: Duration::ZERO,
            recover: true,
            backfill: None,
            via_feed: false,
            keys: None,
        }
    }

    /// The agent's DID.
    pub fn did(&self) -> &str {
        &self.inner.did
    }

    /// The agent's writer (its own repo).
    pub fn writer(&self) -> &Writer {
        &self.inner.writer
    }

    /// The agents seen on the stream (profiles and presence).
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Task protocol events from now on.
    pub fn events(&self) -> broadcast::Receiver<TaskEvent> {
        self.inner.events.subscribe()
    }

    /// Counters of this agent's own tasks (empty without the requester role).
    pub fn task_stats(&self) -> TaskStats {
        self.inner
            .requester
            .as_ref()
            .map(|r| r.stats())
            .unwrap_or_default()
    }

    /// Takes the handles of the tasks recovered when the agent started: this identity's
    /// tasks that an earlier run posted and did not close (see [`AgentBuilder::recover`]).
    /// Each handle's [`await_result`](TaskHandle::await_result) yields the task's one
    /// accepted result: at once if it was written while the agent was down, else when it
    /// arrives. Each handle is given out once; later calls return the rest (none).
    ///
    /// ```no_run
    /// # async fn demo(writer: murmur::pds::Writer) -> Result<(), murmur::AgentError> {
    /// use std::time::Duration;
    /// let agent = murmur::Agent::builder(writer).start().await?;   // same identity as before
    /// for handle in agent.recovered_tasks() {
    ///     let result = handle.await_result(Duration::from_secs(60)).await?;
    ///     println!("{} -> {}", result.task, result.output_json());
    /// }
    /// # Ok(()) }
    /// ```
    pub fn recovered_tasks(&self) -> Vec<TaskHandle> {
        self.inner
            .requester
            .as_ref()
            .map(|r| std::mem::take(&mut *lock(&r.recovered)))
            .unwrap_or_default()
    }

    /// What was rebuilt from the repos at start (`None` without the requester role or with
    /// recovery off).
    pub fn recovery(&self) -> Option<Recovery> {
        self.inner
            .requester
            .as_ref()
            .and_then(|r| lock(&r.recovery).clone())
    }

    /// The watcher's live metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.inner.metrics)
    }

    /// Tasks this agent is running as a worker now.
    pub fn active_tasks(&self) -> usize {
        self.inner.worker.as_ref().map_or(0, |w| w.active())
    }

    /// Sends a text message to one agent (`agent.comms.message` with `to = [did]`).
    pub async fn send(&self, to: &str, text: impl Into<String>) -> Result<Written, AgentError> {
        self.send_message(message::RecordData {
            to: Some(vec![to.to_string()]),
            thread: None,
            reply_to: None,
            text: Some(text.into()),
            payload_type: None,
            payload: None,
            created_at: crate::now(),
        })
        .await
    }

    /// Writes any message record (threads, replies, structured payloads).
    pub async fn send_message(&self, message: message::RecordData) -> Result<Written, AgentError> {
        Ok(self
            .inner
            .writer
            .create::<Message>(&message.into_record())
            .await?)
    }

    /// Posts a task and returns its handle; wait for the result with
    /// [`TaskHandle::await_result`].
    pub async fn request(&self, task: impl Into<TaskSpec>) -> Result<TaskHandle, AgentError> {
        let req = self
            .inner
            .requester
            .as_ref()
            .ok_or(AgentError::NotARequester)?;
        let spec = self.seal_spec(task.into()).await?;
        req.post(spec).await
    }

    /// Seals the payload of a spec made with [`TaskSpec::sealed_for`].
    async fn seal_spec(&self, mut spec: TaskSpec) -> Result<TaskSpec, AgentError> {
        if let Some((dids, payload)) = spec.take_sealing() {
            self.inner.keys.as_ref().ok_or(AgentError::NoKeyring)?;
            let sealed = self
                .inner
                .directory
                .seal_json(&payload, &dids, Task::NSID, "payload")
                .await?;
            spec.set_payload(sealed);
        }
        Ok(spec)
    }

    /// Sends `payload` sealed for `to` (and this agent) as an `agent.comms.message`: the
    /// message, its recipients (`to`) and time are public, the payload is not. Recipients
    /// read it with an [`Unsealed<Message>`](murmur_firehose::Unsealed) handler argument.
    pub async fn send_sealed(
        &self,
        to: &[&str],
        payload: serde_json::Value,
    ) -> Result<Written, AgentError> {
        self.inner.keys.as_ref().ok_or(AgentError::NoKeyring)?;
        let dids: Vec<String> = to.iter().map(|d| d.to_string()).collect();
        let sealed = self
            .inner
            .directory
            .seal_json(&payload, &dids, Message::NSID, "payload")
            .await?;
        self.send_message(message::RecordData {
            to: Some(dids),
            thread: None,
            reply_to: None,
            text: None,
            payload_type: None,
            payload: Some(sealed),
            created_at: crate::now(),
        })
        .await
    }

    /// Seals `value` for `to` (and this agent) as field `field` of a `C` record of this
    /// agent: the `agent.comms.defs#sealed` object to put in that field (an `unknown` one,
    /// such as a handoff's `context`). The context is bound: the object opens only in that
    /// field of that record type of this repo.
    pub async fn seal_for<C: Collection>(
        &self,
        to: &[&str],
        field: &str,
        value: &serde_json::Value,
    ) -> Result<atrium_api::types::Unknown, AgentError> {
        self.inner.keys.as_ref().ok_or(AgentError::NoKeyring)?;
        let dids: Vec<String> = to.iter().map(|d| d.to_string()).collect();
        self.inner
            .directory
            .seal_json(value, &dids, C::NSID, field)
            .await
    }

    /// Seals files for other agents and opens those sealed for this one (sealed blobs,
    /// `agent.comms.defs#sealedBlob`). Handlers get the same with a
    /// `State<SealedBlobs>` argument.
    pub fn sealed_blobs(&self) -> &SealedBlobs {
        &self.inner.blobs
    }

    /// The agent's encryption keys, when it has some.
    pub fn keyring(&self) -> Option<&Keyring> {
        self.inner.keys.as_ref()
    }

    /// Rotates the agent's encryption key: a new current key, the old ones kept (payloads
    /// sealed to them still open), and the profile published again so that others seal to
    /// the new key. Returns the new public key.
    pub async fn rotate_keys(&self) -> Result<murmur_seal::PublicKey, AgentError> {
        let ring = self.inner.keys.as_ref().ok_or(AgentError::NoKeyring)?;
        let key = ring.rotate()?;
        let profile = lock(&self.inner.profile).clone();
        let mut profile = profile.unwrap_or_else(|| profile::RecordData {
            name: self.inner.did.chars().take(64).collect(),
            description: None,
            capabilities: None,
            accepted_nsids: None,
            operator: None,
            max_concurrent_tasks: None,
            encryption_keys: None,
            created_at: String::new(),
        });
        profile.encryption_keys = Some(ring.profile_keys());
        self.publish_profile(profile).await?;
        Ok(key)
    }

    /// Posts many tasks at once, `chunk` per commit (applyWrites, at most 200), and returns
    /// their handles in order. Far fewer round trips than one [`request`](Self::request) each.
    /// If a batch fails, the tasks of earlier batches stay posted and the error is returned.
    pub async fn request_many(
        &self,
        tasks: impl IntoIterator<Item = impl Into<TaskSpec>>,
        chunk: usize,
    ) -> Result<Vec<TaskHandle>, AgentError> {
        let req = self
            .inner
            .requester
            .as_ref()
            .ok_or(AgentError::NotARequester)?;
        let mut specs = Vec::new();
        for spec in tasks {
            specs.push(self.seal_spec(spec.into()).await?);
        }
        req.post_many(specs, chunk).await
    }

    /// Writes the agent's profile (`agent.comms.profile/self`). An agent with encryption
    /// keys lists them (`encryptionKeys`) when the profile names none.
    pub async fn publish_profile(
        &self,
        mut profile: profile::RecordData,
    ) -> Result<Written, AgentError> {
        if let Some(ring) = &self.inner.keys
            && profile.encryption_keys.is_none()
        {
            profile.encryption_keys = Some(ring.profile_keys());
        }
        if profile.created_at.is_empty() {
            profile.created_at = crate::now();
        }
        let written = self
            .inner
            .writer
            .put::<Profile>("self", &profile.clone().into_record(), None)
            .await?;
        *lock(&self.inner.profile) = Some(profile);
        Ok(written)
    }

    /// Writes the agent's presence (`agent.comms.presence/self`), valid for `ttl`.
    pub async fn publish_presence(
        &self,
        state: &str,
        ttl: Duration,
    ) -> Result<Written, AgentError> {
        let active = i64::try_from(self.active_tasks()).unwrap_or(i64::MAX);
        let record = presence::RecordData {
            state: state.into(),
            load: None,
            ttl_seconds: i64::try_from(ttl.as_secs().max(1)).unwrap_or(86_400),
            active_tasks: Some(active),
            status_text: None,
            created_at: crate::now(),
        }
        .into_record();
        Ok(self
            .inner
            .writer
            .put::<Presence>("self", &record, None)
            .await?)
    }

    /// Stops the agent gracefully: marks it offline, stops running work, drains the watcher.
    /// Waiting requests fail with [`AgentError::Stopped`].
    pub async fn shutdown(&self) {
        let _ = self
            .publish_presence("offline", Duration::from_secs(1))
            .await;
        self.stop_now();
        self.inner.shutdown.shutdown();
    }

    /// Stops the agent at once, writing nothing more: as if its process died. For fault tests.
    pub fn kill(&self) {
        self.stop_now();
    }

    fn stop_now(&self) {
        if let Some(w) = &self.inner.worker {
            w.stop();
        }
        if let Some(r) = &self.inner.requester {
            r.stop();
        }
        for h in lock(&self.inner.background).drain(..) {
            h.abort();
        }
    }
}

/// Waits (up to 10 s) until every source of the agent's watcher is connected: from then on
/// every record written reaches the stream. A host that stays down is left to the
/// watcher's reconnects (and the lease checks), and logged.
async fn wait_connected(metrics: &Metrics) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics.snapshot();
        if m.sources_connected >= m.sources {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                connected = m.sources_connected,
                sources = m.sources,
                "not every watched host is connected; recovering anyway"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
