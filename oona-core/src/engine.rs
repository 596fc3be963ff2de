//! The delivery engine: the timing of the delivery rules, owned once.
//!
//! [`crate::rules`] says what a settlement means; this module says *when*
//! things happen. Every transport runs its subscriptions through
//! [`start`], giving it a [`Source`]: the broker-side mapping of one
//! subscription (read a batch, ack / redeliver / dead-letter / give back by
//! token). The engine owns everything else, the same on every broker:
//!
//! - **Prefetch.** At most [`Subscription::prefetch`] messages are read and
//!   not yet settled (buffered plus handed out). The engine reads again when
//!   the buffer is empty or half the prefetch is free, so reads stay large.
//! - **Leases.** A delivery's lease starts when the consumer *takes* it
//!   from the stream (not when it was read from the broker) and lasts the
//!   ack deadline. [`crate::Delivery::extend`] pushes it out; the handler
//!   runner does so while a handler runs. A buffered message has no lease,
//!   so a slow consumer with a deep prefetch never has healthy messages
//!   redelivered. Where the broker keeps a lease of its own (Redis' idle
//!   time, [`Source::BROKER_LEASES`]) the engine refreshes it for every
//!   message it holds, buffered or handed out, before half a deadline has
//!   passed.
//! - **Expiry.** A lease that runs out unsettled is given back at once with
//!   [`Source::redeliver`] (an attempt is counted).
//! - **Late settlement**, one rule: a settlement after the lease ran out is
//!   refused with [`ErrorKind::LeaseExpired`] and changes nothing, whatever
//!   the outcome (ack, nack or reject): the message was already given back,
//!   and its next delivery decides. After the transport is closed every
//!   settlement fails with [`ErrorKind::Closed`].
//! - **Attempts.** The source reports each message's attempt (the broker's
//!   delivery counter, or what the source stores); the engine dead-letters
//!   poison ([`rules::poison_dead_letter`]) and messages past their last
//!   attempt ([`rules::exceeded_attempts`]) before anyone sees them.
//! - **Crashes are charged to the culprit.** A message the broker hands out
//!   again because its last holder vanished without settling (a crashed
//!   process; [`Fetched::recovered`]) is handed out alone: nothing else is
//!   read or handed out while it is out, so if it kills this process too,
//!   only it is charged the attempt. A message that kills every consumer is
//!   dead-lettered after `max_attempts` crashes; its neighbours are not.
//! - **Key order.** With [`Subscription::key_ordered`] a message is not
//!   handed out while an earlier message of its key is out (the broker
//!   keeps a key on one consumer: a partition, a key-shared range, a group
//!   lock).
//! - **Failed settlements** of a temporary kind (broker unreachable) are
//!   retried by the engine: the message is given back one second later.
//! - **Closing.** When the stream is dropped or the transport closes, every
//!   message read but not handed out is given back at once without an
//!   attempt ([`Source::release`]). Deliveries handed out outlive a dropped
//!   stream (they can still be settled) until their leases run out.
//!
//! # Writing a transport: the checklist
//!
//! A transport's `subscribe` creates or joins the group on its broker,
//! builds a [`Source`] and returns [`start`]'s stream. The source:
//!
//! 1. [`Source::fetch`]: reads up to `max` messages for this consumer: new
//!    ones, nacked ones whose delay is over, and ones whose holder vanished
//!    (marked [`Fetched::recovered`]; a fetch that returns one returns only
//!    it). Each comes with its attempt (1 on first delivery) counted where
//!    it survives this process (the broker's counter, or stored on the
//!    broker). It decodes the envelope (or reports [`Poison`]) and waits at
//!    most about a second when nothing is there.
//! 2. [`Source::ack`], [`Source::redeliver`] (after a delay, counting an
//!    attempt), [`Source::dead_letter`] (publish, then ack; both or neither
//!    where the broker allows): by token, for a message this consumer holds.
//! 3. [`Source::release`]: give back without counting an attempt.
//! 4. [`Source::extend`] where the broker has leases of its own.
//! 5. Batching of acks is the source's business; `Transport::flush` must
//!    then write them, and `Transport::close` must end the engines (the
//!    `closed` future of [`start`]) before it releases connections.
//!
//! None of the rules above is the source's: no deadline timers, no attempt
//! arithmetic, no prefetch accounting, no key blocking.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt as _, Stream};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::delivery::{Delivery, DeliveryInfo, DeliveryStream, Settle, Settlement};
use crate::envelope::{ContentType, Envelope, EventId};
use crate::error::{Error, ErrorKind, Result};
use crate::rules;
use crate::subscription::Subscription;

/// How long a failed settlement or dead letter waits before the engine
/// gives the message back again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// A message as a [`Source`] read it.
#[derive(Debug)]
#[non_exhaustive]
pub struct Fetched<T> {
    /// The source's handle of the message (stream id, offset, message id).
    pub token: T,
    /// The envelope, or why the entry is not one.
    pub message: std::result::Result<Envelope, Poison>,
    /// 1 on first delivery to the group, +1 on every redelivery.
    pub attempt: u32,
    /// Handed out again because its last holder vanished without settling
    /// it (not because of a nack).
    pub recovered: bool,
    /// The broker's position, for dead letters and logs.
    pub position: Option<String>,
    /// The registry version of the writer's schema
    /// ([`DeliveryInfo::schema_version`]).
    pub schema_version: Option<u64>,
}

impl<T> Fetched<T> {
    /// A message read at `attempt`.
    pub fn new(
        token: T,
        message: std::result::Result<Envelope, Poison>,
        attempt: u32,
        position: Option<String>,
    ) -> Self {
        Fetched {
            token,
            message,
            attempt: attempt.max(1),
            recovered: false,
            position,
            schema_version: None,
        }
    }

    /// Set [`Fetched::schema_version`].
    pub fn with_schema_version(mut self, version: Option<u64>) -> Self {
        self.schema_version = version;
        self
    }

    /// Mark it [`Fetched::recovered`].
    pub fn recovered(mut self, yes: bool) -> Self {
        self.recovered = yes;
        self
    }
}

/// Where a source whose client reads ahead on its own (a task or thread
/// of the transport) leaves messages for the engine: [`Inbox::fetch`] and
/// [`Inbox::take_ready`] are the two halves of [`Source::fetch`] and
/// [`Source::take_ready`] for such a source.
pub struct Inbox<T> {
    rx: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Fetched<T>>>,
}

impl<T> Inbox<T> {
    /// The receiving end of what the reader sends.
    pub fn new(rx: tokio::sync::mpsc::UnboundedReceiver<Fetched<T>>) -> Self {
        Inbox {
            rx: tokio::sync::Mutex::new(rx),
        }
    }

    /// Up to `max` messages, waiting at most `wait` for the first; `None`
    /// once the reader is gone.
    pub async fn fetch(&self, max: usize, wait: Duration) -> Option<Vec<Fetched<T>>> {
        let mut rx = self.rx.lock().await;
        let first = match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(f)) => f,
            Ok(None) => return None,
            Err(_) => return Some(Vec::new()),
        };
        let mut out = vec![first];
        drain(&mut rx, &mut out, max);
        Some(out)
    }

    /// Up to `max` messages already there, without waiting (none while a
    /// fetch waits).
    pub fn take_ready(&self, max: usize) -> Vec<Fetched<T>> {
        let mut out = Vec::new();
        if let Ok(mut rx) = self.rx.try_lock() {
            drain(&mut rx, &mut out, max);
        }
        out
    }
}

fn drain<T>(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Fetched<T>>,
    out: &mut Vec<Fetched<T>>,
    max: usize,
) {
    while out.len() < max {
        match rx.try_recv() {
            Ok(f) => out.push(f),
            Err(_) => break,
        }
    }
}

/// An entry that is not an envelope; it is dead-lettered with its raw bytes.
#[derive(Debug)]
#[non_exhaustive]
pub struct Poison {
    /// The entry as the broker holds it.
    pub raw: Bytes,
    /// How to read `raw`.
    pub content_type: ContentType,
    /// Why it did not decode.
    pub error: Error,
}

impl Poison {
    /// Made by sources.
    pub fn new(raw: Bytes, content_type: ContentType, error: Error) -> Self {
        Poison {
            raw,
            content_type,
            error,
        }
    }
}

/// The broker side of one subscription; see the [checklist](self).
#[async_trait]
pub trait Source: Send + Sync + 'static {
    /// The source's handle of a message it holds for this consumer.
    type Token: Clone + Send + Sync + 'static;

    /// The broker gives a held message to another consumer on its own
    /// after a while (Redis' idle time): the engine calls
    /// [`Source::extend`] for every message it holds.
    const BROKER_LEASES: bool = false;

    /// The source keeps what it read ready in this process and hands it
    /// over with [`Source::take_ready`] (an in-process broker, a client
    /// with its own read-ahead): the engine then calls [`Source::fetch`]
    /// only for a consumer that waits, never to read ahead.
    const HOLDS_READY: bool = false;

    /// Read up to `max` messages (see the checklist). An empty result is
    /// fine; an `Err` of a temporary kind is reported once and retried.
    async fn fetch(&self, max: usize) -> Result<Vec<Fetched<Self::Token>>>;

    /// Done with it, for good. May be queued: `Transport::flush` writes it.
    async fn ack(&self, token: Self::Token) -> Result<()>;

    /// Deliver it again, not before `delay`, with the next attempt. A
    /// source that hands it straight back to this consumer returns it.
    async fn redeliver(
        &self,
        token: Self::Token,
        delay: Duration,
    ) -> Result<Option<Fetched<Self::Token>>>;

    /// Publish `dead_letter` (built by the core), then ack the original.
    async fn dead_letter(&self, token: Self::Token, dead_letter: Envelope) -> Result<()>;

    /// Give back messages never handed out, without counting an attempt,
    /// so any consumer of the group can have them now. Best effort.
    async fn release(&self, tokens: Vec<Self::Token>);

    /// Refresh the broker's lease of each message; `false` where this
    /// consumer no longer holds it. Called only with
    /// [`Source::BROKER_LEASES`].
    async fn extend(&self, tokens: Vec<Self::Token>) -> Result<Vec<bool>> {
        Ok(vec![true; tokens.len()])
    }

    /// Messages the source already holds for this consumer, without I/O or
    /// waiting (what [`Source::fetch`] would return at once), for the
    /// consumer's own poll: a message goes from the source to the handler
    /// without a task switch. The default has none.
    fn take_ready(&self, max: usize) -> Vec<Fetched<Self::Token>> {
        let _ = max;
        Vec::new()
    }

    /// Called as the engine hands the message out; `false` when the source
    /// no longer holds it (its partition moved to another consumer, say):
    /// the engine then drops it unseen. Must not block.
    fn handing_out(&self, token: &Self::Token) -> bool {
        let _ = token;
        true
    }

    /// The engine has finished: nothing more is read or settled through
    /// this source.
    async fn close(&self) {}
}

/// Run `subscription` over `source`. The stream ends when `closed`
/// completes (the transport closing) or after a permanent read error; the
/// task ends once every message the engine held is settled, expired or
/// given back, so a transport's `close` awaits it before it lets go of the
/// connections.
pub fn start<S: Source>(
    source: S,
    subscription: Subscription,
    closed: impl Future<Output = ()> + Send + 'static,
) -> (DeliveryStream, tokio::task::JoinHandle<()>) {
    let (released_tx, mut released) = tokio::sync::watch::channel(false);
    let shared = Arc::new(Shared {
        source,
        sub: subscription,
        state: Mutex::new(State::new()),
        wake: Notify::new(),
        released: released_tx,
    });
    let task = tokio::spawn(run(Arc::clone(&shared), closed));
    let stream = DeliveryStream::new(EngineStream { shared }).with_close(Box::new(move || {
        async move {
            let _ = released.wait_for(|r| *r).await;
        }
        .boxed()
    }));
    (stream, task)
}

struct Item<T> {
    id: u64,
    token: T,
    envelope: Envelope,
    attempt: u32,
    position: Option<String>,
    schema_version: Option<u64>,
    recovered: bool,
    /// When the broker's lease was last started or refreshed.
    touched: Instant,
}

struct Held<T> {
    token: T,
    key: Option<String>,
    recovered: bool,
    deadline: Instant,
    touched: Instant,
    /// Not a delivery: a failed settlement waiting to be retried.
    retry: bool,
    /// The delivery's message and attempt (`None` for a retry): its
    /// redelivery here never comes back at a lower attempt (see
    /// `State::given_back`), and a key-ordered key waits for it.
    given: Option<(EventId, u32)>,
}

/// Most give-backs remembered (see `State::given_back`).
const GIVEN_BACK_MAX: usize = 65_536;

/// Looked up on every hand-out and settlement: a fast hasher.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

struct State<T> {
    buffer: VecDeque<Item<T>>,
    held: FastMap<u64, Held<T>>,
    leases: BTreeSet<(Instant, u64)>,
    next_id: u64,
    /// Key-ordered subscriptions: keys with a delivery out or a
    /// redelivery on its way (see `returning`).
    busy_keys: FastMap<String, usize>,
    /// Key-ordered subscriptions: messages given back for redelivery, whose
    /// key stays held until they come back here (or, if the broker gives
    /// them to another consumer, until the instant).
    returning: HashMap<EventId, (String, Instant)>,
    /// Attempts of messages given back for redelivery by this engine, by
    /// event id: when one comes back here, its attempt is at least one
    /// more, even if the broker lost its count (Pulsar keeps it in memory
    /// and can forget it).
    given_back: FastMap<EventId, u32>,
    /// Recovered messages buffered or out.
    recovered: usize,
    /// Of `held`, recovered deliveries out.
    recovered_out: usize,
    errors: VecDeque<Error>,
    waker: Option<Waker>,
    /// The stream was dropped.
    dropped: bool,
    /// The stream has ended (closed, or a permanent error).
    ended: bool,
    /// The transport was closed: settlements are refused.
    closed: bool,
    /// A fetch is under way (by the engine task or the stream).
    fetching: bool,
    /// The engine waits for room to read: settlements wake it.
    wants_room: bool,
    /// The consumer waits for a message and the source had none ready:
    /// the engine reads as soon as there is any room.
    consumer_waiting: bool,
    /// Reads fail for a reason that may pass: do not read before this.
    fetch_ok_at: Option<Instant>,
}

/// What buffering a read left to do with I/O.
struct After<T> {
    dead: Vec<(T, Envelope)>,
    release: Vec<T>,
}

impl<T> State<T> {
    fn new() -> Self {
        State {
            buffer: VecDeque::new(),
            held: FastMap::default(),
            leases: BTreeSet::new(),
            next_id: 0,
            busy_keys: FastMap::default(),
            returning: HashMap::new(),
            given_back: FastMap::default(),
            recovered: 0,
            recovered_out: 0,
            errors: VecDeque::new(),
            waker: None,
            dropped: false,
            ended: false,
            closed: false,
            fetching: false,
            wants_room: false,
            consumer_waiting: false,
            fetch_ok_at: None,
        }
    }

    /// What a read may add without going past `prefetch`.
    fn room(&self, prefetch: usize) -> usize {
        prefetch.saturating_sub(self.buffer.len() + self.held.len())
    }

    fn wake_stream(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// The buffer index of the next message to hand out, if any may go.
    fn next_eligible(&self, key_ordered: bool) -> Option<usize> {
        if self.recovered_out > 0 {
            return None; // a suspect is out: it goes alone
        }
        let out = self.held.len();
        let mut skipped: Vec<&str> = Vec::new();
        for (i, it) in self.buffer.iter().enumerate() {
            let key = it.envelope.key.as_deref().filter(|_| key_ordered);
            // Its own redelivery marker does not hold it back.
            let own =
                usize::from(key.is_some() && self.returning.contains_key(&it.envelope.event_id));
            let blocked = key.is_some_and(|k| {
                self.busy_keys.get(k).is_some_and(|n| *n > own) || skipped.contains(&k)
            });
            if blocked || (it.recovered && out > 0) {
                if let Some(k) = key {
                    skipped.push(k);
                }
                continue;
            }
            return Some(i);
        }
        None
    }

    fn release_key(&mut self, k: &str) {
        if let Some(n) = self.busy_keys.get_mut(k) {
            *n -= 1;
            if *n == 0 {
                self.busy_keys.remove(k);
            }
        }
    }

    /// Hold the key of `h` until its redelivery comes back (key order).
    fn hold_key_for_return(&mut self, h: &Held<T>, within: Duration) {
        if let (Some(k), Some((e, _))) = (&h.key, &h.given) {
            *self.busy_keys.entry(k.clone()).or_insert(0) += 1;
            let until = Instant::now() + within;
            if let Some((old, _)) = self.returning.insert(e.clone(), (k.clone(), until)) {
                self.release_key(&old);
            }
        }
    }

    /// Drop the marker of a redelivery that came back (or gave up on).
    fn returned(&mut self, e: &EventId) {
        if let Some((k, _)) = self.returning.remove(e) {
            self.release_key(&k);
        }
    }

    /// Let go of keys whose redelivery went elsewhere; the next instant one
    /// is due.
    fn purge_returning(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let gone: Vec<EventId> = self
            .returning
            .iter()
            .filter(|(_, (_, until))| *until <= now)
            .map(|(e, _)| e.clone())
            .collect();
        if !gone.is_empty() {
            for e in &gone {
                self.returned(e);
            }
            self.wake_stream();
        }
        self.returning.values().map(|(_, until)| *until).min()
    }

    /// Take a held message off the books (settled or expired).
    fn unhold(&mut self, id: u64) -> Option<Held<T>> {
        let h = self.held.remove(&id)?;
        self.leases.remove(&(h.deadline, id));
        if let Some(k) = &h.key {
            self.release_key(k);
        }
        if h.recovered {
            self.recovered -= 1;
            self.recovered_out -= 1;
        }
        Some(h)
    }
}

struct Shared<S: Source> {
    source: S,
    sub: Subscription,
    state: Mutex<State<S::Token>>,
    /// Wakes the engine task: room freed, stream dropped, timers changed.
    wake: Notify,
    /// Set once what was read but not handed out is given back (or the
    /// engine ended).
    released: tokio::sync::watch::Sender<bool>,
}

impl<S: Source> Shared<S> {
    fn lock(&self) -> MutexGuard<'_, State<S::Token>> {
        // Plain bookkeeping; a panic elsewhere must not wedge delivery.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Buffer what a source read, dead-lettering poison and messages past
    /// their last attempt on the way.
    async fn accept(&self, fetched: Vec<Fetched<S::Token>>) {
        let after = self.take_in(fetched);
        self.finish(after).await;
    }

    /// The part of [`Shared::accept`] that needs no I/O: buffer what may be
    /// handed out; return the dead letters to publish and what to give
    /// back (the stream is gone).
    fn take_in(&self, fetched: Vec<Fetched<S::Token>>) -> After<S::Token> {
        let mut after = After {
            dead: Vec::new(),
            release: Vec::new(),
        };
        let mut st = self.lock();
        let mut pushed = false;
        for mut f in fetched {
            if let (false, Ok(env)) = (st.given_back.is_empty(), &f.message) {
                if let Some(prev) = st.given_back.remove(&env.event_id) {
                    f.attempt = f.attempt.max(prev.saturating_add(1));
                }
            }
            // The facts of a delivery are built only for a dead letter.
            let info = || DeliveryInfo::new(&self.sub, f.attempt, f.position.clone());
            let dead = match &f.message {
                Err(p) => Some(rules::poison_dead_letter(
                    &self.sub.topic,
                    p.raw.clone(),
                    p.content_type.clone(),
                    &p.error,
                    &info(),
                )),
                Ok(env) if f.attempt > self.sub.max_attempts => {
                    rules::exceeded_attempts(env, &info())
                }
                Ok(_) => None,
            };
            if let Some((dl, reason)) = dead {
                if let Ok(env) = &f.message {
                    st.returned(&env.event_id);
                }
                tracing::info!(topic = %self.sub.topic, group = %self.sub.group, position = ?f.position, %reason, "dead-lettering");
                after.dead.push((f.token, dl));
                continue;
            }
            let Ok(envelope) = f.message else { continue };
            if st.dropped || st.ended {
                after.release.push(f.token);
                continue;
            }
            let id = st.next_id;
            st.next_id += 1;
            if f.recovered {
                st.recovered += 1;
            }
            st.buffer.push_back(Item {
                id,
                token: f.token,
                envelope,
                attempt: f.attempt,
                position: f.position,
                schema_version: f.schema_version,
                recovered: f.recovered,
                touched: Instant::now(),
            });
            pushed = true;
        }
        if pushed {
            st.wake_stream();
        }
        after
    }

    /// The I/O [`Shared::take_in`] left.
    async fn finish(&self, after: After<S::Token>) {
        for (token, dl) in after.dead {
            if let Err(e) = self.source.dead_letter(token.clone(), dl).await {
                tracing::warn!(topic = %self.sub.topic, error = %e, "dead-lettering failed; retrying");
                self.retry_later(token, false);
            }
        }
        if !after.release.is_empty() {
            self.source.release(after.release).await;
        }
    }

    /// Whether a fetch may start now, and for how many; marks it started.
    /// `eager`: the consumer waits for a message (any room will do).
    fn begin_fetch(&self, st: &mut State<S::Token>, eager: bool) -> Option<usize> {
        let prefetch = self.sub.prefetch.max(1);
        let room = st.room(prefetch);
        // Read ahead in large batches; a waiting consumer takes any room.
        let may = !st.fetching
            && !st.dropped
            && !st.ended
            && st.recovered == 0
            && room > 0
            && (eager || st.consumer_waiting || (!S::HOLDS_READY && room * 2 >= prefetch))
            && st.fetch_ok_at.is_none_or(|t| Instant::now() >= t);
        if !may {
            // A settlement that makes room must wake the engine.
            st.wants_room = true;
            return None;
        }
        st.fetching = true;
        Some(room)
    }

    /// Give `token` back one [`RETRY_AFTER`] from now (a settlement or dead
    /// letter failed for a reason that may pass).
    fn retry_later(&self, token: S::Token, recovered: bool) {
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        let deadline = Instant::now() + RETRY_AFTER;
        st.leases.insert((deadline, id));
        if recovered {
            st.recovered += 1;
            st.recovered_out += 1;
        }
        st.held.insert(
            id,
            Held {
                token,
                key: None,
                recovered,
                deadline,
                touched: Instant::now(),
                retry: true,
                given: None,
            },
        );
        drop(st);
        self.wake.notify_one();
    }

    /// Take the delivery `id` to settle it.
    fn take_held(&self, id: u64) -> Result<Held<S::Token>> {
        let mut st = self.lock();
        if st.closed {
            return Err(Error::new(
                ErrorKind::Closed,
                "the transport is closed; the broker redelivers the message",
            ));
        }
        let h = st.unhold(id).ok_or_else(|| {
            Error::new(
                ErrorKind::LeaseExpired,
                format!(
                    "the lease of this delivery ran out ({:?} ack deadline) and the message was given back for redelivery; this settlement changed nothing",
                    self.sub.ack_deadline
                ),
            )
        })?;
        // A consumer waiting for room takes from a source that holds
        // messages ready itself; otherwise wake the engine, and only when
        // the room freed lets it read.
        let prefetch = self.sub.prefetch.max(1);
        let room = st.room(prefetch);
        if S::HOLDS_READY && st.consumer_waiting && room > 0 {
            st.wake_stream();
        }
        let wake =
            !S::HOLDS_READY && st.wants_room && (st.consumer_waiting || room * 2 >= prefetch);
        if wake {
            st.wants_room = false;
        }
        drop(st);
        if wake {
            self.wake.notify_one();
        }
        Ok(h)
    }

    /// Key order: a redelivered message's key waits for it.
    /// And its attempt is remembered for when it comes back here.
    fn returning(&self, h: &Held<S::Token>, delay: Duration) {
        let mut st = self.lock();
        if let Some((e, attempt)) = &h.given {
            if st.given_back.len() >= GIVEN_BACK_MAX {
                st.given_back.clear(); // gone elsewhere, most of them
            }
            st.given_back.insert(e.clone(), *attempt);
        }
        if self.sub.key_ordered {
            st.hold_key_for_return(h, delay + self.sub.ack_deadline);
        }
    }

    async fn apply(&self, held: Held<S::Token>, settlement: Settlement) -> Result<()> {
        if let Settlement::Redeliver { delay } = &settlement {
            self.returning(&held, *delay);
        }
        let token = held.token;
        let result = match settlement {
            Settlement::Ack => return self.source.ack(token).await,
            Settlement::Redeliver { delay } => {
                match self.source.redeliver(token.clone(), delay).await {
                    Ok(Some(f)) => {
                        self.accept(vec![f]).await;
                        Ok(())
                    }
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Settlement::DeadLetter { dead_letter, .. } => {
                self.source.dead_letter(token.clone(), *dead_letter).await
            }
        };
        if let Err(e) = &result {
            if e.is_temporary() {
                self.retry_later(token, false);
            }
        }
        result
    }

    /// Give back every message whose lease ran out.
    async fn expire(&self) {
        let now = Instant::now();
        let mut due = Vec::new();
        {
            let mut st = self.lock();
            while let Some(&(t, id)) = st.leases.first() {
                if t > now {
                    break;
                }
                if let Some(h) = st.unhold(id) {
                    due.push(h);
                } else {
                    st.leases.pop_first();
                }
            }
        }
        for h in due {
            self.returning(&h, Duration::ZERO);
            if !h.retry {
                tracing::debug!(topic = %self.sub.topic, group = %self.sub.group, "lease ran out unsettled; redelivering");
            }
            match self.source.redeliver(h.token.clone(), Duration::ZERO).await {
                Ok(Some(f)) => self.accept(vec![f]).await,
                Ok(None) => {}
                Err(e) if e.is_temporary() => self.retry_later(h.token, h.recovered),
                Err(e) => {
                    tracing::debug!(error = %e, "expired message is no longer held here");
                }
            }
        }
    }

    /// A timer went off: give back expired leases, and refresh broker
    /// leases every `tick`.
    async fn on_timer(&self, next_extend: &mut Instant, tick: Duration) {
        self.expire().await;
        if S::BROKER_LEASES && Instant::now() >= *next_extend {
            self.extend_broker().await;
            *next_extend = Instant::now() + tick;
        }
    }

    /// Refresh the broker's lease of what is held here, before half a
    /// deadline has passed since the last refresh.
    async fn extend_broker(&self) {
        let cutoff = Instant::now()
            .checked_sub(self.sub.ack_deadline / 2)
            .unwrap_or_else(Instant::now);
        let (ids, tokens): (Vec<u64>, Vec<S::Token>) = {
            let st = self.lock();
            let held = st
                .held
                .iter()
                .filter(|(_, h)| !h.retry && h.touched <= cutoff)
                .map(|(id, h)| (*id, h.token.clone()));
            let buffered = st
                .buffer
                .iter()
                .filter(|it| it.touched <= cutoff)
                .map(|it| (it.id, it.token.clone()));
            held.chain(buffered).unzip()
        };
        if ids.is_empty() {
            return;
        }
        let now = Instant::now();
        let kept = match self.source.extend(tokens).await {
            Ok(k) => k,
            Err(e) => {
                tracing::debug!(error = %e, "refreshing broker leases failed; retried on the next tick");
                return;
            }
        };
        let mut st = self.lock();
        for (id, keep) in ids.into_iter().zip(kept) {
            if let Some(h) = st.held.get_mut(&id) {
                if keep {
                    h.touched = now;
                } else {
                    // Another consumer has it: a settlement now is late.
                    st.unhold(id);
                }
            } else if let Some(i) = st.buffer.iter().position(|it| it.id == id) {
                if keep {
                    st.buffer[i].touched = now;
                } else if let Some(it) = st.buffer.remove(i) {
                    if it.recovered {
                        st.recovered -= 1;
                    }
                }
            }
        }
    }

    fn extend_lease(&self, id: u64, by: Duration) -> Result<()> {
        let mut st = self.lock();
        let Some(h) = st.held.get_mut(&id) else {
            return Err(Error::new(
                ErrorKind::LeaseExpired,
                "the lease of this delivery already ran out",
            ));
        };
        let old = h.deadline;
        h.deadline = Instant::now() + by;
        let new = h.deadline;
        st.leases.remove(&(old, id));
        st.leases.insert((new, id));
        // The engine wakes at the old deadline and finds the new one.
        Ok(())
    }

    /// Take every buffered message out (to give back).
    fn drain_buffer(&self) -> Vec<S::Token> {
        let mut st = self.lock();
        let items: Vec<Item<S::Token>> = st.buffer.drain(..).collect();
        st.recovered -= items.iter().filter(|i| i.recovered).count();
        items.into_iter().map(|i| i.token).collect()
    }
}

/// What the engine task does next.
struct Plan {
    stop: bool,
    fetch: Option<usize>,
    wake_at: Option<Instant>,
}

fn plan<S: Source>(shared: &Shared<S>, fetching: bool) -> Plan {
    let mut st = shared.lock();
    let stop = st.dropped || st.ended;
    let fetch = if stop || fetching {
        None
    } else {
        shared.begin_fetch(&mut st, false)
    };
    let mut wake_at = st.leases.first().map(|(t, _)| *t);
    if let Some(t) = st.fetch_ok_at.filter(|_| fetch.is_none()) {
        wake_at = Some(wake_at.map_or(t, |w| w.min(t)));
    }
    Plan {
        stop,
        fetch,
        wake_at,
    }
}

type FetchFuture<T> = BoxFuture<'static, Result<Vec<Fetched<T>>>>;

async fn run<S: Source>(shared: Arc<Shared<S>>, closed: impl Future<Output = ()> + Send) {
    tokio::pin!(closed);
    let tick = (shared.sub.ack_deadline / 4).max(Duration::from_millis(10));
    let mut next_extend = Instant::now() + tick;
    let mut fetch: Option<FetchFuture<S::Token>> = None;
    let mut failing = false;
    let mut backoff = Duration::from_millis(50);
    let mut closing = false;
    loop {
        let p = plan(&shared, fetch.is_some());
        let marker = shared.lock().purge_returning();
        if p.stop {
            break;
        }
        if let Some(max) = p.fetch {
            shared.lock().fetch_ok_at = None;
            let s = Arc::clone(&shared);
            fetch = Some(async move { s.source.fetch(max).await }.boxed());
        }
        let mut wake_at = p.wake_at;
        for t in [marker, S::BROKER_LEASES.then_some(next_extend)]
            .into_iter()
            .flatten()
        {
            wake_at = Some(wake_at.map_or(t, |w| w.min(t)));
        }
        tokio::select! {
            biased;
            _ = &mut closed => {
                closing = true;
                break;
            }
            r = async {
                match fetch.as_mut() {
                    Some(f) => f.await,
                    None => std::future::pending().await,
                }
            }, if fetch.is_some() => {
                fetch = None;
                shared.lock().fetching = false;
                match r {
                    Ok(items) => {
                        if failing {
                            tracing::info!(topic = %shared.sub.topic, group = %shared.sub.group, "subscription reading again");
                        }
                        failing = false;
                        backoff = Duration::from_millis(50);
                        shared.accept(items).await;
                    }
                    Err(e) if e.is_temporary() => {
                        if !failing {
                            tracing::warn!(topic = %shared.sub.topic, group = %shared.sub.group, error = %e, "subscription cannot read; retrying");
                            let mut st = shared.lock();
                            st.errors.push_back(e);
                            st.wake_stream();
                        }
                        failing = true;
                        shared.lock().fetch_ok_at = Some(Instant::now() + backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                    Err(e) => {
                        tracing::error!(topic = %shared.sub.topic, group = %shared.sub.group, error = %e, "subscription failed");
                        let mut st = shared.lock();
                        st.errors.push_back(e);
                        st.ended = true;
                        st.wake_stream();
                    }
                }
            }
            _ = shared.wake.notified() => {}
            _ = sleep_until(wake_at) => shared.on_timer(&mut next_extend, tick).await,
        }
    }
    // Stopping: what was read but never handed out goes back at once.
    if let Some(f) = fetch.take() {
        if let Ok(items) = f.await {
            shared
                .source
                .release(items.into_iter().map(|f| f.token).collect())
                .await;
        }
        shared.lock().fetching = false;
    }
    {
        let mut st = shared.lock();
        st.ended = true;
        st.closed |= closing;
        st.wake_stream();
    }
    let buffered = shared.drain_buffer();
    if !buffered.is_empty() {
        shared.source.release(buffered).await;
    }
    shared.released.send_replace(true);
    if !closing {
        // The stream was dropped: deliveries handed out can still be
        // settled, until their leases run out.
        linger(&shared, closed, tick).await;
    }
    shared.source.close().await;
}

/// Keep the leases of deliveries that outlived their stream until they are
/// settled or expire, or the transport closes.
async fn linger<S: Source>(shared: &Shared<S>, closed: impl Future<Output = ()>, tick: Duration) {
    tokio::pin!(closed);
    let mut next_extend = Instant::now() + tick;
    loop {
        let wake_at = {
            let st = shared.lock();
            if st.held.is_empty() {
                return;
            }
            st.leases.first().map(|(t, _)| *t)
        };
        let wake_at = if S::BROKER_LEASES {
            Some(wake_at.map_or(next_extend, |w| w.min(next_extend)))
        } else {
            wake_at
        };
        tokio::select! {
            _ = &mut closed => {
                shared.lock().closed = true;
                return;
            }
            _ = shared.wake.notified() => {}
            _ = sleep_until(wake_at) => shared.on_timer(&mut next_extend, tick).await,
        }
        // Redelivered messages land in the buffer of a dropped stream.
        let buffered = shared.drain_buffer();
        if !buffered.is_empty() {
            shared.source.release(buffered).await;
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

struct EngineStream<S: Source> {
    shared: Arc<Shared<S>>,
}

impl<S: Source> Stream for EngineStream<S> {
    type Item = Result<Delivery>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let shared = &self.shared;
        let mut st = shared.lock();
        if let Some(e) = st.errors.pop_front() {
            return Poll::Ready(Some(Err(e)));
        }
        if st.ended {
            return Poll::Ready(None);
        }
        // Nothing to hand out: take what the source already holds, here
        // and now (no task switch); else the engine reads (for a source that
        // holds messages ready: only when it had none although there was
        // room). Once per poll; the buffer is looked at again after it,
        // since the engine may have filled it while the lock was released.
        let mut tried = false;
        let mut engine_reads = !S::HOLDS_READY;
        let item = loop {
            let Some(i) = st.next_eligible(shared.sub.key_ordered) else {
                if tried {
                    st.consumer_waiting = true;
                    if engine_reads {
                        shared.wake.notify_one();
                    }
                    if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        st.waker = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
                tried = true;
                if let Some(max) = shared.begin_fetch(&mut st, true) {
                    drop(st);
                    let ready = shared.source.take_ready(max);
                    let got = !ready.is_empty();
                    if got {
                        let after = shared.take_in(ready);
                        if !after.dead.is_empty() || !after.release.is_empty() {
                            let s = Arc::clone(shared);
                            tokio::spawn(async move { s.finish(after).await });
                        }
                    }
                    st = shared.lock();
                    st.fetching = false;
                    if got {
                        tried = false; // progress: the source may hold more
                    } else {
                        engine_reads = true;
                    }
                }
                continue;
            };
            let Some(item) = st.buffer.remove(i) else {
                return Poll::Pending;
            };
            if shared.source.handing_out(&item.token) {
                st.consumer_waiting = false;
                break item;
            }
            // Gone to another consumer, which delivers it.
            if item.recovered {
                st.recovered -= 1;
            }
            shared.wake.notify_one();
        };
        let id = item.id;
        let deadline = Instant::now() + shared.sub.ack_deadline;
        let key = item.envelope.key.clone().filter(|_| shared.sub.key_ordered);
        if let Some(k) = &key {
            st.returned(&item.envelope.event_id);
            *st.busy_keys.entry(k.clone()).or_insert(0) += 1;
        }
        if item.recovered {
            st.recovered_out += 1;
        }
        st.leases.insert((deadline, id));
        st.held.insert(
            id,
            Held {
                token: item.token,
                key,
                recovered: item.recovered,
                deadline,
                touched: item.touched,
                retry: false,
                given: Some((item.envelope.event_id.clone(), item.attempt)),
            },
        );
        drop(st);
        let info = DeliveryInfo::new(&shared.sub, item.attempt, item.position)
            .with_schema_version(item.schema_version);
        tracing::trace!(topic = %shared.sub.topic, event_id = %item.envelope.event_id, attempt = info.attempt, "handed out");
        let settle = EngineSettle {
            shared: Arc::clone(shared),
            id,
        };
        Poll::Ready(Some(Ok(Delivery::new(
            item.envelope,
            info,
            Box::new(settle),
        ))))
    }
}

impl<S: Source> Drop for EngineStream<S> {
    fn drop(&mut self) {
        self.shared.lock().dropped = true;
        self.shared.wake.notify_one();
    }
}

struct EngineSettle<S: Source> {
    shared: Arc<Shared<S>>,
    id: u64,
}

#[async_trait]
impl<S: Source> Settle for EngineSettle<S> {
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<()> {
        let held = self.shared.take_held(self.id)?;
        self.shared.apply(held, settlement).await
    }

    fn extend(&self, by: Duration) -> Result<()> {
        self.shared.extend_lease(self.id, by)
    }
}
