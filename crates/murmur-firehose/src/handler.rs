//! The handler trait: every `async fn` (or closure) whose arguments are extractors is one.
//!
//! As in axum, [`Handler`] is implemented for every `Fn(T1, .., Tn) -> Fut` (up to eight
//! arguments) whose arguments implement [`FromOp`] and whose future resolves to
//! `Result<(), HandlerError>`. Which ops a handler receives comes from the type of its one
//! route-giving argument ([`Record<C>`](crate::Record), [`Created<C>`](crate::Created),
//! [`Updated<C>`](crate::Updated) or [`Deleted<C>`](crate::Deleted)), never from how that
//! argument is spelled. `#[handler]` adds clear compile errors and a readable name.

use std::any::TypeId;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{BoxError, Layer, Service, ServiceExt};

use crate::extract::FromOp;
use crate::route::Route;
use crate::{HandlerError, OpEvent, Rejection};

/// A boxed, sendable future, as handlers return.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Why a handler call did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The op could not be turned into the handler's arguments; the handler did not run.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// The handler ran and returned an error.
    #[error(transparent)]
    Handler(#[from] HandlerError),
}

/// A typed handler: any `async fn` or closure whose arguments are extractors, an async fn
/// with `#[handler]`, or a type implementing it by hand (e.g. to see every op with
/// [`WatcherBuilder::tail`](crate::WatcherBuilder::tail)).
///
/// `T` only tells the blanket implementations apart (it is the tuple of argument types);
/// hand-written handlers implement `Handler` (that is, `Handler<()>`).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a murmur handler",
    label = "not a handler",
    note = "a handler is an async fn or closure whose arguments are extractors (Record<C>, Created<C>, Updated<C>, Deleted<C>, Author, RecordRef, CommitInfo, State<S>, OpEvent) returning Result<(), HandlerError>; put #[handler] on an async fn for an error that names the wrong argument"
)]
pub trait Handler<T = ()>: Send + Sync + 'static {
    /// A name for logs, metrics and dead letters (default: the Rust type name).
    fn name(&self) -> &'static str {
        std::any::type_name::<Self>()
    }

    /// The ops it handles.
    fn route(&self) -> Route;

    /// Shared state types its arguments read, checked when the watcher is built.
    fn required_state(&self) -> Vec<(TypeId, &'static str)> {
        Vec::new()
    }

    /// Extracts the arguments from `op` and runs the handler.
    fn call(&self, op: OpEvent) -> BoxFuture<Result<(), CallError>>;

    /// Why this handler cannot be routed, e.g. none or two of its arguments give a route;
    /// [`WatcherBuilder::build`](crate::WatcherBuilder::build) reports it, naming the handler.
    fn route_error(&self) -> Option<String> {
        None
    }

    /// Wraps the handler in a tower [`Layer`] (a timeout, a rate limit, your own): the layer
    /// is applied once, here; each op then clones the finished service.
    ///
    /// Errors from the layer that are not the handler's own fail the op (dead letter), except
    /// a `tower::timeout` elapsed, which is retried like the watcher's own handler timeout.
    fn layer<L>(self, layer: L) -> Layered<L::Service>
    where
        Self: Sized,
        T: 'static,
        L: Layer<HandlerService<Self, T>>,
        L::Service: Service<OpEvent, Response = ()> + Clone + Send + Sync + 'static,
        <L::Service as Service<OpEvent>>::Error: Into<BoxError>,
        <L::Service as Service<OpEvent>>::Future: Send + 'static,
    {
        let name = self.name();
        let route = self.route();
        let required_state = self.required_state();
        let route_error = self.route_error();
        Layered {
            name,
            route,
            required_state,
            route_error,
            service: layer.layer(HandlerService::new(self)),
        }
    }
}

/// A handler as a tower [`Service`] of [`OpEvent`]s, for layers to wrap (see
/// [`Handler::layer`]).
pub struct HandlerService<H, T> {
    handler: Arc<H>,
    _args: PhantomData<fn() -> T>,
}

impl<H, T> HandlerService<H, T> {
    /// The service that calls `handler`.
    pub fn new(handler: H) -> Self {
        HandlerService {
            handler: Arc::new(handler),
            _args: PhantomData,
        }
    }
}

impl<H, T> Clone for HandlerService<H, T> {
    fn clone(&self) -> Self {
        HandlerService {
            handler: Arc::clone(&self.handler),
            _args: PhantomData,
        }
    }
}

impl<H: Handler<T>, T> Service<OpEvent> for HandlerService<H, T> {
    type Response = ();
    type Error = CallError;
    type Future = BoxFuture<Result<(), CallError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, op: OpEvent) -> Self::Future {
        self.handler.call(op)
    }
}

/// A handler wrapped in a tower layer; made by [`Handler::layer`].
pub struct Layered<S> {
    name: &'static str,
    route: Route,
    required_state: Vec<(TypeId, &'static str)>,
    route_error: Option<String>,
    service: S,
}

impl<S> Handler for Layered<S>
where
    S: Service<OpEvent, Response = ()> + Clone + Send + Sync + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    fn name(&self) -> &'static str {
        self.name
    }

    fn route(&self) -> Route {
        self.route
    }

    fn required_state(&self) -> Vec<(TypeId, &'static str)> {
        self.required_state.clone()
    }

    fn route_error(&self) -> Option<String> {
        self.route_error.clone()
    }

    fn call(&self, op: OpEvent) -> BoxFuture<Result<(), CallError>> {
        let service = self.service.clone();
        Box::pin(async move {
            service
                .oneshot(op)
                .await
                .map_err(|e| call_error_from(e.into()))
        })
    }
}

/// Turns a layer's error back into a [`CallError`].
pub(crate) fn call_error_from(error: BoxError) -> CallError {
    match error.downcast::<CallError>() {
        Ok(call) => *call,
        Err(other) if other.is::<tower::timeout::error::Elapsed>() => {
            CallError::Handler(HandlerError::retry(other))
        }
        Err(other) => CallError::Handler(HandlerError::fail(other)),
    }
}

/// The route its arguments give, or why they give none: exactly one must give one.
fn route_of(routes: &[Option<Route>]) -> Result<Route, String> {
    let mut found = routes.iter().flatten();
    match (found.next(), found.next()) {
        (Some(route), None) => Ok(*route),
        (None, _) => Err(
            "none of its arguments gives a route: take one Record<C>, Created<C>, Updated<C>, Deleted<C>, Identity or AccountStatus"
                .into(),
        ),
        (Some(a), Some(b)) => Err(format!(
            "it takes more than one route-giving argument ({} {:?} and {} {:?}): take exactly one",
            a.collection, a.actions, b.collection, b.actions
        )),
    }
}

/// The route of a handler whose arguments give none (only reachable through `.tail(..)`).
const NO_ROUTE: Route = Route {
    collection: "",
    actions: &[],
};

macro_rules! impl_handler {
    ($($arg:ident),+) => {
        impl<F, Fut, $($arg,)+> Handler<($($arg,)+)> for F
        where
            F: Fn($($arg),+) -> Fut + Send + Sync + 'static,
            Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
            $($arg: FromOp,)+
        {
            fn name(&self) -> &'static str {
                std::any::type_name::<F>()
            }

            fn route(&self) -> Route {
                route_of(&[$($arg::ROUTE),+]).unwrap_or(NO_ROUTE)
            }

            fn route_error(&self) -> Option<String> {
                route_of(&[$($arg::ROUTE),+]).err()
            }

            fn required_state(&self) -> Vec<(TypeId, &'static str)> {
                [$($arg::required_state()),+].into_iter().flatten().collect()
            }

            #[allow(non_snake_case)]
            fn call(&self, op: OpEvent) -> BoxFuture<Result<(), CallError>> {
                $(
                    let $arg = match $arg::from_op(&op) {
                        Ok(value) => value,
                        Err(rejection) => {
                            return Box::pin(std::future::ready(Err(CallError::Rejected(rejection))));
                        }
                    };
                )+
                let fut = self($($arg),+);
                Box::pin(async move { fut.await.map_err(CallError::Handler) })
            }
        }
    };
}

impl_handler!(T1);
impl_handler!(T1, T2);
impl_handler!(T1, T2, T3);
impl_handler!(T1, T2, T3, T4);
impl_handler!(T1, T2, T3, T4, T5);
impl_handler!(T1, T2, T3, T4, T5, T6);
impl_handler!(T1, T2, T3, T4, T5, T6, T7);
impl_handler!(T1, T2, T3, T4, T5, T6, T7, T8);

/// Any [`Handler`], type-erased, with its route worked out once.
pub(crate) struct Erased {
    inner: Box<dyn ErasedCall>,
    name: &'static str,
    route: Route,
    required_state: Vec<(TypeId, &'static str)>,
    route_error: Option<String>,
}

trait ErasedCall: Send + Sync + 'static {
    fn call(&self, op: OpEvent) -> BoxFuture<Result<(), CallError>>;
}

struct CallThrough<H, T>(H, PhantomData<fn() -> T>);

impl<H: Handler<T>, T: 'static> ErasedCall for CallThrough<H, T> {
    fn call(&self, op: OpEvent) -> BoxFuture<Result<(), CallError>> {
        self.0.call(op)
    }
}

impl Erased {
    pub(crate) fn new<H: Handler<T>, T: 'static>(handler: H) -> Self {
        Erased {
            name: handler.name(),
            route: handler.route(),
            required_state: handler.required_state(),
            route_error: handler.route_error(),
            inner: Box::new(CallThrough(handler, PhantomData)),
        }
    }
}

impl Handler for Erased {
    fn name(&self) -> &'static str {
        self.name
    }

    fn route(&self) -> Route {
        self.route
    }

    fn required_state(&self) -> Vec<(TypeId, &'static str)> {
        self.required_state.clone()
    }

    fn route_error(&self) -> Option<String> {
        self.route_error.clone()
    }

    fn call(&self, op: OpEvent) -> BoxFuture<Result<(), CallError>> {
        self.inner.call(op)
    }
}

/// What `#[handler]` expands to; not part of the public API.
#[doc(hidden)]
pub mod private {
    use super::*;

    /// One argument's extractor functions, as plain fn pointers: a wrong argument type fails
    /// once, where the macro's per-argument check names it, and nowhere else.
    pub struct ArgFns<T> {
        /// `T::from_op`.
        pub from_op: fn(&OpEvent) -> Result<T, Rejection>,
        /// `T::ROUTE`.
        pub route: Option<Route>,
        /// `T::required_state`.
        pub required_state: fn() -> Option<(TypeId, &'static str)>,
    }

    /// The extractor functions of `T`.
    pub const fn arg_fns<T: FromOp>() -> ArgFns<T> {
        ArgFns {
            from_op: T::from_op,
            route: T::ROUTE,
            required_state: T::required_state,
        }
    }

    /// How many of `routes` give a route (for the macro's compile-time check).
    pub const fn count_routes(routes: &[Option<Route>]) -> usize {
        let (mut i, mut n) = (0, 0);
        while i < routes.len() {
            if routes[i].is_some() {
                n += 1;
            }
            i += 1;
        }
        n
    }

    /// The one route among `routes` (the macro checked there is exactly one).
    pub fn the_route(routes: &[Option<Route>]) -> Route {
        route_of(routes).unwrap_or(NO_ROUTE)
    }
}
