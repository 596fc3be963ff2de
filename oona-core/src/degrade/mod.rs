//! Degradation: publishing through a broker outage without losing a
//! message.
//!
//! [`Spooled`] wraps any transport. While the broker takes publishes they
//! go straight to it. When a publish fails with a temporary error (the
//! broker unreachable, a timeout), that publish and every later one go to
//! a durable local [`Spool`] on disk instead and return `Ok` once they are
//! there (the receipt's position reads `spool:<segment>:<offset>`). A
//! flusher hands the spooled records to the broker in order, paced by a
//! circuit [`Breaker`] (closed, open, half-open: one probe batch at a
//! time, the wait between probes doubling up to a limit); once the spool
//! is empty, publishes go straight to the broker again. Just back from an
//! outage, the breaker is conservative for a while (10 s): the flusher
//! ramps its batches up from 16 records, and one failure opens the
//! breaker again. No publish
//! overtakes a spooled one, so order per key holds across the outage.
//!
//! The spool survives the process: a publisher started on the same
//! directory after a crash flushes what its predecessor spooled, first.
//! Delivery stays at least once: a batch the broker took just before a
//! crash, whose cursor was not saved yet, goes again. Spooled messages keep
//! their publish time: consumers with replay protection need a freshness
//! window longer than the outages spooled through
//! ([`crate::security::ReplayLayer`]).
//!
//! What the spool cannot take is a clear error, never a drop: a full
//! spool waits (bounded) and then fails with [`ErrorKind::SpoolFull`]; a
//! permanent error of the broker (a refused topic, an oversized payload)
//! is the caller's error when the broker is there, and a spooled record
//! the broker refuses for good when flushed is kept in the spool
//! directory's `refused.jsonl` with its reason, logged and counted.
//!
//! Subscribing, topics and health are the inner transport's; health is
//! `Degraded` while records wait or the breaker is not closed.
//!
//! ```
//! # async fn demo() -> oona_core::Result<()> {
//! use std::sync::Arc;
//! use oona_core::degrade::{BreakerConfig, SpoolConfig, Spooled};
//! use oona_core::{Envelope, Topic, Transport};
//!
//! let dir = std::env::temp_dir().join(format!("oona-spool-doc-{}", std::process::id()));
//! let broker = Arc::new(oona_core::memory::MemoryTransport::new());
//! let bus = Spooled::new(broker, SpoolConfig::new(&dir), BreakerConfig::default())?;
//! let topic = Topic::new("telemetry.seed.health")?;
//! bus.publish(Envelope::builder(topic, "{}").sender_id("doc").build()).await?;
//! assert_eq!(bus.stats().direct, 1);
//! bus.close().await?;
//! # std::fs::remove_dir_all(dir).ok();
//! # Ok(()) }
//! # tokio::runtime::Runtime::new().unwrap().block_on(demo()).unwrap();
//! ```
//!
//! [`ErrorKind::SpoolFull`]: crate::ErrorKind::SpoolFull

mod breaker;
mod spool;
mod spooled;
mod url;

pub use breaker::{Breaker, BreakerConfig, BreakerState};
pub use spool::{
    Spool, SpoolConfig, SpoolPosition, SpoolStats, SpoolSync, SpooledRecord, WhenFull,
};
pub use spooled::{Connect, Spooled, SpooledStats};
pub use url::{from_url, KEYS as URL_KEYS};
