//! One subscription as the core's delivery engine sees it: reads on its
//! own connection (XREADGROUP BLOCK must not stall the shared, multiplexed
//! one), claim passes, and settlement by entry id. The engine owns the
//! timing (leases, expiry, prefetch, crash charging); this maps it onto
//! Redis.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use oona_core::engine::{self, Fetched, Poison, Source};
use oona_core::{ContentType, DeliveryStream, Envelope, Error, ErrorKind, Result, Subscription};
use redis::aio::ConnectionManager;
use redis::Value;
use tokio::time::Instant;

use crate::wire::{self, Entry};
use crate::{redis_error, Inner, NAME};

/// `XGROUP CREATE key group id MKSTREAM`; an existing group is kept as it is.
pub(crate) async fn create_group(
    conn: &mut ConnectionManager,
    key: &str,
    group: &str,
    start: &str,
) -> Result<()> {
    let r = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg(group)
        .arg(start)
        .arg("MKSTREAM")
        .query_async::<()>(conn)
        .await;
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(redis_error(e, "XGROUP CREATE failed")),
    }
}

/// Group names from an `XINFO GROUPS` reply.
pub(crate) fn group_names(v: &Value) -> Vec<String> {
    let Value::Array(groups) = v else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for g in groups {
        let pairs: Vec<(&Value, &Value)> = match g {
            Value::Array(flat) => flat
                .chunks(2)
                .filter_map(|c| Some((c.first()?, c.get(1)?)))
                .collect(),
            Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
            _ => continue,
        };
        for (k, val) in pairs {
            if wire::as_bytes(k) == Some(b"name") {
                if let Some(n) = wire::as_string(val) {
                    out.push(n);
                }
            }
        }
    }
    out
}

pub(crate) struct RedisSource {
    inner: Arc<Inner>,
    sub: Subscription,
    key: Arc<str>,
    group: Arc<str>,
    delayed: String,
    /// The subscription's own connection, for the blocking read.
    read: tokio::sync::Mutex<ConnectionManager>,
    next_claim: Mutex<Instant>,
    /// The last claim pass found a recovered entry: look for the next one
    /// at once (a crashed consumer's entries come back one at a time).
    claim_now: AtomicBool,
}

pub(crate) fn start(
    inner: Arc<Inner>,
    sub: Subscription,
    read_conn: ConnectionManager,
) -> DeliveryStream {
    let closed = inner.cancel.clone().cancelled_owned();
    let source = RedisSource {
        key: inner.stream_key(&sub.topic).into(),
        group: sub.group.as_str().into(),
        delayed: inner.delayed_key(&sub.topic, sub.group.as_str()),
        read: tokio::sync::Mutex::new(read_conn),
        next_claim: Mutex::new(Instant::now()),
        claim_now: AtomicBool::new(false),
        inner: Arc::clone(&inner),
        sub: sub.clone(),
    };
    let (stream, task) = engine::start(source, sub, closed);
    if let Ok(mut readers) = inner.readers.lock() {
        readers.retain(|h| !h.is_finished());
        readers.push(task);
    }
    stream
}

impl RedisSource {
    fn fetched(&self, entry: Entry, attempt: u32, recovered: bool) -> Fetched<String> {
        let mut entry = entry;
        let message = wire::decode(&mut entry, &self.sub.topic)
            .map_err(|e| Poison::new(wire::raw_json(&entry), ContentType::json(), e));
        let id = entry.id;
        Fetched::new(id.clone(), message, attempt, Some(id)).recovered(recovered)
    }

    /// Whether this fetch starts with a claim pass.
    fn claim_due(&self) -> bool {
        let now = Instant::now();
        let mut next = self.next_claim.lock().unwrap_or_else(|p| p.into_inner());
        if self.claim_now.swap(false, Ordering::AcqRel) || now >= *next {
            *next = now + self.inner.cfg.claim_interval;
            return true;
        }
        false
    }

    /// Claim due delayed nacks, else one entry idle past the ack deadline
    /// (its holder vanished).
    async fn claim(&self, max: usize) -> Result<Vec<Fetched<String>>> {
        let mut conn = self.inner.conn.clone();
        let v: Value = self
            .inner
            .claim
            .key(&*self.key)
            .key(&self.delayed)
            .arg(&*self.group)
            .arg(self.sub.consumer.as_str())
            .arg(u64::try_from(self.sub.ack_deadline.as_millis()).unwrap_or(u64::MAX))
            .arg(max)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| redis_error(e, "claim script failed"))?;
        let claimed = wire::parse_claimed(v)?;
        // More may be due (a full batch), or the next recovered entry:
        // claim again on the next fetch rather than after the interval.
        if claimed.len() >= max || claimed.iter().any(|(_, _, recovered)| *recovered) {
            self.claim_now.store(true, Ordering::Release);
        }
        Ok(claimed
            .into_iter()
            .map(|(e, count, recovered)| self.fetched(e, count, recovered))
            .collect())
    }

    async fn read(&self, max: usize) -> Result<Vec<Fetched<String>>> {
        let next_claim = *self.next_claim.lock().unwrap_or_else(|p| p.into_inner());
        let block = next_claim
            .saturating_duration_since(Instant::now())
            .min(self.inner.cfg.block)
            .max(Duration::from_millis(1));
        let mut conn = self.read.lock().await;
        let reply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&*self.group)
            .arg(self.sub.consumer.as_str())
            .arg("COUNT")
            .arg(max)
            .arg("BLOCK")
            .arg(u64::try_from(block.as_millis()).unwrap_or(1))
            .arg("STREAMS")
            .arg(&*self.key)
            .arg(">")
            .query_async::<Value>(&mut *conn)
            .await;
        let reply = match reply {
            Ok(v) => v,
            Err(e) if e.code() == Some("NOGROUP") => {
                // The stream or group vanished (topic deleted, or a server
                // restarted without persistence): make it again and read
                // everything that arrives from now on.
                let mut c = self.inner.conn.clone();
                create_group(&mut c, &self.key, &self.group, "0").await?;
                return Ok(Vec::new());
            }
            Err(e) => return Err(redis_error(e, "XREADGROUP failed")),
        };
        // XREADGROUP ">" is always a first delivery.
        Ok(wire::parse_xreadgroup(reply)?
            .into_iter()
            .map(|e| self.fetched(e, 1, false))
            .collect())
    }
}

fn not_pending(id: &str) -> Error {
    Error::new(
        ErrorKind::AlreadySettled,
        format!("entry {id} is no longer pending for this consumer (its broker lease ran out and another consumer claimed it, or it was settled)"),
    )
    .with_transport(NAME)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[async_trait]
impl Source for RedisSource {
    type Token = String;
    const BROKER_LEASES: bool = true;

    async fn fetch(&self, max: usize) -> Result<Vec<Fetched<String>>> {
        if self.inner.cancel.is_cancelled() {
            return Ok(Vec::new());
        }
        let max = max.clamp(1, self.inner.cfg.read_batch.max(1));
        if self.claim_due() {
            let claimed = self.claim(max).await?;
            if !claimed.is_empty() {
                return Ok(claimed);
            }
        }
        self.read(max).await
    }

    async fn ack(&self, id: String) -> Result<()> {
        self.inner.check_open()?;
        self.inner
            .acker
            .ack(Arc::clone(&self.key), Arc::clone(&self.group), id)
    }

    async fn redeliver(&self, id: String, delay: Duration) -> Result<Option<Fetched<String>>> {
        self.inner.check_open()?;
        let mut conn = self.inner.conn.clone();
        let script = if delay.is_zero() {
            &self.inner.renew
        } else {
            &self.inner.nack
        };
        let v: Value = script
            .key(&*self.key)
            .key(&self.delayed)
            .arg(&*self.group)
            .arg(self.sub.consumer.as_str())
            .arg(&id)
            .arg(ms(delay))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| redis_error(e, "nack failed"))?;
        if matches!(v, Value::Int(0)) {
            return Err(not_pending(&id));
        }
        if !delay.is_zero() {
            return Ok(None);
        }
        // Claimed again for this consumer at once, one attempt more.
        Ok(wire::parse_claimed(v)?
            .into_iter()
            .next()
            .map(|(e, count, _)| self.fetched(e, count, false)))
    }

    /// XADD the dead letter and XACK the original in one MULTI/EXEC.
    async fn dead_letter(&self, id: String, dl: Envelope) -> Result<()> {
        let inner = &self.inner;
        inner.check_open()?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        let (min_id, added) = inner.prepare_topic(&mut pipe, &dl.topic);
        wire::xadd(&mut pipe, &inner.stream_key(&dl.topic), min_id, &dl);
        pipe.ignore();
        pipe.cmd("XACK")
            .arg(&*self.key)
            .arg(&*self.group)
            .arg(&id)
            .ignore();
        pipe.cmd("ZREM").arg(&self.delayed).arg(&id).ignore();
        let mut conn = inner.conn.clone();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| redis_error(e, "dead-lettering (XADD + XACK) failed"))?;
        if added {
            inner.mark_recorded(&dl.topic);
        }
        Ok(())
    }

    /// See [`crate::scripts::RELEASE`].
    async fn release(&self, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        let mut conn = self.inner.conn.clone();
        let mut inv = self.inner.release.key(&*self.key);
        inv.key(&self.delayed)
            .arg(&*self.group)
            .arg(self.sub.consumer.as_str())
            .arg(&ids);
        if let Err(e) = inv.invoke_async::<()>(&mut conn).await {
            tracing::debug!(error = %e, "giving back unread entries failed; they come back after the ack deadline");
        }
    }

    /// See [`crate::scripts::EXTEND`].
    async fn extend(&self, ids: Vec<String>) -> Result<Vec<bool>> {
        let mut conn = self.inner.conn.clone();
        let mut inv = self.inner.extend.key(&*self.key);
        inv.arg(&*self.group)
            .arg(self.sub.consumer.as_str())
            .arg(&ids);
        let kept: Vec<i64> = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| redis_error(e, "refreshing leases failed"))?;
        Ok(kept.into_iter().map(|k| k == 1).collect())
    }
}
