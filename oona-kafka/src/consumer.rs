//! Subscriptions as the core's delivery engine sees them: a consumer-group
//! member per [`Subscription`], manual offset commits of settled messages,
//! and a retry topic per group for nacks and expired leases.
//!
//! One OS thread per subscription owns the `BaseConsumer`: it polls,
//! serves rebalance callbacks (which may wait for settlements without
//! blocking an async runtime), holds delayed retries by pausing their retry
//! partition, and commits. It tracks every offset it has read per
//! partition; a settlement marks its offset done, and the committed offset
//! of a partition only moves past a contiguous run of settled offsets, so a
//! later ack never commits past an earlier unsettled message. Commits go
//! out every `commit_interval`, on `Transport::flush` (synchronously), when
//! partitions are revoked and on close. The engine owns leases, attempts,
//! prefetch and key order. Attempts that must survive a crash of the
//! member travel in the commit metadata ([`crate::marks`]).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use oona_core::engine::{self, Fetched, Poison};
use oona_core::{
    ContentType, DeliveryStream, Envelope, Error, ErrorKind, Name, Result, StartPosition,
    Subscription,
};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _, OwnedHeaders};
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};

use crate::headers::{self, name as hname};
use crate::marks::Marks;
use crate::options::GroupProtocol;
use crate::transport::{blocking, closed_error, kafka_error, Inner, NAME};

/// Segment of retry topic names: `<topic>.__retry.<group>`. No Oona topic
/// can contain it (segments start with a letter), so retry topics never
/// collide with user topics.
pub(crate) const RETRY_SEGMENT: &str = "__retry";

/// The retry topic of `group` on the Kafka topic `topic` (in a tenant,
/// the prefixed name: [`crate::KafkaOptions::kafka_topic`]).
pub fn retry_topic(topic: &str, group: &Name) -> String {
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

/// Longest a fetch waits for the poll thread.
const FETCH_WAIT: Duration = Duration::from_millis(500);
/// Longest one poll of the thread blocks (commands wait at most this).
const POLL_WAIT: Duration = Duration::from_millis(50);

type TopicPartition = (Arc<str>, i32);

#[derive(Default)]
struct Part {
    epoch: u64,
    /// Offsets read and not yet committed; `true` once settled.
    pending: BTreeMap<i64, bool>,
    /// Next offset to commit (one past the last contiguous settled one).
    commit: Option<i64>,
    /// The first offset read since the partition was assigned: where its
    /// committed offset stands until a settlement moves it.
    base: Option<i64>,
    dirty: bool,
    /// The hand-out marks as committed (or about to be).
    marks: Marks,
    /// The `below` of the marks the committer last had on the broker:
    /// records before it may go out.
    below_confirmed: i64,
    /// Records before this offset were out with a member that vanished
    /// (the marks found at assignment): they come back as recovered.
    recovered_below: i64,
}

impl Part {
    fn settle(&mut self, offset: i64) {
        if let Some(s) = self.pending.get_mut(&offset) {
            *s = true;
        }
        // Settled: not charged again if it comes back (an ack the offset
        // could not commit yet, behind an unsettled record).
        if self.marks.charged.remove(&offset).is_some() {
            self.dirty = true;
        }
        while let Some((&o, &true)) = self.pending.first_key_value() {
            self.pending.pop_first();
            self.commit = Some(o + 1);
            self.dirty = true;
        }
    }

    fn commit_offset(&self) -> Option<i64> {
        self.commit.or(self.base)
    }

    /// Add this partition's offset and marks to `tpl`.
    fn add_to(&self, tpl: &mut TopicPartitionList, t: &str, p: i32) -> bool {
        let Some(c) = self.commit_offset() else {
            return false;
        };
        let mut e = tpl.add_partition(t, p);
        if e.set_offset(Offset::Offset(c)).is_err() {
            return false;
        }
        e.set_metadata(self.marks.encode(c));
        true
    }
}

/// A record read and not yet settled (with the engine, or waiting here
/// for its retry time).
struct InFlight {
    tp: TopicPartition,
    offset: i64,
    epoch: u64,
    raw: Raw,
    attempt: u32,
    position: String,
    /// Out with a member that vanished: handed out alone, one at a time.
    recovered: bool,
    /// The marks generation its charge was recorded at (recovered records:
    /// it goes out once the committer has that on the broker).
    charge: Option<u64>,
    /// Given to the engine (it counts against the prefetch).
    sent: bool,
    /// The engine has handed it out (until then it is withdrawn when its
    /// partition moves).
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
    parts: HashMap<TopicPartition, Part>,
    inflight: HashMap<u64, InFlight>,
    next_id: u64,
    next_epoch: u64,
    /// Partitions this member holds now. Records of other partitions
    /// (fetched before a revoke, handed over after it) are dropped: their
    /// new owner delivers them, and committing them here could move the
    /// new owner's offset.
    assigned: HashSet<TopicPartition>,
    /// Retry records not due yet, one per retry partition, which stays
    /// paused until then (Unix ms).
    waiting: HashMap<TopicPartition, (u64, Fetched<u64>)>,
    /// The poll thread has ended: settlements can no longer be committed.
    ended: bool,
    /// The engine gave back what it had not handed out: nothing more goes
    /// to it.
    stopping: bool,
    /// Recording hand-out marks failed: not before this.
    marks_retry_at: Option<std::time::Instant>,
    /// Bumped on every change of marks that must reach the broker before a
    /// record goes out.
    marks_gen: u64,
    /// The generation the committer last had on the broker.
    confirmed_gen: u64,
    /// The committer has been asked and has not finished.
    committing: bool,
}

impl State {
    fn track(&mut self, tp: &TopicPartition, offset: i64) -> u64 {
        let next_epoch = &mut self.next_epoch;
        let part = self.parts.entry(tp.clone()).or_insert_with(|| {
            *next_epoch += 1;
            Part {
                epoch: *next_epoch,
                ..Part::default()
            }
        });
        part.pending.insert(offset, false);
        part.base.get_or_insert(offset);
        part.epoch
    }

    /// Start an assigned partition with the marks its last commit carries.
    fn assign(&mut self, tp: TopicPartition, marks: Marks) {
        self.next_epoch += 1;
        let part = Part {
            epoch: self.next_epoch,
            recovered_below: marks.below,
            below_confirmed: marks.below,
            marks,
            ..Part::default()
        };
        self.parts.insert(tp.clone(), part);
        self.assigned.insert(tp);
    }

    /// Lower the marks of the partitions `of` to what is still out with the
    /// consumer (taken and unsettled), leaving what a vanished member had
    /// out recovered: read-ahead that was never handed out is not charged
    /// to the next owner.
    fn lower_marks(&mut self, of: impl Fn(&TopicPartition) -> bool) {
        let mut out: HashMap<TopicPartition, i64> = HashMap::new();
        for f in self.inflight.values().filter(|f| f.taken && of(&f.tp)) {
            let o = out.entry(f.tp.clone()).or_insert(0);
            *o = (*o).max(f.offset + 1);
        }
        for (tp, part) in self.parts.iter_mut().filter(|(tp, _)| of(tp)) {
            let floor = out.get(tp).copied().unwrap_or(0).max(part.recovered_below);
            if floor < part.marks.below {
                part.marks.below = floor;
                part.below_confirmed = part.below_confirmed.min(floor);
                part.dirty = true;
            }
        }
    }

    fn current(&self, tp: &TopicPartition, epoch: u64) -> bool {
        self.parts.get(tp).is_some_and(|p| p.epoch == epoch)
    }

    /// Remove a record and mark its offset settled.
    fn finish(&mut self, id: u64) {
        if let Some(f) = self.inflight.remove(&id) {
            if let Some(p) = self.parts.get_mut(&f.tp) {
                if p.epoch == f.epoch {
                    p.settle(f.offset);
                }
            }
        }
    }

    /// Offsets and marks of every partition held, for the committer, with
    /// the generation and each partition's `below` they carry.
    fn commit_all(&mut self) -> (TopicPartitionList, u64, Vec<(TopicPartition, u64, i64)>) {
        let mut tpl = TopicPartitionList::new();
        let mut belows = Vec::new();
        for ((t, p), part) in self.parts.iter_mut() {
            if part.add_to(&mut tpl, t, *p) {
                part.dirty = false;
                belows.push(((Arc::clone(t), *p), part.epoch, part.marks.below));
            }
        }
        (tpl, self.marks_gen, belows)
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
            if part.add_to(&mut tpl, t, *p) {
                part.dirty = false;
            }
        }
        tpl
    }
}

pub(crate) struct Shared {
    state: Mutex<State>,
    /// Held while a commit is built and sent, so commits reach the broker
    /// in the order they were built (the poll thread and the committer
    /// both commit).
    commit_lock: Mutex<()>,
    /// Signalled on every settlement: the poll thread waits on it for room,
    /// a revoke for the deliveries of its partitions.
    settled: std::sync::Condvar,
    cmds: Mutex<std::sync::mpsc::Sender<Cmd>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is plain data; a panic elsewhere must not wedge it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn commit_turn(&self) -> MutexGuard<'_, ()> {
        self.commit_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, cmd: Cmd) -> bool {
        self.cmds
            .lock()
            .map(|tx| tx.send(cmd).is_ok())
            .unwrap_or(false)
    }

    fn finish(&self, id: u64) {
        self.lock().finish(id);
        self.settled.notify_all();
    }

    /// Commit what is settled, synchronously (Transport::flush).
    pub(crate) async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.send(Cmd::Flush(tx)) {
            let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
        }
    }
}

enum Cmd {
    Flush(oneshot::Sender<()>),
    Stop,
}

struct Ctx {
    shared: Arc<Shared>,
    /// Longest a revoke waits for deliveries of its partitions.
    revoke_wait: Duration,
    /// Longest reading the marks of assigned partitions takes.
    lookup_timeout: Duration,
    /// Told when the member gets its first assignment.
    assigned: Mutex<Option<oneshot::Sender<()>>>,
    /// Start offsets the member commits (and seeks to) when it is given
    /// partitions the group has committed nothing on: those
    /// `prepare_group` could not commit because the group has members.
    starts: Mutex<HashMap<(String, i32), i64>>,
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
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(a) = rebalance {
            tracing::debug!(partitions = ?listed(a), "kafka: partitions assigned");
            // The marks of their last commit: what their last owner may
            // have had out when it vanished.
            let found = consumer
                .committed_offsets((*a).clone(), Timeout::After(self.lookup_timeout))
                .map_err(|e| {
                    tracing::warn!(error = %e, "kafka: reading the commit metadata of assigned partitions failed; a crash of their last owner is not charged to what it had out");
                })
                .ok();
            if let Some(found) = &found {
                let mut starts = self
                    .starts
                    .lock()
                    .map(|mut s| std::mem::take(&mut *s))
                    .unwrap_or_default();
                commit_starts(consumer, found, &mut starts, self.lookup_timeout);
                // Partitions this member was not given keep their start
                // for a later assignment.
                if let Ok(mut s) = self.starts.lock() {
                    s.extend(starts);
                }
            }
            {
                let mut st = self.shared.lock();
                for e in a.elements() {
                    let marks = found
                        .as_ref()
                        .and_then(|c| c.find_partition(e.topic(), e.partition()))
                        .map(|c| Marks::parse(c.metadata()))
                        .unwrap_or_default();
                    st.assign((Arc::from(e.topic()), e.partition()), marks);
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
        let of_revoked = |tp: &TopicPartition| revoked.find_partition(&tp.0, tp.1).is_some();
        // Runs on the subscription's poll thread, so it may wait: the
        // deliveries of these partitions out with the consumer get up to
        // `revoke_wait` to be settled, as Kafka consumers do in their
        // revoke callback, so the new owner starts after them (no
        // duplicates, per-key order kept). What was never handed out is
        // withdrawn at once (the engine skips it).
        {
            let mut st = self.shared.lock();
            st.waiting.retain(|tp, _| !of_revoked(tp));
            st.inflight.retain(|_, f| f.taken || !of_revoked(&f.tp));
            let until = std::time::Instant::now() + self.revoke_wait;
            loop {
                let pending = st
                    .inflight
                    .values()
                    .any(|f| of_revoked(&f.tp) && st.current(&f.tp, f.epoch));
                let now = std::time::Instant::now();
                if !pending || now >= until {
                    break;
                }
                st = match self.shared.settled.wait_timeout(st, until - now) {
                    Ok((g, _)) => g,
                    Err(p) => p.into_inner().0,
                };
            }
        }
        let _turn = self.shared.commit_turn();
        let tpl = {
            let mut st = self.shared.lock();
            st.lower_marks(of_revoked);
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

/// Resolve the start position of a group that has no committed offsets
/// on the topic yet, and commit it, so the group starts where the
/// subscription says whenever its members join. Kafka refuses a commit
/// from outside while the group has members (the same group reading
/// another topic: a service's router): then the offsets are returned, and
/// the member commits them, and seeks there, when it is given the
/// partitions.
fn prepare_group(inner: &Inner, sub: &Subscription) -> Result<TopicPartitionList> {
    let topic = inner.opts.kafka_topic(&sub.topic);
    let topic = topic.as_ref();
    let timeout = Timeout::After(inner.opts.timeout);
    let c = offsets_client(inner, &sub.group)?;
    let (n, committed) = committed_offsets(inner, &c, topic)?;
    let until = std::time::Instant::now() + inner.opts.timeout;
    if committed
        .elements()
        .iter()
        .any(|e| matches!(e.offset(), Offset::Offset(_)))
    {
        // An existing group resumes where it is.
        return Ok(TopicPartitionList::new());
    }
    let mut start = TopicPartitionList::new();
    match sub.start {
        // auto.offset.reset=earliest does it.
        StartPosition::Earliest => return Ok(TopicPartitionList::new()),
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
    if start.count() == 0 {
        return Ok(start);
    }
    match while_coordinator_moves(until, || c.commit(&start, CommitMode::Sync)) {
        Ok(()) => Ok(TopicPartitionList::new()),
        Err(e) if refused_as_non_member(&e) => {
            tracing::debug!(error = %e, group = %sub.group, topic, "kafka: the group has members; its new member commits the start offsets");
            Ok(start)
        }
        Err(e) => Err(kafka_error("commit start offsets", e)),
    }
}

/// Whether a commit failed because the group has members and the client
/// is not one of them.
fn refused_as_non_member(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::UnknownMemberId
                | C::IllegalGeneration
                | C::RebalanceInProgress
                | C::StaleMemberEpoch
        )
    )
}

/// Commit the start of each assigned partition on which the group has
/// committed nothing yet: the start `prepare_group` left to the member
/// (taken from `starts`; the member seeks there too), else its first
/// offset, where `auto.offset.reset` starts it anyway. So every partition
/// a group was ever given has a committed offset, which is how a group's
/// depth tells a group that never read a topic from one that has settled
/// nothing yet.
fn commit_starts<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    found: &TopicPartitionList,
    starts: &mut HashMap<(String, i32), i64>,
    timeout: Duration,
) {
    let mut start = TopicPartitionList::new();
    let mut seek = TopicPartitionList::new();
    for e in found.elements() {
        if matches!(e.offset(), Offset::Offset(_)) {
            continue;
        }
        if let Some(o) = starts.remove(&(e.topic().to_string(), e.partition())) {
            let _ = start.add_partition_offset(e.topic(), e.partition(), Offset::Offset(o));
            let _ = seek.add_partition_offset(e.topic(), e.partition(), Offset::Offset(o));
            continue;
        }
        match consumer.fetch_watermarks(e.topic(), e.partition(), Timeout::After(timeout)) {
            Ok((low, _)) => {
                let _ = start.add_partition_offset(e.topic(), e.partition(), Offset::Offset(low));
            }
            Err(err) => {
                tracing::debug!(error = %err, topic = e.topic(), partition = e.partition(), "kafka: start offset not read")
            }
        }
    }
    if start.count() > 0 {
        if let Err(e) = consumer.commit(&start, CommitMode::Sync) {
            tracing::debug!(error = %e, "kafka: committing the start of new partitions failed");
        }
    }
    // The fetcher may have looked for a committed offset before the commit
    // above landed (and so started at the first offset): move it.
    if seek.count() > 0 {
        if let Err(e) = consumer.seek_partitions(seek, Timeout::After(timeout)) {
            tracing::warn!(error = %e, "kafka: seeking to the start offsets failed; the group may read from the first offset");
        }
    }
}

/// A client of `group` that joins nothing: it reads and commits the
/// group's offsets.
pub(crate) fn offsets_client(inner: &Inner, group: &Name) -> Result<BaseConsumer> {
    let mut cfg = inner.opts.client_config();
    cfg.set("group.id", inner.opts.group_id(group))
        .set("enable.auto.commit", "false");
    cfg.create()
        .map_err(|e| kafka_error("create offsets client", e))
}

/// The partition count of `topic` and the committed offsets of `c`'s
/// group on each partition.
pub(crate) fn committed_offsets(
    inner: &Inner,
    c: &BaseConsumer,
    topic: &str,
) -> Result<(usize, TopicPartitionList)> {
    let timeout = Timeout::After(inner.opts.timeout);
    let n = partition_count(c, topic, timeout)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..n as i32 {
        tpl.add_partition(topic, p);
    }
    let until = std::time::Instant::now() + inner.opts.timeout;
    let committed = while_coordinator_moves(until, || c.committed_offsets(tpl.clone(), timeout))
        .map_err(|e| kafka_error("read committed offsets", e))?;
    Ok((n, committed))
}

/// How many partitions `topic` has (0 when it does not exist).
fn partition_count<C: ConsumerContext>(
    c: &BaseConsumer<C>,
    topic: &str,
    timeout: Timeout,
) -> Result<usize> {
    let md = c
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| kafka_error("fetch metadata", e))?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len()))
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

/// Start a subscription: its stream, and the task that ends when the
/// subscription has left its group.
pub(crate) async fn start(
    inner: Arc<Inner>,
    sub: Subscription,
) -> Result<(DeliveryStream, tokio::task::JoinHandle<()>)> {
    inner.ensure(&sub.topic).await?;
    let main_topic = inner.opts.kafka_topic(&sub.topic).into_owned();
    let retry = retry_topic(&main_topic, &sub.group);
    let policy = inner.opts.policies.for_topic(&sub.topic).clone();
    inner.ensure_kafka_topic(&retry, &policy).await?;
    let starts = {
        let inner = Arc::clone(&inner);
        let sub = sub.clone();
        blocking("start", move || prepare_group(&inner, &sub)).await??
    };
    let (cmd_tx, cmd_rx) = std::sync::mpsc::channel();
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        commit_lock: Mutex::new(()),
        settled: std::sync::Condvar::new(),
        cmds: Mutex::new(cmd_tx),
    });
    let (assigned_tx, assigned_rx) = oneshot::channel();
    let consumer = create_consumer(&inner, &sub, &retry, &shared, assigned_tx, starts)?;
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let ctl = Ctl {
        inner: Arc::clone(&inner),
        shared: Arc::clone(&shared),
        main_topic: Arc::from(main_topic.as_str()),
        retry: Arc::from(retry.as_str()),
        sub: Arc::new(sub.clone()),
    };
    let (done_tx, done_rx) = oneshot::channel();
    let shutdown = inner.shutdown.subscribe();
    let poller = ctl.clone();
    std::thread::Builder::new()
        .name("oona-kafka-sub".into())
        .spawn(move || {
            let consumer = Arc::new(consumer);
            let (wake, woken) = std::sync::mpsc::channel();
            let committing = {
                let (ctl, consumer) = (poller.clone(), Arc::clone(&consumer));
                std::thread::Builder::new()
                    .name("oona-kafka-commit".into())
                    .spawn(move || committer(&ctl, &consumer, &woken))
            };
            match committing {
                Ok(handle) => {
                    poll_loop(&poller, &consumer, &out_tx, &cmd_rx, &shutdown, &wake);
                    drop(wake);
                    let _ = handle.join();
                }
                Err(e) => {
                    tracing::error!(error = %e, "kafka: no commit thread; the subscription ends")
                }
            }
            finish(&poller, consumer);
            let _ = done_tx.send(());
        })
        .map_err(|e| Error::new(ErrorKind::Internal, format!("poll thread: {e}")))?;
    // Return once this member holds its share of the group, so that what
    // is published next is not first handed to a member about to lose
    // the partition (which would deliver it twice).
    let join_timeout = inner.opts.timeout;
    match tokio::time::timeout(join_timeout, assigned_rx).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Err(closed_error()),
        Err(_) => {
            shared.send(Cmd::Stop);
            return Err(Error::new(
                ErrorKind::Timeout,
                format!("kafka: joining consumer group took over {join_timeout:?}"),
            )
            .with_transport(NAME));
        }
    }
    inner.track_subscription(Arc::downgrade(&shared));
    let source = KafkaSource {
        ctl,
        inbox: engine::Inbox::new(out_rx),
        done: Mutex::new(Some(done_rx)),
    };
    let mut closed = inner.shutdown.subscribe();
    let (stream, task) = engine::start(source, sub, async move {
        let _ = closed.wait_for(|s| *s).await;
    });
    Ok((stream, task))
}

fn create_consumer(
    inner: &Inner,
    sub: &Subscription,
    retry: &str,
    shared: &Arc<Shared>,
    assigned: oneshot::Sender<()>,
    starts: TopicPartitionList,
) -> Result<BaseConsumer<Ctx>> {
    let o = &inner.opts;
    let mut cfg = o.client_config();
    let max_poll = (sub.ack_deadline * 2).max(Duration::from_secs(300));
    cfg.set("group.id", o.group_id(&sub.group))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("group.protocol", o.group_protocol.as_str())
        .set("fetch.wait.max.ms", o.fetch_wait.as_millis().to_string())
        // Bounds what librdkafka prefetches per partition (default 64 MB).
        .set("queued.max.messages.kbytes", "16384")
        .set("max.poll.interval.ms", max_poll.as_millis().to_string());
    if o.static_membership {
        cfg.set("group.instance.id", sub.consumer.as_str());
    }
    if o.group_protocol == GroupProtocol::Classic {
        // With KIP-848's protocol these are the broker's, and librdkafka
        // refuses them.
        cfg.set(
            "session.timeout.ms",
            o.session_timeout.as_millis().to_string(),
        )
        .set("heartbeat.interval.ms", o.heartbeat.as_millis().to_string());
    }
    let consumer: BaseConsumer<Ctx> = cfg
        .create_with_context(Ctx {
            shared: Arc::clone(shared),
            revoke_wait: sub.ack_deadline.min(Duration::from_secs(10)),
            lookup_timeout: o.timeout.min(Duration::from_secs(10)),
            assigned: Mutex::new(Some(assigned)),
            starts: Mutex::new(
                starts
                    .elements()
                    .iter()
                    .filter_map(|e| match e.offset() {
                        Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                        _ => None,
                    })
                    .collect(),
            ),
        })
        .map_err(|e| kafka_error("create consumer", e))?;
    consumer
        .subscribe(&[&o.kafka_topic(&sub.topic), retry])
        .map_err(|e| kafka_error("subscribe", e))?;
    Ok(consumer)
}

#[derive(Clone)]
struct Ctl {
    inner: Arc<Inner>,
    shared: Arc<Shared>,
    sub: Arc<Subscription>,
    main_topic: Arc<str>,
    retry: Arc<str>,
}

/// The poll thread: read (ahead of the engine, so rebalances are served
/// while the consumer is busy), give the engine up to the prefetch, hold
/// delayed retries, commit.
fn poll_loop(
    ctl: &Ctl,
    consumer: &BaseConsumer<Ctx>,
    out: &mpsc::UnboundedSender<Fetched<u64>>,
    cmds: &std::sync::mpsc::Receiver<Cmd>,
    shutdown: &tokio::sync::watch::Receiver<bool>,
    committer: &std::sync::mpsc::Sender<()>,
) {
    let prefetch = ctl.sub.prefetch.max(1);
    // Read ahead at most this many: librdkafka then stops fetching once
    // its own queue is full (`queued.max.messages.kbytes`). Pausing
    // partitions instead would make librdkafka drop and refetch what it
    // holds on every resume.
    let read_limit = (prefetch * 4).max(1024);
    let every = ctl.inner.opts.commit_interval;
    let mut next_commit = std::time::Instant::now() + every;
    let mut ready: VecDeque<Fetched<u64>> = VecDeque::new();
    loop {
        loop {
            match cmds.try_recv() {
                Ok(Cmd::Flush(tx)) => {
                    commit(ctl, consumer, CommitMode::Sync);
                    let _ = tx.send(());
                }
                Ok(Cmd::Stop) | Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
            }
        }
        if *shutdown.borrow() || out.is_closed() {
            return;
        }
        release_due(ctl, consumer, &mut ready);
        hand_to_engine(ctl, &mut ready, out, prefetch, committer);
        if std::time::Instant::now() >= next_commit {
            commit(ctl, consumer, CommitMode::Async);
            next_commit = std::time::Instant::now() + every;
        }
        if ready.len() >= read_limit {
            // Rebalance events wait meanwhile; they are served as soon as
            // deliveries are settled (or their leases run out).
            let st = ctl.shared.lock();
            let _ = ctl
                .shared
                .settled
                .wait_timeout(st, Duration::from_millis(5));
            continue;
        }
        // Records waiting for the engine: come back soon to hand them on.
        let mut wait = if ready.is_empty() {
            POLL_WAIT
        } else {
            Duration::from_millis(1)
        };
        // Take what librdkafka already holds without waiting, so one pass
        // handles a batch.
        for _ in 0..256 {
            match consumer.poll(wait) {
                Some(Ok(m)) => on_message(ctl, consumer, &m, &mut ready),
                Some(Err(e)) => tracing::warn!(error = %e, "kafka consumer error"),
                None => break,
            }
            wait = Duration::ZERO;
            if ready.len() >= read_limit {
                break;
            }
        }
    }
}

/// Give the engine what it has room for (records withdrawn by a revoke
/// meanwhile are skipped: their new owner has them). A record goes only
/// once marks on the broker cover its hand-out (see [`crate::marks`]):
/// before its partition's confirmed `below`, which the committer keeps a
/// window ahead (raised when consumption is half a window from it); a
/// recovered record alone, once its charge is committed.
fn hand_to_engine(
    ctl: &Ctl,
    ready: &mut VecDeque<Fetched<u64>>,
    out: &mpsc::UnboundedSender<Fetched<u64>>,
    prefetch: usize,
    committer: &std::sync::mpsc::Sender<()>,
) {
    if ready.is_empty() {
        return;
    }
    let mut guard = ctl.shared.lock();
    if guard.stopping {
        return;
    }
    let st = &mut *guard;
    // Two prefetches: the raise is on its way while one prefetch goes out.
    let window = i64::try_from(prefetch.saturating_mul(2)).unwrap_or(i64::MAX);
    let mut outstanding = st.inflight.values().filter(|f| f.sent).count();
    let mut recovered_out = st.inflight.values().any(|f| f.sent && f.recovered);
    let mut batch = Vec::new();
    while outstanding < prefetch {
        let Some(f) = ready.pop_front() else { break };
        let Some(x) = st.inflight.get_mut(&f.token) else {
            continue;
        };
        let Some(part) = st.parts.get_mut(&x.tp).filter(|p| p.epoch == x.epoch) else {
            continue;
        };
        if x.offset.saturating_add(window / 2) >= part.marks.below {
            part.marks.below = x.offset.saturating_add(window);
            part.dirty = true;
            st.marks_gen += 1;
        }
        let go = if x.recovered {
            match x.charge {
                _ if recovered_out => false,
                Some(g) => g <= st.confirmed_gen,
                None => {
                    part.marks.charged.insert(x.offset, x.attempt);
                    part.dirty = true;
                    st.marks_gen += 1;
                    x.charge = Some(st.marks_gen);
                    false
                }
            }
        } else {
            x.offset < part.below_confirmed
        };
        if !go {
            ready.push_front(f);
            break;
        }
        recovered_out |= x.recovered;
        x.sent = true;
        outstanding += 1;
        batch.push(f);
    }
    let retry_ok = st
        .marks_retry_at
        .is_none_or(|t| std::time::Instant::now() >= t);
    if st.confirmed_gen < st.marks_gen && !st.committing && retry_ok {
        st.committing = true;
        let _ = committer.send(());
    }
    drop(guard);
    for f in batch {
        let _ = out.send(f);
    }
}

/// Commits the hand-out marks (with every offset settled so far) on their
/// own thread, so the poll thread hands records on while a raised mark is
/// on its way. Ends when the poll thread drops its end of `wake`.
fn committer(ctl: &Ctl, consumer: &BaseConsumer<Ctx>, wake: &std::sync::mpsc::Receiver<()>) {
    while wake.recv().is_ok() {
        let turn = ctl.shared.commit_turn();
        let (tpl, gen, belows) = ctl.shared.lock().commit_all();
        let result = if tpl.count() == 0 {
            Ok(())
        } else {
            consumer.commit(&tpl, CommitMode::Sync)
        };
        drop(turn);
        let mut st = ctl.shared.lock();
        st.committing = false;
        match result {
            Ok(()) => {
                st.confirmed_gen = st.confirmed_gen.max(gen);
                st.marks_retry_at = None;
                for (tp, epoch, below) in belows {
                    if let Some(p) = st.parts.get_mut(&tp).filter(|p| p.epoch == epoch) {
                        p.below_confirmed = below;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(topic = %ctl.sub.topic, error = %e, "kafka: recording hand-out marks failed; retrying before handing records on");
                for (tp, _, _) in belows {
                    if let Some(p) = st.parts.get_mut(&tp) {
                        p.dirty = true;
                    }
                }
                st.marks_retry_at = Some(std::time::Instant::now() + Duration::from_millis(200));
            }
        }
        drop(st);
        ctl.shared.settled.notify_all();
    }
}

fn tpl_of(tp: &TopicPartition) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&tp.0, tp.1);
    tpl
}

/// Retry records whose time has come go to the engine, and their
/// partition reads on.
fn release_due(ctl: &Ctl, consumer: &BaseConsumer<Ctx>, ready: &mut VecDeque<Fetched<u64>>) {
    let now = unix_ms_now();
    let due: Vec<(TopicPartition, Fetched<u64>)> = {
        let mut st = ctl.shared.lock();
        let keys: Vec<TopicPartition> = st
            .waiting
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(tp, _)| tp.clone())
            .collect();
        keys.into_iter()
            .filter_map(|tp| st.waiting.remove(&tp).map(|(_, f)| (tp, f)))
            .collect()
    };
    for (tp, f) in due {
        if let Err(e) = consumer.resume(&tpl_of(&tp)) {
            tracing::warn!(error = %e, "kafka: resuming a retry partition failed");
        }
        ready.push_back(f);
    }
}

fn on_message(
    ctl: &Ctl,
    consumer: &BaseConsumer<Ctx>,
    m: &BorrowedMessage<'_>,
    ready: &mut VecDeque<Fetched<u64>>,
) {
    let main = m.topic() == &*ctl.main_topic;
    let kafka_topic = if main {
        Arc::clone(&ctl.main_topic)
    } else {
        Arc::clone(&ctl.retry)
    };
    let (partition, offset) = (m.partition(), m.offset());
    let tp: TopicPartition = (kafka_topic, partition);
    let position = if main {
        format!("{partition}/{offset}")
    } else {
        format!("{}/{partition}/{offset}", ctl.retry)
    };
    let payload = Bytes::copy_from_slice(m.payload().unwrap_or_default());
    let raw = Raw {
        payload: payload.clone(),
        headers: m.headers().map(|h| h.detach()),
        key: m.key().map(Bytes::copy_from_slice),
    };
    let (message, internal) =
        match headers::decode(m.headers(), m.key(), payload.clone(), &ctl.sub.topic) {
            Ok((env, internal)) => (Ok(env), internal),
            Err(err) => (
                Err(Poison::new(payload, content_type(m), err)),
                Default::default(),
            ),
        };
    let attempt = internal.attempt.unwrap_or(1).max(1);
    let mut st = ctl.shared.lock();
    if !st.assigned.contains(&tp) {
        tracing::debug!(
            position,
            "kafka: record of a partition no longer held dropped"
        );
        return;
    }
    let epoch = st.track(&tp, offset);
    let (recovered, attempt) = match st.parts.get(&tp) {
        Some(p) if offset < p.recovered_below => (true, p.marks.after_crash(offset, attempt)),
        _ => (false, attempt),
    };
    st.next_id += 1;
    let id = st.next_id;
    st.inflight.insert(
        id,
        InFlight {
            tp: tp.clone(),
            offset,
            epoch,
            raw,
            attempt,
            position: position.clone(),
            recovered,
            charge: None,
            sent: false,
            taken: false,
        },
    );
    let fetched = Fetched::new(id, message, attempt, Some(position)).recovered(recovered);
    match internal.not_before {
        Some(at) if at > unix_ms_now() => {
            // Not due: its retry partition pauses until then, so nothing
            // else of it is held in memory.
            st.waiting.insert(tp.clone(), (at, fetched));
            drop(st);
            if let Err(e) = consumer.pause(&tpl_of(&tp)) {
                tracing::warn!(error = %e, "kafka: pausing a retry partition failed");
            }
        }
        _ => ready.push_back(fetched),
    }
}

/// The content type a record claims (for the dead letter of a record that
/// is no envelope).
fn content_type(m: &BorrowedMessage<'_>) -> ContentType {
    m.headers()
        .and_then(|h| {
            h.iter()
                .find(|h| h.key == hname::CONTENT_TYPE)
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(ContentType::new)
        })
        .unwrap_or_else(|| ContentType::new(ContentType::OCTET_STREAM))
}

fn commit(ctl: &Ctl, consumer: &BaseConsumer<Ctx>, mode: CommitMode) {
    let _turn = match mode {
        // A periodic commit skips a turn while the committer is at it.
        CommitMode::Async => match ctl.shared.commit_lock.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        },
        CommitMode::Sync => ctl.shared.commit_turn(),
    };
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

/// Commit what is settled and leave the group.
fn finish(ctl: &Ctl, consumer: Arc<BaseConsumer<Ctx>>) {
    commit(ctl, &consumer, CommitMode::Sync);
    ctl.shared.lock().ended = true;
    ctl.shared.settled.notify_all();
    consumer.unsubscribe();
    drop(consumer);
}

struct KafkaSource {
    ctl: Ctl,
    inbox: engine::Inbox<u64>,
    /// Fired when the poll thread has left the group.
    done: Mutex<Option<oneshot::Receiver<()>>>,
}

impl KafkaSource {
    /// Without records withdrawn meanwhile (their partition moved: the new
    /// owner has them).
    fn still_held(&self, mut out: Vec<Fetched<u64>>) -> Vec<Fetched<u64>> {
        let st = self.ctl.shared.lock();
        out.retain(|f| st.inflight.contains_key(&f.token));
        out
    }

    /// The record of `id`, to republish it.
    fn raw(&self, id: u64) -> Result<(Raw, u32, String)> {
        let st = self.ctl.shared.lock();
        if st.ended {
            return Err(closed_error());
        }
        st.inflight
            .get(&id)
            .map(|f| (f.raw.clone(), f.attempt, f.position.clone()))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::AlreadySettled,
                    "its partition moved to another member, which delivers it",
                )
                .with_transport(NAME)
            })
    }
}

#[async_trait]
impl engine::Source for KafkaSource {
    type Token = u64;
    const HOLDS_READY: bool = true;

    async fn fetch(&self, max: usize) -> Result<Vec<Fetched<u64>>> {
        let out = self
            .inbox
            .fetch(max, FETCH_WAIT)
            .await
            .ok_or_else(closed_error)?;
        Ok(self.still_held(out))
    }

    fn take_ready(&self, max: usize) -> Vec<Fetched<u64>> {
        self.still_held(self.inbox.take_ready(max))
    }

    async fn ack(&self, id: u64) -> Result<()> {
        self.ctl.shared.finish(id);
        Ok(())
    }

    /// To the retry topic as the next attempt, not before `delay` from now;
    /// then its offset is settled.
    async fn redeliver(&self, id: u64, delay: Duration) -> Result<Option<Fetched<u64>>> {
        let (raw, attempt, _) = self.raw(id)?;
        let not_before = unix_ms_now() + u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        let hs = headers::for_retry(raw.headers.as_ref(), attempt + 1, not_before);
        self.ctl
            .inner
            .send(&self.ctl.retry, raw.key.as_deref(), &raw.payload, hs)
            .await?;
        self.ctl.shared.finish(id);
        Ok(None)
    }

    async fn dead_letter(&self, id: u64, dead_letter: Envelope) -> Result<()> {
        self.raw(id)?;
        self.ctl.inner.publish_dead_letter(&dead_letter).await?;
        self.ctl.shared.finish(id);
        Ok(())
    }

    async fn release(&self, ids: Vec<u64>) {
        // Left unsettled: the commit stops before them, and the group's
        // next owner of their partitions reads them again, uncharged (the
        // engine gives back only when it stops).
        let mut st = self.ctl.shared.lock();
        st.stopping = true;
        for id in ids {
            st.inflight.remove(&id);
        }
        st.lower_marks(|_| true);
    }

    fn handing_out(&self, id: &u64) -> bool {
        let mut st = self.ctl.shared.lock();
        let current = st
            .inflight
            .get(id)
            .is_some_and(|f| st.current(&f.tp, f.epoch));
        match st.inflight.get_mut(id) {
            Some(f) if current => {
                f.taken = true;
                true
            }
            _ => {
                st.inflight.remove(id);
                false
            }
        }
    }

    async fn close(&self) {
        self.ctl.shared.send(Cmd::Stop);
        let done = self.done.lock().ok().and_then(|mut d| d.take());
        if let Some(done) = done {
            let _ = tokio::time::timeout(self.ctl.inner.opts.timeout, done).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_settled_record_behind_an_unsettled_one_is_not_charged_again() {
        let mut p = Part::default();
        for o in 10..13 {
            p.pending.insert(o, false);
        }
        p.marks.below = 20;
        p.marks.charged.insert(11, 3);
        p.settle(11);
        assert_eq!(p.commit, None, "10 is unsettled: 11 is not committed");
        assert!(p.dirty, "the charge's removal is committed");
        assert_eq!(
            p.marks.after_crash(11, 1),
            2,
            "back as a duplicate, charged once"
        );
    }

    #[test]
    fn offsets_commit_only_past_contiguous_settled_runs() {
        let mut p = Part::default();
        for o in 10..15 {
            p.pending.insert(o, false);
        }
        p.settle(11);
        assert_eq!(p.commit, None, "10 is unsettled");
        p.settle(10);
        assert_eq!(p.commit, Some(12));
        p.settle(14);
        assert_eq!(p.commit, Some(12), "12 and 13 are unsettled");
        p.settle(13);
        assert_eq!(p.commit, Some(12), "12 is unsettled");
        p.settle(12);
        assert_eq!(p.commit, Some(15));
    }
}
