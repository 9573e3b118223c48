//! Rebuilding a requester's open tasks from the repos when it starts: the repo is the
//! source of truth, so a requester that died keeps no promise only in memory.
//!
//! A task is closed by an `agent.comms.ack` at the task's record key (`accepted`, subject
//! the result; or `rejected`, subject the task, when it was given up). Every other task of
//! the agent's repo is open, and is rebuilt from:
//! - its `assignment` (same key): assigned to whom, which attempt, lease expiry;
//! - `rejected` acks of withdrawn assignments: attempts whose leases lapsed;
//! - the holders' repos: a `result` at the task's key (accepted now, exactly once thanks to
//!   the ack's key), their `status` (lease renewals), their `handoff`s;
//! - the workers' `claim`s on tasks that are not assigned.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use murmur_comms::agent::comms::{ack, task};
use murmur_comms::{Ack, Assignment, Claim, Handoff, Result as ResultC, Status, Task};
use murmur_pds::{Collection, Stored, Writer};

use crate::AgentError;
use crate::lock;
use crate::policy::ClaimOffer;
use crate::protocol::{Input, Phase, lapsed_worker};
use crate::requester::{Deferred, Requester};
use crate::task::Recovery;

/// Claims and handoffs older than the oldest open task by more than this are not read
/// (clock skew allowance between hosts).
const SKEW: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

/// A task waiting for a claim when the requester starts.
struct Unassigned {
    uri: String,
    cid: String,
    record: task::Record,
    /// When its latest lease lapsed: only claims made after it are for the next attempt.
    since: Option<chrono::DateTime<chrono::Utc>>,
}

/// Repos read at once while recovering.
const READS_AT_ONCE: usize = 16;

/// Where to look for workers' claims.
pub(crate) struct Candidates {
    /// The agent's peer allowlist, when it has one.
    pub(crate) peers: Option<Vec<String>>,
    /// The PDS hosts the agent watches (their repos are listed when there is no allowlist).
    pub(crate) hosts: Vec<String>,
}

async fn list_own<C: Collection>(writer: &Writer) -> Result<Vec<Stored<C::Record>>, AgentError> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = writer
            .list::<C>(100, cursor.as_deref(), false)
            .await
            .map_err(|source| AgentError::Recover {
                what: format!("the agent's own {} records", C::NSID),
                source,
            })?;
        let last = page.cursor.is_none() || page.records.is_empty();
        out.extend(page.records);
        if last {
            return Ok(out);
        }
        cursor = page.cursor;
    }
}

/// `at://did/collection/rkey` -> (did, collection, rkey).
fn parse_uri(uri: &str) -> Option<(&str, &str, &str)> {
    let mut parts = uri.strip_prefix("at://")?.splitn(3, '/');
    Some((parts.next()?, parts.next()?, parts.next()?))
}

fn created(datetime: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(datetime)
        .ok()
        .map(|d| d.with_timezone(&chrono::Utc))
}

/// A wall-clock expiry as a deadline on this process's monotonic clock.
fn deadline_at(datetime: &str) -> Instant {
    let left = created(datetime)
        .and_then(|t| (t - chrono::Utc::now()).to_std().ok())
        .unwrap_or(Duration::ZERO);
    Instant::now() + left
}

/// What an ack in the requester's own repo says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AckMeaning<'a> {
    /// It closes the task at the ack's own record key: `accepted` (subject a result, at
    /// whatever key the worker wrote it) or `rejected` (subject the task: given up).
    Closes,
    /// A lapsed lease of the assignment at `task_key` (these acks have fresh TID keys, from
    /// the writer's generator that also makes task keys, so they never sit at a task's key).
    Lapse {
        task_key: &'a str,
        assignment_cid: String,
        worker: Option<&'a str>,
    },
    Other,
}

/// Shared with the worker, which reads the requesters' acks the same way (an ack at a task's
/// key closes it; a lapse ack withdraws one assignment).
pub(crate) fn ack_meaning<'a>(own_did: &str, ack: &'a ack::Record) -> AckMeaning<'a> {
    let Some((did, collection, key)) = parse_uri(&ack.subject.uri) else {
        return AckMeaning::Other;
    };
    if collection == ResultC::NSID || collection == Task::NSID {
        AckMeaning::Closes
    } else if did == own_did && collection == Assignment::NSID && ack.state == "rejected" {
        AckMeaning::Lapse {
            task_key: key,
            assignment_cid: ack.subject.cid.as_ref().to_string(),
            worker: ack.reason.as_deref().and_then(lapsed_worker),
        }
    } else {
        AckMeaning::Other
    }
}

/// The lapsed attempts of one task, from its lapse acks.
#[derive(Default)]
struct Lapses {
    /// The withdrawn assignments (a lapse recorded twice counts once).
    assignments: HashSet<String>,
    /// When the latest lapse was recorded: claims before it belong to earlier attempts.
    latest: Option<chrono::DateTime<chrono::Utc>>,
    /// The lapsed workers, oldest lapse first.
    workers: Vec<String>,
}

impl Requester {
    /// From now until recovery ends, events about tasks not rebuilt yet wait instead of
    /// being dropped as unknown.
    pub(crate) fn begin_deferring(&self) {
        lock(&self.deferred).get_or_insert_with(Vec::new);
    }

    /// Rebuilds the open tasks of this identity from the repos, then replays the events
    /// that arrived meanwhile. The watcher runs already, so nothing written after the reads
    /// is missed; events about tasks not rebuilt yet wait in `deferred`.
    pub(crate) async fn recover(
        self: &Arc<Self>,
        candidates: Candidates,
    ) -> Result<(), AgentError> {
        let started = Instant::now();
        // Usually begun before the watcher started (`begin_deferring`), so events replayed
        // from a stored cursor before this point wait too.
        self.begin_deferring();
        let rebuilt = self.rebuild(candidates).await;
        let deferred = lock(&self.deferred).take().unwrap_or_default();
        for event in deferred {
            let replayed = match event {
                Deferred::Claim(offer) => self.claim(offer).await,
                Deferred::Status(worker, record) => {
                    self.status(worker, record).await;
                    Ok(())
                }
                Deferred::Handoff(from, record) => {
                    self.handoff(from, record).await;
                    Ok(())
                }
                Deferred::Result(answer) => self.answer(answer).await,
            };
            if let Err(err) = replayed {
                tracing::warn!(error = %err, "an event held during recovery failed; the lease check covers it");
            }
        }
        let mut report = rebuilt?;
        report.elapsed = started.elapsed();
        lock(&self.stats).recovered += report.open as u64;
        tracing::info!(?report, "open tasks recovered from the repos");
        *lock(&self.recovery) = Some(report);
        Ok(())
    }

    async fn rebuild(self: &Arc<Self>, candidates: Candidates) -> Result<Recovery, AgentError> {
        let tasks = list_own::<Task>(&self.writer).await?;
        if tasks.is_empty() {
            return Ok(Recovery::default());
        }
        let mut acks = list_own::<Ack>(&self.writer).await?;
        acks.sort_by(|a, b| a.rkey.cmp(&b.rkey)); // TIDs: oldest first
        let assignments: HashMap<String, Stored<_>> = list_own::<Assignment>(&self.writer)
            .await?
            .into_iter()
            .map(|a| (a.rkey.clone(), a))
            .collect();

        let mut closed = HashSet::new();
        let mut lapses: HashMap<String, Lapses> = HashMap::new();
        for ack in &acks {
            match ack_meaning(&self.did, &ack.value) {
                AckMeaning::Closes => {
                    closed.insert(ack.rkey.clone());
                }
                AckMeaning::Lapse {
                    task_key,
                    assignment_cid,
                    worker,
                } => {
                    let l = lapses.entry(task_key.to_string()).or_default();
                    l.assignments.insert(assignment_cid);
                    if let Some(t) = created(&ack.value.created_at) {
                        l.latest = l.latest.max(Some(t));
                    }
                    if let Some(w) = worker
                        && !l.workers.iter().any(|x| x == w)
                    {
                        l.workers.push(w.to_string());
                    }
                }
                AckMeaning::Other => {}
            }
        }
        let none = Lapses::default();

        let mut report = Recovery::default();
        let mut assigned = Vec::new();
        let mut unassigned: HashMap<String, Unassigned> = HashMap::new();
        let mut exhausted = Vec::new();
        let mut handles = Vec::new();
        {
            let mut table = lock(&self.tasks);
            for t in tasks {
                if closed.contains(&t.rkey) || table.contains_key(&t.rkey) {
                    continue;
                }
                let cid = t.cid.to_string();
                let (mut entry, rx) = self.entry(t.uri.clone(), Some(cid.clone()), t.value);
                let state = &mut entry.state;
                let lapse = lapses.get(&t.rkey).unwrap_or(&none);
                let lapsed = u32::try_from(lapse.assignments.len()).unwrap_or(u32::MAX);
                // Workers whose leases lapsed held the task: they may still answer it, and
                // the claim policy sees them as previous workers.
                state.holders.extend(lapse.workers.iter().cloned());
                state.since = lapse.latest;
                match assignments.get(&t.rkey) {
                    Some(a) if a.value.task.cid.as_ref() == &t.cid => {
                        let attempt = u32::try_from(a.value.attempt).unwrap_or(1);
                        state.attempt = attempt.max(lapsed);
                        if !state.holders.contains(&a.value.worker) {
                            state.holders.push(a.value.worker.clone());
                        }
                        // An assignment whose lapse is recorded (the requester died before
                        // withdrawing it) has lapsed already: the lease check withdraws it.
                        let deadline = if lapse.assignments.contains(&a.cid.to_string()) {
                            Instant::now()
                        } else {
                            deadline_at(&a.value.lease_expires_at)
                        };
                        state.phase = Phase::Assigned {
                            worker: a.value.worker.clone(),
                            assignment_cid: a.cid,
                            deadline,
                        };
                        assigned.push(t.rkey.clone());
                    }
                    _ => {
                        state.attempt = lapsed;
                        if lapsed >= state.max_attempts {
                            state.phase = Phase::Exhausted; // what give_up closes
                            exhausted.push(t.rkey.clone());
                        } else {
                            unassigned.insert(
                                t.rkey.clone(),
                                Unassigned {
                                    uri: t.uri.clone(),
                                    cid: cid.clone(),
                                    record: state.record.clone(),
                                    since: lapse.latest,
                                },
                            );
                        }
                    }
                }
                handles.push(self.handle(t.uri, cid, t.rkey.clone(), rx));
                table.insert(t.rkey, entry);
            }
        }
        report.open = handles.len();
        report.assigned = assigned.len();
        report.unassigned = unassigned.len();
        report.given_up = exhausted.len();
        lock(&self.recovered).extend(handles);
        if report.open == 0 {
            return Ok(report);
        }

        for rkey in exhausted {
            self.give_up(&rkey).await;
        }
        let mut unreadable = BTreeSet::new();
        self.resume_assigned(&assigned, &mut report, &mut unreadable)
            .await;
        self.collect_claims(
            &unassigned,
            &candidates,
            assignments.values().map(|a| a.value.worker.clone()),
            &mut report,
            &mut unreadable,
        )
        .await;
        report.unreadable = unreadable.into_iter().collect();
        Ok(report)
    }

    /// For each assigned task: follow handoffs, accept a result already written, else
    /// resume the lease from the latest status.
    async fn resume_assigned(
        self: &Arc<Self>,
        assigned: &[String],
        report: &mut Recovery,
        unreadable: &mut BTreeSet<String>,
    ) {
        if assigned.is_empty() {
            return;
        }
        let (holders, oldest): (BTreeSet<String>, Option<chrono::DateTime<chrono::Utc>>) = {
            let table = lock(&self.tasks);
            let entries = assigned.iter().filter_map(|k| table.get(k));
            let holders = entries
                .clone()
                .flat_map(|e| e.state.holders.clone())
                .collect();
            let oldest = entries
                .filter_map(|e| created(&e.state.record.created_at))
                .min();
            (holders, oldest)
        };
        let cutoff = oldest.map(|t| t - SKEW);
        // Handoffs by the holders, read once per holder.
        let mut handoffs: HashMap<String, Vec<(String, String)>> = HashMap::new();
        let limit = Arc::new(tokio::sync::Semaphore::new(READS_AT_ONCE));
        let mut reads = tokio::task::JoinSet::new();
        for did in holders {
            let repos = Arc::clone(&self.repos);
            let limit = Arc::clone(&limit);
            reads.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let found = repos
                    .list_recent::<Handoff>(&did, |h| {
                        cutoff.is_some_and(|c| created(&h.value.created_at).is_some_and(|t| t < c))
                    })
                    .await;
                (did, found)
            });
        }
        while let Some(joined) = reads.join_next().await {
            let Ok((from, found)) = joined else { continue };
            match found {
                Ok(list) => {
                    for h in list {
                        handoffs
                            .entry(h.value.task.uri.clone())
                            .or_default()
                            .push((from.clone(), h.value.to.clone()));
                    }
                }
                Err(err) => {
                    tracing::warn!(repo = %from, error = %err, "handoffs not readable");
                    unreadable.insert(from);
                }
            }
        }
        {
            let mut table = lock(&self.tasks);
            for rkey in assigned {
                let Some(entry) = table.get_mut(rkey) else {
                    continue;
                };
                let state = &mut entry.state;
                let Some(moves) = handoffs.get(&state.uri) else {
                    continue;
                };
                if let Phase::Assigned { worker, .. } = &mut state.phase {
                    // Follow the chain from the assignee as far as it goes.
                    while let Some((_, to)) = moves.iter().find(|(from, _)| from == worker) {
                        if state.holders.contains(to) {
                            break;
                        }
                        state.holders.push(to.clone());
                        *worker = to.clone();
                    }
                }
            }
        }

        let limit = Arc::new(tokio::sync::Semaphore::new(READS_AT_ONCE));
        let mut checks = tokio::task::JoinSet::new();
        for rkey in assigned.iter().cloned() {
            let me = Arc::clone(self);
            let limit = Arc::clone(&limit);
            checks.spawn(async move {
                let _permit = limit.acquire_owned().await;
                me.resume_one(rkey).await
            });
        }
        while let Some(joined) = checks.join_next().await {
            match joined {
                Ok(Ok(true)) => report.done_while_away += 1,
                Ok(Ok(false)) => {}
                Ok(Err(did)) => {
                    unreadable.insert(did);
                }
                Err(err) => tracing::warn!(error = %err, "a recovery check stopped"),
            }
        }
    }

    /// One assigned task: `Ok(true)` if its result was found and accepted, `Err(did)` if a
    /// holder's repo could not be read.
    async fn resume_one(self: &Arc<Self>, rkey: String) -> Result<bool, String> {
        let (holders, worker, attempt) = {
            let table = lock(&self.tasks);
            let Some(entry) = table.get(&rkey) else {
                return Ok(false);
            };
            let Phase::Assigned { worker, .. } = &entry.state.phase else {
                return Ok(false); // settled by the stream meanwhile
            };
            (
                entry.state.holders.clone(),
                worker.clone(),
                entry.state.attempt,
            )
        };
        if let Some(answer) = self.find_result(&rkey, &holders).await {
            return match self.answer(answer).await {
                Ok(()) => Ok(true),
                Err(err) => {
                    tracing::warn!(task = %rkey, error = %err, "result found but not accepted; the lease check retries");
                    Ok(false)
                }
            };
        }
        match self.repos.get::<Status>(&worker, &rkey).await {
            Ok(Some(status)) => {
                let same_attempt = status.value.attempt.is_none_or(|a| a == i64::from(attempt));
                if let (true, Some(expires)) = (same_attempt, &status.value.lease_expires_at) {
                    let renewed = Input::Renewed {
                        worker,
                        until: Some(deadline_at(expires)),
                    };
                    let _ = self.drive(&rkey, renewed).await;
                }
                Ok(false)
            }
            Ok(None) => Ok(false),
            Err(err) => {
                tracing::warn!(repo = %worker, error = %err, "status not readable");
                Err(worker)
            }
        }
    }

    /// Reads the workers' claims on the unassigned tasks and lets the policy choose.
    async fn collect_claims(
        self: &Arc<Self>,
        unassigned: &HashMap<String, Unassigned>,
        candidates: &Candidates,
        assignees: impl Iterator<Item = String>,
        report: &mut Recovery,
        unreadable: &mut BTreeSet<String>,
    ) {
        if unassigned.is_empty() {
            return;
        }
        let mut workers: BTreeSet<String> = assignees.collect();
        match &candidates.peers {
            Some(peers) => workers.extend(peers.iter().cloned()),
            None => {
                for host in &candidates.hosts {
                    match self.list_repos(host).await {
                        Ok(dids) => {
                            // Hosted there: no identity look-up needed to read them.
                            for did in &dids {
                                self.repos.host(did, host);
                            }
                            workers.extend(dids);
                        }
                        Err(err) => {
                            tracing::warn!(host = %host, error = %err, "repos not listed");
                            unreadable.insert(host.clone());
                        }
                    }
                }
            }
        }
        workers.extend(self.registry.all().into_iter().map(|a| a.did));
        workers.remove(&self.did);
        let oldest = unassigned
            .values()
            .filter_map(|u| created(&u.record.created_at))
            .min();
        let cutoff = oldest.map(|t| t - SKEW);
        let by_uri: HashMap<&str, (&str, &Unassigned)> = unassigned
            .iter()
            .map(|(rkey, u)| (u.uri.as_str(), (rkey.as_str(), u)))
            .collect();

        let limit = Arc::new(tokio::sync::Semaphore::new(READS_AT_ONCE));
        let mut reads = tokio::task::JoinSet::new();
        for did in workers {
            let repos = Arc::clone(&self.repos);
            let limit = Arc::clone(&limit);
            reads.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let found = repos
                    .list_recent::<Claim>(&did, |c| {
                        cutoff.is_some_and(|cut| {
                            created(&c.value.created_at).is_some_and(|t| t < cut)
                        })
                    })
                    .await;
                (did, found)
            });
        }
        let mut offers: HashMap<String, Vec<(String, ClaimOffer)>> = HashMap::new();
        while let Some(joined) = reads.join_next().await {
            let Ok((worker, found)) = joined else {
                continue;
            };
            let claims = match found {
                Ok(claims) => claims,
                Err(err) => {
                    tracing::warn!(repo = %worker, error = %err, "claims not readable");
                    unreadable.insert(worker);
                    continue;
                }
            };
            for c in claims {
                let Some((rkey, task)) = by_uri.get(c.value.task.uri.as_str()) else {
                    continue;
                };
                if c.value.task.cid.as_ref().to_string() != task.cid {
                    continue;
                }
                if let Some(since) = task.since
                    && created(&c.value.created_at).is_none_or(|t| t <= since)
                {
                    continue; // a claim on an attempt that lapsed
                }
                offers.entry(rkey.to_string()).or_default().push((
                    c.value.created_at.clone(),
                    ClaimOffer {
                        worker: worker.clone(),
                        claim: crate::requester::strong_ref(&c.uri, c.cid),
                        record: c.value,
                    },
                ));
            }
        }
        for (rkey, mut found) in offers {
            found.sort_by(|a, b| a.0.cmp(&b.0));
            report.claims_found += found.len();
            if let Some(entry) = lock(&self.tasks).get_mut(&rkey) {
                let offers = &mut entry.state.offers;
                for (_, offer) in found {
                    if !offers.iter().any(|o| o.claim.uri == offer.claim.uri) {
                        offers.push(offer);
                    }
                }
            }
            if let Err(err) = self.decide(&rkey).await {
                tracing::warn!(task = %rkey, error = %err, "assignment not written; trying again");
                self.retry_decide(rkey, 0);
            }
        }
    }

    async fn list_repos(&self, host: &str) -> Result<Vec<String>, String> {
        let reader = self.repos.reader_at(host).map_err(|e| e.to_string())?;
        let mut dids = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let (page, next) = reader
                .list_repos(1000, cursor.as_deref())
                .await
                .map_err(|e| e.to_string())?;
            let last = next.is_none() || page.is_empty();
            dids.extend(page);
            if last {
                return Ok(dids);
            }
            cursor = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::lapse_reason;

    const ME: &str = "did:plc:boss";

    fn ack(subject: &str, state: &str, reason: Option<String>) -> ack::Record {
        ack::RecordData {
            subject: atrium_api::com::atproto::repo::strong_ref::MainData {
                uri: subject.into(),
                cid: "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
                    .parse()
                    .unwrap(),
            }
            .into(),
            state: state.into(),
            reason,
            created_at: crate::now(),
        }
        .into_record()
    }

    #[test]
    fn an_accepted_ack_closes_its_key_whatever_the_results_key() {
        // answer() accepts a result at any record key: the ack still closes the task.
        let other_key = ack("at://did:plc:w/agent.comms.result/3zzz", "accepted", None);
        assert_eq!(ack_meaning(ME, &other_key), AckMeaning::Closes);
        let same_key = ack("at://did:plc:w/agent.comms.result/3task", "accepted", None);
        assert_eq!(ack_meaning(ME, &same_key), AckMeaning::Closes);
        let given_up = ack(
            "at://did:plc:boss/agent.comms.task/3task",
            "rejected",
            Some("given up".into()),
        );
        assert_eq!(ack_meaning(ME, &given_up), AckMeaning::Closes);
    }

    #[test]
    fn a_lapse_ack_names_its_task_and_worker() {
        let lapse = ack(
            "at://did:plc:boss/agent.comms.assignment/3task",
            "rejected",
            Some(lapse_reason(2, "did:plc:slow")),
        );
        assert_eq!(
            ack_meaning(ME, &lapse),
            AckMeaning::Lapse {
                task_key: "3task",
                assignment_cid: "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
                    .into(),
                worker: Some("did:plc:slow"),
            }
        );
        // Written before lapse acks named the worker: still a lapse.
        let old = ack(
            "at://did:plc:boss/agent.comms.assignment/3task",
            "rejected",
            Some("lease of attempt 1 lapsed".into()),
        );
        assert!(matches!(
            ack_meaning(ME, &old),
            AckMeaning::Lapse { worker: None, .. }
        ));
        // Someone else's assignment is not our lapse.
        let theirs = ack(
            "at://did:plc:other/agent.comms.assignment/3task",
            "rejected",
            None,
        );
        assert_eq!(ack_meaning(ME, &theirs), AckMeaning::Other);
    }
}
