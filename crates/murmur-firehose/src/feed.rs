//! Feeds: sources that deliver ops one by one and take an acknowledgement for each (a message
//! bus such as murmur-bus's NATS JetStream consumer), as opposed to a [`Source`](crate::Source)
//! of event-stream frames with a seq cursor.
//!
//! A feed decodes (and, unless it trusts its upstream, verifies) each message into an
//! [`OpData`] and hands it to [`FeedSink::deliver`] with a completion callback. The watcher
//! routes it to the same handlers, in the same per-DID lanes, with the same retries, dedup store
//! and dead letters as ops read from a PDS, and calls the callback once with what became of it
//! ([`Delivered`]): that is when the feed acknowledges the message upstream. Ops whose
//! handlers have not finished are never acknowledged, so a process that dies leaves them for
//! the upstream to deliver again.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::dispatch::Completion;
use crate::op::{ACCOUNT_EVENTS, IDENTITY_EVENTS, OpData};
use crate::pipeline::Pipeline;
use crate::{
    Action, Filter, FirehoseError, Gap, GapKind, OpEvent, Rejected, Rejection, WatchError,
};

/// A place ops come from one by one, each acknowledged when its handlers are done. Add one
/// with [`WatcherBuilder::feed`](crate::WatcherBuilder::feed).
#[async_trait]
pub trait Feed: Send + Sync + 'static {
    /// A stable name (e.g. `nats://host:4222/STREAM/consumer`): [`OpData::source`] of its ops,
    /// and the `source` of its [`WatchError`]s.
    fn name(&self) -> &str;

    /// Reads until the watcher stops ([`FeedSink::stopped`]) or the feed fails for good,
    /// handing every op to [`FeedSink::deliver`]. Transient trouble (a server restarting) is
    /// retried inside, reported with [`FeedSink::report`]; an `Err` stops the watcher.
    async fn run(self: Arc<Self>, sink: FeedSink) -> Result<(), FirehoseError>;
}

/// What became of one delivered op: the feed acknowledges its message accordingly.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Delivered {
    /// Every handler it went to finished Ok.
    Handled,
    /// No handler wanted it (its collection, action or DID is not watched).
    Unwanted,
    /// The dedup store says it was handled before (a redelivery after a restart).
    Duplicate,
    /// A handler failed for good (or kept failing through its retries): the op went to the
    /// dead-letter store.
    DeadLettered {
        /// The handler that failed.
        handler: String,
        /// Its last error.
        error: String,
    },
    /// It never reached a handler: its record does not decode, breaks its lexicon, or failed
    /// verification.
    Rejected(Rejection),
}

/// A callback run once with what became of a delivered op.
pub type OnDelivered = Box<dyn FnOnce(Delivered) + Send + 'static>;

/// A feed's way into the watcher: routing, ordering, retries and dead letters, shared with
/// the watcher's other sources.
#[derive(Clone)]
pub struct FeedSink {
    pub(crate) pipeline: Arc<Pipeline>,
    pub(crate) name: Arc<str>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl FeedSink {
    /// The feed's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The watcher's filter (DIDs, collections, actions), e.g. to filter in the server.
    pub fn filter(&self) -> &Filter {
        &self.pipeline.filter
    }

    /// The watcher's verifier (identity resolution, proofs), shared with its other sources.
    pub fn verifier(&self) -> &Arc<murmur_sync::Verifier> {
        &self.pipeline.verifier
    }

    /// Whether some handler (or the tail) takes ops of `collection` with `action`, or the
    /// `#identity`/`#account` events ([`IDENTITY_EVENTS`], [`ACCOUNT_EVENTS`]).
    pub fn wants(&self, collection: &str, action: Action) -> bool {
        self.pipeline.wants(collection, action)
    }

    /// The collections the watcher's handlers are routed to (exact NSIDs or `prefix.*`
    /// patterns, from the filter when it has some, else from the handlers' routes); `None`
    /// when some handler takes every collection (a tail without a collection filter).
    pub fn wanted_collections(&self) -> Option<Vec<String>> {
        self.pipeline.wanted_collections()
    }

    /// Hands one op to the watcher. Waits while the watcher's queue is full (backpressure:
    /// read no faster than handlers run). `done` runs once, when its handlers are finished;
    /// it never runs for an op cut short by a kill (drop) of the watcher.
    ///
    /// An op with [`OpData::repo_event`] set is an `#identity` or `#account` event: it goes to
    /// the handlers that take those, and an `#account` event also decides whether the repo's
    /// later ops are delivered (not while the account is inactive).
    pub async fn deliver(&self, op: OpData, done: impl FnOnce(Delivered) + Send + 'static) {
        self.pipeline.deliver(&self.name, op, Box::new(done)).await;
    }

    /// Runs `verify` (e.g. a proof check of an op) until it succeeds or fails for a reason of
    /// the data's own, as the watcher does for its own sources: a passing failure (a host
    /// unreachable) is reported as [`WatchError::VerificationStalled`] and retried with the
    /// watcher's verification backoff, never faster than 100 ms, for as long as it takes.
    pub async fn until_verified<T, Fut>(
        &self,
        did: &str,
        seq: i64,
        verify: impl FnMut() -> Fut,
    ) -> Result<T, murmur_sync::SyncError>
    where
        Fut: std::future::Future<Output = Result<T, murmur_sync::SyncError>>,
    {
        self.pipeline
            .until_verified(&self.name, did, seq, verify)
            .await
    }

    /// The provenance of an op this feed checked against its author's key:
    /// [`Provenance::Verified`](crate::Provenance::Verified), unless the watcher verifies
    /// nothing ([`VerifyLevel::None`](murmur_sync::VerifyLevel::None)).
    pub fn checked_provenance(&self) -> crate::Provenance {
        self.pipeline.provenance()
    }

    /// Counts and reports an op that failed checks before delivery (e.g. its proof did not
    /// verify): logged, passed to `on_rejected`, never handled.
    pub fn reject(&self, op: OpData, rejection: Rejection) {
        self.pipeline.reject_feed_op(op, rejection);
    }

    /// Reports a gap the upstream announced. After a chain break in a repo this watcher
    /// holds a complete copy of (a [`Backfill`](crate::Backfill)), the repo is copied again
    /// and the missed ops delivered ([`Origin::Resync`](crate::Origin)) before its next op,
    /// as for a chain break the watcher finds itself.
    pub fn gap(&self, gap: Gap) {
        let broken = match &gap.kind {
            GapKind::ChainBreak { did } => Some(did.clone()),
            _ => None,
        };
        self.pipeline.report_gap(gap);
        if let Some(did) = broken
            && self.pipeline.filter.allows_repo(&did)
            && self.pipeline.has_baseline(&did)
        {
            self.pipeline.needs_copy(&did, crate::Origin::Resync);
            self.pipeline.sync_in_background(&did);
        }
    }

    /// Reports trouble the feed handled by its policy (a reconnect, a skipped message).
    pub fn report(&self, error: WatchError) {
        self.pipeline.report(error);
    }

    /// Counts the feed as connected (the watcher's `sources_connected` metric, which an
    /// Agent waits on before it reads repos) until the guard is dropped: hold it while the
    /// feed is reading from its upstream.
    pub fn connected(&self) -> FeedConnected<'_> {
        FeedConnected(crate::metrics::ConnectedSource::feed(
            &self.pipeline.metrics,
        ))
    }

    /// Whether the watcher is stopping: read nothing more.
    pub fn is_stopped(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Resolves when the watcher starts stopping.
    pub async fn stopped(&self) {
        let mut rx = self.shutdown.clone();
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// A feed counted as connected while this lives ([`FeedSink::connected`]).
#[must_use = "the feed counts as connected only while the guard lives"]
pub struct FeedConnected<'a>(#[allow(dead_code)] crate::metrics::ConnectedSource<'a>);

impl Pipeline {
    pub(crate) fn wants(&self, collection: &str, action: Action) -> bool {
        if collection == IDENTITY_EVENTS || collection == ACCOUNT_EVENTS {
            let tail = if collection == IDENTITY_EVENTS {
                self.filter.identity_events
            } else {
                self.filter.account_events
            };
            return (tail && self.tail.is_some())
                || self.routes(collection, action).next().is_some();
        }
        self.filter.allows_op(&format!("{collection}/"), action)
            && (self.tail.is_some() || self.routes(collection, action).next().is_some())
    }

    pub(crate) fn wanted_collections(&self) -> Option<Vec<String>> {
        use crate::filter::CollectionPattern;
        if !self.filter.collections.is_empty() {
            return Some(
                self.filter
                    .collections
                    .iter()
                    .map(|p| match p {
                        CollectionPattern::Exact(nsid) => nsid.clone(),
                        CollectionPattern::Prefix(prefix) => format!("{prefix}*"),
                    })
                    .collect(),
            );
        }
        if self.tail.is_some() {
            return None;
        }
        let mut nsids: Vec<String> = self
            .handlers
            .iter()
            .map(|h| h.handler.route().collection)
            .filter(|c| !c.is_empty() && !c.starts_with('#'))
            .map(str::to_string)
            .collect();
        nsids.sort();
        nsids.dedup();
        Some(nsids)
    }

    /// Routes one op of a feed and queues it; `done` runs when it is finished.
    pub(crate) async fn deliver(
        &self,
        feed: &str,
        mut data: OpData,
        done: crate::feed::OnDelivered,
    ) {
        crate::metrics::Metrics::inc(&self.metrics.events_in);
        data.source = Arc::from(feed);
        let handlers: Vec<_> = match &data.repo_event {
            Some(event) => {
                self.note_repo_event(feed, &data.did, event);
                self.repo_event_handlers(&data.did, event)
            }
            None => {
                let collection = data.path.split_once('/').map_or("", |(c, _)| c);
                let inactive = self.is_inactive(&data.did);
                if inactive
                    || collection.is_empty()
                    || collection.starts_with('#')
                    || !self.filter.allows_repo(&data.did)
                    || !self.filter.allows_op(&data.path, data.action)
                {
                    if inactive {
                        crate::metrics::Metrics::inc(&self.metrics.inactive_skipped);
                    }
                    Vec::new()
                } else {
                    self.routes(collection, data.action)
                        .chain(self.tail.iter().cloned())
                        .collect()
                }
            }
        };
        if handlers.is_empty() {
            done(Delivered::Unwanted);
            return;
        }
        if data.repo_event.is_none() {
            // A copy this repo needs goes first; it may include this op.
            self.settle(&data.did).await;
            if self.is_reflected(&data.did, &data.rev) {
                crate::metrics::Metrics::inc(&self.metrics.reflected_skipped);
                done(Delivered::Duplicate);
                return;
            }
        }
        crate::metrics::Metrics::inc(&self.metrics.ops_matched);
        let op = OpEvent::new(data, Arc::clone(&self.state));
        let permit = self.dispatcher.reserve().await;
        self.dispatcher.submit(crate::dispatch::Job {
            op,
            handlers,
            completion: Completion::Callback(done),
            _permit: permit,
        });
    }

    pub(crate) fn reject_feed_op(&self, data: OpData, rejection: Rejection) {
        self.metrics.rejected_from(&data.source);
        tracing::warn!(source = %data.source, did = %data.did, rev = %data.rev, path = %data.path, reason = %rejection, "op rejected; it never reaches handlers");
        if let Some(hook) = &self.dispatcher.runtime().on_rejected {
            let op = Rejected::Op(OpEvent::new(data, Arc::clone(&self.state)));
            self.call_rejected_hook(hook, &op, &rejection);
        }
    }
}
