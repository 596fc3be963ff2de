//! The conformance fixture, shared by the Redis 7 and Redis 8 test targets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use oona_conformance::proxy::TcpProxy;
use oona_conformance::Fixture;
use oona_core::{Error, ErrorKind, Retention, Topic, Transport};
use oona_redis::{policy_field, RedisConfig, RedisTransport};

/// Clients connect through a cuttable proxy; raw writes and policy reads go
/// straight to the server with the plain `redis` client.
pub struct RedisFixture {
    name: String,
    url: String,
    proxy: TcpProxy,
    raw: redis::Client,
}

fn err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Broker, format!("{what}: {e}"))
}

impl RedisFixture {
    /// Must run inside a tokio runtime (the proxy listens there).
    pub fn new(name: &str, url: String) -> RedisFixture {
        let cfg = RedisConfig::from_url(&url).expect("broker URL");
        let upstream = match &cfg.connection.addr {
            redis::ConnectionAddr::Tcp(h, p) => format!("{h}:{p}"),
            other => panic!("the fixture needs a plain TCP Redis URL, got {other}"),
        };
        let proxy = TcpProxy::start(upstream).expect("proxy");
        let raw = redis::Client::open(cfg.connection.clone()).expect("raw client");
        RedisFixture {
            name: name.to_string(),
            url,
            proxy,
            raw,
        }
    }

    fn config(&self) -> RedisConfig {
        let mut cfg = RedisConfig::from_url(&self.url).expect("broker URL");
        let addr: SocketAddr = self.proxy.addr();
        cfg.connection.addr = redis::ConnectionAddr::Tcp(addr.ip().to_string(), addr.port());
        cfg
    }

    async fn raw(&self) -> oona_core::Result<redis::aio::MultiplexedConnection> {
        self.raw
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| err("raw connection", e))
    }
}

#[async_trait]
impl Fixture for RedisFixture {
    fn name(&self) -> String {
        self.name.clone()
    }

    async fn connect(&self) -> oona_core::Result<Arc<dyn Transport>> {
        Ok(Arc::new(RedisTransport::connect(self.config()).await?))
    }

    async fn write_raw(&self, topic: &Topic, raw: &[u8]) -> oona_core::Result<()> {
        let key = format!("{}{}", RedisConfig::DEFAULT_PREFIX, topic);
        let mut c = self.raw().await?;
        // Fields of a foreign producer that are no Oona envelope.
        let _: String = redis::cmd("XADD")
            .arg(&key)
            .arg("*")
            .arg("junk")
            .arg(raw)
            .arg("source")
            .arg("conformance")
            .query_async(&mut c)
            .await
            .map_err(|e| err("XADD", e))?;
        Ok(())
    }

    async fn cut_connections(&self) -> oona_core::Result<()> {
        self.proxy.cut().await.map_err(|e| err("proxy cut", e))
    }

    async fn restore_connections(&self) -> oona_core::Result<()> {
        self.proxy
            .restore()
            .await
            .map_err(|e| err("proxy restore", e))
    }

    async fn applied_retention(&self, topic: &Topic) -> oona_core::Result<Retention> {
        let key = format!("{}{}:policy", RedisConfig::DEFAULT_PREFIX, topic);
        let mut c = self.raw().await?;
        let ms: Option<i64> = redis::cmd("HGET")
            .arg(&key)
            .arg(policy_field::RETENTION_MS)
            .query_async(&mut c)
            .await
            .map_err(|e| err("HGET", e))?;
        match ms {
            None => Err(err(
                "applied_retention",
                format!("no policy record at {key}"),
            )),
            Some(ms) if ms < 0 => Ok(Retention::Indefinite),
            Some(ms) => Ok(Retention::For(Duration::from_millis(ms as u64))),
        }
    }
}
