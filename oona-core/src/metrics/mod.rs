//! Metrics: what a bus published and handled, how long it took, how far
//! its groups are behind, and what the degradation layers did, in the
//! Prometheus text format.
//!
//! [`Metrics`] is a publish layer and a consume layer at once (the `oona`
//! facade's `Bus::with_metrics` adds it outermost on both paths, so it
//! times everything, signing and claim-checks included). Each series is
//! labelled by topic (the name the publisher used; lanes count under
//! their topic) and, on the consume side, by consumer group:
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `oona_publish_duration_seconds` | histogram: one observation per publish call (a batch is one) | topic |
//! | `oona_published_total` | counter | topic |
//! | `oona_publish_errors_total` | counter | topic, kind ([`crate::ErrorKind::as_str`]) |
//! | `oona_delivery_latency_seconds` | histogram: publish time to the handler's start (end to end; clocks of hosts apart) | topic, group |
//! | `oona_handler_duration_seconds` | histogram | topic, group |
//! | `oona_handled_total` | counter | topic, group, outcome (`ack`, `nack`, `reject`; `settle_error` when the broker did not take the settlement) |
//! | `oona_redeliveries_total` | counter: deliveries at attempt 2 on | topic, group |
//! | `oona_dead_letters_total` | counter | topic, group, reason (the reason's first word when it is one: `decode`, `replay`, `max_attempts`, ...; else `other`) |
//! | `oona_group_backlog` / `oona_group_pending` | gauge ([`Metrics::sample_depths`]) | topic, group |
//!
//! and, for what [`Metrics::watch_flow`], [`Metrics::watch_reroute`] and
//! [`Metrics::watch_spooled`] were given, `oona_flow_in_flight`,
//! `oona_flow_waited_total`, `oona_flow_timed_out_total`,
//! `oona_dropped_total{topic}`, `oona_rerouted_total{topic}`,
//! `oona_spool_records`, `oona_spool_bytes`, `oona_spooled_total`,
//! `oona_breaker_state` (0 closed, 1 half-open, 2 open) and
//! `oona_breaker_conservative`.
//!
//! Series are never dropped but for [`Metrics::forget_group`]: topics and
//! groups must be few (the platform's names), not made per message.
//!
//! Latency buckets run from 100 µs to 30 s ([`LATENCY_BUCKETS`]); the
//! p50, p95 and p99 of a series are read in the process with
//! [`Metrics::publish_latency`] and [`Metrics::delivery_latency`], and by
//! Prometheus with `histogram_quantile`.

mod registry;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;

use crate::degrade::{BreakerState, Spooled};
use crate::delivery::{Delivery, Outcome};
use crate::envelope::{Envelope, Timestamp};
use crate::error::Result;
use crate::flow::FlowControl;
use crate::layer::{ConsumeLayer, ConsumeNext, Handled, PublishLayer, PublishNext};
use crate::priority::Reroute;
use crate::sync::lock;
use crate::topic::{Name, Topic};
use crate::transport::{Receipt, Transport};

pub use registry::{Counter, Family, Gauge, Histogram, Kind, Labels, Metric, LATENCY_BUCKETS};

/// The `Content-Type` of [`Metrics::render`]'s page.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The p50, p95 and p99 of a latency histogram, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Quantiles {
    /// Observations counted.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl Quantiles {
    fn of(h: &Histogram) -> Option<Quantiles> {
        let q = h.quantiles(&[0.5, 0.95, 0.99])?;
        Some(Quantiles {
            count: h.count(),
            p50: q[0],
            p95: q[1],
            p99: q[2],
        })
    }
}

type Collector = Box<dyn Fn(&mut String) + Send + Sync>;

struct Inner {
    publish_seconds: Family<Histogram>,
    published: Family<Counter>,
    publish_errors: Family<Counter>,
    delivery_latency: Family<Histogram>,
    handler_seconds: Family<Histogram>,
    handled: Family<Counter>,
    redeliveries: Family<Counter>,
    dead_letters: Family<Counter>,
    backlog: Family<Gauge>,
    pending: Family<Gauge>,
    /// By what they expose: watching a second one of a kind replaces the
    /// first (a page must not repeat a family).
    collectors: Mutex<Vec<(&'static str, Collector)>>,
}

/// A bus's metrics (see the module docs). Cheap to clone; clones share
/// the series.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

const TG: &[&str] = &["topic", "group"];

impl Metrics {
    /// Empty metrics.
    pub fn new() -> Self {
        Metrics {
            inner: Arc::new(Inner {
                publish_seconds: Family::new(
                    "oona_publish_duration_seconds",
                    "Time to publish, until the broker took the message.",
                    &["topic"],
                ),
                published: Family::new("oona_published_total", "Messages published.", &["topic"]),
                publish_errors: Family::new(
                    "oona_publish_errors_total",
                    "Publishes that failed, by error kind.",
                    &["topic", "kind"],
                ),
                delivery_latency: Family::new(
                    "oona_delivery_latency_seconds",
                    "From the message's publish time to its handler's start.",
                    TG,
                ),
                handler_seconds: Family::new(
                    "oona_handler_duration_seconds",
                    "Time in the handler and its settlement.",
                    TG,
                ),
                handled: Family::new(
                    "oona_handled_total",
                    "Deliveries handled, by outcome.",
                    &["topic", "group", "outcome"],
                ),
                redeliveries: Family::new(
                    "oona_redeliveries_total",
                    "Deliveries at attempt 2 or later.",
                    TG,
                ),
                dead_letters: Family::new(
                    "oona_dead_letters_total",
                    "Deliveries dead-lettered, by reason.",
                    &["topic", "group", "reason"],
                ),
                backlog: Family::new(
                    "oona_group_backlog",
                    "Messages not handed to the group yet (sampled).",
                    TG,
                ),
                pending: Family::new(
                    "oona_group_pending",
                    "Messages handed to the group and not settled (sampled).",
                    TG,
                ),
                collectors: Mutex::default(),
            }),
        }
    }

    /// The process's metrics, shared by every bus that asks (the facade's
    /// buses use them when `OONA_METRICS_ADDR` is set).
    pub fn global() -> Metrics {
        static GLOBAL: std::sync::OnceLock<Metrics> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(Metrics::new).clone()
    }

    /// The page Prometheus scrapes ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let i = &self.inner;
        let mut out = String::with_capacity(4096);
        i.publish_seconds.render(&mut out);
        i.published.render(&mut out);
        i.publish_errors.render(&mut out);
        i.delivery_latency.render(&mut out);
        i.handler_seconds.render(&mut out);
        i.handled.render(&mut out);
        i.redeliveries.render(&mut out);
        i.dead_letters.render(&mut out);
        i.backlog.render(&mut out);
        i.pending.render(&mut out);
        for (_, c) in lock(&i.collectors).iter() {
            c(&mut out);
        }
        out
    }

    /// The publish latency of `topic` so far.
    pub fn publish_latency(&self, topic: &Topic) -> Option<Quantiles> {
        Quantiles::of(&self.inner.publish_seconds.get(&[topic.as_str()]))
    }

    /// The end-to-end latency of `group` on `topic` so far.
    pub fn delivery_latency(&self, topic: &Topic, group: &Name) -> Option<Quantiles> {
        let h = self
            .inner
            .delivery_latency
            .get(&[topic.as_str(), group.as_str()]);
        Quantiles::of(&h)
    }

    /// The publish latency of every topic published to, by topic.
    pub fn publish_latencies(&self) -> Vec<(String, Quantiles)> {
        let mut out: Vec<(String, Quantiles)> = self
            .inner
            .publish_seconds
            .snapshot()
            .into_iter()
            .filter_map(|(mut l, h)| Some((l.pop()?, Quantiles::of(&h)?)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The end-to-end latency of every group that handled something, by
    /// topic and group.
    pub fn delivery_latencies(&self) -> Vec<(String, String, Quantiles)> {
        let mut out: Vec<(String, String, Quantiles)> = self
            .inner
            .delivery_latency
            .snapshot()
            .into_iter()
            .filter_map(|(l, h)| {
                let [topic, group] = <[String; 2]>::try_from(l).ok()?;
                Some((topic, group, Quantiles::of(&h)?))
            })
            .collect();
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }

    /// How many messages were published to `topic`.
    pub fn published(&self, topic: &Topic) -> u64 {
        self.inner.published.get(&[topic.as_str()]).get()
    }

    /// How many deliveries of `topic` were dead-lettered by `group` with a
    /// reason of class `reason`.
    pub fn dead_letters(&self, topic: &Topic, group: &Name, reason: &str) -> u64 {
        let labels = [topic.as_str(), group.as_str(), reason];
        self.inner.dead_letters.get(&labels).get()
    }

    /// Read the depth of each `(topic, group)` from `transport` into the
    /// backlog and pending gauges. A group the transport cannot tell about
    /// keeps its last figures; the errors are returned for logging.
    pub async fn sample_depths(
        &self,
        transport: &dyn Transport,
        groups: &[(Topic, Name)],
    ) -> Vec<crate::Error> {
        let mut errors = Vec::new();
        for (topic, group) in groups {
            match transport.depth(topic, group).await {
                Ok(d) => {
                    let labels = [topic.as_str(), group.as_str()];
                    self.inner.backlog.get(&labels).set(gauge(d.backlog));
                    self.inner.pending.get(&labels).set(gauge(d.pending));
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    /// Expose what `flow` did: in flight, waits, time-outs and drops by
    /// topic.
    pub fn watch_flow(&self, flow: &FlowControl) {
        let flow = flow.clone();
        self.collect("flow", move |out| {
            let c = flow.counts();
            simple(
                out,
                "oona_flow_in_flight",
                "Publishes on their way.",
                Kind::Gauge,
                c.in_flight,
            );
            simple(
                out,
                "oona_flow_waited_total",
                "Publishes that waited for room.",
                Kind::Counter,
                c.waited,
            );
            simple(
                out,
                "oona_flow_timed_out_total",
                "Publishes refused after waiting.",
                Kind::Counter,
                c.timed_out,
            );
            by_topic(
                out,
                "oona_dropped_total",
                "Publishes dropped by a drop policy.",
                flow.dropped_by_topic(),
            );
        });
    }

    /// Expose what `reroute` did: reroutes by topic.
    pub fn watch_reroute(&self, reroute: &Reroute) {
        let reroute = reroute.clone();
        self.collect("reroute", move |out| {
            by_topic(
                out,
                "oona_rerouted_total",
                "Normal messages raised to the emergency lane by depth.",
                reroute.rerouted_by_topic(),
            );
        });
    }

    /// Expose `spooled`'s spool and breaker.
    pub fn watch_spooled(&self, spooled: Arc<Spooled>) {
        self.collect("spooled", move |out| {
            let s = spooled.stats();
            let state = match s.breaker {
                BreakerState::Closed => 0,
                BreakerState::HalfOpen => 1,
                BreakerState::Open => 2,
            };
            simple(
                out,
                "oona_spool_records",
                "Records waiting in the spool.",
                Kind::Gauge,
                s.spool.records,
            );
            simple(
                out,
                "oona_spool_bytes",
                "Bytes waiting in the spool.",
                Kind::Gauge,
                s.spool.bytes,
            );
            simple(
                out,
                "oona_spooled_total",
                "Publishes written to the spool.",
                Kind::Counter,
                s.spooled,
            );
            simple(
                out,
                "oona_breaker_state",
                "0 closed, 1 half-open, 2 open.",
                Kind::Gauge,
                state,
            );
            simple(
                out,
                "oona_breaker_conservative",
                "1 just after an outage.",
                Kind::Gauge,
                u64::from(s.conservative),
            );
        });
    }

    /// Add `f` to what [`Metrics::render`] writes, after the built-in
    /// families: it appends whole families (`# HELP`, `# TYPE`, samples;
    /// [`Family::render`] does it). One collector per `what`: a second of
    /// the same name replaces the first, so a page never repeats a family.
    pub fn collect(&self, what: &'static str, f: impl Fn(&mut String) + Send + Sync + 'static) {
        let mut collectors = lock(&self.inner.collectors);
        collectors.retain(|(w, _)| *w != what);
        collectors.push((what, Box::new(f)));
    }

    /// Forget the sampled depth of `group` on `topic` (its runners
    /// stopped), so the page does not show a stale figure.
    pub fn forget_group(&self, topic: &Topic, group: &Name) {
        let labels = [topic.as_str(), group.as_str()];
        self.inner.backlog.remove(&labels);
        self.inner.pending.remove(&labels);
    }

    fn record_handled(&self, topic: &str, group: &str, handled: &Handled, took: f64) {
        let i = &self.inner;
        i.handler_seconds.get(&[topic, group]).observe(took);
        if handled.settled.is_err() {
            // The broker did not take the settlement: the message comes
            // back, nothing was acked or dead-lettered.
            i.handled.get(&[topic, group, "settle_error"]).inc();
            return;
        }
        let (outcome, reason) = match &handled.outcome {
            Outcome::Ack => ("ack", ""),
            Outcome::Nack { .. } => ("nack", "max_attempts"),
            Outcome::Reject { reason } => ("reject", reason_class(reason)),
        };
        i.handled.get(&[topic, group, outcome]).inc();
        if handled.dead_lettered {
            i.dead_letters.get(&[topic, group, reason]).inc();
        }
    }
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// One unlabelled sample with its `# HELP` and `# TYPE`.
fn simple(out: &mut String, name: &'static str, help: &'static str, kind: Kind, v: u64) {
    if kind == Kind::Counter {
        let f: Family<Counter> = Family::new(name, help, &[]);
        f.get(&[]).add(v);
        f.render(out);
    } else {
        let f: Family<Gauge> = Family::new(name, help, &[]);
        f.get(&[]).set(gauge(v));
        f.render(out);
    }
}

/// A counter family by topic, from counts kept elsewhere.
fn by_topic(
    out: &mut String,
    name: &'static str,
    help: &'static str,
    counts: std::collections::HashMap<Topic, u64>,
) {
    let f: Family<Counter> = Family::new(name, help, &["topic"]);
    for (topic, n) in counts {
        f.get(&[topic.as_str()]).add(n);
    }
    f.render(out);
}

/// The class of a dead-letter reason, a label of few values: its first
/// word if that is letters and `_` only (`decode: ...` → `decode`,
/// `unsupported op 'x'` → `unsupported`), at most 32 long; else `other`.
/// Reasons that start with data (an id, a number) all count as `other`:
/// handlers should open their reasons with a fixed word.
pub fn reason_class(reason: &str) -> &str {
    let end = reason
        .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
        .unwrap_or(reason.len());
    let word = &reason[..end];
    let ends_word = reason[end..]
        .chars()
        .next()
        .is_none_or(|c| c == ':' || c.is_whitespace());
    if word.is_empty() || word.len() > 32 || !ends_word {
        "other"
    } else {
        word
    }
}

/// Each topic of a publish once, with how many of its envelopes it had.
fn counted(mut topics: Vec<Topic>) -> Vec<(u64, Topic)> {
    topics.sort();
    let mut out: Vec<(u64, Topic)> = Vec::new();
    for t in topics {
        match out.last_mut() {
            Some((n, last)) if *last == t => *n += 1,
            _ => out.push((1, t)),
        }
    }
    out
}

/// Seconds since `t`, 0 for a time in the future (another host's clock).
fn since(t: Timestamp) -> f64 {
    let now = Timestamp::now().unix_millis();
    now.saturating_sub(t.unix_millis()) as f64 / 1000.0
}

#[async_trait]
impl PublishLayer for Metrics {
    async fn publish(
        &self,
        envelopes: Vec<Envelope>,
        next: PublishNext<'_>,
    ) -> Result<Vec<Receipt>> {
        let topics: Vec<Topic> = envelopes.iter().map(|e| e.topic.clone()).collect();
        let started = Instant::now();
        let result = next.run(envelopes).await;
        let took = started.elapsed().as_secs_f64();
        let i = &self.inner;
        for (n, t) in counted(topics) {
            match &result {
                Ok(_) => {
                    i.published.get(&[t.as_str()]).add(n);
                    // One call, one duration, whatever the batch's size.
                    i.publish_seconds.get(&[t.as_str()]).observe(took);
                }
                Err(e) => i
                    .publish_errors
                    .get(&[t.as_str(), e.kind().as_str()])
                    .add(n),
            }
        }
        result
    }
}

#[async_trait]
impl ConsumeLayer for Metrics {
    async fn handle(&self, delivery: Delivery, next: ConsumeNext<'_>) -> Handled {
        let topic = delivery.envelope().topic.clone();
        let group = delivery.info().group.clone();
        let labels = [topic.as_str(), group.as_str()];
        if delivery.attempt() > 1 {
            self.inner.redeliveries.get(&labels).inc();
        }
        let latency = since(delivery.envelope().timestamp);
        self.inner.delivery_latency.get(&labels).observe(latency);
        let started = Instant::now();
        let handled = next.run(delivery).await;
        let took = started.elapsed().as_secs_f64();
        self.record_handled(topic.as_str(), group.as_str(), &handled, took);
        handled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_classed_by_their_first_word() {
        assert_eq!(reason_class("decode: not an envelope"), "decode");
        assert_eq!(reason_class("unsupported op 'quantum_conv'"), "unsupported");
        assert_eq!(reason_class("max_attempts"), "max_attempts");
        for data in [
            "12345: bad order",
            "Replay: stale",
            "  spaces",
            "bp-7: x",
            "",
        ] {
            assert_eq!(reason_class(data), "other", "{data:?}");
        }
        assert_eq!(reason_class(&"x".repeat(100)), "other");
    }

    #[test]
    fn a_second_watch_of_a_kind_replaces_the_first() {
        let m = Metrics::new();
        m.watch_flow(&FlowControl::new(4));
        m.watch_flow(&FlowControl::new(8));
        let page = m.render();
        assert_eq!(
            page.matches("# TYPE oona_flow_in_flight gauge").count(),
            1,
            "{page}"
        );
    }
}
