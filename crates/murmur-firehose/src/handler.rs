//! The handler trait, routes, and handlers made from closures.

use std::any::TypeId;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;

use atrium_api::types::Collection;
use murmur_lexicon::Validate;

use crate::extract::{Deleted, FromOp, Record};
use crate::{Action, HandlerError, OpEvent, Rejection};

/// A boxed, sendable future, as handlers return.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Which ops a handler wants: one collection NSID and a set of actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The collection NSID, e.g. `agent.comms.task`.
    pub collection: &'static str,
    /// The actions handled.
    pub actions: &'static [Action],
}

impl Route {
    /// Creates and updates of `C`.
    pub fn records<C: Collection>() -> Route {
        Route {
            collection: C::NSID,
            actions: &[Action::Create, Action::Update],
        }
    }

    /// Whether an op on `collection` with `action` goes to this route.
    pub fn matches(&self, collection: &str, action: Action) -> bool {
        self.collection == collection && self.actions.contains(&action)
    }
}

/// Why a handler call did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The op could not be turned into the handler's arguments; the handler did not run.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The handler ran and returned an error.
    #[error(transparent)]
    Handler(#[from] HandlerError),
}

/// A typed handler: made by `#[handler]` on an async fn, or from a closure with
/// [`Watcher::on_create`](crate::WatcherBuilder::on_create) and friends.
pub trait Handler: Send + Sync + 'static {
    /// A name for logs, metrics and dead letters.
    fn name(&self) -> &'static str;
    /// The ops it handles.
    fn route(&self) -> Route;
    /// Shared state types its arguments read, checked when the watcher is built.
    fn required_state(&self) -> Vec<(TypeId, &'static str)> {
        Vec::new()
    }
    /// Extracts the arguments from `op` and runs the handler.
    fn call(&self, op: OpEvent) -> BoxFuture<Result<(), CallError>>;
}

/// A handler made from a closure taking an extractor and the raw op.
pub struct FnHandler<A, F> {
    name: &'static str,
    route: Route,
    f: F,
    _arg: PhantomData<fn() -> A>,
}

impl<A, F, Fut> Handler for FnHandler<A, F>
where
    A: FromOp,
    F: Fn(A, OpEvent) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn route(&self) -> Route {
        self.route
    }

    fn required_state(&self) -> Vec<(TypeId, &'static str)> {
        A::required_state().into_iter().collect()
    }

    fn call(&self, op: OpEvent) -> BoxFuture<Result<(), CallError>> {
        match A::from_op(&op) {
            Ok(arg) => {
                let fut = (self.f)(arg, op);
                Box::pin(async move { fut.await.map_err(CallError::Handler) })
            }
            Err(rejection) => Box::pin(async move { Err(CallError::Rejected(rejection)) }),
        }
    }
}

/// A closure handler for creates (and/or updates) of `C`.
pub fn record_handler<C, F, Fut>(actions: &'static [Action], f: F) -> FnHandler<Record<C>, F>
where
    C: Collection + Send + 'static,
    C::Record: Validate + Send,
    F: Fn(Record<C>, OpEvent) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    FnHandler {
        name: C::NSID,
        route: Route {
            collection: C::NSID,
            actions,
        },
        f,
        _arg: PhantomData,
    }
}

/// A closure handler for deletes of `C`.
pub fn delete_handler<C, F, Fut>(f: F) -> FnHandler<Deleted<C>, F>
where
    C: Collection + Send + 'static,
    F: Fn(Deleted<C>, OpEvent) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    FnHandler {
        name: C::NSID,
        route: Route {
            collection: C::NSID,
            actions: &[Action::Delete],
        },
        f,
        _arg: PhantomData,
    }
}
