//! The `tezzeret` binary on each genuine broker: blueprints submitted
//! while it compiles, SIGTERM mid-stream, a second instance finishing the
//! rest. Every valid blueprint is compiled exactly once (nothing in flight
//! lost, nothing handled twice), every invalid one dead-lettered once, and
//! each kernel carries its blueprint's correlation id and causation.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use oona::context::CAUSATION_ID;
use oona::oona_contracts::{BlueprintCompiled, BlueprintSubmitted, Message};
use oona::rules::DeadLetterInfo;
use oona::{Bus, Name};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

const BLUEPRINTS: usize = 120;
const INVALID_EVERY: usize = 30;
const WAIT: Duration = Duration::from_secs(60);

/// A running `tezzeret` and the log lines it wrote so far.
struct Instance {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Instance {
    /// Start one with `OONA_URL=url` in group `group`, and wait until it
    /// serves (its routes subscribed).
    async fn start(url: &str, group: &str, node: &str) -> Instance {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tezzeret"))
            .env("OONA_URL", url)
            .env("OONA_SERVICE_NAME", group)
            .env("OONA_NODE_ID", node)
            .env("OONA_CONCURRENCY", "4")
            .env("TEZZERET_WORK_PER_OP", "4ms")
            .env("RUST_LOG", "info")
            .env_remove("OONA_METRICS_ADDR")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start tezzeret");
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let keep = log.clone();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("node serving") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                keep.lock().unwrap().push(line);
            }
        });
        let mut me = Instance { child, log };
        if tokio::time::timeout(WAIT, rx).await.is_err() {
            let _ = me.child.kill().await;
            panic!("tezzeret did not start serving:\n{}", me.log());
        }
        me
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGTERM, then wait for a clean exit.
    async fn terminate(mut self) -> String {
        let pid = self.child.id().expect("running").to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(killed.success());
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("tezzeret did not stop on SIGTERM:\n{}", self.log()))
            .expect("wait");
        // The stderr reader ends with the process; give it a moment.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let log = self.log();
        assert_eq!(
            status.code(),
            Some(0),
            "tezzeret exited with {status}:\n{log}"
        );
        assert!(log.contains("tezzeret stopped"), "no stop log:\n{log}");
        log
    }
}

fn blueprint(run: &str, i: usize) -> BlueprintSubmitted {
    let ops = ["conv2d", "batch_norm", "relu", "residual_add", "linear"];
    let mut graph: Vec<&str> = ops.iter().take(2 + i % 4).copied().collect();
    if i % INVALID_EVERY == 0 {
        graph.push("quantum_conv");
    }
    BlueprintSubmitted {
        blueprint_id: format!("bp-{run}-{i:04}"),
        name: format!("bp-{i}"),
        submitted_by: "urza".into(),
        metadata: [("ops".to_string(), graph.join(","))].into(),
        ..Default::default()
    }
}

async fn sigterm_mid_stream(url: &str) {
    let run = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
    let group = format!("tezzeret-{run}");
    let bus = Bus::new(oona::connect(url).await.unwrap()).with_sender_id("urza-test");
    let submitted = BlueprintSubmitted::topic();
    for t in [
        &submitted,
        &BlueprintCompiled::topic(),
        &submitted.dead_letter(),
    ] {
        bus.ensure_topic(t).await.unwrap();
    }
    // Our own groups, from the latest position, before anything is sent.
    let mut kernels = bus
        .subscribe_contract::<BlueprintCompiled>(format!("urza-{run}"))
        .await
        .unwrap();
    let mut dead = bus
        .subscribe_raw((submitted.dead_letter(), format!("audit-{run}")))
        .await
        .unwrap();

    let mut first = Some(Instance::start(url, &group, &format!("a-{run}")).await);
    // Urza submits while Tezzeret compiles: one every 10 ms.
    let publisher = {
        let (bus, run) = (bus.clone(), run.clone());
        tokio::spawn(async move {
            for i in 1..=BLUEPRINTS {
                bus.message_contract(&blueprint(&run, i))
                    .key(format!("bp-{i}"))
                    .correlation_id(run.clone())
                    .send()
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    let mut compiled: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // SIGTERM once a quarter is compiled, while blueprints still arrive.
    let mut first_log = None;
    let mut second = None;
    let valid = (1..=BLUEPRINTS).filter(|i| i % INVALID_EVERY != 0).count();
    while compiled.values().map(Vec::len).sum::<usize>() < valid {
        let d = tokio::time::timeout(WAIT, kernels.next())
            .await
            .expect("no kernel in time")
            .expect("stream ended")
            .unwrap();
        let (env, k) = (d.envelope().clone(), d.value().clone());
        d.ack().await.unwrap();
        if env.correlation_id.as_deref() != Some(run.as_str()) {
            continue; // another run's
        }
        assert!(env.header(CAUSATION_ID).is_some(), "{env:?}");
        compiled
            .entry(k.blueprint_id)
            .or_default()
            .push(k.compiled_by);
        if compiled.len() == BLUEPRINTS / 4 {
            if let Some(first) = first.take() {
                first_log = Some(first.terminate().await);
                // What was in flight is settled; the rest waits in the group
                // for the next instance.
                second = Some(Instance::start(url, &group, &format!("b-{run}")).await);
            }
        }
    }
    publisher.await.unwrap();
    // Anything handled twice would show up now.
    let quiet = tokio::time::timeout(Duration::from_secs(3), kernels.next()).await;
    if let Ok(Some(Ok(d))) = quiet {
        assert_ne!(
            d.envelope().correlation_id.as_deref(),
            Some(run.as_str()),
            "a kernel after all were in: {:?}",
            d.value()
        );
    }
    let second_log = second
        .expect("the first instance was stopped")
        .terminate()
        .await;

    let twice: Vec<_> = compiled.iter().filter(|(_, by)| by.len() > 1).collect();
    assert!(twice.is_empty(), "compiled twice: {twice:?}");
    let expected: BTreeSet<String> = (1..=BLUEPRINTS)
        .filter(|i| i % INVALID_EVERY != 0)
        .map(|i| blueprint(&run, i).blueprint_id)
        .collect();
    assert_eq!(compiled.keys().cloned().collect::<BTreeSet<_>>(), expected);
    let by: BTreeSet<String> = compiled
        .values()
        .flatten()
        .map(|s| s[..s.len() - 8].to_string())
        .collect();
    assert_eq!(by.len(), 1, "one service name: {by:?}");
    let per_instance: BTreeMap<String, usize> =
        compiled
            .values()
            .flatten()
            .fold(BTreeMap::new(), |mut m, s| {
                *m.entry(s.clone()).or_default() += 1;
                m
            });
    assert_eq!(
        per_instance.len(),
        2,
        "both instances compiled: {per_instance:?}"
    );
    // Each instance's own count, logged at its stop, is what we received
    // from it: nothing it acked was lost on the way.
    let first_log = first_log.unwrap_or_default();
    let logged = |log: &str| -> usize {
        let at = log.find("compiled=").expect("a stop summary") + "compiled=".len();
        log[at..]
            .split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("a count")
    };
    let mut counts: Vec<usize> = per_instance.values().copied().collect();
    let mut logs = vec![logged(&first_log), logged(&second_log)];
    counts.sort_unstable();
    logs.sort_unstable();
    assert_eq!(counts, logs, "{per_instance:?}");

    // The invalid ones: dead-lettered once each, with the reason.
    let mut reasons = BTreeMap::new();
    while reasons.len() < BLUEPRINTS / INVALID_EVERY {
        let d = tokio::time::timeout(WAIT, dead.next())
            .await
            .expect("no dead letter in time")
            .expect("stream ended")
            .unwrap();
        if let Some(info) = DeadLetterInfo::parse(d.envelope()) {
            if info.original.correlation_id.as_deref() == Some(run.as_str()) {
                let prev =
                    reasons.insert(info.original.key.clone().unwrap_or_default(), info.reason);
                assert!(prev.is_none(), "dead-lettered twice");
            }
        }
        d.ack().await.unwrap();
    }
    assert!(
        reasons.values().all(|r| r.contains("quantum_conv")),
        "{reasons:?}"
    );
    println!(
        "tezzeret on {url}: {per_instance:?}\nfirst instance:\n{}\nsecond instance:\n{second_log}",
        first_log
    );
    // Leave no groups behind on the broker.
    for (t, g) in [
        (BlueprintCompiled::topic(), format!("urza-{run}")),
        (submitted.clone(), group),
        (submitted.dead_letter(), format!("audit-{run}")),
    ] {
        let _ = bus
            .transport()
            .delete_group(&t, &Name::new(g).unwrap())
            .await;
    }
}

macro_rules! on_broker {
    ($name:ident, $var:literal) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            if let Some(url) = oona_conformance::url_of($var) {
                sigterm_mid_stream(&url).await;
            }
        }
    };
}

on_broker!(redis, "OONA_TEST_REDIS_URL");
on_broker!(kafka, "OONA_TEST_KAFKA_URL");
on_broker!(pulsar, "OONA_TEST_PULSAR_URL");
