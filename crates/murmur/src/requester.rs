//! The requester's side of the task protocol, as I/O around the state machine of
//! `protocol.rs`: post tasks, feed it what the stream shows (claims, statuses, handoffs,
//! results) and the lease clock, and perform what it decides (assignments, withdrawals,
//! acks, completing handles). Rebuilding the open tasks after a restart is in `recovery.rs`.

mod effects;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use murmur_comms::agent::comms::{handoff, status, task};
use murmur_comms::{Claim, Handoff, Result as ResultC, Status, Task};
use murmur_firehose::{Backoff, HandlerError, OpEvent, Record};
use murmur_pds::{Cid, Collection, Writer};
use tokio::sync::{broadcast, oneshot};

use crate::policy::{ClaimOffer, ClaimPolicy};
use crate::protocol::{Action, Answer, Input, Phase, TaskState};
use crate::registry::Registry;
use crate::repos::Repos;
use crate::task::{Recovery, TaskEvent, TaskHandle, TaskResult, TaskSpec, TaskStats};
use crate::{AgentError, StrongRef, lock};

pub(crate) fn strong_ref(uri: &str, cid: Cid) -> StrongRef {
    atrium_api::com::atproto::repo::strong_ref::MainData {
        uri: uri.to_string(),
        cid: atrium_api::types::string::Cid::new(cid),
    }
    .into()
}

/// The future of [`Requester::run`], boxed to break the recursion.
type Running<'a> = std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// One of our tasks: its protocol state and the handle waiting for its outcome.
pub(crate) struct Entry {
    pub(crate) state: TaskState,
    pub(crate) waiter: Option<oneshot::Sender<Result<TaskResult, AgentError>>>,
}

pub(crate) type Waiter = oneshot::Receiver<Result<TaskResult, AgentError>>;

/// An event about one of our tasks that arrived while the task table was being rebuilt.
pub(crate) enum Deferred {
    Claim(ClaimOffer),
    Status(String, status::Record),
    Handoff(String, handoff::Record),
    Result(Answer),
}

/// How the requester chooses among claims.
pub(crate) struct Choosing {
    pub(crate) policy: Arc<dyn ClaimPolicy>,
    pub(crate) window: Duration,
}

/// The requester role of an agent: its task table, fed to the protocol state machine under
/// one lock, and the writes and reads around it.
pub(crate) struct Requester {
    pub(crate) did: String,
    prefix: String,
    pub(crate) writer: Writer,
    pub(crate) tasks: Mutex<HashMap<String, Entry>>,
    pub(crate) stats: Mutex<TaskStats>,
    events: broadcast::Sender<TaskEvent>,
    choosing: Choosing,
    pub(crate) registry: Registry,
    pub(crate) repos: Arc<Repos>,
    /// This agent's encryption keys, to open sealed results read from repos.
    pub(crate) keys: Option<murmur_seal::Keyring>,
    /// While recovering: events about tasks of ours not rebuilt yet, replayed afterwards.
    pub(crate) deferred: Mutex<Option<Vec<Deferred>>>,
    pub(crate) recovered: Mutex<Vec<TaskHandle>>,
    pub(crate) recovery: Mutex<Option<Recovery>>,
    stopped: AtomicBool,
    /// Waits between tries of a task-protocol write that failed (an assignment, the ack
    /// giving a task up): from about a second, doubling up to half a minute, never giving up.
    retry: Backoff,
}

impl Requester {
    pub(crate) fn new(
        writer: Writer,
        events: broadcast::Sender<TaskEvent>,
        choosing: Choosing,
        registry: Registry,
        repos: Arc<Repos>,
        keys: Option<murmur_seal::Keyring>,
    ) -> Arc<Self> {
        let did = writer.did().to_string();
        Arc::new(Requester {
            keys,
            prefix: format!("at://{did}/{}/", Task::NSID),
            did,
            writer,
            tasks: Mutex::new(HashMap::new()),
            stats: Mutex::new(TaskStats::default()),
            events,
            choosing,
            registry,
            repos,
            deferred: Mutex::new(None),
            recovered: Mutex::new(Vec::new()),
            recovery: Mutex::new(None),
            stopped: AtomicBool::new(false),
            retry: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(30),
                factor: 2.0,
                max_attempts: None,
            },
        })
    }

    pub(crate) fn emit(&self, event: TaskEvent) {
        let _ = self.events.send(event);
    }

    pub(crate) fn stats(&self) -> TaskStats {
        lock(&self.stats).clone()
    }

    /// The record key of one of our tasks, from a strongRef's uri.
    pub(crate) fn our_rkey<'a>(&self, task_uri: &'a str) -> Option<&'a str> {
        task_uri.strip_prefix(self.prefix.as_str())
    }

    /// While recovering, the deferred list when the event about `rkey` must wait for the
    /// rebuilt table (the task is ours but not known yet). Lock order: deferred, then tasks.
    fn deferring(&self, rkey: &str) -> Option<MutexGuard<'_, Option<Vec<Deferred>>>> {
        let deferred = lock(&self.deferred);
        (deferred.is_some() && !lock(&self.tasks).contains_key(rkey)).then_some(deferred)
    }

    /// A handle on the task at `rkey`, completed through `rx`.
    pub(crate) fn handle(
        self: &Arc<Self>,
        uri: String,
        cid: String,
        rkey: String,
        rx: Waiter,
    ) -> TaskHandle {
        let me = Arc::downgrade(self);
        let key = rkey.clone();
        TaskHandle {
            uri,
            cid,
            rkey,
            rx,
            describe: Arc::new(move || {
                me.upgrade()
                    .map_or_else(|| "agent stopped".into(), |r| r.describe(&key))
            }),
        }
    }

    /// Registers a task about to be written and returns its record, key and handle. Entries
    /// exist before the write: a claim can come back before the write returns.
    fn register(self: &Arc<Self>, spec: TaskSpec) -> (task::Record, TaskHandle) {
        let record = spec.into_record();
        let rkey = self.writer.next_rkey();
        let uri = format!("{}{rkey}", self.prefix);
        let (entry, rx) = self.entry(uri.clone(), None, record.clone());
        lock(&self.tasks).insert(rkey.clone(), entry);
        (record, self.handle(uri, String::new(), rkey, rx))
    }

    fn written(&self, handle: &mut TaskHandle, cid: Cid) {
        handle.cid = cid.to_string();
        if let Some(entry) = lock(&self.tasks).get_mut(&handle.rkey) {
            entry.state.cid = Some(handle.cid.clone());
        }
        lock(&self.stats).posted += 1;
        self.emit(TaskEvent::Posted {
            task: handle.uri.clone(),
        });
    }

    fn forget(&self, rkeys: &[String]) {
        let mut tasks = lock(&self.tasks);
        for rkey in rkeys {
            tasks.remove(rkey);
        }
    }

    pub(crate) async fn post(self: &Arc<Self>, spec: TaskSpec) -> Result<TaskHandle, AgentError> {
        let (record, mut handle) = self.register(spec);
        match self
            .writer
            .create_with_rkey::<Task>(&handle.rkey, &record)
            .await
        {
            Ok(w) => {
                self.written(&mut handle, w.cid);
                Ok(handle)
            }
            Err(e) => {
                self.forget(std::slice::from_ref(&handle.rkey));
                Err(e.into())
            }
        }
    }

    /// Posts tasks in applyWrites batches (one commit per `chunk` tasks).
    pub(crate) async fn post_many(
        self: &Arc<Self>,
        specs: Vec<TaskSpec>,
        chunk: usize,
    ) -> Result<Vec<TaskHandle>, AgentError> {
        let chunk = chunk.clamp(1, murmur_pds::MAX_BATCH_WRITES);
        let mut handles = Vec::with_capacity(specs.len());
        let mut specs = specs.into_iter().peekable();
        while specs.peek().is_some() {
            let mut batch = self.writer.batch();
            let mut pending = Vec::new();
            for spec in specs.by_ref().take(chunk) {
                let (record, handle) = self.register(spec);
                let added = batch
                    .create_with_rkey::<Task>(&handle.rkey, &record)
                    .map(|_| ());
                pending.push(handle);
                if let Err(e) = added {
                    let keys: Vec<String> = pending.iter().map(|h| h.rkey.clone()).collect();
                    self.forget(&keys);
                    return Err(e.into());
                }
            }
            match batch.commit().await {
                Ok(done) => {
                    for (mut handle, outcome) in pending.into_iter().zip(done.outcomes) {
                        if let Some(w) = outcome.written() {
                            self.written(&mut handle, w.cid);
                        }
                        handles.push(handle);
                    }
                }
                Err(e) => {
                    let keys: Vec<String> = pending.iter().map(|h| h.rkey.clone()).collect();
                    self.forget(&keys);
                    return Err(e.into());
                }
            }
        }
        Ok(handles)
    }

    fn describe(&self, rkey: &str) -> String {
        let tasks = lock(&self.tasks);
        match tasks
            .get(rkey)
            .map(|e| (&e.state.phase, e.state.attempt, e.state.offers.len()))
        {
            None => "unknown task".into(),
            Some((Phase::Open, 0, 0)) => "open, nobody claimed it".into(),
            Some((Phase::Open, 0, n)) => format!("open, {n} claim(s) not chosen yet"),
            Some((Phase::Open, n, _)) => format!("open again after {n} attempt(s), no claim since"),
            Some((Phase::Assigning { .. }, n, _)) => format!("being assigned (attempt {n})"),
            Some((Phase::Assigned { worker, .. }, n, _)) => {
                format!("assigned to {worker} (attempt {n}), no result yet")
            }
            Some((Phase::Lapsing { .. }, n, _)) => {
                format!("lease of attempt {n} lapsed, reopening")
            }
            Some((Phase::Exhausted, n, _)) => format!("lease of attempt {n} lapsed, giving up"),
            Some((Phase::Accepting { answer, .. }, _, _)) => {
                format!("accepting the result {}", answer.uri)
            }
            Some((Phase::GivingUp, n, _)) => format!("giving up after {n} attempt(s)"),
            Some((Phase::Done { worker, .. }, _, _)) => format!("done by {worker}"),
            Some((Phase::GivenUp, n, _)) => format!("given up after {n} attempt(s)"),
        }
    }

    /// The first result for the task at `rkey` in the repos of `holders` (latest first).
    pub(crate) async fn find_result(&self, rkey: &str, holders: &[String]) -> Option<Answer> {
        let cid = lock(&self.tasks)
            .get(rkey)
            .and_then(|e| e.state.cid.clone());
        for holder in holders.iter().rev() {
            match self.repos.get::<ResultC>(holder, rkey).await {
                Ok(Some(found))
                    if cid
                        .as_deref()
                        .is_none_or(|c| c == found.value.task.cid.as_ref().to_string()) =>
                {
                    // A sealed result is opened as the stream's would be; one that does
                    // not open is not accepted.
                    let path = format!("{}/{rkey}", ResultC::NSID);
                    match murmur_firehose::unseal::<ResultC>(
                        found.value,
                        holder,
                        self.keys.as_ref(),
                        &path,
                    ) {
                        Ok((record, _)) => {
                            return Some(Answer {
                                worker: holder.clone(),
                                uri: found.uri,
                                cid: found.cid,
                                record,
                            });
                        }
                        Err(err) => {
                            tracing::warn!(task = %rkey, repo = %holder, reason = %err, "result read from the repo does not open");
                        }
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(task = %rkey, repo = %holder, error = %err, "result not readable")
                }
            }
        }
        None
    }

    /// Fails every waiting request and stops assigning (the agent is stopping).
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let mut tasks = lock(&self.tasks);
        for entry in tasks.values_mut() {
            if let Some(w) = entry.waiter.take() {
                let _ = w.send(Err(AgentError::Stopped {
                    task: entry.state.uri.clone(),
                }));
            }
        }
    }
    /// A new entry for one of our tasks, and the receiver its handle completes through.
    pub(crate) fn entry(
        &self,
        uri: String,
        cid: Option<String>,
        record: task::Record,
    ) -> (Entry, Waiter) {
        let (tx, rx) = oneshot::channel();
        let state = TaskState::new(uri, cid, record, self.choosing.window);
        (
            Entry {
                state,
                waiter: Some(tx),
            },
            rx,
        )
    }

    /// A claim on the stream.
    pub(crate) async fn on_claim(
        self: Arc<Self>,
        rec: Record<Claim>,
        op: OpEvent,
    ) -> Result<(), HandlerError> {
        let offer = ClaimOffer {
            worker: op.data().did.clone(),
            claim: rec.strong_ref(),
            record: rec.into_inner(),
        };
        self.claim(offer).await.map_err(HandlerError::retry)
    }

    /// A claim on one of our tasks, from the stream or a worker's repo.
    pub(crate) async fn claim(self: &Arc<Self>, offer: ClaimOffer) -> Result<(), String> {
        if self.stopped.load(Ordering::SeqCst) {
            return Ok(());
        }
        let Some(rkey) = self.our_rkey(&offer.record.task.uri).map(str::to_string) else {
            return Ok(());
        };
        if let Some(mut deferred) = self.deferring(&rkey) {
            if let Some(list) = deferred.as_mut() {
                list.push(Deferred::Claim(offer));
            }
            return Ok(());
        }
        self.drive(&rkey, Input::Claim(offer)).await
    }

    /// Runs [`decide`](Self::decide) after `after`, and again with the requester's retry
    /// backoff while the assignment cannot be written.
    pub(crate) fn decide_later(self: &Arc<Self>, rkey: String, after: Duration) {
        self.schedule_decide(rkey, after, 0);
    }

    /// Runs [`decide`](Self::decide) again after a failed one: `retry` counts the earlier
    /// retries (0 the first time), so the waits grow.
    pub(crate) fn retry_decide(self: &Arc<Self>, rkey: String, retry: u32) {
        let wait = self.retry.delay(retry).unwrap_or(self.retry.max);
        self.schedule_decide(rkey, wait, retry.saturating_add(1));
    }

    fn schedule_decide(self: &Arc<Self>, rkey: String, after: Duration, next_retry: u32) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Err(err) = me.decide(&rkey).await {
                tracing::warn!(task = %rkey, error = %err, "assignment not written; trying again");
                let _ = me.drive(&rkey, Input::DecideScheduled).await;
                me.retry_decide(rkey, next_retry);
            }
        });
    }

    /// Asks the policy to choose among the offers of an open task and writes the assignment
    /// for the chosen claim.
    pub(crate) async fn decide(self: &Arc<Self>, rkey: &str) -> Result<(), String> {
        if self.stopped.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.drive(rkey, Input::Decide).await
    }

    /// A status from the assigned worker renews its lease.
    pub(crate) async fn on_status(
        self: Arc<Self>,
        rec: Record<Status>,
        op: OpEvent,
    ) -> Result<(), HandlerError> {
        self.status(op.data().did.clone(), rec.into_inner()).await;
        Ok(())
    }

    pub(crate) async fn status(self: &Arc<Self>, worker: String, status: status::Record) {
        let Some(rkey) = self.our_rkey(&status.task.uri).map(str::to_string) else {
            return;
        };
        if let Some(mut deferred) = self.deferring(&rkey) {
            if let Some(list) = deferred.as_mut() {
                list.push(Deferred::Status(worker, status));
            }
            return;
        }
        let renewed = Input::Renewed {
            worker,
            until: None,
        };
        let _ = self.drive(&rkey, renewed).await;
    }

    /// A handoff by the assigned worker moves the lease to the agent it names.
    pub(crate) async fn on_handoff(
        self: Arc<Self>,
        rec: Record<Handoff>,
        op: OpEvent,
    ) -> Result<(), HandlerError> {
        self.handoff(op.data().did.clone(), rec.into_inner()).await;
        Ok(())
    }

    pub(crate) async fn handoff(self: &Arc<Self>, from: String, handoff: handoff::Record) {
        let Some(rkey) = self.our_rkey(&handoff.task.uri).map(str::to_string) else {
            return;
        };
        if let Some(mut deferred) = self.deferring(&rkey) {
            if let Some(list) = deferred.as_mut() {
                list.push(Deferred::Handoff(from, handoff));
            }
            return;
        }
        let to = handoff.to.clone();
        let _ = self.drive(&rkey, Input::Handoff { from, to }).await;
    }

    /// A result on the stream.
    pub(crate) async fn on_result(
        self: Arc<Self>,
        rec: Record<ResultC>,
        op: OpEvent,
    ) -> Result<(), HandlerError> {
        let answer = Answer {
            worker: op.data().did.clone(),
            uri: rec.uri.clone(),
            cid: rec.cid,
            record: rec.into_inner(),
        };
        self.answer(answer).await.map_err(HandlerError::retry)
    }

    /// A result, from the stream or read from a repo.
    pub(crate) async fn answer(self: &Arc<Self>, answer: Answer) -> Result<(), String> {
        if self.stopped.load(Ordering::SeqCst) {
            return Ok(()); // a stopped agent writes nothing more
        }
        let Some(rkey) = self.our_rkey(&answer.record.task.uri).map(str::to_string) else {
            return Ok(());
        };
        if let Some(mut deferred) = self.deferring(&rkey) {
            if let Some(list) = deferred.as_mut() {
                list.push(Deferred::Result(answer));
            }
            return Ok(());
        }
        self.drive(&rkey, Input::Result(answer)).await
    }

    /// Gives the task up if its attempts are used up and no result is being accepted.
    pub(crate) async fn give_up(self: &Arc<Self>, rkey: &str) {
        if let Err(err) = self.drive(rkey, Input::GiveUp).await {
            tracing::warn!(task = %rkey, error = %err, "giving up failed");
        }
    }

    /// Lapses the leases past their deadlines: each is withdrawn (reopening the task) or,
    /// after `maxAttempts`, the task is given up. Called periodically.
    pub(crate) async fn check_leases(self: &Arc<Self>) {
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        let lapsed: Vec<(String, Vec<Action>)> = lock(&self.tasks)
            .iter_mut()
            .map(|(rkey, entry)| (rkey.clone(), entry.state.step(Input::Tick, now)))
            .filter(|(_, actions)| !actions.is_empty())
            .collect();
        for (rkey, actions) in lapsed {
            if let Err(err) = self.run(&rkey, actions).await {
                tracing::warn!(task = %rkey, error = %err, "lapsed lease not settled yet");
            }
        }
    }

    /// Feeds `input` to the task's state machine and performs what it decides.
    pub(crate) async fn drive(self: &Arc<Self>, rkey: &str, input: Input) -> Result<(), String> {
        let actions = {
            let mut tasks = lock(&self.tasks);
            let Some(entry) = tasks.get_mut(rkey) else {
                return Ok(());
            };
            entry.state.step(input, Instant::now())
        };
        self.run(rkey, actions).await
    }

    /// Performs `actions` in order; the outcome of each is fed back to the state machine.
    /// An [`Action::Retry`] ends the run with its error (the caller retries the event).
    /// Boxed: performing an action may schedule a later drive of the same task (claim
    /// window, give-up retry), which makes these futures recursive.
    fn run<'a>(self: &'a Arc<Self>, rkey: &'a str, actions: Vec<Action>) -> Running<'a> {
        Box::pin(async move {
            let mut queue = VecDeque::from(actions);
            while let Some(action) = queue.pop_front() {
                let Some(next) = self.perform(rkey, action).await? else {
                    continue;
                };
                let mut tasks = lock(&self.tasks);
                let Some(entry) = tasks.get_mut(rkey) else {
                    return Ok(());
                };
                queue.extend(entry.state.step(next, Instant::now()));
            }
            Ok(())
        })
    }
}
