//! Many topics to handlers in one service: [`Router`].
//!
//! A router is the consuming half of a service: one consumer group (the
//! service's name), one state shared by every handler, a route per topic.
//! Each route is a [`Runner`] of its own (its concurrency, its per-key
//! order, its lease keeping), all stopped by one [`Shutdown`] token.
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//! use oona::router::Router;
//! use oona::{Bus, HandlerResult, Incoming};
//! use serde_json::Value;
//!
//! #[derive(Default)]
//! struct Counts { reports: AtomicU64 }
//!
//! // A handler takes the state, the message, or both.
//! async fn on_report(counts: Arc<Counts>, _msg: Incoming<Value>) -> HandlerResult {
//!     counts.reports.fetch_add(1, Ordering::Relaxed);
//!     Ok(())
//! }
//!
//! async fn on_command(msg: Incoming<Value>) -> HandlerResult {
//!     // Any error converts with `?` (anyhow's, std's, strings).
//!     let _n: u32 = msg.value()["n"].as_u64().ok_or("no n")?.try_into()?;
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> oona::Result<()> {
//! let bus = Bus::new(oona::connect("memory://router-doc").await?);
//! let service = Router::new(&bus, "tamiyo")
//!     .with_state(Counts::default())
//!     .handler_timeout(Duration::from_secs(30)) // every route
//!     .route("telemetry.seed.health", on_report)
//!     // Options of one route: its concurrency, layers, codec, timeout.
//!     .route_with("control.tamiyo.command", |r| r.concurrency(1), on_command)
//!     .start()
//!     .await?;
//! bus.publish("telemetry.seed.health", &serde_json::json!({"seed": 1})).await?;
//! # while service.stats().acked < 1 { tokio::time::sleep(Duration::from_millis(1)).await; }
//! let summaries = service.shutdown().await?;
//! assert_eq!(summaries.iter().map(|(_, s)| s.acked).sum::<u64>(), 1);
//! # Ok(()) }
//! ```
//!
//! With a [`Node`](crate::node::Node), [`Node::serve`](crate::node::Node::serve)
//! starts the router, announces the node and drains on SIGTERM.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use oona_core::layer::ConsumeLayer;
use oona_core::{Codec, Error, Json, Name, Result, Subscription, Topic};

use crate::bus::IntoTopic;
use crate::handler::{Handler, HandlerResult, Incoming};
use crate::runner::{RunHandle, RunSummary, Runner, Shutdown};
use crate::Bus;

/// A handler a [`Router`] can call: `Fn(Incoming<T>)`, any [`Handler`],
/// or `Fn(Arc<S>, Incoming<T>)` given the router's state. `M` tells the
/// two shapes apart; it is inferred.
pub trait RouteHandler<S, T, M>: Send + Sync + 'static {
    /// The future of one call.
    type Future: Future<Output = HandlerResult> + Send + 'static;
    /// Handle one message.
    fn call(&self, state: &Arc<S>, msg: Incoming<T>) -> Self::Future;
}

/// [`RouteHandler`]'s shape for handlers that take only the message.
#[derive(Debug)]
pub enum WithoutState {}

/// [`RouteHandler`]'s shape for handlers that take the state first.
#[derive(Debug)]
pub enum WithState {}

impl<S, T, H: Handler<T>> RouteHandler<S, T, WithoutState> for H {
    type Future = H::Future;
    fn call(&self, _: &Arc<S>, msg: Incoming<T>) -> H::Future {
        Handler::call(self, msg)
    }
}

impl<S, T, F, Fut> RouteHandler<S, T, WithState> for F
where
    F: Fn(Arc<S>, Incoming<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    type Future = Fut;
    fn call(&self, state: &Arc<S>, msg: Incoming<T>) -> Fut {
        self(state.clone(), msg)
    }
}

/// A route handler bound to its state: a [`Handler`] for a runner.
struct Bound<S, H, M> {
    state: Arc<S>,
    handler: H,
    _m: std::marker::PhantomData<fn() -> M>,
}

impl<S, T, H, M> Handler<T> for Bound<S, H, M>
where
    S: Send + Sync + 'static,
    H: RouteHandler<S, T, M>,
    M: 'static,
{
    type Future = H::Future;
    fn call(&self, msg: Incoming<T>) -> H::Future {
        self.handler.call(&self.state, msg)
    }
}

/// The options every route of a router starts from.
#[derive(Clone, Default)]
struct Defaults {
    concurrency: Option<usize>,
    timeout: Option<Duration>,
    layers: Vec<Arc<dyn ConsumeLayer>>,
}

impl Defaults {
    fn apply<T: Send + 'static, C: Codec<T>>(&self, mut r: Runner<T, C>) -> Runner<T, C> {
        if let Some(n) = self.concurrency {
            r = r.concurrency(n);
        }
        if let Some(t) = self.timeout {
            r = r.handler_timeout(t);
        }
        for l in &self.layers {
            r = r.layer_arc(l.clone());
        }
        r
    }
}

/// A route waiting for [`Router::start`]: it makes its runner from the
/// router's defaults and token, then starts it.
type Pending = Box<dyn FnOnce(&Defaults, Shutdown) -> BoxFuture<'static, Result<RunHandle>> + Send>;

/// Topics to handlers in one service (see the [module docs](self)).
#[must_use = "a router does nothing until .start() or Node::serve"]
pub struct Router<S = ()> {
    bus: Bus,
    group: String,
    state: Arc<S>,
    defaults: Defaults,
    shutdown: Shutdown,
    routes: Vec<(String, Pending)>,
}

impl<S> fmt::Debug for Router<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("group", &self.group)
            .field(
                "routes",
                &self.routes.iter().map(|r| &r.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Router<()> {
    /// A router consuming as `group` (the service's name): every route is
    /// a subscription of that group unless its options say otherwise. A
    /// name that does not validate fails at [`Router::start`].
    pub fn new(bus: &Bus, group: impl Into<String>) -> Router<()> {
        Router {
            bus: bus.clone(),
            group: group.into(),
            state: Arc::new(()),
            defaults: Defaults::default(),
            shutdown: Shutdown::new(),
            routes: Vec::new(),
        }
    }

    /// Share `state` with every handler that takes it (`Arc<S>`, no
    /// cloning of yours). Call before adding routes.
    pub fn with_state<S: Send + Sync + 'static>(self, state: S) -> Router<S> {
        Router {
            bus: self.bus,
            group: self.group,
            state: Arc::new(state),
            defaults: self.defaults,
            shutdown: self.shutdown,
            routes: self.routes,
        }
    }
}

impl<S: Send + Sync + 'static> Router<S> {
    /// Every route runs at most `n` handler calls at once (default 1; per-key
    /// order holds at any concurrency).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.defaults.concurrency = Some(n);
        self
    }

    /// Every route's handler calls get at most `limit` (see
    /// [`Runner::handler_timeout`]).
    pub fn handler_timeout(mut self, limit: Duration) -> Self {
        self.defaults.timeout = Some(limit);
        self
    }

    /// A consume layer around every route's handler (inside the bus's).
    pub fn layer(mut self, layer: impl ConsumeLayer) -> Self {
        self.defaults.layers.push(Arc::new(layer));
        self
    }

    /// Stop on `shutdown` (shared with other runners of the service).
    pub fn shutdown_on(mut self, shutdown: Shutdown) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// The token the routes stop on.
    pub fn shutdown_token(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// The state the handlers share (clone it to read it from outside).
    pub fn state(&self) -> &Arc<S> {
        &self.state
    }

    /// The bus the routes consume from.
    pub(crate) fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The consumer group of the routes.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Handle `topic`'s messages, JSON-decoded into `T`, with `handler`.
    pub fn route<T, H, M>(self, topic: impl IntoTopic, handler: H) -> Self
    where
        T: Send + 'static,
        Json: Codec<T>,
        H: RouteHandler<S, T, M>,
        M: 'static,
    {
        self.route_with(topic, |r| r, handler)
    }

    /// [`Router::route`] with this route's own options: `options` gets the
    /// route's runner (the router's defaults applied) and returns it
    /// changed (`.concurrency(8)`, `.layer(..)`, `.handler_timeout(..)`,
    /// `.codec(..)`).
    pub fn route_with<T, C, H, M>(
        self,
        topic: impl IntoTopic,
        options: impl FnOnce(Runner<T, Json>) -> Runner<T, C> + Send + 'static,
        handler: H,
    ) -> Self
    where
        T: Send + 'static,
        Json: Codec<T>,
        C: Codec<T>,
        H: RouteHandler<S, T, M>,
        M: 'static,
    {
        self.route_topic(topic.into_topic(), options, handler)
    }

    /// [`Router::route_with`] for a topic already validated (or the error
    /// of validating it, returned by [`Router::start`]).
    pub(crate) fn route_topic<T, C, H, M>(
        self,
        topic: Result<Topic>,
        options: impl FnOnce(Runner<T, Json>) -> Runner<T, C> + Send + 'static,
        handler: H,
    ) -> Self
    where
        T: Send + 'static,
        Json: Codec<T>,
        C: Codec<T>,
        H: RouteHandler<S, T, M>,
        M: 'static,
    {
        let label = match &topic {
            Ok(t) => t.to_string(),
            Err(_) => "(invalid topic)".to_string(),
        };
        let subscription =
            topic.and_then(|t| Ok(Subscription::new(t, Name::new(self.group.as_str())?)));
        let bus = self.bus.clone();
        self.add(
            label,
            move |defaults| options(defaults.apply(Runner::new(bus, subscription, Json))),
            handler,
        )
    }

    /// Handle the messages of a contract type `T` (its topic, decoded by
    /// content type; see [`Bus::runner_contract`]).
    #[cfg(feature = "contracts")]
    pub fn contract<T, H, M>(self, handler: H) -> Self
    where
        T: oona_contracts::Message,
        H: RouteHandler<S, T, M>,
        M: 'static,
    {
        self.contract_with(|r| r, handler)
    }

    /// [`Router::contract`] with this route's own options (see
    /// [`Router::route_with`]).
    #[cfg(feature = "contracts")]
    pub fn contract_with<T, C, H, M>(
        self,
        options: impl FnOnce(Runner<T, oona_contracts::AnyCodec>) -> Runner<T, C> + Send + 'static,
        handler: H,
    ) -> Self
    where
        T: oona_contracts::Message,
        C: Codec<T>,
        H: RouteHandler<S, T, M>,
        M: 'static,
    {
        let (bus, group) = (self.bus.clone(), self.group.clone());
        self.add(
            T::topic().to_string(),
            move |defaults| options(defaults.apply(bus.runner_contract::<T>(group))),
            handler,
        )
    }

    fn add<T, C, H, M>(
        mut self,
        label: String,
        make: impl FnOnce(&Defaults) -> Runner<T, C> + Send + 'static,
        handler: H,
    ) -> Self
    where
        T: Send + 'static,
        C: Codec<T>,
        H: RouteHandler<S, T, M>,
        M: 'static,
    {
        let state = self.state.clone();
        let pending: Pending = Box::new(move |defaults, shutdown| {
            let runner = make(defaults).shutdown_on(shutdown);
            let bound = Bound {
                state,
                handler,
                _m: std::marker::PhantomData,
            };
            Box::pin(runner.start(bound))
        });
        self.routes.push((label, pending));
        self
    }

    /// Start every route (each subscribed when this returns). If one fails
    /// to start, those started are shut down and the error returned.
    pub async fn start(self) -> Result<Service> {
        let mut started: Vec<(String, RunHandle)> = Vec::new();
        for (label, pending) in self.routes {
            match pending(&self.defaults, self.shutdown.clone()).await {
                Ok(h) => started.push((label, h)),
                Err(e) => {
                    let failed = Service {
                        shutdown: self.shutdown,
                        routes: started,
                    };
                    let _ = failed.shutdown().await;
                    let message = format!("route {label}: {}", e.message());
                    return Err(Error::new(e.kind(), message).set_temporary(e.is_temporary()));
                }
            }
        }
        Ok(Service {
            shutdown: self.shutdown,
            routes: started,
        })
    }
}

/// A started [`Router`]: its routes' runners.
#[derive(Debug)]
pub struct Service {
    shutdown: Shutdown,
    routes: Vec<(String, RunHandle)>,
}

impl Service {
    /// The counts of every route added up.
    pub fn stats(&self) -> RunSummary {
        self.routes.iter().map(|(_, h)| h.stats()).sum()
    }

    /// Each route (its topic) with its counts.
    pub fn route_stats(&self) -> Vec<(String, RunSummary)> {
        self.routes
            .iter()
            .map(|(t, h)| (t.clone(), h.stats()))
            .collect()
    }

    /// The token the routes stop on.
    pub fn shutdown_token(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// The routes' runners, to hand to a node.
    #[cfg(feature = "contracts")]
    pub(crate) fn into_handles(self) -> Vec<RunHandle> {
        self.routes.into_iter().map(|(_, h)| h).collect()
    }

    /// Stop every route gracefully (no new work, in-flight handlers finish
    /// and settle) and return each route's summary.
    pub async fn shutdown(self) -> Result<Vec<(String, RunSummary)>> {
        self.shutdown.trigger();
        let mut out = Vec::new();
        for (t, h) in self.routes {
            out.push((t, h.join().await?));
        }
        Ok(out)
    }
}
