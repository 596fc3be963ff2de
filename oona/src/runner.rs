//! The handler runner: consume a subscription, call a handler, settle.
//!
//! | handler result | settlement |
//! |---|---|
//! | `Ok(())` | ack |
//! | [`HandlerError::temporary`] | nack (after the error's delay, else the runner's backoff); on the last attempt the core dead-letters it |
//! | [`HandlerError::permanent`] | reject: dead-lettered now, the error as reason |
//! | payload does not decode | reject with reason `decode: ...` (the handler is not called) |
//! | the handler panics | reject with reason `handler panicked: ...` |
//!
//! **Panics are rejected, not nacked**: a panic is almost always a bug that
//! the same input triggers again, so retrying only delays the dead letter
//! and hides the panic message. The dead letter keeps the original envelope
//! intact, so the message can be replayed once the bug is fixed.
//!
//! **Leases and time limits.** While a handler runs, the runner extends
//! the delivery's lease every half ack deadline
//! ([`oona_core::Delivery::extend`]), so a handler slower than the deadline
//! is not raced by a redelivery of its own message. With
//! [`Runner::handler_timeout`] a call that runs too long is dropped and
//! its message nacked with reason `handler timed out after ...`.
//!
//! **Concurrency.** With [`Runner::concurrency`]`(n)` at most `n` handler
//! calls run at once. Messages with the same key are handled one after the
//! other in delivery order: while a key's message is being handled, the
//! key's later messages wait in a queue of their own, and a busy key holds
//! back only itself: other keys, and messages without a key, go on to any
//! free slot. What waits is bounded by the subscription's prefetch (the
//! transport hands out no more unsettled deliveries than that). A nacked
//! message comes back later, after its successors: at-least-once
//! redelivery cannot keep order across retries.
//!
//! **Graceful shutdown.** When the [`Shutdown`] token fires the runner stops
//! taking deliveries from the stream, lets every delivery it already took
//! finish and settle, closes the stream (what the subscription read ahead
//! but the runner never took goes back to the broker at once, without an
//! attempt), asks the transport to write out settlements it batches
//! ([`oona_core::Transport::flush`]) and returns a [`RunSummary`]. When it returns,
//! the process may exit: nothing it acked comes back.

use std::fmt;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt as _;
use futures::StreamExt as _;
use oona_core::layer::{ConsumeLayer, ConsumeNext, Handled};
use oona_core::{Codec, Delivery, DeliveryStream, Error, ErrorKind, Outcome, Result, Subscription};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument as _;

use oona_core::sync::lock;

use crate::bus::{decode_reason, Bus};
use crate::handler::{Handler, HandlerError, Incoming};

/// A shutdown signal shared by any number of runners.
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A signal not yet fired.
    pub fn new() -> Self {
        Shutdown {
            tx: Arc::new(watch::channel(false).0),
        }
    }

    /// Fire it: every runner watching it stops taking work. Idempotent.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether it has fired.
    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Wait until it fires.
    pub async fn triggered(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives as long as `self`, so this only returns once true.
        let _ = rx.wait_for(|fired| *fired).await;
    }
}

/// Why a runner stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StopReason {
    /// It has not stopped (a [`RunHandle::stats`] snapshot).
    #[default]
    Running,
    /// The [`Shutdown`] token fired.
    Shutdown,
    /// The delivery stream ended (transport closed, or a permanent stream
    /// error; see [`RunSummary::last_stream_error`]).
    StreamEnded,
}

/// What a runner did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunSummary {
    /// Deliveries taken from the stream.
    pub received: u64,
    /// Acked (handler returned `Ok`).
    pub acked: u64,
    /// Nacked (temporary failure), including those dead-lettered because it
    /// was their last attempt.
    pub nacked: u64,
    /// Rejected (permanent failure, decode failure, panic).
    pub rejected: u64,
    /// Sent to the dead-letter topic: every reject plus every nack on a last
    /// attempt.
    pub dead_lettered: u64,
    /// Rejected because the payload did not decode (also in `rejected`).
    pub decode_failures: u64,
    /// Handler panics (also in `rejected`).
    pub panics: u64,
    /// Settlements the transport refused; those messages are unsettled and
    /// come back after the ack deadline.
    pub settle_errors: u64,
    /// Errors the delivery stream reported.
    pub stream_errors: u64,
    /// The last of them.
    pub last_stream_error: Option<String>,
    /// Why the runner stopped.
    pub stop: StopReason,
}

impl RunSummary {
    /// Deliveries settled (acked, nacked or rejected).
    pub fn settled(&self) -> u64 {
        self.acked + self.nacked + self.rejected
    }
}

/// Adds the counts up (the routes of a router, the workers of a service);
/// the last stream error is the last one given, the stop reason the last
/// summary's.
impl std::iter::Sum for RunSummary {
    fn sum<I: Iterator<Item = RunSummary>>(iter: I) -> RunSummary {
        iter.fold(RunSummary::default(), |mut a, s| {
            a.received += s.received;
            a.acked += s.acked;
            a.nacked += s.nacked;
            a.rejected += s.rejected;
            a.dead_lettered += s.dead_lettered;
            a.decode_failures += s.decode_failures;
            a.panics += s.panics;
            a.settle_errors += s.settle_errors;
            a.stream_errors += s.stream_errors;
            a.last_stream_error = s.last_stream_error.or(a.last_stream_error);
            a.stop = s.stop;
            a
        })
    }
}

impl fmt::Display for RunSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "received {} acked {} nacked {} rejected {} dead-lettered {} (decode {}, panics {}, settle errors {}, stream errors {})",
            self.received,
            self.acked,
            self.nacked,
            self.rejected,
            self.dead_lettered,
            self.decode_failures,
            self.panics,
            self.settle_errors,
            self.stream_errors
        )
    }
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    acked: AtomicU64,
    nacked: AtomicU64,
    rejected: AtomicU64,
    dead_lettered: AtomicU64,
    decode_failures: AtomicU64,
    panics: AtomicU64,
    settle_errors: AtomicU64,
    stream_errors: AtomicU64,
    last_stream_error: Mutex<Option<String>>,
}

impl Counters {
    fn snapshot(&self, stop: StopReason) -> RunSummary {
        let g = |a: &AtomicU64| a.load(Ordering::Acquire);
        RunSummary {
            received: g(&self.received),
            acked: g(&self.acked),
            nacked: g(&self.nacked),
            rejected: g(&self.rejected),
            dead_lettered: g(&self.dead_lettered),
            decode_failures: g(&self.decode_failures),
            panics: g(&self.panics),
            settle_errors: g(&self.settle_errors),
            stream_errors: g(&self.stream_errors),
            last_stream_error: self
                .last_stream_error
                .lock()
                .map(|g| g.clone())
                .unwrap_or_else(|p| p.into_inner().clone()),
            stop,
        }
    }
}

fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::AcqRel);
}

/// The messages waiting behind a key being handled. A key is present while
/// a task handles it (its queue maybe empty).
#[derive(Clone, Default)]
struct KeyQueues(
    Arc<Mutex<std::collections::HashMap<String, std::collections::VecDeque<Delivery>>>>,
);

impl KeyQueues {
    /// Queue `d` behind its key; `Some(d)` back when the key is idle: the
    /// caller handles it (the key is now marked busy).
    fn push(&self, key: String, d: Delivery) -> Option<Delivery> {
        let mut map = lock(&self.0);
        match map.get_mut(&key) {
            Some(q) => {
                q.push_back(d);
                None
            }
            None => {
                map.insert(key, std::collections::VecDeque::new());
                Some(d)
            }
        }
    }

    /// The key's next message; `None` (and the key idle) when none waits.
    fn pop(&self, key: &str) -> Option<Delivery> {
        let mut map = lock(&self.0);
        let next = map.get_mut(key).and_then(|q| q.pop_front());
        if next.is_none() {
            map.remove(key);
        }
        next
    }
}

/// How the runner treats a handler call: retry backoff and time limit.
#[derive(Debug, Clone, Copy, Default)]
struct Policy {
    backoff: Option<Backoff>,
    timeout: Option<Duration>,
}

#[derive(Debug, Clone, Copy)]
struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        self.base.saturating_mul(1u32 << exp).min(self.max)
    }
}

/// Runs a handler over a subscription; made by [`Bus::runner`].
#[must_use = "a runner does nothing until .run() or .start()"]
pub struct Runner<T, C> {
    bus: Bus,
    subscription: Result<Subscription>,
    codec: C,
    layers: Vec<Arc<dyn ConsumeLayer>>,
    concurrency: usize,
    shutdown: Shutdown,
    policy: Policy,
    _t: PhantomData<fn() -> T>,
}

impl<T, C> fmt::Debug for Runner<T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runner")
            .field("subscription", &self.subscription)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl<T, C> Runner<T, C> {
    pub(crate) fn new(bus: Bus, subscription: Result<Subscription>, codec: C) -> Self {
        Runner {
            bus,
            subscription,
            codec,
            layers: Vec::new(),
            concurrency: 1,
            shutdown: Shutdown::new(),
            policy: Policy::default(),
            _t: PhantomData,
        }
    }

    /// Decode with `codec` instead of JSON (protobuf, Avro, [`oona_core::Raw`]
    /// bytes, a codec of your own).
    pub fn codec<C2: Codec<T>>(self, codec: C2) -> Runner<T, C2> {
        Runner {
            bus: self.bus,
            subscription: self.subscription,
            codec,
            layers: self.layers,
            concurrency: self.concurrency,
            shutdown: self.shutdown,
            policy: self.policy,
            _t: PhantomData,
        }
    }
}

impl<T, C> Runner<T, C>
where
    C: Codec<T>,
    T: Send + 'static,
{
    /// Add a consume layer for this runner only, inside the bus's layers
    /// (which run first). Layers added later run inside earlier ones.
    pub fn layer(self, layer: impl ConsumeLayer) -> Self {
        self.layer_arc(Arc::new(layer))
    }

    /// [`Runner::layer`] for a layer shared with other runners.
    pub(crate) fn layer_arc(mut self, layer: Arc<dyn ConsumeLayer>) -> Self {
        self.layers.push(layer);
        self
    }

    /// Run at most `n` handler calls at once (default 1; at least 1).
    /// Per-key order is kept; see the [module docs](self).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Stop when `shutdown` fires (share one token across runners to stop a
    /// whole service). Each runner has its own token otherwise.
    pub fn shutdown_on(mut self, shutdown: Shutdown) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Delay redelivery after a temporary failure without its own delay:
    /// `base * 2^(attempt-1)`, at most `max`. Default: no delay.
    pub fn retry_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.policy.backoff = Some(Backoff { base, max });
        self
    }

    /// Give each handler call at most `limit`: a call still running then
    /// is dropped and its message nacked (a temporary failure, reason
    /// `handler timed out after ...`), so it is retried and, on its last
    /// attempt, dead-lettered. Default: no limit. Either way the runner
    /// extends the delivery's lease while the handler runs, so a slow
    /// handler is never raced by a redelivery of its own message.
    pub fn handler_timeout(mut self, limit: Duration) -> Self {
        self.policy.timeout = Some(limit);
        self
    }

    /// Subscribe and run until shutdown or the end of the stream.
    pub async fn run<H: Handler<T>>(self, handler: H) -> Result<RunSummary> {
        let (_, counters, driven) = self.begin(handler).await?;
        let stop = driven.await;
        Ok(counters.snapshot(stop))
    }

    /// Subscribe (so the consumer group exists when this returns), then run
    /// in a background task. Stop it with [`RunHandle::shutdown`].
    pub async fn start<H: Handler<T>>(self, handler: H) -> Result<RunHandle> {
        let (shutdown, counters, driven) = self.begin(handler).await?;
        Ok(RunHandle {
            shutdown,
            counters,
            task: tokio::spawn(driven),
        })
    }

    /// What `run` and `start` share: serve the endpoints if
    /// `OONA_METRICS_ADDR` asks for them (a bad address fails before
    /// anything is subscribed), enter this runner in its bus's list
    /// (readiness, depth metrics), subscribe, and make the loop.
    async fn begin<H: Handler<T>>(
        self,
        handler: H,
    ) -> Result<(
        Shutdown,
        Arc<Counters>,
        impl std::future::Future<Output = StopReason> + Send + 'static,
    )> {
        let subscription = self.subscription?;
        #[cfg(feature = "http")]
        crate::serve::from_env(&self.bus).await?;
        let watched = Runners::watch(&self.bus, &subscription);
        let stream = self.bus.subscribe_raw(subscription).await?;
        let counters = Arc::new(Counters::default());
        // The bus's layers first, then the runner's own.
        let layers: Arc<[Arc<dyn ConsumeLayer>]> = (self.bus.consume_layers().iter().cloned())
            .chain(self.layers)
            .collect();
        let ctx = Ctx {
            layers,
            codec: Arc::new(self.codec),
            handler: Arc::new(handler),
            policy: self.policy,
            counters: counters.clone(),
            _t: PhantomData,
        };
        let driven = drive(
            self.bus,
            stream,
            ctx,
            self.concurrency,
            self.shutdown.clone(),
        );
        let driven = async move {
            let stop = driven.await;
            watched.finish(stop);
            stop
        };
        Ok((self.shutdown, counters, driven))
    }
}

/// The runners of a bus (shared by its clones): what readiness and the
/// depth metrics look at.
#[derive(Debug, Default)]
pub(crate) struct Runners(Mutex<Vec<Arc<Entry>>>);

#[derive(Debug)]
pub(crate) struct Entry {
    topic: oona_core::Topic,
    group: oona_core::Name,
    /// Set when the runner stopped by itself (its stream ended, its task
    /// lost).
    failed: std::sync::atomic::AtomicBool,
}

impl Runners {
    /// A runner of `sub` starts: a failed runner of the same topic and
    /// group before it is forgotten (it was restarted).
    fn watch(bus: &Bus, sub: &Subscription) -> Watched {
        let entry = Arc::new(Entry {
            topic: sub.topic.clone(),
            group: sub.group.clone(),
            failed: Default::default(),
        });
        let runners = bus.runners();
        let mut list = lock(&runners.0);
        list.retain(|e| {
            !(e.failed.load(Ordering::Relaxed) && e.topic == entry.topic && e.group == entry.group)
        });
        list.push(Arc::clone(&entry));
        drop(list);
        Watched {
            runners: Arc::clone(runners),
            metrics: bus.metrics().cloned(),
            entry,
            stop: None,
        }
    }

    /// The (topic, group) of each runner still running, once each.
    #[cfg_attr(not(feature = "http"), allow(dead_code))]
    pub(crate) fn groups(&self) -> Vec<(oona_core::Topic, oona_core::Name)> {
        let mut out: Vec<_> = lock(&self.0)
            .iter()
            .filter(|e| !e.failed.load(Ordering::Relaxed))
            .map(|e| (e.topic.clone(), e.group.clone()))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Every runner: topic, group, and whether it is running (`false`:
    /// it stopped by itself).
    pub(crate) fn list(&self) -> Vec<(oona_core::Topic, oona_core::Name, bool)> {
        lock(&self.0)
            .iter()
            .map(|e| {
                let running = !e.failed.load(Ordering::Relaxed);
                (e.topic.clone(), e.group.clone(), running)
            })
            .collect()
    }

    /// `topic/group` of each runner that stopped by itself.
    pub(crate) fn stopped(&self) -> Vec<String> {
        lock(&self.0)
            .iter()
            .filter(|e| e.failed.load(Ordering::Relaxed))
            .map(|e| format!("{}/{}", e.topic, e.group))
            .collect()
    }
}

/// A runner's entry in [`Runners`]: a shut-down runner leaves the list
/// (and its group's depth leaves the metrics); one that stopped by itself,
/// or whose task was lost (a `run` future dropped before its shutdown
/// token fired), stays, as failed, until a runner of its topic and group
/// starts again.
struct Watched {
    runners: Arc<Runners>,
    metrics: Option<oona_core::metrics::Metrics>,
    entry: Arc<Entry>,
    stop: Option<StopReason>,
}

impl Watched {
    fn finish(mut self, stop: StopReason) {
        self.stop = Some(stop);
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if self.stop == Some(StopReason::Shutdown) {
            let mut list = lock(&self.runners.0);
            list.retain(|e| !Arc::ptr_eq(e, &self.entry));
            let (t, g) = (&self.entry.topic, &self.entry.group);
            let others = list.iter().any(|e| e.topic == *t && e.group == *g);
            drop(list);
            if let (false, Some(m)) = (others, &self.metrics) {
                m.forget_group(t, g);
            }
        } else {
            self.entry.failed.store(true, Ordering::Relaxed);
        }
    }
}

/// A runner running in the background; see [`Runner::start`].
///
/// Dropping the handle detaches the runner: it keeps running until its
/// token fires or its stream ends.
#[derive(Debug)]
pub struct RunHandle {
    shutdown: Shutdown,
    counters: Arc<Counters>,
    task: tokio::task::JoinHandle<StopReason>,
}

impl fmt::Debug for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.snapshot(StopReason::Running), f)
    }
}

impl RunHandle {
    /// Counts so far.
    pub fn stats(&self) -> RunSummary {
        self.counters.snapshot(StopReason::Running)
    }

    /// The runner's shutdown token.
    pub fn shutdown_token(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Whether the runner has stopped.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Stop taking work, finish in-flight handlers and their settlements,
    /// and return the summary.
    pub async fn shutdown(self) -> Result<RunSummary> {
        self.shutdown.trigger();
        self.join().await
    }

    /// Wait for the runner to stop by itself (stream ended or token fired
    /// elsewhere).
    pub async fn join(self) -> Result<RunSummary> {
        let stop = self
            .task
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, format!("runner task failed: {e}")))?;
        Ok(self.counters.snapshot(stop))
    }
}

struct Ctx<T, C, H> {
    layers: Arc<[Arc<dyn ConsumeLayer>]>,
    codec: Arc<C>,
    handler: Arc<H>,
    policy: Policy,
    counters: Arc<Counters>,
    _t: PhantomData<fn() -> T>,
}

impl<T, C, H> Clone for Ctx<T, C, H> {
    fn clone(&self) -> Self {
        Ctx {
            layers: self.layers.clone(),
            codec: self.codec.clone(),
            handler: self.handler.clone(),
            policy: self.policy,
            counters: self.counters.clone(),
            _t: PhantomData,
        }
    }
}

async fn drive<T, C, H>(
    bus: Bus,
    mut stream: DeliveryStream,
    ctx: Ctx<T, C, H>,
    concurrency: usize,
    shutdown: Shutdown,
) -> StopReason
where
    T: Send + 'static,
    C: Codec<T>,
    H: Handler<T>,
{
    let counters = ctx.counters.clone();
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    let keys = KeyQueues::default();

    let stop = loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.triggered() => break StopReason::Shutdown,
            next = stream.next() => next,
        };
        let delivery = match next {
            None => break StopReason::StreamEnded,
            Some(Err(e)) => {
                inc(&counters.stream_errors);
                tracing::warn!(error = %e, temporary = e.is_temporary(), "oona: delivery stream error");
                if let Ok(mut last) = counters.last_stream_error.lock() {
                    *last = Some(e.to_string());
                }
                continue;
            }
            Some(Ok(d)) => d,
        };
        inc(&counters.received);
        if concurrency == 1 {
            process(&ctx, delivery).await;
            continue;
        }
        // Reap finished tasks so the set does not grow.
        while tasks.try_join_next().is_some() {}
        if let Some(key) = delivery.envelope().key.clone() {
            // A key already being handled queues it; otherwise a task of
            // its own handles it and whatever the key queues meanwhile.
            if let Some(first) = keys.push(key.clone(), delivery) {
                let (ctx, slots, keys) = (ctx.clone(), slots.clone(), keys.clone());
                tasks.spawn(async move {
                    let mut next = Some(first);
                    while let Some(d) = next {
                        // The semaphore is never closed; an error cannot
                        // happen, and if it did, running unbounded beats
                        // losing work.
                        let _permit = slots.acquire().await;
                        process(&ctx, d).await;
                        next = keys.pop(&key);
                    }
                });
            }
        } else {
            let permit = slots.clone().acquire_owned().await;
            let ctx = ctx.clone();
            tasks.spawn(async move {
                let _permit = permit;
                process(&ctx, delivery).await;
            });
        }
    };
    // Finish in-flight work: every task drains its key's queue. Their
    // settlements are awaited inside.
    while tasks.join_next().await.is_some() {}
    // What the subscription read but the runner never took goes back to
    // the broker now (not after an ack deadline), then settlements a
    // transport batches (Redis acks, Kafka commits, Pulsar acks) are
    // written, so the summary's acks are on the broker when this returns
    // and the process may exit.
    stream.close().await;
    if let Err(e) = bus.transport().flush().await {
        inc(&counters.settle_errors);
        tracing::warn!(error = %e, "oona: flushing settlements failed; unflushed messages will be redelivered after the ack deadline");
    }
    stop
}

async fn process<T, C, H>(ctx: &Ctx<T, C, H>, delivery: Delivery)
where
    T: Send + 'static,
    C: Codec<T>,
    H: Handler<T>,
{
    let env = delivery.envelope();
    let span = tracing::info_span!(
        "oona.deliver",
        topic = %env.topic,
        event_id = %env.event_id,
        group = %delivery.info().group,
        attempt = delivery.attempt(),
        outcome = tracing::field::Empty,
    );
    async move {
        let terminal = |d: Delivery| -> BoxFuture<'_, Handled> { Box::pin(handle(ctx, d)) };
        let handled = ConsumeNext::new(&ctx.layers, &terminal).run(delivery).await;
        count(&ctx.counters, &handled);
    }
    .instrument(span)
    .await
}

/// What a settled delivery adds to the counters.
fn count(counters: &Counters, h: &Handled) {
    let (name, counter) = match &h.outcome {
        Outcome::Ack => ("ack", &counters.acked),
        Outcome::Nack { .. } => ("nack", &counters.nacked),
        Outcome::Reject { .. } => ("reject", &counters.rejected),
    };
    tracing::Span::current().record("outcome", name);
    match &h.settled {
        Ok(()) => {
            inc(counter);
            if h.dead_lettered {
                inc(&counters.dead_lettered);
            }
        }
        Err(e) => {
            inc(&counters.settle_errors);
            tracing::warn!(error = %e, "oona: settlement failed; the broker will redeliver after the ack deadline");
        }
    }
}

/// The innermost step of the consume chain: decode, call the handler
/// (keeping the lease), settle by the result.
async fn handle<T, C, H>(ctx: &Ctx<T, C, H>, delivery: Delivery) -> Handled
where
    T: Send + 'static,
    C: Codec<T>,
    H: Handler<T>,
{
    {
        let counters = &ctx.counters;
        let outcome = match ctx.codec.decode(delivery.envelope()) {
            Err(e) => {
                inc(&counters.decode_failures);
                tracing::warn!(error = %e, "oona: payload does not decode; dead-lettering");
                Outcome::Reject {
                    reason: decode_reason(&e),
                }
            }
            Ok(value) => {
                let incoming =
                    Incoming::new(value, delivery.envelope().clone(), delivery.info().clone());
                let handler = ctx.handler.clone();
                // Calling inside the future also catches a panic in `call`
                // itself, before it returns its future.
                // What the handler publishes inherits from this message.
                let cause = crate::context::Cause::of(delivery.envelope());
                let call =
                    AssertUnwindSafe(cause.scope(async move { handler.call(incoming).await }))
                        .catch_unwind();
                match delivery.while_leased(call, ctx.policy.timeout).await {
                    None => {
                        let limit = ctx.policy.timeout.unwrap_or_default();
                        tracing::warn!(?limit, "oona: handler timed out; nacking");
                        Outcome::Nack {
                            delay: ctx.policy.backoff.map(|b| b.delay(delivery.attempt())),
                            reason: Some(format!("handler timed out after {limit:?}")),
                        }
                    }
                    Some(Ok(Ok(()))) => Outcome::Ack,
                    Some(Ok(Err(e))) => outcome_of(&e, delivery.attempt(), ctx.policy.backoff),
                    Some(Err(panic)) => {
                        inc(&counters.panics);
                        let msg = panic_message(panic.as_ref());
                        tracing::error!(panic = %msg, "oona: handler panicked; dead-lettering");
                        Outcome::Reject {
                            reason: format!("handler panicked: {msg}"),
                        }
                    }
                }
            }
        };
        Handled::settle(delivery, outcome).await
    }
}

fn outcome_of(e: &HandlerError, attempt: u32, backoff: Option<Backoff>) -> Outcome {
    if e.is_permanent() {
        tracing::warn!(error = %e, "oona: handler failed permanently; dead-lettering");
        Outcome::Reject {
            reason: e.message().to_string(),
        }
    } else {
        tracing::debug!(error = %e, "oona: handler failed; nacking");
        Outcome::Nack {
            delay: e.delay().or_else(|| backoff.map(|b| b.delay(attempt))),
            reason: Some(e.message().to_string()),
        }
    }
}

/// The text of a panic's payload.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        assert_eq!(b.delay(1), Duration::from_millis(100));
        assert_eq!(b.delay(2), Duration::from_millis(200));
        assert_eq!(b.delay(4), Duration::from_millis(800));
        assert_eq!(b.delay(5), Duration::from_secs(1));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn temporary_errors_nack_with_their_delay_or_the_backoff() {
        let b = Some(Backoff {
            base: Duration::from_millis(10),
            max: Duration::from_secs(1),
        });
        let own = HandlerError::retry_after("x", Duration::from_millis(3));
        assert_eq!(
            outcome_of(&own, 3, b),
            Outcome::Nack {
                delay: Some(Duration::from_millis(3)),
                reason: Some("x".into())
            }
        );
        let plain = HandlerError::temporary("x");
        assert_eq!(
            outcome_of(&plain, 3, b),
            Outcome::Nack {
                delay: Some(Duration::from_millis(40)),
                reason: Some("x".into())
            }
        );
        assert_eq!(
            outcome_of(&plain, 3, None),
            Outcome::Nack {
                delay: None,
                reason: Some("x".into())
            }
        );
        assert_eq!(
            outcome_of(&HandlerError::permanent("bad"), 1, b),
            Outcome::Reject {
                reason: "bad".into()
            }
        );
    }
}
