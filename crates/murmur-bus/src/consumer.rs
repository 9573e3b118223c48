//! The bus as a watcher source: a durable JetStream consumer whose messages are verified from
//! their proofs and handed to the watcher's handlers, acknowledged when they are done.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use async_trait::async_trait;
use futures_util::StreamExt;
use murmur_firehose::{
    Backoff, Delivered, Feed, FeedSink, FirehoseError, OpData, Provenance, Rejection, WatchError,
};
use murmur_sync::{Action, SyncError};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::BusError;
use crate::message::{BusMessage, MessageKind};
use crate::stream::{StreamSettings, connect, open_stream};

/// Where a new durable consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartAt {
    /// Messages published after it was created (like a watcher without a cursor).
    #[default]
    New,
    /// The oldest message the stream keeps (the whole replay window).
    All,
}

/// Reads the bus through a durable consumer: add it to a watcher with
/// [`WatcherBuilder::feed`](murmur_firehose::WatcherBuilder::feed) (or to an Agent).
///
/// - The consumer lives in the server under its durable name: a restarted process, on any
///   machine, resumes where the last one acknowledged.
/// - The server filters by subject: the watcher's collections, its partition (pools), and
///   `#identity`/`#account` events and gaps. The DID allowlist (it may change while running)
///   and actions are applied here.
/// - Each op is verified from its proof (the author's signed commit and MST path) unless
///   [`trust_hub`](Self::trust_hub) is on; one that fails never reaches a handler: it goes to
///   `on_rejected` and is terminated in the server.
/// - Handler Ok (or not wanted, or already handled) = ack. While handlers run, or retry
///   ([`HandlerError::Retry`](murmur_firehose::HandlerError::Retry), with the watcher's
///   backoff), the server is told the message is in progress, so it is not delivered
///   elsewhere; retries run here rather than as a nak so that the DID's later messages wait
///   for it (per-DID order). A handler that fails for good (or runs out of retries) dead-letters
///   the op: it is copied to the dead-letter stream and terminated. A message delivered
///   [`max_deliver`](Self::max_deliver) times (it kept killing its consumer) is dead-lettered
///   without running again.
pub struct BusSource {
    nats: String,
    stream: StreamSettings,
    durable: String,
    trust_hub: bool,
    start: StartAt,
    ack_wait: Duration,
    max_deliver: i64,
    max_ack_pending: i64,
    partition: Option<u16>,
    name: String,
    reconnect: Backoff,
    recent: Arc<Mutex<Recent>>,
}

impl BusSource {
    /// Reads the stream of [`StreamSettings::default`] on `nats` through the durable consumer
    /// `durable` (letters, digits, `-` and `_`).
    pub fn new(nats: impl Into<String>, durable: impl Into<String>) -> Self {
        let nats = nats.into();
        let durable = durable.into();
        let stream = StreamSettings::default();
        BusSource {
            name: format!(
                "{}/{}/{durable}",
                nats.split(',').next().unwrap_or(""),
                stream.name
            ),
            nats,
            stream,
            durable,
            trust_hub: false,
            start: StartAt::New,
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            max_ack_pending: 1024,
            partition: None,
            reconnect: Backoff::default(),
            recent: Arc::default(),
        }
    }

    /// Another stream name or prefix.
    pub fn stream(mut self, settings: StreamSettings) -> Self {
        self.name = format!(
            "{}/{}/{}",
            self.nats.split(',').next().unwrap_or(""),
            settings.name,
            self.durable
        );
        self.stream = settings;
        self
    }

    /// Trust the hub: skip verifying each op's proof (records are taken as published). Only
    /// for deployments where every publisher to the stream is trusted.
    pub fn trust_hub(mut self, trust: bool) -> Self {
        self.trust_hub = trust;
        self
    }

    /// Where a newly created consumer starts (default [`StartAt::New`]); an existing one
    /// resumes where it was.
    pub fn start_at(mut self, start: StartAt) -> Self {
        self.start = start;
        self
    }

    /// How long the server waits for an ack (or an in-progress signal) before delivering a
    /// message again (default 30 s). In-progress signals go out every third of it.
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        self.ack_wait = wait.max(Duration::from_millis(300));
        self
    }

    /// Deliveries after which a message is dead-lettered instead of run again (default 5).
    pub fn max_deliver(mut self, n: i64) -> Self {
        self.max_deliver = n.max(1);
        self
    }

    /// Most messages delivered and not yet acknowledged (default 1024).
    pub fn max_ack_pending(mut self, n: i64) -> Self {
        self.max_ack_pending = n.max(1);
        self
    }

    /// Reads only partition `k` (see [`Subjects`](crate::Subjects)); pools use this.
    pub fn partition(mut self, k: u16) -> Self {
        self.partition = Some(k);
        self
    }

    /// The durable consumer's name.
    pub fn durable(&self) -> &str {
        &self.durable
    }

    async fn open(
        &self,
        sink: &FeedSink,
    ) -> Result<(jetstream::Context, consumer::PullConsumer, crate::Subjects), BusError> {
        let client = connect(&self.nats, &format!("murmur {}", self.durable)).await?;
        let js = jetstream::new(client.clone());
        let subjects = open_stream(&js, &self.stream).await?;
        if let Some(k) = self.partition
            && k >= subjects.partitions()
        {
            return Err(BusError::Config(format!(
                "partition {k} of a stream with {} partitions",
                subjects.partitions()
            )));
        }
        let wanted = sink.wanted_collections();
        let mut filters = subjects.filters(wanted.as_deref(), self.partition);
        let (filter_subject, filter_subjects) = if filters.len() == 1 {
            (filters.remove(0), Vec::new())
        } else {
            (String::new(), filters)
        };
        let config = consumer::pull::Config {
            durable_name: Some(self.durable.clone()),
            description: Some("murmur bus consumer".into()),
            deliver_policy: match self.start {
                StartAt::New => consumer::DeliverPolicy::New,
                StartAt::All => consumer::DeliverPolicy::All,
            },
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver + 1,
            max_ack_pending: self.max_ack_pending,
            filter_subject,
            filter_subjects,
            num_replicas: 0,
            ..Default::default()
        };
        let stream = js
            .get_stream(&self.stream.name)
            .await
            .map_err(|e| BusError::js(format!("get stream {}", self.stream.name), e))?;
        let consumer = match stream.create_consumer(config.clone()).await {
            Ok(c) => c,
            // It exists with another configuration (e.g. other filters): bring it up to date.
            Err(_) => stream
                .update_consumer(config)
                .await
                .map_err(|e| BusError::js(format!("create consumer {}", self.durable), e))?,
        };
        Ok((js, consumer, subjects))
    }
}

/// Tracks ops handed to the watcher whose acks have not gone out yet.
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

impl InFlight {
    fn begin(self: &Arc<Self>) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    fn end(&self) {
        if self.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

#[async_trait]
impl Feed for BusSource {
    fn name(&self) -> &str {
        &self.name
    }

    async fn run(self: Arc<Self>, sink: FeedSink) -> Result<(), FirehoseError> {
        let in_flight = Arc::new(InFlight::default());
        let mut attempt = 0u32;
        loop {
            if sink.is_stopped() {
                break;
            }
            let opened = tokio::select! {
                r = self.open(&sink) => r,
                _ = sink.stopped() => break,
            };
            let (js, consumer, _) = match opened {
                Ok(opened) => opened,
                Err(BusError::Config(reason)) => {
                    return Err(FirehoseError::Source {
                        url: self.name.clone(),
                        reason,
                    });
                }
                Err(e) => {
                    sink.report(WatchError::Feed {
                        source: self.name.clone(),
                        error: Arc::new(e),
                    });
                    let delay = self.reconnect.delay(attempt).unwrap_or(self.reconnect.max);
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = sink.stopped() => break,
                    }
                }
            };
            info!(feed = %self.name, "consuming");
            let mut messages = match consumer
                .stream()
                .max_messages_per_batch(64)
                .heartbeat(Duration::from_secs(5))
                .messages()
                .await
            {
                Ok(m) => m,
                Err(e) => {
                    sink.report(WatchError::Feed {
                        source: self.name.clone(),
                        error: Arc::new(BusError::js("pull messages", e)),
                    });
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            attempt = 0;
            // Connected while it reads (an Agent waits for this before reading repos).
            let _connected = sink.connected();
            loop {
                let next = tokio::select! {
                    n = messages.next() => n,
                    _ = sink.stopped() => break,
                };
                match next {
                    Some(Ok(message)) => {
                        self.take(&sink, &js, message, &in_flight).await;
                    }
                    Some(Err(e)) => {
                        // Missed heartbeats and the like: the stream goes on or ends.
                        sink.report(WatchError::Feed {
                            source: self.name.clone(),
                            error: Arc::new(BusError::js("read messages", e)),
                        });
                    }
                    None => break,
                }
            }
        }
        // Ops handed over finish (the watcher drains them); wait until their acks went out.
        in_flight.wait_idle().await;
        Ok(())
    }
}

impl BusSource {
    async fn take(
        &self,
        sink: &FeedSink,
        js: &jetstream::Context,
        message: jetstream::Message,
        in_flight: &Arc<InFlight>,
    ) {
        let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
        let decoded = BusMessage::decode(&message.payload);
        if delivered > self.max_deliver {
            warn!(feed = %self.name, delivered, "message delivered too often; dead-lettered without running again");
            let stored = self
                .dead_letter(
                    js,
                    &message,
                    "consumer",
                    "delivered too many times without an ack",
                )
                .await;
            match stored {
                Ok(()) => finish(&message, End::Term).await,
                Err(e) => {
                    warn!(feed = %self.name, error = %e, "dead letter not stored; the message stays in the stream");
                    redeliver_later(&message, DEAD_LETTER_RETRY).await;
                }
            }
            return;
        }
        let bus = match decoded {
            Ok(bus) => bus,
            Err(e) => {
                sink.report(WatchError::Feed {
                    source: self.name.clone(),
                    error: Arc::new(e),
                });
                finish(&message, End::Term).await;
                return;
            }
        };
        // A message this consumer finished (or is running) already, delivered again as new by
        // a server that lost the ack: acknowledged again, not run again. It is the same stream
        // message (same stream sequence) with the same op in it: another message with the same
        // op (a forgery, a copy published outside the duplicate window) runs and is checked.
        let id = match message.info() {
            Ok(info) => Some(format!("{} {}", info.stream_sequence, bus.msg_id())),
            Err(_) => None,
        };
        let checked = match &id {
            Some(id) => lock(&self.recent).check(id, message),
            None => Check::New(message),
        };
        let message = match checked {
            Check::New(message) => message,
            Check::Done(end, message) => {
                debug!(feed = %self.name, id, "delivered again after it was finished; acknowledged again");
                finish(&message, end).await;
                return;
            }
            Check::Running => {
                debug!(feed = %self.name, id, "delivered again while it runs; acknowledged with it");
                return;
            }
        };
        let done = Done {
            recent: Arc::clone(&self.recent),
            id,
            finished: false,
        };
        if bus.kind == MessageKind::Gap {
            if let Some(gap) = bus.to_gap() {
                sink.gap(gap);
            }
            done.finish(&message, End::Ack).await;
            return;
        }
        let mut data = match bus.to_op_data(&self.name) {
            Ok(data) => data,
            Err(e) => {
                sink.report(WatchError::Feed {
                    source: self.name.clone(),
                    error: Arc::new(e),
                });
                done.finish(&message, End::Term).await;
                return;
            }
        };
        // Not wanted: ack before any verification work.
        if data.repo_event.is_none() && !sink.wants(data.collection(), data.action) {
            done.finish(&message, End::Ack).await;
            return;
        }
        let message = Arc::new(message);
        let heartbeat = in_progress(Arc::clone(&message), self.ack_wait);
        let verify = data.repo_event.is_none()
            && (!self.trust_hub || data.record.is_none() && data.action != Action::Delete);
        if data.repo_event.is_none() && !verify {
            // Taken as the hub published it.
            data = data.with_provenance(Provenance::Unverified);
        }
        if verify {
            match self.verify(sink, &mut data).await {
                Ok(()) => {}
                Err(e) => {
                    drop(heartbeat);
                    sink.reject(data, Rejection::Verification(Arc::new(e)));
                    done.finish(&message, End::Term).await;
                    return;
                }
            }
        }
        in_flight.begin();
        let (js, in_flight, dead_subject) = (
            js.clone(),
            Arc::clone(in_flight),
            self.stream.dead_letter_subject(&self.durable),
        );
        sink.deliver(data, move |outcome| {
            drop(heartbeat);
            tokio::spawn(async move {
                let end = match outcome {
                    Delivered::DeadLettered { handler, error } => {
                        let stored =
                            publish_dead_letter(&js, &dead_subject, &message, &handler, &error)
                                .await;
                        if let Err(e) = stored {
                            // Not terminated (that would lose the op): it runs again later;
                            // `done` goes unfinished, so that delivery is not skipped.
                            warn!(error = %e, "dead letter not stored; the op stays in the stream and runs again");
                            redeliver_later(&message, DEAD_LETTER_RETRY).await;
                            in_flight.end();
                            return;
                        }
                        End::Term
                    }
                    Delivered::Rejected(why) => {
                        debug!(reason = %why, "rejected by its handler's checks; terminated");
                        End::Term
                    }
                    _ => End::Ack,
                };
                done.finish(&message, end).await;
                in_flight.end();
            });
        })
        .await;
    }

    /// Verifies an op from its proof (or, without one, from the author's PDS), retrying while
    /// a host it needs is unreachable. Sets the record to the proven bytes.
    async fn verify(&self, sink: &FeedSink, data: &mut OpData) -> Result<(), SyncError> {
        let verifier = sink.verifier();
        let op: &OpData = data;
        let record = sink
            .until_verified(&op.did, op.seq, || async move {
                match &op.proof {
                    Some(proof) => {
                        verifier
                            .verify_op_proof(&op.did, &op.rev, &op.path, op.cid, proof)
                            .await
                    }
                    None => {
                        verifier
                            .prove_op_from_pds(&op.did, &op.rev, &op.path, op.cid)
                            .await
                    }
                }
            })
            .await?;
        data.record = record;
        data.provenance = sink.checked_provenance();
        Ok(())
    }

    async fn dead_letter(
        &self,
        js: &jetstream::Context,
        message: &jetstream::Message,
        handler: &str,
        error: &str,
    ) -> Result<(), String> {
        publish_dead_letter(
            js,
            &self.stream.dead_letter_subject(&self.durable),
            message,
            handler,
            error,
        )
        .await
    }
}

/// How many finished message ids a consumer remembers (see [`Recent`]).
const RECENT_CAPACITY: usize = 16 * 1024;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a message was finished: acknowledged, or terminated (dead-lettered, rejected).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Ack,
    Term,
}

impl End {
    fn kind(self) -> AckKind {
        match self {
            End::Ack => AckKind::Ack,
            End::Term => AckKind::Term,
        }
    }
}

/// The messages, by stream sequence and message id (did, rev, path), this consumer finished
/// lately or is running now. A server can deliver a message again, as new, after it confirmed its ack: nats-server
/// writes consumer state to disk asynchronously, so one killed (SIGKILL, power cut) restarts
/// without the last acks, and a replicated consumer's new leader may lack them too. Without
/// this, those ops would run twice in one process; across processes the watcher's dedup store
/// (a state dir) does the same job.
#[derive(Default)]
struct Recent {
    done: HashMap<String, End>,
    order: VecDeque<String>,
    /// Running now, with the other deliveries of the same message that arrived meanwhile:
    /// they are finished with it.
    running: HashMap<String, Vec<jetstream::Message>>,
}

enum Check {
    /// Not seen: it runs (and is now marked running).
    New(jetstream::Message),
    /// Finished already, so: finish this delivery the same way.
    Done(End, jetstream::Message),
    /// Running: this delivery was kept, to be finished with the first.
    Running,
}

impl Recent {
    fn check(&mut self, id: &str, message: jetstream::Message) -> Check {
        if let Some(end) = self.done.get(id) {
            return Check::Done(*end, message);
        }
        if let Some(others) = self.running.get_mut(id) {
            others.push(message);
            return Check::Running;
        }
        self.running.insert(id.to_string(), Vec::new());
        Check::New(message)
    }

    /// Marks `id` finished; returns the other deliveries of it that arrived while it ran.
    fn finished(&mut self, id: &str, end: End) -> Vec<jetstream::Message> {
        let others = self.running.remove(id).unwrap_or_default();
        if self.done.insert(id.to_string(), end).is_none() {
            self.order.push_back(id.to_string());
        }
        while self.order.len() > RECENT_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.done.remove(&old);
            }
        }
        others
    }
}

/// Finishes one message taken by a consumer: acks (or terms) it and the other deliveries of it
/// that came meanwhile, and remembers it as finished.
struct Done {
    recent: Arc<Mutex<Recent>>,
    /// `None` for a message without JetStream metadata: not tracked.
    id: Option<String>,
    finished: bool,
}

impl Done {
    async fn finish(mut self, message: &jetstream::Message, end: End) {
        finish(message, end).await;
        self.finished = true;
        let Some(id) = &self.id else { return };
        let others = lock(&self.recent).finished(id, end);
        for other in &others {
            finish(other, end).await;
        }
    }
}

impl Drop for Done {
    /// Dropped unfinished (the op was dropped with its watcher): the next delivery runs.
    fn drop(&mut self) {
        if let (false, Some(id)) = (self.finished, &self.id) {
            lock(&self.recent).running.remove(id);
        }
    }
}

/// Tells the server, every third of `ack_wait`, that the message is being worked on, until
/// dropped: with the op's completion, or with the op itself when the watcher is killed (then
/// the server delivers the message again after `ack_wait`).
fn in_progress(message: Arc<jetstream::Message>, ack_wait: Duration) -> Heartbeat {
    Heartbeat(
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ack_wait / 3);
            tick.tick().await;
            loop {
                tick.tick().await;
                let _ = message.ack_with(AckKind::Progress).await;
            }
        })
        .abort_handle(),
    )
}

/// Stops a message's in-progress signals when dropped.
struct Heartbeat(tokio::task::AbortHandle);

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Acks (or terms) a message and waits for the server to confirm, retrying a few times while
/// the server is unreachable: an ack lost to a restart would deliver the op again.
async fn finish(message: &jetstream::Message, end: End) {
    let confirmed = Backoff::retries(8)
        .retry(
            || message.double_ack_with(end.kind()),
            |e, _, delay| debug!(error = %e, ?delay, "ack not confirmed; retrying"),
        )
        .await;
    if let Err(e) = confirmed {
        warn!(error = %e, "ack not confirmed; the server will deliver the message again");
    }
}

/// Leaves a message to be delivered again after `delay` (its dead letter could not be stored:
/// terminating it would lose the op).
async fn redeliver_later(message: &jetstream::Message, delay: Duration) {
    let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
}

/// How long a message whose dead letter could not be stored waits before it runs again.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(10);

/// Copies a message to the dead-letter stream with the reason in headers; `Err` when the
/// stream could not store it after a few retries.
async fn publish_dead_letter(
    js: &jetstream::Context,
    subject: &str,
    message: &jetstream::Message,
    handler: &str,
    error: &str,
) -> Result<(), String> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Murmur-Handler", handler);
    headers.insert("Murmur-Error", error.replace(['\r', '\n'], " ").as_str());
    headers.insert("Murmur-Subject", message.subject.as_str());
    if let Ok(info) = message.info() {
        headers.insert(
            "Murmur-Stream-Seq",
            info.stream_sequence.to_string().as_str(),
        );
    }
    Backoff::retries(8)
        .retry(
            || async {
                js.publish_with_headers(
                    subject.to_string(),
                    headers.clone(),
                    message.payload.clone(),
                )
                .await
                .map_err(|e| e.to_string())?
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
            },
            |e, _, _| debug!(error = %e, "dead letter not stored yet; retrying"),
        )
        .await
}
