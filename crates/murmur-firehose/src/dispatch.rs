//! Per-DID ordered, cross-DID concurrent dispatch with bounded queues, retries and dead letters.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tracing::{Instrument, debug, error, warn};

use crate::feed::Delivered;
use crate::handler::{BoxFuture, CallError};
use crate::hooks::RejectedHook;
use crate::progress::{EventToken, Progress};
use crate::{
    Backoff, DeadLetter, DeadLetterStore, DedupStore, Handler, HandlerError, Metrics, OpEvent,
    Rejected, Rejection,
};

/// One op and the handlers it goes to.
pub(crate) struct Job {
    pub op: OpEvent,
    pub handlers: Vec<Arc<HandlerEntry>>,
    /// Who learns that the op is finished.
    pub completion: Completion,
    pub _permit: OwnedSemaphorePermit,
}

/// Who learns that a job is finished.
pub(crate) enum Completion {
    /// The op's event in its source's [`Progress`] (the seq cursor moves past it).
    Event { source: usize, event: EventToken },
    /// A feed's callback (it acknowledges the op's message upstream).
    Callback(crate::feed::OnDelivered),
}

/// A registered handler and its service stack (retry, timeout, concurrency limit, panic
/// guard), built once when the watcher is built; each call clones the stack.
pub(crate) struct HandlerEntry {
    pub handler: Arc<dyn Handler>,
    service: BoxCloneSyncService<OpEvent, (), BoxError>,
}

impl HandlerEntry {
    pub(crate) fn new(
        handler: Box<dyn Handler>,
        retry: &Backoff,
        timeout: Option<Duration>,
        concurrency: Option<usize>,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let handler: Arc<dyn Handler> = Arc::from(handler);
        let service = ServiceBuilder::new()
            .retry(RetryPolicy {
                backoff: retry.clone(),
                attempt: 0,
                metrics: Arc::clone(metrics),
            })
            .option_layer(timeout.map(tower::timeout::TimeoutLayer::new))
            .option_layer(concurrency.map(|n| {
                tower::limit::GlobalConcurrencyLimitLayer::with_semaphore(Arc::new(Semaphore::new(
                    n.max(1),
                )))
            }))
            .service(Guarded(Arc::clone(&handler)));
        HandlerEntry {
            handler,
            service: BoxCloneSyncService::new(service),
        }
    }
}

/// What the dispatcher needs to run jobs.
pub(crate) struct Runtime {
    pub metrics: Arc<Metrics>,
    pub dedup: Option<Arc<dyn DedupStore>>,
    pub dead_letters: Arc<dyn DeadLetterStore>,
    pub progress: Vec<Mutex<Progress>>,
    pub on_rejected: Option<RejectedHook>,
    /// What handlers have seen of each repo (path -> CID), for resyncs and backfills.
    pub index: Arc<crate::index::RecordIndex>,
}

/// Runs jobs: one DID's ops strictly in order, different DIDs concurrently.
pub(crate) struct Dispatcher {
    queue: Arc<Semaphore>,
    queue_capacity: u32,
    concurrency: Arc<Semaphore>,
    lanes: Mutex<HashMap<String, VecDeque<Job>>>,
    runtime: Arc<Runtime>,
    /// Set when the watcher is dropped without a graceful shutdown: lane tasks stop at once.
    killed: tokio::sync::watch::Sender<bool>,
}

impl Dispatcher {
    pub(crate) fn new(runtime: Arc<Runtime>, queue_capacity: usize, concurrency: usize) -> Self {
        let queue_capacity = queue_capacity.clamp(1, Semaphore::MAX_PERMITS) as u32;
        Dispatcher {
            queue: Arc::new(Semaphore::new(queue_capacity as usize)),
            queue_capacity,
            concurrency: Arc::new(Semaphore::new(concurrency.max(1))),
            lanes: Mutex::new(HashMap::new()),
            runtime,
            killed: tokio::sync::watch::Sender::new(false),
        }
    }

    pub(crate) fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Waits for room in the bounded queue: this is how a slow handler slows the socket read.
    pub(crate) async fn reserve(&self) -> OwnedSemaphorePermit {
        self.queue
            .clone()
            .acquire_owned()
            .await
            .expect("the queue semaphore is never closed")
    }

    /// Queues a job behind the earlier jobs of the same DID.
    ///
    /// When the DID has nothing queued or running and a concurrency slot is free, the job is
    /// polled once right here: a handler that finishes without waiting costs no task spawn
    /// and no thread wake-up. One that does wait moves to a lane task, which keeps it and
    /// the DID's later jobs in order.
    pub(crate) fn submit(self: &Arc<Self>, job: Job) {
        self.runtime
            .metrics
            .queue_depth
            .fetch_add(1, Ordering::Relaxed);
        let did = job.op.data().did.clone();
        {
            let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(lane) = lanes.get_mut(&did) {
                lane.push_back(job);
                return;
            }
            // The lane exists (busy) from here on; later jobs of this DID queue behind `job`.
            lanes.insert(did.clone(), VecDeque::new());
        }
        let this = Arc::clone(self);
        let Ok(slot) = Arc::clone(&self.concurrency).try_acquire_owned() else {
            self.lanes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(did.clone())
                .or_default()
                .push_front(job);
            self.spawn_until_killed(async move { this.drive_lane(did).await });
            return;
        };
        let mut first = Box::pin(run_job_in_span(Arc::clone(&self.runtime), job, slot));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if first.as_mut().poll(&mut cx).is_ready() {
            if !self.release_lane_if_empty(&did) {
                self.spawn_until_killed(async move { this.drive_lane(did).await });
            }
            return;
        }
        // Pending: the spawned task polls it again at once, registering a real waker.
        self.spawn_until_killed(async move {
            first.await;
            this.drive_lane(did).await;
        });
    }

    /// Runs work on its own task until it ends or the dispatcher is killed (lanes, repo
    /// re-fetches: nothing of a dropped watcher goes on running).
    pub(crate) fn spawn_until_killed(&self, work: impl Future<Output = ()> + Send + 'static) {
        let mut killed = self.killed.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                biased;
                _ = killed.wait_for(|k| *k) => {}
                () = work => {}
            }
        });
    }

    /// Stops every lane task where it is, as a process kill would: handlers in flight are
    /// dropped, queued jobs are never run, and nothing more is persisted for them.
    pub(crate) fn kill(&self) {
        self.killed.send_replace(true);
    }

    /// Ends a lane whose queue is empty; returns false when jobs are waiting in it.
    fn release_lane_if_empty(&self, did: &str) -> bool {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        if lanes.get(did).is_some_and(|lane| !lane.is_empty()) {
            return false;
        }
        lanes.remove(did);
        true
    }

    /// Waits until every job queued for `did` so far has finished.
    pub(crate) async fn lane_idle(&self, did: &str) {
        while self
            .lanes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(did)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until every queued and running job has finished.
    pub(crate) async fn drain(&self) {
        let all = self
            .queue
            .acquire_many(self.queue_capacity)
            .await
            .expect("the queue semaphore is never closed");
        drop(all);
    }

    async fn drive_lane(self: Arc<Self>, did: String) {
        loop {
            let job = {
                let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
                match lanes.get_mut(&did).and_then(VecDeque::pop_front) {
                    Some(job) => job,
                    None => {
                        lanes.remove(&did);
                        return;
                    }
                }
            };
            let slot = Arc::clone(&self.concurrency)
                .acquire_owned()
                .await
                .expect("the concurrency semaphore is never closed");
            run_job_in_span(Arc::clone(&self.runtime), job, slot).await;
        }
    }
}

/// Runs one job holding a concurrency slot, in a span naming the op.
async fn run_job_in_span(rt: Arc<Runtime>, job: Job, _slot: OwnedSemaphorePermit) {
    let span = tracing::info_span!(
        "op",
        did = %job.op.data().did,
        seq = job.op.data().seq,
        path = %job.op.data().path,
        action = job.op.data().action.as_str(),
    );
    let (did, seq) = (job.op.data().did.clone(), job.op.data().seq);
    // Handler panics are caught per call (they fail the op); this catches a panicking store or
    // `on_rejected` hook, so the lane goes on. The op's event is never marked done: the stored
    // cursor stays before it, and a restart delivers it again.
    if let Err(panic) = AssertUnwindSafe(run_job(&rt, job).instrument(span))
        .catch_unwind()
        .await
    {
        error!(did = %did, seq, panic = %panic_message(panic.as_ref()), "a state store or the on_rejected hook panicked; the op stays unfinished and the cursor will not pass it in this run");
    }
    rt.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
}

async fn run_job(rt: &Runtime, job: Job) {
    let op = &job.op;
    let key = rt.dedup.as_ref().map(|_| op.key());
    let seen = match (&rt.dedup, &key) {
        (Some(dedup), Some(key)) => persist("dedup lookup", || dedup.contains(key)).await,
        _ => false,
    };
    let delivered = if seen {
        debug!("already handled before a restart; skipped");
        Metrics::inc(&rt.metrics.skipped_duplicates);
        Delivered::Duplicate
    } else {
        let mut delivered = Delivered::Handled;
        for entry in &job.handlers {
            let outcome = run_handler(rt, entry, op).await;
            // The worst outcome over the op's handlers: a dead letter, then a rejection.
            delivered = match (delivered, outcome) {
                (d @ Delivered::DeadLettered { .. }, _) => d,
                (_, o @ Delivered::DeadLettered { .. }) => o,
                (d @ Delivered::Rejected(_), _) => d,
                (_, o) => o,
            };
        }
        if let (Some(dedup), Some(key)) = (&rt.dedup, key) {
            // The key moves into the first attempt; a retry builds it again.
            let mut key = Some(key);
            persist("dedup insert", || {
                dedup.insert(key.take().unwrap_or_else(|| op.key()))
            })
            .await;
        }
        delivered
    };
    // The record index learns what handlers have now seen (a duplicate too: after a restart
    // its index line may be the one that was lost).
    let data = op.data();
    if data.repo_event.is_none() {
        let change = match (data.action, data.cid) {
            (crate::Action::Delete, _) => Some(crate::index::IndexChange::Remove(&data.path)),
            (_, Some(cid)) => Some(crate::index::IndexChange::Put(&data.path, cid)),
            (_, None) => None,
        };
        if let Some(change) = change {
            persist("record index write", || async {
                rt.index.change(&data.did, change)
            })
            .await;
        }
    }
    match job.completion {
        Completion::Event { source, event } => rt.progress[source]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .finish(event),
        Completion::Callback(done) => {
            if std::panic::catch_unwind(AssertUnwindSafe(|| done(delivered))).is_err() {
                error!("a feed's completion callback panicked; the lane goes on");
            }
        }
    }
}

async fn run_handler(rt: &Runtime, entry: &Arc<HandlerEntry>, op: &OpEvent) -> Delivered {
    let name = entry.handler.name();
    let result = entry.service.clone().oneshot(op.clone()).await;
    let error = match result {
        Ok(()) => {
            rt.metrics.handled_from(&op.data().source, time_lag_ms(op));
            return Delivered::Handled;
        }
        Err(e) => e,
    };
    if let Some(CallError::Rejected(rejection)) = error.downcast_ref::<CallError>() {
        rt.metrics.rejected_from(&op.data().source);
        if matches!(rejection, Rejection::NotForMe { .. }) {
            // Someone else's sealed mail: expected, not worth a warning.
            debug!(handler = name, reason = %rejection, "op not for this agent");
        } else {
            warn!(handler = name, reason = %rejection, "op rejected; it never reached the handler");
        }
        if let Some(hook) = &rt.on_rejected {
            hook(&Rejected::Op(op.clone()), rejection);
        }
        return Delivered::Rejected(rejection.clone());
    }
    error!(handler = name, attempts = op.attempts(), error = %error, "handler failed for good; op goes to the dead-letter store");
    let data = op.data();
    let letter = DeadLetter {
        uri: op.uri(),
        did: data.did.clone(),
        rev: data.rev.clone(),
        seq: data.seq,
        action: data.action.as_str().to_string(),
        cid: data.cid.map(|c| c.to_string()),
        handler: name.to_string(),
        error: error.to_string(),
        attempts: op.attempts(),
        failed_at: chrono::Utc::now().to_rfc3339(),
    };
    persist("dead-letter write", || rt.dead_letters.put(letter.clone())).await;
    Metrics::inc(&rt.metrics.dead_lettered);
    Delivered::DeadLettered {
        handler: name.to_string(),
        error: error.to_string(),
    }
}

/// Milliseconds from the op's commit time to now.
fn time_lag_ms(op: &OpEvent) -> Option<i64> {
    let t = chrono::DateTime::parse_from_rfc3339(&op.data().time).ok()?;
    Some(
        chrono::Utc::now()
            .signed_duration_since(t)
            .num_milliseconds(),
    )
}

/// Retries a state-store call until it succeeds: losing a dead letter or a dedup mark would
/// break the delivery contract, so the lane waits (and backpressure builds) instead.
async fn persist<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, crate::FirehoseError>>,
{
    let backoff = Backoff::default();
    let mut attempt = 0;
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) => {
                let delay = backoff.delay(attempt).unwrap_or(backoff.max);
                error!(error = %e, retry_in = ?delay, "{what} failed; retrying");
                tokio::time::sleep(delay).await;
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

/// A handler as a tower service, so timeout, concurrency and retry are ordinary layers.
#[derive(Clone)]
struct Guarded(Arc<dyn Handler>);

impl Service<OpEvent> for Guarded {
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<Result<(), BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    /// A panicking handler is a failed handler (not retried): its op goes to the dead-letter
    /// store with the panic message, and its DID's lane goes on.
    fn call(&mut self, op: OpEvent) -> Self::Future {
        op.attempts.fetch_add(1, Ordering::Relaxed);
        let fut = match std::panic::catch_unwind(AssertUnwindSafe(|| self.0.call(op))) {
            Ok(fut) => fut,
            Err(panic) => return Box::pin(std::future::ready(Err(panicked(panic)))),
        };
        Box::pin(async move {
            match AssertUnwindSafe(fut).catch_unwind().await {
                Ok(result) => result.map_err(BoxError::from),
                Err(panic) => Err(panicked(panic)),
            }
        })
    }
}

/// The error a panicking handler becomes.
fn panicked(panic: Box<dyn std::any::Any + Send>) -> BoxError {
    BoxError::from(CallError::Handler(HandlerError::Fail(format!(
        "handler panicked: {}",
        panic_message(panic.as_ref())
    ))))
}

/// A panic's message, when it has one.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string payload".into())
}

/// Retries handler errors marked retryable (and timeouts) with the watcher's backoff.
#[derive(Clone)]
struct RetryPolicy {
    backoff: Backoff,
    attempt: u32,
    metrics: Arc<Metrics>,
}

impl tower::retry::Policy<OpEvent, (), BoxError> for RetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _op: &mut OpEvent,
        result: &mut Result<(), BoxError>,
    ) -> Option<Self::Future> {
        let error = result.as_ref().err()?;
        let after = match error.downcast_ref::<CallError>() {
            Some(CallError::Handler(HandlerError::Retry { after, .. })) => *after,
            Some(_) => return None,
            None if error.is::<tower::timeout::error::Elapsed>() => None,
            None => return None,
        };
        let delay = self.backoff.delay(self.attempt)?;
        self.attempt += 1;
        Metrics::inc(&self.metrics.retries);
        Some(tokio::time::sleep(after.map_or(delay, |a| a.max(delay))))
    }

    fn clone_request(&mut self, op: &OpEvent) -> Option<OpEvent> {
        Some(op.clone())
    }
}
