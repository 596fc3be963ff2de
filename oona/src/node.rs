//! A service on the bus: [`Node`] (feature `contracts`).
//!
//! A node is one running instance of a service. [`NodeBuilder::initialize`]
//! serves the health endpoints when `OONA_METRICS_ADDR` asks for them,
//! announces the node on `oona.nodes.introspection` (the
//! `NodeIntrospectionEvent` contract: id, name, version, capabilities,
//! protocols, tags, health endpoint) and heartbeats on [`HEARTBEAT_TOPIC`]
//! every [`NodeBuilder::heartbeat_every`]. Runners started with
//! [`Node::shutdown_token`] and handed to [`Node::attach`] are drained on
//! [`Node::shutdown`] (or [`Node::run_until_signal`], on SIGINT or
//! SIGTERM): they stop taking work, finish what is in flight, settle and
//! flush, within [`NodeBuilder::drain_timeout`]; then a last heartbeat says
//! `stopped` (the node leaves) and the bus closes. A node dropped without
//! shutting down stops heartbeating, as a crashed one does: registries
//! ([`crate::discovery::NodeRegistry`]) expire it after missed heartbeats.
//!
//! The heartbeat (JSON, schema id [`HEARTBEAT_SCHEMA`]), for readers
//! outside Rust:
//!
//! ```json
//! {"node_id": "5f0c…", "node_name": "tezzeret", "version": "1.4.0",
//!  "status": "up", "sequence": 12, "interval_ms": 5000,
//!  "at_unix_ms": 1796170000000, "health_endpoint": "http://10.0.0.7:9464/healthz"}
//! ```
//!
//! `status` is `up`, `degraded` or `down` ([`Bus::readiness`]), `stopping`
//! while the node drains and `stopped` when it leaves.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use oona_contracts::{NodeCapabilities, NodeIntrospectionEvent};
use oona_core::{Error, ErrorKind, HealthStatus, Result, Timestamp};
use serde::{Deserialize, Serialize};

use crate::router::Router;
use crate::runner::{RunHandle, RunSummary, Shutdown};
use crate::Bus;

/// Where nodes heartbeat: `oona.nodes.heartbeat`.
pub const HEARTBEAT_TOPIC: &str = "oona.nodes.heartbeat";

/// The schema id of the heartbeat.
pub const HEARTBEAT_SCHEMA: &str = "oona.v1.NodeHeartbeat/1";

/// One heartbeat (see the module docs for its JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Heartbeat {
    /// The node instance.
    pub node_id: String,
    /// The service.
    pub node_name: String,
    /// The service's version.
    pub version: String,
    /// `up`, `degraded`, `down`, `stopping` or `stopped`.
    pub status: String,
    /// 1 for the first heartbeat of the node, +1 for each after it.
    pub sequence: u64,
    /// How often the node heartbeats: a registry expires it after missing
    /// a few.
    pub interval_ms: u64,
    /// When it was sent.
    pub at_unix_ms: u64,
    /// Its health endpoint, if it serves one.
    pub health_endpoint: String,
}

/// How a node is described and run; [`Node::builder`] makes one.
#[derive(Debug, Clone)]
#[must_use = "a node builder does nothing until .initialize()"]
pub struct NodeBuilder {
    event: NodeIntrospectionEvent,
    heartbeat_every: Duration,
    drain_timeout: Duration,
}

impl NodeBuilder {
    /// Heartbeats every 5 s unless set.
    pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
    /// Runners get 30 s to drain unless set.
    pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

    /// Set the node id (a fresh UUID by default).
    pub fn node_id(mut self, id: impl Into<String>) -> Self {
        self.event.node_id = id.into();
        self
    }
    /// Add an action the node performs (`compile_blueprint`).
    pub fn action(mut self, a: impl Into<String>) -> Self {
        self.capabilities().actions.push(a.into());
        self
    }
    /// Add a protocol it speaks (`oona`, `http`).
    pub fn protocol(mut self, p: impl Into<String>) -> Self {
        self.capabilities().protocols.push(p.into());
        self
    }
    /// Add a fact about it (`domain` = `compilation`).
    pub fn metadata(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.capabilities().metadata.insert(k.into(), v.into());
        self
    }
    /// Add a discovery tag.
    pub fn tag(mut self, t: impl Into<String>) -> Self {
        self.event.tags.push(t.into());
        self
    }
    /// Its health endpoint (default: `http://<OONA_METRICS_ADDR>/healthz`
    /// when that is set).
    pub fn health_endpoint(mut self, e: impl Into<String>) -> Self {
        self.event.health_endpoint = e.into();
        self
    }
    /// How often to heartbeat (at least 10 ms).
    pub fn heartbeat_every(mut self, every: Duration) -> Self {
        self.heartbeat_every = every.max(Duration::from_millis(10));
        self
    }
    /// How long [`Node::shutdown`] waits for runners to drain.
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }

    fn capabilities(&mut self) -> &mut NodeCapabilities {
        self.event
            .capabilities
            .get_or_insert_with(NodeCapabilities::default)
    }

    /// Join the bus: serve the endpoints if `OONA_METRICS_ADDR` asks,
    /// announce the node, start heartbeating.
    pub async fn initialize(mut self, bus: Bus) -> Result<Node> {
        #[cfg(feature = "http")]
        crate::serve::from_env(&bus).await?;
        #[cfg(feature = "http")]
        if self.event.health_endpoint.is_empty() {
            if let Some(addr) = crate::serve::addr_from_env() {
                self.event.health_endpoint = format!("http://{addr}/healthz");
            }
        }
        bus.publish_contract(&self.event).await?;
        let beat = Heartbeat {
            node_id: self.event.node_id.clone(),
            node_name: self.event.node_name.clone(),
            version: self.event.version.clone(),
            status: String::new(),
            sequence: 0,
            interval_ms: u64::try_from(self.heartbeat_every.as_millis()).unwrap_or(u64::MAX),
            at_unix_ms: 0,
            health_endpoint: self.event.health_endpoint.clone(),
        };
        let beats = Arc::new(Mutex::new(beat));
        send(&bus, &beats, None).await?;
        let task = tokio::spawn(heartbeat(bus.clone(), beats.clone(), self.heartbeat_every));
        tracing::info!(node = %self.event.node_name, id = %self.event.node_id, version = %self.event.version, "node started");
        Ok(Node {
            bus,
            event: self.event,
            beats,
            heartbeat: Some(task),
            shutdown: Shutdown::new(),
            runners: Mutex::new(Vec::new()),
            drain_timeout: self.drain_timeout,
        })
    }
}

/// A running node (see the module docs).
#[derive(Debug)]
pub struct Node {
    bus: Bus,
    event: NodeIntrospectionEvent,
    beats: Arc<Mutex<Heartbeat>>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
    shutdown: Shutdown,
    runners: Mutex<Vec<RunHandle>>,
    drain_timeout: Duration,
}

/// What [`Node::shutdown`] did.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct NodeSummary {
    /// The drained runners' summaries.
    pub runners: Vec<RunSummary>,
    /// Runners that did not drain within the timeout (their unsettled
    /// messages are redelivered by the broker).
    pub not_drained: usize,
}

impl Node {
    /// A node of service `name` at `version`.
    pub fn builder(name: impl Into<String>, version: impl Into<String>) -> NodeBuilder {
        NodeBuilder {
            event: NodeIntrospectionEvent {
                node_id: uuid::Uuid::new_v4().to_string(),
                node_name: name.into(),
                version: version.into(),
                correlation_id: uuid::Uuid::new_v4().to_string(),
                ..Default::default()
            },
            heartbeat_every: NodeBuilder::DEFAULT_HEARTBEAT,
            drain_timeout: NodeBuilder::DEFAULT_DRAIN,
        }
    }

    /// The node's bus.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.event.node_id
    }

    /// The token its runners stop on: pass it to `Runner::shutdown_on`.
    pub fn shutdown_token(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Drain `runner` on shutdown.
    pub fn attach(&self, runner: RunHandle) {
        oona_core::sync::lock(&self.runners).push(runner);
    }

    /// Start `router`'s routes on this node's shutdown token, then
    /// [`Node::run_until_signal`]: the routes drain on SIGINT or SIGTERM.
    /// If a route fails to start, the node shuts down (it leaves the
    /// registry) and the error is returned.
    pub async fn serve<S: Send + Sync + 'static>(self, router: Router<S>) -> Result<NodeSummary> {
        match router.shutdown_on(self.shutdown_token()).start().await {
            Ok(service) => {
                let routes: Vec<String> = service.route_stats().into_iter().map(|r| r.0).collect();
                for h in service.into_handles() {
                    self.attach(h);
                }
                tracing::info!(node = %self.event.node_name, id = %self.event.node_id, ?routes, "node serving");
                self.run_until_signal().await
            }
            Err(e) => {
                tracing::error!(node = %self.event.node_name, error = %e, "a route did not start");
                let _ = self.shutdown().await;
                Err(e)
            }
        }
    }

    /// Run until SIGINT or SIGTERM (or the shutdown token fires), then
    /// [`Node::shutdown`].
    pub async fn run_until_signal(self) -> Result<NodeSummary> {
        tokio::select! {
            _ = shutdown_signal() => tracing::info!(node = %self.event.node_name, "signal: shutting down"),
            _ = self.shutdown.triggered() => {}
        }
        self.shutdown().await
    }

    /// Say `stopping`, stop the runners and wait for them to drain (within
    /// the drain timeout), say `stopped`, close the bus.
    pub async fn shutdown(mut self) -> Result<NodeSummary> {
        if let Some(t) = self.heartbeat.take() {
            t.abort();
        }
        let _ = send(&self.bus, &self.beats, Some("stopping")).await;
        self.shutdown.trigger();
        let runners = std::mem::take(&mut *oona_core::sync::lock(&self.runners));
        let mut summary = NodeSummary::default();
        for r in runners {
            match tokio::time::timeout(self.drain_timeout, r.shutdown()).await {
                Ok(Ok(s)) => summary.runners.push(s),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "a runner failed while draining");
                    summary.not_drained += 1;
                }
                Err(_) => summary.not_drained += 1,
            }
        }
        let left = send(&self.bus, &self.beats, Some("stopped")).await;
        let closed = self.bus.close().await;
        tracing::info!(node = %self.event.node_name, id = %self.event.node_id, not_drained = summary.not_drained, "node stopped");
        left.and(closed)?;
        Ok(summary)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Dropped without shutdown: no more heartbeats, as when crashed.
        if let Some(t) = self.heartbeat.take() {
            t.abort();
        }
    }
}

/// Publish the next heartbeat, with `status` or the bus's readiness.
async fn send(bus: &Bus, beats: &Mutex<Heartbeat>, status: Option<&str>) -> Result<()> {
    let status = match status {
        Some(s) => s.to_string(),
        None => match bus.readiness().await.status {
            HealthStatus::Up => "up",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Down => "down",
        }
        .to_string(),
    };
    let beat = {
        let mut b = oona_core::sync::lock(beats);
        b.sequence += 1;
        b.status = status;
        b.at_unix_ms = Timestamp::now().unix_millis();
        b.clone()
    };
    let key = beat.node_id.clone();
    bus.message(HEARTBEAT_TOPIC, &beat)
        .key(key)
        .schema_id(HEARTBEAT_SCHEMA)
        .send()
        .await
        .map(|_| ())
}

/// Heartbeat every `every`; a failed one is logged and the next tried on
/// time.
async fn heartbeat(bus: Bus, beats: Arc<Mutex<Heartbeat>>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = send(&bus, &beats, None).await {
            tracing::warn!(error = %e, "oona: a heartbeat failed");
        }
    }
}

/// Wait for SIGINT or SIGTERM (SIGINT only off Unix); forever where no
/// signal can be watched.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    if tokio::signal::ctrl_c().await.is_err() {
        // No signal handling here: wait for the shutdown token instead.
        std::future::pending::<()>().await;
    }
}

/// The error of a heartbeat that cannot be decoded.
pub(crate) fn bad_heartbeat(e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Decode, format!("heartbeat: {e}"))
}
