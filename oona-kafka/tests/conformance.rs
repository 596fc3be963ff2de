//! The conformance suite against a Kafka-compatible broker:
//! `scripts/brokers.sh up kafka && set -a && . target/brokers.env && set +a &&
//! cargo test -p oona-kafka --test conformance`.
//!
//! Kafka clients connect to the address a broker *advertises*, not the one
//! they bootstrapped from, so a TCP proxy in front of a shared broker would
//! only see the first connection. With `OONA_TEST_KAFKA_TANSU` (the tansu
//! binary, written by `scripts/brokers.sh`) the fixture therefore starts its
//! own tansu whose advertised listener *is* the proxy: every connection of
//! every client goes through the proxy and the reconnect case can cut them
//! all. Without it the suite runs against `OONA_TEST_KAFKA_URL` directly and
//! the reconnect case is left out (named as such).
//!
//! Test-only settings (in the client URL, not transport defaults):
//! `fetch_wait=10ms` because tansu answers a fetch only when the wait runs
//! out; `session_timeout=6s` because tansu holds a JoinGroup about half the
//! session timeout; `batch_messages=1` because tansu's ListOffsets(latest)
//! can answer a wrong end offset after a multi-record batch (a `Latest`
//! group would then replay history); `partitions=1` because tansu answers
//! a ListOffsets by timestamp with offset 0, not "none", for a partition
//! with no record that late (a group starting `At(t)` would replay the
//! partitions that got no later message). Several partitions and a
//! rebalance are covered by `tests/rebalance.rs`.
//!
//! One test-only behaviour (in the fixture, not the transport): the
//! fixture's clients publish to a topic one call at a time
//! ([`OneWriterPerTopic`]). tansu (memory storage) moves a partition's high
//! watermark before it stores the record, so while two connections produce
//! to one partition a fetch can see the later record and not yet the
//! earlier one; the consumer then moves past the earlier offset (Kafka
//! offsets may have gaps) and never reads it, although it is stored. The
//! publishers still run concurrently; only their produce requests to one
//! topic no longer overlap at the broker. See the README's tansu gaps and
//! `examples/tansu_fetch_gap.rs`, which shows it with raw rdkafka clients.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use oona_conformance::proxy::TcpProxy;
use oona_conformance::{Fixture, Timing};
use oona_core::{
    Capabilities, DeliveryStream, Envelope, Error, ErrorKind, Health, Receipt, Retention,
    Subscription, Topic, TopicPolicy, Transport,
};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

const CLIENT_PARAMS: &str = "fetch_wait=10ms&session_timeout=6s&batch_messages=1&partitions=1";

struct KafkaFixture {
    /// `host:port` the clients bootstrap from.
    bootstrap: String,
    proxy: Option<TcpProxy>,
    tansu: Mutex<Option<Child>>,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    /// Shared by every client the fixture hands out: one publish at a time
    /// per topic (see the crate docs: tansu's fetch can skip a record while
    /// two connections produce to one partition).
    publish_locks: PublishLocks,
}

type PublishLocks = Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>;

/// A [`oona_kafka::KafkaTransport`] whose `publish` and `publish_batch`
/// take a per-topic lock shared by all the fixture's clients, so produce
/// requests to one partition never overlap at the broker. Everything else
/// is the transport's own behaviour. Republishes the transport makes itself
/// (retry and dead-letter topics) are not covered.
#[derive(Debug)]
struct OneWriterPerTopic {
    inner: oona_kafka::KafkaTransport,
    locks: PublishLocks,
}

impl OneWriterPerTopic {
    fn lock_of(&self, topic: &Topic) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(locks.entry(topic.to_string()).or_default())
    }
}

#[async_trait]
impl Transport for OneWriterPerTopic {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn ensure_topic(&self, topic: &Topic, policy: &TopicPolicy) -> oona_core::Result<()> {
        self.inner.ensure_topic(topic, policy).await
    }

    async fn publish(&self, envelope: Envelope) -> oona_core::Result<Receipt> {
        let lock = self.lock_of(&envelope.topic);
        let _one = lock.lock().await;
        self.inner.publish(envelope).await
    }

    async fn publish_batch(&self, envelopes: Vec<Envelope>) -> oona_core::Result<Vec<Receipt>> {
        let mut topics: Vec<Topic> = envelopes.iter().map(|e| e.topic.clone()).collect();
        topics.sort();
        topics.dedup();
        // Taken in name order, so two batches never wait on each other.
        let locks: Vec<_> = topics.iter().map(|t| self.lock_of(t)).collect();
        let mut held = Vec::with_capacity(locks.len());
        for l in &locks {
            held.push(l.lock().await);
        }
        self.inner.publish_batch(envelopes).await
    }

    async fn subscribe(&self, subscription: Subscription) -> oona_core::Result<DeliveryStream> {
        self.inner.subscribe(subscription).await
    }

    async fn delete_topic(&self, topic: &Topic) -> oona_core::Result<()> {
        self.inner.delete_topic(topic).await
    }

    async fn health(&self) -> Health {
        self.inner.health().await
    }

    async fn flush(&self) -> oona_core::Result<()> {
        self.inner.flush().await
    }

    async fn close(&self) -> oona_core::Result<()> {
        self.inner.close().await
    }
}

fn broker_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Broker, format!("{what}: {e}"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Start a private tansu behind a cuttable proxy it advertises.
fn private_tansu(bin: &str) -> std::io::Result<(TcpProxy, Child)> {
    let port = free_port();
    let proxy = TcpProxy::start(format!("127.0.0.1:{port}"))?;
    let child = Command::new(bin)
        .args([
            "broker",
            "--listener-url",
            &format!("tcp://127.0.0.1:{port}"),
            "--advertised-listener-url",
            &format!("tcp://{}", proxy.addr()),
            "--storage-engine",
            "memory://tansu/",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let until = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > until {
            return Err(std::io::Error::other("tansu did not listen within 10 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((proxy, child))
}

fn make(url: String) -> KafkaFixture {
    let shared = url
        .trim_start_matches("kafka://")
        .split(['/', '?'])
        .next()
        .unwrap_or("127.0.0.1:9092")
        .to_string();
    let (bootstrap, proxy, tansu) = match std::env::var("OONA_TEST_KAFKA_TANSU") {
        Ok(bin) if !bin.trim().is_empty() => match private_tansu(bin.trim()) {
            Ok((proxy, child)) => (proxy.addr().to_string(), Some(proxy), Some(child)),
            Err(e) => panic!("could not start tansu from OONA_TEST_KAFKA_TANSU={bin}: {e}"),
        },
        _ => (shared, None, None),
    };
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &bootstrap);
    let producer = cfg.create().expect("raw producer");
    let admin = cfg.create().expect("raw admin client");
    KafkaFixture {
        bootstrap,
        proxy,
        tansu: Mutex::new(tansu),
        producer,
        admin,
        publish_locks: PublishLocks::default(),
    }
}

impl Drop for KafkaFixture {
    fn drop(&mut self) {
        if let Ok(mut t) = self.tansu.lock() {
            if let Some(mut c) = t.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

#[async_trait]
impl Fixture for KafkaFixture {
    fn name(&self) -> String {
        "kafka (tansu)".into()
    }

    async fn connect(&self) -> oona_core::Result<Arc<dyn Transport>> {
        let t = oona_kafka::connect(&format!("kafka://{}?{CLIENT_PARAMS}", self.bootstrap)).await?;
        Ok(Arc::new(OneWriterPerTopic {
            inner: t,
            locks: Arc::clone(&self.publish_locks),
        }))
    }

    async fn write_raw(&self, topic: &Topic, raw: &[u8]) -> oona_core::Result<()> {
        let lock = {
            let mut locks = self.publish_locks.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(locks.entry(topic.to_string()).or_default())
        };
        let _one = lock.lock().await;
        self.producer
            .send(
                FutureRecord::<(), [u8]>::to(topic.as_str()).payload(raw),
                Duration::from_secs(10),
            )
            .await
            .map(|_| ())
            .map_err(|(e, _)| broker_error("raw produce", e))
    }

    async fn cut_connections(&self) -> oona_core::Result<()> {
        match &self.proxy {
            Some(p) => p.cut().await.map_err(|e| broker_error("cut", e)),
            None => Err(Error::new(
                ErrorKind::Unsupported,
                "no private tansu behind a proxy: set OONA_TEST_KAFKA_TANSU (Kafka clients \
                 reconnect to the advertised address, so only a broker advertising the proxy \
                 can be cut)",
            )),
        }
    }

    async fn restore_connections(&self) -> oona_core::Result<()> {
        match &self.proxy {
            Some(p) => p.restore().await.map_err(|e| broker_error("restore", e)),
            None => Err(Error::new(ErrorKind::Unsupported, "no proxy")),
        }
    }

    async fn applied_retention(&self, topic: &Topic) -> oona_core::Result<Retention> {
        let res = self
            .admin
            .describe_configs(
                [&ResourceSpecifier::Topic(topic.as_str())],
                &AdminOptions::new(),
            )
            .await
            .map_err(|e| broker_error("describe configs", e))?;
        for r in res {
            let r = r.map_err(|e| broker_error("describe configs", format!("{e:?}")))?;
            if let Some(v) = r.get("retention.ms").and_then(|e| e.value.clone()) {
                let ms: i64 = v
                    .parse()
                    .map_err(|_| broker_error("retention.ms", v.clone()))?;
                return Ok(if ms < 0 {
                    Retention::Indefinite
                } else {
                    Retention::For(Duration::from_millis(ms as u64))
                });
            }
        }
        Err(broker_error("describe configs", "no retention.ms"))
    }

    fn timing(&self) -> Timing {
        // tansu on a loaded 2-core machine: group joins take seconds (the
        // JoinGroup hold), so waits and margins get twice the default.
        Timing::default().with_slack(2.0)
    }
}

fn main() -> ExitCode {
    // RUST_LOG=oona_kafka=debug shows what the transport does.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    oona_conformance::run_with_env("OONA_TEST_KAFKA_URL", make)
}
