//! Health snapshots of a service, and the periodic health event.
//!
//! [`Bus::health_snapshot`] gathers what an operator asks first: is the
//! broker reachable, are the runners running, how long do publishing and
//! delivery take (p50, p95, p99 from the bus's [`Metrics`]), how far
//! behind are the groups. [`Bus::report_health`] publishes one every so
//! often as JSON on [`HEALTH_TOPIC`], so a dashboard or a registry sees
//! every service without scraping each.
//!
//! The event (content type `application/json`, schema id
//! [`HEALTH_SCHEMA`]), for readers outside Rust:
//!
//! ```json
//! {"service": "tamiyo", "transport": "redis", "status": "up",
//!  "detail": "PING answered by 127.0.0.1:6379", "round_trip_ms": 0.4,
//!  "at_unix_ms": 1796170000000,
//!  "runners": [{"topic": "telemetry.seed.health", "group": "tamiyo", "running": true}],
//!  "publish": [{"topic": "control.kasmina.commands", "count": 12,
//!               "p50_ms": 0.8, "p95_ms": 2.1, "p99_ms": 4.0}],
//!  "delivery": [{"topic": "telemetry.seed.health", "group": "tamiyo", "count": 5000,
//!                "p50_ms": 3.0, "p95_ms": 9.5, "p99_ms": 20.0}]}
//! ```
//!
//! `status` is `up`, `degraded` or `down` ([`Bus::readiness`]); latency
//! lists are empty when the bus records no metrics.

use std::time::Duration;

use oona_core::metrics::{Metrics, Quantiles};
use oona_core::{HealthStatus, Result, Timestamp};
use serde::{Deserialize, Serialize};

use crate::runner::Shutdown;
use crate::Bus;

/// Where [`Bus::report_health`] publishes: `system.oona.health`.
pub const HEALTH_TOPIC: &str = "system.oona.health";

/// The schema id of the health event.
pub const HEALTH_SCHEMA: &str = "oona.v1.HealthSnapshot";

/// A service's health at one moment (see the module docs for its JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HealthSnapshot {
    /// The bus's sender id.
    pub service: String,
    /// The transport's name.
    pub transport: String,
    /// `up`, `degraded` or `down`.
    pub status: String,
    /// What the transport and the runners say.
    pub detail: String,
    /// The broker's round trip, when measured.
    pub round_trip_ms: Option<f64>,
    /// When the snapshot was taken.
    pub at_unix_ms: u64,
    /// The bus's handler runners.
    pub runners: Vec<RunnerHealth>,
    /// Publish latency by topic.
    pub publish: Vec<TopicLatency>,
    /// End-to-end latency by topic and group.
    pub delivery: Vec<TopicLatency>,
}

/// A handler runner in a [`HealthSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RunnerHealth {
    /// Its topic.
    pub topic: String,
    /// Its consumer group.
    pub group: String,
    /// `false` when it stopped by itself (its stream ended).
    pub running: bool,
}

/// Latency quantiles of a topic (and group, for deliveries).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TopicLatency {
    /// The topic.
    pub topic: String,
    /// The group, for deliveries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Observations.
    pub count: u64,
    /// Median, in milliseconds.
    pub p50_ms: f64,
    /// 95th percentile, in milliseconds.
    pub p95_ms: f64,
    /// 99th percentile, in milliseconds.
    pub p99_ms: f64,
}

impl TopicLatency {
    fn of(topic: String, group: Option<String>, q: Quantiles) -> Self {
        TopicLatency {
            topic,
            group,
            count: q.count,
            p50_ms: q.p50 * 1e3,
            p95_ms: q.p95 * 1e3,
            p99_ms: q.p99 * 1e3,
        }
    }
}

fn status_name(s: HealthStatus) -> &'static str {
    match s {
        HealthStatus::Up => "up",
        HealthStatus::Degraded => "degraded",
        _ => "down",
    }
}

/// Snapshots of `metrics`' latencies.
fn latencies(metrics: Option<&Metrics>) -> (Vec<TopicLatency>, Vec<TopicLatency>) {
    let Some(m) = metrics else {
        return (Vec::new(), Vec::new());
    };
    let publish = m
        .publish_latencies()
        .into_iter()
        .map(|(t, q)| TopicLatency::of(t, None, q))
        .collect();
    let delivery = m
        .delivery_latencies()
        .into_iter()
        .map(|(t, g, q)| TopicLatency::of(t, Some(g), q))
        .collect();
    (publish, delivery)
}

impl Bus {
    /// The service's health now (see [`crate::health`]).
    pub async fn health_snapshot(&self) -> HealthSnapshot {
        let h = self.readiness().await;
        let (publish, delivery) = latencies(self.metrics());
        HealthSnapshot {
            service: self.sender_id().to_string(),
            transport: h.transport.to_string(),
            status: status_name(h.status).to_string(),
            detail: h.detail,
            round_trip_ms: h.round_trip.map(|d| d.as_secs_f64() * 1e3),
            at_unix_ms: Timestamp::now().unix_millis(),
            runners: self
                .runners()
                .list()
                .into_iter()
                .map(|(topic, group, running)| RunnerHealth {
                    topic: topic.to_string(),
                    group: group.to_string(),
                    running,
                })
                .collect(),
            publish,
            delivery,
        }
    }

    /// Publish a [`HealthSnapshot`] on [`HEALTH_TOPIC`] every `every`
    /// (the first at once) until `shutdown` fires. A publish that fails is
    /// logged and the next one tried on time: the health event must not
    /// take a service down.
    pub fn report_health(
        &self,
        every: Duration,
        shutdown: Shutdown,
    ) -> tokio::task::JoinHandle<()> {
        let bus = self.clone();
        tokio::spawn(periodically(every, true, shutdown, move || {
            let bus = bus.clone();
            async move {
                if let Err(e) = bus.publish_health().await {
                    tracing::warn!(error = %e, "health event not published");
                }
            }
        }))
    }

    async fn publish_health(&self) -> Result<()> {
        let snapshot = self.health_snapshot().await;
        self.message(HEALTH_TOPIC, &snapshot)
            .key(snapshot.service.clone())
            .schema_id(HEALTH_SCHEMA)
            .send()
            .await
            .map(|_| ())
    }
}

/// Run `tick` every `period` (the first right away when `now`, else after
/// a period; a late tick delays the next) until `shutdown` fires.
pub(crate) async fn periodically<F, Fut>(
    period: Duration,
    now: bool,
    shutdown: Shutdown,
    mut tick: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut clock = tokio::time::interval(period.max(Duration::from_millis(10)));
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if !now {
        clock.tick().await;
    }
    loop {
        tokio::select! {
            _ = clock.tick() => {}
            _ = shutdown.triggered() => return,
        }
        tick().await;
    }
}
