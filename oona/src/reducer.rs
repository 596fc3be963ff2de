//! State aggregated from several topics, published on change and rebuilt
//! from history after a restart: [`Reducer`].
//!
//! A reducer folds the events of its topics into one state `S` with a
//! function per topic. The state lives in the process: every start replays
//! the topics from the earliest retained message (event sourcing), so a
//! reducer killed and started again comes back to the same state, then
//! follows the topics live. Once it has caught up with what the topics held
//! at its start ([`ReducerHandle::rebuilt`]), it publishes its state when it
//! changed, at most once per aggregation window.
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::time::Duration;
//! use oona::reducer::Reducer;
//! use oona::Bus;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Default, Clone, Serialize)]
//! struct Fleet { health: BTreeMap<u32, f64>, losses: u64 }
//!
//! #[derive(Serialize, Deserialize)]
//! struct Health { seed: u32, score: f64 }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> oona::Result<()> {
//! let bus = Bus::new(oona::connect("memory://reducer-doc").await?);
//! bus.publish("telemetry.seed.health", &serde_json::json!({"seed": 7, "score": 0.9})).await?;
//! let fleet = Reducer::new(&bus, "nissa-fleet", Fleet::default())
//!     .on("telemetry.seed.health", |f: &mut Fleet, h: Health, _| {
//!         f.health.insert(h.seed, h.score);
//!     })
//!     .on("telemetry.seed.loss", |f: &mut Fleet, _: serde_json::Value, _| f.losses += 1)
//!     .window(Duration::from_millis(200))
//!     .publish_to("telemetry.nissa.fleet")
//!     .start()
//!     .await?;
//! fleet.rebuilt().await; // history replayed: the event published above is in
//! assert_eq!(fleet.state().health.get(&7), Some(&0.9));
//! let stats = fleet.shutdown().await?;
//! assert_eq!(stats.applied, 1);
//! # Ok(()) }
//! ```
//!
//! **Order.** Each topic is read in its own order (per partition, per key);
//! across topics, a replay may interleave events differently from the live
//! run. A reduce function that must give the same state on every replay is
//! insensitive to that interleaving (counts, sums, maxima, the latest value
//! per key by the event's own time or sequence).
//!
//! **Groups.** Each run reads through groups of its own, one per topic,
//! named `<name>.reducer-<run>-<i>`, deleted at [`ReducerHandle::shutdown`].
//! A run that was killed leaves its groups; the next start of the same
//! reducer deletes those that have no consumer left. Run one instance per
//! reducer name (replicas take names of their own: each holds the whole
//! state).
//!
//! **Bad events.** An event that does not decode, or whose reduce function
//! panics, is skipped: logged at `warn` with its id and reason and counted in
//! [`ReducerStats::skipped`]. It stays in the topic (the topic's own groups
//! dead-letter it), so a replay meets it again and skips it again.
//!
//! **Wire form.** The state goes out as JSON [`StateUpdate`] (schema id
//! [`STATE_SCHEMA`], key: the reducer's name):
//! `{"reducer": "nissa-fleet", "state": {...}, "events": 1042, "at_unix_ms": 1764000000000}`,
//! where `events` counts the events applied since this run started from the
//! earliest (so equal states of two runs carry equal counts).

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use oona_core::admin::delete_group_within;
use oona_core::sync::lock;
use oona_core::{
    Codec, Envelope, Error, ErrorKind, Json, Name, Raw, Result, StartPosition, Subscription,
    Timestamp, Topic,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::bus::IntoTopic;
use crate::handler::Incoming;
use crate::runner::{RunHandle, Runner, Shutdown};
use crate::Bus;

/// The schema id of the state a reducer publishes.
pub const STATE_SCHEMA: &str = "oona.v1.ReducerState/1";

/// What a reducer publishes when its state changed (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateUpdate<S> {
    /// The reducer's name.
    pub reducer: String,
    /// The state.
    pub state: S,
    /// Events applied since this run began replaying from the earliest.
    pub events: u64,
    /// When it was published (Unix milliseconds).
    pub at_unix_ms: u64,
}

/// A reducer's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReducerStats {
    /// Events folded into the state.
    pub applied: u64,
    /// Events skipped: they did not decode or their reduce function panicked.
    pub skipped: u64,
    /// States published.
    pub published: u64,
    /// The history the topics held at start has been replayed.
    pub rebuilt: bool,
}

/// One topic's reduce function, decoding included.
type Apply<S> = Arc<dyn Fn(&mut S, &Envelope) -> Result<()> + Send + Sync>;

/// A reducer waiting for [`Reducer::start`] (see the [module docs](self)).
#[must_use = "a reducer does nothing until .start()"]
pub struct Reducer<S> {
    bus: Bus,
    name: String,
    initial: S,
    topics: Vec<(Result<Topic>, Apply<S>)>,
    window: Duration,
    output: Option<Result<Topic>>,
    shutdown: Shutdown,
}

impl<S> std::fmt::Debug for Reducer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reducer")
            .field("name", &self.name)
            .field("topics", &self.topics.len())
            .field("window", &self.window)
            .finish()
    }
}

impl<S: Serialize + Send + 'static> Reducer<S> {
    /// Default [`Reducer::window`].
    pub const DEFAULT_WINDOW: Duration = Duration::from_secs(1);

    /// A reducer named `name` (a group name: its groups are named after
    /// it) starting from `initial`. A name that does not validate fails
    /// at [`Reducer::start`].
    pub fn new(bus: &Bus, name: impl Into<String>, initial: S) -> Self {
        Reducer {
            bus: bus.clone(),
            name: name.into(),
            initial,
            topics: Vec::new(),
            window: Self::DEFAULT_WINDOW,
            output: None,
            shutdown: Shutdown::new(),
        }
    }

    /// Fold `topic`'s events, JSON-decoded into `T`, with `apply`
    /// (given the state, the event and its envelope).
    pub fn on<T, F>(self, topic: impl IntoTopic, apply: F) -> Self
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
        F: Fn(&mut S, T, &Envelope) + Send + Sync + 'static,
    {
        self.on_with(topic, Json, apply)
    }

    /// [`Reducer::on`] decoding with `codec` (protobuf, Avro, your own).
    pub fn on_with<T, C, F>(mut self, topic: impl IntoTopic, codec: C, apply: F) -> Self
    where
        C: Codec<T>,
        F: Fn(&mut S, T, &Envelope) + Send + Sync + 'static,
    {
        let apply: Apply<S> = Arc::new(move |state: &mut S, env: &Envelope| {
            let event = codec.decode(env)?;
            std::panic::catch_unwind(AssertUnwindSafe(|| apply(state, event, env)))
                .map_err(|p| Error::new(ErrorKind::Internal, panic_message(&p)))
        });
        self.topics.push((topic.into_topic(), apply));
        self
    }

    /// Publish the state at most once per `window` (default 1 s), and only
    /// when it changed.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window.max(Duration::from_millis(1));
        self
    }

    /// Publish the state to `topic` (as [`StateUpdate`]); without it the
    /// state is only read in the process ([`ReducerHandle::state`]).
    pub fn publish_to(mut self, topic: impl IntoTopic) -> Self {
        self.output = Some(topic.into_topic());
        self
    }

    /// Stop on `shutdown` (shared with the rest of the service).
    pub fn shutdown_on(mut self, shutdown: Shutdown) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Delete the groups earlier runs left, subscribe to every topic from
    /// the earliest retained message and start replaying.
    pub async fn start(self) -> Result<ReducerHandle<S>> {
        let base = Name::new(self.name.as_str())?;
        let output = self.output.transpose()?;
        if self.topics.is_empty() {
            return Err(Error::new(
                ErrorKind::ConfigInvalid,
                format!("reducer {base}: no topics (add them with .on)"),
            ));
        }
        let mut topics = Vec::with_capacity(self.topics.len());
        for (t, apply) in self.topics {
            topics.push((t?, apply));
        }
        let run = uuid::Uuid::new_v4().simple().to_string();
        let shared = Arc::new(Shared::new(&base, self.initial, topics.len()));
        let mut reads = Vec::with_capacity(topics.len());
        for (i, (topic, apply)) in topics.into_iter().enumerate() {
            remove_leftovers(&self.bus, &base, &topic).await;
            let group = Name::new(format!("{base}.reducer-{}-{i}", &run[..12]))?;
            match subscribe(&self.bus, &shared, i, &topic, &group, apply, &self.shutdown).await {
                Ok(h) => reads.push(Read {
                    topic,
                    group,
                    handle: h,
                }),
                Err(e) => {
                    self.shutdown.trigger();
                    if let Err(left) = finish(&self.bus, reads).await {
                        tracing::warn!(reducer = %base, error = %left, "oona: a reducer that failed to start left a group");
                    }
                    return Err(e);
                }
            }
        }
        let progress = start_depths(&self.bus, &shared, &reads).await;
        let ticker = tokio::spawn(tick(
            self.bus.clone(),
            shared.clone(),
            progress,
            self.window,
            output.clone(),
            self.shutdown.clone(),
        ));
        Ok(ReducerHandle {
            bus: self.bus,
            shared,
            reads,
            output,
            ticker,
            shutdown: self.shutdown,
        })
    }
}

/// A started [`Reducer`].
#[derive(Debug)]
pub struct ReducerHandle<S> {
    bus: Bus,
    shared: Arc<Shared<S>>,
    reads: Vec<Read>,
    output: Option<Topic>,
    ticker: tokio::task::JoinHandle<()>,
    shutdown: Shutdown,
}

impl<S: Serialize + Send + 'static> ReducerHandle<S> {
    /// A copy of the state now.
    pub fn state(&self) -> S
    where
        S: Clone,
    {
        lock(&self.shared.state).clone()
    }

    /// Read the state now without copying it.
    pub fn read<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        f(&lock(&self.shared.state))
    }

    /// The counts so far.
    pub fn stats(&self) -> ReducerStats {
        self.shared.stats()
    }

    /// Wait until the history the topics held at start has been replayed.
    pub async fn rebuilt(&self) {
        let mut rx = self.shared.rebuilt.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Has the history the topics held at start been replayed?
    pub fn is_rebuilt(&self) -> bool {
        *self.shared.rebuilt.borrow()
    }

    /// The token the reducer stops on.
    pub fn shutdown_token(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Stop: the reads finish what they hold, the state is published one
    /// last time if it changed, and this run's groups are deleted.
    pub async fn shutdown(self) -> Result<ReducerStats> {
        self.shutdown.trigger();
        let _ = self.ticker.await;
        let joined = finish(&self.bus, self.reads).await;
        if let Some(out) = &self.output {
            if self.shared.is_rebuilt() {
                self.shared.publish_if_changed(&self.bus, out).await?;
            }
        }
        joined?;
        Ok(self.shared.stats())
    }
}

/// One topic's read: its group and runner.
#[derive(Debug)]
struct Read {
    topic: Topic,
    group: Name,
    handle: RunHandle,
}

/// What the reads, the ticker and the handle share.
struct Shared<S> {
    name: Name,
    state: Mutex<S>,
    /// Events taken (applied or skipped), per topic.
    taken: Vec<AtomicU64>,
    applied: AtomicU64,
    skipped: AtomicU64,
    published: AtomicU64,
    last_published: Mutex<Option<serde_json::Value>>,
    rebuilt: watch::Sender<bool>,
}

impl<S> std::fmt::Debug for Shared<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("name", &self.name).finish()
    }
}

impl<S: Serialize> Shared<S> {
    fn new(name: &Name, initial: S, topics: usize) -> Self {
        Shared {
            name: name.clone(),
            state: Mutex::new(initial),
            taken: (0..topics).map(|_| AtomicU64::new(0)).collect(),
            applied: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            published: AtomicU64::new(0),
            last_published: Mutex::new(None),
            rebuilt: watch::Sender::new(false),
        }
    }

    fn stats(&self) -> ReducerStats {
        ReducerStats {
            applied: self.applied.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            published: self.published.load(Ordering::Relaxed),
            rebuilt: self.is_rebuilt(),
        }
    }

    fn is_rebuilt(&self) -> bool {
        *self.rebuilt.borrow()
    }

    /// Fold one event of topic `i` in, or skip it with its reason.
    fn take(&self, i: usize, apply: &Apply<S>, env: &Envelope) {
        let outcome = apply(&mut lock(&self.state), env);
        match outcome {
            Ok(()) => self.applied.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                tracing::warn!(
                    reducer = %self.name,
                    topic = %env.topic,
                    event_id = %env.event_id,
                    error = %e,
                    "oona: reducer skipped an event"
                );
                self.skipped.fetch_add(1, Ordering::Relaxed)
            }
        };
        self.taken[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Publish the state to `out` if it differs from the last one sent.
    async fn publish_if_changed(&self, bus: &Bus, out: &Topic) -> Result<()> {
        let (state, events) = {
            let s = lock(&self.state);
            let v = serde_json::to_value(&*s)
                .map_err(|e| Error::new(ErrorKind::Encode, format!("reducer state: {e}")))?;
            (v, self.applied.load(Ordering::Relaxed))
        };
        if lock(&self.last_published).as_ref() == Some(&state) {
            return Ok(());
        }
        let update = StateUpdate {
            reducer: self.name.to_string(),
            state,
            events,
            at_unix_ms: Timestamp::now().unix_millis(),
        };
        bus.message(out.clone(), &update)
            .key(self.name.as_str())
            .schema_id(STATE_SCHEMA)
            .send()
            .await?;
        self.published.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_published) = Some(update.state);
        Ok(())
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    let what = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_string());
    format!("reduce function panicked: {what}")
}

/// Is `group` one of `base`'s run groups (`<base>.reducer-<12 hex>-<i>`)?
fn is_run_group(base: &Name, group: &Name) -> bool {
    let Some(rest) = group
        .as_str()
        .strip_prefix(base.as_str())
        .and_then(|r| r.strip_prefix(".reducer-"))
    else {
        return false;
    };
    match rest.split_once('-') {
        Some((run, i)) => {
            run.len() == 12
                && run.bytes().all(|b| b.is_ascii_hexdigit())
                && !i.is_empty()
                && i.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

/// Delete the groups of `base`'s earlier runs on `topic` that no consumer
/// reads any more (a run that was killed). Best effort: what cannot be
/// read or deleted now is logged and left for the next start.
async fn remove_leftovers(bus: &Bus, base: &Name, topic: &Topic) {
    let t = bus.transport();
    if !t.capabilities().admin {
        return;
    }
    let info = match t.describe_topic(topic).await {
        Ok(info) => info,
        Err(e) if e.kind() == ErrorKind::NotFound => return,
        Err(e) => {
            tracing::debug!(reducer = %base, %topic, error = %e, "oona: cannot list earlier runs' groups");
            return;
        }
    };
    for g in info.groups {
        if !is_run_group(base, &g.group) || !g.members.is_empty() {
            continue;
        }
        match t.delete_group(topic, &g.group).await {
            Ok(()) => tracing::info!(reducer = %base, %topic, group = %g.group,
                "oona: deleted a group an earlier run of the reducer left"),
            Err(e) => tracing::debug!(reducer = %base, %topic, group = %g.group, error = %e,
                "oona: an earlier run's group stays for now"),
        }
    }
}

/// Read topic `i` from the earliest through `group`, folding into `shared`.
async fn subscribe<S: Serialize + Send + 'static>(
    bus: &Bus,
    shared: &Arc<Shared<S>>,
    i: usize,
    topic: &Topic,
    group: &Name,
    apply: Apply<S>,
    shutdown: &Shutdown,
) -> Result<RunHandle> {
    let subscription =
        Subscription::new(topic.clone(), group.clone()).start(StartPosition::Earliest);
    let shared = shared.clone();
    Runner::new(bus.clone(), Ok(subscription), Raw)
        .shutdown_on(shutdown.clone())
        .start(move |msg: Incoming<Bytes>| {
            shared.take(i, &apply, msg.envelope());
            std::future::ready(Ok(()))
        })
        .await
}

/// Stop the reads and delete their groups; the first error is returned
/// after every group has been tried.
async fn finish(bus: &Bus, reads: Vec<Read>) -> Result<()> {
    let mut first = Ok(());
    for r in reads {
        let joined = r.handle.shutdown().await.map(|_| ());
        let deleted = delete_group_within(
            bus.transport().as_ref(),
            &r.topic,
            &r.group,
            Duration::from_secs(15),
        )
        .await;
        if first.is_ok() {
            first = joined.and(deleted);
        }
    }
    first
}

/// How a read tells it has caught up with what its topic held at start.
struct Progress {
    topic: Topic,
    group: Name,
    /// Caught up once `taken` reaches this: the depth right after start
    /// plus what had been taken by the time it was read. It errs late
    /// (what was taken but not yet acked counts twice), never early.
    /// `None` where the broker cannot tell a depth.
    target: Option<u64>,
    done: bool,
}

async fn start_depths<S: Serialize>(
    bus: &Bus,
    shared: &Shared<S>,
    reads: &[Read],
) -> Vec<Progress> {
    let mut out = Vec::with_capacity(reads.len());
    for (i, r) in reads.iter().enumerate() {
        let depth = bus.transport().depth(&r.topic, &r.group).await;
        let taken = shared.taken[i].load(Ordering::Relaxed);
        out.push(Progress {
            topic: r.topic.clone(),
            group: r.group.clone(),
            target: depth.ok().map(|d| taken + d.total()),
            done: false,
        });
    }
    out
}

/// Has every read caught up? A read is, once it took its target, or when
/// its group has nothing left unsettled (exact, for topics gone quiet);
/// where the broker tells no depth, after a window without events.
async fn caught_up<S: Serialize>(
    bus: &Bus,
    shared: &Shared<S>,
    progress: &mut [Progress],
    quiet: bool,
) -> bool {
    for (i, p) in progress.iter_mut().enumerate() {
        if p.done {
            continue;
        }
        let taken = shared.taken[i].load(Ordering::Relaxed);
        p.done = match p.target {
            Some(n) if taken >= n => true,
            Some(_) => matches!(bus.transport().depth(&p.topic, &p.group).await,
                Ok(d) if d.total() == 0),
            None => quiet,
        };
    }
    progress.iter().all(|p| p.done)
}

/// Mark the reducer rebuilt once it caught up, then publish the state
/// when it changed, at most once per window.
async fn tick<S: Serialize + Send + 'static>(
    bus: Bus,
    shared: Arc<Shared<S>>,
    mut progress: Vec<Progress>,
    window: Duration,
    output: Option<Topic>,
    shutdown: Shutdown,
) {
    let check = window.min(Duration::from_millis(100));
    let mut last_taken: u64 = 0;
    let mut quiet_since = tokio::time::Instant::now();
    let mut last_publish: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.triggered() => return,
            _ = tokio::time::sleep(check) => {}
        }
        if !shared.is_rebuilt() {
            let total: u64 = shared.taken.iter().map(|t| t.load(Ordering::Relaxed)).sum();
            if total != last_taken {
                (last_taken, quiet_since) = (total, tokio::time::Instant::now());
            }
            let quiet = quiet_since.elapsed() >= window;
            if !caught_up(&bus, &shared, &mut progress, quiet).await {
                continue;
            }
            shared.rebuilt.send_replace(true);
        }
        let due = last_publish.is_none_or(|at| at.elapsed() >= window);
        if let (Some(out), true) = (&output, due) {
            last_publish = Some(tokio::time::Instant::now());
            if let Err(e) = shared.publish_if_changed(&bus, out).await {
                tracing::warn!(reducer = %shared.name, error = %e, "oona: publishing the reducer's state failed; trying again next window");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_groups_are_told_apart() {
        let base = Name::new("fleet").unwrap();
        let yes = |g: &str| is_run_group(&base, &Name::new(g).unwrap());
        assert!(yes("fleet.reducer-0123456789ab-0"));
        assert!(yes("fleet.reducer-0123456789ab-12"));
        // Another reducer whose name starts the same, other groups.
        assert!(!yes("fleet-x.reducer-0123456789ab-0"));
        assert!(!yes("fleet.reducer-0123456789ab"));
        assert!(!yes("fleet.reducer-0123456789xy-0"));
        assert!(!yes("fleet.reducer-0123456789ab-0a"));
        assert!(!yes("fleet"));
    }
}
