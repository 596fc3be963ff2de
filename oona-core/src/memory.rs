//! The in-memory transport: `memory://`.
//!
//! The reference implementation of every delivery semantic of Oona, and the
//! embedded default: consumer groups, competing consumers, ack deadlines and
//! redelivery, nack delays, dead letters after `max_attempts`, replay from
//! earliest / latest / a time, per-key order across competing consumers and
//! retention by plane. Use it in your own unit tests: it keeps the same
//! promises as the broker transports (the conformance suite checks it).
//!
//! # URL
//!
//! `memory://[name]?capacity=N&max_payload_bytes=N&tenant=T`
//!
//! Connections to the same `name` in one process share one broker
//! (`memory://` is the broker named `default`); the broker lives while any
//! handle to it does. Each [`Tenant`] of a name is a broker of its own. `capacity` (default 100 000) bounds the entries kept
//! per topic: when a topic is full, entries every group has settled are
//! dropped first; if that frees nothing, publish fails with
//! [`ErrorKind::ResourceExhausted`] (temporary) — never a silent drop.
//!
//! # Fault injection
//!
//! [`MemoryTransport::inject_raw`] writes an entry that bypasses Oona (as
//! another service's client would), [`MemoryTransport::set_offline`] makes
//! every handle of the broker fail as if the connection were lost, and
//! [`MemoryTransport::applied_retention`] reads back the retention in force.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt as _;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::admin::{self, GroupInfo, Member, TopicInfo};
use crate::config::{ConnectUrl, Driver};
use crate::delivery::DeliveryStream;
use crate::engine::{self, Fetched, Poison, Source};
use crate::envelope::{ContentType, Envelope};
use crate::error::{Error, ErrorKind, Result};
use crate::subscription::{StartPosition, Subscription};
use crate::topic::{Name, PolicySet, Retention, Tenant, Topic, TopicPolicy};
use crate::transport::{Capabilities, Depth, Health, HealthStatus, Receipt, Transport};
use crate::{rules, wire};

const NAME: &str = "memory";

/// The `memory://` driver, registered by the `oona` facade.
pub const DRIVER: Driver = Driver {
    name: NAME,
    schemes: &["memory"],
    connect: connect_url,
};

fn connect_url(mut url: ConnectUrl) -> BoxFuture<'static, Result<Arc<dyn Transport>>> {
    async move {
        let capacity = url.take::<usize>("capacity")?;
        let max_payload = url.take::<usize>("max_payload_bytes")?;
        let tenant = url.take::<Tenant>("tenant")?;
        url.finish()?;
        let mut name = match url.url().host_str() {
            Some(h) if !h.is_empty() => h.to_string(),
            _ => "default".to_string(),
        };
        // A tenant is a broker of its own: nothing is shared with another.
        if let Some(t) = tenant {
            name = format!("{name}/{t}");
        }
        let mut config = MemoryConfig::default();
        if let Some(c) = capacity {
            config = config.capacity(c)?;
        }
        if let Some(m) = max_payload {
            config = config.max_payload_bytes(m);
        }
        let explicit = capacity.is_some() || max_payload.is_some();
        let t = MemoryTransport::named(&name, config, explicit)?;
        Ok(Arc::new(t) as Arc<dyn Transport>)
    }
    .boxed()
}

/// Settings of a memory broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    capacity: usize,
    max_payload_bytes: usize,
    policies: PolicySet,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            capacity: Self::DEFAULT_CAPACITY,
            max_payload_bytes: TopicPolicy::DEFAULT_MAX_PAYLOAD,
            policies: PolicySet::default(),
        }
    }
}

impl MemoryConfig {
    /// Default entries kept per topic.
    pub const DEFAULT_CAPACITY: usize = 100_000;

    /// Entries kept per topic (at least 1).
    pub fn capacity(mut self, n: usize) -> Result<Self> {
        if n == 0 {
            return Err(Error::new(
                ErrorKind::ConfigInvalid,
                "memory capacity must be at least 1",
            ));
        }
        self.capacity = n;
        Ok(self)
    }

    /// Largest payload accepted by this broker.
    pub fn max_payload_bytes(mut self, n: usize) -> Self {
        self.max_payload_bytes = n;
        self.policies = self.policies.with_max_payload_bytes(n);
        self
    }

    /// The policies topics get when they are created implicitly.
    pub fn policies(mut self, policies: PolicySet) -> Self {
        self.policies = policies;
        self
    }
}

/// A handle on a memory broker. Cheap to create with
/// [`MemoryTransport::connect_same`]; each handle closes independently.
#[derive(Debug)]
pub struct MemoryTransport {
    broker: Arc<Broker>,
    closed: Arc<Closed>,
}

#[derive(Debug, Default)]
struct Closed {
    flag: AtomicBool,
    notify: Notify,
}

impl Closed {
    fn is_closed(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }
}

impl Default for MemoryTransport {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryTransport {
    /// A new private broker with the default configuration.
    pub fn new() -> Self {
        Self::with_config(MemoryConfig::default())
    }

    /// A new private broker.
    pub fn with_config(config: MemoryConfig) -> Self {
        MemoryTransport {
            broker: Arc::new(Broker::new(config)),
            closed: Arc::default(),
        }
    }

    /// The process-wide broker called `name`, created on first use.
    fn named(name: &str, config: MemoryConfig, explicit: bool) -> Result<Self> {
        static REGISTRY: OnceLock<Mutex<HashMap<String, Weak<Broker>>>> = OnceLock::new();
        let registry = REGISTRY.get_or_init(Default::default);
        let mut map = registry.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, b| b.strong_count() > 0);
        if let Some(broker) = map.get(name).and_then(Weak::upgrade) {
            if explicit && broker.config != config {
                return Err(Error::new(
                    ErrorKind::ConfigInvalid,
                    format!(
                        "memory broker `{name}` already exists with capacity={} max_payload_bytes={}; \
                         connect without parameters or use another name",
                        broker.config.capacity, broker.config.max_payload_bytes
                    ),
                ));
            }
            return Ok(MemoryTransport {
                broker,
                closed: Arc::default(),
            });
        }
        let broker = Arc::new(Broker::new(config));
        map.insert(name.to_string(), Arc::downgrade(&broker));
        Ok(MemoryTransport {
            broker,
            closed: Arc::default(),
        })
    }

    /// Another, independent handle on the same broker (like a second client
    /// connection): closing one does not close the other.
    pub fn connect_same(&self) -> MemoryTransport {
        MemoryTransport {
            broker: self.broker.clone(),
            closed: Arc::default(),
        }
    }

    /// Append an entry that did not come through Oona, as another service
    /// would write it. Bytes in Oona's canonical JSON form
    /// ([`crate::wire::json`]) are delivered as envelopes; anything else is
    /// poison and is dead-lettered on delivery with a `decode:` reason.
    pub fn inject_raw(&self, topic: &Topic, raw: impl Into<Bytes>) -> Result<()> {
        self.broker
            .append(vec![(topic.clone(), Stored::Raw(raw.into()))])
            .map(|_| ())
    }

    /// Simulate losing (`true`) and regaining (`false`) the connection, for
    /// every handle of this broker. While offline, calls fail with a
    /// temporary [`ErrorKind::Connection`] error and subscriptions wait.
    pub fn set_offline(&self, offline: bool) {
        self.broker.offline.store(offline, Ordering::Release);
        self.broker.changed.notify_waiters();
    }

    /// The retention in force for `topic`, if the topic exists.
    pub fn applied_retention(&self, topic: &Topic) -> Option<Retention> {
        let st = self.broker.lock();
        st.topics.get(topic).map(|t| t.policy.retention)
    }

    /// Entries currently stored for `topic` (after trimming).
    pub fn stored_len(&self, topic: &Topic) -> usize {
        let st = self.broker.lock();
        st.topics.get(topic).map_or(0, |t| t.entries.len())
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.is_closed() {
            return Err(closed_error());
        }
        self.broker.check_online()
    }
}

fn closed_error() -> Error {
    Error::new(ErrorKind::Closed, "memory transport is closed").with_transport(NAME)
}

#[async_trait]
impl Transport for MemoryTransport {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .with_key_ordered_competing(true)
            .with_depth(true)
            .with_admin(true)
            .with_max_payload_bytes(self.broker.config.max_payload_bytes)
    }

    async fn ensure_topic(&self, topic: &Topic, policy: &TopicPolicy) -> Result<()> {
        self.check_open()?;
        let mut st = self.broker.lock();
        let now = SystemTime::now();
        match st.topics.get_mut(topic) {
            Some(t) => {
                t.policy = policy.clone();
                t.trim_expired(now);
            }
            None => {
                st.topics
                    .insert(topic.clone(), TopicLog::new(policy.clone()));
            }
        }
        Ok(())
    }

    async fn depth(&self, topic: &Topic, group: &Name) -> Result<Depth> {
        self.check_open()?;
        let st = self.broker.lock();
        let found = st
            .topics
            .get(topic)
            .and_then(|t| Some((t, t.groups.get(group)?)));
        let Some((log, g)) = found else {
            return Err(admin::group_not_found(topic, group));
        };
        let end = log.first_seq + log.entries.len() as u64;
        let backlog = end.saturating_sub(g.cursor.max(log.first_seq));
        Ok(Depth::new(backlog, g.pending.len() as u64))
    }

    async fn list_topics(&self) -> Result<Vec<Topic>> {
        self.check_open()?;
        let mut topics: Vec<Topic> = self.broker.lock().topics.keys().cloned().collect();
        topics.sort();
        Ok(topics)
    }

    async fn describe_topic(&self, topic: &Topic) -> Result<TopicInfo> {
        self.check_open()?;
        let st = self.broker.lock();
        let log = st
            .topics
            .get(topic)
            .ok_or_else(|| admin::topic_not_found(topic))?;
        let end = log.first_seq + log.entries.len() as u64;
        let groups = log.groups.iter().map(|(name, g)| {
            let mut held: FastMap<u64, u64> = FastMap::default();
            for p in g.pending.values() {
                if let PendingState::Held { holder, .. } = p.state {
                    *held.entry(holder).or_default() += 1;
                }
            }
            let members = g.members.iter().map(|(h, consumer)| {
                Member::new(consumer.as_str()).with_pending(Some(held.get(h).copied().unwrap_or(0)))
            });
            let backlog = end.saturating_sub(g.cursor.max(log.first_seq));
            GroupInfo::new(name.clone())
                .with_members(members.collect())
                .with_depth(Some(Depth::new(backlog, g.pending.len() as u64)))
        });
        Ok(TopicInfo::new(topic.clone(), 1)
            .with_messages(Some(log.entries.len() as u64))
            .with_retention(Some(log.policy.retention))
            .with_groups(groups.collect()))
    }

    async fn delete_group(&self, topic: &Topic, group: &Name) -> Result<()> {
        self.check_open()?;
        let mut st = self.broker.lock();
        let groups = st.topics.get_mut(topic).map(|t| &mut t.groups);
        match groups.and_then(|g| Some((g.get(group)?.members.len(), g))) {
            None => Err(admin::group_not_found(topic, group)),
            Some((live, _)) if live > 0 => Err(admin::group_busy(group, live)),
            Some((_, groups)) => {
                groups.remove(group);
                Ok(())
            }
        }
    }

    async fn publish(&self, envelope: Envelope) -> Result<Receipt> {
        let span = tracing::debug_span!(
            "oona.publish",
            transport = NAME,
            topic = %envelope.topic,
            event_id = %envelope.event_id
        );
        let _g = span.enter();
        let mut receipts = self.publish_all(vec![envelope])?;
        receipts
            .pop()
            .ok_or_else(|| Error::new(ErrorKind::Internal, "publish returned no receipt"))
    }

    async fn publish_batch(&self, envelopes: Vec<Envelope>) -> Result<Vec<Receipt>> {
        let span = tracing::debug_span!("oona.publish", transport = NAME, batch = envelopes.len());
        let _g = span.enter();
        self.publish_all(envelopes)
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<DeliveryStream> {
        self.check_open()?;
        let holder = self.broker.tokens.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = self.broker.lock();
            let topic = st.topic_mut(&subscription.topic, &self.broker.config.policies)?;
            topic.ensure_group(&subscription);
            if let Some(g) = topic.groups.get_mut(&subscription.group) {
                g.members.insert(holder, subscription.consumer.clone());
            }
        }
        let source = MemorySource {
            broker: self.broker.clone(),
            closed: self.closed.clone(),
            sub: subscription.clone(),
            holder,
        };
        let closed = self.closed.clone();
        let (stream, _task) = engine::start(source, subscription, async move {
            loop {
                let n = closed.notify.notified();
                tokio::pin!(n);
                n.as_mut().enable();
                if closed.is_closed() {
                    return;
                }
                n.await;
            }
        });
        Ok(stream)
    }

    async fn delete_topic(&self, topic: &Topic) -> Result<()> {
        self.check_open()?;
        self.broker.lock().topics.remove(topic);
        self.broker.changed.notify_waiters();
        Ok(())
    }

    async fn health(&self) -> Health {
        if self.closed.is_closed() {
            return Health::new(HealthStatus::Down, NAME, "closed", None);
        }
        match self.broker.check_online() {
            Ok(()) => Health::new(HealthStatus::Up, NAME, "in-process broker", None),
            Err(e) => Health::new(HealthStatus::Down, NAME, e.message(), None),
        }
    }

    async fn close(&self) -> Result<()> {
        // Settlements are applied synchronously, so there is nothing to
        // flush: stopping the streams is all.
        self.closed.flag.store(true, Ordering::Release);
        self.closed.notify.notify_waiters();
        Ok(())
    }
}

impl MemoryTransport {
    fn publish_all(&self, envelopes: Vec<Envelope>) -> Result<Vec<Receipt>> {
        for e in &envelopes {
            rules::check_publish(
                e,
                &self.broker.config.policies,
                self.broker.config.max_payload_bytes,
            )?;
        }
        self.check_open()?;
        let ids: Vec<_> = envelopes
            .iter()
            .map(|e| (e.event_id.clone(), e.topic.clone()))
            .collect();
        let items = envelopes
            .into_iter()
            .map(|e| (e.topic.clone(), Stored::Envelope(Box::new(e))))
            .collect();
        let seqs = self.broker.append(items)?;
        Ok(ids
            .into_iter()
            .zip(seqs)
            .map(|((id, topic), seq)| Receipt::new(id, topic, Some(seq.to_string())))
            .collect())
    }
}

// ---------------------------------------------------------------------------
// The broker.

#[derive(Debug)]
struct Broker {
    config: MemoryConfig,
    state: Mutex<State>,
    /// Woken on every change consumers may care about.
    changed: Notify,
    offline: AtomicBool,
    tokens: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    topics: FastMap<Topic, TopicLog>,
}

/// The broker's maps are looked up several times per delivery with
/// names as keys: a fast hasher (SipHash was a tenth of a consume).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug, Clone)]
enum Stored {
    Envelope(Box<Envelope>),
    Raw(Bytes),
}

#[derive(Debug)]
struct Entry {
    /// When the broker stored it (start-at-time and retention use this).
    at: SystemTime,
    item: Stored,
}

#[derive(Debug)]
struct TopicLog {
    policy: TopicPolicy,
    entries: VecDeque<Entry>,
    /// Sequence number of `entries[0]`.
    first_seq: u64,
    groups: FastMap<Name, Group>,
}

#[derive(Debug)]
struct Group {
    /// Next sequence number never handed to the group.
    cursor: u64,
    /// Handed out (or waiting for redelivery) and not yet settled.
    pending: BTreeMap<u64, Pending>,
    /// No pending entry is ready before this instant (`None`: none is
    /// ready at any time, the set was empty when last scanned). Lowered on
    /// every state change, made exact by every full scan, so that without
    /// key order `pick` skips scanning the entries in flight (up to
    /// prefetch × consumers) when none can be due.
    ready_floor: Option<Instant>,
    /// The consumers subscribed now, by holder.
    members: FastMap<u64, Name>,
}

/// Lower a [`Group::ready_floor`] to cover an entry ready at `at`.
fn lower(floor: &mut Option<Instant>, at: Instant) {
    *floor = Some(floor.map_or(at, |f| f.min(at)));
}

#[derive(Debug)]
struct Pending {
    /// Deliveries so far.
    attempts: u32,
    key: Option<String>,
    /// Given back by a holder that went away without settling it.
    recovered: bool,
    state: PendingState,
}

#[derive(Debug, Clone, Copy)]
enum PendingState {
    /// With a consumer (`holder`) until it settles or gives it back; the
    /// engine owns the lease. `take` identifies the delivery.
    Held { holder: u64, take: u64 },
    /// Deliverable from `at` on.
    Ready { at: Instant },
}

impl PendingState {
    /// When this entry can be handed out again (`None`: while held).
    fn ready_at(self) -> Option<Instant> {
        match self {
            PendingState::Held { .. } => None,
            PendingState::Ready { at } => Some(at),
        }
    }
}

impl Broker {
    fn new(config: MemoryConfig) -> Self {
        Broker {
            config,
            state: Mutex::default(),
            changed: Notify::new(),
            offline: AtomicBool::new(false),
            tokens: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way later calls would misread (every update is one insert or
        // remove), so recover from poisoning.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_online(&self) -> Result<()> {
        if self.offline.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Connection,
                "memory broker is offline (fault injection)",
            )
            .with_transport(NAME));
        }
        Ok(())
    }

    /// Append entries atomically (all or none); returns their sequence
    /// numbers.
    fn append(&self, items: Vec<(Topic, Stored)>) -> Result<Vec<u64>> {
        let seqs = self.append_locked(&mut self.lock(), items)?;
        self.changed.notify_waiters();
        Ok(seqs)
    }

    /// [`Broker::append`] under a lock the caller holds; the caller wakes
    /// consumers.
    fn append_locked(&self, st: &mut State, items: Vec<(Topic, Stored)>) -> Result<Vec<u64>> {
        let now = SystemTime::now();
        // Check room first so that a batch is all-or-nothing. Batches name
        // one topic or a few: a linear scan beats hashing.
        let mut needed: Vec<(&Topic, usize)> = Vec::with_capacity(1);
        for (t, _) in &items {
            match needed.iter_mut().find(|(n, _)| *n == t) {
                Some((_, c)) => *c += 1,
                None => needed.push((t, 1)),
            }
        }
        for (topic, n) in &needed {
            let log = st.topic_mut(topic, &self.config.policies)?;
            log.trim_expired(now);
            log.make_room(*n, self.config.capacity)?;
        }
        let mut seqs = Vec::with_capacity(items.len());
        for (topic, item) in items {
            let log = st.topic_mut(&topic, &self.config.policies)?;
            seqs.push(log.end_seq());
            log.entries.push_back(Entry { at: now, item });
        }
        Ok(seqs)
    }
}

impl State {
    /// The topic's log, created with its plane's policy when missing: one
    /// lookup (this runs on every publish and take; cloning the `Arc`-backed
    /// name is cheap).
    fn topic_mut(&mut self, topic: &Topic, policies: &PolicySet) -> Result<&mut TopicLog> {
        Ok(self
            .topics
            .entry(topic.clone())
            .or_insert_with(|| TopicLog::new(policies.for_topic(topic).clone())))
    }
}

impl TopicLog {
    fn new(policy: TopicPolicy) -> Self {
        TopicLog {
            policy,
            entries: VecDeque::new(),
            first_seq: 0,
            groups: FastMap::default(),
        }
    }

    fn end_seq(&self) -> u64 {
        self.first_seq + self.entries.len() as u64
    }

    fn get(&self, seq: u64) -> Option<&Entry> {
        let idx = seq.checked_sub(self.first_seq)?;
        self.entries.get(usize::try_from(idx).ok()?)
    }

    fn pop_front(&mut self) {
        if self.entries.pop_front().is_some() {
            self.first_seq += 1;
        }
    }

    /// Drop entries older than the retention.
    fn trim_expired(&mut self, now: SystemTime) {
        let Some(keep) = self.policy.retention.duration() else {
            return;
        };
        let before = self.first_seq;
        while let Some(front) = self.entries.front() {
            match now.duration_since(front.at) {
                Ok(age) if age > keep => self.pop_front(),
                _ => break,
            }
        }
        // Only when something went: this runs on every publish and take,
        // and visits every pending entry of every group.
        if self.first_seq != before {
            self.forget_trimmed();
        }
    }

    /// Groups forget pending entries that retention removed.
    fn forget_trimmed(&mut self) {
        let first = self.first_seq;
        for g in self.groups.values_mut() {
            g.cursor = g.cursor.max(first);
            g.pending.retain(|seq, _| *seq >= first);
        }
    }

    /// Make room for `n` more entries by dropping entries every group has
    /// settled; fail when that is not enough.
    fn make_room(&mut self, n: usize, capacity: usize) -> Result<()> {
        if self.entries.len() + n <= capacity {
            return Ok(());
        }
        // Entries below this are settled by every group. Without groups,
        // nothing counts as settled: the entries are history kept for replay.
        let settled_below = self
            .groups
            .values()
            .map(|g| {
                g.pending
                    .keys()
                    .next()
                    .copied()
                    .unwrap_or(g.cursor)
                    .min(g.cursor)
            })
            .min()
            .unwrap_or(self.first_seq);
        while self.entries.len() + n > capacity && self.first_seq < settled_below {
            self.pop_front();
        }
        if self.entries.len() + n > capacity {
            return Err(Error::new(
                ErrorKind::ResourceExhausted,
                format!(
                    "memory topic full: {} of {capacity} entries are unsettled or unread history; \
                     raise `capacity` or consume the topic",
                    self.entries.len()
                ),
            )
            .with_transport(NAME));
        }
        Ok(())
    }

    /// Create the subscription's group at its start position when missing.
    /// Runs on every take: the start position (a scan of the log for
    /// `At`) and the name's clone are paid only on creation.
    fn ensure_group(&mut self, sub: &Subscription) {
        if self.groups.contains_key(&sub.group) {
            return;
        }
        let cursor = match sub.start {
            StartPosition::Latest => self.end_seq(),
            StartPosition::Earliest => self.first_seq,
            StartPosition::At(t) => {
                let t = t.system_time();
                let skip = self.entries.iter().take_while(|e| e.at < t).count() as u64;
                self.first_seq + skip
            }
        };
        self.groups.insert(
            sub.group.clone(),
            Group {
                cursor,
                pending: BTreeMap::new(),
                ready_floor: None,
                members: FastMap::default(),
            },
        );
    }
}

fn key_of(item: &Stored) -> Option<String> {
    match item {
        Stored::Envelope(e) => e.key.clone(),
        Stored::Raw(_) => None,
    }
}

/// Longest a fetch waits when nothing is deliverable.
const FETCH_WAIT: Duration = Duration::from_millis(500);

/// Which holder took an entry, and which take it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Token {
    seq: u64,
    take: u64,
}

/// One subscription's side of the broker, run by the core's engine.
struct MemorySource {
    broker: Arc<Broker>,
    closed: Arc<Closed>,
    sub: Subscription,
    /// This consumer, as the broker's pending entries name it.
    holder: u64,
}

impl MemorySource {
    /// Take up to `max` deliverable entries, or say when to look again.
    fn take(&self, max: usize) -> Result<(Vec<Fetched<Token>>, Option<Instant>)> {
        let sub = &self.sub;
        let now = Instant::now();
        let mut st = self.broker.lock();
        let log = st.topic_mut(&sub.topic, &self.broker.config.policies)?;
        log.trim_expired(SystemTime::now());
        log.ensure_group(sub);
        let mut out = Vec::with_capacity(max.min(64));
        while out.len() < max {
            let Some(seq) = pick(log, sub, now) else {
                break;
            };
            // Clone the envelope, not its box (one allocation less).
            let item = log.get(seq).map(|e| match &e.item {
                Stored::Envelope(env) => Ok(Envelope::clone(env)),
                Stored::Raw(raw) => Err(raw.clone()),
            });
            let Some(group) = log.groups.get_mut(&sub.group) else {
                break;
            };
            let Some(item) = item else {
                // Trimmed by retention: nothing left to deliver.
                group.pending.remove(&seq);
                continue;
            };
            let Some(p) = group.pending.get_mut(&seq) else {
                continue;
            };
            p.attempts += 1;
            let take = self.broker.tokens.fetch_add(1, Ordering::Relaxed);
            p.state = PendingState::Held {
                holder: self.holder,
                take,
            };
            let recovered = std::mem::take(&mut p.recovered);
            let message = item.or_else(|raw| {
                wire::json::decode_on(&sub.topic, &raw)
                    .map_err(|e| Poison::new(raw, ContentType::new(ContentType::OCTET_STREAM), e))
            });
            out.push(
                Fetched::new(
                    Token { seq, take },
                    message,
                    p.attempts,
                    Some(seq.to_string()),
                )
                .recovered(recovered),
            );
            if recovered {
                break; // a recovered entry goes alone
            }
        }
        let next = log.groups.get(&sub.group).and_then(|g| {
            if sub.key_ordered {
                // Key-blocked entries may be ready yet waiting.
                g.pending
                    .values()
                    .filter_map(|p| p.state.ready_at())
                    .filter(|t| *t > now)
                    .min()
            } else {
                g.ready_floor.filter(|t| *t > now)
            }
        });
        Ok((out, next))
    }

    /// Whether this consumer still holds the entry of `token`.
    fn holds(&self, st: &State, token: Token) -> bool {
        st.topics
            .get(&self.sub.topic)
            .and_then(|t| t.groups.get(&self.sub.group))
            .and_then(|g| g.pending.get(&token.seq))
            .is_some_and(|p| {
                matches!(p.state, PendingState::Held { holder, take } if holder == self.holder && take == token.take)
            })
    }

    /// This subscription's group.
    fn group_mut<'s>(&self, st: &'s mut State) -> Option<&'s mut Group> {
        st.topics
            .get_mut(&self.sub.topic)
            .and_then(|t| t.groups.get_mut(&self.sub.group))
    }

    /// Change the group of `token`'s entry if this consumer still holds it.
    fn with_held(&self, token: Token, f: impl FnOnce(&mut Group)) -> Result<()> {
        self.broker.check_online()?;
        let mut st = self.broker.lock();
        if self.holds(&st, token) {
            if let Some(g) = self.group_mut(&mut st) {
                f(g);
            }
        }
        drop(st);
        self.broker.changed.notify_waiters();
        Ok(())
    }

    /// Make an entry deliverable from `at` (`uncount`: the take is undone).
    fn put_back(&self, token: Token, at: Instant, uncount: bool) -> Result<()> {
        self.with_held(token, |g| {
            if let Some(p) = g.pending.get_mut(&token.seq) {
                if uncount {
                    p.attempts = p.attempts.saturating_sub(1);
                }
                p.state = PendingState::Ready { at };
            }
            lower(&mut g.ready_floor, at);
        })
    }
}

#[async_trait]
impl Source for MemorySource {
    type Token = Token;
    const HOLDS_READY: bool = true;

    async fn fetch(&self, max: usize) -> Result<Vec<Fetched<Token>>> {
        let until = Instant::now() + FETCH_WAIT;
        loop {
            let changed = self.broker.changed.notified();
            let closed = self.closed.notify.notified();
            tokio::pin!(changed, closed);
            changed.as_mut().enable();
            closed.as_mut().enable();
            if self.closed.is_closed() {
                return Ok(Vec::new());
            }
            self.broker.check_online()?;
            let (got, next) = self.take(max)?;
            if !got.is_empty() || Instant::now() >= until {
                return Ok(got);
            }
            let wake = next.map_or(until, |n| n.min(until));
            tokio::select! {
                _ = &mut changed => {}
                _ = &mut closed => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    fn take_ready(&self, max: usize) -> Vec<Fetched<Token>> {
        if self.closed.is_closed() || self.broker.check_online().is_err() {
            return Vec::new();
        }
        self.take(max).map(|(got, _)| got).unwrap_or_default()
    }

    async fn ack(&self, token: Token) -> Result<()> {
        self.with_held(token, |g| {
            g.pending.remove(&token.seq);
        })
    }

    async fn redeliver(&self, token: Token, delay: Duration) -> Result<Option<Fetched<Token>>> {
        self.put_back(token, Instant::now() + delay, false)?;
        Ok(None)
    }

    async fn dead_letter(&self, token: Token, dead_letter: Envelope) -> Result<()> {
        self.broker.check_online()?;
        let mut st = self.broker.lock();
        if self.holds(&st, token) {
            // Publish first, then forget: if the dead-letter topic is full
            // the entry stays held and the engine gives it back.
            let dl = (
                dead_letter.topic.clone(),
                Stored::Envelope(Box::new(dead_letter)),
            );
            self.broker.append_locked(&mut st, vec![dl])?;
            if let Some(g) = self.group_mut(&mut st) {
                g.pending.remove(&token.seq);
            }
        }
        drop(st);
        self.broker.changed.notify_waiters();
        Ok(())
    }

    async fn release(&self, tokens: Vec<Token>) {
        let now = Instant::now();
        for t in tokens {
            let _ = self.put_back(t, now, true);
        }
    }

    async fn close(&self) {
        // Whatever this consumer still holds goes back as a vanished
        // holder's would: charged, and recovered.
        let now = Instant::now();
        let mut st = self.broker.lock();
        if let Some(g) = st
            .topics
            .get_mut(&self.sub.topic)
            .and_then(|t| t.groups.get_mut(&self.sub.group))
        {
            g.members.remove(&self.holder);
            let mut any = false;
            for p in g.pending.values_mut() {
                if matches!(p.state, PendingState::Held { holder, .. } if holder == self.holder) {
                    p.state = PendingState::Ready { at: now };
                    p.recovered = true;
                    any = true;
                }
            }
            if any {
                lower(&mut g.ready_floor, now);
            }
        }
        drop(st);
        self.broker.changed.notify_waiters();
    }
}

/// Choose the next entry to hand out (moving it into pending when it comes
/// from the unread part of the log).
///
/// An entry returned from the unread part is left `Ready` at `now` without
/// lowering the group's `ready_floor`: the caller must set its state (and
/// lower the floor) or remove it.
fn pick(log: &mut TopicLog, sub: &Subscription, now: Instant) -> Option<u64> {
    let end = log.end_seq();
    let first = log.first_seq;
    // Keys of entries in flight or waiting: a later entry with the same key
    // must wait (key-ordered subscriptions only).
    let mut blocked: HashSet<String> = HashSet::new();
    let TopicLog {
        entries, groups, ..
    } = log;
    let group = groups.get_mut(&sub.group)?;
    // Key order needs every pending key; otherwise scan only when something
    // may be due.
    if sub.key_ordered || group.ready_floor.is_some_and(|f| f <= now) {
        let mut floor = None;
        for (seq, p) in &group.pending {
            let at = p.state.ready_at();
            let key_free = !sub.key_ordered || p.key.as_ref().is_none_or(|k| !blocked.contains(k));
            if at.is_some_and(|at| at <= now) && key_free {
                return Some(*seq);
            }
            if let Some(at) = at {
                lower(&mut floor, at);
            }
            if sub.key_ordered {
                if let Some(k) = &p.key {
                    blocked.insert(k.clone());
                }
            }
        }
        // Every pending entry was seen: the floor is exact.
        group.ready_floor = floor;
    }
    // Read new entries; a key-blocked one waits in pending, ready at once.
    while group.cursor < end {
        let seq = group.cursor.max(first);
        group.cursor = seq + 1;
        let idx = usize::try_from(seq - first).ok()?;
        let key = entries.get(idx).and_then(|e| key_of(&e.item));
        let free = !sub.key_ordered || key.as_ref().is_none_or(|k| !blocked.contains(k));
        group.pending.insert(
            seq,
            Pending {
                attempts: 0,
                key: key.clone(),
                recovered: false,
                state: PendingState::Ready { at: now },
            },
        );
        if free {
            return Some(seq);
        }
        lower(&mut group.ready_floor, now);
        if let Some(k) = key {
            blocked.insert(k);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Delivery;
    use futures::StreamExt;
    use std::time::Duration;

    fn topic(s: &str) -> Topic {
        Topic::new(s).unwrap()
    }

    fn sub(t: &Topic, g: &str) -> Subscription {
        Subscription::new(t.clone(), Name::new(g).unwrap()).start(StartPosition::Earliest)
    }

    async fn next(s: &mut DeliveryStream) -> Delivery {
        tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .expect("a delivery in time")
            .expect("stream open")
            .expect("no error")
    }

    #[tokio::test]
    async fn full_topic_is_an_error_until_consumed() {
        let m = MemoryTransport::with_config(MemoryConfig::default().capacity(3).unwrap());
        let t = topic("telemetry.test.full");
        let mut s = m.subscribe(sub(&t, "g")).await.unwrap();
        for i in 0..3 {
            m.publish(Envelope::builder(t.clone(), format!("{i}")).build())
                .await
                .unwrap();
        }
        let e = m
            .publish(Envelope::builder(t.clone(), "x").build())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
        assert!(e.is_temporary());
        // Delivered but unacked is not settled: still full.
        let d = next(&mut s).await;
        let e = m
            .publish(Envelope::builder(t.clone(), "x").build())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
        d.ack().await.unwrap();
        m.publish(Envelope::builder(t.clone(), "3").build())
            .await
            .unwrap();
        assert_eq!(m.stored_len(&t), 3);
        // A batch that does not fit is refused whole.
        let batch = (0..2)
            .map(|_| Envelope::builder(t.clone(), "b").build())
            .collect();
        assert!(m.publish_batch(batch).await.is_err());
        assert_eq!(m.stored_len(&t), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_redelivers_with_next_attempt_then_dead_letters() {
        let m = MemoryTransport::new();
        let t = topic("control.test.deadline");
        let mut s = m
            .subscribe(
                sub(&t, "g")
                    .ack_deadline(Duration::from_secs(2))
                    .max_attempts(2),
            )
            .await
            .unwrap();
        let mut dlq = m.subscribe(sub(&t.dead_letter(), "dl")).await.unwrap();
        m.publish(Envelope::builder(t.clone(), "p").build())
            .await
            .unwrap();
        let d = next(&mut s).await;
        assert_eq!(d.attempt(), 1);
        drop(d);
        let d = next(&mut s).await;
        assert_eq!(d.attempt(), 2);
        drop(d);
        // The consumer's next poll finds attempt 3 due and dead-letters it
        // instead of delivering.
        let third = tokio::spawn(async move { s.next().await.map(|r| r.map(|d| d.attempt())) });
        let dl = next(&mut dlq).await;
        let info = rules::DeadLetterInfo::parse(dl.envelope()).unwrap();
        assert_eq!(info.attempts, 2);
        assert!(info.reason.contains("ack deadline"), "{}", info.reason);
        assert_eq!(&info.original.payload[..], b"p");
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!third.is_finished(), "nothing more is delivered");
        third.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn due_entries_come_before_unread_ones_while_others_are_in_flight() {
        let m = MemoryTransport::new();
        let t = topic("telemetry.test.due");
        // Prefetch 3: what the engine reads is decided by the broker's
        // order, one free slot at a time.
        let mut s = m
            .subscribe(
                sub(&t, "g")
                    .ack_deadline(Duration::from_secs(2))
                    .prefetch(3),
            )
            .await
            .unwrap();
        for i in 0..6 {
            m.publish(Envelope::builder(t.clone(), format!("{i}")).build())
                .await
                .unwrap();
        }
        let body = |d: &Delivery| String::from_utf8(d.envelope().payload.to_vec()).unwrap();
        let d0 = next(&mut s).await;
        let d1 = next(&mut s).await;
        let d2 = next(&mut s).await;
        // A nack among held deliveries is due at once: it comes back before
        // the unread entries.
        d1.nack(None).await.unwrap();
        let again = next(&mut s).await;
        assert_eq!((body(&again), again.attempt()), ("1".to_string(), 2));
        d2.ack().await.unwrap();
        let d3 = next(&mut s).await;
        assert_eq!(body(&d3), "3");
        // A nack delay holds it back until then, not longer.
        again.nack(Some(Duration::from_millis(500))).await.unwrap();
        let d4 = next(&mut s).await;
        assert_eq!(body(&d4), "4");
        d3.ack().await.unwrap();
        let d5 = next(&mut s).await;
        assert_eq!(body(&d5), "5");
        d4.ack().await.unwrap();
        let started = Instant::now();
        let later = next(&mut s).await;
        assert_eq!((body(&later), later.attempt()), ("1".to_string(), 3));
        assert!(started.elapsed() < Duration::from_secs(1));
        // The deadline passes for the one still held: it comes back.
        for d in [d5, later] {
            d.ack().await.unwrap();
        }
        let back = next(&mut s).await;
        assert_eq!((body(&back), back.attempt()), ("0".to_string(), 2));
        drop(d0);
        back.ack().await.unwrap();
        let none = tokio::time::timeout(Duration::from_secs(60), s.next()).await;
        assert!(none.is_err(), "nothing left to deliver");
    }

    #[tokio::test]
    async fn poison_is_dead_lettered_and_consumer_goes_on() {
        let m = MemoryTransport::new();
        let t = topic("system.test.poison");
        let mut s = m.subscribe(sub(&t, "g")).await.unwrap();
        let mut dlq = m.subscribe(sub(&t.dead_letter(), "dl")).await.unwrap();
        m.inject_raw(&t, &b"\xffnot an envelope"[..]).unwrap();
        let good = Envelope::builder(t.clone(), "{}").build();
        m.inject_raw(&t, wire::json::encode(&good).unwrap())
            .unwrap();
        let d = next(&mut s).await;
        assert_eq!(d.envelope(), &good);
        d.ack().await.unwrap();
        let dl = next(&mut dlq).await;
        let info = rules::DeadLetterInfo::parse(dl.envelope()).unwrap();
        assert!(info.reason.starts_with("decode:"), "{}", info.reason);
        assert_eq!(&info.original.payload[..], b"\xffnot an envelope");
    }

    #[tokio::test]
    async fn key_order_holds_across_competing_consumers() {
        let m = MemoryTransport::new();
        let t = topic("telemetry.test.keys");
        let s1 = m.subscribe(sub(&t, "g").key_ordered(true)).await.unwrap();
        let s2 = m.subscribe(sub(&t, "g").key_ordered(true)).await.unwrap();
        for i in 0..20 {
            let e = Envelope::builder(t.clone(), format!("{i}"))
                .key(format!("k{}", i % 2))
                .build();
            m.publish(e).await.unwrap();
        }
        // Hold the first delivery of each consumer: no second message of the
        // same key may be handed out meanwhile.
        let mut all = futures::stream::select(s1, s2);
        let a = all.next().await.unwrap().unwrap();
        let b = all.next().await.unwrap().unwrap();
        assert_ne!(a.envelope().key, b.envelope().key);
        let blocked = tokio::time::timeout(Duration::from_millis(100), all.next()).await;
        assert!(
            blocked.is_err(),
            "a third delivery while both keys are held"
        );
        a.ack().await.unwrap();
        b.ack().await.unwrap();
        let mut seen: HashMap<String, Vec<u32>> = HashMap::new();
        for _ in 0..18 {
            let d = all.next().await.unwrap().unwrap();
            let n: u32 = std::str::from_utf8(&d.envelope().payload)
                .unwrap()
                .parse()
                .unwrap();
            seen.entry(d.envelope().key.clone().unwrap())
                .or_default()
                .push(n);
            d.ack().await.unwrap();
        }
        assert_eq!(seen["k0"], (2..20).step_by(2).collect::<Vec<_>>());
        assert_eq!(seen["k1"], (3..20).step_by(2).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn url_names_share_a_broker_and_bad_keys_are_named() {
        let a = (DRIVER.connect)(ConnectUrl::parse("memory://shared-test").unwrap())
            .await
            .unwrap();
        let b = (DRIVER.connect)(ConnectUrl::parse("memory://shared-test").unwrap())
            .await
            .unwrap();
        let t = topic("system.test.shared");
        let mut s = b.subscribe(sub(&t, "g")).await.unwrap();
        a.publish(Envelope::builder(t.clone(), "hi").build())
            .await
            .unwrap();
        assert_eq!(&next(&mut s).await.envelope().payload[..], b"hi");

        let e = (DRIVER.connect)(ConnectUrl::parse("memory://?capcity=3").unwrap())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
        assert!(e.to_string().contains("`capcity`"), "{e}");
        let e = (DRIVER.connect)(ConnectUrl::parse("memory://x?capacity=0").unwrap())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
    }

    #[tokio::test]
    async fn close_ends_streams_and_refuses_publish() {
        let m = MemoryTransport::new();
        let other = m.connect_same();
        let t = topic("system.test.close");
        let mut s = m.subscribe(sub(&t, "g")).await.unwrap();
        m.close().await.unwrap();
        assert!(s.next().await.is_none());
        let e = m
            .publish(Envelope::builder(t.clone(), "x").build())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Closed);
        other
            .publish(Envelope::builder(t, "x").build())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn retention_follows_the_plane() {
        let m = MemoryTransport::new();
        let t = topic("innovation.test.keep");
        m.publish(Envelope::builder(t.clone(), "x").build())
            .await
            .unwrap();
        assert_eq!(m.applied_retention(&t), Some(Retention::Indefinite));
        let t = topic("telemetry.test.short");
        m.ensure_topic(
            &t,
            &TopicPolicy::new(Retention::For(Duration::from_millis(1))),
        )
        .await
        .unwrap();
        m.publish(Envelope::builder(t.clone(), "old").build())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        m.publish(Envelope::builder(t.clone(), "new").build())
            .await
            .unwrap();
        assert_eq!(m.stored_len(&t), 1);
    }
}
