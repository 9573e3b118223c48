//! Counters and gauges of a running watcher, readable at any time.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Live metrics of a watcher. Read a consistent-enough copy with [`Metrics::snapshot`], and
/// each `subscribeRepos` source's own with [`Metrics::sources`].
#[derive(Debug, Default)]
pub struct Metrics {
    pub(crate) events_in: AtomicU64,
    pub(crate) ops_matched: AtomicU64,
    pub(crate) handled: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) skipped_duplicates: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) gaps: AtomicU64,
    pub(crate) queue_depth: AtomicI64,
    pub(crate) last_seq_seen: AtomicI64,
    pub(crate) last_seq_done: AtomicI64,
    pub(crate) time_lag_ms: AtomicI64,
    pub(crate) sources: AtomicU64,
    pub(crate) sources_connected: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) verifications_waiting: AtomicU64,
    pub(crate) inactive_skipped: AtomicU64,
    pub(crate) backfill_listed: AtomicU64,
    pub(crate) backfill_repos_total: AtomicU64,
    pub(crate) backfill_repos_done: AtomicU64,
    pub(crate) backfill_repos_failed: AtomicU64,
    pub(crate) backfill_records: AtomicU64,
    pub(crate) backfill_finished: AtomicU64,
    pub(crate) resyncs: AtomicU64,
    pub(crate) resync_ops: AtomicU64,
    pub(crate) reflected_skipped: AtomicU64,
    /// One per `subscribeRepos` source, in the watcher's source order.
    pub(crate) per_source: Vec<SourceCounters>,
}

/// The counters of one source.
#[derive(Debug)]
pub(crate) struct SourceCounters {
    url: Arc<str>,
    events_in: AtomicU64,
    rejected: AtomicU64,
    reconnects: AtomicU64,
    connected: AtomicU64,
    /// The last seq read, `-1` before the first.
    last_seq_seen: AtomicI64,
    /// The low-water mark (the cursor), `-1` before the first.
    cursor: AtomicI64,
    /// Commit time to end of handling of its last handled op, `-1` before the first.
    time_lag_ms: AtomicI64,
    handled: AtomicU64,
}

impl SourceCounters {
    fn new(url: &str) -> Self {
        SourceCounters {
            url: Arc::from(url),
            events_in: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            connected: AtomicU64::new(0),
            last_seq_seen: AtomicI64::new(-1),
            cursor: AtomicI64::new(-1),
            time_lag_ms: AtomicI64::new(-1),
            handled: AtomicU64::new(0),
        }
    }

    fn lag(&self) -> i64 {
        let seen = self.last_seq_seen.load(Ordering::Relaxed);
        if seen < 0 {
            return 0;
        }
        // Unknown until the first low-water mark (a stored cursor counts as one).
        let done = self.cursor.load(Ordering::Relaxed);
        if done < 0 {
            return 0;
        }
        (seen - done).max(0)
    }
}

/// A copy of one source's metrics at one moment (see [`Metrics::sources`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SourceSnapshot {
    /// The source's URL (for a PDS or relay, its `subscribeRepos` endpoint, e.g.
    /// `ws://localhost:2583/xrpc/com.atproto.sync.subscribeRepos`): the same string the
    /// cursor store keys the source's cursor by.
    pub url: String,
    /// Whether it is connected now.
    pub connected: bool,
    /// Frames read from it.
    pub events_in: u64,
    /// Its ops (and frames) rejected: failed verification, lexicon checks, bad seqs,
    /// undecodable frames.
    pub rejected: u64,
    /// Its reconnects.
    pub reconnects: u64,
    /// Its handler calls that succeeded (a tail handler counts too).
    pub handled: u64,
    /// The last seq read from it.
    pub last_seq: Option<i64>,
    /// Its low-water mark: every event up to it is fully handled (what the cursor store
    /// keeps, updated every 200 ms).
    pub cursor: Option<i64>,
    /// Sequence lag: the last seq read minus the low-water mark (0 until both are known).
    pub seq_lag: i64,
    /// Milliseconds between the commit time and the end of handling of its last handled op.
    pub time_lag_ms: Option<i64>,
}

/// A copy of the [`Metrics`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetricsSnapshot {
    /// Frames read from all sources.
    pub events_in: u64,
    /// Record ops that matched a handler.
    pub ops_matched: u64,
    /// Handler calls that succeeded.
    pub handled: u64,
    /// Handler attempts that were retried.
    pub retries: u64,
    /// Ops sent to the dead-letter store.
    pub dead_lettered: u64,
    /// Ops rejected by verification or lexicon checks (never reached a handler).
    pub rejected: u64,
    /// Ops skipped because the dedup store had already seen them.
    pub skipped_duplicates: u64,
    /// Reconnects across all sources.
    pub reconnects: u64,
    /// Gaps reported to the application.
    pub gaps: u64,
    /// Ops queued or running now.
    pub queue_depth: i64,
    /// Sequence lag: newest seq read minus the stored low-water mark (summed over sources).
    pub seq_lag: i64,
    /// Milliseconds between the commit time and the end of handling of the last handled op.
    pub time_lag_ms: i64,
    /// Sources the watcher reads.
    pub sources: u64,
    /// Sources connected now (their WebSocket handshake done, frames flowing). Everything
    /// written after a source connected reaches the watcher.
    pub sources_connected: u64,
    /// [`WatchError`](crate::WatchError)s so far: failed connects, disconnects, error frames,
    /// skipped frames, verification retries.
    pub errors: u64,
    /// Events waiting now for a verification that failed for a passing reason (a host
    /// unreachable); their sources' cursors do not move until they are verified.
    pub verifications_waiting: u64,
    /// Commits not delivered because an `#account` event said their repo is not active
    /// (taken down, suspended, deactivated, deleted).
    pub inactive_skipped: u64,
    /// Repos copied again after a gap (a broken rev chain, a `#sync`, a seq regression).
    pub resyncs: u64,
    /// Ops delivered from those copies: what the stream had not delivered.
    pub resync_ops: u64,
    /// Stream ops not delivered because a repo copy delivered already reflected them.
    pub reflected_skipped: u64,
}

impl Metrics {
    /// Metrics of a watcher reading these `subscribeRepos` sources (and maybe feeds).
    pub(crate) fn for_sources<'a>(urls: impl IntoIterator<Item = &'a str>) -> Self {
        Metrics {
            per_source: urls.into_iter().map(SourceCounters::new).collect(),
            ..Default::default()
        }
    }

    /// The counters of the source `url`, if it is one of the watcher's `subscribeRepos` sources.
    pub(crate) fn source(&self, url: &str) -> Option<&SourceCounters> {
        self.per_source.iter().find(|s| &*s.url == url)
    }

    /// A copy of each `subscribeRepos` source's metrics, in the order the sources were added
    /// (feeds have none here: their position lives elsewhere, e.g. in a NATS consumer).
    pub fn sources(&self) -> Vec<SourceSnapshot> {
        let some = |v: i64| (v >= 0).then_some(v);
        self.per_source
            .iter()
            .map(|s| SourceSnapshot {
                url: s.url.to_string(),
                connected: s.connected.load(Ordering::Relaxed) > 0,
                events_in: s.events_in.load(Ordering::Relaxed),
                rejected: s.rejected.load(Ordering::Relaxed),
                reconnects: s.reconnects.load(Ordering::Relaxed),
                handled: s.handled.load(Ordering::Relaxed),
                last_seq: some(s.last_seq_seen.load(Ordering::Relaxed)),
                cursor: some(s.cursor.load(Ordering::Relaxed)),
                seq_lag: s.lag(),
                time_lag_ms: some(s.time_lag_ms.load(Ordering::Relaxed)),
            })
            .collect()
    }

    /// A copy of every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            events_in: get(&self.events_in),
            ops_matched: get(&self.ops_matched),
            handled: get(&self.handled),
            retries: get(&self.retries),
            dead_lettered: get(&self.dead_lettered),
            rejected: get(&self.rejected),
            skipped_duplicates: get(&self.skipped_duplicates),
            reconnects: get(&self.reconnects),
            gaps: get(&self.gaps),
            queue_depth: self.queue_depth.load(Ordering::Relaxed),
            // Seqs of different sources are unrelated numbers: sum each source's own lag.
            seq_lag: if self.per_source.is_empty() {
                (self.last_seq_seen.load(Ordering::Relaxed)
                    - self.last_seq_done.load(Ordering::Relaxed))
                .max(0)
            } else {
                self.per_source.iter().map(SourceCounters::lag).sum()
            },
            time_lag_ms: self.time_lag_ms.load(Ordering::Relaxed),
            sources: get(&self.sources),
            sources_connected: get(&self.sources_connected),
            errors: get(&self.errors),
            verifications_waiting: get(&self.verifications_waiting),
            inactive_skipped: get(&self.inactive_skipped),
            resyncs: get(&self.resyncs),
            resync_ops: get(&self.resync_ops),
            reflected_skipped: get(&self.reflected_skipped),
        }
    }

    /// How far the backfill has got (all zero without one).
    pub fn backfill(&self) -> crate::BackfillProgress {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        crate::BackfillProgress {
            repos_total: get(&self.backfill_repos_total),
            repos_done: get(&self.backfill_repos_done),
            repos_failed: get(&self.backfill_repos_failed),
            records: get(&self.backfill_records),
            finished: get(&self.backfill_finished) > 0,
        }
    }

    /// Marks the backfill finished once the repos are listed and each is done or failed.
    pub(crate) fn backfill_check_finished(&self) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let over = get(&self.backfill_repos_done) + get(&self.backfill_repos_failed);
        if get(&self.backfill_listed) > 0
            && over >= get(&self.backfill_repos_total)
            && self.backfill_finished.swap(1, Ordering::Relaxed) == 0
        {
            tracing::info!(
                repos = get(&self.backfill_repos_total),
                records = get(&self.backfill_records),
                "backfill finished"
            );
        }
    }

    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a frame read from source `index`, and its seq.
    pub(crate) fn frame_in(&self, index: usize) {
        Metrics::inc(&self.events_in);
        if let Some(s) = self.per_source.get(index) {
            Metrics::inc(&s.events_in);
        }
    }

    /// Records the last seq read from source `index`.
    pub(crate) fn seq_seen(&self, index: usize, seq: i64) {
        self.last_seq_seen.store(seq, Ordering::Relaxed);
        if let Some(s) = self.per_source.get(index) {
            s.last_seq_seen.store(seq, Ordering::Relaxed);
        }
    }

    /// Records source `index`'s low-water mark.
    pub(crate) fn seq_done(&self, index: usize, seq: i64) {
        self.last_seq_done.store(seq, Ordering::Relaxed);
        if let Some(s) = self.per_source.get(index) {
            s.cursor.store(seq, Ordering::Relaxed);
        }
    }

    /// Counts a rejection of something read from source `url` (a URL that is no source of
    /// this watcher, e.g. a feed's, counts only in the total).
    pub(crate) fn rejected_from(&self, url: &str) {
        Metrics::inc(&self.rejected);
        if let Some(s) = self.source(url) {
            Metrics::inc(&s.rejected);
        }
    }

    /// Counts a reconnect of source `index`.
    pub(crate) fn reconnect(&self, index: usize) {
        Metrics::inc(&self.reconnects);
        if let Some(s) = self.per_source.get(index) {
            Metrics::inc(&s.reconnects);
        }
    }

    /// Counts a handled op of source `url`, with its time lag.
    pub(crate) fn handled_from(&self, url: &str, time_lag_ms: Option<i64>) {
        Metrics::inc(&self.handled);
        if let Some(lag) = time_lag_ms {
            self.time_lag_ms.store(lag, Ordering::Relaxed);
        }
        if let Some(s) = self.source(url) {
            Metrics::inc(&s.handled);
            if let Some(lag) = time_lag_ms {
                s.time_lag_ms.store(lag, Ordering::Relaxed);
            }
        }
    }
}

/// Counts one connected source while it lives.
pub(crate) struct ConnectedSource<'a>(&'a Metrics, usize);

impl<'a> ConnectedSource<'a> {
    pub(crate) fn new(metrics: &'a Metrics, index: usize) -> Self {
        metrics.sources_connected.fetch_add(1, Ordering::Relaxed);
        if let Some(s) = metrics.per_source.get(index) {
            s.connected.fetch_add(1, Ordering::Relaxed);
        }
        ConnectedSource(metrics, index)
    }

    /// A feed: counted in the total only (feeds have no per-source figures here).
    pub(crate) fn feed(metrics: &'a Metrics) -> Self {
        ConnectedSource::new(metrics, usize::MAX)
    }
}

impl Drop for ConnectedSource<'_> {
    fn drop(&mut self) {
        self.0.sources_connected.fetch_sub(1, Ordering::Relaxed);
        if let Some(s) = self.0.per_source.get(self.1) {
            s.connected.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_source_figures_and_a_lag_summed_over_sources() {
        let m = Metrics::for_sources(["ws://a", "ws://b"]);
        assert_eq!(m.sources()[0].last_seq, None);
        assert_eq!(m.snapshot().seq_lag, 0);
        // Seqs of two hosts are unrelated numbers: each source's lag is its own.
        m.seq_seen(0, 1000);
        m.seq_done(0, 990);
        m.seq_seen(1, 20);
        m.seq_done(1, 17);
        m.frame_in(1);
        m.rejected_from("ws://b");
        m.rejected_from("ws://a-feed"); // not a source: counted in the total only
        m.handled_from("ws://a", Some(250));
        let _connected = ConnectedSource::new(&m, 1);
        let sources = m.sources();
        assert_eq!(sources[0].url, "ws://a");
        assert_eq!((sources[0].seq_lag, sources[1].seq_lag), (10, 3));
        assert_eq!(sources[0].cursor, Some(990));
        assert_eq!(sources[0].time_lag_ms, Some(250));
        assert_eq!(sources[1].time_lag_ms, None);
        assert_eq!((sources[0].rejected, sources[1].rejected), (0, 1));
        assert_eq!(sources[1].events_in, 1);
        assert!(!sources[0].connected && sources[1].connected);
        let total = m.snapshot();
        assert_eq!(total.seq_lag, 13);
        assert_eq!(total.rejected, 2);
        assert_eq!(total.handled, 1);
        assert_eq!(total.sources_connected, 1);
    }
}
