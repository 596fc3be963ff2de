//! Backpressure: a publish layer that bounds the publishes in flight, and
//! an explicit drop policy for the topics a user names.
//!
//! [`FlowControl`] lets at most `max_in_flight` messages be on their way to
//! the broker at once (a batch counts its messages). A publish past the
//! limit waits, in arrival order, for at most `max_wait` (5 s unless set),
//! then fails with [`ErrorKind::ResourceExhausted`] (temporary): the
//! caller slows down or tries later; nothing is dropped.
//!
//! Only on a topic given [`FlowControl::keep_newest`] may a publish be
//! dropped: of the single-message publishes waiting on that topic, the
//! newest `n` are kept, and the oldest beyond them fail with
//! [`ErrorKind::Dropped`] (telemetry, where the newest reading is worth
//! more than the oldest). Every drop is counted
//! ([`FlowControl::counts`], per topic in [`FlowControl::dropped_by_topic`]),
//! logged, and announced on [`FlowControl::events`]. A dropped publish
//! returns an error to its caller: a publish that returned `Ok` was taken
//! by the next layer.
//!
//! Work spooled by [`crate::degrade::Spooled`] is bounded by the spool's own
//! byte limit and its bounded wait (`WhenFull`).
//!
//! ```
//! # fn main() -> oona_core::Result<()> {
//! use std::time::Duration;
//! use oona_core::flow::FlowControl;
//! use oona_core::TopicPattern;
//! let flow = FlowControl::new(1024)
//!     .max_wait(Duration::from_secs(2))
//!     .keep_newest(TopicPattern::new("telemetry.*")?, 100);
//! // bus.with_publish_layer(flow.clone()); flow.events() to watch drops
//! # let _ = flow;
//! # Ok(())
//! # }
//! ```

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{broadcast, oneshot, Semaphore};

use crate::envelope::{Envelope, EventId};
use crate::error::{Error, ErrorKind, Result};
use crate::layer::{PublishLayer, PublishNext};
use crate::topic::{Topic, TopicPattern};
use crate::transport::Receipt;

/// Something [`FlowControl`] tells its watchers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FlowEvent {
    /// A publish was dropped by its topic's drop policy.
    Dropped {
        /// Its topic.
        topic: Topic,
        /// The dropped message's event id.
        event_id: EventId,
        /// Drops on this topic so far, this one included.
        dropped_on_topic: u64,
    },
}

/// Counts of what a [`FlowControl`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlowCounts {
    /// Messages on their way to the broker now.
    pub in_flight: u64,
    /// Publishes that had to wait for room.
    pub waited: u64,
    /// Publishes refused after waiting `max_wait`.
    pub timed_out: u64,
    /// Publishes dropped by a drop policy.
    pub dropped: u64,
}

/// A drop policy: topics it covers, and how many waiting publishes of each
/// it keeps.
#[derive(Debug, Clone)]
struct KeepNewest {
    pattern: TopicPattern,
    keep: usize,
}

/// A publish waiting on a drop-policy topic.
struct Waiter {
    ticket: u64,
    event_id: EventId,
    dropped: oneshot::Sender<()>,
}

#[derive(Default)]
struct Lines {
    next_ticket: u64,
    by_topic: HashMap<Topic, VecDeque<Waiter>>,
    dropped_by_topic: HashMap<Topic, u64>,
}

struct State {
    permits: Arc<Semaphore>,
    lines: Mutex<Lines>,
    waited: AtomicU64,
    timed_out: AtomicU64,
    dropped: AtomicU64,
    events: broadcast::Sender<FlowEvent>,
}

/// The backpressure layer (see the module docs). Cheap to clone; clones
/// share the room, the lines and the counts.
#[derive(Clone)]
pub struct FlowControl {
    limit: usize,
    max_wait: Duration,
    policies: Arc<[KeepNewest]>,
    inner: Arc<State>,
}

impl std::fmt::Debug for FlowControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowControl")
            .field("max_in_flight", &self.limit)
            .field("max_wait", &self.max_wait)
            .field("keep_newest", &self.policies)
            .field("counts", &self.counts())
            .finish()
    }
}

impl FlowControl {
    /// How long a publish waits for room unless set.
    pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(5);

    /// At most `max_in_flight` messages (at least 1) on their way at once.
    pub fn new(max_in_flight: usize) -> Self {
        let limit = max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
        FlowControl {
            limit,
            max_wait: Self::DEFAULT_MAX_WAIT,
            policies: Arc::new([]),
            inner: Arc::new(State {
                permits: Arc::new(Semaphore::new(limit)),
                lines: Mutex::default(),
                waited: AtomicU64::new(0),
                timed_out: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
                events: broadcast::channel(1024).0,
            }),
        }
    }

    /// Wait at most `d` for room before refusing a publish.
    pub fn max_wait(mut self, d: Duration) -> Self {
        self.max_wait = d;
        self
    }

    /// Turn the drop policy on for the topics of `pattern`: of the
    /// publishes waiting on each such topic, keep the newest `keep` and
    /// drop the older ones.
    pub fn keep_newest(mut self, pattern: TopicPattern, keep: usize) -> Self {
        let mut policies = self.policies.to_vec();
        policies.push(KeepNewest { pattern, keep });
        self.policies = policies.into();
        self
    }

    /// Watch drops as they happen (a watcher that falls 1024 events behind
    /// misses the oldest; the counts stay exact).
    pub fn events(&self) -> broadcast::Receiver<FlowEvent> {
        self.inner.events.subscribe()
    }

    /// What it did so far.
    pub fn counts(&self) -> FlowCounts {
        let i = &self.inner;
        FlowCounts {
            in_flight: (self.limit - i.permits.available_permits()) as u64,
            waited: i.waited.load(Ordering::Relaxed),
            timed_out: i.timed_out.load(Ordering::Relaxed),
            dropped: i.dropped.load(Ordering::Relaxed),
        }
    }

    /// Drops so far, by topic.
    pub fn dropped_by_topic(&self) -> HashMap<Topic, u64> {
        self.lines().dropped_by_topic.clone()
    }

    fn lines(&self) -> std::sync::MutexGuard<'_, Lines> {
        // The lines hold no invariant a panicking holder could break.
        self.inner
            .lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn policy_for(&self, envelopes: &[Envelope]) -> Option<usize> {
        let [e] = envelopes else { return None };
        self.policies
            .iter()
            .find(|p| p.pattern.matches(&e.topic))
            .map(|p| p.keep)
    }

    /// Room for `n` messages, waiting at most `max_wait`.
    async fn room(&self, n: u32) -> Result<tokio::sync::SemaphorePermit<'_>> {
        let i = &self.inner;
        if let Ok(p) = i.permits.try_acquire_many(n) {
            return Ok(p);
        }
        i.waited.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(self.max_wait, i.permits.acquire_many(n)).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(Error::new(ErrorKind::Closed, "flow control closed")),
            Err(_) => {
                i.timed_out.fetch_add(1, Ordering::Relaxed);
                Err(Error::new(
                    ErrorKind::ResourceExhausted,
                    format!(
                        "backpressure: {} messages in flight (the limit) for {:?}",
                        self.limit, self.max_wait
                    ),
                ))
            }
        }
    }

    /// Room for one message of a drop-policy topic: wait in the topic's
    /// line, where newer publishes push out the oldest beyond `keep`.
    async fn room_or_drop(
        &self,
        e: &Envelope,
        keep: usize,
    ) -> Result<tokio::sync::SemaphorePermit<'_>> {
        if let Ok(p) = self.inner.permits.try_acquire() {
            return Ok(p);
        }
        let (ticket, dropped) = self.join_line(e, keep);
        let mut place = Place {
            flow: self,
            topic: &e.topic,
            ticket: Some(ticket),
        };
        let outcome = tokio::select! {
            biased;
            _ = dropped => None,
            permit = self.room(1) => Some(permit),
        };
        // The line decides: a waiter no longer in it was dropped, even if
        // room came at the same moment.
        let still_waiting = place.leave();
        match outcome {
            Some(permit) if still_waiting => permit,
            _ => Err(Error::new(
                ErrorKind::Dropped,
                format!(
                    "dropped by the drop policy of {} (newer messages kept)",
                    e.topic
                ),
            )),
        }
    }

    /// Join `e`'s topic line; the oldest beyond `keep` are dropped.
    fn join_line(&self, e: &Envelope, keep: usize) -> (u64, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let mut lines = self.lines();
        let ticket = lines.next_ticket;
        lines.next_ticket += 1;
        let line = lines.by_topic.entry(e.topic.clone()).or_default();
        line.push_back(Waiter {
            ticket,
            event_id: e.event_id.clone(),
            dropped: tx,
        });
        let mut gone = Vec::new();
        while line.len() > keep {
            if let Some(w) = line.pop_front() {
                gone.push(w);
            }
        }
        for w in gone {
            let on_topic = lines.dropped_by_topic.entry(e.topic.clone()).or_default();
            *on_topic += 1;
            let on_topic = *on_topic;
            self.inner.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic = %e.topic, event_id = %w.event_id, on_topic, "flow: dropped by the topic's drop policy");
            let _ = self.inner.events.send(FlowEvent::Dropped {
                topic: e.topic.clone(),
                event_id: w.event_id,
                dropped_on_topic: on_topic,
            });
            let _ = w.dropped.send(());
        }
        (ticket, rx)
    }

    /// Leave the line; whether the waiter was still in it.
    fn leave_line(&self, topic: &Topic, ticket: u64) -> bool {
        let mut lines = self.lines();
        let Some(line) = lines.by_topic.get_mut(topic) else {
            return false;
        };
        let before = line.len();
        line.retain(|w| w.ticket != ticket);
        let was_there = line.len() < before;
        if line.is_empty() {
            lines.by_topic.remove(topic);
        }
        was_there
    }
}

/// A place in a topic's line, left when the publish goes, fails or is
/// cancelled (a cancelled publish must not be counted as dropped later).
struct Place<'a> {
    flow: &'a FlowControl,
    topic: &'a Topic,
    ticket: Option<u64>,
}

impl Place<'_> {
    /// Leave the line; whether this publish was still in it.
    fn leave(&mut self) -> bool {
        match self.ticket.take() {
            Some(t) => self.flow.leave_line(self.topic, t),
            None => false,
        }
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

#[async_trait]
impl PublishLayer for FlowControl {
    async fn publish(
        &self,
        envelopes: Vec<Envelope>,
        next: PublishNext<'_>,
    ) -> Result<Vec<Receipt>> {
        let permit = match (self.policy_for(&envelopes), envelopes.first()) {
            (Some(keep), Some(e)) => self.room_or_drop(e, keep).await?,
            _ => {
                // A batch larger than the limit goes alone, with all of it.
                let n = envelopes.len().clamp(1, self.limit);
                self.room(u32::try_from(n).unwrap_or(u32::MAX)).await?
            }
        };
        let result = next.run(envelopes).await;
        drop(permit);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryTransport;
    use crate::transport::Transport;

    fn msg(topic: &str, body: &str) -> Envelope {
        Envelope::builder(Topic::new(topic).unwrap(), body.to_string()).build()
    }

    async fn publish(flow: &FlowControl, t: &dyn Transport, e: Envelope) -> Result<Vec<Receipt>> {
        let layers: Vec<Arc<dyn PublishLayer>> = vec![Arc::new(flow.clone())];
        PublishNext::new(&layers, t).run(vec![e]).await
    }

    #[tokio::test]
    async fn publishes_wait_for_room_then_are_refused_not_dropped() {
        let flow = FlowControl::new(2).max_wait(Duration::from_millis(50));
        let t = MemoryTransport::new();
        // Hold the two permits as two stuck publishes would.
        let held = flow
            .inner
            .permits
            .clone()
            .try_acquire_many_owned(2)
            .unwrap();
        assert_eq!(flow.counts().in_flight, 2);
        let e = publish(&flow, &t, msg("control.flow.cmd", "a"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
        assert!(e.is_temporary());
        assert_eq!((flow.counts().waited, flow.counts().timed_out), (1, 1));
        // Room comes while it waits: it goes.
        let f2 = flow.clone();
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(held);
            f2.counts()
        });
        let flow = flow.max_wait(Duration::from_secs(5));
        publish(&flow, &t, msg("control.flow.cmd", "b"))
            .await
            .unwrap();
        release.await.unwrap();
        assert_eq!(flow.counts().dropped, 0);
    }

    #[tokio::test]
    async fn a_drop_policy_keeps_the_newest_and_announces_each_drop() {
        let flow = FlowControl::new(1).keep_newest(TopicPattern::new("telemetry.*").unwrap(), 2);
        let mut events = flow.events();
        let t = MemoryTransport::new();
        let held = flow.inner.permits.clone().try_acquire_owned().unwrap();
        let mut waiting = Vec::new();
        for i in 0..5 {
            let (f, t2) = (flow.clone(), t.connect_same());
            waiting.push(tokio::spawn(async move {
                publish(&f, &t2, msg("telemetry.flow.reading", &i.to_string())).await
            }));
            // Each joins the line before the next one.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(held);
        let mut outcomes = Vec::new();
        for w in waiting {
            outcomes.push(w.await.unwrap().map_err(|e| e.kind()));
        }
        let kinds: Vec<_> = outcomes.iter().map(|o| o.as_ref().err().copied()).collect();
        let d = Some(ErrorKind::Dropped);
        assert_eq!(kinds, vec![d, d, d, None, None], "the oldest three dropped");
        assert_eq!(flow.counts().dropped, 3);
        let topic = Topic::new("telemetry.flow.reading").unwrap();
        assert_eq!(flow.dropped_by_topic()[&topic], 3);
        for n in 1..=3 {
            match events.try_recv().unwrap() {
                FlowEvent::Dropped {
                    dropped_on_topic, ..
                } => assert_eq!(dropped_on_topic, n),
            }
        }
        assert_eq!(t.stored_len(&topic), 2, "the newest two were published");
    }

    #[tokio::test]
    async fn a_cancelled_publish_leaves_the_line_uncounted() {
        let flow = FlowControl::new(1).keep_newest(TopicPattern::new("telemetry.*").unwrap(), 1);
        let t = MemoryTransport::new();
        let held = flow.inner.permits.clone().try_acquire_owned().unwrap();
        let cancelled = tokio::time::timeout(
            Duration::from_millis(10),
            publish(&flow, &t, msg("telemetry.flow.reading", "old")),
        )
        .await;
        assert!(cancelled.is_err(), "it waited");
        let (f, t2) = (flow.clone(), t.connect_same());
        let next =
            tokio::spawn(
                async move { publish(&f, &t2, msg("telemetry.flow.reading", "new")).await },
            );
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(held);
        next.await.unwrap().unwrap();
        assert_eq!(
            flow.counts().dropped,
            0,
            "the cancelled one was not dropped"
        );
    }

    #[tokio::test]
    async fn topics_without_a_policy_never_drop() {
        let flow = FlowControl::new(1).keep_newest(TopicPattern::new("telemetry.*").unwrap(), 1);
        let t = MemoryTransport::new();
        let held = flow.inner.permits.clone().try_acquire_owned().unwrap();
        let mut waiting = Vec::new();
        for i in 0..4 {
            let (f, t2) = (flow.clone(), t.connect_same());
            waiting.push(tokio::spawn(async move {
                publish(&f, &t2, msg("control.flow.cmd", &i.to_string())).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        for w in waiting {
            w.await.unwrap().unwrap();
        }
        assert_eq!(flow.counts().dropped, 0);
        assert_eq!(t.stored_len(&Topic::new("control.flow.cmd").unwrap()), 4);
    }
}
