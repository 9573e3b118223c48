//! The handler API: `#[handler]` fns, plain async fns and closures take the same extractors;
//! routes come from argument types (also under a renamed import); user tower layers wrap
//! handlers; a handler whose arguments give no route is a build error naming it. Runs
//! offline on the recorded corpus (tests/support/corpus.rs).

mod support;

use std::any::TypeId;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use murmur_firehose::Record as R;
use murmur_firehose::{
    Action, Author, CommitInfo, Created, Deleted, FirehoseError, Handler, HandlerError, OpEvent,
    RecordRef, State, Updated, Watcher, handler,
};
use murmur_sync::VerifyLevel;
use support::corpus::{self, Replay, Task};

#[derive(Clone, Default)]
struct Seen(Arc<AtomicU64>);

#[handler]
async fn on_task(
    task: R<Task>,
    from: Author,
    at: RecordRef,
    commit: CommitInfo,
    State(seen): State<Seen>,
    op: OpEvent,
) -> Result<(), HandlerError> {
    assert!(task.uri.ends_with(op.rkey()));
    assert_eq!(from.0, op.data().did);
    assert_eq!(at.cid, op.data().cid);
    assert_eq!(Some(task.cid), at.cid, "one CID, extractor to extractor");
    assert_eq!(commit.seq, op.data().seq);
    seen.0.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn plain_on_task(task: Created<Task>, State(seen): State<Seen>) -> Result<(), HandlerError> {
    let _title: &str = &task.title; // derefs to the record
    seen.0.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[handler]
async fn on_update(_task: Updated<Task>) -> Result<(), HandlerError> {
    Ok(())
}

/// The runtime crate named explicitly, as a crate re-exporting murmur would.
#[handler(crate = ::murmur_firehose)]
async fn on_gone(gone: Deleted<Task>) -> Result<(), HandlerError> {
    let _ = gone.prev;
    Ok(())
}

#[test]
fn routes_come_from_argument_types() {
    assert_eq!(
        Handler::route(&on_task).actions,
        &[Action::Create, Action::Update]
    );
    assert_eq!(on_task.route().collection, "agent.comms.task");
    assert_eq!(on_task.name(), "on_task");
    assert_eq!(
        on_task.required_state(),
        vec![(TypeId::of::<Seen>(), std::any::type_name::<Seen>())]
    );
    assert_eq!(on_update.route().actions, &[Action::Update]);
    assert_eq!(on_gone.route().actions, &[Action::Delete]);
    assert_eq!(on_gone.name(), "on_gone");

    let plain = Handler::route(&plain_on_task);
    assert_eq!(plain.collection, "agent.comms.task");
    assert_eq!(plain.actions, &[Action::Create]);
    assert!(
        Handler::name(&plain_on_task).ends_with("plain_on_task"),
        "without #[handler] the name is the fn's type name: {}",
        Handler::name(&plain_on_task)
    );
    let closure = |_: OpEvent, _gone: Deleted<Task>| async { Ok(()) };
    assert_eq!(Handler::route(&closure).actions, &[Action::Delete]);
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Counts the calls it passes on: a user's own tower layer.
#[derive(Clone)]
struct CountLayer(Arc<AtomicU64>);

impl<S> tower::Layer<S> for CountLayer {
    type Service = Counted<S>;
    fn layer(&self, inner: S) -> Counted<S> {
        Counted(inner, Arc::clone(&self.0))
    }
}

#[derive(Clone)]
struct Counted<S>(S, Arc<AtomicU64>);

impl<S: tower::Service<OpEvent>> tower::Service<OpEvent> for Counted<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }
    fn call(&mut self, op: OpEvent) -> S::Future {
        self.1.fetch_add(1, Ordering::Relaxed);
        self.0.call(op)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fns_closures_and_layered_handlers_all_see_every_create() {
    let frames = corpus::pass(&corpus::recorded(), 0, 1);
    let creates = corpus::task_creates(&frames);
    let updates = corpus::task_ops(&frames, Action::Update);
    assert!(creates > 0);
    let macro_seen = Seen::default();
    let closure_seen = Arc::new(AtomicU64::new(0));
    let layered = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&closure_seen);
    // State<Seen> is one value per watcher: the plain fn (creates) and the #[handler] fn
    // (creates and updates) share it.
    let watcher = Watcher::builder()
        .source(Replay {
            frames: Arc::new(frames),
        })
        .verification(VerifyLevel::None)
        .state(macro_seen.clone())
        .handler(on_task)
        .handler(plain_on_task.layer(CountLayer(Arc::clone(&layered))))
        .handler(
            move |task: Created<Task>, from: Author, commit: CommitInfo| {
                assert!(task.uri.contains(&from.0));
                assert!(commit.seq > 0);
                c.fetch_add(1, Ordering::Relaxed);
                async { Ok(()) }
            },
        )
        .build()
        .unwrap();
    let stop = watcher.shutdown_handle();
    let running = tokio::spawn(watcher.run());
    wait_for("every op, by every handler", || {
        closure_seen.load(Ordering::Relaxed) == creates
            && layered.load(Ordering::Relaxed) == creates
            && macro_seen.0.load(Ordering::Relaxed) == 2 * creates + updates
    })
    .await;
    stop.shutdown();
    running.await.unwrap().unwrap();
}

#[test]
fn a_handler_without_a_route_argument_is_a_build_error_naming_it() {
    let err = Watcher::builder()
        .pds("http://localhost:1")
        .handler(|_from: Author, _op: OpEvent| async { Ok(()) })
        .build()
        .err()
        .expect("no route, no watcher");
    let FirehoseError::Config(msg) = err else {
        panic!("{err:?}")
    };
    assert!(msg.contains("cannot be routed"), "{msg}");
    assert!(
        msg.contains("a_handler_without_a_route_argument_is_a_build_error_naming_it::{{closure}}"),
        "names the closure: {msg}"
    );

    let err = Watcher::builder()
        .pds("http://localhost:1")
        .handler(|_a: Created<Task>, _b: Deleted<Task>| async { Ok(()) })
        .build()
        .err()
        .expect("two routes, no watcher");
    assert!(err.to_string().contains("more than one"), "{err}");

    // A tail sees everything: no route needed.
    Watcher::builder()
        .pds("http://localhost:1")
        .tail(|_op: OpEvent| async { Ok(()) })
        .build()
        .expect("a tail needs no route");
}
