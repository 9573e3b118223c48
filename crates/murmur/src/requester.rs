//! The requester's side of the task protocol: post tasks, pick one claim per attempt, watch
//! leases, match results to tasks by strongRef.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use murmur_comms::agent::comms::{assignment, claim, result as result_rec, status};
use murmur_comms::{Assignment, Claim, Handoff, Result as ResultC, Status, Task};
use murmur_firehose::{HandlerError, OpEvent, OpKey, Record};
use murmur_pds::{Cid, Writer};
use tokio::sync::{broadcast, oneshot};

use crate::AgentError;
use crate::task::{TaskEvent, TaskHandle, TaskResult, TaskSpec, TaskStats};

/// Where one of our tasks stands.
#[derive(Debug, Clone)]
enum Phase {
    /// Waiting for a claim.
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
    /// A result arrived.
    Done { key: OpKey, worker: String },
    /// `maxAttempts` leases lapsed.
    GivenUp,
}

struct Entry {
    uri: String,
    cid: Option<String>,
    lease: Duration,
    max_attempts: u32,
    attempt: u32,
    phase: Phase,
    claimed_at: Option<Instant>,
    /// Every agent that held this task (assigned or handed to): only they may answer it.
    holders: Vec<String>,
    waiter: Option<oneshot::Sender<Result<TaskResult, AgentError>>>,
}

pub(crate) struct Requester {
    prefix: String,
    writer: Writer,
    tasks: Mutex<HashMap<String, Entry>>,
    stats: Mutex<TaskStats>,
    events: broadcast::Sender<TaskEvent>,
}

impl Requester {
    pub(crate) fn new(writer: Writer, events: broadcast::Sender<TaskEvent>) -> Arc<Self> {
        let did = writer.did().to_string();
        Arc::new(Requester {
            prefix: format!("at://{did}/{}/", <Task as murmur_pds::Collection>::NSID),
            writer,
            tasks: Mutex::new(HashMap::new()),
            stats: Mutex::new(TaskStats::default()),
            events,
        })
    }

    fn emit(&self, event: TaskEvent) {
        let _ = self.events.send(event);
    }

    pub(crate) fn stats(&self) -> TaskStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The record key of one of our tasks, from a strongRef's uri.
    fn our_rkey<'a>(&self, task_uri: &'a str) -> Option<&'a str> {
        task_uri.strip_prefix(self.prefix.as_str())
    }

    /// Registers a task about to be written and returns its record, key and handle. Entries
    /// exist before the write: a claim can come back before the write returns.
    fn register(
        self: &Arc<Self>,
        spec: TaskSpec,
    ) -> (murmur_comms::agent::comms::task::Record, TaskHandle) {
        let record = spec.into_record();
        let lease = Duration::from_secs(
            u64::try_from(record.lease_seconds.unwrap_or(300))
                .unwrap_or(300)
                .max(1),
        );
        let max_attempts = u32::try_from(record.max_attempts.unwrap_or(3))
            .unwrap_or(3)
            .max(1);
        let rkey = self.writer.next_rkey();
        let uri = format!("{}{rkey}", self.prefix);
        let (tx, rx) = oneshot::channel();
        self.tasks.lock().unwrap_or_else(|e| e.into_inner()).insert(
            rkey.clone(),
            Entry {
                uri: uri.clone(),
                cid: None,
                lease,
                max_attempts,
                attempt: 0,
                phase: Phase::Open,
                claimed_at: None,
                holders: Vec::new(),
                waiter: Some(tx),
            },
        );
        let me = Arc::downgrade(self);
        let key = rkey.clone();
        let handle = TaskHandle {
            uri,
            cid: String::new(),
            rkey,
            rx,
            describe: Arc::new(move || {
                me.upgrade()
                    .map_or_else(|| "agent stopped".into(), |r| r.describe(&key))
            }),
        };
        (record, handle)
    }

    fn written(&self, handle: &mut TaskHandle, cid: Cid) {
        handle.cid = cid.to_string();
        if let Some(entry) = self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&handle.rkey)
        {
            entry.cid = Some(handle.cid.clone());
        }
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).posted += 1;
        self.emit(TaskEvent::Posted {
            task: handle.uri.clone(),
        });
    }

    fn forget(&self, rkeys: &[String]) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
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
        let tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        match tasks.get(rkey).map(|e| (&e.phase, e.attempt)) {
            None => "unknown task".into(),
            Some((Phase::Open, 0)) => "open, nobody claimed it".into(),
            Some((Phase::Open, n)) => format!("open again after {n} attempt(s), no claim since"),
            Some((Phase::Assigning, n)) => format!("being assigned (attempt {n})"),
            Some((Phase::Assigned { worker, .. }, n)) => {
                format!("assigned to {worker} (attempt {n}), no result yet")
            }
            Some((Phase::Reopening, n)) => format!("lease of attempt {n} lapsed, reopening"),
            Some((Phase::Done { worker, .. }, _)) => format!("done by {worker}"),
            Some((Phase::GivenUp, n)) => format!("given up after {n} attempt(s)"),
        }
    }

    /// A claim on the stream: the first claim of an open task wins the attempt.
    pub(crate) async fn on_claim(
        self: Arc<Self>,
        rec: Record<Claim>,
        op: OpEvent,
    ) -> Result<(), HandlerError> {
        let claim: &claim::Record = &rec;
        let Some(rkey) = self.our_rkey(&claim.task.uri).map(str::to_string) else {
            return Ok(());
        };
        let worker = op.data().did.clone();
        let (attempt, lease, task_ref) = {
            let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
            let Some(entry) = tasks.get_mut(&rkey) else {
                return Ok(());
            };
            if entry
                .cid
                .as_deref()
                .is_some_and(|c| c != claim.task.cid.as_ref().to_string())
            {
                return Ok(()); // a claim on another version of the task
            }
            if !matches!(entry.phase, Phase::Open) {
                return Ok(()); // someone already won this attempt: the claim loses
            }
            entry.phase = Phase::Assigning;
            entry.attempt += 1;
            let first = entry.claimed_at.is_none();
            entry.claimed_at = Some(Instant::now());
            if first {
                self.stats.lock().unwrap_or_else(|e| e.into_inner()).claimed += 1;
            }
            (entry.attempt, entry.lease, claim.task.clone())
        };
        self.emit(TaskEvent::Claimed {
            task: task_ref.uri.clone(),
            worker: worker.clone(),
        });
        let expires = chrono::Utc::now()
            + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(300));
        let record = assignment::RecordData {
            task: task_ref.clone(),
            claim: rec.strong_ref(),
            worker: worker.clone(),
            attempt: i64::from(attempt),
            lease_expires_at: crate::datetime(expires),
            created_at: crate::now(),
        }
        .into_record();
        // The assignment lives at the task's key and is created, never blindly overwritten:
        // if another writer got there first, its assignment stands.
        let written = self
            .writer
            .create_with_rkey::<Assignment>(&rkey, &record)
            .await;
        let outcome = match written {
            Ok(w) => Ok((worker.clone(), w.cid)),
            Err(err) => match self.writer.get::<Assignment>(&rkey).await {
                Ok(Some(existing)) => Ok((existing.value.worker.clone(), existing.cid)),
                Ok(None) | Err(_) => Err(err),
            },
        };
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = tasks.get_mut(&rkey) else {
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
                drop(tasks);
                self.stats
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .assignments += 1;
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
                Err(HandlerError::retry(format!(
                    "writing the assignment: {err}"
                )))
            }
        }
    }

    /// A status from the assigned worker renews its lease.
    pub(crate) async fn on_status(
        self: Arc<Self>,
        rec: Record<Status>,
        op: OpEvent,
    ) -> Result<(), HandlerError> {
        let status: &status::Record = &rec;
        let Some(rkey) = self.our_rkey(&status.task.uri) else {
            return Ok(());
        };
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = tasks.get_mut(rkey) {
            let lease = entry.lease;
            if let Phase::Assigned {
                worker, deadline, ..
            } = &mut entry.phase
                && *worker == op.data().did
            {
                *deadline = Instant::now() + lease;
            }
        }
        Ok(())
    }

    /// A handoff by the assigned worker moves the lease to the agent it names.
    pub(crate) async fn on_handoff(
        self: Arc<Self>,
        rec: Record<Handoff>,
        op: OpEvent,
    ) -> Result<(), HandlerError> {
        let Some(rkey) = self.our_rkey(&rec.task.uri) else {
            return Ok(());
        };
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = tasks.get_mut(rkey) {
            let lease = entry.lease;
            if let Phase::Assigned {
                worker, deadline, ..
            } = &mut entry.phase
                && *worker == op.data().did
            {
                *worker = rec.to.clone();
                *deadline = Instant::now() + lease;
                if !entry.holders.contains(&rec.to) {
                    entry.holders.push(rec.to.clone());
                }
            }
        }
        Ok(())
    }

    /// A result: the first one matching the task's strongRef completes it.
    pub(crate) async fn on_result(
        self: Arc<Self>,
        rec: Record<ResultC>,
        op: OpEvent,
    ) -> Result<(), HandlerError> {
        let result: &result_rec::Record = &rec;
        let Some(rkey) = self.our_rkey(&result.task.uri).map(str::to_string) else {
            return Ok(());
        };
        let worker = op.data().did.clone();
        let key = op.key();
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = tasks.get_mut(&rkey) else {
            return Ok(());
        };
        if entry
            .cid
            .as_deref()
            .is_some_and(|c| c != result.task.cid.as_ref().to_string())
        {
            return Ok(()); // a result for another version of the task
        }
        if !entry.holders.contains(&worker) {
            // Only an agent that held the task may answer it.
            tracing::debug!(task = %entry.uri, from = %worker, "result from an agent never assigned");
            return Ok(());
        }
        if let Phase::Done { key: done_key, .. } = &entry.phase {
            if *done_key != key {
                drop(tasks);
                self.stats
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .duplicates += 1;
                self.emit(TaskEvent::DuplicateResult {
                    task: format!("{}{rkey}", self.prefix),
                    worker,
                });
            }
            return Ok(()); // the same op delivered again: nothing new
        }
        let latency = entry.claimed_at.map(|t| t.elapsed());
        entry.phase = Phase::Done {
            key,
            worker: worker.clone(),
        };
        let task_uri = entry.uri.clone();
        let waiter = entry.waiter.take();
        drop(tasks);
        {
            let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
            stats.done += 1;
            *stats.done_by.entry(worker.clone()).or_default() += 1;
            if let Some(l) = latency {
                stats.latencies.push(l);
            }
        }
        if let Some(waiter) = waiter {
            let _ = waiter.send(Ok(TaskResult {
                task: task_uri.clone(),
                uri: rec.uri.clone(),
                worker: worker.clone(),
                record: rec.value.clone(),
                claim_to_result: latency,
            }));
        }
        self.emit(TaskEvent::Completed {
            task: task_uri,
            worker,
        });
        Ok(())
    }

    /// Withdraws lapsed assignments (reopening the task) or gives the task up after
    /// `maxAttempts`. Called periodically.
    pub(crate) async fn check_leases(self: &Arc<Self>) {
        let now = Instant::now();
        let mut lapsed = Vec::new();
        {
            let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
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
                    ));
                    entry.phase = Phase::Reopening;
                }
            }
        }
        for (rkey, uri, worker, cid, attempt, exhausted) in lapsed {
            self.stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .lease_expiries += 1;
            self.emit(TaskEvent::LeaseExpired {
                task: uri.clone(),
                worker: worker.clone(),
                attempt,
            });
            // Withdrawing the assignment tells the lapsed worker to stop and every other
            // worker that the task is open again. The swap keeps a newer assignment intact.
            let withdrawn = self.writer.delete::<Assignment>(&rkey, Some(cid)).await;
            let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
            let Some(entry) = tasks.get_mut(&rkey) else {
                continue;
            };
            if !matches!(entry.phase, Phase::Reopening) {
                continue; // a result arrived meanwhile
            }
            match withdrawn {
                Ok(_) if exhausted => {
                    entry.phase = Phase::GivenUp;
                    let waiter = entry.waiter.take();
                    drop(tasks);
                    self.stats
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .given_up += 1;
                    if let Some(w) = waiter {
                        let _ = w.send(Err(AgentError::AttemptsExhausted {
                            task: uri.clone(),
                            attempts: attempt,
                        }));
                    }
                    self.emit(TaskEvent::GivenUp { task: uri });
                }
                Ok(_) => entry.phase = Phase::Open,
                Err(err) => {
                    // Try again on the next check.
                    tracing::warn!(task = %uri, error = %err, "could not withdraw a lapsed assignment");
                    entry.phase = Phase::Assigned {
                        worker,
                        assignment_cid: cid,
                        deadline: now,
                    };
                }
            }
        }
    }

    /// Fails every waiting request (the agent is stopping).
    pub(crate) fn stop(&self) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        for entry in tasks.values_mut() {
            if let Some(w) = entry.waiter.take() {
                let _ = w.send(Err(AgentError::Stopped {
                    task: entry.uri.clone(),
                }));
            }
        }
    }
}
