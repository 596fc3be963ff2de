//! [`Spooled`]: a transport whose publishes never fail for want of a
//! broker. See the [module docs](crate::degrade).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio::sync::{OnceCell, RwLock};

use super::breaker::{Breaker, BreakerConfig, BreakerState};
use super::spool::{Spool, SpoolConfig, SpoolStats, SpooledRecord};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::subscription::Subscription;
use crate::topic::{Name, Topic, TopicPolicy};
use crate::transport::{Capabilities, Depth, Health, HealthStatus, Receipt, Transport};
use crate::DeliveryStream;

/// Records handed to the broker per batch when the spool is flushed.
const FLUSH_BATCH: usize = 256;

/// What a [`Spooled`] transport did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SpooledStats {
    /// Publishes the broker took directly.
    pub direct: u64,
    /// Publishes written to the spool (the broker unreachable, or records
    /// of an outage still waiting ahead of them).
    pub spooled: u64,
    /// Spooled records the broker refused for good when they were
    /// flushed (each logged at error level and kept in the spool
    /// directory's `refused.jsonl`).
    pub refused: u64,
    /// The breaker's state.
    pub breaker: BreakerState,
    /// Whether the breaker is conservative (just back from an outage: see
    /// [`crate::degrade::Breaker`]).
    pub conservative: bool,
    /// How many times the breaker opened.
    pub outages: u64,
    /// The spool's own counts.
    pub spool: SpoolStats,
}

/// A transport whose publishes go to a durable local spool while the
/// broker cannot take them, and from there to the broker, in order, when
/// it is back (see the [module docs](crate::degrade)). Everything but
/// publishing is the inner transport's.
pub struct Spooled {
    shared: Arc<Shared>,
    flusher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Opens the inner transport (tried again, paced by the breaker, until it
/// succeeds).
pub type Connect =
    Box<dyn Fn() -> BoxFuture<'static, Result<Arc<dyn Transport>>> + Send + Sync + 'static>;

struct Shared {
    /// Set once connected.
    inner: OnceCell<Arc<dyn Transport>>,
    connect: Option<Connect>,
    spool: Spool,
    breaker: Breaker,
    /// True while publishes must go to the spool: something waits there
    /// (order), or the broker failed. Appends hold `order` shared; the
    /// flusher turns `spooling` off holding it exclusively, once the
    /// spool is empty, so no publish overtakes a spooled one.
    spooling: AtomicBool,
    order: RwLock<()>,
    /// Schemas asked for while the broker was away, registered before the
    /// spool is flushed (so spooled messages go out under them).
    schemas: std::sync::Mutex<Vec<(Topic, crate::SchemaSpec)>>,
    direct: AtomicU64,
    spooled: AtomicU64,
    refused: AtomicU64,
    closed: AtomicBool,
}

impl std::fmt::Debug for Spooled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spooled")
            .field("inner", &self.shared.inner)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Spooled {
    /// Wrap the connected `inner`, spooling in `spool` (opened now: what a
    /// previous process left there is flushed first) with a breaker of
    /// `breaker`. Must run inside a tokio runtime.
    pub fn new(
        inner: Arc<dyn Transport>,
        spool: SpoolConfig,
        breaker: BreakerConfig,
    ) -> Result<Spooled> {
        Self::start(Some(inner), None, spool, breaker)
    }

    /// Connect with `connect`, and start spooling at once if the broker
    /// is away: a publisher (re)started during an outage publishes into
    /// the spool while `connect` is tried again, paced by the breaker. A
    /// permanent error of the first try (a bad URL, refused credentials)
    /// is returned; until connected, everything but publishing fails with
    /// a temporary [`ErrorKind::Connection`] error.
    pub async fn connect(
        connect: Connect,
        spool: SpoolConfig,
        breaker: BreakerConfig,
    ) -> Result<Spooled> {
        match connect().await {
            Ok(inner) => Self::start(Some(inner), Some(connect), spool, breaker),
            Err(e) if e.is_temporary() => {
                tracing::warn!(error = %e, "the broker is away: publishing into the spool");
                let s = Self::start(None, Some(connect), spool, breaker)?;
                s.shared.breaker.failure();
                s.shared.spooling.store(true, Ordering::SeqCst);
                Ok(s)
            }
            Err(e) => Err(e),
        }
    }

    fn start(
        inner: Option<Arc<dyn Transport>>,
        connect: Option<Connect>,
        spool: SpoolConfig,
        breaker: BreakerConfig,
    ) -> Result<Spooled> {
        let spool = Spool::open(spool)?;
        let waiting = !spool.is_empty();
        let shared = Arc::new(Shared {
            inner: OnceCell::new_with(inner),
            connect,
            spool,
            breaker: Breaker::new(breaker),
            spooling: AtomicBool::new(waiting),
            order: RwLock::new(()),
            schemas: std::sync::Mutex::new(Vec::new()),
            direct: AtomicU64::new(0),
            spooled: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        let flusher = tokio::spawn(Arc::clone(&shared).flush_forever());
        Ok(Spooled {
            shared,
            flusher: Mutex::new(Some(flusher)),
        })
    }

    /// The inner transport, once connected.
    pub fn inner(&self) -> Option<&Arc<dyn Transport>> {
        self.shared.inner.get()
    }

    fn connected(&self) -> Result<&Arc<dyn Transport>> {
        self.inner().ok_or_else(|| {
            Error::new(
                ErrorKind::Connection,
                "not connected yet: the broker has been away since the start",
            )
        })
    }

    /// What it did so far.
    pub fn stats(&self) -> SpooledStats {
        let s = &self.shared;
        SpooledStats {
            direct: s.direct.load(Ordering::Relaxed),
            spooled: s.spooled.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            breaker: s.breaker.state(),
            conservative: s.breaker.conservative(),
            outages: s.breaker.times_opened(),
            spool: s.spool.stats(),
        }
    }

    /// Wait until the spool is empty (every spooled record on the
    /// broker), up to `within`; whether it is.
    pub async fn drained(&self, within: Duration) -> bool {
        let until = tokio::time::Instant::now() + within;
        while !self.shared.spool.is_empty() || self.shared.spooling.load(Ordering::SeqCst) {
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

impl Shared {
    /// Whether to try the broker directly.
    fn direct_now(&self) -> Option<&Arc<dyn Transport>> {
        let inner = self.inner.get()?;
        (!self.spooling.load(Ordering::SeqCst) && self.breaker.try_call().is_ok()).then_some(inner)
    }

    async fn spool_all(&self, envelopes: &[Envelope]) -> Result<Vec<Receipt>> {
        let _order = self.order.read().await;
        self.spooling.store(true, Ordering::SeqCst);
        let positions = self.spool.append_all(envelopes).await?;
        self.spooled
            .fetch_add(envelopes.len() as u64, Ordering::Relaxed);
        Ok(envelopes
            .iter()
            .zip(positions)
            .map(|(e, at)| {
                Receipt::new(
                    e.event_id.clone(),
                    e.topic.clone(),
                    Some(format!("spool:{}:{}", at.segment, at.offset)),
                )
            })
            .collect())
    }

    async fn publish(&self, envelopes: Vec<Envelope>) -> Result<Vec<Receipt>> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::new(
                crate::ErrorKind::Closed,
                "the spooled transport is closed",
            ));
        }
        let Some(inner) = self.direct_now() else {
            return self.spool_all(&envelopes).await;
        };
        // Kept for the spool: the transport takes what it publishes. A
        // publish that times out may still land: then the spooled copy is
        // a duplicate (at least once), never a loss.
        let sent = self
            .breaker
            .timed(async {
                if envelopes.len() == 1 {
                    inner.publish(envelopes[0].clone()).await.map(|r| vec![r])
                } else {
                    inner.publish_batch(envelopes.clone()).await
                }
            })
            .await;
        match sent {
            Ok(r) => {
                self.breaker.success();
                self.direct.fetch_add(r.len() as u64, Ordering::Relaxed);
                Ok(r)
            }
            Err(e) if e.is_temporary() => {
                self.breaker.failure();
                tracing::warn!(error = %e, "publish failed: spooling until the broker is back");
                self.spool_all(&envelopes).await
            }
            Err(e) => {
                self.breaker.success(); // the broker answered
                Err(e)
            }
        }
    }

    /// The flusher: hands spooled records to the broker in order, paced
    /// by the breaker; turns spooling off once the spool is empty.
    async fn flush_forever(self: Arc<Self>) {
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            if self.spool.is_empty() {
                let _order = self.order.write().await;
                if self.spool.is_empty() {
                    self.spooling.store(false, Ordering::SeqCst);
                }
            }
            let batch = match self
                .spool
                .next_batch(self.breaker.batch_limit(FLUSH_BATCH))
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "spool: reading failed; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if batch.is_empty() {
                continue;
            }
            if let Err(at) = self.breaker.try_call() {
                tokio::time::sleep_until(at).await;
                continue;
            }
            match self.connected().await {
                Some(inner) => self.flush_batch(inner, batch).await,
                None => continue,
            }
        }
    }

    /// The inner transport, connecting first if need be (one try, which
    /// the breaker counts).
    async fn connected(&self) -> Option<Arc<dyn Transport>> {
        if let Some(t) = self.inner.get() {
            return Some(Arc::clone(t));
        }
        let connect = self.connect.as_ref()?;
        match self.breaker.timed(connect()).await {
            Ok(t) => {
                tracing::info!("the broker is back: flushing the spool");
                let _ = self.inner.set(Arc::clone(&t));
                Some(t)
            }
            Err(e) => {
                self.breaker.failure();
                if e.is_temporary() {
                    tracing::debug!(error = %e, "connect: the broker is still away");
                } else {
                    tracing::error!(error = %e, "connect refused; trying again");
                }
                None
            }
        }
    }

    /// Register the schemas asked for while the broker was away; `false`
    /// while it still is.
    async fn register_pending(&self, inner: &Arc<dyn Transport>) -> bool {
        let pending = std::mem::take(&mut *crate::sync::lock(&self.schemas));
        for (i, (topic, schema)) in pending.iter().enumerate() {
            match inner.register_schema(topic, schema).await {
                Ok(_) => {}
                Err(e) if e.is_temporary() => {
                    crate::sync::lock(&self.schemas).extend(pending[i..].iter().cloned());
                    return false;
                }
                // Refused for good: its messages go out without it, as
                // the broker's registry does not stop plain producers.
                Err(e) => {
                    tracing::error!(%topic, schema = %schema.schema_id, error = %e, "spool: the broker's schema registry refused a schema")
                }
            }
        }
        true
    }

    async fn flush_batch(&self, inner: Arc<dyn Transport>, batch: Vec<SpooledRecord>) {
        if !self.register_pending(&inner).await {
            self.breaker.failure();
            return;
        }
        let envelopes: Vec<Envelope> = batch.iter().map(|r| r.envelope.clone()).collect();
        match self.breaker.timed(inner.publish_batch(envelopes)).await {
            Ok(_) => {
                self.breaker.success();
                self.advance(&batch).await;
            }
            Err(e) if e.is_temporary() => {
                self.breaker.failure();
                tracing::debug!(error = %e, "spool: the broker is still away");
            }
            Err(_) => {
                // One of them is refused for good: find which, one by one.
                self.breaker.success();
                for (i, r) in batch.iter().enumerate() {
                    match self.breaker.timed(inner.publish(r.envelope.clone())).await {
                        Ok(_) => {}
                        Err(e) if e.is_temporary() => {
                            self.breaker.failure();
                            self.advance(&batch[..i]).await;
                            return;
                        }
                        Err(e) => self.refuse(r, &e),
                    }
                }
                self.advance(&batch).await;
            }
        }
    }

    async fn advance(&self, taken: &[SpooledRecord]) {
        if let Err(e) = self.spool.advance(taken).await {
            // The records went out; they go again after a restart.
            tracing::error!(error = %e, "spool: the cursor could not be saved");
        }
    }

    /// A spooled record the broker refuses for good: kept beside the
    /// spool, logged and counted; never dropped silently.
    fn refuse(&self, r: &SpooledRecord, e: &Error) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let line = crate::wire::json::encode(&r.envelope)
            .map(|doc| {
                let mut line = serde_json::json!({
                    "reason": e.to_string(),
                    "message": serde_json::from_slice::<serde_json::Value>(&doc).unwrap_or_default(),
                })
                .to_string();
                line.push('\n');
                line
            })
            .unwrap_or_default();
        let path = self.spool.dir().join("refused.jsonl");
        let kept = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
        tracing::error!(
            topic = %r.envelope.topic,
            event_id = %r.envelope.event_id,
            error = %e,
            kept_in = %path.display(),
            kept = kept.is_ok(),
            "spool: the broker refused a spooled message for good"
        );
    }
}

#[async_trait]
impl Transport for Spooled {
    fn name(&self) -> &'static str {
        self.inner().map_or("spooled", |t| t.name())
    }

    fn capabilities(&self) -> Capabilities {
        self.inner().map(|t| t.capabilities()).unwrap_or_default()
    }

    async fn ensure_topic(&self, topic: &Topic, policy: &TopicPolicy) -> Result<()> {
        self.connected()?.ensure_topic(topic, policy).await
    }

    async fn publish(&self, envelope: Envelope) -> Result<Receipt> {
        let mut r = self.shared.publish(vec![envelope]).await?;
        r.pop()
            .ok_or_else(|| Error::new(ErrorKind::Internal, "publish returned no receipt"))
    }

    async fn publish_batch(&self, envelopes: Vec<Envelope>) -> Result<Vec<Receipt>> {
        if envelopes.is_empty() {
            return Ok(Vec::new());
        }
        self.shared.publish(envelopes).await
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<DeliveryStream> {
        self.connected()?.subscribe(subscription).await
    }

    async fn delete_topic(&self, topic: &Topic) -> Result<()> {
        self.connected()?.delete_topic(topic).await
    }

    async fn depth(&self, topic: &Topic, group: &Name) -> Result<Depth> {
        self.connected()?.depth(topic, group).await
    }

    async fn list_topics(&self) -> Result<Vec<Topic>> {
        self.connected()?.list_topics().await
    }

    async fn describe_topic(&self, topic: &Topic) -> Result<crate::TopicInfo> {
        self.connected()?.describe_topic(topic).await
    }

    async fn delete_group(&self, topic: &Topic, group: &Name) -> Result<()> {
        self.connected()?.delete_group(topic, group).await
    }

    async fn register_schema(
        &self,
        topic: &Topic,
        schema: &crate::SchemaSpec,
    ) -> Result<Option<u64>> {
        // In an outage the schema waits with the spool, and is registered
        // before the spool is flushed.
        let r = match self.inner() {
            Some(t) => t.register_schema(topic, schema).await,
            None => Err(Error::new(ErrorKind::Connection, "not connected yet").set_temporary(true)),
        };
        match r {
            Err(e) if e.is_temporary() => {
                crate::sync::lock(&self.shared.schemas).push((topic.clone(), schema.clone()));
                Ok(None)
            }
            other => other,
        }
    }

    async fn health(&self) -> Health {
        let h = match self.inner() {
            Some(t) => t.health().await,
            None => Health::new(HealthStatus::Down, "spooled", "not connected yet", None),
        };
        let s = self.stats();
        if s.spool.records == 0 && s.breaker == BreakerState::Closed && !s.conservative {
            return h;
        }
        let status = match h.status {
            HealthStatus::Up => HealthStatus::Degraded,
            other => other,
        };
        Health::new(
            status,
            h.transport,
            format!(
                "{}; breaker {}{}, {} records ({} bytes) spooled",
                h.detail,
                s.breaker.as_str(),
                if s.conservative {
                    " (conservative)"
                } else {
                    ""
                },
                s.spool.records,
                s.spool.bytes
            ),
            h.round_trip,
        )
    }

    async fn flush(&self) -> Result<()> {
        match self.inner() {
            Some(t) => t.flush().await,
            None => Ok(()),
        }
    }

    fn nonce_store(&self) -> Option<Arc<dyn crate::security::NonceStore>> {
        self.inner().and_then(|t| t.nonce_store())
    }

    async fn close(&self) -> Result<()> {
        self.shared.closed.store(true, Ordering::SeqCst);
        let flusher = self
            .flusher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(f) = flusher {
            // Stops between batches or while waiting; what is left stays
            // in the spool for the next process.
            f.abort();
            let _ = f.await;
        }
        match self.inner() {
            Some(t) => t.close().await,
            None => Ok(()),
        }
    }
}
