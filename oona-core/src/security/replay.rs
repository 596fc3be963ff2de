//! Replay protection: a freshness window and a record of the event ids
//! seen inside it.
//!
//! A first delivery (attempt 1) reaches the handler only if its
//! `timestamp` is within ±window of this consumer's clock and its event id
//! was not delivered to the group before *at another position*: the same
//! position again is the broker redelivering it, not a replay; a new entry
//! with a seen event id is a copy published again. Redeliveries (attempt 2
//! on) pass: the broker, not a publisher, sent them. Refused deliveries
//! are dead-lettered with a `replay: ...` reason and counted.
//!
//! Messages spooled through a broker outage ([`crate::degrade`]) keep the
//! timestamp they were published with, and the signature covers it: a
//! consumer whose window is shorter than an outage dead-letters what the
//! spool flushes after it as `replay: stale` (kept, never lost: requeue it
//! from the dead-letter topic). Size the window for the longest outage
//! its publishers spool through; the spool cannot stamp a new time
//! without the signing key, and an unsigned "spooled" mark would let
//! anyone replay an old message.
//!
//! The record lives in a [`NonceStore`]: [`MemoryNonces`] in the process
//! (bounded), or one the transport keeps on its broker for the whole group
//! ([`crate::Transport::nonce_store`]; Redis: `SET NX PX`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::delivery::{Delivery, Outcome};
use crate::envelope::{EventId, Timestamp};
use crate::error::Result;
use crate::layer::{ConsumeLayer, ConsumeNext, Handled};
use crate::topic::Name;

/// Where the event ids a group has seen are recorded, each with a value
/// and an expiry: replay protection records the position of first
/// delivery, de-duplication ([`crate::dedup`]) whether the event was
/// handled.
#[async_trait]
pub trait NonceStore: Send + Sync + 'static {
    /// Record that `event_id` reached `group` at `position`, kept for
    /// `ttl`, unless it is recorded already: then the position it was
    /// recorded with, and nothing changes.
    async fn check_in(
        &self,
        group: &Name,
        event_id: &EventId,
        position: &str,
        ttl: Duration,
    ) -> Result<Option<String>>;

    /// Record `value` for `event_id` in `group`, kept for `ttl`, whether
    /// or not it is recorded already.
    async fn mark(
        &self,
        group: &Name,
        event_id: &EventId,
        value: &str,
        ttl: Duration,
    ) -> Result<()>;

    /// Forget `event_id` in `group`.
    async fn forget(&self, group: &Name, event_id: &EventId) -> Result<()>;
}

/// A [`NonceStore`] in this process, holding at most `capacity` ids (the
/// oldest go first when it is full; counted in [`ReplayCounts::evicted`]).
pub struct MemoryNonces {
    capacity: usize,
    inner: Mutex<Seen>,
    evicted: AtomicU64,
}

#[derive(Default)]
struct Seen {
    by_id: HashMap<(Name, EventId), (String, tokio::time::Instant)>,
    /// Expiry order.
    order: VecDeque<(tokio::time::Instant, Name, EventId)>,
}

impl MemoryNonces {
    /// Default capacity: about 25 MB of ids.
    pub const DEFAULT_CAPACITY: usize = 200_000;

    /// A store of at most `capacity` ids.
    pub fn new(capacity: usize) -> Self {
        MemoryNonces {
            capacity: capacity.max(1),
            inner: Mutex::default(),
            evicted: AtomicU64::new(0),
        }
    }
}

impl Default for MemoryNonces {
    fn default() -> Self {
        MemoryNonces::new(Self::DEFAULT_CAPACITY)
    }
}

impl std::fmt::Debug for MemoryNonces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryNonces")
            .field("capacity", &self.capacity)
            .finish()
    }
}

#[async_trait]
impl NonceStore for MemoryNonces {
    async fn check_in(
        &self,
        group: &Name,
        event_id: &EventId,
        position: &str,
        ttl: Duration,
    ) -> Result<Option<String>> {
        let now = tokio::time::Instant::now();
        let mut seen = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Seen { by_id, order } = &mut *seen;
        while let Some((at, g, id)) = order.front() {
            let expired = *at <= now;
            if !expired && by_id.len() < self.capacity {
                break;
            }
            let key = (g.clone(), id.clone());
            // An entry renewed later has a later instant: keep it.
            if by_id.get(&key).is_some_and(|(_, t)| t == at) {
                by_id.remove(&key);
                if !expired {
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                }
            }
            order.pop_front();
        }
        let key = (group.clone(), event_id.clone());
        if let Some((p, _)) = by_id.get(&key) {
            return Ok(Some(p.clone()));
        }
        let until = now + ttl;
        by_id.insert(key, (position.to_string(), until));
        order.push_back((until, group.clone(), event_id.clone()));
        Ok(None)
    }

    async fn mark(
        &self,
        group: &Name,
        event_id: &EventId,
        value: &str,
        ttl: Duration,
    ) -> Result<()> {
        let until = tokio::time::Instant::now() + ttl;
        let mut seen = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        seen.by_id.insert(
            (group.clone(), event_id.clone()),
            (value.to_string(), until),
        );
        seen.order
            .push_back((until, group.clone(), event_id.clone()));
        Ok(())
    }

    async fn forget(&self, group: &Name, event_id: &EventId) -> Result<()> {
        let mut seen = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        seen.by_id.remove(&(group.clone(), event_id.clone()));
        Ok(())
    }
}

/// Why a delivery was refused; its `Display` is the dead letter's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// Published too far from this consumer's clock.
    #[error("replay: stale: published {skew_ms} ms {direction} this consumer's clock, outside the window of ±{window_ms} ms")]
    Stale {
        /// How far off, in milliseconds.
        skew_ms: u64,
        /// `before` or `after`.
        direction: &'static str,
        /// The window, in milliseconds.
        window_ms: u64,
    },
    /// The event id reached the group before, at another position.
    #[error("replay: event id {event_id} was delivered before (at {first_at}) inside the window")]
    Seen {
        /// The event id.
        event_id: String,
        /// Where it was first delivered.
        first_at: String,
    },
}

/// Counts of what the replay layer saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayCounts {
    /// First deliveries checked and handed on.
    pub fresh: u64,
    /// Dead-lettered as stale.
    pub stale: u64,
    /// Dead-lettered as replayed.
    pub replayed: u64,
    /// Redeliveries handed on unchecked.
    pub redelivered: u64,
    /// The store failed; the delivery was given back to try again.
    pub store_errors: u64,
    /// Ids dropped from a full [`MemoryNonces`] before their time.
    pub evicted: u64,
}

#[derive(Debug, Default)]
struct Counters {
    fresh: AtomicU64,
    stale: AtomicU64,
    replayed: AtomicU64,
    redelivered: AtomicU64,
    store_errors: AtomicU64,
}

/// The consume layer of replay protection (see the module docs).
#[derive(Clone)]
pub struct ReplayLayer {
    window: Duration,
    store: Arc<dyn NonceStore>,
    memory: Option<Arc<MemoryNonces>>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for ReplayLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayLayer")
            .field("window", &self.window)
            .field("shared", &self.memory.is_none())
            .finish()
    }
}

/// How long a store keeps an id: a copy of the event passes the freshness
/// check until its timestamp is a window past this consumer's clock.
fn keep_for(window: Duration) -> Duration {
    window.saturating_mul(2)
}

impl ReplayLayer {
    /// Timestamps within ±`window`, ids recorded in this process.
    pub fn new(window: Duration) -> Self {
        let memory = Arc::new(MemoryNonces::default());
        ReplayLayer {
            window,
            store: memory.clone(),
            memory: Some(memory),
            counters: Arc::default(),
        }
    }

    /// Record ids where `transport` keeps them for the whole group, if it
    /// can ([`crate::Transport::nonce_store`]), else in this process.
    pub fn for_transport(window: Duration, transport: &dyn crate::Transport) -> Self {
        let layer = ReplayLayer::new(window);
        match transport.nonce_store() {
            Some(store) => layer.with_store(store),
            None => layer,
        }
    }

    /// Record ids in `store` instead (shared by the group through its
    /// broker, say: [`crate::Transport::nonce_store`]).
    pub fn with_store(mut self, store: Arc<dyn NonceStore>) -> Self {
        self.store = store;
        self.memory = None;
        self
    }

    /// The counts so far (shared by clones).
    pub fn counts(&self) -> ReplayCounts {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.counters;
        ReplayCounts {
            fresh: get(&c.fresh),
            stale: get(&c.stale),
            replayed: get(&c.replayed),
            redelivered: get(&c.redelivered),
            store_errors: get(&c.store_errors),
            evicted: self.memory.as_ref().map_or(0, |m| get(&m.evicted)),
        }
    }

    /// Whether `published` is within the window of `now`.
    pub fn check_fresh(
        &self,
        published: Timestamp,
        now: Timestamp,
    ) -> std::result::Result<(), ReplayError> {
        let (p, n) = (published.unix_millis(), now.unix_millis());
        let (skew_ms, direction) = if p <= n {
            (n - p, "before")
        } else {
            (p - n, "after")
        };
        let window_ms = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        if skew_ms > window_ms {
            return Err(ReplayError::Stale {
                skew_ms,
                direction,
                window_ms,
            });
        }
        Ok(())
    }

    async fn check(&self, d: &Delivery) -> Result<std::result::Result<(), ReplayError>> {
        let env = d.envelope();
        if let Err(e) = self.check_fresh(env.timestamp, Timestamp::now()) {
            return Ok(Err(e));
        }
        let position = d.info().position.as_deref().unwrap_or("");
        let first = self
            .store
            .check_in(
                &d.info().group,
                &env.event_id,
                position,
                keep_for(self.window),
            )
            .await?;
        Ok(match first {
            Some(at) if at != position => Err(ReplayError::Seen {
                event_id: env.event_id.to_string(),
                first_at: at,
            }),
            _ => Ok(()),
        })
    }
}

/// Wait before a delivery whose check could not reach the store is tried
/// again.
const STORE_RETRY: Duration = Duration::from_secs(1);

#[async_trait]
impl ConsumeLayer for ReplayLayer {
    async fn handle(&self, delivery: Delivery, next: ConsumeNext<'_>) -> Handled {
        let c = &self.counters;
        if delivery.attempt() > 1 {
            c.redelivered.fetch_add(1, Ordering::Relaxed);
            return next.run(delivery).await;
        }
        match self.check(&delivery).await {
            Ok(Ok(())) => {
                c.fresh.fetch_add(1, Ordering::Relaxed);
                next.run(delivery).await
            }
            Ok(Err(e)) => {
                let counter = match e {
                    ReplayError::Stale { .. } => &c.stale,
                    ReplayError::Seen { .. } => &c.replayed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let env = delivery.envelope();
                tracing::warn!(topic = %env.topic, event_id = %env.event_id, sender_id = %env.sender_id, reason = %e, "refused: dead-lettered");
                let reason = e.to_string();
                Handled::settle(delivery, Outcome::Reject { reason }).await
            }
            Err(e) => {
                // Refusing to decide without the record: the delivery
                // comes back (and counts an attempt).
                c.store_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "replay check could not reach its store; retrying the delivery");
                let outcome = Outcome::Nack {
                    delay: Some(STORE_RETRY),
                    reason: Some(format!("replay: the record of seen ids failed: {e}")),
                };
                Handled::settle(delivery, outcome).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g() -> Name {
        Name::new("kasmina").unwrap()
    }

    #[test]
    fn freshness_boundaries() {
        let l = ReplayLayer::new(Duration::from_secs(5));
        let now = Timestamp::from_unix_millis(1_000_000);
        let at = |ms: u64| Timestamp::from_unix_millis(ms);
        assert!(
            l.check_fresh(at(995_000), now).is_ok(),
            "exactly the window before"
        );
        assert!(
            l.check_fresh(at(1_005_000), now).is_ok(),
            "exactly the window after"
        );
        assert_eq!(
            l.check_fresh(at(994_999), now).unwrap_err().to_string(),
            "replay: stale: published 5001 ms before this consumer's clock, outside the window of ±5000 ms"
        );
        assert!(matches!(
            l.check_fresh(at(1_005_001), now),
            Err(ReplayError::Stale {
                direction: "after",
                ..
            })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn ids_are_kept_for_their_time_and_per_group() {
        let s = MemoryNonces::new(10);
        let id = EventId::new();
        let ttl = Duration::from_secs(10);
        assert_eq!(s.check_in(&g(), &id, "1-0", ttl).await.unwrap(), None);
        assert_eq!(
            s.check_in(&g(), &id, "2-0", ttl).await.unwrap().as_deref(),
            Some("1-0"),
            "the first position stays"
        );
        let other = Name::new("other-group").unwrap();
        assert_eq!(s.check_in(&other, &id, "1-0", ttl).await.unwrap(), None);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(
            s.check_in(&g(), &id, "3-0", ttl).await.unwrap(),
            None,
            "expired"
        );
    }

    #[tokio::test]
    async fn a_full_store_drops_its_oldest_and_counts_it() {
        let s = MemoryNonces::new(3);
        let ids: Vec<EventId> = (0..5).map(|_| EventId::new()).collect();
        let ttl = Duration::from_secs(60);
        for (i, id) in ids.iter().enumerate() {
            s.check_in(&g(), id, &i.to_string(), ttl).await.unwrap();
        }
        assert_eq!(s.evicted.load(Ordering::Relaxed), 2);
        assert_eq!(
            s.check_in(&g(), &ids[0], "x", ttl).await.unwrap(),
            None,
            "dropped"
        );
        assert_eq!(
            s.check_in(&g(), &ids[4], "x", ttl)
                .await
                .unwrap()
                .as_deref(),
            Some("4")
        );
    }
}
