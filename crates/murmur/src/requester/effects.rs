//! The requester's [`Action`]s performed: the writes and reads the state machine asks for,
//! each reported back as the [`Input`] that says how it went.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use murmur_comms::agent::comms::{ack, assignment};
use murmur_comms::{Ack, Assignment, Result as ResultC};
use murmur_pds::{Cid, Collection};

use super::{Requester, strong_ref};
use crate::AgentError;
use crate::lock;
use crate::policy::{ClaimContext, ClaimOffer};
use crate::protocol::{Action, Answer, Closing, Input, lapse_reason};
use crate::task::{TaskEvent, TaskResult};

/// What a closing ack found at a task's key says.
fn closing(ack: &ack::Record) -> Closing {
    if ack.state != "accepted" {
        return Closing::GivenUp;
    }
    let result_uri = ack.subject.uri.clone();
    let worker = result_uri
        .strip_prefix("at://")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default()
        .to_string();
    Closing::Accepted { result_uri, worker }
}

impl Requester {
    /// Performs one action for the task at `rkey`; `Some` input reports its outcome.
    pub(super) async fn perform(
        self: &Arc<Self>,
        rkey: &str,
        action: Action,
    ) -> Result<Option<Input>, String> {
        let task_uri = format!("{}{rkey}", self.prefix);
        match action {
            Action::ArmWindow => self.decide_later(rkey.to_string(), self.choosing.window),
            Action::Choose {
                offers,
                attempt,
                previous,
            } => return Ok(self.choose(rkey, &offers, attempt, &previous)),
            Action::WriteAssignment {
                offer,
                attempt,
                lease,
                first_claim,
            } => {
                if first_claim {
                    lock(&self.stats).claimed += 1;
                }
                return Ok(Some(
                    self.write_assignment(rkey, offer, attempt, lease).await,
                ));
            }
            Action::Assigned { worker, attempt } => {
                lock(&self.stats).assignments += 1;
                self.emit(TaskEvent::Assigned {
                    task: task_uri,
                    worker,
                    attempt,
                });
            }
            Action::SearchResult { holders } => {
                return Ok(Some(Input::Searched(
                    self.find_result(rkey, &holders).await,
                )));
            }
            Action::RecordLapse {
                assignment_cid,
                attempt,
                worker,
            } => {
                let recorded = self
                    .record_lapse(rkey, assignment_cid, attempt, &worker)
                    .await;
                if let Err(err) = &recorded {
                    tracing::warn!(task = %task_uri, error = %err, "lapse not recorded; trying again");
                }
                return Ok(Some(Input::LapseRecorded(
                    recorded.map_err(|e| e.to_string()),
                )));
            }
            Action::LeaseExpired { worker, attempt } => {
                lock(&self.stats).lease_expiries += 1;
                self.emit(TaskEvent::LeaseExpired {
                    task: task_uri,
                    worker,
                    attempt,
                });
            }
            Action::Withdraw { assignment_cid } => {
                // The swap keeps a newer assignment intact.
                let withdrawn = self
                    .writer
                    .delete::<Assignment>(rkey, Some(assignment_cid))
                    .await;
                if let Err(err) = &withdrawn {
                    tracing::warn!(task = %task_uri, error = %err, "could not withdraw a lapsed assignment");
                }
                return Ok(Some(Input::Withdrawn(
                    withdrawn.map(|_| ()).map_err(|e| e.to_string()),
                )));
            }
            Action::WriteAck {
                result_uri,
                result_cid,
            } => {
                let record = ack::RecordData {
                    subject: strong_ref(&result_uri, result_cid),
                    state: "accepted".into(),
                    reason: None,
                    created_at: crate::now(),
                }
                .into_record();
                return Ok(Some(match self.close(rkey, &record).await {
                    Ok(None) => Input::AckWritten,
                    Ok(Some(found)) => Input::AckFound(closing(&found)),
                    Err(err) => Input::AckFailed(err),
                }));
            }
            Action::WriteGiveUp { task_cid, attempts } => {
                let record = ack::RecordData {
                    subject: strong_ref(&task_uri, task_cid),
                    state: "rejected".into(),
                    reason: Some(format!(
                        "given up: the leases of {attempts} attempt(s) lapsed without a result"
                    )),
                    created_at: crate::now(),
                }
                .into_record();
                return Ok(Some(match self.close(rkey, &record).await {
                    Ok(None) => Input::GiveUpWritten,
                    Ok(Some(found)) => Input::AckFound(closing(&found)),
                    Err(err) => {
                        tracing::warn!(task = %task_uri, error = %err, "the ack closing a given-up task was not written; trying again");
                        Input::GiveUpFailed
                    }
                }));
            }
            Action::GiveUpLater { retry } => {
                let me = Arc::clone(self);
                let rkey = rkey.to_string();
                let wait = self.retry.delay(retry).unwrap_or(self.retry.max);
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    if !me.stopped.load(Ordering::SeqCst) {
                        me.give_up(&rkey).await;
                    }
                });
            }
            Action::ReadAccepted { result_uri, worker } => {
                let found = match self.repos.get::<ResultC>(&worker, rkey).await {
                    // A sealed result is opened as the stream's would be; one that does not
                    // open is not an answer.
                    Ok(Some(found)) if found.uri == result_uri => {
                        let path = format!("{}/{rkey}", ResultC::NSID);
                        match murmur_firehose::unseal::<ResultC>(
                            found.value,
                            &worker,
                            self.keys.as_ref(),
                            &path,
                        ) {
                            Ok((record, _)) => Some(Answer {
                                worker: worker.clone(),
                                uri: found.uri,
                                cid: found.cid,
                                record,
                            }),
                            Err(err) => {
                                tracing::warn!(task = %rkey, repo = %worker, reason = %err, "the accepted result read from the repo does not open");
                                None
                            }
                        }
                    }
                    other => {
                        tracing::warn!(task = %rkey, accepted = %result_uri, ?other, "the accepted result could not be read back");
                        None
                    }
                };
                return Ok(Some(Input::AcceptedRead {
                    result_uri,
                    worker,
                    found,
                }));
            }
            Action::Complete { answer, latency } => self.complete(rkey, answer, latency),
            Action::Fail { attempts } => {
                let waiter = lock(&self.tasks)
                    .get_mut(rkey)
                    .and_then(|e| e.waiter.take());
                lock(&self.stats).given_up += 1;
                if let Some(w) = waiter {
                    let _ = w.send(Err(AgentError::AttemptsExhausted {
                        task: task_uri.clone(),
                        attempts,
                    }));
                }
                self.emit(TaskEvent::GivenUp { task: task_uri });
            }
            Action::Duplicate { worker } => {
                lock(&self.stats).duplicates += 1;
                self.emit(TaskEvent::DuplicateResult {
                    task: task_uri,
                    worker,
                });
            }
            Action::Retry(err) => return Err(err),
        }
        Ok(None)
    }

    /// Asks the policy (user code, outside the lock) to choose among `offers`.
    fn choose(
        &self,
        rkey: &str,
        offers: &[ClaimOffer],
        attempt: u32,
        previous: &[String],
    ) -> Option<Input> {
        let (uri, record) = {
            let tasks = lock(&self.tasks);
            let entry = tasks.get(rkey)?;
            (entry.state.uri.clone(), entry.state.record.clone())
        };
        let ctx = ClaimContext {
            task_uri: &uri,
            task: &record,
            attempt,
            previous_workers: previous,
            registry: &self.registry,
        };
        let chosen = self
            .choosing
            .policy
            .choose(&ctx, offers)
            .and_then(|i| offers.get(i).cloned());
        Some(Input::Chosen(chosen))
    }

    /// Creates the assignment at the task's key, never blindly overwriting: if another
    /// writer got there first, its assignment stands.
    async fn write_assignment(
        &self,
        rkey: &str,
        chosen: ClaimOffer,
        attempt: u32,
        lease: Duration,
    ) -> Input {
        let task_ref = chosen.record.task.clone();
        self.emit(TaskEvent::Claimed {
            task: task_ref.uri.clone(),
            worker: chosen.worker.clone(),
        });
        let expires = chrono::Utc::now()
            + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(300));
        let record = assignment::RecordData {
            task: task_ref,
            claim: chosen.claim.clone(),
            worker: chosen.worker.clone(),
            attempt: i64::from(attempt),
            lease_expires_at: crate::datetime(expires),
            created_at: crate::now(),
        }
        .into_record();
        match self
            .writer
            .create_with_rkey::<Assignment>(rkey, &record)
            .await
        {
            Ok(w) => Input::AssignmentWritten {
                worker: chosen.worker,
                cid: w.cid,
            },
            Err(err) => match self.writer.get::<Assignment>(rkey).await {
                Ok(Some(existing)) => Input::AssignmentWritten {
                    worker: existing.value.worker.clone(),
                    cid: existing.cid,
                },
                Ok(None) | Err(_) => Input::AssignmentFailed(err.to_string()),
            },
        }
    }

    /// Creates a closing ack at the task's key (so a task is closed once): `Ok(None)` when
    /// written, `Ok(Some)` with the ack already there (a retried write, or an earlier run
    /// of this agent), `Err` when neither.
    async fn close(&self, rkey: &str, record: &ack::Record) -> Result<Option<ack::Record>, String> {
        match self.writer.create_with_rkey::<Ack>(rkey, record).await {
            Ok(_) => Ok(None),
            Err(err) => match self.writer.get::<Ack>(rkey).await {
                Ok(Some(existing)) => Ok(Some(existing.value)),
                Ok(None) | Err(_) => Err(err.to_string()),
            },
        }
    }

    fn complete(&self, rkey: &str, answer: Answer, latency: Option<Duration>) {
        let waiter = lock(&self.tasks)
            .get_mut(rkey)
            .and_then(|e| e.waiter.take());
        let task_uri = format!("{}{rkey}", self.prefix);
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

    /// Leaves a durable trace of a lapsed attempt (a `rejected` ack of the assignment, at a
    /// fresh TID key, naming the lapsed worker in its `reason`: see [`lapse_reason`]), so a
    /// restarted requester still counts it against `maxAttempts`. Returns when it was made.
    async fn record_lapse(
        &self,
        rkey: &str,
        assignment_cid: Cid,
        attempt: u32,
        worker: &str,
    ) -> Result<chrono::DateTime<chrono::Utc>, murmur_pds::Error> {
        let uri = format!("at://{}/{}/{rkey}", self.did, Assignment::NSID);
        let created_at = crate::now();
        // As a restarted requester reads it back: claims are compared with this.
        let at = chrono::DateTime::parse_from_rfc3339(&created_at)
            .map_or_else(|_| chrono::Utc::now(), |t| t.with_timezone(&chrono::Utc));
        let record = ack::RecordData {
            subject: strong_ref(&uri, assignment_cid),
            state: "rejected".into(),
            reason: Some(lapse_reason(attempt, worker)),
            created_at,
        }
        .into_record();
        self.writer.create::<Ack>(&record).await.map(|_| at)
    }
}
