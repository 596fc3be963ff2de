//! Tests that run their own `redis-server` (so they can restart it): a
//! restart with AOF loses nothing and acks nothing twice, and retention
//! really trims on the server.
//!
//! The binaries come from `OONA_TEST_REDIS_SERVER` / `OONA_TEST_REDIS8_SERVER`
//! (written to target/brokers.env by `scripts/brokers.sh up`), else
//! `redis-server` on the PATH. Without any binary the tests fail.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use oona_core::{
    Envelope, Name, PolicySet, Retention, StartPosition, Subscription, Topic, TopicPolicy,
    Transport,
};
use oona_redis::{RedisConfig, RedisTransport};

struct Server {
    bin: String,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Server {
    fn start(bin: &str, name: &str) -> Server {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("oona-redis-{name}-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Server {
            bin: bin.to_string(),
            port,
            dir,
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new(&self.bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", self.dir.to_str().unwrap()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(["--logfile", "redis.log"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin));
        self.child = Some(child);
        for _ in 0..200 {
            if let Ok(c) = redis::Client::open(self.url()) {
                if let Ok(mut conn) = c.get_connection() {
                    if redis::cmd("PING").query::<String>(&mut conn).is_ok() {
                        return;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{} did not answer on port {}", self.bin, self.port);
    }

    /// SIGTERM (Redis flushes the AOF and exits), then wait for it.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn raw(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn binaries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (name, var) in [
        ("redis7", "OONA_TEST_REDIS_SERVER"),
        ("redis8", "OONA_TEST_REDIS8_SERVER"),
    ] {
        if let Ok(b) = std::env::var(var) {
            if !b.trim().is_empty() {
                out.push((name.to_string(), b.trim().to_string()));
            }
        }
    }
    if out.is_empty() {
        out.push(("path".to_string(), "redis-server".to_string()));
    }
    out
}

fn env(t: &Topic, i: usize) -> Envelope {
    Envelope::builder(t.clone(), format!("{{\"i\":{i}}}"))
        .sender_id("restart-test")
        .header("i", i.to_string())
        .build()
}

fn pending(conn: &mut redis::Connection, key: &str, group: &str) -> i64 {
    let v: redis::Value = redis::cmd("XPENDING")
        .arg(key)
        .arg(group)
        .query(conn)
        .unwrap();
    match v {
        redis::Value::Array(a) => match a.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => 0,
        },
        _ => 0,
    }
}

async fn publish_retrying(bus: &RedisTransport, e: Envelope) -> usize {
    let mut failures = 0;
    loop {
        match bus.publish(e.clone()).await {
            Ok(_) => return failures,
            Err(err) => {
                assert!(err.is_temporary(), "publish failed for good: {err}");
                failures += 1;
                assert!(failures < 400, "publish kept failing: {err}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_with_aof_loses_nothing_and_acks_nothing_twice() {
    for (name, bin) in binaries() {
        restart_case(&name, &bin).await;
    }
}

async fn restart_case(name: &str, bin: &str) {
    let mut server = Server::start(bin, name);
    let bus = RedisTransport::connect_url(&server.url()).await.unwrap();
    let topic = Topic::new(format!("control.restart.{name}")).unwrap();
    let group = Name::new("workers").unwrap();
    let sub = Subscription::new(topic.clone(), group.clone())
        .start(StartPosition::Earliest)
        .ack_deadline(Duration::from_secs(2))
        .max_attempts(10);
    let mut stream = bus.subscribe(sub).await.unwrap();

    let mut sent = Vec::new();
    for i in 0..100 {
        let e = env(&topic, i);
        sent.push(e.event_id.to_string());
        bus.publish(e).await.unwrap();
    }
    // Take all 100 (none waits in the prefetch buffer across the restart,
    // where its deadline would rightly run out): ack 80, hold 20 unsettled.
    let mut acked: HashSet<String> = HashSet::new();
    let mut held = Vec::new();
    for _ in 0..100 {
        let d = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("delivery before the restart")
            .unwrap()
            .unwrap();
        if acked.len() < 80 {
            acked.insert(d.envelope().event_id.to_string());
            d.ack().await.unwrap();
        } else {
            held.push(d);
        }
    }
    let key = bus.stream_key(&topic);
    let mut raw = server.raw();
    for _ in 0..200 {
        if pending(&mut raw, &key, group.as_str()) == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        pending(&mut raw, &key, group.as_str()),
        20,
        "acks written before the restart"
    );
    drop(raw);

    server.stop();
    // Publishing while the server is down fails with a temporary error;
    // the publisher retries until the server is back.
    let bus2 = bus.clone();
    let topic2 = topic.clone();
    let more: Vec<Envelope> = (100..150).map(|i| env(&topic2, i)).collect();
    sent.extend(more.iter().map(|e| e.event_id.to_string()));
    let publisher = tokio::spawn(async move {
        let mut failures = 0;
        for e in more {
            failures += publish_retrying(&bus2, e).await;
        }
        failures
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.spawn();
    let failures = publisher.await.unwrap();
    let held_ids: HashSet<String> = held
        .iter()
        .map(|d| d.envelope().event_id.to_string())
        .collect();
    drop(held); // unsettled: they come back after the ack deadline

    // Everything not acked before the restart arrives; nothing acked does.
    let want: HashSet<String> = sent
        .iter()
        .filter(|id| !acked.contains(*id))
        .cloned()
        .collect();
    let mut seen: HashMap<String, u32> = HashMap::new();
    while seen.len() < want.len() {
        let item = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{name}: got {} of {} after the restart",
                    seen.len(),
                    want.len()
                )
            })
            .expect("stream open");
        let Ok(d) = item else { continue }; // temporary: reconnecting
        let id = d.envelope().event_id.to_string();
        assert!(
            !acked.contains(&id),
            "{name}: {id} was acked before the restart and came again"
        );
        if let Some(first) = seen.insert(id.clone(), d.attempt()) {
            panic!(
                "{name}: {id} delivered twice after the restart: attempt {first}, then attempt {} at {:?}; held before: {}",
                d.attempt(),
                d.info().position,
                held_ids.contains(&id)
            );
        }
        d.ack().await.unwrap();
    }
    assert_eq!(seen.keys().cloned().collect::<HashSet<_>>(), want);
    // The 20 held across the restart come back as attempt 2.
    assert_eq!(
        seen.values().filter(|a| **a == 2).count(),
        20,
        "{name}: {seen:?}"
    );
    bus.close().await.unwrap();
    let mut raw = server.raw();
    assert_eq!(
        pending(&mut raw, &key, group.as_str()),
        0,
        "{name}: acks flushed on close"
    );
    let len: i64 = redis::cmd("XLEN").arg(&key).query(&mut raw).unwrap();
    assert_eq!(len, 150, "{name}: every publish stored exactly once");
    eprintln!(
        "{name}: restart survived; {failures} publish attempts failed while the server was down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_trims_on_the_server_by_time() {
    let (name, bin) = binaries().remove(0);
    let server = Server::start(&bin, &format!("{name}-retention"));
    let policies = PolicySet::default().with_plane(
        "telemetry",
        TopicPolicy::new(Retention::For(Duration::from_secs(1))),
    );
    let cfg = RedisConfig::from_url(&server.url())
        .unwrap()
        .with_policies(policies)
        .with_housekeeping(Duration::ZERO);
    let bus = RedisTransport::connect(cfg).await.unwrap();
    let short = Topic::new("telemetry.retention.short").unwrap();
    let forever = Topic::new("innovation.retention.forever").unwrap();
    let batch = |t: &Topic, n: usize| (0..n).map(|i| env(t, i)).collect::<Vec<_>>();
    // An unacked subscriber: retention is by time, not by acks.
    let _s = bus
        .subscribe(
            Subscription::new(short.clone(), Name::new("slow").unwrap())
                .start(StartPosition::Earliest),
        )
        .await
        .unwrap();
    bus.publish_batch(batch(&short, 250)).await.unwrap();
    bus.publish_batch(batch(&forever, 250)).await.unwrap();
    let mut raw = server.raw();
    let xlen = |raw: &mut redis::Connection, t: &Topic| -> i64 {
        redis::cmd("XLEN")
            .arg(bus.stream_key(t))
            .query(raw)
            .unwrap()
    };
    let policy: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(bus.policy_key(&short))
        .query(&mut raw)
        .unwrap();
    assert_eq!(policy.get("retention_ms").map(String::as_str), Some("1000"));
    assert_eq!(
        xlen(&mut raw, &short),
        250,
        "inside retention nothing is trimmed"
    );

    tokio::time::sleep(Duration::from_millis(1300)).await;
    // XADD's MINID ~ trims whole nodes of old entries on the next write.
    bus.publish(env(&short, 999)).await.unwrap();
    let after_xadd = xlen(&mut raw, &short);
    assert!(
        after_xadd < 251,
        "XADD MINID ~ trimmed nothing ({after_xadd} entries)"
    );
    // Housekeeping trims exactly, and leaves the fresh entry.
    let removed = bus.housekeep().await.unwrap();
    assert_eq!(xlen(&mut raw, &short), 1, "housekeeping removed {removed}");
    // The indefinite plane keeps everything.
    assert_eq!(xlen(&mut raw, &forever), 250);
    let forever_policy: Option<i64> = redis::cmd("HGET")
        .arg(bus.policy_key(&forever))
        .arg("retention_ms")
        .query(&mut raw)
        .unwrap();
    assert_eq!(forever_policy, Some(-1));
    bus.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_entries_and_delayed_nacks_across_consumers() {
    let (name, bin) = binaries().remove(0);
    let server = Server::start(&bin, &format!("{name}-foreign"));
    let topic = Topic::new("control.foreign.commands").unwrap();
    let group = Name::new("kasmina").unwrap();
    let a = RedisTransport::connect_url(&server.url()).await.unwrap();
    let sub = |consumer: &str| {
        Subscription::new(topic.clone(), group.clone())
            .consumer(Name::new(consumer).unwrap())
            .start(StartPosition::Earliest)
            // Far beyond the nack delay: a redelivery before it means the
            // delay, not the deadline, brought the entry back.
            .ack_deadline(Duration::from_secs(60))
    };
    let mut sa = a.subscribe(sub("a")).await.unwrap();

    // What a Python service with plain redis-py writes (README example).
    let mut raw = server.raw();
    let _: String = redis::cmd("XADD")
        .arg(a.stream_key(&topic))
        .arg("*")
        .arg("event_id")
        .arg("py-1")
        .arg("sender_id")
        .arg("python-worker")
        .arg("timestamp")
        .arg("2025-07-07T09:55:13.123456+00:00")
        .arg("h.traceparent")
        .arg("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .arg("payload")
        .arg(&b"{\"layer\":3}"[..])
        .query(&mut raw)
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), sa.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(d.envelope().event_id.as_str(), "py-1");
    assert_eq!(d.envelope().sender_id, "python-worker");
    assert_eq!(d.envelope().topic, topic);
    assert!(d.envelope().content_type.is_json());
    assert_eq!(&d.envelope().payload[..], b"{\"layer\":3}");
    assert_eq!(
        d.envelope().header("traceparent"),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(d.attempt(), 1);

    // Nack with a delay, then the nacking process goes away: another
    // consumer of the group gets it once the delay is over (the "not
    // before" time is in Redis), as attempt 2.
    let nacked_at = std::time::Instant::now();
    d.nack(Some(Duration::from_millis(800))).await.unwrap();
    drop(sa);
    a.close().await.unwrap();
    let b = RedisTransport::connect_url(&server.url()).await.unwrap();
    let mut sb = b.subscribe(sub("b")).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), sb.next())
        .await
        .expect("redelivered after the delay, long before the ack deadline")
        .unwrap()
        .unwrap();
    assert!(nacked_at.elapsed() >= Duration::from_millis(780));
    assert_eq!(d.envelope().event_id.as_str(), "py-1");
    assert_eq!(d.attempt(), 2);

    // Reject: the dead letter is an ordinary entry of `<topic>.dlq`,
    // readable with XRANGE, and the original is acked in the same MULTI.
    d.reject("unsupported layer").await.unwrap();
    let dlq: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(b.stream_key(&topic.dead_letter()))
        .arg("-")
        .arg("+")
        .query(&mut raw)
        .unwrap();
    assert_eq!(dlq.ids.len(), 1);
    let f = &dlq.ids[0].map;
    let text = |k: &str| match f.get(k) {
        Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(text("event_id"), "py-1");
    assert_eq!(text("h.oona-dlq-reason"), "unsupported layer");
    assert_eq!(text("h.oona-dlq-original-topic"), topic.as_str());
    assert_eq!(text("h.oona-dlq-group"), "kasmina");
    assert_eq!(text("payload"), "{\"layer\":3}");
    assert_eq!(pending(&mut raw, &b.stream_key(&topic), group.as_str()), 0);
    b.close().await.unwrap();
}

/// Key-ordered groups keep a queue per key in Redis
/// (`<topic>:korder:<group>:<key>`); settled entries leave it, so a key
/// that is done leaves nothing behind, and deleting the topic deletes what
/// pending entries left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_queues_leave_nothing_behind() {
    let (name, bin) = binaries().remove(0);
    let server = Server::start(&bin, &format!("{name}-korder"));
    let topic = Topic::new("control.korder.commands").unwrap();
    let bus = RedisTransport::connect_url(&server.url()).await.unwrap();
    let sub = Subscription::new(topic.clone(), Name::new("ordered").unwrap())
        .key_ordered(true)
        .ack_deadline(Duration::from_secs(60));
    let mut s = bus.subscribe(sub).await.unwrap();
    let keyed = |i: usize| {
        Envelope::builder(topic.clone(), format!("{i}"))
            .sender_id("t")
            .key(format!("k{}", i % 3))
            .build()
    };
    bus.publish_batch((0..30).map(keyed).collect())
        .await
        .unwrap();
    let mut raw = server.raw();
    let queues = |raw: &mut redis::Connection| -> Vec<String> {
        redis::cmd("KEYS")
            .arg(format!("{}:korder:*", bus.stream_key(&topic)))
            .query(raw)
            .unwrap()
    };
    let mut held = Vec::new();
    for i in 0..30 {
        let d = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .unwrap_or_else(|_| panic!("delivery {i}"))
            .unwrap()
            .unwrap();
        if i < 27 {
            d.ack().await.unwrap();
        } else {
            held.push(d);
        }
    }
    // Three held, one per key: their queues remain, holding one entry each.
    let mut left = queues(&mut raw);
    left.sort();
    assert_eq!(left.len(), 3, "{left:?}");
    for q in &left {
        let n: i64 = redis::cmd("ZCARD").arg(q).query(&mut raw).unwrap();
        assert_eq!(n, 1, "{q}");
    }
    for d in held {
        d.ack().await.unwrap();
    }
    assert!(queues(&mut raw).is_empty(), "{:?}", queues(&mut raw));
    // Pending entries' queues go with the topic.
    bus.publish(keyed(99)).await.unwrap();
    let _d = tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(queues(&mut raw).len(), 1);
    drop(s);
    bus.delete_topic(&topic).await.unwrap();
    assert!(queues(&mut raw).is_empty());
    bus.close().await.unwrap();
}

/// The publisher child of the outage test (does nothing unless run by it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_publisher_child() {
    use oona_conformance::outage::{by_driver, publisher_child};
    publisher_child(by_driver(oona_redis::DRIVER)).await;
}

struct Stopped<'a>(&'a mut Server);

#[async_trait::async_trait]
impl oona_conformance::outage::Outage for Stopped<'_> {
    async fn begin(&mut self) {
        self.0.stop(); // SIGTERM: Redis writes its AOF and exits
    }
    async fn end(&mut self) {
        self.0.spawn();
    }
}

/// The outage on a real stop: the server stopped for 60 s while a
/// publisher keeps publishing through a spool, the publisher SIGKILLed
/// mid-outage and a new one started on its spool, the server back: every
/// publish that returned `Ok` is delivered, in order per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_and_a_killed_publisher_lose_nothing() {
    let (name, bin) = binaries().remove(0);
    let mut server = Server::start(&bin, &format!("outage-{name}"));
    let url = format!("{}?timeout=1s", server.url());
    let reader = std::sync::Arc::new(RedisTransport::connect_url(&url).await.unwrap());
    let child = oona_conformance::outage::Child {
        test: "outage_publisher_child",
        url: &url,
    };
    let report = oona_conformance::outage::publishers_lose_nothing(
        &name,
        child,
        &mut Stopped(&mut server),
        reader.clone(),
    )
    .await;
    println!("outage [redis {name}, server stopped]: {report}");
    reader.close().await.unwrap();
}
