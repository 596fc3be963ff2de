//! Subscriptions: a consumer-group member per [`Subscription`], manual
//! offset commits of settled messages, and a retry topic per group for
//! nacks and expired ack deadlines.
//!
//! One task per subscription owns the `StreamConsumer`. It tracks every
//! offset it has read per partition; a settlement marks its offset done,
//! and the committed offset of a partition only moves past a contiguous run
//! of settled offsets, so a later ack never commits past an earlier
//! unsettled message. Commits go out every `commit_interval`, and
//! synchronously when partitions are revoked and on close.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt as _, StreamExt as _};
use oona_core::{
    rules, ContentType, Delivery, DeliveryInfo, DeliveryStream, Envelope, Error, ErrorKind, Name,
    Result, Settle, Settlement, StartPosition, Subscription, Topic,
};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _, OwnedHeaders};
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::headers::{self, name as hname};
use crate::options::GroupProtocol;
use crate::transport::{closed_error, kafka_error, Inner, NAME};

/// Segment of retry topic names: `<topic>.__retry.<group>`. No Oona topic
/// can contain it (segments start with a letter), so retry topics never
/// collide with user topics.
pub(crate) const RETRY_SEGMENT: &str = "__retry";

/// The retry topic of `group` on `topic`.
pub fn retry_topic(topic: &Topic, group: &Name) -> String {
    let name = format!("{topic}.{RETRY_SEGMENT}.{group}");
    if name.len() <= 249 {
        return name;
    }
    // Kafka names stop at 249 bytes: a stable hash stands in for a long group.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in group.as_str().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{topic}.{RETRY_SEGMENT}.{h:016x}")
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Unix milliseconds of a tokio instant.
fn unix_ms_at(at: Instant) -> u64 {
    let now = Instant::now();
    if at > now {
        unix_ms_now() + (at - now).as_millis() as u64
    } else {
        unix_ms_now()
    }
}

#[derive(Default)]
struct Part {
    epoch: u64,
    /// Offsets read and not yet committed; `true` once settled.
    pending: BTreeMap<i64, bool>,
    /// Next offset to commit (one past the last contiguous settled one).
    commit: Option<i64>,
    dirty: bool,
    /// Last offset read, to log gaps (legitimate in Kafka after compaction
    /// or transactions; anything else points at the broker).
    last_read: Option<i64>,
}

impl Part {
    fn settle(&mut self, offset: i64) {
        if let Some(s) = self.pending.get_mut(&offset) {
            *s = true;
        }
        while let Some((&o, &true)) = self.pending.first_key_value() {
            self.pending.pop_first();
            self.commit = Some(o + 1);
            self.dirty = true;
        }
    }
}

struct InFlight {
    kafka_topic: Arc<str>,
    partition: i32,
    offset: i64,
    epoch: u64,
    deadline: Instant,
    raw: Raw,
    attempt: u32,
    position: String,
    /// A republish (retry or dead letter) is under way.
    busy: bool,
    /// The stream has yielded it to the consumer (until then it can be
    /// withdrawn when its partition moves).
    taken: bool,
}

/// A record as read, kept for its redelivery (cheaper than a second copy of
/// the decoded envelope: the payload is shared, the headers one block).
#[derive(Clone)]
struct Raw {
    payload: Bytes,
    headers: Option<OwnedHeaders>,
    key: Option<Bytes>,
}

#[derive(Default)]
struct State {
    parts: HashMap<(Arc<str>, i32), Part>,
    inflight: HashMap<u64, InFlight>,
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    next_id: u64,
    next_epoch: u64,
    /// The loop has ended: settlements can no longer be committed.
    ended: bool,
    /// Partitions this member holds now. Records of other partitions
    /// (fetched before a revoke, handed over after it) are dropped: their
    /// new owner delivers them, and committing them here could move the
    /// new owner's offset.
    assigned: HashSet<(Arc<str>, i32)>,
    /// Key-ordered subscriptions: keys whose redelivery is on its way
    /// through the retry topic, held until it is read back here (or, if
    /// another member reads it, until this instant).
    retrying: HashMap<Bytes, Instant>,
}

impl State {
    fn track(&mut self, topic: &Arc<str>, partition: i32, offset: i64) -> u64 {
        let next_epoch = &mut self.next_epoch;
        let part = self
            .parts
            .entry((Arc::clone(topic), partition))
            .or_insert_with(|| {
                *next_epoch += 1;
                tracing::debug!(
                    topic = &**topic,
                    partition,
                    offset,
                    "kafka: first record of a partition (re)assigned here"
                );
                Part {
                    epoch: *next_epoch,
                    ..Part::default()
                }
            });
        if let Some(last) = part.last_read {
            if offset > last + 1 {
                tracing::debug!(
                    topic = &**topic,
                    partition,
                    first = last + 1,
                    last = offset - 1,
                    "kafka: offsets skipped by the fetch"
                );
            }
        }
        part.last_read = Some(offset);
        part.pending.insert(offset, false);
        part.epoch
    }

    fn current(&self, topic: &Arc<str>, partition: i32, epoch: u64) -> bool {
        self.parts
            .get(&(Arc::clone(topic), partition))
            .is_some_and(|p| p.epoch == epoch)
    }

    /// Remove a delivery and mark its offset settled.
    fn finish(&mut self, id: u64) {
        if let Some(f) = self.inflight.remove(&id) {
            if let Some(p) = self
                .parts
                .get_mut(&(Arc::clone(&f.kafka_topic), f.partition))
            {
                if p.epoch == f.epoch {
                    p.settle(f.offset);
                }
            }
        }
    }

    /// Offsets to commit: of every dirty partition, or of `only`.
    fn commits(&mut self, only: Option<&TopicPartitionList>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for ((t, p), part) in self.parts.iter_mut() {
            if !part.dirty {
                continue;
            }
            if let Some(only) = only {
                if only.find_partition(t, *p).is_none() {
                    continue;
                }
            }
            if let Some(c) = part.commit {
                if tpl.add_partition_offset(t, *p, Offset::Offset(c)).is_ok() {
                    part.dirty = false;
                }
            }
        }
        tpl
    }
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the loop when a settlement frees a slot it waits for.
    wake: Notify,
    /// The loop waits for a slot: settlements must wake it.
    waiting: AtomicBool,
    /// Signalled on every settlement, for a revoke waiting on them.
    settled: std::sync::Condvar,
}

impl Shared {
    /// Whether another delivery may be handed out. When not, the loop
    /// asks settlements to wake it, then looks once more (a settlement may
    /// have freed a slot in between).
    fn has_room(&self, prefetch: usize) -> bool {
        if self.lock().inflight.len() < prefetch {
            return true;
        }
        self.waiting.store(true, Ordering::Release);
        self.lock().inflight.len() < prefetch
    }

    /// Wake the loop if it waits for a slot, and a revoke waiting for
    /// settlements.
    fn freed(&self) {
        self.settled.notify_all();
        if self.waiting.swap(false, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain data; a panic elsewhere must not wedge it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Ctx {
    shared: Arc<Shared>,
    /// Longest a revoke waits for unsettled deliveries of its partitions.
    revoke_wait: Duration,
    /// Told when the member gets its first assignment.
    assigned: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl ClientContext for Ctx {}

/// `topic/partition` of each element, for debug logs of rebalances.
fn listed(tpl: &TopicPartitionList) -> Vec<String> {
    tpl.elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect()
}

impl ConsumerContext for Ctx {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(a) = rebalance {
            tracing::debug!(partitions = ?listed(a), "kafka: partitions assigned");
            {
                let mut st = self.shared.lock();
                for e in a.elements() {
                    st.assigned.insert((Arc::from(e.topic()), e.partition()));
                }
            }
            let tx = self.assigned.lock().ok().and_then(|mut t| t.take());
            if let Some(tx) = tx {
                let _ = tx.send(());
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        tracing::debug!(partitions = ?listed(revoked), "kafka: partitions revoked");
        // Commit what is settled before the partitions go to another
        // member, then forget them: later settlements of their deliveries
        // can no longer be committed by us (the new owner redelivers them).
        let tpl = {
            let mut st = self.shared.lock();
            // Let the deliveries of these partitions be settled first (up to
            // `revoke_wait`), as Kafka consumers do in their revoke
            // callback: the new owner then starts after them, so a
            // rebalance neither duplicates them nor breaks per-key order.
            // Settlements come from other tasks; this waits on a condvar.
            // Deliveries still waiting in the stream's channel are withdrawn
            // (the stream skips them).
            let untaken: Vec<u64> = st
                .inflight
                .iter()
                .filter(|(_, f)| {
                    !f.taken
                        && !f.busy
                        && revoked
                            .find_partition(&f.kafka_topic, f.partition)
                            .is_some()
                })
                .map(|(id, _)| *id)
                .collect();
            for id in untaken {
                st.inflight.remove(&id);
            }
            let until = std::time::Instant::now() + self.revoke_wait;
            loop {
                let pending = !st.ended
                    && st.inflight.values().any(|f| {
                        revoked
                            .find_partition(&f.kafka_topic, f.partition)
                            .is_some()
                            && st.current(&f.kafka_topic, f.partition, f.epoch)
                    });
                let now = std::time::Instant::now();
                if !pending || now >= until {
                    break;
                }
                st = match self.shared.settled.wait_timeout(st, until - now) {
                    Ok((g, _)) => g,
                    Err(p) => p.into_inner().0,
                };
            }
            let tpl = st.commits(Some(revoked));
            for e in revoked.elements() {
                let tp = (Arc::from(e.topic()), e.partition());
                st.parts.remove(&tp);
                st.assigned.remove(&tp);
            }
            tpl
        };
        if tpl.count() > 0 {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                tracing::warn!(error = %e, "kafka: commit on partition revoke failed");
            }
        }
    }
}

/// What a republish task does.
enum Republish {
    /// To the retry topic as attempt `attempt + 1`, not before the instant
    /// (Unix ms); dead-lettered instead if that exceeds `max_attempts`.
    Retry { not_before: u64 },
    /// To the dead-letter topic.
    DeadLetter(Box<Envelope>),
}

#[derive(Clone)]
struct Ctl {
    inner: Arc<Inner>,
    shared: Arc<Shared>,
    sub: Arc<Subscription>,
    main_topic: Arc<str>,
    retry: Arc<str>,
}

impl Ctl {
    async fn republish(
        &self,
        raw: &Raw,
        attempt: u32,
        position: &str,
        what: Republish,
    ) -> Result<()> {
        match what {
            Republish::DeadLetter(dl) => self.inner.publish_dead_letter(&dl).await,
            Republish::Retry { not_before } => {
                let next = attempt + 1;
                let info = DeliveryInfo::new(&self.sub, next, Some(position.to_string()));
                let (envelope, _) = headers::decode(
                    raw.headers.as_ref(),
                    raw.key.as_deref(),
                    raw.payload.clone(),
                    &self.sub.topic,
                )?;
                if let Some((dl, reason)) = rules::exceeded_attempts(&envelope, &info) {
                    tracing::debug!(%reason, "kafka: dead-lettering");
                    return self.inner.publish_dead_letter(&dl).await;
                }
                let hs = headers::for_retry(raw.headers.as_ref(), next, not_before);
                self.inner
                    .send(&self.retry, raw.key.as_deref(), &raw.payload, hs)
                    .await?;
                if let (true, Some(k)) = (self.sub.key_ordered, &raw.key) {
                    // Hold the key until the retry is read back (set while
                    // the original still holds it: no gap).
                    let wait = Duration::from_millis(not_before.saturating_sub(unix_ms_now()));
                    let until = Instant::now() + wait + self.sub.ack_deadline;
                    self.shared.lock().retrying.insert(k.clone(), until);
                }
                Ok(())
            }
        }
    }

    /// Republish delivery `id` in the background, then settle its offset.
    /// On failure it is handed back to the deadline timer, retried in 1 s.
    fn spawn_republish(&self, id: u64, what: Republish) {
        let ctl = self.clone();
        tokio::spawn(async move {
            let (raw, attempt, position) = {
                let st = ctl.shared.lock();
                match st.inflight.get(&id) {
                    Some(f) => (f.raw.clone(), f.attempt, f.position.clone()),
                    None => return,
                }
            };
            let res = ctl.republish(&raw, attempt, &position, what).await;
            let mut st = ctl.shared.lock();
            match res {
                Ok(()) => st.finish(id),
                Err(e) => {
                    tracing::warn!(error = %e, "kafka: republish failed; retrying");
                    let at = Instant::now() + Duration::from_secs(1);
                    if let Some(f) = st.inflight.get_mut(&id) {
                        f.busy = false;
                        f.deadline = at;
                    }
                    st.deadlines.push(Reverse((at, id)));
                }
            }
            drop(st);
            ctl.shared.settled.notify_all();
            ctl.shared.wake.notify_one();
        });
    }
}

struct KafkaSettle {
    ctl: Ctl,
    id: u64,
}

#[async_trait]
impl Settle for KafkaSettle {
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<()> {
        let ctl = &self.ctl;
        let (raw, attempt, position) = {
            let mut st = ctl.shared.lock();
            if st.ended {
                return Err(closed_error());
            }
            let Some(f) = st.inflight.get_mut(&self.id) else {
                // Its ack deadline passed (it was redelivered) or its
                // partition moved to another member, which redelivers it.
                tracing::debug!("kafka: settlement of an expired or revoked delivery ignored");
                return Ok(());
            };
            if f.busy {
                return Ok(());
            }
            if matches!(settlement, Settlement::Ack) {
                st.finish(self.id);
                drop(st);
                ctl.shared.freed();
                return Ok(());
            }
            f.busy = true;
            (f.raw.clone(), f.attempt, f.position.clone())
        };
        let what = match settlement {
            Settlement::Redeliver { delay } => Republish::Retry {
                not_before: unix_ms_now() + delay.as_millis() as u64,
            },
            Settlement::DeadLetter { dead_letter, .. } => Republish::DeadLetter(dead_letter),
            // Handled above.
            Settlement::Ack => Republish::Retry { not_before: 0 },
        };
        let res = ctl.republish(&raw, attempt, &position, what).await;
        let mut st = ctl.shared.lock();
        match res {
            Ok(()) => st.finish(self.id),
            Err(_) => {
                if let Some(f) = st.inflight.get_mut(&self.id) {
                    f.busy = false;
                }
            }
        }
        drop(st);
        ctl.shared.freed();
        res
    }
}

/// A decoded record waiting to be handed out.
struct Ready {
    kafka_topic: Arc<str>,
    partition: i32,
    offset: i64,
    epoch: u64,
    envelope: Envelope,
    raw: Raw,
    attempt: u32,
    position: String,
}

/// Resolve the start position of a group that has no committed offsets
/// yet, and commit it, so the group starts where the subscription says
/// whenever its members join.
fn prepare_group(inner: &Inner, sub: &Subscription) -> Result<()> {
    let topic = sub.topic.as_str();
    let timeout = Timeout::After(inner.opts.timeout);
    let mut cfg = inner.opts.client_config();
    cfg.set("group.id", sub.group.as_str())
        .set("enable.auto.commit", "false");
    let c: BaseConsumer = cfg
        .create()
        .map_err(|e| kafka_error("create consumer", e))?;
    let md = c
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| kafka_error("fetch metadata", e))?;
    let n = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    let mut tpl = TopicPartitionList::new();
    for p in 0..n as i32 {
        tpl.add_partition(topic, p);
    }
    let until = std::time::Instant::now() + inner.opts.timeout;
    let committed = while_coordinator_moves(until, || c.committed_offsets(tpl.clone(), timeout))
        .map_err(|e| kafka_error("read committed offsets", e))?;
    if committed
        .elements()
        .iter()
        .any(|e| matches!(e.offset(), Offset::Offset(_)))
    {
        return Ok(()); // An existing group resumes where it is.
    }
    let mut start = TopicPartitionList::new();
    match sub.start {
        // auto.offset.reset=earliest does it.
        StartPosition::Earliest => return Ok(()),
        StartPosition::Latest => {
            for p in 0..n as i32 {
                let (_, high) = c
                    .fetch_watermarks(topic, p, timeout)
                    .map_err(|e| kafka_error("read end offsets", e))?;
                let _ = start.add_partition_offset(topic, p, Offset::Offset(high));
            }
        }
        StartPosition::At(t) => {
            let mut q = TopicPartitionList::new();
            for p in 0..n as i32 {
                let _ = q.add_partition_offset(topic, p, Offset::Offset(t.unix_millis() as i64));
            }
            let found = c
                .offsets_for_times(q, timeout)
                .map_err(|e| kafka_error("offsets for time", e))?;
            for e in found.elements() {
                let o = match e.offset() {
                    Offset::Offset(o) => o,
                    // Nothing at or after the time: start at the end.
                    _ => {
                        c.fetch_watermarks(topic, e.partition(), timeout)
                            .map_err(|e| kafka_error("read end offsets", e))?
                            .1
                    }
                };
                let _ = start.add_partition_offset(topic, e.partition(), Offset::Offset(o));
            }
        }
    }
    if start.count() > 0 {
        while_coordinator_moves(until, || c.commit(&start, CommitMode::Sync))
            .map_err(|e| kafka_error("commit start offsets", e))?;
    }
    Ok(())
}

/// Run a group coordinator call again while the broker says the group's
/// coordinator is not ready or has moved (the first use of a group, or of
/// `__consumer_offsets` on a fresh cluster, answers so for a moment), until
/// `until`. Blocking: called where the caller blocks anyway.
fn while_coordinator_moves<T>(
    until: std::time::Instant,
    mut call: impl FnMut() -> rdkafka::error::KafkaResult<T>,
) -> rdkafka::error::KafkaResult<T> {
    use rdkafka::types::RDKafkaErrorCode as Code;
    loop {
        match call() {
            Err(e)
                if std::time::Instant::now() < until
                    && matches!(
                        e.rdkafka_error_code(),
                        Some(Code::NotCoordinator)
                            | Some(Code::CoordinatorLoadInProgress)
                            | Some(Code::CoordinatorNotAvailable)
                    ) =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

/// Start a subscription: its stream and the task behind it.
pub(crate) async fn start(
    inner: Arc<Inner>,
    sub: Subscription,
) -> Result<(DeliveryStream, tokio::task::JoinHandle<()>)> {
    inner.ensure(&sub.topic).await?;
    let retry = retry_topic(&sub.topic, &sub.group);
    let policy = inner.opts.policies.for_topic(&sub.topic).clone();
    inner.ensure_kafka_topic(&retry, &policy).await?;
    {
        let inner = Arc::clone(&inner);
        let sub = sub.clone();
        tokio::task::spawn_blocking(move || prepare_group(&inner, &sub))
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, format!("start task: {e}")))??;
    }
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake: Notify::new(),
        waiting: AtomicBool::new(false),
        settled: std::sync::Condvar::new(),
    });
    let o = &inner.opts;
    let mut cfg = o.client_config();
    let max_poll = (sub.ack_deadline * 2).max(Duration::from_secs(300));
    cfg.set("group.id", sub.group.as_str())
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("group.protocol", o.group_protocol.as_str())
        .set("fetch.wait.max.ms", o.fetch_wait.as_millis().to_string())
        // Bounds what librdkafka prefetches per partition (default 64 MB).
        .set("queued.max.messages.kbytes", "16384")
        .set("max.poll.interval.ms", max_poll.as_millis().to_string());
    if o.group_protocol == GroupProtocol::Classic {
        // With KIP-848's protocol these are the broker's, and librdkafka
        // refuses them.
        cfg.set(
            "session.timeout.ms",
            o.session_timeout.as_millis().to_string(),
        )
        .set("heartbeat.interval.ms", o.heartbeat.as_millis().to_string());
    }
    let (assigned_tx, assigned_rx) = tokio::sync::oneshot::channel();
    let consumer: StreamConsumer<Ctx> = cfg
        .create_with_context(Ctx {
            shared: Arc::clone(&shared),
            revoke_wait: sub.ack_deadline.min(Duration::from_secs(10)),
            assigned: Mutex::new(Some(assigned_tx)),
        })
        .map_err(|e| kafka_error("create consumer", e))?;
    consumer
        .subscribe(&[sub.topic.as_str(), &retry])
        .map_err(|e| kafka_error("subscribe", e))?;
    // Unbounded, yet holding at most `prefetch` live deliveries (the
    // in-flight limit) plus withdrawn ones the stream has yet to skip.
    let (tx, rx) = mpsc::unbounded_channel();
    let stream_shared = Arc::clone(&shared);
    let ctl = Ctl {
        inner: Arc::clone(&inner),
        shared,
        main_topic: Arc::from(sub.topic.as_str()),
        sub: Arc::new(sub),
        retry: Arc::from(retry.as_str()),
    };
    let shutdown = inner.shutdown.subscribe();
    let join_timeout = ctl.inner.opts.timeout;
    let task = tokio::spawn(run(ctl, consumer, tx, shutdown));
    // Return once this member holds its share of the group, so that what
    // is published next is not first handed to a member about to lose
    // the partition (which would deliver it twice).
    match tokio::time::timeout(join_timeout, assigned_rx).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Err(closed_error()),
        Err(_) => {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!("kafka: joining consumer group took over {join_timeout:?}"),
            )
            .with_transport(NAME))
        }
    }
    // The stream skips deliveries withdrawn while they waited in the
    // channel (their partition moved: the new owner delivers them).
    let stream = futures::stream::unfold((rx, stream_shared), |(mut rx, shared)| async move {
        loop {
            let (id, d) = rx.recv().await?;
            let keep = {
                let mut st = shared.lock();
                let current = st
                    .inflight
                    .get(&id)
                    .is_some_and(|f| st.current(&f.kafka_topic, f.partition, f.epoch));
                match st.inflight.get_mut(&id) {
                    Some(f) if current => f.taken = true,
                    _ => {
                        st.inflight.remove(&id);
                    }
                }
                current
            };
            if keep {
                return Some((Ok(d), (rx, shared)));
            }
            shared.freed();
        }
    })
    .boxed();
    Ok((stream, task))
}

async fn run(
    ctl: Ctl,
    consumer: StreamConsumer<Ctx>,
    out: mpsc::UnboundedSender<(u64, Delivery)>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let main_topic: Arc<str> = Arc::clone(&ctl.main_topic);
    let prefetch = ctl.sub.prefetch.max(1);
    // Buffered records (read, not yet handed out) past which the loop stops
    // reading: librdkafka then stops fetching once its own queue is full
    // (`queued.max.messages.kbytes`). Pausing partitions instead would
    // make librdkafka drop and refetch what it holds on every resume.
    let read_limit = (prefetch * 4).max(1024);
    let mut ready: VecDeque<Ready> = VecDeque::new();
    let mut delayed: BinaryHeap<Reverse<(u64, u64)>> = BinaryHeap::new();
    let mut delayed_items: HashMap<u64, Ready> = HashMap::new();
    let mut delayed_seq = 0u64;
    let mut draining = false;
    let mut commit_tick = tokio::time::interval(ctl.inner.opts.commit_interval);
    commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if *shutdown.borrow() {
        return finish(ctl, consumer, out).await;
    }
    let mut messages = consumer.stream();
    loop {
        // Hand out what is ready while there is room.
        if !draining {
            let now_ms = unix_ms_now();
            while let Some(Reverse((at, seq))) = delayed.peek().copied() {
                if at > now_ms {
                    break;
                }
                delayed.pop();
                if let Some(r) = delayed_items.remove(&seq) {
                    ready.push_back(r);
                }
            }
            if ctl.sub.key_ordered {
                hand_out_key_ordered(&ctl, &out, prefetch, &mut ready, &delayed_items);
            } else {
                while !ready.is_empty() {
                    if !ctl.shared.has_room(prefetch) {
                        break;
                    }
                    let Some(r) = ready.pop_front() else { break };
                    send(&out, hand_out(&ctl, r));
                }
            }
        }
        // Flow control: stop reading while much is buffered. Rebalance
        // events wait meanwhile; they are served as soon as deliveries are
        // settled or expire.
        let reading = !draining && ready.len() + delayed_items.len() < read_limit;
        let next_timer = {
            let mut st = ctl.shared.lock();
            // Deadlines of settled deliveries are dropped lazily; rebuild
            // the heap when they dominate so memory stays flat.
            if st.deadlines.len() > 4 * st.inflight.len() + 4096 {
                let State {
                    deadlines,
                    inflight,
                    ..
                } = &mut *st;
                deadlines.retain(|Reverse((_, id))| inflight.contains_key(id));
            }
            let d = st.deadlines.peek().map(|Reverse((at, _))| *at);
            let w = delayed.peek().map(|Reverse((ms, _))| {
                Instant::now() + Duration::from_millis(ms.saturating_sub(unix_ms_now()))
            });
            match (d, w) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        let sleep_until = next_timer.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        if draining {
            ctl.shared.waiting.store(true, Ordering::Release);
        }
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            _ = out.closed(), if !draining => {
                draining = true;
                drain(&ctl);
            }
            m = messages.next(), if reading => {
                let mut m = m;
                // Take what librdkafka already holds without waiting, so one
                // wake-up handles a batch.
                let mut taken = 0;
                loop {
                    match m {
                        Some(Ok(m)) => on_message(&ctl, &main_topic, &m, &mut ready, &mut delayed, &mut delayed_items, &mut delayed_seq),
                        Some(Err(e)) => tracing::warn!(error = %e, "kafka consumer error"),
                        None => break,
                    }
                    taken += 1;
                    if taken >= 256 {
                        break;
                    }
                    m = match messages.next().now_or_never() {
                        Some(next) => next,
                        None => break,
                    };
                }
            }
            _ = ctl.shared.wake.notified() => {}
            _ = tokio::time::sleep_until(sleep_until) => expire(&ctl),
            _ = commit_tick.tick() => commit(&ctl, &consumer, CommitMode::Async),
        }
        if draining {
            if ctl.shared.lock().inflight.is_empty() {
                break;
            }
            // Keep the group membership alive while republishes finish.
            commit(&ctl, &consumer, CommitMode::Async);
        }
    }
    drop(messages);
    finish(ctl, consumer, out).await;
}

fn send(out: &mpsc::UnboundedSender<(u64, Delivery)>, d: Option<(u64, Delivery)>) {
    if let Some(d) = d {
        if out.send(d).is_err() {
            // The stream is gone; the loop notices and drains.
            tracing::debug!("kafka: delivery stream dropped");
        }
    }
}

/// Hand out with per-key order (`Subscription::key_ordered`): a record is
/// held while a delivery of its key is unsettled here, while a redelivery
/// of its key is on its way through the retry topic, and (for records of
/// the topic) while a retry record of its key waits here. A key lives on
/// one partition, which one member holds, so this orders the key in the
/// group.
fn hand_out_key_ordered(
    ctl: &Ctl,
    out: &mpsc::UnboundedSender<(u64, Delivery)>,
    prefetch: usize,
    ready: &mut VecDeque<Ready>,
    delayed_items: &HashMap<u64, Ready>,
) {
    if ready.is_empty() {
        return;
    }
    let (mut blocked, retrying) = {
        let mut st = ctl.shared.lock();
        // Records of partitions revoked since they were read go at once
        // (their new owner delivers them); left in place, each would cost
        // its key one pass of the loop, seconds after a rebalance.
        ready.retain(|r| st.current(&r.kafka_topic, r.partition, r.epoch));
        let now = Instant::now();
        st.retrying.retain(|_, until| *until > now);
        let blocked: HashSet<Bytes> = st
            .inflight
            .values()
            .filter_map(|f| f.raw.key.clone())
            .collect();
        let retrying: HashSet<Bytes> = st.retrying.keys().cloned().collect();
        (blocked, retrying)
    };
    // Keys with a retry record here: the retry goes first.
    let mut retry_first: HashSet<Bytes> = delayed_items
        .values()
        .chain(ready.iter())
        .filter(|r| !Arc::ptr_eq(&r.kafka_topic, &ctl.main_topic))
        .filter_map(|r| r.raw.key.clone())
        .collect();
    retry_first.extend(retrying);
    let mut i = 0;
    let mut held = false;
    while i < ready.len() {
        if !ctl.shared.has_room(prefetch) {
            break;
        }
        let r = &ready[i];
        if let Some(k) = &r.raw.key {
            let from_topic = Arc::ptr_eq(&r.kafka_topic, &ctl.main_topic);
            if blocked.contains(k) || (from_topic && retry_first.contains(k)) {
                held = true;
                i += 1;
                continue;
            }
        }
        let Some(r) = ready.remove(i) else { break };
        if let Some(k) = &r.raw.key {
            blocked.insert(k.clone());
            if !Arc::ptr_eq(&r.kafka_topic, &ctl.main_topic) {
                // Its retry was read: the marker has done its work.
                ctl.shared.lock().retrying.remove(k);
            }
        }
        send(out, hand_out(ctl, r));
    }
    if held {
        // A record waits for its key's delivery to be settled: that
        // settlement must wake the loop, not the next timer tick.
        ctl.shared.waiting.store(true, Ordering::Release);
    }
}

fn on_message(
    ctl: &Ctl,
    main_topic: &Arc<str>,
    m: &BorrowedMessage<'_>,
    ready: &mut VecDeque<Ready>,
    delayed: &mut BinaryHeap<Reverse<(u64, u64)>>,
    delayed_items: &mut HashMap<u64, Ready>,
    delayed_seq: &mut u64,
) {
    let kafka_topic: Arc<str> = if m.topic() == &**main_topic {
        Arc::clone(main_topic)
    } else {
        Arc::clone(&ctl.retry)
    };
    let (partition, offset) = (m.partition(), m.offset());
    let position = if Arc::ptr_eq(&kafka_topic, main_topic) {
        format!("{partition}/{offset}")
    } else {
        format!("{kafka_topic}/{partition}/{offset}")
    };
    let epoch = {
        let mut st = ctl.shared.lock();
        if !st.assigned.contains(&(Arc::clone(&kafka_topic), partition)) {
            tracing::debug!(
                position,
                "kafka: record of a partition no longer held dropped"
            );
            return;
        }
        st.track(&kafka_topic, partition, offset)
    };
    let payload = Bytes::copy_from_slice(m.payload().unwrap_or_default());
    let raw = Raw {
        payload: payload.clone(),
        headers: m.headers().map(|h| h.detach()),
        key: m.key().map(Bytes::copy_from_slice),
    };
    match headers::decode(m.headers(), m.key(), payload.clone(), &ctl.sub.topic) {
        Ok((envelope, internal)) => {
            let r = Ready {
                kafka_topic,
                partition,
                offset,
                epoch,
                envelope,
                raw,
                attempt: internal.attempt.unwrap_or(1).max(1),
                position,
            };
            match internal.not_before {
                Some(at) if at > unix_ms_now() => {
                    *delayed_seq += 1;
                    delayed.push(Reverse((at, *delayed_seq)));
                    delayed_items.insert(*delayed_seq, r);
                }
                _ => ready.push_back(r),
            }
        }
        Err(err) => {
            // Not an envelope: dead-letter the raw value with the reason.
            let ct = m
                .headers()
                .and_then(|h| {
                    h.iter()
                        .find(|h| h.key == hname::CONTENT_TYPE)
                        .and_then(|h| h.value)
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .map(ContentType::new)
                })
                .unwrap_or_else(|| ContentType::new(ContentType::OCTET_STREAM));
            let info = DeliveryInfo::new(&ctl.sub, 1, Some(position.clone()));
            let (dl, reason) = rules::poison_dead_letter(&ctl.sub.topic, payload, ct, &err, &info);
            tracing::warn!(%reason, position, "kafka: record is not an envelope; dead-lettering");
            let id = register(
                ctl,
                kafka_topic,
                partition,
                offset,
                epoch,
                raw,
                1,
                position,
                true,
            );
            ctl.spawn_republish(id, Republish::DeadLetter(Box::new(dl)));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn register(
    ctl: &Ctl,
    kafka_topic: Arc<str>,
    partition: i32,
    offset: i64,
    epoch: u64,
    raw: Raw,
    attempt: u32,
    position: String,
    busy: bool,
) -> u64 {
    let deadline = Instant::now() + ctl.sub.ack_deadline;
    let mut st = ctl.shared.lock();
    st.next_id += 1;
    let id = st.next_id;
    st.inflight.insert(
        id,
        InFlight {
            kafka_topic,
            partition,
            offset,
            epoch,
            deadline,
            raw,
            attempt,
            position,
            busy,
            taken: false,
        },
    );
    if !busy {
        st.deadlines.push(Reverse((deadline, id)));
    }
    id
}

/// Turn a ready record into a delivery, unless its partition was revoked
/// meanwhile (the new owner delivers it) or it is past its last attempt.
fn hand_out(ctl: &Ctl, r: Ready) -> Option<(u64, Delivery)> {
    if !ctl
        .shared
        .lock()
        .current(&r.kafka_topic, r.partition, r.epoch)
    {
        return None;
    }
    let info = DeliveryInfo::new(&ctl.sub, r.attempt, Some(r.position.clone()));
    if let Some((dl, reason)) = rules::exceeded_attempts(&r.envelope, &info) {
        tracing::debug!(%reason, "kafka: dead-lettering");
        let id = register(
            ctl,
            r.kafka_topic,
            r.partition,
            r.offset,
            r.epoch,
            r.raw,
            r.attempt,
            r.position,
            true,
        );
        ctl.spawn_republish(id, Republish::DeadLetter(Box::new(dl)));
        return None;
    }
    let id = register(
        ctl,
        r.kafka_topic,
        r.partition,
        r.offset,
        r.epoch,
        r.raw,
        r.attempt,
        r.position,
        false,
    );
    let d = Delivery::new(
        r.envelope,
        info,
        Box::new(KafkaSettle {
            ctl: ctl.clone(),
            id,
        }),
    );
    Some((id, d))
}

/// Deliveries past their ack deadline come back: republished to the retry
/// topic as the next attempt (or dead-lettered after the last).
fn expire(ctl: &Ctl) {
    let now = Instant::now();
    let mut due = Vec::new();
    {
        let mut st = ctl.shared.lock();
        while let Some(Reverse((at, id))) = st.deadlines.peek().copied() {
            if at > now {
                break;
            }
            st.deadlines.pop();
            let stale = match st.inflight.get(&id) {
                Some(f) if f.busy || f.deadline != at => continue,
                Some(f) => !st.current(&f.kafka_topic, f.partition, f.epoch),
                None => continue,
            };
            if stale {
                // Its partition moved on; the new owner redelivers it.
                st.inflight.remove(&id);
                continue;
            }
            if let Some(f) = st.inflight.get_mut(&id) {
                f.busy = true;
                due.push(id);
            }
        }
    }
    for id in due {
        tracing::debug!("kafka: ack deadline passed; redelivering");
        ctl.spawn_republish(
            id,
            Republish::Retry {
                not_before: unix_ms_now(),
            },
        );
    }
}

/// The stream was dropped: nobody will settle what is in flight, so each
/// delivery is republished as its next attempt, due at its ack deadline,
/// and the member can leave the group now instead of after the deadline.
fn drain(ctl: &Ctl) {
    let mut todo = Vec::new();
    {
        let mut st = ctl.shared.lock();
        let mut stale = Vec::new();
        for (id, f) in st.inflight.iter() {
            if f.busy {
                continue;
            }
            // Never seen by the consumer (dropped with the channel) or of a
            // partition no longer held: left unsettled, so the next owner
            // reads them again as they were.
            if !f.taken || !st.current(&f.kafka_topic, f.partition, f.epoch) {
                stale.push(*id);
            } else {
                todo.push((*id, unix_ms_at(f.deadline)));
            }
        }
        for id in stale {
            st.inflight.remove(&id);
        }
        for (id, _) in &todo {
            if let Some(f) = st.inflight.get_mut(id) {
                f.busy = true;
            }
        }
    }
    for (id, not_before) in todo {
        ctl.spawn_republish(id, Republish::Retry { not_before });
    }
}

fn commit(ctl: &Ctl, consumer: &StreamConsumer<Ctx>, mode: CommitMode) {
    let tpl = ctl.shared.lock().commits(None);
    if tpl.count() == 0 {
        return;
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        tracing::warn!(error = %e, "kafka: offset commit failed; retried with the next one");
        // Mark them dirty again so the next tick retries.
        let mut st = ctl.shared.lock();
        for e in tpl.elements() {
            if let Some(p) = st.parts.get_mut(&(Arc::from(e.topic()), e.partition())) {
                p.dirty = true;
            }
        }
    }
}

async fn finish(
    ctl: Ctl,
    consumer: StreamConsumer<Ctx>,
    out: mpsc::UnboundedSender<(u64, Delivery)>,
) {
    // The stream ends now; settlements still in flight are refused from
    // here on, and what was settled is committed before leaving the group.
    drop(out);
    // Republishes under way (nacks, expiries) settle their offsets when
    // done; wait for them so their offsets are committed too.
    let until = Instant::now() + ctl.inner.opts.timeout;
    loop {
        let busy = ctl.shared.lock().inflight.values().any(|f| f.busy);
        if !busy || Instant::now() >= until {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(20), ctl.shared.wake.notified()).await;
    }
    let tpl = {
        let mut st = ctl.shared.lock();
        st.ended = true;
        st.commits(None)
    };
    tokio::task::spawn_blocking(move || {
        if tpl.count() > 0 {
            if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
                tracing::warn!(error = %e, "kafka: final offset commit failed");
            }
        }
        consumer.unsubscribe();
        drop(consumer);
    })
    .await
    .unwrap_or_else(|e| tracing::warn!(error = %e, "kafka: consumer close task failed"));
    let _ = NAME;
}
