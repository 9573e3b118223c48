//! One connection's events handled on several cores: each repo's events in stream order (its
//! rev chain is checked commit after commit), different repos' events at the same time.
//!
//! Verification is the costly part of handling an event (a signature and an MST inversion
//! per commit), and it only depends on the repo's own earlier events. So the reader decodes
//! each frame, registers it in the source's progress in arrival order (the stored cursor
//! never passes an event that is not finished, whichever lane finishes first), and queues it
//! in its repo's lane. At most `workers` lanes run at once, across the watcher's sources;
//! the queue is bounded, so a slow lane slows the socket read, not memory.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::pipeline::{Pipeline, ReadEvent};
use crate::reader::stopped;

/// Events read and not yet handled, per source (the room the reader waits for).
pub(crate) const QUEUED_EVENTS: usize = 64;

/// The repo lanes of one source.
pub(crate) struct RepoLanes {
    pipeline: Arc<Pipeline>,
    /// Room for events read and not handled yet.
    room: Arc<Semaphore>,
    /// Lanes running at once (shared by the watcher's sources).
    workers: Arc<Semaphore>,
    /// The events waiting in each repo's lane; a repo has an entry while its lane runs.
    lanes: Mutex<HashMap<String, VecDeque<(ReadEvent, OwnedSemaphorePermit)>>>,
    shutdown: watch::Receiver<bool>,
}

impl RepoLanes {
    pub(crate) fn new(
        pipeline: Arc<Pipeline>,
        workers: Arc<Semaphore>,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(RepoLanes {
            pipeline,
            room: Arc::new(Semaphore::new(QUEUED_EVENTS)),
            workers,
            lanes: Mutex::new(HashMap::new()),
            shutdown,
        })
    }

    fn lanes(
        &self,
    ) -> MutexGuard<'_, HashMap<String, VecDeque<(ReadEvent, OwnedSemaphorePermit)>>> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `event` behind its repo's earlier events; waits while the queue is full.
    pub(crate) async fn push(self: &Arc<Self>, event: ReadEvent) {
        let room = Arc::clone(&self.room)
            .acquire_owned()
            .await
            .expect("the room semaphore is never closed");
        let did = event.did().to_string();
        let start = {
            let mut lanes = self.lanes();
            match lanes.get_mut(&did) {
                Some(lane) => {
                    lane.push_back((event, room));
                    false
                }
                None => {
                    lanes.insert(did.clone(), VecDeque::from([(event, room)]));
                    true
                }
            }
        };
        if start {
            let me = Arc::clone(self);
            let mut shutdown = self.shutdown.clone();
            // Stops where it is on a kill (the watcher dropped) or a shutdown: the events
            // left are not finished, so the stored cursor stays before them.
            self.pipeline.dispatcher.spawn_until_killed(async move {
                tokio::select! {
                    () = me.run(did) => {}
                    _ = stopped(&mut shutdown) => {}
                }
            });
        }
    }

    /// Handles the repo's events until its lane is empty, then ends the lane.
    async fn run(self: Arc<Self>, did: String) {
        let _worker = Arc::clone(&self.workers)
            .acquire_owned()
            .await
            .expect("the workers semaphore is never closed");
        loop {
            let next = {
                let mut lanes = self.lanes();
                let Some(lane) = lanes.get_mut(&did) else {
                    return;
                };
                match lane.pop_front() {
                    Some(next) => next,
                    None => {
                        lanes.remove(&did);
                        return;
                    }
                }
            };
            let (event, _room) = next;
            self.pipeline.handle(event).await;
        }
    }
}
