//! The hub's Jetstream: `/subscribe` served from the frame stream, as JSON, for agents that do
//! not speak CBOR and CAR (TypeScript, Python, a shell with `websocat`).
//!
//! It speaks [Jetstream](https://github.com/bluesky-social/jetstream)'s v1 protocol, so
//! Jetstream clients connect to it unchanged (the wire types are in [`murmur_jetstream`]):
//! - one JSON event per record operation (`kind: "commit"`, with `rev`, `operation`,
//!   `collection`, `rkey`, and for creates and updates the `record` as atproto JSON and its
//!   `cid`), and `identity` and `account` events;
//! - `wantedCollections` (exact NSIDs or `prefix.*`, at most 100) and `wantedDids` (at most
//!   10,000), filtered in the server; identity and account events pass any collection filter;
//! - `cursor`: unix microseconds. Every event has a `time_us` of its own, increasing in stream
//!   order (the hub reserves one microsecond per op when it stores a frame, from the time it
//!   stores it), so a cursor maps onto the stream's start time: replay starts at the first
//!   event whose `time_us` is at or after the cursor (the event at the cursor comes again, as
//!   in Jetstream). A cursor older than the stream starts at its oldest event; one in the
//!   future, or none, is live;
//! - `compress=true` (or the header `Socket-Encoding: zstd`): every message a zstd frame made
//!   with Jetstream's own dictionary, sent binary; otherwise text;
//! - `requireHello=true`: nothing is sent until the subscriber's first `options_update`;
//! - `options_update` messages replace the filters and the size limit on a live connection;
//!   one that is not valid closes the connection with the reason (code 1008), as the filters
//!   it asked for cannot be honoured;
//! - `maxMessageSizeBytes`: larger events are left out for that subscriber.
//!
//! The events come from the same frames the relay serves: the PDS's commits, verified by the
//! hub before they were stored. Jetstream's JSON carries no proof; a subscriber that must
//! check a record itself fetches its proof (`com.atproto.sync.getRecord`) from the PDS.
//!
//! Slow consumers are treated as by the relay: one frame in flight per consumer, dropped
//! (closed with code 1008, `ConsumerTooSlow`) when its socket takes nothing for
//! [`JetstreamConfig::write_timeout`] or it falls [`JetstreamConfig::max_lag`] frames behind
//! after catching up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use futures_util::{SinkExt, StreamExt};
use murmur_jetstream::{Account, Commit, Event, EventBody, Filter, Identity, Operation, Options};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tracing::{debug, info, warn};

use crate::BusError;
use crate::relay::http_error;
use crate::stream::StreamSettings;
use crate::subject::Subjects;

/// The header the hub stores each frame with: the `time_us` of its first Jetstream event (the
/// frame's op `i` is `time_us + i`), reserved when the frame is stored so every event has a
/// microsecond of its own, increasing in stream order. A frame without it (stored by an older
/// hub) uses the time the stream stored it.
pub const TIME_US_HEADER: &str = "Murmur-Time-Us";

/// How far before a cursor the stream is read from, so events whose reserved time is a little
/// ahead of the time the stream stored them are not missed; those before the cursor are then
/// skipped.
const CURSOR_SLACK_US: i64 = 2_000_000;

/// Frames one connection's ordered consumer pulls ahead of its socket.
const PULL_BATCH: i64 = 32;

/// How long a connection may take to send its request head and finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest message a subscriber may send (an `options_update` with 10,000 DIDs and 100
/// collections is under 1 MB).
const MAX_SUBSCRIBER_MESSAGE: usize = 2 * 1024 * 1024;

/// How the Jetstream endpoint treats its subscribers.
#[derive(Debug, Clone)]
pub struct JetstreamConfig {
    /// How long one message may wait for a subscriber's socket before the subscriber is
    /// dropped (default 10 s).
    pub write_timeout: Duration,
    /// How many frames a subscriber that has caught up may fall behind the stream's head
    /// before it is dropped (default 100,000). Not applied while it replays from a cursor.
    pub max_lag: u64,
    /// Most subscribers at once; one beyond it is refused with HTTP 503 (default 1024).
    pub max_subscribers: usize,
}

impl Default for JetstreamConfig {
    fn default() -> Self {
        JetstreamConfig {
            write_timeout: Duration::from_secs(10),
            max_lag: 100_000,
            max_subscribers: 1024,
        }
    }
}

/// What the Jetstream endpoint has done so far.
#[derive(Debug, Default)]
pub struct JetstreamStats {
    /// Subscribers connected now.
    pub subscribers: AtomicU64,
    /// Events sent, over all subscribers.
    pub events_sent: AtomicU64,
    /// Events left out for a subscriber by its `maxMessageSizeBytes`.
    pub events_too_large: AtomicU64,
    /// `options_update` messages applied.
    pub options_updates: AtomicU64,
    /// Subscribers dropped for being too slow.
    pub too_slow: AtomicU64,
}

/// Jetstream's `/subscribe` over the frame stream (see the [module docs](self)).
/// [`Hub`](crate::Hub) runs one when built with
/// [`serve_jetstream`](crate::HubBuilder::serve_jetstream); [`JetstreamServer::bind`] runs one
/// on its own, on a frame stream a hub writes.
pub struct JetstreamServer {
    listener: TcpListener,
    shared: Arc<Shared>,
}

struct Shared {
    js: jetstream::Context,
    stream: String,
    filter: String,
    config: JetstreamConfig,
    stats: Arc<JetstreamStats>,
    /// Connections whose handshake is not done: bounded like the relay's.
    handshakes: tokio::sync::Semaphore,
}

/// Connections at once whose handshake is not done.
const MAX_HANDSHAKES: usize = 256;

impl JetstreamServer {
    /// Listens on `addr` and serves the frame stream of the bus `settings` describes (which
    /// must exist: a hub that serves Jetstream or a relay creates it).
    pub async fn bind(
        addr: SocketAddr,
        js: jetstream::Context,
        settings: &StreamSettings,
        config: JetstreamConfig,
    ) -> Result<JetstreamServer, BusError> {
        let subjects = settings.subjects()?;
        Self::bind_with(addr, js, settings, &subjects, config).await
    }

    pub(crate) async fn bind_with(
        addr: SocketAddr,
        js: jetstream::Context,
        settings: &StreamSettings,
        subjects: &Subjects,
        config: JetstreamConfig,
    ) -> Result<JetstreamServer, BusError> {
        let stream = settings.frame_stream();
        js.get_stream(&stream)
            .await
            .map_err(|e| BusError::js(format!("get stream {stream}"), e))?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| BusError::Listen {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
        Ok(JetstreamServer {
            listener,
            shared: Arc::new(Shared {
                js,
                stream,
                filter: subjects.frames_all(),
                config,
                stats: Arc::default(),
                handshakes: tokio::sync::Semaphore::new(MAX_HANDSHAKES),
            }),
        })
    }

    /// The address it listens on (the port chosen when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Counters of what it did.
    pub fn stats(&self) -> Arc<JetstreamStats> {
        Arc::clone(&self.shared.stats)
    }

    /// Serves subscribers until the future is dropped (which closes every connection).
    pub async fn run(self) {
        info!(addr = %self.local_addr(), stream = %self.shared.stream, "jetstream listening");
        let shared = self.shared;
        crate::relay::accept_loop(&self.listener, "jetstream", |tcp, peer| {
            serve(Arc::clone(&shared), tcp, peer)
        })
        .await
    }
}

/// The events one stored frame makes: one per op of a `#commit` (op `i` stamped
/// `time_us + i`), one for an `#identity` or `#account` (stamped `time_us`). Frames of other kinds make none. A record whose block is
/// missing or is not data-model DAG-CBOR makes no event (the hub verified the commit, so this
/// does not happen with frames it stored) and is reported in the error list.
pub fn events_of_frame(frame: &[u8], time_us: i64) -> Result<Vec<Event>, String> {
    events_for(frame, time_us, &Filter::default())
}

/// [`events_of_frame`], only the events `filter` lets through: a frame of a DID it does not
/// want is not decoded further, nor the record of an op of a collection it does not want.
fn events_for(frame: &[u8], time_us: i64, filter: &Filter) -> Result<Vec<Event>, String> {
    let decoded = murmur_sync::Frame::decode(frame).map_err(|e| e.to_string())?;
    if decoded.did().is_some_and(|did| !filter.wants_did(did)) {
        return Ok(Vec::new());
    }
    let event = |did: &str, body| Event {
        did: did.to_string(),
        time_us,
        body,
    };
    let op_event = |i: usize, did: &str, body| Event {
        did: did.to_string(),
        time_us: time_us.saturating_add(i64::try_from(i).unwrap_or(i64::MAX)),
        body,
    };
    Ok(match decoded {
        murmur_sync::Frame::Commit(commit) => {
            if !commit.any_op(|op| filter.wants_collection(op.collection())) {
                return Ok(Vec::new());
            }
            let car = murmur_sync::CarSlice::parse(&commit.blocks).map_err(|e| e.to_string())?;
            let mut events = Vec::with_capacity(commit.ops.len());
            for (i, op) in commit.ops.iter().enumerate() {
                // Skipped ops keep their place: op `i` is stamped `time_us + i` whatever the
                // filter.
                if !filter.wants_collection(op.collection()) {
                    continue;
                }
                let (record, cid) = match (op.action, op.cid) {
                    (murmur_sync::Action::Delete, _) => (None, None),
                    (_, None) => return Err(format!("{}: a write without a cid", op.path)),
                    (_, Some(cid)) => {
                        let block = car
                            .get(&cid)
                            .ok_or_else(|| format!("{}: record block {cid} missing", op.path))?;
                        let data = murmur_lexicon::data::dag_cbor_to_data(block)
                            .map_err(|e| format!("{}: {e}", op.path))?;
                        (
                            Some(murmur_lexicon::data::data_to_json(&data)),
                            Some(cid.to_string()),
                        )
                    }
                };
                let operation = match op.action {
                    murmur_sync::Action::Create => Operation::Create,
                    murmur_sync::Action::Update => Operation::Update,
                    murmur_sync::Action::Delete => Operation::Delete,
                };
                events.push(op_event(
                    i,
                    &commit.repo,
                    EventBody::Commit(Commit {
                        rev: commit.rev.clone(),
                        operation,
                        collection: op.collection().to_string(),
                        rkey: op.rkey().to_string(),
                        record,
                        cid,
                    }),
                ));
            }
            events
        }
        murmur_sync::Frame::Identity(identity) => vec![event(
            &identity.did,
            EventBody::Identity(Identity {
                did: identity.did.clone(),
                handle: identity.handle,
                seq: identity.seq,
                time: identity.time,
            }),
        )],
        murmur_sync::Frame::Account(account) => vec![event(
            &account.did,
            EventBody::Account(Account {
                active: account.active,
                did: account.did.clone(),
                seq: account.seq,
                time: account.time,
                status: account.status,
            }),
        )],
        _ => Vec::new(),
    })
}

/// Where a subscriber starts: live, or at the stream's first event stored at or after the
/// cursor (a cursor in the future is live, as in Jetstream).
fn deliver_policy(cursor: Option<i64>, now_us: i64) -> DeliverPolicy {
    match cursor {
        Some(cursor) if cursor <= now_us => {
            let from = cursor.saturating_sub(CURSOR_SLACK_US).max(0);
            let start = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(from) * 1_000)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            DeliverPolicy::ByStartTime { start_time: start }
        }
        _ => DeliverPolicy::New,
    }
}

fn now_us() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_micros()).unwrap_or(i64::MAX)
}

/// Decrements the subscriber count when a connection ends.
struct Connected(Arc<JetstreamStats>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.subscribers.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("murmur_jetstream_subscribers").decrement(1.0);
    }
}

/// A close frame (code 1008) with `reason` cut to the 123 bytes a close frame can carry, at
/// a character boundary.
fn close(reason: &str) -> Message {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code: CloseCode::Policy,
        reason: Utf8Bytes::from(reason[..end].to_string()),
    }))
}

/// One subscriber: handshake and options, the hello if asked for, then events until it
/// leaves or is dropped.
async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let Ok(handshaking) = shared.handshakes.try_acquire() else {
        debug!(%peer, "jetstream: too many handshakes at once; closed");
        return;
    };
    let stats = &shared.stats;
    let full =
        stats.subscribers.fetch_add(1, Ordering::Relaxed) >= shared.config.max_subscribers as u64;
    metrics::gauge!("murmur_jetstream_subscribers").increment(1.0);
    let _connected = Connected(Arc::clone(stats));
    let mut options = Options::default();
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| {
        if request.uri().path() != murmur_jetstream::SUBSCRIBE_PATH {
            return Err(http_error(
                404,
                "NotFound",
                "this server serves Jetstream's /subscribe",
            ));
        }
        if full {
            return Err(http_error(503, "Unavailable", "too many subscribers"));
        }
        match Options::from_query(request.uri().query().unwrap_or("")) {
            Ok(mut asked) => {
                let zstd_header = request
                    .headers()
                    .get("socket-encoding")
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.eq_ignore_ascii_case("zstd"));
                asked.compress |= zstd_header;
                options = asked;
                Ok(response)
            }
            Err(e) => Err(http_error(400, "InvalidRequest", &e.to_string())),
        }
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_SUBSCRIBER_MESSAGE))
        .max_frame_size(Some(MAX_SUBSCRIBER_MESSAGE));
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(config));
    let socket = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(socket)) => socket,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "jetstream: handshake failed");
            return;
        }
        Err(_) => {
            debug!(%peer, "jetstream: no handshake within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    drop(handshaking);
    let (mut sink, mut incoming) = socket.split();

    if options.require_hello {
        loop {
            match incoming.next().await {
                Some(Ok(Message::Text(text))) => {
                    match options.apply_subscriber_message(text.as_bytes()) {
                        Ok(()) => {
                            stats.options_updates.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Err(e) => {
                            let _ = sink.send(close(&e.to_string())).await;
                            return;
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            }
        }
    }
    let Ok(mut filter) = options.filter() else {
        // Checked when the options were read; not reached.
        return;
    };

    let stream = match shared.js.get_stream(&shared.stream).await {
        Ok(stream) => stream,
        Err(e) => {
            warn!(%peer, error = %e, "jetstream: frame stream unavailable");
            let _ = sink.send(close("the server's stream is unavailable")).await;
            return;
        }
    };
    // A cursor in the future is live; one in the past replays from it (the stream is read
    // from a little before it, and what is before it skipped).
    let connected_at = now_us();
    let skip_before = options.cursor.filter(|c| *c <= connected_at);
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: shared.filter.clone(),
            deliver_policy: deliver_policy(options.cursor, connected_at),
            max_batch: PULL_BATCH,
            ..Default::default()
        })
        .await;
    let mut messages = match consumer {
        Ok(consumer) => match consumer.messages().await {
            Ok(messages) => messages,
            Err(e) => {
                warn!(%peer, error = %e, "jetstream: cannot read the frame stream");
                return;
            }
        },
        Err(e) => {
            warn!(%peer, error = %e, "jetstream: cannot create a consumer");
            return;
        }
    };
    debug!(%peer, ?options, "jetstream: subscriber connected");
    let mut compressor = options.compress.then(murmur_jetstream::Compressor::new);
    let mut caught_up = options.cursor.is_none();
    loop {
        tokio::select! {
            next = messages.next() => {
                let message = match next {
                    Some(Ok(message)) => message,
                    Some(Err(e)) => {
                        warn!(%peer, error = %e, "jetstream: frame stream read failed; closing");
                        let _ = sink.send(close("the server's stream failed")).await;
                        return;
                    }
                    None => return,
                };
                let reserved = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(TIME_US_HEADER))
                    .and_then(|v| v.as_str().parse::<i64>().ok());
                let (time_us, pending) = match message.info() {
                    Ok(info) => (
                        reserved.unwrap_or_else(|| {
                            i64::try_from(info.published.unix_timestamp_nanos() / 1_000)
                                .unwrap_or(0)
                        }),
                        info.pending,
                    ),
                    Err(e) => {
                        warn!(%peer, error = %e, "jetstream: message without stream info; skipped");
                        continue;
                    }
                };
                if pending == 0 {
                    caught_up = true;
                } else if caught_up && pending > shared.config.max_lag {
                    too_slow(&mut sink, stats, peer, &format!("{pending} frames behind the head")).await;
                    return;
                }
                let events = match events_for(&message.payload, time_us, &filter) {
                    Ok(events) => events,
                    Err(e) => {
                        warn!(%peer, error = %e, "jetstream: stored frame unreadable; skipped");
                        continue;
                    }
                };
                let after_cursor = |e: &&Event| skip_before.is_none_or(|c| e.time_us >= c);
                for event in events.iter().filter(after_cursor).filter(|e| filter.matches(e)) {
                    let json = event.to_json();
                    let limit = options.max_message_size_bytes;
                    if limit > 0 && json.len() as u64 > limit {
                        stats.events_too_large.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let out = match compressor.as_mut() {
                        Some(c) => Message::Binary(c.compress(&json).into()),
                        None => match String::from_utf8(json) {
                            Ok(text) => Message::Text(text.into()),
                            Err(_) => continue,
                        },
                    };
                    match tokio::time::timeout(shared.config.write_timeout, sink.send(out)).await {
                        Ok(Ok(())) => {
                            stats.events_sent.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!("murmur_jetstream_events_total").increment(1);
                        }
                        Ok(Err(e)) => {
                            debug!(%peer, error = %e, "jetstream: subscriber gone");
                            return;
                        }
                        Err(_) => {
                            let why = format!("no message taken for {:?}", shared.config.write_timeout);
                            too_slow(&mut sink, stats, peer, &why).await;
                            return;
                        }
                    }
                }
            }
            read = incoming.next() => match read {
                Some(Ok(Message::Text(text))) => {
                    match options.apply_subscriber_message(text.as_bytes()) {
                        Ok(()) => {
                            stats.options_updates.fetch_add(1, Ordering::Relaxed);
                            filter = options.filter().unwrap_or(filter);
                            debug!(%peer, ?options, "jetstream: options updated");
                        }
                        Err(e) => {
                            info!(%peer, error = %e, "jetstream: bad subscriber message; closing");
                            let _ = sink.send(close(&e.to_string())).await;
                            return;
                        }
                    }
                }
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => {
                    debug!(%peer, "jetstream: subscriber left");
                    return;
                }
                Some(Ok(_)) => {}
            },
        }
    }
}

/// Drops a subscriber that does not keep up: a close frame `ConsumerTooSlow` (if its socket
/// still takes it within a second).
async fn too_slow<S>(sink: &mut S, stats: &JetstreamStats, peer: SocketAddr, why: &str)
where
    S: futures_util::Sink<Message> + Unpin,
{
    info!(%peer, why, "jetstream: subscriber too slow; disconnected");
    stats.too_slow.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("murmur_jetstream_too_slow_total").increment(1);
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        sink.send(close(&format!("ConsumerTooSlow: {why}"))),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_map_onto_start_times() {
        let now = 1_725_911_162_329_308;
        assert!(matches!(deliver_policy(None, now), DeliverPolicy::New));
        assert!(matches!(
            deliver_policy(Some(now + 1), now),
            DeliverPolicy::New
        ));
        match deliver_policy(Some(now - 5_000_000), now) {
            DeliverPolicy::ByStartTime { start_time } => {
                assert_eq!(
                    start_time.unix_timestamp_nanos(),
                    (now - 5_000_000 - CURSOR_SLACK_US) as i128 * 1000
                )
            }
            other => panic!("{other:?}"),
        }
        match deliver_policy(Some(-3), now) {
            DeliverPolicy::ByStartTime { start_time } => {
                assert_eq!(start_time, time::OffsetDateTime::UNIX_EPOCH)
            }
            other => panic!("{other:?}"),
        }
    }

    /// The frames of the recorded realistic corpus (each prefixed by its length, u32 BE).
    fn realistic_frames() -> Vec<Vec<u8>> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../murmur-sync/tests/fixtures/corpus-realistic/frames.bin"
        );
        let bytes = std::fs::read(path).expect("the recorded corpus");
        let mut frames = Vec::new();
        let mut rest = &bytes[..];
        while rest.len() >= 4 {
            let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            frames.push(rest[4..4 + len].to_vec());
            rest = &rest[4 + len..];
        }
        frames
    }

    /// Every op of the recorded realistic corpus (commits from the official PDS: creates,
    /// updates, deletes, batches) becomes one event, with the record the CAR carries.
    #[test]
    fn the_realistic_corpus_becomes_one_event_per_op() {
        let (mut frames, mut ops, mut events_seen) = (0, 0, 0);
        let mut operations = std::collections::HashSet::new();
        for frame in realistic_frames() {
            let frame = &frame[..];
            frames += 1;
            let events = events_of_frame(frame, 42).unwrap();
            if let murmur_sync::Frame::Commit(commit) = murmur_sync::Frame::decode(frame).unwrap() {
                ops += commit.ops.len();
                assert_eq!(events.len(), commit.ops.len());
                for (i, (event, op)) in events.iter().zip(&commit.ops).enumerate() {
                    let EventBody::Commit(c) = &event.body else {
                        panic!("a commit")
                    };
                    assert_eq!(
                        (event.did.as_str(), event.time_us),
                        (commit.repo.as_str(), 42 + i as i64),
                        "op {i} has a microsecond of its own"
                    );
                    assert_eq!(format!("{}/{}", c.collection, c.rkey), op.path);
                    assert_eq!(c.rev, commit.rev);
                    assert_eq!(c.cid, op.cid.map(|cid| cid.to_string()));
                    if let Some(record) = &c.record {
                        // The record as JSON: its $type is its collection.
                        assert_eq!(record["$type"], c.collection.as_str());
                    }
                    operations.insert(c.operation);
                    // Each event reads back as Jetstream's JSON.
                    assert_eq!(&Event::from_json(&event.to_json()).unwrap(), event);
                }
            }
            events_seen += events.len();
        }
        assert!(frames > 600, "{frames} frames");
        assert_eq!(events_seen, ops);
        assert_eq!(operations.len(), 3, "creates, updates and deletes");
    }

    /// Filtered in the frame: an unwanted DID or collection makes no event, and the ops kept
    /// keep the times they have unfiltered.
    #[test]
    fn filtered_frames_keep_each_ops_time() {
        let mut checked = 0;
        for frame in realistic_frames() {
            let frame = &frame[..];
            let all = events_of_frame(frame, 1_000).unwrap();
            let Some(last) = all.last() else { continue };
            let collection = last.collection().unwrap().to_string();
            let by_collection = Filter::new(std::slice::from_ref(&collection), &[]).unwrap();
            let kept = events_for(frame, 1_000, &by_collection).unwrap();
            let expected: Vec<&Event> = all
                .iter()
                .filter(|e| e.collection() == Some(collection.as_str()))
                .collect();
            assert_eq!(kept.iter().collect::<Vec<_>>(), expected);
            let other_did = Filter::new(&[], &["did:plc:someoneelse".to_string()]).unwrap();
            assert!(events_for(frame, 1_000, &other_did).unwrap().is_empty());
            checked += 1;
        }
        assert!(checked > 600);
    }

    #[test]
    fn a_frame_that_is_not_one_is_an_error() {
        assert!(events_of_frame(b"", 1).is_err());
        assert!(events_of_frame(&[0xa2, 0x61, 0x74], 1).is_err());
    }
}
