//! The conformance suite against Apache Kafka:
//! `scripts/brokers.sh up kafka && set -a && . target/brokers.env && set +a &&
//! cargo test -p oona-kafka --test conformance`.
//!
//! Kafka clients connect to the addresses a broker *advertises*, not the one
//! they bootstrapped from, so a TCP proxy in front of the broker's main
//! listener would only see the first connection. `scripts/brokers.sh`
//! therefore gives the broker a second listener (`CUT`) that listens on
//! `OONA_TEST_KAFKA_CUT_UPSTREAM` and advertises `OONA_TEST_KAFKA_CUT_LISTEN`;
//! the fixture puts its proxy on the advertised address, and every
//! connection of every client it hands out passes the proxy, so the
//! reconnect case can cut them all. Without those variables the reconnect
//! case is left out (named as such).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use oona_conformance::proxy::TcpProxy;
use oona_conformance::Fixture;
use oona_core::{Error, ErrorKind, Retention, Topic, Transport};
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

struct KafkaFixture {
    /// `host:port` the transport's clients bootstrap from: the proxy when
    /// there is one, else the broker.
    bootstrap: String,
    /// The test URL's query (`?group_protocol=consumer`, ...), passed on.
    query: String,
    proxy: Option<TcpProxy>,
    /// The broker's own client, on the main listener.
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
}

fn broker_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Broker, format!("{what}: {e}"))
}

/// The proxy on the broker's `CUT` listener, when `scripts/brokers.sh`
/// described one.
fn cut_proxy() -> Option<TcpProxy> {
    let vars = (
        std::env::var("OONA_TEST_KAFKA_CUT_LISTEN"),
        std::env::var("OONA_TEST_KAFKA_CUT_UPSTREAM"),
    );
    let (Ok(listen), Ok(upstream)) = vars else {
        // Required runs leave nothing out: the reconnect case needs these.
        assert!(
            !oona_conformance::broker_required(),
            "OONA_TEST_KAFKA_CUT_LISTEN and OONA_TEST_KAFKA_CUT_UPSTREAM are not set and \
             OONA_TEST_REQUIRE=1 (scripts/brokers.sh up kafka writes them)"
        );
        return None;
    };
    let listen: SocketAddr = listen
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("OONA_TEST_KAFKA_CUT_LISTEN={listen:?}: {e}"));
    Some(
        TcpProxy::start_on(listen, upstream.trim())
            .unwrap_or_else(|e| panic!("proxy on {listen} (OONA_TEST_KAFKA_CUT_LISTEN): {e}")),
    )
}

fn make(url: String) -> KafkaFixture {
    let direct = url
        .trim_start_matches("kafka://")
        .split(['/', '?'])
        .next()
        .unwrap_or("127.0.0.1:9092")
        .to_string();
    // A consumer child of a case connects directly: its parent owns the
    // proxy's port.
    let proxy = if oona_conformance::is_child_process() {
        None
    } else {
        cut_proxy()
    };
    let bootstrap = proxy
        .as_ref()
        .map(|p| p.addr().to_string())
        .unwrap_or_else(|| direct.clone());
    let mut query = url
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    if oona_conformance::is_child_process() {
        // Children of one consumer name are one member restarted: it
        // takes its partitions back at once (no session timeout per kill).
        query.push(if query.is_empty() { '?' } else { '&' });
        query.push_str("static_membership=true");
    }
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &direct);
    KafkaFixture {
        bootstrap,
        query,
        proxy,
        producer: cfg.create().expect("raw producer"),
        admin: cfg.create().expect("raw admin client"),
    }
}

#[async_trait]
impl Fixture for KafkaFixture {
    fn name(&self) -> String {
        "kafka".into()
    }

    async fn connect(&self) -> oona_core::Result<Arc<dyn Transport>> {
        let t = oona_kafka::connect(&format!("kafka://{}{}", self.bootstrap, self.query)).await?;
        Ok(Arc::new(t))
    }

    async fn write_raw(&self, topic: &Topic, raw: &[u8]) -> oona_core::Result<()> {
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
                "no cuttable listener: set OONA_TEST_KAFKA_CUT_LISTEN and \
                 OONA_TEST_KAFKA_CUT_UPSTREAM (scripts/brokers.sh up kafka does)",
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
}

fn main() -> ExitCode {
    // RUST_LOG=oona_kafka=debug shows what the transport does. Without it,
    // the engine's warnings (a dead letter that failed and is retried, say)
    // are shown: they explain a slow case in a CI log.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("oona_core::engine=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    oona_conformance::run_with_env("OONA_TEST_KAFKA_URL", make)
}
