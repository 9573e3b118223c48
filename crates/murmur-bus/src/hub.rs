//! The hub: watch PDS hosts or a relay, verify every commit once, publish every op with its
//! proof to the stream.
//!
//! # Metrics
//! The hub records through the [`metrics`](https://docs.rs/metrics) facade (install any
//! recorder; `murmur hub --metrics ADDR` serves them as Prometheus text). See
//! [`METRICS_HELP`] for the list. Per-source metrics carry the label `source`: the source's
//! `subscribeRepos` URL (e.g. `ws://localhost:2583/xrpc/com.atproto.sync.subscribeRepos`),
//! the string its cursor is kept under. Hub-wide totals are the sums over `source` (e.g.
//! `sum(rate(murmur_hub_published_total[1m]))` is the hub's publish rate). Gauges and the
//! watcher's counters are copied to the recorder every second; publish counters move as
//! publishes are acknowledged.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use murmur_firehose::{
    Backoff, HandlerError, OpData, OpEvent, ShutdownHandle, Watcher, WatcherBuilder,
};
use tracing::{debug, info, warn};

use crate::BusError;
use crate::cursor::KvCursorStore;
use crate::jetstream::{JetstreamConfig, JetstreamServer, JetstreamStats};
use crate::message::BusMessage;
use crate::relay::{Relay, RelayConfig, RelayStats};
use crate::relay_http::CrawlPolicy;
use crate::stream::{StreamSettings, connect, ensure_frame_stream, ensure_streams};
use crate::subject::Subjects;

/// The hub's metrics, one per line (also shown by `murmur hub --help`).
pub const METRICS_HELP: &str = "\
Metrics (murmur hub --metrics ADDR serves them as Prometheus text at http://ADDR/metrics):
Per source (label source=\"<the source's subscribeRepos URL>\"):
  murmur_hub_published_total       counter  messages the stream stored (ops, #identity,
                                            #account, gaps); its rate is the publish rate
  murmur_hub_duplicates_total      counter  publishes the stream already had (same msg id
                                            in its duplicate window: a restarted or second hub)
  murmur_hub_publish_errors_total  counter  publishes that failed and were retried
  murmur_hub_rejected_total        counter  ops and frames not published: failed
                                            verification, bad seq, undecodable
  murmur_hub_by_reference_total    counter  ops published without record and proof
  murmur_hub_unpublishable_total   counter  ops whose DID or collection cannot be a subject
  murmur_hub_gaps_lost_total       counter  gap events not published after retries
  murmur_hub_events_total          counter  frames read from the source
  murmur_hub_reconnects_total      counter  reconnects to the source
  murmur_hub_seq_lag               gauge    last seq read minus the cursor (events read
                                            but not yet all acknowledged by the stream)
  murmur_hub_time_lag_seconds      gauge    commit time to publish ack, last op
  murmur_hub_last_seq              gauge    last seq read from the source
  murmur_hub_cursor                gauge    the source's cursor (every event up to it is
                                            in the stream)
  murmur_hub_source_connected      gauge    1 while connected, else 0
Hub-wide:
  murmur_hub_sources               gauge    sources watched
  murmur_hub_sources_connected     gauge    sources connected now
  murmur_hub_verifications_waiting gauge    events waiting for a host to verify them
Relay (murmur hub --relay-addr ADDR):
  murmur_relay_consumers           gauge    subscribeRepos consumers connected now
  murmur_relay_frames_total        counter  frames sent, over all consumers
  murmur_relay_too_slow_total      counter  consumers dropped with ConsumerTooSlow
Jetstream (murmur hub --jetstream-addr ADDR):
  murmur_jetstream_subscribers     gauge    /subscribe subscribers connected now
  murmur_jetstream_events_total    counter  events sent, over all subscribers
  murmur_jetstream_too_slow_total  counter  subscribers dropped for being too slow
Totals over sources: sum without(source) (...), e.g. sum(rate(murmur_hub_published_total[1m])).
";

/// How a failed publish is retried: never given up, at most 2 s apart.
const PUBLISH_RETRY: Backoff = Backoff {
    initial: Duration::from_millis(100),
    max: Duration::from_secs(2),
    factor: 2.0,
    max_attempts: None,
};

/// Room left in a message for headers and the subject.
const HEADROOM: usize = 1024;

/// Configures a [`Hub`]. Start with [`Hub::builder`].
#[derive(Default)]
pub struct HubBuilder {
    nats: Option<String>,
    sources: Vec<String>,
    relays: Vec<String>,
    plc_url: Option<String>,
    stream: StreamSettings,
    name: Option<String>,
    start_cursor: Option<i64>,
    serve_relay: Option<(SocketAddr, RelayConfig)>,
    serve_jetstream: Option<(SocketAddr, JetstreamConfig)>,
    allow_crawl: CrawlPolicy,
}

impl HubBuilder {
    /// The NATS server(s): `nats://host:port`, comma-separated for a cluster.
    pub fn nats(mut self, url: impl Into<String>) -> Self {
        self.nats = Some(url.into());
        self
    }

    /// Watches a PDS host (once per host).
    pub fn pds(mut self, url: impl Into<String>) -> Self {
        self.sources.push(url.into());
        self
    }

    /// Watches a relay.
    pub fn relay(mut self, url: impl Into<String>) -> Self {
        self.relays.push(url.into());
        self
    }

    /// The PLC directory for `did:plc` keys (default: the public one).
    pub fn plc_url(mut self, url: impl Into<String>) -> Self {
        self.plc_url = Some(url.into());
        self
    }

    /// The stream's name, prefix, partitions, replicas and retention.
    pub fn stream(mut self, settings: StreamSettings) -> Self {
        self.stream = settings;
        self
    }

    /// A name for logs and the NATS connection (default `murmur-hub`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Where a source with no cursor in the bucket starts: `0` replays everything its host
    /// still has (a new hub on a network that is already running); default: live events only.
    pub fn start_cursor(mut self, seq: i64) -> Self {
        self.start_cursor = Some(seq);
        self
    }

    /// Also serves `com.atproto.sync.subscribeRepos` on `addr` (a relay for private networks,
    /// see [`Relay`]): the hub then stores the original frame of every verified event in the
    /// frame stream ([`StreamSettings::frame_stream`]) and serves it, with its own seq, to
    /// any number of consumers. Port 0 picks a free port ([`Hub::relay_addr`]).
    pub fn serve_relay(mut self, addr: SocketAddr, config: RelayConfig) -> Self {
        self.serve_relay = Some((addr, config));
        self
    }

    /// Also serves Jetstream's `/subscribe` on `addr` (JSON events filtered by collection and
    /// DID, see [`JetstreamServer`]), from the same frame stream as the relay. Port 0 picks a
    /// free port ([`Hub::jetstream_addr`]).
    pub fn serve_jetstream(mut self, addr: SocketAddr, config: JetstreamConfig) -> Self {
        self.serve_jetstream = Some((addr, config));
        self
    }

    /// Lets `com.atproto.sync.requestCrawl` on the relay add PDS hosts at run time: those
    /// matching `policy` (default: none, and the relay answers `requestCrawl` with
    /// `MethodNotImplemented`). A host is added once it answers `describeServer` as a PDS; the
    /// hub then watches it from the start of what it still has (or from its stored cursor) and
    /// the relay lists it in `listHosts`. Crawled hosts are not remembered across restarts:
    /// name the ones to keep with [`pds`](Self::pds).
    pub fn allow_crawl(mut self, policy: CrawlPolicy) -> Self {
        self.allow_crawl = policy;
        self
    }

    /// Connects to NATS, creates the streams and the cursor bucket if missing, and builds
    /// the watcher (and binds the relay's address, with [`serve_relay`](Self::serve_relay)).
    pub async fn build(self) -> Result<Hub, BusError> {
        let nats = self
            .nats
            .ok_or_else(|| BusError::Config("no NATS server: add .nats(url)".into()))?;
        if self.sources.is_empty() && self.relays.is_empty() {
            return Err(BusError::Config(
                "no source: add .pds(url) or .relay(url)".into(),
            ));
        }
        let name = self.name.unwrap_or_else(|| "murmur-hub".into());
        let client = connect(&nats, &name).await?;
        let max_payload = client.server_info().max_payload;
        let js = jetstream::new(client.clone());
        let subjects = ensure_streams(&js, &self.stream, max_payload).await?;
        let bucket_name = self.stream.cursor_bucket();
        let bucket = match js.get_key_value(&bucket_name).await {
            Ok(bucket) => bucket,
            Err(_) => js
                .create_key_value(jetstream::kv::Config {
                    bucket: bucket_name.clone(),
                    description: "murmur hub: per-source cursors".into(),
                    history: 1,
                    num_replicas: self.stream.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| BusError::js(format!("create key-value bucket {bucket_name}"), e))?,
        };
        let relay_js = js.clone();
        let relay_subjects = subjects.clone();
        // The relay and Jetstream both serve the original frames.
        let keep_frames = self.serve_relay.is_some() || self.serve_jetstream.is_some();
        if keep_frames {
            ensure_frame_stream(&js, &self.stream, &subjects, max_payload).await?;
        }
        let publisher = Arc::new(Publisher {
            js,
            frames: keep_frames.then(Mutex::default),
            next_time_us: Mutex::default(),
            subjects,
            max_payload,
            stats: Arc::default(),
        });
        let recipe = Arc::new(WatcherRecipe {
            publisher: Arc::clone(&publisher),
            bucket,
            bucket_name,
            plc_url: self.plc_url,
            keep_frames,
        });
        let watcher = recipe.watcher(&self.sources, &self.relays, self.start_cursor, false)?;
        let (crawl, crawl_requests) = match (&self.serve_relay, self.allow_crawl.is_closed()) {
            (Some(_), false) => {
                let (requests, received) = tokio::sync::mpsc::channel(16);
                let crawl = crate::relay_http::Crawl {
                    policy: self.allow_crawl.clone(),
                    requests,
                };
                (Some(crawl), Some(received))
            }
            _ => (None, None),
        };
        let relay = match self.serve_relay {
            Some((addr, config)) => {
                let hosts = self.sources.clone();
                let metrics = Some(watcher.metrics());
                let relay = Relay::bind_with(
                    addr,
                    relay_js.clone(),
                    &self.stream,
                    &relay_subjects,
                    config,
                    crate::relay_http::Hosts::new(hosts, metrics).with_crawl(crawl),
                )
                .await?;
                Some(relay)
            }
            None => None,
        };
        let jetstream = match self.serve_jetstream {
            Some((addr, config)) => Some(
                JetstreamServer::bind_with(addr, relay_js, &self.stream, &relay_subjects, config)
                    .await?,
            ),
            None => None,
        };
        info!(nats = %nats, stream = %self.stream.name, sources = self.sources.len() + self.relays.len(), "hub ready");
        Ok(Hub {
            watcher,
            publisher,
            client,
            relay,
            jetstream,
            crawl: crawl_requests.map(|requests| (recipe, requests)),
        })
    }
}

/// How the hub makes a watcher of its sources: verified, keeping proofs (and frames, for the
/// relay and Jetstream), publishing every op, `#identity`, `#account` and gap, cursors in the
/// bucket. One for the hosts it starts with, one more per host `requestCrawl` adds.
struct WatcherRecipe {
    publisher: Arc<Publisher>,
    bucket: jetstream::kv::Store,
    bucket_name: String,
    plc_url: Option<String>,
    keep_frames: bool,
}

impl WatcherRecipe {
    /// A watcher of `pds` hosts and `relays`; with `authoritative`, each DID's events are
    /// taken only from its own PDS (for hosts the operator did not name: crawled ones).
    fn watcher(
        &self,
        pds: &[String],
        relays: &[String],
        start_cursor: Option<i64>,
        authoritative: bool,
    ) -> Result<Watcher, BusError> {
        let tail_publisher = Arc::clone(&self.publisher);
        let gap_publisher = Arc::clone(&self.publisher);
        let mut builder: WatcherBuilder = Watcher::builder()
            .keep_proofs(true)
            .keep_frames(self.keep_frames)
            .authoritative_hosts(authoritative)
            .identity_events(true)
            .cursor_store(KvCursorStore::new(
                self.bucket.clone(),
                self.bucket_name.clone(),
            ))
            // A publish that fails (NATS down, a stream electing a leader) is retried until it
            // goes through: an op is never dead-lettered for an outage, and the cursor waits
            // for it. Retries stay frequent, so the hub catches up soon after NATS is back.
            .retry(PUBLISH_RETRY)
            .tail(move |op: OpEvent| {
                let publisher = Arc::clone(&tail_publisher);
                async move { publisher.publish(op.data()).await }
            })
            .on_gap(move |gap| {
                let publisher = Arc::clone(&gap_publisher);
                let message = BusMessage::from_gap(gap);
                let source = gap.source.clone();
                tokio::spawn(async move { publisher.publish_gap(&source, message).await });
            })
            // Counted per source from the watcher's metrics (see Hub::run).
            .on_rejected(|rejected, why| {
                debug!(did = rejected.did(), reason = %why, "not published: rejected");
            });
        for url in pds {
            builder = builder.pds(url);
        }
        for url in relays {
            builder = builder.relay(url);
        }
        if let Some(plc) = &self.plc_url {
            builder = builder.plc_url(plc);
        }
        if let Some(seq) = start_cursor {
            builder = builder.start_cursor(seq);
        }
        Ok(builder.build()?)
    }
}

/// Watches the hosts `requestCrawl` adds, each with a watcher of its own (from the start of
/// what the host still has, unless its cursor is in the bucket) that takes a DID's events
/// only if the host is the DID's PDS, until `stop` says the hub is stopping; then stops them
/// and waits for their cursors to be stored.
async fn crawl_hosts(
    recipe: Arc<WatcherRecipe>,
    mut requests: tokio::sync::mpsc::Receiver<crate::relay_http::CrawlRequest>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut watched: HashMap<String, (Arc<murmur_firehose::Metrics>, ShutdownHandle)> =
        HashMap::new();
    let mut running = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            request = requests.recv() => {
                let Some(request) = request else { break };
                if let Some((metrics, _)) = watched.get(&request.url) {
                    let _ = request.answer.send(Ok(Arc::clone(metrics)));
                    continue;
                }
                let hosts = std::slice::from_ref(&request.url);
                match recipe.watcher(hosts, &[], Some(0), true) {
                    Ok(watcher) => {
                        info!(host = %request.url, "requestCrawl: watching a new host");
                        let metrics = watcher.metrics();
                        let handle = watcher.shutdown_handle();
                        let url = request.url.clone();
                        running.spawn(async move {
                            if let Err(e) = watcher.run().await {
                                warn!(host = %url, error = %e, "crawled host's watcher stopped");
                            }
                            url
                        });
                        watched.insert(request.url, (Arc::clone(&metrics), handle));
                        let _ = request.answer.send(Ok(metrics));
                    }
                    Err(e) => {
                        let _ = request.answer.send(Err(e.to_string()));
                    }
                }
            }
            _ = stop.wait_for(|stopping| *stopping) => break,
            Some(ended) = running.join_next(), if !running.is_empty() => {
                // A watcher that stopped by itself: a new requestCrawl starts it again.
                if let Ok(url) = ended {
                    watched.remove(&url);
                }
            }
        }
    }
    let handles: Vec<ShutdownHandle> = watched.into_values().map(|(_, h)| h).collect();
    for handle in &handles {
        handle.shutdown();
    }
    while running.join_next().await.is_some() {}
}

/// Watches PDS hosts or relays with the verified watcher and publishes every verified op (with
/// its proof), `#identity`, `#account` and gap event to the bus stream, each exactly once:
/// the message id is the op's (did, rev, path), and each source's cursor lives in a
/// key-value bucket and moves only after the publishes before it were acknowledged. Two hubs
/// on the same sources store each op once (within the stream's duplicate window).
pub struct Hub {
    watcher: Watcher,
    publisher: Arc<Publisher>,
    client: async_nats::Client,
    relay: Option<Relay>,
    jetstream: Option<JetstreamServer>,
    /// With a crawl policy: how to watch a crawled host, and the relay's requests.
    crawl: Option<(
        Arc<WatcherRecipe>,
        tokio::sync::mpsc::Receiver<crate::relay_http::CrawlRequest>,
    )>,
}

impl Hub {
    /// Starts configuring a hub.
    pub fn builder() -> HubBuilder {
        HubBuilder::default()
    }

    /// Stops [`run`](Self::run) gracefully (publishes in flight finish, cursors are stored).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.watcher.shutdown_handle()
    }

    /// Counters of what the hub did.
    pub fn stats(&self) -> Arc<HubStats> {
        Arc::clone(&self.publisher.stats)
    }

    /// The address the relay listens on, when the hub serves one
    /// ([`HubBuilder::serve_relay`]).
    pub fn relay_addr(&self) -> Option<SocketAddr> {
        self.relay.as_ref().map(Relay::local_addr)
    }

    /// The relay's counters, when the hub serves one.
    pub fn relay_stats(&self) -> Option<Arc<RelayStats>> {
        self.relay.as_ref().map(Relay::stats)
    }

    /// The address Jetstream's `/subscribe` listens on, when the hub serves it
    /// ([`HubBuilder::serve_jetstream`]).
    pub fn jetstream_addr(&self) -> Option<SocketAddr> {
        self.jetstream.as_ref().map(JetstreamServer::local_addr)
    }

    /// The Jetstream endpoint's counters, when the hub serves it.
    pub fn jetstream_stats(&self) -> Option<Arc<JetstreamStats>> {
        self.jetstream.as_ref().map(JetstreamServer::stats)
    }

    /// The watcher's metrics (seq and time lag, rejections, reconnects).
    pub fn watcher_metrics(&self) -> Arc<murmur_firehose::Metrics> {
        self.watcher.metrics()
    }

    /// Runs until shut down or a source fails for good.
    pub async fn run(self) -> Result<(), BusError> {
        let metrics = self.watcher.metrics();
        let gauges = tokio::spawn(async move {
            let mut tick = tokio::time::interval(METRICS_INTERVAL);
            loop {
                tick.tick().await;
                export_watcher_metrics(&metrics);
            }
        });
        let _gauges = AbortOnDrop(gauges.abort_handle());
        let _relay = self
            .relay
            .map(|relay| AbortOnDrop(tokio::spawn(relay.run()).abort_handle()));
        let _jetstream = self
            .jetstream
            .map(|server| AbortOnDrop(tokio::spawn(server.run()).abort_handle()));
        let (stopping, stop) = tokio::sync::watch::channel(false);
        let crawled = self
            .crawl
            .map(|(recipe, requests)| tokio::spawn(crawl_hosts(recipe, requests, stop)));
        let result = self.watcher.run().await;
        stopping.send_replace(true);
        if let Some(crawled) = crawled {
            let _ = crawled.await;
        }
        let _ = self.client.flush().await;
        result.map_err(BusError::from)
    }
}

/// How often the watcher's gauges are copied to the `metrics` recorder.
const METRICS_INTERVAL: Duration = Duration::from_secs(1);

/// Copies the watcher's per-source and hub-wide numbers to the `metrics` recorder.
fn export_watcher_metrics(metrics: &murmur_firehose::Metrics) {
    let m = metrics.snapshot();
    metrics::gauge!("murmur_hub_sources").set(m.sources as f64);
    metrics::gauge!("murmur_hub_sources_connected").set(m.sources_connected as f64);
    metrics::gauge!("murmur_hub_verifications_waiting").set(m.verifications_waiting as f64);
    for s in metrics.sources() {
        let source = s.url;
        metrics::gauge!("murmur_hub_seq_lag", "source" => source.clone()).set(s.seq_lag as f64);
        if let Some(ms) = s.time_lag_ms {
            metrics::gauge!("murmur_hub_time_lag_seconds", "source" => source.clone())
                .set(ms as f64 / 1000.0);
        }
        if let Some(seq) = s.last_seq {
            metrics::gauge!("murmur_hub_last_seq", "source" => source.clone()).set(seq as f64);
        }
        if let Some(seq) = s.cursor {
            metrics::gauge!("murmur_hub_cursor", "source" => source.clone()).set(seq as f64);
        }
        metrics::gauge!("murmur_hub_source_connected", "source" => source.clone())
            .set(if s.connected { 1.0 } else { 0.0 });
        metrics::counter!("murmur_hub_events_total", "source" => source.clone())
            .absolute(s.events_in);
        metrics::counter!("murmur_hub_rejected_total", "source" => source.clone())
            .absolute(s.rejected);
        metrics::counter!("murmur_hub_reconnects_total", "source" => source).absolute(s.reconnects);
    }
}

/// Stops a helper task with the future that owns it.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a hub has published so far.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Messages the stream stored.
    pub published: AtomicI64,
    /// Messages the stream already had (same id within the duplicate window).
    pub duplicates: AtomicI64,
    /// Ops published without record and proof (too big for a message, or no proof could be
    /// cut from the commit): consumers fetch them from the PDS.
    pub by_reference: AtomicI64,
    /// Publishes that failed and were retried.
    pub publish_errors: AtomicI64,
}

/// DIDs whose last stored frame the hub remembers (see [`Publisher::publish_frame`]).
const FRAMES_REMEMBERED: usize = 100_000;

struct Publisher {
    js: jetstream::Context,
    /// With a relay: per DID, the last event whose frame the stream stored (a commit's rev,
    /// or a repo event's path), so a commit's frame is published once for all its ops.
    frames: Option<Mutex<HashMap<String, String>>>,
    /// The next microsecond free for a frame's Jetstream events (see `reserve_time_us`).
    next_time_us: Mutex<i64>,
    subjects: Subjects,
    max_payload: usize,
    stats: Arc<HubStats>,
}

impl Publisher {
    /// Publishes the original frame of the event `op` came from, once per event (before the
    /// op itself, so a relay consumer never sees an op the frame stream lacks).
    async fn publish_frame(&self, op: &OpData) -> Result<(), HandlerError> {
        let (Some(frames), Some(frame)) = (&self.frames, &op.frame) else {
            return Ok(());
        };
        let key = match op.repo_event {
            Some(_) => format!("{} {}", op.rev, op.path),
            None => op.rev.clone(),
        };
        let done = |frames: &Mutex<HashMap<String, String>>| {
            frames
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&op.did)
                .is_some_and(|last| *last == key)
        };
        if done(frames) {
            return Ok(());
        }
        let source = &*op.source;
        let Some(subject) = self.subjects.frame(&op.did) else {
            return Ok(());
        };
        if frame.len() + subject.len() + HEADROOM > self.max_payload {
            warn!(did = %op.did, rev = %op.rev, size = frame.len(), "frame larger than a NATS message; not relayed");
            return Ok(());
        }
        let id = format!("frame {} {key}", op.did);
        // Jetstream numbers each op of the frame with a microsecond of its own.
        let events = match murmur_sync::Frame::decode(&frame[..]) {
            Ok(murmur_sync::Frame::Commit(commit)) => commit.ops.len().max(1),
            _ => 1,
        };
        let time_us = self.reserve_time_us(events);
        let mut headers = HeaderMap::new();
        headers.insert(
            crate::jetstream::TIME_US_HEADER,
            time_us.to_string().as_str(),
        );
        self.send_with(source, subject, &id, frame.to_vec(), headers)
            .await?;
        let mut frames = frames.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: forgetting only means a commit's frame may be sent again for its next
        // op, with the same message id, which the stream's duplicate window drops.
        if frames.len() >= FRAMES_REMEMBERED && !frames.contains_key(&op.did) {
            frames.clear();
        }
        frames.insert(op.did.clone(), key);
        Ok(())
    }

    async fn publish(&self, op: &OpData) -> Result<(), HandlerError> {
        self.publish_frame(op).await?;
        if op.repo_event.as_ref().is_some_and(|e| e.is_frame_only()) {
            // A #sync or an empty commit: for the relay's frame stream only.
            return Ok(());
        }
        let subject = match &op.repo_event {
            Some(murmur_firehose::RepoEvent::Identity { .. }) => {
                self.subjects.repo_event(&op.did, "identity")
            }
            Some(murmur_firehose::RepoEvent::Account { .. }) => {
                self.subjects.repo_event(&op.did, "account")
            }
            _ => {
                let collection = op.path.split_once('/').map_or("", |(c, _)| c);
                self.subjects.op(&op.did, op.action, collection)
            }
        };
        let source = &*op.source;
        let Some(subject) = subject else {
            warn!(did = %op.did, path = %op.path, "not published: its DID or collection cannot be a subject");
            metrics::counter!("murmur_hub_unpublishable_total", "source" => source.to_string())
                .increment(1);
            return Ok(());
        };
        let proof = match (&op.repo_event, &op.proof) {
            (None, Some(car)) => match murmur_sync::op_proof(car, &op.path) {
                Ok(proof) => Some(proof),
                Err(e) => {
                    debug!(did = %op.did, path = %op.path, error = %e, "no proof cut from the commit; published by reference");
                    None
                }
            },
            _ => None,
        };
        let mut message = BusMessage::from_op(op, proof);
        let mut payload = message.encode();
        if payload.len() + subject.len() + HEADROOM > self.max_payload {
            message.record = None;
            message.proof = None;
            payload = message.encode();
        }
        if message.kind == crate::MessageKind::Op && message.proof.is_none() {
            self.stats.by_reference.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("murmur_hub_by_reference_total", "source" => source.to_string())
                .increment(1);
        }
        self.send(source, subject, &message.msg_id(), payload).await
    }

    async fn publish_gap(&self, source: &str, message: BusMessage) {
        let subject = self.subjects.gap();
        let id = message.msg_id();
        let payload = message.encode();
        let sent = Backoff::retries(10)
            .retry(
                || self.send(source, subject.clone(), &id, payload.clone()),
                |_, _, _| {},
            )
            .await;
        if let Err(e) = sent {
            warn!(error = %e, source, "gap not published after retries");
            metrics::counter!("murmur_hub_gaps_lost_total", "source" => source.to_string())
                .increment(1);
        }
    }

    /// The first of `n` microseconds no frame had before (from now, or just after the last
    /// reserved when frames come faster than one per microsecond): the `time_us` of a
    /// frame's Jetstream events, unique and increasing in the order frames are stored.
    fn reserve_time_us(&self, n: usize) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        let mut next = self.next_time_us.lock().unwrap_or_else(|e| e.into_inner());
        let start = now.max(*next);
        *next = start.saturating_add(i64::try_from(n).unwrap_or(i64::MAX));
        start
    }

    async fn send(
        &self,
        source: &str,
        subject: String,
        id: &str,
        payload: Vec<u8>,
    ) -> Result<(), HandlerError> {
        self.send_with(source, subject, id, payload, HeaderMap::new())
            .await
    }

    async fn send_with(
        &self,
        source: &str,
        subject: String,
        id: &str,
        payload: Vec<u8>,
        mut headers: HeaderMap,
    ) -> Result<(), HandlerError> {
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        let failed = |e: &dyn std::fmt::Display| {
            warn!(source, subject = %subject, id, error = %e, "publish failed; retrying");
            self.stats.publish_errors.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("murmur_hub_publish_errors_total", "source" => source.to_string())
                .increment(1);
            HandlerError::retry(format!("publish to {subject}: {e}"))
        };
        let ack = self
            .js
            .publish_with_headers(subject.clone(), headers, payload.into())
            .await
            .map_err(|e| failed(&e))?
            .await
            .map_err(|e| failed(&e))?;
        if ack.duplicate {
            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("murmur_hub_duplicates_total", "source" => source.to_string())
                .increment(1);
        } else {
            self.stats.published.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("murmur_hub_published_total", "source" => source.to_string())
                .increment(1);
        }
        Ok(())
    }
}
