//! The reducer on every transport: three topics folded into one state,
//! published on change, an event that does not decode skipped; the groups
//! an earlier run left are deleted at start and a run's own at shutdown.
//! On each genuine broker the reducer runs as a process of its own
//! (this test binary run again): killed with SIGKILL while events arrive
//! and started again, it rebuilds the same state by replaying from the
//! earliest, each event counted once.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use oona::reducer::{Reducer, ReducerHandle, StateUpdate, STATE_SCHEMA};
use oona::{Bus, Envelope, Name, StartPosition, Subscription, Topic, TypedSubscription};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, BufReader};

#[macro_use]
mod common;

const GUARD: Duration = Duration::from_secs(90);

/// The fleet as the reducer sees it. Every fold is insensitive to how a
/// replay interleaves the topics: the health of highest `seq` per seed,
/// losses counted per seed, the highest epoch.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Fleet {
    health: BTreeMap<String, (u64, f64)>,
    losses: BTreeMap<String, u64>,
    epoch: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Health {
    seed: String,
    seq: u64,
    score: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Loss {
    seed: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Epoch {
    n: u64,
}

/// The three topics of one test run.
#[derive(Clone)]
struct Topics {
    health: Topic,
    loss: Topic,
    epoch: Topic,
    state: Topic,
}

impl Topics {
    fn new(run: &str) -> Self {
        let t = |e: &str| Topic::new(format!("telemetry.reduce{run}.{e}")).unwrap();
        Topics {
            health: t("health"),
            loss: t("loss"),
            epoch: t("epoch"),
            state: t("fleet"),
        }
    }
}

fn reducer(bus: &Bus, name: &str, t: &Topics) -> Reducer<Fleet> {
    Reducer::new(bus, name, Fleet::default())
        .on(t.health.clone(), |f: &mut Fleet, h: Health, _| {
            let e = f.health.entry(h.seed).or_insert((0, 0.0));
            if h.seq > e.0 {
                *e = (h.seq, h.score);
            }
        })
        .on(t.loss.clone(), |f: &mut Fleet, l: Loss, _| {
            *f.losses.entry(l.seed).or_default() += 1
        })
        .on(t.epoch.clone(), |f: &mut Fleet, e: Epoch, _| {
            f.epoch = f.epoch.max(e.n)
        })
        .window(Duration::from_millis(100))
        .publish_to(t.state.clone())
}

/// Events `from..to` of a run, the same on every call; `expect` folds
/// them as the reducer should.
#[derive(Default)]
struct Script {
    expect: Fleet,
}

impl Script {
    fn events(&mut self, t: &Topics, from: u64, to: u64) -> Vec<Envelope> {
        let mut out = Vec::new();
        for i in from..to {
            let seed = format!("seed-{}", i % 7);
            let env = match i % 3 {
                0 => {
                    let h = Health {
                        seed: seed.clone(),
                        seq: i,
                        score: (i % 100) as f64 / 100.0,
                    };
                    let e = self.expect.health.entry(seed.clone()).or_insert((0, 0.0));
                    if h.seq > e.0 {
                        *e = (h.seq, h.score);
                    }
                    json(&t.health, &h, &seed)
                }
                1 => {
                    *self.expect.losses.entry(seed.clone()).or_default() += 1;
                    json(&t.loss, &Loss { seed: seed.clone() }, &seed)
                }
                _ => {
                    self.expect.epoch = self.expect.epoch.max(i / 10);
                    json(&t.epoch, &Epoch { n: i / 10 }, &seed)
                }
            };
            out.push(env);
        }
        out
    }
}

fn json<T: Serialize>(t: &Topic, v: &T, key: &str) -> Envelope {
    Envelope::builder(t.clone(), serde_json::to_vec(v).unwrap())
        .content_type(oona::ContentType::json())
        .key(key)
        .build()
}

/// An event of the loss topic that does not decode as a `Loss`.
fn undecodable(t: &Topics) -> Envelope {
    json(&t.loss, &serde_json::json!({"not": "a loss"}), "seed-0")
}

async fn publish(bus: &Bus, events: Vec<Envelope>) {
    for chunk in events.chunks(50) {
        bus.publish_envelopes(chunk.to_vec()).await.unwrap();
    }
}

/// A reader of the state topic from its earliest message.
async fn watch_state(bus: &Bus, t: &Topics) -> TypedSubscription<StateUpdate<Fleet>> {
    let s = Subscription::new(t.state.clone(), watcher(t)).start(StartPosition::Earliest);
    bus.subscribe::<StateUpdate<Fleet>>(s).await.unwrap()
}

/// The next update on the state topic.
async fn next_update(states: &mut TypedSubscription<StateUpdate<Fleet>>) -> StateUpdate<Fleet> {
    let d = tokio::time::timeout(GUARD, states.next())
        .await
        .expect("no state update")
        .expect("state stream ended")
        .unwrap();
    assert_eq!(d.envelope().schema_id.as_deref(), Some(STATE_SCHEMA));
    let u = d.value().clone();
    d.ack().await.unwrap();
    u
}

/// Read updates until one carries `want` after `events` events.
async fn wait_for_state(
    states: &mut TypedSubscription<StateUpdate<Fleet>>,
    want: &Fleet,
    events: u64,
) -> StateUpdate<Fleet> {
    loop {
        let u = next_update(states).await;
        if &u.state == want && u.events == events {
            return u;
        }
    }
}

/// The first update of a run other than `after` (skipping those of
/// `after`): a run publishes nothing before its replay is done, so its
/// first update carries the whole history.
async fn first_of_next_run(
    states: &mut TypedSubscription<StateUpdate<Fleet>>,
    after: Option<&str>,
) -> StateUpdate<Fleet> {
    loop {
        let u = next_update(states).await;
        if Some(u.run.as_str()) != after {
            return u;
        }
    }
}

/// The watcher's group: a run's own (Kafka deletes a group whole, with
/// every topic it reads).
fn watcher(t: &Topics) -> Name {
    Name::new(format!("watcher-{}", t.state.as_str().replace('.', "-"))).unwrap()
}

/// Delete the watcher's group.
async fn close_watcher(bus: &Bus, t: &Topics, states: TypedSubscription<StateUpdate<Fleet>>) {
    drop(states);
    let group = watcher(t);
    let within = Duration::from_secs(15);
    oona::admin::delete_group_within(bus.transport().as_ref(), &t.state, &group, within)
        .await
        .unwrap();
}

/// The groups on `t`'s topics that belong to runs of reducer `name`.
async fn run_groups(bus: &Bus, t: &Topics, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for topic in [&t.health, &t.loss, &t.epoch] {
        let info = bus.transport().describe_topic(topic).await.unwrap();
        out.extend(
            info.groups
                .iter()
                .map(|g| g.group.to_string())
                .filter(|g| g.starts_with(&format!("{name}.reducer-"))),
        );
    }
    out
}

async fn in_process(url: &str) {
    let bus = Bus::new(oona::connect(url).await.unwrap()).with_sender_id("oona-reducer-test");
    let run = uuid::Uuid::new_v4().simple().to_string();
    let t = Topics::new(&run[..8]);
    for topic in [&t.health, &t.loss, &t.epoch, &t.state] {
        bus.ensure_topic(topic.clone()).await.unwrap();
    }
    let mut states = watch_state(&bus, &t).await;
    // A group an earlier run left behind (killed: nobody reads it).
    let left = Name::new("fleet.reducer-0123456789ab-1").unwrap();
    let stream = bus
        .subscribe_raw(Subscription::new(t.loss.clone(), left.clone()))
        .await
        .unwrap();
    stream.close().await;
    assert_eq!(run_groups(&bus, &t, "fleet").await, vec![left.to_string()]);
    // Until the broker counts its consumer gone (Redis: idle past a
    // margin), a start leaves it alone.
    tokio::time::timeout(GUARD, async {
        loop {
            let info = bus.transport().describe_topic(&t.loss).await.unwrap();
            if info
                .groups
                .iter()
                .any(|g| g.group == left && g.members.is_empty())
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the leftover group's consumer never counted as gone");

    let mut script = Script::default();
    let mut history = script.events(&t, 0, 150);
    history.insert(40, undecodable(&t));
    publish(&bus, history).await;

    // The same topic twice is refused.
    let twice = reducer(&bus, "fleet", &t)
        .on(t.loss.clone(), |_: &mut Fleet, _: Loss, _| {})
        .start()
        .await
        .unwrap_err();
    assert_eq!(twice.kind(), oona::ErrorKind::ConfigInvalid, "{twice}");

    let first = reducer(&bus, "fleet", &t).start().await.unwrap();
    rebuilt(&first).await;
    assert_eq!(first.state(), script.expect, "state after the replay");
    let mine = run_groups(&bus, &t, "fleet").await;
    assert_eq!(
        mine.len(),
        3,
        "the leftover is gone, this run's three remain: {mine:?}"
    );
    assert!(!mine.contains(&left.to_string()));
    // Its first update is the whole history: no partial state went out.
    let update = first_of_next_run(&mut states, None).await;
    assert_eq!((&update.state, update.events), (&script.expect, 150));

    // Live events change the state, and it is published again.
    publish(&bus, script.events(&t, 150, 240)).await;
    wait_for_state(&mut states, &script.expect, 240).await;
    let stats = stop(first).await;
    assert_eq!((stats.applied, stats.skipped), (240, 1));
    assert!(
        run_groups(&bus, &t, "fleet").await.is_empty(),
        "shutdown deletes the run's groups"
    );

    // Started again: the same state, from the earliest. With a window of
    // an hour, what it applies after its first update goes out at
    // shutdown.
    let second = reducer(&bus, "fleet", &t)
        .window(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    rebuilt(&second).await;
    assert_eq!(second.state(), script.expect, "state after the restart");
    let update = first_of_next_run(&mut states, Some(&update.run)).await;
    assert_eq!((&update.state, update.events), (&script.expect, 240));
    publish(&bus, script.events(&t, 240, 270)).await;
    let applied = tokio::time::timeout(GUARD, async {
        while second.stats().applied < 270 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    applied.await.expect("the live events were not applied");
    let stats = stop(second).await;
    assert_eq!((stats.applied, stats.skipped), (270, 1));
    let last = next_update(&mut states).await;
    assert_eq!((&last.state, last.events), (&script.expect, 270));
    close_watcher(&bus, &t, states).await;
    bus.close().await.unwrap();
}

async fn rebuilt(r: &ReducerHandle<Fleet>) {
    if tokio::time::timeout(GUARD, r.rebuilt()).await.is_err() {
        panic!("not rebuilt: {:?}", r.stats());
    }
}

async fn stop(r: ReducerHandle<Fleet>) -> oona::reducer::ReducerStats {
    tokio::time::timeout(GUARD, r.shutdown())
        .await
        .expect("reducer shutdown")
        .unwrap()
}

on_every_transport!(in_process);

/// The reducer as a process: this test binary, run again with
/// `OONA_REDUCER_CHILD` set, runs [`reducer_process`].
struct Process {
    child: tokio::process::Child,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Process {
    async fn start(url: &str, run: &str) -> Process {
        let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "reducer_process", "--nocapture"])
            .env("OONA_REDUCER_CHILD", format!("{url} {run}"))
            .env_remove("OONA_METRICS_ADDR")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut p = Process { child, stdout };
        p.line("started").await;
        p
    }

    /// Wait for a line of the child starting with `prefix`.
    async fn line(&mut self, prefix: &str) -> String {
        let found = tokio::time::timeout(GUARD, async {
            while let Some(line) = self.stdout.next_line().await.unwrap() {
                if line.starts_with(prefix) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!("the reducer process wrote no {prefix:?} line"),
        }
    }

    /// Close its stdin: it shuts down gracefully and prints its stats.
    async fn stop(mut self) -> String {
        drop(self.child.stdin.take());
        let line = self.line("stats").await;
        let status = tokio::time::timeout(GUARD, self.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "the reducer process exited with {status}");
        line
    }
}

/// Run by [`Process`] only: a reducer until stdin closes. Prints
/// `started`, `rebuilt` and, at the end, `stats applied=.. skipped=..`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run as a child process by the killed_and_restarted tests"]
async fn reducer_process() {
    let Ok(arg) = std::env::var("OONA_REDUCER_CHILD") else {
        panic!("run by the killed_and_restarted tests, with OONA_REDUCER_CHILD set");
    };
    let (url, run) = arg.split_once(' ').unwrap();
    let bus = Bus::new(oona::connect(url).await.unwrap());
    let r = reducer(&bus, "fleet", &Topics::new(run))
        .start()
        .await
        .unwrap();
    println!("started");
    r.rebuilt().await;
    println!("rebuilt");
    // Stop when the parent closes stdin (a blocking read, off the runtime).
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await
    .unwrap();
    let stats = r.shutdown().await.unwrap();
    println!("stats applied={} skipped={}", stats.applied, stats.skipped);
    bus.close().await.unwrap();
}

async fn killed_and_restarted(url: &str) {
    let bus = Bus::new(oona::connect(url).await.unwrap()).with_sender_id("oona-reducer-test");
    let run = uuid::Uuid::new_v4().simple().to_string();
    let run = &run[..8];
    let t = Topics::new(run);
    for topic in [&t.health, &t.loss, &t.epoch, &t.state] {
        bus.ensure_topic(topic.clone()).await.unwrap();
    }
    let mut states = watch_state(&bus, &t).await;
    let mut script = Script::default();
    let mut history = script.events(&t, 0, 300);
    history.insert(100, undecodable(&t));
    publish(&bus, history).await;

    let mut first = Process::start(url, run).await;
    first.line("rebuilt").await;
    let update = first_of_next_run(&mut states, None).await;
    assert_eq!((&update.state, update.events), (&script.expect, 300));

    // Events arrive while it folds them; SIGKILL half-way.
    for from in (300..600).step_by(30) {
        publish(&bus, script.events(&t, from, from + 30)).await;
        if from == 450 {
            first.child.kill().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Started again, it replays everything: its first update is the state
    // the events say, each of the 600 counted once, the bad one skipped.
    let second = Process::start(url, run).await;
    let update = first_of_next_run(&mut states, Some(&update.run)).await;
    assert_eq!(update.reducer, "fleet");
    assert_eq!((&update.state, update.events), (&script.expect, 600));
    let stats = second.stop().await;
    assert_eq!(stats, "stats applied=600 skipped=1");
    close_watcher(&bus, &t, states).await;
    bus.close().await.unwrap();
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted() {
    if let Some(url) = common::url_of("OONA_TEST_REDIS_URL") {
        killed_and_restarted(&url).await;
    }
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_killed_and_restarted() {
    if let Some(url) = common::url_of("OONA_TEST_KAFKA_URL") {
        killed_and_restarted(&url).await;
    }
}

#[cfg(feature = "pulsar")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulsar_killed_and_restarted() {
    if let Some(url) = common::url_of("OONA_TEST_PULSAR_URL") {
        killed_and_restarted(&url).await;
    }
}
