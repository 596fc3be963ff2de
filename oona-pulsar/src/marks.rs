//! Attempt counts that survive a crash of a consumer.
//!
//! Pulsar counts a redelivery only when a consumer asks for one (a nack,
//! an expired deadline), and keeps the count in the broker's memory: a
//! message whose consumer died is handed to the next one at the count it
//! had, so a message that crashes every consumer it reaches would loop
//! forever and never reach its dead-letter topic. Each subscription
//! therefore records what it hands out in a *marks topic* of its group,
//! `<topic>=oona-marks=<group>` (`=` cannot occur in an Oona topic):
//!
//! - one message per consumer session (one connection), keyed by the
//!   session, whose payload lists the entries the session holds with the
//!   attempt each was handed out at: `oona1;held=<ledger>:<entry>[:<attempt>],...`
//!   (attempt 1 is left out). An empty payload deletes the key (the session
//!   holds nothing, or closed in order).
//! - A session writes its list, and waits until the broker has it and its
//!   own reader of the marks topic has read that far, *before* it gives
//!   the entries to the engine; it rewrites the list every [`REFRESH`]
//!   while it holds anything (settled entries drop out then).
//! - Every subscription tails the marks topic (compacted: the latest list
//!   of each session). An entry that arrives with a broker count that does
//!   not cover a hand-out another session recorded was *recovered* from a
//!   vanished holder: it goes out alone, at one attempt more than recorded,
//!   its new attempt written first. So a message that kills consumer after
//!   consumer counts every crash and is dead-lettered after
//!   `max_attempts`, alone; read-ahead of a crashed consumer is charged at
//!   most one attempt.
//! - Lists of sessions not refreshed for [`EXPIRE`] (their consumer died
//!   and the broker has handed their entries on) are deleted by whichever
//!   subscription notices.
//!
//! With `admin_url` the marks topic gets a compaction threshold, so a new
//! subscription reads only the current lists; without it the broker keeps
//! what the namespace's retention keeps and a new subscription reads that.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, SinkExt};
use pulsar::message::proto::{self, base_command::Type, MessageIdData};
use pulsar::{Producer, TokioExecutor};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use oona_core::engine::Fetched;
use oona_core::{Name, Result};

use crate::conn::{command, conn_err};
use crate::transport::{pulsar_err, Inner};

const VERSION: &str = "oona1";

/// How often a session that holds entries rewrites its list.
pub(crate) const REFRESH: Duration = Duration::from_secs(10);

/// A list not rewritten for this long belongs to a session that is gone.
pub(crate) const EXPIRE: Duration = Duration::from_secs(600);

/// How long an entry given back for redelivery stays on the list (the
/// broker's count of it lives in memory and is lost when the last
/// consumer of the group leaves).
const GIVEN_BACK_KEEP: Duration = Duration::from_secs(300);

/// Most entries given back that stay listed (the newest): the list is
/// written whole, so it must stay about as long as the prefetch.
const GIVEN_BACK_MAX: usize = 256;

/// Most writes of one subscription's list on their way at once (each
/// lists everything before it, so they pipeline).
const MAX_WRITES: usize = 8;

/// Compaction threshold set on a marks topic (with the admin API).
pub(crate) const COMPACTION_BYTES: u64 = 1024 * 1024;

/// A broker entry: one message or one producer batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct EntryKey {
    pub ledger: u64,
    pub entry: u64,
}

impl EntryKey {
    pub(crate) fn of(id: &MessageIdData) -> Self {
        EntryKey {
            ledger: id.ledger_id,
            entry: id.entry_id,
        }
    }
}

/// The marks topic of `group` on the Pulsar topic `full`.
pub(crate) fn topic(full: &str, group: &Name) -> String {
    format!("{}{group}", prefix(full))
}

/// What the names of the marks topics of `topic`'s groups start with.
pub(crate) fn prefix(topic: &str) -> String {
    format!("{topic}=oona-marks=")
}

/// The payload listing `held`.
pub(crate) fn encode<'a>(held: impl IntoIterator<Item = (&'a EntryKey, &'a u32)>) -> Vec<u8> {
    use std::fmt::Write;
    let mut out = format!("{VERSION};held=");
    for (i, (k, a)) in held.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{}:{}", k.ledger, k.entry);
        if *a > 1 {
            let _ = write!(out, ":{a}");
        }
    }
    out.into_bytes()
}

/// The entries a payload lists; a payload that is not Oona's lists none.
pub(crate) fn parse(payload: &[u8]) -> HashMap<EntryKey, u32> {
    let Some(rest) = std::str::from_utf8(payload)
        .ok()
        .and_then(|s| s.strip_prefix(VERSION))
    else {
        return HashMap::new();
    };
    let mut out = HashMap::new();
    for field in rest.split(';') {
        let Some(list) = field.strip_prefix("held=") else {
            continue; // empty, or a later version's field
        };
        for item in list.split(',').filter(|s| !s.is_empty()) {
            let mut p = item.split(':');
            let (Some(l), Some(e)) = (p.next(), p.next()) else {
                continue;
            };
            let (Ok(ledger), Ok(entry)) = (l.parse(), e.parse()) else {
                continue;
            };
            let attempt = p.next().and_then(|a| a.parse().ok()).unwrap_or(1);
            out.insert(EntryKey { ledger, entry }, attempt);
        }
    }
    out
}

/// What the reader knows: the latest list of each session.
#[derive(Default)]
pub(crate) struct Index {
    sessions: HashMap<String, Seen>,
}

struct Seen {
    /// When this process last read a list of the session.
    at: Instant,
    held: HashMap<EntryKey, u32>,
}

impl Index {
    fn apply(&mut self, session: String, payload: &[u8]) {
        if payload.is_empty() {
            self.sessions.remove(&session);
        } else {
            let held = parse(payload);
            let at = Instant::now();
            self.sessions.insert(session, Seen { at, held });
        }
    }

    /// The highest attempt any session but `own` recorded for `key`.
    pub(crate) fn charged(&self, key: &EntryKey, own: &str) -> Option<u32> {
        self.sessions
            .iter()
            .filter(|(s, _)| s.as_str() != own)
            .filter_map(|(_, seen)| seen.held.get(key).copied())
            .max()
    }

    /// Sessions whose list was not rewritten for `age`; forgotten here.
    fn take_expired(&mut self, age: Duration) -> Vec<String> {
        let now = Instant::now();
        let gone: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.duration_since(s.at) >= age)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            self.sessions.remove(k);
        }
        gone
    }
}

fn lock(m: &Mutex<Index>) -> std::sync::MutexGuard<'_, Index> {
    // The index stays consistent if a holder panicked.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An entry waiting for its mark.
pub(crate) struct Staged<T> {
    pub key: EntryKey,
    /// The attempt the broker's count says.
    pub broker_attempt: u32,
    pub items: Vec<Fetched<T>>,
    attempt: u32,
    recovered: bool,
}

impl<T> Staged<T> {
    pub(crate) fn new(key: EntryKey, broker_attempt: u32, items: Vec<Fetched<T>>) -> Self {
        Staged {
            key,
            broker_attempt,
            items,
            attempt: broker_attempt,
            recovered: false,
        }
    }
}

struct Write<T> {
    done: BoxFuture<'static, Result<()>>,
    batch: Vec<Staged<T>>,
    /// Flushes answered once this write is on the broker.
    flushes: Vec<oneshot::Sender<()>>,
}

/// Between the broker's messages and the engine: this subscription's list,
/// what waits for its mark, the recovered entries waiting their turn.
/// Without `crash_counts` it hands everything on at once.
pub(crate) struct Marker<T> {
    out: mpsc::UnboundedSender<Fetched<T>>,
    /// `None` without `crash_counts`.
    producer: Option<Producer<TokioExecutor>>,
    index: Arc<Mutex<Index>>,
    read: watch::Receiver<Option<EntryKey>>,
    base: String,
    session: String,
    /// This session's list: entries handed out or about to be, with the
    /// attempt; `Some` once given back for redelivery.
    mine: BTreeMap<EntryKey, (u32, Option<Instant>)>,
    staged: Vec<Staged<T>>,
    recovered: VecDeque<Staged<T>>,
    recovered_out: Option<EntryKey>,
    /// Writes on their way, oldest first (the broker confirms them in
    /// order).
    writing: VecDeque<Write<T>>,
    last_write: Option<Instant>,
    retry_at: Option<Instant>,
    /// The list on the broker is not the empty one.
    listed: bool,
    /// The list changed in a way the broker must see now (entries given
    /// back unhanded, a flush).
    urgent: bool,
    flushes: Vec<oneshot::Sender<()>>,
}

impl<T: Send + 'static> Marker<T> {
    /// Start the reader of the marks topic of `group` on `full` and make
    /// the producer of this subscription's lists.
    pub(crate) async fn start(
        inner: &Arc<Inner>,
        full: &str,
        group: &Name,
        consumer_id: u64,
        out: mpsc::UnboundedSender<Fetched<T>>,
    ) -> Result<Self> {
        let base = format!("{}-{consumer_id:x}", uuid::Uuid::new_v4().simple());
        let (_, read) = watch::channel(None);
        let mut marker = Marker {
            out,
            producer: None,
            index: Arc::default(),
            read,
            session: format!("{base}-1"),
            base,
            mine: BTreeMap::new(),
            staged: Vec::new(),
            recovered: VecDeque::new(),
            recovered_out: None,
            writing: VecDeque::new(),
            last_write: None,
            retry_at: None,
            listed: false,
            urgent: false,
            flushes: Vec::new(),
        };
        if !inner.config.crash_counts {
            return Ok(marker);
        }
        let marks = topic(full, group);
        let producer = inner.new_producer(&marks, None).await?;
        if let Some(admin) = inner.admin() {
            let local = marks.rsplit('/').next().unwrap_or(&marks);
            if let Err(e) = admin
                .set_compaction_threshold(local, COMPACTION_BYTES)
                .await
            {
                // Marks still work; new subscriptions read more of them.
                tracing::warn!(topic = %marks, error = %e, "marks: no compaction threshold");
            }
        }
        let (read_tx, read) = watch::channel(None);
        let reader = Reader {
            inner: Arc::clone(inner),
            topic: marks,
            index: Arc::clone(&marker.index),
            read: read_tx,
            consumer_id: inner.next_consumer_id(),
        };
        inner.track_task(tokio::spawn(reader.run()));
        marker.read = read;
        marker.producer = Some(producer);
        Ok(marker)
    }

    /// An entry read from the broker, to go out once marked.
    pub(crate) fn stage(&mut self, s: Staged<T>) {
        if self.producer.is_some() {
            self.staged.push(s);
        } else {
            self.hand_on(s);
        }
    }

    fn hand_on(&mut self, s: Staged<T>) {
        for mut f in s.items {
            f.attempt = s.attempt;
            if self.out.send(f.recovered(s.recovered)).is_err() {
                // The engine is gone: never handed out.
                self.released(&s.key);
            }
        }
    }

    /// The entry is settled for good (acked, dead-lettered).
    pub(crate) fn done(&mut self, key: &EntryKey) {
        self.mine.remove(key);
        self.turn_over(key);
    }

    /// The entry was given back for redelivery: its attempt stays listed a
    /// while, in case the broker forgets its count.
    pub(crate) fn given_back(&mut self, key: &EntryKey) {
        if let Some(m) = self.mine.get_mut(key) {
            m.1 = Some(Instant::now());
        }
        self.turn_over(key);
    }

    /// The engine gives the entry back unhanded: off the list at once.
    pub(crate) fn released(&mut self, key: &EntryKey) {
        if self.mine.remove(key).is_some() {
            self.urgent = true;
        }
        self.turn_over(key);
    }

    /// Answer `w` once the list as it is now is on the broker.
    pub(crate) fn flush(&mut self, w: oneshot::Sender<()>) {
        if self.producer.is_none() || (self.mine.is_empty() && !self.listed) {
            let _ = w.send(());
            return;
        }
        self.urgent = true;
        self.flushes.push(w);
    }

    fn turn_over(&mut self, key: &EntryKey) {
        if self.recovered_out == Some(*key) {
            self.recovered_out = None;
        }
    }

    /// The connection was lost: the broker hands everything out again, and
    /// this session's list stays for the next holder to find.
    pub(crate) fn new_session(&mut self, n: u64) {
        self.session = format!("{}-{n}", self.base);
        self.mine.clear();
        self.staged.clear();
        self.recovered.clear();
        self.recovered_out = None;
        self.writing.clear();
        self.listed = false;
        self.last_write = None;
    }

    /// Whether a write is on its way (poll [`Marker::written`]).
    pub(crate) fn writing(&self) -> bool {
        !self.writing.is_empty()
    }

    /// When the next timed step is due (a refresh, a retry).
    pub(crate) fn wake_at(&self) -> Option<Instant> {
        if !self.writing.is_empty() {
            return None; // `pump` runs when the write is done
        }
        if let Some(t) = self.retry_at {
            return Some(t);
        }
        let due = self.last_write.map(|t| t + REFRESH);
        if !self.mine.is_empty() || self.listed {
            due.or_else(|| Some(Instant::now()))
        } else {
            None
        }
    }

    /// Completes when the oldest write on its way is on the broker and
    /// read back.
    pub(crate) async fn written(&mut self) -> Result<()> {
        match self.writing.front_mut() {
            Some(w) => (&mut w.done).await,
            None => futures::future::pending().await,
        }
    }

    /// Classify what waits, let a recovered entry take its turn, and write
    /// the list if anything changed or a refresh is due.
    pub(crate) async fn pump(&mut self) {
        if self.writing.len() >= MAX_WRITES || self.retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        if self.producer.is_none() {
            return;
        }
        self.retry_at = None;
        let mut batch = Vec::new();
        for mut s in std::mem::take(&mut self.staged) {
            self.classify(&mut s);
            if s.recovered {
                self.recovered.push_back(s);
            } else {
                batch.push(s);
            }
        }
        if self.recovered_out.is_none() {
            if let Some(r) = self.recovered.pop_front() {
                self.recovered_out = Some(r.key);
                batch.push(r);
            }
        }
        let due = self.last_write.is_none_or(|t| t.elapsed() >= REFRESH);
        let refresh = due && (self.listed || !self.mine.is_empty());
        if batch.is_empty() && !refresh && !self.urgent {
            return;
        }
        self.urgent = false;
        for s in &batch {
            self.mine.insert(s.key, (s.attempt, None));
        }
        self.forget_given_back();
        let payload = if self.mine.is_empty() {
            Vec::new()
        } else {
            encode(self.mine.iter().map(|(k, (a, _))| (k, a)))
        };
        self.listed = !payload.is_empty();
        let expired = lock(&self.index).take_expired(EXPIRE);
        let Some(producer) = self.producer.as_mut() else {
            return;
        };
        for gone in expired.into_iter().filter(|s| *s != self.session) {
            // Best effort: another subscription notices too.
            tracing::debug!(session = %gone, "marks: deleting the list of a session gone");
            let _ = producer.send_non_blocking(tombstone(gone)).await;
        }
        self.last_write = Some(Instant::now());
        let msg = pulsar::producer::Message {
            payload,
            partition_key: Some(self.session.clone()),
            ..Default::default()
        };
        let sent = producer.send_non_blocking(msg).await;
        let mut read = self.read.clone();
        let done = async move {
            let receipt = sent
                .map_err(|e| pulsar_err("write marks", e))?
                .await
                .map_err(|e| pulsar_err("write marks", e))?;
            let at = receipt
                .message_id
                .as_ref()
                .map(EntryKey::of)
                .ok_or_else(|| conn_err("a send receipt without a message id"))?;
            read.wait_for(|r| r.is_some_and(|r| r >= at))
                .await
                .map_err(|_| conn_err("the marks reader ended"))?;
            Ok(())
        }
        .boxed();
        let flushes = std::mem::take(&mut self.flushes);
        self.writing.push_back(Write {
            done,
            batch,
            flushes,
        });
    }

    /// Entries given back long ago, or beyond the newest [`GIVEN_BACK_MAX`],
    /// leave the list.
    fn forget_given_back(&mut self) {
        let now = Instant::now();
        self.mine
            .retain(|_, (_, given)| given.is_none_or(|t| now.duration_since(t) < GIVEN_BACK_KEEP));
        let mut given: Vec<(Instant, EntryKey)> = self
            .mine
            .iter()
            .filter_map(|(k, (_, g))| g.map(|t| (t, *k)))
            .collect();
        if given.len() > GIVEN_BACK_MAX {
            given.sort_unstable();
            for (_, k) in &given[..given.len() - GIVEN_BACK_MAX] {
                self.mine.remove(k);
            }
        }
    }

    /// The attempt `s` goes out at: recovered when another session recorded
    /// a hand-out the broker's count does not cover.
    fn classify(&self, s: &mut Staged<T>) {
        let charged = lock(&self.index).charged(&s.key, &self.session);
        if let Some(c) = charged.filter(|c| *c >= s.broker_attempt) {
            s.attempt = c.saturating_add(1);
            s.recovered = true;
        }
    }

    /// The write finished: what it covered goes to the engine (through
    /// `send`), unless the marks read meanwhile show it was recovered.
    pub(crate) fn on_written(&mut self, r: Result<()>) {
        let Some(w) = self.writing.pop_front() else {
            return;
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "marks: recording hand-outs failed; retrying before handing messages on");
            self.retry_at = Some(Instant::now() + Duration::from_secs(1));
            // The later writes wait too, so messages keep their order.
            self.urgent = true;
            self.flushes.extend(w.flushes);
            let mut again: Vec<Staged<T>> = w.batch;
            for later in self.writing.drain(..) {
                again.extend(later.batch);
                self.flushes.extend(later.flushes);
            }
            again.append(&mut self.staged);
            for s in again {
                if s.recovered {
                    self.turn_over(&s.key);
                    self.recovered.push_front(s);
                } else {
                    self.staged.push(s);
                }
            }
            return;
        }
        for f in w.flushes {
            let _ = f.send(());
        }
        for mut s in w.batch {
            let before = s.attempt;
            self.classify(&mut s);
            if s.attempt != before {
                // A mark read only now: goes again, as recovered.
                self.turn_over(&s.key);
                self.recovered.push_front(s);
                continue;
            }
            self.hand_on(s);
        }
    }

    /// Leave in order: only entries given back stay listed.
    pub(crate) async fn close(&mut self) {
        let Some(producer) = self.producer.as_mut() else {
            return;
        };
        self.mine.retain(|_, (_, given)| given.is_some());
        if self.mine.is_empty() && !self.listed {
            return;
        }
        let payload = encode(self.mine.iter().map(|(k, (a, _))| (k, a)));
        let msg = if self.mine.is_empty() {
            tombstone(self.session.clone())
        } else {
            pulsar::producer::Message {
                payload,
                partition_key: Some(self.session.clone()),
                ..Default::default()
            }
        };
        if let Ok(f) = producer.send_non_blocking(msg).await {
            let _ = tokio::time::timeout(Duration::from_secs(2), f).await;
        }
        let _ = producer.close().await;
    }
}

fn tombstone(session: String) -> pulsar::producer::Message {
    pulsar::producer::Message {
        payload: Vec::new(),
        partition_key: Some(session),
        ..Default::default()
    }
}

/// Tails the marks topic into the index (from the start, compacted),
/// reconnecting when the connection breaks.
struct Reader {
    inner: Arc<Inner>,
    topic: String,
    index: Arc<Mutex<Index>>,
    read: watch::Sender<Option<EntryKey>>,
    consumer_id: u64,
}

/// Permits given to the reader at a time.
const READER_PERMITS: u32 = 1000;

impl Reader {
    async fn run(self) {
        let mut shutdown = self.inner.shutdown_signal();
        let mut backoff = Duration::from_millis(100);
        loop {
            let r = tokio::select! {
                r = self.session() => r,
                _ = self.read.closed() => return,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            if let Err(e) = r {
                tracing::debug!(topic = %self.topic, error = %e, "marks reader: reconnecting");
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn session(&self) -> Result<()> {
        let sub = proto::CommandSubscribe {
            topic: self.topic.clone(),
            subscription: format!("oona-marks-reader-{}", uuid::Uuid::new_v4().simple()),
            sub_type: proto::command_subscribe::SubType::Exclusive as i32,
            consumer_id: self.consumer_id,
            request_id: 1,
            durable: Some(false),
            read_compacted: Some(true),
            initial_position: Some(proto::command_subscribe::InitialPosition::Earliest as i32),
            // The earliest id, not just the position: without it a
            // compacted read starts at the first entry still stored and
            // misses compacted lists before it.
            start_message_id: Some(MessageIdData {
                ledger_id: u64::MAX,
                entry_id: u64::MAX,
                partition: Some(-1),
                batch_index: Some(-1),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (mut frames, early) =
            crate::consumer::open(&self.inner, &self.topic, sub, READER_PERMITS).await?;
        // Read again from the start: nothing read before counts.
        *lock(&self.index) = Index::default();
        self.read.send_replace(None);
        let mut unpermitted = 0u32;
        let mut pending = early.into_iter();
        loop {
            let m = match pending.next() {
                Some(m) => m,
                None => crate::conn::next_frame(&mut frames).await?,
            };
            if crate::conn::answer_ping(&mut frames, &m).await? {
                continue;
            }
            if m.command.close_consumer.is_some() {
                return Err(conn_err("the broker closed the marks reader"));
            }
            let (Some(msg), Some(payload)) = (m.command.message.as_ref(), m.payload) else {
                continue;
            };
            let id = msg.message_id.clone();
            let at = EntryKey::of(&id);
            if let Some(session) = payload.metadata.partition_key.clone() {
                lock(&self.index).apply(session, &payload.data);
            }
            self.read.send_replace(Some(at));
            unpermitted += 1;
            if unpermitted >= READER_PERMITS / 2 {
                let n = std::mem::take(&mut unpermitted);
                let consumer_id = self.consumer_id;
                // A reader's cursor holds back the deletion of what it has
                // not acked: ack what is read.
                frames
                    .feed(command(Type::Ack, |c| {
                        c.ack = Some(proto::CommandAck {
                            consumer_id,
                            ack_type: proto::command_ack::AckType::Cumulative as i32,
                            message_id: vec![id],
                            ..Default::default()
                        })
                    }))
                    .await
                    .map_err(|e| conn_err(format!("send ACK: {e}")))?;
                frames
                    .send(crate::consumer::flow(self.consumer_id, n))
                    .await
                    .map_err(|e| conn_err(format!("send FLOW: {e}")))?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(ledger: u64, entry: u64) -> EntryKey {
        EntryKey { ledger, entry }
    }

    #[test]
    fn lists_round_trip_and_leave_out_first_attempts() {
        let mut held = BTreeMap::new();
        held.insert(k(12, 0), 1);
        held.insert(k(12, 7), 3);
        let bytes = encode(held.iter());
        assert_eq!(bytes, b"oona1;held=12:0,12:7:3");
        let back = parse(&bytes);
        assert_eq!(back.get(&k(12, 0)), Some(&1));
        assert_eq!(back.get(&k(12, 7)), Some(&3));
        assert_eq!(back.len(), 2);
    }

    #[test]
    fn foreign_or_broken_payloads_list_nothing_readable() {
        assert!(parse(b"").is_empty());
        assert!(parse(b"{\"held\":[1]}").is_empty());
        let m = parse(b"oona1;held=1:x,2:3:y,4:5:2,6;later=1");
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m.get(&k(2, 3)), Some(&1), "a broken attempt reads as 1");
        assert_eq!(m.get(&k(4, 5)), Some(&2));
    }

    #[test]
    fn charges_come_from_other_sessions_and_go_with_their_list() {
        let mut ix = Index::default();
        ix.apply("a".into(), b"oona1;held=1:1:2,1:2");
        ix.apply("b".into(), b"oona1;held=1:1:4");
        assert_eq!(ix.charged(&k(1, 1), "c"), Some(4), "the highest wins");
        assert_eq!(ix.charged(&k(1, 1), "b"), Some(2), "not one's own");
        assert_eq!(ix.charged(&k(1, 3), "c"), None);
        ix.apply("b".into(), b"");
        assert_eq!(ix.charged(&k(1, 1), "c"), Some(2), "a deleted list");
        assert!(ix.take_expired(Duration::from_secs(60)).is_empty());
        assert_eq!(ix.take_expired(Duration::ZERO), vec!["a".to_string()]);
        assert_eq!(ix.charged(&k(1, 2), "c"), None);
    }
}
