//! Task protocol vocabulary shared by requesters and workers: specs, handles, events, stats
//! and the recovery report.

use std::collections::BTreeMap;
use std::time::Duration;

use murmur_comms::agent::comms::{result as result_rec, task};
use tokio::sync::oneshot;

use crate::AgentError;

/// A task to post with [`Agent::request`](crate::Agent::request).
///
/// ```
/// use std::time::Duration;
/// let spec = murmur::TaskSpec::new("translate")
///     .title("README to French")
///     .payload(serde_json::json!({"text": "hello"}))
///     .lease(Duration::from_secs(10))
///     .max_attempts(3);
/// assert_eq!(spec.record().task_type, "translate");
/// ```
#[derive(Debug, Clone)]
pub struct TaskSpec {
    record: task::RecordData,
    sealed_for: Option<Vec<String>>,
}

impl TaskSpec {
    /// A task of `task_type` (matched against worker capabilities), lease 300 s, 3 attempts.
    pub fn new(task_type: impl Into<String>) -> Self {
        TaskSpec {
            record: task::RecordData {
                task_type: task_type.into(),
                title: None,
                payload: None,
                assignee: None,
                deadline: None,
                lease_seconds: None,
                max_attempts: None,
                priority: None,
                created_at: String::new(),
            },
            sealed_for: None,
        }
    }

    /// A short human-readable summary.
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.record.title = Some(title.into());
        self
    }

    /// The task input (a JSON object; other JSON values are wrapped as `{"value": ..}`).
    pub fn payload(mut self, payload: serde_json::Value) -> Self {
        self.record.payload = crate::to_unknown(payload);
        self
    }

    /// Seals the payload (`agent.comms.defs#sealed`) so that only these agents and the
    /// requester can read it; their keys are looked up from their profiles when the task
    /// is posted. The task itself stays public (everyone sees that it exists, its type,
    /// title and who it is sealed for); a worker claims it only if it can open it, and its
    /// result is sealed for the requester. Needs an agent with encryption keys
    /// ([`AgentBuilder::keyring`](crate::AgentBuilder::keyring)).
    ///
    /// ```
    /// let spec = murmur::TaskSpec::new("review")
    ///     .payload(serde_json::json!({"diff": "secret"}))
    ///     .sealed_for(["did:plc:bob"]);
    /// assert_eq!(spec.recipients(), Some(&["did:plc:bob".to_string()][..]));
    /// ```
    pub fn sealed_for(mut self, dids: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.sealed_for = Some(dids.into_iter().map(Into::into).collect());
        self
    }

    /// The agents the payload will be sealed for, if it is sealed.
    pub fn recipients(&self) -> Option<&[String]> {
        self.sealed_for.as_deref()
    }

    /// Takes the recipients and the plaintext payload, to seal it before posting.
    pub(crate) fn take_sealing(&mut self) -> Option<(Vec<String>, serde_json::Value)> {
        let dids = self.sealed_for.take()?;
        let payload = self
            .record
            .payload
            .take()
            .and_then(|p| serde_json::to_value(p).ok())
            .unwrap_or(serde_json::Value::Null);
        Some((dids, payload))
    }

    /// Sets the (sealed) payload object.
    pub(crate) fn set_payload(&mut self, payload: atrium_api::types::Unknown) {
        self.record.payload = Some(payload);
    }

    /// Only this agent should claim the task.
    pub fn assignee(mut self, did: impl Into<String>) -> Self {
        self.record.assignee = Some(did.into());
        self
    }

    /// How long an assignment lasts without a status renewal (whole seconds, at least 1).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.record.lease_seconds = Some(i64::try_from(lease.as_secs().max(1)).unwrap_or(86_400));
        self
    }

    /// How many assignments the task may have, the first included.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.record.max_attempts = Some(i64::from(attempts));
        self
    }

    /// Higher runs first (0 to 100).
    pub fn priority(mut self, priority: u8) -> Self {
        self.record.priority = Some(i64::from(priority));
        self
    }

    /// The record as it will be written (`createdAt` is set when posted).
    pub fn record(&self) -> &task::RecordData {
        &self.record
    }

    pub(crate) fn into_record(mut self) -> task::Record {
        if self.record.created_at.is_empty() {
            self.record.created_at = crate::now();
        }
        self.record.into_record()
    }
}

impl From<task::RecordData> for TaskSpec {
    fn from(record: task::RecordData) -> Self {
        TaskSpec {
            record,
            sealed_for: None,
        }
    }
}

/// How long an assignment of `task` lasts without a status renewal (`leaseSeconds`,
/// default 300, at least 1 s).
pub(crate) fn lease_of(task: &task::Record) -> Duration {
    Duration::from_secs(
        u64::try_from(task.lease_seconds.unwrap_or(300))
            .unwrap_or(300)
            .max(1),
    )
}

/// The result of a task, as the requester received it.
#[derive(Debug, Clone)]
pub struct TaskResult {
    /// at-uri of the task.
    pub task: String,
    /// at-uri of the result record (in the worker's repo).
    pub uri: String,
    /// DID of the worker that wrote it.
    pub worker: String,
    /// The result record.
    pub record: result_rec::Record,
    /// Time from the winning claim's arrival to the result's arrival.
    pub claim_to_result: Option<Duration>,
}

impl TaskResult {
    /// The `output` field as JSON (`Null` when absent).
    pub fn output_json(&self) -> serde_json::Value {
        self.record
            .output
            .as_ref()
            .and_then(|o| serde_json::to_value(o).ok())
            .unwrap_or(serde_json::Value::Null)
    }
}

/// A posted task, or one recovered from the repo after a restart
/// ([`Agent::recovered_tasks`](crate::Agent::recovered_tasks)); wait for its result with
/// [`TaskHandle::await_result`].
pub struct TaskHandle {
    /// at-uri of the task.
    pub uri: String,
    /// CID of the task record.
    pub cid: String,
    /// Record key of the task (also the key of its assignment, statuses and results).
    pub rkey: String,
    pub(crate) rx: oneshot::Receiver<Result<TaskResult, AgentError>>,
    pub(crate) describe: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
}

impl std::fmt::Debug for TaskHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHandle")
            .field("uri", &self.uri)
            .field("cid", &self.cid)
            .finish_non_exhaustive()
    }
}

impl TaskHandle {
    /// Waits for the result (matched to this task by strongRef), at most `timeout`.
    ///
    /// Errors: [`AgentError::Timeout`] when nobody answered in time,
    /// [`AgentError::AttemptsExhausted`] when every allowed assignment lapsed.
    pub async fn await_result(self, timeout: Duration) -> Result<TaskResult, AgentError> {
        match tokio::time::timeout(timeout, self.rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(AgentError::Stopped { task: self.uri }),
            Err(_) => Err(AgentError::Timeout {
                state: (self.describe)(),
                task: self.uri,
                waited: timeout,
            }),
        }
    }
}

/// Something that happened in the task protocol, as one agent saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEvent {
    /// Requester: a task was posted.
    Posted {
        /// at-uri of the task.
        task: String,
    },
    /// Requester: a claim arrived for an open task.
    Claimed {
        /// at-uri of the task.
        task: String,
        /// The claiming worker.
        worker: String,
    },
    /// Requester: an assignment was written.
    Assigned {
        /// at-uri of the task.
        task: String,
        /// The winning worker.
        worker: String,
        /// Attempt number.
        attempt: u32,
    },
    /// Requester: a lease lapsed; the assignment was withdrawn and the task reopened.
    LeaseExpired {
        /// at-uri of the task.
        task: String,
        /// The worker whose lease lapsed.
        worker: String,
        /// The lapsed attempt.
        attempt: u32,
    },
    /// Requester: the task's result arrived.
    Completed {
        /// at-uri of the task.
        task: String,
        /// The worker that wrote the result.
        worker: String,
    },
    /// Requester: a second result arrived for a completed task.
    DuplicateResult {
        /// at-uri of the task.
        task: String,
        /// The worker that wrote it.
        worker: String,
    },
    /// Requester: `maxAttempts` leases lapsed; the task was given up.
    GivenUp {
        /// at-uri of the task.
        task: String,
    },
    /// Worker: this agent claimed a task.
    ClaimSent {
        /// at-uri of the task.
        task: String,
    },
    /// Worker: another worker won the task; this one stood down.
    StoodDown {
        /// at-uri of the task.
        task: String,
        /// The winner.
        winner: String,
    },
    /// Worker: started an assigned attempt.
    Started {
        /// at-uri of the task.
        task: String,
        /// Attempt number.
        attempt: u32,
    },
    /// Worker: wrote the result.
    Finished {
        /// at-uri of the task.
        task: String,
        /// Attempt number.
        attempt: u32,
    },
    /// Worker: handed the task to another agent (`Job::hand_off`); no result from this one.
    HandedOff {
        /// at-uri of the task.
        task: String,
        /// Attempt number.
        attempt: u32,
    },
    /// Worker: the assignment was withdrawn while running; the attempt was abandoned.
    Abandoned {
        /// at-uri of the task.
        task: String,
        /// Attempt number.
        attempt: u32,
    },
}

/// What a requester rebuilt from the repos when it started ([`Agent::recovery`]).
///
/// [`Agent::recovery`]: crate::Agent::recovery
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Recovery {
    /// Tasks of this identity without a closing ack: the ones taken over. Their handles
    /// come from [`Agent::recovered_tasks`](crate::Agent::recovered_tasks).
    pub open: usize,
    /// Of those, tasks whose result was already in a worker's repo, accepted at start.
    pub done_while_away: usize,
    /// Tasks still assigned: their leases are watched again.
    pub assigned: usize,
    /// Tasks waiting to be assigned (never assigned, or reopened after a lapse).
    pub unassigned: usize,
    /// Claims on those tasks read from the workers' repos.
    pub claims_found: usize,
    /// Tasks closed as given up at start (their attempts were used up).
    pub given_up: usize,
    /// Repos that could not be read; their tasks rely on the stream and the lease.
    pub unreadable: Vec<String>,
    /// How long recovery took.
    pub elapsed: Duration,
}

/// Counters of a requester's tasks.
#[derive(Debug, Clone, Default)]
pub struct TaskStats {
    /// Tasks posted.
    pub posted: u64,
    /// Open tasks taken over from the repo when the agent started (see
    /// [`Agent::recovery`](crate::Agent::recovery)).
    pub recovered: u64,
    /// Tasks that received at least one claim.
    pub claimed: u64,
    /// Assignments written (reassignments included).
    pub assignments: u64,
    /// Tasks with a result.
    pub done: u64,
    /// Leases that lapsed.
    pub lease_expiries: u64,
    /// Tasks given up after maxAttempts.
    pub given_up: u64,
    /// Results that arrived for an already completed task.
    pub duplicates: u64,
    /// Results per worker DID.
    pub done_by: BTreeMap<String, u64>,
    /// Claim-to-result latency of every completed task.
    pub latencies: Vec<Duration>,
}

impl TaskStats {
    /// The `q` quantile (0.0 to 1.0) of the claim-to-result latencies.
    pub fn latency_quantile(&self, q: f64) -> Option<Duration> {
        if self.latencies.is_empty() {
            return None;
        }
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let rank = (q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64).round() as usize;
        sorted.get(rank).copied()
    }
}
