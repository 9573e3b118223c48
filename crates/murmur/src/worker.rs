//! The worker's side of the task protocol: claim open tasks up to a capacity, run assigned
//! ones while renewing the lease with `status`, write one `result` per task key, and stand
//! down when another worker wins or the assignment is withdrawn.
//!
//! Everything the repos say about a task after it was posted reaches the worker as a
//! [`Fact`] (an ack at its key, the assignment at its key, a lapse ack, a withdrawal, a result
//! by this worker), and one function, `apply`, moves the task on it: live from the stream,
//! or from a copy of a repo (the watcher's backfill when the agent starts, a resync after a
//! gap). A copy delivers a repo's records in key order, so a requester's acks and
//! assignments come before its tasks: facts about a task not seen yet are held (only those
//! from copies: a live fact about an unknown task is about a task this worker will never
//! see) until the task arrives, and dropped once the backfill is over and they are older
//! than [`PENDING_TTL`] (their task was deleted, or closed before the fact arrived).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use murmur_comms::agent::comms::{
    assignment, claim, defs, handoff, result as result_rec, status, task,
};
use murmur_comms::{Ack, Assignment, Claim, Handoff, Result as ResultC, Status, Task};
use murmur_firehose::{BoxFuture, Deleted, HandlerError, OpEvent, Origin, Record};
use murmur_pds::Writer;
use tokio::sync::broadcast;
use tokio::task::AbortHandle;

use crate::lock;
use crate::recovery::{AckMeaning, ack_meaning};
use crate::sealing::KeyDirectory;
use crate::task::TaskEvent;

/// How long a fact about a task not seen yet is held once the backfill is over.
pub(crate) const PENDING_TTL: Duration = Duration::from_secs(30);

/// Something a repo says about a task (by its at-uri), from the stream or from a copy.
#[derive(Debug, Clone)]
pub(crate) enum Fact {
    /// An ack at the task's key in the requester's repo: the task is closed (a result was
    /// accepted, or it was given up). Nobody claims it any more.
    Closed,
    /// The assignment at the task's key.
    Assigned {
        worker: String,
        attempt: u32,
        cid: String,
    },
    /// The requester recorded the lapse of this assignment (a `rejected` ack of it): it is
    /// withdrawn, even if its deletion has not happened or not arrived yet.
    Lapsed { assignment_cid: String },
    /// The assignment at the task's key was deleted (withdrawn).
    Withdrawn,
    /// This worker wrote a result for the task (in an earlier run, say).
    Answered,
}

impl Fact {
    /// The order facts held for a task not seen yet are applied in: a closing ack settles
    /// everything; a lapse ack (which sorts before the assignment in a copy) applies to the
    /// assignment it names.
    fn rank(&self) -> u8 {
        match self {
            Fact::Closed => 0,
            Fact::Assigned { .. } => 1,
            Fact::Lapsed { .. } => 2,
            Fact::Withdrawn => 3,
            Fact::Answered => 4,
        }
    }
}

/// What is done once the task table is unlocked.
enum After {
    Emit(TaskEvent),
    Start(Box<Start>),
}

/// An attempt to start: the job, and the task's key, reference and lease.
struct Start {
    job: Job,
    rkey: String,
    task_ref: crate::StrongRef,
    lease: Duration,
}

/// Facts held for a task not seen yet.
struct Pending {
    since: Instant,
    facts: Vec<Fact>,
}

/// One assigned task attempt, as the work function sees it.
#[derive(Debug, Clone)]
pub struct Job {
    /// at-uri of the task.
    pub task_uri: String,
    /// A strong reference to the task record.
    pub task_ref: crate::StrongRef,
    /// DID of the requester.
    pub requester: String,
    /// The task record.
    pub task: task::Record,
    /// Attempt number (1 for the first assignment).
    pub attempt: u32,
    /// The state handed over with the task, when another agent handed it off to this one.
    pub context: Option<serde_json::Value>,
    /// Whether the task's payload was sealed (`task.payload` is the opened plaintext). Its
    /// result is then sealed for the requester.
    pub sealed: bool,
    writer: Writer,
    handed_off: Arc<AtomicBool>,
}

impl Job {
    /// Hands the task to agent `to` with the state needed to continue (`agent.comms.handoff`).
    /// This worker then writes no result; `to` continues, renews the lease and answers.
    /// A sealed task ([`Job::sealed`]) is refused with
    /// [`AgentError::InvalidArgument`](crate::AgentError::InvalidArgument): `to` could not
    /// read it, and the context would be public.
    pub async fn hand_off(
        &self,
        to: &str,
        reason: impl Into<String>,
        context: serde_json::Value,
    ) -> Result<murmur_pds::Written, crate::AgentError> {
        if self.sealed {
            // The payload is sealed for this worker alone and the handoff's context would be
            // public: refuse rather than leak.
            return Err(crate::AgentError::InvalidArgument {
                what: "handoff",
                message:
                    "a sealed task cannot be handed off: its payload is sealed for this worker only"
                        .into(),
            });
        }
        let record = handoff::RecordData {
            task: self.task_ref.clone(),
            assignment: None,
            to: to.to_string(),
            reason: Some(reason.into()),
            context: crate::to_unknown(context),
            created_at: crate::now(),
        }
        .into_record();
        let written = self.writer.create::<Handoff>(&record).await?;
        self.handed_off.store(true, Ordering::SeqCst);
        Ok(written)
    }

    /// The task's payload as JSON (`Null` when absent).
    pub fn payload_json(&self) -> serde_json::Value {
        self.task
            .payload
            .as_ref()
            .and_then(|p| serde_json::to_value(p).ok())
            .unwrap_or(serde_json::Value::Null)
    }
}

type WorkFn =
    Arc<dyn Fn(Job) -> BoxFuture<Result<serde_json::Value, String>> + Send + Sync + 'static>;

/// How an agent works on tasks: which task types, how many at once, and the work itself.
///
/// ```
/// let worker = murmur::Worker::new(|job: murmur::Job| async move {
///     Ok(serde_json::json!({"echo": job.payload_json()}))
/// })
/// .capabilities(["echo"])
/// .max_concurrent(2);
/// # let _ = worker;
/// ```
#[derive(Clone)]
pub struct Worker {
    pub(crate) capabilities: Vec<String>,
    pub(crate) max_concurrent: usize,
    pub(crate) claim_timeout: Duration,
    pub(crate) work: WorkFn,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("capabilities", &self.capabilities)
            .field("max_concurrent", &self.max_concurrent)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A worker running `work` for each assigned task: `Ok(output)` becomes a `success`
    /// result, `Err(message)` a `failure` result. Takes every task type, one at a time.
    pub fn new<F, Fut>(work: F) -> Self
    where
        F: Fn(Job) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<serde_json::Value, String>> + Send + 'static,
    {
        Worker {
            capabilities: Vec::new(),
            max_concurrent: 1,
            claim_timeout: Duration::from_secs(10),
            work: Arc::new(move |job| Box::pin(work(job))),
        }
    }

    /// Only claim tasks whose `taskType` is one of these (default: every type).
    pub fn capabilities(mut self, caps: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.capabilities = caps.into_iter().map(Into::into).collect();
        self
    }

    /// Most tasks claimed or running at once (default 1).
    pub fn max_concurrent(mut self, n: usize) -> Self {
        self.max_concurrent = n.max(1);
        self
    }

    /// How long a claim without an answer holds a slot (default 10 s).
    pub fn claim_timeout(mut self, timeout: Duration) -> Self {
        self.claim_timeout = timeout;
        self
    }

    fn takes(&self, task_type: &str) -> bool {
        self.capabilities.is_empty() || self.capabilities.iter().any(|c| c == task_type)
    }
}

/// Stops the lease renewals when the attempt ends, however it ends (aborted included).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Debug)]
enum Phase {
    /// Known, unassigned, not claimed by us.
    Open,
    /// We claimed it at this instant (holds a slot).
    Claimed(Instant),
    /// Assigned to someone else (or our claim went unanswered).
    Taken,
    /// We run this attempt (holds a slot).
    Running(u32, AbortHandle),
    /// We wrote its result.
    Done,
    /// We handed it to another agent; it may be handed back to us.
    HandedOff,
}

struct Known {
    uri: String,
    requester: String,
    rkey: String,
    task_ref: crate::StrongRef,
    record: task::Record,
    lease: Duration,
    phase: Phase,
    /// The CID of the assignment at the task's key, while there is one.
    assignment: Option<String>,
    /// The handoff records (at-uris) we continued the task from: a redelivered one is not
    /// run twice.
    continued: HashSet<String>,
    /// Whether its payload was sealed (and opened for us).
    sealed: bool,
}

pub(crate) struct WorkerRuntime {
    did: String,
    writer: Writer,
    config: Worker,
    /// The tasks seen and not closed. Locked before `pending`.
    tasks: Mutex<HashMap<String, Known>>,
    /// Facts from copies about tasks not seen yet, by task at-uri.
    pending: Mutex<HashMap<String, Pending>>,
    events: broadcast::Sender<TaskEvent>,
    stopped: AtomicBool,
    /// Seals the results of sealed tasks for their requesters.
    keys: Arc<KeyDirectory>,
}

fn slots_used(tasks: &HashMap<String, Known>) -> usize {
    tasks
        .values()
        .filter(|k| matches!(k.phase, Phase::Claimed(_) | Phase::Running(..)))
        .count()
}

/// `at://did/agent.comms.assignment/rkey` -> `at://did/agent.comms.task/rkey`.
fn task_uri_of(did: &str, rkey: &str) -> String {
    format!(
        "at://{did}/{}/{rkey}",
        <Task as murmur_pds::Collection>::NSID
    )
}

impl WorkerRuntime {
    pub(crate) fn new(
        writer: Writer,
        config: Worker,
        events: broadcast::Sender<TaskEvent>,
        keys: Arc<KeyDirectory>,
    ) -> Arc<Self> {
        Arc::new(WorkerRuntime {
            did: writer.did().to_string(),
            writer,
            config,
            tasks: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            events,
            stopped: AtomicBool::new(false),
            keys,
        })
    }

    fn emit(&self, event: TaskEvent) {
        let _ = self.events.send(event);
    }

    /// Whether this worker may claim `t` when it is open: a type it takes, addressed to it or
    /// to anyone, deadline not passed.
    fn claimable(&self, t: &task::Record) -> bool {
        self.config.takes(&t.task_type)
            && t.assignee.as_deref().is_none_or(|a| a == self.did)
            && t.deadline.as_deref().is_none_or(|d| {
                chrono::DateTime::parse_from_rfc3339(d).is_ok_and(|d| d >= chrono::Utc::now())
            })
    }

    /// Tasks running now.
    pub(crate) fn active(&self) -> usize {
        lock(&self.tasks)
            .values()
            .filter(|k| matches!(k.phase, Phase::Running(..)))
            .count()
    }

    /// A task from the stream or a copy; `sealed` when its payload was sealed and opened.
    pub(crate) async fn on_task(
        self: Arc<Self>,
        rec: Record<Task>,
        op: OpEvent,
        sealed: bool,
    ) -> Result<(), HandlerError> {
        let t: &task::Record = &rec;
        // Tasks this worker will not claim are still remembered: one may be handed to it.
        let claimable = self.claimable(t);
        let mut after = Vec::new();
        {
            let mut tasks = lock(&self.tasks);
            let held = lock(&self.pending).remove(&rec.uri);
            let mut facts = held.map(|p| p.facts).unwrap_or_default();
            facts.sort_by_key(Fact::rank);
            if matches!(facts.first(), Some(Fact::Closed)) {
                return Ok(()); // closed before we saw it: nothing to remember
            }
            if !tasks.contains_key(&rec.uri) {
                tasks.insert(
                    rec.uri.clone(),
                    Known {
                        uri: rec.uri.clone(),
                        requester: op.data().did.clone(),
                        rkey: op.rkey().to_string(),
                        task_ref: rec.strong_ref(),
                        lease: crate::task::lease_of(t),
                        record: rec.value.clone(),
                        phase: if claimable { Phase::Open } else { Phase::Taken },
                        assignment: None,
                        continued: HashSet::new(),
                        sealed,
                    },
                );
            }
            for fact in facts {
                self.apply(&mut tasks, &rec.uri, fact, &mut after);
            }
        }
        self.finish(after);
        self.claim_more();
        Ok(())
    }

    /// Moves the task `uri` on `fact`: at once if the task is known, else held until it
    /// arrives when the fact comes from a copy of a repo (which delivers a requester's acks
    /// and assignments before its tasks).
    pub(crate) fn learn(self: &Arc<Self>, uri: &str, fact: Fact, origin: Origin) {
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        let mut after = Vec::new();
        {
            let mut tasks = lock(&self.tasks);
            if tasks.contains_key(uri) {
                self.apply(&mut tasks, uri, fact, &mut after);
            } else if origin != Origin::Live {
                lock(&self.pending)
                    .entry(uri.to_string())
                    .or_insert_with(|| Pending {
                        since: Instant::now(),
                        facts: Vec::new(),
                    })
                    .facts
                    .push(fact);
            }
        }
        self.finish(after);
        self.claim_more();
    }

    /// Drops the facts held longer than [`PENDING_TTL`] for tasks that never arrived; only
    /// once `copies_over` (the backfill is finished, or there is none), since until then
    /// their tasks may still come.
    pub(crate) fn forget_stale(&self, copies_over: bool) {
        if copies_over {
            lock(&self.pending).retain(|_, p| p.since.elapsed() < PENDING_TTL);
        }
    }

    /// The one place a task moves on what the repos say about it (`uri` must be known).
    fn apply(
        &self,
        tasks: &mut HashMap<String, Known>,
        uri: &str,
        fact: Fact,
        after: &mut Vec<After>,
    ) {
        let Some(k) = tasks.get_mut(uri) else {
            return;
        };
        match fact {
            Fact::Closed => {
                if let Phase::Running(n, h) = &k.phase {
                    h.abort();
                    after.push(After::Emit(TaskEvent::Abandoned {
                        task: uri.to_string(),
                        attempt: *n,
                    }));
                }
                // Closed for good: forgotten (a task's records are not delivered twice).
                tasks.remove(uri);
            }
            Fact::Answered => {
                if !matches!(k.phase, Phase::Running(..)) {
                    k.phase = Phase::Done;
                }
            }
            Fact::Assigned {
                worker,
                attempt,
                cid,
            } => {
                k.assignment = Some(cid);
                if worker == self.did {
                    match &k.phase {
                        Phase::Running(n, _) if *n >= attempt => {}
                        Phase::Done | Phase::HandedOff => {}
                        _ => {
                            if let Phase::Running(_, h) = &k.phase {
                                h.abort();
                            }
                            let job = Job {
                                task_uri: uri.to_string(),
                                task_ref: k.task_ref.clone(),
                                requester: k.requester.clone(),
                                task: k.record.clone(),
                                attempt,
                                context: None,
                                sealed: k.sealed,
                                writer: self.writer.clone(),
                                handed_off: Arc::new(AtomicBool::new(false)),
                            };
                            after.push(After::Start(Box::new(Start {
                                job,
                                rkey: k.rkey.clone(),
                                task_ref: k.task_ref.clone(),
                                lease: k.lease,
                            })));
                        }
                    }
                } else {
                    match &k.phase {
                        Phase::Claimed(_) | Phase::Open => {
                            k.phase = Phase::Taken;
                            after.push(After::Emit(TaskEvent::StoodDown {
                                task: uri.to_string(),
                                winner: worker,
                            }));
                        }
                        Phase::Running(n, h) => {
                            h.abort();
                            let n = *n;
                            k.phase = Phase::Taken;
                            after.push(After::Emit(TaskEvent::Abandoned {
                                task: uri.to_string(),
                                attempt: n,
                            }));
                        }
                        Phase::Taken | Phase::Done | Phase::HandedOff => {}
                    }
                }
            }
            // The lapse of an assignment this worker never saw (it came and went before this
            // worker listened, or before a copy it read) opens the task again all the same;
            // only the lapse of another assignment than the one known is stale.
            Fact::Lapsed { assignment_cid } => {
                if k.assignment
                    .as_deref()
                    .is_none_or(|known| known == assignment_cid.as_str())
                {
                    self.withdraw(k, after);
                }
            }
            // After the lapse ack the deletion changes nothing (the claim this worker may
            // have sent since stands).
            Fact::Withdrawn => {
                if k.assignment.is_some() {
                    self.withdraw(k, after);
                }
            }
        }
    }

    /// The assignment was withdrawn (its lease lapsed): stop if we ran it, and treat the
    /// task as open again, for this worker only if it may claim it (a task handed to it, or
    /// of a type it does not take, is left to others).
    fn withdraw(&self, k: &mut Known, after: &mut Vec<After>) {
        k.assignment = None;
        let reopened = if self.claimable(&k.record) {
            Phase::Open
        } else {
            Phase::Taken
        };
        match &k.phase {
            Phase::Running(n, h) => {
                h.abort();
                let n = *n;
                k.phase = reopened;
                after.push(After::Emit(TaskEvent::Abandoned {
                    task: k.uri.clone(),
                    attempt: n,
                }));
            }
            Phase::Taken | Phase::Claimed(_) => k.phase = reopened,
            Phase::Open | Phase::Done | Phase::HandedOff => {}
        }
    }

    /// Emits the events and starts the attempts `apply` decided on.
    fn finish(self: &Arc<Self>, after: Vec<After>) {
        for a in after {
            match a {
                After::Emit(event) => self.emit(event),
                After::Start(start) => {
                    let Start {
                        job,
                        rkey,
                        task_ref,
                        lease,
                    } = *start;
                    let uri = job.task_uri.clone();
                    let attempt = job.attempt;
                    let handle = tokio::spawn(Arc::clone(self).run(job, rkey, task_ref, lease));
                    let mut tasks = lock(&self.tasks);
                    match tasks.get_mut(&uri) {
                        Some(k) if !matches!(k.phase, Phase::Done) => {
                            k.phase = Phase::Running(attempt, handle.abort_handle());
                        }
                        _ => handle.abort(), // finished or closed meanwhile
                    }
                    drop(tasks);
                    self.emit(TaskEvent::Started { task: uri, attempt });
                }
            }
        }
    }

    /// Claims open tasks while there are free slots. Each worker picks at random among
    /// the open tasks of the highest priority, so workers rarely claim the same one.
    pub(crate) fn claim_more(self: &Arc<Self>) {
        if self.stopped.load(Ordering::SeqCst) {
            return;
        }
        let mut picked = Vec::new();
        {
            let mut tasks = lock(&self.tasks);
            let now = Instant::now();
            for k in tasks.values_mut() {
                if let Phase::Claimed(at) = k.phase
                    && now.duration_since(at) > self.config.claim_timeout
                {
                    k.phase = Phase::Taken;
                }
            }
            let mut free = self
                .config
                .max_concurrent
                .saturating_sub(slots_used(&tasks));
            while free > 0 {
                let open: Vec<(&String, i64)> = tasks
                    .iter()
                    .filter(|(_, k)| matches!(k.phase, Phase::Open))
                    .map(|(u, k)| (u, k.record.priority.unwrap_or(50)))
                    .collect();
                let Some(top) = open.iter().map(|(_, p)| *p).max() else {
                    break;
                };
                let best: Vec<&String> = open
                    .iter()
                    .filter(|(_, p)| *p == top)
                    .map(|(u, _)| *u)
                    .collect();
                let uri = best[fastrand::usize(..best.len())].clone();
                if let Some(k) = tasks.get_mut(&uri) {
                    k.phase = Phase::Claimed(now);
                    picked.push((k.uri.clone(), k.task_ref.clone(), k.lease));
                }
                free -= 1;
            }
        }
        for (uri, task_ref, lease) in picked {
            let me = Arc::clone(self);
            tokio::spawn(async move {
                let record = claim::RecordData {
                    task: task_ref,
                    lease_seconds: i64::try_from(lease.as_secs()).ok(),
                    note: None,
                    created_at: crate::now(),
                }
                .into_record();
                match me.writer.create::<Claim>(&record).await {
                    Ok(_) => me.emit(TaskEvent::ClaimSent { task: uri }),
                    Err(err) => {
                        tracing::warn!(task = %uri, error = %err, "claim not written");
                        let mut tasks = lock(&me.tasks);
                        if let Some(k) = tasks.get_mut(&uri)
                            && matches!(k.phase, Phase::Claimed(_))
                        {
                            k.phase = Phase::Open;
                        }
                    }
                }
            });
        }
    }

    pub(crate) async fn on_assignment(
        self: Arc<Self>,
        rec: Record<Assignment>,
        op: OpEvent,
    ) -> Result<(), HandlerError> {
        let a: &assignment::Record = &rec;
        let uri = task_uri_of(&op.data().did, op.rkey());
        if a.task.uri != uri {
            return Ok(()); // not the protocol's layout: the assignment must sit at the task's key
        }
        let fact = Fact::Assigned {
            worker: a.worker.clone(),
            attempt: u32::try_from(a.attempt).unwrap_or(1),
            cid: rec.cid.to_string(),
        };
        self.learn(&uri, fact, op.origin());
        Ok(())
    }

    /// An ack in a requester's repo: one at a task's key closes the task; a lapse ack
    /// withdraws the assignment it names.
    pub(crate) async fn on_ack(
        self: Arc<Self>,
        rec: Record<Ack>,
        op: OpEvent,
    ) -> Result<(), HandlerError> {
        let requester = &op.data().did;
        match ack_meaning(requester, &rec) {
            AckMeaning::Closes => {
                self.learn(
                    &task_uri_of(requester, op.rkey()),
                    Fact::Closed,
                    op.origin(),
                );
            }
            AckMeaning::Lapse {
                task_key,
                assignment_cid,
                ..
            } => {
                let fact = Fact::Lapsed { assignment_cid };
                self.learn(&task_uri_of(requester, task_key), fact, op.origin());
            }
            AckMeaning::Other => {}
        }
        Ok(())
    }

    /// A result in this worker's own repo (written by an earlier run, or just now): the task
    /// is answered, not to be claimed again.
    pub(crate) async fn on_result(
        self: Arc<Self>,
        rec: Record<ResultC>,
        op: OpEvent,
    ) -> Result<(), HandlerError> {
        if op.data().did == self.did {
            self.learn(&rec.task.uri, Fact::Answered, op.origin());
        }
        Ok(())
    }

    /// A task handed to this agent: continue it from the handed-over state.
    pub(crate) async fn on_handoff(
        self: Arc<Self>,
        rec: Record<Handoff>,
        op: OpEvent,
    ) -> Result<(), HandlerError> {
        let h: &handoff::Record = &rec;
        if self.stopped.load(Ordering::SeqCst) || h.to != self.did {
            return Ok(());
        }
        let start = {
            let mut tasks = lock(&self.tasks);
            let Some(k) = tasks.get_mut(&h.task.uri) else {
                // In a copy of a repo, a handoff of a task not known is most often of one
                // closed long ago: it is not waited for. (A task still open that was handed
                // to an earlier run of this agent is reassigned when its lease lapses.)
                if op.origin() == Origin::Backfill {
                    return Ok(());
                }
                return Err(HandlerError::retry("handed a task not seen yet"));
            };
            // A task we handed off can come back (a reviewer returning a draft): continue it
            // again, once per handoff record.
            if matches!(k.phase, Phase::Running(..) | Phase::Done)
                || !k.continued.insert(rec.uri.clone())
            {
                return Ok(());
            }
            k.phase = Phase::Taken;
            Job {
                task_uri: k.uri.clone(),
                task_ref: k.task_ref.clone(),
                requester: k.requester.clone(),
                task: k.record.clone(),
                attempt: 1,
                context: h
                    .context
                    .as_ref()
                    .and_then(|c| serde_json::to_value(c).ok()),
                sealed: k.sealed,
                writer: self.writer.clone(),
                handed_off: Arc::new(AtomicBool::new(false)),
            }
        };
        tracing::debug!(from = %op.data().did, task = %start.task_uri, "task handed to us");
        let (rkey, task_ref, lease, uri) = {
            let tasks = lock(&self.tasks);
            let Some(k) = tasks.get(&start.task_uri) else {
                return Ok(());
            };
            (k.rkey.clone(), k.task_ref.clone(), k.lease, k.uri.clone())
        };
        let handle = tokio::spawn(Arc::clone(&self).run(start, rkey, task_ref, lease));
        if let Some(k) = lock(&self.tasks).get_mut(&uri)
            && !matches!(k.phase, Phase::Done)
        {
            k.phase = Phase::Running(1, handle.abort_handle());
        }
        self.emit(TaskEvent::Started {
            task: uri,
            attempt: 1,
        });
        Ok(())
    }

    /// The assignment was deleted: withdrawn (its lease lapsed).
    pub(crate) async fn on_assignment_deleted(
        self: Arc<Self>,
        deleted: Deleted<Assignment>,
        op: OpEvent,
    ) -> Result<(), HandlerError> {
        let uri = task_uri_of(&op.data().did, &deleted.rkey);
        self.learn(&uri, Fact::Withdrawn, op.origin());
        Ok(())
    }

    async fn run(
        self: Arc<Self>,
        job: Job,
        rkey: String,
        task_ref: crate::StrongRef,
        lease: Duration,
    ) {
        let uri = job.task_uri.clone();
        let attempt = job.attempt;
        let status_record = |state: &str| {
            let expires = chrono::Utc::now()
                + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(300));
            status::RecordData {
                task: task_ref.clone(),
                state: state.into(),
                progress: None,
                message: None,
                attempt: Some(i64::from(attempt)),
                lease_expires_at: Some(crate::datetime(expires)),
                created_at: crate::now(),
            }
            .into_record()
        };
        // Renew the lease three times per lease period until the work is done.
        let renewer = {
            let writer = self.writer.clone();
            let rkey = rkey.clone();
            let first = status_record("accepted");
            let working = status_record("working");
            AbortOnDrop(tokio::spawn(async move {
                let mut record = first;
                loop {
                    if let Err(err) = writer.put::<Status>(&rkey, &record, None).await {
                        tracing::warn!(error = %err, "lease renewal not written");
                    }
                    record = working.clone();
                    record.data.created_at = crate::now();
                    tokio::time::sleep(lease / 3).await;
                }
            }))
        };
        let handed_off = Arc::clone(&job.handed_off);
        let (sealed, requester) = (job.sealed, job.requester.clone());
        let outcome = (self.config.work)(job).await;
        drop(renewer);
        if handed_off.load(Ordering::SeqCst) {
            let mut tasks = lock(&self.tasks);
            if let Some(k) = tasks.get_mut(&uri) {
                k.phase = Phase::HandedOff;
            }
            drop(tasks);
            self.emit(TaskEvent::HandedOff { task: uri, attempt });
            self.claim_more();
            return;
        }
        let error_of = |message: String| {
            Some(
                defs::ErrorData {
                    code: "internal".into(),
                    message,
                    retryable: Some(false),
                }
                .into(),
            )
        };
        let (outcome_name, output, error) = match (outcome, sealed) {
            (Ok(out), false) => ("success", crate::to_unknown(out), None),
            (Err(message), false) => ("failure", None, error_of(message)),
            // A sealed task's output, and its error message, are sealed for the requester.
            (outcome, true) => {
                let (name, plain) = match outcome {
                    Ok(out) => ("success", out),
                    Err(message) => ("failure", serde_json::json!({ "error": message })),
                };
                match self
                    .keys
                    .seal_json(
                        &plain,
                        &[requester],
                        <ResultC as murmur_pds::Collection>::NSID,
                        "output",
                    )
                    .await
                {
                    Ok(sealed) => (
                        name,
                        Some(sealed),
                        (name == "failure")
                            .then(|| "sealed in the output".to_string())
                            .and_then(error_of),
                    ),
                    Err(err) => (
                        "failure",
                        None,
                        error_of(format!("the result could not be sealed: {err}")),
                    ),
                }
            }
        };
        let record = result_rec::RecordData {
            task: task_ref,
            outcome: outcome_name.into(),
            output,
            artifacts: None,
            error,
            attempt: Some(i64::from(attempt)),
            created_at: crate::now(),
        }
        .into_record();
        // One result per task key in this repo: a second attempt by the same worker finds
        // the first result and does not write another.
        let written = match self
            .writer
            .create_with_rkey::<ResultC>(&rkey, &record)
            .await
        {
            Ok(_) => true,
            Err(err) => match self.writer.get::<ResultC>(&rkey).await {
                Ok(Some(_)) => true,
                _ => {
                    tracing::warn!(task = %uri, error = %err, "result not written");
                    false
                }
            },
        };
        {
            let mut tasks = lock(&self.tasks);
            if let Some(k) = tasks.get_mut(&uri) {
                k.phase = if written { Phase::Done } else { Phase::Open };
            }
        }
        if written {
            self.emit(TaskEvent::Finished { task: uri, attempt });
        }
        self.claim_more();
    }

    /// Stops every running attempt.
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let tasks = lock(&self.tasks);
        for k in tasks.values() {
            if let Phase::Running(_, h) = &k.phase {
                h.abort();
            }
        }
    }
}
