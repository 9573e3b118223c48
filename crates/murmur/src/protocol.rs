//! The requester's task protocol decisions as a state machine without I/O: one
//! [`TaskState`] per task, moved by [`TaskState::step`] from an [`Input`] (something seen
//! or an outcome of a write) to the [`Action`]s the requester performs. `requester.rs`
//! feeds it events and performs its actions; `recovery.rs` seeds it from the repos.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use murmur_comms::agent::comms::{result as result_rec, task};
use murmur_pds::Cid;

use crate::policy::ClaimOffer;

/// The `reason` of the ack recording a lapsed lease: `lease of attempt N lapsed (worker DID)`.
pub(crate) fn lapse_reason(attempt: u32, worker: &str) -> String {
    format!("lease of attempt {attempt} lapsed (worker {worker})")
}

/// The worker named by a [`lapse_reason`] (acks written before it named one have none).
pub(crate) fn lapsed_worker(reason: &str) -> Option<&str> {
    let worker = reason.rsplit_once(" (worker ")?.1.strip_suffix(')')?;
    (worker.starts_with("did:") && !worker.contains(char::is_whitespace)).then_some(worker)
}

/// A result as the requester sees it, from the stream or read from a repo.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub(crate) worker: String,
    pub(crate) uri: String,
    pub(crate) cid: Cid,
    pub(crate) record: result_rec::Record,
}

/// Where one of our tasks stands.
#[derive(Debug, Clone)]
pub(crate) enum Phase {
    /// Waiting for a claim the policy accepts.
    Open,
    /// The assignment of this claim is being written.
    Assigning { claim: String },
    /// Assigned; the lease runs until `deadline`.
    Assigned {
        worker: String,
        assignment_cid: Cid,
        deadline: Instant,
    },
    /// The lease of this assignment ran out: the holders' repos are searched for a missed
    /// result, then the lapse is recorded and the assignment withdrawn.
    Lapsing { worker: String, assignment_cid: Cid },
    /// The last of `maxAttempts` leases lapsed and its assignment is withdrawn: the task
    /// waits to be given up (a result arriving now is still accepted).
    Exhausted,
    /// The ack closing the task with this result is being written; `before` comes back if
    /// the write fails.
    Accepting {
        answer: Box<Answer>,
        before: Box<Phase>,
    },
    /// The ack closing the task as given up is being written.
    GivingUp,
    /// A result was accepted (its ack is written).
    Done { result_uri: String, worker: String },
    /// `maxAttempts` leases lapsed.
    GivenUp,
}

/// The task's closing ack, found in the repo when ours could not be created at its key.
#[derive(Debug, Clone)]
pub(crate) enum Closing {
    /// `accepted`: the task is done with this result.
    Accepted { result_uri: String, worker: String },
    /// `rejected`: the task was given up.
    GivenUp,
}

/// Something the requester saw, or the outcome of an action it performed.
#[derive(Debug)]
pub(crate) enum Input {
    /// A claim on the task (from the stream, or read from a worker's repo).
    Claim(ClaimOffer),
    /// The claim window closed, or a failed assignment is tried again: ask the policy.
    Decide,
    /// A retry of [`Input::Decide`] is scheduled: claims wait for it instead of arming a
    /// window of their own.
    DecideScheduled,
    /// The policy's choice among the offers of [`Action::Choose`] (`None`: wait for more).
    Chosen(Option<ClaimOffer>),
    /// The assignment at the task's key names `worker`: ours, or one that got there first.
    AssignmentWritten { worker: String, cid: Cid },
    /// The assignment could not be written nor read back.
    AssignmentFailed(String),
    /// `worker` renewed its lease, until `until` (`None`: a full lease from now).
    Renewed {
        worker: String,
        until: Option<Instant>,
    },
    /// `from` handed the task to `to`.
    Handoff { from: String, to: String },
    /// Time passed: a lease past its deadline lapses.
    Tick,
    /// The holders' repos were searched for a result the stream may have missed.
    Searched(Option<Answer>),
    /// The lapse ack was written at `at` (`Err`: it was not).
    LapseRecorded(Result<DateTime<Utc>, String>),
    /// The lapsed assignment was deleted (`Err`: it was not).
    Withdrawn(Result<(), String>),
    /// Give the task up if its attempts are used up.
    GiveUp,
    /// The ack closing the task as given up is written.
    GiveUpWritten,
    /// That ack was neither written nor found at the task's key.
    GiveUpFailed,
    /// A result for the task.
    Result(Answer),
    /// Our `accepted` ack is written.
    AckWritten,
    /// Our ack could not be written nor read back.
    AckFailed(String),
    /// Our ack was refused: this one closes the task already.
    AckFound(Closing),
    /// The accepted result named by the closing ack, read back from its worker's repo.
    AcceptedRead {
        result_uri: String,
        worker: String,
        found: Option<Answer>,
    },
}

/// What the requester does next for the task.
#[derive(Debug)]
pub(crate) enum Action {
    /// Start the claim window; [`Input::Decide`] when it closes.
    ArmWindow,
    /// Ask the claim policy to choose among `offers`, then [`Input::Chosen`].
    Choose {
        offers: Vec<ClaimOffer>,
        attempt: u32,
        previous: Vec<String>,
    },
    /// Create the assignment of `attempt` at the task's key, then
    /// [`Input::AssignmentWritten`] or [`Input::AssignmentFailed`]. `first_claim`: the task
    /// had no assignment before (counted once).
    WriteAssignment {
        offer: ClaimOffer,
        attempt: u32,
        lease: Duration,
        first_claim: bool,
    },
    /// Count and announce an assignment.
    Assigned { worker: String, attempt: u32 },
    /// Look in the holders' repos (latest first) for a result, then [`Input::Searched`].
    SearchResult { holders: Vec<String> },
    /// Write the lapse ack, then [`Input::LapseRecorded`].
    RecordLapse {
        assignment_cid: Cid,
        attempt: u32,
        worker: String,
    },
    /// Count and announce a lapsed lease.
    LeaseExpired { worker: String, attempt: u32 },
    /// Delete the assignment, swapping on its CID, then [`Input::Withdrawn`].
    Withdraw { assignment_cid: Cid },
    /// Create the `accepted` ack of this result at the task's key, then
    /// [`Input::AckWritten`], [`Input::AckFound`] or [`Input::AckFailed`].
    WriteAck { result_uri: String, result_cid: Cid },
    /// Create the `rejected` ack of the task at its key, then [`Input::GiveUpWritten`],
    /// [`Input::AckFound`] or [`Input::GiveUpFailed`].
    WriteGiveUp { task_cid: Cid, attempts: u32 },
    /// [`Input::GiveUp`] again after the requester's retry backoff; `retry` counts the
    /// earlier failed tries (0 after the first failure).
    GiveUpLater { retry: u32 },
    /// Read the accepted result back from `worker`'s repo, then [`Input::AcceptedRead`].
    ReadAccepted { result_uri: String, worker: String },
    /// Complete the task's handle with `answer`, count and announce it.
    Complete {
        answer: Answer,
        latency: Option<Duration>,
    },
    /// Fail the task's handle: its attempts are used up.
    Fail { attempts: u32 },
    /// Count and announce a result besides the accepted one.
    Duplicate { worker: String },
    /// Tell the caller this event cannot be handled now (it is retried).
    Retry(String),
}

/// One of our tasks: what the protocol knows about it.
#[derive(Debug)]
pub(crate) struct TaskState {
    pub(crate) uri: String,
    /// The task record's CID once written (results and claims must cite this version).
    pub(crate) cid: Option<String>,
    pub(crate) record: task::Record,
    pub(crate) lease: Duration,
    pub(crate) max_attempts: u32,
    /// The claim window: zero assigns on the first acceptable claim.
    pub(crate) window: Duration,
    pub(crate) attempt: u32,
    pub(crate) phase: Phase,
    pub(crate) claimed_at: Option<Instant>,
    /// Every agent that held this task (assigned or handed to): only they may answer it.
    pub(crate) holders: Vec<String>,
    /// Claims on the current attempt, in arrival order.
    pub(crate) offers: Vec<ClaimOffer>,
    /// A claim-window timer (or a retry) is running for this task.
    pub(crate) deciding: bool,
    /// When the latest lease lapsed: claims made before it were for an earlier attempt.
    pub(crate) since: Option<DateTime<Utc>>,
    /// Claims already assigned once: a claim wins one attempt at most.
    pub(crate) spent: Vec<String>,
    /// Writes of the give-up ack that failed so far.
    pub(crate) give_up_failures: u32,
}

impl TaskState {
    pub(crate) fn new(
        uri: String,
        cid: Option<String>,
        record: task::Record,
        window: Duration,
    ) -> TaskState {
        let lease = crate::task::lease_of(&record);
        let max_attempts = u32::try_from(record.max_attempts.unwrap_or(3))
            .unwrap_or(3)
            .max(1);
        TaskState {
            uri,
            cid,
            record,
            lease,
            max_attempts,
            window,
            attempt: 0,
            phase: Phase::Open,
            claimed_at: None,
            holders: Vec::new(),
            offers: Vec::new(),
            deciding: false,
            since: None,
            spent: Vec::new(),
            give_up_failures: 0,
        }
    }

    /// Whether a record citing the task by `cid` cites this version of it.
    fn same_version(&self, cid: &atrium_api::types::string::Cid) -> bool {
        self.cid
            .as_deref()
            .is_none_or(|c| c == cid.as_ref().to_string())
    }

    fn hold(&mut self, worker: &str) {
        if !self.holders.iter().any(|h| h == worker) {
            self.holders.push(worker.to_string());
        }
    }

    /// A claim made for an attempt that is over: before the latest lapse, or one that
    /// already won an attempt.
    fn stale(&self, offer: &ClaimOffer) -> bool {
        if self.spent.contains(&offer.claim.uri) {
            return true;
        }
        self.since.is_some_and(|since| {
            DateTime::parse_from_rfc3339(&offer.record.created_at)
                .map_or(true, |made| made.with_timezone(&Utc) <= since)
        })
    }

    /// Moves the task on after `input` at `now`; returns what to do about it, in order.
    pub(crate) fn step(&mut self, input: Input, now: Instant) -> Vec<Action> {
        match input {
            Input::Claim(offer) => self.claim(offer),
            Input::Decide => self.decide(),
            Input::DecideScheduled => {
                self.deciding = true;
                vec![]
            }
            Input::Chosen(chosen) => self.chosen(chosen, now),
            Input::AssignmentWritten { worker, cid } => {
                self.hold(&worker);
                if let Phase::Assigning { claim } = &self.phase {
                    // Whoever won the key, this claim had its attempt.
                    self.spent.push(claim.clone());
                    self.phase = Phase::Assigned {
                        worker: worker.clone(),
                        assignment_cid: cid,
                        deadline: now + self.lease,
                    };
                }
                self.offers.clear();
                vec![Action::Assigned {
                    worker,
                    attempt: self.attempt,
                }]
            }
            Input::AssignmentFailed(err) => {
                if matches!(self.phase, Phase::Assigning { .. }) {
                    self.phase = Phase::Open;
                    self.attempt -= 1;
                }
                vec![Action::Retry(format!("writing the assignment: {err}"))]
            }
            Input::Renewed { worker, until } => {
                let until = until.unwrap_or(now + self.lease);
                if let Phase::Assigned {
                    worker: holder,
                    deadline,
                    ..
                } = &mut self.phase
                    && *holder == worker
                {
                    *deadline = (*deadline).max(until);
                }
                vec![]
            }
            Input::Handoff { from, to } => {
                if let Phase::Assigned {
                    worker, deadline, ..
                } = &mut self.phase
                    && *worker == from
                {
                    worker.clone_from(&to);
                    *deadline = now + self.lease;
                    self.hold(&to);
                }
                vec![]
            }
            Input::Tick => self.tick(now),
            Input::Searched(found) => self.searched(found, now),
            Input::LapseRecorded(recorded) => self.lapse_recorded(recorded, now),
            Input::Withdrawn(withdrawn) => self.withdrawn(withdrawn, now),
            Input::GiveUp => self.give_up(),
            Input::GiveUpWritten => self.close_given_up(),
            Input::GiveUpFailed => {
                if matches!(self.phase, Phase::GivingUp) {
                    self.phase = Phase::Exhausted;
                }
                let retry = self.give_up_failures;
                self.give_up_failures = retry.saturating_add(1);
                vec![Action::GiveUpLater { retry }]
            }
            Input::Result(answer) => self.result(answer),
            Input::AckWritten => match &self.phase {
                Phase::Accepting { answer, .. } => {
                    let answer = answer.as_ref().clone();
                    self.complete(answer, now)
                }
                _ => vec![],
            },
            Input::AckFailed(err) => {
                if let Phase::Accepting { before, .. } = &mut self.phase {
                    self.phase = match std::mem::replace(before.as_mut(), Phase::Open) {
                        // Its lapse was being handled: the next tick handles it again.
                        Phase::Lapsing {
                            worker,
                            assignment_cid,
                        } => Phase::Assigned {
                            worker,
                            assignment_cid,
                            deadline: now,
                        },
                        before => before,
                    };
                }
                vec![Action::Retry(format!(
                    "writing the ack that closes the task: {err}"
                ))]
            }
            Input::AckFound(closing) => self.ack_found(closing, now),
            Input::AcceptedRead {
                result_uri,
                worker,
                found,
            } => match found {
                Some(answer) if answer.uri == result_uri => self.complete(answer, now),
                // The ack says done; without the result the handle cannot be completed.
                _ => {
                    self.phase = Phase::Done { result_uri, worker };
                    vec![]
                }
            },
        }
    }

    /// A claim on an open task joins its offers; the policy then chooses (at once, or when
    /// the claim window closes).
    fn claim(&mut self, offer: ClaimOffer) -> Vec<Action> {
        if !self.same_version(&offer.record.task.cid) {
            return vec![]; // a claim on another version of the task
        }
        // While a lapse is recorded and withdrawn, a worker that saw the lapse ack may claim
        // at once: its claim is kept and weighed when the task opens (`withdrawn`).
        let lapsing = matches!(self.phase, Phase::Lapsing { .. });
        if !(matches!(self.phase, Phase::Open) || lapsing) || self.stale(&offer) {
            return vec![]; // someone already won this attempt, or an earlier one
        }
        if !self.offers.iter().any(|o| o.claim.uri == offer.claim.uri) {
            self.offers.push(offer);
        }
        if lapsing {
            return vec![];
        }
        self.weigh()
    }

    /// Decides now (no claim window) or arms the window once for the claims in `offers`.
    fn weigh(&mut self) -> Vec<Action> {
        if self.window.is_zero() {
            self.decide()
        } else if self.deciding {
            vec![]
        } else {
            self.deciding = true;
            vec![Action::ArmWindow]
        }
    }

    fn decide(&mut self) -> Vec<Action> {
        self.deciding = false;
        if !matches!(self.phase, Phase::Open) || self.offers.is_empty() {
            return vec![];
        }
        vec![Action::Choose {
            offers: self.offers.clone(),
            attempt: self.attempt + 1,
            previous: self.holders.clone(),
        }]
    }

    fn chosen(&mut self, chosen: Option<ClaimOffer>, now: Instant) -> Vec<Action> {
        let Some(offer) = chosen else {
            return vec![]; // none of these: wait for more claims
        };
        if !matches!(self.phase, Phase::Open) {
            return vec![];
        }
        self.phase = Phase::Assigning {
            claim: offer.claim.uri.clone(),
        };
        self.attempt += 1;
        let first_claim = self.claimed_at.is_none();
        self.claimed_at = Some(now);
        vec![Action::WriteAssignment {
            offer,
            attempt: self.attempt,
            lease: self.lease,
            first_claim,
        }]
    }

    fn tick(&mut self, now: Instant) -> Vec<Action> {
        match &self.phase {
            Phase::Assigned {
                worker,
                assignment_cid,
                deadline,
            } if *deadline <= now => {
                self.phase = Phase::Lapsing {
                    worker: worker.clone(),
                    assignment_cid: *assignment_cid,
                };
                // The stream may have missed the result (e.g. while this agent restarted):
                // look in the holders' repos before taking the task away.
                vec![Action::SearchResult {
                    holders: self.holders.clone(),
                }]
            }
            _ => vec![],
        }
    }

    /// Back from `Lapsing` to the assignment, lapsed as of `now` (the next tick retries).
    fn unlapse(&mut self, now: Instant) {
        if let Phase::Lapsing {
            worker,
            assignment_cid,
        } = &self.phase
        {
            self.phase = Phase::Assigned {
                worker: worker.clone(),
                assignment_cid: *assignment_cid,
                deadline: now,
            };
        }
    }

    fn searched(&mut self, found: Option<Answer>, now: Instant) -> Vec<Action> {
        let Phase::Lapsing {
            worker,
            assignment_cid,
        } = &self.phase
        else {
            return vec![]; // settled meanwhile
        };
        match found {
            Some(answer) => {
                self.unlapse(now);
                self.result(answer)
            }
            // The lapse is recorded before the assignment is withdrawn: a requester that
            // dies in between still counts this attempt against `maxAttempts`.
            None => vec![Action::RecordLapse {
                assignment_cid: *assignment_cid,
                attempt: self.attempt,
                worker: worker.clone(),
            }],
        }
    }

    fn lapse_recorded(
        &mut self,
        recorded: Result<DateTime<Utc>, String>,
        now: Instant,
    ) -> Vec<Action> {
        let Phase::Lapsing {
            worker,
            assignment_cid,
        } = &self.phase
        else {
            return vec![];
        };
        match recorded {
            Ok(at) => {
                self.since = self.since.max(Some(at));
                // Withdrawing the assignment tells the lapsed worker to stop and every
                // other worker that the task is open again.
                vec![
                    Action::LeaseExpired {
                        worker: worker.clone(),
                        attempt: self.attempt,
                    },
                    Action::Withdraw {
                        assignment_cid: *assignment_cid,
                    },
                ]
            }
            Err(_) => {
                self.unlapse(now);
                vec![]
            }
        }
    }

    fn withdrawn(&mut self, withdrawn: Result<(), String>, now: Instant) -> Vec<Action> {
        if !matches!(self.phase, Phase::Lapsing { .. }) {
            return vec![]; // a result arrived meanwhile
        }
        if withdrawn.is_err() {
            self.unlapse(now);
            return vec![];
        }
        if self.attempt >= self.max_attempts {
            self.phase = Phase::Exhausted;
            self.offers.clear();
            self.give_up()
        } else {
            self.phase = Phase::Open;
            // Claims that came while the lapse was handled: those made after it stand (the
            // lapse time is known now); a worker that sent one does not claim again.
            let offers = std::mem::take(&mut self.offers);
            self.offers = offers.into_iter().filter(|o| !self.stale(o)).collect();
            if self.offers.is_empty() {
                vec![]
            } else {
                self.weigh()
            }
        }
    }

    /// Only a task whose last lease lapsed is given up: a result being accepted, or
    /// accepted, wins; a result arriving while giving up waits for the ack.
    fn give_up(&mut self) -> Vec<Action> {
        if !matches!(self.phase, Phase::Exhausted) {
            return vec![];
        }
        self.phase = Phase::GivingUp;
        match self.cid.as_deref().and_then(|c| c.parse::<Cid>().ok()) {
            Some(task_cid) => vec![Action::WriteGiveUp {
                task_cid,
                attempts: self.attempt,
            }],
            None => self.close_given_up(),
        }
    }

    /// Marks the task given up (once: a task already closed stays as it is).
    fn close_given_up(&mut self) -> Vec<Action> {
        if matches!(self.phase, Phase::GivenUp | Phase::Done { .. }) {
            return vec![];
        }
        self.phase = Phase::GivenUp;
        vec![Action::Fail {
            attempts: self.attempt,
        }]
    }

    /// The first result matching the task's strongRef, from an agent that held the task,
    /// is accepted; a different later one is counted as a duplicate.
    fn result(&mut self, answer: Answer) -> Vec<Action> {
        if !self.same_version(&answer.record.task.cid) {
            return vec![]; // a result for another version of the task
        }
        if !self.holders.contains(&answer.worker) {
            return vec![]; // from an agent never assigned
        }
        match &self.phase {
            Phase::Done { result_uri, .. } if *result_uri != answer.uri => {
                return vec![Action::Duplicate {
                    worker: answer.worker,
                }];
            }
            Phase::Done { .. } | Phase::GivenUp => return vec![],
            Phase::Accepting { answer: a, .. } if a.uri == answer.uri => return vec![],
            Phase::Accepting { .. } => {
                return vec![Action::Retry(
                    "another result of this task is being accepted".into(),
                )];
            }
            Phase::GivingUp => {
                return vec![Action::Retry(
                    "the task is being given up; its closing ack decides".into(),
                )];
            }
            _ => {}
        }
        let before = std::mem::replace(&mut self.phase, Phase::Open);
        let action = Action::WriteAck {
            result_uri: answer.uri.clone(),
            result_cid: answer.cid,
        };
        self.phase = Phase::Accepting {
            answer: Box::new(answer),
            before: Box::new(before),
        };
        vec![action]
    }

    fn complete(&mut self, answer: Answer, now: Instant) -> Vec<Action> {
        if matches!(self.phase, Phase::Done { .. } | Phase::GivenUp) {
            return vec![];
        }
        let latency = self.claimed_at.map(|t| now.saturating_duration_since(t));
        self.phase = Phase::Done {
            result_uri: answer.uri.clone(),
            worker: answer.worker.clone(),
        };
        vec![Action::Complete { answer, latency }]
    }

    /// The task's closing ack names an outcome, maybe another than the one at hand (written
    /// by an earlier run of this agent): follow it.
    fn ack_found(&mut self, closing: Closing, now: Instant) -> Vec<Action> {
        let accepting = match &self.phase {
            Phase::Accepting { answer, .. } => Some(answer.as_ref().clone()),
            _ => None,
        };
        match closing {
            Closing::GivenUp => self.close_given_up(),
            Closing::Accepted { result_uri, .. }
                if let Some(answer) = accepting.as_ref().filter(|a| a.uri == result_uri) =>
            {
                self.complete(answer.clone(), now)
            }
            Closing::Accepted { result_uri, worker } => {
                let mut actions = Vec::new();
                if let Some(other) = accepting {
                    // It answered too: a duplicate of the accepted result.
                    actions.push(Action::Duplicate {
                        worker: other.worker,
                    });
                }
                actions.push(Action::ReadAccepted { result_uri, worker });
                actions
            }
        }
    }
}

#[cfg(test)]
mod tests;
