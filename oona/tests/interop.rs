//! Interop with Python services that use only their broker's official
//! client (redis-py, confluent-kafka, pulsar-client): on each genuine
//! broker, messages written by `scripts/interop/oona_interop.py` per the
//! documented wire format reach Oona with every field and payload byte
//! intact, Oona's messages are read and parsed by Python, a message written
//! the way a Python service naturally would keeps its key, and a record
//! that is no envelope is dead-lettered with a reason while the consumer
//! goes on.
//!
//! Needs `OONA_TEST_PYTHON` (the venv of `scripts/python-venv.sh`) and the
//! broker URLs of `scripts/brokers.sh`; `scripts/test.sh` sets them all.
//! With `OONA_TEST_REQUIRE=1` a missing one fails the test.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt as _;
use oona::{
    ContentType, DeliveryStream, Envelope, EventId, Name, Priority, StartPosition, Subscription,
    Timestamp, Topic, Transport,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
const COUNT: usize = 5;

/// The variable's value, or `None` (the test then does nothing) when it
/// is unset and not required.
fn env(name: &str) -> Option<String> {
    oona_conformance::url_of(name).map(|v| v.trim().to_string())
}

/// A broker under test and how to reach it from Rust and from Python.
struct Side {
    broker: &'static str,
    url: String,
    python: PathBuf,
}

impl Side {
    fn of(broker: &'static str, url_var: &str) -> Option<Side> {
        Some(Side {
            broker,
            url: env(url_var)?,
            python: PathBuf::from(env("OONA_TEST_PYTHON")?),
        })
    }

    /// Run `oona_interop.py CMD` and return its `messages`.
    async fn python(&self, cmd: &str, topic: &str, extra: &[&str]) -> Vec<Value> {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/interop/oona_interop.py"
        );
        let mut c = std::process::Command::new(&self.python);
        c.arg(script)
            .args([
                cmd,
                "--broker",
                self.broker,
                "--url",
                &self.url,
                "--topic",
                topic,
            ])
            .args(extra);
        let what = format!("{cmd} on {} ({topic})", self.broker);
        let out = tokio::task::spawn_blocking(move || c.output())
            .await
            .expect("python task")
            .unwrap_or_else(|e| panic!("{what}: cannot run python: {e}"));
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{what}: stdout is not JSON ({e}); stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert!(
            out.status.success(),
            "{what} failed: {}; stderr:\n{}",
            doc["error"],
            String::from_utf8_lossy(&out.stderr)
        );
        doc["messages"].as_array().cloned().unwrap_or_default()
    }

    async fn connect(&self) -> Arc<dyn Transport> {
        oona::connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url))
    }
}

fn topic(plane: &str) -> Topic {
    Topic::new(format!(
        "{plane}.interop{}.t",
        uuid::Uuid::new_v4().simple()
    ))
    .unwrap()
}

fn text(m: &Value, field: &str) -> Option<String> {
    m[field].as_str().map(str::to_string)
}

fn bytes_b64(m: &Value, field: &str) -> Vec<u8> {
    let s = m[field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} in {m}"));
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_else(|e| panic!("{field} is not base64: {e}"))
}

/// The envelope a message printed by `oona_interop.py` is (or must decode
/// to).
fn envelope_of(m: &Value) -> Envelope {
    let need = |f: &str| text(m, f).unwrap_or_else(|| panic!("no {f} in {m}"));
    let topic = Topic::new(need("topic")).expect("topic");
    let mut e = Envelope::builder(topic, bytes_b64(m, "payload_b64"))
        .event_id(EventId::parse(need("event_id")).expect("event id"))
        .sender_id(need("sender_id"))
        .timestamp(Timestamp::parse_rfc3339(&need("timestamp")).expect("timestamp"))
        .content_type(ContentType::new(need("content_type")))
        .priority(Priority::parse(&need("priority")).expect("priority"))
        .build();
    e.trace_id = text(m, "trace_id");
    e.correlation_id = text(m, "correlation_id");
    e.key = text(m, "key");
    e.schema_id = text(m, "schema_id");
    e.headers = m["headers"]
        .as_object()
        .map(|h| {
            h.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default();
    e
}

/// Every field set, as Oona publishes it for Python to read.
fn full_envelope(topic: &Topic, i: usize) -> Envelope {
    Envelope::builder(
        topic.clone(),
        format!("{{\"seq\":{i},\"text\":\"Grüße from Oona ✓\"}}"),
    )
    .sender_id("oona-interop")
    .key(format!("seed-{}", i % 2))
    .correlation_id(format!("corr-{i}"))
    .schema_id("esper.InteropProbe/1")
    .priority(Priority::Emergency)
    .header("x-origin", "rust ✓")
    .header("ce_custom", "escaped on kafka")
    .build()
}

async fn subscribe(t: &Arc<dyn Transport>, topic: &Topic, group: &str) -> DeliveryStream {
    let sub = Subscription::new(topic.clone(), Name::unique(group))
        .start(StartPosition::Earliest)
        .ack_deadline(Duration::from_secs(60));
    t.subscribe(sub).await.expect("subscribe")
}

/// `n` deliveries, acked, by event id.
async fn receive(s: &mut DeliveryStream, n: usize, what: &str) -> HashMap<String, Envelope> {
    let mut got = HashMap::new();
    while got.len() < n {
        let d = match tokio::time::timeout(WAIT, s.next()).await {
            Ok(Some(Ok(d))) => d,
            Ok(Some(Err(e))) if e.is_temporary() => continue,
            Ok(other) => panic!("{what}: stream gave {other:?}"),
            Err(_) => panic!("{what}: {} of {n} within {WAIT:?}", got.len()),
        };
        let e = d.envelope().clone();
        d.ack().await.expect("ack");
        got.insert(e.event_id.as_str().to_string(), e);
    }
    got
}

/// Python writes, Oona reads: every field and payload byte as written.
async fn python_to_oona(side: &Side, t: &Arc<dyn Transport>, cmd: &str) {
    let topic = topic("telemetry");
    let mut s = subscribe(t, &topic, "py2oona").await;
    let written = side
        .python(cmd, topic.as_str(), &["--count", &COUNT.to_string()])
        .await;
    assert_eq!(written.len(), COUNT, "{cmd} wrote {}", written.len());
    let got = receive(&mut s, COUNT, cmd).await;
    for m in &written {
        let want = envelope_of(m);
        let id = want.event_id.as_str();
        let have = got
            .get(id)
            .unwrap_or_else(|| panic!("{cmd}: {id} not received"));
        assert_eq!(have, &want, "{} {cmd}: envelope differs", side.broker);
        if cmd == "produce-natural" {
            assert!(
                have.key.is_some(),
                "{}: the natural key is lost",
                side.broker
            );
        }
    }
}

/// Oona writes, Python reads and parses per the docs.
async fn oona_to_python(side: &Side, t: &Arc<dyn Transport>) {
    let topic = topic("control");
    t.ensure_topic(&topic, oona::PolicySet::default().for_topic(&topic))
        .await
        .expect("ensure topic");
    let sent: Vec<Envelope> = (0..COUNT).map(|i| full_envelope(&topic, i)).collect();
    for e in &sent {
        t.publish(e.clone()).await.expect("publish");
    }
    let read = side
        .python("consume", topic.as_str(), &["--count", &COUNT.to_string()])
        .await;
    let by_id: HashMap<String, Envelope> = read
        .iter()
        .map(envelope_of)
        .map(|e| (e.event_id.as_str().to_string(), e))
        .collect();
    for e in &sent {
        let got = by_id.get(e.event_id.as_str()).unwrap_or_else(|| {
            panic!(
                "{}: python did not read {}",
                side.broker,
                e.event_id.as_str()
            )
        });
        assert_eq!(
            got, e,
            "{}: python parsed a different envelope",
            side.broker
        );
    }
}

/// A record that is no envelope goes to `<topic>.dlq` with a decode reason;
/// the consumer goes on with the next good message.
async fn garbage_dead_lettered(side: &Side, t: &Arc<dyn Transport>) {
    let topic = topic("compilation");
    let mut s = subscribe(t, &topic, "garbage").await;
    let raw = side.python("produce-garbage", topic.as_str(), &[]).await;
    let good = side
        .python("produce", topic.as_str(), &["--count", "1"])
        .await;
    let got = receive(&mut s, 1, "the good message after garbage").await;
    let want = envelope_of(&good[0]);
    assert_eq!(got.get(want.event_id.as_str()), Some(&want));
    let dlq = format!("{topic}.dlq");
    let dead = side.python("consume", &dlq, &["--count", "1"]).await;
    let info = &dead[0]["dlq"];
    let reason = info["oona-dlq-reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("decode"),
        "{}: dead letter reason {reason:?}",
        side.broker
    );
    assert_eq!(
        info["oona-dlq-original-topic"].as_str(),
        Some(topic.as_str())
    );
    let kept = bytes_b64(&dead[0], "payload_b64");
    let raw = bytes_b64(&raw[0], "raw_b64");
    match side.broker {
        // A Kafka dead letter carries the record's bytes as they were.
        "kafka" => assert_eq!(kept, raw),
        // Pulsar and Redis keep the whole raw entry as one JSON document
        // (properties or fields beside the payload; see each README).
        broker => {
            let doc: Value = serde_json::from_slice(&kept).expect("raw entry JSON");
            if broker == "pulsar" {
                let b64 = doc["payload_base64"].as_str().expect("payload_base64");
                let back = base64::engine::general_purpose::STANDARD.decode(b64);
                assert_eq!(back.ok(), Some(raw));
            } else {
                assert!(doc["payload"].is_string(), "redis raw entry {doc}");
            }
        }
    }
}

async fn interop(broker: &'static str, url_var: &str) {
    let Some(side) = Side::of(broker, url_var) else {
        return;
    };
    let t = side.connect().await;
    python_to_oona(&side, &t, "produce").await;
    python_to_oona(&side, &t, "produce-natural").await;
    oona_to_python(&side, &t).await;
    garbage_dead_lettered(&side, &t).await;
    t.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_and_python() {
    interop("redis", "OONA_TEST_REDIS_URL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_and_python() {
    interop("kafka", "OONA_TEST_KAFKA_URL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulsar_and_python() {
    interop("pulsar", "OONA_TEST_PULSAR_URL").await;
}
