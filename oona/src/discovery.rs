//! The live table of nodes: [`NodeRegistry`] (feature `contracts`).
//!
//! A registry reads the heartbeats of [`crate::node`] (and the
//! introspection events, for tags and capabilities) through a group of its
//! own, so every registry sees every node. A node joins with its first
//! heartbeat or announcement, leaves with its `stopped` heartbeat, and
//! expires when [`NodeRegistry::missed`] heartbeats in a row (3 unless
//! set) do not arrive. [`RegistryHandle::table`] is the table now;
//! [`RegistryHandle::events`] tells joins, leaves and expiries as they
//! happen.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use oona_contracts::{AnyCodec, Message as _, NodeIntrospectionEvent};
use oona_core::{
    Codec as _, Delivery, DeliveryStream, Json, Name, Result, StartPosition, Subscription, Topic,
};
use tokio::sync::broadcast;

use crate::node::{Heartbeat, HEARTBEAT_TOPIC};
use crate::runner::Shutdown;
use crate::Bus;

/// One node in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeEntry {
    /// The node instance.
    pub node_id: String,
    /// The service.
    pub node_name: String,
    /// Its version.
    pub version: String,
    /// Its last status (`up`, `degraded`, `down`, `stopping`).
    pub status: String,
    /// Its discovery tags (from its announcement).
    pub tags: Vec<String>,
    /// Its health endpoint.
    pub health_endpoint: String,
    /// Heartbeats seen.
    pub heartbeats: u64,
    /// How long ago the last one arrived.
    pub last_seen: Duration,
}

/// A change of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeEvent {
    /// A node appeared.
    Joined(NodeEntry),
    /// A node said it stopped.
    Left(NodeEntry),
    /// A node missed its heartbeats.
    Expired(NodeEntry),
}

#[derive(Debug)]
struct Live {
    entry: NodeEntry,
    seen: Instant,
    interval: Duration,
}

#[derive(Debug, Default)]
struct Table(BTreeMap<String, Live>);

/// The registry's settings.
#[derive(Debug, Clone)]
#[must_use = "a registry does nothing until .start()"]
pub struct NodeRegistry {
    bus: Bus,
    missed: u32,
}

/// A running registry.
#[derive(Debug)]
pub struct RegistryHandle {
    table: Arc<Mutex<Table>>,
    events: broadcast::Sender<NodeEvent>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    bus: Bus,
    groups: [(&'static str, Name); 2],
}

impl NodeRegistry {
    /// A registry on `bus`.
    pub fn new(bus: &Bus) -> Self {
        NodeRegistry {
            bus: bus.clone(),
            missed: 3,
        }
    }

    /// Expire a node after this many missed heartbeats (at least 1).
    pub fn missed(mut self, n: u32) -> Self {
        self.missed = n.max(1);
        self
    }

    /// Subscribe (from now on) and keep the table until `shutdown`.
    pub async fn start(self, shutdown: Shutdown) -> Result<RegistryHandle> {
        // A group per topic: one Kafka group across two topics would share
        // (and rebalance) their partitions between its two consumers.
        let id = Name::unique("oona-registry");
        let groups = [
            (HEARTBEAT_TOPIC, Name::new(format!("{id}-heartbeats"))?),
            (
                NodeIntrospectionEvent::TOPIC.as_str(),
                Name::new(format!("{id}-announcements"))?,
            ),
        ];
        let table = Arc::new(Mutex::new(Table::default()));
        let (events, _) = broadcast::channel(256);
        let mut tasks = Vec::new();
        for (topic, group) in &groups {
            let sub =
                Subscription::new(Topic::new(*topic)?, group.clone()).start(StartPosition::Latest);
            let stream = self.bus.subscribe_raw(sub).await?;
            let (t, e, s) = (table.clone(), events.clone(), shutdown.clone());
            tasks.push(tokio::spawn(read(stream, t, e, s)));
        }
        let (t, e) = (table.clone(), events.clone());
        tasks.push(tokio::spawn(expire(t, e, self.missed, shutdown)));
        Ok(RegistryHandle {
            table,
            events,
            tasks,
            bus: self.bus,
            groups,
        })
    }
}

impl RegistryHandle {
    /// The nodes now, by name then id.
    pub fn table(&self) -> Vec<NodeEntry> {
        let t = oona_core::sync::lock(&self.table);
        let mut v: Vec<NodeEntry> =
            t.0.values()
                .map(|l| NodeEntry {
                    last_seen: l.seen.elapsed(),
                    ..l.entry.clone()
                })
                .collect();
        v.sort_by(|a, b| (&a.node_name, &a.node_id).cmp(&(&b.node_name, &b.node_id)));
        v
    }

    /// Joins, leaves and expiries from now on.
    pub fn events(&self) -> broadcast::Receiver<NodeEvent> {
        self.events.subscribe()
    }

    /// Wait for the registry to stop (after its shutdown fired), then
    /// delete its group where the transport can.
    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
        for (topic, group) in &self.groups {
            if let Ok(t) = Topic::new(*topic) {
                let _ = self.bus.transport().delete_group(&t, group).await;
            }
        }
    }
}

/// Read heartbeats or announcements into the table until `shutdown`.
async fn read(
    mut stream: DeliveryStream,
    table: Arc<Mutex<Table>>,
    events: broadcast::Sender<NodeEvent>,
    shutdown: Shutdown,
) {
    loop {
        let d = tokio::select! {
            _ = shutdown.triggered() => break,
            d = stream.next() => d,
        };
        match d {
            None => break,
            Some(Err(e)) => tracing::debug!(error = %e, "registry: delivery stream error"),
            Some(Ok(d)) => {
                let change = apply(&table, &d);
                if let Some(ev) = change {
                    let _ = events.send(ev);
                }
                if let Err(e) = d.ack().await {
                    tracing::debug!(error = %e, "registry: ack failed");
                }
            }
        }
    }
    stream.close().await;
}

/// Apply one delivery to the table; what changed, if a node joined or left.
fn apply(table: &Mutex<Table>, d: &Delivery) -> Option<NodeEvent> {
    let env = d.envelope();
    let mut t = oona_core::sync::lock(table);
    if env.topic.as_str() == HEARTBEAT_TOPIC {
        let hb: Heartbeat = match Json.decode(env) {
            Ok(hb) => hb,
            Err(e) => {
                tracing::warn!(error = %crate::node::bad_heartbeat(e), "registry: skipping a heartbeat");
                return None;
            }
        };
        if hb.status == "stopped" {
            return t.0.remove(&hb.node_id).map(|mut l| {
                l.entry.status = hb.status;
                NodeEvent::Left(l.entry)
            });
        }
        let interval = Duration::from_millis(hb.interval_ms);
        let fresh = !t.0.contains_key(&hb.node_id);
        let live = t.0.entry(hb.node_id.clone()).or_insert_with(|| Live {
            entry: entry(&hb.node_id, &hb.node_name, &hb.version),
            seen: Instant::now(),
            interval,
        });
        live.seen = Instant::now();
        live.interval = interval;
        live.entry.status = hb.status;
        live.entry.heartbeats += 1;
        live.entry.health_endpoint = hb.health_endpoint;
        return fresh.then(|| NodeEvent::Joined(live.entry.clone()));
    }
    let ev: NodeIntrospectionEvent = AnyCodec::json().decode(env).ok()?;
    let fresh = !t.0.contains_key(&ev.node_id);
    let live = t.0.entry(ev.node_id.clone()).or_insert_with(|| Live {
        entry: entry(&ev.node_id, &ev.node_name, &ev.version),
        seen: Instant::now(),
        interval: crate::node::NodeBuilder::DEFAULT_HEARTBEAT,
    });
    live.entry.tags = ev.tags;
    live.entry.health_endpoint = ev.health_endpoint;
    fresh.then(|| NodeEvent::Joined(live.entry.clone()))
}

fn entry(id: &str, name: &str, version: &str) -> NodeEntry {
    NodeEntry {
        node_id: id.to_string(),
        node_name: name.to_string(),
        version: version.to_string(),
        status: "up".into(),
        tags: Vec::new(),
        health_endpoint: String::new(),
        heartbeats: 0,
        last_seen: Duration::ZERO,
    }
}

/// Expire nodes whose heartbeats stopped, checking a few times per
/// shortest interval.
async fn expire(
    table: Arc<Mutex<Table>>,
    events: broadcast::Sender<NodeEvent>,
    missed: u32,
    shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            _ = shutdown.triggered() => return,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        let gone: Vec<NodeEntry> = {
            let mut t = oona_core::sync::lock(&table);
            let dead: Vec<String> =
                t.0.iter()
                    .filter(|(_, l)| l.seen.elapsed() > l.interval * missed)
                    .map(|(id, _)| id.clone())
                    .collect();
            dead.iter()
                .filter_map(|id| t.0.remove(id))
                .map(|l| l.entry)
                .collect()
        };
        for e in gone {
            let _ = events.send(NodeEvent::Expired(e));
        }
    }
}
