//! One subscription as the core's delivery engine sees it: reads on its
//! own connection (XREADGROUP BLOCK must not stall the shared, multiplexed
//! one), claim passes, and settlement by entry id. The engine owns the
//! timing (leases, expiry, prefetch, crash charging); this maps it onto
//! Redis.

use std::collections::HashMap;
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
        Err(e) => Err(redis_error(
            e,
            &format!("XGROUP CREATE of {group} on {key} failed"),
        )),
    }
}

/// A group's line of an `XINFO GROUPS` reply.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct GroupInfo {
    pub name: String,
    /// Entries delivered and not acknowledged (the PEL).
    pub pending: u64,
    /// Entries not delivered to the group yet; `None` where Redis cannot
    /// tell (entries deleted from the middle of the stream).
    pub lag: Option<u64>,
    /// The id of the last entry delivered to the group.
    pub last_delivered: String,
}

/// The records of an `XINFO GROUPS` or `XINFO CONSUMERS` reply, each as
/// its field/value pairs (RESP2 flat pairs or RESP3 maps).
fn records(v: &Value) -> Vec<Vec<(&Value, &Value)>> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|r| match r {
            Value::Array(flat) => Some(
                flat.chunks(2)
                    .filter_map(|c| Some((c.first()?, c.get(1)?)))
                    .collect(),
            ),
            Value::Map(m) => Some(m.iter().map(|(k, v)| (k, v)).collect()),
            _ => None,
        })
        .collect()
}

/// A consumer of an `XINFO CONSUMERS` reply.
#[derive(Debug, Default)]
pub(crate) struct ConsumerInfo {
    pub name: String,
    /// Entries it holds unacknowledged.
    pub pending: u64,
    /// Milliseconds since it last read (or claimed).
    pub idle_ms: u64,
}

/// The consumers of an `XINFO CONSUMERS` reply.
pub(crate) fn consumers(v: &Value) -> Vec<ConsumerInfo> {
    let count = |v: &Value| wire::as_int(v).and_then(|i| u64::try_from(i).ok());
    let mut out = Vec::new();
    for pairs in records(v) {
        let mut c = ConsumerInfo::default();
        for (k, val) in pairs {
            match wire::as_bytes(k) {
                Some(b"name") => c.name = wire::as_string(val).unwrap_or_default(),
                Some(b"pending") => c.pending = count(val).unwrap_or(0),
                Some(b"idle") => c.idle_ms = count(val).unwrap_or(0),
                _ => {}
            }
        }
        if !c.name.is_empty() {
            out.push(c);
        }
    }
    out
}

/// The groups of an `XINFO GROUPS` reply (RESP2 flat pairs or RESP3 maps).
pub(crate) fn groups(v: &Value) -> Vec<GroupInfo> {
    let mut out = Vec::new();
    for pairs in records(v) {
        let mut info = GroupInfo::default();
        let count = |v: &Value| wire::as_int(v).and_then(|i| u64::try_from(i).ok());
        for (k, val) in pairs {
            match wire::as_bytes(k) {
                Some(b"name") => info.name = wire::as_string(val).unwrap_or_default(),
                Some(b"pending") => info.pending = count(val).unwrap_or(0),
                Some(b"lag") => info.lag = count(val),
                Some(b"last-delivered-id") => {
                    info.last_delivered = wire::as_string(val).unwrap_or_default()
                }
                _ => {}
            }
        }
        if !info.name.is_empty() {
            out.push(info);
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
    /// Key-ordered subscriptions: the group-wide key queues.
    korder: Option<KeyOrder>,
}

/// Per-key order across the consumers of a group (see
/// [`crate::scripts::KREAD`]): a keyed entry goes to the engine only once it
/// heads its key's queue; until then it waits here.
struct KeyOrder {
    /// `<prefix><topic>:korder:<group>:`
    prefix: String,
    /// Key of each keyed entry held here (to take it off its queue).
    keys: Mutex<HashMap<String, String>>,
    /// Read, and not yet the head of its key.
    waiting: Mutex<Vec<Fetched<String>>>,
}

/// How often a consumer with waiting entries looks whether they head their
/// keys yet (another consumer's settlement frees them).
const HEAD_POLL: Duration = Duration::from_millis(10);

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
        korder: sub.key_ordered.then(|| KeyOrder {
            prefix: inner.key_queue_prefix(&sub.topic, sub.group.as_str()),
            keys: Mutex::new(HashMap::new()),
            waiting: Mutex::new(Vec::new()),
        }),
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
        if let (Some(ko), Ok(env)) = (&self.korder, &message) {
            if let Some(k) = &env.key {
                lock(&ko.keys).insert(id.clone(), k.clone());
            }
        }
        Fetched::new(id.clone(), message, attempt, Some(id)).recovered(recovered)
    }

    /// Whether this fetch starts with a claim pass.
    fn claim_due(&self) -> bool {
        let now = Instant::now();
        let mut next = lock(&self.next_claim);
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
        let next_claim = *lock(&self.next_claim);
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

/// Key-ordered subscriptions (see [`KeyOrder`]).
impl RedisSource {
    async fn fetch_key_ordered(&self, ko: &KeyOrder, max: usize) -> Result<Vec<Fetched<String>>> {
        let until = Instant::now() + self.inner.cfg.block;
        loop {
            let waiting = std::mem::take(&mut *lock(&ko.waiting));
            let mut out = self.admit(ko, waiting).await?;
            if out.len() > max {
                // Still heads: handed on by a later fetch.
                lock(&ko.waiting).extend(out.split_off(max));
            }
            let mut last = None;
            if out.len() < max {
                let mut got = if self.claim_due() {
                    self.claim(max - out.len()).await?
                } else {
                    Vec::new()
                };
                let held = lock(&ko.waiting).len() + out.len();
                let room = (max - out.len()).min(self.sub.prefetch.saturating_sub(held));
                if got.is_empty() && room > 0 {
                    let (read, l) = self.kread(ko, room).await?;
                    got = read;
                    last = l;
                }
                out.extend(self.admit(ko, got).await?);
            }
            if !out.is_empty() || Instant::now() >= until || self.inner.cancel.is_cancelled() {
                return Ok(out);
            }
            match last.filter(|_| lock(&ko.waiting).is_empty()) {
                Some(last) => self.wait_after(&last, until).await?,
                None => tokio::time::sleep(HEAD_POLL).await,
            }
        }
    }

    /// See [`crate::scripts::KREAD`].
    async fn kread(
        &self,
        ko: &KeyOrder,
        max: usize,
    ) -> Result<(Vec<Fetched<String>>, Option<String>)> {
        let mut conn = self.inner.conn.clone();
        let v = self
            .inner
            .kread
            .key(&*self.key)
            .arg(&*self.group)
            .arg(self.sub.consumer.as_str())
            .arg(max)
            .arg(&ko.prefix)
            .arg(oona_core::wire::fields::name::KEY)
            .invoke_async::<Value>(&mut conn)
            .await;
        let v = match v {
            Ok(v) => v,
            Err(e) if e.code() == Some("NOGROUP") => {
                create_group(&mut conn, &self.key, &self.group, "0").await?;
                return Ok((Vec::new(), None));
            }
            Err(e) => return Err(redis_error(e, "key-ordered read failed")),
        };
        let (entries, last) = wire::parse_kread(v)?;
        let fetched = entries.into_iter().map(|e| self.fetched(e, 1, false));
        Ok((fetched.collect(), last))
    }

    /// Block until the stream has an entry after `last` (or `until`).
    async fn wait_after(&self, last: &str, until: Instant) -> Result<()> {
        let block = until
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let mut conn = self.read.lock().await;
        redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(ms(block))
            .arg("STREAMS")
            .arg(&*self.key)
            .arg(last)
            .query_async::<Value>(&mut *conn)
            .await
            .map(|_| ())
            .map_err(|e| redis_error(e, "XREAD failed"))
    }

    /// Of `items`, the ones that may go now: unkeyed ones, and keyed ones
    /// that head their key's queue (see [`crate::scripts::KHEADS`]). The
    /// others wait here; ones no longer pending for this consumer are
    /// dropped (another consumer has them).
    async fn admit(
        &self,
        ko: &KeyOrder,
        items: Vec<Fetched<String>>,
    ) -> Result<Vec<Fetched<String>>> {
        let mut keyed: Vec<(String, Fetched<String>)> = Vec::new();
        let mut ready = Vec::new();
        {
            let keys = lock(&ko.keys);
            for f in items {
                match keys.get(&f.token) {
                    Some(k) => keyed.push((k.clone(), f)),
                    None => ready.push(f),
                }
            }
        }
        if keyed.is_empty() {
            return Ok(ready);
        }
        let mut conn = self.inner.conn.clone();
        let mut inv = self.inner.kheads.key(&*self.key);
        inv.arg(&*self.group)
            .arg(self.sub.consumer.as_str())
            .arg(&ko.prefix);
        for (k, f) in &keyed {
            inv.arg(k).arg(&f.token);
        }
        let states = match inv.invoke_async::<Vec<i64>>(&mut conn).await {
            Ok(s) => s,
            Err(e) => {
                lock(&ko.waiting).extend(keyed.into_iter().map(|(_, f)| f));
                return Err(redis_error(e, "key-ordered hand-out check failed"));
            }
        };
        let mut waiting = lock(&ko.waiting);
        for ((_, f), state) in keyed.into_iter().zip(states) {
            match state {
                1 => ready.push(f),
                0 => waiting.push(f),
                _ => {
                    lock(&ko.keys).remove(&f.token);
                }
            }
        }
        Ok(ready)
    }

    /// Refresh the idle time of entries waiting here for their keys (the
    /// engine refreshes only what it holds), dropping the ones another
    /// consumer took.
    async fn extend_waiting(&self, ko: &KeyOrder) {
        let ids: Vec<String> = lock(&ko.waiting).iter().map(|f| f.token.clone()).collect();
        if ids.is_empty() {
            return;
        }
        match self.extend_ids(&ids).await {
            Ok(kept) => {
                let gone: Vec<&String> = ids
                    .iter()
                    .zip(kept)
                    .filter(|(_, k)| !*k)
                    .map(|(id, _)| id)
                    .collect();
                lock(&ko.waiting).retain(|f| !gone.contains(&&f.token));
            }
            Err(e) => tracing::debug!(error = %e, "refreshing waiting entries failed"),
        }
    }

    /// See [`crate::scripts::EXTEND`]: per id, whether it is still pending
    /// for this consumer (its idle time now reset).
    async fn extend_ids(&self, ids: &[String]) -> Result<Vec<bool>> {
        let mut conn = self.inner.conn.clone();
        let mut inv = self.inner.extend.key(&*self.key);
        inv.arg(&*self.group)
            .arg(self.sub.consumer.as_str())
            .arg(ids);
        let kept: Vec<i64> = inv
            .invoke_async(&mut conn)
            .await
            .map_err(|e| redis_error(e, "refreshing leases failed"))?;
        Ok(kept.into_iter().map(|k| k == 1).collect())
    }

    /// Take a settled entry off its key's queue (acking it first if `ack`);
    /// `false` when it is not a keyed entry of a key-ordered subscription.
    async fn key_done(&self, id: &str, ack: bool) -> Result<bool> {
        let Some(ko) = &self.korder else {
            return Ok(false);
        };
        let Some(k) = lock(&ko.keys).remove(id) else {
            return Ok(false);
        };
        let mut conn = self.inner.conn.clone();
        self.inner
            .kdone
            .key(&*self.key)
            .arg(&*self.group)
            .arg(format!("{}{k}", ko.prefix))
            .arg(id)
            .arg(if ack { "1" } else { "0" })
            .invoke_async::<()>(&mut conn)
            .await
            .map_err(|e| redis_error(e, "key-ordered settlement failed"))?;
        Ok(true)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain bookkeeping; a panic elsewhere must not wedge the subscription.
    m.lock().unwrap_or_else(|p| p.into_inner())
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
        if let Some(ko) = &self.korder {
            return self.fetch_key_ordered(ko, max).await;
        }
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
        if self.key_done(&id, true).await? {
            return Ok(());
        }
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
        if let Err(e) = self.key_done(&id, false).await {
            // The next look at its key's queue drops it (not pending).
            tracing::debug!(error = %e, "taking a dead letter off its key queue failed");
        }
        Ok(())
    }

    /// See [`crate::scripts::RELEASE`].
    async fn release(&self, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        if let Some(ko) = &self.korder {
            // Still pending, so still on their key queues.
            let mut keys = lock(&ko.keys);
            for id in &ids {
                keys.remove(id);
            }
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
        let kept = self.extend_ids(&ids).await?;
        if let Some(ko) = &self.korder {
            self.extend_waiting(ko).await;
        }
        Ok(kept)
    }

    /// Key-ordered: what waits here goes back to the group at once.
    async fn close(&self) {
        if let Some(ko) = &self.korder {
            let waiting = std::mem::take(&mut *lock(&ko.waiting));
            self.release(waiting.into_iter().map(|f| f.token).collect())
                .await;
        }
    }
}
