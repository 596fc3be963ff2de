//! Rerouting by depth: while a consumer group is too far behind on a
//! topic, new normal messages for it travel on its emergency lane.
//!
//! The prototype's priority routing. A [`Reroute`] publish layer watches
//! the depth ([`Transport::depth`]) of the groups its rules name; while a
//! group's depth passes the rule's threshold, each [`Priority::Normal`]
//! message published to the rule's topics is raised to
//! [`Priority::Emergency`], so it goes to the topic's emergency lane and
//! overtakes the backlog: fresh work is not stuck behind stale work. Only
//! topics with priority lanes ([`crate::TopicPolicy::with_priority_lanes`])
//! are rerouted; `Low` and urgent messages keep their priority.
//!
//! What a user gives up for it: order per key across the reroute (a
//! rerouted message overtakes older messages of its key), which is why it
//! is off unless a rule turns it on.
//!
//! Each rerouted envelope carries the header `oona-rerouted` with the
//! depth that rerouted it; each reroute is counted (in all and per topic)
//! and sent to [`Reroute::events`]. Depths are sampled, not read per
//! publish: a publish uses the last sample of its topic and, when that is
//! older than [`Reroute::sample_every`] (1 s), starts a fresh one in the
//! background; until a first sample lands, while a group has not
//! subscribed yet, and when the last sample is stale (reads failing or
//! taking over 5 s) nothing is rerouted. Add the layer before a signing
//! layer, so signatures cover the raised priority.
//!
//! ```
//! # async fn demo(bus_transport: std::sync::Arc<dyn oona_core::Transport>) -> oona_core::Result<()> {
//! use oona_core::priority::Reroute;
//! use oona_core::{Name, TopicPattern};
//! let reroute = Reroute::new(bus_transport)
//!     .when_deeper(TopicPattern::new("control.*")?, Name::new("kasmina")?, 1000);
//! // bus.with_publish_layer(reroute.clone()); reroute.events() to watch
//! # let _ = reroute;
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::envelope::{Envelope, EventId, Priority};
use crate::error::{ErrorKind, Result};
use crate::layer::{PublishLayer, PublishNext};
use crate::sync::lock;
use crate::topic::{Name, Topic, TopicPattern};
use crate::transport::{Receipt, Transport};

/// The header a rerouted envelope carries: the depth that rerouted it.
pub const REROUTED_HEADER: &str = "oona-rerouted";

/// A rule: the topics of `pattern` are rerouted while `group` has more
/// than `threshold` messages unsettled on them.
#[derive(Debug, Clone)]
struct Rule {
    pattern: TopicPattern,
    group: Name,
    threshold: u64,
}

/// A reroute, as [`Reroute::events`] announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Rerouted {
    /// The topic the message was published to.
    pub topic: Topic,
    /// The message.
    pub event_id: EventId,
    /// The group whose depth rerouted it.
    pub group: Name,
    /// That group's sampled depth ([`crate::Depth::total`]).
    pub depth: u64,
    /// The rule's threshold.
    pub threshold: u64,
}

#[derive(Default)]
struct Sample {
    /// The last depth read; `None` before the first read lands, or while
    /// the group has not subscribed.
    depth: Option<u64>,
    at: Option<Instant>,
    /// When the read under way began (one at a time per sample).
    reading_since: Option<Instant>,
}

/// A depth read that has not answered by then is given up.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Samples kept at most (topic and group pairs); past it, samples no
/// longer fresh are forgotten, and topics beyond it are not rerouted.
const MAX_SAMPLES: usize = 4096;

struct State {
    transport: Arc<dyn Transport>,
    samples: Mutex<HashMap<(Topic, Name), Sample>>,
    by_topic: Mutex<HashMap<Topic, u64>>,
    rerouted: AtomicU64,
    events: broadcast::Sender<Rerouted>,
}

/// The rerouting layer (see the module docs). Cheap to clone; clones share
/// the samples and the counts.
#[derive(Clone)]
pub struct Reroute {
    rules: Arc<[Rule]>,
    every: Duration,
    state: Arc<State>,
}

impl std::fmt::Debug for Reroute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reroute")
            .field("rules", &self.rules)
            .field("sample_every", &self.every)
            .field("rerouted", &self.rerouted())
            .finish()
    }
}

impl Reroute {
    /// How often a topic's depth is sampled unless set.
    pub const DEFAULT_SAMPLE_EVERY: Duration = Duration::from_secs(1);

    /// A layer with no rules yet, reading depths from `transport` (the
    /// bus's own: `bus.transport().clone()`).
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        Reroute {
            rules: Arc::new([]),
            every: Self::DEFAULT_SAMPLE_EVERY,
            state: Arc::new(State {
                transport,
                samples: Mutex::default(),
                by_topic: Mutex::default(),
                rerouted: AtomicU64::new(0),
                events: broadcast::channel(1024).0,
            }),
        }
    }

    /// Reroute normal messages of the topics of `pattern` while `group`
    /// has more than `threshold` messages unsettled on the topic. The
    /// first rule that matches a topic applies.
    pub fn when_deeper(mut self, pattern: TopicPattern, group: Name, threshold: u64) -> Self {
        let mut rules = self.rules.to_vec();
        rules.push(Rule {
            pattern,
            group,
            threshold,
        });
        self.rules = rules.into();
        self
    }

    /// Sample each topic's depth at most once per `d`.
    pub fn sample_every(mut self, d: Duration) -> Self {
        self.every = d;
        self
    }

    /// Reroutes so far.
    pub fn rerouted(&self) -> u64 {
        self.state.rerouted.load(Ordering::Relaxed)
    }

    /// Reroutes so far, by topic.
    pub fn rerouted_by_topic(&self) -> HashMap<Topic, u64> {
        lock(&self.state.by_topic).clone()
    }

    /// Watch reroutes as they happen (a watcher that falls 1024 behind
    /// misses the oldest; the counts stay exact).
    pub fn events(&self) -> broadcast::Receiver<Rerouted> {
        self.state.events.subscribe()
    }

    /// Read the depth of `topic` for its rule's group now, keep it as the
    /// topic's sample and return it: `None` when no rule covers the topic
    /// or the group has not subscribed yet.
    pub async fn sample(&self, topic: &Topic) -> Result<Option<u64>> {
        let Some(rule) = self.rule(topic) else {
            return Ok(None);
        };
        read(&self.state, topic.clone(), rule.group.clone()).await
    }

    fn rule(&self, topic: &Topic) -> Option<&Rule> {
        self.rules.iter().find(|r| r.pattern.matches(topic))
    }

    /// How long a sample counts: a depth older than that (its reads
    /// failing or hanging) reroutes nothing.
    fn fresh_for(&self) -> Duration {
        self.every.saturating_mul(3) + READ_TIMEOUT
    }

    /// The last sampled depth of `topic` for `rule`, if still fresh,
    /// starting a new read in the background when it is due.
    fn sampled(&self, topic: &Topic, rule: &Rule) -> Option<u64> {
        let key = (topic.clone(), rule.group.clone());
        let fresh_for = self.fresh_for();
        let mut samples = lock(&self.state.samples);
        if samples.len() >= MAX_SAMPLES && !samples.contains_key(&key) {
            samples.retain(|_, s| s.at.is_some_and(|at| at.elapsed() < fresh_for));
            if samples.len() >= MAX_SAMPLES {
                return None;
            }
        }
        let s = samples.entry(key.clone()).or_default();
        let due = s.at.is_none_or(|at| at.elapsed() >= self.every);
        // A read lost with its task (a panic, a runtime shut down) does
        // not hold the sample for good.
        let idle = s
            .reading_since
            .is_none_or(|since| since.elapsed() >= READ_TIMEOUT * 2);
        if due && idle {
            s.reading_since = Some(Instant::now());
            let state = Arc::clone(&self.state);
            tokio::spawn(async move {
                if let Err(e) = read(&state, key.0.clone(), key.1.clone()).await {
                    tracing::warn!(topic = %key.0, group = %key.1, error = %e, "reroute: depth not read");
                }
            });
        }
        s.depth
            .filter(|_| s.at.is_some_and(|at| at.elapsed() < fresh_for))
    }

    /// Raise the normal messages of rerouted topics; the reroutes made.
    fn raise(&self, envelopes: &mut [Envelope], next: &PublishNext<'_>) -> Vec<Rerouted> {
        let mut out = Vec::new();
        let Some(policies) = next.policies() else {
            return out;
        };
        for e in envelopes {
            if e.priority != Priority::Normal || !super::laned(&e.topic, policies) {
                continue;
            }
            let Some(rule) = self.rule(&e.topic) else {
                continue;
            };
            match self.sampled(&e.topic, rule) {
                Some(depth) if depth > rule.threshold => {
                    e.priority = Priority::Emergency;
                    e.headers.insert(REROUTED_HEADER.into(), depth.to_string());
                    out.push(Rerouted {
                        topic: e.topic.clone(),
                        event_id: e.event_id.clone(),
                        group: rule.group.clone(),
                        depth,
                        threshold: rule.threshold,
                    });
                }
                _ => {}
            }
        }
        out
    }

    fn count(&self, reroutes: Vec<Rerouted>) {
        if reroutes.is_empty() {
            return;
        }
        let mut by_topic = lock(&self.state.by_topic);
        for r in reroutes {
            self.state.rerouted.fetch_add(1, Ordering::Relaxed);
            *by_topic.entry(r.topic.clone()).or_default() += 1;
            tracing::info!(topic = %r.topic, event_id = %r.event_id, group = %r.group,
                depth = r.depth, threshold = r.threshold, "rerouted to the emergency lane");
            let _ = self.state.events.send(r);
        }
    }
}

/// Read the depth of `group` on `topic` into its sample, giving up
/// after [`READ_TIMEOUT`] (a failed read leaves none: an unknown depth
/// reroutes nothing).
async fn read(state: &State, topic: Topic, group: Name) -> Result<Option<u64>> {
    let asked = tokio::time::timeout(READ_TIMEOUT, state.transport.depth(&topic, &group)).await;
    let got = match asked {
        Ok(Ok(d)) => Ok(Some(d.total())),
        Ok(Err(e)) if e.kind() == ErrorKind::NotFound => Ok(None),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(crate::Error::new(
            ErrorKind::Timeout,
            format!("the depth of {group} on {topic} took over {READ_TIMEOUT:?}"),
        )),
    };
    let mut samples = lock(&state.samples);
    let s = samples.entry((topic, group)).or_default();
    s.reading_since = None;
    s.at = Some(Instant::now());
    s.depth = got.as_ref().ok().copied().flatten();
    got
}

#[async_trait]
impl PublishLayer for Reroute {
    async fn publish(
        &self,
        mut envelopes: Vec<Envelope>,
        next: PublishNext<'_>,
    ) -> Result<Vec<Receipt>> {
        let reroutes = self.raise(&mut envelopes, &next);
        let receipts = next.run(envelopes).await?;
        self.count(reroutes);
        Ok(receipts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryTransport;
    use crate::{PolicySet, Retention, StartPosition, Subscription, TopicPolicy};

    fn envelope(topic: &Topic, p: Priority) -> Envelope {
        Envelope::builder(topic.clone(), "{}").priority(p).build()
    }

    #[tokio::test]
    async fn only_normal_messages_of_laned_deep_topics_are_raised() {
        let t: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
        let laned = Topic::new("control.deep.cmd").unwrap();
        let plain = Topic::new("telemetry.deep.health").unwrap();
        let policies = PolicySet::default().with_plane(
            "control",
            TopicPolicy::new(Retention::Indefinite).with_priority_lanes(true),
        );
        let g = Name::new("g").unwrap();
        let reroute = Reroute::new(Arc::clone(&t))
            .when_deeper(TopicPattern::new("*").unwrap(), g.clone(), 2)
            .sample_every(Duration::from_secs(3600));
        let layers: Vec<Arc<dyn PublishLayer>> = vec![Arc::new(reroute.clone())];
        let publish = |e: Envelope| {
            let (layers, t, policies) = (&layers, &t, &policies);
            async move {
                PublishNext::new(layers, t.as_ref())
                    .with_policies(policies)
                    .run(vec![e])
                    .await
                    .unwrap()
                    .remove(0)
                    .topic
            }
        };
        assert_eq!(reroute.sample(&laned).await.unwrap(), None, "no group yet");
        for topic in [&laned, &plain] {
            let sub = Subscription::new(topic.clone(), g.clone()).start(StartPosition::Earliest);
            drop(t.subscribe(sub).await.unwrap());
            for _ in 0..3 {
                publish(envelope(topic, Priority::Normal)).await;
            }
        }
        // Three unsettled on each, over the threshold of two.
        assert_eq!(reroute.sample(&laned).await.unwrap(), Some(3));
        assert_eq!(reroute.sample(&plain).await.unwrap(), Some(3));
        let lane = super::super::lane_of(&laned, Priority::Emergency);
        assert_eq!(publish(envelope(&laned, Priority::Normal)).await, lane);
        assert_eq!(publish(envelope(&laned, Priority::Low)).await, laned);
        assert_eq!(publish(envelope(&plain, Priority::Normal)).await, plain);
        assert_eq!(reroute.rerouted(), 1);
        assert_eq!(reroute.rerouted_by_topic().get(&laned), Some(&1));
    }
}
