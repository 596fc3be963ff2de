//! De-duplication by event id: a consume layer that lets each event reach
//! the group's handler once, however often it is delivered (a redelivery
//! after a lost ack, a copy published again by a spool after a crash).
//!
//! Opt-in per subscription: add a [`DedupLayer`] to the runners that want
//! it. For each delivery it records the event id in a [`NonceStore`]
//! (kept apart from replay protection's record):
//!
//! | record | what the layer does |
//! |---|---|
//! | none | records `claim` for the delivery's ack deadline and runs the handler; an ack records `done` for `keep`, any other outcome forgets the claim (the redelivery runs) |
//! | `done` | acks the delivery without running the handler (a duplicate) |
//! | `claim:<position>` of this delivery | its claimant crashed and the broker redelivered it: this delivery takes the claim over |
//! | another `claim` | another copy is being handled now: nacks it with a delay of a quarter of the ack deadline, to look again (on its last attempt it runs instead: waiting never dead-letters an event unhandled) |
//!
//! A consumer that crashes mid-handler leaves a `claim` that expires with
//! the ack deadline; a handler running past its ack deadline may meet a
//! concurrent copy.
//! A store that fails gives the delivery back (nack with a delay) rather
//! than decide without it.
//!
//! The record is this process's ([`crate::security::MemoryNonces`],
//! bounded) or, with [`DedupLayer::for_transport`], the broker's for the
//! whole group where the transport keeps one (Redis: `SET NX PX`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::delivery::{Delivery, Outcome};
use crate::layer::{ConsumeLayer, ConsumeNext, Handled};
use crate::security::{MemoryNonces, NonceStore};
use crate::topic::Name;

const CLAIM: &str = "claim";
const DONE: &str = "done";

/// How long a failing store's delivery waits before it comes back.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// Counts of what a [`DedupLayer`] saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DedupCounts {
    /// Deliveries handed to the handler.
    pub handled: u64,
    /// Duplicates acked without the handler.
    pub duplicates: u64,
    /// Deliveries given back because another consumer held the event.
    pub held_elsewhere: u64,
    /// Deliveries given back because the store failed.
    pub store_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    handled: AtomicU64,
    duplicates: AtomicU64,
    held_elsewhere: AtomicU64,
    store_errors: AtomicU64,
}

/// The de-duplication layer (see the module docs). Cheap to clone; clones
/// share the record and the counts.
#[derive(Clone)]
pub struct DedupLayer {
    keep: Duration,
    store: Arc<dyn NonceStore>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for DedupLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DedupLayer")
            .field("keep", &self.keep)
            .field("counts", &self.counts())
            .finish()
    }
}

impl DedupLayer {
    /// Handled ids kept for `keep` (copies later than that run again), in
    /// this process.
    pub fn new(keep: Duration) -> Self {
        DedupLayer {
            keep,
            store: Arc::new(MemoryNonces::default()),
            counters: Arc::default(),
        }
    }

    /// Kept where `transport` keeps ids for the whole group, if it can
    /// ([`crate::Transport::nonce_store`]), else in this process.
    pub fn for_transport(keep: Duration, transport: &dyn crate::Transport) -> Self {
        let layer = DedupLayer::new(keep);
        match transport.nonce_store() {
            Some(store) => layer.with_store(store),
            None => layer,
        }
    }

    /// Keep the record in `store`.
    pub fn with_store(mut self, store: Arc<dyn NonceStore>) -> Self {
        self.store = store;
        self
    }

    /// What it saw so far.
    pub fn counts(&self) -> DedupCounts {
        let c = &self.counters;
        DedupCounts {
            handled: c.handled.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            held_elsewhere: c.held_elsewhere.load(Ordering::Relaxed),
            store_errors: c.store_errors.load(Ordering::Relaxed),
        }
    }

    async fn give_back(&self, delivery: Delivery, e: crate::Error) -> Handled {
        self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, "dedup: the record of handled ids failed; retrying the delivery");
        let outcome = Outcome::Nack {
            delay: Some(STORE_RETRY),
            reason: Some(format!("dedup: the record of handled ids failed: {e}")),
        };
        Handled::settle(delivery, outcome).await
    }
}

/// The group's scope in the store, apart from replay protection's (a
/// long group name is shortened to fit; names are ASCII).
fn scope(group: &Name) -> Name {
    let g = group.as_str();
    let keep = g.len().min(Name::MAX_LEN - ".dedup".len());
    Name::new(format!("{}.dedup", &g[..keep])).unwrap_or_else(|_| group.clone())
}

#[async_trait]
impl ConsumeLayer for DedupLayer {
    async fn handle(&self, delivery: Delivery, next: ConsumeNext<'_>) -> Handled {
        let c = &self.counters;
        let group = scope(&delivery.info().group);
        let id = delivery.envelope().event_id.clone();
        let info = delivery.info();
        let lease = info.ack_deadline;
        let last_attempt = info.attempt >= info.max_attempts;
        // The claim names the message's position: its own redelivery (its
        // claimant crashed) takes the claim over instead of waiting on it.
        let claim = match &info.position {
            Some(p) => format!("{CLAIM}:{p}"),
            None => CLAIM.to_string(),
        };
        match self.store.check_in(&group, &id, &claim, lease).await {
            Err(e) => return self.give_back(delivery, e).await,
            Ok(Some(v)) if v == DONE => {
                c.duplicates.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(event_id = %id, "dedup: handled before; acked without the handler");
                return Handled::settle(delivery, Outcome::Ack).await;
            }
            // Another copy is being handled: look again later, but never
            // let waiting on it dead-letter this one unhandled.
            Ok(Some(v)) if v != claim && !last_attempt => {
                c.held_elsewhere.fetch_add(1, Ordering::Relaxed);
                let outcome = Outcome::Nack {
                    delay: Some(lease / 4),
                    reason: Some("dedup: another consumer is handling this event".into()),
                };
                return Handled::settle(delivery, outcome).await;
            }
            Ok(Some(_)) => {
                if let Err(e) = self.store.mark(&group, &id, &claim, lease).await {
                    return self.give_back(delivery, e).await;
                }
            }
            Ok(None) => {}
        }
        c.handled.fetch_add(1, Ordering::Relaxed);
        let handled = next.run(delivery).await;
        let recorded = match handled.outcome {
            Outcome::Ack => self.store.mark(&group, &id, DONE, self.keep).await,
            _ => self.store.forget(&group, &id).await,
        };
        if let Err(e) = recorded {
            // The outcome stands; a later copy may run again (at least once).
            tracing::warn!(event_id = %id, error = %e, "dedup: the outcome could not be recorded");
        }
        handled
    }
}
