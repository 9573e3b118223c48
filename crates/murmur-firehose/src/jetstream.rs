//! Jetstream as a watcher source: JSON events over WebSocket, filtered in the server, with a
//! cursor in unix microseconds.
//!
//! Jetstream leaves the proofs behind: an op read from it is
//! [`Provenance::Unverified`](crate::Provenance) unless the source fetches each matched
//! record's proof from the author's PDS ([`JetstreamSource::proofs`]). Either way the record
//! is converted to DAG-CBOR and must hash to the CID the event names, or it is rejected.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::{SinkExt, StreamExt};
use murmur_jetstream::{Decompressor, Event, EventBody, Operation, Options};
use murmur_sync::{Action, Cid, SyncError};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{debug, info, warn};

use crate::dedup::digest_of;
use crate::feed::{Feed, FeedSink};
use crate::progress::{EventToken, Progress};
use crate::source::{default_tls, handshake_error};
use crate::{
    Backoff, FirehoseError, OpData, Provenance, Rejection, RepoEvent, SourceError, WatchError,
};

/// How far back a [`JetstreamSource`] resumes by default, before the last event it finished:
/// Jetstream's cursor is a time, and events a few moments apart can arrive out of order.
pub const DEFAULT_JETSTREAM_REWIND: Duration = Duration::from_secs(2);

/// How many ops a [`JetstreamSource`] remembers having handed over, so that the events a
/// rewind replays are dropped (across restarts the watcher's dedup store does it).
const RECENT_OPS: usize = 100_000;

/// How often the cursor is persisted while events are read.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// Reads [Jetstream](https://github.com/bluesky-social/jetstream)'s `/subscribe` (v1): add it
/// with [`WatcherBuilder::jetstream`](crate::WatcherBuilder::jetstream), or configure one and
/// add it with [`WatcherBuilder::feed`](crate::WatcherBuilder::feed).
///
/// - The server filters: the watcher's collections and DID allowlist go in the query
///   (`wantedCollections`, `wantedDids`; as the hello `options_update` when too long for a
///   URL). A narrower allowlist ([`Watcher::dids`](crate::Watcher::dids)) is sent on the live
///   connection as an `options_update`; a wider one reconnects from the cursor, and a newly
///   allowed repo's events count from the moment it was allowed (by the server's clock). The watcher applies its own filter too, so patterns Jetstream does
///   not take (more than 100 collections or 10,000 DIDs, `*` alone, an empty allowlist)
///   only cost bandwidth.
/// - Messages are zstd-compressed with Jetstream's dictionary unless
///   [`compress(false)`](Self::compress).
/// - Each record (JSON) is converted to DAG-CBOR and must hash to the event's CID: one that
///   does not is rejected ([`WatcherBuilder::on_rejected`](crate::WatcherBuilder::on_rejected)),
///   never handled.
/// - Nothing ties a Jetstream record to its author's key: ops are
///   [`Provenance::Unverified`](crate::Provenance). With [`proofs(true)`](Self::proofs) each
///   matched op is proven from the author's PDS (`com.atproto.sync.getRecord`, verified like
///   a `subscribeRepos` commit) before its handlers run; one that fails is rejected. A
///   record a later commit already changed or deleted can no longer be proven and is
///   rejected too (it is reported, and the later op follows). A proof shows the record is
///   in the author's repo at that path; the event's action, rev and time stay Jetstream's
///   word. With proofs, `#identity` and `#account` events (never signed) are not taken.
///   Proofs are fetched one at a time, in stream order: an author's PDS that does not
///   answer holds the feed (reported as
///   [`WatchError::VerificationStalled`](crate::WatchError::VerificationStalled)) until it
///   does.
/// - The cursor (the `time_us` of the last event whose handlers are done, with every event
///   read before it) is stored in the watcher's cursor store under the source's URL. A
///   connection resumes [`rewind`](Self::rewind) before it; the replayed events this
///   process handed over already are dropped here, and those finished before a restart by
///   the dedup store.
pub struct JetstreamSource {
    url: String,
    proofs: bool,
    compress: bool,
    rewind: Duration,
    start: Option<i64>,
    reconnect: Backoff,
    connect_timeout: Duration,
    healthy_after: Duration,
    ping_interval: Duration,
    idle_timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl JetstreamSource {
    /// Reads the Jetstream at `url` (`ws(s)://` or `http(s)://`, with or without the
    /// `/subscribe` path; a query is dropped: the options come from the watcher).
    pub fn new(url: &str) -> Self {
        let base = url.split(['?', '#']).next().unwrap_or(url);
        let base = base.trim_end_matches('/');
        let base = base
            .strip_suffix(murmur_jetstream::SUBSCRIBE_PATH)
            .unwrap_or(base);
        let ws = if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else {
            base.to_string()
        };
        JetstreamSource {
            url: format!("{ws}{}", murmur_jetstream::SUBSCRIBE_PATH),
            proofs: false,
            compress: true,
            rewind: DEFAULT_JETSTREAM_REWIND,
            start: None,
            reconnect: Backoff::default(),
            connect_timeout: Duration::from_secs(20),
            healthy_after: Duration::from_secs(30),
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            tls: None,
        }
    }

    /// The `/subscribe` URL, without query: the source's name and the key of its cursor.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Fetch and verify each matched op's proof from the author's PDS before its handlers
    /// run (default off): ops are then [`Provenance::Verified`](crate::Provenance), and one
    /// whose proof fails is rejected. Costs a request per op.
    pub fn proofs(mut self, on: bool) -> Self {
        self.proofs = on;
        self
    }

    /// Ask for zstd-compressed messages (default on: about a third of the bytes).
    pub fn compress(mut self, on: bool) -> Self {
        self.compress = on;
        self
    }

    /// How far before the stored cursor a connection resumes (default
    /// [`DEFAULT_JETSTREAM_REWIND`]).
    pub fn rewind(mut self, rewind: Duration) -> Self {
        self.rewind = rewind;
        self
    }

    /// Where to start (unix microseconds) when no cursor is stored (default: live events).
    pub fn start_cursor(mut self, time_us: i64) -> Self {
        self.start = Some(time_us);
        self
    }

    /// The reconnect policy (default: 200 ms doubling to 30 s, jittered, never giving up).
    /// [`WatcherBuilder::jetstream`](crate::WatcherBuilder::jetstream) uses the watcher's.
    pub fn reconnect(mut self, backoff: Backoff) -> Self {
        self.reconnect = backoff;
        self
    }

    /// How long connecting (TCP, TLS and the WebSocket handshake) may take (default 20 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sends a ping this often and treats `idle_timeout` of silence as a dead connection
    /// (default 20 s and 60 s).
    pub fn with_keepalive(mut self, ping_interval: Duration, idle_timeout: Duration) -> Self {
        self.ping_interval = ping_interval;
        self.idle_timeout = idle_timeout;
        self
    }

    /// The TLS client configuration for `wss://` URLs (default: the Mozilla roots).
    pub fn with_tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// The options a connection asks for: the watcher's collections and allowlist where
    /// Jetstream can filter by them.
    fn options(&self, sink: &FeedSink, cursor: Option<i64>) -> Options {
        let mut options = Options {
            cursor,
            compress: self.compress,
            ..Options::default()
        };
        if let Some(collections) = sink.wanted_collections()
            && murmur_jetstream::Filter::new(&collections, &[]).is_ok()
        {
            options.wanted_collections = collections;
        }
        if let Some(dids) = sink.filter().dids.list()
            && !dids.is_empty()
            && murmur_jetstream::Filter::new(&[], &dids).is_ok()
        {
            options.wanted_dids = dids;
        }
        options
    }

    async fn connect(&self, options: &Options) -> Result<Socket, SourceError> {
        // A long allowlist does not fit a URL (proxies refuse them): it goes as the hello.
        let hello = options.query().len() > MAX_QUERY_BYTES;
        let asked = if hello {
            Options {
                wanted_collections: Vec::new(),
                wanted_dids: Vec::new(),
                require_hello: true,
                ..options.clone()
            }
        } else {
            options.clone()
        };
        let query = asked.query();
        let url = if query.is_empty() {
            self.url.clone()
        } else {
            format!("{}?{query}", self.url)
        };
        let connector = match &self.tls {
            Some(config) => Some(Arc::clone(config)),
            None if self.url.starts_with("wss://") => Some(default_tls()?),
            None => None,
        }
        .map(tokio_tungstenite::Connector::Rustls);
        // A message larger than any event Jetstream sends ends the connection.
        let config = WebSocketConfig::default()
            .max_message_size(Some(murmur_jetstream::MAX_EVENT_BYTES))
            .max_frame_size(Some(murmur_jetstream::MAX_EVENT_BYTES));
        let (socket, _) =
            tokio_tungstenite::connect_async_tls_with_config(url, Some(config), true, connector)
                .await
                .map_err(handshake_error)?;
        let mut socket = socket;
        if hello {
            socket
                .send(Message::Text(options.options_update().into()))
                .await
                .map_err(|e| SourceError::Transport(e.to_string()))?;
        }
        Ok(socket)
    }
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What one Jetstream event is to the watcher ([`JetstreamOp::decode`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum JetstreamOp {
    /// An op to deliver: a record op whose record hashes to its CID, or an `#identity` or
    /// `#account` event; [`Provenance::Unverified`](crate::Provenance) (nothing ties it to
    /// the author's key). Its `seq` is the event's `time_us`.
    Op(OpData),
    /// A record op that does not hold: its record is not data-model JSON, does not hash to
    /// the CID the event names, or its DID, collection or record key is malformed. Never
    /// delivered.
    Rejected(OpData, Rejection),
    /// A kind the watcher does not take (Jetstream may add kinds).
    Other,
}

impl JetstreamOp {
    /// Decodes `event` (read from the source named `source`): the record converted from JSON
    /// to DAG-CBOR and checked against the event's CID.
    pub fn decode(source: &Arc<str>, event: &Event) -> JetstreamOp {
        let time = rfc3339(event.time_us);
        let commit = match &event.body {
            EventBody::Commit(commit) => commit,
            EventBody::Identity(identity) => {
                let data = OpData::repo_event(
                    Arc::clone(source),
                    event.did.clone(),
                    identity.seq,
                    identity.time.clone(),
                    RepoEvent::Identity {
                        handle: identity.handle.clone(),
                    },
                );
                return JetstreamOp::Op(with_time_us(data, event.time_us));
            }
            EventBody::Account(account) => {
                let data = OpData::repo_event(
                    Arc::clone(source),
                    event.did.clone(),
                    account.seq,
                    account.time.clone(),
                    RepoEvent::Account {
                        active: account.active,
                        status: account.status.clone(),
                    },
                );
                return JetstreamOp::Op(with_time_us(data, event.time_us));
            }
            EventBody::Other { .. } => return JetstreamOp::Other,
        };
        let action = match commit.operation {
            Operation::Create => Action::Create,
            Operation::Update => Action::Update,
            Operation::Delete => Action::Delete,
        };
        let data = OpData::new(
            Arc::clone(source),
            event.did.clone(),
            commit.rev.clone(),
            event.time_us,
            time,
            action,
            format!("{}/{}", commit.collection, commit.rkey),
        )
        .with_provenance(Provenance::Unverified);
        let malformed = |data: OpData, reason: String| {
            JetstreamOp::Rejected(
                data,
                Rejection::Verification(Arc::new(SyncError::Decode {
                    context: "jetstream commit event",
                    reason,
                })),
            )
        };
        if !murmur_lexicon::syntax::is_did(&event.did) {
            return malformed(data, format!("{:?} is not a DID", clip(&event.did)));
        }
        if !murmur_lexicon::syntax::is_nsid(&commit.collection) {
            return malformed(
                data,
                format!("{:?} is not an NSID", clip(&commit.collection)),
            );
        }
        if !murmur_lexicon::syntax::is_record_key(&commit.rkey) {
            return malformed(
                data,
                format!("{:?} is not a record key", clip(&commit.rkey)),
            );
        }
        if !murmur_lexicon::syntax::is_tid(&commit.rev) {
            return malformed(data, format!("rev {:?} is not a TID", clip(&commit.rev)));
        }
        let (Some(record), Some(cid)) = (&commit.record, &commit.cid) else {
            // A delete (Event::from_json holds creates and updates to a record and a CID).
            return JetstreamOp::Op(data);
        };
        let cid = match Cid::try_from(cid.as_str()) {
            Ok(cid) => cid,
            Err(e) => return malformed(data, format!("cid {:?}: {e}", clip(cid))),
        };
        let bytes = murmur_lexicon::data::json_to_data(record)
            .and_then(|value| murmur_lexicon::data::to_dag_cbor(&value));
        let bytes = match bytes {
            Ok(bytes) => bytes,
            Err(e) => {
                return malformed(
                    data.with_record(cid, None),
                    format!("the record is not data-model JSON: {e}"),
                );
            }
        };
        // A record's CID in a repo is CIDv1, DAG-CBOR, SHA-256: any other does not match.
        let actual = murmur_sync::cid_for(murmur_sync::DAG_CBOR, &bytes);
        if actual != cid {
            return JetstreamOp::Rejected(
                data.with_record(cid, None),
                Rejection::Verification(Arc::new(SyncError::CidMismatch {
                    cid: cid.to_string(),
                    actual: actual.to_string(),
                })),
            );
        }
        JetstreamOp::Op(data.with_record(cid, Some(bytes)))
    }
}

/// A repo event's op as Jetstream delivers it: unverified, with the Jetstream cursor as seq
/// (the upstream's seq stays in the path, which keys the dedup store).
fn with_time_us(mut data: OpData, time_us: i64) -> OpData {
    data.seq = time_us;
    data.with_provenance(Provenance::Unverified)
}

/// The longest query string sent; longer filters go in the hello `options_update`.
const MAX_QUERY_BYTES: usize = 4096;

/// This machine's clock in unix microseconds.
fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// How far ahead of this machine's clock an event's `time_us` may be (5 minutes).
const MAX_CLOCK_AHEAD_US: i64 = 300_000_000;

/// At most 100 characters of a string a server sent, for errors and logs.
fn clip(s: &str) -> String {
    match s.char_indices().nth(100) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_string(),
    }
}

/// `time_us` as RFC 3339 (the epoch for a time chrono cannot represent).
fn rfc3339(time_us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(time_us)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Which events are finished (the cursor) and which ops were handed over lately.
struct Tracker {
    progress: Progress,
    /// The latest time registered in `progress`: a replayed (older) event is registered
    /// at it, so the cursor never moves back.
    latest: Option<i64>,
    /// Digests of (did, rev, path and CID) handed over, oldest first, for dropping replays.
    recent: HashSet<u128>,
    order: VecDeque<u128>,
    in_flight: usize,
    /// The last widening of the allowlist: the DIDs allowed before it, and its time (this
    /// clock's, or the last event read if that is later). The reconnect that follows replays a little; events of newly
    /// allowed DIDs from before the change are skipped, as they would have been without it.
    widening: Option<(HashSet<String>, i64)>,
}

impl Tracker {
    /// Remembers `key` as handed over (the oldest is forgotten past [`RECENT_OPS`]).
    fn remember(&mut self, key: u128) {
        if !self.recent.insert(key) {
            return;
        }
        self.order.push_back(key);
        while self.order.len() > RECENT_OPS {
            if let Some(old) = self.order.pop_front() {
                self.recent.remove(&old);
            }
        }
    }
}

fn lock(m: &Mutex<Tracker>) -> MutexGuard<'_, Tracker> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The state one run of a [`JetstreamSource`] shares with its ops' completions.
struct Run {
    tracker: Mutex<Tracker>,
    idle: Notify,
    /// The cursor last written to the store.
    stored: Mutex<Option<i64>>,
}

impl Run {
    fn begin(&self, time_us: i64, ops: usize) -> EventToken {
        let mut tracker = lock(&self.tracker);
        tracker.in_flight += ops;
        let time_us = tracker.latest.map_or(time_us, |latest| latest.max(time_us));
        tracker.latest = Some(time_us);
        tracker.progress.begin(time_us, ops)
    }

    /// One op of `token` is done; with `finished` false it was dropped unfinished (the
    /// cursor stays before it).
    fn end(&self, token: EventToken, finished: bool) {
        let mut tracker = lock(&self.tracker);
        if finished {
            tracker.progress.finish(token);
        }
        tracker.in_flight -= 1;
        if tracker.in_flight == 0 {
            self.idle.notify_waiters();
        }
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if lock(&self.tracker).in_flight == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// An op handed to the watcher: done when its completion runs, or, dropped without it (cut
/// short while queued by the watcher stopping, or killed), no longer waited for but never
/// passed by the cursor.
struct Pending {
    run: Arc<Run>,
    token: EventToken,
    finished: bool,
}

impl Pending {
    fn finish(mut self) {
        self.finished = true;
        self.run.end(self.token, true);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.finished {
            self.run.end(self.token, false);
        }
    }
}

/// How a connection ended.
enum Ended {
    /// The watcher is stopping.
    Stopped,
    /// The allowlist took in repos: connect again from a little before the last event read,
    /// so their events sent before Jetstream applied the new filter are not missed.
    Widened,
    /// The connection was lost; reconnect.
    Lost(SourceError),
}

#[async_trait]
impl Feed for JetstreamSource {
    fn name(&self) -> &str {
        &self.url
    }

    async fn run(self: Arc<Self>, sink: FeedSink) -> Result<(), FirehoseError> {
        let store = sink.pipeline.cursor_store.clone();
        let stored = match &store {
            Some(store) => store.load(&self.url).await?,
            None => None,
        };
        let start = stored.or(self.start);
        if let Some(cursor) = start
            && cursor < 0
        {
            return Err(FirehoseError::InvalidCursor {
                source_url: self.url.clone(),
                seq: cursor,
                reason: "a Jetstream cursor is a unix time in microseconds".into(),
            });
        }
        info!(feed = %self.url, cursor = ?start, proofs = self.proofs, "starting");
        let run = Arc::new(Run {
            tracker: Mutex::new(Tracker {
                progress: Progress::resume_from(start),
                latest: start,
                recent: HashSet::new(),
                order: VecDeque::new(),
                in_flight: 0,
                widening: None,
            }),
            idle: Notify::new(),
            stored: Mutex::new(stored),
        });
        let rewind = i64::try_from(self.rewind.as_micros()).unwrap_or(i64::MAX);
        let mut attempt = 0u32;
        // Taken before the options are: a change made while connecting is sent once connected.
        let mut dids = sink.filter().dids.subscribe();
        loop {
            if sink.is_stopped() {
                break;
            }
            dids.mark_unchanged();
            // After the last event read (those read are queued here already), or the stored
            // cursor at first; rewound a little either way.
            let cursor = lock(&run.tracker)
                .latest
                .map(|c| c.saturating_sub(rewind).max(0));
            let options = self.options(&sink, cursor);
            let connected = tokio::select! {
                r = tokio::time::timeout(self.connect_timeout, self.connect(&options)) => {
                    r.unwrap_or(Err(SourceError::ConnectTimeout(self.connect_timeout)))
                }
                _ = sink.stopped() => break,
            };
            let wait = match connected {
                Ok(socket) => {
                    info!(feed = %self.url, cursor = ?cursor, "connected");
                    let since = Instant::now();
                    let ended = {
                        let _connected = sink.connected();
                        self.read(&sink, socket, options, &mut dids, &run).await
                    };
                    if since.elapsed() >= self.healthy_after {
                        attempt = 0;
                    }
                    match ended {
                        Ended::Stopped => break,
                        Ended::Widened => {
                            info!(feed = %self.url, "allowlist widened: reconnecting from the cursor");
                            continue;
                        }
                        Ended::Lost(error) => {
                            let wait = match &error {
                                SourceError::RateLimited { retry_after } => *retry_after,
                                _ => None,
                            };
                            sink.report(WatchError::Disconnected {
                                source: self.url.clone(),
                                error,
                            });
                            wait
                        }
                    }
                }
                Err(SourceError::Refused { status, reason }) => {
                    run.wait_idle().await;
                    self.flush(&sink, &run).await;
                    return Err(FirehoseError::Source {
                        url: self.url.clone(),
                        reason: format!("HTTP {status}: {reason}"),
                    });
                }
                Err(error) => {
                    let wait = match &error {
                        SourceError::RateLimited { retry_after } => *retry_after,
                        _ => None,
                    };
                    sink.report(WatchError::Connect {
                        source: self.url.clone(),
                        error,
                    });
                    wait
                }
            };
            let Some(delay) = self.reconnect.delay(attempt) else {
                run.wait_idle().await;
                self.flush(&sink, &run).await;
                return Err(FirehoseError::Source {
                    url: self.url.clone(),
                    reason: format!("gave up after {attempt} reconnect attempts"),
                });
            };
            attempt = attempt.saturating_add(1);
            let delay = wait.map_or(delay, |w| w.max(delay));
            info!(feed = %self.url, ?delay, "reconnecting");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = sink.stopped() => break,
            }
        }
        // Ops handed over finish (the watcher drains them); the cursor goes behind them.
        run.wait_idle().await;
        self.flush(&sink, &run).await;
        Ok(())
    }
}

impl JetstreamSource {
    /// Reads one connection until it ends or the watcher stops.
    async fn read(
        &self,
        sink: &FeedSink,
        socket: Socket,
        mut options: Options,
        dids: &mut tokio::sync::watch::Receiver<u64>,
        run: &Arc<Run>,
    ) -> Ended {
        let (mut tx, mut rx) = socket.split();
        let decompressor = Decompressor::new();
        let mut ping = tokio::time::interval(self.ping_interval);
        ping.tick().await;
        let mut flush = tokio::time::interval(FLUSH_EVERY);
        // Moved on by whatever arrives (pongs included), not by our pings or flushes.
        let mut deadline = tokio::time::Instant::now() + self.idle_timeout;
        loop {
            let next = tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    return Ended::Lost(SourceError::Idle(self.idle_timeout));
                }
                _ = sink.stopped() => {
                    let _ = tx.send(Message::Close(None)).await;
                    return Ended::Stopped;
                }
                _ = flush.tick() => {
                    self.flush(sink, run).await;
                    continue;
                }
                _ = ping.tick() => {
                    if let Err(e) = tx.send(Message::Ping(Vec::new().into())).await {
                        return Ended::Lost(SourceError::Transport(e.to_string()));
                    }
                    continue;
                }
                Ok(()) = dids.changed() => {
                    dids.mark_unchanged();
                    let updated = self.options(sink, options.cursor);
                    let widened = !options.wanted_dids.is_empty()
                        && (updated.wanted_dids.is_empty()
                            || updated.wanted_dids.iter().any(|d| !options.wanted_dids.contains(d)));
                    if widened {
                        {
                            // Before the change: stored by the server before now (its times
                            // are the times it stored events), or read already.
                            let now = now_us();
                            let mut tracker = lock(&run.tracker);
                            let at = tracker.latest.map_or(now, |latest| latest.max(now));
                            tracker.widening =
                                Some((options.wanted_dids.iter().cloned().collect(), at));
                        }
                        let _ = tx.send(Message::Close(None)).await;
                        return Ended::Widened;
                    }
                    if updated.wanted_dids != options.wanted_dids {
                        debug!(feed = %self.url, dids = updated.wanted_dids.len(), "sending options_update");
                        let update = updated.options_update();
                        if let Err(e) = tx.send(Message::Text(update.into())).await {
                            return Ended::Lost(SourceError::Transport(e.to_string()));
                        }
                        options = updated;
                    }
                    continue;
                }
                next = rx.next() => {
                    deadline = tokio::time::Instant::now() + self.idle_timeout;
                    next
                }
            };
            let decoded = match next {
                None => return Ended::Lost(SourceError::Closed(None)),
                Some(Err(e)) => return Ended::Lost(SourceError::Transport(e.to_string())),
                Some(Ok(Message::Close(frame))) => {
                    return Ended::Lost(SourceError::Closed(frame.map(|f| f.reason.to_string())));
                }
                Some(Ok(Message::Binary(bytes))) => decompressor
                    .decompress(&bytes)
                    .and_then(|json| Event::from_json(&json)),
                Some(Ok(Message::Text(text))) => Event::from_json(text.as_bytes()),
                Some(Ok(_)) => continue,
            };
            match decoded {
                Ok(event) => {
                    let stopped = tokio::select! {
                        () = self.take(sink, event, run) => false,
                        _ = sink.stopped() => true,
                    };
                    if stopped {
                        return Ended::Stopped;
                    }
                }
                // The connection stays: one bad message says nothing of the next.
                Err(e) => sink.report(WatchError::Feed {
                    source: self.url.clone(),
                    error: Arc::new(e),
                }),
            }
        }
    }

    /// Hands one event's op to the watcher (or drops it: not wanted, a replay, rejected).
    async fn take(&self, sink: &FeedSink, event: Event, run: &Arc<Run>) {
        let time_us = event.time_us;
        // A time that cannot be a cursor (before 1970, or ahead of this clock by more than
        // MAX_CLOCK_AHEAD) would stick the stored cursor in place: the event is refused
        // before it is counted.
        if time_us < 0 || time_us > now_us().saturating_add(MAX_CLOCK_AHEAD_US) {
            sink.report(WatchError::Feed {
                source: self.url.clone(),
                error: Arc::new(murmur_jetstream::JetstreamError::Event {
                    reason: format!(
                        "time_us {time_us} is not a time up to {MAX_CLOCK_AHEAD_US} µs from now; event of {} skipped",
                        clip(&event.did)
                    ),
                }),
            });
            return;
        }
        let before_joining = lock(&run.tracker)
            .widening
            .as_ref()
            .is_some_and(|(before, at)| time_us <= *at && !before.contains(&event.did));
        if before_joining || !sink.filter().allows_repo(&event.did) {
            run.begin(time_us, 0);
            return;
        }
        if !matches!(event.body, EventBody::Commit(_))
            && (self.proofs || !murmur_lexicon::syntax::is_did(&event.did))
        {
            // `#identity` and `#account` are not signed and cannot be proven: a watcher that
            // asked for proofs does not take them from Jetstream (they would change what it
            // believes of a repo on the word of the Jetstream's operator).
            run.begin(time_us, 0);
            return;
        }
        if let EventBody::Commit(commit) = &event.body {
            let action = match commit.operation {
                Operation::Create => Action::Create,
                Operation::Update => Action::Update,
                Operation::Delete => Action::Delete,
            };
            // Not wanted: no conversion, no proof.
            if !sink.filter().allows_repo(&event.did) || !sink.wants(&commit.collection, action) {
                run.begin(time_us, 0);
                return;
            }
        }
        let mut data = match JetstreamOp::decode(&sink.name, &event) {
            JetstreamOp::Op(data) => data,
            JetstreamOp::Rejected(data, why) => {
                run.begin(time_us, 0);
                sink.reject(data, why);
                return;
            }
            JetstreamOp::Other => {
                run.begin(time_us, 0);
                return;
            }
        };
        // A replay (after a rewind) of an op handed over already in this process. The CID is
        // part of the key: an op of the same key with another record (a forgery, rejected
        // or not) does not hide the genuine one.
        let cid = data.cid.map(|c| c.to_string()).unwrap_or_default();
        // With proofs, the rev is not proven (only that the author's repo holds this CID at
        // this path): a replay is known without it, so made-up revs cannot multiply an op.
        let rev = if self.proofs { "" } else { data.rev.as_str() };
        let key = digest_of(&data.did, rev, &format!("{} {cid}", data.path));
        if lock(&run.tracker).recent.contains(&key) {
            debug!(feed = %self.url, did = %data.did, path = %data.path, "replayed op dropped");
            return;
        }
        if self.proofs && data.repo_event.is_none() {
            match self.prove(sink, &mut data).await {
                Ok(()) => {}
                Err(e) => {
                    run.begin(time_us, 0);
                    sink.reject(data, Rejection::Verification(Arc::new(e)));
                    return;
                }
            }
        }
        lock(&run.tracker).remember(key);
        let pending = Pending {
            token: run.begin(time_us, 1),
            run: Arc::clone(run),
            finished: false,
        };
        sink.deliver(data, move |_| pending.finish()).await;
    }

    /// Proves an op from the author's PDS, retrying while a host it needs is unreachable.
    /// Sets the record to the proven bytes and the provenance to verified.
    async fn prove(&self, sink: &FeedSink, data: &mut OpData) -> Result<(), SyncError> {
        let verifier = sink.verifier();
        let op: &OpData = data;
        let record = sink
            .until_verified(&op.did, op.seq, || {
                verifier.prove_op_from_pds(&op.did, &op.rev, &op.path, op.cid)
            })
            .await?;
        data.record = record;
        data.provenance = sink.checked_provenance();
        Ok(())
    }

    /// Stores the cursor when it moved.
    async fn flush(&self, sink: &FeedSink, run: &Run) {
        let Some(store) = &sink.pipeline.cursor_store else {
            return;
        };
        let low = lock(&run.tracker).progress.low_water();
        let Some(cursor) = low else { return };
        if *run.stored.lock().unwrap_or_else(|e| e.into_inner()) == Some(cursor) {
            return;
        }
        match store.store(&self.url, cursor).await {
            Ok(()) => *run.stored.lock().unwrap_or_else(|e| e.into_inner()) = Some(cursor),
            Err(e) => warn!(feed = %self.url, error = %e, "cursor not persisted; will retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The event shapes Jetstream's README shows, byte for byte.
    const README_COMMIT: &str = r#"{"did":"did:plc:eygmaihciaxprqvxpfvl6flk","time_us":1725911162329308,"kind":"commit","commit":{"rev":"3l3qo2vutsw2b","operation":"create","collection":"app.bsky.feed.like","rkey":"3l3qo2vuowo2b","record":{"$type":"app.bsky.feed.like","createdAt":"2024-09-09T19:46:02.102Z","subject":{"cid":"bafyreidc6sydkkbchcyg62v77wbhzvb2mvytlmsychqgwf2xojjtirmzj4","uri":"at://did:plc:wa7b35aakoll7hugkrjtf3xf/app.bsky.feed.post/3l3pte3p2e325"}},"cid":"bafyreidwaivazkwu67xztlmuobx35hs2lnfh3kolmgfmucldvhd3sgzcqi"}}"#;
    const README_DELETE: &str = r#"{"did":"did:plc:rfov6bpyztcnedeyyzgfq42k","time_us":1725516666833633,"kind":"commit","commit":{"rev":"3l3f6nzl3cv2s","operation":"delete","collection":"app.bsky.graph.follow","rkey":"3l3dn7tku762u"}}"#;
    const README_IDENTITY: &str = r#"{"did":"did:plc:ufbl4k27gp6kzas5glhz7fim","time_us":1725516665234703,"kind":"identity","identity":{"did":"did:plc:ufbl4k27gp6kzas5glhz7fim","handle":"yohenrique.bsky.social","seq":1409752997,"time":"2024-09-05T06:11:04.870Z"}}"#;
    const README_ACCOUNT: &str = r#"{"did":"did:plc:ufbl4k27gp6kzas5glhz7fim","time_us":1725516665333808,"kind":"account","account":{"active":true,"did":"did:plc:ufbl4k27gp6kzas5glhz7fim","seq":1409753013,"time":"2024-09-05T06:11:04.870Z"}}"#;

    fn decode(json: &str) -> JetstreamOp {
        let source: Arc<str> = Arc::from("ws://jetstream.test/subscribe");
        JetstreamOp::decode(&source, &Event::from_json(json.as_bytes()).unwrap())
    }

    fn rejection(json: &str) -> String {
        match decode(json) {
            JetstreamOp::Rejected(_, why) => why.to_string(),
            other => panic!("not rejected: {other:?}"),
        }
    }

    #[test]
    fn urls_normalise_to_the_subscribe_endpoint() {
        for url in [
            "ws://localhost:6008",
            "ws://localhost:6008/",
            "http://localhost:6008",
            "ws://localhost:6008/subscribe",
            "ws://localhost:6008/subscribe?wantedCollections=a.b.c",
        ] {
            assert_eq!(
                JetstreamSource::new(url).url(),
                "ws://localhost:6008/subscribe"
            );
        }
        assert_eq!(
            JetstreamSource::new("https://jetstream2.us-east.bsky.network").url(),
            "wss://jetstream2.us-east.bsky.network/subscribe"
        );
    }

    #[test]
    fn the_readme_commit_hashes_to_its_cid_and_is_unverified() {
        let JetstreamOp::Op(data) = decode(README_COMMIT) else {
            panic!("the README's like is a valid op")
        };
        assert_eq!(data.did, "did:plc:eygmaihciaxprqvxpfvl6flk");
        assert_eq!(data.rev, "3l3qo2vutsw2b");
        assert_eq!(data.path, "app.bsky.feed.like/3l3qo2vuowo2b");
        assert_eq!(data.action, Action::Create);
        assert_eq!(data.seq, 1725911162329308);
        assert_eq!(data.time, "2024-09-09T19:46:02.329308Z");
        assert_eq!(data.provenance, Provenance::Unverified);
        let bytes = data.record.as_deref().unwrap();
        assert_eq!(
            murmur_sync::cid_for(0x71, bytes).to_string(),
            "bafyreidwaivazkwu67xztlmuobx35hs2lnfh3kolmgfmucldvhd3sgzcqi"
        );
    }

    #[test]
    fn the_readme_delete_identity_and_account_events_decode() {
        let JetstreamOp::Op(delete) = decode(README_DELETE) else {
            panic!("a delete")
        };
        assert_eq!(delete.action, Action::Delete);
        assert_eq!((delete.cid, delete.record.as_ref()), (None, None));
        let JetstreamOp::Op(identity) = decode(README_IDENTITY) else {
            panic!("an identity event")
        };
        assert_eq!(identity.path, "#identity/1409752997");
        assert_eq!(identity.seq, 1725516665234703);
        assert_eq!(
            identity.repo_event,
            Some(RepoEvent::Identity {
                handle: Some("yohenrique.bsky.social".into())
            })
        );
        let JetstreamOp::Op(account) = decode(README_ACCOUNT) else {
            panic!("an account event")
        };
        assert_eq!(account.path, "#account/1409753013");
        assert_eq!(
            account.repo_event,
            Some(RepoEvent::Account {
                active: true,
                status: None
            })
        );
        assert!(matches!(
            decode(r#"{"did":"did:plc:x","time_us":5,"kind":"sync","sync":{}}"#),
            JetstreamOp::Other
        ));
    }

    #[test]
    fn records_that_do_not_hold_are_rejected_saying_why() {
        // The like's record altered, its CID kept.
        let altered = README_COMMIT.replace("2024-09-09T19:46:02.102Z", "2024-09-09T19:46:02.103Z");
        assert!(
            rejection(&altered).contains("does not hash to its CID"),
            "{}",
            rejection(&altered)
        );
        let float = README_COMMIT.replace(r#""createdAt""#, r#""n":1.5,"createdAt""#);
        assert!(rejection(&float).contains("float"), "{}", rejection(&float));
        let bad_cid = README_COMMIT.replace("bafyreidwaiva", "xx");
        assert!(
            rejection(&bad_cid).contains("cid"),
            "{}",
            rejection(&bad_cid)
        );
        let bad_rkey = README_COMMIT.replace("3l3qo2vuowo2b", "a/b");
        assert!(
            rejection(&bad_rkey).contains("record key"),
            "{}",
            rejection(&bad_rkey)
        );
        let bad_collection =
            README_COMMIT.replace(r#""app.bsky.feed.like","rkey""#, r#""like","rkey""#);
        assert!(rejection(&bad_collection).contains("NSID"));
        let bad_did = README_COMMIT.replace("did:plc:eygmaihciaxprqvxpfvl6flk", "someone");
        assert!(rejection(&bad_did).contains("not a DID"));
    }
}
