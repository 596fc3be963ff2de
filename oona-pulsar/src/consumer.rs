//! Subscriptions as the core's delivery engine sees them: one protocol
//! connection and one task per subscription.
//!
//! The task owns the connection: it turns the broker's messages into
//! [`Fetched`] messages (one per member of a producer batch), batches acks
//! and redelivery requests into one command each, holds nack delays, and
//! keeps the broker's permits equal to the prefetch (a permit comes back
//! when a message is settled). The engine owns leases, attempts and the
//! rest of the rules.
//!
//! **Batches.** Members of a producer batch are settled one by one: an ack
//! of a member is sent at once as a batch-index ack (the `ack_set` of the
//! members still unacked), and once every member handed out is settled the
//! entry is acked whole, or, if a member was nacked, asked back. A broker
//! with `acknowledgmentAtBatchIndexLevelEnabled=true` then hands out only
//! the members not acked (and says which in the message's `ack_set`, which
//! is honoured here); without it the partial acks are ignored by the broker
//! (nothing is lost) and the whole batch comes back.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, Bytes};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use pulsar::message::proto::{self, base_command::Type, MessageIdData, MessageMetadata};
use pulsar::message::Message;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use oona_core::engine::{self, Fetched, Poison};
use oona_core::{
    ContentType, DeliveryStream, Envelope, Error, ErrorKind, Result, StartPosition, Subscription,
};

use crate::conn::{await_success, command, conn_err, Frames};
use crate::marks::{EntryKey, Marker, Staged};
use crate::transport::Inner;
use crate::{mapping, NAME};

/// Most commands folded into one ack or redelivery request.
const COALESCE: usize = 4096;

/// Longest a fetch waits for the broker.
const FETCH_WAIT: Duration = Duration::from_millis(500);

/// The engine's handle of one message: its entry, its index in a producer
/// batch, and the connection (session) it came on.
#[derive(Debug, Clone)]
pub(crate) struct Token {
    key: EntryKey,
    id: MessageIdData,
    index: Option<i32>,
    size: i32,
    session: u64,
}

/// A broker entry (one message, or one producer batch) with members out.
struct Entry {
    id: MessageIdData,
    /// Members handed to the engine and not yet settled.
    outstanding: u32,
    /// Batch members not acked yet (bit set: unacked), as sent in
    /// batch-index acks.
    unacked: Vec<i64>,
    size: i32,
    /// A member asked for redelivery: the entry goes back once every
    /// member out is settled (with the longest delay asked).
    redeliver: Option<Duration>,
}

enum Cmd {
    Ack(Token),
    Redeliver(Token, Duration),
    /// Never handed out: off this session's marks list.
    Release(Vec<Token>),
    /// Write what is queued; each answered once the broker confirmed the
    /// acks, and the marks list.
    Flush {
        acks: oneshot::Sender<()>,
        marks: oneshot::Sender<()>,
    },
    /// Leave the group and end the task.
    Close(oneshot::Sender<()>),
}

pub(crate) struct Shared {
    cmd_tx: mpsc::UnboundedSender<Cmd>,
    session: AtomicU64,
}

impl Shared {
    fn send(&self, cmd: Cmd) -> Result<()> {
        self.cmd_tx.send(cmd).map_err(|_| {
            Error::new(
                ErrorKind::Closed,
                "the subscription is closed; the broker redelivers the message",
            )
            .with_transport(NAME)
        })
    }

    /// Write what every settlement so far queued (Transport::flush).
    pub(crate) async fn flush(&self) {
        let (acks, acked) = oneshot::channel();
        let (marks, marked) = oneshot::channel();
        if self.send(Cmd::Flush { acks, marks }).is_ok() {
            let both = futures::future::join(acked, marked);
            let _ = tokio::time::timeout(Duration::from_secs(5), both).await;
        }
    }
}

struct PulsarSource {
    inner: Arc<Inner>,
    shared: Arc<Shared>,
    inbox: engine::Inbox<Token>,
}

#[async_trait]
impl engine::Source for PulsarSource {
    type Token = Token;
    const HOLDS_READY: bool = true;

    async fn fetch(&self, max: usize) -> Result<Vec<Fetched<Token>>> {
        self.inbox
            .fetch(max, FETCH_WAIT)
            .await
            .ok_or_else(closed_sub)
    }

    fn take_ready(&self, max: usize) -> Vec<Fetched<Token>> {
        self.inbox.take_ready(max)
    }

    async fn ack(&self, token: Token) -> Result<()> {
        self.shared.send(Cmd::Ack(token))
    }

    async fn redeliver(&self, token: Token, delay: Duration) -> Result<Option<Fetched<Token>>> {
        self.shared.send(Cmd::Redeliver(token, delay))?;
        Ok(None)
    }

    async fn dead_letter(&self, token: Token, dead_letter: Envelope) -> Result<()> {
        // Publish first: if it fails the message stays unacked and the
        // engine gives it back.
        self.inner.publish(dead_letter).await?;
        self.shared.send(Cmd::Ack(token))
    }

    async fn release(&self, tokens: Vec<Token>) {
        // Left unacked: the broker hands them to the group's other
        // consumers when this one leaves, without counting a delivery;
        // off the marks list, so they are not charged either.
        let _ = self.shared.send(Cmd::Release(tokens));
    }

    fn handing_out(&self, token: &Token) -> bool {
        // Messages of a lost connection are redelivered by the broker.
        token.session == self.shared.session.load(Ordering::Acquire)
    }

    async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.shared.send(Cmd::Close(tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
        }
    }
}

fn closed_sub() -> Error {
    Error::new(
        ErrorKind::Closed,
        "the subscription's connection task ended",
    )
    .with_transport(NAME)
}

/// Subscribe and start the subscription's task and engine.
pub(crate) async fn subscribe(inner: Arc<Inner>, sub: Subscription) -> Result<DeliveryStream> {
    inner.prepare(&sub.topic).await?;
    let full = inner.full_topic(&sub.topic);
    let consumer_id = inner.next_consumer_id();
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let marks = Marker::start(&inner, &full, &sub.group, consumer_id, out_tx).await?;
    let prefetch = u32::try_from(sub.prefetch.max(1)).unwrap_or(u32::MAX);
    let command = subscribe_command(&sub, &full, consumer_id);
    let (frames, early) = open(&inner, &full, command, prefetch).await?;
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        cmd_tx,
        session: AtomicU64::new(1),
    });
    inner.track_subscription(Arc::downgrade(&shared));
    let task = Task {
        shutdown: inner.shutdown_signal(),
        inner: Arc::clone(&inner),
        shared: Arc::clone(&shared),
        cmd_rx,
        full,
        consumer_id,
        prefetch,
        sub: sub.clone(),
        marks,
        pending: HashMap::new(),
        delayed: BTreeSet::new(),
        delayed_ids: HashMap::new(),
        permits: 0,
        acks: Vec::new(),
        redeliveries: Vec::new(),
        flush_waiters: Vec::new(),
        awaiting: Vec::new(),
        request_id: 100,
    };
    inner.track_task(tokio::spawn(task.run(frames, early)));
    let source = PulsarSource {
        inner: Arc::clone(&inner),
        shared,
        inbox: engine::Inbox::new(out_rx),
    };
    let mut shutdown = inner.shutdown_signal();
    let closed = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    let (stream, engine_task) = engine::start(source, sub, closed);
    inner.track_task(engine_task);
    Ok(stream)
}

/// The subscribe command of `sub` on `full`.
fn subscribe_command(sub: &Subscription, full: &str, consumer_id: u64) -> proto::CommandSubscribe {
    let (sub_type, key_shared_meta) = if sub.key_ordered {
        (
            proto::command_subscribe::SubType::KeyShared,
            Some(proto::KeySharedMeta {
                key_shared_mode: proto::KeySharedMode::AutoSplit as i32,
                hash_ranges: Vec::new(),
                allow_out_of_order_delivery: Some(false),
            }),
        )
    } else {
        (proto::command_subscribe::SubType::Shared, None)
    };
    let initial = match sub.start {
        StartPosition::Latest => proto::command_subscribe::InitialPosition::Latest,
        // `At` made the subscription already (see `transport::start_at`).
        StartPosition::Earliest | StartPosition::At(_) => {
            proto::command_subscribe::InitialPosition::Earliest
        }
    };
    proto::CommandSubscribe {
        topic: full.to_string(),
        subscription: sub.group.to_string(),
        sub_type: sub_type as i32,
        consumer_id,
        request_id: 1,
        consumer_name: Some(sub.consumer.to_string()),
        durable: Some(true),
        read_compacted: Some(false),
        initial_position: Some(initial as i32),
        key_shared_meta,
        ..Default::default()
    }
}

/// Look up the topic's broker, connect, subscribe and give the first
/// `permits`.
pub(crate) async fn open(
    inner: &Inner,
    full: &str,
    subscribe: proto::CommandSubscribe,
    permits: u32,
) -> Result<(Frames, Vec<Message>)> {
    let timeout = inner.config.operation_timeout;
    let addr = tokio::time::timeout(timeout, inner.client.lookup_topic(full))
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                format!("lookup of {full} took more than {timeout:?}"),
            )
            .with_transport(NAME)
        })?
        .map_err(|e| crate::transport::pulsar_err(&format!("lookup of {full}"), e))?;
    let mut frames = inner.connector.connect(&addr).await?;
    let (request_id, consumer_id) = (subscribe.request_id, subscribe.consumer_id);
    let group = subscribe.subscription.clone();
    frames
        .send(command(Type::Subscribe, |c| c.subscribe = Some(subscribe)))
        .await
        .map_err(|e| conn_err(format!("send SUBSCRIBE: {e}")))?;
    let mut early = Vec::new();
    await_success(&mut frames, request_id, timeout, &mut early)
        .await
        .map_err(|e| {
            let kind = e.kind();
            let temporary = e.is_temporary();
            Error::new(
                kind,
                format!("subscribe {group} to {full}: {}", e.message()),
            )
            .with_transport(NAME)
            .set_temporary(temporary)
        })?;
    frames
        .send(flow(consumer_id, permits))
        .await
        .map_err(|e| conn_err(format!("send FLOW: {e}")))?;
    Ok((frames, early))
}

pub(crate) fn flow(consumer_id: u64, permits: u32) -> Message {
    command(Type::Flow, |c| {
        c.flow = Some(proto::CommandFlow {
            consumer_id,
            message_permits: permits,
        })
    })
}

enum Exit {
    /// The transport was closed, or the engine closed the source.
    Done,
    /// The connection broke; reconnect.
    Lost(Error),
}

struct Task {
    inner: Arc<Inner>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    cmd_rx: mpsc::UnboundedReceiver<Cmd>,
    sub: Subscription,
    full: String,
    consumer_id: u64,
    prefetch: u32,
    /// Gives what is read to the engine, once its hand-out is recorded
    /// (see `crate::marks`).
    marks: Marker<Token>,
    pending: HashMap<EntryKey, Entry>,
    delayed: BTreeSet<(Instant, EntryKey)>,
    delayed_ids: HashMap<EntryKey, MessageIdData>,
    /// Permits earned back and not yet sent.
    permits: u32,
    acks: Vec<MessageIdData>,
    redeliveries: Vec<MessageIdData>,
    /// Flushes asked for since the last write.
    flush_waiters: Vec<oneshot::Sender<()>>,
    /// Flushes waiting for the broker's answer to an ack with a request id.
    awaiting: Vec<(u64, Vec<oneshot::Sender<()>>)>,
    request_id: u64,
}

type Sink = SplitSink<Frames, Message>;
type Source = SplitStream<Frames>;

impl Task {
    async fn run(mut self, frames: Frames, early: Vec<Message>) {
        let mut next = Some((frames, early));
        let mut backoff = Duration::from_millis(100);
        loop {
            let (frames, early) = match next.take() {
                Some(s) => s,
                None => {
                    if self.is_shutdown() {
                        return;
                    }
                    let command = subscribe_command(&self.sub, &self.full, self.consumer_id);
                    match open(&self.inner, &self.full, command, self.prefetch).await {
                        Ok(s) => {
                            backoff = Duration::from_millis(100);
                            s
                        }
                        Err(e) => {
                            tracing::debug!(topic = %self.sub.topic, error = %e, "resubscribe failed");
                            let mut shutdown = self.shutdown.clone();
                            tokio::select! {
                                _ = tokio::time::sleep(backoff) => {}
                                _ = shutdown.changed() => {}
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                            continue;
                        }
                    }
                }
            };
            match self.session(frames, early).await {
                Exit::Done => return,
                Exit::Lost(e) => {
                    tracing::warn!(topic = %self.sub.topic, group = %self.sub.group, error = %e, "connection lost; resubscribing");
                    // The broker redelivers everything unacked of a lost
                    // consumer; what the engine still holds of this
                    // session is dropped at hand-out.
                    let n = self.shared.session.fetch_add(1, Ordering::AcqRel) + 1;
                    self.marks.new_session(n);
                    self.pending.clear();
                    self.delayed.clear();
                    self.delayed_ids.clear();
                    self.permits = 0;
                    self.redeliveries.clear();
                    self.answer_flushes();
                }
            }
        }
    }

    fn is_shutdown(&self) -> bool {
        *self.shutdown.borrow()
    }

    async fn session(&mut self, frames: Frames, early: Vec<Message>) -> Exit {
        let (mut sink, mut source) = frames.split();
        for m in early {
            if let Err(e) = self.on_frame(&mut sink, m) {
                return Exit::Lost(e);
            }
        }
        let mut shutdown = self.shutdown.clone();
        loop {
            if self.is_shutdown() {
                self.close(&mut sink, &mut source).await;
                return Exit::Done;
            }
            let wake = match (self.delayed.first().map(|(t, _)| *t), self.marks.wake_at()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let mut closing = None;
            let step: Result<()> = tokio::select! {
                biased;
                _ = shutdown.changed() => Ok(()),
                cmd = self.cmd_rx.recv() => {
                    match cmd {
                        Some(Cmd::Close(w)) => closing = Some(Some(w)),
                        Some(cmd) => self.on_cmd(cmd),
                        None => closing = Some(None),
                    }
                    for _ in 0..COALESCE {
                        match self.cmd_rx.try_recv() {
                            Ok(Cmd::Close(w)) => closing = Some(Some(w)),
                            Ok(c) => self.on_cmd(c),
                            Err(_) => break,
                        }
                    }
                    Ok(())
                }
                frame = source.next() => match frame {
                    Some(Ok(m)) => self.on_frame(&mut sink, m),
                    Some(Err(e)) => Err(conn_err(format!("reading from the broker: {e}"))),
                    None => Err(conn_err("the broker closed the connection")),
                },
                r = self.marks.written(), if self.marks.writing() => {
                    self.marks.on_written(r);
                    Ok(())
                }
                _ = sleep_until(wake) => {
                    self.on_timers();
                    Ok(())
                }
            };
            if let Err(e) = step {
                return Exit::Lost(e);
            }
            if let Some(w) = closing {
                self.close(&mut sink, &mut source).await;
                if let Some(w) = w {
                    let _ = w.send(());
                }
                return Exit::Done;
            }
            if let Err(e) = self.flush(&mut sink).await {
                return Exit::Lost(e);
            }
            self.marks.pump().await;
        }
    }

    fn on_frame(&mut self, sink: &mut Sink, m: Message) -> Result<()> {
        let c = &m.command;
        if c.ping.is_some() {
            return sink
                .start_send_unpin(command(Type::Pong, |c| {
                    c.pong = Some(proto::CommandPong {})
                }))
                .map_err(|e| conn_err(format!("send PONG: {e}")));
        }
        if c.close_consumer.is_some() {
            // The broker moves the topic (unload, failover): resubscribe.
            return Err(conn_err("the broker closed the consumer"));
        }
        if let Some(r) = &c.ack_response {
            let id = r.request_id;
            // Answered in order: earlier receipts are done too.
            while let Some(pos) = self.awaiting.iter().position(|(rid, _)| Some(*rid) <= id) {
                let (_, ws) = self.awaiting.remove(pos);
                for w in ws {
                    let _ = w.send(());
                }
            }
            return Ok(());
        }
        let Some(msg) = c.message.clone() else {
            return Ok(());
        };
        let Some(payload) = m.payload else {
            tracing::warn!(topic = %self.sub.topic, "message without payload frame ignored");
            return Ok(());
        };
        self.on_message(msg, payload);
        Ok(())
    }

    fn on_message(&mut self, msg: proto::CommandMessage, payload: pulsar::Payload) {
        let attempt = msg.redelivery_count.unwrap_or(0).saturating_add(1);
        // Set bits: members the broker still has unacked (batch-index acks).
        let remaining = msg.ack_set;
        let mut id = msg.message_id;
        id.ack_set.clear();
        id.batch_index = None;
        id.batch_size = None;
        let key = EntryKey::of(&id);
        let pulsar::Payload { metadata, data } = payload;
        let members = split(metadata, Bytes::from(data));
        let batched = members.len() != 1 || members.iter().any(|m| m.index.is_some());
        if self.pending.contains_key(&key) {
            // Already out and unsettled (a duplicate dispatch): the first
            // copy decides.
            self.permits = self.permits.saturating_add(count(&members));
            return;
        }
        let size = i32::try_from(members.len()).unwrap_or(i32::MAX);
        let mut unacked = vec![0i64; members.len().div_ceil(64)];
        let session = self.shared.session.load(Ordering::Acquire);
        let mut items = Vec::with_capacity(members.len());
        for member in members {
            let i = member.index.unwrap_or(0);
            if batched && !remaining.is_empty() && !bit(&remaining, i) {
                continue; // acked before (batch-index ack)
            }
            set_bit(&mut unacked, i);
            let position = match member.index {
                Some(i) => format!("{}:{}:{i}", id.ledger_id, id.entry_id),
                None => mapping::position(&id),
            };
            let schema_version = member.decoded.as_ref().ok().and_then(|(m, _)| {
                m.schema_version
                    .as_deref()
                    .and_then(crate::schema::version_of)
            });
            let message = member
                .decoded
                .and_then(|(m, p)| mapping::from_message(&m, p, &self.sub.topic))
                .map_err(|e| Poison::new(member.raw.clone(), ContentType::json(), e));
            let token = Token {
                key,
                id: id.clone(),
                index: member.index.filter(|_| batched),
                size,
                session,
            };
            items.push(
                Fetched::new(token, message, attempt, Some(position))
                    .with_schema_version(schema_version),
            );
        }
        if items.is_empty() {
            return;
        }
        let out = u32::try_from(items.len()).unwrap_or(u32::MAX);
        self.marks.stage(Staged::new(key, attempt, items));
        self.pending.insert(
            key,
            Entry {
                id,
                outstanding: out,
                unacked,
                size,
                redeliver: None,
            },
        );
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Ack(t) => self.on_ack(t),
            Cmd::Redeliver(t, delay) => {
                if t.session != self.shared.session.load(Ordering::Acquire) {
                    return; // the broker redelivers it already
                }
                let Some(entry) = self.pending.get_mut(&t.key) else {
                    return;
                };
                entry.outstanding = entry.outstanding.saturating_sub(1);
                entry.redeliver = Some(entry.redeliver.map_or(delay, |d| d.max(delay)));
                self.permits = self.permits.saturating_add(1);
                self.settled(t.key);
            }
            Cmd::Release(tokens) => {
                let session = self.shared.session.load(Ordering::Acquire);
                for t in tokens.iter().filter(|t| t.session == session) {
                    self.marks.released(&t.key);
                }
            }
            Cmd::Flush { acks, marks } => {
                self.flush_waiters.push(acks);
                self.marks.flush(marks);
            }
            Cmd::Close(_) => {}
        }
    }

    fn on_ack(&mut self, t: Token) {
        let current = t.session == self.shared.session.load(Ordering::Acquire);
        let Some(entry) = self.pending.get_mut(&t.key).filter(|_| current) else {
            // From before a reconnect: ack by id (a batch member by its
            // index alone), which the broker applies to the subscription.
            self.acks.push(member_ack(&t.id, t.index, t.size, None));
            return;
        };
        entry.outstanding = entry.outstanding.saturating_sub(1);
        self.permits = self.permits.saturating_add(1);
        if let Some(i) = t.index {
            clear_bit(&mut entry.unacked, i);
            if entry.outstanding > 0 || entry.redeliver.is_some() {
                let ack = member_ack(&entry.id, Some(i), entry.size, Some(&entry.unacked));
                self.acks.push(ack);
            }
        }
        self.settled(t.key);
    }

    /// Once every member out of an entry is settled: ack it whole, or ask
    /// for it back (after the longest delay asked).
    fn settled(&mut self, key: EntryKey) {
        if self.pending.get(&key).is_some_and(|e| e.outstanding == 0) {
            if let Some(e) = self.pending.remove(&key) {
                match e.redeliver {
                    Some(delay) => {
                        self.marks.given_back(&key);
                        self.schedule(key, e.id, delay);
                    }
                    None => {
                        self.marks.done(&key);
                        self.acks.push(e.id);
                    }
                }
            }
        }
    }

    fn schedule(&mut self, key: EntryKey, id: MessageIdData, delay: Duration) {
        if delay.is_zero() {
            self.redeliveries.push(id);
        } else {
            // Pulsar's own delayed delivery needs a republish; holding the
            // id and asking for redelivery later keeps the broker's
            // redelivery count (the attempt number) intact.
            let at = Instant::now() + delay;
            self.delayed.insert((at, key));
            self.delayed_ids.insert(key, id);
        }
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        while let Some(&(t, key)) = self.delayed.first() {
            if t > now {
                break;
            }
            self.delayed.pop_first();
            if let Some(id) = self.delayed_ids.remove(&key) {
                self.redeliveries.push(id);
            }
        }
    }

    /// Send what the last step produced: acks, redelivery requests and
    /// earned-back permits, each as one command.
    async fn flush(&mut self, sink: &mut Sink) -> Result<()> {
        let waiters = std::mem::take(&mut self.flush_waiters);
        // A flush with acks to write asks the broker to confirm them.
        let receipt = (!waiters.is_empty() && !self.acks.is_empty()).then(|| {
            self.request_id += 1;
            self.request_id
        });
        if !self.acks.is_empty() {
            let ids = std::mem::take(&mut self.acks);
            let consumer_id = self.consumer_id;
            sink.feed(command(Type::Ack, |c| {
                c.ack = Some(proto::CommandAck {
                    consumer_id,
                    ack_type: proto::command_ack::AckType::Individual as i32,
                    message_id: ids,
                    request_id: receipt,
                    ..Default::default()
                })
            }))
            .await
            .map_err(|e| conn_err(format!("send ACK: {e}")))?;
        }
        if !self.redeliveries.is_empty() {
            let ids = std::mem::take(&mut self.redeliveries);
            let consumer_id = self.consumer_id;
            sink.feed(command(Type::RedeliverUnacknowledgedMessages, |c| {
                c.redeliver_unacknowledged_messages =
                    Some(proto::CommandRedeliverUnacknowledgedMessages {
                        consumer_id,
                        message_ids: ids,
                        consumer_epoch: None,
                    })
            }))
            .await
            .map_err(|e| conn_err(format!("send REDELIVER: {e}")))?;
        }
        // Give permits back in chunks (half the prefetch) so a busy
        // consumer sends one FLOW per many messages.
        let threshold = (self.prefetch / 2).max(1);
        if self.permits >= threshold {
            let n = std::mem::take(&mut self.permits);
            sink.feed(flow(self.consumer_id, n))
                .await
                .map_err(|e| conn_err(format!("send FLOW: {e}")))?;
        }
        sink.flush()
            .await
            .map_err(|e| conn_err(format!("write to the broker: {e}")))?;
        match receipt {
            Some(id) => self.awaiting.push((id, waiters)),
            None => {
                for w in waiters {
                    let _ = w.send(());
                }
            }
        }
        Ok(())
    }

    fn answer_flushes(&mut self) {
        for w in self.flush_waiters.drain(..) {
            let _ = w.send(());
        }
        for (_, ws) in self.awaiting.drain(..) {
            for w in ws {
                let _ = w.send(());
            }
        }
    }

    /// Flush settlements, leave the group and end the stream.
    async fn close(&mut self, sink: &mut Sink, source: &mut Source) {
        while let Ok(c) = self.cmd_rx.try_recv() {
            self.on_cmd(c);
        }
        // Flushes asked for meanwhile are answered once everything below
        // is done, the marks list included.
        let waiters = std::mem::take(&mut self.flush_waiters);
        // Held nacks go back now rather than being lost with the consumer.
        let held: Vec<MessageIdData> = self.delayed_ids.drain().map(|(_, id)| id).collect();
        self.delayed.clear();
        self.redeliveries.extend(held);
        self.permits = 0;
        if let Err(e) = self.flush(sink).await {
            tracing::debug!(error = %e, "flush on close");
            self.marks.close().await;
            return;
        }
        self.request_id += 1;
        let request_id = self.request_id;
        let consumer_id = self.consumer_id;
        let sent = sink
            .send(command(Type::CloseConsumer, |c| {
                c.close_consumer = Some(proto::CommandCloseConsumer {
                    consumer_id,
                    request_id,
                })
            }))
            .await;
        if sent.is_ok() {
            // Wait briefly for the broker's answer so acks sent before are
            // processed before the connection goes.
            let wait = async {
                while let Some(Ok(m)) = source.next().await {
                    if m.command
                        .success
                        .as_ref()
                        .is_some_and(|s| s.request_id == request_id)
                        || m.command
                            .error
                            .as_ref()
                            .is_some_and(|e| e.request_id == request_id)
                    {
                        return;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
        }
        self.marks.close().await;
        self.answer_flushes();
        for w in waiters {
            let _ = w.send(());
        }
        let _ = sink.close().await;
    }
}

/// An individual ack of `id`, or of member `index` of its batch of `size`
/// (`unacked`: the members still unacked, else all but `index`).
fn member_ack(
    id: &MessageIdData,
    index: Option<i32>,
    size: i32,
    unacked: Option<&[i64]>,
) -> MessageIdData {
    let mut m = id.clone();
    if let Some(i) = index {
        let words = match unacked {
            Some(u) => u.to_vec(),
            None => {
                let n = usize::try_from(size.max(0)).unwrap_or(0);
                let mut all = vec![0i64; n.div_ceil(64)];
                for j in 0..size.max(0) {
                    set_bit(&mut all, j);
                }
                clear_bit(&mut all, i);
                all
            }
        };
        m.ack_set = words;
        m.batch_size = Some(size);
        m.batch_index = Some(i);
    }
    m
}

fn bit(words: &[i64], i: i32) -> bool {
    let i = usize::try_from(i).unwrap_or(usize::MAX);
    words.get(i / 64).is_some_and(|w| (*w >> (i % 64)) & 1 == 1)
}

fn set_bit(words: &mut [i64], i: i32) {
    let i = usize::try_from(i).unwrap_or(usize::MAX);
    if let Some(w) = words.get_mut(i / 64) {
        *w |= 1 << (i % 64);
    }
}

fn clear_bit(words: &mut [i64], i: i32) {
    let i = usize::try_from(i).unwrap_or(usize::MAX);
    if let Some(w) = words.get_mut(i / 64) {
        *w &= !(1 << (i % 64));
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => futures::future::pending().await,
    }
}

/// One message of an entry: its metadata and payload, or why it cannot be
/// read, and the raw bytes for a dead letter.
struct Member {
    index: Option<i32>,
    decoded: Result<(MessageMetadata, Bytes)>,
    raw: Bytes,
}

fn count(members: &[Member]) -> u32 {
    u32::try_from(members.len()).unwrap_or(u32::MAX).max(1)
}

fn decode_err(why: impl Into<String>) -> Error {
    Error::new(ErrorKind::Decode, why).with_transport(NAME)
}

/// The messages of an entry: one, or the members of a producer batch.
fn split(metadata: MessageMetadata, data: Bytes) -> Vec<Member> {
    let raw = mapping::raw_entry(&metadata, &data);
    if let Some(c) = metadata.compression.filter(|c| *c != 0) {
        return vec![Member {
            index: None,
            decoded: Err(decode_err(format!(
                "compressed payload (compression type {c}) is not supported; publish uncompressed"
            ))),
            raw,
        }];
    }
    let Some(n) = metadata.num_messages_in_batch else {
        return vec![Member {
            index: None,
            decoded: Ok((metadata, data)),
            raw,
        }];
    };
    let mut out = Vec::new();
    let mut buf = data.clone();
    for i in 0..n.max(0) {
        let member = (|| -> Result<(MessageMetadata, Bytes)> {
            if buf.remaining() < 4 {
                return Err(decode_err("truncated batch"));
            }
            let size = buf.get_u32() as usize;
            if buf.remaining() < size {
                return Err(decode_err("truncated batch metadata"));
            }
            let single = proto::SingleMessageMetadata::decode(buf.split_to(size))
                .map_err(|e| decode_err(format!("batch metadata: {e}")))?;
            let len = usize::try_from(single.payload_size).unwrap_or(usize::MAX);
            if buf.remaining() < len {
                return Err(decode_err("truncated batch payload"));
            }
            let payload = buf.split_to(len);
            let mut m = metadata.clone();
            m.num_messages_in_batch = None;
            m.properties = single.properties;
            m.partition_key = single.partition_key;
            m.event_time = single.event_time;
            m.ordering_key = single.ordering_key;
            Ok((m, payload))
        })();
        let failed = member.is_err();
        let raw = match &member {
            Ok((m, p)) => mapping::raw_entry(m, p),
            Err(_) => raw.clone(),
        };
        out.push(Member {
            index: Some(i),
            decoded: member,
            raw,
        });
        if failed {
            break;
        }
    }
    if out.is_empty() {
        out.push(Member {
            index: None,
            decoded: Err(decode_err("empty batch")),
            raw,
        });
    }
    out
}
