//! Subscriptions: one protocol connection and one task per subscription.
//!
//! The task owns the connection. It hands deliveries to the stream, tracks
//! each one's ack deadline, batches acks and redelivery requests into one
//! command each, and keeps the broker's permits equal to the
//! subscription's prefetch: a permit comes back only when a delivery is
//! settled (or its deadline passes), so at most `prefetch` deliveries are
//! ever unsettled.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, Bytes};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use pulsar::message::proto::{self, base_command::Type, MessageIdData, MessageMetadata};
use pulsar::message::Message;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use oona_core::{
    rules, ContentType, Delivery, DeliveryInfo, DeliveryStream, Error, ErrorKind, Result, Settle,
    Settlement, StartPosition, Subscription,
};

use crate::conn::{await_success, command, conn_err, Frames};
use crate::transport::Inner;
use crate::{mapping, NAME};

/// Most commands folded into one ack or redelivery request.
const COALESCE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct EntryKey {
    ledger: u64,
    entry: u64,
}

impl EntryKey {
    fn of(id: &MessageIdData) -> Self {
        EntryKey {
            ledger: id.ledger_id,
            entry: id.entry_id,
        }
    }
}

/// A broker entry (one message, or one batch of messages) handed out and
/// not yet settled.
struct Entry {
    id: MessageIdData,
    /// Messages of the entry not yet settled (1 unless batched).
    outstanding: u32,
    /// A message of a batch asked for redelivery: the whole entry goes back
    /// once every message of it is settled (with the longest delay asked).
    redeliver: Option<Duration>,
    deadline: Instant,
}

enum Cmd {
    Ack {
        key: EntryKey,
        id: MessageIdData,
        batched: bool,
    },
    Redeliver {
        key: EntryKey,
        delay: Duration,
    },
}

struct Shared {
    cmd_tx: mpsc::UnboundedSender<Cmd>,
    inner: Arc<Inner>,
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
}

struct Settler {
    shared: Arc<Shared>,
    key: EntryKey,
    id: MessageIdData,
    batched: bool,
}

#[async_trait]
impl Settle for Settler {
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<()> {
        match settlement {
            Settlement::Ack => self.shared.send(Cmd::Ack {
                key: self.key,
                id: self.id,
                batched: self.batched,
            }),
            Settlement::Redeliver { delay } => self.shared.send(Cmd::Redeliver {
                key: self.key,
                delay,
            }),
            Settlement::DeadLetter { dead_letter, .. } => {
                // Publish first: if it fails the message stays unacked and
                // comes back after its deadline.
                self.shared.inner.publish(*dead_letter).await?;
                self.shared.send(Cmd::Ack {
                    key: self.key,
                    id: self.id,
                    batched: self.batched,
                })
            }
        }
    }
}

/// Subscribe and start the subscription's task.
pub(crate) async fn subscribe(inner: Arc<Inner>, sub: Subscription) -> Result<DeliveryStream> {
    let full = inner.full_topic(&sub.topic);
    let consumer_id = inner.next_consumer_id();
    let (frames, early) = open(&inner, &sub, &full, consumer_id).await?;
    let (out_tx, mut out_rx) = mpsc::unbounded_channel();
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        cmd_tx,
        inner: Arc::clone(&inner),
    });
    let task = Task {
        shutdown: inner.shutdown_signal(),
        inner: Arc::clone(&inner),
        shared,
        cmd_rx,
        out_tx,
        full,
        consumer_id,
        prefetch: u32::try_from(sub.prefetch.max(1)).unwrap_or(u32::MAX),
        sub,
        pending: HashMap::new(),
        deadlines: BTreeSet::new(),
        delayed: BTreeSet::new(),
        delayed_ids: HashMap::new(),
        permits: 0,
        acks: Vec::new(),
        redeliveries: Vec::new(),
        draining: false,
        request_id: 100,
    };
    inner.track_task(tokio::spawn(task.run(frames, early)));
    Ok(Box::pin(futures::stream::poll_fn(move |cx| {
        out_rx.poll_recv(cx)
    })))
}

/// Look up the topic's broker, connect, subscribe and give the first
/// permits.
async fn open(
    inner: &Inner,
    sub: &Subscription,
    full: &str,
    consumer_id: u64,
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
    let request_id = 1;
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
        // `At` reads from the start and skips what is older (see
        // `Task::before_start`).
        StartPosition::Earliest | StartPosition::At(_) => {
            proto::command_subscribe::InitialPosition::Earliest
        }
    };
    frames
        .send(command(Type::Subscribe, |c| {
            c.subscribe = Some(proto::CommandSubscribe {
                topic: full.to_string(),
                subscription: sub.group.to_string(),
                sub_type: sub_type as i32,
                consumer_id,
                request_id,
                consumer_name: Some(sub.consumer.to_string()),
                durable: Some(true),
                read_compacted: Some(false),
                initial_position: Some(initial as i32),
                key_shared_meta,
                ..Default::default()
            })
        }))
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
                format!("subscribe {} to {full}: {}", sub.group, e.message()),
            )
            .with_transport(NAME)
            .set_temporary(temporary)
        })?;
    let permits = u32::try_from(sub.prefetch.max(1)).unwrap_or(u32::MAX);
    frames
        .send(flow(consumer_id, permits))
        .await
        .map_err(|e| conn_err(format!("send FLOW: {e}")))?;
    Ok((frames, early))
}

fn flow(consumer_id: u64, permits: u32) -> Message {
    command(Type::Flow, |c| {
        c.flow = Some(proto::CommandFlow {
            consumer_id,
            message_permits: permits,
        })
    })
}

enum Exit {
    /// The transport was closed, or the stream dropped and drained.
    Done,
    /// The connection broke; reconnect.
    Lost(Error),
}

struct Task {
    inner: Arc<Inner>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    cmd_rx: mpsc::UnboundedReceiver<Cmd>,
    out_tx: mpsc::UnboundedSender<Result<Delivery>>,
    sub: Subscription,
    full: String,
    consumer_id: u64,
    prefetch: u32,
    pending: HashMap<EntryKey, Entry>,
    deadlines: BTreeSet<(Instant, EntryKey)>,
    delayed: BTreeSet<(Instant, EntryKey)>,
    delayed_ids: HashMap<EntryKey, MessageIdData>,
    /// Permits earned back and not yet sent.
    permits: u32,
    acks: Vec<MessageIdData>,
    redeliveries: Vec<MessageIdData>,
    /// The stream was dropped: take no new messages, wait until what was
    /// handed out is settled or past its deadline, then leave the group.
    draining: bool,
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
                    match open(&self.inner, &self.sub, &self.full, self.consumer_id).await {
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
                                _ = self.out_tx.closed() => return,
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
                    if self.draining {
                        // The broker hands the unsettled messages to the
                        // group's other consumers.
                        return;
                    }
                    // The broker redelivers everything unacked of a lost
                    // consumer; start afresh.
                    self.pending.clear();
                    self.deadlines.clear();
                    self.delayed.clear();
                    self.delayed_ids.clear();
                    self.permits = 0;
                    self.acks.clear();
                    self.redeliveries.clear();
                    let _ = self.out_tx.send(Err(e.set_temporary(true)));
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
            if let Err(e) = self.on_frame(&mut sink, m).await {
                return Exit::Lost(e);
            }
        }
        let mut shutdown = self.shutdown.clone();
        loop {
            if self.is_shutdown() {
                self.close(&mut sink, &mut source).await;
                return Exit::Done;
            }
            let wake = self.next_wake();
            let step: Result<()> = tokio::select! {
                biased;
                _ = shutdown.changed() => Ok(()),
                cmd = self.cmd_rx.recv() => {
                    if let Some(cmd) = cmd {
                        self.on_cmd(cmd);
                        for _ in 0..COALESCE {
                            match self.cmd_rx.try_recv() {
                                Ok(c) => self.on_cmd(c),
                                Err(_) => break,
                            }
                        }
                    }
                    Ok(())
                }
                frame = source.next() => match frame {
                    Some(Ok(m)) => self.on_frame(&mut sink, m).await,
                    Some(Err(e)) => Err(conn_err(format!("reading from the broker: {e}"))),
                    None => Err(conn_err("the broker closed the connection")),
                },
                _ = sleep_until(wake) => {
                    self.on_timers();
                    Ok(())
                }
                _ = self.out_tx.closed(), if !self.draining => {
                    self.draining = true;
                    Ok(())
                }
            };
            if let Err(e) = step {
                return Exit::Lost(e);
            }
            if let Err(e) = self.flush(&mut sink).await {
                return Exit::Lost(e);
            }
            if self.draining && self.pending.is_empty() && self.delayed.is_empty() {
                self.close(&mut sink, &mut source).await;
                return Exit::Done;
            }
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let d = self.deadlines.first().map(|(t, _)| *t);
        let r = self.delayed.first().map(|(t, _)| *t);
        match (d, r) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    async fn on_frame(&mut self, sink: &mut Sink, m: Message) -> Result<()> {
        let c = &m.command;
        if c.ping.is_some() {
            return sink
                .send(command(Type::Pong, |c| {
                    c.pong = Some(proto::CommandPong {})
                }))
                .await
                .map_err(|e| conn_err(format!("send PONG: {e}")));
        }
        if c.close_consumer.is_some() {
            // The broker moves the topic (unload, failover): resubscribe.
            return Err(conn_err("the broker closed the consumer"));
        }
        let Some(msg) = c.message.clone() else {
            return Ok(());
        };
        let Some(payload) = m.payload else {
            tracing::warn!(topic = %self.sub.topic, "message without payload frame ignored");
            return Ok(());
        };
        if self.draining {
            // Never handed out; the broker gives it to another consumer
            // when this one leaves.
            return Ok(());
        }
        self.on_message(msg, payload);
        Ok(())
    }

    fn on_message(&mut self, msg: proto::CommandMessage, payload: pulsar::Payload) {
        let redeliveries = msg.redelivery_count.unwrap_or(0);
        let attempt = redeliveries.saturating_add(1);
        let mut id = msg.message_id;
        id.batch_index = None;
        id.batch_size = None;
        id.ack_set.clear();
        let key = EntryKey::of(&id);
        let pulsar::Payload { metadata, data } = payload;
        let members = split(metadata, Bytes::from(data));
        let batched = members.len() != 1 || members.iter().any(|m| m.index.is_some());
        let deadline = Instant::now() + self.sub.ack_deadline;
        if self.pending.contains_key(&key) {
            // Already handed out and unsettled (a duplicate dispatch):
            // the first copy decides.
            self.permits = self.permits.saturating_add(count(&members));
            return;
        }
        self.pending.insert(
            key,
            Entry {
                id: id.clone(),
                outstanding: count(&members),
                redeliver: None,
                deadline,
            },
        );
        self.deadlines.insert((deadline, key));
        for member in members {
            let position = match member.index {
                Some(i) => format!("{}:{}:{i}", id.ledger_id, id.entry_id),
                None => mapping::position(&id),
            };
            let info = DeliveryInfo::new(&self.sub, attempt, Some(position));
            let decoded = member
                .decoded
                .and_then(|(m, p)| mapping::from_message(&m, p, &self.sub.topic).map(|e| (e, m)));
            match decoded {
                Ok((env, meta)) => {
                    if redeliveries == 0 && self.before_start(&meta) {
                        self.on_cmd(Cmd::Ack {
                            key,
                            id: id.clone(),
                            batched,
                        });
                        continue;
                    }
                    if let Some((dl, reason)) = rules::exceeded_attempts(&env, &info) {
                        tracing::info!(topic = %self.sub.topic, event_id = %env.event_id, %reason, "dead-lettering");
                        self.dead_letter(dl, key, id.clone(), batched);
                        continue;
                    }
                    let settler = Settler {
                        shared: Arc::clone(&self.shared),
                        key,
                        id: id.clone(),
                        batched,
                    };
                    // A dropped stream is noticed by the select loop; the
                    // delivery then stays pending until its deadline.
                    let _ = self
                        .out_tx
                        .send(Ok(Delivery::new(env, info, Box::new(settler))));
                }
                Err(e) => {
                    let raw = member.raw.clone();
                    let (dl, reason) = rules::poison_dead_letter(
                        &self.sub.topic,
                        raw,
                        ContentType::json(),
                        &e,
                        &info,
                    );
                    tracing::warn!(topic = %self.sub.topic, %reason, "poison message dead-lettered");
                    self.dead_letter(dl, key, id.clone(), batched);
                }
            }
        }
    }

    /// Whether a first delivery predates a `StartPosition::At` instant.
    fn before_start(&self, meta: &MessageMetadata) -> bool {
        match self.sub.start {
            StartPosition::At(t) => meta.publish_time < t.unix_millis(),
            _ => false,
        }
    }

    /// Publish a dead letter decided at receipt, then ack the original. If
    /// the publish fails the message stays pending and comes back after its
    /// deadline, to be decided again.
    fn dead_letter(
        &self,
        dl: oona_core::Envelope,
        key: EntryKey,
        id: MessageIdData,
        batched: bool,
    ) {
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            match shared.inner.publish(dl).await {
                Ok(_) => {
                    let _ = shared.send(Cmd::Ack { key, id, batched });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "dead letter publish failed; the message comes back after its ack deadline");
                }
            }
        });
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Ack { key, id, batched } => {
                let Some(entry) = self.pending.get_mut(&key) else {
                    // Past its deadline (already redelivered) or from
                    // before a reconnect: a plain message can still be
                    // acked by id; a batch member cannot without acking
                    // its siblings, so it comes back.
                    if !batched {
                        self.acks.push(id);
                    }
                    return;
                };
                entry.outstanding = entry.outstanding.saturating_sub(1);
                self.permits = self.permits.saturating_add(1);
                if entry.outstanding == 0 {
                    if let Some(e) = self.remove(key) {
                        match e.redeliver {
                            Some(delay) => self.schedule(key, e.id, delay),
                            None => self.acks.push(e.id),
                        }
                    }
                }
            }
            Cmd::Redeliver { key, delay } => {
                let Some(entry) = self.pending.get_mut(&key) else {
                    return;
                };
                entry.outstanding = entry.outstanding.saturating_sub(1);
                entry.redeliver = Some(entry.redeliver.map_or(delay, |d| d.max(delay)));
                self.permits = self.permits.saturating_add(1);
                if entry.outstanding == 0 {
                    if let Some(e) = self.remove(key) {
                        self.schedule(key, e.id, e.redeliver.unwrap_or(delay));
                    }
                }
            }
        }
    }

    fn remove(&mut self, key: EntryKey) -> Option<Entry> {
        let e = self.pending.remove(&key)?;
        self.deadlines.remove(&(e.deadline, key));
        Some(e)
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
        while let Some(&(t, key)) = self.deadlines.first() {
            if t > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(e) = self.pending.remove(&key) {
                self.permits = self.permits.saturating_add(e.outstanding);
                // Ask the broker to hand it out again: it counts the
                // redelivery (the next attempt number). A draining consumer
                // asks too before it leaves: Pulsar hands a departed
                // consumer's unacked messages to the others without
                // counting them.
                self.redeliveries.push(e.id);
            }
        }
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
        if !self.acks.is_empty() {
            let ids = std::mem::take(&mut self.acks);
            let consumer_id = self.consumer_id;
            sink.feed(command(Type::Ack, |c| {
                c.ack = Some(proto::CommandAck {
                    consumer_id,
                    ack_type: proto::command_ack::AckType::Individual as i32,
                    message_id: ids,
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
        if !self.draining && self.permits >= threshold {
            let n = std::mem::take(&mut self.permits);
            sink.feed(flow(self.consumer_id, n))
                .await
                .map_err(|e| conn_err(format!("send FLOW: {e}")))?;
        }
        sink.flush()
            .await
            .map_err(|e| conn_err(format!("write to the broker: {e}")))
    }

    /// Flush settlements, leave the group and end the stream.
    async fn close(&mut self, sink: &mut Sink, source: &mut Source) {
        while let Ok(c) = self.cmd_rx.try_recv() {
            self.on_cmd(c);
        }
        // Held nacks go back now rather than being lost with the consumer.
        let held: Vec<MessageIdData> = self.delayed_ids.drain().map(|(_, id)| id).collect();
        self.delayed.clear();
        self.redeliveries.extend(held);
        self.draining = true;
        if let Err(e) = self.flush(sink).await {
            tracing::debug!(error = %e, "flush on close");
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
        let _ = sink.close().await;
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
