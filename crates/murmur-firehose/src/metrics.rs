//! Counters and gauges of a running watcher, readable at any time.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Live metrics of a watcher. Read a consistent-enough copy with [`Metrics::snapshot`].
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
}

impl Metrics {
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
            seq_lag: (self.last_seq_seen.load(Ordering::Relaxed)
                - self.last_seq_done.load(Ordering::Relaxed))
            .max(0),
            time_lag_ms: self.time_lag_ms.load(Ordering::Relaxed),
            sources: get(&self.sources),
            sources_connected: get(&self.sources_connected),
            errors: get(&self.errors),
            verifications_waiting: get(&self.verifications_waiting),
            inactive_skipped: get(&self.inactive_skipped),
        }
    }

    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts one connected source while it lives.
pub(crate) struct ConnectedSource<'a>(&'a Metrics);

impl<'a> ConnectedSource<'a> {
    pub(crate) fn new(metrics: &'a Metrics) -> Self {
        metrics.sources_connected.fetch_add(1, Ordering::Relaxed);
        ConnectedSource(metrics)
    }
}

impl Drop for ConnectedSource<'_> {
    fn drop(&mut self) {
        self.0.sources_connected.fetch_sub(1, Ordering::Relaxed);
    }
}
