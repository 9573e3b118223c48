//! Scale-out for murmur on NATS JetStream: verify once, fan out.
//!
//! Without a bus every agent subscribes to every PDS host and verifies every commit itself,
//! so the cost of one event grows with the number of agents. With it, a [`Hub`] watches the
//! PDS hosts (or a relay) with the verified watcher and publishes every verified op, with its
//! proof, to a JetStream stream; agents read the stream through durable consumers
//! ([`BusSource`]), filtered in the server, on any machine. Writes do not go through the bus:
//! an agent writes to its own PDS, and the repo stays the source of truth.
//!
//! ```text
//! PDS hosts --subscribeRepos--> Hub: verify once --publish (msg id = did, rev, path)--> stream
//!                                 cursor per source in a KV bucket,          |
//!                                 moved after the publish ack                 +--> BusSource (durable
//!                                                                                 consumer) -> handlers
//! ```
//!
//! # Subjects
//! See [`subject`]: `{prefix}.op.{partition}.{did}.{action}.{collection tokens}`,
//! `{prefix}.repo.{partition}.{did}.identity|account`, `{prefix}.gap`. The collection's dots
//! are subject tokens, so a consumer of `agent.comms.*` asks the server for
//! `murmur.op.*.*.*.agent.comms.>`.
//!
//! # Messages
//! [`BusMessage`], DAG-CBOR: the op (did, rev, path, action, cid), its record and its proof (a
//! CAR like `com.atproto.sync.getRecord`'s answer: the author's signed commit, the MST path,
//! the record). A consumer verifies the proof with the author's key, so neither the hub nor
//! NATS is trusted unless [`BusSource::trust_hub`] says so. `#identity` and `#account` events
//! carry no proof (they are not signed on the firehose either).
//!
//! # Delivery contract over the bus
//! - Into the stream, exactly once per op: the message id is (did, rev, path); the hub's cursor
//!   per source moves only after every publish before it was acknowledged, so a hub killed
//!   and restarted republishes from its cursor and the stream drops what it already has (its
//!   duplicate window, 10 minutes by default, must cover the restart). Two hubs on the same
//!   sources store each op once. A hub started with no cursor for a source starts live and
//!   stores its first cursor when the source's first event arrives, before publishing it.
//! - Through NATS faults: the hub retries a failed publish (same message id) until it is
//!   stored, at most 2 s apart, while the NATS server restarts or a replicated stream elects
//!   a new leader; hub and consumers reconnect by themselves, to any of the URLs given
//!   (comma-separated).
//! - Out of the stream, at least once, per-DID order kept: a consumer acknowledges an op only
//!   when its handlers are done (or it was dead-lettered, or rejected); a consumer that dies
//!   leaves its unacknowledged ops to be delivered again after `ack_wait`. The watcher's
//!   dedup store (a state dir) turns those redeliveries of finished ops into skips. A server
//!   can also forget acks it confirmed (nats-server writes consumer state asynchronously: one
//!   killed with SIGKILL restarts without its last acks) and deliver those messages again as
//!   new: a consumer recognises the stream messages it finished lately (the last 16,384) and
//!   acknowledges them again without running them.
//! - Handler retries run in the consumer, which keeps telling the server the message is in
//!   progress; a nak would let the DID's later ops overtake it.
//! - An op whose handler fails for good is copied to the `{STREAM}_DEAD` stream (headers
//!   `Murmur-Handler`, `Murmur-Error`, `Murmur-Subject`, `Murmur-Stream-Seq`) and terminated;
//!   if that copy cannot be stored, the op is not terminated but left in the stream to run
//!   again later, so nothing is dropped.
//! - A forged or altered message fails its proof and never reaches a handler.
//!
//! # Relay
//! A hub built with [`HubBuilder::serve_relay`] is also a relay for private networks: it
//! stores the original frame of every verified `#commit` (those without ops included),
//! `#sync`, `#identity` and `#account` event in the frame stream (`{NAME}_FRAMES`, subjects
//! `{prefix}-frame.{partition}.{did}`) and serves `com.atproto.sync.subscribeRepos` from it: one merged stream over all its PDS hosts,
//! numbered by the frame stream's sequence, with the spec's cursor semantics
//! (`OutdatedCursor`, `FutureCursor`) and slow consumers dropped with `ConsumerTooSlow`.
//! Verifying clients (murmur's watcher with `.relay(url)`, `@atproto/sync`) accept its
//! commits: they are the PDS's signed commits and CAR slices, unchanged. See [`relay`].
//!
//! # Jetstream
//! A hub built with [`HubBuilder::serve_jetstream`] serves Jetstream's `/subscribe` from the
//! same frame stream: one JSON event per record op, filtered in the server by collection and
//! DID, cursors in unix microseconds, zstd with Jetstream's dictionary, `options_update` on a
//! live connection. Existing Jetstream clients connect unchanged. See [`jetstream`].
//!
//! # Metrics
//! The hub's metrics (per source: publish counts and rate, seq and time lag, rejections;
//! hub-wide: sources connected) go through the `metrics` facade; the names are in
//! [`METRICS_HELP`] and the [`Hub`] docs.
//!
//! # Pools: what order holds, and why
//! Two ways to spread one stream's ops over several processes; we chose to offer exactly what
//! the server guarantees rather than a lease protocol of our own, whose split-brain cases
//! would break the very order it promised.
//! - **A shared durable** (every member `BusSource::new(nats, "same-name")`): the server hands
//!   each message to one member at a time and forgets it only when acknowledged, so each op
//!   is handled once while members live, and a member that dies mid-op leaves it to another
//!   after `ack_wait` (the op is at least once, as everywhere in murmur; a handler whose
//!   effect must not repeat across machines should be idempotent). Order: messages go out in
//!   stream order, but two ops of one DID can be in flight on two members at once and finish
//!   in either order, and a redelivered op comes after later ones. Use it for work where
//!   per-DID order does not matter (independent tasks, for example) and members come and go.
//! - **Partitions** (member *i* adds one `BusSource::new(nats, format!("pool-p{k}")).partition(k)`
//!   feed per partition *k* it owns): a DID's messages all carry one partition number, each
//!   partition has one durable consumer, read by one member, so per-DID order holds across
//!   the pool exactly as in one watcher. Ownership is static: when a member dies its
//!   partitions wait (their durables keep the position and the unacknowledged ops; nothing is
//!   lost) until it, or a replacement given the same partitions by your supervisor, starts.
//!   The partition count is fixed when the stream is created ([`StreamSettings::partitions`]).

mod consumer;
mod cursor;
mod error;
mod hub;
pub mod jetstream;
mod message;
pub mod relay;
mod relay_http;
mod stream;
pub mod subject;

pub use consumer::{BusSource, StartAt};
pub use cursor::{KvCursorStore, key_for};
pub use error::BusError;
pub use hub::{Hub, HubBuilder, HubStats, METRICS_HELP};
pub use jetstream::{JetstreamConfig, JetstreamServer, JetstreamStats};
pub use message::{BusMessage, FORMAT_VERSION, MessageKind};
pub use relay::{Relay, RelayConfig, RelayStats};
pub use relay_http::CrawlPolicy;
pub use stream::{
    MIN_SERVER_VERSION, StreamSettings, connect, delete_streams, ensure_frame_stream,
    ensure_streams, open_stream,
};
pub use subject::Subjects;
