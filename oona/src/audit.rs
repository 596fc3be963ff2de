//! The dead-letter auditor: what lands on dead-letter topics, counted by
//! message type and reason, for operators.
//!
//! A [`DeadLetterAuditor`] reads the dead-letter topics it is given as a
//! consumer group of its own (`oona-dlq-auditor` unless set), so it takes
//! nothing away from other readers of those topics; it acks what it has
//! counted. It counts each dead letter by topic, message type (the
//! original's schema id, else its content type) and reason class (the
//! reason's first word, as in [`oona_core::metrics`]), keeps the last
//! dead letters as samples, exposes the counts as the metric
//! `oona_dlq_audited_total{topic,type,reason}` of the bus's [`Metrics`],
//! and publishes a report every so often on [`AUDIT_TOPIC`] (JSON, schema
//! id [`AUDIT_SCHEMA`]):
//!
//! ```json
//! {"auditor": "nissa", "at_unix_ms": 1796170000000,
//!  "counts": [{"topic": "compilation.blueprint.submitted.dlq",
//!              "type": "esper.v1.BlueprintSubmitted", "reason": "unsupported", "count": 12}],
//!  "samples": [{"topic": "compilation.blueprint.submitted.dlq", "event_id": "…",
//!               "type": "esper.v1.BlueprintSubmitted", "reason": "unsupported op 'quantum_conv'",
//!               "group": "tezzeret", "attempts": 1}]}
//! ```
//!
//! An entry on a dead-letter topic that is not a dead letter (no
//! `oona-dlq-*` headers: published there by hand) counts with reason
//! `not_a_dead_letter`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use oona_core::metrics::{reason_class, Counter, Family, Metrics};
use oona_core::rules::DeadLetterInfo;
use oona_core::{
    Envelope, Error, ErrorKind, Name, Result, StartPosition, Subscription, Timestamp, Topic,
};
use serde::{Deserialize, Serialize};

use oona_core::sync::lock;

use crate::runner::Shutdown;
use crate::Bus;

/// Where the auditor reports: `telemetry.oona.dead_letters`.
pub const AUDIT_TOPIC: &str = "telemetry.oona.dead_letters";

/// The schema id of the report.
pub const AUDIT_SCHEMA: &str = "oona.v1.DeadLetterAudit";

/// Dead letters of one topic, type and reason class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AuditCount {
    /// The dead-letter topic.
    pub topic: String,
    /// The original's schema id or content type.
    #[serde(rename = "type")]
    pub message_type: String,
    /// The reason class.
    pub reason: String,
    /// How many.
    pub count: u64,
}

/// One dead letter, as the auditor keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AuditSample {
    /// The dead-letter topic.
    pub topic: String,
    /// The original's event id.
    pub event_id: String,
    /// The original's schema id or content type.
    #[serde(rename = "type")]
    pub message_type: String,
    /// The whole reason.
    pub reason: String,
    /// The group that gave up on it.
    pub group: String,
    /// Its delivery attempts.
    pub attempts: u32,
}

/// What the auditor has seen (the report's JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AuditReport {
    /// The bus's sender id.
    pub auditor: String,
    /// When the report was made.
    pub at_unix_ms: u64,
    /// Counts, sorted by topic, type and reason.
    pub counts: Vec<AuditCount>,
    /// The last dead letters seen, newest last.
    pub samples: Vec<AuditSample>,
}

#[derive(Default)]
struct Tally {
    counts: BTreeMap<(String, String, String), u64>,
    samples: VecDeque<AuditSample>,
}

/// The auditor's settings (see the module docs).
#[derive(Debug, Clone)]
pub struct DeadLetterAuditor {
    bus: Bus,
    topics: Vec<Topic>,
    group: Name,
    start: StartPosition,
    every: Duration,
    keep: usize,
}

/// A running auditor; [`AuditHandle::report`] reads its counts.
#[derive(Debug)]
pub struct AuditHandle {
    tally: Arc<Mutex<Tally>>,
    auditor: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tally")
            .field("counts", &self.counts.len())
            .finish()
    }
}

impl DeadLetterAuditor {
    /// Dead letters kept as samples unless set.
    pub const DEFAULT_SAMPLES: usize = 20;

    /// An auditor on `bus` with no topics yet: group `oona-dlq-auditor`,
    /// from the earliest retained dead letter, a report every minute.
    pub fn new(bus: &Bus) -> Result<Self> {
        Ok(DeadLetterAuditor {
            bus: bus.clone(),
            topics: Vec::new(),
            group: Name::new("oona-dlq-auditor")?,
            start: StartPosition::Earliest,
            every: Duration::from_secs(60),
            keep: Self::DEFAULT_SAMPLES,
        })
    }

    /// Audit the dead-letter topic `topic` (a `….dlq` topic, else
    /// [`ErrorKind::ConfigInvalid`]).
    pub fn watch(mut self, topic: impl crate::IntoTopic) -> Result<Self> {
        let topic = topic.into_topic()?;
        if !topic.is_dead_letter() {
            return Err(Error::new(
                ErrorKind::ConfigInvalid,
                format!("{topic} is not a dead-letter topic (its last segment is not `dlq`)"),
            ));
        }
        self.topics.push(topic);
        Ok(self)
    }

    /// Read as consumer group `group`.
    pub fn group(mut self, group: Name) -> Self {
        self.group = group;
        self
    }

    /// Where a new auditor group starts.
    pub fn start_at(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }

    /// Publish a report every `every`.
    pub fn report_every(mut self, every: Duration) -> Self {
        self.every = every;
        self
    }

    /// Keep the last `n` dead letters as samples.
    pub fn samples(mut self, n: usize) -> Self {
        self.keep = n;
        self
    }

    /// Subscribe to every topic and count until `shutdown` fires; the
    /// reports and the metric start with it.
    pub async fn start(self, shutdown: Shutdown) -> Result<AuditHandle> {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let mut tasks = Vec::new();
        for topic in &self.topics {
            let sub = Subscription::new(topic.clone(), self.group.clone()).start(self.start);
            let stream = self.bus.subscribe_raw(sub).await?;
            let (tally, keep, stop) = (Arc::clone(&tally), self.keep, shutdown.clone());
            tasks.push(tokio::spawn(count_all(stream, tally, keep, stop)));
        }
        if let Some(m) = self.bus.metrics() {
            expose(m, &tally);
        }
        let auditor = self.bus.sender_id().to_string();
        let reader = (auditor.clone(), Arc::clone(&tally));
        tasks.push(tokio::spawn(report_forever(
            self.bus.clone(),
            reader,
            self.every,
            shutdown,
        )));
        Ok(AuditHandle {
            tally,
            auditor,
            tasks,
        })
    }
}

impl AuditHandle {
    /// What the auditor has seen so far.
    pub fn report(&self) -> AuditReport {
        report_of(&self.auditor, &self.tally)
    }

    /// Wait for the auditor's tasks to end (after its shutdown fired).
    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn report_of(auditor: &str, tally: &Mutex<Tally>) -> AuditReport {
    let t = lock(tally);
    AuditReport {
        auditor: auditor.to_string(),
        at_unix_ms: Timestamp::now().unix_millis(),
        counts: t
            .counts
            .iter()
            .map(|((topic, ty, reason), n)| AuditCount {
                topic: topic.clone(),
                message_type: ty.clone(),
                reason: reason.clone(),
                count: *n,
            })
            .collect(),
        samples: t.samples.iter().cloned().collect(),
    }
}

/// The sample of a dead letter (or of an entry that is none).
fn sample_of(e: &Envelope) -> AuditSample {
    let type_of = |e: &Envelope| {
        e.schema_id
            .clone()
            .unwrap_or_else(|| e.content_type.to_string())
    };
    match DeadLetterInfo::parse(e) {
        Some(info) => AuditSample {
            topic: e.topic.to_string(),
            event_id: info.original.event_id.to_string(),
            message_type: type_of(&info.original),
            reason: info.reason,
            group: info.group,
            attempts: info.attempts,
        },
        None => AuditSample {
            topic: e.topic.to_string(),
            event_id: e.event_id.to_string(),
            message_type: type_of(e),
            reason: "not_a_dead_letter".into(),
            group: String::new(),
            attempts: 0,
        },
    }
}

async fn count_all(
    mut stream: oona_core::DeliveryStream,
    tally: Arc<Mutex<Tally>>,
    keep: usize,
    shutdown: Shutdown,
) {
    loop {
        let next = tokio::select! {
            n = stream.next() => n,
            _ = shutdown.triggered() => break,
        };
        let d = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "dead-letter auditor: stream error");
                continue;
            }
            None => break,
        };
        let s = sample_of(d.envelope());
        {
            let mut t = lock(&tally);
            let key = (
                s.topic.clone(),
                s.message_type.clone(),
                reason_class(&s.reason).to_string(),
            );
            *t.counts.entry(key).or_default() += 1;
            t.samples.push_back(s);
            while t.samples.len() > keep {
                t.samples.pop_front();
            }
        }
        if let Err(e) = d.ack().await {
            tracing::warn!(error = %e, "dead-letter auditor: ack failed (counted again when redelivered)");
        }
    }
    stream.close().await;
}

/// The counts as `oona_dlq_audited_total` on `metrics`' page.
fn expose(metrics: &Metrics, tally: &Arc<Mutex<Tally>>) {
    let tally = Arc::clone(tally);
    metrics.collect("dlq_audit", move |out| {
        let f: Family<Counter> = Family::new(
            "oona_dlq_audited_total",
            "Dead letters seen by the auditor, by topic, message type and reason.",
            &["topic", "type", "reason"],
        );
        for ((topic, ty, reason), n) in &lock(&tally).counts {
            f.get(&[topic, ty, reason]).add(*n);
        }
        f.render(out);
    });
}

async fn report_forever(
    bus: Bus,
    (auditor, tally): (String, Arc<Mutex<Tally>>),
    every: Duration,
    shutdown: Shutdown,
) {
    crate::health::periodically(every, false, shutdown, move || {
        let (bus, auditor, report) = (bus.clone(), auditor.clone(), report_of(&auditor, &tally));
        async move {
            let sent = bus
                .message(AUDIT_TOPIC, &report)
                .key(auditor)
                .schema_id(AUDIT_SCHEMA)
                .send()
                .await;
            if let Err(e) = sent {
                tracing::warn!(error = %e, "dead-letter audit report not published");
            }
        }
    })
    .await
}
