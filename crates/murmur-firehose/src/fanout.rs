//! In-process fan-out: one verified watcher over the hosts, its ops handed to many watchers
//! (or Agents) of the same process as a [`Feed`] each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, watch};

use crate::feed::{Feed, FeedSink};
use crate::{
    Action, Backoff, CursorStore, FirehoseError, Gap, Metrics, OpData, OpEvent, Rejected,
    Rejection, ShutdownHandle, Source, WatchError, Watcher, WatcherBuilder,
};

/// Ops waiting for one subscriber's watcher to take them (default).
const DEFAULT_SUBSCRIBER_CAPACITY: usize = 256;

/// Configures a [`Fanout`]: the upstream watcher's sources, verification, filter and state.
/// Start with [`Fanout::builder`].
pub struct FanoutBuilder {
    upstream: WatcherBuilder,
    subscriber_capacity: usize,
    on_gap: Option<crate::GapHook>,
}

impl FanoutBuilder {
    /// Reads a PDS's own `subscribeRepos` (once per host: each keeps its own cursor).
    pub fn pds(mut self, url: &str) -> Self {
        self.upstream = self.upstream.pds(url);
        self
    }

    /// Reads a relay's `subscribeRepos`.
    pub fn relay(mut self, url: &str) -> Self {
        self.upstream = self.upstream.relay(url);
        self
    }

    /// Reads any [`Source`].
    pub fn source(mut self, source: impl Source) -> Self {
        self.upstream = self.upstream.source(source);
        self
    }

    /// The PLC directory used to resolve `did:plc` identities (default: the public one).
    pub fn plc_url(mut self, url: impl Into<String>) -> Self {
        self.upstream = self.upstream.plc_url(url);
        self
    }

    /// A fully configured verifier (overrides [`plc_url`](Self::plc_url) and
    /// [`verification`](Self::verification)).
    pub fn verifier(mut self, verifier: murmur_sync::Verifier) -> Self {
        self.upstream = self.upstream.verifier(verifier);
        self
    }

    /// How much of each commit the upstream verifies (default
    /// [`VerifyLevel::Full`](murmur_sync::VerifyLevel::Full)); subscribers trust it.
    pub fn verification(mut self, level: murmur_sync::VerifyLevel) -> Self {
        self.upstream = self.upstream.verification(level);
        self
    }

    /// Only ops of these collections are handed out: exact NSIDs or prefixes like
    /// `agent.comms.*` (default: every collection).
    pub fn collections(mut self, patterns: impl IntoIterator<Item = impl AsRef<str>>) -> Self {
        self.upstream = self.upstream.collections(patterns);
        self
    }

    /// Only ops of these repos are handed out (default: every repo).
    pub fn dids(mut self, dids: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.upstream = self.upstream.dids(dids);
        self
    }

    /// Only these actions are handed out.
    pub fn actions(mut self, actions: impl IntoIterator<Item = Action>) -> Self {
        self.upstream = self.upstream.actions(actions);
        self
    }

    /// The cursor to start from when none is stored (default: live events only).
    pub fn start_cursor(mut self, seq: i64) -> Self {
        self.upstream = self.upstream.start_cursor(seq);
        self
    }

    /// Keeps the upstream's cursors and dedup log under `dir` (see
    /// [`WatcherBuilder::state_dir`](crate::WatcherBuilder::state_dir)), so a restarted
    /// process resumes after the last op every subscriber had finished.
    pub fn state_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.upstream = self.upstream.state_dir(dir);
        self
    }

    /// Where the upstream's cursors are stored.
    pub fn cursor_store(mut self, store: impl CursorStore) -> Self {
        self.upstream = self.upstream.cursor_store(store);
        self
    }

    /// Most DIDs handed out at once (the upstream's lanes; default 64).
    pub fn concurrency(mut self, dids: usize) -> Self {
        self.upstream = self.upstream.concurrency(dids);
        self
    }

    /// Most ops the upstream holds read and not finished by every subscriber; when full,
    /// reading the sockets waits (default 1024).
    pub fn queue_capacity(mut self, ops: usize) -> Self {
        self.upstream = self.upstream.queue_capacity(ops);
        self
    }

    /// Most ops waiting for one subscriber's watcher to take them (default 256).
    pub fn subscriber_capacity(mut self, ops: usize) -> Self {
        self.subscriber_capacity = ops.max(1);
        self
    }

    /// The upstream's reconnect policy (see [`WatcherBuilder::reconnect`]).
    pub fn reconnect(mut self, backoff: Backoff) -> Self {
        self.upstream = self.upstream.reconnect(backoff);
        self
    }

    /// How long connecting to a host may take (see [`WatcherBuilder::connect_timeout`]).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.upstream = self.upstream.connect_timeout(timeout);
        self
    }

    /// Called with every op, or `#sync` event, that failed the upstream's verification or
    /// lexicon checks: such ops reach no subscriber.
    pub fn on_rejected(
        mut self,
        hook: impl Fn(&Rejected, &Rejection) + Send + Sync + 'static,
    ) -> Self {
        self.upstream = self.upstream.on_rejected(hook);
        self
    }

    /// Called with every [`WatchError`] of the upstream (connects, disconnects, error frames).
    pub fn on_error(mut self, hook: impl Fn(&WatchError) + Send + Sync + 'static) -> Self {
        self.upstream = self.upstream.on_error(hook);
        self
    }

    /// Called with every gap the upstream reports (each subscriber gets it too).
    pub fn on_gap(mut self, hook: impl Fn(&Gap) + Send + Sync + 'static) -> Self {
        self.on_gap = Some(Arc::new(hook));
        self
    }

    /// Checks the configuration and builds the fan-out (run it with [`Fanout::run`]).
    pub fn build(self) -> Result<Fanout, FirehoseError> {
        let hub = Arc::new(Hub {
            slots: Mutex::default(),
            next_id: AtomicU64::new(0),
            capacity: self.subscriber_capacity,
            state: watch::Sender::new(Upstream::Starting),
        });
        let tail = Arc::clone(&hub);
        let gaps = Arc::clone(&hub);
        let user_gap = self.on_gap;
        let watcher = self
            .upstream
            .identity_events(true)
            .tail(move |op: OpEvent| {
                let hub = Arc::clone(&tail);
                async move {
                    hub.hand_out(op.data()).await;
                    Ok(())
                }
            })
            .on_gap(move |gap: &Gap| {
                if let Some(hook) = &user_gap {
                    hook(gap);
                }
                gaps.gap(gap);
            })
            .build()?;
        Ok(Fanout {
            hub,
            metrics: watcher.metrics(),
            shutdown: watcher.shutdown_handle(),
            upstream: Arc::new(Mutex::new(Some(watcher))),
        })
    }
}

/// One verified watcher over the hosts whose ops go to many in-process subscribers. Cheap to
/// clone (shared).
///
/// A watcher per agent opens one `subscribeRepos` socket per host and verifies every commit
/// itself, so N agents in one process cost the PDS hosts N subscriptions and the process N
/// verifications of each commit. A [`Fanout`] reads each host once, verifies each commit
/// once, and hands every op that passes its filter to each [`FanoutSubscriber`]; a subscriber
/// is a [`Feed`], so any watcher ([`WatcherBuilder::feed`](crate::WatcherBuilder::feed)) or
/// Agent (`AgentBuilder::feed`) takes one, with its own filter, handlers, retries, dedup
/// store and dead letters.
///
/// The contract, beside the watcher's own (see the crate docs):
///
/// - **Joining.** A subscriber receives every op (and every `#identity`/`#account` event and
///   gap) the upstream hands out from the moment [`Fanout::subscriber`] returned it, in the
///   upstream's per-DID order. Subscribers made before [`Fanout::run`] see the stream from
///   the upstream's cursor (its stored cursor, else its
///   [`start_cursor`](FanoutBuilder::start_cursor)); one made later joins the live stream
///   where the upstream is, and sees nothing earlier: copy the repos with a
///   [`Backfill`](crate::Backfill) (give it [`hosts`](crate::Backfill::hosts) or
///   [`dids`](crate::Backfill::dids): a subscriber has no hosts of its own to list) if it
///   needs them. A subscriber counts as connected (what a backfill and an Agent's recovery
///   wait for) once every upstream source has connected.
/// - **Completion and the cursor.** The upstream finishes an op only when every subscriber's
///   watcher has finished it (its [`Delivered`](crate::Delivered) callback ran: handled,
///   unwanted, duplicate, dead-lettered or rejected). The upstream's cursor and dedup store
///   therefore never pass an op a running subscriber has not finished, and a process that
///   dies leaves the unfinished ops to be read again on restart (each subscriber's own dedup
///   store, if it has one, skips what it had finished).
/// - **Order.** The upstream hands out one op of a DID at a time (its lanes are per DID) and
///   waits for all subscribers before the DID's next op: each subscriber sees each DID's ops
///   in repo order. Different DIDs go on concurrently, up to the upstream's
///   [`concurrency`](FanoutBuilder::concurrency).
/// - **Backpressure on all.** A slow subscriber slows every subscriber: the DID it is slow on
///   waits for it everywhere, and once the upstream's lanes or queue are full, reading the
///   sockets waits too. A subscriber that is created and never run holds the upstream the
///   same way: create a subscriber only for a watcher about to run.
/// - **Leaving.** A subscriber that stops (its watcher shut down, dropped or killed, or the
///   subscriber dropped unused) leaves: the upstream stops waiting for it at once, also for
///   the ops it had been handed and not finished. It has no cursor of its own: a new
///   subscriber joins where the upstream is.
/// - **Shutdown.** [`Fanout::shutdown`] stops the upstream gracefully: it reads nothing more,
///   waits until the subscribers have finished what it handed out, persists its cursor, and
///   then ends every subscriber's feed (a watcher whose only source is the fan-out stops,
///   draining; if the upstream failed, the feed fails with its error and stops the watcher).
/// - **Trust.** Subscribers do not verify again: they trust the in-process upstream, which
///   checks every commit (signature, MST proof, rev chain) at its
///   [`verification`](FanoutBuilder::verification) level. Rejected records never reach
///   subscribers (see [`on_rejected`](FanoutBuilder::on_rejected)); each subscriber's typed
///   handlers still decode and validate records against their lexicons.
/// - **Gaps.** Every gap the upstream reports goes to every subscriber
///   ([`FeedSink::gap`](crate::FeedSink::gap)): its `on_gap` hook sees it, and a subscriber
///   that copied the repo (a backfill) resyncs it after a chain break.
///
/// ```no_run
/// use murmur_firehose::{Fanout, OpEvent, Watcher};
///
/// # async fn demo() -> Result<(), murmur_firehose::FirehoseError> {
/// let fanout = Fanout::builder()
///     .pds("http://localhost:2583")
///     .pds("http://localhost:2584")
///     .plc_url("http://localhost:2582")
///     .collections(["agent.comms.*"])
///     .build()?;
/// let mut watchers = Vec::new();
/// for name in ["a", "b", "c"] {
///     let watcher = Watcher::builder()
///         .feed(fanout.subscriber(name))
///         .tail(|op: OpEvent| async move {
///             println!("{}", op.uri());
///             Ok(())
///         })
///         .build()?;
///     watchers.push(tokio::spawn(watcher.run()));
/// }
/// let upstream = fanout.clone();
/// tokio::spawn(async move { upstream.run().await });
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Fanout {
    hub: Arc<Hub>,
    upstream: Arc<Mutex<Option<Watcher>>>,
    metrics: Arc<Metrics>,
    shutdown: ShutdownHandle,
}

impl std::fmt::Debug for Fanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fanout")
            .field("subscribers", &self.subscribers())
            .finish_non_exhaustive()
    }
}

impl Fanout {
    /// Starts configuring a fan-out.
    pub fn builder() -> FanoutBuilder {
        FanoutBuilder {
            upstream: Watcher::builder(),
            subscriber_capacity: DEFAULT_SUBSCRIBER_CAPACITY,
            on_gap: None,
        }
    }

    /// A new subscriber, receiving every op handed out from now on (see [`Fanout`]):
    /// give it to one watcher ([`WatcherBuilder::feed`](crate::WatcherBuilder::feed)) or
    /// Agent, and run that soon, since the upstream waits for it. Its feed name (and the
    /// [`OpData::source`] of its ops) is `fanout:{name}`.
    pub fn subscriber(&self, name: &str) -> FanoutSubscriber {
        let id = self.hub.next_id.fetch_add(1, Ordering::Relaxed);
        let (ops, ops_rx) = mpsc::channel(self.hub.capacity);
        let (gaps, gaps_rx) = mpsc::unbounded_channel();
        lock(&self.hub.slots).push(Slot { id, ops, gaps });
        FanoutSubscriber {
            id,
            name: format!("fanout:{name}"),
            hub: Arc::clone(&self.hub),
            inbox: Mutex::new(Some((ops_rx, gaps_rx))),
        }
    }

    /// Subscribers the upstream hands ops to now.
    pub fn subscribers(&self) -> usize {
        lock(&self.hub.slots).len()
    }

    /// The upstream watcher's metrics: one source per host, the ops handed out
    /// (`handled`), gaps, rejections.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// A handle that stops [`run`](Self::run) gracefully.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Stops the upstream gracefully (see [`Fanout`]); [`run`](Self::run) returns once
    /// the subscribers have finished what it handed out.
    pub fn shutdown(&self) {
        self.shutdown.shutdown();
    }

    /// Runs the upstream until shut down or until a source fails for good, then ends every
    /// subscriber's feed. Runs once: a second call is an error.
    ///
    /// Dropping the future before it returns is a kill, as for [`Watcher::run`]: nothing
    /// more is persisted, and the subscribers' feeds end with an error.
    pub async fn run(&self) -> Result<(), FirehoseError> {
        let watcher = lock(&self.upstream).take().ok_or_else(|| {
            FirehoseError::Config("the fan-out is already running (or has run)".into())
        })?;
        let closing = CloseOnDrop(Arc::clone(&self.hub));
        let metrics = Arc::clone(&self.metrics);
        let hub = Arc::clone(&self.hub);
        let result = {
            let running = watcher.run();
            tokio::pin!(running);
            // Subscribers count as connected once every upstream source has connected.
            let connected = async {
                loop {
                    let m = metrics.snapshot();
                    if m.sources_connected >= m.sources {
                        hub.state.send_replace(Upstream::Connected);
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            tokio::select! {
                r = &mut running => r,
                _ = connected => unreachable!("the connect check never ends"),
            }
        };
        closing.close(match &result {
            Ok(()) => Upstream::Stopped,
            Err(e) => Upstream::Failed(e.to_string()),
        });
        result
    }
}

/// Where the upstream is, as subscribers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Upstream {
    /// Not every source has connected yet.
    Starting,
    /// Every source has connected (once): every op written from now on reaches subscribers.
    Connected,
    /// Shut down gracefully.
    Stopped,
    /// Stopped with an error (or killed).
    Failed(String),
}

/// The subscribers' channels, shared by the upstream's tail handler and the subscribers.
struct Hub {
    slots: Mutex<Vec<Slot>>,
    next_id: AtomicU64,
    capacity: usize,
    state: watch::Sender<Upstream>,
}

/// One subscriber's way in.
struct Slot {
    id: u64,
    ops: mpsc::Sender<Handed>,
    gaps: mpsc::UnboundedSender<Gap>,
}

/// One op handed to one subscriber. `finished` is one share of the upstream's wait for the
/// op: when every subscriber's share is dropped (its callback ran, or it left), the
/// upstream's tail handler returns.
struct Handed {
    data: OpData,
    finished: Arc<oneshot::Sender<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    /// Hands one op to every subscriber and waits until each has finished it (or left).
    async fn hand_out(&self, data: &OpData) {
        let (finished, all_done) = oneshot::channel::<()>();
        let finished = Arc::new(finished);
        let targets: Vec<(u64, mpsc::Sender<Handed>)> = lock(&self.slots)
            .iter()
            .map(|s| (s.id, s.ops.clone()))
            .collect();
        for (id, ops) in targets {
            let handed = Handed {
                data: data.clone(),
                finished: Arc::clone(&finished),
            };
            if ops.send(handed).await.is_err() {
                // Its feed stopped: it left.
                self.remove(id);
            }
        }
        drop(finished);
        // Err once every share is dropped: nobody sends on it.
        let _ = all_done.await;
    }

    fn gap(&self, gap: &Gap) {
        lock(&self.slots).retain(|s| s.gaps.send(gap.clone()).is_ok());
    }

    fn remove(&self, id: u64) {
        lock(&self.slots).retain(|s| s.id != id);
    }
}

/// Ends every subscriber's feed when [`Fanout::run`] returns or is dropped.
struct CloseOnDrop(Arc<Hub>);

impl CloseOnDrop {
    fn close(self, how: Upstream) {
        self.0.state.send_replace(how);
    }
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.state.send_if_modified(|s| {
            if matches!(s, Upstream::Stopped | Upstream::Failed(_)) {
                return false;
            }
            *s = Upstream::Failed("the fan-out was dropped while running".into());
            true
        });
        // Dropping the senders ends each feed once it has taken what is queued.
        lock(&self.0.slots).clear();
    }
}

/// One subscriber of a [`Fanout`]: a [`Feed`] of the ops the upstream hands out. Made by
/// [`Fanout::subscriber`]; leaves the fan-out when its feed stops or it is dropped.
pub struct FanoutSubscriber {
    id: u64,
    name: String,
    hub: Arc<Hub>,
    /// Taken by the feed's run.
    inbox: Mutex<Option<Inbox>>,
}

/// A subscriber's ends of its channels: ops, and gaps (unbounded: the upstream reports them
/// from a hook that cannot wait).
type Inbox = (mpsc::Receiver<Handed>, mpsc::UnboundedReceiver<Gap>);

impl std::fmt::Debug for FanoutSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FanoutSubscriber")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Drop for FanoutSubscriber {
    fn drop(&mut self) {
        self.hub.remove(self.id);
    }
}

#[async_trait]
impl Feed for FanoutSubscriber {
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(self: Arc<Self>, sink: FeedSink) -> Result<(), FirehoseError> {
        let Some((mut ops, mut gaps)) = lock(&self.inbox).take() else {
            return Err(FirehoseError::Config(format!(
                "{}: a fan-out subscriber feeds one watcher; take another with Fanout::subscriber",
                self.name
            )));
        };
        let mut upstream = self.hub.state.subscribe();
        // Ops are taken from the start; the feed counts as connected once the upstream is.
        let mut connected = None;
        loop {
            if connected.is_none() && *upstream.borrow_and_update() == Upstream::Connected {
                connected = Some(sink.connected());
            }
            tokio::select! {
                biased;
                () = sink.stopped() => break,
                _ = upstream.changed(), if connected.is_none() => {}
                Some(gap) = gaps.recv() => sink.gap(gap),
                handed = ops.recv() => match handed {
                    Some(Handed { data, finished }) => {
                        sink.deliver(data, move |_| drop(finished)).await;
                    }
                    // The upstream has ended and everything it handed out was taken.
                    None => break,
                },
            }
        }
        drop(connected);
        // Leaving: the upstream no longer waits for ops this feed did not take.
        self.hub.remove(self.id);
        ops.close();
        while ops.try_recv().is_ok() {}
        let ended = upstream.borrow().clone();
        match ended {
            Upstream::Failed(reason) if !sink.is_stopped() => Err(FirehoseError::Source {
                url: self.name.clone(),
                reason: format!("the fan-out's upstream stopped: {reason}"),
            }),
            _ => Ok(()),
        }
    }
}
