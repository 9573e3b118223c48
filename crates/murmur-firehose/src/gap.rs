//! Gaps: events the application may have missed, reported instead of dropped silently.

/// What kind of gap.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GapKind {
    /// The stored cursor is older than the source's replay window (`OutdatedCursor`).
    OutdatedCursor,
    /// The stored cursor is ahead of the source (`FutureCursor`, e.g. after a relay reset);
    /// the watcher continues from the live stream.
    FutureCursor,
    /// The source's seq went backwards (a relay or PDS reset its sequence).
    SeqRegression {
        /// The last seq read before.
        last: i64,
        /// The seq now received.
        now: i64,
    },
    /// A repo's rev chain broke (missed commits): the repo can be re-fetched with `getRepo`
    /// ([`WatcherBuilder::on_resync`](crate::WatcherBuilder::on_resync) does it).
    ChainBreak {
        /// The repo.
        did: String,
    },
    /// A gap an upstream reported (e.g. a seq regression a murmur-bus hub saw on one of its
    /// sources, passed on over the bus).
    Upstream {
        /// The upstream's name for it.
        kind: String,
    },
}

/// A gap on one source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// The source URL.
    pub source: String,
    /// What happened.
    pub kind: GapKind,
    /// Details for logs.
    pub detail: String,
}
