//! The requester's side of the task protocol: post tasks, choose one claim per attempt
//! (a [`ClaimPolicy`]), watch leases, match results to tasks by strongRef, and close each
//! task durably with an `ack` at the task's record key. Rebuilding the open tasks from the
//! repos after a restart is in `recovery.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use murmur_comms::agent::comms::{ack, assignment, handoff, result as result_rec, status, task};
use murmur_comms::{Ack, Assignment, Claim, Handoff, Result as ResultC, Status, Task};
use murmur_firehose::{HandlerError, OpEvent, Record};
use murmur_pds::{Cid, Collection, Writer};
use tokio::sync::{broadcast, oneshot};

use crate::policy::{ClaimContext, ClaimOffer, ClaimPolicy};
use crate::recovery::Recovery;
use crate::registry::Registry;
use crate::repos::Repos;
use crate::task::{TaskEvent, TaskHandle, TaskResult, TaskSpec, TaskStats};
use crate::{AgentError, StrongRef, lock};

pub(crate) fn strong_ref(uri: &str, cid: Cid) -> StrongRef {
    atrium_api::com::atproto::repo::strong_ref::MainData {
        uri: uri.to_string(),
        cid: atrium_api::types::string::Cid::new(cid),
    }
    .into()
}

/// The `reason` of the ack recording a lapsed lease: `lease of attempt N lapsed (worker DID)`.
pub(crate) fn lapse_reason(attempt: u32, worker: &str) -> String {
    format!("lease of attempt {attempt} lapsed (worker {worker})")
}

/// The worker named by a [`lapse_reason`] (acks written before it named one have none).
pub(crate) fn lapsed_worker(reason: &str) -> Option<&str> {
    let worker = reason.rsplit_once(" (worker ")?.1.strip_suffix(')')?;
    (worker.starts_with("did:") && !worker.contains(char::is_whitespace)).then_some(worker)
}

/// Where one of our tasks stands.
#[derive(Debug, Clone)]
pub(crate) enum Phase {
    /// Waiting for a claim the policy accepts.
    Open,
    /// An assignment write is in flight.
    Assigning,
    /// Assigned; the lease runs until `deadline`.
    Assigned {
        worker: String,
        assignment_cid: Cid,
        deadline: Instant,
    },
    /// The lapsed assignment is being withdrawn.
    Reopening,
    /// The ack closing the task with this result is being written; `before` comes back if
    /// the write fails.
    Accepting {
        result_uri: String,
        before: Box<Phase>,
    },
    /// The ack closing the task as given up is being written.
    GivingUp,
    /// A result was accepted (its ack is written).
    Done { result_uri: String, worker: String },
    /// `maxAttempts` leases lapsed.
    GivenUp,
}

pub(crate) struct Entry {
    pub(crate) uri: String,
    pub(crate) cid: Option<String>,
    pub(crate) record: task::Record,
    pub(crate) lease: Duration,
    pub(crate) max_attempts: u32,
    pub(crate) attempt: u32,
    pub(crate) phase: Phase,
    pub(crate) claimed_at: Option<Instant>,
    /// Every agent that held this task (assigned or handed to): only they may answer it.
    pub(crate) holders: Vec<String>,
    /// Claims on the current attempt, in arrival order.
    pub(crate) offers: Vec<ClaimOffer>,
    /// A claim-window timer is running for this task.
    pub(crate) deciding: bool,
    pub(crate) waiter: Option<oneshot::Sender<Result<TaskResult, AgentError>>>,
}

pub(crate) type Waiter = oneshot::Receiver<Result<TaskResult, AgentError>>;

impl Entry {
    pub(crate) fn new(uri: String, cid: Option<String>, record: task::Record) -> (Entry, Waiter) {
        let lease = crate::task::lease_of(&record);
        let max_attempts = u32::try_from(record.max_attempts.unwrap_or(3))
            .unwrap_or(3)
            .max(1);
        let (tx, rx) = oneshot::channel();
        let entry = Entry {
            uri,
            cid,
            record,
            lease,
            max_attempts,
            attempt: 0,
            phase: Phase::Open,
            claimed_at: None,
            holders: Vec::new(),
            offers: Vec::new(),
            deciding: false,
            waiter: Some(tx),
        };
        (entry, rx)
    }

    /// Whether a record citing the task by `cid` cites this version of it.
    fn same_version(&self, cid: &atrium_api::types::string::Cid) -> bool {
        self.cid
            .as_deref()
            .is_none_or(|c| c == cid.as_ref().to_string())
    }
}

/// A result as the requester sees it, from the stream or read from a repo.
pub(crate) struct Answer {
    pub(crate) worker: String,
    pub(crate) uri: String,
    pub(crate) cid: Cid,
    pub(crate) record: result_rec::Record,
}

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
    /// While recovering: events about tasks of ours not rebuilt yet, replayed afterwards.
    pub(crate) deferred: Mutex<Option<Vec<Deferred>>>,
    pub(crate) recovered: Mutex<Vec<TaskHandle>>,
    pub(crate) recovery: Mutex<Option<Recovery>>,
    stopped: AtomicBool,
}

impl Requester {
    pub(crate) fn new(
        writer: Writer,
        events: broadcast::Sender<TaskEvent>,
        choosing: Choosing,
        registry: Registry,
        repos: Arc<Repos>,
    ) -> Arc<Self> {
        let did = writer.did().to_string();
        Arc::new(Requester {
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
        let (entry, rx) = Entry::new(uri.clone(), None, record.clone());
        lock(&self.tasks).insert(rkey.clone(), entry);
        (record, self.handle(uri, String::new(), rkey, rx))
    }

    fn written(&self, handle: &mut TaskHandle, cid: Cid) {
        handle.cid = cid.to_string();
        if let Some(entry) = lock(&self.tasks).get_mut(&handle.rkey) {
            entry.cid = Some(handle.cid.clone());
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
            .map(|e| (&e.phase, e.attempt, e.offers.len()))
        {
            None => "unknown task".into(),
            Some((Phase::Open, 0, 0)) => "open, nobody claimed it".into(),
            Some((Phase::Open, 0, n)) => format!("open, {n} claim(s) not chosen yet"),
            Some((Phase::Open, n, _)) => format!("open again after {n} attempt(s), no claim since"),
            Some((Phase::Assigning, n, _)) => format!("being assigned (attempt {n})"),
            Some((Phase::Assigned { worker, .. }, n, _)) => {
                format!("assigned to {worker} (attempt {n}), no result yet")
            }
            Some((Phase::Reopening, n, _)) => format!("lease of attempt {n} lapsed, reopening"),
            Some((Phase::Accepting { result_uri, .. }, _, _)) => {
                format!("accepting the result {result_uri}")
            }
            Some((Phase::GivingUp, n, _)) => format!("giving up after {n} attempt(s)"),
            Some((Phase::Done { worker, .. }, _, _)) => format!("done by {worker}"),
            Some((Phase::GivenUp, n, _)) => format!("given up after {n} attempt(s)"),
        }
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

    /// A claim on an open task joins its offers; the policy then chooses (at once, or when
    /// the claim window closes).
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
        let arm_timer = {
            let mut tasks = lock(&self.tasks);
            let Some(entry) = tasks.get_mut(&rkey) else {
                return Ok(());
            };
            if !entry.same_version(&offer.record.task.cid) {
                return Ok(()); // a claim on another version of the task
            }
            if !matches!(entry.phase, Phase::Open) {
                return Ok(()); // someone already won this attempt: the claim loses
            }
            if !entry.offers.iter().any(|o| o.claim.uri == offer.claim.uri) {
                entry.offers.push(offer);
            }
            if self.choosing.window.is_zero() {
                false
            } else if entry.deciding {
                return Ok(());
            } else {
                entry.deciding = true;
                true
            }
        };
        if arm_timer {
            self.decide_later(rkey, self.choosing.window);
            return Ok(());
        }
        self.decide(&rkey).await
    }

    /// Runs [`decide`](Self::decide) after `after`, and again every second while the
    /// assignment cannot be written.
    pub(crate) fn decide_later(self: &Arc<Self>, rkey: String, after: Duration) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Err(err) = me.decide(&rkey).await {
                tracing::warn!(task = %rkey, error = %err, "assignment not written; trying again");
                if let Some(entry) = lock(&me.tasks).get_mut(&rkey) {
                    entry.deciding = true;
                }
                me.decide_later(rkey, Duration::from_secs(1));
            }
        });
    }

    /// Asks the policy to choose among the offers of an open task and writes the assignment
    /// for the chosen claim.
    pub(crate) async fn decide(self: &Arc<Self>, rkey: &str) -> Result<(), String> {
        if self.stopped.load(Ordering::SeqCst) {
            return Ok(());
        }
        // The policy is user code: ask it outside the lock.
        let (offers, record, uri, attempt, previous) = {
            let mut tasks = lock(&self.tasks);
            let Some(entry) = tasks.get_mut(rkey) else {
                return Ok(());
            };
            entry.deciding = false;
            if !matches!(entry.phase, Phase::Open) || entry.offers.is_empty() {
                return Ok(());
            }
            (
                entry.offers.clone(),
                entry.record.clone(),
                entry.uri.clone(),
                entry.attempt + 1,
                entry.holders.clone(),
            )
        };
        let ctx = ClaimContext {
            task_uri: &uri,
            task: &record,
            attempt,
            previous_workers: &previous,
            registry: &self.registry,
        };
        let Some(chosen) = self
            .choosing
            .policy
            .choose(&ctx, &offers)
            .and_then(|i| offers.get(i).cloned())
        else {
            return Ok(()); // none of these: wait for more claims
        };
        let (attempt, lease) = {
            let mut tasks = lock(&self.tasks);
            let Some(entry) = tasks.get_mut(rkey) else {
                return Ok(());
            };
            if !matches!(entry.phase, Phase::Open) {
                return Ok(());
            }
            entry.phase = Phase::Assigning;
            entry.attempt += 1;
            let first = entry.claimed_at.is_none();
            entry.claimed_at = Some(Instant::now());
            if first {
                lock(&self.stats).claimed += 1;
            }
            (entry.attempt, entry.lease)
        };
        let task_ref = chosen.record.task.clone();
        self.emit(TaskEvent::Claimed {
            task: task_ref.uri.clone(),
            worker: chosen.worker.clone(),
        });
        let expires = chrono::Utc::now()
            + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(300));
        let record = assignment::RecordData {
            task: task_ref.clone(),
            claim: chosen.claim.clone(),
            worker: chosen.worker.clone(),
            attempt: i64::from(attempt),
            lease_expires_at: crate::datetime(expires),
            created_at: crate::now(),
        }
        .into_record();
        // The assignment lives at the task's key and is created, never blindly overwritten:
        // if another writer got there first, its assignment stands.
        let written = self
            .writer
            .create_with_rkey::<Assignment>(rkey, &record)
            .await;
        let outcome = match written {
            Ok(w) => Ok((chosen.worker.clone(), w.cid)),
            Err(err) => match self.writer.get::<Assignment>(rkey).await {
                Ok(Some(existing)) => Ok((existing.value.worker.clone(), existing.cid)),
                Ok(None) | Err(_) => Err(err),
            },
        };
        let mut tasks = lock(&self.tasks);
        let Some(entry) = tasks.get_mut(rkey) else {
            return Ok(());
        };
        match outcome {
            Ok((winner, cid)) => {
                if !entry.holders.contains(&winner) {
                    entry.holders.push(winner.clone());
                }
                if matches!(entry.phase, Phase::Assigning) {
                    entry.phase = Phase::Assigned {
                        worker: winner.clone(),
                        assignment_cid: cid,
                        deadline: Instant::now() + lease,
                    };
                }
                entry.offers.clear();
                drop(tasks);
                lock(&self.stats).assignments += 1;
                self.emit(TaskEvent::Assigned {
                    task: task_ref.uri.clone(),
                    worker: winner,
                    attempt,
                });
                Ok(())
            }
            Err(err) => {
                if matches!(entry.phase, Phase::Assigning) {
                    entry.phase = Phase::Open;
                    entry.attempt -= 1;
                }
                Err(format!("writing the assignment: {err}"))
            }
        }
    }

    /// A status from the assigned worker renews its lease.
    pub(crate) async fn on_status(
        self: Arc<Self>,
        rec: Record<Status>,
        op: OpEvent,
    ) -> Result<(), HandlerError> {
        self.status(op.data().did.clone(), rec.into_inner());
        Ok(())
    }

    pub(crate) fn status(&self, worker: String, status: status::Record) {
        let Some(rkey) = self.our_rkey(&status.task.uri) else {
            return;
        };
        if let Some(mut deferred) = self.deferring(rkey) {
            if let Some(list) = deferred.as_mut() {
                list.push(Deferred::Status(worker, status));
            }
            return;
        }
        let mut tasks = lock(&self.tasks);
        if let Some(entry) = tasks.get_mut(rkey) {
            let lease = entry.lease;
            if let Phase::Assigned {
                worker: holder,
                deadline,
                ..
            } = &mut entry.phase
                && *holder == worker
            {
                *deadline = (*deadline).max(Instant::now() + lease);
            }
        }
    }

    /// A handoff by the assigned worker moves the lease to the agent it names.
    pub(crate) async fn on_handoff(
        self: Arc<Self>,
        rec: Record<Handoff>,
        op: OpEvent,
    ) -> Result<(), HandlerError> {
        self.handoff(op.data().did.clone(), rec.into_inner());
        Ok(())
    }

    pub(crate) fn handoff(&self, from: String, handoff: handoff::Record) {
        let Some(rkey) = self.our_rkey(&handoff.task.uri) else {
            return;
        };
        if let Some(mut deferred) = self.deferring(rkey) {
            if let Some(list) = deferred.as_mut() {
                list.push(Deferred::Handoff(from, handoff));
            }
            return;
        }
        let mut tasks = lock(&self.tasks);
        if let Some(entry) = tasks.get_mut(rkey) {
            let lease = entry.lease;
            if let Phase::Assigned {
                worker, deadline, ..
            } = &mut entry.phase
                && *worker == from
            {
                *worker = handoff.to.clone();
                *deadline = Instant::now() + lease;
                if !entry.holders.contains(&handoff.to) {
                    entry.holders.push(handoff.to.clone());
                }
            }
        }
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
            cid: *rec.cid.as_ref(),
            record: rec.into_inner(),
        };
        self.answer(answer).await.map_err(HandlerError::retry)
    }

    /// A result, from the stream or read from a repo: the first one matching the task's
    /// strongRef, from an agent that held the task, is accepted; a different later one is
    /// counted as a duplicate.
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
        {
            let mut tasks = lock(&self.tasks);
            let Some(entry) = tasks.get_mut(&rkey) else {
                return Ok(());
            };
            if !entry.same_version(&answer.record.task.cid) {
                return Ok(()); // a result for another version of the task
            }
            if !entry.holders.contains(&answer.worker) {
                tracing::debug!(task = %entry.uri, from = %answer.worker, "result from an agent never assigned");
                return Ok(());
            }
            match &entry.phase {
                Phase::Done { result_uri, .. } => {
                    if *result_uri != answer.uri {
                        drop(tasks);
                        lock(&self.stats).duplicates += 1;
                        self.emit(TaskEvent::DuplicateResult {
                            task: format!("{}{rkey}", self.prefix),
                            worker: answer.worker,
                        });
                    }
                    return Ok(()); // the same result delivered again: nothing new
                }
                Phase::Accepting { result_uri, .. } if *result_uri == answer.uri => return Ok(()),
                Phase::Accepting { .. } => {
                    return Err("another result of this task is being accepted".into());
                }
                Phase::GivingUp => {
                    return Err("the task is being given up; its closing ack decides".into());
                }
                Phase::GivenUp => return Ok(()), // closed: its ack says it was given up
                _ => {}
            }
            let before = std::mem::replace(&mut entry.phase, Phase::Open);
            entry.phase = Phase::Accepting {
                result_uri: answer.uri.clone(),
                before: Box::new(before),
            };
        }
        self.accept(&rkey, answer).await
    }

    /// Closes the task with `answer`: an `accepted` ack at the task's record key (created,
    /// so a task is closed once), then the waiter and the stats.
    async fn accept(self: &Arc<Self>, rkey: &str, answer: Answer) -> Result<(), String> {
        let record = ack::RecordData {
            subject: strong_ref(&answer.uri, answer.cid),
            state: "accepted".into(),
            reason: None,
            created_at: crate::now(),
        }
        .into_record();
        let closed = match self.writer.create_with_rkey::<Ack>(rkey, &record).await {
            Ok(_) => Ok(None),
            // Already closed: by a retried write, or by an earlier run of this agent.
            Err(err) => match self.writer.get::<Ack>(rkey).await {
                Ok(Some(existing)) => Ok(Some(existing.value)),
                Ok(None) | Err(_) => Err(err),
            },
        };
        match closed {
            Ok(None) => {
                self.complete(rkey, answer);
                Ok(())
            }
            Ok(Some(ack)) if ack.subject.uri == answer.uri => {
                self.complete(rkey, answer);
                Ok(())
            }
            Ok(Some(ack)) => {
                self.closed_elsewhere(rkey, ack, answer.worker).await;
                Ok(())
            }
            Err(err) => {
                if let Some(entry) = lock(&self.tasks).get_mut(rkey)
                    && let Phase::Accepting { before, .. } = &mut entry.phase
                {
                    entry.phase = std::mem::replace(before.as_mut(), Phase::Open);
                }
                Err(format!("writing the ack that closes the task: {err}"))
            }
        }
    }

    fn complete(&self, rkey: &str, answer: Answer) {
        let mut tasks = lock(&self.tasks);
        let Some(entry) = tasks.get_mut(rkey) else {
            return;
        };
        let latency = entry.claimed_at.map(|t| t.elapsed());
        entry.phase = Phase::Done {
            result_uri: answer.uri.clone(),
            worker: answer.worker.clone(),
        };
        let task_uri = entry.uri.clone();
        let waiter = entry.waiter.take();
        drop(tasks);
        {
            let mut stats = lock(&self.stats);
            stats.done += 1;
            *stats.done_by.entry(answer.worker.clone()).or_default() += 1;
            if let Some(l) = latency {
                stats.latencies.push(l);
            }
        }
        let worker = answer.worker.clone();
        if let Some(waiter) = waiter {
            let _ = waiter.send(Ok(TaskResult {
                task: task_uri.clone(),
                uri: answer.uri,
                worker: answer.worker,
                record: answer.record,
                claim_to_result: latency,
            }));
        }
        self.emit(TaskEvent::Completed {
            task: task_uri,
            worker,
        });
    }

    /// The task's closing ack names another outcome than the one at hand (written by an
    /// earlier run of this agent): follow it.
    async fn closed_elsewhere(self: &Arc<Self>, rkey: &str, ack: ack::Record, other: String) {
        if ack.state == "accepted" {
            // `other` answered too: a duplicate of the accepted result.
            lock(&self.stats).duplicates += 1;
            self.emit(TaskEvent::DuplicateResult {
                task: format!("{}{rkey}", self.prefix),
                worker: other,
            });
        }
        self.follow_ack(rkey, ack).await;
    }

    /// Closes the task as its ack (already in the repo) says: given up, or done with the
    /// accepted result (read back from the worker's repo).
    async fn follow_ack(self: &Arc<Self>, rkey: &str, ack: ack::Record) {
        if ack.state != "accepted" {
            let attempts = lock(&self.tasks).get(rkey).map_or(0, |e| e.attempt);
            self.close_given_up(rkey, attempts);
            return;
        }
        let uri = ack.subject.uri.clone();
        let worker = uri
            .strip_prefix("at://")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_default()
            .to_string();
        match self.repos.get::<ResultC>(&worker, rkey).await {
            Ok(Some(found)) if found.uri == uri => self.complete(
                rkey,
                Answer {
                    worker,
                    uri: found.uri,
                    cid: found.cid,
                    record: found.value,
                },
            ),
            other => {
                tracing::warn!(task = %rkey, accepted = %uri, ?other, "the accepted result could not be read back");
                if let Some(entry) = lock(&self.tasks).get_mut(rkey) {
                    entry.phase = Phase::Done {
                        result_uri: uri,
                        worker,
                    };
                }
            }
        }
    }

    /// Marks the task given up and fails its waiter (once: a task already closed stays
    /// as it is).
    fn close_given_up(&self, rkey: &str, attempts: u32) {
        let mut tasks = lock(&self.tasks);
        let Some(entry) = tasks.get_mut(rkey) else {
            return;
        };
        if matches!(entry.phase, Phase::GivenUp | Phase::Done { .. }) {
            return;
        }
        entry.phase = Phase::GivenUp;
        let waiter = entry.waiter.take();
        let uri = entry.uri.clone();
        drop(tasks);
        lock(&self.stats).given_up += 1;
        if let Some(w) = waiter {
            let _ = w.send(Err(AgentError::AttemptsExhausted {
                task: uri.clone(),
                attempts,
            }));
        }
        self.emit(TaskEvent::GivenUp { task: uri });
    }

    /// Writes the ack that closes a task as given up (`rejected`, subject the task), then
    /// fails its waiter. Only a task whose last lease lapsed (phase `Reopening`) is given
    /// up: the phase becomes `GivingUp` under the lock, so a late result waits for the ack
    /// (and if the result's ack won the key, the task follows it and is done instead).
    pub(crate) async fn give_up(self: &Arc<Self>, rkey: &str, attempts: u32) {
        let (uri, cid) = {
            let mut tasks = lock(&self.tasks);
            let Some(entry) = tasks.get_mut(rkey) else {
                return;
            };
            if !matches!(entry.phase, Phase::Reopening) {
                return; // a result is being accepted, or the task is closed already
            }
            entry.phase = Phase::GivingUp;
            (entry.uri.clone(), entry.cid.clone())
        };
        let Some(cid) = cid.as_deref().and_then(|c| c.parse::<Cid>().ok()) else {
            self.close_given_up(rkey, attempts);
            return;
        };
        let record = ack::RecordData {
            subject: strong_ref(&uri, cid),
            state: "rejected".into(),
            reason: Some(format!(
                "given up: the leases of {attempts} attempt(s) lapsed without a result"
            )),
            created_at: crate::now(),
        }
        .into_record();
        let err = match self.writer.create_with_rkey::<Ack>(rkey, &record).await {
            Ok(_) => {
                self.close_given_up(rkey, attempts);
                return;
            }
            Err(err) => err,
        };
        // The key is taken (a result's ack won, or a retried write landed) or the write
        // failed: the ack in the repo, if any, decides.
        match self.writer.get::<Ack>(rkey).await {
            Ok(Some(existing)) => self.follow_ack(rkey, existing.value).await,
            other => {
                tracing::warn!(task = %uri, error = %err, read = ?other.err(), "the ack closing a given-up task was not written; trying again");
                if let Some(entry) = lock(&self.tasks).get_mut(rkey)
                    && matches!(entry.phase, Phase::GivingUp)
                {
                    entry.phase = Phase::Reopening;
                }
                self.give_up_later(rkey.to_string(), attempts);
            }
        }
    }

    /// Runs [`give_up`](Self::give_up) again in a second.
    fn give_up_later(self: &Arc<Self>, rkey: String, attempts: u32) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if !me.stopped.load(Ordering::SeqCst) {
                me.give_up(&rkey, attempts).await;
            }
        });
    }

    /// Withdraws lapsed assignments (reopening the task) or gives the task up after
    /// `maxAttempts`. Called periodically.
    pub(crate) async fn check_leases(self: &Arc<Self>) {
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        let mut lapsed = Vec::new();
        {
            let mut tasks = lock(&self.tasks);
            for (rkey, entry) in tasks.iter_mut() {
                if let Phase::Assigned {
                    worker,
                    assignment_cid,
                    deadline,
                } = &entry.phase
                    && *deadline <= now
                {
                    lapsed.push((
                        rkey.clone(),
                        entry.uri.clone(),
                        worker.clone(),
                        *assignment_cid,
                        entry.attempt,
                        entry.attempt >= entry.max_attempts,
                        entry.holders.clone(),
                    ));
                    entry.phase = Phase::Reopening;
                }
            }
        }
        for (rkey, uri, worker, cid, attempt, exhausted, holders) in lapsed {
            let assigned = Phase::Assigned {
                worker: worker.clone(),
                assignment_cid: cid,
                deadline: now,
            };
            // The stream may have missed the result (e.g. while this agent restarted):
            // look in the holders' repos before taking the task away.
            if let Some(answer) = self.find_result(&rkey, &holders).await {
                if let Some(entry) = lock(&self.tasks).get_mut(&rkey)
                    && matches!(entry.phase, Phase::Reopening)
                {
                    entry.phase = assigned;
                }
                if let Err(err) = self.answer(answer).await {
                    tracing::warn!(task = %uri, error = %err, "result found but not accepted yet");
                }
                continue;
            }
            // The lapse is recorded before the assignment is withdrawn: a requester that
            // dies in between still counts this attempt against `maxAttempts`.
            if let Err(err) = self.record_lapse(&rkey, cid, attempt, &worker).await {
                tracing::warn!(task = %uri, error = %err, "lapse not recorded; trying again");
                if let Some(entry) = lock(&self.tasks).get_mut(&rkey)
                    && matches!(entry.phase, Phase::Reopening)
                {
                    entry.phase = assigned;
                }
                continue;
            }
            lock(&self.stats).lease_expiries += 1;
            self.emit(TaskEvent::LeaseExpired {
                task: uri.clone(),
                worker: worker.clone(),
                attempt,
            });
            // Withdrawing the assignment tells the lapsed worker to stop and every other
            // worker that the task is open again. The swap keeps a newer assignment intact.
            let withdrawn = self.writer.delete::<Assignment>(&rkey, Some(cid)).await;
            {
                let mut tasks = lock(&self.tasks);
                let Some(entry) = tasks.get_mut(&rkey) else {
                    continue;
                };
                if !matches!(entry.phase, Phase::Reopening) {
                    continue; // a result arrived meanwhile
                }
                if let Err(err) = withdrawn {
                    // Try again on the next check.
                    tracing::warn!(task = %uri, error = %err, "could not withdraw a lapsed assignment");
                    entry.phase = assigned;
                    continue;
                }
                if !exhausted {
                    entry.phase = Phase::Open;
                }
            }
            if exhausted {
                self.give_up(&rkey, attempt).await;
            }
        }
    }

    /// Leaves a durable trace of a lapsed attempt (a `rejected` ack of the assignment, at a
    /// fresh TID key, naming the lapsed worker in its `reason`: see [`lapse_reason`]), so a
    /// restarted requester still counts it against `maxAttempts`.
    async fn record_lapse(
        &self,
        rkey: &str,
        assignment_cid: Cid,
        attempt: u32,
        worker: &str,
    ) -> Result<(), murmur_pds::Error> {
        let uri = format!("at://{}/{}/{rkey}", self.did, Assignment::NSID);
        let record = ack::RecordData {
            subject: strong_ref(&uri, assignment_cid),
            state: "rejected".into(),
            reason: Some(lapse_reason(attempt, worker)),
            created_at: crate::now(),
        }
        .into_record();
        self.writer.create::<Ack>(&record).await.map(|_| ())
    }

    /// The first result for the task at `rkey` in the repos of `holders` (latest first).
    pub(crate) async fn find_result(&self, rkey: &str, holders: &[String]) -> Option<Answer> {
        let cid = lock(&self.tasks).get(rkey).and_then(|e| e.cid.clone());
        for holder in holders.iter().rev() {
            match self.repos.get::<ResultC>(holder, rkey).await {
                Ok(Some(found))
                    if cid
                        .as_deref()
                        .is_none_or(|c| c == found.value.task.cid.as_ref().to_string()) =>
                {
                    return Some(Answer {
                        worker: holder.clone(),
                        uri: found.uri,
                        cid: found.cid,
                        record: found.value,
                    });
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
                    task: entry.uri.clone(),
                }));
            }
        }
    }
}
