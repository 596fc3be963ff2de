//! State aggregated from several topics, published on change and rebuilt
//! from history after a restart: [`Reducer`].
//!
//! A reducer folds the events of its topics into one state `S` with a
//! function per topic. The state lives in the process: every start replays
//! the topics from the earliest retained message (event sourcing), so a
//! reducer killed and started again comes back to the same state, then
//! follows the topics live. Once it has caught up with what the topics held
//! at its start ([`ReducerHandle::rebuilt`]), it publishes its state when
//! events changed it, at most once per aggregation window; nothing is
//! published before (no partial state of a replay goes out).
//!
//! "The same state" holds as far as the topics retain their events: a
//! reducer's topics want a retention that keeps all of them (the
//! `innovation` plane's, [`oona_core::Retention::Indefinite`]),
//! not `telemetry`'s 72 hours. A start replays the whole history; there are
//! no snapshots yet.
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
//! assert!(fleet.rebuilt().await); // the event published above is in
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
//! reducer deletes those that have no consumer left, before it subscribes
//! (on Kafka a killed member stays until its session times out: a later
//! start deletes its group). Run one instance per reducer name (replicas
//! take names of their own: each holds the whole state).
//!
//! **Each event once.** A run remembers the event ids it applied (10
//! minutes, in the process): a redelivery within the run (a lost ack, a
//! lease run out) or a copy published again is not folded in twice.
//!
//! **Bad events.** An event that does not decode, or whose reduce function
//! panics, is skipped: logged at `warn` with its id and reason and counted in
//! [`ReducerStats::skipped`]. It stays in the topic (the topic's own groups
//! dead-letter it), so a replay meets it again and skips it again. A
//! function that panics half-way leaves what it changed before the panic:
//! check an event before changing the state.
//!
//! **Wire form.** The state goes out as JSON [`StateUpdate`] (schema id
//! [`STATE_SCHEMA`], key: the reducer's name):
//! `{"reducer": "nissa-fleet", "run": "3f2a...", "state": {...}, "events": 1042, "at_unix_ms": 1764000000000}`,
//! where `events` counts the events this run applied since it started from
//! the earliest (so equal states of two runs carry equal counts).

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
use oona_core::dedup::DedupLayer;

/// The schema id of the state a reducer publishes.
pub const STATE_SCHEMA: &str = "oona.v1.ReducerState/1";

/// What a reducer publishes when its state changed (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateUpdate<S> {
    /// The reducer's name.
    pub reducer: String,
    /// The run that published it (each start is a new run, its `events`
    /// counted from 0).
    pub run: String,
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
            std::panic::catch_unwind(AssertUnwindSafe(|| apply(state, event, env))).map_err(|p| {
                let what = crate::runner::panic_message(p.as_ref());
                Error::new(
                    ErrorKind::Internal,
                    format!("reduce function panicked: {what}"),
                )
            })
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

    /// Stop reading when `shutdown` (the service's token) is triggered;
    /// [`ReducerHandle::shutdown`] still finishes (the last publish, the
    /// groups deleted). A reducer that fails to start does not trigger it.
    pub fn shutdown_on(mut self, shutdown: Shutdown) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Delete the groups earlier runs left, subscribe to every topic from
    /// the earliest retained message and start replaying.
    pub async fn start(self) -> Result<ReducerHandle<S>> {
        let base = Name::new(self.name.as_str())?;
        let output = self.output.transpose()?;
        let run = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let mut topics = Vec::with_capacity(self.topics.len());
        for (i, (t, apply)) in self.topics.into_iter().enumerate() {
            let t = t?;
            if topics.iter().any(|(seen, _, _)| seen == &t) {
                return Err(config_error(&base, format!("{t} is given twice")));
            }
            let group = Name::new(format!("{base}.reducer-{run}-{i}"))?;
            topics.push((t, group, apply));
        }
        if topics.is_empty() {
            return Err(config_error(&base, "no topics (add them with .on)".into()));
        }
        // Before this run subscribes anywhere: its own groups cannot be
        // taken for leftovers.
        for (t, _, _) in &topics {
            remove_leftovers(&self.bus, &base, t).await;
        }
        let stop = Shutdown::new();
        let forward = tokio::spawn(forward(self.shutdown, stop.clone()));
        let shared = Arc::new(Shared::new(&base, &run, self.initial, topics.len()));
        // One record of the event ids this run applied: a redelivery (a
        // lost ack, a lease run out) is not folded in twice.
        let dedup = DedupLayer::new(DEDUP_KEEP);
        let mut reads = Vec::with_capacity(topics.len());
        for (i, (topic, group, apply)) in topics.into_iter().enumerate() {
            let read = Read { topic, group };
            match read
                .subscribe(&self.bus, &shared, i, apply, &dedup, &stop)
                .await
            {
                Ok(h) => reads.push((read, h)),
                Err(e) => {
                    // Only this reducer's reads stop, not the service.
                    stop.trigger();
                    forward.abort();
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
            stop.clone(),
        ));
        Ok(ReducerHandle {
            bus: self.bus,
            shared,
            reads,
            output,
            ticker,
            forward,
            stop,
        })
    }
}

/// How long a run remembers the event ids it applied (redeliveries come
/// within an ack deadline or a few).
const DEDUP_KEEP: Duration = Duration::from_secs(600);

fn config_error(base: &Name, what: String) -> Error {
    Error::new(ErrorKind::ConfigInvalid, format!("reducer {base}: {what}"))
}

/// Stop the reducer's reads when the service's token is triggered.
async fn forward(service: Shutdown, reducer: Shutdown) {
    service.triggered().await;
    reducer.trigger();
}

/// A started [`Reducer`]. Dropping it leaves the reads running: stop it
/// with [`ReducerHandle::shutdown`].
#[derive(Debug)]
#[must_use = "a reducer runs until .shutdown()"]
pub struct ReducerHandle<S> {
    bus: Bus,
    shared: Arc<Shared<S>>,
    reads: Vec<(Read, RunHandle)>,
    output: Option<Topic>,
    ticker: tokio::task::JoinHandle<()>,
    forward: tokio::task::JoinHandle<()>,
    stop: Shutdown,
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

    /// Wait until the history the topics held at start has been replayed:
    /// `true` then, `false` if the reducer stopped first.
    pub async fn rebuilt(&self) -> bool {
        let mut rx = self.shared.rebuilt.subscribe();
        tokio::select! {
            done = rx.wait_for(|done| *done) => done.is_ok(),
            _ = self.stop.triggered() => self.is_rebuilt(),
        }
    }

    /// Has the history the topics held at start been replayed?
    pub fn is_rebuilt(&self) -> bool {
        *self.shared.rebuilt.borrow()
    }

    /// Stop: the reads finish what they hold, the state is published one
    /// last time if events were applied since the last update, and this
    /// run's groups are deleted. The first error is returned after all
    /// of that has been tried.
    pub async fn shutdown(self) -> Result<ReducerStats> {
        self.stop.trigger();
        self.forward.abort();
        if let Err(e) = self.ticker.await {
            tracing::error!(reducer = %self.shared.name, error = %e, "oona: the reducer's ticker panicked");
        }
        let finished = finish(&self.bus, self.reads).await;
        let published = match &self.output {
            Some(out) if self.shared.is_rebuilt() => {
                self.shared.publish_if_changed(&self.bus, out).await
            }
            _ => Ok(()),
        };
        finished.and(published)?;
        Ok(self.shared.stats())
    }
}

/// One topic's read: the topic and this run's group on it.
#[derive(Debug)]
struct Read {
    topic: Topic,
    group: Name,
}

/// What the reads, the ticker and the handle share.
struct Shared<S> {
    name: Name,
    run: String,
    state: Mutex<S>,
    /// Events taken (applied or skipped), per topic.
    taken: Vec<AtomicU64>,
    applied: AtomicU64,
    skipped: AtomicU64,
    published: AtomicU64,
    /// The state and event count last published.
    last_published: Mutex<Option<(serde_json::Value, u64)>>,
    rebuilt: watch::Sender<bool>,
}

impl<S> std::fmt::Debug for Shared<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("name", &self.name).finish()
    }
}

impl<S: Serialize> Shared<S> {
    fn new(name: &Name, run: &str, initial: S, topics: usize) -> Self {
        Shared {
            name: name.clone(),
            run: run.to_string(),
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

    /// Fold one event of topic `i` in, or skip it with its reason. The
    /// counts change under the state's lock, so a snapshot sees both
    /// together.
    fn take(&self, i: usize, apply: &Apply<S>, env: &Envelope) {
        let mut state = lock(&self.state);
        match apply(&mut state, env) {
            Ok(()) => {
                self.applied.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    reducer = %self.name,
                    topic = %env.topic,
                    event_id = %env.event_id,
                    error = %e,
                    "oona: reducer skipped an event"
                );
            }
        }
        self.taken[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Publish the state to `out` if events were applied since the last
    /// one sent and the state or its count differ.
    async fn publish_if_changed(&self, bus: &Bus, out: &Topic) -> Result<()> {
        let snapshot = {
            let s = lock(&self.state);
            let v = serde_json::to_value(&*s)
                .map_err(|e| Error::new(ErrorKind::Encode, format!("reducer state: {e}")))?;
            (v, self.applied.load(Ordering::Relaxed))
        };
        if lock(&self.last_published).as_ref() == Some(&snapshot) {
            return Ok(());
        }
        let update = StateUpdate {
            reducer: self.name.to_string(),
            run: self.run.clone(),
            state: snapshot.0,
            events: snapshot.1,
            at_unix_ms: Timestamp::now().unix_millis(),
        };
        bus.message(out.clone(), &update)
            .key(self.name.as_str())
            .schema_id(STATE_SCHEMA)
            .send()
            .await?;
        self.published.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_published) = Some((update.state, update.events));
        Ok(())
    }
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

impl Read {
    /// Read topic `i` from the earliest, folding into `shared`.
    async fn subscribe<S: Serialize + Send + 'static>(
        &self,
        bus: &Bus,
        shared: &Arc<Shared<S>>,
        i: usize,
        apply: Apply<S>,
        dedup: &DedupLayer,
        stop: &Shutdown,
    ) -> Result<RunHandle> {
        let subscription = Subscription::new(self.topic.clone(), self.group.clone())
            .start(StartPosition::Earliest);
        let shared = shared.clone();
        Runner::new(bus.clone(), Ok(subscription), Raw)
            .layer(dedup.clone())
            .shutdown_on(stop.clone())
            .start(move |msg: Incoming<Bytes>| {
                shared.take(i, &apply, msg.envelope());
                std::future::ready(Ok(()))
            })
            .await
    }
}

/// Stop the reads and delete their groups; the first error is returned
/// after every group has been tried.
async fn finish(bus: &Bus, reads: Vec<(Read, RunHandle)>) -> Result<()> {
    let mut first = Ok(());
    for (r, handle) in reads {
        let joined = handle.shutdown().await.map(|_| ());
        let within = Duration::from_secs(15);
        let deleted =
            delete_group_within(bus.transport().as_ref(), &r.topic, &r.group, within).await;
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
    target: Target,
    /// `taken` when the depth was last read.
    last_taken: u64,
    done: bool,
}

enum Target {
    /// Caught up once `taken` reaches this: the first depth read plus
    /// what had been taken when it was read. It errs late (what was taken
    /// but not yet acked counts twice), and early only where a broker caps
    /// its count (Redis without a group lag: 10,000 past the group).
    Taken(u64),
    /// No depth read yet (the last read failed): read again.
    Retry,
    /// The broker tells no depth: a quiet spell tells.
    Unknown,
}

/// The shortest quiet spell that tells a read without depth caught up.
const QUIET_MIN: Duration = Duration::from_secs(2);

impl Progress {
    async fn new(bus: &Bus, read: &Read, taken: &AtomicU64) -> Progress {
        let mut p = Progress {
            topic: read.topic.clone(),
            group: read.group.clone(),
            target: Target::Retry,
            last_taken: 0,
            done: false,
        };
        p.measure(bus, taken).await;
        p
    }

    /// Read the group's depth: done when nothing is left unsettled; the
    /// first depth read sets the target.
    async fn measure(&mut self, bus: &Bus, taken: &AtomicU64) {
        let depth = bus.transport().depth(&self.topic, &self.group).await;
        let now = taken.load(Ordering::Relaxed);
        self.last_taken = now;
        match depth {
            Ok(d) => {
                self.done = d.total() == 0;
                if !matches!(self.target, Target::Taken(_)) {
                    self.target = Target::Taken(now + d.total());
                }
            }
            Err(e) if e.kind() == ErrorKind::Unsupported => self.target = Target::Unknown,
            Err(e) => {
                tracing::debug!(topic = %self.topic, error = %e, "oona: reducer: reading a depth failed; trying again");
            }
        }
    }

    /// Look again (each check while rebuilding): done once the target is
    /// reached; the depth is read again when nothing was taken since the
    /// last look (a quiet topic: is it all settled?) or after a failed read.
    async fn check(&mut self, bus: &Bus, taken: &AtomicU64, quiet_for: Duration) {
        if self.done {
            return;
        }
        let now = taken.load(Ordering::Relaxed);
        match self.target {
            Target::Unknown => self.done = quiet_for >= QUIET_MIN,
            Target::Taken(n) if now >= n => self.done = true,
            Target::Taken(_) if now != self.last_taken => self.last_taken = now,
            _ => self.measure(bus, taken).await,
        }
    }
}

async fn start_depths<S: Serialize>(
    bus: &Bus,
    shared: &Shared<S>,
    reads: &[(Read, RunHandle)],
) -> Vec<Progress> {
    let mut out = Vec::with_capacity(reads.len());
    for (i, (r, _)) in reads.iter().enumerate() {
        out.push(Progress::new(bus, r, &shared.taken[i]).await);
    }
    out
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
            let quiet_for = quiet_since.elapsed();
            for (i, p) in progress.iter_mut().enumerate() {
                p.check(&bus, &shared.taken[i], quiet_for).await;
            }
            if !progress.iter().all(|p| p.done) {
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
