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

use murmur_comms::agent::comms::task;
use murmur_comms::{Ack, Assignment, Claim, Handoff, Result as ResultC, Status, Task};
use murmur_pds::{Collection, Stored, Writer};

use crate::AgentError;
use crate::lock;
use crate::policy::ClaimOffer;
use crate::requester::{Deferred, Entry, Phase, Requester};

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

/// Claims and handoffs older than the oldest open task by more than this are not read
/// (clock skew allowance between hosts).
const SKEW: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

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

impl Requester {
    /// Rebuilds the open tasks of this identity from the repos, then replays the events
    /// that arrived meanwhile. The watcher runs already, so nothing written after the reads
    /// is missed; events about tasks not rebuilt yet wait in `deferred`.
    pub(crate) async fn recover(
        self: &Arc<Self>,
        candidates: Candidates,
    ) -> Result<(), AgentError> {
        let started = Instant::now();
        *lock(&self.deferred) = Some(Vec::new());
        let rebuilt = self.rebuild(candidates).await;
        let deferred = lock(&self.deferred).take().unwrap_or_default();
        for event in deferred {
            let replayed = match event {
                Deferred::Claim(offer) => self.claim(offer).await,
                Deferred::Status(worker, record) => {
                    self.status(worker, record);
                    Ok(())
                }
                Deferred::Handoff(from, record) => {
                    self.handoff(from, record);
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
        let acks = list_own::<Ack>(&self.writer).await?;
        let assignments: HashMap<String, Stored<_>> = list_own::<Assignment>(&self.writer)
            .await?
            .into_iter()
            .map(|a| (a.rkey.clone(), a))
            .collect();

        let mut closed = HashSet::new();
        let mut lapses: HashMap<String, u32> = HashMap::new();
        for ack in &acks {
            let Some((did, collection, key)) = parse_uri(&ack.value.subject.uri) else {
                continue;
            };
            if key == ack.rkey && (collection == Task::NSID || collection == ResultC::NSID) {
                closed.insert(ack.rkey.clone());
            } else if did == self.did
                && collection == Assignment::NSID
                && ack.value.state == "rejected"
            {
                *lapses.entry(key.to_string()).or_default() += 1;
            }
        }

        let mut report = Recovery::default();
        let mut assigned = Vec::new();
        let mut unassigned: HashMap<String, (String, String, task::Record)> = HashMap::new();
        let mut exhausted = Vec::new();
        let mut handles = Vec::new();
        {
            let mut table = lock(&self.tasks);
            for t in tasks {
                if closed.contains(&t.rkey) || table.contains_key(&t.rkey) {
                    continue;
                }
                let cid = t.cid.to_string();
                let (mut entry, rx) = Entry::new(t.uri.clone(), Some(cid.clone()), t.value);
                let lapsed = lapses.get(&t.rkey).copied().unwrap_or(0);
                match assignments.get(&t.rkey) {
                    Some(a) if a.value.task.cid.as_ref() == &t.cid => {
                        let attempt = u32::try_from(a.value.attempt).unwrap_or(1);
                        entry.attempt = attempt.max(lapsed);
                        entry.holders.push(a.value.worker.clone());
                        entry.phase = Phase::Assigned {
                            worker: a.value.worker.clone(),
                            assignment_cid: a.cid,
                            deadline: deadline_at(&a.value.lease_expires_at),
                        };
                        assigned.push(t.rkey.clone());
                    }
                    _ => {
                        entry.attempt = lapsed;
                        if lapsed >= entry.max_attempts {
                            exhausted.push((t.rkey.clone(), lapsed));
                        } else {
                            unassigned.insert(
                                t.rkey.clone(),
                                (t.uri.clone(), cid.clone(), entry.record.clone()),
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

        for (rkey, attempts) in exhausted {
            self.give_up(&rkey, attempts).await;
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
            let holders = entries.clone().flat_map(|e| e.holders.clone()).collect();
            let oldest = entries.filter_map(|e| created(&e.record.created_at)).min();
            (holders, oldest)
        };
        let cutoff = oldest.map(|t| t - SKEW);
        // Handoffs by the holders, read once per holder.
        let mut handoffs: HashMap<String, Vec<(String, String)>> = HashMap::new();
        let mut reads = tokio::task::JoinSet::new();
        for did in holders {
            let repos = Arc::clone(&self.repos);
            reads.spawn(async move {
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
                let Some(moves) = handoffs.get(&entry.uri) else {
                    continue;
                };
                if let Phase::Assigned { worker, .. } = &mut entry.phase {
                    // Follow the chain from the assignee as far as it goes.
                    while let Some((_, to)) = moves.iter().find(|(from, _)| from == worker) {
                        if entry.holders.contains(to) {
                            break;
                        }
                        entry.holders.push(to.clone());
                        *worker = to.clone();
                    }
                }
            }
        }

        let limit = Arc::new(tokio::sync::Semaphore::new(16));
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
            let Phase::Assigned { worker, .. } = &entry.phase else {
                return Ok(false); // settled by the stream meanwhile
            };
            (entry.holders.clone(), worker.clone(), entry.attempt)
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
                    let renewed = deadline_at(expires);
                    if let Some(entry) = lock(&self.tasks).get_mut(&rkey)
                        && let Phase::Assigned {
                            worker: holder,
                            deadline,
                            ..
                        } = &mut entry.phase
                        && *holder == worker
                    {
                        *deadline = (*deadline).max(renewed);
                    }
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
        unassigned: &HashMap<String, (String, String, task::Record)>,
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
                        Ok(dids) => workers.extend(dids),
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
            .filter_map(|(_, _, r)| created(&r.created_at))
            .min();
        let cutoff = oldest.map(|t| t - SKEW);
        let by_uri: HashMap<&str, (&str, &str)> = unassigned
            .iter()
            .map(|(rkey, (uri, cid, _))| (uri.as_str(), (rkey.as_str(), cid.as_str())))
            .collect();

        let mut reads = tokio::task::JoinSet::new();
        for did in workers {
            let repos = Arc::clone(&self.repos);
            reads.spawn(async move {
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
                let Some((rkey, cid)) = by_uri.get(c.value.task.uri.as_str()) else {
                    continue;
                };
                if c.value.task.cid.as_ref().to_string() != *cid {
                    continue;
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
                for (_, offer) in found {
                    if !entry.offers.iter().any(|o| o.claim.uri == offer.claim.uri) {
                        entry.offers.push(offer);
                    }
                }
            }
            if let Err(err) = self.decide(&rkey).await {
                tracing::warn!(task = %rkey, error = %err, "assignment not written; trying again");
                self.decide_later(rkey, Duration::from_secs(1));
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
