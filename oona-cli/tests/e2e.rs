//! The installed `oona` binary against each genuine broker: publish (an
//! argument, stdin, lines), tail with filters, groups, dead letters (list,
//! inspect, requeue, purge), replay into another topic, topics, health,
//! bench, and the exit codes of bad input.
//!
//! The binary is `OONA_CLI_BIN` (what `scripts/test.sh` installs with
//! `cargo install`), else the one cargo built for this test.

use std::process::Stdio;
use std::time::Duration;

use futures::StreamExt as _;
use oona::{Bus, DeliveryStream, Name, StartPosition, Subscription, Topic};
use serde_json::Value;
use tokio::io::AsyncWriteExt as _;

fn bin() -> String {
    std::env::var("OONA_CLI_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_oona").to_string())
}

#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "exit {}: {}", self.code, self.stderr);
        self
    }
    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect()
    }
}

/// Run `oona --url URL ARGS` with `stdin`, within a minute.
async fn oona(url: Option<&str>, args: &[&str], stdin: &str) -> Run {
    let mut cmd = tokio::process::Command::new(bin());
    cmd.env_remove("OONA_URL").arg("--color").arg("never");
    if let Some(u) = url {
        cmd.arg("--url").arg(u);
    }
    let mut child = cmd
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", bin()));
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("oona {args:?} did not finish"))
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn fresh(plane: &str, event: &str) -> Topic {
    let id = uuid::Uuid::new_v4().simple().to_string();
    Topic::new(format!("{plane}.cli{}.{event}", &id[..12])).unwrap()
}

async fn next(s: &mut DeliveryStream) -> oona::Delivery {
    tokio::time::timeout(Duration::from_secs(30), s.next())
        .await
        .expect("no delivery within 30 s")
        .expect("stream ended")
        .unwrap()
}

async fn scenario(url: &str) {
    let u = Some(url);
    let bus = Bus::new(oona::connect(url).await.unwrap()).with_sender_id("cli-e2e");
    let topic = fresh("compilation", "submitted");
    let t = topic.as_str();

    // The worker group exists before anything is published.
    let worker = Name::new("e2e-worker").unwrap();
    let sub = Subscription::new(topic.clone(), worker.clone()).start(StartPosition::Earliest);
    let mut stream = bus.subscribe_raw(sub).await.unwrap();

    // publish: an argument, stdin, lines.
    let one = oona(
        u,
        &[
            "publish",
            t,
            r#"{"n":1}"#,
            "--key",
            "k1",
            "--header",
            "region=eu",
            "--json",
        ],
        "",
    )
    .await
    .ok();
    let first_id = one.json_lines()[0]["event_id"]
        .as_str()
        .unwrap()
        .to_string();
    oona(u, &["publish", t, "--key", "k2"], "{\"n\": 2}\n")
        .await
        .ok();
    let lines = oona(
        u,
        &["publish", t, "--lines", "--json"],
        "{\"n\":3}\n\n{\"n\":4}\n",
    )
    .await
    .ok();
    assert_eq!(lines.json_lines().len(), 2, "{}", lines.stdout);

    // Bad input: clear errors and the documented codes.
    let bad = oona(u, &["publish", "Not A.topic", "{}"], "").await;
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("invalid topic"), "{}", bad.stderr);
    let bad = oona(u, &["publish", t, "{not json"], "").await;
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("not JSON"), "{}", bad.stderr);
    let none = oona(
        u,
        &["topics", "describe", fresh("telemetry", "never").as_str()],
        "",
    )
    .await;
    assert_eq!(none.code, 3, "{none:?}");
    // Reading never creates a topic; a replay into itself never ends.
    let never = fresh("telemetry", "never");
    let none = oona(u, &["tail", never.as_str(), "--idle", "1s"], "").await;
    assert_eq!(none.code, 3, "{none:?}");
    let same = oona(u, &["replay", t, "--to-topic", t], "").await;
    assert_eq!(same.code, 2, "{same:?}");

    // tail: the key filter, JSON in the wire form with the delivery.
    let tail = oona(
        u,
        &[
            "tail", t, "--from", "earliest", "--json", "--idle", "5s", "--key", "k1",
        ],
        "",
    )
    .await
    .ok();
    let got = tail.json_lines();
    assert_eq!(got.len(), 1, "{}", tail.stdout);
    assert_eq!(got[0]["payload"]["n"], 1);
    assert_eq!(got[0]["envelope"]["headers"]["region"], "eu");
    assert_eq!(got[0]["envelope"]["event_id"], first_id.as_str());
    assert!(got[0]["delivery"]["position"].is_string(), "{}", got[0]);
    let pretty = oona(
        u,
        &[
            "tail", t, "--from", "earliest", "--idle", "5s", "--limit", "4",
        ],
        "",
    )
    .await
    .ok();
    assert!(
        pretty.stdout.contains("key=k1") && pretty.stdout.contains(r#"{"n":4}"#),
        "{}",
        pretty.stdout
    );
    assert!(pretty.stderr.contains("4 shown"), "{}", pretty.stderr);

    // The worker rejects 2 and 3 (dead letters) and acks the rest.
    let mut rejected = Vec::new();
    for _ in 0..4 {
        let d = next(&mut stream).await;
        let n: Value = serde_json::from_slice(&d.envelope().payload).unwrap();
        if n["n"] == 2 || n["n"] == 3 {
            rejected.push(d.envelope().event_id.to_string());
            d.reject("e2e reject: bad blueprint").await.unwrap();
        } else {
            d.ack().await.unwrap();
        }
    }

    // groups: the worker, settled; the CLI's own groups are gone.
    let groups = poll(|| async {
        let g = oona(u, &["groups", t, "--json"], "").await.ok();
        let lines = g.json_lines();
        let done = lines
            .iter()
            .any(|l| l["group"] == "e2e-worker" && l["depth"]["total"] == 0);
        done.then_some(lines)
    })
    .await;
    assert!(
        groups
            .iter()
            .all(|l| !l["group"].as_str().unwrap().starts_with("oona-cli")),
        "a reading group was left behind: {groups:?}"
    );

    // dlq list / inspect.
    let dlq = topic.dead_letter();
    let listed = poll(|| async {
        let l = oona(u, &["dlq", "list", "--json"], "").await.ok();
        let row = l
            .json_lines()
            .into_iter()
            .find(|r| r["topic"] == dlq.as_str())?;
        row["messages"]
            .as_u64()
            .is_none_or(|n| n == 2)
            .then_some(row)
    })
    .await;
    assert_eq!(listed["original_topic"], t);
    let inspect = oona(u, &["dlq", "inspect", t, "--json", "--idle", "5s"], "")
        .await
        .ok();
    let letters = inspect.json_lines();
    assert_eq!(letters.len(), 2, "{}", inspect.stdout);
    for l in &letters {
        assert_eq!(l["reason"], "e2e reject: bad blueprint");
        assert_eq!(l["group"], "e2e-worker");
        assert_eq!(l["original_topic"], t);
        assert!(
            rejected.contains(&l["event_id"].as_str().unwrap().to_string()),
            "{l}"
        );
    }

    // requeue one by id: the worker gets the original envelope again, at
    // attempt 1; an unknown id is a partial failure.
    let again = oona(
        u,
        &["dlq", "requeue", t, "--id", &rejected[0], "--idle", "5s"],
        "",
    )
    .await
    .ok();
    assert!(
        again.stdout.contains(&format!("requeued {}", rejected[0])),
        "{}",
        again.stdout
    );
    let d = next(&mut stream).await;
    assert_eq!(d.envelope().event_id.to_string(), rejected[0]);
    assert_eq!(d.attempt(), 1);
    assert_eq!(d.envelope().key.as_deref(), Some("k2"));
    // Dead-lettered again: the log holds it twice, requeue takes it once.
    d.reject("e2e reject: bad blueprint").await.unwrap();
    let all = [
        "dlq",
        "requeue",
        t,
        "--all",
        "--dry-run",
        "--json",
        "--idle",
        "5s",
    ];
    let dry = poll(|| async {
        let r = oona(u, &all, "").await.ok();
        r.stderr.contains("(1 older copies").then_some(r)
    })
    .await;
    assert_eq!(dry.json_lines().len(), 2, "{}", dry.stdout);
    // Requeued again, it comes back once more.
    oona(
        u,
        &["dlq", "requeue", t, "--id", &rejected[0], "--idle", "5s"],
        "",
    )
    .await
    .ok();
    let d = next(&mut stream).await;
    assert_eq!(d.envelope().event_id.to_string(), rejected[0]);
    d.ack().await.unwrap();
    let missing = oona(
        u,
        &[
            "dlq",
            "requeue",
            t,
            "--id",
            "00000000-0000-4000-8000-000000000000",
            "--idle",
            "5s",
        ],
        "",
    )
    .await;
    assert_eq!(missing.code, 5, "{missing:?}");

    // replay into another topic, at a rate.
    let copy = fresh("compilation", "copy");
    oona(
        u,
        &[
            "replay",
            t,
            "--to-topic",
            copy.as_str(),
            "--rate",
            "50",
            "--idle",
            "5s",
        ],
        "",
    )
    .await
    .ok();
    let copied = oona(
        u,
        &[
            "tail",
            copy.as_str(),
            "--from",
            "earliest",
            "--json",
            "--idle",
            "5s",
        ],
        "",
    )
    .await
    .ok();
    let copies = copied.json_lines();
    assert_eq!(
        copies.len(),
        6,
        "four published and one requeued twice: {}",
        copied.stdout
    );
    assert!(copies
        .iter()
        .all(|c| c["envelope"]["headers"]["oona-replayed-from"]
            .as_str()
            .unwrap()
            .starts_with(t)));

    // topics.
    let listed = oona(u, &["topics", "list", "--json"], "").await.ok();
    let names: Vec<String> = listed
        .json_lines()
        .iter()
        .map(|l| l["topic"].as_str().unwrap().to_string())
        .collect();
    assert!(
        names.contains(&t.to_string()) && names.contains(&copy.to_string()),
        "{names:?}"
    );
    let described = oona(u, &["topics", "describe", t, "--json"], "").await.ok();
    let d = &described.json_lines()[0];
    assert!(
        d["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["group"] == "e2e-worker"),
        "{d}"
    );
    assert!(d["messages"].as_u64().is_none_or(|n| n == 6), "{d}");
    let busy = oona(u, &["bench", "--topic", t, "--messages", "10"], "").await;
    assert_eq!(
        busy.code, 2,
        "bench refuses a topic with messages: {busy:?}"
    );
    let applied = oona(u, &["topics", "apply-retention", t, "--json"], "")
        .await
        .ok();
    let a = &applied.json_lines()[0];
    assert_eq!(a["retention"], "7d", "{a}");
    assert!(a["applied"].is_null() || a["applied"] == "7d", "{a}");

    // purge: refused without --yes off a terminal, then done.
    let refused = oona(u, &["dlq", "purge", t], "").await;
    assert_eq!(refused.code, 2, "{refused:?}");
    oona(u, &["dlq", "purge", t, "--yes"], "").await.ok();
    poll(|| async {
        let r = oona(u, &["topics", "describe", dlq.as_str()], "").await;
        (r.code == 3).then_some(())
    })
    .await;

    // health and bench.
    let h = oona(u, &["health", "--json"], "").await.ok();
    assert_eq!(h.json_lines()[0]["status"], "up");
    let b = oona(
        u,
        &["bench", "--messages", "200", "--batch", "20", "--json"],
        "",
    )
    .await
    .ok();
    let fig = &b.json_lines()[0];
    assert_eq!(fig["consumed"], 200, "{fig}");
    assert!(fig["end_to_end_ms"]["p99"].as_f64().unwrap() > 0.0, "{fig}");

    stream.close().await;
    for t in [&topic, &copy] {
        let _ = bus.transport().delete_topic(t).await;
    }
    bus.close().await.unwrap();
}

/// Run `f` until it gives a value, for up to 30 s (brokers update their
/// records asynchronously).
async fn poll<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < until, "never held");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis() {
    if let Some(url) = oona_conformance::url_of("OONA_TEST_REDIS_URL") {
        scenario(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka() {
    if let Some(url) = oona_conformance::url_of("OONA_TEST_KAFKA_URL") {
        scenario(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulsar() {
    if let Some(url) = oona_conformance::url_of("OONA_TEST_PULSAR_URL") {
        scenario(&url).await;
    }
}

#[tokio::test]
async fn without_a_broker() {
    let none = oona(None, &["health"], "").await;
    assert_eq!(none.code, 2, "{none:?}");
    assert!(none.stderr.contains("OONA_URL"), "{}", none.stderr);
    let bad = oona(Some("nope://x"), &["health"], "").await;
    assert_eq!(bad.code, 2, "{bad:?}");
    let doc = oona(None, &["asyncapi"], "").await.ok();
    let v: Value = serde_json::from_str(&doc.stdout).unwrap();
    assert_eq!(v["asyncapi"], "3.0.0");
    assert_eq!(
        v["channels"]["compilation.blueprint.submitted"]["address"],
        "compilation.blueprint.submitted"
    );
    let help = oona(None, &["dlq", "requeue", "--help"], "").await.ok();
    assert!(
        help.stdout.contains("Examples:") && help.stdout.contains("--all"),
        "{}",
        help.stdout
    );
}
