//! Reading one source: connect (bounded by a timeout), read frames into the pipeline,
//! reconnect with backoff from the last event read, and the error-frame policy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::watch;
use tracing::info;

use crate::pipeline::{Pipeline, ReadPosition};
use crate::repo_lanes::RepoLanes;
use crate::{Backoff, FirehoseError, Source, SourceError, WatchError};

/// How many times in a row a server may answer a connection with the same error frame
/// before the source stops with [`FirehoseError::ErrorFrame`].
pub const ERROR_FRAME_REPEATS: u32 = 3;

/// Reads one source: connect, read, reconnect with backoff from where it got to.
pub(crate) struct SourceReader {
    pub(crate) index: usize,
    pub(crate) source: Arc<dyn Source>,
    pub(crate) pipeline: Arc<Pipeline>,
    pub(crate) reconnect: Backoff,
    pub(crate) connect_timeout: Duration,
    pub(crate) healthy_after: Duration,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Where events go to be handled on several cores; `None` handles each event before the
    /// next frame is read.
    pub(crate) lanes: Option<Arc<RepoLanes>>,
}

/// The error frame a server answered the last connection(s) with, and how many in a row.
#[derive(Default)]
struct RepeatedErrorFrame {
    last: Option<(String, u32)>,
}

impl RepeatedErrorFrame {
    /// Counts `error`, which ended a connection that did (`events`) or did not read an event
    /// with a valid seq: returns how many connections in a row ended with it.
    fn count(&mut self, error: &murmur_sync::StreamError, events: bool) -> u32 {
        let name = match error {
            murmur_sync::StreamError::Other { error, .. } => error.clone(),
            other => format!("{other:?}"),
        };
        let repeated = match &self.last {
            Some((last, n)) if *last == name && !events => n + 1,
            _ => 1,
        };
        self.last = Some((name, repeated));
        repeated
    }

    /// A connection ended some other way, or read events: the streak is over.
    fn reset(&mut self) {
        self.last = None;
    }
}

impl SourceReader {
    pub(crate) async fn run(mut self, start: Option<i64>) -> Result<(), FirehoseError> {
        let url = self.source.url().to_string();
        let shared_url: Arc<str> = Arc::from(url.as_str());
        // Reconnects continue after the last event read, not from the start-up cursor:
        // events read but not yet handled are still queued in this process.
        let mut position = ReadPosition {
            cursor: start,
            connection_last: None,
        };
        let mut attempt = 0u32;
        let mut error_frames = RepeatedErrorFrame::default();
        loop {
            if *self.shutdown.borrow() {
                return Ok(());
            }
            let connect =
                tokio::time::timeout(self.connect_timeout, self.source.connect(position.cursor));
            let connected = tokio::select! {
                r = connect => r.unwrap_or(Err(SourceError::ConnectTimeout(self.connect_timeout))),
                _ = stopped(&mut self.shutdown) => return Ok(()),
            };
            let wait = match connected {
                Ok(mut stream) => {
                    info!(source = %url, cursor = ?position.cursor, "connected");
                    let _connected =
                        crate::metrics::ConnectedSource::new(&self.pipeline.metrics, self.index);
                    let since = Instant::now();
                    position.connection_last = None;
                    let ended = loop {
                        let next = tokio::select! {
                            n = stream.next() => n,
                            _ = stopped(&mut self.shutdown) => return Ok(()),
                        };
                        match next {
                            Some(Ok(crate::SourceMessage::Frame(bytes))) => {
                                // Verification may wait for an unreachable host: stay
                                // stoppable. An event cut short here is not finished, so
                                // the cursor stays before it.
                                let processed = tokio::select! {
                                    r = handle_frame(&self.pipeline, self.lanes.as_ref(), self.index, &shared_url, &bytes, &mut position) => r,
                                    _ = stopped(&mut self.shutdown) => return Ok(()),
                                };
                                match processed {
                                    Ok(()) => {}
                                    Err(reconnect) => break reconnect,
                                }
                            }
                            Some(Err(e)) => break e,
                            None => break SourceError::Closed(None),
                        }
                    };
                    if since.elapsed() >= self.healthy_after {
                        attempt = 0;
                    }
                    match &ended {
                        SourceError::ErrorFrame(error) => {
                            // Only events with a valid seq break a streak: #info or
                            // skipped frames before each error do not.
                            let events = position.connection_last.is_some();
                            let repeated = error_frames.count(error, events);
                            self.pipeline.report(WatchError::ErrorFrame {
                                source: url.clone(),
                                error: error.clone(),
                                repeated,
                            });
                            let has_policy = matches!(
                                error,
                                murmur_sync::StreamError::FutureCursor { .. }
                                    | murmur_sync::StreamError::OutdatedCursor { .. }
                                    | murmur_sync::StreamError::ConsumerTooSlow { .. }
                            );
                            if !has_policy && repeated >= ERROR_FRAME_REPEATS {
                                return Err(FirehoseError::ErrorFrame {
                                    url,
                                    error: error.clone(),
                                    repeated,
                                    cursor: position.cursor,
                                });
                            }
                        }
                        other => {
                            error_frames.reset();
                            self.pipeline.report(WatchError::Disconnected {
                                source: url.clone(),
                                error: other.clone(),
                            });
                        }
                    }
                    match ended {
                        SourceError::RateLimited { retry_after } => retry_after,
                        _ => None,
                    }
                }
                Err(SourceError::Refused { status, reason }) => {
                    return Err(FirehoseError::Source {
                        url,
                        reason: format!("HTTP {status}: {reason}"),
                    });
                }
                Err(e) => {
                    let wait = match &e {
                        SourceError::RateLimited { retry_after } => *retry_after,
                        _ => None,
                    };
                    self.pipeline.report(WatchError::Connect {
                        source: url.clone(),
                        error: e,
                    });
                    wait
                }
            };
            let Some(delay) = self.reconnect.delay(attempt) else {
                return Err(FirehoseError::Source {
                    url,
                    reason: format!("gave up after {attempt} reconnect attempts"),
                });
            };
            attempt = attempt.saturating_add(1);
            self.pipeline.metrics.reconnect(self.index);
            let delay = wait.map_or(delay, |w| w.max(delay));
            info!(source = %url, ?delay, cursor = ?position.cursor, "reconnecting");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopped(&mut self.shutdown) => return Ok(()),
            }
        }
    }
}

/// Reads one frame of source `index` and handles its event here, or queues it in its repo's
/// lane.
async fn handle_frame(
    pipeline: &Pipeline,
    lanes: Option<&Arc<RepoLanes>>,
    index: usize,
    url: &Arc<str>,
    bytes: &murmur_sync::Bytes,
    position: &mut ReadPosition,
) -> Result<(), SourceError> {
    let Some(event) = pipeline.read(index, url, bytes, position).await? else {
        return Ok(());
    };
    match lanes {
        Some(lanes) => lanes.push(event).await,
        None => pipeline.handle(event).await,
    }
    Ok(())
}

/// Resolves once shutdown was requested (the watch value is not held across the await).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
