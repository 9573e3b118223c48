//! The one progress and summary code path of `murmur swarm`, in both modes: live progress
//! lines, the human summary, and the `--json` object. In direct mode the numbers come from
//! the in-process agents; in bus mode from the agent processes' report lines ([`AgentLine`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use murmur::TaskStats;
use serde::{Deserialize, Serialize};

/// One line an agent process of `murmur swarm --bus` writes on its stdout for the launcher
/// (JSON, one object a line; its logs go to stderr).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub(crate) enum AgentLine {
    /// The agent is up: its own pid and DID.
    Ready {
        /// `std::process::id()` of the agent process.
        pid: u32,
        /// Its DID.
        did: String,
    },
    /// Coordinator: every worker is online (their presences seen); posting starts.
    Online,
    /// Worker: what happened to one of its tasks.
    Event {
        /// What happened.
        kind: WorkerEvent,
        /// The task's at-uri.
        task: String,
    },
    /// Coordinator started again (`--restart-coordinator`): what it rebuilt from the repos.
    Recovered {
        /// Its tasks without a closing ack, taken over.
        open: usize,
        /// Of those, tasks whose result was already in a worker's repo.
        done_while_away: usize,
        /// Tasks still assigned.
        assigned: usize,
        /// Tasks to assign.
        unassigned: usize,
        /// Claims read from the workers' repos.
        claims_found: usize,
        /// How long recovery took.
        elapsed_ms: u64,
    },
    /// Coordinator: its counters so far.
    Stats {
        /// The counters.
        stats: StatsWire,
        /// Time since posting started.
        elapsed_ms: u64,
    },
    /// Coordinator: the run is over; the final counters.
    Done(Box<Outcome>),
}

/// A worker's task events that the launcher follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum WorkerEvent {
    /// It claimed a task.
    Claimed,
    /// It started an assigned attempt (a task in hand).
    Started,
    /// It wrote the result.
    Finished,
    /// It let go of an attempt (withdrawn or handed off): no result from it.
    Dropped,
}

/// [`TaskStats`] as it travels between processes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct StatsWire {
    posted: u64,
    claimed: u64,
    assignments: u64,
    done: u64,
    lease_expiries: u64,
    given_up: u64,
    duplicates: u64,
    done_by: BTreeMap<String, u64>,
    /// Claim-to-result latencies, in microseconds.
    latencies_us: Vec<u64>,
}

impl From<&TaskStats> for StatsWire {
    fn from(s: &TaskStats) -> Self {
        StatsWire {
            posted: s.posted,
            claimed: s.claimed,
            assignments: s.assignments,
            done: s.done,
            lease_expiries: s.lease_expiries,
            given_up: s.given_up,
            duplicates: s.duplicates,
            done_by: s.done_by.clone(),
            latencies_us: s
                .latencies
                .iter()
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
                .collect(),
        }
    }
}

impl From<StatsWire> for TaskStats {
    fn from(w: StatsWire) -> Self {
        TaskStats {
            posted: w.posted,
            claimed: w.claimed,
            assignments: w.assignments,
            done: w.done,
            lease_expiries: w.lease_expiries,
            given_up: w.given_up,
            duplicates: w.duplicates,
            done_by: w.done_by,
            latencies: w
                .latencies_us
                .into_iter()
                .map(Duration::from_micros)
                .collect(),
            ..TaskStats::default()
        }
    }
}

/// How a run ended, as the coordinator saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Outcome {
    /// The coordinator's counters.
    pub stats: StatsWire,
    /// Tasks closed in the coordinator's repo by an accepted ack naming their result.
    pub closed: usize,
    /// From the first task posted to the last result.
    pub elapsed_ms: u64,
    /// How long posting every task took.
    pub posting_ms: Option<u64>,
    /// The run gave up at `--timeout`.
    pub timed_out: bool,
}

/// Live progress and the summary of one run.
pub(crate) struct Report {
    json: bool,
    mode: &'static str,
    /// Direct mode: `shared` (one fan-out) or `separate` (a subscription per agent).
    subscriptions: Option<&'static str>,
    tasks: usize,
    /// Worker DID -> (name, PDS host).
    names: BTreeMap<String, (String, String)>,
    /// Agent name -> pid (bus mode: each agent is a process).
    pids: BTreeMap<String, u32>,
    killed: Vec<String>,
    /// Worker DID -> (claims, results) from the workers' own events.
    per_worker: Arc<Mutex<BTreeMap<String, (u64, u64)>>>,
    last: String,
    /// `--sealed`: (records checked, records with a readable payload) in the repos.
    sealed: Option<(usize, usize)>,
}

impl Report {
    /// A report for `tasks` tasks; with `json`, the human text goes to stderr so that stdout
    /// carries the JSON object alone.
    pub fn new(mode: &'static str, tasks: usize, json: bool) -> Report {
        Report {
            json,
            mode,
            subscriptions: None,
            tasks,
            names: BTreeMap::new(),
            pids: BTreeMap::new(),
            killed: Vec::new(),
            per_worker: Arc::default(),
            last: String::new(),
            sealed: None,
        }
    }

    /// Prints one line of human output.
    pub fn say(&self, text: impl std::fmt::Display) {
        if self.json {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }

    /// Says how the agents hear the PDS hosts (direct mode): `shared` or `separate`.
    pub fn subscriptions(&mut self, how: &'static str) {
        self.subscriptions = Some(how);
    }

    /// Names a worker.
    pub fn add_worker(&mut self, did: &str, name: &str, host: &str) {
        self.names
            .insert(did.to_string(), (name.to_string(), host.to_string()));
    }

    /// `--sealed`: `checked` task and result records were read back from the repos, and
    /// `visible` of them had a readable payload (a failed run when not 0).
    pub fn sealed(&mut self, checked: usize, visible: usize) {
        self.sealed = Some((checked, visible));
    }

    /// Records an agent process's pid.
    pub fn add_pid(&mut self, name: &str, pid: u32) {
        self.pids.insert(name.to_string(), pid);
    }

    /// The workers as (DID, (name, host)), in name order (worker2 before worker10).
    fn workers(&self) -> Vec<(&String, &(String, String))> {
        let mut workers: Vec<_> = self.names.iter().collect();
        workers.sort_by_key(|(_, (name, _))| (name.len(), name.as_str()));
        workers
    }

    /// The name of the worker with this DID.
    pub fn name_of<'a>(&'a self, did: &'a str) -> &'a str {
        self.names.get(did).map_or(did, |(name, _)| name.as_str())
    }

    /// Where worker events are counted (shared with direct mode's event listeners).
    pub fn per_worker(&self) -> Arc<Mutex<BTreeMap<String, (u64, u64)>>> {
        Arc::clone(&self.per_worker)
    }

    /// Counts one event of a worker.
    pub fn worker_event(&self, did: &str, event: WorkerEvent) {
        count(&self.per_worker, did, event);
    }

    /// A worker was killed with `in_hand` tasks running.
    pub fn killed(&mut self, did: &str, in_hand: usize) {
        self.killed.push(did.to_string());
        let pid = self
            .pids
            .get(self.name_of(did))
            .map_or(String::new(), |p| format!(" (pid {p}, SIGKILL)"));
        self.say(format_args!(
            "killed {}{pid} with {} task(s) in hand",
            self.name_of(did),
            in_hand.max(1)
        ));
    }

    /// Prints a progress line if anything changed since the last one.
    pub fn progress(&mut self, s: &TaskStats, elapsed: Duration) {
        let line = format!(
            "[{:>5.1}s] posted {}/{}  claimed {}  done {}  reassigned {}  duplicates {}",
            elapsed.as_secs_f64(),
            s.posted,
            self.tasks,
            s.claimed,
            s.done,
            s.lease_expiries,
            s.duplicates
        );
        if line == self.last {
            return;
        }
        let map = self
            .per_worker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let per: Vec<String> = self
            .workers()
            .into_iter()
            .map(|(did, (name, _))| {
                let (_, done) = map.get(did).copied().unwrap_or_default();
                let dead = if self.killed.contains(did) { "†" } else { "" };
                format!("{}{dead}:{done}", name.trim_start_matches("worker"))
            })
            .collect();
        self.say(format_args!("{line}  | per worker {}", per.join(" ")));
        self.last = line;
    }

    /// Prints the summary (and, with `--json`, the JSON object on stdout). True when the run
    /// is a success: nothing lost, no duplicates, every task closed by an accepted ack.
    pub fn summary(&self, outcome: &Outcome) -> bool {
        let s: TaskStats = outcome.stats.clone().into();
        let tasks = self.tasks as u64;
        let elapsed = Duration::from_millis(outcome.elapsed_ms.max(1));
        let posting = outcome.posting_ms.map(Duration::from_millis);
        let lost = tasks - s.done.min(tasks);
        let p50 = s.latency_quantile(0.5);
        let p99 = s.latency_quantile(0.99);
        let per_s = s.done as f64 / elapsed.as_secs_f64();
        let ok = lost == 0
            && s.duplicates == 0
            && outcome.closed == self.tasks
            && self.sealed.is_none_or(|(_, visible)| visible == 0);
        let ms = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{} ms", d.as_millis()));
        self.say("");
        if outcome.timed_out {
            self.say("timed out (--timeout) before every task was done");
        }
        match self.subscriptions {
            Some(how) => self.say(format_args!(
                "summary ({} mode, {how} subscriptions)",
                self.mode
            )),
            None => self.say(format_args!("summary ({} mode)", self.mode)),
        }
        self.say(format_args!(
            "  tasks done   {} / {}  in {:.1} s ({per_s:.1} tasks/s; posting took {:.1} s)",
            s.done,
            self.tasks,
            elapsed.as_secs_f64(),
            posting.unwrap_or(elapsed).as_secs_f64()
        ));
        self.say(format_args!("  lost         {lost}"));
        self.say(format_args!(
            "  closed in the repo by an accepted ack  {} / {}",
            outcome.closed, self.tasks
        ));
        self.say(format_args!("  duplicates   {}", s.duplicates));
        if let Some((checked, visible)) = self.sealed {
            self.say(format_args!(
                "  sealed       {checked} task/result records read back from the repos, {visible} with a readable payload"
            ));
        }
        self.say(format_args!(
            "  assignments  {} ({} lease(s) lapsed and reassigned, {} given up)",
            s.assignments, s.lease_expiries, s.given_up
        ));
        self.say(format_args!(
            "  claim-to-result latency  p50 {}  p99 {}",
            ms(p50),
            ms(p99)
        ));
        self.say("  per worker");
        let mut per_worker = Vec::new();
        for (did, (name, host)) in self.workers() {
            let done = s.done_by.get(did).copied().unwrap_or(0);
            let killed = self.killed.contains(did);
            let pid = self.pids.get(name).copied();
            let shown_pid = pid.map_or(String::new(), |p| format!(" pid {p:<7}"));
            self.say(format_args!(
                "    {name:<9} {:<10}{shown_pid} on {host}  done {done}{}",
                short(did),
                if killed { " (killed)" } else { "" }
            ));
            per_worker.push(serde_json::json!({
                "name": name, "did": did, "host": host, "done": done, "killed": killed, "pid": pid,
            }));
        }
        if self.json {
            let ms_f = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
            let object = serde_json::json!({
                "mode": self.mode,
                "subscriptions": self.subscriptions,
                "workers": self.names.len(),
                "tasks": self.tasks,
                "done": s.done,
                "lost": lost,
                "duplicates": s.duplicates,
                "closed_by_ack": outcome.closed,
                "assignments": s.assignments,
                "reassigned": s.lease_expiries,
                "given_up": s.given_up,
                "killed": self.killed.len(),
                "tasks_per_s": per_s,
                "p50_ms": ms_f(p50),
                "p99_ms": ms_f(p99),
                "elapsed_s": elapsed.as_secs_f64(),
                "posting_s": posting.map(|d| d.as_secs_f64()),
                "timed_out": outcome.timed_out,
                "ok": ok,
                "processes": self.pids,
                "sealed": self.sealed.map(|(checked, visible)| serde_json::json!({
                    "checked": checked, "plaintext_visible": visible,
                })),
                "per_worker": per_worker,
            });
            println!("{object}");
        }
        ok
    }
}

/// Counts a worker event into `map`.
pub(crate) fn count(map: &Mutex<BTreeMap<String, (u64, u64)>>, did: &str, event: WorkerEvent) {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    let entry = map.entry(did.to_string()).or_default();
    match event {
        WorkerEvent::Claimed => entry.0 += 1,
        WorkerEvent::Finished => entry.1 += 1,
        WorkerEvent::Started | WorkerEvent::Dropped => {}
    }
}

/// The first 8 characters of a did:plc's identifier.
pub(crate) fn short(did: &str) -> &str {
    did.strip_prefix("did:plc:")
        .map_or(did, |s| &s[..s.len().min(8)])
}

/// The worker event behind an agent's task event, if the launcher follows it.
pub(crate) fn worker_event(ev: &murmur::TaskEvent) -> Option<(WorkerEvent, &str)> {
    use murmur::TaskEvent as E;
    match ev {
        E::ClaimSent { task } => Some((WorkerEvent::Claimed, task)),
        E::Started { task, .. } => Some((WorkerEvent::Started, task)),
        E::Finished { task, .. } => Some((WorkerEvent::Finished, task)),
        E::Abandoned { task, .. } | E::HandedOff { task, .. } => Some((WorkerEvent::Dropped, task)),
        _ => None,
    }
}
