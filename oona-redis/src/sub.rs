//! One subscription: a reader task on its own connection (XREADGROUP BLOCK
//! must not stall the shared, multiplexed one), claim passes, and the
//! settlement of its deliveries.

use std::future::Future as _;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use oona_core::{
    rules, ContentType, Delivery, DeliveryInfo, DeliveryStream, Envelope, Error, ErrorKind, Result,
    Settle, Settlement, Subscription,
};
use redis::aio::ConnectionManager;
use redis::Value;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
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

pub(crate) struct Sub {
    inner: Arc<Inner>,
    sub: Subscription,
    key: Arc<str>,
    group: Arc<str>,
    delayed: String,
    tx: mpsc::Sender<Result<Delivery>>,
    permits: Arc<Semaphore>,
}

pub(crate) fn start(
    inner: Arc<Inner>,
    sub: Subscription,
    read_conn: ConnectionManager,
) -> DeliveryStream {
    let (tx, mut rx) = mpsc::channel(sub.prefetch + 8);
    let cancel = inner.cancel.clone();
    let reader_list = Arc::clone(&inner);
    let reader_list = &reader_list.readers;
    let s = Arc::new(Sub {
        key: inner.stream_key(&sub.topic).into(),
        group: sub.group.as_str().into(),
        delayed: inner.delayed_key(&sub.topic, sub.group.as_str()),
        permits: Arc::new(Semaphore::new(sub.prefetch)),
        inner,
        sub,
        tx,
    });
    let handle = tokio::spawn(s.run(read_conn));
    if let Ok(mut readers) = reader_list.lock() {
        readers.retain(|h| !h.is_finished());
        readers.push(handle);
    }
    // The stream ends as soon as the transport is closed; deliveries still
    // buffered then stay pending in Redis and come back after the deadline.
    // Kept across polls so a task waiting on the stream is woken by close.
    let mut cancelled = Box::pin(cancel.cancelled_owned());
    futures::stream::poll_fn(move |cx| {
        if cancelled.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(None);
        }
        rx.poll_recv(cx)
    })
    .fuse()
    .boxed()
}

impl Sub {
    async fn run(self: Arc<Self>, mut conn: ConnectionManager) {
        let cfg = &self.inner.cfg;
        let cancel = self.inner.cancel.clone();
        let mut next_claim = Instant::now();
        let mut failing = false;
        let mut backoff = Duration::from_millis(50);
        loop {
            if cancel.is_cancelled() || self.tx.is_closed() {
                return;
            }
            let first = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.tx.closed() => return,
                p = Arc::clone(&self.permits).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            // One multi-permit for the whole read; each delivery splits one
            // off (no per-entry semaphore round trips).
            let mut permits = first;
            // While the consumer still has deliveries queued, wait until a
            // good share of the prefetch is free, so reads stay large (one
            // round trip for many entries) instead of one entry per freed
            // permit. An idle consumer (empty queue) is served at once.
            // Bounded (20 ms) so a consumer that holds deliveries without
            // reading on still gets the free capacity used.
            let low = (cfg.read_batch.min(self.sub.prefetch) / 2).max(1);
            let patience = Instant::now() + Duration::from_millis(20);
            while permits.num_permits() + self.permits.available_permits() < low
                && self.tx.capacity() < self.tx.max_capacity()
                && Instant::now() < patience
            {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    p = Arc::clone(&self.permits).acquire_owned() => match p {
                        Ok(p) => permits.merge(p),
                        Err(_) => return,
                    },
                    _ = tokio::time::sleep(Duration::from_millis(1)) => {}
                }
            }
            let extra = self
                .permits
                .available_permits()
                .min(cfg.read_batch.saturating_sub(permits.num_permits()));
            if extra > 0 {
                if let Ok(more) = Arc::clone(&self.permits).try_acquire_many_owned(extra as u32) {
                    permits.merge(more);
                }
            }
            let result = if Instant::now() >= next_claim {
                next_claim = Instant::now() + cfg.claim_interval;
                match self.claim(&mut permits).await {
                    Ok(0) => self.read(&mut conn, &mut permits, next_claim).await,
                    other => other.map(|_| ()),
                }
            } else {
                self.read(&mut conn, &mut permits, next_claim).await
            };
            match result {
                Ok(()) => {
                    if failing {
                        tracing::info!(topic = %self.sub.topic, group = %self.group, "subscription reading again");
                    }
                    failing = false;
                    backoff = Duration::from_millis(50);
                }
                Err(e) if !e.is_temporary() => {
                    // Retrying cannot help (e.g. the key is not a stream):
                    // report it and end the stream, as the contract says.
                    tracing::error!(topic = %self.sub.topic, group = %self.group, error = %e, "subscription failed");
                    let _ = self.tx.try_send(Err(e));
                    return;
                }
                Err(e) => {
                    drop(permits);
                    if !failing {
                        tracing::warn!(topic = %self.sub.topic, group = %self.group, error = %e, "subscription cannot read; retrying");
                        // Reported once per outage; temporary errors do not
                        // end the stream.
                        let _ = self.tx.try_send(Err(e));
                    }
                    failing = true;
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    async fn read(
        self: &Arc<Self>,
        conn: &mut ConnectionManager,
        permits: &mut OwnedSemaphorePermit,
        next_claim: Instant,
    ) -> Result<()> {
        let block = next_claim
            .saturating_duration_since(Instant::now())
            .min(self.inner.cfg.block)
            .max(Duration::from_millis(1));
        let reply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&*self.group)
            .arg(self.sub.consumer.as_str())
            .arg("COUNT")
            .arg(permits.num_permits())
            .arg("BLOCK")
            .arg(u64::try_from(block.as_millis()).unwrap_or(1))
            .arg("STREAMS")
            .arg(&*self.key)
            .arg(">")
            .query_async::<Value>(conn)
            .await;
        let reply = match reply {
            Ok(v) => v,
            Err(e) if e.code() == Some("NOGROUP") => {
                // The stream or group vanished (topic deleted, or a server
                // restarted without persistence): make it again and read
                // everything that arrives from now on.
                let mut c = self.inner.conn.clone();
                create_group(&mut c, &self.key, &self.group, "0").await?;
                return Ok(());
            }
            Err(e) => return Err(redis_error(e, "XREADGROUP failed")),
        };
        let entries = wire::parse_xreadgroup(reply)?;
        if self.inner.cancel.is_cancelled() || self.tx.is_closed() {
            let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
            self.release(&ids).await;
            return Ok(());
        }
        for entry in entries {
            let Some(p) = permits.split(1) else { break };
            // XREADGROUP ">" is always a first delivery.
            self.deliver(entry, 1, p).await;
        }
        Ok(())
    }

    /// Claim due delayed nacks and entries idle past the ack deadline.
    async fn claim(self: &Arc<Self>, permits: &mut OwnedSemaphorePermit) -> Result<usize> {
        let mut conn = self.inner.conn.clone();
        let v: Value = self
            .inner
            .claim
            .key(&*self.key)
            .key(&self.delayed)
            .arg(&*self.group)
            .arg(self.sub.consumer.as_str())
            .arg(u64::try_from(self.sub.ack_deadline.as_millis()).unwrap_or(u64::MAX))
            .arg(permits.num_permits())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| redis_error(e, "claim script failed"))?;
        let claimed = wire::parse_claimed(v)?;
        let n = claimed.len();
        for (entry, count) in claimed {
            let Some(p) = permits.split(1) else { break };
            self.deliver(entry, count, p).await;
        }
        Ok(n)
    }

    /// Hand an entry to the consumer, or dead-letter it (poison, or past
    /// its last attempt).
    async fn deliver(self: &Arc<Self>, entry: Entry, attempt: u32, permit: OwnedSemaphorePermit) {
        let info = DeliveryInfo::new(&self.sub, attempt, Some(entry.id.clone()));
        let mut entry = entry;
        let env = match wire::decode(&mut entry, &self.sub.topic) {
            Ok(env) => env,
            Err(e) => {
                let (dl, reason) = rules::poison_dead_letter(
                    &self.sub.topic,
                    wire::raw_json(&entry),
                    ContentType::json(),
                    &e,
                    &info,
                );
                tracing::warn!(topic = %self.sub.topic, id = %entry.id, %reason, "poison entry dead-lettered");
                self.dead_letter_logged(&entry.id, &dl).await;
                return;
            }
        };
        if let Some((dl, reason)) = rules::exceeded_attempts(&env, &info) {
            tracing::info!(topic = %self.sub.topic, id = %entry.id, %reason, "dead-lettered");
            self.dead_letter_logged(&entry.id, &dl).await;
            return;
        }
        let settle = RedisSettle {
            sub: Arc::clone(self),
            id: entry.id,
            permit,
        };
        // A slot first, so a close or a dropped stream is noticed even when
        // the consumer has stopped reading (the entry is then given back).
        let slot = tokio::select! {
            biased;
            _ = self.inner.cancel.cancelled() => None,
            r = self.tx.reserve() => r.ok(),
        };
        match slot {
            Some(slot) => slot.send(Ok(Delivery::new(env, info, Box::new(settle)))),
            None => self.release(&[settle.id.as_str()]).await,
        }
    }

    /// Give back entries read but never handed out (see
    /// [`crate::scripts::RELEASE`]).
    async fn release(&self, ids: &[&str]) {
        if ids.is_empty() {
            return;
        }
        let mut conn = self.inner.conn.clone();
        let mut inv = self.inner.release.key(&*self.key);
        inv.key(&self.delayed)
            .arg(&*self.group)
            .arg(self.sub.consumer.as_str())
            .arg(ids);
        if let Err(e) = inv.invoke_async::<()>(&mut conn).await {
            tracing::debug!(error = %e, "giving back unread entries failed; they come back after the ack deadline");
        }
    }

    async fn dead_letter_logged(&self, id: &str, dl: &Envelope) {
        if let Err(e) = self.dead_letter(id, dl).await {
            // It stays pending and is claimed again after the ack deadline.
            tracing::warn!(topic = %self.sub.topic, %id, error = %e, "dead-lettering failed; will retry after the ack deadline");
        }
    }

    /// XADD the dead letter and XACK the original in one MULTI/EXEC.
    async fn dead_letter(&self, id: &str, dl: &Envelope) -> Result<()> {
        let inner = &self.inner;
        let mut pipe = redis::pipe();
        pipe.atomic();
        let (min_id, added) = inner.prepare_topic(&mut pipe, &dl.topic);
        wire::xadd(&mut pipe, &inner.stream_key(&dl.topic), min_id, dl);
        pipe.ignore();
        pipe.cmd("XACK")
            .arg(&*self.key)
            .arg(&*self.group)
            .arg(id)
            .ignore();
        pipe.cmd("ZREM").arg(&self.delayed).arg(id).ignore();
        let mut conn = inner.conn.clone();
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| redis_error(e, "dead-lettering (XADD + XACK) failed"))?;
        if added {
            inner.mark_recorded(&dl.topic);
        }
        Ok(())
    }
}

struct RedisSettle {
    sub: Arc<Sub>,
    id: String,
    permit: OwnedSemaphorePermit,
}

fn not_pending(id: &str) -> Error {
    Error::new(
        ErrorKind::AlreadySettled,
        format!("entry {id} is no longer pending for this consumer (its ack deadline passed and another delivery took it, or it was settled)"),
    )
    .with_transport(NAME)
}

#[async_trait]
impl Settle for RedisSettle {
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<()> {
        let RedisSettle { sub, id, permit } = *self;
        let inner = &sub.inner;
        match settlement {
            Settlement::Ack => {
                inner.check_open()?;
                inner
                    .acker
                    .ack(Arc::clone(&sub.key), Arc::clone(&sub.group), id)
            }
            Settlement::Redeliver { delay } if delay.is_zero() => {
                inner.check_open()?;
                let mut conn = inner.conn.clone();
                let v: Value = inner
                    .renew
                    .key(&*sub.key)
                    .key(&sub.delayed)
                    .arg(&*sub.group)
                    .arg(sub.sub.consumer.as_str())
                    .arg(&id)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| redis_error(e, "nack failed"))?;
                if matches!(v, Value::Int(0)) {
                    return Err(not_pending(&id));
                }
                // Redelivered at once to this consumer, on the same permit.
                if let Some((entry, count)) = wire::parse_claimed(v)?.into_iter().next() {
                    sub.deliver(entry, count, permit).await;
                }
                Ok(())
            }
            Settlement::Redeliver { delay } => {
                inner.check_open()?;
                let mut conn = inner.conn.clone();
                let v: i64 = inner
                    .nack
                    .key(&*sub.key)
                    .key(&sub.delayed)
                    .arg(&*sub.group)
                    .arg(sub.sub.consumer.as_str())
                    .arg(&id)
                    .arg(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX))
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| redis_error(e, "nack failed"))?;
                if v == 0 {
                    return Err(not_pending(&id));
                }
                Ok(())
            }
            Settlement::DeadLetter { dead_letter, .. } => {
                inner.check_open()?;
                sub.dead_letter(&id, &dead_letter).await
            }
        }
    }
}
